//! CPU GEMM: a blocked, packed (Goto/BLIS-style) kernel with micro-kernels
//! for AVX-512, AVX2+FMA and a portable fallback, chosen at run time
//! ([`crate::cpu_isa`]).
//!
//! Structure, outermost first, for one batch item:
//! - `op(A)` is packed once, whole, into `MR`-row panels per `kc` block of
//!   `k` (the transpose is absorbed here). It is shared by every task, and
//!   by every batch item when `stride_a == 0`.
//! - The output is cut into tasks, which rayon runs in parallel: column
//!   chunks of a few `NR`-wide panels spanning all rows (so that each packed
//!   slice of B serves the whole height of C), split further into row groups
//!   only when there are too few chunks for the threads. Each task walks all
//!   of `k` in `kc` blocks: it packs its `kc x width` slice of `op(B)` into
//!   `NR`-column panels (L2-resident), then, `MC` rows of packed A at a time
//!   (L2-resident), runs the `MR x NR` micro-kernel over every pair of A and
//!   B panels, with the B panel (`kc x NR`: 16 KiB for AVX2's 16 columns,
//!   32 KiB for AVX-512's 32) in L1. The C tile is prefetched before each
//!   micro-kernel call: its rows are `ldc` apart.
//! - Small problems (under `par_min_macs`) run on the calling thread; a
//!   batch of small products runs one item per thread. Scratch buffers are
//!   kept per thread, so small calls do not allocate.
//! - The micro-kernel's accumulators go to C through the epilogue: the
//!   first `kc` block applies `beta` (not reading C when `beta == 0`), the
//!   middle ones add, the last adds the bias and applies the activation.
//!
//! The micro-kernels ([`Kernel`], versions as data): [`Kernel::Avx512`]
//! (8 x 32, two `zmm` columns of accumulators per row), [`Kernel::Avx2`]
//! (6 x 16, the kernel every x86-64 machine ran before the AVX-512 one, kept
//! selectable) and [`Kernel::Portable`] (6 x 16, plain Rust).
//!
//! Determinism: the value of each element of C is a chain of FMAs over `kk`
//! in order within each `kc` block, the blocks added in order; the `kc`
//! blocking is a function of `k` alone (the same for every kernel), and
//! tasks only choose *which* elements a thread computes. So results are
//! bit-identical for any number of threads, and the AVX-512 and AVX2
//! kernels give the same bits as each other (same chain, wider vectors);
//! the portable kernel multiplies and adds separately (no FMA), so it
//! differs from them in the last bits (within `(k + 4) eps sum |a||b|`).

use std::cell::Cell;

use rayon::prelude::*;

use super::{Bias, Epilogue, Gemm, GradGemm, HostEpilogue, Operand};

/// The host bias.
type HostBias<'a> = Bias<&'a [f32]>;
use crate::cpu_isa::Isa;
use crate::error::{Error, Result};
use crate::ops::activation::cpu::by_kind;
use crate::ops::activation::{self, Activation, ActivationKind};

/// Largest `kc` block: a `kc x NR` panel of B is 16 KiB with 16 columns
/// (half of a 32 KiB L1d), 32 KiB with 32 (two thirds of a 48 KiB one). The
/// same for every kernel, so that the AVX2 and AVX-512 ones agree bitwise.
const KC: usize = 256;
/// Rows of C per task: a `MC x KC` block of packed A (~144 KiB) stays in L2.
/// A multiple of both kernels' `MR` (6 and 8).
const MC: usize = 144;
/// Default columns of C per task, by the kernel's `NR`: the packed B slice
/// (`kc x` these columns) is 128 KiB for the 16-column kernels (as before
/// the AVX-512 one), 512 KiB for the 32-column one, so that each block of
/// packed A brought into L2 serves 16 B panels before it is evicted (with
/// 128 columns, a large A came from L3 four times as often: 2048^3 ran at
/// the L3's pace).
const fn nc_task(nr: usize) -> usize {
    if nr >= 32 { 512 } else { 128 }
}
/// Below this many multiply-adds a call runs on the calling thread: the
/// point where starting a parallel loop costs about what it saves, which
/// depends on where the caller is ([`crate::cpu_pool`]). From a worker of
/// the pool 2^17 (~0.26 MFLOP, ~5 us on one core) pays: 32x100x300
/// 0.030-0.042 -> 0.020-0.033 ms, 32x1024x27 0.038-0.058 -> 0.022-0.034
/// (`docs/perf-log.md`); from any other thread 2^20 (~2 MFLOP, ~40 us).
fn par_min_macs() -> usize {
    if crate::cpu_pool::in_pool() {
        1 << 17
    } else {
        1 << 20
    }
}
/// The largest `MR * NR` of any kernel (the accumulator buffer's length).
const ACC_MAX: usize = 8 * 32;

