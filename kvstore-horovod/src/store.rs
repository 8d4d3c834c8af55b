//! [`HorovodStore`]: one worker of a `horovod` job, and its cycles.
//!
//! A call validates its arguments, sums each key's values, and queues one tensor per key.
//! Calls may come from several threads at once (MXNet's engine issues Horovod operations
//! asynchronously); one of the waiting threads at a time **leads** the worker's cycles, as
//! Horovod's background thread does:
//!
//! 1. it waits until `HOROVOD_CYCLE_TIME` has passed since the previous cycle started;
//! 2. it takes every queued tensor whose name is not already in flight on this worker (a name
//!    in flight, or taken twice, stays queued for a later cycle) and submits them to the
//!    coordinator in one submission;
//! 3. it runs, in sequence order, the groups the coordinator answers (fused across the calls
//!    of every thread), and hands each tensor's result, or error, to the call it came from.
//!
//! Tensors that are not ready on every rank yet stay in flight across cycles: the coordinator
//! keeps them, and the leader keeps one submission held at rank 0 to receive their groups,
//! superseding it with the next cycle's submission when more tensors are queued, so that a
//! tensor waiting for other ranks never holds up the tensors queued after it. A call returns
//! once each of its tensors is done or failed; a failed tensor fails its own call, naming its
//! key, and no other call (a failed group fails the calls whose tensors were in it). Every
//! wait is bounded: by the stall inspector (`HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`) for the
//! coordinator's answers, by `KVSTORE_TIMEOUT_SECS` for the ring.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvstore_base::{
    with_in_place_sums_on_host, with_outs_fanned_out, with_values_on_host,
    with_values_summed_on_host, Capability, CompressionParams, Error, KVStoreBase, Key, KeyedOuts,
    KeyedValues, NDArray, Result, StorageType,
};
use kvstore_compression::WireCast;
use kvstore_dist::protocol::{Mode, CMD_BYE, CMD_HELLO};
use kvstore_dist::transport::{
    Connection, Handler, Outgoing, Pending, Request, Responder, Response, Server, TransportError,
};
use kvstore_dist::{Group as NodeGroup, Node, Role};
use kvstore_local::reduce::{self, ReduceConfig};

use crate::config::HorovodConfig;
use crate::coordinator::{Coordinator, Monitor};
use crate::ring::{Mailbox, Ring, Segments};
use crate::wire::{
    decode_plan, encode_requests, Group, Op, TensorRequest, CMD_DATA, CMD_SUBMIT, FRESH,
};

/// A submission's answer from rank 0.
type Outcome = std::result::Result<Response, TransportError>;

/// The capabilities of the store: it spans workers; it keeps no values and runs no optimizer.
pub(crate) const CAPABILITIES: &[Capability] = &[Capability::Distributed];

/// The smallest `KVSTORE_MAX_MESSAGE_BYTES` the store works with (16 MiB).
pub(crate) const MIN_MESSAGE_BYTES: u64 = 16 << 20;

/// The longest a leader waiting for rank 0's answer goes without looking at the queue.
const WATCH: Duration = Duration::from_millis(5);

/// The shortest such look (with a cycle time below it).
const WATCH_MIN: Duration = Duration::from_millis(1);

/// How long a waiting caller sleeps before looking again (it is woken on every change).
const NAP: Duration = Duration::from_millis(200);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tensors of a fused group at least this big take part in the ring in place; smaller ones
/// are packed together.
const IN_PLACE_BYTES: usize = 256 << 10;

/// Extra time beyond a bound, so that the peer's error (which says more) arrives first.
fn grace(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(2)) + Duration::from_millis(100)
}

/// Horovod's name of a key's tensor: `str(key)`.
fn tensor_name(key: &Key) -> String {
    match key {
        Key::Int(k) => k.to_string(),
        Key::Str(s) => s.to_string(),
    }
}

fn backend(store: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::Backend {
        store: store.to_string(),
        source: e.into(),
    }
}

