//! The op set. Each family is a folder: `mod.rs` holds its parameters (in
//! `#[repr(C)]` structs where a kernel takes them), shape checks and the
//! documentation of its semantics; `cpu.rs` is the rayon reference;
//! `cuda.rs` (with the `cuda` feature) the kernel launches.

pub mod activation;
pub mod bias;
pub mod gemm;
pub mod loss;
pub mod optim;
