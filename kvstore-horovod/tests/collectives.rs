//! The `horovod` store's own checks, on jobs of 2 to 4 workers on threads of this process:
//! exact sums in every dtype and for awkward sizes, fusion of many keys, broadcast, keys
//! listed in different orders and calls on different ranks, mismatches, the stall inspector,
//! the ring's traffic, and what the store does not support.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvstore_base::{
    Capability, DType, Error, KVStoreBase, KVStoreExt, Key, NDArray, OptimizerSpec,
};
mod common;

use common::{chain, job, TIMEOUT};
use kvstore_horovod::LocalJob;

/// Element `i` of rank `r`'s value: small integers, so that every sum is exact in every dtype.
fn element(dtype: DType, i: usize, r: usize) -> f64 {
    match dtype {
        DType::U8 => ((i % 5) + r) as f64,
        DType::F16 | DType::BF16 => ((i % 7) as f64) - 2.0 + r as f64,
        DType::F32 | DType::F64 => (i % 1000) as f64 - 300.0 + 0.5 * r as f64,
        _ => (i % 1000) as f64 - 300.0 + r as f64,
    }
}

fn value(dtype: DType, len: usize, r: usize) -> NDArray {
    let v: Vec<f64> = (0..len).map(|i| element(dtype, i, r)).collect();
    NDArray::from_vec(&[len], v).unwrap().astype(dtype)
}

#[test]
fn pushpull_sums_exactly_in_every_dtype_and_size() {
    let sizes = [0usize, 1, 2, 3, 5, 7, 1000, 30_011];
    for n in [2, 3, 4] {
        job(n, &[], |r, kv| {
            for &dtype in &DType::ALL {
                for &len in &sizes {
                    let key = Key::from(len as i64);
                    let mut out = NDArray::zeros(&[len], dtype);
                    kv.pushpull(key.clone(), &value(dtype, len, r), &mut out)
                        .unwrap();
                    let expected: Vec<f64> = (0..len)
                        .map(|i| (0..n).map(|w| element(dtype, i, w)).sum())
                        .collect();
                    assert_eq!(
                        out.to_f64_vec(),
                        expected,
                        "{dtype}, {len} elements, {n} workers"
                    );
                }
            }
        });
    }
}

#[test]
fn big_tensors_travel_in_pieces_and_every_rank_gets_the_same_bits() {
    // 3 M float32 elements: chunks of 6 MB (2 workers), above the 4 MiB piece size.
    let len = 3_000_001;
    let sums = job(2, &[], |r, kv| {
        let v: Vec<f32> = (0..len)
            .map(|i| (i as f32).sqrt() * (r as f32 + 0.1))
            .collect();
        let mut out = NDArray::zeros(&[len], DType::F32);
        kv.pushpull("big", &NDArray::from_vec(&[len], v).unwrap(), &mut out)
            .unwrap();
        out
    });
    assert_eq!(sums[0], sums[1], "bit-identical on every rank");
    let s = sums[0].as_slice::<f32>().unwrap();
    for i in [0, 1, 12345, len - 1] {
        let x = (i as f32).sqrt();
        assert!(
            (s[i] - (x * 0.1 + x * 1.1)).abs() <= 1e-3 * x.max(1.0),
            "element {i}"
        );
    }
}

