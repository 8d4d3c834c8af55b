//! TestStore behaves as MXNet's `mxnet.kvstore.base.TestStore`.

use half::f16;
use kvstore_base::{
    create, Capability, DType, Error, KVStoreBase, KVStoreExt, NDArray, OptimizerSpec,
};
use kvstore_test::TestStore;

fn f32s(data: &[f32]) -> NDArray {
    NDArray::from_vec(&[data.len()], data.to_vec()).unwrap()
}

#[test]
fn registered_as_teststore_in_any_casing() {
    for name in ["teststore", "TestStore", "TESTSTORE"] {
        assert_eq!(create(name).unwrap().type_name(), "teststore");
    }
}

#[test]
fn rank_zero_of_one_worker() {
    let kv = TestStore;
    assert_eq!(kv.rank(), 0);
    assert_eq!(kv.num_workers(), 1);
}

#[test]
fn is_capable_optimizer_is_false_and_unknown_strings_are_errors() {
    let kv = create("teststore").unwrap();
    assert!(!kv.is_capable_by_name("optimizer").unwrap());
    assert!(!kv.is_capable_by_name("OPTIMIZER").unwrap());
    assert!(Capability::ALL.iter().all(|&c| !kv.is_capable(c)));
    let err = kv.is_capable_by_name("foo").unwrap_err();
    assert!(matches!(err, Error::UnknownCapability(ref s) if s == "foo"));
    assert!(err.to_string().contains("unknown capability \"foo\""));
}

#[test]
fn optimizer_state_files_and_key_value_operations_are_unsupported() {
    let kv = TestStore;
    let path = std::env::temp_dir().join("teststore-states-never-written");
    let unsupported = |r: kvstore_base::Result<()>, op: &str| match r {
        Err(Error::Unsupported { store, operation }) => {
            assert_eq!(store, "teststore");
            assert_eq!(operation, op);
        }
        other => panic!("{op}: expected Unsupported, got {other:?}"),
    };
    unsupported(
        kv.set_optimizer(&OptimizerSpec::new("sgd")),
        "set_optimizer",
    );
    unsupported(
        kv.save_optimizer_states(&path, true),
        "save_optimizer_states",
    );
    unsupported(kv.load_optimizer_states(&path), "load_optimizer_states");
    unsupported(kv.init(1, &f32s(&[1.0])), "init");
    unsupported(kv.push(1, &f32s(&[1.0])), "push");
    unsupported(kv.pull(1, &mut f32s(&[1.0])), "pull");
    assert!(!path.exists());
}

#[test]
fn broadcast_copies_into_every_out_and_ignores_the_key() {
    let kv = TestStore;
    let value = f32s(&[1.0, 2.0]);
    let mut outs = vec![NDArray::zeros(&[2], DType::F32); 3];
    kv.broadcast(3, &value, &mut outs).unwrap();
    assert!(outs.iter().all(|o| *o == value));
    // MXNet's TestStore keeps no state: the same key may be broadcast again.
    let again = f32s(&[5.0, 6.0]);
    kv.broadcast(3, &again, &mut outs).unwrap();
    assert!(outs.iter().all(|o| *o == again));
}

#[test]
fn broadcast_takes_one_value_per_key() {
    let err = TestStore
        .broadcast(3, &[f32s(&[1.0]), f32s(&[2.0])], &mut f32s(&[0.0]))
        .unwrap_err();
    assert!(matches!(err.root(), Error::CountMismatch { .. }), "{err}");
    assert!(err.to_string().contains("key 3"), "{err}");
}

#[test]
fn pushpull_of_a_list_sums_into_every_out() {
    let kv = TestStore;
    let values = [f32s(&[1.0, 2.0]), f32s(&[3.0, 4.0]), f32s(&[5.0, 6.0])];
    let mut outs = vec![NDArray::zeros(&[2], DType::F32); 2];
    kv.pushpull("w", &values, &mut outs).unwrap();
    for out in &outs {
        assert_eq!(out.to_vec::<f32>().unwrap(), vec![9.0, 12.0]);
    }
}

