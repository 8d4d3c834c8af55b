//! What several dist test files share: the workers of a fresh in-process cluster.

use std::thread;
use std::time::Duration;

use kvstore_base::KVStoreBase;
use kvstore_dist::protocol::{self, Mode};
use kvstore_dist::transport::{Connection, Outgoing, TransportError};
use kvstore_dist::{DistConfig, DistStore, LocalCluster, Node};

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

/// Runs `body(rank, store)` on `workers` workers (stores created by `name`) of a fresh
/// cluster with `servers` servers; returns the results by rank, after the cluster has ended.
#[allow(dead_code)] // not every test file runs stores by name
pub fn run<T: Send + 'static>(
    name: &'static str,
    servers: u32,
    workers: u32,
    body: impl Fn(usize, &dyn KVStoreBase) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    run_with(name, servers, workers, &[], body)
}

/// [`run`] with the workers' options extended by `extra`.
#[allow(dead_code)]
pub fn run_with<T: Send + 'static>(
    name: &'static str,
    servers: u32,
    workers: u32,
    extra: &[(&str, &str)],
    body: impl Fn(usize, &dyn KVStoreBase) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let cluster = LocalCluster::start(servers, workers, TIMEOUT).unwrap();
    let mut options = cluster.worker_options().clone();
    options.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (options, body) = (options.clone(), body.clone());
            thread::spawn(move || {
                let kv = kvstore_base::create_with(name, options).unwrap();
                (kv.rank(), body(kv.rank(), &*kv))
            })
        })
        .collect();
    let mut results: Vec<(usize, T)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    cluster.finish().unwrap();
    results.sort_by_key(|(r, _)| *r);
    results.into_iter().map(|(_, t)| t).collect()
}

/// A worker spoken by hand: joined, connected and said hello to the only server.
#[allow(dead_code)] // not every test file speaks the protocol by hand
pub struct Manual {
    pub node: Node,
    pub conn: Connection,
}

#[allow(dead_code)]
impl Manual {
    pub fn join(cluster: &LocalCluster) -> Manual {
        let config = DistConfig::from_vars(cluster.worker_options().clone()).unwrap();
        let node = Node::join(&config).unwrap();
        let mut transport = config.transport();
        transport.node_id = node.id();
        let server = node.servers().next().unwrap().addr.clone();
        let conn = Connection::connect(server.as_str(), transport).unwrap();
        conn.request(
            Outgoing::new(protocol::CMD_HELLO, b"dist_sync")
                .key(0)
                .aux(Mode::Sync.code()),
            "hello",
        )
        .unwrap();
        Manual { node, conn }
    }

    pub fn leave(self) {
        self.conn
            .request(Outgoing::new(protocol::CMD_BYE, &[]), "bye")
            .unwrap();
        drop(self.conn);
        self.node.leave().unwrap();
    }
}

#[allow(dead_code)]
pub fn remote_message(r: Result<kvstore_dist::transport::Response, TransportError>) -> String {
    match r {
        Err(TransportError::Remote { message, .. }) => message,
        other => panic!("expected an error answer, got {other:?}"),
    }
}
