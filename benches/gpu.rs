//! kestrel's CUDA kernels beside their strongest baselines, in one run:
//!
//! - `gpu_gemm`: square 1024/2048/4096 and every GEMM shape of keras-cnn and
//!   elu-cnn at batch 32 and 128 (each conv layer as one im2col GEMM over
//!   the batch, and each dense layer: forward and both backward shapes),
//!   beside cuBLAS `sgemm` with `CUBLAS_DEFAULT_MATH` (FP32 FMA, no TF32).
//!   Each shape runs what training runs: `gemm::cuda::gemm_ws` with a
//!   workspace of `select_workspace_len` floats, i.e. the version
//!   `select_ws` picks, split-K included (id as is); with
//!   `KESTREL_BENCH_GEMM_VERSIONS=1`, also one row per version
//!   (`GemmKernel::ALL`: v1 64x64, v1 128x128, v2, v2 split-K, and the
//!   TF32 mma.sync and wgmma versions, each of those beside cuBLAS in
//!   `CUBLAS_TF32_TENSOR_OP_MATH`) forced through `gemm_with` with its
//!   `workspace_len`, id `<shape>.<kernel>` (e.g.
//!   `square.4096.gemm_v2_splitk`, `square.4096.gemm_tf32_wgmma_128x128`);
//!   a version the device cannot run (wgmma off compute capability 9.0) is
//!   skipped with a note on stderr. The mlp's dense layers are
//!   included (batch 32).
//! - `gpu_conv`: forward, backward data and backward filter of every conv
//!   layer of keras-cnn and elu-cnn at batch 32 and 128, once per algorithm
//!   (`ConvAlgo::ALL`: id `<net>.<layer>.b<n>.<pass>.im2col_gemm` for v1,
//!   `.implicit_gemm` for the implicit GEMM), each beside cuDNN with
//!   `CUDNN_FMA_MATH` (no TF32) and the algorithm `cudnnFind*` measures
//!   fastest (as PyTorch's `cudnn.benchmark = True`). Where cuDNN does not
//!   load, the PyTorch script (`benches/pytorch_baseline.py`) is the
//!   baseline.
//! - `gpu_pool`, `gpu_batchnorm`, `gpu_bias`, `gpu_activation`,
//!   `gpu_dropout`, `gpu_softmax_ce`, `gpu_optim`: the memory-bound kernels
//!   at the seed sizes and at >= 256 MB, beside a device-to-device copy
//!   (`cuMemcpyDtoDAsync`) of the same bytes (half read, half written), the
//!   bandwidth ceiling. Batch norm, bias (add and gradient), the
//!   activations and dropout have one row per kernel version
//!   (`<case>.<version>.<pass>`: the scalar versions beside their 16-byte
//!   `*vec4` forms), the optimizer too (`<case>.<rule>.<version>.p<params>`).
//!
//! Timing: device time from CUDA events created with timing enabled
//! (`CU_EVENT_DEFAULT`; cudarc's default events disable timing), recorded on
//! kestrel's stream around each batch of iterations that criterion asks for
//! (`iter_custom`), after an explicit warm-up (modules loaded, algorithms
//! chosen). Memory-bound kernels rotate through enough copies of their
//! buffers that the copies together exceed twice the L2 cache, so each call
//! reads from DRAM. Throughput: FLOPs as criterion elements for GEMM and
//! conv (2 per multiply-add), bytes for the rest (each input read once, each
//! output written once).
//!
//! After each pair, a line `ratio <group>/<id>: ...` gives both median
//! times per call and `ours/baseline` (time ratio: below 1, ours is
//! faster), and one JSON line goes to `target/kestrel-bench/gpu.jsonl`
//! (`$KESTREL_BENCH_DIR` overrides the folder) for `ci/bench-report`.
//!
//! Without a CUDA device this prints one line and exits 0. Shorter runs:
//! `KESTREL_BENCH_MEASURE_MS` (default 500) and a criterion filter (a
//! regex, applied before a pair is set up). The whole suite is about 230
//! pairs, several minutes; to stay within a 10-minute limit per command,
//! run it in three parts: `gpu_gemm`, `gpu_conv`, and
//! `'gpu_(pool|batchnorm|bias|activation|dropout|softmax_ce|optim)'` (each appends to the
//! same JSON-lines file).
//! cuBLAS/cuDNN are found on the loader path; failing that, the bench looks
//! in `$KESTREL_BENCH_LIB_DIRS` (colon-separated), the toolkit's folders and
//! the `nvidia/*/lib` folders of the Python packages (PyTorch's wheels) and
//! re-executes itself once with those on `LD_LIBRARY_PATH`.
//!
//! `gpu_step`: whole training steps and epochs through `Sequential::fit` on
//! the CUDA backend (keras-cnn batch 32, elu-cnn 32 and 128): wall-clock
//! time, host overhead and the per-batch upload included, as a user sees
//! it (`fit` synchronizes at the end of its epoch). The CPU versions are in
//! `benches/step_cpu.rs`; PyTorch's in `benches/pytorch_baseline.py`.
//! `gpu_step_graph`: the keras-cnn step at batch 32 replayed from one CUDA
//! graph beside the same steps launched op by op (`--no-cuda-graph`), and
//! beside the graph with the plain batch upload (`--no-staged-upload`), 50
//! steps per fit call; run it with the filter `gpu_step_graph`.

mod common;

use std::cell::RefCell;
use std::ffi::c_void;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use cudarc::cublas::{CudaBlas, Gemm as _, GemmConfig, sys as blas_sys};
use cudarc::driver::{
    CudaEvent, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    ValidAsZeroBits, sys as drv_sys,
};

use common::{
    DROPOUTS, ELU_CNN_CONVS, ELU_CNN_DENSE, KERAS_CNN_CONVS, KERAS_CNN_DENSE, KERAS_CNN_PARAMS,
    MLP_DENSE, POOLS, data, json_num, json_str, nets, one_hot, optimizer_bytes_per_param,
    optimizers, unix_time, write_jsonl,
};
use kestrel::cuda::CudaBackend;
use kestrel::cuda::KernelVersion;
use kestrel::ops::activation::Activation;
use kestrel::ops::batchnorm::{self, BatchNorm, VarianceMode};
use kestrel::ops::bias;
use kestrel::ops::conv::cuda::ConvAlgo;
use kestrel::ops::conv::{self, Conv2d, Padding};
use kestrel::ops::dropout::{self, Dropout};
use kestrel::ops::gemm::cuda::{DeviceEpilogue, GemmKernel};
use kestrel::ops::gemm::{self, Gemm};
use kestrel::ops::loss::{self, LossParams};
use kestrel::ops::optim::{self, cuda::CudaOptimizerState};
use kestrel::ops::pool::{self, MaxPool2d};

/// What one call does, for criterion's throughput and the reported rate.
#[derive(Clone, Copy, Debug)]
enum Work {
    Flops(f64),
    Bytes(f64),
}

impl Work {
    fn throughput(self) -> Throughput {
        match self {
            Work::Flops(f) => Throughput::Elements(f as u64),
            Work::Bytes(b) => Throughput::Bytes(b as u64),
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Work::Flops(_) => "GFLOP/s",
            Work::Bytes(_) => "GB/s",
        }
    }
    fn amount(self) -> f64 {
        match self {
            Work::Flops(v) | Work::Bytes(v) => v,
        }
    }
    /// GFLOP/s or GB/s (1e9) at `secs` per call.
    fn rate(self, secs: f64) -> f64 {
        self.amount() / secs / 1e9
    }
}

/// A buffer holding `copies` back-to-back instances of `len` elements;
/// call `i` uses instance `i % copies`.
struct Rot<T> {
    buf: CudaSlice<T>,
    len: usize,
    copies: usize,
}

impl<T: DeviceRepr> Rot<T> {
    fn view(&self, i: u64) -> CudaView<'_, T> {
        let at = (i as usize % self.copies) * self.len;
        self.buf.slice(at..at + self.len)
    }
    fn view_mut(&mut self, i: u64) -> CudaViewMut<'_, T> {
        let at = (i as usize % self.copies) * self.len;
        self.buf.slice_mut(at..at + self.len)
    }
}

struct Env {
    gpu: CudaBackend,
    start: CudaEvent,
    end: CudaEvent,
    l2_bytes: usize,
    device: String,
    /// The device is kestrel's emulated CUDA device: its timings are CPU
    /// times, so nothing is reported or recorded as a GPU figure.
    emulated: bool,
    blas: Option<CudaBlas>,
    dnn: Option<dnn::Dnn>,
    measure: Duration,
    warm_up: Duration,
    filter: Option<regex::Regex>,
    /// `KESTREL_BENCH_GEMM_VERSIONS`: also time every GEMM kernel version.
    gemm_versions: bool,
    /// Conv workspace for kestrel (the default maximum, allocated once).
    conv_ws: RefCell<Option<CudaSlice<f32>>>,
}

