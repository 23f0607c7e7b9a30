//! The CUDA backend: device buffers and the launch wrappers of
//! `ops::*::cuda`, the GPU twin of [`super::cpu`].
//!
//! - Buffers are [`GpuBuf`]s: a `CudaSlice` plus the logical length, so that
//!   an empty buffer (an empty batch) is a one-element allocation seen as
//!   zero elements (the driver rejects zero-byte allocations).
//! - Everything runs on the one stream of the [`CudaBackend`], so the order
//!   of launches is the order of the calls and nothing waits for the device
//!   except `download_*` and [`Backend::scalars_read`]. The one exception
//!   is the batch upload (`upload_rows_*`, `upload_into_f32`): by default
//!   staged ([`crate::cuda::StagedUploader`]: gathered into page-locked
//!   memory, copied to the device on a copy stream while the compute stream
//!   runs the previous step, then device-to-device into the destination in
//!   the compute stream's order), so the destination is written where a
//!   plain copy would have written it. [`GpuBackend::set_staged_upload`]
//!   (`kestrel train --no-staged-upload`) selects the plain path: a gather
//!   into pageable memory and a copy on the compute stream.
//! - Losses and metrics write their batch values into [`GpuScalars`] on the
//!   device (`ops::loss::cuda::*_into`); the divisor that turns a device sum
//!   into the CPU's value (the batch size for a loss mean, `classes` for
//!   binary accuracy) is kept on the host beside the slot and applied when
//!   the values are read, with the same division the host wrappers do.
//! - Scratch that would be allocated on every call is cached here: the
//!   convolution's workspace (grown to the largest a layer needs, sliced to
//!   exactly `conv::cuda::select_workspace_len`, so the chunking and thus dW's
//!   summation order depend on the shape alone), the GEMM's split-K
//!   workspace (grown likewise, sliced to exactly
//!   `gemm::cuda::select_workspace_len`, so that split-K is chosen by the
//!   shape alone: a long-k dense layer splits on every run or on none) and
//!   the staging of the batch uploads.
//! - The ops' own scratch ([`batchnorm::cuda::BatchNormScratch`] & co.) is
//!   created here once and grown (never shrunk) to the largest parameters
//!   seen, so a training step allocates nothing for these ops.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};

use super::cpu::gather;
use super::{Backend, check_scalar_slot, check_scalars_count};
use crate::cuda::{CapturedGraph, CudaBackend, StagedUploader, StepClock};
use crate::error::{Result, check_len};
use crate::ops::activation::{self, Activation, Softmax};
use crate::ops::batchnorm::cuda::BatchNormScratch;
use crate::ops::batchnorm::{self, BatchNorm};
use crate::ops::bias::cuda::BiasScratch;
use crate::ops::bias::{self, BiasShape};
use crate::ops::conv::{self, Conv2d};
use crate::ops::dropout::{self, Dropout};
use crate::ops::gemm::{self, Bias, Epilogue, Gemm};
use crate::ops::loss::cuda::LossScratch;
use crate::ops::loss::{self, LossParams};
use crate::ops::optim::cuda::CudaOptimizerState;
use crate::ops::optim::{self, Optimizer, OptimizerState};
use crate::ops::pool::{self, MaxPool2d};

/// A device buffer of `len` elements (`len` may be 0: the allocation then
/// holds one element that no view exposes).
#[derive(Debug)]
pub struct GpuBuf<T> {
    mem: CudaSlice<T>,
    len: usize,
}

impl<T: DeviceRepr> GpuBuf<T> {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's elements, for the `ops::*::cuda` wrappers.
    pub fn view(&self) -> CudaView<'_, T> {
        self.mem.slice(..self.len)
    }

    /// The buffer's elements, writable.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.mem.slice_mut(..self.len)
    }
}

/// f64 results on the device (see the module docs): the raw device sums
/// and, per slot, the divisor applied when they are read.
#[derive(Debug)]
pub struct GpuScalars {
    sums: GpuBuf<f64>,
    divisors: Vec<f64>,
}

/// The locked loss scratch of a [`GpuBackend`] (always allocated).
struct LossScratchGuard<'a>(MutexGuard<'a, Option<Box<LossScratch>>>);

impl std::ops::Deref for LossScratchGuard<'_> {
    type Target = LossScratch;
    fn deref(&self) -> &LossScratch {
        self.0
            .as_ref()
            .expect("allocated by GpuBackend::loss_scratch")
    }
}

impl std::ops::DerefMut for LossScratchGuard<'_> {
    fn deref_mut(&mut self) -> &mut LossScratch {
        self.0
            .as_mut()
            .expect("allocated by GpuBackend::loss_scratch")
    }
}

