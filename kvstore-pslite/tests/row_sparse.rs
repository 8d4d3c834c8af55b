//! MXNet's row-sparse keys over ps-lite (`kRowSparsePushPull`): MXNet 1.9.1's own Python
//! workers, pushing row-sparse gradients and pulling rows (`row_sparse_pull`), on this crate's
//! scheduler and servers, checked against the same workers on MXNet's own servers.
//!
//! Without MXNet 1.9.1 (`KVSTORE_MXNET_PYTHON`) every test is reported ignored, with the
//! reason.
use std::time::Duration;

use kvstore_base::{DType, KVStoreExt, NDArray, OptimizerSpec};
use libtest_mimic::{Failed, Trial};

mod common;

use common::MxnetJob;

/// The job's settings: key 10 (400 rows of 5) is above the bound, so it is cut across both
/// servers by rows.
const BOUND: (&str, &str) = ("MXNET_KVSTORE_BIGARRAY_BOUND", "1000");

/// Two MXNet Python workers with row-sparse keys 3 (6 rows of 3) and 10 (400 rows of 5): every
/// row initialised, `optimizer` set on the servers (none when empty), then 3 rounds in which
/// each worker pushes a gradient holding a third of the rows (others on each worker and round;
/// a row no worker pushes in some rounds) and pulls the rows it asks for: every row, or a
/// few out of order with repeats; every pull saved.
fn script(optimizer: &str) -> String {
    let set_optimizer = match optimizer {
        "" => String::new(),
        optimizer => format!("kv.set_optimizer({optimizer})"),
    };
    format!(
        "
def value(key, rnd, rank, shape):
    i = np.arange(shape[0] * shape[1])
    return mx.nd.array(((i * 7 + rnd * 13 + rank * 5 + key) % 17) / 8.0 - 1.0).reshape(shape)
kv = mx.kv.create('dist_sync')
{set_optimizer}
keys = [(3, (6, 3)), (10, (400, 5))]
for key, shape in keys:
    kv.init(key, value(key, 99, 0, shape).tostype('row_sparse'))
kv._barrier()
for rnd in range(3):
    for key, shape in keys:
        rows = [r for r in range(shape[0]) if (r + rnd + kv.rank) % 3 == 0 and r % 5 != 4]
        grad = mx.nd.zeros(shape)
        grad[rows] = value(key, rnd, kv.rank, shape)[rows]
        kv.push(key, grad.tostype('row_sparse'))
        out = mx.nd.sparse.zeros('row_sparse', shape)
        kv.row_sparse_pull(key, out=out, row_ids=mx.nd.arange(shape[0], dtype='int64'))
        open(os.path.join(OUT, 'w_%d_%d_%d.bin' % (kv.rank, rnd, key)), 'wb').write(out.asnumpy().tobytes())
        some = mx.nd.array([shape[0] - 1, 2, 1, 2], dtype='int64')
        few = mx.nd.sparse.zeros('row_sparse', shape)
        kv.row_sparse_pull(key, out=few, row_ids=some)
        open(os.path.join(OUT, 'f_%d_%d_%d.bin' % (kv.rank, rnd, key)), 'wb').write(few.asnumpy().tobytes())
mx.nd.waitall()
"
    )
}

/// Pulled values by the file names of [`script`].
type Files = Vec<(String, Vec<u8>)>;

/// What the workers of [`script`] pulled, by file name.
fn pulled(dir: &std::path::Path) -> Result<Files, Failed> {
    let mut files = Vec::new();
    for tag in ["w", "f"] {
        for rank in 0..2 {
            for round in 0..3 {
                for key in [3, 10] {
                    let name = format!("{tag}_{rank}_{round}_{key}.bin");
                    let bytes =
                        std::fs::read(dir.join(&name)).map_err(|e| format!("{name}: {e}"))?;
                    files.push((name, bytes));
                }
            }
        }
    }
    Ok(files)
}

