//! The PTX modules built into the library, one per kernel file.

/// A PTX module compiled from `kernels/<name>.cu` by `ci/ptx`.
#[derive(Debug)]
pub struct KernelModule {
    /// The kernel file's stem, e.g. `"activation"`.
    pub name: &'static str,
    /// The PTX text.
    pub ptx: &'static str,
    /// The oldest device that can run it (the PTX target).
    pub min_compute_capability: (i32, i32),
}

macro_rules! modules {
    ($($id:ident => $name:literal),* $(,)?) => {
        $(
            #[doc = concat!("`kernels/", $name, ".cu`.")]
            pub static $id: KernelModule = KernelModule {
                name: $name,
                ptx: include_str!(concat!("../../kernels/ptx/", $name, ".ptx")),
                min_compute_capability: (7, 0),
            };
        )*
        /// Every module, for tools that list or preload them.
        pub static MODULES: &[&KernelModule] = &[$(&$id),*];
    };
}

modules! {
    ACTIVATION => "activation",
    BATCHNORM => "batchnorm",
    BIAS => "bias",
    DROPOUT => "dropout",
    POOL => "pool",
    LOSS => "loss",
    OPTIM => "optim",
    CONV => "conv",
    GEMM => "gemm",
}