/// A micro-kernel of the CPU GEMM: its register tile and the instruction
/// set it needs. [`gemm`] takes the one [`Kernel::for_isa`] gives for
/// [`Isa::current`]; [`gemm_with`] runs any one the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// 6 x 16, plain Rust (separate multiply and add), vectorized by LLVM
    /// for the compile target: what runs without AVX2+FMA.
    Portable,
    /// 6 x 16 with AVX2+FMA: 12 `ymm` accumulators, two B loads and six
    /// broadcasts per 12 FMAs. The previous version (the only SIMD kernel
    /// before the AVX-512 one), kept for comparison and for CPUs without
    /// AVX-512.
    Avx2,
    /// 8 x 32 with AVX-512F: 16 `zmm` accumulators, two B loads and eight
    /// broadcasts per 16 FMAs; eight rows fit the 32-row layers (a batch of
    /// 32, 32 conv channels) without a padded panel.
    Avx512,
}

impl Kernel {
    /// Every kernel, lowest instruction set first.
    pub const ALL: [Kernel; 3] = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512];

    /// The instruction set the kernel needs.
    pub fn isa(self) -> Isa {
        match self {
            Kernel::Portable => Isa::Portable,
            Kernel::Avx2 => Isa::Avx2,
            Kernel::Avx512 => Isa::Avx512,
        }
    }

    /// The best kernel for `isa`.
    pub fn for_isa(isa: Isa) -> Kernel {
        match isa {
            Isa::Portable => Kernel::Portable,
            Isa::Avx2 => Kernel::Avx2,
            Isa::Avx512 => Kernel::Avx512,
        }
    }

    /// The register tile, `(MR, NR)`: rows and columns of C per call.
    pub fn tile(self) -> (usize, usize) {
        match self {
            Kernel::Portable | Kernel::Avx2 => (6, 16),
            Kernel::Avx512 => (8, 32),
        }
    }

    /// The kernels this CPU runs, lowest first.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.isa() <= Isa::detected())
            .collect()
    }
}

/// Whether [`gemm`] uses a SIMD micro-kernel on this thread now (AVX2+FMA
/// or AVX-512; otherwise it runs the same code as [`gemm_portable`]).
pub fn uses_simd() -> bool {
    Isa::current() != Isa::Portable
}

/// `C = act(alpha * op(A) * op(B) + beta * C + bias)` on the host, for each
/// batch item; see the [module docs](super) for shapes and conventions.
///
/// Overwrites the `m x n` block of each batch item of `c` (reading it only
/// when `beta != 0`); elements between rows (`ldc > n`) and between batch
/// items are not touched. Uses the micro-kernel of [`Isa::current`]
/// (AVX-512, AVX2+FMA or portable), and rayon threads for large problems;
/// the result is bit-identical for any number of threads.
pub fn gemm(p: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], epi: HostEpilogue) -> Result<()> {
    run(p, a, b, c, epi, Kernel::for_isa(Isa::current()), true)
}

/// [`gemm`] on the calling thread only, never handing work to rayon: for
/// callers that already run one product per thread (the convolution's
/// per-image GEMMs), where a nested parallel loop would only add
/// hand-offs. The result is bit-identical to [`gemm`]'s (tasks choose
/// which elements a thread computes, never how).
pub fn gemm_serial(p: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], epi: HostEpilogue) -> Result<()> {
    run(p, a, b, c, epi, Kernel::for_isa(Isa::current()), false)
}

/// [`gemm`] with micro-kernel `kernel`; an error if the CPU lacks its
/// instruction set.
pub fn gemm_with(
    kernel: Kernel,
    p: &Gemm,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    epi: HostEpilogue,
) -> Result<()> {
    if kernel.isa() > Isa::detected() {
        return Err(Error::invalid(
            "gemm",
            "kernel",
            format!(
                "the {kernel:?} micro-kernel needs {}, which this CPU lacks (it runs up to {})",
                kernel.isa(),
                Isa::detected()
            ),
        ));
    }
    run(p, a, b, c, epi, kernel, true)
}

/// [`gemm`] with the portable (scalar, auto-vectorized) micro-kernel, which
/// is what runs on CPUs without AVX2+FMA. Exposed so that tests cover it on
/// every machine. Its results may differ from [`gemm`]'s in the last bits
/// (separate multiply and add instead of FMA).
pub fn gemm_portable(
    p: &Gemm,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    epi: HostEpilogue,
) -> Result<()> {
    run(p, a, b, c, epi, Kernel::Portable, true)
}

fn run(
    p: &Gemm,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    epi: HostEpilogue,
    kern: Kernel,
    may_parallel: bool,
) -> Result<()> {
    p.check(
        "gemm",
        a.len(),
        b.len(),
        c.len(),
        epi.bias.map(<[f32]>::len),
    )?;
    if p.batch == 0 || p.m == 0 || p.n == 0 {
        return Ok(());
    }
    if p.k == 0 {
        scale_only(p, c, epi);
        return Ok(());
    }
    match kern {
        Kernel::Portable | Kernel::Avx2 => run_tiled::<6, 16>(p, a, b, c, epi, kern, may_parallel),
        Kernel::Avx512 => run_tiled::<8, 32>(p, a, b, c, epi, kern, may_parallel),
    }
    Ok(())
}

