//! Row-sparse arrays in GPU memory ([`DeviceRowSparse`]) and the kernels on rows: the gather
//! of a row-sparse pull (MXNet's `sparse_retain` on the GPU), the scatter of a row-sparse push
//! into a key's value (and of several values into their row-sparse sum), and the
//! lazy sgd and adam steps on a gradient's rows.

use cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};
use kvstore_base::{DType, Error, HostArray, NDArray, Result, StorageType};

use crate::gpu::{copy_on, cuda, download_f32, push_momentum, Gpu, Runtime, StepParams};

/// The CUDA C source of the row kernels (compiled with the other kernels, see
/// [`kernel_source`](crate::gpu::kernel_source)). All are grid-stride loops over the
/// `rows * row_len` elements of the rows, one thread per element; `ids` holds `rows` distinct
/// row numbers, so no two threads write the same element.
///
/// - `gather_rows`: `out[r, c] = src[ids[r], c]`.
/// - `scatter_rows`: `dst[ids[r], c] = rows[r, c]`, or `dst[ids[r], c] + rows[r, c]` with
///   `accumulate`.
/// - `sgd_rows_update`: the lazy update of MXNet's `sgd_update` / `sgd_mom_update` with a
///   row-sparse gradient (kvstore-optimizer's `SparseSgd::Lazy`): only the gradient's rows of
///   the weight (and of the momentum) change; with momentum by [`KERNELS`](crate::gpu::KERNELS)'
///   `kv_sgd`, without by `w = (1 - lr*wd)*w - lr*clip(rescale*g)` (unclipped:
///   `(1 - lr*wd)*w - (lr*rescale)*g`).
/// - `adam_rows_update`: the lazy update of `adam_update` with a row-sparse gradient: `kv_adam`
///   on the gradient's rows only, `v` taking `(1 - beta2)*(g*g)` when clipping (the sparse
///   kernel's grouping) and `((1 - beta2)*g)*g` otherwise.
///
/// The optimizer kernels use `kv_clip`, `kv_sgd` and `kv_adam` of `KERNELS`, which comes first
/// in the program.
pub const ROW_KERNELS: &str = r#"
extern "C" __global__ void gather_rows(float* out, const float* src, const long long* ids,
                                       unsigned long long rows, unsigned long long row_len) {
    const unsigned long long n = rows * row_len;
    for (unsigned long long e = KV_FIRST; e < n; e += KV_STRIDE) {
        const unsigned long long r = e / row_len;
        out[e] = src[(unsigned long long)ids[r] * row_len + (e - r * row_len)];
    }
}

extern "C" __global__ void scatter_rows(float* dst, const float* rows, const long long* ids,
                                        unsigned long long nrows, unsigned long long row_len,
                                        int accumulate) {
    const unsigned long long n = nrows * row_len;
    for (unsigned long long e = KV_FIRST; e < n; e += KV_STRIDE) {
        const unsigned long long r = e / row_len;
        float* d = dst + (unsigned long long)ids[r] * row_len + (e - r * row_len);
        *d = accumulate ? *d + rows[e] : rows[e];
    }
}

extern "C" __global__ void sgd_rows_update(float* w, const float* g, const long long* ids,
                                           float* mom, int has_mom, float momentum, float lr,
                                           float wd, float rescale, int has_clip, float clip,
                                           unsigned long long nrows,
                                           unsigned long long row_len) {
    const unsigned long long n = nrows * row_len;
    const float decay = 1.0f - lr * wd;
    for (unsigned long long e = KV_FIRST; e < n; e += KV_STRIDE) {
        const unsigned long long r = e / row_len;
        const unsigned long long i = (unsigned long long)ids[r] * row_len + (e - r * row_len);
        if (has_mom) {
            float m = mom[i];
            w[i] = kv_sgd(w[i], g[e], &m, momentum, lr, wd, rescale, has_clip, clip);
            mom[i] = m;
        } else if (has_clip) {
            w[i] = decay * w[i] - lr * kv_clip(rescale * g[e], clip);
        } else {
            w[i] = decay * w[i] - (lr * rescale) * g[e];
        }
    }
}

