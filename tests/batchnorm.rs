//! Batch normalization against a two-pass f64 definition and central
//! finite differences of it.

mod common;

use common::*;
use kestrel::ops::batchnorm::{BatchNorm, VarianceMode, cpu};
use proptest::prelude::*;

/// y = gamma * x_hat + beta with |gamma|, |beta| <= 2 and |x_hat| up to
/// sqrt(m) (~10 here): the f32 forward rounds the mean, inv_std, the
/// subtraction, two products and a sum, each 6e-8 relative to values up
/// to ~|gamma * x_hat| + |beta|, so a few 1e-6 absolute; the mean of data
/// offset by up to 5 adds |mean| * 6e-8 * inv_std. 1e-5 covers both with
/// margin while a wrong formula (say the unbiased variance, 1/m ~ 1%)
/// misses by orders of magnitude.
const FWD_TOL: Tol = Tol::new(1e-5, 1e-5);

/// Saved mean and inv_std: f64 sums rounded once to f32 (half an ulp).
const STAT_TOL: Tol = Tol::new(1e-7, 2e-7);

/// Running statistics: two f32 products and a sum of rounded inputs.
const RUNNING_TOL: Tol = Tol::new(1e-7, 1e-6);

/// Backward vs central differences (h = 1e-3 on inputs of order 1,
/// truncation ~h^2 * |f'''| ~ 1e-6 with inv_std up to ~30 in the small
/// batches drawn here) and the f32 rounding of dx's terms (each O(|gamma| *
/// inv_std) ~ 10, times 1e-7).
const BWD_TOL: Tol = Tol::new(5e-5, 5e-5);

/// The training forward in f64, written plainly: per channel, mean and
/// biased variance over (n, spatial), then normalize.
/// Returns (y, mean, biased var).
fn train_def(
    p: &BatchNorm,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (n, c, s) = (p.n, p.c, p.spatial);
    let m = (n * s) as f64;
    let eps = p.epsilon as f64;
    let mut y = vec![0.0; x.len()];
    let mut means = vec![0.0; c];
    let mut vars = vec![0.0; c];
    for ch in 0..c {
        let mut sum = 0.0;
        for i in 0..n {
            for k in 0..s {
                sum += x[(i * c + ch) * s + k];
            }
        }
        let mean = sum / m;
        let mut sq = 0.0;
        for i in 0..n {
            for k in 0..s {
                let d = x[(i * c + ch) * s + k] - mean;
                sq += d * d;
            }
        }
        let var = sq / m;
        for i in 0..n {
            for k in 0..s {
                let idx = (i * c + ch) * s + k;
                y[idx] = gamma[ch] * (x[idx] - mean) / (var + eps).sqrt() + beta[ch];
            }
        }
        means[ch] = mean;
        vars[ch] = var;
    }
    (y, means, vars)
}

/// The variance fed to the moving variance, from the documented formulas.
fn moving_variance_input(p: &BatchNorm, biased: f64) -> f64 {
    let m = (p.n * p.spatial) as f64;
    let eps = p.epsilon as f64;
    let keras = m / (m - (1.0 + eps));
    let bessel = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
    let factor = match p.variance_mode {
        VarianceMode::Keras => keras,
        VarianceMode::KerasFused => {
            if p.is_conv {
                bessel * keras
            } else {
                keras
            }
        }
        VarianceMode::TfKeras => {
            if p.is_conv {
                bessel
            } else {
                1.0
            }
        }
        VarianceMode::Biased => 1.0,
        VarianceMode::Unbiased => bessel,
    };
    biased * factor
}

const MODES: [VarianceMode; 5] = [
    VarianceMode::Keras,
    VarianceMode::KerasFused,
    VarianceMode::TfKeras,
    VarianceMode::Biased,
    VarianceMode::Unbiased,
];

fn shape() -> impl Strategy<Value = (usize, usize, usize, usize, bool)> {
    (dim(9), dim(5), dim(7), dim(7), any::<bool>()).prop_map(|(n, c, h, w, conv)| {
        if conv {
            (n, c, h, w, true)
        } else {
            (n, c, 1, 1, false)
        }
    })
}

fn params(n: usize, c: usize, h: usize, w: usize, conv: bool) -> BatchNorm {
    if conv {
        BatchNorm::conv(n, c, h, w).unwrap()
    } else {
        BatchNorm::dense(n, c).unwrap()
    }
}

