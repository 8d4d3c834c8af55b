/* An emulated CUDA driver (libcuda), NCCL (libnccl) and NVRTC (libnvrtc) for the tests of the
 * host side of the `device` and `nccl` stores on machines without a GPU.
 *
 * Built by tests/emulated_driver/mod.rs after the kernel shim, the crate's kernel source and a
 * generated table of its kernels (KV_KERNELS, KV_KERNEL_COUNT, KV_SOURCE). "Device" memory is
 * host memory; kernels run as C++ on the CPU, every thread of the grid one after the other.
 *
 * It is strict where a GPU would fail or corrupt silently:
 * - every stream is a queue that runs only when something waits for it (a synchronize, an
 *   event waited on, a collective), so work that is not ordered after what it reads sees
 *   stale data, as on a GPU that happens to run it early;
 * - every copy, memset and kernel pointer argument is checked, when it runs, against the live
 *   allocations (use after free, overruns), and a kernel may only touch memory of its own GPU;
 * - freed memory is poisoned (0xFF bytes, NaN as float32) and new allocations too, so reads of
 *   freed or never-written memory show;
 * - an event may only be recorded on a stream of its own context; a stream may not wait on
 *   itself in a cycle; an NCCL collective must be joined by every rank of its communicators
 *   with the same arguments (on a GPU a missing rank waits forever), on the communicator's GPU,
 *   and NCCL refuses a device listed twice, as the real one does.
 * Grids run one thread after the other, last to first with KVSTORE_EMULATED_REVERSE=1.
 * A fault found while a queued operation runs cannot be returned to a caller: it is printed
 * and the process aborts. Everything runs under one lock.
 */
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdarg>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

