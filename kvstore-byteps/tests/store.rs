//! The `byteps` store end to end, as threads of one process over real sockets on 127.0.0.1:
//! a scheduler and dist servers from [`LocalCluster`], `byteps` workers.

mod common;

use common::{create, f32s, run, TIMEOUT};
use std::thread;
use std::time::Duration;

use kvstore_base::{Capability, DType, Error, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_byteps::partition::partition_key;
use kvstore_dist::LocalCluster;

#[test]
fn registered_with_its_capabilities() {
    let info = kvstore_base::registered()
        .into_iter()
        .find(|r| r.name == "byteps")
        .expect("byteps is registered");
    let caps = info.capabilities.expect("declared");
    assert!(caps.contains(&Capability::Distributed));
    assert!(caps.contains(&Capability::InitPushPull));
    assert!(!caps.contains(&Capability::Optimizer));
}

#[test]
fn pushpull_sums_a_partitioned_tensor_across_workers_and_servers() {
    let n = 10_000; // 10 partitions of 1000 float32
    let out = run(2, 3, &[("BYTEPS_PARTITION_BYTES", "4000")], move |kv| {
        let r = kv.rank();
        kv.init("w", &NDArray::zeros(&[100, 100], DType::F32))
            .unwrap();
        kv.init("b", &NDArray::full(&[5], 7.0, DType::F32)).unwrap();
        let parts = kv.partitions("w").unwrap();
        let g: Vec<f32> = (0..n)
            .map(|i| (i % 1000) as f32 * (r as f32 + 1.0))
            .collect();
        let grads = [
            NDArray::from_vec(&[100, 100], g).unwrap(),
            NDArray::full(&[5], 1.0, DType::F32),
        ];
        let mut outs = [
            NDArray::zeros(&[100, 100], DType::F32),
            NDArray::zeros(&[5], DType::F64),
        ];
        let before = kv.bytes_sent();
        kv.pushpull(&["w", "b"][..], &grads, &mut outs).unwrap();
        let sent = kv.bytes_sent() - before;
        // Device values are summed on the worker first.
        let mut dev = NDArray::zeros(&[5], DType::F32);
        kv.pushpull(
            "b",
            &[
                NDArray::full(&[5], 1.0, DType::F32),
                NDArray::full(&[5], 2.0, DType::F32),
            ][..],
            &mut dev,
        )
        .unwrap();
        (
            parts,
            f32s(&outs[0]),
            outs[1].to_vec::<f64>().unwrap(),
            sent,
            f32s(&dev),
        )
    });
    for (parts, big, small, sent, dev) in out {
        assert_eq!(parts.len(), 10);
        assert!(parts.iter().any(|p| p.server == 0) && parts.iter().any(|p| p.server == 1));
        // "w" was declared first: partition keys (0 << 16) + i.
        assert_eq!(parts[3].key, partition_key(0, 3));
        assert!(big
            .iter()
            .enumerate()
            .all(|(i, &v)| v == (i % 1000) as f32 * 6.0));
        assert_eq!(small, vec![3.0; 5]);
        assert_eq!(dev, vec![9.0; 5]);
        // Each worker sends its 40,020 bytes once (plus headers), as a parameter server.
        assert!(
            (40_020..40_020 + 64 * 24).contains(&(sent as usize)),
            "{sent} bytes"
        );
    }
}

#[test]
fn a_call_of_many_small_tensors_travels_in_batches() {
    // 1000 tensors of 4 float32 on 2 servers: init, pushpull (a push and a pull batch per
    // server) and pull each cost about one message per server, not one per tensor, with or
    // without a scheduling credit (all 1000 fit in it: granted at once, batched). Sums as
    // BytePS gives them.
    for (extra, label) in [
        (&[][..], "no credit"),
        (&[("BYTEPS_SCHEDULING_CREDIT", "4")][..], "credit 4"),
    ] {
        let out = run(2, 2, extra, |kv| {
            let keys: Vec<i32> = (0..1000).collect();
            let scale = kv.rank() as f64 + 1.0;
            let values: Vec<NDArray> = keys
                .iter()
                .map(|&k| NDArray::full(&[4], k as f64 * scale, DType::F32))
                .collect();
            let mut outs: Vec<NDArray> = keys
                .iter()
                .map(|_| NDArray::zeros(&[4], DType::F32))
                .collect();
            let count = |call: &mut dyn FnMut()| {
                let before = kv.requests_sent();
                call();
                kv.requests_sent() - before
            };
            let init = count(&mut || kv.init(&keys[..], &values).unwrap());
            let pushpull = count(&mut || kv.pushpull(&keys[..], &values, &mut outs).unwrap());
            let mut pulled: Vec<NDArray> = keys
                .iter()
                .map(|_| NDArray::zeros(&[4], DType::F32))
                .collect();
            let pull = count(&mut || kv.pull(&keys[..], &mut pulled).unwrap());
            let summed = outs
                .iter()
                .chain(&pulled)
                .enumerate()
                .all(|(i, o)| f32s(o) == vec![3.0 * (i % 1000) as f32; 4]);
            ([init, pushpull, pull], summed)
        });
        for (rank, (requests, summed)) in out.into_iter().enumerate() {
            assert!(summed, "rank {rank}: wrong sums");
            assert_eq!(
                requests,
                [2, 4, 2],
                "rank {rank}: init, pushpull, pull ({label})"
            );
        }
    }
}

#[test]
fn push_then_pull_sees_the_round_sum_and_init_keeps_rank_0s_value() {
    let out = run(1, 2, &[("BYTEPS_PARTITION_BYTES", "8")], |kv| {
        let r = kv.rank() as f64;
        kv.init(3, &NDArray::full(&[2, 3], 10.0 + r, DType::F32))
            .unwrap();
        let mut w = NDArray::zeros(&[2, 3], DType::F32);
        kv.pull(3, &mut w).unwrap();
        let init = f32s(&w);
        kv.push(3, &NDArray::full(&[2, 3], r + 1.0, DType::F32))
            .unwrap();
        kv.pull(3, &mut w).unwrap();
        (init, f32s(&w))
    });
    for (init, summed) in out {
        assert_eq!(init, vec![10.0; 6]);
        assert_eq!(summed, vec![3.0; 6]);
    }
}

#[test]
fn broadcast_is_rank_0s_value_even_for_declared_keys() {
    let out = run(2, 3, &[("BYTEPS_PARTITION_BYTES", "16")], |kv| {
        let r = kv.rank() as f64;
        let mut got = Vec::new();
        for round in 0..2 {
            // Round 0 declares key 7; round 1 broadcasts into the declared key.
            let value = NDArray::from_vec(
                &[10],
                (0..10)
                    .map(|i| (i as f64 + 100.0 * r + 1000.0 * round as f64) as f32)
                    .collect(),
            )
            .unwrap();
            let mut out = NDArray::zeros(&[10], DType::F64);
            kv.broadcast(7, &value, &mut out).unwrap();
            got.push(out.to_vec::<f64>().unwrap());
        }
        let mut pulled = NDArray::zeros(&[10], DType::F32);
        kv.pull(7, &mut pulled).unwrap();
        (got, f32s(&pulled))
    });
    for (got, pulled) in out {
        for (round, values) in got.iter().enumerate() {
            let expected: Vec<f64> = (0..10).map(|i| i as f64 + 1000.0 * round as f64).collect();
            assert_eq!(values, &expected, "round {round}");
        }
        assert_eq!(
            pulled,
            (0..10).map(|i| i as f32 + 1000.0).collect::<Vec<_>>()
        );
    }
}

#[test]
fn async_mode_adds_every_push_into_the_value() {
    let out = run(
        2,
        2,
        &[
            ("BYTEPS_ENABLE_ASYNC", "1"),
            ("BYTEPS_PARTITION_BYTES", "16"),
        ],
        |kv| {
            let r = kv.rank() as f64;
            kv.init("w", &NDArray::ones(&[12], DType::F32)).unwrap();
            kv.barrier().unwrap();
            // Weight deltas: rank r adds r + 1, twice.
            let delta = NDArray::full(&[12], r + 1.0, DType::F32);
            kv.push("w", &delta).unwrap();
            let mut mine = NDArray::zeros(&[12], DType::F32);
            kv.pushpull("w", &delta, &mut mine).unwrap();
            kv.barrier().unwrap();
            let mut w = NDArray::zeros(&[12], DType::F32);
            kv.pull("w", &mut w).unwrap();
            (f32s(&mine), f32s(&w))
        },
    );
    for (r, (mine, w)) in out.into_iter().enumerate() {
        // A pushpull answers at once with the value holding at least this worker's pushes.
        assert!(
            mine.iter().all(|&v| v >= 1.0 + 2.0 * (r as f32 + 1.0)),
            "{mine:?}"
        );
        assert_eq!(w, vec![1.0 + 2.0 * 1.0 + 2.0 * 2.0; 12]);
    }
}

#[test]
fn higher_priority_calls_go_first_under_the_credit() {
    // One worker, credit of one 64-byte partition; three concurrent calls of 4 partitions each.
    let out = run(
        1,
        1,
        &[
            ("BYTEPS_PARTITION_BYTES", "64"),
            ("BYTEPS_SCHEDULING_CREDIT", "1"),
        ],
        |kv| {
            let s = kv.scheduler().expect("credit is set");
            assert_eq!(s.credit(), 64);
            let keys = [0, 1, 2];
            for k in keys {
                kv.init(k, &NDArray::zeros(&[64], DType::F32)).unwrap();
            }
            s.record(true);
            // Hold the whole credit while the calls queue.
            let mut hold = s.enqueue(i32::MAX, &[(u64::MAX, 64)]);
            let held = hold.next_grant(TIMEOUT).unwrap().unwrap();
            let sums = thread::scope(|scope| {
                let calls: Vec<_> = [(0, -3), (1, 0), (2, -1)]
                    .into_iter()
                    .map(|(key, priority)| {
                        scope.spawn(move || {
                            let mut out = NDArray::zeros(&[64], DType::F32);
                            kv.pushpull_with_priority(
                                key,
                                &NDArray::full(&[64], key as f64 + 1.0, DType::F32),
                                &mut out,
                                priority,
                            )
                            .unwrap();
                            f32s(&out)
                        })
                    })
                    .collect();
                while s.waiting() < 12 {
                    thread::sleep(Duration::from_millis(1));
                }
                drop(held);
                calls
                    .into_iter()
                    .map(|c| c.join().unwrap())
                    .collect::<Vec<_>>()
            });
            (s.take_log(), sums)
        },
    );
    let (log, sums) = &out[0];
    for (key, sum) in sums.iter().enumerate() {
        assert_eq!(sum, &vec![key as f32 + 1.0; 64]);
    }
    // Key k was declared kth: its partitions are (k << 16) + i.
    let expected: Vec<(i32, u64)> = [(1u64, 0), (2, -1), (0, -3)]
        .into_iter()
        .flat_map(|(k, p)| (0..4).map(move |i| (p, partition_key(k, i))))
        .collect();
    assert_eq!(log[0], (i32::MAX, u64::MAX));
    assert_eq!(log[1..], expected[..]);
}

#[test]
fn a_push_that_gets_no_credit_in_time_fails_naming_its_key_and_what_held_the_credit() {
    let out = run(
        1,
        1,
        &[
            ("BYTEPS_PARTITION_BYTES", "64"),
            ("BYTEPS_SCHEDULING_CREDIT", "1"),
            ("KVSTORE_TIMEOUT_SECS", "0.3"),
        ],
        |kv| {
            let s = kv.scheduler().expect("credit is set");
            kv.init("w", &NDArray::zeros(&[32], DType::F32)).unwrap();
            let mut hold = s.enqueue(i32::MAX, &[(u64::MAX, 64)]);
            let held = hold.next_grant(TIMEOUT).unwrap().unwrap();
            let refused = kv
                .push("w", &NDArray::full(&[32], 1.0, DType::F32))
                .unwrap_err()
                .to_string();
            drop(held);
            // The credit is free again: the next push goes through.
            kv.push("w", &NDArray::full(&[32], 2.0, DType::F32))
                .unwrap();
            let mut w = NDArray::zeros(&[32], DType::F32);
            kv.pull("w", &mut w).unwrap();
            (refused, f32s(&w), s.waiting())
        },
    );
    let (refused, w, waiting) = &out[0];
    for needle in [
        "key \"w\"",
        "partition 0 got no scheduling credit",
        "64 bytes of earlier pushes",
        "64 bytes of credit",
        "push a key twice",
    ] {
        assert!(refused.contains(needle), "{needle:?} not in {refused}");
    }
    assert_eq!(w, &vec![2.0; 32]);
    assert_eq!(*waiting, 0);
}

#[test]
fn no_optimizer_and_bad_settings_are_refused() {
    let out = run(1, 1, &[], |kv| {
        assert!(!kv.is_capable(Capability::Optimizer));
        assert_eq!(kv.config().partition_bytes, 4_096_000);
        assert_eq!(kv.config().scheduling_credit, 0);
        assert!(kv.scheduler().is_none());
        let e = kv.set_optimizer(&OptimizerSpec::new("sgd")).unwrap_err();
        matches!(e, Error::Unsupported { .. })
    });
    assert!(out[0]);
    let cluster = LocalCluster::start(1, 1, TIMEOUT).unwrap();
    for (var, value) in [
        ("BYTEPS_PARTITION_BYTES", "0"),
        ("BYTEPS_SCHEDULING_CREDIT", "-1"),
        ("BYTEPS_ENABLE_ASYNC", "maybe"),
    ] {
        let mut options = cluster.worker_options().clone();
        options.insert(var.into(), value.into());
        let e = create(options).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains(var)),
            "{e}"
        );
    }
    // The cluster never got its worker: let it end on its own.
    cluster.detach();
}

