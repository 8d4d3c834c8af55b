//! The C plugin called straight through its descriptor, as a host written in C or Python
//! would: input no Rust host sends is refused with an error, not acted on.

use kvstore_base::plugin::abi::*;

#[cfg(unix)]
/// The C plugin's descriptor (its library stays loaded for the process).
fn descriptor() -> KvPluginDescriptor {
    // SAFETY: the summing store is a plugin library built by this crate's build script.
    let library = unsafe { libloading::Library::new(kvstore_plugin_c::SUMMING_STORE) }.unwrap();
    // SAFETY: the entry has the ABI's signature.
    let entry = *unsafe { library.get::<KvPluginEntry>(KV_PLUGIN_ENTRY.as_bytes()) }.unwrap();
    std::mem::forget(library);
    // SAFETY: the entry returns a descriptor valid while the library is loaded.
    unsafe { *entry() }
}

#[cfg(unix)]
#[test]
fn a_shape_whose_size_overflows_is_refused_not_stored() {
    let d = descriptor();
    let mut buffer = [0u8; 512];
    let mut err = KvError::with_buffer(&mut buffer);
    let name = b"summingstore";
    // SAFETY: the name and record live for the call; no options.
    let store =
        unsafe { d.create.unwrap()(name.as_ptr(), name.len(), std::ptr::null(), 0, &mut err) };
    assert!(!store.is_null());
    let key = KvKey {
        kind: KV_KEY_INT,
        int_key: 3,
        str_ptr: std::ptr::null(),
        str_len: 0,
    };
    // 2^62 + 1 float32s: 4 * (2^62 + 1) wraps to 4 bytes in 64-bit arithmetic.
    let shape = [(1i64 << 62) + 1];
    let mut data = [0u8; 4];
    let tensor = KvTensor {
        data: data.as_mut_ptr(),
        byte_len: 4,
        dtype: KV_DTYPE_F32,
        ndim: 1,
        shape: shape.as_ptr(),
        device_type: KV_DEVICE_CPU,
        device_id: 0,
    };
    let mut err = KvError::with_buffer(&mut buffer);
    // SAFETY: one key and one tensor, both live for the call.
    let code = unsafe { d.init.unwrap()(store, &key, &tensor, 1, &mut err) };
    let len = err.message_len;
    let message = String::from_utf8_lossy(&buffer[..len]).into_owned();
    assert_eq!(code, KV_ERR_INVALID_ARGUMENT, "{message}");
    assert!(message.contains("more bytes than memory can"), "{message}");
    // SAFETY: the store is live and not used afterwards.
    unsafe { d.destroy.unwrap()(store) };
}
