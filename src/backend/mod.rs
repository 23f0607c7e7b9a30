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
//!
//! Losses and metrics do not return their values: they write them into a
//! slot of a [`Backend::Scalars`] buffer, which the caller reads in bulk
//! ([`Backend::scalars_read`]). On the CPU that is a `Vec<f64>`; on a GPU
//! the values stay on the device, so a training step never waits for the
//! device: the fit loop reads them when it draws the progress bar and at the
//! end of each epoch ([`Backend::defers_scalars`]).
//!
//! [`select`] picks a backend at run time (CUDA when a driver and a device
//! are there, else the CPU) and [`AnyBackend`] / [`crate::with_backend!`] run a
//! generic model on whichever was picked.

pub mod cpu;
pub mod cuda;
mod select;

pub use cpu::CpuBackend;
pub use cuda::{GpuBackend, GpuBuf, GpuScalars, GpuStepGraph};
pub use select::{AnyBackend, DeviceChoice, select};

use crate::error::{Error, Result};
use crate::ops::activation::{Activation, Softmax};
use crate::ops::batchnorm::BatchNorm;
use crate::ops::bias::BiasShape;
use crate::ops::conv::Conv2d;
use crate::ops::dropout::Dropout;
use crate::ops::gemm::{Bias, Gemm};
use crate::ops::loss::LossParams;
use crate::ops::optim::{Optimizer, OptimizerState};
use crate::ops::pool::MaxPool2d;

/// The error of a capture method on a backend that does not capture steps.
fn no_capture(backend: String, op: &'static str) -> Error {
    Error::invalid(
        op,
        "backend",
        format!("{backend} does not capture training steps"),
    )
}

/// Rejects a scalar slot outside a buffer of `len` results.
pub(crate) fn check_scalar_slot(len: usize, slot: usize) -> Result<()> {
    if slot >= len {
        return Err(Error::invalid(
            "scalars",
            "slot",
            format!("slot {slot} is out of range (the buffer holds {len} results)"),
        ));
    }
    Ok(())
}

/// Rejects reading more results than a buffer of `len` holds.
pub(crate) fn check_scalars_count(len: usize, count: usize) -> Result<()> {
    if count > len {
        return Err(Error::invalid(
            "scalars_read",
            "count",
            format!("{count} results requested, the buffer holds {len}"),
        ));
    }
    Ok(())
}

