//! The conformance suite run against `pslite_dist_sync` and `pslite_dist_async` with one
//! worker: every store the suite creates is the only worker of a fresh job whose scheduler and
//! server are MXNet 1.9.1's (Python processes), ended when the store is dropped. The checks
//! that push with no optimizer set are reported ignored for `pslite_dist_async`, with the
//! reason (it refuses such a push, on which MXNet's servers abort in async mode), and so is,
//! for both, the check of row-sparse pushes to a dense key (MXNet's servers keep a key dense
//! or by rows from its init; the store refuses such a push). Without
//! MXNet 1.9.1 (`KVSTORE_MXNET_PYTHON`) every check is reported ignored, with the reason.
use std::sync::Arc;

use kvstore_pslite as _;

mod common;

fn main() -> std::process::ExitCode {
    // MXNet 1.9.1's servers abort on integer dtypes and hold float64 as float32: the store
    // refuses those keys at init.
    kvstore_test::allow_refused_dtypes(kvstore_pslite::REFUSED_DTYPES);
    const STORES: [&str; 2] = [kvstore_pslite::NAME, kvstore_pslite::ASYNC_NAME];
    let names = STORES.into_iter().flat_map(|name| {
        kvstore_test::CHECKS
            .iter()
            .flat_map(|group| group.iter())
            .map(move |check| format!("{name}::{}", check.name))
    });
    common::run_or_ignore(names, || {
        STORES
            .into_iter()
            .flat_map(|name| {
                let trials = kvstore_test::trials(
                    name,
                    Arc::new(move || {
                        let job = common::MxnetJob::start(1, 1, &[])
                            .map_err(kvstore_base::Error::InvalidArgument)?;
                        let store = kvstore_base::create_with(name, job.worker_options())?;
                        // Only a job whose worker started ends by itself; a failed one is
                        // killed.
                        job.detach();
                        Ok(store)
                    }),
                );
                trials
                    .into_iter()
                    .map(common::unless_it_pushes_rows_to_a_dense_key)
                    .map(move |trial| match name {
                        kvstore_pslite::ASYNC_NAME => {
                            common::unless_it_pushes_without_an_optimizer(trial)
                        }
                        _ => trial,
                    })
            })
            .collect()
    })
}
