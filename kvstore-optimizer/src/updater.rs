//! [`Updater`]: MXNet's `get_updater`, an optimizer plus per-key state.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use half::{bf16, f16};
use kvstore_base::{DType, Element, Error, Key, NDArray, OptimizerSpec, Result};
use ndarray::{ArrayViewMutD, Zip};

use crate::optimizer::{Buffers, Optimizer, RowSparse, Rows, Slices, StateInit};
use crate::real::{BHalf, Half, Real};
use crate::state_file::{self, Saved, SavedKey, SavedOptimizer};

/// Sets `out` to the elements of the half-precision `grad` a kernel gets ([`grad_values`]),
/// in `f32` (exact).
fn widen<T: Element>(grad: &NDArray, rows: bool, out: &mut Vec<f32>) -> Result<()> {
    let g = grad_values::<T>(grad, rows).ok_or_else(checked)?;
    out.clear();
    out.extend(g.iter().map(|x| x.to_f64() as f32));
    Ok(())
}

/// The state of one key: the optimizer's arrays and, with `multi_precision` on a
/// half-precision weight, the `f32` master copy of the weight.
#[derive(Debug, Clone)]
struct KeyState {
    master: Option<NDArray>,
    arrays: Vec<NDArray>,
}

/// Applies an optimizer to the weights of a store, key by key (MXNet's `Updater`).
///
/// State is created on the first update of a key. `save_states` / `load_states` persist it
/// (and optionally the optimizer itself) in the format described in the crate docs.
///
/// ```
/// use kvstore_base::{DType, Key, NDArray, OptimizerSpec};
/// use kvstore_optimizer::Updater;
///
/// let spec = OptimizerSpec::new("sgd").with("learning_rate", 0.5).with("momentum", 0.9);
/// let mut up = Updater::from_spec(&spec).unwrap();
/// let mut w = NDArray::ones(&[2], DType::F32);
/// up.update(&Key::from(0), &NDArray::ones(&[2], DType::F32), &mut w).unwrap();
/// assert_eq!(w.to_vec::<f32>().unwrap(), vec![0.5, 0.5]);
/// // The second step adds momentum: mom = 0.9·(−0.5) − 0.5 = −0.95.
/// up.update(&Key::from(0), &NDArray::ones(&[2], DType::F32), &mut w).unwrap();
/// assert!((w.to_vec::<f32>().unwrap()[0] + 0.45).abs() < 1e-6);
/// ```
pub struct Updater {
    optimizer: Box<dyn Optimizer>,
    states: BTreeMap<Key, KeyState>,
    /// The `f32` gradient of a `multi_precision` update, reused from step to step.
    grad32: Vec<f32>,
    /// The row ids of a row-sparse gradient the optimizer takes row by row, reused.
    row_ids: Vec<usize>,
}

impl fmt::Debug for Updater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Updater")
            .field("optimizer", &self.optimizer.name())
            .field("keys", &self.states.len())
            .finish()
    }
}

fn at(key: &Key, e: Error) -> Error {
    e.at_key("updater", "update", key.clone())
}

/// Refuses a weight dtype no optimizer updates (the integers).
///
/// # Errors
/// [`Error::InvalidArgument`] naming the dtype.
///
/// # Example
/// ```
/// use kvstore_base::DType;
/// assert!(kvstore_optimizer::check_weight_dtype(DType::BF16).is_ok());
/// assert!(kvstore_optimizer::check_weight_dtype(DType::U8).is_err());
/// ```
pub fn check_weight_dtype(dtype: DType) -> Result<()> {
    if dtype.is_float() {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "the weight has dtype {dtype}; optimizers update float32, float64, float16 and \
         bfloat16 weights only"
    )))
}

fn compute_dtype(weight: DType, multi_precision: bool) -> DType {
    match weight {
        DType::F16 | DType::BF16 if multi_precision => DType::F32,
        other => other,
    }
}

