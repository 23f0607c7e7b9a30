//! 2-D convolution through im2col / col2im and GEMM, and on the CPU for
//! stride 1 also as the shifted-rows GEMM over the padded input or as
//! tiles of output channels x pixels with the taps clipped to the input
//! ([`cpu::CpuConvAlgo`]).
//!
//! As in Keras and cuDNN this is cross-correlation (the kernel is not
//! flipped):
//!
//! ```text
//! y[n,k,oy,ox] = bias[k] + sum_{c,r,s} w[k,c,r,s] * x[n, c, oy*stride_h + r - pad_top,
//!                                                          ox*stride_w + s - pad_left]
//! ```
//!
//! where `x` outside the image reads as 0. Shapes: `x` is NCHW `[N, C, H, W]`,
//! `w` is OIHW `[K, C, R, S]`, `y` is `[N, K, OH, OW]`, all dense row-major.
//!
//! Padding follows Keras ([`Padding`]): `valid` uses none and needs the
//! kernel to fit; `same` gives `OH = ceil(H / stride)` and pads
//! `max((OH-1)*stride + R - H, 0)` in total, `total/2` at the top and the odd
//! extra pixel at the bottom (likewise left/right). [`Conv2d::with_pads`]
//! takes explicit padding instead.
//!
//! `N` may be 0 (an empty batch): every function then only checks the other
//! lengths and writes nothing (except `dw`, the sum over no images, which is
//! zeroed).

pub mod cpu;
#[cfg(target_arch = "x86_64")]
mod cpu_channel_vectors;
#[cfg(target_arch = "x86_64")]
mod cpu_direct;
pub mod cuda;

use crate::error::{Error, Result, check_len, checked_product};

/// Keras padding modes for convolution and pooling. Mirrored in the kernels.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Padding {
    /// No padding; the window must fit inside the input.
    Valid = 0,
    /// `out = ceil(in / stride)`; the padding is split with the odd extra
    /// pixel at the bottom/right.
    Same = 1,
}

/// One spatial dimension under Keras's padding rule: `(out, pad_before,
/// pad_after)` for an input of `input` pixels, a window of `window` and the
/// given stride. `what` names the window in errors (`"kernel height"`).
pub fn keras_dim(
    op: &'static str,
    what: &str,
    input: usize,
    window: usize,
    stride: usize,
    padding: Padding,
) -> Result<(usize, usize, usize)> {
    if window == 0 {
        return Err(Error::invalid(
            op,
            "window",
            format!("{what} is 0; expected at least 1"),
        ));
    }
    if stride == 0 {
        return Err(Error::invalid(
            op,
            "stride",
            format!("stride for the {what} is 0; expected at least 1"),
        ));
    }
    if input == 0 {
        return Err(Error::invalid(
            op,
            "shape",
            format!("input extent along the {what} is 0; expected at least 1"),
        ));
    }
    match padding {
        Padding::Valid => {
            if window > input {
                return Err(Error::invalid(
                    op,
                    "window",
                    format!(
                        "{what} {window} is larger than the input {input} with valid padding \
                         (expected at most {input})"
                    ),
                ));
            }
            Ok(((input - window) / stride + 1, 0, 0))
        }
        Padding::Same => {
            let out = input.div_ceil(stride);
            // (out-1)*stride <= input-1, so this neither overflows nor exceeds window-1.
            let total = ((out - 1) * stride + window).saturating_sub(input);
            Ok((out, total / 2, total - total / 2))
        }
    }
}

/// Output extent for explicit padding, or an error when the window does not
/// fit in the padded input.
fn explicit_dim(
    op: &'static str,
    what: &str,
    input: usize,
    window: usize,
    stride: usize,
    pads: (usize, usize),
) -> Result<usize> {
    let padded = input
        .checked_add(pads.0)
        .and_then(|v| v.checked_add(pads.1))
        .filter(|&v| v <= isize::MAX as usize)
        .ok_or_else(|| Error::invalid(op, "padding", format!("padded {what} overflows")))?;
    if window > padded {
        return Err(Error::invalid(
            op,
            "window",
            format!(
                "{what} {window} is larger than the padded input {padded} \
                 (input {input} + padding {} + {})",
                pads.0, pads.1
            ),
        ));
    }
    Ok((padded - window) / stride + 1)
}

