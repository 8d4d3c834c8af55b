//! Cycles (`HOROVOD_CYCLE_TIME`): several threads of each worker call the same store at once,
//! as MXNet's engine issues Horovod operations; their tensors are gathered into cycles and
//! fused across calls. Jobs of 2 and 3 workers on threads of this process. The checks count
//! (cycles, ring operations) rather than time: generous cycle times and barriers make the
//! threads of a worker meet in a cycle even on a loaded machine, and every bound is an error,
//! never a hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Barrier, Mutex};
use std::time::{Duration, Instant};

use kvstore_base::{create_with, DType, KVStoreBase, KVStoreExt, Key, NDArray};
mod common;

use common::{chain, job, TIMEOUT};
use kvstore_horovod::{HorovodConfig, HorovodStore, LocalJob};

/// Runs `thread(t)` for `t` in `0..threads` at once (after a barrier), returning their results
/// in order.
fn threads<T, F>(count: usize, thread: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    let barrier = Barrier::new(count);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .map(|t| {
                let (barrier, thread) = (&barrier, &thread);
                s.spawn(move || {
                    barrier.wait();
                    thread(t)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank `r`'s value of key `k`: every element `k + r`.
fn value(k: i32, r: usize, len: usize) -> NDArray {
    NDArray::full(&[len], (k + r as i32) as f64, DType::F32)
}

/// The sum of [`value`] over `n` ranks.
fn sum(k: i32, n: usize) -> f64 {
    (n as i32 * k + (0..n as i32).sum::<i32>()) as f64
}

/// One pushpull of key `k` on rank `r` of `n`, checked.
fn pushpull_checked(kv: &HorovodStore, k: i32, r: usize, n: usize) {
    let len = (k % 7 + 1) as usize;
    let mut out = NDArray::zeros(&[len], DType::F32);
    kv.pushpull(k, &value(k, r, len), &mut out)
        .unwrap_or_else(|e| panic!("key {k} on rank {r}: {e}"));
    assert_eq!(
        out.to_f64_vec(),
        vec![sum(k, n); len],
        "key {k} on rank {r}"
    );
}

#[test]
fn concurrent_calls_of_a_worker_are_gathered_into_cycles_and_fused() {
    let (n, per_rank, rounds) = (3, 4, 3);
    let calls = (per_rank * rounds) as u64;
    let counts = job(n, &[("HOROVOD_CYCLE_TIME", "50")], |r, kv| {
        kv.barrier().unwrap();
        threads(per_rank, |t| {
            for i in 0..rounds {
                pushpull_checked(kv, (10 * t + i) as i32, r, n);
            }
        });
        (kv.cycles(), kv.ring_operations())
    });
    for (r, &(cycles, ring)) in counts.iter().enumerate() {
        assert!(
            cycles < calls,
            "rank {r}: {cycles} cycles for {calls} calls"
        );
        assert!(
            ring < calls,
            "rank {r}: {ring} ring operations for {calls} calls"
        );
    }
    // Every rank runs every group.
    assert!(counts.iter().all(|c| c.1 == counts[0].1), "{counts:?}");
}

#[test]
fn without_fusion_every_tensor_is_a_ring_operation_of_its_own() {
    let (n, per_rank, rounds) = (2, 3, 2);
    let counts = job(
        n,
        &[
            ("HOROVOD_CYCLE_TIME", "50"),
            ("HOROVOD_FUSION_THRESHOLD", "0"),
        ],
        |r, kv| {
            threads(per_rank, |t| {
                for i in 0..rounds {
                    // Two keys per call.
                    let keys = [(100 * t + 2 * i) as i32, (100 * t + 2 * i + 1) as i32];
                    let values: Vec<NDArray> = keys.iter().map(|&k| value(k, r, 5)).collect();
                    let mut outs = vec![NDArray::zeros(&[5], DType::F32); 2];
                    kv.pushpull(&keys, &values, &mut outs).unwrap();
                    for (&k, out) in keys.iter().zip(&outs) {
                        assert_eq!(out.to_f64_vec(), vec![sum(k, n); 5]);
                    }
                }
            });
            kv.ring_operations()
        },
    );
    let tensors = (per_rank * rounds * 2) as u64;
    assert_eq!(counts, vec![tensors; n]);
}

#[test]
fn one_thread_runs_one_cycle_per_call_as_before() {
    let counts = job(2, &[("HOROVOD_CYCLE_TIME", "2")], |r, kv| {
        for k in 0..5 {
            pushpull_checked(kv, k, r, 2);
        }
        // One call of several keys: one cycle, one fused operation.
        let keys = [20, 21, 22];
        let values: Vec<NDArray> = keys.iter().map(|&k| value(k, r, 3)).collect();
        let mut outs = vec![NDArray::zeros(&[3], DType::F32); 3];
        kv.pushpull(&keys, &values, &mut outs).unwrap();
        (kv.cycles(), kv.ring_operations())
    });
    assert_eq!(counts, vec![(6, 6); 2]);
}

#[test]
fn threads_of_one_rank_match_the_calls_of_another_by_name() {
    // Rank 0: a thread per key; rank 1: one call of every key; rank 2: two calls of two
    // keys, on two threads. No waiting between cycles.
    let n = 3;
    let keys = [1, 2, 3, 4];
    let counts = job(n, &[("HOROVOD_CYCLE_TIME", "0")], |r, kv| {
        match r {
            0 => {
                threads(4, |t| pushpull_checked(kv, keys[t], r, n));
            }
            1 => {
                let listed = [4, 2, 3, 1];
                let values: Vec<NDArray> = listed
                    .iter()
                    .map(|&k| value(k, r, (k % 7 + 1) as usize))
                    .collect();
                let mut outs: Vec<NDArray> = listed
                    .iter()
                    .map(|&k| NDArray::zeros(&[(k % 7 + 1) as usize], DType::F32))
                    .collect();
                kv.pushpull(&listed, &values, &mut outs).unwrap();
                for (&k, out) in listed.iter().zip(&outs) {
                    assert!(out.to_f64_vec().iter().all(|&x| x == sum(k, n)), "key {k}");
                }
            }
            _ => {
                threads(2, |t| {
                    let pair = [keys[2 * t], keys[2 * t + 1]];
                    let values: Vec<NDArray> = pair
                        .iter()
                        .map(|&k| value(k, r, (k % 7 + 1) as usize))
                        .collect();
                    let mut outs: Vec<NDArray> = pair
                        .iter()
                        .map(|&k| NDArray::zeros(&[(k % 7 + 1) as usize], DType::F32))
                        .collect();
                    kv.pushpull(&pair, &values, &mut outs).unwrap();
                    for (&k, out) in pair.iter().zip(&outs) {
                        assert!(out.to_f64_vec().iter().all(|&x| x == sum(k, n)), "key {k}");
                    }
                });
            }
        }
        kv.ring_operations()
    });
    assert!(
        counts.iter().all(|&c| c == counts[0] && c >= 1),
        "{counts:?}"
    );
}

#[test]
fn a_tensor_waiting_for_other_ranks_does_not_hold_up_later_calls() {
    // Rank 0 calls key 1 and then key 2 from another thread; rank 1 calls them the other
    // way round. Calls that ran one after the other would wait on each other until the
    // stall inspector failed them.
    let errors = job(
        2,
        &[
            ("HOROVOD_CYCLE_TIME", "1"),
            ("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "5"),
        ],
        |r, kv| {
            let (first, second) = if r == 0 { (1, 2) } else { (2, 1) };
            let started = kv.cycles();
            let results = threads(2, |t| {
                if t == 1 {
                    // Wait until the first call is submitted.
                    let deadline = Instant::now() + TIMEOUT;
                    while kv.cycles() == started && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                let k = if t == 0 { first } else { second };
                let mut out = NDArray::zeros(&[4], DType::F32);
                kv.pushpull(k, &value(k, r, 4), &mut out)
                    .map(|()| out.to_f64_vec())
            });
            let mut errors = Vec::new();
            for (t, result) in results.into_iter().enumerate() {
                let k = if t == 0 { first } else { second };
                match result {
                    Ok(v) => assert_eq!(v, vec![sum(k, 2); 4]),
                    Err(e) => errors.push(chain(&e)),
                }
            }
            errors
        },
    );
    assert!(errors.iter().all(Vec::is_empty), "{errors:?}");
}

#[test]
fn a_mismatched_tensor_fails_only_the_call_of_its_thread() {
    let n = 2;
    job(
        n,
        &[
            ("HOROVOD_CYCLE_TIME", "50"),
            ("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "5"),
        ],
        |r, kv| {
            threads(3, |t| {
                if t == 0 {
                    // Shape [2] on rank 0, [3] on rank 1.
                    let mut out = NDArray::zeros(&[2 + r], DType::F32);
                    let before = out.clone();
                    let e = kv.pushpull(10, &value(10, r, 2 + r), &mut out).unwrap_err();
                    assert_eq!(e.key(), Some(&Key::from(10)), "{e}");
                    let text = chain(&e);
                    assert!(
                        text.contains("mismatched shapes") && text.contains("tensor 10"),
                        "{text}"
                    );
                    assert_eq!(out, before, "the out is untouched");
                } else {
                    pushpull_checked(kv, 10 + t as i32, r, n);
                }
            });
            // The store goes on, the failed key included.
            pushpull_checked(kv, 10, r, n);
        },
    );
}

#[test]
fn a_stalled_tensor_fails_alone_while_the_other_threads_go_on() {
    let (tx, rx) = mpsc::channel::<()>();
    let (tx, rx) = (Mutex::new(tx), Mutex::new(rx));
    let n = 2;
    job(
        n,
        &[
            ("HOROVOD_CYCLE_TIME", "1"),
            ("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "5"),
        ],
        |r, kv| {
            let stalled_done = AtomicBool::new(false);
            threads(2, |t| {
                if t == 0 {
                    if r == 0 {
                        // Rank 1 never submits key 7.
                        let mut out = NDArray::zeros(&[3], DType::F32);
                        let e = kv.pushpull(7, &value(7, r, 3), &mut out).unwrap_err();
                        stalled_done.store(true, Ordering::SeqCst);
                        let text = chain(&e);
                        assert_eq!(e.key(), Some(&Key::from(7)), "{text}");
                        assert!(
                            text.contains("rank 1 did not submit it")
                                && text.contains("Missing ranks: 1: [7]"),
                            "{text}"
                        );
                        tx.lock().unwrap().send(()).unwrap();
                    } else {
                        rx.lock().unwrap().recv().unwrap();
                    }
                } else {
                    // Meanwhile, calls of every rank are reduced as usual.
                    for k in 30..40 {
                        pushpull_checked(kv, k, r, n);
                    }
                    assert!(
                        !stalled_done.load(Ordering::SeqCst),
                        "the calls waited for the stalled tensor"
                    );
                }
            });
            pushpull_checked(kv, 40, r, n);
        },
    );
}

#[test]
fn broadcasts_and_pushpulls_of_different_threads_share_cycles() {
    let n = 3;
    job(n, &[("HOROVOD_CYCLE_TIME", "30")], |r, kv| {
        threads(4, |t| {
            let k = 50 + t as i32;
            if t % 2 == 0 {
                pushpull_checked(kv, k, r, n);
            } else {
                let mut out = NDArray::zeros(&[6], DType::F64);
                kv.broadcast(
                    k,
                    &NDArray::full(&[6], (k + r as i32) as f64, DType::F64),
                    &mut out,
                )
                .unwrap();
                assert_eq!(out.to_f64_vec(), vec![k as f64; 6], "rank 0's value");
            }
        });
    });
}

#[test]
fn cycle_time_is_read_and_bad_values_are_refused_by_name() {
    let job = LocalJob::start(1, TIMEOUT).unwrap();
    let options = job.worker_options().clone();
    for bad in ["-1", "soon", "NaN", "inf", "", "1e300"] {
        let mut o = options.clone();
        o.insert("HOROVOD_CYCLE_TIME".into(), bad.into());
        let e = create_with("horovod", o).unwrap_err().to_string();
        assert!(
            e.contains("HOROVOD_CYCLE_TIME") && e.contains(&format!("{bad:?}")),
            "{bad}: {e}"
        );
    }
    let mut o = options.clone();
    o.insert("HOROVOD_CYCLE_TIME".into(), "2.5".into());
    let config = HorovodConfig::from_vars(o).unwrap();
    assert_eq!(config.cycle_time, Duration::from_micros(2500));
    let kv = HorovodStore::connect("horovod", &config).unwrap();
    assert_eq!(kv.cycle_time(), Duration::from_micros(2500));
    assert_eq!(kv.num_workers(), 1);
    // A job of one needs no cycles.
    pushpull_checked(&kv, 3, 0, 1);
    assert_eq!((kv.cycles(), kv.ring_operations()), (0, 0));
    drop(kv);
    job.finish().unwrap();
    let default = HorovodConfig::from_vars(options).unwrap();
    assert_eq!(default.cycle_time, Duration::from_millis(1));
}
