//! Gradient compression on the dist stores: workers quantise their pushes with MXNet's 2-bit or
//! 1-bit codec (residual kept per key on the worker), servers dequantise and merge. Threads of
//! one process over real sockets on 127.0.0.1 ([`LocalCluster`]); every wait is bounded.

mod common;

use std::collections::BTreeMap;

use kvstore_base::{DType, Error, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_dist::DistStore;

fn params(kind: &str, threshold: f64) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("type".to_string(), kind.to_string()),
        ("threshold".to_string(), threshold.to_string()),
    ])
}

/// Runs `body(store)` on `workers` workers (as concrete `DistStore`s) of a fresh cluster;
/// results by rank.
fn run<T: Send + 'static>(
    servers: u32,
    workers: u32,
    body: impl Fn(&DistStore) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    run_with(servers, workers, true, body)
}

/// [`run`], the workers using shared memory with the servers or not (`KVSTORE_SHM`).
fn run_with<T: Send + 'static>(
    servers: u32,
    workers: u32,
    shm: bool,
    body: impl Fn(&DistStore) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    common::run_tweaked(servers, workers, |c| c.shm = shm, body)
}

fn f32s(a: &NDArray) -> Vec<f32> {
    a.to_vec::<f32>().unwrap()
}

#[test]
fn two_bit_pushes_carry_the_residual_across_rounds() {
    // MXNet 1.9.1, one worker, t = 0.5, pushing [0.4, 0.6, -0.7, 0.1, -0.3] again and again
    // stores [0, .5, -.5, 0, 0], [.5, .5, -.5, 0, -.5], [.5, .5, -.5, 0, 0], [.5, .5, -.5, 0, -.5];
    // two workers pushing the same values: twice that.
    let out = run(1, 2, |kv| {
        kv.set_gradient_compression(&params("2bit", 0.5)).unwrap();
        kv.init(3, &NDArray::zeros(&[5], DType::F32)).unwrap();
        let g = NDArray::from_vec(&[5], vec![0.4f32, 0.6, -0.7, 0.1, -0.3]).unwrap();
        let mut rounds = Vec::new();
        for _ in 0..4 {
            kv.push(3, &g).unwrap();
            let mut w = NDArray::zeros(&[5], DType::F32);
            kv.pull(3, &mut w).unwrap();
            rounds.push(f32s(&w));
        }
        rounds
    });
    let expected = vec![
        vec![0.0, 1.0, -1.0, 0.0, 0.0],
        vec![1.0, 1.0, -1.0, 0.0, -1.0],
        vec![1.0, 1.0, -1.0, 0.0, 0.0],
        vec![1.0, 1.0, -1.0, 0.0, -1.0],
    ];
    assert_eq!(out, vec![expected.clone(), expected]);
}

#[test]
fn a_new_setting_keeps_the_residuals() {
    // One worker, t = 0.5: 0.3 is kept back; after a new setting (t = 0.4) the next 0.3
    // makes 0.6 and sends 0.4, as MXNet's kept residual does (from zero: nothing sent).
    let out = run(1, 1, |kv| {
        kv.set_gradient_compression(&params("2bit", 0.5)).unwrap();
        kv.init(3, &NDArray::zeros(&[1], DType::F32)).unwrap();
        let g = NDArray::full(&[1], 0.3, DType::F32);
        let mut w = NDArray::zeros(&[1], DType::F32);
        kv.push(3, &g).unwrap();
        kv.pull(3, &mut w).unwrap();
        let first = f32s(&w);
        kv.set_gradient_compression(&params("2bit", 0.4)).unwrap();
        kv.push(3, &g).unwrap();
        kv.pull(3, &mut w).unwrap();
        (first, f32s(&w))
    });
    assert_eq!(out[0], (vec![0.0], vec![0.4]));
}