#[test]
fn many_small_keys_of_one_call_are_fused() {
    let keys: Vec<i32> = (0..500).collect();
    let shape = |k: i32| vec![(k % 5 + 1) as usize];
    let run = |threshold: &str| {
        job(3, &[("HOROVOD_FUSION_THRESHOLD", threshold)], |r, kv| {
            let values: Vec<NDArray> = keys
                .iter()
                .map(|&k| NDArray::full(&shape(k), (k + r as i32) as f64, DType::F32))
                .collect();
            let mut outs: Vec<NDArray> = keys
                .iter()
                .map(|&k| NDArray::zeros(&shape(k), DType::F32))
                .collect();
            let before = kv.bytes_sent();
            kv.pushpull(&keys, &values, &mut outs).unwrap();
            for (&k, out) in keys.iter().zip(&outs) {
                assert!(
                    out.to_f64_vec().iter().all(|&x| x == (3 * k + 3) as f64),
                    "key {k}"
                );
            }
            kv.bytes_sent() - before
        })
    };
    let data: u64 = keys.iter().map(|&k| shape(k)[0] as u64 * 4).sum();
    let fused = run("67108864");
    let unfused = run("0");
    for (r, (&f, &u)) in fused.iter().zip(&unfused).enumerate() {
        // Fused: 4 messages (2 (n - 1)) of one buffer; unfused: up to 4 per key.
        assert!(
            f <= data * 4 / 3 + 4 * 48 + 8,
            "rank {r} sent {f} bytes fused"
        );
        assert!(
            u > f + 500 * 48,
            "rank {r} sent {u} bytes unfused, {f} fused"
        );
    }
}

#[test]
fn a_fused_group_of_big_and_small_tensors_sums_exactly_in_one_ring_operation() {
    // Big tensors take part in place, runs of small ones are packed: both in one group, with
    // pieces that end at every tensor's end, chunk borders inside tensors, and an empty one.
    let sizes = [300_001usize, 10, 0, 70_000, 5, 6, 2_000_003, 3];
    let n = 3;
    let results = job(n, &[], |r, kv| {
        let keys: Vec<i32> = (0..sizes.len() as i32).collect();
        let values: Vec<NDArray> = sizes.iter().map(|&len| value(DType::F32, len, r)).collect();
        let mut outs: Vec<NDArray> = sizes
            .iter()
            .map(|&len| NDArray::zeros(&[len], DType::F32))
            .collect();
        let before = kv.ring_operations();
        kv.pushpull(&keys, &values, &mut outs).unwrap();
        let bcast: Vec<NDArray> = sizes.iter().map(|&len| value(DType::F32, len, r)).collect();
        let mut got: Vec<NDArray> = sizes
            .iter()
            .map(|&len| NDArray::zeros(&[len], DType::F32))
            .collect();
        kv.broadcast(&keys, &bcast, &mut got).unwrap();
        (kv.ring_operations() - before, outs, got)
    });
    for (r, (ops, outs, got)) in results.into_iter().enumerate() {
        assert_eq!(ops, 2, "rank {r}: one all-reduce and one broadcast");
        for (k, (&len, (out, b))) in sizes.iter().zip(outs.iter().zip(&got)).enumerate() {
            let expected: Vec<f64> = (0..len)
                .map(|i| (0..n).map(|q| element(DType::F32, i, q)).sum())
                .collect();
            assert!(out.to_f64_vec() == expected, "rank {r}, key {k}: sum");
            let root: Vec<f64> = (0..len).map(|i| element(DType::F32, i, 0)).collect();
            assert!(b.to_f64_vec() == root, "rank {r}, key {k}: broadcast");
        }
    }
}

#[test]
fn broadcast_copies_rank_0s_value_into_every_output() {
    for n in [2, 3] {
        job(n, &[], |r, kv| {
            let big = 5_000_000; // above the piece size
            let values = [
                NDArray::full(&[2, 3], 10.0 + r as f64, DType::F32),
                NDArray::full(&[big], 1.0 + r as f64, DType::U8),
                NDArray::zeros(&[0], DType::F64),
            ];
            let mut outs = vec![
                vec![NDArray::zeros(&[2, 3], DType::F64); 2],
                vec![NDArray::zeros(&[big], DType::U8)],
                vec![NDArray::zeros(&[0], DType::F64)],
            ];
            kv.broadcast(&[1, 2, 3], &values, &mut outs).unwrap();
            assert!(outs[0][0].to_f64_vec().iter().all(|&x| x == 10.0));
            assert_eq!(outs[0][0], outs[0][1]);
            assert_eq!(outs[0][0].dtype(), DType::F64);
            assert!(outs[1][0].as_slice::<u8>().unwrap().iter().all(|&x| x == 1));
        });
    }
}

