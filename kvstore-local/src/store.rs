//! [`LocalStore`]: MXNet's `KVStoreLocal` with `CommCPU`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use kvstore_base::{
    Capability, CreateRequest, DType, Error, KVStoreBase, Key, KeyGroup, KeyedOuts, KeyedValues,
    NDArray, OptimizerSpec, Result, StorageType, Updater,
};

use crate::reduce::{broadcast_into, copy_dense, sum_into, ReduceConfig};
use kvstore_base::{GatePass, PriorityGate};

/// The name the store is registered under.
pub const NAME: &str = "local";

/// MXNet's other spellings of the local store, registered as aliases.
pub const ALIASES: &[&str] = &["local_update_cpu", "local_allreduce_cpu"];

/// The embedded store: values live in this process, per-device values are summed on the CPU.
///
/// # Behavior
/// - `init` copies each value into the store (later writes to the caller's array do not reach
///   it); a key is initialised once, a second `init` (or `broadcast`) of it is an error.
/// - `push` sums the values of each key (one per device) with MXNet's arithmetic and order.
///   With an optimizer or updater, the sum is applied to the stored value; without one the
///   stored value *becomes* the sum (MXNet's semantics: pushes do not accumulate).
/// - `pull` copies the stored value into every output (cast to the output's dtype);
///   row-sparse outputs are skipped unless `ignore_sparse` is false, as in MXNet.
/// - `pushpull` is push then pull, `broadcast` is init then pull; `row_sparse_pull` returns
///   exactly the requested rows (unsorted and repeated ids allowed) of a row-sparse value.
/// - Keys of one call are processed together, in ascending key order; concurrent calls enter
///   the store one at a time, the waiting call with the highest `priority` first (MXNet's
///   engine runs queued operations by priority). The first init fixes whether the store takes
///   int or str keys.
/// - Every call checks all of its input (keys, counts, shapes, dtypes) before changing
///   anything: an error leaves the store and every output as they were. An error returned by
///   a custom updater stops the call at that key and is returned, the values of the keys it
///   ran on put back as they were (a copy of them is kept during a call for that).
/// - `rank` 0, one worker, `barrier` and `send_command_to_servers` do nothing,
///   `set_gradient_compression` is unsupported (as MXNet's local store).
///
/// An updater runs while the store is locked: it must not call the store.
///
/// ```
/// use kvstore_base::{DType, KVStoreExt, NDArray};
/// use kvstore_local::LocalStore;
///
/// let kv = LocalStore::new();
/// kv.init(3, &NDArray::zeros(&[2], DType::F32))?;
/// kv.push(3, &[NDArray::ones(&[2], DType::F32), NDArray::ones(&[2], DType::F32)])?;
/// let mut out = NDArray::zeros(&[2], DType::F32);
/// kv.pull(3, &mut out)?;
/// assert_eq!(out.to_vec::<f32>()?, vec![2.0, 2.0]);
/// # Ok::<(), kvstore_base::Error>(())
/// ```
#[derive(Debug)]
pub struct LocalStore {
    name: String,
    config: ReduceConfig,
    gate: PriorityGate,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    key_kind: Option<Key>,
    updater: Option<UpdaterSlot>,
    sparse_warned: HashSet<Key>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("keys", &self.entries.len())
            .field("updater", &self.updater.as_ref().map(UpdaterSlot::describe))
            .finish()
    }
}

struct Entry {
    value: NDArray,
    /// The key's place in MXNet's processing order: an int key's value; for a string key, the
    /// int MXNet gives it at its first init (0, 1, 2, ... in init order).
    order: i64,
    /// Where pushed values are summed before an updater sees them; allocated at the first push.
    merge: Option<NDArray>,
}

enum UpdaterSlot {
    Custom(Updater),
    Optimizer(Box<kvstore_optimizer::Updater>),
}

