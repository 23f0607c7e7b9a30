//! GPU max pooling against the CPU reference: exact (the same scan, the same
//! order of additions).
mod common;

use common::*;
use kestrel::ops::pool::{MaxPool2d, Padding, cpu, cuda};
use proptest::prelude::*;

fn layer() -> impl Strategy<Value = MaxPool2d> {
    (
        1usize..4,
        dim(5),
        dim(40),
        dim(40),
        1usize..5,
        1usize..5,
        1usize..4,
        1usize..4,
        any::<bool>(),
    )
        .prop_filter_map("window fits", |(n, c, h, w, ph, pw, sh, sw, same)| {
            let pad = if same { Padding::Same } else { Padding::Valid };
            MaxPool2d::new([n, c, h, w], [ph, pw], [sh, sw], pad).ok()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn matches_cpu_exactly(kernel in version::<cuda::PoolKernel>(), p in layer(), seed: u64, ties: bool) {
        let gpu = gpu();
        let (xl, yl) = (p.x_len(), p.y_len());
        // Ties: values on a coarse grid, so windows hold equal maxima.
        let mut x: Vec<f32> = data(seed, xl, -3.0, 3.0)
            .into_iter().map(|v| if ties { v.round() } else { v }).collect();
        if xl > 10 { x[xl / 3] = f32::NAN; x[xl / 2] = f32::NEG_INFINITY; }
        let dy = data(seed ^ 9, yl, -1.0, 1.0);
        let (mut y, mut am) = (vec![0.0; yl], vec![0u32; yl]);
        cpu::forward(&p, &x, &mut y, &mut am).unwrap();

        let xd = gpu.upload(&x).unwrap();
        let mut yd = poisoned(&gpu, yl);
        let mut amd = gpu.upload(&vec![u32::MAX; yl]).unwrap();
        cuda::forward_with(&gpu, kernel, &p, &xd.as_view(), &mut yd.as_view_mut(), &mut amd.as_view_mut()).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&gpu.download(&yd).unwrap()), bits(&y), "y {:?}", p);
        prop_assert_eq!(gpu.download(&amd).unwrap(), am.clone(), "argmax {:?}", p);

        let mut yi = poisoned(&gpu, yl);
        cuda::forward_inference_with(&gpu, kernel, &p, &xd.as_view(), &mut yi.as_view_mut()).unwrap();
        prop_assert_eq!(bits(&gpu.download(&yi).unwrap()), bits(&y), "y inference {:?}", p);

        let mut dx = vec![0.0; xl];
        cpu::backward(&p, &dy, &am, &mut dx).unwrap();
        let dyd = gpu.upload(&dy).unwrap();
        let mut dxd = poisoned(&gpu, xl);
        cuda::backward_with(&gpu, kernel, &p, &dyd.as_view(), &amd.as_view(), &mut dxd.as_view_mut()).unwrap();
        prop_assert_eq!(bits(&gpu.download(&dxd).unwrap()), bits(&dx), "dx {:?}", p);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn overlapping_windows_deterministic() {
    let gpu = gpu();
    let p = MaxPool2d::new([3, 7, 61, 67], [5, 4], [2, 1], Padding::Same).unwrap();
    // Coarse values: many ties and many inputs selected by several windows.
    let x: Vec<f32> = data(11, p.x_len(), 0.0, 4.0)
        .iter()
        .map(|v| v.floor())
        .collect();
    let xd = gpu.upload(&x).unwrap();
    let mut y = poisoned(&gpu, p.y_len());
    let mut am = gpu.zeros::<u32>(p.y_len()).unwrap();
    cuda::forward(
        &gpu,
        &p,
        &xd.as_view(),
        &mut y.as_view_mut(),
        &mut am.as_view_mut(),
    )
    .unwrap();
    let dy = gpu.upload(&data(12, p.y_len(), -1.0, 1.0)).unwrap();
    let run = || {
        let mut dx = poisoned(&gpu, p.x_len());
        cuda::backward(
            &gpu,
            &p,
            &dy.as_view(),
            &am.as_view(),
            &mut dx.as_view_mut(),
        )
        .unwrap();
        gpu.download(&dx)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
#[ignore = "needs a CUDA device"]
fn errors_name_the_op() {
    let gpu = gpu();
    let p = MaxPool2d::keras([1, 1, 4, 4], [2, 2], Padding::Valid).unwrap();
    let x = gpu.upload(&[1.0f32; 15]).unwrap();
    let mut y = gpu.zeros::<f32>(4).unwrap();
    let mut am = gpu.zeros::<u32>(4).unwrap();
    assert_err_mentions(
        cuda::forward(
            &gpu,
            &p,
            &x.as_view(),
            &mut y.as_view_mut(),
            &mut am.as_view_mut(),
        ),
        "maxpool2d.forward",
        &["16", "15"],
    );
    let mut dx = gpu.zeros::<f32>(16).unwrap();
    let am3 = gpu.zeros::<u32>(3).unwrap();
    assert_err_mentions(
        cuda::backward(
            &gpu,
            &p,
            &y.as_view(),
            &am3.as_view(),
            &mut dx.as_view_mut(),
        ),
        "maxpool2d.backward",
        &["argmax", "4", "3"],
    );
    let mut bad = p;
    bad.stride_h = 0;
    assert_err_mentions(
        cuda::forward_inference(&gpu, &bad, &x.slice(0..15), &mut y.as_view_mut()),
        "maxpool2d.forward_inference",
        &["stride"],
    );
}
