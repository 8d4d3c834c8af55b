//! The server and worker side of a cluster: join, barriers, heartbeats, leave.
//!
//! [`Node::join`] binds the address this node will serve on (`DMLC_NODE_HOST`, else the IPv4
//! address of `DMLC_INTERFACE`, else the local address the OS routes to the scheduler; `PORT`,
//! else a free port; with `KVSTORE_BIND_HOST` it listens there instead and advertises that
//! address with the port it got), connects to the scheduler
//! — retrying until `KVSTORE_TIMEOUT_SECS`, since the scheduler may start later — registers its
//! role and address, and waits for the node table, which gives its rank and id. A background
//! thread then sends a heartbeat every `PS_HEARTBEAT_INTERVAL` (see
//! [`heartbeat_settings`]). [`Node::barrier`] waits for every
//! member of a group, at most the timeout (plus a little, so that the scheduler's own timeout,
//! which names the missing nodes, is normally the one reported). [`Node::leave`], or dropping
//! the node, says goodbye; [`Node::abandon`] vanishes without one, as a crashed process would.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cluster::{
    decode_table, heartbeat_settings, ClusterError, Group, NodeInfo, CMD_BARRIER, CMD_DEAD_NODES,
    CMD_GOODBYE, CMD_HEARTBEAT, CMD_REGISTER, FLAG_RECOVERED,
};
use crate::config::{DistConfig, Role};
use crate::transport::{Connection, Outgoing, TransportError};

/// A duration as the milliseconds a control message carries in `aux` (saturating).
fn aux_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Extra time a node waits beyond the timeout for the scheduler's answer, so that the
/// scheduler's error (which names the missing nodes) arrives first.
fn grace(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(2)) + Duration::from_millis(100)
}

/// `host:port`, an IPv6 host in brackets (`[::1]:9000`).
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

struct Heartbeat {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// A server or worker that has joined the cluster (see the [module docs](self)).
pub struct Node {
    info: NodeInfo,
    table: Vec<NodeInfo>,
    scheduler: String,
    timeout: Duration,
    conn: Option<Arc<Connection>>,
    heartbeat: Option<Heartbeat>,
    listener: Option<TcpListener>,
    left: bool,
    /// Took the place of a lost worker.
    recovered: bool,
}

/// Asks the scheduler which nodes are dead (see [`Node::dead_nodes`]), from any thread, on the
/// connection of the node it came from ([`Node::dead_node_query`]).
#[derive(Clone)]
pub struct DeadNodeQuery {
    conn: Arc<Connection>,
    scheduler: String,
    timeout: Duration,
}

impl std::fmt::Debug for DeadNodeQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadNodeQuery")
            .field("scheduler", &self.scheduler)
            .finish_non_exhaustive()
    }
}

