// The block scheduler: runs a launch's blocks in parallel on a pool of OS
// threads, and the threads of each block as cooperative fibers on one of
// them, enforcing the synchronization rules a GPU relies on.
//
// A block runs in rounds. In a round every runnable thread runs (in forward,
// reverse or seeded random order) until it reaches a barrier, a warp
// operation or its end. Then the waits are resolved:
// - a warp operation completes when every lane named in its mask waits at
//   the same call site with the same operation and mask; a lane of the mask
//   that has exited, waits elsewhere, or does not exist fails the launch;
// - a barrier completes when every thread of the block waits at the same
//   __syncthreads; a barrier reached after some threads returned, or
//   different barriers reached by different threads, fail the launch.
// Since nothing is runnable when the waits are resolved, a wait that cannot
// complete is a deadlock on hardware, and is reported as one here.
#include <boost/context/fiber.hpp>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <sstream>
#include <thread>

#include "async_copy.h"
#include "wgmma.h"
#include "runtime.h"

#if defined(KEMU_MEMCHECK)
#include <sanitizer/asan_interface.h>
#endif

namespace ctx = boost::context;

namespace kemu {
namespace {

enum class State : uint8_t { Runnable, Barrier, Warp, Exited };

struct Block;

struct Thread {
    ThreadView view;
    unsigned linear = 0, warp = 0, lane = 0;
    State state = State::Runnable;
    const char* file = nullptr;
    int line = 0;
    // The pending warp operation.
    int op = 0;
    unsigned mask = 0;
    unsigned long long value = 0, result = 0;
    int arg = 0, width = 32;
    // A WARP_COLLECTIVE's function, its instruction's name and this lane's record.
    CollectiveFn collective = nullptr;
    const char* collective_name = nullptr;
    void* data = nullptr;
    Block* block = nullptr;
    ctx::stack_context stack{};  // the fiber's stack (for AddressSanitizer)
    void* fake_stack = nullptr;
    const void* sched_bottom = nullptr;  // the scheduler's stack, seen from the fiber
    size_t sched_size = 0;
    ctx::fiber fiber;  // resumes this thread
    ctx::fiber sink;   // resumes the scheduler (held while running)
    bool started = false;
    AsyncCopies async;  // its cp.async copies not yet completed
    // A wgmma.fence since its start or its last wgmma.wait_group (the
    // emulator's reading of the ISA's rule that a fence must order a
    // thread's own register accesses before the next wgmma.mma_async).
    bool wgmma_fenced = false;
};

// A thread's part of a warpgroup-collective instruction (kemu_wgmma_*).
enum WgmmaKind : int { WG_FENCE, WG_MMA, WG_COMMIT, WG_WAIT };
struct WgmmaRecord {
    int kind;
    int wait_n;  // WG_WAIT
    // WG_MMA: the operation as this thread names it, its accumulators.
    unsigned n;
    uint64_t a_desc, b_desc;
    int scale_d, scale_a, scale_b;
    float* d;
};

// Fiber stacks, reused across blocks and launches on one OS thread: mmap'd
// with a guard page below, so an overflow faults instead of corrupting.
class StackPool {
   public:
    explicit StackPool(size_t size) : size_(size) {}
    ~StackPool() {
        for (auto& s : free_) munmap(static_cast<char*>(s.sp) - s.size - page(), s.size + page());
    }
    ctx::stack_context take() {
        if (!free_.empty()) {
            ctx::stack_context s = free_.back();
            free_.pop_back();
            return s;
        }
        void* base = mmap(nullptr, size_ + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                          -1, 0);
        if (base == MAP_FAILED) throw std::bad_alloc();
        mprotect(base, page(), PROT_NONE);
        ctx::stack_context s;
        s.size = size_;
        s.sp = static_cast<char*>(base) + page() + size_;
        return s;
    }
    void give(ctx::stack_context& s) noexcept { free_.push_back(s); }

   private:
    static size_t page() { return 4096; }
    size_t size_;
    std::vector<ctx::stack_context> free_;
};

struct PooledStack {
    StackPool* pool;
    ctx::stack_context* record;  // where the thread keeps its stack's bounds
    ctx::stack_context allocate() { return *record = pool->take(); }
    void deallocate(ctx::stack_context& s) noexcept { pool->give(s); }
};

// AddressSanitizer must be told of every switch between the scheduler's
// stack and a fiber's, or it takes the fiber's frames for overflows of the
// scheduler's stack. (No-ops in the plain build.)
#if defined(KEMU_MEMCHECK)
inline void to_fiber(Thread& t, void** save) {
    __sanitizer_start_switch_fiber(save, static_cast<char*>(t.stack.sp) - t.stack.size, t.stack.size);
}
inline void back_in_scheduler(void* save) { __sanitizer_finish_switch_fiber(save, nullptr, nullptr); }
inline void in_fiber(Thread& t) { __sanitizer_finish_switch_fiber(t.fake_stack, &t.sched_bottom, &t.sched_size); }
inline void to_scheduler(Thread& t, bool dying) {
    __sanitizer_start_switch_fiber(dying ? nullptr : &t.fake_stack, t.sched_bottom, t.sched_size);
}
#else
inline void to_fiber(Thread&, void**) {}
inline void back_in_scheduler(void*) {}
inline void in_fiber(Thread&) {}
inline void to_scheduler(Thread&, bool) {}
#endif

struct Launch {
    Function* fn;
    LaunchShape shape;
    void** args;
    uint64_t id;
    uint64_t blocks;
    std::atomic<uint64_t> next{0};
    std::atomic<uint64_t> finished{0};
    std::atomic<bool> failed{false};
    std::mutex m;
    std::condition_variable done;
    Result code = OK;
    std::string message;

