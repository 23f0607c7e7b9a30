//! The training loop: Keras 2 semantics of fit, callbacks, re-compiling,
//! NaN handling and an end-to-end learning run.
mod common;

use common::Rng;
use kestrel::backend::CpuBackend;
use kestrel::nn::{Act, Dense, Dropout, Sequential};
use kestrel::ops::optim::Optimizer;
use kestrel::train::{
    Callback, EarlyStopping, EarlyStoppingStep, FitOptions, Logs, Loss, Metric, Targets, Validation,
};

/// A separable 2-class problem in `d` dimensions: label = sign of a fixed
/// linear function.
fn blobs(seed: u64, n: usize, d: usize) -> (Vec<f32>, Vec<u32>) {
    let mut r = Rng::new(seed);
    let w = r.vec(d, -1.0, 1.0);
    let x = r.vec(n * d, -1.0, 1.0);
    let y = (0..n)
        .map(|i| {
            let s: f32 = x[i * d..(i + 1) * d]
                .iter()
                .zip(&w)
                .map(|(a, b)| a * b)
                .sum();
            (s > 0.0) as u32
        })
        .collect();
    (x, y)
}

fn model(seed: u64, d: usize, dropout: f32) -> Sequential<CpuBackend> {
    let mut m = Sequential::new(CpuBackend, seed);
    m.add(Dense::new(16).activation(Act::Relu));
    if dropout > 0.0 {
        m.add(Dropout::new(dropout));
    }
    m.add(Dense::new(2).activation(Act::Softmax));
    m.build(&[d]).unwrap();
    m
}

fn quiet<'a>(batch_size: usize, epochs: usize) -> FitOptions<'a, CpuBackend> {
    FitOptions {
        batch_size,
        epochs,
        verbose: 0,
        ..Default::default()
    }
}

fn sgd(lr: f32) -> Optimizer {
    Optimizer::sgd(lr, 0.0, false).unwrap()
}

