//! The `KVStoreBase` calls of the `device` and `nccl` stores on `NDArray`s in GPU memory
//! (this crate's [`DeviceArray`]s behind [`NDArray::device`]): reduced, updated and pulled on
//! the GPUs by the same code as the `*_gpu` calls, with no trip through host memory.
//!
//! A key initialised with a GPU array is a GPU key. A key initialised with a host array moves
//! to the GPUs at its first push of GPU arrays (its value read from the host store), as
//! MXNet's device store keeps a key's value on its merge GPU; from then on host arrays pushed
//! to it are copied to its GPU, and a pull into host arrays copies from the GPU. A call's
//! pairs are split by where their key lives: the host keys' go to the embedded host store,
//! the GPU-bound keys' are all checked before either part runs.
//!
//! Row-sparse arrays in GPU memory ([`DeviceRowSparse`] behind
//! [`NDArray::device_row_sparse`]): one initialising a key makes a row-sparse GPU key, whose
//! pushes are reduced (and updated) on its merge GPU by
//! [`push_gpu_row_sparse`](DeviceStore::push_gpu_row_sparse)'s code (an optimizer updating
//! them lazily) and whose `row_sparse_pull` gathers the rows there
//! ([`row_sparse_pull_gpu`](DeviceStore::row_sparse_pull_gpu)); a dense GPU key takes them as
//! row-sparse gradients the same way; host keys take them staged through host memory, as
//! `local` does. Row-sparse pushes go through a path of their own: everything they allocate
//! is made for every key of the call before any part of it runs.

use std::collections::HashMap;

use kvstore_base::{with_written_outs_on_host, Context, KeyedOuts, KeyedValues};

use super::*;

/// Whether one of `arrays` is in device memory (dense or row-sparse).
pub(super) fn any_on_device<'a>(arrays: impl IntoIterator<Item = &'a NDArray>) -> bool {
    arrays.into_iter().any(|a| a.in_device_memory())
}

/// The [`DeviceRowSparse`] of a row-sparse value in GPU memory; `None` for any other array.
///
/// # Errors
/// Device memory of another backend.
fn gpu_rows(array: &NDArray) -> Result<Option<&DeviceRowSparse>> {
    match array.device_row_sparse() {
        None => Ok(None),
        Some(memory) => memory.as_any().downcast_ref().map(Some).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "a row-sparse array on {} made by another device backend",
                array.context()
            ))
        }),
    }
}

/// One row-sparse value of a push on a GPU: the caller's array, or a host value's copy.
enum GpuRows<'v> {
    Caller(&'v DeviceRowSparse),
    Uploaded(DeviceRowSparse),
}

/// The row-sparse values of one key of a push, on GPUs.
struct RowsPush<'v> {
    key: Key,
    values: Vec<GpuRows<'v>>,
}

impl RowsPush<'_> {
    fn values(&self) -> Vec<&DeviceRowSparse> {
        self.values
            .iter()
            .map(|v| match v {
                GpuRows::Caller(array) => *array,
                GpuRows::Uploaded(copy) => copy,
            })
            .collect()
    }
}

/// The [`DeviceArray`] of a value in GPU memory; `None` for a host array.
///
/// # Errors
/// Device memory of another backend.
fn gpu_array(array: &NDArray) -> Result<Option<&DeviceArray>> {
    match array.device() {
        None => Ok(None),
        Some(memory) => memory.as_any().downcast_ref().map(Some).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "an array on {} made by another device backend",
                array.context()
            ))
        }),
    }
}

/// [`gpu_array`], writable.
fn gpu_array_mut(array: &mut NDArray) -> Result<Option<&mut DeviceArray>> {
    let context = array.context();
    match array.device_mut()? {
        None => Ok(None),
        Some(memory) => memory.as_any_mut().downcast_mut().map(Some).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "an array on {context} made by another device backend"
            ))
        }),
    }
}

