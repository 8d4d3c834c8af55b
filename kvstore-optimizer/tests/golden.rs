//! Golden vectors: every optimizer against MXNet 1.9.1's own `Updater` (see
//! `tests/golden/generate.py`, which wrote `tests/golden/optimizers.json`).
//!
//! Tolerance, per dtype, on every element after every step:
//! - `float64`: relative 1e-12 (absolute 1e-14 near zero). Kernels get their
//!   hyper-parameters through `f32` exactly as MXNet's `float` operator parameters do and
//!   evaluate the same expressions in the same order, so results agree to the last bit or
//!   nearly. LARS: relative 1e-9 (observed worst: 2.3e-10), its norms reduced in `float32` as
//!   MXNet's `multi_sum_sq` reduces them.
//! - `float32`: to the last bit, every optimizer (checked as bit-identical; the 4 ulp bound
//!   below is what is left of MXNet builds that contract `a*b + c` into fused multiply-adds,
//!   never seen in 1.9.1's wheel): the kernels evaluate MXNet's expressions in MXNet's order
//!   (RMSProp was 4 ulp off while it grouped `(1 - gamma1) * g * g` and `lr * (g / sqrt(..))`
//!   otherwise than MXNet's kernels). So must LAMB's `float64` cases (its direction computed
//!   in `double` and kept in `float`, its norms as `multi_sum_sq` takes them) and FTRL's
//!   `float16` ones.
//! - `float16`: 2 ulp (or 1e-4 absolute near zero). Without `multi_precision` MXNet's `half_t`
//!   arithmetic rounds each operation, as ours does, but evaluates some mixed `float`/`half_t`
//!   sub-expressions in `float`; with `multi_precision` only the final cast rounds (observed
//!   worst: 1 ulp).
//!
//! AdaMax, Nadam, FTML, DCASGD, ccSGD and GroupAdaGrad match MXNet to the last bit in every
//! dtype of their cases (observed), within the same tolerances.
//!
//! A case MXNet itself rejects (its AdaGrad, AdaDelta, RMSProp, FTRL and GroupAdaGrad keep
//! `float32` state and fail on other weight dtypes; its DCASGD fails whenever `momentum` is
//! not 0) is checked to succeed here instead, with finite results, unless it is rejected here
//! too, by the update, with nothing changed (GroupAdaGrad and a key with weight decay).
//!
//! A case with `keys` updates keys `0..keys` in turn at each step, each from the same weight
//! with the same gradient; its steps hold the weights of all keys one after the other. With
//! `updates`, only the keys listed for a step are updated at it, in that order: keys reach
//! different update counts (the schedulers follow the largest, bias corrections each key's
//! own; `begin_num_update` starts every count).
//!
//! A case with `grad_rows` hands the updater row-sparse gradients holding those rows of each
//! step's gradient (which is zero elsewhere). For the optimizers MXNet updates through sparse
//! kernels or their row-sparse paths (SGD, ccSGD, NAG, Adam, AdaGrad, GroupAdaGrad, LARS;
//! lazily or not, with or without `multi_precision`) every `float32` and `float16` element must
//! match MXNet to the last bit; `float64` cases keep the tolerance above, because serde_json
//! reads some of their 17-digit inputs one unit in the last place off (fed the exact inputs,
//! they match to the last bit too). The other optimizers' cases (applied as dense gradients)
//! get the tolerances above. MXNet's sparse AdaGrad refuses weight decay: such a case must be
//! refused here too, by the update, with nothing changed.

use std::collections::BTreeMap;

use half::f16;
use kvstore_base::{DType, Key, NDArray, OptimizerSpec, ParamValue};
use kvstore_optimizer::Updater;
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    mxnet_version: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    optimizer: String,
    params: BTreeMap<String, ParamValue>,
    dtype: String,
    shape: Vec<usize>,
    weight: Vec<f64>,
    grads: Vec<Vec<f64>>,
    steps: Option<Vec<Vec<f64>>>,
    mxnet_error: Option<String>,
    keys: Option<usize>,
    updates: Option<Vec<Vec<usize>>>,
    grad_rows: Option<Vec<Vec<i64>>>,
}

fn array(shape: &[usize], data: &[f64], dtype: DType) -> NDArray {
    NDArray::from_vec(shape, data.to_vec())
        .unwrap()
        .astype(dtype)
}

/// Distance in units of the last place of `expected`, in `dtype`.
fn ulps(got: f64, expected: f64, dtype: DType) -> f64 {
    let ulp = match dtype {
        DType::F16 => {
            let e = f16::from_f64(expected);
            let next = f16::from_bits(e.to_bits() + 1);
            (next.to_f64() - e.to_f64()).abs()
        }
        _ => {
            let e = expected as f32;
            let next = f32::from_bits(e.abs().to_bits() + 1);
            (f64::from(next) - f64::from(e.abs())).abs()
        }
    };
    (got - expected).abs() / ulp
}

fn within(got: f64, expected: f64, dtype: DType, f64_rtol: f64) -> bool {
    let diff = (got - expected).abs();
    match dtype {
        DType::F64 => diff <= 1e-14 || diff <= f64_rtol * expected.abs(),
        DType::F32 => diff <= 1e-7 || ulps(got, expected, dtype) <= 4.0,
        _ => diff <= 1e-4 || ulps(got, expected, dtype) <= 2.0,
    }
}

