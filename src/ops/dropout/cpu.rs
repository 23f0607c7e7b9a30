//! CPU dropout (the rayon reference); the mask definition is in the module
//! docs of [`super`].
//!
//! Each element's decision is a pure function of `(seed, offset, i)`, so
//! the work splits over threads in any way with the same bits. Tasks cover
//! whole 4-element blocks, so each Philox call feeds four elements.

use rayon::prelude::*;

use super::philox::philox4x32_10;
use super::{Dropout, keep_word};
use crate::error::Result;

/// Elements per rayon task; a multiple of 4 so that blocks never straddle
/// tasks.
const CHUNK: usize = 1 << 14;

/// Calls `f(j, kept)` for the elements `base..base + n` (`base` a multiple
/// of 4), `j` counted from `base`.
#[inline]
fn for_each_decision(p: &Dropout, base: usize, n: usize, mut f: impl FnMut(usize, bool)) {
    let key = p.key();
    if p.rate == 0.0 {
        // u >= 0 always holds: skip the generator, same result.
        (0..n).for_each(|j| f(j, true));
        return;
    }
    for b in 0..n.div_ceil(4) {
        let w = philox4x32_10(p.counter(((base / 4) + b) as u64), key);
        for (lane, &word) in w.iter().enumerate().take((n - 4 * b).min(4)) {
            f(4 * b + lane, keep_word(word, p.rate));
        }
    }
}

/// Writes the mask alone (1 kept, 0 dropped), fully overwriting `mask`.
pub fn mask_only(p: &Dropout, mask: &mut [u8]) -> Result<()> {
    p.check("dropout.mask_only", &[("mask", mask.len())])?;
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(t, mc)| {
        for_each_decision(p, t * CHUNK, mc.len(), |j, k| mc[j] = k as u8);
    });
    Ok(())
}

/// `y = x * scale` where kept, `x * 0.0` where dropped; writes `y` and the
/// `mask` (both fully overwritten).
pub fn forward(p: &Dropout, x: &[f32], y: &mut [f32], mask: &mut [u8]) -> Result<()> {
    p.check(
        "dropout.forward",
        &[("x", x.len()), ("y", y.len()), ("mask", mask.len())],
    )?;
    let scale = p.scale();
    y.par_chunks_mut(CHUNK)
        .zip(mask.par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(t, ((yc, mc), xc))| {
            for_each_decision(p, t * CHUNK, yc.len(), |j, k| {
                mc[j] = k as u8;
                yc[j] = xc[j] * if k { scale } else { 0.0 };
            });
        });
    Ok(())
}

/// `dx = dy * scale` where `mask` is nonzero, `dy * 0.0` elsewhere; `dx` is
/// fully overwritten.
pub fn backward(p: &Dropout, dy: &[f32], mask: &[u8], dx: &mut [f32]) -> Result<()> {
    p.check(
        "dropout.backward",
        &[("dy", dy.len()), ("mask", mask.len()), ("dx", dx.len())],
    )?;
    let scale = p.scale();
    dx.par_chunks_mut(CHUNK)
        .zip(dy.par_chunks(CHUNK).zip(mask.par_chunks(CHUNK)))
        .for_each(|(dxc, (dyc, mc))| {
            for j in 0..dxc.len() {
                dxc[j] = dyc[j] * if mc[j] != 0 { scale } else { 0.0 };
            }
        });
    Ok(())
}
