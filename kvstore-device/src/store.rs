//! [`DeviceStore`]: the `device` and `nccl` stores.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use cudarc::driver::CudaSlice;
use kvstore_base::{
    Capability, CompressionParams, CreateRequest, Error, KVStoreBase, KVStoreExt, Key,
    KeyTypeGuard, KeyedOuts, KeyedValues, NDArray, OptimizerSpec, PriorityGate, Result,
    StorageType, Updater,
};
use kvstore_compression::{Codec, CompressionSpec};
use kvstore_local::reduce::ReduceConfig;
use kvstore_local::LocalStore;

use crate::compressed::Compression;
use crate::gpu::{cuda, DeviceArray, Runtime};
use crate::gpu_codec::{self, PackedArray};
use crate::optim::{Counts, GpuOptimizer, Update};
use crate::placement::place;
use crate::probe::{nccl_present, probe};
use crate::sparse::{row_len, sum_rows, union_of_rows, DeviceRowSparse};

mod ndarrays;
mod states;
use ndarrays::any_on_device;

/// How a store reduces the GPU values of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// MXNet's `CommDevice`: values summed by a kernel on the GPU that holds the key's merge
    /// buffer (placed to balance keys across GPUs), after copying those on other GPUs there.
    Device,
    /// MXNet's `KVStoreNCCL`: `ncclReduce` (sum) to the first GPU of the first push, one
    /// value per GPU, always the same set of GPUs (a call's keys in one NCCL group); pulls
    /// into one output per GPU of the set are an `ncclBroadcast`; a `pushpull_gpu` without an
    /// optimizer is an `ncclAllReduce`.
    Nccl,
}

/// The `device` store (MXNet's `KVStoreLocal` with `CommDevice`, also `local_allreduce_device`)
/// and the `nccl` store (MXNet's `KVStoreNCCL`).
///
/// - **CPU values** (the [`KVStoreBase`] calls: `NDArray`s live in host memory) are served by
///   an embedded [`LocalStore`] named as requested, so they behave exactly as the `local`
///   store (MXNet's `CommDevice` keeps merge buffers on the values' own contexts: for CPU
///   values, the CPU). This works on machines without a GPU. The `nccl` store refuses
///   row-sparse values, as MXNet's.
/// - **GPU values** ([`DeviceArray`]s) go through [`init_gpu`](DeviceStore::init_gpu),
///   [`push_gpu`](DeviceStore::push_gpu) and [`pull_gpu`](DeviceStore::pull_gpu): keys of
///   their own (a key holds CPU values or GPU values, not both), dense float32. A push sums
///   the values on the key's merge GPU and, with an `sgd` or `adam` optimizer set, runs the
///   optimizer there as a kernel; a pull copies the stored value to every output. Row-sparse
///   keys (`device`) take [`DeviceRowSparse`] values through
///   [`push_gpu_row_sparse`](DeviceStore::push_gpu_row_sparse) (optimizers update them
///   lazily on the merge GPU; a dense key takes row-sparse gradients there too) and
///   [`row_sparse_pull_gpu`](DeviceStore::row_sparse_pull_gpu). Without a CUDA driver every
///   GPU call is an [`Error::Device`].
/// - **Gradient compression** (`device` only; [`set_gradient_compression`] with MXNet's
///   parameters, `2bit` or `1bit`): as MXNet's `CommDevice::ReduceCompressed`, every pushed
///   value is quantised against its own residual (per key and per position of the value in
///   the key's values, i.e. per source device; zero at first), dequantised, and the
///   dequantised values are summed in MXNet's order, `((d0 + d1) + d2) + ...`, even for a
///   single value; the sum then goes where an uncompressed sum would (the stored value, or
///   the optimizer). Init and pull are not compressed. CPU values are quantised on the CPU
///   with [`kvstore_compression::Codec`]; GPU values on their own GPU by the kernels of
///   [`gpu_codec`](crate::gpu_codec), the codes copied to the merge GPU and dequantised and
///   summed there. Compression takes dense float32 values only.
///
/// Every GPU call waits for its GPU work before returning. A push allocates everything it
/// needs (placement, copies, merge buffers, optimizer states, compression buffers) for every
/// key of the call before any arithmetic, and a row-sparse pull fills new outputs before
/// replacing any: a GPU out of memory makes the call an [`Error::Device`] that changed no
/// value, state, count, residual or output.
///
/// [`set_gradient_compression`]: KVStoreBase::set_gradient_compression
#[derive(Debug)]
pub struct DeviceStore {
    local: LocalStore,
    engine: Engine,
    gpu: Mutex<GpuState>,
    /// The codec and the residuals of CPU values.
    compression: Mutex<Compression>,
    /// Compressed calls on CPU values enter by priority (then the local store's own gate).
    gate: PriorityGate,
    /// The store's type of key (int or string), for CPU and GPU keys alike.
    key_type: KeyTypeGuard,
}

#[derive(Debug, Default)]
struct GpuState {
    keys: BTreeMap<Key, GpuEntry>,
    /// Elements placed per GPU ordinal (placement's running totals).
    totals: BTreeMap<usize, usize>,
    optimizer: Option<OptimizerSpec>,
    custom_updater: bool,
    counts: Counts,
    nccl: Option<NcclComms>,
    /// The GPU sets whose missing peer access was reported (once per set).
    p2p_reported: BTreeSet<Vec<usize>>,
}

#[derive(Debug)]
struct GpuEntry {
    shape: Vec<usize>,
    /// A row-sparse key: pushed [`DeviceRowSparse`] values, read by row-sparse pulls.
    row_sparse: bool,
    /// The rows a row-sparse key's value stores when it does not store every row (`None`: every
    /// row; the GPU holds the others as zeros). An optimizer updates it only when it stores
    /// every row, as MXNet's do; a custom updater gets the stored rows.
    stored_ids: Option<Vec<i64>>,
    /// The init value, until the key is placed on a GPU.
    initial: NDArray,
    /// The GPU that holds the key's value and reduces its pushes (placed at the first push).
    merge_dev: Option<usize>,
    /// The value, on the merge GPU.
    stored: Option<DeviceArray>,
    /// The sum of a push when it is not written straight into `stored`: the optimizer's
    /// gradient, or the output of NCCL or of the compressed reduction.
    merge: Option<DeviceArray>,
    /// Copies, on the merge GPU, of the pushed values that live on other GPUs.
    copies: Vec<DeviceArray>,
    state: Vec<CudaSlice<f32>>,
    /// Optimizer states loaded from a file before the key was placed on a GPU: uploaded at
    /// its first push.
    loaded_state: Option<Vec<Vec<f32>>>,
    /// Compression buffers, per position of the pushed values.
    sources: Vec<Source>,
}

/// The compression buffers of one position of a GPU key's pushed values (MXNet: of one
/// source device).
#[derive(Debug)]
struct Source {
    /// The residual, on the value's GPU.
    residual: DeviceArray,
    /// The codes, written on the value's GPU.
    send: PackedArray,
    /// Their copy on the merge GPU, when that is another GPU.
    recv: Option<PackedArray>,
}

impl GpuEntry {
    /// An unplaced key holding `value` (dense or row-sparse, float32).
    fn new(value: &NDArray) -> GpuEntry {
        GpuEntry {
            shape: value.shape().to_vec(),
            row_sparse: value.storage_type() == StorageType::RowSparse,
            stored_ids: value
                .as_row_sparse()
                .filter(|_| !value.stores_every_row())
                .map(|rows| rows.indices().to_vec()),
            initial: value.to_dense(),
            merge_dev: None,
            stored: None,
            merge: None,
            copies: Vec::new(),
            state: Vec::new(),
            loaded_state: None,
            sources: Vec::new(),
        }
    }
}

impl GpuState {
    /// Drops the GPU optimizer's states and update counts.
    fn reset_optimizer(&mut self) {
        self.counts.clear();
        for entry in self.keys.values_mut() {
            entry.state.clear();
            entry.loaded_state = None;
        }
    }
}

struct NcclComms {
    ordinals: Vec<usize>,
    comms: Vec<cudarc::nccl::Comm>,
}

impl std::fmt::Debug for NcclComms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComms")
            .field("ordinals", &self.ordinals)
            .finish()
    }
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; every use is under the store's mutex.
unsafe impl Send for NcclComms {}

/// The operation named by the `nccl` store's refusal of compression: MXNet's message inside
/// the [`Error::Unsupported`] that every store without the capability answers.
const NCCL_NO_COMPRESSION: &str =
    "set_gradient_compression (NCCL kvstore does not support gradient compression)";

fn reduce_config(request: &CreateRequest) -> Result<ReduceConfig> {
    let mut config = ReduceConfig::from_env();
    for (option, slot) in [
        ("reduction_nthreads", &mut config.threads),
        ("bigarray_bound", &mut config.bigarray_bound),
    ] {
        if let Some(text) = request.options.get(option) {
            *slot = text
                .trim()
                .parse()
                .ok()
                .filter(|&n: &usize| n > 0)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "option {option} must be a positive integer, got {text:?}"
                    ))
                })?;
        }
    }
    Ok(config)
}

impl DeviceStore {
    /// A store reporting `name`, reducing GPU values with `engine`; builds on any machine
    /// (only GPU calls need a GPU).
    pub fn new(name: &str, engine: Engine, config: ReduceConfig) -> DeviceStore {
        DeviceStore {
            local: LocalStore::with_config(name, config),
            engine,
            gpu: Mutex::new(GpuState::default()),
            compression: Mutex::new(Compression::default()),
            gate: PriorityGate::default(),
            key_type: KeyTypeGuard::new(),
        }
    }

    /// The factory of `device` (and `local_allreduce_device`): always succeeds, GPU or not.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad `reduction_nthreads` / `bigarray_bound` option.
    pub fn device_from_request(request: &CreateRequest) -> Result<Box<dyn KVStoreBase>> {
        Ok(Box::new(DeviceStore::new(
            &request.name,
            Engine::Device,
            reduce_config(request)?,
        )))
    }

