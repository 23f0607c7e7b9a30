//! CPU convolution: im2col, one GEMM per chunk of images, col2im.
//!
//! The column matrix of `N` images is `[C*R*S, N*OH*OW]`, row-major:
//! row `(c*R + r)*S + s`, column `(img*OH + oy)*OW + ox` holds
//! `x[img, c, oy*stride_h + r - pad_top, ox*stride_w + s - pad_left]` (0 in
//! the padding). Putting every image's pixels side by side in one row makes
//! the forward pass a single GEMM `W[K, CRS] * col[CRS, N*OH*OW]` whose `n`
//! is the whole batch's pixel count: large even for deep layers with small
//! feature maps, which is what keeps a GEMM efficient. The price is a
//! transpose between `[K, N*OH*OW]` and NCHW, which costs `1/(C*R*S)` of the
//! GEMM.
//!
//! On the CPU the batch goes through in chunks of [`images_per_chunk`]
//! images, because the column matrix of a whole batch is `C*R*S` times
//! larger than the input (batch 128, 128 channels, 32x32, 3x3: 600 MB);
//! a chunk's scratch stays under [`SCRATCH_FLOATS`]. The chunk size depends
//! only on the layer's shape, so results are the same on any thread count.

use rayon::prelude::*;

use super::Conv2d;
use crate::error::Result;
use crate::ops::activation::Activation;
use crate::ops::gemm::cpu::gemm;
use crate::ops::gemm::{Bias, Epilogue, Gemm};

/// Scratch floats (column matrix plus the `[K, n*OH*OW]` transpose buffer)
/// one chunk of images may use: 32 MiB. Large enough that a chunk's GEMM
/// has thousands of columns, small enough for any machine.
pub const SCRATCH_FLOATS: usize = 1 << 23;

/// Images processed per GEMM on the CPU: as many as fit in
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

/// `y = act(conv(x, w) + bias)`: `x` `[N, C, H, W]`, `w` `[K, C, R, S]`,
/// `bias` `[K]` (optional), `y` `[N, K, OH, OW]` fully overwritten. The bias
/// and the activation run in the GEMM's epilogue.
pub fn forward(
    p: &Conv2d,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
    y: &mut [f32],
) -> Result<()> {
    p.check_forward(x.len(), w.len(), bias.map(|b| b.len()), y.len())?;
    if p.n == 0 {
        return Ok(());
    }
    let epi = Epilogue {
        bias: bias.map_or(Bias::None, Bias::PerRow),
        activation,
    };
    let (crs, ohw) = (p.col_rows(), p.out_h * p.out_w);
    let (x_img, y_img) = (p.c * p.h * p.w, p.k * ohw);
    let chunk = images_per_chunk(p);
    let mut col = vec![0.0f32; crs * chunk * ohw];
    let mut tmp = vec![0.0f32; p.k * chunk * ohw];
    for n0 in (0..p.n).step_by(chunk) {
        let q = p.with_batch(chunk.min(p.n - n0));
        let cols = q.col_cols();
        let col = &mut col[..crs * cols];
        let tmp = &mut tmp[..p.k * cols];
        im2col_unchecked(&q, &x[n0 * x_img..(n0 + q.n) * x_img], col);
        gemm(&Gemm::new(p.k, cols, crs), w, col, tmp, epi)?;
        let y = &mut y[n0 * y_img..(n0 + q.n) * y_img];
        y.par_chunks_mut(ohw).enumerate().for_each(|(j, dst)| {
            let (img, kk) = (j / p.k, j % p.k);
            dst.copy_from_slice(&tmp[kk * cols + img * ohw..][..ohw]);
        });
    }
    Ok(())
}

/// `dx = col2im(w^T * dy)`: the gradient with respect to the input.
/// `dy` `[N, K, OH, OW]`, `w` `[K, C, R, S]`, `dx` `[N, C, H, W]` fully
/// overwritten.
pub fn backward_data(p: &Conv2d, dy: &[f32], w: &[f32], dx: &mut [f32]) -> Result<()> {
    p.check_backward_data(dy.len(), w.len(), dx.len())?;
    if p.n == 0 {
        return Ok(());
    }
    let (crs, ohw) = (p.col_rows(), p.out_h * p.out_w);
    let (x_img, y_img) = (p.c * p.h * p.w, p.k * ohw);
    let chunk = images_per_chunk(p);
    let mut col = vec![0.0f32; crs * chunk * ohw];
    let mut dyt = vec![0.0f32; p.k * chunk * ohw];
    for n0 in (0..p.n).step_by(chunk) {
        let q = p.with_batch(chunk.min(p.n - n0));
        let cols = q.col_cols();
        let col = &mut col[..crs * cols];
        let dyt = &mut dyt[..p.k * cols];
        gather_dy(&q, &dy[n0 * y_img..(n0 + q.n) * y_img], dyt);
        let g = Gemm::new(crs, cols, p.k).transpose(true, false);
        gemm(&g, w, dyt, col, Epilogue::default())?;
        col2im_unchecked(&q, col, &mut dx[n0 * x_img..(n0 + q.n) * x_img]);
    }
    Ok(())
}

