//! CPU convolution: im2col, one GEMM per group of images, col2im.
//!
//! The column matrix of `N` images is `[C*R*S, N*OH*OW]`, row-major:
//! row `(c*R + r)*S + s`, column `(img*OH + oy)*OW + ox` holds
//! `x[img, c, oy*stride_h + r - pad_top, ox*stride_w + s - pad_left]` (0 in
//! the padding). [`im2col`] and [`col2im`] build and reduce it for a whole
//! batch (the layout the GPU kernels share).
//!
//! The passes themselves go through the batch in groups of
//! [`images_per_group`] images: just enough that the group's GEMM has a few
//! hundred columns (one image for maps of 16x16 and up), never more than
//! [`images_per_chunk`], whose scratch stays under [`SCRATCH_FLOATS`]. A
//! group's column matrix is built, multiplied and reduced on one thread
//! while it sits in that core's L2 (conv2 of keras-cnn: 1 MB per image),
//! and groups run in parallel with single-threaded GEMMs when there are
//! enough of them; one image's `[K, OH*OW]` result is already NCHW, so it
//! needs no transpose. An earlier version built the column matrix of 29
//! images at once (30 MB for that layer): im2col and the GEMM's packing
//! each streamed it through DRAM, and the step ran at a tenth of the GEMM's
//! speed (`docs/perf-log.md`).
//!
//! Determinism: every element of `y` and of the column matrix of `dx` is
//! one GEMM chain over `C*R*S` (resp. `K`) whatever the grouping, and the
//! GEMM's bits do not depend on its threads; `dw` sums groups in slices
//! fixed by the shape ([`backward_filter`]). So results are bit-identical
//! on any thread count.

use std::cell::Cell;

use rayon::prelude::*;

use super::Conv2d;
use crate::cpu_isa::Isa;
use crate::error::{Error, Result};
use crate::ops::activation::Activation;
use crate::ops::gemm::cpu::{gemm, gemm_serial};
use crate::ops::gemm::{Bias, Epilogue, Gemm};

/// Scratch floats (column matrix plus the `[K, n*OH*OW]` transpose buffer)
/// one group of images may use at most: 32 MiB. Small enough for any
/// machine; groups are usually far smaller ([`images_per_group`]).
pub const SCRATCH_FLOATS: usize = 1 << 23;

/// The CPU convolution's algorithms (versions as data, as the GPU's
/// `ConvAlgo`): [`forward`] and [`backward_data`] take
/// [`CpuConvAlgo::select`]'s, [`backward_filter`]
/// [`CpuConvAlgo::select_filter`]'s, the `*_with` forms a named one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuConvAlgo {
    /// Column matrix (im2col / col2im) and the packed GEMM, groups of
    /// images per GEMM: any stride and padding, every instruction set.
    Im2colGemm,
    /// Stride 1 on AVX2+FMA: the padded input read at one offset per tap
    /// (the shifted-rows GEMM, no column matrix); the data gradient as the
    /// full correlation with the turned filters (`src/ops/conv/cpu_direct.rs`).
    ShiftedRows,
    /// Stride 1 on AVX2+FMA: vectors across 16 output channels, tiles of
    /// 6 pixels, each pixel running only its taps inside the input (no
    /// thrown-away columns, no zero taps); the filter gradient with
    /// vectors across 16 filters, tiles of 6 taps over every real pixel
    /// (`src/ops/conv/cpu_channel_vectors.rs`).
    ChannelVectors,
}

impl CpuConvAlgo {
    /// Every algorithm.
    pub const ALL: [CpuConvAlgo; 3] = [
        CpuConvAlgo::Im2colGemm,
        CpuConvAlgo::ShiftedRows,
        CpuConvAlgo::ChannelVectors,
    ];

