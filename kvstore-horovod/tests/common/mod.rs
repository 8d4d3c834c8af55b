//! What the horovod tests share: a job of workers on threads of the test process.

use std::time::Duration;

use kvstore_base::{Error, KVStoreBase};
use kvstore_horovod::{HorovodConfig, HorovodStore, LocalJob};

/// The bound on every wait of these jobs.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `part(rank, store)` on each worker of a fresh job of `n` (with `extra` options), on
/// threads of its own; returns the results by rank.
pub fn job<T, F>(n: usize, extra: &[(&str, &str)], part: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &HorovodStore) -> T + Sync,
{
    let job = LocalJob::start(n as u32, TIMEOUT).unwrap();
    let mut options = job.worker_options().clone();
    options.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = HorovodConfig::from_vars(options).unwrap();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let config = config.clone();
                let part = &part;
                s.spawn(move || {
                    let kv = HorovodStore::connect("horovod", &config).unwrap();
                    let r = kv.rank();
                    (r, part(r, &kv))
                })
            })
            .collect();
        let mut out: Vec<(usize, T)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        out.sort_by_key(|(r, _)| *r);
        out.into_iter().map(|(_, t)| t).collect()
    });
    job.finish().unwrap();
    results
}

/// The full text of an error and its sources.
pub fn chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
