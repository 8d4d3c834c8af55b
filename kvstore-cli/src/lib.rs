//! # kvstore-cli: the `kvstore` command
//!
//! The `kvstore` binary inspects the stores a build of kvstore-rs links and runs the roles of
//! the distributed stores. It is built with every backend of the `kvstore` facade enabled, so
//! it sees every store the project provides.
//!
//! - `kvstore list` prints every registered store as a table: its name (what
//!   `kvstore::create` takes), its aliases, its capabilities and where it is registered.
//! - `kvstore scheduler` runs the scheduler role of the distributed stores, configured by
//!   MXNet's / ps-lite's variables exactly as ps-lite's scheduler process is under MXNet's
//!   launcher (`DMLC_PS_ROOT_URI`, `DMLC_PS_ROOT_PORT`, `DMLC_NUM_SERVER`, `DMLC_NUM_WORKER`,
//!   `DMLC_NODE_HOST`, `PS_VERBOSE`, `PS_HEARTBEAT_INTERVAL`, `PS_HEARTBEAT_TIMEOUT`,
//!   `KVSTORE_TIMEOUT_SECS`, `KVSTORE_MAX_MESSAGE_BYTES`, and this project's own, such as
//!   `KVSTORE_BIND_HOST`, `KVSTORE_SECRET_FILE`, `KVSTORE_STALL_WARNING_SECS`; see
//!   `kvstore_dist::config`). It
//!   waits for every server and worker to register (within `KVSTORE_TIMEOUT_SECS`), serves
//!   barriers and heartbeats, and exits 0 once every node has said goodbye; otherwise it
//!   exits non-zero with the error on standard error (a missing variable, the servers or
//!   workers that never registered, the nodes that were lost). `DMLC_ROLE` may be unset or
//!   `scheduler`; any other role is refused rather than silently overridden.
//! - `kvstore server` runs one server of the distributed stores, configured by the same
//!   variables (plus `MXNET_KVSTORE_BIGARRAY_BOUND`, `PORT`): it joins the cluster, holds its
//!   share of the keys, merges the workers' pushes and runs the optimizer, and exits 0 once
//!   every worker has said goodbye; otherwise it exits non-zero with the error (the cluster
//!   that never formed, the workers that vanished). `DMLC_ROLE` may be unset or `server`.
//! - `kvstore launch -n WORKERS -s SERVERS -- COMMAND...` runs a whole job on this machine,
//!   as MXNet's `tools/launch.py --launcher local` does: a scheduler and the servers (this
//!   binary) and the workers (`COMMAND`), each with the `DMLC_*` variables of its role, their
//!   output prefixed with the process's name; it exits with the first failure's status. See
//!   [`launch`].
//!
//! `scheduler` and `server` take `--config kvstore.toml`, whose `[dist]` table supplies the
//! settings the environment leaves unset. What the roles log (refused connections, lost
//! nodes, stalled rounds and barriers) goes to standard error ([`logging`]).
//!
//! The logic lives here, in plain functions ([`render_list`], [`role_config`],
//! [`run_scheduler`], [`run_server`], [`launch::launch`], [`run`]); `main.rs` only parses the
//! command line and prints.
#![deny(missing_docs)]

pub mod launch;
pub mod logging;
pub mod stop_signals;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use kvstore::{Capability, StoreInfo};
use kvstore_dist::config::DistFile;
use kvstore_dist::{DistConfig, Role, Scheduler};

