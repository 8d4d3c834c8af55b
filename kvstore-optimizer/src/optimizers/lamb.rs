//! `lamb`: LAMB (MXNet 1.9.1 runs it through `multi_lamb_update`).
//!
//! `g' = clip(rescale_grad·g)`, `m = beta1·m + (1 − beta1)·g'`, `v = beta2·v + (1 − beta2)·g'²`,
//! `u = m̂/(sqrt(v̂) + epsilon) + wd·w` (with `m̂, v̂` bias-corrected when `bias_correction`),
//! `r1 = ‖w‖` (raised to `lower_bound`, lowered to `upper_bound` when given), `r2 = ‖u‖`,
//! `w −= lr·(r1/r2)·u` (`lr·u` when either norm is 0). Norms are over the whole array.

use kvstore_base::{DType, Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, Buffers, Optimizer, Slices};
use crate::real::{multi_sum_sq, Real};

#[derive(Debug)]
struct Lamb {
    base: Base,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    lower_bound: Option<f64>,
    upper_bound: Option<f64>,
    bias_correction: bool,
    /// The update direction of the key being updated, as the `float`s MXNet keeps it in
    /// (`temp_g`); reused from key to key.
    direction: Vec<f32>,
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
        direction: Vec::new(),
    }))
}

register!(LAMB, "lamb", "LAMB (layer-wise adaptive moments)", build);

impl Lamb {
    /// MXNet's `multi_lamb_update` (`multi_mp_lamb_update` on a master copy), operation for
    /// operation: the moments in the weight's arithmetic; the direction `u` in `double` and
    /// rounded to `float` (the kernel keeps it in a `float` buffer, even for a `float64`
    /// weight); the norms by `multi_sum_sq` (`r1` of the weight as stored, so of the
    /// half-precision weight in multi-precision mode, `r2` of the `float` direction); the
    /// trust ratio in `float`.
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        // Past `i32::MAX` updates (a `begin_num_update` or a state file may start there) the
        // powers are 0 at any precision: saturate rather than wrap to a negative exponent.
        let t = i32::try_from(self.base.bump(key)).unwrap_or(i32::MAX);
        let lr = f64::from(self.base.lr_for(key) as f32);
        let wide = R::DTYPE == DType::F64;
        let stored = b.master_of.unwrap_or(R::DTYPE);
        let wd = R::param(self.base.wd_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let (b1, b2, eps) = (
            R::param(self.beta1),
            R::param(self.beta2),
            R::param(self.epsilon),
        );
        let one = R::one();
        // `1 - beta^t`, mshadow's `power` (`pow`, `powf`) of the `float` beta and the step
        // count: in `double` for a `float64` weight, in `float` otherwise (half-precision
        // weights too: MXNet 1.9.1's results match only so).
        let corr = |beta: f64| {
            let beta = beta as f32;
            if wide {
                R::of(1.0 - f64::from(beta).powf(f64::from(t)))
            } else {
                R::of(f64::from(1.0 - beta.powf(t as f32)))
            }
        };
        let (c1, c2) = if self.bias_correction {
            (corr(self.beta1), corr(self.beta2))
        } else {
            (one, one)
        };
        let (weight, grad, [m, v]) = b.split();
        // The update direction `u` (from the new moments and the old weight), as the `float`
        // it is kept in: `sqrt` is C's `double` one, so the quotient and the sum are `double`.
        let half = matches!(R::DTYPE, DType::F16 | DType::BF16);
        let direction = |w: R, m: R, v: R| -> R {
            let (mh, vh) = (m / c1, v / c2);
            if half {
                return mh / (vh.sqrt() + eps) + wd * w;
            }
            let u = mh.to_f64() / (vh.to_f64().sqrt() + eps.to_f64()) + (wd * w).to_f64();
            R::of(f64::from(u as f32))
        };
        // Pass 1: the moments and `u` (exact in `f32` for every arithmetic); then the norms.
        let us = &mut self.direction;
        us.clear();
        us.extend(
            weight
                .iter()
                .zip(grad)
                .zip(m.iter_mut())
                .zip(v.iter_mut())
                .map(|(((&w, &g), m), v)| {
                    let g = (g * rescale).clip_by(clip);
                    *m = b1 * *m + (one - b1) * g;
                    *v = b2 * *v + (one - b2) * g * g;
                    direction(w, *m, *v).to_f64() as f32
                }),
        );
        let mut r1 = multi_sum_sq(weight, stored).sqrt();
        let r2 = multi_sum_sq(us, DType::F32).sqrt();
        // `std::max` / `std::min`: a NaN norm stays NaN.
        if let Some(lb) = self.lower_bound.filter(|x| *x > 0.0) {
            let lb = lb as f32;
            r1 = if r1 < lb { lb } else { r1 };
        }
        if let Some(ub) = self.upper_bound.filter(|x| *x > 0.0) {
            let ub = ub as f32;
            r1 = if ub < r1 { ub } else { r1 };
        }
        let ratio = if r1 == 0.0 || r2 == 0.0 { 1.0 } else { r1 / r2 };
        // The learning rate (a `float`) times the ratio, in the weight's arithmetic.
        let lr_adj = if wide {
            R::of(lr * f64::from(ratio))
        } else {
            R::of(f64::from(lr as f32 * ratio))
        };
        for (w, &u) in weight.iter_mut().zip(us.iter()) {
            *w = *w - lr_adj * R::of(f64::from(u));
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
