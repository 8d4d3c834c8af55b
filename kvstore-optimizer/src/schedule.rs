//! Learning-rate schedulers: MXNet 1.9.1's `mxnet.lr_scheduler`.
//!
//! A scheduler is described in an optimizer spec as a map under `lr_scheduler`:
//!
//! | `type`        | parameters (defaults)                                                  |
//! |---------------|------------------------------------------------------------------------|
//! | `factor`      | `step` (required, ≥ 1), `factor` (1), `stop_factor_lr` (1e-8)          |
//! | `multifactor` | `step` (required: increasing list of ints ≥ 1), `factor` (1)           |
//! | `poly`        | `max_update` (required, ≥ 1), `pwr` (2), `final_lr` (0)                |
//! | `cosine`      | `max_update` (required, ≥ 1), `final_lr` (0)                           |
//!
//! Every type also takes `base_lr` (0.01), `warmup_steps` (0), `warmup_begin_lr` (0) and
//! `warmup_mode` (`linear` or `constant`).
//!
//! Schedulers are stateful, as in MXNet: `factor` and `multifactor` lower their current rate
//! as updates go by, `poly` and `cosine` keep the last rate once `max_update` is passed.
//! The optimizer's `learning_rate`, when given, replaces the scheduler's *current* `base_lr`
//! only; like MXNet, the warm-up target and the starting rate of `poly`/`cosine` keep the
//! value the scheduler was built with.
//!
//! ```
//! use kvstore_base::ParamValue;
//! use kvstore_optimizer::LrScheduler;
//! use std::collections::BTreeMap;
//!
//! let mut m = BTreeMap::new();
//! m.insert("type".to_string(), ParamValue::from("factor"));
//! m.insert("step".to_string(), ParamValue::Int(2));
//! m.insert("factor".to_string(), ParamValue::Float(0.5));
//! m.insert("base_lr".to_string(), ParamValue::Float(1.0));
//! let mut s = LrScheduler::from_param(&ParamValue::Map(m)).unwrap();
//! let rates: Vec<f64> = (1..=6).map(|n| s.rate(n)).collect();
//! assert_eq!(rates, vec![1.0, 1.0, 0.5, 0.5, 0.25, 0.25]);
//! ```

use std::collections::BTreeMap;

use kvstore_base::{Error, ParamValue, Result};

use crate::params::Params;

/// How the learning rate rises during warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmupMode {
    /// From `warmup_begin_lr` to the base rate in equal increments.
    Linear,
    /// `warmup_begin_lr` for the whole warm-up.
    Constant,
}

/// The decay rule of a scheduler, with its internal state.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Factor {
        step: i64,
        factor: f64,
        stop_factor_lr: f64,
        count: i64,
    },
    MultiFactor {
        steps: Vec<i64>,
        factor: f64,
        cur_step_ind: usize,
        count: i64,
    },
    Poly {
        max_update: i64,
        pwr: f64,
        final_lr: f64,
        base_lr_orig: f64,
    },
    Cosine {
        max_update: i64,
        final_lr: f64,
        base_lr_orig: f64,
    },
}

/// A learning-rate scheduler: `rate(num_update)` is the learning rate for that update.
#[derive(Debug, Clone, PartialEq)]
pub struct LrScheduler {
    base_lr: f64,
    warmup_steps: i64,
    warmup_begin_lr: f64,
    warmup_final_lr: f64,
    warmup_mode: WarmupMode,
    kind: Kind,
}

const COMMON: [&str; 5] = [
    "type",
    "base_lr",
    "warmup_steps",
    "warmup_begin_lr",
    "warmup_mode",
];

