//! The C ABI of kvstore plugins, version 1 (revision 1.1): `#[repr(C)]` types and constants.
//!
//! Everything here has a twin in `kvstore-base/include/kvstore_plugin.h`, the header C and C++
//! plugin authors compile against; a test checks that sizes and field offsets agree.
//!
//! Rules of the ABI:
//! - A plugin exports one symbol, [`KV_PLUGIN_ENTRY`] (`kvstore_plugin_entry`), a function
//!   without arguments returning a pointer to a [`KvPluginDescriptor`] that stays valid while
//!   the library is loaded (the host never unloads it).
//! - No allocation crosses the boundary: every pointer the host passes (keys, tensors, the
//!   error record and its message buffer) belongs to the host and is valid for the duration of
//!   the call only; a plugin copies what it keeps. A store handle belongs to the plugin and is
//!   released by `destroy`.
//! - Functions returning `i32` return [`KV_OK`] or one of the `KV_ERR_*` codes, and on error
//!   fill the caller's [`KvError`] (code, key, structured details and a truncated UTF-8
//!   message, nul-terminated). A failed call must leave the store and every output unchanged.
//! - Tensors are dense, row-major, in host memory ([`KV_DEVICE_CPU`]); inputs are read-only.
//!   A row-sparse array crosses as a [`KvValue`]: its sorted row ids and its stored rows, each
//!   a dense tensor.
//! - A store may be called from several threads at once: plugin stores are thread-safe.
//! - Later versions only append function pointers to the descriptor: `struct_size` tells the
//!   host how many the plugin provides, and the host never reads a field beyond it (a missing
//!   function is an unsupported operation). An incompatible change bumps `abi_version`.
//!
//! Revisions of version 1 (all with `abi_version` 1; `struct_size` tells them apart):
//! - 1.0: the descriptor up to `set_optimizer` ([`KV_PLUGIN_DESCRIPTOR_SIZE_V1_0`] bytes):
//!   `init`, `push`, `pull`, `pushpull`, `broadcast` and `set_optimizer` of dense arrays.
//! - 1.1 (appended): `barrier`, `set_gradient_compression` (parameters as a JSON object),
//!   `save_optimizer_states`, `load_optimizer_states`, `send_command_to_servers`,
//!   `row_sparse_pull`, and `init_row_sparse` / `push_row_sparse` for batches holding
//!   row-sparse values ([`KvValue`]); the status code [`KV_ERR_IO`].
//!   ([`KV_PLUGIN_DESCRIPTOR_SIZE_V1_1`] bytes.)
//!
//! Custom updaters ([`Capability::Updater`](crate::Capability::Updater)) cannot cross the ABI
//! in any revision: an updater is a Rust closure, with no C representation.

use std::ffi::{c_char, c_void};

/// The ABI version this host speaks and `export_plugin!` produces.
pub const KV_PLUGIN_ABI_VERSION: u32 = 1;

/// The symbol every plugin exports: `const KvPluginDescriptor *kvstore_plugin_entry(void)`.
pub const KV_PLUGIN_ENTRY: &str = "kvstore_plugin_entry";

/// The type of the entry symbol.
pub type KvPluginEntry = unsafe extern "C" fn() -> *const KvPluginDescriptor;

