//! The op set. Each family is a folder: `mod.rs` holds its parameters (in
//! `#[repr(C)]` structs where a kernel takes them), shape checks and the
//! documentation of its semantics; `cpu.rs` is the rayon reference;
//! `cuda.rs` the kernel launches, which take their inputs as
//! `&CudaView<f32>` and outputs as `&mut CudaViewMut<f32>` and check every
//! length before launching.

pub mod activation;
pub mod batchnorm;
pub mod bias;
pub mod conv;
pub mod dropout;
pub mod gemm;
mod lanes;
pub mod loss;
pub mod optim;
pub mod pool;
