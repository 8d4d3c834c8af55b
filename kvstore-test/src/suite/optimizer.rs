//! Optimizers run by the store ([`Capability::Optimizer`]) and their saved states
//! ([`Capability::OptimizerStates`]).

use kvstore_base::{Capability, DType, Error, KVStoreExt, NDArray, OptimizerSpec};

use super::util::{expect_all, expect_error, f32s, filled, store};
use super::{ensure, Check, CheckResult, Failure, StoreFactory};

pub(super) const CHECKS: &[Check] = &[
    Check {
        name: "optimizer_test_adds_the_rescaled_sum_of_the_push",
        requires: &[Capability::Optimizer, Capability::InitPushPull],
        run: test_optimizer_adds_the_rescaled_sum,
    },
    Check {
        name: "optimizer_sgd_defaults_to_learning_rate_0_01",
        requires: &[Capability::Optimizer, Capability::InitPushPull],
        run: sgd_defaults_to_learning_rate_0_01,
    },
    Check {
        name: "optimizer_updates_the_pushed_rows_of_a_row_sparse_weight_lazily",
        requires: &[
            Capability::Optimizer,
            Capability::RowSparse,
            Capability::InitPushPull,
        ],
        run: lazy_rows_of_a_row_sparse_weight,
    },
    Check {
        name: "optimizer_updates_the_pushed_rows_of_a_dense_weight_lazily",
        requires: &[
            Capability::Optimizer,
            Capability::RowSparse,
            Capability::InitPushPull,
        ],
        run: lazy_rows_of_a_dense_weight,
    },
    Check {
        name: "optimizer_unknown_name_is_an_error",
        requires: &[Capability::Optimizer],
        run: unknown_optimizer_is_an_error,
    },
    Check {
        name: "optimizer_states_round_trip_through_a_file",
        requires: &[
            Capability::Optimizer,
            Capability::OptimizerStates,
            Capability::InitPushPull,
        ],
        run: states_round_trip_through_a_file,
    },
];

fn test_optimizer_adds_the_rescaled_sum(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init(3, &filled(&[2, 2], 1.0))?;
    kv.set_optimizer(&OptimizerSpec::new("test").with("rescale_grad", 0.5))?;
    kv.push(3, &[filled(&[2, 2], 2.0), filled(&[2, 2], 4.0)])?;
    kv.push(3, &filled(&[2, 2], 2.0))?;
    let mut out = NDArray::zeros(&[2, 2], DType::F32);
    kv.pull(3, &mut out)?;
    // 1 + 0.5 * (2 + 4) + 0.5 * 2
    expect_all(&out, 5.0, "after two pushes through the test optimizer")
}

fn sgd_defaults_to_learning_rate_0_01(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init("w", &NDArray::zeros(&[3], DType::F32))?;
    kv.set_optimizer(&OptimizerSpec::new("sgd"))?;
    kv.push("w", &NDArray::ones(&[3], DType::F32))?;
    let mut out = NDArray::zeros(&[3], DType::F32);
    kv.pull("w", &mut out)?;
    expect_all(
        &out,
        -0.01f32 as f64,
        "weight 0 after one sgd step on gradient 1",
    )
}

/// A row-sparse `[4, 2]` array holding `values` in rows `ids`.
fn embedding_rows(ids: Vec<i64>, values: &[f32]) -> kvstore_base::Result<NDArray> {
    let data = f32s(&[ids.len(), 2], values);
    NDArray::row_sparse(&[4, 2], ids, &data)
}

/// MXNet 1.9.1's lazy sgd step on an embedding of ones of (4, 2) stored as `init`: sgd with
/// learning rate 0.1 and weight decay 0.1, one push of two row-sparse values: row 1 (+0.5 and
/// -0.5, a zero sum still in the union of rows) and row 2 (1.0).
fn one_lazy_sgd_step(
    factory: &StoreFactory,
    init: &NDArray,
) -> Result<Box<dyn kvstore_base::KVStoreBase>, Failure> {
    let kv = store(factory)?;
    kv.init("embedding", init)?;
    kv.set_optimizer(
        &OptimizerSpec::new("sgd")
            .with("learning_rate", 0.1)
            .with("wd", 0.1),
    )?;
    kv.push(
        "embedding",
        &[
            embedding_rows(vec![1, 2], &[0.5, 0.5, 1.0, 1.0])?,
            embedding_rows(vec![1], &[-0.5, -0.5])?,
        ],
    )?;
    Ok(kv)
}

/// MXNet 1.9.1's result of [`one_lazy_sgd_step`]: rows 0 and 3 are not pushed and keep their
/// value, `[1, 0.99, 0.89, 1]` per row.
const MXNET_LAZY_SGD_STEP: [f32; 8] = [1.0, 1.0, 0.99, 0.99, 0.89, 0.89, 1.0, 1.0];

