//! The PTX modules built into the library, one per kernel file.

/// A PTX module compiled from `kernels/<name>.cu` by `ci/ptx`.
#[derive(Debug)]
pub struct KernelModule {
    /// The kernel file's stem, e.g. `"activation"`.
    pub name: &'static str,
    /// The PTX text.
    pub ptx: &'static str,
    /// The oldest device that can run it: the PTX's `.target sm_XY` line,
    /// which `ci/ptx` writes from the kernel file's `// kestrel-target:`
    /// declaration (default `compute_70`), read at compile time.
    pub min_compute_capability: (i32, i32),
    /// Whether the PTX targets an architecture-specific feature set
    /// (`.target sm_90a`, from `// kestrel-target: compute_90a`): such PTX
    /// loads only on that exact compute capability, not on newer devices.
    pub arch_specific: bool,
}

impl KernelModule {
    /// Whether a device of compute capability `cc` can load it: `cc` at
    /// least [`KernelModule::min_compute_capability`], and exactly it for an
    /// [`KernelModule::arch_specific`] module.
    pub fn loads_on(&self, cc: (i32, i32)) -> bool {
        if self.arch_specific {
            cc == self.min_compute_capability
        } else {
            cc >= self.min_compute_capability
        }
    }
}

/// The compute capability of a PTX text's `.target sm_XY` line (`sm_70` is
/// `(7, 0)`, `sm_90a` `(9, 0)`, `sm_100` `(10, 0)`), or `None` without one.
/// A `const fn`, so the built-in modules take it from their PTX at compile
/// time and no capability is written twice.
pub const fn ptx_target(ptx: &str) -> Option<(i32, i32)> {
    const KEY: &[u8] = b".target sm_";
    let b = ptx.as_bytes();
    let mut i = 0;
    while i + KEY.len() <= b.len() {
        // Only at the start of a line.
        if i == 0 || b[i - 1] == b'\n' {
            let mut k = 0;
            while k < KEY.len() && b[i + k] == KEY[k] {
                k += 1;
            }
            if k == KEY.len() {
                let mut j = i + k;
                let mut v: i32 = 0;
                while j < b.len() && b[j].is_ascii_digit() && v < 10_000 {
                    v = v * 10 + (b[j] - b'0') as i32;
                    j += 1;
                }
                if j == i + k || v < 10 {
                    return None;
                }
                return Some((v / 10, v % 10));
            }
        }
        i += 1;
    }
    None
}

/// Whether a PTX text's `.target sm_XY` line names an architecture-specific
/// target (`sm_90a`: a letter `a` after the digits), `false` without one.
pub const fn ptx_target_is_arch_specific(ptx: &str) -> bool {
    const KEY: &[u8] = b".target sm_";
    let b = ptx.as_bytes();
    let mut i = 0;
    while i + KEY.len() <= b.len() {
        if i == 0 || b[i - 1] == b'\n' {
            let mut k = 0;
            while k < KEY.len() && b[i + k] == KEY[k] {
                k += 1;
            }
            if k == KEY.len() {
                let mut j = i + k;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                return j < b.len() && b[j] == b'a';
            }
        }
        i += 1;
    }
    false
}

/// [`ptx_target`] of a built-in module's PTX; a PTX without a target is a
/// build error.
const fn target_of(ptx: &str) -> (i32, i32) {
    match ptx_target(ptx) {
        Some(cc) => cc,
        None => panic!("a kernels/ptx/*.ptx without a `.target sm_XY` line"),
    }
}

macro_rules! modules {
    ($($id:ident => $name:literal),* $(,)?) => {
        $(
            #[doc = concat!("`kernels/", $name, ".cu`.")]
            pub static $id: KernelModule = KernelModule {
                name: $name,
                ptx: include_str!(concat!("../../kernels/ptx/", $name, ".ptx")),
                min_compute_capability: target_of(include_str!(concat!(
                    "../../kernels/ptx/",
                    $name,
                    ".ptx"
                ))),
                arch_specific: ptx_target_is_arch_specific(include_str!(concat!(
                    "../../kernels/ptx/",
                    $name,
                    ".ptx"
                ))),
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
    STEP_CLOCK => "step_clock",
    CONV => "conv",
    CONV_IMPLICIT => "conv_implicit",
    GEMM => "gemm",
    GEMM_TF32 => "gemm_tf32",
    GEMM_V2 => "gemm_v2",
    GEMM_WGMMA => "gemm_wgmma",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_target_reads_the_target_line() {
        assert_eq!(ptx_target(".version 8.2\n.target sm_70\n"), Some((7, 0)));
        assert_eq!(ptx_target(".target sm_86\n"), Some((8, 6)));
        assert_eq!(ptx_target(".version 8.5\n.target sm_90a\n"), Some((9, 0)));
        assert_eq!(ptx_target(".target sm_100\n"), Some((10, 0)));
        // Not at the start of a line, no digits, no line: no target.
        assert_eq!(ptx_target("// .target sm_80\n"), None);
        assert_eq!(ptx_target(".target sm_\n"), None);
        assert_eq!(ptx_target(".version 8.2\n"), None);
        assert!(ptx_target_is_arch_specific(
            ".version 8.2\n.target sm_90a\n"
        ));
        assert!(!ptx_target_is_arch_specific(".target sm_90\n"));
        assert!(!ptx_target_is_arch_specific(".target sm_100\n"));
        assert!(!ptx_target_is_arch_specific("// .target sm_90a\n"));
    }

    #[test]
    fn every_module_takes_its_capability_from_its_own_ptx() {
        for m in MODULES {
            let line = m
                .ptx
                .lines()
                .find_map(|l| l.strip_prefix(".target sm_"))
                .unwrap_or_else(|| panic!("{}.ptx has no .target line", m.name));
            let digits: String = line.chars().take_while(char::is_ascii_digit).collect();
            let v: i32 = digits.parse().unwrap();
            assert_eq!(m.min_compute_capability, (v / 10, v % 10), "{}", m.name);
            // The default compute_70, or newer where a file declares it.
            assert!(m.min_compute_capability >= (7, 0), "{}", m.name);
        }
        // The tensor-core GEMM needs sm_80 (mma.sync with .tf32 operands),
        // and so does cp.async (kernels/async_copy.cuh).
        assert_eq!(GEMM_TF32.min_compute_capability, (8, 0));
        assert_eq!(GEMM_V2.min_compute_capability, (8, 0));
        assert_eq!(GEMM.min_compute_capability, (7, 0));
        // wgmma exists only in sm_90a's feature set: 9.0 exactly.
        assert_eq!(GEMM_WGMMA.min_compute_capability, (9, 0));
        assert!(GEMM_WGMMA.arch_specific);
        assert!(GEMM_WGMMA.loads_on((9, 0)));
        for cc in [(8, 0), (8, 9), (10, 0), (12, 0)] {
            assert!(!GEMM_WGMMA.loads_on(cc), "{cc:?}");
        }
        for m in MODULES.iter().filter(|m| m.name != "gemm_wgmma") {
            assert!(!m.arch_specific, "{}", m.name);
            assert!(m.loads_on((10, 0)) && m.loads_on((12, 0)), "{}", m.name);
        }
    }
}
