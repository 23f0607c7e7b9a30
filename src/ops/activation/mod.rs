//! Element-wise activations (relu, elu, leaky relu, tanh, sigmoid, linear)
//! and the row-wise softmax.
//!
//! [`Activation`] is `#[repr(C)]` because kernels take it by value (the GEMM
//! epilogue fuses it); its scalar `apply`/`grad` are the definitions every
//! backend follows.

pub mod cpu;
pub mod cuda;
pub mod expm1;

use crate::error::{Error, Result, check_len, checked_product};

/// Which element-wise function. Mirrored as `enum ActivationKind` in the kernels.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActivationKind {
    /// `y = x`.
    Linear = 0,
    /// `y = max(x, 0)`; the gradient at 0 is 0, as in Keras.
    Relu = 1,
    /// `y = x` for `x > 0`, else `alpha * (exp(x) - 1)`.
    Elu = 2,
    /// `y = x` for `x > 0`, else `alpha * x` (Keras's default alpha is 0.3).
    LeakyRelu = 3,
    /// `y = tanh(x)`.
    Tanh = 4,
    /// `y = 1 / (1 + exp(-x))`.
    Sigmoid = 5,
}

/// An element-wise activation with its parameter (`alpha` for elu and leaky
/// relu, unused otherwise).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Activation {
    /// The function.
    pub kind: ActivationKind,
    /// Its parameter (elu, leaky relu).
    pub alpha: f32,
}

impl Activation {
    /// The identity.
    pub const LINEAR: Activation = Activation {
        kind: ActivationKind::Linear,
        alpha: 0.0,
    };
    /// relu.
    pub const RELU: Activation = Activation {
        kind: ActivationKind::Relu,
        alpha: 0.0,
    };
    /// tanh.
    pub const TANH: Activation = Activation {
        kind: ActivationKind::Tanh,
        alpha: 0.0,
    };
    /// sigmoid.
    pub const SIGMOID: Activation = Activation {
        kind: ActivationKind::Sigmoid,
        alpha: 0.0,
    };

    /// elu with the given alpha (Keras's default is 1.0).
    pub const fn elu(alpha: f32) -> Self {
        Activation {
            kind: ActivationKind::Elu,
            alpha,
        }
    }

    /// leaky relu with the given alpha (Keras's default is 0.3).
    pub const fn leaky_relu(alpha: f32) -> Self {
        Activation {
            kind: ActivationKind::LeakyRelu,
            alpha,
        }
    }

    /// `y = f(x)`. NaN in gives NaN out for every kind.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self.kind {
            ActivationKind::Linear => x,
            // `x > 0` is false for NaN, so a plain max would turn NaN into 0.
            ActivationKind::Relu => {
                if x > 0.0 || x.is_nan() {
                    x
                } else {
                    0.0
                }
            }
            ActivationKind::Elu => {
                if x > 0.0 || x.is_nan() {
                    x
                } else {
                    // Straight-line arithmetic (within 1 ulp), not libm's
                    // call: CPU loops over elu vectorize.
                    self.alpha * expm1::expm1_nonpositive(x)
                }
            }
            ActivationKind::LeakyRelu => {
                if x > 0.0 || x.is_nan() {
                    x
                } else {
                    self.alpha * x
                }
            }
            ActivationKind::Tanh => x.tanh(),
            ActivationKind::Sigmoid => sigmoid(x),
        }
    }

    /// `dL/dx` from the input `x`, the output `y = f(x)` and `dL/dy`.
    /// Each kind uses whichever of `x`, `y` is cheaper and exact.
    #[inline(always)]
    pub fn grad(self, x: f32, y: f32, dy: f32) -> f32 {
        match self.kind {
            ActivationKind::Linear => dy,
            ActivationKind::Relu => {
                if x > 0.0 {
                    dy
                } else if x.is_nan() {
                    x
                } else {
                    0.0
                }
            }
            ActivationKind::Elu => {
                if x > 0.0 {
                    dy
                } else if x.is_nan() {
                    x
                } else {
                    dy * (y + self.alpha)
                }
            }
            ActivationKind::LeakyRelu => {
                if x > 0.0 {
                    dy
                } else if x.is_nan() {
                    x
                } else {
                    dy * self.alpha
                }
            }
            ActivationKind::Tanh => dy * (1.0 - y * y),
            ActivationKind::Sigmoid => dy * y * (1.0 - y),
        }
    }
}