/// [`run`] past the checks, for a kernel with an `MR x NR` tile.
fn run_tiled<const MR: usize, const NR: usize>(
    p: &Gemm,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    epi: HostEpilogue,
    kern: Kernel,
    may_parallel: bool,
) {
    debug_assert_eq!(kern.tile(), (MR, NR));
    let macs = p.m.saturating_mul(p.n).saturating_mul(p.k);
    // With one thread in the pool, a parallel loop would only hand the work
    // to that thread and wait for it (a wake-up per call): run it here.
    let threads = if may_parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let par_min = par_min_macs();
    let item_parallel = macs >= par_min && threads > 1;
    let plan = Plan::<MR, NR>::new(p, item_parallel);
    with_scratch(&SCRATCH_A, |shared_a| {
        // Packing A once for the whole batch when it is shared.
        let shared = p.batch == 1 || p.stride_a == 0;
        if shared {
            plan.pack_a(p, a, item_parallel, shared_a);
        }
        let shared_a = &*shared_a;
        let one = |bi: usize, c_item: &mut [f32], parallel: bool| {
            let b_item = &b[bi * p.stride_b..];
            if shared {
                plan.item(p, shared_a, b_item, c_item, &epi, kern, parallel);
            } else {
                with_scratch(&SCRATCH_A, |own| {
                    plan.pack_a(p, &a[bi * p.stride_a..], parallel, own);
                    plan.item(p, own, b_item, c_item, &epi, kern, parallel);
                });
            }
        };
        if p.batch == 1 {
            one(0, c, item_parallel);
        } else if !item_parallel && threads > 1 && macs.saturating_mul(p.batch) >= par_min {
            // Many small products: one thread per batch item. `check`
            // guarantees `stride_c >= m * ldc > 0`, so the chunks hold
            // disjoint items.
            c.par_chunks_mut(p.stride_c)
                .take(p.batch)
                .enumerate()
                .for_each(|(bi, ci)| one(bi, ci, false));
        } else {
            for bi in 0..p.batch {
                one(bi, &mut c[bi * p.stride_c..], item_parallel);
            }
        }
    });
}

