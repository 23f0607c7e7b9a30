//! The 16-byte vector kernels (`*_vec4`: `ActivationKernel::Vec4`, the
//! `*Vec4` versions of bias and batch norm, `PoolKernel::Vec4`'s backward,
//! `DropoutKernel::PhiloxVec4`, `OptimKernel::FusedVec4`) against their
//! scalar versions, on views that start 0 to 7 floats into their
//! allocations (so 4-, 8- and 12-byte misalignment, each buffer drawn on its
//! own; dropout's u8 mask 0 to 7 bytes in, which it needs on 4 bytes), with
//! lengths of 1, primes and others off every multiple of 4, in both layouts.
//!
//! For every op: the scalar version is held to the CPU reference; the plain
//! entry point (which picks its version by alignment) gives the scalar
//! version's bits; the vector version gives them too when every buffer is
//! aligned and is refused, naming the first misaligned buffer, when one is
//! not. Every output buffer carries guard values before and after its view,
//! which must survive (a quad written past the view's end would not be
//! caught by the memory checker: it stays inside the allocation).
mod common;

use common::*;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use kestrel::cuda::{CudaBackend, KernelVersion};
use kestrel::ops::activation::{self, Activation};
use kestrel::ops::batchnorm::{self, BatchNorm, VarianceMode};
use kestrel::ops::bias::{self, BiasShape};
use kestrel::ops::conv::Padding;
use kestrel::ops::dropout::{self, Dropout};
use kestrel::ops::optim::cuda::{CHUNK, CudaOptimizerState};
use kestrel::ops::optim::{self, Optimizer, OptimizerState};
use kestrel::ops::pool::{self, MaxPool2d};
use proptest::prelude::*;

/// The guard value around every view: a NaN payload no kernel computes.
const GUARD: f32 = f32::from_bits(0x7fc0_beef);
/// Guard elements after a view: more than a quad, so a vector store that
/// overruns by up to 3 floats lands on one.
const TAIL_GUARDS: usize = 5;

/// The activations: within a few ulp of Rust's libm (see gpu_activation.rs).
const ACT_TOL: Tol = Tol::new(1e-6, 1e-5);
/// Bias add: one f32 addition, correctly rounded on both sides.
const BIAS_TOL: Tol = Tol::new(0.0, 0.0);
/// Batch norm y and dx: a few f32 operations on statistics within one ulp
/// of the CPU's, inputs offset by up to 30 (see gpu_batchnorm.rs).
const BN_TOL: Tol = Tol::new(1e-5, 1e-5);

/// `vals` on the device `off` floats into a buffer of guards.
struct Placed {
    buf: CudaSlice<f32>,
    off: usize,
    len: usize,
}

impl Placed {
    fn new(gpu: &CudaBackend, off: usize, vals: &[f32]) -> Self {
        let mut host = vec![GUARD; off];
        host.extend_from_slice(vals);
        host.extend(std::iter::repeat_n(GUARD, TAIL_GUARDS));
        Placed {
            buf: gpu.upload(&host).unwrap(),
            off,
            len: vals.len(),
        }
    }

    /// `len` poison values at `off` (an output).
    fn poisoned(gpu: &CudaBackend, off: usize, len: usize) -> Self {
        Self::new(gpu, off, &vec![POISON; len])
    }

    fn view(&self) -> CudaView<'_, f32> {
        self.buf.slice(self.off..self.off + self.len)
    }

    fn view_mut(&mut self) -> CudaViewMut<'_, f32> {
        self.buf.slice_mut(self.off..self.off + self.len)
    }

    /// The view's contents, after checking that every guard survived.
    fn read(&self, gpu: &CudaBackend, what: &str) -> Result<Vec<f32>, String> {
        let all = gpu.download(&self.buf).unwrap();
        let (head, rest) = all.split_at(self.off);
        let (inside, tail) = rest.split_at(self.len);
        for (i, g) in head.iter().chain(tail).enumerate() {
            if g.to_bits() != GUARD.to_bits() {
                return Err(format!(
                    "{what}: guard {i} around the view (offset {}, len {}) overwritten with {g}",
                    self.off, self.len
                ));
            }
        }
        Ok(inside.to_vec())
    }
}

/// The guard byte around a mask view: neither 0 nor 1, which is all a
/// dropout kernel writes.
const MASK_GUARD: u8 = 0xA5;

/// Bytes on the device `off` bytes into a buffer of guards (a dropout mask).
struct PlacedMask {
    buf: CudaSlice<u8>,
    off: usize,
    len: usize,
}

impl PlacedMask {
    fn new(gpu: &CudaBackend, off: usize, vals: &[u8]) -> Self {
        let mut host = vec![MASK_GUARD; off];
        host.extend_from_slice(vals);
        // More than a 4-byte quad: a 32-bit store past the end lands on one.
        host.extend(std::iter::repeat_n(MASK_GUARD, 7));
        PlacedMask {
            buf: gpu.upload(&host).unwrap(),
            off,
            len: vals.len(),
        }
    }

    /// `len` bytes of 0xAA (neither 0 nor 1: an unwritten byte shows).
    fn poisoned(gpu: &CudaBackend, off: usize, len: usize) -> Self {
        Self::new(gpu, off, &vec![0xAA; len])
    }

