//! `adam`: Adam (MXNet 1.9.1's `adam_update`).
//!
//! `lr_t = lr·sqrt(1 − beta2^t)/(1 − beta1^t)` for update `t` of the key;
//! `g' = clip(rescale_grad·g + wd·w)` (clipping after weight decay, as 1.x does);
//! `m = beta1·m + (1 − beta1)·g'`, `v = beta2·v + (1 − beta2)·g'²`,
//! `w = w − lr_t·m/(sqrt(v) + epsilon)`.
//!
//! A row-sparse gradient ([`Updater::update`](crate::Updater::update)) goes through
//! `adam_update`'s sparse kernels, also on the master copy with `multi_precision`:
//! - with `lazy_update` (the default), only the gradient's rows of the weight, `m` and `v`
//!   change (a gradient without rows changes nothing, but `t` still counts the update);
//!   with clipping, `v` takes `(1 − beta2)·(g'²)` rather than `((1 − beta2)·g')·g'`;
//! - with `lazy_update` false, every row (`g' = clip(wd·w)` where the gradient has no row),
//!   `v` always taking `(1 − beta2)·(g'²)`.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map3, Buffers, Optimizer, RowSparse, Slices};
use crate::real::Real;

#[derive(Debug)]
struct Adam {
    base: Base,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::Explicit(0.001), WEIGHT_OR_GAMMA)?;
    let beta1 = p.f64_or("beta1", 0.9)?;
    let beta2 = p.f64_or("beta2", 0.999)?;
    let epsilon = p.f64_or("epsilon", 1e-8)?;
    end(p, &["beta1", "beta2", "epsilon"])?;
    Ok(Box::new(Adam {
        base,
        beta1,
        beta2,
        epsilon,
    }))
}

register!(ADAM, "adam", "Adam", build);

/// Where `(1 − beta2)` meets `g'²`: `((1 − beta2)·g')·g'` (the dense kernel) or
/// `(1 − beta2)·(g'·g')` (the sparse kernels' `square`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Square {
    Left,
    Grouped,
}

impl Adam {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        let t = self.base.bump(key) as f64;
        let lr = self.base.lr_for(key);
        let wd = R::param(self.base.wd_for(key));
        let lr_t = lr * (1.0 - self.beta2.powf(t)).sqrt() / (1.0 - self.beta1.powf(t));
        let lr = R::param(lr_t);
        let rescale = R::param(self.base.rescale_grad);
        let clip = self.base.kernel_clip().map(R::param);
        let (b1, b2, eps) = (
            R::param(self.beta1),
            R::param(self.beta2),
            R::param(self.epsilon),
        );
        let one = R::of(1.0);
        // One element: the new weight, m and v from the rescaled (and decayed) gradient.
        let step = |w: R, g: R, m: R, v: R, square: Square| {
            let g = g.clip_by(clip);
            let m = b1 * m + (one - b1) * g;
            let v = match square {
                Square::Left => b2 * v + (one - b2) * g * g,
                Square::Grouped => b2 * v + (one - b2) * (g * g),
            };
            (w - lr * m / (v.sqrt() + eps), m, v)
        };
        let (weight, grad, [m, v], rows) = b.split_rows();
        match rows {
            None => map3(weight, grad, m, v, |w, g, m, v| {
                step(w, g * rescale + w * wd, m, v, Square::Left)
            }),
            Some(rows) if self.base.lazy_update => {
                let square = if clip.is_some() {
                    Square::Grouped
                } else {
                    Square::Left
                };
                for (r, g) in rows.spans() {
                    let (w, m, v) = (&mut weight[r.clone()], &mut m[r.clone()], &mut v[r]);
                    map3(w, &grad[g], m, v, |w, g, m, v| {
                        step(w, g * rescale + w * wd, m, v, square)
                    });
                }
            }
            Some(rows) => {
                for (r, g) in rows.all(weight.len()) {
                    let (w, m, v) = (&mut weight[r.clone()], &mut m[r.clone()], &mut v[r]);
                    match g {
                        Some(g) => map3(w, &grad[g], m, v, |w, g, m, v| {
                            step(w, g * rescale + w * wd, m, v, Square::Grouped)
                        }),
                        None => {
                            for ((w, m), v) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                                (*w, *m, *v) = step(*w, *w * wd, *m, *v, Square::Grouped);
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Optimizer for Adam {
    common!("adam");
    fn state_len(&self) -> usize {
        2
    }
    fn row_sparse(&self, _key: &Key, _multi_precision: bool) -> Result<RowSparse> {
        Ok(if self.base.lazy_update {
            RowSparse::Lazy
        } else {
            RowSparse::Rows
        })
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
