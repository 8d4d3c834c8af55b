//! The host side of the ABI: [`PluginApi`] (a checked copy of a descriptor) and
//! [`PluginStore`], the [`KVStoreBase`] that calls a plugin's functions.

use std::ffi::CStr;
use std::fmt;
use std::sync::Arc;

use super::abi::*;
use super::{
    capabilities_from_mask, capability_code, check_on_host, check_transferable, dtype_code,
    dtype_from_code, empty_tensor, host_bytes, host_bytes_mut, key_to_abi, path_to_abi,
    standardised,
};
use crate::{
    Capability, CompressionParams, CreateRequest, DType, Error, KVStoreBase, Key, KeyTypeGuard,
    KeyedOuts, KeyedValues, NDArray, OptimizerSpec, Result, StorageType,
};

/// Bytes of the message buffer the host passes with every call.
const MESSAGE_CAP: usize = 2048;
/// The longest store type name the host reads from a plugin, in bytes.
const MAX_TYPE_NAME: usize = 64 * 1024;

/// The functions and facts of a plugin, copied from its descriptor and checked: the ABI
/// version, the descriptor's size, the name and every required function. Functions beyond
/// the descriptor's `struct_size` (a plugin built against an earlier revision) are absent.
#[derive(Clone)]
pub struct PluginApi {
    name: String,
    origin: String,
    capabilities: Option<Vec<Capability>>,
    create: KvCreateFn,
    destroy: KvDestroyFn,
    type_name: KvTypeNameFn,
    rank: KvCountFn,
    num_workers: KvCountFn,
    is_capable: KvIsCapableFn,
    init: Option<KvInitFn>,
    push: Option<KvPushFn>,
    pull: Option<KvPushFn>,
    pushpull: KvPushPullFn,
    broadcast: KvPushPullFn,
    set_optimizer: Option<KvSetOptimizerFn>,
    struct_size: usize,
    barrier: Option<KvBarrierFn>,
    set_gradient_compression: Option<KvSetGradientCompressionFn>,
    save_optimizer_states: Option<KvSaveOptimizerStatesFn>,
    load_optimizer_states: Option<KvLoadOptimizerStatesFn>,
    send_command_to_servers: Option<KvSendCommandFn>,
    row_sparse_pull: Option<KvRowSparsePullFn>,
    init_row_sparse: Option<KvInitRowSparseFn>,
    push_row_sparse: Option<KvPushRowSparseFn>,
}

impl fmt::Debug for PluginApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginApi")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("capabilities", &self.capabilities)
            .field("struct_size", &self.struct_size)
            .finish_non_exhaustive()
    }
}

impl PluginApi {
    /// Checks and copies a descriptor; `origin` (a library path) names it in messages.
    ///
    /// Only the descriptor's first `struct_size` bytes are read (at most this revision's
    /// size): a descriptor of revision 1.0 ([`KV_PLUGIN_DESCRIPTOR_SIZE_V1_0`]) is accepted,
    /// and the functions it does not have are unsupported operations.
    ///
    /// # Safety
    /// `descriptor` must be null or point to a descriptor of at least its `struct_size` bytes
    /// whose name and functions stay valid for the rest of the program (a library that is
    /// never unloaded) and follow the ABI.
    ///
    /// # Errors
    /// [`Error::Plugin`] for a null descriptor, another ABI version, a descriptor smaller than
    /// revision 1.0's, a missing or non-UTF-8 name, or a missing required function.
    pub unsafe fn from_descriptor(
        descriptor: *const KvPluginDescriptor,
        origin: &str,
    ) -> Result<PluginApi> {
        let fail = |reason: String| Error::Plugin {
            path: origin.into(),
            reason,
        };
        if descriptor.is_null() {
            return Err(fail(format!(
                "{KV_PLUGIN_ENTRY}() returned a null descriptor"
            )));
        }
        // SAFETY: the caller guarantees a readable descriptor; its first two fields exist in
        // every version, and the rest is read only as far as `struct_size` says it goes.
        let (version, size) = unsafe { ((*descriptor).abi_version, (*descriptor).struct_size) };
        if version != KV_PLUGIN_ABI_VERSION {
            return Err(fail(format!(
                "the plugin was built for kvstore plugin ABI version {version}, but this host \
                 speaks version {KV_PLUGIN_ABI_VERSION}; rebuild it against this kvstore"
            )));
        }
        if size < KV_PLUGIN_DESCRIPTOR_SIZE_V1_0 {
            return Err(fail(format!(
                "its descriptor is {size} bytes, smaller than the {KV_PLUGIN_DESCRIPTOR_SIZE_V1_0} \
                 bytes of ABI version {KV_PLUGIN_ABI_VERSION} (revision 1.0)"
            )));
        }
        // Fields the plugin does not have (it was built against an earlier revision) stay
        // zero: null functions, that is unsupported operations. Fields of later revisions than
        // this host's are not read. Every field after revision 1.0's is a function pointer: a
        // size that ends inside one is refused (half a pointer would be a wild call).
        let pointer = std::mem::size_of::<usize>();
        if !(size - KV_PLUGIN_DESCRIPTOR_SIZE_V1_0).is_multiple_of(pointer) {
            return Err(fail(format!(
                "its descriptor's struct_size {size} does not end on a field: the fields after \
                 the {KV_PLUGIN_DESCRIPTOR_SIZE_V1_0} bytes of revision 1.0 are function pointers \
                 of {pointer} bytes"
            )));
        }
        let known = size.min(std::mem::size_of::<KvPluginDescriptor>());
        // SAFETY: all-zero bytes are a valid descriptor (integers, null pointers, `None`
        // functions).
        let mut d: KvPluginDescriptor = unsafe { std::mem::zeroed() };
        // SAFETY: the caller guarantees `size >= known` readable bytes at `descriptor`; `d` is
        // a distinct local of at least `known` bytes; the bytes copied hold the fields of the
        // plugin's revision, which have the same layout here.
        unsafe {
            std::ptr::copy_nonoverlapping(
                descriptor.cast::<u8>(),
                std::ptr::addr_of_mut!(d).cast::<u8>(),
                known,
            )
        };
        if d.name.is_null() {
            return Err(fail("its descriptor has no name".into()));
        }
        // SAFETY: the caller guarantees that a non-null name is a valid C string.
        let name = unsafe { CStr::from_ptr(d.name) }
            .to_str()
            .map_err(|_| fail("its name is not UTF-8".into()))?
            .trim()
            .to_lowercase();
        if name.is_empty() {
            return Err(fail("its name is empty".into()));
        }
        let need = |present: bool, function: &str| {
            if present {
                Ok(())
            } else {
                Err(fail(format!(
                    "its descriptor lacks the required function `{function}`"
                )))
            }
        };
        need(d.create.is_some(), "create")?;
        need(d.destroy.is_some(), "destroy")?;
        need(d.type_name.is_some(), "type_name")?;
        need(d.rank.is_some(), "rank")?;
        need(d.num_workers.is_some(), "num_workers")?;
        need(d.is_capable.is_some(), "is_capable")?;
        need(d.pushpull.is_some(), "pushpull")?;
        need(d.broadcast.is_some(), "broadcast")?;
        let (Some(create), Some(destroy), Some(type_name), Some(rank), Some(num_workers)) =
            (d.create, d.destroy, d.type_name, d.rank, d.num_workers)
        else {
            unreachable!("checked above")
        };
        let (Some(is_capable), Some(pushpull), Some(broadcast)) =
            (d.is_capable, d.pushpull, d.broadcast)
        else {
            unreachable!("checked above")
        };
        let mut api = PluginApi {
            name,
            origin: origin.to_string(),
            capabilities: None,
            create,
            destroy,
            type_name,
            rank,
            num_workers,
            is_capable,
            init: d.init,
            push: d.push,
            pull: d.pull,
            pushpull,
            broadcast,
            set_optimizer: d.set_optimizer,
            struct_size: size,
            barrier: d.barrier,
            set_gradient_compression: d.set_gradient_compression,
            save_optimizer_states: d.save_optimizer_states,
            load_optimizer_states: d.load_optimizer_states,
            send_command_to_servers: d.send_command_to_servers,
            row_sparse_pull: d.row_sparse_pull,
            init_row_sparse: d.init_row_sparse,
            push_row_sparse: d.push_row_sparse,
        };
        if d.capabilities != KV_CAPABILITIES_UNDECLARED {
            let declared = capabilities_from_mask(d.capabilities)
                .into_iter()
                .filter(|&c| api.forwards(c))
                .collect();
            api.capabilities = Some(declared);
        }
        Ok(api)
    }

