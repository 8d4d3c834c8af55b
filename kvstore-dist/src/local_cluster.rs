//! [`LocalCluster`]: a scheduler and servers as threads of this process, for tests, examples
//! and single-machine experiments.

use std::collections::BTreeMap;
use std::thread::JoinHandle;
use std::time::Duration;

use kvstore_base::{create_with, Error, KVStoreBase, Result};

use crate::cluster::ClusterError;
use crate::config::{DistConfig, Role};
use crate::scheduler::Scheduler;
use crate::server::run_server;

/// A scheduler and `servers` servers running on threads of this process on 127.0.0.1, waiting
/// for `workers` workers, which [`create_worker`](LocalCluster::create_worker) creates (from
/// any thread, or another process given [`worker_options`](LocalCluster::worker_options) as
/// environment variables).
///
/// ```no_run
/// use std::time::Duration;
/// use kvstore_base::{KVStoreExt, NDArray, DType};
/// use kvstore_dist::LocalCluster;
///
/// let cluster = LocalCluster::start(1, 1, Duration::from_secs(10)).unwrap();
/// let kv = cluster.create_worker("dist_sync").unwrap();
/// kv.init(3, &NDArray::ones(&[2], DType::F32)).unwrap();
/// drop(kv); // says goodbye: the server and the scheduler stop
/// cluster.finish().unwrap();
/// ```
#[derive(Debug)]
pub struct LocalCluster {
    scheduler: Option<Scheduler>,
    servers: Vec<JoinHandle<std::result::Result<(), ClusterError>>>,
    options: BTreeMap<String, String>,
}

impl LocalCluster {
    /// Starts the scheduler and the servers; every wait of the cluster is bounded by `timeout`.
    ///
    /// # Errors
    /// [`Error::Backend`] when the scheduler cannot start or a thread cannot be spawned.
    pub fn start(servers: u32, workers: u32, timeout: Duration) -> Result<LocalCluster> {
        Self::start_with(servers, workers, timeout, [("", ""); 0])
    }

    /// As [`start`](LocalCluster::start), with more settings (variables of
    /// [`config`](crate::config), such as `KVSTORE_SECRET` or `KVSTORE_SHM`) for the
    /// scheduler, the servers and the [`worker_options`](LocalCluster::worker_options).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad setting, else as [`start`](LocalCluster::start).
    pub fn start_with<I, K, V>(
        servers: u32,
        workers: u32,
        timeout: Duration,
        settings: I,
    ) -> Result<LocalCluster>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut options = BTreeMap::new();
        for (k, v) in [
            ("DMLC_ROLE", "worker".to_string()),
            ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
            // Replaced by the scheduler's port once it listens.
            ("DMLC_PS_ROOT_PORT", "1".to_string()),
            ("DMLC_NUM_SERVER", servers.to_string()),
            ("DMLC_NUM_WORKER", workers.to_string()),
            ("DMLC_NODE_HOST", "127.0.0.1".to_string()),
            ("KVSTORE_TIMEOUT_SECS", timeout.as_secs_f64().to_string()),
        ] {
            options.insert(k.to_string(), v);
        }
        options.extend(settings.into_iter().map(|(k, v)| (k.into(), v.into())));
        let config = |role: Role, options: &BTreeMap<String, String>| {
            let mut c = DistConfig::from_vars(options.clone())
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            c.role = role;
            Ok::<_, Error>(c)
        };
        let mut scheduler_config = config(Role::Scheduler, &options)?;
        scheduler_config.root_port = 0;
        let scheduler = Scheduler::start(&scheduler_config)?;
        options.insert(
            "DMLC_PS_ROOT_PORT".to_string(),
            scheduler.local_addr().port().to_string(),
        );
        let mut handles = Vec::new();
        for i in 0..servers {
            let c = config(Role::Server, &options)?;
            let h = std::thread::Builder::new()
                .name(format!("kvstore-dist local server {i}"))
                .spawn(move || run_server(&c))
                .map_err(|e| Error::Backend {
                    store: "dist".into(),
                    source: Box::new(e),
                })?;
            handles.push(h);
        }
        Ok(LocalCluster {
            scheduler: Some(scheduler),
            servers: handles,
            options,
        })
    }

    /// The variables (as create options, or as environment variables of another process) that
    /// make a worker of this cluster.
    pub fn worker_options(&self) -> &BTreeMap<String, String> {
        &self.options
    }

    /// Creates a worker store `name` (`dist_sync`, `dist_async`, ...) of this cluster; blocks
    /// until every worker and server has joined.
    ///
    /// # Errors
    /// As [`create_with`].
    pub fn create_worker(&self, name: &str) -> Result<Box<dyn KVStoreBase>> {
        create_with(name, self.options.clone())
    }

    /// Waits for the servers and the scheduler to end (once every worker has left; when a
    /// worker was lost and not replaced, the servers first wait the timeout after the loss).
    ///
    /// # Errors
    /// The first server's or the scheduler's error (e.g. lost workers).
    pub fn finish(mut self) -> Result<()> {
        let mut first: Option<Error> = None;
        for h in self.servers.drain(..) {
            let outcome = h.join().unwrap_or_else(|_| {
                Err(ClusterError::Local("a server thread panicked".to_string()))
            });
            if let Err(e) = outcome {
                first.get_or_insert(e.into());
            }
        }
        if let Some(s) = self.scheduler.take() {
            if let Err(e) = s.join() {
                first.get_or_insert(e.into());
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Lets the cluster end on its own in the background (once every worker has left).
    pub fn detach(self) {
        let _ = std::thread::Builder::new()
            .name("kvstore-dist local cluster".into())
            .spawn(move || {
                if let Err(e) = self.finish() {
                    log::warn!("kvstore-dist local cluster: {e}");
                }
            });
    }
}
