//! One worker of the `dist_sync` benchmark: times push + pull rounds against a running cluster
//! and, on rank 0, reports the median of each workload.
//!
//! The program is configured purely by MXNet's `DMLC_*` environment (see
//! `kvstore_dist::config`), as a worker (`DMLC_ROLE` unset or `worker`); a scheduler and the
//! servers must run alongside. `kvstore-dist/scripts/compare_mxnet_dist.py` starts such a
//! cluster (1 scheduler, 1 server, 2 workers on 127.0.0.1), and the same layout of MXNet 1.9.1,
//! and compares the two. By hand:
//!
//! ```text
//! cargo build --release -p kvstore-cli -p kvstore-dist --example dist_bench
//! export DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2
//! export DMLC_NODE_HOST=127.0.0.1
//! DMLC_ROLE=scheduler target/release/kvstore scheduler &
//! DMLC_ROLE=server target/release/kvstore server &
//! DMLC_ROLE=worker target/release/examples/dist_bench &
//! DMLC_ROLE=worker target/release/examples/dist_bench --reps 21
//! ```
//!
//! Every worker must get the same `--reps`, `--warmup` and `--only` options (they run the same
//! collective calls). Options:
//! - `--json`: rank 0 prints one JSON object on stdout (workload name -> median seconds, plus
//!   `create_seconds`, `num_workers`, `reps`, `warmup`); the human-readable report goes to
//!   stderr;
//! - `--reps N`: timed rounds per workload (default 15);
//! - `--warmup N`: untimed rounds first (default 3);
//! - `--only TEXT`: run only the workloads whose name contains `TEXT` (repeatable);
//! - `--store NAME`: the store to create (default `dist_sync`; `kvstore-pslite`'s
//!   `pslite_bench` example runs this program as `pslite_dist_sync`, a worker of a job whose
//!   scheduler and servers are MXNet's);
//! - `--compression TYPE[:THRESHOLD]`: compress the pushes (`2bit`, `1bit`; MXNet's default
//!   threshold 0.5); the pulled sums are then what the codec sent: with 2-bit and a threshold
//!   `t` of at most 1 and a multiple of 1/64, `workers × t` (every value pushed is at least 1,
//!   so every worker sends `+t` every round), checked; otherwise, and with 1-bit, not checked;
//! - `--optimizer sgd[:LR]`: sgd on the servers (learning rate 0.25 by default), set before
//!   any key; the rounds of `push_pull` and `small_keys` then step the weights, and their check
//!   is one more step, which must take `LR × Σ gradients` off every element.
//!
//! The workloads (all `f32`, arrays allocated and keys initialised before timing); a round is a
//! push then a pull by every worker, so the server merges one push per worker and key:
//! - `push_pull_4B`: one int key of a single element, pushed, pulled into an output: the
//!   latency of a sync round (both workers' pushes merged, then both pulls answered). It runs
//!   [`TINY_ROUNDS_FACTOR`] times `--reps` rounds (and `--warmup`), its rounds being short;
//! - `push_pull_4MiB`: one int key, a 4 MiB array (1,048,576 elements), pushed, pulled into an
//!   output;
//! - `push_pull_64MiB`: the same with a 64 MiB array;
//! - `small_keys_1000x256`: 1000 int keys of 256 elements each, one list push and one list
//!   pull per round;
//! - `init_1000x256`: 1000 new int keys of 256 elements each, one list init and a barrier per
//!   round (MXNet's dist `init` ends with a barrier); rank 0's values must be the ones kept.
//! - `row_sparse_1000of100000x64`: an embedding table of 100,000 rows of 64 elements, stored
//!   row-sparse with every row, updated on the servers by `sgd` (learning rate 0.1, weight
//!   decay 0.001, lazy); each round every worker pushes a row-sparse gradient of 1,000 rows
//!   (every 100th) and `row_sparse_pull`s those rows. It sets an optimizer, so it runs after
//!   the others (with the next); afterwards the pulled rows must be those of the lazy update
//!   (to float32 rounding) and a row never pushed must still be 1 (a dense update would have
//!   decayed it). Skipped with
//!   `--compression` (MXNet does not compress row-sparse pushes).
//! - `dense_rows_1000of100000x64`: the same table stored dense (Gluon's
//!   `Embedding(sparse_grad=True)`: a dense weight, row-sparse gradients), the same push of
//!   1,000 rows, then a dense pull of the whole weight (as Gluon's `Trainer` pulls a dense
//!   weight); checked alike. Skipped with `--compression`.
//!
//! Each workload starts with a barrier of all workers; each worker times its own rounds. Worker
//! `r` pushes arrays filled with `r + 1` (`0.001 * (r + 1)` for the row-sparse gradients) (times `k % 7 + 1` for small key `k`). After the timed
//! rounds, outside the timed region, each worker checks that the pushed arrays are unchanged,
//! then pulls into zeroed outputs, which must hold the sum over every worker's pushes; a
//! mismatch ends the program with an error. Throughput is the bytes one worker pushes and pulls
//! per round divided by the median round.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kvstore_base::{DType, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_dist as _;

