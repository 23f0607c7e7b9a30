//! CUDA dropout (`kernels/dropout.cu`, Philox in `kernels/philox.cuh`):
//! launch wrappers mirroring [`super::cpu`], with the same checks before any
//! launch. The masks are the CPU's bit for bit (the same Philox4x32-10
//! counters and keep rule), and so are the values: `scale` is computed once
//! on the host ([`Dropout::scale`]) and each value is one f32 product.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::Dropout;
use crate::cuda::{CudaBackend, DeviceInfo, KernelVersion, StepClock, align};
use crate::error::Result;

crate::kernel_versions! {
    /// The versions of this family's kernels, as data (see
    /// [`KernelVersion`]).
    pub enum DropoutKernel {
        /// One Philox-4x32-10 draw per element, keyed by (seed, element) (`kernels/dropout.cu`).
        Philox => "dropout_philox", crate::cuda::DROPOUT,
        /// [`DropoutKernel::Philox`] in vectors (`*_vec4`): a thread's
        /// 4-element Philox block moves as one 16-byte access per float
        /// tensor and one 32-bit access for its four mask bytes (the
        /// `len % 4` tail scalar), each element through the same keep rule
        /// and product, so the same masks and bits. The float buffers must
        /// start on 16 bytes, the mask on 4.
        PhiloxVec4 => "dropout_philox_vec4", crate::cuda::DROPOUT,
    }
}

impl DropoutKernel {
    /// The entry point of the kernel `scalar` in this version.
    fn entry(self, scalar: &'static str) -> &'static str {
        match self {
            DropoutKernel::Philox => scalar,
            DropoutKernel::PhiloxVec4 => match scalar {
                "dropout_mask_only" => "dropout_mask_only_vec4",
                "dropout_forward" => "dropout_forward_vec4",
                "dropout_forward_clocked" => "dropout_forward_clocked_vec4",
                "dropout_backward" => "dropout_backward_vec4",
                other => unreachable!("no vector form of {other}"),
            },
        }
    }

    /// An error naming the first buffer this version cannot run on:
    /// [`DropoutKernel::PhiloxVec4`] needs the float buffers `floats`
    /// (offsets from a 16-byte boundary) aligned, then the mask `bytes`
    /// (offsets from a 4-byte boundary).
    fn check_aligned(
        self,
        op: &'static str,
        floats: &[(&str, u64)],
        bytes: &[(&str, u64)],
    ) -> Result<()> {
        match self {
            DropoutKernel::Philox => Ok(()),
            DropoutKernel::PhiloxVec4 => {
                align::require_aligned(op, self.name(), floats)?;
                align::require_aligned4(op, self.name(), bytes)
            }
        }
    }
}

/// The version the plain entry points run for `p` on `info`'s device when
/// every buffer the vector version touches is aligned (`aligned`: the
/// float buffers on 16 bytes, the mask on 4) or not; the `*_with` forms run
/// the one a caller names. Aligned buffers get [`DropoutKernel::PhiloxVec4`]
/// (a quarter of the float and mask accesses, the same bits), the rest
/// [`DropoutKernel::Philox`].
pub fn select(_p: &Dropout, aligned: bool, _info: &DeviceInfo) -> DropoutKernel {
    if aligned {
        DropoutKernel::PhiloxVec4
    } else {
        DropoutKernel::Philox
    }
}

/// Named buffers' offsets past their boundaries: the float buffers' from 16
/// bytes, the mask's from 4.
type Offsets = ([(&'static str, u64); 2], [(&'static str, u64); 1]);

/// Whether the float buffers `floats` start on 16 bytes and `mask` on 4:
/// what [`select`] takes.
fn aligned(floats: &[u64], mask: u64) -> bool {
    mask == 0 && floats.iter().all(|&off| off == 0)
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
    let ok = aligned(&[], align::offset_to(gpu, &*mask, 4));
    mask_only_with(gpu, select(p, ok, gpu.info()), p, mask)
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
    const OP: &str = "dropout.mask_only";
    p.check(OP, &[("mask", mask.len())])?;
    kernel.check_aligned(OP, &[], &[("mask", align::offset_to(gpu, &*mask, 4))])?;
    if p.len == 0 {
        return Ok(());
    }
    let name = kernel.entry("dropout_mask_only");
    let f = gpu.function(kernel.module(), name)?;
    // SAFETY: mask holds p.len bytes (checked); the kernel writes below
    // p.len; the vector form runs only on a 4-byte aligned mask (checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(mask)
            .launch(blocks_config(gpu, p.len))
    };
    gpu.launched(name, r)
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
    let ok = forward_aligned(gpu, x, y, mask);
    forward_with(gpu, select(p, ok, gpu.info()), p, x, y, mask)
}

