// The CUDA driver API as cudarc 0.19 calls it, for one emulated device.
//
// Streams execute synchronously: a launch or copy is complete when its call
// returns, so its error is returned by that call (a GPU would report a
// kernel fault at the next synchronization). Calls the emulator does not
// implement are exported by stubs.cpp (generated) and return
// CUDA_ERROR_NOT_SUPPORTED.
//
// Stream capture (cuStreamBeginCapture_v2 .. cuStreamEndCapture) records
// the work enqueued on the capturing stream instead of running it: kernel
// launches (with their parameter bytes copied at capture time, as CUDA
// does), memsets, device-to-device copies, copies from page-locked host
// memory (read or written when the graph runs, as a graph's memcpy node
// does) and event records. A graph is a list of those nodes in stream
// order; cuGraphLaunch runs them in that order. What CUDA forbids during a
// capture fails the call and invalidates the capture (see capture_fail).
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <sstream>
#include <thread>

#include "runtime.h"

namespace kemu {

namespace {
thread_local std::string t_detail;
thread_local int t_detail_code = -1;

uint64_t env_u64(const char* name, uint64_t fallback) {
    const char* v = getenv(name);
    if (!v || !*v) return fallback;
    char* end;
    unsigned long long x = strtoull(v, &end, 0);
    if (*end) {
        fprintf(stderr, "kemu: %s=%s is not a number; using %llu\n", name, v, (unsigned long long)fallback);
        return fallback;
    }
    return x;
}
}  // namespace

Result fail(Result code, const std::string& msg) {
    t_detail = msg;
    t_detail_code = code;
    if (!config().quiet) fprintf(stderr, "kemu: error %d: %s\n", (int)code, msg.c_str());
    return code;
}

const char* last_detail(int code) { return code == t_detail_code ? t_detail.c_str() : nullptr; }

const Config& config() {
    static const Config c = [] {
        Config c;
        const char* order = getenv("KEMU_ORDER");
        std::string o = order ? order : "forward";
        if (o == "forward") c.order = Order::Forward;
        else if (o == "reverse") c.order = Order::Reverse;
        else if (o == "random") c.order = Order::Random;
        else fprintf(stderr, "kemu: KEMU_ORDER=%s is not forward, reverse or random; using forward\n", order);
        c.seed = env_u64("KEMU_SEED", 1);
        const char* cc = getenv("KEMU_COMPUTE_CAPABILITY");
        if (cc && *cc) {
            int major = 0, minor = 0;
            if (sscanf(cc, "%d.%d", &major, &minor) == 2 && major >= 7) {
                c.major = major;
                c.minor = minor;
            } else {
                fprintf(stderr, "kemu: KEMU_COMPUTE_CAPABILITY=%s is not MAJOR.MINOR (>= 7.0); using 9.0\n", cc);
            }
        }
        c.multiprocessors = (int)env_u64("KEMU_SMS", 4);
        if (c.multiprocessors < 1) c.multiprocessors = 1;
        c.memory_bytes = env_u64("KEMU_MEMORY_MIB", 8192) << 20;
        unsigned hw = std::thread::hardware_concurrency();
        c.workers = (unsigned)env_u64("KEMU_WORKERS", hw ? hw : 2);
        if (c.workers < 1) c.workers = 1;
#if defined(KEMU_MEMCHECK)
        c.memcheck = true;
#endif
        c.quiet = env_u64("KEMU_QUIET", 0) != 0;
        return c;
    }();
    return c;
}

const char* device_name() {
    static const std::string n = [] {
        std::ostringstream s;
        s << "kestrel emulated CUDA device (CPU, not a GPU; sm_" << config().major << config().minor
          << (config().memcheck ? ", memcheck" : "") << ")";
        return s.str();
    }();
    return n.c_str();
}

}  // namespace kemu

using namespace kemu;

namespace {

struct Context {
    int device = 0;
    int refs = 0;
};
struct Event {
    std::chrono::steady_clock::time_point t{};
    bool recorded = false;
    bool timing = true;
    // The capture sequence that last recorded it (0: none), so that a wait
    // inside a capture can tell an event of its own sequence from one
    // recorded outside it.
    uint64_t capture_id = 0;
    // The stream it was last recorded on outside a capture (its id, 0: none
    // or the legacy stream) and how many deferred copies that stream had
    // been given then: waiting for the event completes those.
    uint64_t stream_id = 0;
    uint64_t seq = 0;
};

// A cuMemcpyHtoDAsync from page-locked memory not yet performed (see
// "deferred copies" below): `seq` counts the stream's deferred copies.
struct Deferred {
    uint64_t dst = 0, src = 0;
    size_t bytes = 0;
    uint64_t seq = 0;
};

// One unit of captured work.
struct Node {
    enum Kind { Kernel, Copy, Memset, EventRecord } kind = Kernel;
    std::string what;  // for messages: the call or kernel that made it
    // Kernel
    Function* f = nullptr;
    LaunchShape shape{};
    std::vector<std::vector<unsigned char>> params;
    // Copy (memmove of `bytes`; host sides are page-locked allocations)
    uint64_t dst = 0, src = 0;
    size_t bytes = 0;
    // Memset: `count` elements of `elem` bytes (1, 2, 4) set to `value`
    unsigned value = 0, elem = 1;
    size_t count = 0;
    // EventRecord
    Event* event = nullptr;
};
struct Graph {
    std::vector<Node> nodes;
};
struct GraphExec {
    std::vector<Node> nodes;
};

// CUstreamCaptureStatus and CUstreamCaptureMode.
enum CaptureStatus { CAPTURE_NONE = 0, CAPTURE_ACTIVE = 1, CAPTURE_INVALIDATED = 2 };
enum CaptureMode { MODE_GLOBAL = 0, MODE_THREAD_LOCAL = 1, MODE_RELAXED = 2 };

struct Stream {
    Context* ctx;
    int capture = CAPTURE_NONE;
    int mode = MODE_GLOBAL;
    std::thread::id thread;   // the thread that began the capture
    uint64_t capture_id = 0;  // this capture sequence's id (unique, from 1)
    Graph* graph = nullptr;   // the nodes recorded so far
    std::string invalidated_by;
    uint64_t id = 0;                 // unique, from 1 (events name their stream by it)
    std::vector<Deferred> deferred;  // in stream order (guarded by g_defer_m)
    uint64_t enqueued = 0;           // deferred copies given so far
};

Context g_primary;
std::mutex g_ctx_m;
bool g_initialized = false;
thread_local Context* t_current = nullptr;

constexpr int DRIVER_VERSION = 12020;

Result need_init() { return g_initialized ? OK : fail(ERR_NOT_INITIALIZED, "cuInit has not been called"); }

Result check_device(int dev) {
    if (Result r = need_init()) return r;
    return dev == 0 ? OK : fail(ERR_INVALID_DEVICE, "device " + std::to_string(dev) + " requested; the emulator has one");
}

Result check_range(const char* call, uint64_t ptr, size_t bytes) {
    if (bytes == 0 || mem_valid(ptr, bytes)) return OK;
    std::ostringstream e;
    e << call << ": [0x" << std::hex << ptr << ", +" << std::dec << bytes
      << " bytes) is not inside one live device allocation";
    return fail(ERR_INVALID_VALUE, e.str());
}

int attribute(int a) {
    const Config& c = config();
    switch (a) {
        case 1: return 1024;             // MAX_THREADS_PER_BLOCK
        case 2: return 1024;             // MAX_BLOCK_DIM_X
        case 3: return 1024;             // MAX_BLOCK_DIM_Y
        case 4: return 64;               // MAX_BLOCK_DIM_Z
        case 5: return 2147483647;       // MAX_GRID_DIM_X
        case 6: return 65535;            // MAX_GRID_DIM_Y
        case 7: return 65535;            // MAX_GRID_DIM_Z
        case 8: return 48 * 1024;        // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: return 64 * 1024;        // TOTAL_CONSTANT_MEMORY
        case 10: return 32;              // WARP_SIZE
        case 11: return 2147483647;      // MAX_PITCH
        case 12: return 65536;           // MAX_REGISTERS_PER_BLOCK
        case 13: return 1000000;         // CLOCK_RATE (kHz)
        case 14: return 512;             // TEXTURE_ALIGNMENT
        case 15: return 1;               // GPU_OVERLAP
        case 16: return c.multiprocessors;  // MULTIPROCESSOR_COUNT
        case 19: return 1;               // CAN_MAP_HOST_MEMORY
        case 20: return 0;               // COMPUTE_MODE default
        case 31: return 1;               // CONCURRENT_KERNELS
        case 36: return 1000000;         // MEMORY_CLOCK_RATE
        case 37: return 64;              // GLOBAL_MEMORY_BUS_WIDTH
        case 38: return 4 << 20;         // L2_CACHE_SIZE
        case 39: return 2048;            // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: return 1;               // ASYNC_ENGINE_COUNT
        case 41: return 1;               // UNIFIED_ADDRESSING
        case 75: return c.major;         // COMPUTE_CAPABILITY_MAJOR
        case 76: return c.minor;         // COMPUTE_CAPABILITY_MINOR
        case 81: return 228 * 1024;      // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 82: return 65536;           // MAX_REGISTERS_PER_MULTIPROCESSOR
        case 97: return 227 * 1024;      // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 106: return 32;             // MAX_BLOCKS_PER_MULTIPROCESSOR
        case 115: return 1;              // MEMORY_POOLS_SUPPORTED
        default: return 0;
    }
}

}  // namespace