/// Up to four names, for messages.
fn some_names<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> String {
    let n = names.len();
    let shown: Vec<&str> = names.take(4).collect();
    format!(
        "tensor{} [{}{}]",
        if n == 1 { "" } else { "s" },
        shown.join(", "),
        if n > 4 { ", ..." } else { "" }
    )
}

/// Serves a worker's address: chunks from the previous rank, submissions on rank 0.
struct WorkerHandler {
    rank: usize,
    mailbox: Arc<Mailbox>,
    coordinator: Option<Arc<Coordinator>>,
}

impl Handler for WorkerHandler {
    fn handle(&self, request: Request, responder: Responder) {
        let h = request.header;
        match h.command {
            CMD_DATA => {
                // Acknowledge before filing: once the chunk is filed, this rank may finish its
                // last operation and leave, closing the connection before a later ack.
                let _ = responder.respond(Outgoing::new(0, &[]));
                self.mailbox.put(h.key, h.aux, request.payload);
            }
            CMD_SUBMIT => match &self.coordinator {
                Some(c) => c.submit(h.key, h.aux, &request.payload, responder),
                None => {
                    let _ = responder.respond_error(&format!(
                        "rank {} is not the coordinator (rank 0 is)",
                        self.rank
                    ));
                }
            },
            other => {
                let _ = responder.respond_error(&format!("unknown command {other:#x}"));
            }
        }
    }
}

/// The links of a job of more than one worker.
struct Links {
    /// To rank `rank + 1`: the ring's data.
    next: Connection,
    /// To rank 0: submissions.
    coordinator: Connection,
    mailbox: Arc<Mailbox>,
}

/// One tensor of a call: its key, what is submitted, and this rank's value.
struct Local {
    key: Key,
    request: TensorRequest,
    data: NDArray,
}

/// A tensor of a call, queued or in flight; `data` becomes the result.
struct Tensor {
    /// The call it belongs to, and its place there.
    call: u64,
    index: usize,
    operation: &'static str,
    local: Local,
}

/// What a waiting call gets back.
struct CallSlot {
    results: Vec<Option<NDArray>>,
    /// Tensors neither done nor failed.
    left: usize,
    /// The first failure of one of its tensors.
    error: Option<Error>,
}

/// The shared state of the worker's cycles.
#[derive(Default)]
struct Cycles {
    /// Tensors waiting for a cycle, in arrival order.
    queue: VecDeque<Tensor>,
    /// Tensors submitted to the coordinator and not yet done or failed, by name.
    in_flight: HashMap<String, Tensor>,
    /// The calls waiting, by number.
    calls: HashMap<u64, CallSlot>,
    next_call: u64,
    /// Whether a thread is leading.
    leading: bool,
    /// The submission held at rank 0, waiting for groups or failures.
    held: Option<Pending>,
    /// When the last cycle started.
    last_cycle: Option<Instant>,
}

impl Cycles {
    /// Whether a queued tensor could go in a cycle now.
    fn admissible(&self) -> bool {
        self.queue
            .iter()
            .any(|t| !self.in_flight.contains_key(&t.local.request.name))
    }
}

/// A dense, contiguous copy of `a`.
fn own(a: &NDArray) -> NDArray {
    let dense = a.to_dense();
    if dense.as_bytes().is_some() {
        return dense;
    }
    let mut copy = NDArray::zeros(a.shape(), a.dtype());
    copy.assign(&dense).expect("same shape");
    copy
}

/// A worker of a `horovod` job (see the [crate docs](crate)).
///
/// A store is shared between threads (`&HorovodStore`, or an `Arc`): calls made at the same
/// time are gathered into cycles and fused (see [`cycles`](HorovodStore::cycles) and
/// [`ring_operations`](HorovodStore::ring_operations)).
pub struct HorovodStore {
    name: String,
    rank: usize,
    size: usize,
    timeout: Duration,
    cycle_time: Duration,
    cycles: Mutex<Cycles>,
    /// Signalled on every change of `cycles` that a waiting call may care about.
    changed: Condvar,
    cycle_count: AtomicU64,
    ring_count: AtomicU64,
    links: Option<Links>,
    /// Parameter servers of the job, if it has some: greeted and left idle.
    servers: Vec<Connection>,
    server: Option<Server>,
    monitor: Option<Monitor>,
    node: Mutex<Option<Node>>,
    /// How a key's per-device values are summed before the all-reduce.
    reduce: ReduceConfig,
    /// How floating-point gradients cross the ring (`set_gradient_compression`: Horovod's
    /// `Compression.fp16`).
    wire: Mutex<WireCast>,
}

