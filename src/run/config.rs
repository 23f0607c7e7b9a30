//! Run configs: one TOML file per reproduction run (`configs/*.toml`).
//!
//! A config states everything a run needs, with Keras's names where Keras
//! has one:
//!
//! ```toml
//! description = "c1 (seed 002): keras-cnn, RMSprop lr 1e-4, decay 1e-6"
//! seed = 1
//! keras = "standalone"             # or "tf_keras" (seed 003)
//! loss = "categorical_crossentropy"
//! metrics = ["accuracy"]
//!
//! [data]
//! dataset = "cifar10"              # fashion_mnist | cifar10 | synthetic_*
//!
//! [model]
//! layers = [
//!   { type = "conv2d", filters = 32, kernel_size = 3, padding = "same", activation = "relu" },
//!   { type = "flatten" },
//!   { type = "dense", units = 10, activation = "softmax" },
//! ]
//!
//! [optimizer]
//! kind = "rmsprop"
//! lr = 1e-4
//! decay = 1e-6
//! # clipnorm = 1.0                # standalone: global norm; tf_keras: per tensor
//! # global_clipnorm = 1.0         # tf_keras only: the global norm
//! # initial_accumulator_value = 0.1  # adagrad only
//!
//! [fit]
//! batch_size = 32
//! epochs = 100
//! validation_data = "test"         # or validation_split = 0.3 / validation_first = 5000
//!
//! [early_stopping]
//! monitor = "val_acc"
//! patience = 5
//! # restore_best_weights = true   # tf_keras: also at the end without a stop
//! ```
//!
//! Every table rejects unknown keys; every value is checked
//! ([`RunConfig::validate`]). Errors name the file and the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{self, Act, Init, LayerSpec};
use crate::ops::batchnorm::VarianceMode;
use crate::ops::conv::Padding;
use crate::ops::optim::Optimizer;
use crate::train::{EarlyStopping, EarlyStoppingMode, Loss, Metric};

/// A whole run, as read from one TOML file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// What the run reproduces (one line, printed by `kestrel summary`).
    #[serde(default)]
    pub description: String,
    /// Seeds the weights, the shuffles, the dropout masks and the augmentation.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Which Keras the seed ran: `standalone` (Keras 2.3.1, the default) or
    /// `tf_keras` (seed 003): switches the optimizer's clipping order and
    /// per-tensor clipnorm (and allows `global_clipnorm`), Adagrad's initial
    /// accumulator, the default variance mode of batch normalization, and
    /// EarlyStopping's `restore_best_weights` at the end of training.
    #[serde(default)]
    pub keras: KerasFlavor,
    /// The data set.
    pub data: DataConfig,
    /// The network.
    pub model: ModelConfig,
    /// The optimizer of the first compile.
    pub optimizer: OptimizerConfig,
    /// The loss.
    pub loss: LossName,
    /// Metrics (`accuracy` / `acc`, `mae`).
    #[serde(default)]
    pub metrics: Vec<MetricName>,
    /// fit's arguments.
    pub fit: FitConfig,
    /// EarlyStopping, if any (applies to every stage).
    pub early_stopping: Option<EarlyStoppingConfig>,
    /// Host-side augmentation of the training batches, if any.
    pub augmentation: Option<AugmentationConfig>,
    /// Successive `fit` calls on the same weights (c3, c10). Absent: one
    /// stage of `fit.epochs` epochs with `optimizer`.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
}

fn default_seed() -> u64 {
    1
}

/// Which Keras semantics to follow where standalone Keras and tf.keras differ.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KerasFlavor {
    /// Standalone Keras 2.3.1 (seeds 000-002).
    #[default]
    Standalone,
    /// tf.keras (seed 003).
    TfKeras,
}

/// The data set kinds.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// Fashion-MNIST, `[1, 28, 28]`, 10 classes.
    FashionMnist,
    /// CIFAR-10, `[3, 32, 32]`, 10 classes.
    Cifar10,
    /// Seed 001's stand-in: two noisy classes from a random linear teacher.
    SyntheticTwoClass,
    /// Seed 004 multiclass: Gaussian blobs, `classes` classes.
    SyntheticMulticlass,
    /// Seed 004 binary: a 0/1 target from a noisy nonlinear teacher.
    SyntheticBinary,
    /// Seed 004 regression: a real target from a noisy nonlinear teacher.
    SyntheticRegression,
}

impl DatasetKind {
    /// The name as a config spells it (`fashion_mnist`, `synthetic_binary`).
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion_mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::SyntheticTwoClass => "synthetic_two_class",
            DatasetKind::SyntheticMulticlass => "synthetic_multiclass",
            DatasetKind::SyntheticBinary => "synthetic_binary",
            DatasetKind::SyntheticRegression => "synthetic_regression",
        }
    }

    /// Whether the data are generated rather than read.
    pub fn is_synthetic(self) -> bool {
        !matches!(self, DatasetKind::FashionMnist | DatasetKind::Cifar10)
    }
}

