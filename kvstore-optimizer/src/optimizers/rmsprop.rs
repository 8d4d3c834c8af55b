//! `rmsprop`: RMSProp, plain (Tieleman & Hinton) or `centered` (Graves), MXNet's
//! `rmsprop_update` / `rmspropalex_update`:
//! `g' = clip(rescale_grad·g + wd·w)`, `n = (1 − gamma1)·g'² + gamma1·n`, then
//! plain: `w = w − lr·g'/sqrt(n + epsilon)`;
//! centered: `m = (1 − gamma1)·g' + gamma1·m`, `d = gamma2·d − lr·g'/sqrt(n − m² + epsilon)`,
//! `w = w + d`. With `clip_weights`, the new weight is clipped to `±clip_weights`.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map2, map4, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct RmsProp {
    base: Base,
    gamma1: f64,
    gamma2: f64,
    epsilon: f64,
    centered: bool,
    clip_weights: Option<f64>,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::Explicit(0.001), WEIGHT_OR_GAMMA)?;
    let gamma1 = p.f64_or("gamma1", 0.9)?;
    let gamma2 = p.f64_or("gamma2", 0.9)?;
    let epsilon = p.f64_or("epsilon", 1e-8)?;
    let centered = p.bool_or("centered", false)?;
    let clip_weights = p.opt_f64("clip_weights")?;
    end(
        p,
        &["gamma1", "gamma2", "epsilon", "centered", "clip_weights"],
    )?;
    Ok(Box::new(RmsProp {
        base,
        gamma1,
        gamma2,
        epsilon,
        centered,
        clip_weights,
    }))
}

register!(RMSPROP, "rmsprop", "RMSProp (plain or centered)", build);

impl RmsProp {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        self.base.bump(key);
        let lr = R::param(self.base.lr_for(key));
        let wd = R::param(self.base.wd_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let clip_w = self.clip_weights.filter(|c| *c > 0.0).map(R::param);
        let (g1, g2, eps) = (
            R::param(self.gamma1),
            R::param(self.gamma2),
            R::param(self.epsilon),
        );
        let one = R::of(1.0);
        let grad = |w: R, g: R| {
            let g = rescale * g + wd * w;
            clip.map_or(g, |c| g.clip(c))
        };
        let clip_w = |w: R| clip_w.map_or(w, |c| w.clip(c));
        if self.centered {
            let (weight, grads, [n, m, d]) = b.split();
            map4(weight, grads, n, m, d, |w, g, n, m, d| {
                let g = grad(w, g);
                let n = (one - g1) * g * g + g1 * n;
                let m = (one - g1) * g + g1 * m;
                // MXNet's RMSPropAlexUpdateKernel: (lr * g) / sqrt(...).
                let d = g2 * d - lr * g / (n - m * m + eps).sqrt();
                (clip_w(w + d), n, m, d)
            });
        } else {
            let (weight, grads, [n]) = b.split();
            map2(weight, grads, n, |w, g, n| {
                let g = grad(w, g);
                // MXNet's RMSPropUpdateKernel squares first (its centered kernel does not).
                let n = (one - g1) * (g * g) + g1 * n;
                (clip_w(w - lr * (g / (n + eps).sqrt())), n)
            });
        }
    }
}

impl Optimizer for RmsProp {
    common!("rmsprop");
    fn state_len(&self) -> usize {
        if self.centered {
            3
        } else {
            1
        }
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
