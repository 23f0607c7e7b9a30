//! Helpers shared by the property tests: tolerance checks, finite
//! differences, shape strategies and fast seeded data.
//!
//! Each test file includes this with `mod common;`; not every file uses
//! every helper.
#![allow(dead_code)]

use proptest::prelude::*;

/// A tolerance `abs + rel * |reference|`, stated per op.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub abs: f64,
    pub rel: f64,
}

impl Tol {
    pub const fn new(abs: f64, rel: f64) -> Self {
        Tol { abs, rel }
    }
}

/// Checks `got` against the f64 reference `want` element by element.
/// NaN must meet NaN; an infinity must meet the same infinity.
/// Returns a description of the first mismatch (for `prop_assert!`).
pub fn check_close(what: &str, got: &[f32], want: &[f64], tol: Tol) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} != reference length {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        let ok = if w.is_nan() || g.is_nan() {
            w.is_nan() && g.is_nan()
        } else if w.is_infinite() || g.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= tol.abs + tol.rel * w.abs()
        };
        if !ok {
            return Err(format!(
                "{what}[{i}]: got {g}, reference {w}, |diff| {} > {} + {}*|ref| (len {})",
                (g - w).abs(),
                tol.abs,
                tol.rel,
                got.len()
            ));
        }
    }
    Ok(())
}

/// `check_close`, panicking on mismatch (for plain `#[test]`s).
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: Tol) {
    if let Err(e) = check_close(what, got, want, tol) {
        panic!("{e}");
    }
}

/// Central finite differences of a scalar function of `x`, in f64:
/// `(f(x + h e_i) - f(x - h e_i)) / 2h` for every `i`.
pub fn finite_diff(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let fp = f(&xp);
            xp[i] = orig - h;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// `sum(dy * y)`: the scalar whose gradient is a backward pass's output.
pub fn dot(dy: &[f64], y: &[f64]) -> f64 {
    dy.iter().zip(y).map(|(a, b)| a * b).sum()
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A dimension in `1..=max`, biased towards 1, small primes and sizes one
/// off a power of two, so that tile edges and degenerate cases come up often.
pub fn dim(max: usize) -> BoxedStrategy<usize> {
    let special: Vec<usize> = [1, 2, 3, 5, 7, 13, 17, 31, 33, 63, 65, 127, 129]
        .into_iter()
        .filter(|&d| d <= max)
        .collect();
    prop_oneof![
        2 => proptest::sample::select(special),
        3 => 1..=max,
    ]
    .boxed()
}

/// A fast deterministic generator (SplitMix64) for bulk test data, so that
/// proptest draws one seed instead of thousands of floats.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit() as f32
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn vec(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// `len` values uniform in `[lo, hi)` from `seed`.
pub fn data(seed: u64, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    Rng::new(seed).vec(len, lo, hi)
}

/// Asserts that `r` is an error whose message names `op` and contains every
/// fragment in `mentions` (what was given, what was expected).
pub fn assert_err_mentions<T: std::fmt::Debug>(r: kestrel::Result<T>, op: &str, mentions: &[&str]) {
    match r {
        Ok(v) => panic!("{op}: expected an error, got Ok({v:?})"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(op), "error does not name the op {op:?}: {msg}");
            for m in mentions {
                assert!(
                    msg.contains(m),
                    "error for {op} does not mention {m:?}: {msg}"
                );
            }
        }
    }
}

/// The GPU for `#[ignore = "needs a CUDA device"]` tests: device 0, or a
/// panic that says why (such tests run only with `--include-ignored`).
pub fn gpu() -> kestrel::cuda::CudaBackend {
    kestrel::cuda::CudaBackend::new(0)
        .unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e}"))
}

/// A quiet NaN with a payload no kernel computes, for poisoning outputs
/// before a launch: an element the kernel fails to write stays this value
/// and fails the comparison.
pub const POISON: f32 = f32::from_bits(0x7fc0_dead);

/// A device buffer of `len` poison values.
pub fn poisoned(gpu: &kestrel::cuda::CudaBackend, len: usize) -> cudarc::driver::CudaSlice<f32> {
    gpu.upload(&vec![POISON; len]).expect("upload")
}

/// One of a kernel family's versions (`KernelVersion::all`), drawn per case,
/// so that a property test of the `*_with` entry points covers every version.
#[allow(dead_code)]
pub fn version<K: kestrel::cuda::KernelVersion>() -> BoxedStrategy<K> {
    proptest::sample::select(K::all()).boxed()
}