/// The logistic function, written so that neither branch overflows.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl Activation {
    /// Rejects a parameter that would make the function meaningless: elu's
    /// and leaky relu's `alpha` must be finite (any sign is allowed, as in
    /// Keras). `op` names the caller in the error.
    pub fn check(&self, op: &'static str) -> Result<()> {
        match self.kind {
            ActivationKind::Elu | ActivationKind::LeakyRelu if !self.alpha.is_finite() => Err(
                Error::invalid(op, "alpha", format!("must be finite, got {}", self.alpha)),
            ),
            _ => Ok(()),
        }
    }

    /// The checks of the element-wise ops, shared by both backends: the
    /// parameter, then every other buffer against the first one, `(what,
    /// len)`, named "(same as FIRST)" in the error.
    pub fn check_elementwise(&self, op: &'static str, bufs: &[(&str, usize)]) -> Result<()> {
        self.check(op)?;
        if let Some((&(first, n), rest)) = bufs.split_first() {
            for &(what, len) in rest {
                check_len(op, &format!("{what} (same as {first})"), len, n)?;
            }
        }
        Ok(())
    }

    /// The checks of `backward_from_output`: as [`Activation::check_elementwise`],
    /// and the input must be recoverable from the output (elu and leaky relu
    /// need `alpha > 0`).
    pub fn check_from_output(&self, op: &'static str, bufs: &[(&str, usize)]) -> Result<()> {
        self.check_elementwise(op, bufs)?;
        if matches!(self.kind, ActivationKind::Elu | ActivationKind::LeakyRelu)
            && self.alpha.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return Err(Error::invalid(
                op,
                "alpha",
                format!(
                    "the input cannot be recovered from the output unless alpha > 0, got {}",
                    self.alpha
                ),
            ));
        }
        Ok(())
    }
}

/// Row-wise softmax over a `rows x cols` row-major matrix (one row per
/// sample, one column per class).
///
/// Forward: `y[r][j] = exp(x[r][j] - max_r) / sum_k exp(x[r][k] - max_r)`,
/// where `max_r` is the row's maximum, so that no `exp` overflows (logits of
/// +-50 or +-1e4 are fine). The sum is accumulated in f32 in column order.
/// A NaN anywhere in a row makes the whole row NaN; a `+inf` logit gives a
/// NaN row too (`inf - inf`), as in TensorFlow; `-inf` logits get 0.
///
/// Backward: `dx = y * (dy - sum_j(dy_j * y_j))` per row, from the forward's
/// output `y`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Softmax {
    /// Number of rows (samples).
    pub rows: usize,
    /// Number of columns (classes); at least 1.
    pub cols: usize,
}

impl Softmax {
    /// A softmax over `rows` rows of `cols >= 1` classes.
    pub fn new(rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 {
            return Err(Error::invalid(
                "softmax",
                "cols",
                "a softmax needs at least 1 class, got 0",
            ));
        }
        checked_product("softmax", "rows x cols", &[rows, cols])?;
        Ok(Softmax { rows, cols })
    }

    /// `rows * cols`, the length of every buffer.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that each named buffer holds `rows * cols` elements (and that
    /// the struct, which has public fields, still describes a valid softmax).
    pub fn check(&self, op: &'static str, bufs: &[(&str, usize)]) -> Result<()> {
        if self.cols == 0 {
            return Err(Error::invalid(
                op,
                "cols",
                "a softmax needs at least 1 class, got 0",
            ));
        }
        let len = checked_product(op, "rows x cols", &[self.rows, self.cols])?;
        for &(what, got) in bufs {
            check_len(
                op,
                &format!("{what} (rows {} x cols {})", self.rows, self.cols),
                got,
                len,
            )?;
        }
        Ok(())
    }
}
