//! The scheduler role: registration, ids and ranks, barriers, liveness, shutdown.
//!
//! [`Scheduler::start`] listens on the configured root port and serves the control protocol of
//! [`cluster`](crate::cluster):
//!
//! - **Registration.** Each server and worker registers its role and the address it serves on.
//!   Once `num_servers` servers and `num_workers` workers have registered, ranks and ids are
//!   assigned (ascending `(host, port)`, see [`cluster`](crate::cluster)) and every node gets
//!   the full node table. If not everyone has registered within `KVSTORE_TIMEOUT_SECS` of the
//!   start, every registered node gets an error naming how many of which role are missing, and
//!   [`Scheduler::join`] returns [`ClusterError::RegistrationTimeout`]. Extra nodes and
//!   duplicate addresses are refused.
//! - **Recovery.** Once the cluster is complete, a worker that registers saying it can
//!   recover (see [`Node::join_recovering`](crate::node::Node::join_recovering)) takes the
//!   rank and id of a lost worker (ps-lite's recovery node); any other late registration, and
//!   any late server, is refused: a server's values are lost with it.
//! - **Barriers** per [`Group`]: a barrier completes when every member has entered (the
//!   scheduler counts as always entered in [`Group::All`]). A barrier not complete within the
//!   timeout of its first entry fails for everyone who entered, naming the nodes that did not
//!   enter; a node that sends its own, shorter timeout with its entry (every [`Node`] does)
//!   brings that deadline forward, so it too hears who is missing.
//! - **Liveness.** Any message from a node counts as a heartbeat; a node silent for longer than
//!   the heartbeat timeout (see [`heartbeat_settings`]), or whose connection closes without a
//!   goodbye, is **lost**: every pending and every later barrier fails with an error naming the
//!   lost nodes (role, rank, id, address) instead of hanging.
//! - **Shutdown.** [`Scheduler::join`] returns once every node has said goodbye (`Ok`), or
//!   every node is gone and some were lost ([`ClusterError::NodesLost`]), or
//!   [`SchedulerHandle::shutdown`] was called (`Ok`); it then closes every connection and joins
//!   all its threads.
//!
//! Nothing a peer sends can panic the scheduler: malformed messages are answered with errors.
//!
//! [`Node`]: crate::node::Node

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cluster::{
    encode_table, heartbeat_settings, is_among, list, node_id, ClusterError, Group, NodeInfo,
    CMD_BARRIER, CMD_DEAD_NODES, CMD_GOODBYE, CMD_HEARTBEAT, CMD_REGISTER, FLAG_RECOVERED,
    SCHEDULER_ID,
};
use crate::config::{DistConfig, Role};
use crate::transport::{ConnectionId, Handler, Outgoing, Request, Responder, Server};

/// A response to send once the state lock is released.
/// An answer to send once the state lock is released: payload, `aux` and flags, or an error.
type Reply = (Responder, Result<(Vec<u8>, u64, u16), String>);

struct Registration {
    role: Role,
    addr: String,
    peer: ConnectionId,
    responder: Responder,
    /// How long the node may be silent before it is lost (see [`Scheduler::quiet_limit`]).
    quiet_limit: Duration,
}

#[derive(Debug, Clone, PartialEq)]
enum Status {
    Alive,
    Left,
    Lost(String),
}

struct Member {
    info: NodeInfo,
    peer: ConnectionId,
    last_seen: Instant,
    status: Status,
    /// How long it may be silent before it is lost (see [`Scheduler::quiet_limit`]).
    quiet_limit: Duration,
}

struct Barrier {
    /// When the barrier fails if not complete: the earliest of the scheduler's timeout from
    /// the first entry and each entrant's own timeout from its entry.
    deadline: Instant,
    /// The timeout behind `deadline`, and whose entry it counts from when that was not the
    /// first (a node with a shorter timeout than the scheduler's), for the error message.
    timeout: Duration,
    set_by: Option<String>,
    entered: Vec<(usize, Responder)>,
    /// The first entry, and whether the wait since was logged (`KVSTORE_STALL_WARNING_SECS`).
    started: Instant,
    stall_logged: bool,
}

/// A worker registered after the cluster was complete, waiting for a lost worker's place
/// until `deadline` (`wait` after it registered).
struct Recovering {
    deadline: Instant,
    wait: Duration,
    registration: Registration,
}

/// A barrier request: who sent it, the group's ps-lite id, and the sender's own timeout in
/// milliseconds (0: the scheduler's).
struct BarrierEntry {
    peer: ConnectionId,
    group: u64,
    timeout_ms: u64,
}

