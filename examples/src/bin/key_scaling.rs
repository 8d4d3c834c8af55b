//! How the cost of one call grows with the number of keys in it, on every store of this build:
//! the time per key should stay flat from a thousand keys to a hundred thousand.
//!
//! For each store and each key count `n` (1,000, 10,000 and 100,000 keys of 16 `f32`), one
//! list call with all `n` keys of each kind is timed: `init`, `push` then `pull`, `pushpull`,
//! and `broadcast` of `n` new keys (stores without `init`/`push`/`pull` skip those), and the
//! median of a few rounds is printed in microseconds per key. The results are checked after
//! the timed rounds. The distributed stores run as a
//! job of two workers on threads of this process, with a scheduler and one server on loopback
//! (`horovod` greets it and leaves it idle), as `kvstore launch` would start them.
//!
//! ```text
//! cargo run --release -p kvstore-examples --bin key_scaling
//! cargo run --release -p kvstore-examples --bin key_scaling -- local horovod   # some stores
//! cargo run --release -p kvstore-examples --bin key_scaling -- dist_sync 20000 # other counts
//! ```

use std::time::{Duration, Instant};

use kvstore::dist::LocalCluster;
use kvstore::prelude::*;
use kvstore::{Capability, Key};

/// Elements of every key's value.
const ELEMENTS: usize = 16;
/// Key counts timed unless others are given.
const COUNTS: [usize; 3] = [1_000, 10_000, 100_000];
/// Timed rounds per operation (the median is printed), after one untimed round.
const ROUNDS: usize = 5;
/// Workers of the distributed stores' jobs.
const WORKERS: u32 = 2;

/// The operations timed, in order.
const OPERATIONS: [&str; 4] = ["init", "push + pull", "pushpull", "broadcast"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let counts: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let counts = if counts.is_empty() {
        COUNTS.to_vec()
    } else {
        counts
    };
    let chosen: Vec<&String> = args
        .iter()
        .filter(|a| a.parse::<usize>().is_err())
        .collect();
    let stores = ["local", "dist_sync", "byteps", "horovod"];
    println!(
        "microseconds per key of one list call ({ELEMENTS} float32 per key; median of \
         {ROUNDS} rounds; distributed stores: {WORKERS} workers on threads, loopback)"
    );
    println!(
        "{:<10} {:>8} {:>10} {:>12} {:>10} {:>10}",
        "store", "keys", OPERATIONS[0], OPERATIONS[1], OPERATIONS[2], OPERATIONS[3]
    );
    for store in stores {
        if !chosen.is_empty() && !chosen.iter().any(|c| c.as_str() == store) {
            continue;
        }
        for &n in &counts {
            let row = match store {
                "local" => {
                    let kv = create("local").expect("local store");
                    time_operations(kv.as_ref(), n)
                }
                _ => time_distributed(store, n),
            };
            let cells: Vec<String> = row
                .iter()
                .map(|t| t.map_or("-".to_string(), |s| format!("{:.3}", s * 1e6 / n as f64)))
                .collect();
            println!(
                "{store:<10} {n:>8} {:>10} {:>12} {:>10} {:>10}",
                cells[0], cells[1], cells[2], cells[3]
            );
        }
    }
}

/// Times the operations on a job of [`WORKERS`] workers of `store`; rank 0's figures.
fn time_distributed(store: &str, n: usize) -> [Option<f64>; 4] {
    // One server (which `horovod` greets and leaves idle).
    let cluster = LocalCluster::start(1, WORKERS, Duration::from_secs(120)).expect("cluster");
    let rows: Vec<[Option<f64>; 4]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|_| {
                let cluster = &cluster;
                s.spawn(move || {
                    let kv = cluster.create_worker(store).expect("worker");
                    let row = time_operations(kv.as_ref(), n);
                    (kv.rank(), row)
                })
            })
            .collect();
        let mut rows: Vec<(usize, [Option<f64>; 4])> = handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect();
        rows.sort_by_key(|(rank, _)| *rank);
        rows.into_iter().map(|(_, row)| row).collect()
    });
    cluster.finish().expect("the job ends");
    rows[0]
}

/// Median seconds of each operation with `n` keys; `None` where the store lacks it.
fn time_operations(kv: &dyn KVStoreBase, n: usize) -> [Option<f64>; 4] {
    let keys: Vec<Key> = (0..n as i64).map(Key::from).collect();
    let values: Vec<NDArray> = (0..n)
        .map(|i| NDArray::full(&[ELEMENTS], (i % 7) as f64, DType::F32))
        .collect();
    let mut outs: Vec<NDArray> = (0..n)
        .map(|_| NDArray::zeros(&[ELEMENTS], DType::F32))
        .collect();
    let with_init = kv.is_capable(Capability::InitPushPull);
    let init = with_init.then(|| {
        let t = Instant::now();
        kv.init(&keys[..], &values).expect("init");
        t.elapsed().as_secs_f64()
    });
    let push_pull = with_init.then(|| {
        median_of(|| {
            kv.push(&keys[..], &values).expect("push");
            kv.pull(&keys[..], &mut outs).expect("pull");
        })
    });
    let pushpull = Some(median_of(|| {
        kv.pushpull(&keys[..], &values, &mut outs)
            .expect("pushpull");
    }));
    // Outside the timing: every worker pushed the same values, so each sum is that many.
    check(&outs, kv.num_workers() as f32, "pushpull");
    let mut round = 0i64;
    let broadcast = Some(median_of(|| {
        // New keys each round: a broadcast initialises them where the store keeps values.
        round += 1;
        let fresh: Vec<Key> = (0..n as i64)
            .map(|k| Key::from(round * 1_000_000 + k))
            .collect();
        kv.broadcast(&fresh[..], &values, &mut outs)
            .expect("broadcast");
    }));
    check(&outs, 1.0, "broadcast");
    [init, push_pull, pushpull, broadcast]
}

/// Panics unless output `i` holds `times` x the value pushed for key `i`.
fn check(outs: &[NDArray], times: f32, operation: &str) {
    for (i, out) in outs.iter().enumerate() {
        let expected = vec![times * (i % 7) as f32; ELEMENTS];
        let found = out.to_vec::<f32>().expect("float32 outputs");
        assert_eq!(found, expected, "{operation}: wrong result for key {i}");
    }
}

/// The median of [`ROUNDS`] timed runs of `f`, after one untimed run.
fn median_of(mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[ROUNDS / 2]
}
