//! The CUDA GEMM (`ops::gemm::cuda`) against the CPU reference
//! (`ops::gemm::cpu::gemm`) and, for `gemm_backward`, against an f64
//! definition: every transpose pair, odd/prime sizes off every tile edge and
//! larger than several tiles, leading dimensions with gaps that must stay
//! untouched, batches with shared operands, beta = 0 with NaN in C, k = 0,
//! each epilogue, determinism and argument errors. The property tests, the
//! tile-edge, misalignment and k = 0 tests run every kernel version
//! (`GemmKernel::ALL`, forced with `gemm_with` / `gemm_backward_with`)
//! whatever the shape, each held to its precision's tolerance (f32: `tol`;
//! the opt-in TF32 version: `check_version`'s TF32 bound); the others run
//! the version `select` picks (always f32).
//!
//! Every test needs a CUDA device and is ignored otherwise:
//! `cargo test --release --test gpu_gemm -- --ignored`.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use kestrel::cuda::CudaBackend;
use kestrel::ops::activation::{Activation, ActivationKind};
use kestrel::ops::gemm::cuda::{self as gg, DeviceEpilogue, GemmKernel};
use kestrel::ops::gemm::{Bias, Epilogue, Gemm, Precision, cpu};
use proptest::prelude::*;

/// Each element is a sum of `terms` products of values in [-1, 1], computed
/// in f32 on both sides in different orders (the GPU with fma). Each side's
/// rounding error stays under ~1e-7 per term with random signs, so 1e-6 per
/// term is an order of magnitude of slack, while an indexing mistake (an
/// error of one term, ~0.1) still fails. The relative part covers the
/// epilogue's transcendental activations (a few ulps apart).
const TOL_PER_TERM: f64 = 1e-6;

fn tol(terms: usize) -> Tol {
    Tol::new(TOL_PER_TERM * terms.max(1) as f64, 1e-5)
}

/// TF32's unit roundoff: 10 stored mantissa bits (11 with the implicit
/// one), operands rounded to nearest by cvt.rna, so each is within
/// `2^-11` of its f32 value, relatively.
const TF32_U: f64 = 1.0 / 2048.0;
/// f32's unit roundoff, 2^-24.
const F32_U: f64 = 1.0 / 16_777_216.0;

/// The bound, per unit of `sum_i |alpha * a_i * b_i|` of an element, on how
/// far a TF32 version may be from the f32 CPU reference for sums of `terms`
/// products: each product of two rounded operands is off by at most
/// `(1 + u)^2 - 1 = 2u + u^2` of its magnitude (u = 2^-11); the device sums
/// in f32 in an order the hardware does not specify, and the reference in
/// f32 in its own, each off by at most about `terms * 2^-24` of the sum of
/// magnitudes. (About 1e-3 for short sums: a misplaced or missing term of
/// the data's size, ~0.1 to 1, is still far outside it.) The epilogue after
/// the product (beta, bias, activations: none steeper than slope 1) adds
/// only f32 roundings, which `tol` covers.
fn tf32_rel(terms: usize) -> f64 {
    2.0 * TF32_U + TF32_U * TF32_U + 2.0 * terms.max(1) as f64 * F32_U
}

/// The versions the test device runs: every one of [`GemmKernel::ALL`] but
/// those it cannot load (the sm_90a wgmma version anywhere but compute
/// capability 9.0, which the emulated device reports by default, so that it
/// is tested there). On 9.0 that is all of them.
fn versions(gpu: &CudaBackend) -> impl Iterator<Item = GemmKernel> + use<> {
    let info = gpu.info().clone();
    assert!(
        info.compute_capability != (9, 0) || GemmKernel::ALL.iter().all(|k| k.runs_on(&info)),
        "every version runs on 9.0"
    );
    GemmKernel::ALL
        .into_iter()
        .filter(move |k| k.runs_on(&info))
}

/// Checks a result of `kernel` (`None`: [`gg::select`]'s choice, always f32)
/// against the reference `want`: f32 versions within `tol(terms)`; TF32
/// versions, element by element, within
/// `tol(terms).abs + tol(terms).rel * |want| + tf32_rel(terms) * mag`, where
/// `mag` is the element's `sum_i |alpha * a_i * b_i|` (see [`magnitudes`]).
fn check_version(
    what: &str,
    kernel: Option<GemmKernel>,
    got: &[f32],
    want: &[f64],
    mag: &[f64],
    terms: usize,
) -> Result<(), String> {
    let base = tol(terms);
    match kernel.map(GemmKernel::precision) {
        None | Some(Precision::F32) => check_close(what, got, want, base),
        Some(Precision::Tf32) => {
            if got.len() != want.len() || mag.len() != want.len() {
                return Err(format!(
                    "{what}: lengths {} / {} / {}",
                    got.len(),
                    want.len(),
                    mag.len()
                ));
            }
            for i in 0..want.len() {
                let t = Tol::new(base.abs + tf32_rel(terms) * mag[i], base.rel);
                check_close(what, &got[i..=i], &want[i..=i], t)
                    .map_err(|e| format!("(tf32, element {i}, sum |ab| {}) {e}", mag[i]))?;
            }
            Ok(())
        }
    }
}

