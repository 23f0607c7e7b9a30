//! CUDA batch normalization (`kernels/batchnorm.cu`): launch wrappers
//! mirroring [`super::cpu`], with the same checks before any launch.
//!
//! Per-channel sums are two-stage and deterministic: block `(k, ch)` sums
//! samples `[4096 k, 4096 (k+1))` of channel `ch`, each thread in f64 over a
//! fixed strided subset, then a fixed shared-memory tree; a second kernel
//! adds the chunk sums in chunk order, in f64. The variance is two-pass
//! (squared deviations from the f64 mean), as on the CPU, so the f64
//! statistics differ from the CPU's only by f64 reassociation (relative
//! ~1e-15) and the f32 `save_mean`, `save_inv_std` and running statistics
//! agree with the CPU's to within one f32 rounding (almost always exactly;
//! the running-statistic updates use the CPU's exact f32 operations).
//! `y` and `dx` are f32 expressions that the compiler may contract into
//! fused multiply-adds, so they agree within a few f32 ulps.
//!
//! The dense layout (`spatial == 1`, `x` is `[n, c]` row-major) has its
//! own version, [`BatchNormKernel::Columns`]: there a channel's samples lie
//! `c` floats apart, so a block per channel uses one float of each 32-byte
//! sector it fetches. Instead one thread per channel walks 64-row chunks
//! in row order (a warp reads 128 consecutive bytes of a row), writes one
//! f64 partial per (chunk, channel) laid out `[chunks, c]`, and the second
//! stage adds a channel's partials in chunk order: the same determinism,
//! coalesced. [`select`] picks it for every dense shape.
//!
//! The element-wise passes (normalize-and-apply, the backward's dx) have
//! 16-byte vector forms in [`BatchNormKernel::ChannelBlocksVec4`] and
//! [`BatchNormKernel::ColumnsVec4`]: the same expression per element, so
//! the same bits, with a quarter of the memory instructions; [`select`]
//! takes them whenever the activation-sized tensors start on 16 bytes.
//!
//! Scratch comes from the caller: a [`BatchNormScratch`] (two f64 buffers
//! of `c * chunks` partial sums, `c` f64 means and `3 * c` f32 backward
//! coefficients, [`BatchNormScratch::bytes`] in all, where
//! `chunks = ceil(n * spatial / 4096)` for `ChannelBlocks` and
//! `ceil(n / 64)` for `Columns`; [`BatchNormScratch::lens`] covers every
//! version that runs the shape), allocated once by
//! [`BatchNormScratch::new`] and checked to be large enough on every call;
//! the launch paths allocate nothing. The `*_alloc` forms allocate a fresh
//! scratch per call, for one-off use.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::BatchNorm;
use crate::cuda::{CudaBackend, DeviceInfo, KernelVersion, align};
use crate::error::{Error, Result};

crate::kernel_versions! {
    /// The versions of this family's kernels, as data (see
    /// [`KernelVersion`]).
    pub enum BatchNormKernel {
        /// Per-channel partial sums over fixed chunks, combined in order (`kernels/batchnorm.cu`).
        ChannelBlocks => "batchnorm_channel_blocks", crate::cuda::BATCHNORM,
        /// The dense layout only (`spatial == 1`): one thread per channel
        /// reading whole rows, f64 partials over 64-row chunks combined in
        /// order (`bn_col_*` in `kernels/batchnorm.cu`).
        Columns => "batchnorm_columns", crate::cuda::BATCHNORM,
        /// `ChannelBlocks` with the element-wise passes (the forward's
        /// normalize-and-apply, the backward's dx) in 16-byte vectors
        /// (`bn_apply_vec4`, `bn_backward_dx_vec4`: one 128-bit load per
        /// input and one store per quad, the same expression per element,
        /// so the same bits); `x`, `y`, `dy` and `dx` must start on a
        /// 16-byte boundary. The statistics are `ChannelBlocks'`.
        ChannelBlocksVec4 => "batchnorm_channel_blocks_vec4", crate::cuda::BATCHNORM,
        /// `Columns` (the dense layout only) with the vector element-wise
        /// passes of `ChannelBlocksVec4`.
        ColumnsVec4 => "batchnorm_columns_vec4", crate::cuda::BATCHNORM,
    }
}

