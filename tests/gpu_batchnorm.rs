//! GPU batch normalization against the CPU reference.
mod common;

use common::*;
use kestrel::cuda::KernelVersion;
use kestrel::ops::batchnorm::{BatchNorm, VarianceMode, cpu, cuda};
use proptest::prelude::*;

/// Saved and running statistics: f64 sums in another association, rounded
/// once to f32: within one f32 ulp (2^-23 relative) of the CPU's.
const STAT_TOL: Tol = Tol::new(1e-7, 2.4e-7);
/// y and dx: a few f32 operations, possibly fused into fmas, on statistics
/// up to one ulp apart. The inputs are offset by up to 30, so a one-ulp
/// difference in save_mean (ulp(32) = 3.8e-6) times gamma * inv_std (< 2)
/// moves y by up to ~8e-6 even where y is near 0: hence the absolute 1e-5.
const OUT_TOL: Tol = Tol::new(1e-5, 1e-5);
/// dgamma, dbeta: f64 sums of f32 terms (dy * x_hat with x_hat possibly one
/// ulp off through save_inv_std), rounded once.
const PARAM_TOL: Tol = Tol::new(1e-5, 1e-5);

const MODES: [VarianceMode; 5] = [
    VarianceMode::Keras,
    VarianceMode::KerasFused,
    VarianceMode::TfKeras,
    VarianceMode::Biased,
    VarianceMode::Unbiased,
];

fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
    prop_oneof![
        (dim(129), dim(65), Just(1usize)),
        // Dense layers as they come: many features (more than one column
        // block, an odd count), batches around the 64-row chunks and prime.
        (
            proptest::sample::select(&[1usize, 2, 63, 64, 65, 131, 257][..]),
            1000usize..1300,
            Just(1usize),
        ),
        (dim(9), dim(17), dim(300)),
        (dim(3), dim(3), 4000usize..9000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn training_inference_backward_match_cpu(kernel in version::<cuda::BatchNormKernel>(), (n, c, sp) in shape(), seed: u64, mode_i in 0usize..5,
                                             is_conv: bool, offset in -3.0f32..3.0) {
        let gpu = gpu();
        let mut p = BatchNorm::new(n, c, sp, is_conv, 0.99, 1e-3, MODES[mode_i]);
        if p.is_err() {
            // m = 2 with Keras's correction at epsilon 1e-3 is valid; only a
            // division by zero is rejected, which these shapes never hit.
            p = BatchNorm::new(n, c, sp, is_conv, 0.99, 1e-3, VarianceMode::Biased);
        }
        let p = p.unwrap();
        let len = p.len();
        if !kernel.supports(&p) {
            // A version that does not run the shape is refused before any
            // launch, by name.
            let mut s = cuda::BatchNormScratch::new(&gpu, &p).unwrap();
            let c1 = gpu.upload(&vec![1.0f32; c]).unwrap();
            let xd = gpu.upload(&vec![1.0f32; len]).unwrap();
            let mut yd = poisoned(&gpu, len);
            let r = cuda::forward_inference_with(&gpu, kernel, &p, &xd.as_view(), &c1.as_view(), &c1.as_view(),
                &c1.as_view(), &c1.as_view(), &mut yd.as_view_mut(), &mut s);
            let e = r.expect_err("an unsupported version must be refused").to_string();
            prop_assert!(e.contains(kernel.name()) && e.contains("spatial"), "{}", e);
            return Ok(());
        }
        // An offset mean makes the two-pass variance matter.
        let x: Vec<f32> = data(seed, len, -2.0, 2.0).iter().map(|v| v + offset * 10.0).collect();
        let dy = data(seed ^ 1, len, -1.0, 1.0);
        let gamma = data(seed ^ 2, c, 0.5, 1.5);
        let beta = data(seed ^ 3, c, -0.5, 0.5);
        let rm0 = data(seed ^ 4, c, -1.0, 1.0);
        let rv0 = data(seed ^ 5, c, 0.5, 2.0);

        let (mut y, mut sm, mut sis, mut rm, mut rv) =
            (vec![0.0; len], vec![0.0; c], vec![0.0; c], rm0.clone(), rv0.clone());
        cpu::forward_training(&p, &x, &gamma, &beta, &mut y, &mut sm, &mut sis, &mut rm, &mut rv).unwrap();

        let up = |v: &[f32]| gpu.upload(v).unwrap();
        let mut scratch = cuda::BatchNormScratch::new(&gpu, &p).unwrap();
        let (xd, dyd, gd, bd) = (up(&x), up(&dy), up(&gamma), up(&beta));
        let (mut yd, mut smd, mut sisd) = (poisoned(&gpu, len), poisoned(&gpu, c), poisoned(&gpu, c));
        let (mut rmd, mut rvd) = (up(&rm0), up(&rv0));
        cuda::forward_training_with(&gpu, kernel, &p, &xd.as_view(), &gd.as_view(), &bd.as_view(), &mut yd.as_view_mut(),
            &mut smd.as_view_mut(), &mut sisd.as_view_mut(), &mut rmd.as_view_mut(), &mut rvd.as_view_mut(), &mut scratch).unwrap();
        let dl = |s: &cudarc::driver::CudaSlice<f32>| gpu.download(s).unwrap();
        for (what, got, want, tol) in [
            ("save_mean", dl(&smd), &sm, STAT_TOL),
            ("save_inv_std", dl(&sisd), &sis, STAT_TOL),
            ("running_mean", dl(&rmd), &rm, STAT_TOL),
            ("running_var", dl(&rvd), &rv, STAT_TOL),
            ("y", dl(&yd), &y, OUT_TOL),
        ] {
            let r = check_close(&format!("forward_training {what} {p:?}"), &got, &to_f64(want), tol);
            prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        }
        // Determinism of the statistics.
        let (mut y2, mut sm2, mut sis2) = (poisoned(&gpu, len), poisoned(&gpu, c), poisoned(&gpu, c));
        let (mut rm2, mut rv2) = (up(&rm0), up(&rv0));
        cuda::forward_training_with(&gpu, kernel, &p, &xd.as_view(), &gd.as_view(), &bd.as_view(), &mut y2.as_view_mut(),
            &mut sm2.as_view_mut(), &mut sis2.as_view_mut(), &mut rm2.as_view_mut(), &mut rv2.as_view_mut(), &mut scratch).unwrap();
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(dl(&y2)), bits(dl(&yd)));
        prop_assert_eq!(bits(dl(&sis2)), bits(dl(&sisd)));
        prop_assert_eq!(bits(dl(&rv2)), bits(dl(&rvd)));

        // Inference with the CPU's updated running statistics.
        let mut yi = vec![0.0; len];
        cpu::forward_inference(&p, &x, &gamma, &beta, &rm, &rv, &mut yi).unwrap();
        let (rmc, rvc) = (up(&rm), up(&rv));
        let mut yid = poisoned(&gpu, len);
        cuda::forward_inference_with(&gpu, kernel, &p, &xd.as_view(), &gd.as_view(), &bd.as_view(), &rmc.as_view(),
            &rvc.as_view(), &mut yid.as_view_mut(), &mut scratch).unwrap();
        let r = check_close("forward_inference y", &dl(&yid), &to_f64(&yi), OUT_TOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());

        // Backward from the CPU's saved statistics.
        let (mut dx, mut dg, mut db) = (vec![0.0; len], vec![0.0; c], vec![0.0; c]);
        cpu::backward(&p, &x, &dy, &gamma, &sm, &sis, &mut dx, &mut dg, &mut db).unwrap();
        let (smc, sisc) = (up(&sm), up(&sis));
        let (mut dxd, mut dgd, mut dbd) = (poisoned(&gpu, len), poisoned(&gpu, c), poisoned(&gpu, c));
        cuda::backward_with(&gpu, kernel, &p, &xd.as_view(), &dyd.as_view(), &gd.as_view(), &smc.as_view(), &sisc.as_view(),
            &mut dxd.as_view_mut(), &mut dgd.as_view_mut(), &mut dbd.as_view_mut(), &mut scratch).unwrap();
        for (what, got, want, tol) in [
            ("dx", dl(&dxd), &dx, OUT_TOL),
            ("dgamma", dl(&dgd), &dg, PARAM_TOL),
            ("dbeta", dl(&dbd), &db, PARAM_TOL),
        ] {
            let r = check_close(&format!("backward {what} {p:?}"), &got, &to_f64(want), tol);
            prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        }
        let (mut dx2, mut dg2, mut db2) = (poisoned(&gpu, len), poisoned(&gpu, c), poisoned(&gpu, c));
        cuda::backward_with(&gpu, kernel, &p, &xd.as_view(), &dyd.as_view(), &gd.as_view(), &smc.as_view(), &sisc.as_view(),
            &mut dx2.as_view_mut(), &mut dg2.as_view_mut(), &mut db2.as_view_mut(), &mut scratch).unwrap();
        prop_assert_eq!(bits(dl(&dx2)), bits(dl(&dxd)));
        prop_assert_eq!(bits(dl(&dg2)), bits(dl(&dgd)));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn nan_poisons_only_its_channel() {
    let gpu = gpu();
    let p = BatchNorm::conv(2, 3, 4, 5).unwrap();
    let mut x = data(1, p.len(), -1.0, 1.0);
    x[20 + 7] = f32::NAN; // image 0, channel 1
    let ones = gpu.upload(&[1.0f32; 3]).unwrap();
    let zeros = gpu.zeros::<f32>(3).unwrap();
    let xd = gpu.upload(&x).unwrap();
    let (mut y, mut sm, mut si) = (
        poisoned(&gpu, p.len()),
        poisoned(&gpu, 3),
        poisoned(&gpu, 3),
    );
    let (mut rm, mut rv) = (
        gpu.zeros::<f32>(3).unwrap(),
        gpu.upload(&[1.0f32; 3]).unwrap(),
    );
    cuda::forward_training_alloc(
        &gpu,
        &p,
        &xd.as_view(),
        &ones.as_view(),
        &zeros.as_view(),
        &mut y.as_view_mut(),
        &mut sm.as_view_mut(),
        &mut si.as_view_mut(),
        &mut rm.as_view_mut(),
        &mut rv.as_view_mut(),
    )
    .unwrap();
    let y = gpu.download(&y).unwrap();
    let rv = gpu.download(&rv).unwrap();
    for (i, v) in y.iter().enumerate() {
        let ch = (i / 20) % 3;
        assert_eq!(v.is_nan(), ch == 1, "y[{i}] = {v}");
        assert_ne!(v.to_bits(), POISON.to_bits(), "y[{i}] unwritten");
    }
    assert!(rv[1].is_nan() && rv[0].is_finite() && rv[2].is_finite());
}

#[test]
#[ignore = "needs a CUDA device"]
fn errors_name_the_op() {
    let gpu = gpu();
    let p = BatchNorm::dense(4, 3).unwrap();
    let x = gpu.upload(&[1.0f32; 12]).unwrap();
    let c3 = gpu.upload(&[1.0f32; 3]).unwrap();
    let c2 = gpu.upload(&[1.0f32; 2]).unwrap();
    let mut y = gpu.zeros::<f32>(12).unwrap();
    assert_err_mentions(
        cuda::forward_inference_alloc(
            &gpu,
            &p,
            &x.as_view(),
            &c3.as_view(),
            &c2.as_view(),
            &c3.as_view(),
            &c3.as_view(),
            &mut y.as_view_mut(),
        ),
        "batchnorm.forward_inference",
        &["beta", "3", "2"],
    );
    let mut y11 = gpu.zeros::<f32>(11).unwrap();
    let (mut a, mut b, mut c, mut d) = (
        gpu.zeros::<f32>(3).unwrap(),
        gpu.zeros::<f32>(3).unwrap(),
        gpu.zeros::<f32>(3).unwrap(),
        gpu.zeros::<f32>(3).unwrap(),
    );
    assert_err_mentions(
        cuda::forward_training_alloc(
            &gpu,
            &p,
            &x.as_view(),
            &c3.as_view(),
            &c3.as_view(),
            &mut y11.as_view_mut(),
            &mut a.as_view_mut(),
            &mut b.as_view_mut(),
            &mut c.as_view_mut(),
            &mut d.as_view_mut(),
        ),
        "batchnorm.forward_training",
        &["12", "11"],
    );
    assert_err_mentions(
        cuda::backward_alloc(
            &gpu,
            &p,
            &x.as_view(),
            &x.as_view(),
            &c3.as_view(),
            &c3.as_view(),
            &c2.as_view(),
            &mut y.as_view_mut(),
            &mut a.as_view_mut(),
            &mut b.as_view_mut(),
        ),
        "batchnorm.backward",
        &["save_inv_std", "3", "2"],
    );
}

/// Runs training forward, inference and backward for `p` on `seed`'s data
/// with `scratch`; returns every output, as bits.
fn run_all(
    kernel: cuda::BatchNormKernel,
    gpu: &kestrel::cuda::CudaBackend,
    p: &BatchNorm,
    seed: u64,
    scratch: &mut cuda::BatchNormScratch,
) -> Vec<Vec<u32>> {
    let (len, c) = (p.len(), p.c);
    let up = |v: &[f32]| gpu.upload(v).unwrap();
    let x = up(&data(seed, len, -2.0, 5.0));
    let dy = up(&data(seed ^ 1, len, -1.0, 1.0));
    let gamma = up(&data(seed ^ 2, c, 0.5, 1.5));
    let beta = up(&data(seed ^ 3, c, -0.5, 0.5));
    let (mut y, mut sm, mut sis) = (poisoned(gpu, len), poisoned(gpu, c), poisoned(gpu, c));
    let (mut rm, mut rv) = (up(&vec![0.0; c]), up(&vec![1.0; c]));
    cuda::forward_training_with(
        gpu,
        kernel,
        p,
        &x.as_view(),
        &gamma.as_view(),
        &beta.as_view(),
        &mut y.as_view_mut(),
        &mut sm.as_view_mut(),
        &mut sis.as_view_mut(),
        &mut rm.as_view_mut(),
        &mut rv.as_view_mut(),
        scratch,
    )
    .unwrap();
    let mut yi = poisoned(gpu, len);
    cuda::forward_inference_with(
        gpu,
        kernel,
        p,
        &x.as_view(),
        &gamma.as_view(),
        &beta.as_view(),
        &rm.as_view(),
        &rv.as_view(),
        &mut yi.as_view_mut(),
        scratch,
    )
    .unwrap();
    let (mut dx, mut dg, mut db) = (poisoned(gpu, len), poisoned(gpu, c), poisoned(gpu, c));
    cuda::backward_with(
        gpu,
        kernel,
        p,
        &x.as_view(),
        &dy.as_view(),
        &gamma.as_view(),
        &sm.as_view(),
        &sis.as_view(),
        &mut dx.as_view_mut(),
        &mut dg.as_view_mut(),
        &mut db.as_view_mut(),
        scratch,
    )
    .unwrap();
    [y, sm, sis, rm, rv, yi, dx, dg, db]
        .iter()
        .map(|b| {
            gpu.download(b)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn reused_scratch_matches_fresh_scratch() {
    let gpu = gpu();
    let p = BatchNorm::conv(4, 4, 1, 4000).unwrap(); // chunks = 4
    let small = BatchNorm::dense(7, 2).unwrap();
    let mut shared = cuda::BatchNormScratch::new(&gpu, &p).unwrap();
    assert!(shared.fits(&small) && shared.fits(&p));
    assert_eq!(
        cuda::BatchNormScratch::bytes(&p),
        16 * (4 * 4) + 8 * 4 + 4 * 12
    );
    // One scratch across calls with different data (and a smaller shape in
    // between, leaving other values in it) gives what fresh scratch gives.
    for (q, seed, &kernel) in [(&p, 1u64), (&small, 2), (&p, 3)]
        .into_iter()
        .flat_map(|(q, s)| cuda::BatchNormKernel::ALL.iter().map(move |k| (q, s, k)))
        .filter(|(q, _, k)| k.supports(q))
    {
        let reused = run_all(kernel, &gpu, q, seed, &mut shared);
        let fresh = run_all(
            kernel,
            &gpu,
            q,
            seed,
            &mut cuda::BatchNormScratch::new(&gpu, q).unwrap(),
        );
        assert_eq!(reused, fresh, "{q:?} seed {seed}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn too_small_scratch_is_refused() {
    let gpu = gpu();
    let p = BatchNorm::conv(2, 3, 2, 4096).unwrap(); // chunks = 4
    let mut s =
        cuda::BatchNormScratch::new(&gpu, &BatchNorm::conv(1, 3, 2, 4096).unwrap()).unwrap();
    assert!(!s.fits(&p));
    let x = gpu.upload(&vec![1.0f32; p.len()]).unwrap();
    let c3 = gpu.upload(&[1.0f32; 3]).unwrap();
    let mut y = gpu.zeros::<f32>(p.len()).unwrap();
    let (mut a, mut b, mut c, mut d) = (
        gpu.zeros::<f32>(3).unwrap(),
        gpu.zeros::<f32>(3).unwrap(),
        gpu.zeros::<f32>(3).unwrap(),
        gpu.zeros::<f32>(3).unwrap(),
    );
    assert_err_mentions(
        cuda::forward_training(
            &gpu,
            &p,
            &x.as_view(),
            &c3.as_view(),
            &c3.as_view(),
            &mut y.as_view_mut(),
            &mut a.as_view_mut(),
            &mut b.as_view_mut(),
            &mut c.as_view_mut(),
            &mut d.as_view_mut(),
            &mut s,
        ),
        "batchnorm.forward_training",
        &["scratch partial sums", "at least 12", "6"],
    );
    assert_err_mentions(
        cuda::backward(
            &gpu,
            &p,
            &x.as_view(),
            &x.as_view(),
            &c3.as_view(),
            &c3.as_view(),
            &c3.as_view(),
            &mut y.as_view_mut(),
            &mut a.as_view_mut(),
            &mut b.as_view_mut(),
            &mut s,
        ),
        "batchnorm.backward",
        &["scratch partial sums", "at least 12"],
    );
    let mut tiny = cuda::BatchNormScratch::new(&gpu, &BatchNorm::dense(4, 1).unwrap()).unwrap();
    assert_err_mentions(
        cuda::forward_inference(
            &gpu,
            &p,
            &x.as_view(),
            &c3.as_view(),
            &c3.as_view(),
            &c3.as_view(),
            &c3.as_view(),
            &mut y.as_view_mut(),
            &mut tiny,
        ),
        "batchnorm.forward_inference",
        &["scratch"],
    );
}

/// The column version on a dense shape with a prime batch (a partial last
/// chunk) and an odd feature count (a partial last column block): the same
/// bits on every run, with scratch left dirty by a run of the other
/// version in between, and within the statistics' tolerance of
/// `ChannelBlocks` (the same sums in another order).
#[test]
#[ignore = "needs a CUDA device"]
fn columns_are_deterministic() {
    let gpu = gpu();
    let p = BatchNorm::dense(131, 1031).unwrap();
    assert_eq!(
        cuda::select(&p, false, gpu.info()),
        cuda::BatchNormKernel::Columns
    );
    assert_eq!(
        cuda::select(&p, true, gpu.info()),
        cuda::BatchNormKernel::ColumnsVec4
    );
    let mut scratch = cuda::BatchNormScratch::new(&gpu, &p).unwrap();
    let first = run_all(cuda::BatchNormKernel::Columns, &gpu, &p, 7, &mut scratch);
    let other = run_all(
        cuda::BatchNormKernel::ChannelBlocks,
        &gpu,
        &p,
        7,
        &mut scratch,
    );
    let again = run_all(cuda::BatchNormKernel::Columns, &gpu, &p, 7, &mut scratch);
    assert_eq!(first, again);
    let f = |b: &Vec<u32>| b.iter().map(|&v| f32::from_bits(v)).collect::<Vec<_>>();
    // save_mean, save_inv_std, running_mean, running_var: the statistics.
    for i in [1, 2, 3, 4] {
        assert_close(
            &format!("columns vs channel blocks, output {i}"),
            &f(&first[i]),
            &to_f64(&f(&other[i])),
            STAT_TOL,
        );
    }
    // dgamma, dbeta.
    for i in [7, 8] {
        assert_close(
            &format!("columns vs channel blocks, output {i}"),
            &f(&first[i]),
            &to_f64(&f(&other[i])),
            PARAM_TOL,
        );
    }
}
