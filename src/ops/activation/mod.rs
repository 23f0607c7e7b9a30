//! Element-wise activations (relu, elu, leaky relu, tanh, sigmoid, linear)
//! and the row-wise softmax.
//!
//! [`Activation`] is `#[repr(C)]` because kernels take it by value (the GEMM
//! epilogue fuses it); its scalar `apply`/`grad` are the definitions every
//! backend follows.

pub mod cpu;

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
                    self.alpha * x.exp_m1()
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
