//! Activations and softmax against their f64 definitions and finite
//! differences.

mod common;

use common::*;
use kestrel::ops::activation::expm1::{EXPM1_MAX_ULP, expm1_nonpositive};
use kestrel::ops::activation::{Activation, ActivationKind, Softmax, cpu};
use proptest::prelude::*;

/// f32 `exp`/`tanh`/`exp_m1` are within a few ulp (~2.4e-7 relative); the
/// abs part covers outputs near 0 where relative error means nothing
/// (sigmoid of -20 is 2e-9, computed through 1 + e).
const FWD_TOL: Tol = Tol::new(1e-7, 1e-6);

/// The backward is compared with central differences (h = 1e-4) of the f64
/// definition: truncation error is O(h^2 f''') ~ 1e-8, and the f32
/// backward's own rounding ~1e-7 relative to |dy| <= 1.
const BWD_TOL: Tol = Tol::new(2e-6, 2e-6);

/// Softmax outputs are <= 1: f32 exp (a few ulp) plus a sum of `cols`
/// terms in f32 (relative error up to cols * 6e-8 in the worst case).
fn softmax_tol(cols: usize) -> Tol {
    Tol::new(1e-7, 1e-6 + cols as f64 * 1.2e-7)
}

/// Softmax backward vs FD: values are products of probabilities and dy in
/// [-1, 1]; FD truncation (h = 1e-4) ~1e-8; f32 rounding ~cols ulp.
fn softmax_bwd_tol(cols: usize) -> Tol {
    Tol::new(2e-6, 1e-5 + cols as f64 * 1.2e-7)
}

/// The definition of each kind in f64, written from the formulas.
fn def(act: Activation, x: f64) -> f64 {
    let a = act.alpha as f64;
    match act.kind {
        ActivationKind::Linear => x,
        ActivationKind::Relu => {
            if x > 0.0 {
                x
            } else if x.is_nan() {
                f64::NAN
            } else {
                0.0
            }
        }
        ActivationKind::Elu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                a * (x.exp() - 1.0)
            }
        }
        ActivationKind::LeakyRelu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                a * x
            }
        }
        ActivationKind::Tanh => x.tanh(),
        ActivationKind::Sigmoid => 1.0 / (1.0 + (-x).exp()),
    }
}

fn kinds(alpha: f32) -> Vec<Activation> {
    vec![
        Activation::LINEAR,
        Activation::RELU,
        Activation::elu(alpha),
        Activation::leaky_relu(alpha),
        Activation::TANH,
        Activation::SIGMOID,
    ]
}