impl DeadNodeQuery {
    /// The nodes among ps-lite's `node_id` the scheduler counts as dead (lost, or silent for
    /// longer than `timeout`): each node's id and a description naming it and why.
    ///
    /// # Errors
    /// [`ClusterError`] naming the scheduler when it does not answer within the timeout.
    pub fn dead_nodes(
        &self,
        node_id: u64,
        timeout: Duration,
    ) -> Result<Vec<(u32, String)>, ClusterError> {
        let what = format!("count of the dead nodes of {node_id}");
        let answer = self
            .conn
            .send(
                Outgoing::new(CMD_DEAD_NODES, &[])
                    .key(node_id)
                    .aux(aux_millis(timeout)),
                &what,
            )
            .and_then(|p| p.wait_timeout(self.timeout))
            .map_err(|e| scheduler_error(&self.scheduler, &what, e))?;
        let text = String::from_utf8_lossy(&answer.payload);
        text.lines()
            .map(|line| {
                line.split_once(' ')
                    .and_then(|(id, description)| Some((id.parse().ok()?, description.to_string())))
                    .ok_or_else(|| {
                        ClusterError::Local(format!(
                            "the scheduler at {} sent a bad dead-node line {line:?}",
                            self.scheduler
                        ))
                    })
            })
            .collect()
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("info", &self.info)
            .field("scheduler", &self.scheduler)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Joins the cluster of `config` as a server or worker (`config.role`); blocks until every
    /// node has registered, at most `config.timeout` (plus a little) from now.
    ///
    /// Errors name the scheduler's address and, when registration times out at the
    /// scheduler, how many of which role are missing.
    pub fn join(config: &DistConfig) -> Result<Node, ClusterError> {
        Node::join_as(config, false)
    }

    /// [`join`](Node::join), for a worker that can also take the place of a lost worker: once
    /// the cluster is complete, the scheduler gives it the rank and id of a lost worker
    /// (ps-lite's recovery node), waiting for a loss as long as one can go unnoticed (the
    /// heartbeat timeout, at most the timeout); [`is_recovery`](Node::is_recovery) then says
    /// so. Before the cluster is complete it joins as `join` does.
    ///
    /// # Errors
    /// As [`join`](Node::join); a late registration is refused when no worker is lost within
    /// that wait, and a late server at once.
    pub fn join_recovering(config: &DistConfig) -> Result<Node, ClusterError> {
        Node::join_as(config, true)
    }

    fn join_as(config: &DistConfig, can_recover: bool) -> Result<Node, ClusterError> {
        if config.role == Role::Scheduler {
            return Err(ClusterError::Invalid(
                "Node::join is for servers and workers; the scheduler runs Scheduler::start"
                    .to_string(),
            ));
        }
        let start = Instant::now();
        let deadline = start + config.timeout;
        let scheduler = config.scheduler_addr();

        // The address this node serves on.
        let host = advertised_host(config)?;
        // It listens on `KVSTORE_BIND_HOST` when set (say 0.0.0.0 in a container) and
        // advertises `host` with the port it got.
        let bind = join_host_port(
            config.bind_host.as_deref().unwrap_or(&host),
            config.port.unwrap_or(0),
        );
        let listener = TcpListener::bind(bind.as_str())
            .map_err(|e| ClusterError::Local(format!("cannot listen on {bind}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| ClusterError::Local(format!("cannot listen on {bind}: {e}")))?
            .port();
        let my_addr = join_host_port(host.trim_start_matches('[').trim_end_matches(']'), port);

        let conn = Arc::new(connect_retrying(&scheduler, config, deadline)?);

        let payload = format!(
            "{} {my_addr}{}",
            config.role,
            if can_recover { " recover" } else { "" }
        );
        let what = format!("registration of {} at {my_addr}", config.role);
        let left = deadline.saturating_duration_since(Instant::now()) + grace(config.timeout);
        let response = conn
            .send(
                // The time this node has left: a recovering worker waits no longer for a place,
                // so that the scheduler's refusal (saying why) arrives first.
                Outgoing::new(CMD_REGISTER, payload.as_bytes())
                    // At least 1: 0 would mean "no timeout of its own".
                    .aux(aux_millis(deadline.saturating_duration_since(Instant::now())).max(1))
                    // How long this node may be silent, by its own heartbeat settings.
                    .key(aux_millis(heartbeat_settings(config).1)),
                &what,
            )
            .and_then(|p| p.wait_timeout(left))
            .map_err(|e| scheduler_error(&scheduler, "registration", e))?;
        let table = decode_table(&response.payload).map_err(|e| {
            ClusterError::Local(format!(
                "the scheduler at {scheduler} sent a bad node table: {e}"
            ))
        })?;
        let id = response.header.aux;
        let recovered = response.header.flags & FLAG_RECOVERED != 0;
        let info = table
            .iter()
            .find(|n| u64::from(n.id) == id && n.addr == my_addr && n.role == config.role)
            .cloned()
            .ok_or_else(|| {
                ClusterError::Local(format!(
                    "the node table from the scheduler at {scheduler} has no {} at {my_addr} \
                     with id {id}",
                    config.role
                ))
            })?;
        if recovered {
            log::warn!("kvstore-dist: joined the cluster as {info}, in the place of a lost worker");
        } else {
            log::info!("kvstore-dist: joined the cluster as {info}");
        }

        let (interval, _) = heartbeat_settings(config);
        let heartbeat = start_heartbeat(Arc::clone(&conn), interval, config.timeout, &info)?;
        Ok(Node {
            info,
            table,
            scheduler,
            timeout: config.timeout,
            conn: Some(conn),
            heartbeat: Some(heartbeat),
            listener: Some(listener),
            left: false,
            recovered,
        })
    }

    /// This node as the scheduler assigned it.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// Whether this node took the place of a lost worker (see
    /// [`join_recovering`](Node::join_recovering)): MXNet's `is_recovery`.
    pub fn is_recovery(&self) -> bool {
        self.recovered
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.info.role
    }

    /// This node's rank within its role (`0..num_servers` or `0..num_workers`).
    pub fn rank(&self) -> u32 {
        self.info.rank
    }

    /// This node's ps-lite id.
    pub fn id(&self) -> u32 {
        self.info.id
    }

    /// The node table: the scheduler, then servers by rank, then workers by rank.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.table
    }

    /// The servers, by rank.
    pub fn servers(&self) -> impl Iterator<Item = &NodeInfo> {
        self.table.iter().filter(|n| n.role == Role::Server)
    }

    /// The workers, by rank.
    pub fn workers(&self) -> impl Iterator<Item = &NodeInfo> {
        self.table.iter().filter(|n| n.role == Role::Worker)
    }

    /// The scheduler's address as configured.
    pub fn scheduler_addr(&self) -> &str {
        &self.scheduler
    }

    /// Takes the socket bound to this node's advertised address, for the server role to serve
    /// on (`None` once taken).
    pub fn take_listener(&mut self) -> Option<TcpListener> {
        self.listener.take()
    }

    /// Waits until every member of `group` has entered the same barrier. Returns at once when
    /// the group has a single node (as ps-lite). Fails, naming the nodes, when a member does
    /// not enter within the timeout, is lost (missed heartbeats, dropped connection) or has
    /// left; fails if this node is not in `group`.
    pub fn barrier(&self, group: Group) -> Result<(), ClusterError> {
        if !group.contains(self.info.role) {
            return Err(ClusterError::Invalid(format!(
                "{} cannot enter a barrier of the {group}, which it is not part of",
                self.info
            )));
        }
        let size = self.table.iter().filter(|n| group.contains(n.role)).count();
        if size <= 1 {
            return Ok(());
        }
        let what = format!("barrier of the {group}");
        let conn = self.conn.as_ref().ok_or_else(|| {
            ClusterError::Invalid(format!("{} has already left the cluster", self.info))
        })?;
        // The scheduler fails the barrier at this node's timeout if that is shorter than its
        // own, naming the nodes that did not enter, before this node's wait (timeout + grace)
        // ends.
        let barrier = Outgoing::new(CMD_BARRIER, &[])
            .key(group.ps_id())
            .aux(aux_millis(self.timeout).max(1));
        conn.send(barrier, &what)
            .and_then(|p| p.wait_timeout(self.timeout + grace(self.timeout)))
            .map(|_| ())
            .map_err(|e| scheduler_error(&self.scheduler, &what, e))
    }

    /// The nodes among ps-lite's `node_id` (a group: 1 scheduler, 2 servers, 4 workers and
    /// their sums; or one node's id) that the scheduler counts as dead: lost (a dropped
    /// connection, missed heartbeats) or silent for longer than `timeout`. One line each,
    /// naming the node and why. MXNet's `get_num_dead_node(node_id, timeout)` is its length.
    ///
    /// # Errors
    /// [`ClusterError`] naming the scheduler when it cannot be asked (this node left, or the
    /// scheduler does not answer within the timeout).
    pub fn dead_nodes(&self, node_id: u64, timeout: Duration) -> Result<Vec<String>, ClusterError> {
        let dead = self.dead_node_query()?.dead_nodes(node_id, timeout)?;
        Ok(dead
            .into_iter()
            .map(|(_, description)| description)
            .collect())
    }

    /// A handle asking the scheduler which nodes are dead, usable from another thread while
    /// this node is in the cluster (see [`DeadNodeQuery`]).
    ///
    /// # Errors
    /// [`ClusterError::Invalid`] when this node has left.
    pub fn dead_node_query(&self) -> Result<DeadNodeQuery, ClusterError> {
        let conn = self.conn.as_ref().ok_or_else(|| {
            ClusterError::Invalid(format!("{} has already left the cluster", self.info))
        })?;
        Ok(DeadNodeQuery {
            conn: Arc::clone(conn),
            scheduler: self.scheduler.clone(),
            timeout: self.timeout,
        })
    }

    /// Stops this node's heartbeats and nothing else, as a frozen process (or a machine cut
    /// off the network while its connections stay open) would look to the scheduler, which
    /// then counts it as lost. For fault-injection tests.
    pub fn stop_heartbeats(&mut self) {
        if let Some(hb) = self.heartbeat.take() {
            drop(hb.stop);
            let _ = hb.thread.join();
        }
    }

    /// Says goodbye to the scheduler and closes the connection.
    pub fn leave(mut self) -> Result<(), ClusterError> {
        self.goodbye()
    }

    /// Leaves without a goodbye: stops heartbeating and closes the connection, as a crashed
    /// process would (the scheduler then fails every barrier naming this node). For
    /// fault-injection tests.
    pub fn abandon(mut self) {
        self.left = true;
        self.stop_heartbeats();
        self.conn = None;
    }

    fn goodbye(&mut self) -> Result<(), ClusterError> {
        if self.left {
            return Ok(());
        }
        self.left = true;
        self.stop_heartbeats();
        let Some(conn) = self.conn.take() else {
            return Ok(());
        };
        conn.send(Outgoing::new(CMD_GOODBYE, &[]), "goodbye")
            .and_then(|p| p.wait_timeout(self.timeout.min(Duration::from_secs(5))))
            .map(|_| ())
            .map_err(|e| scheduler_error(&self.scheduler, "goodbye", e))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = self.goodbye() {
            log::debug!(
                "kvstore-dist: {} left without a clean goodbye: {e}",
                self.info
            );
        }
    }
}

fn scheduler_error(scheduler: &str, what: &str, e: TransportError) -> ClusterError {
    match e {
        TransportError::Remote { message, .. } => ClusterError::Scheduler {
            scheduler: scheduler.to_string(),
            what: what.to_string(),
            message,
        },
        source => ClusterError::Transport {
            scheduler: scheduler.to_string(),
            what: what.to_string(),
            source: Box::new(source),
        },
    }
}

/// The address a node advertises to the others: `DMLC_NODE_HOST`, else the address of
/// `DMLC_INTERFACE`, else the address of the interface that routes to the scheduler.
///
/// # Errors
/// [`ClusterError::Local`] when the interface has no address or no route to the scheduler
/// exists (the message says to set `DMLC_NODE_HOST`).
pub fn advertised_host(config: &DistConfig) -> Result<String, ClusterError> {
    let scheduler = config.scheduler_addr();
    match &config.node_host {
        Some(h) => Ok(h.clone()),
        None => {
            if let Some(iface) = &config.interface {
                interface_ip(iface).map_err(|e| {
                    ClusterError::Local(format!(
                        "DMLC_INTERFACE={iface}: {e}; set DMLC_NODE_HOST to choose the \
                         address instead"
                    ))
                })
            } else {
                route_ip(&scheduler).map_err(|e| {
                    ClusterError::Local(format!(
                        "cannot find this node's address towards the scheduler at \
                         {scheduler}: {e}; set DMLC_NODE_HOST"
                    ))
                })
            }
        }
    }
}

/// The IPv4 address of the network interface `name` (ps-lite's `GetIP`), e.g. `eth0`.
#[cfg(unix)]
pub fn interface_ip(name: &str) -> std::io::Result<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = None;
    let mut names = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family != libc::AF_INET {
            continue;
        }
        if !names.contains(&ifname.to_string()) {
            names.push(ifname.to_string());
        }
        if ifname == name && found.is_none() {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
            found = Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).to_string());
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found.ok_or_else(|| {
        std::io::Error::other(format!(
            "no IPv4 address on interface {name:?} (interfaces with one: {})",
            names.join(", ")
        ))
    })
}

/// The IPv4 address of a network interface: not available on this platform.
#[cfg(not(unix))]
pub fn interface_ip(name: &str) -> std::io::Result<String> {
    Err(std::io::Error::other(format!(
        "looking up interface {name:?} is not supported on this platform"
    )))
}

/// The local IP the OS would use to reach `scheduler` (a UDP "connect" sends nothing).
fn route_ip(scheduler: &str) -> std::io::Result<String> {
    let target = scheduler
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("the address resolved to nothing"))?;
    let any: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(any)?;
    sock.connect(target)?;
    Ok(sock.local_addr()?.ip().to_string())
}

