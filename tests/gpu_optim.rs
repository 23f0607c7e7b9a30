//! The GPU optimizer step (`kernels/optim.cu`) against the CPU reference
//! over several steps, every rule, both clipping flavors. Every test needs
//! a CUDA device and is ignored otherwise.

mod common;

use common::*;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use kestrel::cuda::CudaBackend;
use kestrel::ops::optim::cuda::{CHUNK, CudaOptimizerState};
use kestrel::ops::optim::{Optimizer, OptimizerState, cpu, cuda};
use proptest::prelude::*;

/// Parameters and slots after a few steps. Both sides run the same f32
/// formulas; they differ where CUDA contracts `a*b + c` into an FMA (one
/// rounding instead of two, ~6e-8 relative per operation, a few operations
/// per step) and in the f64 norm's summation order (the clip scale may round
/// to a neighbouring f32, 6e-8 relative). Parameters of size ~1 move by
/// <= ~0.1 a step, slots are of the size of g or g^2 (<= 4); after 4 steps
/// the differences stay below ~1e-6 relative to the values involved.
const STEP_TOL: Tol = Tol::new(2e-6, 1e-5);

fn make(rule: usize, lr: f32) -> Optimizer {
    match rule {
        0 => Optimizer::sgd(lr, 0.0, false),
        1 => Optimizer::sgd(lr, 0.9, false),
        2 => Optimizer::sgd(lr, 0.9, true),
        3 => Optimizer::adagrad(lr),
        4 => Optimizer::rmsprop(lr),
        _ => Optimizer::adam(lr),
    }
    .unwrap()
}

/// Device tensors of the given sizes (each allocation at least one element,
/// viewed at its exact size, so zero-sized tensors work).
fn upload_all(gpu: &CudaBackend, host: &[Vec<f32>]) -> Vec<CudaSlice<f32>> {
    host.iter()
        .map(|t| {
            let mut v = t.clone();
            if v.is_empty() {
                v.push(0.0);
            }
            gpu.upload(&v).unwrap()
        })
        .collect()
}

fn views<'a>(bufs: &'a [CudaSlice<f32>], sizes: &[usize]) -> Vec<CudaView<'a, f32>> {
    bufs.iter()
        .zip(sizes)
        .map(|(b, &n)| b.slice(0..n))
        .collect()
}

fn views_mut<'a>(bufs: &'a mut [CudaSlice<f32>], sizes: &[usize]) -> Vec<CudaViewMut<'a, f32>> {
    bufs.iter_mut()
        .zip(sizes)
        .map(|(b, &n)| b.slice_mut(0..n))
        .collect()
}

fn download_all(gpu: &CudaBackend, bufs: &[CudaSlice<f32>], sizes: &[usize]) -> Vec<Vec<f32>> {
    bufs.iter()
        .zip(sizes)
        .map(|(b, &n)| gpu.download(b).unwrap()[..n].to_vec())
        .collect()
}

/// Gradients of step `k`: uniform in [-2, 2], so that clipvalue 0.5 and the
/// clipnorms below are active.
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

/// Runs `steps` GPU steps from `params`; returns the parameters and the
/// downloaded state.
fn gpu_run(
    kernel: cuda::OptimKernel,
    gpu: &CudaBackend,
    opt: &Optimizer,
    state: &mut CudaOptimizerState,
    params: &[Vec<f32>],
    seed: u64,
    steps: std::ops::Range<usize>,
) -> Vec<Vec<f32>> {
    let sizes = state.sizes().to_vec();
    let mut p = upload_all(gpu, params);
    for k in steps {
        let g = upload_all(gpu, &grads_at(seed, k, &sizes));
        let mut pv = views_mut(&mut p, &sizes);
        cuda::step_with(gpu, kernel, opt, state, &mut pv, &views(&g, &sizes)).unwrap();
    }
    download_all(gpu, &p, &sizes)
}

fn cpu_run(
    opt: &Optimizer,
    state: &mut OptimizerState,
    params: &mut [Vec<f32>],
    seed: u64,
    steps: usize,
) {
    let sizes = state.sizes().to_vec();
    for k in 0..steps {
        let g = grads_at(seed, k, &sizes);
        let mut pm: Vec<&mut [f32]> = params.iter_mut().map(|v| v.as_mut_slice()).collect();
        let gr: Vec<&[f32]> = g.iter().map(|v| v.as_slice()).collect();
        cpu::step(opt, state, &mut pm, &gr).unwrap();
    }
}

