//! A worker that sends garbage: thousands of random requests (every command but those that
//! leave the job or take another worker's place, random flags, keys, part indices and
//! payloads, some of them well-formed) from a worker that said its hello, beside a real
//! worker. The server must answer each (an error is fine) or leave it
//! pending, never panic, and keep serving: the real worker's values are exactly what they
//! were, and it still pushes and pulls. Seeded, so a failure replays.

use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use kvstore_base::{DType, KVStoreExt, NDArray};
use kvstore_dist::protocol::{
    self, BatchItem, InitMeta, Mode, RowRequest, CMD_BATCH, CMD_COMMAND, CMD_HELLO, CMD_INIT,
    CMD_LOAD_OUTCOME, CMD_LOAD_STATES, CMD_PULL, CMD_PUSH, CMD_PUSHPULL, CMD_ROW_SPARSE_PULL,
    CMD_SAVE_STATES, CMD_SET_COMPRESSION, CMD_SET_OPTIMIZER, CMD_SHM_ATTACH,
};
use kvstore_dist::transport::{Connection, Outgoing, Pending};
use kvstore_dist::{DistConfig, LocalCluster, Node, Role};
use kvstore_test::fuzz::Rng;

#[path = "common/logs.rs"]
mod logs;

/// Starts capturing warnings and panics of every thread (`common/logs.rs`).
fn capture_warnings_and_panics() {
    logs::start();
    logs::record_panics();
}

/// Fails if anything panicked so far or the cluster's end reports a panicked thread.
fn assert_nothing_panicked(ended: kvstore_base::Result<()>, context: &str) {
    if let Err(e) = ended {
        assert!(!e.to_string().contains("panicked"), "{context}: {e}");
    }
    let panics = logs::lines_with("panicked");
    assert!(panics.is_empty(), "{context}: {panics:?}");
}

/// A free port on 127.0.0.1 above the kernel's ephemeral range (from which the ports of
/// nodes that take any port come), so that a node on it sorts after them.
fn port_above_the_ephemeral_range() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".into());
    let top: u16 = range
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(60999);
    let first = top
        .checked_add(1)
        .unwrap_or_else(|| panic!("the ephemeral port range reaches {top}: no port above it"));
    (first..=u16::MAX)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap_or_else(|| panic!("no free port above the ephemeral range (its top: {top})"))
}

/// Requests sent per seed (enough to reach every command with every kind of payload many
/// times).
const REQUESTS: usize = 3_000;

/// Every command but those a worker may use to leave or take another's place (`CMD_BYE`, a
/// second `CMD_HELLO`): those end or hand over its rank by design, not by accident.
const COMMANDS: [u32; 14] = [
    CMD_INIT,
    CMD_PUSH,
    CMD_PULL,
    CMD_PUSHPULL,
    CMD_ROW_SPARSE_PULL,
    CMD_SET_OPTIMIZER,
    CMD_COMMAND,
    CMD_SET_COMPRESSION,
    CMD_BATCH,
    CMD_SHM_ATTACH,
    CMD_SAVE_STATES,
    CMD_LOAD_STATES,
    CMD_LOAD_OUTCOME,
    0x7777,
];

