//! GPU losses and metrics (`kernels/loss.cu`) against the CPU reference.
//! Every test needs a CUDA device and is ignored otherwise.

mod common;

use common::Rng;
use common::*;
use cudarc::driver::CudaSlice;
use kestrel::cuda::CudaBackend;
use kestrel::ops::loss::{LossParams, cpu, cuda};
use proptest::prelude::*;

/// Cross-entropy losses and log-probabilities, logits in [-10, 10]: the GPU
/// sums a row's exps per lane then across lanes (the CPU left to right), and
/// CUDA's expf/logf are within 2 ulp of Rust's; a loss of up to ~20 built
/// from `logsumexp` (~ln(classes) + 10) so carries a few 1e-6 absolute.
const XENT_TOL: Tol = Tol::new(2e-5, 1e-5);
/// Probabilities `exp((z - m) - ln_s)`: the absolute error of `ln_s` (~1e-6)
/// becomes a relative error of the probability.
const PROB_TOL: Tol = Tol::new(1e-7, 1e-5);
/// dz = gs * (p * sum_y - y), gs = 1/n: the probability's error scaled by
/// gs, plus the f32 rounding of the difference.
const DZ_TOL: Tol = Tol::new(1e-7, 1e-5);
/// Sigmoid cross-entropy: per element terms of size <= ~10, the row mean
/// summed in a different order; log1pf/expf within 2 ulp.
const BCE_TOL: Tol = Tol::new(1e-5, 1e-5);
/// Sigmoid probabilities: one expf and one division, within ~3 ulp.
const SIGMOID_TOL: Tol = Tol::new(1e-7, 1e-6);
/// MSE / MAE: sums of squares / absolute values in a different order
/// (f32, up to ~130 terms of size <= 4): ~1e-6 relative.
const MSE_TOL: Tol = Tol::new(1e-6, 1e-5);
/// MSE's dz: `gs * (a - b)` is the same two roundings on both sides.
const MSE_DZ_TOL: Tol = Tol::new(0.0, 0.0);

fn up(gpu: &CudaBackend, v: &[f32]) -> CudaSlice<f32> {
    gpu.upload(v).expect("upload")
}

fn down(gpu: &CudaBackend, v: &CudaSlice<f32>) -> Vec<f32> {
    gpu.download(v).expect("download")
}

/// Soft labels: random non-negative rows summing to ~1, with exact zeros
/// in about a third of the places (the y == 0 skip).
fn soft_labels(seed: u64, n: usize, c: usize) -> Vec<f32> {
    let mut r = Rng::new(seed);
    let mut y = vec![0.0f32; n * c];
    for row in y.chunks_mut(c) {
        for v in row.iter_mut() {
            *v = if r.below(3) == 0 {
                0.0
            } else {
                r.uniform(0.0, 1.0)
            };
        }
        let s: f32 = row.iter().sum();
        if s > 0.0 {
            row.iter_mut().for_each(|v| *v /= s);
        }
    }
    y
}

fn one_hot(labels: &[u32], c: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; labels.len() * c];
    for (i, &l) in labels.iter().enumerate() {
        y[i * c + l as usize] = 1.0;
    }
    y
}

fn sparse_labels(seed: u64, n: usize, c: usize) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(c) as u32).collect()
}

/// GPU (losses, probs, dz, mean) for one of the float-label losses.
type Outs = (Vec<f32>, Vec<f32>, Vec<f32>, f64);

/// Runs an `*_into_with` loss on `version` into a fresh device total and
/// returns the total divided by `divisor` (what the host forms return).
fn total_with(
    gpu: &CudaBackend,
    p: &LossParams,
    divisor: f64,
    f: impl FnOnce(
        &mut cudarc::driver::CudaViewMut<'_, f64>,
        &mut cuda::LossScratch,
    ) -> kestrel::Result<()>,
) -> kestrel::Result<f64> {
    let mut total = gpu.zeros::<f64>(1)?;
    let mut scratch = cuda::LossScratch::new(gpu, p)?;
    f(&mut total.as_view_mut(), &mut scratch)?;
    Ok(gpu.download(&total)?[0] / divisor)
}