struct State {
    started: Instant,
    registrations: Vec<Registration>,
    /// Workers registered after the cluster was complete, waiting for a lost worker's place,
    /// first come first served.
    recovering: Vec<Recovering>,
    /// Set once every node has registered.
    members: Option<Vec<Member>>,
    barriers: HashMap<Group, Barrier>,
    /// Whether the wait for registrations was logged (`KVSTORE_STALL_WARNING_SECS`).
    registration_stall_logged: bool,
    finished: bool,
    outcome: Option<Result<(), ClusterError>>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    num_servers: u32,
    num_workers: u32,
    timeout: Duration,
    heartbeat_timeout: Duration,
    /// When a registration or barrier still waiting is logged (`KVSTORE_STALL_WARNING_SECS`;
    /// zero: never).
    stall_warning: Duration,
    /// The address nodes reach the scheduler at, for messages and the node table.
    addr: OnceLock<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn addr(&self) -> &str {
        self.addr.get().map_or("<starting>", String::as_str)
    }
}

/// The members of `group` that have not entered its barrier `b`, by name.
fn absent_from(st: &State, group: Group, b: &Barrier) -> Vec<String> {
    st.members
        .iter()
        .flatten()
        .enumerate()
        .filter(|(i, m)| group.contains(m.info.role) && !b.entered.iter().any(|(e, _)| e == i))
        .map(|(_, m)| m.info.to_string())
        .collect()
}

/// The answer that refuses `registration`, saying `why`.
fn refused(registration: Registration, why: impl std::fmt::Display) -> Reply {
    let message = format!("registration refused: {why}");
    (registration.responder, Err(message))
}

fn send_replies(replies: Vec<Reply>) {
    for (responder, outcome) in replies {
        let sent = match outcome {
            Ok((payload, aux, flags)) => {
                responder.respond(Outgoing::new(0, &payload).aux(aux).flags(flags))
            }
            Err(message) => responder.respond_error(&message),
        };
        if let Err(e) = sent {
            log::warn!("kvstore-dist scheduler: cannot answer: {e}");
        }
    }
}

/// Splits `host:port` (IPv6 hosts in brackets) into a host compared as a string and a port.
fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

fn plural(n: u32, role: Role) -> String {
    format!("{n} {role}{}", if n == 1 { "" } else { "s" })
}

impl Shared {
    fn handle(&self, request: Request, responder: Responder) {
        let mut replies = Vec::new();
        {
            let mut st = self.lock();
            if st.finished {
                replies.push((responder, Err("the scheduler is shutting down".to_string())));
            } else {
                let peer = request.connection;
                if let Some(members) = st.members.as_mut() {
                    if let Some(m) = members.iter_mut().find(|m| m.peer == peer) {
                        m.last_seen = Instant::now();
                    }
                }
                match request.header.command {
                    CMD_REGISTER => self.register(&mut st, &request, responder, &mut replies),
                    CMD_BARRIER => {
                        let entry = BarrierEntry {
                            peer,
                            group: request.header.key,
                            timeout_ms: request.header.aux,
                        };
                        self.barrier(&mut st, entry, responder, &mut replies)
                    }
                    CMD_HEARTBEAT => {
                        let known = st
                            .members
                            .as_ref()
                            .map_or(st.registrations.iter().any(|r| r.peer == peer), |m| {
                                m.iter().any(|m| m.peer == peer)
                            });
                        replies.push((
                            responder,
                            if known {
                                Ok((Vec::new(), 0, 0))
                            } else {
                                Err(format!("heartbeat from {peer}, which is not registered"))
                            },
                        ));
                    }
                    CMD_GOODBYE => self.goodbye(&mut st, peer, responder, &mut replies),
                    CMD_DEAD_NODES => {
                        let dead = self.dead_nodes(
                            &st,
                            request.header.key,
                            Duration::from_millis(request.header.aux),
                        );
                        let count = dead.len() as u64;
                        replies.push((responder, Ok((dead.join("\n").into_bytes(), count, 0))));
                    }
                    other => replies.push((
                        responder,
                        Err(format!("unknown control command {other:#x}")),
                    )),
                }
            }
        }
        send_replies(replies);
        self.cv.notify_all();
    }

