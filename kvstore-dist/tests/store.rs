//! The dist stores end to end, as threads of one process over real sockets on 127.0.0.1:
//! a scheduler and servers from [`LocalCluster`], workers created by `create_with`.
//! Every wait is bounded by a timeout of a few seconds.

use std::thread;
use std::time::Duration;

use kvstore_base::{DType, Error, KVStoreBase, KVStoreExt, Key, NDArray, OptimizerSpec};
use kvstore_dist::{DistStore, LocalCluster};
use kvstore_local as _;

mod common;

use common::{run, run_with, TIMEOUT};

fn f32s(a: &NDArray) -> Vec<f32> {
    a.to_vec::<f32>().unwrap()
}

#[test]
fn sync_push_sums_one_push_per_worker() {
    let out = run("dist_sync", 1, 3, |rank, kv| {
        kv.init(3, &NDArray::full(&[2, 3], rank as f64 + 10.0, DType::F32))
            .unwrap();
        let mut w = NDArray::zeros(&[2, 3], DType::F32);
        kv.pull(3, &mut w).unwrap();
        let init = f32s(&w);
        kv.push(3, &NDArray::full(&[2, 3], rank as f64 + 1.0, DType::F32))
            .unwrap();
        kv.pull(3, &mut w).unwrap();
        (init, f32s(&w))
    });
    for (init, summed) in out {
        assert_eq!(init, vec![10.0; 6], "rank 0's init value is the one kept");
        assert_eq!(summed, vec![6.0; 6], "1 + 2 + 3");
    }
}

#[test]
fn big_keys_split_across_servers_and_str_keys() {
    let n = 1_200_000; // above the default big-array bound
    let out = run("dist_sync", 3, 2, move |rank, kv| {
        let keys = ["w", "b"];
        let init = [
            NDArray::zeros(&[n], DType::F32),
            NDArray::zeros(&[5], DType::F32),
        ];
        kv.init(&keys[..], &init).unwrap();
        let g: Vec<f32> = (0..n)
            .map(|i| (i % 1000) as f32 * (rank as f32 + 1.0))
            .collect();
        let grads = [
            NDArray::from_vec(&[n], g).unwrap(),
            NDArray::full(&[5], 1.0, DType::F32),
        ];
        let mut outs = [
            NDArray::zeros(&[n], DType::F32),
            NDArray::zeros(&[5], DType::F64),
        ];
        kv.pushpull(&keys[..], &grads, &mut outs).unwrap();
        (f32s(&outs[0]), outs[1].to_vec::<f64>().unwrap())
    });
    for (big, small) in out {
        assert!(big
            .iter()
            .enumerate()
            .all(|(i, &v)| v == (i % 1000) as f32 * 3.0));
        assert_eq!(small, vec![2.0; 5]);
    }
}

#[test]
fn optimizer_on_servers_matches_local() {
    let spec = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9)
        .with("rescale_grad", 0.5);
    let grads = |step: usize, rank: usize| -> NDArray {
        NDArray::from_vec(
            &[4],
            (0..4)
                .map(|i| (i + step * 3 + rank) as f32 * 0.25)
                .collect(),
        )
        .unwrap()
    };
    let spec2 = spec.clone();
    let out = run("dist_sync", 2, 2, move |rank, kv| {
        kv.set_optimizer(&spec2).unwrap();
        kv.init(0, &NDArray::ones(&[4], DType::F32)).unwrap();
        let mut w = NDArray::zeros(&[4], DType::F32);
        for step in 0..5 {
            kv.push(0, &grads(step, rank)).unwrap();
            kv.pull(0, &mut w).unwrap();
        }
        f32s(&w)
    });
    // The same sums through `local`, two values per push.
    {
        let local = kvstore_base::create("local").unwrap();
        local.set_optimizer(&spec).unwrap();
        local.init(0, &NDArray::ones(&[4], DType::F32)).unwrap();
        let mut w = NDArray::zeros(&[4], DType::F32);
        for step in 0..5 {
            local.push(0, &[grads(step, 0), grads(step, 1)]).unwrap();
            local.pull(0, &mut w).unwrap();
        }
        assert_eq!(out[0], f32s(&w));
    }
    assert_eq!(out[0], out[1]);
}

#[test]
fn async_applies_every_push() {
    let out = run("dist_async", 1, 2, |rank, kv| {
        kv.set_optimizer(&OptimizerSpec::new("test").with("rescale_grad", 1.0))
            .unwrap();
        kv.init(7, &NDArray::zeros(&[3], DType::F32)).unwrap();
        for _ in 0..10 {
            kv.push(7, &NDArray::full(&[3], rank as f64 + 1.0, DType::F32))
                .unwrap();
        }
        kv.barrier().unwrap();
        let mut w = NDArray::zeros(&[3], DType::F32);
        kv.pull(7, &mut w).unwrap();
        f32s(&w)
    });
    assert_eq!(out, vec![vec![30.0; 3], vec![30.0; 3]]);
}

#[test]
fn errors_name_the_key() {
    let out = run("dist_sync", 1, 1, |_, kv| {
        let mut w = NDArray::zeros(&[2], DType::F32);
        let missing = kv.pull(9, &mut w).unwrap_err();
        kv.init(1, &NDArray::zeros(&[2], DType::F32)).unwrap();
        let dup = kv.init(1, &NDArray::zeros(&[2], DType::F32)).unwrap_err();
        let shape = kv.push(1, &NDArray::zeros(&[3], DType::F32)).unwrap_err();
        let mixed = kv.push("a", &NDArray::zeros(&[2], DType::F32)).unwrap_err();
        (missing, dup, shape, mixed)
    });
    let (missing, dup, shape, mixed) = &out[0];
    assert!(
        matches!(missing.root(), Error::KeyNotInitialized),
        "{missing}"
    );
    assert_eq!(missing.key(), Some(&Key::Int(9)));
    assert!(matches!(dup.root(), Error::DuplicateInit), "{dup}");
    assert!(
        matches!(shape.root(), Error::ShapeMismatch { .. }),
        "{shape}"
    );
    assert!(matches!(mixed, Error::MixedKeyTypes { .. }), "{mixed}");
}

