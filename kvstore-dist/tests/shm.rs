//! The shared-memory data path between workers and servers of one host: results exact with it
//! and without it (`KVSTORE_SHM=0`), big parts off the TCP wire, slots checked by the server,
//! TCP when no region can be made. Threads of one process over real sockets on 127.0.0.1
//! ([`LocalCluster`]); every wait is bounded.
#![cfg(target_os = "linux")]

mod common;

use common::{remote_message, Manual, TIMEOUT};

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use kvstore_base::{DType, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_dist::protocol::{self, InitMeta, ShmAttach, ShmSlot};
use kvstore_dist::transport::Outgoing;
use kvstore_dist::{DistConfig, DistStore, LocalCluster};

/// Runs `body(store)` on `workers` workers of a fresh cluster of `servers` servers, each
/// worker's configuration changed by `tweak`; results by rank.
fn run<T: Send + 'static>(
    servers: u32,
    workers: u32,
    tweak: impl Fn(&mut DistConfig),
    body: impl Fn(&DistStore) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    common::run_tweaked(servers, workers, tweak, body)
}

fn shm_on(_: &mut DistConfig) {}

fn shm_off(c: &mut DistConfig) {
    c.shm = false;
}

fn f32s(a: &NDArray) -> Vec<f32> {
    a.to_vec::<f32>().unwrap()
}

/// Every worker pushes, pulls and pushpulls a big key (split over the servers), a key of
/// 400 KB (one part) and a small one; returns what it read and how many of its connections
/// used shared memory.
fn sums(servers: u32, tweak: fn(&mut DistConfig)) -> Vec<(Vec<Vec<f32>>, usize)> {
    let big = 1_200_000; // above the default big-array bound: split over every server
    let mid = 100_000;
    run(servers, 2, tweak, move |kv| {
        let rank = kv.rank() as f32;
        let shapes = [big, mid, 7];
        let init: Vec<NDArray> = shapes
            .iter()
            .map(|&n| NDArray::zeros(&[n], DType::F32))
            .collect();
        kv.init(&[1, 2, 3][..], &init).unwrap();
        let grads: Vec<NDArray> = shapes
            .iter()
            .map(|&n| {
                let g: Vec<f32> = (0..n).map(|i| (i % 977) as f32 + rank * 0.5).collect();
                NDArray::from_vec(&[n], g).unwrap()
            })
            .collect();
        let mut seen = Vec::new();
        let mut outs: Vec<NDArray> = shapes
            .iter()
            .map(|&n| NDArray::zeros(&[n], DType::F32))
            .collect();
        for step in 0..3 {
            if step % 2 == 0 {
                kv.push(&[1, 2, 3][..], &grads).unwrap();
                kv.pull(&[1, 2, 3][..], &mut outs).unwrap();
            } else {
                kv.pushpull(&[1, 2, 3][..], &grads, &mut outs).unwrap();
            }
            seen.extend(outs.iter().map(f32s));
        }
        // A pull that is not after a push of this worker: the stored value at once.
        kv.barrier().unwrap();
        let mut again = NDArray::zeros(&[big], DType::F32);
        kv.pull(1, &mut again).unwrap();
        seen.push(f32s(&again));
        (seen, kv.shm_connections())
    })
}

fn expected(n: usize) -> Vec<f32> {
    // Ranks 0 and 1: (i % 977) + 0 and (i % 977) + 0.5.
    (0..n).map(|i| 2.0 * (i % 977) as f32 + 0.5).collect()
}

fn check_sums(servers: u32, tweak: fn(&mut DistConfig), shm: bool) {
    for (seen, connections) in sums(servers, tweak) {
        assert_eq!(connections, if shm { servers as usize } else { 0 });
        let want = [expected(1_200_000), expected(100_000), expected(7)];
        for (i, got) in seen.iter().enumerate() {
            let w = if i == seen.len() - 1 {
                &want[0]
            } else {
                &want[i % 3]
            };
            assert!(got == w, "read {i} differs (servers {servers}, shm {shm})");
        }
    }
}

