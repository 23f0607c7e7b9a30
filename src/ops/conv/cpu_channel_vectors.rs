//! Stride-1 convolution on AVX2 with the vectors across output channels:
//! tiles of 16 output channels x 6 output pixels, each pixel running only
//! the taps that fall inside the input.
//!
//! Why beside the shifted rows (`cpu_direct.rs`): those vectorize along a
//! *virtual* row as wide as the padded input, so they compute `S - 1`
//! thrown-away columns per row, round to tiles of 16, and, for the data
//! gradient of a `valid` layer, correlate over `dy` padded by `R - 1`, whose
//! border outputs run taps that read only zeros. keras-cnn's conv3 and
//! conv4 thus executed 1.14x to 1.51x their FLOPs (`docs/perf-log.md`).
//! Here the vectors run across 16 output channels, the pixels are
//! broadcast one at a time, and a pixel's taps are clipped to the input:
//! every multiply-add executed is one of the convolution's (a `valid`
//! layer executes exactly its FLOPs, a padded one fewer), up to the last
//! tile's rounding.
//!
//! Both passes are one correlation,
//!
//! ```text
//! out[o][oy][ox] = sum_i sum_{(r, s) inside} f[o][i][r][s] * in[i][oy + r - top][ox + s - left]
//! ```
//!
//! the forward with `in = x`, `f = w`, `top, left` the padding; the data
//! gradient with `in = dy`, `f[c][k][r][s] = w[k][c][R-1-r][S-1-s]` (the
//! filters transposed and turned) and `top = R - 1 - pad_top` (negative
//! where the padding is wider than the kernel: nothing then needs a
//! padded copy). `(r, s)` is inside when the input row and column exist:
//! a range of rows per output row and of columns per output column, so the
//! output pixels fall into classes (at most `(2R - 1) x (2S - 1)`, one for
//! the whole interior) sharing one list of taps. Tiles take six pixels of
//! one class, from a group of images side by side (a 13 x 13 map's border
//! classes are too small to fill tiles one image at a time).
//!
//! Determinism: every output is one FMA chain over `(i, r, s)` in that
//! order, its inside taps only, whatever the tiling, grouping or threads.
//! The shifted rows run the same chain plus the padding's zero products
//! (`acc + w * 0 = acc` for finite `w`), so the two agree bit for bit on
//! finite filters up to the sign of zero outputs; a tap that never meets
//! the input cannot carry a non-finite filter value into the output here
//! (as in the definition, which sums over the window inside the image).

use std::arch::x86_64::*;
use std::collections::BTreeMap;

use rayon::prelude::*;

use super::Conv2d;
use super::cpu::with_scratch;
use crate::ops::activation::cpu::by_kind;
use crate::ops::activation::{Activation, ActivationKind};

/// Output channels per tile (two `ymm` vectors).
const OB: usize = 16;
/// Output pixels per tile: 12 accumulators, two filter vectors and one
/// broadcast fill 15 of the 16 `ymm` registers (the GEMM micro-kernel's
/// 6 x 16 shape, with the pixels as its broadcast side).
const PIX: usize = 6;
/// Most images a task takes side by side (enough to fill the border
/// classes' tiles of a small map).
const GROUP_MAX: usize = 4;
/// Floats of a group's inputs and accumulator scratch at most (256 KiB),
/// so that both stay in a 512 KiB L2 while each block of filters passes
/// over them: three of keras-cnn's conv4 inputs, one of conv2's (whose
/// data gradient ran 7% slower in groups of four).
const GROUP_FLOATS: usize = 1 << 16;

/// Whether the layer can take this path: stride 1 (one tap list per class
/// of pixels; the data gradient of a strided layer is no correlation).
/// Any padding. The caller checks the CPU (AVX2 and FMA).
pub(super) fn fits(p: &Conv2d) -> bool {
    p.stride_h == 1 && p.stride_w == 1
}

