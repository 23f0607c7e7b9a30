//! CUDA convolution: im2col / col2im kernels (`kernels/conv.cu`) and the
//! GEMM kernels (`kernels/gemm.cu`), mirroring `cpu.rs`.
//!
//! The column matrix has the CPU's layout, `[C*R*S, n*OH*OW]` for a chunk of
//! `n` images. Each pass is one batched GEMM per chunk whose batch items are
//! the images, so NCHW tensors are read and written in place, with no
//! transposes:
//!
//! - forward: `y_i [K, OH*OW] = act(W [K, CRS] * col_i [CRS, OH*OW] + bias)`
//!   (W shared: `stride_a = 0`; `col_i` is a column block of col, `ldb =
//!   n*OH*OW`, `stride_b = OH*OW`); bias per row and activation in the
//!   epilogue.
//! - backward data: `col_i = W^T * dy_i`, then col2im (a deterministic gather).
//! - backward filter: `dW = sum_i dy_i [K, OH*OW] * col_i^T`, the sum over
//!   the images of a chunk taken inside the GEMM in image order (see
//!   `gemm::cuda`), chunks added in order with `beta = 1`.
//!
//! Scratch comes from the caller: one `workspace` for all three passes, at
//! least [`min_workspace_len_with`]`(Im2colGemm)` floats;
//! [`workspace_len_with`]`(Im2colGemm)` is the size that runs a whole batch
//! at once (up to a 256 MiB cap). Its front holds dW's
//! partial products ([`partials_reserve`], set aside by every pass so that
//! all three chunk alike), the rest the column matrix of a chunk. A whole
//! batch's columns can be huge (batch 128, 128 channels, 32x32, 3x3: 600
//! MB), so the batch goes through in chunks of as many images as fit. dW's
//! summation order depends only on the shape and the chunk size (the
//! workspace's length), so it is the same run to run. Nothing in these
//! passes allocates; the `*_alloc` forms allocate a [`select_workspace_len`]
//! workspace per call, for callers that keep none.
//!
//! The algorithms are data, as the GEMM's kernel versions are: [`ConvAlgo`]
//! names them ([`ConvAlgo::Im2colGemm`], the passes above, and
//! [`ConvAlgo::ImplicitGemm`], which gathers its GEMM tiles from the
//! tensors and needs no column matrix: see `cuda_implicit.rs`), [`select`]
//! picks one per call, and [`forward_with`], [`backward_data_with`],
//! [`backward_filter_with`] run a chosen one; [`forward`] & co. run
//! [`select`]'s choice. Each algorithm has its workspace size,
//! [`workspace_len_with`] (and [`min_workspace_len_with`]);
//! [`workspace_len`] is the largest of them, so a caller that keeps one
//! workspace of that size can run every algorithm, and
//! [`select_workspace_len`] is what [`select`]'s choice needs.

use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, PushKernelArg};

use super::Conv2d;
use crate::cuda::{CONV, CONV_IMPLICIT, CudaBackend, DeviceInfo, GEMM, KernelModule};
use crate::error::{Error, Result};
use crate::ops::activation::Activation;
use crate::ops::gemm::Bias;
use crate::ops::gemm::Gemm;
use crate::ops::gemm::cuda::{DeviceEpilogue, gemm, launch, summed, summed_workspace_bound};

#[path = "cuda_implicit.rs"]
mod implicit;
pub use implicit::ConvGather;

// SAFETY: `Conv2d` is `#[repr(C)]` with only usize (u64) fields: plain old
// data, mirrored as `struct Conv2d` in kernels/conv.cu (same size asserted).
unsafe impl DeviceRepr for Conv2d {}
const _: () = assert!(std::mem::size_of::<Conv2d>() == 120);