namespace {

struct Ctx;

struct Stream {
    Ctx* ctx;
    std::deque<std::function<void()>> ops;
    unsigned long long enqueued = 0;
    unsigned long long executed = 0;
    bool draining = false;
    bool destroyed = false;
};

struct Ctx {
    int device;
    std::vector<Stream*> streams;
    Stream* legacy = nullptr;
};

struct Event {
    Ctx* ctx;
    Stream* stream = nullptr;
    unsigned long long target = 0;
    std::chrono::steady_clock::time_point when;
    bool destroyed = false;
};

struct Module {
    Ctx* ctx;
    std::string image;
};

struct Function {
    Ctx* ctx;
    const KvKernel* kernel;
};

struct Alloc {
    size_t size;
    Ctx* ctx;
    bool live;
};

std::recursive_mutex g_lock;
bool g_initialised = false;
int g_device_count = 0;
/* Threads of a grid run last to first (KVSTORE_EMULATED_REVERSE=1): a kernel whose threads
   depend on each other's order gives other results. */
bool g_reverse_threads = false;
std::vector<Ctx*> g_contexts;
std::map<uintptr_t, Alloc> g_allocs;
std::deque<std::pair<uintptr_t, size_t>> g_quarantine;
size_t g_quarantine_bytes = 0;
thread_local Ctx* t_current = nullptr;

[[noreturn]] void fault(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "\nemulated CUDA driver: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    fflush(stderr);
    abort();
}

const Alloc* find_alloc(uintptr_t p, uintptr_t* base) {
    auto it = g_allocs.upper_bound(p);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    if (p >= it->first + it->second.size) return nullptr;
    if (base) *base = it->first;
    return &it->second;
}

/* Checks, when an operation runs, that [p, p + n) lies in one live allocation. */
const Alloc* check_range(uintptr_t p, size_t n, const char* what) {
    uintptr_t base = 0;
    const Alloc* a = find_alloc(p, &base);
    if (!a) fault("%s: address 0x%llx is not GPU memory", what, (unsigned long long)p);
    if (!a->live) fault("%s: address 0x%llx was freed (use after free)", what, (unsigned long long)p);
    if (p + n > base + a->size)
        fault("%s: %zu bytes at offset %zu overrun an allocation of %zu bytes", what, n,
              (size_t)(p - base), a->size);
    return a;
}

void drain_to(Stream* s, unsigned long long target) {
    if (s->executed >= target) return;
    if (s->draining)
        fault("a stream waits for its own later work (a wait cycle: a GPU would hang)");
    s->draining = true;
    while (s->executed < target) {
        std::function<void()> op = std::move(s->ops.front());
        s->ops.pop_front();
        s->executed++;
        op();
    }
    s->draining = false;
}

void drain(Stream* s) { drain_to(s, s->enqueued); }

void drain_context(Ctx* c) {
    for (Stream* s : c->streams) drain(s);
}

void drain_all() {
    for (Ctx* c : g_contexts) drain_context(c);
}

void enqueue(Stream* s, std::function<void()> op) {
    s->ops.push_back(std::move(op));
    s->enqueued++;
}

Stream* new_stream(Ctx* c) {
    Stream* s = new Stream();
    s->ctx = c;
    c->streams.push_back(s);
    return s;
}

/* The stream a handle names: null is the current context's legacy stream. */
Stream* resolve(void* handle) {
    if (handle) return static_cast<Stream*>(handle);
    if (!t_current) return nullptr;
    if (!t_current->legacy) t_current->legacy = new_stream(t_current);
    return t_current->legacy;
}

void poison(uintptr_t p, size_t n) { memset(reinterpret_cast<void*>(p), 0xFF, n); }

/* Bytes after every allocation, filled with GUARD_BYTE: a kernel that writes past the end of
   its buffer changes them (on a GPU it would overwrite a neighbouring allocation of the pool). */
const size_t GUARD = 256;
const unsigned char GUARD_BYTE = 0xA5;

void check_guard(uintptr_t base, const Alloc& a, const char* what) {
    const unsigned char* g = reinterpret_cast<const unsigned char*>(base + a.size);
    for (size_t i = 0; i < GUARD; ++i)
        if (g[i] != GUARD_BYTE)
            fault("%s: wrote past the end of an allocation of %zu bytes (byte %zu after it)", what,
                  a.size, i);
}

/* Allocations this thread may still make before they fail with CUDA_ERROR_OUT_OF_MEMORY
   (-1: never), set by kvemu_fail_allocations_after. Per thread, so that the checks running
   beside the one that arms it are not disturbed. */
thread_local long long t_allocations_left = -1;

/* Bytes copied between the host and the GPUs at the calling thread's request
   (kvemu_host_copy_bytes). */
thread_local unsigned long long t_bytes_to_device = 0;
thread_local unsigned long long t_bytes_to_host = 0;

CUresult allocate(CUdeviceptr* out, size_t size, Ctx* ctx) {
    if (!out || !ctx) return CUDA_ERROR_INVALID_VALUE;
    if (size == 0) return CUDA_ERROR_INVALID_VALUE;
    if (t_allocations_left == 0) return CUDA_ERROR_OUT_OF_MEMORY;
    if (t_allocations_left > 0) t_allocations_left--;
    size_t rounded = (size + GUARD + 255) / 256 * 256;
    void* p = aligned_alloc(256, rounded);
    if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
    poison(reinterpret_cast<uintptr_t>(p), size);
    memset(static_cast<char*>(p) + size, GUARD_BYTE, rounded - size);
    g_allocs[reinterpret_cast<uintptr_t>(p)] = Alloc{size, ctx, true};
    *out = reinterpret_cast<uintptr_t>(p);
    return CUDA_SUCCESS;
}

void release(uintptr_t p) {
    Alloc& a = g_allocs[p];
    if (!a.live) fault("free of 0x%llx, already freed (double free)", (unsigned long long)p);
    check_guard(p, a, "a freed allocation");
    a.live = false;
    poison(p, a.size);
    /* Freed memory stays mapped (and poisoned) for a while so that late uses are caught. */
    g_quarantine.emplace_back(p, a.size);
    g_quarantine_bytes += a.size;
    while (g_quarantine_bytes > (256u << 20)) {
        auto old = g_quarantine.front();
        g_quarantine.pop_front();
        g_quarantine_bytes -= old.second;
        g_allocs.erase(old.first);
        free(reinterpret_cast<void*>(old.first));
    }
}

CUresult check_live_start(CUdeviceptr p) {
    auto it = g_allocs.find(p);
    if (it == g_allocs.end() || !it->second.live) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

const KvKernel* find_kernel(const char* name) {
    for (size_t i = 0; i < KV_KERNEL_COUNT; ++i)
        if (strcmp(KV_KERNELS[i].name, name) == 0) return &KV_KERNELS[i];
    return nullptr;
}

}  // namespace

#define LOCK std::lock_guard<std::recursive_mutex> guard(g_lock)
#define API extern "C" __attribute__((visibility("default")))

/* ---- control of the emulation (not part of CUDA) ------------------------------------------- */

/* After `n` more allocations of the calling thread, every allocation of it fails with
   CUDA_ERROR_OUT_OF_MEMORY, until called again (n < 0: allocations never fail). */
API void kvemu_fail_allocations_after(long long n) { t_allocations_left = n < 0 ? -1 : n; }

/* Bytes the calling thread has asked to copy from the host to a GPU (`to_device` != 0) or
   from a GPU to the host, since its last call with `reset` != 0. */
API unsigned long long kvemu_host_copy_bytes(int to_device, int reset) {
    unsigned long long& count = to_device ? t_bytes_to_device : t_bytes_to_host;
    unsigned long long n = count;
    if (reset) count = 0;
    return n;
}

/* ---- initialisation, devices, contexts ---------------------------------------------------- */

API CUresult cuInit(unsigned int) {
    LOCK;
    if (!g_initialised) {
        const char* n = getenv("KVSTORE_EMULATED_GPUS");
        g_device_count = n ? atoi(n) : 1;
        const char* reverse = getenv("KVSTORE_EMULATED_REVERSE");
        g_reverse_threads = reverse && strcmp(reverse, "1") == 0;
        for (int d = 0; d < g_device_count; ++d) g_contexts.push_back(new Ctx{d, {}, nullptr});
        g_initialised = true;
    }
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 12080;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int* count) {
    LOCK;
    if (!g_initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    *count = g_device_count;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* dev, int ordinal) {
    LOCK;
    if (!g_initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
    LOCK;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "Emulated GPU %d (no hardware)", dev);
    return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = (size_t)16 << 30;
    return CUDA_SUCCESS;
}

API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    if (free_bytes) *free_bytes = (size_t)16 << 30;
    if (total) *total = (size_t)16 << 30;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice dev) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    switch (attribute) {
        case 1: *value = 1024; break;   /* MAX_THREADS_PER_BLOCK */
        case 2: *value = 1024; break;   /* MAX_BLOCK_DIM_X */
        case 5: *value = 2147483647; break; /* MAX_GRID_DIM_X */
        case 16: *value = 8; break;     /* MULTIPROCESSOR_COUNT */
        case 41: *value = 1; break;     /* UNIFIED_ADDRESSING */
        case 75: *value = 9; break;     /* COMPUTE_CAPABILITY_MAJOR */
        case 76: *value = 0; break;     /* COMPUTE_CAPABILITY_MINOR */
        case 115: *value = 1; break;    /* MEMORY_POOLS_SUPPORTED */
        default: *value = 0; break;
    }
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice dev) {
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    memset(uuid, 0, 16);
    uuid[0] = (unsigned char)dev;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice dev) { return cuDeviceGetUuid(uuid, dev); }