/// Whether the default takes this path over the shifted rows for the
/// pass: maps of up to 32 x 32 outputs (keras-cnn's conv2 to conv4, where
/// the shifted rows executed 1.07x to 1.51x their FLOPs, and this path ran
/// 0.78-0.98x their time on one and two threads; larger maps are untimed),
/// with enough output channels to fill the vectors (conv1's data gradient
/// has 3) and taps per output to pay for a tile's set-up (conv1's forward
/// has 27), where the shifted rows stay (`docs/perf-log.md`).
pub(super) fn preferred(p: &Conv2d, data_gradient: bool) -> bool {
    const MAP_MAX: usize = 1024;
    let c = if data_gradient {
        Corr::data(p)
    } else {
        Corr::forward(p)
    };
    c.cout >= OB && c.cin * c.r * c.s >= 64 && c.oh * c.ow <= MAP_MAX
}

/// Whether the default filter gradient is this path's: 16 filters or more
/// to fill its vectors (fewer take the shifted rows' tiles of 4 filters).
/// On keras-cnn's four layers it ran 0.64-0.76x the shifted rows' time,
/// conv1 included, on one and two threads (`docs/perf-log.md`).
pub(super) fn filter_preferred(p: &Conv2d) -> bool {
    p.k >= OB
}

/// One correlation (module docs): input planes `cin x ih x iw`, output
/// planes `cout x oh x ow`, an `r x s` kernel placed at `-top, -left`.
struct Corr {
    cin: usize,
    ih: usize,
    iw: usize,
    cout: usize,
    oh: usize,
    ow: usize,
    r: usize,
    s: usize,
    top: isize,
    left: isize,
}

/// What one pass computes besides its input and output: the
/// [`Corr::pack`]ed filters, the [`Corr::classes`], and the epilogue's bias
/// (`bias[o]`, when given) and activation.
#[derive(Clone, Copy)]
struct Job<'a> {
    packed: &'a [f32],
    classes: &'a [Class],
    bias: Option<&'a [f32]>,
    act: Activation,
}

/// Output pixels sharing one list of inside taps.
struct Class {
    /// `(filter offset, input offset)` per inside tap `(r, s)` of each
    /// input channel of a chunk ([`Corr::chunk`]), channel by channel, in
    /// order: `i * R*S*OB + (r*S + s) * OB` from the chunk's first
    /// channel's packed filters, and `i * ih*iw + (r - top) * iw + s -
    /// left` from the pixel's position `oy * iw + ox` in the chunk's first
    /// input plane. One list, so the tile runs one loop with no
    /// per-channel pointer arithmetic.
    taps: Vec<(usize, isize)>,
    /// Inside taps per input channel (a shorter last chunk takes
    /// `channels * per_channel` of `taps`).
    per_channel: usize,
    /// `(oy * ow + ox, oy * iw + ox)`: where the pixel is in an output
    /// plane and where its taps are counted from in an input plane.
    pixels: Vec<(usize, isize)>,
}

/// Up to [`PIX`] pixels of one class from a group's images.
struct Tile {
    class: usize,
    /// Pixels in the tile (1 to `PIX`; the class's last tile may hold
    /// fewer); the entries past them repeat the last one and are unused.
    count: usize,
    /// Per entry, its pixel's input position from the group's first input
    /// image and its accumulators' slot in the group's `[image][pixel]`.
    pos: [isize; PIX],
    slot: [usize; PIX],
}

/// The taps `t < k` for which `o + t - top` lies in `0..n`.
fn inside(o: usize, top: isize, k: usize, n: usize) -> (usize, usize) {
    let o = o as isize;
    let lo = (top - o).clamp(0, k as isize) as usize;
    let hi = (n as isize + top - o).clamp(0, k as isize) as usize;
    (lo, hi.max(lo))
}

impl Corr {
    fn forward(p: &Conv2d) -> Corr {
        Corr {
            cin: p.c,
            ih: p.h,
            iw: p.w,
            cout: p.k,
            oh: p.out_h,
            ow: p.out_w,
            r: p.r,
            s: p.s,
            top: p.pad_top as isize,
            left: p.pad_left as isize,
        }
    }

