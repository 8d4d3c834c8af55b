//! Times `pushpull` steps of a 100 MB model (25 float32 tensors of 4 MB) on a `horovod` job
//! of workers on threads of this process (TCP over loopback), and compares the bytes each
//! worker sends per step with the ring's theory, 2 (n - 1) / n of the model.
//!
//! `cargo run --release -p kvstore-horovod --example ring_bench [workers] [steps] [fp16]`
//! (defaults: 2 workers, 10 steps; `fp16`: Horovod's `Compression.fp16`, the tensors crossing
//! as float16, and the theory counted in float16). `HOROVOD_FUSION_THRESHOLD` in the
//! environment applies.

use std::time::{Duration, Instant};

use kvstore_base::{CompressionParams, DType, KVStoreBase, KVStoreExt, NDArray};
use kvstore_horovod::{HorovodConfig, HorovodStore, LocalJob};

const TENSORS: usize = 25;
const ELEMENTS: usize = 1 << 20; // 4 MiB of float32

fn main() {
    let mut args = std::env::args().skip(1);
    let workers: usize = args.next().map_or(2, |a| a.parse().expect("workers"));
    let steps: usize = args.next().map_or(10, |a| a.parse().expect("steps"));
    let fp16 = match args.next().as_deref() {
        None => false,
        Some("fp16") => true,
        Some(other) => panic!("the third argument is `fp16` or nothing, not {other:?}"),
    };
    let job = LocalJob::start(workers as u32, Duration::from_secs(60)).expect("scheduler");
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.extend(job.worker_options().clone());
    let config = HorovodConfig::from_vars(vars).expect("config");
    let model_bytes = (TENSORS * ELEMENTS * 4) as f64;
    let results: Vec<(usize, Vec<f64>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let config = config.clone();
                s.spawn(move || {
                    let kv = HorovodStore::connect("horovod", &config).expect("worker");
                    if fp16 {
                        let params = CompressionParams::from([("type".into(), "fp16".into())]);
                        kv.set_gradient_compression(&params).expect("fp16");
                    }
                    let keys: Vec<i32> = (0..TENSORS as i32).collect();
                    let grads: Vec<NDArray> = (0..TENSORS)
                        .map(|_| NDArray::full(&[ELEMENTS], kv.rank() as f64 + 1.0, DType::F32))
                        .collect();
                    let mut outs: Vec<NDArray> = (0..TENSORS)
                        .map(|_| NDArray::zeros(&[ELEMENTS], DType::F32))
                        .collect();
                    // A warm-up step.
                    kv.pushpull(&keys, &grads, &mut outs).expect("pushpull");
                    let expected = (workers * (workers + 1) / 2) as f32;
                    assert!(outs
                        .iter()
                        .all(|o| o.as_slice::<f32>().unwrap()[0] == expected));
                    let before = kv.bytes_sent();
                    let mut times = Vec::with_capacity(steps);
                    for _ in 0..steps {
                        let t = Instant::now();
                        kv.pushpull(&keys, &grads, &mut outs).expect("pushpull");
                        times.push(t.elapsed().as_secs_f64());
                    }
                    let per_step = (kv.bytes_sent() - before) / steps as u64;
                    (kv.rank(), times, per_step)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    });
    job.finish().expect("job");
    let wire_bytes = if fp16 { model_bytes / 2.0 } else { model_bytes };
    let theory = 2.0 * (workers - 1) as f64 / workers as f64 * wire_bytes;
    println!(
        "{workers} workers, {TENSORS} tensors x {} MB = {:.0} MB model, {steps} steps, fusion \
         threshold {} bytes{}",
        ELEMENTS * 4 / 1_000_000,
        model_bytes / 1e6,
        config.fusion_threshold,
        if fp16 { ", fp16 compression" } else { "" }
    );
    for (rank, mut times, sent) in results {
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "rank {rank}: median step {:.1} ms (min {:.1}), {:.0} MB/s of model; sent {} bytes \
             per step = {:.4} x the ring's 2(n-1)/n of the model on the wire ({:.0} bytes)",
            median * 1e3,
            times[0] * 1e3,
            model_bytes / median / 1e6,
            sent,
            sent as f64 / theory,
            theory
        );
    }
}