// ---- errors --------------------------------------------------------------------

static const char* error_name(int e) {
    switch (e) {
        case 0: return "CUDA_SUCCESS";
        case 1: return "CUDA_ERROR_INVALID_VALUE";
        case 2: return "CUDA_ERROR_OUT_OF_MEMORY";
        case 3: return "CUDA_ERROR_NOT_INITIALIZED";
        case 100: return "CUDA_ERROR_NO_DEVICE";
        case 101: return "CUDA_ERROR_INVALID_DEVICE";
        case 200: return "CUDA_ERROR_INVALID_IMAGE";
        case 201: return "CUDA_ERROR_INVALID_CONTEXT";
        case 218: return "CUDA_ERROR_INVALID_PTX";
        case 400: return "CUDA_ERROR_INVALID_HANDLE";
        case 401: return "CUDA_ERROR_ILLEGAL_STATE";
        case 500: return "CUDA_ERROR_NOT_FOUND";
        case 600: return "CUDA_ERROR_NOT_READY";
        case 700: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case 701: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case 710: return "CUDA_ERROR_ASSERT";
        case 719: return "CUDA_ERROR_LAUNCH_FAILED";
        case 801: return "CUDA_ERROR_NOT_SUPPORTED";
        case 900: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case 901: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case 903: return "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED";
        case 905: return "CUDA_ERROR_STREAM_CAPTURE_ISOLATION";
        case 908: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
    }
    return nullptr;
}

static const char* error_text(int e) {
    switch (e) {
        case 0: return "no error";
        case 1: return "invalid argument";
        case 2: return "out of memory";
        case 3: return "initialization error";
        case 100: return "no CUDA-capable device is detected";
        case 101: return "invalid device ordinal";
        case 200: return "device kernel image is invalid";
        case 201: return "invalid device context";
        case 218: return "a PTX JIT compilation failed";
        case 400: return "invalid resource handle";
        case 401: return "the operation cannot be performed in the present state";
        case 500: return "named symbol not found";
        case 600: return "device not ready";
        case 700: return "an illegal memory access was encountered";
        case 701: return "too many resources requested for launch";
        case 710: return "device-side assert triggered";
        case 719: return "unspecified launch failure";
        case 801: return "operation not supported";
        case 900: return "operation not permitted when stream is capturing";
        case 901: return "operation failed due to a previous error during capture";
        case 903: return "capture was not initiated in this stream";
        case 905: return "operation would make the legacy stream depend on a capturing blocking stream";
        case 908: return "attempt to terminate a thread-local capture sequence from another thread";
    }
    return nullptr;
}

KEMU_API int cuGetErrorName(int e, const char** out) {
    if (!out) return ERR_INVALID_VALUE;
    const char* n = error_name(e);
    if (!n) {
        *out = nullptr;
        return ERR_INVALID_VALUE;
    }
    *out = n;
    return OK;
}

// The text of the code, followed by what the emulator found when this thread
// last failed with it (which kernel, which rule, which source line).
KEMU_API int cuGetErrorString(int e, const char** out) {
    if (!out) return ERR_INVALID_VALUE;
    const char* t = error_text(e);
    if (!t) {
        *out = nullptr;
        return ERR_INVALID_VALUE;
    }
    thread_local std::string buf;
    const char* d = last_detail(e);
    if (d) {
        buf = std::string(t) + " [emulated device: " + d + "]";
        *out = buf.c_str();
    } else {
        *out = t;
    }
    return OK;
}

// ---- init, devices ----------------------------------------------------------------

KEMU_API int cuInit(unsigned flags) {
    if (flags != 0) return fail(ERR_INVALID_VALUE, "cuInit: flags must be 0");
    g_initialized = true;
    return OK;
}

KEMU_API int cuDriverGetVersion(int* v) {
    if (!v) return ERR_INVALID_VALUE;
    *v = DRIVER_VERSION;
    return OK;
}

KEMU_API int cuDeviceGetCount(int* n) {
    if (Result r = need_init()) return r;
    if (!n) return ERR_INVALID_VALUE;
    *n = 1;
    return OK;
}

KEMU_API int cuDeviceGet(int* dev, int ordinal) {
    if (Result r = check_device(ordinal)) return r;
    if (!dev) return ERR_INVALID_VALUE;
    *dev = ordinal;
    return OK;
}

KEMU_API int cuDeviceGetName(char* name, int len, int dev) {
    if (Result r = check_device(dev)) return r;
    if (!name || len <= 0) return ERR_INVALID_VALUE;
    snprintf(name, (size_t)len, "%s", device_name());
    return OK;
}

