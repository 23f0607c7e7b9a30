//! Losses and metrics against their f64 definitions.
// The references are plain index loops on purpose: they are the definitions.
#![allow(clippy::needless_range_loop)]

mod common;

use common::Rng;
use common::*;
use kestrel::ops::loss::{LossParams, cpu};
use proptest::prelude::*;

/// Per-sample cross-entropy in f32 with logits in [-10, 10]: the shift
/// `z - max` (|.| <= 20, rounding 1e-6) and `ln(sum exp)` over up to 129
/// classes (relative sum error ~c * 6e-8 -> ~8e-6 absolute in the log) bound
/// the absolute error; soft labels sum to 1 so it is not multiplied.
const CE_TOL: Tol = Tol::new(2e-5, 2e-6);
/// Probabilities are `exp(log_softmax)`: the log's absolute error becomes a
/// relative one.
const PROB_TOL: Tol = Tol::new(1e-9, 2e-5);
/// Binary cross-entropy per element is a few f32 ops on |z| <= 10, then a
/// mean over up to 65 outputs.
const BCE_TOL: Tol = Tol::new(1e-5, 2e-6);
/// MSE/MAE: squares and a mean in f32 over up to 65 outputs of values <= 4.
const MSE_TOL: Tol = Tol::new(1e-6, 1e-5);
/// Gradients vs central differences (h = 1e-4) of the f64 mean loss: the FD
/// truncation error is ~h^2 * f''' ~ 1e-8; the f32 gradient's rounding ~1e-7
/// of its scale.
const FD_TOL: Tol = Tol::new(3e-7, 1e-4);

fn ce_ref(z: &[f32], y: &[f32]) -> (f64, Vec<f64>) {
    let m = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    let mut loss = 0.0;
    for (&zj, &yj) in z.iter().zip(y) {
        if yj != 0.0 {
            loss += yj as f64 * (lse - zj as f64);
        }
    }
    (loss, z.iter().map(|&v| (v as f64 - lse).exp()).collect())
}

fn ce_mean_f64(z: &[f64], y: &[f32], c: usize) -> f64 {
    let n = y.len() / c;
    let mut total = 0.0;
    for i in 0..n {
        let zr = &z[i * c..(i + 1) * c];
        let m = zr.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let lse = m + zr.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
        for j in 0..c {
            total += y[i * c + j] as f64 * (lse - zr[j]);
        }
    }
    total / n as f64
}

