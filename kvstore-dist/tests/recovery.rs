//! Recovery nodes (ps-lite's, MXNet's `is_recovery`): a worker started after another was lost
//! takes its rank, keeps the servers' values, optimizer and optimizer states, and the job goes
//! on. Every wait is bounded by a timeout of a few seconds.

use std::thread;
use std::time::{Duration, Instant};

use kvstore_base::{DType, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_dist::protocol::{self, Mode};
use kvstore_dist::transport::{Connection, Outgoing, TransportError};
use kvstore_dist::{DistConfig, DistStore, LocalCluster};

/// The bound on every wait of these clusters.
const TIMEOUT: Duration = Duration::from_secs(10);

fn connect(config: &DistConfig) -> kvstore_base::Result<DistStore> {
    DistStore::connect("dist_sync", Mode::Sync, config)
}

/// The workers of a fresh cluster, by rank.
fn workers(cluster: &LocalCluster, n: usize) -> (DistConfig, Vec<DistStore>) {
    let config = DistConfig::from_vars(cluster.worker_options().clone()).unwrap();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let config = config.clone();
            thread::spawn(move || connect(&config).unwrap())
        })
        .collect();
    let mut stores: Vec<DistStore> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    stores.sort_by_key(|kv| kv.rank());
    (config, stores)
}

