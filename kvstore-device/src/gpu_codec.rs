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

use crate::gpu::{copy_on, cuda, download, DeviceArray, Runtime};

/// The CUDA C source of the compression kernels (compiled with the other kernels of
/// [`gpu::KERNELS`](crate::gpu::KERNELS), after [`gpu::KERNEL_PRELUDE`](crate::gpu::KERNEL_PRELUDE),
/// by NVRTC with `--fmad=false --ftz=false`).
///
/// The layout is the CPU codec's, byte by byte: byte `b` of the packed codes holds elements
/// `4b .. 4b + 4` (2-bit, element `e` at bits `6 - 2 * (e % 4)`) or `8b .. 8b + 8` (1-bit,
/// element `e` at bit `7 - e % 8`), the first element in the most significant bits, as in
/// MXNet; the codes fill whole 32-bit words, whose unused trailing codes are zero.
///
/// Every kernel gives one byte of codes to one thread, so that a warp reads and writes
/// neighbouring memory: its elements are read and written as `float4`s (one for 2-bit, two
/// for 1-bit) when the float buffers are 16-byte aligned and the byte's elements all exist,
/// one by one otherwise, with the same operations either way.
///
/// - `quantize_2bit`, `quantize_1bit`: `x = r + g`; 2-bit: `x >= t` gives `11` and
///   `r = x - t`; else `x <= -t` gives `10` and `r = x - (-t)`; else `00` and `r = x`. 1-bit:
///   `x > t` gives `1` and `r = x - 1`; else `0` and `r = x + 1`.
/// - `dequantize_2bit`, `dequantize_1bit`: `11` → `t`, `10` → `-t`, `00`/`01` → `+0`;
///   `1` → `+1`, `0` → `-1`; with `add`, `out = out + value`.
///
/// All are grid-stride loops; each thread's work is independent of the others' (no shared
/// memory, no synchronisation), so the source is also valid C++ with a few definitions of
/// CUDA's built-ins, which is how `tests/kernel_source.rs` checks it on machines without a GPU.
pub const COMPRESSION_KERNELS: &str = r#"

/* The 2-bit code of one element (3: +t, 2: -t, 0), its residual updated. */
__device__ __forceinline__ unsigned int kv_code2(float g, float* r, float t, float nt) {
    float x = *r + g;
    bool pos = x >= t;
    bool neg = x <= nt;
    *r = pos ? x - t : (neg ? x - nt : x);
    return pos ? 3u : (neg ? 2u : 0u);
}

/* The 1-bit code of one element, its residual updated. */
__device__ __forceinline__ unsigned int kv_code1(float g, float* r, float t) {
    float x = *r + g;
    bool hi = x > t;
    *r = hi ? x - 1.0f : x + 1.0f;
    return hi ? 1u : 0u;
}

__device__ __forceinline__ float kv_value2(unsigned int code, float t, float nt) {
    code &= 3u;
    return code == 3u ? t : (code == 2u ? nt : 0.0f);
}

__device__ __forceinline__ float kv_value1(unsigned int code) {
    return (code & 1u) ? 1.0f : -1.0f;
}

__device__ __forceinline__ float kv_put(float old, float v, int add) {
    return add ? old + v : v;
}

extern "C" __global__ void quantize_2bit(const float* grad, float* residual,
                                         unsigned int* out, float t,
                                         unsigned long long n) {
    const float nt = -t;
    unsigned char* bytes = (unsigned char*)out;
    const unsigned long long nbytes = 4ull * ((n + 15ull) / 16ull);
    const bool aligned = kv_aligned(grad) && kv_aligned(residual);
    for (unsigned long long b = KV_FIRST; b < nbytes; b += KV_STRIDE) {
        const unsigned long long e = 4ull * b;
        unsigned int code = 0u;
        if (aligned && e + 4ull <= n) {
            const float4 g = ((const float4*)grad)[b];
            float4 r = ((const float4*)residual)[b];
            code = (kv_code2(g.x, &r.x, t, nt) << 6) | (kv_code2(g.y, &r.y, t, nt) << 4) |
                   (kv_code2(g.z, &r.z, t, nt) << 2) | kv_code2(g.w, &r.w, t, nt);
            ((float4*)residual)[b] = r;
        } else {
            for (unsigned int j = 0u; j < 4u && e + j < n; ++j) {
                code |= kv_code2(grad[e + j], &residual[e + j], t, nt) << (6u - 2u * j);
            }
        }
        bytes[b] = (unsigned char)code;
    }
}

