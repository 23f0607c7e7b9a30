//! The CUDA backend against the CPU backend: every `Backend` method on small
//! random inputs, one whole training step of `keras-cnn`, a few steps of the
//! Fashion-MNIST `mlp`, and determinism of GPU training. Every test needs a
//! CUDA device.
mod common;

use common::{Rng, Tol, assert_err_mentions, check_close, data, to_f64};
use kestrel::backend::{Backend, CpuBackend, GpuBackend};
use kestrel::nn::{Act, Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential};
use kestrel::ops::activation::{Activation, Softmax};
use kestrel::ops::batchnorm::{BatchNorm, VarianceMode};
use kestrel::ops::bias::BiasShape;
use kestrel::ops::conv::{Conv2d, Padding};
use kestrel::ops::dropout::Dropout as DropoutOp;
use kestrel::ops::gemm::{Bias, Gemm};
use kestrel::ops::loss::LossParams;
use kestrel::ops::optim::Optimizer;
use kestrel::ops::pool::MaxPool2d;
use kestrel::train::{FitOptions, Loss, Targets};

/// Copies, masks, argmaxes, counts: the same bits on both backends.
const EXACT: Tol = Tol::new(0.0, 0.0);
/// GEMM and convolution: sums of at most ~150 products of values in
/// [-1, 1], added in a different order on each side (f32 rounding of the
/// partial sums, ~150 * 2^-24 * |terms|), plus fused-multiply-add contraction.
const MATMUL: Tol = Tol::new(2e-5, 1e-5);
/// Element-wise activations and softmax: CUDA's expf / tanhf differ from
/// Rust's by a couple of ulps.
const ELEMENTWISE: Tol = Tol::new(1e-6, 1e-5);
/// Batch normalization: f64 statistics on both sides; y and dx are f32
/// expressions the GPU may contract into FMAs (a few ulps of values up to ~4).
const BN: Tol = Tol::new(2e-5, 1e-5);
/// Sums of f32 over the batch in f64 (bias gradient), rounded once.
const SUMS: Tol = Tol::new(1e-6, 1e-6);
/// Losses: per-row log-sum-exp in a different order (warp lanes), then f64
/// sums: as tests/gpu_loss.rs.
const LOSS: Tol = Tol::new(2e-5, 1e-5);
/// One fused optimizer step: the same f32 formula; sqrt/division may round
/// differently by an ulp (as tests/gpu_optim.rs).
const STEP: Tol = Tol::new(2e-6, 1e-5);

fn gpu() -> GpuBackend {
    GpuBackend::new(0).unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e}"))
}