    void fail_with(Result c, const std::string& msg) {
        std::lock_guard<std::mutex> g(m);
        if (!failed.exchange(true)) {
            code = c;
            message = msg;
        }
    }
};

struct Block {
    Launch* launch;
    uint3 idx;
    std::vector<Thread>* threads;
    unsigned count;
    bool aborting = false;
    Result code = OK;
    std::string message;
    // wgmma: each warpgroup's pending operations, and shared memory as the
    // async proxy sees it. The view starts as the NaN pattern (like the
    // block's shared memory) and takes the generic contents of the whole
    // window when an operation is performed after a fence.proxy.async of
    // any thread; without one, wgmma reads the view's stale bytes.
    std::vector<WarpgroupMma> warpgroups;
    std::vector<unsigned char> async_view;
    bool proxy_fenced = false;
};

thread_local Thread* g_current = nullptr;
// The launch whose block this OS thread runs (memcheck attributes reports to it).
thread_local Launch* g_launch = nullptr;
// Every OS thread that runs blocks keeps its stacks and thread records.
thread_local std::unique_ptr<StackPool> g_stacks;
thread_local std::vector<Thread> g_threads;

std::string where(const char* file, int line) {
    std::ostringstream s;
    s << (file ? file : "?") << ":" << line;
    return s.str();
}

std::string tid_string(const Thread& t) {
    std::ostringstream s;
    s << "(" << t.view.thread_idx.x << "," << t.view.thread_idx.y << "," << t.view.thread_idx.z << ")";
    return s.str();
}

std::string block_prefix(const Block& b) {
    std::ostringstream s;
    s << "kernel " << b.launch->fn->name << ", block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z << ")";
    return s.str();
}

const char* op_name(int op) {
    switch (op) {
        case WARP_SYNC: return "__syncwarp";
        case SHFL_IDX: return "__shfl_sync";
        case SHFL_UP: return "__shfl_up_sync";
        case SHFL_DOWN: return "__shfl_down_sync";
        case SHFL_XOR: return "__shfl_xor_sync";
        case VOTE_BALLOT: return "__ballot_sync";
        case VOTE_ANY: return "__any_sync";
        case VOTE_ALL: return "__all_sync";
    }
    return "warp operation";
}

const char* op_name(const Thread& t) {
    return (t.op == WARP_COLLECTIVE || t.op == WARPGROUP_COLLECTIVE) && t.collective_name ? t.collective_name
                                                                                      : op_name(t.op);
}

// The block fails; the running fiber (if any) parks until it is unwound.
void block_fail(Block& b, Result code, const std::string& msg) {
    if (!b.aborting) {
        b.aborting = true;
        b.code = code;
        b.message = block_prefix(b) + ": " + msg;
    }
}

void park(Thread* t) {
    // Back to the scheduler; it never resumes a failed block's threads (it
    // unwinds them: the resume then throws boost's forced_unwind).
    to_scheduler(*t, false);
    try {
        t->sink = std::move(t->sink).resume();
    } catch (...) {
        // Unwound by the scheduler: the fiber dies, and boost switches back
        // to the scheduler once the exception reached the fiber's entry.
        in_fiber(*t);
        to_scheduler(*t, true);
        throw;
    }
    in_fiber(*t);
}

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The async proxy's view of the block's shared memory, brought up to date
// when a fence.proxy.async came since the last update (see Block).
const unsigned char* async_view(Block& b, size_t* size) {
    unsigned char* base;
    tls_block(b.launch->fn->module->emu, &base, size);
    if (b.async_view.size() != *size) b.async_view.assign(*size, 0xff);
    if (b.proxy_fenced && base) {
        std::memcpy(b.async_view.data(), base, *size);
        b.proxy_fenced = false;
    }
    return b.async_view.data();
}

// A warpgroup-collective instruction whose first waiting thread is `first`:
// runs it once every one of the warpgroup's 128 threads waits at it.
// Returns whether it ran; leaves it waiting while a thread of another warp
// is still on its way (it waits at an ordinary warp operation, or is
// runnable); fails the block on a broken rule.
bool resolve_warpgroup(Block& b, unsigned first) {
    std::vector<Thread>& ts = *b.threads;
    const Thread& lead = ts[first];
    const unsigned g = first / 128, base = g * 128;
    auto fail = [&](const std::string& why) {
        block_fail(b, ERR_LAUNCH_FAILED, std::string(op_name(lead)) + " at " + where(lead.file, lead.line) + ": " + why);
        return false;
    };
    if (base + 128 > b.count) {
        std::ostringstream e;
        e << "warpgroup " << g << " needs 4 whole warps (threads " << base << ".." << base + 127
          << "), but the block has only " << b.count << " threads";
        return fail(e.str());
    }
    for (unsigned i = base; i < base + 128; ++i) {
        const Thread& o = ts[i];
        std::ostringstream e;
        if (o.state == State::Exited) {
            e << "thread " << tid_string(o) << " of warpgroup " << g << " has exited and will never reach it";
            return fail(e.str());
        }
        if (o.state == State::Barrier) {
            e << "thread " << tid_string(o) << " of warpgroup " << g << " waits at __syncthreads at "
              << where(o.file, o.line) << ": a deadlock on a GPU";
            return fail(e.str());
        }
        if (o.state == State::Runnable) return false;
        const bool same_site = o.op == WARPGROUP_COLLECTIVE && o.file == lead.file && o.line == lead.line;
        if (!same_site) {
            // Another warp may still be on its way through an ordinary warp
            // operation; a lane of the lead's own warp, or any thread at
            // another wgmma instruction, is divergence (.sync.aligned).
            if (o.op != WARPGROUP_COLLECTIVE && o.warp != lead.warp) return false;
            e << "divergent wgmma instructions in warpgroup " << g << ": thread " << tid_string(lead) << " waits at "
              << op_name(lead) << " at " << where(lead.file, lead.line) << ", thread " << tid_string(o) << " at "
              << op_name(o) << " at " << where(o.file, o.line) << " (.sync.aligned: all 128 threads execute the same one)";
            return fail(e.str());
        }
    }
    const WgmmaRecord& r0 = *static_cast<const WgmmaRecord*>(ts[base].data);
    for (unsigned i = base; i < base + 128; ++i) {
        const WgmmaRecord& r = *static_cast<const WgmmaRecord*>(ts[i].data);
        if (r.kind != r0.kind || r.wait_n != r0.wait_n || r.n != r0.n || r.a_desc != r0.a_desc ||
            r.b_desc != r0.b_desc || r.scale_d != r0.scale_d || r.scale_a != r0.scale_a || r.scale_b != r0.scale_b) {
            std::ostringstream e;
            e << "thread " << tid_string(ts[i]) << " names other operands than thread " << tid_string(ts[base])
              << " (descriptors, N, scales or the wait count must be the same across the warpgroup)";
            return fail(e.str());
        }
    }
    WarpgroupMma& wg = b.warpgroups[g];
    switch (r0.kind) {
        case WG_FENCE:
            for (unsigned i = base; i < base + 128; ++i) ts[i].wgmma_fenced = true;
            break;
        case WG_MMA: {
            WgmmaOp op;
            op.n = r0.n;
            op.a_desc = r0.a_desc;
            op.b_desc = r0.b_desc;
            op.scale_d = r0.scale_d != 0;
            op.scale_a = r0.scale_a;
            op.scale_b = r0.scale_b;
            for (unsigned i = 0; i < 128; ++i) {
                if (!ts[base + i].wgmma_fenced) {
                    std::ostringstream e;
                    e << "thread " << tid_string(ts[base + i])
                      << " issues it without a wgmma.fence since its start or its last wgmma.wait_group (the fence "
                         "must order its accumulator accesses before the asynchronous multiply)";
                    return fail(e.str());
                }
                op.d[i] = static_cast<const WgmmaRecord*>(ts[base + i].data)->d;
            }
            unsigned char* sbase;
            size_t window;
            tls_block(b.launch->fn->module->emu, &sbase, &window);
            const std::string bad = wgmma_check(op, window);
            if (!bad.empty()) return fail(bad);
            wg.issue(op);
            break;
        }
        case WG_COMMIT: wg.commit(); break;
        case WG_WAIT: {
            if (r0.wait_n < 0) return fail("a negative group count");
            size_t window;
            const unsigned char* view = async_view(b, &window);
            wg.wait((unsigned)r0.wait_n, view);
            for (unsigned i = base; i < base + 128; ++i) ts[i].wgmma_fenced = false;
            break;
        }
    }
    for (unsigned i = base; i < base + 128; ++i) ts[i].state = State::Runnable;
    return true;
}

// Completes the warp operations whose every named lane is waiting at it.
// Returns whether any completed; fails the block on a broken rule.
bool resolve_warps(Block& b) {
    std::vector<Thread>& ts = *b.threads;
    bool progress = false;
    for (unsigned w = 0; w * 32 < b.count && !b.aborting; ++w) {
        const unsigned base = w * 32, lanes = std::min(32u, b.count - base);
        for (unsigned l = 0; l < lanes && !b.aborting; ++l) {
            Thread& lead = ts[base + l];
            if (lead.state != State::Warp) continue;
            if (lead.op == WARPGROUP_COLLECTIVE) {
                if (resolve_warpgroup(b, base + l)) progress = true;
                continue;
            }
            const unsigned mask = lead.mask;
            // Check every lane the mask names.
            for (unsigned k = 0; k < 32; ++k) {
                if (!(mask >> k & 1u)) continue;
                std::ostringstream e;
                if (k >= lanes) {
                    e << op_name(lead) << " at " << where(lead.file, lead.line) << " (thread " << tid_string(lead)
                      << ") names lane " << k << " of warp " << w << " in mask 0x" << std::hex << mask << std::dec
                      << ", but the block has only " << lanes << " threads in that warp";
                    block_fail(b, ERR_LAUNCH_FAILED, e.str());
                    break;
                }
                Thread& o = ts[base + k];
                if (o.state == State::Exited) {
                    e << op_name(lead) << " at " << where(lead.file, lead.line) << " with mask 0x" << std::hex
                      << mask << std::dec << ": lane " << k << " (thread " << tid_string(o)
                      << ") has exited and will never reach it (lane " << l << ", thread " << tid_string(lead)
                      << ", waits)";
                    block_fail(b, ERR_LAUNCH_FAILED, e.str());
                    break;
                }
                if (o.state == State::Barrier) {
                    e << op_name(lead) << " at " << where(lead.file, lead.line) << " with mask 0x" << std::hex
                      << mask << std::dec << " waits for lane " << k << " (thread " << tid_string(o)
                      << "), which waits at __syncthreads at " << where(o.file, o.line) << ": a deadlock on a GPU";
                    block_fail(b, ERR_LAUNCH_FAILED, e.str());
                    break;
                }
                if (o.op != lead.op || o.mask != mask || o.file != lead.file || o.line != lead.line ||
                    o.width != lead.width || o.collective != lead.collective) {
                    e << "divergent warp operations in warp " << w << ": lane " << l << " (thread "
                      << tid_string(lead) << ") waits at " << op_name(lead) << " at "
                      << where(lead.file, lead.line) << " with mask 0x" << std::hex << mask << ", lane " << std::dec
                      << k << " (thread " << tid_string(o) << ") at " << op_name(o) << " at "
                      << where(o.file, o.line) << " with mask 0x" << std::hex << o.mask;
                    block_fail(b, ERR_LAUNCH_FAILED, e.str());
                    break;
                }
            }
            if (b.aborting) break;
            if (lead.op == WARP_COLLECTIVE) {
                // Everyone is here: the instruction runs once, over every
                // lane's record (each lane's operands live on its parked
                // fiber's stack until it resumes).
                void* lanes[32] = {};
                for (unsigned k = 0; k < 32; ++k)
                    if (mask >> k & 1u) lanes[k] = ts[base + k].data;
                if (const char* err = lead.collective(lanes, mask)) {
                    block_fail(b, ERR_LAUNCH_FAILED,
                               std::string(op_name(lead)) + " at " + where(lead.file, lead.line) + ": " + err);
                    break;
                }
                for (unsigned k = 0; k < 32; ++k)
                    if (mask >> k & 1u) ts[base + k].state = State::Runnable;
                progress = true;
                continue;
            }
            // Everyone is here: compute each lane's result (PTX shfl.sync /
            // vote.sync semantics).
            unsigned ballot = 0;
            for (unsigned k = 0; k < 32; ++k)
                if (mask >> k & 1u && ts[base + k].value) ballot |= 1u << k;
            const int width = lead.width;
            const bool pow2 = width >= 1 && width <= 32 && (width & (width - 1)) == 0;
            for (unsigned k = 0; k < 32 && !b.aborting; ++k) {
                if (!(mask >> k & 1u)) continue;
                Thread& t = ts[base + k];
                switch (lead.op) {
                    case WARP_SYNC: t.result = 0; break;
                    case VOTE_BALLOT: t.result = ballot; break;
                    case VOTE_ANY: t.result = ballot != 0; break;
                    case VOTE_ALL: t.result = ballot == mask; break;
                    default: {
                        if (!pow2) {
                            block_fail(b, ERR_LAUNCH_FAILED,
                                       std::string(op_name(lead)) + " at " + where(lead.file, lead.line) +
                                           ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
                            break;
                        }
                        const int c = (lead.op == SHFL_UP ? 0 : 0x1f) | ((32 - width) << 8);
                        const int segmask = (c >> 8) & 0x1f, cval = c & 0x1f;
                        const int lane = (int)k;
                        const int max_lane = (lane & segmask) | (cval & ~segmask);
                        const int min_lane = lane & segmask;
                        const int bval = t.arg;
                        int j = lane;
                        bool in_range = false;
                        switch (lead.op) {
                            case SHFL_IDX:
                                j = min_lane | (bval & ~segmask & 0x1f);
                                in_range = j <= max_lane;
                                break;
                            case SHFL_UP:
                                j = lane - bval;
                                in_range = j >= max_lane;
                                break;
                            case SHFL_DOWN:
                                j = lane + bval;
                                in_range = j <= max_lane;
                                break;
                            case SHFL_XOR:
                                j = lane ^ (bval & 0x1f);
                                in_range = j <= max_lane;
                                break;
                        }
                        if (!in_range) j = lane;
                        if (!(mask >> j & 1u)) {
                            std::ostringstream e;
                            e << op_name(lead) << " at " << where(lead.file, lead.line) << ": lane " << k
                              << " reads lane " << j << ", which is outside the mask 0x" << std::hex << mask
                              << " (the value is undefined on a GPU)";
                            block_fail(b, ERR_LAUNCH_FAILED, e.str());
                            break;
                        }
                        t.result = ts[base + j].value;
                    }
                }
            }
            if (b.aborting) break;
            for (unsigned k = 0; k < 32; ++k)
                if (mask >> k & 1u) ts[base + k].state = State::Runnable;
            progress = true;
        }
    }
    return progress;
}

// Releases a barrier that every thread reached; fails the block otherwise.
bool resolve_barrier(Block& b) {
    std::vector<Thread>& ts = *b.threads;
    const Thread* first_wait = nullptr;
    const Thread* first_exit = nullptr;
    unsigned waiting = 0;
    for (unsigned i = 0; i < b.count; ++i) {
        const Thread& t = ts[i];
        if (t.state == State::Barrier) {
            ++waiting;
            if (!first_wait) first_wait = &t;
        } else if (t.state == State::Exited) {
            if (!first_exit) first_exit = &t;
        }
    }
    if (!first_wait) return false;
    if (first_exit) {
        std::ostringstream e;
        e << "__syncthreads at " << where(first_wait->file, first_wait->line) << " reached by " << waiting
          << " thread(s) (first " << tid_string(*first_wait) << ") after thread " << tid_string(*first_exit)
          << " returned: a barrier must be reached by every thread of the block";
        block_fail(b, ERR_LAUNCH_FAILED, e.str());
        return false;
    }
    for (unsigned i = 0; i < b.count; ++i) {
        const Thread& t = ts[i];
        if (t.state == State::Barrier && (t.file != first_wait->file || t.line != first_wait->line)) {
            std::ostringstream e;
            e << "divergent __syncthreads: thread " << tid_string(*first_wait) << " waits at "
              << where(first_wait->file, first_wait->line) << ", thread " << tid_string(t) << " at "
              << where(t.file, t.line);
            block_fail(b, ERR_LAUNCH_FAILED, e.str());
            return false;
        }
    }
    for (unsigned i = 0; i < b.count; ++i) ts[i].state = State::Runnable;
    return true;
}

void poison_shared(const Launch& L) {
    const EmuModule* m = L.fn->module->emu;
    unsigned char* base;
    size_t size;
    tls_block(m, &base, &size);
    // 0xff bytes are a NaN in f32 and f64 and all-ones in integers.
    if (base && size) std::memset(base, 0xff, size);
}

void run_block(Launch& L, uint64_t linear) {
    if (!g_stacks) g_stacks.reset(new StackPool(config().memcheck ? (512u << 10) : (128u << 10)));
    const LaunchShape& s = L.shape;
    const unsigned count = s.block[0] * s.block[1] * s.block[2];
    Block b;
    b.launch = &L;
    b.idx = uint3{(unsigned)(linear % s.grid[0]), (unsigned)(linear / s.grid[0] % s.grid[1]),
                  (unsigned)(linear / ((uint64_t)s.grid[0] * s.grid[1]))};
    b.count = count;
    std::vector<Thread>& ts = g_threads;
    if (ts.size() < count) ts.resize(count);
    b.threads = &ts;
    for (unsigned i = 0; i < count; ++i) {
        Thread& t = ts[i];
        t.view.thread_idx = uint3{i % s.block[0], i / s.block[0] % s.block[1], i / (s.block[0] * s.block[1])};
        t.view.block_idx = b.idx;
        t.view.block_dim = uint3{s.block[0], s.block[1], s.block[2]};
        t.view.grid_dim = uint3{s.grid[0], s.grid[1], s.grid[2]};
        t.linear = i;
        t.warp = i / 32;
        t.lane = i % 32;
        t.state = State::Runnable;
        t.block = &b;
        t.started = false;
        t.file = nullptr;
        t.line = 0;
        t.async.reset();
        t.wgmma_fenced = false;
    }
    b.warpgroups.assign((count + 127) / 128, WarpgroupMma());
    poison_shared(L);

    const EntryInfo* entry = L.fn->entry;
    void** args = L.args;
    std::vector<unsigned> order(count);
    for (unsigned i = 0; i < count; ++i) order[i] = i;
    if (config().order == Order::Reverse) std::reverse(order.begin(), order.end());
    uint64_t rng = config().seed ^ (L.id * 0x9E3779B97F4A7C15ull) ^ (linear * 0xD1B54A32D192ED03ull);

    unsigned exited = 0;
    while (!b.aborting) {
        if (config().order == Order::Random) {
            for (unsigned i = count; i > 1; --i) std::swap(order[i - 1], order[splitmix(rng) % i]);
        }
        for (unsigned oi = 0; oi < count && !b.aborting; ++oi) {
            Thread& t = ts[order[oi]];
            if (t.state != State::Runnable) continue;
            g_current = &t;
            if (!t.started) {
                t.started = true;
                t.fiber = ctx::fiber(std::allocator_arg, PooledStack{g_stacks.get(), &t.stack},
                                     [&t, entry, args](ctx::fiber&& sink) {
                                         in_fiber(t);
                                         t.sink = std::move(sink);
                                         entry->invoke(args);
                                         t.state = State::Exited;
                                         to_scheduler(t, true);
                                         return std::move(t.sink);
                                     });
            }
            void* save = nullptr;
            to_fiber(t, &save);
            t.fiber = std::move(t.fiber).resume();
            back_in_scheduler(save);
            g_current = nullptr;
            if (t.state == State::Exited) ++exited;
        }
        if (b.aborting || exited == count) break;
        if (resolve_warps(b)) continue;
        if (b.aborting) break;
        if (resolve_barrier(b)) continue;
        if (b.aborting) break;
        // Nothing can run and nothing can be released.
        block_fail(b, ERR_LAUNCH_FAILED, "deadlock: no thread can make progress");
    }
    if (b.aborting) {
        // Unwind the parked fibers (their destructors resume them with a
        // forced unwind), then report.
        for (unsigned i = 0; i < count; ++i) {
            if (!ts[i].fiber) continue;
            g_current = &ts[i];
            void* save = nullptr;
            to_fiber(ts[i], &save);
            ts[i].fiber = ctx::fiber();
            back_in_scheduler(save);
        }
        g_current = nullptr;
        L.fail_with(b.code, b.message);
    }
    for (unsigned i = 0; i < count; ++i) ts[i].sink = ctx::fiber();
}

// ---- the worker pool ---------------------------------------------------------
// Workers help with whichever launch is queued; the launching thread works
// on its own launch too, so a launch never waits for a free worker.
class Pool {
   public:
    explicit Pool(unsigned n) {
        for (unsigned i = 0; i < n; ++i) workers_.emplace_back([this] { work(); });
    }
    ~Pool() {
        {
            std::lock_guard<std::mutex> g(m_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& w : workers_) w.join();
    }
    void post(Launch* L) {
        {
            std::lock_guard<std::mutex> g(m_);
            queue_.push_back(L);
        }
        cv_.notify_all();
    }
    // Takes L off the queue and waits until no worker holds it, so that the
    // caller may destroy it.
    void retire(Launch* L) {
        std::unique_lock<std::mutex> g(m_);
        queue_.erase(std::remove(queue_.begin(), queue_.end(), L), queue_.end());
        idle_.wait(g, [&] { return busy_.find(L) == busy_.end(); });
    }

   private:
    void work() {
        for (;;) {
            Launch* L;
            {
                std::unique_lock<std::mutex> g(m_);
                cv_.wait(g, [this] { return stop_ || !queue_.empty(); });
                if (stop_) return;
                L = queue_.front();
                // Pin the launch while working on it: its owner retires it
                // only after every claimed block finished.
                ++busy_[L];
            }
            run_blocks(*L);
            {
                std::lock_guard<std::mutex> g(m_);
                queue_.erase(std::remove(queue_.begin(), queue_.end(), L), queue_.end());
                if (--busy_[L] == 0) busy_.erase(L);
            }
            idle_.notify_all();
        }
    }

   public:
    static void run_blocks(Launch& L) {
        for (;;) {
            const uint64_t i = L.next.fetch_add(1);
            if (i >= L.blocks) return;
            g_launch = &L;
            if (!L.failed.load()) run_block(L, i);
            g_launch = nullptr;
            if (L.finished.fetch_add(1) + 1 == L.blocks) {
                std::lock_guard<std::mutex> g(L.m);
                L.done.notify_all();
            }
        }
    }

   private:
    std::mutex m_;
    std::condition_variable cv_, idle_;
    std::deque<Launch*> queue_;
    std::map<Launch*, int> busy_;
    std::vector<std::thread> workers_;
    bool stop_ = false;
};

Pool& pool() {
    // Leaked on purpose: worker threads must outlive every static destructor
    // that might still launch.
    static Pool* p = new Pool(config().workers > 1 ? config().workers - 1 : 0);
    return *p;
}

std::atomic<uint64_t> g_launch_ids{0};

}  // namespace

#if defined(KEMU_MEMCHECK)
// AddressSanitizer reports through this callback (with
// -fsanitize-recover=address and halt_on_error=0 the kernel goes on, and its
// launch fails): the launch whose block made the access gets the gist of the
// report (the full report is on stderr, naming the kernel's frames).
std::string asan_gist(const std::string& r) {
    std::string out;
    std::istringstream in(r);
    std::string line;
    while (std::getline(in, line)) {
        const bool keep = line.find("ERROR: AddressSanitizer") != std::string::npos ||
                          line.find("READ of size") == 0 || line.find("WRITE of size") == 0 ||
                          line.find("    #0 ") == 0 || line.find(" is located ") != std::string::npos;
        if (keep) out += (out.empty() ? "" : "; ") + line.substr(line.find_first_not_of(" ="));
    }
    return out;
}

void asan_report(const char* report) {
    if (g_launch) g_launch->fail_with(ERR_ILLEGAL_ADDRESS, "kernel " + g_launch->fn->name + ": " + asan_gist(report));
}
#endif

Result launch(Function* f, const LaunchShape& shape, void** args) {
#if defined(KEMU_MEMCHECK)
    static std::once_flag once;
    std::call_once(once, [] { __asan_set_error_report_callback(asan_report); });
#endif
    Launch L;
    L.fn = f;
    L.shape = shape;
    L.args = args;
    L.id = g_launch_ids.fetch_add(1);
    L.blocks = (uint64_t)shape.grid[0] * shape.grid[1] * shape.grid[2];
    if (L.blocks > 1) pool().post(&L);
    Pool::run_blocks(L);
    {
        std::unique_lock<std::mutex> g(L.m);
        L.done.wait(g, [&] { return L.finished.load() == L.blocks; });
    }
    if (L.blocks > 1) pool().retire(&L);
    if (L.failed.load()) return fail(L.code, L.message);
    return OK;
}

}  // namespace kemu

// ---- the built-ins kernels call (kemu/simt.h) ---------------------------------
using namespace kemu;

KEMU_API const ThreadView* kemu_self(void) { return &g_current->view; }

KEMU_API void kemu_syncthreads(const char* file, int line) {
    Thread* t = g_current;
    t->state = State::Barrier;
    t->file = file;
    t->line = line;
    park(t);
}

KEMU_API unsigned long long kemu_warp_op(int op, unsigned mask, unsigned long long value, int arg, int width,
                                         const char* file, int line) {
    Thread* t = g_current;
    if (!(mask >> t->lane & 1u)) {
        std::ostringstream e;
        e << op_name(op) << " at " << where(file, line) << ": thread " << tid_string(*t) << " (lane " << t->lane
          << ") is not in its own mask 0x" << std::hex << mask;
        block_fail(*t->block, ERR_LAUNCH_FAILED, e.str());
        t->state = State::Warp;
        park(t);
    }
    t->state = State::Warp;
    t->op = op;
    t->collective = nullptr;
    t->collective_name = nullptr;
    t->data = nullptr;
    t->mask = mask;
    t->value = value;
    t->arg = arg;
    t->width = width;
    t->file = file;
    t->line = line;
    park(t);
    return t->result;
}

KEMU_API void kemu_warp_collective(CollectiveFn fn, const char* name, unsigned mask, void* data, const char* file,
                                   int line) {
    Thread* t = g_current;
    if (!(mask >> t->lane & 1u)) {
        std::ostringstream e;
        e << name << " at " << where(file, line) << ": thread " << tid_string(*t) << " (lane " << t->lane
          << ") is not in its own mask 0x" << std::hex << mask;
        block_fail(*t->block, ERR_LAUNCH_FAILED, e.str());
        t->state = State::Warp;
        park(t);
    }
    t->state = State::Warp;
    t->op = WARP_COLLECTIVE;
    t->collective = fn;
    t->collective_name = name;
    t->data = data;
    t->mask = mask;
    t->value = 0;
    t->arg = 0;
    t->width = 32;
    t->file = file;
    t->line = line;
    park(t);
}

KEMU_API unsigned kemu_activemask(void) {
    // The lanes of this warp that have not exited.
    Thread* t = g_current;
    const Block& b = *t->block;
    const unsigned base = t->warp * 32;
    unsigned m = 0;
    for (unsigned k = 0; k < 32 && base + k < b.count; ++k)
        if ((*b.threads)[base + k].state != State::Exited) m |= 1u << k;
    return m;
}

KEMU_API void kemu_trap(const char* what, const char* file, int line) {
    Thread* t = g_current;
    block_fail(*t->block, ERR_ASSERT, std::string(what) + " at " + where(file, line) + " in thread " + tid_string(*t));
    t->state = State::Barrier;
    for (;;) park(t);
}

// ---- cp.async (kernels/async_copy.cuh; semantics in async_copy.h) ------------

namespace {
// Fails the block with `msg` at the call site; the thread never resumes.
[[noreturn]] void async_fail(Thread* t, const char* what, const char* file, int line, const std::string& msg) {
    block_fail(*t->block, ERR_LAUNCH_FAILED,
               std::string(what) + " at " + where(file, line) + " in thread " + tid_string(*t) + ": " + msg);
    t->state = State::Barrier;
    for (;;) park(t);
}
}  // namespace

KEMU_API void kemu_cp_async_issue(void* dst, const void* src, unsigned cp_size, unsigned src_size, const char* file,
                                  int line) {
    Thread* t = g_current;
    const char* what = "cp.async";
    std::ostringstream e;
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) {
        e << "cp-size " << cp_size << " (must be 4, 8 or 16)";
        async_fail(t, what, file, line, e.str());
    }
    if (src_size > cp_size) {
        e << "src-size " << src_size << " exceeds cp-size " << cp_size;
        async_fail(t, what, file, line, e.str());
    }
    if ((uintptr_t)dst % cp_size != 0 || (uintptr_t)src % cp_size != 0) {
        e << "addresses not aligned to cp-size " << cp_size << " (dst " << dst << ", src " << src << ")";
        async_fail(t, what, file, line, e.str());
    }
    unsigned char* base;
    size_t size;
    tls_block(t->block->launch->fn->module->emu, &base, &size);
    const auto* d = static_cast<unsigned char*>(dst);
    if (!base || d < base || d + cp_size > base + size) {
        e << "destination " << dst << " is not in the block's shared memory";
        async_fail(t, what, file, line, e.str());
    }
    if (src_size > 0 && !mem_valid((uint64_t)(uintptr_t)src, src_size)) {
        e << "source " << src << " (" << src_size << " bytes) is not inside one live device allocation";
        async_fail(t, what, file, line, e.str());
    }
    t->async.issue({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), cp_size, src_size});
}

