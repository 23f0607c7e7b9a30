//! GEMM against a triple loop in f64.

mod common;

use common::*;
use kestrel::ops::activation::Activation;
use kestrel::ops::gemm::{Bias, Epilogue, Gemm, cpu};
use proptest::prelude::*;

/// The definition: `act(alpha * op(A) op(B) + beta * C + bias)` in f64.
fn reference(p: &Gemm, a: &[f32], b: &[f32], c: &[f32], bias: &Bias, act: Activation) -> Vec<f64> {
    let mut out = to_f64(c);
    for bi in 0..p.batch {
        for i in 0..p.m {
            for j in 0..p.n {
                let mut s = 0.0f64;
                for kk in 0..p.k {
                    let av = if p.trans_a {
                        a[bi * p.stride_a + kk * p.lda + i]
                    } else {
                        a[bi * p.stride_a + i * p.lda + kk]
                    };
                    let bv = if p.trans_b {
                        b[bi * p.stride_b + j * p.ldb + kk]
                    } else {
                        b[bi * p.stride_b + kk * p.ldb + j]
                    };
                    s += av as f64 * bv as f64;
                }
                let idx = bi * p.stride_c + i * p.ldc + j;
                let prev = if p.beta == 0.0 {
                    0.0
                } else {
                    p.beta as f64 * c[idx] as f64
                };
                let bias = match bias {
                    Bias::None => 0.0,
                    Bias::PerRow(v) => v[i] as f64,
                    Bias::PerCol(v) => v[j] as f64,
                };
                out[idx] = act.apply((p.alpha as f64 * s + prev + bias) as f32) as f64;
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn matches_triple_loop(m in dim(70), n in dim(70), k in dim(70), ta: bool, tb: bool, seed: u64) {
        let p = Gemm::new(m, n, k).transpose(ta, tb).scale(1.5, 0.5);
        let a = data(seed, m * k, -1.0, 1.0);
        let b = data(seed ^ 1, k * n, -1.0, 1.0);
        let c0 = data(seed ^ 2, m * n, -1.0, 1.0);
        let mut c = c0.clone();
        cpu::gemm(&p, &a, &b, &mut c, Epilogue::default()).unwrap();
        let want = reference(&p, &a, &b, &c0, &Bias::None, Activation::LINEAR);
        prop_assert!(check_close("gemm", &c, &want, Tol::new(1e-5, 1e-5 * k as f64)).is_ok(),
            "{}", check_close("gemm", &c, &want, Tol::new(1e-5, 1e-5 * k as f64)).unwrap_err());
    }
}
