//! # kvstore-device: the `device` and `nccl` stores (not built yet)
//!
//! This crate will hold MXNet's `device` store (values reduced on the GPU that holds each
//! key's merge buffer, optimizer run there with CUDA kernels) and its `nccl` store (NCCL
//! all-reduce and broadcast across the visible GPUs), on `cudarc` with dynamic loading, so
//! that it builds and tests on machines without CUDA and reports GPU tests as ignored there.
//!
//! It registers nothing yet.
#![deny(missing_docs)]
