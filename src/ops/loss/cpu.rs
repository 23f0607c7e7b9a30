//! CPU losses and metrics: one row per task, rows in parallel; the batch
//! sums are formed afterwards in row order, so nothing depends on the
//! number of threads.

use rayon::prelude::*;

use super::{LossParams, argmax};
use crate::error::Result;
use crate::ops::activation::sigmoid;

/// Splits an optional `[n, classes]` output into `n` optional rows, so that
/// the row loop can zip it whether or not the caller asked for it.
fn opt_rows(buf: Option<&mut [f32]>, n: usize, classes: usize) -> Vec<Option<&mut [f32]>> {
    match buf {
        Some(b) => b.chunks_mut(classes).map(Some).collect(),
        None => (0..n).map(|_| None).collect(),
    }
}

/// Runs `row(i, probs_row, dz_row) -> loss_i` over all rows in parallel,
/// writes `losses`, and returns their mean (summed in row order in f64).
fn for_rows(
    p: &LossParams,
    losses: &mut [f32],
    probs: Option<&mut [f32]>,
    dz: Option<&mut [f32]>,
    row: impl Fn(usize, Option<&mut [f32]>, Option<&mut [f32]>) -> f32 + Sync,
) -> f64 {
    let probs = opt_rows(probs, p.n, p.classes);
    let dz = opt_rows(dz, p.n, p.classes);
    losses
        .par_iter_mut()
        .zip(probs.into_par_iter())
        .zip(dz.into_par_iter())
        .enumerate()
        .for_each(|(i, ((l, pr), dr))| *l = row(i, pr, dr));
    losses.iter().map(|&l| l as f64).sum::<f64>() / p.n as f64
}

/// `ln(sum_j exp(z_j - m))` and the shift `m = max z`. A NaN logit makes the
/// sum NaN whatever `m` is, so the plain comparison is enough here.
#[inline]
fn log_norm(z: &[f32]) -> (f32, f32) {
    let m = z
        .iter()
        .copied()
        .fold(z[0], |m, v| if v > m { v } else { m });
    let s: f32 = z.iter().map(|&v| (v - m).exp()).sum();
    (m, s.ln())
}

/// The shared checks of the cross-entropy calls.
fn check_outputs(
    p: &LossParams,
    op: &'static str,
    logits: usize,
    losses: usize,
    probs: &Option<&mut [f32]>,
    dz: &Option<&mut [f32]>,
) -> Result<()> {
    p.check_mat(op, "logits", logits)?;
    p.check_rows(op, "losses", losses)?;
    if let Some(b) = probs {
        p.check_mat(op, "probs", b.len())?;
    }
    if let Some(b) = dz {
        p.check_mat(op, "dz", b.len())?;
    }
    Ok(())
}

/// `grad_scale / denom`, rounded once to f32.
fn scale_over(p: &LossParams, denom: f64) -> f32 {
    (p.grad_scale as f64 / denom) as f32
}

/// Softmax + categorical cross-entropy from `logits` `[n, classes]` and
/// f32 `labels` `[n, classes]` (one-hot or soft). Writes the per-sample
/// `losses` `[n]`, and, when given, the softmax `probs` and the gradient
/// `dz = grad_scale * (probs * sum_j y_j - y) / n` (both `[n, classes]`,
/// fully overwritten). Returns the batch-mean loss. See the module docs.
pub fn softmax_cross_entropy(
    p: &LossParams,
    logits: &[f32],
    labels: &[f32],
    losses: &mut [f32],
    probs: Option<&mut [f32]>,
    dz: Option<&mut [f32]>,
) -> Result<f64> {
    const OP: &str = "softmax_cross_entropy";
    check_outputs(p, OP, logits.len(), losses.len(), &probs, &dz)?;
    p.check_mat(OP, "labels", labels.len())?;
    let c = p.classes;
    let gs = scale_over(p, p.n as f64);
    Ok(for_rows(p, losses, probs, dz, |i, pr, dr| {
        let z = &logits[i * c..(i + 1) * c];
        let y = &labels[i * c..(i + 1) * c];
        let (m, ln_s) = log_norm(z);
        let mut loss = 0.0f32;
        let mut sum_y = 0.0f32;
        for (&zj, &yj) in z.iter().zip(y) {
            if yj != 0.0 {
                loss -= yj * ((zj - m) - ln_s);
            }
            sum_y += yj;
        }
        if let Some(pr) = pr {
            for (o, &zj) in pr.iter_mut().zip(z) {
                *o = ((zj - m) - ln_s).exp();
            }
        }
        if let Some(dr) = dr {
            for ((o, &zj), &yj) in dr.iter_mut().zip(z).zip(y) {
                let pj = ((zj - m) - ln_s).exp();
                *o = gs * (pj * sum_y - yj);
            }
        }
        loss
    }))
}

