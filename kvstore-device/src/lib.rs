//! # kvstore-device: the `device` and `nccl` stores
//!
//! MXNet's `device` store (`KVStoreLocal` with `CommDevice`: per-GPU values summed on the GPU
//! that holds each key's merge buffer, merge buffers placed to balance keys across GPUs, the
//! optimizer run there) and its `nccl` store (`KVStoreNCCL`: `ncclReduce` to one GPU), on
//! [`cudarc`] with dynamic loading: the crate builds, and its tests run, on machines without
//! CUDA; nothing links against CUDA.
//!
//! Registered names: `device` (alias `local_allreduce_device`, with gradient compression) and
//! `nccl`.
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
//!   - `NDArray`s in GPU memory (`a.to_context(Context::Gpu(i))`: this crate registers the
//!     backend behind `kvstore-base`'s `DeviceMemory`, see [`device_memory`]) go through
//!     every `KVStoreBase` call to the GPU path below, as MXNet's `kv.push(k, [a_gpu0,
//!     a_gpu1])`: a key initialised with a GPU array is a GPU key; one initialised with a host
//!     array moves to the GPUs at its first push of GPU arrays (its value read from the
//!     embedded host store); host values pushed to a GPU key are then copied to its GPU and
//!     host pulls copy from the GPU.
//!   - GPU values are [`DeviceArray`]s (dense float32 in one GPU's memory) passed to
//!     [`DeviceStore::init_gpu`], [`push_gpu`](DeviceStore::push_gpu) and
//!     [`pull_gpu`](DeviceStore::pull_gpu), or for many keys at once
//!     [`push_gpu_batch`](DeviceStore::push_gpu_batch) and
//!     [`pull_gpu_batch`](DeviceStore::pull_gpu_batch) (every key checked first, one wait per
//!     GPU at the end of the call, as MXNet synchronises once per list of keys). `device`: the values on other GPUs are copied
//!     to the key's merge GPU ([`placement::place`], MXNet's balancing, decided at the first
//!     push for every key known then; at the same time direct peer access is enabled
//!     between the push's GPUs wherever the driver allows, as MXNet's `EnableP2P`, unless
//!     `MXNET_ENABLE_GPU_P2P=0`, with MXNet's warning and matrix for pairs without it:
//!     [`peer`]), those already there are read in place, and one NVRTC
//!     kernel sums up to nine values in one pass over memory, in the CPU store's association
//!     order, straight into the stored value (into a merge buffer when an optimizer takes
//!     the sum; a single value is the optimizer's gradient as it is); `sgd` (with momentum) and `adam` run as kernels with kvstore-optimizer's
//!     formulas, compiled without fused multiply-add so that each operation rounds as on the
//!     CPU; a pull copies the stored value to every output. `nccl`: one value per GPU,
//!     reduced with `ncclReduce(sum)` (even a single value, so that one GPU exercises NCCL)
//!     to the first GPU of the first push; every push uses the GPU set of the first one
//!     (MXNet's `NCCL KVStore supports only single set of devices`); a pull into one output
//!     per GPU of that set is an `ncclBroadcast` from the root (MXNet's pull), any other
//!     pull copies the value to each output. The keys of one push call are reduced in one
//!     NCCL group, and those of one pull call broadcast in one, as MXNet does; a
//!     `pushpull_gpu` without an optimizer, one value and one output per GPU of the set, is
//!     one `ncclAllReduce` into the outputs (the stored value takes the root's output).
//!   - `create("nccl")` needs a GPU and `libnccl`: without them it is an `Error::Device`
//!     (MXNet's NCCL store needs GPUs), which the conformance suite reports as every check
//!     ignored with the reason.
//! - Gradient compression (MXNet's `CommDevice::ReduceCompressed`), `device` only:
//!   `set_gradient_compression` takes MXNet's parameters (`type` `2bit` or `1bit`,
//!   `threshold`; parsed by [`kvstore_compression::CompressionSpec`], with MXNet's messages),
//!   cannot be turned off, and applies to keys initialised before it. Every pushed value is
//!   quantised against its own residual (per key and per position of the value in the key's
//!   values, i.e. per source device, zero at first), dequantised, and the dequantised values
//!   are summed in MXNet's order, `((d0 + d1) + d2) + ...` (`ElementwiseSum`; not the
//!   `d0 + ((d1 + d2) + ...)` grouping of uncompressed sums), even for a single value; the sum
//!   is then stored or handed to the optimizer as an uncompressed sum would be. Init, pull
//!   and broadcast are not compressed.
//!   - CPU values: quantised with [`kvstore_compression::Codec`]; the new residuals are
//!     computed on copies and kept only when the whole call succeeded, so a call that fails
//!     (bad dtype, shape, key, ...) changes neither the store nor the residuals. (An updater
//!     that fails part-way through a call of several keys leaves the keys before it updated,
//!     as in `local`, and their residuals unadvanced.) [`DeviceStore::residual`] shows them.
//!   - GPU values: [`gpu_codec`]'s kernels quantise each value on its own GPU, the codes are
//!     copied to the merge GPU and dequantised and summed there; the kernels follow the CPU
//!     codec operation for operation (same packing, same comparisons, no fused multiply-add,
//!     no flushed denormals), so results equal the CPU values' bit for bit.
//!   - `nccl` refuses compression with `Error::Unsupported` carrying MXNet's message (`NCCL
//!     kvstore does not support gradient compression`).
//!   - Row-sparse GPU keys (`device`): [`DeviceStore::init_gpu`] with a row-sparse value;
//!     pushes of [`DeviceRowSparse`] values
//!     ([`push_gpu_row_sparse`](DeviceStore::push_gpu_row_sparse)) are summed into the
//!     key's value on its merge GPU (held densely there), first value written, the others
//!     added, as `local` sums row-sparse values; [`row_sparse_pull_gpu`](DeviceStore::row_sparse_pull_gpu)
//!     gathers the requested rows on the merge GPU ([`sparse`]'s kernels) and copies them to
//!     each output's GPU. With an optimizer (MXNet's `device` store runs its updater on the
//!     merge GPU with the row-sparse sum), a key storing every row (an embedding initialised
//!     with every row) is updated lazily, as MXNet's row-sparse kernels do: `sgd` (with or
//!     without momentum) and `adam` under `lazy_update` by [`sparse`]'s row kernels, which
//!     touch the gradient's rows of the weight and of the states only; any other optimizer,
//!     `lazy_update` false or a custom updater through the host updater. A key missing rows
//!     is refused with the counts, as MXNet's optimizers refuse such a weight. A dense GPU key
//!     takes row-sparse gradients alike (Gluon's `Embedding(sparse_grad=True)`: a dense weight,
//!     row-sparse gradients), its optimizer states staying on the GPU even when the host
//!     updater runs (`lazy_update` false: handed over and back). Row-sparse `NDArray`s in GPU
//!     memory reach these paths through every `KVStoreBase` call.
//! - Optimizers on GPU keys: sgd and adam (constant learning rate, no per-key multipliers)
//!   run as kernels on the merge GPU; any other optimizer or setting, and custom updater
//!   closures, run through the embedded host store's updater on host copies of the sum and
//!   the weight (slower, same results, one set of states). `save_optimizer_states` /
//!   `load_optimizer_states` cover GPU keys too: kernel states are copied into (and out of)
//!   the file the host store writes. GPU values are float32 only.
//! - Limits of compression: dense float32 values only (float16, float64, integer and
//!   row-sparse values are an error naming the key and the dtype; MXNet compresses float32
//!   only); a failure of a CUDA call in the middle of a compressed GPU push can leave that
//!   push's residuals advanced. `1bit` follows MXNet 2.x (MXNet 1.9.1 rejects it).
//!
//! ## What has been run
//!
//! On machines without a GPU only: the build, the conformance suite on `device` (CPU values),
//! the unit tests (placement, optimizer parsing, the probe without a driver), the compression
//! tests of CPU values (`tests/compression.rs`: against the CPU codec applied by hand, several
//! rounds, 1 to 4 values per key, 2-bit and 1-bit, with sgd, errors and atomicity), and
//! `tests/golden.rs`, which checks CPU-valued compression bit for bit against MXNet 1.9.1's
//! own `device` store (`tests/golden/generate.py`: values on `mx.cpu(0..3)`, several rounds,
//! pushpull, several keys per call, sgd). `tests/kernel_source.rs` compiles every kernel with
//! NVRTC (when `libnvrtc` is present; no GPU needed) and runs every kernel's source as C++
//! on the CPU, bit for bit against the CPU: the compression kernels against the CPU codec,
//! the sum (1 to 20 values, as [`gpu::sum_launches`] plans the launches) and the sgd and adam
//! steps against the `local` store, the row gather and scatter against `retain_rows` and
//! `local`'s row-sparse sums, the lazy sgd and adam row steps against `local` updating a
//! row-sparse weight.
//!
//! `tests/gpu_emulated.rs` runs the GPU checks (`tests/gpu/cases.rs`), the conformance suite
//! of `nccl`, and the whole conformance suite again on `device` with its float32 arrays, dense
//! and row-sparse, handed over in GPU memory (`tests/gpu/on_gpu.rs`: the GPU path through
//! `KVStoreBase`), against an
//! emulated CUDA driver, NCCL and NVRTC
//! (`tests/emulated_driver/driver.cpp`, the kernels compiled in as C++), with one emulated GPU
//! and with three: the host side of every GPU path (reduction, optimizers, compression,
//! row-sparse keys and their lazy optimizers, row-sparse gradients of dense keys, batches,
//! NCCL reduce and broadcast, cudarc's streams, events and frees) runs for real there, and
//! `faults::` makes the GPU run out of memory at each allocation of a push (dense or
//! row-sparse) or a row-sparse pull in turn: nothing changes. The emulated driver is strict where a GPU fails or corrupts silently:
//! streams run only when waited for (unordered reads see stale data), every copy and kernel
//! argument is checked against the live allocations and its GPU, freed and new memory is
//! poisoned, writes past an allocation's end are caught, and an NCCL collective must be joined
//! by every rank with the same arguments. It checked the bandwidth example too
//! (`KVSTORE_GPU_BANDWIDTH_UNIT` shrinks its arrays).
//!
//! **No GPU run has happened yet**: the kernels (the compression kernels included), the GPU
//! tests (`tests/gpu.rs`) and the bandwidth example (`examples/gpu_bandwidth.rs`, which
//! includes compression throughput) have run on the emulated driver only; the first GPU run
//! (NVRTC's code, real concurrency, the figures) is still owed. `scripts/build-gpu-binaries.sh` builds those binaries on a CPU machine
//! (without debug information: about 40 MB) for a machine that has the driver but no Rust
//! toolchain, and `scripts/run-gpu-checks.sh` runs them all there, each under a time limit,
//! after finding `libnvrtc` and `libnccl` (a CUDA 13 machine names them `libnvrtc.so.13` and
//! `libnccl.so.2`, which cudarc does not look for: the script links them under plain names),
//! and writes the logs and a summary into one folder. On the lent GPU machine:
//!
//! ```text
//! kvstore-device/scripts/build-gpu-binaries.sh            # here: fills gpu-bin/
//! kvstore-device/scripts/run-gpu-checks.sh gpu-bin "$OUT" # there, with gpu-bin carried
//! ```
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
//! - The kernels are loaded as machine code NVRTC builds for each GPU's architecture
//!   (`sm_90` on an H100/H200), which a driver older than the NVRTC still loads; PTX, which
//!   the driver compiles itself and refuses from a newer NVRTC, is the fallback, and an error
//!   loading both names the two failures, the NVRTC version and the driver's CUDA version
//!   ([`gpu::compile_kernels_for`], [`gpu::Gpu::kernels_loaded_as`]).
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
//!
//! // Gradient compression: each value quantised against its own residual.
//! let params = [("type", "2bit"), ("threshold", "0.5")]
//!     .map(|(k, v)| (k.to_string(), v.to_string()))
//!     .into();
//! kv.set_gradient_compression(&params)?;
//! let g = NDArray::from_vec(&[2], vec![0.6f32, 0.3])?;
//! kv.push(3, &[g.clone(), g.clone()])?; // each: 0.6 -> +0.5 (residual 0.1), 0.3 -> 0
//! kv.pull(3, &mut out)?;
//! assert_eq!(out.to_vec::<f32>()?, vec![1.0, 0.0]);
//! kv.push(3, &[g.clone(), g])?; // residuals 0.1 + 0.6 and 0.3 + 0.3 both reach 0.5
//! kv.pull(3, &mut out)?;
//! assert_eq!(out.to_vec::<f32>()?, vec![1.0, 1.0]);
//! # Ok::<(), kvstore_base::Error>(())
//! ```
//!
//! GPU values (needs a GPU, its driver and NVRTC): two "devices" pushing to one key, the sum
//! and an sgd step run on the key's merge GPU, then pulled into both; a batch pushes several
//! keys and waits once.
//!
//! ```no_run
//! use kvstore_base::{DType, KVStoreBase, NDArray, OptimizerSpec};
//! use kvstore_device::{DeviceArray, DeviceStore, Engine};
//! use kvstore_local::reduce::ReduceConfig;
//!
//! let kv = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
//! kv.init_gpu("w", &NDArray::zeros(&[1024], DType::F32))?;
//! kv.set_optimizer(&OptimizerSpec::new("sgd").with("momentum", 0.9))?;
//! let grads = [
//!     DeviceArray::from_host(&NDArray::ones(&[1024], DType::F32), 0)?,
//!     DeviceArray::from_host(&NDArray::ones(&[1024], DType::F32), 0)?,
//! ];
//! kv.push_gpu("w", &[&grads[0], &grads[1]])?;
//! let mut weights = [DeviceArray::zeros(&[1024], 0)?, DeviceArray::zeros(&[1024], 0)?];
//! let [a, b] = &mut weights;
//! kv.pull_gpu("w", &mut [a, b])?;
//! assert_eq!(weights[0].to_host()?.to_vec::<f32>()?[0], -0.02); // -lr * (1 + 1)
//!
//! kv.init_gpu("b", &NDArray::zeros(&[16], DType::F32))?;
//! let bias = DeviceArray::zeros(&[16], 0)?;
//! kv.push_gpu_batch(&[("w".into(), &[&grads[0]][..]), ("b".into(), &[&bias][..])])?;
//! # Ok::<(), kvstore_base::Error>(())
//! ```
#![deny(missing_docs)]

mod compressed;
pub mod device_memory;
pub mod gpu;
pub mod gpu_codec;
mod host_copies;
mod kernel_image;
mod optim;
pub mod peer;
pub mod placement;
mod probe;
pub mod sparse;
mod store;

pub use gpu::DeviceArray;
pub use gpu_codec::PackedArray;
pub use probe::{probe, GpuDevice, GpuInfo};
pub use sparse::DeviceRowSparse;
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
        Capability::OptimizerStates,
        Capability::GradientCompression
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
