//! Who the server's workers are: hellos (and takeovers by a worker in a lost worker's place),
//! goodbyes, lost connections, the end of the job, and the rounds a lost worker fails.
//!
//! Loss handling and takeovers hold `membership` throughout, so that neither sees the other
//! half done; it is taken before any other lock of the server.

use crate::transport::ConnectionId;
use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use super::{fail_round, lock, Core};
use crate::cluster::{node_id, Group};
use crate::config::Role;
use crate::node::DeadNodeQuery;
use crate::protocol::{self, Mode};
use crate::transport::{Outgoing, Request, Responder};

/// What the server knows of the workers.
#[derive(Debug, Default)]
pub(super) struct Workers {
    /// Rank of each connected worker, by its connection's address.
    pub(super) by_peer: HashMap<ConnectionId, u32>,
    /// Ranks that said hello.
    pub(super) hello: Vec<bool>,
    /// Ranks that said goodbye.
    pub(super) bye: Vec<bool>,
    /// Ranks that vanished without a goodbye, with the reason.
    pub(super) dead: Vec<Option<String>>,
    /// Connections whose rank a recovering worker took over, with what to tell them.
    pub(super) evicted: HashMap<ConnectionId, String>,
    /// When a worker was last lost (its connection closed without a goodbye): the server
    /// waits the timeout from then for a worker taking its place before it finishes.
    pub(super) last_loss: Option<Instant>,
    /// The merge mode, set by the first hello.
    pub(super) mode: Option<Mode>,
    /// Set by `kStopServer`.
    pub(super) stopped: bool,
    /// Goodbyes recorded whose answers are still being written: the server does not finish
    /// (and close its connections) before the last worker has its answer.
    pub(super) answering_byes: usize,
}

impl Workers {
    /// Whether worker `rank` said goodbye (and was not lost before).
    pub(super) fn left(&self, rank: usize) -> bool {
        self.dead[rank].is_none() && self.bye[rank]
    }

    /// Why worker `rank` can take no part in a round any more, if it cannot.
    pub(super) fn gone(&self, rank: usize) -> Option<String> {
        match &self.dead[rank] {
            Some(why) => Some(format!("is gone ({why})")),
            None if self.bye[rank] => Some("has left the job (said goodbye)".to_string()),
            None => None,
        }
    }

    /// The connection holding worker `rank`, if any.
    fn peer_of(&self, rank: u32) -> Option<ConnectionId> {
        self.by_peer
            .iter()
            .find_map(|(peer, &r)| (r == rank).then_some(*peer))
    }

    /// Takes the rank away from connection `peer`, whose requests are refused from now on
    /// with `why`.
    fn evict(&mut self, peer: ConnectionId, why: String) {
        self.by_peer.remove(&peer);
        self.evicted.insert(peer, why);
    }

    /// Records that worker `rank` is lost (`why`): no round completes without it until a
    /// worker takes its place, which the server then waits for before it finishes.
    fn mark_lost(&mut self, rank: u32, why: &str) {
        self.dead[rank as usize] = Some(why.to_string());
        self.last_loss = Some(Instant::now());
    }

    fn finished(&self) -> bool {
        self.answering_byes == 0
            && (self.stopped || (0..self.bye.len()).all(|r| self.bye[r] || self.dead[r].is_some()))
    }
}

