//! MXNet 1.9.1 jobs for the interoperability tests: its scheduler and servers (and Python
//! workers) as child processes of the test.
//!
//! The tests need a Python with `mxnet==1.9.1`: `KVSTORE_MXNET_PYTHON` names it (`.ci/run`
//! installs one). Without it every test is reported ignored, with the reason.
#![allow(dead_code)]

pub mod two_bit;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The variable naming the Python interpreter that has MXNet 1.9.1.
pub const PYTHON_VAR: &str = "KVSTORE_MXNET_PYTHON";

/// The Python with MXNet 1.9.1, or why there is none.
pub fn mxnet_python() -> Result<PathBuf, String> {
    let python = std::env::var_os(PYTHON_VAR)
        .map(PathBuf::from)
        .ok_or_else(|| format!("needs MXNet 1.9.1: set {PYTHON_VAR} to a python that has it"))?;
    let out = Command::new(&python)
        .args(["-c", "import mxnet; print(mxnet.__version__)"])
        .env_remove("DMLC_ROLE")
        .output()
        .map_err(|e| format!("{PYTHON_VAR}={}: {e}", python.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if version != "1.9.1" {
        return Err(format!(
            "{PYTHON_VAR}={} has mxnet {version:?}, 1.9.1 is needed",
            python.display()
        ));
    }
    Ok(python)
}

/// How long an MXNet process of a test may live.
const JOB_LIMIT_SECS: u64 = 300;

/// A free TCP port on 127.0.0.1, for a process that binds it later (MXNet's scheduler), below
/// the ephemeral range ([`kvstore_dist::ports::spare_port`]): no socket bound to port 0 (this
/// crate's nodes, MXNet's servers and workers, other tests' jobs) can take it in the meantime,
/// which a port the system handed out could be (the job's workers then register with another
/// process).
pub fn free_port() -> u16 {
    kvstore_dist::ports::spare_port("127.0.0.1").expect("a free port on 127.0.0.1")
}

/// A fresh folder for a job's logs and files.
fn log_dir() -> Result<PathBuf, String> {
    let logs = std::env::temp_dir().join(format!(
        "kvstore-pslite-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    Ok(logs)
}

/// An MXNet scheduler and servers, killed when dropped.
pub struct MxnetJob {
    python: PathBuf,
    env: BTreeMap<String, String>,
    children: Vec<(String, Child)>,
    logs: PathBuf,
}

impl MxnetJob {
    /// Starts MXNet's scheduler and `servers` servers for a job of `workers` workers;
    /// `extra` adds variables (for every node, workers included).
    pub fn start(
        servers: usize,
        workers: usize,
        extra: &[(&str, &str)],
    ) -> Result<MxnetJob, String> {
        let python = mxnet_python()?;
        let logs = log_dir()?;
        let mut env: BTreeMap<String, String> = [
            ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
            ("DMLC_PS_ROOT_PORT", free_port().to_string()),
            ("DMLC_NUM_SERVER", servers.to_string()),
            ("DMLC_NUM_WORKER", workers.to_string()),
            ("DMLC_NODE_HOST", "127.0.0.1".to_string()),
            ("KVSTORE_TIMEOUT_SECS", "60".to_string()),
            ("OMP_NUM_THREADS", "1".to_string()),
            ("MXNET_CPU_WORKER_NTHREADS", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        let mut job = MxnetJob {
            python,
            env,
            children: Vec::new(),
            logs,
        };
        job.spawn("scheduler", "scheduler", "import mxnet")?;
        for i in 0..servers {
            job.spawn(&format!("server{i}"), "server", "import mxnet")?;
        }
        Ok(job)
    }

    /// Python workers only, for a job whose scheduler and servers run elsewhere (this crate's,
    /// on threads of the test): `options` are the job's worker settings.
    pub fn workers_of(options: &BTreeMap<String, String>) -> Result<MxnetJob, String> {
        let python = mxnet_python()?;
        let logs = log_dir()?;
        let mut env = options.clone();
        env.insert("OMP_NUM_THREADS".into(), "1".into());
        env.insert("MXNET_CPU_WORKER_NTHREADS".into(), "1".into());
        Ok(MxnetJob {
            python,
            env,
            children: Vec::new(),
            logs,
        })
    }

    fn spawn(&mut self, name: &str, role: &str, code: &str) -> Result<(), String> {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))
            .map_err(|e| e.to_string())?;
        // `timeout`: an MXNet node waits forever for a worker that never comes.
        let child = Command::new("timeout")
            .arg(JOB_LIMIT_SECS.to_string())
            .arg(&self.python)
            .args(["-c", code])
            .env_clear()
            .envs(std::env::vars().filter(|(k, _)| k == "PATH" || k == "HOME" || k == "TMPDIR"))
            .envs(&self.env)
            .env("DMLC_ROLE", role)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start MXNet's {name}: {e}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Starts a Python worker running `script` (with `mxnet as mx` and `numpy as np`
    /// imported, and `OUT` the folder of this job's files).
    pub fn python_worker(&mut self, name: &str, script: &str) -> Result<(), String> {
        let code = format!(
            "import mxnet as mx, numpy as np, os\nOUT = {:?}\n{script}",
            self.logs.display().to_string()
        );
        self.spawn(name, "worker", &code)
    }

    /// Kills the process `name` (`server0`, `scheduler`, ...).
    pub fn kill(&mut self, name: &str) {
        for (n, child) in &mut self.children {
            if n == name {
                stop(child);
            }
        }
    }

    /// Waits (at most `limit`) until MXNet's scheduler accepts connections: its Python takes
    /// seconds to start on a loaded machine, longer than a test's short timeout.
    pub fn wait_for_scheduler(&self, limit: Duration) -> Result<(), String> {
        let addr = format!(
            "{}:{}",
            self.env["DMLC_PS_ROOT_URI"], self.env["DMLC_PS_ROOT_PORT"]
        );
        let deadline = std::time::Instant::now() + limit;
        while std::net::TcpStream::connect(&addr).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "MXNet's scheduler did not listen on {addr} within {limit:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The variables a worker of this job needs.
    pub fn worker_options(&self) -> BTreeMap<String, String> {
        let mut options = self.env.clone();
        options.insert("DMLC_ROLE".into(), "worker".into());
        options
    }

    /// The folder of this job's logs and files.
    pub fn dir(&self) -> &std::path::Path {
        &self.logs
    }

    /// Waits (at most `limit`) for every process to exit; an error names any that failed,
    /// with its log.
    pub fn wait(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + limit;
        for (name, child) in &mut self.children {
            loop {
                match child.try_wait().map_err(|e| e.to_string())? {
                    Some(status) if status.success() => break,
                    Some(status) => {
                        let log = std::fs::read_to_string(self.logs.join(format!("{name}.log")))
                            .unwrap_or_default();
                        return Err(format!("MXNet's {name} exited with {status}:\n{log}"));
                    }
                    None if std::time::Instant::now() > deadline => {
                        let log = std::fs::read_to_string(self.logs.join(format!("{name}.log")))
                            .unwrap_or_default();
                        return Err(format!("MXNet's {name} is still running:\n{log}"));
                    }
                    None => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Ok(())
    }
}

impl MxnetJob {
    /// Leaves the processes to end with the job (its workers' stores end it when dropped);
    /// their logs are removed.
    pub fn detach(mut self) {
        let _ = std::fs::remove_dir_all(&self.logs);
        self.children.clear();
    }
}

/// Runs `trials` as a test binary, or, without MXNet 1.9.1, reports each of `names` ignored
/// with the reason.
pub fn run_or_ignore(
    names: impl Iterator<Item = String>,
    trials: impl FnOnce() -> Vec<libtest_mimic::Trial>,
) -> std::process::ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let trials = match mxnet_python() {
        Ok(_) => trials(),
        Err(reason) => names
            .map(|name| {
                libtest_mimic::Trial::test(name, || Ok(()))
                    .with_kind(reason.clone())
                    .with_ignored_flag(true)
            })
            .collect(),
    };
    libtest_mimic::run(&args, trials).exit_code()
}

/// Ends a process started under `timeout`: SIGTERM, which `timeout` passes on to MXNet's
/// process (SIGKILL would end `timeout` alone).
fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let terminated = Command::new("kill")
        .arg(child.id().to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !terminated {
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl Drop for MxnetJob {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            stop(child);
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// The suite's checks that push with no optimizer set: `pslite_dist_async` refuses such a push
/// (MXNet 1.9.1's servers abort on one in async mode), so these checks cannot hold for it.
const PUSHES_WITHOUT_AN_OPTIMIZER: &[&str] = &[
    "pushpull_sums_device_values_into_every_out",
    "pushpull_in_place_writes_the_sum_into_every_value",
    "pushpull_single_value_reaches_the_out",
    "pushpull_key_list_with_per_device_lists",
    "pushpull_sums_every_dtype_exactly",
    "pushpull_str_keys",
    "pushpull_handles_any_shape",
    "pushpull_leaves_its_inputs_untouched",
    "pushpull_counts_a_repeated_array_each_time",
    "keyvalue_push_then_pull_returns_the_sum",
    "keyvalue_push_without_updater_replaces_the_value",
    "keyvalue_push_of_rows_to_a_dense_key_replaces_its_value",
    "row_sparse_push_of_several_values_sums_their_rows",
    "differential_random_pushpulls_match_teststore",
    "differential_random_pushpulls_with_str_keys_match_teststore",
    "many_int_keys_in_one_call",
    "many_str_keys_in_one_call",
    "errors_at_one_worker_name_the_key_and_spare_the_others",
    "async_push_replaces_the_value_without_an_optimizer",
    "async_push_before_a_barrier_is_seen_by_every_worker_after",
];

/// `trial`, or, when it is one of `checks` (a name part of the trial's), the same name reported
/// ignored with `reason`.
fn ignored_if(
    trial: libtest_mimic::Trial,
    checks: &[&str],
    reason: &'static str,
) -> libtest_mimic::Trial {
    if trial.name().split("::").any(|part| checks.contains(&part)) {
        libtest_mimic::Trial::test(trial.name(), || Ok(()))
            .with_kind(reason)
            .with_ignored_flag(true)
    } else {
        trial
    }
}

/// `trial`, or, when it is one of the suite's checks that push with no optimizer set, the same
/// name reported ignored with the reason (for `pslite_dist_async`).
pub fn unless_it_pushes_without_an_optimizer(trial: libtest_mimic::Trial) -> libtest_mimic::Trial {
    ignored_if(
        trial,
        PUSHES_WITHOUT_AN_OPTIMIZER,
        "pushes with no optimizer set, which the async worker refuses",
    )
}

/// `trial`, or, when it is one of the suite's checks of row-sparse pushes to a dense key or
/// with no optimizer set, the same name reported ignored with the reason: MXNet's servers keep
/// a key dense or by rows from its `init`, and without an optimizer read a round's rows as if
/// they were every row, so the store refuses such pushes, naming the key.
pub fn unless_it_pushes_rows_to_a_dense_key(trial: libtest_mimic::Trial) -> libtest_mimic::Trial {
    ignored_if(
        trial,
        &[
            "optimizer_updates_the_pushed_rows_of_a_dense_weight_lazily",
            "keyvalue_push_of_rows_to_a_dense_key_replaces_its_value",
            "row_sparse_push_of_several_values_sums_their_rows",
        ],
        "pushes rows to a dense key, or with no optimizer, which MXNet's servers cannot take",
    )
}

/// Runs `part` for each worker of a job, each on a thread of its own, then lets every worker
/// leave, each on a thread of its own (leaving is a barrier of them all). Returns what each
/// part returned, in the workers' order, or every failure, one a line.
pub fn on_each_worker<T: Send>(
    workers: Vec<Box<dyn kvstore_base::KVStoreBase>>,
    part: impl Fn(&dyn kvstore_base::KVStoreBase) -> Result<T, String> + Sync,
) -> Result<Vec<T>, String> {
    let part = &part;
    let results: Vec<Result<T, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter()
            .map(|kv| scope.spawn(move || part(kv.as_ref())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a worker panicked".into())))
            .collect()
    });
    std::thread::scope(|scope| {
        for kv in workers {
            scope.spawn(move || drop(kv));
        }
    });
    let mut done = Vec::with_capacity(results.len());
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(value) => done.push(value),
            Err(e) => failures.push(e),
        }
    }
    match failures.is_empty() {
        true => Ok(done),
        false => Err(failures.join("\n")),
    }
}

/// The first place where two sets of pulled values, by file name, differ: named, with the
/// first bytes of each.
pub fn first_difference(
    what: &str,
    expected: &[(String, Vec<u8>)],
    got: &[(String, Vec<u8>)],
) -> Result<(), String> {
    if expected.len() != got.len() {
        return Err(format!(
            "{what}: {} files, {} expected",
            got.len(),
            expected.len()
        ));
    }
    for ((name, want), (other, have)) in expected.iter().zip(got) {
        if name != other || want != have {
            let head = |b: &[u8]| b.iter().take(16).copied().collect::<Vec<u8>>();
            return Err(format!(
                "{what}: {name}: MXNet's run gave bytes {:?}..., this one {other} {:?}...",
                head(want),
                head(have)
            ));
        }
    }
    Ok(())
}

/// A test of a test binary with its own harness.
pub type Test = fn() -> Result<(), libtest_mimic::Failed>;
