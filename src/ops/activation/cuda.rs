//! CUDA activations and softmax (`kernels/activation.cu`): launch wrappers
//! mirroring [`super::cpu`], with the same length checks before any launch.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{Activation, Softmax};
use crate::cuda::{ACTIVATION, CudaBackend, DeviceInfo, KernelVersion, align};
use crate::error::Result;

crate::kernel_versions! {
    /// The versions of this family's kernels, as data (see
    /// [`KernelVersion`]).
    pub enum ActivationKernel {
        /// One thread per element (grid-stride), softmax one warp per row (`kernels/activation.cu`).
        Elementwise => "activation_elementwise", crate::cuda::ACTIVATION,
        /// The element-wise kernels in 16-byte vectors (`*_vec4`: one
        /// 128-bit load per input and one 128-bit store per quad of
        /// elements, the `n % 4` tail scalar), the same expression per
        /// element, so the same bits as [`ActivationKernel::Elementwise`].
        /// Every buffer must start on a 16-byte boundary. Softmax runs
        /// `Elementwise`'s kernels: a vector row walk would change the order
        /// of its row sums, hence its bits.
        Vec4 => "activation_vec4", crate::cuda::ACTIVATION,
    }
}

impl ActivationKernel {
    /// The entry point of the element-wise kernel `scalar` in this version.
    fn elementwise_entry(self, scalar: &'static str) -> &'static str {
        match self {
            ActivationKernel::Elementwise => scalar,
            ActivationKernel::Vec4 => match scalar {
                "activation_forward" => "activation_forward_vec4",
                "activation_forward_inplace" => "activation_forward_inplace_vec4",
                "activation_backward" => "activation_backward_vec4",
                "activation_backward_inplace" => "activation_backward_inplace_vec4",
                "activation_backward_from_output" => "activation_backward_from_output_vec4",
                other => unreachable!("no vector form of {other}"),
            },
        }
    }

    /// An error naming the first buffer this version cannot run on
    /// ([`ActivationKernel::Vec4`] needs 16-byte aligned starts).
    fn check_aligned(self, op: &'static str, bufs: &[(&str, u64)]) -> Result<()> {
        match self {
            ActivationKernel::Elementwise => Ok(()),
            ActivationKernel::Vec4 => align::require_aligned(op, self.name(), bufs),
        }
    }
}

/// The version the plain entry points run for `elements` elements of
/// buffers that all start on a 16-byte boundary (`aligned`) or not, on
/// `info`'s device; the `*_with` forms run the one a caller names. Aligned
/// buffers get [`ActivationKernel::Vec4`] (a quarter of the memory
/// instructions, the same bits), the rest [`ActivationKernel::Elementwise`].
pub fn select(_elements: usize, aligned: bool, _info: &DeviceInfo) -> ActivationKernel {
    if aligned {
        ActivationKernel::Vec4
    } else {
        ActivationKernel::Elementwise
    }
}

// SAFETY: `#[repr(C)]` with a `#[repr(u32)]` enum and an f32: plain old
// data of 8 bytes, mirrored as `struct Activation` in common.cuh.
unsafe impl cudarc::driver::DeviceRepr for Activation {}
// SAFETY: `#[repr(C)]`, two usizes: mirrored as `struct Softmax` in activation.cu.
unsafe impl cudarc::driver::DeviceRepr for Softmax {}

const _: () = assert!(std::mem::size_of::<Activation>() == 8);
const _: () = assert!(std::mem::size_of::<Softmax>() == 16);

/// Launches `$kernel`'s form of the element-wise kernel `$scalar` from
/// activation.cu over `$n` elements with a grid-stride config, pushing the
/// arguments then `n` as u64.
macro_rules! launch_elementwise {
    ($gpu:expr, $kernel:expr, $scalar:literal, $n:expr, $($arg:expr),+) => {{
        let n: usize = $n;
        if n == 0 {
            return Ok(());
        }
        let name = $kernel.elementwise_entry($scalar);
        let f = $gpu.function(&ACTIVATION, name)?;
        let cfg = $gpu.elementwise_config(n);
        let n64 = n as u64;
        let mut b = $gpu.stream().launch_builder(&f);
        $(b.arg($arg);)+
        b.arg(&n64);
        // SAFETY: every buffer passed holds `n` elements (checked by the
        // caller) and the kernel touches indices below `n` only; the vector
        // forms run only on 16-byte aligned buffers (checked by the caller).
        let r = unsafe { b.launch(cfg) };
        $gpu.launched(name, r)
    }};
}

/// `y = f(x)` element-wise; `y` is fully overwritten.
pub fn forward(
    gpu: &CudaBackend,
    act: Activation,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let aligned = align::all_aligned(&[
        ("x", align::offset16(gpu, x)),
        ("y", align::offset16(gpu, &*y)),
    ]);
    forward_with(gpu, select(x.len(), aligned, gpu.info()), act, x, y)
}

/// [`forward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn forward_with(
    gpu: &CudaBackend,
    kernel: ActivationKernel,
    act: Activation,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "activation.forward";
    act.check_elementwise(OP, &[("x", x.len()), ("y", y.len())])?;
    kernel.check_aligned(
        OP,
        &[
            ("x", align::offset16(gpu, x)),
            ("y", align::offset16(gpu, &*y)),
        ],
    )?;
    launch_elementwise!(gpu, kernel, "activation_forward", x.len(), &act, x, y)
}

