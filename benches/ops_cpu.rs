//! CPU reference backend, every op family at the seed networks' sizes
//! (`SEED_RUNS.md`): convolution (forward, backward data, backward filter)
//! of every conv layer of keras-cnn and elu-cnn at batch 32 (keras-cnn also
//! at 128), max pooling, batch normalization, dropout, softmax +
//! cross-entropy, and every fused optimizer over keras-cnn's 1,250,858
//! parameters.
//!
//! Throughput (see `benches/common/mod.rs`): convolutions report FLOPs as
//! criterion "elements" (elem/s = FLOP/s); memory-bound ops report the
//! bytes a perfect kernel moves (each input read once, each output written
//! once), and sit beside a baseline `memcpy` bench that moves the same
//! bytes (a rayon-parallel copy of half of them: half read, half written),
//! the ceiling for a memory-bound op on this machine.
//!
//! Sample counts and times are kept small so that the whole CPU suite
//! finishes in a few minutes on 2 cores: `cargo bench --bench ops_cpu`.

mod common;

use std::time::Duration;

use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main, measurement::WallTime,
};
use rayon::prelude::*;

use common::{
    DROPOUTS, ELU_CNN_CONVS, KERAS_CNN_CONVS, KERAS_CNN_PARAMS, POOLS, data, one_hot,
    optimizer_bytes_per_param, optimizers,
};
use kestrel::ops::activation::Activation;
use kestrel::ops::batchnorm::{self, BatchNorm, VarianceMode};
use kestrel::ops::conv;
use kestrel::ops::dropout::{self, Dropout};
use kestrel::ops::loss::{self, LossParams};
use kestrel::ops::optim::{self, OptimizerState};
use kestrel::ops::pool;

/// Short runs: the suite has about 150 benchmarks.
fn quick(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(700));
}

/// The `memcpy` baseline for an op that moves `bytes`: copies `bytes / 2`
/// (so `bytes` cross the memory bus), split over the rayon pool like the
/// ops themselves.
struct MemCopy {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl MemCopy {
    fn new(bytes: usize) -> Self {
        let half = (bytes / 2).max(1);
        MemCopy {
            src: (0..half).map(|i| i as u8).collect(),
            dst: vec![0; half],
        }
    }

    fn run(&mut self) {
        const CHUNK: usize = 1 << 16;
        self.dst
            .par_chunks_mut(CHUNK)
            .zip(self.src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// Benchmarks the `memcpy` baseline for `id` in group `g`.
fn memcpy_baseline(g: &mut BenchmarkGroup<'_, WallTime>, id: &str, bytes: usize) {
    let mut cp = MemCopy::new(bytes);
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(BenchmarkId::new("memcpy", id), |b| b.iter(|| cp.run()));
}

fn conv_layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_conv");
    // Tens to hundreds of milliseconds per call: one call per sample.
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(500));
    let runs = KERAS_CNN_CONVS
        .iter()
        .map(|l| (l, 32))
        .chain(ELU_CNN_CONVS.iter().map(|l| (l, 32)))
        .chain(KERAS_CNN_CONVS.iter().map(|l| (l, 128)));
    for (layer, n) in runs {
        let p = layer.params(n);
        let x = data(1, p.x_len());
        let w = data(2, p.w_len());
        let bias = data(3, p.k);
        let dy = data(4, p.y_len());
        let mut y = vec![0.0f32; p.y_len()];
        let mut dx = vec![0.0f32; p.x_len()];
        let mut dw = vec![0.0f32; p.w_len()];
        // FLOPs as elements; the three passes cost the same.
        g.throughput(Throughput::Elements(p.flops() as u64));
        g.bench_function(BenchmarkId::new("kestrel", layer.id(n, "fwd")), |b| {
            b.iter(|| {
                conv::cpu::forward(&p, &x, &w, Some(&bias), Activation::RELU, &mut y).unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("kestrel", layer.id(n, "bwd_data")), |b| {
            b.iter(|| conv::cpu::backward_data(&p, &dy, &w, &mut dx).unwrap())
        });
        g.bench_function(
            BenchmarkId::new("kestrel", layer.id(n, "bwd_filter")),
            |b| b.iter(|| conv::cpu::backward_filter(&p, &x, &dy, &mut dw).unwrap()),
        );
    }
    g.finish();
}

fn pools(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_pool");
    quick(&mut g);
    for layer in POOLS {
        let n = 32;
        let p = layer.params(n);
        let x = data(1, p.x_len());
        let mut y = vec![0.0f32; p.y_len()];
        let mut arg = vec![0u32; p.y_len()];
        let mut dx = vec![0.0f32; p.x_len()];
        let dy = data(2, p.y_len());
        // forward: read x, write y and the argmax (u32).
        let fwd = 4 * p.x_len() + 8 * p.y_len();
        let id = layer.id(n, "fwd");
        g.throughput(Throughput::Bytes(fwd as u64));
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| pool::cpu::forward(&p, &x, &mut y, &mut arg).unwrap())
        });
        memcpy_baseline(&mut g, &id, fwd);
        // backward: read dy and the argmax, write dx.
        let bwd = 8 * p.y_len() + 4 * p.x_len();
        let id = layer.id(n, "bwd");
        g.throughput(Throughput::Bytes(bwd as u64));
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| pool::cpu::backward(&p, &dy, &arg, &mut dx).unwrap())
        });
        memcpy_baseline(&mut g, &id, bwd);
    }
    g.finish();
}