#[test]
fn ranks_may_list_and_split_keys_differently() {
    job(3, &[], |r, kv| {
        let keys: Vec<i32> = match r {
            0 => vec![1, 2, 3],
            1 => vec![3, 1, 2],
            _ => vec![2, 3, 1],
        };
        let values: Vec<NDArray> = keys
            .iter()
            .map(|&k| NDArray::full(&[4], (10 * k) as f64 + r as f64, DType::F32))
            .collect();
        let mut outs = vec![NDArray::zeros(&[4], DType::F32); 3];
        kv.pushpull(&keys, &values, &mut outs).unwrap();
        for (&k, out) in keys.iter().zip(&outs) {
            assert!(out.to_f64_vec().iter().all(|&x| x == (30 * k + 3) as f64));
        }
        // Rank 0 reduces keys 5 and 6 in two calls, the others in one.
        let v = |k: i32| NDArray::full(&[2], k as f64, DType::I64);
        if r == 0 {
            for k in [5, 6] {
                let mut out = NDArray::zeros(&[2], DType::I64);
                kv.pushpull(k, &v(k), &mut out).unwrap();
                assert_eq!(out.to_f64_vec(), vec![3.0 * k as f64; 2]);
            }
        } else {
            let mut outs = vec![NDArray::zeros(&[2], DType::I64); 2];
            kv.pushpull(&[6, 5], &[v(6), v(5)], &mut outs).unwrap();
            assert_eq!(outs[0].to_f64_vec(), vec![18.0; 2]);
            assert_eq!(outs[1].to_f64_vec(), vec![15.0; 2]);
        }
    });
}

