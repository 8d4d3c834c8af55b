//! The `local` store against MXNet's documented behaviour (the worked examples and the
//! experiment log of MXNet 1.9.1's local store), and the places where it deliberately differs.

use std::sync::{Arc, Mutex};

use kvstore_base::{
    create, create_default, Capability, DType, Error, KVStoreBase, KVStoreExt, Key, NDArray,
};
use kvstore_local::{reduce::ReduceConfig, LocalStore};

fn full(shape: &[usize], v: f64) -> NDArray {
    NDArray::full(shape, v, DType::F32)
}

fn values(a: &NDArray) -> Vec<f32> {
    a.to_vec::<f32>().unwrap()
}

fn kv() -> Box<dyn KVStoreBase> {
    create("local").unwrap()
}

#[test]
fn registered_as_local_with_mxnet_aliases_and_as_the_default() {
    assert_eq!(create_default().unwrap().type_name(), "local");
    assert_eq!(create("LOCAL").unwrap().type_name(), "local");
    assert_eq!(
        create("local_allreduce_cpu").unwrap().type_name(),
        "local_allreduce_cpu"
    );
    assert_eq!(
        create("Local_Update_CPU").unwrap().type_name(),
        "local_update_cpu"
    );
    let kv = kv();
    assert_eq!((kv.rank(), kv.num_workers()), (0, 1));
    assert!(kv.is_capable_by_name("optimizer").unwrap());
    assert!(!kv.is_capable(Capability::GradientCompression));
    kv.barrier().unwrap();
}

#[test]
fn push_sums_devices_and_replaces_without_updater() {
    let kv = kv();
    kv.init(3, &full(&[2, 3], 0.0)).unwrap();
    kv.push(3, &vec![full(&[2, 3], 1.0); 3]).unwrap();
    let mut a = full(&[2, 3], 0.0);
    kv.pull(3, &mut a).unwrap();
    assert_eq!(values(&a), vec![3.0; 6]);

    // Without an updater each push replaces the stored value.
    kv.push(3, &full(&[2, 3], 2.0)).unwrap();
    kv.push(3, &full(&[2, 3], 3.0)).unwrap();
    kv.pull(3, &mut a).unwrap();
    assert_eq!(values(&a), vec![3.0; 6]);
}

#[test]
fn key_lists_with_per_device_lists() {
    let kv = kv();
    kv.init(&[1, 2], &[full(&[2], 0.0), full(&[2], 0.0)])
        .unwrap();
    kv.push(
        &[1, 2],
        &vec![vec![full(&[2], 1.0); 2], vec![full(&[2], 3.0); 3]],
    )
    .unwrap();
    let mut outs = vec![vec![full(&[2], 0.0); 2], vec![full(&[2], 0.0); 3]];
    kv.pull(&[1, 2], &mut outs).unwrap();
    assert!(outs[0].iter().all(|o| values(o) == vec![2.0, 2.0]));
    assert!(outs[1].iter().all(|o| values(o) == vec![9.0, 9.0]));

    // Pulling one key twice fills both outputs.
    let mut twice = vec![full(&[2], 0.0), full(&[2], 0.0)];
    kv.pull(&[1, 1], &mut twice).unwrap();
    assert!(twice.iter().all(|o| values(o) == vec![2.0, 2.0]));
}

#[test]
fn pushpull_into_outs_and_in_place() {
    let kv = kv();
    kv.init(3, &full(&[2], 0.0)).unwrap();
    let vals = [full(&[2], 1.0), full(&[2], 2.0), full(&[2], 3.0)];
    let mut o = full(&[2], 0.0);
    kv.pushpull(3, &vals, &mut o).unwrap();
    assert_eq!(values(&o), vec![6.0, 6.0]);
    let mut in_place = vals.to_vec();
    kv.pushpull_in_place(3, &mut in_place).unwrap();
    assert!(in_place.iter().all(|v| values(v) == vec![6.0, 6.0]));
}