/// Rejects an optimizer state made for another rule than `opt`'s.
pub(crate) fn check_opt_kind(opt: &Optimizer, state: &OptimizerState) -> Result<()> {
    if opt.kind != state.kind() {
        return Err(Error::invalid(
            "optimizer state",
            "state",
            format!(
                "state was made for {:?}, optimizer is {:?}",
                state.kind(),
                opt.kind
            ),
        ));
    }
    Ok(())
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
    /// f64 results (batch losses and metric sums) where the backend keeps
    /// them until [`Backend::scalars_read`].
    type Scalars;
    /// The device-resident per-step counters a captured training step reads
    /// ([`crate::cuda::StepClock`] on CUDA; a backend that does not capture
    /// steps has none: an uninhabited type).
    type StepClock;
    /// A recorded training step (a CUDA graph on CUDA; uninhabited where
    /// steps are not captured).
    type StepGraph;

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
    /// A u32 buffer's contents on the host.
    fn download_u32(&self, buf: &Self::BufU32) -> Result<Vec<u32>>;
    /// A u8 buffer's contents on the host.
    fn download_u8(&self, buf: &Self::BufU8) -> Result<Vec<u8>>;
    /// Waits until every op issued so far has finished (a no-op where ops
    /// run synchronously); reports asynchronous device faults. For timing.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// A buffer of `len` f64 results, all 0.
    fn scalars_new(&self, len: usize) -> Result<Self::Scalars>;
    /// The first `count` results on the host (on a GPU: one synchronizing
    /// copy). `count` beyond the buffer is an error.
    fn scalars_read(&self, s: &Self::Scalars, count: usize) -> Result<Vec<f64>>;
    /// Whether reading scalars waits for the device, so that callers should
    /// read them in bulk rather than after every op (false on the CPU).
    fn defers_scalars(&self) -> bool {
        false
    }

    /// `C = act(alpha * op(A) * op(B) + beta * C + bias)` (see [`crate::ops::gemm`]),
    /// the bias one of the backend's buffers ([`Bias`] is the one bias type of
    /// every level).
    fn gemm(
        &self,
        p: &Gemm,
        a: &Self::Buf,
        b: &Self::Buf,
        c: &mut Self::Buf,
        bias: Bias<&Self::Buf>,
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

    /// Softmax + categorical cross-entropy from logits; writes the batch
    /// mean into `out[slot]`.
    #[allow(clippy::too_many_arguments)]
    fn softmax_cross_entropy(
        &self,
        p: &LossParams,
        logits: &Self::Buf,
        labels: &Self::Buf,
        losses: &mut Self::Buf,
        dz: Option<&mut Self::Buf>,
        out: &mut Self::Scalars,
        slot: usize,
    ) -> Result<()>;
    /// Softmax + sparse categorical cross-entropy from logits; writes the
    /// batch mean into `out[slot]`. Labels must be valid class indices: a
    /// backend may give NaN instead of an error for one that is not (the
    /// fit loop checks them on the host).
    #[allow(clippy::too_many_arguments)]
    fn sparse_softmax_cross_entropy(
        &self,
        p: &LossParams,
        logits: &Self::Buf,
        labels: &Self::BufU32,
        losses: &mut Self::Buf,
        dz: Option<&mut Self::Buf>,
        out: &mut Self::Scalars,
        slot: usize,
    ) -> Result<()>;
    /// Sigmoid + binary cross-entropy from logits; also writes `probs`;
    /// writes the batch mean into `out[slot]`.
    #[allow(clippy::too_many_arguments)]
    fn sigmoid_cross_entropy(
        &self,
        p: &LossParams,
        logits: &Self::Buf,
        targets: &Self::Buf,
        losses: &mut Self::Buf,
        probs: &mut Self::Buf,
        dz: Option<&mut Self::Buf>,
        out: &mut Self::Scalars,
        slot: usize,
    ) -> Result<()>;
    /// Mean squared error; writes the batch mean into `out[slot]`.
    #[allow(clippy::too_many_arguments)]
    fn mse(
        &self,
        p: &LossParams,
        pred: &Self::Buf,
        targets: &Self::Buf,
        losses: &mut Self::Buf,
        dz: Option<&mut Self::Buf>,
        out: &mut Self::Scalars,
        slot: usize,
    ) -> Result<()>;
    /// Number of rows whose argmax matches the one-hot label's, into `out[slot]`.
    fn categorical_accuracy(
        &self,
        p: &LossParams,
        scores: &Self::Buf,
        labels: &Self::Buf,
        out: &mut Self::Scalars,
        slot: usize,
    ) -> Result<()>;
    /// Number of rows whose argmax equals the label, into `out[slot]`
    /// (labels as for [`Backend::sparse_softmax_cross_entropy`]).
    fn sparse_categorical_accuracy(
        &self,
        p: &LossParams,
        scores: &Self::Buf,
        labels: &Self::BufU32,
        out: &mut Self::Scalars,
        slot: usize,
    ) -> Result<()>;
    /// Sum over samples of the per-sample binary accuracy, into `out[slot]`.
    fn binary_accuracy(
        &self,
        p: &LossParams,
        probs: &Self::Buf,
        targets: &Self::Buf,
        out: &mut Self::Scalars,
        slot: usize,
    ) -> Result<()>;
    /// Sum over samples of the per-sample mean absolute error, into `out[slot]`.
    fn mae(
        &self,
        p: &LossParams,
        pred: &Self::Buf,
        targets: &Self::Buf,
        out: &mut Self::Scalars,
        slot: usize,
    ) -> Result<()>;

    /// Sets the optimizer's step counter (`iterations`) without running a
    /// step: a captured step's replays advance the device's clock, and the
    /// fit loop keeps the host's count with this.
    fn opt_state_set_iterations(&self, state: &mut Self::OptState, iterations: u64);

    // ---- Captured training steps (see `crate::train`'s module docs). A
    // backend that cannot capture keeps the defaults: not supported, and
    // every capture method an error naming the backend.

    /// Whether this backend records a training step once and replays it
    /// (CUDA graphs); `fit` runs every step directly otherwise.
    fn captures_steps(&self) -> bool {
        false
    }
    /// A step clock for epochs of up to `rows` steps, at step 0, row 0.
    fn step_clock_new(&self, rows: usize) -> Result<Self::StepClock> {
        let _ = rows;
        Err(no_capture(self.name(), "step_clock_new"))
    }
    /// Sets the clock to training step `step` and row `row` of the epoch
    /// (outside a capture).
    fn step_clock_set(&self, clock: &mut Self::StepClock, step: u64, row: u64) -> Result<()> {
        let _ = (clock, step, row);
        Err(no_capture(self.name(), "step_clock_set"))
    }
    /// Sets the clock's learning-rate rows, `(lr_t, adam_step)` of each step
    /// of the epoch (outside a capture).
    fn step_clock_set_lr_rows(&self, clock: &mut Self::StepClock, rows: &[[f32; 2]]) -> Result<()> {
        let _ = (clock, rows);
        Err(no_capture(self.name(), "step_clock_set_lr_rows"))
    }
    /// Copies `step_row` into row `clock.row` of `results` (rows of
    /// `step_row`'s length) and advances the clock's step and row, on the
    /// device: the last op of a captured step.
    fn step_clock_tick(
        &self,
        clock: &mut Self::StepClock,
        step_row: &Self::Scalars,
        results: &mut Self::Scalars,
    ) -> Result<()> {
        let _ = (clock, step_row, results);
        Err(no_capture(self.name(), "step_clock_tick"))
    }
    /// [`Backend::dropout_forward`] with the Philox offset's step read from
    /// `clock` (`p.offset` holds the layer's index alone).
    fn dropout_forward_clocked(
        &self,
        p: &Dropout,
        clock: &Self::StepClock,
        x: &Self::Buf,
        y: &mut Self::Buf,
        mask: &mut Self::BufU8,
    ) -> Result<()> {
        let _ = (p, clock, x, y, mask);
        Err(no_capture(self.name(), "dropout_forward_clocked"))
    }
    /// [`Backend::optimizer_step`] with the iteration-dependent scalars
    /// taken from `clock`'s learning-rate row; leaves `iterations` alone.
    fn optimizer_step_clocked(
        &self,
        opt: &Optimizer,
        state: &mut Self::OptState,
        clock: &Self::StepClock,
        params: &mut [&mut Self::Buf],
        grads: &[&Self::Buf],
    ) -> Result<()> {
        let _ = (opt, state, clock, params, grads);
        Err(no_capture(self.name(), "optimizer_step_clocked"))
    }
    /// Starts recording the ops issued from now on (they do not run).
    fn step_capture_begin(&self) -> Result<()> {
        Err(no_capture(self.name(), "step_capture_begin"))
    }
    /// Ends the recording into a step graph (call it also when the ops in
    /// between failed, so the backend stops recording).
    fn step_capture_end(&self) -> Result<Self::StepGraph> {
        Err(no_capture(self.name(), "step_capture_end"))
    }
    /// Whether `g` still refers to the backend's current scratch buffers
    /// (a scratch that grew since the capture moved, and the graph would
    /// use the freed one): replay only a current graph.
    fn step_graph_current(&self, g: &Self::StepGraph) -> bool {
        let _ = g;
        false
    }
    /// Enqueues one replay of `g`.
    fn step_replay(&self, g: &Self::StepGraph) -> Result<()> {
        let _ = g;
        Err(no_capture(self.name(), "step_replay"))
    }
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
    /// Steps taken by the optimizer (`iterations` in Keras), without a copy.
    fn opt_state_iterations(&self, state: &Self::OptState) -> u64;
    /// The state on the host (for checkpoints); `opt` is the optimizer the
    /// state was made for.
    fn opt_state_download(&self, opt: &Optimizer, state: &Self::OptState)
    -> Result<OptimizerState>;
    /// A backend state from a host state, for the optimizer `opt`.
    fn opt_state_upload(&self, opt: &Optimizer, state: &OptimizerState) -> Result<Self::OptState>;
}
