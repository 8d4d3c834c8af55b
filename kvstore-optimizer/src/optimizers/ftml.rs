//! `ftml`: Follow the Moving Leader (MXNet's `ftml_update`).
//!
//! For update `t` of the key: `g' = clip(rescale_grad·g + wd·w)` (clipping after weight
//! decay), `v = beta2·v + (1 − beta2)·g'²`,
//! `d_t = (1 − beta1^t)/lr·(sqrt(v/(1 − beta2^t)) + epsilon)`,
//! `z = beta1·z + (1 − beta1)·g' − (d_t − beta1·d)·w`, `d = d_t`, `w = −z/d_t`.
//!
//! Hyper-parameters: `beta1` (0.6), `beta2` (0.999), `epsilon` (1e-8). State: `d`, `v`, then
//! `z`.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map4, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Ftml {
    base: Base,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::PassThrough, WEIGHT_OR_GAMMA)?;
    let beta1 = p.f64_or("beta1", 0.6)?;
    let beta2 = p.f64_or("beta2", 0.999)?;
    let epsilon = p.f64_or("epsilon", 1e-8)?;
    end(p, &["beta1", "beta2", "epsilon"])?;
    Ok(Box::new(Ftml {
        base,
        beta1,
        beta2,
        epsilon,
    }))
}

register!(FTML, "ftml", "FTML (Follow the Moving Leader)", build);

impl Ftml {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        let t = R::of(self.base.bump(key) as f64);
        let lr = R::param(self.base.lr_for(key));
        let wd = R::param(self.base.wd_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let (b1, b2) = (R::param(self.beta1), R::param(self.beta2));
        // `epsilon` is the kernel's one `double` parameter.
        let eps = R::of(self.epsilon);
        let one = R::one();
        let (one_b1, one_b2) = (one - b1, one - b2);
        let (bias1, bias2) = (one - b1.pow(t), one - b2.pow(t));
        let (weight, grad, [d, v, z]) = b.split();
        map4(weight, grad, d, v, z, |w, g, d, v, z| {
            let g = (rescale * g + wd * w).clip_by(clip);
            let v = b2 * v + one_b2 * (g * g);
            let d_t = bias1 / lr * ((v / bias2).sqrt() + eps);
            let z = b1 * z + one_b1 * g - (d_t - b1 * d) * w;
            (-z / d_t, d_t, v, z)
        });
    }
}

impl Optimizer for Ftml {
    common!("ftml");
    fn state_len(&self) -> usize {
        3
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