thread_local! {
    /// Packed `op(A)`, reused across calls on the same thread.
    static SCRATCH_A: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// A task's packed slice of `op(B)`, likewise.
    static SCRATCH_B: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Buffers above this many floats are freed after use rather than kept.
const SCRATCH_KEEP: usize = 1 << 20;

/// Lends `f` the thread's scratch buffer. Taking it out (instead of
/// borrowing) keeps a nested call (rayon may run another GEMM's task on
/// this thread while this one waits) correct: that call just allocates.
fn with_scratch<R>(
    key: &'static std::thread::LocalKey<Cell<Vec<f32>>>,
    f: impl FnOnce(&mut Vec<f32>) -> R,
) -> R {
    let mut v = key.take();
    let r = f(&mut v);
    if v.capacity() <= SCRATCH_KEEP {
        key.set(v);
    }
    r
}

/// `k == 0`: `C = act(beta * C + bias)`.
fn scale_only(p: &Gemm, c: &mut [f32], epi: HostEpilogue) {
    for bi in 0..p.batch {
        for i in 0..p.m {
            let row = &mut c[bi * p.stride_c + i * p.ldc..][..p.n];
            for (j, v) in row.iter_mut().enumerate() {
                let prev = if p.beta == 0.0 { 0.0 } else { p.beta * *v };
                *v = epi.activation.apply(prev + bias_at(epi.bias, i, j));
            }
        }
    }
}

#[inline(always)]
fn bias_at(bias: HostBias, i: usize, j: usize) -> f32 {
    match bias {
        Bias::None => 0.0,
        Bias::PerRow(v) => v[i],
        Bias::PerCol(v) => v[j],
    }
}

/// The blocking of one call; all of it follows from the shape alone.
struct Plan<const MR: usize, const NR: usize> {
    /// Number of `kc` blocks and the size of all but the last.
    k_blocks: usize,
    kc: usize,
    /// `m` rounded up to whole `MR` panels.
    m_pad: usize,
    /// Output tiles, each run by one task: rows `r0..r1`, columns `c0..c1`.
    tasks: Vec<(usize, usize, usize, usize)>,
}

impl<const MR: usize, const NR: usize> Plan<MR, NR> {
    fn new(p: &Gemm, parallel: bool) -> Self {
        // Equal blocks rather than KC and a thin remainder. This is the only
        // choice that shapes the arithmetic, and it depends on k alone.
        let k_blocks = p.k.div_ceil(KC);
        let kc = p.k.div_ceil(k_blocks);
        let m_pad = p.m.div_ceil(MR) * MR;

        // Tasks span all rows where they can, so that each packed slice of B
        // serves the whole height of C; they are split into narrower column
        // chunks first, and into row groups only when that is not enough
        // for every thread to have a few tasks to balance.
        let want = if parallel {
            4 * rayon::current_num_threads()
        } else {
            1
        };
        let n_panels = p.n.div_ceil(NR);
        let mut chunk_panels = nc_task(NR) / NR;
        let mut m_groups = 1;
        while m_groups * n_panels.div_ceil(chunk_panels) < want {
            if chunk_panels > 1 {
                chunk_panels /= 2;
            } else if m_groups * 2 * MR <= p.m {
                m_groups *= 2;
            } else {
                break;
            }
        }
        let rows = (p.m.div_ceil(m_groups)).div_ceil(MR) * MR;
        let cols = chunk_panels * NR;
        let mut tasks = Vec::new();
        for r0 in (0..p.m).step_by(rows) {
            for c0 in (0..p.n).step_by(cols) {
                tasks.push((r0, (r0 + rows).min(p.m), c0, (c0 + cols).min(p.n)));
            }
        }
        Plan {
            k_blocks,
            kc,
            m_pad,
            tasks,
        }
    }

    /// `(start, len)` of `kc` block `kb`.
    fn k_block(&self, p: &Gemm, kb: usize) -> (usize, usize) {
        let k0 = kb * self.kc;
        (k0, self.kc.min(p.k - k0))
    }

    /// Packs all of `op(A)` into `out`: block `kb` starts at
    /// `kb * kc * m_pad` and holds `m_pad / MR` panels of `kcb x MR` (column
    /// `kk` of a panel contiguous), rows past `m` zero. Every element of the
    /// packed layout is written, so `out` may hold stale data.
    fn pack_a(&self, p: &Gemm, a: &[f32], parallel: bool, out: &mut Vec<f32>) {
        let blk_len = self.kc * self.m_pad;
        out.resize(blk_len * self.k_blocks, 0.0);
        let fill = |kb: usize, blk: &mut [f32]| {
            let (k0, kcb) = self.k_block(p, kb);
            // The last block may be shorter than kc: only its panels.
            let blk = &mut blk[..kcb * self.m_pad];
            for (ir, panel) in blk.chunks_exact_mut(kcb * MR).enumerate() {
                let i0 = ir * MR;
                let mr = MR.min(p.m - i0);
                if p.trans_a {
                    // op(A)[i][kk] = a[kk*lda + i]: each column of the panel
                    // is a contiguous run of A.
                    for (kk, dst) in panel.chunks_exact_mut(MR).enumerate() {
                        let src = &a[(k0 + kk) * p.lda + i0..][..mr];
                        dst[..mr].copy_from_slice(src);
                        dst[mr..].fill(0.0);
                    }
                } else if mr == MR {
                    let rows: [&[f32]; MR] =
                        std::array::from_fn(|ii| &a[(i0 + ii) * p.lda + k0..][..kcb]);
                    for (kk, dst) in panel.chunks_exact_mut(MR).enumerate() {
                        for (d, row) in dst.iter_mut().zip(&rows) {
                            *d = row[kk];
                        }
                    }
                } else {
                    panel.fill(0.0);
                    for ii in 0..mr {
                        let src = &a[(i0 + ii) * p.lda + k0..][..kcb];
                        for (dst, &v) in panel.chunks_exact_mut(MR).zip(src) {
                            dst[ii] = v;
                        }
                    }
                }
            }
        };
        if parallel && self.k_blocks > 1 {
            out.par_chunks_mut(blk_len)
                .enumerate()
                .for_each(|(kb, blk)| fill(kb, blk));
        } else {
            for (kb, blk) in out.chunks_mut(blk_len).enumerate() {
                fill(kb, blk);
            }
        }
    }

    /// One batch item: runs every task, in parallel or not.
    #[allow(clippy::too_many_arguments)]
    fn item(
        &self,
        p: &Gemm,
        packed_a: &[f32],
        b: &[f32],
        c: &mut [f32],
        epi: &HostEpilogue,
        kern: Kernel,
        parallel: bool,
    ) {
        let out = COut::new(c, p.ldc, p.m, p.n);
        let run = |&(r0, r1, c0, c1): &(usize, usize, usize, usize)| {
            let t = Task::<MR, NR> {
                plan: self,
                p,
                packed_a,
                b,
                out: &out,
                epi,
                rows: (r0, r1),
                cols: (c0, c1),
                isa: kern.isa(),
            };
            with_scratch(&SCRATCH_B, |bp| {
                bp.resize(self.kc * (c1 - c0).div_ceil(NR) * NR, 0.0);
                match kern {
                    // SAFETY: `Avx2` and `Avx512` run only where the CPU has
                    // their instruction sets (`Isa::current` and `gemm_with`
                    // never exceed `Isa::detected`); the tasks partition the
                    // m x n block of C, so no two calls get the same element.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe { task_avx2(&t, bp) },
                    // SAFETY: as above.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512 => unsafe { task_avx512(&t, bp) },
                    // Without x86-64 only the portable kernel is available
                    // (`Isa::detected` is `Portable`).
                    #[cfg(not(target_arch = "x86_64"))]
                    Kernel::Avx2 | Kernel::Avx512 => unreachable!("no x86-64 kernels here"),
                    // SAFETY: as above, for the tile.
                    Kernel::Portable => unsafe { t.run(bp, micro_portable::<MR, NR>) },
                }
            });
        };
        if parallel && self.tasks.len() > 1 {
            self.tasks.par_iter().for_each(run);
        } else {
            self.tasks.iter().for_each(run);
        }
    }
}

/// One task: rows `rows.0..rows.1`, columns `cols.0..cols.1` of C, over
/// all of `k`.
struct Task<'a, const MR: usize, const NR: usize> {
    plan: &'a Plan<MR, NR>,
    p: &'a Gemm,
    packed_a: &'a [f32],
    b: &'a [f32],
    out: &'a COut,
    epi: &'a HostEpilogue<'a>,
    rows: (usize, usize),
    cols: (usize, usize),
    /// The kernel's instruction set, for the epilogue's in-place activation.
    isa: Isa,
}

