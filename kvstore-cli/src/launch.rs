//! `kvstore launch`: a whole dist job on this machine, as MXNet's
//! `tools/launch.py --launcher local` runs one.
//!
//! [`launch`] starts, in this order:
//!
//! - the **scheduler**: this program (`kvstore scheduler`);
//! - `SERVERS` **servers**: this program (`kvstore server`); `-s 0` for a job without
//!   parameter servers (the `horovod` store's workers only meet at the scheduler);
//!   with `--pslite`, `kvstore pslite-scheduler` and `kvstore pslite-server` instead, which
//!   speak MXNet 1.9.1's protocol (MXNet's Python workers use them; no secret, no restarts);
//! - `WORKERS` **workers**: the user's command, as many times.
//!
//! Each process gets the variables MXNet's launcher exports ([`process_env`]): `DMLC_ROLE`,
//! `DMLC_PS_ROOT_URI` and `DMLC_PS_ROOT_PORT` (the scheduler's address: `--host`, and `--port`
//! or a port that is free on that host), `DMLC_NUM_SERVER`, `DMLC_NUM_WORKER`,
//! `DMLC_NODE_HOST` (`--host`: every process advertises that address and listens on it, or on
//! `KVSTORE_BIND_HOST` when the environment sets one) and
//! `DMLC_TASK_ID` (as dmlc-core's local launcher: a worker's index, a server's `WORKERS +`
//! index; it is not the rank, which the scheduler assigns), `KVSTORE_TIMEOUT_SECS` with
//! `--timeout`, `KVSTORE_SECRET_FILE` (a fresh random secret for the job, unless the
//! launcher's environment or `--env` sets `KVSTORE_SECRET` or `KVSTORE_SECRET_FILE`:
//! every connection of the job then opens with the shared-secret handshake, so no process
//! without the file, another user's or another host's, can join the job, push into it or stop
//! it; the file is `$TMPDIR/kvstore-launch-<pid>-<hex>/secret`, mode 0600 in a 0700 folder,
//! removed when the launcher returns, and by the next launch when a signal killed the
//! launcher; [`job_secret`]), and every `--env KEY=VALUE`. The rest
//! of the launcher's environment is
//! inherited (`PS_VERBOSE`, `MXNET_KVSTORE_BIGARRAY_BOUND`, `OMP_NUM_THREADS`, ...), except
//! `PORT`, a node's fixed port, which processes sharing one host cannot share. Standard input
//! is closed (`/dev/null`) for every process.
//!
//! Every line a process writes is forwarded whole, prefixed with its name (`[scheduler] `,
//! `[server 0] `, `[worker 1] `), to the launcher's standard output or standard error, the
//! stream it was written to ([`forward_lines`]).
//!
//! The job ends ([`JobEnd`]):
//!
//! - **successfully** when every worker (its last process, when it was restarted) has exited
//!   with status 0 and then the servers and the scheduler have exited with status 0 too (they
//!   do once every worker said goodbye);
//! - **in failure** when a process exits with another status or is killed by a signal: the
//!   launcher kills every other process, waits for them, and reports the first failure
//!   (`worker 1 exited with status 3`) with its status as the launcher's own (128 + the
//!   signal's number for a signal). With `--restart-workers N`, a failed worker is first
//!   started again, with the same command and variables, up to N times in all (said on
//!   standard error: `worker 1 was killed by signal 9 (SIGKILL); restarting it (1 of 2)`; its
//!   lines keep the prefix `[worker 1] `), unless the scheduler or a server has exited: with
//!   the `dist_*` stores the new process takes the lost worker's place and the job goes on
//!   (`byteps` and `horovod` workers cannot rejoin: their restarts fail);
//! - **in failure** when the servers or the scheduler are still running a timeout after the
//!   last worker exited: they are killed and named. The timeout is `--timeout`, else
//!   `KVSTORE_TIMEOUT_SECS` of the launcher's environment, else 600 s: the processes' own
//!   bound on every wait.
//!
//! The workers run as long as they like; every other wait of the launcher is bounded. Each
//! process runs in a process group of its own, and killing one is `SIGKILL` of its group (what
//! it started and did not `exec` too, unless that left the group); a process that fails takes
//! its group with it too (on Linux). A `SIGINT` (Ctrl-C), `SIGTERM` or `SIGHUP` is passed on
//! to every process, which may end as they would on a terminal's Ctrl-C; the launcher kills
//! what still runs a few seconds later and exits with 128 + the signal's number, even when it
//! arrives as the job is ending; on Linux a launcher killed outright takes the processes it
//! started with it (see [`stop_signals`](crate::stop_signals)).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kvstore_dist::config::DistFile;
use kvstore_dist::Role;

/// The scheduler's host when `--host` is not given.
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// The variables the launcher sets for every process itself; `--env` cannot set them (each
/// has its option, or, for `PORT`, cannot be shared by the processes of one host).
pub const LAUNCHER_VARS: &[&str] = &[
    "DMLC_ROLE",
    "DMLC_PS_ROOT_URI",
    "DMLC_PS_ROOT_PORT",
    "DMLC_NUM_SERVER",
    "DMLC_NUM_WORKER",
    "DMLC_NODE_HOST",
    "DMLC_TASK_ID",
    "KVSTORE_TIMEOUT_SECS",
    "PORT",
];

/// The most processes a launched job may have besides its scheduler (`-n` plus `-s`): every
/// one runs on this host and connects to the scheduler, whose ps-lite van takes at most 4096
/// connections (`kvstore_pslite::van`).
pub const MAX_PROCESSES: u32 = 4096;

/// How often the launcher looks for processes that exited.
const POLL: Duration = Duration::from_millis(10);

/// How long a killed process may take to be gone before the launcher stops waiting for it.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// How long the servers and the scheduler may outlive the last worker beyond the timeout: time
/// for them to fail by their own timeout, naming what they wait for, before they are killed.
const SERVICE_GRACE: Duration = Duration::from_secs(5);

/// How long the launcher waits, once every process is gone, for the last of their output
/// (a process's own children may hold its pipes open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The longest piece of output forwarded as one line: a longer line is cut into pieces of
/// this size, each forwarded as a line of its own.
pub const MAX_LINE_BYTES: u64 = 1 << 20;

/// The options of `kvstore launch`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LaunchOptions {
    /// Number of workers: processes running COMMAND (at least 1).
    #[arg(
        short = 'n',
        long = "num-workers",
        value_name = "WORKERS",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub num_workers: u32,

    /// Number of servers: `kvstore server` processes (0 for a job without parameter
    /// servers, such as horovod's; the dist and byteps stores need at least 1).
    #[arg(
        short = 's',
        long = "num-servers",
        value_name = "SERVERS",
        value_parser = clap::value_parser!(u32)
    )]
    pub num_servers: u32,

    /// The address of this machine that every process advertises and listens on
    /// (DMLC_PS_ROOT_URI, DMLC_NODE_HOST).
    #[arg(long, value_name = "HOST", default_value = DEFAULT_HOST)]
    pub host: String,

    /// The scheduler's port (DMLC_PS_ROOT_PORT); by default a port that is free on HOST.
    #[arg(
        long,
        value_name = "PORT",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub port: Option<u16>,

    /// Seconds every wait may last (KVSTORE_TIMEOUT_SECS of every process), and how long the
    /// servers and the scheduler may run on once every worker has exited [default:
    /// KVSTORE_TIMEOUT_SECS of this environment, else 600].
    #[arg(
        long,
        value_name = "SECS",
        value_parser = parse_timeout,
        allow_negative_numbers = true
    )]
    pub timeout: Option<Duration>,

    /// Restart a worker that fails (exits with a status other than 0, or is killed), at most
    /// N times in all, while the scheduler and the servers run: the new process takes the
    /// lost worker's place in the job (a recovery node of the dist_* stores: same rank, the
    /// servers' values and optimizer states kept) and the others go on.
    #[arg(long = "restart-workers", value_name = "N", default_value_t = 0)]
    pub restart_workers: u32,

    /// Start kvstore-pslite's scheduler and servers (`kvstore pslite-scheduler`,
    /// `pslite-server`), which speak MXNet 1.9.1's own protocol: the workers may then be
    /// MXNet's Python workers (`mx.kv.create('dist_sync')`, unchanged) and `pslite_dist_sync`
    /// workers. ps-lite has no handshake, so the job gets no secret;
    /// its workers cannot be restarted (`--restart-workers` is refused).
    #[arg(long)]
    pub pslite: bool,

    /// A variable for every process (repeatable); MXNet's KEY:VALUE form is accepted too.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,

    /// The program each worker runs, with its arguments (after `--`).
    #[arg(
        last = true,
        required = true,
        value_name = "COMMAND",
        value_parser = clap::value_parser!(OsString)
    )]
    pub command: Vec<OsString>,
}

