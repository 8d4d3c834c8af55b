//! Gradient compression in the `device` store with CPU values (runs on any machine), checked
//! against `kvstore_compression::Codec` applied by hand: one residual per key and per
//! position of the value in the key's values (MXNet: per source device), each value
//! quantised and dequantised, the dequantised values summed as MXNet's `ElementwiseSum`,
//! `((d0 + d1) + d2) + ...`. Every comparison is bit for bit.

use kvstore_base::{
    create, Capability, CompressionParams, DType, Error, KVStoreBase, KVStoreExt, Key, NDArray,
    OptimizerSpec,
};
use kvstore_compression::Codec;
use kvstore_device::{DeviceStore, Engine};
use kvstore_local::reduce::ReduceConfig;

fn params(pairs: &[(&str, &str)]) -> CompressionParams {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn device() -> DeviceStore {
    DeviceStore::new("device", Engine::Device, ReduceConfig::default())
}

fn compressed(kind: &str, threshold: f32) -> DeviceStore {
    let kv = device();
    kv.set_gradient_compression(&params(&[
        ("type", kind),
        ("threshold", &threshold.to_string()),
    ]))
    .unwrap();
    kv
}

fn codec(kind: &str, threshold: f32) -> Codec {
    match kind {
        "2bit" => Codec::two_bit(threshold),
        _ => Codec::one_bit(threshold),
    }
}

/// Deterministic values in `[-scale, scale)`.
fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
    let mut x = (seed as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn array(shape: &[usize], v: Vec<f32>) -> NDArray {
    NDArray::from_vec(shape, v).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn pull(kv: &dyn KVStoreBase, key: impl Into<Key>, shape: &[usize]) -> Vec<f32> {
    let mut out = NDArray::zeros(shape, DType::F32);
    kv.pull(key.into(), &mut out).unwrap();
    out.to_vec::<f32>().unwrap()
}

/// The reference: per-device residuals, quantise, dequantise, left-fold sum.
struct ByHand {
    codec: Codec,
    residuals: Vec<Vec<f32>>,
}

impl ByHand {
    fn new(codec: Codec, devices: usize, n: usize) -> Self {
        ByHand {
            codec,
            residuals: vec![vec![0.0; n]; devices],
        }
    }

    fn push(&mut self, grads: &[Vec<f32>]) -> Vec<f32> {
        let n = grads[0].len();
        let mut sum = vec![0.0f32; n];
        let mut packed = vec![0u8; self.codec.compressed_len(n)];
        for (i, (g, r)) in grads.iter().zip(&mut self.residuals).enumerate() {
            self.codec.quantize(g, r, &mut packed).unwrap();
            if i == 0 {
                self.codec.dequantize(&packed, &mut sum).unwrap();
            } else {
                self.codec.dequantize_add(&packed, &mut sum).unwrap();
            }
        }
        sum
    }
}

#[test]
fn capability_and_registration() {
    assert!(device().is_capable(Capability::GradientCompression));
    let nccl = DeviceStore::new("nccl", Engine::Nccl, ReduceConfig::default());
    assert!(!nccl.is_capable(Capability::GradientCompression));
    let info = kvstore_base::registered()
        .into_iter()
        .find(|i| i.name == "device")
        .expect("device is registered");
    assert!(info
        .capabilities
        .unwrap()
        .contains(&Capability::GradientCompression));
    assert!(create("device")
        .unwrap()
        .is_capable(Capability::GradientCompression));
}

#[test]
fn two_and_one_bit_over_rounds_equal_the_codec_by_hand() {
    let shape = [5, 7];
    let n = 35;
    for (kind, t) in [("2bit", 0.5), ("2bit", 0.1), ("1bit", 0.0), ("1bit", 0.5)] {
        for devices in 2..=4 {
            let kv = compressed(kind, t);
            kv.init(3, &NDArray::zeros(&shape, DType::F32)).unwrap();
            let mut reference = ByHand::new(codec(kind, t), devices, n);
            for round in 0..6 {
                let grads: Vec<Vec<f32>> = (0..devices)
                    .map(|d| values(n, 100 * round + d, 1.2 * t.max(0.5)))
                    .collect();
                let arrays: Vec<NDArray> = grads.iter().map(|g| array(&shape, g.clone())).collect();
                kv.push(3, &arrays[..]).unwrap();
                let expected = reference.push(&grads);
                assert_eq!(
                    bits(&pull(&kv, 3, &shape)),
                    bits(&expected),
                    "{kind} t={t} devices={devices} round {round}"
                );
                for d in 0..devices {
                    assert_eq!(
                        bits(&kv.residual(3, d).unwrap()),
                        bits(&reference.residuals[d]),
                        "residual of device {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_sum_is_elementwise_sum_order_not_the_uncompressed_order() {
    // With t = 0.1, ((d0 + d1) + d2) + d3 and d0 + ((d1 + d2) + d3) differ in float32:
    // 0.1 + 0.1 = 0.2, 0.2 + 0.1 = 0.3 (rounded), 0.3 - 0.1 vs 0.1 + (0.1 + (0.1 - 0.1)).
    let t = 0.1f32;
    let kv = compressed("2bit", t);
    kv.init(0, &NDArray::zeros(&[1], DType::F32)).unwrap();
    let grads = [t, t, t, -t];
    let arrays: Vec<NDArray> = grads.iter().map(|&g| array(&[1], vec![g])).collect();
    kv.push(0, &arrays[..]).unwrap();
    let left_fold = ((t + t) + t) + -t;
    let grouped = t + ((t + t) + -t);
    assert_ne!(left_fold.to_bits(), grouped.to_bits());
    assert_eq!(pull(&kv, 0, &[1])[0].to_bits(), left_fold.to_bits());
}

#[test]
fn one_value_is_compressed_too_and_residuals_carry() {
    // The reference's example: g = [0.4, 0.6, -0.7, 0.1, -0.3] pushed repeatedly, t = 0.5.
    let kv = compressed("2bit", 0.5);
    kv.init("w", &NDArray::zeros(&[5], DType::F32)).unwrap();
    let g = array(&[5], vec![0.4, 0.6, -0.7, 0.1, -0.3]);
    let expected = [
        [0.0, 0.5, -0.5, 0.0, 0.0],
        [0.5, 0.5, -0.5, 0.0, -0.5],
        [0.5, 0.5, -0.5, 0.0, 0.0],
        [0.5, 0.5, -0.5, 0.0, -0.5],
    ];
    for e in expected {
        kv.push("w", &g).unwrap();
        assert_eq!(pull(&kv, "w", &[5]), e);
    }
    let r = kv.residual("w", 0).unwrap();
    let mut by_hand = ByHand::new(Codec::two_bit(0.5), 1, 5);
    for _ in 0..4 {
        by_hand.push(&[vec![0.4, 0.6, -0.7, 0.1, -0.3]]);
    }
    assert_eq!(bits(&r), bits(&by_hand.residuals[0]));
    assert!(kv.residual("w", 1).is_none());
}

#[test]
fn pushpull_and_in_place_pushpull_compress() {
    let shape = [40];
    let kv = compressed("2bit", 0.25);
    let twin = compressed("2bit", 0.25);
    let in_place = compressed("2bit", 0.25);
    for s in [&kv, &twin, &in_place] {
        s.init(1, &NDArray::zeros(&shape, DType::F32)).unwrap();
    }
    let mut reference = ByHand::new(Codec::two_bit(0.25), 3, 40);
    for round in 0..5 {
        let grads: Vec<Vec<f32>> = (0..3).map(|d| values(40, 10 * round + d, 0.4)).collect();
        let arrays: Vec<NDArray> = grads.iter().map(|g| array(&shape, g.clone())).collect();
        let expected = bits(&reference.push(&grads));

        let mut outs = vec![NDArray::zeros(&shape, DType::F32); 2];
        kv.pushpull(1, &arrays[..], &mut outs[..]).unwrap();
        for o in &outs {
            assert_eq!(bits(&o.to_vec::<f32>().unwrap()), expected, "round {round}");
        }

        twin.push(1, &arrays[..]).unwrap();
        assert_eq!(bits(&pull(&twin, 1, &shape)), expected);

        let mut own = arrays.clone();
        in_place.pushpull_in_place(1, &mut own[..]).unwrap();
        for o in &own {
            assert_eq!(bits(&o.to_vec::<f32>().unwrap()), expected);
        }
    }
}

#[test]
fn several_keys_in_one_call_equal_separate_calls() {
    let kv = compressed("1bit", 0.0);
    let apart = compressed("1bit", 0.0);
    for s in [&kv, &apart] {
        s.init(
            vec![1, 2],
            &[
                NDArray::zeros(&[20], DType::F32),
                NDArray::zeros(&[33], DType::F32),
            ],
        )
        .unwrap();
    }
    for round in 0..4 {
        let a: Vec<NDArray> = (0..2)
            .map(|d| array(&[20], values(20, round * 7 + d, 1.5)))
            .collect();
        let b: Vec<NDArray> = (0..3)
            .map(|d| array(&[33], values(33, round * 7 + 3 + d, 1.5)))
            .collect();
        // Keys given out of order, with key 1's values split around key 2's.
        kv.push(vec![2, 1, 2, 2, 1], vec![&b[0], &a[0], &b[1], &b[2], &a[1]])
            .unwrap();
        apart.push(1, &a[..]).unwrap();
        apart.push(2, &b[..]).unwrap();
        for (key, n) in [(1, 20), (2, 33)] {
            assert_eq!(bits(&pull(&kv, key, &[n])), bits(&pull(&apart, key, &[n])));
        }
    }
}

#[test]
fn sgd_runs_on_the_compressed_sum() {
    let shape = [3, 4];
    let spec = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9)
        .with("wd", 0.01);
    let kv = compressed("2bit", 0.5);
    let local = create("local").unwrap();
    let init = array(&shape, values(12, 99, 1.0));
    kv.init(7, &init).unwrap();
    local.init(7, &init).unwrap();
    kv.set_optimizer(&spec).unwrap();
    local.set_optimizer(&spec).unwrap();
    let mut reference = ByHand::new(Codec::two_bit(0.5), 3, 12);
    for round in 0..6 {
        let grads: Vec<Vec<f32>> = (0..3).map(|d| values(12, 30 * round + d, 0.8)).collect();
        let arrays: Vec<NDArray> = grads.iter().map(|g| array(&shape, g.clone())).collect();
        kv.push(7, &arrays[..]).unwrap();
        // The local store's updater gets the compressed sum as its one value.
        local
            .push(7, &array(&shape, reference.push(&grads)))
            .unwrap();
        assert_eq!(
            bits(&pull(&kv, 7, &shape)),
            bits(&pull(local.as_ref(), 7, &shape)),
            "round {round}"
        );
    }
}

#[test]
fn compression_set_after_init_applies_and_init_pull_broadcast_are_exact() {
    let kv = device();
    kv.init(1, &array(&[4], vec![0.3, -0.2, 0.7, 0.1])).unwrap();
    // Before compression: exact values.
    kv.push(1, &array(&[4], vec![0.3, 0.3, 0.3, 0.3])).unwrap();
    assert_eq!(pull(&kv, 1, &[4]), [0.3; 4]);
    kv.set_gradient_compression(&params(&[("type", "2bit")]))
        .unwrap();
    assert_eq!(kv.gradient_compression(), Some(Codec::two_bit(0.5)));
    kv.push(1, &array(&[4], vec![0.3, 0.6, -0.6, 0.0])).unwrap();
    assert_eq!(pull(&kv, 1, &[4]), [0.0, 0.5, -0.5, 0.0]);
    // Broadcast (init + pull) is not compressed.
    let mut out = NDArray::zeros(&[4], DType::F32);
    kv.broadcast(2, &array(&[4], vec![0.3, 0.6, -0.6, 0.1]), &mut out)
        .unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), [0.3, 0.6, -0.6, 0.1]);
}

#[test]
fn a_new_setting_replaces_the_threshold_and_keeps_residuals() {
    let kv = compressed("2bit", 0.5);
    kv.init(0, &NDArray::zeros(&[2], DType::F32)).unwrap();
    kv.push(0, &array(&[2], vec![0.4, -0.3])).unwrap();
    let before = kv.residual(0, 0).unwrap();
    assert_eq!(before, [0.4, -0.3]);
    kv.set_gradient_compression(&params(&[("type", "2bit"), ("threshold", "0.25")]))
        .unwrap();
    assert_eq!(kv.residual(0, 0).unwrap(), before);
    kv.push(0, &array(&[2], vec![0.0, 0.0])).unwrap();
    assert_eq!(pull(&kv, 0, &[2]), [0.25, -0.25]);
}

#[test]
fn caller_arrays_are_not_modified() {
    let kv = compressed("2bit", 0.5);
    kv.init(0, &NDArray::zeros(&[3], DType::F32)).unwrap();
    let g = [
        array(&[3], vec![0.7, -0.2, 0.5]),
        array(&[3], vec![0.1, 0.9, -0.9]),
    ];
    let copy = g.clone();
    kv.push(0, &g[..]).unwrap();
    let mut outs = [NDArray::zeros(&[3], DType::F32)];
    kv.pushpull(0, &g[..], &mut outs[..]).unwrap();
    assert_eq!(g[0], copy[0]);
    assert_eq!(g[1], copy[1]);
}

#[test]
fn bad_parameters_are_mxnet_errors_and_keep_the_setting() {
    let kv = device();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "Required parameter type of string is not presented"),
        (
            &[("type", "3bit")],
            "Unknown type for gradient compression 3bit",
        ),
        (
            &[("type", "2BIT")],
            "Unknown type for gradient compression 2BIT",
        ),
        (
            &[("type", "2bit"), ("threshold", "abc")],
            "Invalid Parameter format for threshold expect float but value='abc'",
        ),
        (
            &[("type", "2bit"), ("threshold", "0")],
            "threshold must be greater than 0",
        ),
        (
            &[("type", "2bit"), ("threshold", "-1")],
            "threshold must be greater than 0",
        ),
    ];
    for (p, message) in cases {
        let e = kv.set_gradient_compression(&params(p)).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains(message), "{e}");
        assert_eq!(kv.gradient_compression(), None);
    }
    kv.set_gradient_compression(&params(&[("type", "1bit"), ("threshold", "-0.5")]))
        .unwrap();
    assert_eq!(kv.gradient_compression(), Some(Codec::one_bit(-0.5)));
    // A bad setting later keeps the one in effect: compression cannot be turned off.
    assert!(kv
        .set_gradient_compression(&params(&[("type", "none")]))
        .is_err());
    assert_eq!(kv.gradient_compression(), Some(Codec::one_bit(-0.5)));
}

#[test]
fn nccl_refuses_compression_with_mxnets_message() {
    // Constructed without a GPU: only its GPU calls need one.
    let nccl = DeviceStore::new("nccl", Engine::Nccl, ReduceConfig::default());
    let e = nccl
        .set_gradient_compression(&params(&[("type", "2bit")]))
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("NCCL kvstore does not support gradient compression"),
        "{text}"
    );
    assert!(text.starts_with("nccl: set_gradient_compression"), "{text}");
    assert_eq!(nccl.gradient_compression(), None);
}

/// Pushes that must fail, each leaving residuals and store unchanged: the next good push gives
/// what it gives on a store that never saw the bad one.
#[test]
fn failed_calls_leave_residuals_and_store_unchanged() {
    let shape = [17];
    let good = |round: usize| -> Vec<NDArray> {
        (0..2)
            .map(|d| array(&shape, values(17, 10 * round + d, 0.7)))
            .collect()
    };
    let kv = compressed("2bit", 0.5);
    let twin = compressed("2bit", 0.5);
    for s in [&kv, &twin] {
        s.init(
            vec![1, 2],
            &[
                NDArray::zeros(&shape, DType::F32),
                NDArray::zeros(&shape, DType::F32),
            ],
        )
        .unwrap();
        s.push(1, &good(0)[..]).unwrap();
    }
    let g = good(1);
    let f64_value = NDArray::from_vec(&shape, vec![0.3f64; 17]).unwrap();
    let f16_value = NDArray::zeros(&shape, DType::F16);
    let rows = NDArray::from_vec(&[1], vec![0.9f32]).unwrap();
    let sparse = NDArray::row_sparse(&shape, vec![0], &rows).unwrap();
    let wrong_shape = array(&[16], vec![0.9; 16]);
    let bad_calls: Vec<(Vec<i64>, Vec<&NDArray>, &str)> = vec![
        // Key 1's values are fine; key 2 fails: key 1 must not keep its new residuals.
        (vec![1, 1, 2], vec![&g[0], &g[1], &f64_value], "float64"),
        (vec![1, 2], vec![&g[0], &f16_value], "float16"),
        (vec![1, 2, 2], vec![&g[0], &g[1], &wrong_shape], "shape"),
        (vec![1, 9], vec![&g[0], &g[1]], "not been initialised"),
        (vec![1, 1], vec![&wrong_shape, &wrong_shape], "shape"),
    ];
    let before = (kv.residual(1, 0).unwrap(), kv.residual(1, 1).unwrap());
    for (keys, vals, message) in &bad_calls {
        let e = kv.push(keys.clone(), vals.clone()).unwrap_err();
        assert!(e.to_string().contains(message), "{e}");
        let mut outs = vec![NDArray::zeros(&shape, DType::F32); keys.len()];
        let e = kv
            .pushpull(
                keys.clone(),
                vals.clone(),
                outs.iter_mut().collect::<Vec<_>>(),
            )
            .unwrap_err();
        assert!(e.to_string().contains(message), "{e}");
        assert!(outs.iter().all(|o| o.to_vec::<f32>().unwrap() == [0.0; 17]));
    }
    let e = kv.push(vec![1, 2], vec![&g[0], &sparse]).unwrap_err();
    assert!(e.to_string().contains("row_sparse"), "{e}");
    assert!(matches!(e.root(), Error::InvalidArgument(_)));
    assert_eq!(kv.residual(1, 0).unwrap(), before.0);
    assert_eq!(kv.residual(1, 1).unwrap(), before.1);
    assert!(kv.residual(2, 0).is_none());
    for s in [&kv, &twin] {
        s.push(vec![1, 1, 2], vec![&g[0], &g[1], &g[0]]).unwrap();
    }
    for key in [1, 2] {
        assert_eq!(
            bits(&pull(&kv, key, &shape)),
            bits(&pull(&twin, key, &shape))
        );
    }
}

#[test]
fn dtype_errors_name_the_key_and_the_dtype() {
    let kv = compressed("2bit", 0.5);
    kv.init("w", &NDArray::zeros(&[4], DType::F64)).unwrap();
    let e = kv
        .push("w", &NDArray::from_vec(&[4], vec![1.0f64; 4]).unwrap())
        .unwrap_err();
    assert!(matches!(e.root(), Error::InvalidArgument(_)), "{e}");
    assert_eq!(
        e.to_string(),
        "device: push of key \"w\": invalid argument: gradient compression supports float32 values, \
         not float64"
    );
    let mut out = NDArray::zeros(&[4], DType::F64);
    kv.pull("w", &mut out).unwrap();
    assert_eq!(out.to_vec::<f64>().unwrap(), [0.0; 4]);
}

#[test]
fn without_a_gpu_the_gpu_codec_and_compressed_gpu_pushes_are_device_errors() {
    if kvstore_device::probe().is_ok() {
        return; // a GPU machine: tests/gpu.rs covers it
    }
    let codec = Codec::two_bit(0.5);
    let e = kvstore_device::PackedArray::zeros(&codec, 16, 0).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    let e = kvstore_device::PackedArray::from_host(&codec, &[0; 4], 16, 0).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    let kv = compressed("2bit", 0.5);
    kv.init_gpu("g", &NDArray::zeros(&[4], DType::F32)).unwrap();
    // No DeviceArray can exist without a GPU; an empty push is refused before any GPU work.
    assert!(kv.push_gpu("g", &[]).is_err());
    // CPU values keep working.
    kv.init("c", &NDArray::zeros(&[4], DType::F32)).unwrap();
    kv.push("c", &array(&[4], vec![0.5, -0.5, 0.2, 0.0]))
        .unwrap();
    assert_eq!(pull(&kv, "c", &[4]), [0.5, -0.5, 0.0, 0.0]);
}