type Outputs = Vec<(&'static str, Tol, Vec<f64>)>;

fn f64s(v: Vec<f32>) -> Vec<f64> {
    to_f64(&v)
}

/// Runs every `Backend` method on inputs drawn from `seed` and returns the
/// host copies of every output, named, with the tolerance a GPU result must
/// meet against the CPU's. Written once for any backend, so both sides run
/// exactly the same calls.
fn exercise<B: Backend>(b: &B, seed: u64) -> kestrel::Result<Outputs> {
    let mut out: Outputs = Vec::new();
    let mut rng = Rng::new(seed);
    let mut put = |name, tol, v: Vec<f64>| out.push((name, tol, v));

    // Buffers and transfers, empty ones included.
    let host = rng.vec(37, -1.0, 1.0);
    let mut a = b.upload_f32(&host)?;
    assert_eq!(b.len_f32(&a), 37);
    put("upload_f32", EXACT, f64s(b.download_f32(&a)?));
    let z = b.alloc_f32(5)?;
    put("alloc_f32", EXACT, f64s(b.download_f32(&z)?));
    put(
        "alloc_u32",
        EXACT,
        b.download_u32(&b.alloc_u32(3)?)?
            .iter()
            .map(|&v| v as f64)
            .collect(),
    );
    put(
        "alloc_u8",
        EXACT,
        b.download_u8(&b.alloc_u8(3)?)?
            .iter()
            .map(|&v| v as f64)
            .collect(),
    );
    let e = b.alloc_f32(0)?;
    assert_eq!(b.len_f32(&e), 0);
    assert!(b.download_f32(&e)?.is_empty());
    let mut e2 = b.upload_f32(&[])?;
    b.copy_f32(&e, &mut e2)?;
    b.upload_into_f32(&[], &mut e2)?;
    b.download_into_f32(&e2, &mut [])?;
    assert!(b.download_u32(&b.alloc_u32(0)?)?.is_empty());
    assert!(b.download_u8(&b.alloc_u8(0)?)?.is_empty());
    let host2 = rng.vec(37, -1.0, 1.0);
    b.upload_into_f32(&host2, &mut a)?;
    let mut c = b.alloc_f32(37)?;
    b.copy_f32(&a, &mut c)?;
    let mut back = vec![0.0f32; 37];
    b.download_into_f32(&c, &mut back)?;
    put("upload_into/copy/download_into", EXACT, f64s(back));
    let table = rng.vec(6 * 4, -1.0, 1.0);
    let mut rows = b.alloc_f32(3 * 4)?;
    b.upload_rows_f32(&table, 4, &[5, 0, 5], &mut rows)?;
    put("upload_rows_f32", EXACT, f64s(b.download_f32(&rows)?));
    let labels_table: Vec<u32> = (0..6).map(|i| (i * 7 % 5) as u32).collect();
    let mut lab = b.alloc_u32(4)?;
    b.upload_rows_u32(&labels_table, 1, &[1, 2, 3, 4], &mut lab)?;
    put(
        "upload_rows_u32",
        EXACT,
        b.download_u32(&lab)?.iter().map(|&v| v as f64).collect(),
    );
    assert!(
        b.upload_rows_f32(&table, 4, &[6], &mut b.alloc_f32(4)?)
            .is_err()
    );

    // GEMM, with each bias kind and a fused activation, and transposes.
    let (m, n, k) = (7, 13, 17);
    let ga = b.upload_f32(&rng.vec(m * k, -1.0, 1.0))?;
    let gb = b.upload_f32(&rng.vec(k * n, -1.0, 1.0))?;
    let row_bias = b.upload_f32(&rng.vec(m, -1.0, 1.0))?;
    let col_bias = b.upload_f32(&rng.vec(n, -1.0, 1.0))?;
    let c0 = rng.vec(m * n, -1.0, 1.0);
    let mut gc = b.upload_f32(&c0)?;
    b.gemm(
        &Gemm::new(m, n, k),
        &ga,
        &gb,
        &mut gc,
        Bias::None,
        Activation::LINEAR,
    )?;
    put("gemm", MATMUL, f64s(b.download_f32(&gc)?));
    let mut beta_gemm = Gemm::new(m, n, k);
    beta_gemm.alpha = 0.5;
    beta_gemm.beta = 0.75;
    let mut gc = b.upload_f32(&c0)?;
    b.gemm(
        &beta_gemm,
        &ga,
        &gb,
        &mut gc,
        Bias::PerRow(&row_bias),
        Activation::RELU,
    )?;
    put(
        "gemm alpha beta per-row relu",
        MATMUL,
        f64s(b.download_f32(&gc)?),
    );
    let mut gc = b.alloc_f32(m * n)?;
    b.gemm(
        &Gemm::new(m, n, k),
        &ga,
        &gb,
        &mut gc,
        Bias::PerCol(&col_bias),
        Activation::TANH,
    )?;
    put("gemm per-col tanh", MATMUL, f64s(b.download_f32(&gc)?));
    // A^T B with A stored [k, m]: reuse ga as [k, m] data (same length).
    let mut gt = b.alloc_f32(m * n)?;
    let ta = b.upload_f32(&rng.vec(k * m, -1.0, 1.0))?;
    let tb = b.upload_f32(&rng.vec(n * k, -1.0, 1.0))?;
    let gtr = Gemm::new(m, n, k).transpose(true, true);
    b.gemm(&gtr, &ta, &tb, &mut gt, Bias::None, Activation::LINEAR)?;
    put("gemm transposed", MATMUL, f64s(b.download_f32(&gt)?));

    // Convolution, with bias and a fused activation.
    let cp = Conv2d::new([3, 2, 7, 6], 4, [3, 3], [1, 1], Padding::Same)?;
    let cx = b.upload_f32(&rng.vec(3 * 2 * 7 * 6, -1.0, 1.0))?;
    let cw = b.upload_f32(&rng.vec(4 * 2 * 9, -1.0, 1.0))?;
    let cb = b.upload_f32(&rng.vec(4, -1.0, 1.0))?;
    let ylen = 3 * 4 * cp.out_h * cp.out_w;
    let mut cy = b.alloc_f32(ylen)?;
    b.conv_forward(&cp, &cx, &cw, Some(&cb), Activation::RELU, &mut cy)?;
    put("conv_forward", MATMUL, f64s(b.download_f32(&cy)?));
    let cs = Conv2d::new([3, 2, 7, 6], 4, [3, 2], [2, 1], Padding::Valid)?;
    let ylen2 = 3 * 4 * cs.out_h * cs.out_w;
    let mut cy3 = b.alloc_f32(ylen2)?;
    b.conv_forward(
        &cs,
        &cx,
        &b.upload_f32(&rng.vec(4 * 2 * 6, -1.0, 1.0))?,
        None,
        Activation::LINEAR,
        &mut cy3,
    )?;
    put(
        "conv_forward strided valid",
        MATMUL,
        f64s(b.download_f32(&cy3)?),
    );
    let dy = b.upload_f32(&rng.vec(ylen, -1.0, 1.0))?;
    let mut dx = b.alloc_f32(3 * 2 * 7 * 6)?;
    b.conv_backward_data(&cp, &dy, &cw, &mut dx)?;
    put("conv_backward_data", MATMUL, f64s(b.download_f32(&dx)?));
    let mut dw = b.alloc_f32(4 * 2 * 9)?;
    b.conv_backward_filter(&cp, &cx, &dy, &mut dw)?;
    // dW sums n*OH*OW = 126 products per element.
    put("conv_backward_filter", MATMUL, f64s(b.download_f32(&dw)?));
    // An empty batch.
    let ce = cp.with_batch(0);
    let mut y0 = b.alloc_f32(0)?;
    b.conv_forward(&ce, &e, &cw, Some(&cb), Activation::RELU, &mut y0)?;
    let mut dw0 = b.upload_f32(&rng.vec(4 * 2 * 9, -1.0, 1.0))?;
    b.conv_backward_filter(&ce, &e, &e, &mut dw0)?;
    put(
        "conv_backward_filter empty batch",
        EXACT,
        f64s(b.download_f32(&dw0)?),
    );

    // Max pooling (distinct values: no ties).
    let pp = MaxPool2d::new([2, 3, 7, 6], [2, 2], [2, 2], Padding::Same)?;
    let px: Vec<f32> = {
        let mut v: Vec<f32> = (0..2 * 3 * 7 * 6).map(|i| i as f32 * 0.01).collect();
        for i in (1..v.len()).rev() {
            v.swap(i, rng.below(i + 1));
        }
        v
    };
    let px = b.upload_f32(&px)?;
    let plen = 2 * 3 * pp.out_h * pp.out_w;
    let mut py = b.alloc_f32(plen)?;
    let mut am = b.alloc_u32(plen)?;
    b.maxpool_forward(&pp, &px, &mut py, &mut am)?;
    put("maxpool_forward y", EXACT, f64s(b.download_f32(&py)?));
    put(
        "maxpool_forward argmax",
        EXACT,
        b.download_u32(&am)?.iter().map(|&v| v as f64).collect(),
    );
    let mut py2 = b.alloc_f32(plen)?;
    b.maxpool_forward_inference(&pp, &px, &mut py2)?;
    put(
        "maxpool_forward_inference",
        EXACT,
        f64s(b.download_f32(&py2)?),
    );
    let pdy = b.upload_f32(&rng.vec(plen, -1.0, 1.0))?;
    let mut pdx = b.alloc_f32(2 * 3 * 7 * 6)?;
    b.maxpool_backward(&pp, &pdy, &am, &mut pdx)?;
    put("maxpool_backward", EXACT, f64s(b.download_f32(&pdx)?));

    // Batch normalization (conv layout, then dense).
    for (name, bn) in [
        (
            "conv",
            BatchNorm::conv(3, 4, 5, 5)?.with_variance_mode(VarianceMode::Unbiased)?,
        ),
        ("dense", BatchNorm::dense(9, 6)?),
    ] {
        let len = bn.n * bn.c * bn.spatial;
        let x = b.upload_f32(&rng.vec(len, -2.0, 2.0))?;
        let gamma = b.upload_f32(&rng.vec(bn.c, 0.5, 1.5))?;
        let beta = b.upload_f32(&rng.vec(bn.c, -0.5, 0.5))?;
        let mut rm = b.upload_f32(&rng.vec(bn.c, -0.1, 0.1))?;
        let mut rv = b.upload_f32(&rng.vec(bn.c, 0.5, 1.5))?;
        let mut y = b.alloc_f32(len)?;
        let (mut sm, mut si) = (b.alloc_f32(bn.c)?, b.alloc_f32(bn.c)?);
        b.batchnorm_forward_training(
            &bn, &x, &gamma, &beta, &mut y, &mut sm, &mut si, &mut rm, &mut rv,
        )?;
        let _ = name;
        put(
            "batchnorm_forward_training y",
            BN,
            f64s(b.download_f32(&y)?),
        );
        put("batchnorm save_mean", BN, f64s(b.download_f32(&sm)?));
        put("batchnorm save_inv_std", BN, f64s(b.download_f32(&si)?));
        put("batchnorm running_mean", BN, f64s(b.download_f32(&rm)?));
        put("batchnorm running_var", BN, f64s(b.download_f32(&rv)?));
        let mut yi = b.alloc_f32(len)?;
        b.batchnorm_forward_inference(&bn, &x, &gamma, &beta, &rm, &rv, &mut yi)?;
        put(
            "batchnorm_forward_inference",
            BN,
            f64s(b.download_f32(&yi)?),
        );
        let dy = b.upload_f32(&rng.vec(len, -1.0, 1.0))?;
        let (mut dx, mut dg, mut db) = (b.alloc_f32(len)?, b.alloc_f32(bn.c)?, b.alloc_f32(bn.c)?);
        b.batchnorm_backward(&bn, &x, &dy, &gamma, &sm, &si, &mut dx, &mut dg, &mut db)?;
        put("batchnorm_backward dx", BN, f64s(b.download_f32(&dx)?));
        put("batchnorm_backward dgamma", BN, f64s(b.download_f32(&dg)?));
        put("batchnorm_backward dbeta", BN, f64s(b.download_f32(&db)?));
    }

    // Dropout: the same Philox masks.
    let dp = DropoutOp::new(101, 0.3, 1234, 77)?;
    let dxv = b.upload_f32(&rng.vec(101, -1.0, 1.0))?;
    let mut dyv = b.alloc_f32(101)?;
    let mut mask = b.alloc_u8(101)?;
    b.dropout_forward(&dp, &dxv, &mut dyv, &mut mask)?;
    put("dropout_forward y", EXACT, f64s(b.download_f32(&dyv)?));
    put(
        "dropout_forward mask",
        EXACT,
        b.download_u8(&mask)?.iter().map(|&v| v as f64).collect(),
    );
    let mut ddx = b.alloc_f32(101)?;
    b.dropout_backward(&dp, &dxv, &mask, &mut ddx)?;
    put("dropout_backward", EXACT, f64s(b.download_f32(&ddx)?));

    // Activations.
    let ax = b.upload_f32(&rng.vec(77, -3.0, 3.0))?;
    for act in [
        Activation::RELU,
        Activation::TANH,
        Activation::SIGMOID,
        Activation::elu(1.0),
        Activation::leaky_relu(0.3),
    ] {
        let mut ay = b.alloc_f32(77)?;
        b.activation_forward(act, &ax, &mut ay)?;
        put(
            "activation_forward",
            ELEMENTWISE,
            f64s(b.download_f32(&ay)?),
        );
        let g0 = rng.vec(77, -1.0, 1.0);
        let mut g = b.upload_f32(&g0)?;
        b.activation_backward_inplace(act, &ax, &ay, &mut g)?;
        put(
            "activation_backward_inplace",
            ELEMENTWISE,
            f64s(b.download_f32(&g)?),
        );
        let mut g = b.upload_f32(&g0)?;
        b.activation_backward_from_output(act, &ay, &mut g)?;
        put(
            "activation_backward_from_output",
            ELEMENTWISE,
            f64s(b.download_f32(&g)?),
        );
    }
    let sp = Softmax::new(7, 11)?;
    let sx = b.upload_f32(&rng.vec(77, -5.0, 5.0))?;
    let mut sy = b.alloc_f32(77)?;
    b.softmax_forward(&sp, &sx, &mut sy)?;
    put("softmax_forward", ELEMENTWISE, f64s(b.download_f32(&sy)?));
    let sdy = b.upload_f32(&rng.vec(77, -1.0, 1.0))?;
    let mut sdx = b.alloc_f32(77)?;
    b.softmax_backward(&sp, &sy, &sdy, &mut sdx)?;
    put("softmax_backward", ELEMENTWISE, f64s(b.download_f32(&sdx)?));
    let bs = BiasShape::conv(3, 5, 7)?;
    let bdy = b.upload_f32(&rng.vec(3 * 5 * 7, -1.0, 1.0))?;
    let mut bdb = b.alloc_f32(5)?;
    b.bias_backward(&bs, &bdy, &mut bdb)?;
    put("bias_backward", SUMS, f64s(b.download_f32(&bdb)?));

    // Losses and metrics, all into one scalars buffer.
    let lp = LossParams::new(9, 6)?;
    let logits = b.upload_f32(&rng.vec(54, -4.0, 4.0))?;
    let onehot: Vec<f32> = (0..54)
        .map(|i| ((i % 6) == (i / 6) % 6) as u8 as f32)
        .collect();
    let onehot = b.upload_f32(&onehot)?;
    let targets = b.upload_f32(&rng.vec(54, 0.0, 1.0))?;
    let sparse: Vec<u32> = (0..9).map(|i| (i * 5 % 6) as u32).collect();
    let mut sl = b.alloc_u32(9)?;
    b.upload_rows_u32(&sparse, 1, &(0..9).collect::<Vec<_>>(), &mut sl)?;
    let mut losses = b.alloc_f32(9)?;
    let mut dz = b.alloc_f32(54)?;
    let mut probs = b.alloc_f32(54)?;
    let mut sc = b.scalars_new(8)?;
    b.softmax_cross_entropy(
        &lp,
        &logits,
        &onehot,
        &mut losses,
        Some(&mut dz),
        &mut sc,
        0,
    )?;
    put(
        "softmax_cross_entropy losses",
        LOSS,
        f64s(b.download_f32(&losses)?),
    );
    put("softmax_cross_entropy dz", LOSS, f64s(b.download_f32(&dz)?));
    b.sparse_softmax_cross_entropy(&lp, &logits, &sl, &mut losses, Some(&mut dz), &mut sc, 1)?;
    put(
        "sparse_softmax_cross_entropy dz",
        LOSS,
        f64s(b.download_f32(&dz)?),
    );
    b.sigmoid_cross_entropy(
        &lp,
        &logits,
        &targets,
        &mut losses,
        &mut probs,
        Some(&mut dz),
        &mut sc,
        2,
    )?;
    put(
        "sigmoid_cross_entropy probs",
        LOSS,
        f64s(b.download_f32(&probs)?),
    );
    put("sigmoid_cross_entropy dz", LOSS, f64s(b.download_f32(&dz)?));
    b.mse(&lp, &logits, &targets, &mut losses, None, &mut sc, 3)?;
    b.categorical_accuracy(&lp, &logits, &onehot, &mut sc, 4)?;
    b.sparse_categorical_accuracy(&lp, &logits, &sl, &mut sc, 5)?;
    b.binary_accuracy(&lp, &probs, &targets, &mut sc, 6)?;
    b.mae(&lp, &probs, &targets, &mut sc, 7)?;
    let s = b.scalars_read(&sc, 8)?;
    put("loss means (cce, sparse, bce, mse)", LOSS, s[..4].to_vec());
    put("metric sums (cat, sparse, binary)", EXACT, s[4..7].to_vec());
    put("mae sum", LOSS, s[7..].to_vec());
    assert!(b.scalars_read(&sc, 9).is_err());
    assert!(b.mae(&lp, &probs, &targets, &mut sc, 8).is_err());

    // The optimizer: two RMSprop steps with clipnorm over three tensors
    // (one empty), then the state's round trip.
    let opt = Optimizer::rmsprop(1e-3)?
        .with_decay(1e-2)?
        .with_clipnorm(0.5)?;
    let sizes = [33usize, 0, 5000];
    let mut state = b.opt_state_new(&opt, &sizes)?;
    let mut ps: Vec<B::Buf> = sizes
        .iter()
        .map(|&n| b.upload_f32(&rng.vec(n, -1.0, 1.0)))
        .collect::<kestrel::Result<_>>()?;
    let gs: Vec<B::Buf> = sizes
        .iter()
        .map(|&n| b.upload_f32(&rng.vec(n, -1.0, 1.0)))
        .collect::<kestrel::Result<_>>()?;
    for _ in 0..2 {
        let mut pr: Vec<&mut B::Buf> = ps.iter_mut().collect();
        let gr: Vec<&B::Buf> = gs.iter().collect();
        b.optimizer_step(&opt, &mut state, &mut pr, &gr)?;
    }
    assert_eq!(b.opt_state_iterations(&state), 2);
    for p in &ps {
        put("optimizer_step params", STEP, f64s(b.download_f32(p)?));
    }
    let host_state = b.opt_state_download(&opt, &state)?;
    assert_eq!(host_state.iterations(), 2);
    for i in 0..sizes.len() {
        put(
            "opt_state slot0",
            STEP,
            to_f64(host_state.slots(i).unwrap().0),
        );
    }
    let back = b.opt_state_upload(&opt, &host_state)?;
    assert_eq!(b.opt_state_iterations(&back), 2);
    assert!(
        b.opt_state_download(&Optimizer::adam(1e-3)?, &state)
            .is_err()
    );
    b.synchronize()?;
    Ok(out)
}

#[test]
#[ignore = "needs a CUDA device"]
fn every_backend_method_matches_the_cpu() {
    let g = gpu();
    for seed in [1u64, 2, 3] {
        let want = exercise(&CpuBackend, seed).expect("cpu");
        let got = exercise(&g, seed).expect("gpu");
        assert_eq!(want.len(), got.len());
        for ((name, tol, w), (_, _, gv)) in want.iter().zip(&got) {
            let gv: Vec<f32> = gv.iter().map(|&v| v as f32).collect();
            // Compare the GPU's f32 values with the CPU's (exactly
            // representable in f32: every output is an f32 or a count).
            check_close(&format!("{name} (seed {seed})"), &gv, w, *tol).unwrap();
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn empty_batches_do_not_fail() {
    let g = gpu();
    let b0 = g.alloc_f32(0).unwrap();
    let mut b1 = g.upload_f32(&[]).unwrap();
    g.copy_f32(&b0, &mut b1).unwrap();
    g.activation_forward(Activation::RELU, &b0, &mut b1)
        .unwrap();
    let mut c = g.alloc_f32(0).unwrap();
    g.gemm(
        &Gemm::new(0, 5, 3),
        &b0,
        &g.alloc_f32(15).unwrap(),
        &mut c,
        Bias::None,
        Activation::LINEAR,
    )
    .unwrap();
    let mut s = g.scalars_new(0).unwrap();
    assert!(g.scalars_read(&s, 0).unwrap().is_empty());
    // A loss over no samples has no mean: the parameters are refused with an
    // error that says so (before anything reaches the device), never a panic.
    assert_err_mentions(LossParams::new(0, 3), "loss", &["batch size 0"]);
    // The smallest batch there is goes through.
    s = g.scalars_new(1).unwrap();
    let lp = LossParams::new(1, 3).unwrap();
    let logits = g.upload_f32(&[0.5, -1.0, 2.0]).unwrap();
    let mut l = g.alloc_f32(1).unwrap();
    let mut lab = g.alloc_u32(1).unwrap();
    g.upload_rows_u32(&[2], 1, &[0], &mut lab).unwrap();
    g.sparse_softmax_cross_entropy(&lp, &logits, &lab, &mut l, None, &mut s, 0)
        .unwrap();
    g.synchronize().unwrap();
    let want = -(2.0f64 - (0.5f64.exp() + (-1.0f64).exp() + 2.0f64.exp()).ln());
    let got = g.scalars_read(&s, 1).unwrap()[0];
    assert!(
        (got - want).abs() <= 1e-6,
        "loss of one sample {got}, want {want}"
    );
}

fn keras_cnn<B: Backend>(b: B, seed: u64) -> Sequential<B> {
    let mut m = Sequential::new(b, seed);
    m.add(Conv2D::new(32, 3).same().activation(Act::Relu))
        .add(Conv2D::new(32, 3).activation(Act::Relu))
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.25))
        .add(Conv2D::new(64, 3).same().activation(Act::Relu))
        .add(Conv2D::new(64, 3).activation(Act::Relu))
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.25))
        .add(Flatten)
        .add(Dense::new(512).activation(Act::Relu))
        .add(Dropout::new(0.5))
        .add(Dense::new(10).activation(Act::Softmax));
    m.build(&[3, 32, 32]).unwrap();
    m.compile(
        Optimizer::rmsprop(1e-4).unwrap().with_decay(1e-6).unwrap(),
        Loss::CategoricalCrossentropy,
        &[kestrel::train::Metric::Accuracy],
    )
    .unwrap();
    m
}

