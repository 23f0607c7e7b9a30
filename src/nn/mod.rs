//! Keras-like layers and the [`Sequential`] model.
//!
//! Layers are described by small config structs ([`Dense`], [`Conv2D`],
//! [`MaxPooling2D`], [`BatchNormalization`], [`Dropout`], [`Activation`],
//! [`Flatten`]) that [`Sequential::add`] collects; [`Sequential::build`]
//! infers every shape from the input shape, names the layers as Keras does
//! (`dense`, `dense_1`, `conv2d`, ...), allocates and initializes the
//! parameters on the backend.
//!
//! Shapes: kestrel computes NCHW, so a sample's shape is `[C, H, W]` for
//! images and `[F]` for flat features; [`Sequential::summary`] prints them
//! in Keras's channels-last notation, `(None, H, W, C)`, so that the
//! summary reads like Keras's.

mod layers;
mod model;
mod rng;
pub(crate) mod weights_io;

pub(crate) use layers::Mode;
pub use model::{ParamInfo, Sequential};
pub use rng::Rng;
pub(crate) use weights_io::atomic_write;

use crate::ops::activation::Activation as OpAct;
use crate::ops::batchnorm::{DEFAULT_EPSILON, DEFAULT_MOMENTUM, VarianceMode};
use crate::ops::conv::Padding;

/// A layer's activation (Keras's `activation=` argument).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    /// Identity.
    Linear,
    /// `max(x, 0)`.
    Relu,
    /// ELU with its alpha (Keras's default 1.0).
    Elu(f32),
    /// Leaky ReLU with its alpha (Keras's default 0.3).
    LeakyRelu(f32),
    /// tanh.
    Tanh,
    /// The logistic function.
    Sigmoid,
    /// Row-wise softmax over the features of a flat output.
    Softmax,
}

impl Act {
    /// ELU with Keras's default alpha 1.0.
    pub const ELU: Act = Act::Elu(1.0);
    /// Leaky ReLU with Keras's default alpha 0.3.
    pub const LEAKY_RELU: Act = Act::LeakyRelu(0.3);

    /// The element-wise op, or `None` for softmax (a row-wise op).
    pub(crate) fn elementwise(self) -> Option<OpAct> {
        Some(match self {
            Act::Linear => OpAct::LINEAR,
            Act::Relu => OpAct::RELU,
            Act::Elu(a) => OpAct::elu(a),
            Act::LeakyRelu(a) => OpAct::leaky_relu(a),
            Act::Tanh => OpAct::TANH,
            Act::Sigmoid => OpAct::SIGMOID,
            Act::Softmax => return None,
        })
    }

    /// Whether the backward can work from the output alone (so the
    /// activation can be fused into the GEMM epilogue without keeping the
    /// pre-activation): everything but softmax and elu / leaky relu with
    /// `alpha <= 0`.
    pub(crate) fn backward_from_output(self) -> bool {
        match self {
            Act::Elu(a) | Act::LeakyRelu(a) => a > 0.0,
            Act::Softmax => false,
            _ => true,
        }
    }
}

/// A kernel initializer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// Uniform in `[-l, l]`, `l = sqrt(6 / (fan_in + fan_out))` (Keras's default).
    GlorotUniform,
    /// Normal truncated at 2 sigma, `sigma = sqrt(2 / fan_in) / 0.87962566`.
    HeNormal,
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
}

/// A fully connected layer: `y = act(x W + b)`, kernel `[in, units]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// Output features.
    pub units: usize,
    /// The activation, fused into the GEMM epilogue where it can be.
    pub activation: Act,
    /// The kernel's initializer (glorot_uniform by default).
    pub kernel_initializer: Init,
    /// Whether the layer has a bias (initialized to zeros).
    pub use_bias: bool,
}