/// Batch norm where the seeds use it (f3/f4: the mlp's dense inputs at
/// batch 32), plus one conv-shaped case (keras-cnn's conv1 output, batch
/// 32) for a size where the bandwidth shows.
fn batchnorms(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_batchnorm");
    quick(&mut g);
    let cases = [
        ("mlp.bn784.b32", 32, 784, 1, false),
        ("mlp.bn300.b32", 32, 300, 1, false),
        ("mlp.bn100.b32", 32, 100, 1, false),
        ("keras-cnn.conv1-out.b32", 32, 32, 32 * 32, true),
    ];
    for (name, n, ch, spatial, is_conv) in cases {
        let p = BatchNorm::new(n, ch, spatial, is_conv, 0.99, 1e-3, VarianceMode::Keras).unwrap();
        let len = n * ch * spatial;
        let x = data(1, len);
        let dy = data(2, len);
        let gamma = data(3, ch);
        let beta = data(4, ch);
        let (mut y, mut dx) = (vec![0.0f32; len], vec![0.0f32; len]);
        let (mut mean, mut inv) = (vec![0.0f32; ch], vec![0.0f32; ch]);
        let (mut rm, mut rv) = (vec![0.0f32; ch], vec![1.0f32; ch]);
        let (mut dg, mut db) = (vec![0.0f32; ch], vec![0.0f32; ch]);
        // forward (training): read x, gamma, beta, the running stats; write
        // y, the saved mean and inverse std, the running stats.
        let fwd = 4 * (2 * len + 8 * ch);
        let id = format!("{name}.fwd");
        g.throughput(Throughput::Bytes(fwd as u64));
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| {
                batchnorm::cpu::forward_training(
                    &p, &x, &gamma, &beta, &mut y, &mut mean, &mut inv, &mut rm, &mut rv,
                )
                .unwrap()
            })
        });
        memcpy_baseline(&mut g, &id, fwd);
        // backward: read x, dy, gamma, the saved stats; write dx, dgamma, dbeta.
        let bwd = 4 * (3 * len + 5 * ch);
        let id = format!("{name}.bwd");
        g.throughput(Throughput::Bytes(bwd as u64));
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| {
                batchnorm::cpu::backward(
                    &p, &x, &dy, &gamma, &mean, &inv, &mut dx, &mut dg, &mut db,
                )
                .unwrap()
            })
        });
        memcpy_baseline(&mut g, &id, bwd);
    }
    g.finish();
}

