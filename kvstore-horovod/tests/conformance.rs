//! The conformance suite run against `horovod` with one worker: every store the suite creates
//! is the only worker of a fresh job (a scheduler on a thread of this process, over real
//! sockets on 127.0.0.1), which ends when the store is dropped.
use std::time::Duration;

use kvstore_horovod::LocalJob;

kvstore_test::conformance_tests!(|| {
    let job = LocalJob::start(1, Duration::from_secs(20))?;
    let store = job.create_worker()?;
    job.detach();
    Ok(store)
});
