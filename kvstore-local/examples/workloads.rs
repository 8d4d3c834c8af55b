//! Times the `local` store's benchmark workloads with plain wall-clock timing and reports the
//! median of each, plus the machine's memory-bandwidth floor measured in the same run.
//!
//! ```text
//! MXNET_KVSTORE_REDUCTION_NTHREADS=2 cargo run --release -p kvstore-local --example workloads
//! cargo run --release -p kvstore-local --example workloads -- --json --reps 21 --warmup 3
//! ```
//!
//! Options: `--json` prints one JSON object on stdout (workload name -> median seconds, `null`
//! for a skipped workload, plus the floor's figures) and moves the human-readable report to
//! stderr;
//! `--reps N` timed repetitions per workload (default 15); `--warmup N` untimed runs first
//! (default 3).
//!
//! The workloads are those of `benches/local.rs` (see `benches/common/mod.rs`). The memory
//! floor is `c = a + b` over 64 MiB `f32` slices, timed on one thread and on every available
//! thread; the faster gives the floor bandwidth (bytes moved: two slices read, one written).
//! The reduction's floor time is what reading 8 inputs and writing 1 output of 16 MiB takes at
//! that bandwidth, and the report gives the measured reduction (`reduce_only_8x16MiB`, the push
//! alone) as a multiple of it.

#[path = "../benches/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::Duration;

use common::{
    available_threads, median, time, time_interleaved, Floor, PushPull, SgdMomentum, SmallKeys, MIB,
};
use kvstore_local::LocalStore;