/// `dw = sum over images of dy * col^T`: the gradient with respect to the
/// weights. `x` `[N, C, H, W]`, `dy` `[N, K, OH, OW]`, `dw` `[K, C, R, S]`
/// fully overwritten (zero for an empty batch).
///
/// The sum runs over chunks of images in order, each chunk's part summed
/// inside one GEMM, so the order is fixed by the shape alone.
pub fn backward_filter(p: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32]) -> Result<()> {
    p.check_backward_filter(x.len(), dy.len(), dw.len())?;
    if p.n == 0 {
        dw.fill(0.0);
        return Ok(());
    }
    let (crs, ohw) = (p.col_rows(), p.out_h * p.out_w);
    let (x_img, y_img) = (p.c * p.h * p.w, p.k * ohw);
    let chunk = images_per_chunk(p);
    let mut col = vec![0.0f32; crs * chunk * ohw];
    let mut dyt = vec![0.0f32; p.k * chunk * ohw];
    for n0 in (0..p.n).step_by(chunk) {
        let q = p.with_batch(chunk.min(p.n - n0));
        let cols = q.col_cols();
        let col = &mut col[..crs * cols];
        let dyt = &mut dyt[..p.k * cols];
        im2col_unchecked(&q, &x[n0 * x_img..(n0 + q.n) * x_img], col);
        gather_dy(&q, &dy[n0 * y_img..(n0 + q.n) * y_img], dyt);
        // beta = 0 on the first chunk: dw is overwritten, never read.
        let beta = if n0 == 0 { 0.0 } else { 1.0 };
        let g = Gemm::new(p.k, crs, cols)
            .transpose(false, true)
            .scale(1.0, beta);
        gemm(&g, dyt, col, dw, Epilogue::default())?;
    }
    Ok(())
}

/// `dy` `[n, K, OH*OW]` to `[K, n*OH*OW]`, the column order of the col matrix.
fn gather_dy(q: &Conv2d, dy: &[f32], dyt: &mut [f32]) {
    let ohw = q.out_h * q.out_w;
    let cols = q.n * ohw;
    dyt.par_chunks_mut(ohw).enumerate().for_each(|(j, dst)| {
        let (kk, img) = (j / q.n, j % q.n);
        dst.copy_from_slice(&dy[(img * q.k + kk) * ohw..][..ohw]);
    });
    debug_assert_eq!(dyt.len(), q.k * cols);
}

/// `im2col` on a validated layer whose lengths have been checked.
fn im2col_unchecked(p: &Conv2d, x: &[f32], col: &mut [f32]) {
    let cols = p.col_cols();
    if cols == 0 {
        return;
    }
    let (hw, ohw) = (p.h * p.w, p.out_h * p.out_w);
    // One row per (c, r, s): rows are independent and long (N*OH*OW).
    col.par_chunks_mut(cols).enumerate().for_each(|(row, dst)| {
        let s = row % p.s;
        let r = (row / p.s) % p.r;
        let ch = row / (p.r * p.s);
        for (img, out) in dst.chunks_mut(ohw).enumerate() {
            let plane = &x[(img * p.c + ch) * hw..][..hw];
            for (oy, orow) in out.chunks_mut(p.out_w).enumerate() {
                // Padded coordinates are never negative, so the pad test is `< pad_top`.
                let iy = oy * p.stride_h + r;
                if iy < p.pad_top || iy - p.pad_top >= p.h {
                    orow.fill(0.0);
                    continue;
                }
                let xrow = &plane[(iy - p.pad_top) * p.w..][..p.w];
                for (ox, o) in orow.iter_mut().enumerate() {
                    let ix = ox * p.stride_w + s;
                    *o = if ix < p.pad_left || ix - p.pad_left >= p.w {
                        0.0
                    } else {
                        xrow[ix - p.pad_left]
                    };
                }
            }
        }
    });
}

/// `col2im` on a validated layer whose lengths have been checked.
fn col2im_unchecked(p: &Conv2d, col: &[f32], x: &mut [f32]) {
    let cols = p.col_cols();
    if cols == 0 {
        return;
    }
    let (hw, ohw) = (p.h * p.w, p.out_h * p.out_w);
    // One task per (image, channel) plane: each plane gathers from its own
    // R*S rows of col, so no two tasks write the same pixel.
    x.par_chunks_mut(hw).enumerate().for_each(|(pi, plane)| {
        let (img, ch) = (pi / p.c, pi % p.c);
        plane.fill(0.0);
        for r in 0..p.r {
            for s in 0..p.s {
                let row = (ch * p.r + r) * p.s + s;
                let src = &col[row * cols + img * ohw..][..ohw];
                for (oy, srow) in src.chunks(p.out_w).enumerate() {
                    let iy = oy * p.stride_h + r;
                    if iy < p.pad_top || iy - p.pad_top >= p.h {
                        continue;
                    }
                    let xrow = &mut plane[(iy - p.pad_top) * p.w..][..p.w];
                    for (ox, &v) in srow.iter().enumerate() {
                        let ix = ox * p.stride_w + s;
                        if ix >= p.pad_left && ix - p.pad_left < p.w {
                            xrow[ix - p.pad_left] += v;
                        }
                    }
                }
            }
        }
    });
}