fn bce_elem(z: f64, y: f64) -> f64 {
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

fn sigmoid64(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Labels: one-hot, or soft rows (positive, summing to 1).
fn labels(seed: u64, n: usize, c: usize, soft: bool) -> Vec<f32> {
    let mut r = Rng::new(seed);
    let mut y = vec![0.0f32; n * c];
    for row in y.chunks_mut(c) {
        if soft {
            let w: Vec<f64> = (0..c).map(|_| r.unit() + 0.01).collect();
            let s: f64 = w.iter().sum();
            for (o, v) in row.iter_mut().zip(w) {
                *o = (v / s) as f32;
            }
        } else {
            row[r.below(c)] = 1.0;
        }
    }
    y
}

struct Out {
    losses: Vec<f32>,
    probs: Vec<f32>,
    dz: Vec<f32>,
    mean: f64,
}

fn run_ce(p: &LossParams, z: &[f32], y: &[f32]) -> Out {
    let mut o = Out {
        losses: vec![f32::NAN; p.n],
        probs: vec![f32::NAN; p.len()],
        dz: vec![f32::NAN; p.len()],
        mean: 0.0,
    };
    o.mean =
        cpu::softmax_cross_entropy(p, z, y, &mut o.losses, Some(&mut o.probs), Some(&mut o.dz))
            .unwrap();
    o
}

fn run_bce(p: &LossParams, z: &[f32], y: &[f32]) -> Out {
    let mut o = Out {
        losses: vec![f32::NAN; p.n],
        probs: vec![f32::NAN; p.len()],
        dz: vec![f32::NAN; p.len()],
        mean: 0.0,
    };
    o.mean =
        cpu::sigmoid_cross_entropy(p, z, y, &mut o.losses, Some(&mut o.probs), Some(&mut o.dz))
            .unwrap();
    o
}

/// Checks the CE outputs against the f64 definition.
fn check_ce(p: &LossParams, z: &[f32], y: &[f32], o: &Out, tol: Tol) -> Result<(), String> {
    let c = p.classes;
    let mut losses = vec![];
    let mut probs = vec![];
    let mut dz = vec![];
    for i in 0..p.n {
        let (zr, yr) = (&z[i * c..(i + 1) * c], &y[i * c..(i + 1) * c]);
        let (l, pr) = ce_ref(zr, yr);
        let sy: f64 = yr.iter().map(|&v| v as f64).sum();
        for j in 0..c {
            dz.push(p.grad_scale as f64 * (pr[j] * sy - yr[j] as f64) / p.n as f64);
        }
        losses.push(l);
        probs.extend(pr);
    }
    check_close("ce losses", &o.losses, &losses, tol)?;
    check_close("ce probs", &o.probs, &probs, PROB_TOL)?;
    // dz = (p * sum_y - y) * scale / n: near p = 1 the f32 probability
    // carries an absolute error of up to ~2 ulps of 1 (2.4e-7), which the
    // subtraction of y exposes; elsewhere the probability's relative error.
    let s = p.grad_scale.abs() as f64 / p.n as f64;
    check_close("ce dz", &o.dz, &dz, Tol::new(2.4e-7 * s, PROB_TOL.rel))?;
    let mean = losses.iter().sum::<f64>() / p.n as f64;
    check_close("ce mean", &[o.mean as f32], &[mean], tol)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn softmax_ce_matches_f64(n in dim(33), c in dim(129), soft: bool, seed: u64) {
        let p = LossParams::new(n, c).unwrap();
        let z = data(seed, p.len(), -10.0, 10.0);
        let y = labels(seed ^ 5, n, c, soft);
        let o = run_ce(&p, &z, &y);
        let r = check_ce(&p, &z, &y, &o, CE_TOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    /// The sparse call equals the dense call on the one-hot rows, bit for bit.
    #[test]
    fn sparse_ce_equals_dense_one_hot(n in dim(33), c in dim(65), seed: u64) {
        let p = LossParams::new(n, c).unwrap().with_grad_scale(0.75).unwrap();
        let z = data(seed, p.len(), -10.0, 10.0);
        let mut r = Rng::new(seed ^ 9);
        let idx: Vec<u32> = (0..n).map(|_| r.below(c) as u32).collect();
        let mut y = vec![0.0f32; p.len()];
        for (i, &k) in idx.iter().enumerate() {
            y[i * c + k as usize] = 1.0;
        }
        let dense = run_ce(&p, &z, &y);
        let mut losses = vec![0.0; n];
        let mut probs = vec![0.0; p.len()];
        let mut dz = vec![0.0; p.len()];
        let mean = cpu::sparse_softmax_cross_entropy(&p, &z, &idx, &mut losses, Some(&mut probs), Some(&mut dz)).unwrap();
        prop_assert_eq!(&losses, &dense.losses);
        prop_assert_eq!(&probs, &dense.probs);
        prop_assert_eq!(&dz, &dense.dz);
        prop_assert_eq!(mean, dense.mean);
    }

    #[test]
    fn sigmoid_bce_matches_f64(n in dim(33), c in dim(65), seed: u64) {
        let p = LossParams::new(n, c).unwrap();
        let z = data(seed, p.len(), -10.0, 10.0);
        let y = data(seed ^ 3, p.len(), 0.0, 1.0);
        let o = run_bce(&p, &z, &y);
        let nc = (n * c) as f64;
        let mut losses = vec![0.0; n];
        for i in 0..n {
            for j in 0..c {
                losses[i] += bce_elem(z[i * c + j] as f64, y[i * c + j] as f64) / c as f64;
            }
        }
        let probs: Vec<f64> = z.iter().map(|&v| sigmoid64(v as f64)).collect();
        let dz: Vec<f64> = probs.iter().zip(&y).map(|(&q, &t)| (q - t as f64) / nc).collect();
        let r = check_close("bce losses", &o.losses, &losses, BCE_TOL)
            .and(check_close("bce probs", &o.probs, &probs, Tol::new(1e-9, 1e-6)))
            .and(check_close("bce dz", &o.dz, &dz, Tol::new(1e-6 / nc, 1e-5)))
            .and(check_close("bce mean", &[o.mean as f32], &[losses.iter().sum::<f64>() / n as f64], BCE_TOL));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    fn mse_and_mae_match_f64(n in dim(33), c in dim(65), seed: u64) {
        let p = LossParams::new(n, c).unwrap();
        let x = data(seed, p.len(), -1.0, 1.0);
        let y = data(seed ^ 3, p.len(), -1.0, 1.0);
        let mut losses = vec![0.0; n];
        let mut dz = vec![0.0; p.len()];
        let mean = cpu::mse(&p, &x, &y, &mut losses, Some(&mut dz)).unwrap();
        let nc = (n * c) as f64;
        let mut want = vec![0.0; n];
        let mut mae = 0.0;
        for i in 0..n {
            for j in 0..c {
                let d = x[i * c + j] as f64 - y[i * c + j] as f64;
                want[i] += d * d / c as f64;
                mae += d.abs() / c as f64;
            }
        }
        let wdz: Vec<f64> = x.iter().zip(&y).map(|(&a, &b)| 2.0 * (a as f64 - b as f64) / nc).collect();
        let r = check_close("mse losses", &losses, &want, MSE_TOL)
            .and(check_close("mse dz", &dz, &wdz, Tol::new(1e-7 / nc, 1e-6)))
            .and(check_close("mse mean", &[mean as f32], &[want.iter().sum::<f64>() / n as f64], MSE_TOL))
            .and(check_close("mae", &[cpu::mae(&p, &x, &y).unwrap() as f32], &[mae], Tol::new(MSE_TOL.abs * n as f64, MSE_TOL.rel)));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    /// Scores drawn from {0, 1, 2} so that ties are common.
    #[test]
    fn accuracies_match_plain_definitions(n in dim(40), c in dim(9), seed: u64) {
        let p = LossParams::new(n, c).unwrap();
        let mut r = Rng::new(seed);
        let scores: Vec<f32> = (0..p.len()).map(|_| r.below(3) as f32).collect();
        let idx: Vec<u32> = (0..n).map(|_| r.below(c) as u32).collect();
        let mut y = vec![0.0f32; p.len()];
        for (i, &k) in idx.iter().enumerate() {
            y[i * c + k as usize] = 1.0;
        }
        let first_max = |row: &[f32]| {
            let mut b = 0;
            for j in 0..row.len() {
                if row[j] > row[b] {
                    b = j;
                }
            }
            b
        };
        let mut want = 0.0;
        for i in 0..n {
            if first_max(&scores[i * c..(i + 1) * c]) == idx[i] as usize {
                want += 1.0;
            }
        }
        prop_assert_eq!(cpu::categorical_accuracy(&p, &scores, &y).unwrap(), want);
        prop_assert_eq!(cpu::sparse_categorical_accuracy(&p, &scores, &idx).unwrap(), want);

        // Binary: probabilities on a grid that hits 0.5 exactly.
        let probs: Vec<f32> = (0..p.len()).map(|_| r.below(5) as f32 / 4.0).collect();
        let t: Vec<f32> = (0..p.len()).map(|_| r.below(2) as f32).collect();
        let mut hits = 0.0;
        for i in 0..n {
            let mut row = 0.0;
            for j in 0..c {
                // Keras: equal(y_true, round(y_pred)), TF rounds half to even.
                if t[i * c + j] as f64 == (probs[i * c + j] as f64).round_ties_even() {
                    row += 1.0;
                }
            }
            hits += row / c as f64;
        }
        let got = cpu::binary_accuracy(&p, &probs, &t).unwrap();
        prop_assert!((got - hits).abs() <= 1e-12 * n as f64, "binary accuracy {} vs {}", got, hits);
    }
}

#[test]
fn argmax_ties_and_nan_follow_numpy() {
    use kestrel::ops::loss::argmax;
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    assert_eq!(argmax(&[0.0, 0.0]), 0);
    assert_eq!(argmax(&[1.0, f32::NAN, 5.0, f32::NAN]), 1);
    assert_eq!(argmax(&[f32::NAN, 5.0]), 0);
    assert_eq!(argmax(&[f32::NEG_INFINITY, -1e30]), 1);
    let p = LossParams::new(2, 3).unwrap();
    let scores = [0.5, 0.5, 0.1, 0.2, f32::NAN, 0.9];
    let y = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
    assert_eq!(cpu::categorical_accuracy(&p, &scores, &y).unwrap(), 1.0);
    let p = LossParams::new(1, 4).unwrap();
    assert_eq!(
        cpu::binary_accuracy(&p, &[f32::NAN, 0.5, 0.51, 0.0], &[0.0, 0.0, 1.0, 0.0]).unwrap(),
        0.75
    );
}

/// Logits of +-50 and 1e4 stay finite and match the f64 definition.
#[test]
fn extreme_logits_do_not_overflow() {
    let z = [
        50.0,
        -50.0,
        0.0, //
        -50.0,
        50.0,
        49.0, //
        1e4,
        -1e4,
        0.0, //
        -1e4,
        1e4,
        1e4 - 1.0, //
        -1e4,
        -1e4,
        -1e4,
    ];
    let p = LossParams::new(5, 3).unwrap();
    for hot in 0..3 {
        let mut y = [0.0f32; 15];
        for i in 0..5 {
            y[i * 3 + hot] = 1.0;
        }
        let o = run_ce(&p, &z, &y);
        assert!(
            o.losses
                .iter()
                .chain(&o.probs)
                .chain(&o.dz)
                .all(|v| v.is_finite()),
            "{:?}",
            o.losses
        );
        // f32 relative precision on losses up to 2e4.
        check_ce(&p, &z, &y, &o, Tol::new(2e-5, 1e-6)).unwrap();
        let t: Vec<f32> = y.iter().map(|&v| if v > 0.0 { 1.0 } else { 0.5 }).collect();
        let b = run_bce(&p, &z, &t);
        assert!(
            b.losses
                .iter()
                .chain(&b.probs)
                .chain(&b.dz)
                .all(|v| v.is_finite())
        );
        let want: Vec<f64> = (0..5)
            .map(|i| {
                (0..3)
                    .map(|j| bce_elem(z[i * 3 + j] as f64, t[i * 3 + j] as f64))
                    .sum::<f64>()
                    / 3.0
            })
            .collect();
        assert_close("bce extreme", &b.losses, &want, Tol::new(1e-5, 1e-6));
    }
}

#[test]
fn gradients_match_finite_differences() {
    for (n, c, seed) in [(1, 1, 1), (3, 4, 2), (2, 7, 3), (5, 2, 4)] {
        let z = data(seed, n * c, -3.0, 3.0);
        let z64 = to_f64(&z);
        for scale in [1.0f32, 2.5] {
            let p = LossParams::new(n, c)
                .unwrap()
                .with_grad_scale(scale)
                .unwrap();
            let s = scale as f64;
            // Softmax CE with soft labels (sum != 1 on purpose: y = 0.7 * soft).
            let y: Vec<f32> = labels(seed ^ 7, n, c, true)
                .iter()
                .map(|v| v * 0.7)
                .collect();
            let fd: Vec<f64> = finite_diff(|zz| ce_mean_f64(zz, &y, c), &z64, 1e-4)
                .iter()
                .map(|g| g * s)
                .collect();
            assert_close("ce dz vs FD", &run_ce(&p, &z, &y).dz, &fd, FD_TOL);

            let t = data(seed ^ 8, n * c, 0.0, 1.0);
            let bce = |zz: &[f64]| {
                zz.iter()
                    .zip(&t)
                    .map(|(&a, &b)| bce_elem(a, b as f64))
                    .sum::<f64>()
                    / (n * c) as f64
            };
            let fd: Vec<f64> = finite_diff(bce, &z64, 1e-4).iter().map(|g| g * s).collect();
            assert_close("bce dz vs FD", &run_bce(&p, &z, &t).dz, &fd, FD_TOL);

            let mse = |zz: &[f64]| {
                zz.iter()
                    .zip(&t)
                    .map(|(&a, &b)| (a - b as f64).powi(2))
                    .sum::<f64>()
                    / (n * c) as f64
            };
            let fd: Vec<f64> = finite_diff(mse, &z64, 1e-4).iter().map(|g| g * s).collect();
            let mut losses = vec![0.0; n];
            let mut dz = vec![0.0; n * c];
            cpu::mse(&p, &z, &t, &mut losses, Some(&mut dz)).unwrap();
            assert_close("mse dz vs FD", &dz, &fd, FD_TOL);
        }
    }
}

#[test]
fn nan_logit_gives_nan_for_its_row_only() {
    let p = LossParams::new(3, 4).unwrap();
    let mut z = data(5, 12, -2.0, 2.0);
    z[4 + 2] = f32::NAN; // row 1
    let y = labels(6, 3, 4, false);
    for o in [run_ce(&p, &z, &y), run_bce(&p, &z, &y)] {
        assert!(o.losses[1].is_nan() && o.losses[0].is_finite() && o.losses[2].is_finite());
        assert!(o.mean.is_nan());
        assert!(o.dz[4..8].iter().all(|v| v.is_nan()) || o.dz[6].is_nan());
        assert!(o.dz[..4].iter().chain(&o.dz[8..]).all(|v| v.is_finite()));
    }
    // Softmax couples the row: every probability and gradient of row 1 is NaN.
    let o = run_ce(&p, &z, &y);
    assert!(o.probs[4..8].iter().chain(&o.dz[4..8]).all(|v| v.is_nan()));
    let mut losses = vec![0.0; 3];
    let m = cpu::sparse_softmax_cross_entropy(&p, &z, &[0, 1, 2], &mut losses, None, None).unwrap();
    assert!(losses[1].is_nan() && losses[0].is_finite() && m.is_nan());
    let mut dz = vec![0.0; 12];
    cpu::mse(&p, &z, &y, &mut losses, Some(&mut dz)).unwrap();
    assert!(losses[1].is_nan() && losses[2].is_finite() && dz[6].is_nan() && dz[5].is_finite());
}

/// A -inf logit in a class with no label mass is a valid zero-probability
/// class, not a NaN.
#[test]
fn neg_inf_logit_without_label_mass_is_finite() {
    let p = LossParams::new(1, 3).unwrap();
    let o = run_ce(&p, &[f32::NEG_INFINITY, 1.0, 2.0], &[0.0, 0.0, 1.0]);
    assert!(o.losses[0].is_finite() && o.probs[0] == 0.0 && o.dz.iter().all(|v| v.is_finite()));
}

#[test]
fn errors_name_op_and_sizes() {
    let p = LossParams::new(2, 3).unwrap();
    let z = [0.0f32; 6];
    let mut l = [0.0f32; 2];
    let mut pr = [0.0f32; 6];
    let mut d = [0.0f32; 5];
    const CE: &str = "softmax_cross_entropy";
    assert_err_mentions(
        cpu::softmax_cross_entropy(&p, &z[..5], &z, &mut l, None, None),
        CE,
        &["logits", "6", "5"],
    );
    assert_err_mentions(
        cpu::softmax_cross_entropy(&p, &z, &z[..4], &mut l, None, None),
        CE,
        &["labels", "6", "4"],
    );
    assert_err_mentions(
        cpu::softmax_cross_entropy(&p, &z, &z, &mut l[..1], None, None),
        CE,
        &["losses", "2", "1"],
    );
    assert_err_mentions(
        cpu::softmax_cross_entropy(&p, &z, &z, &mut l, Some(&mut pr[..3]), None),
        CE,
        &["probs", "6", "3"],
    );
    assert_err_mentions(
        cpu::softmax_cross_entropy(&p, &z, &z, &mut l, None, Some(&mut d)),
        CE,
        &["dz", "6", "5"],
    );
    const SP: &str = "sparse_softmax_cross_entropy";
    assert_err_mentions(
        cpu::sparse_softmax_cross_entropy(&p, &z, &[0, 3], &mut l, Some(&mut pr), None),
        SP,
        &["row 1", "3", "classes = 3"],
    );
    assert_err_mentions(
        cpu::sparse_softmax_cross_entropy(&p, &z, &[0], &mut l, None, None),
        SP,
        &["labels", "2", "1"],
    );
    assert_err_mentions(
        cpu::sigmoid_cross_entropy(&p, &z, &z[..1], &mut l, None, None),
        "sigmoid_cross_entropy",
        &["targets", "6", "1"],
    );
    assert_err_mentions(
        cpu::mse(&p, &z, &z, &mut l, Some(&mut d)),
        "mse",
        &["dz", "6", "5"],
    );
    assert_err_mentions(cpu::mae(&p, &z[..2], &z), "mae", &["pred", "6", "2"]);
    assert_err_mentions(
        cpu::categorical_accuracy(&p, &z, &z[..3]),
        "categorical_accuracy",
        &["labels", "6", "3"],
    );
    assert_err_mentions(
        cpu::sparse_categorical_accuracy(&p, &z, &[7, 0]),
        "sparse_categorical_accuracy",
        &["row 0", "7"],
    );
    assert_err_mentions(
        cpu::binary_accuracy(&p, &z, &z[..1]),
        "binary_accuracy",
        &["targets", "6", "1"],
    );
    assert_err_mentions(LossParams::new(4, 0), "loss", &["classes", "0"]);
    assert_err_mentions(LossParams::new(0, 4), "loss", &["n", "0"]);
    assert_err_mentions(p.with_grad_scale(f32::NAN), "loss", &["grad_scale", "NaN"]);
    // A shape built by hand, bypassing `new`, is still rejected, not a panic.
    let bad = LossParams {
        n: 2,
        classes: 0,
        grad_scale: 1.0,
    };
    assert_err_mentions(cpu::mae(&bad, &[], &[]), "mae", &["classes = 0"]);
}