    fn data(p: &Conv2d) -> Corr {
        Corr {
            cin: p.k,
            ih: p.out_h,
            iw: p.out_w,
            cout: p.c,
            oh: p.h,
            ow: p.w,
            r: p.r,
            s: p.s,
            top: p.r as isize - 1 - p.pad_top as isize,
            left: p.s as isize - 1 - p.pad_left as isize,
        }
    }

    /// The classes of output pixels, each pixel in exactly one, row-major
    /// within a class.
    fn classes(&self) -> Vec<Class> {
        let mut rows: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
        for oy in 0..self.oh {
            rows.entry(inside(oy, self.top, self.r, self.ih))
                .or_default()
                .push(oy);
        }
        let mut cols: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
        for ox in 0..self.ow {
            cols.entry(inside(ox, self.left, self.s, self.iw))
                .or_default()
                .push(ox);
        }
        let (iw, top, left) = (self.iw as isize, self.top, self.left);
        let (per_in, in_plane) = (self.r * self.s * OB, (self.ih * self.iw) as isize);
        let chunk = self.chunk();
        let mut v = Vec::with_capacity(rows.len() * cols.len());
        for (&(r0, r1), oys) in &rows {
            for (&(s0, s1), oxs) in &cols {
                let one: Vec<(usize, isize)> = (r0..r1)
                    .flat_map(|r| (s0..s1).map(move |s| (r, s)))
                    .map(|(r, s)| {
                        let off = (r as isize - top) * iw + s as isize - left;
                        ((r * self.s + s) * OB, off)
                    })
                    .collect();
                let taps = (0..chunk)
                    .flat_map(|i| {
                        let (fi, ii) = (i * per_in, i as isize * in_plane);
                        one.iter().map(move |&(fo, off)| (fi + fo, ii + off))
                    })
                    .collect();
                let pixels = oys
                    .iter()
                    .flat_map(|&oy| oxs.iter().map(move |&ox| (oy, ox)))
                    .map(|(oy, ox)| (oy * self.ow + ox, (oy * self.iw + ox) as isize))
                    .collect();
                v.push(Class {
                    taps,
                    per_channel: one.len(),
                    pixels,
                });
            }
        }
        v
    }

    /// `f` (`[cout][cin][r][s]`, row-major) in blocks of [`OB`] output
    /// channels, each `[cin][r][s][OB]` (zero lanes past `cout`): the
    /// order a tile loads them. (Aligning the lines to 64 bytes, so that
    /// no filter load straddles two, moved no timing measurably.)
    fn pack(&self, f: &[f32]) -> Vec<f32> {
        let rs = self.r * self.s;
        let per_block = self.cin * rs * OB;
        let mut v = vec![0.0f32; self.cout.div_ceil(OB) * per_block];
        for (o, filter) in f.chunks_exact(self.cin * rs).enumerate() {
            let block = &mut v[(o / OB) * per_block..][..per_block];
            for (d, &x) in block[o % OB..].iter_mut().step_by(OB).zip(filter) {
                *d = x;
            }
        }
        v
    }

    /// The data gradient's filters (`f[c][k][r'][s'] = w[k][c][R-1-r'][S-1-s']`,
    /// `w` being the layer's `[K][C][R][S]`) packed as [`Corr::pack`] packs
    /// `f`, in one pass over `w` without a turned copy (the two passes
    /// over 37K floats ran on one thread before conv4's data gradient
    /// could start on two).
    fn pack_turned(&self, w: &[f32]) -> Vec<f32> {
        let rs = self.r * self.s;
        let per_block = self.cin * rs * OB;
        let mut v = vec![0.0f32; self.cout.div_ceil(OB) * per_block];
        for (kc, src) in w.chunks_exact(rs).enumerate() {
            let (k, c) = (kc / self.cout, kc % self.cout);
            let dst = &mut v[(c / OB) * per_block + k * rs * OB + c % OB..];
            for (d, &x) in dst.iter_mut().step_by(OB).zip(src.iter().rev()) {
                *d = x;
            }
        }
        v
    }

