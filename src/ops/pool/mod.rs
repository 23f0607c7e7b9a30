//! 2-D max pooling on NCHW.
//!
//! ```text
//! y[n,c,oy,ox] = max over the window rows oy*stride_h - pad_top + [0, pool_h)
//!                                  cols ox*stride_w - pad_left + [0, pool_w)
//! ```
//!
//! Padding follows Keras ([`Padding`], the same rule as convolution): `same`
//! gives `OH = ceil(H / stride)` with the odd extra padded row at the bottom
//! (column at the right). Padded cells count as `-inf`: they are never
//! selected, and under Keras's rule every window holds at least one real
//! cell (the top padding is at most `(pool-1)/2`, and the last window starts
//! at `(OH-1)*stride - pad_top <= H-1`). [`MaxPool2d::validate`] enforces
//! the condition that guarantees it (`pad < pool`, `out` consistent), so a
//! hand-built value cannot produce an all-padding window either.
//!
//! `argmax[n,c,oy,ox]` is the index `iy*W + ix` of the selected element
//! *within its image plane* `(n, c)` (not within the whole input), as u32.
//! Ties select the first maximum in row-major order (the gradient goes
//! there, as in Keras). A NaN in the window makes the output NaN and the
//! argmax points at the first NaN.

pub mod cpu;
pub mod cuda;

use crate::error::{Error, Result, check_len, checked_product};
pub use crate::ops::conv::Padding;
use crate::ops::conv::keras_dim;

/// The sizes of one max-pooling layer over one batch. Mirrored in the kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxPool2d {
    /// Images in the batch (may be 0).
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Window height.
    pub pool_h: usize,
    /// Window width.
    pub pool_w: usize,
    /// Vertical stride (>= 1).
    pub stride_h: usize,
    /// Horizontal stride (>= 1).
    pub stride_w: usize,
    /// Padded (-inf) rows above the image; less than `pool_h`.
    pub pad_top: usize,
    /// Padded rows below the image; less than `pool_h`.
    pub pad_bottom: usize,
    /// Padded columns left of the image; less than `pool_w`.
    pub pad_left: usize,
    /// Padded columns right of the image; less than `pool_w`.
    pub pad_right: usize,
    /// Output height: `(h + pad_top + pad_bottom - pool_h) / stride_h + 1`.
    pub out_h: usize,
    /// Output width: `(w + pad_left + pad_right - pool_w) / stride_w + 1`.
    pub out_w: usize,
}

