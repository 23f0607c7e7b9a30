//! CPU batch normalization (the rayon reference); semantics in the module
//! docs of [`super`].
//!
//! Per-channel reductions are split into fixed chunks of `CHUNK` samples,
//! each summed in f64, then combined in chunk order: the same bits on any
//! thread count, and accurate for `m` in the millions. Within a chunk, a
//! dense input (`spatial == 1`) sums each channel in sample order; a
//! spatial one sums each contiguous run into 32 interleaved f64
//! lanes (`ops::lanes`), one rayon task per channel, and gives the
//! same bits at every [`Isa`] level.

use std::ops::Range;

use rayon::prelude::*;

use super::BatchNorm;
use crate::cpu_isa::{Isa, compiled_for};
use crate::error::Result;
use crate::ops::lanes::{LANES, Term, add_run, fold};

/// Samples per partial sum.
const CHUNK: usize = 4096;

/// Calls `f(start, len)` for each contiguous run of element indices holding
/// samples `j0..j1` of channel `ch` (sample `j` is image `j / spatial`,
/// position `j % spatial`).
#[inline(always)]
fn runs(p: &BatchNorm, ch: usize, j0: usize, j1: usize, mut f: impl FnMut(usize, usize)) {
    let s = p.spatial;
    let mut j = j0;
    while j < j1 {
        let (img, off) = (j / s, j % s);
        let len = (s - off).min(j1 - j);
        f((img * p.c + ch) * s + off, len);
        j += len;
    }
}

/// `[sum of term's first value, sum of its second]` over the samples of
/// channel `ch` (`dy` is read only by [`Term::DyXhat`]). The order, fixed
/// by the shape alone (any thread count, any ISA level): samples are cut
/// into chunks of [`CHUNK`]; within a chunk each contiguous run adds into
/// `LANES` interleaved lanes (`ops::lanes`); a chunk's lanes are added in
/// lane order, and the chunk sums in chunk order.
fn channel_sums(isa: Isa, p: &BatchNorm, ch: usize, term: Term, x: &[f32], dy: &[f32]) -> [f64; 2] {
    let m = p.sample_size();
    let mut total = [0.0f64; 2];
    let mut j0 = 0;
    while j0 < m {
        let j1 = (j0 + CHUNK).min(m);
        let mut acc = [[0.0f64; LANES]; 2];
        runs(p, ch, j0, j1, |st, len| {
            let d = if dy.is_empty() { dy } else { &dy[st..st + len] };
            add_run(isa, term, &mut acc, &x[st..st + len], d)
        });
        for (t, a) in total.iter_mut().zip(&acc) {
            *t += fold(a);
        }
        j0 = j1;
    }
    total
}

/// Per-channel statistics of the training forward: `(mean, inv_std)` as
/// saved (f32) and the biased variance in f64.
struct ChannelStats {
    mean: f32,
    inv_std: f32,
    var: f64,
}

/// The training forward of one channel of a spatial input: mean, two-pass
/// variance, then `y` for each of the channel's runs `ys` (one per image,
/// in image order). The work of one channel stays in cache between its
/// three passes (128 KiB for keras-cnn's conv1 output at batch 32), where
/// the old per-pass sweeps over all channels went to memory each time.
#[inline(always)]
fn forward_channel_body(
    isa: Isa,
    p: &BatchNorm,
    ch: usize,
    x: &[f32],
    gamma: f32,
    beta: f32,
    ys: &mut [&mut [f32]],
) -> ChannelStats {
    let m = p.sample_size() as f64;
    let [sum, _] = channel_sums(isa, p, ch, Term::Sum, x, &[]);
    let mean64 = sum / m;
    // Two-pass variance: the sum of squared deviations from the f64 mean,
    // free of the cancellation that E[x^2] - E[x]^2 suffers.
    let [sq, _] = channel_sums(isa, p, ch, Term::SqDev(mean64), x, &[]);
    let var = sq / m;
    let (mean, istd) = (mean64 as f32, inv_std(var, p.epsilon));
    let s = p.spatial;
    for (img, yr) in ys.iter_mut().enumerate() {
        let xr = &x[(img * p.c + ch) * s..][..s];
        for (yv, &xv) in yr.iter_mut().zip(xr) {
            *yv = gamma * ((xv - mean) * istd) + beta;
        }
    }
    ChannelStats {
        mean,
        inv_std: istd,
        var,
    }
}

