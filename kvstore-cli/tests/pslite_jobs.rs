//! `kvstore launch --pslite`: whole jobs on kvstore-pslite's scheduler and servers (`kvstore
//! pslite-scheduler`, `kvstore pslite-server`), which speak MXNet 1.9.1's protocol. Rust
//! workers (`pslite_dist_sync`, this test binary run as a worker) on any machine; MXNet's own
//! Python workers where MXNet 1.9.1 is installed (`KVSTORE_MXNET_PYTHON`, as `.ci/run`
//! installs it), else that test is reported ignored, with the reason.
//!
//! Every launch is bounded and leaves no process behind (see `common`).

mod common;

use common::launch;
use kvstore::{DType, KVStoreExt, NDArray};
use libtest_mimic::{Arguments, Failed, Trial};

/// Set for the workers: this binary then runs [`rust_worker`] instead of its tests.
const WORKER: &str = "KVSTORE_PSLITE_JOB_WORKER";

/// The variable naming a Python that has MXNet 1.9.1.
const PYTHON: &str = "KVSTORE_MXNET_PYTHON";

/// A worker of the job: 2-bit compression, a small key and one cut across the servers, pushes
/// of `rank + 1` (each sends `+0.5`, the threshold).
fn rust_worker() {
    assert!(
        std::env::var_os("KVSTORE_SECRET_FILE").is_none(),
        "a ps-lite job has no secret"
    );
    let kv = kvstore::create("pslite_dist_sync").expect("create(pslite_dist_sync)");
    let (rank, workers) = (kv.rank(), kv.num_workers());
    let params = [("type", "2bit"), ("threshold", "0.5")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    kv.set_gradient_compression(&params).expect("compression");
    for (key, n) in [(3, 20), (10, 3000)] {
        kv.init(key, &NDArray::zeros(&[n], DType::F32))
            .expect("init");
        for _ in 0..3 {
            kv.push(key, &NDArray::full(&[n], (rank + 1) as f64, DType::F32))
                .expect("push");
            let mut out = NDArray::zeros(&[n], DType::F32);
            kv.pull(key, &mut out).expect("pull");
            assert_eq!(out.to_f64_vec(), vec![0.5 * workers as f64; n], "key {key}");
        }
    }
    println!("pslite worker rank {rank} of {workers}: ok");
}

fn rust_workers_run_to_the_end() -> Result<(), Failed> {
    let me = std::env::current_exe()?;
    let me = me.to_str().ok_or("a UTF-8 path of the test binary")?;
    let job = launch(
        &[
            "--pslite",
            "-n",
            "2",
            "-s",
            "2",
            "--timeout",
            "20",
            "--env",
            &format!("{WORKER}=1"),
            "--env",
            "MXNET_KVSTORE_BIGARRAY_BOUND=1000",
            "--",
            me,
        ],
        &[],
    );
    if !job.status.success() {
        return Err(job.report().into());
    }
    for rank in 0..2 {
        let said = format!("pslite worker rank {rank} of 2: ok");
        if !job.stdout.lines().any(|l| l.ends_with(&said)) {
            return Err(format!("no {said:?}\n{}", job.report()).into());
        }
    }
    Ok(())
}

/// MXNet's own Python workers, as a user runs them: `kvstore launch --pslite -- python
/// train.py`. Init (rank 0's value), push + pull and pushpull rounds give the exact sums, and
/// an optimizer set on the servers steps the weight.
fn mxnet_python_workers_run_to_the_end(python: String) -> Result<(), Failed> {
    let script = "
import mxnet as mx
kv = mx.kv.create('dist_sync')
n, rank = kv.num_workers, kv.rank
kv.init(3, mx.nd.full((4, 5), 7 + rank))
out = mx.nd.zeros((4, 5))
kv.pull(3, out=out)
assert (out.asnumpy() == 7).all(), out
for rnd in range(3):
    kv.push(3, mx.nd.full((4, 5), rank + 1 + rnd))
    kv.pull(3, out=out)
    assert (out.asnumpy() == n * (n + 1) / 2 + n * rnd).all(), (rnd, out)
kv.pushpull(3, mx.nd.full((4, 5), 2 * rank), out=out)
assert (out.asnumpy() == n * (n - 1)).all(), out
# The optimizer on the servers (Gluon's default for a dist store): a step of sgd.
kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.5))
kv.init(5, mx.nd.ones((3,)))
kv.push(5, mx.nd.ones((3,)))
w = mx.nd.zeros((3,))
kv.pull(5, out=w)
assert (w.asnumpy() == 1 - 0.5 * n).all(), w
mx.nd.waitall()
print('mxnet worker rank %d of %d: ok' % (rank, n))
";
    let job = launch(
        &[
            "--pslite",
            "-n",
            "2",
            "-s",
            "1",
            "--timeout",
            "20",
            "--",
            &python,
            "-c",
            script,
        ],
        &[("OMP_NUM_THREADS", "1"), ("MXNET_CPU_WORKER_NTHREADS", "1")],
    );
    if !job.status.success() {
        return Err(job.report().into());
    }
    for rank in 0..2 {
        let said = format!("mxnet worker rank {rank} of 2: ok");
        if !job.stdout.lines().any(|l| l.ends_with(&said)) {
            return Err(format!("no {said:?}\n{}", job.report()).into());
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    if std::env::var_os(WORKER).is_some() {
        rust_worker();
        return std::process::ExitCode::SUCCESS;
    }
    let args = Arguments::from_args();
    let mxnet = match std::env::var(PYTHON) {
        Ok(python) => Trial::test("mxnet_python_workers_run_to_the_end", move || {
            mxnet_python_workers_run_to_the_end(python)
        }),
        Err(_) => Trial::test("mxnet_python_workers_run_to_the_end", || Ok(()))
            .with_kind(format!(
                "needs a Python with MXNet 1.9.1, named by {PYTHON}"
            ))
            .with_ignored_flag(true),
    };
    let trials = vec![
        Trial::test("rust_workers_run_to_the_end", rust_workers_run_to_the_end),
        mxnet,
    ];
    libtest_mimic::run(&args, trials).exit_code()
}