/// `[data]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Which data set.
    pub dataset: DatasetKind,
    /// Synthetic: training samples.
    pub samples: Option<usize>,
    /// Synthetic: test samples.
    pub test_samples: Option<usize>,
    /// Synthetic: features per sample.
    pub features: Option<usize>,
    /// Synthetic multiclass: classes.
    pub classes: Option<usize>,
    /// Synthetic: noise level (see [`crate::run::synthetic`]).
    pub noise: Option<f64>,
    /// Synthetic: the generator's seed (default: the run's seed).
    pub seed: Option<u64>,
}

impl DataConfig {
    /// The per-sample input shape (NCHW) of the data set.
    pub fn input_shape(&self) -> Vec<usize> {
        match self.dataset {
            DatasetKind::FashionMnist => vec![1, 28, 28],
            DatasetKind::Cifar10 => vec![3, 32, 32],
            _ => vec![self.features.unwrap_or(0)],
        }
    }
}

/// `[model]`: an explicit layer list, or a named network.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A named network (`keras-cnn`, `elu-cnn`, `mlp`), expanded by
    /// [`named_network`]; exclusive with `layers`.
    pub network: Option<String>,
    /// The layers, in order.
    #[serde(default)]
    pub layers: Vec<LayerConfig>,
}

/// A layer's activation name.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ActName {
    /// Identity.
    #[default]
    Linear,
    /// ReLU.
    Relu,
    /// ELU (`alpha`, default 1.0).
    Elu,
    /// Leaky ReLU (`alpha`, default 0.3).
    LeakyRelu,
    /// tanh.
    Tanh,
    /// Sigmoid.
    Sigmoid,
    /// Softmax.
    Softmax,
}

fn to_act(a: ActName, alpha: Option<f32>) -> Act {
    match a {
        ActName::Linear => Act::Linear,
        ActName::Relu => Act::Relu,
        ActName::Elu => Act::Elu(alpha.unwrap_or(1.0)),
        ActName::LeakyRelu => Act::LeakyRelu(alpha.unwrap_or(0.3)),
        ActName::Tanh => Act::Tanh,
        ActName::Sigmoid => Act::Sigmoid,
        ActName::Softmax => Act::Softmax,
    }
}

/// Kernel initializers.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InitName {
    /// Keras's default.
    #[default]
    GlorotUniform,
    /// He normal (truncated).
    HeNormal,
    /// Zeros.
    Zeros,
    /// Ones.
    Ones,
}

impl From<InitName> for Init {
    fn from(i: InitName) -> Init {
        match i {
            InitName::GlorotUniform => Init::GlorotUniform,
            InitName::HeNormal => Init::HeNormal,
            InitName::Zeros => Init::Zeros,
            InitName::Ones => Init::Ones,
        }
    }
}

/// Keras padding.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PaddingName {
    /// No padding.
    #[default]
    Valid,
    /// Output size `ceil(in / stride)`.
    Same,
}

impl From<PaddingName> for Padding {
    fn from(p: PaddingName) -> Padding {
        match p {
            PaddingName::Valid => Padding::Valid,
            PaddingName::Same => Padding::Same,
        }
    }
}

/// An integer or a pair, as Keras takes `kernel_size`, `strides`, `pool_size`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Size2 {
    /// `3` means `(3, 3)`.
    One(usize),
    /// `[3, 5]`.
    Two([usize; 2]),
}

impl Size2 {
    fn pair(self) -> [usize; 2] {
        match self {
            Size2::One(k) => [k, k],
            Size2::Two(p) => p,
        }
    }
}

/// Batch-normalization variance modes (see [`VarianceMode`]).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VarianceModeName {
    /// Standalone Keras, unfused.
    Keras,
    /// Standalone Keras, fused.
    KerasFused,
    /// tf.keras.
    TfKeras,
    /// Biased.
    Biased,
    /// Unbiased.
    Unbiased,
}

impl From<VarianceModeName> for VarianceMode {
    fn from(v: VarianceModeName) -> VarianceMode {
        match v {
            VarianceModeName::Keras => VarianceMode::Keras,
            VarianceModeName::KerasFused => VarianceMode::KerasFused,
            VarianceModeName::TfKeras => VarianceMode::TfKeras,
            VarianceModeName::Biased => VarianceMode::Biased,
            VarianceModeName::Unbiased => VarianceMode::Unbiased,
        }
    }
}