/// One mebibyte.
const MIB: usize = 1 << 20;

/// Bytes of one `f32`.
const F32: usize = std::mem::size_of::<f32>();

/// `push_pull_4B` runs this many times `--reps` (and `--warmup`) rounds: they take
/// microseconds, and a median of more of them moves less between runs.
const TINY_ROUNDS_FACTOR: usize = 20;

struct Options {
    json: bool,
    reps: usize,
    warmup: usize,
    only: Vec<String>,
    /// `--compression TYPE[:THRESHOLD]`: gradient compression of the pushes.
    compression: Option<std::collections::BTreeMap<String, String>>,
    /// `--store NAME`: the store to create.
    store: String,
    /// `--optimizer sgd[:LR]`: sgd on the servers, with this learning rate.
    sgd: Option<f32>,
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
        compression: None,
        store: "dist_sync".to_string(),
        sgd: None,
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
            "--store" => options.store = value("--store")?,
            "--compression" => {
                let text = value("--compression")?;
                let (kind, threshold) = match text.split_once(':') {
                    Some((k, t)) => (k.to_string(), Some(t.to_string())),
                    None => (text, None),
                };
                let mut params = std::collections::BTreeMap::from([("type".to_string(), kind)]);
                if let Some(t) = threshold {
                    params.insert("threshold".to_string(), t);
                }
                options.compression = Some(params);
            }
            "--optimizer" => {
                let text = value("--optimizer")?;
                let lr = match text.split_once(':') {
                    None if text == "sgd" => 0.25,
                    Some(("sgd", lr)) => lr
                        .parse()
                        .map_err(|_| format!("--optimizer {text}: a learning rate, not {lr:?}"))?,
                    _ => return Err(format!("--optimizer {text}: sgd[:LR] is offered")),
                };
                options.sgd = Some(lr);
            }
            "-h" | "--help" => {
                println!(
                    "usage: dist_bench [--json] [--reps N] [--warmup N] [--only TEXT]... \
                     [--store NAME] [--compression TYPE[:THRESHOLD]] [--optimizer sgd[:LR]]"
                );
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
    /// Sorted round timings.
    times: Vec<Duration>,
    /// Bytes one worker pushes and pulls per round.
    bytes: usize,
}

impl Row {
    fn median(&self) -> f64 {
        let (t, n) = (&self.times, self.times.len());
        let m = if n % 2 == 1 {
            t[n / 2]
        } else {
            (t[n / 2 - 1] + t[n / 2]) / 2
        };
        m.as_secs_f64()
    }
}

/// Runs `round` `warmup` times, then `reps` times timing each; returns the sorted timings.
fn time_rounds(
    warmup: usize,
    reps: usize,
    mut round: impl FnMut() -> kvstore_base::Result<()>,
) -> Result<Vec<Duration>, String> {
    for i in 0..warmup {
        round().map_err(|e| format!("warm-up round {i}: {e}"))?;
    }
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps {
        let start = Instant::now();
        round().map_err(|e| format!("timed round {i}: {e}"))?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times)
}

/// A dense `f32` vector of `elems` elements filled with `value`.
fn f32_array(elems: usize, value: f64) -> NDArray {
    NDArray::full(&[elems], value, DType::F32)
}

/// Checks that every element of `array` is `expected`.
fn check(what: &str, array: &NDArray, expected: f32) -> Result<(), String> {
    let values = array
        .as_slice::<f32>()
        .ok_or(format!("{what} is not a dense f32 array"))?;
    match values.iter().position(|&v| v != expected) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: element {i} is {}, expected {expected}",
            values[i]
        )),
    }
}

