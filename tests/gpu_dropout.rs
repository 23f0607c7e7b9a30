//! GPU dropout against the CPU reference: masks and values bit for bit.
mod common;

use common::*;
use kestrel::ops::dropout::{Dropout, cpu, cuda};
use proptest::prelude::*;

fn same_bits(a: &[f32], b: &[f32]) -> Result<(), String> {
    match a
        .iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
    {
        None if a.len() == b.len() => Ok(()),
        None => Err(format!("lengths {} vs {}", a.len(), b.len())),
        Some(i) => Err(format!("element {i}: gpu {} cpu {}", a[i], b[i])),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Exact: the mask is integer arithmetic, the values one f32 product
    /// with the same scale.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn matches_cpu_bit_for_bit(kernel in version::<cuda::DropoutKernel>(), len in prop_oneof![1usize..9, dim(5000), 60_000usize..200_000],
                               rate in prop_oneof![Just(0.0f32), Just(0.5f32), 0.0f32..0.999],
                               seed: u64, offset: u64) {
        let gpu = gpu();
        let p = Dropout::new(len, rate, seed, offset).unwrap();
        let mut x = data(seed ^ 3, len, -4.0, 4.0);
        if len > 2 { x[len - 1] = f32::NAN; x[0] = f32::INFINITY; }
        let dy = data(seed ^ 5, len, -1.0, 1.0);
        let (mut y, mut mask) = (vec![0.0; len], vec![0u8; len]);
        cpu::forward(&p, &x, &mut y, &mut mask).unwrap();

        let xd = gpu.upload(&x).unwrap();
        let mut yd = poisoned(&gpu, len);
        let mut md = gpu.upload(&vec![0xAAu8; len]).unwrap();
        cuda::forward_with(&gpu, kernel, &p, &xd.as_view(), &mut yd.as_view_mut(), &mut md.as_view_mut()).unwrap();
        prop_assert_eq!(gpu.download(&md).unwrap(), mask.clone());
        let r = same_bits(&gpu.download(&yd).unwrap(), &y);
        prop_assert!(r.is_ok(), "dropout.forward {}", r.unwrap_err());

        let mut mo = gpu.upload(&vec![0xAAu8; len]).unwrap();
        cuda::mask_only_with(&gpu, kernel, &p, &mut mo.as_view_mut()).unwrap();
        prop_assert_eq!(gpu.download(&mo).unwrap(), mask.clone());

        let mut dx = vec![0.0; len];
        cpu::backward(&p, &dy, &mask, &mut dx).unwrap();
        let dyd = gpu.upload(&dy).unwrap();
        let mut dxd = poisoned(&gpu, len);
        cuda::backward_with(&gpu, kernel, &p, &dyd.as_view(), &md.as_view(), &mut dxd.as_view_mut()).unwrap();
        let r = same_bits(&gpu.download(&dxd).unwrap(), &dx);
        prop_assert!(r.is_ok(), "dropout.backward {}", r.unwrap_err());
    }
}

/// Seeds and offsets with both 32-bit halves set, a million elements, and
/// the one-element definition (`Dropout::keeps`) as a second oracle.
#[test]
#[ignore = "needs a CUDA device"]
fn high_words_of_seed_and_offset() {
    let gpu = gpu();
    let p = Dropout::new(1 << 20, 0.3, 0xDEAD_BEEF_0123_4567, 0x8000_0001_FFFF_FFFE).unwrap();
    let mut md = gpu.zeros::<u8>(p.len).unwrap();
    cuda::mask_only(&gpu, &p, &mut md.as_view_mut()).unwrap();
    let got = gpu.download(&md).unwrap();
    let mut want = vec![0u8; p.len];
    cpu::mask_only(&p, &mut want).unwrap();
    assert_eq!(got, want);
    for i in (0..p.len).step_by(4099) {
        assert_eq!(got[i] != 0, p.keeps(i), "element {i}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn errors_name_the_op() {
    let gpu = gpu();
    let p = Dropout::new(10, 0.5, 1, 2).unwrap();
    let x = gpu.upload(&[1.0f32; 10]).unwrap();
    let mut y = gpu.zeros::<f32>(10).unwrap();
    let mut m = gpu.zeros::<u8>(9).unwrap();
    assert_err_mentions(
        cuda::forward(
            &gpu,
            &p,
            &x.as_view(),
            &mut y.as_view_mut(),
            &mut m.as_view_mut(),
        ),
        "dropout.forward",
        &["10", "9"],
    );
    assert_err_mentions(
        cuda::mask_only(&gpu, &p, &mut m.as_view_mut()),
        "dropout.mask_only",
        &["10", "9"],
    );
    assert_err_mentions(
        cuda::backward(&gpu, &p, &x.as_view(), &m.as_view(), &mut y.as_view_mut()),
        "dropout.backward",
        &["10", "9"],
    );
    let mut bad = p;
    bad.rate = 1.0;
    let mut m10 = gpu.zeros::<u8>(10).unwrap();
    assert_err_mentions(
        cuda::mask_only(&gpu, &bad, &mut m10.as_view_mut()),
        "dropout.mask_only",
        &["rate"],
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// The clocked forward (the step read from a device `StepClock`, as a
    /// captured training step runs it) gives the CPU's mask and values for
    /// the offset `layer | step << 16` (the training loop's
    /// `dropout_offset`), for steps with high bits set; a layer offset
    /// above 16 bits is refused.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn clocked_forward_matches_cpu_at_the_clock_step(len in prop_oneof![1usize..9, dim(5000)],
                                                     rate in 0.0f32..0.999, seed: u64,
                                                     layer in 0u64..0x1_0000,
                                                     step in prop_oneof![0u64..4, 0u64..(1u64 << 48)]) {
        let gpu = gpu();
        let mut clock = kestrel::cuda::StepClock::new(&gpu, 1).unwrap();
        clock.set(&gpu, step, 0).unwrap();
        let x = data(seed ^ 9, len, -4.0, 4.0);
        let want_p = Dropout::new(len, rate, seed, layer | (step << 16)).unwrap();
        let (mut y, mut mask) = (vec![0.0; len], vec![0u8; len]);
        cpu::forward(&want_p, &x, &mut y, &mut mask).unwrap();

        let p = Dropout::new(len, rate, seed, layer).unwrap();
        let xd = gpu.upload(&x).unwrap();
        let mut yd = poisoned(&gpu, len);
        let mut md = gpu.upload(&vec![0xAAu8; len]).unwrap();
        cuda::forward_clocked(&gpu, &p, &clock, &xd.as_view(), &mut yd.as_view_mut(), &mut md.as_view_mut()).unwrap();
        prop_assert_eq!(gpu.download(&md).unwrap(), mask);
        let r = same_bits(&gpu.download(&yd).unwrap(), &y);
        prop_assert!(r.is_ok(), "dropout.forward_clocked {}", r.unwrap_err());

        let bad = Dropout::new(len, rate, seed, layer | 0x1_0000).unwrap();
        assert_err_mentions(
            cuda::forward_clocked(&gpu, &bad, &clock, &xd.as_view(), &mut yd.as_view_mut(), &mut md.as_view_mut()),
            "dropout.forward_clocked",
            &["offset", "65536"],
        );
    }
}