struct Out {
    y: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
}

fn run_train(
    p: &BatchNorm,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rm0: &[f32],
    rv0: &[f32],
) -> Out {
    let mut o = Out {
        y: vec![f32::NAN; x.len()],
        mean: vec![f32::NAN; p.c],
        inv_std: vec![f32::NAN; p.c],
        rm: rm0.to_vec(),
        rv: rv0.to_vec(),
    };
    cpu::forward_training(
        p,
        x,
        gamma,
        beta,
        &mut o.y,
        &mut o.mean,
        &mut o.inv_std,
        &mut o.rm,
        &mut o.rv,
    )
    .unwrap();
    o
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn training_forward_and_running_stats_match_definition(
        (n, c, h, w, conv) in shape(),
        mode_i in 0usize..5,
        offset in -5.0f32..5.0,
        seed: u64,
    ) {
        let p = params(n, c, h, w, conv).with_variance_mode(MODES[mode_i]).unwrap();
        let x = data(seed, p.len(), offset - 1.0, offset + 1.0);
        let gamma = data(seed ^ 1, c, -2.0, 2.0);
        let beta = data(seed ^ 2, c, -2.0, 2.0);
        let rm0 = data(seed ^ 3, c, -1.0, 1.0);
        let rv0 = data(seed ^ 4, c, 0.5, 2.0);
        let o = run_train(&p, &x, &gamma, &beta, &rm0, &rv0);
        let (y, mean, var) = train_def(&p, &to_f64(&x), &to_f64(&gamma), &to_f64(&beta));
        let r = check_close("y", &o.y, &y, FWD_TOL);
        prop_assert!(r.is_ok(), "{:?}: {}", p, r.unwrap_err());
        let r = check_close("save_mean", &o.mean, &mean, STAT_TOL);
        prop_assert!(r.is_ok(), "{:?}: {}", p, r.unwrap_err());
        let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + p.epsilon as f64).sqrt()).collect();
        let r = check_close("save_inv_std", &o.inv_std, &inv, STAT_TOL);
        prop_assert!(r.is_ok(), "{:?}: {}", p, r.unwrap_err());
        let mom = p.momentum as f64;
        let want_rm: Vec<f64> = (0..c).map(|ch| rm0[ch] as f64 * mom + mean[ch] * (1.0 - mom)).collect();
        let want_rv: Vec<f64> = (0..c)
            .map(|ch| rv0[ch] as f64 * mom + moving_variance_input(&p, var[ch]) * (1.0 - mom))
            .collect();
        let r = check_close("running_mean", &o.rm, &want_rm, RUNNING_TOL);
        prop_assert!(r.is_ok(), "{:?}: {}", p, r.unwrap_err());
        let r = check_close("running_var", &o.rv, &want_rv, RUNNING_TOL);
        prop_assert!(r.is_ok(), "{:?}: {}", p, r.unwrap_err());
    }

    #[test]
    fn inference_forward_matches_definition((n, c, h, w, conv) in shape(), seed: u64) {
        let p = params(n, c, h, w, conv);
        let x = data(seed, p.len(), -3.0, 3.0);
        let gamma = data(seed ^ 1, c, -2.0, 2.0);
        let beta = data(seed ^ 2, c, -2.0, 2.0);
        let rm = data(seed ^ 3, c, -1.0, 1.0);
        let rv = data(seed ^ 4, c, 0.0, 2.0);
        let mut y = vec![f32::NAN; p.len()];
        cpu::forward_inference(&p, &x, &gamma, &beta, &rm, &rv, &mut y).unwrap();
        let eps = p.epsilon as f64;
        let mut want = vec![0.0; p.len()];
        for i in 0..n {
            for ch in 0..c {
                for k in 0..p.spatial {
                    let idx = (i * c + ch) * p.spatial + k;
                    want[idx] = gamma[ch] as f64 * (x[idx] as f64 - rm[ch] as f64)
                        / (rv[ch] as f64 + eps).sqrt()
                        + beta[ch] as f64;
                }
            }
        }
        // rv may be ~0, so inv_std up to 1/sqrt(eps) ~ 32 amplifies the
        // f32 rounding of x - rm (|x - rm| <= 4): 4 * 6e-8 * 32 * |gamma| ~ 2e-5.
        let r = check_close("inference y", &y, &want, Tol::new(5e-5, 1e-5));
        prop_assert!(r.is_ok(), "{:?}: {}", p, r.unwrap_err());
    }

    #[test]
    fn backward_matches_finite_differences(
        n in 1usize..5, c in 1usize..4, h in 1usize..4, w in 1usize..3, conv: bool, seed: u64,
    ) {
        let p = if conv { params(n, c, h, w, true) } else { params(n, c, 1, 1, false) };
        let x = data(seed, p.len(), -2.0, 2.0);
        let gamma = data(seed ^ 1, c, -2.0, 2.0);
        let beta = data(seed ^ 2, c, -2.0, 2.0);
        let dy = data(seed ^ 5, p.len(), -1.0, 1.0);
        let o = run_train(&p, &x, &gamma, &beta, &vec![0.0; c], &vec![1.0; c]);
        let mut dx = vec![f32::NAN; p.len()];
        let mut dgamma = vec![f32::NAN; c];
        let mut dbeta = vec![f32::NAN; c];
        cpu::backward(&p, &x, &dy, &gamma, &o.mean, &o.inv_std, &mut dx, &mut dgamma, &mut dbeta).unwrap();

        let (x64, g64, b64, dy64) = (to_f64(&x), to_f64(&gamma), to_f64(&beta), to_f64(&dy));
        // The reference is differentiated in f64, so a small step costs no
        // accuracy (roundoff ~1e-16/h), while a large one does: with n = 2
        // and two close samples the variance is near epsilon and the
        // normalization curves sharply (truncation error ~ h^2 f''' / 6
        // reached 1e-4 at h = 1e-3).
        let h_fd = 1e-5;
        let want_dx = finite_diff(|xs| dot(&dy64, &train_def(&p, xs, &g64, &b64).0), &x64, h_fd);
        let want_dg = finite_diff(|gs| dot(&dy64, &train_def(&p, &x64, gs, &b64).0), &g64, h_fd);
        let want_db = finite_diff(|bs| dot(&dy64, &train_def(&p, &x64, &g64, bs).0), &b64, h_fd);
        for (what, got, want) in [("dx", &dx, &want_dx), ("dgamma", &dgamma, &want_dg), ("dbeta", &dbeta, &want_db)] {
            let r = check_close(what, got, want, BWD_TOL);
            prop_assert!(r.is_ok(), "{:?}: {}", p, r.unwrap_err());
        }
    }
}

