//! The fused optimizer step on the device (`kernels/optim.cu`), mirroring
//! [`super::cpu::step`]: one call updates every parameter tensor of a model.
//!
//! Design (multi-tensor): a [`CudaOptimizerState`] owns the slots of all
//! tensors in one flat device buffer per slot, a chunk -> tensor map
//! (every tensor cut into [`CHUNK`]-element chunks), the clipnorm scratch
//! (chunk partials, per-tensor sums and scales), and a device table of
//! tensor descriptors (parameter, gradient and slot pointers, length, chunk
//! range). The map is uploaded when the state is made; the descriptor table
//! when the caller's parameter/gradient buffers are first seen and again only
//! if they move (the wrapper compares the pointers on the host), so a
//! training step uploads nothing and launches one kernel, or three with
//! clipnorm. Separate tensors rather than one flat parameter buffer keep the
//! API the CPU's (`&mut [params]`, `&[grads]`) and let each layer own its
//! buffers.
//!
//! Versions: [`OptimKernel::Fused`] updates one element per thread,
//! [`OptimKernel::FusedVec4`] a quad of elements per 16-byte access of each
//! tensor. Whether every tensor's parameter, gradient and slot pointers start
//! on 16 bytes is decided on the host when the descriptor table is written
//! (once, in a fit loop); each tensor's slots start on a multiple of 4 floats
//! of the flat slot buffers, so only the caller's buffers can be misaligned.
//!
//! clipnorm never comes back to the host: chunk sums of squares (f64, fixed
//! trees), then one block sums them per tensor in chunk order and, for the
//! global norm, over tensors in a fixed tree, and writes each tensor's scale
//! for the update kernel. The iteration-dependent scalars (`lr_t`, Adam's
//! step) come from [`Optimizer::scalars`] on the host and go by value, or,
//! in a step captured in a CUDA graph ([`step_clocked`]), from a row of a
//! device table the host fills with the same values once per epoch.
//! No float atomics: the same inputs give the same bits.

use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};

use super::{Optimizer, OptimizerKind, OptimizerState, StepScalars};
use crate::cuda::{CudaBackend, DeviceInfo, KernelVersion, StepClock};
use crate::error::{Error, Result, check_len};

crate::kernel_versions! {
    /// The versions of this family's kernels, as data (see
    /// [`KernelVersion`]).
    pub enum OptimKernel {
        /// One fused update over every tensor of the step, clipping from fixed-order sums (`kernels/optim.cu`).
        Fused => "optim_fused", crate::cuda::OPTIM,
        /// [`OptimKernel::Fused`] with the update in 16-byte vectors
        /// (`optim_update*_vec4`: a thread loads and stores a quad of each
        /// of param, gradient and slots at once; a tensor's `len % 4` tail
        /// scalar), every element through the same update, so the same
        /// bits. Every tensor's parameter and gradient buffers must start on
        /// 16 bytes. The clipnorm sums are `Fused`'s (a vector walk would
        /// change their order, hence the scale's bits).
        FusedVec4 => "optim_fused_vec4", crate::cuda::OPTIM,
    }
}

impl OptimKernel {
    /// The update kernel of this version, plain or clocked.
    fn update_entry(self, clocked: bool) -> &'static str {
        match (self, clocked) {
            (OptimKernel::Fused, false) => "optim_update",
            (OptimKernel::Fused, true) => "optim_update_clocked",
            (OptimKernel::FusedVec4, false) => "optim_update_vec4",
            (OptimKernel::FusedVec4, true) => "optim_update_clocked_vec4",
        }
    }
}

/// The version the plain entry points run for `opt` on `info`'s device
/// when every buffer of the descriptor table starts on 16 bytes
/// (`aligned`, see [`CudaOptimizerState::first_misaligned`]) or not; the
/// `*_with` forms run the one a caller names. Aligned buffers get
/// [`OptimKernel::FusedVec4`] (a quarter of the memory instructions, the
/// same bits), the rest [`OptimKernel::Fused`].
pub fn select(_opt: &Optimizer, aligned: bool, _info: &DeviceInfo) -> OptimKernel {
    if aligned {
        OptimKernel::FusedVec4
    } else {
        OptimKernel::Fused
    }
}

