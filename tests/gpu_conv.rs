//! The CUDA convolution (`ops::conv::cuda`) against the CPU reference
//! (`ops::conv::cpu`): forward with and without bias + activation,
//! backward data, backward filter, im2col / col2im, Keras same / valid,
//! strides 1-3, kernels 1x1 / 3x3 / 5x5 / 1x3, empty and single-image
//! batches, the chunked path (small workspaces), the keras-cnn seed
//! network's layer shapes, determinism and argument errors, for every
//! algorithm (`ConvAlgo::ALL`); the implicit GEMM also across its tile
//! edges and with backward filter split into partial slabs.
//!
//! Every test needs a CUDA device and is ignored otherwise:
//! `cargo test --release --test gpu_conv -- --ignored`.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use kestrel::cuda::CudaBackend;
use kestrel::ops::activation::Activation;
use kestrel::ops::conv::cuda::ConvAlgo;
use kestrel::ops::conv::{Conv2d, Padding, cpu, cuda};
use proptest::prelude::*;

/// Every output is a sum of `terms` products of values in [-1, 1] (C*R*S
/// for y, K*R*S for dx, N*OH*OW for dw), in f32 on both sides in different
/// orders (the GPU with fma, and dw summed per chunk / partial sum). Each
/// side's error stays under ~1e-7 per term with random signs; 1e-6 per term
/// leaves an order of magnitude of slack while one misplaced term (~0.1)
/// still fails. The relative part covers the activations' few ulps.
const TOL_PER_TERM: f64 = 1e-6;

fn tol(terms: usize) -> Tol {
    Tol::new(TOL_PER_TERM * terms.max(1) as f64, 1e-5)
}

/// im2col copies and col2im adds in the CPU's (r, s) order starting from 0:
/// both are exact.
const EXACT: Tol = Tol::new(0.0, 0.0);

fn dev(gpu: &CudaBackend, v: &[f32]) -> CudaSlice<f32> {
    let mut h = v.to_vec();
    h.push(POISON); // a spare element, so that empty buffers allocate
    gpu.upload(&h).expect("upload")
}

fn host(gpu: &CudaBackend, d: &CudaSlice<f32>, len: usize) -> Vec<f32> {
    let mut v = gpu.download(d).expect("download");
    v.truncate(len);
    v
}

/// Which workspace a pass gets.
#[derive(Clone, Copy, Debug)]
enum Ws {
    /// `cuda::workspace_len_with` the algorithm under test: one chunk for
    /// these small shapes.
    Default,
    /// dW's partials reserve and room for this many images' columns plus a
    /// remainder (chunks).
    Images(usize, usize),
}

/// Runs forward, backward_data and backward_filter on both backends and
/// compares them, the GPU on `algo` (`None`: `cuda::select`'s choice).
fn check_all_with(
    gpu: &CudaBackend,
    algo: Option<ConvAlgo>,
    p: &Conv2d,
    bias: bool,
    act: Activation,
    ws: Ws,
    seed: u64,
) -> Result<(), String> {
    let mut rng = common::Rng::new(seed);
    let x = rng.vec(p.x_len(), -1.0, 1.0);
    let w = rng.vec(p.w_len(), -1.0, 1.0);
    let b = rng.vec(p.k, -1.0, 1.0);
    let dy = rng.vec(p.y_len(), -1.0, 1.0);
    let (dx_, dw_, db_, ddy) = (dev(gpu, &x), dev(gpu, &w), dev(gpu, &b), dev(gpu, &dy));
    let (xv, wv, bv, dyv) = (
        dx_.slice(..x.len()),
        dw_.slice(..w.len()),
        db_.slice(..p.k),
        ddy.slice(..dy.len()),
    );
    let algo = algo.unwrap_or_else(|| cuda::select(p, gpu.info()));
    let ws_len = match ws {
        Ws::Default => cuda::workspace_len_with(algo, p),
        Ws::Images(i, extra) => {
            cuda::partials_reserve(p) + i * cuda::col_floats_per_image(p) + extra
        }
    };
    // Poisoned: the passes must write what they read of it.
    let mut wsbuf = dev(gpu, &vec![POISON; ws_len]);
    macro_rules! ws {
        () => {
            &mut wsbuf.slice_mut(..ws_len)
        };
    }

    // forward
    let mut want = vec![0.0; p.y_len()];
    cpu::forward(p, &x, &w, bias.then_some(&b[..]), act, &mut want).unwrap();
    let mut y = dev(gpu, &vec![POISON; p.y_len()]);
    cuda::forward_with(
        gpu,
        algo,
        p,
        &xv,
        &wv,
        bias.then_some(&bv),
        act,
        &mut y.slice_mut(..p.y_len()),
        ws!(),
    )
    .map_err(|e| e.to_string())?;
    check_close(
        "y",
        &host(gpu, &y, p.y_len()),
        &to_f64(&want),
        tol(p.col_rows()),
    )?;

    // backward data
    let mut want = vec![0.0; p.x_len()];
    cpu::backward_data(p, &dy, &w, &mut want).unwrap();
    let mut dx = dev(gpu, &vec![POISON; p.x_len()]);
    cuda::backward_data_with(
        gpu,
        algo,
        p,
        &dyv,
        &wv,
        &mut dx.slice_mut(..p.x_len()),
        ws!(),
    )
    .map_err(|e| e.to_string())?;
    check_close(
        "dx",
        &host(gpu, &dx, p.x_len()),
        &to_f64(&want),
        tol(p.k * p.r * p.s),
    )?;

    // backward filter
    let mut want = vec![0.0; p.w_len()];
    cpu::backward_filter(p, &x, &dy, &mut want).unwrap();
    let mut dw = dev(gpu, &vec![POISON; p.w_len()]);
    cuda::backward_filter_with(
        gpu,
        algo,
        p,
        &xv,
        &dyv,
        &mut dw.slice_mut(..p.w_len()),
        ws!(),
    )
    .map_err(|e| e.to_string())?;
    check_close(
        "dw",
        &host(gpu, &dw, p.w_len()),
        &to_f64(&want),
        tol(p.n * p.out_h * p.out_w),
    )?;
    Ok(())
}