    fn register(
        &self,
        st: &mut State,
        request: &Request,
        responder: Responder,
        replies: &mut Vec<Reply>,
    ) {
        let text = String::from_utf8_lossy(&request.payload).into_owned();
        // "<role> <host:port>", then "recover" from a node able to take a lost node's place.
        let mut words = text.split_whitespace();
        let (parsed, can_recover) = match (words.next(), words.next(), words.next(), words.next()) {
            (Some(role), Some(addr), recover, None)
                if matches!(recover, None | Some("recover")) =>
            {
                let parsed = role
                    .parse::<Role>()
                    .ok()
                    .map(|role| (role, addr.to_string()));
                (parsed, recover.is_some())
            }
            _ => (None, false),
        };
        let refuse = |why: String| Err(format!("registration refused: {why}"));
        let outcome = match parsed {
            None => refuse(format!("malformed registration {text:?}")),
            Some((Role::Scheduler, _)) => {
                refuse("a scheduler cannot register with a scheduler".to_string())
            }
            Some((_, ref addr)) if split_addr(addr).is_none() => {
                refuse(format!("{addr:?} is not a host:port address"))
            }
            Some((role, addr)) if st.members.is_some() => {
                let registration = Registration {
                    role,
                    addr,
                    peer: request.connection,
                    responder,
                    quiet_limit: self.quiet_limit(request.header.key),
                };
                if can_recover {
                    let theirs = request.header.aux;
                    let node_timeout = (theirs > 0).then(|| Duration::from_millis(theirs));
                    self.recover(st, registration, node_timeout, replies);
                } else {
                    let why = format!(
                        "{} (this {role} cannot take a lost node's place)",
                        self.complete()
                    );
                    replies.push(refused(registration, why));
                }
                return;
            }
            Some(_)
                if st
                    .registrations
                    .iter()
                    .any(|r| r.peer == request.connection) =>
            {
                refuse(format!("{} registered twice", request.connection))
            }
            Some((_, ref addr)) if st.registrations.iter().any(|r| &r.addr == addr) => refuse(
                format!("address {addr} is already registered by another node"),
            ),
            Some((role, addr)) => {
                let expected = if role == Role::Server {
                    self.num_servers
                } else {
                    self.num_workers
                };
                let have = st.registrations.iter().filter(|r| r.role == role).count() as u32;
                if have >= expected {
                    refuse(format!(
                        "{} already registered, the cluster expects {} \
                         (DMLC_NUM_SERVER / DMLC_NUM_WORKER)",
                        plural(have, role),
                        plural(expected, role)
                    ))
                } else {
                    Ok((role, addr))
                }
            }
        };
        match outcome {
            Err(message) => replies.push((responder, Err(message))),
            Ok((role, addr)) => {
                log::debug!("kvstore-dist scheduler: {role} at {addr} registered");
                st.registrations.push(Registration {
                    role,
                    addr,
                    peer: request.connection,
                    responder,
                    quiet_limit: self.quiet_limit(request.header.key),
                });
                if st.registrations.len() as u64
                    == u64::from(self.num_servers) + u64::from(self.num_workers)
                {
                    self.assign(st, replies);
                }
            }
        }
    }

    /// Assigns ranks in ascending (host, port) order and answers every registration.
    fn assign(&self, st: &mut State, replies: &mut Vec<Reply>) {
        let mut regs = std::mem::take(&mut st.registrations);
        regs.sort_by_key(|r| split_addr(&r.addr));
        let mut next_rank: HashMap<Role, u32> = HashMap::new();
        let now = Instant::now();
        let mut members = Vec::with_capacity(regs.len());
        let mut responders = Vec::with_capacity(regs.len());
        for r in regs {
            let rank = next_rank.entry(r.role).or_insert(0);
            let info = NodeInfo {
                role: r.role,
                rank: *rank,
                id: node_id(r.role, *rank),
                addr: r.addr,
            };
            *rank += 1;
            responders.push((r.responder, info.id));
            members.push(Member {
                info,
                peer: r.peer,
                last_seen: now,
                status: Status::Alive,
                quiet_limit: r.quiet_limit,
            });
        }
        let encoded = self.table(&members);
        for (responder, id) in responders {
            replies.push((responder, Ok((encoded.clone(), u64::from(id), 0))));
        }
        log::info!(
            "kvstore-dist scheduler: all {} nodes registered",
            members.len()
        );
        st.members = Some(members);
    }

    /// The encoded node table: the scheduler, then servers by rank, then workers by rank.
    fn table(&self, members: &[Member]) -> Vec<u8> {
        let mut table = vec![NodeInfo {
            role: Role::Scheduler,
            rank: 0,
            id: SCHEDULER_ID,
            addr: self.addr().to_string(),
        }];
        let mut nodes: Vec<NodeInfo> = members.iter().map(|m| m.info.clone()).collect();
        nodes.sort_by_key(|n| (n.role != Role::Server, n.rank));
        table.extend(nodes);
        encode_table(&table).into_bytes()
    }

