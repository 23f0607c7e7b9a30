//! Host-side data augmentation of training batches, as Keras's
//! `ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1,
//! horizontal_flip=True, fill_mode='nearest')` in the cifar10_cnn example.
//!
//! Per sample, three draws in this order from the augmenter's own
//! generator ([`crate::nn::Rng`], seeded by the run): the vertical shift,
//! the horizontal shift, the flip.
//!
//! - Shifts: Keras draws a float `u ~ U[-r, r]`, multiplies it by the size
//!   and applies the (sub-pixel) translation with bilinear interpolation.
//!   kestrel rounds the shift to the nearest whole pixel,
//!   `d = round(u * size)`, and moves the pixels without interpolation: for
//!   CIFAR-10 (`r = 0.1`, size 32) `d` is in `-3..=3`. Whole-pixel shifts
//!   keep the images sharp and the operation exact (a shift by 0 is the
//!   identity), at the cost of the rare sub-pixel blur Keras adds; the
//!   range and the distribution of the displacement are otherwise the same.
//!   The content moves by `d` (`out[y][x] = in[y - dy][x - dx]`), and pixels
//!   shifted in from outside are filled with the nearest border pixel
//!   (`fill_mode='nearest'`: the source index is clamped to the image).
//! - Flip: left-right with probability 1/2 (`out[y][x] = in[y][W-1-x]`),
//!   applied after the shift, as Keras does.
//!
//! Every channel of a sample gets the same transform.

use crate::error::{Error, Result};
use crate::nn::Rng;
use crate::run::config::AugmentationConfig;

/// Moves `src` (`[c, h, w]`) by `(dy, dx)` whole pixels with nearest fill,
/// then flips it left-right when `flip`, into `dst` (same length, fully
/// overwritten).
pub fn shift_flip(
    src: &[f32],
    dst: &mut [f32],
    shape: [usize; 3],
    dy: isize,
    dx: isize,
    flip: bool,
) -> Result<()> {
    const OP: &str = "augment.shift_flip";
    let [c, h, w] = shape;
    let n = crate::error::checked_product(OP, "sample", &[c, h, w])?;
    crate::error::check_len(OP, "src", src.len(), n)?;
    crate::error::check_len(OP, "dst", dst.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let clamp = |v: isize, hi: usize| v.clamp(0, hi as isize - 1) as usize;
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        let out = &mut dst[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            let sy = clamp(y as isize - dy, h);
            for x in 0..w {
                // The flip reads the shifted image mirrored.
                let xs = if flip { w - 1 - x } else { x };
                let sx = clamp(xs as isize - dx, w);
                out[y * w + x] = plane[sy * w + sx];
            }
        }
    }
    Ok(())
}

/// Applies random shifts and flips to training batches (see the module docs).
#[derive(Clone, Debug)]
pub struct Augmenter {
    width_shift_range: f64,
    height_shift_range: f64,
    horizontal_flip: bool,
    shape: [usize; 3],
    rng: Rng,
    scratch: Vec<f32>,
}

impl Augmenter {
    /// An augmenter for samples of `sample_shape` (`[C, H, W]`), drawing from
    /// a generator seeded with `seed`.
    pub fn new(cfg: &AugmentationConfig, sample_shape: &[usize], seed: u64) -> Result<Self> {
        let shape: [usize; 3] = sample_shape.try_into().map_err(|_| {
            Error::invalid(
                "augment",
                "sample shape",
                format!("expected [channels, height, width], got {sample_shape:?}"),
            )
        })?;
        for (arg, v) in [
            ("width_shift_range", cfg.width_shift_range),
            ("height_shift_range", cfg.height_shift_range),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(
                    "augment",
                    arg,
                    format!("{v} is not in [0, 1)"),
                ));
            }
        }
        Ok(Augmenter {
            width_shift_range: cfg.width_shift_range,
            height_shift_range: cfg.height_shift_range,
            horizontal_flip: cfg.horizontal_flip,
            shape,
            rng: Rng::new(seed ^ 0xa06_3e47),
            scratch: vec![0.0; shape.iter().product()],
        })
    }

    /// The generator's state (for checkpoints).
    pub fn rng_state(&self) -> [u64; 4] {
        self.rng.state()
    }

    /// Restores the generator's state.
    pub fn set_rng_state(&mut self, s: [u64; 4]) {
        self.rng = Rng::from_state(s);
    }

    fn draw_shift(&mut self, range: f64, size: usize) -> isize {
        // Drawn even when the range is 0 so that the stream does not depend
        // on which shifts are switched on.
        let u = self.rng.next_f64();
        ((2.0 * u - 1.0) * range * size as f64).round() as isize
    }

    /// Transforms every sample of `batch` (`[n, C, H, W]`) in place.
    pub fn apply(&mut self, batch: &mut [f32]) -> Result<()> {
        let per = self.scratch.len();
        if per == 0 || !batch.len().is_multiple_of(per) {
            return Err(Error::shape(
                "augment.apply",
                "batch length",
                format!("a multiple of {per}"),
                batch.len(),
            ));
        }
        let [_, h, w] = self.shape;
        for sample in batch.chunks_exact_mut(per) {
            let dy = self.draw_shift(self.height_shift_range, h);
            let dx = self.draw_shift(self.width_shift_range, w);
            let flip = self.rng.next_f64() < 0.5 && self.horizontal_flip;
            if dy == 0 && dx == 0 && !flip {
                continue;
            }
            self.scratch.copy_from_slice(sample);
            shift_flip(&self.scratch, sample, self.shape, dy, dx, flip)?;
        }
        Ok(())
    }
}
