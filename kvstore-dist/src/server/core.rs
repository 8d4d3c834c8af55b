//! The state of a server and the handling of each request.
//!
//! Locks are taken in one order only: `membership` (see [`membership`]), `workers`, then
//! `entries`, then one entry, then the updater; `worker_names` and `regions` are leaf locks,
//! taken last and never held while taking another. Replies are sent while holding the entry
//! (the value must not change while its bytes are on their way), never while holding
//! `workers` or `entries`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvstore_base::{DType, Key, NDArray, OptimizerSpec, StorageType};
use kvstore_optimizer::Updater;

use super::merge::{copy_from_bytes, OwnedPush, Pushed};
use super::reply::{Answer, Batch, Wants};
use crate::config::DistConfig;
use crate::protocol::{self, head, InitMeta, Mode, PushSeq, RowRequest, ShmAttach, ShmSlot};
use crate::shm::{self, Region};
use crate::transport::{ConnectionId, Handler, Outgoing, Request, Responder};
use kvstore_compression::{Codec, CompressionSpec};

/// Replies bigger than this go out on threads of their own when a round answers several
/// workers, so that the workers receive in parallel.
const PARALLEL_REPLY_BYTES: usize = 1 << 20;

mod membership;

use membership::Workers;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request waiting for its round to complete: a pushpull, or a pull from a worker that
/// pushed in the round (sync pushes themselves are acknowledged once merged, the round's last
/// once it is updated).
struct Waiter {
    rank: u32,
    answer: Answer,
    wants: Wants,
}

/// The most pushes of one part a worker may have queued for later sync rounds (each a copy
/// of its data): beyond that a push is refused, so that a worker pushing a key in a loop, or
/// many threads of one, cannot fill the server's memory while the others fall behind.
const MAX_QUEUED_PUSHES: usize = 64;

/// A push that arrived while its worker already had one in the current round.
struct Queued {
    rank: u32,
    /// Its step number ([`PushSeq`]).
    seq: PushSeq,
    payload: OwnedPush,
    waiter: Waiter,
    /// Pulls of the same worker that came after this push: answered after its round, not
    /// with the round in progress (which does not hold it).
    pulls: Vec<Waiter>,
}

/// An init of a rank other than 0, waiting for rank 0's.
struct InitWaiter {
    answer: Answer,
    since: Instant,
    /// Whether its stall was logged.
    stall_logged: bool,
    rank: u32,
    meta: InitMeta,
}

/// One part of one key.
struct Entry {
    /// The user's key: the optimizer runs under it.
    key: Key,
    meta: InitMeta,
    /// `None` until rank 0's init arrived.
    value: Option<NDArray>,
    /// Inits of other ranks waiting for rank 0's value.
    init_waiters: Vec<InitWaiter>,
    /// The sum of the current round (kept between rounds as a buffer).
    merge: Option<NDArray>,
    /// Ranks that pushed in the current round.
    pushed: Vec<bool>,
    waiters: Vec<Waiter>,
    round_started: Option<Instant>,
    /// Whether the current round's stall was logged (`KVSTORE_STALL_WARNING_SECS`).
    stall_logged: bool,
    queued: VecDeque<Queued>,
    /// Why the last round failed, for each worker whose acknowledged push it lost and that has
    /// not been told yet: its next pull of the part fails with it, and so does its next push
    /// unless a lost worker failed the round (see [`RoundFailure`]).
    failed: Vec<Option<RoundFailure>>,
    /// The step number of each worker's push merged in the current round, or applied or
    /// merged in a completed one (0: none): a push of the same number is a retry, not merged
    /// again (see `protocol`, "Retried pushes"). A failed round forgets those it held.
    merged_seq: Vec<PushSeq>,
}

/// Why a sync round failed, kept for a worker that pushed in it and was not told yet.
#[derive(Clone)]
struct RoundFailure {
    why: String,
    /// A worker was lost (or left): the worker hears of it from any call until the job is
    /// whole again, so its next push of the part (a retry of the step) clears this. Other
    /// failures (a timeout, a failed update) are its next push's too.
    by_loss: bool,
}

/// The server's state, shared by every connection's thread.
pub(crate) struct Core {
    rank: u32,
    num_workers: u32,
    timeout: Duration,
    /// When a waiting round or init is logged (`KVSTORE_STALL_WARNING_SECS`; zero: never).
    stall_warning: Duration,
    /// `worker rank r (id ..) at host:port`, by rank (a recovering worker's replaces the lost
    /// one's).
    worker_names: Mutex<Vec<String>>,
    /// Held across a worker's loss (marking it gone and failing its rounds) and across a
    /// takeover of its rank, so that neither sees the other half done. Taken before any other
    /// lock of the server.
    membership: Mutex<()>,
    /// Per rank, how many times a recovering worker took it over: a push that found its
    /// sender's rank before a takeover is refused if it reaches its entry after it.
    generations: Vec<std::sync::atomic::AtomicU64>,
    /// Losses of workers whose rounds were failed (counted before any entry is visited): a
    /// sync push that read this before its entry's lock, and finds it changed there, may have
    /// missed its round's failure, and is refused rather than start a round no one can join.
    losses: std::sync::atomic::AtomicU64,
    workers: Mutex<Workers>,
    finished: Condvar,
    entries: Mutex<HashMap<PartId, SharedEntry>>,
    updater: Mutex<Option<Updater>>,
    /// Rank 0's last two `load_optimizer_states` calls: their numbers, and their outcomes once
    /// known (a status byte, 0 for success, then the error's text).
    load_outcome: Mutex<std::collections::VecDeque<(u64, Option<Vec<u8>>)>>,
    /// Workers asking for the outcome of a load still in progress: (its number, since when,
    /// the answer), answered when rank 0 records it or, at the latest, after `LOAD_PARK`
    /// ("still pending": the worker asks again).
    load_waiters: Mutex<Vec<(u64, Instant, Responder)>>,
    /// The codec of compressed pushes, once a worker set gradient compression.
    codec: Mutex<Option<Codec>>,
    /// The name of the optimizer the job set last (`set_optimizer`, `kController`), against
    /// which a recovering worker's is checked (a state file may have replaced the running
    /// one since).
    optimizer_set: Mutex<Option<String>>,
    /// Where workers' shared-memory regions may be opened; `None`: refused (`KVSTORE_SHM=0`).
    shm_dir: Option<std::path::PathBuf>,
    /// The region each worker connection lent, by its address.
    regions: Mutex<HashMap<ConnectionId, Arc<Region>>>,
    /// Log each row-sparse push and pull (`MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE`).
    row_sparse_verbose: bool,
}

type Reply = Result<(), String>;

/// The waits one pass of [`Core::expire`] found past the stall warning: the rounds' parts by
/// the workers they wait for, and the parts whose inits wait for rank 0.
#[derive(Default)]
struct Stalls {
    rounds: std::collections::BTreeMap<String, Vec<String>>,
    inits: Vec<String>,
}

