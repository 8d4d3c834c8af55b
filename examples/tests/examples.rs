//! Runs the example programs and checks what they print.

use std::process::{Command, Output};

/// Runs a program built from this package and returns its output, checking that it succeeded.
fn run(program: &str) -> String {
    run_with_args(program, &[])
}

/// [`run`] with arguments.
fn run_with_args(program: &str, args: &[&str]) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    assert!(
        status.success(),
        "{program} failed with {status}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&stderr)
    );
    stdout
}

#[test]
fn third_party_store_is_found_by_name_and_sums_the_gradients() {
    let out = run(env!("CARGO_BIN_EXE_third_party_store"));
    // The registry lists the third-party store next to the facade's, with its capability.
    let listed = out
        .lines()
        .find(|l| l.trim_start().starts_with("mykvstore "))
        .unwrap_or_else(|| panic!("mykvstore is not listed:\n{out}"));
    assert!(listed.contains("init_push_pull"), "{listed}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("teststore ")),
        "{out}"
    );
    // create("MyKVStore") found it.
    assert!(out.contains("created \"mykvstore\""), "{out}");
    // Device d pushed (d + 1) * [1..=6]; the sum over 4 devices is 10 * [1..=6].
    let sum = "[10.0, 20.0, 30.0, 40.0, 50.0, 60.0]";
    assert_eq!(out.matches(&format!("weight = {sum}")).count(), 4, "{out}");
    assert!(
        out.contains(&format!(
            "mykvstore: pulled {sum} = sum of 4 device gradients"
        )),
        "{out}"
    );
}

#[test]
fn teststore_pushpull_gives_every_device_the_sum() {
    let out = run(env!("CARGO_BIN_EXE_teststore_pushpull"));
    assert!(out.contains("created \"teststore\""), "{out}");
    // 1 + 2 + 3 + 4 on every element, for every device.
    assert_eq!(out.matches("pulls [10.0, 10.0, 10.0]").count(), 4, "{out}");
    assert!(
        out.contains(
            "teststore: pushpull of 4 device values gave [10.0, 10.0, 10.0] on every device"
        ),
        "{out}"
    );
}

#[test]
fn training_on_the_local_store_drives_the_loss_to_the_noise_floor() {
    let out = run(env!("CARGO_BIN_EXE_train_linear"));
    assert!(out.starts_with("store: local (4 devices)"), "{out}");
    let (initial, trained) = losses(&out);
    assert!(initial > 10.0, "{out}");
    // The data's noise has variance 0.01: a fitted model cannot do better, and should not do
    // much worse.
    assert!(trained < 0.02, "{out}");
    // Every epoch reports a finite loss.
    assert_eq!(
        out.lines().filter(|l| l.starts_with("epoch ")).count(),
        8,
        "{out}"
    );
}

/// Runs `PROGRAM STORE` as the 2 workers of a job whose scheduler and `servers` servers run
/// on threads of this test, the workers' environment extended by `env`; returns each
/// worker's output. Bounded: workers still running after a minute are killed and the test
/// fails.
fn train_in_a_job(program: &str, args: &[&str], servers: u32, env: &[(&str, &str)]) -> Vec<String> {
    use std::time::Duration;
    let cluster =
        kvstore::dist::LocalCluster::start(servers, 2, Duration::from_secs(30)).expect("a cluster");
    let outputs = run_workers(program, args, cluster.worker_options(), env);
    cluster.finish().expect("the cluster ends with its workers");
    outputs
}