impl LrScheduler {
    /// The scheduler described by `value` (a map with a `type`, see the module docs).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a value that is not a map, an unknown `type`, a missing,
    /// ill-typed, out-of-range or unknown parameter.
    pub fn from_param(value: &ParamValue) -> Result<LrScheduler> {
        let ParamValue::Map(map) = value else {
            return Err(Error::InvalidArgument(
                "lr_scheduler must be a map with a \"type\" (factor, multifactor, poly, cosine)"
                    .into(),
            ));
        };
        let mut p = Params::new("lr_scheduler", map);
        let ty = p
            .opt_str("type")?
            .ok_or_else(|| p.bad("type", "is required: factor, multifactor, poly or cosine"))?
            .to_ascii_lowercase();
        let base_lr = p.f64_or("base_lr", 0.01)?;
        let warmup_steps = p.opt_i64("warmup_steps")?.unwrap_or(0);
        let warmup_begin_lr = p.f64_or("warmup_begin_lr", 0.0)?;
        let warmup_mode = match p.opt_str("warmup_mode")?.unwrap_or("linear") {
            "linear" => WarmupMode::Linear,
            "constant" => WarmupMode::Constant,
            other => {
                return Err(p.bad(
                    "warmup_mode",
                    format!("must be \"linear\" or \"constant\", got {other:?}"),
                ))
            }
        };
        if warmup_begin_lr > base_lr {
            return Err(p.bad(
                "warmup_begin_lr",
                "must not exceed base_lr (base lr has to be higher than warmup_begin_lr)",
            ));
        }
        if warmup_steps < 0 {
            return Err(p.bad("warmup_steps", "must be 0 or more"));
        }
        // Internal state, present in specs written by `save_states`.
        let state_count = p.opt_i64("state_count")?;
        if state_count.is_some_and(|c| c < 0) {
            return Err(p.bad("state_count", "must be 0 or more"));
        }
        let state_base_lr = p.opt_f64("state_base_lr")?;
        let state_warmup_final_lr = p.opt_f64("state_warmup_final_lr")?;
        let (kind, extra): (Kind, &[&str]) = match ty.as_str() {
            "factor" => {
                let step = p
                    .opt_i64("step")?
                    .ok_or_else(|| p.bad("step", "is required for a factor scheduler"))?;
                if step < 1 {
                    return Err(p.bad("step", "must be greater or equal than 1"));
                }
                let factor = p.f64_or("factor", 1.0)?;
                if factor > 1.0 {
                    return Err(p.bad("factor", "must be no more than 1 to make lr reduce"));
                }
                let stop_factor_lr = p.f64_or("stop_factor_lr", 1e-8)?;
                (
                    Kind::Factor {
                        step,
                        factor,
                        stop_factor_lr,
                        count: state_count.unwrap_or(0),
                    },
                    &["step", "factor", "stop_factor_lr"],
                )
            }
            "multifactor" => {
                let steps =
                    match p.raw("step") {
                        Some(ParamValue::List(items)) if !items.is_empty() => {
                            let mut steps = Vec::with_capacity(items.len());
                            for item in items {
                                match item {
                                    ParamValue::Int(i) if *i >= 1 => steps.push(*i),
                                    _ => {
                                        return Err(p.bad(
                                            "step",
                                            "must be a list of integers greater or equal than 1",
                                        ))
                                    }
                                }
                            }
                            if steps.windows(2).any(|w| w[1] <= w[0]) {
                                return Err(p.bad("step", "must be an increasing integer list"));
                            }
                            steps
                        }
                        _ => return Err(p.bad(
                            "step",
                            "is required for a multifactor scheduler: a non-empty list of integers",
                        )),
                    };
                let factor = p.f64_or("factor", 1.0)?;
                if factor > 1.0 {
                    return Err(p.bad("factor", "must be no more than 1 to make lr reduce"));
                }
                let cur = p.opt_i64("state_cur_step_ind")?.unwrap_or(0);
                if cur < 0 || cur as usize > steps.len() {
                    return Err(p.bad("state_cur_step_ind", "is out of range"));
                }
                (
                    Kind::MultiFactor {
                        steps,
                        factor,
                        cur_step_ind: cur as usize,
                        count: state_count.unwrap_or(0),
                    },
                    &["step", "factor"],
                )
            }
            "poly" | "cosine" => {
                let max_update = p.opt_i64("max_update")?.ok_or_else(|| {
                    p.bad("max_update", "is required for poly and cosine schedulers")
                })?;
                if max_update < 1 {
                    return Err(p.bad("max_update", "must be strictly positive"));
                }
                // The decay spans `max_update - warmup_steps` updates: none would divide by
                // zero at update `max_update` (MXNet's ZeroDivisionError there), a NaN rate
                // for every later update here.
                if max_update == warmup_steps {
                    return Err(p.bad(
                        "max_update",
                        "must differ from warmup_steps (the decay would span no update)",
                    ));
                }
                let final_lr = p.f64_or("final_lr", 0.0)?;
                let base_lr_orig = p.opt_f64("state_base_lr_orig")?.unwrap_or(base_lr);
                if ty == "poly" {
                    let pwr = p.f64_or("pwr", 2.0)?;
                    (
                        Kind::Poly {
                            max_update,
                            pwr,
                            final_lr,
                            base_lr_orig,
                        },
                        &["max_update", "pwr", "final_lr"],
                    )
                } else {
                    (
                        Kind::Cosine {
                            max_update,
                            final_lr,
                            base_lr_orig,
                        },
                        &["max_update", "final_lr"],
                    )
                }
            }
            other => {
                return Err(p.bad(
                    "type",
                    format!("must be factor, multifactor, poly or cosine, got {other:?}"),
                ))
            }
        };
        let accepted: Vec<&str> = COMMON.iter().chain(extra.iter()).copied().collect();
        p.finish(&accepted)?;
        Ok(LrScheduler {
            base_lr: state_base_lr.unwrap_or(base_lr),
            warmup_steps,
            warmup_begin_lr,
            warmup_final_lr: state_warmup_final_lr.unwrap_or(base_lr),
            warmup_mode,
            kind,
        })
    }