extern "C" __global__ void adam_rows_update(float* w, const float* g, const long long* ids,
                                            float* mean, float* var, float lr, float wd,
                                            float rescale, int has_clip, float clip, float b1,
                                            float b2, float eps, unsigned long long nrows,
                                            unsigned long long row_len) {
    const unsigned long long n = nrows * row_len;
    for (unsigned long long e = KV_FIRST; e < n; e += KV_STRIDE) {
        const unsigned long long r = e / row_len;
        const unsigned long long i = (unsigned long long)ids[r] * row_len + (e - r * row_len);
        if (has_clip) {
            float gi = kv_clip(g[e] * rescale + w[i] * wd, clip);
            float m = b1 * mean[i] + (1.0f - b1) * gi;
            float v = b2 * var[i] + (1.0f - b2) * (gi * gi);
            mean[i] = m;
            var[i] = v;
            w[i] = w[i] - lr * m / (sqrtf(v) + eps);
        } else {
            float m = mean[i];
            float v = var[i];
            w[i] = kv_adam(w[i], g[e], &m, &v, lr, wd, rescale, 0, 0.0f, b1, b2, eps);
            mean[i] = m;
            var[i] = v;
        }
    }
}
"#;

/// A row-sparse float32 array on one GPU (MXNet's `RowSparseNDArray` on `mx.gpu(i)`): the row
/// numbers (sorted, distinct; kept on the host and on the GPU) and the rows' values.
///
/// ```no_run
/// use kvstore_base::{DType, NDArray};
/// use kvstore_device::DeviceRowSparse;
///
/// let rows = NDArray::ones(&[2, 3], DType::F32);
/// let host = NDArray::row_sparse(&[10, 3], vec![1, 7], &rows)?;
/// let on_gpu = DeviceRowSparse::from_host(&host, 0)?; // needs a GPU
/// assert_eq!(on_gpu.indices(), &[1, 7]);
/// assert_eq!(on_gpu.to_host()?, host);
/// # Ok::<(), kvstore_base::Error>(())
/// ```
#[derive(Debug)]
pub struct DeviceRowSparse {
    shape: Vec<usize>,
    indices: Vec<i64>,
    ordinal: usize,
    /// `indices` on the GPU (at least one element: CUDA allocations are never empty).
    pub(crate) ids: CudaSlice<i64>,
    /// `indices.len()` rows of `row_len()` elements (at least one element).
    pub(crate) rows: CudaSlice<f32>,
}

/// Elements per row of `shape` (1 for a 1-d shape).
pub(crate) fn row_len(shape: &[usize]) -> usize {
    shape.iter().skip(1).product()
}

impl DeviceRowSparse {
    /// An array of `shape` with no rows on `gpu(ordinal)` (all zeros): an output for
    /// [`DeviceStore::row_sparse_pull_gpu`](crate::DeviceStore::row_sparse_pull_gpu).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a 0-d shape; [`Error::Device`] without a GPU of that
    /// ordinal.
    pub fn zeros(shape: &[usize], ordinal: usize) -> Result<DeviceRowSparse> {
        DeviceRowSparse::upload(shape, Vec::new(), &[], ordinal)
    }

    /// Copies a row-sparse float32 host array to `gpu(ordinal)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a dense array or another dtype; [`Error::Device`]
    /// without a GPU of that ordinal or when a copy fails.
    pub fn from_host(array: &NDArray, ordinal: usize) -> Result<DeviceRowSparse> {
        let Some(rsp) = array.as_row_sparse() else {
            return Err(Error::InvalidArgument(format!(
                "a row-sparse GPU array is made from a row-sparse host array, got a {} one",
                array.storage_type()
            )));
        };
        DeviceRowSparse::from_parts(array.shape(), rsp.indices().to_vec(), rsp.rows(), ordinal)
    }