#[test]
fn large_batch_statistics_are_accurate() {
    // m = 128 * 32 * 32 = 131072 samples per channel, with a mean far from
    // 0 relative to the spread: a naive f32 running sum or E[x^2] - E[x]^2
    // would be off in the 4th digit.
    let p = BatchNorm::conv(128, 2, 32, 32).unwrap();
    let mut x = data(42, p.len(), -1.0, 1.0);
    for (i, v) in x.iter_mut().enumerate() {
        *v += if (i / 1024) % 2 == 0 { 30.0 } else { -7.0 };
    }
    let gamma = [1.5, 0.5];
    let beta = [0.25, -1.0];
    let o = run_train(&p, &x, &gamma, &beta, &[0.0; 2], &[1.0; 2]);
    let (y, mean, var) = train_def(&p, &to_f64(&x), &to_f64(&gamma), &to_f64(&beta));
    assert_close("mean", &o.mean, &mean, STAT_TOL);
    let inv: Vec<f64> = var
        .iter()
        .map(|v| 1.0 / (v + 1e-3f32 as f64).sqrt())
        .collect();
    assert_close("inv_std", &o.inv_std, &inv, STAT_TOL);
    // x - mean near 30 loses |30| * 6e-8 * inv_std(~1.7) ~ 3e-6 to rounding.
    assert_close("y", &o.y, &y, FWD_TOL);
}

