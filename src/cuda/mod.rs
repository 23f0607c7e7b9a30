//! The CUDA backend's host side: one context and stream per device, a lazy
//! cache of the PTX modules built into the library, and launch helpers whose
//! errors name the kernel, the compute capability and the driver version.
//!
//! The driver is loaded at run time (cudarc's dynamic loading): building
//! kestrel needs no CUDA toolkit, and running it needs only the driver.
//! The PTX comes from `kernels/*.cu` through `ci/ptx` and is embedded here
//! with `include_str!`, so users need no compiler either.

mod modules;

pub use modules::*;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// One device: its context, the stream every kestrel launch goes to, and the
/// modules loaded so far.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("info", &self.info)
            .finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal`. Fails (never panics) when there is no driver
    /// or no such device.
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
        // per-buffer events would only add two driver calls per launch.
        unsafe { ctx.disable_event_tracking() };
        let attr = |a| {
            ctx.attribute(a)
                .map_err(|e| driver_error("cuDeviceGetAttribute", e))
        };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let info = DeviceInfo {
            ordinal,
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
        // A stream of our own, not the legacy default stream, so that
        // kestrel's work can overlap with other libraries' and be captured
        // into a CUDA graph.
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("cuStreamCreate", e))?;
        Ok(CudaBackend {
            ctx,
            stream,
            info,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The device's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream kestrel launches on.
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

    /// The function `name` of `module`, loading the module on first use.
    pub fn function(&self, module: &'static KernelModule, name: &str) -> Result<CudaFunction> {
        let (major, minor) = self.info.compute_capability;
        if (major, minor) < module.min_compute_capability {
            return Err(self.error(
                name,
                format!(
                    "module {} needs compute capability {}.{} or newer",
                    module.name, module.min_compute_capability.0, module.min_compute_capability.1
                ),
            ));
        }
        let m = {
            let mut cache = self.modules.lock().unwrap_or_else(|p| p.into_inner());
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
