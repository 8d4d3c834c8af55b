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

use kvstore_pslite::{LocalJob, ASYNC_NAME, NAME};
use kvstore_test::{create_workers, multi_worker_trials, MultiWorkerFactory, Semantics};

mod common;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Jobs of `servers` servers whose workers are `name` stores.
fn jobs(name: &'static str, servers: usize) -> Arc<MultiWorkerFactory> {
    Arc::new(move |n| {
        let job = LocalJob::start(servers, n, TIMEOUT)
            .map_err(|e| kvstore_base::Error::InvalidArgument(e.to_string()))?;
        let options = job.worker_options().clone();
        let workers = create_workers(n, || kvstore_base::create_with(name, options.clone()))?;
        job.detach();
        Ok(workers)
    })
}

/// A pickled optimizer (`kController`) is read as data: MXNet's `SGD` becomes the server's
/// optimizer (rebuilt by name), and a pickle that calls anything else is never run: the server
/// stops with an error naming the call, and the worker's command fails at once, naming the
/// server.
fn pickled_optimizers_are_read_never_run() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreExt, NDArray};
    // MXNet's `SGD` with `lr` 0.5, as protocol 0 writes an object.
    let sgd = "ccopy_reg\n_reconstructor\n(cmxnet.optimizer.optimizer\nSGD\nc__builtin__\n\
               object\nNtR(dVlr\nF0.5\nsVnum_update\nI0\nsVbegin_num_update\nI0\nsb.";
    let job = LocalJob::start(1, 1, Duration::from_secs(3))?;
    let kv = kvstore_base::create_with(NAME, job.worker_options().clone())?;
    kv.send_command_to_servers(0, sgd)?;
    kv.init(1, &NDArray::ones(&[3], DType::F32))?;
    kv.push(1, &NDArray::ones(&[3], DType::F32))?;
    let mut out = NDArray::zeros(&[3], DType::F32);
    kv.pull(1, &mut out)?;
    if out.to_f64_vec() != vec![0.5; 3] {
        return Err(format!("sgd's step from 1 by 0.5 x 1 gave {out:?}").into());
    }
    let marker = std::env::temp_dir().join(format!("kvstore-pickle-ran-{}", std::process::id()));
    let attack = format!("cos\nsystem\n(S'touch {}'\ntR.", marker.display());
    let started = Instant::now();
    let e = kv
        .send_command_to_servers(0, &attack)
        .expect_err("the server refuses it")
        .to_string();
    if !e.contains("server 8 (rank 0)") || started.elapsed() > Duration::from_secs(2) {
        return Err(format!("after {:?}: {e}", started.elapsed()).into());
    }
    drop(kv);
    let ended = job.join().expect_err("the server stopped with an error");
    if !ended.contains("(kController) this server does not run") || !ended.contains("os.system") {
        return Err(ended.into());
    }
    if marker.exists() {
        return Err(format!("{} exists: the pickle ran", marker.display()).into());
    }
    Ok(())
}

/// `pslite_dist_async`: a push before the worker set an optimizer is refused, naming the key
/// and changing nothing; once every worker set SGD, each push steps the weight as it arrives
/// (the servers are in async mode: a worker's push is not held for the others'), and after a
/// barrier every worker pulls the weight every push stepped.
fn each_async_push_steps_the_weight_once_the_optimizer_is_set() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreExt, NDArray, OptimizerSpec};
    let job = LocalJob::start(1, 2, TIMEOUT)?;
    let options = job.worker_options().clone();
    let workers = create_workers(2, || kvstore_base::create_with(ASYNC_NAME, options.clone()))?;
    common::on_each_worker(workers, |kv| -> Result<(), String> {
        let r = kv.rank();
        let e = |e: kvstore_base::Error| format!("rank {r}: {e}");
        kv.init(4, &NDArray::full(&[3], 10.0, DType::F32))
            .map_err(e)?;
        let refused = kv
            .push(4, &NDArray::ones(&[3], DType::F32))
            .expect_err("a push before set_optimizer is refused")
            .to_string();
        if !refused.contains("key 4") || !refused.contains("set_optimizer") {
            return Err(format!("rank {r}: the refusal says {refused}"));
        }
        kv.barrier().map_err(e)?;
        let mut out = NDArray::zeros(&[3], DType::F32);
        kv.pull(4, &mut out).map_err(e)?;
        if out.to_f64_vec() != vec![10.0; 3] {
            return Err(format!("rank {r}: the refused push changed key 4: {out:?}"));
        }
        kv.set_optimizer(&OptimizerSpec::new("sgd").with("learning_rate", 0.5))
            .map_err(e)?;
        kv.barrier().map_err(e)?;
        // Rank 0 pushes twice while rank 1 waits: each push is applied at once.
        if r == 0 {
            for step in 1..=2 {
                kv.push(4, &NDArray::full(&[3], 2.0, DType::F32))
                    .map_err(e)?;
                kv.pull(4, &mut out).map_err(e)?;
                let expected = 10.0 - f64::from(step);
                if out.to_f64_vec() != vec![expected; 3] {
                    return Err(format!(
                        "after rank 0's push {step} alone: {out:?}, {expected} \
                             expected"
                    ));
                }
            }
        }
        kv.barrier().map_err(e)?;
        kv.push(4, &NDArray::full(&[3], 4.0 * (r + 1) as f64, DType::F32))
            .map_err(e)?;
        kv.barrier().map_err(e)?;
        kv.pull(4, &mut out).map_err(e)?;
        // 10 - 0.5 (2 + 2) - 0.5 (4 + 8).
        if out.to_f64_vec() != vec![2.0; 3] {
            return Err(format!("rank {r}: after every push: {out:?}, 2 expected"));
        }
        Ok(())
    })?;
    Ok(job.join()?)
}

