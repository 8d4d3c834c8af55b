//! # kvstore-device: the `device` and `nccl` stores
//!
//! MXNet's `device` store (`KVStoreLocal` with `CommDevice`: per-GPU values summed on the GPU
//! that holds each key's merge buffer, merge buffers placed to balance keys across GPUs, the
//! optimizer run there) and its `nccl` store (`KVStoreNCCL`: `ncclReduce` to one GPU), on
//! [`cudarc`] with dynamic loading: the crate builds, and its tests run, on machines without
//! CUDA; nothing links against CUDA.
//!
//! Registered names: `device` (alias `local_allreduce_device`) and `nccl`.
//!
//! ## What exists
//!
//! - [`probe`]: finds the CUDA driver, the GPUs, NVRTC and NCCL without ever panicking: the
//!   shared libraries are opened with cudarc's fallible loaders (`is_culib_present`) before
//!   any cudarc call that would panic when a library is missing, and the few driver calls
//!   after that run under `catch_unwind`. Without a driver it answers
//!   `Error::Device("no CUDA driver: libcuda.so.1 not found ...")`. Setting
//!   `KVSTORE_DEVICE_DISABLE=1` makes it answer as if there were no driver.
//! - [`DeviceStore`], both stores:
//!   - CPU values (every [`KVStoreBase`](kvstore_base::KVStoreBase) call) are served by an
//!     embedded `local` store, so `create("device")` works on any machine and behaves
//!     exactly as `local` there (MXNet's `CommDevice` merges CPU values on the CPU too). The
//!     conformance suite runs in full on it.
//!   - GPU values are [`DeviceArray`]s (dense float32 in one GPU's memory) passed to
//!     [`DeviceStore::init_gpu`], [`push_gpu`](DeviceStore::push_gpu) and
//!     [`pull_gpu`](DeviceStore::pull_gpu). `device`: the values are copied to the key's
//!     merge GPU ([`placement::place`], MXNet's balancing, decided at the first push for
//!     every key known then) and summed by an NVRTC kernel in the CPU store's association
//!     order; `sgd` (with momentum) and `adam` run as kernels with kvstore-optimizer's
//!     formulas, compiled without fused multiply-add so that each operation rounds as on the
//!     CPU; a pull copies the stored value to every output. `nccl`: one value per GPU,
//!     reduced with `ncclReduce(sum)` (even a single value, so that one GPU exercises NCCL)
//!     to the first GPU of the first push; every push uses the GPU set of the first one
//!     (MXNet's `NCCL KVStore supports only single set of devices`); pulls use peer copies,
//!     not `ncclBcast`.
//!   - `create("nccl")` needs a GPU and `libnccl`: without them it is an `Error::Device`
//!     (MXNet's NCCL store needs GPUs), which the conformance suite reports as every check
//!     ignored with the reason.
//! - Limits of the GPU path: float32 only; no row-sparse values; custom updater closures,
//!   optimizers other than sgd/adam, lr schedulers and per-key lr/wd multipliers are refused
//!   for GPU values (they run for CPU values); no gradient compression.
//!
//! ## What has been run
//!
//! On machines without a GPU only: the build, the conformance suite on `device` (CPU values),
//! the unit tests (placement, optimizer parsing, the probe without a driver). **No GPU run
//! has happened yet**: the kernels, the GPU tests (`tests/gpu.rs`) and the bandwidth example
//! (`examples/gpu_bandwidth.rs`) are written but unexercised; the first GPU run is still
//! owed. `scripts/build-gpu-binaries.sh` builds those binaries on a CPU machine for a
//! machine that has the driver but no Rust toolchain.
//!
//! ## Design
//!
//! - [`gpu::Runtime`]: opened once per process; one primary context, one stream and one
//!   loaded kernel module per GPU. Every operation on a GPU goes on its stream, and each store
//!   call waits for its streams before returning, so a call's effects are complete when it
//!   returns (as the CPU store's).
//! - cudarc features: `driver`, `nvrtc`, `nccl`, `cuda-12080` bindings, `dynamic-loading`.
//!   Bindings of CUDA 12.8 work with any newer driver; NVRTC must be a 12.x `libnvrtc.so.12`
//!   (or `libnvrtc.so`) on the loader path.
//!
//! ```
//! use kvstore_base::{create, DType, KVStoreExt, NDArray};
//! use kvstore_device as _;
//!
//! // With or without a GPU, CPU values behave as in `local`.
//! let kv = create("device")?;
//! kv.init(3, &NDArray::zeros(&[2], DType::F32))?;
//! kv.push(3, &[NDArray::ones(&[2], DType::F32), NDArray::ones(&[2], DType::F32)])?;
//! let mut out = NDArray::zeros(&[2], DType::F32);
//! kv.pull(3, &mut out)?;
//! assert_eq!(out.to_vec::<f32>()?, vec![2.0, 2.0]);
//! # Ok::<(), kvstore_base::Error>(())
//! ```
#![deny(missing_docs)]

pub mod gpu;
mod optim;
pub mod placement;
mod probe;
mod store;

pub use gpu::DeviceArray;
pub use probe::{probe, GpuDevice, GpuInfo};
pub use store::{DeviceStore, Engine};

use kvstore_base::Capability;

kvstore_base::register!(
    "device",
    DeviceStore::device_from_request,
    aliases = ["local_allreduce_device"],
    capabilities = [
        Capability::Optimizer,
        Capability::InitPushPull,
        Capability::Updater,
        Capability::RowSparse,
        Capability::OptimizerStates
    ]
);

kvstore_base::register!(
    "nccl",
    DeviceStore::nccl_from_request,
    capabilities = [
        Capability::Optimizer,
        Capability::InitPushPull,
        Capability::Updater,
        Capability::OptimizerStates
    ]
);
