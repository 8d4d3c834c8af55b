//! A ps-lite scheduler: MXNet 1.9.1's, in Rust, so that a job of MXNet's own Python workers,
//! this crate's workers and [`crate::server`]s can meet without MXNet's scheduler.
//!
//! As ps-lite's: it waits until every node (`DMLC_NUM_WORKER` workers and `DMLC_NUM_SERVER`
//! servers) registered, gives the servers ids 8, 10, ... and the workers 9, 11, ... in the
//! order they registered, sends every node the table, and releases each barrier once every
//! node of its group entered it (the scheduler itself belongs to every group that includes it,
//! and is counted as entered). The job ends with the second barrier of every node (the one of
//! the start and the one of the end, as MXNet's nodes enter them).
//!
//! Every wait is bounded: the registration fails after the timeout, naming the nodes that
//! registered, and so does a barrier some node has entered (the start barrier counts as entered
//! once the table is sent), naming the nodes missing; between barriers the scheduler waits as
//! long as the job runs, and fails once every node's connection closed, or once a server's
//! connection stayed closed for 2 s (a server cannot rejoin; MXNet's scheduler waits forever).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::meta::{Command, Control, Meta, NodeRecord, Role};
use crate::van::{
    node_name, node_names, Van, VanConfig, VanError, EVERYONE, SERVER_GROUP, WORKER_GROUP,
};

/// How long a node a barrier waits for may have no connection before the barrier fails
/// naming it (at most the timeout): a broken link may be connected again meanwhile.
const LOST_GRACE: Duration = Duration::from_secs(2);

/// The ids of the members of barrier `group` among `nodes` (the scheduler excluded).
fn members(group: i32, nodes: &[NodeRecord]) -> Vec<i32> {
    nodes
        .iter()
        .filter(|n| match n.role {
            Role::Server => group & SERVER_GROUP != 0,
            Role::Worker => group & WORKER_GROUP != 0,
            Role::Scheduler => false,
        })
        .map(|n| n.id)
        .collect()
}

/// Runs the scheduler of a job of `num_workers` workers and `num_servers` servers, listening
/// on `config.bind`:`config.port`, until the job ends.
///
/// # Errors
/// Not every node registered, a barrier not complete, within the timeout (naming who is
/// missing), or every node gone before the end.
pub fn run_scheduler(
    config: VanConfig,
    num_workers: usize,
    num_servers: usize,
) -> Result<(), VanError> {
    run_scheduler_on(Van::listen(config)?, num_workers, num_servers)
}