/// The sizes of one convolution layer over one batch. Mirrored in the kernels.
///
/// Build it with [`Conv2d::new`] (Keras padding) or [`Conv2d::with_pads`];
/// the functions re-check it with [`Conv2d::validate`], so a hand-built value
/// with inconsistent fields is an error, never a panic.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2d {
    /// Images in the batch (may be 0).
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels (filters).
    pub k: usize,
    /// Kernel height.
    pub r: usize,
    /// Kernel width.
    pub s: usize,
    /// Vertical stride (>= 1).
    pub stride_h: usize,
    /// Horizontal stride (>= 1).
    pub stride_w: usize,
    /// Zero rows above the image.
    pub pad_top: usize,
    /// Zero rows below the image.
    pub pad_bottom: usize,
    /// Zero columns left of the image.
    pub pad_left: usize,
    /// Zero columns right of the image.
    pub pad_right: usize,
    /// Output height: `(h + pad_top + pad_bottom - r) / stride_h + 1`.
    pub out_h: usize,
    /// Output width: `(w + pad_left + pad_right - s) / stride_w + 1`.
    pub out_w: usize,
}

impl Conv2d {
    /// A layer with Keras padding. `x` is the input shape `[N, C, H, W]`,
    /// `k` the number of filters, `kernel` `[R, S]`, `stride` `[stride_h,
    /// stride_w]`.
    pub fn new(
        x: [usize; 4],
        k: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
    ) -> Result<Self> {
        const OP: &str = "conv2d.new";
        let [n, c, h, w] = x;
        let (out_h, pad_top, pad_bottom) =
            keras_dim(OP, "kernel height", h, kernel[0], stride[0], padding)?;
        let (out_w, pad_left, pad_right) =
            keras_dim(OP, "kernel width", w, kernel[1], stride[1], padding)?;
        let p = Conv2d {
            n,
            c,
            h,
            w,
            k,
            r: kernel[0],
            s: kernel[1],
            stride_h: stride[0],
            stride_w: stride[1],
            pad_top,
            pad_bottom,
            pad_left,
            pad_right,
            out_h,
            out_w,
        };
        p.validate(OP)?;
        Ok(p)
    }

    /// A layer with explicit zero padding `pads = [top, bottom, left, right]`.
    pub fn with_pads(
        x: [usize; 4],
        k: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
    ) -> Result<Self> {
        const OP: &str = "conv2d.with_pads";
        let [n, c, h, w] = x;
        check_positive(
            OP,
            "stride",
            &[("stride_h", stride[0]), ("stride_w", stride[1])],
        )?;
        check_positive(
            OP,
            "window",
            &[("kernel height", kernel[0]), ("kernel width", kernel[1])],
        )?;
        let out_h = explicit_dim(
            OP,
            "kernel height",
            h,
            kernel[0],
            stride[0],
            (pads[0], pads[1]),
        )?;
        let out_w = explicit_dim(
            OP,
            "kernel width",
            w,
            kernel[1],
            stride[1],
            (pads[2], pads[3]),
        )?;
        let p = Conv2d {
            n,
            c,
            h,
            w,
            k,
            r: kernel[0],
            s: kernel[1],
            stride_h: stride[0],
            stride_w: stride[1],
            pad_top: pads[0],
            pad_bottom: pads[1],
            pad_left: pads[2],
            pad_right: pads[3],
            out_h,
            out_w,
        };
        p.validate(OP)?;
        Ok(p)
    }