/// An algorithm of the convolution passes: the versions as data, so that a
/// caller can name one, and a new algorithm (an implicit GEMM) is one more
/// variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvAlgo {
    /// im2col (col2im for backward data) into a workspace, then one batched
    /// GEMM per chunk of images (see the module docs).
    Im2colGemm,
    /// Implicit GEMM (`kernels/conv_implicit.cu`): forward as one GEMM over
    /// the whole batch whose B tiles are gathered from `x`, backward data as
    /// one gathered GEMM per stride phase (kernel flipped, only the taps on
    /// the stride grid), backward filter as a gathered GEMM over `N*OH*OW`
    /// in fixed splits added in order. No column matrix; a workspace of
    /// `w_len * splits` floats.
    ImplicitGemm,
}

/// The modules [`ConvAlgo::Im2colGemm`] launches from.
static IM2COL_GEMM_MODULES: [&KernelModule; 2] = [&CONV, &GEMM];
/// The modules [`ConvAlgo::ImplicitGemm`] launches from.
static IMPLICIT_GEMM_MODULES: [&KernelModule; 1] = [&CONV_IMPLICIT];

impl ConvAlgo {
    /// Every algorithm, oldest first.
    pub const ALL: [ConvAlgo; 2] = [ConvAlgo::Im2colGemm, ConvAlgo::ImplicitGemm];

    /// A short name for messages and bench ids.
    pub const fn name(self) -> &'static str {
        match self {
            ConvAlgo::Im2colGemm => "im2col_gemm",
            ConvAlgo::ImplicitGemm => "implicit_gemm",
        }
    }

    /// The PTX modules its kernels come from.
    pub fn modules(self) -> &'static [&'static KernelModule] {
        match self {
            ConvAlgo::Im2colGemm => &IM2COL_GEMM_MODULES,
            ConvAlgo::ImplicitGemm => &IMPLICIT_GEMM_MODULES,
        }
    }

    /// The oldest device that runs it: the newest of its modules'
    /// [`KernelModule::min_compute_capability`].
    pub fn min_compute_capability(self) -> (i32, i32) {
        self.modules()
            .iter()
            .map(|m| m.min_compute_capability)
            .max()
            .unwrap_or((0, 0))
    }

    /// Whether `info`'s device can run it.
    pub fn runs_on(self, info: &DeviceInfo) -> bool {
        info.compute_capability >= self.min_compute_capability()
    }
}

impl crate::cuda::KernelVersion for ConvAlgo {
    fn all() -> &'static [Self] {
        &Self::ALL
    }

    fn name(self) -> &'static str {
        ConvAlgo::name(self)
    }

    fn modules(self) -> &'static [&'static KernelModule] {
        ConvAlgo::modules(self)
    }
}

/// The algorithm [`forward`], [`backward_data`] and [`backward_filter`] run
/// for `p` on `info`'s device. The rule: [`ConvAlgo::ImplicitGemm`]
/// whenever its 32-bit extents hold the shape (every extent below 2^30),
/// else [`ConvAlgo::Im2colGemm`]. Why implicit by default: it never writes
/// or reads the column matrix (`C*R*S*N*OH*OW` floats, 9x the input for a
/// 3x3 kernel, twice over), runs forward as one GEMM over the batch (v1's
/// per-image GEMMs leave most of a 64-wide tile idle on a 13x13 output),
/// and skips the off-grid taps of a strided backward data; v1's larger
/// 128x128 GEMM tile is its one advantage, on layers with many channels.
/// Both run on every device (compute_70). The rule is the prediction of
/// docs/perf-log.md, to be replaced by measured crossovers when a GPU run
/// has them.
pub fn select(p: &Conv2d, _info: &DeviceInfo) -> ConvAlgo {
    if implicit::fits(p) {
        ConvAlgo::ImplicitGemm
    } else {
        ConvAlgo::Im2colGemm
    }
}

/// An error naming the algorithm when the device is older than it needs.
fn check_runs_on(gpu: &CudaBackend, algo: ConvAlgo) -> Result<()> {
    gpu.require_capability(algo.name(), algo.name(), algo.min_compute_capability())
}

/// The most floats [`workspace_len`] gives the column matrices: 256 MiB.
/// A chunk is as many images as fit (at least one, whatever its size).
pub const WORKSPACE_FLOATS: usize = 1 << 26;

/// Floats of the column matrix of one image: `C*R*S*OH*OW`.
pub fn col_floats_per_image(p: &Conv2d) -> usize {
    p.col_rows() * p.out_h * p.out_w
}