/// The CUDA backend over one device (see the module docs).
pub struct GpuBackend {
    gpu: Arc<CudaBackend>,
    /// The convolution's column workspace (grown, never shrunk).
    conv_ws: Mutex<Option<CudaSlice<f32>>>,
    /// The GEMM's split-K partial slabs (grown, never shrunk; boxed, so
    /// that `AnyBackend`'s GPU variant stays small).
    gemm_ws: Mutex<Option<Box<CudaSlice<f32>>>>,
    /// The batch-norm scratch (grown, never shrunk; boxed, as it is large).
    bn_scratch: Mutex<Option<Box<BatchNormScratch>>>,
    /// The bias gradient's scratch (grown, never shrunk).
    bias_scratch: Mutex<Option<Box<BiasScratch>>>,
    /// The losses' and metrics' scratch (grown, never shrunk).
    loss_scratch: Mutex<Option<Box<LossScratch>>>,
    /// Host-side staging and bookkeeping (boxed, so that `AnyBackend`'s
    /// GPU variant stays small).
    host: Box<HostSide>,
}

/// The host-side state of a [`GpuBackend`]: the batch uploads' staging and
/// the captured steps' counters.
#[derive(Debug, Default)]
struct HostSide {
    /// The staged uploads' ring (made on the first staged upload).
    staged: Mutex<Option<StagedUploader>>,
    /// The plain upload path instead of the staged one.
    plain_upload: std::sync::atomic::AtomicBool,
    /// Pageable host staging for the plain path's batch gathers.
    staging_f32: Mutex<Vec<f32>>,
    staging_u32: Mutex<Vec<u32>>,
    /// Bumped whenever a cached scratch buffer is (re)allocated: a step
    /// graph captured before then holds the freed buffer's address.
    scratch_generation: AtomicU64,
    /// Captured steps replayed so far.
    replays: AtomicU64,
    /// Nodes of the step graph recorded last (0: none yet).
    graph_nodes: AtomicU64,
}

