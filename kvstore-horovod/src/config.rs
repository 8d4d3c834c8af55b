//! [`HorovodConfig`]: the rendezvous (`DMLC_*`, as the dist stores) and Horovod's own knobs.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `DMLC_PS_ROOT_URI`, `DMLC_PS_ROOT_PORT`, `DMLC_NUM_WORKER`, `DMLC_ROLE`, `DMLC_NODE_HOST`, `DMLC_INTERFACE`, `PORT`, `KVSTORE_TIMEOUT_SECS`, ... | as `kvstore_dist::config` | the scheduler to meet at, the job's size, this worker's address, the bound on every network wait |
//! | `DMLC_NUM_SERVER` | 0 | servers take no part; `0` (or unset) is accepted here, unlike the dist stores |
//! | `HOROVOD_FUSION_THRESHOLD` | 64 MiB | largest fused buffer in bytes; `0` turns fusion off |
//! | `HOROVOD_CYCLE_TIME` | 1 ms | milliseconds (fractions allowed) between the starts of two cycles: the tensors that the worker's threads submit within one cycle are sent to the coordinator together, and so can be fused; `0`: no waiting; at most one hour, and shorter than the stall time |
//! | `HOROVOD_STALL_CHECK_TIME_SECONDS` | 60 s | how long a tensor submitted by some ranks waits for the others before a warning (level `warn`) names the missing ranks, as Horovod's stall check |
//! | `HOROVOD_STALL_CHECK_DISABLE` | unset | `1` (or `true`): no stall warnings |
//! | `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS` | `KVSTORE_TIMEOUT_SECS` (600 s) | how long such a tensor waits before the ranks that submitted it get an error naming the missing ranks; `0` (Horovod's "never") is the timeout too: nothing waits forever |
//!
//! Horovod's variables are read from the environment (or the create options) only; the
//! `[dist]` table of `kvstore.toml` holds the rendezvous settings.

use std::collections::HashMap;
use std::time::Duration;

use kvstore_base::{CreateRequest, Error, Result};
use kvstore_dist::{DistConfig, DistFile};

/// Horovod's default fusion threshold in the releases this store follows (64 MiB).
pub const DEFAULT_FUSION_THRESHOLD: u64 = 64 * 1024 * 1024;

/// Horovod's default cycle time (1 ms, as in current Horovod; older releases used 5 ms).
pub const DEFAULT_CYCLE_TIME: Duration = Duration::from_millis(1);

/// The longest accepted `HOROVOD_CYCLE_TIME`: one hour, in milliseconds.
pub const MAX_CYCLE_TIME_MS: f64 = 3_600_000.0;

/// The variable naming a `kvstore.toml` whose `[dist]` table is read under the environment.
pub const CONFIG_VAR: &str = "KVSTORE_CONFIG";

/// The configuration of one `horovod` worker.
#[derive(Debug, Clone, PartialEq)]
pub struct HorovodConfig {
    /// The rendezvous and transport settings (`DMLC_*`, `KVSTORE_*`).
    pub dist: DistConfig,
    /// `HOROVOD_FUSION_THRESHOLD`: the largest fused buffer in bytes (0: no fusion).
    pub fusion_threshold: u64,
    /// `HOROVOD_CYCLE_TIME`: the least time between the starts of two cycles (zero: none).
    pub cycle_time: Duration,
    /// `HOROVOD_STALL_CHECK_TIME_SECONDS` (60 s by default): when a tensor some ranks wait
    /// with is logged as stalled; `None` with `HOROVOD_STALL_CHECK_DISABLE`.
    pub stall_warning: Option<Duration>,
    /// `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`, else the store's timeout: when such a tensor
    /// fails on the ranks that submitted it.
    pub stall_shutdown: Duration,
}

/// Horovod's default `HOROVOD_STALL_CHECK_TIME_SECONDS`.
pub const DEFAULT_STALL_WARNING: Duration = Duration::from_secs(60);

