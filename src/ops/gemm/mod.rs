//! GEMM: `C = act(alpha * op(A) * op(B) + beta * C + bias)`, row-major, with
//! transpose flags, leading dimensions, an optional strided batch, and an
//! optional fused epilogue (bias per row or per column, then an activation).
//!
//! Shapes (per batch item): `op(A)` is `m x k`, `op(B)` is `k x n`, `C` is
//! `m x n`. `A` is stored `m x k` (row stride `lda >= k`) or, transposed,
//! `k x m` (`lda >= m`); likewise `B`. `C` has row stride `ldc >= n`.
//! Batch item `i` starts at `i * stride_a` in `A` (and so on); a stride of 0
//! shares one matrix across the batch (conv weights, for example).
//!
//! Conventions, as in BLAS: when `beta == 0`, `C` is not read (NaN there does
//! not leak into the result); `k == 0` gives `C = act(beta * C + bias)`.
//!
//! On the host: [`cpu::gemm`] (blocked, packed, AVX2+FMA where the CPU has
//! it, rayon-parallel, bit-identical on any thread count),
//! [`cpu::gemm_portable`] (the same without SIMD intrinsics) and
//! [`cpu::gemm_backward`] (dA and dB of the linear part).

pub mod cpu;
pub mod cuda;

use crate::error::{Error, Result, checked_product};
use crate::ops::activation::Activation;

/// The arithmetic a GEMM's products may use. [`Precision::F32`] is the
/// default everywhere; a faster mode is used only when a caller asks for it
/// by name, and every result it produces names it (the kernel version's
/// name says `tf32`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 operands and products, accumulation in f32 (the CPU reference's
    /// arithmetic).
    #[default]
    F32,
    /// Tensor-core TF32: each operand rounded to 10 mantissa bits (round to
    /// nearest, ties away from zero; unit roundoff 2^-11), products
    /// accumulated in f32. Each product is off by up to about 2^-10 of its
    /// magnitude, so results differ from [`Precision::F32`] by up to about
    /// `2^-10 * sum |a_i * b_i|` per element. Opt-in only (sm_80 and newer).
    Tf32,
}

impl Precision {
    /// A short name for reports: `"f32"` or `"tf32"`.
    pub const fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
        }
    }
}

/// The sizes and scalars of one (batched) GEMM. Mirrored in the kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// Rows of `op(A)` and `C`.
    pub m: usize,
    /// Columns of `op(B)` and `C`.
    pub n: usize,
    /// Columns of `op(A)`, rows of `op(B)`.
    pub k: usize,
    /// Row stride of `A` as stored.
    pub lda: usize,
    /// Row stride of `B` as stored.
    pub ldb: usize,
    /// Row stride of `C`.
    pub ldc: usize,
    /// Number of independent products.
    pub batch: usize,
    /// Elements between consecutive batch items of `A` (0: shared).
    pub stride_a: usize,
    /// Elements between consecutive batch items of `B` (0: shared).
    pub stride_b: usize,
    /// Elements between consecutive batch items of `C`.
    pub stride_c: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the previous `C`.
    pub beta: f32,
    /// `op(A) = A^T`.
    pub trans_a: bool,
    /// `op(B) = B^T`.
    pub trans_b: bool,
}

