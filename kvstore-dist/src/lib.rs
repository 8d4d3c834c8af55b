//! # kvstore-dist: the distributed stores — configuration and transport so far
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
//!
//! ## What does not exist yet
//!
//! **No store is registered**: `create("dist_sync")` (and `dist_async`, `dist_device_sync`)
//! fails with `UnknownStore` when only this crate is linked. Still to come: the scheduler
//! (node registration, ids, barriers), MXNet's key placement over servers, the server's
//! merge/update logic for sync and async modes, the worker store (`KVStoreBase` impl), heartbeats,
//! gradient compression on the wire, and multi-process tests.
#![deny(missing_docs)]

pub mod config;
pub mod transport;

pub use config::{ConfigError, DistConfig, DistFile, Role};
pub use transport::{TransportConfig, TransportError};
