//! CUDA losses and metrics (`kernels/loss.cu`), mirroring [`super::cpu`]:
//! the same parameters, the same length checks before any launch, the same
//! return values.
//!
//! Each call launches one kernel (one warp per row) that writes the
//! per-sample values, then sums them on the device in fixed-size chunks
//! (f64, fixed-shape trees, no float atomics, so the same inputs give the
//! same bits), and downloads the one total: like the CPU functions these
//! return the batch value as `f64`, so **every call synchronizes the
//! stream** (8 bytes come back). The small scratch buffers (chunk partials,
//! the error counter) are allocated per call on the stream.
//!
//! Sparse labels are validated on the device: a label `>= classes` is never
//! used as an index; the kernel counts the bad rows and records the first
//! one, and the wrapper returns the same error as the CPU (naming that row
//! and its value, after the launch). On that error the outputs hold NaN in
//! the bad rows and valid values elsewhere; the CPU writes nothing instead.

use cudarc::driver::{
    CudaView, CudaViewMut, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::LossParams;
use crate::cuda::{CudaBackend, KernelModule, MODULES};
use crate::error::{Error, Result};

// SAFETY: `LossParams` is `#[repr(C)]` plain old data (two usize and an f32,
// no pointers), mirrored field for field by `struct LossParams` in
// kernels/loss.cu, which static_asserts the same size.
unsafe impl DeviceRepr for LossParams {}

const _: () = assert!(std::mem::size_of::<LossParams>() == 24);

/// `kernels/loss.cu`, found by name in the registry (`src/cuda/modules.rs`
/// re-exports only the list).
fn module() -> Result<&'static KernelModule> {
    MODULES
        .iter()
        .copied()
        .find(|m| m.name == "loss")
        .ok_or_else(|| Error::invalid("loss", "module", "kernels/loss.cu is not registered"))
}

/// Elements per chunk of the device sums (each chunk one block's f64 tree).
const SUM_CHUNK: usize = 4096;
/// Threads per block of the sum kernels.
const SUM_THREADS: u32 = 256;

/// `grad_scale / denom`, rounded once to f32 (as the CPU's `scale_over`).
fn scale_over(p: &LossParams, denom: f64) -> f32 {
    (p.grad_scale as f64 / denom) as f32
}

/// One warp per row, rows grid-strided over the warps.
fn row_config(gpu: &CudaBackend, p: &LossParams) -> LaunchConfig {
    gpu.elementwise_config(p.n.saturating_mul(32))
}

