//! The multi-worker checks of the conformance suite ([`kvstore_test::suite::multi`]) on
//! `byteps` (sync semantics): every check builds a fresh [`LocalCluster`] whose workers are
//! created concurrently.
//!
//! - `byteps`: one server, 2 and 3 workers, default settings;
//! - `byteps_2_servers_credit`: two servers, partitions of 64 bytes (the bigger keys of the
//!   checks are cut into several partitions spread over both servers) and a scheduling credit
//!   of 2 partitions, 3 workers, every node holding the job's shared secret (`KVSTORE_SECRET`:
//!   each connection opens with the handshake).
//!
//! BytePS's asynchronous mode sums pushes into the stored values, which is not MXNet's
//! `dist_async` (a push replaces the value): it is checked in `tests/store.rs`.

use std::sync::Arc;
use std::time::Duration;

use kvstore_byteps as _;
use kvstore_dist::LocalCluster;
use kvstore_test::{create_workers, multi_worker_trials, MultiWorkerFactory, Semantics};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The shared secret of the jobs that run with one.
const SECRET: (&str, &str) = ("KVSTORE_SECRET", "the secret of the multi-worker tests");

/// Jobs of `servers` servers, the scheduler, servers and workers given `settings`, the
/// workers created with the cluster's options plus `extra`.
fn jobs(
    servers: u32,
    settings: &'static [(&'static str, &'static str)],
    extra: &'static [(&'static str, &'static str)],
) -> Arc<MultiWorkerFactory> {
    Arc::new(move |n| {
        let cluster = LocalCluster::start_with(servers, n as u32, TIMEOUT, settings.to_vec())?;
        let mut options = cluster.worker_options().clone();
        options.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let workers = create_workers(n, || kvstore_base::create_with("byteps", options.clone()));
        cluster.detach();
        workers
    })
}

fn main() -> std::process::ExitCode {
    let mut trials = multi_worker_trials("byteps", jobs(1, &[], &[]), Semantics::Sync, &[2, 3]);
    trials.extend(multi_worker_trials(
        "byteps_2_servers_credit_secret",
        jobs(
            2,
            &[SECRET],
            &[
                ("BYTEPS_PARTITION_BYTES", "64"),
                ("BYTEPS_SCHEDULING_CREDIT", "2"),
            ],
        ),
        Semantics::Sync,
        &[3],
    ));
    kvstore_test::run_trials(trials)
}
