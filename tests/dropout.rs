//! Philox4x32-10 against the published known answers, and dropout against
//! its documented definition.

mod common;

use common::*;
use kestrel::ops::dropout::philox::philox4x32_10;
use kestrel::ops::dropout::{Dropout, cpu};
use proptest::prelude::*;

/// Known-answer vectors of Philox4x32-10 (counter, key, output), the
/// `philox4x32 10` rows of the `kat_vectors` file of the Random123
/// distribution (D. E. Shaw Research), as carried in
/// DEShawResearch/Random123-Boost, `libs/random/test/test_philox.cpp`
/// (commit 916db91a, "cut-and-pasted from the kat_vectors file in the
/// original Random123 distribution").
const KATS: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0x0000_0000, 0x0000_0000, 0x0000_0000, 0x0000_0000],
        [0x0000_0000, 0x0000_0000],
        [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
    ),
    (
        [0xffff_ffff, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff],
        [0xffff_ffff, 0xffff_ffff],
        [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
    ),
    (
        [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
        [0xa409_3822, 0x299f_31d0],
        [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
    ),
];

#[test]
fn philox_known_answers() {
    for (ctr, key, want) in KATS {
        assert_eq!(
            philox4x32_10(ctr, key),
            want,
            "philox4x32_10(counter {ctr:08x?}, key {key:08x?})"
        );
    }
}

/// The mask definition of `dropout/mod.rs`, one element at a time, written
/// from the documentation (not through `Dropout`'s helpers).
fn mask_def(len: usize, rate: f32, seed: u64, offset: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let block = (i / 4) as u64;
            let ctr = [
                block as u32,
                (block >> 32) as u32,
                offset as u32,
                (offset >> 32) as u32,
            ];
            let key = [seed as u32, (seed >> 32) as u32];
            let word = philox4x32_10(ctr, key)[i % 4];
            let u = (word >> 8) as f64 / 16_777_216.0;
            (u >= rate as f64) as u8
        })
        .collect()
}