impl Gemm {
    /// `C = A * B` for dense row-major matrices, no transpose, one batch item.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            m,
            n,
            k,
            lda: k,
            ldb: n,
            ldc: n,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
            trans_a: false,
            trans_b: false,
        }
    }

    /// Sets the transpose flags and the dense leading dimensions that go with them.
    pub fn transpose(mut self, trans_a: bool, trans_b: bool) -> Self {
        self.trans_a = trans_a;
        self.trans_b = trans_b;
        self.lda = if trans_a { self.m } else { self.k };
        self.ldb = if trans_b { self.k } else { self.n };
        self
    }

    /// Sets alpha and beta.
    pub fn scale(mut self, alpha: f32, beta: f32) -> Self {
        self.alpha = alpha;
        self.beta = beta;
        self
    }

    /// Makes it a batch of `batch` dense products laid out back to back
    /// (strides `m*k`, `k*n`, `m*n`); set a stride to 0 afterwards to share.
    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self.stride_a = self.m * self.k;
        self.stride_b = self.k * self.n;
        self.stride_c = self.m * self.n;
        self
    }

    /// Rows and columns of `A` as stored.
    pub fn a_dims(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// Rows and columns of `B` as stored.
    pub fn b_dims(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Floating-point operations of the whole call (2 per multiply-add).
    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.m as f64 * self.n as f64 * self.k as f64
    }

    /// Checks leading dimensions and the lengths of `a`, `b`, `c` and the
    /// bias (its vector's length: `bias.map(|v| v.len())`).
    pub fn check(
        &self,
        op: &'static str,
        a: usize,
        b: usize,
        c: usize,
        bias: Bias<usize>,
    ) -> Result<()> {
        let (ar, ac) = self.a_dims();
        let (br, bc) = self.b_dims();
        check_ld(op, "lda", self.lda, ac)?;
        check_ld(op, "ldb", self.ldb, bc)?;
        check_ld(op, "ldc", self.ldc, self.n)?;
        check_min_len(
            op,
            "A",
            a,
            span(op, self.batch, self.stride_a, ar, ac, self.lda)?,
        )?;
        check_min_len(
            op,
            "B",
            b,
            span(op, self.batch, self.stride_b, br, bc, self.ldb)?,
        )?;
        check_min_len(
            op,
            "C",
            c,
            span(op, self.batch, self.stride_c, self.m, self.n, self.ldc)?,
        )?;
        if self.batch > 1 && self.stride_c < checked_product(op, "C", &[self.m, self.ldc])? {
            // Overlapping outputs would make the result depend on the order of
            // the batch items, which differs between backends.
            if self.m > 0 && self.n > 0 {
                return Err(Error::invalid(
                    op,
                    "stride_c",
                    format!(
                        "batch items of C overlap: stride_c {} < m*ldc {}",
                        self.stride_c,
                        self.m * self.ldc
                    ),
                ));
            }
        }
        match bias {
            Bias::None => Ok(()),
            Bias::PerRow(len) => crate::error::check_len(op, "bias (per row, m)", len, self.m),
            Bias::PerCol(len) => crate::error::check_len(op, "bias (per column, n)", len, self.n),
        }
    }
}

fn check_ld(op: &'static str, name: &'static str, ld: usize, cols: usize) -> Result<()> {
    if ld < cols.max(1) {
        return Err(Error::invalid(
            op,
            name,
            format!(
                "leading dimension {ld} is smaller than the row length {cols} (at least max(cols, 1))"
            ),
        ));
    }
    Ok(())
}

fn check_min_len(op: &'static str, what: &str, got: usize, need: usize) -> Result<()> {
    if got < need {
        return Err(Error::shape(
            op,
            format!("{what} length"),
            format!("at least {need}"),
            got,
        ));
    }
    Ok(())
}

