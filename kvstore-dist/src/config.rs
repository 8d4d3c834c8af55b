//! The cluster configuration: MXNet's / ps-lite's environment variables and `kvstore.toml`.
//!
//! A dist store learns its role and the cluster from the variables MXNet's launcher
//! (`tools/launch.py`) and Kubeflow-style MXJob setups export, so those keep working unchanged:
//!
//! | variable | `[dist]` key | default | meaning |
//! |---|---|---|---|
//! | `DMLC_ROLE` | `role` | `worker` | `worker`, `server` or `scheduler` |
//! | `DMLC_PS_ROOT_URI` | `root_uri` | required | the scheduler's host |
//! | `DMLC_PS_ROOT_PORT` | `root_port` | required | the scheduler's port |
//! | `DMLC_NUM_SERVER` | `num_server` | required | number of servers (≥ 1; a scheduler also takes 0, see [`DistConfig::scheduler_from_vars_and_file`]) |
//! | `DMLC_NUM_WORKER` | `num_worker` | required | number of workers (≥ 1) |
//! | `DMLC_NODE_HOST` | `node_host` | unset | address this node advertises, and listens on unless `KVSTORE_BIND_HOST` is set |
//! | `KVSTORE_BIND_HOST` | `bind_host` | unset | address this node listens on when it differs from the one it advertises (e.g. `0.0.0.0` in a container whose advertised address, `DMLC_NODE_HOST`, is the host's, with `PORT` published); unset: the advertised one (the scheduler: `DMLC_NODE_HOST`, else every interface; nodes always reach the scheduler at `DMLC_PS_ROOT_URI`) |
//! | `DMLC_INTERFACE` | `interface` | unset | network interface to take the address from |
//! | `PORT` | `port` | unset (any free port) | fixed port for this node |
//! | `PS_VERBOSE` | `verbose` | 0 | 0, 1 (connections, barriers) or 2 (every message): the level of what `kvstore scheduler`/`kvstore server` log (`info`, `debug`); the libraries log those records at those levels whatever it says, and a worker program's own logger decides what it shows |
//! | `PS_HEARTBEAT_INTERVAL` | `heartbeat_interval` | 0: a tenth of `KVSTORE_TIMEOUT_SECS`, within 0.1–5 s (and at most a third of `PS_HEARTBEAT_TIMEOUT` when that is set) | whole seconds between a node's heartbeats (at most a year) |
//! | `PS_HEARTBEAT_TIMEOUT` | `heartbeat_timeout` | 0: three intervals | whole seconds of silence before the scheduler takes a node for lost (at least the interval, at most a year); each node announces its own at registration, and the scheduler waits the longer of the node's and its own |
//! | `MXNET_KVSTORE_BIGARRAY_BOUND` | `bigarray_bound` | 1000000 | element count from which an array is split over all servers |
//! | `KVSTORE_TIMEOUT_SECS` | `timeout_secs` | 600 | bound on every wait (connect, reply, barrier; ten times it for rank 0's `load_optimizer_states`); fractions allowed |
//! | `KVSTORE_STALL_WARNING_SECS` | `stall_warning_secs` | 60 | a sync round, an init, a barrier or the registration that has waited this long is logged as a warning (level `warn`) by the server or the scheduler, naming the nodes it waits for, and a request unanswered that long by the node that sent it, naming the peer (once per wait; it still fails only at `KVSTORE_TIMEOUT_SECS`); 0: never |
//! | `KVSTORE_MAX_MESSAGE_BYTES` | `max_message_bytes` | 4 GiB | largest message accepted from a peer (at least 1024); set it alike on every node: a node never sends a bigger one (the call is refused before anything of it is sent, naming the key, or the optimizer states), and batches of small keys are cut to fit; `horovod` and `byteps` need at least 16 MiB (and `byteps` a partition plus 4 KiB), and refuse less before joining |
//! | `KVSTORE_SHM` | `shm` | 1 | 1: a worker moves big parts through shared memory with the servers of its host; 0: TCP only |
//! | `KVSTORE_SHM_BYTES` | `shm_bytes` | 256 MiB | size of the (sparse) region per worker-server connection, at least 1 MiB |
//! | `KVSTORE_SHM_DIR` | `shm_dir` | `/dev/shm` | directory of the region files (unlinked once both ends mapped them) |
//! | `KVSTORE_SECRET_FILE` | `secret_file` | unset | a file holding the job's shared secret (at least 16 bytes, at most 64 KiB; trailing line endings, spaces and tabs are ignored, in `KVSTORE_SECRET` too; a relative path is taken from the working directory): every connection then opens with a handshake in which both ends prove they know it, and a node that cannot is refused ([`transport::auth`](crate::transport::auth)) |
//! | `KVSTORE_SECRET` | | unset | the shared secret itself, for setups that inject secrets as variables (at most one of the two variables) |
//! | `MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE` | `row_sparse_verbose` | 0 | 1 (or `true`): workers and servers log every row-sparse push and pull (key, rows) at `info` level, as MXNet's do |
//!
//! `DMLC_PS_VAN_TYPE` is not a setting: MXNet's P3 store (`p3`) and RDMA van (`ibverbs`) are
//! not provided, and a worker created with it set to anything but `zmq` logs a warning.
//!
//! The stores read the file named by `KVSTORE_CONFIG` (when set); `kvstore scheduler` and
//! `kvstore server` take it as `--config`.
//!
//! **The environment wins over the file**: each setting is taken from its variable when the
//! variable is set, else from the `[dist]` table of `kvstore.toml`, else the default. The
//! required settings (the scheduler's address and the cluster size) are an error when neither
//! gives them, as in ps-lite, whose message (`Check notnull: Environment::Get()->find("...")`)
//! is quoted in ours.
//!
//! Parsing never reads the process environment by itself: [`DistConfig::from_vars`] takes any
//! map of variables (tests pass their own), [`DistConfig::from_env`] is the one that reads
//! `std::env`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default of `MXNET_KVSTORE_BIGARRAY_BOUND` (MXNet's).
pub const DEFAULT_BIGARRAY_BOUND: u64 = 1_000_000;
/// Default bound on every wait, in seconds (`KVSTORE_TIMEOUT_SECS`): ten minutes, room for
/// a rank that evaluates or checkpoints alone between two steps, or for nodes that start
/// minutes apart; a node that dies is noticed at once (its connections close), not after it.
pub const DEFAULT_TIMEOUT_SECS: f64 = 600.0;
/// Default of `KVSTORE_STALL_WARNING_SECS`: a minute, as Horovod's stall check
/// (`HOROVOD_STALL_CHECK_TIME_SECONDS`).
pub const DEFAULT_STALL_WARNING_SECS: f64 = 60.0;
/// Default largest message accepted from a peer (`KVSTORE_MAX_MESSAGE_BYTES`): 4 GiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 4 << 30;
/// Default size of a shared-memory region (`KVSTORE_SHM_BYTES`): 256 MiB.
pub const DEFAULT_SHM_BYTES: u64 = 256 << 20;
/// Default directory of shared-memory regions (`KVSTORE_SHM_DIR`).
pub const DEFAULT_SHM_DIR: &str = "/dev/shm";

