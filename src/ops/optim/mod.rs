//! Fused optimizer steps with Keras 2 semantics (keras 2.3.1 by default).
//!
//! With `lr_t = lr / (1 + decay * iterations)` (`iterations` counted from 0,
//! incremented after each step) and `eps` = `epsilon` (1e-7 by default):
//! - SGD: `v = momentum*v - lr_t*g; p += v`; Nesterov: `p += momentum*v - lr_t*g`
//!   (with the new `v`). Without momentum this is `p -= lr_t*g`.
//! - Adagrad: `a += g^2; p -= lr_t*g / (sqrt(a) + eps)`.
//! - RMSprop: `a = rho*a + (1-rho)*g^2; p -= lr_t*g / (sqrt(a) + eps)`.
//! - Adam: `t = iterations + 1; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
//!   p -= lr_t*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)`.
//!
//! Gradient clipping, standalone Keras (the default): `clipnorm = c` takes
//! one global norm `n = sqrt(sum of g^2 over every gradient of the model)`
//! and scales every gradient by `c/n` when `n >= c`; then `clipvalue = c`
//! clips each element to `[-c, c]`. tf.keras differs, each difference a
//! named option ([`Optimizer::tf_keras`] sets all three):
//! - [`Optimizer::clipnorm_per_tensor`]: each tensor is scaled by its own
//!   norm (tf.keras's `clipnorm`; its `global_clipnorm` is the default rule);
//! - [`Optimizer::clipvalue_first`]: clipvalue is applied before clipnorm
//!   (the norm is then the norm of the clipped gradients);
//! - [`Optimizer::initial_accumulator`]: Adagrad's accumulator starts at
//!   0.1 in tf.keras, 0 in standalone Keras.
//!
//! The host computes a [`StepScalars`] once per step (and per tensor, for
//! the clip scale), so that the element-wise update [`update`] is a pure
//! function of (scalars, p, g, slots), the same on the CPU and in the kernel.
//! Norms are summed in f64 in a fixed order (see [`crate::ops::bias`]).
//! A NaN gradient makes its parameter NaN (nothing on the path swallows it).

pub mod cpu;
pub mod cuda;

use crate::error::{Error, Result};

/// Which update rule. Mirrored in the kernels.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptimizerKind {
    /// SGD, with optional (Nesterov) momentum. Slot: velocity.
    Sgd = 0,
    /// Adagrad. Slot: accumulator.
    Adagrad = 1,
    /// RMSprop. Slot: accumulator.
    RmsProp = 2,
    /// Adam. Slots: first and second moments.
    Adam = 3,
}

impl OptimizerKind {
    /// How many slot buffers (each the size of the parameter) the rule keeps.
    pub fn slots(self) -> usize {
        match self {
            OptimizerKind::Adam => 2,
            _ => 1,
        }
    }
}

/// An optimizer's configuration. Build it with [`Optimizer::sgd`],
/// [`Optimizer::adagrad`], [`Optimizer::rmsprop`] or [`Optimizer::adam`]
/// (Keras 2.3.1's defaults) and the `with_*` methods, each of which
/// validates; [`cpu::step`] validates again, since the fields are public.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Optimizer {
    /// The update rule.
    pub kind: OptimizerKind,
    /// Learning rate (> 0).
    pub lr: f32,
    /// Time decay of the learning rate (>= 0): `lr_t = lr / (1 + decay * iterations)`.
    pub decay: f32,
    /// SGD momentum (>= 0; 0: plain SGD).
    pub momentum: f32,
    /// SGD: Nesterov momentum.
    pub nesterov: bool,
    /// RMSprop's decay of the accumulator (in [0, 1]; Keras: 0.9).
    pub rho: f32,
    /// Adam's first-moment decay (in [0, 1); Keras: 0.9).
    pub beta1: f32,
    /// Adam's second-moment decay (in [0, 1); Keras: 0.999).
    pub beta2: f32,
    /// Added to the root in the denominators (>= 0; Keras: 1e-7).
    pub epsilon: f32,
    /// Gradient norm clipping threshold (> 0), or none.
    pub clipnorm: Option<f32>,
    /// Gradient value clipping threshold (> 0), or none.
    pub clipvalue: Option<f32>,
    /// tf.keras: clip each tensor by its own norm instead of the global norm.
    pub clipnorm_per_tensor: bool,
    /// tf.keras: clip values before clipping the norm.
    pub clipvalue_first: bool,
    /// Adagrad's initial accumulator (>= 0; standalone Keras 0, tf.keras 0.1).
    pub initial_accumulator: f32,
}

