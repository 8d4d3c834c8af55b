//! Row-sparse keys on the dist stores: a push of row-sparse gradients carries only their rows,
//! and the servers apply them as MXNet's do (and as the `local` store does): the round's rows
//! merged, the lazy optimizers updating those rows only. Every job runs as threads of this
//! process over real sockets on 127.0.0.1, and is checked bit for bit against `local`.

use kvstore_base::{DType, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec};
use kvstore_local as _;

mod common;

use common::{remote_message, run_tweaked, run_with, Manual, TIMEOUT};
use kvstore_dist::protocol::{self, InitMeta, RowRequest, RowsPush};
use kvstore_dist::transport::Outgoing;
use kvstore_dist::LocalCluster;

/// The key; its shape: 8 rows of 2 x 2 elements.
const KEY: i32 = 3;
const SHAPE: [usize; 3] = [8, 2, 2];
const ROW_LEN: usize = 4;

/// A big-array bound of 16 elements splits the key over the servers, by rows.
const SPLIT: [(&str, &str); 1] = [("MXNET_KVSTORE_BIGARRAY_BOUND", "16")];

/// The initial weight, every row stored: row `r` holds `r + 1 + i / 8`.
fn weight() -> NDArray {
    let dense = NDArray::from_vec(
        &SHAPE,
        (0..SHAPE.iter().product::<usize>())
            .map(|i| (i / ROW_LEN) as f32 + 1.0 + (i % ROW_LEN) as f32 / 8.0)
            .collect(),
    )
    .unwrap();
    let ids: Vec<i64> = (0..SHAPE[0] as i64).collect();
    dense.retain_rows(&ids).unwrap()
}

/// A row-sparse gradient holding `rows`, each `scale * (1, -2, 3, -4)`.
fn grad(rows: &[i64], scale: f32) -> NDArray {
    let data: Vec<f32> = rows
        .iter()
        .flat_map(|_| [1.0f32, -2.0, 3.0, -4.0].map(|x| x * scale))
        .collect();
    let mut shape = SHAPE.to_vec();
    shape[0] = rows.len();
    let rows_array = NDArray::from_vec(&shape, data).unwrap();
    NDArray::row_sparse(&SHAPE, rows.to_vec(), &rows_array).unwrap()
}

/// Every row of the key, read with `row_sparse_pull`.
fn pull_all(kv: &dyn KVStoreBase) -> Vec<f32> {
    let ids = NDArray::from_vec(&[SHAPE[0]], (0..SHAPE[0] as i64).collect()).unwrap();
    let mut out = grad(&[], 0.0);
    kv.row_sparse_pull(KEY, &mut out, &ids).unwrap();
    out.to_dense().to_vec::<f32>().unwrap()
}

/// The rows each rank pushes in each round: some shared, some of one rank, some rounds
/// without any; rows 0, 2, 3, 4 and 7 are never pushed.
fn pushed_rows(rank: usize, round: usize) -> Vec<i64> {
    const ROWS: [[&[i64]; 3]; 2] = [[&[1, 5], &[1], &[]], [&[5, 6], &[], &[6]]];
    ROWS[rank][round].to_vec()
}

const NEVER_PUSHED: [usize; 5] = [0, 2, 3, 4, 7];

/// The key's rows after the rounds of [`pushed_rows`] on 2 workers of a `dist_sync` job of 2
/// servers, and on `local` with each round's two gradients pushed together.
fn dist_and_local(optimizer: Option<OptimizerSpec>) -> (Vec<f32>, Vec<f32>) {
    let on_dist = {
        let optimizer = optimizer.clone();
        run_with("dist_sync", 2, 2, &SPLIT, move |rank, kv| {
            kv.init(KEY, &weight()).unwrap();
            if let Some(o) = &optimizer {
                kv.set_optimizer(o).unwrap();
            }
            let mut seen = Vec::new();
            for round in 0..3 {
                kv.push(KEY, &grad(&pushed_rows(rank, round), round as f32 + 1.0))
                    .unwrap();
                seen = pull_all(kv);
            }
            seen
        })
    };
    assert_eq!(on_dist[0], on_dist[1], "both workers pull the same rows");
    let local = kvstore_base::create("local").unwrap();
    local.init(KEY, &weight()).unwrap();
    if let Some(o) = &optimizer {
        local.set_optimizer(o).unwrap();
    }
    for round in 0..3 {
        let scale = round as f32 + 1.0;
        let grads = [0, 1].map(|rank| grad(&pushed_rows(rank, round), scale));
        local.push(KEY, &grads[..]).unwrap();
    }
    (on_dist[0].clone(), pull_all(&*local))
}