    /// The factory of `nccl`: needs a GPU and `libnccl`, as MXNet's NCCL store.
    ///
    /// # Errors
    /// [`Error::Device`] without a CUDA driver, a GPU or `libnccl`.
    pub fn nccl_from_request(request: &CreateRequest) -> Result<Box<dyn KVStoreBase>> {
        let info = probe()?;
        if !info.nccl {
            return Err(Error::Device(
                "no NCCL: libnccl.so not found (install NCCL or set LD_LIBRARY_PATH)".into(),
            ));
        }
        debug_assert!(nccl_present());
        Ok(Box::new(DeviceStore::new(
            &request.name,
            Engine::Nccl,
            reduce_config(request)?,
        )))
    }

    /// The reduction engine of GPU values.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    fn state(&self) -> MutexGuard<'_, GpuState> {
        self.gpu.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn compression(&self) -> MutexGuard<'_, Compression> {
        self.compression
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The gradient compression in effect: `None` until
    /// [`set_gradient_compression`](KVStoreBase::set_gradient_compression) succeeds.
    pub fn gradient_compression(&self) -> Option<Codec> {
        self.compression().codec
    }

    /// The residual (error-feedback state) of a CPU-valued key for the value at `position` of
    /// its pushes (MXNet: its source device), once a compressed push created it.
    pub fn residual(&self, key: impl Into<Key>, position: usize) -> Option<Vec<f32>> {
        self.compression()
            .residuals
            .get(&key.into(), position)
            .map(<[f32]>::to_vec)
    }

    /// A push (`outs` = `None`) or pushpull of CPU values with compression: the values are
    /// compressed and summed per key, the sums handed to the local store, and the residuals
    /// of the call kept only when the local store accepted them.
    fn push_compressed(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        outs: Option<&mut KeyedOuts<'_>>,
        priority: i32,
    ) -> Result<()> {
        let _pass = self.gate.enter(priority);
        let mut compression = self.compression();
        let merged = compression.merge(values, self.local.type_name(), operation)?;
        {
            let batch = merged.batch(operation)?;
            match outs {
                Some(outs) => self.local.pushpull_batch(&batch, outs, priority)?,
                None => self.local.push_batch(&batch, priority)?,
            }
        }
        merged.commit(&mut compression.residuals);
        Ok(())
    }

    fn compression_active(&self) -> bool {
        self.compression().codec.is_some()
    }

    fn at(&self, operation: &'static str, key: &Key) -> impl FnOnce(Error) -> Error + '_ {
        let key = key.clone();
        move |e| e.at_key(self.local.type_name(), operation, key)
    }

    /// Initialises a GPU-valued key with a float32 host value (copied; it moves to the key's
    /// merge GPU at the first push). A row-sparse value makes a row-sparse key (`device`
    /// only): its pushes are [`DeviceRowSparse`] values
    /// ([`push_gpu_row_sparse`](DeviceStore::push_gpu_row_sparse)) and its rows are read with
    /// [`row_sparse_pull_gpu`](DeviceStore::row_sparse_pull_gpu); the GPU holds it densely
    /// (absent rows are zeros).
    ///
    /// # Errors
    /// A key already initialised (CPU or GPU); a value that is not float32; a row-sparse value
    /// on the `nccl` store.
    pub fn init_gpu(&self, key: impl Into<Key>, value: &NDArray) -> Result<()> {
        self.init_gpu_keys(&[(key.into(), value)])
    }

    /// [`init_gpu`](DeviceStore::init_gpu) of several keys at once: every key and value
    /// checked, then all inserted under one lock (none when one is refused).
    pub(crate) fn init_gpu_keys(&self, pairs: &[(Key, &NDArray)]) -> Result<()> {
        self.key_type
            .check("init", pairs.iter().map(|(key, _)| key))?;
        let mut hosts = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            let at = || self.at("init", key);
            // A value in GPU memory: its host copy is what the key holds until it is placed.
            let value = value.to_context(kvstore_base::Context::Cpu).map_err(at())?;
            if value.dtype() != kvstore_base::DType::F32 {
                return Err(at()(Error::InvalidArgument(format!(
                    "GPU values are float32 for now, got a {} {} array",
                    value.storage_type(),
                    value.dtype()
                ))));
            }
            crate::gpu::non_empty(value.shape()).map_err(at())?;
            if value.storage_type() == StorageType::RowSparse {
                self.refuse_sparse(&[&value]).map_err(at())?;
            }
            hosts.push(value);
        }
        let mut state = self.state();
        for (i, (key, _)) in pairs.iter().enumerate() {
            let twice = pairs[..i].iter().any(|(k, _)| k == key);
            if twice || state.keys.contains_key(key) || self.local.value_info(key).is_some() {
                return Err(self.at("init", key)(Error::DuplicateInit));
            }
        }
        for ((key, _), value) in pairs.iter().zip(hosts) {
            state.keys.insert(key.clone(), GpuEntry::new(&value));
        }
        Ok(())
    }

    /// Pushes the per-GPU values of a GPU-valued key: sums them on the key's merge GPU, then
    /// runs the optimizer there (or the stored value becomes the sum without one). With
    /// gradient compression, each value is quantised on its own GPU against the residual of
    /// its position, the codes copied to the merge GPU, dequantised and summed there
    /// (`((d0 + d1) + d2) + ...`, bit-identical to the same push of CPU values).
    ///
    /// # Errors
    /// [`Error::KeyNotInitialized`], shape mismatches, an empty list, the updater's error
    /// (optimizers without GPU kernels and custom updaters run on host copies), and
    /// [`Error::Device`].
    pub fn push_gpu(&self, key: impl Into<Key>, values: &[&DeviceArray]) -> Result<()> {
        self.push_gpu_batch(&[(key.into(), values)])
    }

    /// Pushes the values of several GPU-valued keys in one call, as MXNet pushes a list of
    /// keys: every key is checked before any GPU work (a bad key changes nothing), the keys
    /// are reduced in ascending order (values of a key listed twice are pushed together), and
    /// the call waits for its GPUs once, at the end, instead of once per key.
    ///
    /// # Errors
    /// As [`push_gpu`](DeviceStore::push_gpu), naming the key; on the `nccl` store, keys of
    /// one call on different sets of GPUs.
    pub fn push_gpu_batch(&self, batch: &[(Key, &[&DeviceArray])]) -> Result<()> {
        self.push_gpu_batch_for("push", batch)
    }