impl LaunchOptions {
    /// Options for `workers` workers and `servers` servers running `command`, with every other
    /// option at its default.
    pub fn new<I, S>(workers: u32, servers: u32, command: I) -> LaunchOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        LaunchOptions {
            num_workers: workers,
            num_servers: servers,
            host: DEFAULT_HOST.to_string(),
            port: None,
            timeout: None,
            restart_workers: 0,
            pslite: false,
            env: Vec::new(),
            command: command.into_iter().map(Into::into).collect(),
        }
    }

    /// Checks what the command line parser checks too, for options built in code: at least
    /// one worker, a command, a host, a non-zero port, a timeout in range,
    /// `--env` keys that are names the launcher does not set itself; and at most
    /// [`MAX_PROCESSES`] workers and servers.
    ///
    /// # Errors
    /// [`kvstore::Error::InvalidArgument`] naming the option.
    pub fn validate(&self) -> kvstore::Result<()> {
        let invalid = |m: String| Err(kvstore::Error::InvalidArgument(m));
        if self.num_workers == 0 {
            return invalid("-n/--num-workers must be at least 1 (got 0)".into());
        }
        if u64::from(self.num_workers) + u64::from(self.num_servers) > u64::from(MAX_PROCESSES) {
            return invalid(format!(
                "-n/--num-workers {} and -s/--num-servers {}: a launched job runs at most \
                 {MAX_PROCESSES} workers and servers in all, on this host",
                self.num_workers, self.num_servers
            ));
        }
        if self.command.first().is_none_or(|c| c.is_empty()) {
            return invalid(
                "a command for the workers is required: kvstore launch -n N -s M -- COMMAND \
                 [ARGS...]"
                    .into(),
            );
        }
        if self.host.trim().is_empty() || self.host.chars().any(char::is_whitespace) {
            return invalid(format!(
                "--host {:?} is not a host name or address",
                self.host
            ));
        }
        if self.port == Some(0) {
            return invalid("--port must be in 1..=65535 (got 0)".into());
        }
        if let Some(timeout) = self.timeout {
            check_timeout(timeout.as_secs_f64()).map_err(|e| {
                kvstore::Error::InvalidArgument(format!("--timeout {timeout:?}: {e}"))
            })?;
        }
        for (key, _) in &self.env {
            check_env_key(key).map_err(kvstore::Error::InvalidArgument)?;
        }
        if self.pslite && self.num_servers == 0 {
            return invalid("--pslite: a ps-lite job needs at least one server (-s 1)".into());
        }
        if self.pslite && self.restart_workers > 0 {
            return invalid(
                "--pslite with --restart-workers: a ps-lite job cannot take a worker back \
                 (kvstore-pslite offers no recovery nodes)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// One process of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Process {
    /// The scheduler (`kvstore scheduler`).
    Scheduler,
    /// Server number `i` (`kvstore server`), counted from 0 in start order.
    Server(u32),
    /// Worker number `i` (the user's command), counted from 0 in start order.
    Worker(u32),
}

impl Process {
    /// The role it runs.
    pub fn role(self) -> Role {
        match self {
            Process::Scheduler => Role::Scheduler,
            Process::Server(_) => Role::Server,
            Process::Worker(_) => Role::Worker,
        }
    }

    /// What its forwarded lines start with: `[scheduler] `, `[server 0] `, `[worker 1] `.
    pub fn prefix(self) -> String {
        format!("[{self}] ")
    }

    /// Its `DMLC_TASK_ID`, as dmlc-core's local launcher numbers tasks: workers `0..workers`,
    /// then servers; none for the scheduler.
    pub fn task_id(self, workers: u32) -> Option<u32> {
        match self {
            Process::Scheduler => None,
            Process::Worker(i) => Some(i),
            Process::Server(i) => Some(workers.saturating_add(i)),
        }
    }
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Process::Scheduler => f.write_str("scheduler"),
            Process::Server(i) => write!(f, "server {i}"),
            Process::Worker(i) => write!(f, "worker {i}"),
        }
    }
}

/// The processes of a job in start order: the scheduler, the servers, the workers.
pub fn processes(options: &LaunchOptions) -> Vec<Process> {
    std::iter::once(Process::Scheduler)
        .chain((0..options.num_servers).map(Process::Server))
        .chain((0..options.num_workers).map(Process::Worker))
        .collect()
}

/// The `kvstore` subcommand that runs `process` (the scheduler or a server): `scheduler`,
/// `server`, or with `--pslite` `pslite-scheduler`, `pslite-server`.
pub fn role_command(options: &LaunchOptions, process: Process) -> &'static str {
    match (options.pslite, process.role()) {
        (false, role) => role.as_str(),
        (true, Role::Scheduler) => "pslite-scheduler",
        (true, _) => "pslite-server",
    }
}

/// The variables `process` gets on top of the launcher's environment (see the
/// [module docs](self)), with the scheduler on `port`; the `--env` pairs come last.
pub fn process_env(options: &LaunchOptions, process: Process, port: u16) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("DMLC_ROLE", process.role().as_str().to_string()),
        ("DMLC_PS_ROOT_URI", options.host.clone()),
        ("DMLC_PS_ROOT_PORT", port.to_string()),
        ("DMLC_NUM_SERVER", options.num_servers.to_string()),
        ("DMLC_NUM_WORKER", options.num_workers.to_string()),
        ("DMLC_NODE_HOST", options.host.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(task) = process.task_id(options.num_workers) {
        env.push(("DMLC_TASK_ID".into(), task.to_string()));
    }
    if let Some(timeout) = options.timeout {
        env.push((
            "KVSTORE_TIMEOUT_SECS".into(),
            timeout.as_secs_f64().to_string(),
        ));
    }
    env.extend(options.env.iter().cloned());
    env
}

/// Parses a `--env` value: `KEY=VALUE`, or MXNet's `KEY:VALUE`; the key ends at the first
/// `=` or `:`, the value may hold either.
///
/// # Errors
/// A message naming the value when it has no separator, the key is empty or not a variable
/// name, or the key is one the launcher sets itself ([`LAUNCHER_VARS`]).
pub fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    let Some(at) = text.find(['=', ':']) else {
        return Err(format!("{text:?} is not KEY=VALUE"));
    };
    let (key, value) = (&text[..at], &text[at + 1..]);
    check_env_key(key)?;
    Ok((key.to_string(), value.to_string()))
}

