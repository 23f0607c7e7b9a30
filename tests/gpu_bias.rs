//! GPU bias add, bias gradient and sums against the CPU reference.
mod common;

use common::*;
use kestrel::cuda::KernelVersion;
use kestrel::ops::bias::{BiasShape, cpu, cuda};
use proptest::prelude::*;

/// The add is one f32 addition, the same on both: exact.
const ADD_TOL: Tol = Tol::new(0.0, 0.0);
/// The gradient and sums are f64 sums in another association: they differ
/// by f64 rounding (~len * 2^-53 relative to the sum of |terms|), far below
/// one f32 rounding, so the f32 gradient is within one f32 ulp.
const GRAD_TOL: Tol = Tol::new(1e-6, 1.2e-7);
/// The f64 sums, relative to the f64 CPU value (terms of mixed sign summed
/// in another order: absolute floor scaled to len * max|x| * 2^-50).
const SUM_TOL: Tol = Tol::new(1e-9, 1e-12);

fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
    prop_oneof![
        (dim(200), dim(300), Just(1usize)),
        // Dense layers as they come: more than one column block, an odd
        // count; batches around the 64-row chunks and prime.
        (
            proptest::sample::select(&[1usize, 2, 63, 64, 65, 131, 257][..]),
            1000usize..1300,
            Just(1usize),
        ),
        // Empty batches are tested in nan_propagates_and_empty_batch_zeroes_db
        // (the driver rejects zero-byte allocations).
        (1usize..5, dim(33), dim(1100)),
        (dim(3), dim(5), 5000usize..20_000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn add_and_backward_match_cpu(kernel in version::<cuda::BiasKernel>(), (n, c, sp) in shape(), seed: u64) {
        let gpu = gpu();
        let p = BiasShape::new(n, c, sp).unwrap();
        let x = data(seed, p.len(), -3.0, 3.0);
        let b = data(seed ^ 1, c, -1.0, 1.0);
        let mut y = vec![0.0; p.len()];
        cpu::add(&p, &x, &b, &mut y).unwrap();
        let (xd, bd) = (gpu.upload(&x).unwrap(), gpu.upload(&b).unwrap());
        let mut yd = poisoned(&gpu, p.len());
        cuda::add_with(&gpu, kernel, &p, &xd.as_view(), &bd.as_view(), &mut yd.as_view_mut()).unwrap();
        let r = check_close("bias.add", &gpu.download(&yd).unwrap(), &to_f64(&y), ADD_TOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());

        let mut xi = gpu.upload(&x).unwrap();
        cuda::add_inplace_with(&gpu, kernel, &p, &mut xi.as_view_mut(), &bd.as_view()).unwrap();
        let r = check_close("bias.add_inplace", &gpu.download(&xi).unwrap(), &to_f64(&y), ADD_TOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());

        let mut db = vec![0.0; c];
        cpu::backward(&p, &x, &mut db).unwrap();
        let mut dbd = poisoned(&gpu, c);
        let mut scratch = cuda::BiasScratch::for_backward(&gpu, &p).unwrap();
        let r = cuda::backward_with(&gpu, kernel, &p, &xd.as_view(), &mut dbd.as_view_mut(), &mut scratch);
        if !kernel.supports(&p) {
            // Refused before any launch, by name.
            let e = r.expect_err("an unsupported version must be refused").to_string();
            prop_assert!(e.contains(kernel.name()) && e.contains("spatial"), "{}", e);
            return Ok(());
        }
        r.unwrap();
        let got = gpu.download(&dbd).unwrap();
        let r = check_close("bias.backward", &got, &to_f64(&db), GRAD_TOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        // Determinism: a second run gives the same bits.
        let mut again = poisoned(&gpu, c);
        cuda::backward_with(&gpu, kernel, &p, &xd.as_view(), &mut again.as_view_mut(), &mut scratch).unwrap();
        let again = gpu.download(&again).unwrap();
        prop_assert!(got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "bias.backward not deterministic");
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn sums_match_cpu(len in prop_oneof![1usize..3, dim(9000), 8000usize..300_000], seed: u64) {
        let gpu = gpu();
        let x = data(seed, len, -2.0, 2.0);
        let xd = gpu.upload(&x).unwrap();
        let (s, s2) = (cpu::sum(&x), cpu::sum_squares(&x));
        let tol_abs = SUM_TOL.abs * (len.max(1) as f64);
        let g = cuda::sum_host_alloc(&gpu, &xd.as_view()).unwrap();
        prop_assert!((g - s).abs() <= tol_abs + SUM_TOL.rel * s.abs(), "sum: gpu {g} cpu {s} len {len}");
        let g2 = cuda::sum_squares_host_alloc(&gpu, &xd.as_view()).unwrap();
        prop_assert!((g2 - s2).abs() <= tol_abs + SUM_TOL.rel * s2.abs(), "sum_squares: gpu {g2} cpu {s2} len {len}");
        // Bit-identical run to run, and through the on-device form.
        let mut out = gpu.upload(&[f64::NAN; 3]).unwrap();
        cuda::sum_squares_alloc(&gpu, &xd.as_view(), &mut out.slice_mut(1..2)).unwrap();
        let o = gpu.download(&out).unwrap();
        prop_assert_eq!(o[1].to_bits(), g2.to_bits());
        prop_assert!(o[0].is_nan() && o[2].is_nan(), "wrote outside its slot");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn nan_propagates_and_empty_batch_zeroes_db() {
    let gpu = gpu();
    let p = BiasShape::conv(4, 3, 50).unwrap();
    let mut x = data(5, p.len(), -1.0, 1.0);
    x[60] = f32::NAN; // sample 0, channel 1
    let xd = gpu.upload(&x).unwrap();
    let mut db = poisoned(&gpu, 3);
    cuda::backward_alloc(&gpu, &p, &xd.as_view(), &mut db.as_view_mut()).unwrap();
    let db = gpu.download(&db).unwrap();
    assert!(db[1].is_nan() && db[1].to_bits() != POISON.to_bits());
    assert!(db[0].is_finite() && db[2].is_finite());
    assert!(cuda::sum_host_alloc(&gpu, &xd.as_view()).unwrap().is_nan());

    let p0 = BiasShape::dense(0, 7).unwrap();
    let e = gpu.zeros::<f32>(1).unwrap();
    let mut db = poisoned(&gpu, 7);
    cuda::backward_alloc(&gpu, &p0, &e.slice(0..0), &mut db.as_view_mut()).unwrap();
    assert_eq!(gpu.download(&db).unwrap(), vec![0.0; 7]);
}

#[test]
#[ignore = "needs a CUDA device"]
fn errors_name_the_op() {
    let gpu = gpu();
    let p = BiasShape::dense(3, 4).unwrap();
    let x = gpu.upload(&[1.0f32; 12]).unwrap();
    let b = gpu.upload(&[1.0f32; 5]).unwrap();
    let mut y = gpu.zeros::<f32>(12).unwrap();
    assert_err_mentions(
        cuda::add(&gpu, &p, &x.as_view(), &b.as_view(), &mut y.as_view_mut()),
        "bias.add",
        &["4", "5"],
    );
    let mut db = gpu.zeros::<f32>(5).unwrap();
    assert_err_mentions(
        cuda::backward_alloc(&gpu, &p, &x.as_view(), &mut db.as_view_mut()),
        "bias.backward",
        &["4", "5"],
    );
    let mut out = gpu.zeros::<f64>(2).unwrap();
    assert_err_mentions(
        cuda::sum_alloc(&gpu, &x.as_view(), &mut out.as_view_mut()),
        "bias.sum",
        &["1", "2"],
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn reused_scratch_matches_fresh_scratch() {
    let gpu = gpu();
    let big = BiasShape::conv(3, 5, 3000).unwrap(); // 3 chunks per channel
    let small = BiasShape::dense(6, 2).unwrap();
    let mut shared = cuda::BiasScratch::for_backward(&gpu, &big).unwrap();
    assert_eq!(shared.len(), cuda::BiasScratch::backward_len(&big));
    assert_eq!(shared.len(), 15);
    assert_eq!(cuda::BiasScratch::bytes(15), 8 * 16);
    let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (p, seed) in [(&big, 1u64), (&small, 2), (&big, 3)] {
        let dy = gpu.upload(&data(seed, p.len(), -1.0, 1.0)).unwrap();
        let (mut a, mut b) = (poisoned(&gpu, p.c), poisoned(&gpu, p.c));
        cuda::backward(&gpu, p, &dy.as_view(), &mut a.as_view_mut(), &mut shared).unwrap();
        let mut fresh = cuda::BiasScratch::for_backward(&gpu, p).unwrap();
        cuda::backward(&gpu, p, &dy.as_view(), &mut b.as_view_mut(), &mut fresh).unwrap();
        assert_eq!(
            bits(gpu.download(&a).unwrap()),
            bits(gpu.download(&b).unwrap()),
            "{p:?}"
        );
        // The sums through the same scratch (it is large enough for these).
        let s = cuda::sum_host(&gpu, &dy.as_view(), &mut shared).unwrap();
        let s2 = cuda::sum_squares_host(&gpu, &dy.as_view(), &mut shared).unwrap();
        let mut f = cuda::BiasScratch::for_sum(&gpu, p.len()).unwrap();
        assert_eq!(
            s.to_bits(),
            cuda::sum_host(&gpu, &dy.as_view(), &mut f)
                .unwrap()
                .to_bits()
        );
        assert_eq!(
            s2.to_bits(),
            cuda::sum_squares_host(&gpu, &dy.as_view(), &mut f)
                .unwrap()
                .to_bits()
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn too_small_scratch_is_refused() {
    let gpu = gpu();
    let p = BiasShape::conv(2, 3, 4096).unwrap(); // 2 chunks per channel: 6
    let mut s = cuda::BiasScratch::with_len(&gpu, 5).unwrap();
    let dy = gpu.zeros::<f32>(p.len()).unwrap();
    let mut db = gpu.zeros::<f32>(3).unwrap();
    assert_err_mentions(
        cuda::backward(&gpu, &p, &dy.as_view(), &mut db.as_view_mut(), &mut s),
        "bias.backward",
        &["scratch partial sums", "at least 6", "5"],
    );
    let x = gpu.zeros::<f32>(8192 * 6).unwrap();
    let mut out = gpu.zeros::<f64>(1).unwrap();
    assert_err_mentions(
        cuda::sum(&gpu, &x.as_view(), &mut out.as_view_mut(), &mut s),
        "bias.sum",
        &["scratch partial sums", "at least 6", "5"],
    );
    assert_err_mentions(
        cuda::sum_squares_host(&gpu, &x.as_view(), &mut s),
        "bias.sum_squares",
        &["scratch partial sums", "at least 6"],
    );
}

/// The column gradient on a dense shape with a prime batch and an odd
/// feature count: the same bits on every run (scratch left dirty by the
/// other version in between), within the gradient's tolerance of
/// `ChannelBlocks`, and what `select` picks there.
#[test]
#[ignore = "needs a CUDA device"]
fn columns_are_deterministic() {
    let gpu = gpu();
    let p = BiasShape::dense(257, 1031).unwrap();
    assert_eq!(
        cuda::select(&p, false, gpu.info()),
        cuda::BiasKernel::Columns
    );
    assert_eq!(
        cuda::select(&p, true, gpu.info()),
        cuda::BiasKernel::ColumnsVec4
    );
    let dy = gpu.upload(&data(5, p.len(), -1.0, 1.0)).unwrap();
    let mut scratch = cuda::BiasScratch::for_backward(&gpu, &p).unwrap();
    let mut run = |k| {
        let mut db = poisoned(&gpu, p.c);
        cuda::backward_with(
            &gpu,
            k,
            &p,
            &dy.as_view(),
            &mut db.as_view_mut(),
            &mut scratch,
        )
        .unwrap();
        gpu.download(&db).unwrap()
    };
    let first = run(cuda::BiasKernel::Columns);
    let other = run(cuda::BiasKernel::ChannelBlocks);
    let again = run(cuda::BiasKernel::Columns);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first), bits(&again));
    assert_close(
        "columns vs channel blocks",
        &first,
        &to_f64(&other),
        GRAD_TOL,
    );
}