#[test]
fn updater_runs_once_per_key_in_ascending_order_with_the_sum() {
    let kv = kv();
    kv.init(&[1, 2], &[full(&[1], 0.0), full(&[1], 0.0)])
        .unwrap();
    let calls: Arc<Mutex<Vec<(Key, f32)>>> = Arc::default();
    let seen = Arc::clone(&calls);
    kv.set_updater_fn(move |key, grad, stored| {
        seen.lock()
            .unwrap()
            .push((key.clone(), grad.to_vec::<f32>()?[0]));
        stored.add_assign(grad)
    })
    .unwrap();
    kv.push(
        &[2, 1, 1],
        &[full(&[1], 3.0), full(&[1], 1.0), full(&[1], 10.0)],
    )
    .unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        vec![(Key::from(1), 11.0), (Key::from(2), 3.0)]
    );
    // With an updater, pushes accumulate through it.
    kv.push(1, &full(&[1], 1.0)).unwrap();
    let mut out = full(&[1], 0.0);
    kv.pull(1, &mut out).unwrap();
    assert_eq!(values(&out), vec![12.0]);
}

#[test]
fn string_keys_reach_the_updater_in_init_order_as_mxnets_ints_for_them() {
    // MXNet gives a string key the next int at its first init and processes a call's keys in
    // ascending int order: init order, not alphabetical.
    let kv = kv();
    kv.init(&["zeta", "alpha"], &[full(&[1], 0.0), full(&[1], 0.0)])
        .unwrap();
    kv.init("mid", &full(&[1], 0.0)).unwrap();
    let calls: Arc<Mutex<Vec<Key>>> = Arc::default();
    let seen = Arc::clone(&calls);
    kv.set_updater_fn(move |key, grad, stored| {
        seen.lock().unwrap().push(key.clone());
        stored.add_assign(grad)
    })
    .unwrap();
    let grads = [full(&[1], 1.0), full(&[1], 2.0), full(&[1], 3.0)];
    kv.push(&["alpha", "mid", "zeta"], &grads).unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        vec![Key::from("zeta"), Key::from("alpha"), Key::from("mid")]
    );
}

