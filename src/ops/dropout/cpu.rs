//! CPU dropout (the rayon reference); the mask definition is in the module
//! docs of [`super`].
//!
//! Each element's decision is a pure function of `(seed, offset, i)`, so
//! the work splits over threads in any way with the same bits. Tasks cover
//! whole 4-element blocks, so each Philox call feeds four elements.

use rayon::prelude::*;

use super::philox::philox4x32_10;
use super::{Dropout, keep_word};
use crate::cpu_isa::Isa;
use crate::error::Result;

/// Elements per rayon task; a multiple of 4 so that blocks never straddle
/// tasks.
const CHUNK: usize = 1 << 14;

/// Philox blocks generated together by [`philox_lanes`]: 16 blocks, 64
/// elements.
const LANES: usize = 16;

/// [`philox4x32_10`] of the `LANES` consecutive blocks `block0..`, written
/// as `words[4 * b + lane]` (element order), the same words as one call per
/// block. Structure of arrays, so that each round is a few lane-wise
/// multiplies and xors that LLVM turns into `vpmuludq` & co (16 lanes per
/// zmm op inside an `avx512f` caller, 8 per ymm with avx2).
#[inline(always)]
fn philox_lanes(p: &Dropout, block0: u64, words: &mut [u32; 4 * LANES]) {
    use super::philox::{M0, M1, ROUNDS, W0, W1};
    let key = p.key();
    let first = p.counter(block0);
    let mut c0 = [0u32; LANES];
    let mut c1 = [0u32; LANES];
    for (l, (a, b)) in c0.iter_mut().zip(&mut c1).enumerate() {
        let blk = block0 + l as u64;
        (*a, *b) = (blk as u32, (blk >> 32) as u32);
    }
    let mut c2 = [first[2]; LANES];
    let mut c3 = [first[3]; LANES];
    let mut k = key;
    for r in 0..ROUNDS {
        if r > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        for l in 0..LANES {
            let p0 = M0 as u64 * c0[l] as u64;
            let p1 = M1 as u64 * c2[l] as u64;
            let (hi0, lo0, hi1, lo1) = ((p0 >> 32) as u32, p0 as u32, (p1 >> 32) as u32, p1 as u32);
            let n0 = hi1 ^ c1[l] ^ k[0];
            let n2 = hi0 ^ c3[l] ^ k[1];
            (c0[l], c1[l], c2[l], c3[l]) = (n0, lo1, n2, lo0);
        }
    }
    for l in 0..LANES {
        words[4 * l..4 * l + 4].copy_from_slice(&[c0[l], c1[l], c2[l], c3[l]]);
    }
}

/// Calls `f(j0, words)` for the elements `base..base + n` (`base` a
/// multiple of 4) in runs: `words[e]` is the Philox word of element
/// `base + j0 + e` (the last run may be shorter than a whole block).
/// Handing out runs of words rather than one decision at a time lets the
/// callers' element loops be plain zips over slices, which vectorize.
#[inline(always)]
fn for_each_run(p: &Dropout, base: usize, n: usize, mut f: impl FnMut(usize, &[u32])) {
    let key = p.key();
    let groups = n / (4 * LANES);
    let mut words = [0u32; 4 * LANES];
    for g in 0..groups {
        philox_lanes(p, (base / 4 + g * LANES) as u64, &mut words);
        f(g * 4 * LANES, &words);
    }
    for b in groups * LANES..n.div_ceil(4) {
        let w = philox4x32_10(p.counter(((base / 4) + b) as u64), key);
        f(4 * b, &w[..(n - 4 * b).min(4)]);
    }
}

/// The keep decisions of `words` into `mask` (1 kept, 0 dropped), and
/// `y = x * scale` where kept, `x * 0.0` where dropped.
#[inline(always)]
fn apply(words: &[u32], rate: f32, scale: f32, x: &[f32], y: &mut [f32], mask: &mut [u8]) {
    for (((&w, &xv), yv), m) in words.iter().zip(x).zip(y).zip(mask) {
        let k = keep_word(w, rate);
        *m = k as u8;
        *yv = xv * if k { scale } else { 0.0 };
    }
}

/// Runs `f` compiled for the best instruction set of [`Isa::current`] (read
/// by the caller, on its thread): the same code and the same bits on every
/// level (integer Philox, one comparison per element), only wider vectors.
#[inline(always)]
fn with_isa_build<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match isa {
            // SAFETY: `Isa::current` never exceeds `Isa::detected`, which
            // requires avx512f, avx2 and fma for `Avx512` and avx2 and fma
            // for `Avx2`. (avx512bw/vl: every AVX-512 CPU with avx512f that
            // Rust's detection and ours meet, Skylake-X on, has them; the
            // detection below checks them anyway.)
            Isa::Avx512 if avx512_bw_vl() => return unsafe { avx512(f) },
            // SAFETY: as above.
            Isa::Avx512 | Isa::Avx2 => return unsafe { avx2(f) },
            Isa::Portable => {}
        }
    }
    let _ = isa;
    f()
}

#[cfg(target_arch = "x86_64")]
fn avx512_bw_vl() -> bool {
    is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
}

/// Writes the mask alone (1 kept, 0 dropped), fully overwriting `mask`.
pub fn mask_only(p: &Dropout, mask: &mut [u8]) -> Result<()> {
    p.check("dropout.mask_only", &[("mask", mask.len())])?;
    let isa = Isa::current();
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(t, mc)| {
        with_isa_build(isa, || {
            if p.rate == 0.0 {
                // u >= 0 always holds: skip the generator, same result.
                mc.fill(1);
                return;
            }
            for_each_run(p, t * CHUNK, mc.len(), |j0, w| {
                for (m, &wv) in mc[j0..].iter_mut().zip(w) {
                    *m = keep_word(wv, p.rate) as u8;
                }
            })
        });
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
    let isa = Isa::current();
    y.par_chunks_mut(CHUNK)
        .zip(mask.par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(t, ((yc, mc), xc))| {
            with_isa_build(isa, || {
                if p.rate == 0.0 {
                    // u >= 0 always holds: skip the generator, same result.
                    mc.fill(1);
                    for (yv, &xv) in yc.iter_mut().zip(xc.iter()) {
                        *yv = xv * scale;
                    }
                    return;
                }
                for_each_run(p, t * CHUNK, yc.len(), |j0, w| {
                    let n = w.len();
                    let (x, y, m) = (&xc[j0..][..n], &mut yc[j0..][..n], &mut mc[j0..][..n]);
                    apply(w, p.rate, scale, x, y, m);
                })
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
    let isa = Isa::current();
    dx.par_chunks_mut(CHUNK)
        .zip(dy.par_chunks(CHUNK).zip(mask.par_chunks(CHUNK)))
        .for_each(|(dxc, (dyc, mc))| {
            with_isa_build(isa, || {
                for ((d, &g), &m) in dxc.iter_mut().zip(dyc).zip(mc) {
                    *d = g * if m != 0 { scale } else { 0.0 };
                }
            })
        });
    Ok(())
}