const OP: &str = "optimizer.step";

/// Elements per chunk: one block's share of a tensor in the update and in
/// the norm's first stage. Small enough that a 1M-parameter model still
/// gives hundreds of blocks.
pub const CHUNK: usize = 4096;
// The vector update walks each chunk in quads from its start: chunks must
// start on 16 bytes of an aligned tensor.
const _: () = assert!(CHUNK.is_multiple_of(4));
const THREADS: u32 = 256;

// SAFETY: `StepScalars` is `#[repr(C)]` plain old data (a `#[repr(u32)]`
// enum, two bools, f32s; no pointers), mirrored field for field by
// `struct StepScalars` in kernels/optim.cu, which static_asserts the size.
unsafe impl DeviceRepr for StepScalars {}

const _: () = assert!(std::mem::size_of::<StepScalars>() == 56);

/// One tensor as the kernels see it; mirrored by `struct OptTensor` in
/// kernels/optim.cu. Device pointers as `u64` (0: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct OptTensor {
    param: u64,
    grad: u64,
    slot0: u64,
    slot1: u64,
    len: u64,
    first_chunk: u64,
    chunks: u64,
}

// SAFETY: `#[repr(C)]` of u64 fields only, mirrored by `struct OptTensor`
// (pointers are 8 bytes on every CUDA target), size asserted on both sides.
unsafe impl DeviceRepr for OptTensor {}

const _: () = assert!(std::mem::size_of::<OptTensor>() == 56);

