//! Weights files and checkpoints: round trips, resume = uninterrupted run,
//! corrupted files, atomic writes.
mod common;

use std::path::PathBuf;

use common::Rng;
use kestrel::backend::CpuBackend;
use kestrel::nn::{Act, BatchNormalization, Dense, Dropout, Sequential};
use kestrel::ops::optim::Optimizer;
use kestrel::train::{FitOptions, Loss, Metric, ModelCheckpoint, Targets, Validation};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn data() -> (Vec<f32>, Vec<u32>) {
    let mut r = Rng::new(11);
    let x = r.vec(90 * 5, -1.0, 1.0);
    let y = (0..90)
        .map(|i| (x[i * 5] + x[i * 5 + 1] > 0.0) as u32 * 2)
        .collect();
    (x, y)
}

fn model(seed: u64) -> Sequential<CpuBackend> {
    let mut m = Sequential::new(CpuBackend, seed);
    m.add(Dense::new(12).activation(Act::Relu))
        .add(BatchNormalization::new())
        .add(Dropout::new(0.3))
        .add(Dense::new(3).activation(Act::Softmax));
    m.build(&[5]).unwrap();
    m.compile(
        Optimizer::adam(0.01).unwrap(),
        Loss::SparseCategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    m
}

fn opts<'a>(epochs: usize, initial: usize) -> FitOptions<'a, CpuBackend> {
    FitOptions {
        batch_size: 8,
        epochs,
        initial_epoch: initial,
        validation: Validation::Split(0.2),
        verbose: 0,
        ..Default::default()
    }
}

#[test]
fn weights_round_trip() {
    let d = tmpdir("rt");
    let p = d.join("w.safetensors");
    let (x, y) = data();
    let mut a = model(1);
    a.fit(&x, Targets::Sparse(&y), opts(2, 0)).unwrap();
    a.save_weights(&p).unwrap();
    let mut b = model(2);
    assert_ne!(a.get_weights().unwrap(), b.get_weights().unwrap());
    b.load_weights(&p).unwrap();
    assert_eq!(a.get_weights().unwrap(), b.get_weights().unwrap());
    assert_eq!(a.predict(&x, 16).unwrap(), b.predict(&x, 16).unwrap());
    // The file holds Keras-style names, moving statistics included.
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        [
            "batch_normalization/beta",
            "batch_normalization/gamma",
            "batch_normalization/moving_mean",
            "batch_normalization/moving_variance",
            "dense/bias",
            "dense/kernel",
            "dense_1/bias",
            "dense_1/kernel"
        ]
    );
    // A model with other shapes is refused, naming the tensor.
    let mut c = Sequential::new(CpuBackend, 1);
    c.add(Dense::new(13))
        .add(BatchNormalization::new())
        .add(Dense::new(3));
    c.build(&[5]).unwrap();
    let e = c.load_weights(&p).unwrap_err().to_string();
    assert!(
        e.contains("dense/kernel") && e.contains("[5, 13]") && e.contains("[5, 12]"),
        "{e}"
    );
}

#[test]
fn resume_gives_the_same_weights() {
    let d = tmpdir("resume");
    let ck = d.join("ck.safetensors");
    let (x, y) = data();
    let mut full = model(3);
    let h_full = full.fit(&x, Targets::Sparse(&y), opts(5, 0)).unwrap();

    let mut first = model(3);
    let mut cb = ModelCheckpoint::new(&ck);
    let o = FitOptions {
        callbacks: vec![&mut cb],
        ..opts(2, 0)
    };
    first.fit(&x, Targets::Sparse(&y), o).unwrap();
    drop(first);
    // A fresh process: same architecture and compile, then the checkpoint.
    let mut resumed = model(99);
    resumed.load_checkpoint(&ck).unwrap();
    assert_eq!(resumed.epochs_done(), 2);
    resumed
        .fit(&x, Targets::Sparse(&y), opts(5, resumed.epochs_done()))
        .unwrap();
    assert_eq!(resumed.get_weights().unwrap(), full.get_weights().unwrap());
    assert_eq!(resumed.steps(), full.steps());
    assert_eq!(
        resumed.optimizer_iterations().unwrap(),
        full.optimizer_iterations().unwrap()
    );
    // The history continues the saved one.
    assert_eq!(resumed.history(), &h_full);
    assert_eq!(resumed.history().epoch, [0, 1, 2, 3, 4]);
}

#[test]
fn corrupted_or_truncated_files_are_clear_errors() {
    let d = tmpdir("bad");
    let p = d.join("w.safetensors");
    let m = model(1);
    m.save_weights(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let mut m2 = model(2);
    let before = m2.get_weights().unwrap();
    let t = d.join("truncated.safetensors");
    std::fs::write(&t, &bytes[..bytes.len() - 10]).unwrap();
    let e = m2.load_weights(&t).unwrap_err().to_string();
    assert!(
        e.contains("truncated.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    let g = d.join("garbage.safetensors");
    std::fs::write(&g, b"hello, this is not a tensor file").unwrap();
    let e = m2.load_weights(&g).unwrap_err().to_string();
    assert!(e.contains("garbage.safetensors"), "{e}");
    let e = m2
        .load_weights(d.join("missing.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
    assert_eq!(
        m2.get_weights().unwrap(),
        before,
        "a failed load changes nothing"
    );
    // A weights file is not a checkpoint.
    let e = m2.load_checkpoint(&p).unwrap_err().to_string();
    assert!(
        e.contains("w.safetensors") && e.contains("kestrel-checkpoint-1"),
        "{e}"
    );
}

#[test]
fn atomic_write_leaves_no_partial_file() {
    let d = tmpdir("atomic");
    let p = d.join("w.safetensors");
    let mut m = model(1);
    m.save_weights(&p).unwrap();
    let (x, y) = data();
    m.fit(&x, Targets::Sparse(&y), opts(1, 0)).unwrap();
    m.save_weights(&p).unwrap(); // overwrite
    m.save_checkpoint(d.join("ck.safetensors")).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ck.safetensors", "w.safetensors"]);
    // A failing rename (the target is a directory) leaves nothing behind.
    let blocked = d.join("blocked");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    assert!(m.save_weights(&blocked).is_err());
    let count = std::fs::read_dir(&d).unwrap().count();
    assert_eq!(count, 3, "no temporary file left");
    let mut fresh = model(5);
    fresh.load_weights(&p).unwrap();
    assert_eq!(fresh.get_weights().unwrap(), m.get_weights().unwrap());
}