#[test]
fn kvstore_toml_named_by_kvstore_config_configures_the_worker() {
    let cluster = LocalCluster::start(1, 1, TIMEOUT).unwrap();
    let mut options = cluster.worker_options().clone();
    options.remove("DMLC_NUM_SERVER");
    options.remove("DMLC_NUM_WORKER");
    let path = std::env::temp_dir().join(format!("kvstore-dist-{}.toml", std::process::id()));
    std::fs::write(&path, "[dist]\nnum_server = 1\nnum_worker = 1\n").unwrap();
    options.insert("KVSTORE_CONFIG".into(), path.display().to_string());
    let kv = kvstore_base::create_with("dist_sync", options).unwrap();
    assert_eq!(kv.num_workers(), 1);
    drop(kv);
    std::fs::remove_file(&path).unwrap();
    cluster.finish().unwrap();
}

#[test]
fn workers_may_push_keys_in_different_orders() {
    let out = run("dist_sync", 1, 2, |rank, kv| {
        kv.init(
            &[1, 2],
            &[
                NDArray::zeros(&[2], DType::F32),
                NDArray::zeros(&[2], DType::F32),
            ],
        )
        .unwrap();
        let order = if rank == 0 { [1, 2] } else { [2, 1] };
        for key in order {
            kv.push(key, &NDArray::full(&[2], key as f64, DType::F32))
                .unwrap();
        }
        let mut w = [
            NDArray::zeros(&[2], DType::F32),
            NDArray::zeros(&[2], DType::F32),
        ];
        kv.pull(&[1, 2], &mut w).unwrap();
        (f32s(&w[0]), f32s(&w[1]))
    });
    for (a, b) in out {
        assert_eq!((a, b), (vec![2.0; 2], vec![4.0; 2]));
    }
}

#[test]
fn a_worker_that_leaves_fails_the_rounds_waiting_for_it_at_once() {
    let started = std::time::Instant::now();
    let out = run("dist_sync", 1, 2, |rank, kv| {
        kv.init(5, &NDArray::zeros(&[2], DType::F32)).unwrap();
        if rank == 1 {
            return None; // drops the store: goodbye
        }
        // The push fails when the server already knows rank 1 left, else the pull does.
        let mut w = NDArray::zeros(&[2], DType::F32);
        let pushed = kv.push(5, &NDArray::ones(&[2], DType::F32));
        Some(pushed.and_then(|()| kv.pull(5, &mut w)).unwrap_err())
    });
    let err = out[0].as_ref().unwrap();
    assert_eq!(err.key(), Some(&Key::Int(5)), "{err}");
    assert!(err.to_string().contains("worker rank 1"), "{err}");
    assert!(started.elapsed() < TIMEOUT, "took {:?}", started.elapsed());
}

/// A worker whose last call pushes a key and that then leaves (says goodbye) has done its step:
/// the round it pushed in completes with the others' pushes, as MXNet's does (its workers meet
/// in a barrier before leaving), where one it did not push in fails at once.
#[test]
fn a_worker_that_pushed_then_left_completes_its_round() {
    let out = run("dist_sync", 2, 2, |rank, kv| {
        // Key 5 is split across both servers.
        let zeros = NDArray::zeros(&[1_500_000], DType::F32);
        kv.init(5, &zeros).unwrap();
        kv.init(6, &NDArray::zeros(&[2], DType::F32)).unwrap();
        kv.barrier().unwrap();
        let ones = NDArray::ones(&[1_500_000], DType::F32);
        if rank == 1 {
            kv.push(5, &ones).unwrap();
            return None; // drops the store: goodbye
        }
        std::thread::sleep(Duration::from_millis(300));
        kv.push(5, &ones).unwrap();
        let mut w = zeros.clone();
        kv.pull(5, &mut w).unwrap();
        let summed = w.to_vec::<f32>().unwrap().iter().all(|&x| x == 2.0);
        // Key 6: rank 1 never pushed it.
        let missing = kv
            .push(6, &NDArray::ones(&[2], DType::F32))
            .and_then(|()| kv.pull(6, &mut NDArray::zeros(&[2], DType::F32)));
        Some((summed, missing.unwrap_err().to_string()))
    });
    let (summed, missing) = out[0].as_ref().unwrap();
    assert!(summed, "rank 1's push of key 5 was lost");
    assert!(missing.contains("has left the job"), "{missing}");
}

/// The requests `kv` sends to its servers while `call` runs.
fn requests_of(kv: &DistStore, call: impl FnOnce()) -> u64 {
    let before = kv.requests_sent();
    call();
    kv.requests_sent() - before
}