/// The command line of `kvstore`.
#[derive(Debug, Parser)]
#[command(
    name = "kvstore",
    version,
    about = "Inspect the kvstore backends this build links and run the roles of the \
             distributed stores",
    after_help = "`scheduler` and `server` run one role of a dist job each, configured by \
                  MXNet's DMLC_* variables (as under MXNet's tools/launch.py); \
                  `pslite-scheduler` and `pslite-server` the same roles speaking MXNet 1.9.1's \
                  own protocol, for MXNet's Python workers; `launch` runs a whole job on this \
                  machine: a scheduler, the servers and the workers."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `kvstore`.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// List every registered store: name, aliases, capabilities and origin.
    List,
    /// Run the scheduler of a dist cluster, configured by MXNet's DMLC_* variables.
    ///
    /// Reads DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER and DMLC_NUM_WORKER
    /// (required), DMLC_NODE_HOST, PS_VERBOSE, PS_HEARTBEAT_INTERVAL, PS_HEARTBEAT_TIMEOUT,
    /// KVSTORE_TIMEOUT_SECS and KVSTORE_MAX_MESSAGE_BYTES, as ps-lite's scheduler does under
    /// MXNet's launcher, and this project's KVSTORE_BIND_HOST, KVSTORE_SECRET_FILE (or
    /// KVSTORE_SECRET), KVSTORE_STALL_WARNING_SECS and KVSTORE_LOG (every variable of
    /// `kvstore_dist::config`). Waits for every node to register, serves barriers and heartbeats, and
    /// exits 0 once every node has said goodbye; exits non-zero with the error (naming the
    /// missing or lost nodes) otherwise. DMLC_ROLE may be unset or `scheduler`.
    Scheduler {
        /// A `kvstore.toml` whose `[dist]` table supplies settings the environment leaves
        /// unset (the environment wins); by default the file KVSTORE_CONFIG names, as for a
        /// worker.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Run one server of a dist cluster, configured by MXNet's DMLC_* variables.
    ///
    /// Reads the scheduler's variables (DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER
    /// and DMLC_NUM_WORKER required; DMLC_NODE_HOST, PORT, PS_VERBOSE, PS_HEARTBEAT_*,
    /// MXNET_KVSTORE_BIGARRAY_BOUND, MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE,
    /// KVSTORE_TIMEOUT_SECS, KVSTORE_MAX_MESSAGE_BYTES), as MXNet's server process does under
    /// its launcher, and this project's KVSTORE_BIND_HOST, KVSTORE_SECRET_FILE (or
    /// KVSTORE_SECRET), KVSTORE_STALL_WARNING_SECS, KVSTORE_SHM* and KVSTORE_LOG (every
    /// variable of `kvstore_dist::config`). Joins the cluster, serves its share of
    /// the keys (merging pushes, running the optimizer the workers set), and exits 0 once
    /// every worker has said goodbye; exits non-zero with the error otherwise. DMLC_ROLE may be
    /// unset or `server`.
    Server {
        /// A `kvstore.toml` whose `[dist]` table supplies settings the environment leaves
        /// unset (the environment wins); by default the file KVSTORE_CONFIG names, as for a
        /// worker.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Run a whole dist job on this machine: a scheduler, SERVERS servers and WORKERS
    /// workers running COMMAND (MXNet's `tools/launch.py --launcher local`).
    ///
    /// Every process gets DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER,
    /// DMLC_NUM_WORKER, DMLC_NODE_HOST and DMLC_TASK_ID (a worker's index 0..WORKERS, a
    /// server's WORKERS + index), KVSTORE_TIMEOUT_SECS with --timeout, KVSTORE_SECRET_FILE (a
    /// fresh secret for the job, unless KVSTORE_SECRET or KVSTORE_SECRET_FILE is set) and every
    /// --env pair, over
    /// the launcher's own environment (PORT excepted). Each line a process writes is
    /// forwarded with its name (`[scheduler] `, `[server 0] `, `[worker 1] `) to the same
    /// stream. Once every worker exited with status 0, the servers and the scheduler get the
    /// timeout to finish, then are killed (an error). The first process that fails stops
    /// the job: the others are killed and `kvstore launch` exits with its status (128 + the
    /// signal's number for a signal).
    Launch(launch::LaunchOptions),
    /// Run the scheduler of a job that speaks MXNet 1.9.1's own protocol (ps-lite's), so that
    /// MXNet's Python workers (`mx.kv.create('dist_sync')`) and `pslite_dist_sync` workers
    /// can use it in place of MXNet's.
    ///
    /// Reads DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER and DMLC_NUM_WORKER
    /// (required), KVSTORE_BIND_HOST, KVSTORE_TIMEOUT_SECS and KVSTORE_MAX_MESSAGE_BYTES. As
    /// ps-lite's scheduler: ids in registration order, the node table, barriers; exits 0 once
    /// every node met in the last barrier, non-zero with the error (naming who is missing)
    /// after KVSTORE_TIMEOUT_SECS, or as soon as a barrier waits for a node that left. ps-lite has no handshake: the job's network must
    /// be trusted, as MXNet's. DMLC_ROLE may be unset or `scheduler`.
    PsliteScheduler {
        /// A `kvstore.toml` whose `[dist]` table supplies settings the environment leaves
        /// unset (the environment wins); by default the file KVSTORE_CONFIG names, as for a
        /// worker.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Run one server of a job that speaks MXNet 1.9.1's own protocol (ps-lite's): MXNet's
    /// `KVStoreDistServer`, for MXNet's Python workers and `pslite_dist_sync` workers.
    ///
    /// Reads the scheduler's variables, DMLC_NODE_HOST, PORT and KVSTORE_BIND_HOST. Sums each
    /// sync round's
    /// pushes exactly in their dtype (2-bit compressed pushes dequantised, as MXNet's server
    /// does), steps the values with the optimizer a worker set (its pickle read as data and
    /// MXNet's optimizer rebuilt by name; a pickle that calls anything stops the server with
    /// an error naming it, never run) and answers pulls. Exits 0 once rank 0 stopped it and
    /// every node
    /// met in the last barrier. DMLC_ROLE may be unset or `server`.
    PsliteServer {
        /// A `kvstore.toml` whose `[dist]` table supplies settings the environment leaves
        /// unset (the environment wins); by default the file KVSTORE_CONFIG names, as for a
        /// worker.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

/// What a command that ran leaves `main` to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Print this text on standard output and exit with status 0.
    Print(String),
    /// Say `message` on standard error and exit with `code` (never 0): a process of
    /// `kvstore launch` failed, and the launcher exits with its status.
    Exit {
        /// The exit status of `kvstore`.
        code: u8,
        /// Why, for standard error.
        message: String,
    },
}

/// Runs a parsed command line and returns what is left to do: print a text, or exit with a
/// status of its own (`launch`).
///
/// `kvstore scheduler` and `kvstore server` read the process environment (see
/// [`role_config`]); `kvstore launch` starts this program (`std::env::current_exe`) as the
/// scheduler and the servers.
///
/// # Errors
/// `list` cannot fail (a store whose capabilities cannot be found is listed with the reason).
/// `scheduler` fails as [`run_scheduler`] does, `server` as [`run_server`] does, `launch`
/// as [`launch::launch`] does (a failing process of the job is an [`Outcome::Exit`], not an
/// error).
pub fn run(cli: &Cli) -> kvstore::Result<Outcome> {
    match &cli.command {
        Command::List => Ok(Outcome::Print(render_list(&kvstore::registered()))),
        Command::Scheduler { config } => {
            let file = read_dist_file(config.as_deref())?;
            run_scheduler(&role_config(
                Role::Scheduler,
                process_vars(),
                file.as_ref(),
            )?)?;
            Ok(Outcome::Print(String::new()))
        }
        Command::Server { config } => {
            let file = read_dist_file(config.as_deref())?;
            run_server(&role_config(Role::Server, process_vars(), file.as_ref())?)?;
            Ok(Outcome::Print(String::new()))
        }
        Command::PsliteScheduler { config } => run_pslite_role(Role::Scheduler, config),
        Command::PsliteServer { config } => run_pslite_role(Role::Server, config),
        Command::Launch(options) => {
            let kvstore = std::env::current_exe().map_err(|source| kvstore::Error::Io {
                path: PathBuf::from("kvstore"),
                source: std::io::Error::new(
                    source.kind(),
                    format!(
                        "cannot find this program to start the scheduler and the servers: {source}"
                    ),
                ),
            })?;
            Ok(match launch::launch(options, &kvstore)? {
                launch::JobEnd::Succeeded => Outcome::Print(String::new()),
                launch::JobEnd::Failed(failure) => Outcome::Exit {
                    code: failure.code,
                    message: failure.message,
                },
            })
        }
    }
}

/// Runs kvstore-pslite's scheduler or server (`role`) until the job ends, configured by the
/// environment over the optional `kvstore.toml`.
fn run_pslite_role(role: Role, file: &Option<PathBuf>) -> kvstore::Result<Outcome> {
    let file = read_dist_file(file.as_deref())?;
    let config = role_config(role, process_vars(), file.as_ref())?;
    logging::follow_config(&config);
    kvstore_pslite::worker::run_role(kvstore_pslite::NAME, &config)?;
    Ok(Outcome::Print(String::new()))
}

/// The process environment as pairs; values that are not UTF-8 are converted lossily (a
/// mangled value of one of our variables then fails to parse, naming the variable).
fn process_vars() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .collect()
}

/// The `[dist]` table of the `kvstore.toml` given with `--config`, else of the one
/// `KVSTORE_CONFIG` names (as a worker reads it), if any.
fn read_dist_file(path: Option<&Path>) -> kvstore::Result<Option<DistFile>> {
    let from_env = std::env::var_os(kvstore_dist::worker::CONFIG_VAR).map(PathBuf::from);
    path.map(Path::to_path_buf)
        .or(from_env)
        .map(|p| DistFile::from_path(&p))
        .transpose()
        .map_err(kvstore::Error::from)
}

/// The configuration of a process running `role` (`kvstore scheduler`, `kvstore server`):
/// a map of environment variables (MXNet's / ps-lite's, see `kvstore_dist::config`) over the
/// `[dist]` table of an optional `kvstore.toml`, with the role set to `role` whatever
/// `DMLC_ROLE` defaults to (or the file's `role` says).
///
/// # Errors
/// [`kvstore::Error::InvalidArgument`] naming the variable when a required one is missing or
/// a value is invalid, or when `DMLC_ROLE` is set to a role other than `role`.
pub fn role_config<I, K, V>(
    role: Role,
    vars: I,
    file: Option<&DistFile>,
) -> kvstore::Result<DistConfig>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let vars: Vec<(String, String)> = vars
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    let file = file.cloned().unwrap_or_default();
    let mut config = if role == Role::Scheduler {
        // A job without parameter servers (horovod) still needs its scheduler.
        DistConfig::scheduler_from_vars_and_file(vars.iter().cloned(), &file)?
    } else {
        DistConfig::from_vars_and_file(vars.iter().cloned(), &file)?
    };
    if let Some((_, given)) = vars.iter().find(|(k, _)| k == "DMLC_ROLE") {
        if config.role != role {
            return Err(kvstore::Error::InvalidArgument(format!(
                "DMLC_ROLE={given:?} but `kvstore {role}` runs the {role} role; \
                 unset DMLC_ROLE or set it to `{role}`"
            )));
        }
    }
    config.role = role;
    Ok(config)
}

/// The scheduler's configuration: [`role_config`] with [`Role::Scheduler`].
///
/// # Errors
/// As [`role_config`].
pub fn scheduler_config<I, K, V>(vars: I, file: Option<&DistFile>) -> kvstore::Result<DistConfig>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    role_config(Role::Scheduler, vars, file)
}

