//! `pushpull`: the values of a key are summed and the result reaches every output.
//!
//! These checks push each key once into a fresh store with no optimizer, so every store
//! answers with the plain sum (MXNet's local and dist stores replace the stored value with the
//! sum of a push when no updater is set).

use half::{bf16, f16};
use kvstore_base::{Capability, DType, Element, Error, KVStoreExt, NDArray};

use super::util::{declare, expect_all, f32s, filled, store};
use super::{ensure, Check, CheckResult, Failure, StoreFactory};

pub(super) const CHECKS: &[Check] = &[
    Check {
        name: "pushpull_sums_device_values_into_every_out",
        requires: &[],
        run: sums_device_values_into_every_out,
    },
    Check {
        name: "pushpull_in_place_writes_the_sum_into_every_value",
        requires: &[],
        run: in_place_writes_the_sum_into_every_value,
    },
    Check {
        name: "pushpull_single_value_reaches_the_out",
        requires: &[],
        run: single_value_reaches_the_out,
    },
    Check {
        name: "pushpull_key_list_with_per_device_lists",
        requires: &[],
        run: key_list_with_per_device_lists,
    },
    Check {
        name: "pushpull_str_keys",
        requires: &[],
        run: str_keys,
    },
    Check {
        name: "pushpull_sums_every_dtype_exactly",
        requires: &[],
        run: sums_every_dtype_exactly,
    },
    Check {
        name: "pushpull_handles_any_shape",
        requires: &[],
        run: handles_any_shape,
    },
    Check {
        name: "pushpull_leaves_its_inputs_untouched",
        requires: &[],
        run: leaves_its_inputs_untouched,
    },
    Check {
        name: "pushpull_counts_a_repeated_array_each_time",
        requires: &[],
        run: counts_a_repeated_array_each_time,
    },
];

fn sums_device_values_into_every_out(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    declare(&*kv, 3, &[2, 3], DType::F32)?;
    let values: Vec<NDArray> = (1..=4).map(|i| filled(&[2, 3], i as f64)).collect();
    let mut outs = vec![NDArray::zeros(&[2, 3], DType::F32); 3];
    kv.pushpull(3, &values, &mut outs)?;
    for (i, out) in outs.iter().enumerate() {
        expect_all(out, 10.0, &format!("out {i}"))?;
    }
    Ok(())
}

fn in_place_writes_the_sum_into_every_value(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    declare(&*kv, 7, &[3], DType::F32)?;
    let mut values = vec![
        f32s(&[3], &[1.0, 2.0, 3.0]),
        f32s(&[3], &[10.0, 20.0, 30.0]),
    ];
    kv.pushpull_in_place(7, &mut values)?;
    for (i, v) in values.iter().enumerate() {
        ensure!(
            v.to_vec::<f32>()? == vec![11.0, 22.0, 33.0],
            "value {i} after in-place pushpull: {:?}",
            v.to_f64_vec()
        );
    }
    Ok(())
}

fn single_value_reaches_the_out(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    declare(&*kv, 9, &[2, 2], DType::F32)?;
    let value = f32s(&[2, 2], &[1.5, -2.5, 3.5, 0.0]);
    let mut out = NDArray::zeros(&[2, 2], DType::F32);
    kv.pushpull(9, &value, &mut out)?;
    ensure!(out == value, "got {:?}", out.to_f64_vec());
    Ok(())
}

fn key_list_with_per_device_lists(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    declare(&*kv, 1, &[2], DType::F32)?;
    declare(&*kv, 2, &[3], DType::F32)?;
    let values = vec![vec![filled(&[2], 1.0); 2], vec![filled(&[3], 3.0); 3]];
    let mut outs = vec![
        vec![NDArray::zeros(&[2], DType::F32); 2],
        vec![NDArray::zeros(&[3], DType::F32); 3],
    ];
    kv.pushpull(&[1, 2], &values, &mut outs)?;
    for (k, expected) in [(0, 2.0), (1, 9.0)] {
        for (i, out) in outs[k].iter().enumerate() {
            expect_all(out, expected, &format!("key {}, out {i}", k + 1))?;
        }
    }
    Ok(())
}

fn str_keys(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    for key in ["weight", "bias", "权重"] {
        declare(&*kv, key, &[4], DType::F32)?;
    }
    let values = [filled(&[4], 1.0), filled(&[4], 5.0)];
    let mut outs = [
        NDArray::zeros(&[4], DType::F32),
        NDArray::zeros(&[4], DType::F32),
    ];
    kv.pushpull(&["weight", "bias"], &values, &mut outs)?;
    expect_all(&outs[0], 1.0, "key \"weight\"")?;
    expect_all(&outs[1], 5.0, "key \"bias\"")?;
    let mut unicode = NDArray::zeros(&[4], DType::F32);
    kv.pushpull(
        "权重",
        &[filled(&[4], 2.0), filled(&[4], 2.0)],
        &mut unicode,
    )?;
    expect_all(&unicode, 4.0, "a unicode key")
}

