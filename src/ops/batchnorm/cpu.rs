//! CPU batch normalization (the rayon reference); semantics in the module
//! docs of [`super`].
//!
//! Per-channel reductions are split into fixed chunks of `CHUNK` samples,
//! each summed in f64 in sample order, then combined in chunk order: the
//! same bits on any thread count, and accurate for `m` in the millions.

use rayon::prelude::*;

use super::BatchNorm;
use crate::error::Result;

/// Samples per partial sum.
const CHUNK: usize = 4096;

/// Calls `f(start, len)` for each contiguous run of element indices holding
/// samples `j0..j1` of channel `ch` (sample `j` is image `j / spatial`,
/// position `j % spatial`).
#[inline]
fn runs(p: &BatchNorm, ch: usize, j0: usize, j1: usize, mut f: impl FnMut(usize, usize)) {
    let s = p.spatial;
    let mut j = j0;
    while j < j1 {
        let (img, off) = (j / s, j % s);
        let len = (s - off).min(j1 - j);
        f((img * p.c + ch) * s + off, len);
        j += len;
    }
}

/// `sum over the samples of channel ch of term(ch, element index)`, for
/// every channel, deterministically (see the module docs).
fn per_channel_sum<F>(p: &BatchNorm, term: F) -> Vec<f64>
where
    F: Fn(usize, usize) -> f64 + Sync,
{
    let m = p.sample_size();
    let chunks = m.div_ceil(CHUNK);
    if p.spatial == 1 {
        return dense_per_channel_sum(p, chunks, term);
    }
    let partials: Vec<f64> = (0..p.c * chunks)
        .into_par_iter()
        .map(|t| {
            let (ch, k) = (t / chunks, t % chunks);
            let j0 = k * CHUNK;
            let mut s = 0.0f64;
            runs(p, ch, j0, (j0 + CHUNK).min(m), |start, len| {
                for idx in start..start + len {
                    s += term(ch, idx);
                }
            });
            s
        })
        .collect();
    partials
        .chunks(chunks)
        .map(|c| c.iter().fold(0.0f64, |a, &b| a + b))
        .collect()
}

/// [`per_channel_sum`] for dense inputs (`[n, c]`, one sample per row):
/// the same additions in the same order (each channel's samples in order
/// within a chunk, chunks in order), but row by row over contiguous memory,
/// where one task per channel would read with a stride of `c` and drown in
/// scheduling for the small batches of a dense layer.
fn dense_per_channel_sum<F>(p: &BatchNorm, chunks: usize, term: F) -> Vec<f64>
where
    F: Fn(usize, usize) -> f64 + Sync,
{
    let m = p.sample_size();
    let partials: Vec<Vec<f64>> = (0..chunks)
        .into_par_iter()
        .map(|k| {
            let mut acc = vec![0.0f64; p.c];
            for j in k * CHUNK..((k + 1) * CHUNK).min(m) {
                let row = j * p.c;
                for (ch, a) in acc.iter_mut().enumerate() {
                    *a += term(ch, row + ch);
                }
            }
            acc
        })
        .collect();
    let mut sums = vec![0.0f64; p.c];
    for part in &partials {
        for (s, &v) in sums.iter_mut().zip(part) {
            *s += v;
        }
    }
    sums
}

/// `out[idx] = f(ch, idx)` for every element, parallel over images.
fn map_elements<F>(p: &BatchNorm, out: &mut [f32], f: F)
where
    F: Fn(usize, usize) -> f32 + Sync,
{
    let image = p.c * p.spatial;
    out.par_chunks_mut(image).enumerate().for_each(|(img, o)| {
        for ch in 0..p.c {
            let base = ch * p.spatial;
            for s in 0..p.spatial {
                o[base + s] = f(ch, img * image + base + s);
            }
        }
    });
}

/// `1 / sqrt(var + epsilon)` in f64, rounded once.
fn inv_std(var: f64, epsilon: f32) -> f32 {
    (1.0 / (var + epsilon as f64).sqrt()) as f32
}