KEMU_API int cuDeviceGetAttribute(int* v, int attr, int dev) {
    if (Result r = check_device(dev)) return r;
    if (!v) return ERR_INVALID_VALUE;
    if (attr < 1 || attr > 140) return fail(ERR_INVALID_VALUE, "cuDeviceGetAttribute: unknown attribute " + std::to_string(attr));
    *v = attribute(attr);
    return OK;
}

KEMU_API int cuDeviceComputeCapability(int* major, int* minor, int dev) {
    if (Result r = check_device(dev)) return r;
    if (!major || !minor) return ERR_INVALID_VALUE;
    *major = config().major;
    *minor = config().minor;
    return OK;
}

KEMU_API int cuDeviceTotalMem_v2(size_t* bytes, int dev) {
    if (Result r = check_device(dev)) return r;
    if (!bytes) return ERR_INVALID_VALUE;
    *bytes = config().memory_bytes;
    return OK;
}

KEMU_API int cuDeviceGetUuid(unsigned char* uuid, int dev) {
    if (Result r = check_device(dev)) return r;
    if (!uuid) return ERR_INVALID_VALUE;
    const char tag[16] = {'k', 'e', 's', 't', 'r', 'e', 'l', '-', 'e', 'm', 'u', 'l', 'a', 't', 'e', 'd'};
    memcpy(uuid, tag, 16);
    return OK;
}
KEMU_API int cuDeviceGetUuid_v2(unsigned char* uuid, int dev) { return cuDeviceGetUuid(uuid, dev); }

// ---- contexts -----------------------------------------------------------------------

KEMU_API int cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    if (Result r = check_device(dev)) return r;
    if (!ctx) return ERR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_ctx_m);
    ++g_primary.refs;
    *ctx = &g_primary;
    return OK;
}

KEMU_API int cuDevicePrimaryCtxRelease_v2(int dev) {
    if (Result r = check_device(dev)) return r;
    std::lock_guard<std::mutex> g(g_ctx_m);
    if (g_primary.refs > 0) --g_primary.refs;
    return OK;
}

KEMU_API int cuDevicePrimaryCtxGetState(int dev, unsigned* flags, int* active) {
    if (Result r = check_device(dev)) return r;
    if (flags) *flags = 0;
    if (active) *active = g_primary.refs > 0;
    return OK;
}

KEMU_API int cuCtxSetCurrent(void* ctx) {
    if (ctx && ctx != &g_primary) return fail(ERR_INVALID_CONTEXT, "cuCtxSetCurrent: unknown context");
    t_current = static_cast<Context*>(ctx);
    return OK;
}

KEMU_API int cuCtxGetCurrent(void** ctx) {
    if (!ctx) return ERR_INVALID_VALUE;
    *ctx = t_current;
    return OK;
}

KEMU_API int cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
KEMU_API int cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) *ctx = t_current;
    t_current = nullptr;
    return OK;
}

KEMU_API int cuCtxGetDevice(int* dev) {
    if (!t_current) return fail(ERR_INVALID_CONTEXT, "cuCtxGetDevice: no current context");
    if (!dev) return ERR_INVALID_VALUE;
    *dev = 0;
    return OK;
}

KEMU_API int cuCtxSynchronize(void);

KEMU_API int cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return OK;
}

KEMU_API int cuCtxSetLimit(int, size_t) { return OK; }
KEMU_API int cuCtxGetLimit(size_t* v, int) {
    if (!v) return ERR_INVALID_VALUE;
    *v = 0;
    return OK;
}
KEMU_API int cuCtxGetCacheConfig(int* c) {
    if (c) *c = 0;
    return OK;
}
KEMU_API int cuCtxSetCacheConfig(int) { return OK; }
KEMU_API int cuCtxGetApiVersion(void*, unsigned* v) {
    if (!v) return ERR_INVALID_VALUE;
    *v = 3020;
    return OK;
}

// ---- stream capture: state and rules -----------------------------------------------------

