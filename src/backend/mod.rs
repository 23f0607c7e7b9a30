//! The compute backend the layers and the training loop run on.
//!
//! A [`Backend`] owns its buffers (`Buf` for f32, `BufU32` for labels and
//! max-pool argmaxes, `BufU8` for dropout masks) and runs one method per op
//! the layers need. Buffers may live in device memory: nothing here assumes
//! they can be read from the host, so every host transfer goes through
//! `upload_*` / `download_*`. Methods take the op parameter structs of
//! [`crate::ops`] and check lengths as the ops do (the CPU backend simply
//! delegates to the `ops::*::cpu` references).
//!
//! What is shared between backends (shapes, which op runs when, loss
//! dispatch, the fusion of the final softmax with the loss) lives in
//! [`crate::nn`] and [`crate::train`]; a backend is a thin table of ops.

pub mod cpu;

pub use cpu::CpuBackend;

use crate::error::Result;
use crate::ops::activation::{Activation, Softmax};
use crate::ops::batchnorm::BatchNorm;
use crate::ops::bias::BiasShape;
use crate::ops::conv::Conv2d;
use crate::ops::dropout::Dropout;
use crate::ops::gemm::Gemm;
use crate::ops::loss::LossParams;
use crate::ops::optim::{Optimizer, OptimizerState};
use crate::ops::pool::MaxPool2d;

