//! GPU memory and kernels: the [`Runtime`] (one context, stream and kernel module per GPU),
//! [`DeviceArray`], a dense float32 array in one GPU's memory, and the NVRTC compilation of
//! every kernel ([`kernel_source`], [`compile_kernels`]).

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use kvstore_base::{Context, DType, Error, HostArray, NDArray, Result, StorageType};
use kvstore_compression::CompressionType;

use crate::host_copies::Staging;
use crate::kernel_image::KernelImages;
pub use crate::kernel_image::{
    compile_kernels, compile_kernels_for, driver_cuda_version, nvrtc_version, ComputeCapability,
};
use crate::probe::{panic_text, probe};
use crate::sparse::RowKernels;

/// Definitions every kernel string uses, first in the NVRTC program: `KV_FIRST` and
/// `KV_STRIDE` (a thread's first item and the grid's size, for grid-stride loops) and
/// `kv_aligned` (whether a pointer is 16-byte aligned, for `float4` access).
pub const KERNEL_PRELUDE: &str = r#"
#define KV_FIRST (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x)
#define KV_STRIDE ((unsigned long long)blockDim.x * gridDim.x)

__device__ __forceinline__ bool kv_aligned(const void* p) {
    return (((unsigned long long)p) & 15ull) == 0ull;
}
"#;

/// The CUDA C source of the reduction and optimizer kernels, compiled once per process by
/// NVRTC, together with the compression kernels ([`kernel_source`]), with `--fmad=false` (no
/// fused multiply-add, so each operation rounds as the CPU code's does).
///
/// Every kernel is a grid-stride loop over `n` float32 elements, in two passes: when every
/// buffer it touches is 16-byte aligned (whole CUDA allocations always are) it reads and writes
/// `float4`s over the first `4 * (n / 4)` elements, then plain floats over the rest; each
/// element gets the same operations in either pass. No thread reads what another writes, so the
/// source is also valid C++ with a few definitions of CUDA's built-ins, which is how
/// `tests/kernel_source.rs` checks the arithmetic on machines without a GPU.
///
/// - `sum_sources`: `out = head + (((g0 + g1) + g2) + g3) + (((g4 + g5) + g6) + g7)`, added
///   left to right, with the first `terms` (0 to 8) of `g0..g7`; `head` is `out` itself when
///   `head_is_out` is set. One launch sums 9 sources in one pass over memory (each input read
///   once, the output written once); longer lists chain launches ([`sum_launches`]). This is
///   the CPU store's association order: the first value, then groups of four.
/// - `sgd_update`: kvstore-optimizer's `sgd_element` (`mom` may be null without momentum).
/// - `adam_update`: kvstore-optimizer's Adam (MXNet 1.x: weight decay, then clipping).
pub const KERNELS: &str = r#"
__device__ __forceinline__ float kv_clip(float x, float c) {
    return x > c ? c : (x < -c ? -c : x);
}

__device__ __forceinline__ float kv_add(float a, float b) { return a + b; }

__device__ __forceinline__ float4 kv_add(float4 a, float4 b) {
    float4 r;
    r.x = a.x + b.x;
    r.y = a.y + b.y;
    r.z = a.z + b.z;
    r.w = a.w + b.w;
    return r;
}

/* Element (or float4) i of the sum: head, then the group sources in groups of four. */
template <typename V>
__device__ __forceinline__ V kv_sum_at(const V* head, const float* const* g, int terms,
                                       unsigned long long i) {
    V acc = head[i];
#pragma unroll
    for (int k0 = 0; k0 < 8; k0 += 4) {
        if (k0 < terms) {
            V t = ((const V*)g[k0])[i];
#pragma unroll
            for (int k = k0 + 1; k < k0 + 4; ++k) {
                if (k < terms) t = kv_add(t, ((const V*)g[k])[i]);
            }
            acc = kv_add(acc, t);
        }
    }
    return acc;
}

