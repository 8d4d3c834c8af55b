//! `adagrad`: AdaGrad, as MXNet 1.9.1's dense path computes it with NDArray operations:
//! `g' = clip(rescale_grad·g)`, `h += g'²`, `w += (g'/sqrt(h + eps) + wd·w)·(−lr)`.
//!
//! A row-sparse gradient ([`Updater::update`](crate::Updater::update)) goes through MXNet's
//! sparse `adagrad_update`, also on the master copy with `multi_precision`: only the
//! gradient's rows of the weight and the history change, by `h += g'²`,
//! `w = w − lr·g'/sqrt(h + eps)` (a gradient without rows changes nothing). Like MXNet, it
//! refuses weight decay (a key whose `wd` is not 0 is an error, before anything changes), and
//! clips only with a `clip_gradient` above 0.

use kvstore_base::{Error, Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map2, Buffers, Optimizer, RowSparse, Slices};
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
        let (weight, grad, [h], rows) = b.split_rows();
        if let Some(rows) = rows {
            // `_sparse_adagrad_update`: float parameters, clipping only when above 0.
            let lr = R::param(lr);
            let rescale = R::param(self.base.rescale_grad);
            let clip = self.base.kernel_clip().map(R::param);
            let eps = R::param(self.eps);
            for (r, g) in rows.spans() {
                map2(&mut weight[r.clone()], &grad[g], &mut h[r], |w, g, h| {
                    let g = (g * rescale).clip_by(clip);
                    let h = h + g * g;
                    (w - g / (h + eps).sqrt() * lr, h)
                });
            }
            return;
        }
        let wd = R::of(self.base.wd_for(key));
        let neg_lr = R::of(-lr);
        let rescale = R::of(self.base.rescale_grad);
        let clip = self.base.clip_gradient.map(R::param);
        let eps = R::of(self.eps);
        map2(weight, grad, h, |w, g, h| {
            let g = (g * rescale).clip_by(clip);
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
    fn row_sparse(&self, key: &Key, _multi_precision: bool) -> Result<RowSparse> {
        let wd = self.base.wd_for(key);
        if wd as f32 != 0.0 {
            return Err(Error::InvalidArgument(format!(
                "adagrad's update with a row-sparse gradient does not support weight decay \
                 (wd {wd} for this key), as MXNet's sparse adagrad_update: use wd 0, or a \
                 dense gradient"
            )));
        }
        Ok(RowSparse::Lazy)
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
