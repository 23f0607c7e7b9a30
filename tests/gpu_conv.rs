//! The CUDA convolution (`ops::conv::cuda`) against the CPU reference
//! (`ops::conv::cpu`): forward with and without bias + activation,
//! backward data, backward filter, im2col / col2im, Keras same / valid,
//! strides 1-3, kernels 1x1 / 3x3 / 5x5 / 1x3, empty and single-image
//! batches, the chunked path (small workspaces), the keras-cnn seed
//! network's layer shapes, determinism and argument errors.
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
    /// `cuda::workspace_len`: one chunk for these small shapes.
    Default,
    /// dW's partials reserve and room for this many images' columns plus a
    /// remainder (chunks).
    Images(usize, usize),
}

/// Runs forward, backward_data and backward_filter on both backends and
/// compares them, the GPU with the algorithm `cuda::select` picks.
fn check_all(
    gpu: &CudaBackend,
    p: &Conv2d,
    bias: bool,
    act: Activation,
    ws: Ws,
    seed: u64,
) -> Result<(), String> {
    check_all_with(gpu, None, p, bias, act, ws, seed)
}

/// [`check_all`] with the GPU on `algo` (`None`: `cuda::select`'s choice).
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
    let ws_len = match ws {
        Ws::Default => cuda::workspace_len(p),
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
    let algo = algo.unwrap_or_else(|| cuda::select(p, gpu.info()));
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

/// The batch in chunks: workspaces for exactly one image, and for two and a
/// half, so that the last chunk is short; dw sums its chunks with beta = 1.
#[test]
#[ignore = "needs a CUDA device"]
fn chunked_matches_cpu() {
    let gpu = gpu();
    for (images, extra) in [(1, 0), (2, 5)] {
        for (stride, padding) in [(1, Padding::Same), (2, Padding::Valid)] {
            let p = Conv2d::new([5, 3, 9, 8], 4, [3, 3], [stride, stride], padding).unwrap();
            check_all(
                &gpu,
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
        check_all(
            &gpu,
            &p,
            true,
            Activation::RELU,
            Ws::Default,
            100 + i as u64,
        )
        .unwrap_or_else(|e| panic!("layer {i} {p:?}: {e}"));
    }
}

/// A batch large enough that dw is split into partial sums, without bias.
#[test]
#[ignore = "needs a CUDA device"]
fn larger_batch_no_bias() {
    let gpu = gpu();
    let p = Conv2d::new([16, 8, 12, 12], 16, [3, 3], [1, 1], Padding::Same).unwrap();
    check_all(&gpu, &p, false, Activation::LINEAR, Ws::Default, 3).unwrap();
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
/// bit-identical run to run.
#[test]
#[ignore = "needs a CUDA device"]
fn deterministic() {
    let gpu = gpu();
    let p = Conv2d::new([12, 16, 10, 10], 8, [3, 3], [1, 1], Padding::Same).unwrap();
    let (x, dy, w) = (
        data(1, p.x_len(), -1.0, 1.0),
        data(2, p.y_len(), -1.0, 1.0),
        data(3, p.w_len(), -1.0, 1.0),
    );
    let (dx_, ddy, dw_) = (dev(&gpu, &x), dev(&gpu, &dy), dev(&gpu, &w));
    let run = || {
        let mut dw = dev(&gpu, &vec![POISON; p.w_len()]);
        cuda::backward_filter_alloc(
            &gpu,
            &p,
            &dx_.slice(..p.x_len()),
            &ddy.slice(..p.y_len()),
            &mut dw.slice_mut(..p.w_len()),
        )
        .unwrap();
        let mut dx = dev(&gpu, &vec![POISON; p.x_len()]);
        cuda::backward_data_alloc(
            &gpu,
            &p,
            &ddy.slice(..p.y_len()),
            &dw_.slice(..p.w_len()),
            &mut dx.slice_mut(..p.x_len()),
        )
        .unwrap();
        (host(&gpu, &dw, p.w_len()), host(&gpu, &dx, p.x_len()))
    };
    let (a, b) = (run(), run());
    let same = |u: &[f32], v: &[f32]| u.iter().zip(v).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&a.0, &b.0), "dw differs between runs");
    assert!(same(&a.1, &b.1), "dx differs between runs");
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
    let r = cuda::forward(
        &gpu,
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
