//! # kvstore-base: the contract of kvstore-rs
//!
//! A parameter store keeps the weights of a model in sync across the devices and machines of
//! data-parallel training: workers *push* gradients, the store sums them (and may run an
//! optimizer on them), and workers *pull* the result. This crate is the contract every such
//! store implements, modelled on Apache MXNet's `mxnet.kvstore`:
//!
//! - [`KVStoreBase`]: the object-safe trait (type, rank, workers, capabilities, broadcast,
//!   pushpull, and optional init/push/pull/optimizer/... that default to
//!   [`Error::Unsupported`]).
//! - [`KVStoreExt`]: MXNet's calling forms over any store: `kv.push(3, &grad)`,
//!   `kv.push("w", &[g0, g1])` (one value per device), `kv.pull(&[1, 2], &mut outs)`.
//! - [`NDArray`]: values with a dtype, shape, context and storage type, on `ndarray`.
//! - [`create`] and [`register!`]: stores register themselves by name from their own crates;
//!   `create("name")` finds them at run time, case-insensitively.
//!
//! - [`plugin`]: stores in shared libraries, behind a stable C ABI: `export_plugin!` in a
//!   Rust `cdylib`, a C header for C and C++, and `load_plugin` / `KVSTORE_PLUGIN_PATH` to
//!   load them.
//!
//! The trait is synchronous and object-safe so that one `Box<dyn KVStoreBase>` can stand for
//! any backend, chosen by a string in a config file, as in MXNet. Registration is static
//! (`inventory`) so linking a backend crate is all it takes, with a runtime registry on top
//! for stores that appear while the program runs (plugins, tests).
//!
//! ```
//! use kvstore_base::{create, DType, KVStoreExt, NDArray};
//! # fn main() -> Result<(), kvstore_base::Error> {
//! # kvstore_base::register_runtime("sumstore", "doc", Some(&[]), |_| Ok(Box::new(Sum)));
//!
//! let kv = create("SumStore")?;
//! let per_device = [NDArray::full(&[3], 1.0, DType::F32), NDArray::full(&[3], 2.0, DType::F32)];
//! let mut out = NDArray::zeros(&[3], DType::F32);
//! kv.pushpull("weight", &per_device, &mut out)?;
//! assert_eq!(out.to_vec::<f32>()?, vec![3.0; 3]);
//! # Ok(()) }
//! # #[derive(Debug)] struct Sum;
//! # impl kvstore_base::KVStoreBase for Sum {
//! #   fn type_name(&self) -> &str { "sumstore" }
//! #   fn rank(&self) -> usize { 0 }
//! #   fn num_workers(&self) -> usize { 1 }
//! #   fn is_capable(&self, _: kvstore_base::Capability) -> bool { false }
//! #   fn broadcast_batch(&self, _: &kvstore_base::KeyedValues<'_>, _: &mut kvstore_base::KeyedOuts<'_>, _: i32) -> kvstore_base::Result<()> { Ok(()) }
//! #   fn pushpull_batch(&self, v: &kvstore_base::KeyedValues<'_>, o: &mut kvstore_base::KeyedOuts<'_>, _: i32) -> kvstore_base::Result<()> {
//! #     let mut sum = NDArray::zeros(v.values()[0].shape(), v.values()[0].dtype());
//! #     for x in v.values() { sum.add_assign(x)?; }
//! #     for out in o.outs_mut() { out.assign(&sum)?; }
//! #     Ok(())
//! #   }
//! # }
//! ```
#![deny(missing_docs)]

mod array;
mod batch;
mod capability;
mod dtype;
mod error;
mod ext;
mod gate;
mod key;
mod optimizer_spec;
pub mod plugin;
mod registry;
mod staging;
mod store;

pub use array::{
    advise_huge_pages, device_backend, device_backends, Context, DeviceBackend,
    DeviceBackendRegistration, DeviceMemory, DeviceRowSparseMemory, HostArray, HostElement,
    NDArray, RowSparse, StorageType, ADVISED_FROM,
};
pub use batch::{KeyGroup, KeyedOuts, KeyedValues};
pub use capability::Capability;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use ext::{Arrays, KVStoreExt, Outs, Values};
pub use gate::{GatePass, PriorityGate};
pub use key::{Key, KeyTypeGuard, Keys};
pub use optimizer_spec::{OptimizerSpec, ParamValue};
pub use registry::{
    create, create_default, create_with, register_runtime, registered, registered_names,
    unregister_runtime, CreateRequest, Registration, StoreFactory, StoreInfo,
};
pub use staging::{
    with_arrays_on_host, with_in_place_sums_on_host, with_outs_fanned_out, with_outs_on_host,
    with_values_on_host, with_values_summed_on_host, with_written_outs_on_host, HostSums,
};
pub use store::{CompressionParams, KVStoreBase, Updater};

/// Re-exports used by [`register!`]; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use inventory;
}

/// The names most programs need: `use kvstore_base::prelude::*;`.
pub mod prelude {
    pub use crate::{
        create, Capability, Context, DType, KVStoreBase, KVStoreExt, Key, NDArray, Result,
    };
}
