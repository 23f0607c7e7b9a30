//! Kernel versions as data: every op family names its kernel versions in an
//! enum that implements [`KernelVersion`], has a `select(params, info)` that
//! picks one, and `*_with` entry points that run the version a caller names.
//! Tests and benches iterate [`KernelVersion::all`]; a new version is one
//! more variant (plus its `.cu`), in its family's folder only.
//!
//! Families with several versions (`ops::gemm::cuda::GemmKernel`,
//! `ops::conv::cuda::ConvAlgo`) write their enums by hand, because their
//! variants carry tile shapes and module lists; the one-module families
//! declare theirs with [`kernel_versions!`](crate::kernel_versions).

use super::{CudaBackend, DeviceInfo, KernelModule};
use crate::error::Result;

/// A version of an op family's kernels.
pub trait KernelVersion: Copy + std::fmt::Debug + Eq + 'static {
    /// Every version of the family, oldest first.
    fn all() -> &'static [Self];

    /// A short, stable name for messages, results and bench ids.
    fn name(self) -> &'static str;

    /// The PTX modules its kernels come from.
    fn modules(self) -> &'static [&'static KernelModule];

    /// The oldest device that runs it: the newest of its modules'
    /// [`KernelModule::min_compute_capability`] (from the PTX `.target`).
    fn min_compute_capability(self) -> (i32, i32) {
        self.modules()
            .iter()
            .map(|m| m.min_compute_capability)
            .max()
            .unwrap_or((0, 0))
    }

    /// Whether `info`'s device can run it: every module loads there
    /// ([`KernelModule::loads_on`]; an architecture-specific one only on its
    /// own compute capability).
    fn runs_on(self, info: &DeviceInfo) -> bool {
        self.modules()
            .iter()
            .all(|m| m.loads_on(info.compute_capability))
    }

    /// An error naming the version when `gpu`'s device cannot run it: the
    /// check every `*_with` entry point makes before launching.
    fn require(self, gpu: &CudaBackend) -> Result<()> {
        // An architecture-specific module first: its message (one exact
        // capability) is the true one also on an older device.
        let mut modules: Vec<_> = self.modules().to_vec();
        modules.sort_by_key(|m| !m.arch_specific);
        for m in modules {
            if !m.loads_on(gpu.info().compute_capability) {
                if m.arch_specific {
                    return gpu.require_module(self.name(), m);
                }
                return gpu.require_capability(self.name(), self.name(), m.min_compute_capability);
            }
        }
        Ok(())
    }
}

/// Declares a family's version enum whose versions each launch from one
/// PTX module, with its [`KernelVersion`] impl:
///
/// ```ignore
/// kernel_versions! {
///     /// The max-pooling kernels.
///     pub enum PoolKernel {
///         /// One thread per output, windows scanned in row-major order.
///         Direct => "maxpool_direct", POOL,
///     }
/// }
/// ```
#[macro_export]
#[doc(hidden)]
macro_rules! kernel_versions {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $vname:literal, $module:path, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every version, oldest first.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The PTX module the version's kernels come from.
            pub fn module(self) -> &'static $crate::cuda::KernelModule {
                match self {
                    $( $name::$variant => &$module, )+
                }
            }
        }

        impl $crate::cuda::KernelVersion for $name {
            fn all() -> &'static [Self] {
                Self::ALL
            }

            fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $vname, )+
                }
            }

            fn modules(self) -> &'static [&'static $crate::cuda::KernelModule] {
                match self {
                    $( $name::$variant => std::slice::from_ref({
                        static M: &$crate::cuda::KernelModule = &$module;
                        &M
                    }), )+
                }
            }
        }
    };
}
