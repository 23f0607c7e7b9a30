//! Interleaved A/B timing of the CPU GEMM's micro-kernels and the
//! `matrixmultiply` crate: for each shape, every contender runs once per
//! round, rounds repeated, medians printed. Interleaving spreads a loaded
//! machine's noise over all contenders alike, so the ratios stay usable
//! when the absolute figures are not (`docs/perf-log.md`).
//!
//!     RAYON_NUM_THREADS=1 MATMUL_NUM_THREADS=1 cargo run --release --example cpu_gemm_ab [ROUNDS [SHAPE]]
//!
//! `KERNELS=Avx2` (names as printed, comma-separated) runs only those of
//! our kernels, for `perf record`.
//!
//!     cpu_gemm_ab serve
//!
//! answers lines `MxNxK REPS ROUNDS` on standard input (`512x512x512 1 5`)
//! with `ROUNDS` times in milliseconds per call of the kernel `gemm` picks,
//! each over `REPS` calls, on one line: `benches/cpu_close_pairs.py
//! --family gemm` alternates it with a PyTorch process serving the same
//! requests.

use std::collections::HashMap;
use std::time::Instant;

use kestrel::ops::gemm::cpu::{self, Kernel};
use kestrel::ops::gemm::{Epilogue, Gemm};

mod common;
use common::{data, median, ms_line, serve_lines};

fn main() {
    // On a worker of rayon's pool, as `kestrel train` runs its loop: each
    // GEMM's parallel loop then starts from inside the pool instead of
    // waking it from outside (`kestrel::backend::cpu::on_pool`).
    kestrel::backend::cpu::on_pool(run)
}

/// A shape's A, B and C.
type Operands = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The `serve` mode (module docs). Each shape's operands are made once.
fn serve() {
    let mut operands: HashMap<(usize, usize, usize), Operands> = HashMap::new();
    serve_lines(|words, line| {
        let dims: Vec<usize> = words
            .first()
            .map(|s| s.split('x').filter_map(|d| d.parse().ok()).collect())
            .unwrap_or_default();
        let nums: Vec<usize> = words
            .iter()
            .skip(1)
            .filter_map(|s| s.parse().ok())
            .collect();
        match (&dims[..], &nums[..]) {
            (&[m, n, k], &[reps, rounds]) if words.len() == 3 && reps > 0 => {
                let (a, b, c) = operands
                    .entry((m, n, k))
                    .or_insert_with(|| (data(1, m * k), data(2, k * n), vec![0.0; m * n]));
                let p = Gemm::new(m, n, k);
                ms_line((0..rounds).map(|_| {
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        cpu::gemm(&p, a, b, c, Epilogue::default()).unwrap();
                    }
                    t0.elapsed().as_secs_f64() * 1e3 / reps as f64
                }))
            }
            _ => format!("error: expected MxNxK REPS ROUNDS, got {line:?}"),
        }
    });
}

fn run() {
    if std::env::args().nth(1).as_deref() == Some("serve") {
        return serve();
    }
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    // (m, n, k): square; the mlp's layers at batch 32 (forward); keras-cnn's
    // conv1/conv2 forward GEMMs over one chunk (K x C*R*S times C*R*S x
    // N*OH*OW, N = 32) and conv2's backward-filter.
    let shapes = [
        (512, 512, 512),
        (2048, 2048, 2048),
        (32, 300, 784),
        (32, 100, 300),
        (32, 10, 100),
        (64, 3136, 576),
        (32, 32768, 27),
        (32, 28800, 288),
        (32, 288, 28800),
        // The per-group GEMMs of the grouped convolution (src/ops/conv/cpu.rs):
        // conv1 and conv2 one image each, conv3 and conv4 two.
        (32, 1024, 27),
        (32, 900, 288),
        (64, 450, 288),
        (64, 338, 576),
    ];
    // An optional second argument keeps only the shapes whose "MxNxK"
    // contains it.
    let only = std::env::args().nth(2).unwrap_or_default();
    // KERNELS=Avx2 (a comma list) keeps only those kernels, to profile one;
    // matrixmultiply always runs.
    let keep = std::env::var("KERNELS").unwrap_or_default();
    let kernels: Vec<Kernel> = Kernel::available()
        .into_iter()
        .filter(|k| keep.is_empty() || keep.split(',').any(|n| n == format!("{k:?}")))
        .collect();
    println!(
        "threads: rayon {}, load average {}",
        rayon::current_num_threads(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for &(m, n, k) in &shapes {
        if !format!("{m}x{n}x{k}").contains(&only) {
            continue;
        }
        let (a, b) = (data(1, m * k), data(2, k * n));
        let mut c = vec![0.0f32; m * n];
        let p = Gemm::new(m, n, k);
        let flops = p.flops();
        let reps = ((2e8 / flops).ceil() as usize).max(1);
        let names: Vec<String> = kernels
            .iter()
            .map(|k| format!("{k:?}"))
            .chain(["matrixmultiply".to_string()])
            .collect();
        let mut times = vec![Vec::new(); names.len()];
        for round in 0..=rounds {
            for (ci, t) in times.iter_mut().enumerate() {
                let t0 = Instant::now();
                for _ in 0..reps {
                    if ci < kernels.len() {
                        cpu::gemm_with(kernels[ci], &p, &a, &b, &mut c, Epilogue::default())
                            .unwrap();
                    } else {
                        // SAFETY: the pointers cover m x k, k x n and m x n
                        // row-major matrices with the strides given.
                        unsafe {
                            matrixmultiply::sgemm(
                                m,
                                k,
                                n,
                                1.0,
                                a.as_ptr(),
                                k as isize,
                                1,
                                b.as_ptr(),
                                n as isize,
                                1,
                                0.0,
                                c.as_mut_ptr(),
                                n as isize,
                                1,
                            )
                        }
                    }
                }
                // Round 0 warms up.
                if round > 0 {
                    t.push(t0.elapsed().as_secs_f64() / reps as f64);
                }
            }
        }
        let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        // `median` sorted each list: its first entry is the fastest round.
        let best: Vec<f64> = times.iter().map(|t| t[0]).collect();
        let base = med[kernels.iter().position(|&k| k == Kernel::Avx2).unwrap_or(0)];
        let base_best = best[kernels.iter().position(|&k| k == Kernel::Avx2).unwrap_or(0)];
        println!("{m}x{n}x{k} (median / best of {rounds} rounds; ratio to Avx2):");
        for ((name, &t), &tb) in names.iter().zip(&med).zip(&best) {
            println!(
                "  {name:>15} {:9.3} ms {:6.1} GFLOP/s ({:.2}x) | best {:9.3} ms {:6.1} GFLOP/s ({:.2}x)",
                t * 1e3,
                flops / t / 1e9,
                t / base,
                tb * 1e3,
                flops / tb / 1e9,
                tb / base_best
            );
        }
    }
}