    /// [`push_gpu_batch`](DeviceStore::push_gpu_batch), its errors naming `operation` (a
    /// pushpull's GPU part is a push).
    pub(crate) fn push_gpu_batch_for(
        &self,
        operation: &'static str,
        batch: &[(Key, &[&DeviceArray])],
    ) -> Result<()> {
        self.key_type
            .check(operation, batch.iter().map(|(key, _)| key))?;
        let mut state = self.state();
        // Keys in ascending order, the values of a key listed twice together.
        let mut groups: Vec<(&Key, Vec<&DeviceArray>)> = Vec::new();
        let mut order: Vec<&(Key, &[&DeviceArray])> = batch.iter().collect();
        order.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, values) in order {
            match groups.last_mut() {
                Some((k, vs)) if *k == key => vs.extend_from_slice(values),
                _ => groups.push((key, values.to_vec())),
            }
        }
        // Checks, before any GPU work.
        let update = Update::for_setting(state.optimizer.as_ref(), state.custom_updater);
        let codec = self.gradient_compression();
        let mut nccl_set: Option<Vec<usize>> = state.nccl.as_ref().map(|c| c.ordinals.clone());
        let mut devs = Vec::with_capacity(groups.len());
        for (key, values) in &groups {
            let key_devs = self
                .check_push(&state, key, values, nccl_set.as_deref())
                .map_err(self.at(operation, key))?;
            if self.engine == Engine::Nccl && nccl_set.is_none() {
                let mut sorted = key_devs.clone();
                sorted.sort_unstable();
                nccl_set = Some(sorted);
            }
            devs.push(key_devs);
        }
        // Every allocation of the call, then the work, then one wait per GPU touched.
        let mut touched: Vec<usize> = Vec::new();
        let queued = groups
            .iter()
            .zip(&devs)
            .try_for_each(|((key, values), key_devs)| {
                self.reserve_push(
                    &mut state,
                    key,
                    values,
                    key_devs,
                    &update,
                    codec,
                    &mut touched,
                )
                .map_err(self.at(operation, key))
            })
            .and_then(|()| match self.engine {
                Engine::Nccl => {
                    self.queue_nccl_push(operation, &mut state, &groups, &update, &mut touched)
                }
                Engine::Device => groups.iter().try_for_each(|(key, values)| {
                    self.queue_push(&mut state, key, values, &update, codec)
                        .map_err(self.at(operation, key))
                }),
            });
        // Even after a failure, what was queued finishes before the call returns.
        let waited = wait_for(touched);
        queued.and(waited)
    }

    /// Checks a push of `values` to `key` (on the `nccl` store, against the GPU set `nccl_set`
    /// when there is one); returns the values' GPUs in first-seen order.
    fn check_push(
        &self,
        state: &GpuState,
        key: &Key,
        values: &[&DeviceArray],
        nccl_set: Option<&[usize]>,
    ) -> Result<Vec<usize>> {
        let entry = state.keys.get(key).ok_or(Error::KeyNotInitialized)?;
        if entry.row_sparse {
            return Err(Error::InvalidArgument(format!(
                "key {key} is row-sparse: push DeviceRowSparse values (push_gpu_row_sparse)"
            )));
        }
        self.check_gpu_values(key, &entry.shape, entry.merge_dev, values, nccl_set)
    }

    /// The checks of GPU values pushed to `key` of `shape` (merge GPU `merge_dev` once
    /// placed): their shapes, their GPUs, and on `nccl` one value per GPU of one set
    /// (`nccl_set` once known) that holds the merge GPU; returns the values' GPUs in
    /// first-seen order.
    fn check_gpu_values(
        &self,
        key: &Key,
        shape: &[usize],
        merge_dev: Option<usize>,
        values: &[&DeviceArray],
        nccl_set: Option<&[usize]>,
    ) -> Result<Vec<usize>> {
        check_pushed_shapes(key, shape, "a GPU value", values.iter().map(|v| v.shape()))?;
        let devs = distinct_gpus(values.iter().map(|v| v.ordinal()))?;
        if self.engine == Engine::Nccl {
            // One value per GPU, always the same set of GPUs once NCCL is up (MXNet's rule),
            // and the key's merge GPU among them.
            if devs.len() != values.len() {
                return Err(Error::InvalidArgument(
                    "the NCCL store takes one value per GPU".into(),
                ));
            }
            let mut sorted = devs.clone();
            sorted.sort_unstable();
            let same_set = nccl_set.is_none_or(|set| set == sorted);
            let root_in_set = merge_dev.is_none_or(|d| sorted.contains(&d));
            if !same_set || !root_in_set {
                return Err(Error::InvalidArgument(
                    "NCCL KVStore supports only single set of devices".into(),
                ));
            }
        }
        Ok(devs)
    }

    /// Places the keys (at the first push of an unplaced one, [`place_for_push`]) and opens
    /// NCCL (at the first push of the `nccl` store) for a push on `devs` (`reduces`: one that
    /// MXNet reduces, see [`place_for_push`]); adds them to `touched`.
    ///
    /// [`place_for_push`]: DeviceStore::place_for_push
    fn prepare_push(
        &self,
        state: &mut GpuState,
        key: &Key,
        (devs, reduces): (&[usize], bool),
        touched: &mut Vec<usize>,
    ) -> Result<()> {
        self.place_for_push(state, key, devs, reduces)?;
        if self.engine == Engine::Nccl && state.nccl.is_none() {
            state.nccl = Some(open_nccl(Runtime::get()?, devs)?);
        }
        touched.extend_from_slice(devs);
        Ok(())
    }

    /// Allocates everything a checked push of `values` to `key` needs (placing the keys and
    /// opening NCCL at the first push): the copies of values on other GPUs, the merge buffer,
    /// the optimizer's states, the compression buffers. A call reserves for every key before
    /// any arithmetic, so that a failed allocation (the GPU out of memory) leaves every value,
    /// optimizer state, update count and residual as it was.
    #[allow(clippy::too_many_arguments)]
    fn reserve_push(
        &self,
        state: &mut GpuState,
        key: &Key,
        values: &[&DeviceArray],
        devs: &[usize],
        update: &Update,
        codec: Option<Codec>,
        touched: &mut Vec<usize>,
    ) -> Result<()> {
        // MXNet's compressed reduce places the keys even for a single value.
        let reduces = values.len() > 1 || codec.is_some();
        self.prepare_push(state, key, (devs, reduces), touched)?;
        let entry = state.keys.get_mut(key).expect("checked above");
        let dev = entry.merge_dev.expect("placed above");
        touched.push(dev);
        let GpuEntry {
            shape,
            merge,
            copies,
            state: states,
            loaded_state,
            sources,
            ..
        } = entry;
        let needs_merge = match (self.engine, codec) {
            (Engine::Device, None) => update.takes_sum() && values.len() > 1,
            (Engine::Device, Some(_)) => true,
            (Engine::Nccl, _) => update.takes_sum(),
        };
        if needs_merge {
            merge_buffer(merge, shape, dev)?;
        }
        match (self.engine, codec) {
            (Engine::Device, None) => {
                let remote = values.iter().filter(|v| v.ordinal() != dev).count();
                while copies.len() < remote {
                    copies.push(DeviceArray::zeros(shape, dev)?);
                }
            }
            (Engine::Device, Some(codec)) => {
                reserve_compressed(&codec, sources, shape, values, dev)?
            }
            (Engine::Nccl, _) => {}
        }
        if let Some(opt) = update.kernels() {
            let gpu = Runtime::get()?.gpu(dev)?;
            reserve_states(gpu, opt, shape, states, loaded_state)?;
        }
        Ok(())
    }

    /// Queues a checked push of the `nccl` store's keys `groups` (ascending, each once):
    /// every key's `ncclReduce` to its merge GPU in one NCCL group, as MXNet's `KVStoreNCCL`
    /// reduces all keys of a push, into the stored value itself unless an optimizer takes
    /// the sum; then the optimizer steps.
    fn queue_nccl_push(
        &self,
        operation: &'static str,
        state: &mut GpuState,
        groups: &[(&Key, Vec<&DeviceArray>)],
        update: &Update,
        touched: &mut Vec<usize>,
    ) -> Result<()> {
        let runtime = Runtime::get()?;
        let GpuState {
            keys, counts, nccl, ..
        } = state;
        let comms = nccl
            .as_ref()
            .ok_or_else(|| Error::Device("NCCL communicators are not open".into()))?;
        // The pushed keys' entries, in the order of `groups` (both ascending).
        let mut wanted = groups.iter().map(|(k, _)| *k).peekable();
        let mut entries: Vec<&mut GpuEntry> = Vec::with_capacity(groups.len());
        for (k, entry) in keys.iter_mut() {
            if wanted.peek() == Some(&k) {
                wanted.next();
                entries.push(entry);
            }
        }
        comms.group(|| {
            for ((key, values), entry) in groups.iter().zip(entries.iter_mut()) {
                let root = entry.merge_dev.expect("placed above");
                let target = match update {
                    Update::Store => entry.stored.as_mut().expect("placed keys hold their value"),
                    _ => entry.merge.as_mut().ok_or_else(unreserved)?,
                };
                nccl_reduce(comms, values, target).map_err(self.at(operation, key))?;
                touched.push(root);
            }
            Ok(())
        })?;
        if !update.takes_sum() {
            return Ok(());
        }
        for ((key, _), entry) in groups.iter().zip(entries) {
            let gpu = runtime.gpu(entry.merge_dev.expect("placed above"))?;
            let GpuEntry {
                stored,
                merge,
                state: optimizer_state,
                ..
            } = entry;
            let stored = stored.as_mut().expect("placed keys hold their value");
            let sum = &merge.as_ref().ok_or_else(unreserved)?.data;
            match update.kernels() {
                Some(opt) => optimizer_step(gpu, opt, key, counts, stored, optimizer_state, sum),
                None => self.host_update(key, stored, sum),
            }
            .map_err(self.at(operation, key))?;
        }
        Ok(())
    }

    /// Queues the arithmetic of a checked and reserved push of the `device` store (no
    /// allocation: [`reserve_push`](DeviceStore::reserve_push) made every buffer).
    fn queue_push(
        &self,
        state: &mut GpuState,
        key: &Key,
        values: &[&DeviceArray],
        update: &Update,
        codec: Option<Codec>,
    ) -> Result<()> {
        let runtime = Runtime::get()?;
        let GpuState { keys, counts, .. } = state;
        let entry = keys.get_mut(key).expect("checked above");
        let dev = entry.merge_dev.expect("placed above");
        let gpu = runtime.gpu(dev)?;
        let GpuEntry {
            stored,
            merge,
            copies,
            state: optimizer_state,
            sources,
            ..
        } = entry;
        let stored = stored.as_mut().expect("placed keys hold their value");
        // What a reduced sum becomes: the optimizer's gradient, or the stored value.
        let mut apply = |sum: &CudaSlice<f32>| -> Result<()> {
            match update {
                Update::Store => gpu
                    .stream
                    .memcpy_dtod(sum, &mut stored.data)
                    .map_err(cuda("GPU copy")),
                Update::Kernels(opt) => {
                    optimizer_step(gpu, opt, key, counts, stored, optimizer_state, sum)
                }
                Update::Host => self.host_update(key, stored, sum),
            }
        };
        match (self.engine, codec) {
            (Engine::Device, None) => {
                // Values on the merge GPU are read where they are; the others are copied to it.
                let remote: Vec<&DeviceArray> = values
                    .iter()
                    .copied()
                    .filter(|v| v.ordinal() != dev)
                    .collect();
                if copies.len() < remote.len() {
                    return Err(unreserved());
                }
                for (copy, v) in copies.iter_mut().zip(&remote) {
                    copy.copy_from(v)?;
                }
                let mut copied = copies.iter();
                let srcs: Vec<&CudaSlice<f32>> = values
                    .iter()
                    .map(|v| match v.ordinal() == dev {
                        true => &v.data,
                        false => &copied.next().expect("one copy per remote value").data,
                    })
                    .collect();
                match (update, srcs.as_slice()) {
                    // One value is the sum as it is.
                    (_, [value]) => apply(value)?,
                    // Without an optimizer the sum is written straight into the stored value.
                    (Update::Store, _) => gpu.sum_sources(&mut stored.data, &srcs)?,
                    (_, _) => {
                        let merge = merge.as_mut().ok_or_else(unreserved)?;
                        gpu.sum_sources(&mut merge.data, &srcs)?;
                        apply(&merge.data)?;
                    }
                }
            }
            (Engine::Device, Some(codec)) => {
                let merge = merge.as_mut().ok_or_else(unreserved)?;
                reduce_compressed(&codec, sources, values, merge)?;
                apply(&merge.data)?;
            }
            (Engine::Nccl, _) => {
                return Err(Error::Device(
                    "the nccl store's pushes go through queue_nccl_push".into(),
                ))
            }
        }
        Ok(())
    }

    /// Pushes row-sparse GPU values to a GPU key (MXNet's `CommDevice` reduce of `row_sparse`
    /// values, then its updater): a row-sparse key, or a dense one (a row-sparse gradient of a
    /// dense weight, as Gluon's `Embedding(sparse_grad=True)` makes). Their sum is the first
    /// value's rows then each other value's rows added in order (the rows of the values on
    /// other GPUs are copied to the key's merge GPU first), as the `local` store sums
    /// row-sparse values. Then, as MXNet:
    ///
    /// - without an optimizer or updater, the sum becomes the stored value (its rows; the
    ///   others are zeros, and a dense key holds it dense);
    /// - with `sgd` (momentum or not) or `adam` under `lazy_update` (the default), the
    ///   optimizer's row kernels update the gradient's rows of the weight and of its states on
    ///   the merge GPU, and only those ([`ROW_KERNELS`](crate::sparse::ROW_KERNELS): the
    ///   arithmetic of the CPU optimizer's lazy update, bit for bit);
    /// - with another optimizer, `lazy_update` false or a custom updater, the host updater runs
    ///   on host copies of the row-sparse sum and of the weight (as `local` updates a
    ///   row-sparse weight storing every row).
    ///
    /// An optimizer updates a key only when its value stores every row (initialised with
    /// every row, or last pushed without an optimizer with every row), as MXNet's optimizers
    /// require of a row-sparse weight.
    ///
    /// # Errors
    /// [`Error::KeyNotInitialized`]; shape mismatches; an empty list; an optimizer on a
    /// row-sparse value missing rows (with the counts); gradient compression (MXNet: not
    /// supported for row_sparse values); the `nccl` store (MXNet's takes no sparse values);
    /// [`Error::Device`].
    pub fn push_gpu_row_sparse(
        &self,
        key: impl Into<Key>,
        values: &[&DeviceRowSparse],
    ) -> Result<()> {
        let key = key.into();
        self.key_type.check("push", [&key])?;
        let at = self.at("push", &key);
        let mut state = self.state();
        self.push_row_sparse_locked(&mut state, &key, values)
            .map_err(at)
    }

    fn push_row_sparse_locked(
        &self,
        state: &mut GpuState,
        key: &Key,
        values: &[&DeviceRowSparse],
    ) -> Result<()> {
        let prepared = self.prepare_row_sparse_push(state, key, values)?;
        self.apply_row_sparse_push(state, key, values, prepared)
    }

    /// Everything a push of row-sparse GPU `values` to `key` allocates, before its arithmetic
    /// changes anything (after its checks): the key's placement, the copies of values on other
    /// GPUs, the row-sparse sum an optimizer takes, the optimizer's states.
    fn prepare_row_sparse_push(
        &self,
        state: &mut GpuState,
        key: &Key,
        values: &[&DeviceRowSparse],
    ) -> Result<PreparedRows> {
        let update = self.check_row_sparse_push(state, key, values)?;
        let devs = distinct_gpus(values.iter().map(|v| v.ordinal()))?;
        self.place_for_push(state, key, &devs, values.len() > 1)?;
        let entry = state.keys.get_mut(key).expect("checked above");
        let dev = entry.merge_dev.expect("placed above");
        let gpu = Runtime::get()?.gpu(dev)?;
        // The values on the merge GPU: those elsewhere copied to it first.
        let moved: Vec<Option<DeviceRowSparse>> = values
            .iter()
            .map(|v| (v.ordinal() != dev).then(|| v.to_gpu(dev)).transpose())
            .collect::<Result<_>>()?;
        let here = on_merge_gpu(values, &moved);
        // The optimizer's gradient: the row-sparse sum (one value is the sum as it is).
        let summed = match here.as_slice() {
            [_, _, ..] if update.takes_sum() => Some(sum_rows(&here, dev)?),
            _ => None,
        };
        // A kernel optimizer's states live on the GPU: its row kernels use them, and so does
        // the host updater for a dense key under `lazy_update` false (handed over and back).
        if let Some(opt) = update.kernels() {
            let GpuEntry {
                shape,
                row_sparse,
                state: states,
                loaded_state,
                ..
            } = entry;
            if opt.updates_rows_lazily() || !*row_sparse {
                reserve_states(gpu, opt, shape, states, loaded_state)?;
            }
        }
        Ok(PreparedRows {
            dev,
            update,
            moved,
            summed,
        })
    }

    /// The arithmetic of a prepared push of row-sparse GPU `values` to `key` (see
    /// [`prepare_row_sparse_push`](DeviceStore::prepare_row_sparse_push)); waits for it.
    fn apply_row_sparse_push(
        &self,
        state: &mut GpuState,
        key: &Key,
        values: &[&DeviceRowSparse],
        prepared: PreparedRows,
    ) -> Result<()> {
        let PreparedRows {
            dev,
            update,
            moved,
            summed,
        } = prepared;
        // The setting the push was prepared for must still hold (a `set_optimizer` on another
        // thread in between would find buffers reserved for another update).
        if Update::for_setting(state.optimizer.as_ref(), state.custom_updater) != update {
            return Err(Error::InvalidArgument(
                "the optimizer or updater changed while the push was under way: push again".into(),
            ));
        }
        let gpu = Runtime::get()?.gpu(dev)?;
        let here = on_merge_gpu(values, &moved);
        let GpuState { keys, counts, .. } = state;
        let entry = keys.get_mut(key).expect("prepared above");
        let GpuEntry {
            shape,
            row_sparse,
            stored,
            stored_ids,
            state: states,
            ..
        } = entry;
        let row_sparse = *row_sparse;
        let stored = stored.as_mut().expect("placed keys hold their value");
        let queued = (|| match &update {
            Update::Store => {
                // The sum becomes the value: zeros, the first value's rows, the others added.
                gpu.stream
                    .memset_zeros(&mut stored.data)
                    .map_err(cuda("memset"))?;
                let row_len = row_len(shape);
                for (i, v) in here.iter().enumerate() {
                    if v.nnz() > 0 {
                        gpu.scatter_rows(
                            &mut stored.data,
                            &v.rows,
                            &v.ids,
                            v.nnz(),
                            row_len,
                            i > 0,
                        )?;
                    }
                }
                if row_sparse {
                    let union = union_of_rows(&here);
                    *stored_ids = (union.len() < shape[0]).then_some(union);
                }
                Ok(())
            }
            _ => {
                let grad = summed.as_ref().unwrap_or(here[0]);
                match update.kernels() {
                    Some(opt) if opt.updates_rows_lazily() => {
                        if states.len() < opt.state_len() {
                            return Err(unreserved());
                        }
                        let t = counts.entry(key.clone()).or_insert(0);
                        *t += 1;
                        opt.step_rows(gpu, *t, &mut stored.data, grad, states)
                    }
                    // `lazy_update` false on a dense key: MXNet's standard sparse update, by
                    // the host updater, with the key's GPU states.
                    Some(opt) if !row_sparse => {
                        let grad = grad.to_host()?;
                        self.update_on_host_with_gpu_states(key, opt, &grad, stored, states, counts)
                    }
                    _ if row_sparse => self.host_update_rows(key, stored, stored_ids, grad),
                    _ => self.update_dense_on_host(key, &grad.to_host()?, stored),
                }
            }
        })();
        // Even after a failure, what was queued finishes before the call returns.
        let waited = wait_for(vec![dev]);
        queued.and(waited)
    }

    /// The checks of a push of row-sparse GPU `values` to `key`, before any GPU work; answers
    /// what the push does with their sum.
    fn check_row_sparse_push(
        &self,
        state: &GpuState,
        key: &Key,
        values: &[&DeviceRowSparse],
    ) -> Result<Update> {
        let entry = state.keys.get(key).ok_or(Error::KeyNotInitialized)?;
        if self.engine == Engine::Nccl {
            return Err(Error::InvalidArgument(
                "NCCL KVStore does not support sparse storage type".into(),
            ));
        }
        check_pushed_shapes(
            key,
            &entry.shape,
            "a row-sparse GPU value",
            values.iter().map(|v| v.shape()),
        )?;
        let update = Update::for_setting(state.optimizer.as_ref(), state.custom_updater);
        let rows = entry.shape[0];
        let optimizer_runs = state.optimizer.is_some() && !state.custom_updater;
        if let Some(stored) = entry.stored_ids.as_ref().filter(|_| optimizer_runs) {
            return Err(Error::InvalidArgument(format!(
                "a row-sparse weight is updated only when it stores every row, as MXNet's \
                 optimizers require; key {key} stores {} of its {rows} rows (init it with \
                 every row, or store it dense)",
                stored.len()
            )));
        }
        if self.gradient_compression().is_some() {
            return Err(Error::InvalidArgument(
                "gradient compression for row_sparse storage type is not supported".into(),
            ));
        }
        Ok(update)
    }

    /// MXNet's `row_sparse_pull` on GPUs: each output becomes the rows `row_ids[i]` (any
    /// integer-valued dense host array; sorted and deduplicated, as MXNet does) of the key's
    /// value, zeros for rows it does not hold, on the output's GPU. The rows are gathered on
    /// the key's merge GPU and copied to outputs on other GPUs.
    ///
    /// # Errors
    /// [`Error::KeyNotInitialized`]; a dense key; a count of `row_ids` other than of `outs`;
    /// shape mismatches; row ids that are not integers in `0..rows`; [`Error::Device`].
    pub fn row_sparse_pull_gpu(
        &self,
        key: impl Into<Key>,
        outs: &mut [&mut DeviceRowSparse],
        row_ids: &[&NDArray],
    ) -> Result<()> {
        let key = key.into();
        self.key_type.check("row_sparse_pull", [&key])?;
        let at = self.at("row_sparse_pull", &key);
        let state = self.state();
        let result = (|| {
            Error::check_row_id_count(outs.len(), row_ids.len())?;
            let entry = state.keys.get(&key).ok_or(Error::KeyNotInitialized)?;
            if !entry.row_sparse {
                return Err(Error::InvalidArgument(
                    "row_sparse_pull needs a row-sparse stored value; this key is dense (use pull)"
                        .into(),
                ));
            }
            let mut ids = Vec::with_capacity(outs.len());
            for (i, (o, r)) in outs.iter().zip(row_ids).enumerate() {
                if o.shape() != entry.shape.as_slice() {
                    return Err(Error::ShapeMismatch {
                        what: format!("output {i}"),
                        expected: entry.shape.clone(),
                        found: o.shape().to_vec(),
                    });
                }
                ids.push(r.unique_row_ids(entry.shape[0])?);
            }
            let runtime = Runtime::get()?;
            for o in outs.iter() {
                runtime.gpu(o.ordinal())?;
            }
            let row_len = row_len(&entry.shape);
            // Every output's rows first: when one fails (out of memory), no output changes.
            let pulled = outs
                .iter()
                .zip(ids)
                .map(|(o, ids)| {
                    let ordinal = o.ordinal();
                    Ok(match &entry.stored {
                        // Not on a GPU yet: the rows of the initial value.
                        None => {
                            let rows = entry.initial.retain_rows(&ids)?;
                            let rows = rows
                                .as_row_sparse()
                                .map(|r| NDArray::from_host(r.rows().clone()))
                                .expect("retain_rows answers row-sparse")
                                .to_vec::<f32>()?;
                            DeviceRowSparse::upload(&entry.shape, ids, &rows, ordinal)?
                        }
                        Some(stored) => {
                            let dev = stored.ordinal();
                            let mut picked = DeviceRowSparse::alloc(&entry.shape, ids, dev)?;
                            let nnz = picked.nnz();
                            if nnz > 0 {
                                runtime.gpu(dev)?.gather_rows(
                                    &mut picked.rows,
                                    &stored.data,
                                    &picked.ids,
                                    nnz,
                                    row_len,
                                )?;
                            }
                            if ordinal == dev {
                                picked
                            } else {
                                picked.to_gpu(ordinal)?
                            }
                        }
                    })
                })
                .collect::<Result<Vec<DeviceRowSparse>>>();
            let mut gpus: Vec<usize> = outs.iter().map(|o| o.ordinal()).collect();
            gpus.extend(entry.stored.as_ref().map(|s| s.ordinal()));
            match pulled {
                Ok(pulled) => {
                    for (o, p) in outs.iter_mut().zip(pulled) {
                        **o = p;
                    }
                    wait_for(gpus)
                }
                Err(e) => {
                    // What was queued finishes before the call returns.
                    let _ = wait_for(gpus);
                    Err(e)
                }
            }
        })();
        result.map_err(at)
    }

    /// Places `key` for a push on `devs` when it has no merge GPU yet. MXNet's `CommDevice`
    /// takes a single uncompressed value as its own sum and places every known key at the
    /// first reduce (`reduces`: several values, or compression); so here a single value
    /// places its key alone, on the value's GPU (where MXNet's stored copy moves at its first
    /// update), and the first reduce places every unplaced key across its GPUs: a first push
    /// from one GPU does not put every key on that GPU. One difference: MXNet later balances
    /// the merge buffers of all keys, that one's too, while its stored copy stays where the
    /// single value moved it; here a key's value lives on its merge GPU, so that key stays on
    /// its GPU, its size counted there when the others are balanced. The `nccl` store places
    /// every key at its first push (MXNet's `KVStoreNCCL` fixes its GPUs there).
    fn place_for_push(
        &self,
        state: &mut GpuState,
        key: &Key,
        devs: &[usize],
        reduces: bool,
    ) -> Result<()> {
        if state.keys[key].merge_dev.is_some() {
            return Ok(());
        }
        let only = (self.engine == Engine::Device && !reduces).then_some(key);
        self.place_keys(state, devs, only)
    }

    /// Places `only` that key, or else every GPU key that has no merge GPU yet (MXNet places
    /// all known keys at the first multi-device reduce), and uploads their values.
    fn place_keys(&self, state: &mut GpuState, devs: &[usize], only: Option<&Key>) -> Result<()> {
        let unplaced: Vec<Key> = state
            .keys
            .iter()
            .filter(|(k, e)| e.merge_dev.is_none() && only.is_none_or(|only| only == *k))
            .map(|(k, _)| k.clone())
            .collect();
        let sizes: Vec<usize> = unplaced
            .iter()
            .map(|k| state.keys[k].initial.size())
            .collect();
        let mut totals: Vec<usize> = devs
            .iter()
            .map(|d| state.totals.get(d).copied().unwrap_or(0))
            .collect();
        let chosen = match self.engine {
            // MXNet's NCCL store keeps every merge buffer on the first GPU of the push.
            Engine::Nccl => vec![devs[0]; unplaced.len()],
            Engine::Device => place(&sizes, devs, &mut totals),
        };
        // Every upload first: when one fails (out of memory), no key is placed.
        let uploads = unplaced
            .iter()
            .zip(&chosen)
            .map(|(k, &dev)| DeviceArray::from_host(&state.keys[k].initial, dev))
            .collect::<Result<Vec<_>>>()?;
        if self.engine == Engine::Device {
            for (d, t) in devs.iter().zip(totals) {
                state.totals.insert(*d, t);
            }
        }
        for ((k, dev), upload) in unplaced.iter().zip(chosen).zip(uploads) {
            let entry = state.keys.get_mut(k).expect("listed above");
            entry.stored = Some(upload);
            entry.merge_dev = Some(dev);
        }
        // MXNet's `EnableP2P` after placing merge buffers (NCCL manages its own links). The
        // GPUs are distinct: MXNet lists one per value, so that several values on one GPU
        // count as pairs without access and warn.
        if self.engine == Engine::Device && devs.len() > 1 && crate::peer::p2p_requested() {
            let mut set = devs.to_vec();
            set.sort_unstable();
            let access = crate::peer::enable_peer_access(&set)?;
            if let Some(warning) = access.warning() {
                if state.p2p_reported.insert(set) {
                    log::warn!("{}: {warning}", self.type_name());
                }
            }
        }
        Ok(())
    }

    /// Copies the stored value of a GPU-valued key into every output (any GPU).
    ///
    /// # Errors
    /// [`Error::KeyNotInitialized`], shape mismatches, [`Error::Device`].
    pub fn pull_gpu(&self, key: impl Into<Key>, outs: &mut [&mut DeviceArray]) -> Result<()> {
        self.pull_gpu_batch(&mut [(key.into(), outs)])
    }

    /// Pulls several GPU-valued keys in one call: every key and output is checked before any
    /// copy (a bad one changes no output), and the call waits for its GPUs once, at the end.
    ///
    /// # Errors
    /// As [`pull_gpu`](DeviceStore::pull_gpu), naming the key.
    pub fn pull_gpu_batch(&self, batch: &mut [(Key, &mut [&mut DeviceArray])]) -> Result<()> {
        self.key_type
            .check("pull", batch.iter().map(|(key, _)| key))?;
        let state = self.state();
        for (key, outs) in batch.iter() {
            self.check_pull(&state, key, outs)
                .map_err(self.at("pull", key))?;
        }
        let mut touched: Vec<usize> = Vec::new();
        let mut queue_all = || -> Result<()> {
            for (key, outs) in batch.iter_mut() {
                self.queue_pull(&state, key, outs, &mut touched)
                    .map_err(self.at("pull", key))?;
            }
            Ok(())
        };
        // The `nccl` store broadcasts every key of the call in one NCCL group (MXNet).
        let queued = match (self.engine, &state.nccl) {
            (Engine::Nccl, Some(comms)) => comms.group(queue_all),
            _ => queue_all(),
        };
        let waited = wait_for(touched);
        queued.and(waited)
    }

    fn check_pull(&self, state: &GpuState, key: &Key, outs: &[&mut DeviceArray]) -> Result<()> {
        let entry = state.keys.get(key).ok_or(Error::KeyNotInitialized)?;
        for o in outs.iter() {
            if o.shape() != entry.shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    what: format!("an output pulled from key {key}"),
                    expected: entry.shape.clone(),
                    found: o.shape().to_vec(),
                });
            }
        }
        let runtime = Runtime::get()?;
        for o in outs.iter() {
            runtime.gpu(o.ordinal())?;
        }
        Ok(())
    }

    /// Queues the copies (or the NCCL broadcast: the caller opens the NCCL group) of a checked
    /// pull; adds the outputs' GPUs to `touched`.
    fn queue_pull(
        &self,
        state: &GpuState,
        key: &Key,
        outs: &mut [&mut DeviceArray],
        touched: &mut Vec<usize>,
    ) -> Result<()> {
        let entry = state.keys.get(key).ok_or(Error::KeyNotInitialized)?;
        let broadcast = match (&entry.stored, &state.nccl) {
            (Some(stored), Some(comms)) if self.engine == Engine::Nccl => {
                let mut ordinals: Vec<usize> = outs.iter().map(|o| o.ordinal()).collect();
                ordinals.sort_unstable();
                (ordinals == comms.ordinals).then_some((stored, comms))
            }
            _ => None,
        };
        match broadcast {
            Some((stored, comms)) => nccl_broadcast(comms, stored, outs)?,
            None => {
                for o in outs.iter_mut() {
                    match &entry.stored {
                        Some(stored) => o.copy_from(stored)?,
                        None => o.copy_from_host(&entry.initial)?,
                    }
                }
            }
        }
        touched.extend(outs.iter().map(|o| o.ordinal()));
        Ok(())
    }

    /// `push_gpu` then `pull_gpu`. On the `nccl` store without an optimizer, with one value
    /// and one output on each GPU of the same set, it is one `ncclAllReduce` from the values
    /// into the outputs (the stored value becomes the sum too), instead of a reduce and a
    /// broadcast.
    ///
    /// # Errors
    /// As both.
    pub fn pushpull_gpu(
        &self,
        key: impl Into<Key>,
        values: &[&DeviceArray],
        outs: &mut [&mut DeviceArray],
    ) -> Result<()> {
        let key = key.into();
        self.key_type.check("pushpull", [&key])?;
        if self.engine == Engine::Nccl {
            let mut state = self.state();
            if all_reduce_applies(&state, values, outs) {
                return self
                    .nccl_pushpull(&mut state, &key, values, outs)
                    .map_err(self.at("pushpull", &key));
            }
        }
        self.push_gpu(key.clone(), values)?;
        self.pull_gpu(key, outs)
    }

    /// The all-reduce form of `pushpull_gpu` on `nccl` (see there), checked as a push and a
    /// pull are.
    fn nccl_pushpull(
        &self,
        state: &mut GpuState,
        key: &Key,
        values: &[&DeviceArray],
        outs: &mut [&mut DeviceArray],
    ) -> Result<()> {
        let nccl_set = state.nccl.as_ref().map(|c| c.ordinals.clone());
        let devs = self.check_push(state, key, values, nccl_set.as_deref())?;
        self.check_pull(state, key, outs)?;
        let mut touched = Vec::new();
        let queued = self.queue_nccl_pushpull(state, key, &devs, values, outs, &mut touched);
        let waited = wait_for(touched);
        queued.and(waited)
    }

    fn queue_nccl_pushpull(
        &self,
        state: &mut GpuState,
        key: &Key,
        devs: &[usize],
        values: &[&DeviceArray],
        outs: &mut [&mut DeviceArray],
        touched: &mut Vec<usize>,
    ) -> Result<()> {
        self.prepare_push(state, key, (devs, true), touched)?;
        let GpuState { keys, nccl, .. } = state;
        let comms = nccl
            .as_ref()
            .ok_or_else(|| Error::Device("NCCL communicators are not open".into()))?;
        comms.group(|| nccl_all_reduce(comms, values, outs))?;
        let entry = keys.get_mut(key).ok_or(Error::KeyNotInitialized)?;
        let root = entry.merge_dev.expect("placed above");
        let stored = entry.stored.as_mut().expect("placed keys hold their value");
        let sum = outs
            .iter()
            .find(|o| o.ordinal() == root)
            .ok_or_else(|| Error::InvalidArgument(format!("no output on gpu({root})")))?;
        stored.copy_from(sum)
    }

    /// The keys held on the GPUs (initialised with GPU values, or moved there by a push of
    /// GPU arrays), placed or not yet.
    pub fn gpu_keys(&self) -> Vec<Key> {
        self.state().keys.keys().cloned().collect()
    }

    /// The GPU each placed GPU-valued key's merge buffer is on (placement is decided at the
    /// first push).
    pub fn merge_devices(&self) -> BTreeMap<Key, usize> {
        self.state()
            .keys
            .iter()
            .filter_map(|(k, e)| e.merge_dev.map(|d| (k.clone(), d)))
            .collect()
    }

    fn refuse_gpu_keys(&self, operation: &'static str, keys: &[Key]) -> Result<()> {
        match self.first_gpu_key(keys) {
            Some(k) => Err(self.at(operation, k)(Error::DuplicateInit)),
            None => Ok(()),
        }
    }

    fn refuse_sparse(&self, values: &[&NDArray]) -> Result<()> {
        if self.engine == Engine::Nccl
            && values
                .iter()
                .any(|v| v.storage_type() != StorageType::Dense)
        {
            return Err(Error::InvalidArgument(
                "NCCL KVStore does not support sparse storage type".into(),
            ));
        }
        Ok(())
    }
}

