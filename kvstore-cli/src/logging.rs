//! The `kvstore` command's log: what the libraries say through the `log` facade (a refused
//! connection, a lost worker, a sync round waiting on a worker, each row-sparse push under
//! `MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE`) goes to standard error, one line per record.
//!
//! The level:
//! - `KVSTORE_LOG` (or, when it is unset, `RUST_LOG`), when it names a level (`off`,
//!   `error`, `warn`, `info`, `debug`, `trace`), decides alone; a value this does not
//!   understand (such as a per-module filter) is said on standard error and ignored;
//! - otherwise the most verbose of what applies: `PS_VERBOSE` 1, `info` (connections,
//!   barriers), 2, `debug` (every message too), as ps-lite's verbosity;
//!   `MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE` 1 or `true`, `info` (where those lines are
//!   written, as MXNet's servers print them); else `warn`. The `[dist]` table's `verbose`
//!   and `row_sparse_verbose` of a `--config` file count too ([`follow_config`]).
//!
//! Libraries never install a logger: a worker program chooses its own (with `env_logger`,
//! `RUST_LOG=info` shows connections and barriers, `RUST_LOG=debug` every message).

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The level the variables ask for (see the [module docs](self)), and a note when
/// `KVSTORE_LOG`/`RUST_LOG` held something it could not read.
///
/// ```
/// use kvstore_cli::logging::level_from;
/// use log::LevelFilter;
///
/// assert_eq!(level_from(|_| None).0, LevelFilter::Warn);
/// assert_eq!(level_from(|v| (v == "PS_VERBOSE").then(|| "2".into())).0, LevelFilter::Debug);
/// ```
pub fn level_from(var: impl Fn(&str) -> Option<String>) -> (LevelFilter, Option<String>) {
    let mut note = None;
    let chosen = ["KVSTORE_LOG", "RUST_LOG"]
        .iter()
        .find_map(|name| var(name).map(|value| (*name, value)))
        .and_then(|(name, value)| match value.trim().parse::<LevelFilter>() {
            Ok(level) => Some(level),
            Err(_) => {
                note = Some(format!(
                    "{name}={value:?} is not a level (off, error, warn, info, debug, trace): \
                     ignored"
                ));
                None
            }
        });
    if let Some(level) = chosen {
        return (level, note);
    }
    let mut level = LevelFilter::Warn;
    match var("PS_VERBOSE").as_deref().map(str::trim) {
        Some("1") => level = level.max(LevelFilter::Info),
        Some(v) if v.parse::<u8>().is_ok_and(|n| n >= 2) => level = LevelFilter::Debug,
        _ => {}
    }
    let row_sparse = var("MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE");
    if matches!(
        row_sparse.as_deref().map(|v| v.trim().to_ascii_lowercase()),
        Some(v) if v == "1" || v == "true"
    ) {
        level = level.max(LevelFilter::Info);
    }
    (level, note)
}

/// Writes each record as one line on standard error: `kvstore: WARN  <message>`.
struct StderrLog;

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = match record.level() {
                Level::Error => "ERROR",
                Level::Warn => "WARN ",
                Level::Info => "INFO ",
                Level::Debug => "DEBUG",
                Level::Trace => "TRACE",
            };
            // One write per record: lines of several threads never interleave.
            to_stderr(format_args!("kvstore: {level} {}", record.args()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog;

/// Writes `line` and a newline to standard error in one write, ignoring failures: a closed
/// or broken standard error (the reader of a pipe gone, an ssh session ended) must not stop
/// a launcher or a server, where `eprintln!` would panic.
pub fn to_stderr(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let text = format!("{line}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Whether [`install`] installed this module's logger (else the level is not ours to raise).
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `KVSTORE_LOG`/`RUST_LOG` chose the level (which the configuration then leaves).
static CHOSEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Raises the level to what a role's configuration asks (`verbose`, `row_sparse_verbose`,
/// from the environment or a `kvstore.toml`), unless `KVSTORE_LOG`/`RUST_LOG` chose it.
pub fn follow_config(config: &kvstore_dist::DistConfig) {
    let ours = INSTALLED.load(std::sync::atomic::Ordering::Relaxed);
    if !ours || CHOSEN.load(std::sync::atomic::Ordering::Relaxed) {
        return; // another logger's level, or the one KVSTORE_LOG/RUST_LOG chose
    }
    let wanted = match config.verbose {
        0 if config.row_sparse_verbose => LevelFilter::Info,
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        _ => LevelFilter::Debug,
    };
    if wanted > log::max_level() {
        log::set_max_level(wanted);
    }
}

/// Installs the standard-error log at the level of this process's environment
/// ([`level_from`]). Does nothing if a logger is already installed.
pub fn install() {
    let (level, note) = level_from(|name| std::env::var(name).ok());
    let chosen = ["KVSTORE_LOG", "RUST_LOG"]
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .is_some_and(|value| value.trim().parse::<LevelFilter>().is_ok());
    CHOSEN.store(chosen, std::sync::atomic::Ordering::Relaxed);
    if log::set_logger(&LOGGER).is_ok() {
        INSTALLED.store(true, std::sync::atomic::Ordering::Relaxed);
        log::set_max_level(level);
        if let Some(note) = note {
            to_stderr(format_args!("kvstore: {note}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(vars: &[(&str, &str)]) -> (LevelFilter, Option<String>) {
        level_from(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_level_follows_the_variables() {
        assert_eq!(level(&[]), (LevelFilter::Warn, None));
        assert_eq!(level(&[("PS_VERBOSE", "1")]).0, LevelFilter::Info);
        assert_eq!(level(&[("PS_VERBOSE", "2")]).0, LevelFilter::Debug);
        assert_eq!(level(&[("PS_VERBOSE", "0")]).0, LevelFilter::Warn);
        assert_eq!(
            level(&[("MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE", "true")]).0,
            LevelFilter::Info
        );
        assert_eq!(level(&[("RUST_LOG", "error")]).0, LevelFilter::Error);
        // KVSTORE_LOG wins over RUST_LOG, and either over PS_VERBOSE.
        assert_eq!(
            level(&[("RUST_LOG", "error"), ("KVSTORE_LOG", "trace")]).0,
            LevelFilter::Trace
        );
        assert_eq!(
            level(&[("KVSTORE_LOG", "off"), ("PS_VERBOSE", "2")]).0,
            LevelFilter::Off
        );
        let (l, note) = level(&[("RUST_LOG", "kvstore_dist=debug")]);
        assert_eq!(l, LevelFilter::Warn);
        assert!(note.unwrap().contains("RUST_LOG"));
    }
}
