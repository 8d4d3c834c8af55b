//! GPU memory and kernels: the [`Runtime`] (one context, stream and kernel module per GPU),
//! [`DeviceArray`], a dense float32 array in one GPU's memory, and the NVRTC compilation of
//! every kernel ([`kernel_source`], [`compile_kernels`]).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use kvstore_base::{Context, DType, Error, NDArray, Result};
use kvstore_compression::CompressionType;

use crate::probe::{panic_text, probe};

/// The CUDA C source of the reduction and optimizer kernels, compiled once per process by
/// NVRTC, together with the compression kernels ([`kernel_source`]), with `--fmad=false` (no
/// fused multiply-add, so each operation rounds as the CPU code's does).
///
/// All kernels are grid-stride loops over `n` float32 elements.
/// - `sum_group`: `acc += (((s1 + s2) + s3) + s4)` with the first `terms` sources: the CPU
///   store's association order, four sources at a time.
/// - `sgd_update`: kvstore-optimizer's `sgd_element`.
/// - `adam_update`: kvstore-optimizer's Adam (MXNet 1.x: weight decay, then clipping).
pub const KERNELS: &str = r#"
__device__ __forceinline__ float kv_clip(float x, float c) {
    return x > c ? c : (x < -c ? -c : x);
}

extern "C" __global__ void sum_group(float* acc, const float* s1, const float* s2,
                                     const float* s3, const float* s4, int terms,
                                     unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)blockDim.x * gridDim.x) {
        float t = s1[i];
        if (terms > 1) t = t + s2[i];
        if (terms > 2) t = t + s3[i];
        if (terms > 3) t = t + s4[i];
        acc[i] = acc[i] + t;
    }
}

extern "C" __global__ void sgd_update(float* w, const float* g, float* mom, int has_mom,
                                      float momentum, float lr, float wd, float rescale,
                                      int has_clip, float clip, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)blockDim.x * gridDim.x) {
        float wi = w[i];
        float step = has_clip ? lr * kv_clip(rescale * g[i], clip) : lr * rescale * g[i];
        float m = has_mom ? mom[i] : 0.0f;
        float mu = has_mom ? momentum : 0.0f;
        float nm = mu * m - lr * wd * wi - step;
        w[i] = wi + nm;
        if (has_mom) mom[i] = nm;
    }
}

extern "C" __global__ void adam_update(float* w, const float* g, float* mean, float* var,
                                       float lr, float wd, float rescale, int has_clip,
                                       float clip, float b1, float b2, float eps,
                                       unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)blockDim.x * gridDim.x) {
        float wi = w[i];
        float gi = g[i] * rescale + wi * wd;
        if (has_clip) gi = kv_clip(gi, clip);
        float m = b1 * mean[i] + (1.0f - b1) * gi;
        float v = b2 * var[i] + (1.0f - b2) * gi * gi;
        mean[i] = m;
        var[i] = v;
        w[i] = wi - lr * m / (sqrtf(v) + eps);
    }
}
"#;

/// Every kernel of the crate: [`KERNELS`] and the compression kernels
/// ([`COMPRESSION_KERNELS`](crate::gpu_codec::COMPRESSION_KERNELS)), as one NVRTC program.
pub fn kernel_source() -> String {
    format!("{KERNELS}\n{}", crate::gpu_codec::COMPRESSION_KERNELS)
}

/// The NVRTC options of every kernel: no fused multiply-add, IEEE division and square root,
/// denormals kept, so that each operation rounds as the CPU code's does.
fn compile_options() -> CompileOptions {
    CompileOptions {
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        ..Default::default()
    }
}

/// Compiles [`kernel_source`] with NVRTC (as the [`Runtime`] does at its start) and returns
/// the PTX text. Needs `libnvrtc` only, no driver or GPU.
///
/// # Errors
/// [`Error::Device`] when `libnvrtc` cannot be loaded or the compilation fails (with NVRTC's
/// log).
pub fn compile_kernels() -> Result<String> {
    compile().map(|ptx| ptx.to_src())
}

fn compile() -> Result<cudarc::nvrtc::Ptx> {
    // SAFETY: only tries `dlopen` on the candidate names, as the probe does.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Device(
            "no NVRTC: libnvrtc not found (the GPU kernels are compiled at run time; \
             install the CUDA toolkit's NVRTC or set LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    match catch_unwind(|| compile_ptx_with_opts(kernel_source(), compile_options())) {
        Ok(ptx) => ptx.map_err(cuda("NVRTC compile")),
        Err(p) => Err(Error::Device(format!("NVRTC failed: {}", panic_text(&*p)))),
    }
}

