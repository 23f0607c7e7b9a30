//! Inverted dropout with a counter-based mask (Philox4x32-10), so that the
//! CPU and the GPU draw the same mask bit for bit.
//!
//! # The mask, exactly
//!
//! A dropout call over `len` elements has a `rate` (f32 in `[0, 1)`), a
//! `seed: u64` and an `offset: u64` (the training loop advances the offset
//! per call so that no two calls share counters). Element `i` (`0 <= i <
//! len`, in the flat row-major order of the tensor) is decided by:
//!
//! - `key = [seed as u32, (seed >> 32) as u32]`;
//! - `block = (i / 4) as u64`,
//!   `counter = [block as u32, (block >> 32) as u32, offset as u32,
//!   (offset >> 32) as u32]`;
//! - `word = philox4x32_10(counter, key)[i % 4]`;
//! - `u = (word >> 8) as f32 * 2^-24`, exactly representable, in `[0, 1)`;
//! - the element is **kept** when `u >= rate` (an f32 comparison), so it
//!   is kept with probability `1 - rate` up to the 2^-24 grid.
//!
//! # Values
//!
//! `scale = 1.0f32 / (1.0f32 - rate)` (f32 ops). Forward:
//! `y = x * scale` where kept, `y = x * 0.0` where dropped; backward:
//! `dx = dy * scale` where kept, `dx = dy * 0.0` where dropped. These are
//! multiplications, as in Keras (`x * scale * keep_mask`): a dropped NaN or
//! infinity gives NaN, a dropped finite value gives `+-0`, and a kept NaN
//! stays NaN. `rate == 0` keeps everything with `scale == 1`, which is the
//! identity bit for bit.
//!
//! The mask is stored as one `u8` per element: 1 kept, 0 dropped (a
//! quarter of an f32 mask's traffic); the backward treats any nonzero byte
//! as kept.

pub mod cpu;
pub mod cuda;
pub mod philox;

use crate::error::{Error, Result, check_len};

/// One dropout call. Mirrored in the kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Elements in `x`, `y`, the mask, `dy`, `dx`.
    pub len: usize,
    /// Probability of dropping an element, in `[0, 1)`.
    pub rate: f32,
    /// Philox key (the run's seed).
    pub seed: u64,
    /// High half of the Philox counter (distinct per call).
    pub offset: u64,
}

impl Dropout {
    /// A validated dropout call: `rate` must be in `[0, 1)` (1 would divide
    /// by zero; Keras rejects it too).
    pub fn new(len: usize, rate: f32, seed: u64, offset: u64) -> Result<Self> {
        let p = Dropout {
            len,
            rate,
            seed,
            offset,
        };
        p.validate("dropout")?;
        Ok(p)
    }

    /// Checks the rate (the struct has public fields).
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if !(0.0..1.0).contains(&self.rate) {
            return Err(Error::invalid(
                op,
                "rate",
                format!("must be in [0, 1), got {}", self.rate),
            ));
        }
        Ok(())
    }

    /// `1 / (1 - rate)` in f32, the factor applied to kept elements.
    pub fn scale(&self) -> f32 {
        1.0f32 / (1.0f32 - self.rate)
    }

    /// The Philox key.
    pub fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// The Philox counter of 4-element block `block`.
    pub fn counter(&self, block: u64) -> [u32; 4] {
        [
            block as u32,
            (block >> 32) as u32,
            self.offset as u32,
            (self.offset >> 32) as u32,
        ]
    }

    /// Whether element `i` is kept (the definition above, one element at a
    /// time; the CPU backend generates four at once with the same result).
    pub fn keeps(&self, i: usize) -> bool {
        let w = philox::philox4x32_10(self.counter((i / 4) as u64), self.key());
        keep_word(w[i % 4], self.rate)
    }

    /// Validates the struct and checks every buffer holds `len` elements.
    pub fn check(&self, op: &'static str, bufs: &[(&str, usize)]) -> Result<()> {
        self.validate(op)?;
        for &(what, got) in bufs {
            check_len(
                op,
                &format!("{what} (dropout len {})", self.len),
                got,
                self.len,
            )?;
        }
        Ok(())
    }
}

/// `u = (word >> 8) * 2^-24` in `[0, 1)`, exact in f32.
#[inline(always)]
pub fn uniform(word: u32) -> f32 {
    (word >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// The keep decision for one Philox output word.
#[inline(always)]
pub fn keep_word(word: u32, rate: f32) -> bool {
    uniform(word) >= rate
}
