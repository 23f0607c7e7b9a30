// Kernels that check the emulated device itself (emu/selftest/selftest.cpp
// launches them): the rules it must enforce, the semantics of its warp
// operations, its memory poisoning and its thread orders. Built like any
// kernel file, but into a module of its own that only the self-test loads;
// never compiled to PTX (the self-test declares their entries itself).

// A barrier some threads reach at one line and others at another.
extern "C" __global__ void kemu_test_divergent_barrier(int* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// A barrier after one thread returned.
extern "C" __global__ void kemu_test_barrier_after_return(int* out) {
    if (threadIdx.x == 3) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// A full-mask shuffle reached by half a warp (the other half exits).
extern "C" __global__ void kemu_test_half_warp_shuffle(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// Every lane calls a shuffle whose mask names lane 0 only.
extern "C" __global__ void kemu_test_not_in_mask(int* out) {
    out[threadIdx.x] = __shfl_sync(0x1u, (int)threadIdx.x, 0);
}

// Lane 0 waits at a warp sync with lane 1, which waits at a barrier.
extern "C" __global__ void kemu_test_warp_vs_barrier(int* out) {
    if (threadIdx.x == 0) {
        __syncwarp(0x3u);
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// out[(op * 6 + w) * 32 + lane] for op in idx, up, down, xor and widths
// 32, 16, 8, 4, 2, 1 (arguments from `args`), then ballot, any, all.
extern "C" __global__ void kemu_test_shuffles(const int* args, int* out) {
    const int lane = threadIdx.x;
    const int v = 1000 + lane * 7;
    const int widths[6] = {32, 16, 8, 4, 2, 1};
    for (int w = 0; w < 6; ++w) {
        const int width = widths[w];
        out[(0 * 6 + w) * 32 + lane] = __shfl_sync(0xffffffffu, v, args[lane], width);
        out[(1 * 6 + w) * 32 + lane] = __shfl_up_sync(0xffffffffu, v, (unsigned)args[32 + w], width);
        out[(2 * 6 + w) * 32 + lane] = __shfl_down_sync(0xffffffffu, v, (unsigned)args[32 + w], width);
        out[(3 * 6 + w) * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, args[38 + w], width);
    }
    const int pred = args[44 + lane];
    out[24 * 32 + lane] = (int)__ballot_sync(0xffffffffu, pred);
    out[25 * 32 + lane] = __any_sync(0xffffffffu, pred);
    out[26 * 32 + lane] = __all_sync(0xffffffffu, pred);
    // A shuffle over the lower half of the warp only (mask 0xffff).
    if (lane < 16) out[27 * 32 + lane] = __shfl_down_sync(0xffffu, v, 1, 16);
}

// Shared memory read before anything wrote it: the poison pattern.
extern "C" __global__ void kemu_test_shared_poison(unsigned* out) {
    __shared__ unsigned s[64];
    out[threadIdx.x] = s[threadIdx.x];
}

// A race without a barrier: each thread writes its slot and reads its
// mirror's; which reads see a write depends on the thread order.
extern "C" __global__ void kemu_test_race(unsigned* out) {
    __shared__ unsigned s[64];
    s[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = s[63 - threadIdx.x];
}

// The same exchange with the barrier it needs: every order agrees.
extern "C" __global__ void kemu_test_no_race(unsigned* out) {
    __shared__ unsigned s[64];
    s[threadIdx.x] = threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];
}

// Integer atomics from every thread of every block.
extern "C" __global__ void kemu_test_atomics(unsigned long long* counter, unsigned* maximum) {
    atomicAdd(counter, 1ull);
    atomicMax(maximum, blockIdx.x * blockDim.x + threadIdx.x);
}

// A write one element past the end of `p` (n elements).
extern "C" __global__ void kemu_test_oob(float* p, unsigned long long n) {
    if (threadIdx.x == 0 && blockIdx.x == 0) p[n] = 1.0f;
}

// 40 KiB of static shared memory, and at most 64 threads per block.
extern "C" __global__ void __launch_bounds__(64) kemu_test_big_shared(float* out) {
    __shared__ float s[10240];
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

// Dynamic shared memory: each thread writes and reads back its slot.
extern "C" __global__ void kemu_test_dynamic_shared(float* out) {
    extern __shared__ float dyn[];
    dyn[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = dyn[blockDim.x - 1 - threadIdx.x];
}

// x[i] = x[i] * 2 + a: the order of two launches shows in the result (the
// graph checks replay captured launches in stream order, with the
// parameter values of capture time).
extern "C" __global__ void kemu_test_scale_add(float* x, float a, unsigned long long n) {
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = x[i] * 2.0f + a;
}

// ---- tensor cores (kernels/mma.cuh over emu/include/kemu/tensor_core.h) ----
#include "mma.cuh"

// cvt.rna.tf32.f32 of n values.
extern "C" __global__ void kemu_test_tf32_round(const float* x, unsigned* out, unsigned n) {
    if (threadIdx.x < n) out[threadIdx.x] = tf32_round(x[threadIdx.x]);
}

// One mma.m16n8k8 per warp on that warp's A (16 x 8), B (8 x 8) and C
// (16 x 8), all row-major and dense (128, 64 and 128 floats per warp);
// writes D like C. The fragments are gathered here from the PTX ISA's
// layout tables (written out again, not taken from the emulator), so the
// check against a plain matrix product tests the emulator's layout too.
// `raw`: pass the operands' f32 bits unrounded (the emulator truncates them).
extern "C" __global__ void kemu_test_mma_tf32(const float* A, const float* B, const float* C, float* D, unsigned raw) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    A += warp * 128;
    B += warp * 64;
    C += warp * 128;
    D += warp * 128;
    const unsigned g = lane >> 2, t = lane % 4;
    // a0: row g, col t; a1: row g+8, col t; a2: row g, col t+4; a3: row g+8, col t+4.
    const float av[4] = {A[g * 8 + t], A[(g + 8) * 8 + t], A[g * 8 + t + 4], A[(g + 8) * 8 + t + 4]};
    // b0: row t, col g; b1: row t+4, col g.
    const float bv[2] = {B[t * 8 + g], B[(t + 4) * 8 + g]};
    // ci: row g (i < 2) or g+8, col 2t + (i & 1).
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) c[i] = C[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
    u32 a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = raw ? __float_as_uint(av[i]) : tf32_round(av[i]);
    for (int i = 0; i < 2; ++i) b[i] = raw ? __float_as_uint(bv[i]) : tf32_round(bv[i]);
    mma_m16n8k8_tf32(d, a, b, c);
    for (int i = 0; i < 4; ++i) D[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = d[i];
}

// An mma reached by half a warp (the other half exits): a GPU's
// mma.sync.aligned needs all 32 lanes.
extern "C" __global__ void kemu_test_mma_half_warp(float* out) {
    if (threadIdx.x >= 16) return;
    const u32 a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float c[4] = {0, 0, 0, 0};
    mma_m16n8k8_tf32(c, a, b, c);
    out[threadIdx.x] = c[0];
}

// The two halves of a warp at two different mma instructions (divergence).
extern "C" __global__ void kemu_test_mma_divergent(float* out) {
    const u32 a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float c[4] = {0, 0, 0, 0};
    if (threadIdx.x < 16) {
        mma_m16n8k8_tf32(c, a, b, c);
    } else {
        mma_m16n8k8_tf32(c, a, b, c);
    }
    out[threadIdx.x] = c[0];
}
