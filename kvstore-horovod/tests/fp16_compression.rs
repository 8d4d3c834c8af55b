//! Horovod's `Compression.fp16` on the `horovod` store (`set_gradient_compression({"type":
//! "fp16"})`): floating-point gradients cross the ring as float16 and are summed in float16,
//! integers are untouched, the bytes on the ring halve, and the setting must agree across
//! workers.

use kvstore_base::{CompressionParams, DType, Error, KVStoreBase, KVStoreExt, NDArray};
mod common;

use common::{chain, job};

fn fp16() -> CompressionParams {
    CompressionParams::from([("type".to_string(), "fp16".to_string())])
}

/// Element `i` of rank `r`'s gradient: `(r + 1) * c_i` with `c_i` a multiple of 1/16, plus
/// 1e-4, which float16 (a spacing of at least 2^-10 above 1) rounds away. Every float16 partial
/// sum is then a multiple of 1/16 below 128, exact in float16 in any order of addition.
fn gradient(i: usize, r: usize) -> f64 {
    let c = (i % 8 + 1) as f64 / 16.0 + 1.0;
    (r + 1) as f64 * c + 1e-4
}

#[test]
fn floating_point_gradients_are_rounded_to_float16_and_summed_there() {
    let n = 3;
    let len = 1000;
    let outs = job(n, &[], |r, kv| {
        kv.set_gradient_compression(&fp16()).unwrap();
        let mut results = Vec::new();
        for dtype in [DType::F32, DType::F64] {
            let grad: Vec<f64> = (0..len).map(|i| gradient(i, r)).collect();
            let grad = NDArray::from_vec(&[len], grad).unwrap().astype(dtype);
            let mut out = NDArray::zeros(&[len], dtype);
            kv.pushpull(dtype.name(), &grad, &mut out).unwrap();
            assert_eq!(out.dtype(), dtype, "the output keeps its dtype");
            results.push(out.to_f64_vec());
        }
        // 30000 fits float16 (max 65504), twice it too; three times it does not: the sum is
        // computed in float16, as Horovod's, and overflows to infinity.
        let mut big = NDArray::zeros(&[4], DType::F32);
        kv.pushpull("big", &NDArray::full(&[4], 30000.0, DType::F32), &mut big)
            .unwrap();
        results.push(big.to_f64_vec());
        // Integers cross as they are: 100001 has no float16.
        let mut ints = NDArray::zeros(&[2], DType::I32);
        let value = NDArray::full(&[2], 100_001.0 * (r + 1) as f64, DType::I32);
        kv.pushpull("ints", &value, &mut ints).unwrap();
        results.push(ints.to_f64_vec());
        results
    });
    assert_eq!(outs[0], outs[1], "bit-identical on every rank");
    assert_eq!(outs[0], outs[2], "bit-identical on every rank");
    let workers_sum = (n * (n + 1) / 2) as f64;
    for (dtype, got) in ["float32", "float64"].iter().zip(&outs[0]) {
        for (i, &x) in got.iter().enumerate() {
            // Without compression the 1e-4s would add up (float32 keeps them).
            let c = (i % 8 + 1) as f64 / 16.0 + 1.0;
            assert_eq!(x, workers_sum * c, "{dtype} element {i}");
        }
    }
    assert!(
        outs[0][2].iter().all(|x| x.is_infinite() && *x > 0.0),
        "{:?}",
        outs[0][2]
    );
    assert_eq!(outs[0][3], vec![600_006.0; 2]);
}

#[test]
fn the_ring_carries_half_the_bytes_and_none_turns_it_off() {
    let len = 1 << 20;
    let sent = job(2, &[], |r, kv| {
        let grad = NDArray::full(&[len], (r + 1) as f64, DType::F32);
        let mut out = NDArray::zeros(&[len], DType::F32);
        let mut bytes = Vec::new();
        for params in [
            fp16(),
            CompressionParams::from([("type".into(), "none".into())]),
        ] {
            kv.set_gradient_compression(&params).unwrap();
            let before = kv.bytes_sent();
            kv.pushpull(7, &grad, &mut out).unwrap();
            bytes.push(kv.bytes_sent() - before);
            assert_eq!(out.to_f64_vec(), vec![3.0; len]);
        }
        bytes
    });
    for (rank, bytes) in sent.iter().enumerate() {
        let (compressed, plain) = (bytes[0] as f64, bytes[1] as f64);
        // 2 (n - 1) / n of the tensor each way: 4 MiB of float32, 2 MiB of float16.
        assert!(
            plain >= 4.0 * (1 << 20) as f64,
            "rank {rank}: {plain} bytes plain"
        );
        let ratio = compressed / plain;
        assert!((0.49..0.51).contains(&ratio), "rank {rank}: {bytes:?}");
    }
}

#[test]
fn workers_that_disagree_fail_naming_the_key_and_the_dtypes() {
    let errors = job(2, &[], |r, kv| {
        if r == 0 {
            kv.set_gradient_compression(&fp16()).unwrap();
        }
        let mut out = NDArray::zeros(&[3], DType::F32);
        let e = kv
            .pushpull("w", &NDArray::ones(&[3], DType::F32), &mut out)
            .unwrap_err();
        assert_eq!(out.to_f64_vec(), vec![0.0; 3], "no output written");
        // Nobody leaves before both have their answer.
        kv.barrier().unwrap();
        chain(&e)
    });
    for e in errors {
        assert!(e.contains("w"), "{e}");
        assert!(e.contains("float16") && e.contains("float32"), "{e}");
    }
}

#[test]
fn mxnets_codecs_are_unsupported_and_bad_parameters_refused() {
    job(1, &[], |_, kv| {
        let params = |pairs: &[(&str, &str)]| -> CompressionParams {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let e = kv
            .set_gradient_compression(&params(&[("type", "2bit"), ("threshold", "0.5")]))
            .unwrap_err();
        assert!(matches!(e.root(), Error::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("fp16"), "{e}");
        for bad in [
            params(&[("type", "fp32")]),
            params(&[]),
            params(&[("type", "fp16"), ("threshold", "0.5")]),
        ] {
            let e = kv.set_gradient_compression(&bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            assert!(e.to_string().contains("horovod"), "{e}");
        }
        // A refused setting leaves the store as it was: uncompressed.
        let mut out = NDArray::zeros(&[1], DType::F32);
        kv.pushpull(1, &NDArray::full(&[1], 1.0 + 1e-4, DType::F32), &mut out)
            .unwrap();
        assert_eq!(out.to_vec::<f32>().unwrap(), vec![1.0 + 1e-4]);
    });
}