/// [`run_scheduler`] on a scheduler's node already listening ([`Van::listen`]).
///
/// # Errors
/// As [`run_scheduler`].
pub fn run_scheduler_on(
    mut van: Van,
    num_workers: usize,
    num_servers: usize,
) -> Result<(), VanError> {
    let timeout = van.timeout();
    let expected = num_workers + num_servers;
    let deadline = Instant::now() + timeout;
    let mut registered: Vec<NodeRecord> = Vec::new();
    while registered.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        // The deadline is checked on every pass: a stream of messages does not extend it.
        let message = match Instant::now() >= deadline {
            true => None,
            false => van.next_request(left.max(Duration::from_millis(1))),
        };
        let Some(message) = message else {
            if Instant::now() >= deadline {
                return Err(VanError(format!(
                    "only {} of the {expected} nodes ({num_workers} workers, {num_servers} \
                     servers) registered within {timeout:?} (KVSTORE_TIMEOUT_SECS): {}",
                    registered.len(),
                    registered
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            continue;
        };
        match (&message.meta.control, message.meta.request) {
            (Some(c), false) if c.cmd == Command::AddNode => {
                let Some(node) = c.nodes.first() else {
                    continue;
                };
                let room = match node.role {
                    Role::Server => {
                        registered.iter().filter(|n| n.role == Role::Server).count() < num_servers
                    }
                    Role::Worker => {
                        registered.iter().filter(|n| n.role == Role::Worker).count() < num_workers
                    }
                    Role::Scheduler => false,
                };
                let again = registered.iter().any(|n| {
                    n.role == node.role && n.hostname == node.hostname && n.port == node.port
                });
                if again {
                    log::warn!("pslite scheduler: {node} registered twice; the second ignored");
                    continue;
                }
                if !room {
                    log::warn!("pslite scheduler: refused the registration of {node}: the job has no room for it");
                    continue;
                }
                registered.push(node.clone());
            }
            _ => log::warn!(
                "pslite scheduler: ignored a message from {} before the job started",
                node_name(message.sender)
            ),
        }
    }
    // Ids in the order of registration.
    let (mut next_server, mut next_worker) = (8, 9);
    for node in &mut registered {
        let id = match node.role {
            Role::Server => &mut next_server,
            _ => &mut next_worker,
        };
        node.id = *id;
        *id += 2;
    }
    let me = van.me().clone();
    let mut table = registered.clone();
    table.push(me);
    let mut announce = Control::new(Command::AddNode);
    announce.nodes = table;
    for node in &registered {
        let addr = node.addr();
        van.connect_to(node.id, &addr, Instant::now() + timeout)?;
        let meta = Meta {
            control: Some(announce.clone()),
            timestamp: Some(van.new_timestamp()),
            ..Meta::default()
        };
        van.send(node.id, &meta, &[])?;
    }
    log::info!("pslite scheduler: {num_workers} workers and {num_servers} servers joined");

    // Barriers: who entered each group's, and since when.
    // Every node enters the start barrier: it is timed from now, so that a node that never
    // comes back as itself fails the job after the timeout.
    let mut entered: HashMap<i32, (Vec<i32>, Instant)> =
        HashMap::from([(EVERYONE, (Vec::new(), Instant::now()))]);
    let mut everyone_met = 0;
    // Since when each node a barrier waits for has had no connection (a node whose link broke
    // may connect again: it counts as gone once that lasted `LOST_GRACE`).
    let mut lost_since: HashMap<i32, Instant> = HashMap::new();
    let grace = LOST_GRACE.min(timeout);
    // Whether node `id` has had no connection for the grace (its loss timed from the first
    // pass that saw it; a reconnection forgets it).
    let mut gone = |id: i32| match van.all_lost(&[id]) {
        true => lost_since.entry(id).or_insert_with(Instant::now).elapsed() >= grace,
        false => {
            lost_since.remove(&id);
            false
        }
    };
    let of_role = |role: Role| -> Vec<i32> {
        registered
            .iter()
            .filter(|n| n.role == role)
            .map(|n| n.id)
            .collect()
    };
    let (workers, servers) = (of_role(Role::Worker), of_role(Role::Server));
    let ids: Vec<i32> = registered.iter().map(|n| n.id).collect();
    while everyone_met < 2 {
        // Checked on every pass, so that a stream of messages delays neither: a barrier past
        // the timeout, and a barrier missing a node that left the job (it can never enter).
        for (group, (ids, since)) in &entered {
            let missing: Vec<i32> = members(*group, &registered)
                .into_iter()
                .filter(|id| !ids.contains(id))
                .collect();
            if since.elapsed() >= timeout {
                return Err(VanError(format!(
                    "the barrier of group {group} waited {timeout:?} (KVSTORE_TIMEOUT_SECS) for {}",
                    node_names(missing)
                )));
            }
            let lost: Vec<i32> = missing.into_iter().filter(|&id| gone(id)).collect();
            if !lost.is_empty() {
                return Err(VanError(format!(
                    "the barrier of group {group} waits for {}, which left the job",
                    node_names(lost)
                )));
            }
        }
        // Every worker gone: no one is left to end the job (MXNet's servers would wait
        // forever; this crate's stop once their workers are gone, so a server gone too is
        // named after them).
        if !workers.is_empty() && workers.iter().all(|&id| gone(id)) {
            let servers_gone: Vec<i32> = servers.iter().copied().filter(|&id| gone(id)).collect();
            return Err(VanError(format!(
                "every worker ({}) left the job before it ended (the last barrier){}",
                node_names(workers.iter().copied()),
                match servers_gone.is_empty() {
                    true => String::new(),
                    false => format!("; {} left too", node_names(servers_gone)),
                }
            )));
        }
        // A server that left cannot come back (ps-lite has no recovery): its keys are gone and
        // no request to it can be answered, so the job ends, naming it.
        for &server in &servers {
            if gone(server) {
                return Err(VanError(format!(
                    "{} left the job before it ended: its keys are gone, and no worker's request \
                     to it can be answered",
                    node_name(server)
                )));
            }
        }
        if van.all_lost(&ids) {
            return Err(VanError(format!(
                "every worker ({}) left the job before it ended (the last barrier), and every \
                 server ({})",
                node_names(workers.iter().copied()),
                node_names(servers.iter().copied())
            )));
        }
        let Some(message) = van.next_request(Duration::from_secs(1)) else {
            continue;
        };
        // A member of the job running the resender (anyone else's ACK is nobody's business).
        if ids.contains(&message.sender) {
            crate::van::refuse_resender(&message)?;
        }
        let Some(control) = &message.meta.control else {
            log::warn!(
                "pslite scheduler: ignored a data message from {}",
                node_name(message.sender)
            );
            continue;
        };
        if control.cmd == Command::AddNode {
            let who = control
                .nodes
                .first()
                .map_or_else(|| "a node".to_string(), |n| format!("{n}"));
            log::warn!(
                "pslite scheduler: {who} asked to join after the job formed; ignored (the job \
                 has its {num_workers} workers and {num_servers} servers, and ps-lite's nodes \
                 cannot rejoin: check DMLC_NUM_WORKER and DMLC_NUM_SERVER)"
            );
            continue;
        }
        if control.cmd != Command::Barrier || !message.meta.request {
            continue;
        }
        let group = control.barrier_group.unwrap_or(0);
        let group_members = members(group, &registered);
        if !group_members.contains(&message.sender) {
            log::warn!(
                "pslite scheduler: {} entered the barrier of group {group}, which it is not in",
                node_name(message.sender)
            );
            continue;
        }
        let (ids, _) = entered
            .entry(group)
            .or_insert_with(|| (Vec::new(), Instant::now()));
        if !ids.contains(&message.sender) {
            ids.push(message.sender);
        }
        if ids.len() < group_members.len() {
            continue;
        }
        entered.remove(&group);
        // Every member is released, even past one whose link broke (each failure named).
        let mut unreleased = Vec::new();
        for id in group_members {
            let mut release = Control::new(Command::Barrier);
            release.barrier_group = Some(group);
            let meta = Meta {
                control: Some(release),
                request: false,
                app_id: message.meta.app_id,
                customer_id: message.meta.customer_id,
                timestamp: Some(van.new_timestamp()),
                ..Meta::default()
            };
            if let Err(e) = van.send(id, &meta, &[]) {
                unreleased.push(format!("{}: {e}", node_name(id)));
            }
        }
        if !unreleased.is_empty() {
            return Err(VanError(format!(
                "the barrier of group {group} could not be released to {}",
                unreleased.join("; ")
            )));
        }
        if group == EVERYONE {
            everyone_met += 1;
        }
    }
    van.close();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_groups_name_their_members() {
        let mut nodes = vec![
            NodeRecord::new(Role::Server, "a", 1),
            NodeRecord::new(Role::Worker, "b", 2),
            NodeRecord::new(Role::Worker, "c", 3),
        ];
        for (node, id) in nodes.iter_mut().zip([8, 9, 11]) {
            node.id = id;
        }
        assert_eq!(members(EVERYONE, &nodes), vec![8, 9, 11]);
        assert_eq!(members(WORKER_GROUP, &nodes), vec![9, 11]);
        assert_eq!(members(SERVER_GROUP + 1, &nodes), vec![8]);
    }
}