impl Core {
    /// Blocks until the job is over (every worker said goodbye or is gone, or `kStopServer`),
    /// treating workers that have not said hello within the timeout as gone; after a worker
    /// was lost, a timeout longer, for a worker taking its place. Returns the workers that
    /// were lost.
    pub(crate) fn wait_finished(&self) -> Vec<String> {
        let hello_deadline = Instant::now() + self.timeout;
        let mut w = lock(&self.workers);
        loop {
            if w.finished() {
                // A worker lost lately may still be replaced (a recovery node): while a rank is
                // gone and not stopped, wait for one until the timeout after the last loss.
                let window = w
                    .last_loss
                    .map(|t| t + self.timeout)
                    .filter(|_| !w.stopped && w.dead.iter().any(Option::is_some));
                match window {
                    Some(end) if end > Instant::now() => {
                        let left = end - Instant::now();
                        w = self
                            .finished
                            .wait_timeout(w, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                        continue;
                    }
                    _ => break,
                }
            }
            let now = Instant::now();
            if now >= hello_deadline {
                let never = |w: &Workers| -> Vec<u32> {
                    (0..self.num_workers)
                        .filter(|&r| !w.hello[r as usize] && w.dead[r as usize].is_none())
                        .collect()
                };
                if !never(&w).is_empty() {
                    drop(w);
                    let membership = lock(&self.membership);
                    let mut marked = Vec::new();
                    {
                        let mut w = lock(&self.workers);
                        for r in never(&w) {
                            let why = format!(
                                "never connected to server {} within {:?}",
                                self.rank, self.timeout
                            );
                            w.mark_lost(r, &why);
                            marked.push((r, why));
                        }
                    }
                    for (r, why) in marked {
                        self.fail_rounds_of(r, &format!("is gone ({why})"), false);
                    }
                    drop(membership);
                    w = lock(&self.workers);
                    continue;
                }
                w = self.finished.wait(w).unwrap_or_else(|e| e.into_inner());
            } else {
                w = self
                    .finished
                    .wait_timeout(w, hello_deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        (0..self.num_workers as usize)
            .filter_map(|r| {
                w.dead[r]
                    .as_ref()
                    .map(|why| format!("{} ({why})", self.worker_name(r as u32)))
            })
            .collect()
    }

    /// Fails every round in progress, and rank 0's pending inits, because worker `rank` is
    /// gone (`why`: `is gone (...)`, `has left the job ...`); with `left`, a worker that said
    /// goodbye, the rounds it pushed in are kept. Called holding `membership`.
    fn fail_rounds_of(&self, rank: u32, why: &str, left: bool) {
        // Before any entry is visited: a push that checked for gone workers before this loss
        // sees the count changed at its entry (see `losses`).
        self.losses.fetch_add(1, SeqCst);
        for ((_, part), entry) in self.entry_list() {
            let mut e = lock(&entry);
            let what = self.describe(&e.key, part);
            // A round the lost worker pushed in fails too: its push belongs to a step it never
            // finished, and must not be summed with a step that a worker taking its place
            // (a recovery node) or a retrying worker makes.
            if e.round_started.is_some() && !(left && e.pushed[rank as usize]) {
                let msg = format!(
                    "the sync round of {what} on server {} cannot complete: {} {why}",
                    self.rank,
                    self.worker_name(rank)
                );
                fail_round(&mut e, &msg, true);
            }
            if rank == 0 && !e.init_waiters.is_empty() {
                let msg = format!(
                    "the init of {what} on server {} cannot complete: {} {why} before \
                     sending its value",
                    self.rank,
                    self.worker_name(0)
                );
                for w in e.init_waiters.drain(..) {
                    w.answer.fail(&msg);
                }
            }
        }
    }

    /// The rank a pull's connection holds: `None` for a connection that never said hello (the
    /// value is answered as it is); an error for one evicted (a recovering worker took its
    /// place, or the scheduler declared it lost), whose requests are refused from then on.
    pub(super) fn puller(&self, request: &Request) -> Result<Option<u32>, String> {
        match self.sender(request) {
            Ok((rank, _)) => Ok(Some(rank)),
            Err(why)
                if lock(&self.workers)
                    .evicted
                    .contains_key(&request.connection) =>
            {
                Err(why)
            }
            Err(_) => Ok(None),
        }
    }

    pub(super) fn sender_rank(&self, request: &Request) -> Result<u32, String> {
        self.sender(request).map(|(rank, _)| rank)
    }

    /// The rank of a request's connection and that rank's generation (see `generations`).
    pub(super) fn sender(&self, request: &Request) -> Result<(u32, u64), String> {
        let w = lock(&self.workers);
        match w.by_peer.get(&request.connection) {
            Some(&rank) => Ok((rank, self.generations[rank as usize].load(SeqCst))),
            None => Err(match w.evicted.get(&request.connection) {
                Some(why) => format!("{}: {why}", request.connection),
                None => format!("{} has not said hello", request.connection),
            }),
        }
    }

    pub(super) fn mode(&self) -> Mode {
        lock(&self.workers).mode.unwrap_or(Mode::Async)
    }

    pub(super) fn hello(&self, request: &Request, responder: Responder) {
        let answer = match self.take_rank(request) {
            Ok(()) => responder.respond(Outgoing::new(0, &[]).aux(u64::from(self.rank))),
            Err(e) => responder.respond_error(&e),
        };
        if let Err(e) = answer {
            log::warn!(
                "kvstore-dist: server {}: cannot answer a hello: {e}",
                self.rank
            );
        }
    }

    /// Gives the hello's connection its rank. With [`protocol::FLAG_RECOVERING`] (a worker the
    /// scheduler placed in a lost worker's stead) it takes the rank over: from a connection
    /// still open (the lost worker's, whose close this server has not seen: its rounds fail and
    /// its requests are refused from now on) or from a worker already gone; the failures
    /// remembered for the lost worker are forgotten. A plain hello for a rank that is taken or
    /// gone is refused.
    fn take_rank(&self, request: &Request) -> Result<(), String> {
        let rank = request.header.key;
        let mode = protocol::Mode::from_code(request.header.aux)
            .ok_or_else(|| format!("unknown mode code {}", request.header.aux))?;
        if rank >= u64::from(self.num_workers) {
            return Err(format!(
                "worker rank {rank} is out of range: the job has {} workers",
                self.num_workers
            ));
        }
        let (r, rank) = (rank as usize, rank as u32);
        let recovering = request.header.flags & protocol::FLAG_RECOVERING != 0;
        let _membership = lock(&self.membership);
        let mut w = lock(&self.workers);
        // The mode is the first accepted hello's: a refused one fixes nothing.
        if let Some(m) = w.mode.filter(|&m| m != mode) {
            return Err(format!(
                "worker rank {rank} runs {mode} mode but server {} already serves {m} mode \
                 (every worker must create the same dist store type)",
                self.rank
            ));
        }
        if w.bye[r] {
            return Err(format!(
                "worker rank {rank} has left the job (said goodbye): its place cannot be taken"
            ));
        }
        let open = w.peer_of(rank);
        if !recovering {
            if let Some(peer) = open {
                return Err(format!(
                    "worker rank {rank} is already connected to server {} from {peer}",
                    self.rank
                ));
            }
            if let Some(why) = &w.dead[r] {
                return Err(format!(
                    "worker rank {rank} is gone ({why}); a worker taking its place must join \
                     as a recovery node"
                ));
            }
            w.by_peer.insert(request.connection, rank);
            w.hello[r] = true;
            w.mode = Some(mode);
            return Ok(());
        }
        let lost = match open {
            Some(peer) => {
                w.evict(
                    peer,
                    format!(
                        "worker rank {rank}'s place was taken by a recovering worker at {}",
                        request.connection
                    ),
                );
                Some(format!(
                    "is gone (a recovering worker at {} took its place)",
                    request.connection
                ))
            }
            None => w.dead[r].take().map(|why| format!("is gone ({why})")),
        };
        w.by_peer.insert(request.connection, rank);
        w.hello[r] = true;
        w.mode = Some(mode);
        // Pushes of the evicted connection already read are refused at their entry.
        self.generations[r].fetch_add(1, SeqCst);
        drop(w);
        if let Some(peer) = open {
            lock(&self.regions).remove(&peer);
        }
        if let Some(why) = &lost {
            if open.is_some() {
                self.fail_rounds_of(rank, why, false);
            }
            log::warn!(
                "kvstore-dist: server {}: a recovering worker at {} takes the place of {}, which {why}",
                self.rank,
                request.connection,
                self.worker_name(rank)
            );
        }
        lock(&self.worker_names)[r] = format!(
            "worker rank {rank} (id {}) connected from {}",
            node_id(Role::Worker, rank),
            request.connection
        );
        // The failures remembered for the lost worker are not the newcomer's.
        for (_, entry) in self.entry_list() {
            let mut e = lock(&entry);
            e.failed[r] = None;
            e.merged_seq[r] = 0;
        }
        Ok(())
    }

    /// A worker leaves: recorded, its rounds failed, then answered; only then may the server
    /// finish, so that the last worker's goodbye is answered before the connections close.
    pub(super) fn bye(&self, request: &Request, responder: Responder) {
        // Requests still using the region hold it; it is unmapped after the last.
        lock(&self.regions).remove(&request.connection);
        let rank = match self.sender_rank(request) {
            Ok(rank) => rank,
            Err(e) => {
                let _ = responder.respond_error(&e);
                return;
            }
        };
        {
            let _membership = lock(&self.membership);
            {
                let mut w = lock(&self.workers);
                w.bye[rank as usize] = true;
                w.answering_byes += 1;
            }
            // Rounds in progress that it did not push in can never complete: fail them now,
            // naming it. Those it pushed in complete with the others' pushes: its step was
            // done (MXNet's workers meet in a barrier before leaving, to the same end).
            self.fail_rounds_of(rank, "has left the job (said goodbye)", true);
        }
        let _ = responder.respond(Outgoing::new(0, &[]));
        let mut w = lock(&self.workers);
        w.answering_byes -= 1;
        if w.finished() {
            self.finished.notify_all();
        }
    }

    /// Treats as lost the workers the scheduler lost (missed heartbeats) whose connection this
    /// server still holds: a frozen process, or a machine cut off without its connections
    /// closing, would otherwise keep this server's rounds, and its end, waiting on them.
    /// Called periodically; a scheduler that does not answer teaches nothing this time.
    pub(crate) fn lose_workers_the_scheduler_lost(&self, query: &DeadNodeQuery) {
        let connected: Vec<(u32, u64)> = {
            let w = lock(&self.workers);
            w.by_peer
                .values()
                .map(|&r| (r, self.generations[r as usize].load(SeqCst)))
                .collect()
        };
        if connected.is_empty() {
            return;
        }
        // Silent for ever so long counts as lost only when the scheduler says so.
        let dead = match query.dead_nodes(Group::Workers.ps_id(), Duration::MAX) {
            Ok(dead) => dead,
            Err(e) => {
                log::debug!("kvstore-dist: server {}: {e}", self.rank);
                return;
            }
        };
        for (id, description) in dead {
            let held = connected
                .iter()
                .find(|&&(rank, _)| node_id(Role::Worker, rank) == id);
            if let Some(&(rank, generation)) = held {
                self.lose_connected(rank, generation, &description);
            }
        }
    }

    /// Loses worker `rank`, still connected with its rank's `generation` (unless a recovering
    /// worker took it over since), because the scheduler lost it (`description`).
    fn lose_connected(&self, rank: u32, generation: u64, description: &str) {
        let _membership = lock(&self.membership);
        let (peer, why) = {
            let mut w = lock(&self.workers);
            if self.generations[rank as usize].load(SeqCst) != generation {
                return;
            }
            let Some(peer) = w.peer_of(rank) else {
                return;
            };
            w.evict(
                peer,
                format!("worker rank {rank} was declared lost by the scheduler ({description})"),
            );
            let why = format!("the scheduler declared it lost: {description}");
            w.mark_lost(rank, &why);
            self.finished.notify_all();
            (peer, why)
        };
        lock(&self.regions).remove(&peer);
        self.fail_lost(rank, &why);
    }

    /// Logs the loss of worker `rank` (`why`) and fails its rounds. Called holding
    /// `membership`, right after the loss was recorded.
    fn fail_lost(&self, rank: u32, why: &str) {
        log::warn!(
            "kvstore-dist: server {}: {} is lost: {why}",
            self.rank,
            self.worker_name(rank)
        );
        self.fail_rounds_of(rank, &format!("is gone ({why})"), false);
    }

    /// A worker connection closed: without a goodbye, its worker is lost (its rounds fail,
    /// naming it); marking it gone and failing its rounds happen as one against a takeover.
    pub(super) fn lost_connection(&self, peer: ConnectionId) {
        lock(&self.regions).remove(&peer);
        let _membership = lock(&self.membership);
        let (rank, why) = {
            let mut w = lock(&self.workers);
            w.evicted.remove(&peer);
            let Some(rank) = w.by_peer.remove(&peer) else {
                return;
            };
            if w.bye[rank as usize] {
                return;
            }
            let why = format!("its connection from {peer} closed without a goodbye");
            w.mark_lost(rank, &why);
            self.finished.notify_all();
            (rank, why)
        };
        self.fail_lost(rank, &why);
    }
}
