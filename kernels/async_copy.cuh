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

template <int N>
__device__ __forceinline__ void cp_async_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kemu_cp_async_wait(N, file, line);
}

#endif
