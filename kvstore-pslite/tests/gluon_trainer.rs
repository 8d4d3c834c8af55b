//! MXNet 1.9.1's Gluon `Trainer`, unchanged, on this crate's scheduler and servers: two Python
//! workers train a small network with `kvstore='dist_sync'`. With the optimizer on the
//! servers, once on MXNet's own scheduler and servers and once on ours: every parameter ends
//! bit-identical.
//!
//! The `Trainer` drives the store as MXNet programs do: it initialises every parameter (rank
//! 0's values kept), and either sets its optimizer on the servers (`update_on_kvstore`, the
//! default for dist stores: a pickle of the optimizer with its parameter names, which our
//! server reads as data) or pulls the summed gradients and updates on the workers.
//!
//! Every run also trains the same network in one process on both workers' data (Gluon without
//! a store, a batch of 32): the parameters of the job must be those, to float32 rounding.
//!
//! With the optimizer on the workers (`update_on_kvstore=False`) the job is not compared with
//! MXNet's servers: on MXNet's own scheduler and servers, MXNet's own workers end up to 1.8
//! away from the one-process run (sgd with momentum), and with other bytes from one run to the
//! next (adam), while on this crate's servers they are the one-process run's to 3e-8.
//!
//! Without MXNet 1.9.1 (`KVSTORE_MXNET_PYTHON`) every test is reported ignored, with the
//! reason.
use std::time::Duration;

use libtest_mimic::{Failed, Trial};

mod common;

use common::MxnetJob;

/// Two workers train a 4-8-1 network (Xavier-initialised from one seed; each worker's own
/// data) for 4 steps with `optimizer` (`update_on_kvstore` as given); every parameter saved,
/// and the largest distance of any from the same training in one process on both workers'
/// data (`diff_<rank>.txt`).
fn script(optimizer: &str, update_on_kvstore: bool) -> String {
    let update = if update_on_kvstore { "True" } else { "False" };
    format!(
        "
from mxnet import gluon, autograd, nd
kv = mx.kv.create('dist_sync')
mx.random.seed(7)
net = gluon.nn.Sequential(prefix='net_')
with net.name_scope():
    net.add(gluon.nn.Dense(8, in_units=4, activation='relu'), gluon.nn.Dense(1, in_units=8))
net.initialize(mx.init.Xavier(rnd_type='uniform', magnitude=2.0))
trainer = gluon.Trainer(net.collect_params(), {optimizer}, kvstore=kv,
                        update_on_kvstore={update})
data = np.random.RandomState(kv.rank)
x = nd.array(data.uniform(-1, 1, (16, 4)))
y = nd.array(data.uniform(-1, 1, (16, 1)))
loss_fn = gluon.loss.L2Loss()
for step in range(4):
    with autograd.record():
        loss = loss_fn(net(x), y)
    loss.backward()
    trainer.step(16 * kv.num_workers)
for name, p in sorted(net.collect_params().items()):
    open(os.path.join(OUT, 'p_%d_%s.bin' % (kv.rank, name)), 'wb').write(p.data().asnumpy().tobytes())
mx.random.seed(7)
ref = gluon.nn.Sequential(prefix='ref_')
with ref.name_scope():
    ref.add(gluon.nn.Dense(8, in_units=4, activation='relu'), gluon.nn.Dense(1, in_units=8))
ref.initialize(mx.init.Xavier(rnd_type='uniform', magnitude=2.0))
alone = gluon.Trainer(ref.collect_params(), {optimizer}, kvstore=None)
xs, ys = [], []
for rank in range(2):
    d = np.random.RandomState(rank)
    xs.append(d.uniform(-1, 1, (16, 4)))
    ys.append(d.uniform(-1, 1, (16, 1)))
X, Y = nd.array(np.concatenate(xs)), nd.array(np.concatenate(ys))
for step in range(4):
    with autograd.record():
        loss = loss_fn(ref(X), Y)
    loss.backward()
    alone.step(32)
pairs = zip(sorted(net.collect_params().items()), sorted(ref.collect_params().items()))
diff = max(float(np.abs(a.data().asnumpy() - b.data().asnumpy()).max()) for (_, a), (_, b) in pairs)
open(os.path.join(OUT, 'diff_%d.txt' % kv.rank), 'w').write(repr(diff))
mx.nd.waitall()
"
    )
}

