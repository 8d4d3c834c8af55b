//! The optimizers the GPU path runs as kernels: `sgd` (with momentum) and `adam`, with the
//! hyper-parameters and formulas of `kvstore-optimizer` (whose CPU code the `device` store
//! runs for CPU values).

use std::collections::BTreeMap;

use kvstore_base::{Error, Key, OptimizerSpec, ParamValue, Result};

use crate::gpu::Gpu;
use crate::gpu::StepParams;
use crate::sparse::DeviceRowSparse;
use cudarc::driver::CudaSlice;

/// A parsed GPU optimizer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum GpuOptimizer {
    Sgd {
        common: Common,
        momentum: f64,
    },
    Adam {
        common: Common,
        beta1: f64,
        beta2: f64,
        epsilon: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Common {
    lr: f64,
    wd: f64,
    rescale: f64,
    clip: Option<f64>,
    /// `lazy_update`: a row-sparse gradient changes only its rows (the default, as MXNet).
    lazy: bool,
}

impl Common {
    /// The step's hyper-parameters with learning rate `lr`, rounded to f32 as
    /// kvstore-optimizer's `R::param` does.
    fn params(&self, lr: f64) -> StepParams {
        StepParams {
            lr: lr as f32,
            wd: self.wd as f32,
            rescale: self.rescale as f32,
            clip: self.clip.map(|c| c as f32),
        }
    }
}

const COMMON: &[&str] = &[
    "learning_rate",
    "wd",
    "rescale_grad",
    "clip_gradient",
    "lazy_update",
];

fn number(params: &BTreeMap<String, ParamValue>, name: &str, default: f64) -> Result<f64> {
    match params.get(name) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| {
            Error::InvalidArgument(format!("hyper-parameter {name:?} must be a number"))
        }),
    }
}

impl GpuOptimizer {
    /// Parses `spec`; a spec the GPU kernels cannot run exactly as the CPU optimizer (another
    /// optimizer, an lr scheduler, per-key multipliers, multi-precision) is an error naming
    /// what is unsupported.
    pub(crate) fn parse(spec: &OptimizerSpec) -> Result<GpuOptimizer> {
        let extra: &[&str] = match spec.name.as_str() {
            "sgd" => &["momentum"],
            "adam" => &["beta1", "beta2", "epsilon"],
            other => {
                return Err(unsupported(format!(
                    "optimizer {other:?} (GPU kernels exist for sgd and adam)"
                )))
            }
        };
        for (name, value) in &spec.params {
            let plain = COMMON.contains(&name.as_str()) || extra.contains(&name.as_str());
            let harmless = name == "multi_precision" && matches!(value, ParamValue::Bool(false));
            if !plain && !harmless {
                return Err(unsupported(format!(
                    "hyper-parameter {name:?} of {}",
                    spec.name
                )));
            }
        }
        let p = &spec.params;
        let lr_default = if spec.name == "adam" { 0.001 } else { 0.01 };
        let common = Common {
            lr: number(p, "learning_rate", lr_default)?,
            wd: number(p, "wd", 0.0)?,
            rescale: number(p, "rescale_grad", 1.0)?,
            clip: match p.get("clip_gradient") {
                None => None,
                Some(_) => Some(number(p, "clip_gradient", 0.0)?).filter(|c| *c > 0.0),
            },
            lazy: match p.get("lazy_update") {
                None => true,
                Some(ParamValue::Bool(b)) => *b,
                Some(_) => {
                    return Err(Error::InvalidArgument(
                        "hyper-parameter \"lazy_update\" must be a bool".into(),
                    ))
                }
            },
        };
        Ok(match spec.name.as_str() {
            "sgd" => GpuOptimizer::Sgd {
                common,
                momentum: number(p, "momentum", 0.0)?,
            },
            _ => GpuOptimizer::Adam {
                common,
                beta1: number(p, "beta1", 0.9)?,
                beta2: number(p, "beta2", 0.999)?,
                epsilon: number(p, "epsilon", 1e-8)?,
            },
        })
    }

    /// How many state buffers a key needs.
    pub(crate) fn state_len(&self) -> usize {
        match self {
            GpuOptimizer::Sgd { momentum, .. } => usize::from(*momentum != 0.0),
            GpuOptimizer::Adam { .. } => 2,
        }
    }

    /// Runs update number `t` (1 for the first) of a key on `gpu`.
    pub(crate) fn step(
        &self,
        gpu: &Gpu,
        t: u64,
        weight: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        state: &mut [CudaSlice<f32>],
    ) -> Result<()> {
        let f = |x: f64| x as f32;
        match self {
            GpuOptimizer::Sgd {
                common: c,
                momentum,
            } => {
                let mom = (*momentum > 0.0).then(|| (&mut state[0], f(*momentum)));
                gpu.sgd(weight, grad, mom, c.params(c.lr))
            }
            GpuOptimizer::Adam {
                common: c,
                beta1,
                beta2,
                epsilon,
            } => {
                let lr_t = adam_rate(c.lr, *beta1, *beta2, t);
                let [mean, var] = state else {
                    unreachable!("adam has two state buffers")
                };
                let betas = (f(*beta1), f(*beta2), f(*epsilon));
                gpu.adam(weight, grad, (mean, var), c.params(lr_t), betas)
            }
        }
    }
}