/// Checks that `key` can be given with `--env`: a variable name (letters, digits and `_`, not
/// starting with a digit) that is not one of [`LAUNCHER_VARS`].
///
/// # Errors
/// A message naming the key and what to use instead.
pub fn check_env_key(key: &str) -> Result<(), String> {
    let name_like = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !name_like {
        return Err(format!(
            "--env {key:?}: the key must be a variable name (letters, digits and _)"
        ));
    }
    if key == "KVSTORE_SECRET" {
        return Err(
            "--env KVSTORE_SECRET: the secret would be on the launcher's command line, which \
             every user of the machine can read (ps); export KVSTORE_SECRET, or point \
             KVSTORE_SECRET_FILE at a file only you can read"
                .to_string(),
        );
    }
    if LAUNCHER_VARS.contains(&key) {
        let instead = match key {
            "DMLC_PS_ROOT_URI" | "DMLC_NODE_HOST" => "use --host",
            "DMLC_PS_ROOT_PORT" => "use --port",
            "DMLC_NUM_SERVER" => "use -s/--num-servers",
            "DMLC_NUM_WORKER" => "use -n/--num-workers",
            "KVSTORE_TIMEOUT_SECS" => "use --timeout",
            "PORT" => "every process of a local job needs a port of its own",
            _ => "it differs from process to process",
        };
        return Err(format!(
            "--env {key}: the launcher sets {key} for every process itself; {instead}"
        ));
    }
    Ok(())
}

/// Parses `--timeout`: seconds, fractions allowed, positive, at most a year (as
/// `KVSTORE_TIMEOUT_SECS`).
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    check_timeout(secs)?;
    Ok(Duration::from_secs_f64(secs))
}

fn check_timeout(secs: f64) -> Result<(), String> {
    if secs.is_finite() && secs > 0.0 && secs <= 365.0 * 86400.0 {
        Ok(())
    } else {
        Err("the timeout must be a positive number of seconds, at most one year".into())
    }
}

/// The launcher's bound on the servers and the scheduler once every worker has exited, the
/// processes' own bound on every wait: `--timeout`, else `kvstore_timeout_secs` (the
/// launcher's `KVSTORE_TIMEOUT_SECS`, which every process inherits), else `file`'s
/// `timeout_secs` (the `kvstore.toml` that `KVSTORE_CONFIG` names, which the processes read
/// too: [`config_file`]), else 600 s.
///
/// # Errors
/// [`kvstore::Error::InvalidArgument`] naming `KVSTORE_TIMEOUT_SECS` or the file when its
/// value is not a valid timeout.
pub fn job_timeout(
    options: &LaunchOptions,
    kvstore_timeout_secs: Option<&str>,
    file: Option<&ConfigFile>,
) -> kvstore::Result<Duration> {
    if let Some(timeout) = options.timeout {
        return Ok(timeout);
    }
    if let Some(text) = kvstore_timeout_secs {
        return parse_timeout(text).map_err(|e| {
            kvstore::Error::InvalidArgument(format!("KVSTORE_TIMEOUT_SECS={text:?}: {e}"))
        });
    }
    match file.and_then(|f| f.dist.timeout_secs.map(|secs| (f, secs))) {
        Some((f, secs)) => check_timeout(secs)
            .map(|()| Duration::from_secs_f64(secs))
            .map_err(|e| {
                kvstore::Error::InvalidArgument(format!(
                    "{}: [dist] timeout_secs = {secs}: {e}",
                    f.path.display()
                ))
            }),
        None => Ok(Duration::from_secs_f64(
            kvstore_dist::config::DEFAULT_TIMEOUT_SECS,
        )),
    }
}

/// A `kvstore.toml` the launched processes read: the path `KVSTORE_CONFIG` names for them and
/// its `[dist]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    /// The path, as `KVSTORE_CONFIG` gives it.
    pub path: PathBuf,
    /// Its `[dist]` table.
    pub dist: DistFile,
}

/// The `kvstore.toml` the job's processes will read: the one `--env KVSTORE_CONFIG=...`
/// names, else the one the launcher's own `KVSTORE_CONFIG` names (`inherited`), if any.
///
/// # Errors
/// [`kvstore::Error::InvalidArgument`] naming the file when it cannot be read or parsed (every
/// process would fail on it), or when it sets `port`: the processes of a launched job share
/// one host, so a fixed port would be bound by the first of them only (each finds a free
/// port of its own without it).
pub fn config_file(
    options: &LaunchOptions,
    inherited: Option<OsString>,
) -> kvstore::Result<Option<ConfigFile>> {
    let given = options
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == kvstore_dist::worker::CONFIG_VAR)
        .map(|(_, v)| OsString::from(v));
    let Some(path) = given.or(inherited).map(PathBuf::from) else {
        return Ok(None);
    };
    let dist = DistFile::from_path(&path).map_err(|e| {
        kvstore::Error::InvalidArgument(format!(
            "{}={}, which every process of the job reads: {e}",
            kvstore_dist::worker::CONFIG_VAR,
            path.display()
        ))
    })?;
    if let Some(port) = dist.port {
        return Err(kvstore::Error::InvalidArgument(format!(
            "{}={} sets [dist] port = {port}: the processes of a launched job share this host \
             and cannot all listen on one port; remove it (each process then listens on a free \
             port; --port sets the scheduler's)",
            kvstore_dist::worker::CONFIG_VAR,
            path.display()
        )));
    }
    Ok(Some(ConfigFile { path, dist }))
}

/// A TCP port that is free on `host` at the time of the call, for the scheduler to bind: taken
/// below the system's ephemeral range ([`kvstore_dist::ports::spare_port`]), so that no other
/// job's node can be given it before the scheduler binds it.
///
/// # Errors
/// [`kvstore::Error::InvalidArgument`] when nothing can listen on `host` (not an address of
/// this machine), suggesting `--port`.
pub fn free_port(host: &str) -> kvstore::Result<u16> {
    kvstore_dist::ports::spare_port(host).map_err(|e| {
        kvstore::Error::InvalidArgument(format!(
            "cannot find a free port on --host {host}: {e} (is it an address of this machine? \
             --port sets the scheduler's port)"
        ))
    })
}

