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
#include <algorithm>
#include <cfloat>
#include <cmath>
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
int cuStreamCreate(void**, unsigned);
int cuStreamDestroy_v2(void*);
int cuStreamSynchronize(void*);
int cuStreamWaitEvent(void*, void*, unsigned);
int cuStreamBeginCapture_v2(void*, int);
int cuStreamEndCapture(void*, void**);
int cuStreamIsCapturing(void*, int*);
int cuEventCreate(void**, unsigned);
int cuEventRecord(void*, void*);
int cuEventDestroy_v2(void*);
int cuMemcpyHtoDAsync_v2(uint64_t, const void*, size_t, void*);
int cuMemcpyDtoDAsync_v2(uint64_t, uint64_t, size_t, void*);
int cuMemsetD32Async(uint64_t, unsigned, size_t, void*);
int cuMemAllocAsync(uint64_t*, size_t, void*);
int cuMemAllocHost_v2(void**, size_t);
int cuMemFreeHost(void*);
int cuEventSynchronize(void*);
int cuEventQuery(void*);
int cuCtxSynchronize(void);
int cuStreamQuery(void*);
int cuGraphInstantiateWithFlags(void**, void*, unsigned long long);
int cuGraphLaunch(void*, void*);
int cuGraphUpload(void*, void*);
int cuGraphExecDestroy(void*);
int cuGraphDestroy(void*);
int cuGraphGetNodes(void*, void**, size_t*);
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
                          "kemu_test_dynamic_shared", "kemu_test_mma_half_warp", "kemu_test_mma_divergent"})
        s += entry(n, {P});
    s += entry("kemu_test_shuffles", {P, P});
    s += entry("kemu_test_atomics", {P, P});
    s += entry("kemu_test_oob", {P, ".u64"});
    s += entry("kemu_test_scale_add", {P, ".f32", ".u64"});
    s += entry("kemu_test_tf32_round", {P, P, ".u32"});
    s += entry("kemu_test_mma_tf32", {P, P, P, P, ".u32"});
    for (const char* n : {"kemu_test_cp_async_sizes", "kemu_test_cp_async_groups", "kemu_test_cp_async_misaligned",
                          "kemu_test_cp_async_not_shared", "kemu_test_cp_async_oob"})
        s += entry(n, {P, P});
    s += entry("kemu_test_cp_async_wait", {P, P, ".u32"});
    s += entry("kemu_test_wgmma", {P, P, P, P, ".u32"});
    s += entry("kemu_test_wgmma_divergent", {P});
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

// TF32 round-to-nearest, ties away from zero, written with frexp/ldexp
// rather than the emulator's bit arithmetic: the significand in [0.5, 1)
// scaled to 11 bits (1 implicit + 10 stored), rounded half away, scaled
// back. Subnormal f32 inputs keep the absolute quantum of the smallest
// normal binade (2^-126 * 2^-10 = 2^-136), as a bit-level rounding of the
// subnormal's 23-bit field does; results past the largest finite TF32 value
// are infinite.
double tf32_ref(float x) {
    if (std::isnan(x) || std::isinf(x) || x == 0.0f) return x;
    int e = 0;
    std::frexp((double)x, &e);
    const int q = std::max(e - 11, -136);  // exponent of the last kept bit
    const double scaled = std::ldexp((double)x, -q);
    const double r = std::copysign(std::floor(std::fabs(scaled) + 0.5), scaled);
    const double v = std::ldexp(r, q);
    return std::fabs(v) > (double)FLT_MAX ? std::copysign(INFINITY, v) : v;
}