/// The role of this process in the cluster (`DMLC_ROLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Pushes gradients and pulls weights (the default, as in MXNet).
    #[default]
    Worker,
    /// Holds a slice of the keys, sums pushes, runs the optimizer.
    Server,
    /// Assigns node ids and runs barriers.
    Scheduler,
}

impl Role {
    /// MXNet's spelling: `worker`, `server`, `scheduler`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Server => "server",
            Role::Scheduler => "scheduler",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = ();
    fn from_str(s: &str) -> Result<Role, ()> {
        match s.trim() {
            "worker" => Ok(Role::Worker),
            "server" => Ok(Role::Server),
            "scheduler" => Ok(Role::Scheduler),
            _ => Err(()),
        }
    }
}

/// A configuration that cannot be used. Every message names the variable (or file key) and
/// the offending value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required setting is missing from both the environment and the file.
    #[error(
        "{var} is not set (ps-lite: `Check notnull: Environment::Get()->find(\"{var}\")`); \
         set the environment variable or `{key}` in the [dist] table of kvstore.toml"
    )]
    Missing {
        /// The environment variable.
        var: &'static str,
        /// The `[dist]` key of `kvstore.toml`.
        key: &'static str,
    },
    /// A setting has a value that cannot be parsed or is out of range.
    #[error("{var}={value:?} is invalid: {expected}")]
    Invalid {
        /// The environment variable (or `kvstore.toml [dist].<key>`).
        var: String,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// `kvstore.toml` cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `kvstore.toml` is not valid TOML or its `[dist]` table has unknown keys or wrong types.
    #[error("invalid kvstore.toml{}: {message}", path.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
    File {
        /// The file, when read from one.
        path: Option<PathBuf>,
        /// The TOML parser's message (it names the key and line).
        message: String,
    },
}