impl UpdaterSlot {
    fn describe(&self) -> &'static str {
        match self {
            UpdaterSlot::Custom(_) => "custom",
            UpdaterSlot::Optimizer(_) => "optimizer",
        }
    }

    /// Runs the updater. A custom one that replaced the stored value by one of another shape
    /// or dtype is an error (the pushed sum has the value's shape and dtype, checked before).
    fn apply(&mut self, key: &Key, merged: &NDArray, stored: &mut NDArray) -> Result<()> {
        match self {
            UpdaterSlot::Custom(f) => {
                let dtype = stored.dtype();
                f(key, merged, stored)?;
                if stored.dtype() == dtype && stored.shape() == merged.shape() {
                    return Ok(());
                }
                Err(Error::InvalidArgument(format!(
                    "the updater replaced the stored {dtype} value of shape {:?} by a {} one of \
                     shape {:?} (put back): an updater must update the value in place, keeping its \
                     shape and dtype",
                    merged.shape(),
                    stored.dtype(),
                    stored.shape()
                )))
            }
            UpdaterSlot::Optimizer(u) => u.update(key, merged, stored),
        }
    }
}

impl Default for LocalStore {
    fn default() -> Self {
        LocalStore::new()
    }
}

impl LocalStore {
    /// A store named `local`, configured from MXNet's environment variables.
    pub fn new() -> Self {
        LocalStore::with_config(NAME, ReduceConfig::from_env())
    }

    /// A store reporting `name` as its type, with explicit reduction settings.
    pub fn with_config(name: &str, config: ReduceConfig) -> Self {
        LocalStore {
            name: name.to_string(),
            config,
            gate: PriorityGate::default(),
            state: Mutex::new(State::default()),
        }
    }

    /// The registry's factory: the requested name (an alias included) becomes the type name;
    /// options `reduction_nthreads` and `bigarray_bound` override the environment.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an option that is not a positive integer.
    pub fn from_request(request: &CreateRequest) -> Result<Box<dyn KVStoreBase>> {
        let mut config = ReduceConfig::from_env();
        for (option, slot) in [
            ("reduction_nthreads", &mut config.threads),
            ("bigarray_bound", &mut config.bigarray_bound),
        ] {
            if let Some(text) = request.options.get(option) {
                *slot = text
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "option {option} must be a positive integer, got {text:?}"
                        ))
                    })?;
            }
        }
        Ok(Box::new(LocalStore::with_config(&request.name, config)))
    }

    /// The reduction settings.
    pub fn config(&self) -> ReduceConfig {
        self.config
    }

    /// The shape, dtype and storage type of the value of `key`, if the store holds it; `None`
    /// too when called from inside the store's own call (an updater), which it would
    /// otherwise wait for forever.
    pub fn value_info(&self, key: &Key) -> Option<(Vec<usize>, DType, StorageType)> {
        if self.reentered("value_info") {
            return None;
        }
        let (_pass, state) = self.enter_waiting(0);
        state.entries.get(key).map(|e| {
            (
                e.value.shape().to_vec(),
                e.value.dtype(),
                e.value.storage_type(),
            )
        })
    }

    /// Runs the installed updater (of [`set_optimizer`](KVStoreBase::set_optimizer) or
    /// [`set_updater`](KVStoreBase::set_updater)) on `weight` with the gradient `grad`, as a
    /// push to `key` would, without touching the store's own values: for a store that keeps
    /// some keys elsewhere and shares this updater, its states and its state files (the
    /// `device` store's GPU keys under an optimizer that has no GPU kernels). Answers whether
    /// an updater is installed (`weight` is unchanged when not).
    ///
    /// # Errors
    /// The updater's error.
    pub fn run_updater(&self, key: &Key, grad: &NDArray, weight: &mut NDArray) -> Result<bool> {
        let (_pass, mut state) = self.enter(0)?;
        match &mut state.updater {
            Some(updater) => updater.apply(key, grad, weight).map(|()| true),
            None => Ok(false),
        }
    }

    /// Runs `f` on the updater of the installed optimizer (`None` without one, with a custom
    /// updater, or when called from inside the store's own call, which it would otherwise
    /// wait for forever): for a store sharing this updater that keeps optimizer states of its
    /// own (the `device` store's GPU kernels), to hand them over around state files.
    pub fn with_optimizer_updater<R>(
        &self,
        f: impl FnOnce(Option<&mut kvstore_optimizer::Updater>) -> R,
    ) -> R {
        if self.reentered("with_optimizer_updater") {
            return f(None);
        }
        let (_pass, mut state) = self.enter_waiting(0);
        match &mut state.updater {
            Some(UpdaterSlot::Optimizer(u)) => f(Some(u)),
            _ => f(None),
        }
    }

    /// Enters the store: callers queue at the gate by priority, then take the state.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the calling thread is already inside: an updater (run
    /// while its push holds the store) that calls the store would otherwise wait for itself
    /// forever.
    fn enter(&self, priority: i32) -> Result<(GatePass<'_>, MutexGuard<'_, State>)> {
        if self.gate.held_by_current_thread() {
            return Err(Error::InvalidArgument(format!(
                "{}: the store was called from inside its own call (an updater calling the \
                 store that runs it): an updater must not call its store",
                self.name
            )));
        }
        Ok(self.enter_waiting(priority))
    }

    /// Whether the calling thread is inside the store already (an updater calling it), which
    /// is logged, naming `operation`.
    fn reentered(&self, operation: &str) -> bool {
        let inside = self.gate.held_by_current_thread();
        if inside {
            log::warn!(
                "{}: {operation} was called from inside the store's own call (an updater \
                 calling its store): it answers nothing",
                self.name
            );
        }
        inside
    }

    /// [`enter`](LocalStore::enter) without the re-entry check, for the helpers that answer
    /// no `Result` (their callers check [`reentered`](LocalStore::reentered) first).
    fn enter_waiting(&self, priority: i32) -> (GatePass<'_>, MutexGuard<'_, State>) {
        let pass = self.gate.enter(priority);
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (pass, state)
    }

    fn at(&self, operation: &'static str, key: &Key) -> impl FnOnce(Error) -> Error + '_ {
        let key = key.clone();
        move |e| e.at_key(&self.name, operation, key)
    }
}