API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice dev) {
    LOCK;
    if (!g_initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = g_contexts[dev];
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetCurrent(void* ctx) {
    t_current = static_cast<Ctx*>(ctx);
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(void** ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = t_current;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetDevice(CUdevice* dev) {
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
    *dev = t_current->device;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize(void) {
    LOCK;
    if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
    drain_context(t_current);
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return CUDA_SUCCESS;
}

/* Peer access: every pair of distinct GPUs may have it, but the GPU named by
   KVSTORE_EMULATED_NO_PEER_ACCESS (as a GPU across a slow link). */
namespace {
std::map<std::pair<Ctx*, Ctx*>, bool> g_peer_enabled;

bool peer_capable(int a, int b) {
    const char* none = getenv("KVSTORE_EMULATED_NO_PEER_ACCESS");
    int cut = none ? atoi(none) : -1;
    return a != b && a != cut && b != cut;
}
}  // namespace

API CUresult cuDeviceCanAccessPeer(int* can, CUdevice dev, CUdevice peer) {
    LOCK;
    if (!can) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g_device_count || peer < 0 || peer >= g_device_count)
        return CUDA_ERROR_INVALID_DEVICE;
    *can = peer_capable(dev, peer) ? 1 : 0;
    return CUDA_SUCCESS;
}

API CUresult cuCtxEnablePeerAccess(void* peer, unsigned int flags) {
    LOCK;
    Ctx* other = static_cast<Ctx*>(peer);
    if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
    if (!other || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if (!peer_capable(t_current->device, other->device)) return 217; /* PEER_ACCESS_UNSUPPORTED */
    bool& on = g_peer_enabled[{t_current, other}];
    if (on) return 704; /* PEER_ACCESS_ALREADY_ENABLED */
    on = true;
    return CUDA_SUCCESS;
}

API CUresult cuCtxDisablePeerAccess(void* peer) {
    LOCK;
    Ctx* other = static_cast<Ctx*>(peer);
    if (!t_current || !other) return CUDA_ERROR_INVALID_CONTEXT;
    bool& on = g_peer_enabled[{t_current, other}];
    if (!on) return 705; /* PEER_ACCESS_NOT_ENABLED */
    on = false;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetFlags(unsigned int) { return CUDA_SUCCESS; }
API CUresult cuCtxSetLimit(int, size_t) { return CUDA_SUCCESS; }
API CUresult cuCtxGetLimit(size_t* value, int) {
    if (value) *value = 0;
    return CUDA_SUCCESS;
}
API CUresult cuCtxSetCacheConfig(int) { return CUDA_SUCCESS; }
API CUresult cuCtxGetCacheConfig(int* config) {
    if (config) *config = 0;
    return CUDA_SUCCESS;
}

/* ---- errors -------------------------------------------------------------------------------- */

namespace {
/* The errors the emulation returns: code, name, text. */
struct ErrorInfo {
    CUresult code;
    const char* name;
    const char* text;
};
const ErrorInfo ERRORS[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {217, "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED", "peer access is not supported between these two devices"},
    {704, "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED", "peer access is already enabled"},
    {705, "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED", "peer access has not been enabled"},
};

const ErrorInfo* error_info(CUresult error) {
    for (const ErrorInfo& e : ERRORS)
        if (e.code == error) return &e;
    return nullptr;
}
}  // namespace

API CUresult cuGetErrorString(CUresult error, const char** text) {
    if (!text) return CUDA_ERROR_INVALID_VALUE;
    const ErrorInfo* e = error_info(error);
    *text = e ? e->text : "unknown error";
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorName(CUresult error, const char** text) {
    if (!text) return CUDA_ERROR_INVALID_VALUE;
    const ErrorInfo* e = error_info(error);
    *text = e ? e->name : "CUDA_ERROR_UNKNOWN";
    return CUDA_SUCCESS;
}

/* ---- streams and events -------------------------------------------------------------------- */

API CUresult cuStreamCreate(void** stream, unsigned int) {
    LOCK;
    if (!stream) return CUDA_ERROR_INVALID_VALUE;
    if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
    *stream = new_stream(t_current);
    return CUDA_SUCCESS;
}

API CUresult cuStreamCreateWithPriority(void** stream, unsigned int flags, int) {
    return cuStreamCreate(stream, flags);
}

API CUresult cuStreamDestroy_v2(void* handle) {
    LOCK;
    Stream* s = static_cast<Stream*>(handle);
    if (!s || s->destroyed) return CUDA_ERROR_INVALID_HANDLE;
    /* As CUDA: queued work still completes. The object stays, for waits that name it. */
    drain(s);
    s->destroyed = true;
    return CUDA_SUCCESS;
}

API CUresult cuStreamSynchronize(void* handle) {
    LOCK;
    Stream* s = resolve(handle);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    drain(s);
    return CUDA_SUCCESS;
}

API CUresult cuStreamQuery(void* handle) { return cuStreamSynchronize(handle); }

API CUresult cuEventCreate(void** event, unsigned int) {
    LOCK;
    if (!event) return CUDA_ERROR_INVALID_VALUE;
    if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
    Event* e = new Event();
    e->ctx = t_current;
    *event = e;
    return CUDA_SUCCESS;
}

API CUresult cuEventDestroy_v2(void* handle) {
    LOCK;
    Event* e = static_cast<Event*>(handle);
    if (!e || e->destroyed) return CUDA_ERROR_INVALID_HANDLE;
    e->destroyed = true; /* kept: a queued record may still name it */
    return CUDA_SUCCESS;
}

API CUresult cuEventRecord(void* event, void* stream) {
    LOCK;
    Event* e = static_cast<Event*>(event);
    Stream* s = resolve(stream);
    if (!e || e->destroyed || !s) return CUDA_ERROR_INVALID_HANDLE;
    /* CUDA refuses to record an event on a stream of another context. */
    if (e->ctx != s->ctx) return CUDA_ERROR_INVALID_HANDLE;
    e->stream = s;
    e->target = s->enqueued + 1;
    enqueue(s, [e] { e->when = std::chrono::steady_clock::now(); });
    return CUDA_SUCCESS;
}

API CUresult cuStreamWaitEvent(void* stream, void* event, unsigned int) {
    LOCK;
    Stream* s = resolve(stream);
    Event* e = static_cast<Event*>(event);
    if (!s || !e || e->destroyed) return CUDA_ERROR_INVALID_HANDLE;
    if (!e->stream) return CUDA_SUCCESS; /* never recorded: nothing to wait for */
    Stream* other = e->stream;
    unsigned long long target = e->target;
    enqueue(s, [other, target] { drain_to(other, target); });
    return CUDA_SUCCESS;
}

API CUresult cuEventSynchronize(void* event) {
    LOCK;
    Event* e = static_cast<Event*>(event);
    if (!e || e->destroyed) return CUDA_ERROR_INVALID_HANDLE;
    if (e->stream) drain_to(e->stream, e->target);
    return CUDA_SUCCESS;
}

API CUresult cuEventQuery(void* event) { return cuEventSynchronize(event); }

API CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    LOCK;
    Event* a = static_cast<Event*>(start);
    Event* b = static_cast<Event*>(end);
    if (!ms || !a || !b || !a->stream || !b->stream) return CUDA_ERROR_INVALID_HANDLE;
    drain_to(a->stream, a->target);
    drain_to(b->stream, b->target);
    *ms = std::chrono::duration<float, std::milli>(b->when - a->when).count();
    return CUDA_SUCCESS;
}

API CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
    return cuEventElapsedTime(ms, start, end);
}

API CUresult cuLaunchHostFunc(void* stream, void (*fn)(void*), void* data) {
    LOCK;
    Stream* s = resolve(stream);
    if (!s || !fn) return CUDA_ERROR_INVALID_VALUE;
    enqueue(s, [fn, data] { fn(data); });
    return CUDA_SUCCESS;
}

/* ---- memory -------------------------------------------------------------------------------- */

/* Page-locked host memory: host memory whose copies to a device read it when they run, not
   when they are queued (as a DMA engine does), so a buffer rewritten before its copy was
   waited for shows. Start -> size. */
static std::map<uintptr_t, size_t> g_page_locked;

static bool is_page_locked(const void* p, size_t n) {
    auto start = reinterpret_cast<uintptr_t>(p);
    auto it = g_page_locked.upper_bound(start);
    if (it == g_page_locked.begin()) return false;
    --it;
    return start + n <= it->first + it->second;
}

API CUresult cuMemHostAlloc(void** out, size_t size, unsigned int) {
    LOCK;
    if (!out || size == 0) return CUDA_ERROR_INVALID_VALUE;
    *out = std::malloc(size);
    if (!*out) return CUDA_ERROR_OUT_OF_MEMORY;
    g_page_locked[reinterpret_cast<uintptr_t>(*out)] = size;
    return CUDA_SUCCESS;
}

API CUresult cuMemFreeHost(void* p) {
    LOCK;
    if (!g_page_locked.erase(reinterpret_cast<uintptr_t>(p))) return CUDA_ERROR_INVALID_VALUE;
    drain_all(); /* as cuMemFreeHost: queued copies that name it are done first */
    std::free(p);
    return CUDA_SUCCESS;
}

API CUresult cuMemAlloc_v2(CUdeviceptr* out, size_t size) {
    LOCK;
    return allocate(out, size, t_current);
}

API CUresult cuMemAllocAsync(CUdeviceptr* out, size_t size, void* stream) {
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    return allocate(out, size, s->ctx);
}

API CUresult cuMemFree_v2(CUdeviceptr p) {
    LOCK;
    if (check_live_start(p) != CUDA_SUCCESS) return CUDA_ERROR_INVALID_VALUE;
    drain_all(); /* cuMemFree waits for the device */
    release(p);
    return CUDA_SUCCESS;
}

API CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) {
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    if (check_live_start(p) != CUDA_SUCCESS) return CUDA_ERROR_INVALID_VALUE;
    enqueue(s, [p] { release(p); });
    return CUDA_SUCCESS;
}

API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char value, size_t n, void* stream) {
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    enqueue(s, [p, value, n] {
        check_range(p, n, "cuMemsetD8Async");
        memset(reinterpret_cast<void*>(p), value, n);
    });
    return CUDA_SUCCESS;
}

API CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char value, size_t n) {
    LOCK;
    drain_all();
    check_range(p, n, "cuMemsetD8");
    memset(reinterpret_cast<void*>(p), value, n);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    if (n && !src) return CUDA_ERROR_INVALID_VALUE;
    t_bytes_to_device += n;
    if (is_page_locked(src, n)) {
        enqueue(s, [dst, src, n] {
            check_range(dst, n, "cuMemcpyHtoDAsync (destination)");
            memcpy(reinterpret_cast<void*>(dst), src, n);
        });
        return CUDA_SUCCESS;
    }
    /* Pageable host memory is staged when the call is made, as CUDA does. */
    auto staged = std::make_shared<std::string>(static_cast<const char*>(src), n);
    enqueue(s, [dst, staged] {
        check_range(dst, staged->size(), "cuMemcpyHtoDAsync (destination)");
        memcpy(reinterpret_cast<void*>(dst), staged->data(), staged->size());
    });
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    if (n && !dst) return CUDA_ERROR_INVALID_VALUE;
    t_bytes_to_host += n;
    enqueue(s, [dst, src, n] {
        check_range(src, n, "cuMemcpyDtoHAsync (source)");
        memcpy(dst, reinterpret_cast<const void*>(src), n);
    });
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    enqueue(s, [dst, src, n] {
        check_range(src, n, "cuMemcpyDtoDAsync (source)");
        check_range(dst, n, "cuMemcpyDtoDAsync (destination)");
        memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    });
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyPeerAsync(CUdeviceptr dst, void* dst_ctx, CUdeviceptr src, void* src_ctx,
                               size_t n, void* stream) {
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    enqueue(s, [dst, dst_ctx, src, src_ctx, n] {
        const Alloc* a = check_range(src, n, "cuMemcpyPeerAsync (source)");
        const Alloc* b = check_range(dst, n, "cuMemcpyPeerAsync (destination)");
        if (a->ctx != src_ctx || b->ctx != dst_ctx)
            fault("cuMemcpyPeerAsync: a pointer is not in the context named with it");
        memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    });
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    LOCK;
    drain_all();
    check_range(dst, n, "cuMemcpyHtoD (destination)");
    t_bytes_to_device += n;
    memcpy(reinterpret_cast<void*>(dst), src, n);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    LOCK;
    drain_all();
    check_range(src, n, "cuMemcpyDtoH (source)");
    t_bytes_to_host += n;
    memcpy(dst, reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    LOCK;
    drain_all();
    check_range(src, n, "cuMemcpyDtoD (source)");
    check_range(dst, n, "cuMemcpyDtoD (destination)");
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}

/* ---- modules and kernels ------------------------------------------------------------------- */

/* Whether an image is machine code (an ELF cubin) rather than PTX text. */
static bool is_cubin(const std::string& image) { return image.compare(0, 4, "\x7f" "ELF") == 0; }

/* The bytes of a module image: PTX up to its NUL, a cubin (ELF64) up to the end of its section
   or program header table, whichever is last. */
static std::string image_bytes(const void* image) {
    const char* p = static_cast<const char*>(image);
    if (memcmp(p, "\x7f" "ELF", 4) != 0) return std::string(p);
    unsigned long long phoff = 0, shoff = 0;
    unsigned short phentsize = 0, phnum = 0, shentsize = 0, shnum = 0;
    memcpy(&phoff, p + 0x20, 8);
    memcpy(&shoff, p + 0x28, 8);
    memcpy(&phentsize, p + 0x36, 2);
    memcpy(&phnum, p + 0x38, 2);
    memcpy(&shentsize, p + 0x3A, 2);
    memcpy(&shnum, p + 0x3C, 2);
    size_t size = std::max<size_t>(64, std::max(phoff + size_t(phentsize) * phnum,
                                                shoff + size_t(shentsize) * shnum));
    return std::string(p, size);
}

/* Machine code is refused with KVSTORE_EMULATED_REJECT_CUBIN=1, as a driver that does not know
   the cubin's architecture or ELF version refuses it: the runtime must fall back to PTX. */
API CUresult cuModuleLoadData(void** module, const void* image) {
    LOCK;
    if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
    if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
    std::string bytes = image_bytes(image);
    const char* reject = getenv("KVSTORE_EMULATED_REJECT_CUBIN");
    if (is_cubin(bytes) && reject && strcmp(reject, "1") == 0) return CUDA_ERROR_INVALID_IMAGE;
    *module = new Module{t_current, bytes};
    return CUDA_SUCCESS;
}

API CUresult cuModuleUnload(void* module) {
    if (!module) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS; /* kept: functions of it may still be queued */
}

API CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
    LOCK;
    Module* m = static_cast<Module*>(module);
    if (!function || !m || !name) return CUDA_ERROR_INVALID_VALUE;
    const KvKernel* k = find_kernel(name);
    /* The PTX must declare the entry, a cubin's string table must name it (NVRTC's output
       does; a stale image would not). */
    std::string entry = is_cubin(m->image) ? std::string(1, '\0') + name + '\0'
                                           : std::string(".entry ") + name + "(";
    if (!k || m->image.find(entry) == std::string::npos) return CUDA_ERROR_NOT_FOUND;
    *function = new Function{m->ctx, k};
    return CUDA_SUCCESS;
}

API CUresult cuFuncGetAttribute(int* value, int, void*) {
    if (value) *value = 0;
    return CUDA_SUCCESS;
}
API CUresult cuFuncSetAttribute(void*, int, int) { return CUDA_SUCCESS; }
API CUresult cuFuncSetCacheConfig(void*, int) { return CUDA_SUCCESS; }

API CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned shared, void* stream,
                            void** params, void** extra) {
    LOCK;
    Function* f = static_cast<Function*>(function);
    Stream* s = resolve(stream);
    if (!f || !s) return CUDA_ERROR_INVALID_HANDLE;
    /* A function runs only in the context its module was loaded in. */
    if (f->ctx != s->ctx) return CUDA_ERROR_INVALID_HANDLE;
    if (gx == 0 || bx == 0 || bx > 1024 || gy != 1 || gz != 1 || by != 1 || bz != 1)
        return CUDA_ERROR_INVALID_VALUE;
    if (shared != 0 || extra || (f->kernel->nargs && !params)) return CUDA_ERROR_INVALID_VALUE;
    const KvKernel* k = f->kernel;
    auto args = std::make_shared<std::string>();
    for (size_t i = 0; i < k->nargs; ++i) {
        if (!params[i]) return CUDA_ERROR_INVALID_VALUE;
        args->append(static_cast<const char*>(params[i]), k->sizes[i]);
    }
    Ctx* ctx = s->ctx;
    enqueue(s, [k, args, gx, bx, ctx] {
        size_t off = 0;
        for (size_t i = 0; i < k->nargs; ++i) {
            if (k->is_pointer[i]) {
                uintptr_t p = 0;
                memcpy(&p, args->data() + off, sizeof p);
                if (p) {
                    std::string what = std::string("kernel ") + k->name + " argument " +
                                       std::to_string(i);
                    const Alloc* a = check_range(p, 1, what.c_str());
                    if (a->ctx != ctx)
                        fault("%s: memory of gpu(%d) used by a kernel on gpu(%d)", what.c_str(),
                              a->ctx->device, ctx->device);
                }
            }
            off += k->sizes[i];
        }
        k->run(reinterpret_cast<const unsigned char*>(args->data()), gx, bx, g_reverse_threads);
        off = 0;
        for (size_t i = 0; i < k->nargs; ++i) {
            if (k->is_pointer[i]) {
                uintptr_t p = 0, base = 0;
                memcpy(&p, args->data() + off, sizeof p);
                const Alloc* a = p ? find_alloc(p, &base) : nullptr;
                if (a) {
                    std::string what = std::string("kernel ") + k->name + " argument " +
                                       std::to_string(i);
                    check_guard(base, *a, what.c_str());
                }
            }
            off += k->sizes[i];
        }
    });
    return CUDA_SUCCESS;
}

/* ---- NCCL ---------------------------------------------------------------------------------- */

typedef int ncclResult_t;
enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
};

namespace {

struct Clique;

struct Comm {
    Clique* clique;
    int rank;
    int device;
    bool destroyed;
};

struct Clique {
    std::vector<Comm*> ranks;
};

enum CollectiveKind { kBroadcast, kReduce, kAllReduce };

struct Call {
    CollectiveKind kind;
    const void* send;
    void* recv;
    size_t count;
    int dtype;
    int op;
    int root;
    Comm* comm;
    Stream* stream;
};

thread_local int t_group_depth = 0;
thread_local std::vector<Call> t_group;
thread_local std::string t_nccl_error;

ncclResult_t nccl_fail(ncclResult_t code, const std::string& message) {
    t_nccl_error = message;
    fprintf(stderr, "emulated NCCL: %s\n", message.c_str());
    return code;
}

size_t dtype_size(int dtype) {
    switch (dtype) {
        case 0: case 1: return 1;   /* int8, uint8 */
        case 2: case 3: return 4;   /* int32, uint32 */
        case 4: case 5: return 8;   /* int64, uint64 */
        case 7: return 4;           /* float32 */
        case 8: return 8;           /* float64 */
        default: return 0;          /* float16, bfloat16, fp8: not emulated */
    }
}

template <typename T>
void sum_into(std::vector<T>& acc, const void* src, size_t count, bool first) {
    const T* v = static_cast<const T*>(src);
    for (size_t i = 0; i < count; ++i) acc[i] = first ? v[i] : T(acc[i] + v[i]);
}

template <typename T>
void reduce_typed(const std::vector<const Call*>& calls, std::vector<char>& out) {
    size_t count = calls[0]->count;
    std::vector<T> acc(count);
    for (size_t r = 0; r < calls.size(); ++r) sum_into(acc, calls[r]->send, count, r == 0);
    memcpy(out.data(), acc.data(), count * sizeof(T));
}

/* Runs one collective whose every rank's call is in `calls` (index = rank). */
ncclResult_t run_collective(const std::vector<const Call*>& calls) {
    const Call& c0 = *calls[0];
    size_t bytes = c0.count * dtype_size(c0.dtype);
    for (const Call* c : calls) drain(c->stream);
    for (const Call* c : calls) {
        int dev = c->comm->device;
        std::string who = "rank " + std::to_string(c->comm->rank) + " (gpu(" +
                          std::to_string(dev) + "))";
        bool reads = c0.kind != kBroadcast || c->comm->rank == c0.root;
        bool writes = c0.kind != kReduce || c->comm->rank == c0.root;
        if (reads) {
            const Alloc* a = check_range((uintptr_t)c->send, bytes, ("NCCL send buffer of " + who).c_str());
            if (a->ctx->device != dev)
                return nccl_fail(ncclInvalidArgument, "the send buffer of " + who + " is on another GPU");
        }
        if (writes) {
            const Alloc* a = check_range((uintptr_t)c->recv, bytes, ("NCCL receive buffer of " + who).c_str());
            if (a->ctx->device != dev)
                return nccl_fail(ncclInvalidArgument, "the receive buffer of " + who + " is on another GPU");
        }
    }
    std::vector<char> result(bytes);
    if (c0.kind == kBroadcast) {
        memcpy(result.data(), calls[c0.root]->send, bytes);
    } else {
        switch (c0.dtype) {
            case 0: reduce_typed<signed char>(calls, result); break;
            case 1: reduce_typed<unsigned char>(calls, result); break;
            case 2: reduce_typed<int>(calls, result); break;
            case 3: reduce_typed<unsigned>(calls, result); break;
            case 4: reduce_typed<long long>(calls, result); break;
            case 5: reduce_typed<unsigned long long>(calls, result); break;
            case 7: reduce_typed<float>(calls, result); break;
            case 8: reduce_typed<double>(calls, result); break;
        }
    }
    for (const Call* c : calls) {
        bool writes = c0.kind != kReduce || c->comm->rank == c0.root;
        if (writes) memcpy(c->recv, result.data(), bytes);
    }
    return ncclSuccess;
}

/* Matches the calls of a group into collectives: the k-th call of every rank of a clique. */
ncclResult_t run_group(std::vector<Call> calls) {
    std::map<Clique*, std::vector<std::vector<const Call*>>> by_clique;
    for (const Call& c : calls) {
        auto& ranks = by_clique[c.comm->clique];
        ranks.resize(c.comm->clique->ranks.size());
        ranks[c.comm->rank].push_back(&c);
    }
    for (auto& entry : by_clique) {
        auto& ranks = entry.second;
        size_t n = ranks[0].size();
        for (size_t r = 0; r < ranks.size(); ++r) {
            if (ranks[r].size() != n)
                return nccl_fail(ncclInvalidUsage,
                                 "rank " + std::to_string(r) + " issued " +
                                     std::to_string(ranks[r].size()) + " collective(s), rank 0 " +
                                     std::to_string(n) + ": on GPUs the others would wait forever");
        }
        for (size_t k = 0; k < n; ++k) {
            std::vector<const Call*> one;
            for (auto& calls_of_rank : ranks) one.push_back(calls_of_rank[k]);
            const Call& a = *one[0];
            for (const Call* b : one) {
                if (b->kind != a.kind || b->count != a.count || b->dtype != a.dtype ||
                    b->op != a.op || b->root != a.root)
                    return nccl_fail(ncclInvalidUsage,
                                     "the ranks of a collective disagree on its kind, count, type, "
                                     "operation or root: on GPUs this hangs or corrupts");
            }
            ncclResult_t r = run_collective(one);
            if (r != ncclSuccess) return r;
        }
    }
    return ncclSuccess;
}

ncclResult_t submit(const Call& call) {
    if (!call.comm || call.comm->destroyed) return nccl_fail(ncclInvalidArgument, "no communicator");
    if (!call.stream) return nccl_fail(ncclInvalidArgument, "no stream");
    if (call.stream->ctx->device != call.comm->device)
        return nccl_fail(ncclInvalidArgument,
                         "a stream of gpu(" + std::to_string(call.stream->ctx->device) +
                             ") given to the communicator of gpu(" +
                             std::to_string(call.comm->device) + ")");
    if (dtype_size(call.dtype) == 0)
        return nccl_fail(ncclInvalidArgument, "data type " + std::to_string(call.dtype) + " is not emulated");
    if (call.kind != kBroadcast && call.op != 0)
        return nccl_fail(ncclInvalidArgument, "only the sum is emulated");
    int n = (int)call.comm->clique->ranks.size();
    if (call.kind != kAllReduce && (call.root < 0 || call.root >= n))
        return nccl_fail(ncclInvalidArgument, "root " + std::to_string(call.root) + " out of range");
    t_group.push_back(call);
    if (t_group_depth > 0) return ncclSuccess;
    std::vector<Call> calls;
    calls.swap(t_group);
    return run_group(std::move(calls));
}

}  // namespace

API ncclResult_t ncclGetVersion(int* version) {
    if (!version) return ncclInvalidArgument;
    *version = 22800;
    return ncclSuccess;
}

API const char* ncclGetErrorString(ncclResult_t result) {
    switch (result) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        default: return "unknown result code";
    }
}