/// The float buffers' offsets from 16 bytes and the mask's from 4, as the
/// forward's checks name them.
fn forward_offsets(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    y: &CudaViewMut<'_, f32>,
    mask: &CudaViewMut<'_, u8>,
) -> Offsets {
    (
        [
            ("x", align::offset16(gpu, x)),
            ("y", align::offset16(gpu, y)),
        ],
        [("mask", align::offset_to(gpu, mask, 4))],
    )
}

fn forward_aligned(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    y: &CudaViewMut<'_, f32>,
    mask: &CudaViewMut<'_, u8>,
) -> bool {
    let (floats, bytes) = forward_offsets(gpu, x, y, mask);
    aligned(&floats.map(|(_, o)| o), bytes[0].1)
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
    const OP: &str = "dropout.forward";
    p.check(OP, &[("x", x.len()), ("y", y.len()), ("mask", mask.len())])?;
    let (floats, bytes) = forward_offsets(gpu, x, y, mask);
    kernel.check_aligned(OP, &floats, &bytes)?;
    if p.len == 0 {
        return Ok(());
    }
    let scale = p.scale();
    let name = kernel.entry("dropout_forward");
    let f = gpu.function(kernel.module(), name)?;
    // SAFETY: x, y and mask hold p.len elements (checked); the kernel
    // touches indices below p.len only; the vector form runs only on
    // aligned buffers (checked).
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
    gpu.launched(name, r)
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
    let ok = forward_aligned(gpu, x, y, mask);
    forward_clocked_with(gpu, select(p, ok, gpu.info()), p, clock, x, y, mask)
}

/// [`forward_clocked`] on the version `kernel` (an error, before any
/// launch, on a device older than it needs or on buffers it cannot run on).
pub fn forward_clocked_with(
    gpu: &CudaBackend,
    kernel: DropoutKernel,
    p: &Dropout,
    clock: &StepClock,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
    mask: &mut CudaViewMut<'_, u8>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "dropout.forward_clocked";
    p.check(OP, &[("x", x.len()), ("y", y.len()), ("mask", mask.len())])?;
    let (floats, bytes) = forward_offsets(gpu, x, y, mask);
    kernel.check_aligned(OP, &floats, &bytes)?;
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
    let name = kernel.entry("dropout_forward_clocked");
    let f = gpu.function(kernel.module(), name)?;
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
    gpu.launched(name, r)
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
    let (floats, bytes) = backward_offsets(gpu, dy, mask, dx);
    let ok = aligned(&floats.map(|(_, o)| o), bytes[0].1);
    backward_with(gpu, select(p, ok, gpu.info()), p, dy, mask, dx)
}

/// [`forward_offsets`] for the backward's buffers.
fn backward_offsets(
    gpu: &CudaBackend,
    dy: &CudaView<'_, f32>,
    mask: &CudaView<'_, u8>,
    dx: &CudaViewMut<'_, f32>,
) -> Offsets {
    (
        [
            ("dy", align::offset16(gpu, dy)),
            ("dx", align::offset16(gpu, dx)),
        ],
        [("mask", align::offset_to(gpu, mask, 4))],
    )
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
    const OP: &str = "dropout.backward";
    p.check(
        OP,
        &[("dy", dy.len()), ("mask", mask.len()), ("dx", dx.len())],
    )?;
    let (floats, bytes) = backward_offsets(gpu, dy, mask, dx);
    kernel.check_aligned(OP, &floats, &bytes)?;
    if p.len == 0 {
        return Ok(());
    }
    let scale = p.scale();
    let name = kernel.entry("dropout_backward");
    let f = gpu.function(kernel.module(), name)?;
    // SAFETY: dy, mask and dx hold p.len elements (checked); the vector
    // form runs only on aligned buffers (checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(&scale)
            .arg(dy)
            .arg(mask)
            .arg(dx)
            .launch(match kernel {
                DropoutKernel::Philox => gpu.elementwise_config(p.len),
                DropoutKernel::PhiloxVec4 => blocks_config(gpu, p.len),
            })
    };
    gpu.launched(name, r)
}