uint32_t lcg(uint64_t& s) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(s >> 33);
}
float uniform(uint64_t& s) { return (float)((double)lcg(s) / 2147483648.0 * 2.0 - 1.0); }

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

    // ---- tensor cores --------------------------------------------------------------
    {
        // cvt.rna.tf32.f32: ties (1 + 2^-11 sits halfway between two TF32
        // values) go away from zero, the largest finite f32 rounds to
        // infinity, subnormals round on their own quantum, NaN stays NaN.
        std::vector<float> x = {1.0f, 1.0f + 0x1p-11f, -(1.0f + 0x1p-11f), 1.0f + 0x1p-11f + 0x1p-23f,
                                1.0f + 0x1p-12f, 1.0f + 3 * 0x1p-11f, 3.14159265f, -2.71828182f, FLT_MAX,
                                -FLT_MAX, 0x1.ffep-1f, 1e-40f, -3e-39f, 0x1p-149f, 0.0f, -0.0f, INFINITY,
                                -INFINITY, NAN, 65504.3f};
        uint64_t seed = 12345;
        while (x.size() < 64) x.push_back(uniform(seed) * std::ldexp(1.0f, (int)(lcg(seed) % 60) - 30));
        const unsigned n = (unsigned)x.size();
        Buf dx(n * 4), dr(n * 4);
        cuMemcpyHtoD_v2(dx.p, x.data(), n * 4);
        check(launch(fn("kemu_test_tf32_round"), 1, 64, {&dx.p, &dr.p, (void*)&n}) == 0, "the tf32_round kernel runs");
        std::vector<unsigned> r = dr.get<unsigned>();
        int bad = -1;
        for (unsigned i = 0; i < n && bad < 0; ++i) {
            float got;
            memcpy(&got, &r[i], 4);
            const double want = tf32_ref(x[i]);
            const bool same = std::isnan(want) ? std::isnan(got) : (double)got == want && std::signbit(got) == std::signbit(want);
            if (!same || (r[i] & 0x1fffu) != 0) bad = (int)i;
        }
        check(bad < 0, "cvt.rna.tf32.f32 (ties away, overflow, subnormals, inf, NaN) against a frexp reference" +
                           (bad < 0 ? std::string() : ": value " + std::to_string(bad) + " differs"));

        // mma.m16n8k8: two warps, each its own A, B, C (random, in [-1, 1],
        // scaled by powers of two so that the exponents differ), against
        // D = A * B + C in f64 of the TF32-rounded operands. The emulator
        // sums exact products in f64 and rounds once to f32, so each element
        // must be within half an f32 ulp of the reference, |D - ref| <=
        // 2^-24 * |ref| (plus 2^-50 * sum |a b| + |c| for the f64 sum's own
        // rounding): a wrong fragment position is an error of a whole term.
        const int warps = 2;
        std::vector<float> A(warps * 128), B(warps * 64), C(warps * 128);
        for (float& v : A) v = uniform(seed) * std::ldexp(1.0f, (int)(lcg(seed) % 5) - 2);
        for (float& v : B) v = uniform(seed);
        for (float& v : C) v = uniform(seed);
        Buf da(A.size() * 4), db(B.size() * 4), dcc(C.size() * 4), dd(C.size() * 4);
        cuMemcpyHtoD_v2(da.p, A.data(), A.size() * 4);
        cuMemcpyHtoD_v2(db.p, B.data(), B.size() * 4);
        cuMemcpyHtoD_v2(dcc.p, C.data(), C.size() * 4);
        for (unsigned raw = 0; raw < 2; ++raw) {
            const int rc = launch(fn("kemu_test_mma_tf32"), 1, 32 * warps, {&da.p, &db.p, &dcc.p, &dd.p, (void*)&raw});
            std::vector<float> D = dd.get<float>();
            std::string worst;
            for (int w = 0; w < warps && worst.empty(); ++w)
                for (int i = 0; i < 16 && worst.empty(); ++i)
                    for (int j = 0; j < 8 && worst.empty(); ++j) {
                        double ref = C[w * 128 + i * 8 + j], mag = std::fabs(ref);
                        for (int k = 0; k < 8; ++k) {
                            float av = A[w * 128 + i * 8 + k], bv = B[w * 64 + k * 8 + j];
                            // raw: the operands' low 13 bits ignored (truncation).
                            double ta, tb;
                            if (raw) {
                                uint32_t ua, ub;
                                memcpy(&ua, &av, 4);
                                memcpy(&ub, &bv, 4);
                                ua &= 0xffffe000u;
                                ub &= 0xffffe000u;
                                float fa, fb;
                                memcpy(&fa, &ua, 4);
                                memcpy(&fb, &ub, 4);
                                ta = fa, tb = fb;
                            } else {
                                ta = tf32_ref(av), tb = tf32_ref(bv);
                            }
                            ref += ta * tb;
                            mag += std::fabs(ta * tb);
                        }
                        const double got = D[w * 128 + i * 8 + j];
                        if (!(std::fabs(got - ref) <= 0x1p-24 * std::fabs(ref) + 0x1p-50 * mag))
                            worst = "warp " + std::to_string(w) + " D(" + std::to_string(i) + "," + std::to_string(j) +
                                    ") = " + std::to_string(got) + ", want " + std::to_string(ref);
                    }
            check(rc == 0 && worst.empty(),
                  std::string("mma.m16n8k8 tf32, 2 warps, ") +
                      (raw ? "unrounded operands (truncated to 19 bits)" : "operands rounded by cvt.rna") +
                      ", against an f64 product of the TF32 inputs" + (worst.empty() ? "" : ": " + worst));
        }
        Buf o(64 * 4);
        expect_error(launch(fn("kemu_test_mma_half_warp"), 1, 32, {&o.p}), 719, "has exited",
                     "an mma.sync reached by half a warp is refused");
        expect_error(launch(fn("kemu_test_mma_divergent"), 1, 32, {&o.p}), 719, "divergent warp operations",
                     "an mma.sync at two call sites in one warp (divergence) is refused");
        expect_error(launch(fn("kemu_test_mma_tf32"), 1, 16, {&da.p, &db.p, &dcc.p, &dd.p, (void*)&o.p}), 719,
                     "only 16 threads", "an mma.sync in a block of 16 threads (a partial warp) is refused");
    }

    // ---- wgmma (sm_90a) --------------------------------------------------------
    {
        // One warpgroup, D = C + A * B^T through two m64n128k8 (k 0-7, 8-15)
        // from each shared-memory layout, against an f64 product of the
        // TF32-rounded inputs (tf32_ref). Each instruction rounds once to
        // f32, so each element is within two f32 roundings of the reference:
        // |D - ref| <= 2^-23 (|ref| + sum |a b| + |c|); a misplaced element is
        // an error of a whole term.
        uint64_t seed = 97;
        std::vector<float> A(64 * 16), B(128 * 16), C(64 * 128);
        for (float& v : A) v = uniform(seed) * std::ldexp(1.0f, (int)(lcg(seed) % 5) - 2);
        for (float& v : B) v = uniform(seed);
        for (float& v : C) v = uniform(seed);
        Buf da(A.size() * 4), db(B.size() * 4), dcc(C.size() * 4), dd(C.size() * 4);
        cuMemcpyHtoD_v2(da.p, A.data(), A.size() * 4);
        cuMemcpyHtoD_v2(db.p, B.data(), B.size() * 4);
        cuMemcpyHtoD_v2(dcc.p, C.data(), C.size() * 4);
        // The first element off the reference ("" when none), with or without C.
        auto worst = [&](const std::vector<float>& D, bool with_c) {
            for (int i = 0; i < 64; ++i)
                for (int j = 0; j < 128; ++j) {
                    double ref = with_c ? C[i * 128 + j] : 0.0, mag = std::fabs(ref);
                    for (int k = 0; k < 16; ++k) {
                        const double p = tf32_ref(A[i * 16 + k]) * tf32_ref(B[j * 16 + k]);
                        ref += p;
                        mag += std::fabs(p);
                    }
                    const double got = D[i * 128 + j];
                    if (!(std::fabs(got - ref) <= 0x1p-23 * (std::fabs(ref) + mag)))
                        return "D(" + std::to_string(i) + "," + std::to_string(j) + ") = " + std::to_string(got) +
                               ", want " + std::to_string(ref);
                }
            return std::string();
        };
        auto run = [&](unsigned mode, unsigned threads = 128) {
            return launch(fn("kemu_test_wgmma"), 1, threads, {&da.p, &db.p, &dcc.p, &dd.p, (void*)&mode});
        };
        const char* names[4] = {"no swizzle (core matrices, LBO 128, SBO 512)", "128-byte swizzle (SBO 1024)",
                                "64-byte swizzle (SBO 512)", "32-byte swizzle (SBO 256)"};
        for (unsigned layout = 0; layout < 4; ++layout) {
            const int rc = run(layout);
            const std::string w = rc == 0 ? worst(dd.get<float>(), true) : "launch failed: " + detail(rc);
            check(w.empty(), std::string("wgmma m64n128k8 tf32, ") + names[layout] +
                                 ", two k steps, against an f64 product of the TF32 inputs" +
                                 (w.empty() ? "" : ": " + w));
        }
        {
            const int rc = run(1 | 64);
            const std::string w = rc == 0 ? worst(dd.get<float>(), false) : "launch failed: " + detail(rc);
            check(w.empty(), "wgmma with scale-d false ignores C (D = A * B)" + (w.empty() ? "" : ": " + w));
        }
        {
            const int rc = run(1 | 4);
            check(rc == 0 && !worst(dd.get<float>(), true).empty(),
                  "a descriptor naming the wrong swizzle (64-byte over a 128-byte-swizzled stage) is caught: the "
                  "result differs from the reference");
        }
        {
            const int rc = run(2 | 8);
            check(rc == 0 && !worst(dd.get<float>(), true).empty(),
                  "a missing fence.proxy.async is caught: wgmma reads stale shared memory (the NaN pattern)");
        }
        {
            const int rc = run(2 | 16);
            const std::vector<float> D = dd.get<float>();
            bool stale = rc == 0;
            for (size_t i = 0; i < D.size() && stale; ++i) stale = D[i] == C[i];
            check(stale, "a missing wgmma.wait_group is caught: the accumulators still hold C (stale)");
        }
        expect_error(run(2 | 32), 719, "without a wgmma.fence",
                     "a wgmma.mma_async without a preceding wgmma.fence is refused");
        expect_error(run(2, 64), 719, "needs 4 whole warps",
                     "a wgmma in a block of 64 threads (half a warpgroup) is refused");
        Buf o(128 * 4);
        expect_error(launch(fn("kemu_test_wgmma_divergent"), 1, 128, {&o.p}), 719, "divergent wgmma",
                     "warps of one warpgroup at two different wgmma instructions are refused");
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

    // ---- stream capture and graphs --------------------------------------------------
    {
        void* st = nullptr;
        check(cuStreamCreate(&st, 1) == 0, "a stream for the capture checks");
        void* sa = fn("kemu_test_scale_add");
        const unsigned long long n = 8;
        Buf x(n * 4), y(n * 4);
        auto floats = [](Buf& b) { return b.get<float>(); };
        int status = -1;
        auto cap_launch = [&](float a) {
            return cuLaunchKernel(sa, 1, 1, 1, 32, 1, 1, 0, st, std::vector<void*>{&x.p, &a, (void*)&n}.data(),
                                  nullptr);
        };
        // Relaxed mode, so that the synchronous reads below may look at the
        // buffers during the capture.
        check(cuStreamBeginCapture_v2(st, 2) == 0 && cuStreamIsCapturing(st, &status) == 0 && status == 1,
              "capture begins; the stream reports CU_STREAM_CAPTURE_STATUS_ACTIVE");
        // memset x = 1.0, x = 2x + 3, x = 2x + 5, y = x: run they would give
        // x = y = 15; captured, nothing happens until the graph runs.
        float a = 3.0f;
        const bool recorded = cuMemsetD32Async(x.p, 0x3f800000u, n, st) == 0 &&
                              cuLaunchKernel(sa, 1, 1, 1, 32, 1, 1, 0, st,
                                             std::vector<void*>{&x.p, &a, (void*)&n}.data(), nullptr) == 0;
        a = 100.0f;  // the capture copied the parameter: this must not matter
        check(recorded && cap_launch(5.0f) == 0 && cuMemcpyDtoDAsync_v2(y.p, x.p, n * 4, st) == 0,
              "a memset, two launches and a device copy are recorded");
        check(floats(x)[0] == 0.0f && floats(y)[0] == 0.0f, "captured work does not run at capture");
        void* g = nullptr;
        void* ex = nullptr;
        size_t nodes = 0;
        check(cuStreamEndCapture(st, &g) == 0 && g && cuStreamIsCapturing(st, &status) == 0 && status == 0,
              "capture ends with a graph; the stream is no longer capturing");
        check(cuGraphGetNodes(g, nullptr, &nodes) == 0 && nodes == 4, "the graph holds the 4 nodes in order");
        expect_error(cuGraphInstantiateWithFlags(&ex, g, 1 | 4), 1, "DEVICE_LAUNCH",
                     "AUTO_FREE_ON_LAUNCH | DEVICE_LAUNCH is an invalid instantiation");
        check(cuGraphInstantiateWithFlags(&ex, g, 0) == 0 && cuGraphUpload(ex, st) == 0 && cuGraphLaunch(ex, st) == 0,
              "instantiate, upload, launch");
        bool first = true;
        for (float v : floats(x)) first = first && v == 15.0f;
        for (float v : floats(y)) first = first && v == 15.0f;
        check(first, "the replay runs the nodes in stream order with the captured parameters (x = y = 15)");
        cuMemsetD8_v2(x.p, 0, n * 4);
        check(cuGraphLaunch(ex, st) == 0 && floats(x)[3] == 15.0f && floats(y)[7] == 15.0f,
              "a second replay gives the same result (the memset node resets x)");
        check(cuGraphExecDestroy(ex) == 0 && cuGraphDestroy(g) == 0, "destroy the executable graph and the graph");
        expect_error(cuGraphDestroy(g), 1, "not a live graph", "a graph destroyed twice");
        expect_error(cuGraphLaunch(ex, st), 1, "not a live executable graph", "launching a destroyed graph");

        // Illegal operations fail and invalidate the capture.
        cuStreamBeginCapture_v2(st, 0);
        expect_error(cuStreamSynchronize(st), 900, "cuStreamSynchronize", "synchronizing a capturing stream");
        check(cuStreamIsCapturing(st, &status) == 0 && status == 2, "... invalidates the capture (status INVALIDATED)");
        expect_error(cap_launch(1.0f), 901, "invalidated", "a launch into an invalidated capture");
        g = (void*)1;
        expect_error(cuStreamEndCapture(st, &g), 901, "invalidated", "ending an invalidated capture");
        check(g == nullptr && cuStreamIsCapturing(st, &status) == 0 && status == 0,
              "... gives no graph and ends the capture");

        std::vector<float> host(n, 7.0f);
        cuStreamBeginCapture_v2(st, 0);
        expect_error(cuMemcpyHtoDAsync_v2(x.p, host.data(), n * 4, st), 900, "pageable",
                     "a copy from pageable host memory during a capture");
        cuStreamEndCapture(st, &g);
        void* pin = nullptr;
        cuMemAllocHost_v2(&pin, n * 4);
        memcpy(pin, host.data(), n * 4);
        cuStreamBeginCapture_v2(st, 0);
        check(cuMemcpyHtoDAsync_v2(x.p, pin, n * 4, st) == 0 && cuStreamEndCapture(st, &g) == 0 &&
                  cuGraphInstantiateWithFlags(&ex, g, 0) == 0,
              "a copy from page-locked memory is captured");
        static_cast<float*>(pin)[0] = 9.0f;
        check(cuGraphLaunch(ex, st) == 0 && floats(x)[0] == 9.0f && floats(x)[1] == 7.0f,
              "... and reads the host memory when the graph runs, not at capture");
        cuGraphExecDestroy(ex);
        cuGraphDestroy(g);
        cuMemFreeHost(pin);

        uint64_t p = 0;
        cuStreamBeginCapture_v2(st, 0);
        expect_error(cuMemAlloc_v2(&p, 64), 900, "cuMemAlloc", "cuMemAlloc during a global-mode capture");
        expect_error(cuStreamEndCapture(st, &g), 901, "cuMemAlloc", "... invalidates it");
        cuStreamBeginCapture_v2(st, 2);
        check(cuMemAlloc_v2(&p, 64) == 0 && cuMemFree_v2(p) == 0 && cuStreamEndCapture(st, &g) == 0 && g,
              "cuMemAlloc and cuMemFree during a relaxed capture are allowed");
        cuGraphDestroy(g);
        cuStreamBeginCapture_v2(st, 0);
        expect_error(cuMemAllocAsync(&p, 64, st), 801, "graph memory nodes", "a stream-ordered allocation in a capture");
        cuStreamEndCapture(st, &g);

        void* ev = nullptr;
        cuEventCreate(&ev, 2);
        cuEventRecord(ev, st);
        cuStreamBeginCapture_v2(st, 0);
        expect_error(cuStreamWaitEvent(st, ev, 0), 905, "not recorded in this capture",
                     "waiting on an event recorded outside the capture");
        cuStreamEndCapture(st, &g);
        cuStreamBeginCapture_v2(st, 0);
        check(cuEventRecord(ev, st) == 0 && cuStreamWaitEvent(st, ev, 0) == 0 && cuStreamEndCapture(st, &g) == 0,
              "waiting on an event recorded in the same capture");
        cuGraphDestroy(g);
        cuEventDestroy_v2(ev);

        expect_error(cuStreamEndCapture(st, &g), 401, "not capturing", "ending a capture that never began");
        cuStreamBeginCapture_v2(st, 0);
        expect_error(cuStreamBeginCapture_v2(st, 0), 401, "already capturing", "beginning a capture twice");
        cuStreamEndCapture(st, &g);
        cuGraphDestroy(g);
        expect_error(cuStreamBeginCapture_v2(nullptr, 0), 1, "legacy stream", "capturing the legacy stream");
        cuStreamDestroy_v2(st);
    }

    // ---- deferred copies from page-locked memory ------------------------------------------
    // A cuMemcpyHtoDAsync from page-locked memory on a stream of the
    // program's own reads its source only when the stream is next
    // synchronized with, or given its next operation: a host that rewrites
    // the source too early, or a stream that reads the destination without
    // waiting for the copy's event, gets what it would get on a GPU when the
    // DMA runs late.
    {
        const size_t n = 64;
        void *a = nullptr, *b = nullptr;
        check(cuStreamCreate(&a, 1) == 0 && cuStreamCreate(&b, 1) == 0, "two streams for the deferred-copy checks");
        void* pin = nullptr;
        cuMemAllocHost_v2(&pin, n * 4);
        auto* hp = static_cast<float*>(pin);
        auto fill = [&](float v) {
            for (size_t i = 0; i < n; ++i) hp[i] = v + (float)i;
        };
        auto holds = [&](Buf& d, float v) {
            const std::vector<float> got = d.get<float>();
            bool ok = true;
            for (size_t i = 0; i < n; ++i) ok = ok && got[i] == v + (float)i;
            return ok;
        };
        Buf land(n * 4), dst(n * 4);
        void* ev = nullptr;
        cuEventCreate(&ev, 2);

        // No wait before the rewrite: the device gets the rewritten bytes.
        fill(1.0f);
        check(cuMemcpyHtoDAsync_v2(land.p, pin, n * 4, a) == 0, "a copy from page-locked memory is enqueued");
        bool untouched = true;
        for (float v : land.get<float>()) untouched = untouched && v == 0.0f;
        check(untouched, "... and has not written its destination at the call");
        fill(2.0f);
        check(cuStreamSynchronize(a) == 0 && holds(land, 2.0f),
              "a host rewrite of the source before any wait reaches the device (a missing host wait is caught)");

        // Waiting for an event recorded after the copy completes it.
        fill(3.0f);
        cuMemcpyHtoDAsync_v2(land.p, pin, n * 4, a);
        cuEventRecord(ev, a);
        check(cuEventSynchronize(ev) == 0, "cuEventSynchronize on an event recorded after the copy");
        fill(4.0f);
        cuStreamSynchronize(a);
        check(holds(land, 3.0f), "... completes the copy: a rewrite after the wait does not reach the device");
        fill(5.0f);
        cuMemcpyHtoDAsync_v2(land.p, pin, n * 4, a);
        cuEventRecord(ev, a);
        check(cuEventQuery(ev) == 0, "cuEventQuery on it says done");
        fill(6.0f);
        cuStreamSynchronize(a);
        check(holds(land, 5.0f), "... and so the copy is done");

        // An event recorded before the copy stands for nothing of it.
        cuEventRecord(ev, a);
        fill(7.0f);
        cuMemcpyHtoDAsync_v2(land.p, pin, n * 4, a);
        cuEventSynchronize(ev);
        fill(8.0f);
        cuStreamSynchronize(a);
        check(holds(land, 8.0f), "an event recorded before the copy does not complete it");

        // Another stream: with cuStreamWaitEvent it reads the copy's data,
        // without it the destination's old contents.
        fill(9.0f);
        cuMemcpyHtoDAsync_v2(land.p, pin, n * 4, a);
        cuEventRecord(ev, a);
        check(cuStreamWaitEvent(b, ev, 0) == 0 && cuMemcpyDtoDAsync_v2(dst.p, land.p, n * 4, b) == 0 &&
                  cuStreamSynchronize(b) == 0 && holds(dst, 9.0f),
              "a stream that waits on the copy's event, then copies the destination, reads the new data");
        fill(10.0f);
        cuMemcpyHtoDAsync_v2(land.p, pin, n * 4, a);
        cuEventRecord(ev, a);
        cuMemcpyDtoDAsync_v2(dst.p, land.p, n * 4, b);
        cuStreamSynchronize(b);
        check(holds(dst, 9.0f),
              "a stream that does not wait reads the old contents (a missing cuStreamWaitEvent is caught)");
        cuStreamSynchronize(a);
        check(holds(land, 10.0f), "... and the copy lands when its own stream is synchronized");

        // The stream's next operation, cuStreamQuery and cuCtxSynchronize
        // complete it too.
        fill(11.0f);
        cuMemcpyHtoDAsync_v2(land.p, pin, n * 4, a);
        cuMemsetD32Async(dst.p, 0, n, a);
        fill(12.0f);
        cuStreamSynchronize(a);
        check(holds(land, 11.0f), "the next operation on the copy's stream completes it first");
        fill(13.0f);
        cuMemcpyHtoDAsync_v2(land.p, pin, n * 4, a);
        check(cuStreamQuery(a) == 0, "cuStreamQuery after a copy");
        fill(14.0f);
        check(holds(land, 13.0f), "... completes it");
        fill(15.0f);
        cuMemcpyHtoDAsync_v2(land.p, pin, n * 4, a);
        check(cuCtxSynchronize() == 0, "cuCtxSynchronize after a copy");
        fill(16.0f);
        check(holds(land, 15.0f), "... completes it");

        // Pageable memory is read at the call (the driver stages it).
        std::vector<float> pageable(n);
        for (size_t i = 0; i < n; ++i) pageable[i] = 17.0f + (float)i;
        cuMemcpyHtoDAsync_v2(land.p, pageable.data(), n * 4, a);
        for (float& v : pageable) v = -1.0f;
        cuStreamSynchronize(a);
        check(holds(land, 17.0f), "a copy from pageable memory reads its source at the call");

        cuEventDestroy_v2(ev);
        cuMemFreeHost(pin);
        cuStreamDestroy_v2(a);
        cuStreamDestroy_v2(b);
    }

    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