/// Softmax + categorical cross-entropy with class indices: `labels[i] <
/// classes` (an index out of range is an error naming the row and value,
/// reported before anything is written). `loss_i = -log_softmax(z_i)[label]`,
/// `dz = grad_scale * (probs - onehot) / n`. Outputs as
/// [`softmax_cross_entropy`]; returns the batch-mean loss.
pub fn sparse_softmax_cross_entropy(
    p: &LossParams,
    logits: &[f32],
    labels: &[u32],
    losses: &mut [f32],
    probs: Option<&mut [f32]>,
    dz: Option<&mut [f32]>,
) -> Result<f64> {
    const OP: &str = "sparse_softmax_cross_entropy";
    check_outputs(p, OP, logits.len(), losses.len(), &probs, &dz)?;
    p.check_sparse_labels(OP, labels)?;
    let c = p.classes;
    let gs = scale_over(p, p.n as f64);
    Ok(for_rows(p, losses, probs, dz, |i, pr, dr| {
        let z = &logits[i * c..(i + 1) * c];
        let label = labels[i] as usize;
        let (m, ln_s) = log_norm(z);
        if let Some(pr) = pr {
            for (o, &zj) in pr.iter_mut().zip(z) {
                *o = ((zj - m) - ln_s).exp();
            }
        }
        if let Some(dr) = dr {
            for (j, (o, &zj)) in dr.iter_mut().zip(z).enumerate() {
                let pj = ((zj - m) - ln_s).exp();
                *o = gs * if j == label { pj - 1.0 } else { pj };
            }
        }
        -((z[label] - m) - ln_s)
    }))
}

/// Sigmoid + binary cross-entropy from `logits` `[n, outputs]` and
/// `targets` in `[0, 1]`: per element `max(z,0) - z*y + ln(1 + exp(-|z|))`,
/// per sample the mean over the outputs. Writes `losses` `[n]` and, when
/// given, `probs = sigmoid(z)` and `dz = grad_scale * (probs - y) / (n *
/// outputs)`. Returns the batch-mean loss.
pub fn sigmoid_cross_entropy(
    p: &LossParams,
    logits: &[f32],
    targets: &[f32],
    losses: &mut [f32],
    probs: Option<&mut [f32]>,
    dz: Option<&mut [f32]>,
) -> Result<f64> {
    const OP: &str = "sigmoid_cross_entropy";
    check_outputs(p, OP, logits.len(), losses.len(), &probs, &dz)?;
    p.check_mat(OP, "targets", targets.len())?;
    let c = p.classes;
    let gs = scale_over(p, p.n as f64 * c as f64);
    Ok(for_rows(p, losses, probs, dz, |i, pr, dr| {
        let z = &logits[i * c..(i + 1) * c];
        let y = &targets[i * c..(i + 1) * c];
        let mut sum = 0.0f32;
        for (&zj, &yj) in z.iter().zip(y) {
            // A NaN logit fails `> 0` but still reaches the log1p term.
            let relu = if zj > 0.0 { zj } else { 0.0 };
            sum += relu - zj * yj + (-zj.abs()).exp().ln_1p();
        }
        if let Some(pr) = pr {
            for (o, &zj) in pr.iter_mut().zip(z) {
                *o = sigmoid(zj);
            }
        }
        if let Some(dr) = dr {
            for ((o, &zj), &yj) in dr.iter_mut().zip(z).zip(y) {
                *o = gs * (sigmoid(zj) - yj);
            }
        }
        sum / c as f32
    }))
}