    /// The current base rate (MXNet's `base_lr` attribute).
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// Replaces the current base rate (what an optimizer's `learning_rate` does).
    pub fn set_base_lr(&mut self, lr: f64) {
        self.base_lr = lr;
    }

    fn warmup_rate(&self, num_update: i64) -> f64 {
        match self.warmup_mode {
            WarmupMode::Linear => {
                self.warmup_begin_lr
                    + (self.warmup_final_lr - self.warmup_begin_lr) * num_update as f64
                        / self.warmup_steps as f64
            }
            WarmupMode::Constant => self.warmup_begin_lr,
        }
    }

    /// The learning rate for update number `num_update` (advancing the internal state).
    pub fn rate(&mut self, num_update: u64) -> f64 {
        let n = i64::try_from(num_update).unwrap_or(i64::MAX);
        if n < self.warmup_steps {
            return self.warmup_rate(n);
        }
        let warmup = self.warmup_steps;
        match &mut self.kind {
            Kind::Factor {
                step,
                factor,
                stop_factor_lr,
                count,
            } => {
                while n > count.saturating_add(*step) {
                    // MXNet's step: the rate times the factor, floored at `stop_factor_lr`.
                    let next = (self.base_lr * *factor).max(*stop_factor_lr);
                    if next == self.base_lr {
                        // The rate can no longer change (floored, a factor of 1, or a rate
                        // shrunk to zero): jump to where the loop would end (the last multiple
                        // of `step` past `count` below `n`), instead of stepping there one
                        // `step` at a time.
                        *count += (n - *count - 1) / *step * *step;
                        break;
                    }
                    *count += *step;
                    self.base_lr = next;
                }
            }
            Kind::MultiFactor {
                steps,
                factor,
                cur_step_ind,
                count,
            } => {
                while *cur_step_ind < steps.len() && n > steps[*cur_step_ind] {
                    *count = steps[*cur_step_ind];
                    *cur_step_ind += 1;
                    self.base_lr *= *factor;
                }
            }
            Kind::Poly {
                max_update,
                pwr,
                final_lr,
                base_lr_orig,
            } => {
                if n <= *max_update {
                    let max_steps = (*max_update - warmup) as f64;
                    self.base_lr = *final_lr
                        + (*base_lr_orig - *final_lr)
                            * (1.0 - (n - warmup) as f64 / max_steps).powf(*pwr);
                }
            }
            Kind::Cosine {
                max_update,
                final_lr,
                base_lr_orig,
            } => {
                if n <= *max_update {
                    let max_steps = (*max_update - warmup) as f64;
                    self.base_lr = *final_lr
                        + (*base_lr_orig - *final_lr)
                            * (1.0
                                + (std::f64::consts::PI * (n - warmup) as f64 / max_steps).cos())
                            / 2.0;
                }
            }
        }
        self.base_lr
    }