#[test]
fn the_bytes_of_a_push_shrink_16_and_32_times() {
    let n = 1 << 20; // 4 MiB of float32, below the big-array bound: one message
                     // Over TCP only: a plain push through shared memory costs the wire almost nothing.
    let out = run_with(1, 1, false, move |kv| {
        kv.init(1, &NDArray::zeros(&[n], DType::F32)).unwrap();
        let g = NDArray::full(&[n], 0.3, DType::F32);
        let mut sizes = Vec::new();
        for spec in [None, Some(params("2bit", 0.5)), Some(params("1bit", 0.0))] {
            if let Some(p) = &spec {
                kv.set_gradient_compression(p).unwrap();
            }
            let before = kv.bytes_sent();
            kv.push(1, &g).unwrap();
            sizes.push(kv.bytes_sent() - before);
        }
        sizes
    });
    let [plain, two, one] = out[0][..] else {
        panic!("three pushes")
    };
    assert!(plain >= (4 << 20) as u64, "{plain}");
    let (r2, r1) = (plain as f64 / two as f64, plain as f64 / one as f64);
    println!("push of 4 MiB: {plain} bytes, 2-bit {two} ({r2:.2}x), 1-bit {one} ({r1:.2}x)");
    assert!(r2 > 15.9, "2-bit: {r2}");
    assert!(r1 > 31.8, "1-bit: {r1}");
}

#[test]
fn compressed_pushes_through_shared_memory_equal_those_over_tcp() {
    // Big parts of compressed pushes go through the region a worker lends its server (the
    // socket carries only slots); the rounds' results are bit for bit those over TCP.
    let n = 1 << 20;
    let job = move |kv: &DistStore| {
        kv.set_gradient_compression(&params("2bit", 0.25)).unwrap();
        kv.init(
            &[1, 2],
            &[
                NDArray::zeros(&[n], DType::F32),
                NDArray::zeros(&[n], DType::F16),
            ],
        )
        .unwrap();
        let before = kv.bytes_sent();
        let mut rounds = Vec::new();
        for round in 0..3 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 7 + round * 13 + kv.rank() * 5) % 11) as f32 * 0.1 - 0.5)
                .collect();
            let g = NDArray::from_vec(&[n], g).unwrap();
            let values = [g.clone(), g.astype(DType::F16)];
            let mut outs = [
                NDArray::zeros(&[n], DType::F32),
                NDArray::zeros(&[n], DType::F16),
            ];
            kv.pushpull(&[1, 2], &values, &mut outs).unwrap();
            rounds.push((f32s(&outs[0]), outs[1].to_f64_vec()));
        }
        (rounds, kv.bytes_sent() - before, kv.shm_connections())
    };
    let shared = run_with(2, 2, true, job);
    let tcp = run_with(2, 2, false, job);
    for ((rounds_shm, sent_shm, links), (rounds_tcp, sent_tcp, _)) in shared.iter().zip(&tcp) {
        assert_eq!(*links, 2, "a region per server");
        assert!(
            rounds_shm == rounds_tcp,
            "the same results through shared memory"
        );
        // 3 rounds of 4 MiB + 2 MiB compressed 16x: about 1.2 MiB over TCP; only slots
        // through shared memory.
        assert!(*sent_tcp > 1 << 20, "{sent_tcp}");
        assert!(
            *sent_shm < 16 << 10,
            "compressed parts went over TCP: {sent_shm} bytes"
        );
    }
}

#[test]
fn one_bit_pushpull_and_float16_keys_and_split_keys() {
    // 1-bit with threshold 0: each element is +1 or -1; two workers, 2 servers, a key split
    // over both (bound lowered through the create options is not possible here: use a big key).
    let n = 1_000_003;
    let out = run(2, 2, move |kv| {
        kv.set_gradient_compression(&params("1bit", 0.0)).unwrap();
        kv.init(
            &[1, 2],
            &[
                NDArray::zeros(&[n], DType::F32),
                NDArray::zeros(&[4], DType::F16),
            ],
        )
        .unwrap();
        let sign = if kv.rank() == 0 { 1.0 } else { -0.5 };
        let g = [
            NDArray::full(&[n], sign, DType::F32),
            NDArray::full(&[4], 0.25, DType::F16),
        ];
        let mut outs = [
            NDArray::zeros(&[n], DType::F32),
            NDArray::zeros(&[4], DType::F16),
        ];
        kv.pushpull(&[1, 2], &g, &mut outs).unwrap();
        (f32s(&outs[0]), outs[1].to_f64_vec())
    });
    for (big, half) in out {
        // +1 from rank 0, -1 from rank 1 (-0.5 <= 0): 0 everywhere.
        assert!(big.iter().all(|&v| v == 0.0));
        assert_eq!(half, vec![2.0; 4], "0.25 > 0: +1 from each worker");
    }
}

