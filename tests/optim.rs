//! Optimizer steps against the Keras 2 formulas stepped by hand in f64.
// The references are plain index loops on purpose: they are the definitions.
#![allow(clippy::needless_range_loop)]

mod common;

use common::Rng;
use common::*;
use kestrel::ops::optim::{Optimizer, OptimizerKind, OptimizerState, cpu};
use proptest::prelude::*;

/// Parameters in [-1, 1], up to 5 steps of size <= 0.1: the f32 state and
/// parameters round at ~6e-8 relative per operation, a few operations per
/// step, so after 5 steps the error stays below ~1e-6 of the values
/// involved; the scalars (lr_t, Adam's step, the clip scale) are rounded to
/// f32 once each (6e-8 relative).
const OPT_TOL: Tol = Tol::new(2e-6, 2e-6);

/// The six rules under test.
const RULES: [&str; 6] = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"];

fn make(rule: usize, lr: f32) -> Optimizer {
    match rule {
        0 => Optimizer::sgd(lr, 0.0, false),
        1 => Optimizer::sgd(lr, 0.9, false),
        2 => Optimizer::sgd(lr, 0.9, true),
        3 => Optimizer::adagrad(lr),
        4 => Optimizer::rmsprop(lr),
        _ => Optimizer::adam(lr),
    }
    .unwrap()
}

/// The f64 reference: Keras 2.3.1's formulas, written out.
struct Ref {
    it: u64,
    s0: Vec<Vec<f64>>,
    s1: Vec<Vec<f64>>,
}

impl Ref {
    fn new(o: &Optimizer, sizes: &[usize]) -> Self {
        let a0 = if o.kind == OptimizerKind::Adagrad {
            o.initial_accumulator as f64
        } else {
            0.0
        };
        Ref {
            it: 0,
            s0: sizes.iter().map(|&n| vec![a0; n]).collect(),
            s1: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    fn clip(o: &Optimizer, grads: &[Vec<f32>]) -> Vec<Vec<f64>> {
        let mut g: Vec<Vec<f64>> = grads.iter().map(|t| to_f64(t)).collect();
        let clipvalue = |g: &mut Vec<Vec<f64>>| {
            if let Some(c) = o.clipvalue {
                let c = c as f64;
                for v in g.iter_mut().flatten() {
                    if *v > c {
                        *v = c;
                    } else if *v < -c {
                        *v = -c;
                    }
                }
            }
        };
        let clipnorm = |g: &mut Vec<Vec<f64>>| {
            if let Some(c) = o.clipnorm {
                let c = c as f64;
                let norm = |t: &[f64]| t.iter().map(|v| v * v).sum::<f64>();
                if o.clipnorm_per_tensor {
                    for t in g.iter_mut() {
                        let n = norm(t).sqrt();
                        if n >= c {
                            t.iter_mut().for_each(|v| *v *= c / n);
                        }
                    }
                } else {
                    let n = g.iter().map(|t| norm(t)).sum::<f64>().sqrt();
                    if n >= c {
                        g.iter_mut().flatten().for_each(|v| *v *= c / n);
                    }
                }
            }
        };
        if o.clipvalue_first {
            clipvalue(&mut g);
            clipnorm(&mut g);
        } else {
            clipnorm(&mut g);
            clipvalue(&mut g);
        }
        g
    }

    fn step(&mut self, o: &Optimizer, params: &mut [Vec<f64>], grads: &[Vec<f32>]) {
        let g = Self::clip(o, grads);
        let lr = o.lr as f64 / (1.0 + o.decay as f64 * self.it as f64);
        let eps = o.epsilon as f64;
        let (mom, rho, b1, b2) = (
            o.momentum as f64,
            o.rho as f64,
            o.beta1 as f64,
            o.beta2 as f64,
        );
        let t = (self.it + 1) as f64;
        for (k, p) in params.iter_mut().enumerate() {
            for i in 0..p.len() {
                let gi = g[k][i];
                let (a, b) = (&mut self.s0[k][i], &mut self.s1[k][i]);
                match o.kind {
                    OptimizerKind::Sgd => {
                        let v = mom * *a - lr * gi;
                        *a = v;
                        p[i] += if o.nesterov { mom * v - lr * gi } else { v };
                    }
                    OptimizerKind::Adagrad => {
                        *a += gi * gi;
                        p[i] -= lr * gi / (a.sqrt() + eps);
                    }
                    OptimizerKind::RmsProp => {
                        *a = rho * *a + (1.0 - rho) * gi * gi;
                        p[i] -= lr * gi / (a.sqrt() + eps);
                    }
                    OptimizerKind::Adam => {
                        let lr_t = lr * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t));
                        *a = b1 * *a + (1.0 - b1) * gi;
                        *b = b2 * *b + (1.0 - b2) * gi * gi;
                        p[i] -= lr_t * *a / (b.sqrt() + eps);
                    }
                }
            }
        }
        self.it += 1;
    }
}

