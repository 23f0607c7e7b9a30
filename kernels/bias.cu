// Bias add, bias gradient and whole-buffer sums.
// x, y, dy: [n, c, spatial] (dense: spatial = 1; NCHW: spatial = h*w);
// b, db: [c]. BiasShape mirrors kestrel::ops::bias::BiasShape.
// Every reduction is two-stage with f64 accumulation and a fixed order: the
// same inputs give the same bits on every run (no float atomics).
#include "common.cuh"
#include "vec4.cuh"

struct BiasShape {
    u64 n;
    u64 c;
    u64 spatial;
};
static_assert(sizeof(BiasShape) == 24, "BiasShape mirrors a #[repr(C)] Rust struct of 24 bytes");

// y[i] = x[i] + b[(i / spatial) % c].
extern "C" __global__ void bias_add(BiasShape p, const float* __restrict__ x, const float* __restrict__ b,
                                    float* __restrict__ y, u64 len) {
    GRID_STRIDE(i, len) {
        u64 row = udiv64(i, p.spatial);
        u64 ch = row - udiv64(row, p.c) * p.c;
        y[i] = x[i] + b[ch];
    }
}

// x[i] += b[(i / spatial) % c].
extern "C" __global__ void bias_add_inplace(BiasShape p, float* __restrict__ x, const float* __restrict__ b, u64 len) {
    GRID_STRIDE(i, len) {
        u64 row = udiv64(i, p.spatial);
        u64 ch = row - udiv64(row, p.c) * p.c;
        x[i] += b[ch];
    }
}

// The same two in 16-byte vectors (the *Vec4 versions): x and y 16-byte
// aligned (the host checks; b is read per element, any alignment). Each
// element adds the b[ch] of the scalar kernels (ch walked, not divided),
// the same single f32 addition: the scalar kernels' bits.
extern "C" __global__ void bias_add_vec4(BiasShape p, const float* __restrict__ x, const float* __restrict__ b,
                                         float* __restrict__ y, u64 len) {
    VEC4_QUADS(q, len) {
        ChannelWalk w = channel_walk_at(4 * q, p.spatial, p.c);
        Lanes4 v = unpack4(load4_ro(x + 4 * q));
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (k) channel_walk_step(w, p.spatial, p.c);
            v.e[k] = v.e[k] + b[w.ch];
        }
        store4(y + 4 * q, pack4(v));
    }
    VEC4_TAIL(i, len) { y[i] = x[i] + b[channel_walk_at(i, p.spatial, p.c).ch]; }
}

extern "C" __global__ void bias_add_inplace_vec4(BiasShape p, float* __restrict__ x, const float* __restrict__ b,
                                                 u64 len) {
    VEC4_QUADS(q, len) {
        ChannelWalk w = channel_walk_at(4 * q, p.spatial, p.c);
        Lanes4 v = unpack4(load4(x + 4 * q));
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (k) channel_walk_step(w, p.spatial, p.c);
            v.e[k] = v.e[k] + b[w.ch];
        }
        store4(x + 4 * q, pack4(v));
    }
    VEC4_TAIL(i, len) { x[i] += b[channel_walk_at(i, p.spatial, p.c).ch]; }
}

// Stage 1 of db: partial[ch * chunks + k] = sum of dy over samples
// [k * CHANNEL_CHUNK, (k+1) * CHANNEL_CHUNK) of channel ch (a sample is one
// (image, position) pair), in f64. Grid: x strides over chunks, y over
// channels; blockDim.x == REDUCE_THREADS.
extern "C" __global__ void bias_grad_partials(BiasShape p, const float* __restrict__ dy, double* __restrict__ partial,
                                              u64 chunks) {
    const u64 m = p.n * p.spatial;
    for (u64 ch = blockIdx.y; ch < p.c; ch += gridDim.y) {
        for (u64 k = blockIdx.x; k < chunks; k += gridDim.x) {
            const u64 j0 = k * CHANNEL_CHUNK;
            const u64 j1 = j0 + CHANNEL_CHUNK < m ? j0 + CHANNEL_CHUNK : m;
            double acc = 0.0;
            for (u64 j = j0 + threadIdx.x; j < j1; j += REDUCE_THREADS) {
                acc += (double)dy[channel_sample_index(p.c, p.spatial, ch, j)];
            }
            acc = block_sum_f64(acc);
            if (threadIdx.x == 0) partial[ch * chunks + k] = acc;
        }
    }
}

// Stage 2 of db: db[ch] = sum over k in order of partial[ch * chunks + k],
// rounded once to f32 (0 when there are no samples).
extern "C" __global__ void bias_grad_finalize(BiasShape p, const double* __restrict__ partial, u64 chunks,
                                              float* __restrict__ db) {
    GRID_STRIDE(ch, p.c) {
        double s = 0.0;
        for (u64 k = 0; k < chunks; ++k) s += partial[ch * chunks + k];
        db[ch] = (float)s;
    }
}

// Columns version of db for the dense layout (spatial == 1, dy is [n, c]
// row-major; the host runs it only then): partial[k * c + ch] = sum of dy
// over rows [k * COL_ROWS, (k+1) * COL_ROWS) of column ch in row order, one
// thread per column, so each warp reads whole row segments (coalesced).
extern "C" __global__ void bias_grad_col_partials(BiasShape p, const float* __restrict__ dy,
                                                  double* __restrict__ partial, u64 chunks) {
    COL_CHUNK_LOOP(chunks, p.c) {
        const u64 r0 = k * COL_ROWS, r1 = col_chunk_end(k, p.n);
        double acc = 0.0;
        for (u64 r = r0; r < r1; ++r) acc += (double)dy[r * p.c + col];
        partial[k * p.c + col] = acc;
    }
}

// db[ch] = the column partials of ch added in chunk order, rounded once.
extern "C" __global__ void bias_grad_col_finalize(BiasShape p, const double* __restrict__ partial, u64 chunks,
                                                  float* __restrict__ db) {
    GRID_STRIDE(ch, p.c) { db[ch] = (float)col_partials_sum(partial, chunks, p.c, ch); }
}

// Stage 1 of sum / sum of squares: partial[k] = sum over the contiguous
// chunk k of REDUCE_CHUNK elements of x (or x^2, squared in f64).
#define REDUCE_CHUNK 8192ull
extern "C" __global__ void reduce_sum_partials(const float* __restrict__ x, u64 len, u32 square,
                                               double* __restrict__ partial, u64 chunks) {
    for (u64 k = blockIdx.x; k < chunks; k += gridDim.x) {
        const u64 i0 = k * REDUCE_CHUNK;
        const u64 i1 = i0 + REDUCE_CHUNK < len ? i0 + REDUCE_CHUNK : len;
        double acc = 0.0;
        for (u64 i = i0 + threadIdx.x; i < i1; i += REDUCE_THREADS) {
            double v = (double)x[i];
            acc += square ? v * v : v;
        }
        acc = block_sum_f64(acc);
        if (threadIdx.x == 0) partial[k] = acc;
    }
}

// Stage 2: out[0] = the sum of the partials, each thread taking a fixed
// strided subset in order, then the fixed tree. One block of REDUCE_THREADS.
extern "C" __global__ void reduce_sum_finalize(const double* __restrict__ partial, u64 chunks, double* __restrict__ out) {
    double acc = 0.0;
    for (u64 k = threadIdx.x; k < chunks; k += REDUCE_THREADS) acc += partial[k];
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) out[0] = acc;
}
