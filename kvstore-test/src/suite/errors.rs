//! Bad input: every case is an error that names the key and the shapes, and nothing is written.

use kvstore_base::{
    Capability, DType, Error, KVStoreBase, KVStoreExt, Key, KeyedOuts, KeyedValues, NDArray,
};

use super::util::{declare, expect_all, expect_error, filled, store};
use super::{Check, CheckResult, StoreFactory};

pub(super) const CHECKS: &[Check] = &[
    Check {
        name: "errors_mixed_key_types_in_one_call",
        requires: &[],
        run: mixed_key_types_in_one_call,
    },
    Check {
        name: "errors_int_keys_on_a_string_keyed_store_and_string_keys_on_an_int_keyed_store",
        requires: &[Capability::InitPushPull],
        run: keys_of_the_other_type,
    },
    Check {
        name: "errors_empty_key_list",
        requires: &[],
        run: empty_key_list,
    },
    Check {
        name: "errors_wrong_number_of_outs",
        requires: &[],
        run: wrong_number_of_outs,
    },
    Check {
        name: "errors_value_shape_mismatch_names_key_and_shapes",
        requires: &[],
        run: value_shape_mismatch,
    },
    Check {
        name: "errors_value_dtype_mismatch_names_key_and_dtypes",
        requires: &[],
        run: value_dtype_mismatch,
    },
    Check {
        name: "errors_out_shape_mismatch_writes_no_out",
        requires: &[],
        run: out_shape_mismatch_writes_no_out,
    },
    Check {
        name: "errors_out_key_without_value",
        requires: &[],
        run: out_key_without_value,
    },
];

fn mixed_key_types_in_one_call(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let a = filled(&[2], 1.0);
    let keys = vec![Key::from(1), Key::from("w")];
    let values = [a.clone(), a.clone()];
    let mut outs = [
        NDArray::zeros(&[2], DType::F32),
        NDArray::zeros(&[2], DType::F32),
    ];
    expect_error(
        kv.pushpull(keys.clone(), &values, &mut outs),
        "pushpull with keys [1, \"w\"]",
        |e| matches!(e, Error::MixedKeyTypes { .. }),
        &["inconsistent types of keys", "1", "\"w\""],
    )?;
    expect_error(
        kv.broadcast(keys, &values, &mut outs),
        "broadcast with keys [1, \"w\"]",
        |e| matches!(e, Error::MixedKeyTypes { .. }),
        &["inconsistent types of keys"],
    )?;
    expect_all(&outs[0], 0.0, "out 0")
}

/// MXNet's `test_invalid_pull` (3): a store takes int keys or string keys, whichever came
/// first, never both; every operation with a key of the other type is an error naming that
/// key and both types, and changes nothing.
fn keys_of_the_other_type(factory: &StoreFactory) -> CheckResult {
    let int_keys = [Key::from(3), Key::from(5)];
    let str_keys = [Key::from("a"), Key::from("b")];
    for (own, other) in [(&int_keys, &str_keys), (&str_keys, &int_keys)] {
        let kv = store(factory)?;
        let row_sparse = kv.is_capable(Capability::RowSparse);
        kv.init(own.to_vec(), &[filled(&[2], 1.0), filled(&[2], 1.0)])?;
        let is_mixed = |e: &Error| matches!(e, Error::MixedKeyTypes { .. });
        let other_name = other[0].to_string();
        let mentions = [other_name.as_str(), "int", "str"];
        let what = |op: &str| format!("{op} of key {} on a store of key {}", other[0], own[0]);
        let value = filled(&[2], 2.0);
        expect_error(
            kv.init(other[0].clone(), &value),
            &what("init"),
            is_mixed,
            &mentions,
        )?;
        expect_error(
            kv.init(other.to_vec(), &[value.clone(), value.clone()]),
            &what("list init"),
            is_mixed,
            &mentions,
        )?;
        expect_error(
            kv.push(other[0].clone(), &value),
            &what("push"),
            is_mixed,
            &mentions,
        )?;
        let mut out = NDArray::zeros(&[2], DType::F32);
        expect_error(
            kv.pull(other[0].clone(), &mut out),
            &what("pull"),
            is_mixed,
            &mentions,
        )?;
        let mut outs = [
            NDArray::zeros(&[2], DType::F32),
            NDArray::zeros(&[2], DType::F32),
        ];
        expect_error(
            kv.pull(other.to_vec(), &mut outs),
            &what("list pull"),
            is_mixed,
            &mentions,
        )?;
        expect_all(&out, 0.0, "the out of the failed pull")?;
        if row_sparse {
            let ids = NDArray::from_vec(&[1], vec![1i64])?;
            let rows = NDArray::zeros(&[0, 2], DType::F32);
            let mut out = NDArray::row_sparse(&[2, 2], vec![], &rows)?;
            expect_error(
                kv.row_sparse_pull(other[0].clone(), &mut out, &ids),
                &what("row_sparse_pull"),
                is_mixed,
                &mentions,
            )?;
        }
        // The store's own keys still work and hold their value.
        kv.pull(own[0].clone(), &mut out)?;
        expect_all(
            &out,
            1.0,
            &format!("key {} after the refused calls", own[0]),
        )?;
    }
    Ok(())
}