fn gpu_xent(
    version: cuda::LossKernel,
    gpu: &CudaBackend,
    p: &LossParams,
    z: &[f32],
    y: &[f32],
    sigmoid: bool,
) -> Outs {
    let (dz_in, dy) = (up(gpu, z), up(gpu, y));
    let mut losses = poisoned(gpu, p.n);
    let mut probs = poisoned(gpu, p.len());
    let mut dz = poisoned(gpu, p.len());
    let f = if sigmoid {
        cuda::sigmoid_cross_entropy_into_with
    } else {
        cuda::softmax_cross_entropy_into_with
    };
    let mean = total_with(gpu, p, p.n as f64, |t, s| {
        f(
            gpu,
            version,
            p,
            &dz_in.as_view(),
            &dy.as_view(),
            &mut losses.as_view_mut(),
            Some(&mut probs.as_view_mut()),
            Some(&mut dz.as_view_mut()),
            t,
            s,
        )
    })
    .expect("gpu loss");
    (down(gpu, &losses), down(gpu, &probs), down(gpu, &dz), mean)
}

fn cpu_xent(
    p: &LossParams,
    z: &[f32],
    y: &[f32],
    sigmoid: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
    let mut losses = vec![0.0f32; p.n];
    let mut probs = vec![0.0f32; p.len()];
    let mut dz = vec![0.0f32; p.len()];
    let f = if sigmoid {
        cpu::sigmoid_cross_entropy
    } else {
        cpu::softmax_cross_entropy
    };
    let mean = f(p, z, y, &mut losses, Some(&mut probs), Some(&mut dz)).unwrap();
    (to_f64(&losses), to_f64(&probs), to_f64(&dz), mean)
}

fn check_mean(what: &str, got: f64, want: f64, tol: Tol) -> Result<(), String> {
    check_close(what, &[got as f32], &[want], tol)
}

fn gpu_sparse(
    version: cuda::LossKernel,
    gpu: &CudaBackend,
    p: &LossParams,
    z: &[f32],
    labels: &[u32],
) -> kestrel::Result<Outs> {
    let dz_in = up(gpu, z);
    let dl = gpu.upload(labels).expect("upload");
    let mut losses = poisoned(gpu, p.n);
    let mut probs = poisoned(gpu, p.len());
    let mut dz = poisoned(gpu, p.len());
    let mean = total_with(gpu, p, p.n as f64, |t, s| {
        cuda::sparse_softmax_cross_entropy_into_with(
            gpu,
            version,
            p,
            &dz_in.as_view(),
            &dl.as_view(),
            &mut losses.as_view_mut(),
            Some(&mut probs.as_view_mut()),
            Some(&mut dz.as_view_mut()),
            t,
            s,
        )
    })?;
    Ok((down(gpu, &losses), down(gpu, &probs), down(gpu, &dz), mean))
}

fn gpu_mse(
    version: cuda::LossKernel,
    gpu: &CudaBackend,
    p: &LossParams,
    x: &[f32],
    y: &[f32],
) -> (Vec<f32>, Vec<f32>, f64) {
    let (dx, dy) = (up(gpu, x), up(gpu, y));
    let mut losses = poisoned(gpu, p.n);
    let mut dz = poisoned(gpu, p.len());
    let mean = total_with(gpu, p, p.n as f64, |t, s| {
        cuda::mse_into_with(
            gpu,
            version,
            p,
            &dx.as_view(),
            &dy.as_view(),
            &mut losses.as_view_mut(),
            Some(&mut dz.as_view_mut()),
            t,
            s,
        )
    })
    .expect("gpu mse");
    (down(gpu, &losses), down(gpu, &dz), mean)
}

