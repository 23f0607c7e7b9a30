// Batch normalization (Keras 2 semantics; see kestrel::ops::batchnorm).
// x, y, dy, dx: [n, c, spatial]; gamma, beta, saved and running statistics,
// dgamma, dbeta: [c]. Sample j of channel ch (0 <= j < m = n * spatial) is
// element (j / spatial * c + ch) * spatial + j % spatial.
//
// Per-channel sums are two-stage and deterministic: block (k, ch) sums the
// samples [k * CHANNEL_CHUNK, (k+1) * CHANNEL_CHUNK) of channel ch, each
// thread in f64 over a fixed strided subset, then the fixed block tree; a
// second kernel adds the chunk partials in chunk order in f64. The variance
// is two-pass (squared deviations from the f64 mean), like the CPU's.
#include "common.cuh"
#include "vec4.cuh"

// Mirrors kestrel::ops::batchnorm::VarianceMode (the host computes the
// factor; the kernels only carry it for layout).
enum VarianceMode : u32 { VAR_KERAS = 0, VAR_KERAS_FUSED = 1, VAR_TF_KERAS = 2, VAR_BIASED = 3, VAR_UNBIASED = 4 };

// Mirrors kestrel::ops::batchnorm::BatchNorm.
struct BatchNorm {
    u64 n;
    u64 c;
    u64 spatial;
    bool is_conv;
    float momentum;
    float epsilon;
    VarianceMode variance_mode;
};
static_assert(sizeof(BatchNorm) == 40, "BatchNorm mirrors a #[repr(C)] Rust struct of 40 bytes");

__device__ __forceinline__ u64 bn_channel_of(const BatchNorm& p, u64 i) {
    u64 row = udiv64(i, p.spatial);
    return row - udiv64(row, p.c) * p.c;
}

// Grid: x strides over chunks, y over channels; blockDim.x == REDUCE_THREADS.
// mode 0: partial = sum x; mode 1: partial = sum (x - mean64[ch])^2.
extern "C" __global__ void bn_stat_partials(BatchNorm p, const float* __restrict__ x, const double* __restrict__ mean64,
                                            u32 mode, double* __restrict__ partial, u64 chunks) {
    const u64 m = p.n * p.spatial;
    for (u64 ch = blockIdx.y; ch < p.c; ch += gridDim.y) {
        const double mu = mode ? mean64[ch] : 0.0;
        for (u64 k = blockIdx.x; k < chunks; k += gridDim.x) {
            const u64 j0 = k * CHANNEL_CHUNK;
            const u64 j1 = j0 + CHANNEL_CHUNK < m ? j0 + CHANNEL_CHUNK : m;
            double acc = 0.0;
            for (u64 j = j0 + threadIdx.x; j < j1; j += REDUCE_THREADS) {
                double v = (double)x[channel_sample_index(p.c, p.spatial, ch, j)];
                if (mode) {
                    double d = v - mu;
                    acc += d * d;
                } else {
                    acc += v;
                }
            }
            acc = block_sum_f64(acc);
            if (threadIdx.x == 0) partial[ch * chunks + k] = acc;
        }
    }
}

// mean64[ch] = (sum of the chunk partials in order) / m.
extern "C" __global__ void bn_mean(BatchNorm p, const double* __restrict__ partial, u64 chunks,
                                   double* __restrict__ mean64) {
    const double m = (double)(p.n * p.spatial);
    GRID_STRIDE(ch, p.c) {
        double s = 0.0;
        for (u64 k = 0; k < chunks; ++k) s += partial[ch * chunks + k];
        mean64[ch] = s / m;
    }
}

// From the squared-deviation partials: save_mean, save_inv_std =
// 1 / sqrt(var + eps) (f64, rounded once), and the running statistics in
// f32 with v = (float)(var * factor); factor is BatchNorm::variance_factor()
// computed on the host in f64.
// The per-channel tail of the training statistics, shared by both partial
// layouts: var is the f64 biased variance.
__device__ __forceinline__ void bn_finalize_channel(const BatchNorm& p, u64 ch, double var,
                                                    const double* __restrict__ mean64, double factor,
                                                    float* __restrict__ save_mean, float* __restrict__ save_inv_std,
                                                    float* __restrict__ running_mean,
                                                    float* __restrict__ running_var) {
    const float mom = p.momentum, keep = 1.0f - p.momentum;
    const float mean = (float)mean64[ch];
    save_mean[ch] = mean;
    save_inv_std[ch] = (float)(1.0 / sqrt(var + (double)p.epsilon));
    const float v = (float)(var * factor);
    // Written as two rounded products and a sum, like the CPU (no fma),
    // so the running statistics match it bit for bit.
    running_mean[ch] = __fadd_rn(__fmul_rn(running_mean[ch], mom), __fmul_rn(mean, keep));
    running_var[ch] = __fadd_rn(__fmul_rn(running_var[ch], mom), __fmul_rn(v, keep));
}