    /// Whether a store of this plugin can have `capability`: the plugin provides the
    /// functions it needs. [`Capability::Updater`] never crosses the ABI (an updater is a
    /// Rust closure).
    pub fn forwards(&self, capability: Capability) -> bool {
        match capability {
            Capability::InitPushPull => {
                self.init.is_some() && self.push.is_some() && self.pull.is_some()
            }
            Capability::Distributed => true,
            Capability::Optimizer => self.set_optimizer.is_some(),
            Capability::GradientCompression => self.set_gradient_compression.is_some(),
            Capability::OptimizerStates => {
                self.set_optimizer.is_some()
                    && self.save_optimizer_states.is_some()
                    && self.load_optimizer_states.is_some()
            }
            Capability::RowSparse => {
                self.row_sparse_pull.is_some()
                    && self.init_row_sparse.is_some()
                    && self.push_row_sparse.is_some()
            }
            Capability::Updater => false,
        }
    }

    /// The descriptor's `struct_size`: [`KV_PLUGIN_DESCRIPTOR_SIZE_V1_0`] for a plugin built
    /// against revision 1.0, [`KV_PLUGIN_DESCRIPTOR_SIZE_V1_1`] for this revision (larger for
    /// a later one, whose extra functions this host does not use).
    pub fn struct_size(&self) -> usize {
        self.struct_size
    }

    /// The store name the plugin declares (lower-cased).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the plugin comes from (its library path).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The declared capabilities that the plugin provides the functions for (see
    /// [`PluginApi::forwards`]), or `None` when the plugin does not declare them.
    pub fn capabilities(&self) -> Option<&[Capability]> {
        self.capabilities.as_deref()
    }

    /// Creates a store through the plugin's `create`.
    ///
    /// # Errors
    /// Whatever the plugin's factory reports.
    pub fn create(self: &Arc<Self>, request: &CreateRequest) -> Result<PluginStore> {
        let options: Vec<KvOption> = request
            .options
            .iter()
            .map(|(k, v)| KvOption {
                key: k.as_ptr(),
                key_len: k.len(),
                value: v.as_ptr(),
                value_len: v.len(),
            })
            .collect();
        let mut buffer = [0u8; MESSAGE_CAP];
        let mut record = KvError::with_buffer(&mut buffer);
        // SAFETY: every pointer is valid for the call: the name and options borrow `request`
        // and `options`, the record and its buffer live on this stack frame.
        let handle = unsafe {
            (self.create)(
                request.name.as_ptr(),
                request.name.len(),
                options.as_ptr(),
                options.len(),
                &mut record,
            )
        };
        reclaim_message(&mut record, &mut buffer);
        if handle.is_null() {
            let code = if record.code == KV_OK {
                KV_ERR_BACKEND
            } else {
                record.code
            };
            return Err(self.error(&self.name, "create", code, &record, &[], &[]));
        }
        let mut name_buffer = [0u8; 256];
        // SAFETY: `handle` is live; the buffer has the stated capacity.
        let len = unsafe { (self.type_name)(handle, name_buffer.as_mut_ptr(), name_buffer.len()) };
        let type_name = if len < name_buffer.len() {
            String::from_utf8_lossy(&name_buffer[..len]).into_owned()
        } else {
            // The length is the plugin's word: a longer name than this is cut, not allocated.
            let mut long = vec![0u8; len.min(MAX_TYPE_NAME) + 1];
            // SAFETY: as above, with a buffer large enough for the whole name.
            let len = unsafe { (self.type_name)(handle, long.as_mut_ptr(), long.len()) };
            String::from_utf8_lossy(&long[..len.min(long.len() - 1)]).into_owned()
        };
        Ok(PluginStore {
            api: Arc::clone(self),
            handle,
            type_name,
            key_type: KeyTypeGuard::new(),
        })
    }

    /// The [`Error`] a failed call reported.
    fn error(
        &self,
        store: &str,
        operation: &'static str,
        code: i32,
        record: &KvError,
        value_keys: &[Key],
        out_keys: &[Key],
    ) -> Error {
        let message = record_message(record);
        let dtype = |c: u32| dtype_from_code(c).unwrap_or(DType::F32);
        let shape = |dims: &[i64; KV_ERROR_MAX_NDIM], n: u32| -> Vec<usize> {
            dims[..(n as usize).min(KV_ERROR_MAX_NDIM)]
                .iter()
                .map(|&d| d.max(0) as usize)
                .collect()
        };
        let cause = match code {
            KV_ERR_UNSUPPORTED => {
                return Error::Unsupported {
                    store: store.to_string(),
                    operation,
                }
            }
            KV_ERR_PANIC => {
                return Error::Panic {
                    store: store.to_string(),
                    operation,
                    message,
                }
            }
            KV_ERR_INVALID_ARGUMENT => Error::InvalidArgument(message),
            KV_ERR_SHAPE_MISMATCH => Error::ShapeMismatch {
                what: message,
                expected: shape(&record.shape_expected, record.ndim_expected),
                found: shape(&record.shape_found, record.ndim_found),
            },
            KV_ERR_DTYPE_MISMATCH
                if dtype_from_code(record.dtype_expected).is_some()
                    && dtype_from_code(record.dtype_found).is_some() =>
            {
                Error::DTypeMismatch {
                    what: message,
                    expected: dtype(record.dtype_expected),
                    found: dtype(record.dtype_found),
                }
            }
            KV_ERR_KEY_NOT_INITIALIZED => Error::KeyNotInitialized,
            KV_ERR_DUPLICATE_INIT => Error::DuplicateInit,
            KV_ERR_COUNT_MISMATCH => Error::CountMismatch {
                operation,
                what: message,
                expected: record.count_expected,
                found: record.count_found,
            },
            KV_ERR_DEVICE => Error::Device(message),
            KV_ERR_BACKEND => Error::Backend {
                store: store.to_string(),
                source: message.into(),
            },
            // A message without a path is about the call's own file, which only the state
            // calls have (see `PluginStore::fail_at_path`).
            KV_ERR_IO => match message.split_once('\n') {
                Some((path, text)) => io_error(path.into(), text, record),
                None => Error::Backend {
                    store: store.to_string(),
                    source: format!("I/O error: {message}").into(),
                },
            },
            other => Error::Backend {
                store: store.to_string(),
                source: format!("plugin {} returned status {other}: {message}", self.origin).into(),
            },
        };
        let key = match record.key_source {
            KV_ERROR_KEY_OF_VALUES => value_keys.get(record.key_index),
            KV_ERROR_KEY_OF_OUTS => out_keys.get(record.key_index),
            _ => None,
        };
        match key {
            Some(key) => cause.at_key(store, operation, key.clone()),
            // An error about a key that names none of the call's keys: said so, with the
            // plugin's own words (the bare error would name neither the store nor the key).
            None if matches!(cause, Error::KeyNotInitialized | Error::DuplicateInit) => {
                let keys = match record.key_source {
                    KV_ERROR_KEY_OF_OUTS => out_keys.len(),
                    _ => value_keys.len(),
                };
                Error::Backend {
                    store: store.to_string(),
                    source: format!(
                        "plugin {} reported \"{cause}\" in {operation} without naming one of the \
                         call's {keys} keys (key_source {}, key_index {}): {}",
                        self.origin,
                        record.key_source,
                        record.key_index,
                        record_message(record)
                    )
                    .into(),
                }
            }
            None => cause,
        }
    }
}

