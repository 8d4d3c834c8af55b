//! `sgd`: stochastic gradient descent with momentum and weight decay.
//!
//! MXNet 1.9.1 runs dense SGD through its aggregated `multi_sgd(_mom)_update` kernels:
//! `g' = clip(rescale_grad·g, ±clip_gradient)`, `mom = momentum·mom − lr·wd·w − lr·g'`,
//! `w = w + mom` (with `mom = 0` and no state when `momentum` is 0).
//!
//! A row-sparse gradient goes through MXNet's non-aggregated kernels instead
//! ([`Updater::update`](crate::Updater::update)):
//! - with `lazy_update` (the default), only the gradient's rows of the weight and the momentum
//!   change, by the formula above with momentum, and by `sgd_update`'s
//!   `w = (1 − lr·wd)·w − lr·g'` without; a gradient without rows changes nothing;
//! - with `lazy_update` false and momentum, every row as above (rows the gradient does not
//!   hold with `g = 0`); without momentum, every row is first scaled by `1 − lr·wd` (computed
//!   in `float`), then the gradient's rows get `w = w − lr·g'`;
//! - with `multi_precision` (on a half-precision weight), every row: with momentum as above,
//!   without it by `mp_sgd_update`'s `w = (1 − lr·wd)·w − lr·g'` on the master copy.
//!
//! `ccsgd`, the deprecated name MXNet 1.x keeps for the same optimizer, builds it too (and
//! keeps its own name, so a saved optimizer comes back as `ccsgd`).

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map1, map2, Buffers, Optimizer, RowSparse, Rows, Slices};
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

/// MXNet's non-aggregated `sgd_update` kernel for one element.
#[inline(always)]
pub(crate) fn plain_sgd<R: Real>(w: R, g: R, lr: R, wd: R, rescale: R, clip: Option<R>) -> R {
    let one = R::of(1.0);
    match clip {
        Some(c) => (one - lr * wd) * w - lr * (rescale * g).clip(c),
        None => (one - lr * wd) * w - (lr * rescale) * g,
    }
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
        ..
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

/// Which of MXNet's kernels applies a row-sparse gradient in [`sgd_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SparseSgd {
    /// `sgd_update` / `sgd_mom_update` with `lazy_update`: the gradient's rows only.
    Lazy,
    /// The same with `lazy_update` false: every row.
    Standard,
    /// `mp_sgd_update` / `mp_sgd_mom_update` on the master copy (their storage fallback): every
    /// row, as dense.
    Master,
}

/// SGD with the rows of a row-sparse gradient, as MXNet's `kernel` computes it (see the
/// module docs); `momentum` with a state array (the momentum), as [`sgd_apply`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgd_rows<R: Real>(
    b: Buffers<'_, R>,
    rows: Rows<'_>,
    kernel: SparseSgd,
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
        ..
    } = b;
    let mom = match (momentum, state.first_mut()) {
        (Some(mu), Some(m)) => Some((mu, &mut **m)),
        _ => None,
    };
    // The gradient of a row it does not hold, for the kernels that visit every row.
    let zeros = || vec![R::zero(); rows.len];
    match (kernel, mom) {
        (SparseSgd::Lazy, Some((mu, mom))) => {
            for (w, g) in rows.spans() {
                map2(&mut weight[w.clone()], &grad[g], &mut mom[w], |w, g, m| {
                    sgd_element(w, g, m, mu, lr, wd, rescale, clip)
                });
            }
        }
        (SparseSgd::Lazy, None) => {
            for (w, g) in rows.spans() {
                map1(&mut weight[w], &grad[g], |w, g| {
                    plain_sgd(w, g, lr, wd, rescale, clip)
                });
            }
        }
        (SparseSgd::Standard | SparseSgd::Master, Some((mu, mom))) => {
            let zeros = zeros();
            for (w, g) in rows.all(weight.len()) {
                let g = g.map_or(&zeros[..], |g| &grad[g]);
                map2(&mut weight[w.clone()], g, &mut mom[w], |w, g, m| {
                    sgd_element(w, g, m, mu, lr, wd, rescale, clip)
                });
            }
        }
        (SparseSgd::Standard, None) => {
            let decay = R::of(f64::from(1.0 - lr.to_f64() as f32 * wd.to_f64() as f32));
            weight.iter_mut().for_each(|w| *w = *w * decay);
            for (w, g) in rows.spans() {
                map1(&mut weight[w], &grad[g], |w, g| {
                    plain_sgd(w, g, lr, R::zero(), rescale, clip)
                });
            }
        }
        (SparseSgd::Master, None) => {
            let zeros = zeros();
            for (w, g) in rows.all(weight.len()) {
                let g = g.map_or(&zeros[..], |g| &grad[g]);
                map1(&mut weight[w], g, |w, g| {
                    plain_sgd(w, g, lr, wd, rescale, clip)
                });
            }
        }
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
        match b.rows {
            None => sgd_apply(b, momentum, lr, wd, rescale, clip),
            Some(rows) => {
                let kernel = match (b.master_of, self.base.lazy_update) {
                    (Some(_), _) => SparseSgd::Master,
                    (None, true) => SparseSgd::Lazy,
                    (None, false) => SparseSgd::Standard,
                };
                // MXNet picks the momentum kernel by the state, whose momentum is 0 unless
                // positive.
                let momentum = (self.momentum != 0.0).then(|| R::param(self.momentum.max(0.0)));
                sgd_rows(b, rows, kernel, momentum, lr, wd, rescale, clip);
            }
        }
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
    fn row_sparse(&self, _key: &Key, multi_precision: bool) -> Result<RowSparse> {
        // With momentum, the multi-precision and the standard kernels compute what the dense
        // (aggregated) one does.
        let dense = self.momentum != 0.0 && (multi_precision || !self.base.lazy_update);
        Ok(if dense {
            RowSparse::Dense
        } else if self.base.lazy_update && !multi_precision {
            RowSparse::Lazy
        } else {
            RowSparse::Rows
        })
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
