/* Sizes and field offsets of the ABI types as a C compiler lays them out, for the test that
 * compares them with the Rust definitions (kvstore-base/src/plugin/abi.rs). */
#include <stddef.h>
#include "kvstore_plugin.h"

#define ENTRY(x) (size_t)(x)

static const size_t LAYOUT[] = {
    ENTRY(sizeof(KvKey)), offsetof(KvKey, kind), offsetof(KvKey, int_key), offsetof(KvKey, str_ptr),
    offsetof(KvKey, str_len),
    ENTRY(sizeof(KvTensor)), offsetof(KvTensor, data), offsetof(KvTensor, byte_len),
    offsetof(KvTensor, dtype), offsetof(KvTensor, ndim), offsetof(KvTensor, shape),
    offsetof(KvTensor, device_type), offsetof(KvTensor, device_id),
    ENTRY(sizeof(KvOption)), offsetof(KvOption, key), offsetof(KvOption, key_len),
    offsetof(KvOption, value), offsetof(KvOption, value_len),
    ENTRY(sizeof(KvError)), offsetof(KvError, code), offsetof(KvError, key_source),
    offsetof(KvError, key_index), offsetof(KvError, count_expected), offsetof(KvError, count_found),
    offsetof(KvError, dtype_expected), offsetof(KvError, dtype_found),
    offsetof(KvError, ndim_expected), offsetof(KvError, ndim_found),
    offsetof(KvError, shape_expected), offsetof(KvError, shape_found), offsetof(KvError, message),
    offsetof(KvError, message_cap), offsetof(KvError, message_len),
    ENTRY(sizeof(KvPluginDescriptor)), offsetof(KvPluginDescriptor, abi_version),
    offsetof(KvPluginDescriptor, struct_size), offsetof(KvPluginDescriptor, name),
    offsetof(KvPluginDescriptor, capabilities), offsetof(KvPluginDescriptor, create),
    offsetof(KvPluginDescriptor, destroy), offsetof(KvPluginDescriptor, type_name),
    offsetof(KvPluginDescriptor, rank), offsetof(KvPluginDescriptor, num_workers),
    offsetof(KvPluginDescriptor, is_capable), offsetof(KvPluginDescriptor, init),
    offsetof(KvPluginDescriptor, push), offsetof(KvPluginDescriptor, pull),
    offsetof(KvPluginDescriptor, pushpull), offsetof(KvPluginDescriptor, broadcast),
    offsetof(KvPluginDescriptor, set_optimizer),
    offsetof(KvPluginDescriptor, barrier), offsetof(KvPluginDescriptor, set_gradient_compression),
    offsetof(KvPluginDescriptor, save_optimizer_states),
    offsetof(KvPluginDescriptor, load_optimizer_states),
    offsetof(KvPluginDescriptor, send_command_to_servers),
    offsetof(KvPluginDescriptor, row_sparse_pull), offsetof(KvPluginDescriptor, init_row_sparse),
    offsetof(KvPluginDescriptor, push_row_sparse),
    KV_PLUGIN_DESCRIPTOR_SIZE_V1_0, KV_PLUGIN_DESCRIPTOR_SIZE_V1_1,
    ENTRY(sizeof(KvValue)), offsetof(KvValue, storage), offsetof(KvValue, num_rows),
    offsetof(KvValue, row_ids), offsetof(KvValue, data),
    /* constants */
    KV_PLUGIN_ABI_VERSION, KV_ERROR_MAX_NDIM, KV_DTYPE_F32, KV_DTYPE_F64, KV_DTYPE_F16, KV_DTYPE_U8,
    KV_DTYPE_I32, KV_DTYPE_I64, KV_DTYPE_BF16, KV_OK, KV_ERR_UNSUPPORTED, KV_ERR_INVALID_ARGUMENT,
    KV_ERR_SHAPE_MISMATCH, KV_ERR_DTYPE_MISMATCH, KV_ERR_KEY_NOT_INITIALIZED, KV_ERR_DUPLICATE_INIT,
    KV_ERR_COUNT_MISMATCH, KV_ERR_DEVICE, KV_ERR_BACKEND, KV_ERR_PANIC, KV_CAP_OPTIMIZER,
    KV_CAP_INIT_PUSH_PULL, KV_CAP_DISTRIBUTED, KV_ERROR_KEY_OF_VALUES, KV_ERROR_KEY_OF_OUTS,
    KV_ERR_IO, KV_CAP_UPDATER, KV_CAP_GRADIENT_COMPRESSION, KV_CAP_ROW_SPARSE,
    KV_CAP_OPTIMIZER_STATES, KV_STORAGE_DENSE, KV_STORAGE_ROW_SPARSE, KV_ERROR_KEY_NONE,
    KV_KEY_INT, KV_KEY_STR, KV_DEVICE_CPU, KV_DEVICE_GPU,
};

/* Copies up to cap entries into out; returns how many there are. */
size_t kvstore_plugin_layout(size_t *out, size_t cap) {
    size_t n = sizeof LAYOUT / sizeof LAYOUT[0];
    for (size_t i = 0; i < n && i < cap; i++) out[i] = LAYOUT[i];
    return n;
}
