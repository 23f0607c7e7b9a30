// The emulated device's own tests, through the driver API as a program sees
// it: module load checks, the synchronization rules (each must fail its
// launch with a message naming the rule), warp shuffle and vote semantics
// against the CUDA Programming Guide's definitions, memory poisoning, thread
// orders, atomics, launch limits, memcheck. Run by ci/gpu-emu in each pass
// with KEMU_EXTRA_MODULES pointing at the self-test module (rules.cu).
//
// Prints one line per check and ends with "N passed, M failed".
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

extern "C" {
int cuInit(unsigned);
int cuDeviceGet(int*, int);
int cuDeviceGetName(char*, int, int);
int cuDevicePrimaryCtxRetain(void**, int);
int cuCtxSetCurrent(void*);
int cuModuleLoadData(void**, const void*);
int cuModuleGetFunction(void**, void*, const char*);
int cuFuncSetAttribute(void*, int, int);
int cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**);
int cuMemAlloc_v2(uint64_t*, size_t);
int cuMemFree_v2(uint64_t);
int cuMemcpyHtoD_v2(uint64_t, const void*, size_t);
int cuMemcpyDtoH_v2(void*, uint64_t, size_t);
int cuMemsetD8_v2(uint64_t, unsigned char, size_t);
int cuGetErrorString(int, const char**);
int cuGraphCreate(void**, unsigned);
}

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
    printf("  %-4s %s\n", ok ? "ok" : "FAIL", what.c_str());
    (ok ? passed : failed)++;
}

std::string detail(int code) {
    const char* s = nullptr;
    cuGetErrorString(code, &s);
    return s ? s : "";
}

// A launch that must fail with `code` and a message mentioning `needle`.
void expect_error(int got, int code, const char* needle, const std::string& what) {
    const std::string d = detail(got);
    const bool ok = got == code && d.find(needle) != std::string::npos;
    check(ok, what + " -> " + std::to_string(got) + (ok ? "" : " (wanted " + std::to_string(code) + " mentioning '" +
                                                                  needle + "'; got: " + d + ")"));
}

// The PTX a real compile of rules.cu would have, as far as the emulator
// reads it: the entries with their parameter sizes, the bounds, the shared
// variables they reference.
std::string ptx_of(const std::string& entries) {
    return ".version 8.2\n.target sm_70\n.address_size 64\n" + entries;
}
std::string entry(const char* name, const std::vector<const char*>& params, const char* extra = "",
                  const char* body = "") {
    std::string s = std::string(".visible .entry ") + name + "(\n";
    for (size_t i = 0; i < params.size(); ++i)
        s += std::string("\t.param ") + params[i] + " " + name + "_param_" + std::to_string(i) +
             (i + 1 < params.size() ? ",\n" : "\n");
    return s + ")\n" + extra + "\n{\n" + body + "\tret;\n}\n";
}

const char* const P = ".u64";

std::string all_entries() {
    std::string s;
    for (const char* n : {"kemu_test_divergent_barrier", "kemu_test_barrier_after_return",
                          "kemu_test_half_warp_shuffle", "kemu_test_not_in_mask", "kemu_test_warp_vs_barrier",
                          "kemu_test_shared_poison", "kemu_test_race", "kemu_test_no_race",
                          "kemu_test_dynamic_shared"})
        s += entry(n, {P});
    s += entry("kemu_test_shuffles", {P, P});
    s += entry("kemu_test_atomics", {P, P});
    s += entry("kemu_test_oob", {P, ".u64"});
    for (const char* n : {"kemu_test_cp_async_sizes", "kemu_test_cp_async_groups", "kemu_test_cp_async_misaligned",
                          "kemu_test_cp_async_not_shared", "kemu_test_cp_async_oob"})
        s += entry(n, {P, P});
    s += entry("kemu_test_cp_async_wait", {P, P, ".u32"});
    s += ".shared .align 4 .b8 big_smem[40960];\n";
    s += entry("kemu_test_big_shared", {P}, ".maxntid 64, 1, 1", "\tmov.u64 %rd1, big_smem;\n");
    return s;
}

