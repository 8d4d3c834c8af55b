//! # kvstore-plugin-example: a kvstore store shipped as a plugin library
//!
//! A Rust plugin is a `cdylib` crate that depends on `kvstore-base` only, implements
//! [`KVStoreBase`] for a type, and exports it with one line:
//!
//! ```ignore
//! kvstore_base::export_plugin!(RustPluginStore, capabilities = [Capability::InitPushPull]);
//! ```
//!
//! which defines the `kvstore_plugin_entry` symbol of the C ABI
//! ([`kvstore_base::plugin::abi`]). A host loads the library (`libkvstore_plugin_example.so`
//! on Linux) with `kvstore_base::plugin::load_plugin(path)` or by listing it in
//! `KVSTORE_PLUGIN_PATH`, and then `kvstore_base::create("rustpluginstore")` builds stores
//! that live in the library. Nothing is registered statically: linking this crate as an
//! `rlib` registers nothing.
//!
//! [`RustPluginStore`] is an in-memory, single-process store that keeps values (`init`,
//! `push`, `pull`, plus `broadcast` and `pushpull`), with the semantics of the `mykvstore`
//! example; it passes the conformance suite through the plugin boundary.
#![deny(missing_docs)]

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use kvstore_base::{
    Capability, Error, KVStoreBase, Key, KeyedOuts, KeyedValues, NDArray, Result, StorageType,
};

/// The name the plugin registers its store under (the type name, lower-cased).
pub const NAME: &str = "rustpluginstore";

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
/// value, and outputs must have the stored value's shape. Every operation checks all of its
/// input before it changes anything: a call that fails leaves the store and every output as
/// they were. Errors about a key are wrapped with [`Error::at_key`], so they name the store,
/// the operation and the key.
///
/// `rank` is 0, `num_workers` 1, and the only capability is [`Capability::InitPushPull`].
///
/// Pushing to the str key [`PANIC_KEY`] panics, so that hosts can check that a panic inside a
/// plugin comes back as an error and leaves the store usable.
#[derive(Debug, Default)]
pub struct RustPluginStore {
    values: Mutex<HashMap<Key, NDArray>>,
}

kvstore_base::export_plugin!(RustPluginStore, capabilities = [Capability::InitPushPull]);

type Table = HashMap<Key, NDArray>;

/// Pushing to this str key panics inside the plugin (a test hook for the panic boundary).
pub const PANIC_KEY: &str = "panic";

impl RustPluginStore {
    /// The table of values. Every operation validates before it writes, so a panic in another
    /// thread cannot have left the table half updated, and a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.values.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Validates a push and returns the new value of each pushed key: the sum of its values, left
/// to right in their dtype. Nothing is written.
fn sums(
    table: &Table,
    operation: &'static str,
    values: &KeyedValues<'_>,
) -> Result<Vec<(Key, NDArray)>> {
    let mut sums = Vec::new();
    for group in values.groups() {
        let at = |e: Error| e.at_key(NAME, operation, group.key.clone());
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
            .ok_or_else(|| Error::KeyNotInitialized.at_key(NAME, operation, key.clone()))?;
        if out.shape() != value.shape() {
            return Err(Error::ShapeMismatch {
                what: format!("output {i}"),
                expected: value.shape().to_vec(),
                found: out.shape().to_vec(),
            }
            .at_key(NAME, operation, key.clone()));
        }
    }
    Ok(())
}

/// Copies the stored values into the pulled outputs; [`check_pull`] has passed.
fn write_pull(
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
        let at = |e: Error| e.at_key(NAME, operation, key.clone());
        let value = table.get(key).ok_or_else(|| at(Error::KeyNotInitialized))?;
        outs.outs_mut()[i].assign(value).map_err(at)?;
    }
    Ok(())
}

/// Validates an init: each key once in the call, and not yet in the store. Returns copies of
/// the values to store. Nothing is written.
fn fresh_values(
    table: &Table,
    operation: &'static str,
    values: &KeyedValues<'_>,
) -> Result<Vec<(Key, NDArray)>> {
    let mut fresh = Vec::new();
    for group in values.groups() {
        if table.contains_key(&group.key) || group.positions.len() > 1 {
            return Err(Error::DuplicateInit.at_key(NAME, operation, group.key));
        }
        fresh.push((group.key, values.values()[group.positions[0]].clone()));
    }
    Ok(fresh)
}

impl KVStoreBase for RustPluginStore {
    fn type_name(&self) -> &str {
        NAME
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
        for group in values.groups() {
            if group.positions.len() != 1 {
                return Err(Error::CountMismatch {
                    operation: "broadcast",
                    what: "value for the key (broadcast takes one value per key)".into(),
                    expected: 1,
                    found: group.positions.len(),
                }
                .at_key(NAME, "broadcast", group.key));
            }
        }
        let mut table = self.lock();
        let fresh = fresh_values(&table, "broadcast", values)?;
        check_pull(&table, &fresh, "broadcast", outs, false)?;
        table.extend(fresh);
        write_pull(&table, "broadcast", outs, false)
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        _priority: i32,
    ) -> Result<()> {
        outs.check_against("pushpull", values)?;
        let mut table = self.lock();
        let sums = sums(&table, "pushpull", values)?;
        // A push keeps every key's shape, so the outputs can be checked against the store now.
        check_pull(&table, &sums, "pushpull", outs, false)?;
        table.extend(sums);
        write_pull(&table, "pushpull", outs, false)
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        let mut table = self.lock();
        let fresh = fresh_values(&table, "init", values)?;
        table.extend(fresh);
        Ok(())
    }

    fn push_batch(&self, values: &KeyedValues<'_>, _priority: i32) -> Result<()> {
        let mut table = self.lock();
        if let Some(key) = values.keys().iter().find(|k| k.as_str() == Some(PANIC_KEY)) {
            // On purpose, with the lock held: the host must get an error back, and the store
            // must stay usable (the lock recovers from poisoning, see `lock`).
            panic!("push to the key {key}, which panics by design");
        }
        let sums = sums(&table, "push", values)?;
        table.extend(sums);
        Ok(())
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        _priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        let table = self.lock();
        check_pull(&table, &[], "pull", outs, ignore_sparse)?;
        write_pull(&table, "pull", outs, ignore_sparse)
    }
}