/// The arrays of an in-place pushpull read as its values.
fn as_values<'a>(arrays: &'a KeyedOuts<'_>) -> Result<KeyedValues<'a>> {
    KeyedValues::new(
        "pushpull",
        arrays.keys().to_vec(),
        arrays.outs().iter().map(|v| &**v).collect(),
    )
}

/// The GPUs of `ordinals`, each once, in first-seen order; an error for one that does not
/// exist.
fn distinct_gpus(ordinals: impl Iterator<Item = usize>) -> Result<Vec<usize>> {
    let runtime = Runtime::get()?;
    let mut devs: Vec<usize> = Vec::new();
    for ordinal in ordinals {
        runtime.gpu(ordinal)?;
        if !devs.contains(&ordinal) {
            devs.push(ordinal);
        }
    }
    Ok(devs)
}

/// At least one pushed value, each of the key's shape (`what` names a value in the error).
fn check_pushed_shapes<'a>(
    key: &Key,
    expected: &[usize],
    what: &str,
    shapes: impl ExactSizeIterator<Item = &'a [usize]>,
) -> Result<()> {
    if shapes.len() == 0 {
        return Err(Error::InvalidArgument(
            "a push needs at least one value".into(),
        ));
    }
    for found in shapes {
        if found != expected {
            return Err(Error::ShapeMismatch {
                what: format!("{what} pushed to key {key}"),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
    }
    Ok(())
}

/// Whether a `pushpull_gpu` on `nccl` can be one all-reduce: no optimizer or updater runs on
/// the sum, and the values and the outputs are one per GPU of the same set.
fn all_reduce_applies(
    state: &GpuState,
    values: &[&DeviceArray],
    outs: &[&mut DeviceArray],
) -> bool {
    let mut value_gpus: Vec<usize> = values.iter().map(|v| v.ordinal()).collect();
    let mut out_gpus: Vec<usize> = outs.iter().map(|o| o.ordinal()).collect();
    value_gpus.sort_unstable();
    out_gpus.sort_unstable();
    state.optimizer.is_none()
        && !state.custom_updater
        && !value_gpus.is_empty()
        && value_gpus == out_gpus
        && value_gpus.windows(2).all(|w| w[0] != w[1])
}

impl DeviceStore {
    /// Runs the embedded host store's updater (an optimizer without GPU kernels, or a custom
    /// updater) on a GPU key: the sum and the weight copied to the host, the new weight copied
    /// back (the stored value is unchanged when the updater fails).
    fn host_update(&self, key: &Key, stored: &mut DeviceArray, sum: &CudaSlice<f32>) -> Result<()> {
        let grad = NDArray::from_vec(stored.shape(), crate::gpu::download_f32(sum)?)?;
        self.update_dense_on_host(key, &grad, stored)
    }

    /// The host updater's step of the dense GPU weight `stored` with the host gradient `grad`
    /// (dense, or row-sparse: applied as `local` applies it, lazily or not by the optimizer's
    /// `lazy_update`), on a host copy written back.
    fn update_dense_on_host(
        &self,
        key: &Key,
        grad: &NDArray,
        stored: &mut DeviceArray,
    ) -> Result<()> {
        let weight = self.updated_on_host(key, grad, stored)?;
        stored.copy_from_host(&weight)
    }

    /// A host copy of the dense GPU weight `stored` after the host updater's step with `grad`
    /// (the GPU copy unchanged).
    fn updated_on_host(&self, key: &Key, grad: &NDArray, stored: &DeviceArray) -> Result<NDArray> {
        let mut weight = stored.to_host()?;
        self.run_host_updater(key, grad, &mut weight)?;
        Ok(weight)
    }

    /// The host store's updater on `weight` with `grad`; an error if it has none (set for the
    /// push, it went away in between).
    fn run_host_updater(&self, key: &Key, grad: &NDArray, weight: &mut NDArray) -> Result<()> {
        match self.local.run_updater(key, grad, weight)? {
            true => Ok(()),
            false => Err(updater_gone()),
        }
    }

    /// [`update_dense_on_host`](DeviceStore::update_dense_on_host) of a key whose optimizer
    /// state lives on its GPU (`opt`'s kernels update it otherwise): its GPU states and update
    /// count are handed to the host updater first and taken back after, so that one state
    /// serves every push and every state file.
    fn update_on_host_with_gpu_states(
        &self,
        key: &Key,
        opt: &GpuOptimizer,
        grad: &NDArray,
        stored: &mut DeviceArray,
        states: &mut [CudaSlice<f32>],
        counts: &mut Counts,
    ) -> Result<()> {
        if states.len() < opt.state_len() {
            return Err(unreserved());
        }
        let shape = stored.shape().to_vec();
        let arrays = states
            .iter()
            .map(|s| NDArray::from_vec(&shape, crate::gpu::download_f32(s)?))
            .collect::<Result<Vec<_>>>()?;
        let count = counts.get(key).copied().unwrap_or(0);
        self.local.with_optimizer_updater(|updater| {
            updater
                .ok_or_else(updater_gone)?
                .set_key_state(key, arrays, count)
        })?;
        let weight = self.updated_on_host(key, grad, stored)?;
        let (arrays, count) = self.local.with_optimizer_updater(|updater| {
            let updater = updater.ok_or_else(updater_gone)?;
            let arrays = updater
                .state_arrays(key)
                .ok_or_else(updater_gone)?
                .iter()
                .map(|a| a.try_astype(kvstore_base::DType::F32)?.to_vec::<f32>())
                .collect::<Result<Vec<_>>>()?;
            Ok::<_, Error>((arrays, updater.update_count(key).unwrap_or(0)))
        })?;
        // The states first, then the weight, then the count: a copy failing part-way leaves
        // the weight and the count as they were.
        let gpu = Runtime::get()?.gpu(stored.ordinal())?;
        for (state, host) in states.iter_mut().zip(&arrays) {
            gpu.upload(host, state)?;
        }
        stored.copy_from_host(&weight)?;
        counts.insert(key.clone(), count);
        Ok(())
    }

    /// [`host_update`](DeviceStore::host_update) of a row-sparse GPU key: the host updater
    /// gets the row-sparse gradient `grad` and the weight as a row-sparse array of the rows it
    /// stores (`stored_ids`, `None` for every row), as MXNet's updater gets them; an optimizer
    /// updates it as `local` does (lazily or not, by its `lazy_update`). The rows the weight
    /// stores afterwards are noted in `stored_ids`.
    fn host_update_rows(
        &self,
        key: &Key,
        stored: &mut DeviceArray,
        stored_ids: &mut Option<Vec<i64>>,
        grad: &DeviceRowSparse,
    ) -> Result<()> {
        let grad = grad.to_host()?;
        let dense = stored.to_host()?;
        let shape = dense.shape().to_vec();
        let mut weight = match stored_ids {
            None => NDArray::row_sparse_from(&shape, (0..shape[0] as i64).collect(), dense)?,
            Some(ids) => dense.retain_rows(ids)?,
        };
        self.run_host_updater(key, &grad, &mut weight)?;
        if weight.shape() != shape.as_slice() || weight.dtype() != kvstore_base::DType::F32 {
            return Err(Error::InvalidArgument(format!(
                "the updater replaced the weight of key {key} ({shape:?}, float32) by a {:?} {} \
                 array",
                weight.shape(),
                weight.dtype()
            )));
        }
        stored.copy_from_host(&weight.to_dense())?;
        *stored_ids = weight
            .as_row_sparse()
            .filter(|_| !weight.stores_every_row())
            .map(|rows| rows.indices().to_vec());
        Ok(())
    }
}

/// What [`DeviceStore::prepare_row_sparse_push`] made for a push of row-sparse values.
struct PreparedRows {
    /// The key's merge GPU.
    dev: usize,
    update: Update,
    /// Copies on the merge GPU of the values on other GPUs (`None`: a value already there).
    moved: Vec<Option<DeviceRowSparse>>,
    /// The sum an optimizer takes, for several values.
    summed: Option<DeviceRowSparse>,
}

/// The pushed `values` as on the merge GPU: each, or its copy there (`moved`).
fn on_merge_gpu<'a>(
    values: &[&'a DeviceRowSparse],
    moved: &'a [Option<DeviceRowSparse>],
) -> Vec<&'a DeviceRowSparse> {
    values
        .iter()
        .zip(moved)
        .map(|(v, m)| m.as_ref().unwrap_or(v))
        .collect()
}

/// Makes the optimizer states of a key of `shape` updated by `opt`'s kernels on `gpu`: the
/// ones loaded from a file (uploaded at the key's first push), then zeros up to the count
/// `opt` needs.
fn reserve_states(
    gpu: &crate::gpu::Gpu,
    opt: &GpuOptimizer,
    shape: &[usize],
    states: &mut Vec<CudaSlice<f32>>,
    loaded_state: &mut Option<Vec<Vec<f32>>>,
) -> Result<()> {
    if states.is_empty() {
        if let Some(loaded) = loaded_state {
            // Every state uploaded before any is kept: a failed upload leaves the loaded
            // states to the next push.
            let uploaded = loaded
                .iter()
                .map(|host| gpu.upload_new(host))
                .collect::<Result<Vec<_>>>()?;
            *states = uploaded;
            *loaded_state = None;
        }
    }
    while states.len() < opt.state_len() {
        let zeros = gpu
            .stream
            .alloc_zeros::<f32>(shape.iter().product())
            .map_err(cuda("alloc"))?;
        states.push(zeros);
    }
    Ok(())
}

/// The error of a push whose host updater went away while it ran (another thread's
/// `set_optimizer` or `set_updater` in between).
fn updater_gone() -> Error {
    Error::Device("the store's updater disappeared during a push".into())
}

/// The error of a push whose buffers were not reserved first (a bug of this crate).
fn unreserved() -> Error {
    Error::Device("a GPU buffer of the push was not reserved before its arithmetic".into())
}

/// Runs update number `counts[key] + 1` of `opt` on `gpu`: `stored` with the gradient `sum`
/// (the key's states were reserved with the push).
fn optimizer_step(
    gpu: &crate::gpu::Gpu,
    opt: &GpuOptimizer,
    key: &Key,
    counts: &mut Counts,
    stored: &mut DeviceArray,
    states: &mut [CudaSlice<f32>],
    sum: &CudaSlice<f32>,
) -> Result<()> {
    if states.len() < opt.state_len() {
        return Err(unreserved());
    }
    // The count moves on once the step is launched: a refused launch leaves it (and the
    // weight) as they were.
    let t = counts.get(key).copied().unwrap_or(0) + 1;
    opt.step(gpu, t, &mut stored.data, sum, states)?;
    counts.insert(key.clone(), t);
    Ok(())
}

/// Waits for the streams of the GPUs `ordinals` (each once).
fn wait_for(mut ordinals: Vec<usize>) -> Result<()> {
    ordinals.sort_unstable();
    ordinals.dedup();
    if ordinals.is_empty() {
        return Ok(());
    }
    let runtime = Runtime::get()?;
    for ordinal in ordinals {
        runtime
            .gpu(ordinal)?
            .stream
            .synchronize()
            .map_err(cuda("synchronize"))?;
    }
    Ok(())
}

/// The key's merge buffer on `dev`, allocated at its first use (by the push's reservation).
fn merge_buffer<'a>(
    merge: &'a mut Option<DeviceArray>,
    shape: &[usize],
    dev: usize,
) -> Result<&'a mut DeviceArray> {
    match merge {
        Some(m) => Ok(m),
        slot => Ok(slot.insert(DeviceArray::zeros(shape, dev)?)),
    }
}