/// A training step recorded on a [`GpuBackend`], with the scratch
/// generation it was recorded against.
#[derive(Debug)]
pub struct GpuStepGraph {
    graph: CapturedGraph,
    generation: u64,
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBackend")
            .field("device", self.gpu.info())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these caches leaves nothing inconsistent
    // (they are scratch), so a poisoned lock is simply taken over.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GpuBackend {
    /// Opens device `ordinal` (an error, never a panic, without a driver or
    /// such a device).
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(Self::from_device(Arc::new(CudaBackend::new(ordinal)?)))
    }

    /// A backend on an already opened device (sharing its stream).
    pub fn from_device(gpu: Arc<CudaBackend>) -> Self {
        GpuBackend {
            gpu,
            conv_ws: Mutex::new(None),
            gemm_ws: Mutex::new(None),
            bn_scratch: Mutex::new(None),
            bias_scratch: Mutex::new(None),
            loss_scratch: Mutex::new(None),
            host: Box::default(),
        }
    }

    /// The device, for direct use of the `ops::*::cuda` wrappers.
    pub fn device(&self) -> &Arc<CudaBackend> {
        &self.gpu
    }

    fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<GpuBuf<T>> {
        Ok(GpuBuf {
            mem: self.gpu.zeros(len.max(1))?,
            len,
        })
    }

    fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, host: &[T]) -> Result<GpuBuf<T>> {
        if host.is_empty() {
            return self.alloc(0);
        }
        Ok(GpuBuf {
            mem: self.gpu.upload(host)?,
            len: host.len(),
        })
    }

    /// Whether batch uploads (`upload_rows_*`, `upload_into_f32`) go through
    /// the staged path (the default; see the module docs) or the plain one
    /// (a pageable gather and a copy on the compute stream, as before the
    /// staged path existed): `kestrel train --no-staged-upload` sets
    /// `false`. Both write the same bytes in the same stream order.
    pub fn set_staged_upload(&self, on: bool) {
        self.host.plain_upload.store(!on, Ordering::Relaxed);
    }

    /// Whether batch uploads are staged ([`GpuBackend::set_staged_upload`]).
    pub fn staged_upload(&self) -> bool {
        !self.host.plain_upload.load(Ordering::Relaxed)
    }

    /// Staged uploads done so far (none on the plain path).
    pub fn staged_uploads(&self) -> u64 {
        lock(&self.host.staged).as_ref().map_or(0, |s| s.uploads())
    }

    /// `dst` written, in the compute stream's order, with what `fill` puts
    /// into a page-locked staging buffer of `dst.len()` elements.
    fn upload_staged<T: DeviceRepr + bytemuck::Pod>(
        &self,
        op: &'static str,
        dst: &mut GpuBuf<T>,
        fill: impl FnOnce(&mut [T]) -> Result<()>,
    ) -> Result<()> {
        let mut staged = lock(&self.host.staged);
        if staged.is_none() {
            *staged = Some(StagedUploader::new(&self.gpu)?);
        }
        let stager = staged.as_mut().expect("made above");
        stager.upload(&self.gpu, op, &mut dst.view_mut(), fill)
    }

    fn upload_into<T: DeviceRepr>(&self, host: &[T], dst: &mut GpuBuf<T>) -> Result<()> {
        check_len("upload", "dst", dst.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        // From pageable memory the driver stages the copy before returning,
        // so `host` may be reused at once.
        self.gpu
            .stream()
            .memcpy_htod(host, &mut dst.view_mut())
            .map_err(|e| self.gpu.error("cuMemcpyHtoD", e))
    }

    fn download<T: DeviceRepr>(&self, buf: &GpuBuf<T>) -> Result<Vec<T>> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        self.gpu
            .stream()
            .clone_dtoh(&buf.view())
            .map_err(|e| self.gpu.error("cuMemcpyDtoH", e))
    }

    /// Runs `f` with the cached convolution workspace sliced to exactly
    /// [`conv::cuda::select_workspace_len`] for `p` (see the module docs), grown
    /// first if it is too small.
    fn with_conv_ws<R>(
        &self,
        p: &Conv2d,
        f: impl FnOnce(&mut CudaViewMut<'_, f32>) -> Result<R>,
    ) -> Result<R> {
        let need = conv::cuda::select_workspace_len(p, self.gpu.info()).max(1);
        let mut guard = lock(&self.conv_ws);
        if guard.as_ref().is_none_or(|ws| ws.len() < need) {
            *guard = None; // free the smaller one first
            self.scratch_moved();
            // SAFETY: the conv passes write what they read of the workspace
            // first (im2col or a beta = 0 GEMM; beta = 0 partial products).
            let ws = unsafe { self.gpu.stream().alloc::<f32>(need) }
                .map_err(|e| self.gpu.error("cuMemAlloc (conv2d workspace)", e))?;
            *guard = Some(ws);
        }
        let ws = guard.as_mut().expect("allocated above");
        f(&mut ws.slice_mut(..need))
    }

    /// Runs `f` with the cached batch-norm scratch, grown first if it is
    /// too small for `p`.
    fn with_bn_scratch<R>(
        &self,
        op: &'static str,
        p: &BatchNorm,
        f: impl FnOnce(&mut BatchNormScratch) -> Result<R>,
    ) -> Result<R> {
        p.validate(op)?;
        let mut guard = lock(&self.bn_scratch);
        if !guard.as_ref().is_some_and(|s| s.fits(p)) {
            let lens = guard
                .take() // free the smaller one first
                .map_or(BatchNormScratch::lens(p), |s| {
                    s.capacity().max(BatchNormScratch::lens(p))
                });
            self.scratch_moved();
            *guard = Some(Box::new(BatchNormScratch::with_lens(&self.gpu, lens)?));
        }
        f(guard.as_mut().expect("allocated above"))
    }

    /// Runs `f` with the cached bias scratch, grown first to at least
    /// `need` partial sums.
    fn with_bias_scratch<R>(
        &self,
        need: usize,
        f: impl FnOnce(&mut BiasScratch) -> Result<R>,
    ) -> Result<R> {
        let mut guard = lock(&self.bias_scratch);
        if guard.as_ref().is_none_or(|s| s.len() < need) {
            *guard = None; // free the smaller one first
            self.scratch_moved();
            *guard = Some(Box::new(BiasScratch::with_len(&self.gpu, need)?));
        }
        f(guard.as_mut().expect("allocated above"))
    }

    /// The cached loss scratch, grown first if it is too small for `p`
    /// (held locked until the guard drops).
    fn loss_scratch(&self, p: &LossParams) -> Result<LossScratchGuard<'_>> {
        let mut guard = lock(&self.loss_scratch);
        if !guard.as_ref().is_some_and(|s| s.fits(p)) {
            let lens = guard
                .take() // free the smaller one first
                .map_or(LossScratch::lens(p), |s| {
                    s.capacity().max(LossScratch::lens(p))
                });
            self.scratch_moved();
            *guard = Some(Box::new(LossScratch::with_lens(&self.gpu, lens)?));
        }
        Ok(LossScratchGuard(guard))
    }

    /// Captured training steps replayed on this backend so far (`fit`
    /// replays one per full batch after the first, unless
    /// [`crate::train::FitOptions::cuda_graph`] is off).
    pub fn step_replays(&self) -> u64 {
        self.host.replays.load(Ordering::Relaxed)
    }

    /// The nodes (kernel launches and copies) of the training step this
    /// backend recorded last, 0 before any: the launches one replay stands
    /// for.
    pub fn step_graph_nodes(&self) -> u64 {
        self.host.graph_nodes.load(Ordering::Relaxed)
    }

    /// Records that a cached scratch buffer moves (see
    /// `scratch_generation`).
    fn scratch_moved(&self) {
        self.host.scratch_generation.fetch_add(1, Ordering::Relaxed);
    }

    fn slot<'a>(
        out: &'a mut GpuScalars,
        slot: usize,
        divisor: f64,
    ) -> Result<CudaViewMut<'a, f64>> {
        check_scalar_slot(out.sums.len(), slot)?;
        out.divisors[slot] = divisor;
        Ok(out.sums.mem.slice_mut(slot..slot + 1))
    }
}

