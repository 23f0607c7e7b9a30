//! Shared by the bench binaries: the seed networks' layer shapes (from
//! `SEED_RUNS.md`), seeded data, the naming scheme every benchmark id
//! follows (the same ids `benches/pytorch_baseline.py` prints, so
//! `ci/bench-report` can line them up), and the JSON-lines record.
//!
//! Throughput conventions, everywhere:
//! - compute-bound ops (GEMM, convolution): `Throughput::Elements(flops)`,
//!   2 FLOPs per multiply-add, so criterion's "elem/s" reads as FLOP/s;
//! - memory-bound ops: `Throughput::Bytes(bytes)`, the bytes a perfect
//!   kernel would move: each input read once, each output written once
//!   (counted per op in its bench);
//! - whole training steps / epochs: `Throughput::Elements(samples)`.
//!
//! Ids: `<net>.<layer>.b<batch>.<pass>`, e.g. `keras-cnn.conv2.b32.fwd`;
//! passes `fwd`, `bwd_data`, `bwd_filter` (conv, GEMM), `fwd`, `bwd`
//! (memory-bound ops).

// Each bench binary uses a different part of this module.
#![allow(dead_code)]

use std::io::Write;

use kestrel::ops::conv::{Conv2d, Padding};
use kestrel::ops::gemm::Gemm;
use kestrel::ops::pool::MaxPool2d;

