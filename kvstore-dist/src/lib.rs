//! # kvstore-dist: MXNet's parameter-server stores `dist_sync`, `dist_async`, `dist_device_sync`
//!
//! A scheduler, servers and workers configured by MXNet's `DMLC_*` variables (so a job set up
//! for MXNet's launcher runs unchanged), talking over a TCP transport with a timeout on every
//! wait; servers rebuild optimizers from their serialisable description, never from code
//! received on the network.
//!
//! ```no_run
//! use kvstore_base::{create, DType, KVStoreExt, NDArray};
//! use kvstore_dist as _; // links the crate, whose registrations provide the dist stores
//!
//! // DMLC_ROLE=worker DMLC_PS_ROOT_URI=... DMLC_PS_ROOT_PORT=... DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2
//! let kv = create("dist_sync")?; // blocks until every node has joined
//! kv.init(3, &NDArray::zeros(&[2, 3], DType::F32))?; // rank 0's value is kept
//! kv.push(3, &NDArray::ones(&[2, 3], DType::F32))?; // returns once the servers merged it
//! let mut w = NDArray::zeros(&[2, 3], DType::F32);
//! kv.pull(3, &mut w)?; // the sum of this round: 2.0 everywhere with 2 workers
//! # Ok::<(), kvstore_base::Error>(())
//! ```
//!
//! ## Stores
//!
//! | name (aliases) | servers merge |
//! |---|---|
//! | `dist_sync` (`dist`) | one push per worker per round, then the optimizer (or the sum is stored) |
//! | `dist_device_sync` (`dist_sync_device`) | as `dist_sync`; a worker sums its per-device values in GPU memory on a GPU first |
//! | `dist_async` (`dist_async_device`, `dist_device_async`) | each push as it arrives (through the optimizer; without one it replaces the value) |
//!
//! Every worker sums a key's values (one per device) before sending one array, in MXNet's
//! association order (its CPU reduction's, as `local`). A store created by a name holding
//! `device` (`dist_device_sync`, `dist_sync_device`, `dist_async_device`, `dist_device_async`:
//! MXNet's rule for its
//! device communicator) takes arrays in GPU memory as they are: a key's GPU values are summed
//! on a GPU by the linked device backend (`kvstore-device`), so one array per key crosses to
//! the host, and a pulled key is copied to one GPU output and from there to the others, GPU
//! to GPU. The other stores stage GPU arrays through the host, one copy per array.
//!
//! A process whose `DMLC_ROLE` is `server` or `scheduler` that creates one of these stores runs
//! that role and exits when the job ends, as MXNet does on import (see
//! [`DistStore::from_request`]); `kvstore server` and `kvstore scheduler` run the roles
//! directly, and `kvstore launch` starts a whole job on one machine.
//!
//! ## Modules
//!
//! - [`config`]: [`DistConfig`] from MXNet's / ps-lite's variables over the `[dist]` table of
//!   `kvstore.toml` (`KVSTORE_CONFIG`); the environment wins.
//! - [`transport`]: TCP on std threads and blocking sockets — a 48-byte little-endian frame
//!   header with 64-bit payload lengths, zero-copy vectored sends, many requests in flight per
//!   [`Connection`](transport::Connection) answered by id, a timeout on every wait, errors
//!   naming the peer and the request.
//! - [`protocol`]: the worker-server messages on top (init, push, pull, pushpull, row-sparse
//!   pull, batches of small parts, optimizer spec, commands, goodbye).
//! - [`cluster`], [`scheduler`], [`node`]: ps-lite's node ids and ranks, registration,
//!   barriers, heartbeats and liveness; every wait bounded, lost nodes named.
//! - [`placement`]: MXNet's key placement (hash of the key for small values, an even split
//!   across all servers at or above `MXNET_KVSTORE_BIGARRAY_BOUND` elements, between rows for
//!   row-sparse keys and, where that keeps the balance, dense ones).
//! - [`server`]: [`ParamServer`], the server role.
//! - [`shm`]: same-host shared-memory regions between a worker and a server; [`shm::Link`]
//!   and [`shm::Lease`] let another worker store move big messages through them.
//! - [`worker`]: [`DistStore`], the worker side, registered as the stores above.
//! - [`LocalCluster`]: a scheduler and servers on threads of this process, for tests and
//!   single-machine experiments.
//!
//! ## Gradient compression
//!
//! `set_gradient_compression({"type": "2bit" | "1bit", "threshold": t})` on every worker (as in
//! MXNet): each worker quantises its pushes with `kvstore-compression`'s codec against a
//! residual kept per key (a worker's device values are summed first), rank 0 tells the servers,
//! which dequantise every push before merging; init and pull are not compressed. A push then
//! costs 16x (2-bit) or 32x (1-bit) fewer bytes on the wire ([`DistStore::bytes_sent`]).
//! Unlike MXNet, compression may be set after `init` (parts are quantised one by one) and
//! `pushpull` works with it; float16 values go through float32; row-sparse values and other
//! dtypes are refused. A new setting keeps the residuals, as MXNet does. A push that fails
//! (a server refused it because a worker is gone, a lost server, a timeout) is taken back out
//! of its keys' residuals (`Codec::unquantize`: the codes added back, the gradient taken out,
//! exact to within rounding), so the step retried (as after a worker was replaced) counts its
//! gradient once; MXNet updates the residual before the push goes out, and a retried push
//! would count the failed attempt's remainder as well. The whole call is taken back, every
//! part of every key, even a part one server acknowledged before another failed: the retry
//! quantises the same gradient against the same residual, so it sends that part the same
//! codes, which the server does not merge twice (see "Retried pushes" below). A push
//! acknowledged in full counts as delivered: should its round fail later, the next pull
//! reports it and the residual stays updated.
//!
//! ## Retried pushes
//!
//! Each push carries the worker's step number of the key. A push call that fails may have
//! been merged by some servers and refused by others (a worker taking a lost one's place had
//! not said its hello to all of them yet, a timeout on one server): the next push of the key
//! is taken as the retry of that step and carries its number, unless the key was pulled in
//! between (a loop that gives the step up pulls the weights for its next one), and a server
//! that merged that number already acknowledges it (a pushpull gets that round's result)
//! without merging it again. The parts of a key so stay in the same step on every server. A
//! round that failed forgets the numbers merged in it, so that their retries merge anew. Retry
//! a failed push whole, with the same gradients, as training loops do: a different value
//! would be taken for the parts that were not merged only.
//!
//! ## Recovery nodes
//!
//! A worker process started once the cluster is complete takes the place of a lost worker
//! (ps-lite's recovery node, MXNet's `is_recovery`): the scheduler gives it the lost rank and
//! id (waiting for a loss as long as one can go unnoticed), every server lets it take the rank
//! over, and [`DistStore::is_recovery`] says so. Its `init` keeps the values the servers hold
//! (its declarations must match them); `set_optimizer` (or `kController`) and
//! `set_gradient_compression` keep the servers' optimizer, optimizer states and codec without
//! a barrier (installing them where none is set, refusing a different optimizer or codec),
//! and `load_optimizer_states` keeps the servers' states: the program simply starts again and
//! rejoins the others. A late worker
//! with no lost worker to replace is refused once a loss could have been noticed (the
//! heartbeat timeout). Servers wait the timeout after a loss before they finish, so that even
//! a job whose every worker was lost can go on. A worker the scheduler lost (missed
//! heartbeats: a frozen process, a machine cut off) is lost on the servers too, though its
//! connections stay open: they ask the scheduler a few times per timeout. Every round a lost
//! worker was part of fails at once, naming it; the survivors retry their step (see "Retried
//! pushes"). A lost server is not replaced (its values are lost with it): restart the job
//! from an optimizer-state file.
//! [`DistStore::dead_nodes`] names the nodes the scheduler counts as dead (MXNet's
//! `get_num_dead_node` is their count).
//!
//! ## Optimizer states
//!
//! `save_optimizer_states(path, dump_optimizer)` on any worker asks every server for the
//! optimizer states of its slices of the keys and joins them into one file of whole keys, the
//! file `local` writes (MXNet's dist stores cannot: "Cannot save states for distributed
//! training"); call it when no push is in flight (after a barrier): slices of different steps
//! are refused. `load_optimizer_states(path)` is called by every worker, like
//! `set_optimizer`: rank 0 reads the file, checks every key's states and cuts them into the
//! servers' slices (for this job's placement: the file may come from `local` or from a job
//! with another number of servers) and sends them, having recorded on server 0 that load n
//! started and met the others in a barrier (every worker numbers its loads); it then records
//! how the load ended, and the others, waiting for that (up to ten times
//! `KVSTORE_TIMEOUT_SECS`), return it: a failure of rank 0's load is an error on every worker,
//! never another load's outcome, and a load that not every worker makes fails its barrier
//! within the timeout. A load that reached some servers only says which did, did not, or may
//! have. Each server's share travels in one message (`KVSTORE_MAX_MESSAGE_BYTES`).
#![deny(missing_docs)]

