//! The [`Optimizer`] trait and the typed buffers its kernels work on.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use kvstore_base::{DType, Key, ParamValue, Result};

use crate::base::Base;
use crate::real::{BHalf, Half};

/// The buffers of one update, in one arithmetic: the weight (or its `f32` master copy), the
/// gradient, and the optimizer's state arrays for this key, flattened in row-major order.
///
/// They are the arrays' own memory (the update runs in place), and the updater hands over
/// exactly [`Optimizer::state_len`] state arrays, each of the shape
/// [`Optimizer::state_shape`] gives (the weight's, so of the weight's length, unless the
/// optimizer says otherwise).
///
/// The gradient is dense, unless the optimizer asked for the rows of a row-sparse gradient
/// ([`RowSparse::Rows`]): the gradient then holds those rows only, one after the other, and
/// the buffers carry their ids.
pub struct Buffers<'a, R> {
    pub(crate) weight: &'a mut [R],
    pub(crate) grad: &'a [R],
    pub(crate) state: Vec<&'a mut [R]>,
    pub(crate) rows: Option<Rows<'a>>,
    /// When `weight` is the `f32` master copy of a half-precision weight: that weight's dtype.
    pub(crate) master_of: Option<DType>,
}

/// The parts of [`Buffers`]: the weight, the gradient, `N` state arrays and the gradient's
/// rows.
pub(crate) type Parts<'a, R, const N: usize> =
    (&'a mut [R], &'a [R], [&'a mut [R]; N], Option<Rows<'a>>);

impl<'a, R> Buffers<'a, R> {
    /// The weight, the gradient and the `N` state arrays.
    ///
    /// # Panics
    /// When there are not `N` state arrays (the updater checks there are `state_len`).
    pub(crate) fn split<const N: usize>(self) -> (&'a mut [R], &'a [R], [&'a mut [R]; N]) {
        let (weight, grad, state, _) = self.split_rows();
        (weight, grad, state)
    }

    /// The weight, the gradient, the `N` state arrays and, with a row-sparse gradient, its
    /// rows.
    ///
    /// # Panics
    /// As [`Buffers::split`].
    pub(crate) fn split_rows<const N: usize>(self) -> Parts<'a, R, N> {
        let n = self.state.len();
        let state = self
            .state
            .try_into()
            .unwrap_or_else(|_| panic!("{n} optimizer state arrays, the kernel expects {N}"));
        (self.weight, self.grad, state, self.rows)
    }
}

/// The rows a row-sparse gradient holds (see [`Buffers`]): their ids, strictly increasing,
/// and the number of elements in a row (the product of the weight's dimensions after the
/// first).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub(crate) ids: &'a [usize],
    pub(crate) len: usize,
}

impl<'a> Rows<'a> {
    /// For each row of the gradient, in order: the range of its elements in the weight (and in
    /// a state array of the weight's shape), and in the gradient.
    pub(crate) fn spans(self) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + 'a {
        let len = self.len;
        self.ids
            .iter()
            .enumerate()
            .map(move |(i, &r)| (r * len..(r + 1) * len, i * len..(i + 1) * len))
    }

    /// For each row of a weight of `total` elements, in order: the range of its elements in
    /// the weight and, when the gradient holds the row, in the gradient.
    pub(crate) fn all(
        self,
        total: usize,
    ) -> impl Iterator<Item = (Range<usize>, Option<Range<usize>>)> + 'a {
        let len = self.len;
        let count = total.checked_div(len).unwrap_or(0);
        let mut held = self.ids.iter().enumerate().peekable();
        (0..count).map(move |r| {
            let g = held
                .next_if(|(_, &id)| id == r)
                .map(|(i, _)| i * len..(i + 1) * len);
            (r * len..(r + 1) * len, g)
        })
    }
}

/// How an optimizer applies a row-sparse gradient to a dense weight
/// ([`Optimizer::row_sparse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSparse {
    /// As the dense array the gradient stands for (zeros in the rows it does not hold): what
    /// MXNet 1.9.1 does for an optimizer without a sparse kernel (its storage fallback) or one
    /// written with NDArray operations.
    Dense,
    /// With MXNet's sparse kernel, which may change every row: the optimizer gets the
    /// gradient's rows only and updates the weight (and state) as that kernel does.
    Rows,
    /// With MXNet's lazy sparse kernel: as [`Rows`](RowSparse::Rows), and only the gradient's
    /// rows of the weight, its master copy and the state change.
    Lazy,
}

