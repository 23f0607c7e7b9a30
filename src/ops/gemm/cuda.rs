//! CUDA GEMM: launch wrappers for `kernels/gemm.cu`, mirroring `cpu.rs`.
//!
//! The versions of [`GemmKernel`], side by side: v1 (`kernels/gemm.cu`), one
//! register-prefetching tiled kernel in two tile shapes (64x64 and 128x128
//! output tiles), for every device; v2 (`kernels/gemm_v2.cu`, sm_80+), a
//! warp-tiled kernel that streams its operand tiles into two shared-memory
//! stages with 16-byte `cp.async` copies, and v2 split-K, which splits a long
//! `k` of a product with few output tiles over more blocks; and an opt-in
//! TF32 tensor-core kernel (`kernels/gemm_tf32.cu`, sm_80+,
//! [`Precision::Tf32`]), whose results differ from f32 by TF32's rounding,
//! and its Hopper form (`kernels/gemm_wgmma.cu`, sm_90a: compute capability
//! 9.0 exactly), warpgroup `wgmma.mma_async` from swizzled shared memory.
//! v1 and v2 sum every element over `k` in increasing order, so the choice
//! between them never changes a result; split-K adds its `k` ranges in a
//! fixed order (see [`split_k_parts`]), a different rounding, but the same
//! bits run to run. [`select`] picks an f32 version per launch by shape and
//! compute capability and never a TF32 one; that is what [`gemm`] and
//! [`gemm_backward`] run. [`select_with`] takes the caller's [`Precision`];
//! [`gemm_with`] and [`gemm_backward_with`] run a version of the caller's
//! choosing (tests cover every version, the bench times each one).
//!
//! Split-K needs scratch for its partial slabs, and no launch path here
//! allocates: [`gemm`] (and [`select`]) never split `k`; [`gemm_ws`] takes a
//! workspace and lets [`select_ws`] pick split-K where the shape calls for it
//! and the workspace holds [`select_workspace_len`] floats; [`gemm_with`]
//! takes an optional workspace for the version it is given
//! ([`workspace_len`] floats, 0 for every version but split-K). The batch runs through the grid's z
//! dimension in one launch. The epilogue (alpha, beta, bias, activation) is
//! fused into the write-back.
//!
//! Sums over a batch (the gradient of an operand shared by the batch, and
//! conv's filter gradient) run inside the kernel: a block walks the items of
//! its group one after another, accumulating in registers. When that would
//! leave the device mostly idle (few output tiles), the batch is split into
//! a number of groups that depends only on the shape, each writing a partial
//! product, and a second kernel adds the partials in group order: no
//! atomics, so results are bit-identical run to run. The partials live in a
//! workspace from the caller ([`backward_workspace_len`] floats for
//! [`gemm_backward`]); only the `_alloc` form allocates.

use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{Bias, Epilogue, Gemm, GradGemm, Operand, Precision};
use crate::cuda::{CudaBackend, DeviceInfo, GEMM, GEMM_TF32, GEMM_V2, GEMM_WGMMA, KernelModule};
use crate::error::{Error, Result};

// SAFETY: `Gemm` is `#[repr(C)]` with only u64 (usize), f32 and bool fields:
// plain old data, mirrored field for field as `struct Gemm` in
// kernels/gemm.cu (which asserts the same size).
unsafe impl DeviceRepr for Gemm {}
const _: () = assert!(std::mem::size_of::<Gemm>() == 96);

/// Blocks a summed GEMM aims for when it splits its batch into partial
/// products: about two waves on a 132-SM H100. A constant, not the device's
/// SM count, so the summation order depends on the shape alone.
const SPLIT_TARGET_BLOCKS: usize = 256;

/// The k depth of one v2 shared-memory stage (`V2_BK` in kernels/gemm_v2.cu):
/// split-K splits `k` at multiples of it.
const V2_BK: usize = 16;

/// The shortest `k` range one split-K split gets when [`select`] splits:
/// 16 stages, so that the pipeline's fill and the partial slab's write
/// (m*n floats per split) stay small beside the split's (m+n)*256 loads.
const SPLIT_K_MIN_DEPTH: usize = 256;

/// The most splits of one product (bounds the partial slabs' memory).
const SPLIT_K_MAX_PARTS: usize = 64;

/// A bias vector in device memory: [`Bias`] over a cudarc view.
pub type DeviceBias<'a> = Bias<&'a CudaView<'a, f32>>;

/// The device epilogue: [`super::Epilogue`] with a [`DeviceBias`].
pub type DeviceEpilogue<'a> = Epilogue<&'a CudaView<'a, f32>>;

/// A version of the GEMM kernel: the versions as data, so that a caller
/// (a test, the bench, a framework with its own heuristics) can name one,
/// and a new version is one more variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmKernel {
    /// `gemm_64x64`: 64x64 output tiles, 4x4 per thread; for small products.
    Tiled64,
    /// `gemm_128x128`: 128x128 output tiles, 8x8 per thread; for products
    /// with enough tiles to fill the device.
    Tiled128,
    /// `gemm_v2_128x128` (sm_80+): 128x128 output tiles, 8 warps of 64x32,
    /// 8x8 per thread; operand tiles copied global -> shared with 16-byte
    /// `cp.async` (4-byte copies where a pointer or leading dimension is not
    /// 16-byte aligned) into two stages, 128-bit shared-memory reads. The
    /// same bits as v1.
    V2,
    /// `gemm_v2_splitk` then `gemm_v2_splitk_reduce` (sm_80+): v2 with `k`
    /// split into ranges of whole 16-deep stages, each range's raw sum
    /// written into its own slab, the slabs added in range order and the
    /// epilogue applied by the reduction. Forced through [`gemm_with`], it
    /// splits any product with at least two stages of `k`
    /// ([`split_k_parts_forced`]) into a workspace of [`workspace_len`]
    /// floats; [`select_ws`] picks it only for few output tiles and a long
    /// `k` ([`split_k_parts`]) and a workspace of [`select_workspace_len`]
    /// floats. A product with nothing to split, and every product of
    /// [`gemm_backward_with`] (whose workspace holds the partial sums over
    /// a batch, not split-K's slabs), runs on [`GemmKernel::V2`].
    V2SplitK,
    /// `gemm_tf32_128x128`: TF32 tensor cores (`mma.sync.m16n8k8`), 128x128
    /// output tiles, 64x32 per warp; sm_80 and newer. [`Precision::Tf32`]:
    /// opt-in only, never chosen by [`select`].
    Tf32MmaSync,
    /// `gemm_tf32_wgmma_128x128`: TF32 warpgroup tensor cores
    /// (`wgmma.mma_async.m64n128k8`, operands from 64-byte-swizzled shared
    /// memory in 3 stages), 128x128 output tiles, 64x128 per warpgroup. Its
    /// PTX targets sm_90a, which loads on compute capability 9.0 only (H100,
    /// H200), not on newer devices: [`GemmKernel::runs_on`] is `cc == 9.0`,
    /// and forcing it elsewhere is an error. [`Precision::Tf32`]: opt-in
    /// only; [`select_with`] prefers it to [`GemmKernel::Tf32MmaSync`] on 9.0.
    Tf32Wgmma,
}