impl DeviceStore {
    /// The GPU arrays of `values`, per key in call order (a key listed twice twice).
    fn gpu_values<'a>(
        &self,
        operation: &'static str,
        values: &KeyedValues<'a>,
    ) -> Result<Vec<(Key, Vec<&'a DeviceArray>)>> {
        let mut batch: Vec<(Key, Vec<&'a DeviceArray>)> = Vec::new();
        for (key, value) in values.iter() {
            let array = gpu_array(value).map_err(self.at(operation, key))?;
            let array = array.ok_or_else(|| {
                self.at(operation, key)(Error::InvalidArgument(
                    "the call mixes host and GPU arrays: pass the values of one call all on \
                     GPUs or all on the host"
                        .into(),
                ))
            })?;
            match batch.last_mut() {
                Some((k, arrays)) if k == key => arrays.push(array),
                _ => batch.push((key.clone(), vec![array])),
            }
        }
        Ok(batch)
    }

    /// `init` with GPU values: every key checked first (new, once in the call, a float32
    /// array), then each becomes a GPU key holding a host copy of its value until its first
    /// push places it.
    pub(super) fn init_gpu_values(&self, values: &KeyedValues<'_>) -> Result<()> {
        // All the call's values on GPUs (this crate's memory, dense or row-sparse), one per key.
        for (key, value) in values.iter() {
            let at = || self.at("init", key);
            let on_gpu = gpu_array(value).map_err(at())?.is_some()
                || gpu_rows(value).map_err(at())?.is_some();
            if !on_gpu {
                return Err(at()(Error::InvalidArgument(
                    "the call mixes host and GPU arrays: pass the values of one call all on \
                     GPUs or all on the host"
                        .into(),
                )));
            }
        }
        values.check_one_value_per_key(self.type_name(), "init")?;
        let pairs: Vec<(Key, &NDArray)> = values.iter().map(|(k, v)| (k.clone(), v)).collect();
        self.init_gpu_keys(&pairs)
    }

    /// Pushes GPU values that [`check_gpu_push`](DeviceStore::check_gpu_push) accepted: keys
    /// initialised on the host move to the GPUs first, then one
    /// [`push_gpu_batch`](DeviceStore::push_gpu_batch).
    fn push_checked_gpu_values(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
    ) -> Result<()> {
        let batch = self.gpu_values(operation, values)?;
        for (key, arrays) in &batch {
            self.adopt(operation, key, arrays[0].shape())?;
        }
        let refs: Vec<(Key, &[&DeviceArray])> =
            batch.iter().map(|(k, a)| (k.clone(), &a[..])).collect();
        self.push_gpu_batch_for(operation, &refs)
    }

    /// Checks that the host store's `key` can move to the GPUs for GPU values of `shape`: a
    /// dense float32 value of that shape.
    fn check_adoptable(&self, operation: &'static str, key: &Key, shape: &[usize]) -> Result<()> {
        let at = self.at(operation, key);
        let (found, dtype, storage) = self
            .local
            .value_info(key)
            .ok_or_else(|| self.at(operation, key)(Error::KeyNotInitialized))?;
        if storage != StorageType::Dense {
            return Err(at(Error::InvalidArgument(format!(
                "key {key} holds a row-sparse value on the host: GPU arrays cannot be pushed to it"
            ))));
        }
        if dtype != kvstore_base::DType::F32 {
            return Err(at(Error::DTypeMismatch {
                what: format!("a GPU value pushed to key {key}"),
                expected: dtype,
                found: kvstore_base::DType::F32,
            }));
        }
        if found != shape {
            return Err(at(Error::ShapeMismatch {
                what: format!("a GPU value pushed to key {key}"),
                expected: found,
                found: shape.to_vec(),
            }));
        }
        Ok(())
    }

    /// Makes `key` a GPU key if the host store holds it (its current value, of `shape`, read
    /// from there). Nothing for a GPU key; [`Error::KeyNotInitialized`] for an unknown one.
    fn adopt(&self, operation: &'static str, key: &Key, shape: &[usize]) -> Result<()> {
        if self.state().keys.contains_key(key) {
            return Ok(());
        }
        self.check_adoptable(operation, key, shape)?;
        let mut value = NDArray::zeros(shape, kvstore_base::DType::F32);
        self.local
            .pull(key.clone(), &mut value)
            .map_err(|e| match e.root() {
                Error::KeyNotInitialized => self.at(operation, key)(Error::KeyNotInitialized),
                _ => e,
            })?;
        // Its optimizer state and update count go with it: the GPU kernels continue what the
        // host updater did (fresh states would restart adam's bias correction, and lose
        // momentum).
        let host_state = self
            .local
            .with_optimizer_updater(|u| super::states::host_state(u.as_deref(), key))?;
        let mut state = self.state();
        if state.keys.contains_key(key) {
            return Ok(());
        }
        let mut entry = GpuEntry::new(&value);
        let opt = state
            .optimizer
            .as_ref()
            .and_then(|s| GpuOptimizer::parse(s).ok());
        if let (Some(opt), Some((arrays, count))) = (opt, host_state) {
            if entry.takes_state(&opt, &arrays) {
                entry.loaded_state = Some(arrays);
                state.counts.insert(key.clone(), count);
            }
        }
        state.keys.insert(key.clone(), entry);
        Ok(())
    }

    /// The first of `keys` that is a GPU key.
    pub(super) fn first_gpu_key<'k>(&self, keys: &'k [Key]) -> Option<&'k Key> {
        let state = self.state();
        keys.iter().find(|k| state.keys.contains_key(*k))
    }

    /// Whether one of `keys` is a GPU key.
    pub(super) fn any_gpu_key(&self, keys: &[Key]) -> bool {
        self.first_gpu_key(keys).is_some()
    }

    /// Checks host `values` for GPU keys (dense float32 of the key's shape, with the errors
    /// `local` gives) and says where each goes: `(key, value, GPU)` for the pairs of GPU keys
    /// (`device`: the key's merge GPU, gpu(0) before it is placed; `nccl`: the `j`-th value of
    /// a key to the `j`-th GPU of the communicators), and the other pairs as they are.
    #[allow(clippy::type_complexity)]
    fn host_values_for_gpu_keys<'v>(
        &self,
        operation: &'static str,
        values: &KeyedValues<'v>,
    ) -> Result<(Vec<(Key, &'v NDArray, usize)>, Vec<(Key, &'v NDArray)>)> {
        let runtime = Runtime::get()?;
        let state = self.state();
        let (mut gpu_pairs, mut host_pairs) = (Vec::new(), Vec::new());
        let mut seen: BTreeMap<Key, usize> = BTreeMap::new();
        for (key, value) in values.iter() {
            let Some(entry) = state.keys.get(key) else {
                host_pairs.push((key.clone(), value));
                continue;
            };
            let at = self.at(operation, key);
            let position = seen.entry(key.clone()).or_insert(0);
            let j = *position;
            *position += 1;
            let what = format!("value {j} of the key");
            if entry.row_sparse || value.storage_type() != StorageType::Dense {
                return Err(at(Error::InvalidArgument(format!(
                    "{what}: GPU key {key} takes dense values here (row-sparse GPU keys: \
                     push_gpu_row_sparse)"
                ))));
            }
            if value.shape() != entry.shape.as_slice() {
                return Err(at(Error::ShapeMismatch {
                    what,
                    expected: entry.shape.clone(),
                    found: value.shape().to_vec(),
                }));
            }
            if value.dtype() != kvstore_base::DType::F32 {
                return Err(at(Error::DTypeMismatch {
                    what,
                    expected: kvstore_base::DType::F32,
                    found: value.dtype(),
                }));
            }
            let ordinal = match (self.engine, &state.nccl) {
                (Engine::Nccl, Some(comms)) => comms.ordinals[j % comms.ordinals.len()],
                (Engine::Nccl, None) => j % runtime.len(),
                (Engine::Device, _) => entry.merge_dev.unwrap_or(0),
            };
            gpu_pairs.push((key.clone(), value, ordinal));
        }
        Ok((gpu_pairs, host_pairs))
    }

    /// Whether a pull must go through [`pull_routed`](DeviceStore::pull_routed): an output
    /// in GPU memory, or a GPU key.
    pub(super) fn pull_needs_routing(&self, outs: &KeyedOuts<'_>) -> bool {
        any_on_device(outs.outs().iter().map(|o| &**o)) || self.any_gpu_key(outs.keys())
    }

    /// A pull whose outputs may be in GPU or host memory and whose keys may be GPU or host
    /// keys: GPU keys into GPU outputs by [`pull_gpu_batch`](DeviceStore::pull_gpu_batch),
    /// into host outputs by a copy from the GPU; host keys by the host store (outputs on GPUs
    /// receiving its results). Every GPU key's outputs are checked before any is written.
    pub(super) fn pull_routed(
        &self,
        operation: &'static str,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        let gpu_keys: BTreeSet<Key> = {
            let state = self.state();
            outs.keys()
                .iter()
                .filter(|k| state.keys.contains_key(*k))
                .cloned()
                .collect()
        };
        // Checks of the GPU keys' outputs, before anything is written.
        self.check_gpu_outs(operation, &gpu_keys, None, outs)?;
        let (mut host_keys, mut host_outs) = (Vec::new(), Vec::new());
        let mut gpu_outs: Vec<(Key, &mut NDArray)> = Vec::new();
        for (key, out) in outs.iter_mut() {
            if gpu_keys.contains(key) {
                gpu_outs.push((key.clone(), &mut **out));
            } else {
                host_keys.push(key.clone());
                host_outs.push(&mut **out);
            }
        }
        // GPU keys: dense GPU outputs in one batch; host outputs, and row-sparse ones (a pull
        // writes them as `local`'s: the stored rows), from a host copy of the value, made (with
        // new GPU memory for row-sparse outputs) before anything is written.
        let mut batch: Vec<(Key, Vec<&mut DeviceArray>)> = Vec::new();
        let mut from_host: Vec<(&mut NDArray, NDArray)> = Vec::new();
        let mut values: BTreeMap<Key, NDArray> = BTreeMap::new();
        for (key, out) in gpu_outs {
            if out.context() == Context::Cpu || out.storage_type() == StorageType::RowSparse {
                // As `local`: with `ignore_sparse`, row-sparse outputs are skipped.
                if ignore_sparse && out.storage_type() == StorageType::RowSparse {
                    continue;
                }
                let at = || self.at(operation, &key);
                if !values.contains_key(&key) {
                    values.insert(key.clone(), self.gpu_key_on_host(&key).map_err(at())?);
                }
                let value = &values[&key];
                let result = match out.row_sparse_replacement(value).map_err(at())? {
                    Some(fresh) => fresh,
                    None => {
                        let mut result = out.zeros_on_host_like();
                        result.assign(value).map_err(at())?;
                        result
                    }
                };
                from_host.push((out, result));
                continue;
            }
            let array = gpu_array_mut(out)?.expect("checked above: on a GPU");
            match batch.last_mut() {
                Some((k, arrays)) if *k == key => arrays.push(array),
                _ => batch.push((key, vec![array])),
            }
        }
        // Host keys: the host store, outputs on GPUs staged.
        if !host_keys.is_empty() {
            let mut host_batch = KeyedOuts::new(operation, host_keys, host_outs)?;
            with_written_outs_on_host(&mut host_batch, |o| {
                self.local.pull_batch(o, priority, ignore_sparse)
            })?;
        }
        if !batch.is_empty() {
            let mut slices: Vec<(Key, &mut [&mut DeviceArray])> = batch
                .iter_mut()
                .map(|(k, a)| (k.clone(), &mut a[..]))
                .collect();
            self.pull_gpu_batch(&mut slices)?;
        }
        for (out, result) in from_host {
            *out = result;
        }
        Ok(())
    }

    /// The value of a GPU key, copied to the host: row-sparse for a row-sparse key (the rows
    /// its value stores), dense otherwise.
    fn gpu_key_on_host(&self, key: &Key) -> Result<NDArray> {
        let state = self.state();
        let entry = state.keys.get(key).ok_or(Error::KeyNotInitialized)?;
        let dense = match &entry.stored {
            Some(stored) => stored.to_host()?,
            None => entry.initial.clone(),
        };
        if !entry.row_sparse {
            return Ok(dense);
        }
        match &entry.stored_ids {
            Some(ids) => dense.retain_rows(ids),
            None => dense.retain_rows(&(0..entry.shape[0] as i64).collect::<Vec<_>>()),
        }
    }
}

