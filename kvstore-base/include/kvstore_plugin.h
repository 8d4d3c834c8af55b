/*
 * kvstore_plugin.h: the C ABI of kvstore plugins, version 1.
 *
 * A plugin is a shared library exporting one function,
 *
 *     const KvPluginDescriptor *kvstore_plugin_entry(void);
 *
 * returning a descriptor that stays valid while the library is loaded (hosts never unload
 * it). The Rust twin of this header is kvstore-base/src/plugin/abi.rs; a test checks that
 * sizes and offsets agree.
 *
 * Rules:
 * - No allocation crosses the boundary. Every pointer the host passes (keys, tensors, the
 *   error record and its message buffer) belongs to the host and is valid during the call
 *   only: copy what you keep. A store handle belongs to the plugin; `destroy` releases it.
 * - Functions returning int32_t return KV_OK or a KV_ERR_* code and, on error, fill the
 *   caller's KvError: code, the key the error is about (key_source/key_index), the
 *   structured details of the code, and a UTF-8 message of at most message_cap - 1 bytes
 *   followed by a nul (message_len = bytes written). A failed call leaves the store and every
 *   output unchanged.
 * - Tensors are dense, row-major, in host memory (KV_DEVICE_CPU). Inputs are read-only;
 *   outputs keep their dtype (values are cast into them) and must receive data of their shape.
 * - The host may call a store from several threads at once: stores must be thread-safe.
 * - Later versions only append function pointers: struct_size tells the host how many the
 *   plugin provides. An incompatible change bumps KV_PLUGIN_ABI_VERSION.
 * - Nothing may unwind (C++ exceptions, Rust panics) through these functions: catch and
 *   report KV_ERR_PANIC.
 */
#ifndef KVSTORE_PLUGIN_H
#define KVSTORE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_PLUGIN_ABI_VERSION 1u
#define KV_PLUGIN_ENTRY "kvstore_plugin_entry"

/* Status codes. Each error code maps to one kvstore Error kind. */
#define KV_OK 0
#define KV_ERR_UNSUPPORTED 1          /* the store does not offer the operation */
#define KV_ERR_INVALID_ARGUMENT 2     /* message says why */
#define KV_ERR_SHAPE_MISMATCH 3       /* shape_expected/shape_found; message names the array */
#define KV_ERR_DTYPE_MISMATCH 4       /* dtype_expected/dtype_found; message names the array */
#define KV_ERR_KEY_NOT_INITIALIZED 5  /* a key used before init */
#define KV_ERR_DUPLICATE_INIT 6       /* a key initialised twice */
#define KV_ERR_COUNT_MISMATCH 7       /* count_expected/count_found; message: what was counted */
#define KV_ERR_DEVICE 8               /* a device failed */
#define KV_ERR_BACKEND 9              /* any other failure */
#define KV_ERR_PANIC 10               /* the store panicked or threw */

/* Dtype codes: MXNet's type flags. */
#define KV_DTYPE_F32 0u
#define KV_DTYPE_F64 1u
#define KV_DTYPE_F16 2u
#define KV_DTYPE_U8 3u
#define KV_DTYPE_I32 4u
#define KV_DTYPE_I64 6u
#define KV_DTYPE_BF16 12u

/* Devices (MXNet's device types); version 1 passes host memory only. */
#define KV_DEVICE_CPU 1u
#define KV_DEVICE_GPU 2u

/* Key kinds. */
#define KV_KEY_INT 0u
#define KV_KEY_STR 1u

/* KvError.key_source. */
#define KV_ERROR_KEY_NONE 0u      /* about no particular key */
#define KV_ERROR_KEY_OF_VALUES 1u /* keys[key_index] (for pull: its output keys) */
#define KV_ERROR_KEY_OF_OUTS 2u   /* out_keys[key_index] (pushpull, broadcast) */

/* Capability indices (is_capable) and bits (1 << index, descriptor.capabilities). */
#define KV_CAP_OPTIMIZER 0u
#define KV_CAP_INIT_PUSH_PULL 1u
#define KV_CAP_UPDATER 2u              /* never forwarded by version 1 */
#define KV_CAP_GRADIENT_COMPRESSION 3u /* never forwarded by version 1 */
#define KV_CAP_ROW_SPARSE 4u           /* never forwarded by version 1 */
#define KV_CAP_OPTIMIZER_STATES 5u     /* never forwarded by version 1 */
#define KV_CAP_DISTRIBUTED 6u
#define KV_CAPABILITIES_UNDECLARED UINT64_MAX /* the host asks a store instead */

#define KV_ERROR_MAX_NDIM 32

