//! kestrel's kernels from a framework's point of view: the program owns the
//! cudarc context, the stream and every buffer; kestrel only enqueues on
//! them (`CudaBackend::from_stream` + `kestrel::ops::*::cuda`).
//!
//! It runs a GEMM with a fused bias + elu epilogue, a convolution forward
//! (bias + relu, Keras "same" padding, stride 2) and the fused softmax
//! cross-entropy (per-row losses, probabilities and the logits' gradient),
//! and checks each result against kestrel's CPU reference
//! (`kestrel::ops::*::cpu`) within `abs + rel * |ref|`. It prints one
//! summary line and exits 0; 1 on any mismatch or error; 2 when there is no
//! CUDA driver or device.
//!
//!     cargo run --release --example gpu_own_stream
//!     emu/build && LD_LIBRARY_PATH=$PWD/target/emu/plain cargo run --release --example gpu_own_stream

use std::process::ExitCode;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use kestrel::cuda::CudaBackend;
use kestrel::ops::activation::Activation;
use kestrel::ops::conv::{self, Conv2d, Padding};
use kestrel::ops::gemm::cuda::DeviceEpilogue;
use kestrel::ops::gemm::{self, Bias, Epilogue, Gemm};
use kestrel::ops::loss::{self, LossParams};

/// A tolerance `abs + rel * |reference|`.
#[derive(Clone, Copy)]
struct Tol {
    abs: f64,
    rel: f64,
}

/// GEMM and convolution outputs are sums of `terms` products of values in
/// [-1, 1], rounded in f32 in a different order on each side (the GPU with
/// fma): 1e-6 per term is an order of magnitude above either side's error
/// and far below one misplaced term (~0.1); the relative part covers the
/// activations' few ulps (CUDA's expf against Rust's). As tests/gpu_gemm.rs
/// and tests/gpu_conv.rs.
fn per_term(terms: usize) -> Tol {
    Tol {
        abs: 1e-6 * terms.max(1) as f64,
        rel: 1e-5,
    }
}

/// Cross-entropy losses and their mean: a row's log-sum-exp in another
/// order, expf/logf within 2 ulp (tests/gpu_loss.rs).
const XENT: Tol = Tol {
    abs: 2e-5,
    rel: 1e-5,
};
/// Probabilities and the gradient `(p - y) / n`: the log-sum-exp's error
/// becomes a relative error (tests/gpu_loss.rs).
const PROB: Tol = Tol {
    abs: 1e-7,
    rel: 1e-5,
};

/// The largest `|got - want| / (abs + rel * |want|)` (NaN must meet NaN);
/// above 1 is a mismatch, reported with its first element.
fn compare(what: &str, got: &[f32], want: &[f32], tol: Tol) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, reference {}",
            got.len(),
            want.len()
        ));
    }
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let ratio = if g.is_nan() || w.is_nan() {
            if g.is_nan() && w.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (g - w).abs() / (tol.abs + tol.rel * w.abs())
        };
        if ratio > 1.0 {
            return Err(format!(
                "{what}[{i}]: got {g}, reference {w}, |diff| {} > {} + {}*|ref|",
                (g - w).abs(),
                tol.abs,
                tol.rel
            ));
        }
        worst = worst.max(ratio);
    }
    Ok(worst)
}

/// Seeded values in [lo, hi) (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn vec(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len)
            .map(|_| lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32))
            .collect()
    }
}

/// What went wrong: no device to run on (exit 2), or a failure (exit 1).
enum Failure {
    NoDevice(String),
    Failed(String),
}

impl From<kestrel::Error> for Failure {
    fn from(e: kestrel::Error) -> Self {
        Failure::Failed(e.to_string())
    }
}

impl From<cudarc::driver::DriverError> for Failure {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Failure::Failed(format!("CUDA driver: {e}"))
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Failed(e)
    }
}

