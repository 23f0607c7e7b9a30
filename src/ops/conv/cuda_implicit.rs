//! [`ConvAlgo::ImplicitGemm`](super::ConvAlgo::ImplicitGemm): the three
//! passes as GEMMs whose operand tiles are gathered from the NCHW tensors
//! by `kernels/conv_implicit.cu`, with no column matrix.
//!
//! - forward: `y [K, N*OH*OW] = act(W [K, C*R*S] * im2col(x) + bias)`, one
//!   GEMM over the whole batch (`n = N*OH*OW`, so a small output image does
//!   not leave most of a tile idle), written straight into NCHW `y`.
//! - backward data: `dx` as a transposed convolution, one GEMM per stride
//!   phase `(ay, ax)` (the input pixels with `iy % stride_h == ay`, `ix %
//!   stride_w == ax`): those pixels receive only the kernel taps `r ≡ (ay +
//!   pad_top) mod stride_h` (likewise `s`), so each phase gathers `dy`
//!   through its own taps, kernel flipped, and the taps that miss the stride
//!   grid are never visited. Every `dx` element is written once, by one
//!   thread: no atomics, no col2im. A is `W` rearranged per phase
//!   (`conv_igemm_dgrad_weights`, `w_len` floats of workspace).
//! - backward filter: `dW [K, C*R*S] = dy [K, N*OH*OW] * im2col(x)^T`, the
//!   `N*OH*OW` reduction split into [`wgrad_splits`] fixed ranges (by shape
//!   only) that write partial slabs into the workspace, added in split order
//!   by `conv_igemm_wgrad_reduce`; one split writes `dW` directly.
//!
//! Workspace: [`workspace_len`] floats, `w_len * splits`, for both backward
//! passes; forward takes none (and ignores the one it is given).

use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::super::Conv2d;
use crate::cuda::{CONV_IMPLICIT, CudaBackend};
use crate::error::{Error, Result};
use crate::ops::activation::Activation;
use crate::ops::gemm::Bias;

/// The geometry of one gathered GEMM of `kernels/conv_implicit.cu`
/// (`conv_igemm_gather`): forward, or one stride phase of backward data.
/// `#[repr(C)]`, mirrored field for field as `struct ConvGather` there,
/// whose comment gives the formulas; public so that a framework loading the
/// PTX directly can fill it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConvGather {
    /// Rows of C (output channels forward, input channels backward).
    pub m: i64,
    /// Columns of C: the output pixels of the batch (forward) or the input
    /// pixels of one stride phase (backward data).
    pub n: i64,
    /// The GEMM's inner dimension: `C*R*S` forward, `K * taps` backward.
    pub kdim: i64,
    /// Leading dimension of A (row-major `[m, kdim]`).
    pub lda: i64,
    /// Columns per image.
    pub cols_per_img: i64,
    /// Columns per row of a column image.
    pub qw: i64,
    /// Floats per image of the gathered tensor.
    pub in_img: i64,
    /// Floats per channel plane of the gathered tensor.
    pub in_plane: i64,
    /// Floats per row of the gathered tensor.
    pub in_row: i64,
    /// Height of the gathered tensor.
    pub in_h: i64,
    /// Width of the gathered tensor.
    pub in_w: i64,
    /// A column's origin row is `qy * y_mul + y_off`.
    pub y_mul: i64,
    /// See `y_mul`.
    pub y_off: i64,
    /// A column's origin column is `qx * x_mul + x_off`.
    pub x_mul: i64,
    /// See `x_mul`.
    pub x_off: i64,
    /// Kernel rows of the tap decomposition `k = (a * kb + b) * ke + e`.
    pub kb: i64,
    /// Kernel columns of the tap decomposition.
    pub ke: i64,
    /// +1 (forward: `iy = origin + b`) or -1 (backward: `oy = origin - b`).
    pub dir: i64,
    /// Floats per image of the output.
    pub out_img: i64,
    /// Floats per channel plane of the output (C's row stride).
    pub out_plane: i64,
    /// Floats per row of the output.
    pub out_row: i64,
    /// A column's output row is `qy * oy_mul + oy_off`.
    pub oy_mul: i64,
    /// See `oy_mul`.
    pub oy_off: i64,
    /// A column's output column is `qx * ox_mul + ox_off`.
    pub ox_mul: i64,
    /// See `ox_mul`.
    pub ox_off: i64,
}

