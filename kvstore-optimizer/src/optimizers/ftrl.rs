//! `ftrl`: Follow the Regularized Leader (MXNet's `ftrl_update`):
//! `g' = clip(rescale_grad·g)`, `z += g' − (sqrt(n + g'²) − sqrt(n))·w/lr`, `n += g'²`,
//! `w = (sign(z)·lamda1 − z)/((beta + sqrt(n))/lr + wd)` where `|z| > lamda1`, else 0.
//!
//! Like MXNet, `learning_rate` (default 0.1) is kept by the optimizer itself, so with a
//! scheduler the scheduler's own `base_lr` applies.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, Buffers, Optimizer, Slices};
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
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) -> Result<()> {
        self.base.bump(key);
        let wd = R::param(self.base.wd_for(key));
        let lr = R::param(self.base.lr_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let (l1, beta) = (R::param(self.lamda1), R::param(self.beta));
        let (z, rest) = b.state.split_at_mut(1);
        let (z, n) = (&mut z[0], &mut rest[0]);
        for i in 0..b.weight.len() {
            let mut g = rescale * b.grad[i];
            if let Some(c) = clip {
                g = g.clip(c);
            }
            let w = b.weight[i];
            z[i] = z[i] + g - ((n[i] + g * g).sqrt() - n[i].sqrt()) * w / lr;
            n[i] = n[i] + g * g;
            b.weight[i] = if z[i].abs() > l1 {
                (z[i].sign() * l1 - z[i]) / ((beta + n[i].sqrt()) / lr + wd)
            } else {
                R::zero()
            };
        }
        Ok(())
    }
}

impl Optimizer for Ftrl {
    common!("ftrl");
    fn state_len(&self) -> usize {
        2
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) -> Result<()> {
        dispatch!(self.kernel(key, slices))
    }
}
