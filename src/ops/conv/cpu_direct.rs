//! Stride-1 convolution on AVX2 without a column matrix: the shifted-rows
//! form of the convolution's GEMM.
//!
//! With stride 1, row `(c, r, s)` of the column matrix is channel `c` of the
//! zero-padded input shifted by `r` rows and `s` columns. Computing the
//! output on a *virtual* grid as wide as the padded input (`Wp` columns, of
//! which the last `S - 1` of each row are thrown away) makes that shift one
//! constant offset: virtual output `q = oy * Wp + ox` reads
//! `xp[c][(oy + r) * Wp + ox + s] = xp[c][q + r * Wp + s]`. So the GEMM's
//! `B` operand is the padded input itself, read at one offset per
//! `(c, r, s)`, sixteen or more consecutive `q` at a time: no im2col pass,
//! no packed copy of `B`, nothing to stream through L3 (an im2col row
//! group of keras-cnn's conv2 is 1 MB, twice the 512 KiB L2 of an AMD
//! EPYC; `docs/perf-log.md`).
//!
//! - [`forward`]: pad `x`, the shifted-rows GEMM (tiles of 6 output channels
//!   x 16 virtual pixels, 12 `ymm` accumulators), then the valid columns of
//!   the virtual rows go to `y` with the bias and the activation.
//! - [`backward_data`]: the same GEMM over `dy` padded by `R - 1 - pad` on
//!   each side with the filters transposed and turned by 180 degrees (the
//!   full correlation), so no col2im scatter-add.
//! - [`backward_filter`]: `dw[k][(c, r, s)] = sum_q dyv[k][q] *
//!   xp[c][q + r*Wp + s]`, `dyv` being `dy` on the virtual grid (zero in the
//!   thrown-away columns): tiles of 4 filters x 3 taps, vectors along `q`.
//!
//! Determinism: `y` and `dx` elements are one FMA chain over `(c, r, s)`
//! (resp. `(k, r, s)`) in order, whatever the tiling or the threads. `dw`
//! elements are, per slice of images (slices fixed by the shape, as in the
//! im2col path), eight lane chains over the images and `q` in order added
//! in a fixed tree, the slices then added in order. So the bits do not depend on the thread count. They differ
//! from the im2col path's in the last bits (that path's GEMM cuts the chain
//! into `kc` blocks, and col2im adds per tap), within the tests' bounds.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::Conv2d;
use super::cpu::with_scratch;
use crate::ops::activation::Activation;
use crate::ops::activation::cpu::by_kind;

/// Output channels per tile of the forward and data-gradient GEMM: panels
/// of 6, and of 4 where 6 would leave a padded panel (32 filters = 6 + 6 +
/// 6 + 6 + 4 + 4, not six panels of 6 with 4 rows of zeros).
const MR: usize = 6;
/// The narrower panel.
const MR4: usize = 4;
/// Virtual pixels per tile (two `ymm` vectors): 12 accumulators, two input
/// vectors and one broadcast fill 15 of the 16 `ymm` registers. (A 4 x 24
/// tile, which fits keras-cnn's 32 filters without a padded panel, needs
/// all 16 plus one: LLVM spilled an accumulator to the stack every tap,
/// which put a store-to-load round trip into its FMA chain and halved the
/// speed.)
const NR: usize = 16;
/// Filters per tile of the filter gradient (vectors run along `q` there).
const FR: usize = 4;
/// Filter taps `(c, r, s)` per tile of the filter gradient.
const TAPS: usize = 3;
/// Most partial sums of `dw` (one per slice of images): as in the im2col
/// path, fixed by the shape, so the summation order is too.
const FILTER_SLICES: usize = 8;

/// Whether the layer can take this path: stride 1 (the offsets are only
/// constant then) and, for the data gradient, no side padded by more than
/// the kernel's reach (`pad <= R - 1`: the full correlation's padding is
/// `R - 1 - pad`). The caller checks the CPU (AVX2 and FMA).
pub(super) fn fits(p: &Conv2d, data_gradient: bool) -> bool {
    let reach = p.pad_top < p.r && p.pad_bottom < p.r && p.pad_left < p.s && p.pad_right < p.s;
    p.stride_h == 1 && p.stride_w == 1 && (!data_gradient || reach)
}