impl From<ConfigError> for kvstore_base::Error {
    fn from(e: ConfigError) -> kvstore_base::Error {
        kvstore_base::Error::InvalidArgument(e.to_string())
    }
}

/// The `[dist]` table of `kvstore.toml`: every key optional, unknown keys rejected.
///
/// ```toml
/// [dist]
/// role = "server"
/// root_uri = "10.0.0.1"
/// root_port = 9091
/// num_server = 2
/// num_worker = 4
/// timeout_secs = 120
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistFile {
    /// `DMLC_ROLE`.
    pub role: Option<Role>,
    /// `DMLC_PS_ROOT_URI`.
    pub root_uri: Option<String>,
    /// `DMLC_PS_ROOT_PORT`.
    pub root_port: Option<u16>,
    /// `DMLC_NUM_SERVER`.
    pub num_server: Option<u32>,
    /// `DMLC_NUM_WORKER`.
    pub num_worker: Option<u32>,
    /// `DMLC_NODE_HOST`.
    pub node_host: Option<String>,
    /// `KVSTORE_BIND_HOST`.
    pub bind_host: Option<String>,
    /// `DMLC_INTERFACE`.
    pub interface: Option<String>,
    /// `PORT`.
    pub port: Option<u16>,
    /// `PS_VERBOSE`.
    pub verbose: Option<u8>,
    /// `PS_HEARTBEAT_INTERVAL`, seconds.
    pub heartbeat_interval: Option<u64>,
    /// `PS_HEARTBEAT_TIMEOUT`, seconds.
    pub heartbeat_timeout: Option<u64>,
    /// `MXNET_KVSTORE_BIGARRAY_BOUND`.
    pub bigarray_bound: Option<u64>,
    /// `KVSTORE_TIMEOUT_SECS`.
    pub timeout_secs: Option<f64>,
    /// `KVSTORE_STALL_WARNING_SECS`.
    pub stall_warning_secs: Option<f64>,
    /// `KVSTORE_MAX_MESSAGE_BYTES`.
    pub max_message_bytes: Option<u64>,
    /// `KVSTORE_SHM`.
    pub shm: Option<bool>,
    /// `KVSTORE_SHM_BYTES`.
    pub shm_bytes: Option<u64>,
    /// `KVSTORE_SHM_DIR`.
    pub shm_dir: Option<String>,
    /// `MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE`.
    pub row_sparse_verbose: Option<bool>,
    /// `KVSTORE_SECRET_FILE`.
    pub secret_file: Option<String>,
}

#[derive(Deserialize)]
struct FileRoot {
    #[serde(default)]
    dist: Option<DistFile>,
}

impl DistFile {
    /// Parses the `[dist]` table of a `kvstore.toml` text (other tables are ignored; a missing
    /// `[dist]` table gives all-unset).
    pub fn from_toml_str(text: &str) -> Result<DistFile, ConfigError> {
        Self::parse(text, None)
    }

    /// Reads and parses `path` (see [`DistFile::from_toml_str`]).
    pub fn from_path(path: &Path) -> Result<DistFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    fn parse(text: &str, path: Option<&Path>) -> Result<DistFile, ConfigError> {
        let root: FileRoot = toml::from_str(text).map_err(|e| ConfigError::File {
            path: path.map(Path::to_path_buf),
            message: e.to_string(),
        })?;
        Ok(root.dist.unwrap_or_default())
    }
}

