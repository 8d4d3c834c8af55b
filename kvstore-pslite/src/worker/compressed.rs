//! Gradient compression on the worker, as MXNet 1.9.1's `KVStoreDist` does it: a push is
//! quantised to 2-bit codes against the key's residual (kept on this worker, error feedback)
//! and sent as a compressed request in `EncodeCompressedKey`'s layout; the servers dequantise
//! and sum. `init` and pulls stay uncompressed, in the same layout.

use kvstore_base::{CompressionParams, DType, Error, NDArray, Result};
use kvstore_compression::{Codec, CompressionSpec, CompressionType};
use kvstore_local::reduce;

use super::{lock, Entry, PsLiteStore};
use crate::encoding::{self, PackedSlice, Slice};
use crate::server::CMD_SET_GRADIENT_COMPRESSION;

/// A key's compressed-push layout, and the codec its pushes are packed with.
#[derive(Debug, Clone)]
pub(super) struct Packed {
    pub(super) codec: Codec,
    pub(super) slices: Vec<PackedSlice>,
}

impl Packed {
    /// The slices of the value (those of `init` and of a pull).
    pub(super) fn slices(&self) -> Vec<Slice> {
        self.slices.iter().map(|p| p.slice.clone()).collect()
    }
}

impl PsLiteStore {
    /// The layout of a key of `elements` elements of `dtype` with compression `codec`.
    pub(super) fn packed_layout(
        &self,
        id: i32,
        elements: usize,
        dtype: DType,
        codec: Codec,
    ) -> Result<Packed> {
        if dtype != DType::F32 {
            return Err(Error::InvalidArgument(format!(
                "a {dtype} key with gradient compression: MXNet 1.9.1 compresses float32 keys \
                 only (its worker aborts on any other)"
            )));
        }
        let slices = encoding::place_compressed(
            id,
            elements,
            self.num_servers,
            self.bigarray_bound,
            codec.factor(),
        )
        .map_err(Error::InvalidArgument)?;
        Ok(Packed { codec, slices })
    }

    /// `set_gradient_compression`: checks the parameters as MXNet does and, on rank 0, sends
    /// the servers `kSetGradientCompression` (MXNet's text, `"1,<threshold>"`). As in MXNet,
    /// the other workers do not wait for it, so it must come before the first `init` (as
    /// Gluon's `Trainer` sets it), whose barrier orders rank 0's command before any push: once
    /// a key is initialised it is refused, naming the key (a worker could otherwise push
    /// compressed before the servers have the codec, and a big key would lie on them as an
    /// uncompressed key is cut).
    pub(super) fn set_compression(&self, params: &CompressionParams) -> Result<()> {
        let spec = CompressionSpec::from_params(params)?;
        if spec.kind != CompressionType::TwoBit {
            return Err(Error::Unsupported {
                store: self.name.clone(),
                operation: "1-bit gradient compression (MXNet 1.9.1 has 2-bit compression \
                            only; its servers abort on a 1-bit push)",
            });
        }
        let _no_init_meanwhile = lock(&self.init);
        let first = {
            let table = lock(&self.table);
            let failed = table.failed_inits.keys();
            table.entries.keys().chain(failed).next().cloned()
        };
        if let Some(key) = first {
            return Err(Error::InvalidArgument(format!(
                "set_gradient_compression after key {key} was initialised: set it on every \
                 worker before the first init, as Gluon's Trainer does (only rank 0 tells the \
                 servers, and init's barrier makes every worker wait for it)"
            )));
        }
        if self.van.rank() == 0 {
            self.command_all(CMD_SET_GRADIENT_COMPRESSION, &spec.encode_params())?;
        }
        lock(&self.table).codec = Some(spec.codec());
        Ok(())
    }

    /// The packed bytes of a push of `arrays` (a worker's values of one key, summed first) to
    /// `entry`: quantised against the key's residual, which keeps what was not sent. As in
    /// MXNet, the residual gives up what is sent before the push goes out: a push that then
    /// fails has lost it (the job has lost a server or timed out by then).
    pub(super) fn quantize(
        &self,
        entry: &Entry,
        packed: &Packed,
        arrays: &[&NDArray],
    ) -> Result<Vec<u8>> {
        let summed: NDArray;
        let grad: &[f32] = match arrays {
            [one] if one.as_slice::<f32>().is_some() => one.as_slice().expect("just checked"),
            _ => {
                summed = reduce::sum_values(arrays, &self.reduce, true);
                summed.as_slice().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "a {} value: compression packs float32 values",
                        summed.dtype()
                    ))
                })?
            }
        };
        let mut out = vec![0u8; packed.codec.compressed_len(grad.len())];
        let mut residuals = lock(&self.residuals);
        let residual = residuals
            .entry(entry.id)
            .or_insert_with(|| vec![0.0; grad.len()]);
        packed.codec.quantize(grad, residual, &mut out)?;
        Ok(out)
    }
}