/// A bias fused into a GEMM's epilogue, as a backend buffer.
#[derive(Debug)]
pub enum GemmBias<'a, T> {
    /// No bias.
    None,
    /// One value per row of `C` (conv output channels).
    PerRow(&'a T),
    /// One value per column of `C` (dense units).
    PerCol(&'a T),
}

/// A compute backend: buffers, transfers and the op set. See the module docs.
pub trait Backend {
    /// An f32 buffer.
    type Buf;
    /// A u32 buffer (sparse labels, max-pool argmax).
    type BufU32;
    /// A u8 buffer (dropout masks).
    type BufU8;
    /// The optimizer state (step counter and slots), wherever the backend
    /// keeps it; converted to and from the host [`OptimizerState`] for
    /// checkpoints.
    type OptState;

    /// A short name for messages ("cpu", "cuda:0 (H100)").
    fn name(&self) -> String;

    /// A zero-filled f32 buffer of `len` elements.
    fn alloc_f32(&self, len: usize) -> Result<Self::Buf>;
    /// A zero-filled u32 buffer.
    fn alloc_u32(&self, len: usize) -> Result<Self::BufU32>;
    /// A zero-filled u8 buffer.
    fn alloc_u8(&self, len: usize) -> Result<Self::BufU8>;
    /// Elements in an f32 buffer.
    fn len_f32(&self, buf: &Self::Buf) -> usize;
    /// A new buffer holding `host`.
    fn upload_f32(&self, host: &[f32]) -> Result<Self::Buf>;
    /// Overwrites `dst` (same length) with `host`.
    fn upload_into_f32(&self, host: &[f32], dst: &mut Self::Buf) -> Result<()>;
    /// Copies rows `rows[i]` of `src` (rows of `row_len` elements) to row
    /// `i` of `dst` (exactly `rows.len() * row_len` elements): the batch
    /// gather of the training loop.
    fn upload_rows_f32(
        &self,
        src: &[f32],
        row_len: usize,
        rows: &[usize],
        dst: &mut Self::Buf,
    ) -> Result<()>;
    /// As [`Backend::upload_rows_f32`] for u32 rows.
    fn upload_rows_u32(
        &self,
        src: &[u32],
        row_len: usize,
        rows: &[usize],
        dst: &mut Self::BufU32,
    ) -> Result<()>;
    /// The buffer's contents on the host.
    fn download_f32(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Copies the buffer into `host` (same length).
    fn download_into_f32(&self, buf: &Self::Buf, host: &mut [f32]) -> Result<()>;
    /// `dst = src` (same length).
    fn copy_f32(&self, src: &Self::Buf, dst: &mut Self::Buf) -> Result<()>;

    /// `C = act(alpha * op(A) * op(B) + beta * C + bias)` (see [`crate::ops::gemm`]).
    fn gemm(
        &self,
        p: &Gemm,
        a: &Self::Buf,
        b: &Self::Buf,
        c: &mut Self::Buf,
        bias: GemmBias<'_, Self::Buf>,
        act: Activation,
    ) -> Result<()>;

    /// Convolution forward with fused bias and activation.
    fn conv_forward(
        &self,
        p: &Conv2d,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        act: Activation,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Convolution gradient with respect to the input (overwrites `dx`).
    fn conv_backward_data(
        &self,
        p: &Conv2d,
        dy: &Self::Buf,
        w: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// Convolution gradient with respect to the weights (overwrites `dw`).
    fn conv_backward_filter(
        &self,
        p: &Conv2d,
        x: &Self::Buf,
        dy: &Self::Buf,
        dw: &mut Self::Buf,
    ) -> Result<()>;

    /// Max pooling with argmax (training).
    fn maxpool_forward(
        &self,
        p: &MaxPool2d,
        x: &Self::Buf,
        y: &mut Self::Buf,
        argmax: &mut Self::BufU32,
    ) -> Result<()>;
    /// Max pooling without argmax (inference).
    fn maxpool_forward_inference(
        &self,
        p: &MaxPool2d,
        x: &Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Max pooling backward (overwrites `dx`).
    fn maxpool_backward(
        &self,
        p: &MaxPool2d,
        dy: &Self::Buf,
        argmax: &Self::BufU32,
        dx: &mut Self::Buf,
    ) -> Result<()>;

    /// Batch normalization, training forward (see [`crate::ops::batchnorm`]).
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_forward_training(
        &self,
        p: &BatchNorm,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        y: &mut Self::Buf,
        save_mean: &mut Self::Buf,
        save_inv_std: &mut Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
    ) -> Result<()>;
    /// Batch normalization with the running statistics.
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_forward_inference(
        &self,
        p: &BatchNorm,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &Self::Buf,
        running_var: &Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Batch normalization backward (overwrites `dx`, `dgamma`, `dbeta`).
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_backward(
        &self,
        p: &BatchNorm,
        x: &Self::Buf,
        dy: &Self::Buf,
        gamma: &Self::Buf,
        save_mean: &Self::Buf,
        save_inv_std: &Self::Buf,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
    ) -> Result<()>;

    /// Dropout forward: writes `y` and the mask.
    fn dropout_forward(
        &self,
        p: &Dropout,
        x: &Self::Buf,
        y: &mut Self::Buf,
        mask: &mut Self::BufU8,
    ) -> Result<()>;
    /// Dropout backward.
    fn dropout_backward(
        &self,
        p: &Dropout,
        dy: &Self::Buf,
        mask: &Self::BufU8,
        dx: &mut Self::Buf,
    ) -> Result<()>;

    /// `y = f(x)` element-wise.
    fn activation_forward(&self, act: Activation, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// `g = f'(x) * g` in place, from the input `x` and output `y`.
    fn activation_backward_inplace(
        &self,
        act: Activation,
        x: &Self::Buf,
        y: &Self::Buf,
        g: &mut Self::Buf,
    ) -> Result<()>;
    /// `g = f'(x) * g` in place, from the output `y` alone.
    fn activation_backward_from_output(
        &self,
        act: Activation,
        y: &Self::Buf,
        g: &mut Self::Buf,
    ) -> Result<()>;
    /// Row-wise softmax.
    fn softmax_forward(&self, p: &Softmax, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// Row-wise softmax backward from the output.
    fn softmax_backward(
        &self,
        p: &Softmax,
        y: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// Bias gradient `db[c] = sum dy[:, c, :]` (overwrites `db`).
    fn bias_backward(&self, p: &BiasShape, dy: &Self::Buf, db: &mut Self::Buf) -> Result<()>;

    /// Softmax + categorical cross-entropy from logits; returns the batch mean.
    fn softmax_cross_entropy(
        &self,
        p: &LossParams,
        logits: &Self::Buf,
        labels: &Self::Buf,
        losses: &mut Self::Buf,
        dz: Option<&mut Self::Buf>,
    ) -> Result<f64>;
    /// Softmax + sparse categorical cross-entropy from logits.
    fn sparse_softmax_cross_entropy(
        &self,
        p: &LossParams,
        logits: &Self::Buf,
        labels: &Self::BufU32,
        losses: &mut Self::Buf,
        dz: Option<&mut Self::Buf>,
    ) -> Result<f64>;
    /// Sigmoid + binary cross-entropy from logits; also writes `probs`.
    fn sigmoid_cross_entropy(
        &self,
        p: &LossParams,
        logits: &Self::Buf,
        targets: &Self::Buf,
        losses: &mut Self::Buf,
        probs: &mut Self::Buf,
        dz: Option<&mut Self::Buf>,
    ) -> Result<f64>;
    /// Mean squared error.
    fn mse(
        &self,
        p: &LossParams,
        pred: &Self::Buf,
        targets: &Self::Buf,
        losses: &mut Self::Buf,
        dz: Option<&mut Self::Buf>,
    ) -> Result<f64>;
    /// Number of rows whose argmax matches the one-hot label's.
    fn categorical_accuracy(
        &self,
        p: &LossParams,
        scores: &Self::Buf,
        labels: &Self::Buf,
    ) -> Result<f64>;
    /// Number of rows whose argmax equals the label.
    fn sparse_categorical_accuracy(
        &self,
        p: &LossParams,
        scores: &Self::Buf,
        labels: &Self::BufU32,
    ) -> Result<f64>;
    /// Sum over samples of the per-sample binary accuracy.
    fn binary_accuracy(
        &self,
        p: &LossParams,
        probs: &Self::Buf,
        targets: &Self::Buf,
    ) -> Result<f64>;
    /// Sum over samples of the per-sample mean absolute error.
    fn mae(&self, p: &LossParams, pred: &Self::Buf, targets: &Self::Buf) -> Result<f64>;

    /// A fresh optimizer state for parameter tensors of the given sizes.
    fn opt_state_new(&self, opt: &Optimizer, sizes: &[usize]) -> Result<Self::OptState>;
    /// One fused optimizer step over every trainable tensor.
    fn optimizer_step(
        &self,
        opt: &Optimizer,
        state: &mut Self::OptState,
        params: &mut [&mut Self::Buf],
        grads: &[&Self::Buf],
    ) -> Result<()>;
    /// The state on the host (for checkpoints).
    fn opt_state_download(&self, state: &Self::OptState) -> Result<OptimizerState>;
    /// A backend state from a host state.
    fn opt_state_upload(&self, state: &OptimizerState) -> Result<Self::OptState>;
}