/// GEMM `C = elu(0.5 * A * B^T + bias)`, bias per column.
fn gemm_check(gpu: &CudaBackend, stream: &Arc<CudaStream>, rng: &mut Rng) -> Result<f64, Failure> {
    let (m, n, k) = (45, 67, 53);
    let p = Gemm::new(m, n, k).transpose(false, true).scale(0.5, 0.0);
    let act = Activation::elu(1.0);
    let (a, b, bias) = (
        rng.vec(m * k, -1.0, 1.0),
        rng.vec(n * k, -1.0, 1.0),
        rng.vec(n, -1.0, 1.0),
    );
    let mut want = vec![0.0f32; m * n];
    gemm::cpu::gemm(
        &p,
        &a,
        &b,
        &mut want,
        Epilogue {
            bias: Bias::PerCol(&bias),
            activation: act,
        },
    )?;

    // The framework's buffers, on its stream.
    let (da, db, dbias) = (
        stream.clone_htod(&a)?,
        stream.clone_htod(&b)?,
        stream.clone_htod(&bias)?,
    );
    let mut dc = stream.clone_htod(&vec![f32::NAN; m * n])?;
    let bias_view = dbias.as_view();
    gemm::cuda::gemm(
        gpu,
        &p,
        &da.as_view(),
        &db.as_view(),
        &mut dc.as_view_mut(),
        DeviceEpilogue {
            bias: Bias::PerCol(&bias_view),
            activation: act,
        },
    )?;
    // Enqueued only: the framework reads the result when it wants it.
    let got = stream.clone_dtoh(&dc)?;
    Ok(compare("gemm C", &got, &want, per_term(k))?)
}

/// Convolution forward `y = relu(conv(x, w) + bias)`, 3x3, stride 2, same.
fn conv_check(gpu: &CudaBackend, stream: &Arc<CudaStream>, rng: &mut Rng) -> Result<f64, Failure> {
    let p = Conv2d::new([3, 4, 11, 10], 6, [3, 3], [2, 2], Padding::Same)?;
    let act = Activation::RELU;
    let (x, w, bias) = (
        rng.vec(p.x_len(), -1.0, 1.0),
        rng.vec(p.w_len(), -1.0, 1.0),
        rng.vec(p.k, -1.0, 1.0),
    );
    let mut want = vec![0.0f32; p.y_len()];
    conv::cpu::forward(&p, &x, &w, Some(&bias), act, &mut want)?;

    let (dx, dw, dbias) = (
        stream.clone_htod(&x)?,
        stream.clone_htod(&w)?,
        stream.clone_htod(&bias)?,
    );
    let mut dy = stream.clone_htod(&vec![f32::NAN; p.y_len()])?;
    // The framework owns the workspace too: kestrel says how big it must be.
    let mut ws = stream.alloc_zeros::<f32>(conv::cuda::workspace_len(&p))?;
    conv::cuda::forward(
        gpu,
        &p,
        &dx.as_view(),
        &dw.as_view(),
        Some(&dbias.as_view()),
        act,
        &mut dy.as_view_mut(),
        &mut ws.as_view_mut(),
    )?;
    let got = stream.clone_dtoh(&dy)?;
    Ok(compare("conv y", &got, &want, per_term(p.col_rows()))?)
}