/// [`script`] with two Python workers on MXNet's scheduler and 2 servers, or on this crate's
/// (`ours`); returns what they pulled.
fn run(optimizer: &str, ours: bool) -> Result<Files, Failed> {
    let script = script(optimizer);
    if !ours {
        let mut job = MxnetJob::start(2, 2, &[BOUND])?;
        job.python_worker("python_worker_a", &script)?;
        job.python_worker("python_worker_b", &script)?;
        job.wait(Duration::from_secs(60))?;
        return pulled(job.dir());
    }
    let local = kvstore_pslite::LocalJob::start(2, 2, Duration::from_secs(60))?;
    let mut options = local.worker_options().clone();
    options.insert(BOUND.0.into(), BOUND.1.into());
    let mut job = MxnetJob::workers_of(&options)?;
    job.python_worker("python_worker_a", &script)?;
    job.python_worker("python_worker_b", &script)?;
    job.wait(Duration::from_secs(60))?;
    local.join()?;
    pulled(job.dir())
}

/// This crate's workers in place of [`script`]'s Python workers, in a job of `options`,
/// setting `spec` (which reaches MXNet's servers as the pickle of MXNet's own optimizer);
/// returns what they pulled, by the script's file names.
fn rust_rounds(
    options: &std::collections::BTreeMap<String, String>,
    spec: &OptimizerSpec,
) -> Result<Files, Failed> {
    let workers = kvstore_test::create_workers(2, || {
        kvstore_base::create_with(kvstore_pslite::NAME, options.clone())
    })?;
    let value = |key: usize, round: usize, rank: usize, rows: usize, cols: usize| {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7 + round * 13 + rank * 5 + key) % 17) as f32 / 8.0 - 1.0)
            .collect();
        NDArray::from_vec(&[rows, cols], data).expect("rows x cols")
    };
    let keys = [(3usize, 6usize, 3usize), (10, 400, 5)];
    let pulled = common::on_each_worker(workers, |kv| -> Result<Files, String> {
        let e = |e: kvstore_base::Error| e.to_string();
        let rank = kv.rank();
        let mut files = Vec::new();
        kv.set_optimizer(spec).map_err(e)?;
        for (key, rows, cols) in keys {
            let every: Vec<i64> = (0..rows as i64).collect();
            let init = value(key, 99, 0, rows, cols)
                .retain_rows(&every)
                .map_err(e)?;
            kv.init(key as i64, &init).map_err(e)?;
        }
        kv.barrier().map_err(e)?;
        for round in 0..3 {
            for (key, rows, cols) in keys {
                let pushed: Vec<i64> = (0..rows)
                    .filter(|r| (r + round + rank) % 3 == 0 && r % 5 != 4)
                    .map(|r| r as i64)
                    .collect();
                let grad = value(key, round, rank, rows, cols)
                    .retain_rows(&pushed)
                    .map_err(e)?;
                kv.push(key as i64, &grad).map_err(e)?;
                let zeros = NDArray::zeros(&[0, cols], DType::F32);
                let empty = NDArray::row_sparse(&[rows, cols], vec![], &zeros).map_err(e)?;
                let mut out = empty.clone();
                let all = NDArray::from_vec(&[rows], (0..rows as i64).collect()).map_err(e)?;
                kv.row_sparse_pull(key as i64, &mut out, &all).map_err(e)?;
                let bytes = |a: &NDArray| a.to_dense().as_bytes().unwrap().to_vec();
                files.push((format!("w_{rank}_{round}_{key}.bin"), bytes(&out)));
                let some = vec![rows as i64 - 1, 2, 1, 2];
                let some = NDArray::from_vec(&[4], some).map_err(e)?;
                let mut few = empty;
                kv.row_sparse_pull(key as i64, &mut few, &some).map_err(e)?;
                files.push((format!("f_{rank}_{round}_{key}.bin"), bytes(&few)));
            }
        }
        Ok(files)
    })?;
    Ok(pulled.into_iter().flatten().collect())
}

/// The first file whose bytes differ between two runs (in any order), named.
fn same(
    what: &str,
    theirs: &[(String, Vec<u8>)],
    ours: &[(String, Vec<u8>)],
) -> Result<(), String> {
    let (mut theirs, mut ours) = (theirs.to_vec(), ours.to_vec());
    theirs.sort();
    ours.sort();
    common::first_difference(what, &theirs, &ours)
}