/// Allocates the compression buffers of a push of `values` reduced on gpu `dev`: per
/// position, the residual (zeros, on the value's GPU; moved along when the position's GPU
/// changed), the codes on the value's GPU and their copy on `dev` when that is another GPU.
fn reserve_compressed(
    codec: &Codec,
    sources: &mut Vec<Source>,
    shape: &[usize],
    values: &[&DeviceArray],
    dev: usize,
) -> Result<()> {
    let n: usize = shape.iter().product();
    for (i, v) in values.iter().enumerate() {
        let ordinal = v.ordinal();
        if i == sources.len() {
            sources.push(Source {
                residual: DeviceArray::zeros(shape, ordinal)?,
                send: PackedArray::zeros(codec, n, ordinal)?,
                recv: None,
            });
        }
        let source = &mut sources[i];
        if source.residual.ordinal() != ordinal {
            // The value of this position now comes from another GPU: its residual follows
            // (the old one is freed on its stream after the copy has read it: `copy_on`).
            source.residual = source.residual.copy_to(ordinal)?;
        }
        if source.send.ordinal() != ordinal || source.send.kind() != codec.kind() {
            source.send = PackedArray::zeros(codec, n, ordinal)?;
        }
        let recv_fits = |r: &PackedArray| r.ordinal() == dev && r.kind() == codec.kind();
        if ordinal != dev && !source.recv.as_ref().is_some_and(recv_fits) {
            source.recv = Some(PackedArray::zeros(codec, n, dev)?);
        }
    }
    Ok(())
}