/// Sets every element of `array` to zero.
fn zero(array: &mut NDArray) -> Result<(), String> {
    array
        .as_slice_mut::<f32>()
        .ok_or("output is not a dense f32 array")?
        .fill(0.0);
    Ok(())
}

/// One key of `elems` elements: push, then pull into an output; `rounds_factor` times the
/// rounds `options` asks for.
fn push_pull(
    kv: &dyn KVStoreBase,
    options: &Options,
    name: &'static str,
    (key, elems): (i32, usize),
    rounds_factor: usize,
) -> Result<Row, String> {
    let at = |e: kvstore_base::Error| format!("{name}: {e}");
    let rank = kv.rank();
    let total = expected_pull(options, kv.num_workers(), 1.0);
    let mine = (rank + 1) as f32;
    kv.init(key, &f32_array(elems, 0.0)).map_err(at)?;
    let grad = f32_array(elems, f64::from(mine));
    let mut out = f32_array(elems, 0.0);
    kv.barrier().map_err(at)?;

    let (warmup, reps) = (options.warmup, options.reps);
    let times = time_rounds(warmup * rounds_factor, reps * rounds_factor, || {
        kv.push(key, &grad)?;
        kv.pull(key, &mut out)
    })
    .map_err(|e| format!("{name}: {e}"))?;

    check(&format!("{name}: the pushed array"), &grad, mine)?;
    if let Some(lr) = options.sgd {
        check_sgd_step(kv, name, &[key], &[grad], &[1.0], lr)?;
        return Ok(Row {
            name,
            times,
            bytes: 2 * elems * F32,
        });
    }
    zero(&mut out)?;
    kv.pull(key, &mut out).map_err(at)?;
    if let Some(total) = total {
        check(&format!("{name}: the pulled sum"), &out, total)?;
    }
    Ok(Row {
        name,
        times,
        bytes: 2 * elems * F32,
    })
}

/// `count` int keys of `elems` elements: one list push and one list pull per round.
fn small_keys(
    kv: &dyn KVStoreBase,
    options: &Options,
    name: &'static str,
    count: i32,
    elems: usize,
) -> Result<Row, String> {
    let at = |e: kvstore_base::Error| format!("{name}: {e}");
    let rank = kv.rank();
    let workers = kv.num_workers();
    let keys: Vec<i32> = (100..100 + count).collect();
    let scale = |k: i32| (k % 7 + 1) as f32;
    let zeros: Vec<NDArray> = keys.iter().map(|_| f32_array(elems, 0.0)).collect();
    kv.init(&keys, &zeros).map_err(at)?;
    let grads: Vec<NDArray> = keys
        .iter()
        .map(|&k| f32_array(elems, f64::from(scale(k) * (rank + 1) as f32)))
        .collect();
    let mut outs = zeros;
    kv.barrier().map_err(at)?;

    let times = time_rounds(options.warmup, options.reps, || {
        kv.push(&keys, &grads)?;
        kv.pull(&keys, &mut outs)
    })
    .map_err(|e| format!("{name}: {e}"))?;

    for (&k, g) in keys.iter().zip(&grads) {
        check(
            &format!("{name}: the pushed array of key {k}"),
            g,
            scale(k) * (rank + 1) as f32,
        )?;
    }
    if let Some(lr) = options.sgd {
        let scales: Vec<f32> = keys.iter().map(|&k| scale(k)).collect();
        check_sgd_step(kv, name, &keys, &grads, &scales, lr)?;
        return Ok(Row {
            name,
            times,
            bytes: 2 * count as usize * elems * F32,
        });
    }
    for out in &mut outs {
        zero(out)?;
    }
    kv.pull(&keys, &mut outs).map_err(at)?;
    for (&k, out) in keys.iter().zip(&outs) {
        if let Some(total) = expected_pull(options, workers, scale(k)) {
            check(&format!("{name}: the pulled sum of key {k}"), out, total)?;
        }
    }
    Ok(Row {
        name,
        times,
        bytes: 2 * count as usize * elems * F32,
    })
}

