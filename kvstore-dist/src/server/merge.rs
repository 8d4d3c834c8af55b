//! Element-wise work on received payloads: copy into and add into a typed array.

use kvstore_base::{DType, NDArray};
use kvstore_compression::Codec;

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
    dst.add_bytes(bytes).map_err(|e| e.to_string())
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