/// A payload for `command`: random bytes of a random or a meaningful length, or a
/// well-formed encoding with random fields.
fn payload(rng: &mut Rng, command: u32, keys: &[u64]) -> Vec<u8> {
    match rng.below(4) {
        0 => Vec::new(),
        1 => {
            let n = rng.pick(&[1usize, 4, 7, 8, 16, 31, 32, 33, 64, 100, 4096]);
            rng.bytes(n)
        }
        _ => match command {
            CMD_INIT => {
                let mut out = InitMeta {
                    dtype: rng.pick(&[DType::F32, DType::F16, DType::I64, DType::U8]),
                    elements: rng.pick(&[0u64, 1, 8, 40, u64::MAX, 1 << 40]),
                    row_len: rng.pick(&[0u64, 1, 4, 3, u64::MAX]),
                    row_sparse: rng.below(2) == 0,
                    key: kvstore_base::Key::Int(rng.pick(keys) as i64),
                }
                .encode();
                let extra = rng.pick(&[0usize, 4, 32, 160]);
                out.extend(rng.bytes(extra));
                out
            }
            CMD_ROW_SPARSE_PULL => {
                let rows: Vec<i64> = (0..rng.below(5))
                    .map(|_| rng.pick(&[0i64, 1, 9, 10, -1, i64::MAX, i64::MIN]))
                    .collect();
                RowRequest {
                    part_start: rng.pick(&[0u64, 4, 40, u64::MAX]),
                    row_len: rng.pick(&[0u64, 1, 4, u64::MAX]),
                    rows,
                }
                .encode()
            }
            CMD_PUSH | CMD_PUSHPULL => {
                if rng.below(2) == 0 {
                    // Rows: a count, ids, then data.
                    let ids: Vec<u64> = (0..rng.below(4))
                        .map(|_| rng.pick(&[0u64, 3, 9, 10, u64::MAX]))
                        .collect();
                    let n = rng.pick(&[0usize, 16, 32, 48]);
                    let data = rng.bytes(n);
                    protocol::RowsPush::encode(ids.into_iter(), &data)
                } else {
                    let n = rng.pick(&[32usize, 160, 2, 64]);
                    rng.bytes(n)
                }
            }
            CMD_BATCH => {
                let items: Vec<BatchItem> = (0..1 + rng.below(3))
                    .map(|_| BatchItem {
                        wire: rng.pick(keys),
                        part: rng.pick(&[0u32, 0, 1, u32::MAX]),
                        flags: rng.pick(&[
                            protocol::dtype_flag(DType::F32),
                            protocol::dtype_flag(DType::F32) | protocol::FLAG_ROW_SPARSE,
                            0xFFFF,
                        ]),
                        seq: rng.pick(&[0u16, 1, 2, u16::MAX]),
                        len: rng.pick(&[0u64, 32, 160, 4, u64::MAX]),
                    })
                    .collect();
                let data: Vec<Vec<u8>> = items
                    .iter()
                    .map(|it| {
                        let n = if it.len <= 160 && rng.below(2) == 0 {
                            it.len as usize
                        } else {
                            rng.pick(&[0usize, 8, 32])
                        };
                        rng.bytes(n)
                    })
                    .collect();
                BatchItem::encode(&items, &data)
            }
            CMD_SET_OPTIMIZER => rng
                .pick(&[
                    &br#"{"name":"sgd","params":{"learning_rate":"0.1"}}"#[..],
                    br#"{"name":"nope"}"#,
                    br#"{"name":"adam","params":{"beta1":"x"}}"#,
                    br#"[1,2"#,
                ])
                .to_vec(),
            CMD_SET_COMPRESSION => rng
                .pick(&[
                    &br#"{"type":"2bit","threshold":"0.5"}"#[..],
                    br#"{"type":"2bit","threshold":"-1"}"#,
                    br#"{"type":"zip"}"#,
                    br#"{}"#,
                ])
                .to_vec(),
            _ => {
                let n = rng.pick(&[8usize, 24, 48, 200]);
                rng.bytes(n)
            }
        },
    }
}

#[test]
fn random_requests_from_a_worker_never_break_the_server_or_its_values() {
    hostile_worker_beside("dist_sync", Mode::Sync);
}

/// On `dist_async` every well-formed push is applied at once, so the values may change; the
/// server must still never panic nor abort, and keep serving the real worker.
#[test]
fn random_requests_from_an_async_worker_never_break_the_server() {
    hostile_worker_beside("dist_async", Mode::Async);
}

