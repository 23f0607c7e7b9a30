// SGEMM: C = act(alpha * op(A) * op(B) + beta * C + bias), row-major, any
// m, n, k, leading dimensions and transposes, batched through the grid's z.
// Semantics: kestrel::ops::gemm (mod.rs). Per batch item: op(A) m x k,
// op(B) k x n, C m x n (row stride ldc); beta == 0 never reads C.
//
// The classic shared-memory tiling: a block of 256 threads computes a
// BM x BN tile of C, walking k in steps of BK; each step stages a BM x BK
// tile of op(A) and a BK x BN tile of op(B) in shared memory (both stored
// k-major, [BK][BM] and [BK][BN], so that a thread reads its micro-tile's
// row and column fragments as float4), and each thread accumulates a TM x TN
// micro-tile in registers. The next step's tiles are fetched from global
// memory into registers while the current one is being multiplied.
//
// Every element of C is a sum over k in increasing order (then over the
// batch items of a summed group, in order), one fma at a time: the tile
// shape does not change the result, so both instantiations agree bit for bit.
#include "gemm_params.cuh"
#include "gemm_quads.cuh"

#define GEMM_THREADS 256
// Shared-memory row padding (floats): keeps rows 16-byte aligned for float4
// reads and spreads the transposing stores of k-contiguous operands over banks.
#define SMEM_PAD 4

// Stores thread t's quad into the k-major shared tile S[BK][BO + SMEM_PAD].
template <int BO, int BK>
__device__ __forceinline__ void store_quad(float (*S)[BO + SMEM_PAD], bool k_contig, int t, const Quad& q) {
    int o, kk;
    quad_coords<BO, BK>(k_contig, t, o, kk);
    if (k_contig) {
#pragma unroll
        for (int i = 0; i < 4; ++i) S[kk + i][o] = q.v[i];
    } else {
        *reinterpret_cast<float4*>(&S[kk][o]) = make_float4(q.v[0], q.v[1], q.v[2], q.v[3]);
    }
}

__device__ __forceinline__ bool aligned16(const float* p, u64 ld) {
    return ((u64)p & 15) == 0 && (ld & 3) == 0;
}

