//! The conformance suite run against `pslite_dist_sync` with one worker: every store the suite
//! creates is the only worker of a fresh job whose scheduler and server are MXNet 1.9.1's
//! (Python processes), ended when the store is dropped. Without MXNet 1.9.1
//! (`KVSTORE_MXNET_PYTHON`) every check is reported ignored, with the reason.
use std::sync::Arc;

use kvstore_pslite as _;

mod common;

fn main() -> std::process::ExitCode {
    // MXNet 1.9.1's servers abort on integer dtypes and hold float64 as float32: the store
    // refuses those keys at init.
    kvstore_test::allow_refused_dtypes(kvstore_pslite::REFUSED_DTYPES);
    let names = kvstore_test::CHECKS
        .iter()
        .flat_map(|group| group.iter())
        .map(|check| format!("{}::{}", kvstore_pslite::NAME, check.name));
    common::run_or_ignore(names, || {
        kvstore_test::trials(
            kvstore_pslite::NAME,
            Arc::new(|| {
                let job = common::MxnetJob::start(1, 1, &[])
                    .map_err(kvstore_base::Error::InvalidArgument)?;
                let store = kvstore_base::create_with(kvstore_pslite::NAME, job.worker_options())?;
                // Only a job whose worker started ends by itself; a failed one is killed.
                job.detach();
                Ok(store)
            }),
        )
    })
}
