// Tensor-core instructions for sm_80 and newer, one small device function
// per PTX instruction. On a GPU (`__CUDA_ARCH__`) each is the instruction as
// inline PTX; in the emulated build (emu/, no __CUDA_ARCH__) each calls the
// emulator's implementation of the PTX ISA's semantics
// (emu/include/kemu/tensor_core.h), which also checks the warp-collective
// rules (all 32 lanes converged at the same call site).
//
// TF32 values travel as u32 registers holding the f32 bit pattern, low 13
// bits zero after tf32_round: that is what mma's .tf32 operands are in PTX.
#pragma once

#include "common.cuh"

// The call site of a warp-collective instruction, for the emulator's rules
// (which lanes wait at which instruction). Nothing on a GPU.
#ifdef __CUDA_ARCH__
#define KESTREL_SITE_PARAMS
#define KESTREL_SITE_ARGS
#else
#define KESTREL_SITE_PARAMS , const char* kemu_file = __builtin_FILE(), int kemu_line = __builtin_LINE()
#define KESTREL_SITE_ARGS , kemu_file, kemu_line
#endif

// cvt.rna.tf32.f32: x rounded to TF32 (10 mantissa bits), to nearest, ties
// away from zero. The mma reads only the top 19 bits of an operand; rounding
// first makes the operand's value defined instead of truncated.
__device__ __forceinline__ u32 tf32_round(float x) {
#ifdef __CUDA_ARCH__
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    return kemu::tf32_rna(x);
#endif
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: d = a * b + c for one
// 16 x 8 tile of a warp, A 16 x 8 (row), B 8 x 8 (col), C and D 16 x 8 f32.
// Every lane of the warp must call it together. Fragments per lane
// (g = lane >> 2, t = lane % 4; PTX ISA "Matrix fragments for mma.m16n8k8"):
//   a[0] A(g, t)   a[1] A(g+8, t)   a[2] A(g, t+4)   a[3] A(g+8, t+4)
//   b[0] B(t, g)   b[1] B(t+4, g)
//   c[0] C(g, 2t)  c[1] C(g, 2t+1)  c[2] C(g+8, 2t)  c[3] C(g+8, 2t+1)   (d alike)
// d may be c (accumulate in place).
__device__ __forceinline__ void mma_m16n8k8_tf32(float d[4], const u32 a[4], const u32 b[2],
                                                 const float c[4] KESTREL_SITE_PARAMS) {
#ifdef __CUDA_ARCH__
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    kemu::mma_m16n8k8_tf32(d, a, b, c KESTREL_SITE_ARGS);
#endif
}