/// Success.
pub const KV_OK: i32 = 0;
/// The store does not offer the operation ([`Error::Unsupported`](crate::Error::Unsupported)).
pub const KV_ERR_UNSUPPORTED: i32 = 1;
/// An invalid argument; the message says why ([`Error::InvalidArgument`](crate::Error::InvalidArgument)).
pub const KV_ERR_INVALID_ARGUMENT: i32 = 2;
/// Two shapes differ: `shape_expected`/`shape_found` hold them, the message names the array
/// ([`Error::ShapeMismatch`](crate::Error::ShapeMismatch)).
pub const KV_ERR_SHAPE_MISMATCH: i32 = 3;
/// Two dtypes differ: `dtype_expected`/`dtype_found` hold them, the message names the array
/// ([`Error::DTypeMismatch`](crate::Error::DTypeMismatch)).
pub const KV_ERR_DTYPE_MISMATCH: i32 = 4;
/// A key was used before `init` ([`Error::KeyNotInitialized`](crate::Error::KeyNotInitialized)).
pub const KV_ERR_KEY_NOT_INITIALIZED: i32 = 5;
/// A key was initialised twice ([`Error::DuplicateInit`](crate::Error::DuplicateInit)).
pub const KV_ERR_DUPLICATE_INIT: i32 = 6;
/// Counts that must agree do not: `count_expected`/`count_found` hold them, the message says
/// what was counted ([`Error::CountMismatch`](crate::Error::CountMismatch)).
pub const KV_ERR_COUNT_MISMATCH: i32 = 7;
/// A device failed ([`Error::Device`](crate::Error::Device)).
pub const KV_ERR_DEVICE: i32 = 8;
/// Any other failure of the store ([`Error::Backend`](crate::Error::Backend)).
pub const KV_ERR_BACKEND: i32 = 9;
/// The store panicked (or threw); the message is the panic's ([`Error::Panic`](crate::Error::Panic)).
pub const KV_ERR_PANIC: i32 = 10;
/// An I/O error on a file ([`Error::Io`](crate::Error::Io)): the message is the file's path,
/// a newline, then the error's text (a message without a newline is about the call's own file,
/// for `save_optimizer_states` / `load_optimizer_states`); `count_found` is the operating
/// system's error number plus one (0: none), so that the host keeps its kind. Appended in
/// 1.1: a host of revision 1.0 reports it as a backend error.
pub const KV_ERR_IO: i32 = 11;

/// `float32`; dtype codes are MXNet's (`mshadow` type flags).
pub const KV_DTYPE_F32: u32 = 0;
/// `float64`.
pub const KV_DTYPE_F64: u32 = 1;
/// `float16`.
pub const KV_DTYPE_F16: u32 = 2;
/// `uint8`.
pub const KV_DTYPE_U8: u32 = 3;
/// `int32`.
pub const KV_DTYPE_I32: u32 = 4;
/// `int64`.
pub const KV_DTYPE_I64: u32 = 6;
/// `bfloat16`.
pub const KV_DTYPE_BF16: u32 = 12;

/// Host memory (MXNet's `kCPU`); the only device of ABI version 1.
pub const KV_DEVICE_CPU: u32 = 1;
/// GPU memory (MXNet's `kGPU`); reserved, never passed by this host.
pub const KV_DEVICE_GPU: u32 = 2;

/// An integer key.
pub const KV_KEY_INT: u32 = 0;
/// A string key (UTF-8, not nul-terminated).
pub const KV_KEY_STR: u32 = 1;

/// The error is about no particular key.
pub const KV_ERROR_KEY_NONE: u32 = 0;
/// The error is about `keys[key_index]` of the call's values (for `pull`: of its outputs).
pub const KV_ERROR_KEY_OF_VALUES: u32 = 1;
/// The error is about `out_keys[key_index]` of the call's outputs (`pushpull`, `broadcast`).
pub const KV_ERROR_KEY_OF_OUTS: u32 = 2;

