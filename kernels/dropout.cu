// Inverted dropout with the Philox4x32-10 mask of kestrel::ops::dropout
// (bit-identical with the CPU). x, y, mask (u8: 1 kept, 0 dropped), dy, dx
// all [len]. Element i uses word i % 4 of philox(counter = [i/4 lo, i/4 hi,
// offset lo, offset hi], key = [seed lo, seed hi]) and is kept when
// (word >> 8) * 2^-24 >= rate. Dropout mirrors kestrel::ops::dropout::Dropout.
//
// One thread per 4-element block, so each Philox call feeds four elements.
// `scale` = 1 / (1 - rate) comes from the host (Dropout::scale) so that the
// values are the CPU's bits too.
//
// The *_vec4 entry points (DropoutKernel::PhiloxVec4) move a block's four
// floats with one 16-byte access and its four mask bytes with one 32-bit
// access (kernels/vec4.cuh): the host runs them only when x, y, dy, dx start
// on 16 bytes and the mask on 4. Each element goes through the same
// dropout_kept / dropout_value as in the scalar kernels: the same bits.
#include "common.cuh"
#include "philox.cuh"
#include "vec4.cuh"

struct Dropout {
    u64 len;
    float rate;
    u64 seed;
    u64 offset;
};
static_assert(sizeof(Dropout) == 32, "Dropout mirrors a #[repr(C)] Rust struct of 32 bytes");

__device__ __forceinline__ Philox4 dropout_words(const Dropout& p, u64 block) {
    return philox4x32_10((u32)block, (u32)(block >> 32), (u32)p.offset, (u32)(p.offset >> 32), (u32)p.seed,
                         (u32)(p.seed >> 32));
}

// Whether the element drawn with Philox word `word` is kept.
__device__ __forceinline__ bool dropout_kept(const Dropout& p, u32 word) { return philox_uniform(word) >= p.rate; }

// The value of a kept or dropped element: one f32 product, as on the CPU.
__device__ __forceinline__ float dropout_value(float x, bool kept, float scale) { return x * (kept ? scale : 0.0f); }

// mask[i] = kept(i).
extern "C" __global__ void dropout_mask_only(Dropout p, unsigned char* __restrict__ mask) {
    const u64 blocks = (p.len + 3) / 4;
    GRID_STRIDE(b, blocks) {
        const Philox4 w = dropout_words(p, b);
#pragma unroll
        for (u32 lane = 0; lane < 4; ++lane) {
            const u64 i = 4 * b + lane;
            if (i < p.len) mask[i] = dropout_kept(p, w.v[lane]) ? 1 : 0;
        }
    }
}

// y = x * (kept ? scale : 0), mask = kept: the body of both forward entries.
__device__ __forceinline__ void dropout_forward_body(const Dropout& p, float scale, const float* __restrict__ x,
                                                     float* __restrict__ y, unsigned char* __restrict__ mask) {
    const u64 blocks = (p.len + 3) / 4;
    GRID_STRIDE(b, blocks) {
        const Philox4 w = dropout_words(p, b);
#pragma unroll
        for (u32 lane = 0; lane < 4; ++lane) {
            const u64 i = 4 * b + lane;
            if (i < p.len) {
                const bool kept = dropout_kept(p, w.v[lane]);
                mask[i] = kept ? 1 : 0;
                y[i] = dropout_value(x[i], kept, scale);
            }
        }
    }
}

// The vector forms. A quad q is Philox block q (elements 4q .. 4q + 3),
// so the quads are the scalar kernels' blocks one for one; the last,
// partial block (len % 4 elements) is the scalar tail, each of its elements
// drawing block len / 4 again for its own word.

// The mask of a quad as the 32-bit word of its four bytes (byte k: lane k).
__device__ __forceinline__ u32 dropout_mask_word(const Dropout& p, const Philox4& w) {
    u32 m = 0;
#pragma unroll
    for (u32 lane = 0; lane < 4; ++lane) m |= (dropout_kept(p, w.v[lane]) ? 1u : 0u) << (8 * lane);
    return m;
}