impl GemmKernel {
    /// Every version, oldest first (whatever their [`GemmKernel::precision`]:
    /// check a TF32 version's results with a TF32 tolerance).
    pub const ALL: [GemmKernel; 6] = [
        GemmKernel::Tiled64,
        GemmKernel::Tiled128,
        GemmKernel::Tf32MmaSync,
        GemmKernel::V2,
        GemmKernel::V2SplitK,
        GemmKernel::Tf32Wgmma,
    ];

    /// The kernel's entry point in [`GemmKernel::module`].
    pub const fn name(self) -> &'static str {
        match self {
            GemmKernel::Tiled64 => "gemm_64x64",
            GemmKernel::Tiled128 => "gemm_128x128",
            GemmKernel::Tf32MmaSync => "gemm_tf32_128x128",
            GemmKernel::V2 => "gemm_v2_128x128",
            GemmKernel::V2SplitK => "gemm_v2_splitk",
            GemmKernel::Tf32Wgmma => "gemm_tf32_wgmma_128x128",
        }
    }

    /// The arithmetic of its products (its name contains `tf32` exactly
    /// when this is [`Precision::Tf32`]).
    pub const fn precision(self) -> Precision {
        match self {
            GemmKernel::Tiled64 | GemmKernel::Tiled128 | GemmKernel::V2 | GemmKernel::V2SplitK => {
                Precision::F32
            }
            GemmKernel::Tf32MmaSync | GemmKernel::Tf32Wgmma => Precision::Tf32,
        }
    }

    /// Rows and columns of `C` one block computes.
    pub const fn tile(self) -> usize {
        match self {
            GemmKernel::Tiled64 => 64,
            GemmKernel::Tiled128
            | GemmKernel::Tf32MmaSync
            | GemmKernel::Tf32Wgmma
            | GemmKernel::V2
            | GemmKernel::V2SplitK => 128,
        }
    }

    /// The PTX module holding the kernel.
    pub fn module(self) -> &'static KernelModule {
        match self {
            GemmKernel::Tiled64 | GemmKernel::Tiled128 => &GEMM,
            GemmKernel::Tf32MmaSync => &GEMM_TF32,
            GemmKernel::Tf32Wgmma => &GEMM_WGMMA,
            GemmKernel::V2 | GemmKernel::V2SplitK => &GEMM_V2,
        }
    }

    /// The oldest device that runs it: its module's
    /// [`KernelModule::min_compute_capability`].
    pub fn min_compute_capability(self) -> (i32, i32) {
        self.module().min_compute_capability
    }

    /// Whether `info`'s device can run it: at least its minimum compute
    /// capability, and exactly 9.0 for [`GemmKernel::Tf32Wgmma`] (sm_90a PTX
    /// loads on no other device).
    pub fn runs_on(self, info: &DeviceInfo) -> bool {
        <Self as crate::cuda::KernelVersion>::runs_on(self, info)
    }
}

impl crate::cuda::KernelVersion for GemmKernel {
    fn all() -> &'static [Self] {
        &Self::ALL
    }

    fn name(self) -> &'static str {
        GemmKernel::name(self)
    }

    fn modules(self) -> &'static [&'static KernelModule] {
        match self {
            GemmKernel::Tiled64 | GemmKernel::Tiled128 => std::slice::from_ref(&GEMM_MODULE),
            GemmKernel::Tf32MmaSync => &GEMM_TF32_MODULES,
            GemmKernel::Tf32Wgmma => &GEMM_WGMMA_MODULES,
            GemmKernel::V2 | GemmKernel::V2SplitK => &GEMM_V2_MODULES,
        }
    }
}

/// [`GemmKernel::modules`]' slice for the versions in `kernels/gemm.cu`.
static GEMM_MODULE: &KernelModule = &GEMM;
/// The TF32 version's: its kernel in `kernels/gemm_tf32.cu`, and
/// `gemm_sum_partials` of `kernels/gemm.cu` for split batch sums.
static GEMM_TF32_MODULES: [&KernelModule; 2] = [&GEMM_TF32, &GEMM];
/// v2's: its kernels in `kernels/gemm_v2.cu`, and `gemm_sum_partials` of
/// `kernels/gemm.cu` for split batch sums.
static GEMM_V2_MODULES: [&KernelModule; 2] = [&GEMM_V2, &GEMM];
/// The wgmma version's: its kernel in `kernels/gemm_wgmma.cu`, and
/// `gemm_sum_partials` of `kernels/gemm.cu`.
static GEMM_WGMMA_MODULES: [&KernelModule; 2] = [&GEMM_WGMMA, &GEMM];

/// The version [`gemm`] runs for `p` on `info`'s device:
/// Never split-K, which needs a workspace (see [`select_ws`]):
/// - 128x128 tiles (v2 on sm_80+, else v1) when `m` and `n` are at least 128
///   and there are at least as many such tiles (over the batch) as
///   multiprocessors;
/// - else v1's 64x64 tiles.
pub fn select(p: &Gemm, info: &DeviceInfo) -> GemmKernel {
    select_grouped(p, 1, info)
}

/// The version for `p` on `info`'s device in the arithmetic `precision`
/// allows: [`select`]'s f32 choice for [`Precision::F32`]; for
/// [`Precision::Tf32`] a TF32 tensor-core version where the device has one:
/// [`GemmKernel::Tf32Wgmma`] on compute capability 9.0 (H100, H200), else
/// [`GemmKernel::Tf32MmaSync`] on sm_80 and newer (10.x and 12.x included:
/// they cannot load sm_90a PTX), else [`select`]'s f32 choice (more precise
/// than asked, never less). The returned version's
/// [`GemmKernel::precision`] and name say which arithmetic ran.
pub fn select_with(p: &Gemm, info: &DeviceInfo, precision: Precision) -> GemmKernel {
    match precision {
        Precision::Tf32 if GemmKernel::Tf32Wgmma.runs_on(info) => GemmKernel::Tf32Wgmma,
        Precision::Tf32 if GemmKernel::Tf32MmaSync.runs_on(info) => GemmKernel::Tf32MmaSync,
        _ => select(p, info),
    }
}

