//! What several dist test files share: the workers of a fresh in-process cluster.

use std::thread;
use std::time::Duration;

use kvstore_base::KVStoreBase;
use kvstore_dist::protocol::Mode;
use kvstore_dist::{DistConfig, DistStore, LocalCluster};

/// The bound on every wait of these clusters.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `body(store)` on `workers` workers (as concrete `DistStore`s) of a fresh cluster of
/// `servers` servers, each worker's configuration changed by `tweak`; results by rank.
pub fn run_tweaked<T: Send + 'static>(
    servers: u32,
    workers: u32,
    tweak: impl Fn(&mut DistConfig),
    body: impl Fn(&DistStore) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let cluster = LocalCluster::start(servers, workers, TIMEOUT).unwrap();
    let mut config = DistConfig::from_vars(cluster.worker_options().clone()).unwrap();
    tweak(&mut config);
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (config, body) = (config.clone(), body.clone());
            thread::spawn(move || {
                let kv = DistStore::connect("dist_sync", Mode::Sync, &config).unwrap();
                (kv.rank(), body(&kv))
            })
        })
        .collect();
    let mut out: Vec<(usize, T)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    cluster.finish().unwrap();
    out.sort_by_key(|(r, _)| *r);
    out.into_iter().map(|(_, t)| t).collect()
}
