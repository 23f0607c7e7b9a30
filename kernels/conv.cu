// Convolution's data movement: im2col and its adjoint col2im. The products
// themselves run in the GEMM kernels (kernels/gemm.cu).
// Semantics and layout: kestrel::ops::conv (mod.rs, cpu.rs).
//   x   [N, C, H, W]
//   col [C*R*S, N*OH*OW]: row (c*R + r)*S + s, column (img*OH + oy)*OW + ox
//       holds x[img, c, oy*stride_h + r - pad_top, ox*stride_w + s - pad_left]
//       (0 in the padding).
#include "conv_params.cuh"

// One thread per element of col (grid-stride); consecutive threads write
// consecutive columns, so the stores are coalesced and the loads walk a row
// of x with the horizontal stride.
extern "C" __global__ void conv_im2col(Conv2d p, const float* __restrict__ x, float* __restrict__ col) {
    const u64 ohw = p.out_h * p.out_w;
    const u64 cols = p.n * ohw;
    const u64 len = p.c * p.r * p.s * cols;
    GRID_STRIDE(i, len) {
        const u64 row = i / cols, j = i % cols;
        const u64 s = row % p.s, r = (row / p.s) % p.r, ch = row / (p.r * p.s);
        const u64 img = j / ohw, pix = j % ohw;
        const u64 oy = pix / p.out_w, ox = pix % p.out_w;
        // Padded coordinates are never negative: the pad test is `< pad`.
        const u64 iy = oy * p.stride_h + r, ix = ox * p.stride_w + s;
        float v = 0.0f;
        if (iy >= p.pad_top && iy - p.pad_top < p.h && ix >= p.pad_left && ix - p.pad_left < p.w) {
            v = x[((img * p.c + ch) * p.h + (iy - p.pad_top)) * p.w + (ix - p.pad_left)];
        }
        col[i] = v;
    }
}

// The adjoint of im2col as a gather: one thread per element of x sums the
// entries of col that im2col copied from it, in (r, s) order as the CPU
// does, so the result is deterministic without atomics. x is fully written.
extern "C" __global__ void conv_col2im(Conv2d p, const float* __restrict__ col, float* __restrict__ x) {
    const u64 ohw = p.out_h * p.out_w;
    const u64 cols = p.n * ohw;
    const u64 len = p.n * p.c * p.h * p.w;
    GRID_STRIDE(i, len) {
        const u64 ix = i % p.w, iy = (i / p.w) % p.h;
        const u64 plane = i / (p.h * p.w);  // img * C + ch
        const u64 ch = plane % p.c, img = plane / p.c;
        // Padded position of this pixel; output oy reads it through kernel
        // row r when oy * stride_h + r == py.
        const u64 py = iy + p.pad_top, px = ix + p.pad_left;
        float sum = 0.0f;
        for (u64 r = 0; r < p.r && r <= py; ++r) {
            const u64 ty = py - r;
            if (ty % p.stride_h != 0) continue;
            const u64 oy = ty / p.stride_h;
            if (oy >= p.out_h) continue;
            for (u64 s = 0; s < p.s && s <= px; ++s) {
                const u64 tx = px - s;
                if (tx % p.stride_w != 0) continue;
                const u64 ox = tx / p.stride_w;
                if (ox >= p.out_w) continue;
                const u64 row = (ch * p.r + r) * p.s + s;
                sum += col[row * cols + (img * p.out_h + oy) * p.out_w + ox];
            }
        }
        x[i] = sum;
    }
}
