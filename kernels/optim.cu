// Fused optimizer step over every parameter tensor of a model in one launch
// (plus two small launches for clipnorm).
//
// Multi-tensor layout: the host keeps a device table of OptTensor
// descriptors (pointers to each tensor's parameters, gradients and slots,
// its length and its range of chunks) and a chunk -> tensor map; both are
// uploaded once (the table again only when the caller's buffers move), so a
// step uploads nothing. Every tensor is cut into chunks of `chunk` elements
// (the last one shorter); a block works on whole chunks, so it knows its
// tensor (and so its clip scale) without a search, and per-chunk partial
// sums give per-tensor and global norms from the same first stage.
//
// clipnorm, without any host round trip:
//   optim_sumsq:       partials[k] = sum over chunk k of g^2 (f64, fixed tree)
//   optim_clip_scales: one block; per tensor the sum of its chunks in chunk
//                      order, then per tensor or over all tensors (fixed
//                      tree) the scale c/n when n >= c, else 1, into scales[]
//   optim_update:      the element-wise update with scales[tensor]
// No float atomics anywhere: the same inputs give the same bits.
//
// optim_update_vec4 / optim_update_clocked_vec4 (OptimKernel::FusedVec4):
// the same chunks, each walked in quads of 16-byte accesses (param, grad,
// slot0 and, for Adam, slot1), then the chunk's len % 4 tail (only a
// tensor's last chunk has one) scalar. Each element goes through the same
// update(): the same bits. The host runs them only when every tensor's four
// pointers start on 16 bytes and `chunk` is a multiple of 4, so every
// chunk, and so every quad, starts on 16 bytes too. optim_sumsq has no
// vector form: its per-thread subsets fix the order of the f64 sum, and a
// quad per thread would change it (so the clip scale's bits).
#include "common.cuh"
#include "vec4.cuh"

// Mirrors kestrel::ops::optim::OptimizerKind (#[repr(u32)]).
enum OptimizerKind : u32 { OPT_SGD = 0, OPT_ADAGRAD = 1, OPT_RMSPROP = 2, OPT_ADAM = 3 };

// Mirrors kestrel::ops::optim::StepScalars (#[repr(C)], same field order).
struct StepScalars {
    OptimizerKind kind;
    bool nesterov;
    bool clipvalue_first;
    float lr_t;
    float adam_step;
    float momentum;
    float rho;
    float one_minus_rho;
    float beta1;
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float epsilon;
    float clip_scale;
    float clipvalue;
};
static_assert(sizeof(StepScalars) == 56, "StepScalars must match the Rust struct");

// Mirrors kestrel::ops::optim::cuda::OptTensor (#[repr(C)], pointers as u64).
struct OptTensor {
    float* param;
    const float* grad;
    float* slot0;  // velocity / accumulator / first moment
    float* slot1;  // Adam's second moment; null for the other rules
    u64 len;
    u64 first_chunk;
    u64 chunks;
};
static_assert(sizeof(OptTensor) == 56, "OptTensor must match the Rust struct");

#define FULL_MASK 0xffffffffu

// Clips to [-c, c], letting NaN through (fminf/fmaxf would drop it).
__device__ __forceinline__ float clip_value(float g, float c) { return g > c ? c : (g < -c ? -c : g); }

// kestrel::ops::optim::clip_gradient.
__device__ __forceinline__ float clip_gradient(const StepScalars& s, float g) {
    return s.clipvalue_first ? clip_value(g, s.clipvalue) * s.clip_scale : clip_value(g * s.clip_scale, s.clipvalue);
}

// kestrel::ops::optim::update, operation for operation.
__device__ __forceinline__ void update(const StepScalars& s, float& p, float g, float& s0, float& s1) {
    g = clip_gradient(s, g);
    switch (s.kind) {
        case OPT_SGD: {
            float v = s.momentum * s0 - s.lr_t * g;
            s0 = v;
            if (s.nesterov) p += s.momentum * v - s.lr_t * g;
            else p += v;
            break;
        }
        case OPT_ADAGRAD: {
            float a = s0 + g * g;
            s0 = a;
            p -= s.lr_t * g / (sqrtf(a) + s.epsilon);
            break;
        }
        case OPT_RMSPROP: {
            float a = s.rho * s0 + s.one_minus_rho * (g * g);
            s0 = a;
            p -= s.lr_t * g / (sqrtf(a) + s.epsilon);
            break;
        }
        default: {  // OPT_ADAM
            float m = s.beta1 * s0 + s.one_minus_beta1 * g;
            float v = s.beta2 * s1 + s.one_minus_beta2 * (g * g);
            s0 = m;
            s1 = v;
            p -= s.adam_step * m / (sqrtf(v) + s.epsilon);
            break;
        }
    }
}

