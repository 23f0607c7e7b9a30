// What the emulator's runtime and an emulated kernel share about a CUDA
// thread: the built-in index types and the record a fiber reads its
// threadIdx/blockIdx/blockDim/gridDim from, and the warp operations.
#pragma once

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace kemu {
struct ThreadView {
    uint3 thread_idx;
    uint3 block_idx;
    uint3 block_dim;
    uint3 grid_dim;
};
enum WarpOp : int {
    WARP_SYNC = 0,
    SHFL_IDX,
    SHFL_UP,
    SHFL_DOWN,
    SHFL_XOR,
    VOTE_BALLOT,
    VOTE_ANY,
    VOTE_ALL,
    // A warp-collective instruction (tensor-core mma): every lane of the mask
    // hands the scheduler a pointer to its operands; once all are there, the
    // instruction's function runs once over the 32 lanes' records.
    WARP_COLLECTIVE,
    // A warpgroup-collective instruction (wgmma): the 128 threads of 4
    // consecutive warps wait at the same call site; the runtime then runs it
    // once over their records (emu/runtime/wgmma.h).
    WARPGROUP_COLLECTIVE,
};
// The function of a WARP_COLLECTIVE: lanes[k] is lane k's record (nullptr
// for a lane outside the mask). Returns nullptr, or what is wrong (the
// launch then fails with it).
typedef const char* (*CollectiveFn)(void* const* lanes, unsigned mask);
}  // namespace kemu