const OP: &str = "optimizer";

fn check_range(arg: &'static str, v: f32, ok: bool, want: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(OP, arg, format!("{v} (must be {want})")))
    }
}

impl Optimizer {
    fn base(kind: OptimizerKind, lr: f32) -> Self {
        Optimizer {
            kind,
            lr,
            decay: 0.0,
            momentum: 0.0,
            nesterov: false,
            rho: 0.9,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-7,
            clipnorm: None,
            clipvalue: None,
            clipnorm_per_tensor: false,
            clipvalue_first: false,
            initial_accumulator: 0.0,
        }
    }

    /// SGD with the given momentum (0 for plain SGD) and Nesterov flag
    /// (Keras default lr 0.01).
    pub fn sgd(lr: f32, momentum: f32, nesterov: bool) -> Result<Self> {
        let mut o = Self::base(OptimizerKind::Sgd, lr);
        o.momentum = momentum;
        o.nesterov = nesterov;
        o.validate()?;
        Ok(o)
    }

    /// Adagrad (Keras default lr 0.01), standalone Keras's accumulator start 0.
    pub fn adagrad(lr: f32) -> Result<Self> {
        let o = Self::base(OptimizerKind::Adagrad, lr);
        o.validate()?;
        Ok(o)
    }

    /// RMSprop with rho 0.9 (Keras default lr 0.001).
    pub fn rmsprop(lr: f32) -> Result<Self> {
        let o = Self::base(OptimizerKind::RmsProp, lr);
        o.validate()?;
        Ok(o)
    }

    /// Adam with beta1 0.9, beta2 0.999 (Keras default lr 0.001).
    pub fn adam(lr: f32) -> Result<Self> {
        let o = Self::base(OptimizerKind::Adam, lr);
        o.validate()?;
        Ok(o)
    }

    /// Sets the learning-rate decay.
    pub fn with_decay(mut self, decay: f32) -> Result<Self> {
        self.decay = decay;
        self.validate()?;
        Ok(self)
    }

    /// Sets epsilon.
    pub fn with_epsilon(mut self, epsilon: f32) -> Result<Self> {
        self.epsilon = epsilon;
        self.validate()?;
        Ok(self)
    }

    /// Sets RMSprop's rho.
    pub fn with_rho(mut self, rho: f32) -> Result<Self> {
        self.rho = rho;
        self.validate()?;
        Ok(self)
    }

    /// Sets Adam's betas.
    pub fn with_betas(mut self, beta1: f32, beta2: f32) -> Result<Self> {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self.validate()?;
        Ok(self)
    }

    /// Sets the norm clipping threshold.
    pub fn with_clipnorm(mut self, c: f32) -> Result<Self> {
        self.clipnorm = Some(c);
        self.validate()?;
        Ok(self)
    }

    /// Sets the value clipping threshold.
    pub fn with_clipvalue(mut self, c: f32) -> Result<Self> {
        self.clipvalue = Some(c);
        self.validate()?;
        Ok(self)
    }

    /// Switches every tf.keras difference on: per-tensor clipnorm, clipvalue
    /// before clipnorm, Adagrad's accumulator starting at 0.1.
    pub fn tf_keras(mut self) -> Self {
        self.clipnorm_per_tensor = true;
        self.clipvalue_first = true;
        self.initial_accumulator = 0.1;
        self
    }