/// `sum_i |alpha * a_i * b_i|` for every element of C (0 in C's gaps), as
/// the CPU computes `|alpha| * |op(A)| * |op(B)|`.
fn magnitudes(p: &Gemm, a: &[f32], b: &[f32], lc: usize) -> Vec<f64> {
    let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
    let q = Gemm {
        alpha: p.alpha.abs(),
        beta: 0.0,
        ..*p
    };
    let mut c = vec![0.0f32; lc];
    cpu::gemm(&q, &abs(a), &abs(b), &mut c, Epilogue::default()).expect("cpu gemm (magnitudes)");
    to_f64(&c)
}

/// Elements a batch of `rows x cols` matrices (row stride `ld`, batch
/// stride `stride`) spans.
fn span(batch: usize, stride: usize, rows: usize, cols: usize, ld: usize) -> usize {
    if batch == 0 || rows == 0 || cols == 0 {
        0
    } else {
        (batch - 1) * stride + (rows - 1) * ld + cols
    }
}

fn lens(p: &Gemm) -> (usize, usize, usize) {
    let (ar, ac) = p.a_dims();
    let (br, bc) = p.b_dims();
    (
        span(p.batch, p.stride_a, ar, ac, p.lda),
        span(p.batch, p.stride_b, br, bc, p.ldb),
        span(p.batch, p.stride_c, p.m, p.n, p.ldc),
    )
}

/// A device copy of `v` (one spare element so that empty buffers can be
/// allocated); view it with `.slice(..v.len())`.
fn dev(gpu: &CudaBackend, v: &[f32]) -> CudaSlice<f32> {
    let mut h = v.to_vec();
    h.push(POISON);
    gpu.upload(&h).expect("upload")
}

fn host(gpu: &CudaBackend, d: &CudaSlice<f32>, len: usize) -> Vec<f32> {
    let mut v = gpu.download(d).expect("download");
    v.truncate(len);
    v
}

#[derive(Clone, Copy, Debug)]
enum BiasSel {
    None,
    Row,
    Col,
}

/// Runs `p` with the given data on both backends, the GPU with the version
/// [`gg::select`] picks; returns (gpu, cpu) C.
#[allow(clippy::too_many_arguments)]
fn run_both(
    gpu: &CudaBackend,
    p: &Gemm,
    a: &[f32],
    b: &[f32],
    c0: &[f32],
    bias: &[f32],
    sel: BiasSel,
    act: Activation,
) -> (Vec<f32>, Vec<f32>) {
    run_both_with(gpu, None, p, a, b, c0, bias, sel, act)
}

/// [`run_both`] with the GPU on `kernel` (`None`: [`gg::gemm`]'s choice).
#[allow(clippy::too_many_arguments)]
fn run_both_with(
    gpu: &CudaBackend,
    kernel: Option<GemmKernel>,
    p: &Gemm,
    a: &[f32],
    b: &[f32],
    c0: &[f32],
    bias: &[f32],
    sel: BiasSel,
    act: Activation,
) -> (Vec<f32>, Vec<f32>) {
    let mut want = c0.to_vec();
    let host_bias = match sel {
        BiasSel::None => Bias::None,
        BiasSel::Row => Bias::PerRow(bias),
        BiasSel::Col => Bias::PerCol(bias),
    };
    cpu::gemm(
        p,
        a,
        b,
        &mut want,
        Epilogue {
            bias: host_bias,
            activation: act,
        },
    )
    .expect("cpu gemm");
    let (da, db, mut dc, dbias) = (dev(gpu, a), dev(gpu, b), dev(gpu, c0), dev(gpu, bias));
    let bias_view = dbias.slice(..bias.len());
    let dev_bias = match sel {
        BiasSel::None => Bias::None,
        BiasSel::Row => Bias::PerRow(&bias_view),
        BiasSel::Col => Bias::PerCol(&bias_view),
    };
    let epi = DeviceEpilogue {
        bias: dev_bias,
        activation: act,
    };
    let (va, vb, mut vc) = (
        da.slice(..a.len()),
        db.slice(..b.len()),
        dc.slice_mut(..c0.len()),
    );
    match kernel {
        None => gg::gemm(gpu, p, &va, &vb, &mut vc, epi),
        Some(k) => with_workspace(gpu, k, p, &va, &vb, &mut vc, epi),
    }
    .expect("gpu gemm");
    (host(gpu, &dc, c0.len()), want)
}

/// `gemm_with` on `kernel` with a workspace of exactly `workspace_len` floats
/// (`None` where that is 0).
fn with_workspace(
    gpu: &CudaBackend,
    kernel: GemmKernel,
    p: &Gemm,
    a: &cudarc::driver::CudaView<'_, f32>,
    b: &cudarc::driver::CudaView<'_, f32>,
    c: &mut cudarc::driver::CudaViewMut<'_, f32>,
    epi: DeviceEpilogue,
) -> kestrel::error::Result<()> {
    let need = gg::workspace_len(p, kernel);
    if need == 0 {
        return gg::gemm_with(gpu, kernel, p, a, b, c, epi, None);
    }
    let mut ws = dev(gpu, &vec![POISON; need]);
    gg::gemm_with(
        gpu,
        kernel,
        p,
        a,
        b,
        c,
        epi,
        Some(&mut ws.slice_mut(..need)),
    )
}

