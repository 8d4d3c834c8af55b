//! What the scheduler and the nodes share: node ids and ranks, barrier groups, the node table,
//! the cluster errors and the (small, text-based) control protocol.
//!
//! # Ids and ranks (ps-lite's rule, spec §5.2)
//!
//! The scheduler is node id **1**; the server of rank `r` is id `8 + 2r`, the worker of rank `r`
//! id `9 + 2r`. Ranks are dense per role (`0..num_servers`, `0..num_workers`) and assigned once
//! every node has registered, in ascending `(host, port)` order of the addresses the nodes
//! advertise (host compared as a string, port as a number): ranks are deterministic for a given
//! set of addresses and unrelated to the order in which nodes started. (ps-lite's comparator is
//! not a strict ordering across hosts; this one is, and agrees with it for nodes on one host.)
//!
//! # Control protocol
//!
//! Every control message is a transport request to the scheduler, on the one connection a node
//! keeps to it; the scheduler knows the node by that connection. The command says what it is:
//!
//! | command | request | response |
//! |---|---|---|
//! | [`CMD_REGISTER`] | payload `"<role> <host:port>"` (then `recover`, see below), aux = the node's timeout (ms) | the node table, once everyone registered (with [`FLAG_RECOVERED`] for a recovery node) |
//! | [`CMD_BARRIER`] | key = the group's ps-lite id (2, 4 or 7), aux = the node's timeout (ms) | empty, once every member entered |
//! | [`CMD_HEARTBEAT`] | empty | empty |
//! | [`CMD_GOODBYE`] | empty | empty |
//! | [`CMD_DEAD_NODES`] | key = a node id or group, aux = timeout (ms) | aux = the count; one line per dead node: `<id> <description>` |
//!
//! Failures come back as transport error responses whose text names the missing or dead nodes.
//! The node table is one line per node, `"<role> <rank> <id> <host:port>"`, scheduler first.
//!
//! # Recovery (ps-lite's recovery node)
//!
//! A worker registering with `recover` after the cluster is complete takes the place of a lost
//! worker (the lowest lost rank): its rank, its id, its own address, answered with
//! [`FLAG_RECOVERED`]; the other nodes keep running. When no worker is lost yet, it waits for a
//! loss as long as one can go unnoticed (the heartbeat timeout, at most the timeout), then is
//! refused; a server (whose values are lost with it) is refused at once.

use std::fmt;
use std::time::Duration;

use crate::config::Role;
use crate::transport::TransportError;

/// Registers a node: payload `"<role> <host:port>"`, then ` recover` from a worker able to take
/// a lost worker's place; answered with the node table (with [`FLAG_RECOVERED`] when it did).
pub const CMD_REGISTER: u32 = 0x4B56_0001;
/// The flag of a registration's answer that gave the node a lost worker's rank and id.
pub const FLAG_RECOVERED: u16 = 0x1;
/// Enters a barrier: key = the group's ps-lite id, aux = the node's timeout in milliseconds
/// (0: the scheduler's); answered when every member has entered, or with an error naming the
/// nodes that did not within the shorter of the two timeouts.
pub const CMD_BARRIER: u32 = 0x4B56_0002;
/// A heartbeat; answered at once.
pub const CMD_HEARTBEAT: u32 = 0x4B56_0003;
/// Leaves the cluster; answered at once.
pub const CMD_GOODBYE: u32 = 0x4B56_0004;

/// Asks which nodes are dead (MXNet's `get_num_dead_node`): key = a ps-lite node id, or a
/// group of them (1 scheduler, 2 servers, 4 workers, and their sums), aux = the timeout in
/// milliseconds; answered with aux = how many of them are lost or silent for longer than
/// the timeout, and one line for each: its id, a space, a description naming it and why.
pub const CMD_DEAD_NODES: u32 = 0x4B56_0005;

/// Whether the node `info` is one of ps-lite's `node_id`: a group (1 scheduler, 2 servers,
/// 4 workers, and their sums up to 7) or a single node's id (8 and above).
pub fn is_among(info: &NodeInfo, node_id: u64) -> bool {
    if node_id >= 8 {
        return u64::from(info.id) == node_id;
    }
    let bit = match info.role {
        Role::Scheduler => 1,
        Role::Server => 2,
        Role::Worker => 4,
    };
    node_id & bit != 0
}