fn dropouts(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_dropout");
    quick(&mut g);
    for (net, name, per_sample) in DROPOUTS {
        let n = 32;
        let len = n * per_sample;
        let rate = if name == "drop1" || name == "drop2" {
            0.25
        } else {
            0.5
        };
        let p = Dropout::new(len, rate, 1234, 0).unwrap();
        let x = data(1, len);
        let dy = data(2, len);
        let mut y = vec![0.0f32; len];
        let mut mask = vec![0u8; len];
        let mut dx = vec![0.0f32; len];
        // forward: read x, write y and the u8 mask; backward: read dy and
        // the mask, write dx. 9 bytes per element either way.
        let bytes = 9 * len;
        g.throughput(Throughput::Bytes(bytes as u64));
        let id = format!("{net}.{name}.b{n}.fwd");
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| dropout::cpu::forward(&p, &x, &mut y, &mut mask).unwrap())
        });
        memcpy_baseline(&mut g, &id, bytes);
        let id = format!("{net}.{name}.b{n}.bwd");
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| dropout::cpu::backward(&p, &dy, &mask, &mut dx).unwrap())
        });
        memcpy_baseline(&mut g, &id, bytes);
    }
    g.finish();
}

/// Softmax + cross-entropy with its gradient, as a training step runs it:
/// keras-cnn (one-hot labels) and the mlp (class indices), 10 classes.
fn softmax_ce(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_softmax_ce");
    quick(&mut g);
    for n in [32usize, 128] {
        let classes = 10;
        let p = LossParams::new(n, classes).unwrap();
        let logits = data(1, n * classes);
        let labels = one_hot(n, classes);
        let sparse: Vec<u32> = (0..n as u32).map(|i| i % classes as u32).collect();
        let mut losses = vec![0.0f32; n];
        let mut dz = vec![0.0f32; n * classes];
        // read logits and labels, write the per-sample losses and dz.
        let bytes = 4 * (3 * n * classes + n);
        let id = format!("keras-cnn.softmax_ce.b{n}.fwd_bwd");
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| {
                loss::cpu::softmax_cross_entropy(
                    &p,
                    &logits,
                    &labels,
                    &mut losses,
                    None,
                    Some(&mut dz),
                )
                .unwrap()
            })
        });
        memcpy_baseline(&mut g, &id, bytes);
        let bytes = 4 * (2 * n * classes + 2 * n);
        let id = format!("mlp.sparse_softmax_ce.b{n}.fwd_bwd");
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| {
                loss::cpu::sparse_softmax_cross_entropy(
                    &p,
                    &logits,
                    &sparse,
                    &mut losses,
                    None,
                    Some(&mut dz),
                )
                .unwrap()
            })
        });
        memcpy_baseline(&mut g, &id, bytes);
    }
    g.finish();
}

/// One step of each optimizer over keras-cnn's 12 tensors (1,250,858
/// parameters).
fn optimizer_steps(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_optim");
    quick(&mut g);
    let total: usize = KERAS_CNN_PARAMS.iter().sum();
    assert_eq!(total, 1_250_858);
    for (name, opt) in optimizers() {
        let mut params: Vec<Vec<f32>> = KERAS_CNN_PARAMS
            .iter()
            .enumerate()
            .map(|(i, &n)| data(10 + i as u64, n))
            .collect();
        // Small gradients so that the weights stay finite over many steps.
        let grads: Vec<Vec<f32>> = KERAS_CNN_PARAMS
            .iter()
            .enumerate()
            .map(|(i, &n)| data(30 + i as u64, n).iter().map(|v| v * 1e-3).collect())
            .collect();
        let mut state = OptimizerState::new(&opt, &KERAS_CNN_PARAMS).unwrap();
        let bytes = total * optimizer_bytes_per_param(name);
        let id = format!("keras-cnn.{name}.p{total}");
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| {
                let mut ps: Vec<&mut [f32]> = params.iter_mut().map(|v| v.as_mut_slice()).collect();
                let gs: Vec<&[f32]> = grads.iter().map(|v| v.as_slice()).collect();
                optim::cpu::step(&opt, &mut state, &mut ps, &gs).unwrap()
            })
        });
        memcpy_baseline(&mut g, &id, bytes);
    }
    g.finish();
}

criterion_group!(
    benches,
    conv_layers,
    pools,
    batchnorms,
    dropouts,
    softmax_ce,
    optimizer_steps
);
criterion_main!(benches);