fn activation(i: u8) -> Activation {
    let (kind, alpha) = match i % 6 {
        0 => (ActivationKind::Linear, 0.0),
        1 => (ActivationKind::Relu, 0.0),
        2 => (ActivationKind::Elu, 1.0),
        3 => (ActivationKind::LeakyRelu, 0.3),
        4 => (ActivationKind::Tanh, 0.0),
        _ => (ActivationKind::Sigmoid, 0.0),
    };
    Activation { kind, alpha }
}

/// A GEMM with the given sizes and transposes, leading dimensions `extra`
/// past the row length, and a batch where A / B may be shared (stride 0)
/// and C's items have a gap of `gap` elements between them.
#[allow(clippy::too_many_arguments)]
fn layout(
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    extra: usize,
    batch: usize,
    share: (bool, bool),
    gap: usize,
) -> Gemm {
    let mut p = Gemm::new(m, n, k).transpose(ta, tb);
    p.lda += extra;
    p.ldb += (extra * 2) % 5;
    p.ldc += extra;
    let (ar, _) = p.a_dims();
    let (br, _) = p.b_dims();
    p.batch = batch;
    p.stride_a = if share.0 { 0 } else { ar * p.lda + gap };
    p.stride_b = if share.1 { 0 } else { br * p.ldb };
    p.stride_c = m * p.ldc + gap;
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random sizes, layouts, scalars and epilogues against the CPU; C starts
    /// as data (beta != 0) or as POISON NaN (beta == 0, so it must not be
    /// read), and the gaps between rows and batch items hold POISON that
    /// must survive.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn matches_cpu(
        m in dim(300), n in dim(300), k in dim(300), ta: bool, tb: bool,
        extra in 0usize..4, batch in 1usize..4, share: (bool, bool), gap in 0usize..3,
        beta_sel in 0u8..3, bias_sel in 0u8..3, act in 0u8..6, seed: u64,
    ) {
        let gpu = gpu();
        let beta = [0.0f32, 1.0, -0.5][beta_sel as usize];
        let p = layout(m, n, k, ta, tb, extra, batch, share, gap).scale(0.75, beta);
        let (la, lb, lc) = lens(&p);
        let mut rng = common::Rng::new(seed);
        let a = rng.vec(la, -1.0, 1.0);
        let b = rng.vec(lb, -1.0, 1.0);
        let mut c0 = vec![POISON; lc];
        if beta != 0.0 {
            for bi in 0..batch {
                for i in 0..m {
                    for j in 0..n {
                        c0[bi * p.stride_c + i * p.ldc + j] = rng.uniform(-1.0, 1.0);
                    }
                }
            }
        }
        let sel = [BiasSel::None, BiasSel::Row, BiasSel::Col][bias_sel as usize];
        let bias = rng.vec(match sel { BiasSel::Col => n, _ => m }, -1.0, 1.0);
        let mag = magnitudes(&p, &a, &b, lc);
        for kernel in versions(&gpu) {
            let (got, want) =
                run_both_with(&gpu, Some(kernel), &p, &a, &b, &c0, &bias, sel, activation(act));
            let r = check_version("gemm C", Some(kernel), &got, &to_f64(&want), &mag, k);
            prop_assert!(r.is_ok(), "{:?} {:?}: {}", kernel, p, r.unwrap_err());
        }
    }
}

/// Every transpose pair on sizes one off the 64- and 128-tiles in every
/// dimension, on every kernel version and on the selected one.
#[test]
#[ignore = "needs a CUDA device"]
fn tile_edges_every_transpose() {
    let gpu = gpu();
    let sizes = [
        (1, 1, 1),
        (63, 65, 17),
        (64, 64, 16),
        (65, 63, 15),
        (127, 129, 9),
        (128, 128, 8),
        (129, 127, 7),
        (257, 300, 33),
        (1, 300, 257),
        (300, 1, 5),
    ];
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for &(m, n, k) in &sizes {
            let p = Gemm::new(m, n, k).transpose(ta, tb);
            let a = data(1, m * k, -1.0, 1.0);
            let b = data(2, k * n, -1.0, 1.0);
            let c0 = vec![POISON; m * n];
            let mag = magnitudes(&p, &a, &b, m * n);
            for kernel in std::iter::once(None).chain(versions(&gpu).map(Some)) {
                let (got, want) = run_both_with(
                    &gpu,
                    kernel,
                    &p,
                    &a,
                    &b,
                    &c0,
                    &[],
                    BiasSel::None,
                    Activation::LINEAR,
                );
                let what = format!("gemm {m}x{n}x{k} ta={ta} tb={tb} {kernel:?}");
                if let Err(e) = check_version(&what, kernel, &got, &to_f64(&want), &mag, k) {
                    panic!("{e}");
                }
            }
        }
    }
}