    /// Checks every field's domain; the error names the field and its value.
    pub fn validate(&self) -> Result<()> {
        let fin = |v: f32| v.is_finite();
        check_range(
            "lr",
            self.lr,
            fin(self.lr) && self.lr > 0.0,
            "finite and > 0",
        )?;
        check_range(
            "decay",
            self.decay,
            fin(self.decay) && self.decay >= 0.0,
            "finite and >= 0",
        )?;
        check_range(
            "momentum",
            self.momentum,
            fin(self.momentum) && self.momentum >= 0.0,
            "finite and >= 0",
        )?;
        check_range(
            "rho",
            self.rho,
            (0.0..=1.0).contains(&self.rho),
            "in [0, 1]",
        )?;
        check_range(
            "beta1",
            self.beta1,
            (0.0..1.0).contains(&self.beta1),
            "in [0, 1)",
        )?;
        check_range(
            "beta2",
            self.beta2,
            (0.0..1.0).contains(&self.beta2),
            "in [0, 1)",
        )?;
        check_range(
            "epsilon",
            self.epsilon,
            fin(self.epsilon) && self.epsilon >= 0.0,
            "finite and >= 0",
        )?;
        check_range(
            "initial_accumulator",
            self.initial_accumulator,
            fin(self.initial_accumulator) && self.initial_accumulator >= 0.0,
            "finite and >= 0",
        )?;
        if let Some(c) = self.clipnorm {
            check_range("clipnorm", c, c > 0.0, "> 0; use None for no clipping")?;
        }
        if let Some(c) = self.clipvalue {
            check_range("clipvalue", c, c > 0.0, "> 0; use None for no clipping")?;
        }
        Ok(())
    }

    /// The learning rate of the step after `iterations` steps:
    /// `lr / (1 + decay * iterations)`, in f64.
    pub fn lr_at(&self, iterations: u64) -> f64 {
        self.lr as f64 / (1.0 + self.decay as f64 * iterations as f64)
    }

    /// The step's scalars after `iterations` steps, with no norm clipping
    /// (`clip_scale = 1`); [`cpu::step`] sets the clip scale per tensor.
    /// Computed in f64 and rounded once to f32.
    pub fn scalars(&self, iterations: u64) -> StepScalars {
        let lr_t = self.lr_at(iterations);
        let t = iterations as f64 + 1.0;
        let (b1, b2) = (self.beta1 as f64, self.beta2 as f64);
        let adam_step = lr_t * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t));
        StepScalars {
            kind: self.kind,
            nesterov: self.nesterov,
            clipvalue_first: self.clipvalue_first,
            lr_t: lr_t as f32,
            adam_step: adam_step as f32,
            momentum: self.momentum,
            rho: self.rho,
            one_minus_rho: 1.0 - self.rho,
            beta1: self.beta1,
            one_minus_beta1: 1.0 - self.beta1,
            beta2: self.beta2,
            one_minus_beta2: 1.0 - self.beta2,
            epsilon: self.epsilon,
            clip_scale: 1.0,
            clipvalue: self.clipvalue.unwrap_or(f32::INFINITY),
        }
    }
}

/// Everything the element-wise update needs, computed on the host once per
/// step (per tensor for `clip_scale`). Mirrored in the kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    /// The rule.
    pub kind: OptimizerKind,
    /// SGD: Nesterov.
    pub nesterov: bool,
    /// Clip values before scaling by `clip_scale` (tf.keras), else after.
    pub clipvalue_first: bool,
    /// `lr / (1 + decay * iterations)`.
    pub lr_t: f32,
    /// Adam: `lr_t * sqrt(1 - b2^t) / (1 - b1^t)`, `t = iterations + 1`.
    pub adam_step: f32,
    /// SGD momentum.
    pub momentum: f32,
    /// RMSprop rho.
    pub rho: f32,
    /// `1 - rho` in f32, as Keras forms it.
    pub one_minus_rho: f32,
    /// Adam beta1.
    pub beta1: f32,
    /// `1 - beta1`.
    pub one_minus_beta1: f32,
    /// Adam beta2.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// Epsilon.
    pub epsilon: f32,
    /// Norm clipping factor for this tensor: `c / n` when `n >= c`, else 1.
    pub clip_scale: f32,
    /// Value clipping threshold (`+inf`: none).
    pub clipvalue: f32,
}

/// Clips to `[-c, c]`, letting NaN through (a `min`/`max` would drop it).
#[inline(always)]
fn clip_value(g: f32, c: f32) -> f32 {
    if g > c {
        c
    } else if g < -c {
        -c
    } else {
        g
    }
}

