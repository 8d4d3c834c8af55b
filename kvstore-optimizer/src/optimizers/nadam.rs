//! `nadam`: Nesterov Adam, as MXNet 1.9.1 computes it with NDArray operations.
//!
//! For update `t` of the key: `g' = clip(rescale_grad·g + wd·w)` (clipping after weight
//! decay); the momentum schedule `μ_t = beta1·(1 − 0.5·0.96^(t·schedule_decay))`,
//! `μ_{t+1}` likewise, `s = s·μ_t` (one product for the whole optimizer, over the updates
//! of every key, starting at 1) and `s' = s·μ_{t+1}`;
//! `m = beta1·m + (1 − beta1)·g'`, `v = beta2·v + (1 − beta2)·g'²`,
//! `m̄ = (1 − μ_t)·g'/(1 − s) + μ_{t+1}·m/(1 − s')`,
//! `w = w − lr·m̄/(sqrt(v/(1 − beta2^t)) + epsilon)`.
//!
//! Hyper-parameters: `beta1` (0.9), `beta2` (0.999), `epsilon` (1e-8), `schedule_decay`
//! (0.004); `learning_rate` defaults to 0.001. State: `m`, then `v`; the schedule product
//! `s` is saved with the optimizer.

use std::collections::BTreeMap;

use kvstore_base::{Key, OptimizerSpec, ParamValue, Result};

use super::{begin, common, end, register, WEIGHT_OR_GAMMA};
use crate::base::{Base, LrDefault};
use crate::optimizer::{dispatch, map3, Buffers, Optimizer, Slices};
use crate::params::Params;
use crate::real::Real;

/// The name of the schedule product in the saved run-time state.
const M_SCHEDULE: &str = "nadam_m_schedule";

#[derive(Debug)]
struct Nadam {
    base: Base,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    schedule_decay: f64,
    m_schedule: f64,
}

fn build(spec: &OptimizerSpec) -> Result<Box<dyn Optimizer>> {
    let (mut p, base) = begin(spec, LrDefault::Explicit(0.001), WEIGHT_OR_GAMMA)?;
    let beta1 = p.f64_or("beta1", 0.9)?;
    let beta2 = p.f64_or("beta2", 0.999)?;
    let epsilon = p.f64_or("epsilon", 1e-8)?;
    let schedule_decay = p.f64_or("schedule_decay", 0.004)?;
    end(p, &["beta1", "beta2", "epsilon", "schedule_decay"])?;
    Ok(Box::new(Nadam {
        base,
        beta1,
        beta2,
        epsilon,
        schedule_decay,
        m_schedule: 1.0,
    }))
}

register!(NADAM, "nadam", "Nesterov Adam", build);

impl Nadam {
    fn kernel<R: Real>(&mut self, key: &Key, b: Buffers<'_, R>) {
        let t = self.base.bump(key);
        let lr = R::of(self.base.lr_for(key));
        let wd = R::of(self.base.wd_for(key));
        let rescale = R::of(self.base.rescale_grad);
        let clip = self.base.clip_gradient.map(R::param);
        let sd = self.schedule_decay;
        let mom_t = self.beta1 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * sd));
        let mom_next = self.beta1 * (1.0 - 0.5 * 0.96f64.powf((t + 1) as f64 * sd));
        self.m_schedule *= mom_t;
        let schedule_next = self.m_schedule * mom_next;
        let (b1, one_b1) = (R::of(self.beta1), R::of(1.0 - self.beta1));
        let (b2, one_b2) = (R::of(self.beta2), R::of(1.0 - self.beta2));
        let g_div = R::of(1.0 - self.m_schedule);
        let m_div = R::of(1.0 - schedule_next);
        let v_div = R::of(1.0 - self.beta2.powf(t as f64));
        let (g_mult, m_mult) = (R::of(1.0 - mom_t), R::of(mom_next));
        let eps = R::of(self.epsilon);
        let (weight, grad, [m, v]) = b.split();
        map3(weight, grad, m, v, |w, g, m, v| {
            let g = (g * rescale + w * wd).clip_by(clip);
            let m = m * b1 + g * one_b1;
            let v = v * b2 + g * one_b2 * g;
            let m_bar = g / g_div * g_mult + m / m_div * m_mult;
            (w - m_bar * lr / ((v / v_div).sqrt() + eps), m, v)
        });
    }
}

impl Optimizer for Nadam {
    common!("nadam");
    fn state_len(&self) -> usize {
        2
    }
    fn update(&mut self, key: &Key, slices: Slices<'_>) {
        dispatch!(self.kernel(key, slices))
    }
    fn runtime_extra(&self, out: &mut BTreeMap<String, ParamValue>) {
        out.insert(M_SCHEDULE.into(), ParamValue::Float(self.m_schedule));
    }
    fn restore_extra(&mut self, saved: &BTreeMap<String, ParamValue>) -> Result<()> {
        let mut p = Params::new("saved nadam state", saved);
        if let Some(s) = p.opt_f64(M_SCHEDULE)? {
            self.m_schedule = s;
        }
        Ok(())
    }
}