/// Fused softmax + cross-entropy over one-hot labels: the batch mean (the
/// one call here that synchronizes: it returns a host value), per-row
/// losses, probabilities and the logits' gradient.
fn loss_check(gpu: &CudaBackend, stream: &Arc<CudaStream>, rng: &mut Rng) -> Result<f64, Failure> {
    let (n, classes) = (19, 10);
    let p = LossParams::new(n, classes)?;
    let logits: Vec<f32> = rng.vec(n * classes, -10.0, 10.0);
    let mut labels = vec![0.0f32; n * classes];
    for row in 0..n {
        labels[row * classes + (rng.next() % classes as u64) as usize] = 1.0;
    }
    let (mut losses, mut probs, mut dz) = (
        vec![0.0f32; n],
        vec![0.0f32; n * classes],
        vec![0.0f32; n * classes],
    );
    let want_mean = loss::cpu::softmax_cross_entropy(
        &p,
        &logits,
        &labels,
        &mut losses,
        Some(&mut probs),
        Some(&mut dz),
    )?;

    let (dlogits, dlabels) = (stream.clone_htod(&logits)?, stream.clone_htod(&labels)?);
    let mut dlosses = stream.clone_htod(&vec![f32::NAN; n])?;
    let mut dprobs = stream.clone_htod(&vec![f32::NAN; n * classes])?;
    let mut ddz = stream.clone_htod(&vec![f32::NAN; n * classes])?;
    // The loss's scratch (chunk partials, the total) comes from the caller:
    // allocated once here, reusable for every later call on these shapes.
    let mut scratch = loss::cuda::LossScratch::new(gpu, &p)?;
    let mean = loss::cuda::softmax_cross_entropy(
        gpu,
        &p,
        &dlogits.as_view(),
        &dlabels.as_view(),
        &mut dlosses.as_view_mut(),
        Some(&mut dprobs.as_view_mut()),
        Some(&mut ddz.as_view_mut()),
        &mut scratch,
    )?;
    let mut worst = compare(
        "softmax xent mean",
        &[mean as f32],
        &[want_mean as f32],
        XENT,
    )?;
    worst = worst.max(compare(
        "softmax xent losses",
        &stream.clone_dtoh(&dlosses)?,
        &losses,
        XENT,
    )?);
    worst = worst.max(compare(
        "softmax probs",
        &stream.clone_dtoh(&dprobs)?,
        &probs,
        PROB,
    )?);
    worst = worst.max(compare(
        "softmax xent dz",
        &stream.clone_dtoh(&ddz)?,
        &dz,
        PROB,
    )?);
    Ok(worst)
}

fn run() -> Result<String, Failure> {
    if !kestrel::cuda::driver_present() {
        return Err(Failure::NoDevice(
            "no CUDA driver (libcuda.so.1) could be loaded; on a machine without a GPU, build the \
             emulated device (emu/build) and run with LD_LIBRARY_PATH=$PWD/target/emu/plain"
                .into(),
        ));
    }
    match kestrel::cuda::device_count() {
        Ok(0) => return Err(Failure::NoDevice("the CUDA driver sees no device".into())),
        Ok(_) => {}
        Err(e) => return Err(Failure::NoDevice(e.to_string())),
    }
    // The framework's own context and stream; cudarc's event tracking stays
    // on, as cudarc sets it.
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let gpu = CudaBackend::from_stream(stream.clone())?;
    if !Arc::ptr_eq(gpu.stream(), &stream) {
        return Err("the handle does not launch on the caller's stream"
            .to_string()
            .into());
    }

    let mut rng = Rng(2024);
    let g = gemm_check(&gpu, &stream, &mut rng)?;
    let c = conv_check(&gpu, &stream, &mut rng)?;
    let l = loss_check(&gpu, &stream, &mut rng)?;
    stream.synchronize()?;
    if !ctx.is_event_tracking() {
        return Err("kestrel changed the caller's event tracking"
            .to_string()
            .into());
    }
    Ok(format!(
        "gpu_own_stream: gemm+bias+elu, conv forward+bias+relu, softmax cross-entropy on the \
         caller's stream match the CPU reference on {} (worst error / tolerance: {g:.1e}, {c:.1e}, \
         {l:.1e}; {} modules loaded)",
        gpu.info().name,
        gpu.loaded_modules()
    ))
}

fn main() -> ExitCode {
    match run() {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(Failure::NoDevice(msg)) => {
            eprintln!("gpu_own_stream: no CUDA device to run on: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(msg)) => {
            eprintln!("gpu_own_stream: FAILED: {msg}");
            ExitCode::FAILURE
        }
    }
}