/// Checks that `a + b` (two device values of one key) pull back as `expected`, exactly. A store
/// may refuse a dtype its test binary declared refusable
/// ([`allow_refused_dtypes`](crate::allow_refused_dtypes)) with [`Error::Unsupported`] when the
/// key is initialised; a pushpull of it must then fail too.
fn sum_of<T: Element>(factory: &StoreFactory, a: &[T], b: &[T], expected: &[T]) -> CheckResult {
    let kv = store(factory)?;
    let shape = [a.len()];
    let values = [
        NDArray::from_vec(&shape, a.to_vec())?,
        NDArray::from_vec(&shape, b.to_vec())?,
    ];
    let mut out = NDArray::zeros(&shape, T::DTYPE);
    if kv.is_capable(Capability::InitPushPull) {
        match kv.init(1, &NDArray::zeros(&shape, T::DTYPE)) {
            Err(e)
                if super::may_refuse(T::DTYPE) && matches!(e.root(), Error::Unsupported { .. }) =>
            {
                let pushed = kv.pushpull(1, &values, &mut out);
                ensure!(
                    pushed.is_err(),
                    "{} was refused at init ({e}) but a pushpull of it succeeded",
                    T::DTYPE
                );
                return Ok(());
            }
            initialised => initialised?,
        }
    }
    kv.pushpull(1, &values, &mut out)?;
    let got = out.to_vec::<T>()?;
    if got != expected {
        return Err(Failure(format!(
            "{}: {a:?} + {b:?} gave {got:?}, expected {expected:?}",
            T::DTYPE
        )));
    }
    Ok(())
}

fn sums_every_dtype_exactly(factory: &StoreFactory) -> CheckResult {
    sum_of::<f32>(
        factory,
        &[1.5, -2.0, 1e6],
        &[0.25, 2.0, 1.0],
        &[1.75, 0.0, 1_000_001.0],
    )?;
    sum_of::<f64>(factory, &[1e15, 0.5], &[1.0, 0.25], &[1e15 + 1.0, 0.75])?;
    let h = f16::from_f32;
    sum_of::<f16>(
        factory,
        &[h(1.0), h(0.5)],
        &[h(2.0), h(-1.5)],
        &[h(3.0), h(-1.0)],
    )?;
    let b = bf16::from_f32;
    sum_of::<bf16>(
        factory,
        &[b(1.0), b(256.0)],
        &[b(2.0), b(-0.5)],
        &[b(3.0), b(255.5)],
    )?;
    sum_of::<i32>(
        factory,
        &[7, -3, 1 << 30],
        &[5, 3, 1 << 29],
        &[12, 0, (1 << 30) + (1 << 29)],
    )?;
    sum_of::<i64>(factory, &[1 << 40, -1], &[1, -1], &[(1 << 40) + 1, -2])?;
    sum_of::<u8>(factory, &[1, 100], &[2, 27], &[3, 127])
}

fn handles_any_shape(factory: &StoreFactory) -> CheckResult {
    for shape in [&[][..], &[1], &[7], &[2, 3, 4], &[1, 2, 1, 3], &[3, 0]] {
        let kv = store(factory)?;
        declare(&*kv, 4, shape, DType::F32)?;
        let values = [filled(shape, 2.0), filled(shape, 3.0)];
        let mut out = NDArray::zeros(shape, DType::F32);
        kv.pushpull(4, &values, &mut out)?;
        ensure!(
            out.shape() == shape,
            "shape {shape:?} came back as {:?}",
            out.shape()
        );
        expect_all(&out, 5.0, &format!("shape {shape:?}"))?;
    }
    Ok(())
}

fn leaves_its_inputs_untouched(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    declare(&*kv, 11, &[2], DType::F32)?;
    let values = [f32s(&[2], &[1.0, 2.0]), f32s(&[2], &[3.0, 4.0])];
    let before = values.clone();
    let mut out = NDArray::zeros(&[2], DType::F32);
    kv.pushpull(11, &values, &mut out)?;
    ensure!(values == before, "pushpull modified its input values");
    Ok(())
}

fn counts_a_repeated_array_each_time(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    declare(&*kv, 12, &[2], DType::F32)?;
    let x = f32s(&[2], &[1.0, 3.0]);
    let mut out = NDArray::zeros(&[2], DType::F32);
    kv.pushpull(12, [&x, &x], &mut out)?;
    ensure!(
        out.to_vec::<f32>()? == vec![2.0, 6.0],
        "[x, x] gave {:?}, expected 2x",
        out.to_f64_vec()
    );
    Ok(())
}