    /// `out` (`images` outputs of `cout * oh * ow`) from `inp` (the same
    /// images' inputs, `cin * ih * iw` each) and the [`Corr::pack`]ed
    /// filters, plus `bias[o]` when given, through `act`.
    fn run(
        &self,
        packed: &[f32],
        bias: Option<&[f32]>,
        act: Activation,
        inp: &[f32],
        out: &mut [f32],
    ) {
        let (in_img, out_img) = (self.cin * self.ih * self.iw, self.cout * self.oh * self.ow);
        let images = out.len() / out_img.max(1);
        let threads = rayon::current_num_threads();
        // Groups that stay in L2, as large as that allows while the
        // threads' shares stay even: of the sizes up to the limit, the one
        // whose busiest thread has the fewest images (keras-cnn's conv4 at
        // batch 32 on two threads: 16 groups of 2, not 11 of 3, six of
        // which one thread would run while the other ran five). The bits
        // do not depend on the grouping.
        let per_image = in_img + self.oh * self.ow * OB;
        let limit = GROUP_MAX
            .min(GROUP_FLOATS / per_image)
            .clamp(1, images.max(1));
        let group = (1..=limit)
            .min_by_key(|&g| (images.div_ceil(g).div_ceil(threads) * g, usize::MAX - g))
            .unwrap_or(1);
        let classes = self.classes();
        let job = Job {
            packed,
            classes: &classes,
            bias,
            act,
        };
        // The tiles of a whole group, and of the last group if it is
        // smaller: positions are relative to a group's first image.
        let full = self.tiles(&classes, group);
        let last = self.tiles(&classes, images % group);
        let task = |gi: usize, out: &mut [f32]| {
            let n = out.len() / out_img;
            let inp = &inp[gi * group * in_img..][..n * in_img];
            self.group(&job, if n == group { &full } else { &last }, inp, out);
        };
        if images > group && threads > 1 {
            out.par_chunks_mut(group * out_img)
                .enumerate()
                .for_each(|(gi, o)| task(gi, o));
        } else {
            out.chunks_mut(group * out_img)
                .enumerate()
                .for_each(|(gi, o)| task(gi, o));
        }
    }

    /// The tiles of `images` images side by side: per class, its pixels in
    /// every image in turn, [`PIX`] at a time.
    fn tiles(&self, classes: &[Class], images: usize) -> Vec<Tile> {
        let (in_img, out_plane) = (self.cin * self.ih * self.iw, self.oh * self.ow);
        let mut v = Vec::new();
        for (ci, class) in classes.iter().enumerate() {
            let (len, total) = (class.pixels.len(), images * class.pixels.len());
            for t0 in (0..total).step_by(PIX) {
                let entry = |j: usize| {
                    let t = (t0 + j).min(total - 1);
                    let (img, (po, pi)) = (t / len, class.pixels[t % len]);
                    ((img * in_img) as isize + pi, img * out_plane + po)
                };
                v.push(Tile {
                    class: ci,
                    count: PIX.min(total - t0),
                    pos: std::array::from_fn(|j| entry(j).0),
                    slot: std::array::from_fn(|j| entry(j).1),
                });
            }
        }
        v
    }

    /// Input channels per chunk of a tile's chain: the chunk's packed
    /// filters at most 12 KiB, so that they stay in L1 while the tiles
    /// pass, beside the tiles' reach into the input. All of conv4's (64
    /// channels x 9 taps x 16 lanes, 36 KiB) went through the 32 KiB L1
    /// once per tile. Equal chunks, as in the shifted rows.
    fn chunk(&self) -> usize {
        const CHUNK_FLOATS: usize = 3072;
        let fit = (CHUNK_FLOATS / (self.r * self.s * OB)).max(1);
        self.cin.div_ceil(self.cin.div_ceil(fit))
    }