/// Capability bit of [`Capability::Optimizer`](crate::Capability::Optimizer); capability `i`
/// of `is_capable` is bit `1 << i`.
pub const KV_CAP_OPTIMIZER: u32 = 0;
/// [`Capability::InitPushPull`](crate::Capability::InitPushPull).
pub const KV_CAP_INIT_PUSH_PULL: u32 = 1;
/// [`Capability::Updater`](crate::Capability::Updater): never forwarded (a closure cannot
/// cross a C ABI).
pub const KV_CAP_UPDATER: u32 = 2;
/// [`Capability::GradientCompression`](crate::Capability::GradientCompression): forwarded
/// when the descriptor provides `set_gradient_compression` (1.1).
pub const KV_CAP_GRADIENT_COMPRESSION: u32 = 3;
/// [`Capability::RowSparse`](crate::Capability::RowSparse): forwarded when the descriptor
/// provides `row_sparse_pull` (1.1).
pub const KV_CAP_ROW_SPARSE: u32 = 4;
/// [`Capability::OptimizerStates`](crate::Capability::OptimizerStates): forwarded when the
/// descriptor provides `save_optimizer_states` and `load_optimizer_states` (1.1).
pub const KV_CAP_OPTIMIZER_STATES: u32 = 5;
/// [`Capability::Distributed`](crate::Capability::Distributed).
pub const KV_CAP_DISTRIBUTED: u32 = 6;
/// `capabilities` value of a descriptor that does not declare them: the host asks a store.
pub const KV_CAPABILITIES_UNDECLARED: u64 = u64::MAX;

/// Most dimensions a shape carried by a [`KvError`] may have.
pub const KV_ERROR_MAX_NDIM: usize = 32;

/// [`KvValue::storage`]: a dense value, all in `data`.
pub const KV_STORAGE_DENSE: u32 = 0;
/// [`KvValue::storage`]: a row-sparse value: `row_ids` and the rows in `data`.
pub const KV_STORAGE_ROW_SPARSE: u32 = 1;

/// A key: an integer or a UTF-8 string.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvKey {
    /// [`KV_KEY_INT`] or [`KV_KEY_STR`].
    pub kind: u32,
    /// The integer of an int key.
    pub int_key: i64,
    /// The bytes of a str key (not nul-terminated); null for an int key.
    pub str_ptr: *const u8,
    /// Their number.
    pub str_len: usize,
}

/// A dense, row-major tensor in host memory.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvTensor {
    /// The elements; read-only for inputs; for outputs, every element is written by a
    /// successful call, and what they hold on entry means nothing (never read).
    pub data: *mut u8,
    /// `product(shape) * size of the dtype`.
    pub byte_len: usize,
    /// One of the `KV_DTYPE_*` codes.
    pub dtype: u32,
    /// Number of dimensions.
    pub ndim: u32,
    /// `ndim` dimensions (may be null when `ndim` is 0).
    pub shape: *const i64,
    /// [`KV_DEVICE_CPU`].
    pub device_type: u32,
    /// The device ordinal (0 on the CPU).
    pub device_id: u32,
}

/// A value that may be row-sparse (1.1): the values of `init_row_sparse` and
/// `push_row_sparse`, and the outputs of `row_sparse_pull`.
///
/// A row-sparse array of shape `[num_rows, d1, ...]` is described by its stored row ids
/// (`row_ids`: int64, one dimension, strictly increasing, each in `0..num_rows`) and its
/// stored rows (`data`: shape `[row_ids length, d1, ...]`); the other rows are zeros.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvValue {
    /// [`KV_STORAGE_DENSE`] or [`KV_STORAGE_ROW_SPARSE`].
    pub storage: u32,
    /// Row-sparse: the first dimension of the full shape. Dense: 0, unused.
    pub num_rows: i64,
    /// Row-sparse: the ids of the stored rows (read-only, even for outputs). Dense: an empty
    /// tensor (null data, no dimensions), unused.
    pub row_ids: KvTensor,
    /// Dense: the value. Row-sparse: the stored rows, one per id (written by a successful
    /// `row_sparse_pull`).
    pub data: KvTensor,
}

/// A `key = value` option passed to `create` (both UTF-8, not nul-terminated).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvOption {
    /// The option's name.
    pub key: *const u8,
    /// Its length in bytes.
    pub key_len: usize,
    /// The option's value.
    pub value: *const u8,
    /// Its length in bytes.
    pub value_len: usize,
}

