//! CPU max pooling: one rayon task per `(image, channel)` plane.

use rayon::prelude::*;

use super::MaxPool2d;
use crate::cpu_isa::Isa;
use crate::error::{Error, Result};

/// `y = maxpool(x)` and the argmax of every window (index within the image
/// plane, see the module docs). `x` `[N, C, H, W]`; `y` and `argmax`
/// `[N, C, OH, OW]`, both fully overwritten.
pub fn forward(p: &MaxPool2d, x: &[f32], y: &mut [f32], argmax: &mut [u32]) -> Result<()> {
    p.check_forward(x.len(), y.len(), argmax.len())?;
    let (hw, ohw) = (p.h * p.w, p.out_h * p.out_w);
    // Planes per task: small planes (a 4x4 output is 16 elements) would
    // otherwise cost more in scheduling than in work.
    let per_task = (PLANES_MIN_ELEMS / ohw.max(1)).max(1);
    let chunk = (ohw * per_task).max(1);
    let isa = Isa::current();
    y.par_chunks_mut(chunk)
        .zip(argmax.par_chunks_mut(chunk))
        .enumerate()
        .for_each(|(t, (ys, aas))| {
            for (q, (yp, ap)) in ys
                .chunks_mut(ohw.max(1))
                .zip(aas.chunks_mut(ohw.max(1)))
                .enumerate()
            {
                let pi = t * per_task + q;
                forward_plane(p, isa, &x[pi * hw..][..hw], yp, ap);
            }
        });
    Ok(())
}

/// Output elements a forward task covers at least (whole planes).
const PLANES_MIN_ELEMS: usize = 4096;

/// One plane of [`forward`]. The 2x2 windows of stride 2 that lie inside
/// the image (every window of a `valid` 2x2 pool, as in the seed networks)
/// take a straight-line path: four loads, three compares, no loop, no
/// division (eight windows per step with AVX2); any other window goes
/// through [`window_max`]. All keep the same rule (first NaN in row-major
/// order, else the first maximum) and select, never compute, so every path
/// gives the same bits.
#[inline]
fn forward_plane(p: &MaxPool2d, isa: Isa, plane: &[f32], yp: &mut [f32], ap: &mut [u32]) {
    let fast = p.pool_h == 2 && p.pool_w == 2 && p.stride_h == 2 && p.stride_w == 2;
    let fast = fast && p.pad_top == 0 && p.pad_left == 0;
    for oy in 0..p.out_h {
        let o0 = oy * p.out_w;
        // Columns whose window lies inside the plane (all rows inside too).
        let inside = if fast && 2 * oy + 1 < p.h {
            (p.w / 2).min(p.out_w)
        } else {
            0
        };
        if inside > 0 {
            let i0 = 2 * oy * p.w;
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if isa >= Isa::Avx2 {
                // SAFETY: `Isa::current` never exceeds `Isa::detected`,
                // which requires AVX2 for `Avx2` and above. Rows run in
                // order and every output of a row is written after the
                // rows above it (see `row_2x2`).
                unsafe {
                    avx2::row_2x2(&plane[i0..], p.w, i0, inside, &mut yp[o0..], &mut ap[o0..])
                };
                done = inside;
            }
            let _ = isa;
            let (yr, ar) = (&mut yp[o0..][..p.out_w], &mut ap[o0..][..p.out_w]);
            let (r0, r1) = (&plane[i0..][..2 * inside], &plane[i0 + p.w..][..2 * inside]);
            for ox in done..inside {
                let (a, b, c, d) = (r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]);
                let (mut best, mut k) = (a, 0usize);
                if b > best {
                    (best, k) = (b, 1);
                }
                if c > best {
                    (best, k) = (c, p.w);
                }
                if d > best {
                    (best, k) = (d, p.w + 1);
                }
                // The first NaN wins: checked last to first, so the earliest
                // one is what remains.
                if d.is_nan() {
                    (best, k) = (d, p.w + 1);
                }
                if c.is_nan() {
                    (best, k) = (c, p.w);
                }
                if b.is_nan() {
                    (best, k) = (b, 1);
                }
                if a.is_nan() {
                    (best, k) = (a, 0);
                }
                yr[ox] = best;
                // validate() bounds H*W by 2^32, so the plane index fits.
                ar[ox] = (i0 + 2 * ox + k) as u32;
            }
        }
        for ox in inside..p.out_w {
            let (v, i) = window_max(p, plane, oy, ox);
            yp[o0 + ox] = v;
            ap[o0 + ox] = i as u32;
        }
    }
}