/// `x = f(x)` in place.
pub fn forward_inplace(
    gpu: &CudaBackend,
    act: Activation,
    x: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let aligned = align::offset16(gpu, &*x) == 0;
    forward_inplace_with(gpu, select(x.len(), aligned, gpu.info()), act, x)
}

/// [`forward_inplace`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn forward_inplace_with(
    gpu: &CudaBackend,
    kernel: ActivationKernel,
    act: Activation,
    x: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "activation.forward_inplace";
    act.check(OP)?;
    kernel.check_aligned(OP, &[("x", align::offset16(gpu, &*x))])?;
    let n = x.len();
    launch_elementwise!(gpu, kernel, "activation_forward_inplace", n, &act, x)
}

/// `dx = f'(x) * dy` from the forward's input `x` and output `y`; `dx` is
/// fully overwritten.
pub fn backward(
    gpu: &CudaBackend,
    act: Activation,
    x: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let aligned = align::all_aligned(&[
        ("x", align::offset16(gpu, x)),
        ("y", align::offset16(gpu, y)),
        ("dy", align::offset16(gpu, dy)),
        ("dx", align::offset16(gpu, &*dx)),
    ]);
    backward_with(gpu, select(x.len(), aligned, gpu.info()), act, x, y, dy, dx)
}

/// [`backward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn backward_with(
    gpu: &CudaBackend,
    kernel: ActivationKernel,
    act: Activation,
    x: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "activation.backward";
    act.check_elementwise(
        OP,
        &[
            ("x", x.len()),
            ("y", y.len()),
            ("dy", dy.len()),
            ("dx", dx.len()),
        ],
    )?;
    kernel.check_aligned(
        OP,
        &[
            ("x", align::offset16(gpu, x)),
            ("y", align::offset16(gpu, y)),
            ("dy", align::offset16(gpu, dy)),
            ("dx", align::offset16(gpu, &*dx)),
        ],
    )?;
    launch_elementwise!(
        gpu,
        kernel,
        "activation_backward",
        x.len(),
        &act,
        x,
        y,
        dy,
        dx
    )
}

/// `g = f'(x) * g` in place (the incoming gradient becomes `dx`).
pub fn backward_inplace(
    gpu: &CudaBackend,
    act: Activation,
    x: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
    g: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let aligned = align::all_aligned(&[
        ("x", align::offset16(gpu, x)),
        ("y", align::offset16(gpu, y)),
        ("gradient", align::offset16(gpu, &*g)),
    ]);
    backward_inplace_with(gpu, select(x.len(), aligned, gpu.info()), act, x, y, g)
}

/// [`backward_inplace`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn backward_inplace_with(
    gpu: &CudaBackend,
    kernel: ActivationKernel,
    act: Activation,
    x: &CudaView<'_, f32>,
    y: &CudaView<'_, f32>,
    g: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "activation.backward_inplace";
    act.check_elementwise(OP, &[("x", x.len()), ("y", y.len()), ("gradient", g.len())])?;
    kernel.check_aligned(
        OP,
        &[
            ("x", align::offset16(gpu, x)),
            ("y", align::offset16(gpu, y)),
            ("gradient", align::offset16(gpu, &*g)),
        ],
    )?;
    launch_elementwise!(
        gpu,
        kernel,
        "activation_backward_inplace",
        x.len(),
        &act,
        x,
        y,
        g
    )
}