/// Runs `steps` steps of both implementations on fresh random gradients.
fn run_both(
    o: &Optimizer,
    sizes: &[usize],
    steps: usize,
    seed: u64,
    gscale: f32,
) -> Result<(), String> {
    let mut r = Rng::new(seed);
    let mut p32: Vec<Vec<f32>> = sizes.iter().map(|&n| r.vec(n, -1.0, 1.0)).collect();
    let mut p64: Vec<Vec<f64>> = p32.iter().map(|t| to_f64(t)).collect();
    let mut st = OptimizerState::new(o, sizes).unwrap();
    let mut rf = Ref::new(o, sizes);
    for s in 0..steps {
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| r.vec(n, -gscale, gscale)).collect();
        let gr: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let mut pr: Vec<&mut [f32]> = p32.iter_mut().map(|p| p.as_mut_slice()).collect();
        cpu::step(o, &mut st, &mut pr, &gr).unwrap();
        rf.step(o, &mut p64, &grads);
        for (k, (a, b)) in p32.iter().zip(&p64).enumerate() {
            check_close(&format!("{o:?}: step {s}, params[{k}]"), a, b, OPT_TOL)?;
        }
    }
    if st.iterations() != steps as u64 {
        return Err(format!(
            "iterations {} after {steps} steps",
            st.iterations()
        ));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every rule, with decay, both flavors, with and without each clipping,
    /// over several tensors of different sizes (1 included).
    #[test]
    fn steps_match_keras_formulas(
        rule in 0usize..6,
        sizes in proptest::collection::vec(dim(40), 1..5),
        steps in 1usize..6,
        lr in 0.001f32..0.1,
        decay in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        clipnorm in proptest::option::of(0.1f32..4.0),
        clipvalue in proptest::option::of(0.05f32..1.0),
        tf: bool,
        gscale in prop_oneof![Just(1.0f32), Just(1e-3f32), Just(10.0f32)],
        seed: u64,
    ) {
        let mut o = make(rule, lr).with_decay(decay).unwrap();
        o.clipnorm = clipnorm;
        o.clipvalue = clipvalue;
        if tf {
            o = o.tf_keras();
        }
        let r = run_both(&o, &sizes, steps, seed, gscale);
        prop_assert!(r.is_ok(), "{} {}", RULES[rule], r.unwrap_err());
    }
}

fn step1(o: &Optimizer, p: &mut [f32], g: &[f32]) -> OptimizerState {
    let mut st = OptimizerState::new(o, &[p.len()]).unwrap();
    cpu::step(o, &mut st, &mut [p], &[g]).unwrap();
    st
}

