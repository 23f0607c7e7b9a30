// The GEMM parameters every GEMM kernel file takes (kernels/gemm.cu, the v1
// kernels; kernels/gemm_v2.cu, sm_80+): one definition, so the mirrors of
// the Rust struct cannot drift apart.
#pragma once

#include "common.cuh"

// Mirrors kestrel::ops::gemm::Gemm (#[repr(C)]; usize = u64, bool = 1 byte).
struct Gemm {
    u64 m, n, k;
    u64 lda, ldb, ldc;
    u64 batch, stride_a, stride_b, stride_c;
    float alpha, beta;
    bool trans_a, trans_b;
};
static_assert(sizeof(Gemm) == 96, "Gemm must match the Rust struct");

// Mirrors kestrel::ops::gemm::cuda::BIAS_* (how the epilogue's bias is indexed).
enum BiasKind : u32 { BIAS_NONE = 0, BIAS_PER_ROW = 1, BIAS_PER_COL = 2 };