/// The [`Error::Io`] of a [`KV_ERR_IO`] record: on `path`, of the operating system's error
/// number in `count_found` (plus one) when there is one (its kind kept), else of `text`.
fn io_error(path: std::path::PathBuf, text: &str, record: &KvError) -> Error {
    let os = record
        .count_found
        .checked_sub(1)
        .and_then(|n| i32::try_from(n).ok());
    let source = match os {
        Some(n) => std::io::Error::from_raw_os_error(n),
        None => std::io::Error::other(text.to_string()),
    };
    Error::Io { path, source }
}

/// Points `record`'s message back at the host's `buffer` once a call returned: the plugin may
/// have overwritten the pointer (a wrapper copying an inner store's record over the one it was
/// given), and only the host's own buffer is ever read.
fn reclaim_message(record: &mut KvError, buffer: &mut [u8]) {
    record.message = buffer.as_mut_ptr();
    record.message_cap = buffer.len();
}

/// The message a failed call wrote into the host's buffer (see [`reclaim_message`]).
fn record_message(record: &KvError) -> String {
    let len = record.message_len.min(MESSAGE_CAP.saturating_sub(1));
    if record.message.is_null() {
        return String::new();
    }
    // SAFETY: the message points into the host's buffer of MESSAGE_CAP bytes (put back by
    // `reclaim_message` after the call), of which at most MESSAGE_CAP - 1 are read.
    let bytes = unsafe { std::slice::from_raw_parts(record.message, len) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// A store living in a plugin, reached through the C ABI.
///
/// Inputs are passed as pointers into the caller's arrays (copied first only when an array
/// is not in standard layout); outputs are written by the plugin straight into the caller's
/// arrays. GPU arrays cannot cross the ABI and are an [`Error::InvalidArgument`], as are
/// row-sparse arrays except in `init` and `push` (through the plugin's `init_row_sparse` and
/// `push_row_sparse`) and as `row_sparse_pull` outputs; a `pull` with `ignore_sparse` skips
/// row-sparse outputs, as in MXNet, and without it fills them with the value's non-zero rows.
/// The host holds every plugin store to one type of key, as MXNet does: the first key named
/// fixes it, and a key of the other type is an [`Error::MixedKeyTypes`] that never reaches
/// the plugin. Operations the plugin does not provide (left null, or beyond its descriptor's
/// `struct_size`) and custom updaters are [`Error::Unsupported`].
pub struct PluginStore {
    api: Arc<PluginApi>,
    handle: KvStoreHandle,
    type_name: String,
    /// The store's type of key (int or string), fixed by the first key any call named.
    key_type: KeyTypeGuard,
}

// SAFETY: the ABI requires plugin stores to be usable from any thread, concurrently; the
// handle is only ever passed to the plugin's functions.
unsafe impl Send for PluginStore {}
// SAFETY: as for `Send`.
unsafe impl Sync for PluginStore {}

impl fmt::Debug for PluginStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginStore")
            .field("type_name", &self.type_name)
            .field("plugin", &self.api.origin)
            .finish()
    }
}

impl Drop for PluginStore {
    fn drop(&mut self) {
        // SAFETY: the handle came from the plugin's `create` and is released exactly once.
        unsafe { (self.api.destroy)(self.handle) };
    }
}

/// Arrays laid out for a call: keys, shapes and tensors pointing into the input arrays (or
/// into standard-layout copies kept here), and into buffers kept here for the outputs.
struct Marshalled {
    keys: Vec<KvKey>,
    tensors: Vec<KvTensor>,
    _shapes: Vec<Vec<i64>>,
    /// Fresh buffers the plugin writes the outputs into, by position; copied into the outputs
    /// after a successful call.
    staged: Vec<(usize, NDArray)>,
    _input_copies: Vec<NDArray>,
}

fn tensor_for(data: *mut u8, byte_len: usize, array: &NDArray, shape: &[i64]) -> KvTensor {
    KvTensor {
        data,
        byte_len,
        dtype: dtype_code(array.dtype()),
        ndim: shape.len() as u32,
        shape: shape.as_ptr(),
        device_type: KV_DEVICE_CPU,
        device_id: 0,
    }
}

fn shape_of(array: &NDArray) -> Vec<i64> {
    array.shape().iter().map(|&d| d as i64).collect()
}

fn marshal_values(keys: &[Key], values: &[&NDArray]) -> Result<Marshalled> {
    for (i, v) in values.iter().enumerate() {
        check_transferable(v, &format!("value {i}"))?;
    }
    let copies: Vec<NDArray> = values
        .iter()
        .filter(|v| v.dense().and_then(host_bytes).is_none())
        .map(|v| standardised(v))
        .collect();
    let shapes: Vec<Vec<i64>> = values.iter().map(|v| shape_of(v)).collect();
    let mut next_copy = copies.iter();
    let tensors = values
        .iter()
        .zip(&shapes)
        .map(|(v, shape)| {
            let bytes = match v.dense().and_then(host_bytes) {
                Some(b) => b,
                None => next_copy
                    .next()
                    .and_then(|c| c.dense())
                    .and_then(host_bytes)
                    .expect("one standard-layout copy per non-contiguous value"),
            };
            // Inputs are read-only by the ABI's contract; the pointer is `*mut` only because
            // one tensor type serves inputs and outputs.
            tensor_for(bytes.as_ptr().cast_mut(), bytes.len(), v, shape)
        })
        .collect();
    Ok(Marshalled {
        keys: keys.iter().map(key_to_abi).collect(),
        tensors,
        _shapes: shapes,
        staged: Vec::new(),
        _input_copies: copies,
    })
}

