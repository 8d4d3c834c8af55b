/*
 * summing_store.c: a kvstore plugin in plain C (C11), registered as "summingstore".
 *
 * An in-memory, single-process store that keeps one value per key:
 * - init stores a copy of each value (a key given twice, or already stored: duplicate init);
 * - push sums the values of each key (left to right, in their dtype) and the sum replaces
 *   the stored value (a key never initialised: key not initialised);
 * - pull copies each stored value into its outputs, cast to the output's dtype;
 * - broadcast initialises each key with its one value, then pulls it;
 * - pushpull is a push followed by a pull, under one lock.
 * Every dtype of the ABI is supported: float32, float64, float16 and bfloat16 (half types
 * add through float32, as MXNet does), int32, int64 and uint8 (wrapping).
 * Every call validates all of its input before it changes anything.
 *
 * Build: cc -shared -fPIC -pthread -I kvstore-base/include summing_store.c -o libsumming_store.so
 */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore_plugin.h"

#define STORE_NAME "summingstore"

typedef struct Entry {
    uint32_t kind;
    int64_t int_key;
    uint8_t *str;
    size_t str_len;
    uint32_t dtype;
    uint32_t ndim;
    int64_t *shape;
    uint8_t *data;
    size_t byte_len;
} Entry;

typedef struct Store {
    pthread_mutex_t lock;
    Entry *entries;
    size_t len;
    size_t cap;
} Store;

/* ---- errors ---------------------------------------------------------------------------- */

static int32_t fail(KvError *err, int32_t code, uint32_t key_source, size_t key_index,
                    const char *fmt, ...) {
    if (err) {
        err->code = code;
        err->key_source = key_source;
        err->key_index = key_index;
        if (err->message && err->message_cap > 0) {
            va_list args;
            va_start(args, fmt);
            int n = vsnprintf((char *)err->message, err->message_cap, fmt, args);
            va_end(args);
            size_t len = n < 0 ? 0 : (size_t)n;
            if (len >= err->message_cap) {
                len = err->message_cap - 1;
                /* Do not cut a UTF-8 sequence in half: find the start of the last one kept and
                 * drop it if it needs more bytes than are left. */
                size_t start = len;
                while (start > 0 && (err->message[start - 1] & 0xC0) == 0x80) start--;
                if (start > 0) {
                    unsigned char lead = err->message[start - 1];
                    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
                    if (start - 1 + need > len) len = start - 1;
                }
                err->message[len] = 0;
            }
            err->message_len = len;
        }
    }
    return code;
}

static void set_shapes(KvError *err, const int64_t *expected, uint32_t ne, const int64_t *found,
                       uint32_t nf) {
    if (!err) return;
    err->ndim_expected = ne < KV_ERROR_MAX_NDIM ? ne : KV_ERROR_MAX_NDIM;
    err->ndim_found = nf < KV_ERROR_MAX_NDIM ? nf : KV_ERROR_MAX_NDIM;
    for (uint32_t i = 0; i < err->ndim_expected; i++) err->shape_expected[i] = expected[i];
    for (uint32_t i = 0; i < err->ndim_found; i++) err->shape_found[i] = found[i];
}

/* ---- dtypes ---------------------------------------------------------------------------- */

