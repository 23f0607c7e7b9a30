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
//! Scratch: the partial sums live in a buffer allocated (with `gpu.zeros`)
//! on each call, `8 * c * ceil(n * spatial / 4096)` bytes for the gradient
//! and `8 * ceil(len / 8192)` for the sums.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::BiasShape;
use crate::cuda::{BIAS, CudaBackend};
use crate::error::{Result, check_len};

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

/// `y[i, ch, s] = x[i, ch, s] + b[ch]`; `y` is fully overwritten.
pub fn add(
    gpu: &CudaBackend,
    p: &BiasShape,
    x: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "bias.add";
    p.check_x(OP, "x", x.len())?;
    p.check_b(OP, "b", b.len())?;
    p.check_x(OP, "y", y.len())?;
    if p.is_empty() {
        return Ok(());
    }
    let f = gpu.function(&BIAS, "bias_add")?;
    let len = p.len() as u64;
    // SAFETY: x and y hold n*c*spatial elements and b holds c (checked);
    // the kernel reads b at (i / spatial) % c < c and x, y below len.
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
    gpu.launched("bias_add", r)
}

/// `x[i, ch, s] += b[ch]`, in place.
pub fn add_inplace(
    gpu: &CudaBackend,
    p: &BiasShape,
    x: &mut CudaViewMut<'_, f32>,
    b: &CudaView<'_, f32>,
) -> Result<()> {
    const OP: &str = "bias.add_inplace";
    p.check_x(OP, "x", x.len())?;
    p.check_b(OP, "b", b.len())?;
    if p.is_empty() {
        return Ok(());
    }
    let f = gpu.function(&BIAS, "bias_add_inplace")?;
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
    gpu.launched("bias_add_inplace", r)
}

/// The bias gradient `db[ch] = sum over i, s of dy[i, ch, s]` (f64 sums,
/// rounded once); `db` is overwritten (all zeros when there are no samples).
pub fn backward(
    gpu: &CudaBackend,
    p: &BiasShape,
    dy: &CudaView<'_, f32>,
    db: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "bias.backward";
    p.check_x(OP, "dy", dy.len())?;
    p.check_b(OP, "db", db.len())?;
    if p.c == 0 {
        return Ok(());
    }
    let m = p.n * p.spatial;
    let chunks = m.div_ceil(CHANNEL_CHUNK);
    let mut partial: CudaSlice<f64> = gpu.zeros((p.c * chunks).max(1))?;
    let chunks64 = chunks as u64;
    if chunks > 0 {
        let f = gpu.function(&BIAS, "bias_grad_partials")?;
        // SAFETY: dy holds n*c*spatial elements (checked); block (k, ch)
        // reads samples of channel ch below n*spatial and writes
        // partial[ch * chunks + k] < c * chunks, the buffer's length.
        let r = unsafe {
            gpu.stream()
                .launch_builder(&f)
                .arg(p)
                .arg(dy)
                .arg(&mut partial)
                .arg(&chunks64)
                .launch(reduce_config(chunks, p.c))
        };
        gpu.launched("bias_grad_partials", r)?;
    }
    let f = gpu.function(&BIAS, "bias_grad_finalize")?;
    // SAFETY: reads partial below c * chunks, writes db below c (checked).
    let r = unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(p)
            .arg(&partial)
            .arg(&chunks64)
            .arg(db)
            .launch(gpu.elementwise_config(p.c))
    };
    gpu.launched("bias_grad_finalize", r)
}

fn reduce(
    gpu: &CudaBackend,
    op: &'static str,
    x: &CudaView<'_, f32>,
    square: bool,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    check_len(op, "out (one f64)", out.len(), 1)?;
    let len = x.len();
    let chunks = len.div_ceil(REDUCE_CHUNK);
    let mut partial: CudaSlice<f64> = gpu.zeros(chunks.max(1))?;
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
                .arg(&mut partial)
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
            .arg(&partial)
            .arg(&chunks64)
            .arg(out)
            .launch(reduce_config(1, 1))
    };
    gpu.launched("reduce_sum_finalize", r)
}

/// `out[0] = sum(x)` in f64, on the device (deterministic; 0 for an empty
/// `x`; NaN anywhere gives NaN). `out` must hold exactly one element: pass
/// a one-element slice of a larger buffer to gather several sums.
pub fn sum(gpu: &CudaBackend, x: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, f64>) -> Result<()> {
    reduce(gpu, "bias.sum", x, false, out)
}

/// `out[0] = sum(x^2)` in f64 (squares in f64), on the device: the
/// optimizer's global gradient norm is the square root of a sum of these.
pub fn sum_squares(
    gpu: &CudaBackend,
    x: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    reduce(gpu, "bias.sum_squares", x, true, out)
}

/// [`sum`], downloaded to the host (synchronizes the stream).
pub fn sum_host(gpu: &CudaBackend, x: &CudaView<'_, f32>) -> Result<f64> {
    let mut out: CudaSlice<f64> = gpu.zeros(1)?;
    sum(gpu, x, &mut out.as_view_mut())?;
    Ok(gpu.download(&out)?[0])
}

/// [`sum_squares`], downloaded to the host (synchronizes the stream).
pub fn sum_squares_host(gpu: &CudaBackend, x: &CudaView<'_, f32>) -> Result<f64> {
    let mut out: CudaSlice<f64> = gpu.zeros(1)?;
    sum_squares(gpu, x, &mut out.as_view_mut())?;
    Ok(gpu.download(&out)?[0])
}
