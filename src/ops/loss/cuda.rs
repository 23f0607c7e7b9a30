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
use crate::error::{Error, Result, check_len};

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

/// One chunk-sum pass: `out[i] = sum of x[i*chunk..]` for every chunk of
/// the `len` values of `x`, with `kernel` ("loss_sum_f32" or
/// "loss_sum_f64").
///
/// # Safety
/// `x` must hold at least `len` elements and `out` at least
/// `ceil(len / chunk)`.
unsafe fn sum_pass<T: DeviceRepr>(
    gpu: &CudaBackend,
    kernel: &str,
    x: &CudaView<'_, T>,
    len: usize,
    chunk: usize,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    let f = gpu.function(module()?, kernel)?;
    let next_len = len.div_ceil(chunk);
    let (n, chunk) = (len as u64, chunk as u64);
    // SAFETY: reads x[..len] and writes out[..ceil(len / chunk)], both in
    // bounds per the caller.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(x)
            .arg(&n)
            .arg(&chunk)
            .arg(out)
            .launch(sum_config(gpu, next_len))
    };
    gpu.launched(kernel, r)
}

/// The fixed-order f64 sum of a device buffer of f32 (`kernel =
/// "loss_sum_f32"`) or f64 (`"loss_sum_f64"`) values, written into the
/// one-element `out` on the device (no synchronization): sums of `chunk`
/// consecutive values, then chunk sums of those, until one value remains.
/// 0 for an empty `x`. The bits depend on `chunk` and the values only.
fn device_sum_into<T: DeviceRepr>(
    gpu: &CudaBackend,
    kernel: &str,
    x: &CudaView<'_, T>,
    chunk: usize,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    check_len("loss.sum", "out (one f64)", out.len(), 1)?;
    if chunk < 2 {
        return Err(Error::invalid(
            "loss.sum",
            "chunk",
            format!("chunk = {chunk}: each pass must combine at least 2 values"),
        ));
    }
    let n = x.len();
    if n == 0 {
        return gpu
            .stream()
            .memset_zeros(out)
            .map_err(|e| gpu.error("cuMemsetD8 (loss sum)", e));
    }
    let chunks = n.div_ceil(chunk);
    if chunks == 1 {
        // SAFETY: x holds n elements; out one = ceil(n / chunk).
        return unsafe { sum_pass(gpu, kernel, x, n, chunk, out) };
    }
    let mut partials = gpu.zeros::<f64>(chunks)?;
    // SAFETY: x holds n elements, partials ceil(n / chunk).
    unsafe { sum_pass(gpu, kernel, x, n, chunk, &mut partials.as_view_mut())? };
    let mut len = chunks;
    loop {
        let next_len = len.div_ceil(chunk);
        if next_len == 1 {
            // SAFETY: partials holds len elements; out one.
            return unsafe { sum_pass(gpu, "loss_sum_f64", &partials.as_view(), len, chunk, out) };
        }
        let mut next = gpu.zeros::<f64>(next_len)?;
        // SAFETY: partials holds len elements, next ceil(len / chunk).
        unsafe {
            sum_pass(
                gpu,
                "loss_sum_f64",
                &partials.as_view(),
                len,
                chunk,
                &mut next.as_view_mut(),
            )?
        };
        partials = next;
        len = next_len;
    }
}

/// The fixed-order f64 sum of `x` that the losses use for their batch
/// totals, with sums over `chunk` consecutive values per pass (the losses
/// use 4096) and as many passes as it takes; synchronizes and returns it.
/// Deterministic: the same values and chunk give the same bits.
pub fn sum_f32(gpu: &CudaBackend, x: &CudaView<'_, f32>, chunk: usize) -> Result<f64> {
    to_host(gpu, |total| {
        device_sum_into(gpu, "loss_sum_f32", x, chunk, total)
    })
}