#[test]
fn a_call_of_many_small_keys_travels_in_one_batch_per_server() {
    // 1000 keys of 4 float32 on 2 servers: each call is about one message per server (a
    // broadcast is an init then a pull), not one per key, and gives what per-key messages do.
    let out = common::run_tweaked(
        2,
        2,
        |_| {},
        |kv: &DistStore| {
            let keys: Vec<i32> = (0..1000).collect();
            let scale = kv.rank() as f64 + 1.0;
            let values: Vec<NDArray> = keys
                .iter()
                .map(|&k| NDArray::full(&[4], k as f64 * scale, DType::F32))
                .collect();
            let mut outs: Vec<NDArray> = keys
                .iter()
                .map(|_| NDArray::zeros(&[4], DType::F32))
                .collect();
            let init = requests_of(kv, || kv.init(&keys[..], &values).unwrap());
            let push = requests_of(kv, || kv.push(&keys[..], &values).unwrap());
            let pull = requests_of(kv, || kv.pull(&keys[..], &mut outs).unwrap());
            let summed = outs
                .iter()
                .enumerate()
                .all(|(k, o)| f32s(o) == vec![3.0 * k as f32; 4]);
            let fresh: Vec<i32> = (1000..2000).collect();
            let broadcast =
                requests_of(kv, || kv.broadcast(&fresh[..], &values, &mut outs).unwrap());
            let rank_0s = outs
                .iter()
                .enumerate()
                .all(|(k, o)| f32s(o) == vec![k as f32; 4]);
            ([init, push, pull, broadcast], summed, rank_0s)
        },
    );
    for (rank, (requests, summed, rank_0s)) in out.into_iter().enumerate() {
        assert!(summed && rank_0s, "rank {rank}: wrong values");
        assert!(
            requests[..3].iter().all(|&r| r == 2) && requests[3] == 4,
            "rank {rank}: requests of init, push, pull, broadcast: {requests:?}"
        );
    }
}

#[test]
fn an_init_that_differs_from_rank_0s_is_the_error_of_its_own_worker() {
    let out = run("dist_sync", 1, 2, |rank, kv| {
        let shape: &[usize] = if rank == 0 { &[2] } else { &[3] };
        kv.init(3, &NDArray::zeros(shape, DType::F32)).err()
    });
    assert!(
        out[0].is_none(),
        "rank 0's init is the reference: {:?}",
        out[0]
    );
    let err = out[1].as_ref().expect("rank 1's init differs");
    assert!(
        err.to_string().contains("worker rank 1 declares key 3"),
        "{err}"
    );
    // In one call of several small keys (a batch per server), the error names the key that
    // differs, not the first of the batch.
    let out = run("dist_sync", 1, 2, |rank, kv| {
        let third: &[usize] = if rank == 0 { &[2] } else { &[3] };
        let values = [
            NDArray::zeros(&[2], DType::F32),
            NDArray::zeros(&[2], DType::F32),
            NDArray::zeros(third, DType::F32),
        ];
        kv.init(&[7, 8, 9][..], &values).err()
    });
    assert!(out[0].is_none(), "{:?}", out[0]);
    let err = out[1].as_ref().expect("rank 1's third key differs");
    assert!(matches!(err.key(), Some(k) if *k == Key::from(9)), "{err}");
    assert!(
        err.to_string().contains("worker rank 1 declares key 9"),
        "{err}"
    );
    // The same shape, dense on one worker and row-sparse on the other: `row_sparse_pull`
    // would work on one and not the other.
    let out = run("dist_sync", 1, 2, |rank, kv| {
        let value = NDArray::ones(&[4, 2], DType::F32);
        let value = match rank {
            0 => value,
            _ => value.retain_rows(&[0, 1, 2, 3]).unwrap(),
        };
        kv.init(5, &value).err()
    });
    assert!(out[0].is_none(), "{:?}", out[0]);
    let err = out[1]
        .as_ref()
        .expect("rank 1 inits key 5 row-sparse")
        .to_string();
    assert!(
        err.contains("worker rank 1 declares key 5") && err.contains("row-sparse"),
        "{err}"
    );
}

#[test]
fn commands_to_servers_install_an_optimizer_or_name_what_is_refused() {
    let out = run("dist_sync", 2, 2, |rank, kv| {
        let spec =
            serde_json::to_string(&OptimizerSpec::new("test").with("rescale_grad", 2.0)).unwrap();
        kv.send_command_to_servers(0, &spec).unwrap(); // kController, from rank 0
        kv.barrier().unwrap();
        kv.init(4, &NDArray::ones(&[3], DType::F32)).unwrap();
        kv.push(4, &NDArray::full(&[3], rank as f64 + 1.0, DType::F32))
            .unwrap();
        let mut w = NDArray::zeros(&[3], DType::F32);
        kv.pull(4, &mut w).unwrap();
        let unknown = kv.send_command_to_servers(77, "").err();
        // kSetGradientCompression in MXNet 1.9.1's text is accepted; an unknown type is not.
        kv.send_command_to_servers(4, "1,0.500000").unwrap();
        let compression = kv.send_command_to_servers(4, "7,0.500000").err();
        (f32s(&w), unknown, compression)
    });
    for (rank, (w, unknown, compression)) in out.into_iter().enumerate() {
        assert_eq!(w, vec![7.0; 3], "1 + 2 * (1 + 2)");
        if rank == 0 {
            let unknown = unknown.expect("head 77 is refused").to_string();
            assert!(
                unknown.contains("unknown server command head 77"),
                "{unknown}"
            );
            let compression = compression.expect("type code 7 is refused").to_string();
            assert!(
                compression.contains("kSetGradientCompression"),
                "{compression}"
            );
        } else {
            // As MXNet: only rank 0 sends commands.
            assert!(unknown.is_none() && compression.is_none());
        }
    }
}

#[test]
fn a_workers_device_values_are_summed_in_mxnets_order() {
    // MXNet's CommCPU reduces [a, b, c] as a + (b + c) (its CPU reduction adds up to four
    // inputs before adding them into the first): with a = 1, b = 1e8, c = -1e8 that is 1,
    // where (a + b) + c would lose a in float32.
    let out = run("dist_sync", 1, 1, |_, kv| {
        kv.init(5, &NDArray::zeros(&[4], DType::F32)).unwrap();
        let values = [
            NDArray::full(&[4], 1.0, DType::F32),
            NDArray::full(&[4], 1e8, DType::F32),
            NDArray::full(&[4], -1e8, DType::F32),
        ];
        let mut out = NDArray::zeros(&[4], DType::F32);
        kv.pushpull(5, &values, &mut out).unwrap();
        let local = kvstore_base::create("local").unwrap();
        local.init(5, &NDArray::zeros(&[4], DType::F32)).unwrap();
        let mut expected = NDArray::zeros(&[4], DType::F32);
        local.pushpull(5, &values, &mut expected).unwrap();
        (f32s(&out), f32s(&expected))
    });
    let (dist, local) = &out[0];
    assert_eq!(local, &vec![1.0; 4], "the local store's (MXNet's) order");
    assert_eq!(
        dist, local,
        "dist_sync sums a worker's values as local does"
    );
}