    /// A map that rebuilds this scheduler, internal state included (the `state_*` entries).
    pub fn to_param(&self) -> ParamValue {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: ParamValue| {
            m.insert(k.to_string(), v);
        };
        put("base_lr", ParamValue::Float(self.warmup_final_lr));
        put("state_base_lr", ParamValue::Float(self.base_lr));
        put(
            "state_warmup_final_lr",
            ParamValue::Float(self.warmup_final_lr),
        );
        put("warmup_steps", ParamValue::Int(self.warmup_steps));
        put("warmup_begin_lr", ParamValue::Float(self.warmup_begin_lr));
        put(
            "warmup_mode",
            ParamValue::from(match self.warmup_mode {
                WarmupMode::Linear => "linear",
                WarmupMode::Constant => "constant",
            }),
        );
        match &self.kind {
            Kind::Factor {
                step,
                factor,
                stop_factor_lr,
                count,
            } => {
                put("type", "factor".into());
                put("step", ParamValue::Int(*step));
                put("factor", ParamValue::Float(*factor));
                put("stop_factor_lr", ParamValue::Float(*stop_factor_lr));
                put("state_count", ParamValue::Int(*count));
            }
            Kind::MultiFactor {
                steps,
                factor,
                cur_step_ind,
                count,
            } => {
                put("type", "multifactor".into());
                put(
                    "step",
                    ParamValue::List(steps.iter().map(|s| ParamValue::Int(*s)).collect()),
                );
                put("factor", ParamValue::Float(*factor));
                put("state_cur_step_ind", ParamValue::Int(*cur_step_ind as i64));
                put("state_count", ParamValue::Int(*count));
            }
            Kind::Poly {
                max_update,
                pwr,
                final_lr,
                base_lr_orig,
            } => {
                put("type", "poly".into());
                put("max_update", ParamValue::Int(*max_update));
                put("pwr", ParamValue::Float(*pwr));
                put("final_lr", ParamValue::Float(*final_lr));
                put("state_base_lr_orig", ParamValue::Float(*base_lr_orig));
            }
            Kind::Cosine {
                max_update,
                final_lr,
                base_lr_orig,
            } => {
                put("type", "cosine".into());
                put("max_update", ParamValue::Int(*max_update));
                put("final_lr", ParamValue::Float(*final_lr));
                put("state_base_lr_orig", ParamValue::Float(*base_lr_orig));
            }
        }
        ParamValue::Map(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(pairs: &[(&str, ParamValue)]) -> Result<LrScheduler> {
        let m: BTreeMap<String, ParamValue> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        LrScheduler::from_param(&ParamValue::Map(m))
    }

    #[test]
    fn factor_jumps_ahead_once_the_rate_is_floored() {
        let factor = |pairs: &[(&str, ParamValue)]| {
            let mut all = vec![
                ("type", ParamValue::from("factor")),
                ("step", 1i64.into()),
                ("factor", 0.5.into()),
                ("base_lr", 1.0.into()),
            ];
            all.extend(pairs.iter().cloned());
            sched(&all)
        };
        // Step by step and jumping ahead agree on every update while the rate still falls.
        let mut a = factor(&[]).unwrap();
        let rates: Vec<f64> = (1..=40).map(|n| a.rate(n)).collect();
        assert_eq!(rates[39], 1e-8, "floored by stop_factor_lr");
        // A huge update count (e.g. from a states file) returns at once, at the floor.
        assert_eq!(a.rate(1 << 62), 1e-8);
        let mut flat = factor(&[("factor", 1.0.into())]).unwrap();
        assert_eq!(flat.rate(u64::MAX), 1.0);
        // A negative saved position is refused rather than looped over.
        assert!(factor(&[("state_count", (-5i64).into())]).is_err());
        // A floor below zero: the rate shrinks to zero, then stays (returns at once).
        let mut to_zero = factor(&[("stop_factor_lr", (-1.0).into())]).unwrap();
        assert_eq!(to_zero.rate(1 << 50), 0.0);
        // A factor of 1 below the floor: MXNet's first step raises the rate to the floor.
        let mut raised = factor(&[("factor", 1.0.into()), ("base_lr", 1e-9.into())]).unwrap();
        assert_eq!(raised.rate(1), 1e-9);
        assert_eq!(raised.rate(2), 1e-8);
    }

    #[test]
    fn a_decay_spanning_no_update_is_refused() {
        for ty in ["poly", "cosine"] {
            let e = sched(&[
                ("type", ty.into()),
                ("max_update", 4.into()),
                ("warmup_steps", 4.into()),
            ])
            .unwrap_err();
            assert!(
                e.to_string().contains("must differ from warmup_steps"),
                "{e}"
            );
            // A warmup longer than the decay never reaches it: MXNet takes it, so do we.
            let mut s = sched(&[
                ("type", ty.into()),
                ("max_update", 4.into()),
                ("warmup_steps", 6.into()),
                ("base_lr", 1.0.into()),
            ])
            .unwrap();
            assert!((1..=10).all(|n| s.rate(n).is_finite()));
        }
    }

    #[test]
    fn multifactor_steps_down_after_each_step() {
        let mut s = sched(&[
            ("type", "multifactor".into()),
            ("step", ParamValue::List(vec![2.into(), 4.into()])),
            ("factor", 0.1.into()),
            ("base_lr", 1.0.into()),
        ])
        .unwrap();
        let r: Vec<f64> = (1..=6).map(|n| s.rate(n)).collect();
        assert_eq!(r[0..2], [1.0, 1.0]);
        assert!(
            (r[2] - 0.1).abs() < 1e-15 && (r[4] - 0.01).abs() < 1e-15,
            "{r:?}"
        );
    }

    #[test]
    fn linear_warmup_then_cosine() {
        let mut s = sched(&[
            ("type", "cosine".into()),
            ("max_update", 10.into()),
            ("base_lr", 1.0.into()),
            ("warmup_steps", 2.into()),
            ("warmup_begin_lr", 0.5.into()),
        ])
        .unwrap();
        assert_eq!(s.rate(1), 0.75);
        assert_eq!(s.rate(2), 1.0);
        assert!((s.rate(10) - 0.0).abs() < 1e-15);
        assert!((s.rate(20) - 0.0).abs() < 1e-15);
    }

    #[test]
    fn bad_scheduler_parameters_are_named() {
        let e = sched(&[("type", "factor".into())]).unwrap_err().to_string();
        assert!(e.contains("\"step\""), "{e}");
        let e = sched(&[
            ("type", "factor".into()),
            ("step", 2.into()),
            ("factr", 0.5.into()),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"factr\""), "{e}");
        let e = sched(&[("type", "step".into())]).unwrap_err().to_string();
        assert!(e.contains("\"type\""), "{e}");
        let e = sched(&[("type", "factor".into()), ("step", 2.5.into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("integer"), "{e}");
    }

    #[test]
    fn state_survives_to_param() {
        let mut s = sched(&[
            ("type", "factor".into()),
            ("step", 2.into()),
            ("factor", 0.5.into()),
            ("base_lr", 1.0.into()),
        ])
        .unwrap();
        s.rate(5);
        let mut copy = LrScheduler::from_param(&s.to_param()).unwrap();
        assert_eq!(copy, s);
        assert_eq!(copy.rate(7), s.rate(7));
    }
}
