// Kernels that check the emulated device itself (emu/selftest/selftest.cpp
// launches them): the rules it must enforce, the semantics of its warp
// operations, its memory poisoning and its thread orders. Built like any
// kernel file, but into a module of its own that only the self-test loads;
// never compiled to PTX (the self-test declares their entries itself).

// cp.async as the kernels reach it (path relative to this file).
#include "../../kernels/async_copy.cuh"

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

// ---- cp.async (kernels/async_copy.cuh) -------------------------------------

// Copies of 16, 8 and 4 bytes, a 16-byte copy with src-size 8 (zero-filled
// tail) and one with src-size 0 (all zeros), then wait_group 0.
extern "C" __global__ void kemu_test_cp_async_sizes(const float* src, float* out) {
    __shared__ __align__(16) float s[16];
    if (threadIdx.x == 0) {
        cp_async_16(&s[0], src, 16);
        cp_async_8(&s[4], src + 4, 8);
        cp_async_4(&s[6], src + 6, 4);
        cp_async_4(&s[7], src + 7, 4);
        cp_async_16(&s[8], src + 8, 8);
        cp_async_16(&s[12], src, 0);
        cp_async_commit();
        cp_async_wait<0>();
        for (int i = 0; i < 16; ++i) out[i] = s[i];
    }
}

// Two committed groups: wait_group 1 completes the older only, wait_group 0
// both; a copy issued after the last commit belongs to no group, so
// wait_group 0 leaves it pending until it is committed and waited for.
extern "C" __global__ void kemu_test_cp_async_groups(const float* src, float* out) {
    __shared__ __align__(16) float s[12];
    if (threadIdx.x == 0) {
        cp_async_16(&s[0], src, 16);
        cp_async_commit();
        cp_async_16(&s[4], src + 4, 16);
        cp_async_commit();
        cp_async_wait<1>();
        for (int i = 0; i < 8; ++i) out[i] = s[i];  // s[4..8] not yet
        cp_async_wait<0>();
        for (int i = 0; i < 8; ++i) out[8 + i] = s[i];
        cp_async_16(&s[8], src + 8, 16);
        cp_async_wait<0>();
        for (int i = 0; i < 4; ++i) out[16 + i] = s[8 + i];  // uncommitted: not yet
        cp_async_commit();
        cp_async_wait<0>();
        for (int i = 0; i < 4; ++i) out[20 + i] = s[8 + i];
    }
}

// Each thread copies 16 bytes into shared memory and the block reads the
// tile back after a barrier: with `wait` set, after its wait_group 0 (the
// right way); without, the reads come before any wait, which the emulator
// must show as stale data (the copy lands only at the wait).
extern "C" __global__ void kemu_test_cp_async_wait(const float* src, float* out, int wait) {
    __shared__ __align__(16) float s[32 * 4];
    const int t = threadIdx.x;
    cp_async_16(&s[t * 4], src + t * 4, 16);
    cp_async_commit();
    if (wait) cp_async_wait<0>();
    __syncthreads();
    for (int i = 0; i < 4; ++i) out[t * 4 + i] = s[(31 - t) * 4 + i];
}

// A 16-byte copy to a shared address that is only 4-byte aligned.
extern "C" __global__ void kemu_test_cp_async_misaligned(const float* src, float* out) {
    __shared__ __align__(16) float s[8];
    cp_async_16(&s[1], src, 16);
    cp_async_commit();
    cp_async_wait<0>();
    out[threadIdx.x] = s[1];
}

// A cp.async whose destination is global memory, not shared.
extern "C" __global__ void kemu_test_cp_async_not_shared(const float* src, float* out) {
    cp_async_4(out + threadIdx.x, src, 4);
    cp_async_commit();
    cp_async_wait<0>();
}

// A cp.async reading one float past the end of a 16-float source.
extern "C" __global__ void kemu_test_cp_async_oob(const float* src, float* out) {
    __shared__ __align__(16) float s[4];
    cp_async_4(&s[0], src + 16, 4);
    cp_async_commit();
    cp_async_wait<0>();
    out[threadIdx.x] = s[0];
}

// ---- wgmma (kernels/wgmma.cuh over emu/runtime/wgmma.h) --------------------
#include "wgmma.cuh"

