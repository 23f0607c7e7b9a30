//! CUDA GEMM: launch wrappers for `kernels/gemm.cu`, mirroring `cpu.rs`.
//!
//! One tiled kernel in two tile shapes (128x128 for large products, 64x64
//! for small ones); both sum every element over `k` in increasing order, so
//! the choice never changes a result. The batch runs through the grid's z
//! dimension in one launch. The epilogue (alpha, beta, bias, activation) is
//! fused into the write-back.
//!
//! Sums over a batch (the gradient of an operand shared by the batch, and
//! conv's filter gradient) run inside the kernel: a block walks the items of
//! its group one after another, accumulating in registers. When that would
//! leave the device mostly idle (few output tiles), the batch is split into
//! a number of groups that depends only on the shape, each writing a partial
//! product, and a second kernel adds the partials in group order: no
//! atomics, so results are bit-identical run to run.

use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{Bias, Epilogue, Gemm, GradGemm, Operand};
use crate::cuda::{CudaBackend, GEMM};
use crate::error::Result;

// SAFETY: `Gemm` is `#[repr(C)]` with only u64 (usize), f32 and bool fields:
// plain old data, mirrored field for field as `struct Gemm` in
// kernels/gemm.cu (which asserts the same size).
unsafe impl DeviceRepr for Gemm {}
const _: () = assert!(std::mem::size_of::<Gemm>() == 96);

/// Blocks a summed GEMM aims for when it splits its batch into partial
/// products: about two waves on a 132-SM H100. A constant, not the device's
/// SM count, so the summation order depends on the shape alone.
const SPLIT_TARGET_BLOCKS: usize = 256;

/// A bias vector in device memory: [`Bias`] over a cudarc view.
pub type DeviceBias<'a> = Bias<&'a CudaView<'a, f32>>;

/// The device epilogue: [`super::Epilogue`] with a [`DeviceBias`].
pub type DeviceEpilogue<'a> = Epilogue<&'a CudaView<'a, f32>>;

/// `C = act(alpha * op(A) * op(B) + beta * C + bias)` on the device, with
/// the semantics of [`super::cpu::gemm`] (see the module docs of
/// [`super`]): `beta == 0` does not read `C`; `k == 0` gives
/// `act(beta * C + bias)`; elements of `c` outside the `m x n` matrices (the
/// gaps when `ldc > n`) are untouched.
pub fn gemm(
    gpu: &CudaBackend,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
    epi: DeviceEpilogue,
) -> Result<()> {
    const OP: &str = "gemm";
    p.check(OP, a.len(), b.len(), c.len(), epi.bias.map(|v| v.len()))?;
    // SAFETY: `check` proved that every batch item's A, B and C (with their
    // leading dimensions) lie inside `a`, `b` and `c`, that C's items do not
    // overlap, and the bias has m (or n) elements.
    unsafe { launch(gpu, p, epi, a, b, c, 1) }
}

/// Launches the tiled kernel for `p` with batch groups of `group` items
/// (slice `z` sums items `z*group..` into `C + z*stride_c`; 1 is the plain
/// batched GEMM). Skips empty products.
///
/// # Safety
/// Every item's operands (per `p`'s dims, leading dimensions and strides)
/// must lie inside `a`, `b` and `c`; the bias must have `m` (per row) or `n`
/// (per column) elements; no two slices may write the same element of `c`.
pub(crate) unsafe fn launch(
    gpu: &CudaBackend,
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
    // Large tiles only when there are enough of them to fill the device.
    let big_tiles = p.m.div_ceil(128) * p.n.div_ceil(128) * slices;
    let (name, tile) =
        if p.m >= 128 && p.n >= 128 && big_tiles >= gpu.info().multiprocessors as usize {
            ("gemm_128x128", 128)
        } else {
            ("gemm_64x64", 64)
        };
    let f = gpu.function(&GEMM, name)?;
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

/// `C = beta * C + sum over the batch items of alpha * op(A_i) * op(B_i)`,
/// the items taken in order (`p.stride_c` is ignored: every item adds into
/// the one `C`). `beta == 0` does not read `C`. With no items, `C` becomes
/// `beta * C` (0 for `beta == 0`).
///
/// # Safety
/// As for [`launch`], with one `m x n` matrix `C` (row stride `ldc`).
pub(crate) unsafe fn summed(
    gpu: &CudaBackend,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
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
        return unsafe { launch(gpu, &q, DeviceEpilogue::default(), a, b, c, 1) };
    }
    let tiles = p.m.div_ceil(64) * p.n.div_ceil(64);
    let parts = if tiles * 2 >= SPLIT_TARGET_BLOCKS || p.k == 0 {
        1
    } else {
        (SPLIT_TARGET_BLOCKS / tiles).clamp(1, p.batch)
    };
    let group = p.batch.div_ceil(parts);
    let parts = p.batch.div_ceil(group);
    if parts == 1 {
        // SAFETY: one slice writes the one C; operands per the caller.
        return unsafe { launch(gpu, p, DeviceEpilogue::default(), a, b, c, p.batch) };
    }
    // Each group writes its partial product into its own dense m x n slab.
    let slab = p.m * p.n;
    // SAFETY: every element of the scratch is written by the partial
    // products below (beta = 0, each slice covers all of its m x n) before
    // gemm_sum_partials reads it.
    let mut scratch = unsafe { gpu.stream().alloc::<f32>(parts * slab) }
        .map_err(|e| gpu.error("cuMemAlloc (gemm partial sums)", e))?;
    let q = Gemm {
        ldc: p.n,
        stride_c: slab,
        beta: 0.0,
        ..*p
    };
    // SAFETY: slice z writes slab z of `scratch` (parts slabs of m x n);
    // operands per the caller.
    unsafe {
        launch(
            gpu,
            &q,
            DeviceEpilogue::default(),
            a,
            b,
            &mut scratch.as_view_mut(),
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
            .arg(&scratch)
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
/// backward to `dC` first.
pub fn gemm_backward(
    gpu: &CudaBackend,
    p: &Gemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    dc: &CudaView<'_, f32>,
    da: Option<&mut CudaViewMut<'_, f32>>,
    db: Option<&mut CudaViewMut<'_, f32>>,
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
        unsafe { run_grad(gpu, &g, pick(g.x), pick(g.y), da)? };
    }
    if let Some(db) = db {
        let g = p.grad_b();
        // SAFETY: as for dA, with the roles of A and B exchanged.
        unsafe { run_grad(gpu, &g, pick(g.x), pick(g.y), db)? };
    }
    Ok(())
}

/// Runs one gradient plan into `out`; a shared operand's plan sums over the
/// batch (see `summed` for the fixed order).
///
/// # Safety
/// The plan's product must address `x`, `y` and `out` in bounds.
unsafe fn run_grad(
    gpu: &CudaBackend,
    g: &GradGemm,
    x: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let q = g.q;
    if !g.sum_over_batch {
        // SAFETY: per the caller; the output items are disjoint.
        return unsafe { launch(gpu, &q, DeviceEpilogue::default(), x, y, out, 1) };
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
    unsafe { summed(gpu, &q, x, y, out) }
}