/// The workers of a fresh `dist_sync` job of `servers` servers whose keys of 8 elements or
/// more are split across every server, each running `body`; results by rank.
fn run_split<T: Send + 'static>(
    servers: u32,
    workers: u32,
    body: impl Fn(usize, &dyn KVStoreBase) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    run_with(
        "dist_sync",
        servers,
        workers,
        &[("MXNET_KVSTORE_BIGARRAY_BOUND", "8")],
        body,
    )
}

#[test]
fn optimizer_states_move_between_dist_jobs_and_local() {
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9);
    let dir = std::env::temp_dir().join(format!("kvstore-dist-states-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (from_dist, from_local) = (dir.join("dist"), dir.join("local"));
    let weight = || NDArray::from_vec(&[4, 5], (0..20).map(|i| i as f32 / 10.0).collect()).unwrap();
    let grad = |rank: usize, round: usize| {
        NDArray::from_vec(
            &[4, 5],
            (0..20)
                .map(|i| ((i + 3 * rank + round) % 7) as f32 - 3.0)
                .collect(),
        )
        .unwrap()
    };
    // Three rounds on 2 workers, key 3 split over 2 servers; rank 0 saves.
    let weights = {
        let (sgd, path) = (sgd.clone(), from_dist.clone());
        run_split(2, 2, move |rank, kv| {
            kv.init(3, &weight()).unwrap();
            kv.init(4, &NDArray::ones(&[3], DType::F32)).unwrap();
            kv.set_optimizer(&sgd).unwrap();
            let mut w = weight();
            for round in 0..3 {
                kv.push(3, &grad(rank, round)).unwrap();
                kv.pull(3, &mut w).unwrap();
            }
            kv.barrier().unwrap();
            if rank == 0 {
                kv.save_optimizer_states(&path, true).unwrap();
            }
            kv.barrier().unwrap();
            w
        })
    };
    // The same on `local`, each round's two gradients pushed as two device values.
    let local = kvstore_base::create("local").unwrap();
    local.init(3, &weight()).unwrap();
    local.init(4, &NDArray::ones(&[3], DType::F32)).unwrap();
    local.set_optimizer(&sgd).unwrap();
    for round in 0..3 {
        local.push(3, &[grad(0, round), grad(1, round)]).unwrap();
    }
    local.save_optimizer_states(&from_local, true).unwrap();
    let mut local_w = weight();
    local.pull(3, &mut local_w).unwrap();
    assert_eq!(f32s(&weights[0]), f32s(&local_w), "the same steps");
    let states = |path: &std::path::Path| {
        let mut u = kvstore_optimizer::Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap();
        u.load_states(&std::fs::read(path).unwrap()).unwrap();
        let key = Key::from(3);
        (
            u.state_arrays(&key).map(<[NDArray]>::to_vec),
            u.update_count(&key),
        )
    };
    let (dist_states, local_states) = (states(&from_dist), states(&from_local));
    assert!(dist_states.0.is_some(), "key 3 has a momentum");
    assert_eq!(
        dist_states, local_states,
        "the servers' slices joined into local's file"
    );
    // A job of 3 servers resumes from the file: one more round, as local's.
    let resumed = {
        let (sgd, path, start) = (sgd.clone(), from_dist.clone(), weights[0].clone());
        run_split(3, 1, move |_, kv| {
            kv.init(3, &start).unwrap();
            kv.init(4, &NDArray::ones(&[3], DType::F32)).unwrap();
            kv.set_optimizer(&sgd).unwrap();
            kv.load_optimizer_states(&path).unwrap();
            kv.push(3, &grad(0, 3)).unwrap();
            let mut w = NDArray::zeros(&[4, 5], DType::F32);
            kv.pull(3, &mut w).unwrap();
            w
        })
    };
    local.push(3, &grad(0, 3)).unwrap();
    local.pull(3, &mut local_w).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        f32s(&resumed[0]),
        f32s(&local_w),
        "resumed on another number of servers"
    );
}

#[test]
fn optimizer_states_need_an_optimizer_and_known_keys() {
    let out = run_split(2, 1, |_, kv| {
        let path =
            std::env::temp_dir().join(format!("kvstore-dist-states-e-{}", std::process::id()));
        kv.init(3, &NDArray::ones(&[4, 5], DType::F32)).unwrap();
        let no_optimizer = kv
            .save_optimizer_states(&path, true)
            .unwrap_err()
            .to_string();
        // A file of another store's keys.
        let local = kvstore_base::create("local").unwrap();
        local.init(9, &NDArray::ones(&[2], DType::F32)).unwrap();
        local
            .set_optimizer(&OptimizerSpec::new("sgd").with("momentum", 0.9))
            .unwrap();
        local.push(9, &NDArray::ones(&[2], DType::F32)).unwrap();
        local.save_optimizer_states(&path, true).unwrap();
        kv.set_optimizer(&OptimizerSpec::new("sgd")).unwrap();
        let unknown = kv.load_optimizer_states(&path).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        (no_optimizer, unknown)
    });
    let (no_optimizer, unknown) = &out[0];
    assert!(no_optimizer.contains("set_optimizer"), "{no_optimizer}");
    assert!(
        unknown.contains("key 9") && unknown.contains("init it first"),
        "{unknown}"
    );
}

