//! CPU activations and softmax (the rayon reference).
//!
//! Element-wise functions apply [`Activation::apply`] / [`Activation::grad`]
//! to every element; they are pure per element, so any split over threads
//! gives bit-identical results. The softmax works row by row, each row
//! sequentially in column order, so it is thread-count independent too.

use rayon::prelude::*;

use super::{Activation, ActivationKind, Softmax};
use crate::cpu_isa::Isa;
use crate::error::Result;

/// Elements per rayon task: large enough that scheduling costs nothing
/// next to the arithmetic, small enough to balance on many cores.
const CHUNK: usize = 1 << 14;

/// Rows per rayon task at least this many elements, so that narrow
/// softmaxes (10 classes) do not spawn a task per row.
const SOFTMAX_MIN_TASK: usize = 1 << 12;

/// Expands `$body` once per activation kind with `$a` an [`Activation`] of
/// that constant kind, so that the per-element `match` in
/// [`Activation::apply`] / [`Activation::grad`] folds away and each loop
/// compiles to branch-free vector selects; with the kind unknown inside the
/// loop LLVM kept the branches (about 3.5 ns per element for relu's
/// backward on random signs). The same function per element: same bits.
macro_rules! by_kind {
    ($act:expr, |$a:ident| $body:expr) => {{
        let act: $crate::ops::activation::Activation = $act;
        match act.kind {
            $crate::ops::activation::ActivationKind::Linear => {
                let $a = $crate::ops::activation::Activation::LINEAR;
                $body
            }
            $crate::ops::activation::ActivationKind::Relu => {
                let $a = $crate::ops::activation::Activation::RELU;
                $body
            }
            $crate::ops::activation::ActivationKind::Elu => {
                let $a = $crate::ops::activation::Activation::elu(act.alpha);
                $body
            }
            $crate::ops::activation::ActivationKind::LeakyRelu => {
                let $a = $crate::ops::activation::Activation::leaky_relu(act.alpha);
                $body
            }
            $crate::ops::activation::ActivationKind::Tanh => {
                let $a = $crate::ops::activation::Activation::TANH;
                $body
            }
            $crate::ops::activation::ActivationKind::Sigmoid => {
                let $a = $crate::ops::activation::Activation::SIGMOID;
                $body
            }
        }
    }};
}

pub(crate) use by_kind;

/// `y = f(x)` element-wise; `y` is fully overwritten.
pub fn forward(act: Activation, x: &[f32], y: &mut [f32]) -> Result<()> {
    const OP: &str = "activation.forward";
    act.check_elementwise(OP, &[("x", x.len()), ("y", y.len())])?;
    let isa = Isa::current();
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| forward_chunk(isa, act, Some(xc), yc));
    Ok(())
}

/// `x = f(x)` in place (the training loop keeps only the output when the
/// backward can use `y` alone; see [`backward_from_output`]).
pub fn forward_inplace(act: Activation, x: &mut [f32]) -> Result<()> {
    act.check("activation.forward_inplace")?;
    let isa = Isa::current();
    x.par_chunks_mut(CHUNK)
        .for_each(|c| forward_chunk(isa, act, None, c));
    Ok(())
}

/// `y = f(x)` over one chunk (`x = None`: in place, `y` holds the input),
/// compiled for `isa`'s vector width. Elu's `expm1` is straight-line
/// arithmetic (`super::expm1`), so the loop vectorizes at every level, and
/// the operations, hence the bits, are the same at each.
pub(crate) fn forward_chunk(isa: Isa, act: Activation, x: Option<&[f32]>, y: &mut [f32]) {
    match isa {
        // SAFETY: `Isa::current` never exceeds what the CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { forward_chunk_avx512(act, x, y) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { forward_chunk_avx2(act, x, y) },
        _ => forward_chunk_portable(act, x, y),
    }
}