namespace {

std::mutex g_capture_m;                // guards every Stream's capture fields and the sets below
std::vector<Stream*> g_capturing;      // streams with a capture sequence in progress
std::vector<Graph*> g_graphs;          // live graphs (cuStreamEndCapture .. cuGraphDestroy)
std::vector<GraphExec*> g_execs;       // live executable graphs
std::vector<std::pair<uintptr_t, size_t>> g_pinned;  // page-locked host allocations
uint64_t g_next_capture_id = 1;

template <class T>
bool contains(const std::vector<T>& v, const T& x) {
    return std::find(v.begin(), v.end(), x) != v.end();
}

// Whether [p, p + bytes) lies inside one page-locked host allocation: the
// only host memory a captured copy may touch (CUDA refuses pageable memory
// in a capture, since the copy runs when the graph does, not now).
bool pinned(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> g(g_capture_m);
    const uintptr_t a = (uintptr_t)p;
    for (auto& r : g_pinned)
        if (a >= r.first && a + bytes <= r.first + r.second) return true;
    return false;
}

Stream* as_stream(void* s) { return (uintptr_t)s > 2 ? static_cast<Stream*>(s) : nullptr; }

// The stream if it has a capture sequence in progress (active or
// invalidated), else null.
Stream* capturing(void* s) {
    Stream* st = as_stream(s);
    if (!st) return nullptr;
    std::lock_guard<std::mutex> g(g_capture_m);
    return st->capture != CAPTURE_NONE ? st : nullptr;
}

// An illegal operation during a capture: CUDA fails the call and
// invalidates the capture sequence (cuStreamEndCapture then returns no
// graph and CUDA_ERROR_STREAM_CAPTURE_INVALIDATED).
Result capture_fail(Stream* st, Result code, const std::string& msg) {
    {
        std::lock_guard<std::mutex> g(g_capture_m);
        if (st->capture == CAPTURE_ACTIVE) {
            st->capture = CAPTURE_INVALIDATED;
            st->invalidated_by = msg;
        }
    }
    return fail(code, msg + " (the capture sequence is invalidated)");
}

// Records `n` into `st`'s capture, or fails when the sequence is already
// invalidated.
Result capture_node(Stream* st, Node&& n) {
    std::lock_guard<std::mutex> g(g_capture_m);
    if (st->capture == CAPTURE_INVALIDATED)
        return fail(ERR_STREAM_CAPTURE_INVALIDATED,
                    n.what + ": the capture sequence on this stream was invalidated by: " + st->invalidated_by);
    st->graph->nodes.push_back(std::move(n));
    return OK;
}

// A "potentially unsafe" call (synchronous allocation, free, copy, memset,
// context synchronization): CUDA refuses it while any global-mode capture
// is in progress, or a thread-local one begun by this thread, and
// invalidates those captures; relaxed captures allow it.
Result unsafe_call(const char* call) {
    std::vector<Stream*> hit;
    {
        std::lock_guard<std::mutex> g(g_capture_m);
        for (Stream* st : g_capturing)
            if (st->mode == MODE_GLOBAL || (st->mode == MODE_THREAD_LOCAL && st->thread == std::this_thread::get_id()))
                hit.push_back(st);
    }
    if (hit.empty()) return OK;
    for (Stream* st : hit) capture_fail(st, ERR_STREAM_CAPTURE_UNSUPPORTED, std::string(call) + " during a stream capture");
    return fail(ERR_STREAM_CAPTURE_UNSUPPORTED,
                std::string(call) + ": not permitted while a stream is capturing (global or this thread's "
                                    "thread-local mode); the capture sequence is invalidated");
}

Result run_node(const Node& n);
Result do_copy(const char* call, uint64_t dst, bool dst_dev, uint64_t src, bool src_dev, size_t bytes);

// ---- deferred copies from page-locked memory -----------------------------------------------
//
// On a GPU, a cuMemcpyHtoDAsync from page-locked memory is a DMA that runs
// at some time after the call, in its stream's order: until something says
// it is done, the host must not rewrite its source and no other stream may
// read its destination. Run at the call, as everything else here is, it
// would hide a missing wait. So such a copy on a stream of the program's
// own that is not capturing is deferred: it reads its source only when that
// stream is next synchronized with (cuStreamSynchronize, cuStreamQuery,
// cuCtxSynchronize, cuEventSynchronize or cuEventQuery of an event recorded
// on it after the copy, cuStreamWaitEvent by another stream on such an
// event) or when the stream's next operation is enqueued (a launch, copy,
// memset, stream-ordered allocation or free, graph launch, capture begin):
// the latest moments a GPU could have completed it. A free of any memory
// (cuMemFree*, cuMemFreeHost) completes every deferred copy first, so that
// none reads or writes freed memory. A deferred copy's error (a destination
// freed meanwhile) is returned by the call that completes it.

std::mutex g_defer_m;         // guards g_streams and every Stream's deferred copies
std::vector<Stream*> g_streams;  // live streams
uint64_t g_next_stream_id = 1;
// Held while deferred copies are taken out and performed, so that a settle
// never returns while another thread is still performing copies it took
// out: without it, one test's free (which settles every stream) could take
// another test's copy out of its stream's list, and that test's
// cuStreamWaitEvent, finding the list empty, let a device-to-device copy
// read the landing buffer while the host-to-device copy was still writing
// it (seen once in CI: gpu_upload's first 601 bytes still zero).
// Recursive: a settle may be reached again from within one.
std::recursive_mutex g_settle_m;

// Performs `st`'s deferred copies numbered up to `upto`, in order.
Result settle(Stream* st, uint64_t upto = UINT64_MAX) {
    if (!st) return OK;
    std::lock_guard<std::recursive_mutex> settling(g_settle_m);
    std::vector<Deferred> due;
    {
        std::lock_guard<std::mutex> g(g_defer_m);
        auto end = st->deferred.begin();
        while (end != st->deferred.end() && end->seq <= upto) ++end;
        due.assign(st->deferred.begin(), end);
        st->deferred.erase(st->deferred.begin(), end);
    }
    Result first = OK;
    for (const Deferred& c : due) {
        // The destination may have been freed since the call: reported
        // now, as CUDA reports an asynchronous error.
        Result r = do_copy("cuMemcpyHtoDAsync (deferred copy from page-locked memory)", c.dst, true, c.src, false,
                           c.bytes);
        if (r && !first) first = r;
    }
    return first;
}

// The deferred copies an event stands for (those of its stream up to its record).
Result settle_event(const Event* ev) {
    Stream* st = nullptr;
    uint64_t upto = 0;
    {
        std::lock_guard<std::mutex> g(g_defer_m);
        if (!ev->stream_id) return OK;
        for (Stream* x : g_streams)
            if (x->id == ev->stream_id) st = x;
        upto = ev->seq;
    }
    return settle(st, upto);
}

Result settle_all() {
    std::vector<Stream*> all;
    {
        std::lock_guard<std::mutex> g(g_defer_m);
        all = g_streams;
    }
    Result first = OK;
    for (Stream* st : all) {
        Result r = settle(st);
        if (r && !first) first = r;
    }
    return first;
}

}  // namespace

// ---- streams and events ---------------------------------------------------------------

static Result check_stream(const char* call, void* s) {
    // 0 is the legacy default stream; 1 and 2 the per-thread/legacy handles.
    if ((uintptr_t)s <= 2) return t_current ? OK : fail(ERR_INVALID_CONTEXT, std::string(call) + ": no current context");
    return OK;
}