/// The scheduler's node id (ps-lite's).
pub const SCHEDULER_ID: u32 = 1;

/// The node id of the node of `role` and `rank` (ps-lite: scheduler 1, server `8 + 2r`,
/// worker `9 + 2r`).
pub fn node_id(role: Role, rank: u32) -> u32 {
    match role {
        Role::Scheduler => SCHEDULER_ID,
        Role::Server => 8 + 2 * rank,
        Role::Worker => 9 + 2 * rank,
    }
}

/// A set of nodes that can hold a barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// Every worker (MXNet's `kv.barrier()`, ps-lite group 4).
    Workers,
    /// Every server (ps-lite group 2).
    Servers,
    /// Every node: servers, workers and the scheduler (the start-up and shutdown barrier,
    /// ps-lite group 7). The scheduler counts as always entered.
    All,
}

impl Group {
    /// ps-lite's group id: a bit set of scheduler 1, servers 2, workers 4.
    pub fn ps_id(self) -> u64 {
        match self {
            Group::Servers => 2,
            Group::Workers => 4,
            Group::All => 7,
        }
    }

    /// The group of a ps-lite group id (2, 4 or 7); `None` for other ids.
    pub fn from_ps_id(id: u64) -> Option<Group> {
        match id {
            2 => Some(Group::Servers),
            4 => Some(Group::Workers),
            7 => Some(Group::All),
            _ => None,
        }
    }

    /// Whether a node of `role` belongs to the group.
    pub fn contains(self, role: Role) -> bool {
        match self {
            Group::Workers => role == Role::Worker,
            Group::Servers => role == Role::Server,
            Group::All => true,
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Group::Workers => "worker group",
            Group::Servers => "server group",
            Group::All => "all-node group",
        })
    }
}

/// One node of the cluster as the scheduler assigned it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    /// Its role.
    pub role: Role,
    /// Its rank within its role (0 for the scheduler).
    pub rank: u32,
    /// Its ps-lite node id (see [`node_id`]).
    pub id: u32,
    /// The address it advertised (`host:port`); for the scheduler, the address it listens on.
    pub addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Role::Scheduler => write!(f, "the scheduler (id 1) at {}", self.addr),
            role => write!(
                f,
                "{role} rank {} (id {}) at {}",
                self.rank, self.id, self.addr
            ),
        }
    }
}

/// Encodes a node table: one line `"<role> <rank> <id> <addr>"` per node.
pub(crate) fn encode_table(nodes: &[NodeInfo]) -> String {
    let mut s = String::new();
    for n in nodes {
        s.push_str(&format!("{} {} {} {}\n", n.role, n.rank, n.id, n.addr));
    }
    s
}

/// Decodes a node table; an error says which line is malformed.
pub(crate) fn decode_table(text: &[u8]) -> Result<Vec<NodeInfo>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "the node table is not UTF-8".to_string())?;
    let mut nodes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("line {} of the node table is malformed: {line:?}", i + 1);
        let [role, rank, id, addr] = fields[..] else {
            return Err(bad());
        };
        nodes.push(NodeInfo {
            role: role.parse().map_err(|_| bad())?,
            rank: rank.parse().map_err(|_| bad())?,
            id: id.parse().map_err(|_| bad())?,
            addr: addr.to_string(),
        });
    }
    Ok(nodes)
}

