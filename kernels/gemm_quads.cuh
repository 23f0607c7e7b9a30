// Operand tiles of the tiled GEMMs (kernels/gemm.cu, kernels/gemm_tf32.cu):
// the quad a thread fetches and where it sits in the tile. One copy, so
// both kernels read their operands alike.
#pragma once

#include "gemm_params.cuh"

// Four consecutive elements of a stored operand (along its contiguous axis).
struct Quad {
    float v[4];
};

// An operand tile is `outer x BK` elements of op(X), where `outer` runs over
// the rows of op(A) or the columns of op(B). As stored, the operand is either
// k-contiguous (A not transposed, B transposed): element (o, kk) at
// X[o * ld + kk]; or outer-contiguous (A transposed, B not): X[kk * ld + o].
// Quad t is the 4 consecutive elements starting at (o, kk) along the
// contiguous axis; consecutive quads are consecutive addresses. A kernel
// that fetches one quad per thread has BO * BK == 4 * threads; one that
// fetches several passes t + i * threads.
template <int BO, int BK>
__device__ __forceinline__ void quad_coords(bool k_contig, int t, int& o, int& kk) {
    if (k_contig) {
        o = t / (BK / 4);
        kk = (t % (BK / 4)) * 4;
    } else {
        kk = t / (BO / 4);
        o = (t % (BO / 4)) * 4;
    }
}

// Fetches quad t of the tile at (o0, k0); elements outside the
// `outer x kdim` operand read as 0. `vec`: X is 16-byte aligned and ld is a
// multiple of 4, so a quad that lies fully inside is one aligned float4
// (o0, k0 and the quad offsets are multiples of 4).
template <int BO, int BK>
__device__ __forceinline__ Quad fetch_quad(const float* X, u64 ld, bool k_contig, bool vec, u64 o0,
                                           u64 outer, u64 k0, u64 kdim, int t) {
    int o, kk;
    quad_coords<BO, BK>(k_contig, t, o, kk);
    const u64 go = o0 + o, gk = k0 + kk;
    Quad q;
    if (k_contig) {
        const bool row_in = go < outer;
        if (vec && row_in && gk + 3 < kdim) {
            const float4 f = *reinterpret_cast<const float4*>(X + go * ld + gk);
            q.v[0] = f.x; q.v[1] = f.y; q.v[2] = f.z; q.v[3] = f.w;
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) q.v[i] = (row_in && gk + i < kdim) ? X[go * ld + gk + i] : 0.0f;
        }
    } else {
        const bool row_in = gk < kdim;
        if (vec && row_in && go + 3 < outer) {
            const float4 f = *reinterpret_cast<const float4*>(X + gk * ld + go);
            q.v[0] = f.x; q.v[1] = f.y; q.v[2] = f.z; q.v[3] = f.w;
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) q.v[i] = (row_in && go + i < outer) ? X[gk * ld + go + i] : 0.0f;
        }
    }
    return q;
}

