//! Stores in shared libraries: a stable C ABI, [`export_plugin!`](crate::export_plugin) for
//! Rust plugins, and (feature `dynamic-plugins`) `load_plugin` with discovery from
//! `KVSTORE_PLUGIN_PATH`.
//!
//! Static registrations do not cross a `dlopen` boundary (a plugin has its own copy of every
//! crate, registry included) and Rust trait objects have no stable layout, so a plugin
//! exports one C function returning a versioned [`KvPluginDescriptor`] of C function
//! pointers ([`abi`]). The host wraps a loaded descriptor in a [`PluginStore`], which
//! implements [`KVStoreBase`](crate::KVStoreBase) by passing each batch as arrays of
//! [`KvKey`] and [`KvTensor`], and registers it in the runtime registry, so
//! `create("name")` finds it like any other store.
//!
//! Version 1 of the ABI carries `init`, `push`, `pull`, `pushpull`, `broadcast` and
//! `set_optimizer` (by [`OptimizerSpec`](crate::OptimizerSpec), as JSON) of dense CPU arrays
//! (revision 1.0). Revision 1.1 appends, compatibly (same `abi_version`, a larger
//! `struct_size`), `barrier`, `set_gradient_compression` (the
//! [`CompressionParams`](crate::CompressionParams) as a JSON object), `save_optimizer_states`
//! and `load_optimizer_states` (a file path), `send_command_to_servers`, `row_sparse_pull`
//! (per key, the sorted unique row ids as an int64 tensor and a dense output for those rows,
//! which the host turns into the row-sparse output), and `init_row_sparse` /
//! `push_row_sparse`, which carry batches holding row-sparse values ([`KvValue`]).
//!
//! What a plugin store offers is what its descriptor provides: a function the plugin leaves
//! null, or does not have because it was built against revision 1.0 (a smaller
//! `struct_size`; the host never reads beyond it), is [`Error::Unsupported`]. A capability is
//! reported only when the plugin provides its functions *and* declares it (or, undeclared,
//! its store answers `is_capable` with yes; a declared one is asked of the store too):
//! [`Capability::GradientCompression`] needs `set_gradient_compression`,
//! [`Capability::OptimizerStates`] `set_optimizer` and both state functions,
//! [`Capability::RowSparse`] `row_sparse_pull`, `init_row_sparse` and `push_row_sparse`,
//! [`Capability::Optimizer`] `set_optimizer`. A descriptor whose `struct_size` ends inside a
//! field is refused.
//! [`Capability::Updater`] is never reported and `set_updater` is always
//! [`Unsupported`](crate::Error::Unsupported): an updater is a Rust closure, which has no C
//! representation. GPU arrays passed to a plugin store are an [`Error::InvalidArgument`], as
//! are row-sparse values in `pushpull` and `broadcast`, and in `init` and `push` of a plugin
//! without `init_row_sparse` / `push_row_sparse`.
//!
//! Writing a plugin in Rust: a `cdylib` crate depending on `kvstore-base`, with a
//! `KVStoreBase + Default` type and one line:
//!
//! ```ignore
//! kvstore_base::export_plugin!(MyStore);
//! ```
//!
//! In C: include `kvstore_plugin.h` and define `kvstore_plugin_entry` (see the header and
//! `examples/plugin-c/summing_store.c`). Either way, a panic (or any failure) inside the
//! plugin comes back as an [`Error`], never as an unwind across the boundary.

pub mod abi;
pub mod export;
mod host;
#[cfg(feature = "dynamic-plugins")]
mod loader;

pub use abi::{
    KvError, KvKey, KvOption, KvPluginDescriptor, KvTensor, KvValue, KV_PLUGIN_ABI_VERSION,
    KV_PLUGIN_ENTRY,
};
pub use host::{register_descriptor, PluginApi, PluginStore};
#[cfg(feature = "dynamic-plugins")]
pub(crate) use loader::discover_once;
#[cfg(feature = "dynamic-plugins")]
pub use loader::{discover, load_plugin, LoadedPlugin, PLUGIN_PATH_VAR};