extern "C" __global__ void sum_sources(float* out, const float* head, int head_is_out,
                                       const float* g0, const float* g1, const float* g2,
                                       const float* g3, const float* g4, const float* g5,
                                       const float* g6, const float* g7, int terms,
                                       unsigned long long n) {
    const float* g[8] = {g0, g1, g2, g3, g4, g5, g6, g7};
    const float* h = head_is_out ? out : head;
    bool aligned = kv_aligned(out) && kv_aligned(h);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        if (k < terms) aligned = aligned && kv_aligned(g[k]);
    }
    unsigned long long done = 0ull;
    if (aligned) {
        const unsigned long long n4 = n / 4ull;
        for (unsigned long long i = KV_FIRST; i < n4; i += KV_STRIDE) {
            ((float4*)out)[i] = kv_sum_at<float4>((const float4*)h, g, terms, i);
        }
        done = 4ull * n4;
    }
    for (unsigned long long i = done + KV_FIRST; i < n; i += KV_STRIDE) {
        out[i] = kv_sum_at<float>(h, g, terms, i);
    }
}

/* One sgd step on one element; the new momentum is left in *m. */
__device__ __forceinline__ float kv_sgd(float w, float g, float* m, float mu, float lr,
                                        float wd, float rescale, int has_clip, float clip) {
    float step = has_clip ? lr * kv_clip(rescale * g, clip) : lr * rescale * g;
    float nm = mu * *m - lr * wd * w - step;
    *m = nm;
    return w + nm;
}

extern "C" __global__ void sgd_update(float* w, const float* g, float* mom, int has_mom,
                                      float momentum, float lr, float wd, float rescale,
                                      int has_clip, float clip, unsigned long long n) {
    const float mu = has_mom ? momentum : 0.0f;
    const bool aligned = kv_aligned(w) && kv_aligned(g) && (!has_mom || kv_aligned(mom));
    unsigned long long done = 0ull;
    if (aligned) {
        const unsigned long long n4 = n / 4ull;
        for (unsigned long long i = KV_FIRST; i < n4; i += KV_STRIDE) {
            float4 wv = ((const float4*)w)[i];
            const float4 gv = ((const float4*)g)[i];
            float4 mv;
            if (has_mom) {
                mv = ((const float4*)mom)[i];
            } else {
                mv.x = 0.0f; mv.y = 0.0f; mv.z = 0.0f; mv.w = 0.0f;
            }
            wv.x = kv_sgd(wv.x, gv.x, &mv.x, mu, lr, wd, rescale, has_clip, clip);
            wv.y = kv_sgd(wv.y, gv.y, &mv.y, mu, lr, wd, rescale, has_clip, clip);
            wv.z = kv_sgd(wv.z, gv.z, &mv.z, mu, lr, wd, rescale, has_clip, clip);
            wv.w = kv_sgd(wv.w, gv.w, &mv.w, mu, lr, wd, rescale, has_clip, clip);
            ((float4*)w)[i] = wv;
            if (has_mom) ((float4*)mom)[i] = mv;
        }
        done = 4ull * n4;
    }
    for (unsigned long long i = done + KV_FIRST; i < n; i += KV_STRIDE) {
        float m = has_mom ? mom[i] : 0.0f;
        w[i] = kv_sgd(w[i], g[i], &m, mu, lr, wd, rescale, has_clip, clip);
        if (has_mom) mom[i] = m;
    }
}

/* One adam step on one element; the new moments are left in *m and *v. */
__device__ __forceinline__ float kv_adam(float w, float g, float* m, float* v, float lr,
                                         float wd, float rescale, int has_clip, float clip,
                                         float b1, float b2, float eps) {
    float gi = g * rescale + w * wd;
    if (has_clip) gi = kv_clip(gi, clip);
    float nm = b1 * *m + (1.0f - b1) * gi;
    float nv = b2 * *v + (1.0f - b2) * gi * gi;
    *m = nm;
    *v = nv;
    return w - lr * nm / (sqrtf(nv) + eps);
}