/// `got` is MXNet's `expected` in `dtype` (`float32` or `float16`). serde_json's reader may be
/// one `f64` unit in the last place off the text, which rounding to the dtype absorbs.
fn identical(got: f64, expected: f64, dtype: DType) -> bool {
    match dtype {
        DType::F16 => f16::from_f64(got) == f16::from_f64(expected),
        _ => got as f32 == expected as f32,
    }
}

#[test]
fn optimizers_match_mxnet_1_9_1() {
    let text = include_str!("golden/optimizers.json");
    let file: File = serde_json::from_str(text).unwrap();
    assert_eq!(file.mxnet_version, "1.9.1");
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut rejected = 0;
    let mut rejected_at_update = 0;
    for case in &file.cases {
        let dtype: DType = case.dtype.parse().unwrap();
        let spec = OptimizerSpec {
            name: case.optimizer.clone(),
            params: case.params.clone(),
        };
        let label = format!("{} {} {:?}", case.optimizer, case.dtype, case.params);
        let mut up = match (Updater::from_spec(&spec), &case.mxnet_error) {
            (Ok(up), _) => up,
            (Err(e), Some(_)) => {
                eprintln!("{label}: rejected by MXNet and here: {e}");
                rejected += 1;
                continue;
            }
            (Err(e), None) => panic!("{label}: {e}"),
        };
        // LARS takes norms; MXNet reduces float64 arrays into a float32 sum.
        let f64_rtol = if case.optimizer == "lars" {
            1e-9
        } else {
            1e-12
        };
        let keys = case.keys.unwrap_or(1);
        let mut ws: Vec<NDArray> = (0..keys)
            .map(|_| array(&case.shape, &case.weight, dtype))
            .collect();
        let sparse = case.grad_rows.is_some();
        // MXNet's sparse kernels and row-sparse paths, reproduced operation by operation.
        let exact = dtype == DType::F32
            || (case.optimizer == "lamb" && dtype != DType::F16)
            || dtype != DType::F64
                && (case.optimizer == "ftrl"
                    || sparse
                        && matches!(
                            case.optimizer.as_str(),
                            "sgd" | "ccsgd" | "nag" | "adam" | "adagrad" | "groupadagrad" | "lars"
                        ));
        let group = format!(
            "{} {}{}",
            case.optimizer,
            case.dtype,
            if sparse { " row-sparse" } else { "" }
        );
        'steps: for (step, g) in case.grads.iter().enumerate() {
            let mut g = array(&case.shape, g, dtype);
            if let Some(rows) = &case.grad_rows {
                g = g.retain_rows(&rows[step]).unwrap();
            }
            let updated: Vec<usize> = match &case.updates {
                Some(updates) => updates[step].clone(),
                None => (0..keys).collect(),
            };
            for k in updated {
                let w = &mut ws[k];
                let before = w.to_f64_vec();
                match (up.update(&Key::from(k as i64), &g, w), &case.mxnet_error) {
                    (Ok(()), _) => {}
                    (Err(e), Some(_)) if sparse || case.optimizer == "groupadagrad" => {
                        // Refused here as by MXNet (adagrad's sparse kernel and weight decay,
                        // GroupAdaGrad and a key with weight decay), with nothing changed.
                        assert_eq!(w.to_f64_vec(), before, "{label}");
                        assert_eq!(up.update_count(&Key::from(k as i64)), None, "{label}");
                        eprintln!("{label}: rejected by MXNet and here: {e}");
                        rejected_at_update += 1;
                        break 'steps;
                    }
                    (Err(e), _) => panic!("{label}: key {k}: {e}"),
                }
            }
            let got: Vec<f64> = ws.iter().flat_map(NDArray::to_f64_vec).collect();
            match &case.steps {
                Some(steps) => {
                    assert_eq!(got.len(), steps[step].len(), "{label}: step {}", step + 1);
                    for (i, (&x, &e)) in got.iter().zip(&steps[step]).enumerate() {
                        checked += 1;
                        let u = if dtype == DType::F64 {
                            (x - e).abs() / e.abs().max(1e-300)
                        } else {
                            ulps(x, e, dtype)
                        };
                        let entry = worst.entry(group.clone()).or_insert(0.0);
                        *entry = entry.max(if (x - e).abs() < 1e-14 { 0.0 } else { u });
                        if exact && !identical(x, e, dtype) {
                            failures.push(format!(
                                "{label}: step {} element {i}: got {x}, MXNet {e} (must be \
                                 bit-identical)",
                                step + 1
                            ));
                        } else if !within(x, e, dtype, f64_rtol) {
                            failures.push(format!(
                                "{label}: step {} element {i}: got {x}, MXNet {e}",
                                step + 1
                            ));
                        }
                    }
                }
                None => {
                    assert!(case.mxnet_error.is_some(), "{label}: no steps and no error");
                    assert!(got.iter().all(|x| x.is_finite()), "{label}: {got:?}");
                }
            }
        }
    }
    for (k, v) in &worst {
        eprintln!("worst {k}: {v:.3e}");
    }
    assert!(checked > 4000, "only {checked} values checked");
    assert_eq!(rejected, 0, "cases rejected when built");
    // AdaGrad's sparse kernel and GroupAdaGrad with weight decay.
    assert_eq!(rejected_at_update, 2, "cases rejected at the update");
    assert!(
        failures.is_empty(),
        "{} mismatches, first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
}
