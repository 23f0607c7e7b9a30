//! CPU optimizer step: the norms on the host side in f64, then the fused
//! element-wise update over every tensor in parallel.

use rayon::prelude::*;

use super::{Optimizer, OptimizerKind, OptimizerState, StepScalars, clip_gradient, update};
use crate::error::{Error, Result, check_len};
use crate::ops::bias::cpu::sum_by;

const OP: &str = "optimizer.step";

/// Elements per parallel task of the update (independent elements, so the
/// size only affects speed).
const UPDATE_CHUNK: usize = 16384;

/// Squared norm of `g` as the clipnorm rule sees it: of the value-clipped
/// gradient when clipvalue comes first, else of the raw gradient.
fn norm_sq(opt: &Optimizer, g: &[f32]) -> f64 {
    match (opt.clipvalue_first, opt.clipvalue) {
        (true, Some(c)) => sum_by(g, |v| {
            let v = if v > c {
                c
            } else if v < -c {
                -c
            } else {
                v
            } as f64;
            v * v
        }),
        _ => sum_by(g, |v| (v as f64) * (v as f64)),
    }
}

/// `c / n` when `n >= c`, else 1 (Keras's `clip_norm`; a NaN norm fails
/// the test and leaves the NaN gradients to propagate).
fn clip_scale(c: f32, norm: f64) -> f32 {
    if norm >= c as f64 {
        (c as f64 / norm) as f32
    } else {
        1.0
    }
}

/// One optimizer step over all parameter tensors of a model:
/// `params[i]` is updated in place from `grads[i]` and the state's slots,
/// then `state.iterations` is incremented.
///
/// With `clipnorm`, the norm is global over all gradients (summed in f64,
/// tensors in order) or, with `clipnorm_per_tensor`, per tensor. The number
/// of tensors and each size must match the state (the error names the
/// tensor index); nothing is modified when a check fails.
pub fn step(
    opt: &Optimizer,
    state: &mut OptimizerState,
    params: &mut [&mut [f32]],
    grads: &[&[f32]],
) -> Result<()> {
    opt.validate()?;
    if opt.kind != state.kind() {
        return Err(Error::invalid(
            OP,
            "state",
            format!(
                "state was made for {:?}, optimizer is {:?}",
                state.kind(),
                opt.kind
            ),
        ));
    }
    let sizes = state.sizes();
    check_len(OP, "params (number of tensors)", params.len(), sizes.len())?;
    check_len(OP, "grads (number of tensors)", grads.len(), sizes.len())?;
    for (i, &n) in sizes.iter().enumerate() {
        check_len(OP, &format!("params[{i}]"), params[i].len(), n)?;
        check_len(OP, &format!("grads[{i}]"), grads[i].len(), n)?;
    }

    let (iterations, slot0, slot1) = state.parts_mut();
    let base = opt.scalars(*iterations);
    let scales = clip_scales(opt, grads.len(), |i| norm_sq(opt, grads[i]));

    params
        .par_iter_mut()
        .zip(grads.par_iter())
        .zip(slot0.par_iter_mut())
        .zip(slot1.par_iter_mut())
        .zip(scales.par_iter())
        .for_each(|((((p, g), s0), s1), &scale)| {
            let s = StepScalars {
                clip_scale: scale,
                ..base
            };
            update_tensor(&s, p, g, s0, s1);
        });
    *iterations += 1;
    Ok(())
}

/// The per-tensor norm clipping factors: all equal to the global one, or
/// each from its own tensor's norm. Squared norms are taken in parallel and
/// summed in tensor order, in f64.
fn clip_scales(
    opt: &Optimizer,
    count: usize,
    norm_sq_of: impl Fn(usize) -> f64 + Sync,
) -> Vec<f32> {
    let Some(c) = opt.clipnorm else {
        return vec![1.0; count];
    };
    let sq: Vec<f64> = (0..count).into_par_iter().map(&norm_sq_of).collect();
    if opt.clipnorm_per_tensor {
        sq.iter().map(|&s| clip_scale(c, s.sqrt())).collect()
    } else {
        let total: f64 = sq.iter().sum();
        vec![clip_scale(c, total.sqrt()); count]
    }
}

