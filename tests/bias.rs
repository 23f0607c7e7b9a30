//! Bias add, its gradient, and the sum reductions, against f64 loops.
// The references are plain index loops on purpose: they are the definitions.
#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use kestrel::ops::bias::{BiasShape, cpu};
use proptest::prelude::*;

/// One f32 addition: the result is the exact sum rounded once, so within
/// half an ulp (2^-24 relative) of the f64 sum of the two f32 inputs.
const ADD_TOL: Tol = Tol::new(1e-30, 6e-8);
/// f64 accumulation then one rounding to f32: half an ulp of the result,
/// plus the f64 sum's own error (~len * 1e-16 * sum|x|, far below 1e-9 for
/// the sizes here).
const SUM_TOL: Tol = Tol::new(1e-9, 6e-8);
/// The FD of a linear function in f64 is exact up to f64 rounding of L/h.
const FD_TOL: Tol = Tol::new(1e-6, 1e-6);

fn add_ref(p: &BiasShape, x: &[f32], b: &[f32]) -> Vec<f64> {
    let mut y = vec![0.0; p.len()];
    for i in 0..p.n {
        for ch in 0..p.c {
            for s in 0..p.spatial {
                let k = (i * p.c + ch) * p.spatial + s;
                y[k] = x[k] as f64 + b[ch] as f64;
            }
        }
    }
    y
}