/// Floats at the front of every workspace for dW's partial products (the
/// most any chunk of `p`'s batch needs; 0 when dW is never split).
pub fn partials_reserve(p: &Conv2d) -> usize {
    summed_workspace_bound(p.k, p.col_rows(), p.n)
}

/// The smallest workspace the passes accept for `p` with `algo`:
/// Im2colGemm the partials' reserve and one image's columns (it chunks the
/// batch to fit), ImplicitGemm its [`workspace_len_with`] (it does not
/// chunk; its forward pass takes none and accepts any).
pub fn min_workspace_len_with(algo: ConvAlgo, p: &Conv2d) -> usize {
    match algo {
        ConvAlgo::Im2colGemm => partials_reserve(p) + col_floats_per_image(p),
        ConvAlgo::ImplicitGemm => implicit::workspace_len(p),
    }
}

/// The workspace `algo` runs best with for `p` (what a caller that keeps
/// one per layer should allocate): Im2colGemm the reserve and as many
/// images' columns as fit in [`WORKSPACE_FLOATS`], the whole batch when
/// they do; ImplicitGemm backward data's rearranged weights and backward
/// filter's partial slabs (`w_len * splits` floats).
pub fn workspace_len_with(algo: ConvAlgo, p: &Conv2d) -> usize {
    match algo {
        ConvAlgo::Im2colGemm => {
            partials_reserve(p) + images_per_chunk(p, WORKSPACE_FLOATS) * col_floats_per_image(p)
        }
        ConvAlgo::ImplicitGemm => implicit::workspace_len(p),
    }
}

/// The smallest workspace every algorithm accepts for `p`: the largest
/// [`min_workspace_len_with`].
pub fn min_workspace_len(p: &Conv2d) -> usize {
    ConvAlgo::ALL
        .iter()
        .map(|&a| min_workspace_len_with(a, p))
        .max()
        .unwrap_or(0)
}

/// The largest [`workspace_len_with`]: with it every algorithm (and so
/// whatever [`select`] picks) runs as it would with its own.
pub fn workspace_len(p: &Conv2d) -> usize {
    ConvAlgo::ALL
        .iter()
        .map(|&a| workspace_len_with(a, p))
        .max()
        .unwrap_or(0)
}

/// The workspace [`select`]'s choice for `p` on `info`'s device needs:
/// what a caller that runs [`forward`] & co. should keep per layer, and
/// what the `*_alloc` forms allocate.
pub fn select_workspace_len(p: &Conv2d, info: &DeviceInfo) -> usize {
    workspace_len_with(select(p, info), p)
}

/// Images per chunk for `column_floats` floats of columns (at least 1, at
/// most `n`).
pub fn images_per_chunk(p: &Conv2d, column_floats: usize) -> usize {
    (column_floats / col_floats_per_image(p).max(1)).clamp(1, p.n.max(1))
}

/// Fills `col` (`[C*R*S, N*OH*OW]`) from `x` (`[N, C, H, W]`), like
/// `cpu::im2col`. `col` is fully overwritten.
pub fn im2col(
    gpu: &CudaBackend,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    col: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    p.check_im2col(x.len(), col.len())?;
    // SAFETY: lengths checked just above.
    unsafe { im2col_unchecked(gpu, p, x, col) }
}

/// The adjoint of [`im2col`], like `cpu::col2im`: each pixel of `x`
/// (`[N, C, H, W]`, fully overwritten) sums its entries of `col` in
/// `(r, s)` order; deterministic.
pub fn col2im(
    gpu: &CudaBackend,
    p: &Conv2d,
    col: &CudaView<'_, f32>,
    x: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    p.check_col2im(col.len(), x.len())?;
    // SAFETY: lengths checked just above.
    unsafe { col2im_unchecked(gpu, p, col, x) }
}

