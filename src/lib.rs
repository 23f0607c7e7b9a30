//! kestrel: hand-written CUDA kernels for training convolutional networks,
//! a rayon CPU reference backend that every kernel is checked against, and a
//! small Keras-like training loop on top.
//!
//! Layout: [`ops`] holds one folder per op family (parameters, CPU reference,
//! CUDA launches); [`tensor`] the host tensor; [`data`] the data sets and
//! their loaders; [`error`] the one error type.
//! Activations are NCHW, conv weights OIHW, matrices row-major, f32 throughout.

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod cuda;
pub mod data;
pub mod error;
pub mod nn;
pub mod ops;
pub mod run;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::Tensor;
