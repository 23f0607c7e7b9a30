// kestrel-target: compute_80
// TF32 tensor-core SGEMM (opt-in, never the default): C = act(alpha * op(A) *
// op(B) + beta * C + bias) with the semantics of kernels/gemm.cu and
// kestrel::ops::gemm (any m, n, k, leading dimensions, transposes, batch
// strides incl. 0, summed batch groups, beta == 0 never reads C, k == 0 has
// no product term), but the products are taken on TF32-rounded operands
// (10-bit mantissas) by mma.sync.m16n8k8, accumulating in f32. Needs sm_80.
//
// Tiling: a block of 256 threads (8 warps) computes a 128 x 128 tile of C,
// walking k in steps of 16. Each step stages a 128 x 16 tile of op(A) and a
// 16 x 128 tile of op(B) in shared memory, both stored outer-major with k
// contiguous ([128][16 + 4]), already rounded to TF32 (cvt.rna, once per
// element, not once per fragment read). The warps form a 2 x 4 grid; warp
// (wm, wn) owns a 64 x 32 sub-tile: 4 x 4 mma tiles of 16 x 8, 64 f32
// accumulators per lane. Per k step of 8 a lane reads its fragments with
// plain 32-bit shared loads (the ISA's fragment layout maps a warp's 32 reads
// onto 8 rows x 4 consecutive k, which the row stride of 20 words spreads
// over all 32 banks) and issues 16 mma. The next step's tiles are fetched
// from global memory into registers while the current one is multiplied
// (plain loads, float4 where aligned; cp.async comes with kernels/async_copy.cuh).
#include "gemm_params.cuh"
#include "gemm_quads.cuh"
#include "mma.cuh"

#define TF32_THREADS 256
#define TF32_BM 128
#define TF32_BN 128
#define TF32_BK 16
// Row stride of the shared tiles: BK + 4 words keeps rows 16-byte aligned
// (vector stores) and puts the 8 rows a fragment read touches 4 banks apart.
#define TF32_LDS (TF32_BK + 4)
#define TF32_WARPS_N 4
#define TF32_WM 64  // rows of C per warp
#define TF32_WN 32  // columns of C per warp
#define TF32_MT (TF32_WM / 16)  // mma tiles per warp along m
#define TF32_NT (TF32_WN / 8)   // and along n

// Quads (4 consecutive stored elements) per thread per operand tile.
#define TF32_QUADS (TF32_BM * TF32_BK / (4 * TF32_THREADS))
static_assert(TF32_BM == TF32_BN, "one quad count for both operands");
static_assert(TF32_QUADS * 4 * TF32_THREADS == TF32_BM * TF32_BK, "the quads cover the tile");

// Stores quad q, rounded to TF32, into the outer-major shared tile S[outer][k].
__device__ __forceinline__ void tf32_store(u32 (*S)[TF32_LDS], bool k_contig, int q, const Quad& r) {
    int o, kk;
    quad_coords<TF32_BM, TF32_BK>(k_contig, q, o, kk);
    if (k_contig) {
        uint4 w;
        w.x = tf32_round(r.v[0]);
        w.y = tf32_round(r.v[1]);
        w.z = tf32_round(r.v[2]);
        w.w = tf32_round(r.v[3]);
        *reinterpret_cast<uint4*>(&S[o][kk]) = w;
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) S[o + i][kk] = tf32_round(r.v[i]);
    }
}

__device__ __forceinline__ bool tf32_aligned16(const float* p, u64 ld) {
    return ((u64)p & 15) == 0 && (ld & 3) == 0;
}

