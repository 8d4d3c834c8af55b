//! Gradient compression on the worker: each part of a push quantised against the key's
//! residual, kept on this worker (see the [crate docs](crate#gradient-compression)); a push
//! that failed is taken back out of the residuals.

use std::sync::Arc;

use kvstore_base::{DType, Error, NDArray, Result, StorageType};
use kvstore_compression::Codec;

use super::keys::KeyMeta;
use super::{lock, DistStore, Payload};

/// The part `range` of a key's pushed (dense, float32 or float16) value, as the codec takes it.
enum PartGrad<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl<'a> PartGrad<'a> {
    fn of(payload: &'a Payload<'_>, range: std::ops::Range<usize>) -> PartGrad<'a> {
        let Payload::Dense(value) = payload else {
            unreachable!("compression refuses row-sparse values, which alone push rows")
        };
        let value = value.array();
        match value.dtype() {
            DType::F16 => PartGrad::F16(&value.as_slice().expect("contiguous")[range]),
            _ => PartGrad::F32(&value.as_slice().expect("checked: float32")[range]),
        }
    }
}

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
                meta.parts
                    .iter()
                    .map(|p| {
                        let mut out = vec![0u8; codec.compressed_len(p.end - p.start)];
                        let r = &mut residual[p.start..p.end];
                        let done = match PartGrad::of(payload, p.start..p.end) {
                            PartGrad::F16(g) => codec.quantize_f16(g, r, &mut out),
                            PartGrad::F32(g) => codec.quantize(g, r, &mut out),
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
            let Some(residual) = residuals.get_mut(&meta.wire) else {
                continue;
            };
            for (p, codes) in meta.parts.iter().zip(parts) {
                let r = &mut residual[p.start..p.end];
                let done = match PartGrad::of(payload, p.start..p.end) {
                    PartGrad::F16(g) => codec.unquantize_f16(codes, g, r),
                    PartGrad::F32(g) => codec.unquantize(codes, g, r),
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
