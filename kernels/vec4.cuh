// 16-byte global loads and stores for the memory-bound elementwise kernels
// (their *_vec4 entry points): one LDG.E.128 / STG.E.128 moves four floats,
// a quarter of the load/store instructions of the scalar form, which keeps
// enough bytes in flight per thread to approach copy bandwidth.
//
// Every address must be 16-byte aligned (a misaligned vector access faults
// on a GPU): the host runs a *_vec4 kernel only on buffers that start on 16
// bytes, and the kernels touch quads 4q .. 4q + 3 from there. Written as
// instructions rather than float4 dereferences so that the vector width is
// fixed by the source, not by NVRTC's load/store vectorizer (see lds128 in
// async_copy.cuh for why that matters to ci/ptx --check). The emulated
// device refuses a misaligned address with the kernel's line, as a GPU
// would fault on it.
#pragma once

#include "common.cuh"

#ifdef __CUDA_ARCH__

// Read-only input (a const __restrict__ buffer nothing writes during the
// kernel): the non-coherent path, as the compiler takes for scalar loads.
__device__ __forceinline__ float4 load4_ro(const float* p) {
    float4 v;
    asm("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];\n" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}

// A buffer the kernel also writes (in-place forms): the coherent path.
// volatile: it must not move past a store that could alias it.
__device__ __forceinline__ float4 load4(const float* p) {
    float4 v;
    asm volatile("ld.global.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ void store4(float* p, float4 v) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
                 : "memory");
}

// Four u32 (pooling's argmax).
__device__ __forceinline__ void store4_u32(u32* p, uint4 v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

#else  // the emulated device: plain 16-byte accesses, alignment enforced.

__device__ __forceinline__ void vec4_require_aligned(const void* p, const char* file, int line) {
    if ((u64)p & 15u) kemu_trap("16-byte vector access to an address that is not 16-byte aligned", file, line);
}

__device__ __forceinline__ float4 load4_ro(const float* p, const char* file = __builtin_FILE(),
                                           int line = __builtin_LINE()) {
    vec4_require_aligned(p, file, line);
    return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ float4 load4(const float* p, const char* file = __builtin_FILE(),
                                        int line = __builtin_LINE()) {
    vec4_require_aligned(p, file, line);
    return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ void store4(float* p, float4 v, const char* file = __builtin_FILE(),
                                       int line = __builtin_LINE()) {
    vec4_require_aligned(p, file, line);
    *reinterpret_cast<float4*>(p) = v;
}

__device__ __forceinline__ void store4_u32(u32* p, uint4 v, const char* file = __builtin_FILE(),
                                           int line = __builtin_LINE()) {
    vec4_require_aligned(p, file, line);
    *reinterpret_cast<uint4*>(p) = v;
}

#endif

// The loops of a *_vec4 kernel over n elements: quads q < n / 4 (elements
// 4q .. 4q + 3), grid-strided, then the n % 4 tail elements one per thread
// from element n & ~3. The body of each loop sees `q` or `i`.
#define VEC4_QUADS(q, n) GRID_STRIDE(q, (n) >> 2)
#define VEC4_TAIL(i, n)                                                                          \
    for (u64 i = ((n) & ~3ull) + (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (u64)gridDim.x * blockDim.x)

// A quad as an array, so that a kernel loops over its lanes (unrolled: the
// array lives in registers).
struct Lanes4 {
    float e[4];
};
__device__ __forceinline__ Lanes4 unpack4(float4 v) { return Lanes4{{v.x, v.y, v.z, v.w}}; }
__device__ __forceinline__ float4 pack4(const Lanes4& a) { return make_float4(a.e[0], a.e[1], a.e[2], a.e[3]); }

// The channel of element i of an [n, c, spatial] tensor and its position
// within the channel's run of `spatial` elements, stepped one element at a
// time: a quad needs one pair of divisions, not four, and each element gets
// the channel (i / spatial) % c of the scalar kernels.
struct ChannelWalk {
    u64 s;   // i % spatial
    u64 ch;  // (i / spatial) % c
};

__device__ __forceinline__ ChannelWalk channel_walk_at(u64 i, u64 spatial, u64 c) {
    const u64 row = udiv64(i, spatial);
    return ChannelWalk{i - row * spatial, row - udiv64(row, c) * c};
}

__device__ __forceinline__ void channel_walk_step(ChannelWalk& w, u64 spatial, u64 c) {
    if (++w.s == spatial) {
        w.s = 0;
        if (++w.ch == c) w.ch = 0;
    }
}

#ifdef __CUDA_ARCH__

// Four u8 as one 32-bit access (dropout's mask: a quad's four bytes, byte k
// for element 4q + k, little-endian as every CUDA device is). The address
// must be 4-byte aligned.
__device__ __forceinline__ u32 load_u8x4_ro(const unsigned char* p) {
    u32 v;
    asm("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ void store_u8x4(unsigned char* p, u32 v) {
    asm volatile("st.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

#else  // emulated: alignment enforced, as for the 16-byte accesses above

__device__ __forceinline__ u32 load_u8x4_ro(const unsigned char* p, const char* file = __builtin_FILE(),
                                            int line = __builtin_LINE()) {
    if ((u64)p & 3u) kemu_trap("32-bit access to an address that is not 4-byte aligned", file, line);
    u32 v;
    std::memcpy(&v, p, 4);  // the host is little-endian too: byte k is bits 8k..8k+7
    return v;
}

__device__ __forceinline__ void store_u8x4(unsigned char* p, u32 v, const char* file = __builtin_FILE(),
                                           int line = __builtin_LINE()) {
    if ((u64)p & 3u) kemu_trap("32-bit access to an address that is not 4-byte aligned", file, line);
    std::memcpy(p, &v, 4);
}

#endif
