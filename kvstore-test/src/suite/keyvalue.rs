//! `init`, `push` and `pull`, for stores that keep values ([`Capability::InitPushPull`]).

use kvstore_base::{Capability, DType, Error, KVStoreExt, NDArray};

use super::util::{expect_all, expect_error, filled, store};
use super::{ensure, Check, CheckResult, StoreFactory};

const KV: &[Capability] = &[Capability::InitPushPull];

pub(super) const CHECKS: &[Check] = &[
    Check {
        name: "keyvalue_init_then_pull_returns_the_value",
        requires: KV,
        run: init_then_pull_returns_the_value,
    },
    Check {
        name: "keyvalue_push_then_pull_returns_the_sum",
        requires: KV,
        run: push_then_pull_returns_the_sum,
    },
    Check {
        name: "keyvalue_init_copies_the_callers_array",
        requires: KV,
        run: init_copies_the_callers_array,
    },
    Check {
        name: "keyvalue_pull_of_an_uninitialised_key_is_an_error",
        requires: KV,
        run: pull_of_an_uninitialised_key_is_an_error,
    },
    Check {
        name: "keyvalue_second_init_of_a_key_is_an_error",
        requires: KV,
        run: second_init_of_a_key_is_an_error,
    },
    Check {
        name: "keyvalue_pull_into_a_wrong_shape_is_an_error",
        requires: KV,
        run: pull_into_a_wrong_shape_is_an_error,
    },
];

fn init_then_pull_returns_the_value(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init(&[1, 2], &[filled(&[2, 3], 4.0), filled(&[5], -1.0)])?;
    let mut outs = vec![
        vec![NDArray::zeros(&[2, 3], DType::F32); 2],
        vec![NDArray::zeros(&[5], DType::F32)],
    ];
    kv.pull(&[1, 2], &mut outs)?;
    expect_all(&outs[0][0], 4.0, "key 1, out 0")?;
    expect_all(&outs[0][1], 4.0, "key 1, out 1")?;
    expect_all(&outs[1][0], -1.0, "key 2")
}

fn push_then_pull_returns_the_sum(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init("w", &filled(&[3], 0.0))?;
    kv.push(
        "w",
        &[filled(&[3], 1.0), filled(&[3], 2.0), filled(&[3], 3.0)],
    )?;
    let mut out = NDArray::zeros(&[3], DType::F32);
    kv.pull("w", &mut out)?;
    expect_all(&out, 6.0, "after one push of 1 + 2 + 3")
}

fn init_copies_the_callers_array(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let mut value = filled(&[2], 7.0);
    kv.init(3, &value)?;
    value = filled(&[2], 100.0);
    let mut out = NDArray::zeros(&[2], DType::F32);
    kv.pull(3, &mut out)?;
    ensure!(
        value.to_f64_vec() == vec![100.0, 100.0],
        "the caller's array changed"
    );
    expect_all(
        &out,
        7.0,
        "the stored value after the caller reused its array",
    )
}

fn pull_of_an_uninitialised_key_is_an_error(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let mut out = NDArray::zeros(&[2], DType::F32);
    expect_error(
        kv.pull(77, &mut out),
        "pull of key 77 before init",
        |e| matches!(e, Error::KeyNotInitialized),
        &["77"],
    )?;
    expect_all(&out, 0.0, "the out")
}

fn second_init_of_a_key_is_an_error(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init(5, &filled(&[2], 1.0))?;
    expect_error(
        kv.init(5, &filled(&[2], 2.0)),
        "second init of key 5",
        |e| matches!(e, Error::DuplicateInit),
        &["5"],
    )?;
    let mut out = NDArray::zeros(&[2], DType::F32);
    kv.pull(5, &mut out)?;
    expect_all(&out, 1.0, "the value after a rejected second init")
}

fn pull_into_a_wrong_shape_is_an_error(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    kv.init(8, &filled(&[2, 3], 1.0))?;
    let mut out = NDArray::zeros(&[3, 2], DType::F32);
    expect_error(
        kv.pull(8, &mut out),
        "pull of a (2, 3) key into a (3, 2) out",
        |e| matches!(e, Error::ShapeMismatch { .. }),
        &["8", "[2, 3]", "[3, 2]"],
    )?;
    expect_all(&out, 0.0, "the out")
}
