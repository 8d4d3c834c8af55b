//! `broadcast`: rank 0's value reaches every output.

use kvstore_base::{Capability, DType, Error, KVStoreExt, NDArray};

use super::util::{expect_all, expect_error, f32s, filled, store};
use super::{ensure, Check, CheckResult, Failure, StoreFactory};

pub(super) const CHECKS: &[Check] = &[
    Check {
        name: "broadcast_copies_value_into_every_out",
        requires: &[],
        run: copies_value_into_every_out,
    },
    Check {
        name: "broadcast_handles_a_key_list",
        requires: &[],
        run: handles_a_key_list,
    },
    Check {
        name: "broadcast_casts_into_the_out_dtype",
        requires: &[],
        run: casts_into_the_out_dtype,
    },
    Check {
        name: "broadcast_out_shape_mismatch_writes_nothing",
        requires: &[],
        run: out_shape_mismatch_writes_nothing,
    },
];

fn copies_value_into_every_out(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let value = f32s(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let original = value.clone();

    let mut one = NDArray::zeros(&[2, 3], DType::F32);
    kv.broadcast(3, &value, &mut one)?;
    ensure!(one == value, "single out: got {:?}", one.to_f64_vec());

    let kv = store(factory)?;
    let mut outs = vec![NDArray::zeros(&[2, 3], DType::F32); 3];
    kv.broadcast("w", &value, &mut outs)?;
    for (i, out) in outs.iter().enumerate() {
        ensure!(*out == value, "out {i}: got {:?}", out.to_f64_vec());
    }
    ensure!(value == original, "broadcast modified its input value");
    Ok(())
}

fn handles_a_key_list(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let values = [filled(&[2], 1.0), filled(&[3], 2.0)];
    let mut outs = vec![
        vec![NDArray::zeros(&[2], DType::F32); 2],
        vec![NDArray::zeros(&[3], DType::F32)],
    ];
    kv.broadcast(&[10, 11], &values, &mut outs)?;
    expect_all(&outs[0][0], 1.0, "key 10, out 0")?;
    expect_all(&outs[0][1], 1.0, "key 10, out 1")?;
    expect_all(&outs[1][0], 2.0, "key 11, out 0")
}

fn casts_into_the_out_dtype(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let value = f32s(&[3], &[0.5, -1.25, 2.0]);
    let mut out = NDArray::zeros(&[3], DType::F64);
    kv.broadcast(5, &value, &mut out)?;
    ensure!(
        out.dtype() == DType::F64,
        "the out changed dtype to {}",
        out.dtype()
    );
    ensure!(
        out.to_vec::<f64>()? == vec![0.5, -1.25, 2.0],
        "got {:?}",
        out.to_f64_vec()
    );
    Ok(())
}

fn out_shape_mismatch_writes_nothing(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let values = [filled(&[2, 3], 1.0), filled(&[4], 2.0)];
    let mut outs = vec![
        NDArray::zeros(&[2, 3], DType::F32),
        NDArray::zeros(&[2, 2], DType::F32),
    ];
    expect_error(
        kv.broadcast(&[20, 21], &values, &mut outs),
        "broadcast into a (2, 2) out of a (4,) value",
        |e| matches!(e, Error::ShapeMismatch { .. }),
        &["21", "[4]", "[2, 2]"],
    )?;
    expect_all(&outs[0], 0.0, "the out of the well-formed key 20")?;
    expect_all(&outs[1], 0.0, "the mismatched out")?;
    // Nor did it initialise the well-formed key in a store that keeps values.
    if kv.is_capable(Capability::InitPushPull) {
        kv.init(20, &filled(&[2, 3], 3.0)).map_err(|e| {
            Failure(format!(
                "init of key 20 after the failed broadcast: {e} (the failed call stored it)"
            ))
        })?;
    }
    Ok(())
}
