// Implicit-GEMM convolution: the three passes as GEMMs whose operand tiles
// are gathered straight from the NCHW tensors, with no column matrix.
// Semantics: kestrel::ops::conv (mod.rs, cpu.rs); host side and the
// geometry of each pass: kestrel::ops::conv::cuda (cuda_implicit.rs).
//
// - conv_igemm_gather: C[m, j] = act(sum_k A[m, k] * B[k, j] + bias[m]), A
//   dense row-major, B gathered. Forward (m = K, j = an output pixel of the
//   whole batch, k = (c, r, s)) and backward data (m = C, j = an input pixel
//   of one stride phase, k = (k, kernel row, kernel column) of the taps that
//   land on the stride grid, kernel flipped) are this one kernel with
//   different geometry (struct ConvGather).
// - conv_igemm_wgrad: dW[k, (c, r, s)] over a fixed range of output pixels
//   (one split of the batch * OH * OW reduction) into its own slab;
//   conv_igemm_wgrad_reduce adds the slabs in split order.
// - conv_igemm_dgrad_weights: W rearranged per stride phase for backward
//   data's A (small: w_len floats).
//
// The tiling is v1's 64 x 64 (kernels/gemm.cu): 256 threads, BK 16, each
// thread a 4 x 4 micro-tile, the next k tile fetched into registers while
// the current one is multiplied. Every element is a sum over k in
// increasing order, one fmaf at a time from 0 (wgrad: within its split,
// then the splits in order), so results are the same bits run to run.
//
// No division in the k loop: a thread's B elements of the next k tile
// follow from the current ones by adding precomputed steps with at most
// one carry per level (see Tap and Pixel); divisions happen once per tile.
#include "conv_params.cuh"
#include "gemm_quads.cuh"

#define IG_THREADS 256
#define IG_BM 64
#define IG_BN 64
#define IG_BK 16
#define IG_TM 4
#define IG_TN 4
// Shared-memory row padding (floats), as in gemm.cu: rows stay 16-byte
// aligned for the float4 fragment reads.
#define IG_PAD 4
// B elements (k rows) each thread gathers per k tile in conv_igemm_gather.
#define IG_ROWS (IG_BN * IG_BK / IG_THREADS)
static_assert((IG_BM / IG_TM) * (IG_BN / IG_TN) == IG_THREADS, "one micro-tile per thread");
static_assert(IG_BM * IG_BK == 4 * IG_THREADS, "one A quad per thread per tile");
static_assert(IG_BK * (IG_BM / 4) == IG_THREADS && IG_BM == IG_BN, "wgrad: 4 rows of A, 4 columns of B per thread");

// Mirrors kestrel::ops::conv::cuda::ConvGather (#[repr(C)], every field an
// i64). The product is C[m, j] = sum over k < kdim of A[m * lda + k] *
// B[k, j], where
//   column j = img * cols_per_img + qy * qw + qx has its origin at
//     iy0 = qy * y_mul + y_off, ix0 = qx * x_mul + x_off of the source,
//   k = (a * kb + b) * ke + e reads source element
//     src[img * in_img + a * in_plane + (iy0 + dir * b) * in_row + (ix0 + dir * e)],
//     zero unless 0 <= iy0 + dir * b < in_h and 0 <= ix0 + dir * e < in_w,
//   C[m, j] is out[img * out_img + m * out_plane + (qy * oy_mul + oy_off) * out_row
//     + qx * ox_mul + ox_off].
struct ConvGather {
    long long m, n, kdim, lda;
    long long cols_per_img, qw;
    long long in_img, in_plane, in_row, in_h, in_w;
    long long y_mul, y_off, x_mul, x_off;
    long long kb, ke, dir;
    long long out_img, out_plane, out_row, oy_mul, oy_off, ox_mul, ox_off;
};
static_assert(sizeof(ConvGather) == 200, "ConvGather must match the Rust struct");

// The position of one k in its decomposition (a, b, e) and its offset from
// a column's origin, off = a * in_plane + dir * (b * in_row + e). `a` itself
// is not kept: k < kdim is tested on k.
struct Tap {
    int b, e;
    long long off;
};

