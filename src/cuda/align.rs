//! Whether device buffers start on a 16-byte boundary: the vector
//! (`*_vec4`) kernels move four floats per 16-byte access, which faults on
//! a GPU at an address that is not a multiple of 16. Fresh allocations are
//! always aligned (the driver hands out 256-byte aligned memory); a view
//! that starts 1, 2 or 3 floats into one is not. The families' `select`
//! take the answer to pick a version, and their `*_with` entry points
//! refuse a vector version on a misaligned buffer, naming it. Byte buffers
//! that a vector kernel moves four at a time (dropout's mask) need 4 bytes.

use cudarc::driver::DevicePtr;

use super::CudaBackend;
use crate::error::{Error, Result};

/// The bytes by which `buf` starts past a 16-byte boundary (0: aligned).
pub(crate) fn offset16<T>(gpu: &CudaBackend, buf: &impl DevicePtr<T>) -> u64 {
    offset_to(gpu, buf, 16)
}

/// The bytes by which `buf` starts past a multiple of `align` (a power of
/// two; 0: aligned).
pub(crate) fn offset_to<T>(gpu: &CudaBackend, buf: &impl DevicePtr<T>, align: u64) -> u64 {
    let (ptr, _record) = buf.device_ptr(gpu.stream());
    ptr % align
}

/// Whether every offset of `bufs` (from [`offset16`]) is 0.
pub(crate) fn all_aligned(bufs: &[(&str, u64)]) -> bool {
    bufs.iter().all(|&(_, off)| off == 0)
}

/// An [`Error::InvalidArgument`] from `op` naming `version` and the first
/// buffer of `bufs` that does not start on 16 bytes.
pub(crate) fn require_aligned(op: &'static str, version: &str, bufs: &[(&str, u64)]) -> Result<()> {
    match bufs.iter().find(|&&(_, off)| off != 0) {
        None => Ok(()),
        Some(&(name, off)) => Err(Error::invalid(
            op,
            "kernel",
            format!(
                "version {version} needs every buffer to start on a 16-byte boundary, \
                 but {name} starts {off} bytes past one (a view at an offset that is not \
                 a multiple of 4 floats): run a scalar version, or let the plain entry \
                 point pick one"
            ),
        )),
    }
}

/// [`require_aligned`] for byte buffers that a vector kernel moves four at
/// a time: `bufs` (offsets from [`offset_to`] with 4) must start on 4 bytes.
pub(crate) fn require_aligned4(
    op: &'static str,
    version: &str,
    bufs: &[(&str, u64)],
) -> Result<()> {
    match bufs.iter().find(|&&(_, off)| off != 0) {
        None => Ok(()),
        Some(&(name, off)) => Err(Error::invalid(
            op,
            "kernel",
            format!(
                "version {version} needs {name} to start on a 4-byte boundary (one 32-bit \
                 access per quad of bytes), but {name} starts {off} bytes past one (a view at \
                 an offset that is not a multiple of 4 bytes): run a scalar version, or let \
                 the plain entry point pick one"
            ),
        )),
    }
}