static size_t dtype_size(uint32_t dtype) {
    switch (dtype) {
    case KV_DTYPE_F64: case KV_DTYPE_I64: return 8;
    case KV_DTYPE_F32: case KV_DTYPE_I32: return 4;
    case KV_DTYPE_F16: case KV_DTYPE_BF16: return 2;
    case KV_DTYPE_U8: return 1;
    default: return 0;
    }
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0) {
        float v = ldexpf((float)man, -24); /* zero or subnormal, exact */
        return sign ? -v : v;
    }
    if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13);
    else bits = sign | ((exp - 15 + 127) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t f32_to_f16(float f) { /* round to nearest, ties to even */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t exp = (x >> 23) & 0xFFu, man = x & 0x7FFFFFu;
    if (exp == 0xFF) return sign | 0x7C00u | (man ? (0x200u | (man >> 13)) : 0u);
    int32_t e = (int32_t)exp - 127 + 15;
    if (e >= 0x1F) return sign | 0x7C00u;
    if (e <= 0) {
        if (e < -10) return sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++; /* may carry into inf */
    return (uint16_t)(sign | half);
}

static float bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

/* Reads element i as a double (exact for every dtype but int64 beyond 2^53). */
static double load(uint32_t dtype, const uint8_t *p, size_t i) {
    switch (dtype) {
    case KV_DTYPE_F32: { float v; memcpy(&v, p + 4 * i, 4); return v; }
    case KV_DTYPE_F64: { double v; memcpy(&v, p + 8 * i, 8); return v; }
    case KV_DTYPE_F16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return f16_to_f32(v); }
    case KV_DTYPE_BF16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return bf16_to_f32(v); }
    case KV_DTYPE_I32: { int32_t v; memcpy(&v, p + 4 * i, 4); return v; }
    case KV_DTYPE_I64: { int64_t v; memcpy(&v, p + 8 * i, 8); return (double)v; }
    default: return p[i];
    }
}

/* Float-to-integer casts truncate toward zero and saturate; NaN becomes 0. */
static double clamp(double v, double lo, double hi) {
    if (isnan(v)) return 0;
    return v < lo ? lo : (v > hi ? hi : v);
}

/* Writes element i from a double, with the dtype's cast. */
static void store_elem(uint32_t dtype, uint8_t *p, size_t i, double v) {
    switch (dtype) {
    case KV_DTYPE_F32: { float x = (float)v; memcpy(p + 4 * i, &x, 4); break; }
    case KV_DTYPE_F64: memcpy(p + 8 * i, &v, 8); break;
    case KV_DTYPE_F16: { uint16_t x = f32_to_f16((float)v); memcpy(p + 2 * i, &x, 2); break; }
    case KV_DTYPE_BF16: { uint16_t x = f32_to_bf16((float)v); memcpy(p + 2 * i, &x, 2); break; }
    case KV_DTYPE_I32: {
        int32_t x = (int32_t)clamp(trunc(v), -2147483648.0, 2147483647.0);
        memcpy(p + 4 * i, &x, 4);
        break;
    }
    case KV_DTYPE_I64: {
        double t = clamp(trunc(v), -9223372036854775808.0, 9223372036854775807.0);
        int64_t x = t >= 9223372036854775807.0 ? INT64_MAX : (int64_t)t;
        memcpy(p + 8 * i, &x, 8);
        break;
    }
    default: p[i] = (uint8_t)clamp(trunc(v), 0.0, 255.0); break;
    }
}

/* dst[i] += src[i] for n elements of one dtype, with MXNet's arithmetic. */
static void add_into(uint32_t dtype, uint8_t *dst, const uint8_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        switch (dtype) {
        case KV_DTYPE_F32: {
            float a, b;
            memcpy(&a, dst + 4 * i, 4); memcpy(&b, src + 4 * i, 4);
            a += b;
            memcpy(dst + 4 * i, &a, 4);
            break;
        }
        case KV_DTYPE_F64: {
            double a, b;
            memcpy(&a, dst + 8 * i, 8); memcpy(&b, src + 8 * i, 8);
            a += b;
            memcpy(dst + 8 * i, &a, 8);
            break;
        }
        case KV_DTYPE_F16: case KV_DTYPE_BF16: {
            uint16_t a, b;
            memcpy(&a, dst + 2 * i, 2); memcpy(&b, src + 2 * i, 2);
            if (dtype == KV_DTYPE_F16) a = f32_to_f16(f16_to_f32(a) + f16_to_f32(b));
            else a = f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b));
            memcpy(dst + 2 * i, &a, 2);
            break;
        }
        case KV_DTYPE_I32: {
            uint32_t a, b; /* unsigned: wrapping, without signed overflow */
            memcpy(&a, dst + 4 * i, 4); memcpy(&b, src + 4 * i, 4);
            a += b;
            memcpy(dst + 4 * i, &a, 4);
            break;
        }
        case KV_DTYPE_I64: {
            uint64_t a, b;
            memcpy(&a, dst + 8 * i, 8); memcpy(&b, src + 8 * i, 8);
            a += b;
            memcpy(dst + 8 * i, &a, 8);
            break;
        }
        default: dst[i] = (uint8_t)(dst[i] + src[i]); break;
        }
    }
}