extern "C" __global__ void bn_finalize_training(BatchNorm p, const double* __restrict__ partial, u64 chunks,
                                                const double* __restrict__ mean64, double factor,
                                                float* __restrict__ save_mean, float* __restrict__ save_inv_std,
                                                float* __restrict__ running_mean, float* __restrict__ running_var) {
    const double m = (double)(p.n * p.spatial);
    GRID_STRIDE(ch, p.c) {
        double s = 0.0;
        for (u64 k = 0; k < chunks; ++k) s += partial[ch * chunks + k];
        bn_finalize_channel(p, ch, s / m, mean64, factor, save_mean, save_inv_std, running_mean, running_var);
    }
}

// inv_std[ch] = 1 / sqrt(running_var[ch] + eps), in f64, rounded once.
extern "C" __global__ void bn_inference_inv_std(BatchNorm p, const float* __restrict__ running_var,
                                                float* __restrict__ inv_std) {
    GRID_STRIDE(ch, p.c) { inv_std[ch] = (float)(1.0 / sqrt((double)running_var[ch] + (double)p.epsilon)); }
}

// One element of the forward normalization, the one expression both apply
// kernels use (so the compiler contracts it the same way in each).
__device__ __forceinline__ float bn_normalize(float xv, const float* __restrict__ gamma,
                                              const float* __restrict__ beta, const float* __restrict__ mean,
                                              const float* __restrict__ inv_std, u64 ch) {
    return gamma[ch] * ((xv - mean[ch]) * inv_std[ch]) + beta[ch];
}

// y = gamma * ((x - mean) * inv_std) + beta, per channel. Training passes
// the saved batch statistics; inference the running mean and the inv_std
// from bn_inference_inv_std.
extern "C" __global__ void bn_apply(BatchNorm p, const float* __restrict__ x, const float* __restrict__ gamma,
                                    const float* __restrict__ beta, const float* __restrict__ mean,
                                    const float* __restrict__ inv_std, float* __restrict__ y, u64 len) {
    GRID_STRIDE(i, len) {
        const u64 ch = bn_channel_of(p, i);
        y[i] = bn_normalize(x[i], gamma, beta, mean, inv_std, ch);
    }
}

// bn_apply in 16-byte vectors (the *Vec4 versions): x and y 16-byte
// aligned (the host checks), the per-channel inputs read per element. Each
// element is the one bn_normalize expression of bn_apply: the same bits.
extern "C" __global__ void bn_apply_vec4(BatchNorm p, const float* __restrict__ x, const float* __restrict__ gamma,
                                         const float* __restrict__ beta, const float* __restrict__ mean,
                                         const float* __restrict__ inv_std, float* __restrict__ y, u64 len) {
    VEC4_QUADS(q, len) {
        ChannelWalk w = channel_walk_at(4 * q, p.spatial, p.c);
        Lanes4 v = unpack4(load4_ro(x + 4 * q));
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (k) channel_walk_step(w, p.spatial, p.c);
            v.e[k] = bn_normalize(v.e[k], gamma, beta, mean, inv_std, w.ch);
        }
        store4(y + 4 * q, pack4(v));
    }
    VEC4_TAIL(i, len) { y[i] = bn_normalize(x[i], gamma, beta, mean, inv_std, bn_channel_of(p, i)); }
}