#[test]
fn nesterov_and_momentum_differ_as_the_formula_says() {
    let g = [0.5f32, -2.0];
    let (mut pm, mut pn) = ([1.0f32, 1.0], [1.0f32, 1.0]);
    let m = make(1, 0.1);
    let n = make(2, 0.1);
    // From v = 0: momentum p -= lr g; Nesterov p -= lr g (1 + m).
    step1(&m, &mut pm, &g);
    step1(&n, &mut pn, &g);
    assert_close("momentum", &pm, &[0.95, 1.2], Tol::new(1e-7, 0.0));
    assert_close(
        "nesterov",
        &pn,
        &[1.0 - 0.05 * 1.9, 1.0 + 0.2 * 1.9],
        Tol::new(1e-7, 0.0),
    );
    // Second step with the same gradient: v1 = -lr g, v2 = m v1 - lr g.
    let mut st = OptimizerState::new(&n, &[2]).unwrap();
    let mut p = [0.0f32; 2];
    for _ in 0..2 {
        cpu::step(&n, &mut st, &mut [&mut p], &[&g]).unwrap();
    }
    let v1: Vec<f64> = g.iter().map(|&x| -0.1 * x as f64).collect();
    let v2: Vec<f64> = v1
        .iter()
        .zip(&g)
        .map(|(v, &x)| 0.9 * v - 0.1 * x as f64)
        .collect();
    let want: Vec<f64> = (0..2)
        .map(|i| (0.9 * v1[i] - 0.1 * g[i] as f64) + (0.9 * v2[i] - 0.1 * g[i] as f64))
        .collect();
    assert_close("nesterov 2 steps", &p, &want, Tol::new(1e-7, 1e-6));
    assert_close(
        "velocity",
        st.slots(0).unwrap().0,
        &v2,
        Tol::new(1e-8, 1e-6),
    );
}

#[test]
fn adam_uses_t_equal_iterations_plus_one() {
    let o = Optimizer::adam(0.01).unwrap().with_decay(0.1).unwrap();
    for it in [0u64, 1, 9, 1000] {
        let s = o.scalars(it);
        let lr = 0.01f64 / (1.0 + 0.1 * it as f64);
        let t = it as f64 + 1.0;
        let want = lr * (1.0 - (0.999f32 as f64).powf(t)).sqrt() / (1.0 - (0.9f32 as f64).powf(t));
        assert_close("adam step", &[s.adam_step], &[want], Tol::new(0.0, 1e-7));
        assert_close("lr_t", &[s.lr_t], &[lr], Tol::new(0.0, 1e-7));
    }
    // The first step from zero moments moves by about lr * sign(g).
    let mut p = [0.0f32, 0.0];
    step1(&Optimizer::adam(0.01).unwrap(), &mut p, &[0.3, -4.0]);
    assert_close("adam first step", &p, &[-0.01, 0.01], Tol::new(1e-8, 1e-5));
    // Resuming at iterations = 9 steps with t = 10.
    let o = Optimizer::adam(0.01).unwrap();
    let mut st = OptimizerState::new(&o, &[1]).unwrap();
    st.set_iterations(9);
    let mut p = [0.0f32];
    cpu::step(&o, &mut st, &mut [&mut p], &[&[1.0]]).unwrap();
    let want = -0.01 * (1.0 - 0.999f64.powi(10)).sqrt() / (1.0 - 0.9f64.powi(10)) * 0.1
        / ((0.001f64).sqrt() + 1e-7);
    assert_close("adam at t = 10", &p, &[want], Tol::new(0.0, 1e-5));
    assert_eq!(st.iterations(), 10);
}

fn clipped(o: &Optimizer, grads: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut g = grads.to_vec();
    let mut gm: Vec<&mut [f32]> = g.iter_mut().map(|t| t.as_mut_slice()).collect();
    cpu::clip_gradients(o, &mut gm).unwrap();
    g
}

