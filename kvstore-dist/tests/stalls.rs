//! A wait past `KVSTORE_STALL_WARNING_SECS` is logged (level `warn`), naming whom it waits
//! for, once, and long before it would fail: by the server, a sync round waiting for a
//! worker's push; by the scheduler, a barrier waiting for a worker and the registration
//! waiting for nodes; by the waiting node, its request the peer has not answered. The log
//! records of this test binary are captured (`common/logs.rs`).

use std::thread;
use std::time::Duration;

use kvstore_base::{DType, KVStoreBase, KVStoreExt, NDArray};
use kvstore_dist::{DistConfig, LocalCluster, Role, Scheduler};

#[path = "common/logs.rs"]
mod logs;

/// Two workers of a cluster whose stall warning is `stall` seconds, created concurrently,
/// each running `part(store)`.
fn two_workers(stall: &str, part: impl Fn(&dyn KVStoreBase) + Sync) {
    logs::start();
    let cluster = LocalCluster::start_with(
        1,
        2,
        Duration::from_secs(5),
        [("KVSTORE_STALL_WARNING_SECS", stall)],
    )
    .unwrap();
    let options = cluster.worker_options().clone();
    thread::scope(|s| {
        for _ in 0..2 {
            let options = options.clone();
            let part = &part;
            s.spawn(move || {
                let kv = kvstore_base::create_with("dist_sync", options).unwrap();
                part(&*kv);
            });
        }
    });
    cluster.finish().unwrap();
}

/// Rank 1 comes `late` after rank 0 to a sync round of `key`, then to a barrier.
fn late_rank_1(kv: &dyn KVStoreBase, key: i64, late: Duration) {
    kv.init(key, &NDArray::zeros(&[8], DType::F32)).unwrap();
    if kv.rank() == 1 {
        thread::sleep(late);
    }
    kv.push(key, &NDArray::ones(&[8], DType::F32)).unwrap();
    let mut out = NDArray::zeros(&[8], DType::F32);
    kv.pull(key, &mut out).unwrap();
    assert_eq!(out.to_f64_vec(), vec![2.0; 8]);
    if kv.rank() == 1 {
        thread::sleep(late);
    }
    kv.barrier().unwrap();
}

#[test]
fn a_round_and_a_barrier_waiting_for_a_late_worker_are_logged_naming_it() {
    two_workers("0.2", |kv| {
        late_rank_1(kv, 101, Duration::from_millis(1500))
    });
    let rounds = logs::lines_with("the sync round of key 101 ");
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    assert!(
        rounds[0].contains("has waited 200ms or more"),
        "{}",
        rounds[0]
    );
    assert!(
        rounds[0].contains("for a push from worker rank 1 (id ")
            && !rounds[0].contains("worker rank 0")
            && rounds[0].contains("KVSTORE_TIMEOUT_SECS"),
        "{}",
        rounds[0]
    );
    // The waiting worker says whom it waits for too: its pull, the server; its barrier, the
    // scheduler.
    let pulls = logs::lines_with("pull of key 101 (a batch) has waited");
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    assert!(
        pulls[0].contains("node 8 at ") && pulls[0].contains("to answer"),
        "{pulls:?}"
    );
    let entered =
        logs::lines_with("barrier of the worker group has waited 200ms or more for node 1 at");
    assert_eq!(entered.len(), 1, "{:?}", logs::lines_with(""));
    let barriers = logs::lines_with("the barrier of the worker group has waited");
    assert_eq!(barriers.len(), 1, "{barriers:?}");
    assert!(
        barriers[0].contains("worker rank 1 (id ") && !barriers[0].contains("worker rank 0"),
        "{}",
        barriers[0]
    );
}

#[test]
fn each_stalled_round_is_logged_and_an_init_waiting_for_rank_0_too() {
    two_workers("0.2", |kv| {
        // Rank 0 inits late: rank 1's init waits for its value.
        if kv.rank() == 0 {
            thread::sleep(Duration::from_millis(1500));
        }
        kv.init(404, &NDArray::zeros(&[8], DType::F32)).unwrap();
        // Two rounds, rank 1 late to each: both are logged.
        for _ in 0..2 {
            if kv.rank() == 1 {
                thread::sleep(Duration::from_millis(1500));
            }
            kv.push(404, &NDArray::ones(&[8], DType::F32)).unwrap();
            let mut out = NDArray::zeros(&[8], DType::F32);
            kv.pull(404, &mut out).unwrap();
            // Without an optimizer a round's sum replaces the value.
            assert_eq!(out.to_f64_vec(), vec![2.0; 8]);
        }
    });
    let inits = logs::lines_with("the init of key 404 ");
    assert_eq!(inits.len(), 1, "{inits:?}");
    assert!(
        inits[0].contains("for the value of worker rank 0 (id "),
        "{}",
        inits[0]
    );
    let rounds = logs::lines_with("the sync round of key 404 ");
    assert_eq!(rounds.len(), 2, "{rounds:?}");
}