impl State {
    fn check_kind(&self, operation: &'static str, key: &Key) -> Result<()> {
        match &self.key_kind {
            Some(first) if !first.same_kind(key) => Err(Error::MixedKeyTypes {
                operation,
                first: first.clone(),
                other: key.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn entry(&self, store: &LocalStore, operation: &'static str, key: &Key) -> Result<&Entry> {
        self.check_kind(operation, key)?;
        self.entries
            .get(key)
            .ok_or_else(|| store.at(operation, key)(Error::KeyNotInitialized))
    }
}

impl LocalStore {
    /// Validates an init: one value per key, keys new to the store.
    fn check_init(
        &self,
        state: &State,
        operation: &'static str,
        values: &KeyedValues<'_>,
    ) -> Result<()> {
        let mut seen = HashSet::with_capacity(values.len());
        for key in values.keys() {
            state.check_kind(operation, key)?;
            if !seen.insert(key) || state.entries.contains_key(key) {
                return Err(self.at(operation, key)(Error::DuplicateInit));
            }
        }
        Ok(())
    }

    fn do_init(&self, state: &mut State, values: &KeyedValues<'_>) {
        for (key, value) in values.iter() {
            if state.key_kind.is_none() {
                state.key_kind = Some(key.clone());
            }
            let order = match key {
                Key::Int(k) => *k,
                Key::Str(_) => state.entries.len() as i64,
            };
            state.entries.insert(
                key.clone(),
                Entry {
                    value: value.clone(),
                    merge: None,
                    order,
                },
            );
        }
    }

    /// Validates a push against the stored values; returns the key groups in order.
    fn check_push(
        &self,
        state: &State,
        operation: &'static str,
        values: &KeyedValues<'_>,
    ) -> Result<Vec<KeyGroup>> {
        // MXNet processes the keys of a call in ascending order of its int keys, a string key
        // standing for the int it got at its first init: string keys go in init order.
        let mut groups = values.groups();
        groups.sort_by_key(|g| state.entries.get(&g.key).map_or(i64::MIN, |e| e.order));
        for KeyGroup { key, positions } in &groups {
            let entry = state.entry(self, operation, key)?;
            for (i, &p) in positions.iter().enumerate() {
                entry
                    .value
                    .check_like(values.values()[p], &format!("pushed value {i}"))
                    .map_err(self.at(operation, key))?;
            }
            // Every key the optimizer would refuse is refused before any key is updated. The
            // sum of a key's values has their shape and dtype, and the first one's storage
            // type (see `in_first_storage`).
            if let Some(UpdaterSlot::Optimizer(updater)) = &state.updater {
                let grad = values.values()[positions[0]];
                updater
                    .validate(key, grad, &entry.value)
                    .map_err(self.at(operation, key))?;
            }
        }
        Ok(groups)
    }

    /// Pushes the checked `groups`. A custom updater may fail at any key (or replace a value
    /// by one of another shape): the values it ran on are then put back as they were before
    /// the call, so that a failed call changes none of the store's values (what the updater
    /// keeps of its own is its own). Optimizers are validated before anything changes.
    fn do_push(
        &self,
        state: &mut State,
        values: &KeyedValues<'_>,
        groups: &[KeyGroup],
    ) -> Result<()> {
        let before: Option<Vec<NDArray>> = match &state.updater {
            Some(UpdaterSlot::Custom(_)) => Some(
                groups
                    .iter()
                    .map(|g| state.entries[&g.key].value.clone())
                    .collect(),
            ),
            _ => None,
        };
        let pushed = self.push_groups(state, values, groups);
        if let (Err(_), Some(before)) = (&pushed, before) {
            for (g, value) in groups.iter().zip(before) {
                if let Some(entry) = state.entries.get_mut(&g.key) {
                    entry.value = value;
                }
            }
        }
        pushed
    }

    fn push_groups(
        &self,
        state: &mut State,
        values: &KeyedValues<'_>,
        groups: &[KeyGroup],
    ) -> Result<()> {
        let State {
            entries, updater, ..
        } = state;
        for KeyGroup { key, positions } in groups {
            let entry = entries.get_mut(key).expect("checked by check_push");
            let pushed: Vec<&NDArray> = positions.iter().map(|&p| values.values()[p]).collect();
            let converted = in_first_storage(&pushed)?;
            let arrays: Vec<&NDArray> = converted.iter().map(AsRef::as_ref).collect();
            let dense_sum = arrays[0].storage_type() == StorageType::Dense;
            let all_dense = dense_sum && entry.value.storage_type() == StorageType::Dense;
            match updater {
                None if all_dense
                    && arrays.len() == 1
                    && entry.value.size() < self.config.bigarray_bound =>
                {
                    copy_dense(&mut entry.value, arrays[0])?
                }
                None if all_dense => sum_into(&mut entry.value, &arrays, &self.config, true),
                // The value becomes the sum, in the sum's storage type (MXNet's `local =
                // merged`).
                None if dense_sum => {
                    let mut sum = NDArray::zeros(entry.value.shape(), entry.value.dtype());
                    sum_into(&mut sum, &arrays, &self.config, true);
                    entry.value = sum;
                }
                None => entry.value = sparse_sum(&arrays)?,
                Some(updater) => {
                    let merged = if let [single] = arrays[..] {
                        // One value needs no sum: the updater reads it where it is.
                        single
                    } else if dense_sum {
                        // A row-sparse sum left by an earlier push cannot hold a dense one.
                        // (A custom updater may have replaced the value by one of another shape
                        // or dtype: the buffer follows.)
                        let merge = match &mut entry.merge {
                            Some(m)
                                if m.storage_type() == StorageType::Dense
                                    && m.shape() == entry.value.shape()
                                    && m.dtype() == entry.value.dtype() =>
                            {
                                m
                            }
                            slot => slot
                                .insert(NDArray::zeros(entry.value.shape(), entry.value.dtype())),
                        };
                        sum_into(merge, &arrays, &self.config, false);
                        &*merge
                    } else {
                        entry.merge = Some(sparse_sum(&arrays)?);
                        entry.merge.as_ref().expect("just set")
                    };
                    updater
                        .apply(key, merged, &mut entry.value)
                        .map_err(self.at("push", key))?;
                }
            }
        }
        Ok(())
    }

    /// Validates a pull: keys initialised, outputs of the stored shape (row-sparse outputs
    /// that `ignore_sparse` skips are not looked at, as MXNet drops them first).
    fn check_pull(
        &self,
        state: &State,
        operation: &'static str,
        outs: &KeyedOuts<'_>,
        ignore_sparse: bool,
    ) -> Result<()> {
        for (i, (key, out)) in outs.keys().iter().zip(outs.outs()).enumerate() {
            if ignore_sparse && out.storage_type() == StorageType::RowSparse {
                continue;
            }
            let entry = state.entry(self, operation, key)?;
            entry
                .value
                .check_shape_of(out, &format!("output {i}"))
                .map_err(self.at(operation, key))?;
        }
        Ok(())
    }

    fn do_pull(
        &self,
        state: &mut State,
        outs: &mut KeyedOuts<'_>,
        ignore_sparse: bool,
    ) -> Result<()> {
        // Small values are copied out one output at a time. The outputs of each big key are
        // gathered so that one pass over the stored value feeds all of them.
        let mut buckets: Vec<(&Key, Vec<&mut NDArray>)> = Vec::new();
        for (key, out) in outs.iter_mut() {
            if ignore_sparse && out.storage_type() == StorageType::RowSparse {
                if state.sparse_warned.insert(key.clone()) {
                    log::info!("Warning: non-default weights detected during kvstore pull. This call has been ignored. Please make sure to use kv.row_sparse_pull() or module.prepare() with row_ids.");
                }
                continue;
            }
            let value = &state.entries.get(key).expect("checked by check_pull").value;
            if value.size() < self.config.bigarray_bound
                || value.storage_type() != StorageType::Dense
            {
                copy_dense(out, value).map_err(self.at("pull", key))?;
            } else if let Some((_, bucket)) = buckets.iter_mut().find(|(k, _)| *k == key) {
                bucket.push(&mut **out);
            } else {
                buckets.push((key, vec![&mut **out]));
            }
        }
        for (key, mut bucket) in buckets {
            let value = &state.entries.get(key).expect("checked by check_pull").value;
            broadcast_into(&mut bucket, value, &self.config).map_err(self.at("pull", key))?;
        }
        Ok(())
    }
}

/// A key's pushed values in the storage type of the first, as MXNet's `CommCPU::Reduce` sums
/// them: after a dense first value the others are made dense (and summed in the grouped order
/// of dense sums), after a row-sparse one row-sparse (added in order, the sum row-sparse).
fn in_first_storage<'a>(arrays: &[&'a NDArray]) -> Result<Vec<std::borrow::Cow<'a, NDArray>>> {
    use std::borrow::Cow;
    let dense = arrays[0].storage_type() == StorageType::Dense;
    arrays
        .iter()
        .map(|&a| match (dense, a.storage_type()) {
            (true, StorageType::RowSparse) => Ok(Cow::Owned(a.to_dense())),
            (false, StorageType::Dense) => a.to_row_sparse().map(Cow::Owned),
            _ => Ok(Cow::Borrowed(a)),
        })
        .collect()
}

/// The sum of row-sparse arrays, added in order: row-sparse, the union of their rows.
fn sparse_sum(arrays: &[&NDArray]) -> Result<NDArray> {
    let mut sum = arrays[0].clone();
    for a in &arrays[1..] {
        sum.add_assign(a)?;
    }
    Ok(sum)
}

/// Unique, sorted row ids from a dense array of any dtype (MXNet casts them to int64).
impl KVStoreBase for LocalStore {
    fn type_name(&self) -> &str {
        &self.name
    }

