//! The workloads timed by the `local` benchmark (`benches/local.rs`) and by the `workloads`
//! timing program (`examples/workloads.rs`), defined once so both measure the same thing.
//!
//! Every workload goes through the public API (`KVStoreExt` on a [`LocalStore`] configured
//! from the environment, so `MXNET_KVSTORE_REDUCTION_NTHREADS` and
//! `MXNET_KVSTORE_BIGARRAY_BOUND` apply). All arrays are allocated, and the store initialised,
//! when a workload is built; a step only pushes and pulls.
//!
//! Byte counts follow the usual streaming convention: the bytes a workload must at least read
//! and write. A push of `n` values reads every value once and writes the stored value once,
//! `(n + 1) * size`; a pull into `m` outputs reads the stored value and writes an output for
//! each, `2 * m * size`. The memory floor counts the same way (`c = a + b` moves three arrays,
//! a copy two), so bytes per second are comparable across workloads.

#![allow(dead_code)] // each target uses the parts it needs

use std::time::{Duration, Instant};

use kvstore_base::{DType, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_local::LocalStore;

/// One mebibyte.
pub const MIB: usize = 1 << 20;

/// Bytes of one `f32`.
const F32: usize = std::mem::size_of::<f32>();

/// A dense `f32` vector of `bytes` bytes filled with `value`.
pub fn f32_array(bytes: usize, value: f64) -> NDArray {
    NDArray::full(&[bytes / F32], value, DType::F32)
}

/// Push `devices` values of `bytes` each to one key, then pull into `devices` outputs.
pub struct PushPull {
    kv: LocalStore,
    values: Vec<NDArray>,
    outs: Vec<NDArray>,
    bytes: usize,
}

impl PushPull {
    /// The store with key 0 initialised, device `d`'s value filled with `d + 1`.
    pub fn new(devices: usize, bytes: usize) -> Self {
        let kv = LocalStore::new();
        kv.init(0, &f32_array(bytes, 0.0)).expect("init");
        PushPull {
            kv,
            values: (0..devices)
                .map(|d| f32_array(bytes, d as f64 + 1.0))
                .collect(),
            outs: (0..devices).map(|_| f32_array(bytes, 0.0)).collect(),
            bytes,
        }
    }

    /// Pushes every device's value (the reduction into the store).
    pub fn push(&self) {
        self.kv.push(0, &self.values).expect("push");
    }

    /// Pulls the stored value into every output.
    pub fn pull(&mut self) {
        self.kv.pull(0, &mut self.outs).expect("pull");
    }

    /// One push and one pull.
    pub fn step(&mut self) {
        self.push();
        self.pull();
    }

    /// Minimum bytes moved by [`PushPull::push`].
    pub fn push_bytes(&self) -> usize {
        (self.values.len() + 1) * self.bytes
    }

    /// Minimum bytes moved by [`PushPull::step`].
    pub fn step_bytes(&self) -> usize {
        self.push_bytes() + 2 * self.outs.len() * self.bytes
    }

    /// Checks that every output holds the sum of the pushed values (after a step).
    pub fn verify(&self) -> Result<(), String> {
        let n = self.values.len() as f32;
        let expected = n * (n + 1.0) / 2.0;
        check_all(&self.outs, expected)
    }
}

/// `keys` int keys of `elems` `f32` each, pushed as one list call and pulled as one list call.
pub struct SmallKeys {
    kv: LocalStore,
    keys: Vec<i32>,
    values: Vec<NDArray>,
    outs: Vec<NDArray>,
}

impl SmallKeys {
    /// The store with keys `0..keys` initialised; key `k`'s value filled with `k % 7 + 1`.
    pub fn new(keys: usize, elems: usize) -> Self {
        let kv = LocalStore::new();
        let ids: Vec<i32> = (0..keys as i32).collect();
        let zeros: Vec<NDArray> = ids.iter().map(|_| f32_array(elems * F32, 0.0)).collect();
        kv.init(&ids, &zeros).expect("init");
        SmallKeys {
            kv,
            values: ids
                .iter()
                .map(|k| f32_array(elems * F32, f64::from(k % 7 + 1)))
                .collect(),
            outs: zeros,
            keys: ids,
        }
    }

    /// One list push and one list pull.
    pub fn step(&mut self) {
        self.kv.push(&self.keys, &self.values).expect("push");
        self.kv.pull(&self.keys, &mut self.outs).expect("pull");
    }

    /// Minimum bytes moved by [`SmallKeys::step`].
    pub fn step_bytes(&self) -> usize {
        let size: usize = self.values.iter().map(|v| v.size() * F32).sum();
        4 * size
    }

    /// Checks every output (after a step).
    pub fn verify(&self) -> Result<(), String> {
        for (k, out) in self.keys.iter().zip(&self.outs) {
            check_all(std::slice::from_ref(out), (k % 7 + 1) as f32)?;
        }
        Ok(())
    }
}

/// SGD with momentum in the store: push one gradient, pull the updated weight.
pub struct SgdMomentum {
    kv: LocalStore,
    grad: NDArray,
    out: NDArray,
    bytes: usize,
}

impl SgdMomentum {
    /// The store with `sgd(learning_rate = 0.1, momentum = 0.9)` installed and key 0
    /// initialised to ones, or the error `set_optimizer` returned.
    pub fn new(bytes: usize) -> Result<Self, kvstore_base::Error> {
        let kv = LocalStore::new();
        kv.set_optimizer(
            &OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", 0.9),
        )?;
        kv.init(0, &f32_array(bytes, 1.0))?;
        Ok(SgdMomentum {
            kv,
            grad: f32_array(bytes, 1e-3),
            out: f32_array(bytes, 0.0),
            bytes,
        })
    }

    /// One push (the optimizer step) and one pull.
    pub fn step(&mut self) {
        self.kv.push(0, &self.grad).expect("push");
        self.kv.pull(0, &mut self.out).expect("pull");
    }

    /// Minimum bytes moved by [`SgdMomentum::step`]: the gradient, weight and momentum read,
    /// weight and momentum written, then the weight read and the output written.
    pub fn step_bytes(&self) -> usize {
        7 * self.bytes
    }
}

/// The memory-bandwidth calibration: plain loops over 64 MiB `f32` slices.
pub struct Floor {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    threads: usize,
}

impl Floor {
    /// Three slices of `bytes` each, processed by `threads` threads.
    pub fn new(bytes: usize, threads: usize) -> Self {
        let n = bytes / F32;
        Floor {
            a: vec![1.0; n],
            b: vec![2.0; n],
            c: vec![0.0; n],
            threads: threads.max(1),
        }
    }

    /// `c = a + b`, element by element.
    pub fn add(&mut self) {
        let (a, b) = (&self.a[..], &self.b[..]);
        split_mut(&mut self.c, self.threads, |lo, c| {
            for ((c, &a), &b) in c.iter_mut().zip(&a[lo..]).zip(&b[lo..]) {
                *c = a + b;
            }
        });
        std::hint::black_box(&mut self.c);
    }

    /// `c = a` with `copy_from_slice`.
    pub fn copy(&mut self) {
        let a = &self.a[..];
        split_mut(&mut self.c, self.threads, |lo, c| {
            c.copy_from_slice(&a[lo..lo + c.len()]);
        });
        std::hint::black_box(&mut self.c);
    }

    /// Bytes moved by [`Floor::add`]: two slices read, one written.
    pub fn add_bytes(&self) -> usize {
        3 * self.a.len() * F32
    }

    /// Bytes moved by [`Floor::copy`]: one slice read, one written.
    pub fn copy_bytes(&self) -> usize {
        2 * self.a.len() * F32
    }
}

/// Runs `f(offset, chunk)` over `threads` contiguous chunks of `data`, in parallel.
fn split_mut(data: &mut [f32], threads: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if threads == 1 {
        return f(0, data);
    }
    let per = data.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (i, chunk) in data.chunks_mut(per).enumerate() {
            let f = &f;
            scope.spawn(move || f(i * per, chunk));
        }
    });
}

