//! The kernels on a caller's context, stream and buffers
//! (`CudaBackend::from_stream`): a GEMM with a fused bias + activation on
//! buffers the test allocated itself, against the CPU reference; the work
//! goes to the caller's stream; one module cache per context, shared by
//! every handle on it (the caller's and kestrel's own); the caller's
//! context keeps cudarc's event tracking, and the wrappers stay correct
//! with it on, across two streams.
//!
//! Every test here uses the GEMM module alone, so that the module counts do
//! not depend on which of this binary's tests run at the same time (they
//! share device 0's primary context).
//!
//! Every test needs a CUDA device and is ignored otherwise:
//! `cargo test --release --test gpu_stream -- --include-ignored`.

mod common;

use std::sync::Arc;

use common::*;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use kestrel::cuda::CudaBackend;
use kestrel::ops::activation::Activation;
use kestrel::ops::gemm::cuda::{self as gg, DeviceEpilogue};
use kestrel::ops::gemm::{Bias, Epilogue, Gemm, cpu};

/// As tests/gpu_gemm.rs: 1e-6 per product term, 1e-5 relative for the
/// epilogue's activation.
fn tol(terms: usize) -> Tol {
    Tol::new(1e-6 * terms.max(1) as f64, 1e-5)
}

/// The caller's own context (device 0's primary context, a `CudaContext`
/// object of the test's, event tracking as cudarc sets it: on) and a stream.
fn callers_stream() -> (Arc<CudaContext>, Arc<CudaStream>) {
    let ctx = CudaContext::new(0).unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e}"));
    let stream = ctx.new_stream().expect("cuStreamCreate");
    (ctx, stream)
}

/// One GEMM problem with a per-column bias and an elu, its inputs, and the
/// CPU's C.
struct Problem {
    p: Gemm,
    a: Vec<f32>,
    b: Vec<f32>,
    bias: Vec<f32>,
    act: Activation,
    want: Vec<f64>,
}

fn problem(seed: u64) -> Problem {
    let (m, n, k) = (37, 70, 29);
    let p = Gemm::new(m, n, k).transpose(false, true).scale(0.75, 0.0);
    let mut rng = Rng::new(seed);
    let a = rng.vec(m * k, -1.0, 1.0);
    let b = rng.vec(n * k, -1.0, 1.0);
    let bias = rng.vec(n, -1.0, 1.0);
    let act = Activation::elu(1.0);
    let mut want = vec![0.0f32; m * n];
    cpu::gemm(
        &p,
        &a,
        &b,
        &mut want,
        Epilogue {
            bias: Bias::PerCol(&bias),
            activation: act,
        },
    )
    .expect("cpu gemm");
    Problem {
        p,
        a,
        b,
        bias,
        act,
        want: to_f64(&want),
    }
}

/// Runs `pr` through `gpu` on buffers the caller allocated on `alloc` (any
/// stream of the handle's context) and reads C back on `alloc`.
fn run(gpu: &CudaBackend, alloc: &Arc<CudaStream>, pr: &Problem) -> Vec<f32> {
    let a = alloc.clone_htod(&pr.a).expect("upload a");
    let b = alloc.clone_htod(&pr.b).expect("upload b");
    let bias = alloc.clone_htod(&pr.bias).expect("upload bias");
    let mut c: CudaSlice<f32> = alloc
        .clone_htod(&vec![POISON; pr.want.len()])
        .expect("upload c");
    let bias_view = bias.as_view();
    gg::gemm(
        gpu,
        &pr.p,
        &a.as_view(),
        &b.as_view(),
        &mut c.as_view_mut(),
        DeviceEpilogue {
            bias: Bias::PerCol(&bias_view),
            activation: pr.act,
        },
    )
    .expect("gpu gemm");
    alloc.clone_dtoh(&c).expect("download c")
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_on_callers_stream_and_buffers() {
    let (ctx, stream) = callers_stream();
    let gpu = CudaBackend::from_stream(stream.clone()).expect("from_stream");
    // The handle launches on the caller's stream, in the caller's context.
    assert!(Arc::ptr_eq(gpu.stream(), &stream));
    assert!(Arc::ptr_eq(gpu.context(), &ctx));
    assert_eq!(gpu.info().ordinal, 0);
    let pr = problem(1);
    let got = run(&gpu, &stream, &pr);
    assert_close("gemm C (caller's stream)", &got, &pr.want, tol(pr.p.k));
    // The caller's context settings are untouched.
    assert!(ctx.is_event_tracking());
    assert!(ctx.is_in_multi_stream_mode());
}

#[test]
#[ignore = "needs a CUDA device"]
fn one_module_load_per_context() {
    let (ctx, s1) = callers_stream();
    let s2 = ctx.new_stream().expect("cuStreamCreate");
    let first = CudaBackend::from_stream(s1.clone()).expect("from_stream");
    let pr = problem(2);
    assert_close(
        "gemm C (first handle)",
        &run(&first, &s1, &pr),
        &pr.want,
        tol(pr.p.k),
    );
    assert_eq!(first.loaded_modules(), 1, "the GEMM module");

    // A second handle on the same context finds the module already loaded,
    // before it launches anything, and loads nothing more.
    let second = CudaBackend::from_stream(s2.clone()).expect("from_stream");
    assert!(Arc::ptr_eq(second.stream(), &s2));
    assert_eq!(second.loaded_modules(), 1, "shared with the first handle");
    assert_close(
        "gemm C (second handle)",
        &run(&second, &s2, &pr),
        &pr.want,
        tol(pr.p.k),
    );
    assert_eq!(second.loaded_modules(), 1);
    assert_eq!(first.loaded_modules(), 1);

    // kestrel's own handle on device 0 is on the same (primary) context:
    // it shares the cache too, and turning off event tracking on its own
    // `CudaContext` object leaves the caller's as it was.
    let own = CudaBackend::new(0).expect("CudaBackend::new");
    assert_eq!(
        own.loaded_modules(),
        1,
        "kestrel's own handle shares the cache"
    );
    assert_close(
        "gemm C (kestrel's handle)",
        &run(&own, own.stream(), &pr),
        &pr.want,
        tol(pr.p.k),
    );
    assert_eq!(own.loaded_modules(), 1);
    assert!(!own.context().is_event_tracking());
    assert!(ctx.is_event_tracking());
}

/// With event tracking on (the caller's context), buffers allocated and
/// read on one stream and computed on through a handle on another: cudarc's
/// events order the streams (on hardware; the emulated device runs streams
/// synchronously).
#[test]
#[ignore = "needs a CUDA device"]
fn event_tracking_across_streams() {
    let (ctx, alloc) = callers_stream();
    let work = ctx.new_stream().expect("cuStreamCreate");
    let gpu = CudaBackend::from_stream(work.clone()).expect("from_stream");
    assert!(ctx.is_managing_stream_synchronization());
    for seed in 3..6 {
        let pr = problem(seed);
        let got = run(&gpu, &alloc, &pr);
        assert_close("gemm C (across streams)", &got, &pr.want, tol(pr.p.k));
    }
    assert!(ctx.is_event_tracking());
}
