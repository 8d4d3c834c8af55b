//! A worker's shared-memory region for one server connection: lent at connect time, carved
//! into slots by a bump allocator, reused once no request holds a slot, retired for good once a
//! request using it failed (the server may still write its slot later).

use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::DistConfig;
use crate::protocol::{self, ShmAttach, ShmSlot};
use crate::shm::{self, Region, HEADER_BYTES};
use crate::transport::{Connection, Outgoing, Response, TransportError};

/// Slots start at multiples of this many bytes.
const ALIGN: usize = 64;
/// The region's pages are committed in steps of this many bytes.
const COMMIT_STEP: usize = 2 << 20;

struct State {
    /// The first free byte.
    next: usize,
    /// Bytes from the region's start that are backed by memory (see [`shm::commit`]).
    committed: usize,
    /// Leases alive.
    users: usize,
    /// No more slots, ever.
    retired: bool,
}

/// The shared-memory region a worker lent to the server of one connection, and the allocator
/// of its slots (see the [module docs](crate::shm)).
pub struct Link {
    region: Region,
    file: std::fs::File,
    state: Mutex<State>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Lends a fresh region to the server of `conn`, unless `config` turns shared memory off
    /// (`KVSTORE_SHM=0`); `None` (logged at debug level) whenever that fails (another host, no
    /// room in `KVSTORE_SHM_DIR`, a server that refuses): the connection then uses TCP only.
    ///
    /// Call it right after the hello, before any request that may name a slot.
    pub fn attach(conn: &Connection, config: &DistConfig) -> Option<Arc<Link>> {
        if !config.shm {
            return None;
        }
        let peer = conn.peer();
        let fallback = |why: String| {
            log::debug!("kvstore-dist: no shared memory with {peer}, TCP only: {why}");
            None
        };
        let len = match usize::try_from(config.shm_bytes) {
            Ok(len) => len,
            Err(_) => return fallback("the region does not fit in memory".into()),
        };
        let created = match shm::create(&config.shm_dir, len) {
            Ok(c) => c,
            Err(e) => return fallback(e),
        };
        let name = created
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let attach = ShmAttach {
            len: len as u64,
            nonce: created.nonce,
            name,
        }
        .encode();
        let answer = conn.request(
            Outgoing::new(protocol::CMD_SHM_ATTACH, &attach),
            "shared-memory region",
        );
        // Both ends have it mapped (or never will): the name is no longer needed.
        let _ = std::fs::remove_file(&created.path);
        match answer {
            Ok(_) => Some(Arc::new(Link::new(created.region, created.file))),
            Err(e) => fallback(e.to_string()),
        }
    }

    fn new(region: Region, file: std::fs::File) -> Link {
        Link {
            region,
            file,
            state: Mutex::new(State {
                next: HEADER_BYTES,
                // The header holds the nonce: written, hence backed.
                committed: HEADER_BYTES,
                users: 0,
                retired: false,
            }),
        }
    }

    /// Whether the region still takes requests (it is retired for good once a request that
    /// used it went unanswered).
    pub fn usable(&self) -> bool {
        !self.lock().retired
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots for one request, the pushed bytes `data` (if any) already copied into its data
    /// slot and `reply` bytes reserved for the answer; `None` when the request must go over
    /// TCP (retired region, no room, a failed copy, logged at debug level as `what`).
    pub fn lease(
        self: &Arc<Link>,
        data: Option<&[u8]>,
        reply: Option<usize>,
        what: &str,
    ) -> Option<Lease> {
        let lease = self.reserve(data.map(<[u8]>::len), reply)?;
        if let Some(bytes) = data {
            if let Err(e) = lease.fill(bytes) {
                log::debug!("kvstore-dist: {what} goes over TCP: {e}");
                return None;
            }
        }
        Some(lease)
    }

    /// Slots for one request: `data` bytes to push and `reply` bytes to receive (either may
    /// be absent); `None` when the region is retired or has no room left (send that request
    /// over TCP). The region is reused from its start once no lease is alive.
    pub fn reserve(self: &Arc<Link>, data: Option<usize>, reply: Option<usize>) -> Option<Lease> {
        let mut st = self.lock();
        if st.retired {
            return None;
        }
        let mut at = st.next;
        let mut take = |n: Option<usize>| -> Option<Option<ShmSlot>> {
            let Some(n) = n else {
                return Some(None);
            };
            let start = at.checked_next_multiple_of(ALIGN)?;
            let end = start.checked_add(n)?;
            if end > self.region.len() {
                return None;
            }
            at = end;
            Some(Some(ShmSlot {
                offset: start as u64,
                len: n as u64,
            }))
        };
        let data = take(data)?;
        let reply = take(reply)?;
        if at > st.committed {
            let end = at
                .checked_next_multiple_of(COMMIT_STEP)
                .map_or(self.region.len(), |e| e.min(self.region.len()));
            if let Err(e) = shm::commit(&self.file, st.committed, end - st.committed) {
                log::debug!("kvstore-dist: a message goes over TCP: {e}");
                return None;
            }
            st.committed = end;
        }
        st.next = at;
        st.users += 1;
        Some(Lease {
            link: Arc::clone(self),
            data,
            reply,
            in_flight: false,
        })
    }
}

/// The slots of one request. Dropped while its request is in flight (unanswered: timed out,
/// connection lost, or abandoned), it retires the region; otherwise it frees its slots, and
/// the region is reused from its start once no lease is left.
///
/// The request's life: [`fill`](Lease::fill) the data slot, take the message's flags and
/// payload from [`slots`](Lease::slots), call [`sending`](Lease::sending) and send it; once
/// the request ended, give its outcome to [`settle`](Lease::settle); an answer flagged
/// [`FLAG_SHM_REPLY`](protocol::FLAG_SHM_REPLY) is then read with
/// [`with_reply`](Lease::with_reply) while the lease is alive.
pub struct Lease {
    link: Arc<Link>,
    /// The pushed elements' slot, when the request pushes.
    pub data: Option<ShmSlot>,
    /// The answer's slot, when the request expects elements back.
    pub reply: Option<ShmSlot>,
    in_flight: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("data", &self.data)
            .field("reply", &self.reply)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Copies the pushed elements into the data slot.
    ///
    /// # Errors
    /// A message when the lease has no data slot or `bytes` is not its size.
    pub fn fill(&self, bytes: &[u8]) -> Result<(), String> {
        let slot = self.data.ok_or("the request has no data slot")?;
        if slot.len != bytes.len() as u64 {
            return Err(format!(
                "{} bytes do not fit a slot of {}",
                bytes.len(),
                slot.len
            ));
        }
        self.link.region.copy_in(slot.offset, bytes)
    }