impl BatchNormKernel {
    /// Whether this version runs `p`: [`BatchNormKernel::Columns`] only
    /// the dense layout (`spatial == 1`), the others every shape.
    pub fn supports(self, p: &BatchNorm) -> bool {
        match self.reduction() {
            BatchNormKernel::Columns => p.spatial == 1,
            _ => true,
        }
    }

    /// The scalar version whose statistics and backward sums this one
    /// runs: `ChannelBlocks` or `Columns`.
    pub fn reduction(self) -> BatchNormKernel {
        match self {
            BatchNormKernel::ChannelBlocks | BatchNormKernel::ChannelBlocksVec4 => {
                BatchNormKernel::ChannelBlocks
            }
            BatchNormKernel::Columns | BatchNormKernel::ColumnsVec4 => BatchNormKernel::Columns,
        }
    }

    /// Whether its element-wise passes run in 16-byte vectors (and so need
    /// 16-byte aligned tensors).
    pub fn is_vec4(self) -> bool {
        matches!(
            self,
            BatchNormKernel::ChannelBlocksVec4 | BatchNormKernel::ColumnsVec4
        )
    }

    /// The element-wise entry points: normalize-and-apply, backward dx.
    fn elementwise(self) -> [&'static str; 2] {
        if self.is_vec4() {
            ["bn_apply_vec4", "bn_backward_dx_vec4"]
        } else {
            ["bn_apply", "bn_backward_dx"]
        }
    }

    /// An error naming the first tensor the element-wise passes of this
    /// version cannot run on.
    fn check_aligned(self, op: &'static str, bufs: &[(&str, u64)]) -> Result<()> {
        if self.is_vec4() {
            align::require_aligned(op, self.name(), bufs)
        } else {
            Ok(())
        }
    }

