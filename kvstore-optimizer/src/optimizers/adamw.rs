//! `adamw`: Adam with decoupled weight decay.
//!
//! MXNet 1.9.1 has no `adamw` optimizer class, only the `contrib.adamw_update` operator:
//! `g' = clip(rescale_grad·g)`, `m = beta1·m + (1 − beta1)·g'`, `v = beta2·v + (1 − beta2)·g'²`,
//! `w = w − eta·(lr·m/(sqrt(v) + epsilon) + wd·w)`. This optimizer drives it with
//! `eta` = the key's learning rate (scheduled, times `lr_mult`) and
//! `lr` = the bias correction `sqrt(1 − beta2^t)/(1 − beta1^t)`, so the decay is
//! `learning_rate·wd·w` per update, as in Loshchilov & Hutter's AdamW.

use kvstore_base::{DType, Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map3, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct AdamW {
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
    Ok(Box::new(AdamW {
        base,
        beta1,
        beta2,
        epsilon,
    }))
}

register!(ADAMW, "adamw", "Adam with decoupled weight decay", build);

/// Hyper-parameters of one AdamW step, in the kernel's arithmetic.
struct Step<C> {
    eta: C,
    lr: C,
    wd: C,
    rescale: C,
    clip: Option<C>,
    b1: C,
    b2: C,
    eps: C,
}

impl<C: Real> Step<C> {
    /// One element; returns the new weight, mean and variance.
    fn element(&self, w: C, g: C, m: C, v: C) -> (C, C, C) {
        let one = C::of(1.0);
        let mut g = g * self.rescale;
        if let Some(c) = self.clip {
            g = g.clip(c);
        }
        let m = self.b1 * m + (one - self.b1) * g;
        let v = self.b2 * v + (one - self.b2) * g * g;
        let w = w - self.eta * (self.lr * m / (v.sqrt() + self.eps) + self.wd * w);
        (w, m, v)
    }
}

impl AdamW {
    fn step<C: Real>(&mut self, key: &Key) -> Step<C> {
        let t = self.base.bump(key) as f64;
        Step {
            eta: C::param(self.base.lr_for(key)),
            wd: C::param(self.base.wd_for(key)),
            lr: C::param((1.0 - self.beta2.powf(t)).sqrt() / (1.0 - self.beta1.powf(t))),
            rescale: C::param(self.base.rescale_grad),
            clip: self.base.kernel_clip().map(C::param),
            b1: C::param(self.beta1),
            b2: C::param(self.beta2),
            eps: C::param(self.epsilon),
        }
    }

    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        // MXNet's adamw kernels compute half-precision elements in float.
        let half = matches!(R::DTYPE, DType::F16 | DType::BF16);
        let (weight, grad, [m, v]) = b.split();
        if half {
            let s: Step<f32> = self.step(key);
            let f = |x: R| x.to_f64() as f32;
            let r = |x: f32| R::of(f64::from(x));
            map3(weight, grad, m, v, |w, g, m, v| {
                let (w, m, v) = s.element(f(w), f(g), f(m), f(v));
                (r(w), r(m), r(v))
            });
        } else {
            let s: Step<R> = self.step(key);
            map3(weight, grad, m, v, |w, g, m, v| s.element(w, g, m, v));
        }
    }
}

impl Optimizer for AdamW {
    common!("adamw");
    fn state_len(&self) -> usize {
        2
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