/// [`select`] for a launch with a workspace of `workspace` floats
/// ([`gemm_ws`]): v2 split-K on sm_80 and newer when the product has few
/// 128x128 output tiles and a long `k` ([`split_k_parts`] > 1) and the
/// workspace holds its slabs ([`select_workspace_len`]); else what
/// [`select`] picks. With a workspace of at least [`select_workspace_len`]
/// floats the choice, and with it every bit of the result, depends on the
/// shape and the device's compute capability alone.
pub fn select_ws(p: &Gemm, info: &DeviceInfo, workspace: usize) -> GemmKernel {
    let need = select_workspace_len(p);
    if need > 0 && need <= workspace && GemmKernel::V2SplitK.runs_on(info) {
        return GemmKernel::V2SplitK;
    }
    select(p, info)
}

/// Floats of workspace with which [`gemm_ws`] splits `p`'s `k` (on sm_80
/// and newer): `batch * split_k_parts(p) * m * n`, 0 when [`split_k_parts`]
/// does not split it (then no workspace is needed). At most 256 slabs of
/// one 128x128 tile each, 16 MiB. Depends on the shape alone.
pub fn select_workspace_len(p: &Gemm) -> usize {
    split_k_workspace_len(p, split_k_parts(p))
}

/// Floats of workspace [`gemm_with`] needs to run `p` on `kernel`: the
/// partial slabs of [`GemmKernel::V2SplitK`] (`batch * parts * m * n` for
/// [`split_k_parts_forced`] parts; 0 when `k` has a single stage, which runs
/// unsplit), 0 for every other version.
pub fn workspace_len(p: &Gemm, kernel: GemmKernel) -> usize {
    match kernel {
        GemmKernel::V2SplitK => split_k_workspace_len(p, split_k_parts_forced(p)),
        GemmKernel::Tiled64
        | GemmKernel::Tiled128
        | GemmKernel::V2
        | GemmKernel::Tf32MmaSync
        | GemmKernel::Tf32Wgmma => 0,
    }
}

/// `batch * parts * m * n` (saturating: a product that large fails its
/// length checks anyway), 0 for `parts <= 1` or an empty product.
fn split_k_workspace_len(p: &Gemm, parts: usize) -> usize {
    if parts <= 1 || p.m == 0 || p.n == 0 || p.batch == 0 {
        return 0;
    }
    p.batch
        .saturating_mul(parts)
        .saturating_mul(p.m)
        .saturating_mul(p.n)
}

/// How many `k` ranges [`select`]'s split-K cuts `p` into (1: no split): a
/// function of the shape alone, never of the device, so that the summation
/// order, and with it every bit of the result, is the same on every device
/// that runs v2. It splits when the product's 128x128 output tiles (over the
/// batch) are fewer than half of the 256 blocks the split aims for, into as
/// many ranges as fill those blocks, each at least 256 deep, at most 64.
/// For the dense layer after a flatten (m = n = 128, k = 8192): 32 ranges of
/// 256.
pub fn split_k_parts(p: &Gemm) -> usize {
    if p.k < 2 * SPLIT_K_MIN_DEPTH || p.m == 0 || p.n == 0 || p.batch == 0 {
        return 1;
    }
    let tiles = p.m.div_ceil(128) * p.n.div_ceil(128) * p.batch;
    if tiles * 2 > SPLIT_TARGET_BLOCKS {
        return 1;
    }
    let want = (SPLIT_TARGET_BLOCKS / tiles)
        .min(p.k / SPLIT_K_MIN_DEPTH)
        .min(SPLIT_K_MAX_PARTS);
    split_k_plan(p.k, want).0
}

/// The `k` ranges of [`GemmKernel::V2SplitK`] forced through [`gemm_with`]:
/// as many as fill the 256 blocks split-K aims for (`SPLIT_TARGET_BLOCKS`), at least 2, at most 64,
/// whatever the depth (1 only when `k` is a single 16-deep stage or less).
pub fn split_k_parts_forced(p: &Gemm) -> usize {
    let tiles = (p.m.div_ceil(128) * p.n.div_ceil(128) * p.batch).max(1);
    let want = (SPLIT_TARGET_BLOCKS / tiles).clamp(2, SPLIT_K_MAX_PARTS);
    split_k_plan(p.k, want).0
}

/// `(parts, stages per part)` for `k` cut into at most `want` ranges of
/// whole 16-deep stages, every range non-empty (the last may be shorter).
fn split_k_plan(k: usize, want: usize) -> (usize, usize) {
    let stages = k.div_ceil(V2_BK);
    if stages == 0 {
        return (1, 0);
    }
    let per = stages.div_ceil(want.max(1));
    (stages.div_ceil(per), per)
}

/// [`select`] for a launch whose batch runs in groups of `group` items (one
/// grid slice per group).
fn select_grouped(p: &Gemm, group: usize, info: &DeviceInfo) -> GemmKernel {
    let slices = p.batch.div_ceil(group.clamp(1, p.batch.max(1)));
    let v2 = GemmKernel::V2.runs_on(info);
    // Large tiles only when there are enough of them to fill the device.
    let big_tiles = p.m.div_ceil(128) * p.n.div_ceil(128) * slices;
    if p.m >= 128 && p.n >= 128 && big_tiles >= info.multiprocessors as usize {
        if v2 {
            return GemmKernel::V2;
        }
        if GemmKernel::Tiled128.runs_on(info) {
            return GemmKernel::Tiled128;
        }
    }
    GemmKernel::Tiled64
}

/// `C = act(alpha * op(A) * op(B) + beta * C + bias)` on the device, with
/// the semantics of [`super::cpu::gemm`] (see the module docs of
/// [`super`]): `beta == 0` does not read `C`; `k == 0` gives
/// `act(beta * C + bias)`; elements of `c` outside the `m x n` matrices (the
/// gaps when `ldc > n`) are untouched.
///
/// Runs the version [`select`] picks (never split-K, so no workspace):
/// `gemm_with(gpu, select(p, gpu.info()), .., None)`. Nothing is allocated.
pub fn gemm(
    gpu: &CudaBackend,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
    epi: DeviceEpilogue,
) -> Result<()> {
    gemm_with(gpu, select(p, gpu.info()), p, a, b, c, epi, None)
}