#[test]
fn learns_a_separable_problem() {
    let (x, y) = blobs(1, 512, 4);
    let mut m = model(3, 4, 0.1);
    m.compile(
        Optimizer::adam(0.01).unwrap(),
        Loss::SparseCategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    let h = m.fit(&x, Targets::Sparse(&y), quiet(32, 8)).unwrap();
    let acc = h.get("accuracy").unwrap();
    assert_eq!(acc.len(), 8);
    let (xt, yt) = blobs(1, 1024, 4);
    let logs = m
        .evaluate(&xt[512 * 4..], Targets::Sparse(&yt[512..]), 64)
        .unwrap();
    assert!(logs.get("acc").unwrap() > 0.95, "{logs:?}");
    // predict returns probabilities.
    let p = m.predict(&xt[..40], 16).unwrap();
    for row in p.chunks(2) {
        assert!((row[0] + row[1] - 1.0).abs() < 1e-5 && row[0] >= 0.0);
    }
}

#[test]
fn partial_batch_kept_and_epoch_means_weighted() {
    let (x, y) = blobs(2, 10, 3);
    let mut m = model(5, 3, 0.0);
    // lr 1e-30 leaves every kernel unchanged in f32 (the zero-initialized
    // biases move to ~1e-31, far below any effect on the loss), so the
    // epoch's training loss must be the sample mean of the per-sample losses.
    m.compile(
        sgd(1e-30),
        Loss::SparseCategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    let w0 = m.get_weights().unwrap();
    let h = m.fit(&x, Targets::Sparse(&y), quiet(4, 2)).unwrap();
    let w1 = m.get_weights().unwrap();
    assert_eq!((&w1[0], &w1[2]), (&w0[0], &w0[2]));
    assert_eq!(m.steps(), 6, "batches 4, 4, 2 per epoch");
    assert_eq!(m.optimizer_iterations().unwrap(), 6);
    let full = m.evaluate(&x, Targets::Sparse(&y), 10).unwrap();
    let loss = h.get("loss").unwrap();
    assert!(
        (loss[0] - full.get("loss").unwrap()).abs() < 1e-6,
        "{loss:?} {full:?}"
    );
    assert!((h.get("accuracy").unwrap()[1] - full.get("accuracy").unwrap()).abs() < 1e-12);
    // evaluate's own batching (3, 3, 3, 1) is weighted the same way.
    let e3 = m.evaluate(&x, Targets::Sparse(&y), 3).unwrap();
    assert!((e3.get("loss").unwrap() - full.get("loss").unwrap()).abs() < 1e-6);
}

#[test]
fn validation_split_takes_the_last_fraction() {
    let (x, y) = blobs(3, 10, 3);
    let mut m = model(5, 3, 0.0);
    m.compile(
        sgd(0.1),
        Loss::SparseCategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    let opts = FitOptions {
        validation: Validation::Split(0.3),
        ..quiet(4, 1)
    };
    let h = m.fit(&x, Targets::Sparse(&y), opts).unwrap();
    // int(10 * 0.7) = 7 training samples: 2 steps.
    assert_eq!(m.steps(), 2);
    let names: Vec<&str> = h.metrics.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["loss", "accuracy", "val_loss", "val_accuracy"]);
    let v = m
        .evaluate(&x[7 * 3..], Targets::Sparse(&y[7..]), 4)
        .unwrap();
    assert_eq!(h.get("val_loss").unwrap()[0], v.get("loss").unwrap());
    assert_eq!(h.get("val_acc").unwrap()[0], v.get("accuracy").unwrap());
}

#[test]
fn shuffle_is_deterministic_for_a_seed() {
    let (x, y) = blobs(4, 100, 3);
    let run = |seed: u64, shuffle: bool| {
        let mut m = model(seed, 3, 0.3);
        m.compile(sgd(0.05), Loss::SparseCategoricalCrossentropy, &[])
            .unwrap();
        let opts = FitOptions {
            shuffle,
            ..quiet(8, 2)
        };
        m.fit(&x, Targets::Sparse(&y), opts).unwrap();
        m.get_weights().unwrap()
    };
    assert_eq!(run(9, true), run(9, true));
    assert_ne!(run(9, true), run(10, true));
    assert_ne!(run(9, true), run(9, false));
}

#[test]
fn recompile_keeps_weights_and_resets_optimizer() {
    let (x, y) = blobs(5, 64, 3);
    let mut m = model(5, 3, 0.0);
    m.compile(
        Optimizer::adam(1e-3).unwrap(),
        Loss::SparseCategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    m.fit(&x, Targets::Sparse(&y), quiet(16, 1)).unwrap();
    assert_eq!(m.optimizer_iterations().unwrap(), 4);
    let w = m.get_weights().unwrap();
    m.compile(
        Optimizer::adam(1e-4).unwrap(),
        Loss::SparseCategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    assert_eq!(m.get_weights().unwrap(), w);
    assert_eq!(m.optimizer_iterations().unwrap(), 0);
    // A fresh Adam's first step moves every weight with a nonzero gradient
    // by about lr (m/sqrt(v) = sign(g) at t = 1), whatever the old moments were.
    let (_, g) = m
        .compute_gradients(&x[..16 * 3], Targets::Sparse(&y[..16]))
        .unwrap();
    let opts = FitOptions {
        shuffle: false,
        ..quiet(16, 1)
    };
    m.fit(&x[..16 * 3], Targets::Sparse(&y[..16]), opts)
        .unwrap();
    let w2 = m.get_weights().unwrap();
    let k0 = &g[0].1;
    for (j, (&a, &b)) in w[0].iter().zip(&w2[0]).enumerate() {
        if k0[j].abs() > 1e-4 {
            let step = (a - b).abs();
            assert!((step - 1e-4).abs() < 2e-6, "kernel[{j}] moved {step}");
        }
    }
}

#[test]
fn nan_loss_stops_with_a_clear_message() {
    let (mut x, y) = blobs(6, 40, 3);
    x[25 * 3] = f32::NAN; // sample 25: batch 3 (of 4) without shuffling
    let mut m = model(5, 3, 0.0);
    m.compile(sgd(0.1), Loss::SparseCategoricalCrossentropy, &[])
        .unwrap();
    let opts = FitOptions {
        shuffle: false,
        ..quiet(10, 3)
    };
    let e = m
        .fit(&x, Targets::Sparse(&y), opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fit") && e.contains("NaN"), "{e}");
    assert!(e.contains("epoch 1") && e.contains("batch 3"), "{e}");
}

#[test]
fn targets_are_checked() {
    let (x, y) = blobs(6, 10, 3);
    let mut m = model(5, 3, 0.0);
    m.compile(sgd(0.1), Loss::SparseCategoricalCrossentropy, &[])
        .unwrap();
    let e = m
        .fit(&x, Targets::Sparse(&y[..9]), quiet(4, 1))
        .unwrap_err();
    assert!(e.to_string().contains("targets"), "{e}");
    let mut bad = y.clone();
    bad[3] = 7;
    let e = m.fit(&x, Targets::Sparse(&bad), quiet(4, 1)).unwrap_err();
    assert!(e.to_string().contains("class index 7"), "{e}");
    let e = m
        .fit(&x[..29], Targets::Sparse(&y), quiet(4, 1))
        .unwrap_err();
    assert!(e.to_string().contains("x length"), "{e}");
    let e = m
        .compile(sgd(0.1), Loss::BinaryCrossentropy, &[])
        .unwrap_err();
    assert!(e.to_string().contains("sigmoid"), "{e}");
}

#[test]
fn binary_and_regression_heads() {
    let (x, y) = blobs(7, 256, 3);
    let yf: Vec<f32> = y.iter().map(|&v| v as f32).collect();
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Dense::new(8).activation(Act::Tanh))
        .add(Dense::new(1).activation(Act::Sigmoid));
    m.build(&[3]).unwrap();
    m.compile(
        Optimizer::rmsprop(0.01).unwrap(),
        Loss::BinaryCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    let h = m.fit(&x, Targets::Dense(&yf), quiet(16, 10)).unwrap();
    assert!(*h.get("accuracy").unwrap().last().unwrap() > 0.9, "{h:?}");
    let p = m.predict(&x[..30], 7).unwrap();
    assert!(p.iter().all(|&v| (0.0..=1.0).contains(&v)));

    let mut r = Rng::new(2);
    let xr = r.vec(200 * 2, -1.0, 1.0);
    let yr: Vec<f32> = xr
        .chunks(2)
        .map(|v| 0.5 * v[0] - 0.3 * v[1] + 0.1)
        .collect();
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Dense::new(1));
    m.build(&[2]).unwrap();
    m.compile(Optimizer::rmsprop(0.01).unwrap(), Loss::Mse, &[Metric::Mae])
        .unwrap();
    let h = m.fit(&xr, Targets::Dense(&yr), quiet(10, 20)).unwrap();
    assert!(*h.get("mae").unwrap().last().unwrap() < 0.05, "{h:?}");
}

#[test]
fn early_stopping_scripted() {
    // min mode (auto for val_loss), patience 2.
    let mut es = EarlyStopping::new("val_loss").patience(2);
    assert!(!es.maximizes());
    let seq = [1.0, 0.9, 0.95, 0.91, 0.8];
    let steps: Vec<_> = seq[..4]
        .iter()
        .enumerate()
        .map(|(e, &v)| es.update(e, v))
        .collect();
    use EarlyStoppingStep::*;
    assert_eq!(steps[..4], [Improved, Improved, Waiting, Stop]);
    assert_eq!(es.best(), 0.9);
    assert_eq!(es.stopped_epoch(), Some(3));

    // auto = max for anything with "acc"; min_delta: an improvement must
    // exceed it (current - min_delta > best).
    let mut es = EarlyStopping::new("val_acc").patience(3).min_delta(0.01);
    assert!(es.maximizes());
    assert_eq!(es.update(0, 0.5), Improved);
    assert_eq!(es.update(1, 0.505), Waiting); // 0.495 > 0.5 is false
    assert_eq!(es.update(2, 0.52), Improved);
    assert_eq!(es.wait(), 0);
    assert_eq!(es.update(3, 0.52), Waiting);
    assert_eq!(es.update(4, 0.529), Waiting);
    assert_eq!(es.update(5, 0.1), Stop);
    assert_eq!(es.best_epoch(), Some(2));
    assert!(EarlyStopping::new("val_accuracy").maximizes());
    // patience 0 stops at the first epoch without improvement.
    let mut es = EarlyStopping::new("loss");
    assert_eq!(es.update(0, 1.0), Improved);
    assert_eq!(es.update(1, 1.0), Stop);
}

fn logs(name: &str, v: f64) -> Logs {
    let mut l = Logs::default();
    l.set(name, v);
    l
}

#[test]
fn early_stopping_restores_best_weights_only_when_it_stops() {
    let mut m = model(1, 3, 0.0);
    let set_all = |m: &mut Sequential<CpuBackend>, v: f32| {
        let w: Vec<Vec<f32>> = m
            .get_weights()
            .unwrap()
            .iter()
            .map(|t| vec![v; t.len()])
            .collect();
        m.set_weights(&w).unwrap();
    };
    let first = |m: &Sequential<CpuBackend>| m.get_weights().unwrap()[0][0];
    // Stops: weights of the best epoch (1) come back.
    let mut es = EarlyStopping::new("val_accuracy")
        .patience(2)
        .restore_best_weights(true);
    Callback::<CpuBackend>::on_train_begin(&mut es, &mut m).unwrap();
    let script = [0.5, 0.7, 0.6, 0.65];
    let mut verdicts = Vec::new();
    for (e, &v) in script.iter().enumerate() {
        set_all(&mut m, e as f32);
        verdicts.push(es.on_epoch_end(e, &logs("val_acc", v), &mut m).unwrap());
    }
    use kestrel::train::Verdict::*;
    assert_eq!(verdicts, [Continue, Continue, Continue, Stop]);
    assert_eq!(first(&m), 1.0);
    // Runs out of epochs without stopping: the last weights stay.
    let mut es = EarlyStopping::new("val_loss")
        .patience(5)
        .restore_best_weights(true);
    Callback::<CpuBackend>::on_train_begin(&mut es, &mut m).unwrap();
    for (e, &v) in [0.5, 0.4, 0.6].iter().enumerate() {
        set_all(&mut m, 10.0 + e as f32);
        assert_eq!(
            es.on_epoch_end(e, &logs("val_loss", v), &mut m).unwrap(),
            Continue
        );
    }
    Callback::<CpuBackend>::on_train_end(&mut es, &mut m).unwrap();
    assert_eq!(first(&m), 12.0);
    // tf.keras's rule: the best weights come back at the end of training
    // even without an early stop.
    let mut es = EarlyStopping::new("val_loss")
        .patience(5)
        .restore_best_weights(true)
        .restore_at_train_end(true);
    Callback::<CpuBackend>::on_train_begin(&mut es, &mut m).unwrap();
    for (e, &v) in [0.5, 0.4, 0.6].iter().enumerate() {
        set_all(&mut m, 20.0 + e as f32);
        es.on_epoch_end(e, &logs("val_loss", v), &mut m).unwrap();
    }
    assert_eq!(first(&m), 22.0);
    Callback::<CpuBackend>::on_train_end(&mut es, &mut m).unwrap();
    assert_eq!(first(&m), 21.0, "the best epoch (1) is restored");
    // A monitor that is not logged is an error, not a silent no-op.
    let e = es.on_epoch_end(3, &logs("loss", 1.0), &mut m).unwrap_err();
    assert!(e.to_string().contains("val_loss"), "{e}");
}

#[test]
fn early_stopping_in_fit() {
    let (x, y) = blobs(8, 64, 3);
    let mut m = model(1, 3, 0.0);
    // lr 1e-30: nothing changes, so val_loss never improves after epoch 0.
    m.compile(
        sgd(1e-30),
        Loss::SparseCategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    let mut es = EarlyStopping::new("val_loss").patience(2);
    let opts = FitOptions {
        validation: Validation::Split(0.25),
        callbacks: vec![&mut es],
        ..quiet(16, 20)
    };
    let h = m.fit(&x, Targets::Sparse(&y), opts).unwrap();
    assert_eq!(h.epoch, [0, 1, 2]);
    assert_eq!(es.stopped_epoch(), Some(2));
}
