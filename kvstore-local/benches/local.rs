//! Benchmarks of the `local` store through its public API, with a memory-bandwidth
//! calibration measured in the same run.
//!
//! ```text
//! MXNET_KVSTORE_REDUCTION_NTHREADS=2 cargo bench -p kvstore-local --bench local
//! ```
//!
//! Workloads (all `f32`, arrays preallocated outside the timed closure, throughput counted as
//! the bytes the workload must at least read and write, see `common/mod.rs`):
//! - `push_pull_8x16MiB`: one key, 8 per-device values of 16 MiB pushed, pulled into 8 outputs;
//! - `reduce_only_8x16MiB`: the push alone, i.e. the reduction of 8 x 16 MiB into the store;
//! - `push_pull_2x64MiB`: one key, 2 values of 64 MiB, pulled into 2 outputs;
//! - `small_keys_1000x256`: 1000 int keys of 256 `f32` each, one list push and one list pull;
//! - `sgd_momentum_16MiB`: SGD with momentum installed with `set_optimizer`, one 16 MiB
//!   gradient pushed and the weight pulled (skipped with a message when `set_optimizer`
//!   returns an error);
//! - `memory_floor`: `c = a + b` and `c.copy_from_slice(a)` over 64 MiB slices, on one thread
//!   and on every available thread.
//!
//! Under `cargo test --benches` every workload runs once.

mod common;

use common::{available_threads, Floor, PushPull, SgdMomentum, SmallKeys, MIB};
use divan::counter::BytesCount;
use divan::Bencher;

fn main() {
    divan::main();
}

#[divan::bench(name = "push_pull_8x16MiB", sample_count = 30, sample_size = 1)]
fn push_pull_8x16mib(bencher: Bencher) {
    let mut w = PushPull::new(8, 16 * MIB);
    bencher
        .counter(BytesCount::new(w.step_bytes()))
        .bench_local(|| w.step());
}

#[divan::bench(name = "reduce_only_8x16MiB", sample_count = 30, sample_size = 1)]
fn reduce_only_8x16mib(bencher: Bencher) {
    let w = PushPull::new(8, 16 * MIB);
    bencher
        .counter(BytesCount::new(w.push_bytes()))
        .bench_local(|| w.push());
}

#[divan::bench(name = "push_pull_2x64MiB", sample_count = 30, sample_size = 1)]
fn push_pull_2x64mib(bencher: Bencher) {
    let mut w = PushPull::new(2, 64 * MIB);
    bencher
        .counter(BytesCount::new(w.step_bytes()))
        .bench_local(|| w.step());
}

#[divan::bench(name = "small_keys_1000x256", sample_count = 100)]
fn small_keys_1000x256(bencher: Bencher) {
    let mut w = SmallKeys::new(1000, 256);
    bencher
        .counter(BytesCount::new(w.step_bytes()))
        .bench_local(|| w.step());
}

#[divan::bench(name = "sgd_momentum_16MiB", sample_count = 30, sample_size = 1)]
fn sgd_momentum_16mib(bencher: Bencher) {
    match SgdMomentum::new(16 * MIB) {
        Ok(mut w) => bencher
            .counter(BytesCount::new(w.step_bytes()))
            .bench_local(|| w.step()),
        Err(e) => eprintln!("sgd_momentum_16MiB skipped: set_optimizer failed: {e}"),
    }
}

/// Thread counts for the calibration: one, and every available thread.
fn floor_threads() -> Vec<usize> {
    let mut threads = vec![1, available_threads()];
    threads.dedup();
    threads
}

/// The memory-bandwidth floor: bytes moved per second by plain loops.
mod memory_floor {
    use super::*;

    #[divan::bench(name = "add_64MiB", args = floor_threads(), sample_count = 30, sample_size = 1)]
    fn add_64mib(bencher: Bencher, threads: usize) {
        let mut f = Floor::new(64 * MIB, threads);
        bencher
            .counter(BytesCount::new(f.add_bytes()))
            .bench_local(|| f.add());
    }

    #[divan::bench(name = "copy_64MiB", args = floor_threads(), sample_count = 30, sample_size = 1)]
    fn copy_64mib(bencher: Bencher, threads: usize) {
        let mut f = Floor::new(64 * MIB, threads);
        bencher
            .counter(BytesCount::new(f.copy_bytes()))
            .bench_local(|| f.copy());
    }
}
