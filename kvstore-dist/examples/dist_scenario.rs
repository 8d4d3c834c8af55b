//! One program for every role of a dist job, used by the multi-process tests
//! (`kvstore-dist/tests/processes.rs`): started with `DMLC_ROLE=scheduler` or `server`, the
//! store's `create` runs that role until the job ends and exits the process, as in MXNet;
//! started as a worker (`DMLC_ROLE` unset or `worker`), it runs the scenario named by its first
//! argument.
//!
//! ```text
//! cargo build -p kvstore-dist --example dist_scenario
//! export DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2
//! export DMLC_NODE_HOST=127.0.0.1 KVSTORE_TIMEOUT_SECS=5
//! DMLC_ROLE=scheduler target/debug/examples/dist_scenario sum &
//! DMLC_ROLE=server target/debug/examples/dist_scenario sum &
//! DMLC_ROLE=worker target/debug/examples/dist_scenario sum &
//! DMLC_ROLE=worker target/debug/examples/dist_scenario sum
//! ```
//!
//! A worker prints its results on stdout as lines `RESULT <name> <JSON>` (always a line
//! `RESULT rank <rank>` first), and `READY` once a scenario is set up when the test must act
//! then (`serverloss`). It exits with status 0 on success; on failure it prints
//! `error: <operation> failed after <seconds> s: <error>` on stderr and exits with status 1
//! (after dropping the store, i.e. saying goodbye, as a program returning an error does).
//!
//! Scenarios (every worker of a job runs the same one):
//! - `sum`: init key 3 (`[2, 3]`, rank `r` offers `r + 10`: rank 0's value is kept), then three
//!   rounds where rank `r` pushes `(r + 1) * (round + 1)` and pulls (`RESULT init`,
//!   `RESULT round<i>`);
//! - `async` (`dist_async`): optimizer `test` (`w += rescale_grad * grad`), init key 7 to
//!   zeros, ten pushes of `r + 1`, barrier, pull (`RESULT value`);
//! - `optimizer`: sgd with momentum on the servers, init key 0 to ones, five rounds of push
//!   [`grad(step, rank)`] and pull (`RESULT weights`);
//! - `bigkey`: int keys 1 (10,007 elements) and 2 (5 elements) in one call, rank `r` pushes
//!   `(i % 1000) * (r + 1)` and `r + 1` with pushpull (`RESULT big`, `RESULT small`); run it
//!   with `MXNET_KVSTORE_BIGARRAY_BOUND` below 10,007 so that key 1 is split over the servers;
//! - `strkeys`: string keys `weight` (`[3, 4]`), `bias` (`[4]`), `emb.0` (`[2, 2]`), rank `r`
//!   pushes `(r + 1) * (k + 1)` for the `k`-th key, pull as f64 (`RESULT <key>`);
//! - `thousand`: int keys 0..1000 of `k % 7 + 1` elements in one init, one push and one pull,
//!   rank `r` pushes `(r + 1) * (k % 13 + 1)` (`RESULT values`: a list per key);
//! - `die`: key 5 initialised; rank 1 then exits 300 ms later with status 3 (`process::exit`:
//!   the store is not dropped, no goodbye) while rank 0 pushes and pulls key 5 (a sync push
//!   is acknowledged once merged, the pull waits for the round), which must fail;
//! - `stall`: key 5 initialised; rank 1 then sleeps `KVSTORE_TIMEOUT_SECS + 2` seconds
//!   without pushing (then leaves normally), while rank 0 pushes and pulls key 5, which must
//!   fail after about the timeout;
//! - `leave`: key 5 initialised; rank 1 then leaves the job normally (drops the store: goodbye)
//!   without pushing, while rank 0 waits 500 ms, pushes and pulls key 5, which must fail;
//! - `serverloss`: keys 1 (split over the servers as in `bigkey`), 2 and 3 initialised, then
//!   `READY` and push/pull rounds (checking the sums) for up to 60 s; the test kills a server
//!   meanwhile, which must fail the workers;
//! - `recover`: optimizer `test` (`w += grad`), init key 0 to zeros, pull (`RESULT start`:
//!   above 0 in a worker that took a lost worker's place), then steps of pushpull of ones
//!   until the weight reaches 40, printing `STEP <weight>` after each and retrying a failed
//!   step (`RESULT retries`, `RESULT final`); the test kills rank 1 meanwhile and starts a new
//!   worker, which takes its place and finishes the job with rank 0.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kvstore_base::{DType, Error, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_dist as _;

