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

/// The lanes' total, added in lane order.
#[inline(always)]
pub(crate) fn fold(acc: &[f64; LANES]) -> f64 {
    acc.iter().fold(0.0f64, |s, &v| s + v)
}

/// What [`add_run`] accumulates per element.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Term {
    /// `acc[0] += x`.
    Sum,
    /// `acc[0] += (x - mean)^2`, in f64 (the two-pass variance).
    SqDev(f64),
    /// `acc[0] += dy` and `acc[1] += dy * x_hat`, with
    /// `x_hat = (x - mean) * inv_std` in f32 (as batch norm's forward
    /// computes it), the product in f64.
    DyXhat { mean: f32, inv_std: f32 },
}

/// The scalar definition of one lane's step: what every level computes.
#[inline(always)]
fn step(term: Term, acc0: &mut f64, acc1: &mut f64, x: f32, dy: f32) {
    match term {
        Term::Sum => *acc0 += x as f64,
        Term::SqDev(mean) => {
            let d = x as f64 - mean;
            *acc0 += d * d;
        }
        Term::DyXhat { mean, inv_std } => {
            *acc0 += dy as f64;
            *acc1 += dy as f64 * ((x - mean) * inv_std) as f64;
        }
    }
}

/// Portable: [`step`] per element into lane `t % LANES`.
fn add_run_portable(term: Term, acc: &mut [[f64; LANES]; 2], x: &[f32], dy: &[f32]) {
    let [a0, a1] = acc;
    for (t, &v) in x.iter().enumerate() {
        let d = if dy.is_empty() { 0.0 } else { dy[t] };
        step(term, &mut a0[t % LANES], &mut a1[t % LANES], v, d);
    }
}

/// `acc[.][t % LANES] += term(x[t], dy[t])` over a contiguous run, at
/// level `isa`; `dy` is read only for [`Term::DyXhat`] (and must then be
/// as long as `x`). Every level gives the same bits: the vector paths do
/// [`step`]'s operations lane for lane (conversions are exact, multiplies
/// and adds are separate instructions, never fused).
#[inline]
pub(crate) fn add_run(
    isa: crate::cpu_isa::Isa,
    term: Term,
    acc: &mut [[f64; LANES]; 2],
    x: &[f32],
    dy: &[f32],
) {
    assert!(
        !matches!(term, Term::DyXhat { .. }) || dy.len() == x.len(),
        "add_run: dy must match x"
    );
    use crate::cpu_isa::Isa;
    match isa {
        // SAFETY: `isa` comes from `Isa::current`, which never exceeds
        // `Isa::detected`, so the CPU has the features enabled; the lengths
        // were checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::add_run_avx512(term, acc, x, dy) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::add_run_avx2(term, acc, x, dy) },
        _ => add_run_portable(term, acc, x, dy),
    }
}