/// Reads `input` to its end and hands `emit` each line, `prefix` first and a newline last
/// (added when the last line has none), so that a writer emitting each call at once never
/// splits a line. A line longer than [`MAX_LINE_BYTES`] is handed over in pieces of that
/// size, each as a line. Bytes are forwarded as they are (no UTF-8 needed). A read error ends
/// the input.
pub fn forward_lines<R: Read>(input: R, prefix: &str, mut emit: impl FnMut(&[u8])) {
    let mut reader = BufReader::new(input);
    let mut line = Vec::with_capacity(prefix.len() + 256);
    loop {
        line.clear();
        line.extend_from_slice(prefix.as_bytes());
        match (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Ok(_) => {
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                emit(&line);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// What a process's exit status says, as `exited with status 3` or `was killed by signal 9
/// (SIGKILL)`, and the status the launcher exits with for it: the process's own, or 128 + the
/// signal's number; 1 when neither is known (or the status does not fit).
pub fn describe_status(status: ExitStatus) -> (String, u8) {
    if let Some(code) = status.code() {
        let own = u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1);
        return (format!("exited with status {code}"), own);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let name = signal_name(signal)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let code = u8::try_from(128 + signal).unwrap_or(1);
            return (format!("was killed by signal {signal}{name}"), code);
        }
    }
    (format!("ended abnormally ({status})"), 1)
}

/// The name of the signals whose number POSIX systems agree on.
#[cfg(unix)]
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// Why a job failed, and the status the launcher exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What happened, naming the process (`worker 1 exited with status 3; killed the
    /// scheduler, server 0 and worker 0`).
    pub message: String,
    /// The launcher's exit status: the failed process's (never 0).
    pub code: u8,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// How a job ended (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum JobEnd {
    /// Every process exited with status 0 (a restarted worker: its last process).
    Succeeded,
    /// A process failed, or outlived the workers by the timeout; every process is gone.
    Failed(Failure),
}

/// Runs the job `options` describes, with `kvstore` (the path of this program) as the
/// scheduler and the servers, until it ends (see the [module docs](self)). With `PS_VERBOSE`
/// of 1 or more, says on standard error where the scheduler listens.
///
/// # Errors
/// Invalid options ([`LaunchOptions::validate`], a bad `KVSTORE_TIMEOUT_SECS`, a host with no
/// free port) as [`kvstore::Error::InvalidArgument`]; a process that cannot be started (a
/// worker command that does not exist) as [`kvstore::Error::Io`] naming the program and the
/// process, once the processes already started are killed. A failing process is not an
/// error: it is [`JobEnd::Failed`].
pub fn launch(options: &LaunchOptions, kvstore: &Path) -> kvstore::Result<JobEnd> {
    options.validate()?;
    let file = config_file(options, std::env::var_os(kvstore_dist::worker::CONFIG_VAR))?;
    let inherited_timeout = std::env::var("KVSTORE_TIMEOUT_SECS").ok();
    let timeout = job_timeout(options, inherited_timeout.as_deref(), file.as_ref())?;
    let port = match options.port {
        Some(port) => port,
        None => free_port(&options.host)?,
    };
    if verbose(options) {
        crate::logging::to_stderr(format_args!(
            "kvstore launch: scheduler on {}:{port}, {} server(s), {} worker(s) running {:?}",
            options.host, options.num_servers, options.num_workers, options.command
        ));
    }
    // ps-lite's protocol has no handshake: a secret would protect nothing.
    let secret = match options.pslite {
        true => None,
        false => job_secret(options, |var| std::env::var_os(var).is_some())?,
    };
    let secret_env: Vec<(String, String)> = secret.iter().map(JobSecret::env).collect();
    // From here on a stopping signal ends the job, its processes killed (not orphaned).
    let _catching = crate::stop_signals::catch().map_err(|e| {
        kvstore::Error::InvalidArgument(format!("kvstore launch: cannot catch signals: {e}"))
    })?;
    let mut job = Job::new();
    for process in processes(options) {
        let (program, args): (&OsStr, Vec<&OsStr>) = match process {
            Process::Worker(_) => (
                &options.command[0],
                options.command[1..]
                    .iter()
                    .map(OsString::as_os_str)
                    .collect(),
            ),
            _ => (
                kvstore.as_os_str(),
                vec![OsStr::new(role_command(options, process))],
            ),
        };
        let env = [process_env(options, process, port), secret_env.clone()].concat();
        job.start(process, program, &args, &env)
            .map_err(|source| kvstore::Error::Io {
                path: PathBuf::from(program),
                source: io::Error::new(source.kind(), format!("cannot start {process}: {source}")),
            })?;
    }
    let restarts = Restarts {
        left: options.restart_workers,
        given: options.restart_workers,
        env: &|process| [process_env(options, process, port), secret_env.clone()].concat(),
        command: &options.command,
    };
    let mut end = job.supervise(timeout, restarts);
    job.finish();
    // Every process has ended: the secret's file goes.
    drop(secret);
    // A stopping signal that came as the job ended still gives its status.
    if let (JobEnd::Succeeded, Some(signal)) = (&end, crate::stop_signals::caught()) {
        end = JobEnd::Failed(Failure {
            message: format!(
                "the launcher got {} as the job ended (every process had exited with status 0)",
                crate::stop_signals::name(signal)
            ),
            code: u8::try_from(128 + signal).unwrap_or(u8::MAX),
        });
    }
    Ok(end)
}

/// The variables that name or hold a job's shared secret.
const SECRET_VARS: [&str; 2] = ["KVSTORE_SECRET", "KVSTORE_SECRET_FILE"];

/// The secret the launcher made for a job: a file only this user can read, in a folder of
/// its own, removed (with the folder) when this is dropped, at the end of the job. The
/// folder also holds a `lock` file this launcher keeps locked while it runs, by which a later
/// launch tells a folder left behind (its launcher killed by a signal) from a live one.
#[derive(Debug)]
pub struct JobSecret {
    folder: PathBuf,
    file: PathBuf,
    /// Held locked for the launcher's life (released when the process ends, however).
    lock: Option<std::fs::File>,
}

impl JobSecret {
    /// Makes a fresh random secret in a new folder under `parent`: the folder mode 0700, the
    /// file `secret` mode 0600, holding 64 hex digits; then removes the folders under `parent`
    /// that launchers of this user left behind: those whose `lock` file no process holds.
    ///
    /// # Errors
    /// [`kvstore::Error::Io`] when the kernel gives no random bytes or the file cannot be
    /// made.
    pub fn create_in(parent: &Path) -> kvstore::Result<JobSecret> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| kvstore::Error::Io { path, source }
        };
        let text = kvstore_dist::transport::Secret::generate_text()
            .map_err(io(Path::new("/dev/urandom")))?;
        let name = kvstore_dist::transport::Secret::generate_text()
            .map_err(io(Path::new("/dev/urandom")))?;
        let folder = parent.join(format!(
            "{SECRET_FOLDER_PREFIX}{}-{}",
            std::process::id(),
            &name[..12]
        ));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&folder).map_err(io(&folder))?;
        let mut secret = JobSecret {
            file: folder.join("secret"),
            folder,
            lock: None,
        };
        let lock_path = secret.folder.join("lock");
        let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        secret.lock = Some(lock);
        let mut open = std::fs::OpenOptions::new();
        open.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
        open.open(&secret.file)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(io(&secret.file))?;
        remove_abandoned_secrets(parent, &secret.folder);
        Ok(secret)
    }

    /// The file holding the secret.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The variable that gives the secret to a process: `KVSTORE_SECRET_FILE`.
    pub fn env(&self) -> (String, String) {
        (
            SECRET_VARS[1].to_string(),
            self.file.to_string_lossy().into_owned(),
        )
    }
}

impl Drop for JobSecret {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(self.folder.join("lock"));
        drop(self.lock.take());
        let _ = std::fs::remove_dir(&self.folder);
    }
}

/// How the folders of launchers' secrets begin.
const SECRET_FOLDER_PREFIX: &str = "kvstore-launch-";

/// Removes the secret folders under `parent` that launchers killed by a signal (Ctrl-C
/// included) left behind: folders named like `ours`, owned by the same user, whose `lock`
/// file no process holds (a launcher holds its own while it runs, on this host or any other
/// sharing the folder, whatever its PID namespace). Best effort: what cannot be removed, or
/// has no lock file, stays.
fn remove_abandoned_secrets(parent: &Path, ours: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    #[cfg(unix)]
    let me = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(ours).map(|m| m.uid()).ok()
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let named = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(SECRET_FOLDER_PREFIX));
        // `DirEntry::metadata` does not follow a symbolic link: a link is never a folder here.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        #[cfg(unix)]
        let same_user = {
            use std::os::unix::fs::MetadataExt;
            Some(meta.uid()) == me
        };
        #[cfg(not(unix))]
        let same_user = true;
        if !named || path == ours || !meta.is_dir() || !same_user {
            continue;
        }
        let Ok(lock) = std::fs::File::open(path.join("lock")) else {
            continue;
        };
        if lock.try_lock().is_ok() {
            let _ = std::fs::remove_file(path.join("secret"));
            let _ = std::fs::remove_file(path.join("lock"));
            drop(lock);
            let _ = std::fs::remove_dir(&path);
        }
    }
}

