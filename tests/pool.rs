//! Max pooling against a plain window scan in f64, argmax tie-breaking,
//! finite differences for the backward pass, NaN and -inf, and errors.

mod common;

use common::*;
use kestrel::cpu_isa::{Isa, with_isa};
use kestrel::ops::pool::{MaxPool2d, Padding, cpu};
use proptest::prelude::*;

/// The forward pass only selects and copies: it must be exact.
const TOL_FWD: Tol = Tol::new(0.0, 0.0);
/// dx sums the dy of every window that selected an element: at most
/// ceil(pool/stride)^2 <= 16 values in [-1, 1] here, each f32 addition
/// rounding by at most 2^-24 * 16 ~ 1e-6; central differences of a
/// piecewise-linear function away from its kinks are exact to ~1e-12.
const TOL_BWD: Tol = Tol::new(2e-5, 0.0);

fn padding(same: bool) -> Padding {
    if same { Padding::Same } else { Padding::Valid }
}

/// The definition: over the real cells of each window in row-major order,
/// the first NaN if there is one, else the maximum and the first index
/// holding it. Returns (y, argmax as plane indices).
fn pool_ref(p: &MaxPool2d, x: &[f64]) -> (Vec<f64>, Vec<u32>) {
    let mut y = Vec::new();
    let mut arg = Vec::new();
    for plane in 0..p.n * p.c {
        let base = plane * p.h * p.w;
        for oy in 0..p.out_h {
            for ox in 0..p.out_w {
                let mut cells = Vec::new();
                for wy in 0..p.pool_h {
                    for wx in 0..p.pool_w {
                        let py = oy * p.stride_h + wy;
                        let px = ox * p.stride_w + wx;
                        if py < p.pad_top || px < p.pad_left {
                            continue;
                        }
                        let (iy, ix) = (py - p.pad_top, px - p.pad_left);
                        if iy < p.h && ix < p.w {
                            cells.push(iy * p.w + ix);
                        }
                    }
                }
                assert!(
                    !cells.is_empty(),
                    "window ({oy},{ox}) is all padding in {p:?}"
                );
                let pick = match cells.iter().find(|&&i| x[base + i].is_nan()) {
                    Some(&i) => i,
                    None => {
                        let m = cells
                            .iter()
                            .map(|&i| x[base + i])
                            .fold(f64::NEG_INFINITY, f64::max);
                        *cells.iter().find(|&&i| x[base + i] == m).unwrap()
                    }
                };
                y.push(x[base + pick]);
                arg.push(pick as u32);
            }
        }
    }
    (y, arg)
}

fn check_forward(p: &MaxPool2d, x: &[f32]) -> Result<(), String> {
    let mut y = vec![0.0; p.y_len()];
    let mut arg = vec![u32::MAX; p.y_len()];
    cpu::forward(p, x, &mut y, &mut arg).map_err(|e| e.to_string())?;
    let (want, want_arg) = pool_ref(p, &to_f64(x));
    check_close(&format!("maxpool2d.forward {p:?}"), &y, &want, TOL_FWD)?;
    if arg != want_arg {
        let i = arg.iter().zip(&want_arg).position(|(a, b)| a != b).unwrap();
        return Err(format!(
            "maxpool2d.forward argmax[{i}] = {} but the first maximum is at {} ({p:?})",
            arg[i], want_arg[i]
        ));
    }
    let mut yi = vec![0.0; p.y_len()];
    cpu::forward_inference(p, x, &mut yi).map_err(|e| e.to_string())?;
    if yi
        .iter()
        .map(|v| v.to_bits())
        .ne(y.iter().map(|v| v.to_bits()))
    {
        return Err(format!("forward_inference differs from forward ({p:?})"));
    }
    Ok(())
}

