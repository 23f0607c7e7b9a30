// kestrel-target: compute_80
// SGEMM v2 (sm_80+): C = act(alpha * op(A) * op(B) + beta * C + bias) with
// the semantics of kernels/gemm.cu (v1) and kestrel::ops::gemm, restructured
// for Ampere/Hopper:
// - operand tiles go global -> shared with cp.async (kernels/async_copy.cuh),
//   16 bytes per copy where the operand allows it, into two shared-memory
//   stages: the next k tile is in flight while the current one is multiplied,
//   without staging it in registers (v1's register prefetch costs 8-16
//   registers and a shared-memory store per element);
// - the 256 threads form 8 warps of 64 x 32 outputs each (2 x 4 warps over
//   the 128 x 128 block tile), each lane 8 x 8; a warp's fragment reads from
//   shared memory are explicit 64/128-bit loads, conflict-free in both
//   operand layouts;
// - split-K (gemm_v2_splitk + gemm_v2_splitk_reduce) for products with few
//   output tiles and a long k: each split writes its raw partial sum into its
//   own slab, and the reduction adds the slabs in split order before the
//   epilogue, so the result is the same bits on every run.
//
// cp.async cannot transpose, so each operand keeps its stored orientation
// in shared memory: "k-major" [BK][BO + PAD] when its outer index (rows of
// op(A), columns of op(B)) is contiguous in memory (A transposed, B not),
// "outer-major" [BO][BK + PAD] when k is contiguous (A not transposed, B
// transposed). The kernel is instantiated for the four layout pairs.
//
// Every element of C (without split-K) is a sum over k in increasing order,
// then over the batch items of a summed group in order, one fmaf at a time
// from 0, exactly as in v1: v1 and v2 give the same bits. Split-K sums each
// k range that way and then adds the ranges in order.
#include "async_copy.cuh"
#include "gemm_params.cuh"

#define V2_THREADS 256
#define V2_BM 128
#define V2_BN 128
#define V2_BK 16
#define V2_STAGES 2
// Row padding (floats): rows stay 16-byte aligned for cp.async and float4
// reads; with it an outer-major row is 5 16-byte units long, so the 8 rows a
// quarter-warp reads (consecutive rows) fall into 8 different bank groups.
#define V2_PAD 4
// Floats of one operand stage: the larger of the two layouts.
#define V2_OUTER_MAJOR (V2_BM * (V2_BK + V2_PAD))
#define V2_K_MAJOR (V2_BK * (V2_BM + V2_PAD))
#define V2_STAGE_FLOATS (V2_OUTER_MAJOR > V2_K_MAJOR ? V2_OUTER_MAJOR : V2_K_MAJOR)
static_assert(V2_BM == V2_BN, "one stage size serves both operands");
static_assert(V2_BM * V2_BK / 4 == 2 * V2_THREADS, "two 16-byte chunks per thread per operand tile");

// Warp layout: warp w covers rows (w / 4) * 64.. and columns (w % 4) * 32..
// of the block tile; lane l sits at (l / 4, l % 4) of an 8 x 4 lane grid.
#define WARP_ROWS 64
#define WARP_COLS 32

// Row (of the block tile) of a thread's i-th accumulator row. K-major A is
// read as float4 along m, so a lane's rows come in two runs of 4 (32 apart:
// a quarter-warp's 8 lanes then read 128 contiguous bytes). Outer-major A is
// read as float4 along k, one row at a time, so a lane's rows are 8 apart
// and the 8 lanes of a quarter-warp read 8 consecutive rows.
template <bool KC>
__device__ __forceinline__ int frag_row(int wm, int ly, int i) {
    return KC ? wm * WARP_ROWS + ly + 8 * i : wm * WARP_ROWS + (i / 4) * 32 + ly * 4 + (i % 4);
}
// Column likewise for B (k-major: runs of 4, 16 apart; outer-major: 4 apart).
template <bool KC>
__device__ __forceinline__ int frag_col(int wn, int lx, int j) {
    return KC ? wn * WARP_COLS + lx + 4 * j : wn * WARP_COLS + (j / 4) * 16 + lx * 4 + (j % 4);
}