/// Runs `PROGRAM ARGS` as 2 workers with the job's `options` and `env` in their environment;
/// returns each worker's output. Bounded: workers still running after a minute are killed and
/// the test fails.
fn run_workers(
    program: &str,
    args: &[&str],
    options: &std::collections::BTreeMap<String, String>,
    env: &[(&str, &str)],
) -> Vec<String> {
    let store = args[0];
    use std::time::{Duration, Instant};
    let mut workers: Vec<_> = (0..2)
        .map(|_| {
            Command::new(program)
                .args(args)
                .envs(options)
                .envs(env.iter().copied())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while workers.iter_mut().any(|w| w.try_wait().unwrap().is_none()) {
        if Instant::now() > deadline {
            for w in &mut workers {
                let _ = w.kill();
                let _ = w.wait();
            }
            panic!("{program} {store} ran over a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let outputs: Vec<String> = workers
        .into_iter()
        .map(|w| {
            let Output {
                status,
                stdout,
                stderr,
            } = w.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&stdout).into_owned();
            assert!(
                status.success(),
                "{program} {store} failed with {status}\nstdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
            stdout
        })
        .collect();
    outputs
}

#[test]
fn stores_without_an_optimizer_train_with_the_optimizer_on_the_workers() {
    // byteps's servers only sum and horovod has none: each worker runs the same SGD on the
    // all-reduced gradients, and lands where the store-side optimizer of `local` lands.
    for store in ["byteps", "horovod"] {
        let outputs = train_in_a_job(env!("CARGO_BIN_EXE_train_linear"), &[store], 1, &[]);
        for (i, out) in outputs.iter().enumerate() {
            assert!(out.contains("worker "), "{store} worker {i}:\n{out}");
            assert!(
                out.contains("trained: loss 41.6985 -> 0.0099"),
                "{store} worker {i}:\n{out}"
            );
        }
    }
}

#[test]
fn training_runs_on_mxnets_protocol() {
    // pslite_dist_sync workers on kvstore-pslite's scheduler and server (MXNet 1.9.1's
    // protocol; the optimizer goes to the server as MXNet's pickle): lands where `local`
    // lands.
    let job = kvstore::pslite::LocalJob::start(1, 2, std::time::Duration::from_secs(30))
        .expect("a ps-lite job");
    let program = env!("CARGO_BIN_EXE_train_linear");
    let outputs = run_workers(program, &["pslite_dist_sync"], job.worker_options(), &[]);
    for (i, out) in outputs.iter().enumerate() {
        assert!(
            out.contains("trained: loss 41.6985 -> 0.0099"),
            "pslite_dist_sync worker {i}:\n{out}"
        );
    }
    job.join()
        .expect("the scheduler and the server end with the job");
}

#[test]
fn async_training_runs_on_mxnets_protocol() {
    // pslite_dist_async workers (MXNet's dist_async: each worker's push steps the weights as
    // it arrives, so the path depends on timing): the loss still falls to near the noise
    // floor.
    let job = kvstore::pslite::LocalJob::start(1, 2, std::time::Duration::from_secs(30))
        .expect("a ps-lite job");
    let program = env!("CARGO_BIN_EXE_train_linear");
    let outputs = run_workers(program, &["pslite_dist_async"], job.worker_options(), &[]);
    for (i, out) in outputs.iter().enumerate() {
        let (initial, trained) = losses(out);
        assert!(
            initial > 40.0 && trained < 0.05,
            "pslite_dist_async worker {i}:\n{out}"
        );
    }
    job.join()
        .expect("the scheduler and the server end with the job");
}

#[test]
fn key_scaling_times_every_store_and_checks_the_results() {
    // A tiny run (200 keys): the benchmark's calls succeed and give the right sums on every
    // store (it panics otherwise), and it prints one row per store.
    let out = run_with_args(env!("CARGO_BIN_EXE_key_scaling"), &["200"]);
    for store in ["local", "dist_sync", "byteps", "horovod"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(store))
            .unwrap_or_else(|| panic!("no row for {store}:\n{out}"));
        assert_eq!(row.split_whitespace().nth(1), Some("200"), "{row}");
    }
}

/// The final `trained: loss A -> B` line of a training run.
fn trained_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("trained: loss "))
        .unwrap_or_else(|| panic!("no final line:\n{out}"))
}

#[test]
fn sparse_training_reads_a_few_rows_per_step_and_learns() {
    let out = run(env!("CARGO_BIN_EXE_train_sparse"));
    assert!(
        out.starts_with("store: local, a row-sparse table of 100000 rows"),
        "{out}"
    );
    let epochs: Vec<&str> = out.lines().filter(|l| l.starts_with("epoch ")).collect();
    assert_eq!(epochs.len(), 5, "{out}");
    // Each step reads under 2% of the table.
    for line in &epochs {
        let share: f32 = line
            .trim_end_matches("% of the table used per step")
            .rsplit(", ")
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("no share of the table: {line}"));
        assert!(share < 2.0, "{line}");
    }
    let (initial, trained) = losses(&out);
    // From log 2 (a guess) to well under it.
    assert!((initial - std::f32::consts::LN_2).abs() < 1e-3, "{out}");
    assert!(trained < 0.5, "{out}");

    // The same job on dist_sync, each of 2 workers taking half of every mini-batch, the
    // table's rows split over 2 servers: the servers' lazy updates land where local's do (the
    // sums of a mini-batch's halves round a little differently from the whole's).
    let bound = [("MXNET_KVSTORE_BIGARRAY_BOUND", "10000")];
    let program = env!("CARGO_BIN_EXE_train_sparse");
    let workers = train_in_a_job(program, &["dist_sync"], 2, &bound);
    for (i, worker) in workers.iter().enumerate() {
        let (_, on_dist) = losses(worker);
        assert!(
            (on_dist - trained).abs() < 1e-3,
            "worker {i}:\n{worker}\nlocal:\n{out}"
        );
    }

    // The table stored dense (Gluon's `Embedding(sparse_grad=True)`): the row-sparse
    // gradients are applied lazily all the same, on `local` exactly as to the row-sparse
    // table, and on `dist_sync`, whose servers keep the dense table by rows, where local's do.
    // The device store keeps host arrays in its embedded local store: the same bits.
    let device = run_with_args(program, &["device"]);
    assert!(
        device.starts_with("store: device, a row-sparse table"),
        "{device}"
    );
    assert_eq!(trained_line(&device), trained_line(&out), "{device}\n{out}");

    let dense = run_with_args(program, &["local", "--dense-table"]);
    assert!(dense.starts_with("store: local, a dense table"), "{dense}");
    assert_eq!(trained_line(&dense), trained_line(&out), "{dense}\n{out}");
    let workers = train_in_a_job(program, &["dist_sync", "--dense-table"], 2, &bound);
    for (i, worker) in workers.iter().enumerate() {
        let (_, on_dist) = losses(worker);
        assert!(
            (on_dist - trained).abs() < 1e-3,
            "worker {i} (dense table):\n{worker}\nlocal:\n{out}"
        );
    }
}

#[test]
fn sparse_training_runs_on_mxnets_protocol() {
    // pslite_dist_sync workers on kvstore-pslite's scheduler and 2 servers (MXNet 1.9.1's
    // protocol: the table's rows cut across both servers as EncodeRowSparseKey cuts them, the
    // lazy sgd on the servers, rows pulled with row_sparse_pull): lands where local does.
    let program = env!("CARGO_BIN_EXE_train_sparse");
    let (_, on_local) = losses(&run(program));
    let job = kvstore::pslite::LocalJob::start(2, 2, std::time::Duration::from_secs(30))
        .expect("a ps-lite job");
    let bound = [("MXNET_KVSTORE_BIGARRAY_BOUND", "10000")];
    let outputs = run_workers(program, &["pslite_dist_sync"], job.worker_options(), &bound);
    for (i, out) in outputs.iter().enumerate() {
        let (_, trained) = losses(out);
        assert!(
            (trained - on_local).abs() < 1e-3,
            "pslite_dist_sync worker {i}:\n{out}\nlocal: {on_local}"
        );
    }
    job.join()
        .expect("the scheduler and the servers end with the job");
}

/// The initial and the trained loss of a training run's final line.
fn losses(out: &str) -> (f32, f32) {
    let figures: Vec<f32> = trained_line(out)
        .trim_start_matches("trained: loss ")
        .split(" -> ")
        .map(|x| x.parse().unwrap_or_else(|_| panic!("not a loss: {out}")))
        .collect();
    (figures[0], figures[1])
}