/// Operands at offsets that are not 16-byte aligned, with leading
/// dimensions that are and are not multiples of 4: the float4 path must
/// fall back to scalar loads.
#[test]
#[ignore = "needs a CUDA device"]
fn misaligned_views() {
    let gpu = gpu();
    for (ta, tb) in [(false, false), (true, true), (false, true), (true, false)] {
        for (off, extra) in [(1usize, 0usize), (2, 4), (3, 1), (0, 3)] {
            let mut p = Gemm::new(70, 90, 40).transpose(ta, tb);
            p.lda += extra;
            p.ldb += extra;
            let (la, lb, lc) = lens(&p);
            let a = data(3, la + off, -1.0, 1.0);
            let b = data(4, lb + off, -1.0, 1.0);
            let c0 = vec![POISON; lc];
            let mut want = c0.clone();
            cpu::gemm(&p, &a[off..], &b[off..], &mut want, Epilogue::default()).unwrap();
            let mag = magnitudes(&p, &a[off..], &b[off..], lc);
            let (da, db) = (dev(&gpu, &a), dev(&gpu, &b));
            for kernel in std::iter::once(None).chain(versions(&gpu).map(Some)) {
                let mut dc = dev(&gpu, &c0);
                let (va, vb) = (da.slice(off..off + la), db.slice(off..off + lb));
                let mut vc = dc.slice_mut(..lc);
                let epi = DeviceEpilogue::default();
                match kernel {
                    None => gg::gemm(&gpu, &p, &va, &vb, &mut vc, epi),
                    Some(k) => with_workspace(&gpu, k, &p, &va, &vb, &mut vc, epi),
                }
                .unwrap();
                let what = format!("gemm offset {off} extra {extra} ta={ta} tb={tb} {kernel:?}");
                let got = host(&gpu, &dc, lc);
                if let Err(e) = check_version(&what, kernel, &got, &to_f64(&want), &mag, 40) {
                    panic!("{e}");
                }
            }
        }
    }
}

/// k == 0 gives act(beta * C + bias) whatever alpha is (alpha times an
/// empty sum is no term at all, as in BLAS: a non-finite alpha must not turn
/// it into NaN); beta == 0 then writes act(bias) over NaN.
#[test]
#[ignore = "needs a CUDA device"]
fn k_zero() {
    let gpu = gpu();
    for (alpha, beta) in [
        (1.0f32, 0.0f32),
        (1.0, 2.0),
        (f32::INFINITY, 2.0),
        (f32::NAN, 0.0),
        (f32::NEG_INFINITY, 0.5),
    ] {
        let mut p = Gemm::new(5, 7, 0).scale(alpha, beta).batched(2);
        p.lda = 1; // at least 1 even for an empty row
        let c0 = if beta == 0.0 {
            vec![f32::NAN; 70]
        } else {
            data(5, 70, -1.0, 1.0)
        };
        let bias = data(6, 7, -1.0, 1.0);
        for kernel in std::iter::once(None).chain(versions(&gpu).map(Some)) {
            let (got, want) = run_both_with(
                &gpu,
                kernel,
                &p,
                &[],
                &[],
                &c0,
                &bias,
                BiasSel::Col,
                Activation::RELU,
            );
            // No product term, so every version is within f32's tolerance.
            assert_close(
                &format!("gemm k = 0, alpha {alpha}, beta {beta}, {kernel:?}"),
                &got,
                &to_f64(&want),
                tol(1),
            );
            assert!(
                got.iter().all(|v| v.is_finite()),
                "NaN leaked from C or alpha (alpha {alpha}, beta {beta}, {kernel:?})"
            );
        }
    }
}

/// NaN in an operand reaches exactly the outputs that use it.
#[test]
#[ignore = "needs a CUDA device"]
fn nan_propagates() {
    let gpu = gpu();
    let p = Gemm::new(3, 4, 5);
    let mut a = data(7, 15, -1.0, 1.0);
    a[5] = f32::NAN; // row 1
    let b = data(8, 20, -1.0, 1.0);
    let (got, want) = run_both(
        &gpu,
        &p,
        &a,
        &b,
        &[0.0; 12],
        &[],
        BiasSel::None,
        Activation::RELU,
    );
    assert_close("gemm NaN", &got, &to_f64(&want), tol(5));
    assert!(got[4..8].iter().all(|v| v.is_nan()) && got[..4].iter().all(|v| !v.is_nan()));
}

/// A large batch with a shared A (the conv pattern) and many tiles: two
/// launches give bit-identical results.
#[test]
#[ignore = "needs a CUDA device"]
fn deterministic() {
    let gpu = gpu();
    let mut p = Gemm::new(64, 200, 300).batched(9);
    p.stride_a = 0;
    let (la, lb, lc) = lens(&p);
    let (a, b) = (data(9, la, -1.0, 1.0), data(10, lb, -1.0, 1.0));
    let c0 = vec![POISON; lc];
    let (first, want) = run_both(&gpu, &p, &a, &b, &c0, &[], BiasSel::None, Activation::TANH);
    let (second, _) = run_both(&gpu, &p, &a, &b, &c0, &[], BiasSel::None, Activation::TANH);
    assert_close("gemm batch", &first, &to_f64(&want), tol(300));
    assert!(
        first
            .iter()
            .zip(&second)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "two runs differ"
    );
    // The TF32 versions are deterministic too (no atomics, a fixed order).
    for tf32 in versions(&gpu).filter(|k| k.precision() == Precision::Tf32) {
        let tf32 = Some(tf32);
        let args = (&p, &a[..], &b[..], &c0[..]);
        let run = || {
            run_both_with(
                &gpu,
                tf32,
                args.0,
                args.1,
                args.2,
                args.3,
                &[],
                BiasSel::None,
                Activation::TANH,
            )
            .0
        };
        let (first, second) = (run(), run());
        let mag = magnitudes(&p, &a, &b, lc);
        if let Err(e) = check_version("gemm batch tf32", tf32, &first, &to_f64(&want), &mag, 300) {
            panic!("{e}");
        }
        assert!(
            first
                .iter()
                .zip(&second)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "two {tf32:?} runs differ"
        );
    }
}

