//! Gradient compression of CPU values: MXNet's `CommDevice::ReduceCompressed` on the host.
//!
//! Every value pushed for a key is quantised against the residual of its position in the
//! key's values (MXNet: of its source device), zero at first; the codes are dequantised and
//! the dequantised values summed in MXNet's order (`ElementwiseSum`: `((d0 + d1) + d2) + ...`),
//! which is the one value per key that the embedded `local` store then receives.

use std::borrow::Cow;

use kvstore_base::{DType, Error, Key, KeyGroup, KeyedValues, NDArray, Result, StorageType};
use kvstore_compression::{Codec, Residuals};

/// The compression state of a store's CPU values.
#[derive(Debug, Default)]
pub(crate) struct Compression {
    /// The codec, once `set_gradient_compression` succeeded.
    pub(crate) codec: Option<Codec>,
    /// Per (key, position of the value in the key's values).
    pub(crate) residuals: Residuals,
}

impl Compression {
    /// [`merge`] with the codec and residuals in effect.
    ///
    /// # Errors
    /// As [`merge`]; `InvalidArgument` when no compression is set.
    pub(crate) fn merge(
        &self,
        values: &KeyedValues<'_>,
        store: &str,
        operation: &'static str,
    ) -> Result<Merged> {
        let codec = self
            .codec
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("gradient compression is not set".into()))?;
        merge(codec, &self.residuals, values, store, operation)
    }
}

/// The result of compressing one call's values, not yet committed.
#[derive(Debug)]
pub(crate) struct Merged {
    /// One key per group, ascending.
    pub(crate) keys: Vec<Key>,
    /// The sum of the dequantised values of each key.
    pub(crate) values: Vec<NDArray>,
    /// The residuals after this call, by (key, position).
    residuals: Vec<(Key, usize, Vec<f32>)>,
}

impl Merged {
    /// The merged values as a batch.
    pub(crate) fn batch(&self, operation: &'static str) -> Result<KeyedValues<'_>> {
        KeyedValues::new(operation, self.keys.clone(), self.values.iter().collect())
    }

    /// Makes this call's residuals the current ones.
    pub(crate) fn commit(self, residuals: &mut Residuals) {
        for (key, position, r) in self.residuals {
            residuals
                .get_or_zeroed(&key, position, r.len())
                .copy_from_slice(&r);
        }
    }
}

/// Checks that a value can be compressed: dense float32 (MXNet compresses nothing else).
pub(crate) fn check_compressible(value: &NDArray) -> Result<()> {
    if value.storage_type() == StorageType::RowSparse {
        return Err(Error::InvalidArgument(
            "gradient compression for row_sparse storage type is not supported".into(),
        ));
    }
    if value.dtype() != DType::F32 {
        return Err(Error::InvalidArgument(format!(
            "gradient compression supports float32 values, not {}",
            value.dtype()
        )));
    }
    Ok(())
}

/// Quantises every value of `values` against a copy of its residual and sums the dequantised
/// values per key. Nothing is changed: the new residuals are returned, to be committed once
/// the store accepted the sums. Errors about a key name `store`, `operation` and the key.
pub(crate) fn merge(
    codec: &Codec,
    residuals: &Residuals,
    values: &KeyedValues<'_>,
    store: &str,
    operation: &'static str,
) -> Result<Merged> {
    let at = |key: &Key| {
        let key = key.clone();
        move |e: Error| e.at_key(store, operation, key)
    };
    let mut groups = values.groups();
    // MXNet processes the keys of a call in ascending order.
    groups.sort_by(|a, b| a.key.cmp(&b.key));
    for KeyGroup { key, positions } in &groups {
        let first = values.values()[positions[0]];
        for (i, &p) in positions.iter().enumerate() {
            let v = values.values()[p];
            check_compressible(v).map_err(at(key))?;
            if v.shape() != first.shape() {
                return Err(at(key)(Error::ShapeMismatch {
                    what: format!("pushed value {i}"),
                    expected: first.shape().to_vec(),
                    found: v.shape().to_vec(),
                }));
            }
        }
    }
    let mut merged = Merged {
        keys: Vec::with_capacity(groups.len()),
        values: Vec::with_capacity(groups.len()),
        residuals: Vec::new(),
    };
    for KeyGroup { key, positions } in groups {
        let shape = values.values()[positions[0]].shape().to_vec();
        let n: usize = shape.iter().product();
        let mut sum = NDArray::zeros(&shape, DType::F32);
        let mut packed = vec![0u8; codec.compressed_len(n)];
        for (i, &p) in positions.iter().enumerate() {
            let grad: Cow<'_, [f32]> = match values.values()[p].as_slice::<f32>() {
                Some(s) => Cow::Borrowed(s),
                None => Cow::Owned(values.values()[p].to_vec::<f32>()?),
            };
            let mut residual = match residuals.get(&key, i) {
                Some(r) if r.len() == n => r.to_vec(),
                _ => vec![0.0; n],
            };
            let out = sum
                .as_slice_mut::<f32>()
                .expect("a fresh dense float32 array");
            codec
                .quantize(&grad, &mut residual, &mut packed)
                .map_err(at(&key))?;
            if i == 0 {
                codec.dequantize(&packed, out).map_err(at(&key))?;
            } else {
                codec.dequantize_add(&packed, out).map_err(at(&key))?;
            }
            merged.residuals.push((key.clone(), i, residual));
        }
        merged.keys.push(key);
        merged.values.push(sum);
    }
    Ok(merged)
}
