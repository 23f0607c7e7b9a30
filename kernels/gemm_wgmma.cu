// kestrel-target: compute_90a
// TF32 warpgroup tensor-core SGEMM for Hopper (sm_90a only; opt-in, never the
// default): C = act(alpha * op(A) * op(B) + beta * C + bias) with the
// semantics of kernels/gemm.cu and kestrel::ops::gemm (any m, n, k, leading
// dimensions, transposes, batch strides incl. 0, summed batch groups,
// beta == 0 never reads C, k == 0 has no product term), the products taken
// on TF32-rounded operands by wgmma.mma_async.m64n128k8 (kernels/wgmma.cuh),
// accumulating in f32.
//
// Tiling: a block of 256 threads (2 warpgroups) computes a 128 x 128 tile of
// C; warpgroup g owns rows 64 g .. 64 g + 63, all 128 columns: one
// m64n128k8 per 8 of k, 64 f32 accumulators per thread. k advances in steps
// of 16 through 3 shared-memory stages of op(A) (128 x 16) and op(B)
// (16 x 128, held as 128 x 16: the n index is the row).
//
// Layout: .tf32 wgmma reads both operands K-major from shared memory (the
// ISA has no transpose for .tf32), so each stage holds rows of 16 k
// (64 bytes) in the 64-byte swizzle layout the descriptors name: 8-row atoms
// of 512 bytes (the stride byte offset), the 16-byte chunk c of row r stored
// at chunk c ^ ((r >> 1) & 3), which is what the hardware's address swizzle
// (address bits 4-5 XOR bits 7-8) reads back. Every operand layout reaches
// it through registers: each thread fetches 2 quads (4 consecutive stored
// elements, float4 where aligned; kernels/gemm_quads.cuh) of each operand,
// rounds them with cvt.rna and stores them where the layout puts them, so
// a k-contiguous operand is one 16-byte store per quad and an
// outer-contiguous one (A transposed, B not) four 4-byte stores: the
// transposes cost nothing in the multiply.
//
// Pipeline per step s (stage s % 3): store the registers fetched during step
// s - 1; fence.proxy.async (generic-proxy stores -> the async proxy wgmma
// reads through); barrier; start the global loads of step s + 1; wgmma.fence,
// two wgmma.mma_async (k 0-7, 8-15), commit; wait until at most that group is
// pending. So the multiply of step s overlaps the loads of step s + 1 and
// the stores of step s + 1 into the next stage. Stage s + 1 % 3 was last read
// by step s - 2, which every thread's wait in step s - 1 completed before the
// barrier of step s: no second barrier.
#include "gemm_params.cuh"
#include "gemm_quads.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

#define WG_THREADS 256
#define WG_BM 128
#define WG_BN 128
#define WG_BK 16
#define WG_STAGES 3
// Words of one operand tile in a stage (128 rows of 16 tf32).
#define WG_TILE_WORDS (WG_BM * WG_BK)
// The 64-byte swizzle's atom: 8 rows of 64 bytes.
#define WG_ATOM_BYTES 512
#define WG_QUADS (WG_BM * WG_BK / (4 * WG_THREADS))
static_assert(WG_BM == WG_BN, "one tile size for both operands");
static_assert(WG_QUADS * 4 * WG_THREADS == WG_BM * WG_BK, "the quads cover the tile");
static_assert(WG_BK * 4 == 64, "a row of the 64-byte swizzle holds the stage's k");

// Word offset of element (o, kk) of a stage's operand tile: row o, 16-byte
// chunk kk / 4 swizzled by the row's place in its atom.
__device__ __forceinline__ int wg_word(int o, int kk) {
    return o * WG_BK + ((((kk >> 2) ^ (o >> 1)) & 3) << 2) + (kk & 3);
}

// Stores quad q of an operand tile, rounded to TF32, into the stage tile S.
__device__ __forceinline__ void wg_store(u32* S, bool k_contig, int q, const Quad& r) {
    int o, kk;
    quad_coords<WG_BM, WG_BK>(k_contig, q, o, kk);
    if (k_contig) {
        uint4 w;
        w.x = tf32_round(r.v[0]);
        w.y = tf32_round(r.v[1]);
        w.z = tf32_round(r.v[2]);
        w.w = tf32_round(r.v[3]);
        *reinterpret_cast<uint4*>(S + wg_word(o, kk)) = w;  // kk % 4 == 0: one whole chunk
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) S[wg_word(o + i, kk)] = tf32_round(r.v[i]);
    }
}