#[inline(always)]
fn forward_chunk_portable(act: Activation, x: Option<&[f32]>, y: &mut [f32]) {
    match x {
        Some(x) => by_kind!(act, |a| for (yv, &xv) in y.iter_mut().zip(x) {
            *yv = a.apply(xv);
        }),
        None => by_kind!(act, |a| for v in y.iter_mut() {
            *v = a.apply(*v);
        }),
    }
}

/// [`forward_chunk_portable`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support avx512f, avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn forward_chunk_avx512(act: Activation, x: Option<&[f32]>, y: &mut [f32]) {
    forward_chunk_portable(act, x, y)
}

/// [`forward_chunk_portable`] compiled for AVX2, but relu in place by
/// [`relu_inplace_avx2`].
///
/// # Safety
/// The CPU must support avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_chunk_avx2(act: Activation, x: Option<&[f32]>, y: &mut [f32]) {
    match x {
        None if act.kind == ActivationKind::Relu => relu_inplace_avx2(y),
        // The other kinds keep `x > 0` the same way: through a copy, so that
        // every element is stored (the copy stays in L1).
        None if act.kind != ActivationKind::Linear => {
            let mut copy = [0.0f32; 256];
            for c in y.chunks_mut(copy.len()) {
                let src = &mut copy[..c.len()];
                src.copy_from_slice(c);
                forward_chunk_portable(act, Some(src), c);
            }
        }
        _ => forward_chunk_portable(act, x, y),
    }
}

/// `v = relu(v)` ([`Activation::apply`]'s bits: zero where `v <= 0`, NaN
/// kept) with whole-vector stores. Compiled from the plain loop, an in-place
/// relu stores only its zeros, by AVX2's masked store (`vmaskmovps`), which
/// AMD's Zen cores run microcoded at a fraction of a plain store's rate: 8%
/// of keras-cnn's conv2 forward went there (`docs/perf-log.md`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn relu_inplace_avx2(v: &mut [f32]) {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_ps();
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        let p = c.as_mut_ptr();
        // SAFETY: `c` holds 8 floats; loadu/storeu need no alignment.
        unsafe {
            let x = _mm256_loadu_ps(p);
            // Not-less-or-equal, unordered: true where x > 0 or x is NaN.
            let keep = _mm256_cmp_ps::<_CMP_NLE_UQ>(x, zero);
            _mm256_storeu_ps(p, _mm256_and_ps(x, keep));
        }
    }
    for x in chunks.into_remainder() {
        *x = Activation::RELU.apply(*x);
    }
}

/// `dx = f'(x) * dy` element-wise from the forward's input `x`, its output
/// `y = f(x)` and `dy`; `dx` is fully overwritten. A NaN in `x` gives NaN in
/// `dx` for every kind.
pub fn backward(act: Activation, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    const OP: &str = "activation.backward";
    act.check_elementwise(
        OP,
        &[
            ("x", x.len()),
            ("y", y.len()),
            ("dy", dy.len()),
            ("dx", dx.len()),
        ],
    )?;
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|((dxc, xc), (yc, dyc))| {
            by_kind!(
                act,
                |a| for (((o, &xv), &yv), &dv) in dxc.iter_mut().zip(xc).zip(yc).zip(dyc) {
                    *o = a.grad(xv, yv, dv);
                }
            )
        });
    Ok(())
}

/// `g = f'(x) * g` in place, overwriting the incoming gradient `g` (= `dy`)
/// with `dx`, from the forward's input `x` and output `y`.
pub fn backward_inplace(act: Activation, x: &[f32], y: &[f32], g: &mut [f32]) -> Result<()> {
    const OP: &str = "activation.backward_inplace";
    act.check_elementwise(OP, &[("x", x.len()), ("y", y.len()), ("gradient", g.len())])?;
    g.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(y.par_chunks(CHUNK))
        .for_each(|((gc, xc), yc)| {
            by_kind!(
                act,
                |a| for ((gv, &xv), &yv) in gc.iter_mut().zip(xc).zip(yc) {
                    *gv = a.grad(xv, yv, *gv);
                }
            )
        });
    Ok(())
}

