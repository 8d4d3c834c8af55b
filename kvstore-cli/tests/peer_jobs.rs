//! The `byteps` and `horovod` stores across real processes on 127.0.0.1, started by
//! `kvstore launch` as a user would start them: exact sums over 2 to 4 workers, tensors cut
//! into partitions over 1 or 2 servers (byteps), many keys in one call, broadcast from rank 0,
//! and Horovod's stall inspector naming the missing rank and the tensor.
//!
//! Each job runs this test binary, filtered to the ignored test [`peer_worker`], as its
//! workers; the scenario comes in a variable. Every launch is bounded and leaves no process
//! behind (see `common`).

mod common;

use common::launch;
use kvstore::{DType, KVStoreBase, KVStoreExt, NDArray};

/// Set for the workers: the scenario they run.
const SCENARIO: &str = "KVSTORE_PEER_JOB_SCENARIO";

/// Rank `r`'s gradient for element `i`: small integers and halves, so that every sum is exact.
fn gradient(len: usize, r: usize) -> NDArray {
    let v: Vec<f32> = (0..len)
        .map(|i| (i % 1009) as f32 - 500.0 + 0.5 * r as f32)
        .collect();
    NDArray::from_vec(&[len], v).unwrap()
}

/// The sum of [`gradient`] over `n` workers.
fn expected_sum(len: usize, n: usize) -> Vec<f32> {
    (0..len)
        .map(|i| n as f32 * ((i % 1009) as f32 - 500.0) + 0.5 * (n * (n - 1) / 2) as f32)
        .collect()
}

/// The names of 200 small keys (string keys, as the big one: a store keeps one key type).
fn small_keys() -> Vec<String> {
    (0..200).map(|k| format!("s{k}")).collect()
}

/// Sums a big tensor, 200 small keys in one call, and broadcasts from rank 0; returns what
/// the worker prints when all of it holds.
fn sums_and_broadcast(kv: &dyn KVStoreBase, declare: bool) -> String {
    let (r, n) = (kv.rank(), kv.num_workers());
    // Not a multiple of the workers, of the partition size or of a chunk.
    let big = 250_003;
    if declare {
        kv.init("big", &NDArray::zeros(&[big], DType::F32))
            .expect("init big");
        let zeros: Vec<NDArray> = (0..200)
            .map(|_| NDArray::zeros(&[64], DType::F32))
            .collect();
        kv.init(&small_keys()[..], &zeros[..])
            .expect("init small keys");
    }
    let mut out = NDArray::zeros(&[big], DType::F32);
    kv.pushpull("big", &gradient(big, r), &mut out)
        .expect("pushpull big");
    assert_eq!(out.to_vec::<f32>().unwrap(), expected_sum(big, n), "big");

    let keys = small_keys();
    let values: Vec<NDArray> = (0..200)
        .map(|k| NDArray::full(&[64], f64::from(k) * (r as f64 + 1.0), DType::F32))
        .collect();
    let mut outs: Vec<NDArray> = (0..200)
        .map(|_| NDArray::zeros(&[64], DType::F32))
        .collect();
    kv.pushpull(&keys[..], &values[..], &mut outs[..])
        .expect("pushpull 200 keys");
    let ranks_sum = (n * (n + 1) / 2) as f32;
    for (k, o) in outs.iter().enumerate() {
        assert_eq!(
            o.to_vec::<f32>().unwrap(),
            vec![k as f32 * ranks_sum; 64],
            "key s{k}"
        );
    }

    let mine = NDArray::full(&[1000], 10.0 + r as f64, DType::F32);
    let mut got = NDArray::zeros(&[1000], DType::F64);
    kv.broadcast("weights", &mine, &mut got).expect("broadcast");
    assert_eq!(got.to_vec::<f64>().unwrap(), vec![10.0; 1000], "broadcast");
    kv.barrier().expect("barrier");
    format!("rank {r} of {n}: sums and broadcast exact")
}

/// Ranks other than the last submit tensor `late`; the last one never does. The others must
/// fail after the stall time naming the tensor and the missing rank; then everybody meets at
/// a barrier and ends normally.
fn stall(kv: &dyn KVStoreBase) -> String {
    let (r, n) = (kv.rank(), kv.num_workers());
    let said = if r + 1 == n {
        "skipped late".to_string()
    } else {
        let started = std::time::Instant::now();
        let mut out = NDArray::zeros(&[8], DType::F32);
        let err = kv
            .pushpull("late", &NDArray::ones(&[8], DType::F32), &mut out)
            .expect_err("a tensor the last rank never submits cannot be reduced");
        let text = format!("{err:#}");
        let mut chain = text.clone();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            chain.push_str(&format!(": {s}"));
            source = s.source();
        }
        assert!(chain.contains("tensor late"), "{chain}");
        assert!(
            chain.contains(&format!("Missing ranks: {}: [late]", n - 1)),
            "{chain}"
        );
        format!(
            "failed after {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            chain
        )
    };
    kv.barrier().expect("barrier after the stall");
    // The job goes on: a tensor every rank submits is still reduced.
    let mut out = NDArray::zeros(&[4], DType::F32);
    kv.pushpull("after", &NDArray::ones(&[4], DType::F32), &mut out)
        .expect("pushpull after the stall");
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![n as f32; 4]);
    format!("rank {r} of {n}: {said}")
}

