//! `sgd`: stochastic gradient descent with momentum and weight decay.
//!
//! MXNet 1.9.1 runs dense SGD through its aggregated `multi_sgd(_mom)_update` kernels:
//! `g' = clip(rescale_grad·g, ±clip_gradient)`, `mom = momentum·mom − lr·wd·w − lr·g'`,
//! `w = w + mom` (with `mom = 0` and no state when `momentum` is 0).

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Sgd {
    base: Base,
    momentum: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::PassThrough, WEIGHT_OR_GAMMA)?;
    let momentum = p.f64_or("momentum", 0.0)?;
    end(p, &["momentum"])?;
    Ok(Box::new(Sgd { base, momentum }))
}

register!(SGD, "sgd", "SGD with momentum and weight decay", build);

/// One element of MXNet's `MultiSGDKernel`; returns the new weight and momentum.
#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgd_element<R: Real>(
    w: R,
    g: R,
    mom: R,
    momentum: R,
    lr: R,
    wd: R,
    rescale: R,
    clip: Option<R>,
) -> (R, R) {
    let step = match clip {
        Some(c) => lr * (rescale * g).clip(c),
        None => lr * rescale * g,
    };
    let mom = momentum * mom - lr * wd * w - step;
    (w + mom, mom)
}

impl Sgd {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) -> Result<()> {
        self.base.bump(key);
        let lr = R::param(self.base.lr_for(key));
        let wd = R::param(self.base.wd_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let has_mom = self.momentum > 0.0 && !b.state.is_empty();
        let momentum = if has_mom {
            R::param(self.momentum)
        } else {
            R::zero()
        };
        for i in 0..b.weight.len() {
            let mom = if has_mom { b.state[0][i] } else { R::zero() };
            let (w, mom) =
                sgd_element(b.weight[i], b.grad[i], mom, momentum, lr, wd, rescale, clip);
            b.weight[i] = w;
            if has_mom {
                b.state[0][i] = mom;
            }
        }
        Ok(())
    }
}

impl Optimizer for Sgd {
    common!("sgd");
    fn state_len(&self) -> usize {
        usize::from(self.momentum != 0.0)
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) -> Result<()> {
        dispatch!(self.kernel(key, slices))
    }
}
