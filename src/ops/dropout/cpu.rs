//! CPU dropout (the rayon reference); the mask definition is in the module
//! docs of [`super`].
//!
//! Each element's decision is a pure function of `(seed, offset, i)`, so
//! the work splits over threads in any way with the same bits. Tasks cover
//! whole 4-element blocks, so each Philox call feeds four elements.

use rayon::prelude::*;

use super::philox::philox4x32_10;
use super::{Dropout, keep_word};
use crate::cpu_isa::{Isa, compiled_for};
use crate::error::Result;

/// Elements per task of the backward (a select per element, ~1 ns: tasks
/// of a few thousand would cost about what starting them does).
const BACKWARD_CHUNK: usize = 1 << 14;

/// Elements per rayon task of the forward and the mask; a multiple of 64
/// (the AVX2 step, and 4 so that blocks never straddle tasks). From a
/// worker of the pool, where a task starts cheaply ([`crate::cpu_pool`]),
/// tasks of 4,096 elements (~5 us of Philox on one core) pay, and
/// keras-cnn's smallest dropout (16,384 elements) splits over the threads;
/// from any other thread 16,384 stays the unit. The same bits either way:
/// each element's draw depends on its index alone.
fn chunk_len() -> usize {
    if crate::cpu_pool::in_pool() {
        1 << 12
    } else {
        1 << 14
    }
}

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

/// Writes the mask alone (1 kept, 0 dropped), fully overwriting `mask`.
pub fn mask_only(p: &Dropout, mask: &mut [u8]) -> Result<()> {
    let chunk = chunk_len();
    p.check("dropout.mask_only", &[("mask", mask.len())])?;
    let isa = Isa::current();
    let task = |t: usize, mc: &mut [u8]| {
        if p.rate == 0.0 {
            // u >= 0 always holds: skip the generator, same result.
            mc.fill(1);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            // SAFETY: `Isa::current` never exceeds `Isa::detected`, which
            // requires AVX2 for `Avx2` and above.
            unsafe { avx2::mask_only(p, t * chunk, mc) };
            return;
        }
        compiled_for(isa, || {
            for_each_run(p, t * chunk, mc.len(), |j0, w| {
                for (m, &wv) in mc[j0..].iter_mut().zip(w) {
                    *m = keep_word(wv, p.rate) as u8;
                }
            })
        });
    };
    if mask.len() <= chunk {
        task(0, mask);
    } else {
        mask.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(t, mc)| task(t, mc));
    }
    Ok(())
}

/// `y = x * scale` where kept, `x * 0.0` where dropped; writes `y` and the
/// `mask` (both fully overwritten).
pub fn forward(p: &Dropout, x: &[f32], y: &mut [f32], mask: &mut [u8]) -> Result<()> {
    let chunk = chunk_len();
    p.check(
        "dropout.forward",
        &[("x", x.len()), ("y", y.len()), ("mask", mask.len())],
    )?;
    let scale = p.scale();
    let isa = Isa::current();
    let task = |t: usize, yc: &mut [f32], mc: &mut [u8], xc: &[f32]| {
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 && p.rate != 0.0 {
            // SAFETY: `Isa::current` never exceeds `Isa::detected`, which
            // requires AVX2 for `Avx2` and above.
            unsafe { avx2::forward(p, t * chunk, xc, yc, mc) };
            return;
        }
        compiled_for(isa, || {
            if p.rate == 0.0 {
                // u >= 0 always holds: skip the generator, same result.
                mc.fill(1);
                for (yv, &xv) in yc.iter_mut().zip(xc.iter()) {
                    *yv = xv * scale;
                }
                return;
            }
            for_each_run(p, t * chunk, yc.len(), |j0, w| {
                let n = w.len();
                let (x, y, m) = (&xc[j0..][..n], &mut yc[j0..][..n], &mut mc[j0..][..n]);
                apply(w, p.rate, scale, x, y, m);
            })
        });
    };
    if y.len() <= chunk {
        // One task: no hand-off to the pool.
        task(0, y, mask, x);
    } else {
        y.par_chunks_mut(chunk)
            .zip(mask.par_chunks_mut(chunk))
            .zip(x.par_chunks(chunk))
            .enumerate()
            .for_each(|(t, ((yc, mc), xc))| task(t, yc, mc, xc));
    }
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
    let task = |dxc: &mut [f32], dyc: &[f32], mc: &[u8]| {
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            // SAFETY: `Isa::current` never exceeds `Isa::detected`, which
            // requires AVX2 for `Avx2` and above.
            unsafe { avx2::backward(scale, dyc, mc, dxc) };
            return;
        }
        compiled_for(isa, || {
            for ((d, &g), &m) in dxc.iter_mut().zip(dyc).zip(mc) {
                *d = g * if m != 0 { scale } else { 0.0 };
            }
        })
    };
    if dx.len() <= BACKWARD_CHUNK {
        task(dx, dy, mask);
    } else {
        dx.par_chunks_mut(BACKWARD_CHUNK)
            .zip(
                dy.par_chunks(BACKWARD_CHUNK)
                    .zip(mask.par_chunks(BACKWARD_CHUNK)),
            )
            .for_each(|(dxc, (dyc, mc))| task(dxc, dyc, mc));
    }
    Ok(())
}