/// An arithmetic that has a [`Slices`] variant.
trait Tagged: Real {
    fn wrap(b: Buffers<'_, Self>) -> Slices<'_>;
}

macro_rules! tagged {
    ($t:ty, $v:ident) => {
        impl Tagged for $t {
            fn wrap(b: Buffers<'_, Self>) -> Slices<'_> {
                Slices::$v(b)
            }
        }
    };
}
tagged!(f32, F32);
tagged!(f64, F64);
tagged!(Half, F16);
tagged!(BHalf, BF16);

/// The elements of a dense array of type `T`, as one mutable slice in row-major order: the
/// array's own memory when its layout is standard, else a copy that [`InPlace::finish`]
/// writes back.
enum InPlace<'a, T> {
    Own(&'a mut [T]),
    Copy(ArrayViewMutD<'a, T>, Vec<T>),
}

impl<'a, T: Element> InPlace<'a, T> {
    /// `None` when `a` is row-sparse or not of type `T`.
    fn new(a: &'a mut NDArray) -> Option<Self> {
        let view = a.view_mut::<T>()?;
        Some(if view.is_standard_layout() {
            InPlace::Own(view.into_slice()?)
        } else {
            let copy = view.iter().copied().collect();
            InPlace::Copy(view, copy)
        })
    }

    fn slice(&mut self) -> &mut [T] {
        match self {
            InPlace::Own(s) => s,
            InPlace::Copy(_, c) => c,
        }
    }

    fn finish(self) {
        if let InPlace::Copy(mut view, copy) = self {
            for (d, s) in view.iter_mut().zip(copy) {
                *d = s;
            }
        }
    }
}

/// The elements of an array of type `T` in row-major order: its own memory when it is dense
/// with a standard layout, else a (densified) copy. `None` when it is not of type `T`.
fn elements<T: Element>(a: &NDArray) -> Option<Cow<'_, [T]>> {
    match a.as_slice::<T>() {
        Some(s) => Some(Cow::Borrowed(s)),
        None => a.to_vec::<T>().ok().map(Cow::Owned),
    }
}

/// The gradient elements a kernel gets, of type `T`: with `rows`, the stored rows of a
/// row-sparse `grad` one after the other; otherwise every element (a row-sparse `grad`
/// densified). `None` when `grad` is not of type `T`.
fn grad_values<T: Element>(grad: &NDArray, rows: bool) -> Option<Cow<'_, [T]>> {
    match grad.as_row_sparse() {
        Some(r) if rows => {
            let a = T::host(r.rows())?;
            Some(match a.as_slice() {
                Some(s) => Cow::Borrowed(s),
                None => Cow::Owned(a.iter().copied().collect()),
            })
        }
        _ => elements::<T>(grad),
    }
}

/// An invariant [`Updater::check`] and [`Updater::check_state`] established.
fn checked() -> Error {
    Error::InvalidArgument("internal: an array changed type after it was checked".into())
}

/// The buffers of one in-place update in arithmetic `R`: `weight` (the weight, or the master
/// copy), `grad` and the state arrays. Building them can fail (an array of another dtype),
/// running them cannot.
struct Prepared<'a, R: Real> {
    weight: InPlace<'a, R::Elem>,
    state: Vec<InPlace<'a, R::Elem>>,
    grad: Cow<'a, [R::Elem]>,
}

impl<'a, R: Real + Tagged> Prepared<'a, R> {
    fn new(
        weight: &'a mut NDArray,
        grad: Cow<'a, [R::Elem]>,
        state: &'a mut [NDArray],
    ) -> Result<Self> {
        Ok(Prepared {
            weight: InPlace::new(weight).ok_or_else(checked)?,
            state: state
                .iter_mut()
                .map(|a| InPlace::new(a).ok_or_else(checked))
                .collect::<Result<_>>()?,
            grad,
        })
    }

