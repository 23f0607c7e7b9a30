// Element-wise activations and the row-wise softmax.
// Element-wise shapes: x, y, dy, dx, g all [n].
// Softmax shapes: x, y, dy, dx [rows, cols] row-major; Softmax mirrors
// kestrel::ops::activation::Softmax.
#include "common.cuh"
#include "vec4.cuh"

static_assert(sizeof(Activation) == 8, "Activation mirrors a #[repr(C)] Rust struct of 8 bytes");

struct Softmax {
    u64 rows;
    u64 cols;
};
static_assert(sizeof(Softmax) == 16, "Softmax mirrors a #[repr(C)] Rust struct of 16 bytes");

extern "C" __global__ void activation_forward(Activation act, const float* __restrict__ x, float* __restrict__ y, u64 n) {
    GRID_STRIDE(i, n) { y[i] = activation_apply(act, x[i]); }
}

// x = f(x).
extern "C" __global__ void activation_forward_inplace(Activation act, float* __restrict__ x, u64 n) {
    GRID_STRIDE(i, n) { x[i] = activation_apply(act, x[i]); }
}

// dx = f'(x) * dy.
extern "C" __global__ void activation_backward(Activation act, const float* __restrict__ x, const float* __restrict__ y,
                                               const float* __restrict__ dy, float* __restrict__ dx, u64 n) {
    GRID_STRIDE(i, n) { dx[i] = activation_grad(act, x[i], y[i], dy[i]); }
}

// g = f'(x) * g.
extern "C" __global__ void activation_backward_inplace(Activation act, const float* __restrict__ x,
                                                       const float* __restrict__ y, float* __restrict__ g, u64 n) {
    GRID_STRIDE(i, n) { g[i] = activation_grad(act, x[i], y[i], g[i]); }
}

// g = f'(x) * g with y standing in for x (the host rejects the kinds where
// that loses information).
extern "C" __global__ void activation_backward_from_output(Activation act, const float* __restrict__ y,
                                                           float* __restrict__ g, u64 n) {
    GRID_STRIDE(i, n) {
        float yv = y[i];
        g[i] = activation_grad(act, yv, yv, g[i]);
    }
}

// ---- the same five in 16-byte vectors (ActivationKernel::Vec4): every
// buffer 16-byte aligned (the host checks), quads then the n % 4 tail; each
// element goes through the same activation_apply / activation_grad call as
// above, so the results are the scalar kernels' bits.

extern "C" __global__ void activation_forward_vec4(Activation act, const float* __restrict__ x,
                                                   float* __restrict__ y, u64 n) {
    VEC4_QUADS(q, n) {
        Lanes4 v = unpack4(load4_ro(x + 4 * q));
#pragma unroll
        for (int k = 0; k < 4; ++k) v.e[k] = activation_apply(act, v.e[k]);
        store4(y + 4 * q, pack4(v));
    }
    VEC4_TAIL(i, n) { y[i] = activation_apply(act, x[i]); }
}

extern "C" __global__ void activation_forward_inplace_vec4(Activation act, float* __restrict__ x, u64 n) {
    VEC4_QUADS(q, n) {
        Lanes4 v = unpack4(load4(x + 4 * q));
#pragma unroll
        for (int k = 0; k < 4; ++k) v.e[k] = activation_apply(act, v.e[k]);
        store4(x + 4 * q, pack4(v));
    }
    VEC4_TAIL(i, n) { x[i] = activation_apply(act, x[i]); }
}

extern "C" __global__ void activation_backward_vec4(Activation act, const float* __restrict__ x,
                                                    const float* __restrict__ y, const float* __restrict__ dy,
                                                    float* __restrict__ dx, u64 n) {
    VEC4_QUADS(q, n) {
        Lanes4 xv = unpack4(load4_ro(x + 4 * q)), yv = unpack4(load4_ro(y + 4 * q));
        Lanes4 g = unpack4(load4_ro(dy + 4 * q));
#pragma unroll
        for (int k = 0; k < 4; ++k) g.e[k] = activation_grad(act, xv.e[k], yv.e[k], g.e[k]);
        store4(dx + 4 * q, pack4(g));
    }
    VEC4_TAIL(i, n) { dx[i] = activation_grad(act, x[i], y[i], dy[i]); }
}

