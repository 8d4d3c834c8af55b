//! # my-kvstore: a kvstore backend published by a third party
//!
//! This crate shows everything a third party needs to publish a store backend: depend on
//! `kvstore-base` (the contract) and nothing else, implement
//! [`KVStoreBase`] for a type, and register it with one line,
//! `kvstore_base::register!(MyKVStore);`.
//!
//! The store is then registered under the type name lower-cased, `mykvstore`. A program that
//! links this crate (`use my_kvstore as _;` is enough, the type never needs to be named) finds
//! it with `kvstore_base::create("MyKVStore")` (names are case-insensitive), and
//! `kvstore_base::registered()` lists it with its capabilities, next to the stores of every
//! other linked backend.
//!
//! [`MyKVStore`] is small but real: an in-memory, single-process store that keeps values,
//! so besides MXNet's abstract `broadcast` and `pushpull` it offers `init`, `push` and `pull`
//! ([`Capability::InitPushPull`]). It runs the conformance suite of `kvstore-test` like every
//! backend of the project.
//!
//! ```
//! use kvstore_base::{create, DType, KVStoreExt, NDArray};
//! use my_kvstore as _; // linking the crate registers `mykvstore`
//!
//! let kv = create("MyKVStore")?;
//! kv.init("w", &NDArray::zeros(&[2], DType::F32))?;
//! kv.push("w", &[NDArray::ones(&[2], DType::F32), NDArray::full(&[2], 2.0, DType::F32)])?;
//! let mut w = NDArray::zeros(&[2], DType::F32);
//! kv.pull("w", &mut w)?;
//! assert_eq!(w.to_vec::<f32>()?, vec![3.0, 3.0]);
//! # Ok::<(), kvstore_base::Error>(())
//! ```
#![deny(missing_docs)]

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use kvstore_base::{
    Capability, Error, KVStoreBase, Key, KeyTypeGuard, KeyedOuts, KeyedValues, NDArray, Result,
    StorageType,
};

/// The name [`MyKVStore`] is registered under (its type name, lower-cased).
pub const NAME: &str = "mykvstore";

/// An in-memory, single-process store that keeps one value per key.
///
/// - `init` stores a copy of each key's value; initialising a key twice is
///   [`Error::DuplicateInit`].
/// - `push` sums the values of each key (one per device, say) and the stored value becomes
///   that sum: MXNet's semantics for a store without an updater or optimizer. Pushing to a
///   key that was never initialised is [`Error::KeyNotInitialized`].
/// - `pull` copies each key's stored value into its outputs, cast to the output's dtype.
/// - `broadcast` initialises each key with its value (one value per key), then pulls it.
/// - `pushpull` is a push followed by a pull, under one lock.
///
/// Values of one key must agree in shape and dtype with each other and with the stored
/// value, and outputs must have the stored value's shape. As in MXNet, the store takes int
/// keys or string keys, whichever a call named first ([`KeyTypeGuard`]). Every operation checks all of its
/// input before it changes anything: a call that fails leaves the store and every output as
/// they were. Errors about a key are wrapped with [`Error::at_key`], so they name the store,
/// the operation and the key.
///
/// `rank` is 0, `num_workers` 1, and the only capability is [`Capability::InitPushPull`].
///
/// The store reports its name ([`NAME`] by default, see [`MyKVStore::named`]) as its type name
/// and in every error it builds.
#[derive(Debug)]
pub struct MyKVStore {
    name: &'static str,
    values: Mutex<HashMap<Key, NDArray>>,
    key_type: KeyTypeGuard,
}

impl Default for MyKVStore {
    fn default() -> Self {
        MyKVStore::named(NAME)
    }
}

kvstore_base::register!(MyKVStore);

type Table = HashMap<Key, NDArray>;

impl MyKVStore {
    /// An empty store that reports `name` as its type name and in its errors: the same store
    /// reporting another type name, e.g. when it is re-exported as a plugin.
    pub fn named(name: &'static str) -> MyKVStore {
        MyKVStore {
            name,
            values: Mutex::default(),
            key_type: KeyTypeGuard::new(),
        }
    }

