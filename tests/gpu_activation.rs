//! GPU activations and softmax against the CPU reference.
mod common;

use common::*;
use cudarc::driver::CudaSlice;
use kestrel::cuda::CudaBackend;
use kestrel::ops::activation::{Activation, Softmax, cpu, cuda};
use proptest::prelude::*;

/// expf / expm1f / tanhf on the GPU are within 2 ulp of correctly rounded
/// (CUDA's documented bounds), Rust's libm within 1; the gradients may be
/// fused into an fma. A few ulp relative, plus an absolute floor for
/// results that cancel near 0 (1 - y*y at |y| ~ 1).
const ACT_TOL: Tol = Tol::new(1e-6, 1e-5);
/// Softmax: the exp bound above, plus a sum of up to ~1100 terms summed in
/// another order (relative error ~ cols * 2^-24 worst case, far less in
/// practice); outputs lie in [0, 1].
const SOFTMAX_TOL: Tol = Tol::new(1e-6, 1e-5);

fn kinds(alpha: f32) -> [Activation; 6] {
    [
        Activation::LINEAR,
        Activation::RELU,
        Activation::elu(alpha),
        Activation::leaky_relu(alpha),
        Activation::TANH,
        Activation::SIGMOID,
    ]
}

fn down(gpu: &CudaBackend, s: &CudaSlice<f32>) -> Vec<f32> {
    gpu.download(s).expect("download")
}

/// x in [-5, 5] with a NaN planted (when long enough) and exact zeros.
fn inputs(seed: u64, len: usize) -> Vec<f32> {
    let mut x = data(seed, len, -5.0, 5.0);
    if len > 3 {
        x[len / 2] = f32::NAN;
        x[1] = 0.0;
    }
    x
}