    fn view(&self) -> CudaView<'_, u8> {
        self.buf.slice(self.off..self.off + self.len)
    }

    fn view_mut(&mut self) -> CudaViewMut<'_, u8> {
        self.buf.slice_mut(self.off..self.off + self.len)
    }

    /// The view's bytes as f32 (0.0 / 1.0), after checking the guards.
    fn read(&self, gpu: &CudaBackend) -> Result<Vec<f32>, String> {
        let all = gpu.download(&self.buf).unwrap();
        let (head, rest) = all.split_at(self.off);
        let (inside, tail) = rest.split_at(self.len);
        if let Some(i) = head.iter().chain(tail).position(|&b| b != MASK_GUARD) {
            return Err(format!(
                "mask: guard {i} around the view (offset {}, len {}) overwritten",
                self.off, self.len
            ));
        }
        Ok(inside.iter().map(|&b| b as f32).collect())
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The first buffer a vector version refuses, with the boundary it needs:
/// the first of `floats` (name, offset in floats) that does not start on 16
/// bytes, else the first of `bytes` (name, offset in bytes: dropout's mask)
/// that does not start on 4.
fn first_misaligned<'a>(
    floats: &[(&'a str, usize)],
    bytes: &[(&'a str, usize)],
) -> Option<(&'a str, &'static str)> {
    let f = floats.iter().find(|(_, off)| off % 4 != 0);
    let b = bytes.iter().find(|(_, off)| off % 4 != 0);
    f.map(|(n, _)| (*n, "16-byte"))
        .or(b.map(|(n, _)| (*n, "4-byte")))
}

/// The checks of the module docs for one op. `run(Some(k))` runs version
/// `k`, `run(None)` the plain entry point; each returns the output (guards
/// checked) or the entry point's error.
fn compare<K: KernelVersion>(
    what: &str,
    scalar: K,
    vec: K,
    bufs: &[(&str, usize)],
    reference: &[f64],
    tol: Tol,
    run: impl FnMut(Option<K>) -> Result<kestrel::Result<Vec<f32>>, String>,
) -> Result<(), String> {
    compare_mixed(what, scalar, vec, bufs, &[], reference, tol, run)
}

/// [`compare`] with byte buffers (`bytes`: name, offset in bytes) that the
/// vector version needs on 4-byte boundaries besides the float buffers.
#[allow(clippy::too_many_arguments)]
fn compare_mixed<K: KernelVersion>(
    what: &str,
    scalar: K,
    vec: K,
    bufs: &[(&str, usize)],
    bytes: &[(&str, usize)],
    reference: &[f64],
    tol: Tol,
    mut run: impl FnMut(Option<K>) -> Result<kestrel::Result<Vec<f32>>, String>,
) -> Result<(), String> {
    let s = run(Some(scalar))?.map_err(|e| format!("{what} on {}: {e}", scalar.name()))?;
    check_close(&format!("{what} ({})", scalar.name()), &s, reference, tol)?;
    let p = run(None)?.map_err(|e| format!("{what} on the plain entry point: {e}"))?;
    if bits(&p) != bits(&s) {
        return Err(format!(
            "{what}: the plain entry point's bits differ from {}'s ({bufs:?}): {p:?} vs {s:?}",
            scalar.name()
        ));
    }
    match (run(Some(vec))?, first_misaligned(bufs, bytes)) {
        (Ok(v), None) => {
            if bits(&v) != bits(&s) {
                let i = bits(&v)
                    .iter()
                    .zip(bits(&s))
                    .position(|(a, b)| *a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "{what}: {} differs from {} at {i}: {} vs {} ({bufs:?})",
                    vec.name(),
                    scalar.name(),
                    v[i],
                    s[i]
                ));
            }
        }
        (Ok(_), Some((name, _))) => {
            return Err(format!(
                "{what}: {} ran on a misaligned {name} ({bufs:?} {bytes:?})",
                vec.name()
            ));
        }
        (Err(e), None) => return Err(format!("{what} on {} (aligned): {e}", vec.name())),
        (Err(e), Some((name, boundary))) => {
            let msg = e.to_string();
            let needle = format!("but {name} starts");
            if !(msg.contains(vec.name()) && msg.contains(boundary) && msg.contains(&needle)) {
                return Err(format!(
                    "{what}: the refusal does not name {} and {name}: {msg}",
                    vec.name()
                ));
            }
        }
    }
    Ok(())
}

/// Element counts: 1 to 9 (all quad tails), primes, sizes off a multiple of
/// 4 and a few thousand (many quads per thread of the grid).
fn lens() -> BoxedStrategy<usize> {
    prop_oneof![
        1usize..=9,
        proptest::sample::select(&[11usize, 13, 31, 127, 257, 1021, 4099][..]),
        dim(300),
        1000usize..6000,
    ]
    .boxed()
}

/// Per-buffer offsets in floats: 0 and 4 aligned, the rest not.
fn offsets(k: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(
        prop_oneof![2 => Just(0usize), 1 => Just(4usize), 3 => 1usize..8],
        k,
    )
}

fn activations(alpha: f32) -> [Activation; 6] {
    [
        Activation::LINEAR,
        Activation::RELU,
        Activation::elu(alpha),
        Activation::leaky_relu(alpha),
        Activation::TANH,
        Activation::SIGMOID,
    ]
}

fn check_activation(
    gpu: &CudaBackend,
    act: Activation,
    len: usize,
    offs: &[usize],
    seed: u64,
) -> Result<(), String> {
    use activation::cpu;
    use activation::cuda::{self as ac, ActivationKernel as K};
    let mut x = data(seed, len, -5.0, 5.0);
    if len > 3 {
        x[len / 2] = f32::NAN;
        x[1] = 0.0;
    }
    let dy = data(seed ^ 1, len, -1.0, 1.0);
    let mut y = vec![0.0; len];
    cpu::forward(act, &x, &mut y).unwrap();
    let mut dx = vec![0.0; len];
    cpu::backward(act, &x, &y, &dy, &mut dx).unwrap();
    let (ox, oy, ody, odx) = (offs[0], offs[1], offs[2], offs[3]);
    let xd = Placed::new(gpu, ox, &x);
    let yd = Placed::new(gpu, oy, &y);
    let dyd = Placed::new(gpu, ody, &dy);
    let what = |s: &str| format!("{s} {act:?} len {len}");

    compare(
        &what("forward"),
        K::Elementwise,
        K::Vec4,
        &[("x", ox), ("y", oy)],
        &to_f64(&y),
        ACT_TOL,
        |k| {
            let mut out = Placed::poisoned(gpu, oy, len);
            let r = match k {
                Some(k) => ac::forward_with(gpu, k, act, &xd.view(), &mut out.view_mut()),
                None => ac::forward(gpu, act, &xd.view(), &mut out.view_mut()),
            };
            guard_ok(r.map(|_| Vec::new()), &out, gpu, "y")
        },
    )?;
    compare(
        &what("forward_inplace"),
        K::Elementwise,
        K::Vec4,
        &[("x", ox)],
        &to_f64(&y),
        ACT_TOL,
        |k| {
            let mut io = Placed::new(gpu, ox, &x);
            let r = match k {
                Some(k) => ac::forward_inplace_with(gpu, k, act, &mut io.view_mut()),
                None => ac::forward_inplace(gpu, act, &mut io.view_mut()),
            };
            guard_ok(r.map(|_| Vec::new()), &io, gpu, "x")
        },
    )?;
    let bufs = [("x", ox), ("y", oy), ("dy", ody), ("dx", odx)];
    compare(
        &what("backward"),
        K::Elementwise,
        K::Vec4,
        &bufs,
        &to_f64(&dx),
        ACT_TOL,
        |k| {
            let mut out = Placed::poisoned(gpu, odx, len);
            let r = match k {
                Some(k) => ac::backward_with(
                    gpu,
                    k,
                    act,
                    &xd.view(),
                    &yd.view(),
                    &dyd.view(),
                    &mut out.view_mut(),
                ),
                None => ac::backward(
                    gpu,
                    act,
                    &xd.view(),
                    &yd.view(),
                    &dyd.view(),
                    &mut out.view_mut(),
                ),
            };
            guard_ok(r.map(|_| Vec::new()), &out, gpu, "dx")
        },
    )?;
    let bufs = [("x", ox), ("y", oy), ("gradient", ody)];
    compare(
        &what("backward_inplace"),
        K::Elementwise,
        K::Vec4,
        &bufs,
        &to_f64(&dx),
        ACT_TOL,
        |k| {
            let mut g = Placed::new(gpu, ody, &dy);
            let r = match k {
                Some(k) => ac::backward_inplace_with(
                    gpu,
                    k,
                    act,
                    &xd.view(),
                    &yd.view(),
                    &mut g.view_mut(),
                ),
                None => ac::backward_inplace(gpu, act, &xd.view(), &yd.view(), &mut g.view_mut()),
            };
            guard_ok(r.map(|_| Vec::new()), &g, gpu, "gradient")
        },
    )?;
    let mut gc = dy.clone();
    if cpu::backward_from_output(act, &y, &mut gc).is_ok() {
        let bufs = [("y", oy), ("gradient", ody)];
        compare(
            &what("backward_from_output"),
            K::Elementwise,
            K::Vec4,
            &bufs,
            &to_f64(&gc),
            ACT_TOL,
            |k| {
                let mut g = Placed::new(gpu, ody, &dy);
                let r = match k {
                    Some(k) => {
                        ac::backward_from_output_with(gpu, k, act, &yd.view(), &mut g.view_mut())
                    }
                    None => ac::backward_from_output(gpu, act, &yd.view(), &mut g.view_mut()),
                };
                guard_ok(r.map(|_| Vec::new()), &g, gpu, "gradient")
            },
        )?;
    }
    Ok(())
}

/// An op's result as `compare` takes it: the entry point's error as is, or
/// the output buffer's view (its guards checked; a broken guard fails the
/// test at once).
fn guard_ok(
    r: kestrel::Result<Vec<f32>>,
    out: &Placed,
    gpu: &CudaBackend,
    what: &str,
) -> Result<kestrel::Result<Vec<f32>>, String> {
    match r {
        Err(e) => Ok(Err(e)),
        Ok(_) => out.read(gpu, what).map(Ok),
    }
}

/// Bias shapes in both layouts: dense with odd feature counts, NCHW with
/// odd planes (quads that straddle channels and images).
fn bias_shapes() -> impl Strategy<Value = (usize, usize, usize)> {
    prop_oneof![
        (dim(65), dim(67), Just(1usize)),
        (dim(9), dim(13), dim(50)),
        (
            dim(3),
            dim(3),
            proptest::sample::select(&[1usize, 3, 4, 7, 49, 196, 1023][..])
        ),
    ]
}

fn check_bias(gpu: &CudaBackend, p: BiasShape, offs: &[usize], seed: u64) -> Result<(), String> {
    use bias::cuda::{self as bc, BiasKernel as K};
    let len = p.len();
    let x = data(seed, len, -3.0, 3.0);
    let b = data(seed ^ 9, p.c, -1.0, 1.0);
    let mut y = vec![0.0; len];
    bias::cpu::add(&p, &x, &b, &mut y).unwrap();
    let (scalar, vec) = if p.spatial == 1 {
        (K::Columns, K::ColumnsVec4)
    } else {
        (K::ChannelBlocks, K::ChannelBlocksVec4)
    };
    let (ox, oy, ob) = (offs[0], offs[1], offs[2]);
    let xd = Placed::new(gpu, ox, &x);
    // b is read per element: any offset is fine, and it is not checked.
    let bd = Placed::new(gpu, ob, &b);
    compare(
        &format!("bias.add {p:?}"),
        scalar,
        vec,
        &[("x", ox), ("y", oy)],
        &to_f64(&y),
        BIAS_TOL,
        |k| {
            let mut out = Placed::poisoned(gpu, oy, len);
            let r = match k {
                Some(k) => bc::add_with(gpu, k, &p, &xd.view(), &bd.view(), &mut out.view_mut()),
                None => bc::add(gpu, &p, &xd.view(), &bd.view(), &mut out.view_mut()),
            };
            guard_ok(r.map(|_| Vec::new()), &out, gpu, "y")
        },
    )?;
    compare(
        &format!("bias.add_inplace {p:?}"),
        scalar,
        vec,
        &[("x", ox)],
        &to_f64(&y),
        BIAS_TOL,
        |k| {
            let mut io = Placed::new(gpu, ox, &x);
            let r = match k {
                Some(k) => bc::add_inplace_with(gpu, k, &p, &mut io.view_mut(), &bd.view()),
                None => bc::add_inplace(gpu, &p, &mut io.view_mut(), &bd.view()),
            };
            guard_ok(r.map(|_| Vec::new()), &io, gpu, "x")
        },
    )
}

fn check_batchnorm(
    gpu: &CudaBackend,
    p: BatchNorm,
    offs: &[usize],
    seed: u64,
) -> Result<(), String> {
    use batchnorm::cpu;
    use batchnorm::cuda::{self as bn, BatchNormKernel as K};
    let (len, c) = (p.len(), p.c);
    let x: Vec<f32> = data(seed, len, -2.0, 2.0)
        .iter()
        .map(|v| v + 20.0)
        .collect();
    let dy = data(seed ^ 1, len, -1.0, 1.0);
    let gamma = data(seed ^ 2, c, 0.5, 1.5);
    let beta = data(seed ^ 3, c, -0.5, 0.5);
    let rv0 = data(seed ^ 5, c, 0.5, 2.0);
    let (mut y, mut sm, mut sis, mut rm, mut rv) = (
        vec![0.0; len],
        vec![0.0; c],
        vec![0.0; c],
        vec![0.0; c],
        rv0.clone(),
    );
    cpu::forward_training(
        &p, &x, &gamma, &beta, &mut y, &mut sm, &mut sis, &mut rm, &mut rv,
    )
    .unwrap();
    let mut yi = vec![0.0; len];
    cpu::forward_inference(&p, &x, &gamma, &beta, &rm, &rv, &mut yi).unwrap();
    let (mut dx, mut dg, mut db) = (vec![0.0; len], vec![0.0; c], vec![0.0; c]);
    cpu::backward(&p, &x, &dy, &gamma, &sm, &sis, &mut dx, &mut dg, &mut db).unwrap();
    let (scalar, vec) = if p.spatial == 1 {
        (K::Columns, K::ColumnsVec4)
    } else {
        (K::ChannelBlocks, K::ChannelBlocksVec4)
    };
    let (ox, oy, ody, odx) = (offs[0], offs[1], offs[2], offs[3]);
    let up = |v: &[f32]| gpu.upload(v).unwrap();
    let (xd, dyd) = (Placed::new(gpu, ox, &x), Placed::new(gpu, ody, &dy));
    let (gd, bd, rmd, rvd, smd, sisd) =
        (up(&gamma), up(&beta), up(&rm), up(&rv), up(&sm), up(&sis));
    let mut scratch = bn::BatchNormScratch::new(gpu, &p).unwrap();
    compare(
        &format!("batchnorm.forward_training {p:?}"),
        scalar,
        vec,
        &[("x", ox), ("y", oy)],
        &to_f64(&y),
        BN_TOL,
        |k| {
            let mut out = Placed::poisoned(gpu, oy, len);
            let (mut m, mut is, mut rm, mut rv) = (
                gpu.zeros(c).unwrap(),
                gpu.zeros(c).unwrap(),
                gpu.zeros(c).unwrap(),
                up(&rv0),
            );
            let (mut m, mut is, mut rmv, mut rvv) = (
                m.as_view_mut(),
                is.as_view_mut(),
                rm.as_view_mut(),
                rv.as_view_mut(),
            );
            let r = match k {
                Some(k) => bn::forward_training_with(
                    gpu,
                    k,
                    &p,
                    &xd.view(),
                    &gd.as_view(),
                    &bd.as_view(),
                    &mut out.view_mut(),
                    &mut m,
                    &mut is,
                    &mut rmv,
                    &mut rvv,
                    &mut scratch,
                ),
                None => bn::forward_training(
                    gpu,
                    &p,
                    &xd.view(),
                    &gd.as_view(),
                    &bd.as_view(),
                    &mut out.view_mut(),
                    &mut m,
                    &mut is,
                    &mut rmv,
                    &mut rvv,
                    &mut scratch,
                ),
            };
            guard_ok(r.map(|_| Vec::new()), &out, gpu, "y")
        },
    )?;
    compare(
        &format!("batchnorm.forward_inference {p:?}"),
        scalar,
        vec,
        &[("x", ox), ("y", oy)],
        &to_f64(&yi),
        BN_TOL,
        |k| {
            let mut out = Placed::poisoned(gpu, oy, len);
            let r = match k {
                Some(k) => bn::forward_inference_with(
                    gpu,
                    k,
                    &p,
                    &xd.view(),
                    &gd.as_view(),
                    &bd.as_view(),
                    &rmd.as_view(),
                    &rvd.as_view(),
                    &mut out.view_mut(),
                    &mut scratch,
                ),
                None => bn::forward_inference(
                    gpu,
                    &p,
                    &xd.view(),
                    &gd.as_view(),
                    &bd.as_view(),
                    &rmd.as_view(),
                    &rvd.as_view(),
                    &mut out.view_mut(),
                    &mut scratch,
                ),
            };
            guard_ok(r.map(|_| Vec::new()), &out, gpu, "y")
        },
    )?;
    let bufs = [("x", ox), ("dy", ody), ("dx", odx)];
    compare(
        &format!("batchnorm.backward {p:?}"),
        scalar,
        vec,
        &bufs,
        &to_f64(&dx),
        BN_TOL,
        |k| {
            let mut out = Placed::poisoned(gpu, odx, len);
            let (mut g, mut b) = (gpu.zeros(c).unwrap(), gpu.zeros(c).unwrap());
            let (mut gv, mut bv) = (g.as_view_mut(), b.as_view_mut());
            let r = match k {
                Some(k) => bn::backward_with(
                    gpu,
                    k,
                    &p,
                    &xd.view(),
                    &dyd.view(),
                    &gd.as_view(),
                    &smd.as_view(),
                    &sisd.as_view(),
                    &mut out.view_mut(),
                    &mut gv,
                    &mut bv,
                    &mut scratch,
                ),
                None => bn::backward(
                    gpu,
                    &p,
                    &xd.view(),
                    &dyd.view(),
                    &gd.as_view(),
                    &smd.as_view(),
                    &sisd.as_view(),
                    &mut out.view_mut(),
                    &mut gv,
                    &mut bv,
                    &mut scratch,
                ),
            };
            guard_ok(r.map(|_| Vec::new()), &out, gpu, "dx")
        },
    )
}

fn check_pool_backward(
    gpu: &CudaBackend,
    p: MaxPool2d,
    off: usize,
    seed: u64,
) -> Result<(), String> {
    use pool::cuda::{self as pc, PoolKernel as K};
    let x = data(seed, p.x_len(), -1.0, 1.0);
    let (mut y, mut arg) = (vec![0.0; p.y_len()], vec![0u32; p.y_len()]);
    pool::cpu::forward(&p, &x, &mut y, &mut arg).unwrap();
    let dy = data(seed ^ 1, p.y_len(), -1.0, 1.0);
    let mut dx = vec![0.0; p.x_len()];
    pool::cpu::backward(&p, &dy, &arg, &mut dx).unwrap();
    let (dyd, argd) = (gpu.upload(&dy).unwrap(), gpu.upload(&arg).unwrap());
    // The gather adds in the CPU's order from 0: its exact bits.
    compare(
        &format!("maxpool2d.backward {p:?}"),
        K::Direct,
        K::Vec4,
        &[("dx", off)],
        &to_f64(&dx),
        Tol::new(0.0, 0.0),
        |k| {
            let mut out = Placed::poisoned(gpu, off, p.x_len());
            let r = match k {
                Some(k) => pc::backward_with(
                    gpu,
                    k,
                    &p,
                    &dyd.as_view(),
                    &argd.as_view(),
                    &mut out.view_mut(),
                ),
                None => pc::backward(
                    gpu,
                    &p,
                    &dyd.as_view(),
                    &argd.as_view(),
                    &mut out.view_mut(),
                ),
            };
            guard_ok(r.map(|_| Vec::new()), &out, gpu, "dx")
        },
    )
}

/// Dropout's four kernels (forward, mask only, backward, clocked forward),
/// scalar against vector, each against the CPU's masks and values exactly.
/// `offs`: x, y, dy, dx in floats; `om`: the mask in bytes.
#[allow(clippy::too_many_arguments)]
fn check_dropout(
    gpu: &CudaBackend,
    len: usize,
    rate: f32,
    seed: u64,
    layer: u64,
    step: u64,
    offs: &[usize],
    om: usize,
) -> Result<(), String> {
    use dropout::cpu;
    use dropout::cuda::{self as dc, DropoutKernel as K};
    const EXACT: Tol = Tol::new(0.0, 0.0);
    let p = Dropout::new(len, rate, seed, layer).unwrap();
    let mut x = data(seed ^ 3, len, -4.0, 4.0);
    if len > 2 {
        x[len - 1] = f32::NAN;
        x[0] = f32::INFINITY;
    }
    let dy = data(seed ^ 5, len, -1.0, 1.0);
    let (mut y, mut mask) = (vec![0.0; len], vec![0u8; len]);
    cpu::forward(&p, &x, &mut y, &mut mask).unwrap();
    let mut dx = vec![0.0; len];
    cpu::backward(&p, &dy, &mask, &mut dx).unwrap();
    let mask_f64: Vec<f64> = mask.iter().map(|&b| b as f64).collect();
    let y_and_mask: Vec<f64> = to_f64(&y).into_iter().chain(mask_f64.clone()).collect();
    let (ox, oy, ody, odx) = (offs[0], offs[1], offs[2], offs[3]);
    let xd = Placed::new(gpu, ox, &x);
    let dyd = Placed::new(gpu, ody, &dy);
    let md = PlacedMask::new(gpu, om, &mask);
    let what = |s: &str| format!("{s} len {len} rate {rate} seed {seed:#x} layer {layer}");
    // y, then the mask as 0.0 / 1.0, or the entry point's error.
    let forward_out = |r: kestrel::Result<()>, y: &Placed, m: &PlacedMask| match r {
        Err(e) => Ok(Err(e)),
        Ok(()) => {
            let mut v = y.read(gpu, "y")?;
            v.extend(m.read(gpu)?);
            Ok(Ok(v))
        }
    };

    compare_mixed(
        &what("dropout.forward"),
        K::Philox,
        K::PhiloxVec4,
        &[("x", ox), ("y", oy)],
        &[("mask", om)],
        &y_and_mask,
        EXACT,
        |k| {
            let (mut out, mut m) = (
                Placed::poisoned(gpu, oy, len),
                PlacedMask::poisoned(gpu, om, len),
            );
            let r = match k {
                Some(k) => dc::forward_with(
                    gpu,
                    k,
                    &p,
                    &xd.view(),
                    &mut out.view_mut(),
                    &mut m.view_mut(),
                ),
                None => dc::forward(gpu, &p, &xd.view(), &mut out.view_mut(), &mut m.view_mut()),
            };
            forward_out(r, &out, &m)
        },
    )?;
    compare_mixed(
        &what("dropout.mask_only"),
        K::Philox,
        K::PhiloxVec4,
        &[],
        &[("mask", om)],
        &mask_f64,
        EXACT,
        |k| {
            let mut m = PlacedMask::poisoned(gpu, om, len);
            let r = match k {
                Some(k) => dc::mask_only_with(gpu, k, &p, &mut m.view_mut()),
                None => dc::mask_only(gpu, &p, &mut m.view_mut()),
            };
            match r {
                Err(e) => Ok(Err(e)),
                Ok(()) => m.read(gpu).map(Ok),
            }
        },
    )?;
    compare_mixed(
        &what("dropout.backward"),
        K::Philox,
        K::PhiloxVec4,
        &[("dy", ody), ("dx", odx)],
        &[("mask", om)],
        &to_f64(&dx),
        EXACT,
        |k| {
            let mut out = Placed::poisoned(gpu, odx, len);
            let r = match k {
                Some(k) => {
                    dc::backward_with(gpu, k, &p, &dyd.view(), &md.view(), &mut out.view_mut())
                }
                None => dc::backward(gpu, &p, &dyd.view(), &md.view(), &mut out.view_mut()),
            };
            guard_ok(r.map(|_| Vec::new()), &out, gpu, "dx")
        },
    )?;

    // The clocked forward draws the mask of offset layer | step << 16.
    let at_step = Dropout::new(len, rate, seed, layer | (step << 16)).unwrap();
    let (mut yc, mut mc) = (vec![0.0; len], vec![0u8; len]);
    cpu::forward(&at_step, &x, &mut yc, &mut mc).unwrap();
    let want: Vec<f64> = to_f64(&yc)
        .into_iter()
        .chain(mc.iter().map(|&b| b as f64))
        .collect();
    let mut clock = kestrel::cuda::StepClock::new(gpu, 1).unwrap();
    clock.set(gpu, step, 0).unwrap();
    compare_mixed(
        &what(&format!("dropout.forward_clocked step {step:#x}")),
        K::Philox,
        K::PhiloxVec4,
        &[("x", ox), ("y", oy)],
        &[("mask", om)],
        &want,
        EXACT,
        |k| {
            let (mut out, mut m) = (
                Placed::poisoned(gpu, oy, len),
                PlacedMask::poisoned(gpu, om, len),
            );
            let (xv, mut yv, mut mv) = (xd.view(), out.view_mut(), m.view_mut());
            let r = match k {
                Some(k) => dc::forward_clocked_with(gpu, k, &p, &clock, &xv, &mut yv, &mut mv),
                None => dc::forward_clocked(gpu, &p, &clock, &xv, &mut yv, &mut mv),
            };
            forward_out(r, &out, &m)
        },
    )
}

/// Parameters and slots after a few steps, against the CPU: as in
/// gpu_optim.rs (FMA contraction on a GPU, the f64 norm's summation order).
const STEP_TOL: Tol = Tol::new(2e-6, 1e-5);

/// Rule `rule` (0 SGD, 1 momentum, 2 Nesterov, 3 Adagrad, 4 RMSprop, 5
/// Adam), the tf.keras flavour or not, clipnorm (`clip & 1`: 1.0, active on
/// these gradients) and clipvalue (`clip & 2`: 0.5), decay or not.
fn optimizer(rule: usize, tf: bool, clip: usize, decay: bool) -> Optimizer {
    let mut o = match rule {
        0 => Optimizer::sgd(0.05, 0.0, false),
        1 => Optimizer::sgd(0.05, 0.9, false),
        2 => Optimizer::sgd(0.05, 0.9, true),
        3 => Optimizer::adagrad(0.05),
        4 => Optimizer::rmsprop(0.05),
        _ => Optimizer::adam(0.05),
    }
    .unwrap();
    if decay {
        o = o.with_decay(0.01).unwrap();
    }
    if clip & 1 != 0 {
        o = o.with_clipnorm(1.0).unwrap();
    }
    if clip & 2 != 0 {
        o = o.with_clipvalue(0.5).unwrap();
    }
    if tf { o.tf_keras() } else { o }
}

/// Gradients of step `k`, uniform in [-2, 2] (clipvalue 0.5 and clipnorm 1
/// active).
fn grads_at(seed: u64, k: usize, sizes: &[usize]) -> Vec<Vec<f32>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            data(
                seed ^ ((k as u64) << 32) ^ ((i as u64 + 1) * 0x9E37),
                n,
                -2.0,
                2.0,
            )
        })
        .collect()
}