// Starts the copies of the `BO x BK` tile of an operand at (o0, k0) into the
// stage S. KC: the operand is k-contiguous in memory (X[o * ld + kk]), else
// outer-contiguous (X[kk * ld + o]). Elements outside the `outer x kdim`
// operand become 0 (src-size zero-fill). `vec`: X is 16-byte aligned and ld a
// multiple of 4, so a chunk of 4 along the contiguous axis is one aligned
// 16-byte copy (o0, k0 and the chunk offsets are multiples of 4); otherwise
// four 4-byte copies.
template <bool KC>
__device__ __forceinline__ void load_tile(float* S, const float* X, u64 ld, bool vec, u64 o0, u64 outer, u64 k0,
                                          u64 kdim, int t) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const int chunk = t + c * V2_THREADS;
        // (o, kk): the chunk's first element in the tile; `run` its axis.
        int o, kk;
        float* dst;
        if (KC) {
            o = chunk / (V2_BK / 4);
            kk = (chunk % (V2_BK / 4)) * 4;
            dst = S + o * (V2_BK + V2_PAD) + kk;
        } else {
            kk = chunk / (V2_BM / 4);
            o = (chunk % (V2_BM / 4)) * 4;
            dst = S + kk * (V2_BM + V2_PAD) + o;
        }
        const u64 go = o0 + o, gk = k0 + kk;
        // In bounds along the non-contiguous axis, and how many of the 4
        // elements along the contiguous one exist.
        const bool line_in = KC ? go < outer : gk < kdim;
        const u64 pos = KC ? gk : go, lim = KC ? kdim : outer;
        const u32 valid = (!line_in || pos >= lim) ? 0u : (u32)min(lim - pos, (u64)4);
        const float* src = KC ? X + go * ld + gk : X + gk * ld + go;
        if (vec) {
            // src-size 4 * valid: the missing tail reads as zeros; with none
            // valid nothing is read (the aligned base stands in for src).
            cp_async_16(dst, valid ? src : X, valid * 4);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool in = (u32)e < valid;
                cp_async_4(dst + e, in ? src + e : X, in ? 4u : 0u);
            }
        }
    }
}

// An outer-major operand's fragment for 2 consecutive k (kc0, kc0 + 1),
// f[i][q] = element (outer(i), kc0 + q): one 64-bit load per row (or
// column), 16 registers. (4 k per 128-bit load would halve the load count
// but hold 32 registers per operand, 64 with both operands outer-major,
// which pushed ptxas to 255 registers and spills.)
// ROWS: the operand is A (outer = the thread's rows), else B (its columns).
// (Plain templates, not lambdas: NVRTC 12.2's PTX for lambdas here differed
// from run to run, which ci/ptx --check cannot allow.)
template <int PITCH, bool ROWS, class T>
__device__ __forceinline__ void frag_outer_major(float (&f)[8][2], const float* S, int kc0, const T& tl) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int o = ROWS ? tl.row(i) : tl.col(i);
        const float2 v = lds64(S, (u32)(o * PITCH + kc0));
        f[i][0] = v.x; f[i][1] = v.y;
    }
}
// A k-major operand's fragment for one k: f[i] = element (outer(i), kk),
// two 128-bit loads (outer(0..3) and outer(4..7) are runs of 4), loaded
// one k at a time to keep only 8 registers live.
template <int PITCH, bool ROWS, class T>
__device__ __forceinline__ void frag_k_major(float (&f)[8], const float* S, int kk, const T& tl) {
#pragma unroll
    for (int g = 0; g < 2; ++g) {
        const int o = ROWS ? tl.row(g * 4) : tl.col(g * 4);
        const float4 v = lds128(S, (u32)(kk * PITCH + o));
        f[g * 4 + 0] = v.x; f[g * 4 + 1] = v.y; f[g * 4 + 2] = v.z; f[g * 4 + 3] = v.w;
    }
}

// Where a thread's 8 x 8 accumulators sit in the block tile, and the product
// of one shared-memory stage (per 2 k and operand: eight 64-bit shared loads
// outer-major, four 128-bit loads k-major).
template <bool AKC, bool BKC>
struct Tile {
    // (Members are device functions by -default-device; `__device__` would
    // make them static in the emulated build, where it means `static inline`.)
    // Offsets of the warp and lane inside the block tile.
    int t, wm, wn, ly, lx;

    __forceinline__ int row(int i) const { return frag_row<AKC>(wm, ly, i); }
    __forceinline__ int col(int j) const { return frag_col<BKC>(wn, lx, j); }

