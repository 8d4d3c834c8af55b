//! The conformance suite: one plain function per behaviour, run against any store.
//!
//! Each [`Check`] names a behaviour as a claim (`pushpull_sums_device_values_into_every_out`),
//! lists the capabilities it needs, and runs against a [`StoreFactory`], building fresh stores
//! as it goes. [`trials`] turns the checks into `libtest-mimic` trials, marking as ignored (with
//! the reason) those a store cannot run; [`run_conformance`] runs them as a test binary.
//!
//! Distributed stores also run the checks of [`multi`], which need several workers of one job
//! at once.

mod broadcast;
mod differential;
mod errors;
mod identity;
mod keyvalue;
pub mod multi;
mod optimizer;
mod pushpull;
mod sparse;
mod updater;

use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;

use kvstore_base::{Capability, Error, KVStoreBase, Result};
use libtest_mimic::{Arguments, Failed, Trial};

/// Builds a fresh store of the backend under test.
pub type StoreFactory = dyn Fn() -> Result<Box<dyn KVStoreBase>> + Send + Sync;

/// Why a check failed.
#[derive(Debug)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure(format!("unexpected error: {e}"))
    }
}

/// The outcome of a check.
pub type CheckResult = std::result::Result<(), Failure>;

/// One behaviour of the contract, checked against a store factory.
#[derive(Clone, Copy)]
pub struct Check {
    /// The behaviour, phrased as a claim.
    pub name: &'static str,
    /// Capabilities the store needs for the check to apply.
    pub requires: &'static [Capability],
    /// Runs the check.
    pub run: fn(&StoreFactory) -> CheckResult,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .field("requires", &self.requires)
            .finish()
    }
}

/// Fails the check with a formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err($crate::suite::Failure(format!($($msg)+)));
        }
    };
}
pub(crate) use ensure;

/// Every check of the suite.
pub const CHECKS: &[&[Check]] = &[
    identity::CHECKS,
    broadcast::CHECKS,
    pushpull::CHECKS,
    errors::CHECKS,
    keyvalue::CHECKS,
    optimizer::CHECKS,
    updater::CHECKS,
    sparse::CHECKS,
    differential::CHECKS,
];

/// The dtypes the stores under test may refuse (see [`allow_refused_dtypes`]).
static REFUSABLE_DTYPES: std::sync::OnceLock<&'static [kvstore_base::DType]> =
    std::sync::OnceLock::new();

/// Declares, for this test binary, dtypes its stores may refuse with
/// [`Error::Unsupported`] when a key of them is initialised (say, a store whose servers cannot
/// hold them exactly; float32 cannot be one); the dtype checks then skip those dtypes for a
/// store that refuses them, and still require that its pushes of them fail; the differential
/// check leaves them out. Without this call every dtype must work.
/// Call it before the suite runs; a second call changes nothing.
pub fn allow_refused_dtypes(dtypes: &'static [kvstore_base::DType]) {
    let _ = REFUSABLE_DTYPES.set(dtypes);
}

/// Whether a store may refuse `dtype` ([`allow_refused_dtypes`]); never float32, which every
/// store takes.
pub(crate) fn may_refuse(dtype: kvstore_base::DType) -> bool {
    dtype != kvstore_base::DType::F32
        && REFUSABLE_DTYPES
            .get()
            .is_some_and(|dtypes| dtypes.contains(&dtype))
}