#[test]
fn clipnorm_global_and_per_tensor() {
    // Tensor norms 5 and 0.5; global norm sqrt(25.25).
    let grads = vec![vec![3.0f32, 4.0], vec![0.3, 0.0, -0.4]];
    let g = make(0, 0.1).with_clipnorm(1.0).unwrap();
    let s = 1.0 / 25.25f64.sqrt();
    let out = clipped(&g, &grads);
    assert_close(
        "global t0",
        &out[0],
        &[3.0 * s, 4.0 * s],
        Tol::new(0.0, 1e-6),
    );
    assert_close(
        "global t1",
        &out[1],
        &[0.3 * s, 0.0, -0.4 * s],
        Tol::new(0.0, 1e-6),
    );
    let mut pt = g;
    pt.clipnorm_per_tensor = true;
    let out = clipped(&pt, &grads);
    assert_close("per tensor t0", &out[0], &[0.6, 0.8], Tol::new(0.0, 1e-6));
    assert_eq!(
        out[1], grads[1],
        "a tensor under its own norm is left alone"
    );
    // n < c: nothing changes, bit for bit; also through a step.
    let loose = make(0, 0.1).with_clipnorm(5.1).unwrap();
    assert_eq!(clipped(&loose, &grads), grads);
    let mut p = [0.0f32, 0.0];
    step1(&loose, &mut p, &grads[0]);
    let mut q = [0.0f32, 0.0];
    step1(&make(0, 0.1), &mut q, &grads[0]);
    assert_eq!(p, q);
    // n >= c through a step: p = -lr * g * c / n.
    step1(&make(0, 0.1).with_clipnorm(2.0).unwrap(), &mut p, &grads[0]);
    assert_close(
        "sgd clipnorm",
        &p,
        &[-0.3 - 0.1 * 1.2, -0.4 - 0.1 * 1.6],
        Tol::new(1e-7, 1e-6),
    );
}

#[test]
fn clipvalue_and_order_per_flavor() {
    let grads = vec![vec![3.0f32, 0.1, -2.0, f32::NAN]];
    let o = make(0, 0.1).with_clipvalue(1.0).unwrap();
    let out = clipped(&o, &grads);
    assert_eq!(&out[0][..3], &[1.0, 0.1, -1.0]);
    assert!(out[0][3].is_nan(), "clipvalue must let NaN through");

    let grads = vec![vec![3.0f32, 0.1]];
    let both = make(0, 0.1)
        .with_clipvalue(1.0)
        .unwrap()
        .with_clipnorm(1.0)
        .unwrap();
    // Standalone: norm of the raw gradient (sqrt 9.01) first, then clip values.
    let n = 9.01f64.sqrt();
    assert_close(
        "standalone order",
        &clipped(&both, &grads)[0],
        &[3.0 / n, 0.1 / n],
        Tol::new(0.0, 1e-6),
    );
    // tf.keras: clip values to [1, 0.1] first, then the norm sqrt(1.01).
    let mut tf = both;
    tf.clipvalue_first = true;
    let n = 1.01f64.sqrt();
    assert_close(
        "tf.keras order",
        &clipped(&tf, &grads)[0],
        &[1.0 / n, 0.1 / n],
        Tol::new(0.0, 1e-6),
    );
}

#[test]
fn adagrad_initial_accumulator_per_flavor() {
    let o = make(3, 0.1);
    let st = OptimizerState::new(&o, &[3, 1]).unwrap();
    assert_eq!(st.slots(1).unwrap().0, &[0.0]);
    let tf = o.tf_keras();
    let st = OptimizerState::new(&tf, &[3, 1]).unwrap();
    assert_eq!(st.slots(0).unwrap().0, &[0.1, 0.1, 0.1]);
    let mut p = [0.0f32];
    step1(&tf, &mut p, &[0.5]);
    let want = -0.1 * 0.5 / ((0.1f32 as f64 + 0.25).sqrt() + 1e-7);
    assert_close("tf.keras adagrad", &p, &[want], Tol::new(0.0, 1e-6));
    let mut p = [0.0f32];
    step1(&o, &mut p, &[0.5]);
    assert_close(
        "keras adagrad",
        &p,
        &[-0.1 * 0.5 / (0.5 + 1e-7)],
        Tol::new(0.0, 1e-6),
    );
}

