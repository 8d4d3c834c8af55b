//! The Rust definitions of the ABI (`kvstore_base::plugin::abi`) and the C header
//! (`kvstore_plugin.h`) agree: sizes, field offsets and constants, as a C compiler sees them.

use std::mem::{offset_of, size_of};

use kvstore_base::plugin::abi::*;

#[test]
fn rust_and_c_layouts_agree() {
    let rust: Vec<usize> = vec![
        size_of::<KvKey>(),
        offset_of!(KvKey, kind),
        offset_of!(KvKey, int_key),
        offset_of!(KvKey, str_ptr),
        offset_of!(KvKey, str_len),
        size_of::<KvTensor>(),
        offset_of!(KvTensor, data),
        offset_of!(KvTensor, byte_len),
        offset_of!(KvTensor, dtype),
        offset_of!(KvTensor, ndim),
        offset_of!(KvTensor, shape),
        offset_of!(KvTensor, device_type),
        offset_of!(KvTensor, device_id),
        size_of::<KvOption>(),
        offset_of!(KvOption, key),
        offset_of!(KvOption, key_len),
        offset_of!(KvOption, value),
        offset_of!(KvOption, value_len),
        size_of::<KvError>(),
        offset_of!(KvError, code),
        offset_of!(KvError, key_source),
        offset_of!(KvError, key_index),
        offset_of!(KvError, count_expected),
        offset_of!(KvError, count_found),
        offset_of!(KvError, dtype_expected),
        offset_of!(KvError, dtype_found),
        offset_of!(KvError, ndim_expected),
        offset_of!(KvError, ndim_found),
        offset_of!(KvError, shape_expected),
        offset_of!(KvError, shape_found),
        offset_of!(KvError, message),
        offset_of!(KvError, message_cap),
        offset_of!(KvError, message_len),
        size_of::<KvPluginDescriptor>(),
        offset_of!(KvPluginDescriptor, abi_version),
        offset_of!(KvPluginDescriptor, struct_size),
        offset_of!(KvPluginDescriptor, name),
        offset_of!(KvPluginDescriptor, capabilities),
        offset_of!(KvPluginDescriptor, create),
        offset_of!(KvPluginDescriptor, destroy),
        offset_of!(KvPluginDescriptor, type_name),
        offset_of!(KvPluginDescriptor, rank),
        offset_of!(KvPluginDescriptor, num_workers),
        offset_of!(KvPluginDescriptor, is_capable),
        offset_of!(KvPluginDescriptor, init),
        offset_of!(KvPluginDescriptor, push),
        offset_of!(KvPluginDescriptor, pull),
        offset_of!(KvPluginDescriptor, pushpull),
        offset_of!(KvPluginDescriptor, broadcast),
        offset_of!(KvPluginDescriptor, set_optimizer),
        offset_of!(KvPluginDescriptor, barrier),
        offset_of!(KvPluginDescriptor, set_gradient_compression),
        offset_of!(KvPluginDescriptor, save_optimizer_states),
        offset_of!(KvPluginDescriptor, load_optimizer_states),
        offset_of!(KvPluginDescriptor, send_command_to_servers),
        offset_of!(KvPluginDescriptor, row_sparse_pull),
        offset_of!(KvPluginDescriptor, init_row_sparse),
        offset_of!(KvPluginDescriptor, push_row_sparse),
        KV_PLUGIN_DESCRIPTOR_SIZE_V1_0,
        KV_PLUGIN_DESCRIPTOR_SIZE_V1_1,
        size_of::<KvValue>(),
        offset_of!(KvValue, storage),
        offset_of!(KvValue, num_rows),
        offset_of!(KvValue, row_ids),
        offset_of!(KvValue, data),
        KV_PLUGIN_ABI_VERSION as usize,
        KV_ERROR_MAX_NDIM,
        KV_DTYPE_F32 as usize,
        KV_DTYPE_F64 as usize,
        KV_DTYPE_F16 as usize,
        KV_DTYPE_U8 as usize,
        KV_DTYPE_I32 as usize,
        KV_DTYPE_I64 as usize,
        KV_DTYPE_BF16 as usize,
        KV_OK as usize,
        KV_ERR_UNSUPPORTED as usize,
        KV_ERR_INVALID_ARGUMENT as usize,
        KV_ERR_SHAPE_MISMATCH as usize,
        KV_ERR_DTYPE_MISMATCH as usize,
        KV_ERR_KEY_NOT_INITIALIZED as usize,
        KV_ERR_DUPLICATE_INIT as usize,
        KV_ERR_COUNT_MISMATCH as usize,
        KV_ERR_DEVICE as usize,
        KV_ERR_BACKEND as usize,
        KV_ERR_PANIC as usize,
        KV_CAP_OPTIMIZER as usize,
        KV_CAP_INIT_PUSH_PULL as usize,
        KV_CAP_DISTRIBUTED as usize,
        KV_ERROR_KEY_OF_VALUES as usize,
        KV_ERROR_KEY_OF_OUTS as usize,
        KV_ERR_IO as usize,
        KV_CAP_UPDATER as usize,
        KV_CAP_GRADIENT_COMPRESSION as usize,
        KV_CAP_ROW_SPARSE as usize,
        KV_CAP_OPTIMIZER_STATES as usize,
        KV_STORAGE_DENSE as usize,
        KV_STORAGE_ROW_SPARSE as usize,
        KV_ERROR_KEY_NONE as usize,
        KV_KEY_INT as usize,
        KV_KEY_STR as usize,
        KV_DEVICE_CPU as usize,
        KV_DEVICE_GPU as usize,
    ];
    // Revision 1.0 ends at set_optimizer, 1.1 at push_row_sparse.
    assert_eq!(
        KV_PLUGIN_DESCRIPTOR_SIZE_V1_0,
        offset_of!(KvPluginDescriptor, barrier)
    );
    assert_eq!(
        KV_PLUGIN_DESCRIPTOR_SIZE_V1_1,
        offset_of!(KvPluginDescriptor, push_row_sparse) + size_of::<usize>()
    );
    type Layout = unsafe extern "C" fn(*mut usize, usize) -> usize;
    // SAFETY: the fixture is a plain C library without initialisers; it stays loaded while
    // its function is called.
    let library = unsafe { libloading::Library::new(kvstore_plugin_c::LAYOUT) }.unwrap();
    // SAFETY: the fixture defines the function with exactly this signature.
    let layout = unsafe { library.get::<Layout>(b"kvstore_plugin_layout") }.unwrap();
    let mut c = vec![0usize; rust.len() + 8];
    // SAFETY: the buffer has the capacity passed.
    let n = unsafe { layout(c.as_mut_ptr(), c.len()) };
    c.truncate(n);
    assert_eq!(rust, c, "the Rust ABI types and kvstore_plugin.h disagree");
}
