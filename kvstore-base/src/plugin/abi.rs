//! The C ABI of kvstore plugins, version 1: `#[repr(C)]` types and constants.
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
//! - A store may be called from several threads at once: plugin stores are thread-safe.
//! - Later versions only append function pointers to the descriptor: `struct_size` tells the
//!   host how many the plugin provides. An incompatible change bumps `abi_version`.

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
/// [`Capability::Updater`](crate::Capability::Updater) (never forwarded by ABI version 1).
pub const KV_CAP_UPDATER: u32 = 2;
/// [`Capability::GradientCompression`](crate::Capability::GradientCompression) (never forwarded by ABI version 1).
pub const KV_CAP_GRADIENT_COMPRESSION: u32 = 3;
/// [`Capability::RowSparse`](crate::Capability::RowSparse) (never forwarded by ABI version 1).
pub const KV_CAP_ROW_SPARSE: u32 = 4;
/// [`Capability::OptimizerStates`](crate::Capability::OptimizerStates) (never forwarded by ABI version 1).
pub const KV_CAP_OPTIMIZER_STATES: u32 = 5;
/// [`Capability::Distributed`](crate::Capability::Distributed).
pub const KV_CAP_DISTRIBUTED: u32 = 6;
/// `capabilities` value of a descriptor that does not declare them: the host asks a store.
pub const KV_CAPABILITIES_UNDECLARED: u64 = u64::MAX;

/// Most dimensions a shape carried by a [`KvError`] may have.
pub const KV_ERROR_MAX_NDIM: usize = 32;

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
    /// The elements; read-only for inputs, written by a successful call for outputs.
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

/// What a plugin's entry returns: its name, capabilities and functions.
///
/// Function pointers are nullable: `create`, `destroy`, `type_name`, `rank`, `num_workers`,
/// `is_capable`, `pushpull` and `broadcast` are required (the loader refuses a descriptor
/// without them); a null `init`, `push`, `pull` or `set_optimizer` means the operation is
/// unsupported.
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
}
