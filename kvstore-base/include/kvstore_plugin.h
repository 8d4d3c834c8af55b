/*
 * kvstore_plugin.h: the C ABI of kvstore plugins, version 1 (revision 1.1).
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
 *   outputs keep their dtype (values are cast into them) and must receive data of their shape:
 *   every element is written, and what an output holds on entry means nothing (the host passes
 *   fresh buffers, copied into the caller's arrays only after KV_OK).
 *   A row-sparse array crosses as a KvValue: its sorted row ids and its stored rows.
 * - The host may call a store from several threads at once: stores must be thread-safe.
 * - Later versions only append function pointers: struct_size tells the host how many the
 *   plugin provides, and the host never reads a field beyond it (a missing function is an
 *   unsupported operation). An incompatible change bumps KV_PLUGIN_ABI_VERSION.
 *
 * Revisions of version 1 (abi_version 1 for all; struct_size tells them apart):
 * - 1.0: the descriptor up to set_optimizer (KV_PLUGIN_DESCRIPTOR_SIZE_V1_0 bytes): init,
 *   push, pull, pushpull, broadcast and set_optimizer of dense arrays.
 * - 1.1 (appended): barrier, set_gradient_compression, save_optimizer_states,
 *   load_optimizer_states, send_command_to_servers, row_sparse_pull, init_row_sparse and
 *   push_row_sparse; the status code KV_ERR_IO. A plugin compiled against this header with
 *   struct_size = sizeof(KvPluginDescriptor) is a 1.1 plugin (leave unsupported functions
 *   NULL); plugins compiled against 1.0 keep loading and working.
 *
 * More rules:
 * - Nothing may unwind (C++ exceptions, Rust panics) through these functions: catch and
 *   report KV_ERR_PANIC.
 * - Custom updaters never cross the ABI: an updater is a closure of the host's language.
 * - A capability needs its functions: gradient_compression set_gradient_compression;
 *   optimizer_states set_optimizer and both state functions; row_sparse row_sparse_pull,
 *   init_row_sparse and push_row_sparse. A plugin that declares its capabilities has no
 *   others. struct_size must end on a field boundary.
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
#define KV_ERR_IO 11                  /* 1.1: an I/O error on a file; message: "<path>\n<error>"
                                       * (no newline: the call's own file); count_found: the OS's
                                       * errno + 1 (0: none) */

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
#define KV_CAP_UPDATER 2u              /* never forwarded: a closure cannot cross the ABI */
#define KV_CAP_GRADIENT_COMPRESSION 3u /* forwarded with set_gradient_compression (1.1) */
#define KV_CAP_ROW_SPARSE 4u           /* forwarded with row_sparse_pull (1.1) */
#define KV_CAP_OPTIMIZER_STATES 5u     /* forwarded with save/load_optimizer_states (1.1) */
#define KV_CAP_DISTRIBUTED 6u
#define KV_CAPABILITIES_UNDECLARED UINT64_MAX /* the host asks a store instead */

#define KV_ERROR_MAX_NDIM 32

/* KvValue.storage (1.1). */
#define KV_STORAGE_DENSE 0u      /* data holds the whole value; row_ids and num_rows unused */
#define KV_STORAGE_ROW_SPARSE 1u /* row_ids: the stored rows' ids; data: those rows */

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

/*
 * A value that may be row-sparse (1.1): values of init_row_sparse/push_row_sparse, outputs of
 * row_sparse_pull. A row-sparse array of shape [num_rows, d1, ...]: row_ids is an int64
 * tensor of one dimension, strictly increasing, each id in [0, num_rows); data has shape
 * [length of row_ids, d1, ...] and holds those rows; every other row is zero. A dense value:
 * data is the value, row_ids an empty tensor (NULL data, ndim 0), num_rows 0.
 */
typedef struct KvValue {
    uint32_t storage;  /* KV_STORAGE_* */
    int64_t num_rows;  /* row-sparse: the full first dimension */
    KvTensor row_ids;  /* row-sparse: read-only, also for outputs */
    KvTensor data;     /* dense: the value; row-sparse: the rows (written by row_sparse_pull) */
} KvValue;

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