/// Joins node descriptions for messages: `a, b and c`.
pub(crate) fn list(items: &[String]) -> String {
    match items {
        [] => "none".to_string(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The heartbeat interval and timeout a configuration implies: `PS_HEARTBEAT_INTERVAL` and
/// `PS_HEARTBEAT_TIMEOUT` when set (non-zero); otherwise an interval of a tenth of
/// `KVSTORE_TIMEOUT_SECS` clamped to 100 ms..=5 s (at most a third of `PS_HEARTBEAT_TIMEOUT`
/// when only that is set), and a timeout of three intervals.
pub fn heartbeat_settings(config: &crate::config::DistConfig) -> (Duration, Duration) {
    let interval = if config.heartbeat_interval.is_zero() {
        let derived =
            (config.timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
        match config.heartbeat_timeout.is_zero() {
            true => derived,
            false => derived
                .min(config.heartbeat_timeout / 3)
                .max(Duration::from_millis(100)),
        }
    } else {
        config.heartbeat_interval
    };
    let timeout = if config.heartbeat_timeout.is_zero() {
        interval.saturating_mul(3)
    } else {
        config.heartbeat_timeout
    };
    (interval, timeout)
}

/// A failure of the cluster layer: joining, barriers, heartbeats, shutdown. Messages name the
/// scheduler's address and, where some nodes are to blame, those nodes (role, rank, address).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The scheduler could not be reached within the timeout.
    #[error("cannot reach the scheduler at {scheduler} within {timeout:?}: {source}")]
    Unreachable {
        /// The scheduler's address.
        scheduler: String,
        /// How long it kept trying.
        timeout: Duration,
        /// The last attempt's error.
        #[source]
        source: Box<TransportError>,
    },
    /// The scheduler answered with an error (its message names the missing or dead nodes).
    #[error("the scheduler at {scheduler} failed {what}: {message}")]
    Scheduler {
        /// The scheduler's address.
        scheduler: String,
        /// What was asked (`registration`, `barrier of the worker group`, ...).
        what: String,
        /// The scheduler's message.
        message: String,
    },
    /// Talking to the scheduler failed (timeout, lost connection).
    #[error("{what} with the scheduler at {scheduler} failed: {source}")]
    Transport {
        /// The scheduler's address.
        scheduler: String,
        /// What was asked.
        what: String,
        /// The transport's error.
        #[source]
        source: Box<TransportError>,
    },
    /// Not every node registered within the timeout (scheduler side).
    #[error(
        "registration timed out after {timeout:?}: {missing} still missing \
         (the scheduler listens on {scheduler}; registered: {registered})"
    )]
    RegistrationTimeout {
        /// The scheduler's address.
        scheduler: String,
        /// How long it waited.
        timeout: Duration,
        /// How many of which role are missing, e.g. `1 of 2 servers and 3 of 3 workers`.
        missing: String,
        /// The nodes that did register.
        registered: String,
    },
    /// Some nodes died (missed heartbeats or dropped their connection) instead of leaving
    /// (scheduler side, once every node is gone).
    #[error("the cluster ended with lost nodes: {lost}")]
    NodesLost {
        /// The lost nodes and why.
        lost: String,
    },
    /// A request this node cannot make (e.g. a barrier of a group it is not in).
    #[error("{0}")]
    Invalid(String),
    /// A local failure: binding a socket, starting a thread, a malformed answer.
    #[error("{0}")]
    Local(String),
}

impl From<ClusterError> for kvstore_base::Error {
    /// A [`kvstore_base::Error::Backend`] of store `dist`.
    fn from(e: ClusterError) -> kvstore_base::Error {
        kvstore_base::Error::Backend {
            store: "dist".to_string(),
            source: Box::new(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_and_rejects_garbage() {
        let nodes = vec![
            NodeInfo {
                role: Role::Scheduler,
                rank: 0,
                id: 1,
                addr: "127.0.0.1:9000".into(),
            },
            NodeInfo {
                role: Role::Worker,
                rank: 1,
                id: 11,
                addr: "[::1]:9001".into(),
            },
        ];
        assert_eq!(
            decode_table(encode_table(&nodes).as_bytes()).unwrap(),
            nodes
        );
        assert!(decode_table(b"worker x 9 a:1\n").is_err());
        assert!(decode_table(b"worker 0 9\n").is_err());
        assert!(decode_table(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn ids_follow_ps_lite() {
        assert_eq!(node_id(Role::Scheduler, 0), 1);
        assert_eq!(node_id(Role::Server, 1), 10);
        assert_eq!(node_id(Role::Worker, 2), 13);
        assert_eq!(list(&["a".into(), "b".into(), "c".into()]), "a, b and c");
    }
}