impl Env {
    fn open() -> Result<Env, String> {
        let count = kestrel::cuda::device_count().map_err(|e| e.to_string())?;
        if count == 0 {
            return Err(if kestrel::cuda::driver_present() {
                "the CUDA driver sees no device".into()
            } else {
                "no CUDA driver (libcuda.so.1) on this machine".into()
            });
        }
        let gpu = CudaBackend::new(0).map_err(|e| e.to_string())?;
        let ctx = gpu.context().clone();
        // Timing-enabled events: flags 0 (CU_EVENT_DEFAULT).
        let ev = || {
            ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| format!("cuEventCreate: {e}"))
        };
        let (start, end) = (ev()?, ev()?);
        let l2_bytes = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map(|v| v.max(0) as usize)
            .unwrap_or(50 << 20)
            .max(1 << 20);
        let info = gpu.info().clone();
        let device = format!(
            "{} (cc {}, driver {}, {} SMs, L2 {} MB)",
            info.name,
            info.cc_string(),
            info.driver_string(),
            info.multiprocessors,
            l2_bytes >> 20
        );
        let measure = std::env::var("KESTREL_BENCH_MEASURE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500u64);
        let emulated = info.is_emulated();
        let mut env = Env {
            gpu,
            start,
            end,
            l2_bytes,
            device,
            emulated,
            blas: None,
            dnn: None,
            measure: Duration::from_millis(measure),
            warm_up: Duration::from_millis((measure / 3).max(50)),
            filter: criterion_filter().and_then(|f| regex::Regex::new(&f).ok()),
            gemm_versions: std::env::var("KESTREL_BENCH_GEMM_VERSIONS")
                .is_ok_and(|v| !v.is_empty() && v != "0"),
            conv_ws: RefCell::new(None),
        };
        env.blas = match open_blas(&env.gpu) {
            Ok(b) => Some(b),
            Err(e) => {
                println!("cuBLAS baseline unavailable ({e}): GEMMs run without a baseline");
                None
            }
        };
        env.dnn = match dnn::Dnn::open(&env.gpu) {
            Ok(d) => Some(d),
            Err(e) => {
                println!(
                    "cuDNN baseline unavailable ({e}): for the conv layers the baseline is \
                     benches/pytorch_baseline.py (cuDNN through PyTorch)"
                );
                None
            }
        };
        Ok(env)
    }

    fn header(&self) {
        println!("kestrel GPU benches on {}", self.device);
        if self.blas.is_some() {
            println!(
                "  GEMM baseline: cuBLAS sgemm, math mode CUBLAS_DEFAULT_MATH (FP32, TF32 off)"
            );
        }
        if let Some(d) = &self.dnn {
            println!(
                "  conv baseline: cuDNN {}, CUDNN_FMA_MATH (FP32, TF32 off), algorithm by cudnnFind",
                d.version
            );
        }
        println!(
            "  memory-bound baseline: cuMemcpyDtoDAsync of the same bytes; inputs rotated over > 2x L2"
        );
        println!(
            "  device time from CUDA events (timing enabled); ratio = ours/baseline time (< 1: ours faster)"
        );
    }

    /// Whether criterion's filter (a regex, as criterion reads it) selects
    /// any implementation of this pair, so that filtered-out pairs cost no
    /// setup.
    fn wanted(&self, group: &str, id: &str) -> bool {
        match &self.filter {
            None => true,
            Some(re) => ["kestrel", "cublas", "cudnn", "memcpy_dtod"]
                .iter()
                .any(|f| re.is_match(&format!("{group}/{f}/{id}"))),
        }
    }

    /// Copies of a working set of `bytes` so that all copies exceed twice
    /// the L2 cache (at most 256).
    fn copies(&self, bytes: usize) -> usize {
        (2 * self.l2_bytes).div_ceil(bytes.max(1)).clamp(1, 256)
    }

    fn rot_data(&self, seed: u64, len: usize, copies: usize) -> Rot<f32> {
        Rot {
            buf: self.gpu.upload(&data(seed, len * copies)).expect("upload"),
            len,
            copies,
        }
    }

    fn rot_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize, copies: usize) -> Rot<T> {
        Rot {
            buf: self.gpu.zeros(len * copies).expect("cuMemAlloc"),
            len,
            copies,
        }
    }

    /// Device time of `iters` calls of `f` (call index as argument).
    fn device_time(&self, iters: u64, f: &mut dyn FnMut(u64)) -> Duration {
        let stream = self.gpu.stream();
        self.start.record(stream).expect("cuEventRecord");
        for i in 0..iters {
            f(i);
        }
        self.end.record(stream).expect("cuEventRecord");
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .expect("cuEventElapsedTime");
        Duration::from_secs_f64(ms as f64 * 1e-3)
    }

    /// One implementation under criterion; returns the median device time
    /// per call over the batches criterion ran (None when filtered out).
    fn measure_one(
        &self,
        g: &mut BenchmarkGroup<'_, WallTime>,
        name: &str,
        id: &str,
        f: &mut dyn FnMut(u64),
    ) -> Option<f64> {
        let per_call = RefCell::new(Vec::new());
        g.bench_function(BenchmarkId::new(name, id), |b| {
            b.iter_custom(|iters| {
                let d = self.device_time(iters, f);
                per_call
                    .borrow_mut()
                    .push(d.as_secs_f64() / iters.max(1) as f64);
                d
            })
        });
        let mut v = per_call.into_inner();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }

    /// Ours beside the baseline (if any): criterion for both, then the ratio
    /// line and the JSON record.
    #[allow(clippy::too_many_arguments)]
    fn pair(
        &self,
        c: &mut Criterion,
        group: &str,
        id: &str,
        work: Work,
        note: &str,
        ours: &mut dyn FnMut(u64),
        base: Option<(&str, &mut dyn FnMut(u64))>,
    ) {
        let mut base = base;
        // Warm-up outside the measurement: module loads, first-touch.
        for i in 0..3 {
            ours(i);
            if let Some((_, f)) = base.as_mut() {
                f(i);
            }
        }
        self.gpu.synchronize().expect("warm-up");
        let mut g = c.benchmark_group(group);
        g.sample_size(10)
            .warm_up_time(self.warm_up)
            .measurement_time(self.measure)
            .throughput(work.throughput());
        let ours_s = self.measure_one(&mut g, "kestrel", id, ours);
        let base_s = match base {
            Some((name, f)) => self.measure_one(&mut g, name, id, f).map(|s| (name, s)),
            None => None,
        };
        g.finish();
        let Some(ours_s) = ours_s else { return };
        if self.emulated {
            println!(
                "smoke {group}/{id}: ran on the emulated device; no timing reported or recorded"
            );
            return;
        }
        let unit = work.unit();
        let mut line = format!(
            "ratio {group}/{id}: kestrel {:.4} ms ({:.1} {unit})",
            ours_s * 1e3,
            work.rate(ours_s)
        );
        if let Some((name, s)) = base_s {
            line += &format!(
                ", {name} {:.4} ms ({:.1} {unit}), ours/baseline = {:.3}",
                s * 1e3,
                work.rate(s),
                ours_s / s
            );
        }
        if !note.is_empty() {
            line += &format!(" [{note}]");
        }
        println!("{line}");
        let (bname, bms, brate, ratio) = match base_s {
            Some((n, s)) => (
                json_str(n),
                json_num(s * 1e3),
                json_num(work.rate(s)),
                json_num(ours_s / s),
            ),
            None => ("null".into(), "null".into(), "null".into(), "null".into()),
        };
        write_jsonl(
            "gpu",
            &format!(
                "{{\"bench\":\"gpu\",\"group\":{},\"id\":{},\"device\":{},\"unit\":{},\
                 \"work\":{},\"ours_ms\":{},\"ours_rate\":{},\"baseline\":{bname},\
                 \"baseline_ms\":{bms},\"baseline_rate\":{brate},\"ratio\":{ratio},\
                 \"note\":{},\"time\":{}}}",
                json_str(group),
                json_str(id),
                json_str(&self.device),
                json_str(unit),
                json_num(work.amount()),
                json_num(ours_s * 1e3),
                json_num(work.rate(ours_s)),
                json_str(note),
                unix_time()
            ),
        );
    }

    /// A memory-bound op beside a DtoD copy of the same `bytes`, rotating
    /// `copies` instances of the copy's buffers too.
    #[allow(clippy::too_many_arguments)]
    fn pair_bandwidth(
        &self,
        c: &mut Criterion,
        group: &str,
        id: &str,
        bytes: usize,
        copies: usize,
        note: &str,
        ours: &mut dyn FnMut(u64),
    ) {
        let half = (bytes / 2).max(1);
        let src: Rot<u8> = self.rot_zeros(half, copies);
        let mut dst: Rot<u8> = self.rot_zeros(half, copies);
        let stream = self.gpu.stream().clone();
        let mut copy = |i: u64| {
            stream
                .memcpy_dtod(&src.view(i), &mut dst.view_mut(i))
                .expect("cuMemcpyDtoDAsync")
        };
        self.pair(
            c,
            group,
            id,
            Work::Bytes(bytes as f64),
            note,
            ours,
            Some(("memcpy_dtod", &mut copy)),
        );
    }
}