#[test]
fn nan_gradient_gives_nan_parameter() {
    for rule in 0..6 {
        for clip in [false, true] {
            let mut o = make(rule, 0.01);
            if clip {
                o = o.with_clipnorm(1.0).unwrap().with_clipvalue(0.5).unwrap();
            }
            let mut a = [1.0f32, 2.0, 3.0];
            let mut b = [4.0f32];
            let mut st = OptimizerState::new(&o, &[3, 1]).unwrap();
            cpu::step(
                &o,
                &mut st,
                &mut [&mut a, &mut b],
                &[&[0.1, f32::NAN, 0.2], &[0.3]],
            )
            .unwrap();
            assert!(
                a[1].is_nan(),
                "{}: NaN gradient did not reach the parameter",
                RULES[rule]
            );
            assert!(
                a[0].is_finite() && a[2].is_finite() && b[0].is_finite(),
                "{}: {a:?} {b:?}",
                RULES[rule]
            );
        }
    }
}

#[test]
fn decay_follows_iterations_from_zero() {
    let o = make(0, 0.5).with_decay(0.25).unwrap();
    let mut st = OptimizerState::new(&o, &[1]).unwrap();
    let mut p = [0.0f32];
    let mut want = 0.0f64;
    for it in 0..4 {
        cpu::step(&o, &mut st, &mut [&mut p], &[&[1.0]]).unwrap();
        want -= 0.5 / (1.0 + 0.25 * it as f64);
    }
    assert_close("sgd with decay", &p, &[want], Tol::new(0.0, 1e-6));
}

#[test]
fn errors_name_op_and_sizes() {
    for lr in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        assert_err_mentions(Optimizer::sgd(lr, 0.0, false), "optimizer", &["lr"]);
    }
    assert_err_mentions(
        Optimizer::adam(0.1).unwrap().with_clipnorm(-1.0),
        "optimizer",
        &["clipnorm", "-1"],
    );
    assert_err_mentions(
        Optimizer::adam(0.1).unwrap().with_clipvalue(0.0),
        "optimizer",
        &["clipvalue", "0"],
    );
    assert_err_mentions(
        Optimizer::adam(0.1).unwrap().with_decay(-0.1),
        "optimizer",
        &["decay", "-0.1"],
    );
    assert_err_mentions(
        Optimizer::adam(0.1).unwrap().with_betas(1.0, 0.999),
        "optimizer",
        &["beta1", "1"],
    );
    assert_err_mentions(
        Optimizer::sgd(0.1, -0.5, false),
        "optimizer",
        &["momentum", "-0.5"],
    );
    assert_err_mentions(
        Optimizer::rmsprop(0.1).unwrap().with_rho(1.5),
        "optimizer",
        &["rho", "1.5"],
    );

    let o = make(5, 0.1);
    let mut st = OptimizerState::new(&o, &[5, 1]).unwrap();
    let mut a = [0.0f32; 5];
    let mut b = [0.0f32; 1];
    let mut a4 = [0.0f32; 4];
    let g5 = [0.0f32; 5];
    let g1 = [0.0f32; 1];
    assert_err_mentions(
        cpu::step(&o, &mut st, &mut [&mut a], &[&g5]),
        "optimizer.step",
        &["params", "number of tensors", "2", "1"],
    );
    assert_err_mentions(
        cpu::step(&o, &mut st, &mut [&mut a, &mut b], &[&g5]),
        "optimizer.step",
        &["grads", "2", "1"],
    );
    assert_err_mentions(
        cpu::step(&o, &mut st, &mut [&mut a4, &mut b], &[&g5, &g1]),
        "optimizer.step",
        &["params[0]", "5", "4"],
    );
    assert_err_mentions(
        cpu::step(&o, &mut st, &mut [&mut a, &mut b], &[&g5, &g5]),
        "optimizer.step",
        &["grads[1]", "1", "5"],
    );
    assert_eq!(st.iterations(), 0, "a failed step must not count");
    let mut bad = o;
    bad.lr = -1.0;
    assert_err_mentions(
        cpu::step(&bad, &mut st, &mut [&mut a, &mut b], &[&g5, &g1]),
        "optimizer",
        &["lr", "-1"],
    );
    let sgd = make(0, 0.1);
    assert_err_mentions(
        cpu::step(&sgd, &mut st, &mut [&mut a, &mut b], &[&g5, &g1]),
        "optimizer.step",
        &["Adam", "Sgd"],
    );
}
