//! CUDA bias add, bias gradient and whole-buffer sums (`kernels/bias.cu`):
//! launch wrappers mirroring [`super::cpu`], with the same length checks
//! before any launch.
//!
//! The reductions are two-stage and deterministic (no float atomics): each
//! block sums a fixed chunk in f64 (per-thread strided subsets, then a
//! fixed tree), and a second kernel adds the chunk sums in chunk order in
//! f64. The chunking is a function of the shape alone, so a given input
//! gives the same bits on every run and every device; the association
//! differs from the CPU's, so GPU and CPU agree to f64 rounding (far below
//! the final f32 rounding), not bit for bit.
//!
//! The dense layout (`spatial == 1`) has its own gradient version,
//! [`BiasKernel::Columns`]: one thread per channel over 64-row chunks in
//! row order (coalesced rows instead of one useful float per 32-byte
//! sector), partials `[chunks, c]` added in chunk order.
//!
//! The add has a 16-byte vector form in [`BiasKernel::ChannelBlocksVec4`]
//! and [`BiasKernel::ColumnsVec4`] (one 128-bit load and store per four
//! elements, the same single f32 addition per element, so the same bits);
//! [`select`] takes it whenever `x` and `y` start on a 16-byte boundary.
//!
//! Scratch comes from the caller: a [`BiasScratch`] holds the f64 partial
//! sums (`c * ceil(n * spatial / 4096)` for the gradient,
//! [`BiasScratch::backward_len`]; `ceil(len / 8192)` for the sums,
//! [`BiasScratch::sum_len`]) and the one-element total of the `*_host`
//! forms. It is allocated once ([`BiasScratch::for_backward`],
//! [`BiasScratch::for_sum`], [`BiasScratch::with_len`]) and checked on every
//! call; the launch paths allocate nothing. The `*_alloc` forms allocate a
//! fresh scratch per call, for one-off use.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::BiasShape;
use crate::cuda::{BIAS, CudaBackend, DeviceInfo, KernelVersion, align};
use crate::error::{Error, Result, check_len};

crate::kernel_versions! {
    /// The versions of this family's kernels, as data (see
    /// [`KernelVersion`]).
    pub enum BiasKernel {
        /// Elementwise add; gradient and sums as fixed-chunk f64 partials combined in order (`kernels/bias.cu`).
        ChannelBlocks => "bias_channel_blocks", crate::cuda::BIAS,
        /// The dense layout only (`spatial == 1`): the gradient with one
        /// thread per channel reading whole rows, f64 partials over 64-row
        /// chunks combined in order (`bias_grad_col_*`); add and the sums
        /// are `ChannelBlocks`' (already coalesced).
        Columns => "bias_columns", crate::cuda::BIAS,
        /// `ChannelBlocks` with the add in 16-byte vectors (`bias_add_vec4`:
        /// one 128-bit load and store per quad, the same single addition
        /// per element, so the same bits); `x` and `y` must start on a
        /// 16-byte boundary. Gradient and sums are `ChannelBlocks'`.
        ChannelBlocksVec4 => "bias_channel_blocks_vec4", crate::cuda::BIAS,
        /// `Columns` (the dense layout only) with the vector add of
        /// `ChannelBlocksVec4`.
        ColumnsVec4 => "bias_columns_vec4", crate::cuda::BIAS,
    }
}

impl BiasKernel {
    /// Whether this version runs `p`: [`BiasKernel::Columns`] only the
    /// dense layout (`spatial == 1`; an empty shape too), the others every
    /// shape.
    pub fn supports(self, p: &BiasShape) -> bool {
        match self.reduction() {
            BiasKernel::Columns => p.spatial == 1 || p.is_empty(),
            _ => true,
        }
    }

    /// The scalar version whose reductions (gradient, sums) this one runs:
    /// `ChannelBlocks` or `Columns`.
    pub fn reduction(self) -> BiasKernel {
        match self {
            BiasKernel::ChannelBlocks | BiasKernel::ChannelBlocksVec4 => BiasKernel::ChannelBlocks,
            BiasKernel::Columns | BiasKernel::ColumnsVec4 => BiasKernel::Columns,
        }
    }

    /// Whether its add runs in 16-byte vectors (and so needs 16-byte
    /// aligned `x` and `y`).
    pub fn is_vec4(self) -> bool {
        matches!(
            self,
            BiasKernel::ChannelBlocksVec4 | BiasKernel::ColumnsVec4
        )
    }

