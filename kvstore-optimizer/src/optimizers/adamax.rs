//! `adamax`: AdaMax, Adam's variant with the infinity norm, as MXNet 1.9.1 computes it with
//! NDArray operations.
//!
//! `lr_t = lr/(1 − beta1^t)` for update `t` of the key;
//! `g' = clip(rescale_grad·g + wd·w)` (clipping after weight decay);
//! `m = beta1·m + (1 − beta1)·g'`, `u = max(beta2·u, |g'|)`, `w = w − lr_t·m/u`.
//!
//! Hyper-parameters: `beta1` (0.9), `beta2` (0.999); `learning_rate` defaults to 0.002.
//! State: `m`, then `u`.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map3, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Adamax {
    base: Base,
    beta1: f64,
    beta2: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::Explicit(0.002), WEIGHT_OR_GAMMA)?;
    let beta1 = p.f64_or("beta1", 0.9)?;
    let beta2 = p.f64_or("beta2", 0.999)?;
    end(p, &["beta1", "beta2"])?;
    Ok(Box::new(Adamax { base, beta1, beta2 }))
}

register!(
    ADAMAX,
    "adamax",
    "AdaMax (Adam with the infinity norm)",
    build
);

/// mshadow's `maximum`: `a` when it is NaN or the larger, else `b`.
#[inline(always)]
fn maximum<R: Real>(a: R, b: R) -> R {
    if a.partial_cmp(&a).is_none() || a > b {
        a
    } else {
        b
    }
}

impl Adamax {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        let t = self.base.bump(key) as f64;
        let lr = self.base.lr_for(key) / (1.0 - self.beta1.powf(t));
        let lr = R::of(lr);
        let wd = R::of(self.base.wd_for(key));
        let rescale = R::of(self.base.rescale_grad);
        let clip = self.base.clip_gradient.map(R::param);
        let (b1, one_b1, b2) = (
            R::of(self.beta1),
            R::of(1.0 - self.beta1),
            R::of(self.beta2),
        );
        let (weight, grad, [m, u]) = b.split();
        map3(weight, grad, m, u, |w, g, m, u| {
            let g = (g * rescale + w * wd).clip_by(clip);
            let m = m * b1 + g * one_b1;
            let u = maximum(u * b2, g.abs());
            (w - m * lr / u, m, u)
        });
    }
}

impl Optimizer for Adamax {
    common!("adamax");
    fn state_len(&self) -> usize {
        2
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