#[test]
fn bad_parameters_and_values_are_clear_errors() {
    let out = run(1, 1, |kv| {
        let unknown = kv
            .set_gradient_compression(&params("3bit", 0.5))
            .unwrap_err();
        let threshold = kv
            .set_gradient_compression(&params("2bit", -1.0))
            .unwrap_err();
        kv.set_gradient_compression(&params("2bit", 0.5)).unwrap();
        kv.init(5, &NDArray::zeros(&[3], DType::I32)).unwrap();
        let ints = kv.push(5, &NDArray::zeros(&[3], DType::I32)).unwrap_err();
        (unknown, threshold, ints)
    });
    let (unknown, threshold, ints) = &out[0];
    assert!(
        unknown
            .to_string()
            .contains("Unknown type for gradient compression 3bit"),
        "{unknown}"
    );
    assert!(
        threshold
            .to_string()
            .contains("threshold must be greater than 0"),
        "{threshold}"
    );
    assert!(matches!(ints, Error::AtKey { .. }), "{ints}");
    assert!(ints.to_string().contains("float32"), "{ints}");
}

/// Linear regression, data-parallel over the workers, with 2-bit compressed gradients and SGD
/// on the servers: the loss still falls to the noise floor.
#[test]
fn training_converges_with_two_bit_compression() {
    const FEATURES: usize = 8;
    const SAMPLES: usize = 512;
    const STEPS: usize = 300;
    const THRESHOLD: f64 = 0.5;
    let true_w: Vec<f32> = (0..FEATURES).map(|i| i as f32 * 0.5 - 1.75).collect();
    let mut state = 0x2545_f491_u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    let x: Vec<[f32; FEATURES]> = (0..SAMPLES)
        .map(|_| std::array::from_fn(|_| rand()))
        .collect();
    let y: Vec<f32> = x
        .iter()
        .map(|r| r.iter().zip(&true_w).map(|(a, w)| a * w).sum::<f32>() + 0.01 * rand())
        .collect();
    let loss = move |w: &[f32], x: &[[f32; FEATURES]], y: &[f32]| -> f32 {
        x.iter()
            .zip(y)
            .map(|(r, t)| (r.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() - t).powi(2))
            .sum::<f32>()
            / x.len() as f32
    };
    let initial = loss(&[0.0; FEATURES], &x, &y);
    let (xc, yc) = (x.clone(), y.clone());
    let out = run(1, 2, move |kv| {
        kv.set_gradient_compression(&params("2bit", THRESHOLD))
            .unwrap();
        kv.set_optimizer(
            &OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("rescale_grad", 0.5),
        )
        .unwrap();
        kv.init("w", &NDArray::zeros(&[FEATURES], DType::F32))
            .unwrap();
        let (rank, workers) = (kv.rank(), kv.num_workers());
        let mut w = NDArray::zeros(&[FEATURES], DType::F32);
        for step in 0..STEPS {
            let wv = f32s(&w);
            // This worker's share of a mini-batch of 32; the mean gradient of its share.
            let rows: Vec<usize> = (0..16)
                .map(|i| (step * 32 + rank * 16 + i) % SAMPLES)
                .collect();
            let mut g = vec![0.0f32; FEATURES];
            for &i in &rows {
                let err = xc[i].iter().zip(&wv).map(|(a, b)| a * b).sum::<f32>() - yc[i];
                for (gj, a) in g.iter_mut().zip(&xc[i]) {
                    *gj += 2.0 * err * a / rows.len() as f32;
                }
            }
            assert_eq!(workers, 2);
            kv.push("w", &NDArray::from_vec(&[FEATURES], g).unwrap())
                .unwrap();
            kv.pull("w", &mut w).unwrap();
        }
        f32s(&w)
    });
    assert_eq!(out[0], out[1], "both workers pull the same weights");
    let last = loss(&out[0], &x, &y);
    println!("loss {initial:.4} -> {last:.6}");
    assert!(last < initial / 100.0, "loss {initial} -> {last}");
}