#[test]
fn waits_shorter_than_the_warning_or_with_warnings_off_are_not_logged() {
    two_workers("2", |kv| late_rank_1(kv, 202, Duration::from_millis(300)));
    two_workers("0", |kv| late_rank_1(kv, 303, Duration::from_millis(300)));
    assert!(logs::lines_with("key 202").is_empty());
    assert!(logs::lines_with("key 303").is_empty());
}

#[test]
fn a_registration_still_missing_nodes_is_logged_naming_them() {
    logs::start();
    let mut config = DistConfig::from_vars([
        ("DMLC_ROLE", "scheduler"),
        ("DMLC_PS_ROOT_URI", "127.0.0.1"),
        ("DMLC_PS_ROOT_PORT", "1"),
        ("DMLC_NUM_SERVER", "1"),
        ("DMLC_NUM_WORKER", "3"),
        ("DMLC_NODE_HOST", "127.0.0.1"),
        ("KVSTORE_TIMEOUT_SECS", "1"),
        ("KVSTORE_STALL_WARNING_SECS", "0.1"),
    ])
    .unwrap();
    config.root_port = 0;
    assert_eq!(config.role, Role::Scheduler);
    let scheduler = Scheduler::start(&config).unwrap();
    let addr = scheduler.local_addr().to_string();
    let err = scheduler.join().unwrap_err().to_string();
    assert!(err.contains("registration timed out"), "{err}");
    let warned = logs::lines_with("the registration has waited");
    let ours: Vec<&String> = warned.iter().filter(|w| w.contains(&addr)).collect();
    assert_eq!(ours.len(), 1, "{warned:?}");
    assert!(
        ours[0].contains("1 of 1 server and 3 of 3 workers still missing"),
        "{}",
        ours[0]
    );
}

/// A peer that pulls a big value and reads the answer a little at a time (each write of the
/// server making some progress) holds the server's answer for at most the timeout: its
/// connection is then closed, and a worker's pull of the same part, and the expiry of other
/// rounds, go on. Before, the answer was written for as long as the peer took, the part's
/// lock held all the while.
#[test]
fn a_peer_reading_an_answer_slowly_holds_the_server_for_the_timeout_at_most() {
    use kvstore_dist::protocol::CMD_PULL;
    use kvstore_dist::transport::{FrameHeader, MessageKind};
    use kvstore_dist::Node;
    use std::io::{Read, Write};
    let server_timeout = Duration::from_secs(2);
    let cluster = LocalCluster::start(1, 2, server_timeout).unwrap();
    let mut options = cluster.worker_options().clone();
    // The worker waits longer than the server holds a slow answer.
    options.insert("KVSTORE_TIMEOUT_SECS".into(), "20".into());
    let mut vars = cluster.worker_options().clone();
    vars.insert("DMLC_ROLE".into(), "worker".into());
    // Ranks follow the nodes' addresses: a port above the kernel's ephemeral range (where the
    // real worker's falls) makes the raw node rank 1.
    let top: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(60999);
    let port = (top + 1..=u16::MAX)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port above the ephemeral range");
    vars.insert("PORT".into(), port.to_string());
    let config = DistConfig::from_vars(vars).unwrap();
    let real = std::thread::spawn(move || kvstore_base::create_with("dist_sync", options).unwrap());
    let node = Node::join(&config).unwrap();
    let kv = real.join().unwrap();
    let big = NDArray::full(&[4 << 20], 1.0, DType::F32); // 16 MiB, one part
    assert_eq!((kv.rank(), node.rank()), (0, 1));
    // Rank 0's init needs no other rank's declaration.
    kv.init(7, &big).unwrap();
    let server = node.servers().next().unwrap().addr.clone();
    let stream = std::net::TcpStream::connect(server.as_str()).unwrap();
    socket2::SockRef::from(&stream)
        .set_recv_buffer_size(16 << 10)
        .unwrap();
    let header = FrameHeader {
        kind: MessageKind::Request,
        flags: 0,
        command: CMD_PULL,
        sender: 0,
        request_id: 1,
        key: 7,
        aux: 0,
        payload_len: 0,
    };
    (&stream).write_all(&header.encode()).unwrap();
    // Reads 64 KiB every 200 ms (16 MiB would take 50 s), until told to hurry.
    let hurry = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = std::thread::spawn({
        let hurry = std::sync::Arc::clone(&hurry);
        move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0usize;
            loop {
                match (&stream).read(&mut buf) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
                if !hurry.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let mut out = NDArray::zeros(&[4 << 20], DType::F32);
    kv.pull(7, &mut out).unwrap();
    assert_eq!(out, big);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    hurry.store(true, std::sync::atomic::Ordering::Relaxed);
    let got = slow.join().unwrap();
    assert!(
        got < 16 << 20,
        "the slow peer got the whole answer ({got} bytes)"
    );
    drop(kv);
    drop(node);
    cluster.detach();
}