// SAFETY: `ConvGather` is `#[repr(C)]` with only i64 fields: plain old data,
// mirrored as `struct ConvGather` in kernels/conv_implicit.cu (same size
// asserted there and here).
unsafe impl DeviceRepr for ConvGather {}
const _: () = assert!(std::mem::size_of::<ConvGather>() == 200);

/// The block tile (`IG_BM` = `IG_BN` in kernels/conv_implicit.cu).
const TILE: usize = 64;
/// The k depth of a tile (`IG_BK`): wgrad's splits start at its multiples.
const BK: usize = 16;
/// Blocks the backward-filter split aims for: about two waves of 132 SMs.
/// A constant, not the device's SM count, so that dW's summation order
/// depends on the shape alone.
const WGRAD_TARGET_BLOCKS: usize = 256;
/// The fewest k tiles (of [`BK`] pixels) a split gets, so that a slab's
/// write and re-read stay small beside its products.
const WGRAD_MIN_SPLIT_TILES: usize = 32;
/// The most splits (bounds the workspace at 64 copies of dW).
const WGRAD_MAX_SPLITS: usize = 64;

/// Whether the kernels' 32-bit extents hold `p`: every extent, padded
/// extent and the batch below `i32::MAX` (offsets are 64-bit).
pub fn fits(p: &Conv2d) -> bool {
    let lim = i32::MAX as usize / 2;
    [
        p.n,
        p.c,
        p.k,
        p.h + p.pad_top + p.pad_bottom,
        p.w + p.pad_left + p.pad_right,
        p.r,
        p.s,
        p.out_h * p.stride_h,
        p.out_w * p.stride_w,
    ]
    .iter()
    .all(|&v| v < lim)
}

/// Splits of backward filter's `N*OH*OW` reduction and the pixels each
/// covers (a multiple of 16; the last may be shorter, none is empty):
/// enough blocks to fill a large device, each split at least 512 pixels,
/// at most 64 splits. A function of the shape only.
pub fn wgrad_splits(p: &Conv2d) -> (usize, usize) {
    let pixels = p.n * p.out_h * p.out_w;
    let ktiles = pixels.div_ceil(BK).max(1);
    let tiles = p.k.div_ceil(TILE) * p.col_rows().div_ceil(TILE);
    let want = WGRAD_TARGET_BLOCKS.div_ceil(tiles.max(1));
    let splits = want
        .min(ktiles / WGRAD_MIN_SPLIT_TILES)
        .clamp(1, WGRAD_MAX_SPLITS);
    let chunk = ktiles.div_ceil(splits) * BK;
    // Rounding chunk up may leave the last splits empty: drop them.
    (pixels.div_ceil(chunk).max(1), chunk)
}

/// Floats of workspace the implicit passes take: backward data's
/// rearranged weights (`w_len`) and backward filter's partial slabs (`w_len`
/// per split when it splits), in one buffer.
pub fn workspace_len(p: &Conv2d) -> usize {
    p.w_len() * wgrad_splits(p).0
}

/// Checks that the kernels' extents hold `p` and, for the passes that use
/// one, the workspace's length.
fn check(op: &'static str, p: &Conv2d, workspace: Option<usize>) -> Result<()> {
    if !fits(p) {
        return Err(Error::invalid(
            op,
            "shape",
            format!(
                "implicit_gemm needs every extent below 2^30 (32-bit indices); got {p:?}: \
                 use ConvAlgo::Im2colGemm"
            ),
        ));
    }
    let need = workspace_len(p);
    if let Some(workspace) = workspace.filter(|&w| w < need) {
        return Err(Error::shape(
            op,
            "workspace length",
            format!(
                "at least workspace_len_with(ImplicitGemm) = {need} floats (w_len {} x {} dW splits)",
                p.w_len(),
                wgrad_splits(p).0
            ),
            workspace,
        ));
    }
    Ok(())
}

