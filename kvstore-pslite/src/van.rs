//! The [`Van`]: a worker node of a ps-lite job (registration with the scheduler, links to the
//! servers, barriers, requests and their responses).
//!
//! As in ps-lite, the node listens on one ROUTER socket, on which every peer's messages arrive
//! (each peer connects to it with a DEALER announcing `ps<id>`), and sends on one DEALER per
//! peer. Joining: the node connects to the scheduler without an identity and sends `ADD_NODE`
//! naming its role and address; once every node of the job has registered, the scheduler
//! sends each the node table, where the node finds its id by its address; it then connects to
//! the scheduler again and to every server, as `ps<id>`.
//!
//! Every wait here is bounded: registration, barriers and responses give up after the
//! configured timeout with an error naming the nodes that did not answer, and a peer whose
//! connection closes fails the waits that needed it at once.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvstore_dist::node::join_host_port;

use crate::meta::{data_type, Command, Control, Meta, NodeRecord, Role, UNSET};
use crate::zmtp::{self, Dealer};

/// ps-lite's node id of the scheduler.
pub const SCHEDULER_ID: i32 = 1;
/// The barrier group of the servers.
pub const SERVER_GROUP: i32 = 2;
/// The barrier group of the workers.
pub const WORKER_GROUP: i32 = 4;
/// The barrier group of every node (scheduler, servers and workers).
pub const EVERYONE: i32 = 7;

/// Most incoming connections a node keeps open at once (each has a receiving thread); more
/// are closed as they come. A job's nodes open one each to a node they talk to.
pub const MAX_CONNECTIONS: usize = 4096;

/// Longest a connection may take to say its ZMTP greeting and identity (at most the job's
/// timeout): a silent connection holds a receiving thread until then.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of requests a serving node holds unread by its serving loop: past them, the
/// connections that bring more wait (TCP then slows their senders down) until the loop caught
/// up. A request arriving at an empty queue is taken whatever its size. (What the loop keeps
/// once it read a request, a sync round's pushes, is bounded by the server: one round per key
/// and at most 64 queued pushes per worker and key.)
pub const MAX_QUEUED_REQUEST_BYTES: u64 = 1 << 30;

/// Largest header (`Meta`) frame a message may have: MXNet's biggest, a `kController`
/// carrying a pickled optimizer, stays under 16 MiB (which a server refuses beyond).
pub const MAX_META_BYTES: usize = (16 << 20) + (64 << 10);

/// Where and how a worker joins a ps-lite job.
#[derive(Debug, Clone)]
pub struct VanConfig {
    /// The scheduler's address (`DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT`).
    pub scheduler: String,
    /// The address this node advertises to the others (`DMLC_NODE_HOST`).
    pub host: String,
    /// The address it listens on (`KVSTORE_BIND_HOST`, else `host`).
    pub bind: String,
    /// The port it listens on (`PORT`; 0: any free port).
    pub port: u16,
    /// How long any wait may take (`KVSTORE_TIMEOUT_SECS`).
    pub timeout: Duration,
    /// The largest frame accepted from a peer (`KVSTORE_MAX_MESSAGE_BYTES`).
    pub max_message_bytes: u64,
}

/// A failure of the van: always says what was waited for or what broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VanError(pub String);

impl fmt::Display for VanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VanError {}

/// A message received: who sent it, its meta and its data frames.
#[derive(Debug, Clone)]
pub struct Message {
    /// The sender's node id ([`UNSET`] for a node without an id yet).
    pub sender: i32,
    /// The header.
    pub meta: Meta,
    /// The data frames (for key-value messages: keys, values, lengths).
    pub data: Vec<Vec<u8>>,
}

/// What the receiving threads share with the callers.
#[derive(Default)]
struct State {
    /// The scheduler's node table, once it arrived.
    node_table: Option<Vec<NodeRecord>>,
    /// How many barrier releases arrived.
    barriers_released: u64,
    /// Responses by the timestamp of their request; only awaited timestamps have an entry.
    responses: HashMap<i32, Vec<Message>>,
    /// Peers with no connection left: id and what happened to the last one (ZeroMQ
    /// reconnects a broken link, so a peer that connects again is no longer lost).
    lost: Vec<(i32, String)>,
    /// Open incoming connections per peer.
    live: HashMap<i32, usize>,
    /// Set when a barrier timed out: its release may still come and would end the next one
    /// early, so no barrier is entered again.
    barrier_broken: Option<String>,
    /// Requests for a serving node (a server's key-value requests and commands, a
    /// scheduler's registrations and barriers), in arrival order.
    requests: VecDeque<Message>,
    /// The bytes of `requests`.
    queued_bytes: u64,
    /// Incoming connections, shut down when the van closes.
    streams: HashMap<u64, TcpStream>,
    /// The key of the next incoming connection in `streams`.
    next_stream: u64,
}