impl Dense {
    /// `Dense(units)` with a linear activation.
    pub fn new(units: usize) -> Self {
        Dense {
            units,
            activation: Act::Linear,
            kernel_initializer: Init::GlorotUniform,
            use_bias: true,
        }
    }
    /// Sets the activation.
    pub fn activation(mut self, a: Act) -> Self {
        self.activation = a;
        self
    }
    /// Sets the kernel initializer.
    pub fn kernel_initializer(mut self, i: Init) -> Self {
        self.kernel_initializer = i;
        self
    }
    /// Drops the bias.
    pub fn no_bias(mut self) -> Self {
        self.use_bias = false;
        self
    }
}

/// A 2-D convolution (cross-correlation), kernel OIHW `[filters, C, kh, kw]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2D {
    /// Output channels.
    pub filters: usize,
    /// Kernel `[height, width]`.
    pub kernel_size: [usize; 2],
    /// Strides `[vertical, horizontal]`.
    pub strides: [usize; 2],
    /// Keras padding (`valid` by default).
    pub padding: Padding,
    /// The activation, fused into the GEMM epilogue where it can be.
    pub activation: Act,
    /// The kernel's initializer (glorot_uniform by default).
    pub kernel_initializer: Init,
    /// Whether the layer has a bias.
    pub use_bias: bool,
}

impl Conv2D {
    /// `Conv2D(filters, (k, k))`, stride 1, valid padding, linear.
    pub fn new(filters: usize, kernel: usize) -> Self {
        Conv2D {
            filters,
            kernel_size: [kernel, kernel],
            strides: [1, 1],
            padding: Padding::Valid,
            activation: Act::Linear,
            kernel_initializer: Init::GlorotUniform,
            use_bias: true,
        }
    }
    /// Sets a rectangular kernel.
    pub fn kernel_size(mut self, kh: usize, kw: usize) -> Self {
        self.kernel_size = [kh, kw];
        self
    }
    /// Sets the strides.
    pub fn strides(mut self, sh: usize, sw: usize) -> Self {
        self.strides = [sh, sw];
        self
    }
    /// Sets the padding.
    pub fn padding(mut self, p: Padding) -> Self {
        self.padding = p;
        self
    }
    /// `padding='same'`.
    pub fn same(self) -> Self {
        self.padding(Padding::Same)
    }
    /// Sets the activation.
    pub fn activation(mut self, a: Act) -> Self {
        self.activation = a;
        self
    }
    /// Sets the kernel initializer.
    pub fn kernel_initializer(mut self, i: Init) -> Self {
        self.kernel_initializer = i;
        self
    }
    /// Drops the bias.
    pub fn no_bias(mut self) -> Self {
        self.use_bias = false;
        self
    }
}

/// 2-D max pooling.
#[derive(Clone, Debug, PartialEq)]
pub struct MaxPooling2D {
    /// Window `[height, width]`.
    pub pool_size: [usize; 2],
    /// Strides; `None`: the pool size (Keras's default).
    pub strides: Option<[usize; 2]>,
    /// Keras padding (`valid` by default).
    pub padding: Padding,
}

impl MaxPooling2D {
    /// `MaxPooling2D((p, p))`.
    pub fn new(pool: usize) -> Self {
        MaxPooling2D {
            pool_size: [pool, pool],
            strides: None,
            padding: Padding::Valid,
        }
    }
    /// Sets the strides.
    pub fn strides(mut self, sh: usize, sw: usize) -> Self {
        self.strides = Some([sh, sw]);
        self
    }
    /// Sets the padding.
    pub fn padding(mut self, p: Padding) -> Self {
        self.padding = p;
        self
    }
}

/// Batch normalization over the features of a flat input or the channels
/// of an image (see [`crate::ops::batchnorm`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormalization {
    /// Running-statistics momentum (0.99).
    pub momentum: f32,
    /// Added to the variance (1e-3).
    pub epsilon: f32,
    /// Which batch variance feeds the moving variance.
    pub variance_mode: VarianceMode,
}