    /// A worker registering once the cluster is complete takes the place of a lost worker
    /// (ps-lite's recovery node): the lowest lost rank, its id, this registrant's address,
    /// answered with the node table and [`FLAG_RECOVERED`]. When no worker is lost yet (a
    /// restarted process may register before its predecessor's loss is noticed), it waits for
    /// one as long as a loss can go unnoticed ([`recovery_wait`](Self::recovery_wait)), and no
    /// longer than the node itself waits (`node_timeout`). Servers are not replaced: a
    /// server's values and optimizer states are lost with it.
    fn recover(
        &self,
        st: &mut State,
        registration: Registration,
        node_timeout: Option<Duration>,
        replies: &mut Vec<Reply>,
    ) {
        let role = registration.role;
        if role != Role::Worker {
            let why = format!(
                "{}; a lost {role} cannot be replaced (its values and optimizer states are lost \
                 with it): restart the job, from an optimizer-state file if one was saved",
                self.complete()
            );
            replies.push(refused(registration, why));
        } else if let Some(m) = st
            .members
            .iter()
            .flatten()
            .find(|m| m.info.addr == registration.addr && m.status == Status::Alive)
        {
            let why = format!(
                "address {} is already taken by {}",
                registration.addr, m.info
            );
            replies.push(refused(registration, why));
        } else {
            // As long as a loss can go unnoticed, and no longer than the node itself waits.
            let longest = self.recovery_wait(st);
            let wait = node_timeout.map_or(longest, |t| t.min(longest));
            st.recovering.push(Recovering {
                deadline: Instant::now() + wait,
                wait,
                registration,
            });
            self.place_recovering(st, replies);
        }
    }

    /// How long a late worker waits for a lost worker's place: as long as a loss can go
    /// unnoticed (the longest a worker may be silent, and a tick), at most the timeout.
    fn recovery_wait(&self, st: &State) -> Duration {
        let longest = st
            .members
            .iter()
            .flatten()
            .filter(|m| m.info.role == Role::Worker)
            .map(|m| m.quiet_limit)
            .fold(self.heartbeat_timeout, Duration::max);
        longest
            .saturating_add(Duration::from_millis(100))
            .min(self.timeout)
    }

    /// How long a node may be silent before it is lost: this scheduler's heartbeat timeout,
    /// or the one the node announced at its registration (`announced_ms`, its own settings:
    /// a node with a longer heartbeat interval than the scheduler's settings imply is not
    /// taken for lost between two of its heartbeats), whichever is longer.
    fn quiet_limit(&self, announced_ms: u64) -> Duration {
        Duration::from_millis(announced_ms).max(self.heartbeat_timeout)
    }

    /// `the cluster of 1 server and 2 workers is already complete`.
    fn complete(&self) -> String {
        format!(
            "the cluster of {} and {} is already complete",
            plural(self.num_servers, Role::Server),
            plural(self.num_workers, Role::Worker)
        )
    }

    /// Gives waiting recovery registrations the places of lost workers, oldest first (their
    /// answers join `replies`, sent once the state lock is released).
    fn place_recovering(&self, st: &mut State, replies: &mut Vec<Reply>) {
        while !st.recovering.is_empty() {
            let Some(members) = st.members.as_mut() else {
                return;
            };
            let Some(m) = members
                .iter_mut()
                .find(|m| m.info.role == Role::Worker && matches!(m.status, Status::Lost(_)))
            else {
                return;
            };
            let r = st.recovering.remove(0).registration;
            log::warn!(
                "kvstore-dist scheduler: a worker at {} takes the place of {}, which was lost",
                r.addr,
                m.info
            );
            m.info.addr = r.addr;
            m.peer = r.peer;
            m.quiet_limit = r.quiet_limit;
            m.last_seen = Instant::now();
            m.status = Status::Alive;
            let id = m.info.id;
            let table = self.table(members);
            replies.push((r.responder, Ok((table, u64::from(id), FLAG_RECOVERED))));
        }
    }

