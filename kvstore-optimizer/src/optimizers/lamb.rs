//! `lamb`: LAMB (MXNet 1.9.1 runs it through `multi_lamb_update`).
//!
//! `g' = clip(rescale_grad·g)`, `m = beta1·m + (1 − beta1)·g'`, `v = beta2·v + (1 − beta2)·g'²`,
//! `u = m̂/(sqrt(v̂) + epsilon) + wd·w` (with `m̂, v̂` bias-corrected when `bias_correction`),
//! `r1 = ‖w‖` (raised to `lower_bound`, lowered to `upper_bound` when given), `r2 = ‖u‖`,
//! `w −= lr·(r1/r2)·u` (`lr·u` when either norm is 0). Norms are over the whole array.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, Buffers, Optimizer, Slices};
use crate::real::{sum_sq, Real, SumSq};

#[derive(Debug)]
struct Lamb {
    base: Base,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    lower_bound: Option<f64>,
    upper_bound: Option<f64>,
    bias_correction: bool,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::Explicit(0.001), WEIGHT_OR_GAMMA)?;
    let beta1 = p.f64_or("beta1", 0.9)?;
    let beta2 = p.f64_or("beta2", 0.999)?;
    let epsilon = p.f64_or("epsilon", 1e-6)?;
    let lower_bound = p.opt_f64("lower_bound")?;
    let upper_bound = p.opt_f64("upper_bound")?;
    let bias_correction = p.bool_or("bias_correction", true)?;
    end(
        p,
        &[
            "beta1",
            "beta2",
            "epsilon",
            "lower_bound",
            "upper_bound",
            "bias_correction",
        ],
    )?;
    Ok(Box::new(Lamb {
        base,
        beta1,
        beta2,
        epsilon,
        lower_bound,
        upper_bound,
        bias_correction,
    }))
}

register!(LAMB, "lamb", "LAMB (layer-wise adaptive moments)", build);

impl Lamb {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        // Past `i32::MAX` updates (a `begin_num_update` or a state file may start there) the
        // powers are 0 at any precision: saturate rather than wrap to a negative exponent.
        let t = i32::try_from(self.base.bump(key)).unwrap_or(i32::MAX);
        let lr = f64::from(self.base.lr_for(key) as f32);
        let wide = R::DTYPE == kvstore_base::DType::F64;
        let wd = R::param(self.base.wd_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let (b1, b2, eps) = (
            R::param(self.beta1),
            R::param(self.beta2),
            R::param(self.epsilon),
        );
        let one = R::of(1.0);
        let corr = |beta: f64| {
            if wide {
                1.0 - f64::from(beta as f32).powi(t)
            } else {
                f64::from(1.0 - (beta as f32).powi(t))
            }
        };
        let (c1, c2) = if self.bias_correction {
            (R::of(corr(self.beta1)), R::of(corr(self.beta2)))
        } else {
            (one, one)
        };
        let (weight, grad, [m, v]) = b.split();
        // The update direction `u`, from the new moments and the old weight.
        let direction = |w: R, m: R, v: R| {
            let (mh, vh) = (m / c1, v / c2);
            mh / (vh.sqrt() + eps) + wd * w
        };
        // Pass 1: the moments, and ‖u‖ without storing `u`; pass 2 recomputes `u` (same
        // inputs, same bits) to move the weight, once both norms are known.
        let mut u_sq = SumSq::new::<R>();
        for (((&w, &g), m), v) in weight.iter().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = (g * rescale).clip_by(clip);
            *m = b1 * *m + (one - b1) * g;
            *v = b2 * *v + (one - b2) * g * g;
            u_sq.add(direction(w, *m, *v));
        }
        let mut r1 = sum_sq(weight).sqrt();
        let r2 = u_sq.get().sqrt();
        if let Some(lb) = self.lower_bound.filter(|x| *x > 0.0) {
            r1 = r1.max(f64::from(lb as f32));
        }
        if let Some(ub) = self.upper_bound.filter(|x| *x > 0.0) {
            r1 = r1.min(f64::from(ub as f32));
        }
        let lr_adj = if r1 == 0.0 || r2 == 0.0 {
            lr
        } else if wide {
            lr * (r1 / r2)
        } else {
            f64::from(lr as f32 * (r1 as f32 / r2 as f32))
        };
        let lr_adj = R::of(lr_adj);
        for ((w, &m), &v) in weight.iter_mut().zip(&*m).zip(&*v) {
            *w = *w - lr_adj * direction(*w, m, v);
        }
    }
}

impl Optimizer for Lamb {
    common!("lamb");
    fn state_len(&self) -> usize {
        2
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
