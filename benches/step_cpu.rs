//! Whole training steps on the CPU backend, through the real training loop
//! (`Sequential::fit`): one keras-cnn step at batch 32 (RMSprop, one-hot
//! categorical cross-entropy, as run c1), elu-cnn steps at batch 32 and
//! 128 (as run c11), one mlp step at batch 32 (SGD lr
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
//! Each `fit` runs on a worker of rayon's pool (`on_pool`), as `kestrel
//! train` runs its loop, so that the ops' parallel loops start from inside
//! the pool.
//!
//! The GPU versions (keras-cnn b32, elu-cnn b32 and b128, steps and
//! epochs) are the `gpu_step` group of `benches/gpu.rs`.

mod common;

use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};

use common::{data, nets, one_hot};
use kestrel::backend::CpuBackend;
use kestrel::backend::cpu::on_pool;
use kestrel::train::{FitOptions, Targets};

fn steps(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_step");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let n = 32;
    let mut m = nets::keras_cnn(CpuBackend);
    let x = data(1, n * 3 * 32 * 32);
    let y = one_hot(n, 10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("kestrel", "keras-cnn.step.b32"), |b| {
        b.iter(|| on_pool(|| m.fit(&x, Targets::Dense(&y), nets::one_epoch(n)).unwrap()))
    });

    // elu-cnn is ~19x keras-cnn's work per image: a step, not an epoch, is
    // what fits in a bench run on a CPU.
    for batch in [32usize, 128] {
        let mut m = nets::elu_cnn(CpuBackend);
        let x = data(4, batch * 3 * 32 * 32);
        let y = one_hot(batch, 10);
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(
            BenchmarkId::new("kestrel", format!("elu-cnn.step.b{batch}")),
            |b| {
                b.iter(|| {
                    on_pool(|| {
                        m.fit(&x, Targets::Dense(&y), nets::one_epoch(batch))
                            .unwrap()
                    })
                })
            },
        );
    }

    let mut m = nets::mlp(CpuBackend);
    let x = data(2, n * 784);
    let y: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    g.bench_function(BenchmarkId::new("kestrel", "mlp.step.b32"), |b| {
        b.iter(|| on_pool(|| m.fit(&x, Targets::Sparse(&y), nets::one_epoch(n)).unwrap()))
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
    let mut m = nets::mlp(CpuBackend);
    let x = data(3, samples * 784);
    let y: Vec<u32> = (0..samples as u32).map(|i| i % 10).collect();
    g.throughput(Throughput::Elements(samples as u64));
    g.bench_function(BenchmarkId::new("kestrel", "mlp.epoch.b32"), |b| {
        b.iter(|| {
            on_pool(|| {
                let opts = FitOptions {
                    shuffle: true,
                    ..nets::one_epoch(32)
                };
                m.fit(&x, Targets::Sparse(&y), opts).unwrap()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, steps, mlp_epoch);
criterion_main!(benches);