    /// An [`Error::Invalid`] naming the version when it does not run `p`.
    fn check_supports(self, op: &'static str, p: &BatchNorm) -> Result<()> {
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

    /// Stage-1 partial sums per buffer for `p`.
    fn chunks(self, p: &BatchNorm) -> usize {
        match self.reduction() {
            BatchNormKernel::Columns => p.n.div_ceil(COL_ROWS),
            _ => p.sample_size().div_ceil(CHANNEL_CHUNK),
        }
    }

    /// Stage 1's launch shape.
    fn partials_config(self, p: &BatchNorm, chunks: usize) -> LaunchConfig {
        match self.reduction() {
            BatchNormKernel::Columns => LaunchConfig {
                grid_dim: (
                    p.c.div_ceil(COL_THREADS as usize).clamp(1, MAX_GRID) as u32,
                    chunks.clamp(1, MAX_GRID) as u32,
                    1,
                ),
                block_dim: (COL_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            _ => partials_config(p, chunks),
        }
    }

    /// The kernel names of the reduction stages: statistics partials, mean,
    /// training finalize, backward partials, backward finalize (the same
    /// parameters in both versions; only the partials' layout differs).
    fn stages(self) -> [&'static str; 5] {
        match self.reduction() {
            BatchNormKernel::ChannelBlocks => [
                "bn_stat_partials",
                "bn_mean",
                "bn_finalize_training",
                "bn_backward_partials",
                "bn_backward_finalize",
            ],
            _ => [
                "bn_col_stat_partials",
                "bn_col_mean",
                "bn_col_finalize_training",
                "bn_col_backward_partials",
                "bn_col_backward_finalize",
            ],
        }
    }
}

/// The version the plain entry points run for `p` on `info`'s
/// device; the `*_with` forms run the one a caller names. The dense layout
/// (`spatial == 1`) gets [`BatchNormKernel::Columns`]: there
/// `ChannelBlocks`' blocks read samples `c` floats apart, one useful float
/// per 32-byte sector. Every other shape gets
/// [`BatchNormKernel::ChannelBlocks`], whose samples are contiguous runs.
///
/// `aligned`: every activation-sized tensor of the call (`x`, `y`, `dy`,
/// `dx`) starts on a 16-byte boundary; then the vector element-wise passes
/// ([`BatchNormKernel::ColumnsVec4`], [`BatchNormKernel::ChannelBlocksVec4`])
/// run, with the same bits.
pub fn select(p: &BatchNorm, aligned: bool, _info: &DeviceInfo) -> BatchNormKernel {
    match (p.spatial == 1, aligned) {
        (true, false) => BatchNormKernel::Columns,
        (true, true) => BatchNormKernel::ColumnsVec4,
        (false, false) => BatchNormKernel::ChannelBlocks,
        (false, true) => BatchNormKernel::ChannelBlocksVec4,
    }
}

// SAFETY: `#[repr(C)]`, three usizes, a bool, two f32s and a
// `#[repr(u32)]` enum: plain old data of 40 bytes, mirrored as `struct
// BatchNorm` in batchnorm.cu.
unsafe impl cudarc::driver::DeviceRepr for BatchNorm {}
const _: () = assert!(std::mem::size_of::<BatchNorm>() == 40);

/// Samples per stage-1 block (`CHANNEL_CHUNK` in common.cuh).
const CHANNEL_CHUNK: usize = 4096;
/// Threads per reduction block (`REDUCE_THREADS` in common.cuh).
const REDUCE_THREADS: u32 = 256;
/// Grid dimensions beyond this stride (the kernels loop over the rest).
const MAX_GRID: usize = 65535;
/// Rows per partial of the column kernels (`COL_ROWS` in common.cuh).
const COL_ROWS: usize = 64;
/// Threads (channels) per block of the column kernels (`COL_THREADS`).
const COL_THREADS: u32 = 256;

/// Element counts of a [`BatchNormScratch`]'s buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchNormScratchLens {
    /// f64 partial sums, each of the two buffers (`c * chunks`).
    pub partials: usize,
    /// f64 per-channel means (`c`).
    pub mean64: usize,
    /// f32 per-channel coefficients (`3 * c`; the inference `inv_std` uses
    /// the first `c`).
    pub coefs: usize,
}

impl BatchNormScratchLens {
    /// The larger of each count (a scratch that serves both).
    pub fn max(self, o: Self) -> Self {
        BatchNormScratchLens {
            partials: self.partials.max(o.partials),
            mean64: self.mean64.max(o.mean64),
            coefs: self.coefs.max(o.coefs),
        }
    }

    /// Whether every count is at least `need`'s.
    pub fn covers(&self, need: &Self) -> bool {
        self.partials >= need.partials && self.mean64 >= need.mean64 && self.coefs >= need.coefs
    }

    /// Device bytes of a scratch with these counts.
    pub fn bytes(&self) -> usize {
        16usize
            .saturating_mul(self.partials)
            .saturating_add(8usize.saturating_mul(self.mean64))
            .saturating_add(4usize.saturating_mul(self.coefs))
    }
}

/// The device scratch of the batch-norm wrappers (training forward,
/// inference, backward), owned by the caller and reused across calls.
///
/// [`BatchNormScratch::new`] is the allocating step; the wrappers check
/// ([`BatchNormScratch::check`]) that a given scratch is large enough for
/// their parameters and refuse it with an [`Error::Shape`] otherwise. The
/// kernels overwrite every element they read, so a scratch needs no
/// clearing between calls. Each buffer holds at least one element (the
/// driver rejects empty allocations).
pub struct BatchNormScratch {
    partial_a: CudaSlice<f64>,
    partial_b: CudaSlice<f64>,
    mean64: CudaSlice<f64>,
    coefs: CudaSlice<f32>,
}

impl std::fmt::Debug for BatchNormScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNormScratch")
            .field("lens", &self.capacity())
            .finish()
    }
}

impl BatchNormScratch {
    /// The element counts that `p` needs on any version that runs it (so
    /// a scratch from [`BatchNormScratch::new`] serves the `*_with` forms
    /// too): the largest of [`BatchNormScratch::lens_with`] over them.
    pub fn lens(p: &BatchNorm) -> BatchNormScratchLens {
        BatchNormKernel::ALL
            .iter()
            .filter(|k| k.supports(p))
            .map(|&k| Self::lens_with(k, p))
            .fold(BatchNormScratchLens::default(), BatchNormScratchLens::max)
    }