extern "C" __global__ void adam_update(float* w, const float* g, float* mean, float* var,
                                       float lr, float wd, float rescale, int has_clip,
                                       float clip, float b1, float b2, float eps,
                                       unsigned long long n) {
    const bool aligned = kv_aligned(w) && kv_aligned(g) && kv_aligned(mean) && kv_aligned(var);
    unsigned long long done = 0ull;
    if (aligned) {
        const unsigned long long n4 = n / 4ull;
        for (unsigned long long i = KV_FIRST; i < n4; i += KV_STRIDE) {
            float4 wv = ((const float4*)w)[i];
            const float4 gv = ((const float4*)g)[i];
            float4 mv = ((const float4*)mean)[i];
            float4 vv = ((const float4*)var)[i];
            wv.x = kv_adam(wv.x, gv.x, &mv.x, &vv.x, lr, wd, rescale, has_clip, clip, b1, b2, eps);
            wv.y = kv_adam(wv.y, gv.y, &mv.y, &vv.y, lr, wd, rescale, has_clip, clip, b1, b2, eps);
            wv.z = kv_adam(wv.z, gv.z, &mv.z, &vv.z, lr, wd, rescale, has_clip, clip, b1, b2, eps);
            wv.w = kv_adam(wv.w, gv.w, &mv.w, &vv.w, lr, wd, rescale, has_clip, clip, b1, b2, eps);
            ((float4*)w)[i] = wv;
            ((float4*)mean)[i] = mv;
            ((float4*)var)[i] = vv;
        }
        done = 4ull * n4;
    }
    for (unsigned long long i = done + KV_FIRST; i < n; i += KV_STRIDE) {
        float m = mean[i];
        float v = var[i];
        w[i] = kv_adam(w[i], g[i], &m, &v, lr, wd, rescale, has_clip, clip, b1, b2, eps);
        mean[i] = m;
        var[i] = v;
    }
}
"#;

/// Sources a `sum_sources` launch adds after its head.
pub const SUM_GROUP_SOURCES: usize = 8;

/// One launch of the `sum_sources` kernel in the sum of a list of sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SumLaunch {
    /// The index of the head source, or `None` when the head is the output (the running sum
    /// of the launches before).
    pub head: Option<usize>,
    /// The indices of the sources added after the head (at most [`SUM_GROUP_SOURCES`]).
    pub group: std::ops::Range<usize>,
}

/// The launches that sum `count` sources into an output in the CPU store's association order:
/// source 0, then the others in groups of four, two groups per launch. The first launch reads
/// source 0 as its head, the next ones the output.
///
/// ```
/// use kvstore_device::gpu::{sum_launches, SumLaunch};
///
/// assert_eq!(sum_launches(8), vec![SumLaunch { head: Some(0), group: 1..8 }]);
/// assert_eq!(
///     sum_launches(12),
///     vec![SumLaunch { head: Some(0), group: 1..9 }, SumLaunch { head: None, group: 9..12 }]
/// );
/// ```
pub fn sum_launches(count: usize) -> Vec<SumLaunch> {
    let mut launches = Vec::new();
    if count == 0 {
        return launches;
    }
    let mut next = 1;
    while launches.is_empty() || next < count {
        let end = count.min(next + SUM_GROUP_SOURCES);
        launches.push(SumLaunch {
            head: launches.is_empty().then_some(0),
            group: next..end,
        });
        next = end;
    }
    launches
}

/// Every kernel of the crate: [`KERNEL_PRELUDE`], [`KERNELS`], the row kernels
/// ([`ROW_KERNELS`](crate::sparse::ROW_KERNELS)) and the compression kernels
/// ([`COMPRESSION_KERNELS`](crate::gpu_codec::COMPRESSION_KERNELS)), as one NVRTC program.
pub fn kernel_source() -> String {
    format!(
        "{KERNEL_PRELUDE}\n{KERNELS}\n{}\n{}",
        crate::sparse::ROW_KERNELS,
        crate::gpu_codec::COMPRESSION_KERNELS
    )
}

/// One GPU: its context, the stream every operation of this crate on it uses (so work on
/// one GPU is ordered), the loaded kernels, and the page-locked buffer its copies to and from
/// host memory go through.
#[derive(Debug)]
pub struct Gpu {
    /// The stream of this GPU.
    pub stream: Arc<CudaStream>,
    pub(crate) kernels: Kernels,
    loaded_as: String,
    staging: Staging,
}

