//! The CUDA backend's host side: [`CudaBackend`], a handle on a context and
//! a stream (kestrel's own or a caller's), a lazy per-context cache of the
//! PTX modules built into the library, and launch helpers whose errors name
//! the kernel, the compute capability and the driver version.
//!
//! The driver is loaded at run time (cudarc's dynamic loading): building
//! kestrel needs no CUDA toolkit, and running it needs only the driver.
//! The PTX comes from `kernels/*.cu` through `ci/ptx` and is embedded here
//! with `include_str!`, so users need no compiler either.

pub(crate) mod align;
mod graph;
mod modules;
mod staging;
mod step_clock;
mod versions;

pub use graph::CapturedGraph;
pub use modules::*;
pub use staging::{STAGE_SLOTS, StagedUploader};
pub use step_clock::StepClock;
pub use versions::KernelVersion;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError,
    LaunchConfig, ValidAsZeroBits,
};

use crate::error::{Error, Result};

/// What the rest of the program needs to know about a device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// Ordinal as the driver counts devices.
    pub ordinal: usize,
    /// e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// (major, minor), e.g. (9, 0).
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub driver_version: i32,
    /// Device memory in bytes.
    pub total_memory: usize,
    /// Streaming multiprocessors, for sizing grid-stride launches.
    pub multiprocessors: u32,
}

impl DeviceInfo {
    /// "9.0".
    pub fn cc_string(&self) -> String {
        format!(
            "{}.{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }

    /// Whether this is kestrel's emulated CUDA device (`emu/`, the driver
    /// stand-in that CI tests the kernels on), not a GPU: its name says so,
    /// and its timings are never GPU figures.
    pub fn is_emulated(&self) -> bool {
        self.name.starts_with(EMULATED_DEVICE_PREFIX)
    }

    /// "13.0".
    pub fn driver_string(&self) -> String {
        format_driver_version(self.driver_version)
    }
}

/// How the emulated device's name begins (emu/runtime/driver.cpp).
pub const EMULATED_DEVICE_PREFIX: &str = "kestrel emulated CUDA device";

fn format_driver_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// An error from the driver before any device was opened.
fn driver_error(call: &str, e: impl std::fmt::Display) -> Error {
    Error::Cuda {
        kernel: call.to_string(),
        compute_capability: "unknown".into(),
        driver: driver_version().map_or("unknown".into(), format_driver_version),
        msg: e.to_string(),
    }
}

/// Whether a CUDA driver library can be loaded on this machine at all.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The driver's CUDA version (e.g. 13000), if a driver is present.
pub fn driver_version() -> Option<i32> {
    if !driver_present() {
        return None;
    }
    let mut v = 0i32;
    // SAFETY: cuDriverGetVersion writes one int and may be called before cuInit.
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (status == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(v)
}

/// How many CUDA devices the driver sees (0 when there is no driver).
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Ok(0);
    }
    cudarc::driver::result::init().map_err(|e| driver_error("cuInit", e))?;
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| driver_error("cuDeviceGetCount", e))
}