impl<const MR: usize, const NR: usize> Task<'_, MR, NR> {
    /// Whether the micro-kernel reads this task's full `NR`-column panels
    /// of B where they lie instead of from a packed copy. Packing a panel
    /// pays for itself when many row panels of A reuse it; with few (the
    /// mlp's batch of 32 is six 6-row panels) the copy of B was a quarter
    /// of the call (`docs/perf-log.md`). Only for `op(B) = B` (rows of B
    /// are the panel's rows), for the 16-column kernels (the 32-column one
    /// is not measured this way), and for row strides that do not pile the
    /// panel's rows into a few L1 sets (a multiple of 64 floats would put
    /// a `kc`-row panel in 16 sets or fewer). The same bits either way.
    fn b_in_place(&self) -> bool {
        let p = self.p;
        let row_panels = (self.rows.1 - self.rows.0).div_ceil(MR);
        NR == 16
            && !p.trans_b
            && row_panels <= B_IN_PLACE_MAX_ROW_PANELS
            && !p.ldb.is_multiple_of(64)
    }

    /// Runs the task with micro-kernel `micro`, packing B into `bp`.
    /// Inlined into [`task_avx2`] so that the packing and write-back loops
    /// are compiled for AVX2 too.
    ///
    /// # Safety
    /// No other thread may access the task's elements of C during the call.
    #[inline(always)]
    unsafe fn run(&self, bp: &mut [f32], micro: impl Fn(&[f32], &[f32], usize, &mut [f32])) {
        let (plan, p, out) = (self.plan, self.p, self.out);
        let ((r0, r1), (c0, c1)) = (self.rows, self.cols);
        let width = c1 - c0;
        let panels = width.div_ceil(NR);
        // Full panels read from B where it lies, or all packed.
        let in_place = if self.b_in_place() { width / NR } else { 0 };
        let mut acc_buf = [0.0f32; ACC_MAX];
        let acc = &mut acc_buf[..MR * NR];
        for kb in 0..plan.k_blocks {
            let (k0, kcb) = plan.k_block(p, kb);
            pack_b::<NR>(p, self.b, k0, kcb, c0, width, in_place, bp);
            let stage = Stage {
                alpha: p.alpha,
                beta: p.beta,
                first: kb == 0,
                last: kb + 1 == plan.k_blocks,
                bias: self.epi.bias,
                act: self.epi.activation,
                isa: self.isa,
            };
            let a_blk = &self.packed_a[kb * plan.kc * plan.m_pad..];
            // MC rows at a time, so that their packed A stays in L2 while
            // it meets every panel of the B slice.
            for ic in (r0..r1).step_by(MC) {
                let ic_end = (ic + MC).min(r1);
                for jp in 0..panels {
                    let j0 = c0 + jp * NR;
                    let (b_panel, ldb) = if jp < in_place {
                        (&self.b[k0 * p.ldb + j0..][..(kcb - 1) * p.ldb + NR], p.ldb)
                    } else {
                        (&bp[jp * kcb * NR..][..kcb * NR], NR)
                    };
                    let nr = NR.min(c1 - j0);
                    for i0 in (ic..ic_end).step_by(MR) {
                        let a_panel = &a_blk[i0 * kcb..][..kcb * MR];
                        let mr = MR.min(ic_end - i0);
                        // C's rows are far apart (ldc) and, for a large C,
                        // out of cache: ask for them now, so that they
                        // arrive while the micro-kernel runs.
                        out.prefetch(i0, j0, mr, nr);
                        micro(a_panel, b_panel, ldb, acc);
                        for r in 0..mr {
                            // SAFETY: in bounds (asserted by `row`); the
                            // caller owns this task's tile of C, and the
                            // slice is dropped before the next one is made.
                            let row = unsafe { out.row(i0 + r, j0, nr) };
                            stage.write(row, &acc[r * NR..][..nr], i0 + r, j0);
                        }
                    }
                }
            }
        }
    }
}

/// [`Task::b_in_place`]: at most this many row panels of A per task.
const B_IN_PLACE_MAX_ROW_PANELS: usize = 8;

/// [`Task::run`] with the AVX2+FMA micro-kernel, all compiled for AVX2.
///
/// # Safety
/// The CPU must support avx2 and fma; as for [`Task::run`] otherwise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2<const MR: usize, const NR: usize>(t: &Task<MR, NR>, bp: &mut [f32]) {
    assert_eq!((MR, NR), Kernel::Avx2.tile());
    // SAFETY: passed on from the caller (CPU features, exclusive tile).
    unsafe { t.run(bp, |a, b, ldb, acc| micro_avx2(a, b, ldb, acc)) }
}

/// [`Task::run`] with the AVX-512 micro-kernel, all compiled for AVX-512.
///
/// # Safety
/// The CPU must support avx512f, avx2 and fma; as for [`Task::run`]
/// otherwise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn task_avx512<const MR: usize, const NR: usize>(t: &Task<MR, NR>, bp: &mut [f32]) {
    assert_eq!((MR, NR), Kernel::Avx512.tile());
    // SAFETY: passed on from the caller (CPU features, exclusive tile).
    // B is always packed for the 32-column kernel (`Task::b_in_place`).
    unsafe { t.run(bp, |a, b, _, acc| micro_avx512(a, b, acc)) }
}

