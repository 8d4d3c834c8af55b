//! Push + pull of a 100 MB model in 4 MB tensors by 2 workers: `byteps` and `horovod` beside
//! `dist_sync` (the parameter servers over TCP alone, `KVSTORE_SHM=0`, and through the
//! same-host shared memory), each on a fresh in-process job (the scheduler and any servers on threads, the
//! workers on threads, real sockets on 127.0.0.1): time per step and bytes each worker sends
//! per step, against the theory (parameter server: each worker sends the model once and
//! receives it once per step; ring all-reduce: each worker sends and receives 2 (n - 1) / n
//! of the model).
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
use kvstore_horovod::{HorovodConfig, HorovodStore, LocalJob};

const WORKERS: u32 = 2;
const TENSORS: usize = 25;
/// 4 MB of float32 per tensor: 100 MB in all.
const ELEMENTS: usize = 1_000_000;

/// A worker of one of the stores, with its byte counter.
enum Worker {
    Dist(Box<DistStore>),
    BytePs(Box<BytePsStore>),
    Horovod(Box<HorovodStore>),
}

impl Worker {
    fn kv(&self) -> &dyn KVStoreBase {
        match self {
            Worker::Dist(s) => s.as_ref(),
            Worker::BytePs(s) => s.as_ref(),
            Worker::Horovod(s) => s.as_ref(),
        }
    }

    fn bytes_sent(&self) -> u64 {
        match self {
            Worker::Dist(s) => s.bytes_sent(),
            Worker::BytePs(s) => s.bytes_sent(),
            Worker::Horovod(s) => s.bytes_sent(),
        }
    }
}

fn create(store: &str, options: &BTreeMap<String, String>) -> Worker {
    match store {
        "dist_sync" => {
            let config = DistConfig::from_vars(options.clone()).expect("the cluster's options");
            Worker::Dist(Box::new(
                DistStore::connect("dist_sync", Mode::Sync, &config).expect("dist_sync"),
            ))
        }
        "horovod" => {
            let config = HorovodConfig::from_vars(options.clone()).expect("the job's options");
            Worker::Horovod(Box::new(
                HorovodStore::connect("horovod", &config).expect("horovod"),
            ))
        }
        _ => {
            let request = CreateRequest {
                name: "byteps".into(),
                options: options.clone(),
            };
            Worker::BytePs(Box::new(
                BytePsStore::from_request(&request).expect("byteps"),
            ))
        }
    }
}

/// The scheduler (and servers) of one benchmarked job, on threads of this process.
enum Job {
    Cluster(LocalCluster),
    Ring(LocalJob),
}

impl Job {
    fn start(store: &str, servers: u32) -> Job {
        let timeout = Duration::from_secs(60);
        if store == "horovod" {
            Job::Ring(LocalJob::start(WORKERS, timeout).expect("the horovod job"))
        } else {
            Job::Cluster(LocalCluster::start(servers, WORKERS, timeout).expect("the cluster"))
        }
    }

    fn worker_options(&self) -> &BTreeMap<String, String> {
        match self {
            Job::Cluster(c) => c.worker_options(),
            Job::Ring(j) => j.worker_options(),
        }
    }

    fn finish(self) {
        match self {
            Job::Cluster(c) => c.finish().expect("the cluster ends"),
            Job::Ring(j) => j.finish().expect("the horovod job ends"),
        }
    }
}

/// Runs `steps` steps of one pushpull of every tensor on each worker and prints the slowest
/// worker's time per step and the most bytes a worker sent per step over TCP, against
/// `theory` (the bytes a worker should send per step, as a fraction of the model; `None` when
/// the data goes through shared memory).
fn bench(
    label: &str,
    store: &'static str,
    extra: &[(&str, &str)],
    servers: u32,
    steps: usize,
    theory: Option<f64>,
) {
    let cluster = Job::start(store, servers);
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
                if store != "horovod" {
                    // Horovod keeps no values: there is nothing to initialise.
                    kv.init(&keys[..], &zeros).unwrap();
                }
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
    cluster.finish();
    let secs = results.iter().map(|r| r.1).fold(0.0, f64::max);
    let sent = results.iter().map(|r| r.2).max().unwrap_or(0);
    let model = (TENSORS * ELEMENTS * 4) as f64;
    let theory = match theory {
        Some(t) => format!("theory {t:.4}x"),
        None => "the rest through shared memory".to_string(),
    };
    println!(
        "{label:<40} {:>8.1} ms/step  {:>7.2} MB sent/worker/step over TCP  ({:.4}x the model; \
         {theory})  {:>6.2} GB/s of model per worker (push + pull)",
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
    let ring = 2.0 * f64::from(WORKERS - 1) / f64::from(WORKERS);
    println!(
        "{WORKERS} workers, {servers} servers (dist_sync, byteps; horovod has none), a model of \
         {TENSORS} x {} MB = {} MB; theory: with a parameter server each worker sends {} MB \
         and receives {} MB per step; in a ring all-reduce each worker sends and receives \
         2(n-1)/n = {ring} of the model",
        ELEMENTS * 4 / 1_000_000,
        model / 1_000_000,
        model / 1_000_000,
        model / 1_000_000
    );
    // The designs compared on TCP, then dist_sync's same-host shared memory.
    let tcp = ("KVSTORE_SHM", "0");
    bench(
        "dist_sync (TCP)",
        "dist_sync",
        &[tcp],
        servers,
        steps,
        Some(1.0),
    );
    bench(
        "dist_sync (same-host shared memory)",
        "dist_sync",
        &[],
        servers,
        steps,
        None,
    );
    // byteps on TCP (the theory rows), then through the same-host shared memory.
    let byteps_rows: [(&str, &[(&str, &str)]); 3] = [
        ("credit 0", &[]),
        ("credit 4", &[("BYTEPS_SCHEDULING_CREDIT", "4")]),
        (
            "1 MB partitions, credit 8",
            &[
                ("BYTEPS_PARTITION_BYTES", "1024000"),
                ("BYTEPS_SCHEDULING_CREDIT", "8"),
            ],
        ),
    ];
    for (shm, transport) in [(false, "TCP"), (true, "shm")] {
        for (what, settings) in byteps_rows {
            let mut extra = settings.to_vec();
            if !shm {
                extra.push(tcp);
            }
            bench(
                &format!("byteps ({what}, {transport})"),
                "byteps",
                &extra,
                servers,
                steps,
                (!shm).then_some(1.0),
            );
        }
    }
    bench(
        "horovod (ring, fusion 64 MiB)",
        "horovod",
        &[],
        0,
        steps,
        Some(ring),
    );
    bench(
        "horovod (ring, no fusion)",
        "horovod",
        &[("HOROVOD_FUSION_THRESHOLD", "0")],
        0,
        steps,
        Some(ring),
    );
}