/// The launch shape of the tiled kernels: (column tiles, row tiles, z).
fn tiled_config(m: usize, n: usize, z: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(TILE).clamp(1, i32::MAX as usize) as u32,
            m.div_ceil(TILE).clamp(1, 65535) as u32,
            z.clamp(1, 65535) as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches `conv_igemm_gather` for `g`.
///
/// # Safety
/// A holds `g.m x g.kdim` (row stride `g.lda`), `src` every element the
/// geometry reads and `out` every element it writes (see `ConvGather`),
/// `bias` (when given) `g.m` floats.
unsafe fn gather(
    gpu: &CudaBackend,
    g: &ConvGather,
    activation: Activation,
    bias: Option<&CudaView<'_, f32>>,
    a: &CudaView<'_, f32>,
    src: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    const NAME: &str = "conv_igemm_gather";
    let f = gpu.function(&CONV_IMPLICIT, NAME)?;
    let bias_kind = bias.map_or(Bias::None, Bias::PerRow).kernel_kind();
    let (act_kind, act_alpha) = (activation.kind as u32, activation.alpha);
    let null = 0u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(g)
        .arg(&act_kind)
        .arg(&act_alpha)
        .arg(&bias_kind)
        .arg(a)
        .arg(src)
        .arg(out);
    match bias {
        Some(v) => b.arg(v),
        // Never dereferenced: the kernel reads the bias only for BIAS_PER_ROW.
        None => b.arg(&null),
    };
    // SAFETY: per the caller.
    let r = unsafe { b.launch(tiled_config(g.m as usize, g.n as usize, 1)) };
    gpu.launched(NAME, r)
}

/// The forward geometry (see `ConvGather`).
fn forward_geometry(p: &Conv2d) -> ConvGather {
    let i = |v: usize| v as i64;
    let ohw = p.out_h * p.out_w;
    ConvGather {
        m: i(p.k),
        n: i(p.n * ohw),
        kdim: i(p.col_rows()),
        lda: i(p.col_rows()),
        cols_per_img: i(ohw),
        qw: i(p.out_w),
        in_img: i(p.c * p.h * p.w),
        in_plane: i(p.h * p.w),
        in_row: i(p.w),
        in_h: i(p.h),
        in_w: i(p.w),
        y_mul: i(p.stride_h),
        y_off: -i(p.pad_top),
        x_mul: i(p.stride_w),
        x_off: -i(p.pad_left),
        kb: i(p.r),
        ke: i(p.s),
        dir: 1,
        out_img: i(p.k * ohw),
        out_plane: i(ohw),
        out_row: i(p.out_w),
        oy_mul: 1,
        oy_off: 0,
        ox_mul: 1,
        ox_off: 0,
    }
}

/// Taps of a kernel of `len` rows in phase `r0` (those `r % stride == r0`).
fn phase_taps(len: usize, stride: usize, r0: usize) -> usize {
    if r0 < len {
        (len - r0).div_ceil(stride)
    } else {
        0
    }
}

/// One stride phase of backward data: its geometry and where its A starts
/// in the rearranged weights (`conv_igemm_dgrad_weights`' layout).
struct Phase {
    g: ConvGather,
    a_offset: usize,
}

/// The phases `(ay, ax)` of backward data that hold input pixels.
fn backward_data_phases(p: &Conv2d) -> Vec<Phase> {
    let i = |v: usize| v as i64;
    let (sh, sw) = (p.stride_h, p.stride_w);
    let ohw = p.out_h * p.out_w;
    let mut phases = Vec::new();
    for ay in 0..sh.min(p.h) {
        let (r0, dy0) = ((ay + p.pad_top) % sh, (ay + p.pad_top) / sh);
        let tr = phase_taps(p.r, sh, r0);
        let qh = (p.h - ay).div_ceil(sh);
        for ax in 0..sw.min(p.w) {
            let (s0, dx0) = ((ax + p.pad_left) % sw, (ax + p.pad_left) / sw);
            let ts = phase_taps(p.s, sw, s0);
            let qw = (p.w - ax).div_ceil(sw);
            // The kernel's layout: phases (r0, s0) row-major, each [C, K*tr*ts].
            let rows_before: usize = (0..r0).map(|q| phase_taps(p.r, sh, q)).sum();
            let cols_before: usize = (0..s0).map(|q| phase_taps(p.s, sw, q)).sum();
            let a_offset = p.c * p.k * (rows_before * p.s + tr * cols_before);
            let kdim = p.k * tr * ts;
            let g = ConvGather {
                m: i(p.c),
                n: i(p.n * qh * qw),
                kdim: i(kdim),
                lda: i(kdim.max(1)),
                cols_per_img: i(qh * qw),
                qw: i(qw),
                in_img: i(p.k * ohw),
                in_plane: i(ohw),
                in_row: i(p.out_w),
                in_h: i(p.out_h),
                in_w: i(p.out_w),
                y_mul: 1,
                y_off: i(dy0),
                x_mul: 1,
                x_off: i(dx0),
                // No taps (kdim 0): any positive sizes, never walked.
                kb: i(tr.max(1)),
                ke: i(ts.max(1)),
                dir: -1,
                out_img: i(p.c * p.h * p.w),
                out_plane: i(p.h * p.w),
                out_row: i(p.w),
                oy_mul: i(sh),
                oy_off: i(ay),
                ox_mul: i(sw),
                ox_off: i(ax),
            };
            phases.push(Phase { g, a_offset });
        }
    }
    phases
}

/// Forward (checked by the caller: lengths valid, `p.n > 0`).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    gpu: &CudaBackend,
    op: &'static str,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    bias: Option<&CudaView<'_, f32>>,
    activation: Activation,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check(op, p, None)?;
    let g = forward_geometry(p);
    // SAFETY: A = w is K x CRS (lda CRS); the geometry reads x at
    // img*CHW + c*HW + iy*W + ix with every index in range (padding
    // masked) and writes y at img*K*OHW + k*OHW + oy*OW + ox, each element
    // of y once; bias has K floats (checked by the caller).
    unsafe { gather(gpu, &g, activation, bias, w, x, y) }
}

