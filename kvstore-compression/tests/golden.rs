//! Golden vectors: the 2-bit codec and the parameter parsing against MXNet 1.9.1 itself, the
//! 1-bit codec against a re-implementation of MXNet 2.x's test simulator (see
//! `tests/golden/generate.py`, which wrote `tests/golden/compression.json`).
//!
//! Every comparison is bit for bit: packed bytes, and `f32` bit patterns of dequantised values
//! (so `+0.0` vs `-0.0` and NaN payloads count).

use std::collections::BTreeMap;

use kvstore_base::{CompressionParams, Error};
use kvstore_compression::{Codec, CompressionSpec, CompressionType};
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    mxnet_version: String,
    two_bit: Vec<Case>,
    two_bit_devices: Vec<DeviceCase>,
    wire: Vec<Wire>,
    params: Vec<ParamCase>,
    one_bit: OneBit,
}

#[derive(Deserialize)]
struct Case {
    threshold_f32: String,
    kind: String,
    n: usize,
    rounds: Vec<Round>,
}

#[derive(Deserialize)]
struct Round {
    grad: String,
    packed: String,
    dequantized: String,
    dist_pulled: Option<String>,
}

#[derive(Deserialize)]
struct DeviceCase {
    threshold_f32: String,
    devices: usize,
    n: usize,
    rounds: Vec<DeviceRound>,
}

#[derive(Deserialize)]
struct DeviceRound {
    grads: Vec<String>,
    sum: String,
}

#[derive(Deserialize)]
struct Wire {
    threshold: String,
    threshold_f32: String,
    encoded_params: String,
}

#[derive(Deserialize)]
struct ParamCase {
    params: BTreeMap<String, String>,
    threshold_f32: Option<String>,
    mxnet_error: Option<String>,
}

#[derive(Deserialize)]
struct OneBit {
    source: String,
    cases: Vec<Case>,
}

fn load() -> File {
    let file: File = serde_json::from_str(include_str!("golden/compression.json")).unwrap();
    assert_eq!(file.mxnet_version, "1.9.1");
    file
}

