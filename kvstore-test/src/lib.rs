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
//!
//! A distributed store also runs the multi-worker checks ([`suite::multi`]: ranks, rank 0's
//! init and broadcast, sums of one push per worker, many keys in one call, the optimizer on
//! the servers, barriers, errors at one worker) against a [`MultiWorkerFactory`], which builds
//! the N workers of a fresh job, ordered by rank. The store's [`Semantics`] (sync rounds, or
//! async pushes applied as they come) says which checks apply and what they expect; each
//! check runs with every worker count asked for:
//!
//! ```no_run
//! # use kvstore_test as my_store;
//! use my_store as _;
//! kvstore_test::multi_worker_conformance_tests!(
//!     |n| kvstore_test::create_workers(n, || kvstore_base::create("mydiststore")),
//!     kvstore_test::Semantics::Sync,
//!     &[2, 3],
//! );
//! ```
#![deny(missing_docs)]

pub mod fuzz;
pub mod suite;
mod teststore;

pub use suite::multi::{
    create_workers, multi_worker_trials, on_each_worker, run_multi_worker_conformance, run_trials,
    MultiCheck, MultiWorkerFactory, Semantics, MULTI_CHECKS,
};
pub use suite::{
    allow_refused_dtypes, run_conformance, trials, Check, CheckResult, Failure, StoreFactory,
    CHECKS,
};
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

/// Expands to the `main` of a test binary (`harness = false`) that runs every multi-worker
/// check of the suite ([`suite::multi`]) against the jobs `factory` builds.
///
/// `factory` is a closure `Fn(usize) -> kvstore_base::Result<Vec<Box<dyn KVStoreBase>>>`
/// returning the given number of workers of a fresh job, ordered by rank (see
/// [`create_workers`]); it is called once per check. Optional: the store's [`Semantics`]
/// (default [`Semantics::Sync`]) and the worker counts each check runs with (a `&[usize]`,
/// default `&[2, 3]`).
#[macro_export]
macro_rules! multi_worker_conformance_tests {
    ($factory:expr $(,)?) => {
        $crate::multi_worker_conformance_tests!($factory, $crate::Semantics::Sync, &[2, 3]);
    };
    ($factory:expr, $semantics:expr $(,)?) => {
        $crate::multi_worker_conformance_tests!($factory, $semantics, &[2, 3]);
    };
    ($factory:expr, $semantics:expr, $workers:expr $(,)?) => {
        fn main() -> ::std::process::ExitCode {
            $crate::run_multi_worker_conformance($factory, $semantics, $workers)
        }
    };
}
