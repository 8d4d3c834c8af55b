//! Push + pull of a 100 MB model in 4 MB tensors by 2 workers, `byteps` beside `dist_sync`,
//! each on a fresh in-process cluster (a scheduler and the servers on threads, real sockets on
//! 127.0.0.1): time per step and bytes each worker sends per step, against the parameter
//! server's theory (each worker sends the model once and receives it once per step).
//!
//! ```text
//! cargo run --release -p kvstore-byteps --example byteps_bench [-- STEPS [SERVERS]]
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use kvstore_base::{CreateRequest, DType, KVStoreBase, KVStoreExt, NDArray};
use kvstore_byteps::BytePsStore;
use kvstore_dist::protocol::Mode;
use kvstore_dist::{DistConfig, DistStore, LocalCluster};

const WORKERS: u32 = 2;
const TENSORS: usize = 25;
/// 4 MB of float32 per tensor: 100 MB in all.
const ELEMENTS: usize = 1_000_000;

/// A worker of one of the stores, with its byte counter.
enum Worker {
    Dist(DistStore),
    BytePs(BytePsStore),
}

impl Worker {
    fn kv(&self) -> &dyn KVStoreBase {
        match self {
            Worker::Dist(s) => s,
            Worker::BytePs(s) => s,
        }
    }

    fn bytes_sent(&self) -> u64 {
        match self {
            Worker::Dist(s) => s.bytes_sent(),
            Worker::BytePs(s) => s.bytes_sent(),
        }
    }
}

fn create(store: &str, options: &BTreeMap<String, String>) -> Worker {
    if store == "dist_sync" {
        let config = DistConfig::from_vars(options.clone()).expect("the cluster's options");
        Worker::Dist(DistStore::connect("dist_sync", Mode::Sync, &config).expect("dist_sync"))
    } else {
        let request = CreateRequest {
            name: "byteps".into(),
            options: options.clone(),
        };
        Worker::BytePs(BytePsStore::from_request(&request).expect("byteps"))
    }
}

/// Runs `steps` steps of one pushpull of every tensor on each worker; returns the seconds per
/// step and the bytes worker 0 sent per step.
fn bench(label: &str, store: &'static str, extra: &[(&str, &str)], servers: u32, steps: usize) {
    let cluster = LocalCluster::start(servers, WORKERS, Duration::from_secs(60)).unwrap();
    let mut options = cluster.worker_options().clone();
    options.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let start = Arc::new(Barrier::new(WORKERS as usize));
    let handles: Vec<_> = (0..WORKERS)
        .map(|_| {
            let options = options.clone();
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let w = create(store, &options);
                let kv = w.kv();
                let keys: Vec<i32> = (0..TENSORS as i32).collect();
                let zeros: Vec<NDArray> = (0..TENSORS)
                    .map(|_| NDArray::zeros(&[ELEMENTS], DType::F32))
                    .collect();
                kv.init(&keys[..], &zeros).unwrap();
                let grads: Vec<NDArray> = (0..TENSORS)
                    .map(|_| NDArray::full(&[ELEMENTS], kv.rank() as f64 + 1.0, DType::F32))
                    .collect();
                let mut outs = zeros.clone();
                // Warm-up (buffers, connections), then the timed steps.
                kv.pushpull(&keys[..], &grads, &mut outs).unwrap();
                start.wait();
                let before = w.bytes_sent();
                let t = Instant::now();
                for _ in 0..steps {
                    kv.pushpull(&keys[..], &grads, &mut outs).unwrap();
                }
                let secs = t.elapsed().as_secs_f64() / steps as f64;
                let sent = (w.bytes_sent() - before) / steps as u64;
                let sum = f64::from(WORKERS * (WORKERS + 1) / 2);
                assert!(outs.iter().all(|o| o.to_f64_vec()[ELEMENTS - 1] == sum));
                (kv.rank(), secs, sent)
            })
        })
        .collect();
    let results: Vec<(usize, f64, u64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    cluster.finish().unwrap();
    let secs = results.iter().map(|r| r.1).fold(0.0, f64::max);
    let sent = results.iter().map(|r| r.2).max().unwrap_or(0);
    let model = (TENSORS * ELEMENTS * 4) as f64;
    println!(
        "{label:<34} {:>8.1} ms/step  {:>7.2} MB sent/worker/step  ({:.4}x the model)  {:>6.2} GB/s per worker (push + pull)",
        secs * 1e3,
        sent as f64 / 1e6,
        sent as f64 / model,
        2.0 * model / secs / 1e9,
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let servers: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let model = TENSORS * ELEMENTS * 4;
    println!(
        "{WORKERS} workers, {servers} servers, a model of {TENSORS} x {} MB = {} MB; theory \
         (parameter server): each worker sends {} MB and receives {} MB per step",
        ELEMENTS * 4 / 1_000_000,
        model / 1_000_000,
        model / 1_000_000,
        model / 1_000_000
    );
    bench("dist_sync", "dist_sync", &[], servers, steps);
    bench("byteps (credit 0)", "byteps", &[], servers, steps);
    bench(
        "byteps (credit 4)",
        "byteps",
        &[("BYTEPS_SCHEDULING_CREDIT", "4")],
        servers,
        steps,
    );
    bench(
        "byteps (1 MB partitions, credit 8)",
        "byteps",
        &[
            ("BYTEPS_PARTITION_BYTES", "1024000"),
            ("BYTEPS_SCHEDULING_CREDIT", "8"),
        ],
        servers,
        steps,
    );
}
