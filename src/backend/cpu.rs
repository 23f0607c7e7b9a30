//! The CPU backend: host `Vec`s and the rayon references of [`crate::ops`].

use super::{Backend, check_opt_kind, check_scalar_slot, check_scalars_count};
use crate::error::{Error, Result, check_len};
use crate::ops::activation::{self, Activation, Softmax};
use crate::ops::batchnorm::{self, BatchNorm};
use crate::ops::bias::{self, BiasShape};
use crate::ops::conv::{self, Conv2d};
use crate::ops::dropout::{self, Dropout};
use crate::ops::gemm::{self, Bias, Epilogue, Gemm};
use crate::ops::loss::{self, LossParams};
use crate::ops::optim::{self, Optimizer, OptimizerState};
use crate::ops::pool::{self, MaxPool2d};

/// The CPU backend (rayon, host memory).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// Runs the CPU training loop on a worker of rayon's pool
/// ([`crate::cpu_pool`] says why); here beside the backend it serves.
pub use crate::cpu_pool::on_pool;

/// Copies rows `rows[i]` of `src` to row `i` of `dst` (the batch gather).
pub(super) fn gather<T: Copy>(
    op: &'static str,
    src: &[T],
    row_len: usize,
    rows: &[usize],
    dst: &mut [T],
) -> Result<()> {
    check_len(op, "dst (rows x row_len)", dst.len(), rows.len() * row_len)?;
    let count = src.len().checked_div(row_len).unwrap_or(0);
    for (d, &r) in dst.chunks_mut(row_len.max(1)).zip(rows) {
        if r >= count {
            return Err(Error::invalid(
                op,
                "rows",
                format!("row {r} is out of range (source has {count} rows)"),
            ));
        }
        d.copy_from_slice(&src[r * row_len..(r + 1) * row_len]);
    }
    Ok(())
}

