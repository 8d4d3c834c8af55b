//! # kvstore-cli: the `kvstore` command
//!
//! The `kvstore` binary inspects the stores a build of kvstore-rs links. It is built with
//! every backend of the `kvstore` facade enabled, so it sees every store the project provides.
//!
//! - `kvstore list` prints every registered store as a table: its name (what
//!   `kvstore::create` takes), its aliases, its capabilities and where it is registered.
//! - `kvstore scheduler` runs the scheduler role of the distributed stores, configured by
//!   MXNet's / ps-lite's variables exactly as ps-lite's scheduler process is under MXNet's
//!   launcher (`DMLC_PS_ROOT_URI`, `DMLC_PS_ROOT_PORT`, `DMLC_NUM_SERVER`, `DMLC_NUM_WORKER`,
//!   `DMLC_NODE_HOST`, `PS_VERBOSE`, `PS_HEARTBEAT_INTERVAL`, `PS_HEARTBEAT_TIMEOUT`,
//!   `KVSTORE_TIMEOUT_SECS`, `KVSTORE_MAX_MESSAGE_BYTES`; see `kvstore_dist::config`). It
//!   waits for every server and worker to register (within `KVSTORE_TIMEOUT_SECS`), serves
//!   barriers and heartbeats, and exits 0 once every node has said goodbye; otherwise it
//!   exits non-zero with the error on standard error (a missing variable, the servers or
//!   workers that never registered, the nodes that were lost). `DMLC_ROLE` may be unset or
//!   `scheduler`; any other role is refused rather than silently overridden.
//!
//! Further subcommands are planned: `server` (the server role of the distributed stores, once
//! servers serve) and `launch` (starting a whole cluster, like MXNet's `tools/launch.py`). They
//! will be added when what they need exists; until then the command offers nothing it cannot do.
//!
//! The logic lives here, in plain functions ([`render_list`], [`scheduler_config`],
//! [`run_scheduler`], [`run`]); `main.rs` only parses the command line and prints.
#![deny(missing_docs)]

use clap::{Parser, Subcommand};
use kvstore::{Capability, StoreInfo};
use kvstore_dist::{DistConfig, Role, Scheduler};

/// The command line of `kvstore`.
#[derive(Debug, Parser)]
#[command(
    name = "kvstore",
    version,
    about = "Inspect the kvstore backends this build links and run the roles of the \
             distributed stores",
    after_help = "`list` and `scheduler` exist so far; `server` and `launch` are planned and \
                  described in the documentation of the kvstore-cli crate."
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
    /// MXNet's launcher. Waits for every node to register, serves barriers and heartbeats, and
    /// exits 0 once every node has said goodbye; exits non-zero with the error (naming the
    /// missing or lost nodes) otherwise. DMLC_ROLE may be unset or `scheduler`.
    Scheduler {
        /// A `kvstore.toml` whose `[dist]` table supplies settings the environment leaves
        /// unset (the environment wins).
        #[arg(long, value_name = "PATH")]
        config: Option<std::path::PathBuf>,
    },
}

/// Runs a parsed command line and returns what to print on standard output.
///
/// `kvstore scheduler` reads the process environment (see [`run_scheduler`]).
///
/// # Errors
/// `list` cannot fail (a store whose capabilities cannot be found is listed with the reason).
/// `scheduler` fails as [`run_scheduler`] does.
pub fn run(cli: &Cli) -> kvstore::Result<String> {
    match &cli.command {
        Command::List => Ok(render_list(&kvstore::registered())),
        Command::Scheduler { config } => {
            let vars = std::env::vars_os().filter_map(|(k, v)| {
                Some((k.into_string().ok()?, v.to_string_lossy().into_owned()))
            });
            let file = config
                .as_deref()
                .map(kvstore_dist::config::DistFile::from_path)
                .transpose()
                .map_err(kvstore::Error::from)?;
            run_scheduler(&scheduler_config(vars, file.as_ref())?)?;
            Ok(String::new())
        }
    }
}

/// The scheduler's configuration from a map of environment variables (MXNet's / ps-lite's,
/// see `kvstore_dist::config`) over the `[dist]` table of an optional `kvstore.toml`: the role
/// is `scheduler` whatever `DMLC_ROLE` defaults to.
///
/// # Errors
/// [`kvstore::Error::InvalidArgument`] naming the variable when a required one is missing or
/// a value is invalid, or when `DMLC_ROLE` is set to a role other than `scheduler`.
pub fn scheduler_config<I, K, V>(
    vars: I,
    file: Option<&kvstore_dist::config::DistFile>,
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
    let mut config = match file {
        Some(file) => DistConfig::from_vars_and_file(vars.iter().cloned(), file)?,
        None => DistConfig::from_vars(vars.iter().cloned())?,
    };
    if let Some((_, role)) = vars.iter().find(|(k, _)| k == "DMLC_ROLE") {
        if config.role != Role::Scheduler {
            return Err(kvstore::Error::InvalidArgument(format!(
                "DMLC_ROLE={role:?} but `kvstore scheduler` runs the scheduler role; \
                 unset DMLC_ROLE or set it to `scheduler`"
            )));
        }
    }
    config.role = Role::Scheduler;
    Ok(config)
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
    let scheduler = Scheduler::start(config)?;
    if config.verbose > 0 {
        eprintln!(
            "kvstore scheduler: listening on {} (advertised as {}), waiting for {} server(s) \
             and {} worker(s)",
            scheduler.local_addr(),
            scheduler.addr(),
            config.num_servers,
            config.num_workers
        );
    }
    scheduler.join()?;
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
        let out = run(&cli).unwrap();
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
