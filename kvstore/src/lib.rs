//! # kvstore: parameter synchronisation for data-parallel training
//!
//! MXNet's KVStore in Rust. Workers push gradients, the store sums them across devices and
//! machines (and may run the optimizer), workers pull the result. This facade re-exports the
//! contract ([`kvstore_base`]) and links the backends chosen by Cargo features, so that
//! [`create`] finds them by name:
//!
//! | feature  | crate            | stores                                         | state        |
//! |----------|------------------|------------------------------------------------|--------------|
//! | `test`   | `kvstore-test`   | `teststore` (MXNet's `TestStore`)              | available    |
//! | `local`  | `kvstore-local`  | `local`                                        | available    |
//! | `device` | `kvstore-device` | `device`, `nccl`                               | host and GPU arrays; checked on an emulated GPU, not yet on a real one |
//! | `dist`   | `kvstore-dist`   | `dist_sync`, `dist_async`, `dist_device_sync`  | available (as [`dist`]) |
//! | `byteps` | `kvstore-byteps` | `byteps`                                       | available    |
//! | `horovod` | `kvstore-horovod` | `horovod`                                     | available    |
//! | `pslite` | `kvstore-pslite` | `pslite_dist_sync`, `pslite_dist_async` (a worker of an MXNet 1.9.1 job) | available |
//!
//! Defaults: `local` and `test`.
//!
//! ```
//! use kvstore::prelude::*;
//!
//! let kv = create("teststore")?;
//! let grads = [NDArray::ones(&[2, 3], DType::F32), NDArray::ones(&[2, 3], DType::F32)];
//! let mut summed = NDArray::zeros(&[2, 3], DType::F32);
//! kv.pushpull(3, &grads, &mut summed)?;
//! assert_eq!(summed.to_vec::<f32>()?, vec![2.0; 6]);
//! # Ok::<(), kvstore::Error>(())
//! ```
#![deny(missing_docs)]

pub use kvstore_base::*;

// Naming each enabled backend crate links it, and linking it is what registers its stores.
#[cfg(feature = "byteps")]
use kvstore_byteps as _;
#[cfg(feature = "device")]
use kvstore_device as _;
/// The distributed stores' crate: cluster roles, [`LocalCluster`](dist::LocalCluster), the
/// launcher's building blocks.
#[cfg(feature = "dist")]
pub use kvstore_dist as dist;
#[cfg(feature = "horovod")]
use kvstore_horovod as _;
#[cfg(feature = "local")]
use kvstore_local as _;
/// MXNet 1.9.1's wire protocol: the `pslite_dist_sync` and `pslite_dist_async` workers, the
/// ps-lite scheduler and server, [`LocalJob`](pslite::LocalJob).
#[cfg(feature = "pslite")]
pub use kvstore_pslite as pslite;
#[cfg(feature = "test")]
use kvstore_test as _;

/// The backends this build links, by Cargo feature name.
pub const LINKED_BACKENDS: &[&str] = &[
    #[cfg(feature = "local")]
    "local",
    #[cfg(feature = "device")]
    "device",
    #[cfg(feature = "dist")]
    "dist",
    #[cfg(feature = "byteps")]
    "byteps",
    #[cfg(feature = "horovod")]
    "horovod",
    #[cfg(feature = "pslite")]
    "pslite",
    #[cfg(feature = "test")]
    "test",
];

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