extern "C" __global__ void activation_backward_inplace_vec4(Activation act, const float* __restrict__ x,
                                                            const float* __restrict__ y, float* __restrict__ g,
                                                            u64 n) {
    VEC4_QUADS(q, n) {
        Lanes4 xv = unpack4(load4_ro(x + 4 * q)), yv = unpack4(load4_ro(y + 4 * q));
        Lanes4 gv = unpack4(load4(g + 4 * q));
#pragma unroll
        for (int k = 0; k < 4; ++k) gv.e[k] = activation_grad(act, xv.e[k], yv.e[k], gv.e[k]);
        store4(g + 4 * q, pack4(gv));
    }
    VEC4_TAIL(i, n) { g[i] = activation_grad(act, x[i], y[i], g[i]); }
}

extern "C" __global__ void activation_backward_from_output_vec4(Activation act, const float* __restrict__ y,
                                                                float* __restrict__ g, u64 n) {
    VEC4_QUADS(q, n) {
        Lanes4 yv = unpack4(load4_ro(y + 4 * q)), gv = unpack4(load4(g + 4 * q));
#pragma unroll
        for (int k = 0; k < 4; ++k) gv.e[k] = activation_grad(act, yv.e[k], yv.e[k], gv.e[k]);
        store4(g + 4 * q, pack4(gv));
    }
    VEC4_TAIL(i, n) {
        float yv = y[i];
        g[i] = activation_grad(act, yv, yv, g[i]);
    }
}

// ---- softmax: one warp per row, rows grid-strided over the warps ----

#define FULL_MASK 0xffffffffu

// max that keeps the first NaN it meets: once a NaN is in, it stays.
__device__ __forceinline__ float nan_max(float a, float b) {
    if (a != a) return a;
    if (b != b) return b;
    return b > a ? b : a;
}

__device__ __forceinline__ float warp_max_nan(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// The xor butterfly gives every lane the same sum in the same order.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// y[r] = exp(x[r] - max) / sum exp(x[r] - max). Blocks are whole warps.
extern "C" __global__ void softmax_forward(Softmax p, const float* __restrict__ x, float* __restrict__ y) {
    const u32 lane = threadIdx.x & 31u;
    const u64 warps = ((u64)gridDim.x * blockDim.x) >> 5;
    for (u64 r = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < p.rows; r += warps) {
        const float* xr = x + r * p.cols;
        float* yr = y + r * p.cols;
        // Lane 0 starts from x[0] as the CPU does; the other lanes start
        // from -inf, which never wins over a real value or a NaN.
        float m = -__int_as_float(0x7f800000);
        for (u64 j = lane; j < p.cols; j += 32) m = nan_max(m, xr[j]);
        m = warp_max_nan(m);
        float s = 0.0f;
        for (u64 j = lane; j < p.cols; j += 32) {
            float e = expf(xr[j] - m);
            yr[j] = e;
            s += e;
        }
        s = warp_sum(s);
        // s >= 1 unless the row is NaN (the max contributes exp(0) = 1).
        const float inv = 1.0f / s;
        // Each lane rescales the elements it wrote itself: no barrier needed.
        for (u64 j = lane; j < p.cols; j += 32) yr[j] *= inv;
    }
}

// dx = y * (dy - sum(dy * y)) per row.
extern "C" __global__ void softmax_backward(Softmax p, const float* __restrict__ y, const float* __restrict__ dy,
                                            float* __restrict__ dx) {
    const u32 lane = threadIdx.x & 31u;
    const u64 warps = ((u64)gridDim.x * blockDim.x) >> 5;
    for (u64 r = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < p.rows; r += warps) {
        const float* yr = y + r * p.cols;
        const float* dyr = dy + r * p.cols;
        float* dxr = dx + r * p.cols;
        float s = 0.0f;
        for (u64 j = lane; j < p.cols; j += 32) s += dyr[j] * yr[j];
        s = warp_sum(s);
        for (u64 j = lane; j < p.cols; j += 32) dxr[j] = yr[j] * (dyr[j] - s);
    }
}
