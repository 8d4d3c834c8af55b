//! The updater's contract: errors, state persistence, schedules and dtypes.

use std::collections::BTreeMap;

use kvstore_base::{DType, Error, Key, NDArray, OptimizerSpec, ParamValue};
use kvstore_optimizer::{create, optimizer_names, RowSparse, Updater};

fn f32s(v: &[f32]) -> NDArray {
    NDArray::from_vec(&[v.len()], v.to_vec()).unwrap()
}

fn factor(step: i64, factor: f64, base_lr: f64) -> ParamValue {
    let mut m = BTreeMap::new();
    m.insert("type".to_string(), ParamValue::from("factor"));
    m.insert("step".to_string(), ParamValue::Int(step));
    m.insert("factor".to_string(), ParamValue::Float(factor));
    m.insert("base_lr".to_string(), ParamValue::Float(base_lr));
    ParamValue::Map(m)
}

#[test]
fn names_are_registered() {
    let names = optimizer_names();
    for n in [
        "sgd",
        "nag",
        "adam",
        "adamw",
        "adagrad",
        "adadelta",
        "rmsprop",
        "signum",
        "ftrl",
        "lamb",
        "lars",
        "test",
        "adamax",
        "nadam",
        "ftml",
        "dcasgd",
        "ccsgd",
        "groupadagrad",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
        create(&OptimizerSpec::new(n)).unwrap();
    }
}

#[test]
fn unknown_optimizer_lists_the_known_ones() {
    let err = Updater::from_spec(&OptimizerSpec::new("adamax2")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InvalidArgument(_)), "{msg}");
    assert!(
        msg.contains("\"adamax2\"") && msg.contains("sgd") && msg.contains("lamb"),
        "{msg}"
    );
    // Names are case-insensitive.
    let spec = OptimizerSpec {
        name: "SGD".into(),
        params: BTreeMap::new(),
    };
    assert_eq!(create(&spec).unwrap().name(), "sgd");
}

#[test]
fn bad_hyper_parameters_are_named() {
    let e = create(&OptimizerSpec::new("sgd").with("momentun", 0.9))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"momentun\"") && e.contains("momentum"), "{e}");
    let e = create(&OptimizerSpec::new("adam").with("beta1", "high"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"beta1\"") && e.contains("number"), "{e}");
    let e = create(&OptimizerSpec::new("sgd").with("multi_precision", 1i64))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"multi_precision\"") && e.contains("bool"),
        "{e}"
    );
    let e = create(&OptimizerSpec::new("sgd").with("lr_scheduler", factor(0, 0.5, 1.0)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr_scheduler") && e.contains("\"step\""), "{e}");
    let e = create(&OptimizerSpec::new("sgd").with("param_idx2name", 3i64))
        .unwrap_err()
        .to_string();
    assert!(e.contains("param_idx2name") && e.contains("dict"), "{e}");
    let e = create(&OptimizerSpec::new("sgd").with("learning_rate", f64::INFINITY))
        .unwrap_err()
        .to_string();
    assert!(e.contains("learning_rate") && e.contains("finite"), "{e}");
    for (name, bad) in [("lr_mult", f64::INFINITY), ("wd_mult", f64::NAN)] {
        let mut mults = BTreeMap::new();
        mults.insert("w".to_string(), ParamValue::Float(bad));
        let e = create(&OptimizerSpec::new("sgd").with(name, ParamValue::Map(mults)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(name) && e.contains("\"w\"") && e.contains("finite"),
            "{e}"
        );
    }
}

#[test]
fn factor_scheduler_example_from_mxnet() {
    let spec = OptimizerSpec::new("sgd").with("lr_scheduler", factor(2, 0.5, 1.0));
    let mut up = Updater::from_spec(&spec).unwrap();
    let mut w = f32s(&[0.0]);
    let mut seen = Vec::new();
    for _ in 0..6 {
        up.update(&Key::from(0), &f32s(&[1.0]), &mut w).unwrap();
        seen.push(w.to_vec::<f32>().unwrap()[0]);
    }
    assert_eq!(seen, vec![-1.0, -2.0, -2.5, -3.0, -3.25, -3.5]);
    assert_eq!(up.optimizer().base().num_update(), 6);
}

#[test]
fn test_optimizer_adds_rescaled_gradient() {
    let mut up = Updater::from_spec(&OptimizerSpec::new("test").with("rescale_grad", 0.5)).unwrap();
    let mut w = f32s(&[1.0, 2.0]);
    up.update(&Key::from("w"), &f32s(&[2.0, 4.0]), &mut w)
        .unwrap();
    assert_eq!(w.to_vec::<f32>().unwrap(), vec![2.0, 4.0]);
    assert_eq!(up.state_arrays(&Key::from("w")).unwrap()[0], w);
}