fn sum_config(gpu: &CudaBackend, chunks: usize) -> LaunchConfig {
    let cap = (gpu.info().multiprocessors.max(1) * 8) as usize;
    LaunchConfig {
        grid_dim: (chunks.clamp(1, cap) as u32, 1, 1),
        block_dim: (SUM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Reduces the f64 `partials` (`len` of them) to one value on the device by
/// repeated chunk sums, then downloads it.
fn finish_sum(
    gpu: &CudaBackend,
    mut partials: cudarc::driver::CudaSlice<f64>,
    mut len: usize,
) -> Result<f64> {
    let f = gpu.function(module()?, "loss_sum_f64")?;
    while len > 1 {
        let next_len = len.div_ceil(SUM_CHUNK);
        let mut next = gpu.zeros::<f64>(next_len)?;
        let (n, chunk) = (len as u64, SUM_CHUNK as u64);
        // SAFETY: reads partials[..len] (its length) and writes
        // next[..ceil(len / SUM_CHUNK)] (its length).
        let r = unsafe {
            gpu.stream()
                .launch_builder(&f)
                .arg(&partials)
                .arg(&n)
                .arg(&chunk)
                .arg(&mut next)
                .launch(sum_config(gpu, next_len))
        };
        gpu.launched("loss_sum_f64", r)?;
        partials = next;
        len = next_len;
    }
    Ok(gpu.download(&partials)?[0])
}

/// The fixed-order f64 sum of a device buffer of f32 (`kernel =
/// "loss_sum_f32"`) or f64 (`"loss_sum_f64"`) values.
fn device_sum<T: DeviceRepr>(gpu: &CudaBackend, kernel: &str, x: &CudaView<'_, T>) -> Result<f64> {
    let n = x.len();
    if n == 0 {
        return Ok(0.0);
    }
    let chunks = n.div_ceil(SUM_CHUNK);
    let mut partials = gpu.zeros::<f64>(chunks)?;
    let f = gpu.function(module()?, kernel)?;
    let (n64, chunk) = (n as u64, SUM_CHUNK as u64);
    // SAFETY: reads x[..n] (its length), writes partials[..ceil(n / SUM_CHUNK)]
    // (its length).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(x)
            .arg(&n64)
            .arg(&chunk)
            .arg(&mut partials)
            .launch(sum_config(gpu, chunks))
    };
    gpu.launched(kernel, r)?;
    finish_sum(gpu, partials, chunks)
}

/// Checks the optional `[n, classes]` outputs.
fn check_opt(
    p: &LossParams,
    op: &'static str,
    what: &str,
    buf: &Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    match buf {
        Some(b) => p.check_mat(op, what, b.len()),
        None => Ok(()),
    }
}

/// Reads the device error counter of a sparse-label kernel and, when a
/// label was out of range, builds the CPU's error for the first bad row.
fn check_label_error(
    gpu: &CudaBackend,
    p: &LossParams,
    op: &'static str,
    err: &cudarc::driver::CudaSlice<u64>,
    labels: &CudaView<'_, u32>,
) -> Result<()> {
    let e = gpu.download(err)?;
    if e[0] == 0 {
        return Ok(());
    }
    let row = (!e[1]) as usize;
    let v = gpu
        .stream()
        .clone_dtoh(&labels.slice(row..row + 1))
        .map_err(|e| gpu.error("cuMemcpyDtoH", e))?[0];
    Err(Error::invalid(
        op,
        "labels",
        format!(
            "row {row}: class index {v} is out of range (classes = {}, valid 0..{}; {} bad row(s))",
            p.classes, p.classes, e[0]
        ),
    ))
}

/// The two float-label losses share their launch: `kernel(p, gs, a, b,
/// losses, probs, dz)`.
#[allow(clippy::too_many_arguments)]
fn launch_float_labels(
    gpu: &CudaBackend,
    kernel: &'static str,
    p: &LossParams,
    gs: f32,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    mut probs: Option<&mut CudaViewMut<'_, f32>>,
    mut dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    let f = gpu.function(module()?, kernel)?;
    let stream = gpu.stream();
    {
        // Absent outputs are passed as null pointers, which the kernel tests.
        let probs_g = probs.as_mut().map(|v| v.device_ptr_mut(stream));
        let dz_g = dz.as_mut().map(|v| v.device_ptr_mut(stream));
        let probs_ptr: u64 = probs_g.as_ref().map_or(0, |g| g.0);
        let dz_ptr: u64 = dz_g.as_ref().map_or(0, |g| g.0);
        // SAFETY: the caller checked a, b (and probs, dz when present) to hold
        // n * classes elements and losses n; the kernel touches rows < n only,
        // elements < classes of each. The raw pointers come from views that
        // stay borrowed until after the launch.
        let r = unsafe {
            stream
                .launch_builder(&f)
                .arg(p)
                .arg(&gs)
                .arg(a)
                .arg(b)
                .arg(&mut *losses)
                .arg(&probs_ptr)
                .arg(&dz_ptr)
                .launch(row_config(gpu, p))
        };
        gpu.launched(kernel, r)?;
    }
    Ok(device_sum(gpu, "loss_sum_f32", &losses.as_view())? / p.n as f64)
}

/// Softmax + categorical cross-entropy on the device; see
/// [`super::cpu::softmax_cross_entropy`]. Returns the batch-mean loss
/// (synchronizes).
pub fn softmax_cross_entropy(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    const OP: &str = "softmax_cross_entropy";
    p.check_mat(OP, "logits", logits.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "probs", &probs)?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_mat(OP, "labels", labels.len())?;
    let gs = scale_over(p, p.n as f64);
    launch_float_labels(
        gpu,
        "softmax_xent",
        p,
        gs,
        logits,
        labels,
        losses,
        probs,
        dz,
    )
}

/// Softmax + cross-entropy with class indices on the device; see
/// [`super::cpu::sparse_softmax_cross_entropy`]. Labels are validated on
/// the device (see the module docs). Returns the batch-mean loss
/// (synchronizes).
pub fn sparse_softmax_cross_entropy(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    losses: &mut CudaViewMut<'_, f32>,
    mut probs: Option<&mut CudaViewMut<'_, f32>>,
    mut dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    const OP: &str = "sparse_softmax_cross_entropy";
    const KERNEL: &str = "sparse_softmax_xent";
    p.check_mat(OP, "logits", logits.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "probs", &probs)?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_rows(OP, "labels", labels.len())?;
    let gs = scale_over(p, p.n as f64);
    let f = gpu.function(module()?, KERNEL)?;
    let mut err = gpu.zeros::<u64>(2)?;
    let stream = gpu.stream();
    {
        let probs_g = probs.as_mut().map(|v| v.device_ptr_mut(stream));
        let dz_g = dz.as_mut().map(|v| v.device_ptr_mut(stream));
        let probs_ptr: u64 = probs_g.as_ref().map_or(0, |g| g.0);
        let dz_ptr: u64 = dz_g.as_ref().map_or(0, |g| g.0);
        // SAFETY: logits (and probs, dz when present) hold n * classes
        // elements, labels and losses n, err 2; the kernel reads a logit at
        // a label only after checking label < classes.
        let r = unsafe {
            stream
                .launch_builder(&f)
                .arg(p)
                .arg(&gs)
                .arg(logits)
                .arg(labels)
                .arg(&mut *losses)
                .arg(&probs_ptr)
                .arg(&dz_ptr)
                .arg(&mut err)
                .launch(row_config(gpu, p))
        };
        gpu.launched(KERNEL, r)?;
    }
    check_label_error(gpu, p, OP, &err, labels)?;
    Ok(device_sum(gpu, "loss_sum_f32", &losses.as_view())? / p.n as f64)
}

/// Sigmoid + binary cross-entropy on the device; see
/// [`super::cpu::sigmoid_cross_entropy`]. Returns the batch-mean loss
/// (synchronizes).
pub fn sigmoid_cross_entropy(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    const OP: &str = "sigmoid_cross_entropy";
    p.check_mat(OP, "logits", logits.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "probs", &probs)?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_mat(OP, "targets", targets.len())?;
    let gs = scale_over(p, p.n as f64 * p.classes as f64);
    launch_float_labels(
        gpu,
        "sigmoid_xent",
        p,
        gs,
        logits,
        targets,
        losses,
        probs,
        dz,
    )
}

/// Mean squared error on the device; see [`super::cpu::mse`]. Returns the
/// batch-mean loss (synchronizes).
pub fn mse(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    mut dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    const OP: &str = "mse";
    const KERNEL: &str = "mse_loss";
    p.check_mat(OP, "pred", pred.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_mat(OP, "targets", targets.len())?;
    let gs = scale_over(p, p.n as f64 * p.classes as f64 / 2.0);
    let f = gpu.function(module()?, KERNEL)?;
    let stream = gpu.stream();
    {
        let dz_g = dz.as_mut().map(|v| v.device_ptr_mut(stream));
        let dz_ptr: u64 = dz_g.as_ref().map_or(0, |g| g.0);
        // SAFETY: pred, targets (and dz when present) hold n * classes
        // elements, losses n; the kernel touches rows < n only.
        let r = unsafe {
            stream
                .launch_builder(&f)
                .arg(p)
                .arg(&gs)
                .arg(pred)
                .arg(targets)
                .arg(&mut *losses)
                .arg(&dz_ptr)
                .launch(row_config(gpu, p))
        };
        gpu.launched(KERNEL, r)?;
    }
    Ok(device_sum(gpu, "loss_sum_f32", &losses.as_view())? / p.n as f64)
}

/// Launches a metric kernel `kernel(p, a, b, rows)` writing one f64 per
/// row, and returns the fixed-order sum of the rows.
fn metric_rows(
    gpu: &CudaBackend,
    kernel: &'static str,
    p: &LossParams,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
) -> Result<f64> {
    let f = gpu.function(module()?, kernel)?;
    let mut rows = gpu.zeros::<f64>(p.n)?;
    // SAFETY: a and b were checked to hold n * classes elements, rows holds n.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(a)
            .arg(b)
            .arg(&mut rows)
            .launch(row_config(gpu, p))
    };
    gpu.launched(kernel, r)?;
    device_sum(gpu, "loss_sum_f64", &rows.as_view())
}

/// Rows where `argmax(scores) == argmax(labels)`, on the device; see
/// [`super::cpu::categorical_accuracy`] (exactly the same count).
pub fn categorical_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
) -> Result<f64> {
    const OP: &str = "categorical_accuracy";
    p.check_mat(OP, "scores", scores.len())?;
    p.check_mat(OP, "labels", labels.len())?;
    metric_rows(gpu, "metric_categorical_accuracy", p, scores, labels)
}

/// Rows where `argmax(scores) == labels[i]`, on the device; see
/// [`super::cpu::sparse_categorical_accuracy`]. Labels out of range are
/// the CPU's error, found on the device.
pub fn sparse_categorical_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
) -> Result<f64> {
    const OP: &str = "sparse_categorical_accuracy";
    const KERNEL: &str = "metric_sparse_accuracy";
    p.check_mat(OP, "scores", scores.len())?;
    p.check_rows(OP, "labels", labels.len())?;
    let f = gpu.function(module()?, KERNEL)?;
    let mut rows = gpu.zeros::<f64>(p.n)?;
    let mut err = gpu.zeros::<u64>(2)?;
    // SAFETY: scores holds n * classes elements, labels and rows n, err 2.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(scores)
            .arg(labels)
            .arg(&mut rows)
            .arg(&mut err)
            .launch(row_config(gpu, p))
    };
    gpu.launched(KERNEL, r)?;
    check_label_error(gpu, p, OP, &err, labels)?;
    device_sum(gpu, "loss_sum_f64", &rows.as_view())
}

/// Keras 2.3.1's binary accuracy summed over the batch, on the device; see
/// [`super::cpu::binary_accuracy`] (the same value: integer counts).
pub fn binary_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    probs: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
) -> Result<f64> {
    const OP: &str = "binary_accuracy";
    p.check_mat(OP, "probs", probs.len())?;
    p.check_mat(OP, "targets", targets.len())?;
    Ok(metric_rows(gpu, "metric_binary_accuracy", p, probs, targets)? / p.classes as f64)
}

/// Mean absolute error summed over the batch, on the device; see
/// [`super::cpu::mae`].
pub fn mae(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
) -> Result<f64> {
    const OP: &str = "mae";
    p.check_mat(OP, "pred", pred.len())?;
    p.check_mat(OP, "targets", targets.len())?;
    metric_rows(gpu, "metric_mae", p, pred, targets)
}