/// The backward of one channel of a spatial input: `dbeta`, `dgamma` (as
/// f64 sums, in one pass over `x` and `dy`), then `dx` for each run.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_channel_body(
    isa: Isa,
    p: &BatchNorm,
    ch: usize,
    x: &[f32],
    dy: &[f32],
    gamma: f32,
    mean: f32,
    istd: f32,
    dxs: &mut [&mut [f32]],
) -> (f64, f64) {
    let m = p.sample_size() as f64;
    let term = Term::DyXhat {
        mean,
        inv_std: istd,
    };
    let [sum_dy, sum_dy_xhat] = channel_sums(isa, p, ch, term, x, dy);
    let coef = gamma * istd;
    let (mdy, mdyx) = ((sum_dy / m) as f32, (sum_dy_xhat / m) as f32);
    let s = p.spatial;
    for (img, dxr) in dxs.iter_mut().enumerate() {
        let base = (img * p.c + ch) * s;
        for ((o, &xv), &dv) in dxr.iter_mut().zip(&x[base..][..s]).zip(&dy[base..][..s]) {
            *o = coef * ((dv - mdy) - ((xv - mean) * istd) * mdyx);
        }
    }
    (sum_dy, sum_dy_xhat)
}

/// [`forward_channel_body`] and [`backward_channel_body`] built for each
/// ISA level: the sums go through `ops::lanes::add_run` (explicit vectors
/// per level, the same bits at each), and the element-wise loops are plain
/// Rust whose vectors LLVM picks for the level's features; they multiply
/// and add separately (Rust never fuses them into FMAs on its own), so
/// every level gives the same bits.
macro_rules! channel_kernels {
    ($fwd:ident, $bwd:ident $(, $feat:literal)?) => {
        $(#[cfg(target_arch = "x86_64")] #[target_feature(enable = $feat)])?
        fn $fwd(
            isa: Isa,
            p: &BatchNorm,
            ch: usize,
            x: &[f32],
            gamma: f32,
            beta: f32,
            ys: &mut [&mut [f32]],
        ) -> ChannelStats {
            forward_channel_body(isa, p, ch, x, gamma, beta, ys)
        }

        $(#[cfg(target_arch = "x86_64")] #[target_feature(enable = $feat)])?
        #[allow(clippy::too_many_arguments)]
        fn $bwd(
            isa: Isa,
            p: &BatchNorm,
            ch: usize,
            x: &[f32],
            dy: &[f32],
            gamma: f32,
            mean: f32,
            istd: f32,
            dxs: &mut [&mut [f32]],
        ) -> (f64, f64) {
            backward_channel_body(isa, p, ch, x, dy, gamma, mean, istd, dxs)
        }
    };
}

channel_kernels!(forward_channel_portable, backward_channel_portable);
channel_kernels!(forward_channel_avx2, backward_channel_avx2, "avx2,fma");
channel_kernels!(
    forward_channel_avx512,
    backward_channel_avx512,
    "avx512f,avx2,fma"
);

/// The forward of channel `ch` at level `isa`.
fn forward_channel(
    isa: Isa,
    p: &BatchNorm,
    ch: usize,
    x: &[f32],
    gamma: f32,
    beta: f32,
    ys: &mut [&mut [f32]],
) -> ChannelStats {
    match isa {
        // SAFETY: `isa` comes from `Isa::current`, which never exceeds
        // `Isa::detected`, so the CPU has the features these enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { forward_channel_avx512(isa, p, ch, x, gamma, beta, ys) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { forward_channel_avx2(isa, p, ch, x, gamma, beta, ys) },
        _ => forward_channel_portable(isa, p, ch, x, gamma, beta, ys),
    }
}

/// The backward of channel `ch` at level `isa`.
#[allow(clippy::too_many_arguments)]
fn backward_channel(
    isa: Isa,
    p: &BatchNorm,
    ch: usize,
    x: &[f32],
    dy: &[f32],
    gamma: f32,
    mean: f32,
    istd: f32,
    dxs: &mut [&mut [f32]],
) -> (f64, f64) {
    match isa {
        // SAFETY: `isa` comes from `Isa::current`, which never exceeds
        // `Isa::detected`, so the CPU has the features these enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe {
            backward_channel_avx512(isa, p, ch, x, dy, gamma, mean, istd, dxs)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { backward_channel_avx2(isa, p, ch, x, dy, gamma, mean, istd, dxs) },
        _ => backward_channel_portable(isa, p, ch, x, dy, gamma, mean, istd, dxs),
    }
}

/// `out` cut into its per-channel runs: entry `ch` holds channel `ch`'s
/// `spatial` elements of every image, in image order, so that one task per
/// channel can write them.
fn channel_runs<'a>(p: &BatchNorm, out: &'a mut [f32]) -> Vec<Vec<&'a mut [f32]>> {
    let mut per: Vec<Vec<&mut [f32]>> = (0..p.c).map(|_| Vec::with_capacity(p.n)).collect();
    for (i, r) in out.chunks_mut(p.spatial).enumerate() {
        per[i % p.c].push(r);
    }
    per
}