/// The clipped gradient: `clip(g * scale)` or, with `clipvalue_first`,
/// `clip(g) * scale`.
#[inline(always)]
pub fn clip_gradient(s: &StepScalars, g: f32) -> f32 {
    if s.clipvalue_first {
        clip_value(g, s.clipvalue) * s.clip_scale
    } else {
        clip_value(g * s.clip_scale, s.clipvalue)
    }
}

/// One element's update, the definition the kernel mirrors: clips `g`,
/// then updates the parameter `p` and its slots (`s0`: velocity /
/// accumulator / first moment; `s1`: Adam's second moment, untouched
/// otherwise).
#[inline(always)]
pub fn update(s: &StepScalars, p: &mut f32, g: f32, s0: &mut f32, s1: &mut f32) {
    let g = clip_gradient(s, g);
    match s.kind {
        OptimizerKind::Sgd => {
            let v = s.momentum * *s0 - s.lr_t * g;
            *s0 = v;
            if s.nesterov {
                *p += s.momentum * v - s.lr_t * g;
            } else {
                *p += v;
            }
        }
        OptimizerKind::Adagrad => {
            let a = *s0 + g * g;
            *s0 = a;
            *p -= s.lr_t * g / (a.sqrt() + s.epsilon);
        }
        OptimizerKind::RmsProp => {
            let a = s.rho * *s0 + s.one_minus_rho * (g * g);
            *s0 = a;
            *p -= s.lr_t * g / (a.sqrt() + s.epsilon);
        }
        OptimizerKind::Adam => {
            let m = s.beta1 * *s0 + s.one_minus_beta1 * g;
            let v = s.beta2 * *s1 + s.one_minus_beta2 * (g * g);
            *s0 = m;
            *s1 = v;
            *p -= s.adam_step * m / (v.sqrt() + s.epsilon);
        }
    }
}

/// An optimizer's state for one model: the step counter and one set of
/// slot buffers per parameter tensor (zeros, or Adagrad's initial
/// accumulator). Re-compiling a model starts a fresh state.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    kind: OptimizerKind,
    iterations: u64,
    sizes: Vec<usize>,
    /// Velocity (SGD), accumulator (Adagrad, RMSprop) or first moment (Adam).
    slot0: Vec<Vec<f32>>,
    /// Adam's second moment; empty buffers otherwise.
    slot1: Vec<Vec<f32>>,
}

impl OptimizerState {
    /// A fresh state (`iterations = 0`) for parameter tensors of the given
    /// sizes (zero-sized tensors are allowed).
    pub fn new(opt: &Optimizer, sizes: &[usize]) -> Result<Self> {
        opt.validate()?;
        let init0 = if opt.kind == OptimizerKind::Adagrad {
            opt.initial_accumulator
        } else {
            0.0
        };
        let slot0 = sizes.iter().map(|&n| vec![init0; n]).collect();
        let slot1 = sizes
            .iter()
            .map(|&n| {
                if opt.kind.slots() == 2 {
                    vec![0.0; n]
                } else {
                    Vec::new()
                }
            })
            .collect();
        Ok(OptimizerState {
            kind: opt.kind,
            iterations: 0,
            sizes: sizes.to_vec(),
            slot0,
            slot1,
        })
    }

    /// The rule this state was made for.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// Steps taken so far.
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// Sets the step counter (to resume a saved run).
    pub fn set_iterations(&mut self, iterations: u64) {
        self.iterations = iterations;
    }

    /// The parameter tensor sizes.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Tensor `i`'s slots: (velocity / accumulator / first moment, Adam's
    /// second moment or empty). `None` past the last tensor.
    pub fn slots(&self, i: usize) -> Option<(&[f32], &[f32])> {
        Some((self.slot0.get(i)?, self.slot1.get(i)?))
    }

    /// Tensor `i`'s slots, mutable (to load a saved state).
    pub fn slots_mut(&mut self, i: usize) -> Option<(&mut [f32], &mut [f32])> {
        Some((self.slot0.get_mut(i)?, self.slot1.get_mut(i)?))
    }

    pub(crate) fn parts_mut(&mut self) -> (&mut u64, &mut [Vec<f32>], &mut [Vec<f32>]) {
        (&mut self.iterations, &mut self.slot0, &mut self.slot1)
    }
}