fn compare(
    got_p: &[Vec<f32>],
    want_p: &[Vec<f32>],
    got: &OptimizerState,
    want: &OptimizerState,
) -> Result<(), String> {
    if got.iterations() != want.iterations() {
        return Err(format!(
            "iterations {} != {}",
            got.iterations(),
            want.iterations()
        ));
    }
    for i in 0..want_p.len() {
        check_close(
            &format!("params[{i}]"),
            &got_p[i],
            &to_f64(&want_p[i]),
            STEP_TOL,
        )?;
        let (g0, g1) = got.slots(i).unwrap();
        let (w0, w1) = want.slots(i).unwrap();
        check_close(&format!("slot0[{i}]"), g0, &to_f64(w0), STEP_TOL)?;
        check_close(&format!("slot1[{i}]"), g1, &to_f64(w1), STEP_TOL)?;
    }
    Ok(())
}

/// Tensor sizes: 1, 0, primes, one off a chunk, several chunks.
fn size() -> BoxedStrategy<usize> {
    prop_oneof![
        2 => proptest::sample::select(vec![0, 1, 31, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3, 9001]),
        3 => dim(300),
    ]
    .boxed()
}

fn configure(rule: usize, tf: bool, clip: usize, decay: bool, clipnorm: f32) -> Optimizer {
    let mut o = make(rule, 0.05);
    if decay {
        o = o.with_decay(0.01).unwrap();
    }
    if clip & 1 != 0 {
        o = o.with_clipnorm(clipnorm).unwrap();
    }
    if clip & 2 != 0 {
        o = o.with_clipvalue(0.5).unwrap();
    }
    if tf { o.tf_keras() } else { o }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every rule, both flavors (standalone Keras: global clipnorm, then
    /// clipvalue; tf.keras: clipvalue first, per-tensor clipnorm, Adagrad's
    /// 0.1 start), clipnorm / clipvalue / both / none, with and without
    /// decay, 4 steps on 1-5 tensors.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn step_matches_cpu(kernel in version::<cuda::OptimKernel>(),

        rule in 0usize..6,
        tf in any::<bool>(),
        clip in 0usize..4,
        decay in any::<bool>(),
        clipnorm in prop_oneof![Just(1.0f32), Just(20.0f32), Just(1e4f32)],
        sizes in proptest::collection::vec(size(), 1..=5),
        seed in any::<u64>(),
    ) {
        let gpu = gpu();
        let opt = configure(rule, tf, clip, decay, clipnorm);
        let params: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| data(seed.wrapping_add(i as u64), n, -1.0, 1.0)).collect();
        let steps = 4;

        let mut cs = OptimizerState::new(&opt, &sizes).unwrap();
        let mut cp = params.clone();
        cpu_run(&opt, &mut cs, &mut cp, seed, steps);

        let mut gs = CudaOptimizerState::new(&gpu, &opt, &sizes).unwrap();
        let gp = gpu_run(kernel, &gpu, &opt, &mut gs, &params, seed, 0..steps);
        let gstate = gs.download(&gpu, &opt).unwrap();
        let r = compare(&gp, &cp, &gstate, &cs);
        prop_assert!(r.is_ok(), "{:?}: {}", opt, r.unwrap_err());
    }
}

/// Two runs from the same inputs give the same bits (parameters and
/// slots), clipnorm's device reductions included.
#[test]
#[ignore = "needs a CUDA device"]
fn deterministic() {
    let gpu = gpu();
    let sizes = [1usize, 3 * CHUNK + 7, 0, 129, 70_001];
    let params: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| data(n as u64, n, -1.0, 1.0))
        .collect();
    for tf in [false, true] {
        let opt = configure(5, tf, 3, true, 1.0);
        let run = || {
            let mut s = CudaOptimizerState::new(&gpu, &opt, &sizes).unwrap();
            let p = gpu_run(
                cuda::select(&opt, true, gpu.info()),
                &gpu,
                &opt,
                &mut s,
                &params,
                99,
                0..3,
            );
            (p, s.download(&gpu, &opt).unwrap())
        };
        let (a, sa) = run();
        let (b, sb) = run();
        let bits = |v: &[Vec<f32>]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        for i in 0..sizes.len() {
            let (a0, a1) = sa.slots(i).unwrap();
            let (b0, b1) = sb.slots(i).unwrap();
            assert_eq!(
                bits(&[a0.to_vec(), a1.to_vec()]),
                bits(&[b0.to_vec(), b1.to_vec()])
            );
        }
    }
}