fn mlp<B: Backend>(b: B, seed: u64) -> Sequential<B> {
    let mut m = Sequential::new(b, seed);
    m.add(Flatten)
        .add(Dense::new(300).activation(Act::Relu))
        .add(Dense::new(100).activation(Act::Relu))
        .add(Dense::new(10).activation(Act::Softmax));
    m.build(&[1, 28, 28]).unwrap();
    m.compile(
        Optimizer::sgd(0.01, 0.0, false).unwrap(),
        Loss::SparseCategoricalCrossentropy,
        &[kestrel::train::Metric::Accuracy],
    )
    .unwrap();
    m
}

fn quiet<'a, B: Backend>(batch_size: usize, epochs: usize) -> FitOptions<'a, B> {
    FitOptions {
        batch_size,
        epochs,
        verbose: 0,
        ..Default::default()
    }
}

fn one_hot(labels: &[u32], classes: usize) -> Vec<f32> {
    let mut v = vec![0.0; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        v[i * classes + l as usize] = 1.0;
    }
    v
}

/// The loss of one step: log-sum-exp over 10 classes in a different order,
/// then a batch mean of 32 in f64, on logits computed through five GEMM-like
/// layers that each reassociate their sums (relative ~1e-6 each).
const CNN_LOSS_REL: f64 = 1e-5;
/// Weights after one RMSprop step from the same start. The first step moves
/// each weight by `lr * g / (sqrt(0.1 g^2) + 1e-7)`, about `3.2 * lr *
/// sign(g)` where `|g| >> 1e-7`: insensitive to the gradient's rounding
/// there, but where `|g|` is itself at the level of the rounding
/// differences (~1e-8) the update can move by up to `lr * 2|dg| / 1e-7 ~
/// 2e-5`. Far below the 3.2e-4 of a real step, so a wrong gradient sign or
/// a missed update still fails.
const CNN_WEIGHTS: Tol = Tol::new(2e-5, 1e-5);