/// On every worker of a job: key 3 of [4, 5] with sgd and momentum, one push; then rank 0
/// saves the states to a file named after `name` (returned) while the others wait.
fn one_step_saved(rank: usize, kv: &dyn KVStoreBase, name: &str) -> std::path::PathBuf {
    kv.init(3, &NDArray::ones(&[4, 5], DType::F32)).unwrap();
    kv.set_optimizer(&OptimizerSpec::new("sgd").with("momentum", 0.9))
        .unwrap();
    kv.push(3, &NDArray::ones(&[4, 5], DType::F32)).unwrap();
    kv.barrier().unwrap();
    let path =
        std::env::temp_dir().join(format!("kvstore-dist-states-{name}-{}", std::process::id()));
    if rank == 0 {
        kv.save_optimizer_states(&path, true).unwrap();
    }
    kv.barrier().unwrap();
    path
}

#[test]
fn a_failed_load_is_an_error_on_every_worker() {
    let out = run_split(2, 2, |rank, kv| {
        let path = one_step_saved(rank, kv, "ok");
        let missing = std::env::temp_dir().join("kvstore-dist-no-such-state-file");
        let failed = kv.load_optimizer_states(&missing).unwrap_err().to_string();
        // Then a load that works, on every worker.
        let loaded = kv.load_optimizer_states(&path);
        kv.barrier().unwrap();
        if rank == 0 {
            let _ = std::fs::remove_file(&path);
        }
        // A failure after a success: not the earlier outcome.
        let again = kv.load_optimizer_states(&missing).is_err();
        assert!(again, "rank {rank}: a later failed load is an error");
        (failed, loaded.is_ok())
    });
    assert!(
        out[0].0.contains("kvstore-dist-no-such-state-file"),
        "{}",
        out[0].0
    );
    assert!(
        out[1].0.contains("failed on rank 0") && out[1].0.contains("no-such"),
        "{}",
        out[1].0
    );
    assert!(
        out.iter().all(|(_, ok)| *ok),
        "a later load works everywhere"
    );
}

#[test]
fn optimizer_states_of_half_weights_and_string_keys_join_as_local_saves_them() {
    let spec = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9)
        .with("multi_precision", true);
    let weight = || NDArray::full(&[4, 5], 0.5, DType::F16);
    let grad = |round: usize| {
        NDArray::from_vec(
            &[4, 5],
            (0..20).map(|i| ((i + round) % 5) as f32 - 2.0).collect(),
        )
        .unwrap()
        .astype(DType::F16)
    };
    let dir = std::env::temp_dir().join(format!("kvstore-dist-states-h-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (from_dist, from_local, no_optimizer) =
        (dir.join("dist"), dir.join("local"), dir.join("bare"));
    {
        let (spec, path, bare) = (spec.clone(), from_dist.clone(), no_optimizer.clone());
        run_split(2, 1, move |_, kv| {
            kv.init("w", &weight()).unwrap();
            kv.set_optimizer(&spec).unwrap();
            for round in 0..2 {
                kv.push("w", &grad(round)).unwrap();
            }
            kv.barrier().unwrap();
            kv.save_optimizer_states(&path, true).unwrap();
            kv.save_optimizer_states(&bare, false).unwrap();
        });
    }
    let local = kvstore_base::create("local").unwrap();
    local.init("w", &weight()).unwrap();
    local.set_optimizer(&spec).unwrap();
    for round in 0..2 {
        local.push("w", &grad(round)).unwrap();
    }
    local.save_optimizer_states(&from_local, true).unwrap();
    let read = |path: &std::path::Path| {
        let mut u = kvstore_optimizer::Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap();
        u.load_states(&std::fs::read(path).unwrap()).unwrap();
        let key = Key::from("w");
        (
            u.state_arrays(&key).map(<[NDArray]>::to_vec),
            u.master_weight(&key).cloned(),
            u.update_count(&key),
        )
    };
    let (dist, local_states) = (read(&from_dist), read(&from_local));
    assert!(
        dist.1.as_ref().is_some_and(|m| m.dtype() == DType::F32),
        "a float32 master weight"
    );
    assert_eq!(dist, local_states);
    // Without the optimizer: the same arrays, no update count.
    let bare = read(&no_optimizer);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!((bare.0, bare.1, bare.2), (dist.0, dist.1, None));
}

#[test]
fn dist_async_saves_optimizer_states_as_local() {
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9);
    let path =
        std::env::temp_dir().join(format!("kvstore-dist-async-states-{}", std::process::id()));
    let grad = |round: usize| NDArray::full(&[4, 5], round as f64 + 1.0, DType::F32);
    {
        let (sgd, path) = (sgd.clone(), path.clone());
        run_with(
            "dist_async",
            2,
            1,
            &[("MXNET_KVSTORE_BIGARRAY_BOUND", "8")],
            move |_, kv| {
                kv.init(3, &NDArray::zeros(&[4, 5], DType::F32)).unwrap();
                kv.set_optimizer(&sgd).unwrap();
                for round in 0..2 {
                    kv.push(3, &grad(round)).unwrap();
                }
                kv.barrier().unwrap();
                kv.save_optimizer_states(&path, true).unwrap();
            },
        );
    }
    let local = kvstore_base::create("local").unwrap();
    local.init(3, &NDArray::zeros(&[4, 5], DType::F32)).unwrap();
    local.set_optimizer(&sgd).unwrap();
    for round in 0..2 {
        local.push(3, &grad(round)).unwrap();
    }
    let local_path = path.with_extension("local");
    local.save_optimizer_states(&local_path, true).unwrap();
    let (dist, local) = (
        std::fs::read(&path).unwrap(),
        std::fs::read(&local_path).unwrap(),
    );
    let _ = (
        std::fs::remove_file(&path),
        std::fs::remove_file(&local_path),
    );
    assert_eq!(dist, local, "the same file, byte for byte");
}