#[test]
fn single_sample_dense_gives_beta() {
    // N = 1 dense: the variance is 0, x_hat = 0, y = beta exactly.
    for mode in MODES {
        let p = BatchNorm::dense(1, 6)
            .unwrap()
            .with_variance_mode(mode)
            .unwrap();
        let x = data(9, 6, -3.0, 3.0);
        let gamma = data(10, 6, -2.0, 2.0);
        let beta = data(11, 6, -2.0, 2.0);
        let rv0 = [1.0f32; 6];
        let o = run_train(&p, &x, &gamma, &beta, &[0.0; 6], &rv0);
        assert_eq!(o.y, beta, "{mode:?}");
        assert_eq!(o.mean, x, "{mode:?}");
        // The moving variance only decays (the batch variance is 0 in every
        // mode: no division by zero for m = 1).
        for &v in &o.rv {
            assert!((v - 0.99).abs() < 1e-7, "{mode:?}: running var {v}");
        }
        let mut dx = vec![f32::NAN; 6];
        let (mut dg, mut db) = (vec![0.0; 6], vec![0.0; 6]);
        let dy = data(12, 6, -1.0, 1.0);
        cpu::backward(
            &p, &x, &dy, &gamma, &o.mean, &o.inv_std, &mut dx, &mut dg, &mut db,
        )
        .unwrap();
        assert!(dx.iter().all(|&v| v == 0.0), "{mode:?}: dx {dx:?}");
        assert_eq!(db, dy, "{mode:?}");
    }
}

#[test]
fn nan_poisons_only_its_channel() {
    let p = BatchNorm::conv(3, 4, 5, 3).unwrap();
    let mut x = data(1, p.len(), -1.0, 1.0);
    let bad_ch = 2;
    let (img, k) = (1, 7);
    x[(img * 4 + bad_ch) * 15 + k] = f32::NAN;
    let gamma = [1.0; 4];
    let beta = [0.0; 4];
    let o = run_train(&p, &x, &gamma, &beta, &[0.0; 4], &[1.0; 4]);
    for i in 0..3 {
        for ch in 0..4 {
            for k in 0..15 {
                let v = o.y[(i * 4 + ch) * 15 + k];
                assert_eq!(v.is_nan(), ch == bad_ch, "y[{i},{ch},{k}] = {v}");
            }
        }
    }
    for ch in 0..4 {
        assert_eq!(o.rm[ch].is_nan(), ch == bad_ch);
        assert_eq!(o.rv[ch].is_nan(), ch == bad_ch);
    }
    let dy = data(2, p.len(), -1.0, 1.0);
    let mut dx = vec![0.0; p.len()];
    let (mut dg, mut db) = (vec![0.0; 4], vec![0.0; 4]);
    cpu::backward(
        &p, &x, &dy, &gamma, &o.mean, &o.inv_std, &mut dx, &mut dg, &mut db,
    )
    .unwrap();
    for (idx, v) in dx.iter().enumerate() {
        assert_eq!(v.is_nan(), (idx / 15) % 4 == bad_ch, "dx[{idx}] = {v}");
    }
    assert!(dg[bad_ch].is_nan() && !dg[0].is_nan());
}

#[test]
fn bit_identical_on_any_thread_count() {
    // Several reduction chunks per channel.
    let p = BatchNorm::conv(9, 3, 31, 33).unwrap();
    let x = data(3, p.len(), -2.0, 4.0);
    let dy = data(4, p.len(), -1.0, 1.0);
    let gamma = [1.0, -0.5, 2.0];
    let beta = [0.0, 1.0, -1.0];
    let run = || {
        let o = run_train(&p, &x, &gamma, &beta, &[0.0; 3], &[1.0; 3]);
        let mut dx = vec![0.0; p.len()];
        let (mut dg, mut db) = (vec![0.0; 3], vec![0.0; 3]);
        cpu::backward(
            &p, &x, &dy, &gamma, &o.mean, &o.inv_std, &mut dx, &mut dg, &mut db,
        )
        .unwrap();
        (o.y, o.mean, o.inv_std, o.rv, dx, dg, db)
    };
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    let many = rayon::ThreadPoolBuilder::new()
        .num_threads(5)
        .build()
        .unwrap()
        .install(run);
    assert!(one == many, "results differ between 1 and 5 threads");
}