fn assert_weights_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: Tol) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        check_close(&format!("{what} tensor {i}"), g, &to_f64(w), tol).unwrap();
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn keras_cnn_training_step_matches_the_cpu() {
    let n = 32;
    let x = data(7, n * 3 * 32 * 32, 0.0, 1.0);
    let labels: Vec<u32> = (0..n).map(|i| (i * 7 % 10) as u32).collect();
    let y = one_hot(&labels, 10);
    let mut cpu = keras_cnn(CpuBackend, 5);
    let mut gpu_m = keras_cnn(gpu(), 5);
    // The same weights to start (drawn on the host from the same seed).
    let w0 = cpu.get_weights().unwrap();
    assert_weights_close("initial weights", &gpu_m.get_weights().unwrap(), &w0, EXACT);
    let hc = cpu.fit(&x, Targets::Dense(&y), quiet(32, 1)).unwrap();
    let hg = gpu_m.fit(&x, Targets::Dense(&y), quiet(32, 1)).unwrap();
    let (lc, lg) = (hc.get("loss").unwrap()[0], hg.get("loss").unwrap()[0]);
    assert!(
        (lc - lg).abs() <= CNN_LOSS_REL * lc.abs(),
        "loss: gpu {lg}, cpu {lc}"
    );
    assert_eq!(hc.get("accuracy"), hg.get("accuracy"));
    let (wc, wg) = (cpu.get_weights().unwrap(), gpu_m.get_weights().unwrap());
    assert_weights_close("weights after one step", &wg, &wc, CNN_WEIGHTS);
    // The step did move the weights (the test would pass vacuously otherwise).
    assert!(wc.iter().zip(&w0).any(|(a, b)| a != b));
    assert_eq!(gpu_m.optimizer_iterations().unwrap(), 1);
}

