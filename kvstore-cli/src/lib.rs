//! # kvstore-cli: the `kvstore` command
//!
//! The `kvstore` binary inspects the stores a build of kvstore-rs links. It is built with
//! every backend of the `kvstore` facade enabled, so it sees every store the project provides.
//!
//! - `kvstore list` prints every registered store as a table: its name (what
//!   `kvstore::create` takes), its aliases, its capabilities and where it is registered.
//!
//! Only `list` exists so far. Further subcommands are planned for the backends that need a
//! process of their own (the server and scheduler roles of the distributed stores); they will
//! be added when those backends exist, and until then the command offers nothing it cannot do.
//!
//! The logic lives here, in plain functions over the registry's [`StoreInfo`]s
//! ([`render_list`], [`run`]); `main.rs` only parses the command line and prints.
#![deny(missing_docs)]

use clap::{Parser, Subcommand};
use kvstore::{Capability, StoreInfo};

/// The command line of `kvstore`.
#[derive(Debug, Parser)]
#[command(
    name = "kvstore",
    version,
    about = "Inspect the kvstore backends this build links",
    after_help = "Only `list` exists so far; further subcommands are planned and described in \
                  the documentation of the kvstore-cli crate."
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
}

/// Runs a parsed command line and returns what to print on standard output.
///
/// # Errors
/// None today: listing the registry cannot fail (a store whose capabilities cannot be found
/// is listed with the reason). Later subcommands will report their errors here.
pub fn run(cli: &Cli) -> kvstore::Result<String> {
    match cli.command {
        Command::List => Ok(render_list(&kvstore::registered())),
    }
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