API const char* ncclGetLastError(void*) { return t_nccl_error.c_str(); }

API ncclResult_t ncclCommInitAll(void** comms, int ndev, const int* devlist) {
    LOCK;
    if (!comms || ndev < 1) return nccl_fail(ncclInvalidArgument, "ncclCommInitAll: no device");
    std::vector<int> devices;
    for (int i = 0; i < ndev; ++i) {
        int d = devlist ? devlist[i] : i;
        if (d < 0 || d >= g_device_count)
            return nccl_fail(ncclInvalidArgument, "ncclCommInitAll: no gpu(" + std::to_string(d) + ")");
        if (std::find(devices.begin(), devices.end(), d) != devices.end())
            return nccl_fail(ncclInvalidUsage, "Duplicate GPU detected: gpu(" + std::to_string(d) + ")");
        devices.push_back(d);
    }
    Clique* clique = new Clique();
    for (int i = 0; i < ndev; ++i) {
        Comm* c = new Comm{clique, i, devices[i], false};
        clique->ranks.push_back(c);
        comms[i] = c;
    }
    return ncclSuccess;
}

API ncclResult_t ncclCommDestroy(void* comm) {
    LOCK;
    Comm* c = static_cast<Comm*>(comm);
    if (!c || c->destroyed) return ncclInvalidArgument;
    c->destroyed = true;
    return ncclSuccess;
}

