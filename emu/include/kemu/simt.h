// The emulated CUDA device's view from a kernel: the CUDA built-ins that
// kernels/*.cu use, mapped onto the host C++ compiler and the emulator's
// runtime (emu/runtime). Force-included (`g++ -include kemu/simt.h`) before a
// kernel file, which then compiles unmodified as host code.
//
// How the pieces map:
// - A CUDA thread is a fiber; threadIdx/blockIdx/blockDim/gridDim read the
//   running fiber's record from the runtime.
// - `__shared__` is `thread_local`: the blocks of a launch run one at a time
//   per worker OS thread, each with all its fibers on that thread, so each
//   resident block has its own copy (block-scope `thread_local` is static, as
//   block-scope `__shared__` is). The runtime refills the module's TLS with
//   the NaN pattern before every block, so a read nothing wrote shows.
// - `__syncthreads`, `__syncwarp` and the warp shuffles/votes yield to the
//   runtime's scheduler, which checks the rules a GPU enforces (every live
//   thread at the same barrier, every lane of a mask at the same shuffle)
//   and fails the launch with the call site when one is broken.
// - Arithmetic is IEEE host arithmetic compiled with -ffp-contract=off: only
//   an explicit fmaf fuses, and the __f*_rn intrinsics round like a GPU.
//   Transcendentals come from glibc, not from CUDA's libdevice: the emulator
//   does not prove their rounding.
// - Tensor-core instructions (kemu/tensor_core.h) are what kernels/mma.cuh's
//   host branches call: warp-collective, through the scheduler.
#pragma once

#ifdef __CUDA_ARCH__
#error "kemu/simt.h is for the emulated (host) build only"
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "kemu/thread_view.h"
#include "kemu/tensor_core.h"

#define KESTREL_EMULATED_DEVICE 1

// ---- qualifiers ------------------------------------------------------------
#define __global__
#define __device__ static inline
#define __host__
#define __forceinline__
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
// __restrict__ is native to g++.

// ---- vector types ----------------------------------------------------------
// uint3, dim3 and the fiber record come from kemu/thread_view.h.
#define KEMU_VEC2(T, N, A)                \
    struct __attribute__((aligned(A))) N { \
        T x, y;                           \
    };                                    \
    static inline N make_##N(T x, T y) { return N{x, y}; }
#define KEMU_VEC3(T, N)                                        \
    struct N {                                                 \
        T x, y, z;                                             \
    };                                                         \
    static inline N make_##N(T x, T y, T z) { return N{x, y, z}; }
#define KEMU_VEC4(T, N, A)                                                  \
    struct __attribute__((aligned(A))) N {                                   \
        T x, y, z, w;                                                       \
    };                                                                      \
    static inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
KEMU_VEC2(float, float2, 8)
KEMU_VEC3(float, float3)
KEMU_VEC4(float, float4, 16)
KEMU_VEC2(int, int2, 8)
KEMU_VEC3(int, int3)
KEMU_VEC4(int, int4, 16)
KEMU_VEC2(unsigned int, uint2, 8)
KEMU_VEC4(unsigned int, uint4, 16)
KEMU_VEC2(double, double2, 16)
KEMU_VEC2(long long, longlong2, 16)
KEMU_VEC2(unsigned long long, ulonglong2, 16)
#undef KEMU_VEC2
#undef KEMU_VEC3
#undef KEMU_VEC4

// ---- the runtime's side (emu/runtime/scheduler.cpp) -------------------------
extern "C" {
const kemu::ThreadView* kemu_self(void);
void kemu_syncthreads(const char* file, int line);
unsigned long long kemu_warp_op(int op, unsigned mask, unsigned long long value, int arg, int width, const char* file,
                                int line);
unsigned kemu_activemask(void);
[[noreturn]] void kemu_trap(const char* what, const char* file, int line);
void kemu_cp_async_issue(void* dst, const void* src, unsigned cp_size, unsigned src_size, const char* file, int line);
void kemu_cp_async_commit(void);
void kemu_cp_async_wait(int n, const char* file, int line);
// wgmma (sm_90a; emu/runtime/wgmma.h): warpgroup collectives through the
// scheduler, and the shared window that matrix descriptors address.
unsigned kemu_shared_window_address(const void* p, const char* file, int line);
void kemu_fence_proxy_async(const char* file, int line);
void kemu_wgmma_fence(const char* file, int line);
void kemu_wgmma_commit_group(const char* file, int line);
void kemu_wgmma_wait_group(int n, const char* file, int line);
void kemu_wgmma_mma_async_tf32(unsigned n, float* d, unsigned long long a_desc, unsigned long long b_desc, int scale_d,
                               int scale_a, int scale_b, const char* file, int line);
}

