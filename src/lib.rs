//! kestrel: hand-written CUDA kernels for training convolutional networks,
//! a rayon CPU reference backend that every kernel is checked against, and a
//! small Keras-like training loop on top.
//!
//! Layout, bottom up:
//! - [`ops`]: one folder per op family: its parameters and shape checks, the
//!   rayon CPU reference (`cpu.rs`) and the CUDA launches (`cuda.rs`);
//! - [`cuda`]: a handle on a device (its context and stream, kestrel's own
//!   or a caller's) and the PTX modules built from `kernels/*.cu`;
//! - [`backend`]: the `Backend` trait the layers are written against, with
//!   the CPU and CUDA implementations and the device selection;
//! - [`nn`] (layers, `Sequential`, weights files) and [`train`] (compile,
//!   fit, evaluate, callbacks, checkpoints): the Keras-like loop;
//! - [`data`]: Fashion-MNIST and CIFAR-10 loaders; [`run`] and [`cli`]: the
//!   run configs and the `kestrel` command;
//! - [`error`]: the one error type.
//!
//! Activations are NCHW, conv weights OIHW, matrices row-major, f32 throughout.
//!
//! # Layering
//!
//! A GEMM from a layer passes through these files, and a framework can
//! enter at the third:
//!
//! 1. [`backend::Backend::gemm`] (`src/backend/mod.rs`): the trait method the
//!    layers call, on host tensors ([`backend::CpuBackend`]) or device
//!    buffers ([`backend::GpuBackend`]), the bias an [`ops::gemm::Bias`] of
//!    the backend's buffer type;
//! 2. `src/backend/cuda.rs` ([`backend::GpuBackend`]): glue, the
//!    [`backend::cuda::GpuBuf`]s and the bias mapped to cudarc views
//!    (`bias.map(GpuBuf::view)`: the same [`ops::gemm::Bias`], no second
//!    type), and the cached split-K workspace (grown, sliced to
//!    [`ops::gemm::cuda::select_workspace_len`]);
//! 3. `src/ops/gemm/cuda.rs`: [`ops::gemm::cuda::gemm_ws`] (with the split-K
//!    workspace the backend keeps; [`ops::gemm::cuda::gemm`] without one) =
//!    [`ops::gemm::cuda::gemm_with`] on the version
//!    [`ops::gemm::cuda::select_ws`] picks (a
//!    [`ops::gemm::cuda::GemmKernel`]: `Tiled64`, `Tiled128`, `V2`,
//!    `V2SplitK`, and the opt-in TF32 `Tf32MmaSync` and `Tf32Wgmma` (sm_90a,
//!    compute capability 9.0 exactly) that only
//!    [`ops::gemm::cuda::select_with`] with [`ops::gemm::Precision::Tf32`]
//!    picks, each knowing its kernel name, precision, minimum compute
//!    capability and [`ops::gemm::cuda::workspace_len`]); the checks are the
//!    CPU reference's ([`ops::gemm::Gemm::check`], shared with
//!    [`ops::gemm::cpu::gemm`]), then the grid, the `#[repr(C)]` parameters
//!    and the bias's [`ops::gemm::Bias::kernel_kind`], on a
//!    [`cuda::CudaBackend`]'s stream;
//! 4. the kernel (`gemm_64x64` / `gemm_128x128` of `kernels/gemm.cu`, or
//!    `gemm_v2_128x128` / `gemm_v2_splitk` of `kernels/gemm_v2.cu`), from
//!    the PTX module that [`cuda::CudaBackend::function`] loads once per
//!    context.
//!
//! Before the versions became data the files were the same, but level 2
//! rebuilt the bias twice (`backend::GemmBias` to `DeviceBias`), and level
//! 3 chose the tile shape with an `if` inside its launch and turned the
//! bias into kernel constants of its own: four bias types for one concept.
//! Convolution has the same shape: [`ops::conv::cuda::ConvAlgo`] (today
//! only `Im2colGemm`), [`ops::conv::cuda::select`], and
//! [`ops::conv::cuda::forward_with`] & co.
//!
//! Every op family has the same levels (`ops::<family>::cuda`), and the
//! same versions-as-data form ([`cuda::KernelVersion`]): an enum of its
//! kernel versions (`PoolKernel`, `BatchNormKernel`, ... with one version
//! each today), a `select(params, info)`, and a `*_with` form of every
//! launching entry point that runs the version a caller names; the GPU
//! tests draw every version. A new version is a variant and a `.cu` in one
//! op folder.
//! A framework that owns its context, stream and buffers skips the first
//! two: [`cuda::CudaBackend::from_stream`] wraps its cudarc stream, and the
//! `ops::*::cuda` functions then enqueue on that stream, on its buffers
//! (cudarc views); the type's docs say which of them synchronize and
//! which allocate. Where an op needs device scratch (batch norm, the bias
//! gradient and sums, the losses and metrics), the framework owns that too:
//! a scratch type per family sized by `lens`/`bytes` for given parameters,
//! allocated once by its `new`, passed as `&mut` to every call and checked
//! there (too small is an error, not a panic); GEMM's shared-operand
//! gradients and convolution take a plain `f32` workspace of the caller's
//! (`gemm::cuda::backward_workspace_len`, `conv::cuda::workspace_len` /
//! `min_workspace_len`). Level 2 keeps one of each, grown to the largest
//! parameters seen, so a training step allocates nothing. Only the
//! functions named `*_alloc` allocate (a convenience for one-off calls).
//! `examples/gpu_own_stream.rs` is such a program.

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod cpu_isa;
pub mod cpu_pool;
pub mod cuda;
pub mod data;
pub mod error;
pub mod nn;
pub mod ops;
pub mod run;
pub mod train;

pub use error::{Error, Result};