API ncclResult_t ncclCommAbort(void* comm) { return ncclCommDestroy(comm); }
API ncclResult_t ncclCommFinalize(void* comm) { return comm ? ncclSuccess : ncclInvalidArgument; }

API ncclResult_t ncclCommCount(const void* comm, int* count) {
    const Comm* c = static_cast<const Comm*>(comm);
    if (!c || !count) return ncclInvalidArgument;
    *count = (int)c->clique->ranks.size();
    return ncclSuccess;
}

API ncclResult_t ncclCommCuDevice(const void* comm, int* device) {
    const Comm* c = static_cast<const Comm*>(comm);
    if (!c || !device) return ncclInvalidArgument;
    *device = c->device;
    return ncclSuccess;
}

API ncclResult_t ncclCommUserRank(const void* comm, int* rank) {
    const Comm* c = static_cast<const Comm*>(comm);
    if (!c || !rank) return ncclInvalidArgument;
    *rank = c->rank;
    return ncclSuccess;
}

API ncclResult_t ncclGroupStart() {
    t_group_depth++;
    return ncclSuccess;
}

API ncclResult_t ncclGroupEnd() {
    LOCK;
    if (t_group_depth == 0) return nccl_fail(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--t_group_depth > 0) return ncclSuccess;
    std::vector<Call> calls;
    calls.swap(t_group);
    return run_group(std::move(calls));
}

API ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, int dtype, int root,
                               void* comm, void* stream) {
    LOCK;
    return submit(Call{kBroadcast, send, recv, count, dtype, 0, root, static_cast<Comm*>(comm),
                       resolve(stream)});
}

API ncclResult_t ncclReduce(const void* send, void* recv, size_t count, int dtype, int op,
                            int root, void* comm, void* stream) {
    LOCK;
    return submit(Call{kReduce, send, recv, count, dtype, op, root, static_cast<Comm*>(comm),
                       resolve(stream)});
}

API ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op,
                               void* comm, void* stream) {
    LOCK;
    return submit(Call{kAllReduce, send, recv, count, dtype, op, 0, static_cast<Comm*>(comm),
                       resolve(stream)});
}

/* ---- NVRTC (used only where no real libnvrtc is found) ------------------------------------- */

namespace {
struct Program {
    std::string source;
    std::string ptx;
    std::string cubin;
    std::string log;
};
}  // namespace

API int nvrtcCreateProgram(void** prog, const char* src, const char*, int, const char* const*,
                           const char* const*) {
    if (!prog || !src) return 3; /* NVRTC_ERROR_INVALID_INPUT */
    *prog = new Program{src, "", ""};
    return 0;
}

/* "Compiles" the crate's own kernel source only, and only without fused multiply-add (the
   kernels' arithmetic is checked for that setting). */