/// The parameters the workers of [`script`] saved, by file name, sorted.
fn saved(dir: &std::path::Path) -> Result<Vec<(String, Vec<u8>)>, Failed> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("p_") && name.ends_with(".bin") {
            let bytes = std::fs::read(entry.path()).map_err(|e| format!("{name}: {e}"))?;
            files.push((name, bytes));
        }
    }
    files.sort();
    // Two workers, two layers of a weight and a bias each.
    if files.len() != 8 {
        return Err(format!(
            "{} parameter files in {}, 8 expected",
            files.len(),
            dir.display()
        )
        .into());
    }
    Ok(files)
}

/// A bound of 16 elements: the first layer's weight (32) is cut across both servers.
const BOUND: (&str, &str) = ("MXNET_KVSTORE_BIGARRAY_BOUND", "16");

/// [`script`] on this crate's scheduler and 2 servers: the parameters, checked to be the
/// one-process training's to float32 rounding.
fn on_our_servers(script: &str) -> Result<Vec<(String, Vec<u8>)>, Failed> {
    let local = kvstore_pslite::LocalJob::start(2, 2, Duration::from_secs(60))?;
    let mut options = local.worker_options().clone();
    options.insert(BOUND.0.into(), BOUND.1.into());
    let mut ours = MxnetJob::workers_of(&options)?;
    ours.python_worker("python_worker_a", script)?;
    ours.python_worker("python_worker_b", script)?;
    ours.wait(Duration::from_secs(90))?;
    local.join()?;
    for rank in 0..2 {
        let path = ours.dir().join(format!("diff_{rank}.txt"));
        let diff: f64 = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .trim()
            .parse()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if diff > 1e-6 {
            return Err(format!(
                "rank {rank}: a parameter is {diff} away from the one-process training's"
            )
            .into());
        }
    }
    saved(ours.dir())
}

/// The optimizer on the servers: [`script`] on MXNet's scheduler and 2 servers and on this
/// crate's gives the same parameters, bit for bit.
fn on_the_servers_trains_as_on_mxnets(optimizer: &str) -> Result<(), Failed> {
    let script = script(optimizer, true);
    let mut theirs = MxnetJob::start(2, 2, &[BOUND])?;
    theirs.python_worker("python_worker_a", &script)?;
    theirs.python_worker("python_worker_b", &script)?;
    theirs.wait(Duration::from_secs(90))?;
    let expected = saved(theirs.dir())?;
    let ours = on_our_servers(&script)?;
    let what = format!("Trainer({optimizer}) on the servers");
    Ok(common::first_difference(&what, &expected, &ours)?)
}

fn main() -> std::process::ExitCode {
    let tests: [(&str, common::Test); 4] = [
        ("sgd_on_the_servers_trains_as_on_mxnets", || {
            on_the_servers_trains_as_on_mxnets(
                "'sgd', {'learning_rate': 0.1, 'momentum': 0.9, 'wd': 0.001}",
            )
        }),
        ("adam_on_the_servers_trains_as_on_mxnets", || {
            on_the_servers_trains_as_on_mxnets("'adam', {'learning_rate': 0.01}")
        }),
        ("sgd_on_the_workers_trains_as_in_one_process", || {
            let optimizer = "'sgd', {'learning_rate': 0.1, 'momentum': 0.9}";
            on_our_servers(&script(optimizer, false)).map(drop)
        }),
        ("adam_on_the_workers_trains_as_in_one_process", || {
            on_our_servers(&script("'adam', {'learning_rate': 0.01}", false)).map(drop)
        }),
    ];
    common::run_or_ignore(tests.iter().map(|(name, _)| name.to_string()), || {
        tests
            .iter()
            .map(|&(name, test)| Trial::test(name, test))
            .collect()
    })
}
