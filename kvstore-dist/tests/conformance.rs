//! The conformance suite run against `dist_sync` with one worker: every store the suite
//! creates is the only worker of a fresh cluster (a scheduler and one server on threads of
//! this process, over real sockets on 127.0.0.1), which ends when the store is dropped.
use std::time::Duration;

use kvstore_dist::LocalCluster;

kvstore_test::conformance_tests!(|| {
    let cluster = LocalCluster::start(1, 1, Duration::from_secs(20))?;
    let store = cluster.create_worker("dist_sync")?;
    cluster.detach();
    Ok(store)
});
