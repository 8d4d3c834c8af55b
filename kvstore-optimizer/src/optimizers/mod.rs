//! The optimizers, one module each. Every module registers its optimizer by name.

use kvstore_base::{OptimizerSpec, Result};

use crate::base::{Base, LrDefault, BASE_PARAMS};
use crate::params::Params;

mod adadelta;
mod adagrad;
mod adam;
mod adamax;
mod adamw;
mod dcasgd;
mod ftml;
mod ftrl;
mod groupadagrad;
mod lamb;
mod lars;
mod nadam;
mod nag;
mod rmsprop;
mod sgd;
mod signum;
mod test;

/// Weight-decay name suffixes of MXNet's base `set_wd_mult`.
pub(crate) const WEIGHT_OR_GAMMA: &[&str] = &["_weight", "_gamma"];

/// Starts reading `spec`: its hyper-parameters and the base parameters.
pub(crate) fn begin<'a>(
    spec: &'a OptimizerSpec,
    lr_default: LrDefault,
    wd_suffixes: &[&str],
) -> Result<(Params<'a>, Base)> {
    let mut p = Params::new(format!("optimizer {:?}", spec.name), &spec.params);
    let base = Base::parse(spec, &mut p, lr_default, wd_suffixes)?;
    Ok((p, base))
}

/// Ends reading: rejects unknown names, listing the base and `extra` ones.
pub(crate) fn end(p: Params<'_>, extra: &[&str]) -> Result<()> {
    let accepted: Vec<&str> = BASE_PARAMS.iter().chain(extra.iter()).copied().collect();
    p.finish(&accepted)
}

/// Registers an optimizer constructor under a name.
macro_rules! register {
    ($item:ident, $name:literal, $summary:literal, $build:path) => {
        #[linkme::distributed_slice(crate::registry::OPTIMIZERS)]
        static $item: crate::registry::OptimizerEntry = crate::registry::OptimizerEntry {
            name: $name,
            summary: $summary,
            build: $build,
        };
    };
}
pub(crate) use register;

/// The `name`, `base` and `base_mut` methods of an optimizer with a `base` field.
macro_rules! common {
    ($name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn base(&self) -> &crate::base::Base {
            &self.base
        }
        fn base_mut(&mut self) -> &mut crate::base::Base {
            &mut self.base
        }
    };
}
pub(crate) use common;