/// Runs `f` with a fresh one-element device total and downloads it
/// (synchronizes): the host-returning wrappers below.
fn to_host(
    gpu: &CudaBackend,
    f: impl FnOnce(&mut CudaViewMut<'_, f64>) -> Result<()>,
) -> Result<f64> {
    let mut total = gpu.zeros::<f64>(1)?;
    f(&mut total.as_view_mut())?;
    Ok(gpu.download(&total)?[0])
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
/// losses, probs, dz)`, then the sum of `losses` into `total`.
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
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
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
    device_sum_into(gpu, "loss_sum_f32", &losses.as_view(), SUM_CHUNK, total)
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
    let sum = to_host(gpu, |t| {
        softmax_cross_entropy_into(gpu, p, logits, labels, losses, probs, dz, t)
    })?;
    Ok(sum / p.n as f64)
}

/// [`softmax_cross_entropy`] without the synchronization: writes the *sum*
/// of the per-sample losses (not the mean) into the one-element `total` on
/// the device.
#[allow(clippy::too_many_arguments)]
pub fn softmax_cross_entropy_into(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    const OP: &str = "softmax_cross_entropy";
    p.check_mat(OP, "logits", logits.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "probs", &probs)?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_mat(OP, "labels", labels.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
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
        total,
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
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    let sum = to_host(gpu, |t| {
        sparse_xent(gpu, p, logits, labels, losses, probs, dz, t, true)
    })?;
    Ok(sum / p.n as f64)
}

/// [`sparse_softmax_cross_entropy`] without the synchronization: writes the
/// *sum* of the per-sample losses into the one-element `total` on the
/// device. Labels are not reported back (that would synchronize): a label
/// `>= classes` is still never used as an index, and its row's loss and
/// `dz` are NaN, so the total is NaN. Validate labels on the host first.
#[allow(clippy::too_many_arguments)]
pub fn sparse_softmax_cross_entropy_into(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    sparse_xent(gpu, p, logits, labels, losses, probs, dz, total, false)
}

#[allow(clippy::too_many_arguments)]
fn sparse_xent(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    losses: &mut CudaViewMut<'_, f32>,
    mut probs: Option<&mut CudaViewMut<'_, f32>>,
    mut dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
    check_labels: bool,
) -> Result<()> {
    const OP: &str = "sparse_softmax_cross_entropy";
    const KERNEL: &str = "sparse_softmax_xent";
    p.check_mat(OP, "logits", logits.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "probs", &probs)?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_rows(OP, "labels", labels.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
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
    if check_labels {
        check_label_error(gpu, p, OP, &err, labels)?;
    }
    device_sum_into(gpu, "loss_sum_f32", &losses.as_view(), SUM_CHUNK, total)
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
    let sum = to_host(gpu, |t| {
        sigmoid_cross_entropy_into(gpu, p, logits, targets, losses, probs, dz, t)
    })?;
    Ok(sum / p.n as f64)
}

/// [`sigmoid_cross_entropy`] without the synchronization: writes the *sum*
/// of the per-sample losses into the one-element `total` on the device.
#[allow(clippy::too_many_arguments)]
pub fn sigmoid_cross_entropy_into(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    const OP: &str = "sigmoid_cross_entropy";
    p.check_mat(OP, "logits", logits.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "probs", &probs)?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_mat(OP, "targets", targets.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
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
        total,
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
    dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    let sum = to_host(gpu, |t| mse_into(gpu, p, pred, targets, losses, dz, t))?;
    Ok(sum / p.n as f64)
}

/// [`mse`] without the synchronization: writes the *sum* of the per-sample
/// losses into the one-element `total` on the device.
pub fn mse_into(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    mut dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    const OP: &str = "mse";
    const KERNEL: &str = "mse_loss";
    p.check_mat(OP, "pred", pred.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_mat(OP, "targets", targets.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
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
    device_sum_into(gpu, "loss_sum_f32", &losses.as_view(), SUM_CHUNK, total)
}

/// Launches a metric kernel `kernel(p, a, b, rows)` writing one f64 per
/// row, and writes the fixed-order sum of the rows into `total`.
fn metric_rows(
    gpu: &CudaBackend,
    kernel: &'static str,
    p: &LossParams,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    let f = gpu.function(module()?, kernel)?;
    // At least one element: the driver rejects empty allocations.
    let mut rows = gpu.zeros::<f64>(p.n.max(1))?;
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
    device_sum_into(gpu, "loss_sum_f64", &rows.slice(..p.n), SUM_CHUNK, total)
}

/// Rows where `argmax(scores) == argmax(labels)`, on the device; see
/// [`super::cpu::categorical_accuracy`] (exactly the same count).
pub fn categorical_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
) -> Result<f64> {
    to_host(gpu, |t| {
        categorical_accuracy_into(gpu, p, scores, labels, t)
    })
}

/// [`categorical_accuracy`] into the one-element `total` on the device
/// (no synchronization).
pub fn categorical_accuracy_into(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    const OP: &str = "categorical_accuracy";
    p.check_mat(OP, "scores", scores.len())?;
    p.check_mat(OP, "labels", labels.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    metric_rows(gpu, "metric_categorical_accuracy", p, scores, labels, total)
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
    to_host(gpu, |t| sparse_accuracy(gpu, p, scores, labels, t, true))
}

/// [`sparse_categorical_accuracy`] into the one-element `total` on the
/// device (no synchronization; labels out of range are not reported, see
/// [`sparse_softmax_cross_entropy_into`]).
pub fn sparse_categorical_accuracy_into(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    sparse_accuracy(gpu, p, scores, labels, total, false)
}

fn sparse_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    total: &mut CudaViewMut<'_, f64>,
    check_labels: bool,
) -> Result<()> {
    const OP: &str = "sparse_categorical_accuracy";
    const KERNEL: &str = "metric_sparse_accuracy";
    p.check_mat(OP, "scores", scores.len())?;
    p.check_rows(OP, "labels", labels.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    let f = gpu.function(module()?, KERNEL)?;
    let mut rows = gpu.zeros::<f64>(p.n.max(1))?;
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
    if check_labels {
        check_label_error(gpu, p, OP, &err, labels)?;
    }
    device_sum_into(gpu, "loss_sum_f64", &rows.slice(..p.n), SUM_CHUNK, total)
}

/// Keras 2.3.1's binary accuracy summed over the batch, on the device; see
/// [`super::cpu::binary_accuracy`] (the same value: integer counts).
pub fn binary_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    probs: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
) -> Result<f64> {
    Ok(to_host(gpu, |t| {
        binary_accuracy_rows_into(gpu, p, probs, targets, t)
    })? / p.classes as f64)
}

/// The numerator of [`binary_accuracy`] into the one-element `total` on
/// the device (no synchronization): the count of matching elements over
/// the batch, which the caller divides by `classes`.
pub fn binary_accuracy_rows_into(
    gpu: &CudaBackend,
    p: &LossParams,
    probs: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    const OP: &str = "binary_accuracy";
    p.check_mat(OP, "probs", probs.len())?;
    p.check_mat(OP, "targets", targets.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    metric_rows(gpu, "metric_binary_accuracy", p, probs, targets, total)
}

/// Mean absolute error summed over the batch, on the device; see
/// [`super::cpu::mae`].
pub fn mae(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
) -> Result<f64> {
    to_host(gpu, |t| mae_into(gpu, p, pred, targets, t))
}

/// [`mae`] into the one-element `total` on the device (no synchronization).
pub fn mae_into(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    total: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    const OP: &str = "mae";
    p.check_mat(OP, "pred", pred.len())?;
    p.check_mat(OP, "targets", targets.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    metric_rows(gpu, "metric_mae", p, pred, targets, total)
}