/* ---- tensors and keys ------------------------------------------------------------------ */

/* The number of elements of a tensor that passed check_tensor (so it cannot overflow). */
static size_t elements(const KvTensor *t) {
    size_t n = 1;
    for (uint32_t d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
    return n;
}

/* The tensor's size in bytes from its shape and dtype; 0 when that overflows size_t (a shape
 * no memory holds), with *overflow set. Dimensions are known not to be negative. */
static size_t shape_bytes(const KvTensor *t, int *overflow) {
    size_t n = dtype_size(t->dtype);
    *overflow = 0;
    for (uint32_t d = 0; d < t->ndim; d++) {
        if ((uint64_t)t->shape[d] > SIZE_MAX) { *overflow = 1; return 0; }
        size_t dim = (size_t)t->shape[d];
        if (dim != 0 && n > SIZE_MAX / dim) { *overflow = 1; return 0; }
        n *= dim;
    }
    return n;
}

static int same_shape(uint32_t na, const int64_t *a, uint32_t nb, const int64_t *b) {
    if (na != nb) return 0;
    for (uint32_t d = 0; d < na; d++)
        if (a[d] != b[d]) return 0;
    return 1;
}

/* Checks a tensor's dtype, device and size. */
static int32_t check_tensor(const KvTensor *t, const char *what, size_t i, KvError *err) {
    if (dtype_size(t->dtype) == 0)
        return fail(err, KV_ERR_INVALID_ARGUMENT, KV_ERROR_KEY_NONE, 0,
                    "%s %zu has the unknown dtype code %u", what, i, t->dtype);
    if (t->device_type != KV_DEVICE_CPU)
        return fail(err, KV_ERR_INVALID_ARGUMENT, KV_ERROR_KEY_NONE, 0,
                    "%s %zu is not in host memory", what, i);
    for (uint32_t d = 0; d < t->ndim; d++)
        if (t->shape[d] < 0)
            return fail(err, KV_ERR_INVALID_ARGUMENT, KV_ERROR_KEY_NONE, 0,
                        "%s %zu has a negative dimension", what, i);
    int overflow;
    size_t bytes = shape_bytes(t, &overflow);
    if (overflow)
        return fail(err, KV_ERR_INVALID_ARGUMENT, KV_ERROR_KEY_NONE, 0,
                    "%s %zu: its shape holds more bytes than memory can", what, i);
    if (bytes != t->byte_len)
        return fail(err, KV_ERR_INVALID_ARGUMENT, KV_ERROR_KEY_NONE, 0,
                    "%s %zu: byte_len %zu does not match its shape and dtype", what, i, t->byte_len);
    return KV_OK;
}

static int same_key(const KvKey *a, const KvKey *b) {
    if (a->kind != b->kind) return 0;
    if (a->kind == KV_KEY_INT) return a->int_key == b->int_key;
    return a->str_len == b->str_len && (a->str_len == 0 || memcmp(a->str_ptr, b->str_ptr, a->str_len) == 0);
}

static Entry *find(Store *s, const KvKey *key) {
    for (size_t i = 0; i < s->len; i++) {
        Entry *e = &s->entries[i];
        KvKey k = {e->kind, e->int_key, e->str, e->str_len};
        if (same_key(&k, key)) return e;
    }
    return NULL;
}

/* Index of the first key of keys[0..n) equal to keys[i]. */
static size_t first_of(const KvKey *keys, size_t i) {
    for (size_t j = 0; j < i; j++)
        if (same_key(&keys[j], &keys[i])) return j;
    return i;
}

/* A pending value: a key (borrowed from the call) and owned data, stored on commit. */
typedef struct Pending {
    const KvKey *key;
    uint32_t dtype;
    uint32_t ndim;
    const int64_t *shape; /* borrowed from the call's first tensor of the key */
    uint8_t *data;
    size_t byte_len;
} Pending;

static void free_pending(Pending *p, size_t n) {
    for (size_t i = 0; i < n; i++) free(p[i].data);
    free(p);
}

static int32_t no_memory(KvError *err) {
    return fail(err, KV_ERR_BACKEND, KV_ERROR_KEY_NONE, 0, "out of memory");
}

/* Stores (or replaces) the pending values; takes ownership of their data. Everything it
 * needs is allocated before the store changes: out of memory, it leaves the store as it was. */
static int32_t commit(Store *s, Pending *p, size_t n, KvError *err) {
    size_t slots = n ? n : 1, added = 0;
    int64_t **shapes = calloc(slots, sizeof *shapes);
    uint8_t **names = calloc(slots, sizeof *names);
    int ok = shapes && names;
    for (size_t i = 0; ok && i < n; i++) {
        if (!p[i].key) continue;
        shapes[i] = malloc(sizeof(int64_t) * (p[i].ndim ? p[i].ndim : 1));
        ok = shapes[i] != NULL;
        if (ok && !find(s, p[i].key)) {
            added++;
            if (p[i].key->kind == KV_KEY_STR) {
                names[i] = malloc(p[i].key->str_len ? p[i].key->str_len : 1);
                ok = names[i] != NULL;
            }
        }
    }
    if (ok && s->len + added > s->cap) {
        size_t cap = s->cap ? s->cap : 8;
        while (cap < s->len + added) cap *= 2;
        Entry *grown = realloc(s->entries, cap * sizeof(Entry));
        ok = grown != NULL;
        if (ok) {
            s->entries = grown;
            s->cap = cap;
        }
    }
    if (!ok) {
        for (size_t i = 0; i < n; i++) {
            if (shapes) free(shapes[i]);
            if (names) free(names[i]);
        }
        free(shapes);
        free(names);
        return no_memory(err);
    }
    for (size_t i = 0; i < n; i++) {
        if (!p[i].key) continue;
        Entry *e = find(s, p[i].key);
        memcpy(shapes[i], p[i].shape, sizeof(int64_t) * p[i].ndim);
        if (!e) {
            e = &s->entries[s->len++];
            memset(e, 0, sizeof *e);
            e->kind = p[i].key->kind;
            e->int_key = p[i].key->int_key;
            if (e->kind == KV_KEY_STR) {
                e->str = names[i];
                if (p[i].key->str_len) memcpy(e->str, p[i].key->str_ptr, p[i].key->str_len);
                e->str_len = p[i].key->str_len;
            }
        } else {
            free(e->shape);
            free(e->data);
        }
        e->dtype = p[i].dtype;
        e->ndim = p[i].ndim;
        e->shape = shapes[i];
        e->data = p[i].data;
        e->byte_len = p[i].byte_len;
        p[i].data = NULL;
    }
    free(shapes);
    free(names);
    return KV_OK;
}

/* Validates a push of n values and computes each distinct key's sum into *out (one Pending
 * per value position; positions that repeat an earlier key have key == NULL). */
static int32_t sums(Store *s, const KvKey *keys, const KvTensor *values, size_t n,
                    Pending **out, KvError *err) {
    for (size_t i = 0; i < n; i++) {
        int32_t rc = check_tensor(&values[i], "value", i, err);
        if (rc) return rc;
    }
    Pending *p = calloc(n ? n : 1, sizeof(Pending));
    if (!p) return no_memory(err);
    for (size_t i = 0; i < n; i++) {
        if (first_of(keys, i) != i) continue;
        Entry *stored = find(s, &keys[i]);
        if (!stored) {
            free_pending(p, n);
            return fail(err, KV_ERR_KEY_NOT_INITIALIZED, KV_ERROR_KEY_OF_VALUES, i,
                        "key has not been initialised (call init first)");
        }
        const KvTensor *first = &values[i];
        size_t count = 0;
        for (size_t j = i; j < n; j++) {
            if (!same_key(&keys[j], &keys[i])) continue;
            const KvTensor *v = &values[j];
            if (!same_shape(first->ndim, first->shape, v->ndim, v->shape)) {
                set_shapes(err, first->shape, first->ndim, v->shape, v->ndim);
                free_pending(p, n);
                return fail(err, KV_ERR_SHAPE_MISMATCH, KV_ERROR_KEY_OF_VALUES, i,
                            "value %zu of the key", count);
            }
            if (v->dtype != first->dtype) {
                if (err) { err->dtype_expected = first->dtype; err->dtype_found = v->dtype; }
                free_pending(p, n);
                return fail(err, KV_ERR_DTYPE_MISMATCH, KV_ERROR_KEY_OF_VALUES, i,
                            "value %zu of the key", count);
            }
            if (count == 0) {
                p[i].data = calloc(v->byte_len ? v->byte_len : 1, 1);
                if (!p[i].data) { free_pending(p, n); return no_memory(err); }
            }
            add_into(v->dtype, p[i].data, v->data, elements(v));
            count++;
        }
        if (!same_shape(stored->ndim, stored->shape, first->ndim, first->shape)) {
            set_shapes(err, stored->shape, stored->ndim, first->shape, first->ndim);
            free_pending(p, n);
            return fail(err, KV_ERR_SHAPE_MISMATCH, KV_ERROR_KEY_OF_VALUES, i,
                        "the pushed value (against the stored value)");
        }
        if (stored->dtype != first->dtype) {
            if (err) { err->dtype_expected = stored->dtype; err->dtype_found = first->dtype; }
            free_pending(p, n);
            return fail(err, KV_ERR_DTYPE_MISMATCH, KV_ERROR_KEY_OF_VALUES, i,
                        "the pushed value (against the stored value)");
        }
        p[i].key = &keys[i];
        p[i].dtype = first->dtype;
        p[i].ndim = first->ndim;
        p[i].shape = first->shape;
        p[i].byte_len = first->byte_len;
    }
    *out = p;
    return KV_OK;
}

/* Validates an init of n values: each key once in the call and not yet stored. */
static int32_t fresh(Store *s, const KvKey *keys, const KvTensor *values, size_t n,
                     Pending **out, KvError *err) {
    for (size_t i = 0; i < n; i++) {
        int32_t rc = check_tensor(&values[i], "value", i, err);
        if (rc) return rc;
        if (first_of(keys, i) != i || find(s, &keys[i]))
            return fail(err, KV_ERR_DUPLICATE_INIT, KV_ERROR_KEY_OF_VALUES, first_of(keys, i),
                        "duplicate init of the key (init or broadcast was called with it more than once)");
    }
    Pending *p = calloc(n ? n : 1, sizeof(Pending));
    if (!p) return no_memory(err);
    for (size_t i = 0; i < n; i++) {
        p[i].key = &keys[i];
        p[i].dtype = values[i].dtype;
        p[i].ndim = values[i].ndim;
        p[i].shape = values[i].shape;
        p[i].byte_len = values[i].byte_len;
        p[i].data = malloc(values[i].byte_len ? values[i].byte_len : 1);
        if (!p[i].data) { free_pending(p, n); return no_memory(err); }
        if (values[i].byte_len) memcpy(p[i].data, values[i].data, values[i].byte_len);
    }
    *out = p;
    return KV_OK;
}

/* The value an output of key receives: pending (this call) first, else stored. */
static int find_value(Store *s, const Pending *p, size_t np, const KvKey *key, uint32_t *dtype,
                      uint32_t *ndim, const int64_t **shape, const uint8_t **data) {
    for (size_t i = 0; i < np; i++) {
        if (p[i].key && same_key(p[i].key, key)) {
            *dtype = p[i].dtype; *ndim = p[i].ndim; *shape = p[i].shape; *data = p[i].data;
            return 1;
        }
    }
    Entry *e = find(s, key);
    if (!e) return 0;
    *dtype = e->dtype; *ndim = e->ndim; *shape = e->shape; *data = e->data;
    return 1;
}

/* Checks that every output has a value of its shape (key_source names the outputs' keys). */
static int32_t check_pull(Store *s, const Pending *p, size_t np, const KvKey *keys,
                          const KvTensor *outs, size_t n, uint32_t key_source, KvError *err) {
    for (size_t i = 0; i < n; i++) {
        int32_t rc = check_tensor(&outs[i], "output", i, err);
        if (rc) return rc;
        uint32_t dtype, ndim;
        const int64_t *shape;
        const uint8_t *data;
        if (!find_value(s, p, np, &keys[i], &dtype, &ndim, &shape, &data))
            return fail(err, KV_ERR_KEY_NOT_INITIALIZED, key_source, i,
                        "key has not been initialised (call init first)");
        if (!same_shape(ndim, shape, outs[i].ndim, outs[i].shape)) {
            set_shapes(err, shape, ndim, outs[i].shape, outs[i].ndim);
            return fail(err, KV_ERR_SHAPE_MISMATCH, key_source, i, "output %zu", i);
        }
    }
    return KV_OK;
}

/* Copies the stored values into the outputs, cast to each output's dtype. */
static void write_pull(Store *s, const KvKey *keys, const KvTensor *outs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        Entry *e = find(s, &keys[i]);
        size_t count = elements(&outs[i]);
        if (e->dtype == outs[i].dtype) {
            if (outs[i].byte_len) memcpy(outs[i].data, e->data, outs[i].byte_len);
        } else {
            for (size_t j = 0; j < count; j++)
                store_elem(outs[i].dtype, outs[i].data, j, load(e->dtype, e->data, j));
        }
    }
}