#[test]
fn errors_name_the_op_and_sizes() {
    let p = BatchNorm::conv(2, 3, 2, 2).unwrap();
    let x = vec![0.0f32; 24];
    let mut y = vec![0.0f32; 24];
    let (mut m, mut s, mut rm, mut rv) = (vec![0.0; 3], vec![0.0; 3], vec![0.0; 3], vec![1.0; 3]);
    assert_err_mentions(
        cpu::forward_training(
            &p,
            &x[..23],
            &[1.0; 3],
            &[0.0; 3],
            &mut y,
            &mut m,
            &mut s,
            &mut rm,
            &mut rv,
        ),
        "batchnorm.forward_training",
        &["x", "24", "23"],
    );
    assert_err_mentions(
        cpu::forward_training(
            &p, &x, &[1.0; 2], &[0.0; 3], &mut y, &mut m, &mut s, &mut rm, &mut rv,
        ),
        "batchnorm.forward_training",
        &["gamma", "3", "2"],
    );
    assert_err_mentions(
        cpu::forward_inference(&p, &x, &[1.0; 3], &[0.0; 3], &[0.0; 3], &[1.0; 4], &mut y),
        "batchnorm.forward_inference",
        &["running_var", "3", "4"],
    );
    let (mut dg, mut db) = (vec![0.0; 3], vec![0.0; 3]);
    assert_err_mentions(
        cpu::backward(
            &p,
            &x,
            &x[..20],
            &[1.0; 3],
            &m,
            &s,
            &mut y,
            &mut dg,
            &mut db,
        ),
        "batchnorm.backward",
        &["dy", "24", "20"],
    );
    assert_err_mentions(
        BatchNorm::conv(0, 3, 2, 2),
        "batchnorm",
        &["n", "at least 1"],
    );
    assert_err_mentions(BatchNorm::dense(4, 0), "batchnorm", &["c", "at least 1"]);
    assert_err_mentions(p.with_momentum(1.5), "batchnorm", &["momentum", "1.5"]);
    assert_err_mentions(p.with_epsilon(0.0), "batchnorm", &["epsilon", "0"]);
    assert_err_mentions(p.with_epsilon(f32::NAN), "batchnorm", &["epsilon", "NaN"]);
    // Keras's m / (m - (1 + epsilon)) with m = 2, epsilon = 1.
    assert_err_mentions(
        BatchNorm::dense(2, 3).unwrap().with_epsilon(1.0),
        "batchnorm",
        &["epsilon", "m = 2"],
    );
    // A struct edited after construction is checked again.
    let mut bad = p;
    bad.momentum = -0.1;
    assert_err_mentions(
        cpu::forward_inference(&bad, &x, &[1.0; 3], &[0.0; 3], &[0.0; 3], &[1.0; 3], &mut y),
        "batchnorm.forward_inference",
        &["momentum", "-0.1"],
    );
}

/// Every instruction-set level this CPU runs (`cpu_isa`) gives the same
/// bits: the spatial path's kernels are built per level from one body that
/// multiplies and adds separately (no FMA), in a lane order fixed by the
/// shape. Runs of 1023 (not a multiple of the 32 lanes) over several
/// chunks; the portable level is also checked against the f64 definition.
#[test]
fn every_isa_level_gives_the_same_bits() {
    use kestrel::cpu_isa::{Isa, with_isa};
    let p = BatchNorm::conv(9, 3, 31, 33).unwrap();
    let x = data(5, p.len(), -2.0, 4.0);
    let dy = data(6, p.len(), -1.0, 1.0);
    let gamma = [1.0, -0.5, 2.0];
    let beta = [0.0, 1.0, -1.0];
    let run = || {
        let o = run_train(&p, &x, &gamma, &beta, &[0.0; 3], &[1.0; 3]);
        let mut dx = vec![f32::NAN; p.len()];
        let (mut dg, mut db) = (vec![f32::NAN; 3], vec![f32::NAN; 3]);
        cpu::backward(
            &p, &x, &dy, &gamma, &o.mean, &o.inv_std, &mut dx, &mut dg, &mut db,
        )
        .unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let all = [&o.y, &o.mean, &o.inv_std, &o.rm, &o.rv, &dx, &dg, &db].map(|v| bits(v));
        (all, o.y)
    };
    let (base, y) = with_isa(Isa::Portable, run).unwrap();
    let (want, _, _) = train_def(&p, &to_f64(&x), &to_f64(&gamma), &to_f64(&beta));
    assert_close("portable y", &y, &want, FWD_TOL);
    for isa in Isa::available() {
        let (got, _) = with_isa(isa, run).unwrap();
        for (k, (g, b)) in got.iter().zip(&base).enumerate() {
            assert!(g == b, "{isa}: output {k} differs from portable");
        }
    }
}

