//! Host tensors: a shape and a row-major `Vec<f32>`.
//!
//! Ops take plain slices plus a parameter struct (so the same call shape
//! works for host and device buffers); `Tensor` is the owning convenience the
//! layers and the training loop pass around.

use crate::error::{Error, Result, checked_product};

/// A dense, row-major f32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor from its shape and data; the data length must match the shape.
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n = checked_product("Tensor::new", "shape", shape)?;
        if n != data.len() {
            return Err(Error::shape(
                "Tensor::new",
                format!("data length for shape {shape:?}"),
                n,
                data.len(),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        let n = checked_product("Tensor::zeros", "shape", shape)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; n],
        })
    }

    /// A tensor filled with `value`.
    pub fn full(shape: &[usize], value: f32) -> Result<Self> {
        let n = checked_product("Tensor::full", "shape", shape)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            data: vec![value; n],
        })
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The elements, row-major, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The elements, consuming the tensor.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        let n = checked_product("Tensor::reshape", "shape", shape)?;
        if n != self.data.len() {
            return Err(Error::shape(
                "Tensor::reshape",
                format!("element count of {shape:?} (from {:?})", self.shape),
                self.data.len(),
                n,
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data: self.data,
        })
    }
}
