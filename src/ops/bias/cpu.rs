//! CPU bias add, bias gradient and sum reductions.

use rayon::prelude::*;

use super::{BiasShape, REDUCE_CHUNK};
use crate::error::Result;

/// `y[i, ch, s] = x[i, ch, s] + b[ch]`, out of place; `y` is fully overwritten.
pub fn add(p: &BiasShape, x: &[f32], b: &[f32], y: &mut [f32]) -> Result<()> {
    const OP: &str = "bias.add";
    p.check_x(OP, "x", x.len())?;
    p.check_b(OP, "b", b.len())?;
    p.check_x(OP, "y", y.len())?;
    if p.is_empty() {
        return Ok(());
    }
    let sp = p.spatial;
    y.par_chunks_mut(p.c * sp)
        .zip(x.par_chunks(p.c * sp))
        .for_each(|(yr, xr)| {
            for ((yc, xc), &bc) in yr.chunks_mut(sp).zip(xr.chunks(sp)).zip(b) {
                for (yv, &xv) in yc.iter_mut().zip(xc) {
                    *yv = xv + bc;
                }
            }
        });
    Ok(())
}

/// `x[i, ch, s] += b[ch]`, in place.
pub fn add_inplace(p: &BiasShape, x: &mut [f32], b: &[f32]) -> Result<()> {
    const OP: &str = "bias.add_inplace";
    p.check_x(OP, "x", x.len())?;
    p.check_b(OP, "b", b.len())?;
    if p.is_empty() {
        return Ok(());
    }
    let sp = p.spatial;
    x.par_chunks_mut(p.c * sp).for_each(|xr| {
        for (xc, &bc) in xr.chunks_mut(sp).zip(b) {
            for v in xc {
                *v += bc;
            }
        }
    });
    Ok(())
}

/// The bias gradient `db[ch] = sum over i, s of dy[i, ch, s]`; `db` is
/// overwritten (not accumulated into).
///
/// The samples are cut into chunks of [`BiasShape::samples_per_chunk`]; each
/// chunk sums its channels in f64 in index order, and the chunk sums are
/// added in chunk order in f64, then rounded once to f32.
pub fn backward(p: &BiasShape, dy: &[f32], db: &mut [f32]) -> Result<()> {
    const OP: &str = "bias.backward";
    p.check_x(OP, "dy", dy.len())?;
    p.check_b(OP, "db", db.len())?;
    if p.c == 0 {
        return Ok(());
    }
    let (c, sp) = (p.c, p.spatial);
    let per_chunk = p.samples_per_chunk() * c * sp;
    let partials: Vec<Vec<f64>> = if per_chunk == 0 {
        Vec::new()
    } else {
        dy.par_chunks(per_chunk)
            .map(|chunk| {
                let mut acc = vec![0.0f64; c];
                for sample in chunk.chunks(c * sp) {
                    for (a, ch) in acc.iter_mut().zip(sample.chunks(sp)) {
                        for &v in ch {
                            *a += v as f64;
                        }
                    }
                }
                acc
            })
            .collect()
    };
    let mut total = vec![0.0f64; c];
    for part in &partials {
        for (t, &v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    for (d, t) in db.iter_mut().zip(total) {
        *d = t as f32;
    }
    Ok(())
}

/// `sum of f(x[i])` in f64, deterministic: chunks of [`REDUCE_CHUNK`]
/// elements summed in index order, chunk sums combined in chunk order.
/// NaN anywhere gives NaN. The building block of [`sum`] and [`sum_squares`].
pub fn sum_by(x: &[f32], f: impl Fn(f32) -> f64 + Sync) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(REDUCE_CHUNK)
        .map(|chunk| chunk.iter().map(|&v| f(v)).sum::<f64>())
        .collect();
    partials.iter().sum()
}

/// `sum(x)` in f64 (see [`sum_by`] for the order of summation).
pub fn sum(x: &[f32]) -> f64 {
    sum_by(x, |v| v as f64)
}

/// `sum(x^2)` in f64, squares taken in f64 (see [`sum_by`]); the
/// optimizer's gradient norm is its square root.
pub fn sum_squares(x: &[f32]) -> f64 {
    sum_by(x, |v| {
        let v = v as f64;
        v * v
    })
}