/// One layer: `{ type = "dense", units = 300, activation = "relu" }`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerConfig {
    /// Keras `Dense`.
    Dense {
        /// Output features.
        units: usize,
        /// Activation (linear by default).
        #[serde(default)]
        activation: ActName,
        /// Alpha of elu / leaky_relu.
        alpha: Option<f32>,
        /// Kernel initializer (glorot_uniform by default).
        #[serde(default)]
        kernel_initializer: InitName,
        /// Whether there is a bias (true by default).
        use_bias: Option<bool>,
    },
    /// Keras `Conv2D`.
    Conv2d {
        /// Output channels.
        filters: usize,
        /// `3` or `[3, 3]`.
        kernel_size: Size2,
        /// `1` by default.
        strides: Option<Size2>,
        /// `valid` by default.
        #[serde(default)]
        padding: PaddingName,
        /// Activation (linear by default).
        #[serde(default)]
        activation: ActName,
        /// Alpha of elu / leaky_relu.
        alpha: Option<f32>,
        /// Kernel initializer.
        #[serde(default)]
        kernel_initializer: InitName,
        /// Whether there is a bias.
        use_bias: Option<bool>,
    },
    /// Keras `MaxPooling2D`.
    MaxPooling2d {
        /// `2` or `[2, 2]`.
        pool_size: Size2,
        /// The pool size by default.
        strides: Option<Size2>,
        /// `valid` by default.
        #[serde(default)]
        padding: PaddingName,
    },
    /// Keras `BatchNormalization`.
    BatchNormalization {
        /// 0.99 by default.
        momentum: Option<f32>,
        /// 1e-3 by default.
        epsilon: Option<f32>,
        /// By default from the run's `keras` flavor.
        variance_mode: Option<VarianceModeName>,
    },
    /// Keras `Dropout`.
    Dropout {
        /// Fraction dropped, in `[0, 1)`.
        rate: f32,
    },
    /// Keras `Activation`.
    Activation {
        /// The activation.
        activation: ActName,
        /// Alpha of elu / leaky_relu.
        alpha: Option<f32>,
    },
    /// Keras `Flatten`.
    Flatten,
}

/// Optimizer kinds.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKindName {
    /// SGD (Keras default lr 0.01).
    Sgd,
    /// Adagrad (0.01).
    Adagrad,
    /// RMSprop (0.001).
    Rmsprop,
    /// Adam (0.001).
    Adam,
}

/// `[optimizer]`, with Keras's argument names; omitted values take Keras's
/// defaults.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// The rule.
    pub kind: OptimizerKindName,
    /// Learning rate (Keras's default for the kind when omitted).
    pub lr: Option<f32>,
    /// `lr_t = lr / (1 + decay * iterations)`.
    pub decay: Option<f32>,
    /// SGD momentum.
    pub momentum: Option<f32>,
    /// SGD Nesterov.
    pub nesterov: Option<bool>,
    /// RMSprop rho.
    pub rho: Option<f32>,
    /// Adam beta_1.
    pub beta_1: Option<f32>,
    /// Adam beta_2.
    pub beta_2: Option<f32>,
    /// Epsilon (1e-7 by default).
    pub epsilon: Option<f32>,
    /// Gradient norm clipping: one global norm over all gradients in
    /// standalone Keras, each tensor by its own norm in the tf.keras flavour.
    pub clipnorm: Option<f32>,
    /// tf.keras flavour only: clip by one global norm over all gradients
    /// (what standalone Keras's `clipnorm` does); at most one of `clipnorm`
    /// and `global_clipnorm`.
    pub global_clipnorm: Option<f32>,
    /// Gradient value clipping.
    pub clipvalue: Option<f32>,
    /// Adagrad: the accumulator's starting value (tf.keras's argument;
    /// default 0.1 in the tf.keras flavour, 0 in standalone Keras).
    pub initial_accumulator_value: Option<f32>,
}

/// Losses.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LossName {
    /// One-hot targets.
    CategoricalCrossentropy,
    /// Class-index targets.
    SparseCategoricalCrossentropy,
    /// 0/1 targets, one sigmoid output.
    BinaryCrossentropy,
    /// Regression.
    Mse,
}

impl From<LossName> for Loss {
    fn from(l: LossName) -> Loss {
        match l {
            LossName::CategoricalCrossentropy => Loss::CategoricalCrossentropy,
            LossName::SparseCategoricalCrossentropy => Loss::SparseCategoricalCrossentropy,
            LossName::BinaryCrossentropy => Loss::BinaryCrossentropy,
            LossName::Mse => Loss::Mse,
        }
    }
}

/// Metrics.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MetricName {
    /// Accuracy (resolved by the loss, as Keras does).
    #[serde(alias = "acc")]
    Accuracy,
    /// Mean absolute error.
    Mae,
}

impl From<MetricName> for Metric {
    fn from(m: MetricName) -> Metric {
        match m {
            MetricName::Accuracy => Metric::Accuracy,
            MetricName::Mae => Metric::Mae,
        }
    }
}

