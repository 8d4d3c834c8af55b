//! The scheduler and the node side of a cluster, as threads of one process talking over real
//! sockets on 127.0.0.1: registration and ranks, barriers, lost nodes, registration timeouts,
//! shutdown. Every wait is bounded by a timeout of at most a few seconds.

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use kvstore_dist::cluster::heartbeat_settings;
use kvstore_dist::{ClusterError, DistConfig, Group, Node, NodeInfo, Role, Scheduler};

/// A configuration for `role` in a cluster of `servers` + `workers` whose scheduler listens on
/// `port` (0 for the scheduler itself: any free port).
fn config(role: Role, port: u16, servers: u32, workers: u32, timeout: Duration) -> DistConfig {
    let mut c = DistConfig::from_vars([
        ("DMLC_ROLE", role.as_str().to_string()),
        ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
        ("DMLC_PS_ROOT_PORT", "9".to_string()),
        ("DMLC_NUM_SERVER", servers.to_string()),
        ("DMLC_NUM_WORKER", workers.to_string()),
        ("DMLC_NODE_HOST", "127.0.0.1".to_string()),
    ])
    .unwrap();
    c.root_port = port;
    c.timeout = timeout;
    c.heartbeat_interval = Duration::from_millis(100);
    c.heartbeat_timeout = Duration::from_secs(5);
    c
}

fn scheduler(servers: u32, workers: u32, timeout: Duration, hb_timeout: Duration) -> Scheduler {
    let mut c = config(Role::Scheduler, 0, servers, workers, timeout);
    c.heartbeat_timeout = hb_timeout;
    Scheduler::start(&c).unwrap()
}