    /// The name in bench ids and results: `im2col_gemm`, `shifted_rows`,
    /// `channel_vectors`.
    pub fn name(self) -> &'static str {
        match self {
            CpuConvAlgo::Im2colGemm => "im2col_gemm",
            CpuConvAlgo::ShiftedRows => "shifted_rows",
            CpuConvAlgo::ChannelVectors => "channel_vectors",
        }
    }

    /// Whether the algorithm runs layer `p` on this thread's instruction
    /// set ([`Isa::current`]); `data_gradient` for the backward-data pass
    /// (the shifted rows need every padding below the kernel's extent
    /// there).
    pub fn runs(self, p: &Conv2d, data_gradient: bool) -> bool {
        match self {
            CpuConvAlgo::Im2colGemm => true,
            #[cfg(target_arch = "x86_64")]
            CpuConvAlgo::ShiftedRows => {
                Isa::current() >= Isa::Avx2 && super::cpu_direct::fits(p, data_gradient)
            }
            #[cfg(target_arch = "x86_64")]
            CpuConvAlgo::ChannelVectors => {
                Isa::current() >= Isa::Avx2 && super::cpu_channel_vectors::fits(p)
            }
            #[cfg(not(target_arch = "x86_64"))]
            CpuConvAlgo::ShiftedRows | CpuConvAlgo::ChannelVectors => false,
        }
    }

    /// The default: the channel vectors on maps up to 32 x 32 with enough channels
    /// and taps (`cpu_channel_vectors::preferred`), else the shifted rows
    /// where they run, else the column matrix. On AVX-512 CPUs the column
    /// matrix keeps its 16-lane GEMM (the other two are AVX2 code, and no
    /// AVX-512 machine has timed them side by side yet).
    pub fn select(p: &Conv2d, data_gradient: bool) -> CpuConvAlgo {
        if Isa::current() >= Isa::Avx512 {
            return CpuConvAlgo::Im2colGemm;
        }
        #[cfg(target_arch = "x86_64")]
        if CpuConvAlgo::ChannelVectors.runs(p, data_gradient)
            && super::cpu_channel_vectors::preferred(p, data_gradient)
        {
            return CpuConvAlgo::ChannelVectors;
        }
        if CpuConvAlgo::ShiftedRows.runs(p, data_gradient) {
            CpuConvAlgo::ShiftedRows
        } else {
            CpuConvAlgo::Im2colGemm
        }
    }

    /// The default for the filter gradient ([`backward_filter`]): the
    /// channel vectors' (`cpu_channel_vectors::filter_preferred`: 16
    /// filters or more, keras-cnn's conv1 to conv4 included) where they run
    /// and the CPU has no AVX-512, else as [`CpuConvAlgo::select`] picks
    /// for the forward.
    pub fn select_filter(p: &Conv2d) -> CpuConvAlgo {
        #[cfg(target_arch = "x86_64")]
        if Isa::current() < Isa::Avx512
            && CpuConvAlgo::ChannelVectors.runs(p, false)
            && super::cpu_channel_vectors::filter_preferred(p)
        {
            return CpuConvAlgo::ChannelVectors;
        }
        CpuConvAlgo::select(p, false)
    }

    /// An error naming `op`, the algorithm and why it cannot run `p`.
    fn require(self, op: &'static str, p: &Conv2d, data_gradient: bool) -> Result<()> {
        if self.runs(p, data_gradient) {
            return Ok(());
        }
        Err(Error::invalid(
            op,
            "algorithm",
            format!(
                "{self:?} needs stride 1 (got {}x{}), AVX2 and FMA (this thread runs {}){}",
                p.stride_h,
                p.stride_w,
                Isa::current(),
                if data_gradient && self == CpuConvAlgo::ShiftedRows {
                    format!(
                        ", and for the data gradient every padding below the kernel's extent \
                         (got top/bottom {}/{} for height {}, left/right {}/{} for width {})",
                        p.pad_top, p.pad_bottom, p.r, p.pad_left, p.pad_right, p.s
                    )
                } else {
                    String::new()
                }
            ),
        ))
    }
}

/// The most images one GEMM may take on the CPU: as many as fit in
/// [`SCRATCH_FLOATS`], at least 1, at most `n`.
pub fn images_per_chunk(p: &Conv2d) -> usize {
    let per_image = (p.col_rows() + p.k) * p.out_h * p.out_w;
    (SCRATCH_FLOATS / per_image.max(1)).clamp(1, p.n.max(1))
}

