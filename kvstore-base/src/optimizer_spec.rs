//! A serialisable description of an optimizer: what `set_optimizer` receives.
//!
//! Stores rebuild the optimizer from its name and hyper-parameters through an optimizer
//! registry, so a description can cross a network without carrying code (MXNet pickles the
//! Python object; this never executes anything it receives).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A hyper-parameter value: numbers, flags, strings, and lists or maps of them (for example a
/// learning-rate schedule or per-parameter multipliers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<ParamValue>),
    /// A map from names to values.
    Map(BTreeMap<String, ParamValue>),
}

impl ParamValue {
    /// The value as a number, for `Int` and `Float`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            ParamValue::Int(i) => Some(*i as f64),
            ParamValue::Float(f) => Some(*f),
            _ => None,
        }
    }
}

impl From<f64> for ParamValue {
    fn from(v: f64) -> Self {
        ParamValue::Float(v)
    }
}

impl From<i64> for ParamValue {
    fn from(v: i64) -> Self {
        ParamValue::Int(v)
    }
}

impl From<bool> for ParamValue {
    fn from(v: bool) -> Self {
        ParamValue::Bool(v)
    }
}

impl From<&str> for ParamValue {
    fn from(v: &str) -> Self {
        ParamValue::Str(v.to_string())
    }
}

/// An optimizer by name (`sgd`, `adam`, ...) with its hyper-parameters.
///
/// ```
/// use kvstore_base::OptimizerSpec;
/// let spec = OptimizerSpec::new("sgd").with("learning_rate", 0.1).with("momentum", 0.9);
/// assert_eq!(spec.name, "sgd");
/// assert_eq!(spec.params["momentum"].as_f64(), Some(0.9));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerSpec {
    /// The registered optimizer name, lower case.
    pub name: String,
    /// Hyper-parameters by MXNet's names (`learning_rate`, `wd`, `rescale_grad`, ...).
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
}

impl OptimizerSpec {
    /// An optimizer with default hyper-parameters.
    pub fn new(name: &str) -> Self {
        OptimizerSpec {
            name: name.to_lowercase(),
            params: BTreeMap::new(),
        }
    }

    /// Sets one hyper-parameter.
    pub fn with(mut self, param: &str, value: impl Into<ParamValue>) -> Self {
        self.params.insert(param.to_string(), value.into());
        self
    }
}