/// Every MXNet worker sends the optimizer (`kController`), perhaps after others pushed: the
/// same optimizer again keeps the server's states (MXNet's server starts them afresh); another
/// one replaces it.
fn the_same_optimizer_sent_again_keeps_its_states() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreExt, NDArray, OptimizerSpec};
    let job = LocalJob::start(1, 2, TIMEOUT)?;
    let options = job.worker_options().clone();
    let workers = create_workers(2, || kvstore_base::create_with(NAME, options.clone()))?;
    let momentum = OptimizerSpec::new("sgd")
        .with("learning_rate", 1.0)
        .with("momentum", 0.5);
    common::on_each_worker(workers, |kv| -> Result<(), String> {
        let r = kv.rank();
        let e = |e: kvstore_base::Error| format!("rank {r}: {e}");
        kv.init(4, &NDArray::zeros(&[2], DType::F32)).map_err(e)?;
        if r == 0 {
            kv.set_optimizer(&momentum).map_err(e)?;
        }
        kv.barrier().map_err(e)?;
        let mut out = NDArray::zeros(&[2], DType::F32);
        // Steps of the gradient 2 (a push of ones from each worker).
        let mut step = |kv: &dyn kvstore_base::KVStoreBase, expected: f64, what: &str| {
            kv.pushpull(4, &NDArray::ones(&[2], DType::F32), &mut out)
                .map_err(e)?;
            match out.to_f64_vec() == vec![expected; 2] {
                true => Ok(()),
                false => Err(format!("rank {r}: {what}: {out:?}, {expected} expected")),
            }
        };
        step(kv, -2.0, "the first step")?;
        // Rank 1 sends the same optimizer late: the momentum (-2) is kept.
        if r == 1 {
            kv.set_optimizer(&momentum).map_err(e)?;
        }
        kv.barrier().map_err(e)?;
        step(kv, -5.0, "a step after the same optimizer came again")?;
        // Another optimizer replaces it, with fresh states: plain sgd steps by 0.5 * 2.
        if r == 0 {
            kv.set_optimizer(&OptimizerSpec::new("sgd").with("learning_rate", 0.5))
                .map_err(e)?;
        }
        kv.barrier().map_err(e)?;
        step(kv, -6.0, "a step after another optimizer")
    })?;
    Ok(job.join()?)
}

/// Under `multi_precision` (MXNet's workers then send `kSetMultiPrecision`) a round of
/// float16 pushes is summed in float32, as MXNet's server sums it: two pushes of 40000 would
/// be infinite in float16; in float32 the master copy takes 0 - 0.01 * 80000 = -800. Key 3 is
/// dense, key 4 row-sparse (row 1 pushed).
fn with_multi_precision_half_pushes_are_summed_in_float32() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreExt, NDArray, OptimizerSpec};
    let job = LocalJob::start(1, 2, TIMEOUT)?;
    let options = job.worker_options().clone();
    let workers = create_workers(2, || kvstore_base::create_with(NAME, options.clone()))?;
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.01)
        .with("multi_precision", true);
    common::on_each_worker(workers, |kv| -> Result<(), String> {
        let r = kv.rank();
        let e = |e: kvstore_base::Error| format!("rank {r}: {e}");
        let table = NDArray::zeros(&[3, 2], DType::F16)
            .retain_rows(&[0, 1, 2])
            .map_err(e)?;
        kv.init(&[3, 4][..], &[NDArray::zeros(&[2], DType::F16), table][..])
            .map_err(e)?;
        // Every worker sets it, as MXNet's do (a row-sparse push needs it).
        kv.set_optimizer(&sgd).map_err(e)?;
        kv.barrier().map_err(e)?;
        let row = NDArray::full(&[1, 2], 40000.0, DType::F16);
        let rows = NDArray::row_sparse(&[3, 2], vec![1], &row).map_err(e)?;
        kv.push(
            &[3, 4][..],
            &[NDArray::full(&[2], 40000.0, DType::F16), rows][..],
        )
        .map_err(e)?;
        let mut dense = NDArray::zeros(&[2], DType::F16);
        kv.pull(3, &mut dense).map_err(e)?;
        let ids = NDArray::from_vec(&[3], vec![0i64, 1, 2]).map_err(e)?;
        let mut pulled = NDArray::row_sparse(&[3, 2], vec![], &NDArray::zeros(&[0, 2], DType::F16))
            .map_err(e)?;
        kv.row_sparse_pull(4, &mut pulled, &ids).map_err(e)?;
        let got = (dense.to_f64_vec(), pulled.to_dense().to_f64_vec());
        let want = (vec![-800.0; 2], vec![0.0, 0.0, -800.0, -800.0, 0.0, 0.0]);
        match got == want {
            true => Ok(()),
            false => Err(format!("rank {r}: {got:?}, {want:?} expected")),
        }
    })?;
    Ok(job.join()?)
}

