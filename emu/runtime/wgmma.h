// One warpgroup's asynchronous matrix multiplies (wgmma, sm_90a), with the
// semantics of the PTX ISA ("Asynchronous Warpgroup Level Matrix Multiply-
// Accumulate Instructions": wgmma.mma_async, wgmma.commit_group,
// wgmma.wait_group; "Matrix Descriptor Format"; "Shared Memory Matrix
// Layout"; "WGMMA .m64nNk8 register fragment layout for accumulator matrix
// D"). The scheduler (scheduler.cpp) runs each instruction once for the
// whole warpgroup, when its 128 threads wait at the same call site.
//
// Completion: an operation is performed only when a wgmma.wait_group
// completes the group that holds it, the latest moment the ISA allows. Its
// operands are read from shared memory then (through the async proxy's view,
// see Block in scheduler.cpp) and its accumulators written then, so a kernel
// that reads the accumulators before the wait reads stale values, and one
// that overwrites an operand before the wait feeds the overwrite in; either
// way its result differs from the CPU reference. Operations still pending
// when the warpgroup exits are dropped (their registers die with it).
//
// Arithmetic: A (64 x 8) and B (N x 8, both K-major) hold .tf32 values in
// 32-bit containers; the tensor core reads only their top 19 bits, so the
// emulator truncates the low 13 (as kemu/tensor_core.h does for mma.sync;
// kestrel's kernels round with cvt.rna when they stage the operands, so
// their results do not depend on it). Each of the 8 products is exact in
// f64, they are added in k order to C (or to 0 when scale-d is false) in
// f64, and the sum is rounded once to f32: the most accurate a wgmma can be.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kemu {

// The fields of a matrix descriptor, in bytes.
struct WgmmaDescriptor {
    uint32_t start;        // bits 0-13, << 4
    uint32_t leading;      // bits 16-29, << 4
    uint32_t stride;       // bits 32-45, << 4
    uint32_t base_offset;  // bits 49-51
    uint32_t swizzle;      // bits 62-63: 0 none, 1 128B, 2 64B, 3 32B
};

inline WgmmaDescriptor decode_wgmma_descriptor(uint64_t d) {
    WgmmaDescriptor r;
    r.start = (uint32_t)(d & 0x3fffu) << 4;
    r.leading = (uint32_t)(d >> 16 & 0x3fffu) << 4;
    r.stride = (uint32_t)(d >> 32 & 0x3fffu) << 4;
    r.base_offset = (uint32_t)(d >> 49 & 0x7u);
    r.swizzle = (uint32_t)(d >> 62 & 0x3u);
    return r;
}

// Bytes per row of a swizzle atom (8 rows) for a swizzle mode; 16 (one core
// matrix row) without swizzling.
inline uint32_t wgmma_row_bytes(uint32_t swizzle) {
    switch (swizzle) {
        case 1: return 128;
        case 2: return 64;
        case 3: return 32;
    }
    return 16;
}

// The shared-window byte address of element (row, k) of a K-major .tf32
// operand (rows of m or n, k < 8) that `d` describes:
// - no swizzle: 8 x 16-byte core matrices, row r of a core matrix at 16 r;
//   core matrices adjacent in k at the leading byte offset, adjacent in
//   rows (groups of 8) at the stride byte offset;
// - 32/64/128-byte swizzle: rows of 32/64/128 bytes, 8 rows per atom,
//   atoms at the stride byte offset; k runs along the row (the k extent of
//   one wgmma, 32 bytes, lies inside it, so the leading offset is unused);
//   then the swizzle: the 16-byte chunk bits (4..6) are XORed with the row
//   bits (7..9) of the address, masked to the atom's width. Since it acts on
//   the address, a start address advanced by k * 4 bytes inside an atom (how
//   a kernel steps k) reads the chunks the staging wrote there.
inline uint32_t wgmma_element_address(const WgmmaDescriptor& d, uint32_t row, uint32_t k) {
    if (d.swizzle == 0) return d.start + row / 8 * d.stride + k / 4 * d.leading + row % 8 * 16 + k % 4 * 4;
    const uint32_t w = wgmma_row_bytes(d.swizzle);
    const uint32_t a = d.start + row / 8 * d.stride + row % 8 * w + k * 4;
    const uint32_t chunks = w / 16 - 1;  // 1, 3 or 7
    return a ^ (((a >> 7) & chunks) << 4);
}

// How a .tf32 operand element is read: its top 19 bits.
inline double wgmma_tf32_operand(const unsigned char* p) {
    uint32_t u;
    std::memcpy(&u, p, 4);
    u &= 0xffffe000u;
    float f;
    std::memcpy(&f, &u, 4);
    return (double)f;
}

