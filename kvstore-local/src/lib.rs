//! # kvstore-local: the `local` store (not built yet)
//!
//! This crate will hold MXNet's `local` store (`KVStoreLocal` with `CommCPU`): values pushed
//! from several devices are summed on the CPU, an optimizer or updater is applied to the stored
//! value (or the sum replaces it), and pulls broadcast the result to every output. It will be
//! registered as `local`, with MXNet's aliases `local_update_cpu` and `local_allreduce_cpu`,
//! and become the store `create_default()` returns.
//!
//! It registers nothing yet: `create("local")` is an unknown-store error until it does.
#![deny(missing_docs)]