/// # Safety
/// `p` validated, `x.len() >= p.x_len()`, `col.len() >= p.col_len()`.
unsafe fn im2col_unchecked(
    gpu: &CudaBackend,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    col: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let len = p.col_len();
    if len == 0 {
        return Ok(());
    }
    let f = gpu.function(&CONV, "conv_im2col")?;
    // SAFETY: the kernel reads x[..x_len] and writes col[..col_len], both
    // in bounds per the caller.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(x)
            .arg(col)
            .launch(gpu.elementwise_config(len))
    };
    gpu.launched("conv_im2col", r)
}

/// # Safety
/// `p` validated, `col.len() >= p.col_len()`, `x.len() >= p.x_len()`.
unsafe fn col2im_unchecked(
    gpu: &CudaBackend,
    p: &Conv2d,
    col: &CudaView<'_, f32>,
    x: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let len = p.x_len();
    if len == 0 {
        return Ok(());
    }
    let f = gpu.function(&CONV, "conv_col2im")?;
    // SAFETY: the kernel reads col[..col_len] and writes x[..x_len], both
    // in bounds per the caller.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(col)
            .arg(x)
            .launch(gpu.elementwise_config(len))
    };
    gpu.launched("conv_col2im", r)
}

/// Checks `workspace` and runs `body(partials, columns, chunk)` on its two
/// parts (see the module docs).
fn with_workspace(
    op: &'static str,
    p: &Conv2d,
    workspace: &mut CudaViewMut<'_, f32>,
    mut body: impl FnMut(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>, usize) -> Result<()>,
) -> Result<()> {
    let need = min_workspace_len_with(ConvAlgo::Im2colGemm, p);
    if workspace.len() < need {
        return Err(Error::shape(
            op,
            "workspace length",
            format!(
                "at least min_workspace_len_with(Im2colGemm) = {need} floats ({} for dW's partials + {} for one image's columns)",
                partials_reserve(p),
                col_floats_per_image(p)
            ),
            workspace.len(),
        ));
    }
    let (mut partials, mut columns) = workspace.split_at_mut(partials_reserve(p));
    let chunk = images_per_chunk(p, columns.len());
    body(&mut partials, &mut columns, chunk)
}

/// Runs `f` with a fresh [`select_workspace_len`] workspace: the `*_alloc` forms.
fn with_fresh_workspace(
    gpu: &CudaBackend,
    p: &Conv2d,
    f: impl FnOnce(&mut CudaViewMut<'_, f32>) -> Result<()>,
) -> Result<()> {
    // SAFETY: every pass writes what it reads of the workspace first (im2col
    // or a beta = 0 GEMM for the columns, beta = 0 partial products; the
    // implicit passes' rearranged weights and partial slabs).
    let len = select_workspace_len(p, gpu.info()).max(1);
    let mut ws = unsafe { gpu.stream().alloc::<f32>(len) }
        .map_err(|e| gpu.error("cuMemAlloc (conv2d workspace)", e))?;
    f(&mut ws.as_view_mut())
}

/// `y = act(conv(x, w) + bias)` on the device, like `cpu::forward`: `x`
/// `[N, C, H, W]`, `w` `[K, C, R, S]`, `bias` `[K]` (optional), `y`
/// `[N, K, OH, OW]` fully overwritten. `workspace`: see the module docs.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &CudaBackend,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    bias: Option<&CudaView<'_, f32>>,
    activation: Activation,
    y: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    forward_with(
        gpu,
        select(p, gpu.info()),
        p,
        x,
        w,
        bias,
        activation,
        y,
        workspace,
    )
}

/// [`forward`] with the algorithm `algo`.
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    gpu: &CudaBackend,
    algo: ConvAlgo,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    bias: Option<&CudaView<'_, f32>>,
    activation: Activation,
    y: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check_runs_on(gpu, algo)?;
    match algo {
        ConvAlgo::Im2colGemm => forward_im2col(gpu, p, x, w, bias, activation, y, workspace),
        ConvAlgo::ImplicitGemm => {
            const OP: &str = "conv2d.forward";
            p.check_forward(x.len(), w.len(), bias.map(|b| b.len()), y.len())?;
            if p.n == 0 {
                return Ok(());
            }
            implicit::forward(gpu, OP, p, x, w, bias, activation, y)
        }
    }
}

