//! The multi-worker checks of the conformance suite ([`kvstore_test::suite::multi`]) on
//! `horovod`: every check builds a fresh job, a [`LocalJob`] (a scheduler without servers on a
//! thread of this process, over real sockets on 127.0.0.1) whose workers are created
//! concurrently, with 2, 3 and 4 workers.

use std::time::Duration;

use kvstore_horovod::LocalJob;
use kvstore_test::create_workers;

/// Every wait of a job; a check takes well under a second.
const TIMEOUT: Duration = Duration::from_secs(10);

kvstore_test::multi_worker_conformance_tests!(
    |n| {
        let job = LocalJob::start(n as u32, TIMEOUT)?;
        let options = job.worker_options().clone();
        let workers = create_workers(n, || kvstore_base::create_with("horovod", options.clone()));
        // The job ends once every worker has left.
        job.detach();
        workers
    },
    kvstore_test::Semantics::Sync,
    &[2, 3, 4]
);
