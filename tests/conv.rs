//! Convolution (im2col + GEMM + col2im) against a direct 7-loop definition
//! in f64, finite differences for both backward passes, the im2col/col2im
//! adjoint identity, NaN propagation and argument errors.

mod common;

use common::*;
use kestrel::ops::activation::Activation;
use kestrel::ops::conv::cpu::CpuConvAlgo;
use kestrel::ops::conv::{Conv2d, Padding, cpu};
use proptest::prelude::*;

/// Every output is a sum of at most `terms` products of values in [-1, 1]
/// (C*R*S for the forward pass, K*R*S for dx, N*OH*OW for dw). Each f32
/// addition rounds by at most 2^-24 times the running sum; with random signs
/// the running sums stay well under 16, so 1e-6 per term bounds the
/// accumulated error with room to spare while an indexing mistake (an error
/// of the size of one term, ~0.1) still fails.
const TOL_PER_TERM: f64 = 1e-6;

fn tol(terms: usize) -> Tol {
    Tol::new(TOL_PER_TERM * terms.max(1) as f64, 1e-6)
}

/// `x[n, c, iy, ix]` in padded coordinates, or None in the padding.
fn input_index(p: &Conv2d, n: usize, c: usize, py: usize, px: usize) -> Option<usize> {
    let (iy, ix) = (py.checked_sub(p.pad_top)?, px.checked_sub(p.pad_left)?);
    (iy < p.h && ix < p.w).then(|| ((n * p.c + c) * p.h + iy) * p.w + ix)
}

/// The definition: `y[n,k,oy,ox] = sum_{c,r,s} w[k,c,r,s] * x[n,c,oy*sh+r-pt,ox*sw+s-pl]`.
fn conv_ref(p: &Conv2d, x: &[f64], w: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; p.y_len()];
    for n in 0..p.n {
        for k in 0..p.k {
            for oy in 0..p.out_h {
                for ox in 0..p.out_w {
                    let mut acc = 0.0;
                    for c in 0..p.c {
                        for r in 0..p.r {
                            for s in 0..p.s {
                                let py = oy * p.stride_h + r;
                                let px = ox * p.stride_w + s;
                                if let Some(i) = input_index(p, n, c, py, px) {
                                    acc += w[((k * p.c + c) * p.r + r) * p.s + s] * x[i];
                                }
                            }
                        }
                    }
                    y[((n * p.k + k) * p.out_h + oy) * p.out_w + ox] = acc;
                }
            }
        }
    }
    y
}