#[test]
fn lr_mult_applies_by_key_and_by_name() {
    let mut mults = BTreeMap::new();
    mults.insert("3".to_string(), ParamValue::Float(2.0));
    mults.insert("b_weight".to_string(), ParamValue::Float(3.0));
    let mut names = BTreeMap::new();
    names.insert("4".to_string(), ParamValue::from("b_weight"));
    names.insert("5".to_string(), ParamValue::from("b_bias"));
    let spec = OptimizerSpec::new("sgd")
        .with("learning_rate", 1.0)
        .with("wd", 0.5)
        .with("lr_mult", ParamValue::Map(mults))
        .with("param_idx2name", ParamValue::Map(names));
    let mut up = Updater::from_spec(&spec).unwrap();
    let g = f32s(&[1.0]);
    let mut w = f32s(&[0.0]);
    up.update(&Key::from(3), &g, &mut w).unwrap();
    assert_eq!(w.to_vec::<f32>().unwrap(), vec![-2.0]);
    let mut w = f32s(&[0.0]);
    up.update(&Key::from(4), &g, &mut w).unwrap();
    assert_eq!(w.to_vec::<f32>().unwrap(), vec![-3.0]);
    // A bias gets no weight decay once names are known: w = 1 − lr·g.
    let mut w = f32s(&[1.0]);
    up.update(&Key::from(5), &g, &mut w).unwrap();
    assert_eq!(w.to_vec::<f32>().unwrap(), vec![0.0]);
    // Key 6 has no name, so it keeps wd: w = 1 − 0.5·1 − 1.
    let mut w = f32s(&[1.0]);
    up.update(&Key::from(6), &g, &mut w).unwrap();
    assert_eq!(w.to_vec::<f32>().unwrap(), vec![-0.5]);
}

#[test]
fn shape_and_dtype_mismatches_name_the_key_and_leave_the_weight() {
    let mut up = Updater::from_spec(&OptimizerSpec::new("adam")).unwrap();
    let mut w = NDArray::ones(&[2, 3], DType::F32);
    let err = up
        .update(
            &Key::from("emb"),
            &NDArray::ones(&[3, 2], DType::F32),
            &mut w,
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("\"emb\"") && msg.contains("[2, 3]") && msg.contains("[3, 2]"),
        "{msg}"
    );
    assert!(matches!(err.root(), Error::ShapeMismatch { .. }));
    assert_eq!(w, NDArray::ones(&[2, 3], DType::F32));
    assert!(up.state_arrays(&Key::from("emb")).is_none());

    let err = up
        .update(&Key::from(1), &NDArray::ones(&[2, 3], DType::F64), &mut w)
        .unwrap_err();
    assert!(matches!(err.root(), Error::DTypeMismatch { .. }), "{err}");
    assert_eq!(err.key(), Some(&Key::from(1)));

    let mut ints = NDArray::ones(&[2], DType::I32);
    let err = up
        .update(&Key::from(2), &NDArray::ones(&[2], DType::I32), &mut ints)
        .unwrap_err()
        .to_string();
    assert!(err.contains("int32"), "{err}");
    assert_eq!(ints, NDArray::ones(&[2], DType::I32));
}

fn run(up: &mut Updater, steps: std::ops::Range<usize>, w: &mut NDArray) {
    for s in steps {
        let g: Vec<f32> = (0..6)
            .map(|i| ((s * 7 + i * 3) % 5) as f32 * 0.3 - 0.6)
            .collect();
        let g = NDArray::from_vec(&[2, 3], g).unwrap().astype(w.dtype());
        up.update(&Key::from("w"), &g, w).unwrap();
    }
}

#[test]
fn save_and_load_resume_exactly() {
    let specs = [
        OptimizerSpec::new("adam")
            .with("learning_rate", 0.1)
            .with("lr_scheduler", factor(2, 0.5, 0.1)),
        OptimizerSpec::new("sgd")
            .with("momentum", 0.9)
            .with("multi_precision", true),
        OptimizerSpec::new("lars")
            .with("momentum", 0.9)
            .with("lr_scheduler", factor(1, 0.9, 0.1)),
        OptimizerSpec::new("rmsprop").with("centered", true),
        // Nadam's momentum schedule is run-time state of the optimizer.
        OptimizerSpec::new("nadam").with("learning_rate", 0.01),
        OptimizerSpec::new("ftml").with("wd", 0.01),
        OptimizerSpec::new("dcasgd")
            .with("momentum", 0.9)
            .with("lamda", 0.5),
        OptimizerSpec::new("groupadagrad").with("learning_rate", 0.1),
        OptimizerSpec::new("ccsgd").with("momentum", 0.9),
    ];
    for spec in specs {
        for dtype in [DType::F32, DType::F16] {
            // Epsilons of 1e-8 are 0 in float16: use f32 master weights.
            let spec = match (dtype, spec.name.as_str()) {
                (DType::F16, "adam" | "rmsprop" | "nadam" | "ftml") => {
                    spec.clone().with("multi_precision", true)
                }
                _ => spec.clone(),
            };
            let w0 = NDArray::from_vec(&[2, 3], vec![0.5f32, -0.25, 1.0, 0.0, 2.0, -1.5])
                .unwrap()
                .astype(dtype);
            let mut straight = Updater::from_spec(&spec).unwrap();
            let mut w_straight = w0.clone();
            run(&mut straight, 0..5, &mut w_straight);

            let mut first = Updater::from_spec(&spec).unwrap();
            let mut w = w0.clone();
            run(&mut first, 0..2, &mut w);
            let bytes = first.save_states(true).unwrap();
            let mut resumed = Updater::from_spec(&OptimizerSpec::new("test")).unwrap();
            resumed.load_states(&bytes).unwrap();
            assert_eq!(resumed.optimizer().name(), spec.name);
            run(&mut resumed, 2..5, &mut w);
            assert!(w.to_f64_vec().iter().all(|x| x.is_finite()));
            assert_eq!(w, w_straight, "{} {dtype}", spec.name);
        }
    }
}