/// Rank 0 saves the optimizer states to `path` while no push is in flight (between two
/// barriers of every worker).
fn save_between_barriers(kv: &dyn KVStoreBase, rank: usize, path: &std::path::Path) {
    kv.barrier().unwrap();
    if rank == 0 {
        kv.save_optimizer_states(path, true).unwrap();
    }
    kv.barrier().unwrap();
}

/// The state arrays and the update count of the key in the state file at `path`.
fn key_states(path: &std::path::Path) -> (Option<Vec<NDArray>>, Option<u64>) {
    let mut u = kvstore_optimizer::Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap();
    u.load_states(&std::fs::read(path).unwrap()).unwrap();
    let key = kvstore_base::Key::from(KEY);
    (
        u.state_arrays(&key).map(<[NDArray]>::to_vec),
        u.update_count(&key),
    )
}

/// The elements of row `row` in a dense copy of the key.
fn row(values: &[f32], row: usize) -> &[f32] {
    &values[row * ROW_LEN..(row + 1) * ROW_LEN]
}

/// `optimizer` (lazy, with weight decay) on `dist_sync` gives `local`'s rows bit for bit, and
/// leaves the rows no one pushed as they were (weight decay would have shrunk them, had the
/// gradients been applied densely).
fn updates_only_the_pushed_rows(optimizer: OptimizerSpec) {
    let (dist, local) = dist_and_local(Some(optimizer));
    assert_eq!(dist, local, "dist_sync's rows are local's, bit for bit");
    let start = weight().to_dense().to_vec::<f32>().unwrap();
    for r in NEVER_PUSHED {
        assert_eq!(row(&dist, r), row(&start, r), "row {r} was never pushed");
    }
    assert_ne!(row(&dist, 5), row(&start, 5), "row 5 was");
}

#[test]
fn lazy_sgd_updates_only_the_pushed_rows_as_local_does() {
    updates_only_the_pushed_rows(
        OptimizerSpec::new("sgd")
            .with("learning_rate", 0.1)
            .with("momentum", 0.9)
            .with("wd", 0.1),
    );
}

#[test]
fn lazy_adam_updates_only_the_pushed_rows_as_local_does() {
    updates_only_the_pushed_rows(
        OptimizerSpec::new("adam")
            .with("learning_rate", 0.01)
            .with("wd", 0.01),
    );
}

#[test]
fn without_an_optimizer_the_rounds_rows_replace_the_value() {
    let (dist, local) = dist_and_local(None);
    assert_eq!(dist, local);
    // The last round pushed row 6 only: the others read zero, as on `local`.
    assert_eq!(row(&dist, 6), &[3.0, -6.0, 9.0, -12.0]);
    assert!(NEVER_PUSHED.iter().all(|&r| row(&dist, r) == [0.0; 4]));
}

#[test]
fn a_push_of_a_few_rows_sends_those_rows_only() {
    let (rows, row_len) = (4096usize, 64usize);
    // Over TCP only, where every byte is counted.
    let sent = run_tweaked(
        1,
        1,
        |c| c.shm = false,
        move |kv| {
            let shape = [rows, row_len];
            let ids: Vec<i64> = (0..rows as i64).collect();
            let start = NDArray::ones(&shape, DType::F32).retain_rows(&ids).unwrap();
            kv.init(KEY, &start).unwrap();
            let one_row = NDArray::full(&[1, row_len], 2.0, DType::F32);
            let g = NDArray::row_sparse(&shape, vec![7], &one_row).unwrap();
            let before = kv.bytes_sent();
            kv.push(KEY, &g).unwrap();
            let sent = kv.bytes_sent() - before;
            let before = kv.bytes_sent();
            kv.push(KEY, &g.to_dense()).unwrap();
            let dense = kv.bytes_sent() - before;
            // The last push (dense, no optimizer) is the value now.
            let mut out = NDArray::zeros(&shape, DType::F32);
            kv.pull(KEY, &mut out).unwrap();
            let values = out.to_vec::<f32>().unwrap();
            (sent, dense, values[7 * row_len], values[0])
        },
    );
    let (sparse, dense, row7, row0) = sent[0];
    let one_row = 64 * 4;
    assert!(
        sparse < one_row + 128,
        "a push of one row sent {sparse} bytes"
    );
    assert!(dense >= 4096 * one_row, "a dense push sent {dense} bytes");
    assert_eq!((row7, row0), (2.0, 0.0));
}