// block_sum_f64 (common.cuh) gives the block's sum in a fixed order.

// partials[k] = sum over chunk k of g^2 in f64, g value-clipped first when
// s.clipvalue_first (the norm tf.keras sees). Blocks grid-strided over chunks.
// tensors [count], chunk_tensor [chunks], partials [chunks].
extern "C" __global__ void optim_sumsq(StepScalars s, const OptTensor* __restrict__ tensors,
                                       const u32* __restrict__ chunk_tensor, u64 chunks, u64 chunk,
                                       double* __restrict__ partials) {
    for (u64 k = blockIdx.x; k < chunks; k += gridDim.x) {
        const OptTensor t = tensors[chunk_tensor[k]];
        const u64 begin = (k - t.first_chunk) * chunk;
        const u64 end = begin + chunk < t.len ? begin + chunk : t.len;
        double acc = 0.0;
        for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
            float g = t.grad[i];
            if (s.clipvalue_first) g = clip_value(g, s.clipvalue);
            acc += (double)g * (double)g;
        }
        acc = block_sum_f64(acc);
        if (threadIdx.x == 0) partials[k] = acc;
    }
}

// c / n when n >= c, else 1 (a NaN norm fails the test and leaves the NaN
// gradients to propagate), computed in f64 and rounded once, as the CPU does.
__device__ __forceinline__ float clip_scale(float c, double norm) {
    return norm >= (double)c ? (float)((double)c / norm) : 1.0f;
}

// One block. tensor_sq[t] = sum of tensor t's chunk partials in chunk order;
// scales[t] = its own scale (per_tensor) or the global one. tensor_sq and
// scales [count].
extern "C" __global__ void optim_clip_scales(float clipnorm, u32 per_tensor, const OptTensor* __restrict__ tensors,
                                             u64 count, const double* __restrict__ partials,
                                             double* __restrict__ tensor_sq, float* __restrict__ scales) {
    for (u64 t = threadIdx.x; t < count; t += blockDim.x) {
        const u64 first = tensors[t].first_chunk, n = tensors[t].chunks;
        double sq = 0.0;
        for (u64 k = 0; k < n; ++k) sq += partials[first + k];
        tensor_sq[t] = sq;
        if (per_tensor) scales[t] = clip_scale(clipnorm, sqrt(sq));
    }
    if (per_tensor) return;  // uniform across the block: no thread is left at a barrier
    __syncthreads();  // tensor_sq written by other threads of this block
    double acc = 0.0;
    for (u64 t = threadIdx.x; t < count; t += blockDim.x) acc += tensor_sq[t];
    acc = block_sum_f64(acc);
    __shared__ float global_scale;
    if (threadIdx.x == 0) global_scale = clip_scale(clipnorm, sqrt(acc));
    __syncthreads();
    for (u64 t = threadIdx.x; t < count; t += blockDim.x) scales[t] = global_scale;
}

// Element i of tensor t, read, updated and written back: the scalar body of
// both forms (the vector form's tail).
__device__ __forceinline__ void update_element(const StepScalars& ls, const OptTensor& t, u64 i) {
    float p = t.param[i], s0 = t.slot0[i];
    float s1 = t.slot1 != nullptr ? t.slot1[i] : 0.0f;
    update(ls, p, t.grad[i], s0, s1);
    t.param[i] = p;
    t.slot0[i] = s0;
    if (t.slot1 != nullptr) t.slot1[i] = s1;
}

// The update of every element of every tensor; blocks grid-strided over the
// chunks. With use_scales the clip scale of each tensor comes from scales[]
// (written on the device by optim_clip_scales), else s.clip_scale.
__device__ __forceinline__ void update_chunks(const StepScalars& s, u32 use_scales, const float* __restrict__ scales,
                                              const OptTensor* __restrict__ tensors,
                                              const u32* __restrict__ chunk_tensor, u64 chunks, u64 chunk) {
    for (u64 k = blockIdx.x; k < chunks; k += gridDim.x) {
        const u32 ti = chunk_tensor[k];
        const OptTensor t = tensors[ti];
        StepScalars ls = s;
        if (use_scales) ls.clip_scale = scales[ti];
        const u64 begin = (k - t.first_chunk) * chunk;
        const u64 end = begin + chunk < t.len ? begin + chunk : t.len;
        for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) update_element(ls, t, i);
    }
}