impl std::fmt::Debug for HorovodStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HorovodStore")
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("cycle_time", &self.cycle_time)
            .finish_non_exhaustive()
    }
}

/// Leadership of the cycles, given back (and the waiting calls woken) when dropped.
struct Leading<'a>(&'a HorovodStore);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        lock(&self.0.cycles).leading = false;
        self.0.changed.notify_all();
    }
}

impl HorovodStore {
    /// Joins the job of `config` as a worker (blocks until every node has registered), serves
    /// on the advertised address and connects to the next rank and to rank 0.
    ///
    /// # Errors
    /// [`Error::Backend`] when joining or connecting fails or times out.
    pub fn connect(name: &str, config: &HorovodConfig) -> Result<HorovodStore> {
        config.dist.require_max_message_bytes(
            name,
            MIN_MESSAGE_BYTES,
            "the ring moves pieces of 1 MiB, and rank 0's coordinator lists every tensor of a \
             cycle in one message",
        )?;
        let mut dist = config.dist.clone();
        dist.role = Role::Worker;
        let mut node = Node::join(&dist).map_err(|e| backend(name, e))?;
        let rank = node.rank() as usize;
        let workers: Vec<String> = node.workers().map(|w| w.addr.clone()).collect();
        let size = workers.len();
        let mut transport = dist.transport();
        transport.node_id = node.id();
        let (coordinator, monitor) = if rank == 0 && size > 1 {
            let (c, m) = Coordinator::start(
                size,
                config.fusion_threshold,
                config.stall_warning,
                config.stall_shutdown,
            )
            .map_err(|e| backend(name, e))?;
            (Some(c), Some(m))
        } else {
            (None, None)
        };
        let mailbox = Arc::new(Mailbox::default());
        let listener = node
            .take_listener()
            .ok_or_else(|| backend(name, "the node's listening socket is gone"))?;
        let server = Server::from_listener(
            listener,
            transport.clone(),
            WorkerHandler {
                rank,
                mailbox: Arc::clone(&mailbox),
                coordinator,
            },
        )
        .map_err(|e| backend(name, e))?;
        let links = if size > 1 {
            let next = Connection::connect(workers[(rank + 1) % size].as_str(), transport.clone())
                .map_err(|e| backend(name, e))?;
            let mut long = transport.clone();
            // A held submission is answered within the stall time (and the inspector's tick).
            long.timeout = dist.timeout.max(config.stall_shutdown)
                + grace(dist.timeout)
                + Duration::from_millis(300);
            let coordinator =
                Connection::connect(workers[0].as_str(), long).map_err(|e| backend(name, e))?;
            Some(Links {
                next,
                coordinator,
                mailbox,
            })
        } else {
            None
        };
        // A job launched with parameter servers: say hello (and goodbye when leaving) so
        // that they end with the job.
        let mut servers = Vec::new();
        for s in node.servers() {
            let conn = Connection::connect(s.addr.as_str(), transport.clone())
                .map_err(|e| backend(name, e))?;
            conn.request(
                Outgoing::new(CMD_HELLO, name.as_bytes())
                    .key(rank as u64)
                    .aux(Mode::Sync.code()),
                &format!("hello from worker rank {rank}"),
            )
            .map_err(|e| backend(name, e))?;
            servers.push(conn);
        }
        Ok(HorovodStore {
            name: name.to_string(),
            rank,
            size,
            timeout: dist.timeout,
            cycle_time: config.cycle_time,
            cycles: Mutex::new(Cycles::default()),
            changed: Condvar::new(),
            cycle_count: AtomicU64::new(0),
            ring_count: AtomicU64::new(0),
            links,
            servers,
            server: Some(server),
            monitor,
            node: Mutex::new(Some(node)),
            reduce: ReduceConfig::from_env(),
            wire: Mutex::new(WireCast::None),
        })
    }