/// What `validation_data` may name.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ValidationData {
    /// The test set as validation data (seeds 000 and 002).
    Test,
}

/// `[fit]`: Keras's fit arguments.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FitConfig {
    /// Samples per step (32).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Epochs of a single-stage run (ignored when `stages` is given).
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Shuffle every epoch (true).
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Keras's `validation_split`: the last fraction of the training set.
    pub validation_split: Option<f64>,
    /// Hold out the first `k` training samples as validation data (seed 003).
    pub validation_first: Option<usize>,
    /// `"test"`: validate on the test set (seeds 000 and 002).
    pub validation_data: Option<ValidationData>,
}

fn default_batch() -> usize {
    32
}
fn default_epochs() -> usize {
    1
}
fn default_true() -> bool {
    true
}

/// How validation data are chosen, after checking `[fit]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValidationPlan {
    /// No validation.
    None,
    /// Keras's `validation_split`.
    Split(f64),
    /// The first `k` training samples.
    First(usize),
    /// The test set.
    Test,
}

impl FitConfig {
    /// The validation plan (at most one of the three keys may be given).
    pub fn validation(&self) -> ValidationPlan {
        match (
            self.validation_split,
            self.validation_first,
            self.validation_data,
        ) {
            (Some(f), _, _) => ValidationPlan::Split(f),
            (_, Some(k), _) => ValidationPlan::First(k),
            (_, _, Some(ValidationData::Test)) => ValidationPlan::Test,
            _ => ValidationPlan::None,
        }
    }
}

/// EarlyStopping modes.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModeName {
    /// max when the monitor contains "acc".
    #[default]
    Auto,
    /// Smaller is better.
    Min,
    /// Larger is better.
    Max,
}

impl ModeName {
    /// The name as a config spells it.
    pub fn name(self) -> &'static str {
        match self {
            ModeName::Auto => "auto",
            ModeName::Min => "min",
            ModeName::Max => "max",
        }
    }
}

/// `[early_stopping]`: Keras's EarlyStopping arguments.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingConfig {
    /// The logged quantity (`val_loss` by default, as Keras).
    #[serde(default = "default_monitor")]
    pub monitor: String,
    /// Epochs without improvement before stopping (0).
    #[serde(default)]
    pub patience: usize,
    /// The smallest change that counts (0).
    #[serde(default)]
    pub min_delta: f64,
    /// auto / min / max.
    #[serde(default)]
    pub mode: ModeName,
    /// Put back the best weights when stopping (false); in the tf.keras
    /// flavour also at the end of training without an early stop.
    #[serde(default)]
    pub restore_best_weights: bool,
}

fn default_monitor() -> String {
    "val_loss".into()
}

impl EarlyStoppingConfig {
    /// The callback; the tf.keras flavour restores the best weights at the
    /// end of training even without an early stop.
    pub fn build(&self, flavor: KerasFlavor) -> EarlyStopping {
        EarlyStopping::new(&self.monitor)
            .patience(self.patience)
            .min_delta(self.min_delta)
            .mode(match self.mode {
                ModeName::Auto => EarlyStoppingMode::Auto,
                ModeName::Min => EarlyStoppingMode::Min,
                ModeName::Max => EarlyStoppingMode::Max,
            })
            .restore_best_weights(self.restore_best_weights)
            .restore_at_train_end(flavor == KerasFlavor::TfKeras)
    }
}

/// Fill modes of the augmentation (Keras has more; the seeds use `nearest`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FillMode {
    /// Repeat the border pixel.
    #[default]
    Nearest,
}

/// `[augmentation]`: Keras's ImageDataGenerator arguments (the subset the
/// cifar10_cnn example uses).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AugmentationConfig {
    /// Largest horizontal shift, as a fraction of the width, in `[0, 1)`.
    #[serde(default)]
    pub width_shift_range: f64,
    /// Largest vertical shift, as a fraction of the height, in `[0, 1)`.
    #[serde(default)]
    pub height_shift_range: f64,
    /// Flip left-right with probability 1/2.
    #[serde(default)]
    pub horizontal_flip: bool,
    /// How shifted-in pixels are filled.
    #[serde(default)]
    pub fill_mode: FillMode,
}

/// One `fit` call of a multi-stage run.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The `epochs` of this fit call (early stopping may end it sooner).
    pub epochs: usize,
    /// Re-compile with this optimizer before the stage (same weights, fresh
    /// optimizer state); absent: keep training with the current optimizer
    /// and its state (Keras's "fit again").
    pub optimizer: Option<OptimizerConfig>,
    /// A note for the summary.
    #[serde(default)]
    pub note: String,
}

/// A stage after resolution.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// Epochs of the fit call.
    pub epochs: usize,
    /// Re-compile with this optimizer first (`None`: keep the current one).
    pub recompile: Option<Optimizer>,
}