/// Per-channel sums over the samples of a dense input (`[n, c]`,
/// `spatial == 1`): `terms` adds its terms of each chunk of [`CHUNK`]
/// samples, in order, into `acc[ch]` (one f64 accumulator per sum and
/// channel, `sums` sums); the chunks' partial sums are then added in chunk
/// order. So each channel's sum is a chain over its samples in order,
/// whatever the thread count. Rows are contiguous memory, so the terms run
/// along them in vectors, a tile of [`TILE`] channels at a time, then the
/// last `c % TILE` channels one by one (one task per channel would read
/// with a stride of `c`, and drown in scheduling for the small batches of
/// a dense layer). The closure is `#[inline(always)]`, as are the terms:
/// only code inlined into [`compiled_for`]'s instance is built for the
/// CPU's level.
fn dense_sums(p: &BatchNorm, sums: usize, terms: &impl DenseTerms) -> Vec<f64> {
    let (m, c) = (p.sample_size(), p.c);
    // Read here: the level is a per-thread setting, and rayon's threads
    // do not inherit it.
    let isa = Isa::current();
    let full = c - c % TILE;
    let chunk = |k: usize| {
        let mut acc = vec![0.0f64; sums * c];
        let rows = k * CHUNK..((k + 1) * CHUNK).min(m);
        compiled_for(
            isa,
            #[inline(always)]
            || {
                for col in (0..full).step_by(TILE) {
                    terms.add::<TILE>(&mut acc, c, col, rows.clone());
                }
                for col in full..c {
                    terms.add::<1>(&mut acc, c, col, rows.clone());
                }
            },
        );
        acc
    };
    let chunks = m.div_ceil(CHUNK);
    if chunks <= 1 {
        return chunk(0);
    }
    let partials: Vec<Vec<f64>> = (0..chunks).into_par_iter().map(chunk).collect();
    let mut total = vec![0.0f64; sums * c];
    for part in &partials {
        for (s, &v) in total.iter_mut().zip(part) {
            *s += v;
        }
    }
    total
}

/// Channels per tile of the dense sums: 16 f64 accumulators are four
/// `ymm` (two `zmm`) registers, which stay in registers while a chunk's
/// rows pass under them. Adding one row at a time into the whole
/// accumulator array instead loads and stores every accumulator once per
/// row, and those stores were the sums' limit (perf-log, third sitting).
const TILE: usize = 16;

/// The terms of one kind of dense sum: `add::<W>` adds, for the rows in
/// order, the terms of the channels `col..col + W` into their accumulators
/// (held in a `[f64; W]` meanwhile). A tile's accumulators see the rows in
/// order, so the sums' order (and bits) are those of a row-at-a-time loop.
trait DenseTerms: Sync {
    fn add<const W: usize>(&self, acc: &mut [f64], c: usize, col: usize, rows: Range<usize>);
}

/// `W` consecutive values of `v` from `at`, as an array.
#[inline(always)]
fn tile<T: Copy + Default, const W: usize>(v: &[T], at: usize) -> [T; W] {
    let mut t = [T::default(); W];
    t.copy_from_slice(&v[at..at + W]);
    t
}