fn bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn f32s(hex: &str) -> Vec<f32> {
    bytes(hex)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn threshold(hex_bits: &str) -> f32 {
    f32::from_bits(u32::from_str_radix(hex_bits, 16).unwrap())
}

/// Runs a case's rounds through `codec`, comparing packed bytes and dequantised values.
fn check_rounds(codec: Codec, case: &Case, label: &str) {
    let mut residual = vec![0.0f32; case.n];
    let mut packed = vec![0xAAu8; codec.compressed_len(case.n)];
    let mut out = vec![f32::NAN; case.n];
    for (i, round) in case.rounds.iter().enumerate() {
        let grad = f32s(&round.grad);
        assert_eq!(grad.len(), case.n);
        codec.quantize(&grad, &mut residual, &mut packed).unwrap();
        assert_eq!(
            packed,
            bytes(&round.packed),
            "{label}: packed bytes, round {i}"
        );
        codec.dequantize(&packed, &mut out).unwrap();
        let expected = f32s(&round.dequantized);
        assert_eq!(
            bits(&out),
            bits(&expected),
            "{label}: dequantized, round {i}"
        );
        // Adding into zeros gives the same values (0 + (+0) = +0).
        let mut sum = vec![0.0f32; case.n];
        codec.dequantize_add(&packed, &mut sum).unwrap();
        assert_eq!(
            bits(&sum),
            bits(&expected),
            "{label}: dequantize_add, round {i}"
        );
    }
}

#[test]
fn two_bit_matches_mxnet_1_9_1() {
    let file = load();
    let mut rounds = 0;
    for case in &file.two_bit {
        let t = threshold(&case.threshold_f32);
        let label = format!("2bit t={t:e} {} n={}", case.kind, case.n);
        check_rounds(Codec::two_bit(t), case, &label);
        rounds += case.rounds.len();
    }
    assert!(rounds >= 300, "{rounds} rounds");
}

/// A dist server dequantises with the threshold it decoded from the worker's 6-decimal text.
#[test]
fn dist_server_dequantises_with_the_decoded_threshold() {
    let file = load();
    let mut checked = 0;
    for case in &file.two_bit {
        let t = threshold(&case.threshold_f32);
        let spec = CompressionSpec::two_bit(t).unwrap();
        let server = CompressionSpec::decode_params(&spec.encode_params())
            .unwrap()
            .codec();
        for round in &case.rounds {
            let Some(pulled) = &round.dist_pulled else {
                continue;
            };
            let mut out = vec![0.0f32; case.n];
            server.dequantize(&bytes(&round.packed), &mut out).unwrap();
            assert_eq!(bits(&out), bits(&f32s(pulled)), "t={t:e}");
            checked += 1;
        }
    }
    // 1/3 (sent as 0.333333) and 1e-10 (sent as 0.000000: the server's values are +-0).
    assert!(checked >= 12, "{checked}");
}

/// MXNet's device store sums the dequantised pushes of its devices, each with its own
/// residual: `dequantize_add` of each device in turn gives the same `f32` sums.
#[test]
fn sum_over_devices_matches_mxnet_1_9_1() {
    let file = load();
    for case in &file.two_bit_devices {
        let codec = Codec::two_bit(threshold(&case.threshold_f32));
        let mut residuals = vec![vec![0.0f32; case.n]; case.devices];
        let mut packed = vec![0u8; codec.compressed_len(case.n)];
        for (i, round) in case.rounds.iter().enumerate() {
            let mut sum = vec![0.0f32; case.n];
            for (grad, residual) in round.grads.iter().zip(&mut residuals) {
                codec.quantize(&f32s(grad), residual, &mut packed).unwrap();
                codec.dequantize_add(&packed, &mut sum).unwrap();
            }
            assert_eq!(
                bits(&sum),
                bits(&f32s(&round.sum)),
                "t={} devices={} round {i}",
                codec.threshold(),
                case.devices
            );
        }
    }
}

#[test]
fn wire_text_matches_mxnet_1_9_1() {
    let file = load();
    for w in &file.wire {
        let t = threshold(&w.threshold_f32);
        let spec = CompressionSpec::two_bit(t).unwrap();
        assert_eq!(spec.encode_params(), w.encoded_params, "t={}", w.threshold);
        let back = CompressionSpec::decode_params(&w.encoded_params).unwrap();
        assert_eq!(back.kind, CompressionType::TwoBit);
        let sent: f32 = w.encoded_params[2..].parse().unwrap();
        assert_eq!(back.threshold.to_bits(), sent.to_bits());
    }
}

/// What MXNet 1.9.1 says to a parameter map, and what `from_params` says. The differences
/// are the 2.x rules this crate follows: `1bit` is accepted with any threshold, and the type
/// is checked before the 2-bit threshold.
#[test]
fn params_match_mxnet_1_9_1() {
    let file = load();
    for case in &file.params {
        let params: CompressionParams = case.params.clone();
        let ours = CompressionSpec::from_params(&params);
        let label = format!("{:?}", case.params);
        let kind = case.params.get("type").map(String::as_str);
        match (&case.threshold_f32, &case.mxnet_error) {
            (Some(t), None) => {
                let spec = ours.unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(spec.kind, CompressionType::TwoBit, "{label}");
                assert_eq!(spec.threshold.to_bits(), threshold(t).to_bits(), "{label}");
            }
            (None, Some(mxnet)) => {
                let is_threshold_check = mxnet.ends_with("threshold must be greater than 0");
                if kind == Some("1bit") && (is_threshold_check || mxnet.starts_with("Unknown type"))
                {
                    // MXNet 2.x semantics: 1-bit takes any threshold.
                    let spec = ours.unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_eq!(spec.kind, CompressionType::OneBit, "{label}");
                    continue;
                }
                let Err(Error::InvalidArgument(msg)) = ours else {
                    panic!("{label}: MXNet says {mxnet:?}, we say {ours:?}");
                };
                let expected = if kind.is_some_and(|k| k != "2bit" && k != "1bit") {
                    // 2.x order: the type before the threshold's sign.
                    format!("Unknown type for gradient compression {}", kind.unwrap())
                } else if is_threshold_check {
                    "threshold must be greater than 0".to_string()
                } else if mxnet.starts_with("Check failed: *p == ')'") {
                    // dmlc's CHECK prints the NUL it stopped at, cutting its own message.
                    "Invalid NAN literal".to_string()
                } else {
                    mxnet.clone()
                };
                assert!(
                    msg.contains(&expected),
                    "{label}: {msg:?} lacks {expected:?}"
                );
            }
            _ => panic!("{label}: malformed case"),
        }
    }
    assert!(file.params.len() >= 60);
}

#[test]
fn one_bit_matches_the_mxnet_2_simulator() {
    let file = load();
    assert!(file.one_bit.source.starts_with("NOT produced by MXNet"));
    for case in &file.one_bit.cases {
        let t = threshold(&case.threshold_f32);
        let label = format!("1bit t={t} {} n={}", case.kind, case.n);
        check_rounds(Codec::one_bit(t), case, &label);
    }
    assert!(file.one_bit.cases.len() >= 50);
}

/// The reference's wire capture and residual example (both among the golden cases too),
/// spelled out.
#[test]
fn reference_examples() {
    let codec = Codec::two_bit(0.5);
    let grad: Vec<f32> = [0.6, -0.6, 0.1].iter().cycle().take(20).copied().collect();
    let mut residual = vec![0.0; 20];
    let mut packed = vec![0; 8];
    codec.quantize(&grad, &mut residual, &mut packed).unwrap();
    assert_eq!(packed, [0xE3, 0x8E, 0x38, 0xE3, 0x8E, 0x00, 0x00, 0x00]);

    let grad = [0.4f32, 0.6, -0.7, 0.1, -0.3];
    let mut residual = [0.0; 5];
    let mut packed = [0; 4];
    let mut out = [0.0; 5];
    let expected = [
        [0.0, 0.5, -0.5, 0.0, 0.0],
        [0.5, 0.5, -0.5, 0.0, -0.5],
        [0.5, 0.5, -0.5, 0.0, 0.0],
        [0.5, 0.5, -0.5, 0.0, -0.5],
    ];
    for e in expected {
        codec.quantize(&grad, &mut residual, &mut packed).unwrap();
        codec.dequantize(&packed, &mut out).unwrap();
        assert_eq!(out, e);
    }

    let codec = Codec::two_bit(0.25);
    let mut residual = [0.0; 3];
    codec
        .quantize(&[0.25, -0.25, 0.2499], &mut residual, &mut packed)
        .unwrap();
    codec.dequantize(&packed, &mut out[..3]).unwrap();
    assert_eq!(out[..3], [0.25, -0.25, 0.0]);
}