/// `OptTensor`'s layout as (size, alignment, [(field, offset, size)]), for
/// the test that holds `kernels/ptx/manifest.json` to the Rust mirrors (the
/// type itself stays private).
#[doc(hidden)]
pub fn opt_tensor_layout() -> (usize, usize, Vec<(&'static str, usize, usize)>) {
    use std::mem::{align_of, offset_of, size_of};
    let f = size_of::<u64>();
    (
        size_of::<OptTensor>(),
        align_of::<OptTensor>(),
        vec![
            ("param", offset_of!(OptTensor, param), f),
            ("grad", offset_of!(OptTensor, grad), f),
            ("slot0", offset_of!(OptTensor, slot0), f),
            ("slot1", offset_of!(OptTensor, slot1), f),
            ("len", offset_of!(OptTensor, len), f),
            ("first_chunk", offset_of!(OptTensor, first_chunk), f),
            ("chunks", offset_of!(OptTensor, chunks), f),
        ],
    )
}

/// An optimizer's state on the device: the step counter (on the host, since
/// the per-step scalars are formed there) and the slots of every tensor,
/// plus the scratch of the step. Download it with
/// [`CudaOptimizerState::download`] for a checkpoint, and resume with
/// [`CudaOptimizerState::upload`].
#[derive(Debug)]
pub struct CudaOptimizerState {
    kind: OptimizerKind,
    iterations: u64,
    sizes: Vec<usize>,
    /// Offset of each tensor in the flat slot buffers: a multiple of 4
    /// floats, so that every tensor's slots start on 16 bytes.
    offsets: Vec<usize>,
    total: usize,
    /// Flat slot buffers (at least one element, so that an empty model still
    /// has a valid allocation); slot1 is Adam's second moment, else 1 element.
    slot0: CudaSlice<f32>,
    slot1: CudaSlice<f32>,
    chunks: usize,
    /// Which tensor each chunk belongs to `[chunks]`.
    chunk_tensor: CudaSlice<u32>,
    /// Host copy of the descriptors the device table holds (param and grad
    /// pointers 0 until the first step).
    descs: Vec<OptTensor>,
    table: CudaSlice<OptTensor>,
    /// The device table lacks the current descriptors (set at creation, so
    /// that the first step uploads them whatever the pointers).
    table_stale: bool,
    /// The first buffer of the table that does not start on 16 bytes, with
    /// its offset past a boundary (decided whenever the table is written;
    /// `None` before the first step).
    misaligned: Option<(String, u64)>,
    partials: CudaSlice<f64>,
    tensor_sq: CudaSlice<f64>,
    scales: CudaSlice<f32>,
}

impl CudaOptimizerState {
    /// A fresh state (`iterations = 0`) for tensors of the given sizes
    /// (zero-sized tensors allowed): slots zero, or Adagrad's initial
    /// accumulator, as [`OptimizerState::new`].
    pub fn new(gpu: &CudaBackend, opt: &Optimizer, sizes: &[usize]) -> Result<Self> {
        Self::upload(gpu, opt, &OptimizerState::new(opt, sizes)?)
    }

    /// The device copy of a host state (to resume from a checkpoint).
    pub fn upload(gpu: &CudaBackend, opt: &Optimizer, host: &OptimizerState) -> Result<Self> {
        opt.validate()?;
        check_kind(opt, host.kind())?;
        let sizes = host.sizes().to_vec();
        if u32::try_from(sizes.len()).is_err() {
            return Err(Error::invalid(
                OP,
                "sizes",
                format!("{} tensors (at most {})", sizes.len(), u32::MAX),
            ));
        }
        let mut offsets = Vec::with_capacity(sizes.len());
        // The flat slot buffers' length: every tensor's slots start on a
        // multiple of 4 floats (the vector update needs 16-byte starts).
        let mut flat = 0usize;
        let mut total = 0usize;
        let mut chunk_tensor = Vec::new();
        let mut descs = Vec::with_capacity(sizes.len());
        let overflow = || Error::invalid(OP, "sizes", "the total number of parameters overflows");
        for (i, &n) in sizes.iter().enumerate() {
            offsets.push(flat);
            total = total.checked_add(n).ok_or_else(overflow)?;
            flat = flat.checked_add(n.div_ceil(4) * 4).ok_or_else(overflow)?;
            let chunks = n.div_ceil(CHUNK);
            descs.push(OptTensor {
                len: n as u64,
                first_chunk: chunk_tensor.len() as u64,
                chunks: chunks as u64,
                ..OptTensor::default()
            });
            chunk_tensor.extend(std::iter::repeat_n(i as u32, chunks));
        }
        let adam = host.kind() == OptimizerKind::Adam;
        let mut flat0 = vec![0.0f32; flat.max(1)];
        let mut flat1 = vec![0.0f32; if adam { flat.max(1) } else { 1 }];
        for (i, &off) in offsets.iter().enumerate() {
            let (s0, s1) = host.slots(i).expect("sizes and slots agree");
            flat0[off..off + s0.len()].copy_from_slice(s0);
            if adam {
                flat1[off..off + s1.len()].copy_from_slice(s1);
            }
        }
        let chunks = chunk_tensor.len();
        chunk_tensor.resize(chunks.max(1), 0);
        let count = sizes.len().max(1);
        let mut table = descs.clone();
        table.resize(count, OptTensor::default());
        let mut state = CudaOptimizerState {
            kind: host.kind(),
            iterations: host.iterations(),
            sizes,
            offsets,
            total,
            slot0: gpu.upload(&flat0)?,
            slot1: gpu.upload(&flat1)?,
            chunks,
            chunk_tensor: gpu.upload(&chunk_tensor)?,
            descs,
            table: gpu.upload(&table)?,
            table_stale: true,
            misaligned: None,
            partials: gpu.zeros::<f64>(chunks.max(1))?,
            tensor_sq: gpu.zeros::<f64>(count)?,
            scales: gpu.zeros::<f32>(count)?,
        };
        // Slot pointers are fixed for the state's life; param/grad are filled
        // in on the first step.
        let stream = gpu.stream().clone();
        let base0 = state.slot0.device_ptr(&stream).0;
        let base1 = state.slot1.device_ptr(&stream).0;
        for (d, &off) in state.descs.iter_mut().zip(&state.offsets) {
            d.slot0 = base0 + (off * 4) as u64;
            d.slot1 = if adam { base1 + (off * 4) as u64 } else { 0 };
        }
        Ok(state)
    }

    /// The host copy of this state (for a checkpoint; synchronizes).
    pub fn download(&self, gpu: &CudaBackend, opt: &Optimizer) -> Result<OptimizerState> {
        check_kind(opt, self.kind)?;
        let mut host = OptimizerState::new(opt, &self.sizes)?;
        host.set_iterations(self.iterations);
        let flat0 = gpu.download(&self.slot0)?;
        let flat1 = gpu.download(&self.slot1)?;
        for (i, (&off, &n)) in self.offsets.iter().zip(&self.sizes).enumerate() {
            let (s0, s1) = host.slots_mut(i).expect("same sizes");
            s0.copy_from_slice(&flat0[off..off + n]);
            if self.kind == OptimizerKind::Adam {
                s1.copy_from_slice(&flat1[off..off + n]);
            }
        }
        Ok(host)
    }

    /// The rule this state was made for.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// Steps taken so far.
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// Sets the step counter (to resume a saved run).
    pub fn set_iterations(&mut self, iterations: u64) {
        self.iterations = iterations;
    }

    /// The parameter tensor sizes.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// All parameters of all tensors.
    pub fn total_len(&self) -> usize {
        self.total
    }

    /// The first buffer of the current descriptor table (`params[i]`,
    /// `grads[i]`, then the state's own `slot0[i]` / `slot1[i]`, tensor by
    /// tensor) that does not start on a 16-byte boundary, which keeps the
    /// step on [`OptimKernel::Fused`]; `None` when every one does (and
    /// before the first step, which writes the table). Empty tensors do not
    /// count: no kernel touches them.
    pub fn first_misaligned(&self) -> Option<&str> {
        self.misaligned.as_ref().map(|(name, _)| name.as_str())
    }
}

/// The first buffer of `descs` that does not start on 16 bytes (see
/// [`CudaOptimizerState::first_misaligned`]), with its offset.
fn first_misaligned(descs: &[OptTensor]) -> Option<(String, u64)> {
    descs
        .iter()
        .enumerate()
        .filter(|(_, d)| d.len > 0)
        .flat_map(|(i, d)| {
            [
                ("params", d.param),
                ("grads", d.grad),
                ("slot0", d.slot0),
                ("slot1", d.slot1),
            ]
            .into_iter()
            // slot1 is null for every rule but Adam.
            .filter(|&(name, ptr)| !(name == "slot1" && ptr == 0))
            .map(move |(name, ptr)| (format!("{name}[{i}]"), ptr % 16))
        })
        .find(|&(_, off)| off != 0)
}

fn check_kind(opt: &Optimizer, kind: OptimizerKind) -> Result<()> {
    if opt.kind != kind {
        return Err(Error::invalid(
            OP,
            "state",
            format!("state was made for {kind:?}, optimizer is {:?}", opt.kind),
        ));
    }
    Ok(())
}

fn chunk_config(gpu: &CudaBackend, chunks: usize) -> LaunchConfig {
    let cap = (gpu.info().multiprocessors.max(1) * 8) as usize;
    LaunchConfig {
        grid_dim: (chunks.clamp(1, cap) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Brings the device table in line with the caller's buffers: when a
/// tensor's parameter or gradient pointer moved since the table was written
/// (or the table was never written), `upload` writes the new descriptors.
/// The recorded descriptors and the stale flag change only after the upload
/// succeeded, so a failed upload is retried by the next step instead of
/// leaving the kernels on the old pointers. Returns whether it wrote.
fn refresh_table(
    descs: &mut [OptTensor],
    stale: &mut bool,
    ptrs: &[(u64, u64)],
    upload: impl FnOnce(&[OptTensor]) -> Result<()>,
) -> Result<bool> {
    let moved = descs
        .iter()
        .zip(ptrs)
        .any(|(d, &(p, g))| d.param != p || d.grad != g);
    if !*stale && !moved {
        return Ok(false);
    }
    let mut next = descs.to_vec();
    for (d, &(p, g)) in next.iter_mut().zip(ptrs) {
        d.param = p;
        d.grad = g;
    }
    upload(&next)?;
    descs.copy_from_slice(&next);
    *stale = false;
    Ok(true)
}

/// One optimizer step on the device over all parameter tensors:
/// `params[i]` is updated in place from `grads[i]` and the state's slots,
/// then the state's `iterations` is incremented; see [`super::cpu::step`]
/// for the rules, clipping flavors and checks (the same, with the same
/// errors, before anything is launched). Asynchronous: nothing is
/// downloaded.
pub fn step(
    gpu: &CudaBackend,
    opt: &Optimizer,
    state: &mut CudaOptimizerState,
    params: &mut [CudaViewMut<'_, f32>],
    grads: &[CudaView<'_, f32>],
) -> Result<()> {
    launch_step(gpu, None, opt, state, params, grads, None)?;
    state.iterations += 1;
    Ok(())
}

/// [`step`] on the version `kernel` (an error, before any launch, on a
/// device older than it needs, or for [`OptimKernel::FusedVec4`] on a
/// buffer that does not start on 16 bytes, naming the first such).
pub fn step_with(
    gpu: &CudaBackend,
    kernel: OptimKernel,
    opt: &Optimizer,
    state: &mut CudaOptimizerState,
    params: &mut [CudaViewMut<'_, f32>],
    grads: &[CudaView<'_, f32>],
) -> Result<()> {
    launch_step(gpu, Some(kernel), opt, state, params, grads, None)?;
    state.iterations += 1;
    Ok(())
}

/// [`step`] for a training step captured in a CUDA graph: the
/// iteration-dependent scalars (`lr_t`, Adam's step) come from the row
/// `clock` is at in its learning-rate table (which the caller fills with
/// [`Optimizer::scalars`] of each step of the epoch), not from the host's
/// `iterations`, so every replay of the recorded step applies its own
/// step's rule with the uncaptured step's bits. Nothing is uploaded: the
/// descriptor table must already describe these buffers (an uncaptured
/// [`step`] on them writes it), else this is an error. The state's
/// `iterations` is left alone: the caller advances it per replay
/// ([`CudaOptimizerState::set_iterations`]).
pub fn step_clocked(
    gpu: &CudaBackend,
    opt: &Optimizer,
    state: &mut CudaOptimizerState,
    clock: &StepClock,
    params: &mut [CudaViewMut<'_, f32>],
    grads: &[CudaView<'_, f32>],
) -> Result<()> {
    launch_step(gpu, None, opt, state, params, grads, Some(clock))
}

/// [`step_clocked`] on the version `kernel` (an error, before any launch,
/// as for [`step_with`]).
pub fn step_clocked_with(
    gpu: &CudaBackend,
    kernel: OptimKernel,
    opt: &Optimizer,
    state: &mut CudaOptimizerState,
    clock: &StepClock,
    params: &mut [CudaViewMut<'_, f32>],
    grads: &[CudaView<'_, f32>],
) -> Result<()> {
    launch_step(gpu, Some(kernel), opt, state, params, grads, Some(clock))
}

/// The launches of one step on `kernel`, or on [`select`]'s choice for the
/// table's buffers; with a clock, the clocked update and no table upload.
fn launch_step(
    gpu: &CudaBackend,
    kernel: Option<OptimKernel>,
    opt: &Optimizer,
    state: &mut CudaOptimizerState,
    params: &mut [CudaViewMut<'_, f32>],
    grads: &[CudaView<'_, f32>],
    clock: Option<&StepClock>,
) -> Result<()> {
    if let Some(k) = kernel {
        k.require(gpu)?;
    }
    opt.validate()?;
    check_kind(opt, state.kind)?;
    let sizes = &state.sizes;
    check_len(OP, "params (number of tensors)", params.len(), sizes.len())?;
    check_len(OP, "grads (number of tensors)", grads.len(), sizes.len())?;
    for (i, &n) in sizes.iter().enumerate() {
        check_len(OP, &format!("params[{i}]"), params[i].len(), n)?;
        check_len(OP, &format!("grads[{i}]"), grads[i].len(), n)?;
    }

    let stream = gpu.stream();
    // The kernels reach the caller's buffers through the descriptor table;
    // refresh it only when a buffer moved since the last step. The cudarc
    // guards live until the end of the step, after the last launch: with
    // event tracking on (a caller's context, `CudaBackend::from_stream`),
    // dropping one records the buffer's use, which must come after the
    // kernels that use it, not before them.
    let guards: Vec<_> = params
        .iter_mut()
        .zip(grads)
        .map(|(p, g)| (p.device_ptr_mut(stream), g.device_ptr(stream)))
        .collect();
    let ptrs: Vec<(u64, u64)> = guards.iter().map(|(p, g)| (p.0, g.0)).collect();
    let table = &mut state.table;
    let wrote = refresh_table(&mut state.descs, &mut state.table_stale, &ptrs, |descs| {
        if clock.is_some() {
            // A capture must not copy from pageable memory (CUDA refuses
            // it), and a table written at capture would not follow later
            // moves anyway.
            return Err(Error::invalid(
                "optimizer.step_clocked",
                "params",
                "the descriptor table does not describe these buffers yet (run one uncaptured \
                 step on them first)",
            ));
        }
        stream
            .memcpy_htod(descs, table)
            .map_err(|e| gpu.error("cuMemcpyHtoD", e))
    })?;
    if wrote {
        // Decided once per table: the pointers change only with it.
        state.misaligned = first_misaligned(&state.descs);
    }
    let kernel = match kernel {
        Some(k) => k,
        None => {
            let k = select(opt, state.misaligned.is_none(), gpu.info());
            k.require(gpu)?;
            k
        }
    };
    if kernel == OptimKernel::FusedVec4
        && let Some((name, off)) = &state.misaligned
    {
        let op = if clock.is_some() {
            "optimizer.step_clocked"
        } else {
            OP
        };
        crate::cuda::align::require_aligned(op, kernel.name(), &[(name.as_str(), *off)])?;
    }

    let base = opt.scalars(state.iterations);
    if state.chunks > 0 {
        let chunks = state.chunks as u64;
        let chunk = CHUNK as u64;
        let use_scales: u32 = opt.clipnorm.is_some().into();
        if let Some(c) = opt.clipnorm {
            let f = gpu.function(kernel.module(), "optim_sumsq")?;
            // SAFETY: the table describes every tensor with pointers taken
            // from the views above (checked to hold `len` elements each) and
            // the state's own slots; chunk_tensor and partials hold `chunks`
            // elements; every index stays below its tensor's len.
            let r = unsafe {
                stream
                    .launch_builder(&f)
                    .arg(&base)
                    .arg(&state.table)
                    .arg(&state.chunk_tensor)
                    .arg(&chunks)
                    .arg(&chunk)
                    .arg(&mut state.partials)
                    .launch(chunk_config(gpu, state.chunks))
            };
            gpu.launched("optim_sumsq", r)?;

            let f = gpu.function(kernel.module(), "optim_clip_scales")?;
            let per_tensor: u32 = opt.clipnorm_per_tensor.into();
            let count = sizes.len() as u64;
            let one_block = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: table, tensor_sq and scales hold `count` entries,
            // partials `chunks`; each tensor's chunk range lies inside it.
            let r = unsafe {
                stream
                    .launch_builder(&f)
                    .arg(&c)
                    .arg(&per_tensor)
                    .arg(&state.table)
                    .arg(&count)
                    .arg(&state.partials)
                    .arg(&mut state.tensor_sq)
                    .arg(&mut state.scales)
                    .launch(one_block)
            };
            gpu.launched("optim_clip_scales", r)?;
        }
        let name = kernel.update_entry(clock.is_some());
        let r = match clock {
            None => {
                let f = gpu.function(kernel.module(), name)?;
                // SAFETY: as for optim_sumsq; params are distinct `&mut`
                // views, so no two tensors (and no gradient) alias a written
                // element; slot1 is only dereferenced when non-null (Adam);
                // the vector form runs only when every pointer of the table
                // starts on 16 bytes (checked above) and CHUNK % 4 == 0.
                unsafe {
                    stream
                        .launch_builder(&f)
                        .arg(&base)
                        .arg(&use_scales)
                        .arg(&state.scales)
                        .arg(&state.table)
                        .arg(&state.chunk_tensor)
                        .arg(&chunks)
                        .arg(&chunk)
                        .launch(chunk_config(gpu, state.chunks))
                }
            }
            Some(clock) => {
                let f = gpu.function(kernel.module(), name)?;
                // SAFETY: as above; the clock holds its two counters and its
                // row (below clock.rows(), the fit loop's invariant) indexes
                // the 2 * rows learning-rate values.
                unsafe {
                    stream
                        .launch_builder(&f)
                        .arg(&base)
                        .arg(clock.counters())
                        .arg(clock.lr_rows())
                        .arg(&use_scales)
                        .arg(&state.scales)
                        .arg(&state.table)
                        .arg(&state.chunk_tensor)
                        .arg(&chunks)
                        .arg(&chunk)
                        .launch(chunk_config(gpu, state.chunks))
                }
            }
        };
        gpu.launched(name, r)?;
    }
    drop(guards);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize) -> Vec<OptTensor> {
        (0..n)
            .map(|i| OptTensor {
                len: 10 + i as u64,
                ..Default::default()
            })
            .collect()
    }

    /// A failed upload leaves the table stale: the next step uploads again,
    /// and the recorded descriptors are the ones actually on the device.
    #[test]
    fn failed_upload_is_retried_by_the_next_step() {
        let mut descs = table(2);
        let mut stale = true;
        let ptrs = [(0x1000, 0x2000), (0x3000, 0x4000)];
        let failing = |_: &[OptTensor]| Err(Error::invalid("optim", "upload", "injected failure"));
        assert!(refresh_table(&mut descs, &mut stale, &ptrs, failing).is_err());
        assert!(stale, "a failed upload must leave the table stale");
        assert_eq!(
            descs,
            table(2),
            "descriptors recorded although not uploaded"
        );

        let mut uploaded = Vec::new();
        refresh_table(&mut descs, &mut stale, &ptrs, |d| {
            uploaded = d.to_vec();
            Ok(())
        })
        .unwrap();
        assert_eq!(uploaded.len(), 2, "the retry did not upload");
        assert_eq!((uploaded[1].param, uploaded[1].grad), (0x3000, 0x4000));
        assert!(!stale);
        assert_eq!(descs, uploaded);
    }

    /// Unchanged pointers upload nothing; a moved gradient uploads again,
    /// even after a failed attempt with other pointers.
    #[test]
    fn uploads_only_when_a_pointer_moved() {
        let mut descs = table(1);
        let mut stale = true;
        refresh_table(&mut descs, &mut stale, &[(1, 2)], |_| Ok(())).unwrap();
        let mut calls = 0;
        refresh_table(&mut descs, &mut stale, &[(1, 2)], |_| {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 0);
        let failing = |_: &[OptTensor]| Err(Error::invalid("optim", "upload", "injected failure"));
        assert!(refresh_table(&mut descs, &mut stale, &[(1, 3)], failing).is_err());
        refresh_table(&mut descs, &mut stale, &[(1, 3)], |_| {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(
            calls, 1,
            "a moved gradient must be uploaded once the earlier upload failed"
        );
        assert_eq!(descs[0].grad, 3);
    }
}
