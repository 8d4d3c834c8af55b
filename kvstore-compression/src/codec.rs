//! [`Codec`]: quantisation with error feedback, and dequantisation.

use half::f16;
use kvstore_base::{DType, Error, NDArray, Result};

use crate::kernels;
use crate::CompressionType;

/// Quantises `f32` gradients into MXNet's packed 2-bit or 1-bit codes against a residual,
/// and dequantises packed codes.
///
/// The packed form of `n` elements is [`compressed_len(n)`](Codec::compressed_len) bytes:
/// `ceil(n / 16)` 32-bit words for 2-bit, `ceil(n / 32)` for 1-bit, as MXNet's buffers, in
/// memory (little-endian) byte order. Element `i` lives in byte `i / 4` (2-bit) or `i / 8`
/// (1-bit), the first element of a byte in its most significant bits; unused trailing codes
/// are zero.
///
/// **2-bit** (threshold `t`), for each element: `r += g`; then if `r >= t` the code is `11` and
/// `r -= t`, else if `r <= -t` the code is `10` and `r += t`, else `00` (both comparisons
/// inclusive). Dequantisation: `11` → `+t`, `10` → `-t`, `00` and `01` → `+0.0`.
///
/// **1-bit** (MXNet 2.x), for each element: `r += g`; then if `r > t` (strict) the bit is `1`
/// and `r -= 1`, else `0` and `r += 1`. Dequantisation: `1` → `+1.0`, `0` → `-1.0` (the
/// threshold plays no part).
///
/// These are MXNet's kernels operation for operation, in `f32`, so packed bytes, residuals and
/// dequantised values are bit-identical to MXNet's. Special values follow from the
/// comparisons: NaN compares false, so a NaN residual gives `00` (2-bit) and stays NaN, or
/// gives `0` and stays NaN (1-bit, `NaN + 1`); `+inf` gives `11` and stays `+inf` (`inf - t`),
/// `-inf` gives `10` and stays `-inf`; `-0.0` gives `00` and stays `-0.0` in the residual.
/// (Which NaN a residual holds, its sign and payload, is not specified: it depends on the
/// operand order the compiler picks for an addition, in MXNet's build as in this one.)
///
/// The residual is the caller's state: one `Vec<f32>` per key and device, zeroed at the start
/// (see [`Residuals`](crate::Residuals)).
///
/// ```
/// use kvstore_compression::Codec;
///
/// let codec = Codec::two_bit(0.5);
/// let grad = [0.6f32, -0.6, 0.1, 0.4];
/// let mut residual = [0.0f32; 4];
/// let mut packed = vec![0u8; codec.compressed_len(grad.len())]; // one word: 4 bytes
/// codec.quantize(&grad, &mut residual, &mut packed).unwrap();
/// assert_eq!(packed, [0b11_10_00_00, 0, 0, 0]);
/// assert_eq!(residual, [0.6 - 0.5, -0.6 + 0.5, 0.1, 0.4]);
///
/// let mut out = [0.0f32; 4];
/// codec.dequantize(&packed, &mut out).unwrap();
/// assert_eq!(out, [0.5, -0.5, 0.0, 0.0]);
///
/// // A server merging pushes adds into its buffer.
/// codec.dequantize_add(&packed, &mut out).unwrap();
/// assert_eq!(out, [1.0, -1.0, 0.0, 0.0]);
/// ```
///
/// Quantisation and dequantisation run on the calling thread, 16 or 32 elements per word with
/// vectorised, branch-free code (AVX-512 or AVX2 when the CPU has them), and allocate nothing.
/// Large arrays can be split across threads at multiples of [`factor()`](Codec::factor)
/// elements (and the matching `4`-byte words of the packed form).
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    kind: CompressionType,
    threshold: f32,
}

/// Codecs are equal when they quantise alike: the same kind and the same threshold bits (so a
/// NaN threshold, which 1-bit accepts, equals itself).
impl PartialEq for Codec {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.threshold.to_bits() == other.threshold.to_bits()
    }
}

impl Eq for Codec {}

/// Elements converted per step by the `f16` helpers (a multiple of 16 and 32).
const F16_CHUNK: usize = 1024;