    /// One group of images: per block of filters and chunk of input
    /// channels, per class, its pixels in the group's images in tiles of
    /// [`PIX`] (the last one narrower). Each pixel's 16 accumulators wait in
    /// scratch at the pixel's place (`[image][pixel][OB]`) between chunks,
    /// the next chunk continuing them (the same chain); after the last,
    /// each image's block is transposed to planes and goes out with the
    /// bias and the activation. (Written straight from the tiles, 16
    /// scattered stores per pixel cost a fifth of the tiles' time.)
    fn group(&self, job: &Job, tiles: &[Tile], inp: &[f32], out: &mut [f32]) {
        let Job {
            packed,
            classes,
            bias,
            act,
        } = *job;
        let (in_plane, out_plane) = (self.ih * self.iw, self.oh * self.ow);
        let out_img = self.cout * out_plane;
        let per_in = self.r * self.s * OB;
        let per_block = self.cin * per_in;
        let images = out.len() / out_img;
        let chunk = self.chunk();
        let base = inp.as_ptr();
        let acc_len = images * out_plane * OB;
        with_scratch(acc_len + OB * out_plane, |buf| {
            let (acc, planes) = buf.split_at_mut(acc_len);
            let ap = acc.as_mut_ptr();
            for (b, block) in packed.chunks_exact(per_block).enumerate() {
                let (o0, lanes) = (b * OB, OB.min(self.cout - b * OB));
                for i0 in (0..self.cin).step_by(chunk) {
                    let channels = chunk.min(self.cin - i0);
                    let f = &block[i0 * per_in..][..channels * per_in];
                    let moved = (i0 * in_plane) as isize;
                    for t in tiles {
                        // Pointers from which the taps' offsets land in
                        // `inp` (the class's taps are the inside ones),
                        // moved to the chunk's first channel; they
                        // themselves may lie before or past `inp`.
                        let px = t.pos.map(|p| base.wrapping_offset(p + moved));
                        let sl = t.slot.map(|s| ap.wrapping_add(s * OB));
                        let class = &classes[t.class];
                        let taps = &class.taps[..channels * class.per_channel];
                        // SAFETY: AVX2 and FMA (the callers' `Isa` check);
                        // `f` holds whole channels of `per_in` floats; every
                        // `px[j] + i*in_plane + off` of an inside tap is an
                        // element of input channel `i0 + i` of `inp`; each
                        // slot is `OB` floats of `acc` (slot < images *
                        // out_plane).
                        unsafe { any_tile(lanes > 8, i0 > 0, t.count, f, taps, &px, &sl) };
                    }
                }
                let plain = bias.is_none() && act.kind == ActivationKind::Linear;
                for (img, sums) in acc.chunks_exact(out_plane * OB).enumerate() {
                    let dst = &mut out[img * out_img + o0 * out_plane..][..lanes * out_plane];
                    if plain {
                        // The block's planes are `lanes` rows of `out` in a
                        // row: the transposes write them (the data
                        // gradient's copy out was 3% of its time).
                        // SAFETY: AVX2 (the callers' `Isa` check).
                        unsafe { transpose(sums, OB, out_plane, lanes, dst, out_plane) };
                        continue;
                    }
                    // SAFETY: AVX2 (the callers' `Isa` check).
                    unsafe { transpose(sums, OB, out_plane, lanes, planes, out_plane) };
                    // Bias and activation on the way out, the activation's
                    // kind fixed per loop.
                    for l in 0..lanes {
                        let src = &planes[l * out_plane..][..out_plane];
                        let dst = &mut dst[l * out_plane..][..out_plane];
                        match bias.map(|b| b[o0 + l]) {
                            Some(bk) => by_kind!(act, |a| for (d, &s) in dst.iter_mut().zip(src) {
                                *d = a.apply(s + bk);
                            }),
                            None => by_kind!(act, |a| for (d, &s) in dst.iter_mut().zip(src) {
                                *d = a.apply(s);
                            }),
                        }
                    }
                }
            }
        });
    }
}