/// The scenarios, and the store type each creates.
const SCENARIOS: &[(&str, &str)] = &[
    ("sum", "dist_sync"),
    ("async", "dist_async"),
    ("optimizer", "dist_sync"),
    ("bigkey", "dist_sync"),
    ("strkeys", "dist_sync"),
    ("thousand", "dist_sync"),
    ("die", "dist_sync"),
    ("stall", "dist_sync"),
    ("serverloss", "dist_sync"),
    ("leave", "dist_sync"),
    ("recover", "dist_sync"),
];

/// The failure of a scenario: the operation, when it started, and the error.
struct Failure {
    operation: String,
    elapsed: Duration,
    error: String,
}

type Outcome = Result<(), Failure>;

/// Runs `f` as `operation`, timing it for the error report.
fn op<T>(operation: &str, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Failure> {
    let start = Instant::now();
    f().map_err(|e| Failure {
        operation: operation.to_string(),
        elapsed: start.elapsed(),
        error: e.to_string(),
    })
}

/// A failure that is not an error of the store (a wrong value).
fn wrong(what: String) -> Failure {
    Failure {
        operation: "check".to_string(),
        elapsed: Duration::ZERO,
        error: what,
    }
}

fn result(name: &str, value: impl serde::Serialize) {
    let json = serde_json::to_string(&value).expect("results are plain numbers");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "RESULT {name} {json}");
    let _ = out.flush();
}

fn f32s(a: &NDArray) -> Vec<f32> {
    a.to_vec::<f32>().expect("f32 arrays")
}

/// The timeout the job runs with (as the store reads it), in seconds.
fn timeout_secs() -> f64 {
    std::env::var("KVSTORE_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(60.0)
}

/// The optimizer of the `optimizer` scenario (the test computes the same with `local`).
fn sgd_spec() -> OptimizerSpec {
    OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9)
        .with("rescale_grad", 0.5)
}

/// Worker `rank`'s gradient of round `step` in the `optimizer` scenario.
fn grad(step: usize, rank: usize) -> NDArray {
    NDArray::from_vec(
        &[4],
        (0..4)
            .map(|i| (i + step * 3 + rank) as f32 * 0.25)
            .collect(),
    )
    .expect("4 values")
}

/// Sum of `r + 1` over every rank.
fn rank_sum(kv: &dyn KVStoreBase) -> f32 {
    let w = kv.num_workers() as f32;
    w * (w + 1.0) / 2.0
}

fn sum(kv: &dyn KVStoreBase) -> Outcome {
    let rank = kv.rank() as f64;
    op("init", || {
        kv.init(3, &NDArray::full(&[2, 3], rank + 10.0, DType::F32))
    })?;
    let mut w = NDArray::zeros(&[2, 3], DType::F32);
    op("pull", || kv.pull(3, &mut w))?;
    result("init", f32s(&w));
    for round in 0..3 {
        let g = NDArray::full(&[2, 3], (rank + 1.0) * (round as f64 + 1.0), DType::F32);
        op("push", || kv.push(3, &g))?;
        op("pull", || kv.pull(3, &mut w))?;
        result(&format!("round{round}"), f32s(&w));
    }
    Ok(())
}

fn async_updates(kv: &dyn KVStoreBase) -> Outcome {
    op("set_optimizer", || {
        kv.set_optimizer(&OptimizerSpec::new("test").with("rescale_grad", 1.0))
    })?;
    op("init", || kv.init(7, &NDArray::zeros(&[3], DType::F32)))?;
    let g = NDArray::full(&[3], kv.rank() as f64 + 1.0, DType::F32);
    for _ in 0..10 {
        op("push", || kv.push(7, &g))?;
    }
    op("barrier", || kv.barrier())?;
    let mut w = NDArray::zeros(&[3], DType::F32);
    op("pull", || kv.pull(7, &mut w))?;
    result("value", f32s(&w));
    Ok(())
}

fn optimizer(kv: &dyn KVStoreBase) -> Outcome {
    op("set_optimizer", || kv.set_optimizer(&sgd_spec()))?;
    op("init", || kv.init(0, &NDArray::ones(&[4], DType::F32)))?;
    let mut w = NDArray::zeros(&[4], DType::F32);
    for step in 0..5 {
        op("push", || kv.push(0, &grad(step, kv.rank())))?;
        op("pull", || kv.pull(0, &mut w))?;
    }
    result("weights", f32s(&w));
    Ok(())
}

/// Elements of the big key of `bigkey` and `serverloss`.
const BIG: usize = 10_007;