fn cfg_err(path: &Path, key: &str, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("{}: {key}: {msg}", path.display()))
}

impl OptimizerConfig {
    /// The optimizer, Keras defaults filled in; errors name `key.<field>`.
    pub fn build(&self, flavor: KerasFlavor, path: &Path, key: &str) -> Result<Optimizer> {
        let wrap = |e: Error| cfg_err(path, key, e);
        let mut o = match self.kind {
            OptimizerKindName::Sgd => Optimizer::sgd(
                self.lr.unwrap_or(0.01),
                self.momentum.unwrap_or(0.0),
                self.nesterov.unwrap_or(false),
            ),
            OptimizerKindName::Adagrad => Optimizer::adagrad(self.lr.unwrap_or(0.01)),
            OptimizerKindName::Rmsprop => Optimizer::rmsprop(self.lr.unwrap_or(0.001)),
            OptimizerKindName::Adam => Optimizer::adam(self.lr.unwrap_or(0.001)),
        }
        .map_err(wrap)?;
        let only = |field: &str, set: bool, kinds: &[OptimizerKindName]| -> Result<()> {
            if set && !kinds.contains(&self.kind) {
                Err(cfg_err(
                    path,
                    &format!("{key}.{field}"),
                    format!("does not apply to {:?}", self.kind).to_lowercase(),
                ))
            } else {
                Ok(())
            }
        };
        only(
            "momentum",
            self.momentum.is_some(),
            &[OptimizerKindName::Sgd],
        )?;
        only(
            "nesterov",
            self.nesterov.is_some(),
            &[OptimizerKindName::Sgd],
        )?;
        only("rho", self.rho.is_some(), &[OptimizerKindName::Rmsprop])?;
        only("beta_1", self.beta_1.is_some(), &[OptimizerKindName::Adam])?;
        only("beta_2", self.beta_2.is_some(), &[OptimizerKindName::Adam])?;
        only(
            "initial_accumulator_value",
            self.initial_accumulator_value.is_some(),
            &[OptimizerKindName::Adagrad],
        )?;
        if self.global_clipnorm.is_some() && flavor != KerasFlavor::TfKeras {
            return Err(cfg_err(
                path,
                &format!("{key}.global_clipnorm"),
                "is a tf.keras option (keras = \"tf_keras\"); in standalone Keras \
                 `clipnorm` already clips the global norm",
            ));
        }
        if self.global_clipnorm.is_some() && self.clipnorm.is_some() {
            return Err(cfg_err(
                path,
                &format!("{key}.global_clipnorm"),
                "at most one of clipnorm (per tensor) and global_clipnorm (all tensors) \
                 can be set, as in tf.keras",
            ));
        }
        if flavor == KerasFlavor::TfKeras {
            o = o.tf_keras();
        }
        if let Some(d) = self.decay {
            o.decay = d;
        }
        if let Some(r) = self.rho {
            o.rho = r;
        }
        if let Some(b) = self.beta_1 {
            o.beta1 = b;
        }
        if let Some(b) = self.beta_2 {
            o.beta2 = b;
        }
        if let Some(e) = self.epsilon {
            o.epsilon = e;
        }
        if let Some(a) = self.initial_accumulator_value {
            o.initial_accumulator = a;
        }
        o.clipnorm = self.clipnorm;
        if let Some(g) = self.global_clipnorm {
            o.clipnorm = Some(g);
            o.clipnorm_per_tensor = false;
        }
        o.clipvalue = self.clipvalue;
        o.validate().map_err(wrap)?;
        Ok(o)
    }
}