/// The checks as trials named `<label>::<check>`: a check needing a capability the store
/// lacks, or every check when the store cannot exist on this machine (a [`Error::Device`]
/// from the factory: no GPU, no driver), is marked ignored with the reason as its kind. Any
/// other factory error (an unknown store name: the crate was not linked) fails every check.
pub fn trials(label: &str, factory: Arc<StoreFactory>) -> Vec<Trial> {
    let probe = factory();
    if let Err(e) = &probe {
        if !matches!(e, Error::Device(_)) {
            let message = format!("the store factory failed: {e}");
            return CHECKS
                .iter()
                .flat_map(|group| group.iter())
                .map(|check| {
                    let message = message.clone();
                    Trial::test(format!("{label}::{}", check.name), move || {
                        Err(message.into())
                    })
                })
                .collect();
        }
    }
    CHECKS
        .iter()
        .flat_map(|group| group.iter())
        .map(|check| {
            let name = format!("{label}::{}", check.name);
            let skip_reason = match &probe {
                Err(e) => Some(format!("store unavailable: {e}")),
                Ok(store) => check
                    .requires
                    .iter()
                    .find(|&&c| !store.is_capable(c))
                    .map(|c| format!("needs {c}")),
            };
            let factory = Arc::clone(&factory);
            let run = check.run;
            let trial = Trial::test(name, move || run(&*factory).map_err(|f| Failed::from(f.0)));
            match skip_reason {
                Some(reason) => trial.with_kind(reason).with_ignored_flag(true),
                None => trial,
            }
        })
        .collect()
}

/// Runs every check against the stores `factory` builds, as a test binary (see
/// [`conformance_tests!`](crate::conformance_tests)), and returns the exit code.
pub fn run_conformance<F>(factory: F) -> ExitCode
where
    F: Fn() -> Result<Box<dyn KVStoreBase>> + Send + Sync + 'static,
{
    let args = Arguments::from_args();
    let factory: Arc<StoreFactory> = Arc::new(factory);
    let label = match factory() {
        Ok(store) => store.type_name().to_string(),
        Err(_) => "unavailable".to_string(),
    };
    libtest_mimic::run(&args, trials(&label, factory)).exit_code()
}

/// Helpers shared by the checks.
pub(crate) mod util {
    use kvstore_base::{DType, Error, NDArray};

    use super::{Failure, StoreFactory};

    pub fn store(factory: &StoreFactory) -> Result<Box<dyn kvstore_base::KVStoreBase>, Failure> {
        factory().map_err(|e| Failure(format!("the factory failed: {e}")))
    }

    /// For stores that keep values (which, as MXNet's, refuse to push to a key never
    /// initialised), initialises `key` with zeros of `shape` and `dtype`; other stores need
    /// nothing.
    pub fn declare(
        kv: &dyn kvstore_base::KVStoreBase,
        key: impl Into<kvstore_base::Key>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<(), Failure> {
        use kvstore_base::KVStoreExt;
        if kv.is_capable(kvstore_base::Capability::InitPushPull) {
            kv.init(key.into(), &NDArray::zeros(shape, dtype))?;
        }
        Ok(())
    }

    pub fn f32s(shape: &[usize], data: &[f32]) -> NDArray {
        NDArray::from_vec(shape, data.to_vec()).expect("shape matches data")
    }

    pub fn filled(shape: &[usize], value: f64) -> NDArray {
        NDArray::full(shape, value, DType::F32)
    }

    /// Checks that every element of `array` equals `expected` (compared as f64).
    pub fn expect_all(array: &NDArray, expected: f64, what: &str) -> Result<(), Failure> {
        let values = array.to_f64_vec();
        match values.iter().position(|&v| v != expected) {
            None => Ok(()),
            Some(i) => Err(Failure(format!(
                "{what}: element {i} is {} but {expected} was expected (all: {values:?})",
                values[i]
            ))),
        }
    }

    /// Checks that `result` is an error whose root matches `pred`, and whose message
    /// contains every string of `mentions`.
    pub fn expect_error<T>(
        result: kvstore_base::Result<T>,
        what: &str,
        pred: impl Fn(&Error) -> bool,
        mentions: &[&str],
    ) -> Result<(), Failure> {
        let err = match result {
            Ok(_) => return Err(Failure(format!("{what}: expected an error, got Ok"))),
            Err(e) => e,
        };
        if !pred(err.root()) {
            return Err(Failure(format!("{what}: unexpected kind of error: {err}")));
        }
        let text = err.to_string();
        for m in mentions {
            if !text.contains(m) {
                return Err(Failure(format!(
                    "{what}: the error does not mention {m:?}: {text}"
                )));
            }
        }
        Ok(())
    }
}
