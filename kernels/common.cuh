// Shared by every kernel file: fixed-width types, the structs mirrored from
// Rust (#[repr(C)] there, same field order here), and small device helpers.
// NVRTC compiles without the CUDA toolkit's headers, so nothing is included.
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;  // Rust usize on every 64-bit target

// Mirrors kestrel::ops::activation::{ActivationKind, Activation}.
enum ActivationKind : u32 { ACT_LINEAR = 0, ACT_RELU = 1, ACT_ELU = 2, ACT_LEAKY_RELU = 3, ACT_TANH = 4, ACT_SIGMOID = 5 };
struct Activation {
    ActivationKind kind;
    float alpha;
};

// Grid-stride loops: launches size their grid by occupancy, not by n.
#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

__device__ __forceinline__ float sigmoidf_stable(float x) {
    // Never overflows: exp of a non-positive number only.
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

// y = f(x); NaN propagates for every kind (x > 0 is false for NaN, so the
// else-branches must not produce a finite value from it).
__device__ __forceinline__ float activation_apply(Activation a, float x) {
    switch (a.kind) {
        case ACT_RELU: return (x > 0.0f || x != x) ? x : 0.0f;
        case ACT_ELU: return (x > 0.0f || x != x) ? x : a.alpha * expm1f(x);
        case ACT_LEAKY_RELU: return (x > 0.0f || x != x) ? x : a.alpha * x;
        case ACT_TANH: return tanhf(x);
        case ACT_SIGMOID: return sigmoidf_stable(x);
        default: return x;
    }
}
