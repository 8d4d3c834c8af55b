//! # kvstore-byteps: the `byteps` store (not built yet)
//!
//! This crate will hold a store built on BytePS's design: servers that only sum, optimizers
//! run by the workers, tensors cut into partitions (4,096,000 bytes by default) spread over
//! the servers and sent in priority order with credit-based flow control.
//!
//! It registers nothing yet.
#![deny(missing_docs)]