/// MXNet's `ReduceCompressed` of GPU values into `merge` (buffers reserved by
/// [`reserve_compressed`]): each value quantised on its own GPU against the residual of its
/// position, the codes copied to the merge GPU (unless already there), dequantised into
/// `merge` (the first) or added to it (the others, in order).
fn reduce_compressed(
    codec: &Codec,
    sources: &mut [Source],
    values: &[&DeviceArray],
    merge: &mut DeviceArray,
) -> Result<()> {
    let dev = merge.ordinal();
    if sources.len() < values.len() {
        return Err(unreserved());
    }
    for (i, (v, source)) in values.iter().zip(sources.iter_mut()).enumerate() {
        gpu_codec::quantize(codec, v, &mut source.residual, &mut source.send)?;
        let packed = if v.ordinal() == dev {
            &source.send
        } else {
            let recv = source.recv.as_mut().ok_or_else(unreserved)?;
            recv.copy_from(&source.send)?;
            &*recv
        };
        if i == 0 {
            gpu_codec::dequantize(codec, packed, merge)?;
        } else {
            gpu_codec::dequantize_add(codec, packed, merge)?;
        }
    }
    Ok(())
}

fn open_nccl(runtime: &Runtime, devs: &[usize]) -> Result<NcclComms> {
    let mut ordinals = devs.to_vec();
    ordinals.sort_unstable();
    let streams = ordinals
        .iter()
        .map(|&d| runtime.gpu(d).map(|g| g.stream.clone()))
        .collect::<Result<Vec<_>>>()?;
    let comms = guard_nccl(|| {
        cudarc::nccl::Comm::from_devices(streams)
            .map_err(|e| Error::Device(format!("ncclCommInitAll: {e:?}")))
    })?;
    Ok(NcclComms { ordinals, comms })
}

