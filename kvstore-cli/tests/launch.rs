//! Runs `kvstore launch` as a user would: the variables each process gets, the prefixed
//! output, the first failure stopping the job, argument errors, and a whole job.
//!
//! Every launch is bounded and leaves no process behind (see `common`).

mod common;

use common::{free_port, launch};
use std::time::Duration;

#[test]
fn workers_get_the_cluster_variables_and_the_launchers_environment() {
    let port = free_port().to_string();
    let script = "echo \"vars $DMLC_ROLE $DMLC_PS_ROOT_URI $DMLC_PS_ROOT_PORT $DMLC_NUM_SERVER \
                  $DMLC_NUM_WORKER $DMLC_NODE_HOST $DMLC_TASK_ID $KVSTORE_TIMEOUT_SECS $EXTRA \
                  $INHERITED port=${PORT-unset} secret=$(tr -d '\\n' < \"$KVSTORE_SECRET_FILE\" | wc -c) \
                  ${KVSTORE_SECRET-no-variable}\"";
    // The workers never join the cluster, so the scheduler and the server give up after the
    // 3 s timeout and the job fails; the workers' output is complete by then.
    let job = launch(
        &[
            "-n",
            "2",
            "-s",
            "1",
            "--port",
            &port,
            "--timeout",
            "3",
            "--env",
            "EXTRA=a=b:c",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[("INHERITED", "yes"), ("PORT", "4242")],
    );
    for task in 0..2 {
        let expected = format!(
            "[worker {task}] vars worker 127.0.0.1 {port} 1 2 127.0.0.1 {task} 3 a=b:c yes \
             port=unset secret=64 no-variable"
        );
        assert!(
            job.stdout.lines().any(|l| l == expected),
            "no line {expected:?}\n{}",
            job.report()
        );
    }
    assert!(!job.status.success(), "{}", job.report());
    assert!(job.elapsed < Duration::from_secs(15), "{}", job.report());
}

#[test]
fn the_first_failing_worker_stops_the_job_with_its_status() {
    let job = launch(
        &[
            "-n",
            "2",
            "-s",
            "1",
            "--timeout",
            "30",
            "--",
            "sh",
            "-c",
            "if [ \"$DMLC_TASK_ID\" = 1 ]; then echo failing; exit 3; fi; exec sleep 30",
        ],
        &[],
    );
    assert_eq!(job.status.code(), Some(3), "{}", job.report());
    assert!(
        job.stderr.contains(
            "kvstore: worker 1 exited with status 3; killed the scheduler, server 0 and worker 0"
        ),
        "{}",
        job.report()
    );
    assert!(
        job.stdout.lines().any(|l| l == "[worker 1] failing"),
        "{}",
        job.report()
    );
    // Nothing waited for the 30 s timeout or the sleeping worker.
    assert!(job.elapsed < Duration::from_secs(10), "{}", job.report());
}

#[cfg(unix)]
#[test]
fn a_worker_killed_by_a_signal_gives_128_plus_its_number() {
    let job = launch(&["-n", "1", "-s", "1", "--", "sh", "-c", "kill -9 $$"], &[]);
    assert_eq!(job.status.code(), Some(137), "{}", job.report());
    assert!(
        job.stderr
            .contains("kvstore: worker 0 was killed by signal 9 (SIGKILL)"),
        "{}",
        job.report()
    );
    assert!(job.elapsed < Duration::from_secs(10), "{}", job.report());
}

#[test]
fn a_worker_command_that_cannot_start_is_an_error_and_stops_the_job() {
    let job = launch(
        &[
            "-n",
            "2",
            "-s",
            "2",
            "--",
            "/nonexistent/kvstore-launch-test-command",
        ],
        &[],
    );
    assert_eq!(job.status.code(), Some(1), "{}", job.report());
    assert!(
        job.stderr.contains("cannot start worker 0")
            && job
                .stderr
                .contains("/nonexistent/kvstore-launch-test-command"),
        "{}",
        job.report()
    );
    assert!(job.elapsed < Duration::from_secs(10), "{}", job.report());
}

#[test]
fn output_lines_keep_their_stream_and_get_the_process_prefix() {
    let script = "echo out-$DMLC_TASK_ID; echo err-$DMLC_TASK_ID >&2; \
                  i=0; while [ $i -lt 300 ]; do \
                  echo line-$DMLC_TASK_ID-$i-abcdefghijklmnopqrstuvwxyz0123456789; \
                  i=$((i+1)); done; printf partial-$DMLC_TASK_ID";
    let job = launch(
        &[
            "-n",
            "2",
            "-s",
            "1",
            "--timeout",
            "3",
            "--env",
            "PS_VERBOSE=1",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[],
    );
    let out: Vec<&str> = job.stdout.lines().collect();
    let err: Vec<&str> = job.stderr.lines().collect();
    for task in 0..2 {
        let prefix = format!("[worker {task}] ");
        for line in [format!("out-{task}"), format!("partial-{task}")] {
            assert!(
                out.contains(&format!("{prefix}{line}").as_str()),
                "{line}\n{}",
                job.report()
            );
        }
        assert!(
            err.contains(&format!("{prefix}err-{task}").as_str()),
            "{}",
            job.report()
        );
        // The two workers wrote at once: each line arrived whole, in order.
        let lines: Vec<&str> = out
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter(|l| l.starts_with("line-"))
            .collect();
        let expected: Vec<String> = (0..300)
            .map(|i| format!("line-{task}-{i}-abcdefghijklmnopqrstuvwxyz0123456789"))
            .collect();
        assert_eq!(lines, expected, "{}", job.report());
    }
    // Every line of the job is prefixed, on the stream it was written to.
    assert!(
        out.iter()
            .all(|l| l.starts_with("[worker 0] ") || l.starts_with("[worker 1] ")),
        "{}",
        job.report()
    );
    assert!(
        !out.iter().any(|l| l.contains("] err-"))
            && !err
                .iter()
                .any(|l| l.contains("] out-") || l.contains("] line-") || l.contains("] partial-")),
        "{}",
        job.report()
    );
    assert!(
        err.iter()
            .all(|l| l.starts_with('[') || l.starts_with("kvstore")),
        "{}",
        job.report()
    );
    // The scheduler and the server, verbose, say where they are.
    assert!(
        err.iter()
            .any(|l| l.starts_with("[scheduler] kvstore scheduler: listening on")),
        "{}",
        job.report()
    );
    assert!(
        err.iter()
            .any(|l| l.starts_with("[server 0] kvstore server: joining")),
        "{}",
        job.report()
    );
}

#[test]
fn bad_arguments_are_refused_clearly() {
    for (args, needle) in [
        (&["-n", "0", "-s", "1", "--", "true"][..], "--num-workers"),
        (&["-n", "1", "-s", "x", "--", "true"][..], "--num-servers"),
        (&["-n", "1", "-s", "1"][..], "<COMMAND>"),
        (&["-n", "1", "--", "true"][..], "--num-servers"),
        (
            &["-n", "4294967295", "-s", "2", "--", "true"][..],
            "at most 4096 workers and servers",
        ),
        (
            &["-n", "1", "-s", "1", "--timeout", "-2", "--", "true"][..],
            "--timeout",
        ),
        (
            &["-n", "1", "-s", "1", "--env", "JUSTAKEY", "--", "true"][..],
            "KEY=VALUE",
        ),
        (
            &[
                "-n",
                "1",
                "-s",
                "1",
                "--env",
                "DMLC_NUM_SERVER=2",
                "--",
                "true",
            ][..],
            "use -s/--num-servers",
        ),
        (
            &[
                "-n",
                "1",
                "-s",
                "1",
                "--env",
                "KVSTORE_SECRET=0123456789abcdef",
                "--",
                "true",
            ][..],
            "export KVSTORE_SECRET",
        ),
        (
            &["-n", "1", "-s", "1", "--host", "192.0.2.1", "--", "true"][..],
            "cannot find a free port",
        ),
        (
            &["--pslite", "-n", "1", "-s", "0", "--", "true"][..],
            "a ps-lite job needs at least one server",
        ),
        (
            &[
                "--pslite",
                "--restart-workers",
                "1",
                "-n",
                "1",
                "-s",
                "1",
                "--",
                "true",
            ][..],
            "a ps-lite job cannot take a worker back",
        ),
    ] {
        let job = launch(args, &[]);
        assert!(!job.status.success(), "{args:?}: {}", job.report());
        assert!(
            job.stderr.contains(needle),
            "{args:?}: no {needle:?}\n{}",
            job.report()
        );
        assert!(job.stdout.is_empty(), "{args:?}: {}", job.report());
    }
}

/// What a worker script starts without `exec` goes with it: the job's processes are killed
/// by process group, those of a worker that fails too. (`launch` fails on any process left.)
#[cfg(target_os = "linux")]
#[test]
fn a_worker_scripts_own_children_do_not_outlive_the_job() {
    let job = launch(
        &[
            "-n",
            "2",
            "-s",
            "1",
            "--",
            "sh",
            "-c",
            "sleep 300 & if [ \"$DMLC_TASK_ID\" = 1 ]; then sleep 0.5; exit 3; fi; sleep 301; true",
        ],
        &[],
    );
    assert_eq!(job.status.code(), Some(3), "{}", job.report());
    assert!(job.elapsed < Duration::from_secs(10), "{}", job.report());
}

/// A `kvstore.toml` that every process reads (`KVSTORE_CONFIG`) may not fix a port, which
/// the processes of one host cannot share: refused before anything starts.
#[test]
fn a_config_file_fixing_a_port_is_refused_before_anything_starts() {
    let dir = std::env::temp_dir().join(format!("kvstore-launch-port-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kvstore.toml");
    std::fs::write(&file, "[dist]\nport = 9100\n").unwrap();
    let path = file.display().to_string();
    let job = launch(
        &["-n", "1", "-s", "2", "--", "sh", "-c", "echo started"],
        &[("KVSTORE_CONFIG", &path)],
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(job.status.code(), Some(1), "{}", job.report());
    assert!(
        job.stderr.contains("port = 9100") && job.stderr.contains(&path),
        "{}",
        job.report()
    );
    assert!(job.stdout.is_empty(), "{}", job.report());
}

/// A launcher whose standard error is gone (the reader of its pipe exited) still ends the
/// job and exits with the failing worker's status (`eprintln!` would panic: status 101).
#[cfg(unix)]
#[test]
fn a_launcher_without_a_standard_error_still_exits_with_the_jobs_status() {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstore"));
    cmd.args([
        "launch",
        "-n",
        "1",
        "-s",
        "1",
        "--",
        "sh",
        "-c",
        "sleep 0.3; exit 3",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    common::without_cluster_vars(&mut cmd);
    let mut launcher = cmd.spawn().unwrap();
    drop(launcher.stderr.take()); // the reading end closed at once
    let status = launcher.wait().unwrap();
    assert_eq!(status.code(), Some(3));
}

#[test]
fn a_bad_kvstore_timeout_secs_is_refused_by_name() {
    let job = launch(
        &["-n", "1", "-s", "1", "--", "true"],
        &[("KVSTORE_TIMEOUT_SECS", "never")],
    );
    assert_eq!(job.status.code(), Some(1), "{}", job.report());
    assert!(
        job.stderr.contains("KVSTORE_TIMEOUT_SECS"),
        "{}",
        job.report()
    );
}

/// Set for the workers of [`a_whole_job_runs_to_its_end_and_exits_0`].
const WORKER: &str = "KVSTORE_LAUNCH_TEST_WORKER";

/// A worker of a dist job: pushes `rank + 1` and pulls the sum over the workers. The job of
/// [`a_whole_job_runs_to_its_end_and_exits_0`] runs this test binary, filtered to this test,
/// as its workers; by itself it does nothing.
#[test]
#[ignore = "a worker process of a_whole_job_runs_to_its_end_and_exits_0; does nothing by itself"]
fn dist_worker() {
    use kvstore::{DType, KVStoreExt, NDArray};
    if std::env::var_os(WORKER).is_none() {
        return;
    }
    // The job's connections open with the handshake of the secret the launcher made.
    let file = std::env::var("KVSTORE_SECRET_FILE").expect("the launcher gives a job a secret");
    assert_eq!(
        std::fs::read_to_string(&file)
            .expect("the secret's file")
            .len(),
        64
    );
    println!("dist worker secret file: {file}");
    let kv = kvstore::create("dist_sync").expect("create(dist_sync)");
    let (rank, workers) = (kv.rank(), kv.num_workers());
    kv.init(3, &NDArray::zeros(&[5], DType::F32)).expect("init");
    kv.push(3, &NDArray::full(&[5], (rank + 1) as f64, DType::F32))
        .expect("push");
    let mut out = NDArray::zeros(&[5], DType::F32);
    kv.pull(3, &mut out).expect("pull");
    let expected = (workers * (workers + 1) / 2) as f32;
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![expected; 5]);
    println!("dist worker rank {rank} of {workers}: pulled {expected}");
}

/// Launches a job whose workers run this test binary's ignored test `worker` (a worker
/// process of a test), with the launcher options `options` before it.
fn launch_test_workers(options: &[&str], worker: &str) -> common::Launched {
    let me = std::env::current_exe().unwrap();
    let me = me.to_str().expect("a UTF-8 path of the test binary");
    let tail = [
        "--",
        me,
        "--exact",
        worker,
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ];
    let args: Vec<&str> = options.iter().copied().chain(tail).collect();
    launch(&args, &[])
}

#[test]
fn a_whole_job_runs_to_its_end_and_exits_0() {
    let job = launch_test_workers(
        &[
            "-n",
            "2",
            "-s",
            "1",
            "--timeout",
            "20",
            "--env",
            &format!("{WORKER}=1"),
        ],
        "dist_worker",
    );
    assert!(job.status.success(), "{}", job.report());
    for rank in 0..2 {
        let said = format!("dist worker rank {rank} of 2: pulled 3");
        assert!(
            job.stdout
                .lines()
                .any(|l| l.starts_with("[worker ") && l.ends_with(&said)),
            "no {said:?}\n{}",
            job.report()
        );
    }
    assert!(job.stderr.is_empty(), "{}", job.report());
    assert!(job.elapsed < Duration::from_secs(20), "{}", job.report());
    // The secret's file is gone with the job.
    let files: Vec<&str> = job
        .stdout
        .lines()
        .filter_map(|l| l.split_once("dist worker secret file: ").map(|(_, f)| f))
        .collect();
    assert_eq!(files.len(), 2, "{}", job.report());
    assert_eq!(files[0], files[1], "the workers got different secrets");
    assert!(
        !std::path::Path::new(files[0]).exists(),
        "{} is left",
        files[0]
    );
}

/// Set (to a fresh folder) for the workers of [`a_worker_that_dies_is_restarted_and_takes_its_place`].
const RECOVERING: &str = "KVSTORE_LAUNCH_TEST_RECOVERING";

/// A worker of a dist job that trains until the weight reaches 20 (optimizer `test`:
/// `w += grad`; every worker pushes ones), retrying a step that fails because a worker is gone.
/// Task 1 dies (exit status 7, no goodbye) after 3 steps the first time it runs, leaving a file
/// in the folder of `RECOVERING` so that its restart trains on.
#[test]
#[ignore = "a worker process of a_worker_that_dies_is_restarted_and_takes_its_place"]
fn recovering_worker() {
    use kvstore::{DType, KVStoreExt, NDArray, OptimizerSpec};
    let Some(folder) = std::env::var_os(RECOVERING) else {
        return;
    };
    let task = std::env::var("DMLC_TASK_ID").expect("DMLC_TASK_ID");
    let died = std::path::Path::new(&folder).join(format!("task-{task}-died"));
    let kv = kvstore::create("dist_sync").expect("create(dist_sync)");
    kv.set_optimizer(&OptimizerSpec::new("test"))
        .expect("set_optimizer");
    kv.init(3, &NDArray::zeros(&[4], DType::F32)).expect("init");
    let mut w = NDArray::zeros(&[4], DType::F32);
    kv.pull(3, &mut w).expect("pull");
    let mut weight = w.to_vec::<f32>().unwrap()[0];
    println!("task {task} (rank {}) starts at {weight}", kv.rank());
    let ones = NDArray::ones(&[4], DType::F32);
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    let mut steps = 0;
    while weight < 20.0 {
        match kv.pushpull(3, &ones, &mut w) {
            Ok(()) => {
                weight = w.to_vec::<f32>().unwrap()[0];
                steps += 1;
            }
            Err(e) if e.to_string().contains("is gone") && std::time::Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("pushpull: {e}"),
        }
        if task == "1" && steps == 3 && !died.exists() {
            std::fs::write(&died, b"").expect("the marker file");
            std::process::exit(7);
        }
    }
    println!("task {task} (rank {}) finished at {weight}", kv.rank());
}

#[test]
fn a_worker_that_dies_is_restarted_and_takes_its_place() {
    let folder =
        std::env::temp_dir().join(format!("kvstore-launch-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder).unwrap();
    let job = launch_test_workers(
        &[
            "-n",
            "2",
            "-s",
            "1",
            "--timeout",
            "10",
            "--restart-workers",
            "1",
            "--env",
            &format!("{RECOVERING}={}", folder.display()),
        ],
        "recovering_worker",
    );
    let _ = std::fs::remove_dir_all(&folder);
    assert!(job.status.success(), "{}", job.report());
    assert!(
        job.stderr
            .contains("kvstore launch: worker 1 exited with status 7; restarting it (1 of 1)"),
        "{}",
        job.report()
    );
    let restarted = job
        .stdout
        .lines()
        .filter(|l| {
            l.starts_with("[worker 1] ") && l.contains("task 1 (rank") && l.contains("starts at")
        })
        .nth(1)
        .unwrap_or_else(|| panic!("no second start of task 1\n{}", job.report()));
    let at: f32 = restarted.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        at >= 6.0,
        "the restarted worker starts from the servers' weight: {restarted}"
    );
    for task in 0..2 {
        assert!(
            job.stdout
                .lines()
                .any(|l| l.starts_with(&format!("[worker {task}] "))
                    && l.contains(&format!("task {task} (rank"))
                    && l.ends_with("finished at 20")),
            "task {task} does not finish at 20\n{}",
            job.report()
        );
    }
}

#[test]
fn a_worker_that_keeps_failing_ends_the_job_once_its_restarts_are_spent() {
    let job = launch(
        &[
            "-n",
            "1",
            "-s",
            "1",
            "--timeout",
            "30",
            "--restart-workers",
            "2",
            "--",
            "sh",
            "-c",
            "echo attempt; exit 3",
        ],
        &[],
    );
    assert_eq!(job.status.code(), Some(3), "{}", job.report());
    let attempts = job
        .stdout
        .lines()
        .filter(|l| *l == "[worker 0] attempt")
        .count();
    assert_eq!(
        attempts,
        3,
        "the first run and two restarts\n{}",
        job.report()
    );
    for n in 1..=2 {
        let said = format!("worker 0 exited with status 3; restarting it ({n} of 2)");
        assert!(job.stderr.contains(&said), "{}", job.report());
    }
    assert!(
        job.stderr.contains(
            "kvstore: worker 0 exited with status 3 (no restart left of --restart-workers 2); \
             killed the scheduler and server 0"
        ),
        "{}",
        job.report()
    );
    assert!(job.elapsed < Duration::from_secs(15), "{}", job.report());
}

/// Starts `kvstore launch` (under `nohup` when `nohup`) of one server and one worker that says
/// `ready` then sleeps `seconds` (its job never ends by itself: the worker never joins); returns the launcher, its marker and its standard error's
/// reader once the worker is ready.
#[cfg(target_os = "linux")]
fn a_sleeping_job(
    seconds: u32,
    nohup: bool,
) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let mark = common::unique_mark();
    let mut cmd = match nohup {
        true => {
            let mut cmd = Command::new("nohup");
            cmd.arg(env!("CARGO_BIN_EXE_kvstore"));
            cmd
        }
        false => Command::new(env!("CARGO_BIN_EXE_kvstore")),
    };
    let worker = format!("echo ready; exec sleep {seconds}");
    cmd.args(["launch", "--env"])
        .arg(format!("{}={mark}", common::MARK))
        .args(["-n", "1", "-s", "1", "--", "sh", "-c", &worker])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    common::without_cluster_vars(&mut cmd);
    let mut launcher = cmd.spawn().expect("cannot run kvstore launch");
    let mut stderr = launcher.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut lines = BufReader::new(launcher.stdout.take().unwrap()).lines();
    let first = lines.next().expect("the worker writes a line").unwrap();
    assert_eq!(first, "[worker 0] ready");
    // Keep draining the output, so that no process blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (launcher, mark, errors)
}

/// Waits up to 10 s for the processes marked `mark` to be gone; those left (killed then).
#[cfg(target_os = "linux")]
fn left_after_a_while(mark: &str) -> Vec<u32> {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = common::marked_processes(mark);
        if left.is_empty() || std::time::Instant::now() > until {
            common::kill(&left);
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_launcher_told_to_stop_kills_its_job_and_exits_128_plus_the_signal() {
    let (mut launcher, mark, errors) = a_sleeping_job(60, false);
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &launcher.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = launcher.wait().unwrap();
    let errors = errors.join().unwrap();
    assert_eq!(status.code(), Some(143), "{errors}");
    assert!(
        errors.contains(
            "the launcher got SIGTERM; passed it on to the scheduler, server 0 and worker 0"
        ),
        "{errors}"
    );
    assert_eq!(left_after_a_while(&mark), Vec::<u32>::new(), "{errors}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_launcher_killed_outright_takes_its_job_with_it() {
    let (mut launcher, mark, _errors) = a_sleeping_job(60, false);
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    assert_eq!(left_after_a_while(&mark), Vec::<u32>::new());
}

#[cfg(target_os = "linux")]
#[test]
fn a_launcher_started_under_nohup_keeps_ignoring_sighup() {
    let (mut launcher, mark, errors) = a_sleeping_job(60, true);
    let pid = launcher.id().to_string();
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("-HUP");
    std::thread::sleep(Duration::from_millis(500));
    // Still running, its job too (the scheduler, the server and the worker).
    assert!(launcher.try_wait().unwrap().is_none());
    assert!(common::marked_processes(&mark).len() >= 3);
    signal("-TERM");
    let status = launcher.wait().unwrap();
    let errors = errors.join().unwrap();
    assert_eq!(status.code(), Some(143), "{errors}");
    assert_eq!(left_after_a_while(&mark), Vec::<u32>::new(), "{errors}");
}