/// `g = f'(x) * g` in place from the output `y` alone, for a forward done
/// in place. Exact for every kind: the sign of `y` is the sign of `x` for
/// relu, elu and leaky relu with `alpha > 0` (and `y > 0` iff `x > 0`), and
/// tanh, sigmoid and linear only read `y`. Leaky relu and elu with
/// `alpha <= 0` lose that information, so they are rejected here.
pub fn backward_from_output(act: Activation, y: &[f32], g: &mut [f32]) -> Result<()> {
    const OP: &str = "activation.backward_from_output";
    act.check_from_output(OP, &[("y", y.len()), ("gradient", g.len())])?;
    g.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(gc, yc)| {
            // y stands in for x: only its sign and NaN-ness are read for
            // the piecewise kinds.
            by_kind!(act, |a| for (gv, &yv) in gc.iter_mut().zip(yc) {
                *gv = a.grad(yv, yv, *gv);
            })
        });
    Ok(())
}

/// Rows per task so that each task has at least [`SOFTMAX_MIN_TASK`] elements.
fn rows_per_task(cols: usize) -> usize {
    SOFTMAX_MIN_TASK.div_ceil(cols).max(1)
}

/// Row-wise softmax, numerically stable (see [`Softmax`]); `y` is fully
/// overwritten.
pub fn softmax_forward(p: &Softmax, x: &[f32], y: &mut [f32]) -> Result<()> {
    const OP: &str = "softmax.forward";
    p.check(OP, &[("x", x.len()), ("y", y.len())])?;
    if p.is_empty() {
        return Ok(());
    }
    let cols = p.cols;
    let task = rows_per_task(cols) * cols;
    y.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .for_each(|(yt, xt)| {
            for (yr, xr) in yt.chunks_mut(cols).zip(xt.chunks(cols)) {
                softmax_row(xr, yr);
            }
        });
    Ok(())
}

fn softmax_row(x: &[f32], y: &mut [f32]) {
    // A NaN must survive the max: `v > m` is false against NaN either way.
    let mut m = x[0];
    for &v in &x[1..] {
        if v > m || v.is_nan() {
            m = v;
        }
        if m.is_nan() {
            break;
        }
    }
    let mut sum = 0.0f32;
    for (yv, &xv) in y.iter_mut().zip(x) {
        let e = (xv - m).exp();
        *yv = e;
        sum += e;
    }
    // sum >= 1 (the max contributes exp(0)), so the reciprocal is safe.
    let inv = 1.0 / sum;
    for yv in y.iter_mut() {
        *yv *= inv;
    }
}

/// Softmax backward: `dx = y * (dy - sum(dy * y))` per row, from the
/// forward's output `y`; `dx` is fully overwritten.
pub fn softmax_backward(p: &Softmax, y: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    const OP: &str = "softmax.backward";
    p.check(OP, &[("y", y.len()), ("dy", dy.len()), ("dx", dx.len())])?;
    if p.is_empty() {
        return Ok(());
    }
    let cols = p.cols;
    let task = rows_per_task(cols) * cols;
    dx.par_chunks_mut(task)
        .zip(y.par_chunks(task).zip(dy.par_chunks(task)))
        .for_each(|(dxt, (yt, dyt))| {
            for ((dxr, yr), dyr) in dxt
                .chunks_mut(cols)
                .zip(yt.chunks(cols))
                .zip(dyt.chunks(cols))
            {
                let mut s = 0.0f32;
                for (&a, &b) in dyr.iter().zip(yr) {
                    s += a * b;
                }
                for j in 0..cols {
                    dxr[j] = yr[j] * (dyr[j] - s);
                }
            }
        });
    Ok(())
}
