//! [`LocalJob`]: this crate's ps-lite scheduler and servers on threads of the calling process,
//! on 127.0.0.1: a job for tests and examples, whose workers may be this crate's stores or
//! MXNet 1.9.1's own Python workers (given [`LocalJob::worker_options`] as their environment).

use std::collections::BTreeMap;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::van::{VanConfig, VanError};

/// A scheduler and servers on threads; they end with the job (when its workers leave), or
/// fail after the timeout.
#[derive(Debug)]
pub struct LocalJob {
    options: BTreeMap<String, String>,
    threads: Vec<(String, JoinHandle<Result<(), VanError>>)>,
}

impl LocalJob {
    /// Starts the scheduler and `servers` servers of a job of `workers` workers, every wait
    /// bounded by `timeout`.
    ///
    /// # Errors
    /// No free port, or a thread that cannot start.
    pub fn start(servers: usize, workers: usize, timeout: Duration) -> std::io::Result<LocalJob> {
        let config = |port: u16| VanConfig {
            scheduler: format!("127.0.0.1:{}", port),
            host: "127.0.0.1".into(),
            bind: "127.0.0.1".into(),
            port,
            timeout,
            max_message_bytes: 4 << 30,
        };
        let mut threads = Vec::new();
        // The scheduler listens before any thread starts: no other socket can take its port.
        let scheduler =
            crate::van::Van::listen(config(0)).map_err(|e| std::io::Error::other(e.to_string()))?;
        let port = scheduler.listen_addr().port();
        threads.push((
            "scheduler".to_string(),
            std::thread::Builder::new()
                .name("pslite-scheduler".into())
                .spawn(move || crate::scheduler::run_scheduler_on(scheduler, workers, servers))?,
        ));
        for i in 0..servers {
            let mut server = config(0);
            server.scheduler = format!("127.0.0.1:{port}");
            threads.push((
                format!("server {i}"),
                std::thread::Builder::new()
                    .name(format!("pslite-server-{i}"))
                    .spawn(move || crate::server::run_server(server, workers))?,
            ));
        }
        let options = [
            ("DMLC_ROLE", "worker".to_string()),
            ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
            ("DMLC_PS_ROOT_PORT", port.to_string()),
            ("DMLC_NUM_SERVER", servers.to_string()),
            ("DMLC_NUM_WORKER", workers.to_string()),
            ("DMLC_NODE_HOST", "127.0.0.1".to_string()),
            ("KVSTORE_TIMEOUT_SECS", timeout.as_secs_f64().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(LocalJob { options, threads })
    }

    /// The settings a worker of this job needs (`DMLC_*`, `KVSTORE_TIMEOUT_SECS`), as create
    /// options or environment variables.
    pub fn worker_options(&self) -> &BTreeMap<String, String> {
        &self.options
    }

    /// Waits for the scheduler and the servers to end (after the workers left).
    ///
    /// # Errors
    /// The errors of the scheduler and server threads, each naming its thread.
    pub fn join(self) -> Result<(), String> {
        let errors: Vec<String> = self
            .threads
            .into_iter()
            .filter_map(|(name, thread)| match thread.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("the {name}: {e}")),
                Err(_) => Some(format!("the {name} panicked")),
            })
            .collect();
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors.join("; ")),
        }
    }

    /// Leaves the threads to end with the job.
    pub fn detach(self) {}
}