    /// The add's entry point (`inplace`: `x += b`).
    fn add_entry(self, inplace: bool) -> &'static str {
        match (self.is_vec4(), inplace) {
            (false, false) => "bias_add",
            (false, true) => "bias_add_inplace",
            (true, false) => "bias_add_vec4",
            (true, true) => "bias_add_inplace_vec4",
        }
    }

    /// An error naming the first buffer the add of this version cannot run on.
    fn check_aligned(self, op: &'static str, bufs: &[(&str, u64)]) -> Result<()> {
        if self.is_vec4() {
            align::require_aligned(op, self.name(), bufs)
        } else {
            Ok(())
        }
    }

    fn check_supports(self, op: &'static str, p: &BiasShape) -> Result<()> {
        if self.supports(p) {
            return Ok(());
        }
        Err(Error::invalid(
            op,
            "kernel",
            format!(
                "version {} needs the dense layout (spatial 1), got spatial {}",
                self.name(),
                p.spatial
            ),
        ))
    }

    /// Stage-1 partials per channel of the gradient.
    fn grad_chunks(self, p: &BiasShape) -> usize {
        match self.reduction() {
            BiasKernel::Columns => p.n.div_ceil(COL_ROWS),
            _ => p.n.saturating_mul(p.spatial).div_ceil(CHANNEL_CHUNK),
        }
    }
}

/// The version the plain entry points run for `p` on `info`'s device, for
/// tensors that all start on a 16-byte boundary (`aligned`) or not; the
/// `*_with` forms run the one a caller names. The dense layout
/// (`spatial == 1`) gets the `Columns` reductions, whose gradient reads
/// rows coalesced (`ChannelBlocks`' blocks read a channel's samples `c`
/// floats apart there); every other shape `ChannelBlocks`. Aligned tensors
/// get the vector add ([`BiasKernel::ColumnsVec4`],
/// [`BiasKernel::ChannelBlocksVec4`]).
pub fn select(p: &BiasShape, aligned: bool, _info: &DeviceInfo) -> BiasKernel {
    match (p.spatial == 1, aligned) {
        (true, false) => BiasKernel::Columns,
        (true, true) => BiasKernel::ColumnsVec4,
        (false, false) => BiasKernel::ChannelBlocks,
        (false, true) => BiasKernel::ChannelBlocksVec4,
    }
}

// SAFETY: `#[repr(C)]`, three usizes: plain old data, mirrored as `struct
// BiasShape` in bias.cu.
unsafe impl cudarc::driver::DeviceRepr for BiasShape {}
const _: () = assert!(std::mem::size_of::<BiasShape>() == 24);

/// Samples per block of the gradient's stage 1 (`CHANNEL_CHUNK` in common.cuh).
const CHANNEL_CHUNK: usize = 4096;
/// Elements per block of the sums' stage 1 (`REDUCE_CHUNK` in bias.cu).
const REDUCE_CHUNK: usize = 8192;
/// Threads per reduction block (`REDUCE_THREADS` in common.cuh).
const REDUCE_THREADS: u32 = 256;
/// Grid dimensions beyond this stride (the kernels loop over the rest).
const MAX_GRID: usize = 65535;
/// Rows per partial of the column gradient (`COL_ROWS` in common.cuh).
const COL_ROWS: usize = 64;
/// Threads (channels) per block of the column gradient (`COL_THREADS`).
const COL_THREADS: u32 = 256;

fn reduce_config(x_blocks: usize, y_blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            x_blocks.clamp(1, MAX_GRID) as u32,
            y_blocks.clamp(1, MAX_GRID) as u32,
            1,
        ),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The device scratch of [`backward`] and the whole-buffer sums, owned by
/// the caller and reused across calls: f64 partial sums (at least one) and
/// a one-element f64 total (for [`sum_host`] and [`sum_squares_host`]).
/// The kernels overwrite every partial they read, so it needs no clearing.
pub struct BiasScratch {
    partial: CudaSlice<f64>,
    total: CudaSlice<f64>,
}

impl std::fmt::Debug for BiasScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BiasScratch")
            .field("partials", &self.partial.len())
            .finish()
    }
}

impl BiasScratch {
    /// The f64 partial sums [`backward`] needs for `p` (at least 1) on
    /// any version that runs it (so the scratch also serves
    /// [`backward_with`]): the largest [`BiasScratch::backward_len_with`].
    pub fn backward_len(p: &BiasShape) -> usize {
        BiasKernel::ALL
            .iter()
            .filter(|k| k.supports(p))
            .map(|&k| Self::backward_len_with(k, p))
            .max()
            .unwrap_or(1)
    }

