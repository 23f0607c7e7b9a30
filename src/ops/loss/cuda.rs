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
//! the metrics' per-row values, the label error counter, the one-element
//! total of the host forms) come from the caller: a [`LossScratch`], sized
//! by [`LossScratch::lens`] for given parameters, allocated once by
//! [`LossScratch::new`] and checked on every call; the launch paths
//! allocate nothing. The host forms have `*_alloc` twins that allocate a
//! fresh scratch per call, for one-off use.
//!
//! Sparse labels are validated on the device: a label `>= classes` is never
//! used as an index; the kernel counts the bad rows and records the first
//! one, and the wrapper returns the same error as the CPU (naming that row
//! and its value, after the launch). On that error the outputs hold NaN in
//! the bad rows and valid values elsewhere; the CPU writes nothing instead.

use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::LossParams;
use crate::cuda::{CudaBackend, DeviceInfo, KernelVersion, LOSS};
use crate::error::{Error, Result, check_len};

crate::kernel_versions! {
    /// The versions of this family's kernels, as data (see
    /// [`KernelVersion`]): today one.
    pub enum LossKernel {
        /// One block per row, per-row values summed in fixed f64 chunks (`kernels/loss.cu`).
        RowBlocks => "loss_row_blocks", crate::cuda::LOSS,
    }
}

/// The version the plain entry points run for the logits (`n * classes`, or the summed length) on `info`'s
/// device; the `*_with` forms run the one a caller names. Today there is
/// one version, so it is always [`LossKernel::RowBlocks`].
pub fn select(_elements: usize, _info: &DeviceInfo) -> LossKernel {
    LossKernel::RowBlocks
}

// SAFETY: `LossParams` is `#[repr(C)]` plain old data (two usize and an f32,
// no pointers), mirrored field for field by `struct LossParams` in
// kernels/loss.cu, which static_asserts the same size.
unsafe impl DeviceRepr for LossParams {}

const _: () = assert!(std::mem::size_of::<LossParams>() == 24);

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

/// Element counts of a [`LossScratch`]'s buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossScratchLens {
    /// f64 chunk sums of the first pass (`ceil(n / chunk)` when that is
    /// more than one, else 0).
    pub sum_a: usize,
    /// f64 chunk sums of the second pass (`ceil(sum_a / chunk)` when that
    /// is more than one, else 0); later passes alternate between the two.
    pub sum_b: usize,
    /// f64 per-row values of the metrics (`n`).
    pub rows: usize,
}

impl LossScratchLens {
    /// The larger of each count (a scratch that serves both).
    pub fn max(self, o: Self) -> Self {
        LossScratchLens {
            sum_a: self.sum_a.max(o.sum_a),
            sum_b: self.sum_b.max(o.sum_b),
            rows: self.rows.max(o.rows),
        }
    }

    /// Whether every count is at least `need`'s.
    pub fn covers(&self, need: &Self) -> bool {
        self.sum_a >= need.sum_a && self.sum_b >= need.sum_b && self.rows >= need.rows
    }

    /// Device bytes of a scratch with these counts (each buffer at least
    /// one element, plus the 2-element error counter and the total).
    pub fn bytes(&self) -> usize {
        8usize
            .saturating_mul(
                self.sum_a
                    .max(1)
                    .saturating_add(self.sum_b.max(1))
                    .saturating_add(self.rows.max(1)),
            )
            .saturating_add(16 + 8)
    }
}

/// The device scratch of the losses and metrics, owned by the caller and
/// reused across calls (see the module docs). The kernels overwrite every
/// element they read (the error counter is cleared on the stream before
/// each sparse launch), so it needs no clearing between calls.
pub struct LossScratch {
    sum_a: CudaSlice<f64>,
    sum_b: CudaSlice<f64>,
    rows: CudaSlice<f64>,
    err: CudaSlice<u64>,
    /// The host forms' total; `None` only while one of them runs.
    total: Option<CudaSlice<f64>>,
}