// Per-launch constants of the tap walk, computed once per thread.
struct TapSteps {
    int kb, ke, dir;
    // k + IG_BK: e += se, b += sb (then at most one carry each), off += soff.
    int se, sb;
    long long soff;
    // Offset corrections of the carries: e wraps (e -= ke, b += 1), b wraps
    // (b -= kb, a += 1).
    long long e_wrap, b_wrap;
};

__device__ __forceinline__ TapSteps tap_steps(const ConvGather& g) {
    TapSteps t;
    t.kb = (int)g.kb;
    t.ke = (int)g.ke;
    t.dir = (int)g.dir;
    t.se = IG_BK % t.ke;
    t.sb = (IG_BK / t.ke) % t.kb;
    const long long sa = IG_BK / (g.kb * g.ke);
    t.soff = sa * g.in_plane + g.dir * (t.sb * g.in_row + t.se);
    t.e_wrap = g.dir * (g.in_row - g.ke);
    t.b_wrap = g.in_plane - g.dir * g.kb * g.in_row;
    return t;
}

// The tap of k (one division; once per tile).
__device__ __forceinline__ Tap tap_at(const ConvGather& g, long long k) {
    Tap t;
    const long long a = k / (g.kb * g.ke), be = k % (g.kb * g.ke);
    t.b = (int)(be / g.ke);
    t.e = (int)(be % g.ke);
    t.off = a * g.in_plane + g.dir * (t.b * g.in_row + t.e);
    return t;
}

// k + 1.
__device__ __forceinline__ void tap_next(Tap& t, const TapSteps& s) {
    ++t.e;
    t.off += s.dir;
    if (t.e == s.ke) {
        t.e = 0;
        ++t.b;
        t.off += s.e_wrap;
        if (t.b == s.kb) {
            t.b = 0;
            t.off += s.b_wrap;
        }
    }
}

// k + IG_BK: se < ke and sb < kb, so one carry per level suffices.
__device__ __forceinline__ void tap_advance(Tap& t, const TapSteps& s) {
    t.e += s.se;
    t.b += s.sb;
    t.off += s.soff;
    if (t.e >= s.ke) {
        t.e -= s.ke;
        ++t.b;
        t.off += s.e_wrap;
    }
    if (t.b >= s.kb) {
        t.b -= s.kb;
        t.off += s.b_wrap;
    }
}

// out = act(v + bias) for one element; relu and leaky relu inline (selects
// only), the transcendental ones by the caller's rolled second pass, as in
// kernels/gemm.cu's epilogue.
__device__ __forceinline__ float inline_activation(Activation act, float v) {
    const bool is_relu = act.kind == ACT_RELU;
    const bool inline_act = is_relu || act.kind == ACT_LEAKY_RELU;
    const float neg = is_relu ? 0.0f : act.alpha * v;
    return (!inline_act || v > 0.0f || v != v) ? v : neg;
}