    fn barrier(
        &self,
        st: &mut State,
        entry: BarrierEntry,
        responder: Responder,
        replies: &mut Vec<Reply>,
    ) {
        let BarrierEntry {
            peer,
            group: key,
            timeout_ms,
        } = entry;
        let Some(members) = st.members.as_ref() else {
            replies.push((
                responder,
                Err("barrier before the cluster is complete".to_string()),
            ));
            return;
        };
        let Some(me) = members.iter().position(|m| m.peer == peer) else {
            replies.push((
                responder,
                Err(format!(
                    "barrier from {peer}, which is not a registered node"
                )),
            ));
            return;
        };
        let Some(group) = Group::from_ps_id(key) else {
            replies.push((
                responder,
                Err(format!("unknown barrier group {key} (expected 2, 4 or 7)")),
            ));
            return;
        };
        if !group.contains(members[me].info.role) {
            replies.push((
                responder,
                Err(format!("{} is not in the {group}", members[me].info)),
            ));
            return;
        }
        if let Some(why) = self.broken(members, group) {
            replies.push((
                responder,
                Err(format!("barrier of the {group} failed: {why}")),
            ));
            return;
        }
        let size = members
            .iter()
            .filter(|m| group.contains(m.info.role))
            .count();
        let now = Instant::now();
        let barrier = st.barriers.entry(group).or_insert_with(|| Barrier {
            deadline: now + self.timeout,
            timeout: self.timeout,
            set_by: None,
            entered: Vec::new(),
            started: now,
            stall_logged: false,
        });
        if barrier.entered.iter().any(|(i, _)| *i == me) {
            let who = members[me].info.to_string();
            replies.push((
                responder,
                Err(format!("{who} entered the barrier of the {group} twice")),
            ));
            return;
        }
        // A node that gives up sooner than the scheduler (a shorter KVSTORE_TIMEOUT_SECS)
        // brings the deadline forward, so that it hears which nodes are missing rather than
        // timing out on its own unanswered request.
        let theirs = Duration::from_millis(timeout_ms);
        if timeout_ms > 0 && now + theirs < barrier.deadline {
            barrier.deadline = now + theirs;
            barrier.timeout = theirs;
            barrier.set_by = (!barrier.entered.is_empty()).then(|| members[me].info.to_string());
        }
        barrier.entered.push((me, responder));
        log::debug!(
            "kvstore-dist: scheduler: {} entered the barrier of the {group} ({} of {size})",
            members[me].info,
            barrier.entered.len()
        );
        if barrier.entered.len() == size {
            log::info!("kvstore-dist: scheduler: the barrier of the {group} is complete ({size})");
            if let Some(done) = st.barriers.remove(&group) {
                for (_, r) in done.entered {
                    replies.push((r, Ok((Vec::new(), 0, 0))));
                }
            }
        }
    }

    /// The nodes among ps-lite's `node_id` (see [`is_among`]) that are lost, or silent for
    /// longer than `timeout`, each named with why. The scheduler, answering, is alive; nodes
    /// that said goodbye are not dead.
    fn dead_nodes(&self, st: &State, node_id: u64, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        st.members
            .iter()
            .flatten()
            .filter(|m| is_among(&m.info, node_id))
            .filter_map(|m| match &m.status {
                Status::Lost(why) => Some(format!("{} {} is lost: {why}", m.info.id, m.info)),
                Status::Alive if now.duration_since(m.last_seen) > timeout => Some(format!(
                    "{} {} has been silent for {:.1?}",
                    m.info.id,
                    m.info,
                    now.duration_since(m.last_seen)
                )),
                _ => None,
            })
            .collect()
    }

    /// Why no barrier of `group` can complete: lost nodes (any role), or members that left.
    fn broken(&self, members: &[Member], group: Group) -> Option<String> {
        let lost: Vec<String> = members
            .iter()
            .filter_map(|m| match &m.status {
                Status::Lost(why) => Some(format!("{} is lost: {why}", m.info)),
                _ => None,
            })
            .collect();
        if !lost.is_empty() {
            return Some(list(&lost));
        }
        let left: Vec<String> = members
            .iter()
            .filter(|m| group.contains(m.info.role) && m.status == Status::Left)
            .map(|m| format!("{} has left the cluster", m.info))
            .collect();
        (!left.is_empty()).then(|| list(&left))
    }

    fn goodbye(
        &self,
        st: &mut State,
        peer: ConnectionId,
        responder: Responder,
        replies: &mut Vec<Reply>,
    ) {
        let Some(members) = st.members.as_mut() else {
            // Leaving during registration: forget it.
            st.registrations.retain(|r| r.peer != peer);
            replies.push((responder, Ok((Vec::new(), 0, 0))));
            return;
        };
        match members.iter_mut().find(|m| m.peer == peer) {
            Some(m) => {
                if m.status == Status::Alive {
                    m.status = Status::Left;
                }
                log::debug!("kvstore-dist scheduler: {} said goodbye", m.info);
                // Answered at once, under the lock: once the last goodbye sets `finished`,
                // `join` may close every connection before deferred replies are sent.
                send_replies(vec![(responder, Ok((Vec::new(), 0, 0)))]);
            }
            None => replies.push((
                responder,
                Err(format!("goodbye from {peer}, which is not registered")),
            )),
        }
        // Barriers waiting for a node that left can never complete.
        self.fail_broken_barriers(st, replies);
        self.check_done(st);
    }