/// The virtual grid of one padded input: planes of `hp x wp`, outputs
/// `q < q_len = oh * wp` on it, and the buffer length that lets every tile
/// read past the last plane (into zeros).
#[derive(Clone, Copy)]
pub(super) struct Grid {
    ch: usize,
    hp: usize,
    pub(super) wp: usize,
    oh: usize,
    ow: usize,
    /// Rows above / columns left of the image in the padded planes.
    top: usize,
    left: usize,
    /// The image inside the planes.
    h: usize,
    w: usize,
}

impl Grid {
    fn plane(&self) -> usize {
        self.hp * self.wp
    }
    /// Floats from one channel's plane to the next in the padded buffer:
    /// the plane, plus a gap of zeros where a plane of 896 floats or more
    /// is within 128 floats (512 bytes, 8 of the 64 sets of a 32 KiB 8-way
    /// L1d) of a multiple of 1024 floats (4 KiB). Without it every
    /// channel's rows map to the same few L1 sets (keras-cnn's conv2 planes
    /// are 32 x 32 = 4 KiB exactly) and a tile's reads of its taps, one per
    /// channel and row, evict each other (`docs/perf-log.md`). Smaller
    /// planes lie side by side in the sets anyway. Only the addresses
    /// change, not what is added, so the bits stay the same.
    fn stride(&self) -> usize {
        const WAY: usize = 1024;
        const NEAR: usize = 128;
        let plane = self.plane();
        let m = plane % WAY;
        if plane < WAY - NEAR || (NEAR..=WAY - NEAR).contains(&m) {
            plane
        } else {
            // The next plane starts NEAR floats past a multiple of WAY.
            plane + (WAY + NEAR - m) % WAY
        }
    }
    fn q_len(&self) -> usize {
        self.oh * self.wp
    }
    /// How the forward and data-gradient GEMM walks one image:
    /// `(channels, tiles)`, blocks of `tiles` tiles of `NR` virtual outputs
    /// and, within a block, the taps in chunks of `channels` input channels
    /// (`channels * R * S` taps); for each chunk, each panel of filters
    /// meets the block's tiles one after the other. Sized so that a panel's
    /// chunk of packed filters (at most ~8 KiB) stays in L1 across the
    /// tiles and the block's reach into the chunk's input, `channels` x
    /// (`R - 1` rows + the block + `S - 1`), at most 16 KiB, stays there
    /// across the panels. Walked tile by tile with every tap at once,
    /// every panel's filters (36 KiB for keras-cnn's conv2, 55 KiB for
    /// conv4's data gradient) and a reach of up to 19 KiB passed through
    /// the 32 KiB L1 for each tile (`docs/perf-log.md`). A chunk's tile
    /// continues the accumulators the previous chunk stored, so each
    /// output is the same FMA chain over the taps in order, and the bits do
    /// not depend on the blocking.
    fn blocking(&self, kernel_w: usize) -> (usize, usize) {
        const REACH_FLOATS: usize = 4096;
        const PANEL_TAPS: usize = 2048 / MR;
        let (r, ch) = (self.hp + 1 - self.oh, self.ch.max(1));
        let reach = (r - 1) * self.wp + kernel_w - 1 + NR;
        let fit = (REACH_FLOATS / reach)
            .min(PANEL_TAPS / (r * kernel_w))
            .max(1);
        // Equal chunks: 64 channels that fit 37 go as two of 32.
        let channels = ch.div_ceil(ch.div_ceil(fit));
        let tiles = (REACH_FLOATS / channels).saturating_sub(reach) / NR + 1;
        (channels, tiles.min(8))
    }
    /// Virtual outputs rounded up to whole tiles.
    fn q_tiles(&self) -> usize {
        self.q_len().div_ceil(NR)
    }
    /// Padded planes plus the tail that the last plane's taps read: tap
    /// `(r, s)` at virtual output `q < oh*wp` reads up to `(r + oh)*wp + s - 1
    /// < plane + S` past its plane's start, and tiles round `q` up by less
    /// than `NR`.
    pub(super) fn buf_len(&self, s: usize) -> usize {
        self.ch.saturating_sub(1) * self.stride() + self.plane() + NR + s
    }