/// The optimizer step, scalar against vector: `steps` steps on parameters
/// and gradients placed `offs[i]` = (param, grad) floats into their buffers
/// (the gradients of each step copied into the same views, as a training
/// loop does); with `clocked`, every step after the first is the clocked
/// update of a captured step. The output compared is every tensor's
/// parameters, then its slots.
#[allow(clippy::too_many_arguments)]
fn check_optim(
    gpu: &CudaBackend,
    opt: &Optimizer,
    sizes: &[usize],
    offs: &[(usize, usize)],
    seed: u64,
    steps: usize,
    clocked: bool,
) -> Result<(), String> {
    use optim::cuda::{self as oc, OptimKernel as K};
    let params: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| data(seed.wrapping_add(i as u64), n, -1.0, 1.0))
        .collect();
    let mut cs = OptimizerState::new(opt, sizes).unwrap();
    let mut cp = params.clone();
    for k in 0..steps {
        let g = grads_at(seed, k, sizes);
        let mut pm: Vec<&mut [f32]> = cp.iter_mut().map(|v| v.as_mut_slice()).collect();
        let gr: Vec<&[f32]> = g.iter().map(|v| v.as_slice()).collect();
        optim::cpu::step(opt, &mut cs, &mut pm, &gr).unwrap();
    }
    let mut reference: Vec<f64> = cp.iter().flat_map(|v| to_f64(v)).collect();
    for i in 0..sizes.len() {
        let (s0, s1) = cs.slots(i).unwrap();
        reference.extend(to_f64(s0));
        reference.extend(to_f64(s1));
    }
    // The buffers the vector version needs on 16 bytes, in the order the
    // state names them (empty tensors are never touched, so never named).
    let bufs: Vec<(String, usize)> = sizes
        .iter()
        .zip(offs)
        .enumerate()
        .filter(|&(_, (&n, _))| n > 0)
        .flat_map(|(i, (_, &(op, og)))| [(format!("params[{i}]"), op), (format!("grads[{i}]"), og)])
        .collect();
    let named: Vec<(&str, usize)> = bufs.iter().map(|(n, o)| (n.as_str(), *o)).collect();
    let expect_misaligned = first_misaligned(&named, &[]).map(|(n, _)| n.to_string());
    let mut lr_rows = vec![[f32::NAN; 2]; steps + 1];
    for (k, row) in lr_rows.iter_mut().enumerate().take(steps) {
        let s = opt.scalars(k as u64);
        *row = [s.lr_t, s.adam_step];
    }
    compare(
        &format!("optimizer {opt:?} sizes {sizes:?} offsets {offs:?} clocked {clocked}"),
        K::Fused,
        K::FusedVec4,
        &named,
        &reference,
        STEP_TOL,
        |k| {
            let mut state = CudaOptimizerState::new(gpu, opt, sizes).unwrap();
            let mut ps: Vec<Placed> = params
                .iter()
                .zip(offs)
                .map(|(v, &(op, _))| Placed::new(gpu, op, v))
                .collect();
            let mut gs: Vec<Placed> = grads_at(seed, 0, sizes)
                .iter()
                .zip(offs)
                .map(|(v, &(_, og))| Placed::new(gpu, og, v))
                .collect();
            let mut clock = kestrel::cuda::StepClock::new(gpu, lr_rows.len()).unwrap();
            clock.set_lr_rows(gpu, &lr_rows).unwrap();
            for step in 0..steps {
                for (g, host) in gs.iter_mut().zip(grads_at(seed, step, sizes)) {
                    if !host.is_empty() {
                        gpu.stream().memcpy_htod(&host, &mut g.view_mut()).unwrap();
                    }
                }
                let mut pv: Vec<CudaViewMut<'_, f32>> =
                    ps.iter_mut().map(|p| p.view_mut()).collect();
                let gv: Vec<CudaView<'_, f32>> = gs.iter().map(|g| g.view()).collect();
                let r = if clocked && step > 0 {
                    clock.set(gpu, 0, step as u64).unwrap();
                    let r = match k {
                        Some(k) => {
                            oc::step_clocked_with(gpu, k, opt, &mut state, &clock, &mut pv, &gv)
                        }
                        None => oc::step_clocked(gpu, opt, &mut state, &clock, &mut pv, &gv),
                    };
                    state.set_iterations(step as u64 + 1);
                    r
                } else {
                    match k {
                        Some(k) => oc::step_with(gpu, k, opt, &mut state, &mut pv, &gv),
                        None => oc::step(gpu, opt, &mut state, &mut pv, &gv),
                    }
                };
                if let Err(e) = r {
                    return Ok(Err(e));
                }
            }
            // What select saw: the first misaligned buffer, as the test
            // placed them.
            let seen = state.first_misaligned().map(str::to_string);
            if seen != expect_misaligned {
                return Err(format!(
                    "the state names {seen:?} as its first misaligned buffer, expected {expect_misaligned:?}"
                ));
            }
            let mut out = Vec::new();
            for (i, p) in ps.iter().enumerate() {
                out.extend(p.read(gpu, &format!("params[{i}]"))?);
            }
            let host = state.download(gpu, opt).unwrap();
            for i in 0..sizes.len() {
                let (s0, s1) = host.slots(i).unwrap();
                out.extend_from_slice(s0);
                out.extend_from_slice(s1);
            }
            Ok(Ok(out))
        },
    )
}