impl DeviceStore {
    /// A `row_sparse_pull` that involves GPU keys: every output of a GPU key checked first (a
    /// row-sparse GPU key, the key's shape, row ids in range); then each GPU key's rows
    /// gathered on its merge GPU into new row-sparse arrays in the outputs' GPU memory
    /// ([`row_sparse_pull_gpu`](DeviceStore::row_sparse_pull_gpu)), or copied for host
    /// outputs; then the host keys' outputs by the host store; then the GPU keys' outputs
    /// replaced by their results (so a GPU out of memory writes no output).
    pub(super) fn row_sparse_pull_routed(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        const OP: &str = "row_sparse_pull";
        Error::check_row_id_count(outs.len(), row_ids.len())?;
        let mut gpu_ids: Vec<Vec<i64>> = Vec::new();
        let (mut host_keys, mut host_outs, mut host_ids) = (Vec::new(), Vec::new(), Vec::new());
        let mut gpu_outs: Vec<(Key, &mut NDArray)> = Vec::new();
        {
            let state = self.state();
            for (i, (key, out)) in outs.iter_mut().enumerate() {
                let Some(entry) = state.keys.get(key) else {
                    host_keys.push(key.clone());
                    host_outs.push(&mut **out);
                    host_ids.push(row_ids[i]);
                    continue;
                };
                let at = || self.at(OP, key);
                if !entry.row_sparse {
                    return Err(at()(Error::InvalidArgument(
                        "row_sparse_pull needs a row-sparse stored value; this key is dense \
                         (use pull)"
                            .into(),
                    )));
                }
                if out.storage_type() != StorageType::RowSparse {
                    return Err(at()(Error::InvalidArgument(format!(
                        "output {i} must be row-sparse for row_sparse_pull"
                    ))));
                }
                if out.shape() != entry.shape.as_slice() {
                    return Err(at()(Error::ShapeMismatch {
                        what: format!("output {i}"),
                        expected: entry.shape.clone(),
                        found: out.shape().to_vec(),
                    }));
                }
                gpu_rows(out).map_err(at())?;
                gpu_ids.push(row_ids[i].unique_row_ids(entry.shape[0]).map_err(at())?);
                gpu_outs.push((key.clone(), &mut **out));
            }
        }
        // Every GPU key's results into new arrays (gathered on its merge GPU), before any
        // output is written.
        let mut results: Vec<NDArray> = Vec::with_capacity(gpu_outs.len());
        for ((key, out), ids) in gpu_outs.iter().zip(gpu_ids) {
            let at = || self.at(OP, key);
            let result = match gpu_rows(out).map_err(at())? {
                Some(array) => {
                    let mut fresh =
                        DeviceRowSparse::zeros(array.shape(), array.ordinal()).map_err(at())?;
                    let ids = NDArray::from_vec(&[ids.len()], ids)?;
                    self.row_sparse_pull_gpu(key.clone(), &mut [&mut fresh], &[&ids])?;
                    NDArray::from_device_row_sparse(Box::new(fresh))
                }
                // A host output: the rows of a host copy of the value.
                None => self
                    .gpu_key_on_host(key)
                    .and_then(|value| value.retain_rows(&ids)?.try_astype(out.dtype()))
                    .map_err(at())?,
            };
            results.push(result);
        }
        if !host_keys.is_empty() {
            let mut host_batch = KeyedOuts::new(OP, host_keys, host_outs)?;
            kvstore_base::with_arrays_on_host(&host_ids, |ids| {
                kvstore_base::with_outs_on_host(&mut host_batch, |o| {
                    self.local.row_sparse_pull_batch(o, ids, priority)
                })
            })?;
        }
        for ((_, out), result) in gpu_outs.into_iter().zip(results) {
            *out = result;
        }
        Ok(())
    }
}