/// Packs `op(B)[k0..k0+kcb][c0..c0+width]` into `NR`-column panels of
/// `kcb x NR` (row `kk` of a panel contiguous), columns past `width` zero,
/// from panel `first` on (the ones before are read in place). Panel `jp`
/// starts at `jp * kcb * NR`, whichever is the first.
/// (Inlined so that it is compiled for the task's instruction set.)
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_b<const NR: usize>(
    p: &Gemm,
    b: &[f32],
    k0: usize,
    kcb: usize,
    c0: usize,
    width: usize,
    first: usize,
    bp: &mut [f32],
) {
    for (jp, panel) in bp.chunks_exact_mut(kcb * NR).enumerate().skip(first) {
        let j0 = jp * NR;
        if j0 >= width {
            break;
        }
        let nr = NR.min(width - j0);
        if p.trans_b {
            // op(B)[kk][j] = b[j*ldb + kk]: read rows of B, scatter into the
            // panel's columns (the panel is in L1).
            if nr < NR {
                panel.fill(0.0);
            }
            for jj in 0..nr {
                let src = &b[(c0 + j0 + jj) * p.ldb + k0..][..kcb];
                for (dst, &v) in panel.chunks_exact_mut(NR).zip(src) {
                    dst[jj] = v;
                }
            }
        } else if nr == NR {
            for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
                let src: &[f32; NR] = b[(k0 + kk) * p.ldb + c0 + j0..][..NR]
                    .try_into()
                    .expect("NR elements");
                dst.copy_from_slice(src);
            }
        } else {
            // Narrow edge (an output layer's 10 units, say): a fixed-length
            // loop rather than two libc calls of a few bytes per row.
            for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
                let src = &b[(k0 + kk) * p.ldb + c0 + j0..][..nr];
                for (jj, d) in dst.iter_mut().enumerate() {
                    *d = if jj < nr { src[jj] } else { 0.0 };
                }
            }
        }
    }
}

/// What the write-back of one `kc` block does.
struct Stage<'a> {
    alpha: f32,
    beta: f32,
    first: bool,
    last: bool,
    bias: HostBias<'a>,
    act: Activation,
    isa: Isa,
}

impl Stage<'_> {
    /// Folds one row of accumulators into `row` (row `i`, from column `j0`).
    #[inline(always)]
    fn write(&self, row: &mut [f32], acc: &[f32], i: usize, j0: usize) {
        let alpha = self.alpha;
        match (self.first, self.last) {
            // The common case of a long k: keep it a plain vector loop.
            (false, false) => {
                for (c, &s) in row.iter_mut().zip(acc) {
                    *c += alpha * s;
                }
            }
            (true, false) => {
                if self.beta == 0.0 {
                    for (c, &s) in row.iter_mut().zip(acc) {
                        *c = alpha * s;
                    }
                } else {
                    let beta = self.beta;
                    for (c, &s) in row.iter_mut().zip(acc) {
                        *c = alpha * s + beta * *c;
                    }
                }
            }
            (first, true) => {
                // beta == 0: C is not read, so NaN there cannot leak.
                if !first {
                    for (c, &s) in row.iter_mut().zip(acc) {
                        *c += alpha * s;
                    }
                } else if self.beta == 0.0 {
                    for (c, &s) in row.iter_mut().zip(acc) {
                        *c = alpha * s;
                    }
                } else {
                    let beta = self.beta;
                    for (c, &s) in row.iter_mut().zip(acc) {
                        *c = alpha * s + beta * *c;
                    }
                }
                finish_row(row, self.bias, self.act, self.isa, i, j0);
            }
        }
    }
}

/// Adds the bias and applies the activation to (part of) row `i` of C, in
/// one loop per case with the activation's kind fixed, so that each stays
/// simple (and vectorizes). Without a bias the activation runs in place
/// through [`activation::cpu::forward_chunk`], whose relu avoids the masked
/// stores that the plain in-place loop compiles to on AVX2.
#[inline(always)]
fn finish_row(row: &mut [f32], bias: HostBias, act: Activation, isa: Isa, i: usize, j0: usize) {
    match bias {
        Bias::None => {
            if act.kind != ActivationKind::Linear {
                activation::cpu::forward_chunk(isa, act, None, row);
            }
        }
        Bias::PerRow(v) => {
            let bi = v[i];
            by_kind!(act, |a| row.iter_mut().for_each(|c| *c = a.apply(*c + bi)));
        }
        Bias::PerCol(v) => {
            by_kind!(act, |a| for (c, &bj) in row.iter_mut().zip(&v[j0..]) {
                *c = a.apply(*c + bj);
            });
        }
    }
}