/// The caller-owned error record a failing call fills.
///
/// The host zeroes it and points `message` at a buffer of `message_cap` bytes before each
/// call; the plugin writes at most `message_cap - 1` bytes of UTF-8 and a nul, and sets
/// `message_len` to the bytes written.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvError {
    /// The `KV_ERR_*` code (also the call's return value).
    pub code: i32,
    /// Which key the error is about: `KV_ERROR_KEY_*`.
    pub key_source: u32,
    /// Index of that key in the call's keys (see `key_source`).
    pub key_index: usize,
    /// [`KV_ERR_COUNT_MISMATCH`]: how many were needed.
    pub count_expected: usize,
    /// [`KV_ERR_COUNT_MISMATCH`]: how many were given.
    pub count_found: usize,
    /// [`KV_ERR_DTYPE_MISMATCH`]: the dtype code the array should have.
    pub dtype_expected: u32,
    /// [`KV_ERR_DTYPE_MISMATCH`]: the dtype code it has.
    pub dtype_found: u32,
    /// [`KV_ERR_SHAPE_MISMATCH`]: dimensions of `shape_expected` (at most [`KV_ERROR_MAX_NDIM`]).
    pub ndim_expected: u32,
    /// [`KV_ERR_SHAPE_MISMATCH`]: dimensions of `shape_found`.
    pub ndim_found: u32,
    /// The shape the array should have.
    pub shape_expected: [i64; KV_ERROR_MAX_NDIM],
    /// The shape it has.
    pub shape_found: [i64; KV_ERROR_MAX_NDIM],
    /// The caller's message buffer.
    pub message: *mut u8,
    /// Its size in bytes.
    pub message_cap: usize,
    /// Bytes of message written (without the nul).
    pub message_len: usize,
}

impl KvError {
    /// A cleared record writing its message into `buffer`.
    pub fn with_buffer(buffer: &mut [u8]) -> KvError {
        KvError {
            code: KV_OK,
            key_source: KV_ERROR_KEY_NONE,
            key_index: 0,
            count_expected: 0,
            count_found: 0,
            dtype_expected: 0,
            dtype_found: 0,
            ndim_expected: 0,
            ndim_found: 0,
            shape_expected: [0; KV_ERROR_MAX_NDIM],
            shape_found: [0; KV_ERROR_MAX_NDIM],
            message: buffer.as_mut_ptr(),
            message_cap: buffer.len(),
            message_len: 0,
        }
    }
}

/// An opaque store handle, created by `create` and released by `destroy`.
pub type KvStoreHandle = *mut c_void;

/// `create(requested_name, name_len, options, n_options, err)`: a new store, or null with
/// `err` filled.
pub type KvCreateFn = unsafe extern "C" fn(
    name: *const u8,
    name_len: usize,
    options: *const KvOption,
    n_options: usize,
    err: *mut KvError,
) -> KvStoreHandle;
/// `destroy(store)`: releases a store.
pub type KvDestroyFn = unsafe extern "C" fn(store: KvStoreHandle);
/// `type_name(store, buf, cap)`: copies the type name (truncated, nul-terminated) into `buf`
/// and returns its full length in bytes.
pub type KvTypeNameFn =
    unsafe extern "C" fn(store: KvStoreHandle, buf: *mut u8, cap: usize) -> usize;
/// `rank(store)` / `num_workers(store)`.
pub type KvCountFn = unsafe extern "C" fn(store: KvStoreHandle) -> u64;
/// `is_capable(store, capability)`: nonzero when capable; `capability` is a `KV_CAP_*` index.
pub type KvIsCapableFn = unsafe extern "C" fn(store: KvStoreHandle, capability: u32) -> i32;
/// `init(store, keys, values, n, err)`.
pub type KvInitFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    keys: *const KvKey,
    values: *const KvTensor,
    n: usize,
    err: *mut KvError,
) -> i32;
/// `push(store, keys, values, n, priority, err)`; also the shape of `pull` (with outputs).
pub type KvPushFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    keys: *const KvKey,
    tensors: *const KvTensor,
    n: usize,
    priority: i32,
    err: *mut KvError,
) -> i32;
/// `pushpull(store, keys, values, n, out_keys, outs, n_outs, priority, err)`; also `broadcast`.
pub type KvPushPullFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    keys: *const KvKey,
    values: *const KvTensor,
    n: usize,
    out_keys: *const KvKey,
    outs: *const KvTensor,
    n_outs: usize,
    priority: i32,
    err: *mut KvError,
) -> i32;
/// `set_optimizer(store, spec_json, len, err)`: the [`OptimizerSpec`](crate::OptimizerSpec)
/// as JSON (`{"name": "sgd", "params": {"momentum": 0.9}}`).
pub type KvSetOptimizerFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    spec_json: *const u8,
    len: usize,
    err: *mut KvError,
) -> i32;

