//! CPU GEMM throughput: kestrel's blocked GEMM (the micro-kernel
//! [`cpu::gemm`] picks for this CPU, plus the AVX2 6x16 one beside it when
//! that is not the one picked) beside the `matrixmultiply` crate's sgemm on
//! the same shapes.
//!
//! Throughput is set with `Throughput::Elements(flops)`: one "element" is
//! one floating-point operation (2 per multiply-add), so criterion's
//! "elem/s" reads as FLOP/s (e.g. "45 Gelem/s" = 45 GFLOP/s).
//!
//! `matrixmultiply` is built with its `threading` feature; it takes its
//! thread count from `MATMUL_NUM_THREADS` (default: physical cores), so run
//! `MATMUL_NUM_THREADS=$(nproc) cargo bench --bench gemm_cpu` for a
//! like-for-like comparison with rayon's pool.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kestrel::cpu_isa::Isa;
use kestrel::ops::gemm::cpu::Kernel;
use kestrel::ops::gemm::{Epilogue, Gemm, cpu};

mod common;
use common::data;

/// Times `C = A * B` (m x k times k x n, row-major, no transpose).
fn bench_shape(c: &mut Criterion, group: &str, m: usize, n: usize, k: usize) {
    let a = data(1, m * k);
    let b = data(2, k * n);
    let mut out = vec![0.0f32; m * n];
    let p = Gemm::new(m, n, k);
    let mut g = c.benchmark_group(group);
    // Elements = FLOPs (2 per multiply-add), so elem/s = FLOP/s.
    g.throughput(Throughput::Elements(p.flops() as u64));
    if m * n * k >= 1 << 30 {
        g.sample_size(10)
            .measurement_time(Duration::from_secs(6))
            .warm_up_time(Duration::from_secs(1));
    } else {
        g.sample_size(30)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(500));
    }
    let id = format!("{m}x{n}x{k}");
    g.bench_function(BenchmarkId::new("kestrel", &id), |bench| {
        bench.iter(|| cpu::gemm(&p, &a, &b, &mut out, Epilogue::default()).unwrap())
    });
    // The previous micro-kernel (AVX2 6x16), where the CPU picks a higher
    // one: the row that shows what the AVX-512 8x32 kernel gains.
    if Isa::current() > Isa::Avx2 && Isa::detected() >= Isa::Avx2 {
        g.bench_function(BenchmarkId::new("kestrel-avx2", &id), |bench| {
            bench.iter(|| {
                cpu::gemm_with(Kernel::Avx2, &p, &a, &b, &mut out, Epilogue::default()).unwrap()
            })
        });
    }
    g.bench_function(BenchmarkId::new("matrixmultiply", &id), |bench| {
        bench.iter(|| {
            // SAFETY: the pointers cover m x k, k x n and m x n row-major
            // matrices with the strides given.
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
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        })
    });
    g.finish();
}

fn square(c: &mut Criterion) {
    bench_shape(c, "gemm_square", 512, 512, 512);
    bench_shape(c, "gemm_square", 2048, 2048, 2048);
}

/// A 784-300-100-10 MLP at batch 32 (m = batch, k = inputs, n = units),
/// plus one conv-like shape (im2col of a 3x3x64 conv on 56x56).
fn mlp(c: &mut Criterion) {
    bench_shape(c, "gemm_mlp", 32, 300, 784);
    bench_shape(c, "gemm_mlp", 32, 100, 300);
    bench_shape(c, "gemm_mlp", 32, 10, 100);
    bench_shape(c, "gemm_conv", 64, 3136, 576);
}

criterion_group!(benches, square, mlp);
criterion_main!(benches);