pub(crate) use crate::array::{host_bytes, host_bytes_mut};
use crate::{Capability, DType, Error, Key, NDArray, Result};
use abi::*;

/// The ABI code of a dtype (MXNet's type flag).
pub fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => KV_DTYPE_F32,
        DType::F64 => KV_DTYPE_F64,
        DType::F16 => KV_DTYPE_F16,
        DType::U8 => KV_DTYPE_U8,
        DType::I32 => KV_DTYPE_I32,
        DType::I64 => KV_DTYPE_I64,
        DType::BF16 => KV_DTYPE_BF16,
    }
}

/// The dtype of an ABI code, `None` for an unknown code.
pub fn dtype_from_code(code: u32) -> Option<DType> {
    DType::ALL.into_iter().find(|&d| dtype_code(d) == code)
}

/// The ABI index of a capability (its `KV_CAP_*` constant: fixed by the ABI, whatever order
/// [`Capability::ALL`] lists them in).
pub fn capability_code(capability: Capability) -> u32 {
    match capability {
        Capability::Optimizer => abi::KV_CAP_OPTIMIZER,
        Capability::InitPushPull => abi::KV_CAP_INIT_PUSH_PULL,
        Capability::Updater => abi::KV_CAP_UPDATER,
        Capability::GradientCompression => abi::KV_CAP_GRADIENT_COMPRESSION,
        Capability::RowSparse => abi::KV_CAP_ROW_SPARSE,
        Capability::OptimizerStates => abi::KV_CAP_OPTIMIZER_STATES,
        Capability::Distributed => abi::KV_CAP_DISTRIBUTED,
    }
}

/// The capabilities whose bits are set in `mask`.
pub fn capabilities_from_mask(mask: u64) -> Vec<Capability> {
    Capability::ALL
        .iter()
        .copied()
        .filter(|&c| mask & (1u64 << capability_code(c)) != 0)
        .collect()
}

/// The bit mask of `capabilities`.
pub fn capability_mask(capabilities: &[Capability]) -> u64 {
    capabilities
        .iter()
        .fold(0, |mask, &c| mask | (1u64 << capability_code(c)))
}

/// Checks that `array` can cross the ABI as a dense tensor: dense and in host memory.
fn check_transferable(array: &NDArray, what: &str) -> Result<()> {
    check_on_host(array, what)?;
    if array.dense().is_none() {
        return Err(Error::InvalidArgument(format!(
            "{what} is row_sparse: plugin stores take dense arrays only here (row-sparse values \
             cross only in init and push, and only to plugins that provide init_row_sparse and \
             push_row_sparse)"
        )));
    }
    Ok(())
}

/// Checks that `array` is in host memory, the only memory the ABI carries.
fn check_on_host(array: &NDArray, what: &str) -> Result<()> {
    if array.context() != crate::Context::Cpu {
        return Err(Error::InvalidArgument(format!(
            "{what} is on {}: plugin stores (C ABI version 1) take host (cpu) arrays only",
            array.context()
        )));
    }
    Ok(())
}

/// The row ids of a row-sparse [`KvValue`]: an int64 tensor of one dimension, strictly
/// increasing, each in `0..num_rows`.
///
/// # Safety
/// As [`tensor_to_ndarray`] for `row_ids`.
unsafe fn row_ids_from_abi(row_ids: &KvTensor, num_rows: i64) -> Result<Vec<i64>> {
    if num_rows < 0 {
        return Err(Error::InvalidArgument(format!(
            "a row-sparse value has a negative number of rows ({num_rows})"
        )));
    }
    // SAFETY: forwarded from the caller.
    let ids = unsafe { tensor_to_ndarray(row_ids) }?;
    if ids.dtype() != DType::I64 || ids.shape().len() != 1 {
        return Err(Error::InvalidArgument(format!(
            "row ids must be a one-dimensional int64 tensor, not a {} tensor of shape {:?}",
            ids.dtype(),
            ids.shape()
        )));
    }
    let ids = ids.to_vec::<i64>()?;
    let mut previous = None;
    for &id in &ids {
        if id < 0 || id >= num_rows || previous.is_some_and(|p| p >= id) {
            return Err(Error::InvalidArgument(format!(
                "row ids must be strictly increasing in 0..{num_rows}; found {id}{}",
                previous.map_or(String::new(), |p| format!(" after {p}"))
            )));
        }
        previous = Some(id);
    }
    Ok(ids)
}

