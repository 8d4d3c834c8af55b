//! `nag`: Nesterov accelerated gradient.
//!
//! With momentum, MXNet's `nag_mom_update` (run in place, so the momentum's weight-decay term
//! reads the already-updated weight): `g' = clip(rescale_grad·g) + wd·w`, `mom = momentum·mom`,
//! `w' = w − mom + (momentum + 1)·(mom − lr·g')`, then `mom = mom − lr·(clip(rescale_grad·g) + wd·w')`.
//! Without momentum, `sgd_update`: `w = (1 − lr·wd)·w − lr·clip(rescale_grad·g)`.
//!
//! A row-sparse gradient ([`Updater::update`](crate::Updater::update)) updates only its rows
//! without momentum (`sgd_update`'s lazy update: a gradient without rows changes nothing),
//! unless with `multi_precision` (`mp_sgd_update`, dense); with momentum, every row, as the
//! dense gradient it stands for. `lazy_update` has no effect (MXNet's NAG does not take it).

use kvstore_base::{Key, OptimizerSpec, Result};

use super::sgd::{plain_sgd, sgd_rows, SparseSgd};
use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map1, map2, Buffers, Optimizer, RowSparse, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Nag {
    base: Base,
    momentum: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::PassThrough, WEIGHT_OR_GAMMA)?;
    let momentum = p.f64_or("momentum", 0.0)?;
    end(p, &["momentum"])?;
    Ok(Box::new(Nag { base, momentum }))
}

register!(NAG, "nag", "Nesterov accelerated gradient", build);

impl Nag {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        self.base.bump(key);
        let lr = R::param(self.base.lr_for(key));
        let wd = R::param(self.base.wd_for(key));
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        if let Some(rows) = b.rows {
            return sgd_rows(b, rows, SparseSgd::Lazy, None, lr, wd, rescale, clip);
        }
        let Buffers {
            weight,
            grad,
            mut state,
            ..
        } = b;
        match state.first_mut() {
            // MXNet's Python keeps a momentum state whenever `momentum != 0`, but passes
            // `momentum` to `nag_mom_update` only when positive (the kernel's default is 0).
            Some(mom) => {
                let mu = R::param(self.momentum.max(0.0));
                let mu1 = mu + R::of(1.0);
                map2(weight, grad, mom, |w, g, mom| {
                    let g = match clip {
                        Some(c) => (rescale * g).clip(c),
                        None => rescale * g,
                    };
                    let mom = mu * mom;
                    let w_new = w - mom + mu1 * (mom - lr * (g + wd * w));
                    (w_new, mom - lr * (g + wd * w_new))
                });
            }
            _ => map1(weight, grad, |w, g| plain_sgd(w, g, lr, wd, rescale, clip)),
        }
    }
}

impl Optimizer for Nag {
    common!("nag");
    fn state_len(&self) -> usize {
        usize::from(self.momentum != 0.0)
    }
    fn row_sparse(&self, _key: &Key, multi_precision: bool) -> Result<RowSparse> {
        // Without momentum, MXNet runs `sgd_update` with its lazy default.
        Ok(if self.momentum != 0.0 || multi_precision {
            RowSparse::Dense
        } else {
            RowSparse::Lazy
        })
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