    fn disconnected(&self, peer: ConnectionId) {
        let mut replies = Vec::new();
        {
            let mut st = self.lock();
            if st.finished {
                return;
            }
            st.recovering.retain(|r| r.registration.peer != peer);
            match st.members.as_ref() {
                None => st.registrations.retain(|r| r.peer != peer),
                Some(members) => {
                    if let Some(i) = members
                        .iter()
                        .position(|m| m.peer == peer && m.status == Status::Alive)
                    {
                        self.mark_lost(
                            &mut st,
                            i,
                            "its connection to the scheduler closed without a goodbye".to_string(),
                            &mut replies,
                        );
                    }
                }
            }
        }
        send_replies(replies);
        self.cv.notify_all();
    }

    fn mark_lost(&self, st: &mut State, i: usize, why: String, replies: &mut Vec<Reply>) {
        if let Some(m) = st.members.as_mut().and_then(|m| m.get_mut(i)) {
            log::warn!("kvstore-dist scheduler: {} is lost: {why}", m.info);
            m.status = Status::Lost(why);
        }
        // Barriers the lost node was part of fail first: a worker taking its place must not
        // inherit its entries (or be missing from them).
        self.fail_broken_barriers(st, replies);
        self.place_recovering(st, replies);
        self.check_done(st);
    }

    fn fail_broken_barriers(&self, st: &mut State, replies: &mut Vec<Reply>) {
        let Some(members) = st.members.as_ref() else {
            return;
        };
        let broken: Vec<(Group, String)> = st
            .barriers
            .keys()
            .filter_map(|g| self.broken(members, *g).map(|why| (*g, why)))
            .collect();
        for (group, why) in broken {
            if let Some(b) = st.barriers.remove(&group) {
                for (_, r) in b.entered {
                    replies.push((r, Err(format!("barrier of the {group} failed: {why}"))));
                }
            }
        }
    }