#[test]
fn states_without_the_optimizer_keep_the_current_one() {
    let spec = OptimizerSpec::new("sgd").with("momentum", 0.9);
    let mut a = Updater::from_spec(&spec).unwrap();
    let mut w = NDArray::ones(&[2, 3], DType::F64);
    run(&mut a, 0..2, &mut w);
    let bytes = a.save_states(false).unwrap();
    let mut b = Updater::from_spec(&spec).unwrap();
    b.load_states(&bytes).unwrap();
    assert_eq!(
        b.state_arrays(&Key::from("w")),
        a.state_arrays(&Key::from("w"))
    );
    let mut wa = w.clone();
    run(&mut a, 2..4, &mut wa);
    run(&mut b, 2..4, &mut w);
    assert_eq!(w, wa);
    // A state that does not fit the optimizer is reported at the next update.
    let mut adam = Updater::from_spec(&OptimizerSpec::new("adam")).unwrap();
    adam.load_states(&bytes).unwrap();
    let err = adam
        .update(&Key::from("w"), &NDArray::ones(&[2, 3], DType::F64), &mut w)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"w\"") && err.contains("arrays"), "{err}");
}

#[test]
fn corrupt_truncated_and_foreign_files_are_errors() {
    let mut up = Updater::from_spec(&OptimizerSpec::new("adam")).unwrap();
    let mut w = NDArray::ones(&[2, 3], DType::F32);
    run(&mut up, 0..1, &mut w);
    let good = up.save_states(true).unwrap();
    let before = up.save_states(true).unwrap();

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let e = up.load_states(&flipped).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");

    for cut in [0, 5, 12, 20, good.len() / 2, good.len() - 1] {
        let e = up.load_states(&good[..cut]).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "cut {cut}: {e}");
    }

    let e = up
        .load_states(b"\x80\x04\x95pickle")
        .unwrap_err()
        .to_string();
    assert!(e.contains("magic") && e.contains("pickle"), "{e}");

    let mut future = good.clone();
    future[8] = 9;
    let e = up.load_states(&future).unwrap_err().to_string();
    assert!(e.contains("version 9"), "{e}");

    // Every failed load left the updater as it was.
    assert_eq!(up.save_states(true).unwrap(), before);
    up.load_states(&good).unwrap();
}

#[test]
fn half_precision_weights() {
    for dtype in [DType::F16, DType::BF16] {
        // Without multi_precision the state is 16-bit; with it, an f32 master copy is kept.
        let mut plain =
            Updater::from_spec(&OptimizerSpec::new("sgd").with("momentum", 0.9)).unwrap();
        let mut w = NDArray::ones(&[4], dtype);
        plain
            .update(&Key::from(0), &NDArray::ones(&[4], dtype), &mut w)
            .unwrap();
        assert_eq!(w.dtype(), dtype);
        assert_eq!(plain.state_arrays(&Key::from(0)).unwrap()[0].dtype(), dtype);
        assert!(plain.master_weight(&Key::from(0)).is_none());

        let spec = OptimizerSpec::new("sgd")
            .with("learning_rate", 1e-4)
            .with("multi_precision", true);
        let mut mp = Updater::from_spec(&spec).unwrap();
        let mut w = NDArray::ones(&[4], dtype);
        for _ in 0..3 {
            mp.update(&Key::from(0), &NDArray::ones(&[4], dtype), &mut w)
                .unwrap();
        }
        let master = mp.master_weight(&Key::from(0)).unwrap();
        assert_eq!(master.dtype(), DType::F32);
        // 1 − 3e-4 is kept exactly in f32, while each 16-bit step alone would round away.
        assert!((master.to_f64_vec()[0] - (1.0 - 3e-4)).abs() < 1e-6);
        assert_eq!(w, master.astype(dtype));
    }
}

#[test]
fn updater_serves_as_a_store_updater() {
    let mut f = Updater::from_spec(&OptimizerSpec::new("sgd").with("learning_rate", 0.5))
        .unwrap()
        .into_store_updater();
    let mut w = f32s(&[1.0]);
    f(&Key::from(1), &f32s(&[1.0]), &mut w).unwrap();
    assert_eq!(w.to_vec::<f32>().unwrap(), vec![0.5]);
}

