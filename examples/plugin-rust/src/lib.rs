//! # kvstore-plugin-example: a kvstore store shipped as a plugin library
//!
//! A Rust plugin is a `cdylib` crate that depends on `kvstore-base`, implements
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
//! that live in the library. The plugin registers nothing statically: `rustpluginstore` exists
//! only once a host loads the library (linking this crate as an `rlib` links `my-kvstore`,
//! whose own `mykvstore` registration comes with it).
//!
//! The store logic comes from the `my-kvstore` example: [`RustPluginStore`] wraps a
//! [`MyKVStore`] that reports the name `rustpluginstore`, an in-memory, single-process store
//! that keeps values (`init`, `push`, `pull`, plus `broadcast` and `pushpull`); it passes the
//! conformance suite through the plugin boundary. The plugin adds the export and a panic hook
//! ([`PANIC_KEY`]).
#![deny(missing_docs)]

use kvstore_base::{Capability, KVStoreBase, KeyedOuts, KeyedValues, Result};
use my_kvstore::MyKVStore;

/// The name the plugin registers its store under (the type name, lower-cased).
pub const NAME: &str = "rustpluginstore";

/// An in-memory, single-process store that keeps one value per key: a [`MyKVStore`] that
/// reports the name [`NAME`], with its semantics (see there), its errors and its capability
/// ([`Capability::InitPushPull`]).
///
/// Pushing to the str key [`PANIC_KEY`] panics, so that hosts can check that a panic inside a
/// plugin comes back as an error and leaves the store usable.
#[derive(Debug)]
pub struct RustPluginStore(MyKVStore);

impl Default for RustPluginStore {
    fn default() -> Self {
        RustPluginStore(MyKVStore::named(NAME))
    }
}

kvstore_base::export_plugin!(RustPluginStore, capabilities = [Capability::InitPushPull]);

/// Pushing to this str key panics inside the plugin (a test hook for the panic boundary).
pub const PANIC_KEY: &str = "panic";

impl KVStoreBase for RustPluginStore {
    fn type_name(&self) -> &str {
        self.0.type_name()
    }

    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn num_workers(&self) -> usize {
        self.0.num_workers()
    }

    fn is_capable(&self, capability: Capability) -> bool {
        self.0.is_capable(capability)
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.0.broadcast_batch(values, outs, priority)
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.0.pushpull_batch(values, outs, priority)
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        self.0.init_batch(values)
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        if let Some(key) = values.keys().iter().find(|k| k.as_str() == Some(PANIC_KEY)) {
            // On purpose, before the push is validated: the host must get an error back, and
            // the store must stay usable.
            panic!("push to the key {key}, which panics by design");
        }
        self.0.push_batch(values, priority)
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        self.0.pull_batch(outs, priority, ignore_sparse)
    }
}
