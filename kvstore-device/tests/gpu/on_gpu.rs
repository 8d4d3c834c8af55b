//! [`OnGpu`]: a store that hands another its callers' arrays in GPU memory, so that the
//! conformance suite, written with host arrays, runs the GPU path of the `device` and `nccl`
//! stores through `KVStoreBase`.

use std::path::Path;
use std::sync::Arc;

use kvstore_base::{
    create, Capability, CompressionParams, Context, DType, Error, KVStoreBase, KeyedOuts,
    KeyedValues, NDArray, OptimizerSpec, Result, Updater,
};

/// Wraps a store: when every value (or output) of a call is a float32 host array with
/// elements (dense or row-sparse), the wrapped store receives copies of them on the GPUs (the
/// `j`-th array of a key on GPU `j % gpus`), and the host outputs receive the GPU outputs
/// after a successful call (none is written when it fails). Other calls reach the wrapped
/// store as they are.
#[derive(Debug)]
pub struct OnGpu {
    inner: Box<dyn KVStoreBase>,
    gpus: usize,
}

impl OnGpu {
    /// `inner`, fed GPU arrays spread over `gpus` GPUs.
    pub fn new(inner: Box<dyn KVStoreBase>, gpus: usize) -> OnGpu {
        OnGpu { inner, gpus }
    }

    /// The GPU of each array (the `j`-th of its key on GPU `j % gpus`), or `None` when the
    /// call stays on the host.
    fn placement<'a>(
        &self,
        keys: &[kvstore_base::Key],
        arrays: impl IntoIterator<Item = &'a NDArray>,
    ) -> Option<Vec<usize>> {
        let mut seen: std::collections::HashMap<&kvstore_base::Key, usize> = Default::default();
        let mut gpus = Vec::new();
        for (key, a) in keys.iter().zip(arrays) {
            let f32_with_elements = a.dtype() == DType::F32 && a.size() > 0;
            let j = seen.entry(key).or_insert(0);
            if !f32_with_elements {
                return None;
            }
            gpus.push(*j % self.gpus);
            *j += 1;
        }
        Some(gpus)
    }

    /// Runs `call` with `values` moved to the GPUs when they can be.
    fn with_values<R>(
        &self,
        values: &KeyedValues<'_>,
        call: impl FnOnce(&KeyedValues<'_>) -> Result<R>,
    ) -> Result<R> {
        let Some(gpus) = self.placement(values.keys(), values.values().iter().copied()) else {
            return call(values);
        };
        let moved = values
            .values()
            .iter()
            .zip(gpus)
            .map(|(a, g)| a.to_context(Context::Gpu(g)))
            .collect::<Result<Vec<_>>>()?;
        call(&KeyedValues::new(
            "on_gpu",
            values.keys().to_vec(),
            moved.iter().collect(),
        )?)
    }

    /// Runs `call` with `outs` moved to the GPUs when they can be; copies them back after.
    fn with_outs<R>(
        &self,
        outs: &mut KeyedOuts<'_>,
        call: impl FnOnce(&mut KeyedOuts<'_>) -> Result<R>,
    ) -> Result<R> {
        let Some(gpus) = self.placement(outs.keys(), outs.outs().iter().map(|o| &**o)) else {
            return call(outs);
        };
        let mut moved = outs
            .outs()
            .iter()
            .zip(gpus)
            .map(|(a, g)| a.to_context(Context::Gpu(g)))
            .collect::<Result<Vec<_>>>()?;
        let result = call(&mut KeyedOuts::new(
            "on_gpu",
            outs.keys().to_vec(),
            moved.iter_mut().collect(),
        )?)?;
        for (out, gpu) in outs.outs_mut().iter_mut().zip(&moved) {
            out.assign(gpu)?;
        }
        Ok(result)
    }
}

impl KVStoreBase for OnGpu {
    fn type_name(&self) -> &str {
        self.inner.type_name()
    }

    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn num_workers(&self) -> usize {
        self.inner.num_workers()
    }

    fn is_capable(&self, capability: Capability) -> bool {
        self.inner.is_capable(capability)
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.with_values(values, |v| {
            self.with_outs(outs, |o| self.inner.broadcast_batch(v, o, priority))
        })
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.with_values(values, |v| {
            self.with_outs(outs, |o| self.inner.pushpull_batch(v, o, priority))
        })
    }

    fn pushpull_in_place_batch(&self, values: &mut KeyedOuts<'_>, priority: i32) -> Result<()> {
        self.with_outs(values, |v| self.inner.pushpull_in_place_batch(v, priority))
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        self.with_values(values, |v| self.inner.init_batch(v))
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        self.with_values(values, |v| self.inner.push_batch(v, priority))
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        self.with_outs(outs, |o| self.inner.pull_batch(o, priority, ignore_sparse))
    }

    fn row_sparse_pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        self.with_outs(outs, |o| {
            self.inner.row_sparse_pull_batch(o, row_ids, priority)
        })
    }

    fn set_optimizer(&self, optimizer: &OptimizerSpec) -> Result<()> {
        self.inner.set_optimizer(optimizer)
    }

    fn set_updater(&self, updater: Updater) -> Result<()> {
        self.inner.set_updater(updater)
    }

    fn set_gradient_compression(&self, params: &CompressionParams) -> Result<()> {
        self.inner.set_gradient_compression(params)
    }

    fn save_optimizer_states(&self, path: &Path, dump_optimizer: bool) -> Result<()> {
        self.inner.save_optimizer_states(path, dump_optimizer)
    }

    fn load_optimizer_states(&self, path: &Path) -> Result<()> {
        self.inner.load_optimizer_states(path)
    }

    fn handles_device_arrays(&self) -> bool {
        self.inner.handles_device_arrays()
    }
}

/// The conformance suite's checks, named `<label>::...`, on the `device` store fed GPU arrays
/// spread over `gpus` GPUs (or, with the probe's error, all ignored with it).
pub fn device_trials(
    label: &str,
    gpus: std::result::Result<usize, String>,
) -> Vec<libtest_mimic::Trial> {
    kvstore_test::trials(
        label,
        Arc::new(move || match &gpus {
            Ok(gpus) => Ok(Box::new(OnGpu::new(create("device")?, *gpus)) as Box<dyn KVStoreBase>),
            Err(e) => Err(Error::Device(e.clone())),
        }),
    )
}
