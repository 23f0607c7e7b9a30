// Inverted dropout with the Philox4x32-10 mask of kestrel::ops::dropout
// (bit-identical with the CPU). x, y, mask (u8: 1 kept, 0 dropped), dy, dx
// all [len]. Element i uses word i % 4 of philox(counter = [i/4 lo, i/4 hi,
// offset lo, offset hi], key = [seed lo, seed hi]) and is kept when
// (word >> 8) * 2^-24 >= rate. Dropout mirrors kestrel::ops::dropout::Dropout.
//
// One thread per 4-element block, so each Philox call feeds four elements.
// `scale` = 1 / (1 - rate) comes from the host (Dropout::scale) so that the
// values are the CPU's bits too.
#include "common.cuh"
#include "philox.cuh"

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

// mask[i] = kept(i).
extern "C" __global__ void dropout_mask_only(Dropout p, unsigned char* __restrict__ mask) {
    const u64 blocks = (p.len + 3) / 4;
    GRID_STRIDE(b, blocks) {
        const Philox4 w = dropout_words(p, b);
#pragma unroll
        for (u32 lane = 0; lane < 4; ++lane) {
            const u64 i = 4 * b + lane;
            if (i < p.len) mask[i] = philox_uniform(w.v[lane]) >= p.rate ? 1 : 0;
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
                const bool kept = philox_uniform(w.v[lane]) >= p.rate;
                mask[i] = kept ? 1 : 0;
                y[i] = x[i] * (kept ? scale : 0.0f);
            }
        }
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
    GRID_STRIDE(i, p.len) { dx[i] = dy[i] * (mask[i] != 0 ? scale : 0.0f); }
}