/// The TF32 version really rounds its operands to TF32 (round to nearest,
/// ties away from zero), and the f32 versions do not: with B all ones and
/// k = 64, rows of A holding 1 + 2^-13 (below half a TF32 ulp: rounds to 1)
/// sum to exactly 64 in TF32 and 64 + 2^-7 in f32; rows holding 1 + 2^-11
/// (a tie: rounds away, to 1 + 2^-10) to exactly 64 + 2^-4 in TF32 and
/// 64 + 2^-5 in f32. Every one of these sums is exact in f32, whatever the
/// accumulation order.
#[test]
#[ignore = "needs a CUDA device"]
fn tf32_rounds_its_operands() {
    let gpu = gpu();
    let (m, n, k) = (32usize, 24usize, 64usize);
    let p = Gemm::new(m, n, k);
    let row_value = |i: usize| {
        if i.is_multiple_of(2) {
            1.0 + 2f32.powi(-13)
        } else {
            1.0 + 2f32.powi(-11)
        }
    };
    let a: Vec<f32> = (0..m * k).map(|e| row_value(e / k)).collect();
    let b = vec![1.0f32; k * n];
    let c0 = vec![POISON; m * n];
    for kernel in versions(&gpu) {
        let (got, _) = run_both_with(
            &gpu,
            Some(kernel),
            &p,
            &a,
            &b,
            &c0,
            &[],
            BiasSel::None,
            Activation::LINEAR,
        );
        for (e, &v) in got.iter().enumerate() {
            let i = e / n;
            let want = match (kernel.precision(), i % 2) {
                (Precision::Tf32, 0) => 64.0,
                (Precision::Tf32, _) => 64.0 + 2f32.powi(-4),
                (Precision::F32, 0) => 64.0 + 2f32.powi(-7),
                (Precision::F32, _) => 64.0 + 2f32.powi(-5),
            };
            assert_eq!(v, want, "{kernel:?} ({}) C[{i}, {}]", kernel.name(), e % n);
        }
    }
}

/// f64 gradients of `L = sum(dC * alpha * op(A) op(B))` per batch item, in
/// the stored layouts of A and B, summed over items for a shared operand.
fn backward_ref(
    p: &Gemm,
    a: &[f32],
    b: &[f32],
    dc: &[f32],
    la: usize,
    lb: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut da = vec![0.0f64; la];
    let mut db = vec![0.0f64; lb];
    let ai = |bi: usize, i: usize, l: usize| {
        bi * p.stride_a
            + if p.trans_a {
                l * p.lda + i
            } else {
                i * p.lda + l
            }
    };
    let bi_ = |bi: usize, l: usize, j: usize| {
        bi * p.stride_b
            + if p.trans_b {
                j * p.ldb + l
            } else {
                l * p.ldb + j
            }
    };
    for bi in 0..p.batch {
        for i in 0..p.m {
            for j in 0..p.n {
                let g = p.alpha as f64 * dc[bi * p.stride_c + i * p.ldc + j] as f64;
                for l in 0..p.k {
                    da[ai(bi, i, l)] += g * b[bi_(bi, l, j)] as f64;
                    db[bi_(bi, l, j)] += g * a[ai(bi, i, l)] as f64;
                }
            }
        }
    }
    (da, db)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// dA and dB against the f64 definition, every layout, shared operands
    /// summed over the batch (split into partial sums when the batch is
    /// long), the gaps of dA / dB untouched (they start as POISON and are
    /// POISON in the reference too).
    #[test]
    #[ignore = "needs a CUDA device"]
    fn backward_matches_definition(
        m in dim(70), n in dim(70), k in dim(70), ta: bool, tb: bool, extra in 0usize..3,
        batch in 1usize..40, share: (bool, bool), seed: u64,
    ) {
        let gpu = gpu();
        let p = layout(m, n, k, ta, tb, extra, batch, share, 1).scale(-1.5, 0.0);
        let (la, lb, lc) = lens(&p);
        let mut rng = common::Rng::new(seed);
        let a = rng.vec(la, -1.0, 1.0);
        let b = rng.vec(lb, -1.0, 1.0);
        let dc = rng.vec(lc, -1.0, 1.0);
        let (mut wa, mut wb) = backward_ref(&p, &a, &b, &dc, la, lb);
        // Mark the gaps: the reference never writes them, so they keep POISON.
        let (ar, ac) = p.a_dims();
        let (br, bc) = p.b_dims();
        let mark = |w: &mut Vec<f64>, stride: usize, rows: usize, cols: usize, ld: usize| {
            let mut hit = vec![false; w.len()];
            for bi in 0..p.batch { for r in 0..rows { for c in 0..cols {
                hit[bi * stride + r * ld + c] = true;
            }}}
            for (v, h) in w.iter_mut().zip(hit) { if !h { *v = f64::NAN; } }
        };
        mark(&mut wa, p.stride_a, ar, ac, p.lda);
        mark(&mut wb, p.stride_b, br, bc, p.ldb);
        let (d_a, d_b, d_c) = (dev(&gpu, &a), dev(&gpu, &b), dev(&gpu, &dc));
        // sum |alpha * x_i * y_i| per gradient element, for the TF32 bound.
        let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
        let p_abs = Gemm { alpha: p.alpha.abs(), ..p };
        let (mag_a, mag_b) = backward_ref(&p_abs, &abs(&a), &abs(&b), &abs(&dc), la, lb);
        let terms_a = n * if share.0 { batch } else { 1 };
        let terms_b = m * if share.1 { batch } else { 1 };
        // The caller's workspace, poisoned: the partial sums must write
        // what they read.
        let lw = gg::backward_workspace_len(&p);
        let mut ws = dev(&gpu, &vec![POISON; lw]);
        for kernel in versions(&gpu) {
            let mut ga = dev(&gpu, &vec![POISON; la]);
            let mut gb = dev(&gpu, &vec![POISON; lb]);
            gg::gemm_backward_with(
                &gpu, kernel, &p, &d_a.slice(..la), &d_b.slice(..lb), &d_c.slice(..lc),
                Some(&mut ga.slice_mut(..la)), Some(&mut gb.slice_mut(..lb)),
                (lw > 0).then(|| ws.slice_mut(..lw)).as_mut(),
            ).unwrap();
            let r = check_version("dA", Some(kernel), &host(&gpu, &ga, la), &wa, &mag_a, terms_a * 2);
            prop_assert!(r.is_ok(), "{:?} {:?}: {}", kernel, p, r.unwrap_err());
            let r = check_version("dB", Some(kernel), &host(&gpu, &gb, lb), &wb, &mag_b, terms_b * 2);
            prop_assert!(r.is_ok(), "{:?} {:?}: {}", kernel, p, r.unwrap_err());
        }
    }
}