impl Codec {
    /// A codec of `kind` with `threshold`. Any threshold is accepted here (the checks of
    /// [`CompressionSpec`](crate::CompressionSpec) are MXNet's parameter checks); a 2-bit
    /// threshold `<= 0` still follows the rules above (`r >= t` is tested first).
    pub fn new(kind: CompressionType, threshold: f32) -> Self {
        Codec { kind, threshold }
    }

    /// The 2-bit codec with `threshold`.
    pub fn two_bit(threshold: f32) -> Self {
        Codec::new(CompressionType::TwoBit, threshold)
    }

    /// The 1-bit codec with `threshold`.
    pub fn one_bit(threshold: f32) -> Self {
        Codec::new(CompressionType::OneBit, threshold)
    }

    /// 2-bit or 1-bit.
    pub fn kind(&self) -> CompressionType {
        self.kind
    }

    /// The threshold.
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Elements per 32-bit word of the packed form: 16 (2-bit) or 32 (1-bit), MXNet's
    /// `GetCompressionFactor()`.
    pub fn factor(&self) -> usize {
        self.kind.factor()
    }

    /// Bytes of the packed form of `n` elements: `4 * ceil(n / 16)` (2-bit) or
    /// `4 * ceil(n / 32)` (1-bit), i.e. 4 × MXNet's `GetCompressedSize(n)`.
    pub fn compressed_len(&self, n: usize) -> usize {
        4 * n.div_ceil(self.factor())
    }

    /// Quantises `grad` with error feedback: adds `grad` into `residual`, writes the codes to
    /// `out` (every byte of it, padding codes zero) and takes the transmitted values out of
    /// `residual`, as described on [`Codec`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `residual` is not as long as `grad` or `out` is not
    /// [`compressed_len(grad.len())`](Codec::compressed_len) bytes; nothing is written then.
    pub fn quantize(&self, grad: &[f32], residual: &mut [f32], out: &mut [u8]) -> Result<()> {
        self.check_quantize(grad.len(), residual.len(), out.len())?;
        match self.kind {
            CompressionType::TwoBit => kernels::quantize_2bit(grad, residual, out, self.threshold),
            CompressionType::OneBit => kernels::quantize_1bit(grad, residual, out, self.threshold),
        }
        Ok(())
    }

    /// Writes the dequantised values of `packed` to `out` (`out.len()` elements).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `packed` is not
    /// [`compressed_len(out.len())`](Codec::compressed_len) bytes.
    pub fn dequantize(&self, packed: &[u8], out: &mut [f32]) -> Result<()> {
        self.check_dequantize(packed.len(), out.len())?;
        match self.kind {
            CompressionType::TwoBit => kernels::dequantize_2bit(packed, out, self.threshold),
            CompressionType::OneBit => kernels::dequantize_1bit(packed, out),
        }
        Ok(())
    }

    /// Adds the dequantised values of `packed` into `out`: `out[i] += value[i]`, one `f32`
    /// addition per element (a `00` code adds `+0.0`, as MXNet's `merged += decompressed`).
    /// This is what a server merging compressed pushes needs, without a temporary.
    ///
    /// # Errors
    /// As [`dequantize`](Codec::dequantize).
    pub fn dequantize_add(&self, packed: &[u8], out: &mut [f32]) -> Result<()> {
        self.check_dequantize(packed.len(), out.len())?;
        match self.kind {
            CompressionType::TwoBit => kernels::dequantize_add_2bit(packed, out, self.threshold),
            CompressionType::OneBit => kernels::dequantize_add_1bit(packed, out),
        }
        Ok(())
    }

    /// Takes back a [`quantize`](Codec::quantize) of `grad` whose `packed` codes were never
    /// delivered: `residual[i] += value[i] - grad[i]` (the dequantised code added back, the
    /// gradient taken out), so that the residual is what it was before, up to rounding (one
    /// unit in the last place of the larger of the gradient and the residual, per element).
    /// A sender whose push failed calls it before the push is retried, which then counts the
    /// gradient once. It needs nothing kept from the quantisation but its codes, and undoes it
    /// even after later quantisations of the same residual (every step is an addition).
    ///
    /// ```
    /// use kvstore_compression::Codec;
    ///
    /// let codec = Codec::two_bit(0.5);
    /// let grad = [0.75f32; 16];
    /// let mut residual = vec![0.25f32; 16];
    /// let mut codes = vec![0u8; codec.compressed_len(16)];
    /// codec.quantize(&grad, &mut residual, &mut codes)?; // 1.0 sent as 0.5, 0.5 left
    /// assert_eq!(residual, vec![0.5; 16]);
    /// codec.unquantize(&codes, &grad, &mut residual)?;
    /// assert_eq!(residual, vec![0.25; 16]);
    /// # Ok::<(), kvstore_base::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`quantize`](Codec::quantize); nothing is written then.
    pub fn unquantize(&self, packed: &[u8], grad: &[f32], residual: &mut [f32]) -> Result<()> {
        self.check_quantize(grad.len(), residual.len(), packed.len())?;
        self.dequantize_add(packed, residual)?;
        for (r, g) in residual.iter_mut().zip(grad) {
            *r -= g;
        }
        Ok(())
    }