/// `barrier(store, err)` (1.1): waits until every worker reaches the barrier.
pub type KvBarrierFn = unsafe extern "C" fn(store: KvStoreHandle, err: *mut KvError) -> i32;
/// `set_gradient_compression(store, params_json, len, err)` (1.1): the
/// [`CompressionParams`](crate::CompressionParams) as a JSON object whose values are strings
/// (`{"type": "2bit", "threshold": "0.5"}`; the host always sends strings, plugins built with
/// `export_plugin!` accept numbers too).
pub type KvSetGradientCompressionFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    params_json: *const u8,
    len: usize,
    err: *mut KvError,
) -> i32;
/// `save_optimizer_states(store, path, path_len, dump_optimizer, err)` (1.1): saves the
/// optimizer states (and the optimizer when `dump_optimizer` is nonzero) to the file `path`
/// (not nul-terminated: UTF-8, or on Unix the path's raw bytes).
pub type KvSaveOptimizerStatesFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    path: *const u8,
    path_len: usize,
    dump_optimizer: i32,
    err: *mut KvError,
) -> i32;
/// `load_optimizer_states(store, path, path_len, err)` (1.1): loads states saved by
/// `save_optimizer_states` from the file `path` (encoded as there).
pub type KvLoadOptimizerStatesFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    path: *const u8,
    path_len: usize,
    err: *mut KvError,
) -> i32;
/// `send_command_to_servers(store, head, body, body_len, err)` (1.1): sends a command (UTF-8
/// body, not nul-terminated) to every server and waits for their replies.
pub type KvSendCommandFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    head: i32,
    body: *const u8,
    body_len: usize,
    err: *mut KvError,
) -> i32;
/// `row_sparse_pull(store, keys, outs, n, priority, err)` (1.1): for each `i`, the rows
/// `outs[i].row_ids` of `keys[i]`'s value into `outs[i].data`.
///
/// Every output is [`KV_STORAGE_ROW_SPARSE`]: `num_rows` is the first dimension of the
/// caller's output (the value's shape is `[num_rows, d1, ...]`), `row_ids` the wanted rows
/// (the host has sorted them and removed duplicates, and refused ids outside `0..num_rows`), `data` a
/// writable tensor `[row_ids length, d1, ...]` of the output's dtype, which receives row
/// `row_ids[j]` of the value in its row `j` (zeros for rows the value does not store). Error
/// keys refer to `keys`.
pub type KvRowSparsePullFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    keys: *const KvKey,
    outs: *const KvValue,
    n: usize,
    priority: i32,
    err: *mut KvError,
) -> i32;
/// `init_row_sparse(store, keys, values, n, err)` (1.1): `init` of a batch holding at least one
/// row-sparse value (each value dense or row-sparse); batches of dense values go to `init`.
pub type KvInitRowSparseFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    keys: *const KvKey,
    values: *const KvValue,
    n: usize,
    err: *mut KvError,
) -> i32;
/// `push_row_sparse(store, keys, values, n, priority, err)` (1.1): `push` of a batch holding at
/// least one row-sparse value; batches of dense values go to `push`.
pub type KvPushRowSparseFn = unsafe extern "C" fn(
    store: KvStoreHandle,
    keys: *const KvKey,
    values: *const KvValue,
    n: usize,
    priority: i32,
    err: *mut KvError,
) -> i32;