    /// The element counts that `p` needs on `kernel`: `c * chunks` partials
    /// with `chunks = ceil(n * spatial / 4096)` for `ChannelBlocks` and
    /// `ceil(n / 64)` for `Columns`.
    pub fn lens_with(kernel: BatchNormKernel, p: &BatchNorm) -> BatchNormScratchLens {
        BatchNormScratchLens {
            partials: p.c.saturating_mul(kernel.chunks(p)),
            mean64: p.c,
            coefs: p.c.saturating_mul(3),
        }
    }

    /// The device bytes that `p` needs.
    pub fn bytes(p: &BatchNorm) -> usize {
        Self::lens(p).bytes()
    }

    /// Allocates a scratch for `p` (zeroed; the one allocating step).
    pub fn new(gpu: &CudaBackend, p: &BatchNorm) -> Result<Self> {
        Self::with_lens(gpu, Self::lens(p))
    }

    /// Allocates a scratch of the given counts (zeroed), e.g. the
    /// [`BatchNormScratchLens::max`] over several layers.
    pub fn with_lens(gpu: &CudaBackend, lens: BatchNormScratchLens) -> Result<Self> {
        Ok(BatchNormScratch {
            partial_a: gpu.zeros(lens.partials.max(1))?,
            partial_b: gpu.zeros(lens.partials.max(1))?,
            mean64: gpu.zeros(lens.mean64.max(1))?,
            coefs: gpu.zeros(lens.coefs.max(1))?,
        })
    }

    /// The element counts this scratch holds.
    pub fn capacity(&self) -> BatchNormScratchLens {
        BatchNormScratchLens {
            partials: self.partial_a.len().min(self.partial_b.len()),
            mean64: self.mean64.len(),
            coefs: self.coefs.len(),
        }
    }

    /// Whether this scratch is large enough for `p`.
    pub fn fits(&self, p: &BatchNorm) -> bool {
        self.capacity().covers(&Self::lens(p))
    }

    /// An [`Error::Shape`] naming the first buffer too small for `p` on
    /// any version that runs it.
    pub fn check(&self, op: &'static str, p: &BatchNorm) -> Result<()> {
        self.check_lens(op, p, Self::lens(p))
    }

    /// The same for `p` on `kernel`.
    pub fn check_with(
        &self,
        op: &'static str,
        kernel: BatchNormKernel,
        p: &BatchNorm,
    ) -> Result<()> {
        self.check_lens(op, p, Self::lens_with(kernel, p))
    }

    fn check_lens(
        &self,
        op: &'static str,
        p: &BatchNorm,
        need: BatchNormScratchLens,
    ) -> Result<()> {
        let have = self.capacity();
        for (what, got, want) in [
            (
                "scratch partial sums (f64, c x chunks)",
                have.partials,
                need.partials,
            ),
            ("scratch means (f64, c)", have.mean64, need.mean64),
            ("scratch coefficients (f32, 3 x c)", have.coefs, need.coefs),
        ] {
            if got < want {
                return Err(Error::shape(
                    op,
                    format!("{what} length for {p:?}"),
                    format!("at least {want}"),
                    got,
                ));
            }
        }
        Ok(())
    }
}

fn partials_config(p: &BatchNorm, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            chunks.clamp(1, MAX_GRID) as u32,
            p.c.clamp(1, MAX_GRID) as u32,
            1,
        ),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Training forward: normalizes `x` with its batch statistics into `y`,
/// writes `save_mean` and `save_inv_std` (all fully overwritten) and
/// updates `running_mean` and `running_var` in place.
#[allow(clippy::too_many_arguments)]
pub fn forward_training(
    gpu: &CudaBackend,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    save_mean: &mut CudaViewMut<'_, f32>,
    save_inv_std: &mut CudaViewMut<'_, f32>,
    running_mean: &mut CudaViewMut<'_, f32>,
    running_var: &mut CudaViewMut<'_, f32>,
    scratch: &mut BatchNormScratch,
) -> Result<()> {
    let aligned = align::all_aligned(&[
        ("x", align::offset16(gpu, x)),
        ("y", align::offset16(gpu, &*y)),
    ]);
    forward_training_with(
        gpu,
        select(p, aligned, gpu.info()),
        p,
        x,
        gamma,
        beta,
        y,
        save_mean,
        save_inv_std,
        running_mean,
        running_var,
        scratch,
    )
}

