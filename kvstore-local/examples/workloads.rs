//! Times the `local` store's benchmark workloads with plain wall-clock timing and reports the
//! median of each, plus the machine's memory-bandwidth floor measured in the same run.
//!
//! ```text
//! MXNET_KVSTORE_REDUCTION_NTHREADS=2 cargo run --release -p kvstore-local --example workloads
//! cargo run --release -p kvstore-local --example workloads -- --json --reps 21 --warmup 3
//! ```
//!
//! Options:
//! - `--json`: print one JSON object on stdout (workload name -> median seconds, `null` for a
//!   skipped workload, plus the floor's figures); the human-readable report goes to stderr;
//! - `--reps N`: timed repetitions per workload (default 15);
//! - `--warmup N`: untimed runs first (default 3);
//! - `--only TEXT`: run only the workloads whose name contains `TEXT` (repeatable; `floor`
//!   selects the reduction and the calibration, which always run together).
//!
//! The workloads are those of `benches/local.rs` (see `benches/common/mod.rs`). The memory
//! floor is `c = a + b` over 64 MiB `f32` slices, timed on one thread and on every available
//! thread; the faster gives the floor bandwidth (bytes moved: two slices read, one written).
//! The reduction's floor time is what reading 8 inputs and writing 1 output of 16 MiB takes at
//! that bandwidth, and the report gives the measured reduction (`reduce_only_8x16MiB`, the push
//! alone) as a multiple of it. The reduction and the calibration are timed interleaved, run by
//! run, so that both see the same state of the machine.

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
    only: Vec<String>,
}

impl Options {
    fn wanted(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        json: false,
        reps: 15,
        warmup: 3,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let number = |text: String, name: &str| {
            text.parse::<usize>()
                .map_err(|_| format!("{name} needs a number, got {text:?}"))
        };
        match arg.as_str() {
            "--json" => options.json = true,
            "--reps" => options.reps = number(value("--reps")?, "--reps")?.max(1),
            "--warmup" => options.warmup = number(value("--warmup")?, "--warmup")?,
            "--only" => options.only.push(value("--only")?),
            "-h" | "--help" => {
                println!("usage: workloads [--json] [--reps N] [--warmup N] [--only TEXT]...");
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

/// The calibration and the reduction measured against it.
struct FloorFigures {
    threads: usize,
    add_secs: f64,
    copy_secs: f64,
    gbps: f64,
    copy_gbps: f64,
    reduce_floor_secs: f64,
    ratio: f64,
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

    for (name, devices, mib) in [("push_pull_8x16MiB", 8, 16), ("push_pull_2x64MiB", 2, 64)] {
        if options.wanted(name) {
            let mut w = PushPull::new(devices, mib * MIB);
            rows.push(report(name, w.step_bytes(), &measure(&mut || w.step())));
            w.verify().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    if options.wanted("small_keys_1000x256") {
        let mut w = SmallKeys::new(1000, 256);
        rows.push(report(
            "small_keys_1000x256",
            w.step_bytes(),
            &measure(&mut || w.step()),
        ));
        w.verify().expect("small_keys_1000x256 result");
    }

    if options.wanted("sgd_momentum_16MiB") {
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
    }

    // The reduction alone (the push of push_pull_8x16MiB) and the calibration, interleaved;
    // the calibration on one thread and on every available thread, the faster giving the floor.
    let mut floor = None;
    if options.wanted("reduce_only_8x16MiB") || options.wanted("memory_floor") {
        let w = PushPull::new(8, 16 * MIB);
        let mut threads = vec![1, available_threads()];
        threads.dedup();
        let mut floors: Vec<Floor> = threads.iter().map(|&t| Floor::new(64 * MIB, t)).collect();
        let (add_bytes, copy_bytes) = (floors[0].add_bytes(), floors[0].copy_bytes());
        let times = time_interleaved(warmup, reps, 1 + 2 * floors.len(), |k| match k {
            0 => w.push(),
            k if k % 2 == 1 => floors[k / 2].add(),
            k => floors[k / 2 - 1].copy(),
        });
        let reduce = report("reduce_only_8x16MiB", w.push_bytes(), &times[0]);
        let mut best: Option<(usize, f64, f64)> = None; // (threads, add seconds, copy seconds)
        for (i, &t) in threads.iter().enumerate() {
            let add = secs(median(&times[1 + 2 * i]));
            let copy = secs(median(&times[2 + 2 * i]));
            say!(
                "  memory floor, {t} thread(s): add {add:.6} s = {:.2} GB/s, copy {copy:.6} s = {:.2} GB/s",
                add_bytes as f64 / add / 1e9,
                copy_bytes as f64 / copy / 1e9
            );
            if best.is_none_or(|(_, a, _)| add < a) {
                best = Some((t, add, copy));
            }
        }
        let (threads, add_secs, copy_secs) = best.expect("at least one thread count");
        let gbps = add_bytes as f64 / add_secs / 1e9;
        let reduce_floor_secs = reduce.bytes as f64 / (gbps * 1e9);
        let ratio = reduce.median.as_ref().expect("measured") / reduce_floor_secs;
        rows.push(reduce);
        floor = Some(FloorFigures {
            threads,
            add_secs,
            copy_secs,
            gbps,
            copy_gbps: copy_bytes as f64 / copy_secs / 1e9,
            reduce_floor_secs,
            ratio,
        });
    }

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
    if let Some(f) = &floor {
        say!(
            "{:<24} {:>12.6} {:>10.2}  ({} thread(s); copy {:.2} GB/s)",
            "memory_floor_add_64MiB",
            f.add_secs,
            f.gbps,
            f.threads,
            f.copy_gbps
        );
        say!(
            "reduction 8 x 16 MiB: floor (9 x 16 MiB at {:.2} GB/s) {:.6} s, measured {:.3}x the floor (target <= 1.25)",
            f.gbps,
            f.reduce_floor_secs,
            f.ratio
        );
    }

    if json {
        let mut out = String::from("{");
        for row in &rows {
            match &row.median {
                Ok(s) => write!(out, "\"{}\": {s:e}, ", row.name),
                Err(_) => write!(out, "\"{}\": null, ", row.name),
            }
            .expect("write to a String");
        }
        if let Some(f) = &floor {
            write!(
                out,
                "\"memory_floor_add_64MiB\": {:e}, \"memory_floor_copy_64MiB\": {:e}, \
                 \"floor_gbps\": {:e}, \"floor_copy_gbps\": {:e}, \"floor_threads\": {}, \
                 \"reduce_floor_seconds\": {:e}, \"reduce_floor_ratio\": {:e}, ",
                f.add_secs,
                f.copy_secs,
                f.gbps,
                f.copy_gbps,
                f.threads,
                f.reduce_floor_secs,
                f.ratio
            )
            .expect("write to a String");
        }
        write!(
            out,
            "\"reduction_threads\": {}, \"reps\": {reps}, \"warmup\": {warmup}}}",
            config.threads
        )
        .expect("write to a String");
        println!("{out}");
    }
}