impl GpuOptimizer {
    /// Whether the kernels update a row-sparse gradient's rows only (`lazy_update`, the
    /// default); otherwise the host updater runs MXNet's standard row-sparse update.
    pub(crate) fn updates_rows_lazily(&self) -> bool {
        match self {
            GpuOptimizer::Sgd { common, .. } | GpuOptimizer::Adam { common, .. } => common.lazy,
        }
    }

    /// Runs update number `t` (1 for the first) of a key on `gpu` with the row-sparse
    /// gradient `grad`, lazily: only its rows of `weight` and of the states change (see
    /// [`ROW_KERNELS`](crate::sparse::ROW_KERNELS)).
    pub(crate) fn step_rows(
        &self,
        gpu: &Gpu,
        t: u64,
        weight: &mut CudaSlice<f32>,
        grad: &DeviceRowSparse,
        state: &mut [CudaSlice<f32>],
    ) -> Result<()> {
        let f = |x: f64| x as f32;
        match self {
            GpuOptimizer::Sgd {
                common: c,
                momentum,
            } => {
                // As the CPU's lazy kernel: MXNet picks the momentum kernel by the state,
                // whose momentum is 0 unless positive.
                let mom = state.first_mut().map(|m| (m, f(momentum.max(0.0))));
                gpu.sgd_rows(weight, grad, mom, c.params(c.lr))
            }
            GpuOptimizer::Adam {
                common: c,
                beta1,
                beta2,
                epsilon,
            } => {
                let [mean, var] = state else {
                    unreachable!("adam has two state buffers")
                };
                let lr_t = adam_rate(c.lr, *beta1, *beta2, t);
                let betas = (f(*beta1), f(*beta2), f(*epsilon));
                gpu.adam_rows(weight, grad, (mean, var), c.params(lr_t), betas)
            }
        }
    }
}

/// Adam's learning rate for update `t`, bias-corrected (as the CPU optimizer, in f64).
fn adam_rate(lr: f64, beta1: f64, beta2: f64, t: u64) -> f64 {
    let t = t as f64;
    lr * (1.0 - beta2.powf(t)).sqrt() / (1.0 - beta1.powf(t))
}

fn unsupported(what: String) -> Error {
    Error::InvalidArgument(format!(
        "{what} is not supported on GPU values of this store; set it for CPU values only"
    ))
}

/// Per-key update counts (`t`), as the CPU optimizer's bookkeeping.
pub(crate) type Counts = BTreeMap<Key, u64>;

/// What a push does with the sum of a GPU key's values.
#[derive(Debug, PartialEq)]
pub(crate) enum Update {
    /// No optimizer or updater: the sum becomes the stored value.
    Store,
    /// An optimizer with GPU kernels (sgd, adam): run on the key's merge GPU.
    Kernels(GpuOptimizer),
    /// Any other optimizer, or a custom updater: the embedded host store's updater runs on
    /// host copies of the sum and the weight (its states and state files then cover the GPU
    /// keys too).
    Host,
}

impl Update {
    /// The update for the store's setting: `optimizer` (as set), `custom` (a custom updater).
    pub(crate) fn for_setting(optimizer: Option<&OptimizerSpec>, custom: bool) -> Update {
        match (optimizer, custom) {
            (_, true) => Update::Host,
            (None, false) => Update::Store,
            (Some(spec), false) => GpuOptimizer::parse(spec).map_or(Update::Host, Update::Kernels),
        }
    }

    /// The GPU optimizer, for [`Update::Kernels`].
    pub(crate) fn kernels(&self) -> Option<&GpuOptimizer> {
        match self {
            Update::Kernels(opt) => Some(opt),
            _ => None,
        }
    }

    /// Whether the sum goes somewhere else than the stored value (a merge buffer).
    pub(crate) fn takes_sum(&self) -> bool {
        !matches!(self, Update::Store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sgd_and_adam_with_defaults() {
        let sgd = GpuOptimizer::parse(&OptimizerSpec::new("sgd").with("momentum", 0.9)).unwrap();
        assert_eq!(sgd.state_len(), 1);
        let GpuOptimizer::Sgd { common, .. } = &sgd else {
            panic!()
        };
        assert_eq!(common.lr, 0.01);
        let adam = GpuOptimizer::parse(&OptimizerSpec::new("adam")).unwrap();
        assert_eq!(adam.state_len(), 2);
        let GpuOptimizer::Adam { common, .. } = &adam else {
            panic!()
        };
        assert_eq!(common.lr, 0.001);
    }

    #[test]
    fn refuses_what_the_kernels_do_not_run() {
        for spec in [
            OptimizerSpec::new("ftrl"),
            OptimizerSpec::new("sgd").with("lr_scheduler", "x"),
            OptimizerSpec::new("adam").with("multi_precision", true),
        ] {
            let e = GpuOptimizer::parse(&spec).unwrap_err();
            assert!(e.to_string().contains("not supported on GPU values"), "{e}");
        }
        assert!(GpuOptimizer::parse(&OptimizerSpec::new("sgd").with("clip_gradient", 0.0)).is_ok());
    }
}