fn db_ref(p: &BiasShape, dy: &[f32]) -> Vec<f64> {
    let mut db = vec![0.0; p.c];
    for i in 0..p.n {
        for (ch, d) in db.iter_mut().enumerate() {
            for s in 0..p.spatial {
                *d += dy[(i * p.c + ch) * p.spatial + s] as f64;
            }
        }
    }
    db
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn add_matches_definition(n in dim(9), c in dim(33), sp in dim(65), dense: bool, seed: u64) {
        let p = if dense { BiasShape::dense(n, c).unwrap() } else { BiasShape::conv(n, c, sp).unwrap() };
        let x = data(seed, p.len(), -2.0, 2.0);
        let b = data(seed ^ 1, c, -2.0, 2.0);
        let want = add_ref(&p, &x, &b);
        let mut y = vec![f32::NAN; p.len()];
        cpu::add(&p, &x, &b, &mut y).unwrap();
        let r = check_close("bias.add", &y, &want, ADD_TOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        let mut xi = x.clone();
        cpu::add_inplace(&p, &mut xi, &b).unwrap();
        prop_assert_eq!(&xi, &y, "in place and out of place differ");
    }

    #[test]
    fn backward_matches_f64_sum(n in dim(33), c in dim(17), sp in dim(129), dense: bool, seed: u64) {
        let p = if dense { BiasShape::dense(n, c).unwrap() } else { BiasShape::conv(n, c, sp).unwrap() };
        let dy = data(seed, p.len(), -1.0, 1.0);
        let mut db = vec![f32::NAN; c];
        cpu::backward(&p, &dy, &mut db).unwrap();
        let r = check_close("bias.backward", &db, &db_ref(&p, &dy), SUM_TOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    fn sums_match_f64_loops(len in 0usize..40_000, seed: u64) {
        let x = data(seed, len, -3.0, 3.0);
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        let q: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        // Same f64 terms, another association: differences of a few f64 ulps.
        prop_assert!((cpu::sum(&x) - s).abs() <= 1e-12 * (1.0 + q), "sum {} vs {}", cpu::sum(&x), s);
        prop_assert!((cpu::sum_squares(&x) - q).abs() <= 1e-12 * (1.0 + q), "sum_squares {} vs {}", cpu::sum_squares(&x), q);
    }
}

/// The gradient of `L = sum(dy * (x + b))` with respect to `b`, by central
/// differences of the f64 definition, against `backward`.
#[test]
fn backward_matches_finite_differences() {
    for (n, c, sp) in [(3, 4, 1), (2, 3, 5), (1, 1, 7), (4, 2, 9)] {
        let p = BiasShape::conv(n, c, sp).unwrap();
        let x = data(11, p.len(), -1.0, 1.0);
        let b = data(12, c, -1.0, 1.0);
        let dy = to_f64(&data(13, p.len(), -1.0, 1.0));
        let f = |bb: &[f64]| {
            let mut l = 0.0;
            for i in 0..n {
                for ch in 0..c {
                    for s in 0..sp {
                        let k = (i * c + ch) * sp + s;
                        l += dy[k] * (x[k] as f64 + bb[ch]);
                    }
                }
            }
            l
        };
        let fd = finite_diff(f, &to_f64(&b), 1e-3);
        let dy32: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
        let mut db = vec![0.0; c];
        cpu::backward(&p, &dy32, &mut db).unwrap();
        assert_close("bias.backward vs FD", &db, &fd, FD_TOL);
    }
}

/// A long sum of one value that f32 accumulation gets badly wrong
/// (0.1 added 2^22 times) must come out as the f64 sum, rounded once.
#[test]
fn long_sums_are_accurate() {
    let n = 1 << 22;
    let p = BiasShape::dense(n, 1).unwrap();
    let dy = vec![0.1f32; n];
    let mut db = [0.0f32];
    cpu::backward(&p, &dy, &mut db).unwrap();
    let want = 0.1f32 as f64 * n as f64;
    assert_close("bias.backward long", &db, &[want], SUM_TOL);
    assert!((cpu::sum(&dy) - want).abs() <= 1e-9 * want);
}

/// Same bits in a 1-thread pool, a 3-thread pool and the global pool.
#[test]
fn results_do_not_depend_on_thread_count() {
    let p = BiasShape::conv(37, 5, 1031).unwrap();
    let dy = data(7, p.len(), -1.0, 1.0);
    let run = || {
        let mut db = vec![0.0; p.c];
        cpu::backward(&p, &dy, &mut db).unwrap();
        let pd = BiasShape::dense(p.n * p.c * 13, 79).unwrap();
        let mut dbd = vec![0.0; 79];
        cpu::backward(&pd, &dy[..pd.len()], &mut dbd).unwrap();
        (
            db,
            dbd,
            cpu::sum(&dy).to_bits(),
            cpu::sum_squares(&dy).to_bits(),
        )
    };
    let global = run();
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let local = pool.install(run);
        assert_eq!(
            local.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            global.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "conv db differs with {threads} threads"
        );
        assert_eq!(
            local.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            global.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "dense db differs with {threads} threads"
        );
        assert_eq!(
            (local.2, local.3),
            (global.2, global.3),
            "sums differ with {threads} threads"
        );
    }
}

#[test]
fn nan_propagates_to_its_channel_only() {
    let p = BiasShape::conv(2, 3, 4).unwrap();
    let mut dy = data(1, p.len(), -1.0, 1.0);
    dy[(3 + 1) * 4 + 2] = f32::NAN; // sample 1, channel 1
    let mut db = vec![0.0; 3];
    cpu::backward(&p, &dy, &mut db).unwrap();
    assert!(
        db[1].is_nan() && db[0].is_finite() && db[2].is_finite(),
        "{db:?}"
    );
    let mut x = vec![0.0; p.len()];
    cpu::add_inplace(&p, &mut x, &[0.0, f32::NAN, 1.0]).unwrap();
    assert!(x[4..8].iter().all(|v| v.is_nan()) && x[..4].iter().all(|v| *v == 0.0));
    assert!(cpu::sum(&dy).is_nan() && cpu::sum_squares(&dy).is_nan());
}

#[test]
fn empty_shapes_give_zero_gradient() {
    let p = BiasShape::conv(0, 3, 4).unwrap();
    let mut db = vec![f32::NAN; 3];
    cpu::backward(&p, &[], &mut db).unwrap();
    assert_eq!(db, vec![0.0; 3]);
    assert_eq!(cpu::sum(&[]), 0.0);
}

#[test]
fn errors_name_op_and_sizes() {
    let p = BiasShape::conv(2, 3, 4).unwrap();
    let x = vec![0.0; 24];
    let mut y = vec![0.0; 24];
    assert_err_mentions(
        cpu::add(&p, &x[..23], &[0.0; 3], &mut y),
        "bias.add",
        &["x", "24", "23"],
    );
    assert_err_mentions(
        cpu::add(&p, &x, &[0.0; 2], &mut y),
        "bias.add",
        &["b", "3", "2"],
    );
    assert_err_mentions(
        cpu::add(&p, &x, &[0.0; 3], &mut y[..20]),
        "bias.add",
        &["y", "24", "20"],
    );
    let mut x2 = vec![0.0; 25];
    assert_err_mentions(
        cpu::add_inplace(&p, &mut x2, &[0.0; 3]),
        "bias.add_inplace",
        &["x", "24", "25"],
    );
    let mut db = vec![0.0; 4];
    assert_err_mentions(
        cpu::backward(&p, &x, &mut db),
        "bias.backward",
        &["db", "3", "4"],
    );
    let mut db = vec![0.0; 3];
    assert_err_mentions(
        cpu::backward(&p, &x[..1], &mut db),
        "bias.backward",
        &["dy", "24", "1"],
    );
    assert_err_mentions(BiasShape::conv(usize::MAX, 2, 2), "bias", &["shape"]);
    let bad = BiasShape {
        n: usize::MAX,
        c: 2,
        spatial: 2,
    };
    assert_err_mentions(
        cpu::add_inplace(&bad, &mut [], &[0.0; 2]),
        "bias.add_inplace",
        &["shape"],
    );
}

/// Every instruction-set level this CPU runs (`cpu_isa`) gives the
/// portable level's bits for the bias gradient (conv runs of 1031, not a
/// multiple of the 32 lanes, and a dense shape), each also within the f64
/// definition's tolerance.
#[test]
fn every_isa_level_gives_the_same_bits() {
    use kestrel::cpu_isa::{Isa, with_isa};
    for p in [
        BiasShape::conv(37, 5, 1031).unwrap(),
        BiasShape::dense(301, 79).unwrap(),
    ] {
        let dy = data(8, p.len(), -1.0, 1.0);
        let run = || {
            let mut db = vec![f32::NAN; p.c];
            cpu::backward(&p, &dy, &mut db).unwrap();
            db
        };
        let base = with_isa(Isa::Portable, run).unwrap();
        assert_close("portable db", &base, &db_ref(&p, &dy), SUM_TOL);
        for isa in Isa::available() {
            let got = with_isa(isa, run).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&base), "{isa}: {p:?}");
        }
    }
}