    // acc += the product of one BK-deep stage (Sa, Sb), k in increasing order.
    __forceinline__ void multiply_stage(float (&acc)[8][8], const float* Sa, const float* Sb) const {
        // Rolled: fully unrolled (16 k), ptxas hoisted the fragment loads
        // of later k ahead and ran out of registers (255 and spills); one
        // iteration (2 k, 128 FMAs) bounds what it can hoist.
#pragma unroll 1
        for (int kc0 = 0; kc0 < V2_BK; kc0 += 2) {
            float ac[8][2], bc[8][2];
            if (AKC) frag_outer_major<V2_BK + V2_PAD, true>(ac, Sa, kc0, *this);
            if (BKC) frag_outer_major<V2_BK + V2_PAD, false>(bc, Sb, kc0, *this);
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                float a[8], b[8];
                if (AKC) {
#pragma unroll
                    for (int i = 0; i < 8; ++i) a[i] = ac[i][q];
                } else {
                    frag_k_major<V2_BM + V2_PAD, true>(a, Sa, kc0 + q, *this);
                }
                if (BKC) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) b[j] = bc[j][q];
                } else {
                    frag_k_major<V2_BN + V2_PAD, false>(b, Sb, kc0 + q, *this);
                }
#pragma unroll
                for (int i = 0; i < 8; ++i)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
        }
    }
};

// Starts (and commits as one group) the copies of step (item, kt) into the
// stage at As / Bs, then advances (item, kt) to the next step.
template <bool AKC, bool BKC>
__device__ __forceinline__ void fetch_step(float* As, float* Bs, const Gemm& p, const float* A, const float* B,
                                           u64& item, u64& kt, u64 kt0, u64 kt1, u64 m0, u64 n0, int t) {
    const float* Ai = A + item * p.stride_a;
    const float* Bi = B + item * p.stride_b;
    const bool va = ((u64)Ai & 15) == 0 && (p.lda & 3) == 0;
    const bool vb = ((u64)Bi & 15) == 0 && (p.ldb & 3) == 0;
    load_tile<AKC>(As, Ai, p.lda, va, m0, p.m, kt * V2_BK, p.k, t);
    load_tile<BKC>(Bs, Bi, p.ldb, vb, n0, p.n, kt * V2_BK, p.k, t);
    cp_async_commit();
    if (++kt == kt1) {
        kt = kt0;
        ++item;
    }
}

// acc = sum over the steps of items [item0, item0 + items) x k tiles
// [kt0, kt1) (item-major) of op(A) * op(B) for the block tile at (m0, n0),
// through the two cp.async stages As / Bs.
template <bool AKC, bool BKC>
__device__ __forceinline__ void mainloop(float (&acc)[8][8], const Tile<AKC, BKC>& tl, float* As, float* Bs,
                                         const Gemm& p, const float* A, const float* B, u64 item0, u64 items,
                                         u64 kt0, u64 kt1, u64 m0, u64 n0) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    const u64 per_item = kt1 - kt0;
    const u64 steps = items * per_item;
    if (steps == 0) return;
    // The step being fetched: batch item `item`, k tile `kt`.
    u64 item = item0, kt = kt0;
    fetch_step<AKC, BKC>(As, Bs, p, A, B, item, kt, kt0, kt1, m0, n0, tl.t);
    for (u64 s = 0; s < steps; ++s) {
        const int stage = (int)(s & 1);
        if (s + 1 < steps) {
            // Stage s^1 was last read in step s - 1, which ended with a barrier.
            fetch_step<AKC, BKC>(As + (stage ^ 1) * V2_STAGE_FLOATS, Bs + (stage ^ 1) * V2_STAGE_FLOATS, p, A, B,
                                 item, kt, kt0, kt1, m0, n0, tl.t);
            cp_async_wait<1>();  // step s's group is complete; s + 1 may still be in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // every thread's copies of step s are visible to all
        tl.multiply_stage(acc, As + stage * V2_STAGE_FLOATS, Bs + stage * V2_STAGE_FLOATS);
        __syncthreads();  // stage s is free for step s + 2's copies
    }
}