// Backward stage 1: per chunk, sum dy and sum dy * x_hat (x_hat in f32 as
// the forward computed it, the product in f64).
extern "C" __global__ void bn_backward_partials(BatchNorm p, const float* __restrict__ x, const float* __restrict__ dy,
                                                const float* __restrict__ save_mean,
                                                const float* __restrict__ save_inv_std,
                                                double* __restrict__ partial_dy, double* __restrict__ partial_dy_xhat,
                                                u64 chunks) {
    const u64 m = p.n * p.spatial;
    for (u64 ch = blockIdx.y; ch < p.c; ch += gridDim.y) {
        const float mu = save_mean[ch], is = save_inv_std[ch];
        for (u64 k = blockIdx.x; k < chunks; k += gridDim.x) {
            const u64 j0 = k * CHANNEL_CHUNK;
            const u64 j1 = j0 + CHANNEL_CHUNK < m ? j0 + CHANNEL_CHUNK : m;
            double a = 0.0, b = 0.0;
            for (u64 j = j0 + threadIdx.x; j < j1; j += REDUCE_THREADS) {
                const u64 i = channel_sample_index(p.c, p.spatial, ch, j);
                const double g = (double)dy[i];
                const float xh = __fmul_rn(__fsub_rn(x[i], mu), is);
                a += g;
                b += g * (double)xh;
            }
            a = block_sum_f64(a);
            b = block_sum_f64(b);
            if (threadIdx.x == 0) {
                partial_dy[ch * chunks + k] = a;
                partial_dy_xhat[ch * chunks + k] = b;
            }
        }
    }
}

// The per-channel tail of the backward sums, shared by both partial layouts.
__device__ __forceinline__ void bn_backward_channel(const BatchNorm& p, u64 ch, double a, double b, double m,
                                                    const float* __restrict__ gamma,
                                                    const float* __restrict__ save_inv_std, float* __restrict__ dgamma,
                                                    float* __restrict__ dbeta, float* __restrict__ coefs) {
    dbeta[ch] = (float)a;
    dgamma[ch] = (float)b;
    coefs[ch] = __fmul_rn(gamma[ch], save_inv_std[ch]);
    coefs[p.c + ch] = (float)(a / m);
    coefs[2 * p.c + ch] = (float)(b / m);
}

// Backward stage 2: dbeta, dgamma, and the per-channel coefficients of dx
// (coef = gamma * inv_std, mean_dy, mean_dy_xhat), in the scratch `coefs`
// laid out [3, c].
extern "C" __global__ void bn_backward_finalize(BatchNorm p, const double* __restrict__ partial_dy,
                                                const double* __restrict__ partial_dy_xhat, u64 chunks,
                                                const float* __restrict__ gamma,
                                                const float* __restrict__ save_inv_std, float* __restrict__ dgamma,
                                                float* __restrict__ dbeta, float* __restrict__ coefs) {
    const double m = (double)(p.n * p.spatial);
    GRID_STRIDE(ch, p.c) {
        double a = 0.0, b = 0.0;
        for (u64 k = 0; k < chunks; ++k) {
            a += partial_dy[ch * chunks + k];
            b += partial_dy_xhat[ch * chunks + k];
        }
        bn_backward_channel(p, ch, a, b, m, gamma, save_inv_std, dgamma, dbeta, coefs);
    }
}

// One element of dx, the one expression both dx kernels use.
__device__ __forceinline__ float bn_dx(const BatchNorm& p, float xv, float g, const float* __restrict__ save_mean,
                                       const float* __restrict__ save_inv_std, const float* __restrict__ coefs,
                                       u64 ch) {
    const float xh = (xv - save_mean[ch]) * save_inv_std[ch];
    return coefs[ch] * ((g - coefs[p.c + ch]) - xh * coefs[2 * p.c + ch]);
}

// dx = coef * ((dy - mean_dy) - x_hat * mean_dy_xhat).
extern "C" __global__ void bn_backward_dx(BatchNorm p, const float* __restrict__ x, const float* __restrict__ dy,
                                          const float* __restrict__ save_mean, const float* __restrict__ save_inv_std,
                                          const float* __restrict__ coefs, float* __restrict__ dx, u64 len) {
    GRID_STRIDE(i, len) {
        const u64 ch = bn_channel_of(p, i);
        dx[i] = bn_dx(p, x[i], dy[i], save_mean, save_inv_std, coefs, ch);
    }
}

// bn_backward_dx in 16-byte vectors (the *Vec4 versions): x, dy and dx
// 16-byte aligned (the host checks); each element is bn_dx, the same bits.
extern "C" __global__ void bn_backward_dx_vec4(BatchNorm p, const float* __restrict__ x, const float* __restrict__ dy,
                                               const float* __restrict__ save_mean,
                                               const float* __restrict__ save_inv_std,
                                               const float* __restrict__ coefs, float* __restrict__ dx, u64 len) {
    VEC4_QUADS(q, len) {
        ChannelWalk w = channel_walk_at(4 * q, p.spatial, p.c);
        Lanes4 xv = unpack4(load4_ro(x + 4 * q)), g = unpack4(load4_ro(dy + 4 * q));
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (k) channel_walk_step(w, p.spatial, p.c);
            g.e[k] = bn_dx(p, xv.e[k], g.e[k], save_mean, save_inv_std, coefs, w.ch);
        }
        store4(dx + 4 * q, pack4(g));
    }
    VEC4_TAIL(i, len) { dx[i] = bn_dx(p, x[i], dy[i], save_mean, save_inv_std, coefs, bn_channel_of(p, i)); }
}

