//! kestrel: hand-written CUDA kernels for training convolutional networks,
//! a rayon CPU reference backend that every kernel is checked against, and a
//! small Keras-like training loop on top.
//!
//! Layout, bottom up:
//! - [`ops`]: one folder per op family: its parameters and shape checks, the
//!   rayon CPU reference (`cpu.rs`) and the CUDA launches (`cuda.rs`);
//! - [`cuda`]: the device, the stream and the PTX modules built from
//!   `kernels/*.cu`;
//! - [`backend`]: the `Backend` trait the layers are written against, with
//!   the CPU and CUDA implementations and the device selection;
//! - [`nn`] (layers, `Sequential`, weights files) and [`train`] (compile,
//!   fit, evaluate, callbacks, checkpoints): the Keras-like loop;
//! - [`data`]: Fashion-MNIST and CIFAR-10 loaders; [`run`] and [`cli`]: the
//!   run configs and the `kestrel` command;
//! - [`error`]: the one error type.
//!
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
pub mod train;

pub use error::{Error, Result};