/// A shared operand's gradient over a long batch (the split into partial
/// sums) is bit-identical run to run, and an empty batch zeroes it.
#[test]
#[ignore = "needs a CUDA device"]
fn backward_shared_deterministic_and_empty() {
    let gpu = gpu();
    let mut p = Gemm::new(20, 30, 40).batched(100);
    p.stride_a = 0;
    let (la, lb, lc) = lens(&p);
    let (a, b, dc) = (
        data(11, la, -1.0, 1.0),
        data(12, lb, -1.0, 1.0),
        data(13, lc, -1.0, 1.0),
    );
    let (d_a, d_b, d_c) = (dev(&gpu, &a), dev(&gpu, &b), dev(&gpu, &dc));
    let lw = gg::backward_workspace_len(&p);
    assert!(lw >= 20 * 40 * 2, "dA (20 x 40) over 100 items is split");
    let run = || {
        let mut ga = dev(&gpu, &vec![POISON; la]);
        let mut ws = dev(&gpu, &vec![POISON; lw]);
        gg::gemm_backward(
            &gpu,
            &p,
            &d_a.slice(..la),
            &d_b.slice(..lb),
            &d_c.slice(..lc),
            Some(&mut ga.slice_mut(..la)),
            None,
            Some(&mut ws.slice_mut(..lw)),
        )
        .unwrap();
        host(&gpu, &ga, la)
    };
    let (first, second) = (run(), run());
    let (want, _) = backward_ref(&p, &a, &b, &dc, la, lb);
    assert_close("dA shared", &first, &want, tol(30 * 100 * 2));
    assert!(
        first
            .iter()
            .zip(&second)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );

    let mut p0 = p;
    p0.batch = 0;
    let mut ga = dev(&gpu, &vec![POISON; la]);
    gg::gemm_backward_alloc(
        &gpu,
        &p0,
        &d_a.slice(..la),
        &d_b.slice(..0),
        &d_c.slice(..0),
        Some(&mut ga.slice_mut(..la)),
        None,
    )
    .unwrap();
    assert!(host(&gpu, &ga, la).iter().all(|&v| v == 0.0));
}

/// The sm_90a wgmma version forced on a device that is not compute
/// capability 9.0 is an error naming the kernel and the one capability it
/// loads on, not a panic or a failed module load; on 9.0 it runs, and
/// `select_with(.., Tf32)` picks it there and only there. (The emulated
/// device reports 9.0 unless `KEMU_COMPUTE_CAPABILITY` says otherwise;
/// ci/gpu-emu runs this test again at 10.0 and 8.0.)
#[test]
#[ignore = "needs a CUDA device"]
fn wgmma_only_on_9_0() {
    let gpu = gpu();
    let info = gpu.info().clone();
    let p = Gemm::new(3, 5, 7);
    let tf32 = gg::select_with(&p, &info, Precision::Tf32);
    let (a, b) = (
        dev(&gpu, &data(1, 21, -1.0, 1.0)),
        dev(&gpu, &data(2, 35, -1.0, 1.0)),
    );
    let mut c = dev(&gpu, &[0.0; 15]);
    let r = gg::gemm_with(
        &gpu,
        GemmKernel::Tf32Wgmma,
        &p,
        &a.slice(..21),
        &b.slice(..35),
        &mut c.slice_mut(..15),
        DeviceEpilogue::default(),
        None,
    );
    if info.compute_capability == (9, 0) {
        assert_eq!(tf32, GemmKernel::Tf32Wgmma);
        r.expect("wgmma on 9.0");
    } else {
        assert_ne!(tf32, GemmKernel::Tf32Wgmma, "{info:?}");
        assert_err_mentions(r, "gemm_tf32_wgmma_128x128", &["sm_90a", "9.0 exactly"]);
    }
}