struct Options {
    json: bool,
    reps: usize,
    warmup: usize,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        json: false,
        reps: 15,
        warmup: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--json" => options.json = true,
            "--reps" => options.reps = number("--reps")?.max(1),
            "--warmup" => options.warmup = number("--warmup")?,
            "-h" | "--help" => {
                println!("usage: workloads [--json] [--reps N] [--warmup N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(options)
}

/// One measured workload.
struct Row {
    name: &'static str,
    /// Median seconds, or why the workload was skipped.
    median: Result<f64, String>,
    /// Minimum bytes the workload moves per step.
    bytes: usize,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    let options = parse_options().unwrap_or_else(|e| {
        eprintln!("workloads: {e}");
        std::process::exit(2);
    });
    let (warmup, reps) = (options.warmup, options.reps);
    // The human-readable report: on stdout, or on stderr when stdout carries the JSON.
    let json = options.json;
    macro_rules! say {
        ($($arg:tt)*) => {
            if json { eprintln!($($arg)*) } else { println!($($arg)*) }
        };
    }
    let config = LocalStore::new().config();
    let mut rows = Vec::new();
    let report = |name: &'static str, bytes: usize, times: &[Duration]| {
        say!(
            "  {name:<22} median {:>10.6} s  (min {:.6}, max {:.6})",
            secs(median(times)),
            secs(times[0]),
            secs(times[times.len() - 1])
        );
        Row {
            name,
            median: Ok(secs(median(times))),
            bytes,
        }
    };
    let measure = |step: &mut dyn FnMut()| time(warmup, reps, step);
    say!(
        "local store: reduction threads {}, big-array bound {} elements; {warmup} warm-up runs, {reps} timed",
        config.threads, config.bigarray_bound
    );

    let mut w = PushPull::new(8, 16 * MIB);
    rows.push(report(
        "push_pull_8x16MiB",
        w.step_bytes(),
        &measure(&mut || w.step()),
    ));
    w.verify().expect("push_pull_8x16MiB result");
    drop(w);

    let mut w = PushPull::new(2, 64 * MIB);
    rows.push(report(
        "push_pull_2x64MiB",
        w.step_bytes(),
        &measure(&mut || w.step()),
    ));
    w.verify().expect("push_pull_2x64MiB result");
    drop(w);

    let mut w = SmallKeys::new(1000, 256);
    rows.push(report(
        "small_keys_1000x256",
        w.step_bytes(),
        &measure(&mut || w.step()),
    ));
    w.verify().expect("small_keys_1000x256 result");
    drop(w);

    match SgdMomentum::new(16 * MIB) {
        Ok(mut w) => rows.push(report(
            "sgd_momentum_16MiB",
            w.step_bytes(),
            &measure(&mut || w.step()),
        )),
        Err(e) => {
            let why = format!("set_optimizer failed: {e}");
            say!("  sgd_momentum_16MiB     skipped: {why}");
            rows.push(Row {
                name: "sgd_momentum_16MiB",
                median: Err(why),
                bytes: 7 * 16 * MIB,
            });
        }
    }

    // The reduction alone (the push of push_pull_8x16MiB) and the calibration, interleaved run
    // by run so that both see the same state of the machine; the calibration on one thread and
    // on every available thread, the faster giving the floor.
    let w = PushPull::new(8, 16 * MIB);
    let mut floor_threads = vec![1, available_threads()];
    floor_threads.dedup();
    let mut floors: Vec<Floor> = floor_threads
        .iter()
        .map(|&threads| Floor::new(64 * MIB, threads))
        .collect();
    let floor_bytes = (floors[0].add_bytes(), floors[0].copy_bytes());
    let times = time_interleaved(warmup, reps, 1 + 2 * floors.len(), |k| match k {
        0 => w.push(),
        k if k % 2 == 1 => floors[k / 2].add(),
        k => floors[k / 2 - 1].copy(),
    });
    rows.push(report("reduce_only_8x16MiB", w.push_bytes(), &times[0]));
    drop((w, floors));
    let mut best: Option<(usize, f64, f64)> = None; // (threads, add seconds, copy seconds)
    for (i, &threads) in floor_threads.iter().enumerate() {
        let add = secs(median(&times[1 + 2 * i]));
        let copy = secs(median(&times[2 + 2 * i]));
        say!(
            "  memory floor, {threads} thread(s): add {add:.6} s = {:.2} GB/s, copy {copy:.6} s = {:.2} GB/s",
            floor_bytes.0 as f64 / add / 1e9,
            floor_bytes.1 as f64 / copy / 1e9
        );
        if best.is_none_or(|(_, a, _)| add < a) {
            best = Some((threads, add, copy));
        }
    }
    let (floor_threads, floor_add, floor_copy) = best.expect("at least one thread count");
    let floor_gbps = floor_bytes.0 as f64 / floor_add / 1e9;
    let floor_copy_gbps = floor_bytes.1 as f64 / floor_copy / 1e9;

    let reduce = rows
        .iter()
        .find(|r| r.name == "reduce_only_8x16MiB")
        .expect("measured");
    let reduce_secs = *reduce.median.as_ref().expect("measured");
    let reduce_floor_secs = reduce.bytes as f64 / (floor_gbps * 1e9);
    let ratio = reduce_secs / reduce_floor_secs;

    say!();
    say!("{:<24} {:>12} {:>10}", "workload", "median (s)", "GB/s");
    for row in &rows {
        match &row.median {
            Ok(s) => say!(
                "{:<24} {:>12.6} {:>10.2}",
                row.name,
                s,
                row.bytes as f64 / s / 1e9
            ),
            Err(why) => say!("{:<24} {:>12} ({why})", row.name, "skipped"),
        }
    }
    say!(
        "{:<24} {:>12.6} {:>10.2}  ({floor_threads} thread(s); copy {floor_copy_gbps:.2} GB/s)",
        "memory_floor_add_64MiB",
        floor_add,
        floor_gbps
    );
    say!(
        "reduction 8 x 16 MiB: {reduce_secs:.6} s, floor (9 x 16 MiB at {floor_gbps:.2} GB/s) {reduce_floor_secs:.6} s, ratio {ratio:.3} (target <= 1.25)"
    );

    if json {
        let mut json = String::from("{");
        for row in &rows {
            match &row.median {
                Ok(s) => write!(json, "\"{}\": {s:e}, ", row.name),
                Err(_) => write!(json, "\"{}\": null, ", row.name),
            }
            .expect("write to a String");
        }
        write!(
            json,
            "\"memory_floor_add_64MiB\": {floor_add:e}, \"memory_floor_copy_64MiB\": {floor_copy:e}, \
             \"floor_gbps\": {floor_gbps}, \"floor_copy_gbps\": {floor_copy_gbps}, \"floor_threads\": {floor_threads}, \
             \"reduce_floor_seconds\": {reduce_floor_secs:e}, \"reduce_floor_ratio\": {ratio}, \
             \"reduction_threads\": {}, \"reps\": {reps}, \"warmup\": {warmup}}}",
            config.threads
        )
        .expect("write to a String");
        println!("{json}");
    }
}