/// The complete configuration of one node of a dist cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct DistConfig {
    /// This node's role.
    pub role: Role,
    /// The scheduler's host (`DMLC_PS_ROOT_URI`).
    pub root_uri: String,
    /// The scheduler's port (`DMLC_PS_ROOT_PORT`).
    pub root_port: u16,
    /// Number of servers (`DMLC_NUM_SERVER`): at least 1, except for a scheduler of a job
    /// without parameter servers ([`DistConfig::scheduler_from_vars_and_file`]).
    pub num_servers: u32,
    /// Number of workers (`DMLC_NUM_WORKER`), at least 1.
    pub num_workers: u32,
    /// The address this node advertises, and listens on unless `bind_host` is set
    /// (`DMLC_NODE_HOST`).
    pub node_host: Option<String>,
    /// The address this node listens on when it is not the one it advertises
    /// (`KVSTORE_BIND_HOST`, e.g. `0.0.0.0`); `None`: the advertised one.
    pub bind_host: Option<String>,
    /// The interface to take this node's address from (`DMLC_INTERFACE`).
    pub interface: Option<String>,
    /// A fixed port for this node (`PORT`); `None`: any free port.
    pub port: Option<u16>,
    /// ps-lite's verbosity (`PS_VERBOSE`): 0, 1 or 2; the level of the `kvstore` command's
    /// log (the libraries log at `info` and `debug` whatever it says).
    pub verbose: u8,
    /// Interval between heartbeats (`PS_HEARTBEAT_INTERVAL`); zero: derived from the timeout
    /// (see [`heartbeat_settings`](crate::cluster::heartbeat_settings)).
    pub heartbeat_interval: Duration,
    /// Silence after which a node is lost (`PS_HEARTBEAT_TIMEOUT`); zero: three intervals.
    pub heartbeat_timeout: Duration,
    /// Element count from which an array is split over all servers
    /// (`MXNET_KVSTORE_BIGARRAY_BOUND`).
    pub bigarray_bound: u64,
    /// Bound on every wait (`KVSTORE_TIMEOUT_SECS`).
    pub timeout: Duration,
    /// How long a sync round, an init, a barrier, the registration or a request may wait
    /// before the server, the scheduler or the waiting node logs a warning naming who it waits
    /// for (`KVSTORE_STALL_WARNING_SECS`); zero: never. A wait still fails only at `timeout`.
    pub stall_warning: Duration,
    /// Largest message accepted from a peer (`KVSTORE_MAX_MESSAGE_BYTES`).
    pub max_message_bytes: u64,
    /// Whether big parts travel through shared memory between a worker and a server of the
    /// same host (`KVSTORE_SHM`).
    pub shm: bool,
    /// Size of a worker's region per server connection (`KVSTORE_SHM_BYTES`).
    pub shm_bytes: u64,
    /// Directory of the region files (`KVSTORE_SHM_DIR`).
    pub shm_dir: PathBuf,
    /// Whether workers and servers log each row-sparse push and pull
    /// (`MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE`).
    pub row_sparse_verbose: bool,
    /// The job's shared secret (`KVSTORE_SECRET_FILE` or `KVSTORE_SECRET`): every connection
    /// opens with the handshake of [`transport::auth`](crate::transport::auth).
    pub secret: Option<crate::transport::Secret>,
}