/// dx of `sum(dy * conv(x, w))`, written as the transposed loops (used on
/// the layer too large for finite differences).
fn backward_data_ref(p: &Conv2d, dy: &[f64], w: &[f64]) -> Vec<f64> {
    let mut dx = vec![0.0; p.x_len()];
    for n in 0..p.n {
        for k in 0..p.k {
            for oy in 0..p.out_h {
                for ox in 0..p.out_w {
                    let g = dy[((n * p.k + k) * p.out_h + oy) * p.out_w + ox];
                    for c in 0..p.c {
                        for r in 0..p.r {
                            for s in 0..p.s {
                                let py = oy * p.stride_h + r;
                                let px = ox * p.stride_w + s;
                                if let Some(i) = input_index(p, n, c, py, px) {
                                    dx[i] += w[((k * p.c + c) * p.r + r) * p.s + s] * g;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}

/// dw of `sum(dy * conv(x, w))`, written as the transposed loops.
fn backward_filter_ref(p: &Conv2d, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let mut dw = vec![0.0; p.w_len()];
    for n in 0..p.n {
        for k in 0..p.k {
            for oy in 0..p.out_h {
                for ox in 0..p.out_w {
                    let g = dy[((n * p.k + k) * p.out_h + oy) * p.out_w + ox];
                    for c in 0..p.c {
                        for r in 0..p.r {
                            for s in 0..p.s {
                                let py = oy * p.stride_h + r;
                                let px = ox * p.stride_w + s;
                                if let Some(i) = input_index(p, n, c, py, px) {
                                    dw[((k * p.c + c) * p.r + r) * p.s + s] += x[i] * g;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    dw
}

fn padding(same: bool) -> Padding {
    if same { Padding::Same } else { Padding::Valid }
}

/// Runs the forward pass with an optional bias and an activation and checks
/// it against the reference.
fn check_forward(p: &Conv2d, seed: u64, with_bias: bool, act: Activation) -> Result<(), String> {
    let x = data(seed, p.x_len(), -1.0, 1.0);
    let w = data(seed ^ 0x11, p.w_len(), -1.0, 1.0);
    let b = data(seed ^ 0x22, p.k, -1.0, 1.0);
    let bias = with_bias.then_some(&b[..]);
    let mut y = vec![f32::NAN; p.y_len()];
    cpu::forward(p, &x, &w, bias, act, &mut y).map_err(|e| e.to_string())?;
    let hw = p.out_h * p.out_w;
    let want: Vec<f64> = conv_ref(p, &to_f64(&x), &to_f64(&w))
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let bv = if with_bias {
                b[(i / hw) % p.k] as f64
            } else {
                0.0
            };
            // The activation is defined on f32; every one used here is
            // 1-Lipschitz, so rounding its input keeps the error bound.
            act.apply((v + bv) as f32) as f64
        })
        .collect();
    check_close(
        &format!("conv2d.forward {p:?}"),
        &y,
        &want,
        tol(p.col_rows() + 1),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn forward_matches_direct_loops(
        n in 0usize..=3, c in dim(5), k in dim(5), h in dim(13), w in dim(13),
        r in 1usize..=5, s in 1usize..=5, sh in 1usize..=3, sw in 1usize..=3,
        same: bool, with_bias: bool, relu: bool, seed: u64,
    ) {
        // Valid padding needs the kernel to fit; grow the input instead of rejecting.
        let (h, w) = if same { (h, w) } else { (h.max(r), w.max(s)) };
        let p = Conv2d::new([n, c, h, w], k, [r, s], [sh, sw], padding(same)).unwrap();
        let act = if relu { Activation::RELU } else { Activation::LINEAR };
        let res = check_forward(&p, seed, with_bias, act);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }

    #[test]
    fn im2col_col2im_are_adjoint(
        n in 1usize..=2, c in dim(4), h in dim(11), w in dim(11),
        r in 1usize..=4, s in 1usize..=4, sh in 1usize..=3, sw in 1usize..=3,
        same: bool, seed: u64,
    ) {
        let (h, w) = if same { (h, w) } else { (h.max(r), w.max(s)) };
        let p = Conv2d::new([n, c, h, w], 1, [r, s], [sh, sw], padding(same)).unwrap();
        let x = data(seed, p.x_len(), -1.0, 1.0);
        let cm = data(seed ^ 1, p.col_len(), -1.0, 1.0);
        let mut col = vec![f32::NAN; p.col_len()];
        cpu::im2col(&p, &x, &mut col).unwrap();
        let mut back = vec![f32::NAN; p.x_len()];
        cpu::col2im(&p, &cm, &mut back).unwrap();
        // <c, im2col(x)> is exact copies summed in f64; <col2im(c), x> carries
        // col2im's f32 sums of at most R*S terms per pixel.
        let lhs = dot(&to_f64(&back), &to_f64(&x));
        let rhs = dot(&to_f64(&cm), &to_f64(&col));
        let scale: f64 = cm.iter().zip(&col).map(|(a, b)| (a * b).abs() as f64).sum();
        let bound = TOL_PER_TERM * (r * s) as f64 * scale.max(1.0);
        prop_assert!((lhs - rhs).abs() <= bound,
            "<col2im(c), x> = {lhs} but <c, im2col(x)> = {rhs} (bound {bound}) for {p:?}");
    }

    #[test]
    fn im2col_follows_documented_layout(
        n in 1usize..=2, c in dim(3), h in dim(9), w in dim(9),
        r in 1usize..=3, s in 1usize..=3, sh in 1usize..=2, sw in 1usize..=2,
        same: bool, seed: u64,
    ) {
        let (h, w) = if same { (h, w) } else { (h.max(r), w.max(s)) };
        let p = Conv2d::new([n, c, h, w], 1, [r, s], [sh, sw], padding(same)).unwrap();
        let x = data(seed, p.x_len(), -1.0, 1.0);
        let mut col = vec![f32::NAN; p.col_len()];
        cpu::im2col(&p, &x, &mut col).unwrap();
        let mut want = vec![0.0f64; p.col_len()];
        for ch in 0..c {
            for rr in 0..r {
                for ss in 0..s {
                    for img in 0..n {
                        for oy in 0..p.out_h {
                            for ox in 0..p.out_w {
                                let row = (ch * r + rr) * s + ss;
                                let colx = (img * p.out_h + oy) * p.out_w + ox;
                                let src = input_index(&p, img, ch, oy * sh + rr, ox * sw + ss);
                                want[row * p.col_cols() + colx] = src.map_or(0.0, |i| x[i] as f64);
                            }
                        }
                    }
                }
            }
        }
        let res = check_close("conv2d.im2col", &col, &want, Tol::new(0.0, 0.0));
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn backward_data_matches_finite_differences(
        n in 1usize..=2, c in 1usize..=3, k in 1usize..=3, h in dim(7), w in dim(7),
        r in 1usize..=4, s in 1usize..=4, sh in 1usize..=3, sw in 1usize..=3,
        same: bool, seed: u64,
    ) {
        let (h, w) = if same { (h, w) } else { (h.max(r), w.max(s)) };
        let p = Conv2d::new([n, c, h, w], k, [r, s], [sh, sw], padding(same)).unwrap();
        let x = data(seed, p.x_len(), -1.0, 1.0);
        let wt = data(seed ^ 1, p.w_len(), -1.0, 1.0);
        let dy = data(seed ^ 2, p.y_len(), -1.0, 1.0);
        let mut dx = vec![f32::NAN; p.x_len()];
        cpu::backward_data(&p, &dy, &wt, &mut dx).unwrap();
        let (w64, dy64) = (to_f64(&wt), to_f64(&dy));
        // L is linear in x, so central differences are exact up to f64 rounding.
        let fd = finite_diff(|xv| dot(&dy64, &conv_ref(&p, xv, &w64)), &to_f64(&x), 1e-3);
        let res = check_close(&format!("conv2d.backward_data {p:?}"), &dx, &fd, tol(k * r * s));
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }

    #[test]
    fn backward_filter_matches_finite_differences(
        n in 1usize..=3, c in 1usize..=3, k in 1usize..=3, h in dim(7), w in dim(7),
        r in 1usize..=4, s in 1usize..=4, sh in 1usize..=3, sw in 1usize..=3,
        same: bool, seed: u64,
    ) {
        let (h, w) = if same { (h, w) } else { (h.max(r), w.max(s)) };
        let p = Conv2d::new([n, c, h, w], k, [r, s], [sh, sw], padding(same)).unwrap();
        let x = data(seed, p.x_len(), -1.0, 1.0);
        let wt = data(seed ^ 1, p.w_len(), -1.0, 1.0);
        let dy = data(seed ^ 2, p.y_len(), -1.0, 1.0);
        let mut dw = vec![f32::NAN; p.w_len()];
        cpu::backward_filter(&p, &x, &dy, &mut dw).unwrap();
        let (x64, dy64) = (to_f64(&x), to_f64(&dy));
        let fd = finite_diff(|wv| dot(&dy64, &conv_ref(&p, &x64, wv)), &to_f64(&wt), 1e-3);
        let terms = n * p.out_h * p.out_w;
        let res = check_close(&format!("conv2d.backward_filter {p:?}"), &dw, &fd, tol(terms));
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

/// The shapes named in the task, one by one: kernels 1x1, 3x3, 5x5, 1x3,
/// 2x4, prime and odd sizes, strides 1 to 3, both paddings, n = 1.
#[test]
fn forward_listed_shapes() {
    type Case = ([usize; 4], usize, [usize; 2], [usize; 2]);
    let cases: &[Case] = &[
        ([1, 1, 1, 1], 1, [1, 1], [1, 1]),
        ([1, 3, 7, 7], 5, [1, 1], [1, 1]),
        ([1, 3, 7, 7], 5, [1, 1], [2, 2]),
        ([2, 3, 13, 11], 7, [3, 3], [1, 1]),
        ([1, 5, 17, 13], 3, [3, 3], [2, 2]),
        ([1, 2, 11, 7], 3, [3, 3], [3, 3]),
        ([2, 2, 13, 13], 2, [5, 5], [1, 1]),
        ([1, 3, 11, 17], 2, [5, 5], [3, 2]),
        ([1, 7, 5, 9], 3, [1, 3], [1, 1]),
        ([1, 3, 9, 5], 2, [1, 3], [2, 3]),
        ([2, 3, 7, 11], 5, [2, 4], [1, 1]),
        ([1, 2, 8, 8], 3, [2, 4], [2, 3]),
        ([1, 31, 5, 5], 13, [3, 3], [1, 1]),
        ([1, 1, 33, 31], 1, [4, 4], [3, 3]),
    ];
    for &(x, k, ker, st) in cases {
        for pad in [Padding::Valid, Padding::Same] {
            let p = Conv2d::new(x, k, ker, st, pad).unwrap();
            for (bias, act) in [(false, Activation::LINEAR), (true, Activation::RELU)] {
                if let Err(e) = check_forward(&p, 7, bias, act) {
                    panic!("{e}");
                }
            }
        }
    }
}

/// Explicit padding, including padding wider than the kernel (windows that
/// lie wholly in the padding give the bias alone).
#[test]
fn forward_explicit_padding() {
    for (pads, st) in [
        ([0, 0, 0, 0], [1, 1]),
        ([1, 2, 0, 3], [1, 2]),
        ([3, 3, 3, 3], [2, 1]),
        ([5, 0, 0, 5], [1, 1]),
    ] {
        let p = Conv2d::with_pads([2, 3, 5, 7], 4, [3, 2], st, pads).unwrap();
        if let Err(e) = check_forward(&p, 3, true, Activation::LINEAR) {
            panic!("{e}");
        }
    }
}

/// Keras's output sizes and padding split (the odd pixel at the bottom/right).
#[test]
fn keras_padding_sizes() {
    let p = Conv2d::new([1, 1, 5, 6], 1, [3, 3], [2, 2], Padding::Same).unwrap();
    assert_eq!((p.out_h, p.pad_top, p.pad_bottom), (3, 1, 1));
    assert_eq!((p.out_w, p.pad_left, p.pad_right), (3, 0, 1));
    let p = Conv2d::new([1, 1, 4, 7], 1, [4, 2], [1, 1], Padding::Same).unwrap();
    assert_eq!((p.out_h, p.pad_top, p.pad_bottom), (4, 1, 2));
    assert_eq!((p.out_w, p.pad_left, p.pad_right), (7, 0, 1));
    // Stride larger than the kernel: no padding needed, output still ceil(H/stride).
    let p = Conv2d::new([1, 1, 7, 7], 1, [1, 1], [3, 3], Padding::Same).unwrap();
    assert_eq!((p.out_h, p.pad_top, p.pad_bottom), (3, 0, 0));
    let p = Conv2d::new([1, 1, 7, 8], 1, [3, 3], [2, 2], Padding::Valid).unwrap();
    assert_eq!((p.out_h, p.out_w, p.pad_top, p.pad_right), (3, 3, 0, 0));
    let p = Conv2d::new([1, 1, 3, 3], 1, [3, 3], [1, 1], Padding::Valid).unwrap();
    assert_eq!((p.out_h, p.out_w), (1, 1));
}

/// A layer whose batch does not fit in one chunk of scratch: the chunked
/// path (several GEMMs, dw accumulated over chunks) against the loops.
#[test]
fn batch_split_into_chunks_matches_direct_loops() {
    let p = Conv2d::new([10, 128, 32, 32], 8, [3, 3], [1, 1], Padding::Same).unwrap();
    let chunk = cpu::images_per_chunk(&p);
    assert!(
        chunk > 1 && chunk < p.n,
        "chunk {chunk} should split a batch of {}",
        p.n
    );
    let x = data(1, p.x_len(), -1.0, 1.0);
    let w = data(2, p.w_len(), -1.0, 1.0);
    let dy = data(3, p.y_len(), -1.0, 1.0);
    let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));

    let mut y = vec![f32::NAN; p.y_len()];
    cpu::forward(&p, &x, &w, None, Activation::LINEAR, &mut y).unwrap();
    assert_close(
        "conv2d.forward",
        &y,
        &conv_ref(&p, &x64, &w64),
        tol(p.col_rows()),
    );

    let mut dx = vec![f32::NAN; p.x_len()];
    cpu::backward_data(&p, &dy, &w, &mut dx).unwrap();
    let want = backward_data_ref(&p, &dy64, &w64);
    assert_close("conv2d.backward_data", &dx, &want, tol(p.k * p.r * p.s));

    let mut dw = vec![f32::NAN; p.w_len()];
    cpu::backward_filter(&p, &x, &dy, &mut dw).unwrap();
    let want = backward_filter_ref(&p, &x64, &dy64);
    assert_close("conv2d.backward_filter", &dw, &want, tol(p.col_cols()));
}

/// Bit-identical results on 1 and 3 threads (and across repeated runs).
#[test]
fn results_do_not_depend_on_thread_count() {
    let p = Conv2d::new([5, 6, 13, 11], 7, [3, 2], [2, 1], Padding::Same).unwrap();
    let x = data(4, p.x_len(), -1.0, 1.0);
    let w = data(5, p.w_len(), -1.0, 1.0);
    let dy = data(6, p.y_len(), -1.0, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut y = vec![0.0; p.y_len()];
            let mut dx = vec![0.0; p.x_len()];
            let mut dw = vec![0.0; p.w_len()];
            cpu::forward(&p, &x, &w, None, Activation::LINEAR, &mut y).unwrap();
            cpu::backward_data(&p, &dy, &w, &mut dx).unwrap();
            cpu::backward_filter(&p, &x, &dy, &mut dw).unwrap();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            (bits(y), bits(dx), bits(dw))
        })
    };
    let one = run(1);
    assert!(one == run(3), "results differ between 1 and 3 threads");
    assert!(one == run(1), "results differ between two runs");
}

/// All three passes on one rayon pool of `threads` threads, as bits.
fn passes_on(p: &Conv2d, x: &[f32], w: &[f32], dy: &[f32], threads: usize) -> [Vec<u32>; 3] {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut y = vec![f32::NAN; p.y_len()];
        let mut dx = vec![f32::NAN; p.x_len()];
        let mut dw = vec![f32::NAN; p.w_len()];
        cpu::forward(p, x, w, None, Activation::LINEAR, &mut y).unwrap();
        cpu::backward_data(p, dy, w, &mut dx).unwrap();
        cpu::backward_filter(p, x, dy, &mut dw).unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        [bits(y), bits(dx), bits(dw)]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Batches of up to 20 images over maps of 1 to 17 pixels a side: one
    /// image per group (maps of 16x16 and more) or several, groups run in
    /// parallel or one by one, the filter gradient cut into up to eight
    /// slices. Every pass against the f64 definition on 2 threads, and bit
    /// for bit the same on 1 and 3.
    #[test]
    fn image_groups_match_direct_loops_on_any_thread_count(
        n in 1usize..=20, c in dim(3), k in dim(4), h in dim(17), w in dim(17),
        r in 1usize..=3, s in 1usize..=3, sh in 1usize..=2, sw in 1usize..=2,
        same: bool, seed: u64,
    ) {
        let (h, w) = if same { (h, w) } else { (h.max(r), w.max(s)) };
        let p = Conv2d::new([n, c, h, w], k, [r, s], [sh, sw], padding(same)).unwrap();
        let x = data(seed, p.x_len(), -1.0, 1.0);
        let wt = data(seed ^ 1, p.w_len(), -1.0, 1.0);
        let dy = data(seed ^ 2, p.y_len(), -1.0, 1.0);
        let two = passes_on(&p, &x, &wt, &dy, 2);
        let (x64, w64, dy64) = (to_f64(&x), to_f64(&wt), to_f64(&dy));
        let f = |b: &[u32]| b.iter().map(|&u| f32::from_bits(u)).collect::<Vec<_>>();
        let checks = [
            ("forward", f(&two[0]), conv_ref(&p, &x64, &w64), tol(p.col_rows())),
            ("backward_data", f(&two[1]), backward_data_ref(&p, &dy64, &w64), tol(k * r * s)),
            ("backward_filter", f(&two[2]), backward_filter_ref(&p, &x64, &dy64), tol(p.col_cols())),
        ];
        for (what, got, want, t) in checks {
            let res = check_close(&format!("conv2d.{what} {p:?}"), &got, &want, t);
            prop_assert!(res.is_ok(), "{}", res.unwrap_err());
        }
        prop_assert!(two == passes_on(&p, &x, &wt, &dy, 1), "1 and 2 threads differ for {p:?}");
        prop_assert!(two == passes_on(&p, &x, &wt, &dy, 3), "2 and 3 threads differ for {p:?}");
    }
}

/// A NaN in x makes exactly the outputs whose window covers it NaN.
#[test]
fn nan_in_x_reaches_exactly_the_windows_that_contain_it() {
    for pad in [Padding::Valid, Padding::Same] {
        let p = Conv2d::new([2, 2, 7, 6], 3, [3, 2], [2, 1], pad).unwrap();
        let mut x = data(8, p.x_len(), -1.0, 1.0);
        let (nn, cc, iy, ix) = (1, 1, 4, 3);
        x[((nn * p.c + cc) * p.h + iy) * p.w + ix] = f32::NAN;
        // Weights away from 0 so that NaN * w is the only way to get NaN.
        let w = data(9, p.w_len(), 0.5, 1.0);
        let mut y = vec![0.0; p.y_len()];
        cpu::forward(&p, &x, &w, None, Activation::LINEAR, &mut y).unwrap();
        for n in 0..p.n {
            for k in 0..p.k {
                for oy in 0..p.out_h {
                    for ox in 0..p.out_w {
                        let covers = n == nn
                            && (0..p.r).any(|r| oy * p.stride_h + r == iy + p.pad_top)
                            && (0..p.s).any(|s| ox * p.stride_w + s == ix + p.pad_left);
                        let v = y[((n * p.k + k) * p.out_h + oy) * p.out_w + ox];
                        assert_eq!(v.is_nan(), covers, "y[{n},{k},{oy},{ox}] = {v} ({pad:?})");
                    }
                }
            }
        }
        // The gradient of the weights sees the NaN through every tap that reads it.
        let dy = data(10, p.y_len(), 0.5, 1.0);
        let mut dw = vec![0.0; p.w_len()];
        cpu::backward_filter(&p, &x, &dy, &mut dw).unwrap();
        assert!(
            (0..p.k).all(|k| dw[k * p.c * p.r * p.s..][cc * p.r * p.s..][..p.r * p.s]
                .iter()
                .any(|v| v.is_nan())),
            "dw does not see the NaN"
        );
    }
}

/// n = 0: nothing to compute, dw (a sum over no images) zeroed, and the
/// other lengths still checked.
#[test]
fn empty_batch() {
    let p = Conv2d::new([0, 3, 5, 5], 2, [3, 3], [1, 1], Padding::Same).unwrap();
    let w = data(1, p.w_len(), -1.0, 1.0);
    cpu::forward(&p, &[], &w, None, Activation::LINEAR, &mut []).unwrap();
    cpu::backward_data(&p, &[], &w, &mut []).unwrap();
    let mut dw = vec![f32::NAN; p.w_len()];
    cpu::backward_filter(&p, &[], &[], &mut dw).unwrap();
    assert!(dw.iter().all(|&v| v == 0.0));
    cpu::im2col(&p, &[], &mut []).unwrap();
    cpu::col2im(&p, &[], &mut []).unwrap();
    assert_err_mentions(
        cpu::forward(&p, &[], &w[1..], None, Activation::LINEAR, &mut []),
        "conv2d.forward",
        &["w [K*C*R*S] length", "expected 54", "got 53"],
    );
    assert_err_mentions(
        cpu::backward_filter(&p, &[], &[], &mut dw[1..]),
        "conv2d.backward_filter",
        &["dw [K*C*R*S] length", "expected 54", "got 53"],
    );
}

#[test]
fn errors_name_the_op_and_the_sizes() {
    // Arguments.
    assert_err_mentions(
        Conv2d::new([1, 1, 5, 5], 1, [3, 3], [0, 1], Padding::Same),
        "conv2d.new",
        &["stride", "is 0", "at least 1"],
    );
    assert_err_mentions(
        Conv2d::new([1, 1, 3, 9], 1, [5, 3], [1, 1], Padding::Valid),
        "conv2d.new",
        &["kernel height 5", "input 3", "valid"],
    );
    assert_err_mentions(
        Conv2d::new([1, 1, 5, 5], 1, [0, 3], [1, 1], Padding::Same),
        "conv2d.new",
        &["kernel height", "is 0"],
    );
    assert_err_mentions(
        Conv2d::new([1, 0, 5, 5], 1, [3, 3], [1, 1], Padding::Same),
        "conv2d.new",
        &["channels c is 0"],
    );
    assert_err_mentions(
        Conv2d::with_pads([1, 1, 2, 2], 1, [4, 4], [1, 1], [1, 0, 0, 0]),
        "conv2d.with_pads",
        &["kernel height 4", "padded input 3"],
    );
    assert_err_mentions(
        Conv2d::with_pads([1, 1, 5, 5], 1, [3, 3], [1, 0], [0; 4]),
        "conv2d.with_pads",
        &["stride_w is 0"],
    );

    // Lengths.
    let p = Conv2d::new([2, 3, 5, 4], 2, [3, 3], [1, 1], Padding::Valid).unwrap();
    let (x, w, y) = (
        vec![0.0; p.x_len()],
        vec![0.0; p.w_len()],
        vec![0.0; p.y_len()],
    );
    let lin = Activation::LINEAR;
    assert_err_mentions(
        cpu::forward(&p, &x[1..], &w, None, lin, &mut y.clone()),
        "conv2d.forward",
        &["x [N*C*H*W] length", "expected 120", "got 119"],
    );
    assert_err_mentions(
        cpu::forward(&p, &x, &w, None, lin, &mut [0.0; 13]),
        "conv2d.forward",
        &["y [N*K*OH*OW] length", "expected 24", "got 13"],
    );
    assert_err_mentions(
        cpu::forward(&p, &x, &w, Some(&[0.0; 3]), lin, &mut y.clone()),
        "conv2d.forward",
        &["bias [K] length", "expected 2", "got 3"],
    );
    assert_err_mentions(
        cpu::backward_data(&p, &y[1..], &w, &mut x.clone()),
        "conv2d.backward_data",
        &["dy [N*K*OH*OW] length", "expected 24", "got 23"],
    );
    assert_err_mentions(
        cpu::backward_data(&p, &y, &w, &mut vec![0.0; 121]),
        "conv2d.backward_data",
        &["dx [N*C*H*W] length", "expected 120", "got 121"],
    );
    assert_err_mentions(
        cpu::backward_filter(&p, &x, &y, &mut [0.0; 1]),
        "conv2d.backward_filter",
        &["dw [K*C*R*S] length", "expected 54", "got 1"],
    );
    assert_err_mentions(
        cpu::im2col(&p, &x, &mut [0.0; 5]),
        "conv2d.im2col",
        &["col [C*R*S x N*OH*OW] length", "expected 324", "got 5"],
    );
    assert_err_mentions(
        cpu::col2im(&p, &vec![0.0; p.col_len()], &mut [0.0; 3]),
        "conv2d.col2im",
        &["x [N*C*H*W] length", "expected 120", "got 3"],
    );

    // A hand-built layer whose output size contradicts its padding.
    let bad = Conv2d { out_h: 9, ..p };
    assert_err_mentions(
        cpu::forward(&bad, &x, &w, None, lin, &mut y.clone()),
        "conv2d.forward",
        &["output size", "expected 3x2", "got 9x2"],
    );
    let bad = Conv2d { stride_h: 0, ..p };
    assert_err_mentions(
        cpu::backward_data(&bad, &y, &w, &mut x.clone()),
        "conv2d.backward_data",
        &["stride_h is 0"],
    );
}

/// Every CPU algorithm that runs a layer ([`CpuConvAlgo::runs`]), at every
/// instruction-set level of this CPU, against the f64 definition on all
/// three passes, and bit for bit on 1 and 3 threads: stride 1 (the shifted
/// rows' domain) and 2, Keras and explicit padding (some of it beyond the
/// kernel's extent, where the shifted rows leave the data gradient to the
/// column matrix), filter counts off the 4-filter tiles, bias and
/// activations in the epilogue.
fn check_every_algorithm(p: &Conv2d, seed: u64, act: Activation) -> Result<(), String> {
    use kestrel::cpu_isa::{Isa, with_isa};
    let x = data(seed, p.x_len(), -1.0, 1.0);
    let wt = data(seed ^ 1, p.w_len(), -1.0, 1.0);
    let b = data(seed ^ 3, p.k, -1.0, 1.0);
    let dy = data(seed ^ 2, p.y_len(), -1.0, 1.0);
    let (x64, w64, dy64) = (to_f64(&x), to_f64(&wt), to_f64(&dy));
    let hw = p.out_h * p.out_w;
    let want_y: Vec<f64> = conv_ref(p, &x64, &w64)
        .iter()
        .enumerate()
        .map(|(i, &v)| act.apply((v + b[(i / hw) % p.k] as f64) as f32) as f64)
        .collect();
    let want_dx = backward_data_ref(p, &dy64, &w64);
    let want_dw = backward_filter_ref(p, &x64, &dy64);
    for isa in Isa::available() {
        for algo in CpuConvAlgo::ALL {
            let run = |threads: usize, data_gradient: bool| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                with_isa(isa, || {
                    pool.install(|| {
                        if !algo.runs(p, data_gradient) {
                            return None;
                        }
                        let mut y = vec![f32::NAN; p.y_len()];
                        let mut dx = vec![f32::NAN; p.x_len()];
                        let mut dw = vec![f32::NAN; p.w_len()];
                        if data_gradient {
                            cpu::backward_data_with(algo, p, &dy, &wt, &mut dx).unwrap();
                        } else {
                            cpu::forward_with(algo, p, &x, &wt, Some(&b), act, &mut y).unwrap();
                            cpu::backward_filter_with(algo, p, &x, &dy, &mut dw).unwrap();
                        }
                        Some((y, dx, dw))
                    })
                })
                .unwrap()
            };
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let what = format!("{isa} {algo:?} {p:?}");
            if let Some((y, _, dw)) = run(2, false) {
                check_close(
                    &format!("forward {what}"),
                    &y,
                    &want_y,
                    tol(p.col_rows() + 1),
                )?;
                check_close(
                    &format!("backward_filter {what}"),
                    &dw,
                    &want_dw,
                    tol(p.col_cols()),
                )?;
                let (y1, _, dw1) = run(1, false).unwrap();
                let (y3, _, dw3) = run(3, false).unwrap();
                if bits(&y) != bits(&y1) || bits(&y) != bits(&y3) {
                    return Err(format!("forward differs between 1, 2, 3 threads: {what}"));
                }
                if bits(&dw) != bits(&dw1) || bits(&dw) != bits(&dw3) {
                    return Err(format!(
                        "backward_filter differs between 1, 2, 3 threads: {what}"
                    ));
                }
            }
            if let Some((_, dx, _)) = run(2, true) {
                check_close(
                    &format!("backward_data {what}"),
                    &dx,
                    &want_dx,
                    tol(p.k * p.r * p.s),
                )?;
                let (_, dx1, _) = run(1, true).unwrap();
                if bits(&dx) != bits(&dx1) {
                    return Err(format!(
                        "backward_data differs between 1 and 2 threads: {what}"
                    ));
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn every_algorithm_matches_direct_loops(
        n in 1usize..=3, c in dim(5), k in dim(9), h in dim(13), w in dim(13),
        r in 1usize..=5, s in 1usize..=5, stride in 1usize..=2,
        pads in prop::option::of([0usize..=5, 0usize..=5, 0usize..=5, 0usize..=5]),
        same: bool, act in 0u8..3, seed: u64,
    ) {
        let p = match pads {
            Some(pd) => {
                let (h, w) = (h.max(r), w.max(s));
                Conv2d::with_pads([n, c, h, w], k, [r, s], [stride, stride], pd).unwrap()
            }
            None => {
                let (h, w) = if same { (h, w) } else { (h.max(r), w.max(s)) };
                Conv2d::new([n, c, h, w], k, [r, s], [stride, stride], padding(same)).unwrap()
            }
        };
        let act = [Activation::LINEAR, Activation::RELU, Activation::elu(1.0)][act as usize];
        let res = check_every_algorithm(&p, seed, act);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Enough channels that the shifted rows cut their taps into chunks of
    /// channels (about 37 of a 3x3 kernel, 13 of a 5x5; 63, 65 and primes
    /// leave uneven chunks), planes near 4 KiB (32 x 32, 33 x 31: the gap
    /// between planes) and tiny ones: every algorithm against the
    /// definition, bit for bit across thread counts.
    #[test]
    fn every_algorithm_matches_direct_loops_on_many_channels(
        c in dim(80), k in dim(40), hw in prop_oneof![dim(9).prop_map(|d| (d, d)), Just((32, 32)), Just((33, 31))],
        r in 1usize..=5, s in 1usize..=5, same: bool, seed: u64,
    ) {
        let (h, w) = hw;
        // Large planes with few channels and filters, to keep the f64
        // definition quick.
        let (c, k) = if h >= 32 { (c.min(9), k.min(5)) } else { (c, k) };
        let (h, w) = if same { (h, w) } else { (h.max(r), w.max(s)) };
        let p = Conv2d::new([1, c, h, w], k, [r, s], [1, 1], padding(same)).unwrap();
        let res = check_every_algorithm(&p, seed, Activation::RELU);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The channel vectors run each output's chain of the shifted rows
    /// without the padding's zero products (`acc + w * 0 = acc` for finite
    /// `w`), so on finite data the two agree bit for bit up to the sign of
    /// a zero (forward and data gradient; the filter gradient against the
    /// definition). Batches up to 12 on 1, 2 and 3 threads put tiles across
    /// images in groups of every size (the grouping follows the thread
    /// count; the bits must not); output channels off the 16-lane blocks
    /// and below 8; padding wider than the kernel (the data gradient then
    /// clips taps on the far side).
    #[test]
    fn channel_vectors_match_the_shifted_rows_bit_for_bit(
        n in 1usize..=12, c in dim(20), k in dim(37), h in dim(11), w in dim(11),
        r in 1usize..=4, s in 1usize..=4,
        pads in prop::option::of([0usize..=4, 0usize..=4, 0usize..=4, 0usize..=4]),
        same: bool, seed: u64,
    ) {
        use kestrel::cpu_isa::Isa;
        if Isa::current() < Isa::Avx2 {
            return Ok(());
        }
        let (h, w) = (h.max(r), w.max(s));
        let p = match pads {
            Some(pd) => Conv2d::with_pads([n, c, h, w], k, [r, s], [1, 1], pd).unwrap(),
            None => Conv2d::new([n, c, h, w], k, [r, s], [1, 1], padding(same)).unwrap(),
        };
        let x = data(seed, p.x_len(), -1.0, 1.0);
        let wt = data(seed ^ 1, p.w_len(), -1.0, 1.0);
        let b = data(seed ^ 3, p.k, -1.0, 1.0);
        let dy = data(seed ^ 2, p.y_len(), -1.0, 1.0);
        let on = |threads: usize, algo: CpuConvAlgo| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut y = vec![f32::NAN; p.y_len()];
                cpu::forward_with(algo, &p, &x, &wt, Some(&b), Activation::RELU, &mut y).unwrap();
                let dx = algo.runs(&p, true).then(|| {
                    let mut dx = vec![f32::NAN; p.x_len()];
                    cpu::backward_data_with(algo, &p, &dy, &wt, &mut dx).unwrap();
                    dx
                });
                let mut dw = vec![f32::NAN; p.w_len()];
                cpu::backward_filter_with(algo, &p, &x, &dy, &mut dw).unwrap();
                (y, dx, dw)
            })
        };
        // Zeros of either sign as one value; NaN never expected.
        let bits = |v: &[f32]| v.iter().map(|f| if *f == 0.0 { 0 } else { f.to_bits() }).collect::<Vec<_>>();
        let (y, dx, _) = on(2, CpuConvAlgo::ShiftedRows);
        // The filter gradient is a different chain (one per element of dw
        // over the images and pixels, not the shifted rows' eight lanes):
        // against the definition, and the same bits on every thread count
        // (slices of several images from a batch of 9 up).
        let want_dw = backward_filter_ref(&p, &to_f64(&x), &to_f64(&dy));
        let (_, _, dw) = on(2, CpuConvAlgo::ChannelVectors);
        let res = check_close("backward_filter", &dw, &want_dw, tol(p.col_cols()));
        prop_assert!(res.is_ok(), "{} {p:?}", res.unwrap_err());
        for threads in [1, 2, 3] {
            let (yc, dxc, dwc) = on(threads, CpuConvAlgo::ChannelVectors);
            prop_assert!(dwc.iter().map(|v| v.to_bits()).eq(dw.iter().map(|v| v.to_bits())),
                "backward_filter, {threads} threads: {p:?}");
            prop_assert!(bits(&yc) == bits(&y), "forward, {threads} threads: {p:?}");
            let dxc = dxc.expect("the channel vectors run every stride-1 data gradient");
            if let Some(dx) = &dx {
                prop_assert!(bits(&dxc) == bits(dx), "backward_data, {threads} threads: {p:?}");
            } else {
                // Padding beyond the shifted rows' reach: against the
                // column matrix within the data gradient's bound.
                let mut want = vec![0.0; p.x_len()];
                cpu::backward_data_with(CpuConvAlgo::Im2colGemm, &p, &dy, &wt, &mut want).unwrap();
                let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
                let res = check_close("backward_data", &dxc, &want, tol(p.k * p.r * p.s));
                prop_assert!(res.is_ok(), "{} {p:?}", res.unwrap_err());
            }
        }
    }
}

/// keras-cnn's and elu-cnn's layer shapes at a small batch, every algorithm.
#[test]
fn every_algorithm_on_the_seed_layers() {
    for (x, k, same) in [
        ([2, 3, 32, 32], 32, true),
        ([2, 32, 32, 32], 32, false),
        ([2, 32, 15, 15], 64, true),
        ([2, 64, 15, 15], 64, false),
        ([1, 128, 6, 6], 20, false),
    ] {
        let p = Conv2d::new(x, k, [3, 3], [1, 1], padding(same)).unwrap();
        check_every_algorithm(&p, 7, Activation::RELU).unwrap();
    }
}

/// A NaN in x reaches exactly the filter taps whose windows read it, with
/// every algorithm (the shifted rows read pixels of the next row for the
/// virtual columns they throw away, and must not let them into dw), and
/// exactly the outputs and input gradients it should.
#[test]
fn nan_in_x_reaches_exactly_the_taps_that_read_it_with_every_algorithm() {
    for (same, (iy, ix)) in [
        (false, (0, 0)),
        (false, (3, 0)),
        (false, (2, 6)),
        (true, (0, 6)),
        (true, (4, 3)),
    ] {
        let p = Conv2d::new([2, 2, 7, 7], 3, [3, 3], [1, 1], padding(same)).unwrap();
        let mut x = data(8, p.x_len(), -1.0, 1.0);
        let (nn, cc) = (1, 1);
        x[((nn * p.c + cc) * p.h + iy) * p.w + ix] = f32::NAN;
        let dy = data(10, p.y_len(), 0.5, 1.0);
        for algo in CpuConvAlgo::ALL {
            if !algo.runs(&p, false) {
                continue;
            }
            let mut dw = vec![0.0; p.w_len()];
            cpu::backward_filter_with(algo, &p, &x, &dy, &mut dw).unwrap();
            for k in 0..p.k {
                for c in 0..p.c {
                    for r in 0..p.r {
                        for s in 0..p.s {
                            // Tap (r, s) reads pixel (iy, ix) from output
                            // (iy + pt - r, ix + pl - s) when that exists.
                            let oy = (iy + p.pad_top).checked_sub(r).filter(|&v| v < p.out_h);
                            let ox = (ix + p.pad_left).checked_sub(s).filter(|&v| v < p.out_w);
                            let reads = c == cc && oy.is_some() && ox.is_some();
                            let v = dw[((k * p.c + c) * p.r + r) * p.s + s];
                            assert_eq!(
                                v.is_nan(),
                                reads,
                                "{algo:?} dw[{k},{c},{r},{s}] = {v}, NaN at ({iy},{ix}), same {same}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A named algorithm that cannot run a layer is an error naming why.
#[test]
fn an_algorithm_that_cannot_run_the_layer_is_an_error() {
    let lin = Activation::LINEAR;
    let p = Conv2d::new([1, 2, 6, 6], 2, [3, 3], [2, 2], Padding::Same).unwrap();
    let (x, w) = (vec![0.0; p.x_len()], vec![0.0; p.w_len()]);
    let mut y = vec![0.0; p.y_len()];
    assert_err_mentions(
        cpu::forward_with(CpuConvAlgo::ShiftedRows, &p, &x, &w, None, lin, &mut y),
        "conv2d.forward",
        &["ShiftedRows", "stride 1", "got 2x2"],
    );
    // Padding as wide as the kernel: no data gradient by shifted rows.
    let p = Conv2d::with_pads([1, 2, 6, 6], 2, [3, 3], [1, 1], [3, 0, 0, 0]).unwrap();
    let (w, dy) = (vec![0.0; p.w_len()], vec![0.0; p.y_len()]);
    let mut dx = vec![0.0; p.x_len()];
    assert_err_mentions(
        cpu::backward_data_with(CpuConvAlgo::ShiftedRows, &p, &dy, &w, &mut dx),
        "conv2d.backward_data",
        &["ShiftedRows", "top/bottom 3/0", "height 3"],
    );
}