/// Runs the scheduler until the cluster is done: every node registered, then said goodbye.
/// With `PS_VERBOSE` of 1 or more, says on standard error where it listens and what it waits
/// for.
///
/// # Errors
/// The scheduler cannot listen on its address, registration did not complete within the
/// timeout (naming how many servers and workers are missing), or nodes were lost (naming
/// them); as [`kvstore::Error::Backend`] of store `dist`.
pub fn run_scheduler(config: &DistConfig) -> kvstore::Result<()> {
    logging::follow_config(config);
    let scheduler = Scheduler::start(config)?;
    if config.verbose > 0 {
        logging::to_stderr(format_args!(
            "kvstore scheduler: listening on {} (advertised as {}), waiting for {} server(s) \
             and {} worker(s)",
            scheduler.local_addr(),
            scheduler.addr(),
            config.num_servers,
            config.num_workers
        ));
    }
    scheduler.join()?;
    Ok(())
}

/// Runs one server until the job ends: joins the cluster of `config` (see
/// `kvstore_dist::run_server`), serves the workers, and returns once every worker has said
/// goodbye. With `PS_VERBOSE` of 1 or more, says on standard error which scheduler it joins.
///
/// # Errors
/// Joining the cluster failed or timed out (the scheduler is unreachable, or the cluster did
/// not form within the timeout), the server cannot serve on its address, or workers vanished
/// without a goodbye (naming them); as [`kvstore::Error::Backend`] of store `dist`.
pub fn run_server(config: &DistConfig) -> kvstore::Result<()> {
    logging::follow_config(config);
    if config.verbose > 0 {
        logging::to_stderr(format_args!(
            "kvstore server: joining the cluster of scheduler {} as one of {} server(s) for \
             {} worker(s)",
            config.scheduler_addr(),
            config.num_servers,
            config.num_workers
        ));
    }
    kvstore_dist::run_server(config)?;
    Ok(())
}

