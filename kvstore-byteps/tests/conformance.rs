//! The conformance suite run against `byteps` with one worker: every store the suite creates
//! is the only worker of a fresh cluster (a scheduler and one server on threads of this
//! process, over real sockets on 127.0.0.1), which ends when the store is dropped. A small
//! partition size cuts the suite's bigger values into several partitions.
use std::time::Duration;

use kvstore_byteps as _;
use kvstore_dist::LocalCluster;

kvstore_test::conformance_tests!(|| {
    let cluster = LocalCluster::start(1, 1, Duration::from_secs(20))?;
    let mut options = cluster.worker_options().clone();
    options.insert("BYTEPS_PARTITION_BYTES".into(), "64".into());
    let store = kvstore_base::create_with("byteps", options)?;
    cluster.detach();
    Ok(store)
});
