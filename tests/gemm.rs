//! GEMM against its definition in f64, on every micro-kernel this CPU runs
//! (AVX-512, AVX2+FMA, portable: `cpu::Kernel::available`), plus the
//! backward pass against finite differences.

mod common;

use common::Rng;
use common::*;
use kestrel::cpu_isa::{Isa, with_isa};
use kestrel::ops::activation::Activation;
use kestrel::ops::gemm::cpu::Kernel;
use kestrel::ops::gemm::{Bias, Epilogue, Gemm, cpu};
use proptest::prelude::*;

/// Error bound of an f32 GEMM element, relative to its "scale"
/// `|alpha| sum_k |a||b| + |beta c| + |bias|`: recursive summation of `k`
/// products errs by at most ~`k u` times `sum |a||b|` (u = eps/2; FMA only
/// helps), and alpha, beta, bias add three more roundings. We allow
/// `(k + 4) eps`, twice that. The activation is `max(1, alpha)`-Lipschitz
/// and rounds its own output (a few ulps: `4 eps |ref|`). The absolute
/// `1e-6` covers results near 0 after tanh/sigmoid/exp.
///
/// The same bound holds for every kernel: the AVX-512 and AVX2 ones compute
/// the same FMA chain per element (and are checked to agree bitwise), the
/// portable one rounds each product and each sum (at most `2k` roundings
/// instead of `k`, still inside `(k + 4) eps` twice over for the error
/// analysis above, which counts `k u` per path). So the kernels differ
/// from one another by at most twice this tolerance.
fn gemm_tol(k: usize) -> f64 {
    (k as f64 + 4.0) * f32::EPSILON as f64
}
const GEMM_ABS: f64 = 1e-6;

/// A GEMM call's operands: each buffer holds the batch with its strides;
/// everything the layout skips is NaN (A, B) or a sentinel (C), so a read
/// of a gap leaks NaN and a write to one shows.
struct Case {
    p: Gemm,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    bias: Vec<f32>,
    bias_kind: u8,
    act: Activation,
}

const C_GAP: f32 = -777.0;

/// `rows x cols` matrices with row stride `ld`, `batch` of them `stride`
/// apart (0: one shared), random where the layout has elements, `gap`
/// elsewhere.
fn strided(
    rng: &mut Rng,
    batch: usize,
    stride: usize,
    rows: usize,
    cols: usize,
    ld: usize,
    gap: f32,
) -> Vec<f32> {
    let items = if stride == 0 { 1 } else { batch };
    let len = if rows == 0 || cols == 0 || items == 0 {
        0
    } else {
        (items - 1) * stride + (rows - 1) * ld + cols
    };
    let mut v = vec![gap; len];
    for bi in 0..items {
        for r in 0..rows {
            for c in 0..cols {
                v[bi * stride + r * ld + c] = rng.uniform(-1.0, 1.0);
            }
        }
    }
    v
}

fn activation(i: u8) -> Activation {
    match i % 7 {
        0 => Activation::LINEAR,
        1 => Activation::RELU,
        2 => Activation::elu(0.7),
        3 => Activation::leaky_relu(0.3),
        4 => Activation::TANH,
        5 => Activation::SIGMOID,
        _ => Activation::elu(1.0),
    }
}

impl Case {
    /// `pad`: extra elements per row of A, B, C (sub-matrix views) and
    /// between batch items; `share`: bit 0 shares A, bit 1 shares B.
    #[allow(clippy::too_many_arguments)]
    fn new(
        (m, n, k): (usize, usize, usize),
        (ta, tb): (bool, bool),
        (alpha, beta): (f32, f32),
        batch: usize,
        pad: usize,
        share: u8,
        (bias_kind, act): (u8, u8),
        seed: u64,
    ) -> Case {
        let mut p = Gemm::new(m, n, k).transpose(ta, tb).scale(alpha, beta);
        p.lda += pad;
        p.ldb += 2 * pad;
        p.ldc += pad;
        let (ar, _) = p.a_dims();
        let (br, _) = p.b_dims();
        p.batch = batch;
        p.stride_a = if share & 1 != 0 { 0 } else { ar * p.lda + pad };
        p.stride_b = if share & 2 != 0 {
            0
        } else {
            br * p.ldb + 3 * pad
        };
        p.stride_c = m * p.ldc + pad;
        let mut rng = Rng::new(seed);
        let (ar, ac) = p.a_dims();
        let (br, bc) = p.b_dims();
        let a = strided(&mut rng, batch, p.stride_a, ar, ac, p.lda, f32::NAN);
        let b = strided(&mut rng, batch, p.stride_b, br, bc, p.ldb, f32::NAN);
        let mut c = strided(&mut rng, batch, p.stride_c, m, n, p.ldc, C_GAP);
        if beta == 0.0 {
            // Not to be read: NaN must not leak.
            for bi in 0..batch {
                for i in 0..m {
                    c[bi * p.stride_c + i * p.ldc..][..n].fill(f32::NAN);
                }
            }
        }
        let bias = rng.vec(m.max(n), -1.0, 1.0);
        Case {
            p,
            a,
            b,
            c,
            bias,
            bias_kind: bias_kind % 3,
            act: activation(act),
        }
    }