    fn check_done(&self, st: &mut State) {
        let Some(members) = st.members.as_ref() else {
            return;
        };
        if members.iter().any(|m| m.status == Status::Alive) {
            return;
        }
        let lost: Vec<String> = members
            .iter()
            .filter_map(|m| match &m.status {
                Status::Lost(why) => Some(format!("{} ({why})", m.info)),
                _ => None,
            })
            .collect();
        for Recovering {
            registration: r, ..
        } in std::mem::take(&mut st.recovering)
        {
            let why = "registration refused: the job is over (no node is left)";
            if let Err(e) = r.responder.respond_error(why) {
                log::warn!("kvstore-dist scheduler: cannot answer: {e}");
            }
        }
        st.outcome = Some(if lost.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::NodesLost { lost: list(&lost) })
        });
        st.finished = true;
    }

    /// One pass of the deadline checks: registration, heartbeats, barriers.
    fn tick(&self, st: &mut State, replies: &mut Vec<Reply>) {
        let now = Instant::now();
        if st.members.is_none() {
            let waited = now.duration_since(st.started);
            let registered = |st: &State| -> Vec<String> {
                st.registrations
                    .iter()
                    .map(|r| format!("{} at {}", r.role, r.addr))
                    .collect()
            };
            if waited < self.timeout && self.stalled(waited) && !st.registration_stall_logged {
                st.registration_stall_logged = true;
                log::warn!(
                    "kvstore-dist: scheduler at {}: the registration has waited {:?} or more: {} \
                     still missing (registered: {}); it fails once it has waited {:?} \
                     (KVSTORE_TIMEOUT_SECS)",
                    self.addr(),
                    self.stall_warning,
                    self.missing(&st.registrations),
                    list(&registered(st)),
                    self.timeout
                );
            }
            if waited >= self.timeout {
                let missing = self.missing(&st.registrations);
                let err = ClusterError::RegistrationTimeout {
                    scheduler: self.addr().to_string(),
                    timeout: self.timeout,
                    missing,
                    registered: list(&registered(st)),
                };
                for r in std::mem::take(&mut st.registrations) {
                    replies.push((r.responder, Err(err.to_string())));
                }
                st.outcome = Some(Err(err));
                st.finished = true;
            }
            return;
        }
        let silent: Vec<(usize, Duration, Duration)> = st
            .members
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, m)| m.status == Status::Alive)
            .map(|(i, m)| (i, now.duration_since(m.last_seen), m.quiet_limit))
            .filter(|(_, d, limit)| d > limit)
            .collect();
        for (i, quiet, limit) in silent {
            let why = format!(
                "no heartbeat for {quiet:.1?} (heartbeat timeout {limit:?}, PS_HEARTBEAT_TIMEOUT)"
            );
            self.mark_lost(st, i, why, replies);
        }
        let (expired, waiting): (Vec<Recovering>, Vec<Recovering>) =
            std::mem::take(&mut st.recovering)
                .into_iter()
                .partition(|r| now >= r.deadline);
        st.recovering = waiting;
        for r in expired {
            let why = format!(
                "{} and no worker was lost within {:?}: there is no place for a recovering \
                 worker (is DMLC_NUM_WORKER right?)",
                self.complete(),
                r.wait
            );
            replies.push(refused(r.registration, why));
        }
        let expired: Vec<Group> = st
            .barriers
            .iter()
            .filter(|(_, b)| now >= b.deadline)
            .map(|(g, _)| *g)
            .collect();
        for group in expired {
            let Some(b) = st.barriers.remove(&group) else {
                continue;
            };
            let absent = absent_from(st, group, &b);
            let since = b
                .set_by
                .as_ref()
                .map(|who| format!(" of the entry of {who}"))
                .unwrap_or_default();
            let message = format!(
                "barrier of the {group} failed: {} did not enter within {:?}{since}",
                list(&absent),
                b.timeout
            );
            for (_, r) in b.entered {
                replies.push((r, Err(message.clone())));
            }
        }
        let stalled: Vec<Group> = st
            .barriers
            .iter()
            .filter(|(_, b)| !b.stall_logged && self.stalled(now.duration_since(b.started)))
            .map(|(g, _)| *g)
            .collect();
        for group in stalled {
            let absent = absent_from(st, group, &st.barriers[&group]);
            let b = st.barriers.get_mut(&group).expect("listed above");
            b.stall_logged = true;
            log::warn!(
                "kvstore-dist: scheduler at {}: the barrier of the {group} has waited {:?} or more \
                 for {}; it fails once it has waited {:?} (KVSTORE_TIMEOUT_SECS)",
                self.addr(),
                self.stall_warning,
                list(&absent),
                b.timeout
            );
        }
    }

    /// Whether a wait of `waited` is long enough to be logged.
    fn stalled(&self, waited: Duration) -> bool {
        !self.stall_warning.is_zero() && waited >= self.stall_warning
    }

    /// `1 of 2 servers and 3 of 3 workers`.
    fn missing(&self, regs: &[Registration]) -> String {
        let mut parts = Vec::new();
        for (role, want) in [
            (Role::Server, self.num_servers),
            (Role::Worker, self.num_workers),
        ] {
            let have = regs.iter().filter(|r| r.role == role).count() as u32;
            if have < want {
                parts.push(format!("{} of {}", want - have, plural(want, role)));
            }
        }
        list(&parts)
    }

    fn stop(&self, why: &str) {
        let mut replies = Vec::new();
        {
            let mut st = self.lock();
            if !st.finished {
                for r in std::mem::take(&mut st.registrations) {
                    replies.push((r.responder, Err(why.to_string())));
                }
                for Recovering {
                    registration: r, ..
                } in std::mem::take(&mut st.recovering)
                {
                    replies.push((r.responder, Err(why.to_string())));
                }
                for (_, b) in std::mem::take(&mut st.barriers) {
                    for (_, r) in b.entered {
                        replies.push((r, Err(why.to_string())));
                    }
                }
                st.finished = true;
                st.outcome = Some(Ok(()));
            }
        }
        send_replies(replies);
        self.cv.notify_all();
    }
}

struct SchedulerHandler(Arc<Shared>);

impl Handler for SchedulerHandler {
    fn handle(&self, request: Request, responder: Responder) {
        self.0.handle(request, responder)
    }

    fn disconnected(&self, peer: ConnectionId) {
        self.0.disconnected(peer)
    }
}

/// The scheduler of a dist cluster (see the [module docs](self)).
///
/// Dropping it stops it like [`SchedulerHandle::shutdown`] and joins its threads.
pub struct Scheduler {
    shared: Arc<Shared>,
    server: Option<Server>,
    monitor: Option<JoinHandle<()>>,
    local: SocketAddr,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("addr", &self.local)
            .finish_non_exhaustive()
    }
}

/// Stops a running [`Scheduler`] from another thread.
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SchedulerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerHandle")
            .field("addr", &self.shared.addr())
            .finish_non_exhaustive()
    }
}