// C = act(alpha * acc + beta * C + bias) over the thread's elements of the
// block tile at (m0, n0) of C (row stride p.ldc): v1's epilogue, element for
// element (see kernels/gemm.cu). Relu and leaky relu are applied inline; the
// transcendental activations in a second, rolled pass over the thread's own
// elements, so that their code is not unrolled 64 times.
template <bool AKC, bool BKC>
__device__ __forceinline__ void epilogue(const float (&acc)[8][8], const Tile<AKC, BKC>& tl, const Gemm& p,
                                         Activation act, u32 bias_kind, float* Cz, const float* bias, u64 m0,
                                         u64 n0) {
    float brow[8], bcol[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u64 row = m0 + tl.row(i);
        brow[i] = (bias_kind == BIAS_PER_ROW && row < p.m) ? bias[row] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const u64 col = n0 + tl.col(j);
        bcol[j] = (bias_kind == BIAS_PER_COL && col < p.n) ? bias[col] : 0.0f;
    }
    const bool is_relu = act.kind == ACT_RELU;
    const bool inline_act = is_relu || act.kind == ACT_LEAKY_RELU;
    const bool rolled_act = act.kind == ACT_ELU || act.kind == ACT_TANH || act.kind == ACT_SIGMOID;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u64 row = m0 + tl.row(i);
        if (row >= p.m) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u64 col = n0 + tl.col(j);
            if (col >= p.n) continue;
            float* c = Cz + row * p.ldc + col;
            // k == 0: no product term at all (BLAS), so a non-finite alpha
            // must not turn 0 into NaN.
            float v = p.k == 0 ? 0.0f : p.alpha * acc[i][j];
            if (p.beta != 0.0f) v += p.beta * *c;
            v += brow[i] + bcol[j];
            const float neg = is_relu ? 0.0f : act.alpha * v;
            v = (!inline_act || v > 0.0f || v != v) ? v : neg;
            *c = v;
        }
    }
    if (rolled_act) {
#pragma unroll 1
        for (int e = 0; e < 64; ++e) {
            const u64 row = m0 + tl.row(e / 8), col = n0 + tl.col(e % 8);
            if (row >= p.m || col >= p.n) continue;
            float* c = Cz + row * p.ldc + col;  // written above by this thread
            *c = activation_apply(act, *c);
        }
    }
}

template <bool AKC, bool BKC>
__device__ __forceinline__ Tile<AKC, BKC> tile_of_thread() {
    Tile<AKC, BKC> tl;
    tl.t = threadIdx.x;
    const int w = tl.t / 32, l = tl.t % 32;
    tl.wm = w / 4;
    tl.wn = w % 4;
    tl.ly = l / 4;
    tl.lx = l % 4;
    return tl;
}

// The grid is (column tiles, row tiles, slices), each walked with a
// grid-stride loop; slice z sums batch items [z * group, ..) into
// C + z * stride_c (group 1: the plain batched GEMM), as in v1.
template <bool AKC, bool BKC>
__device__ __forceinline__ void gemm_v2_body(const Gemm& p, Activation act, u32 bias_kind, const float* A,
                                             const float* B, float* C, const float* bias, u64 group, float* As,
                                             float* Bs) {
    const Tile<AKC, BKC> tl = tile_of_thread<AKC, BKC>();
    const u64 tiles_m = (p.m + V2_BM - 1) / V2_BM, tiles_n = (p.n + V2_BN - 1) / V2_BN;
    const u64 ktiles = (p.k + V2_BK - 1) / V2_BK;
    const u64 slices = (p.batch + group - 1) / group;
    for (u64 z = blockIdx.z; z < slices; z += gridDim.z) {
        const u64 item0 = z * group;
        const u64 items = min(group, p.batch - item0);
        for (u64 tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
            for (u64 tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
                const u64 m0 = tm * V2_BM, n0 = tn * V2_BN;
                float acc[8][8];
                mainloop<AKC, BKC>(acc, tl, As, Bs, p, A, B, item0, items, 0, ktiles, m0, n0);
                epilogue<AKC, BKC>(acc, tl, p, act, bias_kind, C + z * p.stride_c, bias, m0, n0);
            }
        }
    }
}

// 128 x 128 block tiles, 8 warps of 64 x 32, BK 16, two cp.async stages.
extern "C" __global__ void __launch_bounds__(V2_THREADS)
    gemm_v2_128x128(Gemm p, u32 act_kind, float act_alpha, u32 bias_kind, const float* __restrict__ A,
                    const float* __restrict__ B, float* __restrict__ C, const float* __restrict__ bias, u64 group) {
    __shared__ __align__(16) float As[V2_STAGES * V2_STAGE_FLOATS];
    __shared__ __align__(16) float Bs[V2_STAGES * V2_STAGE_FLOATS];
    Activation act;
    act.kind = (ActivationKind)act_kind;
    act.alpha = act_alpha;
    // A as stored is k-contiguous unless transposed; B the other way round.
    if (!p.trans_a && !p.trans_b) gemm_v2_body<true, false>(p, act, bias_kind, A, B, C, bias, group, As, Bs);
    else if (!p.trans_a && p.trans_b) gemm_v2_body<true, true>(p, act, bias_kind, A, B, C, bias, group, As, Bs);
    else if (p.trans_a && !p.trans_b) gemm_v2_body<false, false>(p, act, bias_kind, A, B, C, bias, group, As, Bs);
    else gemm_v2_body<false, true>(p, act, bias_kind, A, B, C, bias, group, As, Bs);
}