#[test]
fn a_failed_update_leaves_weight_and_state_of_a_trained_key_untouched() {
    let spec = OptimizerSpec::new("adam").with("learning_rate", 0.1);
    let mut up = Updater::from_spec(&spec).unwrap();
    let key = Key::from(7);
    let mut w = f32s(&[1.0, -2.0, 3.0]);
    for _ in 0..3 {
        up.update(&key, &f32s(&[0.5, 0.25, -1.0]), &mut w).unwrap();
    }
    let (w_before, s_before) = (w.clone(), up.state_arrays(&key).unwrap().to_vec());
    // Wrong dtype, wrong shape, and (another updater's) state that does not fit.
    assert!(up
        .update(&key, &NDArray::ones(&[3], DType::F64), &mut w)
        .is_err());
    assert!(up.update(&key, &f32s(&[1.0, 2.0]), &mut w).is_err());
    let mut w2 = NDArray::ones(&[2], DType::F32);
    assert!(up.update(&key, &f32s(&[1.0, 2.0]), &mut w2).is_err());
    assert_eq!(w, w_before);
    assert_eq!(w2, NDArray::ones(&[2], DType::F32));
    assert_eq!(up.state_arrays(&key).unwrap(), &s_before[..]);
    assert_eq!(up.optimizer().base().update_count(&key), Some(3));
}

/// The same values as `[rows, cols]` row-major `v`, stored column-major.
fn column_major(v: &[f64], rows: usize, cols: usize, dtype: DType) -> NDArray {
    let mut t = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    let a = ndarray::Array2::from_shape_vec((cols, rows), t)
        .unwrap()
        .reversed_axes();
    NDArray::from(a).astype(dtype)
}

#[test]
fn other_layouts_and_row_sparse_gradients_update_like_dense_ones() {
    // The updater works in place on standard-layout arrays and on copies otherwise: both
    // must give the same bits. A row-sparse gradient too, for optimizers that apply it as
    // the dense array it stands for.
    let (rows, cols) = (5, 7);
    let values = |seed: usize, zero_rows: &[usize]| -> Vec<f64> {
        (0..rows * cols)
            .map(|i| {
                if zero_rows.contains(&(i / cols)) {
                    0.0
                } else {
                    ((i * 37 + seed * 11) % 23) as f64 / 23.0 - 0.4
                }
            })
            .collect()
    };
    for name in optimizer_names() {
        for (dtype, mp) in [
            (DType::F32, false),
            (DType::F64, false),
            (DType::F16, false),
            (DType::BF16, true),
        ] {
            let spec = OptimizerSpec::new(name)
                .with("learning_rate", 0.05)
                .with("momentum", 0.9)
                .with("multi_precision", mp);
            let spec = match name {
                "sgd" | "nag" | "signum" | "lars" => spec,
                _ => OptimizerSpec::new(name)
                    .with("learning_rate", 0.05)
                    .with("multi_precision", mp),
            };
            let dense = |v: &[f64]| {
                NDArray::from_vec(&[rows, cols], v.to_vec())
                    .unwrap()
                    .astype(dtype)
            };
            let w0 = values(0, &[]);
            let mut reference = Updater::from_spec(&spec).unwrap();
            let mut w_ref = dense(&w0);
            let mut others: Vec<(Updater, NDArray)> = (0..3)
                .map(|i| {
                    let w = if i == 0 {
                        column_major(&w0, rows, cols, dtype)
                    } else {
                        dense(&w0)
                    };
                    (Updater::from_spec(&spec).unwrap(), w)
                })
                .collect();
            assert_eq!(others[0].1.to_f64_vec(), w_ref.to_f64_vec());
            if dtype == DType::F32 {
                assert!(
                    others[0].1.as_slice::<f32>().is_none(),
                    "not standard layout"
                );
            }
            for step in 1..4 {
                let g = values(step, &[1, 3]);
                reference
                    .update(&Key::from(0), &dense(&g), &mut w_ref)
                    .unwrap();
                let grads = [
                    dense(&g),
                    column_major(&g, rows, cols, dtype),
                    dense(&g).to_row_sparse().unwrap(),
                ];
                let as_dense = matches!(
                    reference.optimizer().row_sparse(&Key::from(0), mp),
                    Ok(RowSparse::Dense)
                );
                let n = if as_dense { 3 } else { 2 };
                for ((up, w), g) in others.iter_mut().zip(&grads).take(n) {
                    up.update(&Key::from(0), g, w).unwrap();
                    let bits = |a: &NDArray| -> Vec<u64> {
                        a.to_f64_vec().iter().map(|x| x.to_bits()).collect()
                    };
                    assert_eq!(bits(w), bits(&w_ref), "{name} {dtype} mp={mp}");
                    let states = up.state_arrays(&Key::from(0)).unwrap();
                    let ref_states = reference.state_arrays(&Key::from(0)).unwrap();
                    for (s, r) in states.iter().zip(ref_states) {
                        assert_eq!(bits(s), bits(r), "{name} {dtype} state");
                    }
                    let master = up.master_weight(&Key::from(0)).map(bits);
                    let ref_master = reference.master_weight(&Key::from(0)).map(bits);
                    assert_eq!(master, ref_master, "{name} {dtype} master");
                }
            }
        }
    }
}

