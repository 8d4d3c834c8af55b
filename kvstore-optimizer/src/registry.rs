//! The optimizer registry: names to constructors, collected at link time.

use kvstore_base::{Error, OptimizerSpec, Result};
use linkme::distributed_slice;

use crate::optimizer::Optimizer;

/// One registered optimizer: its name and the function that builds it from a spec.
///
/// Optimizers register themselves with `#[distributed_slice(OPTIMIZERS)]`, so linking the
/// crate that defines one is all it takes for [`create`] to find it.
pub struct OptimizerEntry {
    /// The lower-case name a spec uses.
    pub name: &'static str,
    /// One line for listings.
    pub summary: &'static str,
    /// Builds the optimizer; rejects unknown or ill-typed hyper-parameters.
    pub build: fn(&OptimizerSpec) -> Result<Box<dyn Optimizer>>,
}

/// Every optimizer linked into the program.
#[distributed_slice]
pub static OPTIMIZERS: [OptimizerEntry];

/// The names of every registered optimizer, sorted.
///
/// ```
/// let names = kvstore_optimizer::optimizer_names();
/// assert!(names.contains(&"sgd") && names.contains(&"adam"));
/// ```
pub fn optimizer_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = OPTIMIZERS.iter().map(|e| e.name).collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Builds the optimizer `spec` names (case-insensitively) with its hyper-parameters.
///
/// ```
/// use kvstore_base::OptimizerSpec;
/// let opt = kvstore_optimizer::create(&OptimizerSpec::new("sgd").with("momentum", 0.9)).unwrap();
/// assert_eq!(opt.name(), "sgd");
/// let err = kvstore_optimizer::create(&OptimizerSpec::new("sgdd")).unwrap_err();
/// assert!(err.to_string().contains("known optimizers"));
/// ```
///
/// # Errors
/// [`Error::InvalidArgument`] for an unknown name (listing the known ones) or an unknown,
/// ill-typed or out-of-range hyper-parameter (naming it).
pub fn create(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let name = spec.name.to_ascii_lowercase();
    let matches: Vec<&OptimizerEntry> = OPTIMIZERS.iter().filter(|e| e.name == name).collect();
    match matches.as_slice() {
        [entry] => (entry.build)(spec),
        [] => Err(Error::InvalidArgument(format!(
            "cannot find optimizer {:?}; known optimizers: {}",
            spec.name,
            optimizer_names().join(", ")
        ))),
        _ => Err(Error::InvalidArgument(format!(
            "optimizer {name:?} is registered more than once"
        ))),
    }
}