/// Runs NCCL calls, one sequence at a time in the process, turning a panic of the bindings
/// (a symbol the loaded `libnccl` lacks) into [`Error::Device`].
///
/// The process-wide lock matters with several GPUs: two stores (or two threads) launching
/// collectives on the same GPUs' streams in different orders on different GPUs would wait for
/// each other forever, NCCL's classic deadlock.
fn guard_nccl<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    static NCCL_LAUNCHES: Mutex<()> = Mutex::new(());
    let _one_at_a_time = NCCL_LAUNCHES.lock().unwrap_or_else(PoisonError::into_inner);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Error::Device(format!(
            "NCCL failed: {}",
            crate::probe::panic_text(&*p)
        )))
    })
}

impl NcclComms {
    /// Runs `issue` (which issues collectives with [`collective`](NcclComms::collective))
    /// inside one NCCL group, under the process-wide NCCL lock: NCCL launches them together
    /// at the group's end.
    fn group(&self, issue: impl FnOnce() -> Result<()>) -> Result<()> {
        use cudarc::nccl::result;
        guard_nccl(|| {
            let err = |e: result::NcclError| Error::Device(format!("NCCL: {e:?}"));
            result::group_start().map_err(err)?;
            let outcome = issue();
            result::group_end().map_err(err)?;
            outcome
        })
    }

    /// Issues one collective on every GPU of the communicators, rooted at the GPU
    /// `root_ordinal`: `call(comm, ordinal, root rank)` issues the GPU's part. Only inside
    /// [`group`](NcclComms::group): the parts are issued from one thread.
    fn collective(
        &self,
        root_ordinal: usize,
        mut call: impl FnMut(&cudarc::nccl::Comm, usize, i32) -> Result<()>,
    ) -> Result<()> {
        let root = self
            .ordinals
            .iter()
            .position(|&d| d == root_ordinal)
            .ok_or_else(|| {
                Error::InvalidArgument("NCCL KVStore supports only single set of devices".into())
            })? as i32;
        for (comm, &ordinal) in self.comms.iter().zip(&self.ordinals) {
            call(comm, ordinal, root)?;
        }
        Ok(())
    }
}

/// An NCCL call's error as [`Error::Device`].
fn nccl_error(e: cudarc::nccl::result::NcclError) -> Error {
    Error::Device(format!("NCCL: {e:?}"))
}