/// Elements a batch of `rows x cols` matrices with row stride `ld` spans.
fn span(
    op: &'static str,
    batch: usize,
    stride: usize,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<usize> {
    if batch == 0 || rows == 0 || cols == 0 {
        return Ok(0);
    }
    let last = checked_product(op, "batch stride", &[batch - 1, stride])?;
    let inner = checked_product(op, "rows", &[rows - 1, ld])?;
    last.checked_add(inner)
        .and_then(|s| s.checked_add(cols))
        .ok_or_else(|| Error::invalid(op, "shape", "matrix span overflows usize"))
}

/// A bias fused into the GEMM's epilogue, added before the activation: the
/// one bias type of every level, generic over where the vector lives.
///
/// - `Bias<&[f32]>` on the host ([`cpu::gemm`]);
/// - `Bias<&CudaView<f32>>` on the device ([`cuda::gemm`], a caller's
///   cudarc views);
/// - `Bias<&B::Buf>` in [`crate::backend::Backend::gemm`], the backend's
///   buffer type;
/// - `Bias<usize>` (the vector's length) for [`Gemm::check`].
///
/// [`Bias::kernel_kind`] is the `bias_kind` argument of the kernel
/// (`enum BiasKind` in `kernels/gemm.cu`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bias<B> {
    /// No bias.
    #[default]
    None,
    /// One value per row of `C` (length `m`): conv output channels.
    PerRow(B),
    /// One value per column of `C` (length `n`): dense layer units.
    PerCol(B),
}

impl<B> Bias<B> {
    /// The kernel's `bias_kind` argument, mirroring `enum BiasKind` in
    /// kernels/gemm.cu: 0 none, 1 per row, 2 per column.
    pub const fn kernel_kind(&self) -> u32 {
        match self {
            Bias::None => 0,
            Bias::PerRow(_) => 1,
            Bias::PerCol(_) => 2,
        }
    }

    /// The same bias with the vector converted by `f` (a buffer to its
    /// view, a view to its length).
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> Bias<C> {
        match self {
            Bias::None => Bias::None,
            Bias::PerRow(v) => Bias::PerRow(f(v)),
            Bias::PerCol(v) => Bias::PerCol(f(v)),
        }
    }

    /// The same bias borrowing its vector.
    pub fn as_ref(&self) -> Bias<&B> {
        match self {
            Bias::None => Bias::None,
            Bias::PerRow(v) => Bias::PerRow(v),
            Bias::PerCol(v) => Bias::PerCol(v),
        }
    }

    /// The vector, if there is one.
    pub fn vector(self) -> Option<B> {
        match self {
            Bias::None => None,
            Bias::PerRow(v) | Bias::PerCol(v) => Some(v),
        }
    }
}

/// What the GEMM does to each element of `C` after the product, with the
/// bias vector as a `B` (see [`Bias`]).
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<B> {
    /// Added first.
    pub bias: Bias<B>,
    /// Applied last.
    pub activation: Activation,
}

impl<B> Default for Epilogue<B> {
    fn default() -> Self {
        Epilogue {
            bias: Bias::None,
            activation: Activation::LINEAR,
        }
    }
}

/// The host epilogue of [`cpu::gemm`].
pub type HostEpilogue<'a> = Epilogue<&'a [f32]>;

/// Which buffer of the forward product a gradient GEMM reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// The forward `A`.
    A,
    /// The forward `B`.
    B,
    /// The incoming gradient `dC` (in C's layout).
    Dc,
}

/// One gradient of `C = alpha * op(A) * op(B)` as a GEMM of its own:
/// `out = q.alpha * op(x) * op(y)` with `x`, `y` named by [`Operand`], `q`'s
/// strides already those of `x`, `y` and the output, and `beta = 0`. When
/// `sum_over_batch` (the operand is shared by the batch: stride 0), the
/// output is one matrix that sums the batch items' products in batch order.
///
/// Both backends run these plans, so the transposes and leading dimensions
/// of the backward pass are derived once, here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradGemm {
    /// The product to run.
    pub q: Gemm,
    /// Its first operand.
    pub x: Operand,
    /// Its second operand.
    pub y: Operand,
    /// Whether the output is a sum over the batch items.
    pub sum_over_batch: bool,
}