    /// `ch` planes of `h x w` from `src` into `out` (`buf_len` long), one
    /// every `stride` floats, zero around them, in the gaps and in the tail.
    pub(super) fn pad_into(&self, src: &[f32], out: &mut [f32]) {
        let (hw, plane, stride) = (self.h * self.w, self.plane(), self.stride());
        debug_assert!(src.len() == self.ch * hw && out.len() >= self.buf_len(0));
        for (c, dst) in out.chunks_mut(stride).take(self.ch).enumerate() {
            let (dst, gap) = dst.split_at_mut(plane);
            gap.fill(0.0);
            let img = &src[c * hw..][..hw];
            dst[..self.top * self.wp].fill(0.0);
            for (y, row) in img.chunks_exact(self.w).enumerate() {
                let d = &mut dst[(self.top + y) * self.wp..][..self.wp];
                d[..self.left].fill(0.0);
                d[self.left..self.left + self.w].copy_from_slice(row);
                d[self.left + self.w..].fill(0.0);
            }
            dst[(self.top + self.h) * self.wp..].fill(0.0);
        }
        if let Some(tail) = out.get_mut(self.ch * stride..) {
            tail.fill(0.0);
        }
    }

    /// Offsets of tap `(c, r, s)` (in that order, `r` and `s` over an
    /// `r x s` kernel) from a virtual output's position.
    pub(super) fn offsets(&self, r: usize, s: usize) -> Vec<usize> {
        let stride = self.stride();
        let mut v = Vec::with_capacity(self.ch * r * s);
        for c in 0..self.ch {
            for rr in 0..r {
                for ss in 0..s {
                    v.push(c * stride + rr * self.wp + ss);
                }
            }
        }
        v
    }
}

/// The forward grid of `p`: `x` padded as the layer pads it.
pub(super) fn forward_grid(p: &Conv2d) -> Grid {
    Grid {
        ch: p.c,
        hp: p.h + p.pad_top + p.pad_bottom,
        wp: p.w + p.pad_left + p.pad_right,
        oh: p.out_h,
        ow: p.out_w,
        top: p.pad_top,
        left: p.pad_left,
        h: p.h,
        w: p.w,
    }
}

/// The data gradient's grid: `dy` padded by `R - 1 - pad` on each side,
/// whose valid correlation with the turned filters is `H x W`.
fn data_grid(p: &Conv2d) -> Grid {
    let (top, left) = (p.r - 1 - p.pad_top, p.s - 1 - p.pad_left);
    Grid {
        ch: p.k,
        hp: p.out_h + top + (p.r - 1 - p.pad_bottom),
        wp: p.out_w + left + (p.s - 1 - p.pad_right),
        oh: p.h,
        ow: p.w,
        top,
        left,
        h: p.out_h,
        w: p.out_w,
    }
}

/// The output-channel panels of `kout` channels: `(first channel, rows)`,
/// rows 6 or 4 (the last may hold fewer channels than rows: zero filters),
/// as many 6s as leave a multiple of 4 (`kout = 6a + 4b` for every even
/// `kout` but 2; odd counts round up).
fn panels(kout: usize) -> Vec<(usize, usize)> {
    let even = kout.div_ceil(2) * 2;
    let sixes = (0..=even / MR)
        .rev()
        .find(|a| (even - a * MR).is_multiple_of(MR4))
        .unwrap_or(0);
    let fours = (even - sixes * MR).div_ceil(MR4);
    let mut v = Vec::with_capacity(sixes + fours);
    for i in 0..sixes {
        v.push((i * MR, MR));
    }
    for i in 0..fours {
        v.push((sixes * MR + i * MR4, MR4));
    }
    v
}

