//! Losses fused with their output activation, and the metrics.
//!
//! All take a batch of `n` rows of `classes` values (for the binary and
//! regression losses `classes` is the number of outputs per sample),
//! row-major `[n, classes]`.
//!
//! Losses (per sample; the batch loss is the mean over the `n` samples):
//! - softmax + categorical cross-entropy from logits `z` and labels `y`
//!   (one-hot or any soft labels, f32):
//!   `loss = -sum_j y_j * log_softmax(z)_j`, with
//!   `log_softmax(z)_j = (z_j - max z) - ln(sum_k exp(z_k - max z))`, i.e.
//!   `logsumexp(z) * sum_j y_j - sum_j y_j z_j`, computed from the logits as
//!   tf.keras's `fit` does (no probability clipping). Terms with `y_j == 0`
//!   contribute exactly 0, so a `-inf` logit in a class without label mass
//!   does not turn the loss into NaN. Gradient of the batch mean:
//!   `dz = grad_scale * (softmax(z) * sum_j y_j - y) / n`.
//! - the sparse variant, labels as class indices `u32` (`< classes`):
//!   `loss = -log_softmax(z)_label`, `dz = grad_scale * (softmax(z) - onehot) / n`.
//! - sigmoid + binary cross-entropy from logits, targets in `[0, 1]`:
//!   per element `max(z, 0) - z*y + ln(1 + exp(-|z|))`, per sample the mean
//!   over the outputs (Keras), `dz = grad_scale * (sigmoid(z) - y) / (n * classes)`.
//! - mean squared error of a linear output: per sample the mean over the
//!   outputs of `(pred - y)^2`, `dz = grad_scale * 2 (pred - y) / (n * classes)`.
//!
//! With `grad_scale = 1` (the default) `dz` is exactly the gradient of the
//! batch-mean loss; another scale multiplies it (loss scaling, or `n` to get
//! per-sample-sum gradients).
//!
//! Each loss also returns the batch-mean loss: the per-sample f32 losses
//! summed in row order in f64, divided by `n` (deterministic). NaN in a row's
//! logits (or labels) gives NaN for that row's loss, probabilities and
//! gradient, and so for the mean; other rows are unaffected. An infinite
//! logit gives NaN for its row (`inf - inf` in the shift).
//!
//! Metrics return the *sum over the batch of the per-sample metric*, so that
//! the training loop can form batch-size-weighted epoch means (divide the
//! summed sums by the number of samples seen); a batch's value is the sum
//! divided by `n`.
//! - categorical accuracy: `argmax(scores) == argmax(one-hot labels)`,
//!   where argmax takes the first maximum on ties and a NaN counts as the
//!   maximum (the first NaN wins), as numpy's and TensorFlow's do. Scores
//!   may be logits or probabilities (softmax preserves the argmax).
//! - sparse categorical accuracy: `argmax(scores) == label`.
//! - binary accuracy (Keras 2.3.1, threshold 0.5): per element
//!   `y_true == round(prob)`, with `round(prob) = 1` iff `prob > 0.5`
//!   (TensorFlow rounds half to even, so exactly 0.5 rounds to 0). Given
//!   logits, `prob > 0.5` iff `logit > 0`. A NaN prediction is never right.
//!   Per sample the mean over the outputs.
//! - mae: per sample the mean over the outputs of `|pred - y|`.

pub mod cpu;
pub mod cuda;

use crate::error::{Error, Result, check_len, checked_product};

/// The shape of a loss or metric call and the gradient's scale.
/// Mirrored in the kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossParams {
    /// Samples in the batch (> 0).
    pub n: usize,
    /// Classes (cross-entropy) or outputs per sample (binary, mse, mae) (> 0).
    pub classes: usize,
    /// Multiplies the gradient of the batch-mean loss (1 by default).
    pub grad_scale: f32,
}

impl LossParams {
    /// `n` samples of `classes` values each, gradient of the batch mean.
    /// Rejects `n == 0` (the mean of no samples is undefined), `classes == 0`
    /// and shapes whose size overflows.
    pub fn new(n: usize, classes: usize) -> Result<Self> {
        const OP: &str = "loss";
        if n == 0 {
            return Err(Error::invalid(
                OP,
                "n",
                "batch size 0: the mean loss of no samples is undefined",
            ));
        }
        if classes == 0 {
            return Err(Error::invalid(
                OP,
                "classes",
                "classes = 0: each sample needs at least one class/output",
            ));
        }
        checked_product(OP, "shape [n, classes]", &[n, classes])?;
        Ok(LossParams {
            n,
            classes,
            grad_scale: 1.0,
        })
    }

    /// Sets the gradient's scale (finite).
    pub fn with_grad_scale(mut self, grad_scale: f32) -> Result<Self> {
        if !grad_scale.is_finite() {
            return Err(Error::invalid(
                "loss",
                "grad_scale",
                format!("{grad_scale} (must be finite)"),
            ));
        }
        self.grad_scale = grad_scale;
        Ok(self)
    }

    /// Elements of a `[n, classes]` buffer.
    pub fn len(&self) -> usize {
        self.n * self.classes
    }

    /// Always false: [`LossParams::new`] rejects empty shapes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a `[n, classes]` buffer (and the shape itself, since the
    /// fields are public and may not have gone through [`LossParams::new`]).
    pub fn check_mat(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        if self.n == 0 || self.classes == 0 {
            return Err(Error::invalid(
                op,
                "shape",
                format!(
                    "n = {}, classes = {}: both must be > 0",
                    self.n, self.classes
                ),
            ));
        }
        checked_product(op, "shape [n, classes]", &[self.n, self.classes])?;
        check_len(
            op,
            &format!("{what} [n={}, classes={}]", self.n, self.classes),
            len,
            self.len(),
        )
    }

    /// Checks a `[n]` buffer.
    pub fn check_rows(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        check_len(op, &format!("{what} [n={}]", self.n), len, self.n)
    }

    /// Checks sparse labels: `n` of them, each `< classes`; the error names
    /// the first bad row and its value.
    pub fn check_sparse_labels(&self, op: &'static str, labels: &[u32]) -> Result<()> {
        self.check_rows(op, "labels", labels.len())?;
        if let Some((i, &v)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &v)| v as usize >= self.classes)
        {
            return Err(Error::invalid(
                op,
                "labels",
                format!(
                    "row {i}: class index {v} is out of range (classes = {}, valid 0..{})",
                    self.classes, self.classes
                ),
            ));
        }
        Ok(())
    }
}

/// The index of the largest value; the first on ties; a NaN counts as the
/// largest (the first NaN wins), like numpy's `argmax`. Empty: 0.
#[inline]
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    let mut bv = match row.first() {
        Some(&v) => v,
        None => return 0,
    };
    for (j, &v) in row.iter().enumerate().skip(1) {
        if bv.is_nan() {
            break;
        }
        if v > bv || v.is_nan() {
            best = j;
            bv = v;
        }
    }
    best
}
