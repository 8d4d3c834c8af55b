//! The parameters and bookkeeping every optimizer shares (MXNet's `Optimizer` base class).

use std::collections::BTreeMap;

use kvstore_base::{Error, Key, OptimizerSpec, ParamValue, Result};

use crate::params::Params;
use crate::schedule::LrScheduler;

/// The names of the base parameters, for error messages.
pub(crate) const BASE_PARAMS: [&str; 11] = [
    "learning_rate",
    "rescale_grad",
    "wd",
    "clip_gradient",
    "lr_scheduler",
    "begin_num_update",
    "multi_precision",
    "lr_mult",
    "wd_mult",
    "param_idx2name",
    "lazy_update",
];

/// How an optimizer hands `learning_rate` to the base class.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LrDefault {
    /// `learning_rate` goes to the base class as given (0.01 when neither it nor a scheduler
    /// is given): sgd, ccsgd, nag, lars, adagrad, groupadagrad, adadelta, ftml, dcasgd, test.
    PassThrough,
    /// The optimizer's signature has its own default, always passed on, so it also replaces
    /// a scheduler's `base_lr` when `learning_rate` is not given: adam (0.001), rmsprop, ...
    Explicit(f64),
    /// The optimizer keeps `learning_rate` to itself (default given) and the base class never
    /// sees it, so a scheduler's `base_lr` is left alone: ftrl (0.1).
    Private(f64),
}

/// Shared optimizer state: rates, multipliers, update counts and the scheduler.
#[derive(Debug, Clone)]
pub struct Base {
    spec: OptimizerSpec,
    lr: f64,
    scheduler: Option<LrScheduler>,
    /// Weight decay.
    pub(crate) wd: f64,
    /// Gradient multiplier.
    pub(crate) rescale_grad: f64,
    /// Gradient clipping bound, when given.
    pub(crate) clip_gradient: Option<f64>,
    begin_num_update: u64,
    num_update: u64,
    /// Keep an `f32` master copy of half-precision weights.
    pub(crate) multi_precision: bool,
    /// Update only the rows a row-sparse gradient holds (where the optimizer has such an
    /// update).
    pub(crate) lazy_update: bool,
    lr_mult: BTreeMap<String, f64>,
    wd_mult: BTreeMap<String, f64>,
    idx2name: BTreeMap<String, String>,
    counts: BTreeMap<Key, u64>,
}

/// The text a key is looked up by in `lr_mult`, `wd_mult` and `param_idx2name`.
pub(crate) fn key_text(key: &Key) -> String {
    match key {
        Key::Int(i) => i.to_string(),
        Key::Str(s) => s.to_string(),
    }
}

impl Base {
    /// Reads the base parameters of `spec`; `wd_suffixes` are the name endings that keep
    /// weight decay when `param_idx2name` is given.
    pub(crate) fn parse(
        spec: &OptimizerSpec,
        p: &mut Params<'_>,
        lr_default: LrDefault,
        wd_suffixes: &[&str],
    ) -> Result<Base> {
        let user_lr = p.opt_f64("learning_rate")?;
        let rescale_grad = p.f64_or("rescale_grad", 1.0)?;
        let wd = p.f64_or("wd", 0.0)?;
        let clip_gradient = p.opt_f64("clip_gradient")?;
        let mut scheduler = match p.raw("lr_scheduler") {
            None => None,
            Some(v) => Some(LrScheduler::from_param(v).map_err(|e| {
                Error::InvalidArgument(format!(
                    "{}: hyper-parameter \"lr_scheduler\": {e}",
                    p.owner()
                ))
            })?),
        };
        let begin = p.opt_i64("begin_num_update")?.unwrap_or(0);
        if begin < 0 {
            return Err(p.bad("begin_num_update", "must be 0 or more"));
        }
        let multi_precision = p.bool_or("multi_precision", false)?;
        let lr_mult = p.number_map("lr_mult")?;
        let user_wd_mult = p.number_map("wd_mult")?;
        let idx2name = p.string_map("param_idx2name")?;
        let lazy_update = p.bool_or("lazy_update", true)?;

        let (to_base, private) = match lr_default {
            LrDefault::PassThrough => (user_lr, None),
            LrDefault::Explicit(d) => (Some(user_lr.unwrap_or(d)), None),
            LrDefault::Private(d) => (None, Some(user_lr.unwrap_or(d))),
        };
        let mut lr = match (&scheduler, to_base) {
            (None, None) => 0.01,
            (_, Some(v)) => v,
            (Some(_), None) => 0.01,
        };
        if let (Some(s), Some(v)) = (scheduler.as_mut(), to_base) {
            if s.base_lr() != v {
                s.set_base_lr(v);
            }
        }
        if let Some(v) = private {
            lr = v;
        }
        let mut wd_mult = BTreeMap::new();
        for name in idx2name.values() {
            if !wd_suffixes.iter().any(|s| name.ends_with(s)) {
                wd_mult.insert(name.clone(), 0.0);
            }
        }
        wd_mult.extend(user_wd_mult);
        Ok(Base {
            spec: spec.clone(),
            lr,
            scheduler,
            wd,
            rescale_grad,
            clip_gradient,
            begin_num_update: begin as u64,
            num_update: begin as u64,
            multi_precision,
            lazy_update,
            lr_mult,
            wd_mult,
            idx2name,
            counts: BTreeMap::new(),
        })
    }