/// Optimizer tensor sizes: tiny (1-5: all quad tails), primes, sizes off a
/// chunk and several chunks.
fn opt_size() -> BoxedStrategy<usize> {
    prop_oneof![
        2 => proptest::sample::select(vec![0usize, 1, 2, 3, 4, 5, 7, 31, 127, CHUNK - 1, CHUNK + 1, CHUNK + 6, 2 * CHUNK + 3]),
        3 => dim(300),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn dropout_vec4_is_the_scalar_bits(len in lens(), offs in offsets(4),
                                       om in prop_oneof![2 => Just(0usize), 1 => Just(4usize), 3 => 1usize..8],
                                       rate in prop_oneof![Just(0.0f32), Just(0.5f32), 0.0f32..0.999],
                                       seed: u64, layer in 0u64..0x1_0000,
                                       step in prop_oneof![0u64..4, 0u64..(1u64 << 48)]) {
        let gpu = gpu();
        let r = check_dropout(&gpu, len, rate, seed, layer, step, &offs, om);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    /// Every rule and flavour, clipnorm / clipvalue / both / none, 1 to 5
    /// tensors of odd sizes in one call, each buffer at its own offset.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn optim_vec4_is_the_scalar_bits(rule in 0usize..6, tf: bool, clip in 0usize..4, decay: bool, clocked: bool,
                                     tensors in proptest::collection::vec(
                                         (opt_size(),
                                          prop_oneof![2 => Just(0usize), 1 => Just(4usize), 1 => 1usize..8],
                                          prop_oneof![2 => Just(0usize), 1 => Just(4usize), 1 => 1usize..8]),
                                         1..=5),
                                     seed: u64) {
        let gpu = gpu();
        let opt = optimizer(rule, tf, clip, decay);
        let sizes: Vec<usize> = tensors.iter().map(|t| t.0).collect();
        let offs: Vec<(usize, usize)> = tensors.iter().map(|t| (t.1, t.2)).collect();
        let r = check_optim(&gpu, &opt, &sizes, &offs, seed, 3, clocked);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn pool_backward_vec4_is_the_scalar_bits(n in dim(3), c in dim(5), h in dim(17), w in dim(17),
                                             window in prop_oneof![Just((2usize, 2usize)), Just((3, 2)), Just((3, 1))],
                                             same: bool, off in prop_oneof![Just(0usize), Just(4usize), 1usize..8], seed: u64) {
        let gpu = gpu();
        let (k, st) = window;
        let pad = if same { Padding::Same } else { Padding::Valid };
        let Ok(p) = MaxPool2d::new([n, c, h, w], [k, k], [st, st], pad) else {
            // A valid window larger than the image: nothing to pool.
            return Ok(());
        };
        let r = check_pool_backward(&gpu, p, off, seed);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn activation_vec4_is_the_scalar_bits(len in lens(), offs in offsets(4), seed: u64,
                                          alpha in prop_oneof![Just(0.3f32), Just(1.0f32), -1.0f32..2.0]) {
        let gpu = gpu();
        for act in activations(alpha) {
            let r = check_activation(&gpu, act, len, &offs, seed);
            prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        }
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn bias_add_vec4_is_the_scalar_bits((n, c, sp) in bias_shapes(), offs in offsets(3), seed: u64) {
        let gpu = gpu();
        let r = check_bias(&gpu, BiasShape::new(n, c, sp).unwrap(), &offs, seed);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn batchnorm_vec4_is_the_scalar_bits((n, c, sp) in bias_shapes(), offs in offsets(4), seed: u64, is_conv: bool) {
        let gpu = gpu();
        // n * spatial >= 2 keeps every variance mode's correction defined.
        let n = if n * sp < 2 { 2 } else { n };
        let p = BatchNorm::new(n, c, sp, is_conv, 0.99, 1e-3, VarianceMode::Biased).unwrap();
        let r = check_batchnorm(&gpu, p, &offs, seed);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// What the plain entry points pick: the vector version exactly when every
/// buffer is aligned (the property tests above check the bits either way).
#[test]
#[ignore = "needs a CUDA device"]
fn select_picks_by_alignment() {
    let gpu = gpu();
    let info = gpu.info();
    use activation::cuda::{ActivationKernel as A, select as act_select};
    assert_eq!(act_select(10, true, info), A::Vec4);
    assert_eq!(act_select(10, false, info), A::Elementwise);
    use bias::cuda::{BiasKernel as B, select as bias_select};
    let dense = BiasShape::dense(3, 5).unwrap();
    let conv = BiasShape::conv(3, 5, 7).unwrap();
    assert_eq!(bias_select(&dense, true, info), B::ColumnsVec4);
    assert_eq!(bias_select(&dense, false, info), B::Columns);
    assert_eq!(bias_select(&conv, true, info), B::ChannelBlocksVec4);
    assert_eq!(bias_select(&conv, false, info), B::ChannelBlocks);
    use batchnorm::cuda::{BatchNormKernel as N, select as bn_select};
    let dense = BatchNorm::dense(3, 5).unwrap();
    let conv = BatchNorm::conv(3, 5, 2, 3).unwrap();
    assert_eq!(bn_select(&dense, true, info), N::ColumnsVec4);
    assert_eq!(bn_select(&dense, false, info), N::Columns);
    assert_eq!(bn_select(&conv, true, info), N::ChannelBlocksVec4);
    assert_eq!(bn_select(&conv, false, info), N::ChannelBlocks);
    use pool::cuda::{PoolKernel as P, select as pool_select};
    let p = MaxPool2d::new([1, 1, 4, 4], [2, 2], [2, 2], Padding::Valid).unwrap();
    assert_eq!(pool_select(&p, true, info), P::Vec4);
    assert_eq!(pool_select(&p, false, info), P::Direct);
    use dropout::cuda::{DropoutKernel as D, select as dropout_select};
    let d = Dropout::new(10, 0.5, 1, 2).unwrap();
    assert_eq!(dropout_select(&d, true, info), D::PhiloxVec4);
    assert_eq!(dropout_select(&d, false, info), D::Philox);
    use optim::cuda::{OptimKernel as O, select as optim_select};
    let o = Optimizer::adam(0.01).unwrap();
    assert_eq!(optim_select(&o, true, info), O::FusedVec4);
    assert_eq!(optim_select(&o, false, info), O::Fused);
}

/// Every rule on every tensor size from 0 to 9 and a few off the chunk, all
/// in one call, each buffer aligned: the vector update (tails of 1 to 3
/// elements in most tensors) against the scalar one, plain and clocked.
#[test]
#[ignore = "needs a CUDA device"]
fn optim_vec4_every_rule_every_tail() {
    let gpu = gpu();
    let mut sizes: Vec<usize> = (0..10).collect();
    sizes.extend([CHUNK - 3, CHUNK + 2, 2 * CHUNK + 1]);
    let offs = vec![(0usize, 0usize); sizes.len()];
    for rule in 0..6 {
        for (tf, clip) in [(false, 3), (true, 3), (false, 0), (true, 1), (false, 2)] {
            for clocked in [false, true] {
                let opt = optimizer(rule, tf, clip, true);
                if let Err(e) = check_optim(&gpu, &opt, &sizes, &offs, 7 + rule as u64, 3, clocked)
                {
                    panic!("{e}");
                }
            }
        }
    }
}

/// The training path picks the vector versions through `select`: a
/// `GpuBackend`'s buffers are fresh allocations (16-byte aligned), so its
/// optimizer state finds no misaligned buffer (`select` then takes
/// `FusedVec4`), and its dropout gives the scalar version's bits.
#[test]
#[ignore = "needs a CUDA device"]
fn the_training_path_takes_the_vector_versions() {
    use kestrel::backend::{Backend, GpuBackend};
    let be = GpuBackend::from_device(std::sync::Arc::new(gpu()));
    let g = be.device().clone();
    let len = 1003;
    let x = be.upload_f32(&data(1, len, -1.0, 1.0)).unwrap();
    let (mut y, mut mask) = (be.alloc_f32(len).unwrap(), be.alloc_u8(len).unwrap());
    let p = Dropout::new(len, 0.3, 9, 2).unwrap();
    be.dropout_forward(&p, &x, &mut y, &mut mask).unwrap();
    assert_eq!(
        align_of_view(&g, &y.view()),
        0,
        "a backend buffer is 16-byte aligned"
    );
    let (mut ys, mut ms) = (g.zeros::<f32>(len).unwrap(), g.zeros::<u8>(len).unwrap());
    dropout::cuda::forward_with(
        &g,
        dropout::cuda::DropoutKernel::Philox,
        &p,
        &x.view(),
        &mut ys.as_view_mut(),
        &mut ms.as_view_mut(),
    )
    .unwrap();
    assert_eq!(
        bits(&be.download_f32(&y).unwrap()),
        bits(&g.download(&ys).unwrap())
    );
    assert_eq!(be.download_u8(&mask).unwrap(), g.download(&ms).unwrap());

    let opt = Optimizer::adam(0.01).unwrap();
    let sizes = [5usize, 3, 4099];
    let mut state = be.opt_state_new(&opt, &sizes).unwrap();
    let mut params: Vec<_> = sizes
        .iter()
        .map(|&n| be.upload_f32(&data(n as u64, n, -1.0, 1.0)).unwrap())
        .collect();
    let grads: Vec<_> = sizes
        .iter()
        .map(|&n| be.upload_f32(&data(n as u64 + 1, n, -1.0, 1.0)).unwrap())
        .collect();
    let mut pm: Vec<_> = params.iter_mut().collect();
    let gr: Vec<_> = grads.iter().collect();
    be.optimizer_step(&opt, &mut state, &mut pm, &gr).unwrap();
    assert_eq!(
        state.first_misaligned(),
        None,
        "select would not take FusedVec4"
    );
}

/// The bytes by which a view starts past a 16-byte boundary.
fn align_of_view(gpu: &CudaBackend, v: &CudaView<'_, f32>) -> u64 {
    use cudarc::driver::DevicePtr;
    v.device_ptr(gpu.stream()).0 % 16
}