/// `key 3`, `key 3 and key 5`, or `key 3, key 5, key 8 and 12 more`.
fn some_of(parts: &[String]) -> String {
    match parts {
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [a, b, c] => format!("{a}, {b} and {c}"),
        [a, b, c, rest @ ..] => format!("{a}, {b}, {c} and {} more", rest.len()),
        [] => "no part".to_string(),
    }
}

/// A part of a key: `(wire id, part index)`.
type PartId = (u64, u64);

type SharedEntry = Arc<Mutex<Entry>>;

impl Core {
    /// The state of server `rank` of the cluster `config` describes, whose workers are
    /// `worker_names` (by rank).
    pub(crate) fn new(rank: u32, config: &DistConfig, worker_names: Vec<String>) -> Core {
        let num_workers = config.num_workers;
        let n = num_workers as usize;
        Core {
            rank,
            num_workers,
            timeout: config.timeout,
            stall_warning: config.stall_warning,
            worker_names: Mutex::new(worker_names),
            membership: Mutex::new(()),
            generations: (0..n)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            losses: std::sync::atomic::AtomicU64::new(0),
            workers: Mutex::new(Workers {
                hello: vec![false; n],
                bye: vec![false; n],
                dead: vec![None; n],
                ..Workers::default()
            }),
            finished: Condvar::new(),
            entries: Mutex::new(HashMap::new()),
            updater: Mutex::new(None),
            load_outcome: Mutex::new(std::collections::VecDeque::new()),
            load_waiters: Mutex::new(Vec::new()),
            codec: Mutex::new(None),
            optimizer_set: Mutex::new(None),
            shm_dir: config.shm.then(|| config.shm_dir.clone()),
            row_sparse_verbose: config.row_sparse_verbose,
            regions: Mutex::new(HashMap::new()),
        }
    }

    fn worker_name(&self, rank: u32) -> String {
        lock(&self.worker_names)
            .get(rank as usize)
            .cloned()
            .unwrap_or_else(|| format!("worker rank {rank}"))
    }

    fn describe(&self, key: &Key, part: u64) -> String {
        if part == 0 {
            format!("key {key}")
        } else {
            format!("key {key} (part {part})")
        }
    }

    /// Fails the rounds and inits that are older than the timeout, naming the workers they
    /// wait for. Called periodically.
    pub(crate) fn expire(&self) {
        self.expire_load_waiters();
        let mut stalls = Stalls::default();
        for ((_, part), entry) in self.entry_list() {
            // A part busy now (answering a peer slow to read, for at most the timeout) is
            // looked at next time: the others' rounds expire meanwhile.
            let mut e = match entry.try_lock() {
                Ok(e) => e,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => continue,
            };
            if e.round_started.is_none() && e.init_waiters.is_empty() {
                continue; // nothing waits on this part
            }
            let what = self.describe(&e.key, part);
            let waited = e.round_started.map(|t| t.elapsed());
            if waited.is_some_and(|w| w < self.timeout && self.stalled(w)) && !e.stall_logged {
                let missing = self.missing_pushes(&e);
                stalls.rounds.entry(missing).or_default().push(what.clone());
                e.stall_logged = true;
            }
            if waited.is_some_and(|w| w >= self.timeout) {
                let missing = self.missing_pushes(&e);
                let msg = format!(
                    "the sync round of {what} on server {} timed out after {:?}: still waiting \
                     for a push from {}",
                    self.rank, self.timeout, missing
                );
                fail_round(&mut e, &msg, false);
            }
            let mut init_stalled = false;
            for w in e.init_waiters.iter_mut() {
                let waited = w.since.elapsed();
                if !w.stall_logged && waited < self.timeout && self.stalled(waited) {
                    w.stall_logged = true;
                    init_stalled = true;
                }
            }
            if init_stalled {
                stalls.inits.push(what.clone());
            }
            if e.init_waiters
                .iter()
                .any(|w| w.since.elapsed() >= self.timeout)
            {
                let msg = format!(
                    "the init of {what} on server {} timed out after {:?}: {} has not sent \
                     its value",
                    self.rank,
                    self.timeout,
                    self.worker_name(0)
                );
                for w in e.init_waiters.drain(..) {
                    w.answer.fail(&msg);
                }
            }
        }
        self.log_stalls(stalls);
    }

    /// The workers the round of `e` waits for, by name.
    fn missing_pushes(&self, e: &Entry) -> String {
        let names: Vec<String> = (0..self.num_workers)
            .filter(|&r| !e.pushed[r as usize])
            .map(|r| self.worker_name(r))
            .collect();
        names.join(", ")
    }

    /// Whether a wait of `waited` is long enough to be logged.
    fn stalled(&self, waited: Duration) -> bool {
        !self.stall_warning.is_zero() && waited >= self.stall_warning
    }

    /// Logs the waits that passed `KVSTORE_STALL_WARNING_SECS` in this pass: one line per set
    /// of workers the rounds wait for, one for the inits waiting for rank 0.
    fn log_stalls(&self, stalls: Stalls) {
        let fails = format!(
            "it fails once it has waited {:?} (KVSTORE_TIMEOUT_SECS)",
            self.timeout
        );
        for (missing, parts) in stalls.rounds {
            log::warn!(
                "kvstore-dist: server {}: the sync round of {} has waited {:?} or more for a push \
                 from {missing}; {fails}",
                self.rank,
                some_of(&parts),
                self.stall_warning,
            );
        }
        if !stalls.inits.is_empty() {
            log::warn!(
                "kvstore-dist: server {}: the init of {} has waited {:?} or more for the value of \
                 {}; {fails}",
                self.rank,
                some_of(&stalls.inits),
                self.stall_warning,
                self.worker_name(0),
            );
        }
    }

    /// Every part held, each with its entry, taken out of `entries` so that the entries can be
    /// locked one by one without holding it.
    fn entry_list(&self) -> Vec<(PartId, SharedEntry)> {
        lock(&self.entries)
            .iter()
            .map(|(k, e)| (*k, Arc::clone(e)))
            .collect()
    }

    fn entry(&self, wire_key: u64, part: u64) -> Option<Arc<Mutex<Entry>>> {
        lock(&self.entries).get(&(wire_key, part)).cloned()
    }

    fn uninitialised(&self, wire_key: u64, part: u64) -> String {
        format!(
            "key with wire id {wire_key} (part {part}) is not initialised on server {}: init it first",
            self.rank
        )
    }

    fn init(&self, request: Request, responder: Responder) {
        let recovering = request.header.flags & protocol::FLAG_RECOVERING != 0;
        let id = (request.header.key, request.header.aux);
        let rank = self.sender_rank(&request);
        self.init_part(
            rank,
            recovering,
            id,
            &request.payload,
            Answer::One(responder),
        );
    }

