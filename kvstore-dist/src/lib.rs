//! # kvstore-dist: the distributed stores — configuration, transport and cluster membership so far
//!
//! This crate will hold MXNet's parameter-server stores `dist_sync`, `dist_async` and
//! `dist_device_sync`: a scheduler, servers and workers configured by MXNet's `DMLC_*`
//! variables, talking over a TCP transport with timeouts on every wait, servers that rebuild
//! optimizers from their serialisable description (never from code received on the network).
//!
//! ## What exists now
//!
//! - [`config`]: [`DistConfig`], the cluster configuration read from MXNet's / ps-lite's
//!   environment variables (`DMLC_ROLE`, `DMLC_PS_ROOT_URI`, `DMLC_PS_ROOT_PORT`,
//!   `DMLC_NUM_SERVER`, `DMLC_NUM_WORKER`, `DMLC_NODE_HOST`, `DMLC_INTERFACE`, `PORT`,
//!   `PS_VERBOSE`, `PS_HEARTBEAT_*`, `MXNET_KVSTORE_BIGARRAY_BOUND`, `KVSTORE_TIMEOUT_SECS`,
//!   `KVSTORE_MAX_MESSAGE_BYTES`) over the `[dist]` table of `kvstore.toml`; the environment
//!   wins.
//! - [`transport`]: a TCP transport on std threads and blocking sockets — a 48-byte
//!   little-endian frame header with 64-bit payload lengths, zero-copy vectored sends, many
//!   requests in flight per [`Connection`](transport::Connection) answered by id, a
//!   [`Server`](transport::Server) with a handler callback, a timeout on every wait and errors
//!   naming the peer and the request.
//! - [`cluster`]: what the scheduler and nodes share — ps-lite's node ids (scheduler 1, server
//!   `8 + 2r`, worker `9 + 2r`), the rank rule (dense per role, ascending `(host, port)` of the
//!   advertised addresses), barrier [`Group`]s, the node table ([`NodeInfo`]),
//!   [`ClusterError`] (converts into `kvstore_base::Error::Backend`) and the control protocol.
//! - [`scheduler`]: the [`Scheduler`] role — registration of `DMLC_NUM_SERVER` servers and
//!   `DMLC_NUM_WORKER` workers with a timeout naming how many of which role are missing, rank
//!   assignment and the node table sent to everyone, barriers per group that fail after the
//!   timeout naming the nodes that did not enter, liveness (heartbeats, dropped connections)
//!   that fails every pending and later barrier naming the lost node (role, rank, id, address),
//!   and shutdown once every node said goodbye or on [`SchedulerHandle::shutdown`].
//! - [`node`]: the server/worker side — [`Node::join`] (binds the address it advertises,
//!   connects with retries until the timeout since the scheduler may start later, registers,
//!   gets its rank and the node table), [`Node::barrier`], a background heartbeat
//!   (`PS_HEARTBEAT_INTERVAL`; unlike ps-lite it is on by default, see
//!   [`cluster::heartbeat_settings`]), [`Node::leave`] / drop saying goodbye.
//! - [`placement`]: MXNet's key placement — a value below `MXNET_KVSTORE_BIGARRAY_BOUND`
//!   elements on the server `(key * 9973) mod servers` (in wide arithmetic: MXNet's 32-bit
//!   product overflows above key 215329), a bigger one split evenly across all servers.
//!
//! ## What does not exist yet
//!
//! **No store is registered**: `create("dist_sync")` (and `dist_async`, `dist_device_sync`)
//! fails with `UnknownStore` when only this crate is linked. Still to come: node-to-node connections (servers do not serve yet; a node only
//! holds its listening socket, [`Node::take_listener`]), the server's merge/update logic for
//! sync and async modes, the worker store (`KVStoreBase` impl, with its start-up all-node
//! barrier), `get_num_dead_node`, recovery nodes (a late registration is refused),
//! `DMLC_INTERFACE` lookup (the address routed to the scheduler is used instead), gradient
//! compression on the wire, and multi-process tests (the cluster tests run threads of one
//! process over real sockets).
#![deny(missing_docs)]

pub mod cluster;
pub mod config;
mod local_cluster;
pub mod node;
pub mod placement;
pub mod protocol;
pub mod scheduler;
pub mod server;
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
    Capability::InitPushPull,
    Capability::RowSparse,
    Capability::Distributed,
];

fn create_sync(request: &CreateRequest) -> kvstore_base::Result<Box<dyn KVStoreBase>> {
    DistStore::from_request(request, Mode::Sync)
}

fn create_async(request: &CreateRequest) -> kvstore_base::Result<Box<dyn KVStoreBase>> {
    DistStore::from_request(request, Mode::Async)
}

kvstore_base::register!(
    "dist_sync",
    create_sync,
    aliases = ["dist"],
    capabilities = [
        Capability::Optimizer,
        Capability::InitPushPull,
        Capability::RowSparse,
        Capability::Distributed
    ]
);

kvstore_base::register!(
    "dist_device_sync",
    create_sync,
    aliases = ["dist_sync_device"],
    capabilities = [
        Capability::Optimizer,
        Capability::InitPushPull,
        Capability::RowSparse,
        Capability::Distributed
    ]
);

kvstore_base::register!(
    "dist_async",
    create_async,
    aliases = ["dist_async_device"],
    capabilities = [
        Capability::Optimizer,
        Capability::InitPushPull,
        Capability::RowSparse,
        Capability::Distributed
    ]
);