/// Fills `col` (`[C*R*S, N*OH*OW]`, layout in the module docs) from `x`
/// (`[N, C, H, W]`). `col` is fully overwritten.
pub fn im2col(p: &Conv2d, x: &[f32], col: &mut [f32]) -> Result<()> {
    p.check_im2col(x.len(), col.len())?;
    im2col_unchecked(p, x, col);
    Ok(())
}

/// Adds the patches in `col` (`[C*R*S, N*OH*OW]`) back into image positions:
/// the adjoint of [`im2col`]. `x` (`[N, C, H, W]`) is fully overwritten.
/// Each pixel sums its contributions in `(r, s)` order, so the result is
/// deterministic.
pub fn col2im(p: &Conv2d, col: &[f32], x: &mut [f32]) -> Result<()> {
    p.check_col2im(col.len(), x.len())?;
    col2im_unchecked(p, col, x);
    Ok(())
}

/// Images per GEMM: enough that the group's `g*OH*OW` columns fill a few
/// dozen register-tile panels (a 13x13 map alone is 169 columns, a third of
/// a 32-wide panel short of six), at most [`images_per_chunk`] so that the
/// scratch bound holds. A function of the shape alone.
pub fn images_per_group(p: &Conv2d) -> usize {
    let ohw = (p.out_h * p.out_w).max(1);
    GROUP_COLUMNS.div_ceil(ohw).clamp(1, images_per_chunk(p))
}

/// Columns (`g*OH*OW`) a group's GEMM should have at least.
const GROUP_COLUMNS: usize = 256;

/// Most partial sums of `dw` that [`backward_filter`] keeps, one per slice
/// of the batch: eight balance two to eight threads, and the number is the
/// same on any thread count (it fixes the summation order).
const FILTER_SLICES: usize = 8;

/// Scratch buffers above this many floats (8 MiB) are freed after use
/// rather than kept by the thread (keras-cnn's groups need 0.1-1 MiB).
const SCRATCH_KEEP: usize = 1 << 21;

thread_local! {
    /// A thread's scratch: the column matrix and output buffer of one
    /// group, or the shifted rows' padded input and virtual output.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Lends `f` `len` floats of the thread's scratch (stale contents). Taking
/// the buffer out keeps a nested call (rayon running another task on this
/// thread while one waits) correct: it just allocates.
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = SCRATCH.take();
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let r = f(&mut v[..len]);
    if v.len() <= SCRATCH_KEEP {
        SCRATCH.set(v);
    }
    r
}

/// How a pass walks its groups of images: in parallel, one group per task
/// with single-threaded GEMMs, when there are enough groups to balance the
/// threads; otherwise one group after another, each GEMM parallel inside.
/// The GEMM's bits do not depend on how it is split, so neither do ours.
fn groups_in_parallel(groups: usize) -> bool {
    let threads = rayon::current_num_threads();
    threads > 1 && groups >= 2 * threads
}

/// The GEMM for one group: single-threaded inside a parallel group loop.
fn group_gemm(
    serial: bool,
    g: &Gemm,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    epi: Epilogue<&[f32]>,
) -> Result<()> {
    if serial {
        gemm_serial(g, a, b, c, epi)
    } else {
        gemm(g, a, b, c, epi)
    }
}

/// `y = act(conv(x, w) + bias)`: `x` `[N, C, H, W]`, `w` `[K, C, R, S]`,
/// `bias` `[K]` (optional), `y` `[N, K, OH, OW]` fully overwritten. The bias
/// and the activation run in the GEMM's epilogue.
///
/// Groups of [`images_per_group`] images: each group's column matrix
/// (`[C*R*S, g*OH*OW]`, built on its own thread) stays in L2 while its
/// GEMM packs it, and a group of one image writes its `[K, OH*OW]` result
/// straight into `y`. Every output element is one GEMM chain over
/// `C*R*S`, so the bits do not depend on the grouping either.
pub fn forward(
    p: &Conv2d,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
    y: &mut [f32],
) -> Result<()> {
    forward_with(CpuConvAlgo::select(p, false), p, x, w, bias, activation, y)
}