/// [`one_lazy_sgd_step`] on an embedding stored row-sparse with every row: MXNet's result,
/// the weight still holding every row.
fn lazy_rows_of_a_row_sparse_weight(factory: &StoreFactory) -> CheckResult {
    let every_row = [0, 1, 2, 3];
    let kv = one_lazy_sgd_step(factory, &filled(&[4, 2], 1.0).retain_rows(&every_row)?)?;
    let mut out = embedding_rows(vec![], &[])?;
    let ids = NDArray::from_vec(&[4], every_row.to_vec())?;
    kv.row_sparse_pull("embedding", &mut out, &ids)?;
    let got = out.to_dense().to_vec::<f32>()?;
    ensure!(
        got == MXNET_LAZY_SGD_STEP,
        "after one lazy sgd step the rows are {got:?}, MXNet's are {MXNET_LAZY_SGD_STEP:?} \
         (rows not pushed unchanged, rows pushed decayed even when their gradients cancel)"
    );
    Ok(())
}

/// [`one_lazy_sgd_step`] on a dense weight (Gluon's `Embedding(sparse_grad=True)`: the weight
/// dense, its gradients row-sparse): MXNet 1.9.1's `local` store gives the same result, read
/// with a dense pull.
fn lazy_rows_of_a_dense_weight(factory: &StoreFactory) -> CheckResult {
    let kv = one_lazy_sgd_step(factory, &filled(&[4, 2], 1.0))?;
    let mut out = filled(&[4, 2], 0.0);
    kv.pull("embedding", &mut out)?;
    let got = out.to_vec::<f32>()?;
    ensure!(
        got == MXNET_LAZY_SGD_STEP,
        "after one lazy sgd step of a dense weight with row-sparse gradients the rows are \
         {got:?}, MXNet's are {MXNET_LAZY_SGD_STEP:?} (rows not pushed unchanged)"
    );
    Ok(())
}

fn unknown_optimizer_is_an_error(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    expect_error(
        kv.set_optimizer(&OptimizerSpec::new("no_such_optimizer")),
        "set_optimizer(\"no_such_optimizer\")",
        |e| matches!(e, Error::InvalidArgument(_)),
        &["no_such_optimizer", "sgd"],
    )
}

fn run_steps(
    kv: &dyn kvstore_base::KVStoreBase,
    steps: std::ops::Range<i32>,
) -> Result<NDArray, Failure> {
    for step in steps {
        kv.push(1, &filled(&[4], 0.25 * step as f64 + 1.0))?;
    }
    let mut out = NDArray::zeros(&[4], DType::F32);
    kv.pull(1, &mut out)?;
    Ok(out)
}

fn states_round_trip_through_a_file(factory: &StoreFactory) -> CheckResult {
    let adam = OptimizerSpec::new("adam")
        .with("learning_rate", 0.1)
        .with("wd", 0.01);
    let path = std::env::temp_dir().join(format!(
        "kvstore-conformance-states-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));

    // An uninterrupted run of 4 steps, then 2 more.
    let straight = store(factory)?;
    straight.init(1, &filled(&[4], 1.0))?;
    straight.set_optimizer(&adam)?;
    let expected = run_steps(&*straight, 0..4)?;
    let expected_after_6 = run_steps(&*straight, 4..6)?;

    // 2 steps, save, then a fresh store loads the states and runs the last 2.
    let first = store(factory)?;
    first.init(1, &filled(&[4], 1.0))?;
    first.set_optimizer(&adam)?;
    let halfway = run_steps(&*first, 0..2)?;
    first.save_optimizer_states(&path, true)?;

    let second = store(factory)?;
    second.init(1, &halfway)?;
    second.set_optimizer(&adam)?;
    let loaded = second.load_optimizer_states(&path);
    let resumed = loaded
        .map_err(Failure::from)
        .and_then(|()| run_steps(&*second, 2..4));
    let _ = std::fs::remove_file(&path);
    let resumed = resumed?;
    ensure!(
        resumed == expected,
        "resumed from saved states: {:?}, uninterrupted: {:?}",
        resumed.to_f64_vec(),
        expected.to_f64_vec()
    );

    // A file that is not a state file is an error that changes nothing: neither the value
    // nor the optimizer's states (the next steps go on as without the failed load).
    std::fs::write(&path, b"certainly not optimizer states").map_err(|e| Failure(e.to_string()))?;
    let garbage = second.load_optimizer_states(&path);
    let _ = std::fs::remove_file(&path);
    ensure!(garbage.is_err(), "loading a garbage file succeeded");
    ensure!(
        run_steps(&*second, 4..4)? == resumed,
        "a failed load changed the value"
    );
    let after_6 = run_steps(&*second, 4..6)?;
    ensure!(
        after_6 == expected_after_6,
        "after a failed load, 2 more steps gave {:?}, without it {:?}",
        after_6.to_f64_vec(),
        expected_after_6.to_f64_vec()
    );
    Ok(())
}