// The loops index register arrays and memory offsets by the same `q`:
// clearer than zipped iterators over both.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{LANES, Term, step};

    /// The scalar tail of a run: lanes `0..x.len()` (under `LANES`), as in
    /// [`super::add_run_portable`].
    fn tail(term: Term, acc: &mut [[f64; LANES]; 2], x: &[f32], dy: &[f32]) {
        let [a0, a1] = acc;
        for (t, &v) in x.iter().enumerate() {
            let d = if dy.is_empty() { 0.0 } else { dy[t] };
            step(term, &mut a0[t], &mut a1[t], v, d);
        }
    }

    /// AVX-512: the 32 lanes of each accumulator in 4 `zmm` registers.
    ///
    /// # Safety
    /// The CPU must have avx512f; for [`Term::DyXhat`], `dy.len() == x.len()`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn add_run_avx512(
        term: Term,
        acc: &mut [[f64; LANES]; 2],
        x: &[f32],
        dy: &[f32],
    ) {
        let blocks = x.len() / LANES;
        // SAFETY: every load reads `LANES` floats at `b * LANES` with
        // `b < blocks`, inside `x` (and `dy`, as long as `x` for DyXhat);
        // `acc` is two arrays of 32 f64, read and written as 4 x 8.
        unsafe {
            let (p0, p1) = (acc[0].as_mut_ptr(), acc[1].as_mut_ptr());
            let mut a0 = [0; 4].map(|_| _mm512_setzero_pd());
            let mut a1 = a0;
            for q in 0..4 {
                a0[q] = _mm512_loadu_pd(p0.add(8 * q));
                a1[q] = _mm512_loadu_pd(p1.add(8 * q));
            }
            let xp = x.as_ptr();
            match term {
                Term::Sum => {
                    for b in 0..blocks {
                        for q in 0..4 {
                            let v = _mm512_cvtps_pd(_mm256_loadu_ps(xp.add(b * LANES + 8 * q)));
                            a0[q] = _mm512_add_pd(a0[q], v);
                        }
                    }
                }
                Term::SqDev(mean) => {
                    let m = _mm512_set1_pd(mean);
                    for b in 0..blocks {
                        for q in 0..4 {
                            let v = _mm512_cvtps_pd(_mm256_loadu_ps(xp.add(b * LANES + 8 * q)));
                            let d = _mm512_sub_pd(v, m);
                            a0[q] = _mm512_add_pd(a0[q], _mm512_mul_pd(d, d));
                        }
                    }
                }
                Term::DyXhat { mean, inv_std } => {
                    let (m, s) = (_mm256_set1_ps(mean), _mm256_set1_ps(inv_std));
                    let dp = dy.as_ptr();
                    for b in 0..blocks {
                        for q in 0..4 {
                            let o = b * LANES + 8 * q;
                            let xv = _mm256_loadu_ps(xp.add(o));
                            let xh = _mm256_mul_ps(_mm256_sub_ps(xv, m), s);
                            let d = _mm512_cvtps_pd(_mm256_loadu_ps(dp.add(o)));
                            a0[q] = _mm512_add_pd(a0[q], d);
                            a1[q] = _mm512_add_pd(a1[q], _mm512_mul_pd(d, _mm512_cvtps_pd(xh)));
                        }
                    }
                }
            }
            for q in 0..4 {
                _mm512_storeu_pd(p0.add(8 * q), a0[q]);
                _mm512_storeu_pd(p1.add(8 * q), a1[q]);
            }
        }
        let done = blocks * LANES;
        let dyt = if dy.is_empty() { dy } else { &dy[done..] };
        tail(term, acc, &x[done..], dyt);
    }

    /// AVX2: the 32 lanes of each accumulator in 8 `ymm` registers.
    ///
    /// # Safety
    /// The CPU must have avx2; for [`Term::DyXhat`], `dy.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_run_avx2(
        term: Term,
        acc: &mut [[f64; LANES]; 2],
        x: &[f32],
        dy: &[f32],
    ) {
        let blocks = x.len() / LANES;
        // SAFETY: as in `add_run_avx512`, with 8 loads of 4 floats per block.
        unsafe {
            let (p0, p1) = (acc[0].as_mut_ptr(), acc[1].as_mut_ptr());
            let mut a0 = [0; 8].map(|_| _mm256_setzero_pd());
            let mut a1 = a0;
            for q in 0..8 {
                a0[q] = _mm256_loadu_pd(p0.add(4 * q));
                a1[q] = _mm256_loadu_pd(p1.add(4 * q));
            }
            let xp = x.as_ptr();
            match term {
                Term::Sum => {
                    for b in 0..blocks {
                        for q in 0..8 {
                            let v = _mm256_cvtps_pd(_mm_loadu_ps(xp.add(b * LANES + 4 * q)));
                            a0[q] = _mm256_add_pd(a0[q], v);
                        }
                    }
                }
                Term::SqDev(mean) => {
                    let m = _mm256_set1_pd(mean);
                    for b in 0..blocks {
                        for q in 0..8 {
                            let v = _mm256_cvtps_pd(_mm_loadu_ps(xp.add(b * LANES + 4 * q)));
                            let d = _mm256_sub_pd(v, m);
                            a0[q] = _mm256_add_pd(a0[q], _mm256_mul_pd(d, d));
                        }
                    }
                }
                Term::DyXhat { mean, inv_std } => {
                    let (m, s) = (_mm_set1_ps(mean), _mm_set1_ps(inv_std));
                    let dp = dy.as_ptr();
                    for b in 0..blocks {
                        for q in 0..8 {
                            let o = b * LANES + 4 * q;
                            let xh = _mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(xp.add(o)), m), s);
                            let d = _mm256_cvtps_pd(_mm_loadu_ps(dp.add(o)));
                            a0[q] = _mm256_add_pd(a0[q], d);
                            a1[q] = _mm256_add_pd(a1[q], _mm256_mul_pd(d, _mm256_cvtps_pd(xh)));
                        }
                    }
                }
            }
            for q in 0..8 {
                _mm256_storeu_pd(p0.add(4 * q), a0[q]);
                _mm256_storeu_pd(p1.add(4 * q), a1[q]);
            }
        }
        let done = blocks * LANES;
        let dyt = if dy.is_empty() { dy } else { &dy[done..] };
        tail(term, acc, &x[done..], dyt);
    }
}