/// The first free command-line argument (criterion's filter), skipping the
/// values of the options that take one.
fn criterion_filter() -> Option<String> {
    const WITH_VALUE: [&str; 16] = [
        "--save-baseline",
        "-s",
        "--baseline",
        "-b",
        "--load-baseline",
        "--profile-time",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--output-format",
        "--color",
        "--plotting-backend",
    ];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if WITH_VALUE.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            return Some(a);
        }
    }
    None
}

/// Folders that may hold cuBLAS / cuDNN: `$KESTREL_BENCH_LIB_DIRS`
/// (colon-separated), the CUDA toolkit's, and the `nvidia/*/lib` folders of
/// the Python packages (PyTorch's wheels ship both libraries there).
fn library_dirs() -> Vec<std::path::PathBuf> {
    use std::path::PathBuf;
    let mut dirs: Vec<PathBuf> = std::env::var("KESTREL_BENCH_LIB_DIRS")
        .map(|v| {
            v.split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", "import sys; print('\\n'.join(sys.path))"])
        .output()
    {
        for p in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(rd) = std::fs::read_dir(PathBuf::from(p).join("nvidia")) else {
                continue;
            };
            for e in rd.filter_map(|e| e.ok()) {
                dirs.push(e.path().join("lib"));
            }
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// The newest `<stem>.so.<major>` in `dirs` (e.g. `libcublas.so.13`).
fn find_library(dirs: &[std::path::PathBuf], stem: &str) -> Option<std::path::PathBuf> {
    let prefix = format!("{stem}.so.");
    let mut best: Option<(u32, std::path::PathBuf)> = None;
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            let major: u32 = rest
                .split('.')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if best.as_ref().is_none_or(|(m, _)| major > *m) {
                best = Some((major, e.path()));
            }
        }
    }
    best.map(|(_, p)| p)
}

/// cudarc looks for cuBLAS and cuDNN by a fixed list of names on the
/// loader's path. When one of them is missing there but lies in a known
/// folder (PyTorch's wheels, the toolkit), this re-executes the bench with
/// `LD_LIBRARY_PATH` extended by those folders and by a scratch folder of
/// `libcublas.so` / `libcudnn.so` links (cudarc's list has no `.so.13`);
/// the loader reads `LD_LIBRARY_PATH` only at start-up. At most once.
fn ensure_baseline_libraries() {
    const GUARD: &str = "KESTREL_BENCH_LIBS_SET";
    // SAFETY: only dlopen()s the libraries by their usual names.
    let present = unsafe { blas_sys::is_culib_present() && cudarc::cudnn::sys::is_culib_present() };
    if present || std::env::var_os(GUARD).is_some() {
        return;
    }
    let dirs = library_dirs();
    let links = std::env::temp_dir().join(format!("kestrel-bench-libs-{}", std::process::id()));
    let mut path: Vec<std::path::PathBuf> = Vec::new();
    for stem in ["libcublas", "libcudnn"] {
        if let Some(lib) = find_library(&dirs, stem) {
            if std::fs::create_dir_all(&links).is_ok() {
                let _ = std::os::unix::fs::symlink(&lib, links.join(format!("{stem}.so")));
            }
            if let Some(d) = lib.parent() {
                path.push(d.to_path_buf());
            }
        }
    }
    if path.is_empty() {
        return;
    }
    path.insert(0, links);
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.extend(std::env::split_paths(&old));
    }
    let Ok(joined) = std::env::join_paths(path) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", joined)
        .env(GUARD, "1")
        .exec();
    eprintln!("could not re-execute with the baseline libraries on LD_LIBRARY_PATH: {err}");
}

fn open_blas(gpu: &CudaBackend) -> Result<CudaBlas, String> {
    // SAFETY: only dlopen()s cuBLAS by its usual names.
    if !unsafe { blas_sys::is_culib_present() } {
        return Err("libcublas not found; set LD_LIBRARY_PATH or KESTREL_BENCH_LIB_DIRS".into());
    }
    let blas = CudaBlas::new(gpu.stream().clone()).map_err(|e| format!("cublasCreate: {e:?}"))?;
    // SAFETY: a valid handle; DEFAULT_MATH keeps sgemm in FP32 (no TF32).
    unsafe {
        blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
            .result()
            .map_err(|e| format!("cublasSetMathMode: {e:?}"))?;
    }
    Ok(blas)
}

/// Sets the handle's math mode (DEFAULT_MATH: FP32 sgemm; TF32_TENSOR_OP_MATH:
/// sgemm on TF32 tensor cores).
fn set_math(blas: &CudaBlas, mode: blas_sys::cublasMath_t) {
    // SAFETY: a valid handle; the mode only changes how later calls compute.
    unsafe { blas_sys::cublasSetMathMode(*blas.handle(), mode) }
        .result()
        .expect("cublasSetMathMode");
}

/// cuBLAS sgemm computing kestrel's row-major `p` (one batch item) on the
/// column-major library: `C^T = op(B)^T op(A)^T`.
fn cublas_sgemm(
    blas: &CudaBlas,
    p: &Gemm,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    c: &mut CudaSlice<f32>,
) {
    use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let cfg = GemmConfig {
        transa: op(p.trans_b),
        transb: op(p.trans_a),
        m: p.n as i32,
        n: p.m as i32,
        k: p.k as i32,
        alpha: p.alpha,
        lda: p.ldb as i32,
        ldb: p.lda as i32,
        beta: p.beta,
        ldc: p.ldc as i32,
    };
    // SAFETY: a, b, c were allocated for exactly p's dense operands (the
    // same buffers kestrel's checked gemm accepts), so every access cuBLAS
    // makes with these dims and leading dimensions is in bounds.
    unsafe { blas.gemm(cfg, b, a, c) }.expect("cublasSgemm");
}

/// `p` on the selected version beside cuBLAS and, with
/// `KESTREL_BENCH_GEMM_VERSIONS`, on every version.
fn gemm_pair(env: &Env, c: &mut Criterion, id: &str, p: Gemm) {
    gemm_version_pair(env, c, id, p, None);
    if env.gemm_versions {
        for k in GemmKernel::ALL {
            let vid = format!("{id}.{}", k.name());
            if !k.runs_on(env.gpu.info()) {
                if env.wanted("gpu_gemm", &vid) {
                    eprintln!(
                        "gpu_gemm {vid}: skipped, compute capability {} cannot run it",
                        env.gpu.info().cc_string()
                    );
                }
                continue;
            }
            gemm_version_pair(env, c, &vid, p, Some(k));
        }
    }
}

/// `p` on `kernel` (`None`: the one `select` picks) beside cuBLAS.
fn gemm_version_pair(env: &Env, c: &mut Criterion, id: &str, p: Gemm, kernel: Option<GemmKernel>) {
    if !env.wanted("gpu_gemm", id) {
        return;
    }
    let (ar, ac) = p.a_dims();
    let (br, bc) = p.b_dims();
    let a = env.gpu.upload(&data(1, ar * ac)).expect("upload");
    let b = env.gpu.upload(&data(2, br * bc)).expect("upload");
    let mut out: CudaSlice<f32> = env.gpu.zeros(p.m * p.n).expect("alloc");
    let mut out_base: CudaSlice<f32> = env.gpu.zeros(p.m * p.n).expect("alloc");
    let gpu = &env.gpu;
    // The default row runs what training runs: gemm_ws with the workspace
    // GpuBackend keeps (split-K where the selector splits); a forced
    // version gets exactly its workspace_len.
    let ws_len = match kernel {
        None => gemm::cuda::select_workspace_len(&p),
        Some(k) => gemm::cuda::workspace_len(&p, k),
    };
    let mut ws: CudaSlice<f32> = env.gpu.zeros(ws_len.max(1)).expect("alloc");
    let forced = kernel;
    let kernel = match kernel {
        Some(k) => k,
        None => gemm::cuda::select_ws(&p, gpu.info(), ws_len),
    };
    let mut ours = |_i: u64| {
        let mut w = ws.slice_mut(..ws_len);
        match forced {
            None => gemm::cuda::gemm_ws(
                gpu,
                &p,
                &a.slice(..),
                &b.slice(..),
                &mut out.slice_mut(..),
                DeviceEpilogue::default(),
                &mut w,
            ),
            Some(k) => gemm::cuda::gemm_with(
                gpu,
                k,
                &p,
                &a.slice(..),
                &b.slice(..),
                &mut out.slice_mut(..),
                DeviceEpilogue::default(),
                (ws_len > 0).then_some(&mut w),
            ),
        }
        .expect("kestrel gemm")
    };
    // A TF32 version is named as such and timed beside cuBLAS in TF32 mode
    // (the ratio is against cuBLAS TF32); f32 versions beside
    // cuBLAS FP32.
    let tf32 = kernel.precision() == gemm::Precision::Tf32;
    let note = format!("{}, {}", if tf32 { "TF32" } else { "FP32" }, kernel.name());
    let note = note.as_str();
    match &env.blas {
        Some(blas) => {
            let mut base = |_i: u64| {
                if tf32 {
                    set_math(blas, blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH);
                }
                cublas_sgemm(blas, &p, &a, &b, &mut out_base);
                if tf32 {
                    set_math(blas, blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH);
                }
            };
            env.pair(
                c,
                "gpu_gemm",
                id,
                Work::Flops(p.flops()),
                note,
                &mut ours,
                Some(("cublas", &mut base)),
            )
        }
        None => env.pair(
            c,
            "gpu_gemm",
            id,
            Work::Flops(p.flops()),
            note,
            &mut ours,
            None,
        ),
    }
}

fn gemms(c: &mut Criterion, env: &Env) {
    for s in [1024usize, 2048, 4096] {
        gemm_pair(env, c, &format!("square.{s}"), Gemm::new(s, s, s));
    }
    for n in [32usize, 128] {
        for layer in KERAS_CNN_CONVS.iter().chain(&ELU_CNN_CONVS) {
            for (pass, p) in layer.gemms(n) {
                gemm_pair(env, c, &layer.id(n, pass), p);
            }
        }
        for layer in KERAS_CNN_DENSE.iter().chain(&ELU_CNN_DENSE) {
            for (pass, p) in layer.gemms(n) {
                gemm_pair(env, c, &layer.id(n, pass), p);
            }
        }
    }
    for layer in &MLP_DENSE {
        for (pass, p) in layer.gemms(32) {
            gemm_pair(env, c, &layer.id(32, pass), p);
        }
    }
}

fn convs(c: &mut Criterion, env: &Env) {
    for n in [32usize, 128] {
        for layer in KERAS_CNN_CONVS.iter().chain(&ELU_CNN_CONVS) {
            let p = layer.params(n);
            let passes = ["fwd", "bwd_data", "bwd_filter"];
            if !passes.iter().any(|pass| {
                ConvAlgo::ALL
                    .iter()
                    .any(|a| env.wanted("gpu_conv", &format!("{}.{}", layer.id(n, pass), a.name())))
            }) {
                continue;
            }
            conv_layer(c, env, layer.id(n, "").trim_end_matches('.'), &p);
        }
    }
}

fn conv_layer(c: &mut Criterion, env: &Env, base_id: &str, p: &Conv2d) {
    let gpu = &env.gpu;
    let x = gpu.upload(&data(1, p.x_len())).expect("upload");
    let w = gpu.upload(&data(2, p.w_len())).expect("upload");
    let dy = gpu.upload(&data(3, p.y_len())).expect("upload");
    let mut y: CudaSlice<f32> = gpu.zeros(p.y_len()).expect("alloc");
    let mut dx: CudaSlice<f32> = gpu.zeros(p.x_len()).expect("alloc");
    let mut dw: CudaSlice<f32> = gpu.zeros(p.w_len()).expect("alloc");
    let plan = env.dnn.as_ref().map(|d| d.plan(gpu, p));
    let mut plan = match plan {
        Some(Ok(pl)) => Some(pl),
        Some(Err(e)) => {
            println!("cuDNN plan for {base_id} failed ({e}); kestrel alone");
            None
        }
        None => None,
    };
    let work = Work::Flops(p.flops());
    let (mut yb, mut dxb, mut dwb): (CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>) = (
        gpu.zeros(p.y_len()).expect("alloc"),
        gpu.zeros(p.x_len()).expect("alloc"),
        gpu.zeros(p.w_len()).expect("alloc"),
    );
    let selected = conv::cuda::select(p, gpu.info());
    // Every algorithm, each pass beside cuDNN: id `<layer>.<pass>.<algo>`
    // (`im2col_gemm` is v1, `implicit_gemm` the implicit GEMM); the note
    // says which one training runs (`conv::cuda::select`).
    for algo in ConvAlgo::ALL {
        // One workspace for every layer, grown to the largest one needs; each
        // call gets exactly the algorithm's `workspace_len_with`, as the
        // training backend gives select's choice its own.
        let need = conv::cuda::workspace_len_with(algo, p).max(1);
        let mut ws_cell = env.conv_ws.borrow_mut();
        if ws_cell.as_ref().is_none_or(|w| w.len() < need) {
            *ws_cell = None;
            *ws_cell = Some(gpu.zeros(need).expect("conv workspace"));
        }
        let ws = ws_cell.as_mut().expect("allocated above");
        let how = match algo {
            ConvAlgo::Im2colGemm => "conv as im2col + GEMM (v1)",
            ConvAlgo::ImplicitGemm => "conv as implicit GEMM",
        };
        let chosen = if algo == selected {
            ", select's choice"
        } else {
            ""
        };
        let note = format!("FP32; {how}{chosen}; baseline cuDNN FMA");

        let id = format!("{base_id}.fwd.{}", algo.name());
        if env.wanted("gpu_conv", &id) {
            let mut ours = |_i: u64| {
                conv::cuda::forward_with(
                    gpu,
                    algo,
                    p,
                    &x.slice(..),
                    &w.slice(..),
                    None,
                    Activation::LINEAR,
                    &mut y.slice_mut(..),
                    &mut ws.slice_mut(..need),
                )
                .expect("kestrel conv forward")
            };
            match plan.as_mut() {
                Some(pl) => {
                    let mut base = |_i: u64| pl.forward(gpu, &x, &w, &mut yb);
                    env.pair(
                        c,
                        "gpu_conv",
                        &id,
                        work,
                        &note,
                        &mut ours,
                        Some(("cudnn", &mut base)),
                    );
                }
                None => env.pair(c, "gpu_conv", &id, work, &note, &mut ours, None),
            }
        }
        let id = format!("{base_id}.bwd_data.{}", algo.name());
        if env.wanted("gpu_conv", &id) {
            let mut ours = |_i: u64| {
                conv::cuda::backward_data_with(
                    gpu,
                    algo,
                    p,
                    &dy.slice(..),
                    &w.slice(..),
                    &mut dx.slice_mut(..),
                    &mut ws.slice_mut(..need),
                )
                .expect("kestrel conv backward_data")
            };
            match plan.as_mut() {
                Some(pl) => {
                    let mut base = |_i: u64| pl.backward_data(gpu, &dy, &w, &mut dxb);
                    env.pair(
                        c,
                        "gpu_conv",
                        &id,
                        work,
                        &note,
                        &mut ours,
                        Some(("cudnn", &mut base)),
                    );
                }
                None => env.pair(c, "gpu_conv", &id, work, &note, &mut ours, None),
            }
        }
        let id = format!("{base_id}.bwd_filter.{}", algo.name());
        if env.wanted("gpu_conv", &id) {
            let mut ours = |_i: u64| {
                conv::cuda::backward_filter_with(
                    gpu,
                    algo,
                    p,
                    &x.slice(..),
                    &dy.slice(..),
                    &mut dw.slice_mut(..),
                    &mut ws.slice_mut(..need),
                )
                .expect("kestrel conv backward_filter")
            };
            match plan.as_mut() {
                Some(pl) => {
                    let mut base = |_i: u64| pl.backward_filter(gpu, &x, &dy, &mut dwb);
                    env.pair(
                        c,
                        "gpu_conv",
                        &id,
                        work,
                        &note,
                        &mut ours,
                        Some(("cudnn", &mut base)),
                    );
                }
                None => env.pair(c, "gpu_conv", &id, work, &note, &mut ours, None),
            }
        }
    }
}

/// Floats in the >= 256 MB cases: 2^26 (256 MiB of f32).
const BIG: usize = 1 << 26;

fn pools(c: &mut Criterion, env: &Env) {
    let mut cases: Vec<(String, MaxPool2d)> = Vec::new();
    for n in [32usize, 128] {
        for layer in &POOLS {
            cases.push((layer.id(n, ""), layer.params(n)));
        }
    }
    // [256, 64, 64, 64]: 2^26 floats in.
    let big = MaxPool2d::new([256, 64, 64, 64], [2, 2], [2, 2], Padding::Valid).unwrap();
    cases.push(("large.256x64x64x64.".into(), big));
    for (base_id, p) in cases {
        let base_id = base_id.trim_end_matches('.');
        let gpu = &env.gpu;
        let fwd_bytes = 4 * p.x_len() + 8 * p.y_len();
        let bwd_bytes = 8 * p.y_len() + 4 * p.x_len();
        let copies = env.copies(fwd_bytes);
        let (fid, bid) = (format!("{base_id}.fwd"), format!("{base_id}.bwd"));
        if !env.wanted("gpu_pool", &fid) && !env.wanted("gpu_pool", &bid) {
            continue;
        }
        let x = env.rot_data(1, p.x_len(), copies);
        let mut y: Rot<f32> = env.rot_zeros(p.y_len(), copies);
        let mut arg: Rot<u32> = env.rot_zeros(p.y_len(), copies);
        let dy = env.rot_data(2, p.y_len(), copies);
        let mut dx: Rot<f32> = env.rot_zeros(p.x_len(), copies);
        // Valid argmaxes in every copy before the backward runs.
        for i in 0..copies as u64 {
            pool::cuda::forward(
                gpu,
                &p,
                &x.view(i),
                &mut y.view_mut(i),
                &mut arg.view_mut(i),
            )
            .expect("maxpool forward");
        }
        if env.wanted("gpu_pool", &fid) {
            let mut ours = |i: u64| {
                pool::cuda::forward(
                    gpu,
                    &p,
                    &x.view(i),
                    &mut y.view_mut(i),
                    &mut arg.view_mut(i),
                )
                .expect("maxpool forward")
            };
            env.pair_bandwidth(c, "gpu_pool", &fid, fwd_bytes, copies, "", &mut ours);
        }
        if env.wanted("gpu_pool", &bid) {
            let mut ours = |i: u64| {
                pool::cuda::backward(gpu, &p, &dy.view(i), &arg.view(i), &mut dx.view_mut(i))
                    .expect("maxpool backward")
            };
            env.pair_bandwidth(c, "gpu_pool", &bid, bwd_bytes, copies, "", &mut ours);
        }
    }
}

fn batchnorms(c: &mut Criterion, env: &Env) {
    let cases = [
        ("mlp.bn784.b32", 32, 784, 1, false),
        ("mlp.bn300.b32", 32, 300, 1, false),
        ("mlp.bn100.b32", 32, 100, 1, false),
        ("keras-cnn.conv1-out.b32", 32, 32, 32 * 32, true),
        ("keras-cnn.conv1-out.b128", 128, 32, 32 * 32, true),
        ("large.256x64x64x64", 256, 64, 64 * 64, true),
        // The dense layout at n = c = 4096 (64 MB per pass over x) and 8192
        // (256 MB, the size for the bandwidth target):
        // one row per version (v1 ChannelBlocks, v2 Columns and their
        // Vec4 forms; the large NCHW case the ChannelBlocks pair), so the
        // issue-13 comparison is one filter away.
        ("dense.4096x4096", 4096, 4096, 1, false),
        ("dense.8192x8192", 8192, 8192, 1, false),
    ];
    let runs = cases
        .into_iter()
        .flat_map(|(name, n, ch, spatial, is_conv)| {
            let versions: Vec<Option<batchnorm::cuda::BatchNormKernel>> =
                if name.starts_with("dense.") || name.starts_with("large.") {
                    let p =
                        BatchNorm::new(n, ch, spatial, is_conv, 0.99, 1e-3, VarianceMode::Keras)
                            .unwrap();
                    batchnorm::cuda::BatchNormKernel::ALL
                        .iter()
                        .filter(|k| k.supports(&p))
                        .map(|&k| Some(k))
                        .collect()
                } else {
                    vec![None]
                };
            versions
                .into_iter()
                .map(move |k| (name, n, ch, spatial, is_conv, k))
        });
    for (name, n, ch, spatial, is_conv, kernel) in runs {
        let tag = kernel.map_or(String::new(), |k| format!(".{}", k.name()));
        let (fid, bid) = (format!("{name}{tag}.fwd"), format!("{name}{tag}.bwd"));
        if !env.wanted("gpu_batchnorm", &fid) && !env.wanted("gpu_batchnorm", &bid) {
            continue;
        }
        let gpu = &env.gpu;
        let p = BatchNorm::new(n, ch, spatial, is_conv, 0.99, 1e-3, VarianceMode::Keras).unwrap();
        let len = n * ch * spatial;
        let fwd_bytes = 4 * (2 * len + 8 * ch);
        let bwd_bytes = 4 * (3 * len + 5 * ch);
        let copies = env.copies(fwd_bytes);
        let x = env.rot_data(1, len, copies);
        let dy = env.rot_data(2, len, copies);
        let mut y: Rot<f32> = env.rot_zeros(len, copies);
        let mut dx: Rot<f32> = env.rot_zeros(len, copies);
        let gamma = gpu.upload(&data(3, ch)).unwrap();
        let beta = gpu.upload(&data(4, ch)).unwrap();
        let mut mean: CudaSlice<f32> = gpu.zeros(ch).unwrap();
        let mut inv: CudaSlice<f32> = gpu.zeros(ch).unwrap();
        let mut rm: CudaSlice<f32> = gpu.zeros(ch).unwrap();
        let mut rv = gpu.upload(&vec![1.0f32; ch]).unwrap();
        let mut dg: CudaSlice<f32> = gpu.zeros(ch).unwrap();
        let mut db: CudaSlice<f32> = gpu.zeros(ch).unwrap();
        let mut scratch = batchnorm::cuda::BatchNormScratch::new(gpu, &p).unwrap();
        // The plain entry points' version unless the row names one.
        // Fresh allocations start on 16 bytes, so the aligned choice.
        let kernel = kernel.unwrap_or_else(|| batchnorm::cuda::select(&p, true, gpu.info()));
        if env.wanted("gpu_batchnorm", &fid) {
            let mut ours = |i: u64| {
                batchnorm::cuda::forward_training_with(
                    gpu,
                    kernel,
                    &p,
                    &x.view(i),
                    &gamma.slice(..),
                    &beta.slice(..),
                    &mut y.view_mut(i),
                    &mut mean.slice_mut(..),
                    &mut inv.slice_mut(..),
                    &mut rm.slice_mut(..),
                    &mut rv.slice_mut(..),
                    &mut scratch,
                )
                .expect("batchnorm forward")
            };
            env.pair_bandwidth(c, "gpu_batchnorm", &fid, fwd_bytes, copies, "", &mut ours);
        }
        if env.wanted("gpu_batchnorm", &bid) {
            let mut ours = |i: u64| {
                batchnorm::cuda::backward_with(
                    gpu,
                    kernel,
                    &p,
                    &x.view(i),
                    &dy.view(i),
                    &gamma.slice(..),
                    &mean.slice(..),
                    &inv.slice(..),
                    &mut dx.view_mut(i),
                    &mut dg.slice_mut(..),
                    &mut db.slice_mut(..),
                    &mut scratch,
                )
                .expect("batchnorm backward")
            };
            env.pair_bandwidth(c, "gpu_batchnorm", &bid, bwd_bytes, copies, "", &mut ours);
        }
    }
}

/// The bias gradient (a per-channel sum) per version where both run: the
/// dense layout at the mlp sizes and at n = c = 4096 and 8192 (64 and 256
/// MB read), and a
/// conv shape on the one version that runs it.
fn bias_grads(c: &mut Criterion, env: &Env) {
    let cases = [
        ("mlp.b784.b32", 32, 784, 1),
        ("dense.4096x4096", 4096, 4096, 1),
        ("dense.8192x8192", 8192, 8192, 1),
        ("keras-cnn.conv1-out.b32", 32, 32, 32 * 32),
        ("large.256x64x64x64", 256, 64, 64 * 64),
    ];
    for (name, n, ch, spatial) in cases {
        let p = bias::BiasShape::new(n, ch, spatial).unwrap();
        for &kernel in bias::cuda::BiasKernel::ALL
            .iter()
            .filter(|k| k.supports(&p))
        {
            let id = format!("{name}.{}.bwd", kernel.name());
            if !env.wanted("gpu_bias", &id) {
                continue;
            }
            let gpu = &env.gpu;
            let len = p.len();
            let bytes = 4 * (len + ch);
            let copies = env.copies(bytes);
            let dy = env.rot_data(1, len, copies);
            let mut db: CudaSlice<f32> = gpu.zeros(ch).unwrap();
            let mut scratch = bias::cuda::BiasScratch::for_backward(gpu, &p).unwrap();
            let mut ours = |i: u64| {
                bias::cuda::backward_with(
                    gpu,
                    kernel,
                    &p,
                    &dy.view(i),
                    &mut db.slice_mut(..),
                    &mut scratch,
                )
                .expect("bias backward")
            };
            env.pair_bandwidth(c, "gpu_bias", &id, bytes, copies, "", &mut ours);
        }
    }
}

/// The bias add (`y = x + b`, both layouts) per version: the scalar
/// versions beside their 16-byte vector forms, at a seed size and at 256 MB
/// of `x`.
fn bias_adds(c: &mut Criterion, env: &Env) {
    let cases = [
        ("keras-cnn.conv1-out.b32", 32, 32, 32 * 32),
        ("dense.8192x8192", 8192, 8192, 1),
        ("large.256x64x64x64", 256, 64, 64 * 64),
    ];
    for (name, n, ch, spatial) in cases {
        let p = bias::BiasShape::new(n, ch, spatial).unwrap();
        for &kernel in bias::cuda::BiasKernel::ALL
            .iter()
            .filter(|k| k.supports(&p))
        {
            let id = format!("{name}.{}.fwd", kernel.name());
            if !env.wanted("gpu_bias", &id) {
                continue;
            }
            let gpu = &env.gpu;
            let len = p.len();
            // x read, y written, b read.
            let bytes = 4 * (2 * len + ch);
            let copies = env.copies(bytes);
            let x = env.rot_data(1, len, copies);
            let b = gpu.upload(&data(2, ch)).unwrap();
            let mut y: Rot<f32> = env.rot_zeros(len, copies);
            let mut ours = |i: u64| {
                bias::cuda::add_with(
                    gpu,
                    kernel,
                    &p,
                    &x.view(i),
                    &b.slice(..),
                    &mut y.view_mut(i),
                )
                .expect("bias add")
            };
            env.pair_bandwidth(c, "gpu_bias", &id, bytes, copies, "", &mut ours);
        }
    }
}

/// The element-wise activations per version (`Elementwise`, `Vec4`):
/// forward `y = f(x)` and backward `dx = f'(x) dy` (from x, y, dy), at
/// keras-cnn's first conv output (batch 32) and at 2^26 floats (256 MB per
/// tensor).
fn activations(c: &mut Criterion, env: &Env) {
    use kestrel::ops::activation::cuda::{self as act_cuda, ActivationKernel};
    let kinds = [
        ("relu", Activation::RELU),
        ("elu", Activation::elu(1.0)),
        ("tanh", Activation::TANH),
        ("sigmoid", Activation::SIGMOID),
    ];
    for (name, len) in [
        ("keras-cnn.conv1-out.b32", 32 * 32 * 32 * 32),
        ("large.64M", BIG),
    ] {
        for (kname, act) in kinds {
            for &kernel in ActivationKernel::ALL {
                let fid = format!("{name}.{kname}.{}.fwd", kernel.name());
                let bid = format!("{name}.{kname}.{}.bwd", kernel.name());
                if !env.wanted("gpu_activation", &fid) && !env.wanted("gpu_activation", &bid) {
                    continue;
                }
                let gpu = &env.gpu;
                let (fwd_bytes, bwd_bytes) = (8 * len, 16 * len);
                let copies = env.copies(fwd_bytes);
                let x = env.rot_data(1, len, copies);
                let dy = env.rot_data(2, len, copies);
                let mut y: Rot<f32> = env.rot_zeros(len, copies);
                let mut dx: Rot<f32> = env.rot_zeros(len, copies);
                if env.wanted("gpu_activation", &fid) {
                    let mut ours = |i: u64| {
                        act_cuda::forward_with(gpu, kernel, act, &x.view(i), &mut y.view_mut(i))
                            .expect("activation forward")
                    };
                    env.pair_bandwidth(c, "gpu_activation", &fid, fwd_bytes, copies, "", &mut ours);
                }
                if env.wanted("gpu_activation", &bid) {
                    let mut ours = |i: u64| {
                        act_cuda::backward_with(
                            gpu,
                            kernel,
                            act,
                            &x.view(i),
                            &y.view(i),
                            &dy.view(i),
                            &mut dx.view_mut(i),
                        )
                        .expect("activation backward")
                    };
                    env.pair_bandwidth(c, "gpu_activation", &bid, bwd_bytes, copies, "", &mut ours);
                }
            }
        }
    }
}

/// Dropout per version (`Philox`, `PhiloxVec4`), forward and backward, at
/// the seed runs' dropout layers and at 2^26 floats.
fn dropouts(c: &mut Criterion, env: &Env) {
    use kestrel::ops::dropout::cuda::DropoutKernel;
    let mut cases: Vec<(String, usize, f32)> = Vec::new();
    for n in [32usize, 128] {
        for (net, name, per) in DROPOUTS {
            let rate = if name == "drop1" || name == "drop2" {
                0.25
            } else {
                0.5
            };
            cases.push((format!("{net}.{name}.b{n}"), n * per, rate));
        }
    }
    cases.push(("large.64M".into(), BIG, 0.5));
    for (base_id, len, rate) in cases {
        for &kernel in DropoutKernel::ALL {
            let fid = format!("{base_id}.{}.fwd", kernel.name());
            let bid = format!("{base_id}.{}.bwd", kernel.name());
            if !env.wanted("gpu_dropout", &fid) && !env.wanted("gpu_dropout", &bid) {
                continue;
            }
            // The rotating copies sit `len` elements apart: the vector version
            // needs len % 4 == 0 to keep every copy on 16 bytes (true of
            // every case here).
            if kernel == DropoutKernel::PhiloxVec4 && len % 4 != 0 {
                continue;
            }
            let gpu = &env.gpu;
            let p = Dropout::new(len, rate, 1234, 0).unwrap();
            // x or dy read (4), y or dx written (4), the u8 mask written or read.
            let bytes = 9 * len;
            let copies = env.copies(bytes);
            let x = env.rot_data(1, len, copies);
            let mut y: Rot<f32> = env.rot_zeros(len, copies);
            let mut mask: Rot<u8> = env.rot_zeros(len, copies);
            let mut dx: Rot<f32> = env.rot_zeros(len, copies);
            if env.wanted("gpu_dropout", &fid) {
                let mut ours = |i: u64| {
                    dropout::cuda::forward_with(
                        gpu,
                        kernel,
                        &p,
                        &x.view(i),
                        &mut y.view_mut(i),
                        &mut mask.view_mut(i),
                    )
                    .expect("dropout forward")
                };
                env.pair_bandwidth(c, "gpu_dropout", &fid, bytes, copies, "", &mut ours);
            }
            if env.wanted("gpu_dropout", &bid) {
                let mut ours = |i: u64| {
                    dropout::cuda::backward_with(
                        gpu,
                        kernel,
                        &p,
                        &x.view(i),
                        &mask.view(i),
                        &mut dx.view_mut(i),
                    )
                    .expect("dropout backward")
                };
                env.pair_bandwidth(c, "gpu_dropout", &bid, bytes, copies, "", &mut ours);
            }
        }
    }
}

fn softmax_ce(c: &mut Criterion, env: &Env) {
    let classes = 10;
    for (id, n) in [
        ("keras-cnn.softmax_ce.b32.fwd_bwd".to_string(), 32usize),
        ("keras-cnn.softmax_ce.b128.fwd_bwd".to_string(), 128),
        ("large.8Mx10.fwd_bwd".to_string(), 1 << 23),
    ] {
        if !env.wanted("gpu_softmax_ce", &id) {
            continue;
        }
        let gpu = &env.gpu;
        let p = LossParams::new(n, classes).unwrap();
        // read logits and one-hot labels, write losses and dz.
        let bytes = 4 * (3 * n * classes + n);
        let copies = env.copies(bytes);
        let logits = env.rot_data(1, n * classes, copies);
        let labels = Rot {
            buf: gpu.upload(&one_hot(n * copies, classes)).unwrap(),
            len: n * classes,
            copies,
        };
        let mut losses: Rot<f32> = env.rot_zeros(n, copies);
        let mut dz: Rot<f32> = env.rot_zeros(n * classes, copies);
        let mut scratch = loss::cuda::LossScratch::new(gpu, &p).unwrap();
        let mut ours = |i: u64| {
            loss::cuda::softmax_cross_entropy(
                gpu,
                &p,
                &logits.view(i),
                &labels.view(i),
                &mut losses.view_mut(i),
                None,
                Some(&mut dz.view_mut(i)),
                &mut scratch,
            )
            .expect("softmax_cross_entropy");
        };
        env.pair_bandwidth(
            c,
            "gpu_softmax_ce",
            &id,
            bytes,
            copies,
            "includes the batch-mean loss's device sum and its 8-byte download (the API returns it)",
            &mut ours,
        );
    }
}

/// One parameter set with its gradients and optimizer state.
struct OptSet {
    params: Vec<CudaSlice<f32>>,
    grads: Vec<CudaSlice<f32>>,
    state: CudaOptimizerState,
}

/// The fused optimizer step per version (`Fused`, `FusedVec4`) and rule,
/// over keras-cnn's parameters and over one tensor of 2^26.
fn optimizer_steps(c: &mut Criterion, env: &Env) {
    use kestrel::ops::optim::cuda::OptimKernel;
    let keras: Vec<usize> = KERAS_CNN_PARAMS.to_vec();
    let total: usize = keras.iter().sum();
    for (name, opt) in optimizers() {
        for (id, sizes, kernel) in OptimKernel::ALL.iter().flat_map(|&k| {
            [
                (
                    format!("keras-cnn.{name}.{}.p{total}", k.name()),
                    keras.clone(),
                    k,
                ),
                (format!("large.{name}.{}.p{BIG}", k.name()), vec![BIG], k),
            ]
        }) {
            if !env.wanted("gpu_optim", &id) {
                continue;
            }
            let gpu = &env.gpu;
            let count: usize = sizes.iter().sum();
            let bytes = count * optimizer_bytes_per_param(name);
            let copies = env.copies(bytes).min(16);
            let mut sets: Vec<OptSet> = (0..copies)
                .map(|s| OptSet {
                    params: sizes
                        .iter()
                        .enumerate()
                        .map(|(i, &n)| {
                            gpu.upload(&data(10 + i as u64 + 100 * s as u64, n))
                                .unwrap()
                        })
                        .collect(),
                    grads: sizes
                        .iter()
                        .enumerate()
                        .map(|(i, &n)| {
                            let g: Vec<f32> =
                                data(30 + i as u64, n).iter().map(|v| v * 1e-3).collect();
                            gpu.upload(&g).unwrap()
                        })
                        .collect(),
                    state: CudaOptimizerState::new(gpu, &opt, &sizes).unwrap(),
                })
                .collect();
            let mut ours = |i: u64| {
                let set = &mut sets[i as usize % copies];
                let mut ps: Vec<CudaViewMut<'_, f32>> =
                    set.params.iter_mut().map(|p| p.slice_mut(..)).collect();
                let gs: Vec<CudaView<'_, f32>> = set.grads.iter().map(|g| g.slice(..)).collect();
                // Every buffer is its own allocation: 16-byte aligned, so
                // both versions run.
                optim::cuda::step_with(gpu, kernel, &opt, &mut set.state, &mut ps, &gs)
                    .expect("optimizer step")
            };
            env.pair_bandwidth(
                c,
                "gpu_optim",
                &id,
                bytes,
                copies,
                "multi-tensor fused step, one launch (three with clipnorm)",
                &mut ours,
            );
        }
    }
}

/// cuDNN through its C API (cudarc's `result`/`sys` layers: the safe layer
/// neither exposes `cudnnFind*` nor raw handles).
mod dnn {
    use super::*;
    use cudarc::cudnn::{result, sys};

    /// A cuDNN handle on kestrel's stream.
    pub struct Dnn {
        handle: sys::cudnnHandle_t,
        pub version: String,
    }

    fn err(call: &str, e: impl std::fmt::Debug) -> String {
        format!("{call}: {e:?}")
    }

    impl Dnn {
        pub fn open(gpu: &CudaBackend) -> Result<Dnn, String> {
            // SAFETY: only dlopen()s cuDNN by its usual names.
            if !unsafe { sys::is_culib_present() } {
                return Err(
                    "libcudnn not found; set LD_LIBRARY_PATH or KESTREL_BENCH_LIB_DIRS".into(),
                );
            }
            let v = result::get_version();
            let version = format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100);
            gpu.context()
                .bind_to_thread()
                .map_err(|e| err("cuCtxSetCurrent", e))?;
            let handle = result::create_handle().map_err(|e| err("cudnnCreate", e))?;
            let dnn = Dnn { handle, version };
            // SAFETY: a live handle and kestrel's live stream.
            unsafe { result::set_stream(dnn.handle, gpu.stream().cu_stream() as _) }
                .map_err(|e| err("cudnnSetStream", e))?;
            Ok(dnn)
        }

        /// Descriptors for `p`, the fastest FMA algorithm of each pass
        /// (measured by cudnnFind on these very buffers' shapes) and a
        /// workspace for all three.
        pub fn plan(&self, gpu: &CudaBackend, p: &Conv2d) -> Result<Plan, String> {
            if p.pad_top != p.pad_bottom || p.pad_left != p.pad_right {
                return Err("asymmetric padding".into());
            }
            let i = |v: usize| v as i32;
            let f32t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
            let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
            let mut plan = Plan {
                handle: self.handle,
                x: result::create_tensor_descriptor().map_err(|e| err("create tensor", e))?,
                y: result::create_tensor_descriptor().map_err(|e| err("create tensor", e))?,
                w: result::create_filter_descriptor().map_err(|e| err("create filter", e))?,
                conv: result::create_convolution_descriptor().map_err(|e| err("create conv", e))?,
                fwd: (
                    sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                    0,
                ),
                bwd_data: (
                    sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
                    0,
                ),
                bwd_filter: (
                    sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                    0,
                ),
                ws: gpu.zeros::<u8>(1).map_err(|e| e.to_string())?,
            };
            let fma = sys::cudnnMathType_t::CUDNN_FMA_MATH;
            // SAFETY: fresh descriptors, set with the layer's positive dims.
            unsafe {
                result::set_tensor4d_descriptor(
                    plan.x,
                    nchw,
                    f32t,
                    [i(p.n), i(p.c), i(p.h), i(p.w)],
                )
                .map_err(|e| err("cudnnSetTensor4dDescriptor x", e))?;
                result::set_tensor4d_descriptor(
                    plan.y,
                    nchw,
                    f32t,
                    [i(p.n), i(p.k), i(p.out_h), i(p.out_w)],
                )
                .map_err(|e| err("cudnnSetTensor4dDescriptor y", e))?;
                result::set_filter4d_descriptor(
                    plan.w,
                    f32t,
                    nchw,
                    [i(p.k), i(p.c), i(p.r), i(p.s)],
                )
                .map_err(|e| err("cudnnSetFilter4dDescriptor", e))?;
                result::set_convolution2d_descriptor(
                    plan.conv,
                    i(p.pad_top),
                    i(p.pad_left),
                    i(p.stride_h),
                    i(p.stride_w),
                    1,
                    1,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    f32t,
                )
                .map_err(|e| err("cudnnSetConvolution2dDescriptor", e))?;
                result::set_convolution_math_type(plan.conv, fma)
                    .map_err(|e| err("cudnnSetConvolutionMathType", e))?;
            }
            let ok = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
            // The descriptor's FMA math type governs execution; a result may
            // still report DEFAULT_MATH (as PyTorch notes), so only tensor-op
            // results are refused.
            let tensor_op = |m: sys::cudnnMathType_t| {
                matches!(
                    m,
                    sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
                        | sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
                )
            };
            let mut count = 0i32;
            // SAFETY: valid handle and descriptors; the perf arrays have the
            // requested number of entries and cuDNN writes `count` of them.
            unsafe {
                let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; 8] = std::mem::zeroed();
                sys::cudnnFindConvolutionForwardAlgorithm(
                    self.handle,
                    plan.x,
                    plan.w,
                    plan.conv,
                    plan.y,
                    8,
                    &mut count,
                    perf.as_mut_ptr(),
                )
                .result()
                .map_err(|e| err("cudnnFindConvolutionForwardAlgorithm", e))?;
                let best = perf[..count.max(0) as usize]
                    .iter()
                    .find(|r| r.status == ok && !tensor_op(r.mathType))
                    .ok_or("no FP32 (non-tensor-op) forward algorithm")?;
                plan.fwd = (best.algo, best.memory);

                let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; 6] = std::mem::zeroed();
                sys::cudnnFindConvolutionBackwardDataAlgorithm(
                    self.handle,
                    plan.w,
                    plan.y,
                    plan.conv,
                    plan.x,
                    6,
                    &mut count,
                    perf.as_mut_ptr(),
                )
                .result()
                .map_err(|e| err("cudnnFindConvolutionBackwardDataAlgorithm", e))?;
                let best = perf[..count.max(0) as usize]
                    .iter()
                    .find(|r| r.status == ok && !tensor_op(r.mathType))
                    .ok_or("no FP32 (non-tensor-op) backward-data algorithm")?;
                plan.bwd_data = (best.algo, best.memory);

                let mut perf: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; 7] = std::mem::zeroed();
                sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                    self.handle,
                    plan.x,
                    plan.y,
                    plan.conv,
                    plan.w,
                    7,
                    &mut count,
                    perf.as_mut_ptr(),
                )
                .result()
                .map_err(|e| err("cudnnFindConvolutionBackwardFilterAlgorithm", e))?;
                let best = perf[..count.max(0) as usize]
                    .iter()
                    .find(|r| r.status == ok && !tensor_op(r.mathType))
                    .ok_or("no FP32 (non-tensor-op) backward-filter algorithm")?;
                plan.bwd_filter = (best.algo, best.memory);
            }
            let ws = plan
                .fwd
                .1
                .max(plan.bwd_data.1)
                .max(plan.bwd_filter.1)
                .max(1);
            plan.ws = gpu.zeros::<u8>(ws).map_err(|e| e.to_string())?;
            Ok(plan)
        }
    }

    impl Drop for Dnn {
        fn drop(&mut self) {
            // SAFETY: the handle is live and dropped once.
            let _ = unsafe { result::destroy_handle(self.handle) };
        }
    }

    /// One layer's descriptors, chosen algorithms (with their workspace
    /// bytes) and workspace.
    pub struct Plan {
        handle: sys::cudnnHandle_t,
        x: sys::cudnnTensorDescriptor_t,
        y: sys::cudnnTensorDescriptor_t,
        w: sys::cudnnFilterDescriptor_t,
        conv: sys::cudnnConvolutionDescriptor_t,
        fwd: (sys::cudnnConvolutionFwdAlgo_t, usize),
        bwd_data: (sys::cudnnConvolutionBwdDataAlgo_t, usize),
        bwd_filter: (sys::cudnnConvolutionBwdFilterAlgo_t, usize),
        ws: CudaSlice<u8>,
    }

    fn ptr<T>(gpu: &CudaBackend, s: &CudaSlice<T>) -> *const c_void {
        s.device_ptr(gpu.stream()).0 as usize as *const c_void
    }

    fn ptr_mut<T>(gpu: &CudaBackend, s: &mut CudaSlice<T>) -> *mut c_void {
        s.device_ptr_mut(gpu.stream()).0 as usize as *mut c_void
    }

    const ALPHA: f32 = 1.0;
    const BETA: f32 = 0.0;

    impl Plan {
        pub fn forward(
            &mut self,
            gpu: &CudaBackend,
            x: &CudaSlice<f32>,
            w: &CudaSlice<f32>,
            y: &mut CudaSlice<f32>,
        ) {
            let ws = ptr_mut(gpu, &mut self.ws);
            // SAFETY: x, w, y were allocated with the descriptors' sizes;
            // the workspace holds at least the algorithm's bytes.
            unsafe {
                sys::cudnnConvolutionForward(
                    self.handle,
                    &ALPHA as *const f32 as *const c_void,
                    self.x,
                    ptr(gpu, x),
                    self.w,
                    ptr(gpu, w),
                    self.conv,
                    self.fwd.0,
                    ws,
                    self.fwd.1,
                    &BETA as *const f32 as *const c_void,
                    self.y,
                    ptr_mut(gpu, y),
                )
                .result()
                .expect("cudnnConvolutionForward")
            }
        }

        pub fn backward_data(
            &mut self,
            gpu: &CudaBackend,
            dy: &CudaSlice<f32>,
            w: &CudaSlice<f32>,
            dx: &mut CudaSlice<f32>,
        ) {
            let ws = ptr_mut(gpu, &mut self.ws);
            // SAFETY: as in forward.
            unsafe {
                sys::cudnnConvolutionBackwardData(
                    self.handle,
                    &ALPHA as *const f32 as *const c_void,
                    self.w,
                    ptr(gpu, w),
                    self.y,
                    ptr(gpu, dy),
                    self.conv,
                    self.bwd_data.0,
                    ws,
                    self.bwd_data.1,
                    &BETA as *const f32 as *const c_void,
                    self.x,
                    ptr_mut(gpu, dx),
                )
                .result()
                .expect("cudnnConvolutionBackwardData")
            }
        }

        pub fn backward_filter(
            &mut self,
            gpu: &CudaBackend,
            x: &CudaSlice<f32>,
            dy: &CudaSlice<f32>,
            dw: &mut CudaSlice<f32>,
        ) {
            let ws = ptr_mut(gpu, &mut self.ws);
            // SAFETY: as in forward.
            unsafe {
                sys::cudnnConvolutionBackwardFilter(
                    self.handle,
                    &ALPHA as *const f32 as *const c_void,
                    self.x,
                    ptr(gpu, x),
                    self.y,
                    ptr(gpu, dy),
                    self.conv,
                    self.bwd_filter.0,
                    ws,
                    self.bwd_filter.1,
                    &BETA as *const f32 as *const c_void,
                    self.w,
                    ptr_mut(gpu, dw),
                )
                .result()
                .expect("cudnnConvolutionBackwardFilter")
            }
        }
    }

    impl Drop for Plan {
        fn drop(&mut self) {
            // SAFETY: descriptors created in `plan`, destroyed once.
            unsafe {
                let _ = result::destroy_tensor_descriptor(self.x);
                let _ = result::destroy_tensor_descriptor(self.y);
                let _ = result::destroy_filter_descriptor(self.w);
                let _ = result::destroy_convolution_descriptor(self.conv);
            }
        }
    }
}