    /// The row-sparse array of `shape` whose rows `indices` (sorted, distinct, in range:
    /// checked by the callers) hold the float32 host `rows`, on `gpu(ordinal)`.
    pub(crate) fn from_parts(
        shape: &[usize],
        indices: Vec<i64>,
        rows: &HostArray,
        ordinal: usize,
    ) -> Result<DeviceRowSparse> {
        if rows.dtype() != DType::F32 {
            return Err(Error::InvalidArgument(format!(
                "GPU values are float32 for now, got {}",
                rows.dtype()
            )));
        }
        let rows = NDArray::from_host(rows.clone()).to_vec::<f32>()?;
        DeviceRowSparse::upload(shape, indices, &rows, ordinal)
    }

    /// `rows` (row-major, `indices.len()` rows) and `indices` (sorted, distinct, in range:
    /// checked by the callers) copied to `gpu(ordinal)`.
    pub(crate) fn upload(
        shape: &[usize],
        indices: Vec<i64>,
        rows: &[f32],
        ordinal: usize,
    ) -> Result<DeviceRowSparse> {
        if shape.is_empty() {
            return Err(Error::InvalidArgument(
                "a row-sparse array needs at least one dimension".into(),
            ));
        }
        debug_assert_eq!(rows.len(), indices.len() * row_len(shape));
        let gpu = Runtime::get()?.gpu(ordinal)?;
        let ids = upload_or_one(gpu, &indices)?;
        let rows = match rows.is_empty() {
            true => upload_or_one(gpu, rows)?,
            // Staged through the GPU's page-locked buffer when large.
            false => gpu.upload_new(rows)?,
        };
        Ok(DeviceRowSparse {
            shape: shape.to_vec(),
            indices,
            ordinal,
            ids,
            rows,
        })
    }

    /// The rows `indices` (sorted, distinct, in range: checked by the callers) of `shape`,
    /// zero, on `gpu(ordinal)`, to be filled by a kernel.
    pub(crate) fn alloc(
        shape: &[usize],
        indices: Vec<i64>,
        ordinal: usize,
    ) -> Result<DeviceRowSparse> {
        let gpu = Runtime::get()?.gpu(ordinal)?;
        let ids = upload_or_one(gpu, &indices)?;
        let rows = gpu
            .stream
            .alloc_zeros::<f32>((indices.len() * row_len(shape)).max(1))
            .map_err(cuda("alloc"))?;
        Ok(DeviceRowSparse {
            shape: shape.to_vec(),
            indices,
            ordinal,
            ids,
            rows,
        })
    }

    /// A copy on `gpu(ordinal)` (queued on that GPU's stream).
    ///
    /// # Errors
    /// [`Error::Device`] without a GPU of that ordinal or when a copy fails.
    pub fn to_gpu(&self, ordinal: usize) -> Result<DeviceRowSparse> {
        let gpu = Runtime::get()?.gpu(ordinal)?;
        let mut ids = gpu
            .stream
            .alloc_zeros::<i64>(self.ids.len())
            .map_err(cuda("alloc"))?;
        let mut rows = gpu
            .stream
            .alloc_zeros::<f32>(self.rows.len())
            .map_err(cuda("alloc"))?;
        copy_on(&gpu.stream, &self.ids, &mut ids)?;
        copy_on(&gpu.stream, &self.rows, &mut rows)?;
        Ok(DeviceRowSparse {
            shape: self.shape.clone(),
            indices: self.indices.clone(),
            ordinal,
            ids,
            rows,
        })
    }

    /// Copies the array to host memory as a row-sparse `NDArray` (waits for every queued
    /// operation on its GPU).
    ///
    /// # Errors
    /// [`Error::Device`] when a CUDA call fails.
    pub fn to_host(&self) -> Result<NDArray> {
        NDArray::row_sparse_from(&self.shape, self.indices.clone(), self.rows_on_host()?)
    }

    /// The stored rows copied to host memory: a dense array of shape `[nnz, shape[1], ...]`.
    pub(crate) fn rows_on_host(&self) -> Result<NDArray> {
        let mut rows = download_f32(&self.rows)?;
        rows.truncate(self.nnz() * row_len(&self.shape));
        let mut row_shape = self.shape.clone();
        row_shape[0] = self.nnz();
        NDArray::from_vec(&row_shape, rows)
    }

    /// The full (dense) shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The row numbers held, sorted and distinct.
    pub fn indices(&self) -> &[i64] {
        &self.indices
    }