    /// [`unquantize`](Codec::unquantize) for a `float16` gradient (as
    /// [`quantize_f16`](Codec::quantize_f16) quantised it, through `f32`).
    ///
    /// # Errors
    /// As [`unquantize`](Codec::unquantize).
    pub fn unquantize_f16(&self, packed: &[u8], grad: &[f16], residual: &mut [f32]) -> Result<()> {
        self.check_quantize(grad.len(), residual.len(), packed.len())?;
        self.dequantize_add(packed, residual)?;
        let mut scratch = [0.0f32; F16_CHUNK];
        for (g, r) in grad.chunks(F16_CHUNK).zip(residual.chunks_mut(F16_CHUNK)) {
            let s = &mut scratch[..g.len()];
            convert_to_f32(g, s);
            for (r, g) in r.iter_mut().zip(s.iter()) {
                *r -= g;
            }
        }
        Ok(())
    }

    /// [`quantize`](Codec::quantize) for a `float16` gradient. MXNet compresses `float32`
    /// only (a `float16` push fails inside its kernel); here the gradient is converted to
    /// `f32` a chunk at a time through a scratch buffer on the stack (no allocation), and the
    /// residual stays `f32`. The result is exactly [`quantize`](Codec::quantize) of the
    /// gradient converted to `f32`.
    ///
    /// # Errors
    /// As [`quantize`](Codec::quantize).
    pub fn quantize_f16(&self, grad: &[f16], residual: &mut [f32], out: &mut [u8]) -> Result<()> {
        self.check_quantize(grad.len(), residual.len(), out.len())?;
        let mut scratch = [0.0f32; F16_CHUNK];
        let bytes = self.compressed_len(F16_CHUNK);
        for ((g, r), o) in grad
            .chunks(F16_CHUNK)
            .zip(residual.chunks_mut(F16_CHUNK))
            .zip(out.chunks_mut(bytes))
        {
            let s = &mut scratch[..g.len()];
            convert_to_f32(g, s);
            self.quantize(s, r, o)?;
        }
        Ok(())
    }

    /// [`dequantize`](Codec::dequantize) into a `float16` output: each value (`±threshold`,
    /// `0`, `±1`) rounded to `f16`.
    ///
    /// # Errors
    /// As [`dequantize`](Codec::dequantize).
    pub fn dequantize_f16(&self, packed: &[u8], out: &mut [f16]) -> Result<()> {
        self.check_dequantize(packed.len(), out.len())?;
        let mut scratch = [0.0f32; F16_CHUNK];
        let bytes = self.compressed_len(F16_CHUNK);
        for (o, p) in out.chunks_mut(F16_CHUNK).zip(packed.chunks(bytes)) {
            let s = &mut scratch[..o.len()];
            self.dequantize(p, s)?;
            convert_from_f32(s, o);
        }
        Ok(())
    }

    /// [`dequantize_add`](Codec::dequantize_add) into a `float16` output: each element
    /// becomes `f16(f32(out) + value)`, one rounding per addition, as a `float16` sum.
    ///
    /// # Errors
    /// As [`dequantize`](Codec::dequantize).
    pub fn dequantize_add_f16(&self, packed: &[u8], out: &mut [f16]) -> Result<()> {
        self.check_dequantize(packed.len(), out.len())?;
        let mut scratch = [0.0f32; F16_CHUNK];
        let bytes = self.compressed_len(F16_CHUNK);
        for (o, p) in out.chunks_mut(F16_CHUNK).zip(packed.chunks(bytes)) {
            let s = &mut scratch[..o.len()];
            convert_to_f32(o, s);
            self.dequantize_add(p, s)?;
            convert_from_f32(s, o);
        }
        Ok(())
    }

