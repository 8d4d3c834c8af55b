//! Element-wise work on received payloads: copy into and add into a typed array.

use kvstore_base::{DType, Element, NDArray};
use kvstore_compression::Codec;

/// Runs `$body` with `$T` bound to the element type of `$dtype`.
macro_rules! with_element {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            other => return Err(format!("dtype {other} is not supported by the servers")),
        }
    };
}

/// Checks that `bytes` holds exactly the elements of `dst`.
fn check_len(dst: &NDArray, bytes: &[u8]) -> Result<(), String> {
    let want = dst.size() * dst.dtype().size_of();
    if bytes.len() != want {
        return Err(format!(
            "received {} bytes but the stored part has {} elements of {} ({want} bytes)",
            bytes.len(),
            dst.size(),
            dst.dtype()
        ));
    }
    Ok(())
}

/// `dst[:] = bytes` (same dtype, native byte order).
pub(crate) fn copy_from_bytes(dst: &mut NDArray, bytes: &[u8]) -> Result<(), String> {
    check_len(dst, bytes)?;
    dst.as_bytes_mut()
        .ok_or("the stored part is not contiguous")?
        .copy_from_slice(bytes);
    Ok(())
}

/// `dst += bytes` element-wise in `dst`'s dtype, MXNet's addition for that type.
pub(crate) fn add_from_bytes(dst: &mut NDArray, bytes: &[u8]) -> Result<(), String> {
    check_len(dst, bytes)?;
    let dtype = dst.dtype();
    let contiguous = "the stored part is not contiguous";
    with_element!(dtype, T => add_typed::<T>(dst.as_slice_mut::<T>().ok_or(contiguous)?, bytes));
    Ok(())
}

fn add_typed<T: Element>(dst: &mut [T], bytes: &[u8]) {
    // SAFETY: `T` is a plain number type (f32, f64, f16, bf16, i32, i64, u8) for which every
    // bit pattern is a valid value; `align_to` only returns a middle slice of correctly
    // aligned, whole elements inside `bytes`.
    let (head, mid, _) = unsafe { bytes.align_to::<T>() };
    if head.is_empty() && mid.len() == dst.len() {
        for (d, s) in dst.iter_mut().zip(mid) {
            *d = d.add(*s);
        }
        return;
    }
    // A misaligned buffer: read each element through a copy.
    let size = std::mem::size_of::<T>();
    for (d, chunk) in dst.iter_mut().zip(bytes.chunks_exact(size)) {
        let mut s = T::ZERO;
        // SAFETY: `s` is a valid `T` of `size` bytes; any bytes form a valid `T` (see above).
        unsafe {
            std::ptr::copy_nonoverlapping(chunk.as_ptr(), (&mut s as *mut T).cast::<u8>(), size)
        };
        *d = d.add(s);
    }
}

/// A pushed part as it arrived: raw elements, or packed by a gradient-compression codec.
#[derive(Clone, Copy)]
pub(crate) enum Pushed<'a> {
    /// The elements, in the part's dtype.
    Raw(&'a [u8]),
    /// Quantised by the workers' codec; dequantised here.
    Packed(&'a [u8], Codec),
}

impl Pushed<'_> {
    /// `dst[:] = pushed`.
    pub(crate) fn assign_to(self, dst: &mut NDArray) -> Result<(), String> {
        match self {
            Pushed::Raw(bytes) => copy_from_bytes(dst, bytes),
            Pushed::Packed(bytes, codec) => codec
                .dequantize_array(bytes, dst)
                .map_err(|e| e.to_string()),
        }
    }

    /// `dst += pushed`.
    pub(crate) fn add_to(self, dst: &mut NDArray) -> Result<(), String> {
        match self {
            Pushed::Raw(bytes) => add_from_bytes(dst, bytes),
            Pushed::Packed(bytes, codec) => codec
                .dequantize_add_array(bytes, dst)
                .map_err(|e| e.to_string()),
        }
    }

    /// A 1-D array of `elements` of `dtype` holding the pushed values.
    pub(crate) fn to_array(self, dtype: DType, elements: usize) -> Result<NDArray, String> {
        match self {
            Pushed::Raw(bytes) => array_from_bytes(dtype, bytes),
            Pushed::Packed(..) => {
                let mut a = NDArray::zeros(&[elements], dtype);
                self.assign_to(&mut a)?;
                Ok(a)
            }
        }
    }

    /// An owned copy, for a push that waits for the next round.
    pub(crate) fn to_owned(self) -> OwnedPush {
        match self {
            Pushed::Raw(b) => OwnedPush(b.to_vec(), None),
            Pushed::Packed(b, codec) => OwnedPush(b.to_vec(), Some(codec)),
        }
    }
}

/// An owned [`Pushed`].
pub(crate) struct OwnedPush(Vec<u8>, Option<Codec>);

impl OwnedPush {
    /// The borrowed form.
    pub(crate) fn as_pushed(&self) -> Pushed<'_> {
        match self.1 {
            None => Pushed::Raw(&self.0),
            Some(codec) => Pushed::Packed(&self.0, codec),
        }
    }
}

/// A 1-D array of `dtype` holding `bytes`.
pub(crate) fn array_from_bytes(dtype: DType, bytes: &[u8]) -> Result<NDArray, String> {
    let size = dtype.size_of();
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "received {} bytes, not a whole number of {dtype} elements",
            bytes.len()
        ));
    }
    NDArray::from_bytes(&[bytes.len() / size], dtype, bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_aligned_and_misaligned_payloads() {
        let mut dst = NDArray::from_vec(&[3], vec![1.0f32, 2.0, 3.0]).unwrap();
        let src: Vec<u8> = [0.5f32, 0.25, -3.0]
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect();
        add_from_bytes(&mut dst, &src).unwrap();
        assert_eq!(dst.to_vec::<f32>().unwrap(), vec![1.5, 2.25, 0.0]);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&src);
        add_from_bytes(&mut dst, &shifted[1..]).unwrap();
        assert_eq!(dst.to_vec::<f32>().unwrap(), vec![2.0, 2.5, -3.0]);
        assert!(add_from_bytes(&mut dst, &src[..8]).is_err());
    }

    #[test]
    fn u8_wraps_like_mxnet() {
        let mut dst = NDArray::from_vec(&[1], vec![250u8]).unwrap();
        add_from_bytes(&mut dst, &[10]).unwrap();
        assert_eq!(dst.to_vec::<u8>().unwrap(), vec![4]);
    }
}
