//! The `device` store with gradient compression against MXNet 1.9.1's own `device` kvstore,
//! bit for bit: `tests/golden/generate.py` pushed (or pushpulled) lists of float32 values on
//! `mx.cpu(0)`, `mx.cpu(1)`, ... over several rounds and pulled after each, and wrote the
//! inputs and pulled values to `tests/golden/compression.json`.

use kvstore_base::{CompressionParams, DType, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_device::{DeviceStore, Engine};
use kvstore_local::reduce::ReduceConfig;
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    mxnet_version: String,
    cases: Vec<Case>,
    rejected: Vec<Rejected>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    threshold: f64,
    devices: usize,
    keys: Vec<i64>,
    sizes: Vec<usize>,
    op: String,
    optimizer: Option<serde_json::Map<String, serde_json::Value>>,
    set_after_init: bool,
    init: Vec<String>,
    rounds: Vec<Round>,
}

#[derive(Deserialize)]
struct Round {
    values: Vec<Vec<String>>,
    pulled: Vec<String>,
}

#[derive(Deserialize)]
struct Rejected {
    params: std::collections::BTreeMap<String, String>,
    mxnet_error: Option<String>,
}

fn load() -> File {
    let file: File = serde_json::from_str(include_str!("golden/compression.json")).unwrap();
    assert_eq!(file.mxnet_version, "1.9.1");
    file
}

fn f32s(hex: &str) -> Vec<f32> {
    (0..hex.len() / 8)
        .map(|i| {
            let b: Vec<u8> = (0..4)
                .map(|j| u8::from_str_radix(&hex[8 * i + 2 * j..8 * i + 2 * j + 2], 16).unwrap())
                .collect();
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn optimizer(map: &serde_json::Map<String, serde_json::Value>) -> OptimizerSpec {
    let mut spec = OptimizerSpec::new(map["name"].as_str().unwrap());
    for (k, v) in map {
        if k != "name" {
            spec = spec.with(k, v.as_f64().unwrap());
        }
    }
    spec
}

#[test]
fn device_store_equals_mxnet_bit_for_bit() {
    let file = load();
    assert!(file.cases.len() >= 10);
    for case in &file.cases {
        let kv = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
        // MXNet's Python passes each parameter as str(value).
        let params = CompressionParams::from([
            ("type".to_string(), "2bit".to_string()),
            ("threshold".to_string(), case.threshold.to_string()),
        ]);
        if !case.set_after_init {
            kv.set_gradient_compression(&params).unwrap();
        }
        let inits: Vec<NDArray> = case
            .init
            .iter()
            .zip(&case.sizes)
            .map(|(h, &n)| NDArray::from_vec(&[n], f32s(h)).unwrap())
            .collect();
        kv.init(case.keys.clone(), &inits).unwrap();
        if case.set_after_init {
            kv.set_gradient_compression(&params).unwrap();
        }
        if let Some(opt) = &case.optimizer {
            kv.set_optimizer(&optimizer(opt)).unwrap();
        }
        for (r, round) in case.rounds.iter().enumerate() {
            let values: Vec<Vec<NDArray>> = round
                .values
                .iter()
                .zip(&case.sizes)
                .map(|(vs, &n)| {
                    assert_eq!(vs.len(), case.devices);
                    vs.iter()
                        .map(|h| NDArray::from_vec(&[n], f32s(h)).unwrap())
                        .collect()
                })
                .collect();
            let mut outs: Vec<NDArray> = case
                .sizes
                .iter()
                .map(|&n| NDArray::zeros(&[n], DType::F32))
                .collect();
            let out_refs: Vec<Vec<&mut NDArray>> = outs.iter_mut().map(|o| vec![o]).collect();
            match case.op.as_str() {
                "pushpull" => kv.pushpull(case.keys.clone(), &values, out_refs).unwrap(),
                _ => {
                    kv.push(case.keys.clone(), &values).unwrap();
                    kv.pull(case.keys.clone(), out_refs).unwrap();
                }
            }
            for (k, (out, expected)) in outs.iter().zip(&round.pulled).enumerate() {
                assert_eq!(
                    bits(&out.to_vec::<f32>().unwrap()),
                    bits(&f32s(expected)),
                    "case {} round {r} key {}",
                    case.name,
                    case.keys[k]
                );
            }
        }
    }
}

#[test]
fn parameters_mxnet_rejects() {
    let file = load();
    for r in &file.rejected {
        let kv = DeviceStore::new("device", Engine::Device, ReduceConfig::default());
        let params: CompressionParams = r.params.clone().into_iter().collect();
        let ours = kv.set_gradient_compression(&params);
        let mxnet = r
            .mxnet_error
            .as_deref()
            .expect("MXNet 1.9.1 rejects each of these");
        if r.params.get("type").map(String::as_str) == Some("1bit") {
            // MXNet 1.9.1 has no 1-bit compression; this store follows MXNet 2.x, which has.
            assert_eq!(mxnet, "Unknown type for gradient compression 1bit");
            assert!(ours.is_ok());
            continue;
        }
        let ours = ours.unwrap_err().to_string();
        // MXNet's message, up to its CHECK prefix ("Check failed: ... : ").
        let core = mxnet.rsplit(" : ").next().unwrap();
        assert!(ours.contains(core), "ours: {ours}; MXNet: {mxnet}");
    }
}