// The grid is (column tiles, row tiles, slices), each walked with a
// grid-stride loop. Slice z sums batch items [z * group, min((z + 1) * group,
// batch)) into C + z * stride_c (group == 1: the plain batched GEMM), in
// item order, as gemm.cu does.
extern "C" __global__ void __launch_bounds__(TF32_THREADS)
    gemm_tf32_128x128(Gemm p, u32 act_kind, float act_alpha, u32 bias_kind, const float* __restrict__ A,
                      const float* __restrict__ B, float* __restrict__ C, const float* __restrict__ bias,
                      u64 group) {
    __shared__ __align__(16) u32 As[TF32_BM][TF32_LDS];
    __shared__ __align__(16) u32 Bs[TF32_BN][TF32_LDS];
    Activation act;
    act.kind = (ActivationKind)act_kind;
    act.alpha = act_alpha;

    const int t = threadIdx.x;
    const int warp = t / 32, lane = t % 32;
    const int g = lane >> 2, tg = lane & 3;  // the ISA's groupID, threadID_in_group
    const int wm = warp / TF32_WARPS_N, wn = warp % TF32_WARPS_N;
    const bool a_kc = !p.trans_a;  // A as stored is k-contiguous
    const bool b_kc = p.trans_b;
    const u64 tiles_m = (p.m + TF32_BM - 1) / TF32_BM, tiles_n = (p.n + TF32_BN - 1) / TF32_BN;
    const u64 ktiles = (p.k + TF32_BK - 1) / TF32_BK;
    const u64 slices = (p.batch + group - 1) / group;

    for (u64 z = blockIdx.z; z < slices; z += gridDim.z) {
        const u64 item0 = z * group;
        const u64 items = min(group, p.batch - item0);
        const u64 steps = items * ktiles;  // (item, k tile) pairs, item-major
        for (u64 tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
            for (u64 tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
                const u64 m0 = tm * TF32_BM, n0 = tn * TF32_BN;
                float acc[TF32_MT][TF32_NT][4];
#pragma unroll
                for (int i = 0; i < TF32_MT; ++i)
#pragma unroll
                    for (int j = 0; j < TF32_NT; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

                u64 item = item0, k0 = 0;
                const float* Ai = A + item * p.stride_a;
                const float* Bi = B + item * p.stride_b;
                bool va = tf32_aligned16(Ai, p.lda), vb = tf32_aligned16(Bi, p.ldb);
                Quad qa[TF32_QUADS], qb[TF32_QUADS];
                if (steps > 0) {
#pragma unroll
                    for (int i = 0; i < TF32_QUADS; ++i) {
                        qa[i] = fetch_quad<TF32_BM, TF32_BK>(Ai, p.lda, a_kc, va, m0, p.m, k0, p.k, t + i * TF32_THREADS);
                        qb[i] = fetch_quad<TF32_BM, TF32_BK>(Bi, p.ldb, b_kc, vb, n0, p.n, k0, p.k, t + i * TF32_THREADS);
                    }
                }
                for (u64 s = 0; s < steps; ++s) {
#pragma unroll
                    for (int i = 0; i < TF32_QUADS; ++i) {
                        tf32_store(As, a_kc, t + i * TF32_THREADS, qa[i]);
                        tf32_store(Bs, b_kc, t + i * TF32_THREADS, qb[i]);
                    }
                    __syncthreads();
                    if (s + 1 < steps) {
                        k0 += TF32_BK;
                        if (k0 >= p.k) {
                            k0 = 0;
                            ++item;
                            Ai = A + item * p.stride_a;
                            Bi = B + item * p.stride_b;
                            va = tf32_aligned16(Ai, p.lda);
                            vb = tf32_aligned16(Bi, p.ldb);
                        }
#pragma unroll
                        for (int i = 0; i < TF32_QUADS; ++i) {
                            qa[i] = fetch_quad<TF32_BM, TF32_BK>(Ai, p.lda, a_kc, va, m0, p.m, k0, p.k, t + i * TF32_THREADS);
                            qb[i] = fetch_quad<TF32_BM, TF32_BK>(Bi, p.ldb, b_kc, vb, n0, p.n, k0, p.k, t + i * TF32_THREADS);
                        }
                    }
#pragma unroll
                    for (int kk = 0; kk < TF32_BK; kk += 8) {
                        u32 a[TF32_MT][4], b[TF32_NT][2];
#pragma unroll
                        for (int i = 0; i < TF32_MT; ++i) {
                            const int r = wm * TF32_WM + i * 16 + g;
                            a[i][0] = As[r][kk + tg];
                            a[i][1] = As[r + 8][kk + tg];
                            a[i][2] = As[r][kk + tg + 4];
                            a[i][3] = As[r + 8][kk + tg + 4];
                        }
#pragma unroll
                        for (int j = 0; j < TF32_NT; ++j) {
                            const int c = wn * TF32_WN + j * 8 + g;
                            b[j][0] = Bs[c][kk + tg];
                            b[j][1] = Bs[c][kk + tg + 4];
                        }
#pragma unroll
                        for (int i = 0; i < TF32_MT; ++i)
#pragma unroll
                            for (int j = 0; j < TF32_NT; ++j) mma_m16n8k8_tf32(acc[i][j], a[i], b[j], acc[i][j]);
                    }
                    __syncthreads();
                }

                // Epilogue, fused into the write-back as in gemm.cu: alpha,
                // beta * C (read only when beta != 0), bias, activation; relu
                // and leaky relu inline, the transcendental ones in a rolled
                // second pass over the lane's own elements. Accumulator e of
                // tile (i, j) is row g (+8 for e >= 2), column 2 tg + (e & 1).
                float* Cz = C + z * p.stride_c;
                float brow[TF32_MT][2], bcol[TF32_NT][2];
#pragma unroll
                for (int i = 0; i < TF32_MT; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const u64 row = m0 + wm * TF32_WM + i * 16 + g + h * 8;
                        brow[i][h] = (bias_kind == BIAS_PER_ROW && row < p.m) ? bias[row] : 0.0f;
                    }
#pragma unroll
                for (int j = 0; j < TF32_NT; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const u64 col = n0 + wn * TF32_WN + j * 8 + 2 * tg + h;
                        bcol[j][h] = (bias_kind == BIAS_PER_COL && col < p.n) ? bias[col] : 0.0f;
                    }
                const bool is_relu = act.kind == ACT_RELU;
                const bool inline_act = is_relu || act.kind == ACT_LEAKY_RELU;
                const bool rolled_act = act.kind == ACT_ELU || act.kind == ACT_TANH || act.kind == ACT_SIGMOID;
#pragma unroll
                for (int i = 0; i < TF32_MT; ++i)
#pragma unroll
                    for (int j = 0; j < TF32_NT; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const u64 row = m0 + wm * TF32_WM + i * 16 + g + (e >> 1) * 8;
                            const u64 col = n0 + wn * TF32_WN + j * 8 + 2 * tg + (e & 1);
                            if (row >= p.m || col >= p.n) continue;
                            float* c = Cz + row * p.ldc + col;
                            // k == 0: no product term (BLAS), so a non-finite
                            // alpha must not turn 0 into NaN.
                            float v = p.k == 0 ? 0.0f : p.alpha * acc[i][j][e];
                            if (p.beta != 0.0f) v += p.beta * *c;
                            v += brow[i][e >> 1] + bcol[j][e & 1];
                            const float neg = is_relu ? 0.0f : act.alpha * v;
                            v = (!inline_act || v > 0.0f || v != v) ? v : neg;
                            *c = v;
                        }
                if (rolled_act) {
#pragma unroll 1
                    for (int x = 0; x < TF32_MT * TF32_NT * 4; ++x) {
                        const int i = x / (TF32_NT * 4), j = x / 4 % TF32_NT, e = x % 4;
                        const u64 row = m0 + wm * TF32_WM + i * 16 + g + (e >> 1) * 8;
                        const u64 col = n0 + wn * TF32_WN + j * 8 + 2 * tg + (e & 1);
                        if (row >= p.m || col >= p.n) continue;
                        float* c = Cz + row * p.ldc + col;  // written above by this lane
                        *c = activation_apply(act, *c);
                    }
                }
            }
        }
    }
}
