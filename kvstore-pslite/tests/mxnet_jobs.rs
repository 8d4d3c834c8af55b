//! `pslite_dist_sync` in jobs whose scheduler and servers are MXNet 1.9.1's: beside MXNet's own
//! Python worker (bit-identical results), and the failures a job of MXNet's servers can have
//! (each an error naming who is missing, never a hang). Without MXNet 1.9.1
//! (`KVSTORE_MXNET_PYTHON`) every test is reported ignored, with the reason.
use std::time::{Duration, Instant};

use kvstore_base::{DType, KVStoreExt, NDArray};
use kvstore_pslite::NAME;
use libtest_mimic::{Failed, Trial};

mod common;

use common::two_bit::{sent, PYTHON_SENT};
use common::MxnetJob;

/// Worker `rank`'s value of `key` in `round`: multiples of 1/8 in [-1, 1), so that sums of
/// two are exact in float16 too.
fn value(key: i64, round: usize, rank: usize, i: usize) -> f32 {
    ((i * 7 + round * 13 + rank * 5 + key as usize) % 17) as f32 / 8.0 - 1.0
}

const PYTHON_VALUE: &str = "
def value(key, rnd, rank, n, dtype):
    i = np.arange(n)
    return mx.nd.array(((i * 7 + rnd * 13 + rank * 5 + key) % 17) / 8.0 - 1.0, dtype=dtype)
";

/// The keys of the mixed job: (key, shape, dtype); key 10 is above the job's
/// `MXNET_KVSTORE_BIGARRAY_BOUND` of 1000 elements, so it is cut across both servers.
const KEYS: &[(i64, &[usize], DType)] = &[
    (3, &[4, 5], DType::F32),
    (10, &[3000], DType::F32),
    (12, &[7], DType::F16),
];

fn filled(key: i64, shape: &[usize], dtype: DType, round: usize, rank: usize) -> NDArray {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| value(key, round, rank, i)).collect();
    NDArray::from_vec(shape, data).unwrap().astype(dtype)
}

/// A job of MXNet's scheduler, 2 servers, one MXNet Python worker and one of ours: both init,
/// then push + pull for two rounds and pushpull for a third; every pull of ours equals the
/// Python worker's, bit for bit, and the exact sum of both workers' values.
fn beside_a_python_worker() -> Result<(), Failed> {
    let mut job = MxnetJob::start(2, 2, &[("MXNET_KVSTORE_BIGARRAY_BOUND", "1000")])?;
    let mut script = String::from(PYTHON_VALUE);
    script.push_str(
        "
kv = mx.kv.create('dist_sync')
keys = [(3, (4, 5), 'float32'), (10, (3000,), 'float32'), (12, (7,), 'float16')]
def save(tag, key, out):
    open(os.path.join(OUT, 'py_%s_%d.bin' % (tag, key)), 'wb').write(out.asnumpy().tobytes())
for key, shape, dtype in keys:
    kv.init(key, value(key, 99, kv.rank, int(np.prod(shape)), dtype).reshape(shape))
for key, shape, dtype in keys:
    out = mx.nd.zeros(shape, dtype=dtype)
    kv.pull(key, out=out)
    save('init', key, out)
for rnd in range(3):
    for key, shape, dtype in keys:
        v = value(key, rnd, kv.rank, int(np.prod(shape)), dtype).reshape(shape)
        out = mx.nd.zeros(shape, dtype=dtype)
        if rnd < 2:
            kv.push(key, v)
            kv.pull(key, out=out)
        else:
            kv.pushpull(key, v, out=out)
        save(str(rnd), key, out)
mx.nd.waitall()
",
    );
    job.python_worker("python_worker", &script)?;
    let kv = kvstore_base::create_with(NAME, job.worker_options())?;
    let rank = kv.rank();
    let other = 1 - rank;
    let mut ours: Vec<(String, i64, NDArray)> = Vec::new();
    for &(key, shape, dtype) in KEYS {
        kv.init(key, &filled(key, shape, dtype, 99, rank))?;
    }
    for &(key, shape, dtype) in KEYS {
        let mut out = NDArray::zeros(shape, dtype);
        kv.pull(key, &mut out)?;
        let rank_0s = filled(key, shape, dtype, 99, 0);
        if out.as_bytes() != rank_0s.as_bytes() {
            return Err(format!("key {key}: init kept {out:?}, not rank 0's value").into());
        }
        ours.push(("init".into(), key, out));
    }
    for round in 0..3 {
        for &(key, shape, dtype) in KEYS {
            let mine = filled(key, shape, dtype, round, rank);
            let mut out = NDArray::zeros(shape, dtype);
            if round < 2 {
                if key == 3 {
                    // Two device values, summed on this worker first.
                    let half = NDArray::full(shape, 0.5, dtype);
                    let rest = filled(key, shape, dtype, round, rank).to_f64_vec();
                    let rest: Vec<f32> = rest.iter().map(|v| (v - 0.5) as f32).collect();
                    let rest = NDArray::from_vec(shape, rest)?.astype(dtype);
                    kv.push(key, &[half, rest][..])?;
                } else {
                    kv.push(key, &mine)?;
                }
                kv.pull(key, &mut out)?;
            } else {
                kv.pushpull(key, &mine, &mut out)?;
            }
            let theirs = filled(key, shape, dtype, round, other).to_f64_vec();
            let expected: Vec<f64> = mine
                .to_f64_vec()
                .iter()
                .zip(&theirs)
                .map(|(a, b)| a + b)
                .collect();
            if out.to_f64_vec() != expected {
                return Err(format!("key {key}, round {round}: pulled {out:?}").into());
            }
            ours.push((round.to_string(), key, out));
        }
    }
    drop(kv);
    job.wait(Duration::from_secs(60))?;
    for (tag, key, out) in &ours {
        let path = job.dir().join(format!("py_{tag}_{key}.bin"));
        let theirs = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if out.as_bytes() != Some(&theirs[..]) {
            return Err(format!("key {key} ({tag}): the Python worker pulled other bytes").into());
        }
    }
    Ok(())
}