__device__ __forceinline__ bool wg_aligned16(const float* p, u64 ld) { return ((u64)p & 15) == 0 && (ld & 3) == 0; }

// The descriptor of rows `row0 ..` of a stage tile at k offset kk (0 or 8):
// K-major, 64-byte swizzle, atoms 512 bytes apart (the leading offset is
// unused by this layout: 16 bytes, field value 1).
__device__ __forceinline__ u64 wg_desc(const u32* tile, int row0, int kk) {
    return wgmma_descriptor(tile + row0 * WG_BK + kk, 16, WG_ATOM_BYTES, WGMMA_SWIZZLE_64B);
}

// The grid is (column tiles, row tiles, slices), each walked with a
// grid-stride loop. Slice z sums batch items [z * group, min((z + 1) * group,
// batch)) into C + z * stride_c (group == 1: the plain batched GEMM), in
// item order, as gemm.cu does.
// At least 2 blocks per SM (at most 128 registers): 142 without the hint, one
// block per SM, which leaves the other's multiply unable to hide a step's loads.
extern "C" __global__ void __launch_bounds__(WG_THREADS, 2)
    gemm_tf32_wgmma_128x128(Gemm p, u32 act_kind, float act_alpha, u32 bias_kind, const float* __restrict__ A,
                            const float* __restrict__ B, float* __restrict__ C, const float* __restrict__ bias,
                            u64 group) {
    // 3 stages x (A, B) x 8 KiB = 48 KiB, the static limit. Each tile starts
    // on an 8 KiB boundary, so every swizzle atom is aligned to its repeat
    // (the descriptors' base offset stays 0).
    __shared__ __align__(1024) u32 S[WG_STAGES][2][WG_TILE_WORDS];
    Activation act;
    act.kind = (ActivationKind)act_kind;
    act.alpha = act_alpha;

    const int t = threadIdx.x;
    const int wg = t / 128, wt = t % 128;  // warpgroup, thread in it
    const int w = wt / 32, lane = wt % 32;
    const int g = lane >> 2, tg = lane & 3;
    const bool a_kc = !p.trans_a;  // A as stored is k-contiguous
    const bool b_kc = p.trans_b;
    const u64 tiles_m = (p.m + WG_BM - 1) / WG_BM, tiles_n = (p.n + WG_BN - 1) / WG_BN;
    const u64 ktiles = (p.k + WG_BK - 1) / WG_BK;
    const u64 slices = (p.batch + group - 1) / group;

    for (u64 z = blockIdx.z; z < slices; z += gridDim.z) {
        const u64 item0 = z * group;
        const u64 items = min(group, p.batch - item0);
        const u64 steps = items * ktiles;  // (item, k tile) pairs, item-major
        for (u64 tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
            for (u64 tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
                const u64 m0 = tm * WG_BM, n0 = tn * WG_BN;
                float acc[64];
#pragma unroll
                for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

                u64 item = item0, k0 = 0;
                const float* Ai = A + item * p.stride_a;
                const float* Bi = B + item * p.stride_b;
                bool va = wg_aligned16(Ai, p.lda), vb = wg_aligned16(Bi, p.ldb);
                Quad qa[WG_QUADS], qb[WG_QUADS];
                if (steps > 0) {
#pragma unroll
                    for (int i = 0; i < WG_QUADS; ++i) {
                        qa[i] = fetch_quad<WG_BM, WG_BK>(Ai, p.lda, a_kc, va, m0, p.m, k0, p.k, t + i * WG_THREADS);
                        qb[i] = fetch_quad<WG_BM, WG_BK>(Bi, p.ldb, b_kc, vb, n0, p.n, k0, p.k, t + i * WG_THREADS);
                    }
                }
                for (u64 s = 0; s < steps; ++s) {
                    u32* As = S[s % WG_STAGES][0];
                    u32* Bs = S[s % WG_STAGES][1];
#pragma unroll
                    for (int i = 0; i < WG_QUADS; ++i) {
                        wg_store(As, a_kc, t + i * WG_THREADS, qa[i]);
                        wg_store(Bs, b_kc, t + i * WG_THREADS, qb[i]);
                    }
                    fence_proxy_async();
                    __syncthreads();
                    if (s + 1 < steps) {
                        k0 += WG_BK;
                        if (k0 >= p.k) {
                            k0 = 0;
                            ++item;
                            Ai = A + item * p.stride_a;
                            Bi = B + item * p.stride_b;
                            va = wg_aligned16(Ai, p.lda);
                            vb = wg_aligned16(Bi, p.ldb);
                        }
#pragma unroll
                        for (int i = 0; i < WG_QUADS; ++i) {
                            qa[i] = fetch_quad<WG_BM, WG_BK>(Ai, p.lda, a_kc, va, m0, p.m, k0, p.k, t + i * WG_THREADS);
                            qb[i] = fetch_quad<WG_BM, WG_BK>(Bi, p.ldb, b_kc, vb, n0, p.n, k0, p.k, t + i * WG_THREADS);
                        }
                    }
                    wgmma_fence_operands(acc);
                    wgmma_fence();
#pragma unroll
                    for (int kk = 0; kk < WG_BK; kk += 8)
                        wgmma_m64n128k8_tf32(acc, wg_desc(As, wg * 64, kk), wg_desc(Bs, 0, kk), 1u);
                    wgmma_commit_group();
                    wgmma_wait_group<1>();
                    wgmma_fence_operands(acc);
                }
                wgmma_wait_group<0>();
                wgmma_fence_operands(acc);
                // The next tile's first stores go to stage 0, which the other
                // warpgroup's last multiplies may still read until its wait.
                __syncthreads();

                // Epilogue, fused into the write-back as in gemm.cu: alpha,
                // beta * C (read only when beta != 0), bias, activation; relu
                // and leaky relu inline, the transcendental ones in a rolled
                // second pass over the thread's own elements. Accumulator
                // 4 j + e is row 16 w + g (+8 for e >= 2) of the warpgroup's
                // 64, column 8 j + 2 tg + (e & 1).
                float* Cz = C + z * p.stride_c;
                const u64 row_base = m0 + wg * 64 + w * 16 + g;
                float brow[2], bcol[16][2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const u64 row = row_base + h * 8;
                    brow[h] = (bias_kind == BIAS_PER_ROW && row < p.m) ? bias[row] : 0.0f;
                }
#pragma unroll
                for (int j = 0; j < 16; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const u64 col = n0 + j * 8 + 2 * tg + h;
                        bcol[j][h] = (bias_kind == BIAS_PER_COL && col < p.n) ? bias[col] : 0.0f;
                    }
                const bool is_relu = act.kind == ACT_RELU;
                const bool inline_act = is_relu || act.kind == ACT_LEAKY_RELU;
                const bool rolled_act = act.kind == ACT_ELU || act.kind == ACT_TANH || act.kind == ACT_SIGMOID;
#pragma unroll
                for (int j = 0; j < 16; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const u64 row = row_base + (e >> 1) * 8;
                        const u64 col = n0 + j * 8 + 2 * tg + (e & 1);
                        if (row >= p.m || col >= p.n) continue;
                        float* c = Cz + row * p.ldc + col;
                        // k == 0: no product term (BLAS), so a non-finite
                        // alpha must not turn 0 into NaN.
                        float v = p.k == 0 ? 0.0f : p.alpha * acc[j * 4 + e];
                        if (p.beta != 0.0f) v += p.beta * *c;
                        v += brow[e >> 1] + bcol[j][e & 1];
                        const float neg = is_relu ? 0.0f : act.alpha * v;
                        v = (!inline_act || v > 0.0f || v != v) ? v : neg;
                        *c = v;
                    }
                if (rolled_act) {
#pragma unroll 1
                    for (int x = 0; x < 64; ++x) {
                        const u64 row = row_base + ((x & 3) >> 1) * 8;
                        const u64 col = n0 + (x >> 2) * 8 + 2 * tg + (x & 1);
                        if (row >= p.m || col >= p.n) continue;
                        float* c = Cz + row * p.ldc + col;  // written above by this thread
                        *c = activation_apply(act, *c);
                    }
                }
            }
        }
    }
}
