//! `adam`: Adam (MXNet 1.9.1's `adam_update`).
//!
//! `lr_t = lr·sqrt(1 − beta2^t)/(1 − beta1^t)` for update `t` of the key;
//! `g' = clip(rescale_grad·g + wd·w)` (clipping after weight decay, as 1.x does);
//! `m = beta1·m + (1 − beta1)·g'`, `v = beta2·v + (1 − beta2)·g'²`,
//! `w = w − lr_t·m/(sqrt(v) + epsilon)`.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map3, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Adam {
    base: Base,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::Explicit(0.001), WEIGHT_OR_GAMMA)?;
    let beta1 = p.f64_or("beta1", 0.9)?;
    let beta2 = p.f64_or("beta2", 0.999)?;
    let epsilon = p.f64_or("epsilon", 1e-8)?;
    end(p, &["beta1", "beta2", "epsilon"])?;
    Ok(Box::new(Adam {
        base,
        beta1,
        beta2,
        epsilon,
    }))
}

register!(ADAM, "adam", "Adam", build);

impl Adam {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        let t = self.base.bump(key) as f64;
        let lr = self.base.lr_for(key);
        let wd = R::param(self.base.wd_for(key));
        let lr_t = lr * (1.0 - self.beta2.powf(t)).sqrt() / (1.0 - self.beta1.powf(t));
        let lr = R::param(lr_t);
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let (b1, b2, eps) = (
            R::param(self.beta1),
            R::param(self.beta2),
            R::param(self.epsilon),
        );
        let one = R::of(1.0);
        let (weight, grad, [m, v]) = b.split();
        map3(weight, grad, m, v, |w, g, m, v| {
            let mut g = g * rescale + w * wd;
            if let Some(c) = clip {
                g = g.clip(c);
            }
            let m = b1 * m + (one - b1) * g;
            let v = b2 * v + (one - b2) * g * g;
            (w - lr * m / (v.sqrt() + eps), m, v)
        });
    }
}

impl Optimizer for Adam {
    common!("adam");
    fn state_len(&self) -> usize {
        2
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
