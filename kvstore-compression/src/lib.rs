//! MXNet's gradient compression for kvstore stores: the 2-bit and 1-bit codecs with error
//! feedback, the parsing of `set_gradient_compression` parameters, and the text a worker sends
//! its servers.
//!
//! - [`CompressionSpec`]: the setting, parsed from the parameter map exactly as MXNet does
//!   ([`CompressionSpec::from_params`]: `type` required, `threshold` default 0.5, MXNet's
//!   messages), and MXNet's wire text (`"1,0.500000"`, [`CompressionSpec::encode_params`],
//!   [`CompressionSpec::decode_params`], with the 1.x/2.x numbering in [`TypeCodes`]).
//! - [`Codec`]: [`quantize`](Codec::quantize) a gradient against its residual into packed
//!   codes, [`dequantize`](Codec::dequantize) them, or [`dequantize_add`](Codec::dequantize_add)
//!   them into a merge buffer; `float16` through `float32` ([`Codec::quantize_f16`], ...) and
//!   [`NDArray`](kvstore_base::NDArray) forms ([`Codec::quantize_array`], ...).
//! - [`Residuals`]: per-(key, device) residual vectors for the stores that want them.
//! - [`WireCast`]: Horovod's (and BytePS's) `Compression.fp16`, for the stores without
//!   servers that dequantise: floating-point gradients cross the network as float16.
//!
//! ```
//! use kvstore_base::CompressionParams;
//! use kvstore_compression::CompressionSpec;
//!
//! let params = CompressionParams::from([
//!     ("type".to_string(), "2bit".to_string()),
//!     ("threshold".to_string(), "0.5".to_string()),
//! ]);
//! let codec = CompressionSpec::from_params(&params).unwrap().codec();
//!
//! // The worker: quantise the pushed gradient against the key's residual.
//! let grad: Vec<f32> = [0.6, -0.6, 0.1].iter().cycle().take(20).copied().collect();
//! let mut residual = vec![0.0f32; grad.len()];
//! let mut packed = vec![0u8; codec.compressed_len(grad.len())];
//! codec.quantize(&grad, &mut residual, &mut packed).unwrap();
//! assert_eq!(packed, [0xE3, 0x8E, 0x38, 0xE3, 0x8E, 0x00, 0x00, 0x00]);
//!
//! // The server: dequantise into the merge buffer.
//! let mut merged = vec![0.0f32; grad.len()];
//! codec.dequantize_add(&packed, &mut merged).unwrap();
//! assert_eq!(&merged[..4], &[0.5, -0.5, 0.0, 0.5]);
//! ```
//!
//! # Compatibility with MXNet
//!
//! The 2-bit codec is checked bit for bit (packed bytes and dequantised `f32` values over
//! several rounds, so residuals included) against MXNet 1.9.1 itself:
//! `tests/golden/generate.py` drives a `device` kvstore and a `dist_sync` job with
//! compression, and reads the packed bytes off the worker's messages to its server. The same
//! file records what MXNet 1.9.1's `set_gradient_compression` accepts and answers for 62
//! parameter maps, which [`CompressionSpec::from_params`] reproduces (up to the MXNet 2.x
//! rules it follows for `1bit`).
//!
//! 1-bit compression exists in MXNet 2.x only (1.9.1 rejects `{"type": "1bit"}`). It follows
//! the 2.x kernel as the reference describes it, and its test vectors are **not** produced by
//! MXNet: they come from a Python re-implementation, in `float32`, of the simulator of MXNet
//! 2.x's nightly kvstore test (`compute_1bit`).
//!
//! Where a store applies compression is the store's business (MXNet: local stores compress
//! every device's push with that device's residual and dequantise before summing; dist
//! workers reduce their devices first, then compress once per key; servers dequantise every
//! push and sum; init and pull are never compressed; row-sparse and non-`float32` data are not
//! compressed).
//!
//! # Speed
//!
//! A word of output per 16 (2-bit) or 32 (1-bit) elements, computed with branch-free code
//! that the compiler vectorises; AVX-512 and AVX2 versions are picked at run time on x86-64
//! ([`simd_level`]). `cargo run --release -p kvstore-compression --example codec_speed`
//! prints the throughput; `cargo bench -p kvstore-compression` runs the divan benchmarks.

#![deny(missing_docs)]

mod codec;
mod fp16;
mod kernels;
mod residuals;
mod spec;

pub use codec::{simd_level, Codec};
pub use fp16::WireCast;
pub use residuals::Residuals;
pub use spec::{CompressionSpec, CompressionType, TypeCodes, DEFAULT_THRESHOLD};