    /// The number of rows held.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// The GPU ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Always row-sparse.
    pub fn storage_type(&self) -> StorageType {
        StorageType::RowSparse
    }
}

/// `values` in a new allocation on `gpu` (one zero element when empty).
fn upload_or_one<T: DeviceRepr + ValidAsZeroBits + Copy>(
    gpu: &Gpu,
    values: &[T],
) -> Result<CudaSlice<T>> {
    if values.is_empty() {
        gpu.stream.alloc_zeros::<T>(1).map_err(cuda("alloc"))
    } else {
        gpu.stream.clone_htod(values).map_err(cuda("copy to GPU"))
    }
}

impl Gpu {
    /// Queues `out[r] = src[ids[r]]` for the `rows` rows of `row_len` elements.
    pub(crate) fn gather_rows(
        &self,
        out: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        ids: &CudaSlice<i64>,
        rows: usize,
        row_len: usize,
    ) -> Result<()> {
        let (rows_arg, len_arg) = (rows as u64, row_len as u64);
        let mut b = self.stream.launch_builder(&self.kernels.rows.gather);
        b.arg(out).arg(src).arg(ids).arg(&rows_arg).arg(&len_arg);
        // SAFETY: the signature matches `gather_rows` in `ROW_KERNELS`; `out` holds
        // `rows * row_len` elements, `ids` `rows` distinct row numbers of `src` (checked by
        // the callers), all on this GPU.
        unsafe { b.launch(crate::gpu::launch_config(rows * row_len)) }
            .map_err(cuda("gather_rows"))?;
        Ok(())
    }

    /// Queues `dst[ids[r]] = rows[r]` (`accumulate`: `+=`) for `nrows` rows of `row_len`.
    pub(crate) fn scatter_rows(
        &self,
        dst: &mut CudaSlice<f32>,
        rows: &CudaSlice<f32>,
        ids: &CudaSlice<i64>,
        nrows: usize,
        row_len: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (rows_arg, len_arg) = (nrows as u64, row_len as u64);
        let accumulate = i32::from(accumulate);
        let mut b = self.stream.launch_builder(&self.kernels.rows.scatter);
        b.arg(dst)
            .arg(rows)
            .arg(ids)
            .arg(&rows_arg)
            .arg(&len_arg)
            .arg(&accumulate);
        // SAFETY: the signature matches `scatter_rows` in `ROW_KERNELS`; `rows` holds
        // `nrows * row_len` elements and `ids` `nrows` distinct row numbers of `dst`
        // (checked by the callers), all on this GPU.
        unsafe { b.launch(crate::gpu::launch_config(nrows * row_len)) }
            .map_err(cuda("scatter_rows"))?;
        Ok(())
    }
}

impl Gpu {
    /// Queues the lazy sgd step of the rows of `grad` (on this GPU) on `weight`: with
    /// `mom` (the momentum state, weight-sized) and its `momentum`, or without momentum.
    pub(crate) fn sgd_rows(
        &self,
        weight: &mut CudaSlice<f32>,
        grad: &DeviceRowSparse,
        mom: Option<(&mut CudaSlice<f32>, f32)>,
        p: StepParams,
    ) -> Result<()> {
        let (nrows, row_len) = (grad.nnz(), row_len(&grad.shape));
        if nrows * row_len == 0 {
            return Ok(());
        }
        let (n_arg, len_arg) = (nrows as u64, row_len as u64);
        let (has_clip, clip) = p.clip_args();
        let has_mom = i32::from(mom.is_some());
        let mut b = self.stream.launch_builder(&self.kernels.rows.sgd);
        b.arg(weight).arg(&grad.rows).arg(&grad.ids);
        let momentum = push_momentum(&mut b, mom);
        b.arg(&has_mom).arg(&momentum).arg(&p.lr).arg(&p.wd);
        b.arg(&p.rescale)
            .arg(&has_clip)
            .arg(&clip)
            .arg(&n_arg)
            .arg(&len_arg);
        // SAFETY: the signature matches `sgd_rows_update` in `ROW_KERNELS`; `grad` holds
        // `nrows` distinct rows of the weight's shape (checked by the callers), `weight` and
        // the momentum (when used) hold every row, all on this GPU; without momentum the
        // kernel never reads the null pointer.
        unsafe { b.launch(crate::gpu::launch_config(nrows * row_len)) }
            .map_err(cuda("sgd_rows_update"))?;
        Ok(())
    }

