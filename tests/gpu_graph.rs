//! Captured launch sequences (`CudaBackend::capture` / `replay`): a
//! training-like sequence (bias add, batch-norm training forward and
//! backward on the dense layout, bias gradient) run three times on fresh
//! batches, uploaded into fixed buffers before each step, gives the same
//! bits captured-and-replayed as launched directly, running statistics
//! (which each step updates in place) included; a capture that would
//! synchronize fails with the driver's error and leaves the stream usable.
//!
//! Every test needs a CUDA device and is ignored otherwise:
//! `cargo test --release --test gpu_graph -- --include-ignored`.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use kestrel::cuda::CudaBackend;
use kestrel::ops::batchnorm::{self, BatchNorm};
use kestrel::ops::bias::{self, BiasShape};

const N: usize = 67;
const C: usize = 300;

struct Bufs {
    x: CudaSlice<f32>,
    dz: CudaSlice<f32>,
    b: CudaSlice<f32>,
    gamma: CudaSlice<f32>,
    beta: CudaSlice<f32>,
    y: CudaSlice<f32>,
    z: CudaSlice<f32>,
    sm: CudaSlice<f32>,
    sis: CudaSlice<f32>,
    rm: CudaSlice<f32>,
    rv: CudaSlice<f32>,
    dy: CudaSlice<f32>,
    dg: CudaSlice<f32>,
    dbeta: CudaSlice<f32>,
    db: CudaSlice<f32>,
    bn: batchnorm::cuda::BatchNormScratch,
    bias: bias::cuda::BiasScratch,
}

fn shapes() -> (BiasShape, BatchNorm) {
    (
        BiasShape::dense(N, C).unwrap(),
        BatchNorm::dense(N, C).unwrap(),
    )
}

fn bufs(gpu: &CudaBackend) -> Bufs {
    let (pb, pn) = shapes();
    let up = |v: &[f32]| gpu.upload(v).unwrap();
    Bufs {
        x: poisoned(gpu, N * C),
        dz: poisoned(gpu, N * C),
        b: up(&data(1, C, -1.0, 1.0)),
        gamma: up(&data(2, C, 0.5, 1.5)),
        beta: up(&data(3, C, -0.5, 0.5)),
        y: poisoned(gpu, N * C),
        z: poisoned(gpu, N * C),
        sm: poisoned(gpu, C),
        sis: poisoned(gpu, C),
        rm: up(&vec![0.0; C]),
        rv: up(&vec![1.0; C]),
        dy: poisoned(gpu, N * C),
        dg: poisoned(gpu, C),
        dbeta: poisoned(gpu, C),
        db: poisoned(gpu, C),
        bn: batchnorm::cuda::BatchNormScratch::new(gpu, &pn).unwrap(),
        bias: bias::cuda::BiasScratch::for_backward(gpu, &pb).unwrap(),
    }
}

/// One step's launches: nothing here allocates, uploads or waits.
fn step(gpu: &CudaBackend, s: &mut Bufs) -> kestrel::Result<()> {
    let (pb, pn) = shapes();
    bias::cuda::add(
        gpu,
        &pb,
        &s.x.as_view(),
        &s.b.as_view(),
        &mut s.y.as_view_mut(),
    )?;
    batchnorm::cuda::forward_training(
        gpu,
        &pn,
        &s.y.as_view(),
        &s.gamma.as_view(),
        &s.beta.as_view(),
        &mut s.z.as_view_mut(),
        &mut s.sm.as_view_mut(),
        &mut s.sis.as_view_mut(),
        &mut s.rm.as_view_mut(),
        &mut s.rv.as_view_mut(),
        &mut s.bn,
    )?;
    batchnorm::cuda::backward(
        gpu,
        &pn,
        &s.y.as_view(),
        &s.dz.as_view(),
        &s.gamma.as_view(),
        &s.sm.as_view(),
        &s.sis.as_view(),
        &mut s.dy.as_view_mut(),
        &mut s.dg.as_view_mut(),
        &mut s.dbeta.as_view_mut(),
        &mut s.bn,
    )?;
    bias::cuda::backward(
        gpu,
        &pb,
        &s.dy.as_view(),
        &mut s.db.as_view_mut(),
        &mut s.bias,
    )
}

/// Step `k`'s batch and upstream gradient, into the fixed buffers (outside
/// any capture).
fn stage(gpu: &CudaBackend, s: &mut Bufs, k: u64) {
    let x = data(100 + k, N * C, -2.0, 4.0);
    let dz = data(200 + k, N * C, -1.0, 1.0);
    gpu.stream().memcpy_htod(&x, &mut s.x).unwrap();
    gpu.stream().memcpy_htod(&dz, &mut s.dz).unwrap();
}

fn bits(gpu: &CudaBackend, s: &Bufs) -> Vec<Vec<u32>> {
    [
        &s.y, &s.z, &s.sm, &s.sis, &s.rm, &s.rv, &s.dy, &s.dg, &s.dbeta, &s.db,
    ]
    .iter()
    .map(|b| {
        gpu.download(b)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    })
    .collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn captured_steps_give_the_uncaptured_bits() {
    let gpu = gpu();
    let mut direct = bufs(&gpu);
    for k in 0..3 {
        stage(&gpu, &mut direct, k);
        step(&gpu, &mut direct).unwrap();
    }
    let want = bits(&gpu, &direct);

    let mut graphed = bufs(&gpu);
    // The first step runs directly (it loads the modules), then one capture
    // serves the rest.
    stage(&gpu, &mut graphed, 0);
    step(&gpu, &mut graphed).unwrap();
    let g = gpu.capture(|gpu| step(gpu, &mut graphed)).unwrap();
    // Capturing ran nothing: the outputs still hold step 0's values.
    let mut once = bufs(&gpu);
    stage(&gpu, &mut once, 0);
    step(&gpu, &mut once).unwrap();
    assert_eq!(
        bits(&gpu, &graphed),
        bits(&gpu, &once),
        "the capture ran work"
    );
    for k in 1..3 {
        stage(&gpu, &mut graphed, k);
        gpu.replay(&g).unwrap();
    }
    let got = bits(&gpu, &graphed);
    let names = [
        "y",
        "z",
        "save_mean",
        "save_inv_std",
        "running_mean",
        "running_var",
        "dy",
        "dgamma",
        "dbeta",
        "db",
    ];
    for ((name, g), w) in names.iter().zip(&got).zip(&want) {
        assert_eq!(g, w, "{name}: replayed steps differ from direct ones");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_capture_that_waits_fails_and_the_stream_recovers() {
    let gpu = gpu();
    let mut s = bufs(&gpu);
    stage(&gpu, &mut s, 0);
    let r = gpu.capture(|gpu| {
        step(gpu, &mut s)?;
        // A download synchronizes: not allowed while capturing.
        gpu.download(&s.db).map(|_| ())
    });
    let e = r
        .expect_err("a synchronizing capture must fail")
        .to_string();
    assert!(e.contains("cuMemcpyDtoH") || e.contains("capture"), "{e}");
    // The stream is usable again, and the refused capture ran nothing.
    step(&gpu, &mut s).unwrap();
    let mut fresh = bufs(&gpu);
    stage(&gpu, &mut fresh, 0);
    step(&gpu, &mut fresh).unwrap();
    assert_eq!(bits(&gpu, &s), bits(&gpu, &fresh));
}