/// A checkpoint (download, upload into a fresh state) resumes exactly, and
/// a step with parameter buffers at new addresses (the descriptor table is
/// refreshed) continues correctly; the total matches the CPU over 5 steps.
#[test]
#[ignore = "needs a CUDA device"]
fn checkpoint_resume_and_moved_buffers() {
    let gpu = gpu();
    let sizes = [17usize, CHUNK + 1, 1];
    let params: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| data(n as u64 + 5, n, -1.0, 1.0))
        .collect();
    for rule in 0..6 {
        let opt = configure(rule, rule % 2 == 1, 3, true, 2.0);
        let mut s = CudaOptimizerState::new(&gpu, &opt, &sizes).unwrap();
        let p2 = gpu_run(
            cuda::select(&opt, true, gpu.info()),
            &gpu,
            &opt,
            &mut s,
            &params,
            5,
            0..2,
        );
        let saved = s.download(&gpu, &opt).unwrap();
        let mut resumed = CudaOptimizerState::upload(&gpu, &opt, &saved).unwrap();
        assert_eq!(resumed.iterations(), 2);
        // gpu_run uploads the parameters into new buffers.
        let p5 = gpu_run(
            cuda::select(&opt, true, gpu.info()),
            &gpu,
            &opt,
            &mut resumed,
            &p2,
            5,
            2..5,
        );

        let mut cs = OptimizerState::new(&opt, &sizes).unwrap();
        let mut cp = params.clone();
        cpu_run(&opt, &mut cs, &mut cp, 5, 5);
        let gstate = resumed.download(&gpu, &opt).unwrap();
        if let Err(e) = compare(&p5, &cp, &gstate, &cs) {
            panic!("{opt:?}: {e}");
        }
    }
}

/// Wrong tensor counts, wrong sizes and a state of another rule fail before
/// anything is launched, naming the op, the tensor and the sizes; the state
/// is untouched.
#[test]
#[ignore = "needs a CUDA device"]
fn errors() {
    let gpu = gpu();
    let opt = Optimizer::adam(0.01).unwrap();
    let sizes = [3usize, 5];
    let mut state = CudaOptimizerState::new(&gpu, &opt, &sizes).unwrap();
    let mut p = upload_all(&gpu, &[vec![0.0; 3], vec![0.0; 4]]);
    let g = upload_all(&gpu, &[vec![0.0; 3], vec![0.0; 5]]);
    let bad_sizes = [3usize, 4];
    let ok_sizes = [3usize, 5];
    {
        let mut pv = views_mut(&mut p, &bad_sizes);
        assert_err_mentions(
            cuda::step(&gpu, &opt, &mut state, &mut pv, &views(&g, &ok_sizes)),
            "optimizer.step",
            &["params[1]", "expected 5", "got 4"],
        );
        assert_err_mentions(
            cuda::step(&gpu, &opt, &mut state, &mut pv[..1], &views(&g, &ok_sizes)),
            "optimizer.step",
            &["params (number of tensors)", "expected 2", "got 1"],
        );
        assert_err_mentions(
            cuda::step(&gpu, &opt, &mut state, &mut pv, &views(&g, &ok_sizes)[..1]),
            "optimizer.step",
            &["grads (number of tensors)", "expected 2", "got 1"],
        );
        let sgd = Optimizer::sgd(0.01, 0.0, false).unwrap();
        assert_err_mentions(
            cuda::step(&gpu, &sgd, &mut state, &mut pv, &views(&g, &ok_sizes)),
            "optimizer.step",
            &["state", "Adam", "Sgd"],
        );
        let mut bad = opt;
        bad.lr = -1.0;
        assert_err_mentions(
            cuda::step(&gpu, &bad, &mut state, &mut pv, &views(&g, &ok_sizes)),
            "optimizer",
            &["lr", "-1"],
        );
    }
    assert_eq!(state.iterations(), 0);
    let g_short = upload_all(&gpu, &[vec![0.0; 3], vec![0.0; 4]]);
    let mut p_ok = upload_all(&gpu, &[vec![0.0; 3], vec![0.0; 5]]);
    let mut pv = views_mut(&mut p_ok, &ok_sizes);
    assert_err_mentions(
        cuda::step(
            &gpu,
            &opt,
            &mut state,
            &mut pv,
            &views(&g_short, &bad_sizes),
        ),
        "optimizer.step",
        &["grads[1]", "expected 5", "got 4"],
    );
    assert_err_mentions(
        state.download(&gpu, &Optimizer::rmsprop(0.01).unwrap()),
        "optimizer.step",
        &["state", "Adam", "RmsProp"],
    );
}