    /// Runs `opt`'s update in place, with the gradient's `rows` when it holds only those, on
    /// the master copy of a weight of dtype `master_of` when given: the first write to any
    /// array happens here.
    fn run(
        mut self,
        opt: &mut dyn Optimizer,
        key: &Key,
        rows: Option<Rows<'_>>,
        master_of: Option<DType>,
    ) {
        opt.update(
            key,
            R::wrap(Buffers {
                weight: R::slice_mut(self.weight.slice()),
                grad: R::slice(&self.grad),
                state: self
                    .state
                    .iter_mut()
                    .map(|s| R::slice_mut(s.slice()))
                    .collect(),
                rows,
                master_of,
            }),
        );
        self.weight.finish();
        self.state.into_iter().for_each(InPlace::finish);
    }
}

/// Sets every element of the (half-precision) `weight` to the `f32` master copy's value, cast
/// as `astype` casts.
fn write_back<T: Element>(weight: &mut NDArray, master: &NDArray) {
    if let (Some(mut w), Some(m)) = (weight.view_mut::<T>(), master.view::<f32>()) {
        Zip::from(&mut w)
            .and(&m)
            .for_each(|d, &m| *d = T::from_f64(f64::from(m)));
    }
}

/// Updates `weight` and `state` in place, in arithmetic `R` (the weight's own), with the
/// gradient's `rows` only when given.
fn update_direct<R: Tagged>(
    opt: &mut dyn Optimizer,
    key: &Key,
    (grad, rows): (&NDArray, Option<Rows<'_>>),
    weight: &mut NDArray,
    state: &mut [NDArray],
) -> Result<()> {
    let values = grad_values::<R::Elem>(grad, rows.is_some()).ok_or_else(checked)?;
    Prepared::<R>::new(weight, values, state)?.run(opt, key, rows, None);
    Ok(())
}

/// Updates the `f32` master copy of the half-precision `weight` and `state` in place, with
/// the gradient (its `rows` only when given) widened into `grad32`, then casts the master
/// copy into `weight`: the gradient's rows only when the update was `lazy`.
fn update_master(
    opt: &mut dyn Optimizer,
    key: &Key,
    ((grad, rows), lazy): ((&NDArray, Option<Rows<'_>>), bool),
    weight: &mut NDArray,
    master: &mut NDArray,
    state: &mut [NDArray],
    grad32: &mut Vec<f32>,
) -> Result<()> {
    let half = weight.dtype() == DType::F16;
    // The gradient is in the weight's dtype, or already in float32 (a sum kept in float32).
    match grad.dtype() {
        DType::F32 => widen::<f32>(grad, rows.is_some(), grad32)?,
        DType::F16 => widen::<f16>(grad, rows.is_some(), grad32)?,
        _ => widen::<bf16>(grad, rows.is_some(), grad32)?,
    }
    let lazy_rows = rows.filter(|_| lazy).map(|r| (r.ids, r.len));
    Prepared::<f32>::new(master, Cow::Borrowed(grad32), state)?.run(
        opt,
        key,
        rows,
        Some(weight.dtype()),
    );
    match (half, lazy_rows) {
        (true, None) => write_back::<f16>(weight, master),
        (false, None) => write_back::<bf16>(weight, master),
        (true, Some((ids, len))) => write_back_rows::<f16>(weight, master, ids, len),
        (false, Some((ids, len))) => write_back_rows::<bf16>(weight, master, ids, len),
    }
    Ok(())
}

/// [`write_back`] of rows `ids` only (each `len` elements): what a lazy update changed.
fn write_back_rows<T: Element>(weight: &mut NDArray, master: &NDArray, ids: &[usize], len: usize) {
    let (Some(w), Some(m)) = (weight.as_slice_mut::<T>(), master.as_slice::<f32>()) else {
        // Not in standard layout: every element (the others hold their cast already).
        return write_back::<T>(weight, master);
    };
    for &r in ids {
        let span = r * len..(r + 1) * len;
        for (d, &m) in w[span.clone()].iter_mut().zip(&m[span]) {
            *d = T::from_f64(f64::from(m));
        }
    }
}

impl Updater {
    /// An updater around `optimizer`, with no state yet.
    pub fn new(optimizer: Box<dyn Optimizer>) -> Updater {
        Updater {
            optimizer,
            states: BTreeMap::new(),
            grad32: Vec::new(),
            row_ids: Vec::new(),
        }
    }

    /// Builds the optimizer `spec` describes and an updater around it.
    ///
    /// # Errors
    /// As [`create`](crate::create): unknown optimizer or bad hyper-parameter.
    pub fn from_spec(spec: &OptimizerSpec) -> Result<Updater> {
        Ok(Updater::new(crate::create(spec)?))
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// The keys that have state.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.states.keys()
    }

    /// The state arrays of `key` (not counting a master copy of the weight), if it has state.
    pub fn state_arrays(&self, key: &Key) -> Option<&[NDArray]> {
        self.states.get(key).map(|s| s.arrays.as_slice())
    }

    /// The `f32` master copy of `key`'s weight, with `multi_precision` on a half-precision
    /// weight.
    pub fn master_weight(&self, key: &Key) -> Option<&NDArray> {
        self.states.get(key).and_then(|s| s.master.as_ref())
    }

    /// Runs every check [`update`](Updater::update) runs before it writes, and writes nothing:
    /// a store updating several keys in one call validates them all first, so that a call
    /// refused for one key leaves every key (weights, states, update counts) unchanged.
    ///
    /// # Errors
    /// The error [`update`](Updater::update) would return for these arrays (see there), but
    /// for a failing device.
    pub fn validate(&self, key: &Key, grad: &NDArray, weight: &NDArray) -> Result<()> {
        self.check(key, grad, weight).map_err(|e| at(key, e))?;
        let mp = self.keeps_master_copy(weight.dtype());
        match self.states.get(key) {
            Some(s) => self.check_state(s, weight, mp).map_err(|e| at(key, e))?,
            None => {
                for i in 0..self.optimizer.state_len() {
                    self.optimizer
                        .state_shape(i, weight.shape())
                        .map_err(|e| at(key, e))?;
                }
            }
        }
        if grad.as_row_sparse().is_some() {
            self.optimizer.row_sparse(key, mp).map_err(|e| at(key, e))?;
        }
        Ok(())
    }

    fn check(&self, key: &Key, grad: &NDArray, weight: &NDArray) -> Result<()> {
        self.optimizer.check_key(key)?;
        if let Some(array) = [weight, grad].into_iter().find(|a| a.in_device_memory()) {
            return Err(Error::InvalidArgument(format!(
                "the updater works on host arrays, this one is on {}: copy it with to_context",
                array.context()
            )));
        }
        // A row-sparse weight storing every row is updated as the dense array its rows form.
        if weight.dense().is_none() && !weight.stores_every_row() {
            return Err(Error::InvalidArgument(format!(
                "a row-sparse weight is updated only when it stores every row, as MXNet's \
                 optimizers require; this one stores {} of its {} rows (init it with every row, \
                 or store it dense)",
                weight.as_row_sparse().map_or(0, |r| r.indices().len()),
                weight.shape().first().copied().unwrap_or(0)
            )));
        }
        if grad.shape() != weight.shape() {
            return Err(Error::ShapeMismatch {
                what: format!(
                    "the gradient of key {key} (weight shape {:?}, gradient shape {:?})",
                    weight.shape(),
                    grad.shape()
                ),
                expected: weight.shape().to_vec(),
                found: grad.shape().to_vec(),
            });
        }
        self.check_dtypes(key, weight.dtype(), grad.dtype())
    }

    fn check_dtypes(&self, key: &Key, weight: DType, grad: DType) -> Result<()> {
        check_weight_dtype(weight)?;
        let float32_for_master = grad == DType::F32 && self.keeps_master_copy(weight);
        if grad != weight && !float32_for_master {
            return Err(Error::DTypeMismatch {
                what: format!("the gradient of key {key}"),
                expected: weight,
                found: grad,
            });
        }
        Ok(())
    }

    /// Checks what can be known of a push to `key` without its stored weight: that this
    /// optimizer updates a weight of `weight` dtype with a gradient of `grad` dtype, given as
    /// rows when `rows`. A store whose weights live elsewhere (on servers) refuses a push this
    /// refuses before sending any key of it, so that no key of the call is stepped.
    ///
    /// # Errors
    /// As [`validate`](Self::validate) for these facts (not naming the key: the caller does).
    ///
    /// # Example
    /// ```
    /// use kvstore_base::{DType, Key, OptimizerSpec};
    /// use kvstore_optimizer::Updater;
    ///
    /// let updater = Updater::from_spec(&OptimizerSpec::new("sgd")).unwrap();
    /// let key = Key::from(0);
    /// assert!(updater.check_declared(&key, DType::F32, DType::F32, false).is_ok());
    /// assert!(updater.check_declared(&key, DType::I32, DType::I32, false).is_err());
    /// ```
    pub fn check_declared(&self, key: &Key, weight: DType, grad: DType, rows: bool) -> Result<()> {
        self.optimizer.check_key(key)?;
        self.check_dtypes(key, weight, grad)?;
        if rows {
            self.optimizer
                .row_sparse(key, self.keeps_master_copy(weight))?;
        }
        Ok(())
    }

    fn check_state(&self, state: &KeyState, weight: &NDArray, mp: bool) -> Result<()> {
        let shape = weight.shape();
        let dtype = compute_dtype(weight.dtype(), mp);
        let wanted = self.optimizer.state_len();
        if state.arrays.len() != wanted {
            return Err(Error::InvalidArgument(format!(
                "the loaded state has {} arrays but optimizer {:?} uses {wanted}",
                state.arrays.len(),
                self.optimizer.name()
            )));
        }
        if state.master.is_some() != mp {
            return Err(Error::InvalidArgument(format!(
                "the loaded state {} an f32 master weight but this update {} one (multi_precision with a {} weight)",
                if state.master.is_some() { "has" } else { "has no" },
                if mp { "needs" } else { "does not use" },
                weight.dtype()
            )));
        }
        for (i, a) in state.master.iter().chain(&state.arrays).enumerate() {
            let expected = match (&state.master, i) {
                (Some(_), 0) => shape.to_vec(),
                (Some(_), _) => self.optimizer.state_shape(i - 1, shape)?,
                (None, _) => self.optimizer.state_shape(i, shape)?,
            };
            if a.shape() != expected.as_slice() {
                return Err(Error::ShapeMismatch {
                    what: format!(
                        "optimizer state array {i} (weight shape {shape:?}, state shape {:?})",
                        a.shape()
                    ),
                    expected,
                    found: a.shape().to_vec(),
                });
            }
            if a.dtype() != dtype || a.dense().is_none() {
                return Err(Error::DTypeMismatch {
                    what: format!("dense optimizer state array {i}"),
                    expected: dtype,
                    found: a.dtype(),
                });
            }
        }
        Ok(())
    }

    /// The state of a key's first update: the master copy of the weight with `mp`, and the
    /// optimizer's arrays in `cdtype`, of the shapes and initial values it asks for.
    fn new_state(&self, weight: &NDArray, mp: bool, cdtype: DType) -> Result<KeyState> {
        let master = mp.then(|| weight.astype(DType::F32));
        let arrays = (0..self.optimizer.state_len())
            .map(|i| {
                let shape = self.optimizer.state_shape(i, weight.shape())?;
                Ok(match self.optimizer.state_init(i) {
                    StateInit::Weight if shape.as_slice() == weight.shape() => match &master {
                        Some(m) => m.clone(),
                        None => weight.astype(cdtype),
                    },
                    StateInit::Weight => {
                        return Err(Error::InvalidArgument(format!(
                            "internal: optimizer {:?} starts state array {i} as a copy of the \
                             weight but gives it shape {shape:?}, not the weight's {:?}",
                            self.optimizer.name(),
                            weight.shape()
                        )))
                    }
                    StateInit::Zeros => NDArray::zeros(&shape, cdtype),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KeyState { master, arrays })
    }

    /// Updates `weight` with `grad` under `key` (MXNet's `updater(key, grad, weight)`).
    ///
    /// Creates the key's state on first use, and counts the update (the key's update count
    /// and `num_update`).
    ///
    /// A row-sparse gradient is applied as MXNet 1.9.1 applies it to a dense weight (the
    /// optimizer says how: [`Optimizer::row_sparse`]), bit for bit:
    /// - lazily, changing only the gradient's rows of the weight, of its master copy and of
    ///   the state, with MXNet's sparse kernels (whose arithmetic can differ from the dense
    ///   kernels'): `sgd` and `ccsgd` (with `lazy_update`, the default, and without
    ///   `multi_precision`), `nag` without momentum (without `multi_precision`), `adam` (with
    ///   `lazy_update`), `lars` (with `lazy_update`, without `multi_precision`), `adagrad` and
    ///   `groupadagrad`. A gradient without rows then changes nothing but the update count
    ///   (and, for `lars`, the learning rate it last used).
    ///   `adagrad` refuses weight decay then, as MXNet's sparse kernel does;
    /// - every row, with the arithmetic of MXNet's row-sparse kernels for the standard
    ///   update: `adam` with `lazy_update` false, `sgd` without momentum with `lazy_update`
    ///   false (every row scaled by `1 − lr·wd` first, even for a gradient without rows) or
    ///   with `multi_precision`, `lars` with `lazy_update` false or `multi_precision`;
    /// - as the dense array it stands for, as MXNet's storage fallback or NDArray operations
    ///   do: every other optimizer and case (`sgd` with momentum and `lazy_update` false or
    ///   `multi_precision`, `nag` with momentum or `multi_precision`, ...).
    ///
    /// A row-sparse weight that stores every row (MXNet's "fully populated" row-sparse
    /// weight, as `kv.init(key, weight.tostype('row_sparse'))` stores an embedding) is updated
    /// as the dense array its rows form, in place, and stays row-sparse; MXNet's sparse kernels
    /// refuse one with rows missing, and so does this.
    ///
    /// The update runs in place, on the weight's and the state's own memory (on a copy only
    /// for an array whose layout is not standard, or a row-sparse gradient densified).
    ///
    /// # Errors
    /// [`Error::AtKey`] (naming the key) around: [`Error::ShapeMismatch`] when the gradient's
    /// shape is not the weight's (both shapes are named), [`Error::DTypeMismatch`] when the
    /// dtypes differ (a float32 gradient of a weight with a master copy excepted, see
    /// [`keeps_master_copy`](Updater::keeps_master_copy)), [`Error::InvalidArgument`] for
    /// integer weights, row-sparse weights missing rows, a weight
    /// shape the optimizer cannot update (`groupadagrad` needs 2-D weights), a row-sparse
    /// gradient the optimizer refuses (`adagrad` with weight decay) or a loaded state that
    /// does not fit the weight. The weight, the state and the update count are unchanged
    /// then: every check runs, and every buffer is obtained, before the first write, and the
    /// optimizer's kernel that then writes cannot fail.
    pub fn update(&mut self, key: &Key, grad: &NDArray, weight: &mut NDArray) -> Result<()> {
        // A row-sparse weight storing every row is updated as the dense array its rows are.
        if let Some(done) = weight.with_every_row_dense(|dense| self.update(key, grad, dense)) {
            return done;
        }
        self.check(key, grad, weight).map_err(|e| at(key, e))?;
        let mp = self.keeps_master_copy(weight.dtype());
        let cdtype = compute_dtype(weight.dtype(), mp);
        if let Some(s) = self.states.get(key) {
            self.check_state(s, weight, mp).map_err(|e| at(key, e))?;
        }
        // The rows of a row-sparse gradient, when the optimizer takes them as they are.
        let mut by_rows = None;
        let mut lazy = false;
        if let Some(r) = grad.as_row_sparse() {
            let mode = self.optimizer.row_sparse(key, mp).map_err(|e| at(key, e))?;
            if mode != RowSparse::Dense {
                self.row_ids.clear();
                self.row_ids.extend(r.indices().iter().map(|&i| i as usize));
                by_rows = Some(
                    weight
                        .shape()
                        .get(1..)
                        .unwrap_or(&[])
                        .iter()
                        .product::<usize>(),
                );
                lazy = mode == RowSparse::Lazy;
            }
        }
        // A new key's state is kept only once its first update has succeeded.
        let mut fresh = None;
        let state = match self.states.get_mut(key) {
            Some(s) => s,
            None => fresh.insert(self.new_state(weight, mp, cdtype).map_err(|e| at(key, e))?),
        };
        let opt = self.optimizer.as_mut();
        let rows = by_rows.map(|len| Rows {
            ids: &self.row_ids,
            len,
        });
        let g = (grad, rows);
        let done = match &mut state.master {
            Some(master) => update_master(
                opt,
                key,
                (g, lazy),
                weight,
                master,
                &mut state.arrays,
                &mut self.grad32,
            ),
            None => match cdtype {
                DType::F32 => update_direct::<f32>(opt, key, g, weight, &mut state.arrays),
                DType::F64 => update_direct::<f64>(opt, key, g, weight, &mut state.arrays),
                DType::F16 => update_direct::<Half>(opt, key, g, weight, &mut state.arrays),
                _ => update_direct::<BHalf>(opt, key, g, weight, &mut state.arrays),
            },
        };
        done.map_err(|e| at(key, e))?;
        if let Some(s) = fresh {
            self.states.insert(key.clone(), s);
        }
        Ok(())
    }

    /// Whether the updates of a `dtype` weight run on a float32 master copy (`multi_precision`
    /// with a float16 or bfloat16 weight). Such an update also takes a float32 gradient, as
    /// MXNet's servers pass a round's float32 sum: it is used as it is, not rounded to the
    /// weight's dtype first.
    ///
    /// ```
    /// use kvstore_base::{DType, Key, NDArray, OptimizerSpec};
    /// use kvstore_optimizer::Updater;
    /// let spec = OptimizerSpec::new("sgd").with("multi_precision", true);
    /// let mut up = Updater::from_spec(&spec).unwrap();
    /// assert!(up.keeps_master_copy(DType::F16) && !up.keeps_master_copy(DType::F32));
    /// let mut w = NDArray::zeros(&[1], DType::F16);
    /// // 100000 does not fit in float16; lr 0.01 brings the step back into range.
    /// up.update(&Key::from(0), &NDArray::full(&[1], 1e5, DType::F32), &mut w).unwrap();
    /// assert_eq!(w.to_f64_vec(), vec![-1000.0]);
    /// ```
    pub fn keeps_master_copy(&self, dtype: DType) -> bool {
        self.optimizer.base().multi_precision && matches!(dtype, DType::F16 | DType::BF16)
    }

    /// How many times `key` has been updated (MXNet's `_index_update_count`), if it has been.
    pub fn update_count(&self, key: &Key) -> Option<u64> {
        self.optimizer.base().update_count(key)
    }

    /// Replaces the state of `key` (its arrays, in the optimizer's order and of the shapes
    /// [`Optimizer::state_shape`] gives, mostly the weight's, and its update count): for a
    /// store that updated the key elsewhere (on a GPU)
    /// and hands its state over before [`save_states`](Updater::save_states).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the number of arrays is not the optimizer's.
    pub fn set_key_state(&mut self, key: &Key, arrays: Vec<NDArray>, count: u64) -> Result<()> {
        if arrays.len() != self.optimizer.state_len() {
            return Err(Error::InvalidArgument(format!(
                "{} keeps {} state array(s) per key, got {}",
                self.optimizer.name(),
                self.optimizer.state_len(),
                arrays.len()
            )));
        }
        self.states.insert(
            key.clone(),
            KeyState {
                master: None,
                arrays,
            },
        );
        self.optimizer.base_mut().set_count(key.clone(), count);
        Ok(())
    }

    /// Serialises the states of every key, and with `dump_optimizer` the optimizer too (its
    /// spec, update counts, `num_update` and scheduler position), so that a later
    /// [`Updater::load_states`] resumes the learning-rate schedule.
    ///
    /// # Errors
    /// Only for state that cannot be represented (more than 2³² entries in one list).
    pub fn save_states(&self, dump_optimizer: bool) -> Result<Vec<u8>> {
        let base = self.optimizer.base();
        let optimizer = dump_optimizer.then(|| {
            let mut runtime = BTreeMap::new();
            base.runtime(&mut runtime);
            self.optimizer.runtime_extra(&mut runtime);
            SavedOptimizer {
                spec: base.spec().clone(),
                runtime,
            }
        });
        let mut keys: Vec<SavedKey> = self
            .states
            .iter()
            .map(|(k, s)| SavedKey {
                key: k.clone(),
                count: None,
                master: s.master.clone(),
                arrays: s.arrays.clone(),
            })
            .collect();
        if dump_optimizer {
            let index: HashMap<Key, usize> = keys
                .iter()
                .enumerate()
                .map(|(i, s)| (s.key.clone(), i))
                .collect();
            // Counts of keys without state (none in practice) are kept too.
            for (k, c) in base.counts() {
                match index.get(k) {
                    Some(&i) => keys[i].count = Some(*c),
                    None => keys.push(SavedKey {
                        key: k.clone(),
                        count: Some(*c),
                        master: None,
                        arrays: Vec::new(),
                    }),
                }
            }
        }
        state_file::encode(&Saved { optimizer, keys })
    }

    /// Loads what [`Updater::save_states`] wrote: the states replace this updater's; when the
    /// optimizer was saved too, it replaces this updater's optimizer (as MXNet's
    /// `set_states` does).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for bytes that are not a state file (wrong magic), an
    /// unsupported format version, a checksum mismatch (truncated or damaged file), malformed
    /// content, or a saved optimizer that cannot be rebuilt. Nothing changes then.
    pub fn load_states(&mut self, bytes: &[u8]) -> Result<()> {
        let saved = state_file::decode(bytes)?;
        let optimizer = match &saved.optimizer {
            None => None,
            Some(o) => {
                let mut opt = crate::create(&o.spec)?;
                let mut p = crate::params::Params::new("saved optimizer state", &o.runtime);
                opt.base_mut().restore(&mut p)?;
                opt.restore_extra(&o.runtime)?;
                for k in &saved.keys {
                    if let Some(c) = k.count {
                        opt.base_mut().set_count(k.key.clone(), c);
                    }
                }
                Some(opt)
            }
        };
        let states = saved
            .keys
            .into_iter()
            .filter(|k| k.master.is_some() || !k.arrays.is_empty() || k.count.is_none())
            .map(|k| {
                (
                    k.key,
                    KeyState {
                        master: k.master,
                        arrays: k.arrays,
                    },
                )
            })
            .collect();
        if let Some(opt) = optimizer {
            self.optimizer = opt;
        }
        self.states = states;
        Ok(())
    }

    /// This updater as a store's custom update rule
    /// ([`KVStoreBase::set_updater`](kvstore_base::KVStoreBase::set_updater)).
    pub fn into_store_updater(mut self) -> kvstore_base::Updater {
        Box::new(move |key: &Key, grad: &NDArray, weight: &mut NDArray| {
            self.update(key, grad, weight)
        })
    }
}