/// `dst[c * dst_ld + r] = src[r * src_ld + c]` for `r < rows`, `c <
/// cols`: a strided matrix transposed eight by eight in registers, its
/// edges one element at a time. (The accumulators `[pixel][OB]` to output
/// planes; `dy`'s planes to pixel-major.)
///
/// # Safety
/// AVX2; `src` holds `rows` rows of `src_ld >= cols` floats (the last one
/// `cols` long), `dst` `cols` rows of `dst_ld >= rows`.
#[target_feature(enable = "avx2")]
unsafe fn transpose(
    src: &[f32],
    src_ld: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dst_ld: usize,
) {
    debug_assert!(
        rows == 0
            || cols == 0
            || ((rows - 1) * src_ld + cols <= src.len() && (cols - 1) * dst_ld + rows <= dst.len())
    );
    let (r8, c8) = (rows - rows % 8, cols - cols % 8);
    // SAFETY: reads at r * src_ld + c and writes at c * dst_ld + r for r <
    // rows, c < cols only, inside the slices (above).
    unsafe {
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for r0 in (0..r8).step_by(8) {
            for c0 in (0..c8).step_by(8) {
                let v: [__m256; 8] =
                    std::array::from_fn(|j| _mm256_loadu_ps(s.add((r0 + j) * src_ld + c0)));
                for (k, &t) in transpose8(v).iter().enumerate() {
                    _mm256_storeu_ps(d.add((c0 + k) * dst_ld + r0), t);
                }
            }
        }
        for r in 0..rows {
            let from = if r < r8 { c8 } else { 0 };
            for c in from..cols {
                *d.add(c * dst_ld + r) = *s.add(r * src_ld + c);
            }
        }
    }
}

/// The 8 x 8 transpose of `r`: element `j` of vector `i` to element `i`
/// of vector `j`.
#[target_feature(enable = "avx2")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// [`tile`] over the first `count` (1 to `PIX`) entries of `px` and
/// `slots`, with two vectors of output channels when `wide`, continuing
/// the slots when `cont`. (The last tile of a class has fewer pixels;
/// computed as a full tile, the repeats cost keras-cnn's conv4 data
/// gradient 8% more multiply-adds in groups of two images.)
///
/// # Safety
/// As for [`tile`], for those entries.
#[target_feature(enable = "avx2,fma")]
unsafe fn any_tile(
    wide: bool,
    cont: bool,
    count: usize,
    f: &[f32],
    taps: &[(usize, isize)],
    px: &[*const f32; PIX],
    slots: &[*mut f32; PIX],
) {
    macro_rules! pixels {
        ($p:literal) => {{
            let px: [*const f32; $p] = std::array::from_fn(|j| px[j]);
            let sl: [*mut f32; $p] = std::array::from_fn(|j| slots[j]);
            // SAFETY: the caller's.
            unsafe {
                match (wide, cont) {
                    (true, true) => tile::<2, true, $p>(f, taps, px, sl),
                    (true, false) => tile::<2, false, $p>(f, taps, px, sl),
                    (false, true) => tile::<1, true, $p>(f, taps, px, sl),
                    (false, false) => tile::<1, false, $p>(f, taps, px, sl),
                }
            }
        }};
    }
    match count {
        1 => pixels!(1),
        2 => pixels!(2),
        3 => pixels!(3),
        4 => pixels!(4),
        5 => pixels!(5),
        _ => pixels!(6),
    }
}

