//! The server role: holds its share of the keys, merges pushes, runs the optimizer.
//!
//! A server joins the cluster ([`Node::join`]), then serves the workers on the address it
//! advertised. Per part of a key (see [`placement`](crate::placement)) it keeps the value
//! (`[rows, row_len]` for a part of whole rows, as declared at init; else 1-D, as MXNet's
//! servers) and:
//!
//! - **init**: every worker declares the part (dtype, length, row length and storage type,
//!   which must agree: a mismatch is an error naming both); rank 0's value is the one kept, and
//!   every worker's init returns once it is in place;
//! - **sync mode** (`dist_sync`, `dist_device_sync`): a round merges exactly one push per
//!   worker (a worker's second push waits for the next round), then runs the optimizer on the
//!   sum, or stores the sum when there is none. A push is acknowledged once merged (so workers
//!   may push keys in different orders), the round's last once the round is updated (so what a
//!   worker reads after every push returned, a state file saved after a barrier, includes it);
//!   a pushpull, and a pull from a worker that pushed in the round, are answered when the round
//!   closes;
//! - **async mode** (`dist_async`): each push is applied by the optimizer as it arrives (with
//!   no optimizer it replaces the value, a round of one push; MXNet's server aborts there);
//! - **pull** from a worker that has not pushed in the current round returns the value at once
//!   (as MXNet).
//!
//! Nothing waits forever: a round (or an init waiting for rank 0) that is not complete within
//! the timeout fails every request waiting on it with an error naming the workers that did not
//! push; a worker whose connection closes fails at once every round in progress (those it
//! pushed in too: its push belongs to a step it never finished), naming it, and one that
//! leaves (goodbye) those it did not push in (its step was done). A worker the scheduler lost
//! (missed heartbeats) while its connection here stays open counts as closed, which the
//! server learns by asking the scheduler a few times per timeout. A worker the scheduler
//! placed in a lost worker's stead takes the rank over with its hello (see [`protocol::FLAG_RECOVERING`](crate::protocol::FLAG_RECOVERING)). The server
//! stops when every worker has said goodbye or is gone (or on `kStopServer`), and then leaves
//! the cluster; when a worker was lost, it first waits the timeout from that loss for a worker
//! taking its place (so that even a job whose every worker was lost can go on).
//!
//! A worker on the same host may lend a shared-memory region right after its hello (see
//! [`protocol`](crate::protocol#shared-memory-on-one-host)): its big pushes are then read from
//! the region while handled, and answers it asks there are written there before answering.
//! Every slot is checked against the region's size; the region is unmapped once the worker
//! has said goodbye or disconnected and no request is using it.
//!
//! Optimizers arrive as an [`OptimizerSpec`](kvstore_base::OptimizerSpec) (JSON) and are rebuilt
//! from the optimizer registry: nothing received from the network is ever executed.

mod core;
mod merge;
mod reply;

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use self::core::{Core, ServerHandler};
use crate::cluster::ClusterError;
use crate::config::{DistConfig, Role};
use crate::node::Node;
use crate::transport::Server;

/// A running parameter server (see the [module docs](self)).
#[derive(Debug)]
pub struct ParamServer {
    rank: u32,
    node: Option<Node>,
    core: Arc<Core>,
    server: Option<Server>,
    expiry: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").finish_non_exhaustive()
    }
}

impl ParamServer {
    /// Joins the cluster of `config` as a server (whatever `config.role` says) and serves in
    /// background threads.
    ///
    /// # Errors
    /// Joining the cluster failed (see [`Node::join`]), or the server cannot serve on its
    /// address.
    pub fn start(config: &DistConfig) -> Result<ParamServer, ClusterError> {
        let mut config = config.clone();
        config.role = Role::Server;
        let mut node = Node::join(&config)?;
        let workers: Vec<String> = node.workers().map(|w| w.to_string()).collect();
        let core = Arc::new(Core::new(node.rank(), &config, workers));
        let listener = node
            .take_listener()
            .ok_or_else(|| ClusterError::Local("the node's listening socket is gone".into()))?;
        let mut transport = config.transport();
        transport.node_id = node.id();
        let server = Server::from_listener(listener, transport, ServerHandler(Arc::clone(&core)))
            .map_err(|e| ClusterError::Local(format!("cannot serve: {e}")))?;
        let watch = node.dead_node_query().ok();
        let expiry = start_expiry(Arc::clone(&core), config.timeout, watch)?;
        log::info!("kvstore-dist: {} serving", node.info());
        Ok(ParamServer {
            rank: node.rank(),
            node: Some(node),
            core,
            server: Some(server),
            expiry: Some(expiry),
        })
    }

    /// This server's rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Waits until the job ends: every worker has said goodbye or is gone (a worker that does
    /// not connect within the timeout counts as gone), or a worker sent `kStopServer`; while
    /// a lost worker has not been replaced, the timeout after the last loss at least (for a
    /// recovery node). Then stops serving and leaves the cluster.
    ///
    /// # Errors
    /// [`ClusterError::NodesLost`] naming the workers that vanished without a goodbye.
    pub fn wait(mut self) -> Result<(), ClusterError> {
        let lost = self.core.wait_finished();
        self.stop();
        let leave = match self.node.take() {
            Some(node) => node.leave(),
            None => Ok(()),
        };
        if !lost.is_empty() {
            return Err(ClusterError::NodesLost {
                lost: lost.join("; "),
            });
        }
        leave
    }

    fn stop(&mut self) {
        if let Some((stop, thread)) = self.expiry.take() {
            drop(stop);
            let _ = thread.join();
        }
        self.server = None;
    }
}

impl Drop for ParamServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a server until the job ends: [`ParamServer::start`] then [`ParamServer::wait`].
///
/// # Errors
/// As [`ParamServer::start`] and [`ParamServer::wait`].
pub fn run_server(config: &DistConfig) -> Result<(), ClusterError> {
    ParamServer::start(config)?.wait()
}

/// Fails overdue rounds a few times per timeout, and loses the workers the scheduler lost
/// (asking it through `watch`).
fn start_expiry(
    core: Arc<Core>,
    timeout: Duration,
    watch: Option<crate::node::DeadNodeQuery>,
) -> Result<(mpsc::Sender<()>, JoinHandle<()>), ClusterError> {
    let (stop, stopped) = mpsc::channel::<()>();
    let tick = (timeout / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let thread = std::thread::Builder::new()
        .name("kvstore-dist server expiry".into())
        .spawn(move || loop {
            match stopped.recv_timeout(tick) {
                Err(RecvTimeoutError::Timeout) => {
                    core.expire();
                    if let Some(watch) = &watch {
                        core.lose_workers_the_scheduler_lost(watch);
                    }
                }
                _ => return,
            }
        })
        .map_err(|e| ClusterError::Local(format!("cannot start a thread: {e}")))?;
    Ok((stop, thread))
}
