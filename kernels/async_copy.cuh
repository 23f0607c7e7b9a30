// Asynchronous global -> shared copies (sm_80+), one small device function
// per PTX instruction, so that the inline PTX lives in one place and the
// emulated device (emu/) can give each instruction its documented semantics.
//
// PTX ISA, "cp.async" / "cp.async.commit_group" / "cp.async.wait_group":
// - cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size}: starts
//   a copy of cp-size bytes (4, 8 or 16; .cg, which caches in L2 only, takes
//   16 alone). Only the first src-size bytes are read from src; the rest of
//   dst is filled with zeros. Both addresses are aligned to cp-size.
// - cp.async.commit_group: closes the thread's not yet committed copies into
//   one cp.async-group (possibly empty).
// - cp.async.wait_group N: waits until at most the N most recent groups of
//   the executing thread are pending; the writes of the completed groups are
//   then visible to that thread (to others only after a barrier).
// Until its wait, a copy's destination holds anything: the old contents,
// the new ones or a mix. The emulator performs the copies at the wait, so a
// read before the matching wait sees stale data and fails the comparison
// with the CPU reference.
#pragma once

#include "common.cuh"

#ifdef __CUDA_ARCH__

// The shared-window address cp.async takes (a generic pointer is not one).
__device__ __forceinline__ u32 shared_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16 bytes, L2 only (operand tiles are reused from shared memory, not L1).
// src_bytes < 16 zero-fills the tail; 0 reads nothing.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_addr(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

// 8 bytes (.ca: the only form for sizes below 16).
__device__ __forceinline__ void cp_async_8(void* dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(shared_addr(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

// 4 bytes (the unaligned fallback).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_addr(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// One 128-bit shared-memory load of base[off .. off + 4) (base in shared
// memory, the address 16-byte aligned). Written as an instruction rather than a float4 dereference: NVRTC
// 12.2 splits a float4 load into four scalar loads and lets its load/store
// vectorizer merge them again, and that pass chose between one v4 and v4 + v2
// differently from one compile to the next (even within one process), which
// ci/ptx --check cannot allow. An asm load leaves it nothing to merge.
// volatile: it must stay between the barriers that order it (it has no
// "memory" clobber, so it does not pin unrelated memory accesses).
// The offset is added to the 32-bit shared-window address of the base, which
// LLVM computes once per base.
__device__ __forceinline__ float4 lds128(const float* base, u32 off) {
    const u32 addr = shared_addr(base) + off * 4u;
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr));
    return v;
}

// The 64-bit form (base[off .. off + 2), 8-byte aligned).
__device__ __forceinline__ float2 lds64(const float* base, u32 off) {
    const u32 addr = shared_addr(base) + off * 4u;
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
    return v;
}

// N is an immediate in the instruction, hence the template.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#else  // the emulated device: kemu_cp_async* in emu/include/kemu/simt.h
// (the default arguments carry the kernel's call site into error messages).

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, u32 src_bytes,
                                            const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kemu_cp_async(dst, src, 16, src_bytes, file, line);
}

__device__ __forceinline__ void cp_async_8(void* dst, const void* src, u32 src_bytes,
                                           const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kemu_cp_async(dst, src, 8, src_bytes, file, line);
}

__device__ __forceinline__ void cp_async_4(void* dst, const void* src, u32 src_bytes,
                                           const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kemu_cp_async(dst, src, 4, src_bytes, file, line);
}

__device__ __forceinline__ void cp_async_commit() { kemu_cp_async_commit(); }

// A plain 16-byte read (blocks' shared memory is host memory here).
__device__ __forceinline__ float4 lds128(const float* base, u32 off) {
    return *reinterpret_cast<const float4*>(base + off);
}
__device__ __forceinline__ float2 lds64(const float* base, u32 off) {
    return *reinterpret_cast<const float2*>(base + off);
}

template <int N>
__device__ __forceinline__ void cp_async_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kemu_cp_async_wait(N, file, line);
}

#endif
