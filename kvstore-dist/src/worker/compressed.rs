//! Gradient compression on the worker: each part of a push quantised against the key's
//! residual, kept on this worker (see the [crate docs](crate#gradient-compression)); a push
//! that failed is taken back out of the residuals.

use std::sync::Arc;

use kvstore_base::{DType, Error, NDArray, Result, StorageType};
use kvstore_compression::Codec;

use super::keys::KeyMeta;
use super::{lock, DistStore, Payload};

impl DistStore {
    /// Quantises every part of every key against the key's residual (kept per key on this
    /// worker, zero at first).
    pub(super) fn quantize(
        &self,
        codec: Codec,
        metas: &[Arc<KeyMeta>],
        payloads: &[Payload<'_>],
    ) -> Vec<Vec<Vec<u8>>> {
        let mut residuals = lock(&self.residuals);
        metas
            .iter()
            .zip(payloads)
            .map(|(meta, payload)| {
                let residual = residuals
                    .entry(meta.wire)
                    .or_insert_with(|| vec![0.0; meta.shape.iter().product()]);
                let Payload::Dense(value) = payload else {
                    unreachable!("compression refuses row-sparse values, which alone push rows")
                };
                let value = value.array();
                meta.parts
                    .iter()
                    .map(|p| {
                        let mut out = vec![0u8; codec.compressed_len(p.end - p.start)];
                        let r = &mut residual[p.start..p.end];
                        let done = match value.dtype() {
                            DType::F16 => codec.quantize_f16(
                                &value.as_slice::<half::f16>().expect("contiguous")[p.start..p.end],
                                r,
                                &mut out,
                            ),
                            _ => codec.quantize(
                                &value.as_slice::<f32>().expect("checked: float32")[p.start..p.end],
                                r,
                                &mut out,
                            ),
                        };
                        done.expect("lengths computed from the same part");
                        out
                    })
                    .collect()
            })
            .collect()
    }

    /// Takes back the quantisation of a push that failed (`packed` as [`quantize`] made it):
    /// each key's residual becomes what it was before, to within rounding, so that the push
    /// retried counts its gradient once.
    ///
    /// [`quantize`]: DistStore::quantize
    pub(super) fn unquantize(
        &self,
        codec: Codec,
        metas: &[Arc<KeyMeta>],
        payloads: &[Payload<'_>],
        packed: &[Vec<Vec<u8>>],
    ) {
        let mut residuals = lock(&self.residuals);
        for ((meta, payload), parts) in metas.iter().zip(payloads).zip(packed) {
            let (Some(residual), Payload::Dense(value)) = (residuals.get_mut(&meta.wire), payload)
            else {
                continue;
            };
            let value = value.array();
            for (p, codes) in meta.parts.iter().zip(parts) {
                let r = &mut residual[p.start..p.end];
                let done = match value.dtype() {
                    DType::F16 => codec.unquantize_f16(
                        codes,
                        &value.as_slice::<half::f16>().expect("contiguous")[p.start..p.end],
                        r,
                    ),
                    _ => codec.unquantize(
                        codes,
                        &value.as_slice::<f32>().expect("checked: float32")[p.start..p.end],
                        r,
                    ),
                };
                done.expect("lengths computed from the same part");
            }
        }
    }
}

/// Checks that a key's pushed values can be compressed: dense float32 or float16 (MXNet:
/// float32 only, dense only).
pub(super) fn check_compressible<'a>(
    meta: &KeyMeta,
    values: impl Iterator<Item = &'a NDArray>,
) -> Result<()> {
    if !matches!(meta.dtype, DType::F32 | DType::F16) {
        return Err(Error::InvalidArgument(format!(
            "gradient compression supports float32 and float16 values, not {}",
            meta.dtype
        )));
    }
    for v in values {
        if v.storage_type() == StorageType::RowSparse {
            return Err(Error::InvalidArgument(
                "gradient compression for row_sparse storage type is not supported".into(),
            ));
        }
    }
    Ok(())
}