KEMU_API int cuStreamCreate(void** s, unsigned) {
    if (!s) return ERR_INVALID_VALUE;
    if (!t_current) return fail(ERR_INVALID_CONTEXT, "cuStreamCreate: no current context");
    auto* st = new Stream;
    st->ctx = t_current;
    {
        std::lock_guard<std::mutex> g(g_defer_m);
        st->id = g_next_stream_id++;
        g_streams.push_back(st);
    }
    *s = st;
    return OK;
}
KEMU_API int cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
KEMU_API int cuStreamDestroy_v2(void* s) {
    if (Stream* st = as_stream(s)) {
        // CUDA lets the stream's work finish after the call returns.
        Result r = settle(st);
        {
            std::lock_guard<std::mutex> g(g_defer_m);
            g_streams.erase(std::remove(g_streams.begin(), g_streams.end(), st), g_streams.end());
        }
        if (r) return r;
        std::lock_guard<std::mutex> g(g_capture_m);
        // A capture left open dies with its stream.
        g_capturing.erase(std::remove(g_capturing.begin(), g_capturing.end(), st), g_capturing.end());
        delete st->graph;
        delete st;
    }
    return OK;
}
// Waiting for a capturing stream would wait for work that has not run.
KEMU_API int cuStreamSynchronize(void* s) {
    if (Stream* st = capturing(s))
        return capture_fail(st, ERR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamSynchronize on a capturing stream");
    if (Result r = check_stream("cuStreamSynchronize", s)) return r;
    return settle(as_stream(s));
}
// "Done" (CUDA_SUCCESS) is what it says, so its deferred copies are done.
KEMU_API int cuStreamQuery(void* s) {
    if (Stream* st = capturing(s))
        return capture_fail(st, ERR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamQuery on a capturing stream");
    if (Result r = check_stream("cuStreamQuery", s)) return r;
    return settle(as_stream(s));
}
KEMU_API int cuStreamWaitEvent(void* s, void* e, unsigned) {
    if (Stream* st = capturing(s)) {
        // Inside a capture a wait is a dependency on a node of the same
        // sequence; one on an event recorded outside it would join the
        // graph to work that is not in it.
        auto* ev = static_cast<Event*>(e);
        if (!ev) return ERR_INVALID_HANDLE;
        if (ev->capture_id != st->capture_id)
            return capture_fail(st, ERR_STREAM_CAPTURE_ISOLATION,
                                "cuStreamWaitEvent: the event was not recorded in this capture sequence");
        return OK;  // stream order already follows the record
    }
    if (Result r = check_stream("cuStreamWaitEvent", s)) return r;
    auto* ev = static_cast<Event*>(e);
    if (!ev) return ERR_INVALID_HANDLE;
    // Work after the wait sees what the event stands for: another stream's
    // deferred copies up to its record (the own stream's are in order anyway).
    Stream* st = as_stream(s);
    if (st && ev->stream_id == st->id) return OK;
    return settle_event(ev);
}

KEMU_API int cuStreamBeginCapture_v2(void* s, int mode) {
    if (!t_current) return fail(ERR_INVALID_CONTEXT, "cuStreamBeginCapture: no current context");
    if ((uintptr_t)s <= 1) return fail(ERR_INVALID_VALUE, "cuStreamBeginCapture: the legacy stream cannot be captured");
    if ((uintptr_t)s == 2)
        return fail(ERR_NOT_SUPPORTED, "cuStreamBeginCapture: capturing the per-thread default stream is not emulated");
    if (mode < MODE_GLOBAL || mode > MODE_RELAXED)
        return fail(ERR_INVALID_VALUE, "cuStreamBeginCapture: unknown capture mode " + std::to_string(mode));
    Stream* st = static_cast<Stream*>(s);
    // Work enqueued before the capture is not part of it.
    if (capturing(s) == nullptr)
        if (Result r = settle(st)) return r;
    std::lock_guard<std::mutex> g(g_capture_m);
    if (st->capture != CAPTURE_NONE)
        return fail(ERR_ILLEGAL_STATE, "cuStreamBeginCapture: the stream is already capturing");
    st->capture = CAPTURE_ACTIVE;
    st->mode = mode;
    st->thread = std::this_thread::get_id();
    st->capture_id = g_next_capture_id++;
    st->graph = new Graph;
    st->invalidated_by.clear();
    g_capturing.push_back(st);
    return OK;
}

KEMU_API int cuStreamEndCapture(void* s, void** graph) {
    if (!graph) return ERR_INVALID_VALUE;
    *graph = nullptr;
    Stream* st = as_stream(s);
    std::lock_guard<std::mutex> g(g_capture_m);
    if (!st || st->capture == CAPTURE_NONE)
        return fail(ERR_ILLEGAL_STATE, "cuStreamEndCapture: the stream is not capturing");
    if (st->mode != MODE_RELAXED && st->thread != std::this_thread::get_id())
        return fail(ERR_STREAM_CAPTURE_WRONG_THREAD,
                    "cuStreamEndCapture: a global or thread-local capture must end on the thread that began it");
    g_capturing.erase(std::remove(g_capturing.begin(), g_capturing.end(), st), g_capturing.end());
    const bool invalid = st->capture == CAPTURE_INVALIDATED;
    st->capture = CAPTURE_NONE;
    st->capture_id = 0;
    Graph* gr = st->graph;
    st->graph = nullptr;
    if (invalid) {
        delete gr;
        return fail(ERR_STREAM_CAPTURE_INVALIDATED,
                    "cuStreamEndCapture: the capture was invalidated by: " + st->invalidated_by);
    }
    g_graphs.push_back(gr);
    *graph = gr;
    return OK;
}

KEMU_API int cuStreamIsCapturing(void* s, int* status) {
    if (!status) return ERR_INVALID_VALUE;
    Stream* st = as_stream(s);
    std::lock_guard<std::mutex> g(g_capture_m);
    *status = st ? st->capture : CAPTURE_NONE;
    return OK;
}

KEMU_API int cuEventCreate(void** e, unsigned flags) {
    if (!e) return ERR_INVALID_VALUE;
    auto* ev = new Event;
    ev->timing = !(flags & 0x2);  // CU_EVENT_DISABLE_TIMING
    *e = ev;
    return OK;
}
KEMU_API int cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return OK;
}
KEMU_API int cuEventRecord(void* e, void* s) {
    if (!e) return ERR_INVALID_HANDLE;
    auto* ev = static_cast<Event*>(e);
    if (Stream* st = capturing(s)) {
        Node n;
        n.kind = Node::EventRecord;
        n.what = "cuEventRecord";
        n.event = ev;
        if (Result r = capture_node(st, std::move(n))) return r;
        ev->capture_id = st->capture_id;
        std::lock_guard<std::mutex> g(g_defer_m);
        ev->stream_id = 0;
        return OK;
    }
    ev->t = std::chrono::steady_clock::now();
    ev->recorded = true;
    ev->capture_id = 0;
    std::lock_guard<std::mutex> g(g_defer_m);
    Stream* st = as_stream(s);
    ev->stream_id = st ? st->id : 0;
    ev->seq = st ? st->enqueued : 0;
    return OK;
}
KEMU_API int cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
KEMU_API int cuEventSynchronize(void* e) { return e ? settle_event(static_cast<Event*>(e)) : ERR_INVALID_HANDLE; }
// "Done" (CUDA_SUCCESS) is what it says, so the copies it stands for are done.
KEMU_API int cuEventQuery(void* e) { return e ? settle_event(static_cast<Event*>(e)) : ERR_INVALID_HANDLE; }
// Host time between the records: an emulated timing, never a GPU figure.
KEMU_API int cuEventElapsedTime(float* ms, void* start, void* end) {
    if (!ms || !start || !end) return ERR_INVALID_VALUE;
    auto* a = static_cast<Event*>(start);
    auto* b = static_cast<Event*>(end);
    if (!a->timing || !b->timing) return fail(ERR_INVALID_HANDLE, "cuEventElapsedTime: an event was created with timing disabled");
    if (!a->recorded || !b->recorded) return fail(ERR_NOT_READY, "cuEventElapsedTime: an event was never recorded");
    *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
    return OK;
}
KEMU_API int cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

// ---- memory ----------------------------------------------------------------------------

namespace {
Result do_alloc(uint64_t* p, size_t bytes) {
    if (!p) return ERR_INVALID_VALUE;
    if (!t_current) return fail(ERR_INVALID_CONTEXT, "cuMemAlloc: no current context");
    Result r;
    *p = mem_alloc(bytes, &r);
    return r;
}
Result do_copy(const char* call, uint64_t dst, bool dst_dev, uint64_t src, bool src_dev, size_t bytes) {
    if (dst_dev)
        if (Result r = check_range((std::string(call) + " (destination)").c_str(), dst, bytes)) return r;
    if (src_dev)
        if (Result r = check_range((std::string(call) + " (source)").c_str(), src, bytes)) return r;
    if (bytes) memmove((void*)dst, (const void*)src, bytes);
    return OK;
}
Result do_memset(const char* call, uint64_t dst, unsigned v, unsigned elem, size_t n) {
    if (dst % elem)
        return fail(ERR_INVALID_VALUE, std::string(call) + ": destination not " + std::to_string(elem) + "-byte aligned");
    if (Result r = check_range(call, dst, n * elem)) return r;
    if (elem == 1 && n) memset((void*)dst, (int)v, n);
    if (elem == 2)
        for (size_t i = 0; i < n; ++i) ((unsigned short*)dst)[i] = (unsigned short)v;
    if (elem == 4)
        for (size_t i = 0; i < n; ++i) ((unsigned*)dst)[i] = v;
    return OK;
}

// An async copy on `s`: recorded when `s` captures (its host side, if any,
// must be page-locked), else run now.
Result copy_on(const char* call, void* s, uint64_t dst, bool dst_dev, uint64_t src, bool src_dev, size_t bytes) {
    if (Result r = check_stream(call, s)) return r;
    Stream* st = capturing(s);
    if (!st) {
        if (Result r = settle(as_stream(s))) return r;
        return do_copy(call, dst, dst_dev, src, src_dev, bytes);
    }
    if ((!dst_dev && !pinned((const void*)dst, bytes)) || (!src_dev && !pinned((const void*)src, bytes)))
        return capture_fail(st, ERR_STREAM_CAPTURE_UNSUPPORTED,
                            std::string(call) + ": a copy from or to pageable host memory during a stream capture "
                                                "(only page-locked memory can be copied when the graph runs)");
    if (dst_dev)
        if (Result r = check_range((std::string(call) + " (destination)").c_str(), dst, bytes)) return r;
    if (src_dev)
        if (Result r = check_range((std::string(call) + " (source)").c_str(), src, bytes)) return r;
    Node n;
    n.kind = Node::Copy;
    n.what = call;
    n.dst = dst;
    n.src = src;
    n.bytes = bytes;
    return capture_node(st, std::move(n));
}

Result memset_on(const char* call, void* s, uint64_t dst, unsigned v, unsigned elem, size_t count) {
    if (Result r = check_stream(call, s)) return r;
    Stream* st = capturing(s);
    if (!st) {
        if (Result r = settle(as_stream(s))) return r;
        return do_memset(call, dst, v, elem, count);
    }
    if (dst % elem)
        return fail(ERR_INVALID_VALUE, std::string(call) + ": destination not " + std::to_string(elem) + "-byte aligned");
    if (Result r = check_range(call, dst, count * elem)) return r;
    Node n;
    n.kind = Node::Memset;
    n.what = call;
    n.dst = dst;
    n.value = v;
    n.elem = elem;
    n.count = count;
    return capture_node(st, std::move(n));
}
}  // namespace

KEMU_API int cuMemAlloc_v2(uint64_t* p, size_t bytes) {
    if (Result r = unsafe_call("cuMemAlloc")) return r;
    return do_alloc(p, bytes);
}
// Stream-ordered allocation inside a capture would be a graph memory node,
// which the emulator does not model: refused, so that a captured region
// that allocates is found here.
KEMU_API int cuMemAllocAsync(uint64_t* p, size_t bytes, void* s) {
    if (Result r = check_stream("cuMemAllocAsync", s)) return r;
    if (Stream* st = capturing(s))
        return capture_fail(st, ERR_NOT_SUPPORTED,
                            "cuMemAllocAsync during a stream capture (graph memory nodes are not emulated)");
    if (Result r = settle(as_stream(s))) return r;
    return do_alloc(p, bytes);
}
KEMU_API int cuMemFree_v2(uint64_t p) {
    if (Result r = unsafe_call("cuMemFree")) return r;
    if (Result r = settle_all()) return r;
    return mem_free(p);
}
KEMU_API int cuMemFreeAsync(uint64_t p, void* s) {
    if (Result r = check_stream("cuMemFreeAsync", s)) return r;
    if (Stream* st = capturing(s))
        return capture_fail(st, ERR_NOT_SUPPORTED,
                            "cuMemFreeAsync during a stream capture (graph memory nodes are not emulated)");
    if (Result r = settle_all()) return r;
    return mem_free(p);
}
KEMU_API int cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    if (!free_bytes || !total) return ERR_INVALID_VALUE;
    mem_info(free_bytes, total);
    return OK;
}