/// With an optimizer on the servers (lazy sgd, sgd with momentum, adam), MXNet's Python
/// workers pull from this crate's servers the rows MXNet's servers give them, bit for bit; and
/// this crate's workers, in their place on MXNet's servers, pull the same rows too.
fn optimizers_step_the_pushed_rows_as_mxnets_servers_do() -> Result<(), Failed> {
    for (optimizer, spec) in [
        (
            "mx.optimizer.SGD(learning_rate=0.5)",
            OptimizerSpec::new("sgd").with("learning_rate", 0.5),
        ),
        (
            "mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=0.01)",
            OptimizerSpec::new("sgd")
                .with("learning_rate", 0.1)
                .with("momentum", 0.9)
                .with("wd", 0.01),
        ),
        (
            "mx.optimizer.Adam(learning_rate=0.01)",
            OptimizerSpec::new("adam").with("learning_rate", 0.01),
        ),
    ] {
        let theirs = run(optimizer, false)?;
        let ours = run(optimizer, true)?;
        same(
            &format!("{optimizer}, MXNet's workers on our servers"),
            &theirs,
            &ours,
        )?;
        let job = MxnetJob::start(2, 2, &[BOUND])?;
        let rust = rust_rounds(&job.worker_options(), &spec)?;
        job.detach();
        same(
            &format!("{optimizer}, our workers on MXNet's servers"),
            &theirs,
            &rust,
        )?;
    }
    Ok(())
}

/// Without an optimizer, a round's rows (summed over the workers) replace the value and the
/// rows no worker pushed become zeros, as a local store keeps a row-sparse sum. (MXNet's
/// servers read their sparse sum as if it held every row: not compared.)
fn without_an_optimizer_the_rounds_rows_replace_the_value() -> Result<(), Failed> {
    let ours = run("", true)?;
    for (name, bytes) in &ours {
        let mut parts = name.trim_end_matches(".bin").split('_').skip(1);
        let mut next = || parts.next().and_then(|p| p.parse::<usize>().ok()).unwrap();
        let (_, round, key) = (next(), next(), next());
        if !name.starts_with("w_") {
            continue;
        }
        let (rows, cols) = if key == 3 { (6, 3) } else { (400, 5) };
        let got: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for r in 0..rows {
            for c in 0..cols {
                let i = r * cols + c;
                let value =
                    |rank: usize| ((i * 7 + round * 13 + rank * 5 + key) % 17) as f32 / 8.0 - 1.0;
                let expected: f32 = (0..2)
                    .filter(|rank| (r + round + rank) % 3 == 0 && r % 5 != 4)
                    .map(value)
                    .sum();
                if got[i] != expected {
                    return Err(format!(
                        "{name}: row {r}, column {c}: {}, {expected} expected",
                        got[i]
                    )
                    .into());
                }
            }
        }
    }
    Ok(())
}

/// An init that lacks rows is refused: the server stops with an error naming the key's rows
/// (MXNet's keeps the rows it got as the first rows, so that later pulls read wrong rows), and
/// the scheduler, seeing the server gone, ends the job at once (the Python worker, which
/// waits in ps-lite, is then killed).
fn an_init_without_every_row_stops_the_server_naming_it() -> Result<(), Failed> {
    let local = kvstore_pslite::LocalJob::start(1, 1, Duration::from_secs(20))?;
    let mut job = MxnetJob::workers_of(local.worker_options())?;
    job.python_worker(
        "python_worker",
        "
kv = mx.kv.create('dist_sync')
value = mx.nd.zeros((4, 2))
value[1] = 1
value[3] = 3
kv.init(7, value.tostype('row_sparse'))
mx.nd.waitall()
",
    )?;
    let ended = local.join().expect_err("the server refuses the init");
    if !ended.contains("key 7 (ps-lite key 7)")
        || !ended.contains("[1, 3]")
        || !ended.contains("left the job before it ended")
    {
        return Err(ended.into());
    }
    job.kill("python_worker");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let tests: [(&str, common::Test); 3] = [
        (
            "optimizers_step_the_pushed_rows_as_mxnets_servers_do",
            optimizers_step_the_pushed_rows_as_mxnets_servers_do,
        ),
        (
            "without_an_optimizer_the_rounds_rows_replace_the_value",
            without_an_optimizer_the_rounds_rows_replace_the_value,
        ),
        (
            "an_init_without_every_row_stops_the_server_naming_it",
            an_init_without_every_row_stops_the_server_naming_it,
        ),
    ];
    common::run_or_ignore(tests.iter().map(|(name, _)| name.to_string()), || {
        tests
            .iter()
            .map(|&(name, test)| Trial::test(name, test))
            .collect()
    })
}