/// `w` (`[kout][taps]`, row-major) packed per panel of [`panels`], each
/// `[taps][rows]` (zero past `kout`), the panels one after the other: the
/// order the tile kernels broadcast. (Runs once per call, before the
/// images go to the threads: a plain strided copy, no per-element index
/// arithmetic.)
fn pack_filters(w: &[f32], kout: usize, taps: usize) -> Vec<f32> {
    let panels = panels(kout);
    let rows_total = panels.last().map_or(0, |&(k0, rows)| k0 + rows);
    let mut v = vec![0.0f32; rows_total * taps];
    for (k0, rows) in panels {
        let dst = &mut v[k0 * taps..][..rows * taps];
        for i in 0..rows.min(kout.saturating_sub(k0)) {
            let src = &w[(k0 + i) * taps..][..taps];
            for (d, &x) in dst[i..].iter_mut().step_by(rows).zip(src) {
                *d = x;
            }
        }
    }
    v
}

/// One image of the shifted-rows GEMM: `out[kout][q]` (`ld` per row,
/// `q_tiles * NR` of it written) `= sum_t filters[k][t] * xp[q + offs[t]]`,
/// then the valid columns to `dst` (`kout` planes of `oh x ow`), plus
/// `bias[k]` when given, through `act` (the GEMM epilogue's operations,
/// row by row in vector loops: done per element through the activation's
/// `match`, the epilogue cost more than keras-cnn conv1's 27-tap products).
#[allow(clippy::too_many_arguments)]
fn image(
    g: &Grid,
    kernel_w: usize,
    src: &[f32],
    packed: &[f32],
    offs: &[usize],
    kout: usize,
    dst: &mut [f32],
    bias: Option<&[f32]>,
    act: Activation,
) {
    let (xp_len, ld) = (g.buf_len(kernel_w), g.q_tiles() * NR);
    let panels = panels(kout);
    let kpad = panels.last().map_or(0, |&(k0, rows)| k0 + rows);
    with_scratch(xp_len + kpad * ld, |buf| {
        let (xp, out) = buf.split_at_mut(xp_len);
        g.pad_into(src, xp);
        let taps = offs.len();
        let (channels, tiles) = g.blocking(kernel_w);
        let (block, chunk) = (tiles * NR, channels * taps / g.ch.max(1));
        for qb in (0..ld).step_by(block) {
            for t0 in (0..taps).step_by(chunk) {
                let t1 = taps.min(t0 + chunk);
                let offs = &offs[t0..t1];
                for &(k0, rows) in &panels {
                    let a = &packed[k0 * taps + t0 * rows..][..(t1 - t0) * rows];
                    for q0 in (qb..ld.min(qb + block)).step_by(NR) {
                        let xb = xp[q0..].as_ptr();
                        let o = out[k0 * ld + q0..].as_mut_ptr();
                        // SAFETY: AVX2 and FMA (the callers' `Isa` check);
                        // the tile reads xp[q0 + offs[t] .. + NR], inside
                        // xp_len (`Grid::buf_len`), and reads (after the
                        // first chunk) and writes rows k0 .. k0 + rows (<=
                        // kpad) of `out` at q0 .. q0 + NR <= ld.
                        unsafe {
                            match (rows == MR, t0 == 0) {
                                (true, true) => tile::<MR, false>(a, xb, offs, o, ld),
                                (true, false) => tile::<MR, true>(a, xb, offs, o, ld),
                                (false, true) => tile::<MR4, false>(a, xb, offs, o, ld),
                                (false, false) => tile::<MR4, true>(a, xb, offs, o, ld),
                            }
                        };
                    }
                }
            }
        }
        // Bias and activation on the way out, one pass, the activation's
        // kind fixed per loop. (As a second pass in place, relu compiled
        // to AVX2's masked stores, slow on AMD's cores: `docs/perf-log.md`.)
        for (k, plane) in dst.chunks_exact_mut(g.oh * g.ow).enumerate().take(kout) {
            let bias_k = bias.map(|b| b[k]);
            for (oy, row) in plane.chunks_exact_mut(g.ow).enumerate() {
                let v = &out[k * ld + oy * g.wp..][..g.ow];
                match bias_k {
                    Some(bk) => by_kind!(act, |a| for (d, &s) in row.iter_mut().zip(v) {
                        *d = a.apply(s + bk);
                    }),
                    None => by_kind!(act, |a| for (d, &s) in row.iter_mut().zip(v) {
                        *d = a.apply(s);
                    }),
                }
            }
        }
    });
}