    /// The f64 partial sums [`backward_with`] needs for `p` on `kernel`:
    /// `c * ceil(n * spatial / 4096)` for `ChannelBlocks`, `c * ceil(n /
    /// 64)` for `Columns` (at least 1).
    pub fn backward_len_with(kernel: BiasKernel, p: &BiasShape) -> usize {
        p.c.saturating_mul(kernel.grad_chunks(p)).max(1)
    }

    /// The f64 partial sums [`sum`] and [`sum_squares`] need for `len`
    /// elements (at least 1).
    pub fn sum_len(len: usize) -> usize {
        len.div_ceil(REDUCE_CHUNK).max(1)
    }

    /// The device bytes of a scratch of `partials` partial sums.
    pub fn bytes(partials: usize) -> usize {
        8usize.saturating_mul(partials.max(1)).saturating_add(8)
    }

    /// Allocates a scratch of `partials` partial sums (zeroed; the one
    /// allocating step; [`BiasScratch::for_backward`] and
    /// [`BiasScratch::for_sum`] size it for an op).
    pub fn with_len(gpu: &CudaBackend, partials: usize) -> Result<Self> {
        Ok(BiasScratch {
            partial: gpu.zeros(partials.max(1))?,
            total: gpu.zeros(1)?,
        })
    }

    /// Allocates a scratch for [`backward`] on `p`.
    pub fn for_backward(gpu: &CudaBackend, p: &BiasShape) -> Result<Self> {
        Self::with_len(gpu, Self::backward_len(p))
    }

    /// Allocates a scratch for the sums of `len` elements.
    pub fn for_sum(gpu: &CudaBackend, len: usize) -> Result<Self> {
        Self::with_len(gpu, Self::sum_len(len))
    }

    /// The partial sums this scratch holds.
    pub fn len(&self) -> usize {
        self.partial.len()
    }

    /// Never true (a scratch holds at least one partial sum).
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// An [`Error::Shape`] when fewer than `need` partial sums are held.
    pub fn check(&self, op: &'static str, what: &str, need: usize) -> Result<()> {
        if self.partial.len() < need {
            return Err(Error::shape(
                op,
                format!("scratch partial sums (f64) length for {what}"),
                format!("at least {need}"),
                self.partial.len(),
            ));
        }
        Ok(())
    }
}

/// `y[i, ch, s] = x[i, ch, s] + b[ch]`; `y` is fully overwritten.
pub fn add(
    gpu: &CudaBackend,
    p: &BiasShape,
    x: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let aligned = align::all_aligned(&[
        ("x", align::offset16(gpu, x)),
        ("y", align::offset16(gpu, &*y)),
    ]);
    add_with(gpu, select(p, aligned, gpu.info()), p, x, b, y)
}

/// [`add`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn add_with(
    gpu: &CudaBackend,
    kernel: BiasKernel,
    p: &BiasShape,
    x: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "bias.add";
    p.check_x(OP, "x", x.len())?;
    p.check_b(OP, "b", b.len())?;
    p.check_x(OP, "y", y.len())?;
    kernel.check_aligned(
        OP,
        &[
            ("x", align::offset16(gpu, x)),
            ("y", align::offset16(gpu, &*y)),
        ],
    )?;
    if p.is_empty() {
        return Ok(());
    }
    let name = kernel.add_entry(false);
    let f = gpu.function(kernel.module(), name)?;
    let len = p.len() as u64;
    // SAFETY: x and y hold n*c*spatial elements and b holds c (checked);
    // the kernel reads b at (i / spatial) % c < c and x, y below len; the
    // vector form runs on 16-byte aligned x and y only (checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(x)
            .arg(b)
            .arg(y)
            .arg(&len)
            .launch(gpu.elementwise_config(p.len()))
    };
    gpu.launched(name, r)
}

/// `x[i, ch, s] += b[ch]`, in place.
pub fn add_inplace(
    gpu: &CudaBackend,
    p: &BiasShape,
    x: &mut CudaViewMut<'_, f32>,
    b: &CudaView<'_, f32>,
) -> Result<()> {
    let aligned = align::offset16(gpu, &*x) == 0;
    add_inplace_with(gpu, select(p, aligned, gpu.info()), p, x, b)
}