/// `add::<W>` of a sum of one f64 term per element of x: `term(x, i)`
/// for the tile's channel `i`; the shape that [`SumX`] and
/// [`SquaredDeviations`] share.
#[inline(always)]
fn add_x_terms<const W: usize>(
    x: &[f32],
    acc: &mut [f64],
    c: usize,
    col: usize,
    rows: Range<usize>,
    term: impl Fn(f32, usize) -> f64,
) {
    let mut a: [f64; W] = tile(acc, col);
    for j in rows {
        let xr: [f32; W] = tile(x, j * c + col);
        for i in 0..W {
            a[i] += term(xr[i], i);
        }
    }
    acc[col..col + W].copy_from_slice(&a);
}

/// `sum x` (in f64): the mean's numerator.
struct SumX<'a> {
    x: &'a [f32],
}

impl DenseTerms for SumX<'_> {
    #[inline(always)]
    fn add<const W: usize>(&self, acc: &mut [f64], c: usize, col: usize, rows: Range<usize>) {
        add_x_terms::<W>(
            self.x,
            acc,
            c,
            col,
            rows,
            #[inline(always)]
            |v, _| v as f64,
        );
    }
}

/// `sum (x - mean)^2` (in f64): the two-pass variance's numerator.
struct SquaredDeviations<'a> {
    x: &'a [f32],
    mean: &'a [f64],
}

impl DenseTerms for SquaredDeviations<'_> {
    #[inline(always)]
    fn add<const W: usize>(&self, acc: &mut [f64], c: usize, col: usize, rows: Range<usize>) {
        let mu: [f64; W] = tile(self.mean, col);
        add_x_terms::<W>(
            self.x,
            acc,
            c,
            col,
            rows,
            #[inline(always)]
            |v, i| {
                let d = v as f64 - mu[i];
                d * d
            },
        );
    }
}

/// The backward's two sums: `sum dy` into `acc[ch]` and `sum dy * x_hat`
/// into `acc[c + ch]` (in f64), with `x_hat = (x - mean) * inv_std` in f32
/// as the forward computed it.
struct GradSums<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    mean: &'a [f32],
    inv_std: &'a [f32],
}

impl DenseTerms for GradSums<'_> {
    #[inline(always)]
    fn add<const W: usize>(&self, acc: &mut [f64], c: usize, col: usize, rows: Range<usize>) {
        let mut s_dy: [f64; W] = tile(acc, col);
        let mut s_dyx: [f64; W] = tile(acc, c + col);
        let (mu, is): ([f32; W], [f32; W]) = (tile(self.mean, col), tile(self.inv_std, col));
        for j in rows {
            let xr: [f32; W] = tile(self.x, j * c + col);
            let dr: [f32; W] = tile(self.dy, j * c + col);
            for i in 0..W {
                let x_hat = (xr[i] - mu[i]) * is[i];
                s_dy[i] += dr[i] as f64;
                s_dyx[i] += dr[i] as f64 * x_hat as f64;
            }
        }
        acc[col..col + W].copy_from_slice(&s_dy);
        acc[c + col..c + col + W].copy_from_slice(&s_dyx);
    }
}

/// Elements per parallel task of [`dense_rows`]: below twice this the rows
/// run on the calling thread (waking the pool costs more than 64K
/// elements of a row loop take).
const DENSE_TASK: usize = 1 << 15;

/// `row_fn(j, out_row)` for every sample `j` of a dense input, parallel
/// over blocks of rows when there are many.
fn dense_rows(p: &BatchNorm, out: &mut [f32], row_fn: impl Fn(usize, &mut [f32]) + Sync) {
    let (c, isa) = (p.c, Isa::current());
    if out.len() < 2 * DENSE_TASK || rayon::current_num_threads() == 1 {
        compiled_for(isa, || {
            for (j, o) in out.chunks_exact_mut(c).enumerate() {
                row_fn(j, o);
            }
        });
        return;
    }
    let rows = (DENSE_TASK / c).max(1);
    out.par_chunks_mut(rows * c)
        .enumerate()
        .for_each(|(t, blk)| {
            compiled_for(isa, || {
                for (jj, o) in blk.chunks_exact_mut(c).enumerate() {
                    row_fn(t * rows + jj, o);
                }
            })
        });
}