#[test]
fn mismatched_shapes_fail_on_every_rank_naming_the_key() {
    job(
        2,
        &[("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "5")],
        |r, kv| {
            let mut out = NDArray::zeros(&[2 + r], DType::F32);
            let e = kv
                .pushpull(5, &NDArray::ones(&[2 + r], DType::F32), &mut out)
                .unwrap_err();
            assert_eq!(e.key(), Some(&Key::from(5)), "{e}");
            let text = format!("{e}: {:?}", std::error::Error::source(&e));
            assert!(text.contains("mismatched shapes"), "{text}");
            // The store goes on.
            let mut out = NDArray::zeros(&[1], DType::F32);
            kv.pushpull(6, &NDArray::ones(&[1], DType::F32), &mut out)
                .unwrap();
            assert_eq!(out.to_f64_vec(), vec![2.0]);
        },
    );
}

#[test]
fn a_tensor_submitted_by_only_some_ranks_fails_naming_the_missing_ranks() {
    for stalled in [0usize, 1] {
        let (tx, rx) = mpsc::channel::<()>();
        let rx = std::sync::Mutex::new(rx);
        job(
            2,
            &[("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "1")],
            |r, kv| {
                if r == stalled {
                    let start = Instant::now();
                    let mut out = NDArray::zeros(&[3], DType::F32);
                    let e = kv
                        .pushpull(7, &NDArray::ones(&[3], DType::F32), &mut out)
                        .unwrap_err();
                    let took = start.elapsed();
                    let text = chain(&e);
                    let other = 1 - stalled;
                    assert_eq!(e.key(), Some(&Key::from(7)), "{text}");
                    assert!(
                        text.contains(&format!("rank {other} did not submit it"))
                            && text.contains("tensor 7")
                            && text.contains(&format!("Missing ranks: {other}: [7]")),
                        "{text}"
                    );
                    assert!(
                        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
                        "{took:?}"
                    );
                    assert_eq!(out.to_f64_vec(), vec![0.0; 3], "the out is untouched");
                    tx.send(()).unwrap();
                } else {
                    // The other rank never submits key 7; it waits until the error came.
                    rx.lock().unwrap().recv().unwrap();
                }
                // Both go on.
                let mut out = NDArray::zeros(&[1], DType::F32);
                kv.pushpull(8, &NDArray::ones(&[1], DType::F32), &mut out)
                    .unwrap();
                assert_eq!(out.to_f64_vec(), vec![2.0]);
            },
        );
    }
}

/// A rank that submits a tensor after the others gave up on it (stall shutdown) fails at once
/// with their error, rather than join the record of their next round (which would sum its
/// late value with their next step's, every call succeeding); the next round is exact.
#[test]
fn a_late_rank_fails_at_once_and_the_next_round_sums_one_step() {
    let late = job(
        2,
        &[("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "1")],
        |r, kv| {
            let mut out = NDArray::zeros(&[2], DType::F32);
            let value = |v: f32| NDArray::full(&[2], f64::from(v), DType::F32);
            if r == 0 {
                let e = kv.pushpull(7, &value(1.0), &mut out).unwrap_err();
                assert!(chain(&e).contains("stall inspector"), "{}", chain(&e));
                // The retry of the step, while rank 1 is still away.
                kv.pushpull(7, &value(2.0), &mut out).unwrap();
                assert_eq!(out.to_f64_vec(), vec![22.0; 2]);
                None
            } else {
                std::thread::sleep(Duration::from_millis(1500));
                let started = Instant::now();
                let e = kv.pushpull(7, &value(10.0), &mut out).unwrap_err();
                let took = started.elapsed();
                // Its own next step meets rank 0's retry.
                kv.pushpull(7, &value(20.0), &mut out).unwrap();
                assert_eq!(out.to_f64_vec(), vec![22.0; 2]);
                Some((chain(&e), took))
            }
        },
    );
    let (text, took) = late[1].clone().unwrap();
    assert!(
        text.contains("stall inspector") && text.contains("tensor 7"),
        "{text}"
    );
    assert!(took < Duration::from_millis(900), "{took:?}");
}

/// Past the stall check time a stalled tensor is only logged, as Horovod's stall check does:
/// the late rank's call and its peers' succeed.
#[test]
fn the_stall_check_time_only_warns() {
    let sums = job(
        2,
        &[("HOROVOD_STALL_CHECK_TIME_SECONDS", "0.3")],
        |r, kv| {
            if r == 1 {
                std::thread::sleep(Duration::from_millis(800));
            }
            let mut out = NDArray::zeros(&[1], DType::F32);
            kv.pushpull(3, &NDArray::ones(&[1], DType::F32), &mut out)
                .unwrap();
            out.to_f64_vec()
        },
    );
    assert_eq!(sums, vec![vec![2.0], vec![2.0]]);
}

#[test]
fn each_worker_sends_2_n_minus_1_over_n_of_the_tensor() {
    for n in [2usize, 3, 4] {
        let len = 1_000_000; // 4 MB of float32
        let sent = job(n, &[], |_, kv| {
            let before = kv.bytes_sent();
            let mut out = NDArray::zeros(&[len], DType::F32);
            kv.pushpull(1, &NDArray::ones(&[len], DType::F32), &mut out)
                .unwrap();
            assert!(out.to_f64_vec().iter().all(|&x| x == n as f64));
            kv.bytes_sent() - before
        });
        let theory = 2.0 * (n - 1) as f64 / n as f64 * (len * 4) as f64;
        for (r, s) in sent.into_iter().enumerate() {
            let ratio = s as f64 / theory;
            assert!(
                (1.0..1.001).contains(&ratio),
                "rank {r} of {n}: {s} bytes vs {theory}"
            );
        }
    }
}

#[test]
fn what_horovod_does_not_have_is_unsupported() {
    job(2, &[], |_, kv| {
        assert!(kv.is_capable(Capability::Distributed));
        for c in [
            Capability::Optimizer,
            Capability::InitPushPull,
            Capability::Updater,
            Capability::GradientCompression,
            Capability::RowSparse,
            Capability::OptimizerStates,
        ] {
            assert!(!kv.is_capable(c), "{c}");
        }
        let unsupported = |e: Error| matches!(e.root(), Error::Unsupported { .. });
        let a = NDArray::ones(&[2], DType::F32);
        let mut out = NDArray::zeros(&[2], DType::F32);
        assert!(unsupported(kv.init(1, &a).unwrap_err()));
        assert!(unsupported(kv.push(1, &a).unwrap_err()));
        assert!(unsupported(kv.pull(1, &mut out).unwrap_err()));
        assert!(unsupported(
            kv.set_optimizer(&OptimizerSpec::new("sgd")).unwrap_err()
        ));
        assert_eq!(kv.num_workers(), 2);
        kv.barrier().unwrap();
    });
}

#[test]
fn created_by_name_through_the_registry() {
    let job = LocalJob::start(1, TIMEOUT).unwrap();
    let kv: Box<dyn KVStoreBase> = job.create_worker().unwrap();
    assert_eq!(kv.type_name(), "horovod");
    assert_eq!((kv.rank(), kv.num_workers()), (0, 1));
    let mut out = NDArray::zeros(&[2], DType::F32);
    kv.pushpull_in_place(3, std::slice::from_mut(&mut out))
        .unwrap();
    drop(kv);
    job.finish().unwrap();
}

#[test]
fn a_job_launched_with_a_server_leaves_it_idle_and_ends_cleanly() {
    // As `kvstore launch -s 1`: the workers greet the server, never use it, and say goodbye.
    let cluster = kvstore_dist::LocalCluster::start(1, 2, TIMEOUT).unwrap();
    let options = cluster.worker_options().clone();
    std::thread::scope(|s| {
        for _ in 0..2 {
            let options = options.clone();
            s.spawn(move || {
                let kv = kvstore_base::create_with(
                    "horovod",
                    options
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
                .unwrap();
                let mut out = NDArray::zeros(&[2], DType::F32);
                kv.pushpull(1, &NDArray::ones(&[2], DType::F32), &mut out)
                    .unwrap();
                assert_eq!(out.to_f64_vec(), vec![2.0, 2.0]);
            });
        }
    });
    cluster.finish().unwrap();
}

#[test]
fn a_message_limit_below_what_the_ring_needs_is_refused_before_joining() {
    // No scheduler listens: the refusal comes first, at once.
    let options = [
        ("DMLC_PS_ROOT_URI", "127.0.0.1"),
        ("DMLC_PS_ROOT_PORT", "9"),
        ("DMLC_NUM_WORKER", "2"),
        ("KVSTORE_MAX_MESSAGE_BYTES", "1048576"),
    ];
    let started = Instant::now();
    let e = kvstore_base::create_with(
        "horovod",
        options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("KVSTORE_MAX_MESSAGE_BYTES is 1048576 bytes") && text.contains("16777216"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_rank_submitting_after_a_mismatch_failed_the_tensor_fails_at_once_too() {
    // Ranks 0 and 1 disagree on key 5's shape; rank 2 comes later. Its submission fails at
    // once with the same message, not after the stall time (60 s here).
    let texts = job(
        3,
        &[("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "60")],
        |r, kv| {
            let shape = if r == 1 { 3 } else { 2 };
            if r == 2 {
                std::thread::sleep(Duration::from_millis(500));
            }
            let started = Instant::now();
            let mut out = NDArray::zeros(&[shape], DType::F32);
            let e = kv
                .pushpull(5, &NDArray::ones(&[shape], DType::F32), &mut out)
                .unwrap_err();
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "rank {r} waited"
            );
            // The key works again afterwards, on every rank.
            let mut out = NDArray::zeros(&[2], DType::F32);
            kv.pushpull(5, &NDArray::ones(&[2], DType::F32), &mut out)
                .unwrap();
            assert_eq!(out.to_f64_vec(), vec![3.0, 3.0]);
            chain(&e)
        },
    );
    for (r, text) in texts.iter().enumerate() {
        assert!(text.contains("mismatched shapes"), "rank {r}: {text}");
    }
}