/// `y = maxpool(x)` without recording the argmax (inference). Same values
/// as [`forward`]; `y` fully overwritten.
pub fn forward_inference(p: &MaxPool2d, x: &[f32], y: &mut [f32]) -> Result<()> {
    p.check_forward_inference(x.len(), y.len())?;
    let (hw, ohw) = (p.h * p.w, p.out_h * p.out_w);
    y.par_chunks_mut(ohw).enumerate().for_each(|(pi, yp)| {
        let plane = &x[pi * hw..][..hw];
        for (j, yv) in yp.iter_mut().enumerate() {
            *yv = window_max(p, plane, j / p.out_w, j % p.out_w).0;
        }
    });
    Ok(())
}

/// `dx[argmax] += dy`: routes each output's gradient to the element the
/// forward pass selected. `dy` and `argmax` `[N, C, OH, OW]`, `dx`
/// `[N, C, H, W]` fully overwritten. Where windows overlap (stride < pool)
/// an input element sums the gradients of every window that selected it, in
/// row-major output order, so the result is deterministic. An argmax outside
/// its image plane is an error naming the first such index; `dx` is then
/// left partly written.
pub fn backward(p: &MaxPool2d, dy: &[f32], argmax: &[u32], dx: &mut [f32]) -> Result<()> {
    const OP: &str = "maxpool2d.backward";
    p.check_backward(dy.len(), argmax.len(), dx.len())?;
    let (hw, ohw) = (p.h * p.w, p.out_h * p.out_w);
    // Whole planes per task, as in the forward pass: one task per 900-pixel
    // plane spent more in scheduling than in work. The argmaxes are checked
    // plane by plane while they are in cache (a separate pass over them
    // took a quarter of the op's time on keras-cnn's pool2); each task stops
    // at its first bad plane, and the smallest index over the tasks is the
    // first in the whole tensor.
    let per_task = (PLANES_MIN_ELEMS / ohw.max(1)).max(1);
    let chunk = (hw * per_task).max(1);
    let isa = Isa::current();
    let first_bad = dx
        .par_chunks_mut(chunk)
        .enumerate()
        .filter_map(|(t, planes)| {
            for (q, plane) in planes.chunks_mut(hw.max(1)).enumerate() {
                let pi = t * per_task + q;
                let dyp = &dy[pi * ohw..][..ohw];
                let ap = &argmax[pi * ohw..][..ohw];
                if let Err(j) = backward_plane(p, isa, dyp, ap, plane) {
                    return Some(pi * ohw + j);
                }
            }
            None
        })
        .min();
    match first_bad {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            OP,
            "argmax",
            format!(
                "argmax[{i}] = {} is outside the {}x{} image plane (expected < {hw})",
                argmax[i], p.h, p.w
            ),
        )),
    }
}

/// One plane of [`backward`]: zero, then `plane[a] += g` window by window;
/// `Err(j)` at the first output `j` whose argmax lies outside the plane. For
/// 2x2 windows of stride 2 whose rows hold at least eight of them
/// (keras-cnn's pool1) AVX2 writes the windows' cells directly instead,
/// eight windows per step, when every window's argmax lies in its own
/// window (as the forward pass leaves it): then each cell receives at most
/// one gradient, `0 + g` or nothing, the scatter's bits; any other argmax
/// sends the whole plane through the scatter. (Four windows per step for
/// narrower rows, as keras-cnn's pool2 with six, lost to the scatter: 110
/// against 90 us, `docs/perf-log.md`.)
fn backward_plane(
    p: &MaxPool2d,
    isa: Isa,
    dyp: &[f32],
    ap: &[u32],
    plane: &mut [f32],
) -> std::result::Result<(), usize> {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && avx2::backward_fits(p) {
        // SAFETY: `Isa::current` never exceeds `Isa::detected`, which
        // requires AVX2 for `Avx2` and above.
        if unsafe { avx2::backward_plane_2x2(p, dyp, ap, plane) } {
            return Ok(());
        }
    }
    let _ = isa;
    plane.fill(0.0);
    for (j, (&g, &a)) in dyp.iter().zip(ap).enumerate() {
        match plane.get_mut(a as usize) {
            Some(cell) => *cell += g,
            None => return Err(j),
        }
    }
    Ok(())
}