fn activation(i: u8) -> Activation {
    match i % 4 {
        0 => Activation::LINEAR,
        1 => Activation::RELU,
        2 => Activation::elu(1.0),
        _ => Activation::SIGMOID,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random layers (Keras same / valid, strides 1-3, kernels up to 5x5,
    /// non-square, empty and single-image batches) on all three passes, with
    /// every algorithm (`ConvAlgo::ALL`).
    #[test]
    #[ignore = "needs a CUDA device"]
    fn matches_cpu(
        n in 0usize..4, c in 1usize..6, h in dim(13), w in dim(13), k in 1usize..9,
        kernel in prop::sample::select(vec![(1usize, 1usize), (3, 3), (5, 5), (1, 3), (3, 1), (2, 5)]),
        stride in (1usize..4, 1usize..4), same: bool, bias: bool, act in 0u8..4, seed: u64,
    ) {
        let padding = if same { Padding::Same } else { Padding::Valid };
        prop_assume!(same || (kernel.0 <= h && kernel.1 <= w));
        let p = Conv2d::new([n, c, h, w], k, [kernel.0, kernel.1], [stride.0, stride.1], padding)
            .unwrap();
        let gpu = gpu();
        for algo in ConvAlgo::ALL {
            let r = check_all_with(&gpu, Some(algo), &p, bias, activation(act), Ws::Default, seed);
            prop_assert!(r.is_ok(), "{:?} {:?}: {}", algo, p, r.unwrap_err());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The implicit GEMM on layers that cross its 64 x 64 x 16 tiles in
    /// every dimension: channels 1, 3 and primes up to 67 (C*R*S and K off
    /// every tile), batch 1-3 (N*OH*OW off every tile), odd spatial sizes,
    /// kernels 1x1 / 3x3 / 5x5, stride 1 / 2, valid / same.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn implicit_matches_cpu_across_tiles(
        n in 1usize..4,
        c in prop::sample::select(vec![1usize, 3, 7, 13, 31, 67]),
        k in prop::sample::select(vec![1usize, 3, 17, 63, 65, 67]),
        h in dim(17), w in dim(17),
        r in prop::sample::select(vec![1usize, 3, 5]),
        stride in 1usize..3, same: bool, bias: bool, act in 0u8..4, seed: u64,
    ) {
        let padding = if same { Padding::Same } else { Padding::Valid };
        prop_assume!(same || (r <= h && r <= w));
        let p = Conv2d::new([n, c, h, w], k, [r, r], [stride, stride], padding).unwrap();
        let gpu = gpu();
        let res = check_all_with(&gpu, Some(ConvAlgo::ImplicitGemm), &p, bias, activation(act), Ws::Default, seed);
        prop_assert!(res.is_ok(), "{:?}: {}", p, res.unwrap_err());
    }
}

/// Backward filter split into several partial slabs (the workspace holds
/// more than one dW): equal to the CPU's, and the same bits on every run,
/// whatever else the (poisoned, larger) workspace holds.
#[test]
#[ignore = "needs a CUDA device"]
fn implicit_backward_filter_splits_are_deterministic() {
    let gpu = gpu();
    for (x, k, kernel, stride, padding) in [
        ([5, 3, 16, 16], 8, [3, 3], [1, 1], Padding::Same),
        ([20, 2, 19, 17], 5, [5, 5], [2, 2], Padding::Valid),
        ([9, 1, 13, 13], 3, [1, 1], [1, 1], Padding::Valid),
    ] {
        let p = Conv2d::new(x, k, kernel, stride, padding).unwrap();
        let algo = ConvAlgo::ImplicitGemm;
        let need = cuda::workspace_len_with(algo, &p);
        assert!(
            need > p.w_len(),
            "{p:?}: dW should be split (workspace {need})"
        );
        check_all_with(
            &gpu,
            Some(algo),
            &p,
            false,
            Activation::LINEAR,
            Ws::Default,
            11,
        )
        .unwrap_or_else(|e| panic!("{p:?}: {e}"));
        let (xh, dyh) = (data(4, p.x_len(), -1.0, 1.0), data(5, p.y_len(), -1.0, 1.0));
        let (xd, dyd) = (dev(&gpu, &xh), dev(&gpu, &dyh));
        let run = |extra: usize| {
            let mut ws = dev(&gpu, &vec![POISON; need + extra]);
            let mut dw = dev(&gpu, &vec![POISON; p.w_len()]);
            cuda::backward_filter_with(
                &gpu,
                algo,
                &p,
                &xd.slice(..p.x_len()),
                &dyd.slice(..p.y_len()),
                &mut dw.slice_mut(..p.w_len()),
                &mut ws.slice_mut(..need + extra),
            )
            .unwrap();
            host(&gpu, &dw, p.w_len())
        };
        let first = run(0);
        for extra in [0, 1, 4096] {
            let again = run(extra);
            assert!(
                first
                    .iter()
                    .zip(&again)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{p:?}: dW differs between runs (workspace + {extra})"
            );
        }
    }
}

/// The batch in chunks: workspaces for exactly one image, and for two and a
/// half, so that the last chunk is short; dw sums its chunks with beta = 1.
#[test]
#[ignore = "needs a CUDA device"]
fn chunked_matches_cpu() {
    let gpu = gpu();
    for (images, extra) in [(1, 0), (2, 5)] {
        for (stride, padding) in [(1, Padding::Same), (2, Padding::Valid)] {
            let p = Conv2d::new([5, 3, 9, 8], 4, [3, 3], [stride, stride], padding).unwrap();
            check_all_with(
                &gpu,
                Some(ConvAlgo::Im2colGemm),
                &p,
                true,
                Activation::RELU,
                Ws::Images(images, extra),
                7,
            )
            .unwrap_or_else(|e| panic!("{p:?} workspace {images}+{extra}: {e}"));
        }
    }
}

/// The keras-cnn seed network's conv layers at batch 2, with bias and relu:
/// 3->32 same on 32x32, 32->32 valid on 32x32, 32->64 same on 15x15, 64->64
/// valid on 15x15 (outputs 32x32, 30x30, 15x15, 13x13).
#[test]
#[ignore = "needs a CUDA device"]
fn keras_cnn_layers() {
    let gpu = gpu();
    let layers = [
        ([2, 3, 32, 32], 32, Padding::Same),
        ([2, 32, 32, 32], 32, Padding::Valid),
        ([2, 32, 15, 15], 64, Padding::Same),
        ([2, 64, 15, 15], 64, Padding::Valid),
    ];
    for (i, (x, k, padding)) in layers.into_iter().enumerate() {
        let p = Conv2d::new(x, k, [3, 3], [1, 1], padding).unwrap();
        for algo in ConvAlgo::ALL {
            check_all_with(
                &gpu,
                Some(algo),
                &p,
                true,
                Activation::RELU,
                Ws::Default,
                100 + i as u64,
            )
            .unwrap_or_else(|e| panic!("layer {i} {p:?} {algo:?}: {e}"));
        }
    }
}

/// A batch large enough that dw is split into partial sums, without bias.
#[test]
#[ignore = "needs a CUDA device"]
fn larger_batch_no_bias() {
    let gpu = gpu();
    let p = Conv2d::new([16, 8, 12, 12], 16, [3, 3], [1, 1], Padding::Same).unwrap();
    for algo in ConvAlgo::ALL {
        check_all_with(
            &gpu,
            Some(algo),
            &p,
            false,
            Activation::LINEAR,
            Ws::Default,
            3,
        )
        .unwrap_or_else(|e| panic!("{algo:?}: {e}"));
    }
}

/// im2col and col2im equal the CPU's exactly (copies, and sums in the same order).
#[test]
#[ignore = "needs a CUDA device"]
fn im2col_col2im_exact() {
    let gpu = gpu();
    for (kernel, stride, padding) in [
        ([3, 3], [1, 1], Padding::Same),
        ([5, 5], [2, 2], Padding::Same),
        ([1, 3], [3, 1], Padding::Valid),
        ([3, 3], [2, 3], Padding::Valid),
    ] {
        let p = Conv2d::new([3, 2, 11, 10], 4, kernel, stride, padding).unwrap();
        let x = data(1, p.x_len(), -1.0, 1.0);
        let col = data(2, p.col_len(), -1.0, 1.0);
        let mut want_col = vec![0.0; p.col_len()];
        cpu::im2col(&p, &x, &mut want_col).unwrap();
        let mut want_x = vec![0.0; p.x_len()];
        cpu::col2im(&p, &col, &mut want_x).unwrap();

        let (dx, dcol) = (dev(&gpu, &x), dev(&gpu, &col));
        let mut gcol = dev(&gpu, &vec![POISON; p.col_len()]);
        cuda::im2col(
            &gpu,
            &p,
            &dx.slice(..p.x_len()),
            &mut gcol.slice_mut(..p.col_len()),
        )
        .unwrap();
        assert_close(
            "im2col",
            &host(&gpu, &gcol, p.col_len()),
            &to_f64(&want_col),
            EXACT,
        );
        let mut gx = dev(&gpu, &vec![POISON; p.x_len()]);
        cuda::col2im(
            &gpu,
            &p,
            &dcol.slice(..p.col_len()),
            &mut gx.slice_mut(..p.x_len()),
        )
        .unwrap();
        assert_close(
            "col2im",
            &host(&gpu, &gx, p.x_len()),
            &to_f64(&want_x),
            EXACT,
        );
    }
}

/// An empty batch writes nothing, except dw, which is zeroed.
#[test]
#[ignore = "needs a CUDA device"]
fn empty_batch() {
    let gpu = gpu();
    let p = Conv2d::new([0, 3, 8, 8], 4, [3, 3], [1, 1], Padding::Same).unwrap();
    let (x, w) = (dev(&gpu, &[]), dev(&gpu, &data(1, p.w_len(), -1.0, 1.0)));
    let mut dw = dev(&gpu, &vec![POISON; p.w_len()]);
    cuda::backward_filter_alloc(
        &gpu,
        &p,
        &x.slice(..0),
        &x.slice(..0),
        &mut dw.slice_mut(..p.w_len()),
    )
    .unwrap();
    assert!(host(&gpu, &dw, p.w_len()).iter().all(|&v| v == 0.0));
    let mut y = dev(&gpu, &[]);
    cuda::forward_alloc(
        &gpu,
        &p,
        &x.slice(..0),
        &w.slice(..p.w_len()),
        None,
        Activation::RELU,
        &mut y.slice_mut(..0),
    )
    .unwrap();
}

/// The reductions (dw over the batch, dx over the kernel window) are
/// bit-identical run to run, with every algorithm (stride 2: backward
/// data's phases).
#[test]
#[ignore = "needs a CUDA device"]
fn deterministic() {
    let gpu = gpu();
    for (algo, stride) in ConvAlgo::ALL.into_iter().flat_map(|a| [(a, 1), (a, 2)]) {
        deterministic_with(&gpu, algo, stride);
    }
}

fn deterministic_with(gpu: &CudaBackend, algo: ConvAlgo, stride: usize) {
    let p = Conv2d::new([12, 16, 10, 10], 8, [3, 3], [stride, stride], Padding::Same).unwrap();
    let ws_len = cuda::workspace_len_with(algo, &p);
    let ws_buf = dev(gpu, &vec![POISON; ws_len]);
    let ws_cell = std::cell::RefCell::new(ws_buf);
    let (x, dy, w) = (
        data(1, p.x_len(), -1.0, 1.0),
        data(2, p.y_len(), -1.0, 1.0),
        data(3, p.w_len(), -1.0, 1.0),
    );
    let (dx_, ddy, dw_) = (dev(gpu, &x), dev(gpu, &dy), dev(gpu, &w));
    let run = || {
        let mut ws = ws_cell.borrow_mut();
        let mut dw = dev(gpu, &vec![POISON; p.w_len()]);
        cuda::backward_filter_with(
            gpu,
            algo,
            &p,
            &dx_.slice(..p.x_len()),
            &ddy.slice(..p.y_len()),
            &mut dw.slice_mut(..p.w_len()),
            &mut ws.slice_mut(..ws_len),
        )
        .unwrap();
        let mut dx = dev(gpu, &vec![POISON; p.x_len()]);
        cuda::backward_data_with(
            gpu,
            algo,
            &p,
            &ddy.slice(..p.y_len()),
            &dw_.slice(..p.w_len()),
            &mut dx.slice_mut(..p.x_len()),
            &mut ws.slice_mut(..ws_len),
        )
        .unwrap();
        (host(gpu, &dw, p.w_len()), host(gpu, &dx, p.x_len()))
    };
    let (a, b) = (run(), run());
    let same = |u: &[f32], v: &[f32]| u.iter().zip(v).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(
        same(&a.0, &b.0),
        "{algo:?} stride {stride}: dw differs between runs"
    );
    assert!(
        same(&a.1, &b.1),
        "{algo:?} stride {stride}: dx differs between runs"
    );
}

/// Wrong lengths and a too-small workspace are errors naming the op, before
/// any launch.
#[test]
#[ignore = "needs a CUDA device"]
fn errors() {
    let gpu = gpu();
    let p = Conv2d::new([2, 3, 8, 8], 4, [3, 3], [1, 1], Padding::Same).unwrap();
    let x = dev(&gpu, &vec![0.0; p.x_len()]);
    let w = dev(&gpu, &vec![0.0; p.w_len()]);
    let mut y = dev(&gpu, &vec![0.0; p.y_len()]);
    let r = cuda::forward_alloc(
        &gpu,
        &p,
        &x.slice(..p.x_len() - 1),
        &w.slice(..p.w_len()),
        None,
        Activation::LINEAR,
        &mut y.slice_mut(..p.y_len()),
    );
    assert_err_mentions(r, "conv2d.forward", &["x [N*C*H*W]", "384", "383"]);
    let mut ws = dev(&gpu, &[0.0; 10]);
    let r = cuda::forward_with(
        &gpu,
        ConvAlgo::Im2colGemm,
        &p,
        &x.slice(..p.x_len()),
        &w.slice(..p.w_len()),
        None,
        Activation::LINEAR,
        &mut y.slice_mut(..p.y_len()),
        &mut ws.slice_mut(..10),
    );
    // 216 = dW's partials (2 images x 4 x 27), 1728 = one image's columns.
    assert_err_mentions(
        r,
        "conv2d.forward",
        &["workspace", "1944", "216", "1728", "10"],
    );
    // The implicit GEMM's backward passes need w_len (108) floats per dW
    // split; its forward needs none.
    for algo_ws_op in ["conv2d.backward_data", "conv2d.backward_filter"] {
        let mut dx = dev(&gpu, &vec![0.0; p.x_len()]);
        let r = if algo_ws_op == "conv2d.backward_data" {
            cuda::backward_data_with(
                &gpu,
                ConvAlgo::ImplicitGemm,
                &p,
                &y.slice(..p.y_len()),
                &w.slice(..p.w_len()),
                &mut dx.slice_mut(..p.x_len()),
                &mut ws.slice_mut(..10),
            )
        } else {
            cuda::backward_filter_with(
                &gpu,
                ConvAlgo::ImplicitGemm,
                &p,
                &x.slice(..p.x_len()),
                &y.slice(..p.y_len()),
                &mut dx.slice_mut(..p.w_len()),
                &mut ws.slice_mut(..10),
            )
        };
        assert_err_mentions(r, algo_ws_op, &["workspace", "ImplicitGemm", "108", "10"]);
    }
    cuda::forward_with(
        &gpu,
        ConvAlgo::ImplicitGemm,
        &p,
        &x.slice(..p.x_len()),
        &w.slice(..p.w_len()),
        None,
        Activation::LINEAR,
        &mut y.slice_mut(..p.y_len()),
        &mut ws.slice_mut(..0),
    )
    .expect("the implicit forward pass needs no workspace");
    let mut dw = dev(&gpu, &vec![0.0; p.w_len()]);
    let r = cuda::backward_filter_alloc(
        &gpu,
        &p,
        &x.slice(..p.x_len()),
        &y.slice(..p.y_len() - 2),
        &mut dw.slice_mut(..p.w_len()),
    );
    assert_err_mentions(r, "conv2d.backward_filter", &["dy", "512", "510"]);
    let mut dx = dev(&gpu, &vec![0.0; p.x_len()]);
    let r = cuda::backward_data_alloc(
        &gpu,
        &p,
        &y.slice(..p.y_len()),
        &w.slice(..p.w_len() - 1),
        &mut dx.slice_mut(..p.x_len()),
    );
    assert_err_mentions(r, "conv2d.backward_data", &["w [K*C*R*S]", "108", "107"]);
}