#[test]
fn a_refused_broadcast_declares_no_key() {
    let out = run(1, 2, &[], |kv| {
        kv.init(3, &NDArray::zeros(&[2, 3], DType::F32)).unwrap();
        // Key 5 is new, key 3's value has the wrong shape: nothing may be declared.
        let (new, wrong) = (
            NDArray::ones(&[4], DType::F32),
            NDArray::ones(&[3, 2], DType::F32),
        );
        let mut outs = [
            NDArray::zeros(&[4], DType::F32),
            NDArray::zeros(&[3, 2], DType::F32),
        ];
        let err = kv
            .broadcast(&[5, 3], [&new, &wrong], &mut outs[..])
            .unwrap_err()
            .to_string();
        let mut pulled = NDArray::zeros(&[4], DType::F32);
        (err, kv.pull(5, &mut pulled).unwrap_err())
    });
    for (err, pull) in out {
        assert!(err.contains("key 3") && err.contains("[2, 3]"), "{err}");
        assert!(
            matches!(pull, Error::AtKey { .. }) && pull.to_string().contains("key 5"),
            "{pull}"
        );
    }
}

#[test]
fn a_message_limit_below_a_partition_is_refused_before_joining() {
    // No scheduler listens: the refusal comes first, at once.
    let options = [
        ("DMLC_PS_ROOT_URI", "127.0.0.1"),
        ("DMLC_PS_ROOT_PORT", "9"),
        ("DMLC_NUM_SERVER", "1"),
        ("DMLC_NUM_WORKER", "1"),
        ("KVSTORE_MAX_MESSAGE_BYTES", "8388608"),
        ("BYTEPS_PARTITION_BYTES", "33554432"),
    ];
    let started = std::time::Instant::now();
    let e = kvstore_base::create_with(
        "byteps",
        options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("KVSTORE_MAX_MESSAGE_BYTES is 8388608 bytes")
            && text.contains("33558528")
            && text.contains("BYTEPS_PARTITION_BYTES"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_pushpull_behind_the_workers_own_push_answers_the_round_that_holds_it() {
    // Rank 0 pushes, then push-pulls before rank 1 has pushed: its second push waits at the
    // servers for the next round, and so must its pull (before: answered with the first
    // round's sum, 3).
    let outs = run(1, 2, &[], |kv| {
        let shape = [1000];
        kv.init(4, &NDArray::zeros(&shape, DType::F32)).unwrap();
        let r = kv.rank() as f64;
        if r == 1.0 {
            thread::sleep(Duration::from_millis(300));
        }
        kv.push(4, &NDArray::full(&shape, r + 1.0, DType::F32))
            .unwrap();
        let mut out = NDArray::zeros(&shape, DType::F32);
        kv.pushpull(
            4,
            &NDArray::full(&shape, 10.0 * (r + 1.0), DType::F32),
            &mut out,
        )
        .unwrap();
        f32s(&out)
    });
    for (r, out) in outs.iter().enumerate() {
        assert!(out.iter().all(|&x| x == 30.0), "rank {r}: {:?}", &out[..4]);
    }
}

#[test]
fn an_async_broadcast_gives_rank_0s_value_and_refuses_a_key_already_declared() {
    let outs = run(1, 2, &[("BYTEPS_ENABLE_ASYNC", "1")], |kv| {
        let r = kv.rank() as f64;
        let mut out = NDArray::zeros(&[300], DType::F32);
        kv.broadcast(6, &NDArray::full(&[300], 5.0 + r, DType::F32), &mut out)
            .unwrap();
        let again = kv
            .broadcast(6, &NDArray::full(&[300], 1.0, DType::F32), &mut out)
            .unwrap_err()
            .to_string();
        kv.barrier().unwrap();
        (f32s(&out), again)
    });
    for (r, (out, again)) in outs.iter().enumerate() {
        assert!(out.iter().all(|&x| x == 5.0), "rank {r}: {:?}", &out[..4]);
        assert!(
            again.contains("key 6") && again.contains("BYTEPS_ENABLE_ASYNC"),
            "{again}"
        );
    }
}