/// `P` (at most `PIX`) pixels x `8 * V` output channels into their slots (`OB` floats
/// each): for each tap `(fo, off)` of the chunk in order (its input
/// channels one after the other), the channels' filter values at `f[fo
/// ..]` times pixel `j`'s input at `px[j] + off`, broadcast; one FMA chain
/// per output, from zero or, with `CONTINUE`, from the slots (the same
/// chain over the earlier chunks, stored).
///
/// # Safety
/// AVX2 and FMA; `fo + 8 * V <= f.len()` for every tap; each
/// `px[j].wrapping_offset(off)` is readable for every tap; each slot
/// `8 * V` floats readable and writable.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const V: usize, const CONTINUE: bool, const P: usize>(
    f: &[f32],
    taps: &[(usize, isize)],
    px: [*const f32; P],
    slots: [*mut f32; P],
) {
    // SAFETY: the reads and writes the caller vouches for.
    unsafe {
        let mut sums: [[__m256; V]; P] = if CONTINUE {
            std::array::from_fn(|j| std::array::from_fn(|v| _mm256_loadu_ps(slots[j].add(8 * v))))
        } else {
            [[_mm256_setzero_ps(); V]; P]
        };
        let fp = f.as_ptr();
        for &(fo, off) in taps {
            let wp = fp.add(fo);
            let wv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(wp.add(8 * v)));
            for (row, &p) in sums.iter_mut().zip(&px) {
                let b = _mm256_broadcast_ss(&*p.wrapping_offset(off));
                for (a, &w) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(w, b, *a);
                }
            }
        }
        for (row, &s) in sums.iter().zip(&slots) {
            for (v, &a) in row.iter().enumerate() {
                _mm256_storeu_ps(s.add(8 * v), a);
            }
        }
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
    let corr = Corr::forward(p);
    corr.run(&corr.pack(w), bias, act, x, y);
}

/// `dx` (checked by the caller): the correlation of `dy` with `w`
/// transposed and turned by 180 degrees. [`fits`] and AVX2 with FMA
/// required.
pub(super) fn backward_data(p: &Conv2d, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let corr = Corr::data(p);
    corr.run(&corr.pack_turned(w), None, Activation::LINEAR, dy, dx);
}

/// Filter taps `(c, r, s)` per tile of the filter gradient: its broadcast
/// side, as the pixels are the forward's.
const FT: usize = 6;

/// `dw` (checked by the caller, `p.n > 0`): `dw[k][(c, r, s)] = sum over
/// images and output pixels q of dy[k][q] * xp[c][q's window + (r, s)]`,
/// `xp` the input padded as the layer pads it (the shifted rows' padded
/// planes, so a tap over the padding adds `dy * 0`). Vectors across 16
/// filters, `dy` transposed to pixel-major `[q][16]` per block of
/// filters; tiles of 16 filters x 6 taps walk every pixel of every image
/// of a slice (slices as in the other algorithms' filter gradients), one
/// FMA chain per element of `dw` over the images and pixels in order, so
/// the bits do not depend on the threads. Unlike the shifted rows, no
/// thrown-away columns: each step is one real pixel.
pub(super) fn backward_filter(p: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let g = super::cpu_direct::forward_grid(p);
    let offs = g.offsets(p.r, p.s);
    let taps = offs.len();
    let (x_img, ohw) = (p.c * p.h * p.w, p.out_h * p.out_w);
    let (blocks, xp_len) = (p.k.div_ceil(OB), g.buf_len(p.s));
    super::cpu_direct::over_filter_slices(p, dw, |images, acc| {
        let count = images.len();
        let per_block = count * ohw * OB;
        with_scratch(count * xp_len + blocks * per_block, |buf| {
            let (xp, dyt) = buf.split_at_mut(count * xp_len);
            if !p.k.is_multiple_of(OB) {
                // The last block's lanes past K.
                dyt[(blocks - 1) * per_block..].fill(0.0);
            }
            for (m, img) in images.enumerate() {
                g.pad_into(&x[img * x_img..][..x_img], &mut xp[m * xp_len..][..xp_len]);
                let dyi = &dy[img * p.k * ohw..][..p.k * ohw];
                for (b, planes) in dyi.chunks(OB * ohw).enumerate() {
                    let dst = &mut dyt[b * per_block + m * ohw * OB..][..ohw * OB];
                    // SAFETY: AVX2 (the callers' `Isa` check).
                    unsafe { transpose(planes, ohw, planes.len() / ohw, ohw, dst, OB) };
                }
            }
            let (xp, dyt) = (&*xp, &*dyt);
            let mut sums = [[0.0f32; OB]; FT];
            let shape = (count, xp_len, p.out_h, p.out_w, g.wp);
            for (b, block) in dyt.chunks_exact(per_block).enumerate() {
                let (k0, lanes) = (b * OB, OB.min(p.k - b * OB));
                for t0 in (0..taps).step_by(FT) {
                    // Taps past the last read offset 0 (discarded).
                    let o: [usize; FT] =
                        std::array::from_fn(|j| offs.get(t0 + j).copied().unwrap_or(0));
                    // SAFETY: AVX2 and FMA (the callers' `Isa` check);
                    // `block` holds `count` images of `ohw` pixels of `OB`
                    // floats; image m's padded input is `xp_len` floats at
                    // `m * xp_len`, and a pixel's window plus any tap's
                    // offset lies inside it (`Grid::buf_len`).
                    unsafe {
                        if lanes > 8 {
                            filter_tile::<2>(block, xp, shape, o, &mut sums)
                        } else {
                            filter_tile::<1>(block, xp, shape, o, &mut sums)
                        }
                    };
                    for (j, tap) in sums.iter().enumerate().take(taps - t0) {
                        for (l, &v) in tap[..lanes].iter().enumerate() {
                            acc[(k0 + l) * taps + t0 + j] = v;
                        }
                    }
                }
            }
        });
    });
}