/// Backward data (checked by the caller: lengths valid, `p.n > 0`).
pub(super) fn backward_data(
    gpu: &CudaBackend,
    op: &'static str,
    p: &Conv2d,
    dy: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check(op, p, Some(workspace.len()))?;
    let mut wt = workspace.slice_mut(..p.w_len());
    const NAME: &str = "conv_igemm_dgrad_weights";
    let f = gpu.function(&CONV_IMPLICIT, NAME)?;
    // SAFETY: the kernel reads w[..w_len] and writes a permutation of it
    // into wt[..w_len].
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(w)
            .arg(&mut wt)
            .launch(gpu.elementwise_config(p.w_len()))
    };
    gpu.launched(NAME, r)?;
    for ph in backward_data_phases(p) {
        let a = wt.slice(ph.a_offset..);
        // SAFETY: the phase's A ([C, K*tr*ts] at a_offset) lies inside wt;
        // the geometry reads dy at img*K*OHW + k*OHW + oy*OW + ox with
        // every index in range (masked), and writes dx at img*CHW + c*HW +
        // (qy*sh + ay)*W + qx*sw + ax < x_len; the phases partition dx's
        // pixels, so each element of dx is written once.
        unsafe { gather(gpu, &ph.g, Activation::LINEAR, None, &a, dy, dx)? };
    }
    Ok(())
}