/// The kernels of one GPU, looked up in the module loaded into its context.
#[derive(Debug)]
pub(crate) struct Kernels {
    sum_sources: CudaFunction,
    sgd_update: CudaFunction,
    adam_update: CudaFunction,
    quantize_2bit: CudaFunction,
    quantize_1bit: CudaFunction,
    dequantize_2bit: CudaFunction,
    dequantize_1bit: CudaFunction,
    pub(crate) rows: RowKernels,
}

impl Kernels {
    /// Looks every kernel up in `module`.
    fn of(module: &Arc<CudaModule>) -> Result<Kernels> {
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(cuda("cuModuleGetFunction"))
        };
        Ok(Kernels {
            sum_sources: f("sum_sources")?,
            sgd_update: f("sgd_update")?,
            adam_update: f("adam_update")?,
            quantize_2bit: f("quantize_2bit")?,
            quantize_1bit: f("quantize_1bit")?,
            dequantize_2bit: f("dequantize_2bit")?,
            dequantize_1bit: f("dequantize_1bit")?,
            rows: RowKernels {
                gather: f("gather_rows")?,
                scatter: f("scatter_rows")?,
                sgd: f("sgd_rows_update")?,
                adam: f("adam_rows_update")?,
            },
        })
    }
}

/// Every visible GPU, opened once per process.
#[derive(Debug)]
pub struct Runtime {
    gpus: Vec<Gpu>,
}

/// Converts a CUDA error into [`Error::Device`].
pub(crate) fn cuda<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e}"))
}

impl Runtime {
    /// The process's runtime, opening every GPU and compiling the kernels at the first call.
    ///
    /// # Errors
    /// [`Error::Device`] when [`probe`] fails, NVRTC is missing, or a CUDA call fails.
    pub fn get() -> Result<&'static Runtime> {
        static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();
        RUNTIME
            .get_or_init(|| match catch_unwind(AssertUnwindSafe(Runtime::open)) {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(p) => Err(format!("CUDA runtime failed to start: {}", panic_text(&*p))),
            })
            .as_ref()
            .map_err(|e| Error::Device(e.clone()))
    }

    fn open() -> Result<Runtime> {
        let info = probe()?;
        let mut images = KernelImages::default();
        let mut gpus = Vec::new();
        for dev in &info.devices {
            let ctx = CudaContext::new(dev.ordinal).map_err(cuda("cuCtx"))?;
            let stream = ctx.new_stream().map_err(cuda("cuStreamCreate"))?;
            let (kernels, loaded_as) =
                images.load(&ctx, dev.ordinal, dev.compute_capability, Kernels::of)?;
            gpus.push(Gpu {
                stream,
                kernels,
                loaded_as,
                staging: Staging::default(),
            });
        }
        Ok(Runtime { gpus })
    }

    /// The number of GPUs.
    pub fn len(&self) -> usize {
        self.gpus.len()
    }

    /// Always false: a runtime exists only with at least one GPU.
    pub fn is_empty(&self) -> bool {
        self.gpus.is_empty()
    }

    /// The GPU of `ordinal`.
    ///
    /// # Errors
    /// [`Error::Device`] for an ordinal with no GPU.
    pub fn gpu(&self, ordinal: usize) -> Result<&Gpu> {
        self.gpus.get(ordinal).ok_or_else(|| {
            Error::Device(format!(
                "gpu({ordinal}) does not exist: {} GPU(s) visible",
                self.gpus.len()
            ))
        })
    }
}