    /// Bytes this worker has sent to the next rank of the ring so far (chunks of all-reduces
    /// and broadcasts, frame headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.links.as_ref().map_or(0, |l| l.next.bytes_sent())
    }

    /// Bytes this worker has sent to the coordinator so far (its submissions).
    pub fn control_bytes_sent(&self) -> u64 {
        self.links
            .as_ref()
            .map_or(0, |l| l.coordinator.bytes_sent())
    }

    /// Cycles this worker has run so far: submissions to the coordinator of newly queued
    /// tensors (each holds the tensors that the worker's threads queued since the previous
    /// one). 0 in a job of one worker, which needs no coordination.
    pub fn cycles(&self) -> u64 {
        self.cycle_count.load(Ordering::Relaxed)
    }

    /// Collective operations this worker has run in the ring so far: one per group of fused
    /// tensors (a ring all-reduce or a broadcast chain), whatever the number of calls and keys
    /// whose tensors it held. Fewer operations than tensors means that tensors were fused;
    /// with `HOROVOD_FUSION_THRESHOLD=0` there is one per tensor. 0 in a job of one worker.
    pub fn ring_operations(&self) -> u64 {
        self.ring_count.load(Ordering::Relaxed)
    }

    /// The cycle time this worker runs with (`HOROVOD_CYCLE_TIME`).
    pub fn cycle_time(&self) -> Duration {
        self.cycle_time
    }

    fn at(&self, operation: &'static str, key: &Key) -> impl FnOnce(Error) -> Error + '_ {
        let key = key.clone();
        move |e| e.at_key(&self.name, operation, key)
    }

    fn state(&self) -> MutexGuard<'_, Cycles> {
        lock(&self.cycles)
    }

    /// Runs the collective operations of one call: queues its tensors, then waits until each
    /// is done or failed, leading the worker's cycles whenever no other thread does. Returns
    /// the results in the order of `tensors`, or the call's first failure (naming its key).
    fn collective(&self, operation: &'static str, tensors: Vec<Local>) -> Result<Vec<NDArray>> {
        let Some(links) = &self.links else {
            // A job of one: the local values are the results.
            return Ok(tensors.into_iter().map(|t| t.data).collect());
        };
        let mut st = self.state();
        let call = st.next_call;
        st.next_call += 1;
        st.calls.insert(
            call,
            CallSlot {
                results: (0..tensors.len()).map(|_| None).collect(),
                left: tensors.len(),
                error: None,
            },
        );
        for (index, local) in tensors.into_iter().enumerate() {
            st.queue.push_back(Tensor {
                call,
                index,
                operation,
                local,
            });
        }
        self.changed.notify_all();
        loop {
            if st.calls.get(&call).map_or(0, |c| c.left) == 0 {
                let slot = st.calls.remove(&call);
                drop(st);
                let slot = slot.ok_or_else(|| backend(&self.name, "a call lost its record"))?;
                if let Some(e) = slot.error {
                    return Err(e);
                }
                return slot
                    .results
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        backend(&self.name, "a tensor of the call ended without a result")
                    });
            }
            if !st.leading {
                st.leading = true;
                drop(st);
                {
                    let _leading = Leading(self);
                    self.lead(links);
                }
                st = self.state();
                continue;
            }
            st = match self.changed.wait_timeout(st, NAP) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// One step of the leader: starts a cycle when one is due, or waits for rank 0's answer
    /// (looking at the queue meanwhile) and runs it. Returns after a cycle started or an
    /// answer was handled, or when there is nothing to do.
    fn lead(&self, links: &Links) {
        let mut st = self.state();
        loop {
            let now = Instant::now();
            let boundary = st.last_cycle.map_or(now, |t| t + self.cycle_time);
            let admissible = st.admissible();
            if admissible && now >= boundary {
                return self.start_cycle(links, st, now);
            }
            if st.held.is_none() && !st.in_flight.is_empty() {
                // Tensors in flight: keep a submission held at rank 0 for their groups, so
                // that this rank runs them as soon as they are planned.
                drop(st);
                let cycle = self.cycles();
                let sent = links.coordinator.send(
                    Outgoing::new(CMD_SUBMIT, &encode_requests(&[]))
                        .key(self.rank as u64)
                        .aux(cycle),
                    &format!("wait for the plan after cycle {cycle}"),
                );
                match sent {
                    Ok(p) => {
                        st = self.state();
                        st.held = Some(p);
                        continue;
                    }
                    Err(e) => return self.fail_in_flight(&e.to_string()),
                }
            }
            if !admissible && st.in_flight.is_empty() {
                // Nothing to submit or wait for (a held submission left after a failure is
                // superseded by the next cycle).
                return;
            }
            if let Some(mut held) = st.held.take() {
                drop(st);
                // Look at the queue again at the next cycle's start, or soon.
                let slice = if admissible {
                    boundary.saturating_duration_since(now)
                } else {
                    self.cycle_time.clamp(WATCH_MIN, WATCH)
                };
                if let Some(outcome) = held.poll(slice) {
                    return self.settle(links, outcome, false);
                }
                st = self.state();
                st.held = Some(held);
                continue;
            }
            // Nothing in flight; the next cycle starts at the boundary.
            let left = boundary.saturating_duration_since(now);
            st = match self.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Starts a cycle: submits the admissible queued tensors together, then handles the
    /// answer to the submission that this one supersedes, if any.
    fn start_cycle(&self, links: &Links, mut st: MutexGuard<'_, Cycles>, now: Instant) {
        let fresh = st.in_flight.is_empty();
        let mut requests = Vec::new();
        let mut later = VecDeque::new();
        while let Some(t) = st.queue.pop_front() {
            let name = &t.local.request.name;
            if st.in_flight.contains_key(name) {
                later.push_back(t);
            } else {
                requests.push(t.local.request.clone());
                st.in_flight.insert(name.clone(), t);
            }
        }
        st.queue = later;
        st.last_cycle = Some(now);
        let cycle = self.cycle_count.fetch_add(1, Ordering::Relaxed) + 1;
        let superseded = st.held.take();
        drop(st);
        let sent = links.coordinator.send(
            Outgoing::new(CMD_SUBMIT, &encode_requests(&requests))
                .key(self.rank as u64)
                .aux(cycle | if fresh { FRESH } else { 0 }),
            &format!(
                "submission of cycle {cycle} ({})",
                some_names(requests.iter().map(|r| r.name.as_str()))
            ),
        );
        match sent {
            Ok(p) => self.state().held = Some(p),
            Err(e) => self.fail_in_flight(&e.to_string()),
        }
        if let Some(old) = superseded {
            // Rank 0 answers it at once, with what it had for this rank.
            self.settle(links, old.wait(), true);
        }
    }

    /// Handles rank 0's answer to a submission: runs its groups in order, then fails its
    /// failed tensors. An answer that says nothing although this rank has tensors in flight
    /// (and was not superseded) means rank 0 has lost them: they fail.
    fn settle(&self, links: &Links, outcome: Outcome, superseded: bool) {
        let response = match outcome {
            Ok(r) => r,
            Err(TransportError::Remote { message, .. }) => {
                return self.fail_in_flight(&format!("rank 0 refused the submission: {message}"))
            }
            Err(e) => return self.fail_in_flight(&e.to_string()),
        };
        let plan = match decode_plan(&response.payload) {
            Ok(p) => p,
            Err(e) => return self.fail_in_flight(&format!("bad plan from rank 0: {e}")),
        };
        if plan.is_empty() && !superseded {
            let st = self.state();
            if !st.in_flight.is_empty() {
                let message = format!(
                    "rank 0 holds no record of {}, which this rank submitted",
                    some_names(st.in_flight.keys().map(String::as_str))
                );
                drop(st);
                return self.fail_in_flight(&message);
            }
            return;
        }
        for group in &plan.groups {
            self.run_group(links, group);
        }
        if !plan.failures.is_empty() {
            let mut st = self.state();
            for f in plan.failures {
                if let Some(t) = st.in_flight.remove(&f.name) {
                    self.resolve(&mut st, t, Some(f.message));
                }
            }
            drop(st);
            self.changed.notify_all();
        }
    }

    /// Fails every tensor in flight with `message` (rank 0 cannot be relied on for them).
    fn fail_in_flight(&self, message: &str) {
        let mut st = self.state();
        let tensors: Vec<Tensor> = st.in_flight.drain().map(|(_, t)| t).collect();
        for t in tensors {
            self.resolve(&mut st, t, Some(message.to_string()));
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Hands a tensor's result (its data) to its call, or its failure (naming its key).
    fn resolve(&self, st: &mut Cycles, t: Tensor, failure: Option<String>) {
        let Some(slot) = st.calls.get_mut(&t.call) else {
            return;
        };
        match failure {
            None => slot.results[t.index] = Some(t.local.data),
            Some(message) => {
                slot.error.get_or_insert_with(|| {
                    backend(&self.name, message).at_key(&self.name, t.operation, t.local.key)
                });
            }
        }
        slot.left = slot.left.saturating_sub(1);
    }

    /// Runs one group: fuses its tensors (unless it has one), runs the ring, unfuses, and
    /// hands the results to their calls.
    fn run_group(&self, links: &Links, group: &Group) {
        let (mut tensors, missing) = {
            let mut st = self.state();
            let mut tensors = Vec::with_capacity(group.names.len());
            let mut missing = Vec::new();
            for name in &group.names {
                match st.in_flight.remove(name) {
                    Some(t) => tensors.push(t),
                    None => missing.push(name.as_str()),
                }
            }
            (tensors, missing)
        };
        let result = if missing.is_empty() {
            self.ring_count.fetch_add(1, Ordering::Relaxed);
            self.run_ring(links, group, &mut tensors)
        } else {
            // This rank cannot take part: the other ranks' ring fails on its time bound.
            let message = format!(
                "rank 0 planned {} of {}, which this rank does not have in flight",
                group.op.name(),
                some_names(missing.into_iter())
            );
            log::warn!("kvstore-horovod: rank {}: {message}", self.rank);
            // What the previous rank sends of it is dropped as it comes.
            links.mailbox.forget(group.seq);
            Err(message)
        };
        let mut st = self.state();
        for t in tensors {
            self.resolve(&mut st, t, result.as_ref().err().cloned());
        }
        drop(st);
        self.changed.notify_all();
    }

    /// The ring part of [`run_group`](Self::run_group): the results replace the tensors'
    /// data.
    fn run_ring(
        &self,
        links: &Links,
        group: &Group,
        tensors: &mut [Tensor],
    ) -> std::result::Result<(), String> {
        let ring = Ring {
            rank: self.rank,
            size: self.size,
            next: &links.next,
            mailbox: &links.mailbox,
            timeout: self.timeout + grace(self.timeout),
        };
        let what = format!(
            "{} of {}",
            group.op.name(),
            some_names(group.names.iter().map(String::as_str))
        );
        let not_contiguous = || "a tensor's copy is not contiguous".to_string();
        // Fusion: big tensors take part in place (the ring reads and writes their own
        // memory); each run of consecutive small ones is packed into one staging buffer, so
        // that it travels in a few messages rather than one or more per tensor. Every rank
        // lays out the same group the same way: the layout depends on the sizes alone.
        // `staged[i]`: `None` for a tensor in place, else its staging buffer and offset there.
        let mut staged: Vec<Option<(usize, usize)>> = Vec::with_capacity(tensors.len());
        let mut staging: Vec<Vec<u8>> = Vec::new();
        for t in tensors.iter() {
            let bytes = t.local.data.as_bytes().ok_or_else(not_contiguous)?;
            if bytes.len() >= IN_PLACE_BYTES {
                staged.push(None);
                continue;
            }
            if !matches!(staged.last(), Some(Some(_))) {
                staging.push(Vec::new());
            }
            let run = staging.len() - 1;
            staged.push(Some((run, staging[run].len())));
            staging[run].extend_from_slice(bytes);
        }
        {
            let mut runs = staging.iter_mut();
            let mut parts: Vec<&mut [u8]> = Vec::with_capacity(tensors.len());
            let mut last_run = None;
            for (t, place) in tensors.iter_mut().zip(&staged) {
                match *place {
                    None => parts.push(t.local.data.as_bytes_mut().ok_or_else(not_contiguous)?),
                    // A run's buffer takes the place of its first tensor.
                    Some((run, _)) if last_run != Some(run) => {
                        last_run = Some(run);
                        parts.push(runs.next().expect("one staging buffer per run"));
                    }
                    Some(_) => {}
                }
            }
            let mut buf = Segments::new(parts);
            match group.op {
                Op::Allreduce => ring.allreduce(group.seq, group.dtype, &mut buf, &what)?,
                Op::Broadcast => ring.broadcast(group.seq, &mut buf, &what)?,
            }
        }
        for (t, place) in tensors.iter_mut().zip(&staged) {
            if let Some((run, at)) = *place {
                let dst = t.local.data.as_bytes_mut().ok_or_else(not_contiguous)?;
                dst.copy_from_slice(&staging[run][at..at + dst.len()]);
            }
        }
        Ok(())
    }

    /// Writes each key's result into its outputs (row-sparse outputs are skipped, as MXNet
    /// does for a pull).
    fn write_outs(
        &self,
        operation: &'static str,
        keys: &[Key],
        results: &[NDArray],
        outs: &mut KeyedOuts<'_>,
    ) -> Result<()> {
        let by_key: std::collections::HashMap<&Key, &NDArray> = keys.iter().zip(results).collect();
        for (key, out) in outs.iter_mut() {
            if out.storage_type() == StorageType::RowSparse {
                continue;
            }
            let result = by_key
                .get(key)
                .copied()
                .ok_or_else(|| backend(&self.name, format!("no result for key {key}")))?;
            out.assign(result).map_err(self.at(operation, key))?;
        }
        Ok(())
    }

    /// The all-reduce of a checked pushpull on host arrays: each key's values summed (MXNet's
    /// order), one tensor per key through the ring (as float16 under fp16 compression), the
    /// results into the outputs (cast back to their dtype).
    fn allreduce(&self, values: &KeyedValues<'_>, outs: &mut KeyedOuts<'_>) -> Result<()> {
        let operation = "pushpull";
        let wire = *lock(&self.wire);
        let mut groups = values.groups();
        groups.sort_by(|a, b| a.key.cmp(&b.key));
        let mut tensors = Vec::with_capacity(groups.len());
        for g in &groups {
            let sum = match g.positions.as_slice() {
                [one] => own(values.values()[*one]),
                many => {
                    let arrays: Vec<&NDArray> = many.iter().map(|&p| values.values()[p]).collect();
                    reduce::sum_values(&arrays, &self.reduce, false)
                }
            };
            let sum = wire.compress(sum);
            tensors.push(Local {
                key: g.key.clone(),
                request: TensorRequest {
                    name: tensor_name(&g.key),
                    op: Op::Allreduce,
                    dtype: sum.dtype(),
                    shape: sum.shape().to_vec(),
                },
                data: sum,
            });
        }
        let keys: Vec<Key> = tensors.iter().map(|t| t.key.clone()).collect();
        let results = self.collective(operation, tensors)?;
        self.write_outs(operation, &keys, &results, outs)
    }

    /// A checked broadcast on host arrays: rank 0's value of each key into the outputs.
    fn broadcast_checked(&self, values: &KeyedValues<'_>, outs: &mut KeyedOuts<'_>) -> Result<()> {
        let operation = "broadcast";
        let mut tensors: Vec<Local> = values
            .iter()
            .map(|(key, value)| {
                let data = own(value);
                Local {
                    key: key.clone(),
                    request: TensorRequest {
                        name: tensor_name(key),
                        op: Op::Broadcast,
                        dtype: data.dtype(),
                        shape: data.shape().to_vec(),
                    },
                    data,
                }
            })
            .collect();
        tensors.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<Key> = tensors.iter().map(|t| t.key.clone()).collect();
        let results = self.collective(operation, tensors)?;
        self.write_outs(operation, &keys, &results, outs)
    }

    /// Checks that the values of each key have one shape and dtype.
    fn check_alike(&self, operation: &'static str, values: &KeyedValues<'_>) -> Result<()> {
        let mut groups = values.groups();
        groups.sort_by(|a, b| a.key.cmp(&b.key));
        for g in groups {
            let first = values.values()[g.positions[0]];
            for (i, &p) in g.positions.iter().enumerate().skip(1) {
                first
                    .check_like(values.values()[p], &format!("pushed value {i}"))
                    .map_err(self.at(operation, &g.key))?;
            }
        }
        Ok(())
    }

    /// Checks that each output has its key's value's shape.
    fn check_outs(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        outs: &KeyedOuts<'_>,
    ) -> Result<()> {
        outs.check_shapes_against(&self.name, operation, values)
    }
}

impl Drop for HorovodStore {
    fn drop(&mut self) {
        for s in self.servers.drain(..) {
            let _ = s
                .send(Outgoing::new(CMD_BYE, &[]), "goodbye")
                .and_then(|p| p.wait_timeout(Duration::from_secs(5)));
        }
        self.links = None;
        self.server = None;
        self.monitor = None;
        if let Some(node) = lock(&self.node).take() {
            if let Err(e) = node.leave() {
                log::debug!("kvstore-horovod: rank {} left uncleanly: {e}", self.rank);
            }
        }
    }
}

impl KVStoreBase for HorovodStore {
    fn type_name(&self) -> &str {
        &self.name
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn num_workers(&self) -> usize {
        self.size
    }

    fn is_capable(&self, capability: Capability) -> bool {
        CAPABILITIES.contains(&capability)
    }

    /// Arrays in GPU memory: a key's values summed on a GPU, one array per key through the
    /// ring, the result copied to one GPU output and from there to the others.
    fn handles_device_arrays(&self) -> bool {
        true
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        let _ = priority;
        let operation = "pushpull";
        outs.check_against(operation, values)?;
        self.check_alike(operation, values)?;
        self.check_outs(operation, values, outs)?;
        // Arrays in device memory (if any) staged; host arrays go straight through.
        with_values_summed_on_host(
            &self.name,
            operation,
            values,
            |_| Ok(()),
            |values| with_outs_fanned_out(operation, outs, |outs| self.allreduce(values, outs)),
        )
    }

    fn pushpull_in_place_batch(&self, values: &mut KeyedOuts<'_>, priority: i32) -> Result<()> {
        let _ = priority;
        let operation = "pushpull";
        with_in_place_sums_on_host(
            &self.name,
            operation,
            values,
            |view| self.check_alike(operation, view),
            |sums, outs| {
                self.check_outs(operation, sums, outs)?;
                self.allreduce(sums, outs)
            },
        )
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        let _ = priority;
        let operation = "broadcast";
        outs.check_against(operation, values)?;
        values.check_one_value_per_key(&self.name, operation)?;
        self.check_outs(operation, values, outs)?;
        with_values_on_host(values, |values| {
            with_outs_fanned_out(operation, outs, |outs| self.broadcast_checked(values, outs))
        })
    }

    /// Horovod's `Compression.fp16` (`{"type": "fp16"}`; `{"type": "none"}` turns it off):
    /// every later `pushpull` sends its floating-point gradients through the ring as float16,
    /// summed in float16, and casts the result into the outputs' dtype. Every worker must set
    /// the same: a key sent as float16 by some workers and not by others fails, naming its
    /// dtypes. `broadcast` is never compressed.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for MXNet's `2bit` and `1bit`; [`Error::InvalidArgument`] for
    /// anything else (see [`WireCast::from_params`]).
    fn set_gradient_compression(&self, params: &CompressionParams) -> Result<()> {
        *lock(&self.wire) = WireCast::from_params(&self.name, params)?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        match lock(&self.node).as_ref() {
            Some(node) => node
                .barrier(NodeGroup::Workers)
                .map_err(|e| backend(&self.name, e)),
            None => Err(Error::InvalidArgument(format!(
                "{}: this worker has left the job",
                self.name
            ))),
        }
    }
}