impl Backend for GpuBackend {
    type Buf = GpuBuf<f32>;
    type BufU32 = GpuBuf<u32>;
    type BufU8 = GpuBuf<u8>;
    type OptState = CudaOptimizerState;
    type Scalars = GpuScalars;
    type StepClock = StepClock;
    type StepGraph = GpuStepGraph;

    fn name(&self) -> String {
        let i = self.gpu.info();
        format!("cuda:{} ({})", i.ordinal, i.name)
    }
    fn alloc_f32(&self, len: usize) -> Result<GpuBuf<f32>> {
        self.alloc(len)
    }
    fn alloc_u32(&self, len: usize) -> Result<GpuBuf<u32>> {
        self.alloc(len)
    }
    fn alloc_u8(&self, len: usize) -> Result<GpuBuf<u8>> {
        self.alloc(len)
    }
    fn len_f32(&self, buf: &GpuBuf<f32>) -> usize {
        buf.len()
    }
    fn upload_f32(&self, host: &[f32]) -> Result<GpuBuf<f32>> {
        self.upload(host)
    }
    fn upload_into_f32(&self, host: &[f32], dst: &mut GpuBuf<f32>) -> Result<()> {
        if !self.staged_upload() {
            return self.upload_into(host, dst);
        }
        check_len("upload", "dst", dst.len(), host.len())?;
        self.upload_staged("upload", dst, |h| {
            h.copy_from_slice(host);
            Ok(())
        })
    }
    fn upload_rows_f32(
        &self,
        src: &[f32],
        row_len: usize,
        rows: &[usize],
        dst: &mut GpuBuf<f32>,
    ) -> Result<()> {
        if self.staged_upload() {
            return self.upload_staged("upload_rows", dst, |h| {
                gather("upload_rows", src, row_len, rows, h)
            });
        }
        let mut staging = lock(&self.host.staging_f32);
        staging.resize(dst.len(), 0.0);
        gather("upload_rows", src, row_len, rows, &mut staging)?;
        self.upload_into(&staging, dst)
    }
    fn upload_rows_u32(
        &self,
        src: &[u32],
        row_len: usize,
        rows: &[usize],
        dst: &mut GpuBuf<u32>,
    ) -> Result<()> {
        if self.staged_upload() {
            return self.upload_staged("upload_rows", dst, |h| {
                gather("upload_rows", src, row_len, rows, h)
            });
        }
        let mut staging = lock(&self.host.staging_u32);
        staging.resize(dst.len(), 0);
        gather("upload_rows", src, row_len, rows, &mut staging)?;
        self.upload_into(&staging, dst)
    }
    fn download_f32(&self, buf: &GpuBuf<f32>) -> Result<Vec<f32>> {
        self.download(buf)
    }
    fn download_into_f32(&self, buf: &GpuBuf<f32>, host: &mut [f32]) -> Result<()> {
        check_len("download", "host", host.len(), buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let s = self.gpu.stream();
        s.memcpy_dtoh(&buf.view(), host)
            .map_err(|e| self.gpu.error("cuMemcpyDtoH", e))?;
        // The copy is asynchronous: `host` is ready only after the stream.
        self.gpu.synchronize()
    }
    fn copy_f32(&self, src: &GpuBuf<f32>, dst: &mut GpuBuf<f32>) -> Result<()> {
        check_len("copy", "dst", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.gpu
            .stream()
            .memcpy_dtod(&src.view(), &mut dst.view_mut())
            .map_err(|e| self.gpu.error("cuMemcpyDtoD", e))
    }
    fn download_u32(&self, buf: &GpuBuf<u32>) -> Result<Vec<u32>> {
        self.download(buf)
    }
    fn download_u8(&self, buf: &GpuBuf<u8>) -> Result<Vec<u8>> {
        self.download(buf)
    }
    fn synchronize(&self) -> Result<()> {
        self.gpu.synchronize()
    }

    fn scalars_new(&self, len: usize) -> Result<GpuScalars> {
        Ok(GpuScalars {
            sums: self.alloc(len)?,
            divisors: vec![1.0; len],
        })
    }
    fn scalars_read(&self, s: &GpuScalars, count: usize) -> Result<Vec<f64>> {
        check_scalars_count(s.sums.len(), count)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let raw = self
            .gpu
            .stream()
            .clone_dtoh(&s.sums.mem.slice(..count))
            .map_err(|e| self.gpu.error("cuMemcpyDtoH", e))?;
        Ok(raw.iter().zip(&s.divisors).map(|(v, d)| v / d).collect())
    }
    fn defers_scalars(&self) -> bool {
        true
    }

    fn gemm(
        &self,
        p: &Gemm,
        a: &GpuBuf<f32>,
        b: &GpuBuf<f32>,
        c: &mut GpuBuf<f32>,
        bias: Bias<&GpuBuf<f32>>,
        act: Activation,
    ) -> Result<()> {
        let view = bias.map(GpuBuf::view);
        let epi = Epilogue {
            bias: view.as_ref(),
            activation: act,
        };
        let need = gemm::cuda::select_workspace_len(p);
        if need == 0 {
            return gemm::cuda::gemm(&self.gpu, p, &a.view(), &b.view(), &mut c.view_mut(), epi);
        }
        let mut guard = lock(&self.gemm_ws);
        if guard.as_ref().is_none_or(|ws| ws.len() < need) {
            *guard = None; // free the smaller one first
            self.scratch_moved();
            // SAFETY: split-K writes every float of its slabs before the
            // reduction reads them.
            let ws = unsafe { self.gpu.stream().alloc::<f32>(need) }
                .map_err(|e| self.gpu.error("cuMemAlloc (gemm split-K workspace)", e))?;
            *guard = Some(Box::new(ws));
        }
        let ws = guard.as_mut().expect("allocated above");
        gemm::cuda::gemm_ws(
            &self.gpu,
            p,
            &a.view(),
            &b.view(),
            &mut c.view_mut(),
            epi,
            &mut ws.slice_mut(..need),
        )
    }

    fn conv_forward(
        &self,
        p: &Conv2d,
        x: &GpuBuf<f32>,
        w: &GpuBuf<f32>,
        bias: Option<&GpuBuf<f32>>,
        act: Activation,
        y: &mut GpuBuf<f32>,
    ) -> Result<()> {
        let bias = bias.map(|b| b.view());
        self.with_conv_ws(p, |ws| {
            conv::cuda::forward(
                &self.gpu,
                p,
                &x.view(),
                &w.view(),
                bias.as_ref(),
                act,
                &mut y.view_mut(),
                ws,
            )
        })
    }
    fn conv_backward_data(
        &self,
        p: &Conv2d,
        dy: &GpuBuf<f32>,
        w: &GpuBuf<f32>,
        dx: &mut GpuBuf<f32>,
    ) -> Result<()> {
        self.with_conv_ws(p, |ws| {
            conv::cuda::backward_data(&self.gpu, p, &dy.view(), &w.view(), &mut dx.view_mut(), ws)
        })
    }
    fn conv_backward_filter(
        &self,
        p: &Conv2d,
        x: &GpuBuf<f32>,
        dy: &GpuBuf<f32>,
        dw: &mut GpuBuf<f32>,
    ) -> Result<()> {
        self.with_conv_ws(p, |ws| {
            conv::cuda::backward_filter(&self.gpu, p, &x.view(), &dy.view(), &mut dw.view_mut(), ws)
        })
    }

    fn maxpool_forward(
        &self,
        p: &MaxPool2d,
        x: &GpuBuf<f32>,
        y: &mut GpuBuf<f32>,
        argmax: &mut GpuBuf<u32>,
    ) -> Result<()> {
        pool::cuda::forward(
            &self.gpu,
            p,
            &x.view(),
            &mut y.view_mut(),
            &mut argmax.view_mut(),
        )
    }
    fn maxpool_forward_inference(
        &self,
        p: &MaxPool2d,
        x: &GpuBuf<f32>,
        y: &mut GpuBuf<f32>,
    ) -> Result<()> {
        pool::cuda::forward_inference(&self.gpu, p, &x.view(), &mut y.view_mut())
    }
    fn maxpool_backward(
        &self,
        p: &MaxPool2d,
        dy: &GpuBuf<f32>,
        argmax: &GpuBuf<u32>,
        dx: &mut GpuBuf<f32>,
    ) -> Result<()> {
        pool::cuda::backward(&self.gpu, p, &dy.view(), &argmax.view(), &mut dx.view_mut())
    }

    fn batchnorm_forward_training(
        &self,
        p: &BatchNorm,
        x: &GpuBuf<f32>,
        gamma: &GpuBuf<f32>,
        beta: &GpuBuf<f32>,
        y: &mut GpuBuf<f32>,
        save_mean: &mut GpuBuf<f32>,
        save_inv_std: &mut GpuBuf<f32>,
        running_mean: &mut GpuBuf<f32>,
        running_var: &mut GpuBuf<f32>,
    ) -> Result<()> {
        self.with_bn_scratch("batchnorm.forward_training", p, |s| {
            batchnorm::cuda::forward_training(
                &self.gpu,
                p,
                &x.view(),
                &gamma.view(),
                &beta.view(),
                &mut y.view_mut(),
                &mut save_mean.view_mut(),
                &mut save_inv_std.view_mut(),
                &mut running_mean.view_mut(),
                &mut running_var.view_mut(),
                s,
            )
        })
    }
    fn batchnorm_forward_inference(
        &self,
        p: &BatchNorm,
        x: &GpuBuf<f32>,
        gamma: &GpuBuf<f32>,
        beta: &GpuBuf<f32>,
        running_mean: &GpuBuf<f32>,
        running_var: &GpuBuf<f32>,
        y: &mut GpuBuf<f32>,
    ) -> Result<()> {
        self.with_bn_scratch("batchnorm.forward_inference", p, |s| {
            batchnorm::cuda::forward_inference(
                &self.gpu,
                p,
                &x.view(),
                &gamma.view(),
                &beta.view(),
                &running_mean.view(),
                &running_var.view(),
                &mut y.view_mut(),
                s,
            )
        })
    }
    fn batchnorm_backward(
        &self,
        p: &BatchNorm,
        x: &GpuBuf<f32>,
        dy: &GpuBuf<f32>,
        gamma: &GpuBuf<f32>,
        save_mean: &GpuBuf<f32>,
        save_inv_std: &GpuBuf<f32>,
        dx: &mut GpuBuf<f32>,
        dgamma: &mut GpuBuf<f32>,
        dbeta: &mut GpuBuf<f32>,
    ) -> Result<()> {
        self.with_bn_scratch("batchnorm.backward", p, |s| {
            batchnorm::cuda::backward(
                &self.gpu,
                p,
                &x.view(),
                &dy.view(),
                &gamma.view(),
                &save_mean.view(),
                &save_inv_std.view(),
                &mut dx.view_mut(),
                &mut dgamma.view_mut(),
                &mut dbeta.view_mut(),
                s,
            )
        })
    }

    fn dropout_forward(
        &self,
        p: &Dropout,
        x: &GpuBuf<f32>,
        y: &mut GpuBuf<f32>,
        mask: &mut GpuBuf<u8>,
    ) -> Result<()> {
        dropout::cuda::forward(
            &self.gpu,
            p,
            &x.view(),
            &mut y.view_mut(),
            &mut mask.view_mut(),
        )
    }
    fn dropout_backward(
        &self,
        p: &Dropout,
        dy: &GpuBuf<f32>,
        mask: &GpuBuf<u8>,
        dx: &mut GpuBuf<f32>,
    ) -> Result<()> {
        dropout::cuda::backward(&self.gpu, p, &dy.view(), &mask.view(), &mut dx.view_mut())
    }

    fn activation_forward(
        &self,
        act: Activation,
        x: &GpuBuf<f32>,
        y: &mut GpuBuf<f32>,
    ) -> Result<()> {
        activation::cuda::forward(&self.gpu, act, &x.view(), &mut y.view_mut())
    }
    fn activation_backward_inplace(
        &self,
        act: Activation,
        x: &GpuBuf<f32>,
        y: &GpuBuf<f32>,
        g: &mut GpuBuf<f32>,
    ) -> Result<()> {
        activation::cuda::backward_inplace(&self.gpu, act, &x.view(), &y.view(), &mut g.view_mut())
    }
    fn activation_backward_from_output(
        &self,
        act: Activation,
        y: &GpuBuf<f32>,
        g: &mut GpuBuf<f32>,
    ) -> Result<()> {
        activation::cuda::backward_from_output(&self.gpu, act, &y.view(), &mut g.view_mut())
    }
    fn softmax_forward(&self, p: &Softmax, x: &GpuBuf<f32>, y: &mut GpuBuf<f32>) -> Result<()> {
        activation::cuda::softmax_forward(&self.gpu, p, &x.view(), &mut y.view_mut())
    }
    fn softmax_backward(
        &self,
        p: &Softmax,
        y: &GpuBuf<f32>,
        dy: &GpuBuf<f32>,
        dx: &mut GpuBuf<f32>,
    ) -> Result<()> {
        activation::cuda::softmax_backward(&self.gpu, p, &y.view(), &dy.view(), &mut dx.view_mut())
    }
    fn bias_backward(&self, p: &BiasShape, dy: &GpuBuf<f32>, db: &mut GpuBuf<f32>) -> Result<()> {
        self.with_bias_scratch(BiasScratch::backward_len(p), |s| {
            bias::cuda::backward(&self.gpu, p, &dy.view(), &mut db.view_mut(), s)
        })
    }

    fn softmax_cross_entropy(
        &self,
        p: &LossParams,
        logits: &GpuBuf<f32>,
        labels: &GpuBuf<f32>,
        losses: &mut GpuBuf<f32>,
        mut dz: Option<&mut GpuBuf<f32>>,
        out: &mut GpuScalars,
        slot: usize,
    ) -> Result<()> {
        let mut dzv = dz.as_mut().map(|d| d.view_mut());
        let mut s = self.loss_scratch(p)?;
        let mut t = Self::slot(out, slot, p.n as f64)?;
        loss::cuda::softmax_cross_entropy_into(
            &self.gpu,
            p,
            &logits.view(),
            &labels.view(),
            &mut losses.view_mut(),
            None,
            dzv.as_mut(),
            &mut t,
            &mut s,
        )
    }
    fn sparse_softmax_cross_entropy(
        &self,
        p: &LossParams,
        logits: &GpuBuf<f32>,
        labels: &GpuBuf<u32>,
        losses: &mut GpuBuf<f32>,
        mut dz: Option<&mut GpuBuf<f32>>,
        out: &mut GpuScalars,
        slot: usize,
    ) -> Result<()> {
        let mut dzv = dz.as_mut().map(|d| d.view_mut());
        let mut s = self.loss_scratch(p)?;
        let mut t = Self::slot(out, slot, p.n as f64)?;
        loss::cuda::sparse_softmax_cross_entropy_into(
            &self.gpu,
            p,
            &logits.view(),
            &labels.view(),
            &mut losses.view_mut(),
            None,
            dzv.as_mut(),
            &mut t,
            &mut s,
        )
    }
    fn sigmoid_cross_entropy(
        &self,
        p: &LossParams,
        logits: &GpuBuf<f32>,
        targets: &GpuBuf<f32>,
        losses: &mut GpuBuf<f32>,
        probs: &mut GpuBuf<f32>,
        mut dz: Option<&mut GpuBuf<f32>>,
        out: &mut GpuScalars,
        slot: usize,
    ) -> Result<()> {
        let mut dzv = dz.as_mut().map(|d| d.view_mut());
        let mut s = self.loss_scratch(p)?;
        let mut t = Self::slot(out, slot, p.n as f64)?;
        loss::cuda::sigmoid_cross_entropy_into(
            &self.gpu,
            p,
            &logits.view(),
            &targets.view(),
            &mut losses.view_mut(),
            Some(&mut probs.view_mut()),
            dzv.as_mut(),
            &mut t,
            &mut s,
        )
    }
    fn mse(
        &self,
        p: &LossParams,
        pred: &GpuBuf<f32>,
        targets: &GpuBuf<f32>,
        losses: &mut GpuBuf<f32>,
        mut dz: Option<&mut GpuBuf<f32>>,
        out: &mut GpuScalars,
        slot: usize,
    ) -> Result<()> {
        let mut dzv = dz.as_mut().map(|d| d.view_mut());
        let mut s = self.loss_scratch(p)?;
        let mut t = Self::slot(out, slot, p.n as f64)?;
        loss::cuda::mse_into(
            &self.gpu,
            p,
            &pred.view(),
            &targets.view(),
            &mut losses.view_mut(),
            dzv.as_mut(),
            &mut t,
            &mut s,
        )
    }
    fn categorical_accuracy(
        &self,
        p: &LossParams,
        scores: &GpuBuf<f32>,
        labels: &GpuBuf<f32>,
        out: &mut GpuScalars,
        slot: usize,
    ) -> Result<()> {
        let mut s = self.loss_scratch(p)?;
        let mut t = Self::slot(out, slot, 1.0)?;
        loss::cuda::categorical_accuracy_into(
            &self.gpu,
            p,
            &scores.view(),
            &labels.view(),
            &mut t,
            &mut s,
        )
    }
    fn sparse_categorical_accuracy(
        &self,
        p: &LossParams,
        scores: &GpuBuf<f32>,
        labels: &GpuBuf<u32>,
        out: &mut GpuScalars,
        slot: usize,
    ) -> Result<()> {
        let mut s = self.loss_scratch(p)?;
        let mut t = Self::slot(out, slot, 1.0)?;
        loss::cuda::sparse_categorical_accuracy_into(
            &self.gpu,
            p,
            &scores.view(),
            &labels.view(),
            &mut t,
            &mut s,
        )
    }
    fn binary_accuracy(
        &self,
        p: &LossParams,
        probs: &GpuBuf<f32>,
        targets: &GpuBuf<f32>,
        out: &mut GpuScalars,
        slot: usize,
    ) -> Result<()> {
        let mut s = self.loss_scratch(p)?;
        let mut t = Self::slot(out, slot, p.classes as f64)?;
        loss::cuda::binary_accuracy_rows_into(
            &self.gpu,
            p,
            &probs.view(),
            &targets.view(),
            &mut t,
            &mut s,
        )
    }
    fn mae(
        &self,
        p: &LossParams,
        pred: &GpuBuf<f32>,
        targets: &GpuBuf<f32>,
        out: &mut GpuScalars,
        slot: usize,
    ) -> Result<()> {
        let mut s = self.loss_scratch(p)?;
        let mut t = Self::slot(out, slot, 1.0)?;
        loss::cuda::mae_into(&self.gpu, p, &pred.view(), &targets.view(), &mut t, &mut s)
    }

    fn opt_state_new(&self, opt: &Optimizer, sizes: &[usize]) -> Result<CudaOptimizerState> {
        CudaOptimizerState::new(&self.gpu, opt, sizes)
    }
    fn optimizer_step(
        &self,
        opt: &Optimizer,
        state: &mut CudaOptimizerState,
        params: &mut [&mut GpuBuf<f32>],
        grads: &[&GpuBuf<f32>],
    ) -> Result<()> {
        // A handful of views per step; the state's descriptor table is
        // re-uploaded only when a buffer moves (never, in a fit loop).
        let mut p: Vec<CudaViewMut<'_, f32>> = params.iter_mut().map(|b| b.view_mut()).collect();
        let g: Vec<CudaView<'_, f32>> = grads.iter().map(|b| b.view()).collect();
        optim::cuda::step(&self.gpu, opt, state, &mut p, &g)
    }
    fn opt_state_set_iterations(&self, state: &mut CudaOptimizerState, iterations: u64) {
        state.set_iterations(iterations);
    }
    fn opt_state_iterations(&self, state: &CudaOptimizerState) -> u64 {
        state.iterations()
    }
    fn opt_state_download(
        &self,
        opt: &Optimizer,
        state: &CudaOptimizerState,
    ) -> Result<OptimizerState> {
        state.download(&self.gpu, opt)
    }
    fn opt_state_upload(
        &self,
        opt: &Optimizer,
        state: &OptimizerState,
    ) -> Result<CudaOptimizerState> {
        CudaOptimizerState::upload(&self.gpu, opt, state)
    }

    fn captures_steps(&self) -> bool {
        true
    }
    fn step_clock_new(&self, rows: usize) -> Result<StepClock> {
        StepClock::new(&self.gpu, rows)
    }
    fn step_clock_set(&self, clock: &mut StepClock, step: u64, row: u64) -> Result<()> {
        clock.set(&self.gpu, step, row)
    }
    fn step_clock_set_lr_rows(&self, clock: &mut StepClock, rows: &[[f32; 2]]) -> Result<()> {
        clock.set_lr_rows(&self.gpu, rows)
    }
    fn step_clock_tick(
        &self,
        clock: &mut StepClock,
        step_row: &GpuScalars,
        results: &mut GpuScalars,
    ) -> Result<()> {
        clock.tick(
            &self.gpu,
            &step_row.sums.view(),
            &mut results.sums.view_mut(),
        )?;
        // Every row the graph writes takes the step row's divisors (a row
        // written later by an uncaptured step sets its own again).
        let width = step_row.divisors.len();
        for row in results.divisors.chunks_mut(width) {
            row.copy_from_slice(&step_row.divisors[..row.len()]);
        }
        Ok(())
    }
    fn dropout_forward_clocked(
        &self,
        p: &Dropout,
        clock: &StepClock,
        x: &GpuBuf<f32>,
        y: &mut GpuBuf<f32>,
        mask: &mut GpuBuf<u8>,
    ) -> Result<()> {
        dropout::cuda::forward_clocked(
            &self.gpu,
            p,
            clock,
            &x.view(),
            &mut y.view_mut(),
            &mut mask.view_mut(),
        )
    }
    fn optimizer_step_clocked(
        &self,
        opt: &Optimizer,
        state: &mut CudaOptimizerState,
        clock: &StepClock,
        params: &mut [&mut GpuBuf<f32>],
        grads: &[&GpuBuf<f32>],
    ) -> Result<()> {
        let mut p: Vec<CudaViewMut<'_, f32>> = params.iter_mut().map(|b| b.view_mut()).collect();
        let g: Vec<CudaView<'_, f32>> = grads.iter().map(|b| b.view()).collect();
        optim::cuda::step_clocked(&self.gpu, opt, state, clock, &mut p, &g)
    }
    fn step_capture_begin(&self) -> Result<()> {
        self.gpu.begin_capture()
    }
    fn step_capture_end(&self) -> Result<GpuStepGraph> {
        let graph = self.gpu.end_capture()?;
        let nodes = self.gpu.graph_nodes(&graph)?;
        self.host.graph_nodes.store(nodes as u64, Ordering::Relaxed);
        Ok(GpuStepGraph {
            graph,
            generation: self.host.scratch_generation.load(Ordering::Relaxed),
        })
    }
    fn step_graph_current(&self, g: &GpuStepGraph) -> bool {
        g.generation == self.host.scratch_generation.load(Ordering::Relaxed)
    }
    fn step_replay(&self, g: &GpuStepGraph) -> Result<()> {
        self.gpu.replay(&g.graph)?;
        self.host.replays.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