/// A number of seconds from `vars[name]`: `None` when unset; `Some(None)` for `0` when
/// `zero_allowed`.
fn seconds(
    vars: &HashMap<String, String>,
    name: &str,
    zero_allowed: bool,
) -> Result<Option<Option<Duration>>> {
    let Some(v) = vars.get(name) else {
        return Ok(None);
    };
    match v.trim().parse::<f64>() {
        Ok(s) if s == 0.0 && zero_allowed => Ok(Some(None)),
        Ok(s) if s.is_finite() && s > 0.0 && s <= 365.0 * 86400.0 => {
            Ok(Some(Some(Duration::from_secs_f64(s))))
        }
        _ => Err(Error::InvalidArgument(format!(
            "horovod: {name}={v:?} is not a positive number of seconds (at most a year)"
        ))),
    }
}

impl HorovodConfig {
    /// Parses `vars` (environment variables or create options) over the `[dist]` table of the
    /// `kvstore.toml` that `KVSTORE_CONFIG` names, if any.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the variable and the value.
    pub fn from_vars<I, K, V>(vars: I) -> Result<HorovodConfig>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut vars: HashMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let invalid =
            |e: kvstore_dist::ConfigError| Error::InvalidArgument(format!("horovod: {e}"));
        let file = match vars.get(CONFIG_VAR) {
            Some(path) => DistFile::from_path(std::path::Path::new(path)).map_err(invalid)?,
            None => DistFile::default(),
        };
        // Servers take no part: 0 (or nothing) is accepted, as by the scheduler of such a job.
        if !vars.contains_key("DMLC_NUM_SERVER") && file.num_server.is_none() {
            vars.insert("DMLC_NUM_SERVER".into(), "0".into());
        }
        let dist =
            DistConfig::scheduler_from_vars_and_file(vars.clone(), &file).map_err(invalid)?;
        let fusion_threshold = match vars.get("HOROVOD_FUSION_THRESHOLD") {
            Some(v) => v.trim().parse::<u64>().map_err(|_| {
                Error::InvalidArgument(format!(
                    "horovod: HOROVOD_FUSION_THRESHOLD={v:?} is not a whole number of bytes"
                ))
            })?,
            None => DEFAULT_FUSION_THRESHOLD,
        };
        let cycle_time = match vars.get("HOROVOD_CYCLE_TIME") {
            Some(v) => match v.trim().parse::<f64>() {
                Ok(ms) if ms.is_finite() && (0.0..=MAX_CYCLE_TIME_MS).contains(&ms) => {
                    Duration::from_secs_f64(ms / 1000.0)
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "horovod: HOROVOD_CYCLE_TIME={v:?} is not a number of milliseconds \
                         from 0 to {MAX_CYCLE_TIME_MS}"
                    )))
                }
            },
            None => DEFAULT_CYCLE_TIME,
        };
        let disabled = vars
            .get("HOROVOD_STALL_CHECK_DISABLE")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"));
        let stall_warning = match seconds(&vars, "HOROVOD_STALL_CHECK_TIME_SECONDS", false)? {
            _ if disabled => None,
            Some(warning) => warning,
            None => Some(DEFAULT_STALL_WARNING),
        };
        let stall_shutdown = seconds(&vars, "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", true)?
            .flatten()
            .unwrap_or(dist.timeout);
        if !cycle_time.is_zero() && cycle_time >= stall_shutdown {
            return Err(Error::InvalidArgument(format!(
                "horovod: HOROVOD_CYCLE_TIME={:?} must be shorter than the stall shutdown time \
                 ({stall_shutdown:?}, HOROVOD_STALL_SHUTDOWN_TIME_SECONDS or \
                 KVSTORE_TIMEOUT_SECS): a tensor waiting for a cycle would fail as stalled",
                vars.get("HOROVOD_CYCLE_TIME").map_or("", String::as_str)
            )));
        }
        Ok(HorovodConfig {
            dist,
            fusion_threshold,
            cycle_time,
            stall_warning,
            stall_shutdown,
        })
    }

    /// The process environment, each variable overridden by a create option of the same name.
    ///
    /// # Errors
    /// As [`HorovodConfig::from_vars`].
    pub fn from_request(request: &CreateRequest) -> Result<HorovodConfig> {
        HorovodConfig::from_vars(kvstore_dist::config::request_vars(&request.options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("DMLC_PS_ROOT_URI", "127.0.0.1"),
            ("DMLC_PS_ROOT_PORT", "9000"),
            ("DMLC_NUM_WORKER", "2"),
        ]
    }

    #[test]
    fn servers_default_to_none_and_horovod_defaults_apply() {
        let c = HorovodConfig::from_vars(base()).unwrap();
        assert_eq!(c.dist.num_servers, 0);
        assert_eq!(c.fusion_threshold, DEFAULT_FUSION_THRESHOLD);
        assert_eq!(c.stall_shutdown, c.dist.timeout);
        assert_eq!(c.stall_warning, Some(DEFAULT_STALL_WARNING));
        assert_eq!(c.cycle_time, DEFAULT_CYCLE_TIME);
        let mut v = base();
        v.push(("DMLC_NUM_SERVER", "0"));
        v.push(("HOROVOD_FUSION_THRESHOLD", "0"));
        v.push(("HOROVOD_STALL_CHECK_TIME_SECONDS", "1.5"));
        v.push(("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "7"));
        v.push(("HOROVOD_CYCLE_TIME", "2.5"));
        let c = HorovodConfig::from_vars(v).unwrap();
        assert_eq!(c.cycle_time, Duration::from_micros(2500));
        assert_eq!(c.dist.num_servers, 0);
        assert_eq!(c.fusion_threshold, 0);
        assert_eq!(c.stall_warning, Some(Duration::from_millis(1500)));
        assert_eq!(c.stall_shutdown, Duration::from_secs(7));
        let mut v = base();
        v.push(("HOROVOD_STALL_CHECK_DISABLE", "1"));
        v.push(("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "0"));
        let c = HorovodConfig::from_vars(v).unwrap();
        assert_eq!((c.stall_warning, c.stall_shutdown), (None, c.dist.timeout));
        let mut v = base();
        v.push(("HOROVOD_STALL_CHECK_TIME_SECONDS", "0"));
        let e = HorovodConfig::from_vars(v).unwrap_err().to_string();
        assert!(e.contains("HOROVOD_STALL_CHECK_TIME_SECONDS"), "{e}");
        let mut v = base();
        v.push(("DMLC_NUM_SERVER", "1"));
        assert_eq!(HorovodConfig::from_vars(v).unwrap().dist.num_servers, 1);
        let mut v = base();
        v.push(("DMLC_NUM_SERVER", "00"));
        assert_eq!(HorovodConfig::from_vars(v).unwrap().dist.num_servers, 0);
        // A kvstore.toml saying 0 servers.
        let file =
            std::env::temp_dir().join(format!("kvstore-horovod-{}.toml", std::process::id()));
        std::fs::write(&file, "[dist]\nnum_server = 0\n").unwrap();
        let path = file.display().to_string();
        let mut v = base();
        v.push(("KVSTORE_CONFIG", path.as_str()));
        let c = HorovodConfig::from_vars(v);
        std::fs::remove_file(&file).unwrap();
        assert_eq!(c.unwrap().dist.num_servers, 0);
        let mut v = base();
        v.push(("HOROVOD_CYCLE_TIME", " 0 "));
        assert_eq!(
            HorovodConfig::from_vars(v).unwrap().cycle_time,
            Duration::ZERO
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("HOROVOD_FUSION_THRESHOLD", "lots"),
            ("HOROVOD_STALL_CHECK_TIME_SECONDS", "-1"),
            ("HOROVOD_CYCLE_TIME", "-1"),
            ("HOROVOD_CYCLE_TIME", "soon"),
            ("HOROVOD_CYCLE_TIME", "NaN"),
            ("HOROVOD_CYCLE_TIME", "inf"),
            ("HOROVOD_CYCLE_TIME", "1e12"),
            ("HOROVOD_CYCLE_TIME", "600000"),
        ] {
            let mut v = base();
            v.push((var, value));
            let e = HorovodConfig::from_vars(v).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains(value), "{e}");
        }
    }
}