/// [`gemm`] with a workspace: runs the version [`select_ws`] picks for
/// `workspace.len()` floats, which is v2 split-K for few output tiles and a
/// long `k` when the workspace holds [`select_workspace_len`] floats. Its
/// contents on entry do not matter. Nothing is allocated.
pub fn gemm_ws(
    gpu: &CudaBackend,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
    epi: DeviceEpilogue,
    workspace: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let kernel = select_ws(p, gpu.info(), workspace.len());
    // The selector's split (split_k_parts), not the forced one.
    gemm_checked(
        gpu,
        kernel,
        split_k_parts(p),
        p,
        a,
        b,
        c,
        epi,
        Some(workspace),
    )
}

/// [`gemm`] with the version `kernel`, whatever the shape (an error, before
/// any launch, on a device older than its minimum compute capability).
/// `workspace`: at least [`workspace_len`]`(p, kernel)` floats (`None` where
/// that is 0; an error naming the size otherwise), contents on entry
/// irrelevant. Nothing is allocated.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    gpu: &CudaBackend,
    kernel: GemmKernel,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
    epi: DeviceEpilogue,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    gemm_checked(
        gpu,
        kernel,
        split_k_parts_forced(p),
        p,
        a,
        b,
        c,
        epi,
        workspace,
    )
}

/// [`gemm_with`] with split-K (if `kernel` is it) cut into `parts` ranges.
#[allow(clippy::too_many_arguments)]
fn gemm_checked(
    gpu: &CudaBackend,
    kernel: GemmKernel,
    parts: usize,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
    epi: DeviceEpilogue,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    const OP: &str = "gemm";
    p.check(OP, a.len(), b.len(), c.len(), epi.bias.map(|v| v.len()))?;
    check_runs_on(gpu, kernel)?;
    let need = match kernel {
        GemmKernel::V2SplitK => split_k_workspace_len(p, parts),
        _ => 0,
    };
    if need == 0 {
        // SAFETY: `check` proved that every batch item's A, B and C (with
        // their leading dimensions) lie inside `a`, `b` and `c`, that C's
        // items do not overlap, and the bias has m (or n) elements. (Split-K
        // with nothing to split runs as plain v2 there.)
        return unsafe { launch(gpu, Some(kernel), p, epi, a, b, c, 1) };
    }
    let have = workspace.as_ref().map_or(0, |w| w.len());
    let Some(ws) = workspace.filter(|_| have >= need) else {
        return Err(Error::shape(
            OP,
            "workspace length",
            format!(
                "at least {need} floats for {} (workspace_len)",
                kernel.name()
            ),
            have,
        ));
    };
    let (parts, per) = split_k_plan(p.k, parts);
    // SAFETY: as above, and `ws` holds the batch * parts slabs of m x n.
    unsafe { launch_split_k(gpu, p, epi, a, b, c, parts, per, &mut ws.slice_mut(..need)) }
}

/// An error naming the kernel when the device cannot run it (too old, or
/// not the one compute capability an sm_90a kernel loads on).
fn check_runs_on(gpu: &CudaBackend, kernel: GemmKernel) -> Result<()> {
    crate::cuda::KernelVersion::require(kernel, gpu)
}