    /// [`quantize`](Codec::quantize) (or [`quantize_f16`](Codec::quantize_f16)) of a dense
    /// `float32` (or `float16`) array, whatever its shape.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for another dtype, a row-sparse or non-contiguous array (MXNet
    /// compresses dense `float32` only), or lengths as in [`quantize`](Codec::quantize).
    pub fn quantize_array(
        &self,
        grad: &NDArray,
        residual: &mut [f32],
        out: &mut [u8],
    ) -> Result<()> {
        match grad.dtype() {
            DType::F32 => self.quantize(slice(grad)?, residual, out),
            DType::F16 => self.quantize_f16(slice(grad)?, residual, out),
            other => Err(unsupported_dtype(other)),
        }
    }

    /// [`dequantize`](Codec::dequantize) into a dense `float32` (or `float16`) array.
    ///
    /// # Errors
    /// As [`quantize_array`](Codec::quantize_array), for `out`.
    pub fn dequantize_array(&self, packed: &[u8], out: &mut NDArray) -> Result<()> {
        match out.dtype() {
            DType::F32 => self.dequantize(packed, slice_mut(out)?),
            DType::F16 => self.dequantize_f16(packed, slice_mut(out)?),
            other => Err(unsupported_dtype(other)),
        }
    }

    /// [`dequantize_add`](Codec::dequantize_add) into a dense `float32` (or `float16`) array.
    ///
    /// # Errors
    /// As [`quantize_array`](Codec::quantize_array), for `out`.
    pub fn dequantize_add_array(&self, packed: &[u8], out: &mut NDArray) -> Result<()> {
        match out.dtype() {
            DType::F32 => self.dequantize_add(packed, slice_mut(out)?),
            DType::F16 => self.dequantize_add_f16(packed, slice_mut(out)?),
            other => Err(unsupported_dtype(other)),
        }
    }

    fn check_quantize(&self, n: usize, residual: usize, out: usize) -> Result<()> {
        if residual != n {
            return Err(Error::InvalidArgument(format!(
                "{} compression: the residual has {residual} elements, the gradient {n}",
                self.kind
            )));
        }
        self.check_dequantize(out, n)
    }

    fn check_dequantize(&self, packed: usize, n: usize) -> Result<()> {
        let want = self.compressed_len(n);
        if packed != want {
            return Err(Error::InvalidArgument(format!(
                "{} compression of {n} elements takes {want} bytes, got a buffer of {packed}",
                self.kind
            )));
        }
        Ok(())
    }
}

/// The kernel version this CPU runs: `"avx512"`, `"avx2"` or `"baseline"` (portable code;
/// the only one off x86-64). `KVSTORE_COMPRESSION_SIMD=baseline|avx2` caps it. Every version
/// gives bit-identical results.
pub fn simd_level() -> &'static str {
    kernels::simd_level()
}

fn convert_to_f32(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

fn convert_from_f32(src: &[f32], dst: &mut [f16]) {
    use half::slice::HalfFloatSliceExt;
    dst.convert_from_f32_slice(src);
}

fn slice<T: kvstore_base::Element>(a: &NDArray) -> Result<&[T]> {
    a.as_slice::<T>().ok_or_else(not_dense)
}

fn slice_mut<T: kvstore_base::Element>(a: &mut NDArray) -> Result<&mut [T]> {
    a.as_slice_mut::<T>().ok_or_else(not_dense)
}

fn not_dense() -> Error {
    Error::InvalidArgument(
        "gradient compression needs a dense, contiguous array (row_sparse is not compressed)"
            .into(),
    )
}

fn unsupported_dtype(dtype: DType) -> Error {
    Error::InvalidArgument(format!(
        "gradient compression supports float32 (and float16 through float32) arrays, got {dtype}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_are_equal_when_they_quantise_alike() {
        let nan = Codec::new(CompressionType::OneBit, f32::NAN);
        assert_eq!(nan, nan);
        assert_eq!(
            Codec::new(CompressionType::TwoBit, 0.5),
            Codec::new(CompressionType::TwoBit, 0.5)
        );
        assert_ne!(
            Codec::new(CompressionType::TwoBit, 0.5),
            Codec::new(CompressionType::OneBit, 0.5)
        );
        assert_ne!(
            Codec::new(CompressionType::OneBit, 0.0),
            Codec::new(CompressionType::OneBit, -0.0)
        );
    }
}