// (row, column) of D held in accumulator register i of thread t (0..127) of
// the warpgroup.
inline void wgmma_d_position(unsigned t, unsigned i, unsigned& row, unsigned& col) {
    const unsigned w = t / 32, lane = t % 32, j = i / 4, e = i % 4;
    row = 16 * w + lane / 4 + (e >> 1) * 8;
    col = 8 * j + 2 * (lane % 4) + (e & 1);
}

struct WgmmaOp {
    unsigned n;  // columns of D: 8 .. 256, a multiple of 8
    uint64_t a_desc, b_desc;
    bool scale_d;          // false: D = A * B (C ignored)
    int scale_a, scale_b;  // imm-scale-a / imm-scale-b: 1 or -1
    float* d[128];         // each thread's accumulator registers (n / 2 floats)
};

// Checks an operation's parameters at issue; returns what is wrong, or "".
inline std::string wgmma_check(const WgmmaOp& op, size_t window) {
    if (op.n < 8 || op.n > 256 || op.n % 8) return "N = " + std::to_string(op.n) + " (must be 8 .. 256, a multiple of 8)";
    if ((op.scale_a != 1 && op.scale_a != -1) || (op.scale_b != 1 && op.scale_b != -1))
        return "imm-scale-a and imm-scale-b must be 1 or -1";
    for (int which = 0; which < 2; ++which) {
        const WgmmaDescriptor d = decode_wgmma_descriptor(which ? op.b_desc : op.a_desc);
        const char* name = which ? "B" : "A";
        const unsigned rows = which ? op.n : 64;
        if (d.base_offset != 0)
            return std::string("the ") + name + " descriptor's matrix base offset is " + std::to_string(d.base_offset) +
                   " (the emulator implements base offset 0: swizzle atoms aligned to their repeat)";
        // Every element inside the block's shared memory.
        for (unsigned r = 0; r < rows; ++r)
            for (unsigned k = 0; k < 8; ++k) {
                const uint32_t a = wgmma_element_address(d, r, k);
                if ((size_t)a + 4 > window)
                    return std::string("the ") + name + " operand's element (" + std::to_string(r) + ", " +
                           std::to_string(k) + ") at shared address " + std::to_string(a) +
                           " lies outside the block's " + std::to_string(window) + " bytes of shared memory";
            }
    }
    return "";
}

// D = A * B (+ D) for the warpgroup, reading the operands from `smem` (the
// shared window as the async proxy sees it).
inline void wgmma_perform(const WgmmaOp& op, const unsigned char* smem) {
    const WgmmaDescriptor da = decode_wgmma_descriptor(op.a_desc), db = decode_wgmma_descriptor(op.b_desc);
    double A[64][8];
    std::vector<double> B((size_t)op.n * 8);
    for (unsigned r = 0; r < 64; ++r)
        for (unsigned k = 0; k < 8; ++k) A[r][k] = op.scale_a * wgmma_tf32_operand(smem + wgmma_element_address(da, r, k));
    for (unsigned c = 0; c < op.n; ++c)
        for (unsigned k = 0; k < 8; ++k)
            B[c * 8 + k] = op.scale_b * wgmma_tf32_operand(smem + wgmma_element_address(db, c, k));
    for (unsigned t = 0; t < 128; ++t)
        for (unsigned i = 0; i < op.n / 2; ++i) {
            unsigned r, c;
            wgmma_d_position(t, i, r, c);
            double s = op.scale_d ? (double)op.d[t][i] : 0.0;
            for (unsigned k = 0; k < 8; ++k) s += A[r][k] * B[c * 8 + k];
            op.d[t][i] = (float)s;
        }
}

// The warpgroup's issued operations and committed groups.
class WarpgroupMma {
   public:
    void reset() {
        ops_.clear();
        group_ends_.clear();
    }
    void issue(const WgmmaOp& op) { ops_.push_back(op); }
    void commit() { group_ends_.push_back(ops_.size()); }
    // wgmma.wait_group n: performs, in issue order, every operation of the
    // committed groups but the n most recent. Uncommitted operations stay.
    void wait(unsigned n, const unsigned char* smem) {
        if (group_ends_.size() <= n) return;
        const size_t groups = group_ends_.size() - n;
        const size_t upto = group_ends_[groups - 1];
        for (size_t i = 0; i < upto; ++i) wgmma_perform(ops_[i], smem);
        ops_.erase(ops_.begin(), ops_.begin() + (std::ptrdiff_t)upto);
        group_ends_.erase(group_ends_.begin(), group_ends_.begin() + (std::ptrdiff_t)groups);
        for (size_t& e : group_ends_) e -= upto;
    }
    size_t pending() const { return ops_.size(); }

   private:
    std::vector<WgmmaOp> ops_;
    std::vector<size_t> group_ends_;
};

}  // namespace kemu