/// One GPU: its context, the stream every operation of this crate on it uses (so work on
/// one GPU is ordered), and the loaded kernels.
#[derive(Debug)]
pub struct Gpu {
    /// The stream of this GPU.
    pub stream: Arc<CudaStream>,
    sum_group: CudaFunction,
    sgd_update: CudaFunction,
    adam_update: CudaFunction,
    quantize_2bit: CudaFunction,
    quantize_1bit: CudaFunction,
    dequantize_2bit: CudaFunction,
    dequantize_1bit: CudaFunction,
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
        let ptx = compile()?;
        let mut gpus = Vec::new();
        for dev in &info.devices {
            let ctx = CudaContext::new(dev.ordinal).map_err(cuda("cuCtx"))?;
            let stream = ctx.new_stream().map_err(cuda("cuStreamCreate"))?;
            let module = ctx.load_module(ptx.clone()).map_err(cuda("cuModuleLoad"))?;
            let f = |name: &str| {
                module
                    .load_function(name)
                    .map_err(cuda("cuModuleGetFunction"))
            };
            gpus.push(Gpu {
                sum_group: f("sum_group")?,
                sgd_update: f("sgd_update")?,
                adam_update: f("adam_update")?,
                quantize_2bit: f("quantize_2bit")?,
                quantize_1bit: f("quantize_1bit")?,
                dequantize_2bit: f("dequantize_2bit")?,
                dequantize_1bit: f("dequantize_1bit")?,
                stream,
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

fn launch_config(n: usize) -> LaunchConfig {
    const THREADS: usize = 256;
    let blocks = n.div_ceil(THREADS).clamp(1, 65_535 * 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// `acc += (((s[0] + s[1]) + s[2]) + s[3])` over the (1 to 4) sources, all on this GPU.
    pub(crate) fn sum_group(
        &self,
        acc: &mut CudaSlice<f32>,
        srcs: &[&CudaSlice<f32>],
    ) -> Result<()> {
        assert!((1..=4).contains(&srcs.len()), "1 to 4 sources");
        let n = acc.len() as u64;
        let s = |i: usize| srcs.get(i).copied().unwrap_or(srcs[0]);
        let (s1, s2, s3, s4) = (s(0), s(1), s(2), s(3));
        let terms = srcs.len() as i32;
        let mut b = self.stream.launch_builder(&self.sum_group);
        b.arg(acc)
            .arg(s1)
            .arg(s2)
            .arg(s3)
            .arg(s4)
            .arg(&terms)
            .arg(&n);
        // SAFETY: the signature matches `sum_group` in `KERNELS`; every buffer holds `n`
        // elements (checked by the callers) on this GPU.
        unsafe { b.launch(launch_config(n as usize)) }.map_err(cuda("sum_group"))?;
        Ok(())
    }

    /// One SGD step on `w` with gradient `g` (`mom` is the momentum, when there is one).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sgd(
        &self,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        mom: Option<&mut CudaSlice<f32>>,
        momentum: f32,
        lr: f32,
        wd: f32,
        rescale: f32,
        clip: Option<f32>,
    ) -> Result<()> {
        let n = w.len() as u64;
        let (has_clip, clip) = (i32::from(clip.is_some()), clip.unwrap_or(0.0));
        let has_mom = i32::from(mom.is_some());
        // Without momentum the kernel never touches `mom`: a one-element placeholder.
        let mut placeholder;
        let mom = match mom {
            Some(m) => m,
            None => {
                placeholder = self.stream.alloc_zeros::<f32>(1).map_err(cuda("alloc"))?;
                &mut placeholder
            }
        };
        let mut b = self.stream.launch_builder(&self.sgd_update);
        b.arg(w)
            .arg(g)
            .arg(mom)
            .arg(&has_mom)
            .arg(&momentum)
            .arg(&lr)
            .arg(&wd);
        b.arg(&rescale).arg(&has_clip).arg(&clip).arg(&n);
        // SAFETY: the signature matches `sgd_update`; `w`, `g` (and `mom` when used) hold `n`
        // elements on this GPU.
        unsafe { b.launch(launch_config(n as usize)) }.map_err(cuda("sgd_update"))?;
        Ok(())
    }

    /// One Adam step (`lr` already bias-corrected, as the CPU optimizer computes it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn adam(
        &self,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        mean: &mut CudaSlice<f32>,
        var: &mut CudaSlice<f32>,
        lr: f32,
        wd: f32,
        rescale: f32,
        clip: Option<f32>,
        betas: (f32, f32, f32),
    ) -> Result<()> {
        let n = w.len() as u64;
        let (has_clip, clip) = (i32::from(clip.is_some()), clip.unwrap_or(0.0));
        let (b1, b2, eps) = betas;
        let mut b = self.stream.launch_builder(&self.adam_update);
        b.arg(w)
            .arg(g)
            .arg(mean)
            .arg(var)
            .arg(&lr)
            .arg(&wd)
            .arg(&rescale);
        b.arg(&has_clip)
            .arg(&clip)
            .arg(&b1)
            .arg(&b2)
            .arg(&eps)
            .arg(&n);
        // SAFETY: the signature matches `adam_update`; every buffer holds `n` elements on
        // this GPU.
        unsafe { b.launch(launch_config(n as usize)) }.map_err(cuda("adam_update"))?;
        Ok(())
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
            CompressionType::TwoBit => &self.quantize_2bit,
            CompressionType::OneBit => &self.quantize_1bit,
        };
        let mut b = self.stream.launch_builder(function);
        b.arg(grad).arg(residual).arg(out).arg(&threshold).arg(&n);
        // SAFETY: the signature matches `quantize_2bit`/`quantize_1bit` in
        // `COMPRESSION_KERNELS`; `grad` and `residual` hold `n` elements and `out` at least
        // `ceil(n / factor)` words, all on this GPU.
        unsafe { b.launch(launch_config(words)) }.map_err(cuda("quantize"))?;
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
                let mut b = self.stream.launch_builder(&self.dequantize_2bit);
                b.arg(packed).arg(out).arg(&threshold);
                b
            }
            CompressionType::OneBit => {
                let mut b = self.stream.launch_builder(&self.dequantize_1bit);
                b.arg(packed).arg(out);
                b
            }
        };
        b.arg(&add).arg(&n);
        // SAFETY: the signatures match `dequantize_2bit` (packed, out, t, add, n) and
        // `dequantize_1bit` (packed, out, add, n); `out` holds `n` elements and `packed` at
        // least `ceil(n / factor)` words, on this GPU.
        unsafe { b.launch(launch_config(n as usize)) }.map_err(cuda("dequantize"))?;
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
    /// [`Error::Device`] without a GPU of that ordinal, or when allocation fails.
    pub fn zeros(shape: &[usize], ordinal: usize) -> Result<DeviceArray> {
        let gpu = Runtime::get()?.gpu(ordinal)?;
        let n = shape.iter().product::<usize>();
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
    /// [`Error::InvalidArgument`] for another dtype or a row-sparse array; [`Error::Device`]
    /// as [`zeros`](DeviceArray::zeros).
    pub fn from_host(array: &NDArray, ordinal: usize) -> Result<DeviceArray> {
        let host = host_f32(array)?;
        let gpu = Runtime::get()?.gpu(ordinal)?;
        let data = gpu
            .stream
            .clone_htod(&host[..])
            .map_err(cuda("copy to GPU"))?;
        Ok(DeviceArray {
            shape: array.shape().to_vec(),
            ordinal,
            data,
        })
    }

    /// Copies the array to host memory (waits for every queued operation on it).
    ///
    /// # Errors
    /// [`Error::Device`] when a CUDA call fails.
    pub fn to_host(&self) -> Result<NDArray> {
        let gpu = Runtime::get()?.gpu(self.ordinal)?;
        let data = gpu
            .stream
            .clone_dtoh(&self.data)
            .map_err(cuda("copy to host"))?;
        gpu.stream.synchronize().map_err(cuda("synchronize"))?;
        NDArray::from_vec(&self.shape, data)
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
        gpu.stream
            .memcpy_dtod(&src.data, &mut self.data)
            .map_err(cuda("GPU copy"))
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

fn host_f32(array: &NDArray) -> Result<Vec<f32>> {
    if array.dtype() != DType::F32 || array.dense().is_none() {
        return Err(Error::InvalidArgument(format!(
            "GPU values are dense float32 for now, got a {} {} array",
            array.storage_type(),
            array.dtype()
        )));
    }
    array.to_vec::<f32>()
}