/// A round's pushes are added in the order they came, as MXNet's server merges them
/// (`merged += pushed`): 1, then 1e8, then -1e8 give (1 + 1e8) - 1e8 = 0 in float32 (another
/// association, 1 + (1e8 - 1e8), gives 1).
fn a_rounds_pushes_are_added_in_arrival_order() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreExt, NDArray};
    let job = LocalJob::start(1, 3, TIMEOUT)?;
    let options = job.worker_options().clone();
    let workers = create_workers(3, || kvstore_base::create_with(NAME, options.clone()))?;
    common::on_each_worker(workers, |kv| -> Result<(), String> {
        let r = kv.rank();
        let e = |e: kvstore_base::Error| format!("rank {r}: {e}");
        kv.init(5, &NDArray::zeros(&[1], DType::F32)).map_err(e)?;
        // Rank r pushes r * 300 ms after the others' barrier: in rank order.
        std::thread::sleep(Duration::from_millis(300 * r as u64));
        let value = [1.0, 1e8, -1e8][r];
        kv.push(5, &NDArray::full(&[1], value, DType::F32))
            .map_err(e)?;
        let mut out = NDArray::zeros(&[1], DType::F32);
        kv.pull(5, &mut out).map_err(e)?;
        match out.to_f64_vec() == vec![0.0] {
            true => Ok(()),
            false => Err(format!("rank {r}: {out:?}, 0 expected")),
        }
    })?;
    Ok(job.join()?)
}

/// What MXNet's protocol cannot carry for row-sparse keys is refused, naming the key, and
/// changes nothing: rows to a key initialised dense, a row-sparse key in a pushpull, a push of
/// rows before an optimizer is set (MXNet's servers would corrupt the value), and a row-sparse
/// key with compression. Then, with an optimizer, the rows pushed step and the others stay.
fn row_sparse_refusals_name_the_key() -> Result<(), Failed> {
    use kvstore_base::{CompressionParams, DType, KVStoreExt, NDArray, OptimizerSpec};
    let expect = |e: kvstore_base::Result<()>, what: &str, words: &[&str]| -> Result<(), Failed> {
        let e = match e {
            Ok(()) => return Err(format!("{what} succeeded").into()),
            Err(e) => e.to_string(),
        };
        match words.iter().all(|w| e.contains(w)) {
            true => Ok(()),
            false => Err(format!("{what}: {e}").into()),
        }
    };
    let rows = |ids: Vec<i64>| {
        let data = NDArray::ones(&[ids.len(), 2], DType::F32);
        NDArray::row_sparse(&[4, 2], ids, &data)
    };
    let job = LocalJob::start(1, 1, TIMEOUT)?;
    let kv = kvstore_base::create_with(NAME, job.worker_options().clone())?;
    kv.init(1, &NDArray::zeros(&[4, 2], DType::F32))?;
    kv.init(2, &rows(vec![0, 1, 2, 3])?)?;
    expect(
        kv.push(1, &rows(vec![1])?),
        "rows to a dense key",
        &["key 1", "initialised dense"],
    )?;
    expect(
        kv.push(2, &rows(vec![1])?),
        "rows before an optimizer",
        &["key 2", "set_optimizer"],
    )?;
    let mut out = NDArray::zeros(&[4, 2], DType::F32);
    expect(
        kv.pushpull(2, &rows(vec![1])?, &mut out),
        "a row-sparse pushpull",
        &["key 2", "push rows and pull them apart"],
    )?;
    kv.pull(2, &mut out)?;
    if out.to_f64_vec() != vec![1.0; 8] {
        return Err(format!("the refused calls changed key 2: {out:?}").into());
    }
    kv.set_optimizer(&OptimizerSpec::new("sgd").with("learning_rate", 0.5))?;
    kv.push(2, &rows(vec![1, 3])?)?;
    kv.pull(2, &mut out)?;
    if out.to_f64_vec() != vec![1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.5, 0.5] {
        return Err(format!("after a step of rows 1 and 3: {out:?}").into());
    }
    drop(kv);
    job.join()?;

    let job = LocalJob::start(1, 1, TIMEOUT)?;
    let kv = kvstore_base::create_with(NAME, job.worker_options().clone())?;
    let params: CompressionParams = [("type".to_string(), "2bit".into())].into_iter().collect();
    kv.set_gradient_compression(&params)?;
    expect(
        kv.init(3, &rows(vec![0, 1, 2, 3])?),
        "a row-sparse key with compression",
        &["key 3", "Gradient compression for row sparse"],
    )?;
    drop(kv);
    job.join()?;
    Ok(())
}

