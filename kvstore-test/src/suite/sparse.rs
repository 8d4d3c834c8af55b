//! Row-sparse outputs ([`Capability::RowSparse`]): the row ids `row_sparse_pull` takes, and how
//! `pull` treats row-sparse outputs (MXNet's `test_row_sparse_pull` and `test_invalid_pull`).

use kvstore_base::{Capability, DType, Error, KVStoreExt, NDArray, StorageType};

use super::util::{expect_error, store};
use super::{ensure, Check, CheckResult, Failure, StoreFactory};

pub(super) const CHECKS: &[Check] = &[
    Check {
        name: "row_sparse_pull_takes_row_ids_of_any_shape_and_dtype_one_array_per_output",
        requires: &[Capability::RowSparse, Capability::InitPushPull],
        run: row_ids_of_any_shape_and_dtype,
    },
    Check {
        name: "row_sparse_pull_with_no_row_ids_returns_no_rows",
        requires: &[Capability::RowSparse, Capability::InitPushPull],
        run: no_row_ids,
    },
    Check {
        name: "pull_skips_row_sparse_outputs_unless_ignore_sparse_is_false",
        requires: &[Capability::RowSparse, Capability::InitPushPull],
        run: pull_skips_row_sparse_outputs,
    },
    Check {
        name: "errors_row_sparse_pull_into_a_dense_output_writes_nothing",
        requires: &[Capability::RowSparse, Capability::InitPushPull],
        run: row_sparse_pull_into_a_dense_output,
    },
];

/// The shape of the embedding table these checks use.
const TABLE: [usize; 2] = [6, 2];

/// A row-sparse `[6, 2]` table whose every row holds `value`.
fn table_of(value: f32) -> Result<NDArray, Failure> {
    let rows = NDArray::from_vec(&TABLE, vec![value; TABLE[0] * TABLE[1]])?;
    Ok(NDArray::row_sparse(
        &TABLE,
        (0..TABLE[0] as i64).collect(),
        &rows,
    )?)
}

/// A row-sparse `[6, 2]` output holding no rows.
fn no_rows() -> Result<NDArray, Failure> {
    let rows = NDArray::zeros(&[0, TABLE[1]], DType::F32);
    Ok(NDArray::row_sparse(&TABLE, vec![], &rows)?)
}

/// Checks that `out` is row-sparse, holds exactly the rows `rows` (sorted), each of `value`,
/// and zeros elsewhere.
fn expect_rows(out: &NDArray, rows: &[i64], value: f64, what: &str) -> CheckResult {
    let indices = out.as_row_sparse().map(|r| r.indices().to_vec());
    ensure!(
        indices.as_deref() == Some(rows),
        "{what}: holds rows {indices:?}, expected {rows:?}"
    );
    let expected: Vec<f64> = (0..TABLE[0] as i64)
        .flat_map(|row| {
            let v = if rows.contains(&row) { value } else { 0.0 };
            [v; TABLE[1]]
        })
        .collect();
    let dense = out.to_f64_vec();
    ensure!(
        dense == expected,
        "{what}: values {dense:?}, expected {expected:?}"
    );
    Ok(())
}

/// MXNet's `test_row_sparse_pull`: row ids may be 2-D, of any numeric dtype, repeated and
/// unsorted; each output receives the unique requested rows, sorted, from its own id array.
fn row_ids_of_any_shape_and_dtype(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init("e", &table_of(1.0)?)?;

    let ids = NDArray::from_vec(&[2, 2], vec![5.0f32, 1.0, 5.0, 2.0])?;
    let mut out = no_rows()?;
    kv.row_sparse_pull("e", &mut out, &ids)?;
    expect_rows(
        &out,
        &[1, 2, 5],
        1.0,
        "one output, float32 ids [[5, 1], [5, 2]]",
    )?;

    let ids = [
        NDArray::from_vec(&[2, 2], vec![3.0f32, 0.0, 3.0, 4.0])?,
        NDArray::from_vec(&[2, 2], vec![1.0f64, 1.0, 1.0, 1.0])?,
        NDArray::from_vec(&[2, 2], vec![4i32, 2, 0, 5])?,
        NDArray::from_vec(&[2, 2], vec![5i64, 4, 3, 2])?,
    ];
    let expected: [&[i64]; 4] = [&[0, 3, 4], &[1], &[0, 2, 4, 5], &[2, 3, 4, 5]];
    let mut outs = vec![no_rows()?, no_rows()?, no_rows()?, no_rows()?];
    kv.row_sparse_pull("e", &mut outs, &ids[..])?;
    for (i, (out, rows)) in outs.iter().zip(expected).enumerate() {
        let dtype = ids[i].dtype();
        expect_rows(out, rows, 1.0, &format!("output {i} ({dtype} ids)"))?;
    }
    Ok(())
}