#[test]
fn pushpull_without_out_writes_the_sum_back_into_the_values() {
    let kv = TestStore;
    let mut values = vec![f32s(&[1.0]), f32s(&[2.0]), f32s(&[4.0])];
    kv.pushpull_in_place(0, &mut values).unwrap();
    assert!(values
        .iter()
        .all(|v| v.to_vec::<f32>().unwrap() == vec![7.0]));

    // A single array without out is left as it is (its sum is itself).
    let mut single = f32s(&[1.5, -2.5]);
    kv.pushpull_in_place(0, &mut single).unwrap();
    assert_eq!(single.to_vec::<f32>().unwrap(), vec![1.5, -2.5]);
}

#[test]
fn pushpull_sums_left_to_right_from_zero_like_python_sum() {
    let kv = TestStore;
    // float16: ((0 + 2048) + 1) + 1 rounds to 2048 at each step; 2048 + (1 + 1) would be 2050.
    let h = |x: f32| NDArray::from_vec(&[1], vec![f16::from_f32(x)]).unwrap();
    let mut out = h(0.0);
    kv.pushpull(1, &[h(2048.0), h(1.0), h(1.0)], &mut out)
        .unwrap();
    assert_eq!(out.to_vec::<f16>().unwrap(), vec![f16::from_f32(2048.0)]);

    // sum() starts from 0: -0.0 + -0.0 comes back as +0.0.
    let mut out = f32s(&[1.0]);
    kv.pushpull(1, &[f32s(&[-0.0]), f32s(&[-0.0])], &mut out)
        .unwrap();
    assert!(out.to_vec::<f32>().unwrap()[0].is_sign_positive());
    // One value is copied (`o[:] = value`), so a lone -0.0 stays -0.0.
    kv.pushpull(1, &f32s(&[-0.0]), &mut out).unwrap();
    assert!(out.to_vec::<f32>().unwrap()[0].is_sign_negative());

    // uint8 wraps, as MXNet's elementwise addition does.
    let u = |x: u8| NDArray::from_vec(&[1], vec![x]).unwrap();
    let mut out = u(0);
    kv.pushpull(1, &[u(200), u(100)], &mut out).unwrap();
    assert_eq!(out.to_vec::<u8>().unwrap(), vec![44]);
}

#[test]
fn outputs_keep_their_dtype() {
    let kv = TestStore;
    let mut out = NDArray::zeros(&[2], DType::F16);
    kv.pushpull(1, &[f32s(&[0.5, 1.0]), f32s(&[0.25, 1.0])], &mut out)
        .unwrap();
    assert_eq!(out.dtype(), DType::F16);
    assert_eq!(out.to_f64_vec(), vec![0.75, 2.0]);
}

#[test]
fn row_sparse_values_sum_to_their_rows() {
    let kv = TestStore;
    let rows = NDArray::from_vec(&[1, 2], vec![1.0f32, 2.0]).unwrap();
    let a = NDArray::row_sparse(&[3, 2], vec![0], &rows).unwrap();
    let b = NDArray::row_sparse(&[3, 2], vec![2], &rows).unwrap();
    let mut out = NDArray::zeros(&[3, 2], DType::F32);
    kv.pushpull(1, &[a, b], &mut out).unwrap();
    assert_eq!(
        out.to_vec::<f32>().unwrap(),
        vec![1.0, 2.0, 0.0, 0.0, 1.0, 2.0]
    );
}

#[test]
fn bad_input_names_the_store_key_and_shapes() {
    let kv = TestStore;
    let err = kv
        .pushpull(
            3,
            &[f32s(&[1.0, 2.0]), f32s(&[1.0, 2.0, 3.0])],
            &mut f32s(&[0.0, 0.0]),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "teststore: pushpull of key 3: shape mismatch: value 1 of the key has shape [3] but [2] was expected"
    );
    let mut out = f32s(&[0.0, 0.0, 0.0]);
    let err = kv.pushpull("w", &f32s(&[1.0, 2.0]), &mut out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "teststore: pushpull of key \"w\": shape mismatch: output 0 has shape [3] but [2] was expected"
    );
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![0.0; 3]);
}