impl SchedulerHandle {
    /// Stops the scheduler: pending registrations and barriers fail with "the scheduler was
    /// shut down", and [`Scheduler::join`] returns `Ok(())`.
    pub fn shutdown(&self) {
        self.shared.stop("the scheduler was shut down");
    }
}

impl Scheduler {
    /// Starts the scheduler: listens on `DMLC_PS_ROOT_PORT` on the address `KVSTORE_BIND_HOST`,
    /// else `DMLC_NODE_HOST`, when set, else on all interfaces (as ps-lite does). A `root_port` of 0 (possible only
    /// in a hand-built [`DistConfig`]) takes any free port: see [`local_addr`](Self::local_addr).
    /// Registration must complete within `config.timeout` from now.
    pub fn start(config: &DistConfig) -> Result<Scheduler, ClusterError> {
        let host = config
            .bind_host
            .clone()
            .or_else(|| config.node_host.clone())
            .unwrap_or_else(|| "0.0.0.0".into());
        let bind = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", config.root_port)
        } else {
            format!("{host}:{}", config.root_port)
        };
        let (_, heartbeat_timeout) = heartbeat_settings(config);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                started: Instant::now(),
                registrations: Vec::new(),
                recovering: Vec::new(),
                members: None,
                barriers: HashMap::new(),
                registration_stall_logged: false,
                finished: false,
                outcome: None,
            }),
            cv: Condvar::new(),
            num_servers: config.num_servers,
            num_workers: config.num_workers,
            timeout: config.timeout,
            heartbeat_timeout,
            stall_warning: config.stall_warning,
            addr: OnceLock::new(),
        });
        let transport = crate::transport::TransportConfig {
            node_id: SCHEDULER_ID,
            ..config.transport()
        };
        let server = Server::bind(
            bind.as_str(),
            transport,
            SchedulerHandler(Arc::clone(&shared)),
        )
        .map_err(|e| ClusterError::Local(format!("the scheduler cannot start: {e}")))?;
        let local = server.local_addr();
        // Nodes reach the scheduler at the configured root address; with port 0, the bound one.
        let advertised =
            if config.root_port == 0 || local.ip().is_unspecified() || config.bind_host.is_some() {
                let host = if local.ip().is_unspecified() || config.bind_host.is_some() {
                    config.root_uri.clone()
                } else {
                    local.ip().to_string()
                };
                if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]:{}", local.port())
                } else {
                    format!("{host}:{}", local.port())
                }
            } else {
                local.to_string()
            };
        let _ = shared.addr.set(advertised);
        let tick_shared = Arc::clone(&shared);
        let tick =
            (heartbeat_timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(50));
        let monitor = std::thread::Builder::new()
            .name("kvstore-dist scheduler monitor".into())
            .spawn(move || {
                let shared = tick_shared;
                let mut st = shared.lock();
                while !st.finished {
                    let mut replies = Vec::new();
                    shared.tick(&mut st, &mut replies);
                    if !replies.is_empty() || st.finished {
                        drop(st);
                        send_replies(replies);
                        shared.cv.notify_all();
                        st = shared.lock();
                        continue;
                    }
                    st = match shared.cv.wait_timeout(st, tick) {
                        Ok((g, _)) => g,
                        Err(e) => e.into_inner().0,
                    };
                }
            })
            .map_err(|e| {
                ClusterError::Local(format!("cannot start the scheduler's monitor: {e}"))
            })?;
        Ok(Scheduler {
            shared,
            server: Some(server),
            monitor: Some(monitor),
            local,
        })
    }

    /// The address the scheduler listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address it gives nodes in the node table (`host:port`).
    pub fn addr(&self) -> &str {
        self.shared.addr()
    }

    /// A handle to stop the scheduler from another thread.
    pub fn handle(&self) -> SchedulerHandle {
        SchedulerHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Waits until the cluster is done (see the [module docs](self)), then closes every
    /// connection and joins every thread. `Ok(())` when every node said goodbye or the
    /// scheduler was shut down; [`ClusterError::RegistrationTimeout`] or
    /// [`ClusterError::NodesLost`] otherwise.
    pub fn join(mut self) -> Result<(), ClusterError> {
        let outcome = {
            let mut st = self.shared.lock();
            while !st.finished {
                st = match self.shared.cv.wait(st) {
                    Ok(g) => g,
                    Err(e) => e.into_inner(),
                };
            }
            st.outcome.take().unwrap_or(Ok(()))
        };
        self.close();
        outcome
    }

    fn close(&mut self) {
        self.shared.stop("the scheduler was shut down");
        drop(self.server.take());
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.close();
    }
}