/// Random requests from a worker of a `store` job (`mode`) beside a real worker of it; on a
/// sync store, the real worker's values must stay exactly as it set them.
fn hostile_worker_beside(store: &'static str, mode: Mode) {
    // One at a time: each takes a fixed port (below), found free a moment before.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    capture_warnings_and_panics();
    // Seed 100 once reached a server allocating the size another rank's init declared for a
    // part whose value had not arrived (1 TiB: the process aborted) by pulling it in a batch.
    let seeds: Vec<u64> = match std::env::var("KVSTORE_FUZZ_SEED") {
        Ok(s) => vec![s.parse().expect("KVSTORE_FUZZ_SEED is a number")],
        Err(_) => vec![100, 0x5EED_1234_ABCD_0001, 7],
    };
    let seed = format!("seeds {seeds:?}");
    eprintln!("{seed} (KVSTORE_FUZZ_SEED=N replays one)");
    let cluster = LocalCluster::start_with(
        1,
        2,
        Duration::from_secs(3),
        [("KVSTORE_STALL_WARNING_SECS", "0")],
    )
    .unwrap();
    let options = cluster.worker_options().clone();
    let mut vars = options.clone();
    vars.insert("DMLC_ROLE".into(), "worker".into());
    // Ranks follow the nodes' addresses: a port above the kernel's ephemeral range (where the
    // real worker's falls) makes the hostile worker rank 1, so the real one sends the values.
    let port = port_above_the_ephemeral_range();
    vars.insert("PORT".into(), port.to_string());
    let config = DistConfig::from_vars(vars).unwrap();
    assert_eq!(config.role, Role::Worker);

    // The real worker and the hostile one join together.
    let real = thread::spawn(move || kvstore_base::create_with(store, options).unwrap());
    let node = Node::join(&config).unwrap();
    let kv = real.join().unwrap();
    assert_eq!((kv.rank(), node.rank()), (0, 1));
    let rank = 1;

    // The real worker's keys: a dense one, a row-sparse one, one split over the bound.
    let dense = NDArray::from_vec(&[8], (0..8).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    let table = NDArray::from_vec(&[10, 4], (0..40).map(|i| i as f32).collect::<Vec<_>>())
        .unwrap()
        .to_row_sparse()
        .unwrap();
    kv.init(3, &dense).unwrap();
    kv.init(5, &table).unwrap();
    let server = node.servers().next().unwrap().addr.clone();
    let transport = kvstore_dist::transport::TransportConfig {
        node_id: node.id(),
        timeout: Duration::from_secs(3),
        ..config.transport()
    };
    let conn = Connection::connect(server.as_str(), transport.clone()).unwrap();
    conn.request(
        Outgoing::new(CMD_HELLO, store.as_bytes())
            .key(rank)
            .aux(mode.code()),
        "hello",
    )
    .unwrap();
    batches_asking_too_much_are_refused(kv.as_ref(), &conn);

    let mut rng = Rng::new(1);
    // Wire ids of the real keys and others; as `CMD_COMMAND` heads, MXNet's kController (0),
    // kSetMultiPrecision (1), kSyncMode (3), kSetGradientCompression (4), not kStopServer (2).
    let keys = [3u64, 5, 0, 1, u64::MAX, 4];
    let mut pending: Vec<Pending> = Vec::new();
    let mut conn = Some(conn);
    let (mut reconnects, mut answered, mut refused) = (0, 0, 0);
    for i in 0..REQUESTS * seeds.len() {
        if i % REQUESTS == 0 {
            rng = Rng::new(seeds[i / REQUESTS]);
        }
        if conn.as_ref().is_none_or(Connection::is_closed) {
            // Reconnect (a protocol error ends a connection), hello again.
            reconnects += 1;
            let c = Connection::connect(server.as_str(), transport.clone()).unwrap_or_else(|e| {
                panic!("seed {seed}, request {i}: {e}\n{:#?}", logs::lines_with(""))
            });
            let _ = c.request(
                Outgoing::new(CMD_HELLO, store.as_bytes())
                    .key(rank)
                    .aux(mode.code()),
                "hello",
            );
            conn = Some(c);
        }
        let c = conn.as_ref().unwrap();
        let command = rng.pick(&COMMANDS);
        let body = payload(&mut rng, command, &keys);
        // Any bits but the recovery flag (taking a lost worker's place is a legitimate act).
        let wild = rng.next() as u16 & !protocol::FLAG_RECOVERING;
        let flags = rng.pick(&[
            0u16,
            protocol::dtype_flag(DType::F32),
            protocol::dtype_flag(DType::F16),
            protocol::FLAG_ROW_SPARSE | protocol::dtype_flag(DType::F32),
            protocol::FLAG_COMPRESSED | protocol::dtype_flag(DType::F32),
            protocol::FLAG_SHM_DATA,
            protocol::FLAG_SHM_REPLY,
            wild,
        ]);
        // Mostly the real keys' parts (wire ids 3 and 5, part 0), so that requests get past
        // the lookup; for a batch, `aux` is the inner command.
        let key = if rng.below(3) == 0 {
            rng.pick(&keys)
        } else {
            rng.pick(&[3u64, 5])
        };
        let aux = if command == CMD_BATCH {
            rng.pick(&[CMD_PUSH, CMD_PULL, CMD_PUSHPULL, CMD_INIT, 0x7777]) as u64
        } else if rng.below(2) == 0 {
            0
        } else {
            rng.pick(&[1u64, 2, 3, u64::MAX])
        };
        let out = Outgoing::new(command, &body).key(key).aux(aux).flags(flags);
        if let Ok(p) = c.send(out, &format!("random request {i}")) {
            pending.push(p);
        }
        if pending.len() > 64 {
            // Answered or not, none may take the server down.
            for p in pending.drain(..) {
                match p.wait_timeout(Duration::from_millis(1)) {
                    Ok(_) => answered += 1,
                    Err(_) => refused += 1,
                }
            }
        }
    }
    drop(pending);
    drop(conn);
    assert_nothing_panicked(Ok(()), &seed);
    eprintln!(
        "{reconnects} reconnections, {answered} requests answered, {refused} refused or left \
         pending"
    );

    // The server still serves the real worker.
    let mut out = NDArray::zeros(&[8], DType::F32);
    kv.pull(3, &mut out).unwrap();
    if mode == Mode::Async {
        drop(kv);
        drop(node);
        // The hostile worker never said goodbye: the server ends with it lost.
        assert_nothing_panicked(cluster.finish(), &seed);
        return;
    }
    // The real worker's values are intact: no round with its push ever completed.
    assert_eq!(out, dense, "seed {seed}");
    let mut rows = NDArray::zeros(&[10, 4], DType::F32)
        .to_row_sparse()
        .unwrap();
    kv.row_sparse_pull(
        5,
        &mut rows,
        &NDArray::from_vec(&[3], vec![0i64, 4, 9]).unwrap(),
    )
    .unwrap();
    assert_eq!(
        rows.to_dense(),
        NDArray::from_vec(
            &[10, 4],
            (0..40)
                .map(|i| if [0, 4, 9].contains(&(i / 4)) {
                    i as f32
                } else {
                    0.0
                })
                .collect::<Vec<_>>()
        )
        .unwrap(),
        "seed {seed}"
    );
    drop(kv);
    drop(node);
    assert_nothing_panicked(cluster.finish(), &seed);
}

/// A batch pull naming a big part many times (a small message asking for an answer of any
/// size, which the server would allocate), or more items than a batch has, is refused, and
/// the server goes on: its answer stays within what a batch may carry.
fn batches_asking_too_much_are_refused(kv: &dyn kvstore_base::KVStoreBase, conn: &Connection) {
    // 1.2 MiB in one part (under the bound): pulled alone by real workers.
    let big = NDArray::zeros(&[300_000], DType::F32);
    kv.init(7, &big).unwrap();
    let item = |wire: u64| BatchItem {
        wire,
        part: 0,
        flags: 0,
        seq: 0,
        len: 0,
    };
    let batch_pull = |items: Vec<BatchItem>| {
        let body = BatchItem::encode(&items, &[] as &[&[u8]]);
        conn.request(
            Outgoing::new(CMD_BATCH, &body).aux(u64::from(CMD_PULL)),
            "batch pull",
        )
    };
    let e = batch_pull(vec![item(7); 3]).expect_err("3 x 1.2 MiB in one batch");
    assert!(e.to_string().contains("a batch answers at most"), "{e}");
    let e = batch_pull(vec![item(3); protocol::BATCH_MAX_ITEMS + 1]).expect_err("too many");
    assert!(e.to_string().contains("at most 4096"), "{e}");
    // A batch within the bounds is answered.
    let answer = batch_pull(vec![item(3); 2]).unwrap();
    assert_eq!(answer.payload.len(), 2 * 8 * 4);
}

#[test]
fn random_frames_at_the_scheduler_never_stop_a_job_from_forming_or_running() {
    use kvstore_dist::cluster::{
        CMD_BARRIER, CMD_DEAD_NODES, CMD_GOODBYE, CMD_HEARTBEAT, CMD_REGISTER,
    };
    capture_warnings_and_panics();
    // The registration waits through the hostile frames: room for a loaded machine.
    let cluster = LocalCluster::start_with(
        1,
        2,
        Duration::from_secs(20),
        [("KVSTORE_STALL_WARNING_SECS", "0")],
    )
    .unwrap();
    let options = cluster.worker_options().clone();
    let scheduler = format!("127.0.0.1:{}", options["DMLC_PS_ROOT_PORT"]);
    let transport = kvstore_dist::transport::TransportConfig {
        timeout: Duration::from_secs(5),
        ..kvstore_dist::transport::TransportConfig::default()
    };
    let mut rng = Rng::new(0x5C4E_D01E);
    // Registrations that are never well-formed: a wrong role, no address, a bad address, junk.
    let registrations: [&[u8]; 7] = [
        b"",
        b"worker",
        b"emperor 127.0.0.1:9",
        b"worker not-an-address",
        b"server 127.0.0.1:99999",
        b"\xff\xfe\x00 worker",
        b"scheduler 127.0.0.1:1",
    ];
    let hostile = |rng: &mut Rng, frames: usize| {
        let conn = Connection::connect(scheduler.as_str(), transport.clone()).unwrap();
        let mut pending = Vec::new();
        for i in 0..frames {
            let command = rng.pick(&[
                CMD_REGISTER,
                CMD_BARRIER,
                CMD_HEARTBEAT,
                CMD_DEAD_NODES,
                CMD_GOODBYE,
                0x4B56_0099,
            ]);
            let body = match command {
                CMD_REGISTER => rng.pick(&registrations).to_vec(),
                _ => {
                    let n = rng.pick(&[0usize, 3, 64]);
                    rng.bytes(n)
                }
            };
            let out = Outgoing::new(command, &body)
                .key(rng.pick(&[0u64, 1, 2, 4, 7, 8, 9, 99, u64::MAX]))
                .aux(rng.pick(&[0u64, 1, 1000, u64::MAX]))
                .flags(rng.next() as u16);
            if conn.is_closed() {
                break;
            }
            if let Ok(p) = conn.send(out, &format!("random frame {i}")) {
                pending.push(p);
            }
        }
        for p in pending {
            let _ = p.wait_timeout(Duration::from_millis(1));
        }
    };
    // Before the job forms: unregistered connections sending anything.
    for _ in 0..5 {
        hostile(&mut rng, 200);
    }
    // The job forms and runs.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let options = options.clone();
            thread::spawn(move || kvstore_base::create_with("dist_sync", options).unwrap())
        })
        .collect();
    let workers: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    // And again while it runs.
    for _ in 0..5 {
        hostile(&mut rng, 200);
    }
    thread::scope(|s| {
        for kv in &workers {
            s.spawn(move || {
                kv.init(9, &NDArray::zeros(&[4], DType::F32)).unwrap();
                kv.push(9, &NDArray::ones(&[4], DType::F32)).unwrap();
                let mut out = NDArray::zeros(&[4], DType::F32);
                kv.pull(9, &mut out).unwrap();
                assert_eq!(out.to_f64_vec(), vec![2.0; 4]);
                kv.barrier().unwrap();
            });
        }
    });
    drop(workers);
    let ended = cluster.finish();
    assert_nothing_panicked(Ok(()), "scheduler frames");
    ended.unwrap();
}

