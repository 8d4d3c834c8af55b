//! The multi-worker checks of the conformance suite ([`kvstore_test::suite::multi`]) on the
//! dist stores: every check builds a fresh job, a [`LocalCluster`] (a scheduler and servers
//! on threads of this process, over real sockets on 127.0.0.1) whose workers are created
//! concurrently, and runs each worker's part on a thread of its own.
//!
//! - `dist_sync`: one server, 2 and 3 workers;
//! - `dist_sync_2_servers_secret`: two servers and a big-array bound of 64 elements, so that
//!   the bigger keys of the many-keys checks are split across both, 3 workers, every node
//!   holding the job's shared secret (`KVSTORE_SECRET`: each connection opens with the
//!   handshake);
//! - `dist_async`: one server, 2 and 3 workers, with the checks that hold for async stores.

use std::sync::Arc;
use std::time::Duration;

use kvstore_dist::LocalCluster;
use kvstore_test::{create_workers, multi_worker_trials, MultiWorkerFactory, Semantics};

/// Every wait of a cluster; a check takes well under a second.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The shared secret of the jobs that run with one.
const SECRET: (&str, &str) = ("KVSTORE_SECRET", "the secret of the multi-worker tests");

/// Jobs of the store `name` with `servers` servers, the scheduler, servers and workers given
/// `settings`, the workers created with the cluster's options plus `extra`.
fn jobs(
    name: &'static str,
    servers: u32,
    settings: &'static [(&'static str, &'static str)],
    extra: &'static [(&'static str, &'static str)],
) -> Arc<MultiWorkerFactory> {
    Arc::new(move |n| {
        let cluster = LocalCluster::start_with(servers, n as u32, TIMEOUT, settings.to_vec())?;
        let mut options = cluster.worker_options().clone();
        options.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let workers = create_workers(n, || kvstore_base::create_with(name, options.clone()));
        // The cluster ends once every worker has left.
        cluster.detach();
        workers
    })
}

fn main() -> std::process::ExitCode {
    let mut trials = multi_worker_trials(
        "dist_sync",
        jobs("dist_sync", 1, &[], &[]),
        Semantics::Sync,
        &[2, 3],
    );
    trials.extend(multi_worker_trials(
        "dist_sync_2_servers_secret",
        jobs(
            "dist_sync",
            2,
            &[SECRET],
            &[("MXNET_KVSTORE_BIGARRAY_BOUND", "64")],
        ),
        Semantics::Sync,
        &[3],
    ));
    trials.extend(multi_worker_trials(
        "dist_async",
        jobs("dist_async", 1, &[], &[]),
        Semantics::Async,
        &[2, 3],
    ));
    kvstore_test::run_trials(trials)
}