/// See the module docs (`gpu_step`).
fn training_steps(c: &mut Criterion, env: &Env) {
    use kestrel::backend::GpuBackend;
    use kestrel::train::Targets;
    let mut g = c.benchmark_group("gpu_step");
    g.sample_size(10)
        .warm_up_time(env.warm_up)
        .measurement_time(env.measure);
    // (network, batch, samples per fit call: one step, or a CIFAR-10 epoch)
    let cases = [
        ("keras-cnn", 32, 32, "step"),
        ("elu-cnn", 32, 32, "step"),
        ("elu-cnn", 128, 128, "step"),
        ("keras-cnn", 32, 50_000, "epoch"),
        ("elu-cnn", 32, 50_000, "epoch"),
        ("elu-cnn", 128, 50_000, "epoch"),
    ];
    for (net, batch, samples, what) in cases {
        let id = format!("{net}.{what}.b{batch}");
        if !env.wanted("gpu_step", &id) {
            continue;
        }
        if env.emulated && what == "epoch" {
            println!(
                "smoke gpu_step/{id}: skipped on the emulated device (an epoch takes an hour there)"
            );
            continue;
        }
        let backend = match GpuBackend::new(0) {
            Ok(b) => b,
            Err(e) => {
                println!("gpu_step/{id}: the CUDA backend did not open ({e}); skipped");
                continue;
            }
        };
        let mut m = if net == "keras-cnn" {
            nets::keras_cnn(backend)
        } else {
            nets::elu_cnn(backend)
        };
        let x = data(1, samples * 3 * 32 * 32);
        let y = one_hot(samples, 10);
        g.throughput(Throughput::Elements(samples as u64));
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| {
                m.fit(&x, Targets::Dense(&y), nets::one_epoch(batch))
                    .unwrap()
            })
        });
    }
    g.finish();
    captured_steps(c, env);
}

