//! What the byteps test files share: `byteps` workers on a fresh in-process cluster.
#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

use kvstore_base::{CreateRequest, KVStoreBase, NDArray};
use kvstore_byteps::BytePsStore;
use kvstore_dist::LocalCluster;

/// The bound on every wait of these clusters.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `body(store)` on `workers` workers of a fresh cluster of `servers` servers, the
/// workers created with the cluster's options plus `extra`; returns the results by rank once
/// the cluster has ended.
pub fn run<T: Send + 'static>(
    servers: u32,
    workers: u32,
    extra: &[(&str, &str)],
    body: impl Fn(&BytePsStore) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let cluster = LocalCluster::start(servers, workers, TIMEOUT).unwrap();
    let mut options = cluster.worker_options().clone();
    options.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let options = options.clone();
            let body = body.clone();
            thread::spawn(move || {
                let kv = create(options).unwrap();
                (kv.rank(), body(&kv))
            })
        })
        .collect();
    let mut results: Vec<(usize, T)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    cluster.finish().unwrap();
    results.sort_by_key(|(r, _)| *r);
    results.into_iter().map(|(_, t)| t).collect()
}

/// A `byteps` worker created with `options`.
pub fn create(options: BTreeMap<String, String>) -> kvstore_base::Result<BytePsStore> {
    BytePsStore::from_request(&CreateRequest {
        name: "byteps".into(),
        options,
    })
}

/// The elements of a float32 array.
pub fn f32s(a: &NDArray) -> Vec<f32> {
    a.to_vec::<f32>().unwrap()
}
