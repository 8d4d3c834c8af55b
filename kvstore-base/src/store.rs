//! The [`KVStoreBase`] trait: the contract every store implements.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::{Capability, Error, Key, KeyedOuts, KeyedValues, NDArray, OptimizerSpec, Result};

/// A custom update rule, MXNet's `updater(key, recv, stored)`: called with the key, the
/// merged gradient and the stored value, it updates the stored value in place.
///
/// Any `FnMut(&Key, &NDArray, &mut NDArray) -> Result<()> + Send` closure is an updater.
/// An error it returns comes back from the `push` that ran it (MXNet swallows it).
pub type Updater = Box<dyn FnMut(&Key, &NDArray, &mut NDArray) -> Result<()> + Send>;

/// Gradient-compression parameters as MXNet passes them: names to string values, e.g.
/// `{"type": "2bit", "threshold": "0.5"}`.
pub type CompressionParams = BTreeMap<String, String>;

/// A key-value store that keeps parameters in sync in data-parallel training.
///
/// The methods take flattened batches of `(key, array)` pairs ([`KeyedValues`],
/// [`KeyedOuts`]); callers normally use the ergonomic forms of
/// [`KVStoreExt`](crate::KVStoreExt) (`kv.push(3, &grad)`), which build those batches.
///
/// The trait is object-safe, so [`create`](crate::create) returns `Box<dyn KVStoreBase>`;
/// methods take `&self` because a store is shared by the threads of a training job. Calls are
/// blocking at the boundary: when a pull returns, the outputs hold the values.
///
/// # Behavior every store keeps
/// - A store never keeps a reference to a caller's array and never writes into an array it
///   was given as input.
/// - Bad input (wrong counts, shapes, dtypes, unknown keys) is an `Err` naming the key and
///   the shapes, and leaves the store and every output of the call unchanged.
/// - Operations a store does not offer return [`Error::Unsupported`]; the provided methods
///   do exactly that, so a store implements only what it offers.
pub trait KVStoreBase: Send + Sync + fmt::Debug + 'static {
    /// The store's type name (MXNet's `kv.type`), e.g. `local` or `teststore`.
    fn type_name(&self) -> &str;

    /// This worker's rank, in `0..num_workers()`.
    fn rank(&self) -> usize;

    /// Number of workers in the job.
    fn num_workers(&self) -> usize;

    /// Whether the store supports `capability`.
    fn is_capable(&self, capability: Capability) -> bool;

    /// Broadcasts rank 0's value of each key into every output of that key.
    ///
    /// # Behavior
    /// - `values` holds one value per key; each output receives its key's value.
    /// - Outputs keep their dtype (values are cast) and must have the value's shape.
    ///
    /// # Errors
    /// A shape mismatch or an output key without a value, before anything is written.
    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()>;

    /// Pushes `values` (one or more per key, e.g. one per device) and pulls the aggregated
    /// (or, with an optimizer, updated) value of each key into its outputs.
    ///
    /// # Errors
    /// Values of one key with different shapes or dtypes, outputs of the wrong shape, or an
    /// output key without a value, before anything is written.
    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()>;

    /// `pushpull` whose outputs are its inputs: each value is overwritten by its key's result.
    ///
    /// The provided implementation copies the values and calls [`KVStoreBase::pushpull_batch`];
    /// stores override it to avoid the copy.
    ///
    /// # Errors
    /// As [`KVStoreBase::pushpull_batch`].
    fn pushpull_in_place_batch(&self, values: &mut KeyedOuts<'_>, priority: i32) -> Result<()> {
        let copies: Vec<NDArray> = values.outs().iter().map(|v| (**v).clone()).collect();
        let inputs = KeyedValues::new("pushpull", values.keys().to_vec(), copies.iter().collect())?;
        self.pushpull_batch(&inputs, values, priority)
    }

    /// Initialises each key with its value (MXNet's `init`). Requires [`Capability::InitPushPull`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store keeps values.
    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        let _ = values;
        Err(self.unsupported("init"))
    }

    /// Pushes values into the store (MXNet's `push`). Requires [`Capability::InitPushPull`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store keeps values.
    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        let _ = (values, priority);
        Err(self.unsupported("push"))
    }

    /// Pulls each key's value into its outputs (MXNet's `pull`). Requires
    /// [`Capability::InitPushPull`]. With `ignore_sparse`, row-sparse outputs are skipped, as
    /// in MXNet.
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store keeps values.
    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        let _ = (outs, priority, ignore_sparse);
        Err(self.unsupported("pull"))
    }

    /// Pulls the rows `row_ids[i]` of each key's row-sparse value into `outs[i]`. Requires
    /// [`Capability::RowSparse`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store handles row-sparse values.
    fn row_sparse_pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        let _ = (outs, row_ids, priority);
        Err(self.unsupported("row_sparse_pull"))
    }

    /// Installs an optimizer, rebuilt from its description. Requires [`Capability::Optimizer`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store runs optimizers.
    fn set_optimizer(&self, optimizer: &OptimizerSpec) -> Result<()> {
        let _ = optimizer;
        Err(self.unsupported("set_optimizer"))
    }

    /// Installs a custom updater. Requires [`Capability::Updater`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store accepts updaters.
    fn set_updater(&self, updater: Updater) -> Result<()> {
        drop(updater);
        Err(self.unsupported("set_updater"))
    }

    /// Turns on gradient compression. Requires [`Capability::GradientCompression`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store compresses gradients.
    fn set_gradient_compression(&self, params: &CompressionParams) -> Result<()> {
        let _ = params;
        Err(self.unsupported("set_gradient_compression"))
    }

    /// Saves the optimizer states (and the optimizer when `dump_optimizer`) to `path`.
    /// Requires [`Capability::OptimizerStates`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store can save optimizer states.
    fn save_optimizer_states(&self, path: &Path, dump_optimizer: bool) -> Result<()> {
        let _ = (path, dump_optimizer);
        Err(self.unsupported("save_optimizer_states"))
    }

    /// Loads optimizer states saved by [`KVStoreBase::save_optimizer_states`].
    /// Requires [`Capability::OptimizerStates`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store can load optimizer states.
    fn load_optimizer_states(&self, path: &Path) -> Result<()> {
        let _ = path;
        Err(self.unsupported("load_optimizer_states"))
    }

    /// Waits until every worker reaches the barrier.
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store synchronises workers.
    fn barrier(&self) -> Result<()> {
        Err(self.unsupported("barrier"))
    }

    /// Sends a command to every server and waits for their replies (MXNet's
    /// `_send_command_to_servers`).
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the store has servers.
    fn send_command_to_servers(&self, head: i32, body: &str) -> Result<()> {
        let _ = (head, body);
        Err(self.unsupported("send_command_to_servers"))
    }

    /// Whether the `*_batch` calls take arrays in device memory as they are. When false (the
    /// default), [`KVStoreExt`](crate::KVStoreExt) stages them through host memory, as
    /// MXNet's CPU stores do with GPU arrays: values are copied to the host before the call,
    /// and outputs in device memory receive the host results after it.
    fn handles_device_arrays(&self) -> bool {
        false
    }

    /// The [`Error::Unsupported`] error for `operation` on this store.
    fn unsupported(&self, operation: &'static str) -> Error {
        Error::Unsupported {
            store: self.type_name().to_string(),
            operation,
        }
    }
}