/// Steps per fit call of the captured-vs-uncaptured rows: enough that the
/// first (uncaptured) step and the one capture of each call are a few
/// percent of it. On the emulated device a smoke run of 3.
const CAPTURED_STEPS: usize = 50;

/// `gpu_step_graph`: the keras-cnn training step at batch 32 replayed from
/// one CUDA graph (`FitOptions::cuda_graph`, the default) beside the same
/// steps with every op launched (`--no-cuda-graph`), `CAPTURED_STEPS` full
/// batches per fit call (data resident on the device between steps, the
/// batch uploaded into fixed buffers before each one). Throughput is in
/// samples; the time per step is the time over `CAPTURED_STEPS`. Each call
/// includes one uncaptured step and one capture, as every `fit` does.
/// PyTorch's eager and CUDA-graph rows of the same step are
/// `benches/pytorch_baseline.py --only step` (`keras-cnn.step.b32.rmsprop.
/// {eager,graph}`). `graph` and `direct` upload each batch through the
/// staged path (the default); `graph.plain_upload` is `graph` with the plain
/// upload (`--no-staged-upload`), the A/B of the staged upload.
fn captured_steps(c: &mut Criterion, env: &Env) {
    use kestrel::backend::GpuBackend;
    use kestrel::train::Targets;
    let mut g = c.benchmark_group("gpu_step_graph");
    g.sample_size(10)
        .warm_up_time(env.warm_up)
        .measurement_time(env.measure);
    let batch = 32;
    let steps = if env.emulated { 3 } else { CAPTURED_STEPS };
    for (mode, cuda_graph, staged) in [
        ("graph", true, true),
        ("direct", false, true),
        ("graph.plain_upload", true, false),
    ] {
        let id = format!("keras-cnn.steps{CAPTURED_STEPS}.b{batch}.{mode}");
        if !env.wanted("gpu_step_graph", &id) {
            continue;
        }
        let backend = match GpuBackend::new(0) {
            Ok(b) => b,
            Err(e) => {
                println!("gpu_step_graph/{id}: the CUDA backend did not open ({e}); skipped");
                continue;
            }
        };
        if env.emulated {
            println!("smoke gpu_step_graph/{id}: {steps} steps on the emulated device");
        }
        backend.set_staged_upload(staged);
        let mut m = nets::keras_cnn(backend);
        let samples = batch * steps;
        let x = data(1, samples * 3 * 32 * 32);
        let y = one_hot(samples, 10);
        g.throughput(Throughput::Elements(samples as u64));
        g.bench_function(BenchmarkId::new("kestrel", &id), |b| {
            b.iter(|| {
                let opts = kestrel::train::FitOptions {
                    cuda_graph,
                    ..nets::one_epoch(batch)
                };
                m.fit(&x, Targets::Dense(&y), opts).unwrap()
            })
        });
    }
    g.finish();
}

fn main() {
    if kestrel::cuda::driver_present() {
        ensure_baseline_libraries();
    }
    let env = match Env::open() {
        Ok(env) => env,
        Err(why) => {
            println!("kestrel GPU benches skipped: {why}");
            return;
        }
    };
    // An emulated device runs the benches only as criterion's smoke test
    // (`--test`: each routine once, nothing measured): its times are CPU
    // times and must never pass for GPU figures.
    if env.emulated && !std::env::args().any(|a| a == "--test") {
        println!(
            "kestrel GPU benches refused: {} is the emulated CUDA device, whose timings are CPU \
             times, never GPU figures (run with --test for a smoke run of every bench)",
            env.device
        );
        return;
    }
    env.header();
    let mut c = Criterion::default().configure_from_args();
    gemms(&mut c, &env);
    convs(&mut c, &env);
    pools(&mut c, &env);
    batchnorms(&mut c, &env);
    bias_grads(&mut c, &env);
    bias_adds(&mut c, &env);
    activations(&mut c, &env);
    dropouts(&mut c, &env);
    softmax_ce(&mut c, &env);
    optimizer_steps(&mut c, &env);
    training_steps(&mut c, &env);
    c.final_summary();
}