API int nvrtcCompileProgram(void* prog, int count, const char* const* options) {
    Program* p = static_cast<Program*>(prog);
    if (!p) return 5; /* NVRTC_ERROR_INVALID_PROGRAM */
    bool no_fma = false, machine_code = false;
    for (int i = 0; i < count; ++i) {
        if (strcmp(options[i], "--fmad=false") == 0) no_fma = true;
        if (strncmp(options[i], "--gpu-architecture=sm_", 22) == 0) machine_code = true;
    }
    if (p->source != KV_SOURCE) {
        p->log = "emulated NVRTC: only the kernel source it was built with can be compiled";
        return 6; /* NVRTC_ERROR_COMPILATION */
    }
    if (!no_fma) {
        p->log = "emulated NVRTC: the kernels must be compiled with --fmad=false";
        return 6;
    }
    p->ptx = "// emulated PTX\n";
    for (size_t i = 0; i < KV_KERNEL_COUNT; ++i)
        p->ptx += std::string(".visible .entry ") + KV_KERNELS[i].name + "(\n)\n";
    if (machine_code) {
        /* An ELF64 header (no sections), then the kernels' names as a string table. */
        std::string names(1, '\0');
        for (size_t i = 0; i < KV_KERNEL_COUNT; ++i) names += std::string(KV_KERNELS[i].name) + '\0';
        p->cubin.assign(64, '\0');
        memcpy(&p->cubin[0], "\x7f" "ELF\x02\x01\x01", 7);
        unsigned long long end = 64 + names.size();
        memcpy(&p->cubin[0x28], &end, 8); /* e_shoff: where the (empty) section table starts */
        p->cubin += names;
    }
    return 0;
}

