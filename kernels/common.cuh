// Shared by every kernel file: fixed-width types, the structs mirrored from
// Rust (#[repr(C)] there, same field order here), and small device helpers.
// NVRTC compiles without the CUDA toolkit's headers, so nothing is included.
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;  // Rust usize on every 64-bit target

// Mirrors kestrel::ops::activation::{ActivationKind, Activation}.
enum ActivationKind : u32 { ACT_LINEAR = 0, ACT_RELU = 1, ACT_ELU = 2, ACT_LEAKY_RELU = 3, ACT_TANH = 4, ACT_SIGMOID = 5 };
struct Activation {
    ActivationKind kind;
    float alpha;
};

// Grid-stride loops: launches size their grid by occupancy, not by n.
#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

__device__ __forceinline__ float sigmoidf_stable(float x) {
    // Never overflows: exp of a non-positive number only.
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

// y = f(x); NaN propagates for every kind (x > 0 is false for NaN, so the
// else-branches must not produce a finite value from it).
__device__ __forceinline__ float activation_apply(Activation a, float x) {
    switch (a.kind) {
        case ACT_RELU: return (x > 0.0f || x != x) ? x : 0.0f;
        case ACT_ELU: return (x > 0.0f || x != x) ? x : a.alpha * expm1f(x);
        case ACT_LEAKY_RELU: return (x > 0.0f || x != x) ? x : a.alpha * x;
        case ACT_TANH: return tanhf(x);
        case ACT_SIGMOID: return sigmoidf_stable(x);
        default: return x;
    }
}

// ===== gpu_elem block: activation gradient, deterministic f64 block sums,
// ===== cheap index division. (Added with the activation, bias, batchnorm,
// ===== dropout and pool kernels.)

// a / b for the u64 indices every kernel carries; almost every real shape
// fits in 32 bits, where the division is several times cheaper.
__device__ __forceinline__ u64 udiv64(u64 a, u64 b) {
    if (((a | b) >> 32) == 0) return (u64)((u32)a / (u32)b);
    return a / b;
}

// dL/dx from x, y = f(x) and dL/dy: the same expressions as Rust's
// Activation::grad (NaN in x gives NaN for the piecewise kinds).
__device__ __forceinline__ float activation_grad(Activation a, float x, float y, float dy) {
    switch (a.kind) {
        case ACT_RELU: return x > 0.0f ? dy : (x != x ? x : 0.0f);
        case ACT_ELU: return x > 0.0f ? dy : (x != x ? x : dy * (y + a.alpha));
        case ACT_LEAKY_RELU: return x > 0.0f ? dy : (x != x ? x : dy * a.alpha);
        case ACT_TANH: return dy * (1.0f - y * y);
        case ACT_SIGMOID: return dy * y * (1.0f - y);
        default: return dy;
    }
}

// Block size of every reduction kernel that uses block_sum_f64.
#define REDUCE_THREADS 256

// Sum of v over the block in a fixed order (bit-identical run to run):
// warp butterflies, then warp 0 over the per-warp sums; lane 0's value is
// broadcast, so every thread gets the same bits. Every thread of the block
// must call it; blockDim.x a multiple of 32, at most 1024. Safe to call
// several times in a row (the leading barrier keeps a late reader of the
// previous result from seeing new partials).
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double warp_sums[32];
    __shared__ double total;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// Element index of sample j (0 <= j < n*spatial) of channel ch in an
// [n, c, spatial] tensor: image j / spatial, position j % spatial.
__device__ __forceinline__ u64 channel_sample_index(u64 c, u64 spatial, u64 ch, u64 j) {
    u64 img = udiv64(j, spatial);
    u64 off = j - img * spatial;
    return (img * c + ch) * spatial + off;
}

// Samples per block in the per-channel partial sums (bias gradient,
// batchnorm statistics): 16 per thread, a fixed function of the shape.
#define CHANNEL_CHUNK 4096ull
// ===== end gpu_elem block

// ===== column reductions (dense layout, [rows, cols] row-major): one
// ===== thread per column, so a warp reads 32 consecutive floats of a row
// ===== (coalesced), over a fixed chunk of COL_ROWS rows in row order; the
// ===== per-chunk partials are laid out [chunks, cols] (coalesced writes)
// ===== and combined in chunk order. Every sum is a fixed function of the
// ===== shape: bit-identical run to run.

// Rows per partial: 64 keeps the f64 partials at 1/32 of an f32 input's
// bytes per pass while giving n = c = 4096 enough blocks (1,024) to fill a
// GPU.
#define COL_ROWS 64ull
// Threads (columns) per block of the column kernels.
#define COL_THREADS 256

// Sum over chunks k, in order, of partial[k * cols + col].
__device__ __forceinline__ double col_partials_sum(const double* __restrict__ partial, u64 chunks, u64 cols, u64 col) {
    double s = 0.0;
    for (u64 k = 0; k < chunks; ++k) s += partial[k * cols + col];
    return s;
}

// The loops of a column stage 1: block y strides over row chunks, the
// threads of the x blocks over columns (no barrier inside, so the loops may
// diverge freely). The body sees `k` and `col`.
#define COL_CHUNK_LOOP(chunks, cols)                                   \
    for (u64 k = blockIdx.y; k < (chunks); k += gridDim.y)              \
        for (u64 col = (u64)blockIdx.x * blockDim.x + threadIdx.x; col < (cols); \
             col += (u64)gridDim.x * blockDim.x)

// One past the last row of chunk k.
__device__ __forceinline__ u64 col_chunk_end(u64 k, u64 rows) {
    return (k + 1) * COL_ROWS < rows ? (k + 1) * COL_ROWS : rows;
}
// ===== end column reductions