/// Outputs laid out for a call, each in a fresh dense buffer the plugin writes (copied into the
/// output by [`PluginStore::finish_outs`] once the call succeeded); those `skip` names are
/// left out. With `rows`, a row-sparse output takes its buffer's non-zero rows (a pull's, as
/// MXNet casts a dense value to row-sparse); else it is refused.
fn marshal_outs(
    keys: &[Key],
    outs: &mut [&mut NDArray],
    skip: &[bool],
    rows: bool,
) -> Result<Marshalled> {
    for (i, o) in outs.iter().enumerate() {
        let what = format!("output {i}");
        match (skip[i], rows && o.storage_type() == StorageType::RowSparse) {
            (true, _) => {}
            (false, true) => check_on_host(o, &what)?,
            (false, false) => check_transferable(o, &what)?,
        }
    }
    let mut m = Marshalled {
        keys: Vec::new(),
        tensors: Vec::new(),
        _shapes: Vec::new(),
        staged: Vec::new(),
        _input_copies: Vec::new(),
    };
    // The plugin writes into buffers of the host's, copied into the outputs only once the call
    // succeeded: a plugin that fails halfway (or breaks the rule that a failed call leaves
    // every output unchanged) cannot leave them half-written.
    for (i, out) in outs.iter().enumerate() {
        if !skip[i] {
            m.staged.push((i, NDArray::zeros(out.shape(), out.dtype())));
        }
    }
    for (i, target) in m.staged.iter_mut() {
        let shape = shape_of(target);
        let bytes = target
            .dense_mut()
            .and_then(host_bytes_mut)
            .expect("a fresh dense array is contiguous");
        let tensor = tensor_for(bytes.as_mut_ptr(), bytes.len(), target, &shape);
        m.keys.push(key_to_abi(&keys[*i]));
        m.tensors.push(tensor);
        m._shapes.push(shape);
    }
    // The shape vectors moved into `_shapes` keep their heap buffers, so the pointers stay valid.
    Ok(m)
}

/// Values laid out for `init_row_sparse` / `push_row_sparse`: keys, and values pointing into
/// the arrays (or into standard-layout copies kept here).
struct MarshalledValues {
    keys: Vec<KvKey>,
    values: Vec<KvValue>,
    _shapes: Vec<Vec<i64>>,
    _copies: Vec<NDArray>,
}

/// The bytes of what a value's `data` tensor carries: a dense array's elements or a row-sparse
/// array's stored rows; `None` when they are not contiguous.
fn data_bytes(value: &NDArray) -> Option<&[u8]> {
    match value.as_row_sparse() {
        Some(r) => host_bytes(r.rows()),
        None => value.dense().and_then(host_bytes),
    }
}

fn marshal_sparse_values(keys: &[Key], values: &[&NDArray]) -> Result<MarshalledValues> {
    for (i, v) in values.iter().enumerate() {
        check_on_host(v, &format!("value {i}"))?;
    }
    let copies: Vec<NDArray> = values
        .iter()
        .filter(|v| data_bytes(v).is_none())
        .map(|v| match v.as_row_sparse() {
            Some(r) => standardised(&NDArray::from_host(r.rows().clone())),
            None => standardised(v),
        })
        .collect();
    let mut next_copy = copies.iter();
    let mut shapes = Vec::with_capacity(values.len() * 2);
    let mut marshalled = Vec::with_capacity(values.len());
    for v in values {
        let bytes = match data_bytes(v) {
            Some(b) => b,
            None => next_copy
                .next()
                .and_then(|c| c.dense())
                .and_then(host_bytes)
                .ok_or_else(|| {
                    Error::InvalidArgument("a value could not be laid out contiguously".into())
                })?,
        };
        // Inputs are read-only by the ABI's contract (see `marshal_values`).
        let data = bytes.as_ptr().cast_mut();
        let value = match v.as_row_sparse() {
            Some(r) => {
                let mut row_shape = shape_of(v);
                row_shape[0] = r.indices().len() as i64;
                let id_shape = vec![r.indices().len() as i64];
                let value = KvValue {
                    storage: KV_STORAGE_ROW_SPARSE,
                    num_rows: v.shape()[0] as i64,
                    row_ids: KvTensor {
                        data: r.indices().as_ptr().cast::<u8>().cast_mut(),
                        byte_len: std::mem::size_of_val(r.indices()),
                        dtype: KV_DTYPE_I64,
                        ndim: 1,
                        shape: id_shape.as_ptr(),
                        device_type: KV_DEVICE_CPU,
                        device_id: 0,
                    },
                    data: tensor_for(data, bytes.len(), v, &row_shape),
                };
                shapes.push(row_shape);
                shapes.push(id_shape);
                value
            }
            None => {
                let shape = shape_of(v);
                let value = KvValue {
                    storage: KV_STORAGE_DENSE,
                    num_rows: 0,
                    row_ids: empty_tensor(),
                    data: tensor_for(data, bytes.len(), v, &shape),
                };
                shapes.push(shape);
                value
            }
        };
        marshalled.push(value);
    }
    // The shape vectors moved into `_shapes` keep their heap buffers, so the pointers stay valid.
    Ok(MarshalledValues {
        keys: keys.iter().map(key_to_abi).collect(),
        values: marshalled,
        _shapes: shapes,
        _copies: copies,
    })
}

/// Whether a batch holds a row-sparse value.
fn any_row_sparse(values: &KeyedValues<'_>) -> bool {
    values
        .values()
        .iter()
        .any(|v| v.storage_type() == StorageType::RowSparse)
}

impl PluginStore {
    /// The plugin this store lives in.
    pub fn api(&self) -> &PluginApi {
        &self.api
    }

    fn fail(
        &self,
        operation: &'static str,
        code: i32,
        record: &KvError,
        value_keys: &[Key],
        out_keys: &[Key],
    ) -> Error {
        self.api.error(
            &self.type_name,
            operation,
            code,
            record,
            value_keys,
            out_keys,
        )
    }

    /// The error of a failed call about the file `path`: [`KV_ERR_IO`] becomes
    /// [`Error::Io`] naming it.
    fn fail_at_path(
        &self,
        operation: &'static str,
        code: i32,
        record: &KvError,
        path: &std::path::Path,
    ) -> Error {
        if code == KV_ERR_IO {
            // A message naming its own file is read by `fail` as any call's.
            let message = record_message(record);
            if !message.contains('\n') {
                return io_error(path.to_path_buf(), &message, record);
            }
        }
        self.fail(operation, code, record, &[], &[])
    }

    /// Runs `call` with a fresh error record; a status other than [`KV_OK`] becomes the error
    /// `on_error` makes of it.
    fn status(
        &self,
        call: impl FnOnce(KvStoreHandle, &mut KvError) -> i32,
        on_error: impl FnOnce(i32, &KvError) -> Error,
    ) -> Result<()> {
        let mut buffer = [0u8; MESSAGE_CAP];
        let mut record = KvError::with_buffer(&mut buffer);
        let code = call(self.handle, &mut record);
        reclaim_message(&mut record, &mut buffer);
        if code != KV_OK {
            return Err(on_error(code, &record));
        }
        Ok(())
    }

    /// Calls `init_row_sparse` or `push_row_sparse` with `values` marshalled.
    fn with_sparse_values(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        call: impl FnOnce(KvStoreHandle, *const KvKey, *const KvValue, usize, &mut KvError) -> i32,
    ) -> Result<()> {
        let m = marshal_sparse_values(values.keys(), values.values())?;
        // The keys and values point into arrays borrowed for the call (read-only).
        self.status(
            |handle, record| {
                call(
                    handle,
                    m.keys.as_ptr(),
                    m.values.as_ptr(),
                    m.values.len(),
                    record,
                )
            },
            |code, record| self.fail(operation, code, record, values.keys(), &[]),
        )
    }