extern "C" __global__ void quantize_1bit(const float* grad, float* residual,
                                         unsigned int* out, float t,
                                         unsigned long long n) {
    unsigned char* bytes = (unsigned char*)out;
    const unsigned long long nbytes = 4ull * ((n + 31ull) / 32ull);
    const bool aligned = kv_aligned(grad) && kv_aligned(residual);
    for (unsigned long long b = KV_FIRST; b < nbytes; b += KV_STRIDE) {
        const unsigned long long e = 8ull * b;
        unsigned int code = 0u;
        if (aligned && e + 8ull <= n) {
            const float4 g0 = ((const float4*)grad)[2ull * b];
            const float4 g1 = ((const float4*)grad)[2ull * b + 1ull];
            float4 r0 = ((const float4*)residual)[2ull * b];
            float4 r1 = ((const float4*)residual)[2ull * b + 1ull];
            code = (kv_code1(g0.x, &r0.x, t) << 7) | (kv_code1(g0.y, &r0.y, t) << 6) |
                   (kv_code1(g0.z, &r0.z, t) << 5) | (kv_code1(g0.w, &r0.w, t) << 4) |
                   (kv_code1(g1.x, &r1.x, t) << 3) | (kv_code1(g1.y, &r1.y, t) << 2) |
                   (kv_code1(g1.z, &r1.z, t) << 1) | kv_code1(g1.w, &r1.w, t);
            ((float4*)residual)[2ull * b] = r0;
            ((float4*)residual)[2ull * b + 1ull] = r1;
        } else {
            for (unsigned int j = 0u; j < 8u && e + j < n; ++j) {
                code |= kv_code1(grad[e + j], &residual[e + j], t) << (7u - j);
            }
        }
        bytes[b] = (unsigned char)code;
    }
}

extern "C" __global__ void dequantize_2bit(const unsigned int* packed, float* out, float t,
                                           int add, unsigned long long n) {
    const float nt = -t;
    const unsigned char* bytes = (const unsigned char*)packed;
    const unsigned long long nbytes = (n + 3ull) / 4ull;
    const bool aligned = kv_aligned(out);
    for (unsigned long long b = KV_FIRST; b < nbytes; b += KV_STRIDE) {
        const unsigned long long e = 4ull * b;
        const unsigned int code = bytes[b];
        if (aligned && e + 4ull <= n) {
            float4 o = ((const float4*)out)[b];
            o.x = kv_put(o.x, kv_value2(code >> 6, t, nt), add);
            o.y = kv_put(o.y, kv_value2(code >> 4, t, nt), add);
            o.z = kv_put(o.z, kv_value2(code >> 2, t, nt), add);
            o.w = kv_put(o.w, kv_value2(code, t, nt), add);
            ((float4*)out)[b] = o;
        } else {
            for (unsigned int j = 0u; j < 4u && e + j < n; ++j) {
                out[e + j] = kv_put(out[e + j], kv_value2(code >> (6u - 2u * j), t, nt), add);
            }
        }
    }
}

extern "C" __global__ void dequantize_1bit(const unsigned int* packed, float* out, int add,
                                           unsigned long long n) {
    const unsigned char* bytes = (const unsigned char*)packed;
    const unsigned long long nbytes = (n + 7ull) / 8ull;
    const bool aligned = kv_aligned(out);
    for (unsigned long long b = KV_FIRST; b < nbytes; b += KV_STRIDE) {
        const unsigned long long e = 8ull * b;
        const unsigned int code = bytes[b];
        if (aligned && e + 8ull <= n) {
            float4 o0 = ((const float4*)out)[2ull * b];
            float4 o1 = ((const float4*)out)[2ull * b + 1ull];
            o0.x = kv_put(o0.x, kv_value1(code >> 7), add);
            o0.y = kv_put(o0.y, kv_value1(code >> 6), add);
            o0.z = kv_put(o0.z, kv_value1(code >> 5), add);
            o0.w = kv_put(o0.w, kv_value1(code >> 4), add);
            o1.x = kv_put(o1.x, kv_value1(code >> 3), add);
            o1.y = kv_put(o1.y, kv_value1(code >> 2), add);
            o1.z = kv_put(o1.z, kv_value1(code >> 1), add);
            o1.w = kv_put(o1.w, kv_value1(code), add);
            ((float4*)out)[2ull * b] = o0;
            ((float4*)out)[2ull * b + 1ull] = o1;
        } else {
            for (unsigned int j = 0u; j < 8u && e + j < n; ++j) {
                out[e + j] = kv_put(out[e + j], kv_value1(code >> (7u - j)), add);
            }
        }
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
        let words = download(&self.data)?;
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
        copy_on(&gpu.stream, &src.data, &mut self.data)
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
