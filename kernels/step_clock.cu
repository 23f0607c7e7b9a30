// The step clock of a captured training step (kestrel::cuda::StepClock):
// the per-step values that a CUDA graph must not bake into its parameter
// bytes live in device memory, and the graph advances them itself.
//
// clock[0]: the training step (feeds the dropout Philox offsets, read by
//           dropout_forward_clocked);
// clock[1]: the row of this step in the epoch (picks the optimizer's
//           learning-rate row, read by optim_update_clocked, and the row
//           of the epoch's results this step's loss and metrics go to).
//
// step_clock_tick is the last node of a captured step: it copies the
// step's results (written by the losses and metrics into a fixed row) to
// row clock[1] of the epoch's results, then advances both counters. One
// block; rows past `rows` are not written (the host sizes the results to
// the epoch's steps, so that never happens in a fit).
#include "common.cuh"

extern "C" __global__ void step_clock_tick(u64* __restrict__ clock, const double* __restrict__ step_row,
                                           double* __restrict__ results, u32 width, u64 rows) {
    const u64 row = clock[1];
    if (row < rows) {
        for (u32 i = threadIdx.x; i < width; i += blockDim.x) results[row * width + i] = step_row[i];
    }
    __syncthreads();  // every thread has read clock[1] before it changes
    if (threadIdx.x == 0) {
        clock[0] += 1;
        clock[1] = row + 1;
    }
}