    /// Queues the lazy adam step of the rows of `grad` (on this GPU) on `weight`, with its
    /// `mean` and `var` states (weight-sized) and `(beta1, beta2, epsilon)`.
    pub(crate) fn adam_rows(
        &self,
        weight: &mut CudaSlice<f32>,
        grad: &DeviceRowSparse,
        (mean, var): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        p: StepParams,
        (b1, b2, eps): (f32, f32, f32),
    ) -> Result<()> {
        let (nrows, row_len) = (grad.nnz(), row_len(&grad.shape));
        if nrows * row_len == 0 {
            return Ok(());
        }
        let (n_arg, len_arg) = (nrows as u64, row_len as u64);
        let (has_clip, clip) = p.clip_args();
        let mut b = self.stream.launch_builder(&self.kernels.rows.adam);
        b.arg(weight)
            .arg(&grad.rows)
            .arg(&grad.ids)
            .arg(mean)
            .arg(var);
        b.arg(&p.lr)
            .arg(&p.wd)
            .arg(&p.rescale)
            .arg(&has_clip)
            .arg(&clip);
        b.arg(&b1).arg(&b2).arg(&eps).arg(&n_arg).arg(&len_arg);
        // SAFETY: the signature matches `adam_rows_update` in `ROW_KERNELS`; `grad` holds
        // `nrows` distinct rows of the weight's shape (checked by the callers); `weight`,
        // `mean` and `var` hold every row; all on this GPU.
        unsafe { b.launch(crate::gpu::launch_config(nrows * row_len)) }
            .map_err(cuda("adam_rows_update"))?;
        Ok(())
    }
}

/// The sorted union of the row numbers of `values` (each sorted and distinct).
pub(crate) fn union_of_rows(values: &[&DeviceRowSparse]) -> Vec<i64> {
    let mut union: Vec<i64> = values
        .iter()
        .flat_map(|v| v.indices.iter().copied())
        .collect();
    union.sort_unstable();
    union.dedup();
    union
}

/// The row-sparse sum of `values` (every one on `gpu(ordinal)`, of one shape) on that GPU: the
/// union of their rows, each the sum of the values holding it in the values' order (the
/// first value's rows written, the others' added), as the `local` store sums row-sparse
/// values. Queued on the GPU's stream.
pub(crate) fn sum_rows(values: &[&DeviceRowSparse], ordinal: usize) -> Result<DeviceRowSparse> {
    let shape = values
        .first()
        .map(|v| v.shape.clone())
        .ok_or_else(|| Error::InvalidArgument("a sum of no row-sparse values".into()))?;
    let union = union_of_rows(values);
    let gpu = Runtime::get()?.gpu(ordinal)?;
    // Where each value's rows go in the sum: every buffer before any arithmetic.
    let positions = values
        .iter()
        .map(|v| {
            let at: Vec<i64> = v
                .indices
                .iter()
                .map(|id| union.partition_point(|u| u < id) as i64)
                .collect();
            upload_or_one(gpu, &at)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut sum = DeviceRowSparse::alloc(&shape, union, ordinal)?;
    let len = row_len(&shape);
    // The first value's rows written, the others' added (a row only later values hold is
    // their sum onto zeros), as `local`'s sum of row-sparse arrays.
    for (i, (v, at)) in values.iter().zip(&positions).enumerate() {
        if v.nnz() > 0 {
            gpu.scatter_rows(&mut sum.rows, &v.rows, at, v.nnz(), len, i > 0)?;
        }
    }
    Ok(sum)
}

/// The loaded row kernels of one GPU.
#[derive(Debug)]
pub(crate) struct RowKernels {
    pub(crate) gather: CudaFunction,
    pub(crate) scatter: CudaFunction,
    pub(crate) sgd: CudaFunction,
    pub(crate) adam: CudaFunction,
}
