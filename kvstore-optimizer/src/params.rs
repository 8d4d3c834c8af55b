//! Typed, checked reading of hyper-parameter maps.
//!
//! Every reader records which names it consumed; [`Params::finish`] rejects the names nobody
//! asked for, so a misspelt hyper-parameter is an error instead of being silently ignored.

use std::collections::{BTreeMap, BTreeSet};

use kvstore_base::{Error, ParamValue, Result};

/// A hyper-parameter map being read by one optimizer or scheduler.
#[derive(Debug)]
pub(crate) struct Params<'a> {
    /// What is being configured, for error messages (`optimizer "sgd"`).
    owner: String,
    map: &'a BTreeMap<String, ParamValue>,
    used: BTreeSet<&'a str>,
}

fn kind(value: &ParamValue) -> &'static str {
    match value {
        ParamValue::Bool(_) => "a bool",
        ParamValue::Int(_) => "an integer",
        ParamValue::Float(_) => "a float",
        ParamValue::Str(_) => "a string",
        ParamValue::List(_) => "a list",
        ParamValue::Map(_) => "a map",
    }
}

impl<'a> Params<'a> {
    pub(crate) fn new(owner: impl Into<String>, map: &'a BTreeMap<String, ParamValue>) -> Self {
        Params {
            owner: owner.into(),
            map,
            used: BTreeSet::new(),
        }
    }

    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    /// An error about hyper-parameter `name`.
    pub(crate) fn bad(&self, name: &str, why: impl std::fmt::Display) -> Error {
        Error::InvalidArgument(format!("{}: hyper-parameter {name:?} {why}", self.owner))
    }

    /// The raw value of `name`, marking it used.
    pub(crate) fn raw(&mut self, name: &str) -> Option<&'a ParamValue> {
        let (key, value) = self.map.get_key_value(name)?;
        self.used.insert(key.as_str());
        Some(value)
    }

    /// A number (int or float), if present.
    pub(crate) fn opt_f64(&mut self, name: &str) -> Result<Option<f64>> {
        match self.raw(name) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                Some(x) => Err(self.bad(name, format!("must be finite, got {x}"))),
                None => Err(self.bad(name, format!("must be a number, got {}", kind(v)))),
            },
        }
    }

    /// A number with a default.
    pub(crate) fn f64_or(&mut self, name: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(name)?.unwrap_or(default))
    }

    /// An integer, if present (floats are rejected, as MXNet asserts `int`).
    pub(crate) fn opt_i64(&mut self, name: &str) -> Result<Option<i64>> {
        match self.raw(name) {
            None => Ok(None),
            Some(ParamValue::Int(i)) => Ok(Some(*i)),
            Some(v) => Err(self.bad(name, format!("must be an integer, got {}", kind(v)))),
        }
    }

    /// A flag with a default.
    pub(crate) fn bool_or(&mut self, name: &str, default: bool) -> Result<bool> {
        match self.raw(name) {
            None => Ok(default),
            Some(ParamValue::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(name, format!("must be a bool, got {}", kind(v)))),
        }
    }

    /// A string, if present.
    pub(crate) fn opt_str(&mut self, name: &str) -> Result<Option<&'a str>> {
        match self.raw(name) {
            None => Ok(None),
            Some(ParamValue::Str(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad(name, format!("must be a string, got {}", kind(v)))),
        }
    }

    /// A map from names to numbers (`lr_mult`, `wd_mult`), empty when absent.
    pub(crate) fn number_map(&mut self, name: &str) -> Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        match self.raw(name) {
            None => {}
            Some(ParamValue::Map(m)) => {
                for (k, v) in m {
                    match v.as_f64() {
                        Some(x) if x.is_finite() => {
                            out.insert(k.clone(), x);
                        }
                        Some(x) => {
                            return Err(
                                self.bad(name, format!("entry {k:?} must be finite, got {x}"))
                            )
                        }
                        None => {
                            return Err(self.bad(
                                name,
                                format!("entry {k:?} must be a number, got {}", kind(v)),
                            ))
                        }
                    }
                }
            }
            Some(v) => return Err(self.bad(name, format!("must be a map, got {}", kind(v)))),
        }
        Ok(out)
    }

    /// A map from names to strings (`param_idx2name`), empty when absent.
    pub(crate) fn string_map(&mut self, name: &str) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        match self.raw(name) {
            None => {}
            Some(ParamValue::Map(m)) => {
                for (k, v) in m {
                    match v {
                        ParamValue::Str(s) => {
                            out.insert(k.clone(), s.clone());
                        }
                        other => {
                            return Err(self.bad(
                                name,
                                format!("entry {k:?} must be a string, got {}", kind(other)),
                            ))
                        }
                    }
                }
            }
            Some(v) => {
                return Err(self.bad(
                    name,
                    format!(
                        "should be a dict of param indexes to names (a map), got {}",
                        kind(v)
                    ),
                ))
            }
        }
        Ok(out)
    }

    /// Fails on every name that was not read, listing the accepted ones.
    pub(crate) fn finish(self, accepted_hint: &[&str]) -> Result<()> {
        let unknown: Vec<&str> = self
            .map
            .keys()
            .map(String::as_str)
            .filter(|k| !self.used.contains(k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "{}: unknown hyper-parameter{} {}; accepted: {}",
            self.owner,
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            accepted_hint.join(", ")
        )))
    }
}