fn empty_key_list(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let no_keys: Vec<i32> = Vec::new();
    let no_values: Vec<NDArray> = Vec::new();
    let mut no_outs: Vec<NDArray> = Vec::new();
    expect_error(
        kv.pushpull(no_keys.clone(), &no_values, &mut no_outs),
        "pushpull with no keys",
        |e| matches!(e, Error::EmptyKeys { .. }),
        &["pushpull", "empty"],
    )?;
    expect_error(
        kv.broadcast(no_keys, &no_values, &mut no_outs),
        "broadcast with no keys",
        |e| matches!(e, Error::EmptyKeys { .. }),
        &["broadcast", "empty"],
    )
}

fn wrong_number_of_outs(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    let values = [filled(&[2], 1.0), filled(&[2], 2.0), filled(&[2], 3.0)];
    let mut outs = [
        NDArray::zeros(&[2], DType::F32),
        NDArray::zeros(&[2], DType::F32),
    ];
    expect_error(
        kv.pushpull(&[1, 2, 3], &values, &mut outs),
        "three keys with two outs",
        |e| {
            matches!(
                e,
                Error::CountMismatch {
                    expected: 3,
                    found: 2,
                    ..
                }
            )
        },
        &["3", "2"],
    )?;
    expect_all(&outs[0], 0.0, "out 0")?;
    expect_all(&outs[1], 0.0, "out 1")
}

fn value_shape_mismatch(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    declare(&*kv, 42, &[2, 3], DType::F32)?;
    let values = [filled(&[2, 3], 1.0), filled(&[3, 2], 1.0)];
    let mut out = NDArray::zeros(&[2, 3], DType::F32);
    expect_error(
        kv.pushpull(42, &values, &mut out),
        "values of shapes (2, 3) and (3, 2) for one key",
        |e| matches!(e, Error::ShapeMismatch { .. }),
        &["42", "[2, 3]", "[3, 2]", kv.type_name()],
    )?;
    expect_all(&out, 0.0, "the out")
}

fn value_dtype_mismatch(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    declare(&*kv, "bias", &[2], DType::F32)?;
    let values = [
        NDArray::ones(&[2], DType::F32),
        NDArray::ones(&[2], DType::F16),
    ];
    let mut out = NDArray::zeros(&[2], DType::F32);
    expect_error(
        kv.pushpull("bias", &values, &mut out),
        "float32 and float16 values for one key",
        |e| matches!(e, Error::DTypeMismatch { .. }),
        &["\"bias\"", "float32", "float16"],
    )?;
    expect_all(&out, 0.0, "the out")
}

fn out_shape_mismatch_writes_no_out(factory: &StoreFactory) -> CheckResult {
    let kv = store(factory)?;
    declare(&*kv, 5, &[2], DType::F32)?;
    declare(&*kv, 6, &[3], DType::F32)?;
    let values = [filled(&[2], 1.0), filled(&[3], 2.0)];
    let mut outs = [
        NDArray::zeros(&[2], DType::F32),
        NDArray::zeros(&[4], DType::F32),
    ];
    expect_error(
        kv.pushpull(&[5, 6], &values, &mut outs),
        "a (4,) out for a (3,) value",
        |e| matches!(e, Error::ShapeMismatch { .. }),
        &["6", "[3]", "[4]"],
    )?;
    expect_all(&outs[0], 0.0, "the out of key 5, which had no error")?;
    expect_all(&outs[1], 0.0, "the mismatched out")?;
    // Nor did it push key 5 in a store that keeps values.
    if kv.is_capable(Capability::InitPushPull) {
        let mut stored = NDArray::ones(&[2], DType::F32);
        kv.pull(5, &mut stored)?;
        expect_all(&stored, 0.0, "key 5 after the failed pushpull")?;
    }
    Ok(())
}

fn out_key_without_value(factory: &StoreFactory) -> CheckResult {
    let kv: Box<dyn KVStoreBase> = store(factory)?;
    let value = filled(&[2], 1.0);
    let values = KeyedValues::new("pushpull", vec![Key::from(1)], vec![&value])?;
    let mut out = NDArray::zeros(&[2], DType::F32);
    let mut outs = KeyedOuts::new("pushpull", vec![Key::from(2)], vec![&mut out])?;
    expect_error(
        kv.pushpull_batch(&values, &mut outs, 0),
        "an out for key 2 with a value only for key 1",
        |e| matches!(e, Error::InvalidArgument(_)),
        &["2"],
    )?;
    expect_all(&out, 0.0, "the out")
}