/// Backward filter (checked by the caller: lengths valid, `p.n > 0`).
pub(super) fn backward_filter(
    gpu: &CudaBackend,
    op: &'static str,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dw: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check(op, p, Some(workspace.len()))?;
    let (splits, chunk) = wgrad_splits(p);
    const NAME: &str = "conv_igemm_wgrad";
    let f = gpu.function(&CONV_IMPLICIT, NAME)?;
    let (splits_, chunk_) = (splits as u64, chunk as u64);
    let cfg = tiled_config(p.k, p.col_rows(), splits);
    let launch = |out: &mut CudaViewMut<'_, f32>| {
        // SAFETY: the kernel reads x and dy inside their lengths (masked)
        // and writes out[z*w_len + k*CRS + crs] for z < splits, inside out
        // (w_len * splits floats).
        let r = unsafe {
            gpu.stream()
                .launch_builder(&f)
                .arg(p)
                .arg(x)
                .arg(dy)
                .arg(out)
                .arg(&splits_)
                .arg(&chunk_)
                .launch(cfg)
        };
        gpu.launched(NAME, r)
    };
    if splits == 1 {
        return launch(dw);
    }
    let mut slabs = workspace.slice_mut(..splits * p.w_len());
    launch(&mut slabs)?;
    const REDUCE: &str = "conv_igemm_wgrad_reduce";
    let f = gpu.function(&CONV_IMPLICIT, REDUCE)?;
    let len = p.w_len() as u64;
    // SAFETY: reads slabs[..splits*w_len], writes dw[..w_len].
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(dw)
            .arg(&slabs.as_view())
            .arg(&len)
            .arg(&splits_)
            .launch(gpu.elementwise_config(p.w_len()))
    };
    gpu.launched(REDUCE, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::Padding;

    /// The phases partition dx's pixels, and their A blocks tile the
    /// rearranged weights exactly (every tap in one phase).
    #[test]
    fn phases_partition_pixels_and_taps() {
        for (h, w, r, s, sh, sw, pad) in [
            (7, 9, 3, 3, 2, 2, Padding::Same),
            (5, 5, 5, 5, 3, 2, Padding::Same),
            (8, 6, 1, 3, 3, 1, Padding::Valid),
            (2, 2, 1, 1, 3, 3, Padding::Same),
        ] {
            let p = Conv2d::new([2, 3, h, w], 4, [r, s], [sh, sw], pad).unwrap();
            let ph = backward_data_phases(&p);
            let pixels: i64 = ph.iter().map(|f| f.g.n).sum();
            assert_eq!(pixels as usize, p.n * h * w, "{p:?}");
            let taps: i64 = ph
                .iter()
                .filter(|f| f.g.kdim > 0)
                .map(|f| f.g.kdim * f.g.m)
                .sum();
            // Phases sharing (r0, s0) cannot happen: (ay + pad) % stride is
            // a bijection, so the blocks are distinct and sum to w_len
            // when every phase has pixels.
            if h >= sh && w >= sw {
                assert_eq!(taps as usize, p.w_len(), "{p:?}");
            }
            for f in &ph {
                assert!(f.a_offset + (f.g.m * f.g.kdim) as usize <= p.w_len());
            }
        }
    }

    #[test]
    fn wgrad_splits_cover_the_pixels_in_non_empty_ranges() {
        for (n, c, hw, k) in [
            (1, 1, 1, 1),
            (128, 32, 30, 32),
            (32, 64, 13, 64),
            (3, 5, 7, 2),
        ] {
            let p = Conv2d::new([n, c, hw, hw], k, [1, 1], [1, 1], Padding::Valid).unwrap();
            let (splits, chunk) = wgrad_splits(&p);
            let pixels = n * hw * hw;
            assert!((1..=WGRAD_MAX_SPLITS).contains(&splits));
            assert_eq!(chunk % BK, 0);
            assert!(splits * chunk >= pixels, "{p:?}: covers");
            assert!(
                (splits - 1) * chunk < pixels.max(1),
                "{p:?}: last non-empty"
            );
        }
    }
}