/// [`forward`] by [`ConvAlgo::Im2colGemm`].
#[allow(clippy::too_many_arguments)]
fn forward_im2col(
    gpu: &CudaBackend,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    bias: Option<&CudaView<'_, f32>>,
    activation: Activation,
    y: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "conv2d.forward";
    p.check_forward(x.len(), w.len(), bias.map(|b| b.len()), y.len())?;
    if p.n == 0 {
        return Ok(());
    }
    let (crs, ohw) = (p.col_rows(), p.out_h * p.out_w);
    let (x_img, y_img) = (p.c * p.h * p.w, p.k * ohw);
    with_workspace(OP, p, workspace, |_, ws, chunk| {
        for n0 in (0..p.n).step_by(chunk) {
            let q = p.with_batch(chunk.min(p.n - n0));
            let cols = q.col_cols();
            let mut col = ws.slice_mut(..crs * cols);
            let xq = x.slice(n0 * x_img..(n0 + q.n) * x_img);
            // SAFETY: q is p over q.n images (valid); xq holds q's x, col q's columns.
            unsafe { im2col_unchecked(gpu, &q, &xq, &mut col)? };
            let g = Gemm {
                m: p.k,
                n: ohw,
                k: crs,
                lda: crs,
                ldb: cols,
                ldc: ohw,
                batch: q.n,
                stride_a: 0,
                stride_b: ohw,
                stride_c: y_img,
                alpha: 1.0,
                beta: 0.0,
                trans_a: false,
                trans_b: false,
            };
            let epi = DeviceEpilogue {
                bias: bias.map_or(Bias::None, Bias::PerRow),
                activation,
            };
            let mut yq = y.slice_mut(n0 * y_img..(n0 + q.n) * y_img);
            // The public, checked GEMM: its checks hold by construction.
            gemm(gpu, &g, w, &col.as_view(), &mut yq, epi)?;
        }
        Ok(())
    })
}

/// `dx = col2im(w^T * dy)` on the device, like `cpu::backward_data`: `dy`
/// `[N, K, OH, OW]`, `w` `[K, C, R, S]`, `dx` `[N, C, H, W]` fully
/// overwritten. `workspace`: see the module docs.
#[allow(clippy::too_many_arguments)]
pub fn backward_data(
    gpu: &CudaBackend,
    p: &Conv2d,
    dy: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    backward_data_with(gpu, select(p, gpu.info()), p, dy, w, dx, workspace)
}

/// [`backward_data`] with the algorithm `algo`.
#[allow(clippy::too_many_arguments)]
pub fn backward_data_with(
    gpu: &CudaBackend,
    algo: ConvAlgo,
    p: &Conv2d,
    dy: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check_runs_on(gpu, algo)?;
    match algo {
        ConvAlgo::Im2colGemm => backward_data_im2col(gpu, p, dy, w, dx, workspace),
        ConvAlgo::ImplicitGemm => {
            const OP: &str = "conv2d.backward_data";
            p.check_backward_data(dy.len(), w.len(), dx.len())?;
            if p.n == 0 {
                return Ok(());
            }
            implicit::backward_data(gpu, OP, p, dy, w, dx, workspace)
        }
    }
}

