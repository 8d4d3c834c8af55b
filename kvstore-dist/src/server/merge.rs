//! Element-wise work on received payloads: copy into and add into a typed array.

use kvstore_base::{DType, NDArray, StorageType};
use kvstore_compression::Codec;

use crate::protocol::RowsPush;

type Reply = Result<(), String>;

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

/// A pushed part as it arrived: raw elements, packed by a gradient-compression codec, or some
/// rows of a part kept by rows.
#[derive(Clone, Copy)]
pub(crate) enum Pushed<'a> {
    /// The elements, in the part's dtype.
    Raw(&'a [u8]),
    /// Quantised by the workers' codec; dequantised here.
    Packed(&'a [u8], Codec),
    /// Rows of the part (checked against it when received).
    Rows(RowsPush<'a>),
}

impl Pushed<'_> {
    /// Starts a sync round's sum in `merge` (the buffer kept from round to round, `like` the
    /// stored part), in `dtype`: the part's, or float32 when the optimizer keeps a float32
    /// master copy of a half-precision part (MXNet's servers then sum in float32). A
    /// row-sparse push becomes a row-sparse sum, so that the optimizer sees the round's rows
    /// only; any other is copied into a dense buffer.
    pub(crate) fn start_sum(
        self,
        merge: &mut Option<NDArray>,
        like: &NDArray,
        dtype: DType,
    ) -> Reply {
        if let Pushed::Rows(_) = self {
            *merge = Some(cast(self.to_array(like)?, dtype)?);
            return Ok(());
        }
        let buffer = match merge {
            Some(m) if m.storage_type() == StorageType::Dense && m.dtype() == dtype => m,
            slot => slot.insert(NDArray::zeros(like.shape(), dtype)),
        };
        if dtype == like.dtype() {
            return self.assign_to(buffer);
        }
        let pushed = self.to_array(like)?;
        buffer.assign(&pushed).map_err(|e| e.to_string())
    }

    /// `dst[:] = pushed`, `dst` dense (rows a push does not hold become zeros).
    pub(crate) fn assign_to(self, dst: &mut NDArray) -> Reply {
        match self {
            Pushed::Raw(bytes) => copy_from_bytes(dst, bytes),
            Pushed::Packed(bytes, codec) => codec
                .dequantize_array(bytes, dst)
                .map_err(|e| e.to_string()),
            Pushed::Rows(_) => {
                let rows = self.to_array(dst)?;
                dst.assign(&rows).map_err(|e| e.to_string())
            }
        }
    }

    /// `dst += pushed`, the push being in the dtype of `like` (the stored part) and cast to
    /// `dst`'s when the sum is kept in float32; a row-sparse `dst` plus rows keeps the union of
    /// the rows, plus anything else becomes dense.
    pub(crate) fn add_to(self, dst: &mut NDArray, like: &NDArray) -> Reply {
        // Rows (a row-sparse sum stays one), or a push to cast: added as an array.
        if matches!(self, Pushed::Rows(_)) || dst.dtype() != like.dtype() {
            let pushed = cast(self.to_array(like)?, dst.dtype())?;
            return dst.add_assign(&pushed).map_err(|e| e.to_string());
        }
        if dst.storage_type() == StorageType::RowSparse {
            // Checked (made an array) before the round's rows become dense: a push that fails
            // leaves the sum as it was.
            let pushed = self.to_array(like)?;
            *dst = dst.to_dense();
            return dst.add_assign(&pushed).map_err(|e| e.to_string());
        }
        match self {
            Pushed::Raw(bytes) => add_from_bytes(dst, bytes),
            Pushed::Packed(bytes, codec) => codec
                .dequantize_add_array(bytes, dst)
                .map_err(|e| e.to_string()),
            Pushed::Rows(_) => unreachable!("added above"),
        }
    }

    /// An array of `like`'s shape and dtype holding the pushed values (row-sparse for rows).
    pub(crate) fn to_array(self, like: &NDArray) -> Result<NDArray, String> {
        match self {
            Pushed::Raw(bytes) => {
                check_len(like, bytes)?;
                NDArray::from_bytes(like.shape(), like.dtype(), bytes).map_err(|e| e.to_string())
            }
            Pushed::Packed(..) => {
                let mut a = NDArray::zeros(like.shape(), like.dtype());
                self.assign_to(&mut a)?;
                Ok(a)
            }
            Pushed::Rows(rows) => {
                let mut shape = like.shape().to_vec();
                shape[0] = rows.count();
                let data = NDArray::from_bytes(&shape, like.dtype(), rows.data)
                    .map_err(|e| e.to_string())?;
                let ids = rows.ids().map(|id| id as i64).collect();
                NDArray::row_sparse_from(like.shape(), ids, data).map_err(|e| e.to_string())
            }
        }
    }

    /// An owned copy, for a push that waits for the next round.
    pub(crate) fn to_owned(self) -> OwnedPush {
        match self {
            Pushed::Raw(b) => OwnedPush::Raw(b.to_vec()),
            Pushed::Packed(b, codec) => OwnedPush::Packed(b.to_vec(), codec),
            Pushed::Rows(rows) => {
                let (ids, data) = rows.checked_parts();
                OwnedPush::Rows(ids.to_vec(), data.to_vec())
            }
        }
    }
}

/// `array` in `dtype` (itself when it already is).
fn cast(array: NDArray, dtype: DType) -> Result<NDArray, String> {
    if array.dtype() == dtype {
        return Ok(array);
    }
    array.try_astype(dtype).map_err(|e| e.to_string())
}

/// An owned [`Pushed`].
pub(crate) enum OwnedPush {
    Raw(Vec<u8>),
    Packed(Vec<u8>, Codec),
    /// A row-sparse push's id bytes and elements, checked when received.
    Rows(Vec<u8>, Vec<u8>),
}

impl OwnedPush {
    /// The borrowed form.
    pub(crate) fn as_pushed(&self) -> Pushed<'_> {
        match self {
            OwnedPush::Raw(b) => Pushed::Raw(b),
            OwnedPush::Packed(b, codec) => Pushed::Packed(b, *codec),
            OwnedPush::Rows(ids, data) => Pushed::Rows(RowsPush::from_checked(ids, data)),
        }
    }
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