/// Each round inits `count` new int keys of `elems` elements with one list call, then waits at
/// a barrier (MXNet's dist init ends with one): every worker declares, rank 0's values are
/// kept.
fn init_keys(
    kv: &dyn KVStoreBase,
    options: &Options,
    name: &'static str,
    count: i32,
    elems: usize,
) -> Result<Row, String> {
    let at = |e: kvstore_base::Error| format!("{name}: {e}");
    let rank = kv.rank();
    let scale = |k: i32| (k % 7 + 1) as f32;
    // Worker r declares r + 1 times rank 0's values.
    let values: Vec<NDArray> = (0..count)
        .map(|k| f32_array(elems, f64::from(scale(k) * (rank + 1) as f32)))
        .collect();
    kv.barrier().map_err(at)?;
    let mut next = 1_000_000;
    let mut keys: Vec<i32> = Vec::new();
    let times = time_rounds(options.warmup, options.reps, || {
        keys = (next..next + count).collect();
        next += count;
        kv.init(&keys, &values)?;
        kv.barrier()
    })
    .map_err(|e| format!("{name}: {e}"))?;
    let mut outs: Vec<NDArray> = keys.iter().map(|_| f32_array(elems, 0.0)).collect();
    kv.pull(&keys, &mut outs).map_err(at)?;
    for (i, out) in outs.iter().enumerate() {
        check(
            &format!("{name}: the value of key {}", keys[i]),
            out,
            scale(i as i32),
        )?;
    }
    Ok(Row {
        name,
        times,
        bytes: count as usize * elems * F32,
    })
}

/// How the embedding table of [`row_sparse`] is stored and read.
#[derive(Clone, Copy, PartialEq)]
enum Table {
    /// Row-sparse, every row stored; each round `row_sparse_pull`s the pushed rows.
    RowSparse,
    /// Dense; each round pulls the whole table.
    Dense,
}

/// An embedding table of `rows` x `cols`, updated on the servers by lazy sgd; each round
/// pushes a row-sparse gradient of `touched` rows and reads the table as `table` says.
fn row_sparse(
    kv: &dyn KVStoreBase,
    options: &Options,
    name: &'static str,
    (rows, cols, touched): (usize, usize, usize),
    table_kind: Table,
) -> Result<Row, String> {
    let key: i32 = if table_kind == Table::Dense { 8 } else { 7 };
    const LR: f64 = 0.1;
    const WD: f64 = 0.001;
    let at = |e: kvstore_base::Error| format!("{name}: {e}");
    let rank = kv.rank();
    let every_row: Vec<i64> = (0..rows as i64).collect();
    let table = NDArray::full(&[rows, cols], 1.0, DType::F32);
    let table = match table_kind {
        Table::RowSparse => table.retain_rows(&every_row).map_err(at)?,
        Table::Dense => table,
    };
    kv.init(key, &table).map_err(at)?;
    drop(table);
    kv.set_optimizer(
        &OptimizerSpec::new("sgd")
            .with("learning_rate", LR)
            .with("wd", WD),
    )
    .map_err(at)?;
    let stride = rows / touched;
    let ids: Vec<i64> = (0..touched).map(|i| (i * stride) as i64).collect();
    let mine = 0.001 * (rank + 1) as f64;
    let grad_rows = NDArray::full(&[touched, cols], mine, DType::F32);
    let grad = NDArray::row_sparse(&[rows, cols], ids.clone(), &grad_rows).map_err(at)?;
    let row_ids = NDArray::from_vec(&[touched], ids.clone()).map_err(at)?;
    let empty = NDArray::zeros(&[0, cols], DType::F32);
    let mut out = match table_kind {
        Table::RowSparse => NDArray::row_sparse(&[rows, cols], Vec::new(), &empty).map_err(at)?,
        Table::Dense => NDArray::zeros(&[rows, cols], DType::F32),
    };
    kv.barrier().map_err(at)?;

    let times = time_rounds(options.warmup, options.reps, || {
        kv.push(key, &grad)?;
        match table_kind {
            Table::RowSparse => kv.row_sparse_pull(key, &mut out, &row_ids),
            Table::Dense => kv.pull(key, &mut out),
        }
    })
    .map_err(|e| format!("{name}: {e}"))?;

    // Every round applied w <- w - lr * (g + wd * w) to the pushed rows, g summed over workers.
    let g: f64 = (0..kv.num_workers()).map(|r| 0.001 * (r + 1) as f64).sum();
    let rounds = options.warmup + options.reps;
    let expected = (0..rounds).fold(1.0f64, |w, _| w - LR * (g + WD * w));
    // Each float32 round rounds; the error stays within a few ulps of 1 per round.
    let tolerance = 1e-6 + 2e-7 * rounds as f64;
    let pulled = out.to_dense();
    let values = pulled
        .as_slice::<f32>()
        .ok_or("the pulled rows are not f32")?;
    for &id in &ids {
        let v = values[id as usize * cols];
        if (f64::from(v) - expected).abs() > tolerance {
            return Err(format!(
                "{name}: row {id} is {v}, expected {expected} after the lazy updates"
            ));
        }
    }
    if table_kind == Table::RowSparse {
        let untouched = NDArray::from_vec(&[1], vec![1i64]).map_err(at)?;
        kv.row_sparse_pull(key, &mut out, &untouched).map_err(at)?;
    }
    let row1 = out.to_dense();
    let row1 = &row1.as_slice::<f32>().ok_or("the pulled row is not f32")?[cols..2 * cols];
    if let Some(v) = row1.iter().find(|&&v| v != 1.0) {
        return Err(format!(
            "{name}: row 1 was never pushed but holds {v}, not 1"
        ));
    }
    let pulled = match table_kind {
        Table::RowSparse => touched,
        Table::Dense => rows,
    };
    Ok(Row {
        name,
        times,
        bytes: (touched + pulled) * cols * F32,
    })
}