impl LayerConfig {
    /// The nn layer; `i` is the layer's index (for messages).
    pub fn build(&self, flavor: KerasFlavor, path: &Path, i: usize) -> Result<LayerSpec> {
        let key = format!("model.layers[{i}]");
        let check_alpha = |act: ActName, alpha: Option<f32>| -> Result<()> {
            match (act, alpha) {
                (ActName::Elu | ActName::LeakyRelu, Some(a)) if !a.is_finite() => Err(cfg_err(
                    path,
                    &format!("{key}.alpha"),
                    format!("{a} is not finite"),
                )),
                (ActName::Elu | ActName::LeakyRelu, _) | (_, None) => Ok(()),
                (other, Some(_)) => Err(cfg_err(
                    path,
                    &format!("{key}.alpha"),
                    format!("only elu and leaky_relu take an alpha, not {other:?}").to_lowercase(),
                )),
            }
        };
        let positive = |field: &str, v: usize| -> Result<()> {
            if v == 0 {
                Err(cfg_err(
                    path,
                    &format!("{key}.{field}"),
                    "must be at least 1, got 0",
                ))
            } else {
                Ok(())
            }
        };
        Ok(match self {
            LayerConfig::Dense {
                units,
                activation,
                alpha,
                kernel_initializer,
                use_bias,
            } => {
                positive("units", *units)?;
                check_alpha(*activation, *alpha)?;
                let mut d = nn::Dense::new(*units)
                    .activation(to_act(*activation, *alpha))
                    .kernel_initializer((*kernel_initializer).into());
                d.use_bias = use_bias.unwrap_or(true);
                d.into()
            }
            LayerConfig::Conv2d {
                filters,
                kernel_size,
                strides,
                padding,
                activation,
                alpha,
                kernel_initializer,
                use_bias,
            } => {
                positive("filters", *filters)?;
                let [kh, kw] = kernel_size.pair();
                positive("kernel_size", kh.min(kw))?;
                let [sh, sw] = strides.map_or([1, 1], Size2::pair);
                positive("strides", sh.min(sw))?;
                check_alpha(*activation, *alpha)?;
                let mut c = nn::Conv2D::new(*filters, kh)
                    .kernel_size(kh, kw)
                    .strides(sh, sw)
                    .padding((*padding).into())
                    .activation(to_act(*activation, *alpha))
                    .kernel_initializer((*kernel_initializer).into());
                c.use_bias = use_bias.unwrap_or(true);
                c.into()
            }
            LayerConfig::MaxPooling2d {
                pool_size,
                strides,
                padding,
            } => {
                let [ph, pw] = pool_size.pair();
                positive("pool_size", ph.min(pw))?;
                let mut p = nn::MaxPooling2D::new(ph).padding((*padding).into());
                p.pool_size = [ph, pw];
                if let Some(s) = strides {
                    let [sh, sw] = s.pair();
                    positive("strides", sh.min(sw))?;
                    p = p.strides(sh, sw);
                }
                p.into()
            }
            LayerConfig::BatchNormalization {
                momentum,
                epsilon,
                variance_mode,
            } => {
                let mut b = nn::BatchNormalization::new();
                if let Some(m) = momentum {
                    if !(0.0..=1.0).contains(m) {
                        return Err(cfg_err(
                            path,
                            &format!("{key}.momentum"),
                            format!("{m} is not in [0, 1]"),
                        ));
                    }
                    b = b.momentum(*m);
                }
                if let Some(e) = epsilon {
                    if !(e.is_finite() && *e > 0.0) {
                        return Err(cfg_err(
                            path,
                            &format!("{key}.epsilon"),
                            format!("{e} must be finite and > 0"),
                        ));
                    }
                    b = b.epsilon(*e);
                }
                let mode = match (variance_mode, flavor) {
                    (Some(m), _) => (*m).into(),
                    (None, KerasFlavor::TfKeras) => VarianceMode::TfKeras,
                    (None, KerasFlavor::Standalone) => VarianceMode::Keras,
                };
                b.variance_mode(mode).into()
            }
            LayerConfig::Dropout { rate } => {
                if !(0.0..1.0).contains(rate) {
                    return Err(cfg_err(
                        path,
                        &format!("{key}.rate"),
                        format!("{rate} is not in [0, 1)"),
                    ));
                }
                nn::Dropout::new(*rate).into()
            }
            LayerConfig::Activation { activation, alpha } => {
                check_alpha(*activation, *alpha)?;
                nn::Activation(to_act(*activation, *alpha)).into()
            }
            LayerConfig::Flatten => nn::Flatten.into(),
        })
    }
}

/// The named networks of `SEED_RUNS.md`, for `model.network`:
/// - `keras-cnn`: seed 002, Keras's cifar10_cnn example (1,250,858 params on CIFAR-10);
/// - `elu-cnn`: seed 000;
/// - `mlp`: seed 003, `Flatten · Dense 300 relu · Dense 100 relu · Dense 10 softmax`.
pub fn named_network(name: &str) -> Option<Vec<LayerConfig>> {
    fn conv(filters: usize, same: bool, act: ActName) -> LayerConfig {
        LayerConfig::Conv2d {
            filters,
            kernel_size: Size2::One(3),
            strides: None,
            padding: if same {
                PaddingName::Same
            } else {
                PaddingName::Valid
            },
            activation: act,
            alpha: None,
            kernel_initializer: InitName::GlorotUniform,
            use_bias: None,
        }
    }
    fn dense(units: usize, act: ActName) -> LayerConfig {
        LayerConfig::Dense {
            units,
            activation: act,
            alpha: None,
            kernel_initializer: InitName::GlorotUniform,
            use_bias: None,
        }
    }
    let pool = || LayerConfig::MaxPooling2d {
        pool_size: Size2::One(2),
        strides: None,
        padding: PaddingName::Valid,
    };
    let drop = |rate| LayerConfig::Dropout { rate };
    let cnn = |widths: &[usize], dense_units: usize, act: ActName| {
        let mut l = Vec::new();
        for &w in widths {
            l.extend([conv(w, true, act), conv(w, false, act), pool(), drop(0.25)]);
        }
        l.extend([
            LayerConfig::Flatten,
            dense(dense_units, act),
            drop(0.5),
            dense(10, ActName::Softmax),
        ]);
        l
    };
    Some(match name {
        "keras-cnn" => cnn(&[32, 64], 512, ActName::Relu),
        "elu-cnn" => cnn(&[128, 256, 512], 1024, ActName::Elu),
        "mlp" => vec![
            LayerConfig::Flatten,
            dense(300, ActName::Relu),
            dense(100, ActName::Relu),
            dense(10, ActName::Softmax),
        ],
        _ => return None,
    })
}