#[test]
fn groupadagrad_keeps_one_history_value_per_row_of_2d_weights() {
    let spec = OptimizerSpec::new("groupadagrad")
        .with("learning_rate", 0.5)
        .with("eps", 0.0);
    let mut up = Updater::from_spec(&spec).unwrap();
    let mut w = NDArray::from_vec(&[2, 2], vec![1.0f64, 1.0, 1.0, 1.0]).unwrap();
    let g = NDArray::from_vec(&[2, 2], vec![3.0f64, 4.0, 1.0, -1.0]).unwrap();
    up.update(&Key::from(0), &g, &mut w).unwrap();
    // Row 0: h = (9 + 16)/2 = 12.5; row 1: h = 1.
    let h = &up.state_arrays(&Key::from(0)).unwrap()[0];
    assert_eq!(h.shape(), &[2, 1]);
    assert_eq!(h.to_f64_vec(), vec![12.5, 1.0]);
    let r = 12.5f64.sqrt();
    assert_eq!(
        w.to_f64_vec(),
        vec![1.0 - 0.5 * 3.0 / r, 1.0 - 0.5 * 4.0 / r, 0.5, 1.5]
    );
    // The row-shaped state survives a save and a load.
    let bytes = up.save_states(true).unwrap();
    let mut resumed = Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap();
    resumed.load_states(&bytes).unwrap();
    let mut w2 = w.clone();
    up.update(&Key::from(0), &g, &mut w).unwrap();
    resumed.update(&Key::from(0), &g, &mut w2).unwrap();
    assert_eq!(w, w2);

    // Weights that are not 2-D are refused, naming the key; nothing changes.
    let mut flat = NDArray::ones(&[4], DType::F32);
    let err = up
        .update(&Key::from("v"), &NDArray::ones(&[4], DType::F32), &mut flat)
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("\"v\"") && msg.contains("2-D"), "{msg}");
    assert_eq!(flat, NDArray::ones(&[4], DType::F32));
    assert!(up.state_arrays(&Key::from("v")).is_none());
    // A state of another shape (another optimizer's) is reported at the update.
    let mut adagrad = Updater::from_spec(&OptimizerSpec::new("adagrad")).unwrap();
    let mut w3 = NDArray::ones(&[2, 2], DType::F64);
    adagrad.update(&Key::from(0), &g, &mut w3).unwrap();
    up.load_states(&adagrad.save_states(false).unwrap())
        .unwrap();
    let err = up.update(&Key::from(0), &g, &mut w3).unwrap_err();
    assert!(matches!(err.root(), Error::ShapeMismatch { .. }), "{err}");

    // Weight decay is not supported: a key that has some is refused at its update, changing
    // nothing; one whose wd_mult is 0 is updated (MXNet asserts per key).
    let spec = OptimizerSpec::new("groupadagrad").with("wd", 0.1).with(
        "wd_mult",
        ParamValue::Map([("b".to_string(), ParamValue::Float(0.0))].into()),
    );
    let mut decayed = Updater::from_spec(&spec).unwrap();
    let mut w = NDArray::ones(&[2, 2], DType::F64);
    let e = decayed
        .update(&Key::from("w"), &g, &mut w)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("groupadagrad") && e.contains("weight decay"),
        "{e}"
    );
    assert_eq!(w, NDArray::ones(&[2, 2], DType::F64));
    assert!(decayed.state_arrays(&Key::from("w")).is_none());
    decayed.update(&Key::from("b"), &g, &mut w).unwrap();
    assert_ne!(w, NDArray::ones(&[2, 2], DType::F64));
}

#[test]
fn dcasgd_starts_from_a_copy_of_the_weight() {
    for (momentum, arrays) in [(0.0, 1), (0.9, 2)] {
        let spec = OptimizerSpec::new("dcasgd")
            .with("learning_rate", 0.5)
            .with("momentum", momentum);
        let mut up = Updater::from_spec(&spec).unwrap();
        let mut w = f32s(&[1.0, -2.0]);
        up.update(&Key::from(0), &f32s(&[1.0, 1.0]), &mut w)
            .unwrap();
        // w − w_prev is 0 on the first update: a plain SGD step.
        assert_eq!(w, f32s(&[0.5, -2.5]));
        let states = up.state_arrays(&Key::from(0)).unwrap();
        assert_eq!(states.len(), arrays);
        assert_eq!(states[arrays - 1], f32s(&[1.0, -2.0]));
        // The second update compensates the delay: −lr·lamda·g²·(w − w_prev) = +0.01.
        up.update(&Key::from(0), &f32s(&[1.0, 1.0]), &mut w)
            .unwrap();
        let step = -0.5 * (1.0 + 0.04 * (-0.5f32)) + momentum as f32 * -0.5;
        assert_eq!(w, f32s(&[0.5 + step, -2.5 + step]), "momentum {momentum}");
    }
}

