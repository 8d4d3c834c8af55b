//! `signum`: SignSGD / Signum (MXNet's `signsgd_update` / `signum_update`).
//!
//! With momentum: `mom = momentum·mom − (1 − momentum)·(wd·w + clip(rescale_grad·g))`,
//! `w = (1 − lr·wd_lh)·w + lr·sign(mom)` (a negative momentum keeps the state and steps with
//! momentum 0, as MXNet). Without: `w = (1 − lr·wd)·w − lr·sign(g)`: MXNet's `signsgd_update`
//! ignores `rescale_grad` and `clip_gradient`.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map1, map2, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Signum {
    base: Base,
    momentum: f64,
    wd_lh: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::Explicit(0.01), WEIGHT_OR_GAMMA)?;
    let momentum = p.f64_or("momentum", 0.9)?;
    let wd_lh = p.f64_or("wd_lh", 0.0)?;
    end(p, &["momentum", "wd_lh"])?;
    Ok(Box::new(Signum {
        base,
        momentum,
        wd_lh,
    }))
}

register!(SIGNUM, "signum", "SignSGD / Signum", build);

impl Signum {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        self.base.bump(key);
        let lr = R::param(self.base.lr_for(key));
        let wd = R::param(self.base.wd_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let wd_lh = R::param(self.wd_lh);
        let one = R::of(1.0);
        let Buffers {
            weight,
            grad: grads,
            mut state,
            ..
        } = b;
        match state.first_mut() {
            // MXNet's Python keeps a momentum state whenever `momentum != 0`, but passes
            // `momentum` to `signum_update` only when positive (the kernel's default is 0).
            Some(mom) => {
                let mu = R::param(self.momentum.max(0.0));
                // `signum_update`: `(1 - mu) * clip(rescale * g)`, or, unclipped,
                // `(1 - mu) * rescale * g` (left to right).
                let decayed = |g: R| match clip {
                    Some(c) => (one - mu) * (rescale * g).clip(c),
                    None => (one - mu) * rescale * g,
                };
                map2(weight, grads, mom, |w, g, mom| {
                    let mom = mu * mom - (one - mu) * wd * w - decayed(g);
                    ((one - lr * wd_lh) * w + lr * mom.sign(), mom)
                });
            }
            // `signsgd_update`: the sign of the raw gradient (rescaling and clipping cannot
            // change it, MXNet's kernel ignores them).
            None => map1(weight, grads, |w, g| (one - lr * wd) * w - lr * g.sign()),
        }
    }
}

impl Optimizer for Signum {
    common!("signum");
    fn state_len(&self) -> usize {
        usize::from(self.momentum != 0.0)
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