#define threadIdx (kemu_self()->thread_idx)
#define blockIdx (kemu_self()->block_idx)
#define blockDim (kemu_self()->block_dim)
#define gridDim (kemu_self()->grid_dim)
static constexpr int warpSize = 32;

// ---- synchronization -------------------------------------------------------
#define __syncthreads() kemu_syncthreads(__FILE__, __LINE__)
#define __trap() kemu_trap("__trap()", __FILE__, __LINE__)

static inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    kemu_warp_op(kemu::WARP_SYNC, mask, 0, 0, 32, file, line);
}
static inline unsigned __activemask() { return kemu_activemask(); }

static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace kemu {
template <class T>
static inline unsigned long long to_bits(T v) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
static inline T from_bits(unsigned long long b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
}  // namespace kemu

template <class T>
static inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
    return kemu::from_bits<T>(kemu_warp_op(kemu::SHFL_IDX, mask, kemu::to_bits(var), src_lane, width, file, line));
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                               const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return kemu::from_bits<T>(kemu_warp_op(kemu::SHFL_UP, mask, kemu::to_bits(var), (int)delta, width, file, line));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return kemu::from_bits<T>(kemu_warp_op(kemu::SHFL_DOWN, mask, kemu::to_bits(var), (int)delta, width, file, line));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                                const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return kemu::from_bits<T>(kemu_warp_op(kemu::SHFL_XOR, mask, kemu::to_bits(var), lane_mask, width, file, line));
}
static inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                                     int line = __builtin_LINE()) {
    return (unsigned)kemu_warp_op(kemu::VOTE_BALLOT, mask, pred != 0, 0, 32, file, line);
}
static inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return (int)kemu_warp_op(kemu::VOTE_ANY, mask, pred != 0, 0, 32, file, line);
}
static inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return (int)kemu_warp_op(kemu::VOTE_ALL, mask, pred != 0, 0, 32, file, line);
}

// ---- atomics (device-wide: blocks run in parallel on several cores) -------
// Integer atomics only: kestrel's contract has no floating-point atomics
// (results must not depend on timing), so a kernel that uses one does not
// compile here.
#define KEMU_ATOMICS(T)                                                                           \
    static inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }  \
    static inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }  \
    static inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }  \
    static inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }    \
    static inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }  \
    static inline T atomicCAS(T* p, T cmp, T v) {                                                 \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);       \
        return cmp;                                                                               \
    }                                                                                             \
    static inline T atomicMax(T* p, T v) {                                                        \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                             \
        while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                         \
        return old;                                                                               \
    }                                                                                             \
    static inline T atomicMin(T* p, T v) {                                                        \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                             \
        while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                         \
        return old;                                                                               \
    }