/// [`forward_training`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
#[allow(clippy::too_many_arguments)]
pub fn forward_training_with(
    gpu: &CudaBackend,
    kernel: BatchNormKernel,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    save_mean: &mut CudaViewMut<'_, f32>,
    save_inv_std: &mut CudaViewMut<'_, f32>,
    running_mean: &mut CudaViewMut<'_, f32>,
    running_var: &mut CudaViewMut<'_, f32>,
    scratch: &mut BatchNormScratch,
) -> Result<()> {
    kernel.require(gpu)?;
    p.check(
        "batchnorm.forward_training",
        &[("x", x.len()), ("y", y.len())],
        &[
            ("gamma", gamma.len()),
            ("beta", beta.len()),
            ("save_mean", save_mean.len()),
            ("save_inv_std", save_inv_std.len()),
            ("running_mean", running_mean.len()),
            ("running_var", running_var.len()),
        ],
    )?;
    kernel.check_supports("batchnorm.forward_training", p)?;
    kernel.check_aligned(
        "batchnorm.forward_training",
        &[
            ("x", align::offset16(gpu, x)),
            ("y", align::offset16(gpu, &*y)),
        ],
    )?;
    scratch.check_with("batchnorm.forward_training", kernel, p)?;
    let chunks = kernel.chunks(p);
    let chunks64 = chunks as u64;
    let [stat_k, mean_k, finalize_k, _, _] = kernel.stages();
    let BatchNormScratch {
        partial_a: partial,
        mean64,
        ..
    } = scratch;
    let stat = gpu.function(kernel.module(), stat_k)?;
    let cfg = kernel.partials_config(p, chunks);
    // SAFETY (both passes): x holds n*c*spatial elements (checked); the
    // partial for (chunk k, channel ch) reads samples of channel ch below
    // n*spatial and mean64[ch], and writes one element below c * chunks,
    // the length checked for this version.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&stat)
            .arg(p)
            .arg(x)
            .arg(&*mean64)
            .arg(&0u32)
            .arg(&mut *partial)
            .arg(&chunks64)
            .launch(cfg)
    };
    gpu.launched(stat_k, r)?;
    let f = gpu.function(kernel.module(), mean_k)?;
    // SAFETY: reads partial below c * chunks, writes mean64 below c.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(&*partial)
            .arg(&chunks64)
            .arg(&mut *mean64)
            .launch(gpu.elementwise_config(p.c))
    };
    gpu.launched(mean_k, r)?;
    // SAFETY: as the first pass.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&stat)
            .arg(p)
            .arg(x)
            .arg(&*mean64)
            .arg(&1u32)
            .arg(&mut *partial)
            .arg(&chunks64)
            .launch(cfg)
    };
    gpu.launched(stat_k, r)?;
    let factor = p.variance_factor();
    let f = gpu.function(kernel.module(), finalize_k)?;
    // SAFETY: reads partial below c * chunks and mean64 below c; the four
    // per-channel outputs hold c elements each (checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(&*partial)
            .arg(&chunks64)
            .arg(&*mean64)
            .arg(&factor)
            .arg(&mut *save_mean)
            .arg(&mut *save_inv_std)
            .arg(running_mean)
            .arg(running_var)
            .launch(gpu.elementwise_config(p.c))
    };
    gpu.launched(finalize_k, r)?;
    apply(
        gpu,
        kernel,
        p,
        x,
        gamma,
        beta,
        &save_mean.as_view(),
        &save_inv_std.as_view(),
        y,
    )
}

/// `y = gamma * ((x - mean) * inv_std) + beta` per channel; lengths checked
/// by the callers.
#[allow(clippy::too_many_arguments)]
fn apply(
    gpu: &CudaBackend,
    kernel: BatchNormKernel,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    mean: &CudaView<'_, f32>,
    inv_std: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let [name, _] = kernel.elementwise();
    let f = gpu.function(kernel.module(), name)?;
    let len = p.len() as u64;
    // SAFETY: x and y hold n*c*spatial elements, the per-channel inputs c
    // (checked by the callers); element i reads channel (i / spatial) % c;
    // the vector form runs on 16-byte aligned x and y only (checked by the
    // callers).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(x)
            .arg(gamma)
            .arg(beta)
            .arg(mean)
            .arg(inv_std)
            .arg(y)
            .arg(&len)
            .launch(gpu.elementwise_config(p.len()))
    };
    gpu.launched(name, r)
}