/// `g = f'(x) * g` in place from the output `y` alone (see
/// [`super::cpu::backward_from_output`]: elu and leaky relu need `alpha > 0`).
pub fn backward_from_output(
    gpu: &CudaBackend,
    act: Activation,
    y: &CudaView<'_, f32>,
    g: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let aligned = align::all_aligned(&[
        ("y", align::offset16(gpu, y)),
        ("gradient", align::offset16(gpu, &*g)),
    ]);
    backward_from_output_with(gpu, select(y.len(), aligned, gpu.info()), act, y, g)
}

/// [`backward_from_output`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn backward_from_output_with(
    gpu: &CudaBackend,
    kernel: ActivationKernel,
    act: Activation,
    y: &CudaView<'_, f32>,
    g: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "activation.backward_from_output";
    act.check_from_output(OP, &[("y", y.len()), ("gradient", g.len())])?;
    kernel.check_aligned(
        OP,
        &[
            ("y", align::offset16(gpu, y)),
            ("gradient", align::offset16(gpu, &*g)),
        ],
    )?;
    launch_elementwise!(
        gpu,
        kernel,
        "activation_backward_from_output",
        y.len(),
        &act,
        y,
        g
    )
}

/// One warp per row, eight rows per block, grid-strided over the rows.
fn softmax_config(gpu: &CudaBackend, rows: usize) -> LaunchConfig {
    const THREADS: u32 = 256;
    let needed = rows.div_ceil((THREADS / 32) as usize).max(1);
    let cap = (gpu.info().multiprocessors.max(1) * 16) as usize;
    LaunchConfig {
        grid_dim: (needed.min(cap) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Row-wise softmax (see [`Softmax`]); `y` is fully overwritten. Rows sum
/// in a different order than the CPU's (a warp's lanes, then a butterfly),
/// so the results agree within rounding, not bit for bit. Both versions
/// run the same softmax kernels (see [`ActivationKernel::Vec4`]).
pub fn softmax_forward(
    gpu: &CudaBackend,
    p: &Softmax,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    softmax_forward_with(gpu, ActivationKernel::Elementwise, p, x, y)
}

/// [`softmax_forward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn softmax_forward_with(
    gpu: &CudaBackend,
    kernel: ActivationKernel,
    p: &Softmax,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "softmax.forward";
    p.check(OP, &[("x", x.len()), ("y", y.len())])?;
    if p.is_empty() {
        return Ok(());
    }
    let f = gpu.function(kernel.module(), "softmax_forward")?;
    let cfg = softmax_config(gpu, p.rows);
    // SAFETY: x and y hold rows * cols elements (checked above); the kernel
    // reads and writes rows below p.rows, columns below p.cols only.
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(x)
            .arg(y)
            .launch(cfg)
    };
    gpu.launched("softmax_forward", r)
}

/// Softmax backward `dx = y * (dy - sum(dy * y))` per row; `dx` is fully
/// overwritten.
pub fn softmax_backward(
    gpu: &CudaBackend,
    p: &Softmax,
    y: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    softmax_backward_with(gpu, ActivationKernel::Elementwise, p, y, dy, dx)
}

/// [`softmax_backward`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs).
pub fn softmax_backward_with(
    gpu: &CudaBackend,
    kernel: ActivationKernel,
    p: &Softmax,
    y: &CudaView<'_, f32>,
    dy: &CudaView<'_, f32>,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    kernel.require(gpu)?;
    const OP: &str = "softmax.backward";
    p.check(OP, &[("y", y.len()), ("dy", dy.len()), ("dx", dx.len())])?;
    if p.is_empty() {
        return Ok(());
    }
    let f = gpu.function(kernel.module(), "softmax_backward")?;
    let cfg = softmax_config(gpu, p.rows);
    // SAFETY: y, dy and dx hold rows * cols elements (checked above).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(y)
            .arg(dy)
            .arg(dx)
            .launch(cfg)
    };
    gpu.launched("softmax_backward", r)
}