    /// The flags ([`FLAG_SHM_DATA`](protocol::FLAG_SHM_DATA),
    /// [`FLAG_SHM_REPLY`](protocol::FLAG_SHM_REPLY)) and the payload (the encoded slots, data
    /// slot first) of the request that uses this lease; add the request's other flags.
    pub fn slots(&self) -> (u16, Vec<u8>) {
        let mut flags = 0;
        let mut slots = Vec::with_capacity(2 * protocol::SHM_SLOT_LEN);
        if let Some(slot) = self.data {
            flags |= protocol::FLAG_SHM_DATA;
            slots.extend_from_slice(&slot.encode());
        }
        if let Some(slot) = self.reply {
            flags |= protocol::FLAG_SHM_REPLY;
            slots.extend_from_slice(&slot.encode());
        }
        (flags, slots)
    }

    /// The request is about to go out: until [`answered`](Lease::answered), the server may
    /// use the slots.
    pub fn sending(&mut self) {
        self.in_flight = true;
    }

    /// The server answered the request (an error message is an answer too): it no longer uses
    /// the slots.
    pub fn answered(&mut self) {
        self.in_flight = false;
    }

    /// Records how the request ended: any answer, an error message too, means the server is
    /// done with the slots; a request left unanswered (timed out, connection lost) stays in
    /// flight, so that dropping the lease retires the region (the server may still write it).
    pub fn settle(&mut self, outcome: &Result<Response, TransportError>) {
        if matches!(outcome, Ok(_) | Err(TransportError::Remote { .. })) {
            self.answered();
        }
    }

    /// Calls `f` with the answer the server wrote into the reply slot.
    ///
    /// # Errors
    /// A message when the lease has no reply slot.
    pub fn with_reply<T>(&self, f: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
        let slot = self.reply.ok_or("the request has no reply slot")?;
        self.link.region.with_slice(slot.offset, slot.len, f)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.link.lock();
        if self.in_flight {
            if !st.retired {
                log::debug!(
                    "kvstore-dist: a request using shared memory failed; its region is retired"
                );
            }
            st.retired = true;
        }
        st.users -= 1;
        if st.users == 0 {
            st.next = HEADER_BYTES;
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn link(len: usize) -> Arc<Link> {
        let made = shm::create(&std::env::temp_dir(), len).unwrap();
        std::fs::remove_file(&made.path).unwrap();
        Arc::new(Link::new(made.region, made.file))
    }

    #[test]
    fn slots_are_reused_once_free_and_never_after_a_failure() {
        let l = link(1 << 16);
        let mut a = l.reserve(Some(100), Some(100)).unwrap();
        assert_eq!(a.data.unwrap().offset, 64);
        assert_eq!(a.reply.unwrap().offset, 192);
        a.fill(&[7; 100]).unwrap();
        assert!(a.fill(&[7; 99]).is_err());
        a.sending();
        let b = l.reserve(None, Some(1000)).unwrap();
        assert_eq!(b.reply.unwrap().offset, 320);
        assert!(l.reserve(Some(1 << 16), None).is_none(), "no room");
        a.answered();
        drop(a);
        drop(b);
        let c = l.reserve(Some(8), None).unwrap();
        assert_eq!(c.data.unwrap().offset, 64, "reused from the start");
        let mut d = l.reserve(Some(8), None).unwrap();
        d.sending();
        drop(d); // failed in flight
        drop(c);
        assert!(!l.usable());
        assert!(l.reserve(Some(8), None).is_none());
    }
}