#[test]
fn sums_exact_with_shm_1_server() {
    check_sums(1, shm_on, true);
}

#[test]
fn sums_exact_with_shm_2_servers() {
    check_sums(2, shm_on, true);
}

#[test]
fn sums_exact_without_shm_1_and_2_servers() {
    check_sums(1, shm_off, false);
    check_sums(2, shm_off, false);
}

#[test]
fn region_that_cannot_be_made_falls_back_to_tcp() {
    fn missing_dir(c: &mut DistConfig) {
        c.shm_dir = "/nonexistent/kvstore-shm-dir".into();
    }
    check_sums(2, missing_dir, false);
    // As an environment variable (or create option).
    let cluster = LocalCluster::start(1, 1, TIMEOUT).unwrap();
    let mut options = cluster.worker_options().clone();
    options.insert("KVSTORE_SHM_DIR".into(), "/nonexistent".into());
    let kv = kvstore_base::create_with("dist_sync", options).unwrap();
    kv.init(1, &NDArray::zeros(&[50_000], DType::F32)).unwrap();
    let mut out = NDArray::zeros(&[50_000], DType::F32);
    kv.pushpull(1, &NDArray::full(&[50_000], 2.5, DType::F32), &mut out)
        .unwrap();
    assert_eq!(f32s(&out), vec![2.5; 50_000]);
    drop(kv);
    cluster.finish().unwrap();
}

#[test]
fn optimizer_on_the_servers_matches_with_and_without_shm() {
    let train = |tweak: fn(&mut DistConfig)| {
        run(2, 2, tweak, |kv| {
            let n = 1_100_000;
            kv.init(5, &NDArray::full(&[n], 1.0, DType::F32)).unwrap();
            kv.set_optimizer(&OptimizerSpec::new("sgd").with("learning_rate", 0.1))
                .unwrap();
            let mut w = NDArray::zeros(&[n], DType::F32);
            for step in 0..3 {
                let g: Vec<f32> = (0..n)
                    .map(|i| ((i + step) % 13) as f32 * 0.25 + kv.rank() as f32)
                    .collect();
                kv.push(5, &NDArray::from_vec(&[n], g).unwrap()).unwrap();
                kv.pull(5, &mut w).unwrap();
            }
            f32s(&w)
        })
    };
    let on = train(shm_on);
    let off = train(shm_off);
    assert_eq!(on[0], on[1]);
    assert!(
        on == off,
        "the optimizer's results differ with shared memory"
    );
    assert!(on[0].iter().all(|&x| x < 1.0), "every weight moved down");
}

#[test]
fn a_big_push_through_shm_costs_the_wire_only_its_header() {
    let push = |tweak: fn(&mut DistConfig)| {
        run(1, 1, tweak, |kv| {
            let n = 1 << 20; // 4 MiB of float32
            kv.init(1, &NDArray::zeros(&[n], DType::F32)).unwrap();
            let before = kv.bytes_sent();
            kv.push(1, &NDArray::full(&[n], 0.5, DType::F32)).unwrap();
            let sent = kv.bytes_sent() - before;
            let mut w = NDArray::zeros(&[n], DType::F32);
            kv.pull(1, &mut w).unwrap();
            assert_eq!(f32s(&w), vec![0.5; n]);
            sent
        })[0]
    };
    let on = push(shm_on);
    let off = push(shm_off);
    println!("a 4 MiB push: {on} bytes on TCP with shared memory, {off} without");
    assert!(on < 1024, "{on}");
    assert!(off >= 4 << 20, "{off}");
}

