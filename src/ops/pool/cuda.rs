//! CUDA max pooling (`kernels/pool.cu`): launch wrappers mirroring
//! [`super::cpu`], with the same checks before any launch.
//!
//! The forward scans each window exactly as the CPU does, so `y` and
//! `argmax` are the CPU's bits. The backward gathers, one thread per input
//! element, over the windows that contain it, adding in row-major output
//! order from 0: overlapping windows need no atomics and `dx` is the CPU's
//! bits too.
//!
//! Unlike the CPU backward, the GPU backward does not scan `argmax` for
//! out-of-plane indices first (that would cost a download): an entry that
//! does not point into its own window, which the forward never writes,
//! routes its gradient nowhere instead of failing. No entry can make the
//! kernel read or write out of bounds.

use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

use super::MaxPool2d;
use crate::cuda::{CudaBackend, DeviceInfo, KernelVersion, align};
use crate::error::Result;

crate::kernel_versions! {
    /// The versions of this family's kernels, as data (see
    /// [`KernelVersion`]).
    pub enum PoolKernel {
        /// One thread per output (forward) or input element (backward, a gather) (`kernels/pool.cu`).
        Direct => "maxpool_direct", crate::cuda::POOL,
        /// `Direct`'s forward; the backward one thread per four input
        /// elements, each the same gather, written as one 16-byte store
        /// (`maxpool2d_backward_vec4`; dx is the larger half of the
        /// backward's bytes at 2x2/2): the same bits. `dx` must start on a
        /// 16-byte boundary.
        Vec4 => "maxpool_vec4", crate::cuda::POOL,
    }
}

/// The version the plain entry points run for `p` on `info`'s device,
/// for a `dx` that starts on a 16-byte boundary (`aligned`) or not; the
/// `*_with` forms run the one a caller names. Aligned gets
/// [`PoolKernel::Vec4`] (its forward is `Direct`'s), the rest
/// [`PoolKernel::Direct`].
pub fn select(_p: &MaxPool2d, aligned: bool, _info: &DeviceInfo) -> PoolKernel {
    if aligned {
        PoolKernel::Vec4
    } else {
        PoolKernel::Direct
    }
}

// SAFETY: `#[repr(C)]`, fourteen usizes: plain old data of 112 bytes,
// mirrored as `struct MaxPool2d` in pool.cu.
unsafe impl cudarc::driver::DeviceRepr for MaxPool2d {}
const _: () = assert!(std::mem::size_of::<MaxPool2d>() == 112);

/// `y = maxpool(x)` and the argmax of every window (index within the
/// image plane); `y` and `argmax` fully overwritten.
pub fn forward(
    gpu: &CudaBackend,
    p: &MaxPool2d,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    argmax: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    // The forward is the same kernel in every version.
    forward_with(gpu, PoolKernel::Direct, p, x, y, argmax)
}

/// [`forward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn forward_with(
    gpu: &CudaBackend,
    kernel: PoolKernel,
    p: &MaxPool2d,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    argmax: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    kernel.require(gpu)?;
    p.check_forward(x.len(), y.len(), argmax.len())?;
    let ylen = p.y_len();
    if ylen == 0 {
        return Ok(());
    }
    let f = gpu.function(kernel.module(), "maxpool2d_forward")?;
    let ylen64 = ylen as u64;
    // SAFETY: validate() guarantees every window holds a real cell inside
    // its h x w plane; x holds n*c*h*w and y, argmax n*c*oh*ow (checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(x)
            .arg(y)
            .arg(argmax)
            .arg(&ylen64)
            .launch(gpu.elementwise_config(ylen))
    };
    gpu.launched("maxpool2d_forward", r)
}

/// `y = maxpool(x)` without the argmax (inference); `y` fully overwritten.
pub fn forward_inference(
    gpu: &CudaBackend,
    p: &MaxPool2d,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    forward_inference_with(gpu, PoolKernel::Direct, p, x, y)
}

/// [`forward_inference`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn forward_inference_with(
    gpu: &CudaBackend,
    kernel: PoolKernel,
    p: &MaxPool2d,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    p.check_forward_inference(x.len(), y.len())?;
    let ylen = p.y_len();
    if ylen == 0 {
        return Ok(());
    }
    let f = gpu.function(kernel.module(), "maxpool2d_forward_inference")?;
    let ylen64 = ylen as u64;
    // SAFETY: as in `forward`.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(x)
            .arg(y)
            .arg(&ylen64)
            .launch(gpu.elementwise_config(ylen))
    };
    gpu.launched("maxpool2d_forward_inference", r)
}

/// `dx[argmax] += dy` (see the module docs); `dx` fully overwritten.
pub fn backward(
    gpu: &CudaBackend,
    p: &MaxPool2d,
    dy: &CudaView<'_, f32>,
    argmax: &CudaView<'_, u32>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let aligned = align::offset16(gpu, &*dx) == 0;
    backward_with(gpu, select(p, aligned, gpu.info()), p, dy, argmax, dx)
}

/// [`backward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn backward_with(
    gpu: &CudaBackend,
    kernel: PoolKernel,
    p: &MaxPool2d,
    dy: &CudaView<'_, f32>,
    argmax: &CudaView<'_, u32>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "maxpool2d.backward";
    p.check_backward(dy.len(), argmax.len(), dx.len())?;
    let name = match kernel {
        PoolKernel::Direct => "maxpool2d_backward",
        PoolKernel::Vec4 => {
            align::require_aligned(OP, kernel.name(), &[("dx", align::offset16(gpu, &*dx))])?;
            "maxpool2d_backward_vec4"
        }
    };
    let xlen = p.x_len();
    if xlen == 0 {
        return Ok(());
    }
    let f = gpu.function(kernel.module(), name)?;
    let xlen64 = xlen as u64;
    // SAFETY: dx holds n*c*h*w and dy, argmax n*c*oh*ow (checked); each
    // thread reads dy and argmax only at windows (oy, ox) of its own plane
    // with oy < out_h, ox < out_w, and writes its own dx elements (the
    // vector form a quad at a 16-byte aligned address, checked above).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(dy)
            .arg(argmax)
            .arg(dx)
            .arg(&xlen64)
            .launch(gpu.elementwise_config(xlen))
    };
    gpu.launched(name, r)
}
