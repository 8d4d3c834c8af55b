//! Optimizer state files with GPU keys. The state of a key updated by the GPU kernels (sgd's
//! momentum, adam's mean and variance, and the update count) lives on its merge GPU: before a
//! save it is copied into the embedded host store's updater, which writes the file (so the
//! file is the one `local` writes, in the same format); after a load it is copied from there
//! to the GPUs. Keys updated through the host updater (every key under an optimizer without
//! kernels or a custom updater, row-sparse keys under `lazy_update` false) keep their state
//! there already.

use super::*;

/// A key's optimizer state on the host: its arrays, and its update count.
pub(super) type HostState = (Vec<Vec<f32>>, u64);

/// The optimizer state and update count the host updater `updater` holds for `key`, if any.
pub(super) fn host_state(
    updater: Option<&kvstore_optimizer::Updater>,
    key: &Key,
) -> Result<Option<HostState>> {
    let Some((u, arrays)) = updater.and_then(|u| Some((u, u.state_arrays(key)?))) else {
        return Ok(None);
    };
    let host = arrays
        .iter()
        .map(|a| a.try_astype(kvstore_base::DType::F32)?.to_vec::<f32>())
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((host, u.update_count(key).unwrap_or(0))))
}

impl GpuEntry {
    /// Whether the GPU kernels of `opt` keep this key's state, and `arrays` (from the host
    /// updater or a file) are that state: as many as `opt` keeps, each of the key's size. A
    /// row-sparse key updated by the host updater (`lazy_update` false) keeps its state there.
    pub(super) fn takes_state(&self, opt: &GpuOptimizer, arrays: &[Vec<f32>]) -> bool {
        (!self.row_sparse || opt.updates_rows_lazily())
            && arrays.len() == opt.state_len()
            && arrays.iter().all(|a| a.len() == self.initial.size())
    }
}

impl DeviceStore {
    /// Copies the GPU optimizer states and update counts into the host store's updater.
    pub(super) fn hand_gpu_states_to_host(&self) -> Result<()> {
        let state = self.state();
        let with_states: Vec<(&Key, &GpuEntry)> = state
            .keys
            .iter()
            .filter(|(_, e)| !e.state.is_empty() || e.loaded_state.is_some())
            .collect();
        if with_states.is_empty() {
            return Ok(());
        }
        let mut handed = Vec::with_capacity(with_states.len());
        for (key, entry) in with_states {
            let arrays = match &entry.loaded_state {
                Some(loaded) if entry.state.is_empty() => loaded
                    .iter()
                    .map(|host| NDArray::from_vec(&entry.shape, host.clone()))
                    .collect::<Result<Vec<_>>>()?,
                _ => entry
                    .state
                    .iter()
                    .map(|s| NDArray::from_vec(&entry.shape, crate::gpu::download_f32(s)?))
                    .collect::<Result<Vec<_>>>()?,
            };
            let count = state.counts.get(key).copied().unwrap_or(0);
            handed.push((key.clone(), arrays, count));
        }
        self.local.with_optimizer_updater(|updater| {
            let updater = updater.ok_or_else(|| {
                Error::Device("GPU optimizer states without an optimizer in the host store".into())
            })?;
            for (key, arrays, count) in handed {
                updater.set_key_state(&key, arrays, count)?;
            }
            Ok(())
        })
    }

    /// Replaces the GPU optimizer states and update counts with those of the host store's
    /// updater (just loaded): a GPU key without state there starts afresh.
    pub(super) fn take_gpu_states_from_host(&self) -> Result<()> {
        // A file that carries its optimizer replaced the host updater's: the GPU keys follow.
        let loaded_spec = self
            .local
            .with_optimizer_updater(|u| u.map(|u| u.optimizer().base().spec().clone()));
        let mut state = self.state();
        if let Some(spec) = loaded_spec {
            if state.optimizer.as_ref() != Some(&spec) {
                // Another optimizer: the old one's GPU states and counts mean nothing to it.
                state.reset_optimizer();
                state.optimizer = Some(spec);
                state.custom_updater = false;
            }
        }
        let Some(opt) = state
            .optimizer
            .as_ref()
            .and_then(|s| GpuOptimizer::parse(s).ok())
        else {
            return Ok(()); // the host updater serves every key
        };
        let keys: Vec<Key> = state.keys.keys().cloned().collect();
        let loaded: Vec<(Key, Option<HostState>)> =
            self.local.with_optimizer_updater(|updater| {
                let updater = updater.as_deref();
                keys.iter()
                    .map(|key| Ok((key.clone(), host_state(updater, key)?)))
                    .collect::<Result<Vec<_>>>()
            })?;
        let GpuState { keys, counts, .. } = &mut *state;
        for (key, found) in loaded {
            let entry = keys.get_mut(&key).expect("listed above");
            match found {
                Some((arrays, count)) if entry.takes_state(&opt, &arrays) => {
                    match entry.merge_dev {
                        // Placed: onto its merge GPU now.
                        Some(dev) => {
                            let gpu = Runtime::get()?.gpu(dev)?;
                            entry.state = arrays
                                .iter()
                                .map(|a| gpu.upload_new(a))
                                .collect::<Result<Vec<_>>>()?;
                            entry.loaded_state = None;
                        }
                        // Not yet: at its first push.
                        None => {
                            entry.state.clear();
                            entry.loaded_state = Some(arrays);
                        }
                    }
                    counts.insert(key, count);
                }
                _ => {
                    entry.state.clear();
                    entry.loaded_state = None;
                    counts.remove(&key);
                }
            }
        }
        Ok(())
    }
}
