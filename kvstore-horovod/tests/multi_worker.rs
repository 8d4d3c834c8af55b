//! The multi-worker checks of the conformance suite ([`kvstore_test::suite::multi`]) on
//! `horovod`: every check builds a fresh job, a [`LocalJob`] (a scheduler without servers on a
//! thread of this process, over real sockets on 127.0.0.1) whose workers are created
//! concurrently:
//!
//! - `horovod`: 2, 3 and 4 workers;
//! - `horovod_secret`: 3 workers, every node holding the job's shared secret
//!   (`KVSTORE_SECRET`: each connection, the ring's included, opens with the handshake).

use std::sync::Arc;
use std::time::Duration;

use kvstore_horovod::LocalJob;
use kvstore_test::{create_workers, multi_worker_trials, MultiWorkerFactory, Semantics};

/// Every wait of a job; a check takes well under a second.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Jobs whose scheduler and workers are given `settings`.
fn jobs(settings: &'static [(&'static str, &'static str)]) -> Arc<MultiWorkerFactory> {
    Arc::new(move |n| {
        let job = LocalJob::start_with(n as u32, TIMEOUT, settings.to_vec())?;
        let options = job.worker_options().clone();
        let workers = create_workers(n, || kvstore_base::create_with("horovod", options.clone()));
        // The job ends once every worker has left.
        job.detach();
        workers
    })
}

fn main() -> std::process::ExitCode {
    let mut trials = multi_worker_trials("horovod", jobs(&[]), Semantics::Sync, &[2, 3, 4]);
    trials.extend(multi_worker_trials(
        "horovod_secret",
        jobs(&[("KVSTORE_SECRET", "the secret of the multi-worker tests")]),
        Semantics::Sync,
        &[3],
    ));
    kvstore_test::run_trials(trials)
}
