//! Gradient compression on the GPU: MXNet's 2-bit and 1-bit codecs as CUDA kernels,
//! bit-identical to [`kvstore_compression::Codec`].
//!
//! - [`quantize`]: adds a gradient into its residual, writes the packed codes and takes the
//!   transmitted values out of the residual, on the gradient's GPU.
//! - [`dequantize`] / [`dequantize_add`]: writes (or adds) the values of packed codes into an
//!   array, on the array's GPU.
//! - [`PackedArray`]: the packed codes in one GPU's memory: `ceil(n / 16)` (2-bit) or
//!   `ceil(n / 32)` (1-bit) 32-bit words, whose memory bytes are exactly the bytes
//!   [`Codec::quantize`] writes ([`PackedArray::to_host`] returns them).
//!
//! The kernels ([`COMPRESSION_KERNELS`]) perform the CPU codec's operations on the same
//! operands, in `f32`, compiled without fused multiply-add and without flushing denormals: the
//! packed words, the residuals and the dequantised values equal the CPU codec's bit for bit
//! (which NaN a NaN residual holds aside, as between any two builds of the CPU codec).
//!
//! Every function here only queues work on the stream of the GPU concerned (see
//! [`Runtime`]); [`DeviceArray::to_host`] and [`PackedArray::to_host`] wait for it.

use cudarc::driver::CudaSlice;
use kvstore_base::{Error, Result};
use kvstore_compression::{Codec, CompressionType};

use crate::gpu::{cuda, DeviceArray, Runtime};

/// The CUDA C source of the compression kernels (compiled with the other kernels of
/// [`gpu::KERNELS`](crate::gpu::KERNELS), by NVRTC with `--fmad=false --ftz=false`).
///
/// The layout is the CPU codec's: element `j` of a word (`j < 16` for 2-bit, `j < 32` for
/// 1-bit) has its code at bit `8 * (j / 4) + 6 - 2 * (j % 4)` (2-bit, two bits) or
/// `8 * (j / 8) + 7 - j % 8` (1-bit), so that on a little-endian GPU the first element of each
/// byte is in its most significant bits, as in MXNet. Unused trailing codes are zero.
///
/// - `quantize_2bit`, `quantize_1bit`: one thread per output word (16 or 32 elements, read as
///   `float4`s when the buffers are 16-byte aligned). 2-bit: `x = r + g`; `x >= t` gives `11`
///   and `r = x - t`; else `x <= -t` gives `10` and `r = x - (-t)`; else `00` and `r = x`.
///   1-bit: `x = r + g`; `x > t` gives `1` and `r = x - 1`; else `0` and `r = x + 1`.
/// - `dequantize_2bit`, `dequantize_1bit`: one thread per element; `11` → `t`, `10` → `-t`,
///   `00`/`01` → `+0`; `1` → `+1`, `0` → `-1`; with `add`, `out = out + value`.
///
/// All are grid-stride loops; each thread's work is independent of the others' (no shared
/// memory, no synchronisation), so the source is also valid C++ with a few definitions of
/// CUDA's built-ins, which is how `tests/kernel_source.rs` checks it on machines without a GPU.
pub const COMPRESSION_KERNELS: &str = r#"
#define KV_SHIFT2(j) (8u * ((j) >> 2) + 6u - 2u * ((j) & 3u))
#define KV_POS2(j) (3u << KV_SHIFT2(j))
#define KV_NEG2(j) (2u << KV_SHIFT2(j))
#define KV_BIT1(j) (1u << (8u * ((j) >> 3) + 7u - ((j) & 7u)))

__device__ __forceinline__ unsigned int kv_quantize2(float g, float* r, float t, float nt,
                                                     unsigned int j) {
    float x = *r + g;
    bool pos = x >= t;
    bool neg = x <= nt;
    *r = pos ? x - t : (neg ? x - nt : x);
    return pos ? KV_POS2(j) : (neg ? KV_NEG2(j) : 0u);
}

__device__ __forceinline__ unsigned int kv_quantize1(float g, float* r, float t,
                                                     unsigned int j) {
    float x = *r + g;
    bool hi = x > t;
    *r = hi ? x - 1.0f : x + 1.0f;
    return hi ? KV_BIT1(j) : 0u;
}

extern "C" __global__ void quantize_2bit(const float* grad, float* residual,
                                         unsigned int* out, float t,
                                         unsigned long long n) {
    const float nt = -t;
    const unsigned long long words = (n + 15ull) / 16ull;
    const bool aligned =
        ((((unsigned long long)grad) | ((unsigned long long)residual)) & 15ull) == 0ull;
    for (unsigned long long w = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         w < words; w += (unsigned long long)blockDim.x * gridDim.x) {
        const unsigned long long base = w * 16ull;
        unsigned int word = 0u;
        if (aligned && base + 16ull <= n) {
            const float4* g4 = (const float4*)(grad + base);
            float4* r4 = (float4*)(residual + base);
            for (unsigned int q = 0u; q < 4u; ++q) {
                float4 g = g4[q];
                float4 r = r4[q];
                word |= kv_quantize2(g.x, &r.x, t, nt, 4u * q);
                word |= kv_quantize2(g.y, &r.y, t, nt, 4u * q + 1u);
                word |= kv_quantize2(g.z, &r.z, t, nt, 4u * q + 2u);
                word |= kv_quantize2(g.w, &r.w, t, nt, 4u * q + 3u);
                r4[q] = r;
            }
        } else {
            for (unsigned int j = 0u; j < 16u && base + j < n; ++j) {
                word |= kv_quantize2(grad[base + j], &residual[base + j], t, nt, j);
            }
        }
        out[w] = word;
    }
}