// Element-wise loops over the weight, the gradient and 0–3 state arrays. Each zips plain
// slices, so the loop has no bounds checks and the compiler can vectorise `f` (for `f32` and
// `f64`); `f` gets the old values and returns the new ones.

/// `w = f(w, g)` for every element.
#[inline(always)]
pub(crate) fn map1<R: Copy>(w: &mut [R], g: &[R], f: impl Fn(R, R) -> R) {
    assert_eq!(w.len(), g.len());
    for (w, &g) in w.iter_mut().zip(g) {
        *w = f(*w, g);
    }
}

/// `(w, s) = f(w, g, s)` for every element.
#[inline(always)]
pub(crate) fn map2<R: Copy>(w: &mut [R], g: &[R], s: &mut [R], f: impl Fn(R, R, R) -> (R, R)) {
    assert!(w.len() == g.len() && w.len() == s.len());
    for ((w, &g), s) in w.iter_mut().zip(g).zip(s) {
        (*w, *s) = f(*w, g, *s);
    }
}

/// `(w, s, t) = f(w, g, s, t)` for every element.
#[inline(always)]
pub(crate) fn map3<R: Copy>(
    w: &mut [R],
    g: &[R],
    s: &mut [R],
    t: &mut [R],
    f: impl Fn(R, R, R, R) -> (R, R, R),
) {
    assert!(w.len() == g.len() && w.len() == s.len() && w.len() == t.len());
    for (((w, &g), s), t) in w.iter_mut().zip(g).zip(s).zip(t) {
        (*w, *s, *t) = f(*w, g, *s, *t);
    }
}

/// `(w, s, t, u) = f(w, g, s, t, u)` for every element.
#[inline(always)]
pub(crate) fn map4<R: Copy>(
    w: &mut [R],
    g: &[R],
    s: &mut [R],
    t: &mut [R],
    u: &mut [R],
    f: impl Fn(R, R, R, R, R) -> (R, R, R, R),
) {
    let n = w.len();
    assert!(g.len() == n && s.len() == n && t.len() == n && u.len() == n);
    for ((((w, &g), s), t), u) in w.iter_mut().zip(g).zip(s).zip(t).zip(u) {
        (*w, *s, *t, *u) = f(*w, g, *s, *t, *u);
    }
}

/// How a state array of a key starts, on the key's first update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateInit {
    /// All zeros.
    Zeros,
    /// A copy of the weight: of its `f32` master copy with `multi_precision`.
    Weight,
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
    /// How many state arrays a key needs (each of the shape [`Optimizer::state_shape`] gives,
    /// starting as [`Optimizer::state_init`] says).
    fn state_len(&self) -> usize;
    /// The shape of state array `index` of a weight of shape `weight`: by default the weight's.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](kvstore_base::Error::InvalidArgument) when the optimizer
    /// cannot update a weight of this shape; the updater then refuses the update.
    fn state_shape(&self, index: usize, weight: &[usize]) -> Result<Vec<usize>> {
        let _ = index;
        Ok(weight.to_vec())
    }
    /// How state array `index` starts: by default as zeros.
    fn state_init(&self, index: usize) -> StateInit {
        let _ = index;
        StateInit::Zeros
    }
    /// How this optimizer applies a row-sparse gradient to a dense weight of `key`, in an
    /// update on an `f32` master copy of a half-precision weight when `multi_precision`: by
    /// default as the dense array it stands for.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](kvstore_base::Error::InvalidArgument) for an update MXNet
    /// refuses (AdaGrad's sparse kernel with weight decay); the updater then refuses it before
    /// it changes anything.
    fn row_sparse(&self, key: &Key, multi_precision: bool) -> Result<RowSparse> {
        let _ = (key, multi_precision);
        Ok(RowSparse::Dense)
    }
    /// Refuses an update of `key` this optimizer cannot make whatever the arrays (MXNet's
    /// GroupAdaGrad and a key with weight decay); checked before anything changes. By default
    /// every key is fine.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](kvstore_base::Error::InvalidArgument) saying why.
    fn check_key(&self, key: &Key) -> Result<()> {
        let _ = key;
        Ok(())
    }
    /// Updates one key in place: bumps its count, computes its rates and runs the kernel.
    ///
    /// The gradient is dense unless [`Optimizer::row_sparse`] asked for the rows of a
    /// row-sparse one. It cannot fail: the updater checks the buffers before, so that an
    /// error never leaves a half-updated weight or state.
    fn update(&mut self, key: &Key, slices: Slices<'_>);
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
