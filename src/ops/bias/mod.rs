//! Bias add and its gradient, plus the deterministic sum reductions the rest
//! of the crate builds on (the optimizer's global gradient norm, metrics).
//!
//! One shape covers both layouts: `x` is `[n, c, spatial]` row-major and the
//! bias `b` has `c` entries, added to every `x[i, ch, s]`.
//! - dense: `[n, f] + b[f]` is [`BiasShape::dense`]`(n, f)` (spatial = 1);
//! - conv (NCHW): `[n, c, h*w] + b[c]` is [`BiasShape::conv`]`(n, c, h*w)`.
//!
//! The gradient `db[ch] = sum over i, s of dy[i, ch, s]` (column sums for
//! dense, channel sums over n, h, w for conv).
//!
//! Reductions are deterministic: the input is cut into fixed-size chunks
//! (a function of the shape only, never of the thread count), each chunk is
//! summed in f64 in an order fixed by the shape (index order for the sums
//! and dense gradients; interleaved lanes per channel run for the CPU's
//! conv-shaped gradient, see [`cpu::backward`]), and the chunk sums are
//! combined in chunk order, in f64. Results are bit-identical on any number of threads and
//! accurate for long sums (f64 holds the running sum of up to ~2^29 f32
//! values without losing their precision).

pub mod cpu;
pub mod cuda;

use crate::error::{Result, check_len, checked_product};

/// Elements per chunk of a reduction. Fixed, so that the association of the
/// sum (and so its rounding) never depends on the machine.
pub const REDUCE_CHUNK: usize = 8192;

/// The shape of a bias add: `x` is `[n, c, spatial]`, `b` is `[c]`.
/// Mirrored in the kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasShape {
    /// Batch size.
    pub n: usize,
    /// Channels (dense: features), the length of the bias.
    pub c: usize,
    /// Elements per channel per sample (conv: `h*w`; dense: 1).
    pub spatial: usize,
}

impl BiasShape {
    /// `len` elements as one sample of one channel: the shape of a flat sum
    /// (`cuda::sum`), for choosing its kernel version.
    pub const fn flat(len: usize) -> Self {
        BiasShape {
            n: 1,
            c: 1,
            spatial: len,
        }
    }

    /// `[n, c, spatial] + b[c]`; fails if the element count overflows `usize`.
    /// Zero sizes are allowed (nothing to add; the gradient is all zeros).
    pub fn new(n: usize, c: usize, spatial: usize) -> Result<Self> {
        checked_product("bias", "shape [n, c, spatial]", &[n, c, spatial])?;
        Ok(BiasShape { n, c, spatial })
    }

    /// Dense rows: `[n, f] + b[f]`.
    pub fn dense(n: usize, f: usize) -> Result<Self> {
        Self::new(n, f, 1)
    }

    /// NCHW: `[n, c, hw] + b[c]` with `hw = h * w`.
    pub fn conv(n: usize, c: usize, hw: usize) -> Result<Self> {
        Self::new(n, c, hw)
    }

    /// Elements of `x` (and `y`, `dy`): `n * c * spatial`.
    pub fn len(&self) -> usize {
        self.n * self.c * self.spatial
    }

    /// True when `x` has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the length of an activation buffer (`x`, `y`, `dy`).
    pub fn check_x(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        // The fields are public: the shape may not have gone through `new`.
        checked_product(op, "shape [n, c, spatial]", &[self.n, self.c, self.spatial])?;
        check_len(
            op,
            &format!(
                "{what} [n={}, c={}, spatial={}]",
                self.n, self.c, self.spatial
            ),
            len,
            self.len(),
        )
    }

    /// Checks the length of a bias buffer (`b`, `db`).
    pub fn check_b(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        check_len(op, &format!("{what} [c={}]", self.c), len, self.c)
    }

    /// Samples per reduction chunk of the gradient: enough whole samples to
    /// make about [`REDUCE_CHUNK`] elements, at least one.
    pub fn samples_per_chunk(&self) -> usize {
        let per_sample = (self.c * self.spatial).max(1);
        (REDUCE_CHUNK / per_sample).max(1)
    }
}