/// The shared secret the launcher makes for a job: none when the job already has one
/// (`KVSTORE_SECRET` or `KVSTORE_SECRET_FILE` in `--env`, or set where `is_set` says, the
/// launcher's environment), else a fresh random one in a file under the temporary folder
/// ([`JobSecret`]), given to every process as `KVSTORE_SECRET_FILE`, so that only the
/// processes of this job can talk to each other. A file rather than the secret in a variable:
/// tools that record a training program's environment do not record the secret.
///
/// # Errors
/// As [`JobSecret::create_in`].
pub fn job_secret(
    options: &LaunchOptions,
    is_set: impl Fn(&str) -> bool,
) -> kvstore::Result<Option<JobSecret>> {
    let chosen = SECRET_VARS
        .iter()
        .any(|var| is_set(var) || options.env.iter().any(|(k, _)| k == var));
    if chosen {
        return Ok(None);
    }
    JobSecret::create_in(&std::env::temp_dir()).map(Some)
}

/// `PS_VERBOSE` of the processes (`--env`, else inherited) is 1 or more.
fn verbose(options: &LaunchOptions) -> bool {
    let given = options.env.iter().rev().find(|(k, _)| k == "PS_VERBOSE");
    let value = match given {
        Some((_, v)) => Some(v.clone()),
        None => std::env::var("PS_VERBOSE").ok(),
    };
    value.and_then(|v| v.trim().parse::<u8>().ok()).unwrap_or(0) > 0
}

/// What restarting a failed worker takes: how many restarts are left (of how many given), its
/// variables and the workers' command.
struct Restarts<'a> {
    left: u32,
    given: u32,
    env: &'a dyn Fn(Process) -> Vec<(String, String)>,
    command: &'a [OsString],
}

impl Restarts<'_> {
    /// No restart: a failed worker ends the job.
    #[cfg(test)]
    fn none() -> Restarts<'static> {
        Restarts {
            left: 0,
            given: 0,
            env: &|_| Vec::new(),
            command: &[],
        }
    }
}

/// A started process and how it exited, once it has.
struct Running {
    process: Process,
    child: Child,
    status: Option<ExitStatus>,
}

/// The processes of a job and the threads forwarding their output.
struct Job {
    running: Vec<Running>,
    /// Cloned into every output thread; dropped by [`Job::finish`], whose receiver then sees
    /// the channel close once every output thread has ended.
    output_open: Option<mpsc::Sender<()>>,
    output_closed: mpsc::Receiver<()>,
}

/// Which of the launcher's streams a pipe is forwarded to.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl Job {
    fn new() -> Job {
        let (output_open, output_closed) = mpsc::channel();
        Job {
            running: Vec::new(),
            output_open: Some(output_open),
            output_closed,
        }
    }

    /// Starts `process` and a thread per output pipe forwarding it.
    fn start(
        &mut self,
        process: Process,
        program: &OsStr,
        args: &[&OsStr],
        env: &[(String, String)],
    ) -> io::Result<()> {
        let mut command = Command::new(program);
        command
            .args(args)
            .env_remove("PORT")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::stop_signals::die_with_launcher(&mut command);
        crate::stop_signals::own_process_group(&mut command);
        let mut child = command.spawn()?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        self.running.push(Running {
            process,
            child,
            status: None,
        });
        if let Some(pipe) = stdout {
            self.forward(pipe, process, Stream::Stdout)?;
        }
        if let Some(pipe) = stderr {
            self.forward(pipe, process, Stream::Stderr)?;
        }
        Ok(())
    }

    /// Forwards `pipe` line by line to `stream` in a thread of its own.
    fn forward(
        &self,
        pipe: impl Read + Send + 'static,
        process: Process,
        stream: Stream,
    ) -> io::Result<()> {
        let open = self.output_open.clone();
        let prefix = process.prefix();
        thread::Builder::new()
            .name(format!("kvstore launch: output of {process}"))
            .spawn(move || {
                let _open = open;
                forward_lines(pipe, &prefix, |line| {
                    // A launcher whose own output is gone (`| head`) still drains the pipe,
                    // so that the process never blocks on a full one.
                    let _ = match stream {
                        Stream::Stdout => write_line(&mut io::stdout().lock(), line),
                        Stream::Stderr => write_line(&mut io::stderr().lock(), line),
                    };
                });
            })?;
        Ok(())
    }

    /// Waits until the job ends: returns the first failure, the servers and scheduler that
    /// outlived the last worker by `timeout`, or success; a failed worker is restarted while
    /// `restarts` are left. Kills what is left on failure.
    fn supervise(&mut self, timeout: Duration, mut restarts: Restarts<'_>) -> JobEnd {
        let mut workers_done: Option<Instant> = None;
        loop {
            if let Some(signal) = crate::stop_signals::caught() {
                // Passed on first, so that the processes can end as they would on a terminal's
                // Ctrl-C; what still runs after a grace period is killed.
                let name = crate::stop_signals::name(signal);
                let signalled = self.pass_on(signal);
                let killed = self.kill_running();
                let mut message = format!("the launcher got {name}");
                if !signalled.is_empty() {
                    message += &format!("; passed it on to {}", and_list(&signalled));
                }
                if !killed.is_empty() {
                    message += &format!("; killed {}", and_list(&killed));
                }
                return JobEnd::Failed(Failure {
                    message,
                    code: u8::try_from(128 + signal).unwrap_or(u8::MAX),
                });
            }
            if let Some((failed, exited)) = self.reap() {
                let gone = self.ended_services();
                let failed = match exited {
                    Some(Process::Worker(_)) if restarts.left > 0 && !gone.is_empty() => Failure {
                        message: format!(
                            "{}; not restarted: {} {} no longer running",
                            failed.message,
                            and_list(&gone),
                            if gone.len() == 1 { "is" } else { "are" }
                        ),
                        code: failed.code,
                    },
                    // A stopping signal that came meanwhile ends the job (at the loop's top)
                    // rather than restart a worker it may have killed (Ctrl-C).
                    Some(Process::Worker(_))
                        if restarts.left > 0 && crate::stop_signals::caught().is_some() =>
                    {
                        continue
                    }
                    Some(process @ Process::Worker(_)) if restarts.left > 0 => {
                        match self.restart(process, &failed, &mut restarts) {
                            Ok(()) => continue,
                            Err(e) => Failure {
                                message: format!("{}; it cannot be restarted: {e}", failed.message),
                                code: failed.code,
                            },
                        }
                    }
                    Some(Process::Worker(_)) if restarts.given > 0 => Failure {
                        message: format!(
                            "{} (no restart left of --restart-workers {})",
                            failed.message, restarts.given
                        ),
                        code: failed.code,
                    },
                    _ => failed,
                };
                let killed = self.kill_running();
                let mut failure = failed;
                if !killed.is_empty() {
                    failure.message += &format!("; killed {}", and_list(&killed));
                }
                return JobEnd::Failed(failure);
            }
            let left: Vec<Process> = self
                .running
                .iter()
                .filter(|r| r.status.is_none())
                .map(|r| r.process)
                .collect();
            if left.is_empty() {
                return JobEnd::Succeeded;
            }
            if !left.iter().any(|p| matches!(p, Process::Worker(_))) {
                let since = *workers_done.get_or_insert_with(Instant::now);
                // The processes' own timeout, and time for them to fail by it, naming what
                // they waited for, before the launcher kills them.
                if since.elapsed() >= timeout + SERVICE_GRACE {
                    let killed = self.kill_running();
                    let names = and_list(&killed);
                    return JobEnd::Failed(Failure {
                        message: format!(
                            "every worker exited with status 0, but {names} {} still running \
                             {} s later (the timeout: --timeout, else KVSTORE_TIMEOUT_SECS, \
                             else the timeout_secs of KVSTORE_CONFIG's file, else 600 s; plus \
                             {} s); killed {}",
                            if killed.len() == 1 { "was" } else { "were" },
                            (timeout + SERVICE_GRACE).as_secs_f64(),
                            SERVICE_GRACE.as_secs(),
                            if killed.len() == 1 { "it" } else { "them" },
                        ),
                        code: 1,
                    });
                }
            }
            thread::sleep(POLL);
        }
    }

    /// The scheduler and servers that have exited (a restarted worker could not rejoin
    /// without them), in start order.
    fn ended_services(&mut self) -> Vec<Process> {
        self.running
            .iter_mut()
            .filter(|r| !matches!(r.process, Process::Worker(_)))
            .filter_map(|r| {
                if r.status.is_none() {
                    r.status = r.child.try_wait().ok().flatten();
                }
                r.status.map(|_| r.process)
            })
            .collect()
    }

    /// Starts `process`, a worker that failed (`failed`), again, counting the restart.
    fn restart(
        &mut self,
        process: Process,
        failed: &Failure,
        restarts: &mut Restarts<'_>,
    ) -> io::Result<()> {
        restarts.left -= 1;
        let _ = write_line(
            &mut io::stderr().lock(),
            format!(
                "kvstore launch: {}; restarting it ({} of {})\n",
                failed.message,
                restarts.given - restarts.left,
                restarts.given
            )
            .as_bytes(),
        );
        let args: Vec<&OsStr> = restarts.command[1..]
            .iter()
            .map(OsString::as_os_str)
            .collect();
        let env = (restarts.env)(process);
        self.start(process, &restarts.command[0], &args, &env)
    }

    /// Records the processes that exited since the last look; the first one that failed, in
    /// start order, as a failure, with the process when it has exited (not when it could not
    /// be waited for).
    fn reap(&mut self) -> Option<(Failure, Option<Process>)> {
        for r in self.running.iter_mut().filter(|r| r.status.is_none()) {
            // What a failed process started goes with it (its group, killed while the id
            // still names it).
            crate::stop_signals::kill_group_if_failed(&r.child);
            match r.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    r.status = Some(status);
                    if !status.success() {
                        let (what, code) = describe_status(status);
                        let message = format!("{} {what}", r.process);
                        return Some((Failure { message, code }, Some(r.process)));
                    }
                }
                Err(e) => {
                    let message = format!("cannot wait for {}: {e}", r.process);
                    return Some((Failure { message, code: 1 }, None));
                }
            }
        }
        None
    }

    /// Sends `signal` to the process groups of the processes still running and waits, at
    /// most [`KILL_GRACE`], for them to exit; returns those it signalled, in start order.
    fn pass_on(&mut self, signal: i32) -> Vec<Process> {
        self.stop_running(|child| {
            #[cfg(unix)]
            crate::stop_signals::signal_group(child, signal);
            #[cfg(not(unix))]
            let _ = (child, signal);
        })
    }

    /// Kills every process still running and waits (a bounded time) for each to be gone;
    /// returns those it killed, in start order.
    fn kill_running(&mut self) -> Vec<Process> {
        self.stop_running(|child| {
            // Its process group first: what it started and did not `exec` (its id is still
            // the group's, not reaped yet). An error means it has exited already; it is
            // reaped below either way.
            crate::stop_signals::kill_group(child);
            let _ = child.kill();
        })
    }

    /// Applies `stop` to every process still running, then waits, at most [`KILL_GRACE`],
    /// for them to exit (recording their statuses); returns those it stopped, in start order.
    fn stop_running(&mut self, stop: impl Fn(&mut Child)) -> Vec<Process> {
        let mut stopped = Vec::new();
        for r in self.running.iter_mut().filter(|r| r.status.is_none()) {
            stop(&mut r.child);
            stopped.push(r.process);
        }
        let deadline = Instant::now() + KILL_GRACE;
        while Instant::now() < deadline {
            let mut left = false;
            for r in self.running.iter_mut().filter(|r| r.status.is_none()) {
                match r.child.try_wait() {
                    Ok(Some(status)) => r.status = Some(status),
                    Ok(None) => left = true,
                    // Cannot be waited for: nothing to wait for.
                    Err(_) => {}
                }
            }
            if !left {
                break;
            }
            thread::sleep(POLL);
        }
        stopped
    }

    /// Waits (a bounded time) for the output threads to forward what is left.
    fn finish(&mut self) {
        self.output_open = None;
        let deadline = Instant::now() + OUTPUT_GRACE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output_closed.recv_timeout(left) {
                Ok(()) => continue,
                Err(_) => return,
            }
        }
    }
}