/// `out[idx] = f(ch, idx)` for every element of a spatial input, parallel
/// over images.
fn map_elements<F>(p: &BatchNorm, out: &mut [f32], f: F)
where
    F: Fn(usize, usize) -> f32 + Sync,
{
    let image = p.c * p.spatial;
    out.par_chunks_mut(image).enumerate().for_each(|(img, o)| {
        for ch in 0..p.c {
            let base = ch * p.spatial;
            for s in 0..p.spatial {
                o[base + s] = f(ch, img * image + base + s);
            }
        }
    });
}

/// `y = gamma * ((x - mean) * inv_std) + beta` along one dense row (the
/// per-element arithmetic of every path, in the same order).
#[inline(always)]
fn normalize_row(
    y: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    istd: &[f32],
) {
    for (((y, &xv), (&g, &b)), (&mu, &is)) in y
        .iter_mut()
        .zip(x)
        .zip(gamma.iter().zip(beta))
        .zip(mean.iter().zip(istd))
    {
        *y = g * ((xv - mu) * is) + b;
    }
}

/// `1 / sqrt(var + epsilon)` in f64, rounded once.
#[inline(always)]
fn inv_std(var: f64, epsilon: f32) -> f32 {
    (1.0 / (var + epsilon as f64).sqrt()) as f32
}

