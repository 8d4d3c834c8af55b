//! Runs the `kvstore` binary as a user would.

mod common;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kvstore_dist::{DistConfig, Group, Node};

fn kvstore(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kvstore: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn list_shows_teststore_with_its_capabilities_and_origin() {
    let (ok, out, err) = kvstore(&["list"]);
    assert!(ok, "kvstore list failed:\n{err}");
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("NAME") && header.contains("CAPABILITIES"),
        "{out}"
    );
    let teststore = out
        .lines()
        .find(|l| l.starts_with("teststore "))
        .unwrap_or_else(|| panic!("teststore is not listed:\n{out}"));
    assert!(teststore.contains("none"), "{teststore}");
    assert!(teststore.contains("kvstore_test"), "{teststore}");
}

#[test]
fn help_lists_only_real_subcommands() {
    let (ok, out, err) = kvstore(&["--help"]);
    assert!(ok, "kvstore --help failed:\n{err}");
    assert!(out.contains("list"), "{out}");
    for subcommand in ["scheduler", "server", "launch"] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(&format!("{subcommand} "))),
            "{subcommand} is not listed:\n{out}"
        );
    }
    assert!(!out.contains("planned"), "{out}");
}

#[test]
fn an_unknown_subcommand_fails_without_panicking() {
    let (ok, _, err) = kvstore(&["frobnicate"]);
    assert!(!ok);
    assert!(err.contains("frobnicate"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A port free a moment ago on 127.0.0.1, below the ephemeral range (so that no socket bound to
/// port 0 can be given it before the process meant for it binds it).
fn free_port() -> u16 {
    kvstore_dist::ports::spare_port("127.0.0.1").expect("a free port on 127.0.0.1")
}

/// The `DMLC_*` variables of a 1-server, 1-worker cluster whose scheduler is 127.0.0.1:`port`.
fn cluster_vars(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
        ("DMLC_PS_ROOT_PORT", port.to_string()),
        ("DMLC_NUM_SERVER", "1".to_string()),
        ("DMLC_NUM_WORKER", "1".to_string()),
        ("DMLC_NODE_HOST", "127.0.0.1".to_string()),
        ("KVSTORE_TIMEOUT_SECS", "5".to_string()),
    ]
}

/// A `kvstore scheduler` or `kvstore server` process, killed and reaped on drop unless it has
/// exited.
struct RoleProcess(Child);

/// A `kvstore scheduler` process.
type SchedulerProcess = RoleProcess;

impl RoleProcess {
    fn spawn(vars: &[(&str, String)]) -> RoleProcess {
        RoleProcess::spawn_role("scheduler", vars)
    }

    fn spawn_role(role: &str, vars: &[(&str, String)]) -> RoleProcess {
        RoleProcess::spawn_with_args(&[role], vars)
    }

    fn spawn_with_args(args: &[&str], vars: &[(&str, String)]) -> RoleProcess {
        let role = args[0];
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstore"));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Only the variables given: none inherited from the environment of the test run.
        common::without_cluster_vars(&mut cmd);
        cmd.envs(vars.iter().map(|(k, v)| (k, v)));
        RoleProcess(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot run kvstore {role}: {e}")),
        )
    }

    /// Waits at most `limit` for the process to exit; kills it (and fails) if it does not.
    fn wait(mut self, limit: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + limit;
        loop {
            if self.0.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = self.0.kill();
                let output = self.take_output();
                panic!(
                    "kvstore did not exit within {limit:?}; killed it.\nstderr:\n{}",
                    output.2
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.take_output()
    }

    fn take_output(&mut self) -> (ExitStatus, String, String) {
        use std::io::Read;
        let status = self.0.wait().unwrap();
        let mut out = String::new();
        let mut err = String::new();
        if let Some(r) = self.0.stdout.as_mut() {
            let _ = r.read_to_string(&mut out);
        }
        if let Some(r) = self.0.stderr.as_mut() {
            let _ = r.read_to_string(&mut err);
        }
        (status, out, err)
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn node_config(vars: &[(&str, String)], role: &str) -> DistConfig {
    DistConfig::from_vars(
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .chain([("DMLC_ROLE".to_string(), role.to_string())]),
    )
    .unwrap()
}

#[test]
fn scheduler_serves_a_one_server_one_worker_cluster_and_exits_0() {
    let err = serve_one_server_one_worker(cluster_vars(free_port()));
    // Nothing to say at the default level when all goes well.
    assert!(err.is_empty(), "{err}");
}

#[test]
fn ps_verbose_2_logs_every_message_and_1_connections_and_barriers() {
    let mut vars = cluster_vars(free_port());
    vars.push(("PS_VERBOSE", "2".to_string()));
    let err = serve_one_server_one_worker(vars);
    let has = |level: &str, needle: &str| {
        err.lines()
            .any(|l| l.starts_with(&format!("kvstore: {level}")) && l.contains(needle))
    };
    // Every message (ps-lite's PS_VERBOSE=2): the registrations, and the answers.
    assert!(
        has("DEBUG", "received from") && has("DEBUG", "command 0x4b560001"),
        "{err}"
    );
    assert!(has("DEBUG", "sending to"), "{err}");
    // Connections and barriers (PS_VERBOSE=1).
    assert!(has("INFO", "serving a connection from"), "{err}");
    assert!(has("INFO", "the barrier of the"), "{err}");
}

#[test]
fn the_verbosity_of_a_config_file_raises_the_log_level_too() {
    let dir = std::env::temp_dir().join(format!("kvstore-cli-verbose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kvstore.toml");
    std::fs::write(&file, "[dist]\nverbose = 1\n").unwrap();
    let err = serve_one_server_one_worker_with(
        cluster_vars(free_port()),
        &["scheduler", "--config", file.to_str().unwrap()],
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        err.lines()
            .any(|l| l.starts_with("kvstore: INFO") && l.contains("the barrier of the")),
        "{err}"
    );
    assert!(!err.contains("kvstore: DEBUG"), "{err}");
}

#[test]
fn the_scheduler_reads_the_file_kvstore_config_names_as_workers_do() {
    let dir = std::env::temp_dir().join(format!("kvstore-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kvstore.toml");
    std::fs::write(&file, "[dist]\nverbose = 1\n").unwrap();
    let mut vars = cluster_vars(free_port());
    vars.push(("KVSTORE_CONFIG", file.to_str().unwrap().to_string()));
    let err = serve_one_server_one_worker_with(vars, &["scheduler"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        err.lines()
            .any(|l| l.starts_with("kvstore: INFO") && l.contains("the barrier of the")),
        "{err}"
    );
}

/// Runs `kvstore scheduler` with `vars` while a server and a worker join, meet in barriers
/// and leave; returns its standard error once it exited 0.
fn serve_one_server_one_worker(vars: Vec<(&'static str, String)>) -> String {
    serve_one_server_one_worker_with(vars, &["scheduler"])
}

/// As [`serve_one_server_one_worker`], with the command line `args`.
fn serve_one_server_one_worker_with(vars: Vec<(&'static str, String)>, args: &[&str]) -> String {
    let scheduler = RoleProcess::spawn_with_args(args, &vars);

    // Both nodes join concurrently (registration completes only when both are in); a node
    // retries connecting until the timeout, so the scheduler may still be starting.
    let server_config = node_config(&vars, "server");
    let worker_config = node_config(&vars, "worker");
    let server = thread::spawn(move || Node::join(&server_config));
    let worker = thread::spawn(move || Node::join(&worker_config));
    let server = server.join().unwrap().expect("the server cannot join");
    let worker = worker.join().unwrap().expect("the worker cannot join");
    assert_eq!((server.rank(), worker.rank()), (0, 0));
    assert_eq!(
        (worker.servers().count(), worker.workers().count()),
        (1, 1),
        "{:?}",
        worker.nodes()
    );

    worker.barrier(Group::Workers).expect("worker barrier");
    thread::scope(|s| {
        let w = s.spawn(|| worker.barrier(Group::All));
        server.barrier(Group::All).expect("all barrier (server)");
        w.join().unwrap().expect("all barrier (worker)");
    });

    worker.leave().expect("the worker cannot leave");
    server.leave().expect("the server cannot leave");

    let (status, _, err) = scheduler.wait(Duration::from_secs(5));
    assert!(
        status.success(),
        "kvstore scheduler: {status}\nstderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn scheduler_without_dmlc_num_worker_fails_naming_it() {
    let mut vars = cluster_vars(free_port());
    vars.retain(|(k, _)| *k != "DMLC_NUM_WORKER");
    let (status, _, err) = SchedulerProcess::spawn(&vars).wait(Duration::from_secs(5));
    assert!(!status.success(), "{status}\nstderr:\n{err}");
    assert!(err.contains("DMLC_NUM_WORKER"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn scheduler_names_the_missing_nodes_when_registration_times_out() {
    let mut vars = cluster_vars(free_port());
    vars.retain(|(k, _)| *k != "KVSTORE_TIMEOUT_SECS");
    vars.push(("KVSTORE_TIMEOUT_SECS", "0.5".to_string()));
    let (status, _, err) = SchedulerProcess::spawn(&vars).wait(Duration::from_secs(10));
    assert!(!status.success(), "{status}\nstderr:\n{err}");
    assert!(err.contains("server") && err.contains("worker"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn server_with_another_dmlc_role_is_refused_naming_it() {
    let mut vars = cluster_vars(free_port());
    vars.push(("DMLC_ROLE", "worker".to_string()));
    let (status, _, err) = RoleProcess::spawn_role("server", &vars).wait(Duration::from_secs(5));
    assert!(!status.success(), "{status}\nstderr:\n{err}");
    assert!(
        err.contains("DMLC_ROLE") && err.contains("`kvstore server`"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn server_without_a_scheduler_gives_up_after_the_timeout() {
    let mut vars = cluster_vars(free_port());
    vars.retain(|(k, _)| *k != "KVSTORE_TIMEOUT_SECS");
    vars.push(("KVSTORE_TIMEOUT_SECS", "0.5".to_string()));
    let (status, _, err) = RoleProcess::spawn_role("server", &vars).wait(Duration::from_secs(10));
    assert!(!status.success(), "{status}\nstderr:\n{err}");
    assert!(err.starts_with("kvstore: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn server_serves_a_worker_and_exits_0_with_the_scheduler() {
    use kvstore::{DType, KVStoreExt, NDArray};

    let vars = cluster_vars(free_port());
    let scheduler = RoleProcess::spawn(&vars);
    let server = RoleProcess::spawn_role("server", &vars);
    {
        // The worker's settings as create options, which win over this process's environment.
        let options = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .chain([("DMLC_ROLE".to_string(), "worker".to_string())])
            .collect();
        let kv = kvstore::create_with("dist_sync", options).expect("the worker cannot join");
        assert_eq!((kv.rank(), kv.num_workers()), (0, 1));
        kv.init(7, &NDArray::zeros(&[3], DType::F32)).unwrap();
        kv.push(7, &NDArray::full(&[3], 2.5, DType::F32)).unwrap();
        let mut out = NDArray::zeros(&[3], DType::F32);
        kv.pull(7, &mut out).unwrap();
        assert_eq!(out.to_vec::<f32>().unwrap(), [2.5; 3]);
        // Dropping the store says goodbye to the server and the scheduler.
    }
    for (name, process) in [("server", server), ("scheduler", scheduler)] {
        let (status, _, err) = process.wait(Duration::from_secs(10));
        assert!(status.success(), "kvstore {name}: {status}\nstderr:\n{err}");
    }
}

#[test]
fn scheduler_with_a_secret_refuses_and_logs_a_node_without_it() {
    use kvstore_dist::transport::{Connection, Outgoing, TransportConfig};
    let port = free_port();
    let mut vars = cluster_vars(port);
    vars.retain(|(k, _)| *k != "KVSTORE_TIMEOUT_SECS");
    vars.push(("KVSTORE_TIMEOUT_SECS", "1".to_string()));
    vars.push((
        "KVSTORE_SECRET",
        "the secret of this scheduler test".to_string(),
    ));
    let scheduler = SchedulerProcess::spawn(&vars);
    let config = TransportConfig {
        timeout: Duration::from_secs(5),
        ..TransportConfig::default()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let conn = loop {
        match Connection::connect(("127.0.0.1", port), config.clone()) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the scheduler never listened: {e}"),
        }
    };
    let refused = conn
        .request(Outgoing::new(0x4B56_0001, b"register me"), "registration")
        .unwrap_err()
        .to_string();
    assert!(refused.contains("shared secret"), "{refused}");
    // Nobody registers: the scheduler gives up after its timeout, having logged the refusal.
    let (status, _, err) = scheduler.wait(Duration::from_secs(10));
    assert!(!status.success(), "{status}\nstderr:\n{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("kvstore: WARN ") && l.contains("authentication failed")),
        "{err}"
    );
    assert!(
        !err.contains("the secret of this"),
        "the secret was logged:\n{err}"
    );
}