struct Buf {
    uint64_t p = 0;
    size_t n;
    explicit Buf(size_t bytes) : n(bytes) {
        cuMemAlloc_v2(&p, bytes);
        cuMemsetD8_v2(p, 0, bytes);
    }
    ~Buf() { cuMemFree_v2(p); }
    template <class T>
    std::vector<T> get() {
        std::vector<T> v(n / sizeof(T));
        cuMemcpyDtoH_v2(v.data(), p, n);
        return v;
    }
};

int launch(void* f, unsigned grid, unsigned block, std::vector<void*> args, unsigned shared = 0,
           unsigned grid_y = 1, unsigned block_z = 1) {
    return cuLaunchKernel(f, grid, grid_y, 1, block, 1, block_z, shared, nullptr, args.data(), nullptr);
}

// __shfl*_sync as the CUDA C++ Programming Guide defines them: the lanes
// form groups of `width`; a source outside the caller's group gives the
// caller's own value (up: below the group's first lane; down and xor: past
// its last; idx wraps within the group).
int ref_shfl(int op, const int* v, int lane, int arg, int width) {
    const int base = lane / width * width;
    int src = lane;
    switch (op) {
        case 0: src = base + (arg % width + width) % width; break;
        case 1: src = lane - arg >= base ? lane - arg : lane; break;
        case 2: src = lane + arg < base + width ? lane + arg : lane; break;
        case 3: src = (lane ^ arg) < base + width ? (lane ^ arg) : lane; break;
    }
    return v[src];
}

}  // namespace