KEMU_ATOMICS(int)
KEMU_ATOMICS(unsigned int)
KEMU_ATOMICS(unsigned long long)
KEMU_ATOMICS(long long)
#undef KEMU_ATOMICS
// atomicInc/atomicDec wrap at `limit` as CUDA defines them.
static inline unsigned atomicInc(unsigned* p, unsigned limit) {
    unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(p, &old, old >= limit ? 0u : old + 1, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline unsigned atomicDec(unsigned* p, unsigned limit) {
    unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(p, &old, (old == 0 || old > limit) ? limit : old - 1, true,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}

// ---- integer and bit intrinsics --------------------------------------------
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
static inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
static inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
    s &= 31u;
    return s == 0 ? hi : (hi << s) | (lo >> (32 - s));
}
static inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
    s &= 31u;
    return s == 0 ? lo : (lo >> s) | (hi << (32 - s));
}

// min/max as CUDA's math headers overload them (same-type pairs, and the
// mixed signed/unsigned pairs resolved to the unsigned type).
#define KEMU_MINMAX(T)                                   \
    static inline T min(T a, T b) { return b < a ? b : a; } \
    static inline T max(T a, T b) { return a < b ? b : a; }
KEMU_MINMAX(int)
KEMU_MINMAX(unsigned int)
KEMU_MINMAX(long)
KEMU_MINMAX(unsigned long)
KEMU_MINMAX(long long)
KEMU_MINMAX(unsigned long long)
#undef KEMU_MINMAX
static inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
static inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
static inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
static inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
static inline unsigned long long min(long long a, unsigned long long b) { return min((unsigned long long)a, b); }
static inline unsigned long long min(unsigned long long a, long long b) { return min(a, (unsigned long long)b); }
static inline unsigned long long max(long long a, unsigned long long b) { return max((unsigned long long)a, b); }
static inline unsigned long long max(unsigned long long a, long long b) { return max(a, (unsigned long long)b); }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

// ---- bit casts --------------------------------------------------------------
static inline float __int_as_float(int x) { return kemu::from_bits<float>((unsigned)x); }
static inline float __uint_as_float(unsigned x) { return kemu::from_bits<float>(x); }
static inline int __float_as_int(float x) { return (int)(unsigned)kemu::to_bits(x); }
static inline unsigned __float_as_uint(float x) { return (unsigned)kemu::to_bits(x); }
static inline double __longlong_as_double(long long x) { return kemu::from_bits<double>((unsigned long long)x); }
static inline long long __double_as_longlong(double x) { return (long long)kemu::to_bits(x); }
static inline int __double2hiint(double x) { return (int)(kemu::to_bits(x) >> 32); }
static inline int __double2loint(double x) { return (int)(unsigned)kemu::to_bits(x); }
static inline double __hiloint2double(int hi, int lo) {
    return kemu::from_bits<double>(((unsigned long long)(unsigned)hi << 32) | (unsigned)lo);
}

// ---- floating point with explicit rounding ---------------------------------
// The host's default rounding is round-to-nearest-even, which is what the
// _rn forms ask for; -ffp-contract=off keeps a*b+c from fusing.
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __drcp_rn(double a) { return 1.0 / a; }
static inline double __dsqrt_rn(double a) { return sqrt(a); }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
// The fast approximations are modelled by the accurate functions: their
// error on hardware is what the per-op tolerances (not the emulator) cover.
// (__expf, __logf, __sinf, __cosf, __powf and exp10f are glibc's own
// names for the accurate functions.)
static inline float __fdividef(float a, float b) { return a / b; }

// Conversions with a named rounding (nearest-even is the host default).
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
static inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
static inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
static inline long long __float2ll_rz(float x) { return (long long)x; }
static inline float __int2float_rn(int x) { return (float)x; }
static inline float __uint2float_rn(unsigned x) { return (float)x; }
static inline float __ll2float_rn(long long x) { return (float)x; }
static inline float __ull2float_rn(unsigned long long x) { return (float)x; }
static inline float __double2float_rn(double x) { return (float)x; }
static inline double __int2double_rn(int x) { return (double)x; }

// ---- memory ------------------------------------------------------------------
template <class T>
static inline T __ldg(const T* p) {
    return *p;
}

// cp.async (kernels/async_copy.cuh): the runtime records the copy and
// performs it at the cp.async.wait_group that completes its group
// (emu/runtime/async_copy.h). The source bytes are touched here, at the
// issuing line, so that memcheck reports an out-of-bounds source where the
// copy was issued rather than at the wait.
static inline void kemu_cp_async(void* dst, const void* src, unsigned cp_size, unsigned src_size, const char* file,
                                 int line) {
    unsigned char probe[16];
    if (src_size > 0 && src_size <= sizeof probe) std::memcpy(probe, src, src_size);
    kemu_cp_async_issue(dst, src, cp_size, src_size, file, line);
}
