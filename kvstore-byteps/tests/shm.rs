//! `byteps` workers and the dist servers on one host: partitions of more than
//! [`SHM_MIN_BYTES`] move through the shared-memory region each worker lends each server,
//! unless `KVSTORE_SHM=0`. The sums are the same either way; only the bytes on TCP differ.

mod common;

use common::{f32s, run};

use kvstore_base::{DType, KVStoreBase, KVStoreExt, NDArray};
use kvstore_byteps::worker::SHM_MIN_BYTES;

/// Elements of "w": partitions of 25,000 float32 (100,000 bytes, through shared memory) and a
/// last one of 10,000 (40,000 bytes, over TCP).
const W: usize = 260_000;

fn grad(n: usize, rank: usize, salt: usize) -> NDArray {
    NDArray::from_vec(
        &[n],
        (0..n)
            .map(|i| ((i * 7 + salt) % 1000) as f32 * (rank as f32 + 1.0))
            .collect(),
    )
    .unwrap()
}

fn expected(n: usize, workers: usize, salt: usize) -> Vec<f32> {
    let ranks: f32 = (1..=workers).map(|r| r as f32).sum();
    (0..n)
        .map(|i| ((i * 7 + salt) % 1000) as f32 * ranks)
        .collect()
}

/// Push-pulls, pushes then pulls (into a float64 output too) and broadcasts a big and a small
/// key, checking every sum; returns how many connections of each worker use shared memory.
fn exact_sums(servers: u32, workers: u32, extra: &[(&str, &str)]) -> Vec<usize> {
    let mut options = vec![("BYTEPS_PARTITION_BYTES", "100000")];
    options.extend_from_slice(extra);
    run(servers, workers, &options, move |kv| {
        let r = kv.rank();
        kv.init("w", &NDArray::zeros(&[W], DType::F32)).unwrap();
        kv.init("b", &NDArray::zeros(&[5], DType::F32)).unwrap();
        let parts = kv.partitions("w").unwrap();
        assert_eq!(parts.len(), 11);
        let mut checks = Vec::new();
        for salt in 0..3 {
            let grads = [grad(W, r, salt), NDArray::full(&[5], 1.0, DType::F32)];
            let mut outs = [
                NDArray::zeros(&[W], DType::F32),
                NDArray::zeros(&[5], DType::F32),
            ];
            kv.pushpull(&["w", "b"][..], &grads, &mut outs).unwrap();
            checks.push((f32s(&outs[0]), expected(W, workers as usize, salt)));
            assert_eq!(f32s(&outs[1]), vec![workers as f32; 5]);
        }
        // Push, then pull into the same dtype and into float64 (a cast from the slots).
        kv.push("w", &grad(W, r, 11)).unwrap();
        let mut w = NDArray::zeros(&[W], DType::F32);
        kv.pull("w", &mut w).unwrap();
        let mut wide = NDArray::zeros(&[W], DType::F64);
        kv.pull("w", &mut wide).unwrap();
        let want = expected(W, workers as usize, 11);
        checks.push((f32s(&w), want.clone()));
        let wide: Vec<f32> = wide
            .to_vec::<f64>()
            .unwrap()
            .into_iter()
            .map(|v| v as f32)
            .collect();
        checks.push((wide, want));
        // Broadcast: rank 0's value, whatever the others hold.
        let mut b = NDArray::zeros(&[W], DType::F32);
        kv.broadcast("v", &grad(W, r + 10 * r, 5), &mut b).unwrap();
        checks.push((f32s(&b), expected(W, 1, 5)));
        for (i, (got, want)) in checks.iter().enumerate() {
            assert!(got == want, "check {i} of rank {r}");
        }
        kv.shm_connections()
    })
}

#[test]
fn sums_are_exact_through_shared_memory_and_over_tcp() {
    for (servers, workers) in [(1, 2), (2, 3)] {
        let on = exact_sums(servers, workers, &[]);
        assert!(on.iter().all(|&n| n == servers as usize), "{on:?}");
        let off = exact_sums(servers, workers, &[("KVSTORE_SHM", "0")]);
        assert!(off.iter().all(|&n| n == 0), "{off:?}");
    }
}