// The block tile is BM x BN; the 256 threads form a (BM/TM) x (BN/TN) grid
// (ty, tx), and thread (ty, tx) owns TM x TN elements: its rows are
// g * (BM * 4 / TM) + ty * 4 + {0..3} for g < TM/4, its columns likewise
// with tx. Splitting a thread's rows into groups of 4 spread BM/(TM/4)
// apart makes a warp's float4 fragment reads from shared memory contiguous
// (conflict-free) instead of strided by TM.
//
// The grid is (column tiles, row tiles, slices), each dimension walked with
// a grid-stride loop so that any size runs. Slice z covers batch items
// [z * group, min((z + 1) * group, batch)) and writes C + z * stride_c: with
// group == 1 that is the ordinary batched GEMM; with group > 1 the items of
// a slice are summed into one C (the gradient of an operand shared by the
// batch), in item order.
template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void gemm_tiled(const Gemm& p, Activation act, u32 bias_kind, const float* __restrict__ A,
                                           const float* __restrict__ B, float* __restrict__ C,
                                           const float* __restrict__ bias, u64 group) {
    static_assert((BM / TM) * (BN / TN) == GEMM_THREADS, "one micro-tile per thread");
    static_assert(TM % 4 == 0 && TN % 4 == 0 && BK % 4 == 0, "float4 fragments");
    static_assert(BM * BK == 4 * GEMM_THREADS && BN * BK == 4 * GEMM_THREADS, "one quad per thread per tile");
    __shared__ __align__(16) float As[BK][BM + SMEM_PAD];
    __shared__ __align__(16) float Bs[BK][BN + SMEM_PAD];

    const int t = threadIdx.x;
    const int tx = t % (BN / TN), ty = t / (BN / TN);
    constexpr int ROW_GROUP = BM * 4 / TM;  // distance between a thread's row groups
    constexpr int COL_GROUP = BN * 4 / TN;
    const bool a_kc = !p.trans_a;  // A as stored is k-contiguous
    const bool b_kc = p.trans_b;
    const u64 tiles_m = (p.m + BM - 1) / BM, tiles_n = (p.n + BN - 1) / BN;
    const u64 ktiles = (p.k + BK - 1) / BK;
    const u64 slices = (p.batch + group - 1) / group;

    for (u64 z = blockIdx.z; z < slices; z += gridDim.z) {
        const u64 item0 = z * group;
        const u64 items = min(group, p.batch - item0);
        const u64 steps = items * ktiles;  // (item, k tile) pairs, item-major
        for (u64 tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
            for (u64 tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
                const u64 m0 = tm * BM, n0 = tn * BN;
                float acc[TM][TN];
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

                // The step being fetched: batch item `item`, k offset `k0`.
                u64 item = item0, k0 = 0;
                const float* Ai = A + item * p.stride_a;
                const float* Bi = B + item * p.stride_b;
                bool va = aligned16(Ai, p.lda), vb = aligned16(Bi, p.ldb);
                Quad qa, qb;
                if (steps > 0) {
                    qa = fetch_quad<BM, BK>(Ai, p.lda, a_kc, va, m0, p.m, k0, p.k, t);
                    qb = fetch_quad<BN, BK>(Bi, p.ldb, b_kc, vb, n0, p.n, k0, p.k, t);
                }
                for (u64 s = 0; s < steps; ++s) {
                    store_quad<BM, BK>(As, a_kc, t, qa);
                    store_quad<BN, BK>(Bs, b_kc, t, qb);
                    __syncthreads();
                    if (s + 1 < steps) {
                        k0 += BK;
                        if (k0 >= p.k) {
                            k0 = 0;
                            ++item;
                            Ai = A + item * p.stride_a;
                            Bi = B + item * p.stride_b;
                            va = aligned16(Ai, p.lda);
                            vb = aligned16(Bi, p.ldb);
                        }
                        qa = fetch_quad<BM, BK>(Ai, p.lda, a_kc, va, m0, p.m, k0, p.k, t);
                        qb = fetch_quad<BN, BK>(Bi, p.ldb, b_kc, vb, n0, p.n, k0, p.k, t);
                    }
#pragma unroll
                    for (int kk = 0; kk < BK; ++kk) {
                        float a[TM], b[TN];
#pragma unroll
                        for (int g = 0; g < TM / 4; ++g) {
                            const float4 v = *reinterpret_cast<const float4*>(&As[kk][g * ROW_GROUP + ty * 4]);
                            a[g * 4 + 0] = v.x; a[g * 4 + 1] = v.y; a[g * 4 + 2] = v.z; a[g * 4 + 3] = v.w;
                        }
#pragma unroll
                        for (int g = 0; g < TN / 4; ++g) {
                            const float4 v = *reinterpret_cast<const float4*>(&Bs[kk][g * COL_GROUP + tx * 4]);
                            b[g * 4 + 0] = v.x; b[g * 4 + 1] = v.y; b[g * 4 + 2] = v.z; b[g * 4 + 3] = v.w;
                        }
#pragma unroll
                        for (int i = 0; i < TM; ++i)
#pragma unroll
                            for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
                    }
                    __syncthreads();
                }

                // Epilogue, fused into the write-back: alpha, beta * C (only
                // read when beta != 0), bias, activation. Relu and leaky relu
                // are applied here; the transcendental activations in a second,
                // rolled pass over the thread's own elements, so that their code
                // is not unrolled TM * TN times (it would be megabytes of PTX).
                float* Cz = C + z * p.stride_c;
                // The bias of each of the thread's rows and columns, 0 where
                // there is none (x + 0 == x), so the element loop has no branch on it.
                float brow[TM], bcol[TN];
#pragma unroll
                for (int i = 0; i < TM; ++i) {
                    const u64 row = m0 + (i / 4) * ROW_GROUP + ty * 4 + (i % 4);
                    brow[i] = (bias_kind == BIAS_PER_ROW && row < p.m) ? bias[row] : 0.0f;
                }
#pragma unroll
                for (int j = 0; j < TN; ++j) {
                    const u64 col = n0 + (j / 4) * COL_GROUP + tx * 4 + (j % 4);
                    bcol[j] = (bias_kind == BIAS_PER_COL && col < p.n) ? bias[col] : 0.0f;
                }
                const bool is_relu = act.kind == ACT_RELU;
                const bool inline_act = is_relu || act.kind == ACT_LEAKY_RELU;
                const bool rolled_act = act.kind == ACT_ELU || act.kind == ACT_TANH || act.kind == ACT_SIGMOID;
#pragma unroll
                for (int i = 0; i < TM; ++i) {
                    const u64 row = m0 + (i / 4) * ROW_GROUP + ty * 4 + (i % 4);
                    if (row >= p.m) continue;
#pragma unroll
                    for (int j = 0; j < TN; ++j) {
                        const u64 col = n0 + (j / 4) * COL_GROUP + tx * 4 + (j % 4);
                        if (col >= p.n) continue;
                        float* c = Cz + row * p.ldc + col;
                        // k == 0: no product term at all (BLAS), so a
                        // non-finite alpha must not turn 0 into NaN.
                        float v = p.k == 0 ? 0.0f : p.alpha * acc[i][j];
                        if (p.beta != 0.0f) v += p.beta * *c;
                        v += brow[i] + bcol[j];
                        // relu / leaky relu as in activation_apply, written with
                        // selects only: (x > 0 || x is NaN) ? x : (relu ? 0 : alpha * x).
                        const float neg = is_relu ? 0.0f : act.alpha * v;
                        v = (!inline_act || v > 0.0f || v != v) ? v : neg;
                        *c = v;
                    }
                }
                if (rolled_act) {
#pragma unroll 1
                    for (int e = 0; e < TM * TN; ++e) {
                        const int i = e / TN, j = e % TN;
                        const u64 row = m0 + (i / 4) * ROW_GROUP + ty * 4 + (i % 4);
                        const u64 col = n0 + (j / 4) * COL_GROUP + tx * 4 + (j % 4);
                        if (row >= p.m || col >= p.n) continue;
                        float* c = Cz + row * p.ldc + col;  // written above by this thread
                        *c = activation_apply(act, *c);
                    }
                }
            }
        }
    }
}

