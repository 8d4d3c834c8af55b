//! [`Updater`]: MXNet's `get_updater`, an optimizer plus per-key state.

use std::collections::BTreeMap;
use std::fmt;

use kvstore_base::{DType, Error, Key, NDArray, OptimizerSpec, Result};

use crate::optimizer::{Buffers, Optimizer, Slices};
use crate::real::{BHalf, Half, Real};
use crate::state_file::{self, Saved, SavedKey, SavedOptimizer};

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

/// Runs one optimizer update in arithmetic `R`, on copies; returns the new weight and state.
fn run<R: Tagged>(
    opt: &mut dyn Optimizer,
    key: &Key,
    weight: &NDArray,
    grad: &NDArray,
    state: &[NDArray],
) -> Result<(Vec<R>, Vec<Vec<R>>)> {
    let read = |a: &NDArray, what: &str| {
        R::read(a).ok_or_else(|| {
            Error::InvalidArgument(format!("{what} is not {} as expected", R::DTYPE))
        })
    };
    let mut w = read(weight, "the weight")?;
    let g = read(grad, "the gradient")?;
    let mut s = state
        .iter()
        .map(|a| read(a, "a state array"))
        .collect::<Result<Vec<_>>>()?;
    opt.update(
        key,
        R::wrap(Buffers {
            weight: &mut w,
            grad: &g,
            state: &mut s,
        }),
    )?;
    Ok((w, s))
}

impl Updater {
    /// An updater around `optimizer`, with no state yet.
    pub fn new(optimizer: Box<dyn Optimizer>) -> Updater {
        Updater {
            optimizer,
            states: BTreeMap::new(),
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

    fn check(&self, key: &Key, grad: &NDArray, weight: &NDArray) -> Result<()> {
        if weight.dense().is_none() {
            return Err(Error::InvalidArgument(
                "row-sparse weights are not supported by the updater; store the weight dense"
                    .into(),
            ));
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
        if !weight.dtype().is_float() {
            return Err(Error::InvalidArgument(format!(
                "the weight has dtype {}; optimizers update float32, float64, float16 and bfloat16 weights only",
                weight.dtype()
            )));
        }
        if grad.dtype() != weight.dtype() {
            return Err(Error::DTypeMismatch {
                what: format!("the gradient of key {key}"),
                expected: weight.dtype(),
                found: grad.dtype(),
            });
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
            if a.shape() != shape {
                return Err(Error::ShapeMismatch {
                    what: format!(
                        "optimizer state array {i} (weight shape {shape:?}, state shape {:?})",
                        a.shape()
                    ),
                    expected: shape.to_vec(),
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

    /// Updates `weight` with `grad` under `key` (MXNet's `updater(key, grad, weight)`).
    ///
    /// Creates the key's state on first use. A row-sparse gradient is applied as the dense
    /// array it stands for.
    ///
    /// # Errors
    /// [`Error::AtKey`] (naming the key) around: [`Error::ShapeMismatch`] when the gradient's
    /// shape is not the weight's (both shapes are named), [`Error::DTypeMismatch`] when the
    /// dtypes differ, [`Error::InvalidArgument`] for integer or row-sparse weights or a loaded
    /// state that does not fit the weight. The weight and the state are unchanged then.
    pub fn update(&mut self, key: &Key, grad: &NDArray, weight: &mut NDArray) -> Result<()> {
        self.check(key, grad, weight).map_err(|e| at(key, e))?;
        let mp = self.optimizer.base().multi_precision
            && matches!(weight.dtype(), DType::F16 | DType::BF16);
        let cdtype = compute_dtype(weight.dtype(), mp);
        let state = match self.states.get(key) {
            Some(s) => {
                self.check_state(s, weight, mp).map_err(|e| at(key, e))?;
                s.clone()
            }
            None => KeyState {
                master: mp.then(|| weight.astype(DType::F32)),
                arrays: (0..self.optimizer.state_len())
                    .map(|_| NDArray::zeros(weight.shape(), cdtype))
                    .collect(),
            },
        };
        let grad = grad.to_dense();
        let shape = weight.shape().to_vec();
        let opt = self.optimizer.as_mut();
        let (new_weight, new_state) = if let Some(master) = &state.master {
            let g32 = grad.astype(DType::F32);
            let (w, s) =
                run::<f32>(opt, key, master, &g32, &state.arrays).map_err(|e| at(key, e))?;
            let master = f32::write(&shape, w);
            let weight = master.astype(weight.dtype());
            (
                weight,
                KeyState {
                    master: Some(master),
                    arrays: s.into_iter().map(|v| f32::write(&shape, v)).collect(),
                },
            )
        } else {
            macro_rules! go {
                ($r:ty) => {{
                    let (w, s) = run::<$r>(opt, key, weight, &grad, &state.arrays)
                        .map_err(|e| at(key, e))?;
                    (
                        <$r>::write(&shape, w),
                        KeyState {
                            master: None,
                            arrays: s.into_iter().map(|v| <$r>::write(&shape, v)).collect(),
                        },
                    )
                }};
            }
            match cdtype {
                DType::F32 => go!(f32),
                DType::F64 => go!(f64),
                DType::F16 => go!(Half),
                _ => go!(BHalf),
            }
        };
        weight.assign(&new_weight).map_err(|e| at(key, e))?;
        self.states.insert(key.clone(), new_state);
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
            // Counts of keys without state (none in practice) are kept too.
            for (k, c) in base.counts() {
                match keys.iter_mut().find(|s| &s.key == k) {
                    Some(s) => s.count = Some(*c),
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