/// What a node holds for its peers at most.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// [`MAX_CONNECTIONS`].
    connections: usize,
    /// [`MAX_QUEUED_REQUEST_BYTES`].
    queued_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections: MAX_CONNECTIONS,
            queued_bytes: MAX_QUEUED_REQUEST_BYTES,
        }
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stopping: AtomicBool,
    /// Receiving threads running (open incoming connections).
    connections: AtomicUsize,
    limits: Limits,
    max_message_bytes: u64,
    timeout: Duration,
    /// This node's role: what it does with the messages it receives.
    role: Role,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `done` holds, a peer in `needs` is lost, or `deadline`; the error of a lost
    /// peer or of the deadline is built by `timed_out`.
    fn wait_until<T>(
        &self,
        deadline: Instant,
        needs: &[i32],
        mut done: impl FnMut(&mut State) -> Option<T>,
        timed_out: impl FnOnce(&State) -> VanError,
    ) -> Result<T, VanError> {
        let mut state = self.lock();
        loop {
            if let Some(value) = done(&mut state) {
                return Ok(value);
            }
            if let Some((id, what)) = state.lost.iter().find(|(id, _)| needs.contains(id)) {
                return Err(VanError(format!("{} {what}", node_name(*id))));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(timed_out(&state));
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How a node is named in messages: `scheduler`, `server 8`, `worker 9`.
pub fn node_name(id: i32) -> String {
    match id {
        SCHEDULER_ID => "the scheduler".to_string(),
        UNSET => "a node without an id".to_string(),
        id if id >= 8 && id % 2 == 0 => format!("server {id} (rank {})", (id - 8) / 2),
        id if id >= 8 => format!("worker {id} (rank {})", (id - 9) / 2),
        id => format!("node {id}"),
    }
}

/// The names of nodes `ids` ([`node_name`]), comma-separated, for messages.
pub fn node_names(ids: impl IntoIterator<Item = i32>) -> String {
    ids.into_iter()
        .map(node_name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A node of a ps-lite job: a worker or a server ([`Van::join_as`]), or the scheduler
/// ([`Van::listen`]).
pub struct Van {
    config: VanConfig,
    me: NodeRecord,
    nodes: Vec<NodeRecord>,
    shared: Arc<Shared>,
    senders: HashMap<i32, Mutex<Dealer>>,
    listen_addr: SocketAddr,
    accepting: Option<JoinHandle<()>>,
    barrier: Mutex<()>,
    next_van_timestamp: AtomicI32,
    next_request: AtomicI32,
    bytes_sent: AtomicU64,
}

impl fmt::Debug for Van {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Van")
            .field("me", &self.me)
            .field("scheduler", &self.config.scheduler)
            .finish_non_exhaustive()
    }
}

impl Van {
    /// Joins the job at `config.scheduler` as a worker: registers, waits for the node table
    /// (the scheduler sends it once every node has registered) and connects to the scheduler
    /// and every server.
    ///
    /// # Errors
    /// The node cannot listen, the scheduler cannot be reached or sends no node table within
    /// the timeout (the error says so), or a server cannot be reached.
    pub fn join(config: VanConfig) -> Result<Van, VanError> {
        Van::join_as(config, Role::Worker)
    }

    /// Starts listening as a node of `role` (the scheduler's id is fixed: 1), without joining.
    fn bind(config: VanConfig, role: Role) -> Result<Van, VanError> {
        Van::bind_with(config, role, Limits::default())
    }

    fn bind_with(config: VanConfig, role: Role, limits: Limits) -> Result<Van, VanError> {
        let bind = join_host_port(&config.bind, config.port);
        let listener = TcpListener::bind(bind.as_str())
            .map_err(|e| VanError(format!("cannot listen on {bind}: {e}")))?;
        let listen_addr = listener
            .local_addr()
            .map_err(|e| VanError(format!("cannot listen on {bind}: {e}")))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            limits,
            max_message_bytes: config.max_message_bytes,
            timeout: config.timeout,
            role,
        });
        let accepting = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("pslite-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .map_err(|e| VanError(format!("cannot start the receiving thread: {e}")))?
        };
        let mut me = NodeRecord::new(role, &config.host, listen_addr.port());
        if role == Role::Scheduler {
            me.id = SCHEDULER_ID;
        }
        Ok(Van {
            config,
            me,
            nodes: Vec::new(),
            shared,
            senders: HashMap::new(),
            listen_addr,
            accepting: Some(accepting),
            barrier: Mutex::new(()),
            next_van_timestamp: AtomicI32::new(0),
            next_request: AtomicI32::new(0),
            bytes_sent: AtomicU64::new(0),
        })
    }

    /// Starts the scheduler's node: listens on `config.bind`:`config.port` (the job's
    /// `DMLC_PS_ROOT_PORT`), as node 1, for [`crate::scheduler`].
    ///
    /// # Errors
    /// The address cannot be listened on.
    pub fn listen(config: VanConfig) -> Result<Van, VanError> {
        Van::bind(config, Role::Scheduler)
    }

    /// [`Van::join`] as a node of `role` (a worker or a server): a server links to the
    /// scheduler and every worker, and its requests are queued for [`Van::next_request`].
    ///
    /// # Errors
    /// As [`Van::join`].
    pub fn join_as(config: VanConfig, role: Role) -> Result<Van, VanError> {
        let deadline = Instant::now() + config.timeout;
        let mut van = Van::bind(config, role)?;
        let mut me = van.me.clone();

        // Register, without an identity yet.
        let mut first = van.connect_retrying(&van.config.scheduler.clone(), b"", deadline)?;
        let registration = Meta {
            control: Some(Control::new(Command::AddNode).with_node(me.clone())),
            timestamp: Some(van.van_timestamp()),
            ..Meta::default()
        };
        first
            .send(&registration.encode(), &[])
            .map_err(|e| scheduler_error(&van.config, format!("registration failed: {e}")))?;
        let table = van.shared.wait_until(
            deadline,
            &[],
            |state| state.node_table.clone(),
            |_| {
                scheduler_error(
                    &van.config,
                    format!(
                        "sent no node table within {:?}: not every node of the job registered \
                         (DMLC_NUM_WORKER and DMLC_NUM_SERVER must count every node, Python \
                         ones included)",
                        van.config.timeout
                    ),
                )
            },
        )?;
        check_node_table(&table)
            .map_err(|why| scheduler_error(&van.config, format!("sent a node table that {why}")))?;
        let mine = table
            .iter()
            .find(|n| n.role == role && n.hostname == me.hostname && n.port == me.port)
            .ok_or_else(|| {
                scheduler_error(
                    &van.config,
                    format!("sent a node table without this node ({me})"),
                )
            })?;
        me.id = mine.id;
        van.me = me;
        van.nodes = table;

        let scheduler = van.config.scheduler.clone();
        van.connect_to(SCHEDULER_ID, &scheduler, deadline)?;
        first.close();
        // As ps-lite: links to every node but those of its own role.
        let peers: Vec<NodeRecord> = van
            .nodes
            .iter()
            .filter(|n| n.role != role && n.role != Role::Scheduler)
            .cloned()
            .collect();
        for peer in peers {
            van.connect_to(peer.id, &peer.addr(), deadline)?;
        }
        log::info!(
            "pslite: joined the job at {} as {}",
            van.config.scheduler,
            van.me
        );
        Ok(van)
    }

    fn connect_retrying(
        &self,
        addr: &str,
        identity: &[u8],
        deadline: Instant,
    ) -> Result<Dealer, VanError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match Dealer::connect(
                addr,
                identity,
                // At least 1 ms (a timeout under 1 ms is allowed), at most the timeout.
                left.min(self.config.timeout).max(Duration::from_millis(1)),
            ) {
                Ok(dealer) => return Ok(dealer),
                Err(e)
                    if Instant::now() + Duration::from_millis(100) < deadline
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionRefused
                                | std::io::ErrorKind::ConnectionReset
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(VanError(format!(
                        "cannot connect to {addr} (ps-lite, ZMTP): {e}"
                    )))
                }
            }
        }
    }

    fn van_timestamp(&self) -> i32 {
        self.next_van_timestamp.fetch_add(1, Ordering::Relaxed)
    }

    /// How long a wait may take (`KVSTORE_TIMEOUT_SECS`).
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// This node (its id assigned).
    pub fn me(&self) -> &NodeRecord {
        &self.me
    }

    /// The address this node listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// The job's nodes, as the scheduler listed them.
    pub fn nodes(&self) -> &[NodeRecord] {
        &self.nodes
    }

    /// The servers, by rank.
    pub fn servers(&self) -> impl Iterator<Item = &NodeRecord> {
        let mut servers: Vec<&NodeRecord> = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Server)
            .collect();
        servers.sort_by_key(|n| n.id);
        servers.into_iter()
    }

    /// This node's rank among its role (ps-lite's `(id - 8) / 2`, rounded down; the node table
    /// was checked to number the nodes so).
    pub fn rank(&self) -> usize {
        (self.me.id.saturating_sub(8) / 2).max(0) as usize
    }

    /// Links this node to node `id` at `addr` (the scheduler links to every node once they
    /// registered), announcing its own id.
    ///
    /// # Errors
    /// `addr` cannot be reached before `deadline`.
    pub fn connect_to(&mut self, id: i32, addr: &str, deadline: Instant) -> Result<(), VanError> {
        let identity = format!("ps{}", self.me.id).into_bytes();
        let link = self.connect_retrying(addr, &identity, deadline)?;
        self.senders.insert(id, Mutex::new(link));
        Ok(())
    }

    /// The next request for this serving node (see [`Van::join_as`], [`Van::listen`]), waiting
    /// at most `wait`; `None` when none came.
    pub fn next_request(&self, wait: Duration) -> Option<Message> {
        let deadline = Instant::now() + wait;
        let mut state = self.shared.lock();
        loop {
            if let Some(request) = state.requests.pop_front() {
                state.queued_bytes = state.queued_bytes.saturating_sub(message_bytes(&request));
                // A receiving thread may wait for room.
                self.shared.changed.notify_all();
                return Some(request);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether every node of `ids` has lost its every connection to this one.
    pub fn all_lost(&self, ids: &[i32]) -> bool {
        let state = self.shared.lock();
        ids.iter().all(|id| state.lost.iter().any(|(l, _)| l == id))
    }

    /// The id of the server of rank `rank`.
    pub fn server_id(rank: usize) -> i32 {
        8 + 2 * rank as i32
    }

    /// A new request timestamp (the customer's, shared by every request of this node).
    pub fn new_timestamp(&self) -> i32 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Marks `timestamp` as awaited, before its requests are sent: responses to timestamps not
    /// awaited are dropped (logged).
    pub fn expect(&self, timestamp: i32) {
        self.shared.lock().responses.insert(timestamp, Vec::new());
    }

    /// Forgets an awaited timestamp (a call that failed before waiting for it).
    pub fn forget(&self, timestamp: i32) {
        self.shared.lock().responses.remove(&timestamp);
    }

    /// Sends `meta` and `data` to node `to`.
    ///
    /// # Errors
    /// No link to `to`, or a failed write.
    pub fn send(&self, to: i32, meta: &Meta, data: &[&[u8]]) -> Result<(), VanError> {
        let link = self
            .senders
            .get(&to)
            .ok_or_else(|| VanError(format!("no link to {}", node_name(to))))?;
        let mut link = link.lock().unwrap_or_else(|e| e.into_inner());
        let meta = meta.encode();
        link.send(&meta, data)
            .map_err(|e| VanError(format!("sending to {} failed: {e}", node_name(to))))?;
        let bytes = meta.len() + data.iter().map(|d| d.len()).sum::<usize>();
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The bytes of the messages this node sent so far: their headers and data frames
    /// (ZMTP's few bytes of framing per frame left out).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// The deadline of a wait starting now (`KVSTORE_TIMEOUT_SECS` from now): a call waiting
    /// for several requests waits for all of them until one deadline.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.config.timeout
    }

    /// Waits until `deadline` (see [`Van::deadline`]) for one response to `timestamp` from each
    /// of `from`; returns them in the order of `from`. `what` names the request in errors.
    ///
    /// # Errors
    /// A node of `from` lost, or silent past the deadline (named).
    pub fn wait(
        &self,
        timestamp: i32,
        from: &[i32],
        what: &str,
        deadline: Instant,
    ) -> Result<Vec<Message>, VanError> {
        let result = self.shared.wait_until(
            deadline,
            from,
            |state| {
                let got = state.responses.get(&timestamp)?;
                if from.iter().all(|id| got.iter().any(|m| m.sender == *id)) {
                    let mut got = state.responses.remove(&timestamp).unwrap_or_default();
                    let ordered = from
                        .iter()
                        .map(|id| {
                            let at = got.iter().position(|m| m.sender == *id).expect("present");
                            got.swap_remove(at)
                        })
                        .collect();
                    Some(ordered)
                } else {
                    None
                }
            },
            |state| {
                let got = state.responses.get(&timestamp);
                let missing: Vec<String> = from
                    .iter()
                    .filter(|id| !got.is_some_and(|g| g.iter().any(|m| m.sender == **id)))
                    .map(|id| node_name(*id))
                    .collect();
                VanError(format!(
                    "no answer to {what} from {} within {:?} (KVSTORE_TIMEOUT_SECS)",
                    missing.join(", "),
                    self.config.timeout
                ))
            },
        );
        if result.is_err() {
            self.forget(timestamp);
        }
        result
    }

    /// Waits until every node of `group` (a sum of [`SERVER_GROUP`], [`WORKER_GROUP`] and 1
    /// for the scheduler) entered the barrier.
    ///
    /// # Errors
    /// The scheduler lost, or no release within the timeout.
    pub fn barrier(&self, group: i32) -> Result<(), VanError> {
        let _one_at_a_time = self.barrier.lock().unwrap_or_else(|e| e.into_inner());
        let before = {
            let state = self.shared.lock();
            if let Some(broken) = &state.barrier_broken {
                return Err(VanError(format!(
                    "no barrier can be entered after one failed ({broken})"
                )));
            }
            state.barriers_released
        };
        let mut control = Control::new(Command::Barrier);
        control.barrier_group = Some(group);
        let meta = Meta {
            control: Some(control),
            request: true,
            app_id: Some(0),
            customer_id: 0,
            timestamp: Some(self.van_timestamp()),
            ..Meta::default()
        };
        self.send(SCHEDULER_ID, &meta, &[])?;
        let deadline = Instant::now() + self.config.timeout;
        let released = self.shared.wait_until(
            deadline,
            &[SCHEDULER_ID],
            |state| (state.barriers_released > before).then_some(()),
            |_| {
                VanError(format!(
                    "the barrier of group {group} ({}) was not released within {:?} \
                     (KVSTORE_TIMEOUT_SECS): another node has not reached it",
                    group_name(group),
                    self.config.timeout
                ))
            },
        );
        if let Err(e) = &released {
            self.shared.lock().barrier_broken = Some(e.0.clone());
        }
        released
    }

    /// Closes every link and stops the receiving threads.
    pub fn close(&mut self) {
        let Some(thread) = self.accepting.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        for link in self.senders.values() {
            link.lock().unwrap_or_else(|e| e.into_inner()).close();
        }
        for (_, stream) in self.shared.lock().streams.drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // Wake the accepting thread; if that fails it is left to end with the process.
        if TcpStream::connect_timeout(&wake_addr(self.listen_addr), Duration::from_secs(1)).is_ok()
        {
            let _ = thread.join();
        }
    }
}

impl Drop for Van {
    fn drop(&mut self) {
        self.close();
    }
}

/// The address to connect to in order to wake a listener bound to `addr` (an unspecified
/// address is reached on loopback).
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let mut wake = addr;
    if wake.ip().is_unspecified() {
        wake.set_ip(match wake {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    wake
}

fn group_name(group: i32) -> String {
    let mut names = Vec::new();
    if group & 1 != 0 {
        names.push("scheduler");
    }
    if group & SERVER_GROUP != 0 {
        names.push("servers");
    }
    if group & WORKER_GROUP != 0 {
        names.push("workers");
    }
    names.join(" + ")
}

fn scheduler_error(config: &VanConfig, what: String) -> VanError {
    VanError(format!(
        "the ps-lite scheduler at {} {what}",
        config.scheduler
    ))
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                // Out of descriptors, say: do not spin.
                log::debug!("pslite: accepting a connection failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let cap = shared.limits.connections;
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= cap {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            log::warn!("pslite: refused a connection from {peer}: {cap} are open already");
            continue;
        }
        let spawned = std::thread::Builder::new()
            .name("pslite-recv".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    receive(stream, &shared);
                    shared.connections.fetch_sub(1, Ordering::SeqCst);
                }
            });
        if let Err(e) = spawned {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            log::warn!("pslite: cannot start a receiving thread: {e}");
        }
    }
}

/// The node id a DEALER's identity names (`ps<id>`), [`UNSET`] for any other.
fn identity_id(identity: &[u8]) -> i32 {
    std::str::from_utf8(identity)
        .ok()
        .and_then(|s| s.strip_prefix("ps"))
        .and_then(|id| id.parse().ok())
        .unwrap_or(UNSET)
}

/// Reads one incoming connection's messages until it closes.
fn receive(mut stream: TcpStream, shared: &Shared) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let handshake = shared.timeout.min(HANDSHAKE_TIMEOUT);
    let identity = match zmtp::accept_dealer(&mut stream, handshake) {
        Ok(identity) => identity,
        Err(e) => {
            if !shared.stopping.load(Ordering::SeqCst) {
                log::warn!("pslite: refused a connection from {peer}: {e}");
            }
            return;
        }
    };
    let sender = identity_id(&identity);
    let key = {
        let mut state = shared.lock();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let key = state.next_stream;
        state.next_stream += 1;
        if let Ok(clone) = stream.try_clone() {
            state.streams.insert(key, clone);
        }
        *state.live.entry(sender).or_default() += 1;
        state.lost.retain(|(id, _)| *id != sender);
        key
    };
    log::debug!("pslite: {} connected from {peer}", node_name(sender));
    let ended = loop {
        match zmtp::read_message(&mut stream, shared.max_message_bytes) {
            Ok(Some(mut frames)) => {
                if frames[0].len() > MAX_META_BYTES {
                    break format!(
                        "sent a bad message (a header of {} bytes, over {MAX_META_BYTES})",
                        frames[0].len()
                    );
                }
                let meta = match Meta::decode(&frames[0]) {
                    Ok(meta) => meta,
                    Err(e) => break format!("sent a bad message ({e})"),
                };
                frames.remove(0);
                deliver(
                    shared,
                    Message {
                        sender,
                        meta,
                        data: frames,
                    },
                );
            }
            Ok(None) => break "closed its connection".to_string(),
            Err(e) => break format!("broke its connection ({e})"),
        }
    };
    // Closed for good (a peer that sent a bad message is not read again), its descriptor freed.
    let _ = stream.shutdown(Shutdown::Both);
    shared.lock().streams.remove(&key);
    if !shared.stopping.load(Ordering::SeqCst) {
        log::debug!("pslite: {} {ended}", node_name(sender));
        let mut state = shared.lock();
        let live = state.live.entry(sender).or_default();
        *live = live.saturating_sub(1);
        if *live == 0 {
            // Gone from `live` (the entry would stay for every identity that ever connected);
            // one `lost` entry per peer (a connection removes it).
            state.live.remove(&sender);
            state.lost.push((sender, ended));
        }
        shared.changed.notify_all();
    }
}

/// The bytes a queued request holds.
fn message_bytes(message: &Message) -> u64 {
    let data: usize = message.data.iter().map(Vec::len).sum();
    (data + message.meta.body.len()) as u64
}

/// Queues a request for the serving loop, once the queue has room for it (a request to an
/// empty queue always has; the van stopping ends the wait).
fn queue_request(shared: &Shared, mut state: MutexGuard<'_, State>, message: Message) {
    let bytes = message_bytes(&message);
    while !state.requests.is_empty()
        && state.queued_bytes.saturating_add(bytes) > shared.limits.queued_bytes
        && !shared.stopping.load(Ordering::SeqCst)
    {
        state = shared
            .changed
            .wait_timeout(state, Duration::from_millis(100))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    state.queued_bytes = state.queued_bytes.saturating_add(bytes);
    state.requests.push_back(message);
}

/// Hands a received message to whoever waits for it.
fn deliver(shared: &Shared, message: Message) {
    let mut state = shared.lock();
    let role = shared.role;
    match (&message.meta.control, message.meta.request) {
        (Some(control), request) => match control.cmd {
            // A registration (to the scheduler), or the node table (from it).
            Command::AddNode if role == Role::Scheduler => queue_request(shared, state, message),
            // The table and barrier releases count only from the scheduler.
            Command::AddNode if message.sender == SCHEDULER_ID => {
                state.node_table = Some(control.nodes.clone())
            }
            Command::Barrier if request && role == Role::Scheduler => {
                queue_request(shared, state, message)
            }
            Command::Barrier if !request && message.sender == SCHEDULER_ID => {
                state.barriers_released += 1
            }
            // ps-lite's resender (PS_RESEND) acknowledges every message: the serving loop
            // refuses it (see `refuse_resender`).
            Command::Ack if role != Role::Worker => queue_request(shared, state, message),
            other => log::debug!(
                "pslite: ignored a {other:?} control message from {}",
                node_name(message.sender)
            ),
        },
        (None, false) => {
            let timestamp = message.meta.timestamp.unwrap_or(UNSET);
            match state.responses.get_mut(&timestamp) {
                Some(got) => got.push(message),
                None => log::warn!(
                    "pslite: dropped a response from {} to request {timestamp}, which no call \
                     awaits",
                    node_name(message.sender)
                ),
            }
        }
        (None, true) if role == Role::Server => queue_request(shared, state, message),
        (None, true) => log::warn!(
            "pslite: dropped a request from {} (a {role} serves no requests)",
            node_name(message.sender)
        ),
    }
    shared.changed.notify_all();
}

/// Refuses a node that runs ps-lite's resender (`PS_RESEND=1`), which acknowledges every
/// message (`ACK`) and sends again what is not acknowledged in time: a resent push would be
/// merged twice, and this van acknowledges nothing (so everything would be resent). Its first
/// `ACK` fails the serving node at once, naming it, rather than a wrong sum later.
///
/// # Errors
/// When `message` is an `ACK`.
pub fn refuse_resender(message: &Message) -> Result<(), VanError> {
    match &message.meta.control {
        Some(control) if control.cmd == Command::Ack => Err(VanError(format!(
            "{} acknowledges messages: it runs ps-lite's resender (PS_RESEND=1), which this \
             job's nodes do not serve (a resent push would be merged twice); unset PS_RESEND \
             on every node",
            node_name(message.sender)
        ))),
        _ => Ok(()),
    }
}

/// The meta of a key-value request: `head` the command word, data frames keys, values and
/// (for pushes) lengths.
pub fn kv_request(head: i32, timestamp: i32, push: bool, pull: bool, priority: i32) -> Meta {
    let mut data_types = vec![data_type::UINT64, data_type::OTHER];
    if push {
        data_types.push(data_type::INT32);
    }
    Meta {
        head,
        request: true,
        push,
        pull,
        app_id: Some(0),
        timestamp: Some(timestamp),
        data_type: data_types,
        customer_id: 0,
        priority,
        ..Meta::default()
    }
}

/// The meta of a command to the servers (MXNet's `SimpleApp` requests).
pub fn command_request(head: i32, body: &str, timestamp: i32) -> Meta {
    Meta {
        head,
        body: body.as_bytes().to_vec(),
        request: true,
        simple_app: true,
        app_id: Some(0),
        timestamp: Some(timestamp),
        customer_id: 0,
        ..Meta::default()
    }
}

/// Checks a node table as ps-lite assigns ids: the servers are 8, 10, 12, ..., the workers 9,
/// 11, 13, ... (`rank * 2 + 8` and `rank * 2 + 9`), the scheduler, when listed, 1; every id
/// once. The ranks of every node and the key ranges of the servers follow from the ids.
fn check_node_table(table: &[NodeRecord]) -> Result<(), String> {
    let mut ids: Vec<i32> = table.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("gives id {} to two nodes", w[0]));
    }
    for (role, first) in [(Role::Server, 8), (Role::Worker, 9)] {
        let mut of_role: Vec<i32> = table
            .iter()
            .filter(|n| n.role == role)
            .map(|n| n.id)
            .collect();
        of_role.sort_unstable();
        for (rank, &id) in of_role.iter().enumerate() {
            if i64::from(id) != first + 2 * rank as i64 {
                return Err(format!(
                    "gives {} of rank {rank} id {id}, not {} (ps-lite's rank * 2 + {first})",
                    match role {
                        Role::Server => "the server",
                        _ => "the worker",
                    },
                    first + 2 * rank as i64
                ));
            }
        }
    }
    if let Some(n) = table
        .iter()
        .find(|n| n.role == Role::Scheduler && n.id != SCHEDULER_ID)
    {
        return Err(format!(
            "gives the scheduler id {}, not {SCHEDULER_ID}",
            n.id
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's van listening on a free port of 127.0.0.1 (not part of a job), with `limits`.
    fn serving(limits: Limits) -> Van {
        let config = VanConfig {
            scheduler: "127.0.0.1:1".into(),
            host: "127.0.0.1".into(),
            bind: "127.0.0.1".into(),
            port: 0,
            timeout: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
        };
        Van::bind_with(config, Role::Server, limits).unwrap()
    }

    fn dealer(van: &Van, identity: &[u8]) -> std::io::Result<Dealer> {
        Dealer::connect(
            &van.listen_addr().to_string(),
            identity,
            Duration::from_secs(5),
        )
    }

    /// Polls `done` for up to 5 s.
    fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let by = Instant::now() + Duration::from_secs(5);
        while Instant::now() < by {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn requests_past_the_queue_budget_wait_until_the_node_catches_up() {
        let van = serving(Limits {
            queued_bytes: 1000,
            ..Limits::default()
        });
        let mut peer = dealer(&van, b"ps9").unwrap();
        for ts in 1..=3 {
            let meta = kv_request(0, ts, true, false, 0).encode();
            peer.send(&meta, &[&[0u8; 8], &[0u8; 600], &[0u8; 4]])
                .unwrap();
        }
        // The first is queued (the queue was empty), the second waits for room.
        assert!(eventually(|| van.shared.lock().requests.len() == 1));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(van.shared.lock().requests.len(), 1);
        for ts in 1..=3 {
            let request = van.next_request(Duration::from_secs(5)).expect("a request");
            assert_eq!(request.meta.timestamp, Some(ts));
            assert!(van.shared.lock().queued_bytes <= 1000);
        }
    }

    #[test]
    fn a_header_over_the_cap_ends_the_connection() {
        let van = serving(Limits::default());
        let mut peer = dealer(&van, b"ps9").unwrap();
        let _ = peer.send(&vec![0u8; MAX_META_BYTES + 1], &[]);
        assert!(eventually(|| van
            .shared
            .lock()
            .lost
            .iter()
            .any(|(id, why)| *id == 9 && why.contains("a header of"))));
        assert!(van.shared.lock().requests.is_empty());
    }

    #[test]
    fn connections_past_the_cap_are_closed_until_one_ends() {
        let van = serving(Limits {
            connections: 2,
            ..Limits::default()
        });
        let first = dealer(&van, b"ps9").unwrap();
        let _second = dealer(&van, b"ps11").unwrap();
        assert!(eventually(
            || van.shared.connections.load(Ordering::SeqCst) == 2
        ));
        assert!(dealer(&van, b"ps13").is_err(), "a third connection");
        drop(first);
        assert!(eventually(
            || van.shared.connections.load(Ordering::SeqCst) == 1
        ));
        dealer(&van, b"ps13").expect("room again");
    }

    #[test]
    fn node_tables_must_number_nodes_as_ps_lite_does() {
        let table = |nodes: &[(Role, i32)]| -> Vec<NodeRecord> {
            nodes
                .iter()
                .map(|&(role, id)| {
                    let mut n = NodeRecord::new(role, "h", 1);
                    n.id = id;
                    n
                })
                .collect()
        };
        let good = table(&[
            (Role::Scheduler, 1),
            (Role::Server, 8),
            (Role::Worker, 9),
            (Role::Server, 10),
            (Role::Worker, 11),
        ]);
        assert_eq!(check_node_table(&good), Ok(()));
        for (bad, why) in [
            (
                table(&[(Role::Server, 8), (Role::Worker, 8)]),
                "id 8 to two nodes",
            ),
            (
                table(&[(Role::Server, 8), (Role::Server, 12)]),
                "rank 1 id 12, not 10",
            ),
            (
                table(&[(Role::Worker, i32::MIN)]),
                "rank 0 id -2147483648, not 9",
            ),
            (table(&[(Role::Worker, -1)]), "not 9"),
            (
                table(&[(Role::Scheduler, 3), (Role::Server, 8)]),
                "scheduler id 3",
            ),
        ] {
            let e = check_node_table(&bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_timeout_under_a_millisecond_ends_in_an_error() {
        // Nobody listens on the scheduler's port: the join gives up once the deadline passed.
        let unused = TcpListener::bind("127.0.0.1:0").unwrap();
        let scheduler = unused.local_addr().unwrap().to_string();
        drop(unused);
        let config = VanConfig {
            scheduler,
            host: "127.0.0.1".into(),
            bind: "127.0.0.1".into(),
            port: 0,
            timeout: Duration::from_micros(500),
            max_message_bytes: 1 << 20,
        };
        assert!(Van::join(config).is_err());
    }

    #[test]
    fn identities_name_nodes() {
        assert_eq!(identity_id(b"ps9"), 9);
        assert_eq!(identity_id(b"ps1"), SCHEDULER_ID);
        assert_eq!(identity_id(b""), UNSET);
        assert_eq!(identity_id(b"\0\x12\x34"), UNSET);
        assert_eq!(node_name(8), "server 8 (rank 0)");
        assert_eq!(node_name(11), "worker 11 (rank 1)");
        assert_eq!(group_name(EVERYONE), "scheduler + servers + workers");
    }
}
