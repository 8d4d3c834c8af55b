//! # kvstore-test: MXNet's TestStore and the conformance suite
//!
//! Two things every backend needs to be trusted:
//!
//! - [`TestStore`], registered as `teststore`: MXNet's reference store, exactly as
//!   `mxnet.kvstore.base.TestStore` behaves, and the oracle other stores are compared with.
//! - The conformance suite ([`suite`]): plain functions over a store factory, each asserting
//!   one behaviour users rely on. [`conformance_tests!`] turns them into a test binary for any
//!   backend crate; checks a store cannot run (a capability it lacks, a GPU that is absent) are
//!   reported as *ignored* with the reason, never as passed.
//!
//! A backend crate runs the suite with a test target declared `harness = false`:
//!
//! ```toml
//! [[test]]
//! name = "conformance"
//! harness = false
//! ```
//!
//! and, in `tests/conformance.rs`, the crate linked (its registration is what `create` finds)
//! and one line:
//!
//! ```no_run
//! # use kvstore_test as my_store;
//! use my_store as _;
//! kvstore_test::conformance_tests!(|| kvstore_base::create("mystore"));
//! ```
#![deny(missing_docs)]

pub mod suite;
mod teststore;

pub use suite::{run_conformance, trials, Check, CheckResult, Failure, StoreFactory, CHECKS};
pub use teststore::{TestStore, NAME};

/// Expands to the `main` of a conformance test binary (`harness = false`) that runs every
/// check of the suite against the stores `factory` builds.
///
/// `factory` is a closure `Fn() -> kvstore_base::Result<Box<dyn KVStoreBase>>`, called once
/// per check so that every check starts from a fresh store.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr $(,)?) => {
        fn main() -> ::std::process::ExitCode {
            $crate::run_conformance($factory)
        }
    };
}