fn big_grad(rank: usize) -> NDArray {
    let g: Vec<f32> = (0..BIG)
        .map(|i| (i % 1000) as f32 * (rank as f32 + 1.0))
        .collect();
    NDArray::from_vec(&[BIG], g).expect("BIG values")
}

fn bigkey(kv: &dyn KVStoreBase) -> Outcome {
    let keys = [1, 2];
    let init = [
        NDArray::zeros(&[BIG], DType::F32),
        NDArray::zeros(&[5], DType::F32),
    ];
    op("init", || kv.init(&keys[..], &init))?;
    let grads = [
        big_grad(kv.rank()),
        NDArray::full(&[5], kv.rank() as f64 + 1.0, DType::F32),
    ];
    let mut outs = [
        NDArray::zeros(&[BIG], DType::F32),
        NDArray::zeros(&[5], DType::F32),
    ];
    op("pushpull", || kv.pushpull(&keys[..], &grads, &mut outs))?;
    result("big", f32s(&outs[0]));
    result("small", f32s(&outs[1]));
    Ok(())
}

fn strkeys(kv: &dyn KVStoreBase) -> Outcome {
    let keys = ["weight", "bias", "emb.0"];
    let shapes: [&[usize]; 3] = [&[3, 4], &[4], &[2, 2]];
    let init: Vec<NDArray> = shapes
        .iter()
        .map(|s| NDArray::zeros(s, DType::F32))
        .collect();
    op("init", || kv.init(&keys[..], &init))?;
    let r = kv.rank() as f64 + 1.0;
    let grads: Vec<NDArray> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| NDArray::full(s, r * (k as f64 + 1.0), DType::F32))
        .collect();
    op("push", || kv.push(&keys[..], &grads))?;
    // Pulled as f64: the store casts to the output's dtype.
    let mut outs: Vec<NDArray> = shapes
        .iter()
        .map(|s| NDArray::zeros(s, DType::F64))
        .collect();
    op("pull", || kv.pull(&keys[..], &mut outs))?;
    for (key, out) in keys.iter().zip(&outs) {
        result(key, out.to_vec::<f64>().expect("f64 output"));
    }
    Ok(())
}

fn thousand(kv: &dyn KVStoreBase) -> Outcome {
    let keys: Vec<i32> = (0..1000).collect();
    let len = |k: i32| (k % 7 + 1) as usize;
    let init: Vec<NDArray> = keys
        .iter()
        .map(|&k| NDArray::zeros(&[len(k)], DType::F32))
        .collect();
    op("init", || kv.init(&keys, &init))?;
    let r = kv.rank() as f64 + 1.0;
    let grads: Vec<NDArray> = keys
        .iter()
        .map(|&k| NDArray::full(&[len(k)], r * f64::from(k % 13 + 1), DType::F32))
        .collect();
    op("push", || kv.push(&keys, &grads))?;
    let mut outs: Vec<NDArray> = keys
        .iter()
        .map(|&k| NDArray::zeros(&[len(k)], DType::F32))
        .collect();
    op("pull", || kv.pull(&keys, &mut outs))?;
    result("values", outs.iter().map(f32s).collect::<Vec<_>>());
    Ok(())
}

/// Rank 0's side of `die`, `stall` and `leave`: a push of key 5 (acknowledged once merged)
/// then a pull (answered when the round closes), one of which must fail.
fn push_pull_5(kv: &dyn KVStoreBase) -> Outcome {
    let g = NDArray::ones(&[4], DType::F32);
    op("push", || kv.push(5, &g))?;
    let mut w = NDArray::zeros(&[4], DType::F32);
    op("pull", || kv.pull(5, &mut w))
}

fn die(kv: &dyn KVStoreBase) -> Outcome {
    op("init", || kv.init(5, &NDArray::zeros(&[4], DType::F32)))?;
    if kv.rank() == 1 {
        // Let rank 0's push reach the servers first, then vanish without a goodbye.
        std::thread::sleep(Duration::from_millis(300));
        std::process::exit(3);
    }
    push_pull_5(kv)?;
    Err(wrong(
        "the push and pull of key 5 succeeded although worker rank 1 is gone".to_string(),
    ))
}

fn stall(kv: &dyn KVStoreBase) -> Outcome {
    op("init", || kv.init(5, &NDArray::zeros(&[4], DType::F32)))?;
    if kv.rank() == 1 {
        std::thread::sleep(Duration::from_secs_f64(timeout_secs() + 2.0));
        return Ok(());
    }
    push_pull_5(kv)?;
    Err(wrong(
        "the push and pull of key 5 succeeded although worker rank 1 never pushed".to_string(),
    ))
}