/// Distinct values 0.01 apart in random order, so that no finite-difference
/// step of 1e-3 crosses a tie.
fn distinct(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = common::Rng::new(seed);
    let mut v: Vec<f32> = (0..len).map(|i| i as f32 * 0.01 - 1.0).collect();
    for i in (1..len).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn forward_matches_window_scan(
        n in 0usize..=2, c in dim(4), h in dim(17), w in dim(17),
        ph in 1usize..=4, pw in 1usize..=4, sh in 1usize..=4, sw in 1usize..=4,
        same: bool, seed: u64,
    ) {
        let (h, w) = if same { (h, w) } else { (h.max(ph), w.max(pw)) };
        let p = MaxPool2d::new([n, c, h, w], [ph, pw], [sh, sw], padding(same)).unwrap();
        let res = check_forward(&p, &data(seed, p.x_len(), -1.0, 1.0));
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }

    /// The seed networks' pool, 2x2 with stride 2, which the forward pass
    /// runs on a straight-line path wherever the window lies inside the
    /// image: odd and even sizes, valid and same padding (whose last
    /// window may be clipped), random data, ties from {0, 1, 2}, and NaNs
    /// sprinkled in (the first NaN of a window must win, with its index).
    /// Widths up to 41 give the AVX2 path whole steps of eight windows and
    /// tails; every instruction-set level this CPU runs is checked.
    #[test]
    fn pool_2x2_stride_2(
        n in 1usize..=2, c in dim(3), h in 1usize..=19, w in 1usize..=41, same: bool,
        kind in 0u8..3, seed: u64,
    ) {
        let (h, w) = if same { (h, w) } else { (h.max(2), w.max(2)) };
        let p = MaxPool2d::new([n, c, h, w], [2, 2], [2, 2], padding(same)).unwrap();
        let mut rng = common::Rng::new(seed);
        let x: Vec<f32> = (0..p.x_len())
            .map(|_| match kind {
                0 => rng.uniform(-1.0, 1.0),
                1 => rng.below(3) as f32,
                _ if rng.below(6) == 0 => f32::NAN,
                _ => rng.below(3) as f32,
            })
            .collect();
        for isa in Isa::available() {
            let res = with_isa(isa, || check_forward(&p, &x)).unwrap();
            prop_assert!(res.is_ok(), "{isa}: {}", res.unwrap_err());
        }
    }

    /// Integer data from {0, 1, 2}: most windows hold several equal maxima.
    #[test]
    fn ties_select_the_first_maximum(
        c in dim(3), h in dim(11), w in dim(11),
        ph in 1usize..=4, pw in 1usize..=4, sh in 1usize..=3, sw in 1usize..=3,
        same: bool, seed: u64,
    ) {
        let (h, w) = if same { (h, w) } else { (h.max(ph), w.max(pw)) };
        let p = MaxPool2d::new([2, c, h, w], [ph, pw], [sh, sw], padding(same)).unwrap();
        let mut rng = common::Rng::new(seed);
        let x: Vec<f32> = (0..p.x_len()).map(|_| rng.below(3) as f32).collect();
        let res = check_forward(&p, &x);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }

    #[test]
    fn backward_matches_finite_differences(
        n in 1usize..=2, c in 1usize..=3, h in dim(9), w in dim(9),
        ph in 1usize..=4, pw in 1usize..=4, sh in 1usize..=4, sw in 1usize..=4,
        same: bool, seed: u64,
    ) {
        let (h, w) = if same { (h, w) } else { (h.max(ph), w.max(pw)) };
        let p = MaxPool2d::new([n, c, h, w], [ph, pw], [sh, sw], padding(same)).unwrap();
        let x = distinct(seed, p.x_len());
        let dy = data(seed ^ 1, p.y_len(), -1.0, 1.0);
        let mut y = vec![0.0; p.y_len()];
        let mut arg = vec![0u32; p.y_len()];
        cpu::forward(&p, &x, &mut y, &mut arg).unwrap();
        let mut dx = vec![f32::NAN; p.x_len()];
        cpu::backward(&p, &dy, &arg, &mut dx).unwrap();
        let dy64 = to_f64(&dy);
        let fd = finite_diff(|xv| dot(&dy64, &pool_ref(&p, xv).0), &to_f64(&x), 1e-3);
        let res = check_close(&format!("maxpool2d.backward {p:?}"), &dx, &fd, TOL_BWD);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

#[test]
fn keras_same_sizes_and_first_maximum_by_hand() {
    // H=5, pool 2, stride 2: out 3, one padded row at the bottom, none on top.
    let p = MaxPool2d::keras([1, 1, 5, 5], [2, 2], Padding::Same).unwrap();
    assert_eq!((p.out_h, p.pad_top, p.pad_bottom), (3, 0, 1));
    // H=6, pool 3, stride 1: total padding 2, one each side.
    let p = MaxPool2d::new([1, 1, 6, 7], [3, 4], [1, 1], Padding::Same).unwrap();
    assert_eq!((p.out_h, p.pad_top, p.pad_bottom), (6, 1, 1));
    assert_eq!((p.out_w, p.pad_left, p.pad_right), (7, 1, 2));
    let p = MaxPool2d::keras([1, 1, 5, 7], [2, 3], Padding::Valid).unwrap();
    assert_eq!((p.out_h, p.out_w, p.stride_h, p.stride_w), (2, 2, 2, 3));

    // A 2x2 plane of equal values, and a window with the maximum twice.
    let p = MaxPool2d::keras([1, 1, 2, 4], [2, 2], Padding::Valid).unwrap();
    let x = [3.0, 3.0, 1.0, 5.0, 3.0, 3.0, 5.0, 2.0];
    let (mut y, mut arg) = ([0.0; 2], [0u32; 2]);
    cpu::forward(&p, &x, &mut y, &mut arg).unwrap();
    assert_eq!((y, arg), ([3.0, 5.0], [0, 3]));
    let mut dx = [9.0; 8];
    cpu::backward(&p, &[1.0, 2.0], &arg, &mut dx).unwrap();
    assert_eq!(dx, [1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
}

/// Padding is -inf: an all-negative input under same padding never yields 0,
/// and a window of real -inf still picks a real cell.
#[test]
fn padding_is_never_selected() {
    for (pool, stride) in [([3, 3], [1, 1]), ([2, 2], [2, 2]), ([4, 3], [3, 2])] {
        let p = MaxPool2d::new([1, 2, 7, 5], pool, stride, Padding::Same).unwrap();
        let x = data(5, p.x_len(), -3.0, -1.0);
        if let Err(e) = check_forward(&p, &x) {
            panic!("{e}");
        }
        let x = vec![f32::NEG_INFINITY; p.x_len()];
        if let Err(e) = check_forward(&p, &x) {
            panic!("{e}");
        }
    }
}

/// Overlapping windows (stride < pool) that select the same element add
/// their gradients there.
#[test]
fn overlapping_windows_accumulate() {
    let p = MaxPool2d::new([1, 1, 3, 3], [2, 2], [1, 1], Padding::Valid).unwrap();
    let x = [0.0, 0.1, 0.2, 0.3, 9.0, 0.4, 0.5, 0.6, 0.7];
    let (mut y, mut arg) = ([0.0; 4], [0u32; 4]);
    cpu::forward(&p, &x, &mut y, &mut arg).unwrap();
    assert_eq!(arg, [4; 4]);
    let mut dx = [0.0; 9];
    cpu::backward(&p, &[1.0, 2.0, 3.0, 4.0], &arg, &mut dx).unwrap();
    assert_eq!(dx, [0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0]);
}

/// A NaN makes every window containing it NaN, with the argmax on it (so the
/// gradient flows to the NaN), and leaves the other windows alone.
#[test]
fn nan_propagates_and_is_selected() {
    for pad in [Padding::Valid, Padding::Same] {
        let p = MaxPool2d::new([2, 2, 7, 6], [3, 2], [2, 1], pad).unwrap();
        let mut x = data(11, p.x_len(), -1.0, 1.0);
        let (plane, iy, ix) = (3, 4, 3);
        x[plane * p.h * p.w + iy * p.w + ix] = f32::NAN;
        // A second NaN later in row-major order: the first one must win.
        x[plane * p.h * p.w + iy * p.w + ix + 1] = f32::NAN;
        if let Err(e) = check_forward(&p, &x) {
            panic!("{e}");
        }
        let mut y = vec![0.0; p.y_len()];
        let mut arg = vec![0u32; p.y_len()];
        cpu::forward(&p, &x, &mut y, &mut arg).unwrap();
        let ohw = p.out_h * p.out_w;
        for (i, (&v, &a)) in y.iter().zip(&arg).enumerate() {
            let (oy, ox) = ((i % ohw) / p.out_w, i % p.out_w);
            let covers = |col: usize| {
                i / ohw == plane
                    && (0..p.pool_h).any(|r| oy * p.stride_h + r == iy + p.pad_top)
                    && (0..p.pool_w).any(|s| ox * p.stride_w + s == col + p.pad_left)
            };
            assert_eq!(v.is_nan(), covers(ix) || covers(ix + 1), "y[{i}] = {v}");
            if covers(ix) {
                assert_eq!(a as usize, iy * p.w + ix, "argmax[{i}] ({pad:?})");
            }
        }
    }
}

#[test]
fn empty_batch() {
    let p = MaxPool2d::keras([0, 3, 5, 5], [2, 2], Padding::Same).unwrap();
    cpu::forward(&p, &[], &mut [], &mut []).unwrap();
    cpu::forward_inference(&p, &[], &mut []).unwrap();
    cpu::backward(&p, &[], &[], &mut []).unwrap();
    assert_err_mentions(
        cpu::forward(&p, &[1.0], &mut [], &mut []),
        "maxpool2d.forward",
        &["x [N*C*H*W] length", "expected 0", "got 1"],
    );
}

#[test]
fn errors_name_the_op_and_the_sizes() {
    assert_err_mentions(
        MaxPool2d::new([1, 1, 5, 5], [2, 2], [1, 0], Padding::Valid),
        "maxpool2d.new",
        &["stride", "is 0", "at least 1"],
    );
    assert_err_mentions(
        MaxPool2d::keras([1, 1, 5, 5], [0, 2], Padding::Same),
        "maxpool2d.new",
        &["pool height is 0"],
    );
    assert_err_mentions(
        MaxPool2d::keras([1, 1, 5, 3], [2, 4], Padding::Valid),
        "maxpool2d.new",
        &["pool width 4", "input 3", "valid"],
    );

    let p = MaxPool2d::keras([2, 3, 5, 4], [2, 2], Padding::Same).unwrap();
    assert_eq!((p.out_h, p.out_w), (3, 2));
    let x = vec![0.0; p.x_len()];
    let mut y = vec![0.0; p.y_len()];
    let mut arg = vec![0u32; p.y_len()];
    assert_err_mentions(
        cpu::forward(&p, &x[1..], &mut y, &mut arg),
        "maxpool2d.forward",
        &["x [N*C*H*W] length", "expected 120", "got 119"],
    );
    assert_err_mentions(
        cpu::forward(&p, &x, &mut y[1..], &mut arg),
        "maxpool2d.forward",
        &["y [N*C*OH*OW] length", "expected 36", "got 35"],
    );
    assert_err_mentions(
        cpu::forward(&p, &x, &mut y, &mut arg[2..]),
        "maxpool2d.forward",
        &["argmax [N*C*OH*OW] length", "expected 36", "got 34"],
    );
    assert_err_mentions(
        cpu::forward_inference(&p, &x, &mut [0.0; 3]),
        "maxpool2d.forward_inference",
        &["y [N*C*OH*OW] length", "expected 36", "got 3"],
    );
    let mut dx = vec![0.0; p.x_len()];
    assert_err_mentions(
        cpu::backward(&p, &y[1..], &arg, &mut dx),
        "maxpool2d.backward",
        &["dy [N*C*OH*OW] length", "expected 36", "got 35"],
    );
    assert_err_mentions(
        cpu::backward(&p, &y, &arg[1..], &mut dx),
        "maxpool2d.backward",
        &["argmax [N*C*OH*OW] length", "expected 36", "got 35"],
    );
    assert_err_mentions(
        cpu::backward(&p, &y, &arg, &mut dx[..7]),
        "maxpool2d.backward",
        &["dx [N*C*H*W] length", "expected 120", "got 7"],
    );
    arg[5] = 20;
    assert_err_mentions(
        cpu::backward(&p, &y, &arg, &mut dx),
        "maxpool2d.backward",
        &["argmax[5] = 20", "5x4", "expected < 20"],
    );

    // Several bad argmaxes: the first in the tensor is named, whichever
    // task meets its own first. One lies past its plane's end in a window
    // row that `same` padding clips (odd height), where its row and column
    // pass for the window's own; the AVX2 path must not take it.
    // 64 planes of 170 outputs: three tasks of whole planes.
    let q = MaxPool2d::keras([2, 32, 19, 33], [2, 2], Padding::Same).unwrap();
    let (hw, ohw) = (q.h * q.w, q.out_h * q.out_w);
    let qx = data(3, q.x_len(), -1.0, 1.0);
    let (mut qy, mut qarg) = (vec![0.0; q.y_len()], vec![0u32; q.y_len()]);
    cpu::forward(&q, &qx, &mut qy, &mut qarg).unwrap();
    let clipped = 50 * ohw + (q.out_h - 1) * q.out_w + 3;
    qarg[clipped] = (hw + 6) as u32;
    let mut qdx = vec![0.0; q.x_len()];
    for isa in Isa::available() {
        let r = with_isa(isa, || cpu::backward(&q, &qy, &qarg, &mut qdx)).unwrap();
        let want = format!("argmax[{clipped}] = {}", hw + 6);
        assert_err_mentions(r, "maxpool2d.backward", &[&want, "19x33"]);
    }
    qarg[30 * ohw + 7] = u32::MAX;
    for isa in Isa::available() {
        let r = with_isa(isa, || cpu::backward(&q, &qy, &qarg, &mut qdx)).unwrap();
        let want = format!("argmax[{}] = {}", 30 * ohw + 7, u32::MAX);
        assert_err_mentions(r, "maxpool2d.backward", &[&want]);
    }

    // Hand-built layers: padding as large as the window, inconsistent output.
    let bad = MaxPool2d { pad_top: 2, ..p };
    assert_err_mentions(
        cpu::forward(&bad, &x, &mut y, &mut arg),
        "maxpool2d.forward",
        &["padding", "smaller than the pool 2x2"],
    );
    let bad = MaxPool2d { out_w: 5, ..p };
    assert_err_mentions(
        cpu::forward(&bad, &x, &mut y, &mut arg),
        "maxpool2d.forward",
        &["output size", "expected 3x2", "got 3x5"],
    );
}

/// The backward pass at every instruction-set level gives the bits of the
/// plain definition (zero, then `dx[argmax] += dy` in output order): with
/// the argmax the forward pass leaves (the AVX2 path writes the windows'
/// cells directly), with argmaxes pointing into other windows or cells no
/// window covers (the path must fall back), and with -0.0, NaN and
/// infinities in `dy`. Widths from 16 give rows of at least eight windows
/// (the AVX2 path), narrower ones the scatter at every level.
#[test]
fn backward_is_the_same_at_every_isa_level() {
    let mut rng = common::Rng::new(5);
    for (h, w, same) in [
        (30, 30, false),
        (16, 17, true),
        (19, 33, true),
        (17, 40, false),
        (4, 16, false),
        // Rows of fewer than eight windows (keras-cnn's pool2 is 13x13).
        (13, 13, false),
        (7, 9, true),
        (2, 2, false),
        (5, 14, true),
        (1, 3, true),
    ] {
        let p = MaxPool2d::new([2, 3, h, w], [2, 2], [2, 2], padding(same)).unwrap();
        let x = data(7, p.x_len(), -1.0, 1.0);
        let (mut y, mut arg) = (vec![0.0; p.y_len()], vec![0u32; p.y_len()]);
        cpu::forward(&p, &x, &mut y, &mut arg).unwrap();
        let mut dy = data(8, p.y_len(), -1.0, 1.0);
        for (i, v) in dy.iter_mut().enumerate() {
            match i % 37 {
                0 => *v = -0.0,
                5 => *v = f32::NAN,
                9 => *v = f32::NEG_INFINITY,
                _ => {}
            }
        }
        let hw = p.h * p.w;
        let mut foreign = arg.clone();
        for (i, a) in foreign.iter_mut().enumerate() {
            if rng.below(50) == 0 {
                *a = rng.below(hw) as u32;
            }
            if i % 97 == 3 {
                *a = (hw - 1) as u32;
            }
        }
        for argmax in [&arg, &foreign] {
            let mut want = vec![0.0f32; p.x_len()];
            let ohw = p.out_h * p.out_w;
            for (i, (&g, &a)) in dy.iter().zip(argmax.iter()).enumerate() {
                want[(i / ohw) * hw + a as usize] += g;
            }
            for isa in Isa::available() {
                let mut dx = vec![f32::NAN; p.x_len()];
                with_isa(isa, || cpu::backward(&p, &dy, argmax, &mut dx))
                    .unwrap()
                    .unwrap();
                let same_bits = dx
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same_bits,
                    "{isa}: backward differs from the definition for {p:?}"
                );
            }
        }
    }
}