    /// Declares or sets one part (`payload`: an [`InitMeta`], then rank 0's data); the answer
    /// waits for rank 0's value when another rank's declaration comes first.
    fn init_part(
        &self,
        rank: Result<u32, String>,
        recovering: bool,
        id: PartId,
        payload: &[u8],
        answer: Answer,
    ) {
        let mut slot = Some(answer);
        let result = rank.and_then(|rank| self.try_init(rank, recovering, id, payload, &mut slot));
        if let Some(answer) = slot {
            match result {
                Ok(()) => answer.ok(&[]),
                Err(e) => answer.fail(&e),
            }
        }
    }

    /// Declares or sets a part; takes the answer out of `slot` when it must wait for rank 0's
    /// value.
    fn try_init(
        &self,
        rank: u32,
        recovering: bool,
        (wire_key, part): PartId,
        payload: &[u8],
        slot: &mut Option<Answer>,
    ) -> Reply {
        let (meta, data) = InitMeta::decode(payload)?;
        let entry = {
            let mut entries = lock(&self.entries);
            Arc::clone(entries.entry((wire_key, part)).or_insert_with(|| {
                Arc::new(Mutex::new(Entry {
                    key: meta.key.clone(),
                    meta: meta.clone(),
                    value: None,
                    init_waiters: Vec::new(),
                    stall_logged: false,
                    merge: None,
                    pushed: vec![false; self.num_workers as usize],
                    waiters: Vec::new(),
                    round_started: None,
                    queued: VecDeque::new(),
                    failed: vec![None; self.num_workers as usize],
                    merged_seq: vec![0; self.num_workers as usize],
                }))
            }))
        };
        let mut e = lock(&entry);
        if rank != 0 || (recovering && e.value.is_some()) {
            if e.value.is_some() {
                // Rank 0's declaration is in place: this one must match it.
                return match self.init_mismatch(rank, &meta, &e.meta, part) {
                    Some(msg) => Err(msg),
                    None => Ok(()),
                };
            }
            let answer = slot.take().expect("the answer is still here");
            e.init_waiters.push(InitWaiter {
                answer,
                since: Instant::now(),
                stall_logged: false,
                rank,
                meta,
            });
            return Ok(());
        }
        if let Some(value) = &e.value {
            // Rank 0 retrying an init that failed on another part (a lost link, a full
            // server): this part took it, and holds it still.
            if meta == e.meta && value.as_bytes() == Some(data) {
                return Ok(());
            }
            return Err(format!(
                "{} was already initialised on server {} (with other values, or since changed \
                 by pushes)",
                self.describe(&meta.key, part),
                self.rank
            ));
        }
        // Rank 0 declares the part; the others' declarations must match its. The ranks waiting
        // for it learn at once when its value cannot be taken.
        let value = match self.rank0_value(&meta, part, data) {
            Ok(value) => value,
            Err(msg) => {
                for w in std::mem::take(&mut e.init_waiters) {
                    w.answer.fail(&format!("rank 0's init failed: {msg}"));
                }
                return Err(msg);
            }
        };
        e.value = Some(value);
        e.key = meta.key.clone();
        e.meta = meta;
        for w in std::mem::take(&mut e.init_waiters) {
            match self.init_mismatch(w.rank, &w.meta, &e.meta, part) {
                Some(msg) => w.answer.fail(&msg),
                None => w.answer.ok(&[]),
            }
        }
        Ok(())
    }

    /// The value rank 0's init of part `part` declares (`meta`) and carries (`data`).
    fn rank0_value(&self, meta: &InitMeta, part: u64, data: &[u8]) -> Result<NDArray, String> {
        let elements = usize::try_from(meta.elements).map_err(|_| "too many elements")?;
        // A part of whole rows is kept as rows, so that the optimizer can update some of them.
        let shape = match usize::try_from(meta.row_len) {
            Ok(0) => vec![elements],
            Ok(len) => vec![elements / len, len],
            Err(_) => return Err("too many elements per row".into()),
        };
        // Checked before allocating: a declaration's size is only as good as its data.
        if data.len() as u64 != meta.elements.saturating_mul(meta.dtype.size_of() as u64) {
            return Err(format!(
                "{}: rank 0's init declares {} elements of {} but carries {} bytes",
                self.describe(&meta.key, part),
                meta.elements,
                meta.dtype,
                data.len()
            ));
        }
        let mut value = NDArray::zeros(&shape, meta.dtype);
        copy_from_bytes(&mut value, data)?;
        Ok(value)
    }

    /// The error for a worker whose declaration of a part differs from rank 0's.
    fn init_mismatch(
        &self,
        rank: u32,
        meta: &InitMeta,
        rank0: &InitMeta,
        part: u64,
    ) -> Option<String> {
        // How a part is kept: flat, or as rows; and the key's storage type.
        let layout = |m: &InitMeta| {
            let rows = match m.row_len {
                0 => String::new(),
                len => format!(" in rows of {len}"),
            };
            let storage = if m.row_sparse {
                ", row-sparse"
            } else {
                ", dense"
            };
            format!("{rows}{storage}")
        };
        (meta != rank0).then(|| {
            format!(
                "worker rank {rank} declares {} as {} elements of {}{} but rank 0 declared {} as \
                 {} elements of {}{} (the value server {} holds): every worker must init the \
                 same keys with the same shapes, dtypes and storage types, in the same order",
                self.describe(&meta.key, part),
                meta.elements,
                meta.dtype,
                layout(meta),
                self.describe(&rank0.key, part),
                rank0.elements,
                rank0.dtype,
                layout(rank0),
                self.rank,
            )
        })
    }

    /// Maps the region a worker lends (see [`protocol::CMD_SHM_ATTACH`]).
    fn shm_attach(&self, request: &Request) -> Reply {
        let dir = self.shm_dir.as_ref().ok_or_else(|| {
            format!(
                "server {} does not use shared memory (KVSTORE_SHM=0)",
                self.rank
            )
        })?;
        let attach = ShmAttach::decode(&request.payload)?;
        let region = shm::open(dir, &attach.name, attach.len, &attach.nonce)?;
        lock(&self.regions).insert(request.connection, Arc::new(region));
        Ok(())
    }

    /// How errors name a part.
    fn describe_id(&self, (wire_key, part): PartId) -> String {
        match self.entry(wire_key, part) {
            Some(entry) => self.describe(&lock(&entry).key, part),
            None => format!("key with wire id {wire_key} (part {part})"),
        }
    }

