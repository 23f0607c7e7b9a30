// The convolution parameters every conv kernel file takes (kernels/conv.cu,
// the im2col path; kernels/conv_implicit.cu, the implicit GEMM): one
// definition, so the mirrors of the Rust struct cannot drift apart.
#pragma once

#include "common.cuh"

// Mirrors kestrel::ops::conv::Conv2d (#[repr(C)], every field a usize).
struct Conv2d {
    u64 n, c, h, w, k, r, s;
    u64 stride_h, stride_w;
    u64 pad_top, pad_bottom, pad_left, pad_right;
    u64 out_h, out_w;
};
static_assert(sizeof(Conv2d) == 120, "Conv2d must match the Rust struct");