/// Connects to the scheduler, retrying (it may not be listening yet) until `deadline`.
fn connect_retrying(
    scheduler: &str,
    config: &DistConfig,
    deadline: Instant,
) -> Result<Connection, ClusterError> {
    let mut last: Option<TransportError> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let source = last.unwrap_or_else(|| TransportError::Connect {
                peer: scheduler.to_string(),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
            return Err(ClusterError::Unreachable {
                scheduler: scheduler.to_string(),
                timeout: config.timeout,
                source: Box::new(source),
            });
        }
        let attempt = left.min(Duration::from_secs(1));
        let connected = scheduler
            .to_socket_addrs()
            .map_err(|source| TransportError::Connect {
                peer: scheduler.to_string(),
                source,
            })
            .and_then(|addrs| {
                let mut err = std::io::Error::other("the address resolved to nothing");
                for a in addrs {
                    match TcpStream::connect_timeout(&a, attempt) {
                        Ok(s) => return Ok(s),
                        Err(e) => err = e,
                    }
                }
                Err(TransportError::Connect {
                    peer: scheduler.to_string(),
                    source: err,
                })
            })
            .and_then(|stream| Connection::from_stream(stream, config.transport()));
        match connected {
            Ok(c) => return Ok(c),
            // The scheduler is up but the secrets differ: trying again cannot help.
            Err(e @ TransportError::Auth { .. }) => {
                return Err(ClusterError::Transport {
                    scheduler: scheduler.to_string(),
                    what: "connecting".to_string(),
                    source: Box::new(e),
                })
            }
            Err(e) => {
                last = Some(e);
                std::thread::sleep(left.min(Duration::from_millis(50)));
            }
        }
    }
}