/// Joins `servers` servers and `workers` workers in parallel; returns them in join order.
fn join_all(sched: &Scheduler, servers: u32, workers: u32, timeout: Duration) -> Vec<Node> {
    let port = sched.local_addr().port();
    let roles: Vec<Role> = (0..servers)
        .map(|_| Role::Server)
        .chain((0..workers).map(|_| Role::Worker))
        .collect();
    let handles: Vec<_> = roles
        .into_iter()
        .map(|role| {
            let c = config(role, port, servers, workers, timeout);
            thread::spawn(move || Node::join(&c))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

/// A port nothing listens on (when this returns), below the ephemeral range.
fn free_port() -> u16 {
    kvstore_dist::ports::spare_port("127.0.0.1").expect("a free port on 127.0.0.1")
}

fn port_of(n: &NodeInfo) -> u16 {
    n.addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Worker `rank` out of `nodes`.
fn take_worker(nodes: &mut Vec<Node>, rank: u32) -> Node {
    let i = nodes
        .iter()
        .position(|n| n.role() == Role::Worker && n.rank() == rank)
        .unwrap();
    nodes.remove(i)
}

/// The workers among `nodes`, in their order.
fn only_workers(nodes: Vec<Node>) -> Vec<Node> {
    nodes
        .into_iter()
        .filter(|n| n.role() == Role::Worker)
        .collect()
}

/// Runs `barrier(group)` on every node concurrently; results in the nodes' order.
fn barrier_all(nodes: &[Node], group: Group) -> Vec<Result<(), ClusterError>> {
    thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .map(|n| s.spawn(move || n.barrier(group)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn ranks_are_dense_deterministic_and_tables_agree_then_clean_shutdown() {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(3);
    let sched = scheduler(2, 3, timeout, Duration::from_secs(5));
    let nodes = join_all(&sched, 2, 3, timeout);

    // Every node holds the same table: the scheduler, servers by rank, workers by rank.
    let table = nodes[0].nodes().to_vec();
    assert_eq!(table.len(), 6);
    for n in &nodes {
        assert_eq!(n.nodes(), &table[..]);
        assert!(table.contains(n.info()));
    }
    assert_eq!(table[0].role, Role::Scheduler);
    assert_eq!(table[0].id, 1);
    assert_eq!(table[0].addr, sched.addr());
    assert_eq!(sched.addr(), sched.local_addr().to_string());

    // Dense ranks per role, ids as ps-lite, ranks in ascending port order (all on one host).
    for (role, count, base) in [(Role::Server, 2u32, 8u32), (Role::Worker, 3, 9)] {
        let mut of_role: Vec<&NodeInfo> = table.iter().filter(|n| n.role == role).collect();
        assert_eq!(of_role.len() as u32, count);
        let ranks: Vec<u32> = of_role.iter().map(|n| n.rank).collect();
        assert_eq!(ranks, (0..count).collect::<Vec<_>>());
        of_role.sort_by_key(|n| port_of(n));
        for (i, n) in of_role.iter().enumerate() {
            assert_eq!(n.rank, i as u32, "ranks follow (host, port) order");
            assert_eq!(n.id, base + 2 * i as u32);
        }
    }

    // Barriers of every group complete, repeatedly.
    let workers: Vec<&Node> = nodes.iter().filter(|n| n.role() == Role::Worker).collect();
    for _ in 0..3 {
        let results = thread::scope(|s| {
            let hs: Vec<_> = workers
                .iter()
                .map(|n| s.spawn(move || n.barrier(Group::Workers)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
    assert!(barrier_all(&nodes, Group::All).iter().all(Result::is_ok));
    let servers: Vec<&Node> = nodes.iter().filter(|n| n.role() == Role::Server).collect();
    let results = thread::scope(|s| {
        let hs: Vec<_> = servers
            .iter()
            .map(|n| s.spawn(move || n.barrier(Group::Servers)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // A node cannot enter a barrier of a group it is not in.
    let err = workers[0].barrier(Group::Servers).unwrap_err();
    assert!(err.to_string().contains("not part of"), "{err}");

    // Everyone leaves: the scheduler returns Ok, and all threads are joined.
    for n in nodes {
        n.leave().unwrap();
    }
    sched.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn a_worker_with_a_shorter_timeout_than_the_scheduler_hears_who_is_missing() {
    // The scheduler waits 30 s; the workers give up after 1 s (their own KVSTORE_TIMEOUT_SECS).
    let sched = scheduler(1, 3, Duration::from_secs(30), Duration::from_secs(40));
    let mut nodes = join_all(&sched, 1, 3, Duration::from_secs(1));
    let absent = take_worker(&mut nodes, 1);
    let workers: Vec<Node> = only_workers(nodes);
    let t = Instant::now();
    let results = barrier_all(&workers, Group::Workers);
    let elapsed = t.elapsed();
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    for r in results {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("worker rank 1 (id 11)"), "{msg}");
        assert!(msg.contains("did not enter within 1s"), "{msg}");
        assert!(!msg.contains("timed out"), "the scheduler answered: {msg}");
    }
    drop((workers, absent));
    sched.handle().shutdown();
    sched.join().unwrap();
}

#[test]
fn barrier_fails_within_the_timeout_naming_the_worker_that_never_enters() {
    let timeout = Duration::from_secs(1);
    let sched = scheduler(1, 3, timeout, Duration::from_secs(10));
    let mut nodes = join_all(&sched, 1, 3, timeout);
    let absent = take_worker(&mut nodes, 2);
    let workers: Vec<Node> = only_workers(nodes);
    let t = Instant::now();
    let results = barrier_all(&workers, Group::Workers);
    let elapsed = t.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    for r in results {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("worker rank 2 (id 13)"), "{msg}");
        assert!(msg.contains(&absent.info().addr), "{msg}");
        assert!(msg.contains("did not enter within 1s"), "{msg}");
        assert!(msg.contains("the scheduler at 127.0.0.1:"), "{msg}");
    }
    // The cluster is still healthy: a barrier with everyone completes afterwards.
    let mut all = workers;
    all.push(absent);
    assert!(barrier_all(&all, Group::Workers).iter().all(Result::is_ok));
    drop(all);
    // The server has not left yet: stop the scheduler explicitly.
    sched.handle().shutdown();
    sched.join().unwrap();
}

#[test]
fn a_worker_whose_connection_drops_fails_the_others_barrier_naming_it() {
    let timeout = Duration::from_secs(3);
    let sched = scheduler(1, 3, timeout, Duration::from_secs(10));
    let mut nodes = join_all(&sched, 1, 3, timeout);
    let crashed = take_worker(&mut nodes, 1);
    let addr = crashed.info().addr.clone();
    crashed.abandon();
    let workers: Vec<Node> = only_workers(nodes);
    let t = Instant::now();
    for r in barrier_all(&workers, Group::Workers) {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("worker rank 1 (id 11)"), "{msg}");
        assert!(msg.contains(&addr), "{msg}");
        assert!(msg.contains("without a goodbye"), "{msg}");
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Later barriers fail at once too, and convert into kvstore_base errors naming the node.
    let e: kvstore_base::Error = workers[0].barrier(Group::All).unwrap_err().into();
    assert!(e.to_string().contains("worker rank 1 (id 11)"), "{e}");
    drop(workers);
    let err = sched.join().unwrap_err();
    assert!(matches!(err, ClusterError::NodesLost { .. }), "{err}");
    assert!(err.to_string().contains("worker rank 1 (id 11)"), "{err}");
}

#[test]
fn a_recovering_worker_takes_a_lost_workers_rank_and_barriers_work_again() {
    let timeout = Duration::from_secs(3);
    let sched = scheduler(1, 3, timeout, Duration::from_secs(10));
    let port = sched.local_addr().port();
    let mut nodes = join_all(&sched, 1, 3, timeout);
    // Before any loss, a plain late registration is refused at once.
    let late = Node::join(&config(Role::Worker, port, 1, 3, timeout)).unwrap_err();
    assert!(
        late.to_string().contains("cannot take a lost node's place"),
        "{late}"
    );

    take_worker(&mut nodes, 2).abandon();
    let server = nodes.remove(nodes.iter().position(|n| n.role() == Role::Server).unwrap());
    let recovered = Node::join_recovering(&config(Role::Worker, port, 1, 3, timeout)).unwrap();
    assert!(recovered.is_recovery());
    assert_eq!((recovered.rank(), recovered.id()), (2, 13));
    let mut workers: Vec<Node> = only_workers(nodes);
    assert!(workers.iter().all(|n| !n.is_recovery()));
    workers.push(recovered);
    assert!(barrier_all(&workers, Group::Workers)
        .iter()
        .all(Result::is_ok));

    // A lost server cannot be replaced: its values are gone with it.
    server.abandon();
    let refused = Node::join_recovering(&config(Role::Server, port, 1, 3, timeout)).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("a lost server cannot be replaced"),
        "{refused}"
    );
    drop(workers);
    // The job ends naming only the lost server: the lost worker's place was taken.
    let err = sched.join().unwrap_err().to_string();
    assert!(
        err.contains("server rank 0") && !err.contains("worker"),
        "{err}"
    );
}

#[test]
fn a_loss_fails_pending_barriers_before_a_waiting_worker_takes_the_place() {
    let timeout = Duration::from_secs(3);
    let sched = scheduler(1, 3, timeout, Duration::from_secs(10));
    let port = sched.local_addr().port();
    let mut nodes = join_all(&sched, 1, 3, timeout);
    let doomed = take_worker(&mut nodes, 2);
    // A restarted worker registers before the loss is noticed: it waits for a place.
    let waiting = thread::spawn(move || {
        Node::join_recovering(&config(Role::Worker, port, 1, 3, timeout)).unwrap()
    });
    thread::sleep(Duration::from_millis(200));
    let workers: Vec<Node> = only_workers(nodes);
    // Rank 0 waits in a barrier (with rank 1 not there yet) when rank 2 is lost.
    let pending = thread::scope(|s| {
        let h = s.spawn(|| workers[0].barrier(Group::Workers));
        thread::sleep(Duration::from_millis(200));
        doomed.abandon();
        h.join().unwrap()
    });
    let msg = pending.unwrap_err().to_string();
    assert!(
        msg.contains("worker rank 2 (id 13)") && msg.contains("lost"),
        "{msg}"
    );
    let recovered = waiting.join().unwrap();
    assert_eq!(recovered.rank(), 2);
    // Nobody inherited the failed barrier's entries: a barrier of all three completes.
    let mut all = workers;
    all.push(recovered);
    let met = barrier_all(&all, Group::Workers);
    assert!(met.iter().all(Result::is_ok), "{met:?}");
    drop(all);
    sched.handle().shutdown();
    sched.join().unwrap();
}

#[test]
fn a_worker_that_stops_heartbeating_fails_the_others_barrier_naming_it() {
    let timeout = Duration::from_secs(3);
    let sched = scheduler(1, 3, timeout, Duration::from_millis(500));
    let port = sched.local_addr().port();
    // Two workers and the server heartbeat every 100 ms; the silent one not at all in time.
    let handles: Vec<_> = [Role::Server, Role::Worker, Role::Worker, Role::Worker]
        .into_iter()
        .enumerate()
        .map(|(i, role)| {
            let mut c = config(role, port, 1, 3, timeout);
            if i == 3 {
                // It announces the scheduler's 0.5 s of silence but heartbeats far later, as a
                // frozen process.
                c.heartbeat_interval = Duration::from_secs(60);
                c.heartbeat_timeout = Duration::from_millis(500);
            }
            thread::spawn(move || Node::join(&c))
        })
        .collect();
    let mut nodes: Vec<Node> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let silent = nodes.pop().unwrap();
    let workers: Vec<Node> = only_workers(nodes);
    let t = Instant::now();
    for r in barrier_all(&workers, Group::Workers) {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains(&silent.info().to_string()), "{msg}");
        assert!(msg.contains("no heartbeat"), "{msg}");
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(workers);
    drop(silent);
    let err = sched.join().unwrap_err();
    assert!(err.to_string().contains("no heartbeat"), "{err}");
}

#[test]
fn a_node_heartbeating_slower_than_the_scheduler_expects_is_not_lost() {
    let timeout = Duration::from_secs(5);
    // The scheduler alone would take 0.3 s of silence for a loss; the worker heartbeats every
    // second, and says so at registration (3 s of silence before it is lost).
    let sched = scheduler(1, 1, timeout, Duration::from_millis(300));
    let port = sched.local_addr().port();
    let handles: Vec<_> = [Role::Server, Role::Worker]
        .into_iter()
        .map(|role| {
            let mut c = config(role, port, 1, 1, timeout);
            if role == Role::Worker {
                c.heartbeat_interval = Duration::from_secs(1);
                c.heartbeat_timeout = Duration::from_secs(3);
            }
            thread::spawn(move || Node::join(&c))
        })
        .collect();
    let nodes: Vec<Node> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    thread::sleep(Duration::from_millis(1500));
    for r in barrier_all(&nodes, Group::All) {
        r.unwrap();
    }
    for n in nodes {
        n.leave().unwrap();
    }
    sched.join().unwrap();
}

#[test]
fn registration_timeout_names_the_missing_roles() {
    let timeout = Duration::from_secs(1);
    let t = Instant::now();
    let sched = scheduler(2, 3, timeout, Duration::from_secs(5));
    let port = sched.local_addr().port();
    let handles: Vec<_> = [Role::Server, Role::Worker]
        .into_iter()
        .map(|role| {
            let c = config(role, port, 2, 3, timeout);
            thread::spawn(move || Node::join(&c))
        })
        .collect();
    for h in handles {
        let msg = h.join().unwrap().unwrap_err().to_string();
        assert!(msg.contains("1 of 2 servers and 2 of 3 workers"), "{msg}");
        assert!(msg.contains("registration timed out after 1s"), "{msg}");
    }
    let err = sched.join().unwrap_err();
    match &err {
        ClusterError::RegistrationTimeout { missing, .. } => {
            assert_eq!(missing, "1 of 2 servers and 2 of 3 workers")
        }
        other => panic!("{other}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn nodes_wait_for_a_late_scheduler_and_fail_naming_an_absent_one() {
    // Nothing listens: the error names the scheduler's address after the timeout.
    let port = free_port();
    let t = Instant::now();
    let c = config(Role::Worker, port, 1, 1, Duration::from_millis(500));
    let msg = Node::join(&c).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("cannot reach the scheduler at 127.0.0.1:{port}")),
        "{msg}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));

    // The scheduler starts after the nodes: they retry until it is up. The port was free
    // when picked; another test may take it before the scheduler binds it, so the scenario
    // is tried again on another port then.
    let timeout = Duration::from_secs(3);
    let (sched, nodes) = (0..3)
        .find_map(|_| {
            let port = free_port();
            let joiners: Vec<_> = [Role::Server, Role::Worker]
                .into_iter()
                .map(|role| {
                    let c = config(role, port, 1, 1, timeout);
                    thread::spawn(move || Node::join(&c))
                })
                .collect();
            thread::sleep(Duration::from_millis(300));
            let mut sc = config(Role::Scheduler, port, 1, 1, timeout);
            sc.heartbeat_timeout = Duration::from_secs(5);
            let started = Scheduler::start(&sc);
            let joined: Vec<_> = joiners.into_iter().map(|h| h.join().unwrap()).collect();
            match started {
                Ok(sched) => Some((
                    sched,
                    joined
                        .into_iter()
                        .map(Result::unwrap)
                        .collect::<Vec<Node>>(),
                )),
                Err(e) => {
                    eprintln!("port {port} was taken before the scheduler bound it: {e}");
                    None
                }
            }
        })
        .expect("a free port within three tries");
    assert!(nodes.iter().all(|n| n.rank() == 0));
    // Single-member groups return at once (as ps-lite); the all-node group goes through.
    assert!(nodes[1].barrier(Group::Workers).is_ok());
    assert!(barrier_all(&nodes, Group::All).iter().all(Result::is_ok));
    drop(nodes);
    sched.join().unwrap();
}

#[test]
fn shutdown_stops_an_idle_scheduler_and_heartbeat_defaults_are_sensible() {
    let sched = scheduler(1, 1, Duration::from_secs(30), Duration::from_secs(5));
    let handle = sched.handle();
    let t = Instant::now();
    let waiter = thread::spawn(move || sched.join());
    thread::sleep(Duration::from_millis(50));
    handle.shutdown();
    waiter.join().unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));

    let mut c = config(Role::Worker, 1, 1, 1, Duration::from_secs(60));
    c.heartbeat_interval = Duration::ZERO;
    c.heartbeat_timeout = Duration::ZERO;
    assert_eq!(
        heartbeat_settings(&c),
        (Duration::from_secs(5), Duration::from_secs(15))
    );
    c.timeout = Duration::from_millis(200);
    assert_eq!(
        heartbeat_settings(&c),
        (Duration::from_millis(100), Duration::from_millis(300))
    );
}

#[cfg(target_os = "linux")] // every 127.x address reaches the loopback interface
#[test]
fn nodes_can_listen_on_every_interface_and_advertise_one_address() {
    // KVSTORE_BIND_HOST=0.0.0.0 (a container's setting): every node listens on every
    // interface, and the node table holds the advertised address, DMLC_NODE_HOST's.
    let cluster = kvstore_dist::LocalCluster::start_with(
        1,
        2,
        Duration::from_secs(2),
        [("KVSTORE_BIND_HOST", "0.0.0.0")],
    )
    .unwrap();
    let options = cluster.worker_options().clone();
    let mut vars = options.clone();
    vars.insert("DMLC_ROLE".into(), "worker".into());
    let config = DistConfig::from_vars(vars).unwrap();
    assert_eq!(config.bind_host.as_deref(), Some("0.0.0.0"));
    let real = std::thread::spawn(move || kvstore_base::create_with("dist_sync", options).unwrap());
    let node = Node::join(&config).unwrap();
    let kv = real.join().unwrap();
    // Listening on every interface: every node, the scheduler included, is reachable at
    // another loopback address too, while the node table holds the advertised one.
    let scheduler_port: u16 = config.root_port;
    TcpStream::connect(("127.0.0.2", scheduler_port))
        .unwrap_or_else(|e| panic!("the scheduler does not listen on 127.0.0.2: {e}"));
    for info in node.nodes() {
        assert!(info.addr.starts_with("127.0.0.1:"), "{info}");
        if info.role == Role::Scheduler {
            continue;
        }
        let port = port_of(info);
        TcpStream::connect(("127.0.0.2", port))
            .unwrap_or_else(|e| panic!("{info} does not listen on 127.0.0.2: {e}"));
    }
    drop(kv);
    drop(node);
    // The node never said hello to the server, which gives up on it after the timeout.
    if let Err(e) = cluster.finish() {
        assert!(!e.to_string().contains("panicked"), "{e}");
    }
}