/// Wrong lengths and bad leading dimensions are errors naming the op, before
/// any launch.
#[test]
#[ignore = "needs a CUDA device"]
fn errors() {
    let gpu = gpu();
    let p = Gemm::new(4, 5, 6);
    let (a, b, bias) = (
        dev(&gpu, &[0.0; 24]),
        dev(&gpu, &[0.0; 30]),
        dev(&gpu, &[0.0; 5]),
    );
    let mut c = dev(&gpu, &[0.0; 20]);
    let r = gg::gemm(
        &gpu,
        &p,
        &a.slice(..23),
        &b.slice(..30),
        &mut c.slice_mut(..20),
        DeviceEpilogue::default(),
    );
    assert_err_mentions(r, "gemm", &["A length", "at least 24", "23"]);
    let r = gg::gemm(
        &gpu,
        &p,
        &a.slice(..24),
        &b.slice(..30),
        &mut c.slice_mut(..19),
        DeviceEpilogue::default(),
    );
    assert_err_mentions(r, "gemm", &["C length", "20", "19"]);
    let bv = bias.slice(..5);
    let r = gg::gemm(
        &gpu,
        &p,
        &a.slice(..24),
        &b.slice(..30),
        &mut c.slice_mut(..20),
        DeviceEpilogue {
            bias: Bias::PerRow(&bv),
            activation: Activation::LINEAR,
        },
    );
    assert_err_mentions(r, "gemm", &["bias (per row, m)", "4", "5"]);
    let mut q = p;
    q.lda = 5;
    let r = gg::gemm(
        &gpu,
        &q,
        &a.slice(..24),
        &b.slice(..30),
        &mut c.slice_mut(..20),
        DeviceEpilogue::default(),
    );
    assert_err_mentions(r, "gemm", &["lda", "5", "6"]);
    let mut ga = dev(&gpu, &[0.0; 23]);
    let r = gg::gemm_backward_alloc(
        &gpu,
        &p,
        &a.slice(..24),
        &b.slice(..30),
        &c.slice(..20),
        Some(&mut ga.slice_mut(..23)),
        None,
    );
    assert_err_mentions(r, "gemm_backward", &["dA", "24", "23"]);
    // A shared A over 50 items splits dA's sum: the partials need a
    // workspace, and a missing or short one is an error naming its size.
    let mut q = p.batched(50);
    q.stride_a = 0;
    let need = gg::backward_workspace_len(&q);
    assert!(need > 0);
    let (_, lb, lc) = lens(&q);
    let (bq, cq) = (dev(&gpu, &vec![0.0; lb]), dev(&gpu, &vec![0.0; lc]));
    let mut ga = dev(&gpu, &[0.0; 24]);
    let mut ws = dev(&gpu, &vec![0.0; need]);
    for short in [None, Some(need - 1)] {
        let r = gg::gemm_backward(
            &gpu,
            &q,
            &a.slice(..24),
            &bq.slice(..lb),
            &cq.slice(..lc),
            Some(&mut ga.slice_mut(..24)),
            None,
            short.map(|l| ws.slice_mut(..l)).as_mut(),
        );
        let have = short.unwrap_or(0).to_string();
        assert_err_mentions(r, "gemm_backward", &["workspace", &need.to_string(), &have]);
    }
}

/// Split-K (v2) on the shapes it is for: few output tiles, long k (the
/// dense layer after a flatten, 128x128x8192, shrunk to k = 2048 for the
/// emulated device), a k that is not a multiple of the split or of the
/// 16-deep stage, a bias and an activation, and a misaligned view. Its
/// ranges are added in a different order than the CPU's k loop, so the two
/// differ by rounding alone, bounded by k * eps * sum |a||b| <= k * 6e-8 * k
/// for values in [-1, 1]: within TOL_PER_TERM * k. Two runs: the same bits.
#[test]
#[ignore = "needs a CUDA device"]
fn split_k_long_k() {
    let gpu = gpu();
    if !GemmKernel::V2SplitK.runs_on(gpu.info()) {
        return;
    }
    for (m, n, k, off) in [(128, 128, 2048, 0), (100, 60, 1000 + 13, 1), (1, 7, 517, 0)] {
        let p = Gemm::new(m, n, k).scale(0.5, 1.0);
        assert!(gg::split_k_parts_forced(&p) > 1, "{p:?} must split");
        let a = data(11, m * k + off, -1.0, 1.0);
        let b = data(12, k * n + off, -1.0, 1.0);
        let c0 = data(13, m * n, -1.0, 1.0);
        let bias = data(14, n, -1.0, 1.0);
        let mut want = c0.clone();
        let act = Activation::TANH;
        cpu::gemm(
            &p,
            &a[off..],
            &b[off..],
            &mut want,
            Epilogue {
                bias: Bias::PerCol(&bias),
                activation: act,
            },
        )
        .unwrap();
        let mut runs = Vec::new();
        for _ in 0..2 {
            let (da, db, mut dc, dbias) = (
                dev(&gpu, &a),
                dev(&gpu, &b),
                dev(&gpu, &c0),
                dev(&gpu, &bias),
            );
            let bv = dbias.slice(..n);
            with_workspace(
                &gpu,
                GemmKernel::V2SplitK,
                &p,
                &da.slice(off..off + m * k),
                &db.slice(off..off + k * n),
                &mut dc.slice_mut(..m * n),
                DeviceEpilogue {
                    bias: Bias::PerCol(&bv),
                    activation: act,
                },
            )
            .unwrap();
            runs.push(host(&gpu, &dc, m * n));
        }
        assert_close(
            &format!("split-K {m}x{n}x{k} offset {off}"),
            &runs[0],
            &to_f64(&want),
            tol(k),
        );
        assert!(
            runs[0]
                .iter()
                .zip(&runs[1])
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "split-K {m}x{n}x{k}: two runs differ"
        );
    }
}