fn start_heartbeat(
    conn: Arc<Connection>,
    interval: Duration,
    timeout: Duration,
    info: &NodeInfo,
) -> Result<Heartbeat, ClusterError> {
    let (stop, stopped) = mpsc::channel::<()>();
    let me = info.to_string();
    let thread = std::thread::Builder::new()
        .name(format!("kvstore-dist heartbeat {}", info.id))
        .spawn(move || {
            // Until the node drops `stop` (leaving): one heartbeat per interval.
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                let sent = conn
                    .send(Outgoing::new(CMD_HEARTBEAT, &[]), "heartbeat")
                    .and_then(|p| {
                        p.wait_timeout(interval.min(timeout).min(Duration::from_millis(500)))
                    });
                if let Err(e) = sent {
                    log::warn!("kvstore-dist: heartbeat of {me} failed: {e}");
                    if conn.is_closed() {
                        break;
                    }
                }
            }
        })
        .map_err(|e| ClusterError::Local(format!("cannot start the heartbeat thread: {e}")))?;
    Ok(Heartbeat { stop, thread })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_interface_has_127_0_0_1() {
        assert_eq!(interface_ip("lo").unwrap(), "127.0.0.1");
        let err = interface_ip("no-such-interface0").unwrap_err().to_string();
        assert!(
            err.contains("no-such-interface0") && err.contains("lo"),
            "{err}"
        );
    }
}