impl MaxPool2d {
    /// A layer with Keras padding: `x` is `[N, C, H, W]`, `pool` `[pool_h,
    /// pool_w]`, `stride` `[stride_h, stride_w]`.
    pub fn new(
        x: [usize; 4],
        pool: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
    ) -> Result<Self> {
        const OP: &str = "maxpool2d.new";
        let [n, c, h, w] = x;
        let (out_h, pad_top, pad_bottom) =
            keras_dim(OP, "pool height", h, pool[0], stride[0], padding)?;
        let (out_w, pad_left, pad_right) =
            keras_dim(OP, "pool width", w, pool[1], stride[1], padding)?;
        let p = MaxPool2d {
            n,
            c,
            h,
            w,
            pool_h: pool[0],
            pool_w: pool[1],
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

    /// Keras's default: the stride equals the pool size.
    pub fn keras(x: [usize; 4], pool: [usize; 2], padding: Padding) -> Result<Self> {
        Self::new(x, pool, pool, padding)
    }

    /// Checks positive sizes (except `n`), strides >= 1, padding smaller than
    /// the window, `out_h`/`out_w` consistent, and that buffer sizes and
    /// plane indices fit (`H*W <= 2^32` for the u32 argmax).
    pub fn validate(&self, op: &'static str) -> Result<()> {
        for (name, arg, v) in [
            ("channels c", "shape", self.c),
            ("height h", "shape", self.h),
            ("width w", "shape", self.w),
            ("pool_h", "window", self.pool_h),
            ("pool_w", "window", self.pool_w),
            ("stride_h", "stride", self.stride_h),
            ("stride_w", "stride", self.stride_w),
        ] {
            if v == 0 {
                return Err(Error::invalid(
                    op,
                    arg,
                    format!("{name} is 0; expected at least 1"),
                ));
            }
        }
        if self.pad_top.max(self.pad_bottom) >= self.pool_h
            || self.pad_left.max(self.pad_right) >= self.pool_w
        {
            return Err(Error::invalid(
                op,
                "padding",
                format!(
                    "padding (top {}, bottom {}, left {}, right {}) must be smaller than the \
                     pool {}x{} so that no window is all padding",
                    self.pad_top,
                    self.pad_bottom,
                    self.pad_left,
                    self.pad_right,
                    self.pool_h,
                    self.pool_w
                ),
            ));
        }
        let ph = self
            .h
            .checked_add(self.pad_top)
            .and_then(|v| v.checked_add(self.pad_bottom))
            .ok_or_else(|| Error::invalid(op, "shape", "padded height overflows"))?;
        let pw = self
            .w
            .checked_add(self.pad_left)
            .and_then(|v| v.checked_add(self.pad_right))
            .ok_or_else(|| Error::invalid(op, "shape", "padded width overflows"))?;
        if self.pool_h > ph || self.pool_w > pw {
            return Err(Error::invalid(
                op,
                "window",
                format!(
                    "pool {}x{} is larger than the padded input {ph}x{pw}",
                    self.pool_h, self.pool_w
                ),
            ));
        }
        let oh = (ph - self.pool_h) / self.stride_h + 1;
        let ow = (pw - self.pool_w) / self.stride_w + 1;
        if (self.out_h, self.out_w) != (oh, ow) {
            return Err(Error::shape(
                op,
                "output size (out_h x out_w)",
                format!("{oh}x{ow}"),
                format!("{}x{}", self.out_h, self.out_w),
            ));
        }
        let plane = checked_product(op, "image plane", &[self.h, self.w])?;
        if plane - 1 > u32::MAX as usize {
            return Err(Error::invalid(
                op,
                "shape",
                format!(
                    "image plane {}x{} has more than 2^32 elements; the u32 argmax cannot index it",
                    self.h, self.w
                ),
            ));
        }
        checked_product(op, "input", &[self.n, self.c, self.h, self.w])?;
        checked_product(op, "output", &[self.n, self.c, oh, ow])?;
        Ok(())
    }

    /// Elements of `x`: `N*C*H*W`.
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Elements of `y` and of `argmax`: `N*C*OH*OW`.
    pub fn y_len(&self) -> usize {
        self.n * self.c * self.out_h * self.out_w
    }

    /// The checks of `forward` (op `maxpool2d.forward`), shared by both
    /// backends.
    pub fn check_forward(&self, x: usize, y: usize, argmax: usize) -> Result<()> {
        const OP: &str = "maxpool2d.forward";
        self.validate(OP)?;
        self.check_x(OP, "x", x)?;
        self.check_y(OP, "y", y)?;
        self.check_y(OP, "argmax", argmax)
    }

    /// The checks of `forward_inference` (op `maxpool2d.forward_inference`).
    pub fn check_forward_inference(&self, x: usize, y: usize) -> Result<()> {
        const OP: &str = "maxpool2d.forward_inference";
        self.validate(OP)?;
        self.check_x(OP, "x", x)?;
        self.check_y(OP, "y", y)
    }

    /// The length checks of `backward` (op `maxpool2d.backward`).
    pub fn check_backward(&self, dy: usize, argmax: usize, dx: usize) -> Result<()> {
        const OP: &str = "maxpool2d.backward";
        self.validate(OP)?;
        self.check_y(OP, "dy", dy)?;
        self.check_y(OP, "argmax", argmax)?;
        self.check_x(OP, "dx", dx)
    }

    /// Checks the length of `x` (or `dx`).
    pub fn check_x(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        check_len(op, &format!("{what} [N*C*H*W]"), len, self.x_len())
    }

    /// Checks the length of `y`, `dy` or `argmax`.
    pub fn check_y(&self, op: &'static str, what: &str, len: usize) -> Result<()> {
        check_len(op, &format!("{what} [N*C*OH*OW]"), len, self.y_len())
    }
}