// Page-locked host memory is ordinary host memory here; its ranges are
// remembered, because only they may be copied inside a capture.
KEMU_API int cuMemAllocHost_v2(void** p, size_t bytes) {
    if (!p) return ERR_INVALID_VALUE;
    *p = malloc(bytes ? bytes : 1);
    if (!*p) return ERR_OUT_OF_MEMORY;
    std::lock_guard<std::mutex> g(g_capture_m);
    g_pinned.emplace_back((uintptr_t)*p, bytes ? bytes : 1);
    return OK;
}
KEMU_API int cuMemHostAlloc(void** p, size_t bytes, unsigned) { return cuMemAllocHost_v2(p, bytes); }
KEMU_API int cuMemFreeHost(void* p) {
    // A deferred copy may still read it.
    if (Result r = settle_all()) return r;
    {
        std::lock_guard<std::mutex> g(g_capture_m);
        g_pinned.erase(std::remove_if(g_pinned.begin(), g_pinned.end(),
                                      [p](const std::pair<uintptr_t, size_t>& r) { return r.first == (uintptr_t)p; }),
                       g_pinned.end());
    }
    free(p);
    return OK;
}

KEMU_API int cuMemcpyHtoD_v2(uint64_t dst, const void* src, size_t bytes) {
    if (Result r = unsafe_call("cuMemcpyHtoD")) return r;
    return do_copy("cuMemcpyHtoD", dst, true, (uint64_t)src, false, bytes);
}
KEMU_API int cuMemcpyDtoH_v2(void* dst, uint64_t src, size_t bytes) {
    if (Result r = unsafe_call("cuMemcpyDtoH")) return r;
    return do_copy("cuMemcpyDtoH", (uint64_t)dst, false, src, true, bytes);
}
KEMU_API int cuMemcpyDtoD_v2(uint64_t dst, uint64_t src, size_t bytes) {
    if (Result r = unsafe_call("cuMemcpyDtoD")) return r;
    return do_copy("cuMemcpyDtoD", dst, true, src, true, bytes);
}
KEMU_API int cuMemcpy(uint64_t dst, uint64_t src, size_t bytes) {
    if (Result r = unsafe_call("cuMemcpy")) return r;
    // Unified addressing: either side may be host or device memory.
    return do_copy("cuMemcpy", dst, false, src, false, bytes);
}
// From page-locked memory on a stream of the program's own, not capturing:
// deferred (see "deferred copies" above). Otherwise at the call, as before:
// pageable memory is staged by the driver before the call returns.
KEMU_API int cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t bytes, void* s) {
    Stream* st = as_stream(s);
    if (st && bytes && capturing(s) == nullptr && pinned(src, bytes)) {
        if (Result r = settle(st)) return r;  // the stream's earlier deferred copy, in order
        if (Result r = check_range("cuMemcpyHtoDAsync (destination)", dst, bytes)) return r;
        std::lock_guard<std::mutex> g(g_defer_m);
        st->deferred.push_back(Deferred{dst, (uint64_t)src, bytes, ++st->enqueued});
        return OK;
    }
    return copy_on("cuMemcpyHtoDAsync", s, dst, true, (uint64_t)src, false, bytes);
}
KEMU_API int cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t bytes, void* s) {
    return copy_on("cuMemcpyDtoHAsync", s, (uint64_t)dst, false, src, true, bytes);
}
KEMU_API int cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, void* s) {
    return copy_on("cuMemcpyDtoDAsync", s, dst, true, src, true, bytes);
}
KEMU_API int cuMemcpyAsync(uint64_t dst, uint64_t src, size_t bytes, void* s) {
    // Either side may be host memory; inside a capture both must then be
    // device or page-locked memory.
    const bool dd = mem_valid(dst, bytes ? bytes : 1), sd = mem_valid(src, bytes ? bytes : 1);
    return copy_on("cuMemcpyAsync", s, dst, dd, src, sd, bytes);
}