/// Inference forward with the running statistics; `y` fully overwritten.
#[allow(clippy::too_many_arguments)]
pub fn forward_inference(
    gpu: &CudaBackend,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    running_mean: &CudaView<'_, f32>,
    running_var: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    scratch: &mut BatchNormScratch,
) -> Result<()> {
    let aligned = align::all_aligned(&[
        ("x", align::offset16(gpu, x)),
        ("y", align::offset16(gpu, &*y)),
    ]);
    forward_inference_with(
        gpu,
        select(p, aligned, gpu.info()),
        p,
        x,
        gamma,
        beta,
        running_mean,
        running_var,
        y,
        scratch,
    )
}

/// [`forward_inference`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
#[allow(clippy::too_many_arguments)]
pub fn forward_inference_with(
    gpu: &CudaBackend,
    kernel: BatchNormKernel,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    running_mean: &CudaView<'_, f32>,
    running_var: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    scratch: &mut BatchNormScratch,
) -> Result<()> {
    kernel.require(gpu)?;
    p.check(
        "batchnorm.forward_inference",
        &[("x", x.len()), ("y", y.len())],
        &[
            ("gamma", gamma.len()),
            ("beta", beta.len()),
            ("running_mean", running_mean.len()),
            ("running_var", running_var.len()),
        ],
    )?;
    kernel.check_supports("batchnorm.forward_inference", p)?;
    kernel.check_aligned(
        "batchnorm.forward_inference",
        &[
            ("x", align::offset16(gpu, x)),
            ("y", align::offset16(gpu, &*y)),
        ],
    )?;
    scratch.check_with("batchnorm.forward_inference", kernel, p)?;
    let inv_std = &mut scratch.coefs;
    let f = gpu.function(kernel.module(), "bn_inference_inv_std")?;
    // SAFETY: reads running_var below c (checked), writes inv_std below c.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(running_var)
            .arg(&mut *inv_std)
            .launch(gpu.elementwise_config(p.c))
    };
    gpu.launched("bn_inference_inv_std", r)?;
    apply(
        gpu,
        kernel,
        p,
        x,
        gamma,
        beta,
        running_mean,
        &inv_std.as_view(),
        y,
    )
}

/// Backward through the training forward: writes `dx`, `dgamma` and
/// `dbeta` (all fully overwritten).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &CudaBackend,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    save_mean: &CudaView<'_, f32>,
    save_inv_std: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
    dgamma: &mut CudaViewMut<'_, f32>,
    dbeta: &mut CudaViewMut<'_, f32>,
    scratch: &mut BatchNormScratch,
) -> Result<()> {
    let aligned = align::all_aligned(&[
        ("x", align::offset16(gpu, x)),
        ("dy", align::offset16(gpu, dy)),
        ("dx", align::offset16(gpu, &*dx)),
    ]);
    backward_with(
        gpu,
        select(p, aligned, gpu.info()),
        p,
        x,
        dy,
        gamma,
        save_mean,
        save_inv_std,
        dx,
        dgamma,
        dbeta,
        scratch,
    )
}