#[test]
fn ccsgd_is_sgd_under_its_own_name() {
    let spec = |name: &str| {
        OptimizerSpec::new(name)
            .with("momentum", 0.9)
            .with("wd", 0.1)
    };
    let (mut cc, mut sgd) = (
        Updater::from_spec(&spec("ccsgd")).unwrap(),
        Updater::from_spec(&spec("sgd")).unwrap(),
    );
    assert_eq!(cc.optimizer().name(), "ccsgd");
    let (mut a, mut b) = (
        NDArray::ones(&[2, 3], DType::F32),
        NDArray::ones(&[2, 3], DType::F32),
    );
    run(&mut cc, 0..3, &mut a);
    run(&mut sgd, 0..3, &mut b);
    assert_eq!(a, b);
    assert_eq!(
        cc.state_arrays(&Key::from("w")),
        sgd.state_arrays(&Key::from("w"))
    );
}

/// A row-sparse `[rows, cols]` gradient holding `value` in each of `ids`.
fn rows_of(rows: usize, cols: usize, ids: &[i64], value: f32, dtype: DType) -> NDArray {
    let stored = NDArray::full(&[ids.len(), cols], f64::from(value), dtype);
    NDArray::row_sparse(&[rows, cols], ids.to_vec(), &stored).unwrap()
}

fn f32_rows(a: &NDArray, cols: usize) -> Vec<Vec<f32>> {
    a.to_vec::<f32>()
        .unwrap()
        .chunks(cols)
        .map(<[f32]>::to_vec)
        .collect()
}

/// Two updates of a ones(4, 2) weight with a gradient of 0.5 in row 1, then in row 2.
fn rows_one_then_two(spec: &OptimizerSpec) -> (Updater, NDArray) {
    let mut up = Updater::from_spec(spec).unwrap();
    let mut w = NDArray::ones(&[4, 2], DType::F32);
    for row in [1, 2] {
        up.update(
            &Key::from(0),
            &rows_of(4, 2, &[row], 0.5, DType::F32),
            &mut w,
        )
        .unwrap();
    }
    (up, w)
}

#[test]
fn lazy_updates_touch_only_the_gradients_rows() {
    // MXNet 1.9.1's results for the same updates.
    let base = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("wd", 0.1);
    for spec in [base.clone().with("momentum", 0.9), base.clone()] {
        let (up, w) = rows_one_then_two(&spec);
        let want = [1.0, 0.94, 0.94, 1.0];
        for (row, want) in f32_rows(&w, 2).iter().zip(want) {
            assert_eq!(row, &[want, want], "{spec:?}");
        }
        if let Some(mom) = up.state_arrays(&Key::from(0)).and_then(<[NDArray]>::first) {
            // Row 1's momentum stayed as its update left it.
            let mom = f32_rows(mom, 2);
            assert_eq!(mom[0], [0.0, 0.0]);
            assert_eq!(mom[1], [-0.060_000_002_f32; 2]);
            assert_eq!(mom[3], [0.0, 0.0]);
        }
    }
    // Adam's bias correction counts both updates of the key.
    let (up, w) = rows_one_then_two(
        &OptimizerSpec::new("adam")
            .with("learning_rate", 0.1)
            .with("wd", 0.1),
    );
    let w = f32_rows(&w, 2);
    assert_eq!((w[0][0], w[3][1]), (1.0, 1.0));
    assert_eq!(w[1], [0.899_999_4_f32; 2]);
    assert_eq!(w[2], [0.925_585_87_f32; 2]);
    assert_eq!(up.update_count(&Key::from(0)), Some(2));
    // The standard update with lazy_update false changes every row.
    let (_, w) = rows_one_then_two(&base.with("momentum", 0.9).with("lazy_update", false));
    let w = f32_rows(&w, 2);
    assert_eq!(
        [w[0][0], w[1][0], w[2][0], w[3][0]],
        [0.971_100_03, 0.8766, 0.9211, 0.971_100_03]
    );
}

#[test]
fn a_gradient_without_rows_counts_the_update_and_changes_nothing_lazily() {
    let key = Key::from("emb");
    let w0 = NDArray::from_vec(&[3, 2], vec![0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6]).unwrap();
    let empty = rows_of(3, 2, &[], 0.5, DType::F32);
    for name in ["sgd", "nag", "adam", "adagrad", "groupadagrad", "lars"] {
        let spec = OptimizerSpec::new(name)
            .with("learning_rate", 0.1)
            .with("momentum", 0.9);
        let spec = match name {
            "sgd" | "lars" => spec.with("wd", 0.1),
            _ => OptimizerSpec::new(name).with("learning_rate", 0.1),
        };
        let mut up = Updater::from_spec(&spec).unwrap();
        let mut w = w0.clone();
        up.update(&key, &empty, &mut w).unwrap();
        assert_eq!(w, w0, "{name}");
        assert_eq!(up.update_count(&key), Some(1), "{name}");
        for s in up.state_arrays(&key).unwrap() {
            assert!(s.to_f64_vec().iter().all(|&x| x == 0.0), "{name}");
        }
    }
    // Adam's next update corrects its bias for t = 2 (MXNet 1.9.1's values).
    let mut up = Updater::from_spec(
        &OptimizerSpec::new("adam")
            .with("learning_rate", 0.1)
            .with("wd", 0.1),
    )
    .unwrap();
    let mut w = w0.clone();
    up.update(&key, &empty, &mut w).unwrap();
    up.update(&key, &rows_of(3, 2, &[1], 0.5, DType::F32), &mut w)
        .unwrap();
    assert_eq!(
        w.to_vec::<f32>().unwrap(),
        [0.1, 0.2, 0.225_585_88, 0.325_585_87, 0.5, 0.6]
    );
    // The standard update without momentum still decays every row.
    let spec = OptimizerSpec::new("sgd")
        .with("learning_rate", 0.1)
        .with("wd", 0.1)
        .with("lazy_update", false);
    let mut up = Updater::from_spec(&spec).unwrap();
    let mut w = w0.clone();
    up.update(&key, &empty, &mut w).unwrap();
    assert_eq!(
        w.to_vec::<f32>().unwrap(),
        [0.099, 0.198, 0.297_000_02, 0.396, 0.495, 0.594_000_04]
    );
}