// update_chunks in quads: thread j of the block takes quads j, j + blockDim.x,
// ... of its chunk, then the chunk's tail elements one per thread.
__device__ __forceinline__ void update_chunks_vec4(const StepScalars& s, u32 use_scales,
                                                   const float* __restrict__ scales,
                                                   const OptTensor* __restrict__ tensors,
                                                   const u32* __restrict__ chunk_tensor, u64 chunks, u64 chunk) {
    for (u64 k = blockIdx.x; k < chunks; k += gridDim.x) {
        const u32 ti = chunk_tensor[k];
        const OptTensor t = tensors[ti];
        StepScalars ls = s;
        if (use_scales) ls.clip_scale = scales[ti];
        const u64 begin = (k - t.first_chunk) * chunk;
        const u64 end = begin + chunk < t.len ? begin + chunk : t.len;
        const u64 quads_end = begin + ((end - begin) & ~3ull);
        const bool adam = t.slot1 != nullptr;
        for (u64 i = begin + 4 * (u64)threadIdx.x; i < quads_end; i += 4 * (u64)blockDim.x) {
            Lanes4 p = unpack4(load4(t.param + i)), s0 = unpack4(load4(t.slot0 + i));
            const Lanes4 g = unpack4(load4_ro(t.grad + i));
            Lanes4 s1 = adam ? unpack4(load4(t.slot1 + i)) : Lanes4{{0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int e = 0; e < 4; ++e) update(ls, p.e[e], g.e[e], s0.e[e], s1.e[e]);
            store4(t.param + i, pack4(p));
            store4(t.slot0 + i, pack4(s0));
            if (adam) store4(t.slot1 + i, pack4(s1));
        }
        for (u64 i = quads_end + threadIdx.x; i < end; i += blockDim.x) update_element(ls, t, i);
    }
}

extern "C" __global__ void optim_update(StepScalars s, u32 use_scales, const float* __restrict__ scales,
                                        const OptTensor* __restrict__ tensors, const u32* __restrict__ chunk_tensor,
                                        u64 chunks, u64 chunk) {
    update_chunks(s, use_scales, scales, tensors, chunk_tensor, chunks, chunk);
}

// optim_update for a captured step: the iteration-dependent scalars come
// from row clock[1] of lr_rows ([rows][2]: lr_t, adam_step, formed on the
// host by Optimizer::scalars for each step of the epoch, so they are the
// uncaptured step's bits), the rest of `s` is the same every step.
// clock is a kestrel::cuda::StepClock (clock[1]: the step's row).
extern "C" __global__ void optim_update_clocked(StepScalars s, const u64* __restrict__ clock,
                                                const float* __restrict__ lr_rows, u32 use_scales,
                                                const float* __restrict__ scales,
                                                const OptTensor* __restrict__ tensors,
                                                const u32* __restrict__ chunk_tensor, u64 chunks, u64 chunk) {
    const u64 row = clock[1];
    s.lr_t = lr_rows[2 * row];
    s.adam_step = lr_rows[2 * row + 1];
    update_chunks(s, use_scales, scales, tensors, chunk_tensor, chunks, chunk);
}

extern "C" __global__ void optim_update_vec4(StepScalars s, u32 use_scales, const float* __restrict__ scales,
                                             const OptTensor* __restrict__ tensors,
                                             const u32* __restrict__ chunk_tensor, u64 chunks, u64 chunk) {
    update_chunks_vec4(s, use_scales, scales, tensors, chunk_tensor, chunks, chunk);
}

// optim_update_clocked in vector form.
extern "C" __global__ void optim_update_clocked_vec4(StepScalars s, const u64* __restrict__ clock,
                                                     const float* __restrict__ lr_rows, u32 use_scales,
                                                     const float* __restrict__ scales,
                                                     const OptTensor* __restrict__ tensors,
                                                     const u32* __restrict__ chunk_tensor, u64 chunks, u64 chunk) {
    const u64 row = clock[1];
    s.lr_t = lr_rows[2 * row];
    s.adam_step = lr_rows[2 * row + 1];
    update_chunks_vec4(s, use_scales, scales, tensors, chunk_tensor, chunks, chunk);
}
