//! A worker's shared-memory region for one server connection: lent at connect time, carved
//! into slots by a bump allocator, reused once no request holds a slot, retired for good once a
//! request using it failed (the server may still write its slot later).

use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::DistConfig;
use crate::protocol::{self, ShmAttach, ShmSlot};
use crate::shm::{self, Region, HEADER_BYTES};
use crate::transport::{Connection, Outgoing};

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

/// One connection's region and its allocator.
pub(crate) struct Link {
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
    /// Lends a fresh region to the server of `conn`, unless `config` turns shared memory off;
    /// `None` (logged at debug level) whenever that fails: the connection then uses TCP only.
    pub(crate) fn attach(conn: &Connection, config: &DistConfig) -> Option<Arc<Link>> {
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

    /// Whether the region still takes requests.
    pub(crate) fn usable(&self) -> bool {
        !self.lock().retired
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots for one request: `data` bytes to push and `reply` bytes to receive (either may
    /// be absent); `None` when the region is retired or has no room left.
    pub(crate) fn reserve(
        self: &Arc<Link>,
        data: Option<usize>,
        reply: Option<usize>,
    ) -> Option<Lease> {
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
/// connection lost, or abandoned), it retires the region; otherwise it frees its slots, and the region is reused
/// from its start once no lease is left.
pub(crate) struct Lease {
    link: Arc<Link>,
    /// The pushed elements' slot.
    pub data: Option<ShmSlot>,
    /// The answer's slot.
    pub reply: Option<ShmSlot>,
    in_flight: bool,
}

impl Lease {
    /// Copies the pushed elements into the data slot.
    pub(crate) fn fill(&self, bytes: &[u8]) -> Result<(), String> {
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

    /// The request is about to go out: until [`answered`](Lease::answered), the server may
    /// use the slots.
    pub(crate) fn sending(&mut self) {
        self.in_flight = true;
    }

    /// The server answered the request: it no longer uses the slots.
    pub(crate) fn answered(&mut self) {
        self.in_flight = false;
    }

    /// Calls `f` with the answer the server wrote into the reply slot.
    pub(crate) fn with_reply<T>(&self, f: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
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