fn shape() -> impl Strategy<Value = (usize, usize, u64, f32)> {
    // Up to 300 rows (many warps and blocks), classes past one warp's 32
    // lanes, and a gradient scale other than 1 now and then.
    (
        dim(300),
        dim(129),
        any::<u64>(),
        prop_oneof![3 => Just(1.0f32), 1 => -4.0f32..4.0],
    )
}

fn params(n: usize, c: usize, gs: f32) -> LossParams {
    LossParams::new(n, c).unwrap().with_grad_scale(gs).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn softmax_xent_matches_cpu(kernel in version::<cuda::LossKernel>(), (n, c, seed, gs) in shape()) {
        let gpu = gpu();
        let p = params(n, c, gs);
        let z = data(seed, p.len(), -10.0, 10.0);
        let y = if seed % 2 == 0 { soft_labels(seed ^ 1, n, c) } else { one_hot(&sparse_labels(seed ^ 1, n, c), c) };
        let (gl, gp, gd, gm) = gpu_xent(kernel, &gpu, &p, &z, &y, false);
        let (cl, cp, cd, cm) = cpu_xent(&p, &z, &y, false);
        let r = check_close("losses", &gl, &cl, XENT_TOL)
            .and_then(|_| check_close("probs", &gp, &cp, PROB_TOL))
            .and_then(|_| check_close("dz", &gd, &cd, Tol::new(DZ_TOL.abs * gs.abs().max(1.0) as f64, DZ_TOL.rel)))
            .and_then(|_| check_mean("mean", gm, cm, XENT_TOL));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn sparse_softmax_xent_matches_cpu(kernel in version::<cuda::LossKernel>(), (n, c, seed, gs) in shape()) {
        let gpu = gpu();
        let p = params(n, c, gs);
        let z = data(seed, p.len(), -10.0, 10.0);
        let labels = sparse_labels(seed ^ 1, n, c);
        let (gl, gp, gd, gm) = gpu_sparse(kernel, &gpu, &p, &z, &labels).expect("gpu sparse");
        let mut cl = vec![0.0f32; n];
        let mut cp = vec![0.0f32; p.len()];
        let mut cd = vec![0.0f32; p.len()];
        let cm = cpu::sparse_softmax_cross_entropy(&p, &z, &labels, &mut cl, Some(&mut cp), Some(&mut cd)).unwrap();
        let r = check_close("losses", &gl, &to_f64(&cl), XENT_TOL)
            .and_then(|_| check_close("probs", &gp, &to_f64(&cp), PROB_TOL))
            .and_then(|_| check_close("dz", &gd, &to_f64(&cd), Tol::new(DZ_TOL.abs * gs.abs().max(1.0) as f64, DZ_TOL.rel)))
            .and_then(|_| check_mean("mean", gm, cm, XENT_TOL));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn sigmoid_xent_matches_cpu(kernel in version::<cuda::LossKernel>(), (n, c, seed, gs) in shape()) {
        let gpu = gpu();
        let p = params(n, c, gs);
        let z = data(seed, p.len(), -10.0, 10.0);
        let y = data(seed ^ 1, p.len(), 0.0, 1.0);
        let (gl, gp, gd, gm) = gpu_xent(kernel, &gpu, &p, &z, &y, true);
        let (cl, cp, cd, cm) = cpu_xent(&p, &z, &y, true);
        let r = check_close("losses", &gl, &cl, BCE_TOL)
            .and_then(|_| check_close("probs", &gp, &cp, SIGMOID_TOL))
            .and_then(|_| check_close("dz", &gd, &cd, SIGMOID_TOL))
            .and_then(|_| check_mean("mean", gm, cm, BCE_TOL));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn mse_matches_cpu(kernel in version::<cuda::LossKernel>(), (n, c, seed, gs) in shape()) {
        let gpu = gpu();
        let p = params(n, c, gs);
        let x = data(seed, p.len(), -1.0, 1.0);
        let y = data(seed ^ 1, p.len(), -1.0, 1.0);
        let (gl, gd, gm) = gpu_mse(kernel, &gpu, &p, &x, &y);
        let mut cl = vec![0.0f32; n];
        let mut cd = vec![0.0f32; p.len()];
        let cm = cpu::mse(&p, &x, &y, &mut cl, Some(&mut cd)).unwrap();
        let r = check_close("losses", &gl, &to_f64(&cl), MSE_TOL)
            .and_then(|_| check_close("dz", &gd, &to_f64(&cd), MSE_DZ_TOL))
            .and_then(|_| check_mean("mean", gm, cm, MSE_TOL));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    /// Accuracies are integer counts: exactly the CPU's. Scores quantized to
    /// a few values give ties (first maximum wins), and one row in 8 gets a
    /// NaN (the first NaN wins).
    #[test]
    #[ignore = "needs a CUDA device"]
    fn metrics_match_cpu(kernel in version::<cuda::LossKernel>(), (n, c, seed, _gs) in shape()) {
        let gpu = gpu();
        let p = params(n, c, 1.0);
        let mut r = Rng::new(seed);
        let mut scores: Vec<f32> = (0..p.len()).map(|_| r.below(4) as f32).collect();
        for i in 0..n {
            if r.below(8) == 0 {
                scores[i * c + r.below(c)] = f32::NAN;
            }
        }
        let labels = sparse_labels(seed ^ 1, n, c);
        let onehot = one_hot(&labels, c);
        let probs: Vec<f32> = (0..p.len()).map(|_| [0.0, 0.25, 0.5, 0.75, 1.0, f32::NAN][r.below(6)]).collect();
        let targets: Vec<f32> = (0..p.len()).map(|_| [0.0, 1.0, 0.5][r.below(3)]).collect();
        let pred = data(seed ^ 2, p.len(), -1.0, 1.0);

        let (ds, doh, dp, dt, dpr) = (up(&gpu, &scores), up(&gpu, &onehot), up(&gpu, &probs), up(&gpu, &targets), up(&gpu, &pred));
        let dl = gpu.upload(&labels).unwrap();
        // The device totals of `kernel` (the host forms' divisors: 1, and
        // `classes` for binary accuracy's count of matching elements).
        let g_cat = total_with(&gpu, &p, 1.0, |t, s|
            cuda::categorical_accuracy_into_with(&gpu, kernel, &p, &ds.as_view(), &doh.as_view(), t, s)).unwrap();
        let g_sp = total_with(&gpu, &p, 1.0, |t, s|
            cuda::sparse_categorical_accuracy_into_with(&gpu, kernel, &p, &ds.as_view(), &dl.as_view(), t, s)).unwrap();
        let g_bin = total_with(&gpu, &p, p.classes as f64, |t, s|
            cuda::binary_accuracy_rows_into_with(&gpu, kernel, &p, &dp.as_view(), &dt.as_view(), t, s)).unwrap();
        let g_mae = total_with(&gpu, &p, 1.0, |t, s|
            cuda::mae_into_with(&gpu, kernel, &p, &dpr.as_view(), &dt.as_view(), t, s)).unwrap();
        // The host forms are the same totals.
        prop_assert_eq!(g_cat, cuda::categorical_accuracy_alloc(&gpu, &p, &ds.as_view(), &doh.as_view()).unwrap());
        prop_assert_eq!(g_bin, cuda::binary_accuracy_alloc(&gpu, &p, &dp.as_view(), &dt.as_view()).unwrap());
        prop_assert_eq!(g_cat, cpu::categorical_accuracy(&p, &scores, &onehot).unwrap());
        prop_assert_eq!(g_sp, cpu::sparse_categorical_accuracy(&p, &scores, &labels).unwrap());
        prop_assert_eq!(g_bin, cpu::binary_accuracy(&p, &probs, &targets).unwrap());
        let c_mae = cpu::mae(&p, &pred, &targets).unwrap();
        let r = check_mean("mae", g_mae, c_mae, Tol::new(MSE_TOL.abs * n as f64, MSE_TOL.rel));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// Logits of +-50 (no overflow in the shift), a NaN logit (its row NaN,
/// the other rows finite), an infinite logit (its row NaN), as the CPU.
#[test]
#[ignore = "needs a CUDA device"]
fn extreme_and_nan_logits_match_cpu() {
    let gpu = gpu();
    let (n, c) = (5, 37);
    let p = LossParams::new(n, c).unwrap();
    let mut z = data(7, n * c, -50.0, 50.0);
    z[0] = 50.0;
    z[1] = -50.0;
    z[c + 3] = f32::NAN;
    z[2 * c + 5] = f32::INFINITY;
    let y = soft_labels(8, n, c);
    for sigmoid in [false, true] {
        let (gl, gp, gd, gm) =
            gpu_xent(cuda::select(p.len(), gpu.info()), &gpu, &p, &z, &y, sigmoid);
        let (cl, cp, cd, cm) = cpu_xent(&p, &z, &y, sigmoid);
        assert!(cl[1].is_nan() && gl[1].is_nan(), "NaN row stays NaN");
        assert!(gm.is_nan() && cm.is_nan(), "the mean of a NaN row is NaN");
        assert_close("losses", &gl, &cl, XENT_TOL);
        assert_close("probs", &gp, &cp, PROB_TOL);
        assert_close("dz", &gd, &cd, DZ_TOL);
    }
    let labels = sparse_labels(9, n, c);
    let (gl, _, gd, _) =
        gpu_sparse(cuda::select(p.len(), gpu.info()), &gpu, &p, &z, &labels).unwrap();
    let mut cl = vec![0.0f32; n];
    let mut cd = vec![0.0f32; n * c];
    cpu::sparse_softmax_cross_entropy(&p, &z, &labels, &mut cl, None, Some(&mut cd)).unwrap();
    assert_close("sparse losses", &gl, &to_f64(&cl), XENT_TOL);
    assert_close("sparse dz", &gd, &to_f64(&cd), DZ_TOL);
}

/// More rows than one sum chunk (4096) squared, so the f64 batch sum takes
/// three passes (chunk sums, sums of those, the total); the mean still meets
/// the CPU's. On the emulated device, where one warp per row over 16.7M rows
/// takes hours, the same multi-pass property is held at a smaller size: the
/// loss over 4096 * 3 + 17 rows (two passes at the losses' chunk of 4096),
/// and the same deterministic sum with a chunk of 16 over those rows (four
/// passes), each against the CPU's f64 sum with the same tolerance.
#[test]
#[ignore = "needs a CUDA device"]
fn multi_pass_mean_matches_cpu() {
    let gpu = gpu();
    let emulated = gpu.info().is_emulated();
    let (n, c) = if emulated {
        (4096 * 3 + 17, 1)
    } else {
        (4096 * 4096 + 17, 1)
    };
    let p = LossParams::new(n, c).unwrap();
    let x = data(11, n, -1.0, 1.0);
    let y = data(12, n, -1.0, 1.0);
    let (gl, _, gm) = gpu_mse(cuda::select(p.len(), gpu.info()), &gpu, &p, &x, &y);
    let mut cl = vec![0.0f32; n];
    let cm = cpu::mse(&p, &x, &y, &mut cl, None).unwrap();
    assert_close("losses", &gl, &to_f64(&cl), MSE_TOL);
    // The sums differ only in f64 rounding of ~1.7e7 terms of size <= 4.
    assert!((gm - cm).abs() <= 1e-12, "mean {gm} vs {cm}");
    if emulated {
        let rows = up(&gpu, &gl);
        let total = cuda::sum_f32_alloc(&gpu, &rows.as_view(), 16).unwrap();
        let want: f64 = gl.iter().map(|&v| v as f64).sum();
        assert!(
            (total - want).abs() <= 1e-12 * n as f64,
            "four-pass sum {total} vs {want}"
        );
    }
}

/// The same inputs give bit-identical outputs and means, run to run.
#[test]
#[ignore = "needs a CUDA device"]
fn deterministic() {
    let gpu = gpu();
    let (n, c) = (9001, 67);
    let p = LossParams::new(n, c).unwrap();
    let z = data(21, n * c, -10.0, 10.0);
    let y = soft_labels(22, n, c);
    for sigmoid in [false, true] {
        let a = gpu_xent(cuda::select(p.len(), gpu.info()), &gpu, &p, &z, &y, sigmoid);
        let b = gpu_xent(cuda::select(p.len(), gpu.info()), &gpu, &p, &z, &y, sigmoid);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.0), bits(&b.0));
        assert_eq!(bits(&a.1), bits(&b.1));
        assert_eq!(bits(&a.2), bits(&b.2));
        assert_eq!(a.3.to_bits(), b.3.to_bits());
    }
    let labels = sparse_labels(23, n, c);
    let a = gpu_sparse(cuda::select(p.len(), gpu.info()), &gpu, &p, &z, &labels).unwrap();
    let b = gpu_sparse(cuda::select(p.len(), gpu.info()), &gpu, &p, &z, &labels).unwrap();
    assert_eq!(a.3.to_bits(), b.3.to_bits());
    let (dx, dy) = (up(&gpu, &z), up(&gpu, &y));
    let m1 = cuda::mae_alloc(&gpu, &p, &dx.as_view(), &dy.as_view()).unwrap();
    let m2 = cuda::mae_alloc(&gpu, &p, &dx.as_view(), &dy.as_view()).unwrap();
    assert_eq!(m1.to_bits(), m2.to_bits());
}

/// Wrong lengths fail before any launch, with the CPU's messages; an
/// out-of-range sparse label is found on the device and reported with its
/// row and value (the first bad row), never read out of bounds.
#[test]
#[ignore = "needs a CUDA device"]
fn errors() {
    let gpu = gpu();
    let p = LossParams::new(4, 3).unwrap();
    let z = up(&gpu, &[0.0; 12]);
    let short = up(&gpu, &[0.0; 11]);
    let mut losses = poisoned(&gpu, 4);
    let mut bad_losses = poisoned(&gpu, 5);
    assert_err_mentions(
        cuda::softmax_cross_entropy_alloc(
            &gpu,
            &p,
            &z.as_view(),
            &short.as_view(),
            &mut losses.as_view_mut(),
            None,
            None,
        ),
        "softmax_cross_entropy",
        &["labels", "12", "11"],
    );
    assert_err_mentions(
        cuda::sigmoid_cross_entropy_alloc(
            &gpu,
            &p,
            &short.as_view(),
            &z.as_view(),
            &mut losses.as_view_mut(),
            None,
            None,
        ),
        "sigmoid_cross_entropy",
        &["logits", "12", "11"],
    );
    assert_err_mentions(
        cuda::mse_alloc(
            &gpu,
            &p,
            &z.as_view(),
            &z.as_view(),
            &mut bad_losses.as_view_mut(),
            None,
        ),
        "mse",
        &["losses", "4", "5"],
    );
    let mut dz_short = poisoned(&gpu, 11);
    assert_err_mentions(
        cuda::softmax_cross_entropy_alloc(
            &gpu,
            &p,
            &z.as_view(),
            &z.as_view(),
            &mut losses.as_view_mut(),
            None,
            Some(&mut dz_short.as_view_mut()),
        ),
        "softmax_cross_entropy",
        &["dz", "12", "11"],
    );
    assert_err_mentions(
        cuda::mae_alloc(&gpu, &p, &z.as_view(), &short.as_view()),
        "mae",
        &["targets", "12", "11"],
    );
    assert_err_mentions(
        cuda::categorical_accuracy_alloc(&gpu, &p, &short.as_view(), &z.as_view()),
        "categorical_accuracy",
        &["scores", "12", "11"],
    );
    // Rows 1 and 3 are out of range; the error names the first.
    let labels = gpu.upload(&[0u32, 7, 2, 3]).unwrap();
    // The host form checks the labels (the `_into` forms leave that to the
    // caller: it would synchronize).
    let (zeros, mut losses) = (gpu.upload(&[0.0f32; 12]).unwrap(), poisoned(&gpu, 4));
    assert_err_mentions(
        cuda::sparse_softmax_cross_entropy_alloc(
            &gpu,
            &p,
            &zeros.as_view(),
            &labels.as_view(),
            &mut losses.as_view_mut(),
            None,
            None,
        ),
        "sparse_softmax_cross_entropy",
        &["row 1", "class index 7", "classes = 3"],
    );
    assert_err_mentions(
        cuda::sparse_categorical_accuracy_alloc(&gpu, &p, &z.as_view(), &labels.as_view()),
        "sparse_categorical_accuracy",
        &["row 1", "class index 7"],
    );
    let few = gpu.upload(&[0u32, 1, 2]).unwrap();
    assert_err_mentions(
        cuda::sparse_categorical_accuracy_alloc(&gpu, &p, &z.as_view(), &few.as_view()),
        "sparse_categorical_accuracy",
        &["labels", "4", "3"],
    );
    // The backend still works after a reported label error.
    gpu.synchronize().unwrap();
}

/// Every host-form loss and metric of `p` on `seed`'s data through
/// `scratch`, as bits: the means and the per-row losses.
fn all_losses(gpu: &CudaBackend, p: &LossParams, seed: u64, s: &mut cuda::LossScratch) -> Vec<u64> {
    let z = up(gpu, &data(seed, p.len(), -3.0, 3.0));
    let labels = sparse_labels(seed ^ 1, p.n, p.classes);
    let y = up(gpu, &one_hot(&labels, p.classes));
    let t = up(gpu, &data(seed ^ 2, p.len(), 0.0, 1.0));
    let dl = gpu.upload(&labels).unwrap();
    let mut losses = poisoned(gpu, p.n);
    let mut out = Vec::new();
    let mut push = |v: f64, losses: &cudarc::driver::CudaSlice<f32>| {
        out.push(v.to_bits());
        out.extend(down(gpu, losses).iter().map(|x| x.to_bits() as u64));
    };
    let v = cuda::softmax_cross_entropy(
        gpu,
        p,
        &z.as_view(),
        &y.as_view(),
        &mut losses.as_view_mut(),
        None,
        None,
        s,
    );
    push(v.unwrap(), &losses);
    let v = cuda::sparse_softmax_cross_entropy(
        gpu,
        p,
        &z.as_view(),
        &dl.as_view(),
        &mut losses.as_view_mut(),
        None,
        None,
        s,
    );
    push(v.unwrap(), &losses);
    let v = cuda::sigmoid_cross_entropy(
        gpu,
        p,
        &z.as_view(),
        &t.as_view(),
        &mut losses.as_view_mut(),
        None,
        None,
        s,
    );
    push(v.unwrap(), &losses);
    let v = cuda::mse(
        gpu,
        p,
        &z.as_view(),
        &t.as_view(),
        &mut losses.as_view_mut(),
        None,
        s,
    );
    push(v.unwrap(), &losses);
    for v in [
        cuda::categorical_accuracy(gpu, p, &z.as_view(), &y.as_view(), s),
        cuda::sparse_categorical_accuracy(gpu, p, &z.as_view(), &dl.as_view(), s),
        cuda::binary_accuracy(gpu, p, &t.as_view(), &y.as_view(), s),
        cuda::mae(gpu, p, &z.as_view(), &t.as_view(), s),
        cuda::sum_f32(gpu, &z.as_view(), 16, s),
    ] {
        out.push(v.unwrap().to_bits());
    }
    out
}

#[test]
#[ignore = "needs a CUDA device"]
fn reused_scratch_matches_fresh_scratch() {
    let gpu = gpu();
    // 4096 * 2 + 5 rows: a two-pass sum; its z summed in chunks of 16
    // (8197 * 2 values) takes four passes, alternating the two buffers.
    let big = LossParams::new(4096 * 2 + 5, 2).unwrap();
    let small = LossParams::new(7, 3).unwrap();
    let lens =
        |p: &LossParams| cuda::LossScratch::lens(p).max(cuda::LossScratch::sum_lens(p.len(), 16));
    assert_eq!(
        lens(&big),
        cuda::LossScratchLens {
            sum_a: 1025,
            sum_b: 65,
            rows: 8197
        }
    );
    let mut shared = cuda::LossScratch::with_lens(&gpu, lens(&big)).unwrap();
    assert!(shared.fits(&big) && shared.fits(&small));
    for (p, seed) in [(&big, 1u64), (&small, 2), (&big, 3)] {
        let reused = all_losses(&gpu, p, seed, &mut shared);
        let mut fresh = cuda::LossScratch::with_lens(&gpu, lens(p)).unwrap();
        assert_eq!(
            reused,
            all_losses(&gpu, p, seed, &mut fresh),
            "{p:?} seed {seed}"
        );
        // A label error leaves the shared scratch usable: the next call's
        // counter starts from zero.
        let z = up(&gpu, &vec![0.0; p.len()]);
        let mut bad = vec![0u32; p.n];
        bad[p.n - 1] = 9;
        let bad = gpu.upload(&bad).unwrap();
        assert_err_mentions(
            cuda::sparse_categorical_accuracy(&gpu, p, &z.as_view(), &bad.as_view(), &mut shared),
            "sparse_categorical_accuracy",
            &["class index 9"],
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn too_small_scratch_is_refused() {
    let gpu = gpu();
    let p = LossParams::new(4096 * 2 + 1, 2).unwrap();
    let z = up(&gpu, &vec![0.0; p.len()]);
    let mut losses = poisoned(&gpu, p.n);
    let mut s = cuda::LossScratch::new(&gpu, &LossParams::new(4, 3).unwrap()).unwrap();
    assert!(!s.fits(&p));
    assert_err_mentions(
        cuda::mse(
            &gpu,
            &p,
            &z.as_view(),
            &z.as_view(),
            &mut losses.as_view_mut(),
            None,
            &mut s,
        ),
        "mse",
        &["scratch first-pass sums", "at least 3", "1"],
    );
    let mut total = gpu.zeros::<f64>(1).unwrap();
    assert_err_mentions(
        cuda::mse_into(
            &gpu,
            &p,
            &z.as_view(),
            &z.as_view(),
            &mut losses.as_view_mut(),
            None,
            &mut total.as_view_mut(),
            &mut s,
        ),
        "mse",
        &["scratch first-pass sums"],
    );
    let lens = cuda::LossScratchLens {
        rows: 4,
        ..cuda::LossScratch::lens(&p)
    };
    let mut s = cuda::LossScratch::with_lens(&gpu, lens).unwrap();
    assert_err_mentions(
        cuda::mae(&gpu, &p, &z.as_view(), &z.as_view(), &mut s),
        "mae",
        &["scratch per-row values", "at least 8193", "4"],
    );
    assert_err_mentions(
        cuda::sum_f32(&gpu, &z.as_view(), 16, &mut s),
        "loss.sum",
        &["scratch first-pass sums", "at least 1025"],
    );
}