KEMU_API void kemu_cp_async_commit(void) { g_current->async.commit(); }

KEMU_API void kemu_cp_async_wait(int n, const char* file, int line) {
    Thread* t = g_current;
    if (n < 0) async_fail(t, "cp.async.wait_group", file, line, "a negative group count");
    t->async.wait((unsigned)n);
}

// ---- wgmma (kernels/wgmma.cuh; semantics in wgmma.h) ------------------------

KEMU_API unsigned kemu_shared_window_address(const void* p, const char* file, int line) {
    Thread* t = g_current;
    unsigned char* base;
    size_t size;
    tls_block(t->block->launch->fn->module->emu, &base, &size);
    const auto* q = static_cast<const unsigned char*>(p);
    if (!base || q < base || q >= base + size) {
        std::ostringstream e;
        e << "address " << p << " is not in the block's shared memory";
        async_fail(t, "cvta.to.shared", file, line, e.str());
    }
    return (unsigned)(q - base);
}

KEMU_API void kemu_fence_proxy_async(const char*, int) { g_current->block->proxy_fenced = true; }

namespace {
const char* wgmma_name(int kind) {
    switch (kind) {
        case WG_FENCE: return "wgmma.fence.sync.aligned";
        case WG_MMA: return "wgmma.mma_async.sync.aligned.f32.tf32.tf32";
        case WG_COMMIT: return "wgmma.commit_group.sync.aligned";
    }
    return "wgmma.wait_group.sync.aligned";
}

// Parks the calling thread at a warpgroup collective with its record.
void wgmma_park(WgmmaRecord& r, const char* file, int line) {
    Thread* t = g_current;
    t->state = State::Warp;
    t->op = WARPGROUP_COLLECTIVE;
    t->collective = nullptr;
    t->collective_name = wgmma_name(r.kind);
    t->data = &r;
    t->mask = 0xffffffffu;
    t->value = 0;
    t->arg = 0;
    t->width = 32;
    t->file = file;
    t->line = line;
    park(t);
}
}  // namespace

KEMU_API void kemu_wgmma_fence(const char* file, int line) {
    WgmmaRecord r{};
    r.kind = WG_FENCE;
    wgmma_park(r, file, line);
}

KEMU_API void kemu_wgmma_commit_group(const char* file, int line) {
    WgmmaRecord r{};
    r.kind = WG_COMMIT;
    wgmma_park(r, file, line);
}

KEMU_API void kemu_wgmma_wait_group(int n, const char* file, int line) {
    WgmmaRecord r{};
    r.kind = WG_WAIT;
    r.wait_n = n;
    wgmma_park(r, file, line);
}

KEMU_API void kemu_wgmma_mma_async_tf32(unsigned n, float* d, unsigned long long a_desc, unsigned long long b_desc,
                                        int scale_d, int scale_a, int scale_b, const char* file, int line) {
    WgmmaRecord r{};
    r.kind = WG_MMA;
    r.n = n;
    r.a_desc = a_desc;
    r.b_desc = b_desc;
    r.scale_d = scale_d;
    r.scale_a = scale_a;
    r.scale_b = scale_b;
    r.d = d;
    wgmma_park(r, file, line);
}
