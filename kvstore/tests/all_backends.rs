//! Runs the conformance suite against every store this build registers.
//!
//! Trials are named `<store>::<check>`; `KVSTORE_TEST=local,teststore` narrows the run to
//! some stores. A store that cannot be built here (no GPU) has its trials reported as ignored,
//! with the reason; a distributed store runs as the only worker of an in-process cluster,
//! except a store whose servers are not ours ([`EXTERNAL_SERVERS`]), reported as ignored with
//! the reason (its crate's own tests run it against those servers).

use std::sync::Arc;

/// Stores that only run against servers of another implementation, and why they are not run
/// here.
const EXTERNAL_SERVERS: &[(&str, &str)] = &[
    (
        "pslite_dist_sync",
        "joins MXNet 1.9.1's scheduler and servers: kvstore-pslite's tests run it with MXNet",
    ),
    (
        "pslite_dist_async",
        "joins MXNet 1.9.1's scheduler and servers: kvstore-pslite's tests run it with MXNet",
    ),
];

fn main() -> std::process::ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let only: Option<Vec<String>> = std::env::var("KVSTORE_TEST").ok().map(|list| {
        list.split(',')
            .map(|s| s.trim().to_lowercase())
            .filter(|s| !s.is_empty())
            .collect()
    });
    let mut trials = Vec::new();
    for info in kvstore::registered() {
        if only
            .as_ref()
            .is_some_and(|names| !names.contains(&info.name))
        {
            continue;
        }
        if let Some((_, reason)) = EXTERNAL_SERVERS.iter().find(|(n, _)| *n == info.name) {
            trials.extend(
                kvstore_test::CHECKS
                    .iter()
                    .flat_map(|group| group.iter())
                    .map(|check| {
                        libtest_mimic::Trial::test(format!("{}::{}", info.name, check.name), || {
                            Ok(())
                        })
                        .with_kind(*reason)
                        .with_ignored_flag(true)
                    }),
            );
            continue;
        }
        let name = info.name.clone();
        let distributed = info
            .capabilities
            .as_ref()
            .is_ok_and(|c| c.contains(&kvstore::Capability::Distributed));
        let factory: Arc<kvstore_test::StoreFactory> = if distributed {
            Arc::new(move || single_worker_cluster(&name))
        } else {
            Arc::new(move || kvstore::create(&name))
        };
        trials.extend(kvstore_test::trials(&info.name, factory));
    }
    libtest_mimic::run(&args, trials).exit_code()
}

/// A distributed store as the only worker of a fresh cluster whose scheduler and server run on
/// threads of this process (they end when the store is dropped).
#[cfg(feature = "dist")]
fn single_worker_cluster(name: &str) -> kvstore::Result<Box<dyn kvstore::KVStoreBase>> {
    let cluster = kvstore::dist::LocalCluster::start(1, 1, std::time::Duration::from_secs(20))?;
    let store = cluster.create_worker(name)?;
    cluster.detach();
    Ok(store)
}

/// Without the `dist` feature no distributed store is linked but a third party's.
#[cfg(not(feature = "dist"))]
fn single_worker_cluster(name: &str) -> kvstore::Result<Box<dyn kvstore::KVStoreBase>> {
    kvstore::create(name)
}