/// With `--optimizer sgd:LR`, the check after a workload's rounds: every worker pulls the
/// weights, meets the others, pushes its gradients (`scale × (r + 1)` for worker `r`) once more
/// and pulls again; sgd must have taken `LR × scale × Σ(r + 1)` off every element, in `f32`.
fn check_sgd_step(
    kv: &dyn KVStoreBase,
    name: &str,
    keys: &[i32],
    grads: &[NDArray],
    scales: &[f32],
    lr: f32,
) -> Result<(), String> {
    let at = |e: kvstore_base::Error| format!("{name}: {e}");
    let zeros = || -> Vec<NDArray> { grads.iter().map(|g| f32_array(g.size(), 0.0)).collect() };
    let mut before = zeros();
    kv.pull(keys, &mut before).map_err(at)?;
    kv.barrier().map_err(at)?;
    kv.push(keys, grads).map_err(at)?;
    let mut after = zeros();
    kv.pull(keys, &mut after).map_err(at)?;
    let step = lr * sum_over_workers(kv.num_workers());
    for (((key, b), a), scale) in keys.iter().zip(&before).zip(&after).zip(scales) {
        let w = b.as_slice::<f32>().ok_or("a dense f32 weight")?[0];
        check(
            &format!("{name}: key {key} after an sgd step from {w}"),
            a,
            w - step * scale,
        )?;
    }
    Ok(())
}

/// The sum of `r + 1` over the ranks `r` of `workers` workers.
fn sum_over_workers(workers: usize) -> f32 {
    (workers * (workers + 1) / 2) as f32
}

/// What every pulled element must be once each worker `r` pushed `scale × (r + 1)` every round:
/// the sum over the workers; with 2-bit compression of threshold `t <= 1`, `workers × t` (each
/// value pushed is at least 1, so a worker's residual never falls below `t` and it sends `+t`
/// every round), when `t` is a multiple of 1/64 (so that every server, which may read `t` to 6
/// decimals, as MXNet's do, sums it exactly); `None` (not checked) otherwise, and with 1-bit.
fn expected_pull(options: &Options, workers: usize, scale: f32) -> Option<f32> {
    let Some(params) = &options.compression else {
        return Some(scale * sum_over_workers(workers));
    };
    let threshold: f32 = params
        .get("threshold")
        .map_or(Some(0.5), |t| t.parse().ok())?;
    let two_bit = params.get("type").map(String::as_str) == Some("2bit");
    let exact = (threshold * 64.0).fract() == 0.0;
    (two_bit && exact && threshold > 0.0 && threshold <= 1.0).then_some(workers as f32 * threshold)
}