    fn rank(&self) -> usize {
        0
    }

    fn num_workers(&self) -> usize {
        1
    }

    fn is_capable(&self, capability: Capability) -> bool {
        matches!(
            capability,
            Capability::Optimizer
                | Capability::InitPushPull
                | Capability::Updater
                | Capability::RowSparse
                | Capability::OptimizerStates
        )
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        values.check_on_host(self.type_name(), "init")?;
        let (_pass, mut state) = self.enter(0)?;
        self.check_init(&state, "init", values)?;
        self.do_init(&mut state, values);
        Ok(())
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        values.check_on_host(self.type_name(), "push")?;
        let (_pass, mut state) = self.enter(priority)?;
        let groups = self.check_push(&state, "push", values)?;
        self.do_push(&mut state, values, &groups)
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        outs.check_on_host(self.type_name(), "pull")?;
        let (_pass, mut state) = self.enter(priority)?;
        self.check_pull(&state, "pull", outs, ignore_sparse)?;
        self.do_pull(&mut state, outs, ignore_sparse)
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        values.check_on_host(self.type_name(), "pushpull")?;
        outs.check_on_host(self.type_name(), "pushpull")?;
        outs.check_against("pushpull", values)?;
        let (_pass, mut state) = self.enter(priority)?;
        let groups = self.check_push(&state, "pushpull", values)?;
        self.check_pull(&state, "pushpull", outs, true)?;
        self.do_push(&mut state, values, &groups)?;
        self.do_pull(&mut state, outs, true)
    }

