//! # kvstore-dist: the distributed stores (not built yet)
//!
//! This crate will hold MXNet's parameter-server stores `dist_sync`, `dist_async` and
//! `dist_device_sync`: a scheduler, servers and workers configured by MXNet's `DMLC_*`
//! variables, talking over a TCP transport with timeouts on every wait, servers that rebuild
//! optimizers from their serialisable description (never from code received on the network).
//!
//! It registers nothing yet.
#![deny(missing_docs)]
