//! `lars`: LARS (layer-wise adaptive rate scaling), MXNet 1.9.1's aggregated path.
//!
//! The key's rate is scaled by `eta·‖w‖/(rescale_grad·‖g‖ + wd·‖w‖ + eps)` when both norms are
//! positive and the key's name (from `param_idx2name`, else the key) does not end in `gamma`,
//! `beta` or `bias`; the update is then SGD's (`mom = μ·mom − lr·wd·w − lr·clip(rescale_grad·g)`,
//! `w += mom`). With `momentum_correction`, `μ` is scaled by the ratio of the current to the
//! previous global learning rate. Only names ending in `_weight` keep weight decay when
//! `param_idx2name` is given.
//!
//! A row-sparse gradient ([`Updater::update`](crate::Updater::update)) takes MXNet's
//! non-aggregated path: the scale comes from `eta·‖w‖/(‖rescale_grad·g‖ + wd·‖w‖ + eps)`,
//! with the norms of the `float32` values (of the float16 weight with `multi_precision`) as
//! MXNet's `norm` computes them and the rest in `float64`, then SGD's sparse kernels apply
//! the update (see `sgd`): only the gradient's rows with `lazy_update` (the default), every row
//! with `lazy_update` false or `multi_precision`.

use std::collections::BTreeMap;

use half::{bf16, f16};
use kvstore_base::{DType, Key, OptimizerSpec, ParamValue, Result};

use super::sgd::{sgd_apply, sgd_rows, SparseSgd};
use super::{begin, common, end, register};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, Buffers, Optimizer, RowSparse, Slices};
use crate::params::Params;
use crate::real::{multi_sum_sq, nrm2_f32, sparse_norm_f32, Real};

/// The value of the `dtype` weight whose `f32` master copy holds `x` (its cast).
fn stored(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

#[derive(Debug)]
struct Lars {
    base: Base,
    momentum: f64,
    eta: f64,
    eps: f64,
    momentum_correction: bool,
    last_lr: Option<f64>,
    cur_lr: Option<f64>,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::PassThrough, &["_weight"])?;
    let momentum = p.f64_or("momentum", 0.0)?;
    let eta = p.f64_or("eta", 0.001)?;
    let eps = p.f64_or("eps", 0.0)?;
    let momentum_correction = p.bool_or("momentum_correction", true)?;
    end(p, &["momentum", "eta", "eps", "momentum_correction"])?;
    Ok(Box::new(Lars {
        base,
        momentum,
        eta,
        eps,
        momentum_correction,
        last_lr: None,
        cur_lr: None,
    }))
}

register!(
    LARS,
    "lars",
    "LARS (layer-wise adaptive rate scaling)",
    build
);

impl Lars {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        self.base.bump(key);
        // LARS._get_lrs: remember the previous global rate for momentum correction.
        if let Some(cur) = self.cur_lr {
            self.last_lr = Some(cur);
        }
        let global = self.base.global_lr();
        if self.cur_lr.is_none() {
            self.last_lr = Some(global);
        }
        self.cur_lr = Some(global);
        let lr = self.base.scale_lr(key, global);
        let wd = self.base.wd_for(key);
        let name = self.base.name_of(key);
        let skip = name.ends_with("gamma") || name.ends_with("beta") || name.ends_with("bias");
        let momentum = match (self.momentum > 0.0, self.last_lr, self.cur_lr) {
            (false, ..) => None,
            (true, Some(last), Some(cur)) if self.momentum_correction && last != 0.0 => {
                Some(R::param(self.momentum * (cur / last)))
            }
            (true, ..) => Some(R::param(self.momentum)),
        };
        if let Some(rows) = b.rows {
            // LARS._get_lars: float32 norms, the rest in float64.
            let lr = if skip {
                lr
            } else {
                let w_norm = match b.master_of {
                    Some(dtype) => {
                        nrm2_f32(b.weight.iter().map(|w| stored(dtype, w.to_f64() as f32)))
                    }
                    None => nrm2_f32(b.weight.iter().map(|w| w.to_f64() as f32)),
                };
                let rescale = self.base.rescale_grad as f32;
                let g_norm = sparse_norm_f32(b.grad, |g| g.to_f64() as f32 * rescale);
                let (w_norm, g_norm) = (f64::from(w_norm), f64::from(g_norm));
                let lars = if w_norm > 0.0 && g_norm > 0.0 {
                    self.eta * w_norm / (g_norm + wd * w_norm + self.eps)
                } else {
                    1.0
                };
                lars * lr
            };
            let kernel = match (b.master_of, self.base.lazy_update) {
                (Some(_), _) => SparseSgd::Master,
                (None, true) => SparseSgd::Lazy,
                (None, false) => SparseSgd::Standard,
            };
            let momentum = momentum.or_else(|| (self.momentum != 0.0).then(R::zero));
            let (lr, wd) = (R::param(lr), R::param(wd));
            let rescale = R::param(self.base.rescale_grad);
            let clip = self.base.kernel_clip().map(R::param);
            return sgd_rows(b, rows, kernel, momentum, lr, wd, rescale, clip);
        }
        let lr = if skip {
            lr as f32
        } else {
            // `multi_sum_sq` of the weight and the gradient as stored (half precision in
            // multi-precision mode).
            let stored = b.master_of.unwrap_or(R::DTYPE);
            let w_norm = multi_sum_sq(b.weight, stored).sqrt();
            let g_sq = multi_sum_sq(b.grad, stored);
            if w_norm > 0.0 && g_sq > 0.0 {
                let rescale = self.base.rescale_grad as f32;
                (lr as f32) * (self.eta as f32) * w_norm
                    / (g_sq.sqrt() * rescale + (wd as f32) * w_norm + self.eps as f32)
            } else {
                lr as f32
            }
        };
        let lr = R::of(f64::from(lr));
        let wd = R::param(wd);
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        sgd_apply(b, momentum, lr, wd, rescale, clip);
    }
}

impl Optimizer for Lars {
    common!("lars");
    fn state_len(&self) -> usize {
        usize::from(self.momentum != 0.0)
    }
    fn row_sparse(&self, _key: &Key, multi_precision: bool) -> Result<RowSparse> {
        // As SGD's kernels: lazy unless on a master copy or with `lazy_update` false.
        Ok(if self.base.lazy_update && !multi_precision {
            RowSparse::Lazy
        } else {
            RowSparse::Rows
        })
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
    fn runtime_extra(&self, out: &mut BTreeMap<String, ParamValue>) {
        if let Some(v) = self.last_lr {
            out.insert("lars_last_lr".into(), ParamValue::Float(v));
        }
        if let Some(v) = self.cur_lr {
            out.insert("lars_cur_lr".into(), ParamValue::Float(v));
        }
    }
    fn restore_extra(&mut self, saved: &BTreeMap<String, ParamValue>) -> Result<()> {
        let mut p = Params::new("saved lars state", saved);
        self.last_lr = p.opt_f64("lars_last_lr")?;
        self.cur_lr = p.opt_f64("lars_cur_lr")?;
        Ok(())
    }
}