/// Training forward: normalizes `x` with its batch statistics into `y`
/// (fully overwritten), writes the per-channel `save_mean` and
/// `save_inv_std` (fully overwritten), and updates `running_mean` and
/// `running_var` in place (they are read, then written).
#[allow(clippy::too_many_arguments)]
pub fn forward_training(
    p: &BatchNorm,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    save_mean: &mut [f32],
    save_inv_std: &mut [f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
) -> Result<()> {
    p.check(
        "batchnorm.forward_training",
        &[("x", x.len()), ("y", y.len())],
        &[
            ("gamma", gamma.len()),
            ("beta", beta.len()),
            ("save_mean", save_mean.len()),
            ("save_inv_std", save_inv_std.len()),
            ("running_mean", running_mean.len()),
            ("running_var", running_var.len()),
        ],
    )?;
    let m = p.sample_size() as f64;
    let mean64: Vec<f64> = per_channel_sum(p, |_, i| x[i] as f64)
        .into_iter()
        .map(|s| s / m)
        .collect();
    // Two-pass variance: the sum of squared deviations from the f64 mean,
    // free of the cancellation that E[x^2] - E[x]^2 suffers.
    let var64: Vec<f64> = per_channel_sum(p, |ch, i| {
        let d = x[i] as f64 - mean64[ch];
        d * d
    })
    .into_iter()
    .map(|s| s / m)
    .collect();

    let factor = p.variance_factor();
    let (mom, keep) = (p.momentum, 1.0 - p.momentum);
    for ch in 0..p.c {
        save_mean[ch] = mean64[ch] as f32;
        save_inv_std[ch] = inv_std(var64[ch], p.epsilon);
        let v = (var64[ch] * factor) as f32;
        running_mean[ch] = running_mean[ch] * mom + save_mean[ch] * keep;
        running_var[ch] = running_var[ch] * mom + v * keep;
    }
    let (mean, istd) = (&*save_mean, &*save_inv_std);
    map_elements(p, y, |ch, i| {
        gamma[ch] * ((x[i] - mean[ch]) * istd[ch]) + beta[ch]
    });
    Ok(())
}

/// Inference forward: normalizes `x` with the running statistics into `y`
/// (fully overwritten).
pub fn forward_inference(
    p: &BatchNorm,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    y: &mut [f32],
) -> Result<()> {
    p.check(
        "batchnorm.forward_inference",
        &[("x", x.len()), ("y", y.len())],
        &[
            ("gamma", gamma.len()),
            ("beta", beta.len()),
            ("running_mean", running_mean.len()),
            ("running_var", running_var.len()),
        ],
    )?;
    let istd: Vec<f32> = running_var
        .iter()
        .map(|&v| inv_std(v as f64, p.epsilon))
        .collect();
    map_elements(p, y, |ch, i| {
        gamma[ch] * ((x[i] - running_mean[ch]) * istd[ch]) + beta[ch]
    });
    Ok(())
}

/// Backward through the training forward (batch statistics): writes `dx`,
/// `dgamma` and `dbeta` (all fully overwritten) from the forward's input
/// `x`, the incoming `dy`, `gamma`, and the `save_mean` / `save_inv_std`
/// the training forward wrote.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    p: &BatchNorm,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    save_mean: &[f32],
    save_inv_std: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    p.check(
        "batchnorm.backward",
        &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())],
        &[
            ("gamma", gamma.len()),
            ("save_mean", save_mean.len()),
            ("save_inv_std", save_inv_std.len()),
            ("dgamma", dgamma.len()),
            ("dbeta", dbeta.len()),
        ],
    )?;
    // x_hat exactly as the forward computed it.
    let x_hat = |ch: usize, i: usize| (x[i] - save_mean[ch]) * save_inv_std[ch];
    let sum_dy = per_channel_sum(p, |_, i| dy[i] as f64);
    let sum_dy_xhat = per_channel_sum(p, |ch, i| dy[i] as f64 * x_hat(ch, i) as f64);
    let m = p.sample_size() as f64;
    let mut coef = vec![0.0f32; p.c];
    let mut mean_dy = vec![0.0f32; p.c];
    let mut mean_dy_xhat = vec![0.0f32; p.c];
    for ch in 0..p.c {
        dbeta[ch] = sum_dy[ch] as f32;
        dgamma[ch] = sum_dy_xhat[ch] as f32;
        coef[ch] = gamma[ch] * save_inv_std[ch];
        mean_dy[ch] = (sum_dy[ch] / m) as f32;
        mean_dy_xhat[ch] = (sum_dy_xhat[ch] / m) as f32;
    }
    map_elements(p, dx, |ch, i| {
        coef[ch] * ((dy[i] - mean_dy[ch]) - x_hat(ch, i) * mean_dy_xhat[ch])
    });
    Ok(())
}