/// `out[slot] = v`, or an error naming the slot.
fn put(out: &mut [f64], slot: usize, v: f64) -> Result<()> {
    check_scalar_slot(out.len(), slot)?;
    out[slot] = v;
    Ok(())
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type BufU32 = Vec<u32>;
    type BufU8 = Vec<u8>;
    type OptState = OptimizerState;
    type Scalars = Vec<f64>;
    // The CPU runs every step directly: nothing to capture.
    type StepClock = std::convert::Infallible;
    type StepGraph = std::convert::Infallible;

    fn name(&self) -> String {
        "cpu".to_string()
    }
    fn alloc_f32(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn alloc_u32(&self, len: usize) -> Result<Vec<u32>> {
        Ok(vec![0; len])
    }
    fn alloc_u8(&self, len: usize) -> Result<Vec<u8>> {
        Ok(vec![0; len])
    }
    fn len_f32(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn upload_f32(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn upload_into_f32(&self, host: &[f32], dst: &mut Vec<f32>) -> Result<()> {
        check_len("upload", "dst", dst.len(), host.len())?;
        dst.copy_from_slice(host);
        Ok(())
    }
    fn upload_rows_f32(
        &self,
        src: &[f32],
        row_len: usize,
        rows: &[usize],
        dst: &mut Vec<f32>,
    ) -> Result<()> {
        gather("upload_rows", src, row_len, rows, dst)
    }
    fn upload_rows_u32(
        &self,
        src: &[u32],
        row_len: usize,
        rows: &[usize],
        dst: &mut Vec<u32>,
    ) -> Result<()> {
        gather("upload_rows", src, row_len, rows, dst)
    }
    fn download_f32(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn download_into_f32(&self, buf: &Vec<f32>, host: &mut [f32]) -> Result<()> {
        check_len("download", "host", host.len(), buf.len())?;
        host.copy_from_slice(buf);
        Ok(())
    }
    fn copy_f32(&self, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<()> {
        check_len("copy", "dst", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn download_u32(&self, buf: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(buf.clone())
    }
    fn download_u8(&self, buf: &Vec<u8>) -> Result<Vec<u8>> {
        Ok(buf.clone())
    }
    fn scalars_new(&self, len: usize) -> Result<Vec<f64>> {
        Ok(vec![0.0; len])
    }
    fn scalars_read(&self, s: &Vec<f64>, count: usize) -> Result<Vec<f64>> {
        check_scalars_count(s.len(), count)?;
        Ok(s[..count].to_vec())
    }

    fn gemm(
        &self,
        p: &Gemm,
        a: &Vec<f32>,
        b: &Vec<f32>,
        c: &mut Vec<f32>,
        bias: Bias<&Vec<f32>>,
        act: Activation,
    ) -> Result<()> {
        let bias = bias.map(Vec::as_slice);
        gemm::cpu::gemm(
            p,
            a,
            b,
            c,
            Epilogue {
                bias,
                activation: act,
            },
        )
    }

    fn conv_forward(
        &self,
        p: &Conv2d,
        x: &Vec<f32>,
        w: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        act: Activation,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        conv::cpu::forward(p, x, w, bias.map(|b| b.as_slice()), act, y)
    }
    fn conv_backward_data(
        &self,
        p: &Conv2d,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        conv::cpu::backward_data(p, dy, w, dx)
    }
    fn conv_backward_filter(
        &self,
        p: &Conv2d,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        dw: &mut Vec<f32>,
    ) -> Result<()> {
        conv::cpu::backward_filter(p, x, dy, dw)
    }

    fn maxpool_forward(
        &self,
        p: &MaxPool2d,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        argmax: &mut Vec<u32>,
    ) -> Result<()> {
        pool::cpu::forward(p, x, y, argmax)
    }
    fn maxpool_forward_inference(
        &self,
        p: &MaxPool2d,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        pool::cpu::forward_inference(p, x, y)
    }
    fn maxpool_backward(
        &self,
        p: &MaxPool2d,
        dy: &Vec<f32>,
        argmax: &Vec<u32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        pool::cpu::backward(p, dy, argmax, dx)
    }

    fn batchnorm_forward_training(
        &self,
        p: &BatchNorm,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        y: &mut Vec<f32>,
        save_mean: &mut Vec<f32>,
        save_inv_std: &mut Vec<f32>,
        running_mean: &mut Vec<f32>,
        running_var: &mut Vec<f32>,
    ) -> Result<()> {
        batchnorm::cpu::forward_training(
            p,
            x,
            gamma,
            beta,
            y,
            save_mean,
            save_inv_std,
            running_mean,
            running_var,
        )
    }
    fn batchnorm_forward_inference(
        &self,
        p: &BatchNorm,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        running_mean: &Vec<f32>,
        running_var: &Vec<f32>,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        batchnorm::cpu::forward_inference(p, x, gamma, beta, running_mean, running_var, y)
    }
    fn batchnorm_backward(
        &self,
        p: &BatchNorm,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        gamma: &Vec<f32>,
        save_mean: &Vec<f32>,
        save_inv_std: &Vec<f32>,
        dx: &mut Vec<f32>,
        dgamma: &mut Vec<f32>,
        dbeta: &mut Vec<f32>,
    ) -> Result<()> {
        batchnorm::cpu::backward(p, x, dy, gamma, save_mean, save_inv_std, dx, dgamma, dbeta)
    }

    fn dropout_forward(
        &self,
        p: &Dropout,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        mask: &mut Vec<u8>,
    ) -> Result<()> {
        dropout::cpu::forward(p, x, y, mask)
    }
    fn dropout_backward(
        &self,
        p: &Dropout,
        dy: &Vec<f32>,
        mask: &Vec<u8>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        dropout::cpu::backward(p, dy, mask, dx)
    }

    fn activation_forward(&self, act: Activation, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        activation::cpu::forward(act, x, y)
    }
    fn activation_backward_inplace(
        &self,
        act: Activation,
        x: &Vec<f32>,
        y: &Vec<f32>,
        g: &mut Vec<f32>,
    ) -> Result<()> {
        activation::cpu::backward_inplace(act, x, y, g)
    }
    fn activation_backward_from_output(
        &self,
        act: Activation,
        y: &Vec<f32>,
        g: &mut Vec<f32>,
    ) -> Result<()> {
        activation::cpu::backward_from_output(act, y, g)
    }
    fn softmax_forward(&self, p: &Softmax, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        activation::cpu::softmax_forward(p, x, y)
    }
    fn softmax_backward(
        &self,
        p: &Softmax,
        y: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        activation::cpu::softmax_backward(p, y, dy, dx)
    }
    fn bias_backward(&self, p: &BiasShape, dy: &Vec<f32>, db: &mut Vec<f32>) -> Result<()> {
        bias::cpu::backward(p, dy, db)
    }

    fn softmax_cross_entropy(
        &self,
        p: &LossParams,
        logits: &Vec<f32>,
        labels: &Vec<f32>,
        losses: &mut Vec<f32>,
        dz: Option<&mut Vec<f32>>,
        out: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        let dz = dz.map(|d| &mut d[..]);
        let v = loss::cpu::softmax_cross_entropy(p, logits, labels, losses, None, dz)?;
        put(out, slot, v)
    }
    fn sparse_softmax_cross_entropy(
        &self,
        p: &LossParams,
        logits: &Vec<f32>,
        labels: &Vec<u32>,
        losses: &mut Vec<f32>,
        dz: Option<&mut Vec<f32>>,
        out: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        let dz = dz.map(|d| &mut d[..]);
        let v = loss::cpu::sparse_softmax_cross_entropy(p, logits, labels, losses, None, dz)?;
        put(out, slot, v)
    }
    fn sigmoid_cross_entropy(
        &self,
        p: &LossParams,
        logits: &Vec<f32>,
        targets: &Vec<f32>,
        losses: &mut Vec<f32>,
        probs: &mut Vec<f32>,
        dz: Option<&mut Vec<f32>>,
        out: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        let dz = dz.map(|d| &mut d[..]);
        let v = loss::cpu::sigmoid_cross_entropy(p, logits, targets, losses, Some(probs), dz)?;
        put(out, slot, v)
    }
    fn mse(
        &self,
        p: &LossParams,
        pred: &Vec<f32>,
        targets: &Vec<f32>,
        losses: &mut Vec<f32>,
        dz: Option<&mut Vec<f32>>,
        out: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        let v = loss::cpu::mse(p, pred, targets, losses, dz.map(|d| &mut d[..]))?;
        put(out, slot, v)
    }
    fn categorical_accuracy(
        &self,
        p: &LossParams,
        scores: &Vec<f32>,
        labels: &Vec<f32>,
        out: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        put(
            out,
            slot,
            loss::cpu::categorical_accuracy(p, scores, labels)?,
        )
    }
    fn sparse_categorical_accuracy(
        &self,
        p: &LossParams,
        scores: &Vec<f32>,
        labels: &Vec<u32>,
        out: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        let v = loss::cpu::sparse_categorical_accuracy(p, scores, labels)?;
        put(out, slot, v)
    }
    fn binary_accuracy(
        &self,
        p: &LossParams,
        probs: &Vec<f32>,
        targets: &Vec<f32>,
        out: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        put(out, slot, loss::cpu::binary_accuracy(p, probs, targets)?)
    }
    fn mae(
        &self,
        p: &LossParams,
        pred: &Vec<f32>,
        targets: &Vec<f32>,
        out: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        put(out, slot, loss::cpu::mae(p, pred, targets)?)
    }

    fn opt_state_new(&self, opt: &Optimizer, sizes: &[usize]) -> Result<OptimizerState> {
        OptimizerState::new(opt, sizes)
    }
    fn optimizer_step(
        &self,
        opt: &Optimizer,
        state: &mut OptimizerState,
        params: &mut [&mut Vec<f32>],
        grads: &[&Vec<f32>],
    ) -> Result<()> {
        // Slices of the Vecs, in a small stack-free buffer: a handful of
        // pointers per step.
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|v| v.as_mut_slice()).collect();
        let g: Vec<&[f32]> = grads.iter().map(|v| v.as_slice()).collect();
        optim::cpu::step(opt, state, &mut p, &g)
    }
    fn opt_state_set_iterations(&self, state: &mut OptimizerState, iterations: u64) {
        state.set_iterations(iterations);
    }
    fn opt_state_iterations(&self, state: &OptimizerState) -> u64 {
        state.iterations()
    }
    fn opt_state_download(
        &self,
        opt: &Optimizer,
        state: &OptimizerState,
    ) -> Result<OptimizerState> {
        check_opt_kind(opt, state)?;
        Ok(state.clone())
    }
    fn opt_state_upload(&self, opt: &Optimizer, state: &OptimizerState) -> Result<OptimizerState> {
        check_opt_kind(opt, state)?;
        Ok(state.clone())
    }
}