/// What a plugin's entry returns: its name, capabilities and functions.
///
/// Function pointers are nullable: `create`, `destroy`, `type_name`, `rank`, `num_workers`,
/// `is_capable`, `pushpull` and `broadcast` are required (the loader refuses a descriptor
/// without them); any other null function means the operation is unsupported. The fields
/// from `barrier` on were appended in revision 1.1: a descriptor whose `struct_size` is
/// [`KV_PLUGIN_DESCRIPTOR_SIZE_V1_0`] (built against 1.0) ends at `set_optimizer`, and the
/// host treats every later function as null.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvPluginDescriptor {
    /// [`KV_PLUGIN_ABI_VERSION`] of the ABI the plugin was built for.
    pub abi_version: u32,
    /// `sizeof(KvPluginDescriptor)` as the plugin knows it: later versions append fields.
    pub struct_size: usize,
    /// The store name `create` answers to (nul-terminated UTF-8, compared lower-cased).
    pub name: *const c_char,
    /// Capability bits (`1 << KV_CAP_*`), or [`KV_CAPABILITIES_UNDECLARED`].
    pub capabilities: u64,
    /// Creates a store.
    pub create: Option<KvCreateFn>,
    /// Releases a store.
    pub destroy: Option<KvDestroyFn>,
    /// The store's type name.
    pub type_name: Option<KvTypeNameFn>,
    /// This worker's rank.
    pub rank: Option<KvCountFn>,
    /// Number of workers.
    pub num_workers: Option<KvCountFn>,
    /// Whether the store has a capability.
    pub is_capable: Option<KvIsCapableFn>,
    /// Initialises keys.
    pub init: Option<KvInitFn>,
    /// Pushes values.
    pub push: Option<KvPushFn>,
    /// Pulls into outputs (`tensors` are the outputs, `keys` their keys).
    pub pull: Option<KvPushFn>,
    /// Pushes values and pulls the results.
    pub pushpull: Option<KvPushPullFn>,
    /// Broadcasts each key's value into its outputs.
    pub broadcast: Option<KvPushPullFn>,
    /// Installs an optimizer from its JSON description.
    pub set_optimizer: Option<KvSetOptimizerFn>,
    /// Waits for every worker (1.1).
    pub barrier: Option<KvBarrierFn>,
    /// Turns on gradient compression (1.1).
    pub set_gradient_compression: Option<KvSetGradientCompressionFn>,
    /// Saves the optimizer states to a file (1.1).
    pub save_optimizer_states: Option<KvSaveOptimizerStatesFn>,
    /// Loads the optimizer states from a file (1.1).
    pub load_optimizer_states: Option<KvLoadOptimizerStatesFn>,
    /// Sends a command to the servers (1.1).
    pub send_command_to_servers: Option<KvSendCommandFn>,
    /// Pulls selected rows of row-sparse values (1.1).
    pub row_sparse_pull: Option<KvRowSparsePullFn>,
    /// Initialises keys from values of which some are row-sparse (1.1).
    pub init_row_sparse: Option<KvInitRowSparseFn>,
    /// Pushes values of which some are row-sparse (1.1).
    pub push_row_sparse: Option<KvPushRowSparseFn>,
}

/// `struct_size` of a descriptor of revision 1.0 (ending at `set_optimizer`): the smallest
/// descriptor the host accepts.
pub const KV_PLUGIN_DESCRIPTOR_SIZE_V1_0: usize =
    std::mem::offset_of!(KvPluginDescriptor, set_optimizer)
        + std::mem::size_of::<Option<KvSetOptimizerFn>>();

/// `struct_size` of a descriptor of revision 1.1 (ending at `push_row_sparse`), the revision
/// this host speaks and `export_plugin!` produces.
pub const KV_PLUGIN_DESCRIPTOR_SIZE_V1_1: usize = std::mem::size_of::<KvPluginDescriptor>();