impl std::fmt::Debug for LossScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossScratch")
            .field("lens", &self.capacity())
            .finish()
    }
}

impl LossScratch {
    /// The counts the chunked sum of `n` values needs, `chunk` per pass.
    pub fn sum_lens(n: usize, chunk: usize) -> LossScratchLens {
        let a = n.div_ceil(chunk.max(2));
        let b = a.div_ceil(chunk.max(2));
        LossScratchLens {
            sum_a: if a > 1 { a } else { 0 },
            sum_b: if a > 1 && b > 1 { b } else { 0 },
            rows: 0,
        }
    }

    /// The counts every loss and metric on `p` needs.
    pub fn lens(p: &LossParams) -> LossScratchLens {
        LossScratchLens {
            rows: p.n,
            ..Self::sum_lens(p.n, SUM_CHUNK)
        }
    }

    /// The device bytes a scratch for `p` takes.
    pub fn bytes(p: &LossParams) -> usize {
        Self::lens(p).bytes()
    }

    /// Allocates a scratch for `p` (zeroed; the one allocating step).
    pub fn new(gpu: &CudaBackend, p: &LossParams) -> Result<Self> {
        Self::with_lens(gpu, Self::lens(p))
    }

    /// Allocates a scratch of the given counts (zeroed), e.g. the
    /// [`LossScratchLens::max`] over several parameter sets.
    pub fn with_lens(gpu: &CudaBackend, lens: LossScratchLens) -> Result<Self> {
        Ok(LossScratch {
            sum_a: gpu.zeros(lens.sum_a.max(1))?,
            sum_b: gpu.zeros(lens.sum_b.max(1))?,
            rows: gpu.zeros(lens.rows.max(1))?,
            err: gpu.zeros(2)?,
            total: Some(gpu.zeros(1)?),
        })
    }

    /// The counts this scratch holds.
    pub fn capacity(&self) -> LossScratchLens {
        LossScratchLens {
            sum_a: self.sum_a.len(),
            sum_b: self.sum_b.len(),
            rows: self.rows.len(),
        }
    }

    /// Whether this scratch is large enough for `p`.
    pub fn fits(&self, p: &LossParams) -> bool {
        self.capacity().covers(&Self::lens(p))
    }

    /// An [`Error::Shape`] naming the first buffer smaller than `need`.
    fn check_lens(&self, op: &'static str, for_what: &str, need: &LossScratchLens) -> Result<()> {
        let have = self.capacity();
        for (what, got, want) in [
            ("scratch first-pass sums (f64)", have.sum_a, need.sum_a),
            ("scratch second-pass sums (f64)", have.sum_b, need.sum_b),
            ("scratch per-row values (f64, n)", have.rows, need.rows),
        ] {
            if got < want {
                return Err(Error::shape(
                    op,
                    format!("{what} length for {for_what}"),
                    format!("at least {want}"),
                    got,
                ));
            }
        }
        Ok(())
    }