#[test]
fn dense_and_row_sparse_pushes_of_one_round_add_up_as_on_local() {
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("wd", 0.1);
    let dense_grad = || grad(&[0, 3], 0.5).to_dense();
    let on_dist = {
        let sgd = sgd.clone();
        run_with("dist_sync", 2, 2, &SPLIT, move |rank, kv| {
            kv.init(KEY, &weight()).unwrap();
            kv.set_optimizer(&sgd).unwrap();
            match rank {
                0 => kv.push(KEY, &dense_grad()).unwrap(),
                _ => kv.push(KEY, &grad(&[3, 6], 1.0)).unwrap(),
            }
            pull_all(kv)
        })
    };
    let local = kvstore_base::create("local").unwrap();
    local.init(KEY, &weight()).unwrap();
    local.set_optimizer(&sgd).unwrap();
    local
        .push(KEY, &[dense_grad(), grad(&[3, 6], 1.0)][..])
        .unwrap();
    assert_eq!(on_dist[0], pull_all(&*local));
}

#[test]
fn async_servers_apply_each_push_of_rows_lazily() {
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("wd", 0.05);
    // Each rank pushes rows of its own, so the order of arrival does not matter.
    let rows = |rank: usize| if rank == 0 { vec![1, 2] } else { vec![5, 6] };
    let on_dist = {
        let sgd = sgd.clone();
        run_with("dist_async", 2, 2, &SPLIT, move |rank, kv| {
            kv.init(KEY, &weight()).unwrap();
            kv.set_optimizer(&sgd).unwrap();
            for round in 0..2 {
                kv.push(KEY, &grad(&rows(rank), round as f32 + 1.0))
                    .unwrap();
            }
            kv.barrier().unwrap();
            pull_all(kv)
        })
    };
    let local = kvstore_base::create("local").unwrap();
    local.init(KEY, &weight()).unwrap();
    local.set_optimizer(&sgd).unwrap();
    for rank in 0..2 {
        for round in 0..2 {
            local
                .push(KEY, &grad(&rows(rank), round as f32 + 1.0))
                .unwrap();
        }
    }
    let expected = pull_all(&*local);
    assert_eq!(on_dist[0], expected);
    assert_eq!(on_dist[1], expected);
    let start = weight().to_dense().to_vec::<f32>().unwrap();
    for r in [0, 3, 4, 7] {
        assert_eq!(
            row(&on_dist[0], r),
            row(&start, r),
            "row {r} was never pushed"
        );
    }
}