/// Training forward: normalizes `x` with its batch statistics into `y`
/// (fully overwritten), writes the per-channel `save_mean` and
/// `save_inv_std` (fully overwritten), and updates `running_mean` and
/// `running_var` in place (they are read, then written).
#[allow(clippy::too_many_arguments)]
pub fn forward_training(
    p: &BatchNorm,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    save_mean: &mut [f32],
    save_inv_std: &mut [f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
) -> Result<()> {
    p.check(
        "batchnorm.forward_training",
        &[("x", x.len()), ("y", y.len())],
        &[
            ("gamma", gamma.len()),
            ("beta", beta.len()),
            ("save_mean", save_mean.len()),
            ("save_inv_std", save_inv_std.len()),
            ("running_mean", running_mean.len()),
            ("running_var", running_var.len()),
        ],
    )?;
    let factor = p.variance_factor();
    let (mom, keep) = (p.momentum, 1.0 - p.momentum);
    let update_running = |ch: usize, var64: f64, rm: &mut [f32], rv: &mut [f32], sm: &[f32]| {
        let v = (var64 * factor) as f32;
        rm[ch] = rm[ch] * mom + sm[ch] * keep;
        rv[ch] = rv[ch] * mom + v * keep;
    };
    if p.spatial > 1 {
        let isa = Isa::current();
        let stats: Vec<ChannelStats> = channel_runs(p, y)
            .into_par_iter()
            .enumerate()
            .map(|(ch, mut ys)| forward_channel(isa, p, ch, x, gamma[ch], beta[ch], &mut ys))
            .collect();
        for (ch, st) in stats.iter().enumerate() {
            save_mean[ch] = st.mean;
            save_inv_std[ch] = st.inv_std;
            update_running(ch, st.var, running_mean, running_var, save_mean);
        }
        return Ok(());
    }
    let (m, c) = (p.sample_size() as f64, p.c);
    let mean64: Vec<f64> = dense_sums(p, 1, &SumX { x })
        .into_iter()
        .map(|s| s / m)
        .collect();
    // Two-pass variance, as in `forward_channel_body`.
    let var64: Vec<f64> = dense_sums(p, 1, &SquaredDeviations { x, mean: &mean64 })
        .into_iter()
        .map(|s| s / m)
        .collect();
    // In a zipped loop, so that the square roots and divisions (exact in
    // f64 whatever the vector width) run four or eight channels at a time.
    compiled_for(Isa::current(), || {
        for ((sm, si), (&mu, &var)) in save_mean
            .iter_mut()
            .zip(save_inv_std.iter_mut())
            .zip(mean64.iter().zip(&var64))
        {
            *sm = mu as f32;
            *si = inv_std(var, p.epsilon);
        }
    });
    for (ch, &var) in var64.iter().enumerate() {
        update_running(ch, var, running_mean, running_var, save_mean);
    }
    let (mean, istd) = (&*save_mean, &*save_inv_std);
    dense_rows(p, y, |j, yr| {
        normalize_row(yr, &x[j * c..][..c], gamma, beta, mean, istd)
    });
    Ok(())
}

/// Inference forward: normalizes `x` with the running statistics into `y`
/// (fully overwritten).
pub fn forward_inference(
    p: &BatchNorm,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    y: &mut [f32],
) -> Result<()> {
    p.check(
        "batchnorm.forward_inference",
        &[("x", x.len()), ("y", y.len())],
        &[
            ("gamma", gamma.len()),
            ("beta", beta.len()),
            ("running_mean", running_mean.len()),
            ("running_var", running_var.len()),
        ],
    )?;
    let istd: Vec<f32> = running_var
        .iter()
        .map(|&v| inv_std(v as f64, p.epsilon))
        .collect();
    if p.spatial == 1 {
        let c = p.c;
        dense_rows(p, y, |j, yr| {
            normalize_row(yr, &x[j * c..][..c], gamma, beta, running_mean, &istd)
        });
        return Ok(());
    }
    map_elements(p, y, |ch, i| {
        gamma[ch] * ((x[i] - running_mean[ch]) * istd[ch]) + beta[ch]
    });
    Ok(())
}

/// Backward through the training forward (batch statistics): writes `dx`,
/// `dgamma` and `dbeta` (all fully overwritten) from the forward's input
/// `x`, the incoming `dy`, `gamma`, and the `save_mean` / `save_inv_std`
/// the training forward wrote.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    p: &BatchNorm,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    save_mean: &[f32],
    save_inv_std: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    p.check(
        "batchnorm.backward",
        &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())],
        &[
            ("gamma", gamma.len()),
            ("save_mean", save_mean.len()),
            ("save_inv_std", save_inv_std.len()),
            ("dgamma", dgamma.len()),
            ("dbeta", dbeta.len()),
        ],
    )?;
    if p.spatial > 1 {
        let isa = Isa::current();
        let sums: Vec<(f64, f64)> = channel_runs(p, dx)
            .into_par_iter()
            .enumerate()
            .map(|(ch, mut dxs)| {
                let (mean, istd) = (save_mean[ch], save_inv_std[ch]);
                backward_channel(isa, p, ch, x, dy, gamma[ch], mean, istd, &mut dxs)
            })
            .collect();
        for (ch, &(s_dy, s_dyx)) in sums.iter().enumerate() {
            dbeta[ch] = s_dy as f32;
            dgamma[ch] = s_dyx as f32;
        }
        return Ok(());
    }
    // Both sums in one pass over x and dy (each accumulator still a chain
    // over the samples in order), x_hat exactly as the forward computed it.
    let c = p.c;
    let terms = GradSums {
        x,
        dy,
        mean: save_mean,
        inv_std: save_inv_std,
    };
    let sums = dense_sums(p, 2, &terms);
    let (sum_dy, sum_dy_xhat) = sums.split_at(c);
    let m = p.sample_size() as f64;
    let mut coef = vec![0.0f32; c];
    let mut mean_dy = vec![0.0f32; c];
    let mut mean_dy_xhat = vec![0.0f32; c];
    for ch in 0..c {
        dbeta[ch] = sum_dy[ch] as f32;
        dgamma[ch] = sum_dy_xhat[ch] as f32;
        coef[ch] = gamma[ch] * save_inv_std[ch];
        mean_dy[ch] = (sum_dy[ch] / m) as f32;
        mean_dy_xhat[ch] = (sum_dy_xhat[ch] / m) as f32;
    }
    dense_rows(p, dx, |j, dxr| {
        let (xr, dyr) = (&x[j * c..][..c], &dy[j * c..][..c]);
        for (((o, (&xv, &dv)), (&mu, &is)), ((&k, &mdy), &mdyx)) in dxr
            .iter_mut()
            .zip(xr.iter().zip(dyr))
            .zip(save_mean.iter().zip(save_inv_std))
            .zip(coef.iter().zip(&mean_dy).zip(&mean_dy_xhat))
        {
            let x_hat = (xv - mu) * is;
            *o = k * ((dv - mdy) - x_hat * mdyx);
        }
    });
    Ok(())
}
