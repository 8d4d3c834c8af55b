//! What the tests that run `kvstore launch` share: a bounded launch whose processes are all
//! accounted for afterwards.
//!
//! Every launch is bounded: a launcher that runs over its limit is killed (with whatever it
//! started) and the test fails. Every job gets a marker variable (`--env`), so that the
//! processes it started can be found afterwards (Linux: `/proc/*/environ`) and none may be
//! left.
#![allow(dead_code)] // each test binary uses its own part

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long any launch of these tests may take.
pub const LIMIT: Duration = Duration::from_secs(30);

/// The marker variable every job of these tests passes to its processes.
pub const MARK: &str = "KVSTORE_LAUNCH_TEST_MARK";

/// A marker value unique to this test run and call.
pub fn unique_mark() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A port free a moment ago on 127.0.0.1, below the ephemeral range (so that no socket bound to
/// port 0 can be given it before the process meant for it binds it).
pub fn free_port() -> u16 {
    kvstore_dist::ports::spare_port("127.0.0.1").expect("a free port on 127.0.0.1")
}

/// The ids of the processes whose environment holds `MARK=mark` (Linux; none elsewhere).
pub fn marked_processes(mark: &str) -> Vec<u32> {
    if !cfg!(target_os = "linux") {
        return Vec::new();
    }
    let wanted = format!("{MARK}={mark}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|&b| b == 0)
                    .any(|var| var == wanted.as_bytes())
            })
        })
        .collect()
}

/// Kills the processes (this test started them through the launcher).
pub fn kill(pids: &[u32]) {
    if !pids.is_empty() {
        let _ = Command::new("kill")
            .arg("-9")
            .args(pids.iter().map(u32::to_string))
            .status();
    }
}

/// What a launch left.
pub struct Launched {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Launched {
    pub fn report(&self) -> String {
        format!(
            "status {} after {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Removes from `cmd`'s environment every DMLC_*, PS_* and KVSTORE_* variable of the test
/// run's, and RUST_LOG, so that a process gets only the cluster variables a test gives it.
pub fn without_cluster_vars(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("DMLC_") || k.starts_with("PS_") || k.starts_with("KVSTORE_") {
            cmd.env_remove(k.as_ref());
        }
    }
    // The processes' log level is the tests' to choose, not the environment's.
    cmd.env_remove("RUST_LOG");
}

/// Runs `kvstore launch` with `args` (the marker added) and `env` on top of an environment
/// without any DMLC_*, PS_* or KVSTORE_* variable; kills it and fails past [`LIMIT`]. Fails
/// when a process of the job is left once it returned.
pub fn launch(args: &[&str], env: &[(&str, &str)]) -> Launched {
    let mark = unique_mark();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstore"));
    cmd.arg("launch")
        .arg("--env")
        .arg(format!("{MARK}={mark}"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    without_cluster_vars(&mut cmd);
    cmd.envs(env.iter().copied());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("cannot run kvstore launch");
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            kill(&marked_processes(&mark));
            panic!("kvstore launch {args:?} ran over {LIMIT:?}; killed it and its processes");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let launched = Launched {
        status,
        elapsed: started.elapsed(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    let left = marked_processes(&mark);
    kill(&left);
    assert!(
        left.is_empty(),
        "processes {left:?} of the job outlived the launcher\n{}",
        launched.report()
    );
    assert!(
        !launched.stderr.contains("panicked"),
        "{}",
        launched.report()
    );
    launched
}