    /// The table of values. Every operation validates before it writes, so a panic in another
    /// thread cannot have left the table half updated, and a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.values.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Validates a push and returns the new value of each pushed key: the sum of its values, left
/// to right in their dtype. Nothing is written.
fn sums(
    store: &str,
    table: &Table,
    operation: &'static str,
    values: &KeyedValues<'_>,
) -> Result<Vec<(Key, NDArray)>> {
    let mut sums = Vec::new();
    for group in values.groups() {
        let at = |e: Error| e.at_key(store, operation, group.key.clone());
        let stored = table
            .get(&group.key)
            .ok_or_else(|| at(Error::KeyNotInitialized))?;
        let first = values.values()[group.positions[0]];
        let mut sum = NDArray::zeros(first.shape(), first.dtype());
        for (i, &position) in group.positions.iter().enumerate() {
            let value = values.values()[position];
            first
                .check_like(value, &format!("value {i} of the key"))
                .and_then(|()| sum.add_assign(value))
                .map_err(at)?;
        }
        stored
            .check_like(&sum, "the pushed value (against the stored value)")
            .map_err(at)?;
        sums.push((group.key, sum));
    }
    Ok(sums)
}

/// Whether output `i` of a pull is written (with `ignore_sparse`, row-sparse outputs are
/// skipped, as in MXNet).
fn is_pulled(outs: &KeyedOuts<'_>, i: usize, ignore_sparse: bool) -> bool {
    !(ignore_sparse && outs.outs()[i].storage_type() == StorageType::RowSparse)
}

/// Checks that every pulled output has a value of its shape, in `fresh` (values this call is
/// about to store) or else in `table`. Nothing is written.
fn check_pull(
    store: &str,
    table: &Table,
    fresh: &[(Key, NDArray)],
    operation: &'static str,
    outs: &KeyedOuts<'_>,
    ignore_sparse: bool,
) -> Result<()> {
    for (i, (key, out)) in outs.keys().iter().zip(outs.outs()).enumerate() {
        if !is_pulled(outs, i, ignore_sparse) {
            continue;
        }
        let value = fresh
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .or_else(|| table.get(key))
            .ok_or_else(|| Error::KeyNotInitialized.at_key(store, operation, key.clone()))?;
        if out.shape() != value.shape() {
            return Err(Error::ShapeMismatch {
                what: format!("output {i}"),
                expected: value.shape().to_vec(),
                found: out.shape().to_vec(),
            }
            .at_key(store, operation, key.clone()));
        }
    }
    Ok(())
}

/// Copies the stored values into the pulled outputs; [`check_pull`] has passed.
fn write_pull(
    store: &str,
    table: &Table,
    operation: &'static str,
    outs: &mut KeyedOuts<'_>,
    ignore_sparse: bool,
) -> Result<()> {
    let keys = outs.keys().to_vec();
    for (i, key) in keys.iter().enumerate() {
        if !is_pulled(outs, i, ignore_sparse) {
            continue;
        }
        let at = |e: Error| e.at_key(store, operation, key.clone());
        let value = table.get(key).ok_or_else(|| at(Error::KeyNotInitialized))?;
        outs.outs_mut()[i].assign(value).map_err(at)?;
    }
    Ok(())
}

/// Validates an init: each key once in the call, and not yet in the store. Returns copies of
/// the values to store. Nothing is written.
fn fresh_values(
    store: &str,
    table: &Table,
    operation: &'static str,
    values: &KeyedValues<'_>,
) -> Result<Vec<(Key, NDArray)>> {
    let mut fresh = Vec::new();
    for group in values.groups() {
        if table.contains_key(&group.key) || group.positions.len() > 1 {
            return Err(Error::DuplicateInit.at_key(store, operation, group.key));
        }
        fresh.push((group.key, values.values()[group.positions[0]].clone()));
    }
    Ok(fresh)
}

impl KVStoreBase for MyKVStore {
    fn type_name(&self) -> &str {
        self.name
    }

    fn rank(&self) -> usize {
        0
    }

    fn num_workers(&self) -> usize {
        1
    }

    fn is_capable(&self, capability: Capability) -> bool {
        capability == Capability::InitPushPull
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        _priority: i32,
    ) -> Result<()> {
        outs.check_against("broadcast", values)?;
        self.key_type.check("broadcast", values.keys())?;
        values.check_one_value_per_key(self.name, "broadcast")?;
        let mut table = self.lock();
        let fresh = fresh_values(self.name, &table, "broadcast", values)?;
        check_pull(self.name, &table, &fresh, "broadcast", outs, false)?;
        table.extend(fresh);
        write_pull(self.name, &table, "broadcast", outs, false)
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        _priority: i32,
    ) -> Result<()> {
        outs.check_against("pushpull", values)?;
        self.key_type.check("pushpull", values.keys())?;
        let mut table = self.lock();
        let sums = sums(self.name, &table, "pushpull", values)?;
        // A push keeps every key's shape, so the outputs can be checked against the store now.
        check_pull(self.name, &table, &sums, "pushpull", outs, false)?;
        table.extend(sums);
        write_pull(self.name, &table, "pushpull", outs, false)
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        self.key_type.check("init", values.keys())?;
        let mut table = self.lock();
        let fresh = fresh_values(self.name, &table, "init", values)?;
        table.extend(fresh);
        Ok(())
    }

    fn push_batch(&self, values: &KeyedValues<'_>, _priority: i32) -> Result<()> {
        self.key_type.check("push", values.keys())?;
        let mut table = self.lock();
        let sums = sums(self.name, &table, "push", values)?;
        table.extend(sums);
        Ok(())
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        _priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        self.key_type.check("pull", outs.keys())?;
        let table = self.lock();
        check_pull(self.name, &table, &[], "pull", outs, ignore_sparse)?;
        write_pull(self.name, &table, "pull", outs, ignore_sparse)
    }
}

#[cfg(test)]
mod tests {
    use kvstore_base::{DType, KVStoreExt};