fn update_tensor(s: &StepScalars, p: &mut [f32], g: &[f32], s0: &mut [f32], s1: &mut [f32]) {
    // `update` branches on the rule and the clipping per element, which
    // keeps the loop scalar. Here the rule, Nesterov and "no clipping" are
    // made compile-time constants of `update_specialized`, so after inlining
    // `update` folds to straight-line arithmetic that vectorizes — the same
    // operations in the same order, so the same bits.
    let clip = s.clip_scale != 1.0 || s.clipvalue != f32::INFINITY;
    macro_rules! go {
        ($k:expr, $n:expr) => {
            if clip {
                update_specialized::<{ $k }, { $n }, true>(s, p, g, s0, s1)
            } else {
                update_specialized::<{ $k }, { $n }, false>(s, p, g, s0, s1)
            }
        };
    }
    match (s.kind, s.nesterov) {
        (OptimizerKind::Sgd, false) => go!(0, false),
        (OptimizerKind::Sgd, true) => go!(0, true),
        (OptimizerKind::Adagrad, _) => go!(1, false),
        (OptimizerKind::RmsProp, _) => go!(2, false),
        (OptimizerKind::Adam, _) => go!(3, false),
    }
}

/// The update of one tensor with the rule (`K`: 0 SGD, 1 Adagrad, 2
/// RMSprop, 3 Adam), Nesterov and whether to clip known at compile time.
fn update_specialized<const K: u32, const NESTEROV: bool, const CLIP: bool>(
    s: &StepScalars,
    p: &mut [f32],
    g: &[f32],
    s0: &mut [f32],
    s1: &mut [f32],
) {
    // The constants are set inside each task's closure: a closure that
    // only read them through `s` would be one function for every
    // instantiation, with the branches left in.
    if s1.is_empty() {
        p.par_chunks_mut(UPDATE_CHUNK)
            .zip(g.par_chunks(UPDATE_CHUNK))
            .zip(s0.par_chunks_mut(UPDATE_CHUNK))
            .for_each(|((p, g), s0)| {
                let s = &specialize::<K, NESTEROV, CLIP>(s);
                let mut unused = 0.0f32;
                for ((pv, &gv), a) in p.iter_mut().zip(g).zip(s0) {
                    update(s, pv, gv, a, &mut unused);
                }
            });
    } else {
        p.par_chunks_mut(UPDATE_CHUNK)
            .zip(g.par_chunks(UPDATE_CHUNK))
            .zip(s0.par_chunks_mut(UPDATE_CHUNK))
            .zip(s1.par_chunks_mut(UPDATE_CHUNK))
            .for_each(|(((p, g), s0), s1)| {
                let s = &specialize::<K, NESTEROV, CLIP>(s);
                for (((pv, &gv), a), b) in p.iter_mut().zip(g).zip(s0).zip(s1) {
                    update(s, pv, gv, a, b);
                }
            });
    }
}

/// `s` with the rule, Nesterov and "no clipping" replaced by constants.
#[inline(always)]
fn specialize<const K: u32, const NESTEROV: bool, const CLIP: bool>(
    s: &StepScalars,
) -> StepScalars {
    StepScalars {
        kind: match K {
            0 => OptimizerKind::Sgd,
            1 => OptimizerKind::Adagrad,
            2 => OptimizerKind::RmsProp,
            _ => OptimizerKind::Adam,
        },
        nesterov: NESTEROV,
        // Without clipping, g * 1 and a comparison with +inf are exact
        // no-ops that the compiler removes once it sees the constants.
        clip_scale: if CLIP { s.clip_scale } else { 1.0 },
        clipvalue: if CLIP { s.clipvalue } else { f32::INFINITY },
        clipvalue_first: CLIP && s.clipvalue_first,
        ..*s
    }
}

/// The gradients as the update sees them after clipping (for inspection
/// and tests): `grads` clipped in place with the same norms and order as
/// [`step`] would use. Does not touch any state.
pub fn clip_gradients(opt: &Optimizer, grads: &mut [&mut [f32]]) -> Result<()> {
    opt.validate()?;
    let base = opt.scalars(0);
    let scales = clip_scales(opt, grads.len(), |i| norm_sq(opt, grads[i]));
    for (g, &scale) in grads.iter_mut().zip(&scales) {
        let s = StepScalars {
            clip_scale: scale,
            ..base
        };
        for v in g.iter_mut() {
            *v = clip_gradient(&s, *v);
        }
    }
    Ok(())
}