KEMU_API int cuMemsetD8_v2(uint64_t dst, unsigned char v, size_t n) {
    if (Result r = unsafe_call("cuMemsetD8")) return r;
    return do_memset("cuMemsetD8", dst, v, 1, n);
}
KEMU_API int cuMemsetD8Async(uint64_t dst, unsigned char v, size_t n, void* s) {
    return memset_on("cuMemsetD8Async", s, dst, v, 1, n);
}
KEMU_API int cuMemsetD16_v2(uint64_t dst, unsigned short v, size_t n) {
    if (Result r = unsafe_call("cuMemsetD16")) return r;
    return do_memset("cuMemsetD16", dst, v, 2, n);
}
KEMU_API int cuMemsetD32_v2(uint64_t dst, unsigned v, size_t n) {
    if (Result r = unsafe_call("cuMemsetD32")) return r;
    return do_memset("cuMemsetD32", dst, v, 4, n);
}
KEMU_API int cuMemsetD16Async(uint64_t dst, unsigned short v, size_t n, void* s) {
    return memset_on("cuMemsetD16Async", s, dst, v, 2, n);
}
KEMU_API int cuMemsetD32Async(uint64_t dst, unsigned v, size_t n, void* s) {
    return memset_on("cuMemsetD32Async", s, dst, v, 4, n);
}

// ---- modules and functions ------------------------------------------------------------------

KEMU_API int cuModuleLoadData(void** module, const void* image) {
    if (!t_current) return fail(ERR_INVALID_CONTEXT, "cuModuleLoadData: no current context");
    Module* m = nullptr;
    Result r = module_load_ptx(static_cast<const char*>(image), &m);
    if (r == OK) *module = m;
    return r;
}
KEMU_API int cuModuleLoadDataEx(void** module, const void* image, unsigned, void*, void**) {
    return cuModuleLoadData(module, image);
}
KEMU_API int cuModuleUnload(void* module) {
    module_unload(static_cast<Module*>(module));
    return OK;
}
KEMU_API int cuModuleGetFunction(void** f, void* module, const char* name) {
    if (!f || !module || !name) return ERR_INVALID_VALUE;
    auto* m = static_cast<Module*>(module);
    auto it = m->functions.find(name);
    if (it == m->functions.end())
        return fail(ERR_NOT_FOUND, std::string("cuModuleGetFunction: the module has no entry named ") + name);
    *f = it->second.get();
    return OK;
}

KEMU_API int cuFuncGetAttribute(int* v, int attr, void* fp) {
    if (!v || !fp) return ERR_INVALID_VALUE;
    auto* f = static_cast<Function*>(fp);
    switch (attr) {
        case 0: *v = (int)f->max_threads; break;        // MAX_THREADS_PER_BLOCK
        case 1: *v = (int)f->static_shared; break;      // SHARED_SIZE_BYTES
        case 2: *v = 0; break;                          // CONST_SIZE_BYTES
        case 3: *v = 0; break;                          // LOCAL_SIZE_BYTES
        case 4: *v = 32; break;                         // NUM_REGS (not modelled)
        case 5: *v = 82; break;                         // PTX_VERSION (ISA 8.2)
        case 6: *v = config().major * 10 + config().minor;  // BINARY_VERSION
            break;
        case 8: *v = f->max_dynamic_shared; break;      // MAX_DYNAMIC_SHARED_SIZE_BYTES
        case 9: *v = -1; break;                         // PREFERRED_SHARED_MEMORY_CARVEOUT
        default: *v = 0;
    }
    return OK;
}

KEMU_API int cuFuncSetAttribute(void* fp, int attr, int value) {
    if (!fp) return ERR_INVALID_HANDLE;
    auto* f = static_cast<Function*>(fp);
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || (size_t)value + f->static_shared > 227 * 1024)
            return fail(ERR_INVALID_VALUE, "cuFuncSetAttribute: " + f->name + ": " + std::to_string(value) +
                                               " bytes of dynamic shared memory plus " +
                                               std::to_string(f->static_shared) +
                                               " static exceed the device's 227 KiB per block");
        f->max_dynamic_shared = value;
        return OK;
    }
    if (attr == 9) return OK;  // carveout: a hint
    return fail(ERR_NOT_SUPPORTED, "cuFuncSetAttribute: attribute " + std::to_string(attr) + " is not emulated");
}
KEMU_API int cuFuncSetCacheConfig(void*, int) { return OK; }

KEMU_API int cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void* fp, int threads, size_t dyn) {
    if (!n || !fp || threads <= 0) return ERR_INVALID_VALUE;
    auto* f = static_cast<Function*>(fp);
    int by_threads = 2048 / threads;
    size_t smem = f->static_shared + dyn;
    int by_smem = smem ? (int)((228 * 1024) / smem) : 32;
    *n = std::max(0, std::min({by_threads, by_smem, 32}));
    return OK;
}
KEMU_API int cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, void* f, int threads, size_t dyn, unsigned) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(n, f, threads, dyn);
}

// ---- launches ------------------------------------------------------------------------------------

KEMU_API int cuLaunchKernel(void* fp, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned shared, void* stream, void** params, void** extra) {
    if (!fp) return fail(ERR_INVALID_HANDLE, "cuLaunchKernel: null function");
    auto* f = static_cast<Function*>(fp);
    if (Result r = check_stream("cuLaunchKernel", stream)) return r;
    std::ostringstream e;
    e << "cuLaunchKernel " << f->name << ": ";
    if (extra) return fail(ERR_NOT_SUPPORTED, e.str() + "the `extra` argument form is not emulated");
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) {
        e << "grid (" << gx << "," << gy << "," << gz << ") or block (" << bx << "," << by << "," << bz
          << ") has a zero dimension";
        return fail(ERR_INVALID_VALUE, e.str());
    }
    if (bx > 1024 || by > 1024 || bz > 64 || (uint64_t)bx * by * bz > 1024) {
        e << "block (" << bx << "," << by << "," << bz << ") = " << (uint64_t)bx * by * bz
          << " threads; the limits are 1024 threads per block, 1024 x 1024 x 64";
        return fail(ERR_INVALID_VALUE, e.str());
    }
    if (gx > 2147483647u || gy > 65535 || gz > 65535) {
        e << "grid (" << gx << "," << gy << "," << gz << "); the limits are 2^31-1 x 65535 x 65535";
        return fail(ERR_INVALID_VALUE, e.str());
    }
    if ((uint64_t)bx * by * bz > f->max_threads) {
        e << (uint64_t)bx * by * bz << " threads per block, but the kernel is compiled for at most "
          << f->max_threads << " (__launch_bounds__ / .maxntid)";
        return fail(ERR_LAUNCH_OUT_OF_RESOURCES, e.str());
    }
    if (shared > (unsigned)f->max_dynamic_shared) {
        e << f->static_shared << " bytes of static and " << shared << " bytes of dynamic shared memory; the kernel "
          << "may use " << f->max_dynamic_shared << " bytes of dynamic (48 KiB in all by default; more only after "
          << "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES), up to 227 KiB in all)";
        return fail(ERR_INVALID_VALUE, e.str());
    }
    const ModuleTable* t = module_table(f->module->emu);
    for (unsigned i = 0; i < t->dynamic_shared_count; ++i)
        if (shared > t->dynamic_shared[i].capacity) {
            e << shared << " bytes of dynamic shared memory; the emulator holds " << t->dynamic_shared[i].capacity;
            return fail(ERR_INVALID_VALUE, e.str());
        }
    if (f->entry->param_count > 0 && !params)
        return fail(ERR_INVALID_VALUE, e.str() + "kernelParams is null but the kernel takes parameters");
    for (unsigned i = 0; i < f->entry->param_count; ++i)
        if (!params[i]) {
            e << "kernelParams[" << i << "] is null";
            return fail(ERR_INVALID_VALUE, e.str());
        }
    LaunchShape s{{gx, gy, gz}, {bx, by, bz}, shared};
    if (Stream* st = capturing(stream)) {
        // CUDA copies the parameter values when the launch is captured, so
        // the caller's argument storage may change or die afterwards.
        Node n;
        n.kind = Node::Kernel;
        n.what = "kernel " + f->name;
        n.f = f;
        n.shape = s;
        for (unsigned i = 0; i < f->entry->param_count; ++i) {
            const auto* b = static_cast<const unsigned char*>(params[i]);
            n.params.emplace_back(b, b + f->params[i].size);
        }
        return capture_node(st, std::move(n));
    }
    if (Result r = settle(as_stream(stream))) return r;
    return launch(f, s, params);
}