// acc += As^T Bs over one k tile: thread (ty, tx) owns rows ty * 4 + i and
// columns tx * 4 + j of the block tile.
__device__ __forceinline__ void multiply_tile(float (&acc)[IG_TM][IG_TN], float (*As)[IG_BM + IG_PAD],
                                              float (*Bs)[IG_BN + IG_PAD], int ty, int tx) {
#pragma unroll
    for (int kk = 0; kk < IG_BK; ++kk) {
        const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
        const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < IG_TM; ++i)
#pragma unroll
            for (int j = 0; j < IG_TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

// The gathered B elements of thread t for the k tile whose first row is
// k0: column `col` of the tile, rows kq .. kq + IG_ROWS - 1, where `tap` is
// the tap of k0 + kq. Zero outside the image, past kdim or past n.
__device__ __forceinline__ void gather_b(float (&v)[IG_ROWS], const ConvGather& g, const TapSteps& s,
                                         const float* __restrict__ src, bool col_in, long long base, int iy0, int ix0,
                                         long long k, Tap tap) {
#pragma unroll
    for (int i = 0; i < IG_ROWS; ++i) {
        if (i > 0) tap_next(tap, s);
        const int iy = iy0 + s.dir * tap.b, ix = ix0 + s.dir * tap.e;
        const bool in = col_in && k + i < g.kdim && (unsigned)iy < (unsigned)g.in_h && (unsigned)ix < (unsigned)g.in_w;
        v[i] = in ? src[base + tap.off] : 0.0f;
    }
}

// The forward pass and one stride phase of backward data (see ConvGather).
// bias: per row of C (bias_kind BIAS_PER_ROW) or none. The grid is (column
// tiles, row tiles), each walked with a grid-stride loop.
extern "C" __global__ void __launch_bounds__(IG_THREADS)
    conv_igemm_gather(ConvGather g, u32 act_kind, float act_alpha, u32 bias_kind, const float* __restrict__ A,
                      const float* __restrict__ src, float* __restrict__ out, const float* __restrict__ bias) {
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    Activation act;
    act.kind = (ActivationKind)act_kind;
    act.alpha = act_alpha;
    const int t = threadIdx.x;
    const int tx = t % (IG_BN / IG_TN), ty = t / (IG_BN / IG_TN);
    // B: this thread gathers column bc, k rows bk .. bk + IG_ROWS - 1 (a
    // warp covers 32 consecutive columns: coalesced along a source row).
    const int bc = t % IG_BN, bk = (t / IG_BN) * IG_ROWS;
    // A: quad t of the k-contiguous tile (gemm_quads.cuh).
    int a_o, a_kk;
    quad_coords<IG_BM, IG_BK>(true, t, a_o, a_kk);
    const bool va = ((u64)A & 15) == 0 && (g.lda & 3) == 0;
    const TapSteps steps = tap_steps(g);
    const u64 tiles_m = ((u64)g.m + IG_BM - 1) / IG_BM, tiles_n = ((u64)g.n + IG_BN - 1) / IG_BN;
    const u64 ktiles = ((u64)g.kdim + IG_BK - 1) / IG_BK;
    const bool rolled_act = act.kind == ACT_ELU || act.kind == ACT_TANH || act.kind == ACT_SIGMOID;

    for (u64 tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
        for (u64 tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
            const long long m0 = (long long)(tm * IG_BM), n0 = (long long)(tn * IG_BN);
            // This thread's B column: its origin in the source (once per tile).
            const long long j = n0 + bc;
            const bool col_in = j < g.n;
            long long base = 0;
            int iy0 = 0, ix0 = 0;
            if (col_in) {
                const long long img = j / g.cols_per_img, q = j % g.cols_per_img;
                const long long qy = q / g.qw, qx = q % g.qw;
                iy0 = (int)(qy * g.y_mul + g.y_off);
                ix0 = (int)(qx * g.x_mul + g.x_off);
                base = img * g.in_img + (long long)iy0 * g.in_row + ix0;
            }
            Tap tap = tap_at(g, bk);
            float acc[IG_TM][IG_TN];
#pragma unroll
            for (int i = 0; i < IG_TM; ++i)
#pragma unroll
                for (int jj = 0; jj < IG_TN; ++jj) acc[i][jj] = 0.0f;

            long long k0 = 0;
            Quad qa;
            float qb[IG_ROWS];
            if (ktiles > 0) {
                qa = fetch_quad<IG_BM, IG_BK>(A, (u64)g.lda, true, va, (u64)m0, (u64)g.m, 0, (u64)g.kdim, t);
                gather_b(qb, g, steps, src, col_in, base, iy0, ix0, bk, tap);
            }
            for (u64 s = 0; s < ktiles; ++s) {
#pragma unroll
                for (int i = 0; i < 4; ++i) As[a_kk + i][a_o] = qa.v[i];
#pragma unroll
                for (int i = 0; i < IG_ROWS; ++i) Bs[bk + i][bc] = qb[i];
                __syncthreads();
                if (s + 1 < ktiles) {
                    k0 += IG_BK;
                    tap_advance(tap, steps);
                    qa = fetch_quad<IG_BM, IG_BK>(A, (u64)g.lda, true, va, (u64)m0, (u64)g.m, (u64)k0, (u64)g.kdim,
                                                  t);
                    gather_b(qb, g, steps, src, col_in, base, iy0, ix0, k0 + bk, tap);
                }
                multiply_tile(acc, As, Bs, ty, tx);
                __syncthreads();
            }

            // Epilogue: where each of the thread's columns lands in out.
            long long ocol[IG_TN];
#pragma unroll
            for (int jj = 0; jj < IG_TN; ++jj) {
                const long long c = n0 + tx * 4 + jj;
                ocol[jj] = -1;
                if (c < g.n) {
                    const long long img = c / g.cols_per_img, q = c % g.cols_per_img;
                    const long long qy = q / g.qw, qx = q % g.qw;
                    ocol[jj] = img * g.out_img + (qy * g.oy_mul + g.oy_off) * g.out_row + qx * g.ox_mul + g.ox_off;
                }
            }
#pragma unroll
            for (int i = 0; i < IG_TM; ++i) {
                const long long row = m0 + ty * 4 + i;
                if (row >= g.m) continue;
                const float b = bias_kind == BIAS_PER_ROW ? bias[row] : 0.0f;
#pragma unroll
                for (int jj = 0; jj < IG_TN; ++jj) {
                    if (ocol[jj] < 0) continue;
                    out[ocol[jj] + row * g.out_plane] = inline_activation(act, acc[i][jj] + b);
                }
            }
            if (rolled_act) {
                // Rows rolled, columns unrolled: ocol stays in registers
                // (a rolled column index would put it in local memory).
#pragma unroll 1
                for (int i = 0; i < IG_TM; ++i) {
                    const long long row = m0 + ty * 4 + i;
                    if (row >= g.m) continue;
#pragma unroll
                    for (int jj = 0; jj < IG_TN; ++jj) {
                        if (ocol[jj] < 0) continue;
                        float* o = out + ocol[jj] + row * g.out_plane;  // written above by this thread
                        *o = activation_apply(act, *o);
                    }
                }
            }
        }
    }
}

// An output pixel of the batch, j = (img * out_h + oy) * out_w + ox, walked
// in steps of IG_BK without division (one carry per level).
struct Pixel {
    int img, oy, ox;
};

__device__ __forceinline__ Pixel pixel_at(const Conv2d& p, u64 j) {
    const u64 ohw = p.out_h * p.out_w, q = j % ohw;
    Pixel x;
    x.img = (int)(j / ohw);
    x.oy = (int)(q / p.out_w);
    x.ox = (int)(q % p.out_w);
    return x;
}

// The sizes conv_igemm_wgrad's loads use, as 32-bit ints where they are
// extents (the host checks that they fit) and 64-bit where they are offsets.
struct WgradGeom {
    long long plane, x_img, y_img, ohw;
    int H, W, OW, sh, sw, pt, pl;
};

__device__ __forceinline__ WgradGeom wgrad_geom(const Conv2d& p) {
    WgradGeom g;
    g.ohw = (long long)(p.out_h * p.out_w);
    g.plane = (long long)(p.h * p.w);
    g.x_img = (long long)p.c * g.plane;
    g.y_img = (long long)p.k * g.ohw;
    g.H = (int)p.h;
    g.W = (int)p.w;
    g.OW = (int)p.out_w;
    g.sh = (int)p.stride_h;
    g.sw = (int)p.stride_w;
    g.pt = (int)p.pad_top;
    g.pl = (int)p.pad_left;
    return g;
}

// This thread's A elements (dy at its pixel, rows a_rows / ohw + i) and B
// elements (x at its pixel through taps i) of one k row; zero where the
// pixel is past its split (`in`), a row or tap past the matrix, or the tap
// falls in the padding.
__device__ __forceinline__ void wgrad_fetch(float (&va)[4], float (&vb)[4], const WgradGeom& g, const Pixel& px,
                                            bool in, const bool (&row_in)[4], const bool (&tap_in)[4],
                                            const long long (&toff)[4], const int (&tr)[4], const int (&ts)[4],
                                            long long a_rows, const float* __restrict__ x,
                                            const float* __restrict__ dy) {
    const long long aoff = px.img * g.y_img + (long long)px.oy * g.OW + px.ox + a_rows;
    const int py = px.oy * g.sh - g.pt, pxx = px.ox * g.sw - g.pl;
    const long long boff = px.img * g.x_img + (long long)py * g.W + pxx;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        va[i] = (in && row_in[i]) ? dy[aoff + i * g.ohw] : 0.0f;
        const bool b_in =
            in && tap_in[i] && (unsigned)(py + tr[i]) < (unsigned)g.H && (unsigned)(pxx + ts[i]) < (unsigned)g.W;
        vb[i] = b_in ? x[boff + toff[i]] : 0.0f;
    }
}

// dW over the output pixels [z * chunk, min((z + 1) * chunk, N * OH * OW))
// of the batch, for grid z: C[m = k, n = (c, r, s)] = sum_j dy[img, k, oy,
// ox] * x[img, c, oy * stride_h + r - pad_top, ox * stride_w + s - pad_left],
// the raw sum written to out + z * K * C*R*S (row-major [K, C*R*S]: dW itself
// when there is one split). The grid is (column tiles, row tiles, splits);
// the host makes every split non-empty and chunk a multiple of IG_BK.
extern "C" __global__ void __launch_bounds__(IG_THREADS)
    conv_igemm_wgrad(Conv2d p, const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
                     u64 splits, u64 chunk) {
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    const int t = threadIdx.x;
    const int tx = t % (IG_BN / IG_TN), ty = t / (IG_BN / IG_TN);
    // Loads: this thread's pixel is k row lk of the tile (a half-warp covers
    // 16 consecutive pixels: coalesced), its rows of A and columns of B are
    // lg * 4 .. lg * 4 + 3.
    const int lk = t % IG_BK, lg = t / IG_BK;
    const u64 m = p.k, n = p.c * p.r * p.s, rs = p.r * p.s;
    const u64 ohw = p.out_h * p.out_w, pixels = p.n * ohw;
    const WgradGeom geo = wgrad_geom(p);
    const long long plane = geo.plane;
    const int W = geo.W, OH = (int)p.out_h, OW = geo.OW;
    // Pixel j + IG_BK: ox += step_x, oy += step_y, img += step_img, one carry each.
    const int step_x = IG_BK % OW, step_y = (IG_BK / OW) % OH, step_img = (int)(IG_BK / ohw);
    const u64 tiles_m = (m + IG_BM - 1) / IG_BM, tiles_n = (n + IG_BN - 1) / IG_BN;

    for (u64 z = blockIdx.z; z < splits; z += gridDim.z) {
        const u64 kbeg = z * chunk, kend = min(kbeg + chunk, pixels);
        const u64 ktiles = kend > kbeg ? (kend - kbeg + IG_BK - 1) / IG_BK : 0;
        float* slab = out + z * m * n;
        for (u64 tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
            for (u64 tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
                const u64 m0 = tm * IG_BM, n0 = tn * IG_BN;
                // This thread's four taps (c, r, s) of B (once per tile).
                long long toff[4];
                int tr[4], ts[4];
                bool tap_in[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const u64 col = n0 + lg * 4 + i;
                    tap_in[i] = col < n;
                    const u64 c = col / rs, q = col % rs;
                    tr[i] = (int)(q / p.s);
                    ts[i] = (int)(q % p.s);
                    toff[i] = (long long)c * plane + (long long)tr[i] * W + ts[i];
                }
                bool row_in[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) row_in[i] = m0 + lg * 4 + i < m;
                const long long a_rows = (long long)(m0 + lg * 4) * (long long)ohw;

                float acc[IG_TM][IG_TN];
#pragma unroll
                for (int i = 0; i < IG_TM; ++i)
#pragma unroll
                    for (int jj = 0; jj < IG_TN; ++jj) acc[i][jj] = 0.0f;

                u64 j = kbeg + lk;
                Pixel px = pixel_at(p, j);
                float va[4], vb[4];
                if (ktiles > 0) wgrad_fetch(va, vb, geo, px, j < kend, row_in, tap_in, toff, tr, ts, a_rows, x, dy);
                for (u64 s = 0; s < ktiles; ++s) {
                    *reinterpret_cast<float4*>(&As[lk][lg * 4]) = make_float4(va[0], va[1], va[2], va[3]);
                    *reinterpret_cast<float4*>(&Bs[lk][lg * 4]) = make_float4(vb[0], vb[1], vb[2], vb[3]);
                    __syncthreads();
                    if (s + 1 < ktiles) {
                        j += IG_BK;
                        px.ox += step_x;
                        px.oy += step_y;
                        px.img += step_img;
                        if (px.ox >= OW) {
                            px.ox -= OW;
                            ++px.oy;
                        }
                        if (px.oy >= OH) {
                            px.oy -= OH;
                            ++px.img;
                        }
                        wgrad_fetch(va, vb, geo, px, j < kend, row_in, tap_in, toff, tr, ts, a_rows, x, dy);
                    }
                    multiply_tile(acc, As, Bs, ty, tx);
                    __syncthreads();
                }
#pragma unroll
                for (int i = 0; i < IG_TM; ++i) {
                    const u64 row = m0 + ty * 4 + i;
                    if (row >= m) continue;
#pragma unroll
                    for (int jj = 0; jj < IG_TN; ++jj) {
                        const u64 col = n0 + tx * 4 + jj;
                        if (col < n) slab[row * n + col] = acc[i][jj];
                    }
                }
            }
        }
    }
}

// dw[i] = sum over z < splits of P[z * len + i], in z order: the splits of
// conv_igemm_wgrad, combined the same way on every run.
extern "C" __global__ void conv_igemm_wgrad_reduce(float* __restrict__ dw, const float* __restrict__ P, u64 len,
                                                   u64 splits) {
    GRID_STRIDE(i, len) {
        float s = 0.0f;
        for (u64 z = 0; z < splits; ++z) s += P[z * len + i];
        dw[i] = s;
    }
}

// Rows of W of kernel-row phase r0 (those r with r % stride == r0) when the
// kernel has `len` rows: ceil((len - r0) / stride), 0 when r0 >= len.
__device__ __forceinline__ u64 phase_taps(u64 len, u64 stride, u64 r0) {
    return r0 < len ? (len - r0 + stride - 1) / stride : 0;
}

// Backward data's A, for every stride phase (r0, s0) in [0, stride_h) x
// [0, stride_w), row-major: the taps r = r0 + t * stride_h, s = s0 + u *
// stride_w as a dense row-major [C, K * tr * ts] matrix, element (c, (k *
// tr + t) * ts + u) = w[k, c, r, s], the phases one after another (their
// sizes add up to w's). One thread per element of w (grid-stride).
extern "C" __global__ void conv_igemm_dgrad_weights(Conv2d p, const float* __restrict__ w, float* __restrict__ wt) {
    const u64 len = p.k * p.c * p.r * p.s;
    GRID_STRIDE(i, len) {
        const u64 s = i % p.s, r = (i / p.s) % p.r, c = (i / (p.r * p.s)) % p.c, k = i / (p.c * p.r * p.s);
        const u64 r0 = r % p.stride_h, t = r / p.stride_h, s0 = s % p.stride_w, u = s / p.stride_w;
        const u64 tr = phase_taps(p.r, p.stride_h, r0), ts = phase_taps(p.s, p.stride_w, s0);
        // Taps of the phases before (r0, s0): whole phase rows above, then
        // the columns before s0 within row r0.
        u64 rows_before = 0, cols_before = 0;
        for (u64 q = 0; q < r0; ++q) rows_before += phase_taps(p.r, p.stride_h, q);
        for (u64 q = 0; q < s0; ++q) cols_before += phase_taps(p.s, p.stride_w, q);
        const u64 phase0 = p.c * p.k * (rows_before * p.s + tr * cols_before);
        wt[phase0 + c * (p.k * tr * ts) + (k * tr + t) * ts + u] = w[i];
    }
}