/// A config read from a file, with its path (for messages and outputs).
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    /// The file.
    pub path: PathBuf,
    /// Its contents.
    pub config: RunConfig,
}

impl LoadedConfig {
    /// Reads, parses and validates a config file. Errors name the file and
    /// the key (TOML errors also quote the line).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let config: RunConfig = toml::from_str(text).map_err(|e| {
            Error::Config(format!("{}: {}", path.display(), e.to_string().trim_end()))
        })?;
        config.validate(path)?;
        Ok(LoadedConfig {
            path: path.to_path_buf(),
            config,
        })
    }

    /// The file name without `.toml` (the default output directory's name).
    pub fn stem(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into())
    }

    /// The layer specs.
    pub fn layers(&self) -> Result<Vec<LayerSpec>> {
        self.config.layer_specs(&self.path)
    }

    /// The first compile's optimizer.
    pub fn optimizer(&self) -> Result<Optimizer> {
        self.config
            .optimizer
            .build(self.config.keras, &self.path, "optimizer")
    }

    /// The stages (one when the config gives none), `max_epochs` capping
    /// (or, for a single stage, setting) the epochs of each.
    ///
    /// `Some(0)` is rejected as `fit.epochs = 0` is: a run trains at least
    /// one epoch.
    pub fn stages(&self, epochs_override: Option<usize>) -> Result<Vec<Stage>> {
        let c = &self.config;
        if epochs_override == Some(0) {
            return Err(Error::invalid(
                "train",
                "--epochs",
                "must be at least 1, got 0",
            ));
        }
        if c.stages.is_empty() {
            return Ok(vec![Stage {
                epochs: epochs_override.unwrap_or(c.fit.epochs),
                recompile: None,
            }]);
        }
        c.stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Ok(Stage {
                    epochs: epochs_override.map_or(s.epochs, |e| e.min(s.epochs)),
                    recompile: s
                        .optimizer
                        .as_ref()
                        .map(|o| o.build(c.keras, &self.path, &format!("stages[{i}].optimizer")))
                        .transpose()?,
                })
            })
            .collect()
    }
}

impl RunConfig {
    /// The layers as nn specs (the named network expanded).
    pub fn layer_specs(&self, path: &Path) -> Result<Vec<LayerSpec>> {
        self.layer_configs(path)?
            .iter()
            .enumerate()
            .map(|(i, l)| l.build(self.keras, path, i))
            .collect()
    }

    /// The layer list, the named network expanded.
    pub fn layer_configs(&self, path: &Path) -> Result<Vec<LayerConfig>> {
        match (&self.model.network, self.model.layers.is_empty()) {
            (Some(_), false) => Err(cfg_err(
                path,
                "model",
                "give either `network` or `layers`, not both",
            )),
            (Some(n), true) => named_network(n).ok_or_else(|| {
                cfg_err(
                    path,
                    "model.network",
                    format!("unknown network {n:?}: expected keras-cnn, elu-cnn or mlp"),
                )
            }),
            (None, true) => Err(cfg_err(
                path,
                "model",
                "no layers: give `layers = [...]` or `network = \"...\"`",
            )),
            (None, false) => Ok(self.model.layers.clone()),
        }
    }