/// One thread per work item (`items`: elements, `float4`s or words), up to a grid of about a
/// million blocks (the kernels loop over the rest).
pub(crate) fn launch_config(items: usize) -> LaunchConfig {
    const THREADS: usize = 256;
    let blocks = items.div_ceil(THREADS).clamp(1, 65_535 * 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A null device pointer, for the kernel arguments a launch does not use.
pub(crate) const NULL: u64 = 0;

/// Pushes the momentum-state argument of an sgd kernel (`mom`'s buffer, else a null pointer,
/// which the kernels never touch without momentum) and returns the momentum to pass with it.
pub(crate) fn push_momentum<'a>(
    b: &mut LaunchArgs<'a>,
    mom: Option<(&'a mut CudaSlice<f32>, f32)>,
) -> f32 {
    match mom {
        Some((m, momentum)) => {
            b.arg(m);
            momentum
        }
        None => {
            b.arg(&NULL);
            0.0
        }
    }
}

impl Gpu {
    /// Copies `src` into `dst` (at least as long) on this GPU's stream, after what is queued
    /// there (large copies staged through its page-locked buffer); `src` may change as soon
    /// as this returns.
    pub(crate) fn upload(&self, src: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        self.staging.upload(&self.stream, src, dst)
    }

    /// `src` copied into a new allocation on this GPU ([`upload`](Gpu::upload)).
    pub(crate) fn upload_new(&self, src: &[f32]) -> Result<CudaSlice<f32>> {
        let mut data = self
            .stream
            .alloc_zeros::<f32>(src.len())
            .map_err(cuda("alloc"))?;
        self.upload(src, &mut data)?;
        Ok(data)
    }

    /// How this GPU's kernels were loaded: `"sm_90 machine code"` (compiled by NVRTC for its
    /// architecture) or `"PTX"` (compiled by the driver; see
    /// [`compile_kernels_for`]).
    pub fn kernels_loaded_as(&self) -> &str {
        &self.loaded_as
    }

    /// `out = ((srcs[0] + group) + group) + ...` (groups of four, [`sum_launches`]), every
    /// source on this GPU and as long as `out`; queued on this GPU's stream.
    pub(crate) fn sum_sources(
        &self,
        out: &mut CudaSlice<f32>,
        srcs: &[&CudaSlice<f32>],
    ) -> Result<()> {
        let n = out.len() as u64;
        for launch in sum_launches(srcs.len()) {
            let group = &srcs[launch.group.clone()];
            let terms = group.len() as i32;
            let head_is_out = i32::from(launch.head.is_none());
            let mut b = self.stream.launch_builder(&self.kernels.sum_sources);
            b.arg(&mut *out);
            match launch.head {
                Some(h) => b.arg(srcs[h]),
                None => b.arg(&NULL),
            };
            b.arg(&head_is_out);
            for k in 0..SUM_GROUP_SOURCES {
                match group.get(k) {
                    Some(src) => b.arg(*src),
                    None => b.arg(&NULL),
                };
            }
            b.arg(&terms).arg(&n);
            // SAFETY: the signature matches `sum_sources` in `KERNELS`; every source the
            // kernel reads (the head unless `head_is_out`, the first `terms` of the group)
            // holds `n` elements on this GPU, as `out` does; the null pointers are never read.
            unsafe { b.launch(launch_config(n.div_ceil(4) as usize)) }
                .map_err(cuda("sum_sources"))?;
        }
        Ok(())
    }

    /// One SGD step on `w` with gradient `g`: with `mom` (the momentum state and its
    /// `momentum`), or without momentum.
    pub(crate) fn sgd(
        &self,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        mom: Option<(&mut CudaSlice<f32>, f32)>,
        p: StepParams,
    ) -> Result<()> {
        let n = w.len() as u64;
        let (has_clip, clip) = p.clip_args();
        let has_mom = i32::from(mom.is_some());
        let mut b = self.stream.launch_builder(&self.kernels.sgd_update);
        b.arg(w).arg(g);
        let momentum = push_momentum(&mut b, mom);
        b.arg(&has_mom).arg(&momentum).arg(&p.lr).arg(&p.wd);
        b.arg(&p.rescale).arg(&has_clip).arg(&clip).arg(&n);
        // SAFETY: the signature matches `sgd_update`; `w`, `g` (and `mom` when used) hold `n`
        // elements on this GPU.
        unsafe { b.launch(launch_config(n.div_ceil(4) as usize)) }.map_err(cuda("sgd_update"))?;
        Ok(())
    }

    /// One Adam step (`p.lr` already bias-corrected, as the CPU optimizer computes it) with
    /// its `mean` and `var` states and `(beta1, beta2, epsilon)`.
    pub(crate) fn adam(
        &self,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        (mean, var): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        p: StepParams,
        (b1, b2, eps): (f32, f32, f32),
    ) -> Result<()> {
        let n = w.len() as u64;
        let (has_clip, clip) = p.clip_args();
        let mut b = self.stream.launch_builder(&self.kernels.adam_update);
        b.arg(w)
            .arg(g)
            .arg(mean)
            .arg(var)
            .arg(&p.lr)
            .arg(&p.wd)
            .arg(&p.rescale);
        b.arg(&has_clip)
            .arg(&clip)
            .arg(&b1)
            .arg(&b2)
            .arg(&eps)
            .arg(&n);
        // SAFETY: the signature matches `adam_update`; every buffer holds `n` elements on
        // this GPU.
        unsafe { b.launch(launch_config(n.div_ceil(4) as usize)) }.map_err(cuda("adam_update"))?;
        Ok(())
    }
}

/// The hyper-parameters of one optimizer step, as float32 (kvstore-optimizer's `R::param`),
/// for the dense kernels and the lazy row kernels alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepParams {
    /// The learning rate (adam: already bias-corrected for the update's count).
    pub(crate) lr: f32,
    pub(crate) wd: f32,
    pub(crate) rescale: f32,
    pub(crate) clip: Option<f32>,
}

impl StepParams {
    /// The clip as the kernels take it: a flag and the bound (0 without a clip).
    pub(crate) fn clip_args(&self) -> (i32, f32) {
        (i32::from(self.clip.is_some()), self.clip.unwrap_or(0.0))
    }
}

impl Gpu {
    /// Queues the quantisation of `grad` against `residual` into `out` (lengths and GPU
    /// checked by the caller).
    pub(crate) fn quantize(
        &self,
        kind: CompressionType,
        threshold: f32,
        grad: &CudaSlice<f32>,
        residual: &mut CudaSlice<f32>,
        out: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let n = grad.len() as u64;
        let words = (grad.len()).div_ceil(kind.factor());
        let function = match kind {
            CompressionType::TwoBit => &self.kernels.quantize_2bit,
            CompressionType::OneBit => &self.kernels.quantize_1bit,
        };
        let mut b = self.stream.launch_builder(function);
        b.arg(grad).arg(residual).arg(out).arg(&threshold).arg(&n);
        // SAFETY: the signature matches `quantize_2bit`/`quantize_1bit` in
        // `COMPRESSION_KERNELS`; `grad` and `residual` hold `n` elements and `out` at least
        // `ceil(n / factor)` words, all on this GPU. One thread per byte of codes.
        unsafe { b.launch(launch_config(4 * words)) }.map_err(cuda("quantize"))?;
        Ok(())
    }

    /// Queues the dequantisation of `packed` into `out` (`add`: into `out`'s values).
    pub(crate) fn dequantize(
        &self,
        kind: CompressionType,
        threshold: f32,
        packed: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        add: bool,
    ) -> Result<()> {
        let n = out.len() as u64;
        let add = i32::from(add);
        let mut b = match kind {
            CompressionType::TwoBit => {
                let mut b = self.stream.launch_builder(&self.kernels.dequantize_2bit);
                b.arg(packed).arg(out).arg(&threshold);
                b
            }
            CompressionType::OneBit => {
                let mut b = self.stream.launch_builder(&self.kernels.dequantize_1bit);
                b.arg(packed).arg(out);
                b
            }
        };
        b.arg(&add).arg(&n);
        // SAFETY: the signatures match `dequantize_2bit` (packed, out, t, add, n) and
        // `dequantize_1bit` (packed, out, add, n); `out` holds `n` elements and `packed` at
        // least `ceil(n / factor)` words, on this GPU. One thread per byte of codes (4 or 8
        // elements).
        let per_byte = kind.factor() / 4;
        unsafe { b.launch(launch_config((n as usize).div_ceil(per_byte))) }
            .map_err(cuda("dequantize"))?;
        Ok(())
    }
}

/// A dense float32 array in one GPU's memory: what the GPU-valued calls of the `device` and
/// `nccl` stores take and fill (MXNet's `NDArray` on `mx.gpu(i)`).
#[derive(Debug)]
pub struct DeviceArray {
    shape: Vec<usize>,
    ordinal: usize,
    pub(crate) data: CudaSlice<f32>,
}

impl DeviceArray {
    /// Zeros of `shape` on `gpu(ordinal)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a shape without elements (CUDA allocations are never
    /// empty); [`Error::Device`] without a GPU of that ordinal, or when allocation fails.
    pub fn zeros(shape: &[usize], ordinal: usize) -> Result<DeviceArray> {
        let n = non_empty(shape)?;
        let gpu = Runtime::get()?.gpu(ordinal)?;
        let data = gpu.stream.alloc_zeros::<f32>(n).map_err(cuda("alloc"))?;
        Ok(DeviceArray {
            shape: shape.to_vec(),
            ordinal,
            data,
        })
    }

    /// Copies a dense float32 host array to `gpu(ordinal)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for another dtype, a row-sparse array or no element;
    /// [`Error::Device`] as [`zeros`](DeviceArray::zeros).
    pub fn from_host(array: &NDArray, ordinal: usize) -> Result<DeviceArray> {
        match array.dense() {
            Some(host) => DeviceArray::from_host_array(host, ordinal),
            None => Err(not_float32(array)),
        }
    }

    /// Copies a float32 [`HostArray`] to `gpu(ordinal)`.
    ///
    /// # Errors
    /// As [`from_host`](DeviceArray::from_host).
    pub fn from_host_array(host: &HostArray, ordinal: usize) -> Result<DeviceArray> {
        non_empty(host.shape())?;
        let elements = dense_f32(host)?;
        let data = Runtime::get()?.gpu(ordinal)?.upload_new(&elements)?;
        Ok(DeviceArray {
            shape: host.shape().to_vec(),
            ordinal,
            data,
        })
    }

    /// Copies the array to host memory (waits for every queued operation on it).
    ///
    /// # Errors
    /// [`Error::Device`] when a CUDA call fails.
    pub fn to_host(&self) -> Result<NDArray> {
        NDArray::from_vec(&self.shape, download_f32(&self.data)?)
    }

    /// Copies a dense float32 host array of this array's shape into it (queued on its GPU's
    /// stream; the host data is staged first, so `array` may change as soon as this returns).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the shapes differ; [`Error::InvalidArgument`] for another
    /// dtype or a row-sparse array; [`Error::Device`] when the copy fails.
    pub fn copy_from_host(&mut self, array: &NDArray) -> Result<()> {
        match array.dense() {
            Some(host) => self.copy_from_host_array(host),
            None => Err(not_float32(array)),
        }
    }

    /// Copies a float32 [`HostArray`] of this array's shape into it.
    ///
    /// # Errors
    /// As [`copy_from_host`](DeviceArray::copy_from_host).
    pub fn copy_from_host_array(&mut self, host: &HostArray) -> Result<()> {
        if host.shape() != self.shape.as_slice() {
            return Err(Error::ShapeMismatch {
                what: "a host-to-GPU copy".into(),
                expected: self.shape.clone(),
                found: host.shape().to_vec(),
            });
        }
        let elements = dense_f32(host)?;
        Runtime::get()?
            .gpu(self.ordinal)?
            .upload(&elements, &mut self.data)
    }

    /// Copies `src` (on any GPU) into this array.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the shapes differ; [`Error::Device`] when a copy fails.
    pub fn copy_from(&mut self, src: &DeviceArray) -> Result<()> {
        if src.shape != self.shape {
            return Err(Error::ShapeMismatch {
                what: "a GPU copy".into(),
                expected: self.shape.clone(),
                found: src.shape.clone(),
            });
        }
        let gpu = Runtime::get()?.gpu(self.ordinal)?;
        copy_on(&gpu.stream, &src.data, &mut self.data)
    }

    /// A copy on `gpu(ordinal)` (this array's GPU or another).
    ///
    /// # Errors
    /// [`Error::Device`] when allocation or the copy fails.
    pub fn copy_to(&self, ordinal: usize) -> Result<DeviceArray> {
        let mut copy = DeviceArray::zeros(&self.shape, ordinal)?;
        copy.copy_from(self)?;
        Ok(copy)
    }

    /// Writes the sum of `srcs` (at least one, all of this array's shape and on its GPU) into
    /// this array, in the CPU store's association order (`srcs[0]`, then groups of four), by
    /// the reduction kernel the `device` store uses. Queued on the GPU's stream: it returns
    /// before the GPU is done ([`to_host`](DeviceArray::to_host) waits).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for no source, or one on another GPU;
    /// [`Error::ShapeMismatch`] for one of another shape; [`Error::Device`] when the launch
    /// fails.
    pub fn sum_from(&mut self, srcs: &[&DeviceArray]) -> Result<()> {
        if srcs.is_empty() {
            return Err(Error::InvalidArgument(
                "a sum needs at least one source".into(),
            ));
        }
        for src in srcs {
            if src.shape != self.shape {
                return Err(Error::ShapeMismatch {
                    what: "a GPU sum".into(),
                    expected: self.shape.clone(),
                    found: src.shape.clone(),
                });
            }
            if src.ordinal != self.ordinal {
                return Err(Error::InvalidArgument(format!(
                    "a source of the sum is on gpu({}), the output on gpu({})",
                    src.ordinal, self.ordinal
                )));
            }
        }
        let gpu = Runtime::get()?.gpu(self.ordinal)?;
        let srcs: Vec<&CudaSlice<f32>> = srcs.iter().map(|s| &s.data).collect();
        gpu.sum_sources(&mut self.data, &srcs)
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Always float32.
    pub fn dtype(&self) -> DType {
        DType::F32
    }

    /// The GPU ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// `Context::Gpu(ordinal)`.
    pub fn context(&self) -> Context {
        Context::Gpu(self.ordinal)
    }

    /// Number of elements.
    pub fn size(&self) -> usize {
        self.data.len()
    }
}

/// The contents of `slice`, copied to host memory once every operation queued on its stream
/// is done.
pub(crate) fn download<T: cudarc::driver::DeviceRepr>(slice: &CudaSlice<T>) -> Result<Vec<T>> {
    let data = slice
        .stream()
        .clone_dtoh(slice)
        .map_err(cuda("copy to host"))?;
    slice.stream().synchronize().map_err(cuda("synchronize"))?;
    Ok(data)
}

/// The contents of float32 `slice`, copied to host memory once every operation queued on its
/// stream is done (large copies staged through its GPU's page-locked buffer).
pub(crate) fn download_f32(slice: &CudaSlice<f32>) -> Result<Vec<f32>> {
    let stream = slice.stream();
    let gpu = Runtime::get()?.gpu(stream.context().ordinal())?;
    gpu.staging.download(stream, slice)
}

/// The element count of `shape`, refusing none: CUDA allocations are never empty.
pub(crate) fn non_empty(shape: &[usize]) -> Result<usize> {
    match shape.iter().product::<usize>() {
        0 => Err(Error::InvalidArgument(format!(
            "a GPU array needs at least one element, got shape {shape:?}"
        ))),
        n => Ok(n),
    }
}

/// Queues the copy of `src` (on any GPU) into `dst` on `stream` (`dst`'s GPU's). Between
/// GPUs, `src`'s stream then waits for the copy, so that nothing later on it (a write, or the
/// stream-ordered free of `src`) can overtake the copy's read.
pub(crate) fn copy_on<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<T>,
    dst: &mut CudaSlice<T>,
) -> Result<()> {
    stream.memcpy_dtod(src, dst).map_err(cuda("GPU copy"))?;
    if src.stream().context() != stream.context() {
        let done = stream.record_event(None).map_err(cuda("cuEventRecord"))?;
        src.stream()
            .wait(&done)
            .map_err(cuda("cuStreamWaitEvent"))?;
    }
    Ok(())
}

/// The elements of a float32 host array, borrowed when they lie in order in memory.
fn dense_f32(host: &HostArray) -> Result<Cow<'_, [f32]>> {
    match host {
        HostArray::F32(a) => Ok(match a.as_slice() {
            Some(elements) => Cow::Borrowed(elements),
            None => Cow::Owned(a.iter().copied().collect()),
        }),
        other => Err(refused(StorageType::Dense, other.dtype())),
    }
}

/// The error for an array GPU memory cannot take (row-sparse, in device memory already, or
/// not float32).
fn not_float32(array: &NDArray) -> Error {
    refused(array.storage_type(), array.dtype())
}

/// The error for an array of `storage` and `dtype` that GPU memory cannot take.
fn refused(storage: StorageType, dtype: DType) -> Error {
    Error::InvalidArgument(format!(
        "GPU values are dense float32 for now, got a {storage} {dtype} array"
    ))
}