/* A key: an integer, or UTF-8 bytes (not nul-terminated). */
typedef struct KvKey {
    uint32_t kind; /* KV_KEY_INT or KV_KEY_STR */
    int64_t int_key;
    const uint8_t *str_ptr;
    size_t str_len;
} KvKey;

/* A dense, row-major tensor in host memory. */
typedef struct KvTensor {
    uint8_t *data;         /* read-only for inputs */
    size_t byte_len;       /* product(shape) * element size */
    uint32_t dtype;        /* KV_DTYPE_* */
    uint32_t ndim;
    const int64_t *shape;  /* ndim dimensions */
    uint32_t device_type;  /* KV_DEVICE_CPU */
    uint32_t device_id;
} KvTensor;

/* A key = value option passed to create (UTF-8, not nul-terminated). */
typedef struct KvOption {
    const uint8_t *key;
    size_t key_len;
    const uint8_t *value;
    size_t value_len;
} KvOption;

/* The caller-owned error record. The host clears it and sets message/message_cap. */
typedef struct KvError {
    int32_t code;
    uint32_t key_source;    /* KV_ERROR_KEY_* */
    size_t key_index;
    size_t count_expected;  /* KV_ERR_COUNT_MISMATCH */
    size_t count_found;
    uint32_t dtype_expected; /* KV_ERR_DTYPE_MISMATCH */
    uint32_t dtype_found;
    uint32_t ndim_expected;  /* KV_ERR_SHAPE_MISMATCH */
    uint32_t ndim_found;
    int64_t shape_expected[KV_ERROR_MAX_NDIM];
    int64_t shape_found[KV_ERROR_MAX_NDIM];
    uint8_t *message;       /* the caller's buffer */
    size_t message_cap;
    size_t message_len;     /* bytes written, without the nul */
} KvError;

typedef void *KvStoreHandle;

typedef KvStoreHandle (*KvCreateFn)(const uint8_t *name, size_t name_len, const KvOption *options,
                                    size_t n_options, KvError *err);
typedef void (*KvDestroyFn)(KvStoreHandle store);
/* Copies the type name (truncated, nul-terminated) into buf; returns its full length. */
typedef size_t (*KvTypeNameFn)(KvStoreHandle store, uint8_t *buf, size_t cap);
typedef uint64_t (*KvCountFn)(KvStoreHandle store);
typedef int32_t (*KvIsCapableFn)(KvStoreHandle store, uint32_t capability);
typedef int32_t (*KvInitFn)(KvStoreHandle store, const KvKey *keys, const KvTensor *values,
                            size_t n, KvError *err);
/* push (tensors = values) and pull (tensors = outputs). */
typedef int32_t (*KvPushFn)(KvStoreHandle store, const KvKey *keys, const KvTensor *tensors,
                            size_t n, int32_t priority, KvError *err);
/* pushpull and broadcast. */
typedef int32_t (*KvPushPullFn)(KvStoreHandle store, const KvKey *keys, const KvTensor *values,
                                size_t n, const KvKey *out_keys, const KvTensor *outs,
                                size_t n_outs, int32_t priority, KvError *err);
/* The optimizer as JSON: {"name": "sgd", "params": {"momentum": 0.9}}. */
typedef int32_t (*KvSetOptimizerFn)(KvStoreHandle store, const uint8_t *spec_json, size_t len,
                                    KvError *err);

/*
 * The descriptor. Required: create, destroy, type_name, rank, num_workers, is_capable,
 * pushpull, broadcast. NULL init/push/pull/set_optimizer: the operation is unsupported.
 */
typedef struct KvPluginDescriptor {
    uint32_t abi_version;  /* KV_PLUGIN_ABI_VERSION */
    size_t struct_size;    /* sizeof(KvPluginDescriptor) */
    const char *name;      /* the store name create() answers to */
    uint64_t capabilities; /* 1 << KV_CAP_* bits, or KV_CAPABILITIES_UNDECLARED */
    KvCreateFn create;
    KvDestroyFn destroy;
    KvTypeNameFn type_name;
    KvCountFn rank;
    KvCountFn num_workers;
    KvIsCapableFn is_capable;
    KvInitFn init;
    KvPushFn push;
    KvPushFn pull;
    KvPushPullFn pushpull;
    KvPushPullFn broadcast;
    KvSetOptimizerFn set_optimizer;
} KvPluginDescriptor;

typedef const KvPluginDescriptor *(*KvPluginEntry)(void);

#ifdef __cplusplus
}
#endif

#endif /* KVSTORE_PLUGIN_H */
