//! [`LocalJob`]: the scheduler of a `horovod` job (no servers) on a thread of this process,
//! for tests, examples and single-machine experiments.

use std::collections::BTreeMap;
use std::time::Duration;

use kvstore_base::{create_with, Error, KVStoreBase, Result};
use kvstore_dist::{DistConfig, Role, Scheduler};

/// A scheduler on 127.0.0.1 waiting for `workers` workers and no server; workers are created
/// with [`create_worker`](LocalJob::create_worker) from any thread (they block until all have
/// joined), or by another process given [`worker_options`](LocalJob::worker_options) as its
/// environment.
///
/// ```no_run
/// use std::time::Duration;
/// use kvstore_base::{DType, KVStoreExt, NDArray};
/// use kvstore_horovod::LocalJob;
///
/// let job = LocalJob::start(1, Duration::from_secs(10)).unwrap();
/// let kv = job.create_worker().unwrap();
/// let mut out = NDArray::zeros(&[2], DType::F32);
/// kv.pushpull(3, &NDArray::ones(&[2], DType::F32), &mut out).unwrap();
/// drop(kv); // leaves the job: the scheduler stops
/// job.finish().unwrap();
/// ```
#[derive(Debug)]
pub struct LocalJob {
    scheduler: Option<Scheduler>,
    options: BTreeMap<String, String>,
}

impl LocalJob {
    /// Starts the scheduler; every wait of the job is bounded by `timeout`
    /// (`KVSTORE_TIMEOUT_SECS`, and the stall shutdown time unless the options set
    /// `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`).
    ///
    /// # Errors
    /// [`Error::Backend`] when the scheduler cannot start.
    pub fn start(workers: u32, timeout: Duration) -> Result<LocalJob> {
        Self::start_with(workers, timeout, [("", ""); 0])
    }

    /// As [`start`](LocalJob::start), with more settings (such as `KVSTORE_SECRET`) for the
    /// scheduler and the [`worker_options`](LocalJob::worker_options).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad setting, else as [`start`](LocalJob::start).
    pub fn start_with<I, K, V>(workers: u32, timeout: Duration, settings: I) -> Result<LocalJob>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut options = BTreeMap::new();
        for (k, v) in [
            ("DMLC_ROLE", "worker".to_string()),
            ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
            ("DMLC_PS_ROOT_PORT", "1".to_string()),
            ("DMLC_NUM_SERVER", "0".to_string()),
            ("DMLC_NUM_WORKER", workers.to_string()),
            ("DMLC_NODE_HOST", "127.0.0.1".to_string()),
            ("KVSTORE_TIMEOUT_SECS", timeout.as_secs_f64().to_string()),
        ] {
            options.insert(k.to_string(), v);
        }
        options.extend(settings.into_iter().map(|(k, v)| (k.into(), v.into())));
        let mut vars = options.clone();
        vars.insert("DMLC_NUM_SERVER".into(), "1".into());
        let mut config =
            DistConfig::from_vars(vars).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        config.role = Role::Scheduler;
        config.num_servers = 0;
        config.root_port = 0;
        let scheduler = Scheduler::start(&config)?;
        options.insert(
            "DMLC_PS_ROOT_PORT".into(),
            scheduler.local_addr().port().to_string(),
        );
        Ok(LocalJob {
            scheduler: Some(scheduler),
            options,
        })
    }

    /// The variables that make a worker of this job (as create options or environment).
    pub fn worker_options(&self) -> &BTreeMap<String, String> {
        &self.options
    }

    /// Creates a `horovod` worker of this job; blocks until every worker has joined.
    ///
    /// # Errors
    /// As [`create_with`].
    pub fn create_worker(&self) -> Result<Box<dyn KVStoreBase>> {
        create_with("horovod", self.options.clone())
    }

    /// Waits for the scheduler to end (once every worker has left).
    ///
    /// # Errors
    /// The scheduler's error (e.g. lost workers).
    pub fn finish(mut self) -> Result<()> {
        match self.scheduler.take() {
            Some(s) => s.join().map_err(Error::from),
            None => Ok(()),
        }
    }

    /// Lets the scheduler end on its own in the background (once every worker has left).
    pub fn detach(self) {
        let _ = std::thread::Builder::new()
            .name("kvstore-horovod local job".into())
            .spawn(move || {
                if let Err(e) = self.finish() {
                    log::warn!("kvstore-horovod local job: {e}");
                }
            });
    }
}