#[test]
fn a_load_that_rank_0_does_not_join_fails_its_barrier_within_the_timeout() {
    let out = run_with(
        "dist_sync",
        1,
        2,
        &[("KVSTORE_TIMEOUT_SECS", "1")],
        |rank, kv| {
            kv.init(3, &NDArray::ones(&[4], DType::F32)).unwrap();
            kv.set_optimizer(&OptimizerSpec::new("sgd")).unwrap();
            let path = std::env::temp_dir().join("kvstore-dist-never-loaded");
            let started = std::time::Instant::now();
            let alone = match rank {
                // Rank 0 stays in the job without loading.
                0 => {
                    std::thread::sleep(Duration::from_millis(2500));
                    String::new()
                }
                _ => kv.load_optimizer_states(&path).unwrap_err().to_string(),
            };
            (alone, started.elapsed())
        },
    );
    let (alone, waited) = &out[1];
    assert!(alone.contains("barrier of the worker group"), "{alone}");
    assert!(
        alone.contains("worker rank 0"),
        "names the missing worker: {alone}"
    );
    assert!(*waited < Duration::from_secs(5), "waited {waited:?}");
}

#[test]
fn back_to_back_loads_each_give_their_own_outcome() {
    let out = run_split(2, 2, |rank, kv| {
        let path = one_step_saved(rank, kv, "b2b");
        let missing = std::env::temp_dir().join("kvstore-dist-no-such-state-file-b2b");
        // Rank 0 fails at once and starts the next load while rank 1 may still be waiting for
        // the first one's outcome.
        let first = kv.load_optimizer_states(&missing).is_err();
        let second = kv.load_optimizer_states(&path).is_ok();
        kv.barrier().unwrap();
        if rank == 0 {
            let _ = std::fs::remove_file(&path);
        }
        (first, second)
    });
    assert!(
        out.iter().all(|&(first, second)| first && second),
        "{out:?}"
    );
}

#[test]
fn a_question_about_a_load_in_progress_is_held_until_rank_0_records_its_outcome() {
    use kvstore_dist::protocol::{self, CMD_LOAD_OUTCOME};
    use kvstore_dist::transport::{Connection, Outgoing};
    use kvstore_dist::{DistConfig, Node};
    use std::time::Instant;
    // A timeout of 8 s: a question is held for a second (a quarter of it, at most 1 s).
    let cluster = LocalCluster::start(1, 1, Duration::from_secs(8)).unwrap();
    let config = DistConfig::from_vars(cluster.worker_options().clone()).unwrap();
    let node = Node::join(&config).unwrap();
    let server = node.servers().next().unwrap().addr.clone();
    let connect = || {
        let mut transport = config.transport();
        transport.node_id = node.id();
        Connection::connect(server.as_str(), transport).unwrap()
    };
    let (rank0, other) = (connect(), connect());
    // `other` is the job's worker for the server (it ends the job with its goodbye).
    other
        .request(
            Outgoing::new(protocol::CMD_HELLO, b"dist_sync")
                .key(u64::from(node.rank()))
                .aux(protocol::Mode::Sync.code()),
            "hello",
        )
        .unwrap();
    let record = |aux: u64, payload: &[u8]| {
        rank0
            .request(
                Outgoing::new(CMD_LOAD_OUTCOME, payload).key(1).aux(aux),
                "record",
            )
            .unwrap();
    };
    let ask = || {
        let t = Instant::now();
        let answer = other
            .request(Outgoing::new(CMD_LOAD_OUTCOME, &[]).key(1), "question")
            .unwrap();
        (answer.payload.to_vec(), t.elapsed())
    };
    record(2, &[]);
    // Nothing recorded within the hold: "still pending".
    let (pending, held) = ask();
    assert_eq!(pending, vec![protocol::LOAD_PENDING]);
    assert!(held >= Duration::from_millis(900), "{held:?}");
    // Recorded while a question is held: answered then, not at the end of the hold.
    let (outcome, waited) = thread::scope(|s| {
        let asked = s.spawn(ask);
        thread::sleep(Duration::from_millis(150));
        record(1, &[0]);
        asked.join().unwrap()
    });
    assert_eq!(outcome, vec![0], "rank 0's outcome: loaded");
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(900),
        "{waited:?}"
    );
    other
        .request(Outgoing::new(protocol::CMD_BYE, &[]), "bye")
        .unwrap();
    drop((rank0, other));
    node.leave().unwrap();
    cluster.finish().unwrap();
}

