//! Custom updaters ([`Capability::Updater`]) and row-sparse pulls ([`Capability::RowSparse`]).

use std::sync::{Arc, Mutex};

use kvstore_base::{Capability, DType, Error, KVStoreExt, Key, NDArray};

use super::util::{expect_all, expect_error, filled, store};
use super::{ensure, Check, CheckResult, Failure, StoreFactory};

pub(super) const CHECKS: &[Check] = &[
    Check {
        name: "updater_runs_once_per_key_with_the_sum_of_the_push",
        requires: &[Capability::Updater, Capability::InitPushPull],
        run: updater_runs_once_per_key_with_the_sum,
    },
    Check {
        name: "updater_error_comes_back_and_the_value_is_unchanged",
        requires: &[Capability::Updater, Capability::InitPushPull],
        run: updater_error_comes_back,
    },
    Check {
        name: "keyvalue_push_without_updater_replaces_the_value",
        requires: &[Capability::InitPushPull],
        run: push_without_updater_replaces,
    },
    Check {
        name: "row_sparse_pull_returns_exactly_the_requested_rows",
        requires: &[Capability::RowSparse, Capability::InitPushPull],
        run: row_sparse_pull_returns_the_requested_rows,
    },
    Check {
        name: "row_sparse_push_of_several_values_sums_their_rows",
        requires: &[Capability::RowSparse, Capability::InitPushPull],
        run: row_sparse_push_sums_the_rows_of_its_values,
    },
    Check {
        name: "keyvalue_push_of_rows_to_a_dense_key_replaces_its_value",
        requires: &[Capability::RowSparse, Capability::InitPushPull],
        run: push_of_rows_to_a_dense_key,
    },
];

/// A row-sparse array of shape `[4, 2]` whose rows `ids` all hold `value`.
fn rows_of(ids: &[i64], value: f32) -> std::result::Result<NDArray, Failure> {
    let data = NDArray::from_vec(&[ids.len(), 2], vec![value; 2 * ids.len()])?;
    Ok(NDArray::row_sparse(&[4, 2], ids.to_vec(), &data)?)
}

/// MXNet's `test_sparse_aggregator`: a push of several row-sparse values of one key sums them
/// over the union of their rows (without an updater the sum is the value).
fn row_sparse_push_sums_the_rows_of_its_values(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init("embedding", &rows_of(&[0, 1, 2, 3], 0.0)?)?;
    // Their rows cover every row: {0}, {2}, {0, 3}, {1}.
    let values = [
        rows_of(&[0], 1.0)?,
        rows_of(&[2], 2.0)?,
        rows_of(&[0, 3], 3.0)?,
        rows_of(&[1], 4.0)?,
    ];
    kv.push("embedding", &values)?;
    let mut out = rows_of(&[], 0.0)?;
    let every_row = NDArray::from_vec(&[4], vec![0i64, 1, 2, 3])?;
    kv.row_sparse_pull("embedding", &mut out, &every_row)?;
    ensure!(
        out.to_f64_vec() == vec![4.0, 4.0, 4.0, 4.0, 2.0, 2.0, 3.0, 3.0],
        "the rows pulled after the push: {:?}, expected rows 4, 4, 2, 3",
        out.to_f64_vec()
    );
    Ok(())
}

/// MXNet's `test_single_kv_pair` and `test_list_kv_pair` with `row_sparse` values: a push of
/// row-sparse values to dense keys, pulled dense.
fn push_of_rows_to_a_dense_key(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init(&[3, 5], &[filled(&[4, 2], 0.0), filled(&[4, 2], 0.0)])?;
    kv.push(3, &rows_of(&[0, 1, 2, 3], 1.0)?)?;
    // Two values of key 5: their sum, 4.
    kv.push(
        &[5, 5],
        &[rows_of(&[0, 1, 2, 3], 1.0)?, rows_of(&[0, 1, 2, 3], 3.0)?],
    )?;
    let mut outs = [filled(&[4, 2], -1.0), filled(&[4, 2], -1.0)];
    kv.pull(&[3, 5], &mut outs)?;
    expect_all(&outs[0], 1.0, "key 3 after a push of rows of ones")?;
    expect_all(&outs[1], 4.0, "key 5 after a push of rows of 1 and of 3")
}