// ===== Columns: the dense layout (spatial == 1, x is [n, c] row-major),
// ===== one thread per channel reading whole rows (see COL_CHUNK_LOOP in
// ===== common.cuh). Partials are [chunks, c] with chunks = ceil(n /
// ===== COL_ROWS); each is the f64 sum over its rows in row order. The host
// ===== runs these only for spatial == 1.

// mode 0: partial = sum x; mode 1: partial = sum (x - mean64[ch])^2.
extern "C" __global__ void bn_col_stat_partials(BatchNorm p, const float* __restrict__ x,
                                                const double* __restrict__ mean64, u32 mode,
                                                double* __restrict__ partial, u64 chunks) {
    COL_CHUNK_LOOP(chunks, p.c) {
        const u64 r0 = k * COL_ROWS, r1 = col_chunk_end(k, p.n);
        const double mu = mode ? mean64[col] : 0.0;
        double acc = 0.0;
        for (u64 r = r0; r < r1; ++r) {
            const double v = (double)x[r * p.c + col];
            if (mode) {
                const double d = v - mu;
                acc += d * d;
            } else {
                acc += v;
            }
        }
        partial[k * p.c + col] = acc;
    }
}

extern "C" __global__ void bn_col_mean(BatchNorm p, const double* __restrict__ partial, u64 chunks,
                                       double* __restrict__ mean64) {
    const double m = (double)p.n;
    GRID_STRIDE(ch, p.c) { mean64[ch] = col_partials_sum(partial, chunks, p.c, ch) / m; }
}

extern "C" __global__ void bn_col_finalize_training(BatchNorm p, const double* __restrict__ partial, u64 chunks,
                                                    const double* __restrict__ mean64, double factor,
                                                    float* __restrict__ save_mean, float* __restrict__ save_inv_std,
                                                    float* __restrict__ running_mean,
                                                    float* __restrict__ running_var) {
    const double m = (double)p.n;
    GRID_STRIDE(ch, p.c) {
        const double var = col_partials_sum(partial, chunks, p.c, ch) / m;
        bn_finalize_channel(p, ch, var, mean64, factor, save_mean, save_inv_std, running_mean, running_var);
    }
}

// Backward stage 1: per row chunk, sum dy and sum dy * x_hat (x_hat in f32
// as the forward computed it, the product in f64).
extern "C" __global__ void bn_col_backward_partials(BatchNorm p, const float* __restrict__ x,
                                                    const float* __restrict__ dy, const float* __restrict__ save_mean,
                                                    const float* __restrict__ save_inv_std,
                                                    double* __restrict__ partial_dy,
                                                    double* __restrict__ partial_dy_xhat, u64 chunks) {
    COL_CHUNK_LOOP(chunks, p.c) {
        const u64 r0 = k * COL_ROWS, r1 = col_chunk_end(k, p.n);
        const float mu = save_mean[col], is = save_inv_std[col];
        double a = 0.0, b = 0.0;
        for (u64 r = r0; r < r1; ++r) {
            const u64 i = r * p.c + col;
            const double g = (double)dy[i];
            const float xh = __fmul_rn(__fsub_rn(x[i], mu), is);
            a += g;
            b += g * (double)xh;
        }
        partial_dy[k * p.c + col] = a;
        partial_dy_xhat[k * p.c + col] = b;
    }
}

extern "C" __global__ void bn_col_backward_finalize(BatchNorm p, const double* __restrict__ partial_dy,
                                                    const double* __restrict__ partial_dy_xhat, u64 chunks,
                                                    const float* __restrict__ gamma,
                                                    const float* __restrict__ save_inv_std,
                                                    float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                    float* __restrict__ coefs) {
    const double m = (double)p.n;
    GRID_STRIDE(ch, p.c) {
        const double a = col_partials_sum(partial_dy, chunks, p.c, ch);
        const double b = col_partials_sum(partial_dy_xhat, chunks, p.c, ch);
        bn_backward_channel(p, ch, a, b, m, gamma, save_inv_std, dgamma, dbeta, coefs);
    }
}
