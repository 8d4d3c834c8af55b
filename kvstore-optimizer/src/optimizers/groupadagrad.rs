//! `groupadagrad`: AdaGrad with one history value per row (MXNet 1.9.1's
//! `mx.optimizer.contrib.GroupAdaGrad`, registered as `groupadagrad`), as its dense path
//! computes it with NDArray operations.
//!
//! For a 2-D weight: `g' = clip(rescale_grad·g)`, `h_r += mean_j(g'_rj²)` (the row's squares
//! summed with compensated summation, then divided by the row length, as MXNet's `mean`),
//! `w_rj −= lr·g'_rj/sqrt(h_r + eps)`.
//!
//! A row-sparse gradient ([`Updater::update`](crate::Updater::update)) goes through MXNet's
//! `contrib.group_adagrad_update`, also on the master copy with `multi_precision`: only the
//! gradient's rows of the weight and the history change (a gradient without rows changes
//! nothing), the row's squares summed one after the other then divided by the row length, and
//! clipping only with a `clip_gradient` above 0.
//!
//! Hyper-parameters: `eps` (1e-5). State: the history, of shape `[rows, 1]` (so
//! [`sliced::split`](crate::sliced::split) cuts it only for keys kept by rows, by rows: a
//! distributed store's row-sparse keys, and its dense keys placed in whole rows). Weight decay
//! is not supported: a `wd` other than 0 is an error when the optimizer is built (MXNet fails
//! at the update), and the update of a weight that is not 2-D is an error.

use kvstore_base::{Error, Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, Buffers, Optimizer, RowSparse, Rows, Slices};
use crate::real::Real;

#[derive(Debug)]
struct GroupAdaGrad {
    base: Base,
    eps: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::PassThrough, WEIGHT_OR_GAMMA)?;
    let eps = p.f64_or("eps", 1e-5)?;
    end(p, &["eps"])?;
    Ok(Box::new(GroupAdaGrad { base, eps }))
}

register!(
    GROUPADAGRAD,
    "groupadagrad",
    "AdaGrad with row-wise learning rates",
    build
);

impl GroupAdaGrad {
    /// `group_adagrad_update`'s sparse kernel (float parameters) on the gradient's rows.
    fn rows<R: Real>(&self, lr: f64, b: Buffers<'_, R>, rows: Rows<'_>) {
        let lr = R::param(lr);
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let eps = R::param(self.eps);
        if rows.len == 0 {
            return; // rows of no elements: nothing to update (as the dense path)
        }
        let count = R::of(rows.len as f64);
        let (weight, grad, [history]) = b.split();
        for (&id, (r, g)) in rows.ids.iter().zip(rows.spans()) {
            let (w, g) = (&mut weight[r], &grad[g]);
            let mut sum = R::zero();
            for &g in g {
                let g = (g * rescale).clip_by(clip);
                sum = sum + g * g;
            }
            let h = &mut history[id];
            *h = *h + sum / count;
            let root = (*h + eps).sqrt();
            for (w, &g) in w.iter_mut().zip(g) {
                *w = *w - lr * (g * rescale).clip_by(clip) / root;
            }
        }
    }

    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        self.base.bump(key);
        if let Some(rows) = b.rows {
            let lr = self.base.lr_for(key);
            return self.rows(lr, b, rows);
        }
        let lr = R::of(self.base.lr_for(key));
        let rescale = R::of(self.base.rescale_grad);
        let clip = self.base.clip_gradient.map(R::param);
        let eps = R::of(self.eps);
        let (weight, grad, [history]) = b.split();
        let rows = history.len();
        if rows == 0 || weight.is_empty() {
            return;
        }
        let cols = weight.len() / rows;
        let count = R::of(cols as f64);
        for ((w, g), h) in weight
            .chunks_exact_mut(cols)
            .zip(grad.chunks_exact(cols))
            .zip(history.iter_mut())
        {
            // mshadow's sum reducer: Kahan summation.
            let (mut sum, mut residual) = (R::zero(), R::zero());
            for &g in g {
                let g = (g * rescale).clip_by(clip);
                let y = g * g - residual;
                let t = sum + y;
                residual = t - sum - y;
                sum = t;
            }
            *h = *h + sum / count;
            let root = (*h + eps).sqrt();
            for (w, &g) in w.iter_mut().zip(g) {
                *w = *w - lr * (g * rescale).clip_by(clip) / root;
            }
        }
    }
}

impl Optimizer for GroupAdaGrad {
    common!("groupadagrad");
    fn state_len(&self) -> usize {
        1
    }
    fn state_shape(&self, _index: usize, weight: &[usize]) -> Result<Vec<usize>> {
        match weight {
            [rows, _] => Ok(vec![*rows, 1]),
            _ => Err(Error::InvalidArgument(format!(
                "optimizer \"groupadagrad\" updates 2-D weights only, this one has shape \
                 {weight:?}"
            ))),
        }
    }
    fn row_sparse(&self, _key: &Key, _multi_precision: bool) -> Result<RowSparse> {
        Ok(RowSparse::Lazy)
    }
    /// MXNet asserts, at each update, that the key's weight decay is 0: a global `wd` is
    /// fine for keys whose `wd_mult` (or name, through `param_idx2name`) makes it 0.
    fn check_key(&self, key: &Key) -> Result<()> {
        let wd = self.base.wd_for(key);
        if wd != 0.0 {
            return Err(Error::InvalidArgument(format!(
                "optimizer \"groupadagrad\" does not support weight decay: key {key} has {wd} \
                 (set wd to 0, or its wd_mult to 0)"
            )));
        }
        Ok(())
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
