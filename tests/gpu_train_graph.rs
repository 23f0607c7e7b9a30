//! The captured training step (`fit` on CUDA replays one CUDA graph per
//! full batch, `src/train/captured.rs`) against the same training with
//! every op launched (`FitOptions::cuda_graph = false`): a small model with
//! convolution, batch normalization, max pooling, dropout, dense layers and
//! softmax cross-entropy, trained for three epochs of five steps (four full
//! batches and a partial one) with a validation split, under Adam (with
//! clipnorm and decay), RMSprop (with decay) and SGD with Nesterov momentum
//! (with clipvalue). Weights (batch norm's moving statistics included),
//! optimizer slots and step counters, and every logged loss and metric
//! must be the same bits: a per-step value baked into the graph (the
//! dropout step, the learning rate, Adam's bias correction, the results
//! row) would be replayed stale and change them. The replay count shows
//! that the graph really ran.
//!
//! Every test needs a CUDA device and is ignored otherwise:
//! `cargo test --release --test gpu_train_graph -- --include-ignored`.

mod common;

use common::data;
use kestrel::backend::{Backend, GpuBackend};
use kestrel::nn::{
    Act, BatchNormalization, Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential,
};
use kestrel::ops::optim::{Optimizer, OptimizerState};
use kestrel::train::{FitOptions, History, Loss, Metric, Targets, Validation};

/// Samples in all; the last fifth (8) is the validation split, leaving 37
/// for training: batches of 8, 8, 8, 8 and a partial 5.
const SAMPLES: usize = 46;
const BATCH: usize = 8;
const EPOCHS: usize = 3;
const CLASSES: usize = 5;
const INPUT: [usize; 3] = [2, 9, 9];

fn model(opt: Optimizer, loss: Loss) -> Sequential<GpuBackend> {
    let b = GpuBackend::new(0).unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e}"));
    let mut m = Sequential::new(b, 17);
    m.add(Conv2D::new(4, 3).same().activation(Act::Relu))
        .add(BatchNormalization::new())
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.3))
        .add(Flatten)
        .add(Dense::new(16).activation(Act::Relu))
        .add(Dropout::new(0.5))
        .add(Dense::new(CLASSES).activation(Act::Softmax));
    m.build(&INPUT).unwrap();
    m.compile(opt, loss, &[Metric::Accuracy]).unwrap();
    m
}

struct Run {
    history: History,
    weights: Vec<Vec<f32>>,
    state: OptimizerState,
    steps: u64,
    replays: u64,
    nodes: u64,
}