/// [`add_inplace`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn add_inplace_with(
    gpu: &CudaBackend,
    kernel: BiasKernel,
    p: &BiasShape,
    x: &mut CudaViewMut<'_, f32>,
    b: &CudaView<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "bias.add_inplace";
    p.check_x(OP, "x", x.len())?;
    p.check_b(OP, "b", b.len())?;
    kernel.check_aligned(OP, &[("x", align::offset16(gpu, &*x))])?;
    if p.is_empty() {
        return Ok(());
    }
    let name = kernel.add_entry(true);
    let f = gpu.function(kernel.module(), name)?;
    let len = p.len() as u64;
    // SAFETY: as in `add`.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(x)
            .arg(b)
            .arg(&len)
            .launch(gpu.elementwise_config(p.len()))
    };
    gpu.launched(name, r)
}

/// The bias gradient `db[ch] = sum over i, s of dy[i, ch, s]` (f64 sums,
/// rounded once); `db` is overwritten (all zeros when there are no samples).
pub fn backward(
    gpu: &CudaBackend,
    p: &BiasShape,
    dy: &CudaView<'_, f32>,
    db: &mut CudaViewMut<'_, f32>,
    scratch: &mut BiasScratch,
) -> Result<()> {
    // The gradient reads no vectors: alignment does not change its version.
    backward_with(gpu, select(p, true, gpu.info()), p, dy, db, scratch)
}

/// [`backward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn backward_with(
    gpu: &CudaBackend,
    kernel: BiasKernel,
    p: &BiasShape,
    dy: &CudaView<'_, f32>,
    db: &mut CudaViewMut<'_, f32>,
    scratch: &mut BiasScratch,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "bias.backward";
    p.check_x(OP, "dy", dy.len())?;
    p.check_b(OP, "db", db.len())?;
    kernel.check_supports(OP, p)?;
    if p.c == 0 {
        return Ok(());
    }
    scratch.check(
        OP,
        &format!("{p:?}"),
        BiasScratch::backward_len_with(kernel, p),
    )?;
    let chunks = kernel.grad_chunks(p);
    let partial = &mut scratch.partial;
    let chunks64 = chunks as u64;
    let (partials_k, finalize_k, cfg) = match kernel.reduction() {
        BiasKernel::ChannelBlocks | BiasKernel::ChannelBlocksVec4 => (
            "bias_grad_partials",
            "bias_grad_finalize",
            reduce_config(chunks, p.c),
        ),
        BiasKernel::Columns | BiasKernel::ColumnsVec4 => (
            "bias_grad_col_partials",
            "bias_grad_col_finalize",
            LaunchConfig {
                grid_dim: (
                    p.c.div_ceil(COL_THREADS as usize).clamp(1, MAX_GRID) as u32,
                    chunks.clamp(1, MAX_GRID) as u32,
                    1,
                ),
                block_dim: (COL_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
    };
    if chunks > 0 {
        let f = gpu.function(kernel.module(), partials_k)?;
        // SAFETY: dy holds n*c*spatial elements (checked); the partial for
        // (chunk k, channel ch) reads samples of channel ch below
        // n*spatial and writes one element below c * chunks, the length
        // checked for this version.
        let r = unsafe {
            gpu.stream()
                .launch_builder(&f)
                .arg(p)
                .arg(dy)
                .arg(&mut *partial)
                .arg(&chunks64)
                .launch(cfg)
        };
        gpu.launched(partials_k, r)?;
    }
    let f = gpu.function(kernel.module(), finalize_k)?;
    // SAFETY: reads partial below c * chunks, writes db below c (checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(&*partial)
            .arg(&chunks64)
            .arg(db)
            .launch(gpu.elementwise_config(p.c))
    };
    gpu.launched(finalize_k, r)
}

fn reduce(
    gpu: &CudaBackend,
    op: &'static str,
    x: &CudaView<'_, f32>,
    square: bool,
    out: &mut CudaViewMut<'_, f64>,
    partial: &mut CudaSlice<f64>,
) -> Result<()> {
    check_len(op, "out (one f64)", out.len(), 1)?;
    let len = x.len();
    let chunks = len.div_ceil(REDUCE_CHUNK);
    if partial.len() < BiasScratch::sum_len(len) {
        return Err(Error::shape(
            op,
            format!("scratch partial sums (f64) length for {len} elements"),
            format!("at least {}", BiasScratch::sum_len(len)),
            partial.len(),
        ));
    }
    let (len64, chunks64, sq) = (len as u64, chunks as u64, square as u32);
    if chunks > 0 {
        let f = gpu.function(&BIAS, "reduce_sum_partials")?;
        // SAFETY: block k reads x[k*8192 .. min((k+1)*8192, len)] and writes
        // partial[k], k < chunks, the buffer's length.
        let r = unsafe {
            gpu.stream()
                .launch_builder(&f)
                .arg(x)
                .arg(&len64)
                .arg(&sq)
                .arg(&mut *partial)
                .arg(&chunks64)
                .launch(reduce_config(chunks, 1))
        };
        gpu.launched("reduce_sum_partials", r)?;
    }
    let f = gpu.function(&BIAS, "reduce_sum_finalize")?;
    // SAFETY: one block; reads partial below chunks, writes out[0] (out
    // holds one element, checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(&*partial)
            .arg(&chunks64)
            .arg(out)
            .launch(reduce_config(1, 1))
    };
    gpu.launched("reduce_sum_finalize", r)
}

