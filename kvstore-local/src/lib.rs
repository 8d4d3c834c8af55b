//! # kvstore-local: the `local` store
//!
//! MXNet's `local` store (`KVStoreLocal` with `CommCPU`), the embedded default that
//! [`create_default`](kvstore_base::create_default) returns: values live in this process, the
//! per-device values of a push are summed on the CPU (fused, multi-threaded for big arrays),
//! an optimizer or updater runs on the stored value, and pulls copy the result out.
//!
//! Registered as `local`, with MXNet's aliases `local_update_cpu` and `local_allreduce_cpu`.
//!
//! ```
//! use kvstore_base::{create, DType, KVStoreExt, NDArray};
//! use kvstore_local as _; // linking the crate registers `local`
//!
//! let kv = create("local")?;
//! kv.init("w", &NDArray::ones(&[2], DType::F32))?;
//! // w -= 0.5 * (sum of the per-device gradients)
//! kv.set_updater_fn(|_key, grad, weight| {
//!     let mut step = grad.clone();
//!     step.assign(&NDArray::from_vec(&[2], grad.to_vec::<f32>()?.iter().map(|g| -0.5 * g).collect())?)?;
//!     weight.add_assign(&step)
//! })?;
//! kv.push("w", &[NDArray::ones(&[2], DType::F32), NDArray::ones(&[2], DType::F32)])?;
//! let mut w = NDArray::zeros(&[2], DType::F32);
//! kv.pull("w", &mut w)?;
//! assert_eq!(w.to_vec::<f32>()?, vec![0.0, 0.0]);
//! # Ok::<(), kvstore_base::Error>(())
//! ```
#![deny(missing_docs)]

pub mod reduce;
mod store;

pub use store::{LocalStore, ALIASES, NAME};

use kvstore_base::Capability;

kvstore_base::register!(
    "local",
    LocalStore::from_request,
    aliases = ["local_update_cpu", "local_allreduce_cpu"],
    capabilities = [
        Capability::Optimizer,
        Capability::InitPushPull,
        Capability::Updater,
        Capability::RowSparse,
        Capability::OptimizerStates
    ]
);