/// Seeded data in [-0.5, 0.5) (xorshift; fast, and the same every run).
pub fn data(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// One-hot labels of `n` samples over `classes`, class `i % classes`.
pub fn one_hot(n: usize, classes: usize) -> Vec<f32> {
    let mut v = vec![0.0; n * classes];
    for i in 0..n {
        v[i * classes + i % classes] = 1.0;
    }
    v
}

/// A 3x3, stride-1 conv layer of a seed network.
#[derive(Clone, Copy, Debug)]
pub struct ConvLayer {
    /// `keras-cnn` or `elu-cnn`.
    pub net: &'static str,
    /// `conv1`, `conv2`, ... in network order.
    pub name: &'static str,
    /// Input channels.
    pub c: usize,
    /// Input height = width.
    pub hw: usize,
    /// Filters.
    pub k: usize,
    /// Keras padding.
    pub padding: Padding,
}

const fn conv(
    net: &'static str,
    name: &'static str,
    c: usize,
    hw: usize,
    k: usize,
    padding: Padding,
) -> ConvLayer {
    ConvLayer {
        net,
        name,
        c,
        hw,
        k,
        padding,
    }
}

/// keras-cnn (seed 002): 32x32x3 -> conv 32 same -> conv 32 valid (30x30)
/// -> pool (15x15) -> conv 64 same -> conv 64 valid (13x13) -> pool (6x6).
pub const KERAS_CNN_CONVS: [ConvLayer; 4] = [
    conv("keras-cnn", "conv1", 3, 32, 32, Padding::Same),
    conv("keras-cnn", "conv2", 32, 32, 32, Padding::Valid),
    conv("keras-cnn", "conv3", 32, 15, 64, Padding::Same),
    conv("keras-cnn", "conv4", 64, 15, 64, Padding::Valid),
];

/// elu-cnn (seed 000): 128, 128 (30x30), pool 15; 256, 256 (13x13), pool 6;
/// 512, 512 (4x4), pool 2.
pub const ELU_CNN_CONVS: [ConvLayer; 6] = [
    conv("elu-cnn", "conv1", 3, 32, 128, Padding::Same),
    conv("elu-cnn", "conv2", 128, 32, 128, Padding::Valid),
    conv("elu-cnn", "conv3", 128, 15, 256, Padding::Same),
    conv("elu-cnn", "conv4", 256, 15, 256, Padding::Valid),
    conv("elu-cnn", "conv5", 256, 6, 512, Padding::Same),
    conv("elu-cnn", "conv6", 512, 6, 512, Padding::Valid),
];

impl ConvLayer {
    /// The layer over a batch of `n`.
    pub fn params(&self, n: usize) -> Conv2d {
        Conv2d::new(
            [n, self.c, self.hw, self.hw],
            self.k,
            [3, 3],
            [1, 1],
            self.padding,
        )
        .expect("seed conv layer shapes are valid")
    }

    /// `<net>.<layer>.b<n>.<pass>`.
    pub fn id(&self, n: usize, pass: &str) -> String {
        format!("{}.{}.b{n}.{pass}", self.net, self.name)
    }

    /// The three passes as single row-major GEMMs over the whole batch
    /// (im2col layout `[C*R*S, N*OH*OW]`):
    /// forward `Y[K, NP] = W[K, CRS] * col[CRS, NP]`,
    /// backward data `dcol[CRS, NP] = W^T * dY[K, NP]`,
    /// backward filter `dW[K, CRS] = dY[K, NP] * col^T`.
    pub fn gemms(&self, n: usize) -> [(&'static str, Gemm); 3] {
        let p = self.params(n);
        let (k, crs, np) = (p.k, p.col_rows(), p.col_cols());
        [
            ("fwd", Gemm::new(k, np, crs)),
            ("bwd_data", Gemm::new(crs, np, k).transpose(true, false)),
            ("bwd_filter", Gemm::new(k, crs, np).transpose(false, true)),
        ]
    }
}

/// A dense layer of a seed network.
#[derive(Clone, Copy, Debug)]
pub struct DenseLayer {
    /// `keras-cnn`, `elu-cnn` or `mlp`.
    pub net: &'static str,
    /// `dense1`, ...
    pub name: &'static str,
    /// Input features.
    pub inputs: usize,
    /// Output features.
    pub units: usize,
}

const fn dense(net: &'static str, name: &'static str, inputs: usize, units: usize) -> DenseLayer {
    DenseLayer {
        net,
        name,
        inputs,
        units,
    }
}

/// keras-cnn: flatten 64*6*6 = 2304 -> 512 -> 10.
pub const KERAS_CNN_DENSE: [DenseLayer; 2] = [
    dense("keras-cnn", "dense1", 2304, 512),
    dense("keras-cnn", "dense2", 512, 10),
];

/// elu-cnn: flatten 512*2*2 = 2048 -> 1024 -> 10.
pub const ELU_CNN_DENSE: [DenseLayer; 2] = [
    dense("elu-cnn", "dense1", 2048, 1024),
    dense("elu-cnn", "dense2", 1024, 10),
];

/// The Fashion-MNIST mlp: 784 -> 300 -> 100 -> 10.
pub const MLP_DENSE: [DenseLayer; 3] = [
    dense("mlp", "dense1", 784, 300),
    dense("mlp", "dense2", 300, 100),
    dense("mlp", "dense3", 100, 10),
];

impl DenseLayer {
    /// `<net>.<layer>.b<n>.<pass>`.
    pub fn id(&self, n: usize, pass: &str) -> String {
        format!("{}.{}.b{n}.{pass}", self.net, self.name)
    }

    /// forward `Y[N, U] = X[N, I] * W[I, U]`, backward data
    /// `dX[N, I] = dY * W^T`, backward filter `dW[I, U] = X^T * dY`.
    pub fn gemms(&self, n: usize) -> [(&'static str, Gemm); 3] {
        let (i, u) = (self.inputs, self.units);
        [
            ("fwd", Gemm::new(n, u, i)),
            ("bwd_data", Gemm::new(n, i, u).transpose(false, true)),
            ("bwd_filter", Gemm::new(i, u, n).transpose(true, false)),
        ]
    }
}

/// A 2x2 / stride-2 valid max pool of a seed network: input `[N, c, hw, hw]`.
#[derive(Clone, Copy, Debug)]
pub struct PoolLayer {
    /// Network.
    pub net: &'static str,
    /// `pool1`, ...
    pub name: &'static str,
    /// Channels.
    pub c: usize,
    /// Input height = width.
    pub hw: usize,
}

/// The pools of keras-cnn and elu-cnn.
pub const POOLS: [PoolLayer; 5] = [
    PoolLayer {
        net: "keras-cnn",
        name: "pool1",
        c: 32,
        hw: 30,
    },
    PoolLayer {
        net: "keras-cnn",
        name: "pool2",
        c: 64,
        hw: 13,
    },
    PoolLayer {
        net: "elu-cnn",
        name: "pool1",
        c: 128,
        hw: 30,
    },
    PoolLayer {
        net: "elu-cnn",
        name: "pool2",
        c: 256,
        hw: 13,
    },
    PoolLayer {
        net: "elu-cnn",
        name: "pool3",
        c: 512,
        hw: 4,
    },
];

impl PoolLayer {
    /// The pool over a batch of `n`.
    pub fn params(&self, n: usize) -> MaxPool2d {
        MaxPool2d::new(
            [n, self.c, self.hw, self.hw],
            [2, 2],
            [2, 2],
            Padding::Valid,
        )
        .expect("seed pool shapes are valid")
    }

    /// `<net>.<layer>.b<n>.<pass>`.
    pub fn id(&self, n: usize, pass: &str) -> String {
        format!("{}.{}.b{n}.{pass}", self.net, self.name)
    }
}

/// Dropout layers: (net, name, elements per sample).
pub const DROPOUTS: [(&str, &str, usize); 7] = [
    ("keras-cnn", "drop1", 32 * 15 * 15),
    ("keras-cnn", "drop2", 64 * 6 * 6),
    ("keras-cnn", "drop3", 512),
    ("elu-cnn", "drop1", 128 * 15 * 15),
    ("elu-cnn", "drop2", 256 * 6 * 6),
    ("elu-cnn", "drop3", 512 * 2 * 2),
    ("elu-cnn", "drop4", 1024),
];

/// keras-cnn's trainable tensors in Keras order (kernel, bias per layer):
/// 1,250,858 parameters in all.
pub const KERAS_CNN_PARAMS: [usize; 12] = [
    864, 32, 9216, 32, 18432, 64, 36864, 64, 1_179_648, 512, 5120, 10,
];

/// The optimizers of the seed runs, as (id, constructor).
pub fn optimizers() -> Vec<(&'static str, kestrel::ops::optim::Optimizer)> {
    use kestrel::ops::optim::Optimizer;
    vec![
        ("sgd", Optimizer::sgd(0.01, 0.0, false).unwrap()),
        ("momentum", Optimizer::sgd(0.01, 0.5, false).unwrap()),
        ("nesterov", Optimizer::sgd(0.01, 0.5, true).unwrap()),
        ("adagrad", Optimizer::adagrad(0.01).unwrap()),
        (
            "rmsprop",
            Optimizer::rmsprop(1e-4).unwrap().with_decay(1e-6).unwrap(),
        ),
        ("adam", Optimizer::adam(1e-3).unwrap()),
        (
            "adam_clipnorm",
            Optimizer::adam(1e-3).unwrap().with_clipnorm(1.0).unwrap(),
        ),
    ]
}

/// Bytes a fused optimizer step moves per parameter: parameter read and
/// written, gradient read, each slot read and written (SGD keeps its
/// velocity even at momentum 0), plus one more gradient read for the norm
/// when clipping by norm.
pub fn optimizer_bytes_per_param(id: &str) -> usize {
    let slots = if id.starts_with("adam") { 2 } else { 1 };
    let norm = if id.contains("clipnorm") { 4 } else { 0 };
    4 + 4 + 4 + slots * 8 + norm
}

/// Appends one JSON object (one line) to `<dir>/<file>.jsonl`, where `dir`
/// is `$KESTREL_BENCH_DIR` or `target/kestrel-bench` (benches run from the
/// package root under `cargo bench`). Failures are reported, not fatal.
pub fn write_jsonl(file: &str, line: &str) {
    let dir = std::env::var("KESTREL_BENCH_DIR").unwrap_or_else(|_| "target/kestrel-bench".into());
    let result = std::fs::create_dir_all(&dir).and_then(|_| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{dir}/{file}.jsonl"))?;
        writeln!(f, "{line}")
    });
    if let Err(e) = result {
        eprintln!("could not write {dir}/{file}.jsonl: {e}");
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (null for NaN/inf, which JSON lacks).
pub fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The seed networks as kestrel models on any backend, built from the run
/// configs themselves (`configs/*.toml`), so the benches time exactly the
/// networks, losses and optimizers of the runs.
pub mod nets {
    use kestrel::backend::Backend;
    use kestrel::nn::Sequential;
    use kestrel::run::build_model;
    use kestrel::run::config::LoadedConfig;
    use kestrel::train::FitOptions;

    fn from_config<B: Backend>(stem: &str, backend: B) -> Sequential<B> {
        let path = format!("{}/configs/{stem}.toml", env!("CARGO_MANIFEST_DIR"));
        let cfg = LoadedConfig::load(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        build_model(&cfg, backend, 1).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// keras-cnn as run c1 (RMSprop lr 1e-4, decay 1e-6, categorical CE).
    pub fn keras_cnn<B: Backend>(backend: B) -> Sequential<B> {
        let m = from_config("c1-keras-cnn-rmsprop-1e-4", backend);
        assert_eq!(m.count_params().0, 1_250_858);
        m
    }

    /// elu-cnn as run c11 (RMSprop lr 1e-4, decay 1e-6, categorical CE).
    pub fn elu_cnn<B: Backend>(backend: B) -> Sequential<B> {
        from_config("c11-elu-cnn-rmsprop", backend)
    }

    /// The Fashion-MNIST mlp as run f1 (SGD lr 0.01, sparse CE).
    pub fn mlp<B: Backend>(backend: B) -> Sequential<B> {
        let m = from_config("f1-mlp-sgd", backend);
        assert_eq!(m.count_params().0, 266_610);
        m
    }

    /// One silent epoch over whatever `fit` is given, unshuffled.
    pub fn one_epoch<'a, B: Backend>(batch: usize) -> FitOptions<'a, B> {
        FitOptions {
            batch_size: batch,
            epochs: 1,
            shuffle: false,
            verbose: 0,
            ..Default::default()
        }
    }
}
