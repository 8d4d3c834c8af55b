//! `sgd`: stochastic gradient descent with momentum and weight decay.
//!
//! MXNet 1.9.1 runs dense SGD through its aggregated `multi_sgd(_mom)_update` kernels:
//! `g' = clip(rescale_grad·g, ±clip_gradient)`, `mom = momentum·mom − lr·wd·w − lr·g'`,
//! `w = w + mom` (with `mom = 0` and no state when `momentum` is 0).
//!
//! `ccsgd`, the deprecated name MXNet 1.x keeps for the same optimizer, builds it too (and
//! keeps its own name, so a saved optimizer comes back as `ccsgd`).

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map1, map2, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Sgd {
    name: &'static str,
    base: Base,
    momentum: f64,
}

fn build_named(spec: &OptimizerSpec, name: &'static str) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::PassThrough, WEIGHT_OR_GAMMA)?;
    let momentum = p.f64_or("momentum", 0.0)?;
    end(p, &["momentum"])?;
    Ok(Box::new(Sgd {
        name,
        base,
        momentum,
    }))
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    build_named(spec, "sgd")
}

fn build_ccsgd(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    build_named(spec, "ccsgd")
}

register!(SGD, "sgd", "SGD with momentum and weight decay", build);
register!(
    CCSGD,
    "ccsgd",
    "SGD under its deprecated MXNet 1.x name (the same updates)",
    build_ccsgd
);

/// One element of MXNet's `MultiSGDKernel`; returns the new weight and momentum.
#[inline(always)]
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

/// [`sgd_element`] over the buffers: with `momentum` (and a state array) the state is the
/// momentum, else the momentum is 0 and nothing is stored.
#[inline]
pub(crate) fn sgd_apply<R: Real>(
    b: Buffers<'_, R>,
    momentum: Option<R>,
    lr: R,
    wd: R,
    rescale: R,
    clip: Option<R>,
) {
    let Buffers {
        weight,
        grad,
        mut state,
    } = b;
    match (momentum, state.first_mut()) {
        (Some(mu), Some(mom)) => map2(weight, grad, mom, |w, g, m| {
            sgd_element(w, g, m, mu, lr, wd, rescale, clip)
        }),
        _ => map1(weight, grad, |w, g| {
            sgd_element(w, g, R::zero(), R::zero(), lr, wd, rescale, clip).0
        }),
    }
}

impl Sgd {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        self.base.bump(key);
        let lr = R::param(self.base.lr_for(key));
        let wd = R::param(self.base.wd_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let momentum = (self.momentum > 0.0).then(|| R::param(self.momentum));
        sgd_apply(b, momentum, lr, wd, rescale, clip);
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn base(&self) -> &Base {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Base {
        &mut self.base
    }
    fn state_len(&self) -> usize {
        usize::from(self.momentum != 0.0)
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
