// Warpgroup-level tensor-core instructions (wgmma, sm_90a only), one small
// device function per PTX instruction, for kernels/gemm_wgmma.cu. On a GPU
// (`__CUDA_ARCH__`) each is the instruction as inline PTX; in the emulated
// build each calls the emulator's implementation (emu/runtime/wgmma.h via
// kemu/simt.h), which follows the PTX ISA's semantics ("Asynchronous
// Warpgroup Level Matrix Multiply-Accumulate Instructions", PTX ISA 8.0+)
// and checks its rules.
//
// What a kernel must respect, from the ISA:
// - a warpgroup is 4 consecutive warps (threads 128 g .. 128 g + 127);
//   every instruction here but fence_proxy_async is .sync.aligned: all 128
//   threads of the warpgroup execute the same one, converged;
// - wgmma.mma_async reads both operands from shared memory through matrix
//   descriptors; with .tf32 both must be K-major (no transpose immediates
//   exist for .tf32), so a kernel stages op(A) and op(B) with k contiguous;
// - it is asynchronous: its accumulator registers may not be touched, nor
//   its shared-memory operands overwritten, until a wgmma.wait_group covers
//   the wgmma.commit_group that closed it;
// - wgmma.fence orders earlier register accesses (the accumulators' zeroing,
//   an epilogue's reads) before the next wgmma.mma_async;
// - shared memory written by ordinary stores (the generic proxy) must be made
//   visible to the async proxy that wgmma reads through with
//   fence.proxy.async, before the barrier that publishes it.
#pragma once

#include "common.cuh"

#ifdef __CUDA_ARCH__
#define KESTREL_WG_SITE_PARAMS
#define KESTREL_WG_SITE_ARGS
#else
#define KESTREL_WG_SITE_PARAMS , const char* kemu_file = __builtin_FILE(), int kemu_line = __builtin_LINE()
#define KESTREL_WG_SITE_ARGS , kemu_file, kemu_line
#endif

// Swizzle modes of a matrix descriptor (bits 62-63, PTX ISA "Matrix
// Descriptor Format"): how the 16-byte chunks of each row of a swizzle atom
// (8 rows of 32, 64 or 128 bytes) are permuted. The chunk index (address
// bits 4..6) is XORed with the row within the atom (address bits 7..9),
// masked to the atom's width.
enum WgmmaSwizzle : u32 { WGMMA_SWIZZLE_NONE = 0, WGMMA_SWIZZLE_128B = 1, WGMMA_SWIZZLE_64B = 2, WGMMA_SWIZZLE_32B = 3 };

// The 32-bit shared-window address of a pointer into shared memory
// (cvta.to.shared): what descriptors hold.
__device__ __forceinline__ u32 wgmma_shared_address(const void* p KESTREL_WG_SITE_PARAMS) {
#ifdef __CUDA_ARCH__
    return (u32)__cvta_generic_to_shared(p);
#else
    return kemu_shared_window_address(p, kemu_file, kemu_line);
#endif
}

// A shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"):
//   bits  0-13  start address >> 4
//   bits 16-29  leading dimension byte offset >> 4 (for K-major operands:
//               between core matrices adjacent in k; not used by the
//               swizzled K-major layouts, whose k extent of one wgmma lies
//               inside a row, conventionally 1)
//   bits 32-45  stride dimension byte offset >> 4 (between groups of 8
//               rows in m or n)
//   bits 49-51  matrix base offset (0: every swizzle atom starts at an
//               address aligned to its repeat, which kestrel keeps)
//   bits 62-63  swizzle mode (WgmmaSwizzle)
// Not an instruction: plain bit arithmetic on the shared address.
__device__ __forceinline__ u64 wgmma_descriptor(const void* smem, u32 leading_bytes, u32 stride_bytes,
                                               WgmmaSwizzle swizzle KESTREL_WG_SITE_PARAMS) {
    const u32 addr = wgmma_shared_address(smem KESTREL_WG_SITE_ARGS);
    return (u64)((addr & 0x3ffffu) >> 4) | ((u64)((leading_bytes >> 4) & 0x3fffu) << 16) |
           ((u64)((stride_bytes >> 4) & 0x3fffu) << 32) | ((u64)swizzle << 62);
}

// fence.proxy.async.shared::cta: the calling thread's earlier generic-proxy
// writes to shared memory become visible to later async-proxy reads (wgmma
// operands) once a barrier orders them. Per thread, not collective.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// wgmma.fence.sync.aligned: orders the warpgroup's earlier register accesses
// (to accumulators and operands) before its next wgmma.mma_async.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// wgmma.commit_group.sync.aligned: closes the warpgroup's not yet committed
// wgmma.mma_async operations into one wgmma-group.
__device__ __forceinline__ void wgmma_commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// wgmma.wait_group.sync.aligned N: waits until at most the N most recent
// wgmma-groups are pending; the accumulators of the completed ones are then
// readable and their shared-memory operands reusable. N is an immediate.
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32: D (64 x 128, f32)
// = A (64 x 8) * B (8 x 128) + (accumulate ? D : 0), A and B TF32 in shared
// memory, both K-major, named by the descriptors a_desc and b_desc (B's
// descriptor walks its 128 columns n as the rows of an n x 8 K-major
// matrix). imm-scale-a and imm-scale-b are 1 (no negation). Accumulator
// fragment of lane l of warp w of the warpgroup (PTX ISA "WGMMA .m64nNk8
// register fragment layout for accumulator matrix D"), g = l / 4, t = l % 4:
//   d[4j + 0] = D(16w + g,     8j + 2t)    d[4j + 1] = D(16w + g,     8j + 2t + 1)
//   d[4j + 2] = D(16w + g + 8, 8j + 2t)    d[4j + 3] = D(16w + g + 8, 8j + 2t + 1)
// for j = 0 .. 15. Asynchronous: d is written when a wait_group covers it.
__device__ __forceinline__ void wgmma_m64n128k8_tf32(float (&d)[64], u64 a_desc, u64 b_desc, u32 accumulate) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "
        "}, %64, %65, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a_desc), "l"(b_desc), "r"(accumulate)
        : "memory");
}

// Keeps the compiler from moving accesses to the accumulators across the
// wgmma instructions around it: an empty asm that reads and writes each of
// them. (The compiler sees the mma_async's outputs as final when it returns
// and wgmma.wait_group as touching no register; ptxas knows better, but only
// for code the compiler left in order.) Not an instruction.
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#else  // the emulated device: kemu_wgmma_* and kemu_fence_proxy_async (kemu/simt.h)

// Nothing to pin: the emulated instructions are calls the compiler cannot
// move accesses across (the accumulators' address escapes into them).
__device__ __forceinline__ void wgmma_fence_operands(float (&)[64]) {}

__device__ __forceinline__ void fence_proxy_async(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kemu_fence_proxy_async(file, line);
}
__device__ __forceinline__ void wgmma_fence(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kemu_wgmma_fence(file, line);
}
__device__ __forceinline__ void wgmma_commit_group(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kemu_wgmma_commit_group(file, line);
}
template <int N>
__device__ __forceinline__ void wgmma_wait_group(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kemu_wgmma_wait_group(N, file, line);
}
__device__ __forceinline__ void wgmma_m64n128k8_tf32(float (&d)[64], u64 a_desc, u64 b_desc, u32 accumulate,
                                                     const char* file = __builtin_FILE(),
                                                     int line = __builtin_LINE()) {
    kemu_wgmma_mma_async_tf32(128, d, a_desc, b_desc, accumulate != 0, 1, 1, file, line);
}

#endif