// The partial products of split-K: grid z walks (item, split) pairs, pair
// z = item * splits + split; split s sums k tiles [s * chunk_tiles,
// min((s + 1) * chunk_tiles, k tiles)) and writes the raw sum (no alpha, no
// epilogue) into the dense m x n slab z of P. The host chooses splits and
// chunk_tiles so that every split has at least one k tile.
template <bool AKC, bool BKC>
__device__ __forceinline__ void splitk_body(const Gemm& p, const float* A, const float* B, float* P, u64 splits,
                                            u64 chunk_tiles, float* As, float* Bs) {
    const Tile<AKC, BKC> tl = tile_of_thread<AKC, BKC>();
    const u64 tiles_m = (p.m + V2_BM - 1) / V2_BM, tiles_n = (p.n + V2_BN - 1) / V2_BN;
    const u64 ktiles = (p.k + V2_BK - 1) / V2_BK;
    const u64 pairs = p.batch * splits;
    for (u64 z = blockIdx.z; z < pairs; z += gridDim.z) {
        const u64 item = z / splits, s = z % splits;
        // The split as a product of its own: k range [kb, kb + q.k), its
        // operands advanced to kb (a multiple of 16, so 16-byte alignment is
        // kept wherever the whole operand has it).
        const u64 kb = min(s * chunk_tiles, ktiles) * V2_BK;
        Gemm q = p;
        q.k = min(kb + chunk_tiles * V2_BK, p.k) - kb;
        const float* As_ = A + item * p.stride_a + (AKC ? kb : kb * p.lda);
        const float* Bs_ = B + item * p.stride_b + (BKC ? kb : kb * p.ldb);
        const u64 qtiles = (q.k + V2_BK - 1) / V2_BK;
        float* slab = P + z * p.m * p.n;
        for (u64 tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
            for (u64 tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
                const u64 m0 = tm * V2_BM, n0 = tn * V2_BN;
                float acc[8][8];
                mainloop<AKC, BKC>(acc, tl, As, Bs, q, As_, Bs_, 0, 1, 0, qtiles, m0, n0);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const u64 row = m0 + tl.row(i);
                    if (row >= p.m) continue;
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        const u64 col = n0 + tl.col(j);
                        if (col < p.n) slab[row * p.n + col] = acc[i][j];
                    }
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(V2_THREADS)
    gemm_v2_splitk(Gemm p, const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ P,
                   u64 splits, u64 chunk_tiles) {
    __shared__ __align__(16) float As[V2_STAGES * V2_STAGE_FLOATS];
    __shared__ __align__(16) float Bs[V2_STAGES * V2_STAGE_FLOATS];
    if (!p.trans_a && !p.trans_b) splitk_body<true, false>(p, A, B, P, splits, chunk_tiles, As, Bs);
    else if (!p.trans_a && p.trans_b) splitk_body<true, true>(p, A, B, P, splits, chunk_tiles, As, Bs);
    else if (p.trans_a && !p.trans_b) splitk_body<false, false>(p, A, B, P, splits, chunk_tiles, As, Bs);
    else splitk_body<false, true>(p, A, B, P, splits, chunk_tiles, As, Bs);
}

// C_item[r, c] = act(alpha * (sum over s < splits of P[item * splits + s, r,
// c], in s order) + beta * C_item[r, c] + bias) for every item of the batch
// (C_item = C + item * stride_c, row stride ldc); beta == 0 does not read C.
// The epilogue is v1's (k > 0 here: the host never splits k == 0).
extern "C" __global__ void gemm_v2_splitk_reduce(Gemm p, u32 act_kind, float act_alpha, u32 bias_kind,
                                                 const float* __restrict__ P, u64 splits, float* __restrict__ C,
                                                 const float* __restrict__ bias) {
    Activation act;
    act.kind = (ActivationKind)act_kind;
    act.alpha = act_alpha;
    const u64 slab = p.m * p.n;
    const u64 len = p.batch * slab;
    GRID_STRIDE(i, len) {
        const u64 item = i / slab, e = i % slab, row = e / p.n, col = e % p.n;
        const float* part = P + item * splits * slab + e;
        float s = part[0];
        for (u64 g = 1; g < splits; ++g) s += part[g * slab];
        float* c = C + item * p.stride_c + row * p.ldc + col;
        float v = p.alpha * s;
        if (p.beta != 0.0f) v += p.beta * *c;
        v += (bias_kind == BIAS_PER_ROW ? bias[row] : 0.0f) + (bias_kind == BIAS_PER_COL ? bias[col] : 0.0f);
        *c = activation_apply(act, v);
    }
}