    fn pushpull_in_place_batch(&self, values: &mut KeyedOuts<'_>, priority: i32) -> Result<()> {
        values.check_on_host(self.type_name(), "pushpull")?;
        let (_pass, mut state) = self.enter(priority)?;
        let inputs = KeyedValues::new(
            "pushpull",
            values.keys().to_vec(),
            values.outs().iter().map(|v| &**v).collect(),
        )?;
        let groups = self.check_push(&state, "pushpull", &inputs)?;
        self.do_push(&mut state, &inputs, &groups)?;
        drop(inputs);
        self.do_pull(&mut state, values, true)
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        values.check_on_host(self.type_name(), "broadcast")?;
        outs.check_on_host(self.type_name(), "broadcast")?;
        outs.check_against("broadcast", values)?;
        let (_pass, mut state) = self.enter(priority)?;
        self.check_init(&state, "broadcast", values)?;
        outs.check_shapes_against(self.type_name(), "broadcast", values)?;
        self.do_init(&mut state, values);
        self.do_pull(&mut state, outs, true)
    }

    fn row_sparse_pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        outs.check_on_host(self.type_name(), "row_sparse_pull")?;
        Error::check_row_id_count(outs.len(), row_ids.len())?;
        let (_pass, state) = self.enter(priority)?;
        let mut results = Vec::with_capacity(outs.len());
        for (i, (key, out)) in outs.keys().iter().zip(outs.outs()).enumerate() {
            let at = self.at("row_sparse_pull", key);
            let entry = state.entry(self, "row_sparse_pull", key)?;
            let stored = &entry.value;
            let result = (|| {
                if stored.storage_type() != StorageType::RowSparse {
                    return Err(Error::InvalidArgument(
                        "row_sparse_pull needs a row-sparse stored value; this key is dense (use pull)".into(),
                    ));
                }
                if out.storage_type() != StorageType::RowSparse {
                    return Err(Error::InvalidArgument(format!(
                        "output {i} must be row-sparse for row_sparse_pull"
                    )));
                }
                stored.check_shape_of(out, &format!("output {i}"))?;
                let ids = row_ids[i].unique_row_ids(stored.shape()[0])?;
                Ok(stored.retain_rows(&ids)?.astype(out.dtype()))
            })()
            .map_err(at)?;
            results.push(result);
        }
        for (out, result) in outs.outs_mut().iter_mut().zip(results) {
            **out = result;
        }
        Ok(())
    }

