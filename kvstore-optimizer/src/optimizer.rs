//! The [`Optimizer`] trait and the typed buffers its kernels work on.

use std::collections::BTreeMap;
use std::fmt;

use kvstore_base::{Key, ParamValue, Result};

use crate::base::Base;
use crate::real::{BHalf, Half};

/// The buffers of one update, in one arithmetic: the weight (or its `f32` master copy), the
/// gradient, and the optimizer's state arrays for this key, all of the same length.
pub struct Buffers<'a, R> {
    pub(crate) weight: &'a mut [R],
    pub(crate) grad: &'a [R],
    pub(crate) state: &'a mut [Vec<R>],
}

/// The buffers of one update, tagged by arithmetic.
pub enum Slices<'a> {
    /// `float32` weights, or the `f32` master copy of half-precision weights.
    F32(Buffers<'a, f32>),
    /// `float64` weights.
    F64(Buffers<'a, f64>),
    /// `float16` weights without a master copy.
    F16(Buffers<'a, Half>),
    /// `bfloat16` weights without a master copy.
    BF16(Buffers<'a, BHalf>),
}

/// Runs the generic method `$self.$kernel(key, buffers, extra...)` in the arithmetic of `$s`.
macro_rules! dispatch {
    ($self:ident . $kernel:ident ($key:expr, $s:expr $(, $arg:expr)*)) => {
        match $s {
            $crate::optimizer::Slices::F32(b) => $self.$kernel($key, b $(, $arg)*),
            $crate::optimizer::Slices::F64(b) => $self.$kernel($key, b $(, $arg)*),
            $crate::optimizer::Slices::F16(b) => $self.$kernel($key, b $(, $arg)*),
            $crate::optimizer::Slices::BF16(b) => $self.$kernel($key, b $(, $arg)*),
        }
    };
}
pub(crate) use dispatch;

/// An optimizer: shared bookkeeping ([`Base`]) plus an update rule with per-key state.
///
/// Implementations are built from an [`OptimizerSpec`](kvstore_base::OptimizerSpec) through
/// the registry ([`create`](crate::create)); the [`Updater`](crate::Updater) owns the state
/// arrays and calls [`Optimizer::update`].
pub trait Optimizer: Send + fmt::Debug {
    /// The registered name (`sgd`, `adam`, ...).
    fn name(&self) -> &'static str;
    /// The shared bookkeeping.
    fn base(&self) -> &Base;
    /// The shared bookkeeping, mutably.
    fn base_mut(&mut self) -> &mut Base;
    /// How many state arrays (each shaped like the weight, zero-initialised) a key needs.
    fn state_len(&self) -> usize;
    /// Updates one key: bumps its count, computes its rates and runs the kernel.
    fn update(&mut self, key: &Key, slices: Slices<'_>) -> Result<()>;
    /// Run-time state beyond [`Base`]'s, to be saved with the optimizer (none by default).
    fn runtime_extra(&self, out: &mut BTreeMap<String, ParamValue>) {
        let _ = out;
    }
    /// Restores what [`Optimizer::runtime_extra`] wrote.
    fn restore_extra(&mut self, saved: &BTreeMap<String, ParamValue>) -> Result<()> {
        let _ = saved;
        Ok(())
    }
}