    fn bias(&self) -> Bias<&[f32]> {
        match self.bias_kind {
            0 => Bias::None,
            1 => Bias::PerRow(&self.bias[..self.p.m]),
            _ => Bias::PerCol(&self.bias[..self.p.n]),
        }
    }

    fn epilogue(&self) -> Epilogue<&[f32]> {
        Epilogue {
            bias: self.bias(),
            activation: self.act,
        }
    }

    /// The definition in f64 (plain loops): each element of C and its error
    /// scale `|alpha| sum|a||b| + |beta c| + |bias|`. Gaps keep their value.
    fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        let p = &self.p;
        let mut out = to_f64(&self.c);
        let mut scale = vec![0.0; out.len()];
        for bi in 0..p.batch {
            for i in 0..p.m {
                for j in 0..p.n {
                    let (mut s, mut sabs) = (0.0f64, 0.0f64);
                    for kk in 0..p.k {
                        let av = if p.trans_a {
                            self.a[bi * p.stride_a + kk * p.lda + i]
                        } else {
                            self.a[bi * p.stride_a + i * p.lda + kk]
                        } as f64;
                        let bv = if p.trans_b {
                            self.b[bi * p.stride_b + j * p.ldb + kk]
                        } else {
                            self.b[bi * p.stride_b + kk * p.ldb + j]
                        } as f64;
                        s += av * bv;
                        sabs += (av * bv).abs();
                    }
                    let idx = bi * p.stride_c + i * p.ldc + j;
                    let prev = if p.beta == 0.0 {
                        0.0
                    } else {
                        p.beta as f64 * self.c[idx] as f64
                    };
                    let bias = match self.bias() {
                        Bias::None => 0.0,
                        Bias::PerRow(v) => v[i] as f64,
                        Bias::PerCol(v) => v[j] as f64,
                    };
                    let x = p.alpha as f64 * s + prev + bias;
                    out[idx] = self.act.apply(x as f32) as f64;
                    scale[idx] = (p.alpha as f64).abs() * sabs + prev.abs() + bias.abs();
                }
            }
        }
        (out, scale)
    }

    /// Runs `f` on a copy of C and checks it against the definition.
    fn check(&self, what: &str, f: GemmFn) -> Result<(), String> {
        let mut c = self.c.clone();
        f(&self.p, &self.a, &self.b, &mut c, self.epilogue()).map_err(|e| e.to_string())?;
        self.check_out(what, &c)
    }

    /// Checks an output `c` (the whole buffer, gaps included) against the
    /// definition.
    fn check_out(&self, what: &str, c: &[f32]) -> Result<(), String> {
        let (want, scale) = self.reference();
        let lip = (self.act.alpha as f64).max(1.0);
        for (idx, ((&g, &w), &s)) in c.iter().zip(&want).zip(&scale).enumerate() {
            let g = g as f64;
            let tol = GEMM_ABS + lip * gemm_tol(self.p.k) * s + 4.0 * f32::EPSILON as f64 * w.abs();
            let ok = if w.is_nan() || g.is_nan() {
                w.is_nan() && g.is_nan()
            } else {
                (g - w).abs() <= tol
            };
            if !ok {
                return Err(format!(
                    "{what} {:?} act {:?} bias {}: C[{idx}] = {g}, reference {w}, |diff| {} > tol {tol}",
                    self.p,
                    self.act,
                    self.bias_kind,
                    (g - w).abs()
                ));
            }
        }
        Ok(())
    }

    /// Every micro-kernel this CPU runs, through `gemm_with`, and the
    /// default `gemm`. The AVX2 and AVX-512 kernels must also agree bitwise
    /// (the same FMA chain per element, see `cpu`'s module docs).
    fn check_all(&self) -> Result<(), String> {
        self.check("gemm", cpu::gemm)?;
        let mut simd: Option<(Kernel, Vec<u32>)> = None;
        for kern in Kernel::available() {
            let mut c = self.c.clone();
            cpu::gemm_with(kern, &self.p, &self.a, &self.b, &mut c, self.epilogue())
                .map_err(|e| e.to_string())?;
            self.check_out(&format!("gemm_with({kern:?})"), &c)?;
            if kern != Kernel::Portable {
                let bits: Vec<u32> = c.iter().map(|v| v.to_bits()).collect();
                match &simd {
                    None => simd = Some((kern, bits)),
                    Some((k0, b0)) if *b0 != bits => {
                        return Err(format!(
                            "{kern:?} and {k0:?} differ bitwise on {:?}",
                            self.p
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        self.check("gemm_portable", cpu::gemm_portable)
    }
}

type GemmFn = fn(&Gemm, &[f32], &[f32], &mut [f32], Epilogue<&[f32]>) -> kestrel::Result<()>;

fn scalars() -> impl Strategy<Value = (f32, f32)> {
    prop_oneof![
        Just((1.0, 0.0)),
        Just((1.0, 1.0)),
        Just((-0.5, 0.0)),
        Just((1.5, 0.5)),
        Just((0.25, -2.0)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every transpose pair, dims with 1, primes and sizes off the 6 x 16
    /// and 8 x 32 tile edges, alpha/beta (beta = 0 over NaN in C), padded leading
    /// dimensions (gaps NaN in A/B, a sentinel in C that must survive),
    /// batches with A and/or B shared, every bias and activation; every
    /// kernel this CPU runs. Tolerance: see `gemm_tol`.
    #[test]
    fn matches_definition(
        m in dim(40), n in dim(40), k in dim(70), ta: bool, tb: bool,
        ab in scalars(), batch in 1usize..=3, pad in 0usize..=2, share in 0u8..4,
        bias_kind in 0u8..3, act in 0u8..7, seed: u64,
    ) {
        let case = Case::new((m, n, k), (ta, tb), ab, batch, pad, share, (bias_kind, act), seed);
        let r = case.check_all();
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    /// The same on plain dense shapes up to 129, past several 6 x 16 and
    /// 8 x 32 tiles in every direction and, with k up to 300, over two kc blocks.
    #[test]
    fn matches_definition_dense(
        m in dim(129), n in dim(129), k in dim(300), ta: bool, tb: bool, ab in scalars(), seed: u64,
    ) {
        let case = Case::new((m, n, k), (ta, tb), ab, 1, 0, 0, (0, 0), seed);
        let r = case.check_all();
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// Shapes large enough for several row and column tasks, several kc
/// blocks and the parallel path (>= 2^20 multiply-adds), with epilogues.
#[test]
fn large_shapes_parallel_and_blocked() {
    let shapes = [
        ((300, 290, 520), (false, false), 0),
        ((151, 301, 257), (true, false), 1),
        ((149, 33, 600), (false, true), 2),
        ((7, 997, 299), (true, true), 3),
        // m >= 768 with a short last kc block (259 = 130 + 129).
        ((800, 19, 259), (false, true), 5),
        ((771, 17, 300), (true, false), 6),
    ];
    for (i, &(mnk, t, act)) in shapes.iter().enumerate() {
        let case = Case::new(mnk, t, (0.75, 0.5), 1, 1, 0, (i as u8, act), 42 + i as u64);
        case.check_all().unwrap();
    }
    // A batch of small products, run one item per thread.
    let case = Case::new((40, 50, 60), (false, true), (1.0, 0.0), 12, 2, 0, (2, 1), 7);
    case.check_all().unwrap();
    // A shared A over a batch of large items.
    let case = Case::new(
        (64, 200, 100),
        (true, false),
        (1.0, 1.0),
        3,
        0,
        1,
        (1, 4),
        8,
    );
    case.check_all().unwrap();
}

#[test]
fn nan_in_a_propagates_to_its_row_only() {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (m, n, k) = (13, 37, 300);
        let mut case = Case::new((m, n, k), (ta, tb), (1.0, 0.0), 1, 0, 0, (0, 1), 3);
        let (row, col) = (5, 123);
        let idx = if ta {
            col * case.p.lda + row
        } else {
            row * case.p.lda + col
        };
        case.a[idx] = f32::NAN;
        for kern in Kernel::available() {
            let mut c = case.c.clone();
            cpu::gemm_with(kern, &case.p, &case.a, &case.b, &mut c, case.epilogue()).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let v = c[i * n + j];
                    // relu too: NaN must not be clamped to 0.
                    assert_eq!(v.is_nan(), i == row, "C[{i}][{j}] = {v} (ta {ta}, tb {tb})");
                }
            }
        }
    }
}

#[test]
fn beta_zero_never_reads_c() {
    let case = Case::new(
        (31, 65, 17),
        (false, false),
        (1.0, 0.0),
        2,
        1,
        0,
        (2, 0),
        11,
    );
    assert!(case.c.iter().any(|v| v.is_nan()));
    case.check_all().unwrap();
}

/// `k == 0`: `C = act(beta * C + bias)`; with `beta == 0`, `act(bias)`.
#[test]
fn k_zero_is_scaled_c_plus_bias() {
    for (beta, bias_kind, act) in [(0.5f32, 1u8, 3u8), (0.0, 2, 4), (2.0, 0, 0)] {
        let case = Case::new(
            (5, 7, 0),
            (false, true),
            (1.0, beta),
            2,
            1,
            0,
            (bias_kind, act),
            5,
        );
        case.check_all().unwrap();
    }
}

/// Results are bit-identical in a 1-thread pool, a 3-thread pool and the
/// global pool: each element's sum order depends only on k.
#[test]
fn thread_count_independent() {
    let cases = [
        Case::new(
            (300, 290, 700),
            (false, false),
            (1.0, 0.5),
            1,
            1,
            0,
            (1, 2),
            21,
        ),
        Case::new(
            (64, 1000, 27),
            (true, true),
            (1.0, 0.0),
            1,
            0,
            0,
            (2, 1),
            22,
        ),
        Case::new(
            (40, 50, 60),
            (false, true),
            (1.0, 0.0),
            12,
            2,
            0,
            (2, 1),
            23,
        ),
        // One task of eleven row panels on one thread reads B packed; the
        // row groups of two or three panels that more threads get read it
        // in place (`Task::b_in_place`): the same bits.
        Case::new(
            (64, 20, 1000),
            (false, false),
            (1.0, 0.5),
            1,
            1,
            0,
            (1, 1),
            24,
        ),
    ];
    for case in &cases {
        for kern in Kernel::available() {
            let run = |threads: Option<usize>| {
                let mut c = case.c.clone();
                let go = |c: &mut Vec<f32>| {
                    cpu::gemm_with(kern, &case.p, &case.a, &case.b, c, case.epilogue()).unwrap()
                };
                match threads {
                    None => go(&mut c),
                    Some(t) => rayon::ThreadPoolBuilder::new()
                        .num_threads(t)
                        .build()
                        .unwrap()
                        .install(|| go(&mut c)),
                }
                c.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            };
            let global = run(None);
            assert!(
                global == run(Some(1)),
                "{kern:?}: 1 thread differs from the global pool: {:?}",
                case.p
            );
            assert!(
                global == run(Some(3)),
                "{kern:?}: 3 threads differ from the global pool: {:?}",
                case.p
            );
        }
    }
}

/// `gemm` follows `Isa::current`: under `with_isa` it runs that level's
/// kernel (bitwise the same as `gemm_with` on it), on every level this CPU
/// runs; a kernel the CPU lacks is an error from `gemm_with`, and every
/// x86-64 CPU with AVX2+FMA is detected as at least `Avx2`.
#[test]
fn every_isa_level_is_reachable() {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        assert_eq!(Isa::detected() >= Isa::Avx2, avx2);
        assert_eq!(
            Isa::detected() == Isa::Avx512,
            avx2 && is_x86_feature_detected!("avx512f")
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    assert_eq!(Isa::detected(), Isa::Portable);
    let case = Case::new(
        (37, 70, 300),
        (false, true),
        (1.0, 0.5),
        1,
        1,
        0,
        (2, 1),
        31,
    );
    for isa in Isa::available() {
        let kern = Kernel::for_isa(isa);
        let mut c1 = case.c.clone();
        with_isa(isa, || {
            assert_eq!(cpu::uses_simd(), isa != Isa::Portable);
            cpu::gemm(&case.p, &case.a, &case.b, &mut c1, case.epilogue()).unwrap()
        })
        .unwrap();
        let mut c2 = case.c.clone();
        cpu::gemm_with(kern, &case.p, &case.a, &case.b, &mut c2, case.epilogue()).unwrap();
        assert!(
            c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{isa}"
        );
        case.check_out(&format!("gemm under {isa}"), &c1).unwrap();
    }
    for kern in Kernel::ALL {
        let mut c = case.c.clone();
        let r = cpu::gemm_with(kern, &case.p, &case.a, &case.b, &mut c, case.epilogue());
        assert_eq!(r.is_ok(), kern.isa() <= Isa::detected(), "{kern:?}");
    }
}

/// `L = sum(dC * alpha op(A) op(B))` over the batch, in f64 from A and B as
/// f64 (the definition; gaps are ignored).
fn loss(p: &Gemm, a: &[f64], b: &[f64], dc: &[f32]) -> f64 {
    let mut l = 0.0;
    for bi in 0..p.batch {
        for i in 0..p.m {
            for j in 0..p.n {
                let mut s = 0.0;
                for kk in 0..p.k {
                    let av = if p.trans_a {
                        a[bi * p.stride_a + kk * p.lda + i]
                    } else {
                        a[bi * p.stride_a + i * p.lda + kk]
                    };
                    let bv = if p.trans_b {
                        b[bi * p.stride_b + j * p.ldb + kk]
                    } else {
                        b[bi * p.stride_b + kk * p.ldb + j]
                    };
                    s += av * bv;
                }
                l += dc[bi * p.stride_c + i * p.ldc + j] as f64 * p.alpha as f64 * s;
            }
        }
    }
    l
}

/// Compares a gradient with finite differences where the operand has
/// elements (`mask`), and checks that the gaps kept their sentinel.
fn check_grad(what: &str, got: &[f32], fd: &[f64], mask: &[bool], tol: f64) -> Result<(), String> {
    for (i, ((&g, &w), &inside)) in got.iter().zip(fd).zip(mask).enumerate() {
        if inside {
            // Written so that NaN fails too.
            let ok = (g as f64 - w).abs() <= tol;
            if !ok {
                return Err(format!(
                    "{what}[{i}]: got {g}, finite differences {w}, tol {tol}"
                ));
            }
        } else if g != GRAD_GAP {
            return Err(format!(
                "{what}[{i}] is in a gap of the layout but was written: {g}"
            ));
        }
    }
    Ok(())
}

const GRAD_GAP: f32 = 4242.0;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// dA and dB against central differences (f64) of the f64 definition,
    /// for every transpose pair, padded leading dimensions, batches with A
    /// and/or B shared (their gradient is the sum over the batch).
    /// Tolerance: the gradient elements are sums of `t = batch * max(m, n)`
    /// products of magnitude <= |alpha| (inputs in [-1, 1]), so f32 errs by
    /// at most `(t + 4) eps |alpha| t`; L is bilinear, so the differences
    /// are exact but for f64 rounding (~1e-12 here).
    #[test]
    fn backward_matches_finite_differences(
        m in dim(9), n in dim(9), k in dim(9), ta: bool, tb: bool, batch in 1usize..=3,
        pad in 0usize..=1, share in 0u8..4, seed: u64,
    ) {
        let case = Case::new((m, n, k), (ta, tb), (1.5, 0.0), batch, pad, share, (0, 0), seed);
        let p = case.p;
        let mut rng = Rng::new(seed ^ 0xD0);
        let dc = strided(&mut rng, batch, p.stride_c, m, n, p.ldc, 0.0);
        let mask = |v: &[f32]| v.iter().map(|x| !x.is_nan()).collect::<Vec<bool>>();
        let (mask_a, mask_b) = (mask(&case.a), mask(&case.b));
        // NaN gaps would poison the f64 definition's FD; they are not read.
        let zero_gaps = |v: &[f32]| v.iter().map(|&x| if x.is_nan() { 0.0 } else { x as f64 }).collect::<Vec<f64>>();
        let (a64, b64) = (zero_gaps(&case.a), zero_gaps(&case.b));

        let mut da = vec![GRAD_GAP; case.a.len()];
        let mut db = vec![GRAD_GAP; case.b.len()];
        cpu::gemm_backward(&p, &case.a, &case.b, &dc, Some(&mut da), Some(&mut db)).unwrap();

        let fd_a = finite_diff(|x| loss(&p, x, &b64, &dc), &a64, 1e-3);
        let fd_b = finite_diff(|x| loss(&p, &a64, x, &dc), &b64, 1e-3);
        let t = (batch * m.max(n).max(k)) as f64;
        let tol = 1e-9 + (t + 4.0) * f32::EPSILON as f64 * 1.5 * t;
        let r = check_grad("dA", &da, &fd_a, &mask_a, tol);
        prop_assert!(r.is_ok(), "{:?}: {}", p, r.unwrap_err());
        let r = check_grad("dB", &db, &fd_b, &mask_b, tol);
        prop_assert!(r.is_ok(), "{:?}: {}", p, r.unwrap_err());

        // Either gradient alone gives the same values.
        let mut da1 = vec![GRAD_GAP; case.a.len()];
        cpu::gemm_backward(&p, &case.a, &case.b, &dc, Some(&mut da1), None).unwrap();
        prop_assert!(da1.iter().zip(&da).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

#[test]
fn errors_name_gemm_and_the_sizes() {
    let p = Gemm::new(4, 5, 6);
    let (a, b, mut c) = (vec![0.0; 24], vec![0.0; 30], vec![0.0; 20]);
    let e = Epilogue::default();
    assert_err_mentions(
        cpu::gemm(&p, &a[..23], &b, &mut c, e),
        "gemm",
        &["A length", "24", "23"],
    );
    assert_err_mentions(
        cpu::gemm(&p, &a, &b[..29], &mut c, e),
        "gemm",
        &["B length", "30", "29"],
    );
    assert_err_mentions(
        cpu::gemm(&p, &a, &b, &mut c[..19], e),
        "gemm",
        &["C length", "20", "19"],
    );
    assert_err_mentions(
        cpu::gemm_portable(&p, &a, &b, &mut c[..19], e),
        "gemm",
        &["C length", "20", "19"],
    );
    let bad_ld = Gemm { lda: 5, ..p };
    assert_err_mentions(
        cpu::gemm(&bad_ld, &a, &b, &mut c, e),
        "gemm",
        &["lda", "5", "6"],
    );
    let bad_ldc = Gemm { ldc: 4, ..p };
    assert_err_mentions(
        cpu::gemm(&bad_ldc, &a, &b, &mut c, e),
        "gemm",
        &["ldc", "4", "5"],
    );
    let bias = [0.0f32; 3];
    let eb = Epilogue {
        bias: Bias::PerRow(&bias[..]),
        ..e
    };
    assert_err_mentions(
        cpu::gemm(&p, &a, &b, &mut c, eb),
        "gemm",
        &["bias (per row, m)", "4", "3"],
    );
    let eb = Epilogue {
        bias: Bias::PerCol(&bias[..]),
        ..e
    };
    assert_err_mentions(
        cpu::gemm(&p, &a, &b, &mut c, eb),
        "gemm",
        &["bias (per column, n)", "5", "3"],
    );
    let overlap = Gemm {
        batch: 2,
        stride_c: 19,
        ..p.batched(2)
    };
    let (a2, b2, mut c2) = (vec![0.0; 48], vec![0.0; 60], vec![0.0; 40]);
    assert_err_mentions(
        cpu::gemm(&overlap, &a2, &b2, &mut c2, e),
        "gemm",
        &["stride_c", "19", "20"],
    );

    // Backward: dA / dB must have A's / B's length; overlapping A items
    // cannot get separate gradients.
    let dc = vec![0.0; 20];
    let (mut da, mut db) = (vec![0.0; 23], vec![0.0; 30]);
    assert_err_mentions(
        cpu::gemm_backward(&p, &a, &b, &dc, Some(&mut da), Some(&mut db)),
        "gemm_backward",
        &["dA", "24", "23"],
    );
    let (mut da, mut db) = (vec![0.0; 24], vec![0.0; 31]);
    assert_err_mentions(
        cpu::gemm_backward(&p, &a, &b, &dc, Some(&mut da), Some(&mut db)),
        "gemm_backward",
        &["dB", "30", "31"],
    );
    assert_err_mentions(
        cpu::gemm_backward(&p, &a, &b, &dc[..19], None, None),
        "gemm_backward",
        &["C length", "20", "19"],
    );
    let shared_overlap = Gemm {
        stride_a: 12,
        ..p.batched(2)
    };
    let mut da = vec![0.0; 36];
    assert_err_mentions(
        cpu::gemm_backward(&shared_overlap, &a2[..36], &b2, &c2, Some(&mut da), None),
        "gemm_backward",
        &["stride_a", "12", "24"],
    );
}
