//! The conformance suite (single-worker and multi-worker checks) on `pslite_dist_sync` in jobs
//! of this crate's own ps-lite scheduler and server ([`LocalJob`], on threads of this process):
//! the worker, the scheduler and the server speak ps-lite's protocol to one another, as they
//! would to MXNet's nodes, on any machine (no MXNet needed).
//!
//! Unlike MXNet's server, this one acknowledges a plain push in a round where another worker
//! used `pushpull`, so every multi-worker check applies.
use std::sync::Arc;
use std::time::{Duration, Instant};

use libtest_mimic::{Failed, Trial};

use kvstore_pslite::{LocalJob, NAME};
use kvstore_test::{create_workers, multi_worker_trials, MultiWorkerFactory, Semantics};

const TIMEOUT: Duration = Duration::from_secs(20);

fn workers(servers: usize) -> Arc<MultiWorkerFactory> {
    Arc::new(move |n| {
        let job = LocalJob::start(servers, n, TIMEOUT)
            .map_err(|e| kvstore_base::Error::InvalidArgument(e.to_string()))?;
        let options = job.worker_options().clone();
        let workers = create_workers(n, || kvstore_base::create_with(NAME, options.clone()))?;
        job.detach();
        Ok(workers)
    })
}

/// A Python optimizer (`kController`) is never run: the server stops with an error naming it,
/// and the worker's command fails at once, naming the server.
fn a_python_optimizer_stops_the_server_with_an_error() -> Result<(), Failed> {
    let job = LocalJob::start(1, 1, Duration::from_secs(3))?;
    let kv = kvstore_base::create_with(NAME, job.worker_options().clone())?;
    let started = Instant::now();
    let e = kv
        .send_command_to_servers(0, "(pickled optimizer)")
        .expect_err("the server refuses it")
        .to_string();
    if !e.contains("server 8 (rank 0)") || started.elapsed() > Duration::from_secs(2) {
        return Err(format!("after {:?}: {e}", started.elapsed()).into());
    }
    drop(kv);
    let ended = job.join().expect_err("the server stopped with an error");
    if !ended.contains("kController, a pickled Python optimizer") {
        return Err(ended.into());
    }
    Ok(())
}

/// A worker that never comes: the scheduler fails after the timeout naming the nodes that
/// registered, and the worker that came fails too.
fn a_missing_worker_fails_the_registration() -> Result<(), Failed> {
    let job = LocalJob::start(1, 2, Duration::from_secs(2))?;
    let e = kvstore_base::create_with(NAME, job.worker_options().clone())
        .expect_err("the second worker never registers")
        .to_string();
    if !e.contains("not every node of the job registered") {
        return Err(e.into());
    }
    let ended = job.join().expect_err("the scheduler gave up");
    if !ended.contains("only 2 of the 3 nodes (2 workers, 1 servers) registered") {
        return Err(ended.into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    // The worker refuses what MXNet's servers cannot hold, whichever server it talks to.
    kvstore_test::allow_refused_dtypes(kvstore_pslite::REFUSED_DTYPES);
    let args = libtest_mimic::Arguments::from_args();
    let single = workers(1);
    let mut trials = kvstore_test::trials(
        "own_servers",
        Arc::new(move || single(1).map(|mut w| w.remove(0))),
    );
    trials.extend(multi_worker_trials(
        "own_servers",
        workers(1),
        Semantics::Sync,
        &[2, 3],
    ));
    trials.extend(multi_worker_trials(
        "own_servers_2_servers",
        workers(2),
        Semantics::Sync,
        &[2],
    ));
    trials.push(Trial::test(
        "own_servers::a_python_optimizer_stops_the_server_with_an_error",
        a_python_optimizer_stops_the_server_with_an_error,
    ));
    trials.push(Trial::test(
        "own_servers::a_missing_worker_fails_the_registration",
        a_missing_worker_fails_the_registration,
    ));
    libtest_mimic::run(&args, trials).exit_code()
}