/// Runs `image_fn(i, dst_image)` over the images of `dst` (`per` floats
/// each), in parallel when there are several.
fn over_images(dst: &mut [f32], per: usize, image_fn: impl Fn(usize, &mut [f32]) + Sync) {
    if per == 0 {
        return;
    }
    if dst.len() > per && rayon::current_num_threads() > 1 {
        dst.par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, d)| image_fn(i, d));
    } else {
        dst.chunks_mut(per)
            .enumerate()
            .for_each(|(i, d)| image_fn(i, d));
    }
}

/// `y = act(conv(x, w) + bias)`, checked by the caller; [`fits`] and AVX2
/// with FMA required.
pub(super) fn forward(
    p: &Conv2d,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) {
    let g = forward_grid(p);
    let taps = p.c * p.r * p.s;
    let packed = pack_filters(w, p.k, taps);
    let offs = g.offsets(p.r, p.s);
    let x_img = p.c * p.h * p.w;
    over_images(y, p.k * p.out_h * p.out_w, |i, dst| {
        let src = &x[i * x_img..][..x_img];
        image(&g, p.s, src, &packed, &offs, p.k, dst, bias, act);
    });
}

/// `dx` (checked by the caller): the valid correlation of `dy`, padded by
/// `R - 1 - pad`, with `w` transposed (`[C][K]`) and turned by 180 degrees.
/// [`fits`] (with the data-gradient reach) and AVX2 with FMA required.
pub(super) fn backward_data(p: &Conv2d, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let g = data_grid(p);
    let (rs, taps) = (p.r * p.s, p.k * p.r * p.s);
    // Filter c of the correlation: tap (k, r', s') is w[k][c][R-1-r'][S-1-s'].
    let mut turned = vec![0.0f32; p.c * taps];
    for (c, row) in turned.chunks_exact_mut(taps).enumerate() {
        for (k, dst) in row.chunks_exact_mut(rs).enumerate() {
            let src = &w[(k * p.c + c) * rs..][..rs];
            for (d, &x) in dst.iter_mut().zip(src.iter().rev()) {
                *d = x;
            }
        }
    }
    let packed = pack_filters(&turned, p.c, taps);
    let offs = g.offsets(p.r, p.s);
    let y_img = p.k * p.out_h * p.out_w;
    over_images(dx, p.c * p.h * p.w, |i, dst| {
        let src = &dy[i * y_img..][..y_img];
        image(
            &g,
            p.s,
            src,
            &packed,
            &offs,
            p.c,
            dst,
            None,
            Activation::LINEAR,
        );
    });
}

/// `dw` (checked by the caller, `p.n > 0`): the images in at most
/// [`FILTER_SLICES`] slices fixed by the shape; each slice's sum in its own
/// partial, the partials added in slice order. [`fits`] and AVX2 with FMA
/// required.
pub(super) fn backward_filter(p: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let g = forward_grid(p);
    let offs = g.offsets(p.r, p.s);
    // All-ones bits on the virtual outputs that exist (ox < OW, q < oh*wp),
    // zero on the thrown-away columns and the rounding: those read other
    // rows' pixels, and 0 * NaN there would leak a NaN or an infinity that
    // no window of the tap covers into dw.
    let q8 = g.q_len().div_ceil(8) * 8;
    let valid: Vec<f32> = (0..q8)
        .map(|q| {
            let on = q < g.q_len() && q % g.wp < g.ow;
            f32::from_bits(if on { u32::MAX } else { 0 })
        })
        .collect();
    over_filter_slices(p, dw, |images, acc| {
        filter_slice(p, &g, &offs, &valid, x, dy, images, acc)
    });
}

