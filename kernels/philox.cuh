// Philox4x32-10 (Salmon et al., SC'11), the same rounds as
// kestrel::ops::dropout::philox: a pure function of a 128-bit counter and
// a 64-bit key, so every thread draws its own numbers and the CPU draws
// the same bits.
#pragma once
#include "common.cuh"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

struct Philox4 {
    u32 v[4];
};

__device__ __forceinline__ void philox_round(u32& c0, u32& c1, u32& c2, u32& c3, u32 k0, u32 k1) {
    const u32 hi0 = __umulhi(PHILOX_M0, c0), lo0 = PHILOX_M0 * c0;
    const u32 hi1 = __umulhi(PHILOX_M1, c2), lo1 = PHILOX_M1 * c2;
    const u32 n0 = hi1 ^ c1 ^ k0;
    const u32 n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
}

// The first round uses the key as given; the key is bumped by (W0, W1)
// before each of the nine later rounds.
__device__ __forceinline__ Philox4 philox4x32_10(u32 c0, u32 c1, u32 c2, u32 c3, u32 k0, u32 k1) {
    philox_round(c0, c1, c2, c3, k0, k1);
#pragma unroll
    for (int r = 1; r < 10; ++r) {
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
        philox_round(c0, c1, c2, c3, k0, k1);
    }
    Philox4 out;
    out.v[0] = c0;
    out.v[1] = c1;
    out.v[2] = c2;
    out.v[3] = c3;
    return out;
}

// u = (word >> 8) * 2^-24, exact in f32, in [0, 1).
__device__ __forceinline__ float philox_uniform(u32 word) { return (float)(word >> 8) * (1.0f / 16777216.0f); }
