//! MXNet 1.9.1's 2-bit gradient compression on `pslite_dist_sync`, in jobs of this crate's own
//! scheduler and servers (no MXNet needed; `mxnet_jobs` runs it against MXNet's servers and
//! beside MXNet's Python workers): pushes are quantised with error feedback on each worker and
//! the servers sum what they dequantise, for keys whole on one server and keys cut across two.
use std::collections::BTreeMap;
use std::time::Duration;

use kvstore_base::{CompressionParams, DType, Error, KVStoreBase, KVStoreExt, NDArray};
use kvstore_pslite::{LocalJob, NAME};

mod common;

use common::two_bit::sent;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Worker `rank`'s value of `key` in `round`: multiples of 1/8 in [-1, 1), so that every
/// residual and sum below is exact.
fn value(key: i64, round: usize, rank: usize, i: usize) -> f32 {
    ((i * 7 + round * 13 + rank * 5 + key as usize) % 17) as f32 / 8.0 - 1.0
}

fn values(key: i64, round: usize, rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| value(key, round, rank, i)).collect()
}

fn two_bit(threshold: &str) -> CompressionParams {
    [("type", "2bit"), ("threshold", threshold)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A job of `servers` servers and `workers` workers, arrays of 1,000 elements or more cut
/// across the servers.
fn start(servers: usize, workers: usize) -> (LocalJob, Vec<Box<dyn KVStoreBase>>) {
    let job = LocalJob::start(servers, workers, TIMEOUT).unwrap();
    let mut options: BTreeMap<String, String> = job.worker_options().clone();
    options.insert("MXNET_KVSTORE_BIGARRAY_BOUND".into(), "1000".into());
    let stores =
        kvstore_test::create_workers(workers, || kvstore_base::create_with(NAME, options.clone()))
            .unwrap();
    (job, stores)
}

/// Each worker leaves on a thread of its own (leaving is a barrier of them all), then the
/// scheduler and servers must end without an error.
fn end(job: LocalJob, stores: Vec<Box<dyn KVStoreBase>>) {
    std::thread::scope(|s| {
        for kv in stores {
            s.spawn(move || drop(kv));
        }
    });
    job.join().unwrap();
}

#[test]
fn compressed_pushes_sum_what_the_servers_dequantise() {
    const KEYS: &[(i64, usize)] = &[(3, 20), (10, 3000)];
    let (job, stores) = start(2, 2);
    let threshold = 0.5;
    std::thread::scope(|s| {
        for kv in &stores {
            s.spawn(move || {
                kv.set_gradient_compression(&two_bit("0.5")).unwrap();
                let rank = kv.rank();
                for &(key, n) in KEYS {
                    let init = NDArray::from_vec(&[n], values(key, 99, rank, n)).unwrap();
                    kv.init(key, &init).unwrap();
                    // Pulls stay uncompressed: rank 0's value, exactly.
                    let mut out = NDArray::zeros(&[n], DType::F32);
                    kv.pull(key, &mut out).unwrap();
                    assert_eq!(
                        out.to_f64_vec(),
                        NDArray::from_vec(&[n], values(key, 99, 0, n))
                            .unwrap()
                            .to_f64_vec()
                    );
                }
                // Every worker's residuals, replayed.
                let mut residuals: BTreeMap<(usize, i64), Vec<f32>> = BTreeMap::new();
                for round in 0..4 {
                    for &(key, n) in KEYS {
                        let mine = values(key, round, rank, n);
                        if key == 3 && round == 1 {
                            // Two device values, summed on the worker before quantisation.
                            let half = NDArray::full(&[n], 0.5, DType::F32);
                            let rest: Vec<f32> = mine.iter().map(|v| v - 0.5).collect();
                            let rest = NDArray::from_vec(&[n], rest).unwrap();
                            kv.push(key, &[half, rest][..]).unwrap();
                        } else {
                            kv.push(key, &NDArray::from_vec(&[n], mine).unwrap())
                                .unwrap();
                        }
                        let mut out = NDArray::zeros(&[n], DType::F32);
                        kv.pull(key, &mut out).unwrap();
                        let mut want = vec![0.0f32; n];
                        for r in 0..2 {
                            let residual =
                                residuals.entry((r, key)).or_insert_with(|| vec![0.0; n]);
                            let grad = values(key, round, r, n);
                            for (w, v) in want.iter_mut().zip(sent(&grad, residual, threshold)) {
                                *w += v;
                            }
                        }
                        let want: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
                        assert_eq!(out.to_f64_vec(), want, "key {key}, round {round}");
                    }
                }
            });
        }
    });
    end(job, stores);
}

#[test]
fn compression_is_refused_where_mxnet_would_fail() {
    let (job, stores) = start(2, 1);
    let kv = &stores[0];
    // Parameters are checked as MXNet checks them.
    let e = kv.set_gradient_compression(&two_bit("-1")).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let one_bit = [("type".to_string(), "1bit".to_string())]
        .into_iter()
        .collect();
    let e = kv.set_gradient_compression(&one_bit).unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("1-bit"),
        "{e}"
    );
    // After an init compression is refused, naming the key (rank 0 alone tells the servers,
    // and only init's barrier orders that before the others' pushes); the key still works.
    kv.init(20, &NDArray::zeros(&[3000], DType::F32)).unwrap();
    let e = kv
        .set_gradient_compression(&two_bit("0.5"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("after key 20 was initialised"), "{e}");
    kv.push(20, &NDArray::full(&[3000], 0.25, DType::F32))
        .unwrap();
    let mut big = NDArray::zeros(&[3000], DType::F32);
    kv.pull(20, &mut big).unwrap();
    assert!(big.to_f64_vec().iter().all(|&v| v == 0.25));
    end(job, stores);

    let (job, stores) = start(2, 1);
    let kv = &stores[0];
    kv.set_gradient_compression(&two_bit("0.5")).unwrap();
    kv.init(1, &NDArray::zeros(&[4], DType::F32)).unwrap();
    // MXNet compresses float32 only, and has no compressed pushpull.
    let e = kv
        .init(2, &NDArray::zeros(&[4], DType::F16))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("key 2") && e.contains("float32 keys only"),
        "{e}"
    );
    let one = NDArray::ones(&[4], DType::F32);
    let mut out = NDArray::zeros(&[4], DType::F32);
    let e = kv.pushpull(1, &one, &mut out).unwrap_err().to_string();
    assert!(e.contains("pushpull with gradient compression"), "{e}");
    // The key works: 1.0 sends +0.5 and keeps 0.5, then 0.5 more sends +0.5 again.
    for _ in 0..2 {
        kv.push(1, &one).unwrap();
        kv.pull(1, &mut out).unwrap();
        assert_eq!(out.to_f64_vec(), vec![0.5; 4]);
    }
    end(job, stores);
}

#[test]
fn a_compressed_push_sends_a_sixteenth_of_the_bytes() {
    let n = 1 << 20; // 4 MiB of float32
                     // The bytes one push of `n` ones sends, in a job of its own, with `compression` or none.
    let push = |compression: Option<&CompressionParams>| {
        let job = LocalJob::start(1, 1, TIMEOUT).unwrap();
        let config = kvstore_dist::DistConfig::from_vars(job.worker_options().clone()).unwrap();
        let kv = kvstore_pslite::PsLiteStore::connect(NAME, &config).unwrap();
        if let Some(params) = compression {
            kv.set_gradient_compression(params).unwrap();
        }
        kv.init(1, &NDArray::zeros(&[n], DType::F32)).unwrap();
        let before = kv.bytes_sent();
        kv.push(1, &NDArray::full(&[n], 1.0, DType::F32)).unwrap();
        let sent = kv.bytes_sent() - before;
        drop(kv);
        job.join().unwrap();
        sent
    };
    let plain = push(None);
    let compressed = push(Some(&two_bit("0.5")));
    let value = 4 * n as u64;
    assert!(plain >= value && plain < value + 1024, "{plain} bytes");
    assert!(
        compressed >= value / 16 && compressed < value / 16 + 1024,
        "{compressed} bytes"
    );
    println!(
        "a push of {value} bytes: {plain} bytes sent plain, {compressed} with 2-bit ({:.1}x fewer)",
        plain as f64 / compressed as f64
    );
}