/// Launches the version `kernel` (`None`: the one [`select`] picks for this
/// launch) for `p` with batch groups of `group` items (slice `z` sums items
/// `z*group..` into `C + z*stride_c`; 1 is the plain batched GEMM). Skips
/// empty products.
///
/// # Safety
/// Every item's operands (per `p`'s dims, leading dimensions and strides)
/// must lie inside `a`, `b` and `c`; the bias must have `m` (per row) or `n`
/// (per column) elements; no two slices may write the same element of `c`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch(
    gpu: &CudaBackend,
    kernel: Option<GemmKernel>,
    p: &Gemm,
    epi: DeviceEpilogue,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
    group: usize,
) -> Result<()> {
    if p.m == 0 || p.n == 0 || p.batch == 0 {
        return Ok(());
    }
    let group = group.clamp(1, p.batch);
    let slices = p.batch.div_ceil(group);
    let mut kernel = kernel.unwrap_or_else(|| select_grouped(p, group, gpu.info()));
    if kernel == GemmKernel::V2SplitK {
        // This path has no workspace for split-K's slabs (gemm_checked
        // splits before it gets here): plain v2, the same bits as v1.
        kernel = GemmKernel::V2;
    }
    let (name, tile) = (kernel.name(), kernel.tile());
    let f = gpu.function(kernel.module(), name)?;
    // The kernel walks every dimension with a grid-stride loop, so capping
    // the grid at the hardware limits is always correct.
    let cfg = LaunchConfig {
        grid_dim: (
            p.n.div_ceil(tile).min(i32::MAX as usize) as u32,
            p.m.div_ceil(tile).min(65535) as u32,
            slices.min(65535) as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let bias_kind = epi.bias.kernel_kind();
    let null = 0u64;
    let act_kind = epi.activation.kind as u32;
    let act_alpha = epi.activation.alpha;
    let group = group as u64;
    let mut builder = gpu.stream().launch_builder(&f);
    builder
        .arg(p)
        .arg(&act_kind)
        .arg(&act_alpha)
        .arg(&bias_kind)
        .arg(a)
        .arg(b)
        .arg(c);
    match epi.bias.vector() {
        Some(v) => builder.arg(v),
        // Never dereferenced: the kernel reads the bias only for BIAS_PER_*.
        None => builder.arg(&null),
    };
    builder.arg(&group);
    // SAFETY: the caller guarantees the operand spans (see above); the
    // argument list matches the kernel's signature (Gemm, u32, f32, u32,
    // 4 pointers, u64).
    let r = unsafe { builder.launch(cfg) };
    gpu.launched(name, r)
}

/// [`GemmKernel::V2SplitK`]: `parts` ranges of `per` 16-deep stages of `k`
/// (every range non-empty, `parts >= 2`), one partial slab of `m x n` raw
/// sums per (batch item, range), then the reduction that adds each item's
/// slabs in range order and applies alpha, beta, the bias and the
/// activation. The slabs live in `scratch` (`batch * parts * m * n`
/// floats); every element is written by `gemm_v2_splitk` (each (item,
/// range) pair covers all of its m x n slab) before the reduction reads it.
///
/// # Safety
/// As for [`launch`] with group 1.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_split_k(
    gpu: &CudaBackend,
    p: &Gemm,
    epi: DeviceEpilogue,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
    parts: usize,
    per: usize,
    scratch: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "gemm (split-K)";
    let slab = p.m * p.n;
    let pairs = crate::error::checked_product(OP, "batch * parts", &[p.batch, parts])?;
    let len = crate::error::checked_product(OP, "partial slabs", &[pairs, slab])?;
    if scratch.len() < len {
        // The callers size it; a short one is a bug here, not a panic.
        return Err(Error::shape(
            OP,
            "workspace length",
            format!("at least {len} floats"),
            scratch.len(),
        ));
    }
    let kernel = GemmKernel::V2SplitK;
    let f = gpu.function(kernel.module(), kernel.name())?;
    let cfg = LaunchConfig {
        grid_dim: (
            p.n.div_ceil(128).min(i32::MAX as usize) as u32,
            p.m.div_ceil(128).min(65535) as u32,
            pairs.min(65535) as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (parts, per) = (parts as u64, per as u64);
    // SAFETY: reads A and B where the caller guarantees them; writes the
    // batch * parts slabs of `scratch`. Arguments: Gemm, 3 pointers, 2 u64.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(a)
            .arg(b)
            .arg(&mut *scratch)
            .arg(&parts)
            .arg(&per)
            .launch(cfg)
    };
    gpu.launched(kernel.name(), r)?;
    const REDUCE: &str = "gemm_v2_splitk_reduce";
    let f = gpu.function(&GEMM_V2, REDUCE)?;
    let cfg = gpu.elementwise_config(p.batch * slab);
    let bias_kind = epi.bias.kernel_kind();
    let act_kind = epi.activation.kind as u32;
    let act_alpha = epi.activation.alpha;
    let null = 0u64;
    let mut builder = gpu.stream().launch_builder(&f);
    builder
        .arg(p)
        .arg(&act_kind)
        .arg(&act_alpha)
        .arg(&bias_kind)
        .arg(&mut *scratch)
        .arg(&parts)
        .arg(c);
    match epi.bias.vector() {
        Some(v) => builder.arg(v),
        // Never dereferenced: the kernel reads the bias only for BIAS_PER_*.
        None => builder.arg(&null),
    };
    // SAFETY: reads the slabs written above and writes each item's m x n C
    // (row stride ldc, batch stride stride_c), inside `c` per the caller;
    // the bias has m or n elements per the caller. Arguments: Gemm, u32,
    // f32, u32, 2 pointers with a u64 between, a pointer.
    let r = unsafe { builder.launch(cfg) };
    gpu.launched(REDUCE, r)
}

/// How a summed GEMM over `batch` items splits into partial products for an
/// `m x n` output: `(group, parts)`, `parts` slices of `group` items each
/// (the last may be shorter). One part when the output alone has enough
/// tiles, when `k == 0`, or for fewer than two items. Depends on the shape
/// alone, never on the device, so the summation order is fixed.
fn split_plan(m: usize, n: usize, k: usize, batch: usize) -> (usize, usize) {
    let tiles = m.div_ceil(64) * n.div_ceil(64);
    let parts = if tiles * 2 >= SPLIT_TARGET_BLOCKS || k == 0 || batch == 0 {
        1
    } else {
        (SPLIT_TARGET_BLOCKS / tiles).clamp(1, batch)
    };
    let group = batch.max(1).div_ceil(parts);
    (group, batch.max(1).div_ceil(group))
}

/// Floats of the partial products a summed GEMM for `p` needs (0 when it runs
/// as one part): `parts * m * n`, see [`split_plan`].
fn summed_workspace_len(p: &Gemm) -> usize {
    match split_plan(p.m, p.n, p.k, p.batch) {
        (_, 1) => 0,
        (_, parts) => parts * p.m * p.n,
    }
}

/// The most floats [`summed_workspace_len`] asks for an `m x n` output over
/// any batch of at most `max_batch` items (for a caller, like conv's filter
/// gradient, that sums a batch in chunks whose size it learns later): the
/// parts never exceed `min(SPLIT_TARGET_BLOCKS / tiles, batch)`.
pub(crate) fn summed_workspace_bound(m: usize, n: usize, max_batch: usize) -> usize {
    let tiles = (m.div_ceil(64) * n.div_ceil(64)).max(1);
    if tiles * 2 >= SPLIT_TARGET_BLOCKS {
        return 0;
    }
    match (SPLIT_TARGET_BLOCKS / tiles).min(max_batch) {
        0 | 1 => 0,
        parts => parts * m * n,
    }
}

/// Floats of the workspace [`gemm_backward`] needs for `p`: the partial
/// products of a shared operand's gradient (`stride_a == 0` or `stride_b ==
/// 0` over a batch), the larger of dA's and dB's since they run one after
/// the other; 0 when no gradient is split, and then `workspace` may be
/// `None`. Depends on the shape alone.
pub fn backward_workspace_len(p: &Gemm) -> usize {
    [p.grad_a(), p.grad_b()]
        .iter()
        .filter(|g| g.sum_over_batch)
        .map(|g| summed_workspace_len(&g.q))
        .max()
        .unwrap_or(0)
}

/// `C = beta * C + sum over the batch items of alpha * op(A_i) * op(B_i)`,
/// the items taken in order (`p.stride_c` is ignored: every item adds into
/// the one `C`). `beta == 0` does not read `C`. With no items, `C` becomes
/// `beta * C` (0 for `beta == 0`).
///
/// `kernel` as for [`launch`]. `workspace` holds the partial products when
/// the batch is split (at least [`summed_workspace_len`] floats; checked).
///
/// # Safety
/// As for [`launch`], with one `m x n` matrix `C` (row stride `ldc`).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn summed(
    gpu: &CudaBackend,
    op: &'static str,
    kernel: Option<GemmKernel>,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    if p.m == 0 || p.n == 0 {
        return Ok(());
    }
    if p.batch == 0 {
        // The empty sum: a k = 0 product writes beta * C.
        let q = Gemm {
            k: 0,
            batch: 1,
            alpha: 1.0,
            ..*p
        };
        // SAFETY: batch 1, k = 0: only C (inside `c`, the caller's promise) is touched.
        return unsafe { launch(gpu, kernel, &q, DeviceEpilogue::default(), a, b, c, 1) };
    }
    let (group, parts) = split_plan(p.m, p.n, p.k, p.batch);
    if parts == 1 {
        // SAFETY: one slice writes the one C; operands per the caller.
        return unsafe { launch(gpu, kernel, p, DeviceEpilogue::default(), a, b, c, p.batch) };
    }
    // Each group writes its partial product into its own dense m x n slab.
    let slab = p.m * p.n;
    let need = parts * slab;
    let scratch = match workspace {
        Some(ws) if ws.len() >= need => ws,
        other => {
            return Err(Error::shape(
                op,
                "workspace length",
                format!(
                    "at least {need} floats ({parts} partial products of {} x {})",
                    p.m, p.n
                ),
                other.map_or(0, |w| w.len()),
            ));
        }
    };
    let mut scratch = scratch.slice_mut(..need);
    let q = Gemm {
        ldc: p.n,
        stride_c: slab,
        beta: 0.0,
        ..*p
    };
    // SAFETY: slice z writes slab z of `scratch` (parts slabs of m x n);
    // operands per the caller. Every element of the slabs is written (beta
    // = 0, each slice covers all of its m x n) before gemm_sum_partials
    // reads it.
    unsafe {
        launch(
            gpu,
            kernel,
            &q,
            DeviceEpilogue::default(),
            a,
            b,
            &mut scratch,
            group,
        )?
    };
    let f = gpu.function(&GEMM, "gemm_sum_partials")?;
    let cfg = gpu.elementwise_config(slab);
    let (rows, cols, ldc, parts) = (p.m as u64, p.n as u64, p.ldc as u64, parts as u64);
    // SAFETY: reads parts * m * n elements of `scratch` and writes the m x n
    // matrix C (row stride ldc) that the caller guarantees is inside `c`.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(c)
            .arg(&rows)
            .arg(&cols)
            .arg(&ldc)
            .arg(&mut scratch)
            .arg(&parts)
            .arg(&p.beta)
            .launch(cfg)
    };
    gpu.launched("gemm_sum_partials", r)
}