/// A worker of the jobs below; by itself (without [`SCENARIO`]) it does nothing.
#[test]
#[ignore = "a worker process of the jobs of this file; does nothing by itself"]
fn peer_worker() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let (store, what) = scenario.split_once(':').expect("STORE:WHAT");
    let kv = match kvstore::create(store) {
        Ok(kv) => kv,
        Err(e) => {
            // A refused store is an answer some jobs expect: say it and fail the worker.
            println!("{store} worker refused: {e}");
            std::process::exit(3);
        }
    };
    let said = match what {
        "sums" => sums_and_broadcast(kv.as_ref(), store == "byteps"),
        "stall" => stall(kv.as_ref()),
        other => panic!("unknown scenario {other}"),
    };
    println!("{store} worker {said}");
}

/// Launches `workers` workers and `servers` servers running [`peer_worker`] with `scenario`
/// and the variables `env`; checks that the job succeeded and returns each worker's line.
fn run_job(workers: u32, servers: u32, scenario: &str, env: &[&str]) -> Vec<String> {
    let me = std::env::current_exe().unwrap();
    let me = me.to_str().expect("a UTF-8 path of the test binary");
    let (n, s) = (workers.to_string(), servers.to_string());
    let scenario = format!("{SCENARIO}={scenario}");
    let mut args = vec!["-n", &n, "-s", &s, "--timeout", "20", "--env", &scenario];
    for e in env {
        args.extend(["--env", e]);
    }
    args.extend([
        "--",
        me,
        "--exact",
        "peer_worker",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    let job = launch(&args, &[]);
    assert!(job.status.success(), "{}", job.report());
    let lines: Vec<String> = job
        .stdout
        .lines()
        .filter(|l| l.starts_with("[worker "))
        // The test harness writes `test peer_worker ... ` before the worker's own words.
        .filter_map(|l| {
            let at = ["byteps worker rank ", "horovod worker rank "]
                .iter()
                .find_map(|w| l.find(w))?;
            Some(l[at..].to_string())
        })
        .collect();
    assert_eq!(lines.len(), workers as usize, "{}", job.report());
    lines
}

#[test]
fn byteps_2_workers_1_server_sums_partitions_exactly() {
    let lines = run_job(2, 1, "byteps:sums", &["BYTEPS_PARTITION_BYTES=65536"]);
    for r in 0..2 {
        let line = format!("byteps worker rank {r} of 2: sums and broadcast exact");
        assert!(lines.contains(&line), "{lines:?}");
    }
}

#[test]
fn byteps_3_workers_2_servers_with_a_credit_sums_exactly() {
    let lines = run_job(
        3,
        2,
        "byteps:sums",
        &["BYTEPS_PARTITION_BYTES=40000", "BYTEPS_SCHEDULING_CREDIT=2"],
    );
    for r in 0..3 {
        let line = format!("byteps worker rank {r} of 3: sums and broadcast exact");
        assert!(lines.contains(&line), "{lines:?}");
    }
}

#[test]
fn horovod_4_workers_without_servers_ring_sums_and_fuses_exactly() {
    // `-s 0`: the workers only meet at the scheduler, as under horovodrun.
    let lines = run_job(4, 0, "horovod:sums", &["HOROVOD_FUSION_THRESHOLD=16384"]);
    for r in 0..4 {
        let line = format!("horovod worker rank {r} of 4: sums and broadcast exact");
        assert!(lines.contains(&line), "{lines:?}");
    }
}

#[test]
fn a_dist_store_in_a_job_without_servers_is_refused_by_name() {
    let me = std::env::current_exe().unwrap();
    let job = launch(
        &[
            "-n",
            "1",
            "-s",
            "0",
            "--timeout",
            "10",
            "--env",
            &format!("{SCENARIO}=dist_sync:sums"),
            "--",
            me.to_str().unwrap(),
            "--exact",
            "peer_worker",
            "--ignored",
            "--nocapture",
        ],
        &[],
    );
    assert_eq!(job.status.code(), Some(3), "{}", job.report());
    let refusal = job
        .stdout
        .lines()
        .find(|l| l.contains("dist_sync worker refused: "))
        .unwrap_or_else(|| panic!("no refusal\n{}", job.report()));
    assert!(refusal.contains("DMLC_NUM_SERVER"), "{refusal}");
}

#[test]
fn horovod_stall_names_the_missing_rank_and_the_tensor() {
    let lines = run_job(
        3,
        1,
        "horovod:stall",
        &["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=2"],
    );
    assert!(
        lines.contains(&"horovod worker rank 2 of 3: skipped late".to_string()),
        "{lines:?}"
    );
    for r in 0..2 {
        let prefix = format!("horovod worker rank {r} of 3: failed after ");
        let line = lines
            .iter()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line of rank {r}: {lines:?}"));
        let secs: f64 = line[prefix.len()..]
            .split(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no time in {line}"));
        assert!(
            (1.5..15.0).contains(&secs),
            "the stall error came after {secs} s: {line}"
        );
    }
}