fn train(opt: Optimizer, loss: Loss, cuda_graph: bool) -> Run {
    let x = data(3, SAMPLES * INPUT.iter().product::<usize>(), -1.0, 1.0);
    let labels: Vec<u32> = (0..SAMPLES).map(|i| (i * 7 % CLASSES) as u32).collect();
    let one_hot: Vec<f32> = labels
        .iter()
        .flat_map(|&l| (0..CLASSES).map(move |c| if c == l as usize { 1.0 } else { 0.0 }))
        .collect();
    let y = match loss {
        Loss::SparseCategoricalCrossentropy => Targets::Sparse(&labels),
        _ => Targets::Dense(&one_hot),
    };
    let mut m = model(opt, loss);
    let opts = FitOptions {
        batch_size: BATCH,
        epochs: EPOCHS,
        validation: Validation::Split(0.18),
        verbose: 0,
        cuda_graph,
        ..Default::default()
    };
    let history = m.fit(&x, y, opts).unwrap();
    Run {
        history,
        weights: m.get_weights().unwrap(),
        state: m.optimizer_state().unwrap(),
        steps: m.steps(),
        replays: m.backend().step_replays(),
        nodes: m.backend().step_graph_nodes(),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_same_training(name: &str, opt: Optimizer, loss: Loss) {
    let direct = train(opt, loss, false);
    let captured = train(opt, loss, true);
    let steps_per_epoch = 37usize.div_ceil(BATCH) as u64;
    assert_eq!(direct.steps, EPOCHS as u64 * steps_per_epoch, "{name}");
    assert_eq!(captured.steps, direct.steps, "{name}: steps");
    assert_eq!(
        direct.replays, 0,
        "{name}: cuda_graph = false replayed a graph"
    );
    // Every full batch but each epoch's first (which runs uncaptured, to
    // set up the scratch and the optimizer's table, before the step is
    // recorded again) is a replay.
    let full_per_epoch = steps_per_epoch - 1;
    assert_eq!(
        captured.replays,
        EPOCHS as u64 * (full_per_epoch - 1),
        "{name}: replays"
    );
    // The graph holds the whole step: at least one node per layer pass and
    // the loss, optimizer update and tick.
    assert_eq!(
        direct.nodes, 0,
        "{name}: cuda_graph = false recorded a graph"
    );
    assert!(captured.nodes >= 15, "{name}: {} nodes", captured.nodes);
    assert_eq!(
        captured.state.iterations(),
        direct.state.iterations(),
        "{name}: optimizer iterations"
    );
    assert_eq!(captured.state.iterations(), direct.steps, "{name}");
    for (i, (c, d)) in captured.weights.iter().zip(&direct.weights).enumerate() {
        assert_eq!(bits(c), bits(d), "{name}: weight tensor {i} differs");
    }
    let tensors = direct.state.sizes().len();
    assert!(tensors > 0);
    for i in 0..tensors {
        let (c0, c1) = captured.state.slots(i).unwrap();
        let (d0, d1) = direct.state.slots(i).unwrap();
        assert_eq!(bits(c0), bits(d0), "{name}: optimizer slot 0 of tensor {i}");
        assert_eq!(bits(c1), bits(d1), "{name}: optimizer slot 1 of tensor {i}");
    }
    assert_eq!(captured.history.metrics.len(), direct.history.metrics.len());
    for ((kc, vc), (kd, vd)) in captured.history.metrics.iter().zip(&direct.history.metrics) {
        assert_eq!(kc, kd, "{name}");
        let (bc, bd): (Vec<u64>, Vec<u64>) = (
            vc.iter().map(|v| v.to_bits()).collect(),
            vd.iter().map(|v| v.to_bits()).collect(),
        );
        assert_eq!(
            bc, bd,
            "{name}: {kc} per epoch: captured {vc:?}, direct {vd:?}"
        );
    }
    // Training moved: losses change from epoch to epoch (a test of two
    // identical no-ops would pass vacuously).
    let losses = direct.history.get("loss").unwrap();
    assert_eq!(losses.len(), EPOCHS);
    assert!(
        losses.windows(2).all(|w| w[0] != w[1]),
        "{name}: {losses:?}"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn adam_with_clipnorm_and_decay_captured_is_bit_identical() {
    let opt = Optimizer::adam(3e-3)
        .unwrap()
        .with_decay(1e-2)
        .unwrap()
        .with_clipnorm(0.5)
        .unwrap();
    assert_same_training("adam", opt, Loss::CategoricalCrossentropy);
}

#[test]
#[ignore = "needs a CUDA device"]
fn rmsprop_with_decay_captured_is_bit_identical() {
    let opt = Optimizer::rmsprop(1e-3).unwrap().with_decay(5e-2).unwrap();
    assert_same_training("rmsprop", opt, Loss::SparseCategoricalCrossentropy);
}

#[test]
#[ignore = "needs a CUDA device"]
fn sgd_nesterov_with_clipvalue_captured_is_bit_identical() {
    let opt = Optimizer::sgd(0.05, 0.9, true)
        .unwrap()
        .with_decay(1e-2)
        .unwrap()
        .with_clipvalue(0.1)
        .unwrap();
    assert_same_training("sgd", opt, Loss::CategoricalCrossentropy);
}

/// The CPU backend never captures: `cuda_graph` changes nothing there.
#[test]
fn cpu_backend_does_not_capture() {
    let b = kestrel::backend::CpuBackend;
    assert!(!b.captures_steps());
    let e = b.step_clock_new(4).unwrap_err().to_string();
    assert!(e.contains("does not capture"), "{e}");
}

/// keras-cnn at batch 32 (the step docs/perf-log.md's launch-overhead
/// floor is about): three full batches, so the second is recorded and the
/// second and third replayed. The graph holds every launch of the step:
/// at least a forward and a backward launch per layer with weights or
/// state, plus the loss, the optimizer and the tick; its node count is
/// printed for the perf log.
#[test]
#[ignore = "needs a CUDA device"]
fn keras_cnn_step_is_one_graph() {
    let b = GpuBackend::new(0).unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e}"));
    let mut m = Sequential::new(b, 5);
    m.add(Conv2D::new(32, 3).same().activation(Act::Relu))
        .add(Conv2D::new(32, 3).activation(Act::Relu))
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.25))
        .add(Conv2D::new(64, 3).same().activation(Act::Relu))
        .add(Conv2D::new(64, 3).activation(Act::Relu))
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.25))
        .add(Flatten)
        .add(Dense::new(512).activation(Act::Relu))
        .add(Dropout::new(0.5))
        .add(Dense::new(10).activation(Act::Softmax));
    m.build(&[3, 32, 32]).unwrap();
    m.compile(
        Optimizer::rmsprop(1e-4).unwrap().with_decay(1e-6).unwrap(),
        Loss::CategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    let n = 96;
    let x = data(7, n * 3 * 32 * 32, 0.0, 1.0);
    let y: Vec<f32> = (0..n)
        .flat_map(|i| (0..10).map(move |c| if c == i * 3 % 10 { 1.0 } else { 0.0 }))
        .collect();
    let opts = FitOptions {
        batch_size: 32,
        epochs: 1,
        verbose: 0,
        ..Default::default()
    };
    m.fit(&x, Targets::Dense(&y), opts).unwrap();
    let b = m.backend();
    assert_eq!(b.step_replays(), 2);
    let nodes = b.step_graph_nodes();
    eprintln!("keras-cnn step at batch 32: {nodes} graph nodes");
    // 4 conv + 2 dense layers, forward and backward each, 3 dropouts and 2
    // pools both ways, the loss, the metric, the optimizer and the tick.
    assert!(nodes >= 2 * 6 + 2 * 5 + 4, "{nodes} nodes");
}