impl BatchNormalization {
    /// Keras's defaults.
    pub fn new() -> Self {
        BatchNormalization {
            momentum: DEFAULT_MOMENTUM,
            epsilon: DEFAULT_EPSILON,
            variance_mode: VarianceMode::default(),
        }
    }
    /// Sets the momentum.
    pub fn momentum(mut self, m: f32) -> Self {
        self.momentum = m;
        self
    }
    /// Sets epsilon.
    pub fn epsilon(mut self, e: f32) -> Self {
        self.epsilon = e;
        self
    }
    /// Sets the variance mode.
    pub fn variance_mode(mut self, m: VarianceMode) -> Self {
        self.variance_mode = m;
        self
    }
}

impl Default for BatchNormalization {
    fn default() -> Self {
        Self::new()
    }
}

/// Inverted dropout with a deterministic Philox mask drawn from (the
/// model's dropout seed, the training step, the layer's index).
#[derive(Clone, Debug, PartialEq)]
pub struct Dropout {
    /// Fraction dropped, in `[0, 1)`.
    pub rate: f32,
}

impl Dropout {
    /// `Dropout(rate)`.
    pub fn new(rate: f32) -> Self {
        Dropout { rate }
    }
}

/// A stand-alone activation layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Activation(pub Act);

/// Flattens `[C, H, W]` to `[C*H*W]` (free: the memory does not move).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Flatten;

/// Any layer, as [`Sequential::add`] takes it.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerSpec {
    /// A [`Dense`] layer.
    Dense(Dense),
    /// A [`Conv2D`] layer.
    Conv2D(Conv2D),
    /// A [`MaxPooling2D`] layer.
    MaxPooling2D(MaxPooling2D),
    /// A [`BatchNormalization`] layer.
    BatchNormalization(BatchNormalization),
    /// A [`Dropout`] layer.
    Dropout(Dropout),
    /// An [`Activation`] layer.
    Activation(Activation),
    /// A [`Flatten`] layer.
    Flatten(Flatten),
}

impl LayerSpec {
    /// Keras's class name, as the summary prints it.
    pub fn type_name(&self) -> &'static str {
        match self {
            LayerSpec::Dense(_) => "Dense",
            LayerSpec::Conv2D(_) => "Conv2D",
            LayerSpec::MaxPooling2D(_) => "MaxPooling2D",
            LayerSpec::BatchNormalization(_) => "BatchNormalization",
            LayerSpec::Dropout(_) => "Dropout",
            LayerSpec::Activation(_) => "Activation",
            LayerSpec::Flatten(_) => "Flatten",
        }
    }

    /// The prefix of Keras's automatic layer names.
    pub fn name_prefix(&self) -> &'static str {
        match self {
            LayerSpec::Dense(_) => "dense",
            LayerSpec::Conv2D(_) => "conv2d",
            LayerSpec::MaxPooling2D(_) => "max_pooling2d",
            LayerSpec::BatchNormalization(_) => "batch_normalization",
            LayerSpec::Dropout(_) => "dropout",
            LayerSpec::Activation(_) => "activation",
            LayerSpec::Flatten(_) => "flatten",
        }
    }
}

macro_rules! into_spec {
    ($($t:ident),*) => {$(
        impl From<$t> for LayerSpec {
            fn from(l: $t) -> Self {
                LayerSpec::$t(l)
            }
        }
    )*};
}
into_spec!(
    Dense,
    Conv2D,
    MaxPooling2D,
    BatchNormalization,
    Dropout,
    Activation,
    Flatten
);

/// Formats a per-sample shape (NCHW order) as Keras prints a batch shape,
/// channels last: `[C, H, W]` -> `(None, H, W, C)`, `[F]` -> `(None, F)`.
pub fn keras_shape(shape: &[usize]) -> String {
    let dims: Vec<usize> = match shape {
        [c, h, w] => vec![*h, *w, *c],
        other => other.to_vec(),
    };
    let mut s = String::from("(None");
    for d in dims {
        s.push_str(&format!(", {d}"));
    }
    s.push(')');
    s
}