int main() {
    const char* order = getenv("KEMU_ORDER");
    const std::string ord = order ? order : "forward";
#if defined(KEMU_MEMCHECK)
    const bool memcheck = true;
#else
    const bool memcheck = false;
#endif
    printf("emulated device self-test (order %s%s)\n", ord.c_str(), memcheck ? ", memcheck" : "");
    int dev = -1;
    void* ctx = nullptr;
    check(cuInit(0) == 0 && cuDeviceGet(&dev, 0) == 0 && cuDevicePrimaryCtxRetain(&ctx, dev) == 0 &&
              cuCtxSetCurrent(ctx) == 0,
          "init, device 0, primary context");
    char name[256] = {0};
    cuDeviceGetName(name, sizeof name, dev);
    check(strstr(name, "emulated") != nullptr, std::string("the device says it is emulated: ") + name);
    check(cuGraphCreate(nullptr, 0) == 801, "an API call the emulator lacks returns CUDA_ERROR_NOT_SUPPORTED");

    // ---- module load ---------------------------------------------------------
    void* mod = nullptr;
    const std::string ptx = ptx_of(all_entries());
    check(cuModuleLoadData(&mod, ptx.c_str()) == 0, "the self-test module loads");
    if (!mod) {
        printf("%d passed, %d failed\n", passed, failed + 1);
        return 1;
    }
    void* bad = nullptr;
    expect_error(cuModuleLoadData(&bad, ptx_of(entry("kemu_test_no_such_kernel", {P})).c_str()), 218,
                 "no twin", "a PTX entry without an emulated twin is refused");
    expect_error(cuModuleLoadData(&bad, ptx_of(entry("kemu_test_oob", {P, ".u32"})).c_str()), 218,
                 "[8, 4] bytes in the PTX but [8, 8]", "a PTX entry whose parameter sizes differ is refused");
    expect_error(cuModuleLoadData(&bad, "\x7f" "ELF not ptx"), 200, "not PTX", "a binary image is refused");
    auto fn = [&](const char* n) {
        void* f = nullptr;
        cuModuleGetFunction(&f, mod, n);
        return f;
    };

    // ---- the rules -----------------------------------------------------------
    Buf out(64 * 32 * sizeof(int));
    void* o = &out.p;
    expect_error(launch(fn("kemu_test_divergent_barrier"), 1, 32, {o}), 719, "divergent __syncthreads",
                 "different __syncthreads reached by different threads");
    expect_error(launch(fn("kemu_test_barrier_after_return"), 1, 64, {o}), 719, "returned",
                 "__syncthreads after a thread returned");
    expect_error(launch(fn("kemu_test_half_warp_shuffle"), 1, 32, {o}), 719, "has exited",
                 "a full-mask shuffle reached by half a warp");
    expect_error(launch(fn("kemu_test_not_in_mask"), 1, 32, {o}), 719, "not in its own mask",
                 "a lane calling a shuffle outside its own mask");
    expect_error(launch(fn("kemu_test_warp_vs_barrier"), 1, 32, {o}), 719, "waits at __syncthreads",
                 "a warp sync waiting for a lane that waits at a barrier");
    expect_error(launch(fn("kemu_test_half_warp_shuffle"), 1, 32, {o}), 719, "kemu_test_half_warp_shuffle",
                 "the message names the kernel");
    expect_error(launch(fn("kemu_test_half_warp_shuffle"), 1, 32, {o}), 719, "rules.cu:",
                 "the message names the source line");

    // ---- shuffles and votes ----------------------------------------------------
    {
        std::vector<int> args(76);
        for (int l = 0; l < 32; ++l) args[l] = (l * 5 + 3) % 37;  // idx sources, some >= width
        const int deltas[6] = {3, 5, 2, 1, 1, 0}, masks[6] = {16, 9, 5, 3, 1, 0};
        for (int w = 0; w < 6; ++w) args[32 + w] = deltas[w], args[38 + w] = masks[w];
        for (int l = 0; l < 32; ++l) args[44 + l] = (l % 3 == 0);
        Buf a(args.size() * sizeof(int));
        cuMemcpyHtoD_v2(a.p, args.data(), args.size() * sizeof(int));
        Buf r(28 * 32 * sizeof(int));
        const int rc = launch(fn("kemu_test_shuffles"), 1, 32, {&a.p, &r.p});
        check(rc == 0, "the shuffle kernel runs");
        std::vector<int> got = r.get<int>();
        int v[32];
        for (int l = 0; l < 32; ++l) v[l] = 1000 + l * 7;
        const int widths[6] = {32, 16, 8, 4, 2, 1};
        const char* names[4] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
        for (int op = 0; op < 4; ++op)
            for (int w = 0; w < 6; ++w) {
                int bad_lane = -1;
                for (int l = 0; l < 32 && bad_lane < 0; ++l) {
                    const int arg = op == 0 ? args[l] : op == 3 ? args[38 + w] : args[32 + w];
                    if (got[(op * 6 + w) * 32 + l] != ref_shfl(op, v, l, arg, widths[w])) bad_lane = l;
                }
                check(bad_lane < 0, std::string(names[op]) + " width " + std::to_string(widths[w]) +
                                        (bad_lane < 0 ? "" : ": lane " + std::to_string(bad_lane) + " differs"));
            }
        unsigned ballot = 0;
        for (int l = 0; l < 32; ++l) ballot |= (unsigned)args[44 + l] << l;
        bool votes = true;
        for (int l = 0; l < 32; ++l)
            votes = votes && (unsigned)got[24 * 32 + l] == ballot && got[25 * 32 + l] == 1 && got[26 * 32 + l] == 0;
        check(votes, "__ballot_sync, __any_sync, __all_sync");
        bool half = true;
        for (int l = 0; l < 16; ++l) half = half && got[27 * 32 + l] == (l < 15 ? v[l + 1] : v[l]);
        check(half, "a shuffle over a 16-lane mask");
    }

    // ---- memory ----------------------------------------------------------------
    {
        uint64_t p = 0;
        cuMemAlloc_v2(&p, 64);
        unsigned char h[64];
        cuMemcpyDtoH_v2(h, p, 64);
        bool all = true;
        for (unsigned char c : h) all = all && c == 0xff;
        check(all, "a fresh allocation holds the NaN pattern (0xff bytes)");
        expect_error(cuMemcpyHtoD_v2(p + 32, h, 64), 1, "not inside one live device allocation",
                     "a copy past the end of an allocation is refused");
        cuMemFree_v2(p);
        Buf s(64 * 4);
        check(launch(fn("kemu_test_shared_poison"), 1, 64, {&s.p}) == 0, "shared memory read before any write runs");
        bool poison = true;
        for (unsigned x : s.get<unsigned>()) poison = poison && x == 0xffffffffu;
        if (!poison) printf("    first value 0x%x\n", s.get<unsigned>()[0]);
        check(poison, "unwritten shared memory reads as the NaN pattern");
    }

    // ---- thread order ----------------------------------------------------------
    {
        Buf r(64 * 4), n(64 * 4);
        check(launch(fn("kemu_test_race"), 1, 64, {&r.p}) == 0 && launch(fn("kemu_test_no_race"), 1, 64, {&n.p}) == 0,
              "the race kernels run");
        std::vector<unsigned> race = r.get<unsigned>(), ok = n.get<unsigned>();
        bool fine = true, expected = true;
        for (unsigned t = 0; t < 64; ++t) {
            fine = fine && ok[t] == 63 - t;
            const bool seen = race[t] == 63 - t, poisoned = race[t] == 0xffffffffu;
            // forward: the mirror wrote earlier iff it has a lower index.
            if (ord == "forward") expected = expected && (t >= 32 ? seen : poisoned);
            else if (ord == "reverse") expected = expected && (t < 32 ? seen : poisoned);
            else expected = expected && (seen || poisoned);
        }
        check(fine, "with its barrier the exchange is the same in every order");
        check(expected, "without it, what each thread reads follows the " + ord + " order");
    }

    // ---- atomics -----------------------------------------------------------------
    {
        Buf c(8), m(4);
        check(launch(fn("kemu_test_atomics"), 7, 96, {&c.p, &m.p}) == 0, "the atomics kernel runs");
        check(c.get<unsigned long long>()[0] == 7 * 96 && m.get<unsigned>()[0] == 7 * 96 - 1,
              "atomicAdd and atomicMax from 7 blocks of 96 threads");
    }

    // ---- launch limits -------------------------------------------------------------
    {
        Buf b(1024 * 4);
        void* f = fn("kemu_test_no_race");
        expect_error(launch(f, 1, 1025, {&b.p}), 1, "1024 threads per block", "1025 threads per block");
        expect_error(launch(f, 1, 32, {&b.p}, 0, 65536), 1, "65535", "grid y of 65536");
        expect_error(launch(f, 1, 8, {&b.p}, 0, 1, 65), 1, "1024 x 1024 x 64", "block z of 65");
        void* big = fn("kemu_test_big_shared");
        check(launch(big, 1, 64, {&b.p}) == 0, "40 KiB of static shared memory, 64 threads");
        expect_error(launch(big, 1, 128, {&b.p}), 701, "__launch_bounds__", "more threads than __launch_bounds__");
        expect_error(launch(big, 1, 64, {&b.p}, 9 * 1024), 1, "48 KiB", "40 KiB static + 9 KiB dynamic shared memory");
        check(cuFuncSetAttribute(big, 8, 16 * 1024) == 0 && launch(big, 1, 64, {&b.p}, 9 * 1024) == 0,
              "the same after the MAX_DYNAMIC_SHARED_SIZE_BYTES opt-in");
        void* dyn = fn("kemu_test_dynamic_shared");
        check(launch(dyn, 1, 128, {&b.p}, 128 * 4) == 0, "dynamic shared memory");
        std::vector<float> d = b.get<float>();
        bool rev = true;
        for (int t = 0; t < 128; ++t) rev = rev && d[t] == (float)(127 - t);
        check(rev, "dynamic shared memory is one array shared by the block");
    }

    // ---- cp.async ------------------------------------------------------------------
    {
        std::vector<float> src(128);
        for (int i = 0; i < 128; ++i) src[i] = 1.0f + (float)i;
        Buf sd(128 * 4), o(128 * 4);
        cuMemcpyHtoD_v2(sd.p, src.data(), 128 * 4);
        const auto is_poison = [](float v) {
            unsigned b;
            memcpy(&b, &v, 4);
            return b == 0xffffffffu;
        };
        check(launch(fn("kemu_test_cp_async_sizes"), 1, 32, {&sd.p, &o.p}) == 0, "the cp.async sizes kernel runs");
        std::vector<float> g = o.get<float>();
        bool copied = true, tail = true;
        for (int i = 0; i < 10; ++i) copied = copied && g[i] == src[i];
        for (int i = 10; i < 16; ++i) tail = tail && g[i] == 0.0f;
        check(copied, "cp.async of 16, 8 and 4 bytes copies after wait_group 0");
        check(tail, "cp.async src-size below cp-size zero-fills the rest (src-size 8 of 16, and 0)");

        check(launch(fn("kemu_test_cp_async_groups"), 1, 32, {&sd.p, &o.p}) == 0, "the cp.async groups kernel runs");
        g = o.get<float>();
        bool older = true, newer = true, both = true, loose = true, later = true;
        for (int i = 0; i < 4; ++i) older = older && g[i] == src[i];
        for (int i = 4; i < 8; ++i) newer = newer && is_poison(g[i]);
        for (int i = 0; i < 8; ++i) both = both && g[8 + i] == src[i];
        for (int i = 0; i < 4; ++i) loose = loose && is_poison(g[16 + i]);
        for (int i = 0; i < 4; ++i) later = later && g[20 + i] == src[8 + i];
        check(older && newer, "cp.async.wait_group 1 completes all but the most recent group");
        check(both, "cp.async.wait_group 0 completes every committed group");
        check(loose && later, "a copy after the last commit_group is in no group until committed");

        int wait = 1;
        check(launch(fn("kemu_test_cp_async_wait"), 1, 32, {&sd.p, &o.p, &wait}) == 0, "cp.async, wait, barrier, read");
        g = o.get<float>();
        bool right = true;
        for (int t = 0; t < 32; ++t)
            for (int i = 0; i < 4; ++i) right = right && g[t * 4 + i] == src[(31 - t) * 4 + i];
        check(right, "with its wait the block reads every thread's copy");
        wait = 0;
        check(launch(fn("kemu_test_cp_async_wait"), 1, 32, {&sd.p, &o.p, &wait}) == 0, "the same without the wait runs");
        g = o.get<float>();
        bool stale = true;
        for (float v : g) stale = stale && is_poison(v);
        check(stale, "a missing cp.async.wait_group is caught: the reads see stale (NaN pattern) data");

        expect_error(launch(fn("kemu_test_cp_async_misaligned"), 1, 1, {&sd.p, &o.p}), 719, "not aligned to cp-size",
                     "a 16-byte cp.async to a 4-byte aligned address is refused");
        expect_error(launch(fn("kemu_test_cp_async_not_shared"), 1, 1, {&sd.p, &o.p}), 719,
                     "not in the block's shared memory", "a cp.async to global memory is refused");
        Buf small(16 * 4);
        const int rc = launch(fn("kemu_test_cp_async_oob"), 1, 1, {&small.p, &o.p});
        if (memcheck) expect_error(rc, 700, "AddressSanitizer", "a cp.async source past its allocation (memcheck)");
        else expect_error(rc, 719, "not inside one live device allocation", "a cp.async source past its allocation");
    }

    // ---- memcheck ------------------------------------------------------------------
    {
        Buf p(16 * 4);
        unsigned long long n = 16;
        const int rc = launch(fn("kemu_test_oob"), 1, 32, {&p.p, &n});
        if (memcheck) expect_error(rc, 700, "AddressSanitizer", "a write one past an allocation");
        else check(rc == 0, "a write one past an allocation is not seen without memcheck (expected)");
    }

    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