    /// The shared-memory slots of a request (data slot first, then reply slot, as its flags
    /// say), each checked against the sender's region, and the bytes after them.
    #[allow(clippy::type_complexity)]
    fn shm_slots<'a>(
        &self,
        request: &'a Request,
    ) -> Result<
        (
            Option<(Arc<Region>, ShmSlot)>,
            Option<(Arc<Region>, ShmSlot)>,
            &'a [u8],
        ),
        String,
    > {
        let flags = request.header.flags;
        let (data, reply) = (
            flags & protocol::FLAG_SHM_DATA != 0,
            flags & protocol::FLAG_SHM_REPLY != 0,
        );
        if !data && !reply {
            return Ok((None, None, &request.payload));
        }
        let region = lock(&self.regions)
            .get(&request.connection)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "{} names a shared-memory slot but lent no region to server {}",
                    request.connection, self.rank
                )
            })?;
        let mut index = 0;
        let mut take = |wanted: bool| -> Result<Option<(Arc<Region>, ShmSlot)>, String> {
            if !wanted {
                return Ok(None);
            }
            let slot = ShmSlot::decode(&request.payload, index)?;
            region.check(slot.offset, slot.len)?;
            index += 1;
            Ok(Some((Arc::clone(&region), slot)))
        };
        let data = take(data)?;
        let reply = take(reply)?;
        Ok((
            data,
            reply,
            &request.payload[index * protocol::SHM_SLOT_LEN..],
        ))
    }

    /// A push (or pushpull when `wants_data`) in a message of its own; its data and its answer
    /// may be in the worker's shared-memory region.
    fn push(&self, request: Request, responder: Responder, wants_data: bool) {
        let (part, seq) = protocol::split_push_aux(request.header.aux);
        let id = (request.header.key, part);
        let (data_slot, reply_slot, inline) = match self.shm_slots(&request) {
            Ok(slots) => slots,
            Err(e) => {
                let op = if wants_data { "pushpull" } else { "push" };
                let _ = responder.respond_error(&format!("{op} of {}: {e}", self.describe_id(id)));
                return;
            }
        };
        let answer = match reply_slot {
            Some((region, slot)) => Answer::Shm(responder, region, slot),
            None => Answer::One(responder),
        };
        let sender = match self.sender(&request) {
            Ok(sender) => sender,
            Err(e) => return answer.fail(&e),
        };
        let flags = (request.header.flags, seq);
        match data_slot {
            Some((region, slot)) => {
                let mut answer = Some(answer);
                let read = region.with_slice(slot.offset, slot.len, |data| {
                    let answer = answer.take().expect("taken once");
                    self.push_part(sender, id, flags, data, answer, wants_data)
                });
                if let (Err(e), Some(answer)) = (read, answer) {
                    answer.fail(&e);
                }
            }
            None => self.push_part(sender, id, flags, inline, answer, wants_data),
        }
    }

    /// Merges (sync) or applies (async) one pushed part from worker `rank` (of its rank's
    /// `generation` when the request was read), its flags and step number `seq`: a retry of
    /// the push merged last (the same number) is answered without merging it again.
    fn push_part(
        &self,
        (rank, generation): (u32, u64),
        (wire_key, part): PartId,
        (flags, seq): (u16, PushSeq),
        data: &[u8],
        answer: Answer,
        wants_data: bool,
    ) {
        let Some(entry) = self.entry(wire_key, part) else {
            answer.fail(&self.uninitialised(wire_key, part));
            return;
        };
        let waiter = Waiter {
            rank,
            answer,
            wants: if wants_data { Wants::Value } else { Wants::Ack },
        };
        let mode = self.mode();
        // A worker that is gone can never complete a sync round again, but one that said
        // goodbye completes those it pushed in.
        let (gone, losses) = if mode == Mode::Sync {
            let w = lock(&self.workers);
            let gone: Vec<(u32, String, bool)> = (0..self.num_workers)
                .filter_map(|r| w.gone(r as usize).map(|why| (r, why, w.left(r as usize))))
                .collect();
            (gone, self.losses.load(SeqCst))
        } else {
            (Vec::new(), 0)
        };
        let mut e = lock(&entry);
        let gone = gone
            .into_iter()
            .find(|(r, _, left)| !(*left && e.pushed[*r as usize]))
            .map(|(r, why, _)| (r, why));
        let what = self.describe(&e.key, part);
        if mode == Mode::Sync && gone.is_none() && self.losses.load(SeqCst) != losses {
            waiter.answer.fail(&format!(
                "push of {what}: a worker is gone (left, lost or replaced) since this push was \
                 read, and the round it would start could not complete; retry the step once \
                 the job is whole"
            ));
            return;
        }
        if self.generations[rank as usize].load(SeqCst) != generation {
            // Its connection was evicted by a recovering worker after this push was read.
            waiter.answer.fail(&format!(
                "push of {what}: worker rank {rank}'s place was taken by a recovering worker \
                 while this push was on its way"
            ));
            return;
        }
        if seq != 0 {
            // A retry of a step whose push of this part was merged (its call failed on another
            // part), or is queued for the next round: answered as that push is, merged once.
            if e.merged_seq[rank as usize] == seq {
                match (&waiter.wants, mode) {
                    (Wants::Ack, _) => waiter.answer.ok(&[]),
                    (_, Mode::Sync) => self.pull_after_round(&mut e, part, waiter),
                    (_, Mode::Async) => self.answer_pull(&e, part, waiter.answer, waiter.wants),
                }
                return;
            }
            if let Some(q) = e.queued.iter_mut().find(|q| q.rank == rank && q.seq == seq) {
                match waiter.wants {
                    Wants::Ack => waiter.answer.ok(&[]),
                    // With that push's round.
                    _ => q.pulls.push(waiter),
                }
                return;
            }
        }
        if let Some((r, why)) = gone {
            let msg = format!(
                "the sync round of {what} on server {} cannot complete: {} {why}",
                self.rank,
                self.worker_name(r)
            );
            waiter.answer.fail(&msg);
            return;
        }
        if let Err(msg) = self.check_push(&e, flags, &what) {
            waiter.answer.fail(&msg);
            return;
        }
        let pushed = if protocol::is_row_sparse(flags) {
            match self.rows_of(&e, data, &what) {
                Ok(rows) => Pushed::Rows(rows),
                Err(msg) => return waiter.answer.fail(&msg),
            }
        } else if protocol::is_compressed(flags) {
            match *lock(&self.codec) {
                Some(codec) => Pushed::Packed(data, codec),
                None => {
                    waiter.answer.fail(&format!(
                        "push of {what}: the push is compressed but gradient compression is not \
                         set on server {}",
                        self.rank
                    ));
                    return;
                }
            }
        } else {
            Pushed::Raw(data)
        };
        match mode {
            Mode::Async => self.apply_async(&mut e, pushed, (waiter, seq), &what),
            Mode::Sync => {
                if e.pushed[rank as usize] {
                    let queued = e.queued.iter().filter(|q| q.rank == rank).count();
                    if queued >= MAX_QUEUED_PUSHES {
                        waiter.answer.fail(&format!(
                            "push of {what}: worker rank {rank} has {queued} pushes of it \
                             queued for later rounds already (each waits for every worker's \
                             push of the round before): push a key again once the others \
                             pushed it"
                        ));
                        return;
                    }
                    // Its next round: replayed once this one completes.
                    e.queued.push_back(Queued {
                        rank,
                        seq,
                        payload: pushed.to_owned(),
                        waiter,
                        pulls: Vec::new(),
                    });
                    return;
                }
                // A round this worker pushed in failed after its push was acknowledged, and
                // no pull told it yet (it pushes again without pulling): this push is refused
                // with that failure, rather than merged beside pushes of another step (a late
                // worker's). Told now, its next push starts a round. A round a lost worker
                // failed was told by the loss (this push retries the step).
                match e.failed[rank as usize].take() {
                    Some(f) if !f.by_loss => {
                        waiter.answer.fail(&format!(
                            "push of {what}: the round of this worker's previous push of it \
                             failed ({}); this push was not merged: retry the step",
                            f.why
                        ));
                        return;
                    }
                    _ => {}
                }
                self.merge_sync(&mut e, pushed, (waiter, seq), &what);
                while !e.pushed.iter().any(|&p| p) && !e.queued.is_empty() {
                    // The round just completed: replay what was queued for the next one.
                    let mut replay = std::mem::take(&mut e.queued);
                    while let Some(q) = replay.pop_front() {
                        if e.pushed[q.rank as usize] {
                            e.queued.push_back(q);
                        } else {
                            self.merge_sync(
                                &mut e,
                                q.payload.as_pushed(),
                                (q.waiter, q.seq),
                                &what,
                            );
                            // Its worker's later pulls: after this round, or now if the push
                            // completed it (or failed).
                            for pull in q.pulls {
                                self.pull_after_round(&mut e, part, pull);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The rows of a row-sparse push to the part of `e`, checked against it.
    fn rows_of<'a>(
        &self,
        e: &Entry,
        data: &'a [u8],
        what: &str,
    ) -> Result<protocol::RowsPush<'a>, String> {
        let value = e.value.as_ref().expect("checked by check_push");
        if e.meta.row_len == 0 {
            return Err(format!(
                "push of {what}: a row-sparse push, but the key is not kept by rows (server {} \
                 keeps it flat: a 0-d key, one whose rows have no elements, or a wide dense key \
                 of few rows)",
                self.rank
            ));
        }
        // Addressable: checked when the init was decoded.
        let row_bytes = e.meta.row_len as usize * value.dtype().size_of();
        let rows = protocol::RowsPush::decode(data, value.shape()[0] as u64, row_bytes)
            .map_err(|msg| format!("push of {what}: {msg}"))?;
        if self.row_sparse_verbose {
            let ids: Vec<u64> = rows.ids().collect();
            log::info!(
                "server {} push of {what}: rows {ids:?} of the part",
                self.rank
            );
        }
        Ok(rows)
    }

    fn check_push(&self, e: &Entry, flags: u16, what: &str) -> Reply {
        if e.value.is_none() {
            return Err(format!(
                "{what} is not initialised on server {}: init it first",
                self.rank
            ));
        }
        match protocol::dtype_of_flag(flags) {
            Some(d) if d == e.meta.dtype => Ok(()),
            Some(d) => Err(format!(
                "push of {what}: the value is {d} but the key holds {}",
                e.meta.dtype
            )),
            None => Err(format!("push of {what}: unknown dtype code {flags}")),
        }
    }

    /// A batch of parts (see [`protocol::CMD_BATCH`]).
    fn batch(&self, request: Request, responder: Responder) {
        let inner = request.header.aux;
        let parsed = protocol::BatchItem::decode(&request.payload).and_then(|(items, data)| {
            let inits = inner == u64::from(protocol::CMD_INIT);
            let pushes = inner == u64::from(protocol::CMD_PUSH)
                || inner == u64::from(protocol::CMD_PUSHPULL);
            if !pushes && !inits && inner != u64::from(protocol::CMD_PULL) {
                return Err(format!("a batch of unknown command {inner:#x}"));
            }
            if pushes || inits {
                // Checked: the items' lengths then cut `data` without overflow.
                let pushed = items
                    .iter()
                    .try_fold(0u64, |sum, it| sum.checked_add(it.len));
                if pushed != Some(data.len() as u64) {
                    return Err(format!(
                        "a batch announces {} bytes of data but carries {}",
                        pushed.map_or("more than 2^64".to_string(), |p| p.to_string()),
                        data.len()
                    ));
                }
            }
            let sender = self.sender(&request);
            let puller = self.puller(&request);
            Ok((items, data, sender, puller, pushes, inits))
        });
        let (items, data, sender, puller, pushes, inits) = match parsed {
            Ok(p) => p,
            Err(e) => {
                let _ = responder.respond_error(&e);
                return;
            }
        };
        if inits {
            let batch = Batch::new(responder, &vec![Some(0); items.len()]);
            let mut at = 0usize;
            for (i, it) in items.iter().enumerate() {
                let len = it.len as usize;
                self.init_part(
                    sender.clone().map(|(rank, _)| rank),
                    it.flags & protocol::FLAG_RECOVERING != 0,
                    (it.wire, u64::from(it.part)),
                    &data[at..at + len],
                    Answer::Item(Arc::clone(&batch), i),
                );
                at += len;
            }
            return;
        }
        let wants_data = inner != u64::from(protocol::CMD_PUSH);
        // Pulled data is the part's whole value (pushes may be compressed), sized by the value
        // held, never by a declaration: another rank's init may declare any size before rank
        // 0's value arrives (that part's pull then fails; unsized, it may bring no data).
        let lens: Vec<Option<usize>> = items
            .iter()
            .map(|it| match self.entry(it.wire, u64::from(it.part)) {
                _ if !wants_data => Some(0),
                Some(entry) => {
                    let e = lock(&entry);
                    e.value.as_ref().map(|v| v.size() * v.dtype().size_of())
                }
                None => None,
            })
            .collect();
        let answered = lens.iter().flatten().sum::<usize>();
        if answered > protocol::BATCH_MAX_ANSWER_BYTES {
            let _ = responder.respond_error(&format!(
                "a batch of {} items would answer {answered} bytes: a batch answers at most {} \
                 (parts over {} bytes are pulled alone, a batch holds about 1 MiB)",
                items.len(),
                protocol::BATCH_MAX_ANSWER_BYTES,
                protocol::BATCH_ITEM_BYTES
            ));
            return;
        }
        let batch = Batch::new(responder, &lens);
        let mut at = 0usize;
        for (i, it) in items.iter().enumerate() {
            let answer = Answer::Item(Arc::clone(&batch), i);
            let id = (it.wire, u64::from(it.part));
            if !pushes {
                self.pull_part(&puller, id, answer, Wants::Value);
                continue;
            }
            match &sender {
                Ok(sender) => {
                    let len = it.len as usize;
                    self.push_part(
                        *sender,
                        id,
                        (it.flags, it.seq),
                        &data[at..at + len],
                        answer,
                        wants_data,
                    );
                    at += len;
                }
                Err(e) => answer.fail(e),
            }
        }
    }

    fn merge_sync(
        &self,
        e: &mut Entry,
        pushed: Pushed<'_>,
        (waiter, seq): (Waiter, PushSeq),
        what: &str,
    ) {
        let first = e.round_started.is_none();
        let Entry { value, merge, .. } = &mut *e;
        let value = value.as_ref().expect("checked by check_push");
        let merged = if first {
            pushed.start_sum(merge, value, self.sum_dtype(value.dtype()))
        } else {
            pushed.add_to(
                merge.as_mut().expect("set by the round's first push"),
                value,
            )
        };
        if let Err(msg) = merged {
            waiter.answer.fail(&format!("push of {what}: {msg}"));
            return;
        }
        if first {
            e.round_started = Some(Instant::now());
            e.stall_logged = false;
        }
        let waiter_rank = waiter.rank;
        e.pushed[waiter.rank as usize] = true;
        e.merged_seq[waiter.rank as usize] = seq;
        // A push returns once merged, as MXNet's does not block its caller; the worker's next
        // pull of the key waits for the round instead (see `pull_part`). The round's last push
        // returns once the round is complete (updated): what a worker reads from the server
        // after every worker's push returned (a state file saved after a barrier) includes it.
        let ack = match waiter.wants {
            Wants::Ack => Some(waiter.answer),
            _ => {
                e.waiters.push(waiter);
                None
            }
        };
        let completed = match e.pushed.iter().all(|&p| p) {
            true => self.complete_round(e, what),
            false => Ok(()),
        };
        if let Some(answer) = ack {
            match completed {
                Ok(()) => answer.ok(&[]),
                // The round's last push: told at once that the update failed.
                Err(msg) => {
                    e.failed[waiter_rank as usize] = None;
                    answer.fail(&msg);
                }
            }
        }
    }

    /// The dtype a round's pushes to a part of `dtype` are summed in: float32 when the
    /// optimizer keeps a float32 master copy of such a part (`multi_precision` with a
    /// half-precision weight: MXNet's servers sum in float32 then), else `dtype`.
    fn sum_dtype(&self, dtype: DType) -> DType {
        match &*lock(&self.updater) {
            Some(u) if u.keeps_master_copy(dtype) => DType::F32,
            _ => dtype,
        }
    }

    /// Every worker pushed: update (or store the sum), then answer every push of the round;
    /// the update's error, if it failed (the round's pushes are failed with it, and the
    /// ranks not waiting are marked so that their next pull or push reports it).
    fn complete_round(&self, e: &mut Entry, what: &str) -> Result<(), String> {
        let outcome = {
            let mut updater = lock(&self.updater);
            let Entry {
                key, value, merge, ..
            } = &mut *e;
            let value = value.as_mut().expect("checked by check_push");
            let merge = merge.as_mut().expect("set by the round's first push");
            match updater.as_mut() {
                Some(u) => u
                    .update(key, merge, value)
                    .map_err(|err| format!("the optimizer failed on {what}: {err}")),
                None if merge.storage_type() == StorageType::RowSparse
                    || merge.dtype() != value.dtype() =>
                {
                    // The round's rows replace the part, the rows no one pushed becoming
                    // zeros; a sum kept in float32 (an optimizer set since) is cast.
                    value.assign(merge).map_err(|err| err.to_string())
                }
                None => {
                    std::mem::swap(value, merge);
                    Ok(())
                }
            }
        };
        let waiters = std::mem::take(&mut e.waiters);
        e.round_started = None;
        let answered = match &outcome {
            Ok(()) => Some(waiters),
            Err(msg) => {
                // Marks the ranks that pushed: their next pulls (and pushes) fail with it.
                fail_waiters(e, waiters, msg, false);
                None
            }
        };
        // The round is over before any answer goes out.
        e.pushed.iter_mut().for_each(|p| *p = false);
        if let Some(waiters) = answered {
            reply_all(waiters, e.value.as_ref().expect("set"));
        }
        outcome
    }

    /// Applies one push at once: through the optimizer, or, with none, the push replaces the
    /// value (a round of one push; MXNet's server aborts instead).
    fn apply_async(
        &self,
        e: &mut Entry,
        pushed: Pushed<'_>,
        (waiter, seq): (Waiter, PushSeq),
        what: &str,
    ) {
        let result = (|| {
            let mut updater = lock(&self.updater);
            let Entry { key, value, .. } = &mut *e;
            let value = value.as_mut().expect("checked by check_push");
            match updater.as_mut() {
                Some(u) => {
                    let grad = pushed.to_array(value)?;
                    u.update(key, &grad, value)
                        .map_err(|err| format!("the optimizer failed on {what}: {err}"))
                }
                None => pushed.assign_to(value),
            }
        })();
        match result {
            Ok(()) => {
                e.merged_seq[waiter.rank as usize] = seq;
                reply_all(vec![waiter], e.value.as_ref().expect("set"))
            }
            Err(msg) => waiter.answer.fail(&msg),
        }
    }

    fn pull(&self, request: &Request, responder: Responder) {
        let id = (request.header.key, request.header.aux);
        let answer = match self.shm_slots(request) {
            Ok((_, Some((region, slot)), _)) => Answer::Shm(responder, region, slot),
            Ok(_) => Answer::One(responder),
            Err(e) => {
                let _ = responder.respond_error(&format!("pull of {}: {e}", self.describe_id(id)));
                return;
            }
        };
        self.pull_part(&self.puller(request), id, answer, Wants::Value);
    }

    /// Answers with the value of a part (or the rows `wants` names) to a pull from `puller`
    /// (see [`puller`](Self::puller): an evicted connection's is refused). A pull from a worker
    /// that pushed in the part's current sync round waits for the round (its push has been
    /// acknowledged already, and a pull after a push returns that round's result); any other
    /// pull is answered at once.
    fn pull_part(
        &self,
        puller: &Result<Option<u32>, String>,
        (wire_key, part): PartId,
        answer: Answer,
        wants: Wants,
    ) {
        let rank = match puller {
            Ok(rank) => *rank,
            Err(why) => {
                let operation = match wants {
                    Wants::Rows(_) => "row_sparse_pull",
                    _ => "pull",
                };
                let id = self.describe_id((wire_key, part));
                return answer.fail(&format!("{operation} of {id}: {why}"));
            }
        };
        let Some(entry) = self.entry(wire_key, part) else {
            answer.fail(&self.uninitialised(wire_key, part));
            return;
        };
        let mut e = lock(&entry);
        let Some(rank) = rank else {
            return self.answer_pull(&e, part, answer, wants);
        };
        if let Some(failure) = e.failed[rank as usize].take() {
            return answer.fail(&failure.why);
        }
        let waiter = Waiter {
            rank,
            answer,
            wants,
        };
        // Behind a push of this worker queued for a later round: after that round.
        match e.queued.iter_mut().rev().find(|q| q.rank == rank) {
            Some(q) => q.pulls.push(waiter),
            None => self.pull_after_round(&mut e, part, waiter),
        }
    }

    /// Answers the pull of `waiter` once the round in progress completes when its worker
    /// pushed in it, else now.
    fn pull_after_round(&self, e: &mut Entry, part: u64, waiter: Waiter) {
        if e.round_started.is_some() && e.pushed[waiter.rank as usize] {
            e.waiters.push(waiter);
        } else {
            self.answer_pull(e, part, waiter.answer, waiter.wants);
        }
    }

    /// Answers a pull of part `part` of `e` with its value now.
    fn answer_pull(&self, e: &Entry, part: u64, answer: Answer, wants: Wants) {
        match &e.value {
            Some(v) => wants.answer(answer, v),
            None => answer.fail(&format!(
                "{} is not initialised on server {} yet: rank 0 has not sent its value",
                self.describe(&e.key, part),
                self.rank
            )),
        }
    }

    /// A row-sparse pull of one part: as a pull, answered with the requested rows.
    fn row_sparse_pull(&self, request: &Request, responder: Responder) {
        let id = (request.header.key, request.header.aux);
        let answer = Answer::One(responder);
        match RowRequest::decode(&request.payload) {
            Ok(rows) => {
                if self.row_sparse_verbose {
                    log::info!(
                        "server {} row_sparse_pull of {}: rows {:?}",
                        self.rank,
                        self.describe_id(id),
                        rows.rows
                    );
                }
                self.pull_part(&self.puller(request), id, answer, Wants::Rows(rows))
            }
            Err(e) => answer.fail(&format!("row_sparse_pull of {}: {e}", self.describe_id(id))),
        }
    }

    /// [`protocol::CMD_LOAD_OUTCOME`]: rank 0 records that its load `key` started (`aux` 2) or
    /// how it ended (`aux` 1); the other workers ask (`aux` 0).
    fn load_outcome(&self, request: &Request, responder: Responder) {
        let number = request.header.key;
        let mut records = lock(&self.load_outcome);
        let mut settled = Vec::new();
        let answer = match request.header.aux {
            2 | 1 => {
                let outcome = (request.header.aux == 1).then(|| request.payload.to_vec());
                if let Some(bytes) = &outcome {
                    // The workers waiting for this outcome hear it now.
                    let mut waiters = lock(&self.load_waiters);
                    let (these, others) = std::mem::take(&mut *waiters)
                        .into_iter()
                        .partition(|(n, _, _)| *n == number);
                    *waiters = others;
                    settled = these
                        .into_iter()
                        .map(|(_, _, r): (u64, Instant, Responder)| (r, bytes.clone()))
                        .collect();
                }
                match records.iter_mut().find(|(n, _)| *n == number) {
                    Some(record) => record.1 = outcome,
                    None => records.push_back((number, outcome)),
                }
                // Rank 0 may start call n + 1 before the others have read call n's outcome,
                // not call n + 2 (each call meets every worker in a barrier first).
                while records.len() > 2 {
                    records.pop_front();
                }
                Ok(Vec::new())
            }
            _ => match records.iter().find(|(n, _)| *n == number) {
                Some((_, Some(record))) => Ok(record.clone()),
                Some((_, None)) => {
                    // Answered when rank 0 records the outcome (a long poll).
                    lock(&self.load_waiters).push((number, Instant::now(), responder));
                    return;
                }
                None => match records.back() {
                    Some((n, _)) if *n > number => Err(format!(
                        "rank 0 has made load_optimizer_states call {n}, this worker asks for \
                         call {number}: every worker must call it"
                    )),
                    _ => Ok(Vec::new()),
                },
            },
        };
        drop(records);
        for (waiter, bytes) in settled {
            let _ = waiter.respond(Outgoing::new(0, &bytes));
        }
        let _ = match answer {
            Ok(bytes) => responder.respond(Outgoing::new(0, &bytes)),
            Err(e) => responder.respond_error(&e),
        };
    }

    /// How long a question about a load in progress is held before "still pending": well
    /// within the worker's wait for an answer.
    fn load_park(&self) -> Duration {
        (self.timeout / 4).min(Duration::from_secs(1))
    }

    /// Answers "still pending" to the questions held for longer than [`load_park`](Self::load_park).
    fn expire_load_waiters(&self) {
        let park = self.load_park();
        let expired: Vec<Responder> = {
            let mut waiters = lock(&self.load_waiters);
            let (old, young) = std::mem::take(&mut *waiters)
                .into_iter()
                .partition(|(_, since, _)| since.elapsed() >= park);
            *waiters = young;
            old.into_iter().map(|(_, _, r)| r).collect()
        };
        for waiter in expired {
            let _ = waiter.respond(Outgoing::new(0, &[protocol::LOAD_PENDING]));
        }
    }

    /// The optimizer's state file: every key's slice held here, and the optimizer.
    fn save_states(&self) -> Result<Vec<u8>, String> {
        match lock(&self.updater).as_ref() {
            Some(u) => u.save_states(true).map_err(|e| e.to_string()),
            None => Err(format!("server {} runs no optimizer", self.rank)),
        }
    }

    /// Replaces the optimizer's states (and optimizer) with a state file's.
    fn load_states(&self, body: &[u8]) -> Reply {
        match lock(&self.updater).as_mut() {
            Some(u) => u.load_states(body).map_err(|e| e.to_string()),
            None => Err(format!("server {} runs no optimizer", self.rank)),
        }
    }

    /// Installs the optimizer of a spec. With `keep_running` (a worker taking a lost worker's
    /// place, re-running the job's program) an optimizer already running stays, with its
    /// states: the spec must name the optimizer the job set (its parameters may have changed
    /// since, e.g. a new learning rate; a state file may have replaced it).
    fn set_optimizer(&self, body: &[u8], keep_running: bool) -> Reply {
        let spec: OptimizerSpec = serde_json::from_slice(body)
            .map_err(|e| format!("the optimizer spec is not valid JSON: {e}"))?;
        let mut current = lock(&self.updater);
        if let (true, Some(running)) = (keep_running, current.as_ref()) {
            let set = lock(&self.optimizer_set)
                .clone()
                .unwrap_or_else(|| running.optimizer().name().to_string());
            if !set.eq_ignore_ascii_case(&spec.name) {
                return Err(format!(
                    "server {} runs the job's optimizer {set:?}, and a worker taking a lost \
                     worker's place sets {:?}: every worker must set the same optimizer",
                    self.rank, spec.name
                ));
            }
            return Ok(());
        }
        let updater = Updater::from_spec(&spec).map_err(|e| e.to_string())?;
        *current = Some(updater);
        *lock(&self.optimizer_set) = Some(spec.name.clone());
        log::info!(
            "kvstore-dist: server {} runs optimizer {:?}",
            self.rank,
            spec.name
        );
        Ok(())
    }

    fn command(&self, request: &Request) -> Reply {
        let head = request.header.key as i64 as i32;
        let body = &request.payload[..];
        match head {
            head::CONTROLLER => self.set_optimizer(body, false),
            head::SYNC_MODE => {
                lock(&self.workers).mode = Some(Mode::Sync);
                Ok(())
            }
            head::STOP_SERVER => {
                lock(&self.workers).stopped = true;
                self.finished.notify_all();
                Ok(())
            }
            head::SET_MULTI_PRECISION => Err(
                "kSetMultiPrecision: set `multi_precision` in the optimizer spec instead; the \
                 servers' optimizer keeps float32 master weights itself"
                    .to_string(),
            ),
            head::SET_GRADIENT_COMPRESSION => {
                // MXNet 1.9.1's text: `<type code>,<threshold>` (1 = 2bit).
                let spec = CompressionSpec::decode_params(&String::from_utf8_lossy(body))
                    .map_err(|e| format!("kSetGradientCompression: {e}"))?;
                *lock(&self.codec) = Some(spec.codec());
                Ok(())
            }
            head::SET_PROFILER_PARAMS => {
                Err("kSetProfilerParams: the servers have no profiler".to_string())
            }
            other => Err(format!(
                "unknown server command head {other}; known: 0 (kController), 1 \
                 (kSetMultiPrecision), 2 (kStopServer), 3 (kSyncMode), 4 \
                 (kSetGradientCompression), 5 (kSetProfilerParams)"
            )),
        }
    }

    /// Sets the codec of compressed pushes. With `keep_running` (a worker taking a lost
    /// worker's place) a codec already set stays and must be the same.
    fn set_compression(&self, body: &[u8], keep_running: bool) -> Reply {
        let params: kvstore_base::CompressionParams = serde_json::from_slice(body)
            .map_err(|e| format!("the compression parameters are not valid JSON: {e}"))?;
        let spec = CompressionSpec::from_params(&params).map_err(|e| e.to_string())?;
        let mut codec = lock(&self.codec);
        match *codec {
            Some(running) if keep_running && running != spec.codec() => {
                return Err(format!(
                    "server {} dequantises with {running:?}, and a worker taking a lost \
                     worker's place sets {:?}: every worker must set the same compression",
                    self.rank,
                    spec.codec()
                ))
            }
            Some(_) if keep_running => return Ok(()),
            _ => *codec = Some(spec.codec()),
        }
        drop(codec);
        log::info!(
            "kvstore-dist: server {} dequantises {} pushes (threshold {})",
            self.rank,
            spec.kind.name(),
            spec.threshold
        );
        Ok(())
    }
}

/// Fails every push of the current round with `msg` (`by_loss`: a worker was lost) and starts
/// afresh.
fn fail_round(e: &mut Entry, msg: &str, by_loss: bool) {
    let waiters = std::mem::take(&mut e.waiters);
    fail_waiters(e, waiters, msg, by_loss);
    for q in std::mem::take(&mut e.queued) {
        // Its worker is told, by its queued push's answer.
        e.failed[q.rank as usize] = None;
        q.waiter.answer.fail(msg);
        for pull in q.pulls {
            pull.answer.fail(msg);
        }
    }
    e.pushed.iter_mut().for_each(|p| *p = false);
    e.round_started = None;
}

/// Fails the waiters of a round that pushed in it, and remembers the failure for the workers
/// whose push was acknowledged but that are not waiting now (their next pull reports it).
fn fail_waiters(e: &mut Entry, waiters: Vec<Waiter>, msg: &str, by_loss: bool) {
    for (rank, pushed) in e.pushed.iter().enumerate() {
        if *pushed {
            e.failed[rank] = Some(RoundFailure {
                why: msg.to_string(),
                by_loss,
            });
            // Its push is discarded with the round: a retry merges anew.
            e.merged_seq[rank] = 0;
        }
    }
    for w in waiters {
        e.failed[w.rank as usize] = None;
        w.answer.fail(msg);
    }
}

/// Answers the pushes of a round: the value to those that asked for it, an empty
/// acknowledgement to the others (MXNet leaves those unanswered when both kinds meet in one
/// round). Big replies in messages of their own go out in parallel.
fn reply_all(waiters: Vec<Waiter>, value: &NDArray) {
    let send = |w: Waiter| w.wants.answer(w.answer, value);
    let parallel = waiters
        .iter()
        .filter(|w| matches!(w.wants, Wants::Value) && w.answer.is_one())
        .count()
        > 1
        && value.size() * value.dtype().size_of() >= PARALLEL_REPLY_BYTES;
    if !parallel {
        waiters.into_iter().for_each(send);
        return;
    }
    std::thread::scope(|s| {
        for w in waiters {
            s.spawn(|| send(w));
        }
    });
}

/// The transport handler of a server.
pub(crate) struct ServerHandler(pub(crate) Arc<Core>);

impl Handler for ServerHandler {
    fn handle(&self, request: Request, responder: Responder) {
        let core = &self.0;
        let simple = |r: Reply, responder: Responder| {
            let _ = match r {
                Ok(()) => responder.respond(Outgoing::new(0, &[])),
                Err(e) => responder.respond_error(&e),
            };
        };
        match request.header.command {
            protocol::CMD_HELLO => core.hello(&request, responder),
            protocol::CMD_INIT => core.init(request, responder),
            protocol::CMD_PUSH => core.push(request, responder, false),
            protocol::CMD_PUSHPULL => core.push(request, responder, true),
            protocol::CMD_PULL => core.pull(&request, responder),
            protocol::CMD_ROW_SPARSE_PULL => core.row_sparse_pull(&request, responder),
            protocol::CMD_SET_OPTIMIZER => simple(
                core.set_optimizer(&request.payload, request.header.key == 1),
                responder,
            ),
            protocol::CMD_COMMAND => simple(core.command(&request), responder),
            protocol::CMD_BYE => core.bye(&request, responder),
            protocol::CMD_BATCH => core.batch(request, responder),
            protocol::CMD_SET_COMPRESSION => simple(
                core.set_compression(&request.payload, request.header.key == 1),
                responder,
            ),
            protocol::CMD_SHM_ATTACH => simple(core.shm_attach(&request), responder),
            protocol::CMD_SAVE_STATES => {
                let _ = match core.save_states() {
                    Ok(bytes) => responder.respond(Outgoing::new(0, &bytes)),
                    Err(e) => responder.respond_error(&e),
                };
            }
            protocol::CMD_LOAD_STATES => simple(core.load_states(&request.payload), responder),
            protocol::CMD_LOAD_OUTCOME => core.load_outcome(&request, responder),
            other => simple(Err(format!("unknown command {other:#x}")), responder),
        }
    }

    fn disconnected(&self, connection: ConnectionId) {
        self.0.lost_connection(connection);
    }
}