/// [`backward_data`] by [`ConvAlgo::Im2colGemm`].
#[allow(clippy::too_many_arguments)]
fn backward_data_im2col(
    gpu: &CudaBackend,
    p: &Conv2d,
    dy: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "conv2d.backward_data";
    p.check_backward_data(dy.len(), w.len(), dx.len())?;
    if p.n == 0 {
        return Ok(());
    }
    let (crs, ohw) = (p.col_rows(), p.out_h * p.out_w);
    let (x_img, y_img) = (p.c * p.h * p.w, p.k * ohw);
    with_workspace(OP, p, workspace, |_, ws, chunk| {
        for n0 in (0..p.n).step_by(chunk) {
            let q = p.with_batch(chunk.min(p.n - n0));
            let cols = q.col_cols();
            let mut col = ws.slice_mut(..crs * cols);
            let dyq = dy.slice(n0 * y_img..(n0 + q.n) * y_img);
            // col_i [CRS, OHW] (columns i*OHW.. of col, ldc = cols) = W^T dy_i.
            let g = Gemm {
                m: crs,
                n: ohw,
                k: p.k,
                lda: crs,
                ldb: ohw,
                ldc: cols,
                batch: q.n,
                stride_a: 0,
                stride_b: y_img,
                stride_c: ohw,
                alpha: 1.0,
                beta: 0.0,
                trans_a: true,
                trans_b: false,
            };
            // SAFETY: A = w (K x CRS, shared) has w_len elements; item i of B
            // is dy_i, K x OHW at i*K*OHW, inside dyq (q.n*K*OHW); item i of C
            // is the column block at i*OHW with row stride cols: its last
            // element is (n-1)*OHW + (CRS-1)*cols + OHW - 1 < CRS*cols =
            // col.len(), and distinct items own distinct columns.
            unsafe {
                launch(
                    gpu,
                    None,
                    &g,
                    DeviceEpilogue::default(),
                    w,
                    &dyq,
                    &mut col,
                    1,
                )?
            };
            let mut dxq = dx.slice_mut(n0 * x_img..(n0 + q.n) * x_img);
            // SAFETY: col holds q's columns, dxq q's x.
            unsafe { col2im_unchecked(gpu, &q, &col.as_view(), &mut dxq)? };
        }
        Ok(())
    })
}

/// `dw = sum over images of dy * col^T` on the device, like
/// `cpu::backward_filter`: `x` `[N, C, H, W]`, `dy` `[N, K, OH, OW]`, `dw`
/// `[K, C, R, S]` fully overwritten (zero for an empty batch). The sum runs
/// over the images in order within a chunk (split into a shape-determined
/// number of partial sums added in order when dW alone would leave the
/// device idle), chunks added in order: deterministic. `workspace`: see the
/// module docs.
#[allow(clippy::too_many_arguments)]
pub fn backward_filter(
    gpu: &CudaBackend,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dw: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    backward_filter_with(gpu, select(p, gpu.info()), p, x, dy, dw, workspace)
}

/// [`backward_filter`] with the algorithm `algo`.
#[allow(clippy::too_many_arguments)]
pub fn backward_filter_with(
    gpu: &CudaBackend,
    algo: ConvAlgo,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dw: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check_runs_on(gpu, algo)?;
    match algo {
        ConvAlgo::Im2colGemm => backward_filter_im2col(gpu, p, x, dy, dw, workspace),
        ConvAlgo::ImplicitGemm => {
            const OP: &str = "conv2d.backward_filter";
            p.check_backward_filter(x.len(), dy.len(), dw.len())?;
            if p.n == 0 {
                return zero_dw(gpu, dw);
            }
            implicit::backward_filter(gpu, OP, p, x, dy, dw, workspace)
        }
    }
}

/// [`backward_filter`] by [`ConvAlgo::Im2colGemm`].
#[allow(clippy::too_many_arguments)]
fn backward_filter_im2col(
    gpu: &CudaBackend,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dw: &mut CudaViewMut<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "conv2d.backward_filter";
    p.check_backward_filter(x.len(), dy.len(), dw.len())?;
    if p.n == 0 {
        return zero_dw(gpu, dw);
    }
    let (crs, ohw) = (p.col_rows(), p.out_h * p.out_w);
    let (x_img, y_img) = (p.c * p.h * p.w, p.k * ohw);
    with_workspace(OP, p, workspace, |partials, ws, chunk| {
        for n0 in (0..p.n).step_by(chunk) {
            let q = p.with_batch(chunk.min(p.n - n0));
            let cols = q.col_cols();
            let mut col = ws.slice_mut(..crs * cols);
            let xq = x.slice(n0 * x_img..(n0 + q.n) * x_img);
            // SAFETY: q is p over q.n images (valid); xq holds q's x, col q's columns.
            unsafe { im2col_unchecked(gpu, &q, &xq, &mut col)? };
            let dyq = dy.slice(n0 * y_img..(n0 + q.n) * y_img);
            // dW [K, CRS] (+)= sum_i dy_i [K, OHW] * (col_i [CRS, OHW])^T;
            // beta = 0 on the first chunk: dw is overwritten, never read.
            let g = Gemm {
                m: p.k,
                n: crs,
                k: ohw,
                lda: ohw,
                ldb: cols,
                ldc: crs,
                batch: q.n,
                stride_a: y_img,
                stride_b: ohw,
                stride_c: 0,
                alpha: 1.0,
                beta: if n0 == 0 { 0.0 } else { 1.0 },
                trans_a: false,
                trans_b: true,
            };
            // SAFETY: item i of A is dy_i (K x OHW at i*K*OHW) inside dyq;
            // item i of B (stored CRS x OHW, row stride cols) is the column
            // block at i*OHW, last element (CRS-1)*cols + (n-1)*OHW + OHW - 1
            // < col.len(); C is dw (K x CRS dense, w_len elements).
            unsafe { summed(gpu, OP, None, &g, &dyq, &col.as_view(), dw, Some(partials))? };
        }
        Ok(())
    })
}