/// The modules loaded into one driver context, shared by every
/// [`CudaBackend`] on that context (see [`module_cache`]).
#[derive(Default)]
struct ContextModules {
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

/// A context's identity for the module caches: its device ordinal and its
/// driver handle. Two `CudaContext`s on one device's primary context (each
/// `CudaContext::new(0)` is a new object) share the handle, and so share
/// their modules, as the driver does.
type ContextKey = (usize, usize);

/// The process-wide module caches, one per driver context. The map holds
/// them weakly: the handles on a context hold its cache, and its modules
/// (which hold the context) are unloaded when the last handle goes, so a
/// caller's context is not kept alive by kestrel. While a cache is alive, a
/// handle on its context is too, so the driver cannot have reused the
/// context's handle for another context.
static MODULE_CACHES: LazyLock<Mutex<HashMap<ContextKey, Weak<ContextModules>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing in these maps is left half-written by a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The module cache of `ctx`'s driver context, shared with every other
/// handle on it.
fn module_cache(ctx: &CudaContext) -> Arc<ContextModules> {
    let key = (ctx.ordinal(), ctx.cu_ctx() as usize);
    let mut caches = lock(&MODULE_CACHES);
    if let Some(cache) = caches.get(&key).and_then(Weak::upgrade) {
        return cache;
    }
    caches.retain(|_, w| w.strong_count() > 0);
    let cache = Arc::new(ContextModules::default());
    caches.insert(key, Arc::downgrade(&cache));
    cache
}

/// A handle on one device for the `ops::*::cuda` wrappers: a context, the
/// stream every launch of the wrappers goes to, and the context's cache of
/// the PTX modules loaded so far.
///
/// Two ways to get one:
/// - [`CudaBackend::new`]: kestrel's own, which retains the device's
///   primary context, creates a stream of its own and turns off cudarc's
///   event tracking on its `CudaContext` object (every kestrel launch goes to
///   that one stream, so stream order is the synchronization);
/// - [`CudaBackend::from_stream`]: a framework's, wrapping the caller's
///   cudarc stream. The wrappers then enqueue on that stream, on the
///   caller's buffers (cudarc views of any `CudaSlice` of that context), and
///   the caller's context is used as it is (its event tracking included).
///
/// Every handle on one driver context shares one module cache (a
/// process-wide map keyed by the context): each PTX module is loaded into a
/// context once, whichever handle asks first ([`CudaBackend::loaded_modules`]
/// counts them). The modules are unloaded when the last handle on the
/// context is dropped.
///
/// # What waits for the device
///
/// The wrappers that return host values synchronize the stream: the loss
/// and metric functions returning `f64` (`ops::loss::cuda::softmax_cross_entropy`
/// and the rest without `_into`, `sum_f32`, and their `_alloc` forms), `ops::bias::cuda::sum_host` and
/// `sum_squares_host` (and `_alloc`), `CudaOptimizerState::download`, and
/// [`CudaBackend::download`] and [`CudaBackend::synchronize`]. Every other
/// `ops::*::cuda` function (GEMM, convolution, pooling, batch norm, dropout,
/// activations, bias, the `_into` losses, the optimizer step) only
/// enqueues work on the stream and returns: its results are ready once the
/// stream reaches that point, and its errors from inside a kernel are
/// reported by a later synchronizing call. Host-side work still happens at
/// the call: argument checks and the first use of a module loads it
/// (`cuModuleLoadData`). The batch-norm, bias and loss/metric wrappers
/// allocate nothing: their scratch comes from the caller
/// (`ops::batchnorm::cuda::BatchNormScratch`, `ops::bias::cuda::BiasScratch`,
/// `ops::loss::cuda::LossScratch`, each sized for given parameters by its
/// `lens`/`bytes`, allocated once by its `new` and checked on every call);
/// their `*_alloc` forms allocate and free one per call. The wrappers that
/// still allocate scratch themselves, on the stream, are the convolution
/// without a caller's workspace and the GEMM's split-batch partial sums
/// (stream-ordered where the device supports memory pools; the free is a
/// plain `cuMemFree`, which waits for the device, where it does not).
/// [`CudaBackend::upload`] copies from pageable host memory, so it returns
/// once the host data is staged.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Arc<ContextModules>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("info", &self.info)
            .field("stream", &self.stream.cu_stream())
            .finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal`: its primary context (a `CudaContext` object
    /// of kestrel's own, with cudarc's event tracking off) and a new stream
    /// on it; then as [`CudaBackend::from_stream`]. Fails (never panics)
    /// when there is no driver or no such device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(driver_error(
                "cuInit",
                "no CUDA driver library (libcuda.so.1) could be loaded",
            ));
        }
        let count = device_count()?;
        if ordinal >= count {
            return Err(driver_error(
                "cuDeviceGet",
                format!("device {ordinal} requested, but the driver sees {count} device(s)"),
            ));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: kestrel launches everything on the one stream below, so
        // stream order already serializes every read and write; cudarc's
        // per-buffer events would only add two driver calls per launch. The
        // flag belongs to this `CudaContext` object, which is kestrel's
        // alone (`CudaContext::new` makes a new one each time): a caller's
        // object on the same primary context keeps its own setting.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own, not the legacy default stream, so that
        // kestrel's work can overlap with other libraries' and be captured
        // into a CUDA graph.
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("cuStreamCreate", e))?;
        Self::from_stream(stream)
    }

    /// A handle that launches on the caller's `stream` (any stream of any
    /// context: a `new_stream`, the default or per-thread stream, or one
    /// wrapped from another library). The context is the stream's; the
    /// device's description is read from it. Nothing of the caller's is
    /// changed: not the context's settings (cudarc's event tracking stays
    /// as the caller set it, and the wrappers hold every buffer's cudarc
    /// guard across the launch that uses it, so tracking sees each use),
    /// not the stream. The module cache is the context's, shared with every
    /// other handle on it (see the type's docs).
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let attr = |a| {
            ctx.attribute(a)
                .map_err(|e| driver_error("cuDeviceGetAttribute", e))
        };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let info = DeviceInfo {
            ordinal: ctx.ordinal(),
            name: ctx.name().map_err(|e| driver_error("cuDeviceGetName", e))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(|e| driver_error("cuDeviceComputeCapability", e))?,
            driver_version: driver_version().unwrap_or(0),
            total_memory: ctx
                .total_mem()
                .map_err(|e| driver_error("cuDeviceTotalMem", e))?,
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
        };
        let modules = module_cache(&ctx);
        Ok(CudaBackend {
            ctx,
            stream,
            info,
            modules,
        })
    }

    /// How many of kestrel's PTX modules are loaded into this handle's
    /// context (by any handle on it).
    pub fn loaded_modules(&self) -> usize {
        lock(&self.modules.modules).len()
    }

    /// The device's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The context (the stream's).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream the wrappers launch on (the caller's, for a handle made by
    /// [`CudaBackend::from_stream`]).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// An [`Error::Cuda`] for `kernel` with this device's particulars.
    pub fn error(&self, kernel: &str, e: impl std::fmt::Display) -> Error {
        Error::Cuda {
            kernel: kernel.to_string(),
            compute_capability: self.info.cc_string(),
            driver: self.info.driver_string(),
            msg: e.to_string(),
        }
    }

    /// An [`Error::Cuda`] for `kernel` saying that `what` needs compute
    /// capability `needed`, unless this device has it: the one check behind
    /// module loads and the kernel-version entry points.
    pub fn require_capability(&self, kernel: &str, what: &str, needed: (i32, i32)) -> Result<()> {
        if self.info.compute_capability >= needed {
            return Ok(());
        }
        Err(self.error(
            kernel,
            format!(
                "{what} needs compute capability {}.{} or newer",
                needed.0, needed.1
            ),
        ))
    }

    /// An [`Error::Cuda`] for `kernel` unless this device can load `module`
    /// ([`KernelModule::loads_on`]): too old, or, for an architecture-specific
    /// module (sm_90a), any other compute capability than its own.
    pub fn require_module(&self, kernel: &str, module: &KernelModule) -> Result<()> {
        if !module.arch_specific {
            return self.require_capability(
                kernel,
                &format!("module {}", module.name),
                module.min_compute_capability,
            );
        }
        if module.loads_on(self.info.compute_capability) {
            return Ok(());
        }
        let (major, minor) = module.min_compute_capability;
        Err(self.error(
            kernel,
            format!(
                "module {} is built for sm_{major}{minor}a (architecture-specific PTX), which loads only on \
                 compute capability {major}.{minor} exactly",
                module.name
            ),
        ))
    }

    /// The function `name` of `module`, loading the module on first use.
    pub fn function(&self, module: &'static KernelModule, name: &str) -> Result<CudaFunction> {
        self.require_module(name, module)?;
        let m = {
            let mut cache = lock(&self.modules.modules);
            match cache.get(module.name) {
                Some(m) => m.clone(),
                None => {
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_src(module.ptx))
                        .map_err(|e| {
                            self.error(&format!("{} (loading module {})", name, module.name), e)
                        })?;
                    cache.insert(module.name, m.clone());
                    m
                }
            }
        };
        m.load_function(name).map_err(|e| self.error(name, e))
    }

    /// A grid-stride launch shape for `n` independent elements: enough
    /// blocks to fill the device a few times over, never more than needed.
    pub fn elementwise_config(&self, n: usize) -> LaunchConfig {
        const THREADS: u32 = 256;
        let needed = n.div_ceil(THREADS as usize).max(1);
        let cap = (self.info.multiprocessors.max(1) * 16) as usize;
        LaunchConfig {
            grid_dim: (needed.min(cap) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| self.error("cuMemcpyHtoD", e))
    }

    /// Copies a device buffer to a new host vector (synchronizes the stream).
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| self.error("cuMemcpyDtoH", e))
    }

    /// A zeroed device buffer.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(|e| self.error("cuMemAlloc", e))
    }

    /// Waits for every launch so far; reports asynchronous kernel faults.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| self.error("cuStreamSynchronize", e))
    }

    /// Maps a launch's result to an error naming the kernel.
    pub fn launched(
        &self,
        kernel: &str,
        r: std::result::Result<impl Sized, DriverError>,
    ) -> Result<()> {
        r.map(|_| ()).map_err(|e| self.error(kernel, e))
    }
}