/// Threads the machine offers.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn check_all(arrays: &[NDArray], expected: f32) -> Result<(), String> {
    for (i, a) in arrays.iter().enumerate() {
        let values = a
            .as_slice::<f32>()
            .ok_or("output is not a dense f32 array")?;
        if let Some(bad) = values.iter().find(|&&v| v != expected) {
            return Err(format!("output {i} holds {bad}, expected {expected}"));
        }
    }
    Ok(())
}

/// Runs `step` `warmup` times, then `reps` times timing each; returns the sorted timings.
pub fn time(warmup: usize, reps: usize, mut step: impl FnMut()) -> Vec<Duration> {
    for _ in 0..warmup {
        step();
    }
    let mut times: Vec<Duration> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            step();
            start.elapsed()
        })
        .collect();
    times.sort();
    times
}

/// Runs `step(0)`, ..., `step(steps - 1)` in turn, `warmup` rounds untimed then `reps` rounds
/// timed, so that every step sees the same state of the machine; returns the sorted timings
/// of each step.
pub fn time_interleaved(
    warmup: usize,
    reps: usize,
    steps: usize,
    mut step: impl FnMut(usize),
) -> Vec<Vec<Duration>> {
    let mut times = vec![Vec::with_capacity(reps); steps];
    for round in 0..warmup + reps.max(1) {
        for (k, t) in times.iter_mut().enumerate() {
            let start = Instant::now();
            step(k);
            if round >= warmup {
                t.push(start.elapsed());
            }
        }
    }
    for t in &mut times {
        t.sort();
    }
    times
}

/// The median of sorted timings.
pub fn median(sorted: &[Duration]) -> Duration {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}