#[test]
fn optimizer_states_of_rows_move_between_dist_and_local() {
    let adam = OptimizerSpec::new("adam").with("learning_rate", 0.01);
    let dir = std::env::temp_dir().join(format!("kvstore-dist-rows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (from_dist, from_local) = (dir.join("dist"), dir.join("local"));
    // Two rounds on 2 workers of 2 servers; rank 0 saves the joined states.
    let weights = {
        let (adam, path) = (adam.clone(), from_dist.clone());
        run_with("dist_sync", 2, 2, &SPLIT, move |rank, kv| {
            kv.init(KEY, &weight()).unwrap();
            kv.set_optimizer(&adam).unwrap();
            for round in 0..2 {
                kv.push(KEY, &grad(&pushed_rows(rank, round), 1.0)).unwrap();
            }
            let seen = pull_all(kv);
            save_between_barriers(kv, rank, &path);
            seen
        })
    };
    let local = kvstore_base::create("local").unwrap();
    local.init(KEY, &weight()).unwrap();
    local.set_optimizer(&adam).unwrap();
    for round in 0..2 {
        let grads = [0, 1].map(|rank| grad(&pushed_rows(rank, round), 1.0));
        local.push(KEY, &grads[..]).unwrap();
    }
    local.save_optimizer_states(&from_local, true).unwrap();
    assert_eq!(weights[0], pull_all(&*local));
    assert_eq!(key_states(&from_dist), key_states(&from_local));
    // A job of 3 servers (other row slices) resumes from the file, as local goes on.
    let start = NDArray::from_vec(&SHAPE, weights[0].clone())
        .unwrap()
        .retain_rows(&(0..SHAPE[0] as i64).collect::<Vec<_>>())
        .unwrap();
    let resumed = {
        let (adam, path) = (adam.clone(), from_dist.clone());
        run_with("dist_sync", 3, 1, &SPLIT, move |_, kv| {
            kv.init(KEY, &start).unwrap();
            kv.set_optimizer(&adam).unwrap();
            kv.load_optimizer_states(&path).unwrap();
            kv.push(KEY, &grad(&[1, 6], 1.0)).unwrap();
            pull_all(kv)
        })
    };
    local.push(KEY, &grad(&[1, 6], 1.0)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(resumed[0], pull_all(&*local));
}

/// A 2-D table of 6 rows of 4, every row stored (ones).
fn table_2d() -> NDArray {
    NDArray::ones(&[6, 4], DType::F32)
        .retain_rows(&[0, 1, 2, 3, 4, 5])
        .unwrap()
}

/// Every row of the 2-D table.
fn read_2d(kv: &dyn KVStoreBase) -> Vec<f32> {
    let all = NDArray::from_vec(&[6], (0..6i64).collect()).unwrap();
    let mut out = table_2d().retain_rows(&[]).unwrap();
    kv.row_sparse_pull(KEY, &mut out, &all).unwrap();
    out.to_dense().to_vec::<f32>().unwrap()
}

#[test]
fn groupadagrad_runs_on_the_servers_for_row_sparse_keys() {
    // Row-wise AdaGrad needs 2-D weights: the servers keep a row-sparse key's parts as rows.
    let spec = OptimizerSpec::new("groupadagrad").with("learning_rate", 0.1);
    let grad = |rank: usize| {
        let rows = NDArray::full(&[2, 4], rank as f64 + 0.5, DType::F32);
        NDArray::row_sparse(&[6, 4], vec![rank as i64, 4], &rows).unwrap()
    };
    let bound = [("MXNET_KVSTORE_BIGARRAY_BOUND", "8")];
    let dir = std::env::temp_dir().join(format!("kvstore-dist-rows-g-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (from_dist, from_local) = (dir.join("dist"), dir.join("local"));
    let on_dist = {
        let (spec, path) = (spec.clone(), from_dist.clone());
        run_with("dist_sync", 2, 2, &bound, move |rank, kv| {
            kv.init(KEY, &table_2d()).unwrap();
            kv.set_optimizer(&spec).unwrap();
            kv.push(KEY, &grad(rank)).unwrap();
            let seen = read_2d(kv);
            // Its history, one value per row, joined from the servers' rows.
            save_between_barriers(kv, rank, &path);
            seen
        })
    };
    let local = kvstore_base::create("local").unwrap();
    local.init(KEY, &table_2d()).unwrap();
    local.set_optimizer(&spec).unwrap();
    local.push(KEY, &[grad(0), grad(1)][..]).unwrap();
    local.save_optimizer_states(&from_local, true).unwrap();
    assert_eq!(on_dist[0], read_2d(&*local));
    assert_eq!(&on_dist[0][8..12], &[1.0; 4], "row 2 was never pushed");
    assert_ne!(&on_dist[0][16..20], &[1.0; 4], "row 4 was");
    let (on_dist, on_local) = (key_states(&from_dist), key_states(&from_local));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(on_dist.0.is_some(), "a history");
    assert_eq!(on_dist, on_local);
}

#[test]
fn a_pushpull_of_rows_updates_lazily_and_answers_every_row() {
    let sgd = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("wd", 0.1);
    let on_dist = {
        let sgd = sgd.clone();
        run_with("dist_sync", 2, 2, &SPLIT, move |rank, kv| {
            kv.init(KEY, &weight()).unwrap();
            kv.set_optimizer(&sgd).unwrap();
            let mut out = NDArray::zeros(&SHAPE, DType::F32);
            kv.pushpull(KEY, &grad(&pushed_rows(rank, 0), 1.0), &mut out)
                .unwrap();
            out.to_vec::<f32>().unwrap()
        })
    };
    let local = kvstore_base::create("local").unwrap();
    local.init(KEY, &weight()).unwrap();
    local.set_optimizer(&sgd).unwrap();
    let grads = [0, 1].map(|rank| grad(&pushed_rows(rank, 0), 1.0));
    let mut outs = [0, 1].map(|_| NDArray::zeros(&SHAPE, DType::F32));
    local.pushpull(KEY, &grads[..], &mut outs[..]).unwrap();
    assert_eq!(on_dist[0], outs[0].to_vec::<f32>().unwrap());
    assert_eq!(on_dist[1], on_dist[0]);
    let start = weight().to_dense().to_vec::<f32>().unwrap();
    for r in NEVER_PUSHED {
        assert_eq!(
            row(&on_dist[0], r),
            row(&start, r),
            "row {r} was never pushed"
        );
    }
}

/// The bytes of `values` in native byte order.
fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

#[test]
fn a_server_answers_malformed_row_messages_with_errors_and_goes_on() {
    let cluster = LocalCluster::start(1, 1, TIMEOUT).unwrap();
    let w = Manual::join(&cluster);
    let f32_flag = protocol::dtype_flag(DType::F32);
    let rows_flag = f32_flag | protocol::FLAG_ROW_SPARSE;
    let send = |command: u32, key: u64, flags: u16, payload: &[u8]| {
        w.conn.request(
            Outgoing::new(command, payload).key(key).flags(flags),
            "a hand-made request",
        )
    };
    let init = |key: i64, elements: u64, row_len: u64, data: &[u8]| {
        let mut payload = InitMeta {
            dtype: DType::F32,
            elements,
            row_len,
            row_sparse: row_len > 0,
            key: key.into(),
        }
        .encode();
        payload.extend_from_slice(data);
        send(protocol::CMD_INIT, key as u64, f32_flag, &payload)
    };
    // Key 9 is flat (8 elements), key 10 four rows of 2.
    init(9, 8, 0, &f32_bytes(&[0.0; 8])).unwrap();
    init(10, 8, 2, &f32_bytes(&[0.0; 8])).unwrap();

    let push = |key: u64, ids: &[u64], values: &[f32]| {
        let payload = RowsPush::encode(ids.iter().copied(), &f32_bytes(values));
        send(protocol::CMD_PUSH, key, rows_flag, &payload)
    };
    let flat = remote_message(push(9, &[1], &[1.0, 1.0]));
    assert!(flat.contains("not kept by rows"), "{flat}");
    let unsorted = remote_message(push(10, &[3, 1], &[1.0; 4]));
    assert!(unsorted.contains("strictly increasing"), "{unsorted}");
    let outside = remote_message(push(10, &[4], &[1.0; 2]));
    assert!(outside.contains("row 4"), "{outside}");
    let short = remote_message(push(10, &[1], &[1.0]));
    assert!(short.contains("carries 4 bytes"), "{short}");
    let mut truncated = RowsPush::encode([1u64].into_iter(), &[]);
    truncated[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let huge = remote_message(send(protocol::CMD_PUSH, 10, rows_flag, &truncated));
    assert!(huge.contains("truncated"), "{huge}");

    // Inits whose sizes cannot be, or are not, what they carry: refused before allocating.
    let unaddressable = remote_message(init(11, 0, 1 << 62, &[]));
    assert!(unaddressable.contains("too large"), "{unaddressable}");
    let empty = remote_message(init(12, 1 << 40, 0, &[]));
    assert!(empty.contains("carries 0 bytes"), "{empty}");

    // Row requests must name increasing rows.
    let request = RowRequest {
        part_start: 0,
        row_len: 2,
        rows: vec![2, 1],
    };
    let pull = |request: &RowRequest| {
        send(
            protocol::CMD_ROW_SPARSE_PULL,
            10,
            f32_flag,
            &request.encode(),
        )
    };
    let backwards = remote_message(pull(&request));
    assert!(backwards.contains("strictly increasing"), "{backwards}");

    // The server goes on: a well-formed push of row 1 (the round of the only worker, no
    // optimizer: the rows replace the value) and a pull of rows 0 and 1.
    push(10, &[1], &[5.0, 6.0]).unwrap();
    let answer = pull(&RowRequest {
        rows: vec![0, 1],
        ..request
    })
    .unwrap();
    assert_eq!(&answer.payload[..], &f32_bytes(&[0.0, 0.0, 5.0, 6.0])[..]);
    w.leave();
    cluster.finish().unwrap();
}

#[test]
fn a_row_sparse_pull_asks_every_server_for_its_own_rows() {
    // Rows 0..4 on server 0, 4..8 on server 1: row 6 is server 1's. As MXNet, every server is
    // asked (a request waits for this worker's round there), each for the rows it holds.
    let pulled = run_tweaked(
        2,
        1,
        |c| c.bigarray_bound = 16,
        |kv| {
            kv.init(KEY, &weight()).unwrap();
            let ids = NDArray::from_vec(&[1], vec![6i64]).unwrap();
            let mut out = grad(&[], 0.0);
            let before = (kv.requests_sent(), kv.bytes_sent());
            kv.row_sparse_pull(KEY, &mut out, &ids).unwrap();
            let sent = (kv.requests_sent() - before.0, kv.bytes_sent() - before.1);
            (sent, out.to_dense().to_vec::<f32>().unwrap())
        },
    );
    let ((requests, bytes), values) = &pulled[0];
    assert_eq!(*requests, 2, "one request per server");
    // Two frames with a part offset and a row length each; one row id between them.
    let header = kvstore_dist::transport::HEADER_LEN as u64;
    assert_eq!(*bytes, 2 * (header + 16) + 8);
    let start = weight().to_dense().to_vec::<f32>().unwrap();
    assert_eq!(row(values, 6), row(&start, 6));
    assert_eq!(row(values, 5), &[0.0; 4], "row 5 was not asked for");
}

#[test]
fn a_pushpull_of_rows_of_a_big_key_answers_the_whole_value() {
    // 1 MiB of rows: the answer travels alone (through the shared memory the worker lends its
    // server when it can), the push being one row.
    let (rows, row_len) = (4096usize, 64usize);
    let out = run_tweaked(
        1,
        1,
        |_| {},
        move |kv| {
            let shape = [rows, row_len];
            let ids: Vec<i64> = (0..rows as i64).collect();
            kv.init(
                KEY,
                &NDArray::ones(&shape, DType::F32).retain_rows(&ids).unwrap(),
            )
            .unwrap();
            kv.set_optimizer(&OptimizerSpec::new("sgd").with("learning_rate", 0.5))
                .unwrap();
            let one_row = NDArray::full(&[1, row_len], 2.0, DType::F32);
            let g = NDArray::row_sparse(&shape, vec![9], &one_row).unwrap();
            let mut out = NDArray::zeros(&shape, DType::F32);
            kv.pushpull(KEY, &g, &mut out).unwrap();
            let values = out.to_vec::<f32>().unwrap();
            (values[9 * row_len], values[8 * row_len], values.len())
        },
    );
    // Row 9: 1 - 0.5 * 2; every other row untouched.
    assert_eq!(out[0].0, 0.0);
    assert_eq!(out[0].1, 1.0);
    assert_eq!(out[0].2, rows * row_len);
}

/// Every element of the key, pulled dense.
fn pull_dense(kv: &dyn KVStoreBase) -> Vec<f32> {
    let mut out = NDArray::zeros(&SHAPE, DType::F32);
    kv.pull(KEY, &mut out).unwrap();
    out.to_vec::<f32>().unwrap()
}

/// The key initialised dense (a weight of Gluon's `Embedding(sparse_grad=True)`), pushed the
/// row-sparse gradients of [`pushed_rows`] on 2 workers of a `dist_sync` job of 2 servers
/// (its rows split between them), and on `local`: the values after the rounds.
fn dense_weight_dist_and_local(optimizer: OptimizerSpec) -> (Vec<f32>, Vec<f32>) {
    let on_dist = {
        let optimizer = optimizer.clone();
        run_with("dist_sync", 2, 2, &SPLIT, move |rank, kv| {
            kv.init(KEY, &weight().to_dense()).unwrap();
            kv.set_optimizer(&optimizer).unwrap();
            let mut seen = Vec::new();
            for round in 0..3 {
                kv.push(KEY, &grad(&pushed_rows(rank, round), round as f32 + 1.0))
                    .unwrap();
                seen = pull_dense(kv);
            }
            seen
        })
    };
    assert_eq!(on_dist[0], on_dist[1], "both workers pull the same values");
    let local = kvstore_base::create("local").unwrap();
    local.init(KEY, &weight().to_dense()).unwrap();
    local.set_optimizer(&optimizer).unwrap();
    for round in 0..3 {
        let scale = round as f32 + 1.0;
        let grads = [0, 1].map(|rank| grad(&pushed_rows(rank, round), scale));
        local.push(KEY, &grads[..]).unwrap();
    }
    (on_dist[0].clone(), pull_dense(&*local))
}

#[test]
fn row_sparse_gradients_of_a_dense_weight_update_it_lazily_as_local_does() {
    // MXNet's `local` store applies a row-sparse gradient of a dense weight lazily (its dist
    // servers abort on one): rows no gradient holds keep their value.
    for optimizer in [
        OptimizerSpec::new("sgd")
            .with("learning_rate", 0.1)
            .with("momentum", 0.9)
            .with("wd", 0.01),
        OptimizerSpec::new("adam").with("learning_rate", 0.05),
    ] {
        let (dist, local) = dense_weight_dist_and_local(optimizer.clone());
        assert_eq!(dist, local, "{optimizer:?}");
        let start = weight().to_dense().to_vec::<f32>().unwrap();
        for r in NEVER_PUSHED {
            assert_eq!(row(&dist, r), row(&start, r), "row {r} was never pushed");
        }
    }
    // Under `lazy_update` false every row moves, as on `local`.
    let standard = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9)
        .with("wd", 0.01)
        .with("lazy_update", false);
    let (dist, local) = dense_weight_dist_and_local(standard);
    assert_eq!(dist, local);
    let start = weight().to_dense().to_vec::<f32>().unwrap();
    assert_ne!(row(&dist, 0), row(&start, 0));
}

#[test]
fn a_row_sparse_gradient_of_a_dense_weight_sends_its_rows_only() {
    let (rows, row_len) = (4096usize, 64usize);
    let sent = run_tweaked(
        1,
        1,
        |c| c.shm = false,
        move |kv| {
            let shape = [rows, row_len];
            kv.init(KEY, &NDArray::ones(&shape, DType::F32)).unwrap();
            kv.set_optimizer(
                &OptimizerSpec::new("sgd")
                    .with("learning_rate", 0.1)
                    .with("wd", 0.1),
            )
            .unwrap();
            let one_row = NDArray::full(&[1, row_len], 1.0, DType::F32);
            let g = NDArray::row_sparse(&shape, vec![7], &one_row).unwrap();
            let before = kv.bytes_sent();
            kv.push(KEY, &g).unwrap();
            let sent = kv.bytes_sent() - before;
            let mut out = NDArray::zeros(&shape, DType::F32);
            kv.pull(KEY, &mut out).unwrap();
            let values = out.to_vec::<f32>().unwrap();
            (sent, values[7 * row_len], values[0])
        },
    );
    let (sparse, row7, row0) = sent[0];
    assert!(
        sparse < 64 * 4 + 128,
        "a push of one row sent {sparse} bytes"
    );
    // Row 7: 1 - 0.1 * (0.1 * 1 + 1); row 0, never pushed, unchanged (lazy).
    assert_eq!((row7, row0), (0.89, 1.0));
}

#[test]
fn mxnet_lazy_sgd_of_a_dense_weight_on_the_servers() {
    // MXNet 1.9.1's `local` store: ones of (4, 2), sgd lr 0.1 wd 0.1, row 1 pushed +0.5 and
    // -0.5 (cancelling), row 2 pushed 1.0: [1, 0.99, 0.89, 1] per row. Two workers push
    // one value each, over 2 servers.
    let pulled = run_with(
        "dist_sync",
        2,
        2,
        &[("MXNET_KVSTORE_BIGARRAY_BOUND", "4")],
        |rank, kv| {
            kv.init(KEY, &NDArray::ones(&[4, 2], DType::F32)).unwrap();
            kv.set_optimizer(
                &OptimizerSpec::new("sgd")
                    .with("learning_rate", 0.1)
                    .with("wd", 0.1),
            )
            .unwrap();
            let (ids, values) = match rank {
                0 => (vec![1, 2], vec![0.5f32, 0.5, 1.0, 1.0]),
                _ => (vec![1], vec![-0.5f32, -0.5]),
            };
            let data = NDArray::from_vec(&[ids.len(), 2], values).unwrap();
            kv.push(KEY, &NDArray::row_sparse(&[4, 2], ids, &data).unwrap())
                .unwrap();
            let mut out = NDArray::zeros(&[4, 2], DType::F32);
            kv.pull(KEY, &mut out).unwrap();
            out.to_vec::<f32>().unwrap()
        },
    );
    for p in pulled {
        assert_eq!(p, [1.0, 1.0, 0.99, 0.99, 0.89, 0.89, 1.0, 1.0]);
    }
}

#[test]
fn groupadagrad_runs_on_the_servers_for_dense_2d_keys() {
    // The servers keep a dense key of two dimensions by rows too: row-wise AdaGrad runs there,
    // with dense and row-sparse gradients, as on `local`, its history joined from the servers.
    let spec = OptimizerSpec::new("groupadagrad").with("learning_rate", 0.1);
    let sparse = |rank: usize| {
        let rows = NDArray::full(&[2, 4], rank as f64 + 0.5, DType::F32);
        NDArray::row_sparse(&[6, 4], vec![rank as i64, 4], &rows).unwrap()
    };
    let dense = |rank: usize| NDArray::full(&[6, 4], rank as f64 - 0.25, DType::F32);
    let read = |kv: &dyn KVStoreBase| {
        let mut out = NDArray::zeros(&[6, 4], DType::F32);
        kv.pull(KEY, &mut out).unwrap();
        out.to_vec::<f32>().unwrap()
    };
    let bound = [("MXNET_KVSTORE_BIGARRAY_BOUND", "8")];
    let dir = std::env::temp_dir().join(format!("kvstore-dist-rows-gd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (from_dist, from_local) = (dir.join("dist"), dir.join("local"));
    let on_dist = {
        let (spec, path) = (spec.clone(), from_dist.clone());
        run_with("dist_sync", 2, 2, &bound, move |rank, kv| {
            kv.init(KEY, &NDArray::ones(&[6, 4], DType::F32)).unwrap();
            kv.set_optimizer(&spec).unwrap();
            kv.push(KEY, &sparse(rank)).unwrap();
            kv.push(KEY, &dense(rank)).unwrap();
            let seen = read(kv);
            save_between_barriers(kv, rank, &path);
            seen
        })
    };
    let local = kvstore_base::create("local").unwrap();
    local
        .init(KEY, &NDArray::ones(&[6, 4], DType::F32))
        .unwrap();
    local.set_optimizer(&spec).unwrap();
    local.push(KEY, &[sparse(0), sparse(1)][..]).unwrap();
    local.push(KEY, &[dense(0), dense(1)][..]).unwrap();
    local.save_optimizer_states(&from_local, true).unwrap();
    assert_eq!(on_dist[0], read(&*local));
    let (on_dist, on_local) = (key_states(&from_dist), key_states(&from_local));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(on_dist.0.is_some(), "a history");
    assert_eq!(on_dist, on_local);
}

#[test]
fn row_sparse_gradients_of_a_1d_dense_weight_update_it_lazily_as_local_does() {
    // A 1-D weight is kept in rows of one element: sgd with weight decay moves the pushed
    // elements only, as on `local`.
    let spec = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.5)
        .with("wd", 0.1);
    let grad = |rank: usize| {
        let ids = if rank == 0 { vec![1i64, 6] } else { vec![6] };
        let rows = NDArray::full(&[ids.len()], rank as f64 + 0.5, DType::F32);
        NDArray::row_sparse(&[8], ids, &rows).unwrap()
    };
    let read = |kv: &dyn KVStoreBase| {
        let mut out = NDArray::zeros(&[8], DType::F32);
        kv.pull(KEY, &mut out).unwrap();
        out.to_vec::<f32>().unwrap()
    };
    let on_dist = {
        let spec = spec.clone();
        run_with(
            "dist_sync",
            2,
            2,
            &[("MXNET_KVSTORE_BIGARRAY_BOUND", "4")],
            move |rank, kv| {
                kv.init(KEY, &NDArray::ones(&[8], DType::F32)).unwrap();
                kv.set_optimizer(&spec).unwrap();
                kv.push(KEY, &grad(rank)).unwrap();
                kv.push(KEY, &grad(rank)).unwrap();
                read(kv)
            },
        )
    };
    let local = kvstore_base::create("local").unwrap();
    local.init(KEY, &NDArray::ones(&[8], DType::F32)).unwrap();
    local.set_optimizer(&spec).unwrap();
    for _ in 0..2 {
        local.push(KEY, &[grad(0), grad(1)][..]).unwrap();
    }
    let want = read(&*local);
    assert_eq!(on_dist[0], want);
    assert_eq!(want[0], 1.0, "element 0 was never pushed");
}