/// `sums[j][l] = sum over images m < count and pixels (oy, ox) in order of
/// dyt_m[(oy*ow + ox)][l] * xp_m[oy*wp + ox + o[j]]` for the `8 * V`
/// lanes `l`, image m's pixel-major `dy` block at `dyt + m*ow*oh*OB` and
/// padded input at `xp + m*xp_len`; `shape` = `(count, xp_len, oh, ow,
/// wp)`.
///
/// # Safety
/// AVX2 and FMA; `dyt` holds `count * oh * ow * OB` floats; `xp` holds
/// `count * xp_len` floats with `(oh - 1)*wp + ow - 1 + o[j] < xp_len`.
#[target_feature(enable = "avx2,fma")]
unsafe fn filter_tile<const V: usize>(
    dyt: &[f32],
    xp: &[f32],
    shape: (usize, usize, usize, usize, usize),
    o: [usize; FT],
    sums: &mut [[f32; OB]; FT],
) {
    let (count, xp_len, oh, ow, wp) = shape;
    debug_assert!(dyt.len() >= count * oh * ow * OB && xp.len() >= count * xp_len);
    let mut acc = [[_mm256_setzero_ps(); V]; FT];
    // SAFETY: the reads the caller vouches for.
    unsafe {
        let mut d = dyt.as_ptr();
        for m in 0..count {
            let xm = xp.as_ptr().add(m * xp_len);
            let taps = o.map(|oj| xm.add(oj));
            for oy in 0..oh {
                let row = oy * wp;
                for ox in row..row + ow {
                    let dv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(d.add(8 * v)));
                    for (a, &t) in acc.iter_mut().zip(&taps) {
                        let b = _mm256_broadcast_ss(&*t.add(ox));
                        for (s, &dvv) in a.iter_mut().zip(&dv) {
                            *s = _mm256_fmadd_ps(dvv, b, *s);
                        }
                    }
                    d = d.add(OB);
                }
            }
        }
        for (dst, a) in sums.iter_mut().zip(&acc) {
            for (v, &s) in a.iter().enumerate() {
                _mm256_storeu_ps(dst.as_mut_ptr().add(8 * v), s);
            }
        }
    }
}