/// `acc = sum_kk a[kk] (x) b[kk]` over one pair of packed panels (`acc`
/// row-major `MR x NR`).
///
/// The portable micro-kernel: a fixed-size loop nest that LLVM vectorizes
/// for whatever the target offers (SSE2 on baseline x86-64, NEON, ...).
fn micro_portable<const MR: usize, const NR: usize>(
    a: &[f32],
    b: &[f32],
    ldb: usize,
    acc: &mut [f32],
) {
    let mut t = [[0.0f32; NR]; MR];
    for (kk, ap) in a.chunks_exact(MR).enumerate() {
        let bp = &b[kk * ldb..][..NR];
        for (ti, &av) in t.iter_mut().zip(ap) {
            for (tij, &bv) in ti.iter_mut().zip(bp) {
                *tij += av * bv;
            }
        }
    }
    for (dst, ti) in acc.chunks_exact_mut(NR).zip(&t) {
        dst.copy_from_slice(ti);
    }
}

/// `acc = sum_kk a[kk] (x) b[kk]` with AVX2+FMA: 12 ymm accumulators (6 rows
/// x 16 columns); per `kk`, two loads of B, six broadcasts of A and twelve
/// FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn micro_avx2(a: &[f32], b: &[f32], ldb: usize, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    const MR: usize = 6;
    const NR: usize = 16;
    let mut t = [[_mm256_setzero_ps(); 2]; MR];
    let kc = a.len() / MR;
    assert!(kc == 0 || b.len() >= (kc - 1) * ldb + NR);
    /// One k-step; `bp` points at 16 readable floats.
    #[inline(always)]
    unsafe fn step(t: &mut [[__m256; 2]; MR], ap: &[f32], bp: *const f32) {
        // SAFETY: the caller's promise of 16 floats at `bp`; loadu has no
        // alignment requirement. The caller has avx2 and fma, and this is
        // inlined into it.
        unsafe {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for (ti, &av) in t.iter_mut().zip(ap) {
                let av = _mm256_set1_ps(av);
                ti[0] = _mm256_fmadd_ps(av, b0, ti[0]);
                ti[1] = _mm256_fmadd_ps(av, b1, ti[1]);
            }
        }
    }
    // Four k-steps per trip, to keep the loop's own bookkeeping off the
    // FMA ports. Row kk of B is at `b[kk * ldb..]`: `ldb` is NR for a
    // packed panel, B's own row stride when it is read in place.
    let a4 = a.chunks_exact(4 * MR);
    let ar = a4.remainder();
    let mut bp = b.as_ptr();
    // SAFETY: rows 0..kc of B at `bp`, `ldb` apart, hold NR floats each
    // (asserted above); the pointer advances one row per k-step and is
    // read only for kk < kc.
    unsafe {
        for ap in a4 {
            for u in 0..4 {
                step(&mut t, &ap[u * MR..], bp.add(u * ldb));
            }
            bp = bp.wrapping_add(4 * ldb);
        }
        for ap in ar.chunks_exact(MR) {
            step(&mut t, ap, bp);
            bp = bp.wrapping_add(ldb);
        }
    }
    assert!(acc.len() >= MR * NR);
    for (dst, ti) in acc.chunks_exact_mut(NR).zip(&t) {
        // SAFETY: `dst` holds NR = 16 floats: two 8-lane stores.
        unsafe {
            _mm256_storeu_ps(dst.as_mut_ptr(), ti[0]);
            _mm256_storeu_ps(dst.as_mut_ptr().add(8), ti[1]);
        }
    }
}

/// `acc = sum_kk a[kk] (x) b[kk]` with AVX-512F: 16 zmm accumulators (8 rows
/// x 32 columns); per `kk`, two loads of B, eight broadcasts of A and
/// sixteen FMAs. Each element is the same chain of FMAs as in
/// [`micro_avx2`], so the two agree bitwise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn micro_avx512(a: &[f32], b: &[f32], acc: &mut [f32]) {
    use std::arch::x86_64::*;
    const MR: usize = 8;
    const NR: usize = 32;
    let mut t = [[_mm512_setzero_ps(); 2]; MR];
    #[inline(always)]
    fn step(t: &mut [[__m512; 2]; MR], ap: &[f32], bp: &[f32]) {
        assert!(ap.len() >= MR && bp.len() >= NR);
        // SAFETY: `bp` holds at least NR = 32 floats (asserted), so both
        // 16-lane loads are in bounds; loadu has no alignment requirement.
        // The caller has avx512f, and this is inlined into it.
        unsafe {
            let b0 = _mm512_loadu_ps(bp.as_ptr());
            let b1 = _mm512_loadu_ps(bp.as_ptr().add(16));
            for (ti, &av) in t.iter_mut().zip(ap) {
                let av = _mm512_set1_ps(av);
                ti[0] = _mm512_fmadd_ps(av, b0, ti[0]);
                ti[1] = _mm512_fmadd_ps(av, b1, ti[1]);
            }
        }
    }
    let (a4, b4) = (a.chunks_exact(4 * MR), b.chunks_exact(4 * NR));
    let (ar, br) = (a4.remainder(), b4.remainder());
    for (ap, bp) in a4.zip(b4) {
        for u in 0..4 {
            step(&mut t, &ap[u * MR..], &bp[u * NR..]);
        }
    }
    for (ap, bp) in ar.chunks_exact(MR).zip(br.chunks_exact(NR)) {
        step(&mut t, ap, bp);
    }
    assert!(acc.len() >= MR * NR);
    for (dst, ti) in acc.chunks_exact_mut(NR).zip(&t) {
        // SAFETY: `dst` holds NR = 32 floats: two 16-lane stores.
        unsafe {
            _mm512_storeu_ps(dst.as_mut_ptr(), ti[0]);
            _mm512_storeu_ps(dst.as_mut_ptr().add(16), ti[1]);
        }
    }
}

