//! Choosing a backend at run time.

use std::sync::Once;

use super::{CpuBackend, GpuBackend};
use crate::cuda;
use crate::error::Result;

/// Which device to run on (the CLI's `--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when a driver and a device are found, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA device `ordinal`; an error (never a fallback) when it cannot be
    /// opened.
    Cuda(usize),
}

impl std::fmt::Display for DeviceChoice {
    /// As `--device` takes it: `auto`, `cpu`, `cuda:N`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = crate::Error;

    /// `auto`, `cpu`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            crate::Error::invalid(
                "device",
                "device",
                format!("{s:?}: expected auto, cpu, cuda or cuda:N"),
            )
        };
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceChoice::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

/// Either backend, as [`select`] returns it. `Sequential<B>` is generic, so
/// run the same code on either with [`crate::with_backend!`]:
///
/// ```no_run
/// use kestrel::backend::{select, DeviceChoice};
/// use kestrel::nn::{Dense, Sequential};
/// let any = select(DeviceChoice::Auto)?;
/// let summary = kestrel::with_backend!(any, b => {
///     let mut m = Sequential::new(b, 42);
///     m.add(Dense::new(10));
///     m.build(&[4])?;
///     m.summary()
/// });
/// # Ok::<(), kestrel::Error>(())
/// ```
#[derive(Debug)]
pub enum AnyBackend {
    /// The CPU backend.
    Cpu(CpuBackend),
    /// The CUDA backend.
    Cuda(GpuBackend),
}

impl AnyBackend {
    /// Whether this is the CUDA backend.
    pub fn is_cuda(&self) -> bool {
        matches!(self, AnyBackend::Cuda(_))
    }

    /// The backend's name ("cpu", "cuda:0 (NVIDIA H100 ...)").
    pub fn name(&self) -> String {
        use super::Backend;
        match self {
            AnyBackend::Cpu(b) => b.name(),
            AnyBackend::Cuda(b) => b.name(),
        }
    }
}

/// Runs `$body` with `$b` bound to the backend inside an [`AnyBackend`]
/// (the body is compiled once per backend type): `with_backend!(any, b =>
/// expr)`. Both arms must give the same type.
#[macro_export]
macro_rules! with_backend {
    ($any:expr, $b:ident => $body:expr) => {
        match $any {
            $crate::backend::AnyBackend::Cpu($b) => $body,
            $crate::backend::AnyBackend::Cuda($b) => $body,
        }
    };
}

static ANNOUNCE: Once = Once::new();

/// Prints `msg` to stderr, once per process.
fn announce(msg: impl FnOnce() -> String) {
    ANNOUNCE.call_once(|| eprintln!("kestrel: {}", msg()));
}

fn describe(g: &GpuBackend) -> String {
    let i = g.device().info();
    format!(
        "using CUDA device {}: {} (compute capability {}, driver {}, {:.1} GiB)",
        i.ordinal,
        i.name,
        i.cc_string(),
        i.driver_string(),
        i.total_memory as f64 / (1u64 << 30) as f64
    )
}

/// Opens the backend `choice` names. `Auto` uses CUDA device 0 when a
/// driver and a device are found and the CPU otherwise, saying which once
/// per process on stderr (`kestrel: no CUDA driver found; using the CPU
/// backend`). `Cuda(n)` without a driver or device `n` is an error naming
/// what is missing and saying that `--device cpu` (or `auto`) runs on the
/// CPU.
pub fn select(choice: DeviceChoice) -> Result<AnyBackend> {
    match choice {
        DeviceChoice::Cpu => Ok(AnyBackend::Cpu(CpuBackend)),
        DeviceChoice::Cuda(n) => {
            let g = GpuBackend::new(n).map_err(|e| match e {
                crate::Error::Cuda {
                    kernel,
                    compute_capability,
                    driver,
                    msg,
                } => crate::Error::Cuda {
                    kernel,
                    compute_capability,
                    driver,
                    msg: format!(
                        "{msg}; `--device cpu` (or `--device auto`, which falls back to the \
                         CPU) runs on the CPU instead"
                    ),
                },
                other => other,
            })?;
            announce(|| describe(&g));
            Ok(AnyBackend::Cuda(g))
        }
        DeviceChoice::Auto => {
            if !cuda::driver_present() {
                announce(|| "no CUDA driver found; using the CPU backend".into());
                return Ok(AnyBackend::Cpu(CpuBackend));
            }
            match cuda::device_count() {
                Ok(0) => {
                    announce(|| "the CUDA driver sees no device; using the CPU backend".into());
                    Ok(AnyBackend::Cpu(CpuBackend))
                }
                Err(e) => {
                    announce(|| format!("CUDA is unusable ({e}); using the CPU backend"));
                    Ok(AnyBackend::Cpu(CpuBackend))
                }
                Ok(_) => match GpuBackend::new(0) {
                    Ok(g) => {
                        announce(|| describe(&g));
                        Ok(AnyBackend::Cuda(g))
                    }
                    Err(e) => {
                        announce(|| {
                            format!(
                                "CUDA device 0 could not be opened ({e}); using the CPU backend"
                            )
                        });
                        Ok(AnyBackend::Cpu(CpuBackend))
                    }
                },
            }
        }
    }
}