/// [`backward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
#[allow(clippy::too_many_arguments)]
pub fn backward_with(
    gpu: &CudaBackend,
    kernel: BatchNormKernel,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    save_mean: &CudaView<'_, f32>,
    save_inv_std: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
    dgamma: &mut CudaViewMut<'_, f32>,
    dbeta: &mut CudaViewMut<'_, f32>,
    scratch: &mut BatchNormScratch,
) -> Result<()> {
    kernel.require(gpu)?;
    p.check(
        "batchnorm.backward",
        &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())],
        &[
            ("gamma", gamma.len()),
            ("save_mean", save_mean.len()),
            ("save_inv_std", save_inv_std.len()),
            ("dgamma", dgamma.len()),
            ("dbeta", dbeta.len()),
        ],
    )?;
    kernel.check_supports("batchnorm.backward", p)?;
    kernel.check_aligned(
        "batchnorm.backward",
        &[
            ("x", align::offset16(gpu, x)),
            ("dy", align::offset16(gpu, dy)),
            ("dx", align::offset16(gpu, &*dx)),
        ],
    )?;
    scratch.check_with("batchnorm.backward", kernel, p)?;
    let chunks = kernel.chunks(p);
    let chunks64 = chunks as u64;
    let [_, _, _, partials_k, finalize_k] = kernel.stages();
    let BatchNormScratch {
        partial_a: part_dy,
        partial_b: part_dy_xhat,
        coefs,
        ..
    } = scratch;
    let f = gpu.function(kernel.module(), partials_k)?;
    // SAFETY: x, dy hold n*c*spatial elements, save_* hold c (checked);
    // the partial for (chunk k, channel ch) writes one element below
    // c * chunks of both partial buffers.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(x)
            .arg(dy)
            .arg(save_mean)
            .arg(save_inv_std)
            .arg(&mut *part_dy)
            .arg(&mut *part_dy_xhat)
            .arg(&chunks64)
            .launch(kernel.partials_config(p, chunks))
    };
    gpu.launched(partials_k, r)?;
    let f = gpu.function(kernel.module(), finalize_k)?;
    // SAFETY: reads the partials below c * chunks and gamma, save_inv_std
    // below c; writes dgamma, dbeta below c (checked) and coefs below 3c.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(&*part_dy)
            .arg(&*part_dy_xhat)
            .arg(&chunks64)
            .arg(gamma)
            .arg(save_inv_std)
            .arg(dgamma)
            .arg(dbeta)
            .arg(&mut *coefs)
            .launch(gpu.elementwise_config(p.c))
    };
    gpu.launched(finalize_k, r)?;
    let [_, dx_k] = kernel.elementwise();
    let f = gpu.function(kernel.module(), dx_k)?;
    let len = p.len() as u64;
    // SAFETY: x, dy, dx hold n*c*spatial elements; element i reads channel
    // (i / spatial) % c of save_* (c elements) and coefs (3c); the vector
    // form runs on 16-byte aligned x, dy and dx only (checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(x)
            .arg(dy)
            .arg(save_mean)
            .arg(save_inv_std)
            .arg(&*coefs)
            .arg(dx)
            .arg(&len)
            .launch(gpu.elementwise_config(p.len()))
    };
    gpu.launched(dx_k, r)
}

/// [`forward_training`] with a fresh [`BatchNormScratch`] allocated (and
/// freed) for this call: for one-off use; a loop should keep a scratch.
#[allow(clippy::too_many_arguments)]
pub fn forward_training_alloc(
    gpu: &CudaBackend,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    save_mean: &mut CudaViewMut<'_, f32>,
    save_inv_std: &mut CudaViewMut<'_, f32>,
    running_mean: &mut CudaViewMut<'_, f32>,
    running_var: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    p.validate("batchnorm.forward_training")?;
    let mut scratch = BatchNormScratch::new(gpu, p)?;
    forward_training(
        gpu,
        p,
        x,
        gamma,
        beta,
        y,
        save_mean,
        save_inv_std,
        running_mean,
        running_var,
        &mut scratch,
    )
}

/// [`forward_inference`] with a fresh [`BatchNormScratch`] allocated (and
/// freed) for this call.
#[allow(clippy::too_many_arguments)]
pub fn forward_inference_alloc(
    gpu: &CudaBackend,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    running_mean: &CudaView<'_, f32>,
    running_var: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    p.validate("batchnorm.forward_inference")?;
    let mut scratch = BatchNormScratch::new(gpu, p)?;
    forward_inference(
        gpu,
        p,
        x,
        gamma,
        beta,
        running_mean,
        running_var,
        y,
        &mut scratch,
    )
}

/// [`backward`] with a fresh [`BatchNormScratch`] allocated (and freed) for
/// this call.
#[allow(clippy::too_many_arguments)]
pub fn backward_alloc(
    gpu: &CudaBackend,
    p: &BatchNorm,
    x: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    gamma: &CudaView<'_, f32>,
    save_mean: &CudaView<'_, f32>,
    save_inv_std: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
    dgamma: &mut CudaViewMut<'_, f32>,
    dbeta: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    p.validate("batchnorm.backward")?;
    let mut scratch = BatchNormScratch::new(gpu, p)?;
    backward(
        gpu,
        p,
        x,
        dy,
        gamma,
        save_mean,
        save_inv_std,
        dx,
        dgamma,
        dbeta,
        &mut scratch,
    )
}
