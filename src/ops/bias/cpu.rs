//! CPU bias add, bias gradient and sum reductions.

use rayon::prelude::*;

use super::{BiasShape, REDUCE_CHUNK};
use crate::cpu_isa::Isa;
use crate::error::Result;
use crate::ops::lanes::{LANES, Term, add_run, fold};

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
/// The samples are cut into chunks of [`BiasShape::samples_per_chunk`];
/// within a chunk each channel's contiguous run of `spatial` elements adds
/// into 32 interleaved f64 lanes (`ops::lanes`: for dense shapes, one
/// element per run, this is plain index order), a chunk's lanes are added
/// in lane order, and the chunk sums in chunk order, in f64, then rounded
/// once to f32. The order depends on the shape alone: the same bits on any
/// thread count and at every [`Isa`] level.
pub fn backward(p: &BiasShape, dy: &[f32], db: &mut [f32]) -> Result<()> {
    const OP: &str = "bias.backward";
    p.check_x(OP, "dy", dy.len())?;
    p.check_b(OP, "db", db.len())?;
    if p.c == 0 {
        return Ok(());
    }
    let (c, sp) = (p.c, p.spatial);
    let per_chunk = p.samples_per_chunk() * c * sp;
    let isa = Isa::current();
    let partials: Vec<Vec<f64>> = if per_chunk == 0 {
        Vec::new()
    } else {
        dy.par_chunks(per_chunk)
            .map(|chunk| chunk_sums(isa, c, sp, chunk))
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

/// One chunk's per-channel sums at level `isa` (see [`backward`] for the
/// order; `ops::lanes::add_run` gives the same bits at every level).
fn chunk_sums(isa: Isa, c: usize, sp: usize, chunk: &[f32]) -> Vec<f64> {
    if sp == 1 {
        // Dense: rows of `c`, one accumulator per column, in row order.
        let mut acc = vec![0.0f64; c];
        for row in chunk.chunks(c) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        return acc;
    }
    let mut acc = vec![[[0.0f64; LANES]; 2]; c];
    for sample in chunk.chunks(c * sp) {
        for (a, run) in acc.iter_mut().zip(sample.chunks(sp)) {
            add_run(isa, Term::Sum, a, run, &[]);
        }
    }
    acc.iter().map(|a| fold(&a[0])).collect()
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