#[test]
fn a_batch_whose_lengths_overflow_is_refused_and_the_server_keeps_serving() {
    use kvstore_dist::protocol::{self, BatchItem};
    use kvstore_dist::transport::{Connection, Outgoing};
    use kvstore_dist::{DistConfig, Node};
    let cluster = LocalCluster::start(1, 1, TIMEOUT).unwrap();
    let config = DistConfig::from_vars(cluster.worker_options().clone()).unwrap();
    let node = Node::join(&config).unwrap();
    let server = node.servers().next().unwrap().addr.clone();
    let mut transport = config.transport();
    transport.node_id = node.id();
    let conn = Connection::connect(server.as_str(), transport).unwrap();
    conn.request(
        Outgoing::new(protocol::CMD_HELLO, b"dist_sync")
            .key(u64::from(node.rank()))
            .aux(protocol::Mode::Sync.code()),
        "hello",
    )
    .unwrap();
    // Two items whose lengths add up to 2^64 + 1 bytes (1 after wrapping), and 1 byte of data.
    let item = |len| BatchItem {
        wire: 7,
        part: 0,
        flags: 0,
        seq: 0,
        len,
    };
    let mut payload = BatchItem::encode::<&[u8]>(&[item(u64::MAX), item(2)], &[]);
    payload.push(0);
    for inner in [protocol::CMD_INIT, protocol::CMD_PUSH] {
        let err = conn
            .request(
                Outgoing::new(protocol::CMD_BATCH, &payload).aux(u64::from(inner)),
                "a hostile batch",
            )
            .unwrap_err();
        assert!(err.to_string().contains("more than 2^64"), "{err}");
    }
    // The connection and the server still work.
    let err = conn
        .request(Outgoing::new(protocol::CMD_PULL, &[]).key(7), "pull")
        .unwrap_err();
    assert!(err.to_string().contains("not initialised"), "{err}");
    conn.request(Outgoing::new(protocol::CMD_BYE, &[]), "bye")
        .unwrap();
    drop(conn);
    node.leave().unwrap();
    cluster.finish().unwrap();
}

#[test]
fn every_mxnet_name_of_a_dist_store_is_registered() {
    // MXNet picks a dist store by substrings ("dist", "async", "device"): its documented
    // spellings are names or aliases here.
    let stores = kvstore_base::registered();
    let aliases = |name: &str| {
        stores
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.aliases.clone())
            .unwrap_or_else(|| panic!("{name} is not registered"))
    };
    assert_eq!(aliases("dist_sync"), ["dist"]);
    assert_eq!(aliases("dist_device_sync"), ["dist_sync_device"]);
    assert_eq!(
        aliases("dist_async"),
        ["dist_async_device", "dist_device_async"]
    );
}

#[test]
fn with_multi_precision_the_servers_sum_half_pushes_in_float32() {
    // Two workers push 40000 each to float16 weights: their float16 sum (80000) would be
    // infinite; as MXNet's servers under multi_precision, the round is summed in float32 and
    // the float32 master copy takes 0 - 0.01 * 80000 = -800. Key 3 is dense, key 4 row-sparse
    // (row 1 pushed).
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.01)
        .with("multi_precision", true);
    let out = run("dist_sync", 1, 2, move |_, kv| {
        let table = NDArray::zeros(&[3, 2], DType::F16)
            .retain_rows(&[0, 1, 2])
            .unwrap();
        kv.init(&[3, 4], &[NDArray::zeros(&[2], DType::F16), table])
            .unwrap();
        kv.set_optimizer(&sgd).unwrap();
        let row = NDArray::full(&[1, 2], 40000.0, DType::F16);
        let rows = NDArray::row_sparse(&[3, 2], vec![1], &row).unwrap();
        kv.push(&[3, 4], &[NDArray::full(&[2], 40000.0, DType::F16), rows])
            .unwrap();
        let mut dense = NDArray::zeros(&[2], DType::F16);
        kv.pull(3, &mut dense).unwrap();
        let ids = NDArray::from_vec(&[3], vec![0i64, 1, 2]).unwrap();
        let mut pulled =
            NDArray::row_sparse(&[3, 2], vec![], &NDArray::zeros(&[0, 2], DType::F16)).unwrap();
        kv.row_sparse_pull(4, &mut pulled, &ids).unwrap();
        (dense.to_f64_vec(), pulled.to_dense().to_f64_vec())
    });
    for (dense, rows) in out {
        assert_eq!(dense, vec![-800.0; 2]);
        assert_eq!(rows, vec![0.0, 0.0, -800.0, -800.0, 0.0, 0.0]);
    }
}

#[test]
fn rank_0_may_retry_an_init_a_server_already_took_but_not_change_it() {
    use common::{remote_message, Manual};
    use kvstore_dist::protocol::{self, InitMeta};
    use kvstore_dist::transport::Outgoing;

    let cluster = LocalCluster::start(1, 1, TIMEOUT).unwrap();
    let w = Manual::join(&cluster);
    let f32_flag = protocol::dtype_flag(DType::F32);
    let meta = |elements: u64| InitMeta {
        dtype: DType::F32,
        elements,
        row_len: 0,
        row_sparse: false,
        key: 9.into(),
    };
    let send = |command: u32, payload: &[u8]| {
        w.conn.request(
            Outgoing::new(command, payload).key(9).flags(f32_flag),
            "a hand-made request",
        )
    };
    let init = |meta: InitMeta, values: &[f32]| {
        let mut payload = meta.encode();
        payload.extend(values.iter().flat_map(|v| v.to_ne_bytes()));
        send(protocol::CMD_INIT, &payload)
    };
    init(meta(3), &[1.0, 2.0, 3.0]).unwrap();
    // The same init again, as after a failure on another server: taken, nothing changes.
    init(meta(3), &[1.0, 2.0, 3.0]).unwrap();
    let other_values = remote_message(init(meta(3), &[1.0, 2.0, 4.0]));
    assert!(
        other_values.contains("already initialised"),
        "{other_values}"
    );
    let other_shape = remote_message(init(meta(2), &[1.0, 2.0]));
    assert!(other_shape.contains("already initialised"), "{other_shape}");
    let pulled = send(protocol::CMD_PULL, &[]).unwrap();
    assert_eq!(
        &pulled.payload[..],
        [1.0f32, 2.0, 3.0].map(f32::to_ne_bytes).concat()
    );
    // A push (the one worker's round) replaces the value: the first init no longer matches.
    let pushed: Vec<u8> = [5.0f32, 5.0, 5.0].map(f32::to_ne_bytes).concat();
    send(protocol::CMD_PUSH, &pushed).unwrap();
    let changed = remote_message(init(meta(3), &[1.0, 2.0, 3.0]));
    assert!(changed.contains("since changed"), "{changed}");
    let pulled = send(protocol::CMD_PULL, &[]).unwrap();
    assert_eq!(&pulled.payload[..], pushed);
    w.leave();
    cluster.finish().unwrap();
}

