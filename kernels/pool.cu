// 2-D max pooling on NCHW. x, dx: [n, c, h, w]; y, dy, argmax: [n, c, oh, ow].
// argmax holds the index iy * w + ix within the (n, c) plane. Ties pick the
// first maximum in row-major order, the first NaN wins, padding (-inf) is
// never selected. MaxPool2d mirrors kestrel::ops::pool::MaxPool2d.
#include "common.cuh"
#include "vec4.cuh"

struct MaxPool2d {
    u64 n, c, h, w;
    u64 pool_h, pool_w;
    u64 stride_h, stride_w;
    u64 pad_top, pad_bottom, pad_left, pad_right;
    u64 out_h, out_w;
};
static_assert(sizeof(MaxPool2d) == 112, "MaxPool2d mirrors a #[repr(C)] Rust struct of 112 bytes");

// The maximum of window (oy, ox) of one plane and its plane index, with the
// CPU's exact scan: clip the window to the image, start from its first real
// cell, strict > keeps the first of equal maxima, a NaN returns at once.
__device__ __forceinline__ float window_max(const MaxPool2d& p, const float* __restrict__ plane, u64 oy, u64 ox,
                                            u64* arg_out) {
    const u64 y0 = oy * p.stride_h, x0 = ox * p.stride_w;
    const u64 ylo = (y0 > p.pad_top ? y0 : p.pad_top) - p.pad_top;
    const u64 yend = y0 + p.pool_h < p.pad_top + p.h ? y0 + p.pool_h : p.pad_top + p.h;
    const u64 yhi = yend - p.pad_top;
    const u64 xlo = (x0 > p.pad_left ? x0 : p.pad_left) - p.pad_left;
    const u64 xend = x0 + p.pool_w < p.pad_left + p.w ? x0 + p.pool_w : p.pad_left + p.w;
    const u64 xhi = xend - p.pad_left;
    u64 arg = ylo * p.w + xlo;
    float best = plane[arg];
    if (best != best) {
        *arg_out = arg;
        return best;
    }
    for (u64 iy = ylo; iy < yhi; ++iy) {
        for (u64 ix = xlo; ix < xhi; ++ix) {
            const float v = plane[iy * p.w + ix];
            if (v > best) {
                best = v;
                arg = iy * p.w + ix;
            } else if (v != v) {
                *arg_out = iy * p.w + ix;
                return v;
            }
        }
    }
    *arg_out = arg;
    return best;
}

// One thread per output element.
extern "C" __global__ void maxpool2d_forward(MaxPool2d p, const float* __restrict__ x, float* __restrict__ y,
                                             u32* __restrict__ argmax, u64 ylen) {
    const u64 ohw = p.out_h * p.out_w, hw = p.h * p.w;
    GRID_STRIDE(o, ylen) {
        const u64 plane = udiv64(o, ohw);
        const u64 j = o - plane * ohw;
        const u64 oy = udiv64(j, p.out_w), ox = j - oy * p.out_w;
        u64 arg;
        y[o] = window_max(p, x + plane * hw, oy, ox, &arg);
        argmax[o] = (u32)arg;
    }
}

extern "C" __global__ void maxpool2d_forward_inference(MaxPool2d p, const float* __restrict__ x,
                                                       float* __restrict__ y, u64 ylen) {
    const u64 ohw = p.out_h * p.out_w, hw = p.h * p.w;
    GRID_STRIDE(o, ylen) {
        const u64 plane = udiv64(o, ohw);
        const u64 j = o - plane * ohw;
        const u64 oy = udiv64(j, p.out_w), ox = j - oy * p.out_w;
        u64 arg;
        y[o] = window_max(p, x + plane * hw, oy, ox, &arg);
    }
}

// dx[i] for input element i: gathers dy over the windows that contain it
// and selected it, in row-major output order from 0.0f, the CPU's exact
// order of additions, so overlapping windows need no atomics and the sums
// are the CPU's bits. An argmax that points outside its window (not one the
// forward wrote) selects nothing.
__device__ __forceinline__ float pool_grad_at(const MaxPool2d& p, const float* __restrict__ dy,
                                              const u32* __restrict__ argmax, u64 i) {
    const u64 ohw = p.out_h * p.out_w, hw = p.h * p.w;
    const u64 plane = udiv64(i, hw);
    const u64 q = i - plane * hw;
    const u64 iy = udiv64(q, p.w), ix = q - iy * p.w;
    // Window oy covers padded rows [oy*sh, oy*sh + ph); input row iy is
    // padded row iy + pad_top.
    const u64 py = iy + p.pad_top, px = ix + p.pad_left;
    const u64 oy_lo = py + 1 > p.pool_h ? udiv64(py + 1 - p.pool_h + p.stride_h - 1, p.stride_h) : 0;
    u64 oy_hi = udiv64(py, p.stride_h);
    if (oy_hi > p.out_h - 1) oy_hi = p.out_h - 1;
    const u64 ox_lo = px + 1 > p.pool_w ? udiv64(px + 1 - p.pool_w + p.stride_w - 1, p.stride_w) : 0;
    u64 ox_hi = udiv64(px, p.stride_w);
    if (ox_hi > p.out_w - 1) ox_hi = p.out_w - 1;
    const float* dyp = dy + plane * ohw;
    const u32* ap = argmax + plane * ohw;
    float acc = 0.0f;
    for (u64 oy = oy_lo; oy <= oy_hi; ++oy) {
        for (u64 ox = ox_lo; ox <= ox_hi; ++ox) {
            const u64 o = oy * p.out_w + ox;
            if ((u64)ap[o] == q) acc += dyp[o];
        }
    }
    return acc;
}

// One thread per input element (a gather, see pool_grad_at).
extern "C" __global__ void maxpool2d_backward(MaxPool2d p, const float* __restrict__ dy,
                                              const u32* __restrict__ argmax, float* __restrict__ dx, u64 xlen) {
    GRID_STRIDE(i, xlen) { dx[i] = pool_grad_at(p, dy, argmax, i); }
}

// The backward's writes (4 bytes per input element, twice the bytes of its
// dy and argmax reads at 2x2/2) in 16-byte vectors (PoolKernel::Vec4): one
// thread per quad of input elements, each the same pool_grad_at gather, so
// the same bits; dx 16-byte aligned (the host checks).
extern "C" __global__ void maxpool2d_backward_vec4(MaxPool2d p, const float* __restrict__ dy,
                                                   const u32* __restrict__ argmax, float* __restrict__ dx,
                                                   u64 xlen) {
    VEC4_QUADS(q, xlen) {
        Lanes4 g;
#pragma unroll
        for (int k = 0; k < 4; ++k) g.e[k] = pool_grad_at(p, dy, argmax, 4 * q + k);
        store4(dx + 4 * q, pack4(g));
    }
    VEC4_TAIL(i, xlen) { dx[i] = pool_grad_at(p, dy, argmax, i); }
}
