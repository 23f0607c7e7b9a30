// Losses fused with their output activation, the metrics, and the fixed-order
// f64 sum that turns per-row values into batch totals.
//
// Shapes: logits/pred/labels/targets/probs/dz [n, classes] row-major,
// losses [n], sparse labels u32 [n], metric rows f64 [n].
//
// One warp per row (rows grid-strided over warps): a row's reductions (max,
// sum of exp, loss terms) are warp shuffles with no shared memory, and the
// lanes read the row coalesced. Each lane sums its strided elements in index
// order and the butterfly combines lanes in a fixed pattern, so the result
// is the same bits run to run (float addition is commutative, so every lane
// of the butterfly ends with the same value).
//
// Batch sums never use float atomics: the per-row values are written to a
// buffer and summed by loss_sum_f32/loss_sum_f64 in fixed chunks, each chunk
// a fixed-shape f64 tree, the chunk partials summed again by the same kernel
// until one value remains (the host drives the passes).
#include "common.cuh"

// Mirrors kestrel::ops::loss::LossParams (#[repr(C)]: usize, usize, f32 + 4 padding).
struct LossParams {
    u64 n;
    u64 classes;
    float grad_scale;
};
static_assert(sizeof(LossParams) == 24, "LossParams must match the Rust struct");

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// fmaxf is commutative (so every lane of the butterfly agrees) and ignores
// NaN; a NaN logit still makes its row NaN through exp(NaN - m) in the sum.
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Rows grid-strided over warps. Every lane of a warp runs the same rows, so
// the full-mask shuffles inside are safe.
#define WARP_ROWS(row, lane, n)                                                \
    const u32 lane = threadIdx.x & 31u;                                        \
    const u64 warps_ = ((u64)gridDim.x * blockDim.x) >> 5;                     \
    for (u64 row = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < (n); row += warps_)

// max z and ln(sum exp(z - max)) of one row, as the CPU's log_norm.
__device__ __forceinline__ void row_log_norm(const float* z, u64 c, u32 lane, float& m, float& ln_s) {
    float mx = __int_as_float(0xff800000);  // -inf
    for (u64 j = lane; j < c; j += 32) mx = fmaxf(mx, z[j]);
    mx = warp_max(mx);
    float s = 0.0f;
    for (u64 j = lane; j < c; j += 32) s += expf(z[j] - mx);
    s = warp_sum(s);
    m = mx;
    ln_s = logf(s);
}

// losses[i] = -sum_j y_j log_softmax(z_i)_j (terms with y_j == 0 skipped);
// probs = softmax(z) and dz = gs * (probs * sum_j y_j - y) when non-null.
// gs = grad_scale / n, rounded once to f32 on the host.
extern "C" __global__ void softmax_xent(LossParams p, float gs, const float* __restrict__ logits,
                                        const float* __restrict__ labels, float* __restrict__ losses,
                                        float* __restrict__ probs, float* __restrict__ dz) {
    const u64 c = p.classes;
    WARP_ROWS(row, lane, p.n) {
        const float* z = logits + row * c;
        const float* y = labels + row * c;
        float m, ln_s;
        row_log_norm(z, c, lane, m, ln_s);
        float loss = 0.0f, sum_y = 0.0f;
        for (u64 j = lane; j < c; j += 32) {
            float yj = y[j];
            if (yj != 0.0f) loss -= yj * ((z[j] - m) - ln_s);
            sum_y += yj;
        }
        loss = warp_sum(loss);
        sum_y = warp_sum(sum_y);
        if (lane == 0) losses[row] = loss;
        if (probs != nullptr)
            for (u64 j = lane; j < c; j += 32) probs[row * c + j] = expf((z[j] - m) - ln_s);
        if (dz != nullptr)
            for (u64 j = lane; j < c; j += 32) dz[row * c + j] = gs * (expf((z[j] - m) - ln_s) * sum_y - y[j]);
    }
}