    fn set_optimizer(&self, optimizer: &OptimizerSpec) -> Result<()> {
        let updater = kvstore_optimizer::Updater::from_spec(optimizer)?;
        let (_pass, mut state) = self.enter(0)?;
        state.updater = Some(UpdaterSlot::Optimizer(Box::new(updater)));
        Ok(())
    }

    fn set_updater(&self, updater: Updater) -> Result<()> {
        let (_pass, mut state) = self.enter(0)?;
        state.updater = Some(UpdaterSlot::Custom(updater));
        Ok(())
    }

    fn save_optimizer_states(&self, path: &Path, dump_optimizer: bool) -> Result<()> {
        let (_pass, state) = self.enter(0)?;
        let bytes = match &state.updater {
            Some(UpdaterSlot::Optimizer(u)) => u.save_states(dump_optimizer)?,
            _ => return Err(no_optimizer(&self.name, "save_optimizer_states")),
        };
        std::fs::write(path, bytes).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn load_optimizer_states(&self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_pass, mut state) = self.enter(0)?;
        match &mut state.updater {
            Some(UpdaterSlot::Optimizer(u)) => u.load_states(&bytes),
            _ => Err(no_optimizer(&self.name, "load_optimizer_states")),
        }
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn send_command_to_servers(&self, _head: i32, _body: &str) -> Result<()> {
        Ok(())
    }
}

fn no_optimizer(store: &str, operation: &str) -> Error {
    Error::InvalidArgument(format!(
        "{store}: {operation} needs an optimizer installed with set_optimizer (a custom updater has no states to save)"
    ))
}