/* ---- the ABI functions ----------------------------------------------------------------- */

static KvStoreHandle sum_create(const uint8_t *name, size_t name_len, const KvOption *options,
                                size_t n_options, KvError *err) {
    (void)name; (void)name_len; (void)options;
    if (n_options > 0) {
        fail(err, KV_ERR_INVALID_ARGUMENT, KV_ERROR_KEY_NONE, 0,
             STORE_NAME " takes no options, got %zu", n_options);
        return NULL;
    }
    Store *s = calloc(1, sizeof(Store));
    if (!s) { no_memory(err); return NULL; }
    pthread_mutex_init(&s->lock, NULL);
    return s;
}

static void sum_destroy(KvStoreHandle store) {
    Store *s = store;
    if (!s) return;
    for (size_t i = 0; i < s->len; i++) {
        free(s->entries[i].str);
        free(s->entries[i].shape);
        free(s->entries[i].data);
    }
    free(s->entries);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

static size_t sum_type_name(KvStoreHandle store, uint8_t *buf, size_t cap) {
    (void)store;
    size_t len = strlen(STORE_NAME);
    if (buf && cap > 0) {
        size_t n = len < cap - 1 ? len : cap - 1;
        memcpy(buf, STORE_NAME, n);
        buf[n] = 0;
    }
    return len;
}

static uint64_t sum_rank(KvStoreHandle store) { (void)store; return 0; }
static uint64_t sum_num_workers(KvStoreHandle store) { (void)store; return 1; }

static int32_t sum_is_capable(KvStoreHandle store, uint32_t capability) {
    (void)store;
    return capability == KV_CAP_INIT_PUSH_PULL;
}

static int32_t sum_init(KvStoreHandle store, const KvKey *keys, const KvTensor *values, size_t n,
                        KvError *err) {
    Store *s = store;
    Pending *p = NULL;
    pthread_mutex_lock(&s->lock);
    int32_t rc = fresh(s, keys, values, n, &p, err);
    if (rc == KV_OK) rc = commit(s, p, n, err);
    pthread_mutex_unlock(&s->lock);
    if (p) free_pending(p, n);
    return rc;
}

static int32_t sum_push(KvStoreHandle store, const KvKey *keys, const KvTensor *values, size_t n,
                        int32_t priority, KvError *err) {
    (void)priority;
    Store *s = store;
    Pending *p = NULL;
    pthread_mutex_lock(&s->lock);
    int32_t rc = sums(s, keys, values, n, &p, err);
    if (rc == KV_OK) rc = commit(s, p, n, err);
    pthread_mutex_unlock(&s->lock);
    if (p) free_pending(p, n);
    return rc;
}

static int32_t sum_pull(KvStoreHandle store, const KvKey *keys, const KvTensor *outs, size_t n,
                        int32_t priority, KvError *err) {
    (void)priority;
    Store *s = store;
    pthread_mutex_lock(&s->lock);
    int32_t rc = check_pull(s, NULL, 0, keys, outs, n, KV_ERROR_KEY_OF_VALUES, err);
    if (rc == KV_OK) write_pull(s, keys, outs, n);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

static int32_t sum_pushpull(KvStoreHandle store, const KvKey *keys, const KvTensor *values,
                            size_t n, const KvKey *out_keys, const KvTensor *outs, size_t n_outs,
                            int32_t priority, KvError *err) {
    (void)priority;
    Store *s = store;
    Pending *p = NULL;
    pthread_mutex_lock(&s->lock);
    int32_t rc = sums(s, keys, values, n, &p, err);
    if (rc == KV_OK) rc = check_pull(s, p, n, out_keys, outs, n_outs, KV_ERROR_KEY_OF_OUTS, err);
    if (rc == KV_OK) rc = commit(s, p, n, err);
    if (rc == KV_OK) write_pull(s, out_keys, outs, n_outs);
    pthread_mutex_unlock(&s->lock);
    if (p) free_pending(p, n);
    return rc;
}

static int32_t sum_broadcast(KvStoreHandle store, const KvKey *keys, const KvTensor *values,
                             size_t n, const KvKey *out_keys, const KvTensor *outs, size_t n_outs,
                             int32_t priority, KvError *err) {
    (void)priority;
    Store *s = store;
    for (size_t i = 0; i < n; i++) {
        size_t count = 0;
        for (size_t j = 0; j < n; j++) count += same_key(&keys[i], &keys[j]);
        if (count != 1) {
            if (err) { err->count_expected = 1; err->count_found = count; }
            return fail(err, KV_ERR_COUNT_MISMATCH, KV_ERROR_KEY_OF_VALUES, i,
                        "value for the key (broadcast takes one value per key)");
        }
    }
    Pending *p = NULL;
    pthread_mutex_lock(&s->lock);
    int32_t rc = fresh(s, keys, values, n, &p, err);
    if (rc == KV_OK) rc = check_pull(s, p, n, out_keys, outs, n_outs, KV_ERROR_KEY_OF_OUTS, err);
    if (rc == KV_OK) rc = commit(s, p, n, err);
    if (rc == KV_OK) write_pull(s, out_keys, outs, n_outs);
    pthread_mutex_unlock(&s->lock);
    if (p) free_pending(p, n);
    return rc;
}

static const KvPluginDescriptor DESCRIPTOR = {
    .abi_version = KV_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(KvPluginDescriptor),
    .name = STORE_NAME,
    .capabilities = 1u << KV_CAP_INIT_PUSH_PULL,
    .create = sum_create,
    .destroy = sum_destroy,
    .type_name = sum_type_name,
    .rank = sum_rank,
    .num_workers = sum_num_workers,
    .is_capable = sum_is_capable,
    .init = sum_init,
    .push = sum_push,
    .pull = sum_pull,
    .pushpull = sum_pushpull,
    .broadcast = sum_broadcast,
    .set_optimizer = NULL, /* no optimizer: set_optimizer is unsupported */
    /* The functions appended in revision 1.1 (barrier, set_gradient_compression, the optimizer
     * states, send_command_to_servers, row_sparse_pull, init/push_row_sparse) are left NULL:
     * unsupported. */
};

const KvPluginDescriptor *kvstore_plugin_entry(void) { return &DESCRIPTOR; }
