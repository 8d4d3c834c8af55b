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
//! `set_optimizer` (by [`OptimizerSpec`](crate::OptimizerSpec), as JSON) of dense CPU arrays.
//! Row-sparse or GPU arrays passed to a plugin store are an
//! [`Error::InvalidArgument`]; `row_sparse_pull`, updaters,
//! gradient compression and optimizer state files are [`Unsupported`](crate::Error::Unsupported)
//! (their capabilities are never reported for a plugin store).
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
    KvError, KvKey, KvOption, KvPluginDescriptor, KvTensor, KV_PLUGIN_ABI_VERSION, KV_PLUGIN_ENTRY,
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

/// The ABI index of a capability (`KV_CAP_*`, the order of [`Capability::ALL`]).
pub fn capability_code(capability: Capability) -> u32 {
    Capability::ALL
        .iter()
        .position(|&c| c == capability)
        .expect("every capability is in Capability::ALL") as u32
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

/// Checks that `array` can cross the ABI: dense and in host memory.
fn check_transferable(array: &NDArray, what: &str) -> Result<()> {
    if array.dense().is_none() {
        return Err(Error::InvalidArgument(format!(
            "{what} is row_sparse: plugin stores (C ABI version 1) take dense arrays only"
        )));
    }
    if array.context() != crate::Context::Cpu {
        return Err(Error::InvalidArgument(format!(
            "{what} is on {}: plugin stores (C ABI version 1) take host (cpu) arrays only",
            array.context()
        )));
    }
    Ok(())
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
    let addressable = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(dtype.size_of(), |n, &d| n.checked_mul(d))
        .is_some_and(|n| n <= isize::MAX as usize);
    if !addressable {
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
