//! # kvstore-plugin-local: the `local` store as a plugin, for the tests of ABI revision 1.1
//!
//! A `cdylib` exporting, with [`export_plugin!`](kvstore_base::export_plugin), a store
//! registered as [`NAME`] (`localpluginstore`) that is kvstore-local's [`LocalStore`] under
//! that name, so that what crosses the plugin boundary can be compared with the same store in
//! process: optimizer states (byte for byte), row-sparse values and `row_sparse_pull`, and
//! their errors. On top of the local store it offers what the local store does not, as a test
//! fixture:
//!
//! - `set_gradient_compression` validates the parameters exactly as MXNet does
//!   ([`CompressionSpec::from_params`]) and records them; it does not compress.
//! - `barrier` (a single worker: it returns at once) and `send_command_to_servers` (no servers:
//!   the command is recorded) are recorded too; a command with a negative head is refused with
//!   [`Error::InvalidArgument`](kvstore_base::Error::InvalidArgument).
//!
//! The records are kept per library, in call order, and read through the extra C function
//! [`kvstore_plugin_local_calls`]. Custom updaters are the local store's, but cannot be
//! installed through the plugin boundary.
#![deny(missing_docs)]

use std::path::Path;
use std::sync::Mutex;

use kvstore_base::{
    Capability, CompressionParams, KVStoreBase, KeyedOuts, KeyedValues, NDArray, OptimizerSpec,
    Result, Updater,
};
use kvstore_compression::CompressionSpec;
use kvstore_local::reduce::ReduceConfig;
use kvstore_local::LocalStore;

/// The name the plugin registers its store under, and the store's type name.
pub const NAME: &str = "localpluginstore";

/// What the stores of this library were asked to do that leaves no trace in their values.
static CALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record(call: String) {
    CALLS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(call);
}

/// Copies the calls recorded so far, one per line (`barrier`, `set_gradient_compression
/// {json}`, `send_command_to_servers {head} {body}`), into `buf` (truncated, nul-terminated)
/// and returns their full length in bytes.
///
/// # Safety
/// `buf` must be null or point to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvstore_plugin_local_calls(buf: *mut u8, cap: usize) -> usize {
    let text = CALLS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .join("\n");
    if !buf.is_null() && cap > 0 {
        let len = text.len().min(cap - 1);
        // SAFETY: the caller guarantees `cap` writable bytes at `buf`; `len + 1 <= cap`.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf, len);
            *buf.add(len) = 0;
        }
    }
    text.len()
}

/// The local store under the name [`NAME`], with recorded compression parameters, barriers
/// and commands (see the crate documentation).
#[derive(Debug)]
pub struct LocalPluginStore {
    local: LocalStore,
}

impl Default for LocalPluginStore {
    fn default() -> Self {
        LocalPluginStore {
            local: LocalStore::with_config(NAME, ReduceConfig::from_env()),
        }
    }
}

kvstore_base::export_plugin!(
    LocalPluginStore,
    capabilities = [
        Capability::Optimizer,
        Capability::InitPushPull,
        Capability::Updater,
        Capability::GradientCompression,
        Capability::RowSparse,
        Capability::OptimizerStates,
    ]
);

impl KVStoreBase for LocalPluginStore {
    fn type_name(&self) -> &str {
        self.local.type_name()
    }

    fn rank(&self) -> usize {
        self.local.rank()
    }

    fn num_workers(&self) -> usize {
        self.local.num_workers()
    }

    fn is_capable(&self, capability: Capability) -> bool {
        capability == Capability::GradientCompression || self.local.is_capable(capability)
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.local.broadcast_batch(values, outs, priority)
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.local.pushpull_batch(values, outs, priority)
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        self.local.init_batch(values)
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        self.local.push_batch(values, priority)
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        self.local.pull_batch(outs, priority, ignore_sparse)
    }

    fn row_sparse_pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        self.local.row_sparse_pull_batch(outs, row_ids, priority)
    }

    fn set_optimizer(&self, optimizer: &OptimizerSpec) -> Result<()> {
        self.local.set_optimizer(optimizer)
    }

    fn set_updater(&self, updater: Updater) -> Result<()> {
        self.local.set_updater(updater)
    }

    fn set_gradient_compression(&self, params: &CompressionParams) -> Result<()> {
        CompressionSpec::from_params(params)?;
        let pairs: Vec<String> = params
            .iter()
            .map(|(name, value)| format!("{name:?}: {value:?}"))
            .collect();
        record(format!("set_gradient_compression {{{}}}", pairs.join(", ")));
        Ok(())
    }

    fn save_optimizer_states(&self, path: &Path, dump_optimizer: bool) -> Result<()> {
        self.local.save_optimizer_states(path, dump_optimizer)
    }

    fn load_optimizer_states(&self, path: &Path) -> Result<()> {
        self.local.load_optimizer_states(path)
    }

    fn barrier(&self) -> Result<()> {
        self.local.barrier()?;
        record("barrier".into());
        Ok(())
    }

    fn send_command_to_servers(&self, head: i32, body: &str) -> Result<()> {
        if head < 0 {
            return Err(kvstore_base::Error::InvalidArgument(format!(
                "{NAME}: command head {head} is reserved (heads are non-negative)"
            )));
        }
        self.local.send_command_to_servers(head, body)?;
        record(format!("send_command_to_servers {head} {body}"));
        Ok(())
    }
}