pub mod cluster;
pub mod config;
mod local_cluster;
pub mod node;
pub mod placement;
pub mod ports;
pub mod protocol;
pub mod scheduler;
pub mod server;
pub mod shm;
pub mod transport;
pub mod worker;

pub use cluster::{ClusterError, Group, NodeInfo};
pub use config::{ConfigError, DistConfig, DistFile, Role};
pub use local_cluster::LocalCluster;
pub use node::Node;
pub use scheduler::{Scheduler, SchedulerHandle};
pub use server::{run_server, ParamServer};
pub use transport::{TransportConfig, TransportError};
pub use worker::DistStore;

use kvstore_base::{Capability, CreateRequest, KVStoreBase};
use protocol::Mode;

/// The capabilities of every dist store.
const CAPABILITIES: &[Capability] = &[
    Capability::Optimizer,
    Capability::OptimizerStates,
    Capability::InitPushPull,
    Capability::GradientCompression,
    Capability::RowSparse,
    Capability::Distributed,
];

fn create_sync(request: &CreateRequest) -> kvstore_base::Result<Box<dyn KVStoreBase>> {
    DistStore::from_request(request, Mode::Sync)
}

fn create_async(request: &CreateRequest) -> kvstore_base::Result<Box<dyn KVStoreBase>> {
    DistStore::from_request(request, Mode::Async)
}

/// Registers one dist store with the capabilities every dist store has.
macro_rules! register_dist {
    ($name:literal, $factory:ident, $($alias:literal),+) => {
        kvstore_base::register!(
            $name,
            $factory,
            aliases = [$($alias),+],
            capabilities = [
                Capability::Optimizer,
                Capability::OptimizerStates,
                Capability::InitPushPull,
                Capability::GradientCompression,
                Capability::RowSparse,
                Capability::Distributed
            ]
        );
    };
}

register_dist!("dist_sync", create_sync, "dist");
register_dist!("dist_device_sync", create_sync, "dist_sync_device");
register_dist!(
    "dist_async",
    create_async,
    "dist_async_device",
    "dist_device_async"
);