/// Runs `steps` steps on fixed parameter and gradient buffers (the
/// gradients of step `k` copied into the same buffers, as a training loop
/// does); with `clocked`, every step after the first is the clocked update
/// of a captured step, its scalars from row `first_row + k` of a step
/// clock's table (the rows around them NaN, so a wrong row shows).
fn fixed_buffer_run(
    gpu: &CudaBackend,
    opt: &Optimizer,
    sizes: &[usize],
    params: &[Vec<f32>],
    seed: u64,
    steps: usize,
    clocked: Option<usize>,
) -> (Vec<Vec<f32>>, OptimizerState) {
    let mut state = CudaOptimizerState::new(gpu, opt, sizes).unwrap();
    let mut p = upload_all(gpu, params);
    let mut g = upload_all(gpu, &grads_at(seed, 0, sizes));
    let first_row = clocked.unwrap_or(0);
    let mut clock = kestrel::cuda::StepClock::new(gpu, first_row + steps + 1).unwrap();
    let mut rows = vec![[f32::NAN; 2]; clock.rows()];
    for k in 0..steps {
        let s = opt.scalars(k as u64);
        rows[first_row + k] = [s.lr_t, s.adam_step];
    }
    clock.set_lr_rows(gpu, &rows).unwrap();
    for k in 0..steps {
        for (buf, host) in g.iter_mut().zip(grads_at(seed, k, sizes)) {
            if !host.is_empty() {
                gpu.stream()
                    .memcpy_htod(&host, &mut buf.slice_mut(0..host.len()))
                    .unwrap();
            }
        }
        let mut pv = views_mut(&mut p, sizes);
        let gv = views(&g, sizes);
        if clocked.is_some() && k > 0 {
            clock.set(gpu, 0, (first_row + k) as u64).unwrap();
            cuda::step_clocked(gpu, opt, &mut state, &clock, &mut pv, &gv).unwrap();
            state.set_iterations(k as u64 + 1);
        } else {
            cuda::step(gpu, opt, &mut state, &mut pv, &gv).unwrap();
        }
    }
    (
        download_all(gpu, &p, sizes),
        state.download(gpu, opt).unwrap(),
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The clocked update (a captured training step's: `lr_t` and Adam's
    /// step from the clock's row) gives the uncaptured step's bits, every
    /// rule and clipping flavor, with and without decay.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn clocked_step_matches_uncaptured_bit_for_bit(
        rule in 0usize..6,
        tf in any::<bool>(),
        clip in 0usize..4,
        decay in any::<bool>(),
        clipnorm in prop_oneof![Just(1.0f32), Just(1e4f32)],
        sizes in proptest::collection::vec(size(), 1..=4),
        seed in any::<u64>(),
        first_row in 0usize..3,
    ) {
        let gpu = gpu();
        let opt = configure(rule, tf, clip, decay, clipnorm);
        let params: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| data(seed.wrapping_add(i as u64), n, -1.0, 1.0)).collect();
        let steps = 4;
        let (dp, ds) = fixed_buffer_run(&gpu, &opt, &sizes, &params, seed, steps, None);
        let (cp, cs) = fixed_buffer_run(&gpu, &opt, &sizes, &params, seed, steps, Some(first_row));
        prop_assert_eq!(cs.iterations(), ds.iterations());
        for i in 0..sizes.len() {
            prop_assert_eq!(bits(&cp[i]), bits(&dp[i]), "params[{}] {:?}", i, opt);
            let ((c0, c1), (d0, d1)) = (cs.slots(i).unwrap(), ds.slots(i).unwrap());
            prop_assert_eq!(bits(c0), bits(d0), "slot0[{}]", i);
            prop_assert_eq!(bits(c1), bits(d1), "slot1[{}]", i);
        }
        // The step moved something (else the comparison is vacuous).
        prop_assert!(sizes.iter().all(|&n| n == 0) || dp.iter().zip(&params).any(|(a, b)| a != b));
    }
}

/// A clocked step before any uncaptured one (its descriptor table not yet
/// written, which a capture may not upload) is refused, naming the fix.
#[test]
#[ignore = "needs a CUDA device"]
fn clocked_step_needs_a_written_table() {
    let gpu = gpu();
    let opt = Optimizer::adam(1e-3).unwrap();
    let sizes = [5usize, 3];
    let mut state = CudaOptimizerState::new(&gpu, &opt, &sizes).unwrap();
    let mut p = upload_all(&gpu, &[vec![0.5; 5], vec![0.5; 3]]);
    let g = upload_all(&gpu, &[vec![0.1; 5], vec![0.1; 3]]);
    let clock = kestrel::cuda::StepClock::new(&gpu, 1).unwrap();
    let mut pv = views_mut(&mut p, &sizes);
    assert_err_mentions(
        cuda::step_clocked(&gpu, &opt, &mut state, &clock, &mut pv, &views(&g, &sizes)),
        "optimizer.step_clocked",
        &["uncaptured"],
    );
}