/// Mean squared error of a linear output `pred` `[n, outputs]` against
/// `targets`: per sample the mean over the outputs of `(pred - y)^2`.
/// Writes `losses` `[n]` and, when given, `dz = grad_scale * 2 (pred - y) /
/// (n * outputs)`. Returns the batch-mean loss.
pub fn mse(
    p: &LossParams,
    pred: &[f32],
    targets: &[f32],
    losses: &mut [f32],
    dz: Option<&mut [f32]>,
) -> Result<f64> {
    const OP: &str = "mse";
    check_outputs(p, OP, pred.len(), losses.len(), &None, &dz)?;
    p.check_mat(OP, "targets", targets.len())?;
    let c = p.classes;
    let gs = scale_over(p, p.n as f64 * c as f64 / 2.0);
    Ok(for_rows(p, losses, None, dz, |i, _, dr| {
        let x = &pred[i * c..(i + 1) * c];
        let y = &targets[i * c..(i + 1) * c];
        let sum: f32 = x.iter().zip(y).map(|(&a, &b)| (a - b) * (a - b)).sum();
        if let Some(dr) = dr {
            for ((o, &a), &b) in dr.iter_mut().zip(x).zip(y) {
                *o = gs * (a - b);
            }
        }
        sum / c as f32
    }))
}

/// Number of rows where `argmax(scores) == argmax(labels)` (first maximum
/// on ties, NaN counts as the maximum), as f64: the sum of the per-sample
/// categorical accuracy over the batch.
pub fn categorical_accuracy(p: &LossParams, scores: &[f32], labels: &[f32]) -> Result<f64> {
    const OP: &str = "categorical_accuracy";
    p.check_mat(OP, "scores", scores.len())?;
    p.check_mat(OP, "labels", labels.len())?;
    let c = p.classes;
    let hits = scores
        .par_chunks(c)
        .zip(labels.par_chunks(c))
        .filter(|(s, y)| argmax(s) == argmax(y))
        .count();
    Ok(hits as f64)
}

/// Number of rows where `argmax(scores) == labels[i]`, as f64. Labels out
/// of range are an error (as in the sparse loss).
pub fn sparse_categorical_accuracy(p: &LossParams, scores: &[f32], labels: &[u32]) -> Result<f64> {
    const OP: &str = "sparse_categorical_accuracy";
    p.check_mat(OP, "scores", scores.len())?;
    p.check_sparse_labels(OP, labels)?;
    let hits = scores
        .par_chunks(p.classes)
        .zip(labels.par_iter())
        .filter(|(s, y)| argmax(s) == **y as usize)
        .count();
    Ok(hits as f64)
}

/// Keras 2.3.1's `binary_accuracy` (threshold 0.5) summed over the batch:
/// per element `targets == (probs > 0.5 ? 1 : 0)`, per sample the mean over
/// the outputs. Returns `correct elements / outputs` (the per-sample means
/// summed, rounded once). A NaN probability is never correct; a target
/// other than exactly 0 or 1 never matches, as in Keras.
pub fn binary_accuracy(p: &LossParams, probs: &[f32], targets: &[f32]) -> Result<f64> {
    const OP: &str = "binary_accuracy";
    p.check_mat(OP, "probs", probs.len())?;
    p.check_mat(OP, "targets", targets.len())?;
    let hits = probs
        .par_iter()
        .zip(targets.par_iter())
        .filter(|&(&q, &y)| {
            if q.is_nan() {
                return false;
            }
            let r = if q > 0.5 { 1.0 } else { 0.0 };
            y == r
        })
        .count();
    Ok(hits as f64 / p.classes as f64)
}

/// Mean absolute error summed over the batch: per sample the mean over the
/// outputs of `|pred - y|` (f32), the samples summed in row order in f64.
pub fn mae(p: &LossParams, pred: &[f32], targets: &[f32]) -> Result<f64> {
    const OP: &str = "mae";
    p.check_mat(OP, "pred", pred.len())?;
    p.check_mat(OP, "targets", targets.len())?;
    let c = p.classes;
    let rows: Vec<f32> = pred
        .par_chunks(c)
        .zip(targets.par_chunks(c))
        .map(|(x, y)| x.iter().zip(y).map(|(&a, &b)| (a - b).abs()).sum::<f32>() / c as f32)
        .collect();
    Ok(rows.iter().map(|&v| v as f64).sum())
}