// Byte offset of element (r, k) (k < 16) of a K-major operand of `rows` rows
// in the test's shared-memory layout, written here from the PTX ISA's
// canonical layouts ("Shared Memory Matrix Layout") rather than taken from
// the emulator:
//   0 no swizzle: 8-row x 16-byte core matrices, 128 bytes apart along k
//     (the leading byte offset), 512 apart per group of 8 rows (stride);
//   1 128-byte swizzle: 128-byte rows, 16-byte chunk c of row r at c ^ (r % 8);
//   2 64-byte swizzle: 64-byte rows, chunk c at c ^ ((r % 8) / 2);
//   3 32-byte swizzle: 32-byte rows (8 k), chunk c at c ^ ((r % 8) / 4); the
//     second 8 k in a second block of rows * 32 bytes.
__device__ unsigned wgmma_test_offset(unsigned layout, unsigned rows, unsigned r, unsigned k) {
    switch (layout) {
        case 0: return r / 8 * 512 + k / 4 * 128 + r % 8 * 16 + k % 4 * 4;
        case 1: return r * 128 + ((k / 4) ^ (r % 8)) * 16 + k % 4 * 4;
        case 2: return r * 64 + ((k / 4) ^ (r % 8 / 2)) * 16 + k % 4 * 4;
    }
    return k / 8 * rows * 32 + r * 32 + ((k % 8 / 4) ^ (r % 8 / 4)) * 16 + k % 4 * 4;
}

// The descriptor of k half `half` (k 8 half .. 8 half + 7) of an operand of
// `rows` rows at `base` in layout `layout`.
__device__ u64 wgmma_test_desc(const void* base, unsigned layout, unsigned rows, unsigned half) {
    const unsigned char* p = static_cast<const unsigned char*>(base);
    switch (layout) {
        case 0: return wgmma_descriptor(p + half * 256, 128, 512, WGMMA_SWIZZLE_NONE);
        case 1: return wgmma_descriptor(p + half * 32, 16, 1024, WGMMA_SWIZZLE_128B);
        case 2: return wgmma_descriptor(p + half * 32, 16, 512, WGMMA_SWIZZLE_64B);
    }
    return wgmma_descriptor(p + half * rows * 32, 16, 256, WGMMA_SWIZZLE_32B);
}

// D = C + A * B^T for one warpgroup: A 64 x 16, B 128 x 16 (n rows of k),
// C and D 64 x 128, all row-major, through two m64n128k8 (k 0-7, 8-15),
// operands rounded with cvt.rna and staged in layout mode & 3. The other
// bits of `mode` plant the mistakes the emulator must expose:
//   4  descriptors of the 64-byte swizzle over a 128-byte-swizzled stage
//   8  no fence.proxy.async after the shared-memory stores
//  16  no wgmma.wait_group (D is read while the multiplies are pending)
//  32  no wgmma.fence before the multiplies
//  64  scale-d false in the first multiply: D = A * B, C ignored
// The accumulator fragment (PTX ISA "WGMMA .m64nNk8 register fragment
// layout for accumulator matrix D") is written out again here.
extern "C" __global__ void kemu_test_wgmma(const float* A, const float* B, const float* C, float* D, unsigned mode) {
    __shared__ __align__(1024) unsigned char sa[64 * 128];
    __shared__ __align__(1024) unsigned char sb[128 * 128];
    const unsigned t = threadIdx.x, layout = mode & 3;
    for (unsigned e = t; e < 64 * 16; e += blockDim.x)
        *reinterpret_cast<u32*>(sa + wgmma_test_offset(layout, 64, e / 16, e % 16)) = tf32_round(A[e]);
    for (unsigned e = t; e < 128 * 16; e += blockDim.x)
        *reinterpret_cast<u32*>(sb + wgmma_test_offset(layout, 128, e / 16, e % 16)) = tf32_round(B[e]);
    if (!(mode & 8)) fence_proxy_async();
    __syncthreads();
    const unsigned w = t / 32, lane = t % 32;
    float d[64];
    for (unsigned i = 0; i < 64; ++i) {
        const unsigned row = 16 * w + lane / 4 + (i % 4 >= 2 ? 8 : 0), col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
        d[i] = C[row * 128 + col];
    }
    const unsigned dl = (mode & 4) ? 2 : layout;
    if (!(mode & 32)) wgmma_fence();
    for (unsigned half = 0; half < 2; ++half)
        wgmma_m64n128k8_tf32(d, wgmma_test_desc(sa, dl, 64, half), wgmma_test_desc(sb, dl, 128, half),
                             (mode & 64) && half == 0 ? 0u : 1u);
    wgmma_commit_group();
    if (!(mode & 16)) wgmma_wait_group<0>();
    for (unsigned i = 0; i < 64; ++i) {
        const unsigned row = 16 * w + lane / 4 + (i % 4 >= 2 ? 8 : 0), col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
        D[row * 128 + col] = d[i];
    }
}

// Warps 0-1 and warps 2-3 of one warpgroup at two different wgmma.fence
// instructions (divergence inside the warpgroup).
extern "C" __global__ void kemu_test_wgmma_divergent(float* out) {
    if (threadIdx.x < 64) {
        wgmma_fence();
    } else {
        wgmma_fence();
    }
    out[threadIdx.x] = 1.0f;
}