    /// An [`Error::Shape`] naming the first buffer too small for `p`.
    pub fn check(&self, op: &'static str, p: &LossParams) -> Result<()> {
        self.check_lens(op, &format!("{p:?}"), &Self::lens(p))
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
    let f = gpu.function(&LOSS, kernel)?;
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
    sum_a: &mut CudaSlice<f64>,
    sum_b: &mut CudaSlice<f64>,
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
    let need = LossScratch::sum_lens(n, chunk);
    for (what, got, want) in [
        ("scratch first-pass sums (f64)", sum_a.len(), need.sum_a),
        ("scratch second-pass sums (f64)", sum_b.len(), need.sum_b),
    ] {
        if got < want {
            return Err(Error::shape(
                "loss.sum",
                format!("{what} length for {n} values in chunks of {chunk}"),
                format!("at least {want}"),
                got,
            ));
        }
    }
    let chunks = n.div_ceil(chunk);
    if chunks == 1 {
        // SAFETY: x holds n elements; out one = ceil(n / chunk).
        return unsafe { sum_pass(gpu, kernel, x, n, chunk, out) };
    }
    // SAFETY: x holds n elements, sum_a at least ceil(n / chunk) (checked).
    unsafe { sum_pass(gpu, kernel, x, n, chunk, &mut sum_a.slice_mut(..chunks))? };
    // Later passes alternate between the two buffers: each is shorter than
    // the one before, so it fits in either (sum_b holds the second).
    let (mut src, mut dst) = (sum_a, sum_b);
    let mut len = chunks;
    loop {
        let next_len = len.div_ceil(chunk);
        if next_len == 1 {
            // SAFETY: src holds len elements; out one.
            return unsafe { sum_pass(gpu, "loss_sum_f64", &src.slice(..len), len, chunk, out) };
        }
        // SAFETY: src holds len elements, dst at least ceil(len / chunk).
        unsafe {
            sum_pass(
                gpu,
                "loss_sum_f64",
                &src.slice(..len),
                len,
                chunk,
                &mut dst.slice_mut(..next_len),
            )?
        };
        std::mem::swap(&mut src, &mut dst);
        len = next_len;
    }
}

/// The fixed-order f64 sum of `x` that the losses use for their batch
/// totals, with sums over `chunk` consecutive values per pass (the losses
/// use 4096) and as many passes as it takes; synchronizes and returns it.
/// Deterministic: the same values and chunk give the same bits.
pub fn sum_f32(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    chunk: usize,
    scratch: &mut LossScratch,
) -> Result<f64> {
    sum_f32_with(gpu, select(x.len(), gpu.info()), x, chunk, scratch)
}

/// [`sum_f32`] on the version `version` (an error, before any launch, on a
/// device older than it needs).
pub fn sum_f32_with(
    gpu: &CudaBackend,
    version: LossKernel,
    x: &CudaView<'_, f32>,
    chunk: usize,
    scratch: &mut LossScratch,
) -> Result<f64> {
    version.require(gpu)?;
    to_host(gpu, scratch, |total, s| {
        device_sum_into(
            gpu,
            "loss_sum_f32",
            x,
            chunk,
            total,
            &mut s.sum_a,
            &mut s.sum_b,
        )
    })
}

/// Runs `f` with the scratch's one-element device total and downloads it
/// (synchronizes): the host-returning wrappers below.
fn to_host(
    gpu: &CudaBackend,
    scratch: &mut LossScratch,
    f: impl FnOnce(&mut CudaViewMut<'_, f64>, &mut LossScratch) -> Result<()>,
) -> Result<f64> {
    let Some(mut total) = scratch.total.take() else {
        return Err(Error::invalid(
            "loss",
            "scratch",
            "its total is missing (a host form panicked while using it)",
        ));
    };
    let r = f(&mut total.as_view_mut(), scratch).and_then(|()| gpu.download(&total));
    scratch.total = Some(total);
    Ok(r?[0])
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

/// Clears a sparse kernel's error counter on the stream (no allocation).
fn stream_zero(gpu: &CudaBackend, err: &mut CudaSlice<u64>) -> Result<()> {
    gpu.stream()
        .memset_zeros(err)
        .map_err(|e| gpu.error("cuMemsetD8 (label error counter)", e))
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
    scratch: &mut LossScratch,
) -> Result<()> {
    let f = gpu.function(&LOSS, kernel)?;
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
    device_sum_into(
        gpu,
        "loss_sum_f32",
        &losses.as_view(),
        SUM_CHUNK,
        total,
        &mut scratch.sum_a,
        &mut scratch.sum_b,
    )
}

/// Softmax + categorical cross-entropy on the device; see
/// [`super::cpu::softmax_cross_entropy`]. Returns the batch-mean loss
/// (synchronizes).
#[allow(clippy::too_many_arguments)]
pub fn softmax_cross_entropy(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    scratch: &mut LossScratch,
) -> Result<f64> {
    let sum = to_host(gpu, scratch, |t, s| {
        softmax_cross_entropy_into(gpu, p, logits, labels, losses, probs, dz, t, s)
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
    scratch: &mut LossScratch,
) -> Result<()> {
    softmax_cross_entropy_into_with(
        gpu,
        select(p.n * p.classes, gpu.info()),
        p,
        logits,
        labels,
        losses,
        probs,
        dz,
        total,
        scratch,
    )
}

/// [`softmax_cross_entropy_into`] on the version `version` (an error, before any launch, on a
/// device older than it needs).
#[allow(clippy::too_many_arguments)]
pub fn softmax_cross_entropy_into_with(
    gpu: &CudaBackend,
    version: LossKernel,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    version.require(gpu)?;
    const OP: &str = "softmax_cross_entropy";
    p.check_mat(OP, "logits", logits.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "probs", &probs)?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_mat(OP, "labels", labels.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    scratch.check(OP, p)?;
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
        scratch,
    )
}

/// Softmax + cross-entropy with class indices on the device; see
/// [`super::cpu::sparse_softmax_cross_entropy`]. Labels are validated on
/// the device (see the module docs). Returns the batch-mean loss
/// (synchronizes).
#[allow(clippy::too_many_arguments)]
pub fn sparse_softmax_cross_entropy(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    scratch: &mut LossScratch,
) -> Result<f64> {
    let sum = to_host(gpu, scratch, |t, s| {
        sparse_xent(gpu, p, logits, labels, losses, probs, dz, t, s, true)
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
    scratch: &mut LossScratch,
) -> Result<()> {
    sparse_softmax_cross_entropy_into_with(
        gpu,
        select(p.n * p.classes, gpu.info()),
        p,
        logits,
        labels,
        losses,
        probs,
        dz,
        total,
        scratch,
    )
}

/// [`sparse_softmax_cross_entropy_into`] on the version `version` (an error, before any launch, on a
/// device older than it needs).
#[allow(clippy::too_many_arguments)]
pub fn sparse_softmax_cross_entropy_into_with(
    gpu: &CudaBackend,
    version: LossKernel,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    version.require(gpu)?;
    sparse_xent(
        gpu, p, logits, labels, losses, probs, dz, total, scratch, false,
    )
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
    scratch: &mut LossScratch,
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
    scratch.check(OP, p)?;
    let gs = scale_over(p, p.n as f64);
    let f = gpu.function(&LOSS, KERNEL)?;
    let err = &mut scratch.err;
    stream_zero(gpu, err)?;
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
                .arg(&mut *err)
                .launch(row_config(gpu, p))
        };
        gpu.launched(KERNEL, r)?;
    }
    if check_labels {
        check_label_error(gpu, p, OP, &scratch.err, labels)?;
    }
    device_sum_into(
        gpu,
        "loss_sum_f32",
        &losses.as_view(),
        SUM_CHUNK,
        total,
        &mut scratch.sum_a,
        &mut scratch.sum_b,
    )
}

/// Sigmoid + binary cross-entropy on the device; see
/// [`super::cpu::sigmoid_cross_entropy`]. Returns the batch-mean loss
/// (synchronizes).
#[allow(clippy::too_many_arguments)]
pub fn sigmoid_cross_entropy(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    scratch: &mut LossScratch,
) -> Result<f64> {
    let sum = to_host(gpu, scratch, |t, s| {
        sigmoid_cross_entropy_into(gpu, p, logits, targets, losses, probs, dz, t, s)
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
    scratch: &mut LossScratch,
) -> Result<()> {
    sigmoid_cross_entropy_into_with(
        gpu,
        select(p.n * p.classes, gpu.info()),
        p,
        logits,
        targets,
        losses,
        probs,
        dz,
        total,
        scratch,
    )
}

/// [`sigmoid_cross_entropy_into`] on the version `version` (an error, before any launch, on a
/// device older than it needs).
#[allow(clippy::too_many_arguments)]
pub fn sigmoid_cross_entropy_into_with(
    gpu: &CudaBackend,
    version: LossKernel,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    version.require(gpu)?;
    const OP: &str = "sigmoid_cross_entropy";
    p.check_mat(OP, "logits", logits.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "probs", &probs)?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_mat(OP, "targets", targets.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    scratch.check(OP, p)?;
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
        scratch,
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
    scratch: &mut LossScratch,
) -> Result<f64> {
    let sum = to_host(gpu, scratch, |t, s| {
        mse_into(gpu, p, pred, targets, losses, dz, t, s)
    })?;
    Ok(sum / p.n as f64)
}

/// [`mse`] without the synchronization: writes the *sum* of the per-sample
/// losses into the one-element `total` on the device.
#[allow(clippy::too_many_arguments)]
pub fn mse_into(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    mse_into_with(
        gpu,
        select(p.n * p.classes, gpu.info()),
        p,
        pred,
        targets,
        losses,
        dz,
        total,
        scratch,
    )
}

/// [`mse_into`] on the version `version` (an error, before any launch, on a
/// device older than it needs).
#[allow(clippy::too_many_arguments)]
pub fn mse_into_with(
    gpu: &CudaBackend,
    version: LossKernel,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    mut dz: Option<&mut CudaViewMut<'_, f32>>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    version.require(gpu)?;
    const OP: &str = "mse";
    const KERNEL: &str = "mse_loss";
    p.check_mat(OP, "pred", pred.len())?;
    p.check_rows(OP, "losses", losses.len())?;
    check_opt(p, OP, "dz", &dz)?;
    p.check_mat(OP, "targets", targets.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    scratch.check(OP, p)?;
    let gs = scale_over(p, p.n as f64 * p.classes as f64 / 2.0);
    let f = gpu.function(version.module(), KERNEL)?;
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
    device_sum_into(
        gpu,
        "loss_sum_f32",
        &losses.as_view(),
        SUM_CHUNK,
        total,
        &mut scratch.sum_a,
        &mut scratch.sum_b,
    )
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
    scratch: &mut LossScratch,
) -> Result<()> {
    let f = gpu.function(&LOSS, kernel)?;
    let rows = &mut scratch.rows;
    // SAFETY: a and b were checked to hold n * classes elements, rows holds n.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(a)
            .arg(b)
            .arg(&mut *rows)
            .launch(row_config(gpu, p))
    };
    gpu.launched(kernel, r)?;
    device_sum_into(
        gpu,
        "loss_sum_f64",
        &scratch.rows.slice(..p.n),
        SUM_CHUNK,
        total,
        &mut scratch.sum_a,
        &mut scratch.sum_b,
    )
}

/// Rows where `argmax(scores) == argmax(labels)`, on the device; see
/// [`super::cpu::categorical_accuracy`] (exactly the same count).
pub fn categorical_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
    scratch: &mut LossScratch,
) -> Result<f64> {
    to_host(gpu, scratch, |t, s| {
        categorical_accuracy_into(gpu, p, scores, labels, t, s)
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
    scratch: &mut LossScratch,
) -> Result<()> {
    categorical_accuracy_into_with(
        gpu,
        select(p.n * p.classes, gpu.info()),
        p,
        scores,
        labels,
        total,
        scratch,
    )
}

/// [`categorical_accuracy_into`] on the version `version` (an error, before any launch, on a
/// device older than it needs).
pub fn categorical_accuracy_into_with(
    gpu: &CudaBackend,
    version: LossKernel,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    version.require(gpu)?;
    const OP: &str = "categorical_accuracy";
    p.check_mat(OP, "scores", scores.len())?;
    p.check_mat(OP, "labels", labels.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    scratch.check(OP, p)?;
    metric_rows(
        gpu,
        "metric_categorical_accuracy",
        p,
        scores,
        labels,
        total,
        scratch,
    )
}

/// Rows where `argmax(scores) == labels[i]`, on the device; see
/// [`super::cpu::sparse_categorical_accuracy`]. Labels out of range are
/// the CPU's error, found on the device.
pub fn sparse_categorical_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    scratch: &mut LossScratch,
) -> Result<f64> {
    to_host(gpu, scratch, |t, s| {
        sparse_accuracy(gpu, p, scores, labels, t, s, true)
    })
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
    scratch: &mut LossScratch,
) -> Result<()> {
    sparse_categorical_accuracy_into_with(
        gpu,
        select(p.n * p.classes, gpu.info()),
        p,
        scores,
        labels,
        total,
        scratch,
    )
}

/// [`sparse_categorical_accuracy_into`] on the version `version` (an error, before any launch, on a
/// device older than it needs).
pub fn sparse_categorical_accuracy_into_with(
    gpu: &CudaBackend,
    version: LossKernel,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    version.require(gpu)?;
    sparse_accuracy(gpu, p, scores, labels, total, scratch, false)
}

fn sparse_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
    check_labels: bool,
) -> Result<()> {
    const OP: &str = "sparse_categorical_accuracy";
    const KERNEL: &str = "metric_sparse_accuracy";
    p.check_mat(OP, "scores", scores.len())?;
    p.check_rows(OP, "labels", labels.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    scratch.check(OP, p)?;
    let f = gpu.function(&LOSS, KERNEL)?;
    let LossScratch { rows, err, .. } = &mut *scratch;
    stream_zero(gpu, err)?;
    // SAFETY: scores holds n * classes elements, labels and rows n, err 2.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(scores)
            .arg(labels)
            .arg(&mut *rows)
            .arg(&mut *err)
            .launch(row_config(gpu, p))
    };
    gpu.launched(KERNEL, r)?;
    if check_labels {
        check_label_error(gpu, p, OP, &scratch.err, labels)?;
    }
    device_sum_into(
        gpu,
        "loss_sum_f64",
        &scratch.rows.slice(..p.n),
        SUM_CHUNK,
        total,
        &mut scratch.sum_a,
        &mut scratch.sum_b,
    )
}

/// Keras 2.3.1's binary accuracy summed over the batch, on the device; see
/// [`super::cpu::binary_accuracy`] (the same value: integer counts).
pub fn binary_accuracy(
    gpu: &CudaBackend,
    p: &LossParams,
    probs: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    scratch: &mut LossScratch,
) -> Result<f64> {
    Ok(to_host(gpu, scratch, |t, s| {
        binary_accuracy_rows_into(gpu, p, probs, targets, t, s)
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
    scratch: &mut LossScratch,
) -> Result<()> {
    binary_accuracy_rows_into_with(
        gpu,
        select(p.n * p.classes, gpu.info()),
        p,
        probs,
        targets,
        total,
        scratch,
    )
}

/// [`binary_accuracy_rows_into`] on the version `version` (an error, before any launch, on a
/// device older than it needs).
pub fn binary_accuracy_rows_into_with(
    gpu: &CudaBackend,
    version: LossKernel,
    p: &LossParams,
    probs: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    version.require(gpu)?;
    const OP: &str = "binary_accuracy";
    p.check_mat(OP, "probs", probs.len())?;
    p.check_mat(OP, "targets", targets.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    scratch.check(OP, p)?;
    metric_rows(
        gpu,
        "metric_binary_accuracy",
        p,
        probs,
        targets,
        total,
        scratch,
    )
}

/// Mean absolute error summed over the batch, on the device; see
/// [`super::cpu::mae`].
pub fn mae(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    scratch: &mut LossScratch,
) -> Result<f64> {
    to_host(gpu, scratch, |t, s| mae_into(gpu, p, pred, targets, t, s))
}

/// [`mae`] into the one-element `total` on the device (no synchronization).
pub fn mae_into(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    mae_into_with(
        gpu,
        select(p.n * p.classes, gpu.info()),
        p,
        pred,
        targets,
        total,
        scratch,
    )
}

/// [`mae_into`] on the version `version` (an error, before any launch, on a
/// device older than it needs).
pub fn mae_into_with(
    gpu: &CudaBackend,
    version: LossKernel,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    total: &mut CudaViewMut<'_, f64>,
    scratch: &mut LossScratch,
) -> Result<()> {
    version.require(gpu)?;
    const OP: &str = "mae";
    p.check_mat(OP, "pred", pred.len())?;
    p.check_mat(OP, "targets", targets.len())?;
    check_len(OP, "total (one f64)", total.len(), 1)?;
    scratch.check(OP, p)?;
    metric_rows(gpu, "metric_mae", p, pred, targets, total, scratch)
}

// The allocating convenience forms: each allocates (and frees) a fresh
// `LossScratch` for one call. For one-off use; a loop should keep a scratch.

/// [`sum_f32`] with a fresh [`LossScratch`] allocated for this call.
pub fn sum_f32_alloc(gpu: &CudaBackend, x: &CudaView<'_, f32>, chunk: usize) -> Result<f64> {
    let mut s = LossScratch::with_lens(gpu, LossScratch::sum_lens(x.len(), chunk))?;
    sum_f32(gpu, x, chunk, &mut s)
}

/// [`softmax_cross_entropy`] with a fresh [`LossScratch`] allocated for
/// this call.
pub fn softmax_cross_entropy_alloc(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    let mut s = LossScratch::new(gpu, p)?;
    softmax_cross_entropy(gpu, p, logits, labels, losses, probs, dz, &mut s)
}

/// [`sparse_softmax_cross_entropy`] with a fresh [`LossScratch`] allocated
/// for this call.
pub fn sparse_softmax_cross_entropy_alloc(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    let mut s = LossScratch::new(gpu, p)?;
    sparse_softmax_cross_entropy(gpu, p, logits, labels, losses, probs, dz, &mut s)
}

/// [`sigmoid_cross_entropy`] with a fresh [`LossScratch`] allocated for
/// this call.
pub fn sigmoid_cross_entropy_alloc(
    gpu: &CudaBackend,
    p: &LossParams,
    logits: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    probs: Option<&mut CudaViewMut<'_, f32>>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    let mut s = LossScratch::new(gpu, p)?;
    sigmoid_cross_entropy(gpu, p, logits, targets, losses, probs, dz, &mut s)
}

/// [`mse`] with a fresh [`LossScratch`] allocated for this call.
pub fn mse_alloc(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
    losses: &mut CudaViewMut<'_, f32>,
    dz: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<f64> {
    let mut s = LossScratch::new(gpu, p)?;
    mse(gpu, p, pred, targets, losses, dz, &mut s)
}

/// [`categorical_accuracy`] with a fresh [`LossScratch`] allocated for
/// this call.
pub fn categorical_accuracy_alloc(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, f32>,
) -> Result<f64> {
    categorical_accuracy(gpu, p, scores, labels, &mut LossScratch::new(gpu, p)?)
}

/// [`sparse_categorical_accuracy`] with a fresh [`LossScratch`] allocated
/// for this call.
pub fn sparse_categorical_accuracy_alloc(
    gpu: &CudaBackend,
    p: &LossParams,
    scores: &CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
) -> Result<f64> {
    sparse_categorical_accuracy(gpu, p, scores, labels, &mut LossScratch::new(gpu, p)?)
}

/// [`binary_accuracy`] with a fresh [`LossScratch`] allocated for this
/// call.
pub fn binary_accuracy_alloc(
    gpu: &CudaBackend,
    p: &LossParams,
    probs: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
) -> Result<f64> {
    binary_accuracy(gpu, p, probs, targets, &mut LossScratch::new(gpu, p)?)
}

/// [`mae`] with a fresh [`LossScratch`] allocated for this call.
pub fn mae_alloc(
    gpu: &CudaBackend,
    p: &LossParams,
    pred: &CudaView<'_, f32>,
    targets: &CudaView<'_, f32>,
) -> Result<f64> {
    mae(gpu, p, pred, targets, &mut LossScratch::new(gpu, p)?)
}