    use super::*;

    fn filled(shape: &[usize], value: f64) -> NDArray {
        NDArray::full(shape, value, DType::F32)
    }

    #[test]
    fn registered_under_the_lower_cased_type_name() {
        let kv = kvstore_base::create("MyKVStore").unwrap();
        assert_eq!(kv.type_name(), NAME);
        let info = kvstore_base::registered()
            .into_iter()
            .find(|info| info.name == NAME)
            .expect("mykvstore is registered");
        assert_eq!(info.capabilities.unwrap(), vec![Capability::InitPushPull]);
    }

    #[test]
    fn push_replaces_the_stored_value_with_the_sum() {
        let kv = MyKVStore::default();
        kv.init(1, &filled(&[2], 10.0)).unwrap();
        kv.push(1, &[filled(&[2], 1.0), filled(&[2], 2.0)]).unwrap();
        kv.push(1, &filled(&[2], 4.0)).unwrap();
        let mut out = filled(&[2], 0.0);
        kv.pull(1, &mut out).unwrap();
        assert_eq!(out.to_vec::<f32>().unwrap(), vec![4.0, 4.0]);
    }

    #[test]
    fn push_of_an_uninitialised_key_is_an_error_and_changes_nothing() {
        let kv = MyKVStore::default();
        kv.init(1, &filled(&[2], 3.0)).unwrap();
        let err = kv
            .push(&[1, 2], &[filled(&[2], 1.0), filled(&[2], 1.0)])
            .unwrap_err();
        assert!(matches!(err.root(), Error::KeyNotInitialized), "{err}");
        assert_eq!(err.key(), Some(&Key::from(2)));
        let mut out = filled(&[2], 0.0);
        kv.pull(1, &mut out).unwrap();
        assert_eq!(
            out.to_vec::<f32>().unwrap(),
            vec![3.0, 3.0],
            "key 1 was updated"
        );
    }

    #[test]
    fn push_must_keep_the_stored_shape_and_dtype() {
        let kv = MyKVStore::default();
        kv.init("w", &filled(&[2], 0.0)).unwrap();
        let err = kv.push("w", &filled(&[3], 1.0)).unwrap_err();
        assert!(matches!(err.root(), Error::ShapeMismatch { .. }), "{err}");
        let err = kv.push("w", &NDArray::ones(&[2], DType::F64)).unwrap_err();
        assert!(matches!(err.root(), Error::DTypeMismatch { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("mykvstore: push of key \"w\""), "{text}");
    }

    #[test]
    fn a_failed_pull_writes_no_out() {
        let kv = MyKVStore::default();
        kv.init(&[1, 2], &[filled(&[2], 1.0), filled(&[3], 2.0)])
            .unwrap();
        let mut outs = [filled(&[2], 0.0), filled(&[2], 0.0)];
        let err = kv.pull(&[1, 2], &mut outs).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("[3]") && text.contains("[2]"), "{text}");
        assert_eq!(outs[0].to_vec::<f32>().unwrap(), vec![0.0, 0.0]);
    }

    #[test]
    fn init_rejects_a_key_given_twice_in_one_call() {
        let kv = MyKVStore::default();
        let err = kv
            .init(&[4, 4], &[filled(&[1], 1.0), filled(&[1], 2.0)])
            .unwrap_err();
        assert!(matches!(err.root(), Error::DuplicateInit), "{err}");
        let mut out = filled(&[1], 0.0);
        assert!(
            kv.pull(4, &mut out).is_err(),
            "the rejected init stored a value"
        );
    }

    #[test]
    fn broadcast_initialises_and_a_second_broadcast_is_a_duplicate_init() {
        let kv = MyKVStore::default();
        let mut outs = [filled(&[2], 0.0), filled(&[2], 0.0)];
        kv.broadcast(7, &filled(&[2], 5.0), &mut outs).unwrap();
        assert_eq!(outs[1].to_vec::<f32>().unwrap(), vec![5.0, 5.0]);
        let err = kv.broadcast(7, &filled(&[2], 6.0), &mut outs).unwrap_err();
        assert!(matches!(err.root(), Error::DuplicateInit), "{err}");
        let mut out = filled(&[2], 0.0);
        kv.pull(7, &mut out).unwrap();
        assert_eq!(out.to_vec::<f32>().unwrap(), vec![5.0, 5.0]);
    }

    #[test]
    fn pull_skips_row_sparse_outs_when_asked() {
        let kv = MyKVStore::default();
        kv.init(1, &filled(&[2, 2], 1.0)).unwrap();
        let rows = filled(&[1, 2], 9.0);
        let mut sparse = NDArray::row_sparse(&[2, 2], vec![0], &rows).unwrap();
        let before = sparse.clone();
        kv.pull(1, &mut sparse).unwrap();
        assert_eq!(
            sparse, before,
            "pull wrote a row-sparse out although it skips them"
        );
    }
}
