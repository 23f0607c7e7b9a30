// Element-wise activations. Shapes: x, y, dy, dx all [n].
#include "common.cuh"

extern "C" __global__ void activation_forward(Activation act, const float* __restrict__ x, float* __restrict__ y, u64 n) {
    GRID_STRIDE(i, n) { y[i] = activation_apply(act, x[i]); }
}