impl Drop for Job {
    /// No process outlives the launcher, whatever the path out (an error starting one).
    fn drop(&mut self) {
        self.kill_running();
    }
}

/// Writes one whole line and flushes it.
fn write_line(out: &mut impl Write, line: &[u8]) -> io::Result<()> {
    out.write_all(line)?;
    out.flush()
}

/// `a`, `a and b`, `a, b and c`; `the scheduler` for the scheduler.
fn and_list(processes: &[Process]) -> String {
    let names: Vec<String> = processes
        .iter()
        .map(|p| match p {
            Process::Scheduler => "the scheduler".to_string(),
            p => p.to_string(),
        })
        .collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<LaunchOptions, clap::Error> {
        let cli = crate::Cli::try_parse_from(["kvstore", "launch"].iter().chain(args))?;
        match cli.command {
            crate::Command::Launch(options) => Ok(options),
            other => panic!("not launch: {other:?}"),
        }
    }

    #[test]
    fn the_command_line_parses_with_defaults() {
        let o = parse(&[
            "-n", "2", "-s", "1", "--", "python", "train.py", "--lr", "0.1",
        ])
        .unwrap();
        assert_eq!(
            o,
            LaunchOptions::new(2, 1, ["python", "train.py", "--lr", "0.1"])
        );
        assert_eq!(o.host, "127.0.0.1");
        o.validate().unwrap();
    }

    #[test]
    fn every_option_parses() {
        let o = parse(&[
            "--num-workers",
            "3",
            "--num-servers",
            "2",
            "--host",
            "10.0.0.5",
            "--port",
            "9091",
            "--timeout",
            "2.5",
            "--env",
            "OMP_NUM_THREADS=4",
            "--env",
            "PS_VERBOSE:1",
            "--",
            "sh",
            "-c",
            "echo $DMLC_ROLE",
        ])
        .unwrap();
        assert_eq!((o.num_workers, o.num_servers), (3, 2));
        assert_eq!((o.host.as_str(), o.port), ("10.0.0.5", Some(9091)));
        assert_eq!(o.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(
            o.env,
            [
                ("OMP_NUM_THREADS".to_string(), "4".to_string()),
                ("PS_VERBOSE".to_string(), "1".to_string())
            ]
        );
        assert_eq!(o.command, ["sh", "-c", "echo $DMLC_ROLE"]);
    }

    #[test]
    fn bad_counts_a_missing_command_and_bad_values_are_refused() {
        for (args, needle) in [
            (&["-n", "0", "-s", "1", "--", "true"][..], "WORKERS"),
            (&["-n", "1", "-s", "-1", "--", "true"][..], "-1"),
            (&["-n", "1", "-s", "1"][..], "COMMAND"),
            (&["-s", "1", "--", "true"][..], "WORKERS"),
            (
                &["-n", "1", "-s", "1", "--port", "0", "--", "true"][..],
                "PORT",
            ),
            (
                &["-n", "1", "-s", "1", "--timeout", "0", "--", "true"][..],
                "positive",
            ),
            (
                &["-n", "1", "-s", "1", "--timeout", "soon", "--", "true"][..],
                "soon",
            ),
            (
                &["-n", "1", "-s", "1", "--env", "NOVALUE", "--", "true"][..],
                "KEY=VALUE",
            ),
            (
                &[
                    "-n",
                    "1",
                    "-s",
                    "1",
                    "--env",
                    "DMLC_ROLE=server",
                    "--",
                    "true",
                ][..],
                "DMLC_ROLE",
            ),
            (
                &[
                    "-n",
                    "1",
                    "-s",
                    "1",
                    "--env",
                    "DMLC_NUM_WORKER=3",
                    "--",
                    "true",
                ][..],
                "--num-workers",
            ),
            (
                &["-n", "1", "-s", "1", "--env", "=x", "--", "true"][..],
                "variable name",
            ),
        ] {
            let e = parse(args).expect_err(&format!("{args:?} parsed"));
            assert!(e.to_string().contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn options_built_in_code_are_validated() {
        let ok = LaunchOptions::new(1, 1, ["true"]);
        ok.validate().unwrap();
        LaunchOptions::new(1, 0, ["true"]).validate().unwrap();
        LaunchOptions::new(MAX_PROCESSES - 2, 2, ["true"])
            .validate()
            .unwrap();
        let cases: [(LaunchOptions, &str); 7] = [
            (LaunchOptions::new(0, 1, ["true"]), "--num-workers"),
            (LaunchOptions::new(u32::MAX, 2, ["true"]), "at most 4096"),
            (
                LaunchOptions::new(MAX_PROCESSES, 1, ["true"]),
                "--num-servers 1",
            ),
            (LaunchOptions::new(1, 1, Vec::<OsString>::new()), "command"),
            (LaunchOptions::new(1, 1, [""]), "command"),
            (
                LaunchOptions {
                    host: " ".into(),
                    ..ok.clone()
                },
                "--host",
            ),
            (
                LaunchOptions {
                    env: vec![("PORT".into(), "9000".into())],
                    ..ok.clone()
                },
                "PORT",
            ),
        ];
        for (options, needle) in cases {
            let e = options.validate().unwrap_err();
            assert!(matches!(e, kvstore::Error::InvalidArgument(_)), "{e:?}");
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn a_job_gets_a_fresh_secret_file_unless_it_has_a_secret() {
        let mut o = LaunchOptions::new(1, 1, ["true"]);
        let first = job_secret(&o, |_| false).unwrap().unwrap();
        let second = job_secret(&o, |_| false).unwrap().unwrap();
        let (var, path) = first.env();
        assert_eq!(var, "KVSTORE_SECRET_FILE");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 64);
        assert!(text.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(text, std::fs::read_to_string(second.file()).unwrap());
        kvstore_dist::transport::Secret::from_file(Path::new(&path)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(Path::new(&path)), 0o600);
            assert_eq!(mode(Path::new(&path).parent().unwrap()), 0o700);
        }
        let folder = Path::new(&path).parent().unwrap().to_path_buf();
        drop(first);
        assert!(!folder.exists(), "the secret outlived its job");
        for var in SECRET_VARS {
            assert!(job_secret(&o, |v| v == var).unwrap().is_none(), "{var}");
        }
        o.env = vec![("KVSTORE_SECRET_FILE".into(), "/run/secrets/job".into())];
        assert!(job_secret(&o, |_| false).unwrap().is_none());
    }

    #[test]
    fn a_new_secret_clears_the_folders_of_launchers_that_were_killed() {
        let parent =
            std::env::temp_dir().join(format!("kvstore-launch-test-{}", std::process::id()));
        std::fs::create_dir_all(&parent).unwrap();
        let folder = |name: &str| {
            let f = parent.join(name);
            std::fs::create_dir_all(&f).unwrap();
            std::fs::write(f.join("secret"), "left behind").unwrap();
            f
        };
        // A launcher that was killed: its lock file is there, nobody holds it.
        let dead = folder("kvstore-launch-999999999-0badc0de0bad");
        std::fs::write(dead.join("lock"), "").unwrap();
        // A running launcher (here, this test holds its lock).
        let alive = folder("kvstore-launch-1-0badc0de0bad");
        let held = std::fs::File::create(alive.join("lock")).unwrap();
        held.lock().unwrap();
        // Something without a lock file is not ours to judge.
        let foreign = folder("kvstore-launch-2-0badc0de0bad");
        let secret = JobSecret::create_in(&parent).unwrap();
        assert!(!dead.exists(), "a killed launcher's secret was left");
        assert!(
            alive.join("secret").exists(),
            "a running launcher's secret was removed"
        );
        assert!(
            foreign.join("secret").exists(),
            "a folder without a lock was removed"
        );
        // This launch's own folder holds its lock while it lives.
        let own = secret.file().parent().unwrap().to_path_buf();
        let probe = std::fs::File::open(own.join("lock")).unwrap();
        assert!(
            probe.try_lock().is_err(),
            "the launcher does not hold its lock"
        );
        drop(probe);
        drop(secret);
        assert!(!own.exists());
        drop(held);
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn every_process_gets_the_variables_of_its_role() {
        let mut o = LaunchOptions::new(2, 2, ["true"]);
        o.host = "127.0.0.2".into();
        o.timeout = Some(Duration::from_millis(1500));
        o.env = vec![("OMP_NUM_THREADS".into(), "3".into())];
        assert_eq!(
            processes(&o),
            [
                Process::Scheduler,
                Process::Server(0),
                Process::Server(1),
                Process::Worker(0),
                Process::Worker(1)
            ]
        );
        fn var_of(o: &LaunchOptions, process: Process, key: &str) -> Option<String> {
            process_env(o, process, 9099)
                .into_iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
        }
        let get = |process, key: &str| var_of(&o, process, key);
        for (process, role) in [
            (Process::Scheduler, "scheduler"),
            (Process::Server(1), "server"),
            (Process::Worker(0), "worker"),
        ] {
            assert_eq!(get(process, "DMLC_ROLE").as_deref(), Some(role));
            assert_eq!(
                get(process, "DMLC_PS_ROOT_URI").as_deref(),
                Some("127.0.0.2")
            );
            assert_eq!(get(process, "DMLC_PS_ROOT_PORT").as_deref(), Some("9099"));
            assert_eq!(get(process, "DMLC_NUM_SERVER").as_deref(), Some("2"));
            assert_eq!(get(process, "DMLC_NUM_WORKER").as_deref(), Some("2"));
            assert_eq!(get(process, "DMLC_NODE_HOST").as_deref(), Some("127.0.0.2"));
            assert_eq!(get(process, "KVSTORE_TIMEOUT_SECS").as_deref(), Some("1.5"));
            assert_eq!(get(process, "OMP_NUM_THREADS").as_deref(), Some("3"));
        }
        assert_eq!(get(Process::Scheduler, "DMLC_TASK_ID"), None);
        assert_eq!(
            get(Process::Worker(1), "DMLC_TASK_ID").as_deref(),
            Some("1")
        );
        assert_eq!(
            get(Process::Server(1), "DMLC_TASK_ID").as_deref(),
            Some("3")
        );
        let o = LaunchOptions {
            timeout: None,
            ..o.clone()
        };
        assert_eq!(var_of(&o, Process::Worker(0), "KVSTORE_TIMEOUT_SECS"), None);
    }

    #[test]
    fn each_process_variable_is_a_launcher_variable() {
        let o = LaunchOptions::new(1, 1, ["true"]);
        for (key, _) in process_env(
            &LaunchOptions {
                timeout: Some(Duration::from_secs(1)),
                ..o
            },
            Process::Server(0),
            1,
        ) {
            assert!(LAUNCHER_VARS.contains(&key.as_str()), "{key}");
        }
    }

    #[test]
    fn the_timeout_is_the_option_else_the_environment_else_the_file_else_600_s() {
        let mut o = LaunchOptions::new(1, 1, ["true"]);
        assert_eq!(
            job_timeout(&o, None, None).unwrap(),
            Duration::from_secs(600)
        );
        let file = |secs: f64| ConfigFile {
            path: "k.toml".into(),
            dist: DistFile {
                timeout_secs: Some(secs),
                ..DistFile::default()
            },
        };
        assert_eq!(
            job_timeout(&o, None, Some(&file(3.0))).unwrap(),
            Duration::from_secs(3)
        );
        let e = job_timeout(&o, None, Some(&file(-3.0))).unwrap_err();
        assert!(
            e.to_string().contains("k.toml: [dist] timeout_secs = -3"),
            "{e}"
        );
        assert_eq!(
            job_timeout(&o, Some("0.5"), Some(&file(3.0))).unwrap(),
            Duration::from_millis(500)
        );
        let e = job_timeout(&o, Some("-1"), None).unwrap_err();
        assert!(e.to_string().contains("KVSTORE_TIMEOUT_SECS"), "{e}");
        o.timeout = Some(Duration::from_secs(7));
        assert_eq!(
            job_timeout(&o, Some("0.5"), Some(&file(3.0))).unwrap(),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn a_config_file_with_a_port_is_refused_and_env_names_the_file_first() {
        let dir =
            std::env::temp_dir().join(format!("kvstore-launch-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let with_port = dir.join("port.toml");
        std::fs::write(&with_port, "[dist]\nport = 9100\n").unwrap();
        let plain = dir.join("plain.toml");
        std::fs::write(&plain, "[dist]\ntimeout_secs = 5\n").unwrap();
        let mut o = LaunchOptions::new(1, 2, ["true"]);
        assert_eq!(config_file(&o, None).unwrap(), None);
        let e = config_file(&o, Some(with_port.clone().into())).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("port.toml") && e.contains("port = 9100"), "{e}");
        // `--env KVSTORE_CONFIG=...` is what the processes see: it wins over the launcher's.
        o.env
            .push(("KVSTORE_CONFIG".into(), plain.display().to_string()));
        let got = config_file(&o, Some(with_port.into())).unwrap().unwrap();
        assert_eq!(got.dist.timeout_secs, Some(5.0));
        config_file(&o, None).unwrap();
        let e = config_file(
            &LaunchOptions::new(1, 1, ["true"]),
            Some(dir.join("none.toml").into()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("none.toml") && e.contains("KVSTORE_CONFIG"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_free_port_is_found_on_loopback_and_a_foreign_host_is_refused() {
        assert_ne!(free_port("127.0.0.1").unwrap(), 0);
        let e = free_port("192.0.2.1").unwrap_err();
        assert!(e.to_string().contains("--port"), "{e}");
    }

    #[test]
    fn lines_are_prefixed_whole_and_a_last_line_gets_its_newline() {
        let mut lines = Vec::new();
        forward_lines(&b"one\n\ntwo \xff\nlast"[..], "[worker 1] ", |l| {
            lines.push(l.to_vec())
        });
        assert_eq!(
            lines,
            [
                b"[worker 1] one\n".to_vec(),
                b"[worker 1] \n".to_vec(),
                b"[worker 1] two \xff\n".to_vec(),
                b"[worker 1] last\n".to_vec(),
            ]
        );
        let mut count = 0;
        forward_lines(&b""[..], "[x] ", |_| count += 1);
        assert_eq!(count, 0);
    }

    #[test]
    fn a_huge_line_is_cut_into_pieces() {
        let text = vec![b'a'; MAX_LINE_BYTES as usize + 10];
        let mut lines = Vec::new();
        forward_lines(&text[..], "[s] ", |l| lines.push(l.len()));
        assert_eq!(lines, [4 + MAX_LINE_BYTES as usize + 1, 4 + 10 + 1]);
    }

    #[cfg(unix)]
    #[test]
    fn statuses_are_described_with_the_launchers_code() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_status(ExitStatus::from_raw(3 << 8)),
            ("exited with status 3".to_string(), 3)
        );
        assert_eq!(
            describe_status(ExitStatus::from_raw(9)),
            ("was killed by signal 9 (SIGKILL)".to_string(), 137)
        );
        assert_eq!(describe_status(ExitStatus::from_raw(15)).1, 143, "SIGTERM");
    }

    #[test]
    fn processes_are_named_and_listed() {
        assert_eq!(Process::Scheduler.prefix(), "[scheduler] ");
        assert_eq!(Process::Server(0).prefix(), "[server 0] ");
        assert_eq!(Process::Worker(12).to_string(), "worker 12");
        assert_eq!(and_list(&[Process::Worker(0)]), "worker 0");
        assert_eq!(
            and_list(&[Process::Scheduler, Process::Server(0), Process::Worker(1)]),
            "the scheduler, server 0 and worker 1"
        );
    }

    /// A job of the given processes, each running `sh -c SCRIPT`.
    #[cfg(unix)]
    fn job(processes: &[(Process, &str)]) -> Job {
        let mut job = Job::new();
        for (process, script) in processes {
            let args = [OsStr::new("-c"), OsStr::new(script)];
            job.start(*process, OsStr::new("sh"), &args, &[]).unwrap();
        }
        job
    }

    #[cfg(unix)]
    #[test]
    fn a_job_whose_processes_all_exit_0_succeeds() {
        let mut job = job(&[
            (Process::Scheduler, "sleep 0.2"),
            (Process::Server(0), "true"),
            (Process::Worker(0), "echo done"),
        ]);
        assert_eq!(
            job.supervise(Duration::from_secs(10), Restarts::none()),
            JobEnd::Succeeded
        );
        job.finish();
        assert!(job.running.iter().all(|r| r.status.is_some()));
    }

    #[cfg(unix)]
    #[test]
    fn what_outlives_the_workers_by_the_timeout_is_killed_and_named() {
        let started = Instant::now();
        let mut job = job(&[
            (Process::Scheduler, "exec sleep 30"),
            (Process::Server(0), "exec sleep 30"),
            (Process::Worker(0), "true"),
        ]);
        let JobEnd::Failed(failure) = job.supervise(Duration::from_millis(300), Restarts::none())
        else {
            panic!("the job succeeded");
        };
        assert_eq!(failure.code, 1);
        assert!(
            failure.message.starts_with(
                "every worker exited with status 0, but the scheduler and server 0 were still \
                 running 5.3 s later"
            ) && failure.message.ends_with("killed them"),
            "{failure}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(job.running.iter().all(|r| r.status.is_some()), "all reaped");
    }

    #[cfg(unix)]
    #[test]
    fn a_server_failing_while_the_workers_run_stops_them() {
        let started = Instant::now();
        let mut job = job(&[
            (Process::Scheduler, "exec sleep 30"),
            (Process::Server(0), "sleep 0.1; exit 4"),
            (Process::Worker(0), "exec sleep 30"),
            (Process::Worker(1), "exec sleep 30"),
        ]);
        assert_eq!(
            job.supervise(Duration::from_secs(30), Restarts::none()),
            JobEnd::Failed(Failure {
                message: "server 0 exited with status 4; killed the scheduler, worker 0 and \
                          worker 1"
                    .into(),
                code: 4
            })
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(job.running.iter().all(|r| r.status.is_some()), "all reaped");
    }

    #[cfg(unix)]
    #[test]
    fn dropping_a_job_kills_its_processes() {
        let job = job(&[(Process::Worker(0), "exec sleep 30")]);
        let child = job.running[0].child.id();
        drop(job);
        // The process was reaped: its id no longer names a child of ours.
        let alive = std::path::Path::new(&format!("/proc/{child}/stat")).exists();
        if cfg!(target_os = "linux") {
            assert!(!alive, "process {child} outlived its job");
        }
    }
}