/// Dropout with explicit AVX2 intrinsics: sixteen Philox blocks (64
/// elements) per step, one 32-bit lane per block. LLVM does not vectorize
/// [`philox_lanes`]'s 32 x 32 -> 64-bit products for AVX2 (they stay
/// scalar `mul`s), and the portable loops' select of `scale` or 0 may
/// become a branch on the random keep bit (`docs/perf-log.md`). Here each
/// round is four `vpmuludq` (the even and the odd lanes of both products),
/// and the decisions are vector compares and masks: the same integer
/// Philox, the same f32 comparison and product per element, so the same
/// bits as the portable path (tested at every level).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::philox::{M0, M1, ROUNDS, W0, W1, philox4x32_10};
    use super::super::{Dropout, keep_word};

    /// Elements per step: 16 blocks of 4.
    pub const STEP: usize = 64;

    /// `(hi, lo)` of the eight 32 x 32 -> 64-bit products `m * c`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn mulhilo8(m: __m256i, c: __m256i) -> (__m256i, __m256i) {
        // vpmuludq multiplies the even 32-bit lanes; the odd ones are
        // shifted down for a second product.
        let even = _mm256_mul_epu32(m, c);
        let odd = _mm256_mul_epu32(m, _mm256_srli_epi64::<32>(c));
        let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
        let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
        (hi, lo)
    }

    /// The Philox words of blocks `block0 .. block0 + 16` in element order:
    /// `out[j]` holds those of elements `4 * block0 + 8 * j ..` (the same
    /// rounds as [`philox4x32_10`], lane `l` of state `h` on block `block0 +
    /// 8h + l`). Two independent states of eight blocks each: one round's
    /// multiplies, shifts and blends are a dependency chain of ~8 cycles,
    /// and the second state fills it.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn philox16(p: &Dropout, block0: u64) -> [__m256i; 8] {
        let ctr = p.counter(block0);
        let lo = |l: u64| (block0 + l) as u32 as i32;
        let hi = |l: u64| ((block0 + l) >> 32) as i32;
        let lanes = |f: &dyn Fn(u64) -> i32, h: u64| {
            let b = 8 * h;
            _mm256_setr_epi32(
                f(b),
                f(b + 1),
                f(b + 2),
                f(b + 3),
                f(b + 4),
                f(b + 5),
                f(b + 6),
                f(b + 7),
            )
        };
        let mut c0 = [lanes(&lo, 0), lanes(&lo, 1)];
        let mut c1 = [lanes(&hi, 0), lanes(&hi, 1)];
        let mut c2 = [_mm256_set1_epi32(ctr[2] as i32); 2];
        let mut c3 = [_mm256_set1_epi32(ctr[3] as i32); 2];
        let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
        let mut k = p.key();
        for r in 0..ROUNDS {
            if r > 0 {
                k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
            }
            let (k0, k1) = (
                _mm256_set1_epi32(k[0] as i32),
                _mm256_set1_epi32(k[1] as i32),
            );
            for h in 0..2 {
                let (hi0, lo0) = mulhilo8(m0, c0[h]);
                let (hi1, lo1) = mulhilo8(m1, c2[h]);
                let n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[h]), k0);
                let n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[h]), k1);
                (c0[h], c1[h], c2[h], c3[h]) = (n0, lo1, n2, lo0);
            }
        }
        // 4 x 8 transposes: word w of block b to element 4b + w.
        let t = |h: usize| {
            let t0 = _mm256_unpacklo_epi32(c0[h], c1[h]); // b0w0 b0w1 b1w0 b1w1 | b4 b5
            let t1 = _mm256_unpackhi_epi32(c0[h], c1[h]); // b2w0 b2w1 b3w0 b3w1 | b6 b7
            let t2 = _mm256_unpacklo_epi32(c2[h], c3[h]); // b0w2 b0w3 b1w2 b1w3 | b4 b5
            let t3 = _mm256_unpackhi_epi32(c2[h], c3[h]); // b2w2 b2w3 b3w2 b3w3 | b6 b7
            let u0 = _mm256_unpacklo_epi64(t0, t2); // b0 | b4
            let u1 = _mm256_unpackhi_epi64(t0, t2); // b1 | b5
            let u2 = _mm256_unpacklo_epi64(t1, t3); // b2 | b6
            let u3 = _mm256_unpackhi_epi64(t1, t3); // b3 | b7
            [
                _mm256_permute2x128_si256::<0x20>(u0, u1),
                _mm256_permute2x128_si256::<0x20>(u2, u3),
                _mm256_permute2x128_si256::<0x31>(u0, u1),
                _mm256_permute2x128_si256::<0x31>(u2, u3),
            ]
        };
        let (a, b) = (t(0), t(1));
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    }

    /// All-ones lanes where the element is kept: `(w >> 8) * 2^-24 >= rate`
    /// (the 24-bit integer and the product are exact in f32, as in
    /// [`keep_word`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn keeps8(w: __m256i, rate: __m256) -> __m256 {
        let u = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_srli_epi32::<8>(w)),
            _mm256_set1_ps(1.0 / 16_777_216.0),
        );
        _mm256_cmp_ps::<_CMP_GE_OQ>(u, rate)
    }

    /// The 32 mask bytes (1 kept, 0 dropped) of four keep masks, in element
    /// order.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn mask_bytes32(keep: [__m256; 4]) -> __m256i {
        let one = _mm256_set1_epi32(1);
        let b = keep.map(|k| _mm256_and_si256(_mm256_castps_si256(k), one));
        // packs works within 128-bit halves: the bytes come out as the
        // halves [k0 lo, k1 lo, k2 lo, k3 lo | k0 hi, ..] of 4 elements
        // each; the permutation puts each vector's two halves together.
        let p01 = _mm256_packs_epi32(b[0], b[1]);
        let p23 = _mm256_packs_epi32(b[2], b[3]);
        let bytes = _mm256_packus_epi16(p01, p23);
        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// The tail past the whole steps, one block at a time through the
    /// definition's own functions: `f(element, kept)`.
    #[inline]
    fn tail(p: &Dropout, base: usize, from: usize, n: usize, mut f: impl FnMut(usize, bool)) {
        let key = p.key();
        for b in from / 4..n.div_ceil(4) {
            let w = philox4x32_10(p.counter((base / 4 + b) as u64), key);
            for (l, &wv) in w.iter().enumerate().take(n - 4 * b) {
                f(4 * b + l, keep_word(wv, p.rate));
            }
        }
    }

    /// Forward over elements `base .. base + y.len()` (`base` a multiple of
    /// 4): `y = x * (kept ? scale : 0)` and the mask bytes.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn forward(p: &Dropout, base: usize, x: &[f32], y: &mut [f32], mask: &mut [u8]) {
        let n = y.len();
        assert!(x.len() == n && mask.len() == n && base.is_multiple_of(4));
        let (rate, scale) = (_mm256_set1_ps(p.rate), _mm256_set1_ps(p.scale()));
        let full = n / STEP * STEP;
        for e0 in (0..full).step_by(STEP) {
            let keep = philox16(p, ((base + e0) / 4) as u64).map(|w| keeps8(w, rate));
            // SAFETY: e0 + 64 <= n: the eight 8-float loads and stores are
            // inside x and y, the two 32-byte stores inside the mask.
            unsafe {
                for (j, &k) in keep.iter().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(e0 + 8 * j));
                    let yv = _mm256_mul_ps(xv, _mm256_and_ps(k, scale));
                    _mm256_storeu_ps(y.as_mut_ptr().add(e0 + 8 * j), yv);
                }
                let m = mask.as_mut_ptr().add(e0);
                _mm256_storeu_si256(m.cast(), mask_bytes32([keep[0], keep[1], keep[2], keep[3]]));
                _mm256_storeu_si256(
                    m.add(32).cast(),
                    mask_bytes32([keep[4], keep[5], keep[6], keep[7]]),
                );
            }
        }
        let s = p.scale();
        tail(p, base, full, n, |e, k| {
            mask[e] = k as u8;
            y[e] = x[e] * if k { s } else { 0.0 };
        });
    }

    /// The mask alone over elements `base .. base + mask.len()` (`base` a
    /// multiple of 4).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn mask_only(p: &Dropout, base: usize, mask: &mut [u8]) {
        let n = mask.len();
        assert!(base.is_multiple_of(4));
        let rate = _mm256_set1_ps(p.rate);
        let full = n / STEP * STEP;
        for e0 in (0..full).step_by(STEP) {
            let keep = philox16(p, ((base + e0) / 4) as u64).map(|w| keeps8(w, rate));
            // SAFETY: e0 + 64 <= n: the two 32-byte stores are inside the mask.
            unsafe {
                let m = mask.as_mut_ptr().add(e0);
                _mm256_storeu_si256(m.cast(), mask_bytes32([keep[0], keep[1], keep[2], keep[3]]));
                _mm256_storeu_si256(
                    m.add(32).cast(),
                    mask_bytes32([keep[4], keep[5], keep[6], keep[7]]),
                );
            }
        }
        tail(p, base, full, n, |e, k| mask[e] = k as u8);
    }

    /// `dx = dy * (mask != 0 ? scale : 0)`.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn backward(scale: f32, dy: &[f32], mask: &[u8], dx: &mut [f32]) {
        let n = dx.len();
        assert!(dy.len() == n && mask.len() == n);
        let (vscale, zero) = (_mm256_set1_ps(scale), _mm256_setzero_si256());
        let full = n / 8 * 8;
        for e in (0..full).step_by(8) {
            // SAFETY: e + 8 <= n: the 8-float accesses and the 8-byte mask
            // load are in bounds.
            unsafe {
                let m8 = _mm_loadl_epi64(mask.as_ptr().add(e).cast());
                let dropped = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(m8), zero);
                let factor = _mm256_andnot_ps(_mm256_castsi256_ps(dropped), vscale);
                let g = _mm256_loadu_ps(dy.as_ptr().add(e));
                _mm256_storeu_ps(dx.as_mut_ptr().add(e), _mm256_mul_ps(g, factor));
            }
        }
        for e in full..n {
            dx[e] = dy[e] * if mask[e] != 0 { scale } else { 0.0 };
        }
    }
}