/// Inputs uniform in [-8, 8], pushed at least 0.01 away from 0 so that
/// finite differences never straddle a kink.
fn away_from_zero(seed: u64, len: usize) -> Vec<f32> {
    data(seed, len, -8.0, 8.0)
        .into_iter()
        .map(|v| {
            if v.abs() < 0.01 {
                v + 0.02_f32.copysign(v)
            } else {
                v
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn forward_matches_definition(len in dim(300), alpha in 0.01f32..3.0, seed: u64) {
        let mut x = data(seed, len, -20.0, 20.0);
        x[0] = 0.0;
        for act in kinds(alpha) {
            let mut y = vec![f32::NAN; len];
            cpu::forward(act, &x, &mut y).unwrap();
            let want: Vec<f64> = x.iter().map(|&v| def(act, v as f64)).collect();
            let r = check_close(&format!("{act:?} forward"), &y, &want, FWD_TOL);
            prop_assert!(r.is_ok(), "{}", r.unwrap_err());
            let mut z = x.clone();
            cpu::forward_inplace(act, &mut z).unwrap();
            prop_assert_eq!(&z, &y, "{:?}: in-place forward differs", act);
        }
    }

    #[test]
    fn backward_matches_finite_differences(len in dim(64), alpha in 0.01f32..3.0, seed: u64) {
        let x = away_from_zero(seed, len);
        let dy = data(seed ^ 7, len, -1.0, 1.0);
        for act in kinds(alpha) {
            let mut y = vec![0.0; len];
            cpu::forward(act, &x, &mut y).unwrap();
            let mut dx = vec![f32::NAN; len];
            cpu::backward(act, &x, &y, &dy, &mut dx).unwrap();
            let dy64 = to_f64(&dy);
            let loss = |xs: &[f64]| {
                let fx: Vec<f64> = xs.iter().map(|&v| def(act, v)).collect();
                dot(&dy64, &fx)
            };
            let want = finite_diff(loss, &to_f64(&x), 1e-4);
            let r = check_close(&format!("{act:?} backward"), &dx, &want, BWD_TOL);
            prop_assert!(r.is_ok(), "{}", r.unwrap_err());

            let mut g = dy.clone();
            cpu::backward_inplace(act, &x, &y, &mut g).unwrap();
            prop_assert_eq!(&g, &dx, "{:?}: in-place backward differs", act);
            let mut g = dy.clone();
            cpu::backward_from_output(act, &y, &mut g).unwrap();
            prop_assert_eq!(&g, &dx, "{:?}: backward from the output differs", act);
        }
    }

    #[test]
    fn softmax_matches_log_sum_exp(rows in dim(20), cols in dim(130), scale in prop_oneof![Just(1.0f32), Just(10.0f32), Just(50.0f32)], seed: u64) {
        let p = Softmax::new(rows, cols).unwrap();
        let x = data(seed, rows * cols, -scale, scale);
        let mut y = vec![f32::NAN; rows * cols];
        cpu::softmax_forward(&p, &x, &mut y).unwrap();
        let want = softmax_def(rows, cols, &to_f64(&x));
        let r = check_close("softmax", &y, &want, softmax_tol(cols));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    fn softmax_backward_matches_finite_differences(rows in dim(5), cols in dim(17), seed: u64) {
        let p = Softmax::new(rows, cols).unwrap();
        let x = data(seed, rows * cols, -3.0, 3.0);
        let dy = data(seed ^ 3, rows * cols, -1.0, 1.0);
        let mut y = vec![0.0; rows * cols];
        cpu::softmax_forward(&p, &x, &mut y).unwrap();
        let mut dx = vec![f32::NAN; rows * cols];
        cpu::softmax_backward(&p, &y, &dy, &mut dx).unwrap();
        let dy64 = to_f64(&dy);
        let want = finite_diff(|xs| dot(&dy64, &softmax_def(rows, cols, xs)), &to_f64(&x), 1e-4);
        let r = check_close("softmax backward", &dx, &want, softmax_bwd_tol(cols));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// Softmax in f64 through log-sum-exp: `y = exp(x - lse(x))`, with
/// `lse(x) = m + ln(sum exp(x - m))`.
fn softmax_def(rows: usize, cols: usize, x: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        for j in 0..cols {
            out[r * cols + j] = (row[j] - lse).exp();
        }
    }
    out
}

#[test]
fn softmax_extreme_logits() {
    // +-50 (and far beyond) would overflow a naive exp in f32 (exp(89) = inf).
    let cases: Vec<Vec<f32>> = vec![
        vec![50.0, -50.0, 0.0, 49.0],
        vec![-50.0, -50.0, -50.0],
        vec![1e4, 1e4 - 1.0, -1e4],
        vec![-1e4, -1e4 + 2.0],
        vec![88.0, 89.0, 90.0, 100.0],
        vec![f32::NEG_INFINITY, 0.0, 1.0],
    ];
    for x in cases {
        let p = Softmax::new(1, x.len()).unwrap();
        let mut y = vec![f32::NAN; x.len()];
        cpu::softmax_forward(&p, &x, &mut y).unwrap();
        let want = softmax_def(1, x.len(), &to_f64(&x));
        assert_close(&format!("softmax {x:?}"), &y, &want, softmax_tol(x.len()));
        let s: f32 = y.iter().sum();
        assert!((s - 1.0).abs() < 1e-6, "softmax {x:?} sums to {s}");
    }
}

#[test]
fn softmax_nan_poisons_only_its_row() {
    let (rows, cols) = (3, 5);
    let p = Softmax::new(rows, cols).unwrap();
    let mut x = data(11, rows * cols, -2.0, 2.0);
    x[cols + 3] = f32::NAN; // row 1
    let mut y = vec![0.0; rows * cols];
    cpu::softmax_forward(&p, &x, &mut y).unwrap();
    for r in 0..rows {
        for j in 0..cols {
            let v = y[r * cols + j];
            assert_eq!(v.is_nan(), r == 1, "row {r} col {j}: {v}");
        }
    }
    // NaN first in the row must not be skipped by the max either.
    let x = [f32::NAN, 1.0, 2.0];
    let mut y = [0.0; 3];
    cpu::softmax_forward(&Softmax::new(1, 3).unwrap(), &x, &mut y).unwrap();
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
    // The backward: a NaN in dy poisons its row.
    let p = Softmax::new(2, 3).unwrap();
    let y = [0.2, 0.3, 0.5, 0.1, 0.1, 0.8];
    let dy = [0.0, f32::NAN, 1.0, 1.0, 0.0, 0.0];
    let mut dx = [0.0; 6];
    cpu::softmax_backward(&p, &y, &dy, &mut dx).unwrap();
    assert!(
        dx[..3].iter().all(|v| v.is_nan()) && dx[3..].iter().all(|v| !v.is_nan()),
        "{dx:?}"
    );
}

#[test]
fn nan_propagates_for_every_kind() {
    for act in kinds(0.3) {
        let x = [1.0, f32::NAN, -1.0, 0.0];
        let mut y = [0.0; 4];
        cpu::forward(act, &x, &mut y).unwrap();
        assert!(y[1].is_nan(), "{act:?} forward: {y:?}");
        assert!(
            y.iter().enumerate().all(|(i, v)| v.is_nan() == (i == 1)),
            "{act:?}: {y:?}"
        );
        let dy = [1.0; 4];
        let mut dx = [0.0; 4];
        cpu::backward(act, &x, &y, &dy, &mut dx).unwrap();
        // Linear's slope is 1 whatever x is, so its backward is dy alone.
        if act.kind != ActivationKind::Linear {
            assert!(dx[1].is_nan(), "{act:?} backward: {dx:?}");
        }
        // A NaN gradient passes through too, where the local slope is not 0.
        let dy = [f32::NAN; 4];
        cpu::backward(act, &x, &y, &dy, &mut dx).unwrap();
        assert!(dx[0].is_nan(), "{act:?} backward of NaN dy: {dx:?}");
    }
}

#[test]
fn keras_defaults_and_kinks() {
    // Keras: relu'(0) = 0; leaky relu default alpha 0.3, elu 1.0.
    let leaky = Activation::leaky_relu(0.3);
    assert_eq!(leaky.apply(-2.0), -0.6f32);
    // elu(-1) = alpha * expm1(-1), within expm1's stated ulp bound.
    let e = Activation::elu(1.0).apply(-1.0);
    assert!(
        expm1_ulp_error(-1.0, e) <= EXPM1_MAX_ULP as f64,
        "elu(-1) = {e}, exact {}",
        (-1.0f64).exp_m1()
    );
    assert_eq!(Activation::RELU.grad(0.0, 0.0, 1.0), 0.0);
    assert_eq!(leaky.grad(0.0, 0.0, 1.0), 0.3);
}

#[test]
fn errors_name_the_op_and_sizes() {
    let x = [0.0f32; 5];
    let mut y = [0.0f32; 4];
    assert_err_mentions(
        cpu::forward(Activation::RELU, &x, &mut y),
        "activation.forward",
        &["5", "4", "y"],
    );
    let mut dx = [0.0f32; 5];
    assert_err_mentions(
        cpu::backward(Activation::TANH, &x, &x, &[0.0; 6], &mut dx),
        "activation.backward",
        &["dy", "5", "6"],
    );
    assert_err_mentions(
        cpu::forward(Activation::elu(f32::NAN), &x, &mut [0.0; 5]),
        "activation.forward",
        &["alpha", "NaN"],
    );
    assert_err_mentions(
        cpu::backward_from_output(Activation::leaky_relu(-0.5), &x, &mut [0.0; 5]),
        "activation.backward_from_output",
        &["alpha", "-0.5"],
    );
    assert_err_mentions(Softmax::new(3, 0), "softmax", &["cols", "0"]);
    let p = Softmax::new(2, 3).unwrap();
    assert_err_mentions(
        cpu::softmax_forward(&p, &[0.0; 6], &mut [0.0; 5]),
        "softmax.forward",
        &["y", "6", "5"],
    );
    assert_err_mentions(
        cpu::softmax_backward(&p, &[0.0; 6], &[0.0; 7], &mut [0.0; 6]),
        "softmax.backward",
        &["dy", "6", "7"],
    );
}

/// `|got - expm1(x)|` in ulps of the correctly rounded f32 result, the
/// exact value from f64 (whose own error, ~1e-16 relative, is far below an
/// f32 ulp).
fn expm1_ulp_error(x: f32, got: f32) -> f64 {
    let exact = (x as f64).exp_m1();
    let rounded = exact as f32;
    // The spacing of f32 at |rounded| (subnormals: 2^-149).
    let ulp = if rounded == 0.0 {
        f64::from(f32::from_bits(1))
    } else {
        let next = f32::from_bits(rounded.abs().to_bits() + 1);
        f64::from(next) - f64::from(rounded.abs())
    };
    (f64::from(got) - exact).abs() / ulp
}

/// The vector-friendly expm1 against f64 over its whole domain: every 61st
/// f32 bit pattern in [-87, 0] (~17 million inputs, all binades), every
/// power of two from -2^6 down to the smallest subnormal (the tiny-|x|
/// region where `exp(x) - 1` in f32 would lose every digit), a few
/// neighbours each side of every multiple of ln 2 / 2 (the range
/// reduction's boundaries), and the ends (-0, -87, below -87, -inf).
#[test]
fn expm1_nonpositive_is_within_its_ulp_bound() {
    let mut inputs: Vec<f32> = (0x8000_0000u32..=(-87.0f32).to_bits())
        .step_by(61)
        .map(f32::from_bits)
        .collect();
    inputs.extend((0..=149 + 6).map(|e| -(2.0f64.powi(6 - e)) as f32));
    for j in 1..=251 {
        let b = -(j as f64) * std::f64::consts::LN_2 / 2.0;
        let c = b as f32;
        for d in -3i32..=3 {
            inputs.push(f32::from_bits((c.to_bits() as i32 + d) as u32));
        }
    }
    inputs.extend([
        -0.0,
        0.0,
        -87.0,
        -88.5,
        -1e30,
        f32::NEG_INFINITY,
        -f32::MIN_POSITIVE,
    ]);
    let (mut worst, mut at) = (0.0f64, 0.0f32);
    for &x in inputs.iter().filter(|x| **x <= 0.0) {
        let got = expm1_nonpositive(x);
        let err = if x == f32::NEG_INFINITY {
            (f64::from(got) + 1.0).abs() / f64::from(f32::EPSILON / 2.0)
        } else {
            expm1_ulp_error(x, got)
        };
        // A NaN error (a NaN result) must become the worst.
        if err > worst || err.is_nan() {
            (worst, at) = (err, x);
        }
    }
    assert!(
        worst <= EXPM1_MAX_ULP as f64,
        "expm1_nonpositive({at:e}) is {worst:.3} ulp off (bound {EXPM1_MAX_ULP}) over {} inputs",
        inputs.len()
    );
    // A tiny input comes back as itself (expm1(x) = x + x^2/2 + ...).
    for x in [-1e-30f32, -1e-10, -f32::from_bits(1)] {
        assert_eq!(expm1_nonpositive(x), x, "expm1 of tiny {x:e}");
    }
    eprintln!(
        "expm1_nonpositive: worst {worst:.3} ulp at {at:e} over {} inputs",
        inputs.len()
    );
}

/// The forward pass at every instruction-set level the CPU runs gives the
/// portable level's bits (the same operations at another vector width), in
/// place or not, for every kind; the portable one also against f64.
#[test]
fn forward_is_the_same_at_every_isa_level() {
    use kestrel::cpu_isa::{Isa, with_isa};
    // Odd length (vector tails), over two rayon chunks, from -30 to 30 (elu's
    // saturated region, every range-reduction interval, the positive side);
    // the special values both in the first vectors and in the tail.
    let special = [
        -0.0,
        0.0,
        -1e-30,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
    ];
    let x: Vec<f32> = special
        .into_iter()
        .chain(data(7, 40_013, -30.0, 30.0))
        .chain(special)
        .collect();
    for act in kinds(0.7) {
        let run = || {
            let mut y = vec![f32::NAN; x.len()];
            cpu::forward(act, &x, &mut y).unwrap();
            let mut z = x.clone();
            cpu::forward_inplace(act, &mut z).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            (bits(&y), bits(&z), y)
        };
        let (base, base_inplace, y) = with_isa(Isa::Portable, run).unwrap();
        assert!(base == base_inplace, "{act:?}: in place differs");
        let want: Vec<f64> = x.iter().map(|&v| def(act, v as f64)).collect();
        assert_close(&format!("{act:?} portable forward"), &y, &want, FWD_TOL);
        for isa in Isa::available() {
            let (got, got_inplace, _) = with_isa(isa, run).unwrap();
            assert!(got == base, "{act:?} at {isa} differs from portable");
            assert!(
                got_inplace == base,
                "{act:?} in place at {isa} differs from portable"
            );
        }
    }
}