    /// Copies the buffers a successful call wrote into the outputs they stand for.
    fn finish_outs(outs: &mut [&mut NDArray], staged: Vec<(usize, NDArray)>) -> Result<()> {
        for (i, copy) in staged {
            outs[i].assign(&copy)?;
        }
        Ok(())
    }

    fn values_into_outs(
        &self,
        operation: &'static str,
        function: KvPushPullFn,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        outs.check_against(operation, values)?;
        self.key_type.check(operation, values.keys())?;
        let inputs = marshal_values(values.keys(), values.values())?;
        let out_keys = outs.keys().to_vec();
        let skip = vec![false; outs.len()];
        let outputs = marshal_outs(&out_keys, outs.outs_mut(), &skip, false)?;
        self.status(
            // SAFETY: the handle is live; keys and tensors point into arrays borrowed for the
            // call (inputs read-only, outputs exclusively borrowed through `outs`); the record
            // and its buffer live on the caller's stack frame.
            |handle, record| unsafe {
                function(
                    handle,
                    inputs.keys.as_ptr(),
                    inputs.tensors.as_ptr(),
                    inputs.tensors.len(),
                    outputs.keys.as_ptr(),
                    outputs.tensors.as_ptr(),
                    outputs.tensors.len(),
                    priority,
                    record,
                )
            },
            |code, record| self.fail(operation, code, record, values.keys(), &out_keys),
        )?;
        Self::finish_outs(outs.outs_mut(), outputs.staged)
    }

    /// Calls an inputs-only plugin function (`init`, `push`) with `values` marshalled, and turns
    /// its status into a `Result`.
    fn with_values(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        call: impl FnOnce(KvStoreHandle, *const KvKey, *const KvTensor, usize, &mut KvError) -> i32,
    ) -> Result<()> {
        let m = marshal_values(values.keys(), values.values())?;
        // The keys and tensors point into arrays borrowed for the call (read-only).
        self.status(
            |handle, record| {
                call(
                    handle,
                    m.keys.as_ptr(),
                    m.tensors.as_ptr(),
                    m.tensors.len(),
                    record,
                )
            },
            |code, record| self.fail(operation, code, record, values.keys(), &[]),
        )
    }
}

impl KVStoreBase for PluginStore {
    fn type_name(&self) -> &str {
        &self.type_name
    }

    fn rank(&self) -> usize {
        // SAFETY: the handle is live.
        unsafe { (self.api.rank)(self.handle) as usize }
    }

    fn num_workers(&self) -> usize {
        // SAFETY: the handle is live.
        unsafe { (self.api.num_workers)(self.handle) as usize }
    }

    fn is_capable(&self, capability: Capability) -> bool {
        if !self.api.forwards(capability) {
            return false;
        }
        // A plugin that declares its capabilities has no others.
        if let Some(declared) = &self.api.capabilities {
            if !declared.contains(&capability) {
                return false;
            }
        }
        // SAFETY: the handle is live.
        unsafe { (self.api.is_capable)(self.handle, capability_code(capability)) != 0 }
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.values_into_outs("broadcast", self.api.broadcast, values, outs, priority)
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.values_into_outs("pushpull", self.api.pushpull, values, outs, priority)
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        if let (Some(init), true) = (self.api.init_row_sparse, any_row_sparse(values)) {
            self.key_type.check("init", values.keys())?;
            // SAFETY: `with_sparse_values` passes arrays of `n` marshalled entries and a live
            // record.
            return self.with_sparse_values(
                "init",
                values,
                |handle, keys, vals, n, record| unsafe { init(handle, keys, vals, n, record) },
            );
        }
        let Some(init) = self.api.init else {
            return Err(self.unsupported("init"));
        };
        self.key_type.check("init", values.keys())?;
        // SAFETY: `with_values` passes arrays of `n` marshalled entries and a live record.
        self.with_values("init", values, |handle, keys, tensors, n, record| unsafe {
            init(handle, keys, tensors, n, record)
        })
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        if let (Some(push), true) = (self.api.push_row_sparse, any_row_sparse(values)) {
            self.key_type.check("push", values.keys())?;
            // SAFETY: `with_sparse_values` passes arrays of `n` marshalled entries and a live
            // record.
            return self.with_sparse_values(
                "push",
                values,
                |handle, keys, vals, n, record| unsafe {
                    push(handle, keys, vals, n, priority, record)
                },
            );
        }
        let Some(push) = self.api.push else {
            return Err(self.unsupported("push"));
        };
        self.key_type.check("push", values.keys())?;
        // SAFETY: `with_values` passes arrays of `n` marshalled entries and a live record.
        self.with_values("push", values, |handle, keys, tensors, n, record| unsafe {
            push(handle, keys, tensors, n, priority, record)
        })
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        let Some(pull) = self.api.pull else {
            return Err(self.unsupported("pull"));
        };
        self.key_type.check("pull", outs.keys())?;
        // A row-sparse output is skipped with `ignore_sparse`; without it, it receives the
        // non-zero rows of the whole value (plugins pull dense).
        let skip: Vec<bool> = outs
            .outs()
            .iter()
            .map(|o| ignore_sparse && o.storage_type() == StorageType::RowSparse)
            .collect();
        let keys = outs.keys().to_vec();
        let m = marshal_outs(&keys, outs.outs_mut(), &skip, true)?;
        if m.tensors.is_empty() {
            return Ok(());
        }
        // Error key indices refer to the pulled outputs only.
        let pulled: Vec<Key> = keys
            .iter()
            .zip(&skip)
            .filter(|(_, &s)| !s)
            .map(|(k, _)| k.clone())
            .collect();
        self.status(
            // SAFETY: as in `values_into_outs`, with outputs only.
            |handle, record| unsafe {
                pull(
                    handle,
                    m.keys.as_ptr(),
                    m.tensors.as_ptr(),
                    m.tensors.len(),
                    priority,
                    record,
                )
            },
            |code, record| self.fail("pull", code, record, &pulled, &[]),
        )?;
        Self::finish_outs(outs.outs_mut(), m.staged)
    }

    fn set_optimizer(&self, optimizer: &OptimizerSpec) -> Result<()> {
        let Some(set_optimizer) = self.api.set_optimizer else {
            return Err(self.unsupported("set_optimizer"));
        };
        let json = serde_json::to_vec(optimizer).map_err(|e| Error::Backend {
            store: self.type_name.clone(),
            source: Box::new(e),
        })?;
        self.status(
            // SAFETY: the handle is live; the JSON and the record live for the call.
            |handle, record| unsafe { set_optimizer(handle, json.as_ptr(), json.len(), record) },
            |code, record| self.fail("set_optimizer", code, record, &[], &[]),
        )
    }

