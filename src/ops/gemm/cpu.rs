//! CPU GEMM. (Straightforward row-parallel version; the blocked kernel
//! replaces it.)

use rayon::prelude::*;

use super::{Bias, Epilogue, Gemm};
use crate::error::Result;

/// `C = act(alpha * op(A) * op(B) + beta * C + bias)` on the host.
pub fn gemm(p: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], epi: Epilogue) -> Result<()> {
    p.check("gemm", a.len(), b.len(), c.len(), epi.bias)?;
    if p.m == 0 || p.n == 0 {
        return Ok(());
    }
    for bi in 0..p.batch {
        let a = &a[bi * p.stride_a..];
        let b = &b[bi * p.stride_b..];
        // op(B) packed k x n so that each row of C is a sum of rows of it.
        let mut bp = vec![0.0f32; p.k * p.n];
        for kk in 0..p.k {
            for j in 0..p.n {
                bp[kk * p.n + j] = if p.trans_b {
                    b[j * p.ldb + kk]
                } else {
                    b[kk * p.ldb + j]
                };
            }
        }
        let c_item = &mut c[bi * p.stride_c..];
        let rows: Vec<&mut [f32]> = c_item.chunks_mut(p.ldc).take(p.m).collect();
        rows.into_par_iter().enumerate().for_each(|(i, crow)| {
            let mut acc = vec![0.0f32; p.n];
            for kk in 0..p.k {
                let aik = if p.trans_a {
                    a[kk * p.lda + i]
                } else {
                    a[i * p.lda + kk]
                };
                let brow = &bp[kk * p.n..(kk + 1) * p.n];
                for (s, &bv) in acc.iter_mut().zip(brow) {
                    *s += aik * bv;
                }
            }
            for j in 0..p.n {
                let prev = if p.beta == 0.0 { 0.0 } else { p.beta * crow[j] };
                let bias = match epi.bias {
                    Bias::None => 0.0,
                    Bias::PerRow(v) => v[i],
                    Bias::PerCol(v) => v[j],
                };
                crow[j] = epi.activation.apply(p.alpha * acc[j] + prev + bias);
            }
        });
    }
    Ok(())
}