/// Gradients of the linear part `C = alpha * op(A) * op(B)` on the device,
/// mirroring `cpu::gemm_backward`: `dA = alpha * dC * op(B)^T` and
/// `dB = alpha * op(A)^T * dC`, each in the stored layout of its operand
/// (`lda` / `ldb`, batch strides of `A` / `B`). `da` and `db` must have the
/// lengths of `a` and `b`; they are overwritten where `A` / `B` hold
/// elements and untouched in the gaps. With `stride_a == 0` (an `A` shared
/// by the batch) `dA` is the sum over the batch items (zero for an empty
/// batch), summed in a fixed order (see the module docs); likewise `dB`.
/// The epilogue's bias and activation are not part of this: apply their
/// backward to `dC` first. Each of its products runs the version [`select`]
/// picks for it.
///
/// `workspace`: at least [`backward_workspace_len`] floats, the partial
/// products of a shared operand's gradient (`None` where that is 0); its
/// contents on entry do not matter. Nothing is allocated; nothing waits for
/// the device. [`gemm_backward_alloc`] allocates the workspace itself.
#[allow(clippy::too_many_arguments)]
pub fn gemm_backward(
    gpu: &CudaBackend,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    dc: &CudaView<'_, f32>,
    da: Option<&mut CudaViewMut<'_, f32>>,
    db: Option<&mut CudaViewMut<'_, f32>>,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    backward(gpu, None, p, a, b, dc, da, db, workspace)
}

/// [`gemm_backward`] with every product on the version `kernel`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_backward_with(
    gpu: &CudaBackend,
    kernel: GemmKernel,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    dc: &CudaView<'_, f32>,
    da: Option<&mut CudaViewMut<'_, f32>>,
    db: Option<&mut CudaViewMut<'_, f32>>,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    backward(gpu, Some(kernel), p, a, b, dc, da, db, workspace)
}

/// [`gemm_backward`] with a workspace it allocates (and frees) itself: the
/// convenience form, which allocates on every call that splits a sum.
#[allow(clippy::too_many_arguments)]
pub fn gemm_backward_alloc(
    gpu: &CudaBackend,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    dc: &CudaView<'_, f32>,
    da: Option<&mut CudaViewMut<'_, f32>>,
    db: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    let need = backward_workspace_len(p);
    if need == 0 {
        return gemm_backward(gpu, p, a, b, dc, da, db, None);
    }
    // SAFETY: `summed` writes every float of the partial slabs before
    // reading any (see there).
    let mut ws = unsafe { gpu.stream().alloc::<f32>(need) }
        .map_err(|e| gpu.error("cuMemAlloc (gemm_backward workspace)", e))?;
    gemm_backward(gpu, p, a, b, dc, da, db, Some(&mut ws.as_view_mut()))
}

#[allow(clippy::too_many_arguments)]
fn backward(
    gpu: &CudaBackend,
    kernel: Option<GemmKernel>,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    dc: &CudaView<'_, f32>,
    da: Option<&mut CudaViewMut<'_, f32>>,
    db: Option<&mut CudaViewMut<'_, f32>>,
    mut workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    const OP: &str = "gemm_backward";
    p.check_backward(
        OP,
        a.len(),
        b.len(),
        dc.len(),
        da.as_ref().map(|d| d.len()),
        db.as_ref().map(|d| d.len()),
    )?;
    let need = backward_workspace_len(p);
    let have = workspace.as_ref().map_or(0, |w| w.len());
    if have < need {
        return Err(Error::shape(
            OP,
            "workspace length",
            format!("at least backward_workspace_len = {need} floats"),
            have,
        ));
    }
    if let Some(k) = kernel {
        check_runs_on(gpu, k)?;
    }
    let pick = |o: Operand| match o {
        Operand::A => a,
        Operand::B => b,
        Operand::Dc => dc,
    };
    if let Some(da) = da {
        let g = p.grad_a();
        // SAFETY: the plan reads dC and B exactly where p's check placed
        // them, and writes dA in A's layout, which the check placed inside
        // a.len() == da.len(); distinct batch items of dA do not overlap
        // (checked).
        unsafe {
            run_grad(
                gpu,
                kernel,
                &g,
                pick(g.x),
                pick(g.y),
                da,
                workspace.as_deref_mut(),
            )?
        };
    }
    if let Some(db) = db {
        let g = p.grad_b();
        // SAFETY: as for dA, with the roles of A and B exchanged.
        unsafe { run_grad(gpu, kernel, &g, pick(g.x), pick(g.y), db, workspace)? };
    }
    Ok(())
}