/// The dense path (`spatial == 1`, the mlp's batch norms) runs along rows
/// in vectors, in chunks of 4096 samples and, when large, row blocks on
/// several threads. Its order is fixed: each channel's sums are f64 chains
/// over the samples in order within a chunk of 4096, the chunks added in
/// order, and every element's f32 arithmetic is the formula's, term by
/// term. Restated here plainly, one channel at a time, the bits must be
/// the same, on 1 and on 5 threads and at every ISA level this CPU runs.
///
/// The shapes: 3 chunks per channel and 70,000 elements (the parallel row
/// blocks) with fewer channels than a tile of 16; two chunks with 37
/// channels (two full tiles and a tail of 5); the mlp's 32 x 784 (49
/// tiles); one full tile alone; a single sample.
#[test]
fn dense_path_gives_the_plain_definitions_bits() {
    for (n, c) in [(10_000, 7), (4_099, 37), (32, 784), (3, 16), (1, 5)] {
        dense_path_matches_its_definition(n, c);
    }
}

fn dense_path_matches_its_definition(n: usize, c: usize) {
    const CHUNK: usize = 4096;
    let p = BatchNorm::dense(n, c).unwrap();
    let rm0 = data(25, c, -1.0, 1.0);
    let rv0 = data(26, c, 0.5, 2.0);
    let x = data(21, n * c, -3.0, 5.0);
    let dy = data(22, n * c, -1.0, 1.0);
    let gamma = data(23, c, -2.0, 2.0);
    let beta = data(24, c, -2.0, 2.0);
    // sum over samples of term(j, ch), in chunks, chained in order.
    let chained = |ch: usize, term: &dyn Fn(usize) -> f64| {
        let mut total = 0.0f64;
        for k in (0..n).step_by(CHUNK) {
            let mut part = 0.0f64;
            for j in k..(k + CHUNK).min(n) {
                part += term(j * c + ch);
            }
            total += part;
        }
        total
    };
    let m = n as f64;
    let (mut y, mut dx) = (vec![0.0f32; n * c], vec![0.0f32; n * c]);
    let (mut mean, mut istd) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
    for ch in 0..c {
        let mu = chained(ch, &|i| x[i] as f64) / m;
        let var = chained(ch, &|i| (x[i] as f64 - mu) * (x[i] as f64 - mu)) / m;
        mean[ch] = mu as f32;
        istd[ch] = (1.0 / (var + p.epsilon as f64).sqrt()) as f32;
        rm[ch] = rm[ch] * p.momentum + mean[ch] * (1.0 - p.momentum);
        rv[ch] = rv[ch] * p.momentum + ((var * p.variance_factor()) as f32) * (1.0 - p.momentum);
        let xh = |i: usize| (x[i] - mean[ch]) * istd[ch];
        for j in 0..n {
            let i = j * c + ch;
            y[i] = gamma[ch] * xh(i) + beta[ch];
        }
        let s_dy = chained(ch, &|i| dy[i] as f64);
        let s_dyx = chained(ch, &|i| dy[i] as f64 * xh(i) as f64);
        db[ch] = s_dy as f32;
        dg[ch] = s_dyx as f32;
        let (k, mdy, mdyx) = (gamma[ch] * istd[ch], (s_dy / m) as f32, (s_dyx / m) as f32);
        for j in 0..n {
            let i = j * c + ch;
            dx[i] = k * ((dy[i] - mdy) - xh(i) * mdyx);
        }
    }
    let want = (y, mean, istd, dx, dg, db, rm, rv);
    for isa in kestrel::cpu_isa::Isa::available() {
        for threads in [1, 5] {
            let got = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    kestrel::cpu_isa::with_isa(isa, || {
                        let o = run_train(&p, &x, &gamma, &beta, &rm0, &rv0);
                        let mut dx = vec![0.0; n * c];
                        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
                        cpu::backward(
                            &p, &x, &dy, &gamma, &o.mean, &o.inv_std, &mut dx, &mut dg, &mut db,
                        )
                        .unwrap();
                        (o.y, o.mean, o.inv_std, dx, dg, db, o.rm, o.rv)
                    })
                    .unwrap()
                });
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let pairs = [
                ("y", &got.0, &want.0),
                ("mean", &got.1, &want.1),
                ("inv_std", &got.2, &want.2),
                ("dx", &got.3, &want.3),
                ("dgamma", &got.4, &want.4),
                ("dbeta", &got.5, &want.5),
                ("running_mean", &got.6, &want.6),
                ("running_var", &got.7, &want.7),
            ];
            for (name, g, w) in pairs {
                assert!(
                    bits(g) == bits(w),
                    "{name} differs from the plain definition at {isa}, {threads} threads, {n} x {c}"
                );
            }
        }
    }
}