/// A copy of an ABI value (dense or row-sparse) as an [`NDArray`].
///
/// # Safety
/// Both tensors of `value` must be valid as [`tensor_to_ndarray`] requires (the row ids of a
/// dense value are not read).
unsafe fn value_to_ndarray(value: &KvValue) -> Result<NDArray> {
    match value.storage {
        // SAFETY: forwarded from the caller.
        KV_STORAGE_DENSE => unsafe { tensor_to_ndarray(&value.data) },
        KV_STORAGE_ROW_SPARSE => {
            // SAFETY: forwarded from the caller.
            let ids = unsafe { row_ids_from_abi(&value.row_ids, value.num_rows) }?;
            // SAFETY: forwarded from the caller.
            let rows = unsafe { tensor_to_ndarray(&value.data) }?;
            if rows.shape().first() != Some(&ids.len()) {
                return Err(Error::InvalidArgument(format!(
                    "a row-sparse value with {} row ids has rows of shape {:?}",
                    ids.len(),
                    rows.shape()
                )));
            }
            let mut shape = rows.shape().to_vec();
            shape[0] = usize::try_from(value.num_rows)
                .map_err(|_| Error::InvalidArgument("too many rows".into()))?;
            NDArray::row_sparse(&shape, ids, &rows)
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown storage {other} (expected {KV_STORAGE_DENSE} for dense or \
             {KV_STORAGE_ROW_SPARSE} for row-sparse)"
        ))),
    }
}

/// An empty tensor: the unused row ids of a dense [`KvValue`].
fn empty_tensor() -> KvTensor {
    KvTensor {
        data: std::ptr::null_mut(),
        byte_len: 0,
        dtype: KV_DTYPE_I64,
        ndim: 0,
        shape: std::ptr::null(),
        device_type: KV_DEVICE_CPU,
        device_id: 0,
    }
}

/// The bytes a path crosses the ABI as: on Unix the raw bytes of the OS path, elsewhere UTF-8.
fn path_to_abi(path: &std::path::Path) -> Result<&[u8]> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(path.as_os_str().as_bytes())
    }
    #[cfg(not(unix))]
    {
        path.to_str().map(str::as_bytes).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the path {} is not UTF-8, which plugin stores need",
                path.display()
            ))
        })
    }
}

/// The path that `len` bytes at `ptr` describe (see [`path_to_abi`]).
///
/// # Safety
/// `ptr` must point to `len` readable bytes (or `len` be 0).
unsafe fn path_from_abi(ptr: *const u8, len: usize) -> Result<std::path::PathBuf> {
    // SAFETY: forwarded from the caller.
    let bytes = unsafe { bytes_from_abi(ptr, len, "path") }?;
    if bytes.is_empty() {
        return Err(Error::InvalidArgument("the path is empty".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        std::str::from_utf8(bytes)
            .map(std::path::PathBuf::from)
            .map_err(|e| Error::InvalidArgument(format!("the path is not UTF-8: {e}")))
    }
}

/// The `len` bytes at `ptr` (empty when `len` is 0); `what` names them in the error for a null
/// pointer.
///
/// # Safety
/// `ptr` must be null or point to `len` readable bytes that outlive the returned slice.
unsafe fn bytes_from_abi<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Error::InvalidArgument(format!(
            "the {what} of {len} bytes has a null pointer"
        )));
    }
    // SAFETY: the caller guarantees `len` readable bytes at `ptr`.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// The key an ABI key describes.