/// A duration in seconds (fractions allowed, at most a year) from the variable `var`, else
/// the file's `key`, else `default`; zero only where `zero_allowed`.
fn seconds(
    src: &Source<'_>,
    var: &str,
    (key, in_file): (&str, Option<f64>),
    default: f64,
    zero_allowed: bool,
) -> Result<Duration, ConfigError> {
    let expected = if zero_allowed {
        "a number of seconds (fractions allowed; 0: never), at most one year"
    } else {
        "a positive number of seconds (fractions allowed), at most one year"
    };
    let (secs, name, raw) = setting(src, var, (key, in_file), default, expected)?;
    let positive = secs > 0.0 || (zero_allowed && secs == 0.0);
    if !(secs.is_finite() && positive && secs <= 365.0 * 86400.0) {
        return Err(invalid(&name, &raw, expected));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The shared secret of `KVSTORE_SECRET`, else of the file `KVSTORE_SECRET_FILE` (else the
/// file's `secret_file`) names; an error when both variables are set.
fn read_secret(
    src: &Source<'_>,
    file: &DistFile,
) -> Result<Option<crate::transport::Secret>, ConfigError> {
    use crate::transport::Secret;
    match (src.get("KVSTORE_SECRET"), src.get("KVSTORE_SECRET_FILE")) {
        (Some(_), Some(path)) => Err(invalid(
            "KVSTORE_SECRET_FILE",
            path,
            "unset while KVSTORE_SECRET is set: give the secret one way",
        )),
        (Some(value), None) => Secret::from_text(value.as_bytes().to_vec())
            .map(Some)
            .map_err(|e| invalid("KVSTORE_SECRET", "<hidden>", &e)),
        (None, Some(path)) => Secret::from_file(Path::new(path))
            .map(Some)
            .map_err(|e| invalid("KVSTORE_SECRET_FILE", path, &e)),
        (None, None) => match &file.secret_file {
            Some(path) => Secret::from_file(Path::new(path))
                .map(Some)
                .map_err(|e| invalid(&file_var("secret_file"), path, &e)),
            None => Ok(None),
        },
    }
}

/// Where a value came from, for error messages.
struct Source<'a> {
    env: &'a HashMap<String, String>,
}

impl Source<'_> {
    fn get(&self, var: &str) -> Option<&str> {
        self.env.get(var).map(String::as_str)
    }
}

fn invalid(var: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_string(),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

/// A setting from the variable `var`, else the file's `key`, else `default`: its value, the
/// name it came by (the variable, or the file's key) and its text, for an error about it.
fn setting<T: std::str::FromStr + ToString + Copy>(
    src: &Source<'_>,
    var: &str,
    (key, in_file): (&str, Option<T>),
    default: T,
    expected: &str,
) -> Result<(T, String, String), ConfigError> {
    Ok(match src.get(var) {
        Some(v) => (
            parse_num::<T>(var, v, expected)?,
            var.to_string(),
            v.to_string(),
        ),
        None => {
            let n = in_file.unwrap_or(default);
            (n, file_var(key), n.to_string())
        }
    })
}

fn parse_num<T: std::str::FromStr>(
    var: &str,
    value: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    value
        .trim()
        .parse::<T>()
        .map_err(|_| invalid(var, value, expected))
}

/// The scheduler's host from `raw` (of `var`): a host name or an IP address, an IPv6 one
/// bare or in brackets, without a port or a scheme (`host:9091` is a common slip, which would
/// otherwise be tried as an IPv6 address until the timeout).
fn scheduler_host(var: &str, raw: &str) -> Result<String, ConfigError> {
    let host = raw.trim();
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ipv6 = bare.parse::<std::net::Ipv6Addr>().is_ok();
    let expected = "a host name or IP address, without a port (the port is DMLC_PS_ROOT_PORT)";
    if host.is_empty()
        || host.contains(char::is_whitespace)
        || host.contains('/')
        || (host.contains(':') && !ipv6)
        || (bare.len() != host.len() && !ipv6)
    {
        return Err(invalid(var, raw, expected));
    }
    Ok(host.to_string())
}

fn file_var(key: &str) -> String {
    format!("kvstore.toml [dist].{key}")
}

impl DistConfig {
    /// Reads the process environment (see the [module docs](self)); no file.
    pub fn from_env() -> Result<DistConfig, ConfigError> {
        Self::from_vars_and_file(env_map(), &DistFile::default())
    }

    /// Reads the process environment over the `[dist]` table of the `kvstore.toml` at `path`.
    pub fn from_env_and_path(path: &Path) -> Result<DistConfig, ConfigError> {
        Self::from_vars_and_file(env_map(), &DistFile::from_path(path)?)
    }

    /// Parses a map of environment variables (no file).
    ///
    /// ```
    /// use kvstore_dist::config::{DistConfig, Role};
    /// let c = DistConfig::from_vars([
    ///     ("DMLC_ROLE", "server"),
    ///     ("DMLC_PS_ROOT_URI", "127.0.0.1"),
    ///     ("DMLC_PS_ROOT_PORT", "9091"),
    ///     ("DMLC_NUM_SERVER", "1"),
    ///     ("DMLC_NUM_WORKER", "2"),
    /// ])
    /// .unwrap();
    /// assert_eq!(c.role, Role::Server);
    /// assert_eq!(c.num_workers, 2);
    /// assert_eq!(c.timeout.as_secs(), 600);
    /// ```
    pub fn from_vars<I, K, V>(vars: I) -> Result<DistConfig, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self::from_vars_and_file(vars, &DistFile::default())
    }

    /// Parses a map of environment variables over a `[dist]` table: a variable that is set
    /// wins over the file's key.
    pub fn from_vars_and_file<I, K, V>(vars: I, file: &DistFile) -> Result<DistConfig, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self::parse(vars, file, 1)
    }

    /// As [`from_vars_and_file`](Self::from_vars_and_file), for the scheduler of a job that
    /// may have no parameter servers: `DMLC_NUM_SERVER` may be `0` (a `horovod` job, whose
    /// workers only meet at the scheduler). The stores and servers of the dist family keep
    /// refusing `0`.
    ///
    /// ```
    /// use kvstore_dist::config::{DistConfig, DistFile};
    /// let vars = [
    ///     ("DMLC_ROLE", "scheduler"),
    ///     ("DMLC_PS_ROOT_URI", "127.0.0.1"),
    ///     ("DMLC_PS_ROOT_PORT", "9091"),
    ///     ("DMLC_NUM_SERVER", "0"),
    ///     ("DMLC_NUM_WORKER", "2"),
    /// ];
    /// let c = DistConfig::scheduler_from_vars_and_file(vars, &DistFile::default()).unwrap();
    /// assert_eq!(c.num_servers, 0);
    /// assert!(DistConfig::from_vars(vars).is_err());
    /// ```
    pub fn scheduler_from_vars_and_file<I, K, V>(
        vars: I,
        file: &DistFile,
    ) -> Result<DistConfig, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self::parse(vars, file, 0)
    }

    /// The parser behind the constructors: `DMLC_NUM_SERVER` must be at least `min_servers`.
    fn parse<I, K, V>(vars: I, file: &DistFile, min_servers: u32) -> Result<DistConfig, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let env: HashMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let src = Source { env: &env };

        let role = match src.get("DMLC_ROLE") {
            Some(v) => v
                .parse::<Role>()
                .map_err(|_| invalid("DMLC_ROLE", v, "one of worker, server, scheduler"))?,
            None => file.role.unwrap_or_default(),
        };

        let root_uri = match src.get("DMLC_PS_ROOT_URI") {
            Some(v) => scheduler_host("DMLC_PS_ROOT_URI", v)?,
            None => match &file.root_uri {
                Some(v) => scheduler_host(&file_var("root_uri"), v)?,
                None => {
                    return Err(ConfigError::Missing {
                        var: "DMLC_PS_ROOT_URI",
                        key: "root_uri",
                    })
                }
            },
        };

        let port_expected = "a port number in 1..=65535";
        let check_port = |var: &str, raw: &str, p: u16| {
            if p == 0 {
                Err(invalid(var, raw, port_expected))
            } else {
                Ok(p)
            }
        };
        let root_port = match src.get("DMLC_PS_ROOT_PORT") {
            Some(v) => check_port(
                "DMLC_PS_ROOT_PORT",
                v,
                parse_num("DMLC_PS_ROOT_PORT", v, port_expected)?,
            )?,
            None => match file.root_port {
                Some(p) => check_port(&file_var("root_port"), &p.to_string(), p)?,
                None => {
                    return Err(ConfigError::Missing {
                        var: "DMLC_PS_ROOT_PORT",
                        key: "root_port",
                    })
                }
            },
        };

        let count = |var: &'static str, key: &'static str, from_file: Option<u32>, min: u32| {
            let expected = if min == 0 {
                "a whole number"
            } else {
                "a whole number of at least 1"
            };
            let (n, name, raw) = match src.get(var) {
                Some(v) => (
                    parse_num::<u32>(var, v, expected)?,
                    var.to_string(),
                    v.to_string(),
                ),
                None => match from_file {
                    Some(n) => (n, file_var(key), n.to_string()),
                    None => return Err(ConfigError::Missing { var, key }),
                },
            };
            if n < min {
                return Err(invalid(&name, &raw, expected));
            }
            Ok(n)
        };
        let num_servers = count(
            "DMLC_NUM_SERVER",
            "num_server",
            file.num_server,
            min_servers,
        )?;
        let num_workers = count("DMLC_NUM_WORKER", "num_worker", file.num_worker, 1)?;

        let text = |var: &str, from_file: &Option<String>| -> Option<String> {
            src.get(var)
                .map(str::to_string)
                .or_else(|| from_file.clone())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let node_host = text("DMLC_NODE_HOST", &file.node_host);
        let bind_host = text("KVSTORE_BIND_HOST", &file.bind_host);
        let interface = text("DMLC_INTERFACE", &file.interface);

        let port = match src.get("PORT") {
            Some(v) => Some(check_port("PORT", v, parse_num("PORT", v, port_expected)?)?),
            None => match file.port {
                Some(p) => Some(check_port(&file_var("port"), &p.to_string(), p)?),
                None => None,
            },
        };

        let verbose_expected = "0, 1 or 2";
        let (verbose, vname, vraw) = setting(
            &src,
            "PS_VERBOSE",
            ("verbose", file.verbose),
            0u8,
            verbose_expected,
        )?;
        if verbose > 2 {
            return Err(invalid(&vname, &vraw, verbose_expected));
        }

        const YEAR: u64 = 365 * 24 * 3600;
        let heartbeat_expected =
            "a whole number of seconds, at most one year (0: derived from KVSTORE_TIMEOUT_SECS)";
        let secs = |var: &str, key: &str, from_file: Option<u64>| {
            let (n, name, raw) = setting(&src, var, (key, from_file), 0, heartbeat_expected)?;
            if n > YEAR {
                return Err(invalid(&name, &raw, heartbeat_expected));
            }
            Ok((Duration::from_secs(n), name, raw))
        };
        let (heartbeat_interval, _, _) = secs(
            "PS_HEARTBEAT_INTERVAL",
            "heartbeat_interval",
            file.heartbeat_interval,
        )?;
        let (heartbeat_timeout, timeout_name, timeout_raw) = secs(
            "PS_HEARTBEAT_TIMEOUT",
            "heartbeat_timeout",
            file.heartbeat_timeout,
        )?;
        if !heartbeat_timeout.is_zero() && heartbeat_timeout < heartbeat_interval {
            return Err(invalid(
                &timeout_name,
                &timeout_raw,
                &format!(
                    "at least PS_HEARTBEAT_INTERVAL ({} s): a node is lost after this long \
                     without a heartbeat",
                    heartbeat_interval.as_secs()
                ),
            ));
        }

        // A whole number from the variable, else the file's key, else the default; below `min`
        // it is an error naming where it came from.
        let at_least = |var: &'static str,
                        key: &str,
                        from_file: Option<u64>,
                        default: u64,
                        min: u64,
                        expected: &str|
         -> Result<u64, ConfigError> {
            let (n, name, raw) = setting(&src, var, (key, from_file), default, expected)?;
            if n < min {
                return Err(invalid(&name, &raw, expected));
            }
            Ok(n)
        };

        let bigarray_bound = at_least(
            "MXNET_KVSTORE_BIGARRAY_BOUND",
            "bigarray_bound",
            file.bigarray_bound,
            DEFAULT_BIGARRAY_BOUND,
            1,
            "a whole number of elements of at least 1",
        )?;

        let timeout = seconds(
            &src,
            "KVSTORE_TIMEOUT_SECS",
            ("timeout_secs", file.timeout_secs),
            DEFAULT_TIMEOUT_SECS,
            false,
        )?;
        let stall_warning = seconds(
            &src,
            "KVSTORE_STALL_WARNING_SECS",
            ("stall_warning_secs", file.stall_warning_secs),
            DEFAULT_STALL_WARNING_SECS,
            true,
        )?;

        let max_message_bytes = at_least(
            "KVSTORE_MAX_MESSAGE_BYTES",
            "max_message_bytes",
            file.max_message_bytes,
            DEFAULT_MAX_MESSAGE_BYTES,
            1024,
            "a whole number of bytes of at least 1024",
        )?;

        let shm_expected = "0 or 1";
        let shm = match src.get("KVSTORE_SHM") {
            Some(v) => match v.trim() {
                "0" => false,
                "1" => true,
                _ => return Err(invalid("KVSTORE_SHM", v, shm_expected)),
            },
            None => file.shm.unwrap_or(true),
        };
        let shm_bytes = at_least(
            "KVSTORE_SHM_BYTES",
            "shm_bytes",
            file.shm_bytes,
            DEFAULT_SHM_BYTES,
            1 << 20,
            "a whole number of bytes of at least 1048576 (1 MiB)",
        )?;
        let shm_dir = PathBuf::from(
            src.get("KVSTORE_SHM_DIR")
                .map(str::to_string)
                .or_else(|| file.shm_dir.clone())
                .unwrap_or_else(|| DEFAULT_SHM_DIR.to_string()),
        );

        let verbose_name = "MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE";
        let row_sparse_verbose = match src.get(verbose_name) {
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "0" | "false" => false,
                "1" | "true" => true,
                _ => return Err(invalid(verbose_name, v, "0, 1, false or true")),
            },
            None => file.row_sparse_verbose.unwrap_or(false),
        };

        let secret = read_secret(&src, file)?;

        Ok(DistConfig {
            role,
            root_uri,
            root_port,
            num_servers,
            num_workers,
            node_host,
            bind_host,
            interface,
            port,
            verbose,
            heartbeat_interval,
            heartbeat_timeout,
            bigarray_bound,
            timeout,
            stall_warning,
            max_message_bytes,
            shm,
            shm_bytes,
            shm_dir,
            row_sparse_verbose,
            secret,
        })
    }

    /// The scheduler's address as `host:port`, for [`std::net::ToSocketAddrs`].
    pub fn scheduler_addr(&self) -> String {
        if self.root_uri.contains(':') && !self.root_uri.starts_with('[') {
            format!("[{}]:{}", self.root_uri, self.root_port)
        } else {
            format!("{}:{}", self.root_uri, self.root_port)
        }
    }

    /// Refuses a `KVSTORE_MAX_MESSAGE_BYTES` below `needed`, for a store (`store`) whose
    /// messages cannot be cut to fit a smaller one (`why` says which), before it joins a job.
    ///
    /// # Errors
    /// [`kvstore_base::Error::InvalidArgument`] naming the store, the setting, what it needs
    /// and why.
    ///
    /// # Example
    /// ```
    /// let config = kvstore_dist::DistConfig::from_vars([
    ///     ("DMLC_PS_ROOT_URI", "127.0.0.1"),
    ///     ("DMLC_PS_ROOT_PORT", "9091"),
    ///     ("DMLC_NUM_SERVER", "1"),
    ///     ("DMLC_NUM_WORKER", "2"),
    ///     ("KVSTORE_MAX_MESSAGE_BYTES", "1048576"),
    /// ])
    /// .unwrap();
    /// let e = config.require_max_message_bytes("horovod", 16 << 20, "its ring").unwrap_err();
    /// assert!(e.to_string().contains("KVSTORE_MAX_MESSAGE_BYTES is 1048576 bytes"));
    /// assert!(config.require_max_message_bytes("horovod", 1 << 20, "its ring").is_ok());
    /// ```
    pub fn require_max_message_bytes(
        &self,
        store: &str,
        needed: u64,
        why: &str,
    ) -> kvstore_base::Result<()> {
        if self.max_message_bytes >= needed {
            return Ok(());
        }
        Err(kvstore_base::Error::InvalidArgument(format!(
            "{store}: KVSTORE_MAX_MESSAGE_BYTES is {} bytes; this store needs at least {needed} \
             ({why})",
            self.max_message_bytes
        )))
    }

    /// The transport settings this configuration implies (timeout, maximum message size,
    /// shared secret);
    /// the node id is assigned later by the scheduler.
    pub fn transport(&self) -> crate::transport::TransportConfig {
        crate::transport::TransportConfig {
            timeout: self.timeout,
            max_message_bytes: self.max_message_bytes,
            secret: self.secret.clone(),
            stall_warning: self.stall_warning,
            ..crate::transport::TransportConfig::default()
        }
    }
}

/// A store's settings: the process environment with `options` (a create request's) over it.
/// Values that are not UTF-8 are converted lossily.
pub fn request_vars(
    options: &std::collections::BTreeMap<String, String>,
) -> HashMap<String, String> {
    let mut vars = env_map();
    // The secret is one setting given two ways: an option giving it either way replaces the
    // environment's (else both would be set, an error).
    const SECRET_VARS: [&str; 2] = ["KVSTORE_SECRET", "KVSTORE_SECRET_FILE"];
    if SECRET_VARS.iter().any(|v| options.contains_key(*v)) {
        for v in SECRET_VARS {
            vars.remove(v);
        }
    }
    vars.extend(options.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars
}

/// The process environment as a map; values that are not UTF-8 are converted lossily (a
/// mangled value of one of our variables then fails to parse, naming the variable).
fn env_map() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .collect()
}