/// `out[0] = sum(x)` in f64, on the device (deterministic; 0 for an empty
/// `x`; NaN anywhere gives NaN). `out` must hold exactly one element: pass
/// a one-element slice of a larger buffer to gather several sums.
/// `scratch` needs [`BiasScratch::sum_len`]`(x.len())` partial sums.
pub fn sum(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
    scratch: &mut BiasScratch,
) -> Result<()> {
    sum_with(
        gpu,
        // The sums read no vectors: alignment does not matter to them.
        select(&BiasShape::flat(x.len()), true, gpu.info()),
        x,
        out,
        scratch,
    )
}

/// [`sum`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn sum_with(
    gpu: &CudaBackend,
    kernel: BiasKernel,
    x: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
    scratch: &mut BiasScratch,
) -> Result<()> {
    kernel.require(gpu)?;
    reduce(gpu, "bias.sum", x, false, out, &mut scratch.partial)
}

/// `out[0] = sum(x^2)` in f64 (squares in f64), on the device: the
/// optimizer's global gradient norm is the square root of a sum of these.
pub fn sum_squares(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
    scratch: &mut BiasScratch,
) -> Result<()> {
    sum_squares_with(
        gpu,
        // The sums read no vectors: alignment does not matter to them.
        select(&BiasShape::flat(x.len()), true, gpu.info()),
        x,
        out,
        scratch,
    )
}

/// [`sum_squares`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn sum_squares_with(
    gpu: &CudaBackend,
    kernel: BiasKernel,
    x: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
    scratch: &mut BiasScratch,
) -> Result<()> {
    kernel.require(gpu)?;
    reduce(gpu, "bias.sum_squares", x, true, out, &mut scratch.partial)
}

/// [`sum`], downloaded to the host (synchronizes the stream); the total
/// lives in `scratch`.
pub fn sum_host(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    scratch: &mut BiasScratch,
) -> Result<f64> {
    let BiasScratch { partial, total } = scratch;
    reduce(gpu, "bias.sum", x, false, &mut total.as_view_mut(), partial)?;
    Ok(gpu.download(total)?[0])
}

/// [`sum_squares`], downloaded to the host (synchronizes the stream).
pub fn sum_squares_host(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    scratch: &mut BiasScratch,
) -> Result<f64> {
    let BiasScratch { partial, total } = scratch;
    reduce(
        gpu,
        "bias.sum_squares",
        x,
        true,
        &mut total.as_view_mut(),
        partial,
    )?;
    Ok(gpu.download(total)?[0])
}

/// [`backward`] with a fresh [`BiasScratch`] allocated (and freed) for this
/// call: for one-off use; a loop should keep a scratch.
pub fn backward_alloc(
    gpu: &CudaBackend,
    p: &BiasShape,
    dy: &CudaView<'_, f32>,
    db: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    backward(gpu, p, dy, db, &mut BiasScratch::for_backward(gpu, p)?)
}

/// [`sum`] with a fresh [`BiasScratch`] allocated for this call.
pub fn sum_alloc(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    sum(gpu, x, out, &mut BiasScratch::for_sum(gpu, x.len())?)
}

/// [`sum_squares`] with a fresh [`BiasScratch`] allocated for this call.
pub fn sum_squares_alloc(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    sum_squares(gpu, x, out, &mut BiasScratch::for_sum(gpu, x.len())?)
}

/// [`sum_host`] with a fresh [`BiasScratch`] allocated for this call.
pub fn sum_host_alloc(gpu: &CudaBackend, x: &CudaView<'_, f32>) -> Result<f64> {
    sum_host(gpu, x, &mut BiasScratch::for_sum(gpu, x.len())?)
}

/// [`sum_squares_host`] with a fresh [`BiasScratch`] allocated for this
/// call.
pub fn sum_squares_host_alloc(gpu: &CudaBackend, x: &CudaView<'_, f32>) -> Result<f64> {
    sum_squares_host(gpu, x, &mut BiasScratch::for_sum(gpu, x.len())?)
}