// The sparse variant: labels[i] < classes. A label out of range is never
// used as an index: the row's loss (and dz) become NaN, and err[0] counts
// the bad rows while err[1] holds ~(first bad row) (atomicMax of the
// complement = the smallest row), so that the host reports the same error
// as the CPU. err must be zeroed before the launch.
extern "C" __global__ void sparse_softmax_xent(LossParams p, float gs, const float* __restrict__ logits,
                                               const u32* __restrict__ labels, float* __restrict__ losses,
                                               float* __restrict__ probs, float* __restrict__ dz,
                                               u64* __restrict__ err) {
    const u64 c = p.classes;
    WARP_ROWS(row, lane, p.n) {
        const float* z = logits + row * c;
        const u32 label = labels[row];
        const bool bad = (u64)label >= c;
        if (bad && lane == 0) {
            atomicAdd(err, 1ull);
            atomicMax(err + 1, ~row);
        }
        float m, ln_s;
        row_log_norm(z, c, lane, m, ln_s);
        // A bad label is never used as an index, not even speculatively.
        const u64 li = bad ? 0 : label;
        if (lane == 0) losses[row] = bad ? __int_as_float(0x7fc00000) : -((z[li] - m) - ln_s);
        if (probs != nullptr)
            for (u64 j = lane; j < c; j += 32) probs[row * c + j] = expf((z[j] - m) - ln_s);
        if (dz != nullptr)
            for (u64 j = lane; j < c; j += 32) {
                float pj = expf((z[j] - m) - ln_s);
                dz[row * c + j] = bad ? __int_as_float(0x7fc00000) : gs * (j == label ? pj - 1.0f : pj);
            }
    }
}

// Per element max(z, 0) - z*y + ln(1 + exp(-|z|)), per row the mean over the
// outputs; probs = sigmoid(z), dz = gs * (sigmoid(z) - y), gs = grad_scale / (n*classes).
extern "C" __global__ void sigmoid_xent(LossParams p, float gs, const float* __restrict__ logits,
                                        const float* __restrict__ targets, float* __restrict__ losses,
                                        float* __restrict__ probs, float* __restrict__ dz) {
    const u64 c = p.classes;
    WARP_ROWS(row, lane, p.n) {
        const float* z = logits + row * c;
        const float* y = targets + row * c;
        float sum = 0.0f;
        for (u64 j = lane; j < c; j += 32) {
            float zj = z[j];
            // A NaN logit fails `> 0` but still reaches the log1p term.
            float relu = zj > 0.0f ? zj : 0.0f;
            sum += relu - zj * y[j] + log1pf(expf(-fabsf(zj)));
        }
        sum = warp_sum(sum);
        if (lane == 0) losses[row] = sum / (float)c;
        if (probs != nullptr)
            for (u64 j = lane; j < c; j += 32) probs[row * c + j] = sigmoidf_stable(z[j]);
        if (dz != nullptr)
            for (u64 j = lane; j < c; j += 32) dz[row * c + j] = gs * (sigmoidf_stable(z[j]) - y[j]);
    }
}

// Per row the mean over the outputs of (pred - y)^2; dz = gs * (pred - y),
// gs = 2 * grad_scale / (n*classes).
extern "C" __global__ void mse_loss(LossParams p, float gs, const float* __restrict__ pred,
                                    const float* __restrict__ targets, float* __restrict__ losses,
                                    float* __restrict__ dz) {
    const u64 c = p.classes;
    WARP_ROWS(row, lane, p.n) {
        const float* x = pred + row * c;
        const float* y = targets + row * c;
        float sum = 0.0f;
        for (u64 j = lane; j < c; j += 32) {
            float d = x[j] - y[j];
            sum += d * d;
        }
        sum = warp_sum(sum);
        if (lane == 0) losses[row] = sum / (float)c;
        if (dz != nullptr)
            for (u64 j = lane; j < c; j += 32) dz[row * c + j] = gs * (x[j] - y[j]);
    }
}

// ---- metrics -------------------------------------------------------------

// The argmax order of the CPU's `argmax`: a NaN beats any number, the first
// index wins among NaNs and among equal maxima. Total, associative and
// commutative, so lanes and the butterfly may combine in any fixed order.
__device__ __forceinline__ bool argmax_better(float va, u64 ia, float vb, u64 ib) {
    bool na = va != va, nb = vb != vb;
    if (na || nb) return na && (!nb || ia < ib);
    return va > vb || (va == vb && ia < ib);
}

