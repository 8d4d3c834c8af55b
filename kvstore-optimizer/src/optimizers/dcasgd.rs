//! `dcasgd`: SGD with delay compensation for asynchronous training, as MXNet computes it with
//! NDArray operations.
//!
//! `g' = clip(rescale_grad·g)`, `δ = −lr·(g' + wd·w + lamda·g'²·(w − w_prev))`; with
//! `momentum`, `mom = momentum·mom + δ` and the step is `mom`, else the step is `δ`; then
//! `w_prev = w`, `w = w + step`.
//!
//! Hyper-parameters: `momentum` (0), `lamda` (0.04). State: the momentum (only when
//! `momentum` is not 0), then the previous weight, which starts as a copy of the weight.
//!
//! MXNet 1.9.1's own `DCASGD` fails on every update when `momentum` is not 0 (it tests the
//! momentum array's truth value); with momentum, this runs the update its code spells out,
//! `mom = momentum·mom − lr·(…)`, with the same `δ`.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map2, map3, Buffers, Optimizer, Slices, StateInit};
use crate::real::Real;

#[derive(Debug)]
struct DcaSgd {
    base: Base,
    momentum: f64,
    lamda: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::PassThrough, WEIGHT_OR_GAMMA)?;
    let momentum = p.f64_or("momentum", 0.0)?;
    let lamda = p.f64_or("lamda", 0.04)?;
    end(p, &["momentum", "lamda"])?;
    Ok(Box::new(DcaSgd {
        base,
        momentum,
        lamda,
    }))
}

register!(
    DCASGD,
    "dcasgd",
    "SGD with delay compensation (DC-ASGD)",
    build
);

impl DcaSgd {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        self.base.bump(key);
        let neg_lr = R::of(-self.base.lr_for(key));
        let wd = R::of(self.base.wd_for(key));
        let rescale = R::of(self.base.rescale_grad);
        let clip = self.base.clip_gradient.map(R::param);
        let lamda = R::of(self.lamda);
        let delta = move |w: R, g: R, prev: R| {
            let g = (g * rescale).clip_by(clip);
            (g + w * wd + g * lamda * g * (w - prev)) * neg_lr
        };
        if self.momentum != 0.0 {
            let mu = R::of(self.momentum);
            let (weight, grad, [mom, prev]) = b.split();
            map3(weight, grad, mom, prev, |w, g, mom, prev| {
                let mom = mom * mu + delta(w, g, prev);
                (w + mom, mom, w)
            });
        } else {
            let (weight, grad, [prev]) = b.split();
            map2(weight, grad, prev, |w, g, prev| (w + delta(w, g, prev), w));
        }
    }
}

impl Optimizer for DcaSgd {
    common!("dcasgd");
    fn state_len(&self) -> usize {
        1 + usize::from(self.momentum != 0.0)
    }
    fn state_init(&self, index: usize) -> StateInit {
        if index + 1 == self.state_len() {
            StateInit::Weight
        } else {
            StateInit::Zeros
        }
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
