// The emulated device's tensor-core instructions: what the `#else` branches
// of kernels/mma.cuh call. Each follows the semantics the PTX ISA documents
// (PTX ISA 8.x, section 9.7.14 "Warp-level matrix multiply-accumulate
// instructions": 9.7.14.5.7 "Matrix fragments for mma.m16n8k8", and the
// cvt instruction's .tf32 destination, 9.7.9.21 "cvt").
//
// Included by kemu/simt.h. The warp-collective `mma.sync` goes through the
// scheduler like the shuffles do (kemu_warp_collective): every lane of the
// warp must arrive at the same call site (`.sync.aligned`: all 32 lanes,
// converged), or the launch fails naming the rule; then the instruction runs
// once over the 32 lanes' fragments.
#pragma once

#include <cmath>
#include <cstring>

#include "kemu/thread_view.h"

extern "C" void kemu_warp_collective(kemu::CollectiveFn fn, const char* name, unsigned mask, void* data,
                                     const char* file, int line);

namespace kemu {

static inline unsigned f32_bits(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    return u;
}
static inline float bits_f32(unsigned u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// cvt.rna.tf32.f32: x rounded to TF32 (1 sign, 8 exponent, 10 mantissa
// bits), to nearest with ties away from zero, returned as a .b32 whose low
// 13 bits are 0. Adding half of the dropped part's weight (0x1000) to the
// magnitude bits and truncating rounds ties away from zero in sign-magnitude
// form; a carry out of the mantissa bumps the exponent, which is the right
// rounded value (and the largest finite values round to infinity, as
// round-to-nearest overflows). Infinities are kept; a NaN stays a NaN (its
// payload's top bits and the quiet bit kept, so the truncation can never
// make it an infinity).
static inline unsigned tf32_rna(float x) {
    const unsigned u = f32_bits(x);
    if ((u & 0x7f800000u) == 0x7f800000u) {
        if (u & 0x007fffffu) return (u & 0xffffe000u) | 0x00400000u;  // NaN: quiet, stays NaN
        return u;                                                     // +-inf
    }
    return (u + 0x1000u) & 0xffffe000u;
}

// How an mma reads a .tf32 operand register: the tensor core uses only the
// top 19 bits (sign, exponent, 10 mantissa bits), so the emulator truncates:
// the low 13 bits are ignored. A kernel must round with cvt.rna first (every
// kestrel kernel does) so that its result does not depend on this.
static inline double tf32_operand(unsigned bits) { return (double)bits_f32(bits & 0xffffe000u); }

// One lane's part of mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32.
struct MmaM16n8k8Tf32Lane {
    unsigned a[4];
    unsigned b[2];
    float c[4];
    float d[4];
};

// The fragment layouts of PTX ISA 9.7.14.5.7 (figures "MMA .m16n8k8 fragment
// layout for matrix A with .tf32 type", "... matrix B ...", "... accumulator
// matrix C/D with .f32 type"), with groupID = laneid >> 2 and
// threadID_in_group = laneid % 4:
//   A (16 x 8, row): a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
//   B (8 x 8, col):  b0 (t, g), b1 (t + 4, g)                  [row k, column n]
//   C, D (16 x 8):   c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1)
static inline void m16n8k8_a_pos(int lane, int i, int& row, int& col) {
    row = (lane >> 2) + ((i & 1) ? 8 : 0);
    col = (lane & 3) + ((i & 2) ? 4 : 0);
}
static inline void m16n8k8_b_pos(int lane, int i, int& row, int& col) {
    row = (lane & 3) + (i ? 4 : 0);
    col = lane >> 2;
}
static inline void m16n8k8_c_pos(int lane, int i, int& row, int& col) {
    row = (lane >> 2) + ((i & 2) ? 8 : 0);
    col = (lane & 3) * 2 + (i & 1);
}

// D = A * B + C for the warp. The accumulation model: the hardware's internal
// order and rounding of the sum are not specified by the ISA. Here every
// product of two TF32 values is exact in f64 (11-bit significands: 22-bit
// products), the 8 products are added in k order to C in f64 (an error of at
// most ~8 * 2^-53 relative to the sum of magnitudes), and the result is
// rounded once to f32 (round to nearest even). That is the most accurate an
// mma can be; tests of tensor-core kernels hold the GPU to a tolerance that
// also covers f32 accumulation in any order.
static inline const char* mma_m16n8k8_tf32_run(void* const* lanes, unsigned mask) {
    if (mask != 0xffffffffu) return "mma.sync.aligned needs all 32 lanes of the warp (mask 0xffffffff)";
    double A[16][8], B[8][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const MmaM16n8k8Tf32Lane* l = static_cast<const MmaM16n8k8Tf32Lane*>(lanes[lane]);
        int r, c;
        for (int i = 0; i < 4; ++i) {
            m16n8k8_a_pos(lane, i, r, c);
            A[r][c] = tf32_operand(l->a[i]);
            m16n8k8_c_pos(lane, i, r, c);
            C[r][c] = (double)l->c[i];
        }
        for (int i = 0; i < 2; ++i) {
            m16n8k8_b_pos(lane, i, r, c);
            B[r][c] = tf32_operand(l->b[i]);
        }
    }
    for (int lane = 0; lane < 32; ++lane) {
        MmaM16n8k8Tf32Lane* l = static_cast<MmaM16n8k8Tf32Lane*>(lanes[lane]);
        for (int i = 0; i < 4; ++i) {
            int r, c;
            m16n8k8_c_pos(lane, i, r, c);
            double s = C[r][c];
            for (int k = 0; k < 8; ++k) s += A[r][k] * B[k][c];
            l->d[i] = (float)s;
        }
    }
    return nullptr;
}

// The calling lane's mma: its fragments in, its part of D out (d may alias c).
static inline void mma_m16n8k8_tf32(float d[4], const unsigned a[4], const unsigned b[2], const float c[4],
                                    const char* file, int line) {
    MmaM16n8k8Tf32Lane l;
    std::memcpy(l.a, a, sizeof l.a);
    std::memcpy(l.b, b, sizeof l.b);
    std::memcpy(l.c, c, sizeof l.c);
    kemu_warp_collective(&mma_m16n8k8_tf32_run, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", 0xffffffffu,
                         &l, file, line);
    std::memcpy(d, l.d, sizeof l.d);
}

}  // namespace kemu