    /// The spec this optimizer was built from.
    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// The largest update count of any key (MXNet's `num_update`).
    pub fn num_update(&self) -> u64 {
        self.num_update
    }

    /// How many times `key` has been updated (counting from `begin_num_update`).
    pub fn update_count(&self, key: &Key) -> Option<u64> {
        self.counts.get(key).copied()
    }

    pub(crate) fn counts(&self) -> &BTreeMap<Key, u64> {
        &self.counts
    }

    pub(crate) fn set_count(&mut self, key: Key, count: u64) {
        self.num_update = self.num_update.max(count);
        self.counts.insert(key, count);
    }

    /// MXNet's `_update_count`: bumps the count of `key` and `num_update`; returns the count.
    pub(crate) fn bump(&mut self, key: &Key) -> u64 {
        let c = self
            .counts
            .entry(key.clone())
            .or_insert(self.begin_num_update);
        *c = c.saturating_add(1);
        let c = *c;
        self.num_update = self.num_update.max(c);
        c
    }

    /// The global learning rate now (the scheduler's rate for `num_update`, or `lr`).
    pub(crate) fn global_lr(&mut self) -> f64 {
        match self.scheduler.as_mut() {
            Some(s) => s.rate(self.num_update),
            None => self.lr,
        }
    }

    /// The learning rate of `key`, from a global rate: `lr_mult[key]`, else
    /// `lr_mult[param_idx2name[key]]`, else 1.
    pub(crate) fn scale_lr(&self, key: &Key, lr: f64) -> f64 {
        let k = key_text(key);
        if let Some(m) = self.lr_mult.get(&k) {
            lr * m
        } else if let Some(name) = self.idx2name.get(&k) {
            lr * self.lr_mult.get(name).copied().unwrap_or(1.0)
        } else {
            lr
        }
    }

    /// MXNet's `_get_lr`.
    pub(crate) fn lr_for(&mut self, key: &Key) -> f64 {
        let lr = self.global_lr();
        self.scale_lr(key, lr)
    }

    /// MXNet's `_get_wd`.
    pub(crate) fn wd_for(&self, key: &Key) -> f64 {
        let k = key_text(key);
        if let Some(m) = self.wd_mult.get(&k) {
            self.wd * m
        } else if let Some(name) = self.idx2name.get(&k) {
            self.wd * self.wd_mult.get(name).copied().unwrap_or(1.0)
        } else {
            self.wd
        }
    }

    /// The name of `key` in `param_idx2name`, or its text.
    pub(crate) fn name_of(&self, key: &Key) -> String {
        let k = key_text(key);
        self.idx2name.get(&k).cloned().unwrap_or(k)
    }

    /// Whether kernel-style clipping is on (MXNet passes `clip_gradient` only when truthy and
    /// the kernels clip only when it is `>= 0`).
    pub(crate) fn kernel_clip(&self) -> Option<f64> {
        self.clip_gradient.filter(|c| *c > 0.0)
    }

    /// The run-time state that is not in the spec: `num_update`, the rate set by
    /// `learning_rate` and the scheduler's position.
    pub(crate) fn runtime(&self, out: &mut BTreeMap<String, ParamValue>) {
        out.insert("num_update".into(), ParamValue::Int(self.num_update as i64));
        out.insert("lr".into(), ParamValue::Float(self.lr));
        if let Some(s) = &self.scheduler {
            out.insert("lr_scheduler".into(), s.to_param());
        }
    }

    /// Restores what [`Base::runtime`] wrote.
    pub(crate) fn restore(&mut self, p: &mut Params<'_>) -> Result<()> {
        if let Some(n) = p.opt_i64("num_update")? {
            if n < 0 {
                return Err(p.bad("num_update", "must be 0 or more"));
            }
            self.num_update = n as u64;
        }
        if let Some(lr) = p.opt_f64("lr")? {
            self.lr = lr;
        }
        if let Some(v) = p.raw("lr_scheduler") {
            self.scheduler = Some(LrScheduler::from_param(v)?);
        }
        Ok(())
    }
}
