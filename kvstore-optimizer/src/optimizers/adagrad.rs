//! `adagrad`: AdaGrad, as MXNet 1.9.1's dense path computes it with NDArray operations:
//! `g' = clip(rescale_grad·g)`, `h += g'²`, `w += (g'/sqrt(h + eps) + wd·w)·(−lr)`.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map2, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct AdaGrad {
    base: Base,
    eps: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::PassThrough, WEIGHT_OR_GAMMA)?;
    let eps = p.f64_or("eps", 1e-7)?;
    end(p, &["eps"])?;
    Ok(Box::new(AdaGrad { base, eps }))
}

register!(ADAGRAD, "adagrad", "AdaGrad", build);

impl AdaGrad {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        self.base.bump(key);
        let lr = self.base.lr_for(key);
        let wd = R::of(self.base.wd_for(key));
        let neg_lr = R::of(-lr);
        let rescale = R::of(self.base.rescale_grad);
        let clip = self.base.clip_gradient.map(R::param);
        let eps = R::of(self.eps);
        let (weight, grad, [h]) = b.split();
        map2(weight, grad, h, |w, g, h| {
            let mut g = g * rescale;
            if let Some(c) = clip {
                g = g.clip(c);
            }
            let h = h + g * g;
            let div = g / (h + eps).sqrt();
            (w + (div + w * wd) * neg_lr, h)
        });
    }
}

impl Optimizer for AdaGrad {
    common!("adagrad");
    fn state_len(&self) -> usize {
        1
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