extern "C" __global__ void dropout_mask_only_vec4(Dropout p, unsigned char* __restrict__ mask) {
    VEC4_QUADS(q, p.len) { store_u8x4(mask + 4 * q, dropout_mask_word(p, dropout_words(p, q))); }
    VEC4_TAIL(i, p.len) { mask[i] = dropout_kept(p, dropout_words(p, i >> 2).v[i & 3]) ? 1 : 0; }
}

__device__ __forceinline__ void dropout_forward_vec4_body(const Dropout& p, float scale, const float* __restrict__ x,
                                                          float* __restrict__ y, unsigned char* __restrict__ mask) {
    VEC4_QUADS(q, p.len) {
        const Philox4 w = dropout_words(p, q);
        Lanes4 v = unpack4(load4_ro(x + 4 * q));
        u32 m = 0;
#pragma unroll
        for (u32 lane = 0; lane < 4; ++lane) {
            const bool kept = dropout_kept(p, w.v[lane]);
            m |= (kept ? 1u : 0u) << (8 * lane);
            v.e[lane] = dropout_value(v.e[lane], kept, scale);
        }
        store4(y + 4 * q, pack4(v));
        store_u8x4(mask + 4 * q, m);
    }
    VEC4_TAIL(i, p.len) {
        const bool kept = dropout_kept(p, dropout_words(p, i >> 2).v[i & 3]);
        mask[i] = kept ? 1 : 0;
        y[i] = dropout_value(x[i], kept, scale);
    }
}

extern "C" __global__ void dropout_forward(Dropout p, float scale, const float* __restrict__ x, float* __restrict__ y,
                                           unsigned char* __restrict__ mask) {
    dropout_forward_body(p, scale, x, y, mask);
}

// dropout_forward with the training step read from the device (clock[0] of
// a kestrel::cuda::StepClock), so that a captured step draws fresh masks on
// every replay: the offset is p.offset | (step << 16), the host's
// layers::dropout_offset with p.offset holding the layer's index.
extern "C" __global__ void dropout_forward_clocked(Dropout p, float scale, const u64* __restrict__ clock,
                                                   const float* __restrict__ x, float* __restrict__ y,
                                                   unsigned char* __restrict__ mask) {
    p.offset |= clock[0] << 16;
    dropout_forward_body(p, scale, x, y, mask);
}

// dx = dy * (mask != 0 ? scale : 0).
extern "C" __global__ void dropout_backward(Dropout p, float scale, const float* __restrict__ dy,
                                            const unsigned char* __restrict__ mask, float* __restrict__ dx) {
    GRID_STRIDE(i, p.len) { dx[i] = dropout_value(dy[i], mask[i] != 0, scale); }
}

extern "C" __global__ void dropout_forward_vec4(Dropout p, float scale, const float* __restrict__ x,
                                                float* __restrict__ y, unsigned char* __restrict__ mask) {
    dropout_forward_vec4_body(p, scale, x, y, mask);
}

// dropout_forward_clocked in vector form.
extern "C" __global__ void dropout_forward_clocked_vec4(Dropout p, float scale, const u64* __restrict__ clock,
                                                        const float* __restrict__ x, float* __restrict__ y,
                                                        unsigned char* __restrict__ mask) {
    p.offset |= clock[0] << 16;
    dropout_forward_vec4_body(p, scale, x, y, mask);
}

extern "C" __global__ void dropout_backward_vec4(Dropout p, float scale, const float* __restrict__ dy,
                                                 const unsigned char* __restrict__ mask, float* __restrict__ dx) {
    VEC4_QUADS(q, p.len) {
        Lanes4 g = unpack4(load4_ro(dy + 4 * q));
        const u32 m = load_u8x4_ro(mask + 4 * q);
#pragma unroll
        for (u32 lane = 0; lane < 4; ++lane) {
            g.e[lane] = dropout_value(g.e[lane], ((m >> (8 * lane)) & 0xffu) != 0, scale);
        }
        store4(dx + 4 * q, pack4(g));
    }
    VEC4_TAIL(i, p.len) { dx[i] = dropout_value(dy[i], mask[i] != 0, scale); }
}