KEMU_API int cuCtxSynchronize(void) {
    if (!t_current) return fail(ERR_INVALID_CONTEXT, "cuCtxSynchronize: no current context");
    if (Result r = unsafe_call("cuCtxSynchronize")) return r;
    return settle_all();
}

// ---- graphs --------------------------------------------------------------------------------------

namespace {
Result run_node(const Node& n) {
    switch (n.kind) {
        case Node::Kernel: {
            std::vector<void*> args;
            for (const auto& p : n.params) args.push_back((void*)p.data());
            return launch(n.f, n.shape, args.data());
        }
        case Node::Copy:
            // Ranges were checked at capture; a device allocation freed since
            // is caught here.
            if (mem_valid(n.dst, 1) && !mem_valid(n.dst, n.bytes ? n.bytes : 1))
                return fail(ERR_INVALID_VALUE, "cuGraphLaunch: " + n.what + ": destination no longer allocated");
            if (n.bytes) memmove((void*)n.dst, (const void*)n.src, n.bytes);
            return OK;
        case Node::Memset: return do_memset(n.what.c_str(), n.dst, n.value, n.elem, n.count);
        case Node::EventRecord:
            n.event->t = std::chrono::steady_clock::now();
            n.event->recorded = true;
            return OK;
    }
    return OK;
}
}  // namespace

// Flags: AUTO_FREE_ON_LAUNCH (1; nothing to free here: no graph memory
// nodes), UPLOAD (2), DEVICE_LAUNCH (4, not emulated), USE_NODE_PRIORITY (8).
KEMU_API int cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long flags) {
    if (!exec) return ERR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_capture_m);
    auto* gr = static_cast<Graph*>(graph);
    if (!contains(g_graphs, gr)) return fail(ERR_INVALID_VALUE, "cuGraphInstantiateWithFlags: not a live graph");
    if (flags & ~15ull)
        return fail(ERR_INVALID_VALUE, "cuGraphInstantiateWithFlags: unknown flags " + std::to_string(flags));
    if ((flags & 4) && (flags & 1))
        return fail(ERR_INVALID_VALUE, "cuGraphInstantiateWithFlags: DEVICE_LAUNCH cannot be combined with AUTO_FREE_ON_LAUNCH");
    if (flags & 4) return fail(ERR_NOT_SUPPORTED, "cuGraphInstantiateWithFlags: device-launched graphs are not emulated");
    auto* ex = new GraphExec{gr->nodes};
    g_execs.push_back(ex);
    *exec = ex;
    return OK;
}

// Runs the nodes in their stream order. Launched into a capturing stream,
// the graph's nodes join that capture (a child graph, flattened).
KEMU_API int cuGraphLaunch(void* exec, void* s) {
    auto* ex = static_cast<GraphExec*>(exec);
    {
        std::lock_guard<std::mutex> g(g_capture_m);
        if (!contains(g_execs, ex)) return fail(ERR_INVALID_VALUE, "cuGraphLaunch: not a live executable graph");
    }
    if (Result r = check_stream("cuGraphLaunch", s)) return r;
    if (Stream* st = capturing(s)) {
        for (const Node& n : ex->nodes) {
            Node c = n;
            if (Result r = capture_node(st, std::move(c))) return r;
        }
        return OK;
    }
    if (Result r = settle(as_stream(s))) return r;
    for (size_t i = 0; i < ex->nodes.size(); ++i) {
        const Node& n = ex->nodes[i];
        if (Result r = run_node(n)) {
            std::string prev = last_detail(r) ? last_detail(r) : "";
            return fail(r, "cuGraphLaunch: node " + std::to_string(i) + " (" + n.what + ") failed: " + prev);
        }
    }
    return OK;
}

KEMU_API int cuGraphUpload(void* exec, void* s) {
    {
        std::lock_guard<std::mutex> g(g_capture_m);
        if (!contains(g_execs, static_cast<GraphExec*>(exec)))
            return fail(ERR_INVALID_VALUE, "cuGraphUpload: not a live executable graph");
    }
    return check_stream("cuGraphUpload", s);
}

KEMU_API int cuGraphExecDestroy(void* exec) {
    auto* ex = static_cast<GraphExec*>(exec);
    std::lock_guard<std::mutex> g(g_capture_m);
    if (!contains(g_execs, ex)) return fail(ERR_INVALID_VALUE, "cuGraphExecDestroy: not a live executable graph");
    g_execs.erase(std::find(g_execs.begin(), g_execs.end(), ex));
    delete ex;
    return OK;
}

KEMU_API int cuGraphDestroy(void* graph) {
    auto* gr = static_cast<Graph*>(graph);
    std::lock_guard<std::mutex> g(g_capture_m);
    if (!contains(g_graphs, gr)) return fail(ERR_INVALID_VALUE, "cuGraphDestroy: not a live graph");
    g_graphs.erase(std::find(g_graphs.begin(), g_graphs.end(), gr));
    delete gr;
    return OK;
}

// The number of nodes of a graph (cuGraphGetNodes with a null node array).
KEMU_API int cuGraphGetNodes(void* graph, void** nodes, size_t* count) {
    if (!count) return ERR_INVALID_VALUE;
    auto* gr = static_cast<Graph*>(graph);
    std::lock_guard<std::mutex> g(g_capture_m);
    if (!contains(g_graphs, gr)) return fail(ERR_INVALID_VALUE, "cuGraphGetNodes: not a live graph");
    if (nodes) return fail(ERR_NOT_SUPPORTED, "cuGraphGetNodes: node handles are not emulated (pass null to count)");
    *count = gr->nodes.size();
    return OK;
}

// The emulator's own entry points (not CUDA's): whether this driver is the
// emulator, for tools that must not record its timings as GPU figures.
KEMU_API const char* kemu_device_name(void) { return device_name(); }
