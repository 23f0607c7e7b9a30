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
    y.par_chunks_mut(ohw)
        .zip(argmax.par_chunks_mut(ohw))
        .enumerate()
        .for_each(|(pi, (yp, ap))| {
            let plane = &x[pi * hw..][..hw];
            for (j, (yv, av)) in yp.iter_mut().zip(ap.iter_mut()).enumerate() {
                let (v, i) = window_max(p, plane, j / p.out_w, j % p.out_w);
                *yv = v;
                // validate() bounds H*W by 2^32, so the plane index fits.
                *av = i as u32;
            }
        });
    Ok(())
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