fn updater_runs_once_per_key_with_the_sum(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init(&[1, 2], &[filled(&[1], 0.0), filled(&[1], 0.0)])?;
    let calls: Arc<Mutex<Vec<(Key, f64)>>> = Arc::default();
    let seen = Arc::clone(&calls);
    kv.set_updater_fn(move |key, grad, stored| {
        seen.lock()
            .map_err(|_| Error::InvalidArgument("poisoned".into()))?
            .push((key.clone(), grad.to_f64_vec()[0]));
        stored.add_assign(grad)
    })?;
    // Key 1 twice in one call: its values are summed and the updater sees the sum once.
    kv.push(
        &[2, 1, 1],
        &[filled(&[1], 3.0), filled(&[1], 1.0), filled(&[1], 10.0)],
    )?;
    let mut got = calls
        .lock()
        .map_err(|_| Failure("poisoned".into()))?
        .clone();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(
        got == vec![(Key::from(1), 11.0), (Key::from(2), 3.0)],
        "updater calls: {got:?}, expected (1, 11) and (2, 3)"
    );
    // Through the updater, pushes accumulate.
    kv.push(1, &filled(&[1], 1.0))?;
    let mut out = NDArray::zeros(&[1], DType::F32);
    kv.pull(1, &mut out)?;
    expect_all(&out, 12.0, "key 1 after two updates")
}

fn updater_error_comes_back(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init("w", &filled(&[2], 1.0))?;
    kv.set_updater_fn(|_, _, _| Err(Error::InvalidArgument("the updater refuses".into())))?;
    expect_error(
        kv.push("w", &filled(&[2], 5.0)),
        "a push through a failing updater",
        |e| matches!(e, Error::InvalidArgument(_)),
        &["the updater refuses", "\"w\""],
    )?;
    let mut out = NDArray::zeros(&[2], DType::F32);
    kv.pull("w", &mut out)?;
    expect_all(&out, 1.0, "the value after the failed update")
}

fn push_without_updater_replaces(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init(3, &filled(&[2], 100.0))?;
    kv.push(3, &filled(&[2], 2.0))?;
    kv.push(3, &filled(&[2], 3.0))?;
    let mut out = NDArray::zeros(&[2], DType::F32);
    kv.pull(3, &mut out)?;
    expect_all(
        &out,
        3.0,
        "after pushes of 2 then 3 (each push replaces the value)",
    )
}

fn row_sparse_pull_returns_the_requested_rows(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let rows = NDArray::from_vec(&[2, 2], vec![1.0f32, 1.0, 3.0, 3.0])?;
    kv.init(
        "embedding",
        &NDArray::row_sparse(&[4, 2], vec![1, 3], &rows)?,
    )?;
    let empty = NDArray::row_sparse(&[4, 2], vec![], &NDArray::zeros(&[0, 2], DType::F32))?;
    let mut outs = vec![empty.clone(), empty];
    // Unsorted, repeated ids; row 0 is not stored and comes back as zeros.
    let ids = NDArray::from_vec(&[3], vec![3i64, 0, 3])?;
    kv.row_sparse_pull("embedding", &mut outs, &ids)?;
    for (i, out) in outs.iter().enumerate() {
        let indices = out.as_row_sparse().map(|r| r.indices().to_vec());
        ensure!(
            indices == Some(vec![0, 3]),
            "output {i}: row ids {indices:?}, expected [0, 3]"
        );
        ensure!(
            out.to_f64_vec() == vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0],
            "output {i}: {:?}",
            out.to_f64_vec()
        );
    }
    Ok(())
}