/// Runs one gradient plan into `out`; a shared operand's plan sums over the
/// batch (see `summed` for the fixed order) with `workspace`'s partials.
///
/// # Safety
/// The plan's product must address `x`, `y` and `out` in bounds.
unsafe fn run_grad(
    gpu: &CudaBackend,
    kernel: Option<GemmKernel>,
    g: &GradGemm,
    x: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f32>,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    let q = g.q;
    if !g.sum_over_batch {
        // SAFETY: per the caller; the output items are disjoint.
        return unsafe { launch(gpu, kernel, &q, DeviceEpilogue::default(), x, y, out, 1) };
    }
    if q.batch == 0 {
        // No items: a shared operand's gradient is the empty sum, written
        // only where the buffer holds a whole matrix (as the CPU does; with
        // no items the length checks asked for none).
        let fits = q.m == 0
            || q.n == 0
            || (q.m - 1)
                .checked_mul(q.ldc)
                .and_then(|v| v.checked_add(q.n))
                .is_some_and(|need| out.len() >= need);
        if !fits {
            return Ok(());
        }
    }
    // SAFETY: per the caller (and the fit check for an empty batch).
    unsafe { summed(gpu, "gemm_backward", kernel, &q, x, y, out, workspace) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(sms: u32, cc: (i32, i32)) -> DeviceInfo {
        DeviceInfo {
            ordinal: 0,
            name: "test".into(),
            compute_capability: cc,
            driver_version: 12020,
            total_memory: 1 << 30,
            multiprocessors: sms,
        }
    }

    /// The rule `launch` had before the versions became data.
    fn old_rule(p: &Gemm, slices: usize, sms: u32) -> &'static str {
        let big_tiles = p.m.div_ceil(128) * p.n.div_ceil(128) * slices;
        if p.m >= 128 && p.n >= 128 && big_tiles >= sms as usize {
            "gemm_128x128"
        } else {
            "gemm_64x64"
        }
    }

    #[test]
    fn select_is_the_old_rule_before_sm80_and_v2_after() {
        for sms in [1, 4, 108, 132] {
            for (m, n) in [(1, 1), (127, 4000), (128, 128), (129, 300), (1000, 2000)] {
                for batch in [1, 3, 40] {
                    let p = Gemm::new(m, n, 7).batched(batch);
                    for group in [1, 2, 40] {
                        let slices = batch.div_ceil(group.min(batch));
                        let old = old_rule(&p, slices, sms);
                        // Before sm_80: v1 exactly as before.
                        let got = select_grouped(&p, group, &device(sms, (7, 5)));
                        assert_eq!(got.name(), old, "{p:?} group {group} on {sms} SMs");
                        // sm_80+: v2 where v1 took its 128x128 tiles (k = 7
                        // is never split).
                        let got = select_grouped(&p, group, &device(sms, (9, 0)));
                        let want = if old == "gemm_128x128" {
                            GemmKernel::V2
                        } else {
                            GemmKernel::Tiled64
                        };
                        assert_eq!(got, want, "{p:?} group {group} on {sms} SMs, sm_90");
                    }
                }
            }
        }
    }

    /// The split the partial-sum path had before its workspace came from the
    /// caller, and the bound conv reserves for any chunk of a batch.
    #[test]
    fn split_plan_is_the_old_rule_and_bounded() {
        for (m, n) in [
            (1usize, 1usize),
            (20, 30),
            (64, 64),
            (100, 300),
            (128, 1152),
            (700, 900),
        ] {
            for k in [0usize, 1, 9] {
                for batch in [1usize, 2, 3, 7, 31, 100, 1000] {
                    let tiles = m.div_ceil(64) * n.div_ceil(64);
                    let old = if tiles * 2 >= SPLIT_TARGET_BLOCKS || k == 0 {
                        1
                    } else {
                        (SPLIT_TARGET_BLOCKS / tiles).clamp(1, batch)
                    };
                    let old_group = batch.div_ceil(old);
                    let plan = split_plan(m, n, k, batch);
                    assert_eq!(
                        plan,
                        (old_group, batch.div_ceil(old_group)),
                        "{m}x{n}x{k} b{batch}"
                    );
                    let p = Gemm::new(m, n, k).batched(batch);
                    let need = summed_workspace_len(&p);
                    assert_eq!(need == 0, plan.1 == 1);
                    for max_batch in [batch, batch + 1, 2 * batch + 5] {
                        assert!(need <= summed_workspace_bound(m, n, max_batch), "{p:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn backward_workspace_only_for_shared_operands() {
        let mut p = Gemm::new(20, 30, 40).batched(100);
        assert_eq!(backward_workspace_len(&p), 0, "no operand shared");
        p.stride_a = 0;
        assert!(
            backward_workspace_len(&p) >= 20 * 40 * 2,
            "dA is 20 x 40, split"
        );
        p.batch = 1;
        assert_eq!(backward_workspace_len(&p), 0, "one item: no split");
    }

    #[test]
    fn split_k_only_for_few_tiles_and_long_k() {
        let h100 = device(132, (9, 0));
        // The dense layer after a flatten: one 128x128 tile, k = 8192.
        let dense = Gemm::new(128, 128, 8192);
        assert_eq!(split_k_parts(&dense), 32);
        let need = select_workspace_len(&dense);
        assert_eq!(need, 32 * 128 * 128);
        assert_eq!(select_ws(&dense, &h100, need), GemmKernel::V2SplitK);
        // Without the whole workspace (or any): never split-K.
        assert_eq!(select(&dense, &h100), GemmKernel::Tiled64);
        assert_eq!(select_ws(&dense, &h100, need - 1), GemmKernel::Tiled64);
        // Not before sm_80, not for a short k, not for many tiles.
        assert_eq!(
            select_ws(&dense, &device(132, (7, 0)), need),
            GemmKernel::Tiled64
        );
        assert_eq!(split_k_parts(&Gemm::new(128, 128, 511)), 1);
        assert_eq!(select_workspace_len(&Gemm::new(128, 128, 511)), 0);
        assert_eq!(split_k_parts(&Gemm::new(4096, 4096, 4096)), 1);
        let big = Gemm::new(4096, 4096, 4096);
        assert_eq!(select_ws(&big, &h100, usize::MAX), GemmKernel::V2);
        // A summed group is split by its groups, never by k.
        assert_ne!(select_grouped(&dense, 2, &h100), GemmKernel::V2SplitK);
        // Depends on the shape alone: the same on every device that runs v2.
        let a100 = device(108, (8, 0));
        for k in [512, 1000, 8192, 100_000] {
            let p = Gemm::new(100, 60, k);
            let ws = select_workspace_len(&p);
            assert_eq!(select_ws(&p, &a100, ws), select_ws(&p, &h100, ws), "k {k}");
        }
        // select never picks a version that needs a workspace.
        for (m, n, k, batch) in [(128, 128, 8192, 1), (1, 1, 100_000, 3), (64, 4096, 4096, 2)] {
            let p = Gemm::new(m, n, k).batched(batch);
            for info in [&h100, &a100] {
                assert_eq!(workspace_len(&p, select(&p, info)), 0, "{p:?}");
            }
        }
    }

    #[test]
    fn split_k_plans_cover_k_with_non_empty_ranges() {
        for k in [0, 1, 16, 17, 31, 32, 33, 255, 1000, 8192, 8193] {
            for want in [1, 2, 3, 7, 64] {
                let (parts, per) = split_k_plan(k, want);
                let stages = k.div_ceil(V2_BK);
                assert!(
                    parts >= 1 && parts <= want.max(1),
                    "k {k} want {want}: {parts}"
                );
                if stages > 0 {
                    // Every range has a stage; together they cover all of them.
                    assert!(
                        (parts - 1) * per < stages && parts * per >= stages,
                        "k {k} want {want}"
                    );
                }
            }
        }
        // Forced: at least two ranges whenever k has two stages.
        assert_eq!(split_k_parts_forced(&Gemm::new(300, 300, 16)), 1);
        assert!(split_k_parts_forced(&Gemm::new(300, 300, 17)) == 2);
        assert!(split_k_parts_forced(&Gemm::new(4096, 4096, 4096)) >= 2);
        // Its workspace: one m x n slab per (item, range); none unsplit.
        let p = Gemm::new(300, 200, 17).batched(3);
        assert_eq!(workspace_len(&p, GemmKernel::V2SplitK), 3 * 2 * 300 * 200);
        assert_eq!(
            workspace_len(&Gemm::new(300, 300, 16), GemmKernel::V2SplitK),
            0
        );
        for k in [GemmKernel::Tiled64, GemmKernel::Tiled128, GemmKernel::V2] {
            assert_eq!(workspace_len(&p, k), 0, "{k:?}");
        }
    }

    #[test]
    fn versions_know_name_tile_and_capability() {
        assert_eq!(GemmKernel::ALL.len(), 6);
        for k in GemmKernel::ALL {
            assert!(
                k.module().ptx.contains(&format!(".entry {}(", k.name())),
                "{k:?}"
            );
            assert!(k.name().starts_with("gemm_"));
            assert_eq!(
                k.min_compute_capability(),
                k.module().min_compute_capability
            );
            assert!(k.runs_on(&device(4, k.min_compute_capability())));
            assert!(!k.runs_on(&device(4, (6, 1))));
            // A TF32 version says so in its name, so every result names it.
            assert_eq!(
                k.name().contains("tf32"),
                k.precision() == Precision::Tf32,
                "{k:?}"
            );
        }
        assert_eq!(GemmKernel::Tf32MmaSync.min_compute_capability(), (8, 0));
        assert!(!GemmKernel::Tf32MmaSync.runs_on(&device(4, (7, 5))));
        // wgmma: sm_90a PTX, compute capability 9.0 exactly.
        assert_eq!(GemmKernel::Tf32Wgmma.min_compute_capability(), (9, 0));
        assert!(GemmKernel::Tf32Wgmma.runs_on(&device(4, (9, 0))));
        for cc in [(8, 0), (8, 9), (10, 0), (10, 3), (12, 0)] {
            assert!(!GemmKernel::Tf32Wgmma.runs_on(&device(4, cc)), "{cc:?}");
            assert!(GemmKernel::Tf32MmaSync.runs_on(&device(4, cc)), "{cc:?}");
        }
        for k in [GemmKernel::Tiled64, GemmKernel::Tiled128, GemmKernel::V2] {
            assert!(k.name().ends_with(&format!("{0}x{0}", k.tile())), "{k:?}");
        }
        // v2 needs cp.async (sm_80); v1 runs from sm_70.
        assert_eq!(GemmKernel::V2.min_compute_capability(), (8, 0));
        assert_eq!(GemmKernel::V2SplitK.min_compute_capability(), (8, 0));
        assert_eq!(GemmKernel::Tiled128.min_compute_capability(), (7, 0));
        assert!(!GemmKernel::V2.runs_on(&device(4, (7, 5))));
        assert!(GEMM_V2.ptx.contains(".entry gemm_v2_splitk_reduce("));
        // Too old for the big tiles: select never picks them.
        let old = device(1, (6, 1));
        assert_eq!(select(&Gemm::new(4096, 4096, 8), &old), GemmKernel::Tiled64);
    }

    /// TF32 is opt-in: `select` never returns it, whatever the shape and
    /// device; `select_with` returns it only for `Precision::Tf32` on sm_80+
    /// (wgmma on 9.0, mma.sync elsewhere), and otherwise falls back to the
    /// f32 choice.
    #[test]
    fn tf32_only_when_asked_for() {
        for cc in [(6, 1), (7, 0), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0)] {
            for sms in [1, 132] {
                let info = device(sms, cc);
                for (m, n, k) in [(1, 1, 1), (128, 128, 8), (4096, 4096, 4096), (300, 7, 5000)] {
                    let p = Gemm::new(m, n, k);
                    let f32_choice = select(&p, &info);
                    assert_eq!(f32_choice.precision(), Precision::F32, "{p:?} {cc:?}");
                    assert_eq!(select_with(&p, &info, Precision::F32), f32_choice);
                    assert_eq!(select_with(&p, &info, Precision::default()), f32_choice);
                    let tf32 = select_with(&p, &info, Precision::Tf32);
                    if cc == (9, 0) {
                        assert_eq!(tf32, GemmKernel::Tf32Wgmma);
                    } else if cc >= (8, 0) {
                        assert_eq!(tf32, GemmKernel::Tf32MmaSync);
                    } else {
                        assert_eq!(tf32, f32_choice);
                    }
                }
            }
        }
    }
}