/// dW of an empty batch: the sum over no images.
fn zero_dw(gpu: &CudaBackend, dw: &mut CudaViewMut<'_, f32>) -> Result<()> {
    gpu.stream()
        .memset_zeros(dw)
        .map_err(|e| gpu.error("cuMemsetD8 (conv2d.backward_filter dw)", e))
}

/// [`forward`] with a workspace it allocates (and frees) itself: the
/// convenience form, which allocates on every call.
#[allow(clippy::too_many_arguments)]
pub fn forward_alloc(
    gpu: &CudaBackend,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    bias: Option<&CudaView<'_, f32>>,
    activation: Activation,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    with_fresh_workspace(gpu, p, |ws| forward(gpu, p, x, w, bias, activation, y, ws))
}

/// [`backward_data`] with a workspace it allocates itself (per call).
pub fn backward_data_alloc(
    gpu: &CudaBackend,
    p: &Conv2d,
    dy: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    with_fresh_workspace(gpu, p, |ws| backward_data(gpu, p, dy, w, dx, ws))
}

/// [`backward_filter`] with a workspace it allocates itself (per call).
pub fn backward_filter_alloc(
    gpu: &CudaBackend,
    p: &Conv2d,
    x: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dw: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    with_fresh_workspace(gpu, p, |ws| backward_filter(gpu, p, x, dy, dw, ws))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_know_modules_and_capability() {
        let info = DeviceInfo {
            ordinal: 0,
            name: "test".into(),
            compute_capability: (7, 0),
            driver_version: 12020,
            total_memory: 1 << 30,
            multiprocessors: 4,
        };
        let p = Conv2d::new([2, 3, 8, 8], 4, [3, 3], [1, 1], super::super::Padding::Same).unwrap();
        assert_eq!(select(&p, &info), ConvAlgo::ImplicitGemm);
        // Extents past the implicit kernels' 32-bit range fall back to v1.
        let huge = Conv2d::new(
            [1, 1, 1 << 31, 1],
            1,
            [1, 1],
            [1, 1],
            super::super::Padding::Valid,
        )
        .unwrap();
        assert_eq!(select(&huge, &info), ConvAlgo::Im2colGemm);
        for a in ConvAlgo::ALL {
            let cc = a.modules().iter().map(|m| m.min_compute_capability).max();
            assert_eq!(Some(a.min_compute_capability()), cc, "{}", a.name());
            assert!(a.runs_on(&info) == (info.compute_capability >= a.min_compute_capability()));
        }
        assert!(
            ConvAlgo::Im2colGemm
                .modules()
                .iter()
                .any(|m| m.ptx.contains(".entry conv_im2col("))
        );
        for entry in [
            "conv_igemm_gather",
            "conv_igemm_wgrad",
            "conv_igemm_wgrad_reduce",
            "conv_igemm_dgrad_weights",
        ] {
            assert!(
                ConvAlgo::ImplicitGemm
                    .modules()
                    .iter()
                    .any(|m| m.ptx.contains(&format!(".entry {entry}("))),
                "{entry}"
            );
        }
    }
}