    fn row_sparse_pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        row_ids: &[&NDArray],
        priority: i32,
    ) -> Result<()> {
        const OPERATION: &str = "row_sparse_pull";
        let Some(row_sparse_pull) = self.api.row_sparse_pull else {
            return Err(self.unsupported(OPERATION));
        };
        Error::check_row_id_count(outs.len(), row_ids.len())?;
        self.key_type.check(OPERATION, outs.keys())?;
        let keys = outs.keys().to_vec();
        // Per output: the sorted, unique ids (checked against the output's rows), the buffer
        // receiving those rows, and the shapes the tensors point to.
        let mut ids = Vec::with_capacity(outs.len());
        let mut rows = Vec::with_capacity(outs.len());
        for (i, (key, out)) in keys.iter().zip(outs.outs()).enumerate() {
            let prepared = (|| {
                check_on_host(out, &format!("output {i}"))?;
                if out.storage_type() != StorageType::RowSparse {
                    return Err(Error::InvalidArgument(format!(
                        "output {i} must be row-sparse for row_sparse_pull"
                    )));
                }
                let wanted = row_ids[i].unique_row_ids(out.shape()[0])?;
                let mut shape = out.shape().to_vec();
                shape[0] = wanted.len();
                Ok((wanted, NDArray::zeros(&shape, out.dtype())))
            })()
            .map_err(|e: Error| e.at_key(&self.type_name, OPERATION, key.clone()))?;
            ids.push(prepared.0);
            rows.push(prepared.1);
        }
        let mut shapes = Vec::with_capacity(outs.len() * 2);
        let mut values = Vec::with_capacity(outs.len());
        for ((wanted, buffer), out) in ids.iter().zip(rows.iter_mut()).zip(outs.outs()) {
            let id_shape = vec![wanted.len() as i64];
            let row_shape = shape_of(buffer);
            let dtype = buffer.dtype();
            let bytes = buffer
                .dense_mut()
                .and_then(host_bytes_mut)
                .ok_or_else(|| Error::InvalidArgument("a fresh array is not contiguous".into()))?;
            values.push(KvValue {
                storage: KV_STORAGE_ROW_SPARSE,
                num_rows: out.shape()[0] as i64,
                row_ids: KvTensor {
                    // Read-only by the ABI's contract.
                    data: wanted.as_ptr().cast::<u8>().cast_mut(),
                    byte_len: std::mem::size_of_val(wanted.as_slice()),
                    dtype: KV_DTYPE_I64,
                    ndim: 1,
                    shape: id_shape.as_ptr(),
                    device_type: KV_DEVICE_CPU,
                    device_id: 0,
                },
                data: KvTensor {
                    data: bytes.as_mut_ptr(),
                    byte_len: bytes.len(),
                    dtype: dtype_code(dtype),
                    ndim: row_shape.len() as u32,
                    shape: row_shape.as_ptr(),
                    device_type: KV_DEVICE_CPU,
                    device_id: 0,
                },
            });
            // The vectors keep their heap buffers when moved, so the pointers stay valid.
            shapes.push(id_shape);
            shapes.push(row_shape);
        }
        let abi_keys: Vec<KvKey> = keys.iter().map(key_to_abi).collect();
        // SAFETY: the handle is live; keys and values point into buffers owned by this frame
        // (ids read-only, rows written by the plugin), alive for the call.
        self.status(
            |handle, record| unsafe {
                row_sparse_pull(
                    handle,
                    abi_keys.as_ptr(),
                    values.as_ptr(),
                    values.len(),
                    priority,
                    record,
                )
            },
            |code, record| self.fail(OPERATION, code, record, &keys, &[]),
        )?;
        drop(values);
        drop(shapes);
        // Build every result before touching an output, so a failure leaves them unchanged.
        let results = ids
            .into_iter()
            .zip(&rows)
            .zip(outs.outs())
            .zip(&keys)
            .map(|(((wanted, rows), out), key)| {
                NDArray::row_sparse(out.shape(), wanted, rows)
                    .map_err(|e| e.at_key(&self.type_name, OPERATION, key.clone()))
            })
            .collect::<Result<Vec<NDArray>>>()?;
        for (out, result) in outs.outs_mut().iter_mut().zip(results) {
            **out = result;
        }
        Ok(())
    }

    fn set_gradient_compression(&self, params: &CompressionParams) -> Result<()> {
        const OPERATION: &str = "set_gradient_compression";
        let Some(set) = self.api.set_gradient_compression else {
            return Err(self.unsupported(OPERATION));
        };
        let json = serde_json::to_vec(params).map_err(|e| Error::Backend {
            store: self.type_name.clone(),
            source: Box::new(e),
        })?;
        // SAFETY: the handle is live; the JSON and the record live for the call.
        self.status(
            |handle, record| unsafe { set(handle, json.as_ptr(), json.len(), record) },
            |code, record| self.fail(OPERATION, code, record, &[], &[]),
        )
    }

    fn save_optimizer_states(&self, path: &std::path::Path, dump_optimizer: bool) -> Result<()> {
        const OPERATION: &str = "save_optimizer_states";
        let Some(save) = self.api.save_optimizer_states else {
            return Err(self.unsupported(OPERATION));
        };
        let bytes = path_to_abi(path)?;
        // SAFETY: the handle is live; the path's bytes and the record live for the call.
        self.status(
            |handle, record| unsafe {
                save(
                    handle,
                    bytes.as_ptr(),
                    bytes.len(),
                    i32::from(dump_optimizer),
                    record,
                )
            },
            |code, record| self.fail_at_path(OPERATION, code, record, path),
        )
    }

    fn load_optimizer_states(&self, path: &std::path::Path) -> Result<()> {
        const OPERATION: &str = "load_optimizer_states";
        let Some(load) = self.api.load_optimizer_states else {
            return Err(self.unsupported(OPERATION));
        };
        let bytes = path_to_abi(path)?;
        // SAFETY: the handle is live; the path's bytes and the record live for the call.
        self.status(
            |handle, record| unsafe { load(handle, bytes.as_ptr(), bytes.len(), record) },
            |code, record| self.fail_at_path(OPERATION, code, record, path),
        )
    }

    fn barrier(&self) -> Result<()> {
        let Some(barrier) = self.api.barrier else {
            return Err(self.unsupported("barrier"));
        };
        // SAFETY: the handle is live; the record lives for the call.
        self.status(
            |handle, record| unsafe { barrier(handle, record) },
            |code, record| self.fail("barrier", code, record, &[], &[]),
        )
    }

    fn send_command_to_servers(&self, head: i32, body: &str) -> Result<()> {
        const OPERATION: &str = "send_command_to_servers";
        let Some(send) = self.api.send_command_to_servers else {
            return Err(self.unsupported(OPERATION));
        };
        // SAFETY: the handle is live; the body and the record live for the call.
        self.status(
            |handle, record| unsafe { send(handle, head, body.as_ptr(), body.len(), record) },
            |code, record| self.fail(OPERATION, code, record, &[], &[]),
        )
    }
}