fn run(options: &Options) -> Result<(), String> {
    let started = Instant::now();
    let kv = kvstore_base::create(&options.store)
        .map_err(|e| format!("create({}): {e}", options.store))?;
    let create_seconds = started.elapsed().as_secs_f64();
    let rank = kv.rank();
    if let Some(params) = &options.compression {
        kv.set_gradient_compression(params)
            .map_err(|e| format!("set_gradient_compression: {e}"))?;
    }
    if let Some(lr) = options.sgd {
        let sgd = OptimizerSpec::new("sgd").with("learning_rate", f64::from(lr));
        kv.set_optimizer(&sgd)
            .map_err(|e| format!("set_optimizer: {e}"))?;
    }
    measure(&*kv, options, create_seconds).map_err(|e| format!("worker rank {rank}: {e}"))
}

/// Runs the selected workloads; rank 0 reports.
fn measure(kv: &dyn KVStoreBase, options: &Options, create_seconds: f64) -> Result<(), String> {
    let (rank, workers) = (kv.rank(), kv.num_workers());
    let (json, leader) = (options.json, rank == 0);
    // The human-readable report (rank 0 only): on stdout, or on stderr when stdout carries the
    // JSON.
    macro_rules! say {
        ($($arg:tt)*) => {
            if leader {
                if json { eprintln!($($arg)*) } else { println!($($arg)*) }
            }
        };
    }
    say!(
        "{}: {workers} worker(s), store created in {create_seconds:.3} s; \
         {} warm-up rounds, {} timed",
        options.store,
        options.warmup,
        options.reps
    );

    let mut rows = Vec::new();
    for (name, key, elems, rounds_factor) in [
        ("push_pull_4B", 7, 1, TINY_ROUNDS_FACTOR),
        ("push_pull_4MiB", 3, 4 * MIB / F32, 1),
        ("push_pull_64MiB", 5, 64 * MIB / F32, 1),
    ] {
        if options.wanted(name) {
            rows.push(push_pull(kv, options, name, (key, elems), rounds_factor)?);
        }
    }
    if options.wanted("small_keys_1000x256") {
        rows.push(small_keys(kv, options, "small_keys_1000x256", 1000, 256)?);
    }
    if options.wanted("init_1000x256") {
        rows.push(init_keys(kv, options, "init_1000x256", 1000, 256)?);
    }
    // It sets an optimizer on the servers: last.
    for (name, table) in [
        ("row_sparse_1000of100000x64", Table::RowSparse),
        ("dense_rows_1000of100000x64", Table::Dense),
    ] {
        if options.wanted(name) && options.compression.is_none() {
            rows.push(row_sparse(kv, options, name, (100_000, 64, 1_000), table)?);
        }
    }
    // Nobody leaves while another worker still checks its results.
    kv.barrier().map_err(|e| format!("final barrier: {e}"))?;

    say!();
    say!(
        "{:<22} {:>12} {:>10} {:>10} {:>8}",
        "workload",
        "median (s)",
        "min (s)",
        "max (s)",
        "GB/s"
    );
    for row in &rows {
        say!(
            "{:<22} {:>12.6} {:>10.6} {:>10.6} {:>8.2}",
            row.name,
            row.median(),
            row.times[0].as_secs_f64(),
            row.times[row.times.len() - 1].as_secs_f64(),
            row.bytes as f64 / row.median() / 1e9
        );
    }

    if json && leader {
        let mut out = String::from("{");
        for row in &rows {
            write!(out, "\"{}\": {:e}, ", row.name, row.median()).expect("write to a String");
        }
        write!(
            out,
            "\"create_seconds\": {create_seconds:e}, \"num_workers\": {workers}, \
             \"reps\": {}, \"warmup\": {}}}",
            options.reps, options.warmup
        )
        .expect("write to a String");
        println!("{out}");
    }
    Ok(())
}

/// The program (`pub(crate)`: `kvstore-pslite`'s `pslite_bench` example runs it too).
pub(crate) fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("dist_bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dist_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