/// The maximum of window `(oy, ox)` of one plane and its index in the plane.
/// Padding is skipped (it is `-inf`, and every window has a real cell).
/// Strict `>` keeps the first of equal maxima; the first NaN wins outright.
#[inline]
fn window_max(p: &MaxPool2d, plane: &[f32], oy: usize, ox: usize) -> (f32, usize) {
    // Window bounds in padded coordinates, clipped to the image, then shifted.
    let (y0, x0) = (oy * p.stride_h, ox * p.stride_w);
    let ylo = y0.max(p.pad_top) - p.pad_top;
    let yhi = (y0 + p.pool_h).min(p.pad_top + p.h) - p.pad_top;
    let xlo = x0.max(p.pad_left) - p.pad_left;
    let xhi = (x0 + p.pool_w).min(p.pad_left + p.w) - p.pad_left;
    let mut arg = ylo * p.w + xlo;
    let mut best = plane[arg];
    if best.is_nan() {
        return (best, arg);
    }
    for iy in ylo..yhi {
        let row = &plane[iy * p.w..][xlo..xhi];
        for (dx, &v) in row.iter().enumerate() {
            if v > best {
                best = v;
                arg = iy * p.w + xlo + dx;
            } else if v.is_nan() {
                return (v, iy * p.w + xlo + dx);
            }
        }
    }
    (best, arg)
}