#[test]
fn an_updater_error_is_returned_and_the_value_is_unchanged() {
    let kv = kv();
    kv.init("w", &full(&[2], 1.0)).unwrap();
    kv.set_updater_fn(|_, _, _| Err(Error::InvalidArgument("diverged".into())))
        .unwrap();
    let err = kv.push("w", &full(&[2], 5.0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "local: push of key \"w\": invalid argument: diverged"
    );
    let mut out = full(&[2], 0.0);
    kv.pull("w", &mut out).unwrap();
    assert_eq!(values(&out), vec![1.0, 1.0]);
}

#[test]
fn a_key_the_optimizer_refuses_fails_the_call_before_any_key_is_updated() {
    let kv = kv();
    kv.set_optimizer(&kvstore_base::OptimizerSpec::new("sgd").with("learning_rate", 0.5))
        .unwrap();
    // Key 1 (first in MXNet's order) is a float32 weight; key 2 an int32 one, which no
    // optimizer updates.
    kv.init(&[1, 2], &[full(&[2], 1.0), NDArray::ones(&[2], DType::I32)])
        .unwrap();
    let grads = [full(&[2], 1.0), NDArray::ones(&[2], DType::I32)];
    let err = kv.push(&[1, 2], &grads).unwrap_err();
    assert_eq!(err.key(), Some(&Key::from(2)), "{err}");
    let mut outs = [full(&[2], 0.0), NDArray::zeros(&[2], DType::I32)];
    kv.pull(&[1, 2], &mut outs).unwrap();
    assert_eq!(values(&outs[0]), vec![1.0, 1.0], "key 1 was not stepped");
    // The update count of key 1 did not move either: its first step is the one now.
    kv.push(1, &full(&[2], 1.0)).unwrap();
    kv.pull(1, &mut outs[0]).unwrap();
    assert_eq!(values(&outs[0]), vec![0.5, 0.5]);
}

#[test]
fn an_updater_calling_its_own_store_gets_an_error_not_a_hang() {
    let kv: Arc<dyn KVStoreBase> = Arc::from(kv());
    kv.init(1, &full(&[2], 1.0)).unwrap();
    let store = Arc::downgrade(&kv);
    kv.set_updater_fn(move |key, grad, stored| {
        let mut peek = full(&[2], 0.0);
        let store = store.upgrade().expect("the store is alive during its push");
        store.pull(key.clone(), &mut peek)?;
        stored.add_assign(grad)
    })
    .unwrap();
    let err = kv.push(1, &full(&[2], 1.0)).unwrap_err();
    assert!(err.to_string().contains("must not call its store"), "{err}");
    let mut out = full(&[2], 0.0);
    kv.pull(1, &mut out).unwrap();
    assert_eq!(values(&out), vec![1.0, 1.0]);
}

#[test]
fn an_updater_that_replaces_the_value_by_another_shape_is_an_error_not_a_panic() {
    let kv = kv();
    kv.init(1, &full(&[2], 1.0)).unwrap();
    kv.set_updater_fn(|_, _, stored| {
        *stored = full(&[3], 7.0);
        Ok(())
    })
    .unwrap();
    // Two values of the key: summed in a merge buffer of the stored value's shape.
    let err = kv.push(1, &[full(&[2], 1.0), full(&[2], 1.0)]).unwrap_err();
    assert!(
        err.to_string().contains("shape [2]") && err.to_string().contains("[3]"),
        "{err}"
    );
    // The value is put back as it was.
    let mut out = full(&[2], 0.0);
    kv.pull(1, &mut out).unwrap();
    assert_eq!(values(&out), vec![1.0; 2]);
}

/// A custom updater that fails at the second key of a call: the first key's update is put
/// back, so that the failed call changes no value.
#[test]
fn an_updater_failing_at_one_key_leaves_every_key_of_the_call_as_it_was() {
    let kv = kv();
    kv.init(&[1, 2][..], &[full(&[2], 1.0), full(&[2], 1.0)][..])
        .unwrap();
    kv.set_updater_fn(|key, grad, stored| {
        if *key == Key::from(2) {
            return Err(Error::InvalidArgument("no update for key 2".into()));
        }
        stored.add_assign(grad)
    })
    .unwrap();
    let err = kv
        .push(&[1, 2][..], &[full(&[2], 1.0), full(&[2], 1.0)][..])
        .unwrap_err();
    assert!(err.to_string().contains("no update for key 2"), "{err}");
    let mut out = full(&[2], 0.0);
    kv.pull(1, &mut out).unwrap();
    assert_eq!(values(&out), vec![1.0; 2]);
}

#[test]
fn the_store_never_aliases_the_callers_arrays() {
    let kv = kv();
    let mut g = full(&[2], 1.0);
    kv.init(1, &g).unwrap();
    g = full(&[2], 9.0);
    kv.push(1, &g).unwrap();
    let pushed = g.clone();
    g = full(&[2], 5.0); // MXNet 1.9.1's local store would now return 5
    let mut out = full(&[2], 0.0);
    kv.pull(1, &mut out).unwrap();
    assert_eq!(values(&out), vec![9.0, 9.0]);
    assert_eq!(values(&pushed), vec![9.0, 9.0]);
    assert_eq!(values(&g), vec![5.0, 5.0]);
}

#[test]
fn key_errors_name_the_key() {
    let kv = kv();
    let mut out = full(&[2], 0.0);
    let err = kv.pull(3, &mut out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "local: pull of key 3: key has not been initialised (call init first)"
    );
    assert!(matches!(
        kv.push(3, &full(&[2], 1.0)).unwrap_err().root(),
        Error::KeyNotInitialized
    ));
    assert!(matches!(
        kv.pushpull(3, &full(&[2], 1.0), &mut out)
            .unwrap_err()
            .root(),
        Error::KeyNotInitialized
    ));

    kv.init(3, &full(&[2, 3], 1.0)).unwrap();
    let err = kv.init(3, &full(&[2, 3], 1.0)).unwrap_err();
    assert!(matches!(err.root(), Error::DuplicateInit), "{err}");
    let err = kv
        .broadcast(3, &full(&[2, 3], 1.0), &mut full(&[2, 3], 0.0))
        .unwrap_err();
    assert!(matches!(err.root(), Error::DuplicateInit), "{err}");
    let err = kv
        .init(&[4, 4], &[full(&[1], 1.0), full(&[1], 1.0)])
        .unwrap_err();
    assert!(matches!(err.root(), Error::DuplicateInit), "{err}");
    let err = kv
        .broadcast(5, &[full(&[1], 1.0), full(&[1], 2.0)], &mut full(&[1], 0.0))
        .unwrap_err();
    assert!(matches!(err.root(), Error::DuplicateInit), "{err}");

    let mut wrong = full(&[3, 2], 0.0);
    let err = kv.pull(3, &mut wrong).unwrap_err();
    assert_eq!(
        err.to_string(),
        "local: pull of key 3: shape mismatch: output 0 has shape [3, 2] but [2, 3] was expected"
    );
    let err = kv.push(3, &full(&[4, 4], 1.0)).unwrap_err();
    assert!(
        err.to_string().contains("[4, 4]") && err.to_string().contains("[2, 3]"),
        "{err}"
    );
    let err = kv.push(3, &NDArray::ones(&[2, 3], DType::F16)).unwrap_err();
    assert!(matches!(err.root(), Error::DTypeMismatch { .. }), "{err}");
}

#[test]
fn a_rejected_call_changes_nothing() {
    let kv = kv();
    kv.init(&[1, 2], &[full(&[2], 1.0), full(&[3], 1.0)])
        .unwrap();
    // Key 2's out is wrong: the push of key 1 must not happen either.
    let mut outs = [full(&[2], 0.0), full(&[4], 0.0)];
    assert!(kv
        .pushpull(&[1, 2], &[full(&[2], 7.0), full(&[3], 7.0)], &mut outs)
        .is_err());
    assert_eq!(values(&outs[0]), vec![0.0, 0.0]);
    let mut out = full(&[2], 0.0);
    kv.pull(1, &mut out).unwrap();
    assert_eq!(values(&out), vec![1.0, 1.0]);
    // A failed broadcast leaves the key uninitialised.
    assert!(kv
        .broadcast(9, &full(&[2], 1.0), &mut full(&[5], 0.0))
        .is_err());
    kv.init(9, &full(&[2], 2.0)).unwrap();
}

#[test]
fn int_and_str_keys_do_not_mix_across_calls() {
    let kv = kv();
    kv.init("a", &full(&[1], 1.0)).unwrap();
    let err = kv.init(3, &full(&[1], 1.0)).unwrap_err();
    assert!(matches!(err, Error::MixedKeyTypes { .. }), "{err:?}");
    let mut out = full(&[1], 0.0);
    assert!(matches!(
        kv.pull(3, &mut out),
        Err(Error::MixedKeyTypes { .. })
    ));
    kv.pull("a", &mut out).unwrap();
}

#[test]
fn pull_casts_into_the_output_dtype() {
    let kv = kv();
    kv.init(1, &NDArray::from_vec(&[2], vec![0.5f32, 1.5]).unwrap())
        .unwrap();
    let mut half = NDArray::zeros(&[2], DType::F16);
    kv.pull(1, &mut half).unwrap();
    assert_eq!(half.dtype(), DType::F16);
    assert_eq!(half.to_f64_vec(), vec![0.5, 1.5]);
}

fn table() -> NDArray {
    let rows = NDArray::from_vec(&[2, 2], vec![1.0f32, 1.0, 3.0, 3.0]).unwrap();
    NDArray::row_sparse(&[4, 2], vec![1, 3], &rows).unwrap()
}

#[test]
fn row_sparse_pull_returns_the_unique_sorted_rows() {
    let kv = kv();
    kv.init("e", &table()).unwrap();
    let empty = NDArray::row_sparse(&[4, 2], vec![], &NDArray::zeros(&[0, 2], DType::F32)).unwrap();
    let mut outs = vec![empty.clone(), empty.clone()];
    let ids = NDArray::from_vec(&[3], vec![3i64, 0, 3]).unwrap();
    kv.row_sparse_pull("e", &mut outs, &ids).unwrap();
    for out in &outs {
        assert_eq!(out.as_row_sparse().unwrap().indices(), &[0, 3]);
        assert_eq!(values(out), vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0]);
    }
    // Float row ids are accepted, as MXNet casts them.
    let mut out = empty.clone();
    kv.row_sparse_pull(
        "e",
        &mut out,
        &NDArray::from_vec(&[1], vec![1.0f32]).unwrap(),
    )
    .unwrap();
    assert_eq!(out.as_row_sparse().unwrap().indices(), &[1]);

    let err = kv
        .row_sparse_pull("e", &mut full(&[4, 2], 0.0), &ids)
        .unwrap_err();
    assert!(err.to_string().contains("must be row-sparse"), "{err}");
    let bad = NDArray::from_vec(&[1], vec![4i64]).unwrap();
    assert!(kv.row_sparse_pull("e", &mut out, &bad).is_err());
    assert_eq!(
        out.as_row_sparse().unwrap().indices(),
        &[1],
        "a failed pull wrote"
    );

    // A dense pull of a row-sparse value gives the full value; a sparse out is skipped.
    let mut dense = full(&[4, 2], 9.0);
    kv.pull("e", &mut dense).unwrap();
    assert_eq!(values(&dense), vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 3.0, 3.0]);
    let mut skipped = empty.clone();
    kv.pull("e", &mut skipped).unwrap();
    assert_eq!(skipped, empty);
}

