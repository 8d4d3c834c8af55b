//! Horovod's and BytePS's `Compression.fp16`: floating-point gradients cross the network as
//! float16, and the result is cast back into each output's dtype.
//!
//! Horovod's `DistributedTrainer(compression=hvd.Compression.fp16)` (and BytePS's) casts every
//! gradient whose dtype is a floating-point type to float16 before the all-reduce and the
//! float16 result back to the gradient's dtype after it: half the bytes of float32 on the wire,
//! the sum computed in float16 (each addition rounded to float16). It has no residual and no
//! parameter. The stores without servers that sum (`horovod`) take it through
//! `set_gradient_compression({"type": "fp16"})`; `{"type": "none"}` turns it off.

use kvstore_base::{CompressionParams, DType, Error, NDArray, Result};

/// How a store's gradients cross the network: as they are, or floating-point ones as float16
/// (Horovod's and BytePS's `Compression.fp16`: half the bytes of float32, summed in float16,
/// cast back into each output's dtype; no residual, no parameter).
///
/// ```
/// use kvstore_base::{CompressionParams, DType, NDArray};
/// use kvstore_compression::WireCast;
///
/// let params = CompressionParams::from([("type".to_string(), "fp16".to_string())]);
/// let cast = WireCast::from_params("horovod", &params).unwrap();
/// let on_the_wire = cast.compress(NDArray::full(&[3], 1.0 / 3.0, DType::F32));
/// assert_eq!(on_the_wire.dtype(), DType::F16);
///
/// // The result is written into an output of the gradient's dtype, which casts it back.
/// let mut out = NDArray::zeros(&[3], DType::F32);
/// out.assign(&on_the_wire).unwrap();
/// assert_eq!(out.to_vec::<f32>().unwrap(), vec![0.333_251_95; 3]); // float16's 1/3
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireCast {
    /// Every gradient crosses in its own dtype.
    #[default]
    None,
    /// `float32`, `float64` and `bfloat16` gradients cross as `float16` (Horovod's and
    /// BytePS's `Compression.fp16`); other dtypes unchanged.
    Fp16,
}

impl WireCast {
    /// Parses `set_gradient_compression`'s parameters for `store`, a store that offers
    /// Horovod's compressors: `{"type": "fp16"}` or `{"type": "none"}`, nothing else.
    ///
    /// # Errors
    /// - [`Error::Unsupported`] for MXNet's `2bit` and `1bit`, which need a server that
    ///   dequantises each push before it sums (the message names `store`).
    /// - [`Error::InvalidArgument`] when `type` is missing or unknown, or another parameter is
    ///   given (fp16 takes none: `threshold` would be silently meaningless).
    pub fn from_params(store: &str, params: &CompressionParams) -> Result<Self> {
        let Some(kind) = params.get("type") else {
            return Err(Error::InvalidArgument(format!(
                "{store}: set_gradient_compression needs a type: \"fp16\" or \"none\""
            )));
        };
        let cast = match kind.as_str() {
            "fp16" => WireCast::Fp16,
            "none" => WireCast::None,
            "2bit" | "1bit" => {
                return Err(Error::Unsupported {
                    store: store.to_string(),
                    operation: "set_gradient_compression with MXNet's 2bit or 1bit (its \
                                codes are summed by a server that dequantises each push; this \
                                store compresses with \"fp16\" only)",
                })
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "{store}: unknown type for gradient compression '{other}' (this store takes \
                     \"fp16\" or \"none\")"
                )))
            }
        };
        if let Some(extra) = params.keys().find(|k| k.as_str() != "type") {
            return Err(Error::InvalidArgument(format!(
                "{store}: gradient compression \"{kind}\" takes no parameter '{extra}'"
            )));
        }
        Ok(cast)
    }

    /// The dtype a gradient of `dtype` crosses the network in.
    pub fn wire_dtype(self, dtype: DType) -> DType {
        match (self, dtype) {
            (WireCast::Fp16, DType::F32 | DType::F64 | DType::BF16) => DType::F16,
            _ => dtype,
        }
    }

    /// `array` as it crosses the network: cast to [`wire_dtype`](Self::wire_dtype) when that
    /// differs (rounded to nearest, ties to even, as a float16 conversion rounds), else
    /// returned as it is.
    pub fn compress(self, array: NDArray) -> NDArray {
        let wire = self.wire_dtype(array.dtype());
        if wire == array.dtype() {
            array
        } else {
            array.astype(wire)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> CompressionParams {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fp16_and_none_are_parsed() {
        let fp16 = WireCast::from_params("horovod", &params(&[("type", "fp16")])).unwrap();
        assert_eq!(fp16, WireCast::Fp16);
        let none = WireCast::from_params("horovod", &params(&[("type", "none")])).unwrap();
        assert_eq!(none, WireCast::None);
    }

    #[test]
    fn mxnets_codecs_are_unsupported_naming_the_store() {
        for kind in ["2bit", "1bit"] {
            let e = WireCast::from_params("horovod", &params(&[("type", kind)])).unwrap_err();
            assert!(matches!(e, Error::Unsupported { .. }), "{e}");
            assert!(e.to_string().contains("horovod"), "{e}");
            assert!(e.to_string().contains("fp16"), "{e}");
        }
    }

    #[test]
    fn a_missing_or_unknown_type_or_a_parameter_is_refused() {
        let e = WireCast::from_params("horovod", &params(&[])).unwrap_err();
        assert!(e.to_string().contains("needs a type"), "{e}");
        let e = WireCast::from_params("horovod", &params(&[("type", "FP16")])).unwrap_err();
        assert!(e.to_string().contains("'FP16'"), "{e}");
        let e = WireCast::from_params("horovod", &params(&[("type", "fp16"), ("threshold", "1")]))
            .unwrap_err();
        assert!(e.to_string().contains("'threshold'"), "{e}");
    }

    #[test]
    fn floating_point_gradients_cross_as_float16_and_others_unchanged() {
        let cast = WireCast::Fp16;
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            assert_eq!(cast.wire_dtype(dtype), DType::F16, "{dtype:?}");
        }
        for dtype in [DType::I32, DType::I64, DType::U8] {
            assert_eq!(cast.wire_dtype(dtype), dtype);
            assert_eq!(WireCast::None.wire_dtype(dtype), dtype);
        }
        assert_eq!(WireCast::None.wire_dtype(DType::F32), DType::F32);

        // Rounded to nearest: 2049 lies between float16's 2048 and 2050 (ties to even).
        let wire = cast.compress(NDArray::from_vec(&[3], vec![2049.0f64, 0.1, 65520.0]).unwrap());
        assert_eq!(wire.dtype(), DType::F16);
        let back = wire.astype(DType::F64).to_vec::<f64>().unwrap();
        assert_eq!(back[0], 2048.0);
        assert_eq!(back[1], f64::from(half::f16::from_f64(0.1)));
        assert!(back[2].is_infinite(), "{back:?}"); // beyond float16's range, as in Horovod
        let ints = NDArray::from_vec(&[2], vec![7i32, 9]).unwrap();
        assert_eq!(
            cast.compress(ints.clone()).to_vec::<i32>().unwrap(),
            vec![7, 9]
        );
    }
}