#[test]
fn sparse_adagrad_refuses_weight_decay_before_changing_anything() {
    let spec = OptimizerSpec::new("adagrad")
        .with("learning_rate", 0.1)
        .with("wd", 0.1)
        .with("wd_mult", {
            let mut m = BTreeMap::new();
            m.insert("free".to_string(), ParamValue::Float(0.0));
            ParamValue::Map(m)
        });
    let mut up = Updater::from_spec(&spec).unwrap();
    let grad = rows_of(3, 2, &[0, 2], 0.5, DType::F32);
    // A trained key: a dense update first.
    let key = Key::from(4);
    let mut w = NDArray::ones(&[3, 2], DType::F32);
    up.update(&key, &NDArray::full(&[3, 2], 0.5, DType::F32), &mut w)
        .unwrap();
    let (w_before, s_before) = (w.clone(), up.state_arrays(&key).unwrap().to_vec());
    let err = up.update(&key, &grad, &mut w).unwrap_err();
    assert_eq!(err.key(), Some(&key));
    assert!(matches!(err.root(), Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("weight decay"), "{err}");
    assert_eq!(w, w_before);
    assert_eq!(up.state_arrays(&key).unwrap(), &s_before[..]);
    assert_eq!(up.update_count(&key), Some(1));
    // A new key gets no state and no count.
    let mut fresh = NDArray::ones(&[3, 2], DType::F32);
    assert!(up.update(&Key::from(5), &grad, &mut fresh).is_err());
    assert_eq!(fresh, NDArray::ones(&[3, 2], DType::F32));
    assert!(up.state_arrays(&Key::from(5)).is_none());
    assert_eq!(up.update_count(&Key::from(5)), None);
    // Without weight decay for the key, the rows are updated.
    let mut w = NDArray::ones(&[3, 2], DType::F32);
    up.update(&Key::from("free"), &grad, &mut w).unwrap();
    let rows = f32_rows(&w, 2);
    assert_eq!(rows[1], [1.0, 1.0]);
    assert!(rows[0][0] < 1.0 && rows[2][1] < 1.0);
}

#[test]
fn lazy_updates_with_a_master_copy_keep_other_rows_of_weight_master_and_state() {
    let spec = OptimizerSpec::new("adam")
        .with("learning_rate", 0.01)
        .with("multi_precision", true);
    let mut up = Updater::from_spec(&spec).unwrap();
    let key = Key::from(0);
    let w0: Vec<f64> = (0..8).map(|i| f64::from(i) * 0.3 - 1.0).collect();
    let mut w = NDArray::from_vec(&[4, 2], w0.clone())
        .unwrap()
        .astype(DType::F16);
    let before = w.to_f64_vec();
    for ids in [[1, 3], [0, 1]] {
        up.update(&key, &rows_of(4, 2, &ids, 0.25, DType::F16), &mut w)
            .unwrap();
    }
    let after = w.to_f64_vec();
    let master = up.master_weight(&key).unwrap().to_f64_vec();
    // Row 2 never had a gradient: weight, master copy and state are as they started.
    assert_eq!(after[4..6], before[4..6]);
    assert_eq!(master[4..6], before[4..6]);
    for s in up.state_arrays(&key).unwrap() {
        assert_eq!(s.to_f64_vec()[4..6], [0.0, 0.0]);
    }
    for row in [0, 1, 3] {
        assert_ne!(after[2 * row], before[2 * row], "row {row}");
    }
    // The weight is the master copy cast.
    let cast = NDArray::from_vec(&[4, 2], master)
        .unwrap()
        .astype(DType::F16);
    assert_eq!(cast.to_f64_vec(), after);
}

#[test]
fn optimizers_say_how_they_take_row_sparse_gradients() {
    let key = Key::from(0);
    let mode = |spec: OptimizerSpec, mp: bool| create(&spec).unwrap().row_sparse(&key, mp).unwrap();
    let sgd = || OptimizerSpec::new("sgd").with("momentum", 0.9);
    assert_eq!(mode(sgd(), false), RowSparse::Lazy);
    assert_eq!(mode(sgd(), true), RowSparse::Dense);
    assert_eq!(
        mode(sgd().with("lazy_update", false), false),
        RowSparse::Dense
    );
    assert_eq!(mode(OptimizerSpec::new("sgd"), true), RowSparse::Rows);
    assert_eq!(
        mode(OptimizerSpec::new("sgd").with("lazy_update", false), false),
        RowSparse::Rows
    );
    assert_eq!(
        mode(OptimizerSpec::new("adam").with("lazy_update", false), true),
        RowSparse::Rows
    );
    assert_eq!(mode(OptimizerSpec::new("lars"), true), RowSparse::Rows);
    assert_eq!(mode(OptimizerSpec::new("nag"), false), RowSparse::Lazy);
    assert_eq!(mode(OptimizerSpec::new("nag"), true), RowSparse::Dense);
    assert_eq!(
        mode(OptimizerSpec::new("nag").with("momentum", 0.9), false),
        RowSparse::Dense
    );
    for name in ["adam", "adagrad", "groupadagrad", "lars"] {
        assert_eq!(
            mode(OptimizerSpec::new(name), false),
            RowSparse::Lazy,
            "{name}"
        );
    }
    for name in [
        "adadelta", "adamax", "adamw", "dcasgd", "ftml", "ftrl", "lamb", "nadam", "rmsprop",
        "signum", "test",
    ] {
        assert_eq!(
            mode(OptimizerSpec::new(name), false),
            RowSparse::Dense,
            "{name}"
        );
    }
}

#[test]
fn a_lazy_update_on_a_master_copy_writes_back_only_the_gradients_rows() {
    // adam with multi_precision on a float16 weight: the rows the gradient does not hold are
    // neither updated nor rewritten from the master copy (as MXNet's lazy kernels).
    let spec = OptimizerSpec::new("adam")
        .with("learning_rate", 0.1)
        .with("multi_precision", true);
    let mut up = Updater::from_spec(&spec).unwrap();
    let key = Key::from(0);
    let mut w = NDArray::full(&[4, 2], 1.0, DType::F16);
    let rows = |id: i64| {
        let g = NDArray::full(&[1, 2], 0.5, DType::F16);
        NDArray::row_sparse(&[4, 2], vec![id], &g).unwrap()
    };
    up.update(&key, &rows(1), &mut w).unwrap();
    // The caller changes row 0 of its weight; the master copy still holds 1.0 there.
    let mut values = w.to_vec::<half::f16>().unwrap();
    values[0] = half::f16::from_f32(5.0);
    values[1] = half::f16::from_f32(5.0);
    w = NDArray::from_vec(&[4, 2], values).unwrap();
    up.update(&key, &rows(2), &mut w).unwrap();
    let after: Vec<f32> = w
        .to_vec::<half::f16>()
        .unwrap()
        .iter()
        .map(|h| h.to_f32())
        .collect();
    assert_eq!(&after[0..2], &[5.0, 5.0], "row 0 untouched: {after:?}");
    assert_eq!(&after[6..8], &[1.0, 1.0], "row 3 untouched: {after:?}");
    assert!(
        after[2] < 1.0 && after[4] < 1.0,
        "rows 1 and 2 updated: {after:?}"
    );
}

/// MXNet 1.9.1 squares float16 weights in float16 for the LAMB and LARS norms: a weight of 256
/// or more squares to infinity, and one multi-precision step turns every weight into -inf
/// (LAMB) or NaN (LARS). Here the norms square the float16 values in float32.
#[test]
fn lamb_and_lars_norms_of_big_float16_weights_stay_finite() {
    use half::f16;
    let values = [300.0f32, 1.0, 2.0, 3.0];
    let halves = |v: &[f32]| {
        NDArray::from_vec(&[2, 2], v.iter().map(|&x| f16::from_f32(x)).collect()).unwrap()
    };
    for (name, extra) in [("lamb", None), ("lars", Some(("eta", 0.5)))] {
        let mut spec = OptimizerSpec::new(name)
            .with("learning_rate", 0.01)
            .with("multi_precision", true);
        if let Some((k, v)) = extra {
            spec = spec.with(k, v);
        }
        let grad = [0.1, 0.2, 0.3, 0.4];
        let mut up = Updater::from_spec(&spec).unwrap();
        let mut w = halves(&values);
        up.update(&Key::from(0), &halves(&grad), &mut w).unwrap();
        let got = w.to_f64_vec();
        // The same step on float32 weights (of the float16 gradient's values), rounded.
        let mut up = Updater::from_spec(&spec).unwrap();
        let mut w32 = NDArray::from_vec(&[2, 2], values.to_vec()).unwrap();
        let g32: Vec<f32> = grad.iter().map(|&g| f16::from_f32(g).to_f32()).collect();
        let g32 = NDArray::from_vec(&[2, 2], g32).unwrap();
        up.update(&Key::from(0), &g32, &mut w32).unwrap();
        for (g, e) in got.iter().zip(w32.to_f64_vec()) {
            let e = f64::from(f16::from_f64(e));
            assert!(
                g.is_finite() && (g - e).abs() <= 1e-3 * e.abs().max(1.0),
                "{name}: {got:?}"
            );
        }
    }
}