/// Split-K's workspace comes from the caller: `gemm_with` with less than
/// `workspace_len` is an error naming the size (before any launch: C keeps
/// its contents); `gemm` never splits; `gemm_ws` splits the long-k dense
/// shape only with `select_workspace_len` floats, and with fewer gives
/// `gemm`'s bits exactly (v1 and v2 sum alike). With it: the CPU's result
/// within the split-K rounding bound of `split_k_long_k`, the same bits on
/// a rerun.
#[test]
#[ignore = "needs a CUDA device"]
fn split_k_workspace_from_the_caller() {
    let gpu = gpu();
    let (m, n, k) = (64, 48, 1024);
    let p = Gemm::new(m, n, k);
    let a = data(21, m * k, -1.0, 1.0);
    let b = data(22, k * n, -1.0, 1.0);
    let c0 = vec![POISON; m * n];
    let mut want = c0.clone();
    cpu::gemm(&p, &a, &b, &mut want, Epilogue::default()).unwrap();
    let (da, db) = (dev(&gpu, &a), dev(&gpu, &b));
    let (va, vb) = (da.slice(..m * k), db.slice(..k * n));
    assert_eq!(gg::workspace_len(&p, gg::select(&p, gpu.info())), 0);
    if !GemmKernel::V2SplitK.runs_on(gpu.info()) {
        return;
    }
    let need = gg::workspace_len(&p, GemmKernel::V2SplitK);
    assert!(need >= 2 * m * n, "split-K must need slabs: {need}");
    let mut dc = dev(&gpu, &c0);
    let mut small = dev(&gpu, &vec![0.0; need - 1]);
    let r = gg::gemm_with(
        &gpu,
        GemmKernel::V2SplitK,
        &p,
        &va,
        &vb,
        &mut dc.slice_mut(..m * n),
        DeviceEpilogue::default(),
        Some(&mut small.slice_mut(..need - 1)),
    );
    assert_err_mentions(
        r,
        "gemm",
        &[
            "workspace length",
            &format!("at least {need}"),
            &format!("{}", need - 1),
        ],
    );
    let r = gg::gemm_with(
        &gpu,
        GemmKernel::V2SplitK,
        &p,
        &va,
        &vb,
        &mut dc.slice_mut(..m * n),
        DeviceEpilogue::default(),
        None,
    );
    assert_err_mentions(
        r,
        "gemm",
        &["workspace length", &format!("at least {need}")],
    );
    assert!(
        host(&gpu, &dc, m * n)
            .iter()
            .all(|v| v.to_bits() == POISON.to_bits()),
        "C written by a refused launch"
    );

    let auto = gg::select_workspace_len(&p);
    assert!(auto > 0, "{p:?}: the selector must split it");
    assert_eq!(gg::select_ws(&p, gpu.info(), auto), GemmKernel::V2SplitK);
    let run = |ws_len: usize| {
        let mut dc = dev(&gpu, &c0);
        let mut ws = dev(&gpu, &vec![POISON; ws_len.max(1)]);
        gg::gemm_ws(
            &gpu,
            &p,
            &va,
            &vb,
            &mut dc.slice_mut(..m * n),
            DeviceEpilogue::default(),
            &mut ws.slice_mut(..ws_len),
        )
        .unwrap();
        host(&gpu, &dc, m * n)
    };
    let mut plain = dev(&gpu, &c0);
    gg::gemm(
        &gpu,
        &p,
        &va,
        &vb,
        &mut plain.slice_mut(..m * n),
        DeviceEpilogue::default(),
    )
    .unwrap();
    let plain = host(&gpu, &plain, m * n);
    let short = run(auto - 1);
    assert!(
        plain
            .iter()
            .zip(&short)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "gemm_ws without the whole workspace must be gemm"
    );
    let (s1, s2) = (run(auto), run(auto));
    assert_close("gemm_ws split-K", &s1, &to_f64(&want), tol(k));
    assert!(
        s1.iter().zip(&s2).all(|(x, y)| x.to_bits() == y.to_bits()),
        "gemm_ws split-K: two runs differ"
    );
}