/// [`forward`] with algorithm `algo`; an error when it cannot run `p`
/// here ([`CpuConvAlgo::runs`]).
pub fn forward_with(
    algo: CpuConvAlgo,
    p: &Conv2d,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
    y: &mut [f32],
) -> Result<()> {
    p.check_forward(x.len(), w.len(), bias.map(|b| b.len()), y.len())?;
    algo.require("conv2d.forward", p, false)?;
    if p.n == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if algo == CpuConvAlgo::ShiftedRows {
        super::cpu_direct::forward(p, x, w, bias, activation, y);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if algo == CpuConvAlgo::ChannelVectors {
        super::cpu_channel_vectors::forward(p, x, w, bias, activation, y);
        return Ok(());
    }
    let epi = Epilogue {
        bias: bias.map_or(Bias::None, Bias::PerRow),
        activation,
    };
    let (crs, ohw) = (p.col_rows(), p.out_h * p.out_w);
    let (x_img, y_img) = (p.c * p.h * p.w, p.k * ohw);
    let g = images_per_group(p);
    let serial = groups_in_parallel(p.n.div_ceil(g));
    let one = |gi: usize, y: &mut [f32]| -> Result<()> {
        let q = p.with_batch(y.len() / y_img);
        let cols = q.col_cols();
        let x = &x[gi * g * x_img..][..q.n * x_img];
        let out_len = if q.n == 1 { 0 } else { p.k * cols };
        with_scratch(crs * cols + out_len, |buf| {
            let (col, tmp) = buf.split_at_mut(crs * cols);
            im2col_serial(&q, x, col);
            let gm = Gemm::new(p.k, cols, crs);
            if q.n == 1 {
                return group_gemm(serial, &gm, w, col, y, epi);
            }
            group_gemm(serial, &gm, w, col, tmp, epi)?;
            // [K, g*OH*OW] to the group's NCHW images.
            for (j, dst) in y.chunks_exact_mut(ohw).enumerate() {
                let (img, kk) = (j / p.k, j % p.k);
                dst.copy_from_slice(&tmp[kk * cols + img * ohw..][..ohw]);
            }
            Ok(())
        })
    };
    if serial {
        y.par_chunks_mut(g * y_img)
            .enumerate()
            .try_for_each(|(gi, y)| one(gi, y))
    } else {
        y.chunks_mut(g * y_img)
            .enumerate()
            .try_for_each(|(gi, y)| one(gi, y))
    }
}

/// `dx = col2im(w^T * dy)`: the gradient with respect to the input.
/// `dy` `[N, K, OH, OW]`, `w` `[K, C, R, S]`, `dx` `[N, C, H, W]` fully
/// overwritten. Groups of images as in [`forward`]; each element of the
/// column matrix is one GEMM chain over `K`, and [`col2im`]'s `(r, s)`
/// order adds them, whatever the grouping.
pub fn backward_data(p: &Conv2d, dy: &[f32], w: &[f32], dx: &mut [f32]) -> Result<()> {
    backward_data_with(CpuConvAlgo::select(p, true), p, dy, w, dx)
}

/// [`backward_data`] with algorithm `algo`; an error when it cannot run
/// `p` here ([`CpuConvAlgo::runs`]).
pub fn backward_data_with(
    algo: CpuConvAlgo,
    p: &Conv2d,
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    p.check_backward_data(dy.len(), w.len(), dx.len())?;
    algo.require("conv2d.backward_data", p, true)?;
    if p.n == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if algo == CpuConvAlgo::ShiftedRows {
        super::cpu_direct::backward_data(p, dy, w, dx);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if algo == CpuConvAlgo::ChannelVectors {
        super::cpu_channel_vectors::backward_data(p, dy, w, dx);
        return Ok(());
    }
    let (crs, ohw) = (p.col_rows(), p.out_h * p.out_w);
    let (x_img, y_img) = (p.c * p.h * p.w, p.k * ohw);
    let g = images_per_group(p);
    let serial = groups_in_parallel(p.n.div_ceil(g));
    let one = |gi: usize, dx: &mut [f32]| -> Result<()> {
        let q = p.with_batch(dx.len() / x_img);
        let cols = q.col_cols();
        let dy = &dy[gi * g * y_img..][..q.n * y_img];
        let dyt_len = if q.n == 1 { 0 } else { p.k * cols };
        with_scratch(crs * cols + dyt_len, |buf| {
            let (col, dyt) = buf.split_at_mut(crs * cols);
            // One image's dy is already [K, OH*OW].
            let dyt: &[f32] = if q.n == 1 {
                dy
            } else {
                gather_dy_serial(&q, dy, dyt);
                dyt
            };
            let gm = Gemm::new(crs, cols, p.k).transpose(true, false);
            group_gemm(serial, &gm, w, dyt, col, Epilogue::default())?;
            col2im_serial(&q, col, dx);
            Ok(())
        })
    };
    if serial {
        dx.par_chunks_mut(g * x_img)
            .enumerate()
            .try_for_each(|(gi, dx)| one(gi, dx))
    } else {
        dx.chunks_mut(g * x_img)
            .enumerate()
            .try_for_each(|(gi, dx)| one(gi, dx))
    }
}

/// `dw = sum over images of dy * col^T`: the gradient with respect to the
/// weights. `x` `[N, C, H, W]`, `dy` `[N, K, OH, OW]`, `dw` `[K, C, R, S]`
/// fully overwritten (zero for an empty batch).
///
/// The batch is cut into at most eight slices of whole groups
/// (fewer when their partial sums would not fit in [`SCRATCH_FLOATS`]);
/// each slice adds its groups' GEMMs into its own partial sum in order, and
/// the partial sums are added in slice order. Slices and groups follow from
/// the shape alone, so the order, and the bits, are the same on any thread
/// count.
pub fn backward_filter(p: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32]) -> Result<()> {
    backward_filter_with(CpuConvAlgo::select_filter(p), p, x, dy, dw)
}

/// [`backward_filter`] with algorithm `algo`; an error when it cannot run
/// `p` here ([`CpuConvAlgo::runs`]).
pub fn backward_filter_with(
    algo: CpuConvAlgo,
    p: &Conv2d,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) -> Result<()> {
    p.check_backward_filter(x.len(), dy.len(), dw.len())?;
    algo.require("conv2d.backward_filter", p, false)?;
    if p.n == 0 {
        dw.fill(0.0);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if algo == CpuConvAlgo::ShiftedRows {
        super::cpu_direct::backward_filter(p, x, dy, dw);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if algo == CpuConvAlgo::ChannelVectors {
        super::cpu_channel_vectors::backward_filter(p, x, dy, dw);
        return Ok(());
    }
    let (crs, ohw) = (p.col_rows(), p.out_h * p.out_w);
    let (x_img, y_img) = (p.c * p.h * p.w, p.k * ohw);
    let wl = p.w_len();
    let g = images_per_group(p);
    let groups = p.n.div_ceil(g);
    let slices = groups
        .min(FILTER_SLICES)
        .min((SCRATCH_FLOATS / wl.max(1)).max(1));
    let per_slice = groups.div_ceil(slices);
    // Slices with at least one group (the last ones may be empty).
    let slices = groups.div_ceil(per_slice);
    let threads = rayon::current_num_threads();
    let serial = threads > 1 && slices >= threads;
    // Slice `si`'s groups, added into `acc` (overwritten by the first).
    let slice = |si: usize, acc: &mut [f32]| -> Result<()> {
        let g0 = si * per_slice;
        for gi in g0..(g0 + per_slice).min(groups) {
            let n0 = gi * g;
            let q = p.with_batch(g.min(p.n - n0));
            let cols = q.col_cols();
            let x = &x[n0 * x_img..][..q.n * x_img];
            let dy = &dy[n0 * y_img..][..q.n * y_img];
            let dyt_len = if q.n == 1 { 0 } else { p.k * cols };
            with_scratch(crs * cols + dyt_len, |buf| {
                let (col, dyt) = buf.split_at_mut(crs * cols);
                im2col_serial(&q, x, col);
                let dyt: &[f32] = if q.n == 1 {
                    dy
                } else {
                    gather_dy_serial(&q, dy, dyt);
                    dyt
                };
                // beta = 0 on the slice's first group: acc is overwritten.
                let beta = if gi == g0 { 0.0 } else { 1.0 };
                let gm = Gemm::new(p.k, crs, cols)
                    .transpose(false, true)
                    .scale(1.0, beta);
                group_gemm(serial, &gm, dyt, col, acc, Epilogue::default())
            })?;
        }
        Ok(())
    };
    if slices == 1 {
        return slice(0, dw);
    }
    let mut partial = vec![0.0f32; (slices - 1) * wl];
    if serial {
        // Slice 0 sums straight into dw, the others into their partials.
        let mut parts: Vec<&mut [f32]> = std::iter::once(&mut *dw)
            .chain(partial.chunks_exact_mut(wl))
            .collect();
        parts
            .par_iter_mut()
            .enumerate()
            .try_for_each(|(si, acc)| slice(si, acc))?;
    } else {
        slice(0, dw)?;
        for (si, acc) in partial.chunks_exact_mut(wl).enumerate() {
            slice(si + 1, acc)?;
        }
    }
    for part in partial.chunks_exact(wl) {
        for (d, &v) in dw.iter_mut().zip(part) {
            *d += v;
        }
    }
    Ok(())
}

/// `dy` `[n, K, OH*OW]` to `[K, n*OH*OW]`, the column order of the col
/// matrix, on the calling thread.
fn gather_dy_serial(q: &Conv2d, dy: &[f32], dyt: &mut [f32]) {
    let ohw = q.out_h * q.out_w;
    debug_assert_eq!(dyt.len(), q.k * q.n * ohw);
    for (j, dst) in dyt.chunks_exact_mut(ohw).enumerate() {
        let (kk, img) = (j / q.n, j % q.n);
        dst.copy_from_slice(&dy[(img * q.k + kk) * ohw..][..ohw]);
    }
}

/// The outputs `o` in `0..out` whose padded input coordinate `o*stride +
/// tap` lies inside the image (`pad..pad + extent`), as a range `lo..hi`
/// (empty when none does). Outputs outside it read the zero padding.
fn inside(out: usize, stride: usize, tap: usize, pad: usize, extent: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(tap).div_ceil(stride);
    let hi = (pad + extent).saturating_sub(tap).div_ceil(stride).min(out);
    (lo.min(hi), hi)
}

/// Row `(c, r, s)` of one image's column block (`dst`, `OH*OW` long) from
/// that image's channel `c` (`plane`, `H*W`): zeros in the padding, the
/// rest copied a run of `x` per output row.
fn im2col_row(p: &Conv2d, plane: &[f32], r: usize, s: usize, dst: &mut [f32]) {
    let (ylo, yhi) = inside(p.out_h, p.stride_h, r, p.pad_top, p.h);
    let (xlo, xhi) = inside(p.out_w, p.stride_w, s, p.pad_left, p.w);
    for (oy, orow) in dst.chunks_exact_mut(p.out_w).enumerate() {
        if oy < ylo || oy >= yhi || xlo == xhi {
            orow.fill(0.0);
            continue;
        }
        let xrow = &plane[(oy * p.stride_h + r - p.pad_top) * p.w..][..p.w];
        let ix0 = xlo * p.stride_w + s - p.pad_left;
        orow[..xlo].fill(0.0);
        orow[xhi..].fill(0.0);
        let body = &mut orow[xlo..xhi];
        if p.stride_w == 1 {
            body.copy_from_slice(&xrow[ix0..][..body.len()]);
        } else {
            for (o, &v) in body.iter_mut().zip(xrow[ix0..].iter().step_by(p.stride_w)) {
                *o = v;
            }
        }
    }
}

/// `im2col` of a (small) group of images on the calling thread.
fn im2col_serial(p: &Conv2d, x: &[f32], col: &mut [f32]) {
    let (cols, hw, ohw) = (p.col_cols(), p.h * p.w, p.out_h * p.out_w);
    if cols == 0 {
        return;
    }
    for (row, dst) in col.chunks_exact_mut(cols).enumerate() {
        let (ch, r, s) = (row / (p.r * p.s), (row / p.s) % p.r, row % p.s);
        for (img, out) in dst.chunks_exact_mut(ohw).enumerate() {
            im2col_row(p, &x[(img * p.c + ch) * hw..][..hw], r, s, out);
        }
    }
}

/// `im2col` on a validated layer whose lengths have been checked.
fn im2col_unchecked(p: &Conv2d, x: &[f32], col: &mut [f32]) {
    let (cols, hw, ohw) = (p.col_cols(), p.h * p.w, p.out_h * p.out_w);
    if cols == 0 {
        return;
    }
    // One row per (c, r, s): rows are independent and long (N*OH*OW).
    col.par_chunks_mut(cols).enumerate().for_each(|(row, dst)| {
        let (ch, r, s) = (row / (p.r * p.s), (row / p.s) % p.r, row % p.s);
        for (img, out) in dst.chunks_exact_mut(ohw).enumerate() {
            im2col_row(p, &x[(img * p.c + ch) * hw..][..hw], r, s, out);
        }
    });
}

/// Plane `(img, ch)` of `col2im` (`plane`, `H*W`, overwritten): gathers
/// from its own `R*S` rows of `col` (`cols` columns), each pixel adding its
/// contributions in `(r, s)` order.
fn col2im_plane(p: &Conv2d, col: &[f32], cols: usize, img: usize, ch: usize, plane: &mut [f32]) {
    let ohw = p.out_h * p.out_w;
    plane.fill(0.0);
    for r in 0..p.r {
        let (ylo, yhi) = inside(p.out_h, p.stride_h, r, p.pad_top, p.h);
        for s in 0..p.s {
            let (xlo, xhi) = inside(p.out_w, p.stride_w, s, p.pad_left, p.w);
            if xlo == xhi {
                continue;
            }
            let row = (ch * p.r + r) * p.s + s;
            let src = &col[row * cols + img * ohw..][..ohw];
            for oy in ylo..yhi {
                let srow = &src[oy * p.out_w + xlo..][..xhi - xlo];
                let xrow = &mut plane[(oy * p.stride_h + r - p.pad_top) * p.w..][..p.w];
                let ix0 = xlo * p.stride_w + s - p.pad_left;
                if p.stride_w == 1 {
                    for (d, &v) in xrow[ix0..][..srow.len()].iter_mut().zip(srow) {
                        *d += v;
                    }
                } else {
                    for (d, &v) in xrow[ix0..].iter_mut().step_by(p.stride_w).zip(srow) {
                        *d += v;
                    }
                }
            }
        }
    }
}

/// `col2im` of a (small) group of images on the calling thread.
fn col2im_serial(p: &Conv2d, col: &[f32], x: &mut [f32]) {
    let (cols, hw) = (p.col_cols(), p.h * p.w);
    if cols == 0 {
        return;
    }
    for (pi, plane) in x.chunks_exact_mut(hw).enumerate() {
        col2im_plane(p, col, cols, pi / p.c, pi % p.c, plane);
    }
}

/// `col2im` on a validated layer whose lengths have been checked.
fn col2im_unchecked(p: &Conv2d, col: &[f32], x: &mut [f32]) {
    let (cols, hw) = (p.col_cols(), p.h * p.w);
    if cols == 0 {
        return;
    }
    // One task per (image, channel) plane: each plane gathers from its own
    // R*S rows of col, so no two tasks write the same pixel.
    x.par_chunks_mut(hw).enumerate().for_each(|(pi, plane)| {
        col2im_plane(p, col, cols, pi / p.c, pi % p.c, plane);
    });
}