fn leave(kv: &dyn KVStoreBase) -> Outcome {
    op("init", || kv.init(5, &NDArray::zeros(&[4], DType::F32)))?;
    if kv.rank() == 1 {
        return Ok(());
    }
    std::thread::sleep(Duration::from_millis(500));
    push_pull_5(kv)?;
    Err(wrong(
        "the push and pull of key 5 succeeded although worker rank 1 has left".to_string(),
    ))
}

fn serverloss(kv: &dyn KVStoreBase) -> Outcome {
    let keys = [1, 2, 3];
    let shapes: [&[usize]; 3] = [&[BIG], &[8], &[3, 3]];
    let init: Vec<NDArray> = shapes
        .iter()
        .map(|s| NDArray::zeros(s, DType::F32))
        .collect();
    op("init", || kv.init(&keys[..], &init))?;
    let r = kv.rank() as f64 + 1.0;
    let grads: Vec<NDArray> = shapes
        .iter()
        .map(|s| NDArray::full(s, r, DType::F32))
        .collect();
    let mut outs = init.clone();
    println!("READY");
    let _ = std::io::stdout().flush();
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < Duration::from_secs(60) {
        op("push", || kv.push(&keys[..], &grads))?;
        op("pull", || kv.pull(&keys[..], &mut outs))?;
        for (key, out) in keys.iter().zip(&outs) {
            if let Some(v) = f32s(out).into_iter().find(|&v| v != rank_sum(kv)) {
                return Err(wrong(format!("round {rounds}: key {key} holds {v}")));
            }
        }
        rounds += 1;
    }
    Err(wrong(format!(
        "{rounds} rounds in 60 s and no failure although a server was to be killed"
    )))
}

/// The weight at which the `recover` scenario stops.
const RECOVER_TARGET: f32 = 40.0;

fn recover(kv: &dyn KVStoreBase) -> Outcome {
    op("set_optimizer", || {
        kv.set_optimizer(&OptimizerSpec::new("test"))
    })?;
    op("init", || kv.init(0, &NDArray::zeros(&[4], DType::F32)))?;
    let mut w = NDArray::zeros(&[4], DType::F32);
    op("pull", || kv.pull(0, &mut w))?;
    let mut weight = f32s(&w)[0];
    result("start", weight);
    let ones = NDArray::ones(&[4], DType::F32);
    let give_up = Instant::now() + Duration::from_secs_f64(3.0 * timeout_secs());
    let mut retries = 0u32;
    while weight < RECOVER_TARGET {
        match kv.pushpull(0, &ones, &mut w) {
            Ok(()) => {
                weight = f32s(&w)[0];
                println!("STEP {weight}");
                let _ = std::io::stdout().flush();
                std::thread::sleep(Duration::from_millis(30));
            }
            // A worker was lost: the round failed everywhere; retry it until one takes the
            // lost worker's place.
            Err(e) if Instant::now() < give_up && e.to_string().contains("is gone") => {
                retries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(Failure {
                    operation: "pushpull".to_string(),
                    elapsed: Duration::ZERO,
                    error: e.to_string(),
                })
            }
        }
    }
    result("retries", retries);
    result("final", weight);
    Ok(())
}

fn main() -> ExitCode {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    let Some(&(_, store)) = SCENARIOS.iter().find(|(name, _)| *name == scenario) else {
        let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "usage: dist_scenario <scenario>; scenarios: {}",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    // A scheduler or a server runs its role inside `create` and exits the process there.
    let kv = match op("create", || kvstore_base::create(store)) {
        Ok(kv) => kv,
        Err(f) => return report(&f),
    };
    result("rank", kv.rank());
    let outcome = match scenario.as_str() {
        "sum" => sum(&*kv),
        "async" => async_updates(&*kv),
        "optimizer" => optimizer(&*kv),
        "bigkey" => bigkey(&*kv),
        "strkeys" => strkeys(&*kv),
        "thousand" => thousand(&*kv),
        "die" => die(&*kv),
        "stall" => stall(&*kv),
        "serverloss" => serverloss(&*kv),
        "leave" => leave(&*kv),
        "recover" => recover(&*kv),
        other => unreachable!("scenario {other} is listed"),
    };
    // Leave the job (goodbye to the servers and the scheduler) before reporting.
    drop(kv);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => report(&f),
    }
}

fn report(f: &Failure) -> ExitCode {
    eprintln!(
        "error: {} failed after {:.3} s: {}",
        f.operation,
        f.elapsed.as_secs_f64(),
        f.error
    );
    ExitCode::FAILURE
}