/* 1.1: waits until every worker reaches the barrier. */
typedef int32_t (*KvBarrierFn)(KvStoreHandle store, KvError *err);
/* 1.1: the compression parameters as a JSON object of strings:
 * {"type": "2bit", "threshold": "0.5"}. */
typedef int32_t (*KvSetGradientCompressionFn)(KvStoreHandle store, const uint8_t *params_json,
                                              size_t len, KvError *err);
/* 1.1: saves the optimizer states (and the optimizer if dump_optimizer != 0) to the file path
 * (path_len bytes, not nul-terminated: UTF-8, or on Unix the path's raw bytes). I/O failures:
 * KV_ERR_IO (see there). */
typedef int32_t (*KvSaveOptimizerStatesFn)(KvStoreHandle store, const uint8_t *path,
                                           size_t path_len, int32_t dump_optimizer, KvError *err);
/* 1.1: loads states saved by save_optimizer_states from the file path (as there). */
typedef int32_t (*KvLoadOptimizerStatesFn)(KvStoreHandle store, const uint8_t *path,
                                           size_t path_len, KvError *err);
/* 1.1: sends a command (UTF-8 body, not nul-terminated) to every server, waits for replies. */
typedef int32_t (*KvSendCommandFn)(KvStoreHandle store, int32_t head, const uint8_t *body,
                                   size_t body_len, KvError *err);
/* 1.1: for each i, rows outs[i].row_ids of keys[i]'s value into outs[i].data. Every output is
 * KV_STORAGE_ROW_SPARSE: num_rows is the first dimension of the caller's output, row_ids the
 * wanted rows (sorted, unique, in [0, num_rows): the host made them so), data a writable
 * [length of row_ids, d1, ...] tensor of the output's dtype receiving row row_ids[j] in its
 * row j (zeros for rows the value does not store). Error keys: KV_ERROR_KEY_OF_VALUES. */
typedef int32_t (*KvRowSparsePullFn)(KvStoreHandle store, const KvKey *keys, const KvValue *outs,
                                     size_t n, int32_t priority, KvError *err);
/* 1.1: init of a batch holding at least one row-sparse value (dense batches go to init). */
typedef int32_t (*KvInitRowSparseFn)(KvStoreHandle store, const KvKey *keys,
                                     const KvValue *values, size_t n, KvError *err);
/* 1.1: push of a batch holding at least one row-sparse value (dense batches go to push). */
typedef int32_t (*KvPushRowSparseFn)(KvStoreHandle store, const KvKey *keys,
                                     const KvValue *values, size_t n, int32_t priority,
                                     KvError *err);

/*
 * The descriptor. Required: create, destroy, type_name, rank, num_workers, is_capable,
 * pushpull, broadcast. Any other NULL function: the operation is unsupported. The fields from
 * barrier on were appended in 1.1; a 1.0 descriptor (struct_size ==
 * KV_PLUGIN_DESCRIPTOR_SIZE_V1_0) ends at set_optimizer. Capabilities are reported only when
 * the functions they need are provided: gradient_compression needs set_gradient_compression,
 * optimizer_states both state functions, row_sparse row_sparse_pull, optimizer set_optimizer.
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
    /* appended in 1.1 */
    KvBarrierFn barrier;
    KvSetGradientCompressionFn set_gradient_compression;
    KvSaveOptimizerStatesFn save_optimizer_states;
    KvLoadOptimizerStatesFn load_optimizer_states;
    KvSendCommandFn send_command_to_servers;
    KvRowSparsePullFn row_sparse_pull;
    KvInitRowSparseFn init_row_sparse;
    KvPushRowSparseFn push_row_sparse;
} KvPluginDescriptor;

/* struct_size of a 1.0 descriptor (ending at set_optimizer): the smallest the host accepts. */
#define KV_PLUGIN_DESCRIPTOR_SIZE_V1_0 \
    (offsetof(KvPluginDescriptor, set_optimizer) + sizeof(KvSetOptimizerFn))
/* struct_size of a 1.1 descriptor. */
#define KV_PLUGIN_DESCRIPTOR_SIZE_V1_1 sizeof(KvPluginDescriptor)

typedef const KvPluginDescriptor *(*KvPluginEntry)(void);

#ifdef __cplusplus
}
#endif

#endif /* KVSTORE_PLUGIN_H */