#[test]
fn threads_initialising_string_keys_at_once_each_get_their_own() {
    let out = run("dist_sync", 1, 1, |_, kv| {
        let start = std::sync::Barrier::new(8);
        thread::scope(|s| {
            for t in 0..8 {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    kv.init(format!("w{t}"), &NDArray::full(&[4], t as f64, DType::F32))
                        .unwrap();
                });
            }
        });
        (0..8)
            .map(|t| {
                let mut w = NDArray::zeros(&[4], DType::F32);
                kv.pull(format!("w{t}"), &mut w).unwrap();
                f32s(&w)[0]
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(out[0], (0..8).map(|t| t as f32).collect::<Vec<_>>());
}

#[test]
fn a_push_under_an_optimizer_is_refused_whole_before_any_key_is_stepped() {
    let out = run("dist_sync", 2, 1, |_, kv| {
        kv.init_batch(
            &kvstore_base::KeyedValues::new(
                "init",
                vec![Key::from(0), Key::from(1), Key::from(2)],
                vec![
                    &NDArray::full(&[8], 1.0, DType::F32),
                    &NDArray::full(&[4], 5.0, DType::I32),
                    &NDArray::full(&[4, 2], 1.0, DType::F32),
                ],
            )
            .unwrap(),
        )
        .unwrap();
        kv.set_optimizer(
            &OptimizerSpec::new("adagrad")
                .with("learning_rate", 0.1)
                .with("wd", 0.01),
        )
        .unwrap();
        let grad = NDArray::full(&[8], 1.0, DType::F32);
        let int_grad = NDArray::full(&[4], 1.0, DType::I32);
        let integer = kv
            .push_batch(
                &kvstore_base::KeyedValues::new(
                    "push",
                    vec![Key::from(0), Key::from(1)],
                    vec![&grad, &int_grad],
                )
                .unwrap(),
                0,
            )
            .unwrap_err();
        // Rows with weight decay: adagrad's sparse update refuses them.
        let rows = NDArray::row_sparse(&[4, 2], vec![1], &NDArray::full(&[1, 2], 1.0, DType::F32))
            .unwrap();
        let sparse = kv
            .push_batch(
                &kvstore_base::KeyedValues::new(
                    "push",
                    vec![Key::from(0), Key::from(2)],
                    vec![&grad, &rows],
                )
                .unwrap(),
                0,
            )
            .unwrap_err();
        let mut w = NDArray::zeros(&[8], DType::F32);
        kv.pull(0, &mut w).unwrap();
        (integer, sparse, f32s(&w))
    });
    let (integer, sparse, w) = &out[0];
    assert_eq!(integer.key(), Some(&Key::from(1)), "{integer}");
    assert!(integer.to_string().contains("dtype int32"), "{integer}");
    assert_eq!(sparse.key(), Some(&Key::from(2)), "{sparse}");
    assert!(sparse.to_string().contains("weight decay"), "{sparse}");
    assert_eq!(w, &vec![1.0; 8], "key 0 was never stepped");
}

#[test]
fn a_worker_may_queue_only_so_many_pushes_of_a_part_for_later_rounds() {
    use common::{remote_message, Manual};
    use kvstore_dist::protocol::{self, InitMeta};
    use kvstore_dist::transport::Outgoing;

    // Two hand-spoken workers; only one of them pushes, so its pushes after the first wait
    // for rounds the other never completes.
    let cluster = LocalCluster::start(1, 2, TIMEOUT).unwrap();
    let join = || {
        let config = kvstore_dist::DistConfig::from_vars(cluster.worker_options().clone()).unwrap();
        let node = kvstore_dist::Node::join(&config).unwrap();
        let mut transport = config.transport();
        transport.node_id = node.id();
        let server = node.servers().next().unwrap().addr.clone();
        let conn =
            kvstore_dist::transport::Connection::connect(server.as_str(), transport).unwrap();
        conn.request(
            Outgoing::new(protocol::CMD_HELLO, b"dist_sync")
                .key(node.rank() as u64)
                .aux(protocol::Mode::Sync.code()),
            "hello",
        )
        .unwrap();
        Manual { node, conn }
    };
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(join);
        let b = s.spawn(join);
        (a.join().unwrap(), b.join().unwrap())
    });
    let (first, second) = if a.node.rank() == 0 { (a, b) } else { (b, a) };
    let f32_flag = protocol::dtype_flag(DType::F32);
    let mut init = InitMeta {
        dtype: DType::F32,
        elements: 2,
        row_len: 0,
        row_sparse: false,
        key: 9.into(),
    }
    .encode();
    init.extend([1.0f32, 2.0].iter().flat_map(|v| v.to_ne_bytes()));
    first
        .conn
        .request(
            Outgoing::new(protocol::CMD_INIT, &init)
                .key(9)
                .flags(f32_flag),
            "init",
        )
        .unwrap();
    let push: Vec<u8> = [1.0f32, 1.0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let send = || {
        first
            .conn
            .send(
                Outgoing::new(protocol::CMD_PUSH, &push)
                    .key(9)
                    .flags(f32_flag),
                "push",
            )
            .unwrap()
    };
    // The first push is merged and answered; 64 more wait for later rounds.
    send().wait().unwrap();
    let queued: Vec<_> = (0..64).map(|_| send()).collect();
    let refused = remote_message(send().wait());
    assert!(
        refused.contains("64 pushes of it queued for later rounds"),
        "{refused}"
    );
    drop(queued);
    for m in [first, second] {
        drop(m.conn);
        m.node.leave().unwrap();
    }
    drop(cluster);
}