#[test]
fn the_server_checks_every_slot() {
    let cluster = LocalCluster::start(1, 1, TIMEOUT).unwrap();
    let w = Manual::join(&cluster);
    let n = 40_000usize; // elements of float32
    let flags = protocol::dtype_flag(DType::F32);
    let mut init = InitMeta {
        dtype: DType::F32,
        elements: n as u64,
        row_len: 0,
        row_sparse: false,
        key: 9.into(),
    }
    .encode();
    init.extend(std::iter::repeat_n(0u8, 4 * n));
    w.conn
        .request(
            Outgoing::new(protocol::CMD_INIT, &init).key(9).flags(flags),
            "init",
        )
        .unwrap();
    let slot = |offset: u64, len: u64| ShmSlot { offset, len }.encode();
    let push = |shm_flags: u16, payload: &[u8]| {
        w.conn.request(
            Outgoing::new(protocol::CMD_PUSH, payload)
                .key(9)
                .flags(flags | shm_flags),
            "push",
        )
    };
    // No region lent yet.
    let m = remote_message(push(protocol::FLAG_SHM_DATA, &slot(64, 4 * n as u64)));
    assert!(m.contains("lent no region") && m.contains("key 9"), "{m}");

    // A region made by hand: a private file in /dev/shm with the nonce at its start.
    let len = 1u64 << 20;
    let name = format!("kvstore-shm-test-{}", std::process::id());
    let path = std::path::Path::new("/dev/shm").join(&name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    file.set_len(len).unwrap();
    let nonce = [0x5a; 16];
    file.write_all_at(&nonce, 0).unwrap();
    let attach = |nonce: [u8; 16], len: u64| {
        let a = ShmAttach {
            len,
            nonce,
            name: name.clone(),
        };
        w.conn.request(
            Outgoing::new(protocol::CMD_SHM_ATTACH, &a.encode()),
            "attach",
        )
    };
    assert!(remote_message(attach([1; 16], len)).contains("nonce"));
    assert!(remote_message(attach(nonce, len * 2)).contains("bytes"));
    let escape = ShmAttach {
        len,
        nonce,
        name: "../etc/passwd".into(),
    };
    assert!(w
        .conn
        .request(
            Outgoing::new(protocol::CMD_SHM_ATTACH, &escape.encode()),
            "attach"
        )
        .is_err());
    attach(nonce, len).unwrap();

    // Slots outside the region, over its end, overflowing, in its header: errors naming the
    // key; the server goes on serving.
    for (offset, l) in [
        (len, 4),
        (len - 8, 4 * n as u64),
        (u64::MAX - 4, 16),
        (0, 4 * n as u64),
    ] {
        let m = remote_message(push(protocol::FLAG_SHM_DATA, &slot(offset, l)));
        assert!(
            m.contains("key 9") && m.contains("outside the region"),
            "{m}"
        );
    }
    let m = remote_message(push(protocol::FLAG_SHM_DATA, &[0; 8]));
    assert!(m.contains("lacks slot"), "{m}");
    // A slot of the wrong length is refused by the merge.
    let m = remote_message(push(protocol::FLAG_SHM_DATA, &slot(64, 12)));
    assert!(m.contains("key 9"), "{m}");

    // A good push through the region, then a pull answered into it.
    let data: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_ne_bytes()).collect();
    file.write_all_at(&data, 4096).unwrap();
    push(protocol::FLAG_SHM_DATA, &slot(4096, data.len() as u64)).unwrap();
    let bad_reply = w.conn.request(
        Outgoing::new(protocol::CMD_PULL, &slot(len - 4, 4 * n as u64))
            .key(9)
            .flags(flags | protocol::FLAG_SHM_REPLY),
        "pull",
    );
    assert!(remote_message(bad_reply).contains("outside the region"));
    let reply_at = 4096 + 4 * n as u64 + 64;
    let answer = w
        .conn
        .request(
            Outgoing::new(protocol::CMD_PULL, &slot(reply_at, 4 * n as u64))
                .key(9)
                .flags(flags | protocol::FLAG_SHM_REPLY),
            "pull",
        )
        .unwrap();
    assert!(answer.header.flags & protocol::FLAG_SHM_REPLY != 0);
    assert!(answer.payload.is_empty());
    let mut back = vec![0u8; data.len()];
    file.read_exact_at(&mut back, reply_at).unwrap();
    assert!(back == data, "the pulled value is the pushed one");
    std::fs::remove_file(&path).unwrap();
    w.leave();
    cluster.finish().unwrap();
}
