//! `ftrl`: Follow the Regularized Leader (MXNet's `ftrl_update`):
//! `g' = clip(rescale_grad·g)`, `z += g' − (sqrt(n + g'²) − sqrt(n))·w/lr`, `n += g'²`,
//! `w = (sign(z)·lamda1 − z)/((beta + sqrt(n))/lr + wd)` where `|z| > lamda1`, else 0.
//!
//! Like MXNet, `learning_rate` (default 0.1) is kept by the optimizer itself, so with a
//! scheduler the scheduler's own `base_lr` applies.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map3, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Ftrl {
    base: Base,
    lamda1: f64,
    beta: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::Private(0.1), WEIGHT_OR_GAMMA)?;
    let lamda1 = p.f64_or("lamda1", 0.01)?;
    let beta = p.f64_or("beta", 1.0)?;
    end(p, &["lamda1", "beta"])?;
    Ok(Box::new(Ftrl { base, lamda1, beta }))
}

register!(FTRL, "ftrl", "FTRL-Proximal", build);

impl Ftrl {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        self.base.bump(key);
        let wd = R::param(self.base.wd_for(key));
        let lr = R::param(self.base.lr_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let (l1, beta) = (R::param(self.lamda1), R::param(self.beta));
        let (weight, grad, [z, n]) = b.split();
        map3(weight, grad, z, n, |w, g, z, n| {
            let g = (rescale * g).clip_by(clip);
            // MXNet's `FtrlUpdateKernel`: `z += g - ...` (the difference first), and the
            // weight multiplied by `|z| > l1` (so a weight below the threshold is a zero of
            // the expression's sign).
            let z = z + (g - ((n + g * g).sqrt() - n.sqrt()) * w / lr);
            let n = n + g * g;
            let above = if z.abs() > l1 { R::of(1.0) } else { R::zero() };
            let w = (z.sign() * l1 - z) / ((beta + n.sqrt()) / lr + wd) * above;
            (w, z, n)
        });
    }
}

impl Optimizer for Ftrl {
    common!("ftrl");
    fn state_len(&self) -> usize {
        2
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