/// The value of `values` on GPU `ordinal`: an error when there is none (the communicators'
/// GPUs and the values' were checked to be the same set).
fn on_gpu<'a>(values: &[&'a DeviceArray], ordinal: usize) -> Result<&'a DeviceArray> {
    values
        .iter()
        .copied()
        .find(|v| v.ordinal() == ordinal)
        .ok_or_else(|| Error::InvalidArgument(format!("no pushed value on gpu({ordinal})")))
}

/// Issues `ncclReduce(sum)` of one value per GPU into `merge` (on the root GPU); inside
/// [`NcclComms::group`].
fn nccl_reduce(comms: &NcclComms, values: &[&DeviceArray], merge: &mut DeviceArray) -> Result<()> {
    use cudarc::nccl::ReduceOp;
    let root_ordinal = merge.ordinal();
    comms.collective(root_ordinal, |comm, ordinal, root| {
        let src = on_gpu(values, ordinal)?;
        let recv = (ordinal == root_ordinal).then_some(&mut merge.data);
        comm.reduce(&src.data, recv, &ReduceOp::Sum, root)
            .map(drop)
            .map_err(nccl_error)
    })
}

/// Issues `ncclBroadcast` of `stored` (on the root GPU) into one output per GPU of the
/// communicators (MXNet's `KVStoreNCCL` pull); inside [`NcclComms::group`].
fn nccl_broadcast(
    comms: &NcclComms,
    stored: &DeviceArray,
    outs: &mut [&mut DeviceArray],
) -> Result<()> {
    let root_ordinal = stored.ordinal();
    comms.collective(root_ordinal, |comm, ordinal, root| {
        let out = outs
            .iter_mut()
            .find(|o| o.ordinal() == ordinal)
            .ok_or_else(|| Error::InvalidArgument(format!("no output on gpu({ordinal})")))?;
        let send = (ordinal == root_ordinal).then_some(&stored.data);
        comm.broadcast(send, &mut out.data, root)
            .map(drop)
            .map_err(nccl_error)
    })
}

/// Issues `ncclAllReduce(sum)` of one value per GPU into one output per GPU of the
/// communicators; inside [`NcclComms::group`].
fn nccl_all_reduce(
    comms: &NcclComms,
    values: &[&DeviceArray],
    outs: &mut [&mut DeviceArray],
) -> Result<()> {
    use cudarc::nccl::ReduceOp;
    // Any root of the set: an all-reduce has none.
    let first = comms.ordinals[0];
    comms.collective(first, |comm, ordinal, _| {
        let src = on_gpu(values, ordinal)?;
        let out = outs
            .iter_mut()
            .find(|o| o.ordinal() == ordinal)
            .ok_or_else(|| Error::InvalidArgument(format!("no output on gpu({ordinal})")))?;
        comm.all_reduce(&src.data, &mut out.data, &ReduceOp::Sum)
            .map(drop)
            .map_err(nccl_error)
    })
}

impl KVStoreBase for DeviceStore {
    fn type_name(&self) -> &str {
        self.local.type_name()
    }

    fn rank(&self) -> usize {
        0
    }

    fn num_workers(&self) -> usize {
        1
    }

    fn is_capable(&self, capability: Capability) -> bool {
        match (self.engine, capability) {
            (Engine::Nccl, Capability::RowSparse) => false,
            (Engine::Device, Capability::GradientCompression) => true,
            _ => self.local.is_capable(capability),
        }
    }

    /// Takes `NDArray`s in GPU memory (this crate's) and reduces them on the GPUs.
    fn handles_device_arrays(&self) -> bool {
        true
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.key_type.check("broadcast", values.keys())?;
        if any_on_device(values.values().iter().copied()) {
            // Every check first: the outputs' keys, shapes and memory, then the new keys.
            outs.check_against("broadcast", values)?;
            let keys: BTreeSet<Key> = values.keys().iter().cloned().collect();
            self.check_gpu_outs("broadcast", &keys, Some(values), outs)?;
            self.init_gpu_values(values)?;
            return self.pull_routed("broadcast", outs, priority, true);
        }
        self.refuse_gpu_keys("broadcast", values.keys())?;
        self.refuse_sparse(values.values())?;
        kvstore_base::with_written_outs_on_host(outs, |o| {
            self.local.broadcast_batch(values, o, priority)
        })
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.key_type.check("pushpull", values.keys())?;
        if any_on_device(values.values().iter().copied()) || self.any_gpu_key(values.keys()) {
            return self.pushpull_routed(values, outs, priority);
        }
        self.refuse_sparse(values.values())?;
        if any_on_device(outs.outs().iter().map(|o| &**o)) {
            // Host keys only: the host path, its outputs on GPUs staged.
            return kvstore_base::with_written_outs_on_host(outs, |o| {
                self.pushpull_batch(values, o, priority)
            });
        }
        if self.compression_active() {
            outs.check_against("pushpull", values)?;
            return self.push_compressed("pushpull", values, Some(outs), priority);
        }
        self.local.pushpull_batch(values, outs, priority)
    }

    fn pushpull_in_place_batch(&self, values: &mut KeyedOuts<'_>, priority: i32) -> Result<()> {
        self.key_type.check("pushpull", values.keys())?;
        if any_on_device(values.outs().iter().map(|v| &**v)) || self.any_gpu_key(values.keys()) {
            // The arrays are pushed, then written by the pull (the same arrays, so the pull's
            // checks hold once the push's did).
            self.push_routed("pushpull", &as_values(values)?, priority)?;
            return self.pull_routed("pushpull", values, priority, true);
        }
        if self.compression_active() {
            // The caller's arrays are only read until the sums are computed, then written by
            // the pull.
            let _pass = self.gate.enter(priority);
            let mut compression = self.compression();
            let merged =
                compression.merge(&as_values(values)?, self.local.type_name(), "pushpull")?;
            {
                let batch = merged.batch("pushpull")?;
                self.local.pushpull_batch(&batch, values, priority)?;
            }
            merged.commit(&mut compression.residuals);
            return Ok(());
        }
        self.local.pushpull_in_place_batch(values, priority)
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        self.key_type.check("init", values.keys())?;
        if any_on_device(values.values().iter().copied()) {
            return self.init_gpu_values(values);
        }
        self.refuse_gpu_keys("init", values.keys())?;
        self.refuse_sparse(values.values())?;
        self.local.init_batch(values)
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        self.key_type.check("push", values.keys())?;
        if any_on_device(values.values().iter().copied()) || self.any_gpu_key(values.keys()) {
            return self.push_routed("push", values, priority);
        }
        self.refuse_sparse(values.values())?;
        if self.compression_active() {
            return self.push_compressed("push", values, None, priority);
        }
        self.local.push_batch(values, priority)
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        self.key_type.check("pull", outs.keys())?;
        if self.engine == Engine::Nccl && !ignore_sparse {
            return Err(Error::InvalidArgument(
                "nccl kvstore pull doesn't support ignore_sparse=False".into(),
            ));
        }
        if self.pull_needs_routing(outs) {
            return self.pull_routed("pull", outs, priority, ignore_sparse);
        }
        self.local.pull_batch(outs, priority, ignore_sparse)
    }

    fn row_sparse_pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        if self.engine == Engine::Nccl {
            return Err(self.unsupported("row_sparse_pull"));
        }
        self.key_type.check("row_sparse_pull", outs.keys())?;
        if self.any_gpu_key(outs.keys()) {
            return self.row_sparse_pull_routed(outs, row_ids, priority);
        }
        // Host keys: outputs and row ids in GPU memory go through the host.
        kvstore_base::with_arrays_on_host(row_ids, |ids| {
            kvstore_base::with_outs_on_host(outs, |o| {
                self.local.row_sparse_pull_batch(o, ids, priority)
            })
        })
    }

    /// Also for GPU values: a new optimizer starts from fresh states and update counts, as
    /// the CPU store's new updater does.
    fn set_optimizer(&self, optimizer: &OptimizerSpec) -> Result<()> {
        let mut state = self.state();
        self.local.set_optimizer(optimizer)?;
        state.reset_optimizer();
        state.optimizer = Some(optimizer.clone());
        state.custom_updater = false;
        Ok(())
    }

    fn set_updater(&self, updater: Updater) -> Result<()> {
        let mut state = self.state();
        self.local.set_updater(updater)?;
        state.reset_optimizer();
        state.optimizer = None;
        state.custom_updater = true;
        Ok(())
    }

    /// `device`: parses `params` as MXNet does (`type` `2bit` or `1bit`, `threshold`, MXNet's
    /// messages for anything else) and compresses every later push, of CPU and GPU values
    /// (keys initialised before included). Compression cannot be turned off; a new setting
    /// replaces the type and threshold and keeps the residuals, as MXNet's. `nccl`: refused,
    /// as MXNet's NCCL store.
    fn set_gradient_compression(&self, params: &CompressionParams) -> Result<()> {
        if self.engine == Engine::Nccl {
            return Err(Error::Unsupported {
                store: self.local.type_name().to_string(),
                operation: NCCL_NO_COMPRESSION,
            });
        }
        let spec = CompressionSpec::from_params(params)?;
        self.compression().codec = Some(spec.codec());
        Ok(())
    }

    /// Also the states of GPU keys (copied into the file the host store writes).
    fn save_optimizer_states(&self, path: &Path, dump_optimizer: bool) -> Result<()> {
        self.hand_gpu_states_to_host()?;
        self.local.save_optimizer_states(path, dump_optimizer)
    }

    /// Also the states of GPU keys (copied to their GPUs).
    fn load_optimizer_states(&self, path: &Path) -> Result<()> {
        self.local.load_optimizer_states(path)?;
        self.take_gpu_states_from_host()
    }

    fn barrier(&self) -> Result<()> {
        self.local.barrier()
    }

    fn send_command_to_servers(&self, head: i32, body: &str) -> Result<()> {
        self.local.send_command_to_servers(head, body)
    }
}