/// The tick copies the step row into the clock's row of the results, only
/// below the results' rows, and advances step and row; results that are not
/// whole rows are refused.
#[test]
#[ignore = "needs a CUDA device"]
fn tick_copies_the_step_row_and_advances_the_clock() {
    let gpu = common::gpu();
    let rows = 3usize;
    let mut clock = kestrel::cuda::StepClock::new(&gpu, rows).unwrap();
    clock.set(&gpu, 40, 1).unwrap();
    let row: Vec<f64> = data(11, 2, -1.0, 1.0).iter().map(|&v| v as f64).collect();
    let step_row = gpu.upload(&row).unwrap();
    let fill = -7.0f64;
    let mut results = gpu.upload(&vec![fill; rows * 2]).unwrap();
    let mut want = vec![fill; rows * 2];
    for (k, r) in [1usize, 2, 3].into_iter().enumerate() {
        clock
            .tick(&gpu, &step_row.as_view(), &mut results.as_view_mut())
            .unwrap();
        if r < rows {
            want[r * 2..r * 2 + 2].copy_from_slice(&row);
        }
        assert_eq!(gpu.download(&results).unwrap(), want, "tick {k}");
        assert_eq!(clock.read(&gpu).unwrap(), [41 + k as u64, r as u64 + 1]);
    }
    let mut odd = gpu.upload(&[fill; 5]).unwrap();
    let e = clock
        .tick(&gpu, &step_row.as_view(), &mut odd.as_view_mut())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("step_clock.tick") && e.contains("rows of 2"),
        "{e}"
    );
    assert!(clock.set_lr_rows(&gpu, &[[0.0; 2]; 4]).is_err());
}