extern "C" __global__ void quantize_1bit(const float* grad, float* residual,
                                         unsigned int* out, float t,
                                         unsigned long long n) {
    const unsigned long long words = (n + 31ull) / 32ull;
    const bool aligned =
        ((((unsigned long long)grad) | ((unsigned long long)residual)) & 15ull) == 0ull;
    for (unsigned long long w = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         w < words; w += (unsigned long long)blockDim.x * gridDim.x) {
        const unsigned long long base = w * 32ull;
        unsigned int word = 0u;
        if (aligned && base + 32ull <= n) {
            const float4* g4 = (const float4*)(grad + base);
            float4* r4 = (float4*)(residual + base);
            for (unsigned int q = 0u; q < 8u; ++q) {
                float4 g = g4[q];
                float4 r = r4[q];
                word |= kv_quantize1(g.x, &r.x, t, 4u * q);
                word |= kv_quantize1(g.y, &r.y, t, 4u * q + 1u);
                word |= kv_quantize1(g.z, &r.z, t, 4u * q + 2u);
                word |= kv_quantize1(g.w, &r.w, t, 4u * q + 3u);
                r4[q] = r;
            }
        } else {
            for (unsigned int j = 0u; j < 32u && base + j < n; ++j) {
                word |= kv_quantize1(grad[base + j], &residual[base + j], t, j);
            }
        }
        out[w] = word;
    }
}

extern "C" __global__ void dequantize_2bit(const unsigned int* packed, float* out, float t,
                                           int add, unsigned long long n) {
    const float nt = -t;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)blockDim.x * gridDim.x) {
        const unsigned int j = (unsigned int)(i & 15ull);
        const unsigned int m = packed[i >> 4] & KV_POS2(j);
        const float v = (m == KV_POS2(j)) ? t : ((m == KV_NEG2(j)) ? nt : 0.0f);
        out[i] = add ? out[i] + v : v;
    }
}

extern "C" __global__ void dequantize_1bit(const unsigned int* packed, float* out, int add,
                                           unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)blockDim.x * gridDim.x) {
        const unsigned int j = (unsigned int)(i & 31ull);
        const float v = ((packed[i >> 5] & KV_BIT1(j)) == KV_BIT1(j)) ? 1.0f : -1.0f;
        out[i] = add ? out[i] + v : v;
    }
}
"#;

/// Packed compression codes in one GPU's memory: the output of [`quantize`], the input of
/// [`dequantize`], for `len` elements of one compression type.
#[derive(Debug)]
pub struct PackedArray {
    kind: CompressionType,
    len: usize,
    words: usize,
    ordinal: usize,
    /// At least one word (CUDA allocations are never empty).
    pub(crate) data: CudaSlice<u32>,
}

impl PackedArray {
    /// Zeroed codes for `len` elements of `codec`'s type on `gpu(ordinal)`.
    ///
    /// # Errors
    /// [`Error::Device`] without a GPU of that ordinal, or when allocation fails.
    pub fn zeros(codec: &Codec, len: usize, ordinal: usize) -> Result<PackedArray> {
        let gpu = Runtime::get()?.gpu(ordinal)?;
        let words = len.div_ceil(codec.factor());
        let data = gpu
            .stream
            .alloc_zeros::<u32>(words.max(1))
            .map_err(cuda("alloc"))?;
        Ok(PackedArray {
            kind: codec.kind(),
            len,
            words,
            ordinal,
            data,
        })
    }

    /// Copies packed bytes (as [`Codec::quantize`] writes them, for `len` elements) to
    /// `gpu(ordinal)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `bytes` is not [`Codec::compressed_len(len)`] bytes;
    /// [`Error::Device`] as [`zeros`](PackedArray::zeros).
    ///
    /// [`Codec::compressed_len(len)`]: Codec::compressed_len
    pub fn from_host(codec: &Codec, bytes: &[u8], len: usize, ordinal: usize) -> Result<Self> {
        if bytes.len() != codec.compressed_len(len) {
            return Err(Error::InvalidArgument(format!(
                "{} compression of {len} elements takes {} bytes, got {}",
                codec.kind(),
                codec.compressed_len(len),
                bytes.len()
            )));
        }
        let mut packed = PackedArray::zeros(codec, len, ordinal)?;
        let words: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        if !words.is_empty() {
            let gpu = Runtime::get()?.gpu(ordinal)?;
            gpu.stream
                .memcpy_htod(&words[..], &mut packed.data)
                .map_err(cuda("copy to GPU"))?;
        }
        Ok(packed)
    }

