//! CPU max pooling: one rayon task per `(image, channel)` plane.

use rayon::prelude::*;

use super::MaxPool2d;
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
                forward_plane(p, &x[pi * hw..][..hw], yp, ap);
            }
        });
    Ok(())
}

/// Output elements a forward task covers at least (whole planes).
const PLANES_MIN_ELEMS: usize = 4096;

/// One plane of [`forward`]. The 2x2 windows of stride 2 that lie inside
/// the image (every window of a `valid` 2x2 pool, as in the seed networks)
/// take a straight-line path: four loads, three compares, no loop, no
/// division; any other window goes through [`window_max`]. Both keep the
/// same rule (first NaN in row-major order, else the first maximum).
#[inline]
fn forward_plane(p: &MaxPool2d, plane: &[f32], yp: &mut [f32], ap: &mut [u32]) {
    let fast = p.pool_h == 2 && p.pool_w == 2 && p.stride_h == 2 && p.stride_w == 2;
    let fast = fast && p.pad_top == 0 && p.pad_left == 0;
    for (oy, (yr, ar)) in yp
        .chunks_mut(p.out_w)
        .zip(ap.chunks_mut(p.out_w))
        .enumerate()
    {
        // Columns whose window lies inside the plane (all rows inside too).
        let inside = if fast && 2 * oy + 1 < p.h {
            (p.w / 2).min(p.out_w)
        } else {
            0
        };
        if inside > 0 {
            let i0 = 2 * oy * p.w;
            let (r0, r1) = (&plane[i0..][..2 * inside], &plane[i0 + p.w..][..2 * inside]);
            for (ox, (yv, av)) in yr[..inside].iter_mut().zip(&mut ar[..inside]).enumerate() {
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
                *yv = best;
                // validate() bounds H*W by 2^32, so the plane index fits.
                *av = (i0 + 2 * ox + k) as u32;
            }
        }
        for ox in inside..p.out_w {
            let (v, i) = window_max(p, plane, oy, ox);
            yr[ox] = v;
            ar[ox] = i as u32;
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
/// row-major output order, so the result is deterministic.
pub fn backward(p: &MaxPool2d, dy: &[f32], argmax: &[u32], dx: &mut [f32]) -> Result<()> {
    const OP: &str = "maxpool2d.backward";
    p.check_backward(dy.len(), argmax.len(), dx.len())?;
    let (hw, ohw) = (p.h * p.w, p.out_h * p.out_w);
    if let Some(i) = argmax.iter().position(|&a| a as usize >= hw) {
        return Err(Error::invalid(
            OP,
            "argmax",
            format!(
                "argmax[{i}] = {} is outside the {}x{} image plane (expected < {hw})",
                argmax[i], p.h, p.w
            ),
        ));
    }
    dx.par_chunks_mut(hw).enumerate().for_each(|(pi, plane)| {
        plane.fill(0.0);
        let dyp = &dy[pi * ohw..][..ohw];
        let ap = &argmax[pi * ohw..][..ohw];
        for (&g, &a) in dyp.iter().zip(ap) {
            plane[a as usize] += g;
        }
    });
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
