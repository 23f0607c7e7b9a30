//! Interleaved f64 accumulation for the CPU reductions (batch norm's
//! statistics, the bias gradient).
//!
//! A single f64 accumulator is one dependency chain: one add per element,
//! 4 cycles each, ~1 ns per element whatever the vector width. Summing a
//! contiguous run into [`LANES`] independent lanes (element `t` of the run
//! into lane `t % LANES`) lets LLVM keep the lanes in vector registers (4
//! `zmm`, 8 `ymm`), with the order still fixed by the shape alone: the
//! same bits on any thread count and, since the additions are plain
//! (never fused), at every [`crate::cpu_isa::Isa`] level.

/// Lanes per accumulator: enough independent chains to cover the f64 add
/// latency (4 cycles) at two adds per cycle with 8-lane vectors.
pub(crate) const LANES: usize = 32;

/// `acc[t % LANES] += f(xs[t])` for every `t`, in index order per lane.
#[inline(always)]
pub(crate) fn add_lanes(acc: &mut [f64; LANES], xs: &[f32], f: impl Fn(f32) -> f64) {
    let mut blocks = xs.chunks_exact(LANES);
    for b in &mut blocks {
        for l in 0..LANES {
            acc[l] += f(b[l]);
        }
    }
    for (a, &v) in acc.iter_mut().zip(blocks.remainder()) {
        *a += f(v);
    }
}

/// The lanes' total, added in lane order.
#[inline(always)]
pub(crate) fn fold(acc: &[f64; LANES]) -> f64 {
    acc.iter().fold(0.0f64, |s, &v| s + v)
}