/// The reverse direction: MXNet's own Python workers in a job of this crate's scheduler and
/// server (on threads of the test), beside one of this crate's workers: init (rank 0's value),
/// push + pull and pushpull rounds give every worker the exact sums, and the job ends as
/// MXNet's does (the scheduler and the server finish without an error).
fn python_workers_on_our_scheduler_and_server() -> Result<(), Failed> {
    let local = kvstore_pslite::LocalJob::start(1, 3, Duration::from_secs(60))?;
    let mut python = MxnetJob::workers_of(local.worker_options())?;
    let mut script = String::from(PYTHON_VALUE);
    script.push_str(
        "
kv = mx.kv.create('dist_sync')
assert kv.num_workers == 3, kv.num_workers
ranks = range(3)
kv.init(3, value(3, 99, kv.rank, 20, 'float32').reshape((4, 5)))
out = mx.nd.zeros((4, 5))
kv.pull(3, out=out)
assert (out.asnumpy() == value(3, 99, 0, 20, 'float32').reshape((4, 5)).asnumpy()).all(), out
for rnd in range(3):
    v = value(3, rnd, kv.rank, 20, 'float32').reshape((4, 5))
    out = mx.nd.zeros((4, 5))
    if rnd < 2:
        kv.push(3, v)
        kv.pull(3, out=out)
    else:
        kv.pushpull(3, v, out=out)
    want = sum(value(3, rnd, r, 20, 'float32').asnumpy() for r in ranks).reshape((4, 5))
    assert (out.asnumpy() == want).all(), (rnd, out, want)
kv._barrier()
mx.nd.waitall()
",
    );
    python.python_worker("python_worker_a", &script)?;
    python.python_worker("python_worker_b", &script)?;
    let kv = kvstore_base::create_with(NAME, local.worker_options().clone())?;
    let rank = kv.rank();
    let shape: &[usize] = &[4, 5];
    kv.init(3, &filled(3, shape, DType::F32, 99, rank))?;
    for round in 0..3 {
        let mine = filled(3, shape, DType::F32, round, rank);
        let mut out = NDArray::zeros(shape, DType::F32);
        if round < 2 {
            kv.push(3, &mine)?;
            kv.pull(3, &mut out)?;
        } else {
            kv.pushpull(3, &mine, &mut out)?;
        }
        let want: Vec<f64> = (0..20)
            .map(|i| (0..3).map(|r| f64::from(value(3, round, r, i))).sum())
            .collect();
        if out.to_f64_vec() != want {
            return Err(format!("round {round}: pulled {out:?}").into());
        }
    }
    kv.barrier()?;
    drop(kv);
    python.wait(Duration::from_secs(60))?;
    local.join()?;
    Ok(())
}