    /// Checks every value that the types alone do not.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |key: &str, msg: String| Err(cfg_err(path, key, msg));
        // Data.
        let d = &self.data;
        let synth_keys = [
            ("samples", d.samples.is_some()),
            ("test_samples", d.test_samples.is_some()),
            ("features", d.features.is_some()),
            ("classes", d.classes.is_some()),
            ("noise", d.noise.is_some()),
            ("seed", d.seed.is_some()),
        ];
        if d.dataset.is_synthetic() {
            for (k, v) in [
                ("samples", d.samples),
                ("test_samples", d.test_samples),
                ("features", d.features),
            ] {
                match v {
                    None => {
                        return err(
                            &format!("data.{k}"),
                            "required for a synthetic data set".into(),
                        );
                    }
                    Some(0) => {
                        return err(&format!("data.{k}"), "must be at least 1, got 0".into());
                    }
                    _ => {}
                }
            }
            if let Some(n) = d.noise
                && !(n.is_finite() && n >= 0.0)
            {
                return err("data.noise", format!("{n} must be finite and >= 0"));
            }
            match (d.dataset, d.classes) {
                (DatasetKind::SyntheticMulticlass, None) => {
                    return err("data.classes", "required for synthetic_multiclass".into());
                }
                (DatasetKind::SyntheticMulticlass, Some(c)) if c < 2 => {
                    return err("data.classes", format!("must be at least 2, got {c}"));
                }
                (DatasetKind::SyntheticMulticlass, _) | (_, None) => {}
                (_, Some(_)) => {
                    return err(
                        "data.classes",
                        "only synthetic_multiclass takes a class count".into(),
                    );
                }
            }
        } else if let Some((k, _)) = synth_keys.iter().find(|(_, set)| *set) {
            return err(
                &format!("data.{k}"),
                "only synthetic data sets take this key".into(),
            );
        }
        // Fit.
        let f = &self.fit;
        if f.batch_size == 0 {
            return err("fit.batch_size", "must be at least 1, got 0".into());
        }
        if self.stages.is_empty() && f.epochs == 0 {
            return err("fit.epochs", "must be at least 1, got 0".into());
        }
        let given: Vec<&str> = [
            ("validation_split", f.validation_split.is_some()),
            ("validation_first", f.validation_first.is_some()),
            ("validation_data", f.validation_data.is_some()),
        ]
        .iter()
        .filter(|(_, s)| *s)
        .map(|(k, _)| *k)
        .collect();
        if given.len() > 1 {
            return err(
                &format!("fit.{}", given[1]),
                format!("give at most one of {}", given.join(", ")),
            );
        }
        if let Some(s) = f.validation_split
            && !(s > 0.0 && s < 1.0)
        {
            return err("fit.validation_split", format!("{s} is not in (0, 1)"));
        }
        if f.validation_first == Some(0) {
            return err("fit.validation_first", "must be at least 1, got 0".into());
        }
        // Early stopping.
        if let Some(es) = &self.early_stopping {
            if !(es.min_delta.is_finite()) {
                return err(
                    "early_stopping.min_delta",
                    format!("{} is not finite", es.min_delta),
                );
            }
            if es.monitor.starts_with("val_") && f.validation() == ValidationPlan::None {
                return err(
                    "early_stopping.monitor",
                    format!(
                        "{:?} needs validation data (fit.validation_split, validation_first or validation_data)",
                        es.monitor
                    ),
                );
            }
        }
        // Augmentation.
        if let Some(a) = &self.augmentation {
            for (k, v) in [
                ("width_shift_range", a.width_shift_range),
                ("height_shift_range", a.height_shift_range),
            ] {
                if !(0.0..1.0).contains(&v) {
                    return err(
                        &format!("augmentation.{k}"),
                        format!("{v} is not in [0, 1)"),
                    );
                }
            }
            if d.input_shape().len() != 3 {
                return err(
                    "augmentation",
                    format!("needs image data, {:?} is not", d.dataset).to_lowercase(),
                );
            }
        }
        // Stages.
        for (i, s) in self.stages.iter().enumerate() {
            if s.epochs == 0 {
                return err(
                    &format!("stages[{i}].epochs"),
                    "must be at least 1, got 0".into(),
                );
            }
        }
        // Loss and metrics against the data.
        let classification = matches!(
            self.loss,
            LossName::CategoricalCrossentropy | LossName::SparseCategoricalCrossentropy
        );
        match d.dataset {
            DatasetKind::SyntheticRegression if self.loss != LossName::Mse => {
                return err(
                    "loss",
                    "synthetic_regression has real targets: use mse".into(),
                );
            }
            DatasetKind::SyntheticBinary
                if self.loss != LossName::BinaryCrossentropy && self.loss != LossName::Mse =>
            {
                return err(
                    "loss",
                    "synthetic_binary has one 0/1 target: use binary_crossentropy (or mse)".into(),
                );
            }
            DatasetKind::FashionMnist
            | DatasetKind::Cifar10
            | DatasetKind::SyntheticTwoClass
            | DatasetKind::SyntheticMulticlass
                if !classification =>
            {
                return err(
                    "loss",
                    format!(
                        "{:?} has class labels: use categorical_crossentropy or sparse_categorical_crossentropy",
                        d.dataset
                    )
                    .to_lowercase(),
                );
            }
            _ => {}
        }
        // Everything that building checks (layers, optimizers).
        self.layer_specs(path)?;
        self.optimizer.build(self.keras, path, "optimizer")?;
        for (i, s) in self.stages.iter().enumerate() {
            if let Some(o) = &s.optimizer {
                o.build(self.keras, path, &format!("stages[{i}].optimizer"))?;
            }
        }
        Ok(())
    }
}