    /// Checks that every size is positive (except `n`), the strides are at
    /// least 1, `out_h`/`out_w` agree with the padding, and every buffer
    /// size fits in `usize`. After this the length methods are exact.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        check_positive(
            op,
            "shape",
            &[
                ("channels c", self.c),
                ("height h", self.h),
                ("width w", self.w),
                ("filters k", self.k),
            ],
        )?;
        check_positive(
            op,
            "window",
            &[("kernel height r", self.r), ("kernel width s", self.s)],
        )?;
        check_positive(
            op,
            "stride",
            &[("stride_h", self.stride_h), ("stride_w", self.stride_w)],
        )?;
        let oh = explicit_dim(
            op,
            "kernel height",
            self.h,
            self.r,
            self.stride_h,
            (self.pad_top, self.pad_bottom),
        )?;
        let ow = explicit_dim(
            op,
            "kernel width",
            self.w,
            self.s,
            self.stride_w,
            (self.pad_left, self.pad_right),
        )?;
        if (self.out_h, self.out_w) != (oh, ow) {
            return Err(Error::shape(
                op,
                "output size (out_h x out_w)",
                format!("{oh}x{ow}"),
                format!("{}x{}", self.out_h, self.out_w),
            ));
        }
        checked_product(op, "input", &[self.n, self.c, self.h, self.w])?;
        checked_product(op, "input image", &[self.c, self.h, self.w])?;
        checked_product(op, "weights", &[self.k, self.c, self.r, self.s])?;
        checked_product(op, "output", &[self.n, self.k, oh, ow])?;
        checked_product(op, "output image", &[self.k, oh, ow])?;
        checked_product(
            op,
            "column matrix",
            &[self.c, self.r, self.s, self.n, oh, ow],
        )?;
        checked_product(
            op,
            "column matrix of one image",
            &[self.c, self.r, self.s, oh, ow],
        )?;
        Ok(())
    }

    /// Elements of `x`: `N*C*H*W`.
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Elements of `w`: `K*C*R*S`.
    pub fn w_len(&self) -> usize {
        self.k * self.c * self.r * self.s
    }

    /// Elements of `y`: `N*K*OH*OW`.
    pub fn y_len(&self) -> usize {
        self.n * self.k * self.out_h * self.out_w
    }

    /// Rows of the column matrix: `C*R*S` (the GEMM's inner dimension).
    pub fn col_rows(&self) -> usize {
        self.c * self.r * self.s
    }

    /// Columns of the column matrix: `N*OH*OW`.
    pub fn col_cols(&self) -> usize {
        self.n * self.out_h * self.out_w
    }

    /// Elements of the column matrix of the whole batch: `C*R*S*N*OH*OW`.
    pub fn col_len(&self) -> usize {
        self.col_rows() * self.col_cols()
    }

    /// Multiply-adds times 2 of the forward pass (backward data and backward
    /// filter cost the same).
    pub fn flops(&self) -> f64 {
        2.0 * self.y_len() as f64 * self.col_rows() as f64
    }

    /// The same layer over `n` images (used to process a batch in chunks).
    pub fn with_batch(&self, n: usize) -> Self {
        Conv2d { n, ..*self }
    }

    /// The checks of `im2col` (op `conv2d.im2col`), shared by both backends.
    pub fn check_im2col(&self, x: usize, col: usize) -> Result<()> {
        const OP: &str = "conv2d.im2col";
        self.validate(OP)?;
        self.check_x(OP, "x", x)?;
        self.check_col(OP, col)
    }

    /// The checks of `col2im` (op `conv2d.col2im`).
    pub fn check_col2im(&self, col: usize, x: usize) -> Result<()> {
        const OP: &str = "conv2d.col2im";
        self.validate(OP)?;
        self.check_col(OP, col)?;
        self.check_x(OP, "x", x)
    }

    /// The checks of `forward` (op `conv2d.forward`).
    pub fn check_forward(&self, x: usize, w: usize, bias: Option<usize>, y: usize) -> Result<()> {
        const OP: &str = "conv2d.forward";
        self.validate(OP)?;
        self.check_x(OP, "x", x)?;
        self.check_w(OP, "w", w)?;
        if let Some(b) = bias {
            self.check_bias(OP, b)?;
        }
        self.check_y(OP, "y", y)
    }

    /// The checks of `backward_data` (op `conv2d.backward_data`).
    pub fn check_backward_data(&self, dy: usize, w: usize, dx: usize) -> Result<()> {
        const OP: &str = "conv2d.backward_data";
        self.validate(OP)?;
        self.check_y(OP, "dy", dy)?;
        self.check_w(OP, "w", w)?;
        self.check_x(OP, "dx", dx)
    }

    /// The checks of `backward_filter` (op `conv2d.backward_filter`).
    pub fn check_backward_filter(&self, x: usize, dy: usize, dw: usize) -> Result<()> {
        const OP: &str = "conv2d.backward_filter";
        self.validate(OP)?;
        self.check_x(OP, "x", x)?;
        self.check_y(OP, "dy", dy)?;
        self.check_w(OP, "dw", dw)
    }

    /// Checks the length of `x` (or `dx`).
    pub fn check_x(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        check_len(op, &format!("{what} [N*C*H*W]"), len, self.x_len())
    }

    /// Checks the length of `w` (or `dw`).
    pub fn check_w(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        check_len(op, &format!("{what} [K*C*R*S]"), len, self.w_len())
    }

    /// Checks the length of `y` (or `dy`).
    pub fn check_y(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        check_len(op, &format!("{what} [N*K*OH*OW]"), len, self.y_len())
    }

    /// Checks the length of a column matrix.
    pub fn check_col(&self, op: &'static str, len: usize) -> Result<()> {
        check_len(op, "col [C*R*S x N*OH*OW]", len, self.col_len())
    }

    /// Checks the length of a per-output-channel bias.
    pub fn check_bias(&self, op: &'static str, len: usize) -> Result<()> {
        check_len(op, "bias [K]", len, self.k)
    }
}

fn check_positive(op: &'static str, arg: &'static str, dims: &[(&str, usize)]) -> Result<()> {
    for &(name, v) in dims {
        if v == 0 {
            return Err(Error::invalid(
                op,
                arg,
                format!("{name} is 0; expected at least 1"),
            ));
        }
    }
    Ok(())
}