impl Gemm {
    /// Checks the buffers of a backward pass: the forward's `a`, `b`, `dc`
    /// lengths and those of the requested gradients, which must have their
    /// operand's length and must not have overlapping batch items.
    pub fn check_backward(
        &self,
        op: &'static str,
        a: usize,
        b: usize,
        dc: usize,
        da: Option<usize>,
        db: Option<usize>,
    ) -> Result<()> {
        self.check(op, a, b, dc, Bias::None)?;
        if let Some(da) = da {
            crate::error::check_len(op, "dA (as A)", da, a)?;
            let (rows, _) = self.a_dims();
            self.check_no_overlap(op, "stride_a", self.stride_a, rows, self.lda)?;
        }
        if let Some(db) = db {
            crate::error::check_len(op, "dB (as B)", db, b)?;
            let (rows, _) = self.b_dims();
            self.check_no_overlap(op, "stride_b", self.stride_b, rows, self.ldb)?;
        }
        Ok(())
    }

    /// Rejects batch items of an operand that overlap (but are not all the
    /// same matrix): their gradients could not be written independently.
    fn check_no_overlap(
        &self,
        op: &'static str,
        name: &'static str,
        stride: usize,
        rows: usize,
        ld: usize,
    ) -> Result<()> {
        if self.batch > 1 && stride != 0 && rows > 0 && stride < rows * ld {
            return Err(Error::invalid(
                op,
                name,
                format!(
                    "batch items overlap ({name} {stride} < rows*ld {}), so their gradients cannot \
                     be stored separately; use 0 (shared) or at least {}",
                    rows * ld,
                    rows * ld
                ),
            ));
        }
        Ok(())
    }

    /// `dA`, in A's stored layout: `d op(A) = alpha * dC * op(B)^T` (m x k),
    /// computed transposed (`op(B) * dC^T`) when A is stored transposed.
    pub fn grad_a(&self) -> GradGemm {
        let p = self;
        let (q, x, y) = if !p.trans_a {
            let q = Gemm {
                m: p.m,
                n: p.k,
                k: p.n,
                lda: p.ldc,
                ldb: p.ldb,
                ldc: p.lda,
                trans_a: false,
                trans_b: !p.trans_b,
                stride_a: p.stride_c,
                stride_b: p.stride_b,
                ..*p
            };
            (q, Operand::Dc, Operand::B)
        } else {
            let q = Gemm {
                m: p.k,
                n: p.m,
                k: p.n,
                lda: p.ldb,
                ldb: p.ldc,
                ldc: p.lda,
                trans_a: p.trans_b,
                trans_b: true,
                stride_a: p.stride_b,
                stride_b: p.stride_c,
                ..*p
            };
            (q, Operand::B, Operand::Dc)
        };
        GradGemm {
            q: Gemm {
                stride_c: p.stride_a,
                beta: 0.0,
                ..q
            },
            x,
            y,
            sum_over_batch: p.stride_a == 0 && p.batch != 1,
        }
    }

    /// `dB`, in B's stored layout: `d op(B) = alpha * op(A)^T * dC` (k x n),
    /// computed transposed (`dC^T * op(A)`) when B is stored transposed.
    pub fn grad_b(&self) -> GradGemm {
        let p = self;
        let (q, x, y) = if !p.trans_b {
            let q = Gemm {
                m: p.k,
                n: p.n,
                k: p.m,
                lda: p.lda,
                ldb: p.ldc,
                ldc: p.ldb,
                trans_a: !p.trans_a,
                trans_b: false,
                stride_a: p.stride_a,
                stride_b: p.stride_c,
                ..*p
            };
            (q, Operand::A, Operand::Dc)
        } else {
            let q = Gemm {
                m: p.n,
                n: p.k,
                k: p.m,
                lda: p.ldc,
                ldb: p.lda,
                ldc: p.ldb,
                trans_a: true,
                trans_b: p.trans_a,
                stride_a: p.stride_c,
                stride_b: p.stride_a,
                ..*p
            };
            (q, Operand::Dc, Operand::A)
        };
        GradGemm {
            q: Gemm {
                stride_c: p.stride_b,
                beta: 0.0,
                ..q
            },
            x,
            y,
            sum_over_batch: p.stride_b == 0 && p.batch != 1,
        }
    }
}