// Large tiles for large products: 128 x 128, BK 8, 8 x 8 per thread.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
    gemm_128x128(Gemm p, u32 act_kind, float act_alpha, u32 bias_kind, const float* __restrict__ A,
                 const float* __restrict__ B, float* __restrict__ C, const float* __restrict__ bias, u64 group) {
    Activation act;
    act.kind = (ActivationKind)act_kind;
    act.alpha = act_alpha;
    gemm_tiled<128, 128, 8, 8, 8>(p, act, bias_kind, A, B, C, bias, group);
}

// Small tiles for small or skinny products (more blocks): 64 x 64, BK 16,
// 4 x 4 per thread.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)
    gemm_64x64(Gemm p, u32 act_kind, float act_alpha, u32 bias_kind, const float* __restrict__ A,
               const float* __restrict__ B, float* __restrict__ C, const float* __restrict__ bias, u64 group) {
    Activation act;
    act.kind = (ActivationKind)act_kind;
    act.alpha = act_alpha;
    gemm_tiled<64, 64, 16, 4, 4>(p, act, bias_kind, A, B, C, bias, group);
}

// C[r, c] = beta * C[r, c] + sum_{g < parts} P[g, r, c], the sum in g order
// (C rows x cols with row stride ldc, P dense [parts, rows, cols]); beta == 0
// does not read C. Combines the partial products of a split summed GEMM.
extern "C" __global__ void gemm_sum_partials(float* __restrict__ C, u64 rows, u64 cols, u64 ldc,
                                             const float* __restrict__ P, u64 parts, float beta) {
    const u64 len = rows * cols;
    GRID_STRIDE(i, len) {
        float s = 0.0f;
        for (u64 g = 0; g < parts; ++g) s += P[g * len + i];
        float* c = C + (i / cols) * ldc + i % cols;
        *c = beta != 0.0f ? beta * *c + s : s;
    }
}