/// Runs `f` on every store at once (a collective call); results in the stores' order.
fn on_all<T: Send>(stores: &[&DistStore], f: impl Fn(&DistStore) -> T + Sync) -> Vec<T> {
    thread::scope(|s| {
        let handles: Vec<_> = stores.iter().map(|kv| s.spawn(|| f(kv))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn momentum_sgd() -> OptimizerSpec {
    OptimizerSpec::new("sgd")
        .with("learning_rate", 1.0)
        .with("momentum", 0.5)
}

/// One step: every worker pushes ones and pulls the updated weight of key 3.
fn step(kv: &DistStore) -> kvstore_base::Result<Vec<f32>> {
    let mut out = NDArray::zeros(&[4], DType::F32);
    kv.pushpull(3, &NDArray::ones(&[4], DType::F32), &mut out)?;
    Ok(out.to_vec::<f32>().unwrap())
}

fn a_worker_takes_the_place_of_lost_rank(lost: usize) {
    let cluster = LocalCluster::start(2, 2, TIMEOUT).unwrap();
    let (config, mut stores) = workers(&cluster, 2);
    let refs: Vec<&DistStore> = stores.iter().collect();
    on_all(&refs, |kv| {
        assert!(!kv.is_recovery());
        kv.init(3, &NDArray::zeros(&[4], DType::F32)).unwrap();
        kv.set_optimizer(&momentum_sgd()).unwrap();
    });
    // Two pushes of ones: the gradient is 2; mom = -2, w = -2.
    for w in on_all(&refs, |kv| step(kv).unwrap()) {
        assert_eq!(w, vec![-2.0; 4]);
    }

    let victim = stores.remove(lost);
    victim.abandon();
    let survivor = stores.pop().unwrap();
    let err = step(&survivor).unwrap_err().to_string();
    assert!(
        err.contains(&format!("worker rank {lost}")) && err.contains("is gone"),
        "the survivor hears which worker is gone: {err}"
    );

    // MXNet's get_num_dead_node: the lost worker, by group and by id (the scheduler notices
    // the dropped connection by itself: poll for it, within the timeout).
    let minute = Duration::from_secs(60);
    let by = Instant::now() + TIMEOUT;
    let dead = loop {
        let dead = survivor.dead_nodes(4, minute).unwrap();
        if !dead.is_empty() || Instant::now() > by {
            break dead;
        }
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].contains(&format!("worker rank {lost}")), "{dead:?}");
    assert_eq!(
        survivor
            .dead_nodes(9 + 2 * lost as u64, minute)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        survivor.dead_nodes(7, minute).unwrap().len(),
        1,
        "all nodes"
    );
    assert!(
        survivor.dead_nodes(3, minute).unwrap().is_empty(),
        "scheduler and servers"
    );
    assert!(survivor
        .dead_nodes(9 + 2 * (1 - lost) as u64, minute)
        .unwrap()
        .is_empty());

    // A restarted worker: the lost rank, the servers' value and optimizer kept.
    let t = Instant::now();
    let recovered = connect(&config).unwrap();
    let rejoined = t.elapsed();
    println!("a worker took lost rank {lost}'s place in {rejoined:?}");
    assert!(rejoined < Duration::from_secs(5), "{rejoined:?}");
    assert!(recovered.is_recovery());
    assert_eq!(recovered.rank(), lost);
    let refused = recovered
        .init(3, &NDArray::zeros(&[5], DType::F32))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("key 3"), "{refused}");
    recovered
        .init(3, &NDArray::full(&[4], 100.0, DType::F32))
        .unwrap();
    let other = recovered
        .set_optimizer(&OptimizerSpec::new("adam"))
        .unwrap_err()
        .to_string();
    assert!(
        other.contains("every worker must set the same optimizer"),
        "{other}"
    );
    recovered.set_optimizer(&momentum_sgd()).unwrap();
    assert!(
        recovered.dead_nodes(7, minute).unwrap().is_empty(),
        "nobody is dead now"
    );
    // A program re-run from its start loads its checkpoint: the servers' newer states stay.
    let file = std::env::temp_dir().join(format!("kvstore-recovery-no-such-states-{lost}"));
    recovered.load_optimizer_states(&file).unwrap();
    if lost == 0 {
        // MXNet's kController sets an optimizer too: kept as well, a different one refused.
        let adam = serde_json::to_string(&OptimizerSpec::new("adam")).unwrap();
        let e = recovered.send_command_to_servers(0, &adam).unwrap_err();
        assert!(e.to_string().contains("must set the same optimizer"), "{e}");
        let same = serde_json::to_string(&momentum_sgd()).unwrap();
        recovered.send_command_to_servers(0, &same).unwrap();
    }
    let mut w = NDArray::zeros(&[4], DType::F32);
    recovered.pull(3, &mut w).unwrap();
    assert_eq!(
        w.to_vec::<f32>().unwrap(),
        vec![-2.0; 4],
        "the servers' value"
    );

    // The next step uses the momentum kept on the servers: mom = 0.5 * -2 - 2 = -3, w = -5
    // (a reset optimizer would give -4).
    for w in on_all(&[&survivor, &recovered], |kv| step(kv).unwrap()) {
        assert_eq!(w, vec![-5.0; 4]);
    }
    drop((survivor, recovered));
    cluster.finish().unwrap();
}

#[test]
fn a_restarted_worker_takes_the_place_of_lost_rank_1_and_training_goes_on() {
    a_worker_takes_the_place_of_lost_rank(1);
}

#[test]
fn a_restarted_rank_0_keeps_the_servers_values_and_optimizer_states() {
    a_worker_takes_the_place_of_lost_rank(0);
}

#[test]
fn a_late_worker_finds_no_place_when_no_worker_is_lost() {
    // A timeout of 5 s: heartbeats every 0.5 s, a loss noticed within 1.5 s, which is how
    // long a late worker waits for one.
    let cluster = LocalCluster::start(1, 1, Duration::from_secs(5)).unwrap();
    let (config, stores) = workers(&cluster, 1);
    let t = Instant::now();
    let err = connect(&config).unwrap_err().to_string();
    assert!(err.contains("no worker was lost within 1.6s"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // The job itself is unaffected.
    stores[0].init(1, &NDArray::ones(&[2], DType::F32)).unwrap();
    drop(stores);
    cluster.finish().unwrap();
}

#[test]
fn a_recovering_hello_takes_a_rank_over_from_a_connection_still_open() {
    // A hung worker's connections stay open after the scheduler declared it lost: the worker
    // taking its place takes the rank over on the server; a plain second hello is refused.
    let cluster = LocalCluster::start(1, 2, TIMEOUT).unwrap();
    let config = DistConfig::from_vars(cluster.worker_options().clone()).unwrap();
    let store = {
        let config = config.clone();
        thread::spawn(move || connect(&config).unwrap())
    };
    let node = kvstore_dist::Node::join(&config).unwrap();
    let hung = store.join().unwrap();
    let server = node.servers().next().unwrap().addr.clone();
    let mut transport = config.transport();
    transport.node_id = node.id();
    let hello = |rank: usize, flags: u16| {
        let conn = Connection::connect(server.as_str(), transport.clone()).unwrap();
        let answer = conn.request(
            Outgoing::new(protocol::CMD_HELLO, b"dist_sync")
                .key(rank as u64)
                .aux(Mode::Sync.code())
                .flags(flags),
            "hello",
        );
        (conn, answer)
    };
    let (mine, answer) = hello(node.rank() as usize, 0);
    answer.unwrap();

    match hello(hung.rank(), 0).1 {
        Err(TransportError::Remote { message, .. }) => assert!(
            message.contains(&format!("worker rank {} is already connected", hung.rank())),
            "{message}"
        ),
        other => panic!("a second hello for a connected rank must be refused: {other:?}"),
    }
    let (taken, answer) = hello(hung.rank(), protocol::FLAG_RECOVERING);
    answer.unwrap();
    // The hung worker's requests are refused from now on.
    let refused = hung
        .init(4, &NDArray::full(&[3], 7.0, DType::F32))
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&format!(
            "worker rank {}'s place was taken by a recovering worker",
            hung.rank()
        )),
        "{refused}"
    );
    for conn in [taken, mine] {
        conn.request(Outgoing::new(protocol::CMD_BYE, &[]), "bye")
            .unwrap();
    }
    drop(hung);
    node.leave().unwrap();
    cluster.finish().unwrap();
}

#[test]
fn a_job_whose_only_worker_was_lost_goes_on_with_its_replacement() {
    let cluster = LocalCluster::start(1, 1, TIMEOUT).unwrap();
    let (config, mut stores) = workers(&cluster, 1);
    let only = stores.pop().unwrap();
    only.init(2, &NDArray::full(&[3], 5.0, DType::F32)).unwrap();
    only.abandon();
    // The server waits for a replacement instead of finishing with nobody left.
    let replacement = connect(&config).unwrap();
    assert!(replacement.is_recovery());
    replacement
        .init(2, &NDArray::zeros(&[3], DType::F32))
        .unwrap();
    // Its predecessor died before setting the optimizer: the replacement installs it.
    replacement
        .set_optimizer(&OptimizerSpec::new("test"))
        .unwrap();
    let mut out = NDArray::zeros(&[3], DType::F32);
    replacement
        .pushpull(2, &NDArray::full(&[3], 2.0, DType::F32), &mut out)
        .unwrap();
    assert_eq!(
        out.to_vec::<f32>().unwrap(),
        vec![7.0; 3],
        "w += grad on the kept 5"
    );
    drop(replacement);
    cluster.finish().unwrap();
}

#[test]
fn a_restarted_worker_keeps_the_servers_compression_and_a_failed_push_keeps_the_residual() {
    let cluster = LocalCluster::start(1, 2, TIMEOUT).unwrap();
    let (config, mut stores) = workers(&cluster, 2);
    let params = |threshold: &str| {
        let mut p = std::collections::BTreeMap::new();
        p.insert("type".to_string(), "2bit".to_string());
        p.insert("threshold".to_string(), threshold.to_string());
        p
    };
    let refs: Vec<&DistStore> = stores.iter().collect();
    on_all(&refs, |kv| {
        kv.set_gradient_compression(&params("0.5")).unwrap();
        kv.init(3, &NDArray::zeros(&[4], DType::F32)).unwrap();
    });
    stores.pop().unwrap().abandon();
    let survivor = stores.pop().unwrap();
    // A compressed push that fails (its partner is gone) leaves the residual as it was:
    // quantising 0.6 would have left 0.1 in it.
    let grad = NDArray::full(&[4], 0.6, DType::F32);
    let mut out = NDArray::zeros(&[4], DType::F32);
    let err = survivor
        .pushpull(3, &grad, &mut out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is gone"), "{err}");
    let recovered = connect(&config).unwrap();
    let other = recovered
        .set_gradient_compression(&params("0.25"))
        .unwrap_err()
        .to_string();
    assert!(other.contains("must set the same compression"), "{other}");
    recovered.set_gradient_compression(&params("0.5")).unwrap();
    recovered
        .init(3, &NDArray::zeros(&[4], DType::F32))
        .unwrap();
    // 0.6 from each worker quantises to 0.5: the server sums two of them.
    let sums = on_all(&[&survivor, &recovered], |kv| {
        let grad = NDArray::full(&[4], 0.6, DType::F32);
        let mut out = NDArray::zeros(&[4], DType::F32);
        // The survivor may first hear that its partner was gone.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match kv.pushpull(3, &grad, &mut out) {
                Ok(()) => break out.to_vec::<f32>().unwrap(),
                Err(e) if e.to_string().contains("is gone") && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
    });
    for sum in sums {
        assert_eq!(sum, vec![1.0; 4]);
    }
    // Each worker's residual is now 0.1, whatever attempts failed before: 0.3 more is 0.4,
    // under the threshold, and nothing is sent (a residual counting a failed attempt's 0.1
    // as well would reach 0.5 and send it).
    let sums = on_all(&[&survivor, &recovered], |kv| {
        let mut out = NDArray::full(&[4], 9.0, DType::F32);
        kv.pushpull(3, &NDArray::full(&[4], 0.3, DType::F32), &mut out)
            .unwrap();
        out.to_vec::<f32>().unwrap()
    });
    for sum in sums {
        assert_eq!(sum, vec![0.0; 4]);
    }
    drop((survivor, recovered));
    cluster.finish().unwrap();
}

#[test]
fn a_worker_the_scheduler_lost_is_lost_on_the_servers_though_its_connection_stays_open() {
    // A timeout of 3 s: heartbeats every 0.3 s, a worker lost after 0.9 s of silence.
    let timeout = Duration::from_secs(3);
    let cluster = LocalCluster::start(1, 2, timeout).unwrap();
    let (config, mut stores) = workers(&cluster, 2);
    let refs: Vec<&DistStore> = stores.iter().collect();
    on_all(&refs, |kv| {
        kv.init(3, &NDArray::zeros(&[4], DType::F32)).unwrap();
    });
    let frozen = stores.pop().unwrap();
    let survivor = stores.pop().unwrap();
    frozen.freeze_heartbeats();
    let t = Instant::now();
    let err = step(&survivor).unwrap_err().to_string();
    assert!(
        err.contains("worker rank 1") && err.contains("declared it lost"),
        "the server learns the loss from the scheduler: {err}"
    );
    assert!(
        t.elapsed() < timeout,
        "before the round's own timeout: {:?}",
        t.elapsed()
    );
    // Its connections are still open; a restarted worker takes its place all the same.
    let recovered = connect(&config).unwrap();
    assert_eq!(recovered.rank(), 1);
    recovered
        .init(3, &NDArray::zeros(&[4], DType::F32))
        .unwrap();
    for w in on_all(&[&survivor, &recovered], |kv| step(kv).unwrap()) {
        assert_eq!(w, vec![2.0; 4], "no optimizer: the sum of the two pushes");
    }
    // Should it wake up, its pushes are refused.
    let refused = frozen
        .push(3, &NDArray::ones(&[4], DType::F32))
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("declared lost by the scheduler"),
        "{refused}"
    );
    // And its pulls: the value it would read lacks its own acknowledged push.
    let mut out = NDArray::zeros(&[4], DType::F32);
    let refused = frozen.pull(3, &mut out).unwrap_err().to_string();
    assert!(
        refused.contains("declared lost by the scheduler"),
        "{refused}"
    );
    drop((frozen, survivor, recovered));
    cluster.finish().unwrap();
}

#[test]
fn a_step_retried_after_a_loss_is_not_failed_by_the_lost_round() {
    let cluster = LocalCluster::start(1, 2, TIMEOUT).unwrap();
    let (config, mut stores) = workers(&cluster, 2);
    let refs: Vec<&DistStore> = stores.iter().collect();
    on_all(&refs, |kv| {
        kv.init(3, &NDArray::zeros(&[4], DType::F32)).unwrap();
        kv.init(4, &NDArray::zeros(&[4], DType::F32)).unwrap();
    });
    let ones = NDArray::ones(&[4], DType::F32);
    // Rank 0 pushes key 3 (acknowledged: the round waits for rank 1), then rank 1 is lost:
    // key 3's round fails, and rank 0 hears of it through its push of key 4.
    stores[0].push(3, &ones).unwrap();
    let lost = stores.pop().unwrap();
    lost.abandon();
    let survivor = stores.pop().unwrap();
    let by = Instant::now() + TIMEOUT;
    let failed = loop {
        match survivor.push(4, &ones) {
            Err(e) => break e.to_string(),
            // Merged before the server noticed: that round fails with the loss too.
            Ok(()) if Instant::now() < by => thread::sleep(Duration::from_millis(10)),
            Ok(()) => panic!("the loss was never noticed"),
        }
    };
    assert!(failed.contains("is gone"), "{failed}");
    // A restarted worker takes rank 1; both run the step again: rank 0's pulls read the new
    // round, not the failure of the one it abandoned.
    let recovered = connect(&config).unwrap();
    for key in [3, 4] {
        recovered
            .init(key, &NDArray::zeros(&[4], DType::F32))
            .unwrap();
    }
    let pulled = on_all(&[&survivor, &recovered], |kv| {
        kv.push(3, &ones)?;
        kv.push(4, &ones)?;
        let mut out = NDArray::zeros(&[4], DType::F32);
        kv.pull(3, &mut out)?;
        let three = out.to_vec::<f32>().unwrap();
        kv.pull(4, &mut out)?;
        Ok::<_, kvstore_base::Error>((three, out.to_vec::<f32>().unwrap()))
    });
    for p in pulled {
        let (three, four) = p.unwrap();
        assert_eq!((three, four), (vec![2.0; 4], vec![2.0; 4]));
    }
    drop((survivor, recovered));
    cluster.finish().unwrap();
}

/// A sync round that failed (timed out waiting for a late worker) after a worker's push was
/// acknowledged is reported to that worker by its next call on the key, a push too: pushing
/// again without pulling is refused, naming the failed round, rather than merged beside the
/// late worker's push of the step before. Told once, the key works again.
#[test]
fn a_failed_round_is_reported_to_a_worker_that_pushes_again_without_pulling() {
    let cluster = LocalCluster::start(1, 2, Duration::from_secs(1)).unwrap();
    let (_, stores) = workers(&cluster, 2);
    let (a, b) = (&stores[0], &stores[1]);
    let ones = NDArray::ones(&[2], DType::F32);
    on_all(&[a, b], |kv| {
        kv.init(3, &NDArray::zeros(&[2], DType::F32)).unwrap()
    });
    a.push(3, &ones).unwrap();
    // b is late: the server gives the round up after its timeout.
    thread::sleep(Duration::from_millis(2500));
    let e = a
        .push(3, &ones)
        .expect_err("its last round failed")
        .to_string();
    assert!(
        e.contains("previous push of it failed") && e.contains("timed out"),
        "{e}"
    );
    // Both push and pull once more: one round, the sum of this step only.
    let pulled = on_all(&[a, b], |kv| {
        kv.push(3, &ones).unwrap();
        let mut out = NDArray::zeros(&[2], DType::F32);
        kv.pull(3, &mut out).unwrap();
        out.to_vec::<f32>().unwrap()
    });
    assert_eq!(pulled, vec![vec![2.0; 2]; 2]);
    drop(stores);
    cluster.detach();
}

/// A push that one server merged and another refused (a worker taking a lost one's place had
/// said its hello to the first only) is retried whole: the server that merged it acknowledges
/// the retry without merging it again, so that both parts of the key stay in the same step.
/// Before, the retry was queued there as the worker's next push, and the key's parts drifted a
/// step apart for the rest of the job.
#[test]
fn a_push_retried_after_failing_on_one_server_is_merged_once_on_each() {
    use kvstore_dist::protocol::{dtype_flag, push_aux, CMD_BYE, CMD_PUSH};
    let cluster =
        LocalCluster::start_with(2, 2, TIMEOUT, [("MXNET_KVSTORE_BIGARRAY_BOUND", "4")]).unwrap();
    let (config, mut stores) = workers(&cluster, 2);
    let refs: Vec<&DistStore> = stores.iter().collect();
    // Key 3: 8 elements, one part of 4 on each server.
    on_all(&refs, |kv| {
        kv.init(3, &NDArray::zeros(&[8], DType::F32)).unwrap()
    });
    stores.pop().unwrap().abandon();
    let a = stores.pop().unwrap();
    let by = Instant::now() + TIMEOUT;
    while a.dead_nodes(4, Duration::from_secs(60)).unwrap().is_empty() {
        assert!(Instant::now() < by, "the loss was never noticed");
        thread::sleep(Duration::from_millis(10));
    }
    // Rank 1's replacement, by hand: its hello to server 0 only, for now.
    let node = kvstore_dist::Node::join_recovering(&config).unwrap();
    assert_eq!(node.rank(), 1);
    let server = |rank: u32| {
        let info = node.servers().find(|s| s.rank == rank).unwrap();
        let mut transport = config.transport();
        transport.node_id = node.id();
        let conn = Connection::connect(info.addr.as_str(), transport).unwrap();
        conn.request(
            Outgoing::new(protocol::CMD_HELLO, b"dist_sync")
                .key(1)
                .aux(Mode::Sync.code())
                .flags(protocol::FLAG_RECOVERING),
            "hello",
        )
        .unwrap();
        conn
    };
    let first = server(0);
    let value = |v: f32| NDArray::full(&[8], f64::from(v), DType::F32);
    let e = a
        .push(3, &value(1.0))
        .expect_err("server 1 still misses rank 1");
    assert!(e.to_string().contains("is gone"), "{e}");
    let second = server(1);
    // The step again: merged on server 1, acknowledged as merged already on server 0.
    a.push(3, &value(1.0)).unwrap();
    let replacement_pushes = |v: f32, seq: u16| {
        let bytes: Vec<u8> = [v; 4].iter().flat_map(|x| x.to_ne_bytes()).collect();
        for (part, conn) in [&first, &second].into_iter().enumerate() {
            conn.request(
                Outgoing::new(CMD_PUSH, &bytes)
                    .key(3)
                    .aux(push_aux(part as u64, seq))
                    .flags(dtype_flag(DType::F32)),
                "push",
            )
            .unwrap();
        }
    };
    replacement_pushes(1.0, 1);
    // The next step: 10 from each, on both parts.
    a.push(3, &value(10.0)).unwrap();
    replacement_pushes(10.0, 2);
    let mut out = value(0.0);
    a.pull(3, &mut out).unwrap();
    assert_eq!(out, value(20.0));
    for conn in [first, second] {
        conn.request(Outgoing::new(CMD_BYE, &[]), "bye").unwrap();
    }
    drop(a);
    node.leave().unwrap();
    cluster.finish().unwrap();
}

/// A push call that failed on one key (its last round failed) and was merged on another is
/// given up by a loop that pulls and moves on: the pull tells the worker that the next push
/// is a new step, merged as such (not acknowledged as a retry of the failed one, which left
/// the key's round waiting for this worker).
#[test]
fn a_pull_after_a_failed_push_makes_the_next_push_a_new_step() {
    let cluster = LocalCluster::start(1, 2, Duration::from_secs(1)).unwrap();
    let (_, stores) = workers(&cluster, 2);
    let (a, b) = (&stores[0], &stores[1]);
    let value = |v: f32| NDArray::full(&[2], f64::from(v), DType::F32);
    on_all(&[a, b], |kv| {
        kv.init(&[3, 4][..], &[value(0.0), value(0.0)][..]).unwrap();
    });
    // Key 3's round times out (b is late): a's next push of key 3 is refused.
    a.push(3, &value(1.0)).unwrap();
    thread::sleep(Duration::from_millis(2500));
    // The call fails on key 3; key 4 is merged (its round waits for b).
    a.push(&[3, 4][..], &[value(1.0), value(1.0)][..])
        .expect_err("key 3's last round failed");
    // The loop gives the step up: b's push of key 4 completes its round, a pulls.
    b.push(4, &value(2.0)).unwrap();
    let mut out = value(0.0);
    a.pull(4, &mut out).unwrap();
    assert_eq!(out, value(3.0));
    // The next step: a new round of key 4, on both workers.
    let pulled = on_all(&[a, b], |kv| {
        kv.push(4, &value(10.0)).unwrap();
        let mut out = value(0.0);
        kv.pull(4, &mut out).unwrap();
        out
    });
    assert_eq!(pulled, vec![value(20.0); 2]);
    drop(stores);
    cluster.detach();
}
