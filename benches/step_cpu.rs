//! Whole training steps on the CPU backend, through the real training loop
//! (`Sequential::fit`): one keras-cnn step at batch 32 (RMSprop, one-hot
//! categorical cross-entropy, as run c1), one mlp step at batch 32 (SGD lr
//! 0.01, sparse labels, as run f1), and one full mlp epoch over 55,000
//! samples (the Fashion-MNIST epoch that `benches/pytorch_baseline.py
//! --device cpu` times in PyTorch with 2 threads).
//!
//! A step is `fit` over exactly one batch (no validation, no shuffle,
//! silent): upload of the batch, forward, loss and accuracy, backward, the
//! optimizer step. Throughput: `Throughput::Elements(samples)`, so
//! criterion's "elem/s" reads as samples/s. The data are random (the speed
//! does not depend on them).
//!
//! GPU steps: TODO(cuda-backend): there is no CUDA implementation of
//! `kestrel::backend::Backend` in this branch yet (only `CpuBackend`); once
//! it lands, the same three benches (keras-cnn b32, elu-cnn b32 and b128)
//! go into `benches/gpu.rs` with `Sequential::new(CudaBackend::..)`.

mod common;

use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};

use common::{data, one_hot};
use kestrel::backend::CpuBackend;
use kestrel::nn::{Act, Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential};
use kestrel::ops::optim::Optimizer;
use kestrel::train::{FitOptions, Loss, Metric, Targets};

fn keras_cnn() -> Sequential<CpuBackend> {
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Conv2D::new(32, 3).same().activation(Act::Relu))
        .add(Conv2D::new(32, 3).activation(Act::Relu))
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.25))
        .add(Conv2D::new(64, 3).same().activation(Act::Relu))
        .add(Conv2D::new(64, 3).activation(Act::Relu))
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.25))
        .add(Flatten)
        .add(Dense::new(512).activation(Act::Relu))
        .add(Dropout::new(0.5))
        .add(Dense::new(10).activation(Act::Softmax));
    m.build(&[3, 32, 32]).unwrap();
    assert_eq!(m.count_params().0, 1_250_858);
    m.compile(
        Optimizer::rmsprop(1e-4).unwrap().with_decay(1e-6).unwrap(),
        Loss::CategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    m
}

fn mlp() -> Sequential<CpuBackend> {
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Flatten)
        .add(Dense::new(300).activation(Act::Relu))
        .add(Dense::new(100).activation(Act::Relu))
        .add(Dense::new(10).activation(Act::Softmax));
    m.build(&[1, 28, 28]).unwrap();
    assert_eq!(m.count_params().0, 266_610);
    m.compile(
        Optimizer::sgd(0.01, 0.0, false).unwrap(),
        Loss::SparseCategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    m
}

fn one_epoch<'a>(batch: usize) -> FitOptions<'a, CpuBackend> {
    FitOptions {
        batch_size: batch,
        epochs: 1,
        shuffle: false,
        verbose: 0,
        ..Default::default()
    }
}

fn steps(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_step");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let n = 32;
    let mut m = keras_cnn();
    let x = data(1, n * 3 * 32 * 32);
    let y = one_hot(n, 10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("kestrel", "keras-cnn.step.b32"), |b| {
        b.iter(|| m.fit(&x, Targets::Dense(&y), one_epoch(n)).unwrap())
    });

    let mut m = mlp();
    let x = data(2, n * 784);
    let y: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    g.bench_function(BenchmarkId::new("kestrel", "mlp.step.b32"), |b| {
        b.iter(|| m.fit(&x, Targets::Sparse(&y), one_epoch(n)).unwrap())
    });
    g.finish();
}

/// The Fashion-MNIST epoch: 55,000 samples, batch 32 (1,719 steps, the
/// last one partial), shuffled as `fit` does by default.
fn mlp_epoch(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_epoch");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(10));
    let samples = 55_000;
    let mut m = mlp();
    let x = data(3, samples * 784);
    let y: Vec<u32> = (0..samples as u32).map(|i| i % 10).collect();
    g.throughput(Throughput::Elements(samples as u64));
    g.bench_function(BenchmarkId::new("kestrel", "mlp.epoch.b32"), |b| {
        b.iter(|| {
            let opts = FitOptions {
                shuffle: true,
                ..one_epoch(32)
            };
            m.fit(&x, Targets::Sparse(&y), opts).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, steps, mlp_epoch);
criterion_main!(benches);