/// `dist_sync`'s `default_cpu` check: pulling with an empty row-id array gives no rows.
fn no_row_ids(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init("e", &table_of(1.0)?)?;
    let mut out = table_of(7.0)?;
    let none = NDArray::from_vec(&[0], Vec::<i64>::new())?;
    kv.row_sparse_pull("e", &mut out, &none)?;
    expect_rows(&out, &[], 0.0, "the output after a pull of no rows")
}

/// MXNet's `test_invalid_pull` (1): `pull` leaves row-sparse outputs as they are (with its
/// default `ignore_sparse`), and fills them when `ignore_sparse` is false; dense outputs of the
/// same call are filled either way.
fn pull_skips_row_sparse_outputs(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init("e", &table_of(1.0)?)?;
    let mut out = table_of(2.0)?;
    kv.pull("e", &mut out)?;
    expect_rows(
        &out,
        &[0, 1, 2, 3, 4, 5],
        2.0,
        "a row-sparse output of pull",
    )?;

    let mut outs = vec![table_of(2.0)?, NDArray::zeros(&TABLE, DType::F32)];
    kv.pull("e", &mut outs)?;
    expect_rows(
        &outs[0],
        &[0, 1, 2, 3, 4, 5],
        2.0,
        "a row-sparse output of a list pull",
    )?;
    ensure!(
        outs[1].to_f64_vec() == vec![1.0; TABLE[0] * TABLE[1]],
        "the dense output of the same pull: {:?}",
        outs[1].to_f64_vec()
    );

    let mut out = no_rows()?;
    kv.pull_with_options("e", &mut out, 0, false)?;
    ensure!(
        out.storage_type() == StorageType::RowSparse,
        "pull with ignore_sparse = false changed the output's storage to {:?}",
        out.storage_type()
    );
    ensure!(
        out.to_f64_vec() == vec![1.0; TABLE[0] * TABLE[1]],
        "pull with ignore_sparse = false: {:?}",
        out.to_f64_vec()
    );
    Ok(())
}

/// MXNet's `test_invalid_pull` (2): `row_sparse_pull` needs row-sparse outputs; a dense one is
/// an error naming the key, and no output of the call is written.
fn row_sparse_pull_into_a_dense_output(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init("e", &table_of(1.0)?)?;
    let ids = NDArray::from_vec(&[1], vec![1i64])?;
    let mut dense = NDArray::full(&TABLE, 2.0, DType::F32);
    expect_error(
        kv.row_sparse_pull("e", &mut dense, &ids),
        "row_sparse_pull into a dense output",
        |e| matches!(e, Error::InvalidArgument(_)),
        &["\"e\"", "row-sparse"],
    )?;
    ensure!(
        dense.to_f64_vec() == vec![2.0; TABLE[0] * TABLE[1]],
        "the dense output was written: {:?}",
        dense.to_f64_vec()
    );

    let mut outs = vec![no_rows()?, NDArray::full(&TABLE, 2.0, DType::F32)];
    expect_error(
        kv.row_sparse_pull("e", &mut outs, &ids),
        "row_sparse_pull into a row-sparse and a dense output",
        |e| matches!(e, Error::InvalidArgument(_)),
        &["\"e\"", "row-sparse"],
    )?;
    expect_rows(
        &outs[0],
        &[],
        0.0,
        "the row-sparse output of the failed call",
    )?;
    ensure!(
        outs[1].to_f64_vec() == vec![2.0; TABLE[0] * TABLE[1]],
        "the dense output of the failed call was written: {:?}",
        outs[1].to_f64_vec()
    );
    Ok(())
}