/// The pairs of a call split by where their key lives.
struct Split<'v> {
    gpu_keys: Vec<Key>,
    gpu_values: Vec<&'v NDArray>,
    host_keys: Vec<Key>,
    host_values: Vec<&'v NDArray>,
}

impl DeviceStore {
    /// The keys a push of `values` leaves on the GPUs: the GPU keys, and the keys that receive
    /// GPU arrays (moved to the GPUs by the push).
    fn gpu_bound_keys(&self, values: &KeyedValues<'_>) -> BTreeSet<Key> {
        let state = self.state();
        values
            .iter()
            .filter(|(k, v)| state.keys.contains_key(*k) || v.device().is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Checks the outputs of GPU-bound keys before anything is written: the shape of the key
    /// (of its values, among `values`, for a key not on the GPUs yet) and GPU memory this
    /// crate made.
    pub(super) fn check_gpu_outs(
        &self,
        operation: &'static str,
        gpu_keys: &BTreeSet<Key>,
        values: Option<&KeyedValues<'_>>,
        outs: &KeyedOuts<'_>,
    ) -> Result<()> {
        let state = self.state();
        // Each key's first value, for keys not on the GPUs yet.
        let mut first_values: HashMap<&Key, &NDArray> = HashMap::new();
        for (k, v) in values.iter().flat_map(|v| v.iter()) {
            first_values.entry(k).or_insert(v);
        }
        for (key, out) in outs.keys().iter().zip(outs.outs()) {
            if !gpu_keys.contains(key) {
                continue;
            }
            let expected = match state.keys.get(key) {
                Some(entry) => entry.shape.clone(),
                None => match first_values.get(key) {
                    Some(v) => v.shape().to_vec(),
                    None => continue, // check_against names it
                },
            };
            if out.shape() != expected.as_slice() {
                return Err(self.at(operation, key)(Error::ShapeMismatch {
                    what: format!("an output pulled from key {key}"),
                    expected,
                    found: out.shape().to_vec(),
                }));
            }
            gpu_array(out).map_err(self.at(operation, key))?;
        }
        Ok(())
    }

    /// The GPU-bound pairs of a call with every value on a GPU: GPU arrays as they are (shared,
    /// not copied), host values for GPU keys checked and copied to their GPUs
    /// ([`host_values_for_gpu_keys`](DeviceStore::host_values_for_gpu_keys)).
    fn gpu_part_on_device(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
    ) -> Result<Vec<NDArray>> {
        if let Some((key, _)) = values.iter().find(|(_, v)| v.device_row_sparse().is_some()) {
            return Err(self.at(operation, key)(Error::InvalidArgument(format!(
                "key {key} takes dense values here (it is dense, or receives dense GPU values in \
                 this call): a row-sparse GPU value cannot be pushed with them"
            ))));
        }
        let (host_keys, host_values): (Vec<Key>, Vec<&NDArray>) = values
            .iter()
            .filter(|(_, v)| v.device().is_none())
            .map(|(k, v)| (k.clone(), v))
            .unzip();
        let mut uploaded = Vec::new();
        if !host_keys.is_empty() {
            let host_part = KeyedValues::new(operation, host_keys, host_values)?;
            let (gpu_pairs, others) = self.host_values_for_gpu_keys(operation, &host_part)?;
            if let Some((key, _)) = others.first() {
                return Err(self.at(operation, key)(Error::KeyNotInitialized));
            }
            for (key, value, ordinal) in gpu_pairs {
                uploaded.push(
                    value
                        .to_context(Context::Gpu(ordinal))
                        .map_err(self.at(operation, &key))?,
                );
            }
        }
        let mut uploaded = uploaded.into_iter();
        values
            .values()
            .iter()
            .map(|v| match v.device() {
                Some(_) => Ok((*v).clone()),
                None => uploaded.next().ok_or_else(|| {
                    Error::Device("a host value of the call was not copied to a GPU".into())
                }),
            })
            .collect()
    }

    /// A push that involves GPU arrays or GPU keys: the GPU-bound pairs brought onto the GPUs
    /// and checked as `push_gpu_batch` checks them, then the host keys' pairs by the host path,
    /// then the GPU-bound pairs. A refused call changes nothing.
    pub(super) fn push_routed(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        priority: i32,
    ) -> Result<()> {
        let row_keys = self.rows_bound_keys(values);
        let gpu_keys = self.gpu_bound_keys(values);
        let split = split_values(values, &gpu_keys, &row_keys);
        let gpu_part = self.checked_gpu_part(operation, &split)?;
        let rows_part = self.rows_part(operation, values, &row_keys)?;
        // What the row-sparse keys' pushes allocate, before any part of the call runs.
        let prepared = {
            let mut state = self.state();
            rows_part
                .iter()
                .map(|push| {
                    self.prepare_row_sparse_push(&mut state, &push.key, &push.values())
                        .map_err(self.at(operation, &push.key))
                })
                .collect::<Result<Vec<_>>>()?
        };
        if !split.host_keys.is_empty() {
            // Host keys: the host path, row-sparse GPU arrays pushed to them staged.
            let host_part = KeyedValues::new(operation, split.host_keys, split.host_values)?;
            kvstore_base::with_values_on_host(&host_part, |v| self.push_batch(v, priority))?;
        }
        if let Some((keys, arrays)) = gpu_part {
            self.push_checked_gpu_values(
                operation,
                &KeyedValues::new(operation, keys, arrays.iter().collect())?,
            )?;
        }
        let mut state = self.state();
        for (push, prepared) in rows_part.iter().zip(prepared) {
            self.apply_row_sparse_push(&mut state, &push.key, &push.values(), prepared)
                .map_err(self.at(operation, &push.key))?;
        }
        Ok(())
    }

    /// The GPU keys of `values` pushed through the row-sparse path: the row-sparse ones, and
    /// the dense ones that receive row-sparse values (a row-sparse gradient of a dense weight,
    /// Gluon's `Embedding(sparse_grad=True)`).
    fn rows_bound_keys(&self, values: &KeyedValues<'_>) -> BTreeSet<Key> {
        let state = self.state();
        values
            .iter()
            .filter(|(k, v)| {
                state
                    .keys
                    .get(*k)
                    .is_some_and(|e| e.row_sparse || v.storage_type() == StorageType::RowSparse)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The values of the row-sparse GPU keys `row_keys` among `values`, per key: row-sparse
    /// arrays on GPUs, or on the host (copied to the key's GPU here). The rest of
    /// [`push_gpu_row_sparse`](DeviceStore::push_gpu_row_sparse)'s checks come with the
    /// push's preparation, before any part of the call runs.
    fn rows_part<'v>(
        &self,
        operation: &'static str,
        values: &KeyedValues<'v>,
        row_keys: &BTreeSet<Key>,
    ) -> Result<Vec<RowsPush<'v>>> {
        let mut pushes = Vec::new();
        for group in values.groups() {
            if !row_keys.contains(&group.key) {
                continue;
            }
            let at = || self.at(operation, &group.key);
            let ordinal = self.state().keys[&group.key].merge_dev.unwrap_or(0);
            let mut push = RowsPush {
                key: group.key.clone(),
                values: Vec::with_capacity(group.positions.len()),
            };
            for &p in &group.positions {
                let value: &'v NDArray = values.values()[p];
                if value.storage_type() != StorageType::RowSparse {
                    return Err(at()(Error::InvalidArgument(format!(
                        "GPU key {} receives row-sparse values in this call: every value of a \
                         key in one call is row-sparse (a row-sparse key takes only those), got \
                         a dense one",
                        group.key
                    ))));
                }
                push.values.push(match gpu_rows(value).map_err(at())? {
                    Some(array) => GpuRows::Caller(array),
                    None => {
                        GpuRows::Uploaded(DeviceRowSparse::from_host(value, ordinal).map_err(at())?)
                    }
                });
            }
            pushes.push(push);
        }
        Ok(pushes)
    }

    /// The GPU-bound pairs of `split` on the GPUs and checked (`None` without any).
    fn checked_gpu_part(
        &self,
        operation: &'static str,
        split: &Split<'_>,
    ) -> Result<Option<(Vec<Key>, Vec<NDArray>)>> {
        if split.gpu_keys.is_empty() {
            return Ok(None);
        }
        let gpu_part =
            KeyedValues::new(operation, split.gpu_keys.clone(), split.gpu_values.clone())?;
        let arrays = self.gpu_part_on_device(operation, &gpu_part)?;
        self.check_gpu_push(
            operation,
            &KeyedValues::new(operation, split.gpu_keys.clone(), arrays.iter().collect())?,
        )?;
        Ok(Some((split.gpu_keys.clone(), arrays)))
    }

    /// A `pushpull` that involves GPU arrays or GPU keys: every output and every value of the
    /// GPU-bound keys checked first; then the host keys' pairs by the host path (one atomic
    /// call); then the GPU-bound keys' push and pull. A refused call changes nothing.
    pub(super) fn pushpull_routed(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        outs.check_against("pushpull", values)?;
        let gpu_keys = self.gpu_bound_keys(values);
        self.check_gpu_outs("pushpull", &gpu_keys, Some(values), outs)?;
        if !self.rows_bound_keys(values).is_empty() {
            // Row-sparse pushes to GPU keys: every output checked against its key's values,
            // then the push, then a pull, which skips row-sparse outputs (as `local`'s).
            let every_key: BTreeSet<Key> = values.keys().iter().cloned().collect();
            self.check_gpu_outs("pushpull", &every_key, Some(values), outs)?;
            self.push_routed("pushpull", values, priority)?;
            return self.pull_routed("pushpull", outs, priority, true);
        }
        let split = split_values(values, &gpu_keys, &BTreeSet::new());
        let gpu_part = self.checked_gpu_part("pushpull", &split)?;
        // The host keys: one call of the host path (its checks, then its work).
        if !split.host_keys.is_empty() {
            let host_part = KeyedValues::new("pushpull", split.host_keys, split.host_values)?;
            let (mut keys, mut host_outs) = (Vec::new(), Vec::new());
            for (key, out) in outs.iter_mut() {
                if !gpu_keys.contains(key) {
                    keys.push(key.clone());
                    host_outs.push(&mut **out);
                }
            }
            let mut host_outs = KeyedOuts::new("pushpull", keys, host_outs)?;
            kvstore_base::with_values_on_host(&host_part, |v| {
                with_written_outs_on_host(&mut host_outs, |o| self.pushpull_batch(v, o, priority))
            })?;
        }
        let Some((keys, arrays)) = gpu_part else {
            return Ok(());
        };
        self.push_checked_gpu_values(
            "pushpull",
            &KeyedValues::new("pushpull", keys, arrays.iter().collect())?,
        )?;
        // The pushed arrays are let go before the pull writes (they may share its outputs).
        drop(arrays);
        let (mut keys, mut gpu_outs) = (Vec::new(), Vec::new());
        for (key, out) in outs.iter_mut() {
            if gpu_keys.contains(key) {
                keys.push(key.clone());
                gpu_outs.push(&mut **out);
            }
        }
        self.pull_routed(
            "pushpull",
            &mut KeyedOuts::new("pushpull", keys, gpu_outs)?,
            priority,
            true,
        )
    }

    /// Every check a push of GPU arrays `values` makes before its work, as
    /// [`push_gpu_batch`](DeviceStore::push_gpu_batch) makes them (one value per GPU and one
    /// set of GPUs for `nccl`, carried across the call's keys), including keys that the push
    /// moves to the GPUs (dense float32 of the values' shape on the host).
    pub(super) fn check_gpu_push(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
    ) -> Result<()> {
        let mut grouped: BTreeMap<Key, Vec<&DeviceArray>> = BTreeMap::new();
        for (key, arrays) in self.gpu_values(operation, values)? {
            grouped.entry(key).or_default().extend(arrays);
        }
        let state = self.state();
        let mut nccl_set = state.nccl.as_ref().map(|c| c.ordinals.clone());
        for (key, arrays) in &grouped {
            let at = || self.at(operation, key);
            let devs = match state.keys.contains_key(key) {
                true => self.check_push(&state, key, arrays, nccl_set.as_deref()),
                false => {
                    // A key the push moves to the GPUs: its host value decides the shape.
                    let shape = arrays[0].shape();
                    self.check_adoptable(operation, key, shape)?;
                    self.check_gpu_values(key, shape, None, arrays, nccl_set.as_deref())
                }
            }
            .map_err(at())?;
            if self.engine == Engine::Nccl && nccl_set.is_none() {
                let mut sorted = devs;
                sorted.sort_unstable();
                nccl_set = Some(sorted);
            }
        }
        Ok(())
    }
}

/// `values` split into the pairs of `gpu_keys` and the others, in call order, without the
/// pairs of `skipped` keys.
fn split_values<'v>(
    values: &KeyedValues<'v>,
    gpu_keys: &BTreeSet<Key>,
    skipped: &BTreeSet<Key>,
) -> Split<'v> {
    let mut split = Split {
        gpu_keys: Vec::new(),
        gpu_values: Vec::new(),
        host_keys: Vec::new(),
        host_values: Vec::new(),
    };
    for (key, value) in values.iter() {
        if skipped.contains(key) {
            continue;
        }
        if gpu_keys.contains(key) {
            split.gpu_keys.push(key.clone());
            split.gpu_values.push(value);
        } else {
            split.host_keys.push(key.clone());
            split.host_values.push(value);
        }
    }
    split
}