/// C of one batch item, shared by the tasks that each own a disjoint tile.
struct COut {
    ptr: *mut f32,
    len: usize,
    ldc: usize,
}

// SAFETY: `COut` is a view of a `&mut [f32]` that outlives it; the tasks that
// share it write disjoint elements (see `Plan::task`).
unsafe impl Send for COut {}
// SAFETY: as above.
unsafe impl Sync for COut {}

impl COut {
    fn new(c: &mut [f32], ldc: usize, m: usize, n: usize) -> Self {
        // `Gemm::check` made sure that the m x n block fits.
        assert!(m == 0 || (m - 1) * ldc + n <= c.len());
        COut {
            ptr: c.as_mut_ptr(),
            len: c.len(),
            ldc,
        }
    }

    /// Hints the cache to fetch rows `i..i+rows`, columns `j..j+len`.
    #[inline(always)]
    fn prefetch(&self, i: usize, j: usize, rows: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        for r in 0..rows {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let first = (i + r) * self.ldc + j;
            let last = first + len - 1;
            if last < self.len {
                // SAFETY: both addresses are inside the borrowed slice (and a
                // prefetch never faults anyway); nothing is read or written.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(self.ptr.add(first) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(self.ptr.add(last) as *const i8);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (i, j, rows, len);
    }

    /// Row `i`, columns `j..j+len`.
    ///
    /// # Safety
    /// No other reference to these elements may be live while the slice is.
    // Handing out `&mut` from `&self` is the point of this type: disjoint
    // tasks each take their own rows through one shared view.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    unsafe fn row(&self, i: usize, j: usize, len: usize) -> &mut [f32] {
        let start = i * self.ldc + j;
        assert!(start + len <= self.len);
        // SAFETY: in bounds of the borrowed slice (asserted); exclusivity is
        // the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Gradients of the linear part, `C = alpha * op(A) * op(B)` (each batch
/// item): `dA` from `dC * op(B)^T` and `dB` from `op(A)^T * dC`, both scaled
/// by `alpha`, each in the stored layout of its operand (transposed back
/// when `trans_a` / `trans_b`, with `lda` / `ldb` and the batch strides of
/// `A` / `B`). `dc` has C's layout (`ldc`, `stride_c`). Each is computed by
/// [`gemm`] calls, so it is as fast and as deterministic.
///
/// `da` and `db` must have the lengths of `a` and `b`. They are overwritten
/// where `A` / `B` hold elements; the gaps that the layout skips (between
/// rows when `lda` exceeds the row length, between batch items) are left
/// untouched. With `stride_a == 0` (one `A` shared by the batch) `dA` is the
/// **sum** over the batch items, as the gradient of a shared weight is;
/// likewise `dB` with `stride_b == 0`. The activation and bias of an
/// epilogue are not part of this: apply their backward to `dC` first.
pub fn gemm_backward(
    p: &Gemm,
    a: &[f32],
    b: &[f32],
    dc: &[f32],
    da: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) -> Result<()> {
    const OP: &str = "gemm_backward";
    p.check_backward(
        OP,
        a.len(),
        b.len(),
        dc.len(),
        da.as_ref().map(|d| d.len()),
        db.as_ref().map(|d| d.len()),
    )?;
    let pick = |o: Operand| match o {
        Operand::A => a,
        Operand::B => b,
        Operand::Dc => dc,
    };
    if let Some(da) = da {
        let g = p.grad_a();
        run_grad(&g, pick(g.x), pick(g.y), da)?;
    }
    if let Some(db) = db {
        let g = p.grad_b();
        run_grad(&g, pick(g.x), pick(g.y), db)?;
    }
    Ok(())
}

/// Runs one gradient plan into `out`.
fn run_grad(g: &GradGemm, x: &[f32], y: &[f32], out: &mut [f32]) -> Result<()> {
    let q = g.q;
    let epi = Epilogue::default();
    if !g.sum_over_batch {
        return gemm(&q, x, y, out, epi);
    }
    if q.batch == 0 {
        // No items: a shared operand's gradient is the empty sum, written
        // where the buffer holds a whole matrix (with no items the length
        // checks asked for none).
        if q.m > 0 && q.n > 0 && out.len() >= (q.m - 1) * q.ldc + q.n {
            for r in 0..q.m {
                out[r * q.ldc..][..q.n].fill(0.0);
            }
        }
        return Ok(());
    }
    // Shared operand: its gradient sums the items, in batch order.
    for bi in 0..q.batch {
        let qi = Gemm {
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            beta: if bi == 0 { 0.0 } else { 1.0 },
            ..q
        };
        gemm(&qi, &x[bi * q.stride_a..], &y[bi * q.stride_b..], out, epi)?;
    }
    Ok(())
}