__device__ __forceinline__ u64 warp_argmax(const float* row, u64 c, u32 lane) {
    float bv = 0.0f;
    u64 bi = ~0ull;  // "no element yet": every real candidate beats it
    for (u64 j = lane; j < c; j += 32) {
        float v = row[j];
        if (bi == ~0ull || argmax_better(v, j, bv, bi)) {
            bv = v;
            bi = j;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        u64 oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (oi != ~0ull && (bi == ~0ull || argmax_better(ov, oi, bv, bi))) {
            bv = ov;
            bi = oi;
        }
    }
    return bi;
}

// rows[i] = 1 when argmax(scores_i) == argmax(labels_i), else 0.
extern "C" __global__ void metric_categorical_accuracy(LossParams p, const float* __restrict__ scores,
                                                       const float* __restrict__ labels, double* __restrict__ rows) {
    const u64 c = p.classes;
    WARP_ROWS(row, lane, p.n) {
        u64 a = warp_argmax(scores + row * c, c, lane);
        u64 b = warp_argmax(labels + row * c, c, lane);
        if (lane == 0) rows[row] = a == b ? 1.0 : 0.0;
    }
}

// rows[i] = 1 when argmax(scores_i) == labels[i]; labels out of range are
// reported through err as in sparse_softmax_xent (row value 0).
extern "C" __global__ void metric_sparse_accuracy(LossParams p, const float* __restrict__ scores,
                                                  const u32* __restrict__ labels, double* __restrict__ rows,
                                                  u64* __restrict__ err) {
    const u64 c = p.classes;
    WARP_ROWS(row, lane, p.n) {
        const u32 label = labels[row];
        u64 a = warp_argmax(scores + row * c, c, lane);
        if (lane == 0) {
            if ((u64)label >= c) {
                atomicAdd(err, 1ull);
                atomicMax(err + 1, ~row);
            }
            rows[row] = a == (u64)label ? 1.0 : 0.0;
        }
    }
}

// rows[i] = number of elements with targets == (probs > 0.5 ? 1 : 0); a NaN
// probability never matches. Integer counts, so the f64 totals are exact.
extern "C" __global__ void metric_binary_accuracy(LossParams p, const float* __restrict__ probs,
                                                  const float* __restrict__ targets, double* __restrict__ rows) {
    const u64 c = p.classes;
    WARP_ROWS(row, lane, p.n) {
        u32 hits = 0;
        for (u64 j = lane; j < c; j += 32) {
            float q = probs[row * c + j];
            float r = q > 0.5f ? 1.0f : 0.0f;
            hits += (q == q && targets[row * c + j] == r) ? 1u : 0u;
        }
        // Per-lane counts fit u32 (c < 2^32 * 32 elements per lane is far
        // beyond any row); the warp total is widened before it can overflow.
        u64 total = 0;
        for (int o = 0; o < 32; ++o) total += __shfl_sync(FULL_MASK, hits, o);
        if (lane == 0) rows[row] = (double)total;
    }
}

// rows[i] = mean over the outputs of |pred - y| (f32, as the CPU's row value).
extern "C" __global__ void metric_mae(LossParams p, const float* __restrict__ pred, const float* __restrict__ targets,
                                      double* __restrict__ rows) {
    const u64 c = p.classes;
    WARP_ROWS(row, lane, p.n) {
        float sum = 0.0f;
        for (u64 j = lane; j < c; j += 32) sum += fabsf(pred[row * c + j] - targets[row * c + j]);
        sum = warp_sum(sum);
        if (lane == 0) rows[row] = (double)(sum / (float)c);
    }
}

// ---- deterministic f64 sums ----------------------------------------------

// block_sum_f64 (common.cuh) gives the block's sum in a fixed order.

// partials[k] = sum of x[k*chunk .. min((k+1)*chunk, n)) in f64, for every
// chunk k < ceil(n / chunk), blocks grid-strided over the chunks. The chunk
// boundaries depend only on n and chunk, so the bits do not depend on the
// grid size.
template <typename T>
__device__ __forceinline__ void chunk_sums(const T* __restrict__ x, u64 n, u64 chunk, double* __restrict__ partials) {
    const u64 chunks = (n + chunk - 1) / chunk;
    for (u64 k = blockIdx.x; k < chunks; k += gridDim.x) {
        const u64 begin = k * chunk;
        const u64 end = begin + chunk < n ? begin + chunk : n;
        double acc = 0.0;
        for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) acc += (double)x[i];
        acc = block_sum_f64(acc);
        if (threadIdx.x == 0) partials[k] = acc;
    }
}

extern "C" __global__ void loss_sum_f32(const float* __restrict__ x, u64 n, u64 chunk, double* __restrict__ partials) {
    chunk_sums(x, n, chunk, partials);
}

extern "C" __global__ void loss_sum_f64(const double* __restrict__ x, u64 n, u64 chunk, double* __restrict__ partials) {
    chunk_sums(x, n, chunk, partials);
}