/// A row-sparse key cut across 2 servers by rows, unevenly (5 rows: 3 and 2, as MXNet's
/// `EncodeRowSparseKey` rounds), 2 workers pushing rows on both sides of the cut: after one
/// sgd step (learning rate 1, from 3) every row is where the summed rows put it, read with a
/// dense pull and with a `row_sparse_pull` of rows from both servers, out of order.
fn a_row_sparse_key_cut_across_servers_steps_each_row() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreExt, NDArray, OptimizerSpec};
    let job = LocalJob::start(2, 2, TIMEOUT)?;
    let mut options = job.worker_options().clone();
    options.insert("MXNET_KVSTORE_BIGARRAY_BOUND".into(), "8".into());
    let workers = create_workers(2, || kvstore_base::create_with(NAME, options.clone()))?;
    common::on_each_worker(workers, |kv| -> Result<(), String> {
        let r = kv.rank();
        let e = |e: kvstore_base::Error| format!("rank {r}: {e}");
        let every = [0, 1, 2, 3, 4];
        let table = NDArray::full(&[5, 2], 3.0, DType::F32);
        kv.init(6, &table.retain_rows(&every).map_err(e)?)
            .map_err(e)?;
        kv.set_optimizer(&OptimizerSpec::new("sgd").with("learning_rate", 1.0))
            .map_err(e)?;
        kv.barrier().map_err(e)?;
        // Rank 0: rows 1 and 3 of 1; rank 1: rows 2 and 4 of 2.
        let ids = [r as i64 + 1, r as i64 + 3];
        let grad = NDArray::full(&[5, 2], (r + 1) as f64, DType::F32);
        kv.push(6, &grad.retain_rows(&ids).map_err(e)?).map_err(e)?;
        kv.barrier().map_err(e)?;
        let mut dense = NDArray::zeros(&[5, 2], DType::F32);
        kv.pull(6, &mut dense).map_err(e)?;
        let expected = [3.0, 3.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0];
        if dense.to_f64_vec() != expected {
            return Err(format!("rank {r}: pulled {dense:?}"));
        }
        let empty = NDArray::zeros(&[0, 2], DType::F32);
        let mut some = NDArray::row_sparse(&[5, 2], vec![], &empty).map_err(e)?;
        let asked = NDArray::from_vec(&[3], vec![4i64, 0, 2]).map_err(e)?;
        kv.row_sparse_pull(6, &mut some, &asked).map_err(e)?;
        let indices = some.as_row_sparse().map(|s| s.indices().to_vec());
        // Rows 0, 2 and 4 held; the others read as zeros.
        let kept = [3.0, 3.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0];
        if indices != Some(vec![0, 2, 4]) || some.to_f64_vec() != kept {
            return Err(format!("rank {r}: rows 4, 0, 2 pulled as {some:?}"));
        }
        Ok(())
    })?;
    Ok(job.join()?)
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

/// Set for a child process of this binary: it joins the job its `DMLC_*` variables name as a
/// worker, inits key 1 with the others, then exits without leaving the job (its connections
/// close, as when a worker process dies).
const DYING_WORKER: &str = "KVSTORE_PSLITE_DYING_WORKER";

fn dying_worker() -> std::process::ExitCode {
    use kvstore_base::{DType, KVStoreExt, NDArray};
    let kv = kvstore_base::create(NAME).expect("joins the job");
    kv.init(1, &NDArray::zeros(&[2], DType::F32))
        .expect("inits with the others");
    std::process::exit(0); // no goodbye: the store is never dropped
}

/// A worker process that dies mid-job: the sync round that waits for its push fails at once
/// (the server stops, naming it, and the waiting push fails naming the server), and the next
/// barrier fails at once too (the scheduler names it), each long before the timeout.
fn a_worker_that_dies_fails_its_round_and_barrier_at_once() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreExt, NDArray};
    let job = LocalJob::start(1, 2, Duration::from_secs(60))?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .env(DYING_WORKER, "1")
        .envs(job.worker_options())
        .spawn()?;
    let kv = kvstore_base::create_with(NAME, job.worker_options().clone())?;
    kv.init(1, &NDArray::zeros(&[2], DType::F32))?;
    if !child.wait()?.success() {
        return Err("the dying worker failed before its end".into());
    }
    let started = Instant::now();
    let e = kv
        .push(1, &NDArray::ones(&[2], DType::F32))
        .expect_err("the round can never complete")
        .to_string();
    if !e.contains("server 8 (rank 0)") || started.elapsed() > Duration::from_secs(15) {
        return Err(format!("after {:?}: {e}", started.elapsed()).into());
    }
    let e = kv
        .barrier()
        .expect_err("the barrier can never complete")
        .to_string();
    if !e.contains("the scheduler closed its connection")
        || started.elapsed() > Duration::from_secs(15)
    {
        return Err(format!("after {:?}: {e}", started.elapsed()).into());
    }
    drop(kv);
    let ended = job.join().expect_err("the job lost a worker");
    let lost = [
        "which left the job",
        "a sync round waits for pushes of worker",
    ];
    if !lost.iter().all(|l| ended.contains(l)) || !ended.contains("the barrier of group 4") {
        return Err(ended.into());
    }
    Ok(())
}

