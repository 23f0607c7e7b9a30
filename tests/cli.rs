//! The `kestrel` binary end to end: summary, devices, train (all outputs,
//! image data with augmentation, stop + resume), evaluate, and its errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kestrel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // Keep the machine's own data and the network out of the way.
        .env_remove("KESTREL_DATA")
        .env("KESTREL_DATA_URL", "http://127.0.0.1:9/")
        .output()
        .expect("the kestrel binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config_path(prefix: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".toml"))
        .collect();
    names.sort();
    format!("configs/{}", names.first().expect("a config"))
}

#[test]
fn summary_of_c1_prints_the_keras_cnn_parameter_count() {
    let o = kestrel(&["summary", &config_path("c1-")]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("1,250,858"), "{out}");
    assert!(out.contains("conv2d (Conv2D)"), "{out}");
    assert!(out.contains("RMSprop(lr=0.0001"), "{out}");
}

#[test]
fn devices_says_when_there_is_no_driver_and_exits_0() {
    let o = kestrel(&["devices"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    if kestrel::cuda::driver_present() {
        assert!(out.contains("CUDA driver"), "{out}");
    } else {
        assert!(out.contains("no CUDA driver"), "{out}");
    }
}

#[test]
fn train_writes_every_output_and_evaluate_reads_the_weights() {
    let d = tmpdir("train");
    let out = d.join("out");
    let out_s = out.to_str().unwrap();
    let cfg = config_path("s004-regression");
    let o = kestrel(&[
        "train", &cfg, "--epochs", "2", "--out", out_s, "--device", "cpu",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let log = text(&o);
    assert!(log.contains("Epoch 2/2") && log.contains("Test:"), "{log}");
    for f in [
        "history.json",
        "history.csv",
        "summary.txt",
        "weights.safetensors",
        "checkpoint.safetensors",
        "checkpoint.json",
        "curves.svg",
        "result.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing; log:\n{log}");
    }
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["status"], "finished");
    assert_eq!(result["epochs"], 2);
    let mae = result["test"]["mae"].as_f64().unwrap();
    let h: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("history.json")).unwrap()).unwrap();
    for k in ["loss", "mae", "val_loss", "val_mae", "seconds"] {
        assert_eq!(h[k].as_array().map(Vec::len), Some(2), "history.json {k}");
    }
    let w = out.join("weights.safetensors");
    let o = kestrel(&["evaluate", &cfg, "--weights", w.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(line.contains(&format!("mae: {mae:.4}")), "{line} vs {mae}");
}

/// Writes a tiny Fashion-MNIST in the IDX format (uncompressed).
fn fake_fashion_mnist(dir: &Path, train: usize, test: usize) {
    let mut seed = 12345u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let labels: Vec<u8> = (0..n).map(|_| (next() % 10) as u8).collect();
        let mut img = vec![0, 0, 8, 3];
        for d in [n as u32, 28, 28] {
            img.extend(d.to_be_bytes());
        }
        for &l in &labels {
            // A class-dependent bright block plus noise, so a model can learn.
            for y in 0..28 {
                for x in 0..28 {
                    let on = y / 10 == (l as usize) % 3 && x / 10 == (l as usize) / 3 % 3;
                    img.push(if on { 200 } else { (next() % 60) as u8 });
                }
            }
        }
        let mut lab = vec![0, 0, 8, 1];
        lab.extend((n as u32).to_be_bytes());
        lab.extend(&labels);
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
}

const IMAGE_RUN: &str = r#"
description = "a tiny conv net on a fake Fashion-MNIST, with augmentation"
seed = 11
keras = "tf_keras"
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]

[data]
dataset = "fashion_mnist"

[fit]
batch_size = 16
epochs = 3
validation_first = 20

[model]
layers = [
  { type = "conv2d", filters = 4, kernel_size = 3, padding = "same", activation = "relu" },
  { type = "max_pooling2d", pool_size = 2 },
  { type = "dropout", rate = 0.25 },
  { type = "flatten" },
  { type = "dense", units = 10, activation = "softmax" },
]

[optimizer]
kind = "rmsprop"
lr = 1e-3
decay = 1e-4

[augmentation]
width_shift_range = 0.1
height_shift_range = 0.1
horizontal_flip = true
"#;

/// `--stop-after` stops with a checkpoint exactly as Ctrl-C does (the same
/// flag path), and `--resume` then gives the same final weights as an
/// uninterrupted run, with the augmentation generator restored too.
#[test]
fn resume_after_a_stop_gives_the_same_weights_as_an_uninterrupted_run() {
    let d = tmpdir("resume");
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    fake_fashion_mnist(&data, 100, 30);
    let cfg = d.join("image.toml");
    std::fs::write(&cfg, IMAGE_RUN).unwrap();
    let (cfg, data) = (cfg.to_str().unwrap(), data.to_str().unwrap());
    let straight = d.join("straight");
    let o = kestrel(&[
        "train",
        cfg,
        "--data",
        data,
        "--out",
        straight.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let stopped = d.join("stopped");
    let s = stopped.to_str().unwrap();
    let o = kestrel(&[
        "train",
        cfg,
        "--data",
        data,
        "--out",
        s,
        "--stop-after",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--resume"), "{}", text(&o));
    assert!(!stopped.join("weights.safetensors").exists());
    let o = kestrel(&["train", cfg, "--data", data, "--out", s, "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Resuming"), "{}", text(&o));
    let a = std::fs::read(straight.join("weights.safetensors")).unwrap();
    let b = std::fs::read(stopped.join("weights.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed weights differ from the uninterrupted run's"
    );
    let ra = std::fs::read_to_string(straight.join("result.json")).unwrap();
    let rb = std::fs::read_to_string(stopped.join("result.json")).unwrap();
    let acc = |r: &str| {
        let v: serde_json::Value = serde_json::from_str(r).unwrap();
        v["test"]["accuracy"].as_f64().unwrap()
    };
    assert_eq!(acc(&ra), acc(&rb));
}

#[test]
fn a_bad_config_fails_with_a_message_naming_file_and_key() {
    let d = tmpdir("bad");
    let p = d.join("bad.toml");
    std::fs::write(
        &p,
        IMAGE_RUN.replace("epochs = 3", "epochs = 3\nepochz = 4"),
    )
    .unwrap();
    let o = kestrel(&[
        "train",
        p.to_str().unwrap(),
        "--out",
        d.join("o").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.toml") && e.contains("epochz"), "{e}");
}

#[test]
fn device_cuda_without_a_driver_is_a_clear_error() {
    if kestrel::cuda::driver_present() {
        eprintln!("a CUDA driver is present: the no-driver error path cannot be exercised here");
        return;
    }
    let d = tmpdir("cuda");
    let o = kestrel(&[
        "train",
        &config_path("s001-lr-0.01"),
        "--device",
        "cuda",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no CUDA driver"), "{}", text(&o));
}

#[test]
fn usage_errors_come_from_clap() {
    let o = kestrel(&["train"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("CONFIG"), "{}", text(&o));
    let o = kestrel(&["train", "x.toml", "--device", "tpu"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("tpu"), "{}", text(&o));
}
