//! Batch normalization (Ioffe & Szegedy 2015) with Keras 2 semantics.
//!
//! Shapes: `x`, `y`, `dy`, `dx` are `[N, C, H, W]` (NCHW conv activations,
//! normalized per channel over N, H, W) or `[N, F]` (dense activations,
//! normalized per feature over N: the same with `H = W = 1`). One
//! [`BatchNorm`] covers both: `n`, `c`, `spatial = H * W`. Element
//! `(i, ch, s)` lives at `(i * c + ch) * spatial + s`. Per-channel vectors
//! (`gamma`, `beta`, the saved and running statistics, `dgamma`, `dbeta`)
//! have length `c`. The sample size per channel is `m = n * spatial`.
//!
//! Training forward (per channel, batch statistics):
//! - `mean = sum(x) / m`, `var = sum((x - mean)^2) / m` (biased, two-pass,
//!   each pass accumulated in f64 over fixed chunks of samples combined in
//!   a fixed order, so the result does not depend on the thread count and
//!   stays accurate for large `m`), both rounded once to f32;
//! - `inv_std = 1 / sqrt(var + epsilon)` (computed in f64, rounded once);
//! - `x_hat = (x - mean) * inv_std`, `y = gamma * x_hat + beta` (f32, in
//!   that order);
//! - saves `mean` and `inv_std` for the backward;
//! - updates the running statistics in place, in f32:
//!   `running_mean = running_mean * momentum + mean * (1 - momentum)` and
//!   `running_var = running_var * momentum + v * (1 - momentum)`, where
//!   `v = var * factor` is the batch variance chosen by [`VarianceMode`]
//!   (`factor` computed in f64, the product rounded once to f32).
//!
//! Inference forward: the same normalization with the running statistics:
//! `inv_std = 1 / sqrt(running_var + epsilon)` (f64, rounded once),
//! `y = gamma * ((x - running_mean) * inv_std) + beta`.
//!
//! Backward (batch statistics, i.e. through the mean and variance too):
//! `dbeta = sum(dy)`, `dgamma = sum(dy * x_hat)` (f64 chunked sums, rounded
//! once), and
//! `dx = gamma * inv_std / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))`,
//! evaluated as `(gamma * inv_std) * ((dy - sum(dy)/m) - x_hat *
//! (sum(dy * x_hat)/m))` in f32 with the two means rounded once from f64.
//!
//! NaN: a NaN (or infinity) in one element of a channel makes that
//! channel's mean or variance NaN, so every output of that channel is NaN
//! (other channels are untouched); the running statistics of that channel
//! become NaN, as they do in Keras.

pub mod cpu;
pub mod cuda;

use crate::error::{Error, Result, check_len, checked_product};

/// Which batch variance goes into the moving (running) variance. The
/// normalization itself always uses the biased batch variance.
/// Mirrored as `enum VarianceMode` in the kernels.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum VarianceMode {
    /// Standalone Keras 2.3.1 (`keras/layers/normalization.py`,
    /// `BatchNormalization.call`): `variance *= m / (m - (1 + epsilon))`
    /// on the backend's batch variance. With the backends' plain moments
    /// (dense inputs; NCHW inputs on a TensorFlow without NCHW support,
    /// i.e. on the CPU) that variance is the biased one, which is what this
    /// mode assumes: `factor = m / (m - (1 + epsilon))`. For `m == 1` this
    /// is `-1/epsilon`, as in Keras; the biased variance of one sample is
    /// 0, so the moving variance just decays by `momentum` (a NaN or
    /// infinite sample still poisons it).
    #[default]
    Keras = 0,
    /// Standalone Keras 2.3.1 on a 4-D input taking TensorFlow's fused path
    /// (`K.normalize_batch_in_training` -> `tf.nn.fused_batch_norm`, used
    /// for NHWC, and for NCHW where the GPU supports it). The fused op
    /// already returns the Bessel-corrected variance (`m / max(m - 1, 1)`)
    /// and Keras corrects it once more: `factor = m / max(m - 1, 1) *
    /// m / (m - (1 + epsilon))`. For dense inputs (`is_conv == false`) this
    /// is the same as [`VarianceMode::Keras`].
    KerasFused = 1,
    /// tf.keras (seed 003): the fused path for 4-D (conv) inputs gives the
    /// unbiased variance, `factor = m / max(m - 1, 1)` (TensorFlow's fused
    /// kernel divides by `max(m - 1, 1)`, so `m == 1` gives the biased 0);
    /// dense inputs take `tf.nn.moments`, the biased variance
    /// (`factor = 1`).
    TfKeras = 2,
    /// The biased variance (`factor = 1`).
    Biased = 3,
    /// The unbiased variance, `factor = m / max(m - 1, 1)` (the `m == 1`
    /// convention of TensorFlow's fused kernel: no division by zero, the
    /// variance of one sample stays 0).
    Unbiased = 4,
}

/// Shape and hyper-parameters of one batch normalization. Mirrored in the
/// kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm {
    /// Batch size N.
    pub n: usize,
    /// Channels C (conv) or features F (dense).
    pub c: usize,
    /// `H * W` for conv inputs, 1 for dense inputs.
    pub spatial: usize,
    /// The input is 4-D `[N, C, H, W]` (true) or 2-D `[N, F]` (false). Only
    /// [`VarianceMode::TfKeras`] and [`VarianceMode::KerasFused`] read it: a
    /// conv layer with a 1x1 output is still 4-D.
    pub is_conv: bool,
    /// Keras `momentum` in `[0, 1]` (default 0.99).
    pub momentum: f32,
    /// Keras `epsilon` > 0 (default 1e-3), added to the variance.
    pub epsilon: f32,
    /// Which batch variance feeds the running variance.
    pub variance_mode: VarianceMode,
}