/// Five SGD steps of the mlp: differences compound a little from step to
/// step, but SGD's update is linear in the gradient (lr * dg ~ 1e-2 * 1e-6).
const MLP_WEIGHTS: Tol = Tol::new(1e-6, 1e-5);
const MLP_LOSS_REL: f64 = 1e-5;

#[test]
#[ignore = "needs a CUDA device"]
fn mlp_training_steps_match_the_cpu() {
    let n = 160;
    let x = data(11, n * 28 * 28, 0.0, 1.0);
    let labels: Vec<u32> = (0..n).map(|i| (i * 3 % 10) as u32).collect();
    let mut cpu = mlp(CpuBackend, 9);
    let mut gpu_m = mlp(gpu(), 9);
    let hc = cpu.fit(&x, Targets::Sparse(&labels), quiet(32, 2)).unwrap();
    let hg = gpu_m
        .fit(&x, Targets::Sparse(&labels), quiet(32, 2))
        .unwrap();
    for (c, g) in hc.get("loss").unwrap().iter().zip(hg.get("loss").unwrap()) {
        assert!(
            (c - g).abs() <= MLP_LOSS_REL * c.abs(),
            "loss: gpu {g}, cpu {c}"
        );
    }
    assert_weights_close(
        "mlp weights",
        &gpu_m.get_weights().unwrap(),
        &cpu.get_weights().unwrap(),
        MLP_WEIGHTS,
    );
    // evaluate and predict agree as well.
    let ec = cpu.evaluate(&x, Targets::Sparse(&labels), 50).unwrap();
    let eg = gpu_m.evaluate(&x, Targets::Sparse(&labels), 50).unwrap();
    let (a, b) = (ec.get("loss").unwrap(), eg.get("loss").unwrap());
    assert!(
        (a - b).abs() <= MLP_LOSS_REL * a.abs(),
        "evaluate loss: gpu {b}, cpu {a}"
    );
    let pc = cpu.predict(&x, 64).unwrap();
    let pg = gpu_m.predict(&x, 64).unwrap();
    check_close("predict", &pg, &to_f64(&pc), LOSS).unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_training_is_deterministic() {
    let n = 64;
    let x = data(3, n * 3 * 32 * 32, 0.0, 1.0);
    let labels: Vec<u32> = (0..n).map(|i| (i % 10) as u32).collect();
    let y = one_hot(&labels, 10);
    let run = || {
        let mut m = keras_cnn(gpu(), 21);
        let h = m.fit(&x, Targets::Dense(&y), quiet(32, 2)).unwrap();
        (h.get("loss").unwrap().to_vec(), m.get_weights().unwrap())
    };
    let (l1, w1) = run();
    let (l2, w2) = run();
    assert_eq!(l1, l2, "losses differ between identical runs");
    for (i, (a, b)) in w1.iter().zip(&w2).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "tensor {i} differs between identical runs");
    }
}