/// Messages from processes that are not nodes of the job (random and mutated metas and frames,
/// under identities no node has) reach the scheduler before and while the job runs and the
/// server while it runs: nothing panics, and the job forms, sums exactly and ends cleanly.
fn hostile_messages_change_nothing() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreBase, KVStoreExt, NDArray};
    use kvstore_pslite::meta::{data_type, Command, Control, Meta, NodeRecord, Role};
    use kvstore_pslite::zmtp::Dealer;
    use kvstore_test::fuzz::{mutated, Rng};

    let seed = std::env::var("KVSTORE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0F7E);
    // A panic of a thread of the scheduler, the server or a receiving link fails the test.
    let panics = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&panics);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("pslite-"))
        {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        previous(info);
    }));
    let job = LocalJob::start(1, 2, Duration::from_secs(20))?;
    let scheduler = format!("127.0.0.1:{}", job.worker_options()["DMLC_PS_ROOT_PORT"]);
    let valid: Vec<Vec<u8>> = {
        let mut barrier = Control::new(Command::Barrier);
        barrier.barrier_group = Some(7);
        let mut ack = Control::new(Command::Ack);
        ack.msg_sig = Some(1);
        vec![
            Meta {
                control: Some(barrier),
                request: true,
                ..Meta::default()
            }
            .encode(),
            Meta {
                control: Some(ack.with_node(NodeRecord::new(Role::Server, "10.0.0.1", 9))),
                ..Meta::default()
            }
            .encode(),
            Meta {
                head: 0,
                request: true,
                push: true,
                pull: true,
                timestamp: Some(3),
                data_type: vec![data_type::UINT64, data_type::OTHER, data_type::INT32],
                ..Meta::default()
            }
            .encode(),
            Meta {
                head: 2,
                simple_app: true,
                request: true,
                ..Meta::default()
            }
            .encode(),
        ]
    };
    // A node closes a connection that sent a bad message: the attacker connects again, under
    // another identity.
    let attack = |addr: &str, seed: u64, count: usize| {
        let mut rng = Rng::new(seed);
        let mut link: Option<Dealer> = None;
        for _ in 0..count {
            if link.is_none() {
                let identity =
                    [b"".to_vec(), b"ps999".to_vec(), rng.bytes(5)][rng.below(3) as usize].clone();
                link = Dealer::connect(addr, &identity, Duration::from_secs(5)).ok();
            }
            let Some(dealer) = link.as_mut() else { return };
            // Mostly well-formed metas with random fields (each reaches the node's logic), some
            // mutated bytes (a bad one ends the connection).
            let meta = match rng.below(20) {
                0 => mutated(&mut rng, &valid),
                _ => {
                    let body_len = rng.below(3) as usize;
                    let mut control = Control::new(rng.pick(&[
                        Command::Barrier,
                        Command::Heartbeat,
                        Command::Ack,
                        Command::Terminate,
                    ]));
                    control.barrier_group = Some(rng.below(9) as i32);
                    Meta {
                        head: rng.pick(&[0, 2, 3, 5, 14, 90, -1, i32::MAX]),
                        body: rng.bytes(body_len),
                        control: (rng.below(3) == 0).then_some(control),
                        request: rng.below(4) != 0,
                        push: rng.below(2) == 0,
                        pull: rng.below(2) == 0,
                        simple_app: rng.below(4) == 0,
                        app_id: Some(0),
                        timestamp: Some(rng.below(50) as i32),
                        customer_id: 0,
                        ..Meta::default()
                    }
                    .encode()
                }
            };
            // A registration would take a node's place: ps-lite has no authentication.
            if Meta::decode(&meta).is_ok_and(|m| m.command() == Command::AddNode) {
                continue;
            }
            let frames: Vec<Vec<u8>> = (0..rng.below(4))
                .map(|_| {
                    let n = rng.pick(&[0usize, 4, 8, 13, 16]);
                    rng.bytes(n)
                })
                .collect();
            let frames: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
            if dealer.send(&meta, &frames).is_err() {
                link = None;
            }
        }
        if let Some(dealer) = link {
            dealer.close();
        }
    };
    attack(&scheduler, seed, 1000);
    let options = job.worker_options().clone();
    let config = kvstore_dist::DistConfig::from_vars(options.clone()).map_err(|e| e.to_string())?;
    let workers: Vec<kvstore_pslite::PsLiteStore> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| kvstore_pslite::PsLiteStore::connect(NAME, &config)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Result<_, _>>()
    })?;
    let server = workers[0]
        .job_nodes()
        .iter()
        .find(|n| n.role == Role::Server)
        .map(|n| format!("{}:{}", n.hostname, n.port))
        .ok_or("no server in the node table")?;
    std::thread::scope(|s| -> Result<(), Failed> {
        s.spawn(|| attack(&scheduler, seed + 1, 1000));
        s.spawn(|| attack(&server, seed + 2, 1000));
        let sums: Vec<Result<Vec<f64>, kvstore_base::Error>> = std::thread::scope(|t| {
            let handles: Vec<_> = workers
                .iter()
                .map(|kv| {
                    t.spawn(move || {
                        kv.init(3, &NDArray::zeros(&[4], DType::F32))?;
                        let mut out = NDArray::zeros(&[4], DType::F32);
                        for round in 0..20 {
                            let v = NDArray::full(&[4], (kv.rank() + round) as f64, DType::F32);
                            kv.pushpull(3, &v, &mut out)?;
                        }
                        Ok(out.to_f64_vec())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for sum in sums {
            // Round 19: (0 + 19) + (1 + 19).
            if sum? != vec![39.0; 4] {
                return Err("a wrong sum".into());
            }
        }
        Ok(())
    })?;
    // The nodes read what the attackers left in their sockets, then the job goes on.
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<kvstore_base::Result<Vec<f64>>> = std::thread::scope(|t| {
        let handles: Vec<_> = workers
            .iter()
            .map(|kv| {
                t.spawn(move || {
                    let mut out = NDArray::zeros(&[4], DType::F32);
                    kv.pushpull(3, &NDArray::full(&[4], 1.0, DType::F32), &mut out)?;
                    Ok(out.to_f64_vec())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for sum in after {
        if sum? != vec![2.0; 4] {
            return Err("a wrong sum after the attacks".into());
        }
    }
    // Each worker leaves on a thread of its own: leaving is a barrier of them all.
    std::thread::scope(|s| {
        for kv in workers {
            s.spawn(move || drop(kv));
        }
    });
    job.join()?;
    match panics.load(std::sync::atomic::Ordering::SeqCst) {
        0 => Ok(()),
        n => Err(format!("{n} thread(s) of the job panicked").into()),
    }
}

/// A bare ps-lite worker of `job` (this crate's van, no store), joined and past the start
/// barrier, to send the servers hand-made requests.
fn bare_worker(job: &LocalJob) -> Result<kvstore_pslite::van::Van, String> {
    use kvstore_pslite::van::{Van, VanConfig};
    let worker = Van::join(VanConfig {
        scheduler: format!("127.0.0.1:{}", job.worker_options()["DMLC_PS_ROOT_PORT"]),
        host: "127.0.0.1".into(),
        bind: "127.0.0.1".into(),
        port: 0,
        timeout: Duration::from_secs(10),
        max_message_bytes: 1 << 20,
    })
    .map_err(|e| e.to_string())?;
    // ps-lite's start: every node enters the barrier of everyone.
    worker.barrier(7).map_err(|e| e.to_string())?;
    Ok(worker)
}

/// A push whose lengths frame disagrees with its values (MXNet's server checks it, as ours
/// does) stops the server, which names the key and the lengths; a well-formed one before it
/// is taken.
fn a_push_with_wrong_lengths_stops_the_server_naming_them() -> Result<(), Failed> {
    use kvstore_pslite::van::kv_request;
    let job = LocalJob::start(1, 1, Duration::from_secs(10))?;
    let worker = bare_worker(&job)?;
    let server = worker.servers().next().ok_or("no server")?.id;
    let key = 3u64.to_le_bytes();
    let vals = [0u8; 12]; // three float32
    let push = |ts: i32, lens: i32| {
        // Command word 0: a dense float32 push.
        worker.send(
            server,
            &kv_request(0, ts, true, false, 0),
            &[&key, &vals, &lens.to_le_bytes()],
        )
    };
    push(1, 12)?;
    push(2, 5)?;
    let ended = job.join().expect_err("the server stopped with an error");
    if !ended.contains("a push of 12 bytes") || !ended.contains("with lengths [5]") {
        return Err(ended.into());
    }
    Ok(())
}

/// A sync round that a live worker never joins fails on the server once it waited
/// `KVSTORE_TIMEOUT_SECS`, naming the key and the worker it waits for (MXNet's server, and its
/// workers with it, would wait forever); the worker that pushed fails within its own timeout.
fn a_round_a_live_worker_never_joins_fails_naming_it() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreExt, NDArray};
    let job = LocalJob::start(1, 2, Duration::from_secs(2))?;
    let options = job.worker_options().clone();
    let workers = create_workers(2, || kvstore_base::create_with(NAME, options.clone()))?;
    std::thread::scope(|s| {
        for kv in &workers {
            s.spawn(move || kv.init(4, &NDArray::zeros(&[2], DType::F32)));
        }
    });
    let e = workers[0]
        .push(4, &NDArray::ones(&[2], DType::F32))
        .expect_err("worker 1 never pushes")
        .to_string();
    if !e.contains("server 8 (rank 0)") {
        return Err(e.into());
    }
    // Both workers stay connected while the server gives up.
    let ended = job.join().expect_err("the round never completes");
    drop(workers);
    let expected = [
        "the sync round of key 4",
        "for pushes of worker 11 (rank 1) (pushed by worker 9 (rank 0))",
        "(KVSTORE_TIMEOUT_SECS)",
    ];
    if !expected.iter().all(|x| ended.contains(x)) {
        return Err(ended.into());
    }
    Ok(())
}

/// Every worker gone between the start and the end of the job: the scheduler ends, naming
/// them (not only the servers, which stop for want of workers).
fn every_worker_gone_ends_the_job_naming_them() -> Result<(), Failed> {
    let job = LocalJob::start(1, 2, Duration::from_secs(10))?;
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| bare_worker(&job).map(|mut worker| worker.close()));
        }
    });
    let ended = job.join().expect_err("the workers left before the end");
    if !ended.contains("every worker (worker 9 (rank 0), worker 11 (rank 1)) left the job") {
        return Err(ended.into());
    }
    Ok(())
}

/// The two bare workers of a job of 2 workers and 1 server, the first having put the server in
/// sync mode (as MXNet's rank 0 does), and the server's id.
fn two_bare_workers_in_sync_mode(
    job: &LocalJob,
) -> Result<(kvstore_pslite::van::Van, kvstore_pslite::van::Van, i32), Failed> {
    use kvstore_pslite::van::command_request;
    use kvstore_pslite::worker::CMD_SYNC_MODE;
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| bare_worker(job));
        let b = s.spawn(|| bare_worker(job));
        (a.join().expect("joins"), b.join().expect("joins"))
    });
    let (a, b) = (a?, b?);
    let server = a.servers().next().ok_or("no server")?.id;
    a.send(server, &command_request(CMD_SYNC_MODE, "", 1), &[])?;
    Ok((a, b, server))
}

/// A sync round given the same push twice (same sender, same timestamp: ps-lite's PS_RESEND
/// resending what was not acknowledged) stops the server naming PS_RESEND, rather than
/// completing the round with the push counted twice.
fn a_resent_push_stops_the_server_naming_ps_resend() -> Result<(), Failed> {
    use kvstore_pslite::van::kv_request;
    let job = LocalJob::start(1, 2, Duration::from_secs(10))?;
    let (a, _b, server) = two_bare_workers_in_sync_mode(&job)?;
    let key = 3u64.to_le_bytes();
    let vals = [0u8; 8];
    let lens = 8i32.to_le_bytes();
    let push = |ts: i32| {
        a.send(
            server,
            &kv_request(0, ts, true, false, 0),
            &[&key, &vals, &lens],
        )
    };
    push(2)?; // the key's init
    push(3)?; // held: worker b has not pushed
    push(3)?; // the same request again
    let ended = job
        .join()
        .expect_err("the server refuses the repeated push");
    if !ended.contains("the same push to key 3 (ps-lite key 3) twice")
        || !ended.contains("PS_RESEND")
    {
        return Err(ended.into());
    }
    Ok(())
}

/// An init that failed once rank 0's values were sent (here: rank 1 never came to the init's
/// barrier) is not tried again: the servers may hold the value, and a second push of it would
/// count as a round's push. The retry is refused, naming the key and the first failure.
fn a_failed_init_is_not_retried() -> Result<(), Failed> {
    use kvstore_base::{DType, KVStoreExt, NDArray};
    let job = LocalJob::start(1, 2, Duration::from_secs(2))?;
    let options = job.worker_options().clone();
    let workers = create_workers(2, || kvstore_base::create_with(NAME, options.clone()))?;
    let rank0 = workers
        .iter()
        .find(|kv| kv.rank() == 0)
        .ok_or("no rank 0")?;
    let value = NDArray::ones(&[2], DType::F32);
    let first = rank0
        .init(5, &value)
        .expect_err("rank 1 never meets the barrier");
    let again = rank0
        .init(5, &value)
        .expect_err("an init is not retried")
        .to_string();
    if !again.contains("key 5") || !again.contains("its init failed") {
        return Err(format!("{again} (first: {first})").into());
    }
    drop(workers);
    let _ = job.join();
    Ok(())
}

/// A node running ps-lite's resender (`PS_RESEND=1`) acknowledges what it receives: its first
/// ACK stops the server, naming it and PS_RESEND, before any resent push could be merged twice.
fn an_ack_from_a_resending_node_stops_the_server_naming_ps_resend() -> Result<(), Failed> {
    use kvstore_pslite::meta::{Command, Control, Meta};
    let job = LocalJob::start(1, 2, Duration::from_secs(10))?;
    let (a, _b, server) = two_bare_workers_in_sync_mode(&job)?;
    let mut ack = Control::new(Command::Ack);
    ack.msg_sig = Some(42);
    let meta = Meta {
        control: Some(ack),
        ..Meta::default()
    };
    a.send(server, &meta, &[])?;
    let ended = job.join().expect_err("the server refuses the resender");
    if !ended.contains("acknowledges messages") || !ended.contains("PS_RESEND") {
        return Err(ended.into());
    }
    Ok(())
}

/// A worker's second push of a key before every worker pushed it belongs to the next sync
/// round (MXNet's server would count it as another worker's and complete the round with one
/// worker's gradient twice and none of the other's).
fn a_workers_second_push_of_a_key_waits_for_the_next_round() -> Result<(), Failed> {
    use kvstore_pslite::van::{kv_request, Van};
    let job = LocalJob::start(1, 2, Duration::from_secs(10))?;
    let (a, b, server) = two_bare_workers_in_sync_mode(&job)?;
    let key = 3u64.to_le_bytes();
    let lens = 8i32.to_le_bytes();
    // A pushpull of [x, x] to key 3 with timestamp `ts`, its answer awaited.
    let pushpull = |van: &Van, ts: i32, x: f32| {
        let vals: Vec<u8> = [x, x].iter().flat_map(|v| v.to_le_bytes()).collect();
        van.expect(ts);
        van.send(
            server,
            &kv_request(0, ts, true, true, 0),
            &[&key, &vals, &lens],
        )
    };
    let value = |van: &Van, ts: i32, wait: Duration| -> Result<Vec<f32>, String> {
        let answers = van
            .wait(
                ts,
                &[server],
                "a pushpull",
                std::time::Instant::now() + wait,
            )
            .map_err(|e| e.to_string())?;
        let bytes = answers[0].data.get(1).ok_or("no values in the answer")?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    };
    pushpull(&a, 2, 0.0)?; // the key's init, answered at once
    a.wait(
        2,
        &[server],
        "the init",
        std::time::Instant::now() + Duration::from_secs(5),
    )?;
    pushpull(&a, 3, 1.0)?;
    pushpull(&a, 4, 10.0)?; // worker a again: for the next round
    if let Ok(v) = value(&a, 3, Duration::from_millis(300)) {
        return Err(format!("the round completed without worker b: {v:?}").into());
    }
    a.expect(3);
    pushpull(&b, 2, 2.0)?;
    let first = [
        value(&a, 3, Duration::from_secs(5))?,
        value(&b, 2, Duration::from_secs(5))?,
    ];
    pushpull(&b, 3, 20.0)?;
    let second = [
        value(&a, 4, Duration::from_secs(5))?,
        value(&b, 3, Duration::from_secs(5))?,
    ];
    if first != [vec![3.0; 2], vec![3.0; 2]] || second != [vec![30.0; 2], vec![30.0; 2]] {
        return Err(format!("rounds summed {first:?} then {second:?}").into());
    }
    // The workers leave without MXNet's end: the job ends for want of them, and for no other
    // reason.
    drop((a, b));
    let ended = job.join().expect_err("the workers left before the end");
    // Only the workers' leaving: no error of the server's about key 3 or a worker's push.
    if !ended.contains("left the job") || ended.contains("key 3") || ended.contains("push") {
        return Err(ended.into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    if std::env::var_os(DYING_WORKER).is_some() {
        return dying_worker();
    }
    // The worker refuses what MXNet's servers cannot hold, whichever server it talks to.
    kvstore_test::allow_refused_dtypes(kvstore_pslite::REFUSED_DTYPES);
    let args = libtest_mimic::Arguments::from_args();
    let single = jobs(NAME, 1);
    let mut trials: Vec<Trial> = kvstore_test::trials(
        "own_servers",
        Arc::new(move || single(1).map(|mut w| w.remove(0))),
    )
    .into_iter()
    .map(common::unless_it_pushes_rows_to_a_dense_key)
    .collect();
    let single_async = jobs(ASYNC_NAME, 1);
    trials.extend(
        kvstore_test::trials(
            "own_servers_async",
            Arc::new(move || single_async(1).map(|mut w| w.remove(0))),
        )
        .into_iter()
        .map(common::unless_it_pushes_rows_to_a_dense_key)
        .map(common::unless_it_pushes_without_an_optimizer),
    );
    trials.extend(multi_worker_trials(
        "own_servers",
        jobs(NAME, 1),
        Semantics::Sync,
        &[2, 3],
    ));
    trials.extend(multi_worker_trials(
        "own_servers_2_servers",
        jobs(NAME, 2),
        Semantics::Sync,
        &[2],
    ));
    trials.extend(
        multi_worker_trials(
            "own_servers_async",
            jobs(ASYNC_NAME, 1),
            Semantics::Async,
            &[2, 3],
        )
        .into_iter()
        .map(common::unless_it_pushes_without_an_optimizer),
    );
    // The tests of this file's own, beside the suite's.
    let own: [(&str, common::Test); 17] = [
        (
            "own_servers::a_failed_init_is_not_retried",
            a_failed_init_is_not_retried,
        ),
        (
            "own_servers::an_ack_from_a_resending_node_stops_the_server_naming_ps_resend",
            an_ack_from_a_resending_node_stops_the_server_naming_ps_resend,
        ),
        (
            "own_servers::with_multi_precision_half_pushes_are_summed_in_float32",
            with_multi_precision_half_pushes_are_summed_in_float32,
        ),
        (
            "own_servers::a_rounds_pushes_are_added_in_arrival_order",
            a_rounds_pushes_are_added_in_arrival_order,
        ),
        (
            "own_servers_async::each_push_steps_the_weight_once_the_optimizer_is_set",
            each_async_push_steps_the_weight_once_the_optimizer_is_set,
        ),
        (
            "own_servers::pickled_optimizers_are_read_never_run",
            pickled_optimizers_are_read_never_run,
        ),
        (
            "own_servers_2_servers::a_row_sparse_key_cut_across_servers_steps_each_row",
            a_row_sparse_key_cut_across_servers_steps_each_row,
        ),
        (
            "own_servers::row_sparse_refusals_name_the_key",
            row_sparse_refusals_name_the_key,
        ),
        (
            "own_servers::a_missing_worker_fails_the_registration",
            a_missing_worker_fails_the_registration,
        ),
        (
            "own_servers::a_worker_that_dies_fails_its_round_and_barrier_at_once",
            a_worker_that_dies_fails_its_round_and_barrier_at_once,
        ),
        (
            "own_servers::hostile_messages_change_nothing",
            hostile_messages_change_nothing,
        ),
        (
            "own_servers::a_push_with_wrong_lengths_stops_the_server_naming_them",
            a_push_with_wrong_lengths_stops_the_server_naming_them,
        ),
        (
            "own_servers::a_round_a_live_worker_never_joins_fails_naming_it",
            a_round_a_live_worker_never_joins_fails_naming_it,
        ),
        (
            "own_servers::every_worker_gone_ends_the_job_naming_them",
            every_worker_gone_ends_the_job_naming_them,
        ),
        (
            "own_servers::a_resent_push_stops_the_server_naming_ps_resend",
            a_resent_push_stops_the_server_naming_ps_resend,
        ),
        (
            "own_servers::a_workers_second_push_of_a_key_waits_for_the_next_round",
            a_workers_second_push_of_a_key_waits_for_the_next_round,
        ),
        (
            "own_servers::the_same_optimizer_sent_again_keeps_its_states",
            the_same_optimizer_sent_again_keeps_its_states,
        ),
    ];
    trials.extend(own.into_iter().map(|(name, test)| Trial::test(name, test)));
    libtest_mimic::run(&args, trials).exit_code()
}
