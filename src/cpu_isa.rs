//! Run-time choice of the CPU kernels' instruction set.
//!
//! The CPU backend's hot kernels (the GEMM micro-kernel first) come in up to
//! three builds: AVX-512 ([`Isa::Avx512`]: avx512f, with avx2 and fma), AVX2
//! with FMA ([`Isa::Avx2`]) and a portable one ([`Isa::Portable`]: plain Rust
//! that LLVM vectorizes for the compile target). The CPU is probed once
//! ([`Isa::detected`]); the level an op uses is [`Isa::current`]:
//!
//! 1. the calling thread's override, set by [`with_isa`] for the length of a
//!    closure (tests use it to run every level in one process);
//! 2. else the process level: the detected one, lowered by the environment
//!    variable `KESTREL_CPU_ISA=portable|avx2|avx512` (read once). Asking for
//!    a level the CPU lacks, or for an unknown one, prints a warning once and
//!    keeps the detected level: a setting only ever lowers it.
//!
//! An op reads [`Isa::current`] once, on the thread that calls it, and hands
//! the level down to its rayon tasks, so an override covers the whole call
//! however many threads run it.
//!
//! Results: within one level every op is bit-identical on any thread count.
//! Between levels they may differ in the last bits where a kernel's
//! summation differs (the portable GEMM multiplies and adds separately
//! where the SIMD ones fuse); each op's docs and tests state by how much.

use std::cell::Cell;
use std::fmt;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// An instruction-set level of the CPU kernels, lowest first (the order is
/// the `Ord`: a level may run on any CPU that has a higher one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// No intrinsics: plain Rust, vectorized by LLVM for the compile target.
    Portable,
    /// x86-64 with AVX2 and FMA: 8-lane `ymm` vectors, 16 registers.
    Avx2,
    /// x86-64 with AVX-512F (and AVX2, FMA): 16-lane `zmm` vectors, 32
    /// registers.
    Avx512,
}

/// Every level, lowest first.
pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

/// The environment variable that lowers the process level.
pub const ENV: &str = "KESTREL_CPU_ISA";

impl Isa {
    /// The level's name as `KESTREL_CPU_ISA` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a name as `KESTREL_CPU_ISA` takes it (case-insensitive,
    /// surrounding blanks ignored).
    pub fn parse(s: &str) -> Result<Isa> {
        let t = s.trim().to_ascii_lowercase();
        ALL.into_iter().find(|i| i.name() == t).ok_or_else(|| {
            Error::invalid(
                "cpu_isa",
                ENV,
                format!("unknown level {s:?} (expected portable, avx2 or avx512)"),
            )
        })
    }

    /// The highest level this CPU runs, probed once.
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(probe)
    }

    /// Every level this CPU runs, lowest first: what a test loops over.
    pub fn available() -> Vec<Isa> {
        ALL.into_iter().filter(|&i| i <= Isa::detected()).collect()
    }

    /// The process level: [`Isa::detected`], lowered by `KESTREL_CPU_ISA`.
    pub fn process() -> Isa {
        static PROCESS: OnceLock<Isa> = OnceLock::new();
        *PROCESS.get_or_init(|| {
            let detected = Isa::detected();
            match std::env::var(ENV) {
                Err(_) => detected,
                Ok(v) => match resolve_env(&v, detected) {
                    Ok(i) => i,
                    Err(msg) => {
                        eprintln!("kestrel: {msg}");
                        detected
                    }
                },
            }
        })
    }

    /// The level an op called on this thread now uses: the thread's
    /// [`with_isa`] override, else [`Isa::process`].
    pub fn current() -> Isa {
        OVERRIDE.get().unwrap_or_else(Isa::process)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the environment setting `value` gives on a CPU whose highest level
/// is `detected`; `Err` holds the warning (the caller then keeps
/// `detected`).
fn resolve_env(value: &str, detected: Isa) -> std::result::Result<Isa, String> {
    if value.trim().is_empty() {
        return Ok(detected);
    }
    match Isa::parse(value) {
        Err(e) => Err(format!("{e}; using {detected}")),
        Ok(want) if want > detected => Err(format!(
            "{ENV}={value} asks for {want}, which this CPU lacks (it runs up to {detected}); \
             using {detected} (the setting only lowers the level)"
        )),
        Ok(want) => Ok(want),
    }
}

fn probe() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if avx2 && is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Runs `f` compiled for `isa`'s instruction set (read by the caller with
/// [`Isa::current`], on its thread): plain Rust loops inside `f` (inlined
/// here) get that level's vector width from LLVM. Code whose arithmetic
/// does not depend on the vector width (integer work, element-wise
/// operations without FMA contraction, which Rust never does on its own)
/// gives the same bits at every level; only the speed differs.
#[inline(always)]
pub(crate) fn compiled_for<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match isa {
            // SAFETY: `Isa::current` never exceeds `Isa::detected`, which
            // requires avx512f, avx2 and fma for `Avx512` and avx2 and fma
            // for `Avx2`. (avx512bw/vl: every AVX-512 CPU with avx512f that
            // Rust's detection and ours meet, Skylake-X on, has them; they
            // are checked anyway.)
            Isa::Avx512 if avx512_bw_vl() => return unsafe { avx512(f) },
            // SAFETY: as above.
            Isa::Avx512 | Isa::Avx2 => return unsafe { avx2(f) },
            Isa::Portable => {}
        }
    }
    let _ = isa;
    f()
}

#[cfg(target_arch = "x86_64")]
fn avx512_bw_vl() -> bool {
    is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
}

thread_local! {
    static OVERRIDE: Cell<Option<Isa>> = const { Cell::new(None) };
}

/// Runs `f` with [`Isa::current`] set to `isa` on this thread (nested calls
/// restore the outer level when they return, or unwind). A level above
/// [`Isa::detected`] is an error, not a fallback: a test that asks for
/// AVX-512 must not silently check AVX2.
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> Result<R> {
    if isa > Isa::detected() {
        return Err(Error::invalid(
            "cpu_isa::with_isa",
            "isa",
            format!(
                "{isa} is not available on this CPU (it runs up to {})",
                Isa::detected()
            ),
        ));
    }
    struct Restore(Option<Isa>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.set(self.0);
        }
    }
    let _restore = Restore(OVERRIDE.replace(Some(isa)));
    Ok(f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_only_lowers() {
        assert_eq!(resolve_env("", Isa::Avx2), Ok(Isa::Avx2));
        assert_eq!(resolve_env("portable", Isa::Avx2), Ok(Isa::Portable));
        assert_eq!(resolve_env(" AVX2 ", Isa::Avx512), Ok(Isa::Avx2));
        let e = resolve_env("avx512", Isa::Avx2).unwrap_err();
        assert!(e.contains("lacks") && e.contains("using avx2"), "{e}");
        let e = resolve_env("sse9", Isa::Avx512).unwrap_err();
        assert!(e.contains("unknown level"), "{e}");
    }

    #[test]
    fn override_nests_and_restores() {
        let outer = Isa::current();
        with_isa(Isa::Portable, || {
            assert_eq!(Isa::current(), Isa::Portable);
            if let Some(&top) = Isa::available().last() {
                with_isa(top, || assert_eq!(Isa::current(), top)).unwrap();
            }
            assert_eq!(Isa::current(), Isa::Portable);
        })
        .unwrap();
        assert_eq!(Isa::current(), outer);
        if Isa::detected() < Isa::Avx512 {
            assert!(with_isa(Isa::Avx512, || ()).is_err());
        }
    }
}