/// Rank 0's init that the server cannot take (its data is not the size it declares) fails
/// the other ranks' inits of that part at once, naming why, rather than leave them waiting
/// for a value until the timeout.
#[test]
fn a_rank_0_init_the_server_refuses_fails_the_ranks_waiting_for_it() {
    let cluster = LocalCluster::start(1, 2, Duration::from_secs(20)).unwrap();
    let options = cluster.worker_options().clone();
    let mut vars = options.clone();
    vars.insert("DMLC_ROLE".into(), "worker".into());
    // A port below the kernel's ephemeral range (where the real worker's falls) makes the
    // raw node rank 0.
    let port = kvstore_dist::ports::spare_port("127.0.0.1").unwrap();
    vars.insert("PORT".into(), port.to_string());
    let config = DistConfig::from_vars(vars).unwrap();
    let real = thread::spawn(move || kvstore_base::create_with("dist_sync", options).unwrap());
    let node = Node::join(&config).unwrap();
    let kv = real.join().unwrap();
    assert_eq!((node.rank(), kv.rank()), (0, 1));
    let server = node.servers().next().unwrap().addr.clone();
    let transport = kvstore_dist::transport::TransportConfig {
        node_id: node.id(),
        timeout: Duration::from_secs(20),
        ..config.transport()
    };
    let conn = Connection::connect(server.as_str(), transport).unwrap();
    conn.request(
        Outgoing::new(CMD_HELLO, b"dist_sync").aux(Mode::Sync.code()),
        "hello",
    )
    .unwrap();
    let started = std::time::Instant::now();
    thread::scope(|s| {
        let waiting = s.spawn(|| kv.init(9, &NDArray::zeros(&[8], DType::F32)));
        // Rank 1's declaration reaches the server first, then rank 0's short value.
        thread::sleep(Duration::from_millis(300));
        let mut body = InitMeta {
            dtype: DType::F32,
            elements: 8,
            row_len: 0,
            row_sparse: false,
            key: kvstore_base::Key::Int(9),
        }
        .encode();
        body.extend_from_slice(&[0u8; 4]);
        let e = conn
            .request(Outgoing::new(CMD_INIT, &body).key(9), "init")
            .expect_err("4 bytes for 8 float32");
        assert!(e.to_string().contains("carries 4 bytes"), "{e}");
        let e = waiting
            .join()
            .unwrap()
            .expect_err("rank 0's value never came");
        let e = e.to_string();
        assert!(
            e.contains("rank 0's init failed") && e.contains("carries 4 bytes"),
            "{e}"
        );
    });
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(conn);
    drop(kv);
    drop(node);
    cluster.detach();
}