#[test]
fn sums_are_exact_under_the_credit_through_shared_memory() {
    let on = exact_sums(2, 2, &[("BYTEPS_SCHEDULING_CREDIT", "2")]);
    assert!(on.iter().all(|&n| n == 2), "{on:?}");
}

#[test]
fn a_region_that_cannot_be_made_leaves_tcp() {
    let dir = std::env::temp_dir().join("kvstore-byteps-no-such-dir/below");
    let dir = dir.to_str().unwrap().to_string();
    let off = exact_sums(1, 2, &[("KVSTORE_SHM_DIR", dir.as_str())]);
    assert!(off.iter().all(|&n| n == 0), "{off:?}");
}

/// TCP bytes of one push, one pull and one pushpull of an 8 MiB tensor (3 partitions of the
/// default size).
fn tcp_bytes(extra: &[(&str, &str)]) -> Vec<(u64, u64, u64, usize)> {
    run(1, 2, extra, |kv| {
        let n = 2 << 20;
        let r = kv.rank();
        kv.init("w", &NDArray::zeros(&[n], DType::F32)).unwrap();
        assert_eq!(kv.partitions("w").unwrap().len(), 3);
        let g = grad(n, r, 3);
        let mut out = NDArray::zeros(&[n], DType::F32);
        let at = kv.bytes_sent();
        kv.push("w", &g).unwrap();
        let push = kv.bytes_sent() - at;
        let at = kv.bytes_sent();
        kv.pull("w", &mut out).unwrap();
        let pull = kv.bytes_sent() - at;
        assert!(f32s(&out) == expected(n, 2, 3));
        let at = kv.bytes_sent();
        kv.pushpull("w", &g, &mut out).unwrap();
        let pushpull = kv.bytes_sent() - at;
        assert!(f32s(&out) == expected(n, 2, 3));
        (push, pull, pushpull, kv.shm_connections())
    })
}

#[test]
fn big_partitions_leave_only_slots_on_tcp() {
    let model = 8u64 << 20;
    const { assert!(4_096_000 > SHM_MIN_BYTES) };
    for (push, pull, pushpull, shm) in tcp_bytes(&[]) {
        assert_eq!(shm, 1);
        // Three messages of a 48-byte header and one or two 16-byte slots.
        assert!(push <= 3 * 64, "{push} bytes");
        assert!(pull <= 3 * 64, "{pull} bytes");
        assert!(pushpull <= 6 * 64, "{pushpull} bytes");
    }
    for (push, pull, pushpull, shm) in tcp_bytes(&[("KVSTORE_SHM", "0")]) {
        assert_eq!(shm, 0);
        // The model once (plus headers), as a parameter server.
        assert!((model..=model + 3 * 48).contains(&push), "{push} bytes");
        assert!(pull <= 3 * 48, "{pull} bytes");
        assert!(
            (model..=model + 6 * 48).contains(&pushpull),
            "{pushpull} bytes"
        );
    }
}

#[test]
fn async_mode_adds_every_push_through_shared_memory() {
    let n = 100_000; // 4 partitions of 100,000 bytes
    let out = run(
        2,
        2,
        &[
            ("BYTEPS_ENABLE_ASYNC", "1"),
            ("BYTEPS_PARTITION_BYTES", "100000"),
        ],
        move |kv| {
            let r = kv.rank() as f64;
            kv.init("w", &NDArray::ones(&[n], DType::F32)).unwrap();
            kv.barrier().unwrap();
            let delta = NDArray::full(&[n], r + 1.0, DType::F32);
            kv.push("w", &delta).unwrap();
            let mut mine = NDArray::zeros(&[n], DType::F32);
            kv.pushpull("w", &delta, &mut mine).unwrap();
            kv.barrier().unwrap();
            let mut w = NDArray::zeros(&[n], DType::F32);
            kv.pull("w", &mut w).unwrap();
            (f32s(&mine), f32s(&w), kv.shm_connections())
        },
    );
    for (r, (mine, w, shm)) in out.into_iter().enumerate() {
        assert_eq!(shm, 2);
        assert!(mine.iter().all(|&v| v >= 1.0 + 2.0 * (r as f32 + 1.0)));
        assert!(w.iter().all(|&v| v == 1.0 + 2.0 * 1.0 + 2.0 * 2.0));
    }
}