fn check_elementwise(
    kernel: cuda::ActivationKernel,
    gpu: &CudaBackend,
    act: Activation,
    len: usize,
    seed: u64,
) -> Result<(), String> {
    let x = inputs(seed, len);
    let dy = data(seed ^ 1, len, -1.0, 1.0);
    let mut y = vec![0.0; len];
    cpu::forward(act, &x, &mut y).unwrap();
    let (xd, yd, dyd) = (
        gpu.upload(&x).unwrap(),
        gpu.upload(&y).unwrap(),
        gpu.upload(&dy).unwrap(),
    );
    let what = |s: &str| format!("{s} {act:?} len {len}");

    let mut out = poisoned(gpu, len);
    cuda::forward_with(gpu, kernel, act, &xd.as_view(), &mut out.as_view_mut()).unwrap();
    check_close(&what("forward"), &down(gpu, &out), &to_f64(&y), ACT_TOL)?;

    let mut inplace = gpu.upload(&x).unwrap();
    cuda::forward_inplace_with(gpu, kernel, act, &mut inplace.as_view_mut()).unwrap();
    check_close(
        &what("forward_inplace"),
        &down(gpu, &inplace),
        &to_f64(&y),
        ACT_TOL,
    )?;

    // The backward takes the CPU's y, so only the gradient formula is compared.
    let mut dx = vec![0.0; len];
    cpu::backward(act, &x, &y, &dy, &mut dx).unwrap();
    let mut out = poisoned(gpu, len);
    cuda::backward_with(
        gpu,
        kernel,
        act,
        &xd.as_view(),
        &yd.as_view(),
        &dyd.as_view(),
        &mut out.as_view_mut(),
    )
    .unwrap();
    check_close(&what("backward"), &down(gpu, &out), &to_f64(&dx), ACT_TOL)?;

    let mut g = gpu.upload(&dy).unwrap();
    cuda::backward_inplace_with(
        gpu,
        kernel,
        act,
        &xd.as_view(),
        &yd.as_view(),
        &mut g.as_view_mut(),
    )
    .unwrap();
    check_close(
        &what("backward_inplace"),
        &down(gpu, &g),
        &to_f64(&dx),
        ACT_TOL,
    )?;

    let mut gc = dy.clone();
    if cpu::backward_from_output(act, &y, &mut gc).is_ok() {
        let mut g = gpu.upload(&dy).unwrap();
        cuda::backward_from_output_with(gpu, kernel, act, &yd.as_view(), &mut g.as_view_mut())
            .unwrap();
        check_close(
            &what("backward_from_output"),
            &down(gpu, &g),
            &to_f64(&gc),
            ACT_TOL,
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn elementwise_matches_cpu(kernel in version::<cuda::ActivationKernel>(), len in prop_oneof![dim(300), 1000usize..70_000], seed: u64,
                               alpha in prop_oneof![Just(0.3f32), Just(1.0f32), -1.0f32..2.0]) {
        let gpu = gpu();
        for act in kinds(alpha) {
            let r = check_elementwise(kernel, &gpu, act, len, seed);
            prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        }
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn softmax_matches_cpu(kernel in version::<cuda::ActivationKernel>(), rows in dim(300), cols in prop_oneof![dim(65), 1000usize..1100], seed: u64,
                           scale in prop_oneof![Just(1.0f32), Just(50.0f32)]) {
        let gpu = gpu();
        let p = Softmax::new(rows, cols).unwrap();
        let mut x = data(seed, p.len(), -scale, scale);
        // One NaN row and one row with a +inf logit (both NaN rows), one
        // row of -inf except one entry (exactly one-hot).
        if rows >= 4 {
            x[cols / 2] = f32::NAN;
            x[cols + cols / 3] = f32::INFINITY;
            for v in &mut x[2 * cols..3 * cols] { *v = f32::NEG_INFINITY; }
            x[2 * cols] = 0.5;
        }
        let dy = data(seed ^ 7, p.len(), -1.0, 1.0);
        let mut y = vec![0.0; p.len()];
        cpu::softmax_forward(&p, &x, &mut y).unwrap();
        let xd = gpu.upload(&x).unwrap();
        let mut yd = poisoned(&gpu, p.len());
        cuda::softmax_forward_with(&gpu, kernel, &p, &xd.as_view(), &mut yd.as_view_mut()).unwrap();
        let r = check_close("softmax.forward", &down(&gpu, &yd), &to_f64(&y), SOFTMAX_TOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());

        let mut dx = vec![0.0; p.len()];
        cpu::softmax_backward(&p, &y, &dy, &mut dx).unwrap();
        let (ycpu, dyd) = (gpu.upload(&y).unwrap(), gpu.upload(&dy).unwrap());
        let mut dxd = poisoned(&gpu, p.len());
        cuda::softmax_backward_with(&gpu, kernel, &p, &ycpu.as_view(), &dyd.as_view(), &mut dxd.as_view_mut()).unwrap();
        let r = check_close("softmax.backward", &down(&gpu, &dxd), &to_f64(&dx), SOFTMAX_TOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn softmax_deterministic_and_empty() {
    let gpu = gpu();
    let p = Softmax::new(257, 1031).unwrap();
    let xd = gpu.upload(&data(3, p.len(), -20.0, 20.0)).unwrap();
    let mut a = poisoned(&gpu, p.len());
    let mut b = poisoned(&gpu, p.len());
    cuda::softmax_forward(&gpu, &p, &xd.as_view(), &mut a.as_view_mut()).unwrap();
    cuda::softmax_forward(&gpu, &p, &xd.as_view(), &mut b.as_view_mut()).unwrap();
    let (a, b) = (down(&gpu, &a), down(&gpu, &b));
    assert!(a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()));
    // Zero rows: nothing to do, no launch.
    let p0 = Softmax::new(0, 10).unwrap();
    let e = gpu.upload(&[0.0f32; 1]).unwrap();
    let mut o = gpu.zeros::<f32>(1).unwrap();
    cuda::softmax_forward(&gpu, &p0, &e.slice(0..0), &mut o.slice_mut(0..0)).unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn errors_name_the_op() {
    let gpu = gpu();
    let x = gpu.upload(&[1.0f32; 10]).unwrap();
    let mut y = gpu.zeros::<f32>(9).unwrap();
    assert_err_mentions(
        cuda::forward(&gpu, Activation::RELU, &x.as_view(), &mut y.as_view_mut()),
        "activation.forward",
        &["9", "10"],
    );
    assert_err_mentions(
        cuda::backward(
            &gpu,
            Activation::TANH,
            &x.as_view(),
            &x.as_view(),
            &x.as_view(),
            &mut y.as_view_mut(),
        ),
        "activation.backward",
        &["9", "10"],
    );
    let mut g = gpu.zeros::<f32>(10).unwrap();
    assert_err_mentions(
        cuda::backward_from_output(
            &gpu,
            Activation::leaky_relu(-0.5),
            &x.as_view(),
            &mut g.as_view_mut(),
        ),
        "activation.backward_from_output",
        &["alpha"],
    );
    assert_err_mentions(
        cuda::forward(
            &gpu,
            Activation::elu(f32::NAN),
            &x.as_view(),
            &mut g.as_view_mut(),
        ),
        "activation.forward",
        &["alpha"],
    );
    let p = Softmax::new(3, 4).unwrap();
    assert_err_mentions(
        cuda::softmax_forward(&gpu, &p, &x.as_view(), &mut g.as_view_mut()),
        "softmax.forward",
        &["12", "10"],
    );
    assert_err_mentions(
        cuda::softmax_backward(&gpu, &p, &x.as_view(), &x.as_view(), &mut g.as_view_mut()),
        "softmax.backward",
        &["12", "10"],
    );
}
