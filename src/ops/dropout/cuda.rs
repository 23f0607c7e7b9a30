//! CUDA dropout (`kernels/dropout.cu`, Philox in `kernels/philox.cuh`):
//! launch wrappers mirroring [`super::cpu`], with the same checks before any
//! launch. The masks are the CPU's bit for bit (the same Philox4x32-10
//! counters and keep rule), and so are the values: `scale` is computed once
//! on the host ([`Dropout::scale`]) and each value is one f32 product.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::Dropout;
use crate::cuda::{CudaBackend, DeviceInfo, KernelVersion, StepClock};
use crate::error::Result;

crate::kernel_versions! {
    /// The versions of this family's kernels, as data (see
    /// [`KernelVersion`]): today one.
    pub enum DropoutKernel {
        /// One Philox-4x32-10 draw per element, keyed by (seed, element) (`kernels/dropout.cu`).
        Philox => "dropout_philox", crate::cuda::DROPOUT,
    }
}

/// The version the plain entry points run for `p` on `info`'s
/// device; the `*_with` forms run the one a caller names. Today there is
/// one version, so it is always [`DropoutKernel::Philox`].
pub fn select(_p: &Dropout, _info: &DeviceInfo) -> DropoutKernel {
    DropoutKernel::Philox
}

// SAFETY: `#[repr(C)]` usize, f32, u64, u64: plain old data of 32 bytes
// (4 bytes of padding after `rate`), mirrored as `struct Dropout` in dropout.cu.
unsafe impl cudarc::driver::DeviceRepr for Dropout {}
const _: () = assert!(std::mem::size_of::<Dropout>() == 32);

/// One thread per 4-element Philox block.
fn blocks_config(gpu: &CudaBackend, len: usize) -> LaunchConfig {
    gpu.elementwise_config(len.div_ceil(4))
}

/// Writes the mask alone (1 kept, 0 dropped), fully overwriting `mask`.
pub fn mask_only(gpu: &CudaBackend, p: &Dropout, mask: &mut CudaViewMut<'_, u8>) -> Result<()> {
    mask_only_with(gpu, select(p, gpu.info()), p, mask)
}

/// [`mask_only`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn mask_only_with(
    gpu: &CudaBackend,
    kernel: DropoutKernel,
    p: &Dropout,
    mask: &mut CudaViewMut<'_, u8>,
) -> Result<()> {
    kernel.require(gpu)?;
    p.check("dropout.mask_only", &[("mask", mask.len())])?;
    if p.len == 0 {
        return Ok(());
    }
    let f = gpu.function(kernel.module(), "dropout_mask_only")?;
    // SAFETY: mask holds p.len bytes (checked); the kernel writes below p.len.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(mask)
            .launch(blocks_config(gpu, p.len))
    };
    gpu.launched("dropout_mask_only", r)
}

/// `y = x * scale` where kept, `x * 0.0` where dropped; writes `y` and
/// `mask` (both fully overwritten).
pub fn forward(
    gpu: &CudaBackend,
    p: &Dropout,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    mask: &mut CudaViewMut<'_, u8>,
) -> Result<()> {
    forward_with(gpu, select(p, gpu.info()), p, x, y, mask)
}

/// [`forward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn forward_with(
    gpu: &CudaBackend,
    kernel: DropoutKernel,
    p: &Dropout,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    mask: &mut CudaViewMut<'_, u8>,
) -> Result<()> {
    kernel.require(gpu)?;
    p.check(
        "dropout.forward",
        &[("x", x.len()), ("y", y.len()), ("mask", mask.len())],
    )?;
    if p.len == 0 {
        return Ok(());
    }
    let scale = p.scale();
    let f = gpu.function(kernel.module(), "dropout_forward")?;
    // SAFETY: x, y and mask hold p.len elements (checked); the kernel
    // touches indices below p.len only.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(&scale)
            .arg(x)
            .arg(y)
            .arg(mask)
            .launch(blocks_config(gpu, p.len))
    };
    gpu.launched("dropout_forward", r)
}

/// [`forward`] with the training step read from the device: the Philox
/// offset is `p.offset | clock.step << 16` (the training loop's
/// `dropout_offset(step, layer)` with `p.offset` holding the layer), so a
/// step captured in a CUDA graph draws the mask of the step its replay
/// runs, as [`forward`] with that offset would (the same bits). `p.offset`
/// must leave the upper 48 bits free for the step.
pub fn forward_clocked(
    gpu: &CudaBackend,
    p: &Dropout,
    clock: &StepClock,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    mask: &mut CudaViewMut<'_, u8>,
) -> Result<()> {
    let kernel = select(p, gpu.info());
    kernel.require(gpu)?;
    p.check(
        "dropout.forward_clocked",
        &[("x", x.len()), ("y", y.len()), ("mask", mask.len())],
    )?;
    if p.offset >> 16 != 0 {
        return Err(crate::error::Error::invalid(
            "dropout.forward_clocked",
            "offset",
            format!(
                "{:#x} uses the bits above 16 that the device step fills (expected the layer \
                 index alone, below 65536)",
                p.offset
            ),
        ));
    }
    if p.len == 0 {
        return Ok(());
    }
    let scale = p.scale();
    let f = gpu.function(kernel.module(), "dropout_forward_clocked")?;
    // SAFETY: x, y and mask hold p.len elements (checked); the clock holds
    // its two counters; the kernel touches indices below p.len only.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(&scale)
            .arg(clock.counters())
            .arg(x)
            .arg(y)
            .arg(mask)
            .launch(blocks_config(gpu, p.len))
    };
    gpu.launched("dropout_forward_clocked", r)
}

/// `dx = dy * scale` where `mask` is nonzero, `dy * 0.0` elsewhere; `dx`
/// fully overwritten.
pub fn backward(
    gpu: &CudaBackend,
    p: &Dropout,
    dy: &CudaView<'_, f32>,
    mask: &CudaView<'_, u8>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    backward_with(gpu, select(p, gpu.info()), p, dy, mask, dx)
}

/// [`backward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn backward_with(
    gpu: &CudaBackend,
    kernel: DropoutKernel,
    p: &Dropout,
    dy: &CudaView<'_, f32>,
    mask: &CudaView<'_, u8>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    p.check(
        "dropout.backward",
        &[("dy", dy.len()), ("mask", mask.len()), ("dx", dx.len())],
    )?;
    if p.len == 0 {
        return Ok(());
    }
    let scale = p.scale();
    let f = gpu.function(kernel.module(), "dropout_backward")?;
    // SAFETY: dy, mask and dx hold p.len elements (checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(&scale)
            .arg(dy)
            .arg(mask)
            .arg(dx)
            .launch(gpu.elementwise_config(p.len))
    };
    gpu.launched("dropout_backward", r)
}