/// Registers the plugin `api` describes in the runtime registry under its name, so that
/// [`create`](crate::create) builds its stores; returns the origin of a registration it
/// overrides (a warning is logged then, as MXNet does).
pub fn register_descriptor(api: PluginApi) -> Option<String> {
    let api = Arc::new(api);
    let factory_api = Arc::clone(&api);
    crate::register_runtime(
        &api.name,
        &api.origin,
        api.capabilities.as_deref(),
        move |request| Ok(Box::new(factory_api.create(request)?) as Box<dyn KVStoreBase>),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::export::{create_store, ExportedPlugin};

    #[derive(Debug)]
    struct Named;

    impl KVStoreBase for Named {
        fn type_name(&self) -> &str {
            "named"
        }
        fn rank(&self) -> usize {
            0
        }
        fn num_workers(&self) -> usize {
            1
        }
        fn is_capable(&self, _: Capability) -> bool {
            false
        }
        fn broadcast_batch(
            &self,
            _: &KeyedValues<'_>,
            _: &mut KeyedOuts<'_>,
            _: i32,
        ) -> Result<()> {
            Ok(())
        }
        fn pushpull_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn send_command_to_servers(&self, _: i32, _: &str) -> Result<()> {
            Ok(())
        }
        fn set_gradient_compression(&self, _: &CompressionParams) -> Result<()> {
            Ok(())
        }
    }

    unsafe extern "C" fn create(
        name: *const u8,
        name_len: usize,
        options: *const KvOption,
        n_options: usize,
        err: *mut KvError,
    ) -> KvStoreHandle {
        // SAFETY: the host's arguments are forwarded unchanged.
        unsafe {
            create_store(
                |_| Ok(Box::new(Named) as Box<dyn KVStoreBase>),
                name,
                name_len,
                options,
                n_options,
                err,
            )
        }
    }

    /// A broken plugin: claims a name of `usize::MAX` bytes, writes nothing.
    unsafe extern "C" fn lying_type_name(_: KvStoreHandle, _: *mut u8, _: usize) -> usize {
        usize::MAX
    }

    #[test]
    fn an_absurd_type_name_length_is_not_trusted() {
        let exported = ExportedPlugin::new("named", None, create);
        // SAFETY: `descriptor()` points to a live, complete descriptor.
        let mut descriptor = unsafe { *exported.descriptor() };
        descriptor.type_name = Some(lying_type_name);
        // SAFETY: the copy's name and functions live as long as `exported` and follow the ABI
        // (but for the type name's length, which is what is tested).
        let api = Arc::new(unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap());
        let request = CreateRequest {
            name: "named".into(),
            ..CreateRequest::default()
        };
        let store = api.create(&request).unwrap();
        assert!(store.type_name().len() <= MAX_TYPE_NAME);
    }

    /// A broken plugin: fails, pointing the error record's message at its own memory.
    unsafe extern "C" fn repointing_create(
        _: *const u8,
        _: usize,
        _: *const KvOption,
        _: usize,
        err: *mut KvError,
    ) -> KvStoreHandle {
        static ELSEWHERE: &[u8] = b"read from the plugin's memory";
        // SAFETY: the host passes a live record.
        let err = unsafe { &mut *err };
        err.code = KV_ERR_BACKEND;
        err.message = ELSEWHERE.as_ptr().cast_mut();
        err.message_len = ELSEWHERE.len();
        std::ptr::null_mut()
    }

    #[test]
    fn an_error_message_is_read_from_the_hosts_buffer_only() {
        let exported = ExportedPlugin::new("named", None, repointing_create);
        // SAFETY: `descriptor()` points to a live, complete descriptor.
        let descriptor = unsafe { *exported.descriptor() };
        // SAFETY: as above; the create function breaks the ABI only in the way tested.
        let api = Arc::new(unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap());
        let e = api.create(&request()).unwrap_err().to_string();
        assert!(!e.contains("plugin's memory"), "{e}");
    }

    /// What the broken plugins below do: write 0xFF over the `n` outputs, then fail with a
    /// key-bearing code naming `(key_source, key_index)`.
    ///
    /// # Safety
    /// `outs` must hold `n` tensors of writable memory, `err` be a live record.
    unsafe fn scribble(
        outs: *const KvTensor,
        n: usize,
        err: *mut KvError,
        (key_source, key_index): (u32, usize),
    ) -> i32 {
        // SAFETY: forwarded from the caller.
        unsafe {
            for t in std::slice::from_raw_parts(outs, n) {
                std::ptr::write_bytes(t.data, 0xFF, t.byte_len);
            }
            (*err).code = KV_ERR_KEY_NOT_INITIALIZED;
            (*err).key_source = key_source;
            (*err).key_index = key_index;
        }
        KV_ERR_KEY_NOT_INITIALIZED
    }

    /// A broken plugin's pull: the outputs scribbled over, then a failure naming no key
    /// (`KV_ERROR_KEY_NONE`) though its code is about a key.
    unsafe extern "C" fn scribbling_pull(
        _: KvStoreHandle,
        _: *const KvKey,
        outs: *const KvTensor,
        n: usize,
        _: i32,
        err: *mut KvError,
    ) -> i32 {
        // SAFETY: the host passes `n` outputs of writable memory and a live record.
        unsafe { scribble(outs, n, err, (KV_ERROR_KEY_NONE, usize::MAX)) }
    }

    /// The same for `pushpull` and `broadcast`: the outputs scribbled over, then a failure
    /// naming output 1.
    unsafe extern "C" fn scribbling_pushpull(
        _: KvStoreHandle,
        _: *const KvKey,
        _: *const KvTensor,
        _: usize,
        _: *const KvKey,
        outs: *const KvTensor,
        n_outs: usize,
        _: i32,
        err: *mut KvError,
    ) -> i32 {
        // SAFETY: as `scribbling_pull`.
        unsafe { scribble(outs, n_outs, err, (KV_ERROR_KEY_OF_OUTS, 1)) }
    }

    #[test]
    fn a_plugin_failing_after_writing_outputs_leaves_them_unchanged() {
        let exported = ExportedPlugin::new("named", None, create);
        // SAFETY: `descriptor()` points to a live, complete descriptor.
        let mut descriptor = unsafe { *exported.descriptor() };
        descriptor.pull = Some(scribbling_pull);
        descriptor.pushpull = Some(scribbling_pushpull);
        descriptor.broadcast = Some(scribbling_pushpull);
        // SAFETY: the copy's name and functions live as long as `exported`; the swapped
        // functions break the ABI only in what is tested.
        let api = Arc::new(unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap());
        let store = api.create(&request()).unwrap();
        let keys = [Key::from(3), Key::from(4)];
        let values = [
            NDArray::ones(&[2], DType::F32),
            NDArray::ones(&[2], DType::F32),
        ];
        let before = [
            NDArray::full(&[2], 7.0, DType::F32),
            NDArray::full(&[2], 8.0, DType::F32),
        ];
        for operation in ["pull", "pushpull", "broadcast"] {
            let mut outs = before.clone();
            let e = {
                let mut batch =
                    KeyedOuts::new(operation, keys.to_vec(), outs.iter_mut().collect()).unwrap();
                let inputs =
                    KeyedValues::new(operation, keys.to_vec(), values.iter().collect()).unwrap();
                match operation {
                    "pull" => store.pull_batch(&mut batch, 0, true),
                    "pushpull" => store.pushpull_batch(&inputs, &mut batch, 0),
                    _ => store.broadcast_batch(&inputs, &mut batch, 0),
                }
                .unwrap_err()
            };
            assert_eq!(outs, before, "{operation}: {e}");
            let e = e.to_string();
            match operation {
                // No key named: the store, the operation and the plugin's report are.
                "pull" => assert!(
                    e.contains("named")
                        && e.contains("reported")
                        && e.contains("in pull without naming one of the call's 2 keys"),
                    "{e}"
                ),
                _ => assert!(e.contains("key 4"), "{operation}: {e}"),
            }
        }
    }

    /// GPU memory as far as the host can tell (never read: GPU arrays cannot cross the ABI).
    #[derive(Debug)]
    struct OnGpu(Vec<usize>);

    impl crate::DeviceMemory for OnGpu {
        fn context(&self) -> crate::Context {
            crate::Context::Gpu(0)
        }
        fn dtype(&self) -> DType {
            DType::F32
        }
        fn shape(&self) -> &[usize] {
            &self.0
        }
        fn to_host(&self) -> Result<crate::HostArray> {
            unreachable!("a plugin call never reads GPU memory")
        }
        fn write_from_host(&mut self, _: &crate::HostArray) -> Result<()> {
            unreachable!("a plugin call never writes GPU memory")
        }
        fn try_clone(&self) -> Result<Box<dyn crate::DeviceMemory>> {
            Ok(Box::new(OnGpu(self.0.clone())))
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }

    #[test]
    fn a_pull_ignoring_sparse_outputs_still_refuses_gpu_outputs() {
        let exported = ExportedPlugin::new("named", None, create);
        // SAFETY: `descriptor()` points to a live, complete descriptor.
        let descriptor = unsafe { *exported.descriptor() };
        // SAFETY: as above.
        let api = Arc::new(unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap());
        let store = api.create(&request()).unwrap();
        let mut out = NDArray::from_device(Box::new(OnGpu(vec![2])));
        let mut outs = KeyedOuts::new("pull", vec![Key::from(3)], vec![&mut out]).unwrap();
        let e = store.pull_batch(&mut outs, 0, true).unwrap_err();
        assert!(matches!(e.root(), Error::InvalidArgument(_)), "{e}");
    }

    fn request() -> CreateRequest {
        CreateRequest {
            name: "named".into(),
            ..CreateRequest::default()
        }
    }

    #[test]
    fn a_revision_1_0_struct_size_hides_the_appended_functions() {
        let exported = ExportedPlugin::new(
            "named",
            Some(&[
                Capability::InitPushPull,
                Capability::GradientCompression,
                Capability::RowSparse,
                Capability::OptimizerStates,
                Capability::Updater,
            ]),
            create,
        );
        // SAFETY: `descriptor()` points to a live, complete descriptor.
        let mut descriptor = unsafe { *exported.descriptor() };
        // SAFETY: as in the test above; the full descriptor is readable.
        let full = Arc::new(unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap());
        let store = full.create(&request()).unwrap();
        store.barrier().unwrap();
        store.send_command_to_servers(1, "x").unwrap();
        store
            .set_gradient_compression(&CompressionParams::new())
            .unwrap();
        assert_eq!(full.struct_size(), KV_PLUGIN_DESCRIPTOR_SIZE_V1_1);
        assert_eq!(
            full.capabilities(),
            Some(
                &[
                    Capability::InitPushPull,
                    Capability::GradientCompression,
                    Capability::RowSparse,
                    Capability::OptimizerStates,
                ][..]
            ),
            "the updater is never forwarded"
        );

        // The same memory, every function still there, but a 1.0 struct_size.
        descriptor.struct_size = KV_PLUGIN_DESCRIPTOR_SIZE_V1_0;
        // SAFETY: as above.
        let old = Arc::new(unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap());
        assert_eq!(old.struct_size(), KV_PLUGIN_DESCRIPTOR_SIZE_V1_0);
        assert_eq!(old.capabilities(), Some(&[Capability::InitPushPull][..]));
        for capability in [
            Capability::GradientCompression,
            Capability::RowSparse,
            Capability::OptimizerStates,
            Capability::Updater,
        ] {
            assert!(!old.forwards(capability), "{capability}");
        }
        let store = old.create(&request()).unwrap();
        // `Named` answers these (see above): through a 1.0 descriptor they are not called.
        for (operation, result) in [
            ("barrier", store.barrier()),
            (
                "send_command_to_servers",
                store.send_command_to_servers(1, "x"),
            ),
            (
                "set_gradient_compression",
                store.set_gradient_compression(&CompressionParams::new()),
            ),
        ] {
            assert!(
                matches!(result, Err(Error::Unsupported { operation: o, .. }) if o == operation),
                "{operation}: {result:?}"
            );
        }
    }

    #[test]
    fn a_plugin_without_init_push_and_pull_does_not_keep_values() {
        let exported = ExportedPlugin::new("named", Some(&[Capability::InitPushPull]), create);
        // SAFETY: `descriptor()` points to a live, complete descriptor.
        let mut descriptor = unsafe { *exported.descriptor() };
        // SAFETY: as above.
        let full = unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap();
        assert_eq!(full.capabilities(), Some(&[Capability::InitPushPull][..]));
        descriptor.push = None;
        // SAFETY: as above; a missing optional function is allowed.
        let api = Arc::new(unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap());
        assert!(!api.forwards(Capability::InitPushPull));
        assert_eq!(api.capabilities(), Some(&[][..]));
        let store = api.create(&request()).unwrap();
        assert!(!store.is_capable(Capability::InitPushPull));
    }

    #[test]
    fn capability_codes_are_the_abis_constants() {
        let codes: Vec<u32> = Capability::ALL
            .iter()
            .map(|&c| capability_code(c))
            .collect();
        assert_eq!(
            codes,
            [
                KV_CAP_OPTIMIZER,
                KV_CAP_INIT_PUSH_PULL,
                KV_CAP_UPDATER,
                KV_CAP_GRADIENT_COMPRESSION,
                KV_CAP_ROW_SPARSE,
                KV_CAP_OPTIMIZER_STATES,
                KV_CAP_DISTRIBUTED,
            ]
        );
        let mask = super::super::capability_mask(Capability::ALL);
        assert_eq!(capabilities_from_mask(mask), Capability::ALL);
    }

    #[test]
    fn a_descriptor_smaller_than_revision_1_0_is_refused() {
        let exported = ExportedPlugin::new("named", None, create);
        // SAFETY: `descriptor()` points to a live, complete descriptor.
        let mut descriptor = unsafe { *exported.descriptor() };
        descriptor.struct_size = KV_PLUGIN_DESCRIPTOR_SIZE_V1_0 - 8;
        // SAFETY: the descriptor is readable; it is refused before its functions are used.
        let err = unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "smaller than the {KV_PLUGIN_DESCRIPTOR_SIZE_V1_0} bytes"
            )),
            "{err}"
        );
    }

    #[test]
    fn a_struct_size_ending_inside_a_function_pointer_is_refused() {
        let exported = ExportedPlugin::new("named", None, create);
        // SAFETY: `descriptor()` points to a live, complete descriptor.
        let mut descriptor = unsafe { *exported.descriptor() };
        // Half of `barrier`: on little-endian its low bytes, a wild non-null pointer.
        descriptor.struct_size = KV_PLUGIN_DESCRIPTOR_SIZE_V1_0 + 4;
        // SAFETY: the whole descriptor is readable; it is refused before any function is used.
        let err = unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap_err();
        assert!(err.to_string().contains("does not end on a field"), "{err}");
        // A later revision's larger descriptor is read up to this host's fields only.
        descriptor.struct_size = KV_PLUGIN_DESCRIPTOR_SIZE_V1_1 + 2 * std::mem::size_of::<usize>();
        // SAFETY: only this host's fields (all present in `descriptor`) are read.
        let later = unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap();
        assert_eq!(later.struct_size(), descriptor.struct_size);
        assert!(later.forwards(Capability::OptimizerStates));
    }
}
