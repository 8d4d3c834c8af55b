//! The `KVStoreBase` calls of the `device` and `nccl` stores on `NDArray`s in GPU memory
//! (this crate's [`DeviceArray`]s behind [`NDArray::device`]): reduced, updated and pulled on
//! the GPUs by the same code as the `*_gpu` calls, with no trip through host memory.
//!
//! A key initialised with a GPU array is a GPU key. A key initialised with a host array moves
//! to the GPUs at its first push of GPU arrays (its value read from the host store), as
//! MXNet's device store keeps a key's value on its merge GPU; from then on a push of host
//! arrays to it is refused, and a pull into host arrays copies from the GPU. One call takes
//! either host arrays or GPU arrays as values (outputs may mix both).

use kvstore_base::{with_outs_on_host, Context, KeyedOuts, KeyedValues};

use super::*;

/// Whether one of `arrays` is in device memory.
pub(super) fn any_on_device<'a>(arrays: impl IntoIterator<Item = &'a NDArray>) -> bool {
    arrays.into_iter().any(|a| a.device().is_some())
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
        let batch = self.gpu_values("init", values)?;
        values.check_one_value_per_key(self.type_name(), "init")?;
        for (key, _) in &batch {
            if self.is_initialised(key)? {
                return Err(self.at("init", key)(Error::DuplicateInit));
            }
        }
        let hosts = batch
            .iter()
            .map(|(key, arrays)| arrays[0].to_host().map_err(self.at("init", key)))
            .collect::<Result<Vec<_>>>()?;
        for ((key, _), host) in batch.iter().zip(&hosts) {
            self.init_gpu(key.clone(), host)?;
        }
        Ok(())
    }

    /// Whether `key` is initialised, on the GPUs or in the host store.
    fn is_initialised(&self, key: &Key) -> Result<bool> {
        if self.state().keys.contains_key(key) {
            return Ok(true);
        }
        let mut probe = NDArray::zeros(&[], kvstore_base::DType::F32);
        match self.local.pull(key.clone(), &mut probe) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.root(), Error::KeyNotInitialized) => Ok(false),
            // Any other answer (a shape mismatch) means the key exists.
            Err(_) => Ok(true),
        }
    }

    /// `push` (and the push of `pushpull`) with GPU values: keys initialised on the host move
    /// to the GPUs first, then one [`push_gpu_batch`](DeviceStore::push_gpu_batch).
    pub(super) fn push_gpu_values(
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
        self.push_gpu_batch(&refs)
    }

    /// Makes `key` a GPU key if the host store holds it (its current value, of `shape`, read
    /// from there). Nothing for a GPU key; [`Error::KeyNotInitialized`] for an unknown one.
    fn adopt(&self, operation: &'static str, key: &Key, shape: &[usize]) -> Result<()> {
        if self.state().keys.contains_key(key) {
            return Ok(());
        }
        let mut value = NDArray::zeros(shape, kvstore_base::DType::F32);
        self.local
            .pull(key.clone(), &mut value)
            .map_err(|e| match e.root() {
                Error::KeyNotInitialized => self.at(operation, key)(Error::KeyNotInitialized),
                _ => e,
            })?;
        let mut state = self.state();
        if !state.keys.contains_key(key) {
            state.keys.insert(key.clone(), GpuEntry::new(&value));
        }
        Ok(())
    }

    /// Whether one of `keys` is a GPU key.
    pub(super) fn any_gpu_key(&self, keys: &[Key]) -> bool {
        let state = self.state();
        keys.iter().any(|k| state.keys.contains_key(k))
    }

    /// A push of host `values` some of whose keys are GPU keys: the values of GPU keys are
    /// checked (dense float32 of the key's shape, with the errors `local` gives), copied to the
    /// key's merge GPU (gpu(0) before it is placed; on `nccl`, the `j`-th value of a key to the
    /// `j`-th GPU of the communicators) and pushed on the GPUs, as MXNet's
    /// `CommDevice` copies host sources to the merge GPU; the values of host keys are pushed
    /// first, by the host path. Nothing is pushed when a GPU key's value is refused.
    pub(super) fn push_host_values_with_gpu_keys(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        priority: i32,
    ) -> Result<()> {
        let mut gpu_pairs: Vec<(Key, NDArray)> = Vec::new();
        let (mut host_keys, mut host_values) = (Vec::new(), Vec::new());
        {
            let state = self.state();
            let mut seen: BTreeMap<Key, usize> = BTreeMap::new();
            for (key, value) in values.iter() {
                let Some(entry) = state.keys.get(key) else {
                    host_keys.push(key.clone());
                    host_values.push(value);
                    continue;
                };
                let at = self.at(operation, key);
                let position = seen.entry(key.clone()).or_insert(0);
                let what = format!("value {position} of the key");
                *position += 1;
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
                // `device`: the merge GPU; `nccl`: one value per GPU of its communicators.
                let j = *position - 1;
                let ordinal = match (self.engine, &state.nccl) {
                    (Engine::Nccl, Some(comms)) => comms.ordinals[j % comms.ordinals.len()],
                    (Engine::Nccl, None) => j % Runtime::get()?.len(),
                    (Engine::Device, _) => entry.merge_dev.unwrap_or(0),
                };
                gpu_pairs.push((
                    key.clone(),
                    value.to_context(Context::Gpu(ordinal)).map_err(at)?,
                ));
            }
        }
        if !host_keys.is_empty() {
            self.push_batch(
                &KeyedValues::new(operation, host_keys, host_values)?,
                priority,
            )?;
        }
        let (keys, arrays): (Vec<Key>, Vec<&NDArray>) =
            gpu_pairs.iter().map(|(k, a)| (k.clone(), a)).unzip();
        self.push_gpu_values(operation, &KeyedValues::new(operation, keys, arrays)?)
    }

    /// Whether a pull must go through [`pull_routed`](DeviceStore::pull_routed): an output
    /// in GPU memory, or a GPU key.
    pub(super) fn pull_needs_routing(&self, outs: &KeyedOuts<'_>) -> bool {
        any_on_device(outs.outs().iter().map(|o| &**o)) || {
            let state = self.state();
            outs.keys().iter().any(|k| state.keys.contains_key(k))
        }
    }

    /// A pull whose outputs may be in GPU or host memory and whose keys may be GPU or host
    /// keys: GPU keys into GPU outputs by [`pull_gpu_batch`](DeviceStore::pull_gpu_batch),
    /// into host outputs by a copy from the GPU; host keys by the host store (outputs on GPUs
    /// receiving its results). Every GPU key's outputs are checked before any is written.
    pub(super) fn pull_routed(
        &self,
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
        {
            let state = self.state();
            for (key, out) in outs.iter_mut().filter(|(k, _)| gpu_keys.contains(*k)) {
                let entry = &state.keys[key];
                if out.shape() != entry.shape.as_slice() {
                    return Err(self.at("pull", key)(Error::ShapeMismatch {
                        what: format!("an output pulled from key {key}"),
                        expected: entry.shape.clone(),
                        found: out.shape().to_vec(),
                    }));
                }
                gpu_array(out).map_err(self.at("pull", key))?;
            }
        }
        // Host keys: the host store, outputs on GPUs staged.
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
        if !host_keys.is_empty() {
            let mut host_batch = KeyedOuts::new("pull", host_keys, host_outs)?;
            with_outs_on_host(&mut host_batch, |o| {
                self.local.pull_batch(o, priority, ignore_sparse)
            })?;
        }
        // GPU keys: GPU outputs in one batch, host outputs copied from the GPU.
        let mut batch: Vec<(Key, Vec<&mut DeviceArray>)> = Vec::new();
        let mut to_host: Vec<(Key, &mut NDArray)> = Vec::new();
        for (key, out) in gpu_outs {
            if out.context() == Context::Cpu {
                to_host.push((key, out));
                continue;
            }
            let array = gpu_array_mut(out)?.expect("checked above: on a GPU");
            match batch.last_mut() {
                Some((k, arrays)) if *k == key => arrays.push(array),
                _ => batch.push((key, vec![array])),
            }
        }
        if !batch.is_empty() {
            let mut slices: Vec<(Key, &mut [&mut DeviceArray])> = batch
                .iter_mut()
                .map(|(k, a)| (k.clone(), &mut a[..]))
                .collect();
            self.pull_gpu_batch(&mut slices)?;
        }
        for (key, out) in to_host {
            let value = self.gpu_key_on_host(&key)?;
            out.assign(&value).map_err(self.at("pull", &key))?;
        }
        Ok(())
    }

    /// The value of a GPU key, copied to the host.
    fn gpu_key_on_host(&self, key: &Key) -> Result<NDArray> {
        let state = self.state();
        let entry = state.keys.get(key).ok_or(Error::KeyNotInitialized)?;
        match &entry.stored {
            Some(stored) => stored.to_host(),
            None => Ok(entry.initial.clone()),
        }
    }
}