/// `dw` as the sum of per-slice partial filter gradients: the images in at
/// most [`FILTER_SLICES`] slices fixed by the shape, `slice(images, acc)`
/// writing each slice's sum into its own `acc` (`w_len` floats,
/// overwritten; the first is `dw` itself), the slices in parallel, the
/// partials then added in slice order. So the order of every addition,
/// and the bits, do not depend on the thread count. (`p.n > 0`.)
pub(super) fn over_filter_slices(
    p: &Conv2d,
    dw: &mut [f32],
    slice: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    let wl = p.w_len();
    let slices = p.n.min(FILTER_SLICES);
    let per_slice = p.n.div_ceil(slices);
    let slices = p.n.div_ceil(per_slice);
    let mut partial = vec![0.0f32; (slices - 1) * wl];
    let slice = |si: usize, acc: &mut [f32]| {
        let n0 = si * per_slice;
        slice(n0..(n0 + per_slice).min(p.n), acc);
    };
    let threads = rayon::current_num_threads();
    if slices == 1 {
        slice(0, dw);
    } else if threads > 1 {
        let mut parts: Vec<&mut [f32]> = std::iter::once(&mut *dw)
            .chain(partial.chunks_exact_mut(wl))
            .collect();
        parts
            .par_iter_mut()
            .enumerate()
            .for_each(|(si, acc)| slice(si, acc));
    } else {
        slice(0, dw);
        for (si, acc) in partial.chunks_exact_mut(wl).enumerate() {
            slice(si + 1, acc);
        }
    }
    for part in partial.chunks_exact(wl) {
        for (d, &v) in dw.iter_mut().zip(part) {
            *d += v;
        }
    }
}

/// The filter gradient of `images` into `acc` (`[K][C*R*S]`, overwritten):
/// their padded inputs and virtual-grid `dy` side by side in scratch, then
/// per tile of `FR` filters x `TAPS` taps one set of lane chains over every
/// image's `q` in turn (a 13x13 map alone is only 25 vector steps, too few
/// to pay for a tile's lane sums), added up once.
#[allow(clippy::too_many_arguments)]
fn filter_slice(
    p: &Conv2d,
    g: &Grid,
    offs: &[usize],
    valid: &[f32],
    x: &[f32],
    dy: &[f32],
    images: std::ops::Range<usize>,
    acc: &mut [f32],
) {
    let (x_img, ohw) = (p.c * p.h * p.w, p.out_h * p.out_w);
    let (xp_len, q8) = (g.buf_len(p.s), valid.len());
    let kpad = p.k.div_ceil(FR) * FR;
    let per = xp_len + kpad * q8;
    let taps = offs.len();
    let count = images.len();
    with_scratch(count * per, |buf| {
        for (img, one) in images.zip(buf.chunks_exact_mut(per)) {
            let (xp, dyv) = one.split_at_mut(xp_len);
            g.pad_into(&x[img * x_img..][..x_img], xp);
            // dy on the virtual grid: zero in the S - 1 thrown-away columns
            // of each row, in the rounding and in the padded filters.
            dyv.fill(0.0);
            let dyi = &dy[img * p.k * ohw..][..p.k * ohw];
            for (k, plane) in dyi.chunks_exact(ohw).enumerate() {
                for (oy, row) in plane.chunks_exact(p.out_w).enumerate() {
                    dyv[k * q8 + oy * g.wp..][..p.out_w].copy_from_slice(row);
                }
            }
        }
        let buf = &*buf;
        let mut sums = [[0.0f32; TAPS]; FR];
        for t0 in (0..taps).step_by(TAPS) {
            // Taps past the last read offset 0 (harmless, discarded).
            let o: [usize; TAPS] = std::array::from_fn(|j| offs.get(t0 + j).copied().unwrap_or(0));
            for k0 in (0..p.k).step_by(FR) {
                // SAFETY: AVX2 and FMA (the callers' `Isa` check); for each
                // of the `count` images (`per` floats apart) reads dyv rows
                // k0 .. k0 + FR (< kpad) over q < q8, `valid` over q < q8,
                // and xp at o[j] + q, inside xp_len (`buf_len`).
                unsafe {
                    filter_tile(
                        buf.as_ptr(),
                        count,
                        per,
                        xp_len + k0 * q8,
                        valid,
                        o,
                        &mut sums,
                    )
                };
                for (ii, row) in sums.iter().enumerate() {
                    let k = k0 + ii;
                    if k >= p.k {
                        break;
                    }
                    for (j, &v) in row.iter().enumerate().take(taps - t0) {
                        acc[k * taps + t0 + j] = v;
                    }
                }
            }
        }
    });
}