    /// The packed bytes in memory order, exactly as [`Codec::quantize`] writes them (waits
    /// for every queued operation on this GPU).
    ///
    /// # Errors
    /// [`Error::Device`] when a CUDA call fails.
    pub fn to_host(&self) -> Result<Vec<u8>> {
        let gpu = Runtime::get()?.gpu(self.ordinal)?;
        let words = gpu
            .stream
            .clone_dtoh(&self.data)
            .map_err(cuda("copy to host"))?;
        gpu.stream.synchronize().map_err(cuda("synchronize"))?;
        Ok(words[..self.words]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect())
    }

    /// Copies `src` (on any GPU; same type and length) into these codes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the type or length differs; [`Error::Device`] when the
    /// copy fails.
    pub fn copy_from(&mut self, src: &PackedArray) -> Result<()> {
        if src.kind != self.kind || src.len != self.len {
            return Err(Error::InvalidArgument(format!(
                "cannot copy {} codes of {} elements into {} codes of {}",
                src.kind, src.len, self.kind, self.len
            )));
        }
        let gpu = Runtime::get()?.gpu(self.ordinal)?;
        gpu.stream
            .memcpy_dtod(&src.data, &mut self.data)
            .map_err(cuda("GPU copy"))
    }

    /// The compression type of the codes.
    pub fn kind(&self) -> CompressionType {
        self.kind
    }

    /// The number of elements the codes stand for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the codes stand for no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the packed form: [`Codec::compressed_len`] of [`len`](PackedArray::len).
    pub fn byte_len(&self) -> usize {
        4 * self.words
    }

    /// The GPU ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

fn check_kind(codec: &Codec, packed: &PackedArray) -> Result<()> {
    if codec.kind() != packed.kind {
        return Err(Error::InvalidArgument(format!(
            "{} codes cannot be used with {} compression",
            packed.kind,
            codec.kind()
        )));
    }
    Ok(())
}

fn check_len(what: &str, expected: usize, found: usize) -> Result<()> {
    if expected != found {
        return Err(Error::InvalidArgument(format!(
            "{what} has {found} elements, the gradient {expected}"
        )));
    }
    Ok(())
}

fn check_same_gpu(what: &str, expected: usize, found: usize) -> Result<()> {
    if expected != found {
        return Err(Error::InvalidArgument(format!(
            "{what} is on gpu({found}), the kernel runs on gpu({expected})"
        )));
    }
    Ok(())
}

/// Quantises `grad` with error feedback into `out`, on `grad`'s GPU: [`Codec::quantize`]'s
/// arithmetic (residual and codes bit-identical to it). Queued on that GPU's stream.
///
/// # Errors
/// [`Error::InvalidArgument`] when `residual` or `out` is on another GPU, has another length,
/// or `out` holds another compression type; [`Error::Device`] when the launch fails.
pub fn quantize(
    codec: &Codec,
    grad: &DeviceArray,
    residual: &mut DeviceArray,
    out: &mut PackedArray,
) -> Result<()> {
    check_kind(codec, out)?;
    check_len("the residual", grad.size(), residual.size())?;
    check_len("the packed output", grad.size(), out.len)?;
    check_same_gpu("the residual", grad.ordinal(), residual.ordinal())?;
    check_same_gpu("the packed output", grad.ordinal(), out.ordinal)?;
    let gpu = Runtime::get()?.gpu(grad.ordinal())?;
    gpu.quantize(
        codec.kind(),
        codec.threshold(),
        &grad.data,
        &mut residual.data,
        &mut out.data,
    )
}

/// Writes the values of `packed` into `out`, on `out`'s GPU: [`Codec::dequantize`]'s values,
/// bit for bit. Queued on that GPU's stream.
///
/// # Errors
/// [`Error::InvalidArgument`] when `packed` is on another GPU, of another length or type;
/// [`Error::Device`] when the launch fails.
pub fn dequantize(codec: &Codec, packed: &PackedArray, out: &mut DeviceArray) -> Result<()> {
    dequantize_impl(codec, packed, out, false)
}

/// Adds the values of `packed` into `out` (`out = out + value`, one `f32` addition per
/// element), on `out`'s GPU: [`Codec::dequantize_add`], bit for bit. Queued on that GPU's
/// stream.
///
/// # Errors
/// As [`dequantize`].
pub fn dequantize_add(codec: &Codec, packed: &PackedArray, out: &mut DeviceArray) -> Result<()> {
    dequantize_impl(codec, packed, out, true)
}

fn dequantize_impl(
    codec: &Codec,
    packed: &PackedArray,
    out: &mut DeviceArray,
    add: bool,
) -> Result<()> {
    check_kind(codec, packed)?;
    check_len("the packed input", out.size(), packed.len)?;
    check_same_gpu("the packed input", out.ordinal(), packed.ordinal)?;
    let gpu = Runtime::get()?.gpu(out.ordinal())?;
    gpu.dequantize(
        codec.kind(),
        codec.threshold(),
        &packed.data,
        &mut out.data,
        add,
    )
}