///
/// # Safety
/// A str key's `str_ptr` must point to `str_len` readable bytes.
unsafe fn key_from_abi(key: &KvKey) -> Result<Key> {
    match key.kind {
        KV_KEY_INT => Ok(Key::Int(key.int_key)),
        KV_KEY_STR => {
            let bytes = if key.str_len == 0 {
                &[][..]
            } else if key.str_ptr.is_null() {
                return Err(Error::InvalidArgument(format!(
                    "a str key of {} bytes has a null pointer",
                    key.str_len
                )));
            } else {
                // SAFETY: the caller guarantees `str_len` readable bytes at `str_ptr`.
                unsafe { std::slice::from_raw_parts(key.str_ptr, key.str_len) }
            };
            let text = std::str::from_utf8(bytes).map_err(|e| {
                Error::InvalidArgument(format!("a str key is not valid UTF-8: {e}"))
            })?;
            Ok(Key::from(text))
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown key kind {other} (expected {KV_KEY_INT} for int or {KV_KEY_STR} for str)"
        ))),
    }
}

/// The ABI form of a key, borrowing a str key's bytes.
fn key_to_abi(key: &Key) -> KvKey {
    match key {
        Key::Int(k) => KvKey {
            kind: KV_KEY_INT,
            int_key: *k,
            str_ptr: std::ptr::null(),
            str_len: 0,
        },
        Key::Str(s) => KvKey {
            kind: KV_KEY_STR,
            int_key: 0,
            str_ptr: s.as_ptr(),
            str_len: s.len(),
        },
    }
}

/// The dtype and shape of an ABI tensor, checked against its byte length and device.
///
/// # Safety
/// `shape` must point to `ndim` readable `i64` (or `ndim` be 0).
unsafe fn tensor_layout(tensor: &KvTensor) -> Result<(DType, Vec<usize>)> {
    let dtype = dtype_from_code(tensor.dtype)
        .ok_or_else(|| Error::InvalidArgument(format!("unknown dtype code {}", tensor.dtype)))?;
    if tensor.device_type != KV_DEVICE_CPU {
        return Err(Error::InvalidArgument(format!(
            "device type {} is not supported by plugin ABI version 1 (only cpu, {KV_DEVICE_CPU})",
            tensor.device_type
        )));
    }
    let dims = if tensor.ndim == 0 {
        &[][..]
    } else if tensor.shape.is_null() {
        return Err(Error::InvalidArgument(format!(
            "a tensor of {} dimensions has a null shape pointer",
            tensor.ndim
        )));
    } else {
        // SAFETY: the caller guarantees `ndim` readable dimensions at `shape`.
        unsafe { std::slice::from_raw_parts(tensor.shape, tensor.ndim as usize) }
    };
    let shape = dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|_| Error::InvalidArgument(format!("negative dimension in shape {dims:?}")))?;
    // Within what an array (and a slice) can address: the product of the non-zero
    // dimensions and the byte length both fit in `isize`.
    let too_large = || Error::InvalidArgument(format!("shape {shape:?} is too large"));
    if !crate::array::addressable(&shape, dtype) {
        return Err(too_large());
    }
    let bytes = shape
        .iter()
        .try_fold(dtype.size_of(), |n, &d| n.checked_mul(d))
        .ok_or_else(too_large)?;
    if bytes != tensor.byte_len {
        return Err(Error::InvalidArgument(format!(
            "a {dtype} tensor of shape {shape:?} has {bytes} bytes, but byte_len is {}",
            tensor.byte_len
        )));
    }
    if bytes > 0 && tensor.data.is_null() {
        return Err(Error::InvalidArgument(
            "a tensor's data pointer is null".into(),
        ));
    }
    Ok((dtype, shape))
}