/// The capabilities of a store as one table cell: comma-separated names, `none`, or
/// `unknown (<reason>)` when building the store to ask it failed.
pub fn capabilities_cell(capabilities: &Result<Vec<Capability>, String>) -> String {
    match capabilities {
        Ok(caps) if caps.is_empty() => "none".to_string(),
        Ok(caps) => caps.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "),
        Err(reason) => format!("unknown ({reason})"),
    }
}

/// The aliases of a store as one table cell: comma-separated, or `-` when it has none.
pub fn aliases_cell(aliases: &[String]) -> String {
    if aliases.is_empty() {
        "-".to_string()
    } else {
        aliases.join(", ")
    }
}

/// Where a store comes from as one table cell: the module that registered it, marked
/// `(runtime)` for a store registered while the program runs.
pub fn origin_cell(info: &StoreInfo) -> String {
    if info.runtime {
        format!("{} (runtime)", info.origin)
    } else {
        info.origin.clone()
    }
}

/// Renders the stores as an aligned table with a header row, one line per store, in the
/// order given; every line ends with a newline and carries no trailing spaces.
///
/// ```
/// use kvstore::{Capability, StoreInfo};
///
/// let info = StoreInfo {
///     name: "local".into(),
///     aliases: vec!["local_allreduce_cpu".into()],
///     capabilities: Ok(vec![Capability::Optimizer, Capability::InitPushPull]),
///     origin: "kvstore_local".into(),
///     runtime: false,
/// };
/// let table = kvstore_cli::render_list(&[info]);
/// assert_eq!(
///     table,
///     "NAME   ALIASES              CAPABILITIES               ORIGIN\n\
///      local  local_allreduce_cpu  optimizer, init_push_pull  kvstore_local\n"
/// );
/// ```
pub fn render_list(infos: &[StoreInfo]) -> String {
    if infos.is_empty() {
        return "no stores are registered: this build links no kvstore backend\n".to_string();
    }
    let header = ["NAME", "ALIASES", "CAPABILITIES", "ORIGIN"].map(String::from);
    let rows: Vec<[String; 4]> = std::iter::once(header)
        .chain(infos.iter().map(|info| {
            [
                info.name.clone(),
                aliases_cell(&info.aliases),
                capabilities_cell(&info.capabilities),
                origin_cell(info),
            ]
        }))
        .collect();
    let mut widths = [0usize; 4];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut table = String::new();
    for row in &rows {
        let line = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ");
        table.push_str(line.trim_end());
        table.push('\n');
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, capabilities: Result<Vec<Capability>, String>) -> StoreInfo {
        StoreInfo {
            name: name.to_string(),
            aliases: Vec::new(),
            capabilities,
            origin: format!("crate_of_{name}"),
            runtime: false,
        }
    }

    #[test]
    fn capabilities_are_comma_separated_none_or_unknown() {
        assert_eq!(
            capabilities_cell(&Ok(vec![Capability::Optimizer, Capability::RowSparse])),
            "optimizer, row_sparse"
        );
        assert_eq!(capabilities_cell(&Ok(vec![])), "none");
        assert_eq!(
            capabilities_cell(&Err("no GPU".to_string())),
            "unknown (no GPU)"
        );
    }

    #[test]
    fn columns_are_aligned() {
        let mut local = info("local", Ok(vec![Capability::InitPushPull]));
        local.aliases = vec!["local_update_cpu".into(), "local_allreduce_cpu".into()];
        let mut plugin = info("a_much_longer_store_name", Ok(vec![]));
        plugin.runtime = true;
        let table = render_list(&[local, plugin, info("nccl", Err("no GPU".into()))]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        // Every column starts at the same offset on every line.
        for header in ["ALIASES", "CAPABILITIES", "ORIGIN"] {
            let column = lines[0].find(header).unwrap();
            for line in &lines[1..] {
                assert_eq!(
                    &line[column - 2..column],
                    "  ",
                    "{header} in {line:?}:\n{table}"
                );
                assert_ne!(
                    &line[column..=column],
                    " ",
                    "{header} in {line:?}:\n{table}"
                );
            }
        }
        assert!(lines[1].contains("local_update_cpu, local_allreduce_cpu"));
        assert!(lines[2].contains("  -  "), "no aliases is a dash: {table}");
        assert!(lines[2].ends_with("crate_of_a_much_longer_store_name (runtime)"));
        assert!(lines[3].contains("unknown (no GPU)"), "{table}");
        assert!(table.lines().all(|l| l == l.trim_end()), "trailing spaces");
    }

    #[test]
    fn an_empty_registry_says_so() {
        assert!(render_list(&[]).contains("no stores are registered"));
    }

    #[test]
    fn list_parses_and_lists_the_linked_stores() {
        let cli = Cli::try_parse_from(["kvstore", "list"]).unwrap();
        assert_eq!(cli.command, Command::List);
        let Outcome::Print(out) = run(&cli).unwrap() else {
            panic!("`kvstore list` has no exit status of its own");
        };
        assert!(out.lines().any(|l| l.starts_with("teststore ")), "{out}");
    }

    fn vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        [
            ("DMLC_PS_ROOT_URI", "127.0.0.1"),
            ("DMLC_PS_ROOT_PORT", "9091"),
            ("DMLC_NUM_SERVER", "1"),
            ("DMLC_NUM_WORKER", "2"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn scheduler_parses() {
        let cli = Cli::try_parse_from(["kvstore", "scheduler"]).unwrap();
        assert_eq!(cli.command, Command::Scheduler { config: None });
    }

    #[test]
    fn the_scheduler_config_is_the_scheduler_role() {
        let c = scheduler_config(vars(&[]), None).unwrap();
        assert_eq!(c.role, Role::Scheduler);
        assert_eq!((c.num_servers, c.num_workers, c.root_port), (1, 2, 9091));
        let c = scheduler_config(vars(&[("DMLC_ROLE", "scheduler")]), None).unwrap();
        assert_eq!(c.role, Role::Scheduler);
    }

    #[test]
    fn a_kvstore_toml_fills_what_the_environment_leaves_unset() {
        let file = kvstore_dist::config::DistFile::from_toml_str(
            "[dist]\nnum_worker = 4\nnum_server = 3\n",
        )
        .unwrap();
        let env: Vec<(String, String)> = vars(&[])
            .into_iter()
            .filter(|(k, _)| k != "DMLC_NUM_WORKER")
            .collect();
        let c = scheduler_config(env, Some(&file)).unwrap();
        // The file supplies the worker count; the environment's server count wins.
        assert_eq!((c.num_servers, c.num_workers), (1, 4));
    }

    #[test]
    fn another_role_or_a_missing_variable_is_refused_by_name() {
        let e = scheduler_config(vars(&[("DMLC_ROLE", "worker")]), None).unwrap_err();
        assert!(e.to_string().contains("DMLC_ROLE"), "{e}");
        let mut v = vars(&[]);
        v.retain(|(k, _)| k != "DMLC_NUM_SERVER");
        let e = scheduler_config(v, None).unwrap_err();
        assert!(e.to_string().contains("DMLC_NUM_SERVER"), "{e}");
    }

    #[test]
    fn server_parses() {
        let cli = Cli::try_parse_from(["kvstore", "server", "--config", "k.toml"]).unwrap();
        assert_eq!(
            cli.command,
            Command::Server {
                config: Some("k.toml".into())
            }
        );
    }

    #[test]
    fn the_server_config_is_the_server_role() {
        let c = role_config(Role::Server, vars(&[]), None).unwrap();
        assert_eq!(c.role, Role::Server);
        assert_eq!((c.num_servers, c.num_workers, c.root_port), (1, 2, 9091));
        let c = role_config(Role::Server, vars(&[("DMLC_ROLE", "server")]), None).unwrap();
        assert_eq!(c.role, Role::Server);
        // The file's role is the one a subcommand overrides, as the default is.
        let file =
            kvstore_dist::config::DistFile::from_toml_str("[dist]\nrole = \"worker\"\n").unwrap();
        let c = role_config(Role::Server, vars(&[]), Some(&file)).unwrap();
        assert_eq!(c.role, Role::Server);
    }

    #[test]
    fn the_server_refuses_another_role_by_name() {
        for other in ["worker", "scheduler"] {
            let e = role_config(Role::Server, vars(&[("DMLC_ROLE", other)]), None).unwrap_err();
            let message = e.to_string();
            assert!(message.contains("DMLC_ROLE"), "{message}");
            assert!(message.contains("`kvstore server`"), "{message}");
            assert!(message.contains(other), "{message}");
        }
        let e = role_config(Role::Scheduler, vars(&[("DMLC_ROLE", "server")]), None).unwrap_err();
        assert!(e.to_string().contains("`kvstore scheduler`"), "{e}");
    }

    #[test]
    fn unknown_subcommands_and_a_missing_one_are_errors() {
        assert!(Cli::try_parse_from(["kvstore", "serve"]).is_err());
        assert!(Cli::try_parse_from(["kvstore"]).is_err());
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