/// MXNet's servers never acknowledge a plain push in a round where another worker used
/// pushpull: our push fails once `KVSTORE_TIMEOUT_SECS` passed, naming the server, and the
/// pushpull succeeds.
fn push_beside_a_pushpull_fails_naming_the_server() -> Result<(), Failed> {
    let job = MxnetJob::start(1, 2, &[("KVSTORE_TIMEOUT_SECS", "10")])?;
    let options = job.worker_options();
    let workers =
        kvstore_test::create_workers(2, || kvstore_base::create_with(NAME, options.clone()))?;
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter()
            .map(|kv| {
                s.spawn(move || {
                    kv.init(1, &NDArray::zeros(&[2], DType::F32))
                        .map_err(|e| e.to_string())?;
                    let one = NDArray::ones(&[2], DType::F32);
                    let mut out = NDArray::zeros(&[2], DType::F32);
                    if kv.rank() == 0 {
                        kv.pushpull(1, &one, &mut out).map_err(|e| e.to_string())
                    } else {
                        let started = Instant::now();
                        let e = kv.push(1, &one).expect_err("MXNet does not acknowledge it");
                        let e = e.to_string();
                        let waited = started.elapsed();
                        if !e.contains("no answer to push of key 1 from server 8 (rank 0)")
                            || waited > Duration::from_secs(20)
                        {
                            return Err(format!("after {waited:?}: {e}"));
                        }
                        Ok(())
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each worker leaves on a thread of its own: leaving is a barrier of them all.
    std::thread::scope(|s| {
        for kv in workers {
            s.spawn(move || drop(kv));
        }
    });
    job.detach();
    for r in results {
        r?;
    }
    Ok(())
}

/// A job that waits for a worker that never comes: creation fails after the timeout, saying
/// that not every node registered.
fn a_missing_worker_fails_the_registration() -> Result<(), Failed> {
    let job = MxnetJob::start(1, 2, &[("KVSTORE_TIMEOUT_SECS", "2")])?;
    job.wait_for_scheduler(Duration::from_secs(60))?;
    let started = Instant::now();
    let e = kvstore_base::create_with(NAME, job.worker_options())
        .expect_err("the second worker never registers")
        .to_string();
    if !e.contains("sent no node table within 2s: not every node of the job registered")
        || started.elapsed() > Duration::from_secs(8)
    {
        return Err(format!("after {:?}: {e}", started.elapsed()).into());
    }
    Ok(())
}

/// A server that dies while a push waits for the round: the push fails at once (well before
/// the timeout), naming the server.
fn a_lost_server_fails_the_waiting_push_at_once() -> Result<(), Failed> {
    let mut job = MxnetJob::start(1, 2, &[("KVSTORE_TIMEOUT_SECS", "60")])?;
    let options = job.worker_options();
    let workers =
        kvstore_test::create_workers(2, || kvstore_base::create_with(NAME, options.clone()))?;
    std::thread::scope(|s| {
        for kv in &workers {
            s.spawn(move || kv.init(1, &NDArray::zeros(&[2], DType::F32)).unwrap());
        }
    });
    let started = Instant::now();
    let waiting = std::thread::scope(|s| {
        // Rank 0 pushes alone: the round waits for rank 1, which never pushes.
        let push = s.spawn(|| workers[0].push(1, &NDArray::ones(&[2], DType::F32)));
        std::thread::sleep(Duration::from_millis(500));
        job.kill("server0");
        push.join().unwrap()
    });
    let e = waiting.expect_err("the server is gone").to_string();
    if !e.contains("server 8 (rank 0)") || started.elapsed() > Duration::from_secs(20) {
        return Err(format!("after {:?}: {e}", started.elapsed()).into());
    }
    drop(job);
    // Their goodbyes fail at once: the scheduler is gone too.
    let started = Instant::now();
    drop(workers);
    if started.elapsed() > Duration::from_secs(20) {
        return Err(format!("the workers took {:?} to end", started.elapsed()).into());
    }
    Ok(())
}

/// The keys of the compressed jobs: key 10 is cut across two servers (at 1,000 elements).
const COMPRESSED_KEYS: &[(i64, usize)] = &[(3, 20), (10, 3000)];

/// The compressed rounds of a Python worker: 2-bit compression set before `init`, then
/// push + pull rounds; each pull is checked against the sum of what every worker sent
/// (replayed with [`PYTHON_SENT`]) and saved.
fn compressed_python_script(workers: usize, rounds: usize) -> String {
    let mut script = format!("{PYTHON_VALUE}{PYTHON_SENT}");
    script.push_str(&format!(
        "
kv = mx.kv.create('dist_sync')
kv.set_gradient_compression({{'type': '2bit', 'threshold': 0.5}})
keys = {keys:?}
residuals = {{(r, key): np.zeros(n, dtype=np.float32) for r in range({workers}) for key, n in keys}}
for key, n in keys:
    kv.init(key, value(key, 99, kv.rank, n, 'float32'))
for rnd in range({rounds}):
    for key, n in keys:
        kv.push(key, value(key, rnd, kv.rank, n, 'float32'))
        out = mx.nd.zeros((n,))
        kv.pull(key, out=out)
        want = sum(sent(value(key, rnd, r, n, 'float32').asnumpy(), residuals[(r, key)], 0.5)
                   for r in range({workers}))
        assert (out.asnumpy() == want).all(), (key, rnd, out, want)
        open(os.path.join(OUT, 'py_%d_%d.bin' % (rnd, key)), 'wb').write(out.asnumpy().tobytes())
mx.nd.waitall()
",
        keys = COMPRESSED_KEYS,
    ));
    script
}

/// This crate's side of a compressed job: the same rounds as [`compressed_python_script`];
/// returns every pull, checked against the sum of what every worker sent.
fn compressed_rounds(
    kv: &dyn kvstore_base::KVStoreBase,
    workers: usize,
    rounds: usize,
) -> Result<Vec<(usize, i64, NDArray)>, Failed> {
    let params = [("type", "2bit"), ("threshold", "0.5")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    kv.set_gradient_compression(&params)?;
    let rank = kv.rank();
    let vector = |key: i64, round: usize, rank: usize, n: usize| -> Vec<f32> {
        (0..n).map(|i| value(key, round, rank, i)).collect()
    };
    for &(key, n) in COMPRESSED_KEYS {
        kv.init(key, &NDArray::from_vec(&[n], vector(key, 99, rank, n))?)?;
    }
    let mut residuals = std::collections::BTreeMap::new();
    let mut pulls = Vec::new();
    for round in 0..rounds {
        for &(key, n) in COMPRESSED_KEYS {
            kv.push(key, &NDArray::from_vec(&[n], vector(key, round, rank, n))?)?;
            let mut out = NDArray::zeros(&[n], DType::F32);
            kv.pull(key, &mut out)?;
            let mut want = vec![0.0f32; n];
            for r in 0..workers {
                let residual = residuals.entry((r, key)).or_insert_with(|| vec![0.0f32; n]);
                for (w, v) in want
                    .iter_mut()
                    .zip(sent(&vector(key, round, r, n), residual, 0.5))
                {
                    *w += v;
                }
            }
            let want: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
            if out.to_f64_vec() != want {
                return Err(format!("key {key}, round {round}: pulled {out:?}").into());
            }
            pulls.push((round, key, out));
        }
    }
    Ok(pulls)
}

/// 2-bit compression in a job of MXNet's scheduler and 2 servers, beside an MXNet Python
/// worker: MXNet's servers take this worker's compressed pushes (a key whole on one server and
/// one cut across both, in MXNet's compressed layout), and every pull equals the Python
/// worker's, bit for bit, and the sum of what both workers sent.
fn compressed_beside_a_python_worker() -> Result<(), Failed> {
    let mut job = MxnetJob::start(2, 2, &[("MXNET_KVSTORE_BIGARRAY_BOUND", "1000")])?;
    job.python_worker("python_worker", &compressed_python_script(2, 3))?;
    let kv = kvstore_base::create_with(NAME, job.worker_options())?;
    let pulls = compressed_rounds(kv.as_ref(), 2, 3)?;
    drop(kv);
    job.wait(Duration::from_secs(60))?;
    for (round, key, out) in &pulls {
        let path = job.dir().join(format!("py_{round}_{key}.bin"));
        let theirs = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if out.as_bytes() != Some(&theirs[..]) {
            return Err(
                format!("key {key} (round {round}): the Python worker pulled other bytes").into(),
            );
        }
    }
    Ok(())
}

/// The reverse direction: two MXNet Python workers and one of ours, all with 2-bit
/// compression, on this crate's scheduler and 2 servers: the servers dequantise MXNet's
/// compressed pushes as MXNet's would, and every worker pulls the sum of what all sent.
fn compressed_python_workers_on_our_servers() -> Result<(), Failed> {
    let local = kvstore_pslite::LocalJob::start(2, 3, Duration::from_secs(60))?;
    let mut options = local.worker_options().clone();
    options.insert("MXNET_KVSTORE_BIGARRAY_BOUND".into(), "1000".into());
    let mut python = MxnetJob::workers_of(&options)?;
    let script = compressed_python_script(3, 3);
    python.python_worker("python_worker_a", &script)?;
    python.python_worker("python_worker_b", &script)?;
    let kv = kvstore_base::create_with(NAME, options)?;
    compressed_rounds(kv.as_ref(), 3, 3)?;
    drop(kv);
    python.wait(Duration::from_secs(60))?;
    local.join()?;
    Ok(())
}

/// Two MXNet Python workers training with the optimizer on the servers (`kv.set_optimizer`,
/// MXNet's default for dist jobs): `optimizer` (Python) is set, keys 3 and 10 (cut across both
/// servers) are initialised, then 4 rounds of push + pull; every pulled weight is saved.
fn optimizer_script(optimizer: &str, dtype: &str) -> String {
    format!(
        "{PYTHON_VALUE}
kv = mx.kv.create('dist_sync')
kv.set_optimizer({optimizer})
keys = [(3, 20), (10, 3000)]
for key, n in keys:
    kv.init(key, value(key, 99, 0, n, '{dtype}'))
for rnd in range(4):
    for key, n in keys:
        kv.push(key, value(key, rnd, kv.rank, n, '{dtype}'))
        out = mx.nd.zeros((n,), dtype='{dtype}')
        kv.pull(key, out=out)
        open(os.path.join(OUT, 'w_%d_%d_%d.bin' % (kv.rank, rnd, key)), 'wb').write(out.asnumpy().tobytes())
mx.nd.waitall()
"
    )
}

/// The weights MXNet's Python workers pulled in [`optimizer_script`], by file name.
fn pulled_weights(dir: &std::path::Path) -> Result<Weights, Failed> {
    let mut files = Vec::new();
    for rank in 0..2 {
        for round in 0..4 {
            for key in [3, 10] {
                let name = format!("w_{rank}_{round}_{key}.bin");
                let bytes = std::fs::read(dir.join(&name)).map_err(|e| format!("{name}: {e}"))?;
                files.push((name, bytes));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Pulled weights by the file names of [`optimizer_script`].
type Weights = Vec<(String, Vec<u8>)>;

/// This crate's workers, in place of the Python workers of [`optimizer_script`], setting the
/// optimizer `spec` (which `set_optimizer` sends as the pickle MXNet builds its own optimizer
/// from) in a job of `options`; returns what they pulled, by the script's file names.
fn rust_optimizer_rounds(
    options: &std::collections::BTreeMap<String, String>,
    spec: &kvstore_base::OptimizerSpec,
    dtype: DType,
) -> Result<Vec<(String, Vec<u8>)>, Failed> {
    let workers =
        kvstore_test::create_workers(2, || kvstore_base::create_with(NAME, options.clone()))?;
    let keys: [(i64, usize); 2] = [(3, 20), (10, 3000)];
    let pulled: Vec<Result<Weights, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter()
            .map(|kv| {
                s.spawn(move || -> Result<Weights, String> {
                    let at = |e: kvstore_base::Error| e.to_string();
                    kv.set_optimizer(spec).map_err(at)?;
                    for (key, n) in keys {
                        kv.init(key, &filled(key, &[n], dtype, 99, 0)).map_err(at)?;
                    }
                    let mut files = Vec::new();
                    for round in 0..4 {
                        for (key, n) in keys {
                            let grad = filled(key, &[n], dtype, round, kv.rank());
                            kv.push(key, &grad).map_err(at)?;
                            let mut out = NDArray::zeros(&[n], dtype);
                            kv.pull(key, &mut out).map_err(at)?;
                            let name = format!("w_{}_{round}_{key}.bin", kv.rank());
                            files.push((name, out.as_bytes().unwrap_or_default().to_vec()));
                        }
                    }
                    Ok(files)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    std::thread::scope(|s| {
        for kv in workers {
            s.spawn(move || drop(kv));
        }
    });
    let mut files = Vec::new();
    for worker in pulled {
        files.extend(worker?);
    }
    files.sort();
    Ok(files)
}

/// MXNet's Python workers set an optimizer on the servers (a pickle): on this crate's servers,
/// which read the pickle as data and rebuild the optimizer by name, the weights they pull are
/// those MXNet's own servers give them, bit for bit; and this crate's workers, setting the same
/// optimizer on MXNet's servers (a pickle MXNet builds its optimizer from), pull the same
/// weights too. For sgd with momentum, weight decay, rescaled gradients and a factor schedule,
/// for adam, and for sgd with momentum on float16 weights with float32 master copies
/// (`multi_precision`).
fn python_optimizers_on_our_servers_match_mxnets() -> Result<(), Failed> {
    use kvstore_base::{OptimizerSpec, ParamValue};
    let factor = ParamValue::Map(
        [
            ("type".to_string(), ParamValue::from("factor")),
            ("step".to_string(), ParamValue::Int(2)),
            ("factor".to_string(), ParamValue::Float(0.5)),
        ]
        .into_iter()
        .collect(),
    );
    let optimizers = [
        (
            "mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=0.01, rescale_grad=0.5, \
             lr_scheduler=mx.lr_scheduler.FactorScheduler(step=2, factor=0.5))",
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", 0.9)
                .with("wd", 0.01)
                .with("rescale_grad", 0.5)
                .with("lr_scheduler", factor),
            DType::F32,
        ),
        (
            "mx.optimizer.Adam(learning_rate=0.01, wd=0.001, clip_gradient=0.75)",
            OptimizerSpec::new("adam")
                .with("learning_rate", 0.01)
                .with("wd", 0.001)
                .with("clip_gradient", 0.75),
            DType::F32,
        ),
        (
            "mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, multi_precision=True)",
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", 0.9)
                .with("multi_precision", true),
            DType::F16,
        ),
    ];
    let bound = [("MXNET_KVSTORE_BIGARRAY_BOUND", "1000")];
    for (optimizer, spec, dtype) in optimizers {
        let script = optimizer_script(optimizer, &dtype.to_string());
        let mut theirs = MxnetJob::start(2, 2, &bound)?;
        theirs.python_worker("python_worker_a", &script)?;
        theirs.python_worker("python_worker_b", &script)?;
        theirs.wait(Duration::from_secs(60))?;
        let expected = pulled_weights(theirs.dir())?;

        let local = kvstore_pslite::LocalJob::start(2, 2, Duration::from_secs(60))?;
        let mut options = local.worker_options().clone();
        options.insert(bound[0].0.into(), bound[0].1.into());
        let mut ours = MxnetJob::workers_of(&options)?;
        ours.python_worker("python_worker_a", &script)?;
        ours.python_worker("python_worker_b", &script)?;
        ours.wait(Duration::from_secs(60))?;
        local.join()?;
        let what = format!("{optimizer}, MXNet's workers on our servers");
        common::first_difference(&what, &expected, &pulled_weights(ours.dir())?)?;

        let job = MxnetJob::start(2, 2, &bound)?;
        let rust = rust_optimizer_rounds(&job.worker_options(), &spec, dtype)?;
        job.detach();
        let what = format!("{optimizer}, our workers on MXNet's servers");
        common::first_difference(&what, &expected, &rust)?;
    }
    Ok(())
}

/// MXNet's `dist_async` Python workers on this crate's servers, with an optimizer on them: each
/// push steps the weight as it arrives (sgd, learning rate 1: three pushes of ones by each of
/// two workers take the weight from 0 to -6, whatever their order).
fn python_async_workers_on_our_servers() -> Result<(), Failed> {
    let local = kvstore_pslite::LocalJob::start(1, 2, Duration::from_secs(60))?;
    let mut python = MxnetJob::workers_of(local.worker_options())?;
    let script = "
kv = mx.kv.create('dist_async')
kv.set_optimizer(mx.optimizer.SGD(learning_rate=1.0))
kv.init(3, mx.nd.zeros((4,)))
for _ in range(3):
    kv.push(3, mx.nd.ones((4,)))
mx.nd.waitall()
kv._barrier()
out = mx.nd.zeros((4,))
kv.pull(3, out=out)
assert (out.asnumpy() == -6).all(), out
mx.nd.waitall()
";
    python.python_worker("python_worker_a", script)?;
    python.python_worker("python_worker_b", script)?;
    python.wait(Duration::from_secs(60))?;
    local.join()?;
    Ok(())
}

/// `pslite_dist_async` beside an MXNet `dist_async` Python worker, on MXNet's scheduler and 2
/// servers (key 10 cut across both): our push before `set_optimizer` is refused, naming the
/// key, and reaches no server; once both set SGD (lr 0.5), the Python worker pushes 2.0 three
/// times and ours once, and each push is applied as it arrives: a sync server would hold the
/// Python worker's second push forever, and the weights end at 10 - 0.5 · 2 · 4 = 6 on both.
fn async_beside_a_python_worker() -> Result<(), Failed> {
    let mut job = MxnetJob::start(2, 2, &[("MXNET_KVSTORE_BIGARRAY_BOUND", "1000")])?;
    let script = "
kv = mx.kv.create('dist_async')
kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.5))
keys = [(3, (20,)), (10, (3000,))]
for key, shape in keys:
    kv.init(key, mx.nd.full(shape, 10.0))
kv._barrier()
for _ in range(3):
    for key, shape in keys:
        kv.push(key, mx.nd.full(shape, 2.0))
mx.nd.waitall()
kv._barrier()
for key, shape in keys:
    out = mx.nd.zeros(shape)
    kv.pull(key, out=out)
    assert (out.asnumpy() == 6.0).all(), (key, out)
mx.nd.waitall()
";
    job.python_worker("python_worker", script)?;
    let kv = kvstore_base::create_with(kvstore_pslite::ASYNC_NAME, job.worker_options())?;
    let keys: [(i64, usize); 2] = [(3, 20), (10, 3000)];
    for (key, len) in keys {
        kv.init(key, &NDArray::full(&[len], 10.0, DType::F32))?;
    }
    let refused = kv
        .push(3, &NDArray::full(&[20], 2.0, DType::F32))
        .expect_err("a push before set_optimizer")
        .to_string();
    if !refused.contains("key 3") || !refused.contains("set_optimizer") {
        return Err(format!("the refusal says: {refused}").into());
    }
    kv.set_optimizer(&kvstore_base::OptimizerSpec::new("sgd").with("learning_rate", 0.5))?;
    kv.barrier()?;
    for (key, len) in keys {
        kv.push(key, &NDArray::full(&[len], 2.0, DType::F32))?;
    }
    kv.barrier()?;
    for (key, len) in keys {
        let mut out = NDArray::zeros(&[len], DType::F32);
        kv.pull(key, &mut out)?;
        if out.to_f64_vec() != vec![6.0; len] {
            return Err(format!("key {key}: pulled {out:?}, 6 expected").into());
        }
    }
    drop(kv);
    job.wait(Duration::from_secs(60))?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let tests: &[(&str, common::Test)] = &[
        ("beside_a_python_worker", beside_a_python_worker),
        (
            "python_workers_on_our_scheduler_and_server",
            python_workers_on_our_scheduler_and_server,
        ),
        (
            "compressed_beside_a_python_worker",
            compressed_beside_a_python_worker,
        ),
        (
            "compressed_python_workers_on_our_servers",
            compressed_python_workers_on_our_servers,
        ),
        (
            "python_optimizers_on_our_servers_match_mxnets",
            python_optimizers_on_our_servers_match_mxnets,
        ),
        (
            "python_async_workers_on_our_servers",
            python_async_workers_on_our_servers,
        ),
        ("async_beside_a_python_worker", async_beside_a_python_worker),
        (
            "push_beside_a_pushpull_fails_naming_the_server",
            push_beside_a_pushpull_fails_naming_the_server,
        ),
        (
            "a_missing_worker_fails_the_registration",
            a_missing_worker_fails_the_registration,
        ),
        (
            "a_lost_server_fails_the_waiting_push_at_once",
            a_lost_server_fails_the_waiting_push_at_once,
        ),
    ];
    common::run_or_ignore(tests.iter().map(|(name, _)| name.to_string()), || {
        tests
            .iter()
            .map(|&(name, test)| Trial::test(name, test))
            .collect()
    })
}
