//! `adadelta`: AdaDelta, as MXNet 1.9.1 computes it with NDArray operations (the learning
//! rate is not used): `g' = clip(rescale_grad·g)`, `acc_g = rho·acc_g + (1 − rho)·g'²`,
//! `d = sqrt(acc_d + eps)/sqrt(acc_g + eps)·g'`, `acc_d = rho·acc_d + (1 − rho)·d²`,
//! `w −= d + wd·w`.

use kvstore_base::{Key, OptimizerSpec, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map3, Buffers, Optimizer, Slices};
use crate::real::Real;

#[derive(Debug)]
struct AdaDelta {
    base: Base,
    rho: f64,
    epsilon: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::PassThrough, WEIGHT_OR_GAMMA)?;
    let rho = p.f64_or("rho", 0.9)?;
    let epsilon = p.f64_or("epsilon", 1e-5)?;
    end(p, &["rho", "epsilon"])?;
    Ok(Box::new(AdaDelta { base, rho, epsilon }))
}

register!(ADADELTA, "adadelta", "AdaDelta", build);

impl AdaDelta {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        let wd = R::of(self.base.wd_for(key));
        self.base.bump(key);
        let rescale = R::of(self.base.rescale_grad);
        let clip = self.base.clip_gradient.map(R::param);
        let rho = R::of(self.rho);
        let one_rho = R::of(1.0 - self.rho);
        let eps = R::of(self.epsilon);
        let (weight, grad, [acc_g, acc_d]) = b.split();
        map3(weight, grad, acc_g, acc_d, |w, g, acc_g, acc_d| {
            let g = (g * rescale).clip_by(clip);
            let acc_g = acc_g * rho + one_rho * g * g;
            let d = (acc_d + eps).sqrt() / (acc_g + eps).sqrt() * g;
            let acc_d = acc_d * rho + one_rho * d * d;
            (w - (d + wd * w), acc_g, acc_d)
        });
    }
}

impl Optimizer for AdaDelta {
    common!("adadelta");
    fn state_len(&self) -> usize {
        2
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
}