/// `M x NR` outputs at `out` (row stride `ld`): for each tap `t`, the `M`
/// filters `a[t*M ..]` broadcast times `NR` inputs at `xb + offs[t]`, one
/// FMA chain per output over the taps in order, from zero or, with
/// `CONTINUE`, from the values at `out` (the same chain over an earlier
/// chunk of taps, stored).
///
/// # Safety
/// AVX2 and FMA; `a` holds `offs.len() * M` floats; `NR` floats readable
/// at `xb + offs[t]` for every `t`; `M` rows of `NR` writable (and, with
/// `CONTINUE`, readable) at `out`.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const M: usize, const CONTINUE: bool>(
    a: &[f32],
    xb: *const f32,
    offs: &[usize],
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(a.len() >= offs.len() * M);
    // SAFETY: the reads and writes the caller vouches for.
    unsafe {
        let mut acc: [[__m256; NR / 8]; M] = if CONTINUE {
            std::array::from_fn(|i| {
                std::array::from_fn(|j| _mm256_loadu_ps(out.add(i * ld + 8 * j)))
            })
        } else {
            [[_mm256_setzero_ps(); NR / 8]; M]
        };
        for (t, &o) in offs.iter().enumerate() {
            let p = xb.add(o);
            let b: [__m256; NR / 8] = std::array::from_fn(|j| _mm256_loadu_ps(p.add(8 * j)));
            let ap = a.as_ptr().add(t * M);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(i));
                for (r, &bv) in row.iter_mut().zip(&b) {
                    *r = _mm256_fmadd_ps(av, bv, *r);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                _mm256_storeu_ps(out.add(i * ld + 8 * j), v);
            }
        }
    }
}

/// `sums[i][j] = sum over images m < count, q < q8 of dyv_m[i*q8 + q] *
/// (xp_m[o[j] + q] & valid[q])`, image `m`'s padded input `xp_m` at `buf +
/// m*per` and its rows of `dyv` at `buf + m*per + dyv_at`: eight lanes of
/// FMA chains over the images and `q` in order, then the lanes added in a
/// fixed tree.
///
/// # Safety
/// AVX2 and FMA; per image, `FR * q8` floats readable from `dyv_at` and
/// `o[j] + q8` from its start; `q8 = valid.len()` a multiple of 8.
#[target_feature(enable = "avx2,fma")]
unsafe fn filter_tile(
    buf: *const f32,
    count: usize,
    per: usize,
    dyv_at: usize,
    valid: &[f32],
    o: [usize; TAPS],
    sums: &mut [[f32; TAPS]; FR],
) {
    let q8 = valid.len();
    let mut acc = [[_mm256_setzero_ps(); TAPS]; FR];
    // SAFETY: the reads the caller vouches for.
    unsafe {
        for m in 0..count {
            let xp = buf.add(m * per);
            let dyv = xp.add(dyv_at);
            for q in (0..q8).step_by(8) {
                let mask = _mm256_loadu_ps(valid.as_ptr().add(q));
                let b = o.map(|oj| _mm256_and_ps(_mm256_loadu_ps(xp.add(oj + q)), mask));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_loadu_ps(dyv.add(i * q8 + q));
                    for (r, &bv) in row.iter_mut().zip(&b) {
                        *r = _mm256_fmadd_ps(av, bv, *r);
                    }
                }
            }
        }
    }
    for (s, a) in sums.iter_mut().zip(&acc) {
        for (d, &v) in s.iter_mut().zip(a) {
            *d = hsum(v);
        }
    }
}

/// The eight lanes of `v` added as `((0+4) + (2+6)) + ((1+5) + (3+7))`.
#[target_feature(enable = "avx2")]
fn hsum(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
}