API int nvrtcGetCUBINSize(void* prog, size_t* size) {
    Program* p = static_cast<Program*>(prog);
    if (!p || !size) return 3;
    *size = p->cubin.size();
    return 0;
}

API int nvrtcGetCUBIN(void* prog, char* out) {
    Program* p = static_cast<Program*>(prog);
    if (!p || !out) return 3;
    memcpy(out, p->cubin.data(), p->cubin.size());
    return 0;
}

API int nvrtcGetPTXSize(void* prog, size_t* size) {
    Program* p = static_cast<Program*>(prog);
    if (!p || !size) return 3;
    *size = p->ptx.size() + 1;
    return 0;
}

API int nvrtcGetPTX(void* prog, char* out) {
    Program* p = static_cast<Program*>(prog);
    if (!p || !out) return 3;
    memcpy(out, p->ptx.c_str(), p->ptx.size() + 1);
    return 0;
}

API int nvrtcGetProgramLogSize(void* prog, size_t* size) {
    Program* p = static_cast<Program*>(prog);
    if (!p || !size) return 3;
    *size = p->log.size() + 1;
    return 0;
}

API int nvrtcGetProgramLog(void* prog, char* out) {
    Program* p = static_cast<Program*>(prog);
    if (!p || !out) return 3;
    memcpy(out, p->log.c_str(), p->log.size() + 1);
    return 0;
}

API int nvrtcDestroyProgram(void** prog) {
    if (!prog) return 3;
    delete static_cast<Program*>(*prog);
    *prog = nullptr;
    return 0;
}

API const char* nvrtcGetErrorString(int result) {
    return result == 0 ? "NVRTC_SUCCESS" : "NVRTC_ERROR (emulated)";
}

API int nvrtcVersion(int* major, int* minor) {
    if (major) *major = 12;
    if (minor) *minor = 8;
    return 0;
}