/// The 2x2 / stride-2 windows with AVX2, eight at a time.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::MaxPool2d;

    /// Whether [`backward_plane_2x2`] takes layer `p`: 2x2 windows of
    /// stride 2 from the top left corner, and rows of at least eight
    /// windows inside the image.
    pub fn backward_fits(p: &MaxPool2d) -> bool {
        let fast = p.pool_h == 2 && p.pool_w == 2 && p.stride_h == 2 && p.stride_w == 2;
        fast && p.pad_top == 0 && p.pad_left == 0 && (p.w / 2).min(p.out_w) >= 8
    }

    /// The backward pass of one plane when every window's argmax lies in
    /// its own window: the windows inside the image write their four cells
    /// (`0 + g` at the argmax, 0 elsewhere), eight windows per step; the
    /// cells no such window covers are zeroed and the remaining windows
    /// (clipped by `same` padding) add their gradient. Returns false, having
    /// written some of the plane, at the first argmax outside its window
    /// (so every argmax of a plane that returns true lies in the plane).
    ///
    /// # Safety
    /// The CPU must have AVX2; [`backward_fits`] holds.
    #[target_feature(enable = "avx2")]
    pub unsafe fn backward_plane_2x2(
        p: &MaxPool2d,
        dy: &[f32],
        arg: &[u32],
        plane: &mut [f32],
    ) -> bool {
        let (w, ow) = (p.w, p.out_w);
        let inside = (w / 2).min(ow);
        let rows = (p.h / 2).min(p.out_h);
        assert!(inside >= 8 && dy.len() == p.out_h * ow && arg.len() == dy.len());
        assert!(plane.len() == p.h * w);
        let steps2 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        let (wi, wi1, one) = (
            _mm256_set1_epi32(w as i32),
            _mm256_set1_epi32(w as i32 + 1),
            _mm256_set1_epi32(1),
        );
        let zero = _mm256_setzero_ps();
        for oy in 0..rows {
            let i0 = 2 * oy * w;
            for step in 0..inside.div_ceil(8) {
                let ox = (8 * step).min(inside - 8);
                let j = oy * ow + ox;
                // SAFETY: j + 8 <= oy*ow + inside <= dy.len(); the stores
                // write columns 2ox .. 2ox + 16 <= 2*inside <= w of rows
                // 2oy and 2oy + 1 < h.
                unsafe {
                    let g = _mm256_add_ps(zero, _mm256_loadu_ps(dy.as_ptr().add(j)));
                    let a = _mm256_loadu_si256(arg.as_ptr().add(j).cast());
                    // Plane indices are below 2^32 (validate): i32 lanes wrap
                    // as u32, so k is the offset within the window.
                    let base = _mm256_add_epi32(_mm256_set1_epi32((i0 + 2 * ox) as i32), steps2);
                    let k = _mm256_sub_epi32(a, base);
                    let at = |v: __m256i| _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, v));
                    let (m00, m01, m10, m11) =
                        (at(_mm256_setzero_si256()), at(one), at(wi), at(wi1));
                    let any = _mm256_or_ps(_mm256_or_ps(m00, m01), _mm256_or_ps(m10, m11));
                    if _mm256_movemask_ps(any) != 0xff {
                        return false;
                    }
                    let pair = |e: __m256, o: __m256, dst: *mut f32| {
                        // Cells 2i and 2i+1 of window i: interleave, then put
                        // the 128-bit halves in order.
                        let (lo, hi) = (_mm256_unpacklo_ps(e, o), _mm256_unpackhi_ps(e, o));
                        _mm256_storeu_ps(dst, _mm256_permute2f128_ps::<0x20>(lo, hi));
                        _mm256_storeu_ps(dst.add(8), _mm256_permute2f128_ps::<0x31>(lo, hi));
                    };
                    let row0 = plane.as_mut_ptr().add(i0 + 2 * ox);
                    pair(_mm256_and_ps(m00, g), _mm256_and_ps(m01, g), row0);
                    pair(_mm256_and_ps(m10, g), _mm256_and_ps(m11, g), row0.add(w));
                }
            }
            plane[i0 + 2 * inside..i0 + w].fill(0.0);
            plane[i0 + w + 2 * inside..i0 + 2 * w].fill(0.0);
        }
        plane[2 * rows * w..].fill(0.0);
        // The windows the image clips (same padding): their cells are all
        // outside the region above, and each is its own.
        for oy in 0..p.out_h {
            let first = if oy < rows { inside } else { 0 };
            for ox in first..ow {
                let (j, a) = (oy * ow + ox, arg[oy * ow + ox] as usize);
                let (ay, ax) = (a / w, a % w);
                // Past the plane's end (a foreign argmax) the row test can
                // pass for the last, clipped window row: check the length.
                if a >= plane.len() || ay / 2 != oy || ax / 2 != ox {
                    return false;
                }
                plane[a] += dy[j];
            }
        }
        true
    }

    /// Even and odd elements of `(v0, v1)` (16 consecutive floats), each in
    /// order.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn deinterleave(v0: __m256, v1: __m256) -> (__m256, __m256) {
        // shuffle_ps works within 128-bit halves: [v0 0 2, v1 0 2 | v0 4 6,
        // v1 4 6]; the 64-bit permutation puts the halves in order.
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(v0, v1);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(v0, v1);
        let order = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (order(even), order(odd))
    }

    /// `(v, kv)` in the lanes of `m`, `s` elsewhere: a window's (maximum,
    /// offset) after one candidate.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn take(s: (__m256, __m256i), v: __m256, kv: __m256i, m: __m256) -> (__m256, __m256i) {
        let k = _mm256_blendv_ps(_mm256_castsi256_ps(s.1), _mm256_castsi256_ps(kv), m);
        (_mm256_blendv_ps(s.0, v, m), _mm256_castps_si256(k))
    }

    /// Eight windows from their four candidates (top left, top right,
    /// bottom left, bottom right): the maximum and its offset (0, 1, `w`,
    /// `w + 1`) by the scalar rule: strict `>` in that order, then the
    /// first NaN (checked last to first, so the earliest remains).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn windows8(a: __m256, b: __m256, c: __m256, d: __m256, w: usize) -> (__m256, __m256i) {
        let (one, wi, wi1) = (
            _mm256_set1_epi32(1),
            _mm256_set1_epi32(w as i32),
            _mm256_set1_epi32(w as i32 + 1),
        );
        let gt = |v: __m256, best: __m256| _mm256_cmp_ps::<_CMP_GT_OQ>(v, best);
        let nan = |v: __m256| _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
        let mut s = (a, _mm256_setzero_si256());
        s = take(s, b, one, gt(b, s.0));
        s = take(s, c, wi, gt(c, s.0));
        s = take(s, d, wi1, gt(d, s.0));
        s = take(s, d, wi1, nan(d));
        s = take(s, c, wi, nan(c));
        s = take(s, b, one, nan(b));
        take(s, a, _mm256_setzero_si256(), nan(a))
    }

    /// The first `n` windows of one output row: window `ox` covers
    /// `rows[2ox..2ox+2]` and `rows[w + 2ox..w + 2ox + 2]` (`rows` is the
    /// plane from the row pair's first element, plane index `i0`, to its
    /// end); writes `y[ox]` (the maximum) and `arg[ox]` (its plane index)
    /// for `ox < n` (`y` and `arg` run from the row's first output to the
    /// plane's last). Steps of eight windows; a last step that would run
    /// past the row is moved back to end at it when the row has eight
    /// (recomputing a few windows with the same result). A narrower row
    /// (keras-cnn's pool2 is 6 wide) reads 16 floats of each input row and
    /// writes 8 outputs where the plane has them, the lanes past `n` being
    /// windows of no use: those land on outputs of this row or the next,
    /// which their own turn overwrites (the caller writes every output of a
    /// plane, row after row); at the plane's end it goes through buffers.
    /// A select, never arithmetic: the scalar path's bits.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn row_2x2(
        rows: &[f32],
        w: usize,
        i0: usize,
        n: usize,
        y: &mut [f32],
        arg: &mut [u32],
    ) {
        assert!(y.len() >= n && arg.len() == y.len() && rows.len() >= w + 2 * n);
        let steps2 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        // Plane indices are below 2^32 (validate); i32 lanes wrap as u32.
        let index = |ox: usize, k: __m256i| {
            _mm256_add_epi32(
                _mm256_add_epi32(_mm256_set1_epi32((i0 + 2 * ox) as i32), steps2),
                k,
            )
        };
        let (r0, r1) = (rows.as_ptr(), rows[w..].as_ptr());
        if n >= 8 {
            for step in 0..n.div_ceil(8) {
                let ox = (8 * step).min(n - 8);
                // SAFETY: 2 * ox + 16 <= 2n, and w + 2n <= rows.len(); ox + 8
                // <= n <= len of y and arg (asserted).
                unsafe {
                    let (p0, p1) = (r0.add(2 * ox), r1.add(2 * ox));
                    let (a, b) = deinterleave(_mm256_loadu_ps(p0), _mm256_loadu_ps(p0.add(8)));
                    let (c, d) = deinterleave(_mm256_loadu_ps(p1), _mm256_loadu_ps(p1.add(8)));
                    let (best, k) = windows8(a, b, c, d, w);
                    _mm256_storeu_ps(y.as_mut_ptr().add(ox), best);
                    _mm256_storeu_si256(arg.as_mut_ptr().add(ox).cast(), index(ox, k));
                }
            }
            return;
        }
        if n == 0 {
            return;
        }
        // Both input rows from registers when the plane holds 16 floats
        // from the second one, else from a zero-padded copy (a stack
        // round trip: narrow stores then a wide load, which the store
        // buffer does not forward, so only at the plane's end).
        let mut buf = [[0.0f32; 16]; 2];
        let (p0, p1) = if rows.len() >= w + 16 {
            (r0, r1)
        } else {
            buf[0][..2 * n].copy_from_slice(&rows[..2 * n]);
            buf[1][..2 * n].copy_from_slice(&rows[w..][..2 * n]);
            (buf[0].as_ptr(), buf[1].as_ptr())
        };
        // SAFETY: 16 floats at p0 and p1: rows.len() >= w + 16 (so from r0
        // too), or the buffers.
        let (best, k) = unsafe {
            let (a, b) = deinterleave(_mm256_loadu_ps(p0), _mm256_loadu_ps(p0.add(8)));
            let (c, d) = deinterleave(_mm256_loadu_ps(p1), _mm256_loadu_ps(p1.add(8)));
            windows8(a, b, c, d, w)
        };
        let idx = index(0, k);
        if y.len() >= 8 {
            // SAFETY: 8 outputs of y and arg (checked).
            unsafe {
                _mm256_storeu_ps(y.as_mut_ptr(), best);
                _mm256_storeu_si256(arg.as_mut_ptr().cast(), idx);
            }
        } else {
            let (mut yb, mut ab) = ([0.0f32; 8], [0u32; 8]);
            // SAFETY: 8-lane stores into arrays of 8.
            unsafe {
                _mm256_storeu_ps(yb.as_mut_ptr(), best);
                _mm256_storeu_si256(ab.as_mut_ptr().cast(), idx);
            }
            y[..n].copy_from_slice(&yb[..n]);
            arg[..n].copy_from_slice(&ab[..n]);
        }
    }
}