fn run(p: &Dropout, x: &[f32]) -> (Vec<f32>, Vec<u8>) {
    let mut y = vec![f32::NAN; x.len()];
    let mut mask = vec![7u8; x.len()];
    cpu::forward(p, x, &mut y, &mut mask).unwrap();
    (y, mask)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn mask_and_values_follow_the_definition(
        len in prop_oneof![dim(130), 16380usize..16400, 40000usize..40010],
        rate in prop_oneof![Just(0.0f32), Just(0.5f32), 0.0f32..0.95],
        seed: u64,
        offset: u64,
    ) {
        let p = Dropout::new(len, rate, seed, offset).unwrap();
        let x = data(seed, len, -4.0, 4.0);
        let (y, mask) = run(&p, &x);
        let want = mask_def(len, rate, seed, offset);
        prop_assert!(mask == want, "mask differs from the definition (len {}, rate {})", len, rate);
        let scale = 1.0f32 / (1.0f32 - rate);
        for i in 0..len {
            let expect = if mask[i] == 1 { x[i] * scale } else { x[i] * 0.0 };
            prop_assert!(y[i].to_bits() == expect.to_bits(), "y[{}] = {}, want {} (mask {})", i, y[i], expect, mask[i]);
        }
        let mut m2 = vec![9u8; len];
        cpu::mask_only(&p, &mut m2).unwrap();
        prop_assert!(m2 == mask, "mask_only differs from forward's mask");
        for i in (0..len).step_by(97) {
            prop_assert_eq!(p.keeps(i), mask[i] == 1, "Dropout::keeps({})", i);
        }
    }

    #[test]
    fn backward_is_mask_times_scale_and_matches_fd(len in dim(64), rate in 0.05f32..0.9, seed: u64) {
        let p = Dropout::new(len, rate, seed, 3).unwrap();
        let x = data(seed, len, -2.0, 2.0);
        let dy = data(seed ^ 1, len, -1.0, 1.0);
        let (_, mask) = run(&p, &x);
        let mut dx = vec![f32::NAN; len];
        cpu::backward(&p, &dy, &mask, &mut dx).unwrap();
        let scale = p.scale();
        for i in 0..len {
            let expect = dy[i] * if mask[i] != 0 { scale } else { 0.0 };
            prop_assert!(dx[i].to_bits() == expect.to_bits(), "dx[{}] = {}, want {}", i, dx[i], expect);
        }
        // FD of sum(dy * f(x)) with the mask fixed: f is linear, so central
        // differences are exact up to f64 rounding; dx's f32 product
        // rounds once (6e-8 relative).
        let (s, dy64) = (scale as f64, to_f64(&dy));
        let f = |xs: &[f64]| {
            let y: Vec<f64> = xs.iter().zip(&mask).map(|(&v, &k)| if k != 0 { v * s } else { 0.0 }).collect();
            dot(&dy64, &y)
        };
        let want = finite_diff(f, &to_f64(&x), 1e-3);
        let r = check_close("dropout dx", &dx, &want, Tol::new(1e-9, 2e-7));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

#[test]
fn same_seed_and_offset_repeat_and_others_differ() {
    let len = 10_007;
    let x = data(5, len, -1.0, 1.0);
    let base = Dropout::new(len, 0.5, 1234, 0).unwrap();
    let (y0, m0) = run(&base, &x);
    let (y1, m1) = run(&base, &x);
    assert_eq!(m0, m1);
    assert!(y0.iter().zip(&y1).all(|(a, b)| a.to_bits() == b.to_bits()));
    for other in [
        Dropout::new(len, 0.5, 1234, 1).unwrap(),
        Dropout::new(len, 0.5, 1234, 1 << 32).unwrap(),
        Dropout::new(len, 0.5, 1235, 0).unwrap(),
        Dropout::new(len, 0.5, 1234 | (1 << 40), 0).unwrap(),
    ] {
        let (_, m) = run(&other, &x);
        let same = m.iter().zip(&m0).filter(|(a, b)| a == b).count();
        // Independent masks at rate 0.5 agree on half the elements; 5 sigma
        // is 5 * sqrt(len / 4) ~ 250.
        let dev = (same as f64 - len as f64 / 2.0).abs();
        assert!(
            dev < 5.0 * (len as f64 / 4.0).sqrt(),
            "{other:?}: {same} of {len} agree with the base mask"
        );
    }
}

#[test]
fn kept_fraction_within_binomial_bounds() {
    let len = 1 << 20;
    let x = vec![1.0f32; len];
    for (k, &rate) in [0.0f32, 0.1, 0.25, 0.5, 0.75, 0.9].iter().enumerate() {
        let p = Dropout::new(len, rate, 0xDEAD_BEEF_0000_0000 + k as u64, 17).unwrap();
        let (_, mask) = run(&p, &x);
        let kept = mask.iter().filter(|&&m| m == 1).count() as f64;
        let q = 1.0 - rate as f64;
        let sigma = (len as f64 * q * (1.0 - q)).sqrt();
        assert!(
            (kept - len as f64 * q).abs() <= 5.0 * sigma,
            "rate {rate}: kept {kept} of {len}, expected {} +- 5 * {sigma}",
            len as f64 * q
        );
    }
}

#[test]
fn rate_zero_is_identity() {
    let x = data(8, 1001, -1e30, 1e30);
    let (y, mask) = run(&Dropout::new(1001, 0.0, 99, 5).unwrap(), &x);
    assert!(mask.iter().all(|&m| m == 1));
    assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn nan_follows_multiplication() {
    let len = 64;
    let p = Dropout::new(len, 0.5, 7, 7).unwrap();
    let mut x = vec![1.0f32; len];
    x.iter_mut().for_each(|v| *v = f32::NAN);
    let (y, mask) = run(&p, &x);
    assert!(
        mask.contains(&0) && mask.contains(&1),
        "want both kept and dropped: {mask:?}"
    );
    // Kept NaN stays NaN; dropped NaN is NaN * 0 = NaN, as in Keras.
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
    // Dropped finite values are +-0 (the sign of x * 0.0).
    let x = data(3, len, -1.0, 1.0);
    let (y, mask) = run(&p, &x);
    for i in 0..len {
        if mask[i] == 0 {
            assert_eq!(y[i].to_bits(), (x[i] * 0.0).to_bits());
        }
    }
    // The backward multiplies the same way.
    let dy = vec![f32::NAN; len];
    let mut dx = vec![0.0; len];
    cpu::backward(&p, &dy, &mask, &mut dx).unwrap();
    assert!(dx.iter().all(|v| v.is_nan()));
}

/// Every instruction-set level this CPU runs (`cpu_isa`) draws the same
/// masks and values as the definition: the lane-parallel Philox is integer
/// arithmetic, so the levels agree bitwise. Lengths around the 32-element
/// AVX2 steps, the 64-element portable groups and the 16384-element tasks;
/// the backward on a mask with arbitrary nonzero bytes.
#[test]
fn every_isa_level_matches_the_definition() {
    use kestrel::cpu_isa::{Isa, with_isa};
    for isa in Isa::available() {
        for (len, rate, seed, offset) in [
            (1usize, 0.5f32, 1u64, 0u64),
            (31, 0.5, 9, 3),
            (32, 0.1, 10, 4),
            (37, 0.9, 11, u64::MAX),
            (63, 0.3, 2, 5),
            (64, 0.3, 3, u64::MAX - 1),
            (65, 0.7, 4, 1 << 40),
            (16_384 + 67, 0.25, 5, 7),
            (50_000, 0.5, u64::MAX, 123),
        ] {
            let p = Dropout::new(len, rate, seed, offset).unwrap();
            let x = data(seed, len, -4.0, 4.0);
            let (y, mask) = with_isa(isa, || run(&p, &x)).unwrap();
            assert!(
                mask == mask_def(len, rate, seed, offset),
                "{isa}: mask, len {len}"
            );
            let scale = 1.0f32 / (1.0f32 - rate);
            for i in 0..len {
                let expect = if mask[i] == 1 {
                    x[i] * scale
                } else {
                    x[i] * 0.0
                };
                assert_eq!(y[i].to_bits(), expect.to_bits(), "{isa}: y[{i}]");
            }
            let mut m2 = vec![9u8; len];
            with_isa(isa, || cpu::mask_only(&p, &mut m2))
                .unwrap()
                .unwrap();
            assert!(m2 == mask, "{isa}: mask_only");
            // Backward: any nonzero byte keeps (bytes 0, 1 and 2..=255).
            let m3: Vec<u8> = (0..len).map(|i| mask[i] * (1 + (i % 200) as u8)).collect();
            let dy = data(seed ^ 1, len, -4.0, 4.0);
            let mut dx = vec![f32::NAN; len];
            with_isa(isa, || cpu::backward(&p, &dy, &m3, &mut dx))
                .unwrap()
                .unwrap();
            for i in 0..len {
                let expect = dy[i] * if m3[i] != 0 { scale } else { 0.0 };
                assert_eq!(dx[i].to_bits(), expect.to_bits(), "{isa}: dx[{i}]");
            }
        }
    }
}

#[test]
fn bit_identical_on_any_thread_count() {
    let len = 100_003;
    let p = Dropout::new(len, 0.3, 0x0123_4567_89AB_CDEF, 0xFFFF_FFFF_0000_0001).unwrap();
    let x = data(1, len, -1.0, 1.0);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| run(&p, &x));
    let many = rayon::ThreadPoolBuilder::new()
        .num_threads(6)
        .build()
        .unwrap()
        .install(|| run(&p, &x));
    assert_eq!(one.1, many.1);
    assert!(
        one.0
            .iter()
            .zip(&many.0)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    // From outside a pool the tasks are four times longer (`chunk_len`):
    // the same bits, and the definition's mask.
    let outside = run(&p, &x);
    assert_eq!(outside.1, one.1);
    assert!(
        outside
            .0
            .iter()
            .zip(&one.0)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert_eq!(outside.1, mask_def(len, 0.3, p.seed, p.offset));
}

#[test]
fn errors_name_the_op_and_sizes() {
    assert_err_mentions(
        Dropout::new(4, 1.0, 0, 0),
        "dropout",
        &["rate", "[0, 1)", "1"],
    );
    assert_err_mentions(Dropout::new(4, -0.1, 0, 0), "dropout", &["rate", "-0.1"]);
    assert_err_mentions(Dropout::new(4, f32::NAN, 0, 0), "dropout", &["rate", "NaN"]);
    let p = Dropout::new(4, 0.5, 0, 0).unwrap();
    assert_err_mentions(
        cpu::forward(&p, &[0.0; 4], &mut [0.0; 3], &mut [0; 4]),
        "dropout.forward",
        &["y", "4", "3"],
    );
    assert_err_mentions(
        cpu::forward(&p, &[0.0; 4], &mut [0.0; 4], &mut [0; 5]),
        "dropout.forward",
        &["mask", "4", "5"],
    );
    assert_err_mentions(
        cpu::backward(&p, &[0.0; 2], &[0; 4], &mut [0.0; 4]),
        "dropout.backward",
        &["dy", "4", "2"],
    );
    assert_err_mentions(
        cpu::mask_only(&p, &mut [0; 6]),
        "dropout.mask_only",
        &["mask", "4", "6"],
    );
    let mut bad = p;
    bad.rate = 1.0;
    assert_err_mentions(
        cpu::backward(&bad, &[0.0; 4], &[0; 4], &mut [0.0; 4]),
        "dropout.backward",
        &["rate", "1"],
    );
}