/// Keras's default momentum.
pub const DEFAULT_MOMENTUM: f32 = 0.99;
/// Keras's default epsilon.
pub const DEFAULT_EPSILON: f32 = 1e-3;

impl BatchNorm {
    /// A validated batch normalization. Every dimension must be at least 1
    /// (batch statistics need a sample), `momentum` in `[0, 1]`, `epsilon`
    /// finite and > 0.
    pub fn new(
        n: usize,
        c: usize,
        spatial: usize,
        is_conv: bool,
        momentum: f32,
        epsilon: f32,
        variance_mode: VarianceMode,
    ) -> Result<Self> {
        let p = BatchNorm {
            n,
            c,
            spatial,
            is_conv,
            momentum,
            epsilon,
            variance_mode,
        };
        p.validate("batchnorm")?;
        Ok(p)
    }

    /// Conv input `[n, c, h, w]` with Keras's defaults (momentum 0.99,
    /// epsilon 1e-3, [`VarianceMode::Keras`]).
    pub fn conv(n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        let spatial = checked_product("batchnorm", "H x W", &[h, w])?;
        Self::new(
            n,
            c,
            spatial,
            true,
            DEFAULT_MOMENTUM,
            DEFAULT_EPSILON,
            VarianceMode::default(),
        )
    }

    /// Dense input `[n, f]` with Keras's defaults.
    pub fn dense(n: usize, f: usize) -> Result<Self> {
        Self::new(
            n,
            f,
            1,
            false,
            DEFAULT_MOMENTUM,
            DEFAULT_EPSILON,
            VarianceMode::default(),
        )
    }

    /// The same with another momentum (validated).
    pub fn with_momentum(mut self, momentum: f32) -> Result<Self> {
        self.momentum = momentum;
        self.validate("batchnorm")?;
        Ok(self)
    }

    /// The same with another epsilon (validated).
    pub fn with_epsilon(mut self, epsilon: f32) -> Result<Self> {
        self.epsilon = epsilon;
        self.validate("batchnorm")?;
        Ok(self)
    }

    /// The same with another variance mode (validated).
    pub fn with_variance_mode(mut self, mode: VarianceMode) -> Result<Self> {
        self.variance_mode = mode;
        self.validate("batchnorm")?;
        Ok(self)
    }

    /// Elements of `x`: `n * c * spatial`.
    pub fn len(&self) -> usize {
        self.n * self.c * self.spatial
    }

    /// Never true for a validated struct (every dimension is >= 1).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples per channel, `m = n * spatial`.
    pub fn sample_size(&self) -> usize {
        self.n * self.spatial
    }

    /// The factor that turns the biased batch variance into the one fed to
    /// the running variance (see [`VarianceMode`]), in f64.
    pub fn variance_factor(&self) -> f64 {
        let m = self.sample_size() as f64;
        let bessel = m / (m - 1.0).max(1.0);
        // Keras computes `1.0 + self.epsilon` in Python (f64) and the rest
        // in the input's dtype; the difference is far below f32 rounding
        // of the result for m >= 2.
        let keras = m / (m - (1.0 + self.epsilon as f64));
        match self.variance_mode {
            VarianceMode::Keras => keras,
            VarianceMode::KerasFused if self.is_conv => bessel * keras,
            VarianceMode::KerasFused => keras,
            VarianceMode::TfKeras if self.is_conv => bessel,
            VarianceMode::TfKeras => 1.0,
            VarianceMode::Biased => 1.0,
            VarianceMode::Unbiased => bessel,
        }
    }

    /// Checks the fields (public, so they may have been changed since
    /// `new`).
    pub fn validate(&self, op: &'static str) -> Result<()> {
        for (name, v) in [("n", self.n), ("c", self.c), ("spatial", self.spatial)] {
            if v == 0 {
                return Err(Error::invalid(
                    op,
                    "shape",
                    format!(
                        "{name} must be at least 1 (batch statistics need samples), got n {} c {} spatial {}",
                        self.n, self.c, self.spatial
                    ),
                ));
            }
        }
        checked_product(op, "n x c x spatial", &[self.n, self.c, self.spatial])?;
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::invalid(
                op,
                "momentum",
                format!("must be in [0, 1], got {}", self.momentum),
            ));
        }
        if !(self.epsilon > 0.0 && self.epsilon.is_finite()) {
            return Err(Error::invalid(
                op,
                "epsilon",
                format!("must be finite and > 0, got {}", self.epsilon),
            ));
        }
        let f = self.variance_factor();
        if !f.is_finite() {
            // Only Keras's m / (m - (1 + epsilon)) can blow up: when
            // 1 + epsilon equals the sample size.
            return Err(Error::invalid(
                op,
                "epsilon",
                format!(
                    "variance correction m / (m - (1 + epsilon)) divides by zero for m = {} and epsilon {}",
                    self.sample_size(),
                    self.epsilon
                ),
            ));
        }
        Ok(())
    }

    /// Validates the struct, then checks that each activation buffer holds
    /// `n * c * spatial` elements and each per-channel buffer `c`.
    pub fn check(
        &self,
        op: &'static str,
        activations: &[(&str, usize)],
        per_channel: &[(&str, usize)],
    ) -> Result<()> {
        self.validate(op)?;
        let len = self.len();
        for &(what, got) in activations {
            check_len(
                op,
                &format!(
                    "{what} (n {} x c {} x spatial {})",
                    self.n, self.c, self.spatial
                ),
                got,
                len,
            )?;
        }
        for &(what, got) in per_channel {
            check_len(
                op,
                &format!("{what} (per channel, c {})", self.c),
                got,
                self.c,
            )?;
        }
        Ok(())
    }
}