/// A copy of an ABI tensor as an [`NDArray`].
///
/// # Safety
/// The tensor's `shape` must hold `ndim` dimensions and `data` `byte_len` readable bytes.
unsafe fn tensor_to_ndarray(tensor: &KvTensor) -> Result<NDArray> {
    // SAFETY: forwarded from the caller.
    let (dtype, shape) = unsafe { tensor_layout(tensor) }?;
    let mut array = NDArray::zeros(&shape, dtype);
    let dst = array
        .dense_mut()
        .and_then(host_bytes_mut)
        .expect("a fresh dense array has standard layout");
    if !dst.is_empty() {
        // SAFETY: `tensor_layout` checked that `byte_len == dst.len()` and that `data` is not
        // null; the caller guarantees the bytes are readable; `dst` is a distinct allocation.
        unsafe { std::ptr::copy_nonoverlapping(tensor.data, dst.as_mut_ptr(), dst.len()) };
    }
    Ok(array)
}

/// Copies `array` (the tensor's dtype and shape) into the tensor's memory.
///
/// # Safety
/// `data` must point to `byte_len` writable bytes not aliased by `array`.
unsafe fn write_tensor(tensor: &KvTensor, array: &NDArray) -> Result<()> {
    let standard;
    let host = match array.dense().and_then(host_bytes) {
        Some(bytes) => bytes,
        None => {
            standard = standardised(array);
            standard
                .dense()
                .and_then(host_bytes)
                .expect("standardised arrays are dense and contiguous")
        }
    };
    if host.len() != tensor.byte_len {
        return Err(Error::InvalidArgument(format!(
            "an output of {} bytes received {} bytes",
            tensor.byte_len,
            host.len()
        )));
    }
    if !host.is_empty() {
        // SAFETY: the caller guarantees `byte_len` writable bytes at `data`, not overlapping
        // `array`; the lengths are equal.
        unsafe { std::ptr::copy_nonoverlapping(host.as_ptr(), tensor.data, host.len()) };
    }
    Ok(())
}

/// A dense, standard-layout copy of `array` (same dtype and shape).
fn standardised(array: &NDArray) -> NDArray {
    let mut copy = NDArray::zeros(array.shape(), array.dtype());
    copy.assign(array).expect("same shape");
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: &[i64], byte_len: usize, data: *mut u8) -> KvTensor {
        KvTensor {
            data,
            byte_len,
            dtype: KV_DTYPE_F32,
            ndim: shape.len() as u32,
            shape: shape.as_ptr(),
            device_type: KV_DEVICE_CPU,
            device_id: 0,
        }
    }

    fn message(result: Result<NDArray>) -> String {
        match result {
            Ok(a) => panic!("accepted: {:?}", a.shape()),
            Err(e) => {
                assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn malformed_tensors_are_errors_not_panics() {
        let mut data = [0u8; 8];
        // An empty tensor whose other dimensions no array can have.
        let huge = [0, 1 << 62, 4];
        // SAFETY: every pointer is valid for what the tensor claims (no data at all).
        let err = message(unsafe { tensor_to_ndarray(&tensor(&huge, 0, data.as_mut_ptr())) });
        assert!(err.contains("too large"), "{err}");
        // Bytes that fit in usize but in no slice.
        let big = [1i64 << 61];
        // SAFETY: rejected before `data` is read.
        let err = message(unsafe { tensor_to_ndarray(&tensor(&big, 1 << 63, data.as_mut_ptr())) });
        assert!(err.contains("too large"), "{err}");
        let mut null_shape = tensor(&[2], 8, data.as_mut_ptr());
        null_shape.shape = std::ptr::null();
        // SAFETY: rejected before the shape is read.
        let err = message(unsafe { tensor_to_ndarray(&null_shape) });
        assert!(err.contains("null shape"), "{err}");
        // SAFETY: 8 readable bytes for a [2] float32 tensor.
        let ok = unsafe { tensor_to_ndarray(&tensor(&[2], 8, data.as_mut_ptr())) }.unwrap();
        assert_eq!(ok.to_vec::<f32>().unwrap(), vec![0.0, 0.0]);

        let key = KvKey {
            kind: KV_KEY_STR,
            int_key: 0,
            str_ptr: std::ptr::null(),
            str_len: 3,
        };
        // SAFETY: rejected before the (null) bytes are read.
        let err = unsafe { key_from_abi(&key) }.unwrap_err().to_string();
        assert!(err.contains("null pointer"), "{err}");
    }
}