#[test]
fn row_sparse_pushes_sum_rows() {
    let kv = kv();
    kv.init("e", &table()).unwrap();
    let rows = NDArray::from_vec(&[1, 2], vec![5.0f32, 5.0]).unwrap();
    let g0 = NDArray::row_sparse(&[4, 2], vec![0], &rows).unwrap();
    let g1 = NDArray::row_sparse(&[4, 2], vec![0], &rows).unwrap();
    kv.push("e", &[g0, g1]).unwrap();
    let mut dense = full(&[4, 2], 0.0);
    kv.pull("e", &mut dense).unwrap();
    assert_eq!(
        values(&dense),
        vec![10.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    );
}

#[test]
fn an_updater_sees_dense_sums_after_row_sparse_ones() {
    let kv = kv();
    kv.init("w", &full(&[4, 2], 0.0)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    kv.set_updater(Box::new(move |_: &Key, grad: &NDArray, w: &mut NDArray| {
        log.lock().unwrap().push(grad.to_f64_vec());
        w.assign(grad)
    }))
    .unwrap();
    let rows = NDArray::from_vec(&[1, 2], vec![1.0f32, 2.0]).unwrap();
    let sparse = NDArray::row_sparse(&[4, 2], vec![1], &rows).unwrap();
    kv.push("w", &[sparse.clone(), sparse]).unwrap();
    // The merge buffer now holds a row-sparse sum; a dense multi-device push must not reuse it.
    kv.push("w", &[full(&[4, 2], 1.0), full(&[4, 2], 2.0)])
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], vec![0.0, 0.0, 2.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(seen[1], vec![3.0; 8]);
    let mut out = full(&[4, 2], 0.0);
    kv.pull("w", &mut out).unwrap();
    assert_eq!(values(&out), vec![3.0; 8]);
}

#[test]
fn row_ids_that_are_not_integers_are_errors() {
    let kv = kv();
    kv.init("e", &table()).unwrap();
    let mut out =
        NDArray::row_sparse(&[4, 2], vec![], &NDArray::zeros(&[0, 2], DType::F32)).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.5, -1.0, 4.0] {
        let ids = NDArray::from_vec(&[2], vec![0.0f32, bad]).unwrap();
        let err = kv.row_sparse_pull("e", &mut out, &ids).unwrap_err();
        assert!(err.to_string().contains("not an integer"), "{bad}: {err}");
        assert_eq!(out.as_row_sparse().unwrap().indices(), &[] as &[i64]);
    }
}

#[test]
fn gradient_compression_is_refused_and_states_need_an_optimizer() {
    let kv = kv();
    let params = [("type".to_string(), "2bit".to_string())]
        .into_iter()
        .collect();
    let err = kv.set_gradient_compression(&params).unwrap_err();
    assert!(matches!(
        err,
        Error::Unsupported {
            operation: "set_gradient_compression",
            ..
        }
    ));
    let path = std::env::temp_dir().join(format!("local-states-{}", std::process::id()));
    assert!(kv.save_optimizer_states(&path, false).is_err());
    assert!(!path.exists());
}

#[test]
fn big_arrays_reduce_in_parallel_to_the_same_bits() {
    let n = 300_000;
    let data: Vec<Vec<f32>> = (0..7)
        .map(|k| {
            (0..n)
                .map(|i| ((i * 31 + k * 17) % 1000) as f32 * 0.001 + k as f32 * 1e4)
                .collect()
        })
        .collect();
    let arrays: Vec<NDArray> = data
        .iter()
        .map(|d| NDArray::from_vec(&[n], d.clone()).unwrap())
        .collect();
    let mut results = Vec::new();
    for config in [
        ReduceConfig {
            threads: 1,
            bigarray_bound: usize::MAX,
        },
        ReduceConfig {
            threads: 4,
            bigarray_bound: 1000,
        },
    ] {
        let kv = LocalStore::with_config("local", config);
        kv.init(0, &NDArray::zeros(&[n], DType::F32)).unwrap();
        let mut out = NDArray::zeros(&[n], DType::F32);
        kv.pushpull(0, &arrays, &mut out).unwrap();
        results.push(out);
    }
    assert_eq!(results[0], results[1]);
}

#[test]
fn options_configure_the_reduction() {
    let request = kvstore_base::CreateRequest {
        name: "local".into(),
        options: [("reduction_nthreads".to_string(), "0".to_string())]
            .into_iter()
            .collect(),
    };
    assert!(LocalStore::from_request(&request).is_err());
    let err = kvstore_base::create_with(
        "local",
        [("bigarray_bound".to_string(), "ten".to_string())]
            .into_iter()
            .collect(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("bigarray_bound"), "{err}");
}

#[test]
fn threads_share_one_store() {
    let kv: Arc<dyn KVStoreBase> = Arc::from(kv());
    let keys: Vec<i32> = (0..8).collect();
    kv.init(&keys, &vec![full(&[64], 0.0); 8]).unwrap();
    std::thread::scope(|s| {
        for k in 0..8 {
            let kv = Arc::clone(&kv);
            s.spawn(move || {
                for round in 0..50 {
                    let mut out = full(&[64], 0.0);
                    kv.pushpull(
                        k,
                        &[full(&[64], round as f64), full(&[64], k as f64)],
                        &mut out,
                    )
                    .unwrap();
                    assert_eq!(values(&out)[0], (round + k) as f32);
                }
            });
        }
    });
}

#[test]
fn set_optimizer_applies_the_optimizer_to_the_summed_gradient() {
    use kvstore_base::OptimizerSpec;
    let spec = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("momentum", 0.9)
        .with("wd", 0.01)
        .with("rescale_grad", 0.5);
    let kv = kv();
    let w0 = NDArray::from_vec(&[4], vec![1.0f32, -2.0, 0.5, 3.0]).unwrap();
    kv.init("w", &w0).unwrap();
    kv.set_optimizer(&spec).unwrap();

    let mut direct = kvstore_optimizer::Updater::from_spec(&spec).unwrap();
    let mut expected = w0;
    for step in 0..5 {
        let grads: Vec<NDArray> = (0..3)
            .map(|d| NDArray::from_vec(&[4], vec![(step + d) as f32 * 0.25; 4]).unwrap())
            .collect();
        kv.push("w", &grads).unwrap();
        let mut sum = grads[0].clone();
        for g in &grads[1..] {
            sum.add_assign(g).unwrap();
        }
        direct.update(&Key::from("w"), &sum, &mut expected).unwrap();
    }
    let mut out = full(&[4], 0.0);
    kv.pull("w", &mut out).unwrap();
    assert_eq!(out, expected);

    // A second set_optimizer starts from fresh optimizer state, as MXNet's does.
    kv.set_optimizer(&OptimizerSpec::new("test")).unwrap();
    kv.push("w", &full(&[4], 1.0)).unwrap();
    let mut after = full(&[4], 0.0);
    kv.pull("w", &mut after).unwrap();
    let moved: Vec<f32> = values(&after)
        .iter()
        .zip(values(&out))
        .map(|(a, b)| a - b)
        .collect();
    assert_eq!(moved, vec![1.0; 4]);
}

#[test]
fn optimizer_states_files_are_checked() {
    use kvstore_base::OptimizerSpec;
    let kv = kv();
    kv.init(1, &full(&[2], 1.0)).unwrap();
    kv.set_optimizer(&OptimizerSpec::new("adam")).unwrap();
    kv.push(1, &full(&[2], 1.0)).unwrap();
    let dir = std::env::temp_dir().join(format!("local-states-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("states");
    kv.save_optimizer_states(&path, false).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    // Truncated and corrupted copies are refused with an error, never a panic.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(kv.load_optimizer_states(&path).is_err());
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    std::fs::write(&path, &flipped).unwrap();
    assert!(kv.load_optimizer_states(&path).is_err());
    std::fs::write(&path, &bytes).unwrap();
    kv.load_optimizer_states(&path).unwrap();

    let missing = dir.join("missing");
    let err = kv.load_optimizer_states(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn row_sparse_pushes_update_every_row_they_hold_lazily_as_mxnet() {
    // MXNet 1.9.1: local store, sgd lr 0.1 wd 0.1 (lazy), a ones (4, 2) weight, two devices
    // pushing row-sparse gradients: row 1 (+0.5 and -0.5: a zero sum) and row 2 (1.0). Row 1
    // is still in the sum, so it is decayed: [1, 0.99, 0.89, 1] per row.
    let kv = kv();
    kv.set_optimizer(
        &kvstore_base::OptimizerSpec::new("sgd")
            .with("learning_rate", 0.1)
            .with("wd", 0.1),
    )
    .unwrap();
    kv.init(3, &full(&[4, 2], 1.0)).unwrap();
    let rows = |v: Vec<f32>, n: usize| NDArray::from_vec(&[n, 2], v).unwrap();
    let a = NDArray::row_sparse(&[4, 2], vec![1, 2], &rows(vec![0.5, 0.5, 1.0, 1.0], 2)).unwrap();
    let b = NDArray::row_sparse(&[4, 2], vec![1], &rows(vec![-0.5, -0.5], 1)).unwrap();
    kv.push(3, &[a, b][..]).unwrap();
    let mut out = full(&[4, 2], 0.0);
    kv.pull(3, &mut out).unwrap();
    let row = |r: usize| values(&out)[2 * r];
    assert_eq!(
        [row(0), row(1), row(2), row(3)],
        [1.0, 0.99f32, 0.89f32, 1.0],
        "{:?}",
        values(&out)
    );
}

#[test]
fn a_row_sparse_weight_storing_every_row_is_updated_lazily_and_stays_row_sparse() {
    // MXNet 1.9.1, as above with the weight stored row-sparse (`tostype('row_sparse')`, every
    // row stored) and read with row_sparse_pull: [1, 0.99, 0.89, 1], rows [0, 1, 2, 3]. With
    // rows 2 and 3 missing from the weight, MXNet refuses the update ("SGDUpdate for RowSparse
    // weights is only implemented for RowSparse weights with all rows containing non-zeros").
    let sgd = kvstore_base::OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("wd", 0.1);
    let rows = |v: Vec<f32>, n: usize| NDArray::from_vec(&[n, 2], v).unwrap();
    let grads = || {
        [
            NDArray::row_sparse(&[4, 2], vec![1, 2], &rows(vec![0.5, 0.5, 1.0, 1.0], 2)).unwrap(),
            NDArray::row_sparse(&[4, 2], vec![1], &rows(vec![-0.5, -0.5], 1)).unwrap(),
        ]
    };
    let all_rows = NDArray::from_vec(&[4], vec![0i64, 1, 2, 3]).unwrap();
    let store = kv();
    store.set_optimizer(&sgd).unwrap();
    store
        .init(3, &full(&[4, 2], 1.0).retain_rows(&[0, 1, 2, 3]).unwrap())
        .unwrap();
    store.push(3, &grads()[..]).unwrap();
    let mut out = NDArray::row_sparse(&[4, 2], vec![], &rows(vec![], 0)).unwrap();
    store.row_sparse_pull(3, &mut out, &all_rows).unwrap();
    assert_eq!(out.as_row_sparse().unwrap().indices(), &[0, 1, 2, 3]);
    let row = |r: usize| values(&out)[2 * r];
    assert_eq!(
        [row(0), row(1), row(2), row(3)],
        [1.0, 0.99f32, 0.89f32, 1.0]
    );

    let partial = kv();
    partial.set_optimizer(&sgd).unwrap();
    partial
        .init(3, &full(&[4, 2], 1.0).retain_rows(&[0, 1]).unwrap())
        .unwrap();
    let err = partial.push(3, &grads()[..]).unwrap_err().to_string();
    assert!(err.contains("stores 2 of its 4 rows"), "{err}");
    partial.row_sparse_pull(3, &mut out, &all_rows).unwrap();
    assert_eq!(values(&out), vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
}

/// The values of a key's push are summed in the first one's storage type, as MXNet's
/// `CommCPU::Reduce` sums them: a dense first value makes the others dense (the grouped order
/// of dense sums), a row-sparse first value makes them row-sparse (the key stays row-sparse).
#[test]
fn a_push_mixing_dense_and_row_sparse_values_sums_in_the_first_ones_storage() {
    let kv = LocalStore::new();
    let every_row = |shape: &[usize]| full(shape, 1.0).to_row_sparse().unwrap();
    // Dense first: 1 + (1e8 + -1e8) = 1, where left to right gives (1 + 1e8) - 1e8 = 0.
    kv.init(0, &every_row(&[1, 1])).unwrap();
    let pushed = [
        full(&[1, 1], 1.0),
        full(&[1, 1], 1e8).to_row_sparse().unwrap(),
        full(&[1, 1], -1e8),
    ];
    kv.push(0, &pushed[..]).unwrap();
    let mut out = full(&[1, 1], 0.0);
    kv.pull(0, &mut out).unwrap();
    assert_eq!(values(&out), vec![1.0]);
    // Row-sparse first: the sum, and so the key, stays row-sparse.
    kv.init(1, &every_row(&[4, 2])).unwrap();
    let rows = NDArray::row_sparse(&[4, 2], vec![1], &full(&[1, 2], 1.0)).unwrap();
    kv.push(1, &[rows, full(&[4, 2], 0.0)][..]).unwrap();
    let (_, _, storage) = kv.value_info(&Key::from(1)).unwrap();
    assert_eq!(storage, kvstore_base::StorageType::RowSparse);
    let mut picked = full(&[4, 2], 0.0).to_row_sparse().unwrap();
    kv.row_sparse_pull(
        1,
        &mut picked,
        &NDArray::from_vec(&[1], vec![1i64]).unwrap(),
    )
    .unwrap();
    assert_eq!(
        values(&picked.to_dense()),
        vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    );
}

/// A pull skips the row-sparse outputs it ignores before looking at them, as MXNet drops them
/// first: one of another shape does not fail the pull of the others.
#[test]
fn a_pull_ignores_the_row_sparse_outputs_it_skips() {
    let kv = kv();
    kv.init(1, &full(&[4, 2], 1.0)).unwrap();
    let mut dense = full(&[4, 2], 0.0);
    let mut skipped = full(&[5, 2], 0.0).to_row_sparse().unwrap();
    kv.pull(&[1, 1][..], vec![&mut dense, &mut skipped])
        .unwrap();
    assert_eq!(values(&dense), vec![1.0; 8]);
}

/// An updater that asks its store about a key (from inside the push that runs it) gets no
/// answer rather than waiting for itself forever.
#[test]
fn an_updater_asking_its_store_for_a_value_gets_none_instead_of_a_hang() {
    let kv = Arc::new(LocalStore::new());
    kv.init(1, &full(&[2], 0.0)).unwrap();
    let weak = Arc::downgrade(&kv);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    kv.set_updater(Box::new(
        move |key: &Key, grad: &NDArray, weight: &mut NDArray| {
            let store = weak.upgrade().expect("the store lives");
            log.lock().unwrap().push(store.value_info(key).is_some());
            log.lock()
                .unwrap()
                .push(store.with_optimizer_updater(|u| u.is_some()));
            weight.add_assign(grad)
        },
    ))
    .unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let pusher = Arc::clone(&kv);
    std::thread::spawn(move || {
        let _ = done.send(pusher.push(1, &full(&[2], 1.0)));
    });
    let pushed = finished
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the push never returned");
    pushed.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![false, false]);
}
