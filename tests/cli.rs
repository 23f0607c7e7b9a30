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
    assert!(
        text(&o).contains("--device cpu") && text(&o).contains("runs on the CPU"),
        "{}",
        text(&o)
    );
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

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_file(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn sha256_hex(p: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(p).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A small, fast config (10 epochs by default) written into `d`.
fn small_config(d: &Path) -> String {
    let p = d.join("small.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(config_path("s004-regression")),
    )
    .unwrap()
    .replace("epochs = 80", "epochs = 10")
    .replace("samples = 404", "samples = 96")
    .replace("test_samples = 102", "test_samples = 32");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// `--data DIR` means that folder: a missing, empty, incomplete folder or a
/// truncated file there is an error naming the file, never a silent
/// fallback to another copy (Debian's, when installed); nothing is created.
#[test]
fn data_dir_is_authoritative_through_the_binary() {
    let d = tmpdir("data-auth");
    let cfg = d.join("image.toml");
    std::fs::write(&cfg, IMAGE_RUN.replace("epochs = 3", "epochs = 1")).unwrap();
    let cfg = cfg.to_str().unwrap();
    let data = d.join("data");
    let train = |data: &Path, out: &str| {
        kestrel(&[
            "train",
            cfg,
            "--data",
            data.to_str().unwrap(),
            "--out",
            d.join(out).to_str().unwrap(),
        ])
    };
    // Missing.
    let o = train(&d.join("nope"), "o1");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("nope") && stderr(&o).contains("no such directory"),
        "{}",
        text(&o)
    );
    // Empty.
    std::fs::create_dir_all(&data).unwrap();
    let o = train(&data, "o2");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("train-images-idx3-ubyte"),
        "{}",
        text(&o)
    );
    // Only some of the files.
    fake_fashion_mnist(&data, 60, 20);
    std::fs::remove_file(data.join("t10k-labels-idx1-ubyte")).unwrap();
    let o = train(&data, "o3");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("missing: t10k-labels-idx1-ubyte"),
        "{}",
        text(&o)
    );
    // A truncated file.
    fake_fashion_mnist(&data, 60, 20);
    let f = data.join("t10k-images-idx3-ubyte");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let o = train(&data, "o4");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains(&f.display().to_string()),
        "the truncated file is named: {}",
        text(&o)
    );
    // A generated data set reads no files: --data is an error, not ignored.
    let small = small_config(&d);
    let o = kestrel(&[
        "train",
        &small,
        "--data",
        data.to_str().unwrap(),
        "--out",
        d.join("o5").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("--data") && stderr(&o).contains("synthetic_regression is generated"),
        "{}",
        text(&o)
    );
    for out in ["o1", "o2", "o3", "o4", "o5"] {
        assert!(!d.join(out).exists(), "{out} was created");
    }
    // Whole: the run says once which files it used, with their checksums,
    // and records them in result.json and summary.txt.
    fake_fashion_mnist(&data, 60, 20);
    let o = train(&data, "ok");
    assert!(o.status.success(), "{}", text(&o));
    let out = d.join("ok");
    let result = json_file(&out.join("result.json"));
    let files = result["data"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 4);
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    for name in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        let p = data.join(name);
        let sum = sha256_hex(&p);
        assert!(
            files
                .iter()
                .any(|f| f["path"] == p.to_str().unwrap() && f["sha256"] == sum.as_str()),
            "{name} not in result.json: {files:?}"
        );
        assert_eq!(stderr(&o).matches(&sum).count(), 1, "printed once");
        assert!(summary.contains(&sum), "{summary}");
    }
    assert!(
        result["data"]["source"]
            .as_str()
            .unwrap()
            .contains(data.to_str().unwrap())
    );
}

/// A folder holding a run is not overwritten without --overwrite (replace)
/// or --resume (continue); --resume without a checkpoint leaves nothing.
#[test]
fn an_existing_run_is_not_overwritten() {
    let d = tmpdir("overwrite");
    let cfg = small_config(&d);
    let out = d.join("out");
    let o_s = out.to_str().unwrap();
    let train = |extra: &[&str]| {
        let mut args = vec!["train", cfg.as_str(), "--out", o_s, "--epochs", "2"];
        args.extend(extra);
        kestrel(&args)
    };
    // --resume into a folder that does not exist: an error, and no folder.
    let o = train(&["--resume"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("--resume"), "{}", text(&o));
    assert!(!out.exists(), "--resume without a checkpoint created {o_s}");

    let o = train(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let files = [
        "weights.safetensors",
        "history.json",
        "curves.svg",
        "result.json",
    ];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    let o = train(&["--seed", "99"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = stderr(&o);
    assert!(
        e.contains("finished run (2 epochs)")
            && e.contains("--overwrite")
            && e.contains("--resume"),
        "{e}"
    );
    for (f, b) in files.iter().zip(&before) {
        assert!(std::fs::read(out.join(f)).unwrap() == *b, "{f} changed");
    }
    // --overwrite replaces it.
    let o = train(&["--seed", "99", "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json_file(&out.join("result.json"))["seed"], 99);
    assert!(std::fs::read(out.join("weights.safetensors")).unwrap() != before[0]);
    // An interrupted run is refused the same way, and says so.
    let o = train(&["--overwrite", "--stop-after", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = train(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("interrupted run"), "{}", text(&o));
    // Both flags at once: refused by clap.
    let o = train(&["--overwrite", "--resume"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--overwrite"), "{}", text(&o));
}

/// `--epochs 0` is rejected as `epochs = 0` in a config is, and creates
/// nothing.
#[test]
fn zero_epochs_is_rejected_on_the_command_line_and_in_a_config() {
    let d = tmpdir("zero");
    let cfg = small_config(&d);
    let o = kestrel(&[
        "train",
        &cfg,
        "--epochs",
        "0",
        "--out",
        d.join("o").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("--epochs: must be at least 1, got 0"),
        "{}",
        text(&o)
    );
    let zero = d.join("zero.toml");
    std::fs::write(
        &zero,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("epochs = 10", "epochs = 0"),
    )
    .unwrap();
    let o = kestrel(&[
        "train",
        zero.to_str().unwrap(),
        "--out",
        d.join("o").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("fit.epochs: must be at least 1, got 0"),
        "{}",
        text(&o)
    );
    assert!(!d.join("o").exists());
    let o = kestrel(&[
        "train",
        &cfg,
        "--stop-after",
        "0",
        "--out",
        d.join("o").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("--stop-after"), "{}", text(&o));
}

/// The "Continue with" hint repeats the flags the run was started with, the
/// checkpoint remembers them (a plain --resume trains to --epochs, not to
/// the config's), and --resume on a finished run says it is finished and
/// how to extend it; extending gives the same weights as a longer run.
#[test]
fn resume_remembers_the_flags_and_a_finished_run_says_so() {
    let d = tmpdir("flags");
    let cfg = small_config(&d);
    let out = d.join("out");
    let o_s = out.to_str().unwrap();
    let o = kestrel(&[
        "train",
        &cfg,
        "--out",
        o_s,
        "--epochs",
        "3",
        "--stop-after",
        "1",
        "--seed",
        "5",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let hint = stderr(&o)
        .lines()
        .find_map(|l| l.split("Continue with: ").nth(1).map(str::to_string))
        .expect("a Continue with hint");
    assert!(
        hint.contains("--epochs 3") && hint.contains("--seed 5") && hint.ends_with("--resume"),
        "{hint}"
    );
    // Run the hint as given (without the program name); then a plain
    // --resume was enough too: the run trained to 3 epochs.
    let args: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let o = kestrel(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(stderr(&o).contains("Resuming"), "{}", text(&o));
    assert_eq!(json_file(&out.join("result.json"))["epochs"], 3);

    // --resume on the finished run: says so, no "Resuming".
    let o = kestrel(&["train", &cfg, "--out", o_s, "--resume"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = stderr(&o);
    assert!(
        e.contains("finished (3 epochs)") && e.contains("--epochs N") && !e.contains("Resuming"),
        "{e}"
    );
    // Extending it to 5 epochs equals training 5 straight away.
    let o = kestrel(&["train", &cfg, "--out", o_s, "--resume", "--epochs", "5"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stderr(&o).contains("from 3 epochs to 5 epochs"),
        "{}",
        text(&o)
    );
    let straight = d.join("straight");
    let o = kestrel(&[
        "train",
        &cfg,
        "--out",
        straight.to_str().unwrap(),
        "--epochs",
        "5",
        "--seed",
        "5",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read(out.join("weights.safetensors")).unwrap()
            == std::fs::read(straight.join("weights.safetensors")).unwrap(),
        "the extended run differs from the straight one"
    );
    assert_eq!(
        json_file(&out.join("result.json"))["test"],
        json_file(&straight.join("result.json"))["test"]
    );
}

/// Final metrics on stdout (a line, or JSON), progress on stderr; one
/// seconds-per-epoch figure; "1 epoch"; the Test line as evaluate's; the
/// curves' title shows this run's result.
#[test]
fn final_lines_stdout_and_json() {
    let d = tmpdir("final");
    let cfg = small_config(&d);
    let out = d.join("out");
    let o = kestrel(&[
        "train",
        &cfg,
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let (so, se) = (stdout(&o), stderr(&o));
    assert!(
        !so.contains("Epoch 1/1") && se.contains("Epoch 1/1"),
        "{so}"
    );
    let result = json_file(&out.join("result.json"));
    let mae = result["test"]["mae"].as_f64().unwrap();
    let loss = result["test"]["loss"].as_f64().unwrap();
    assert_eq!(so, format!("loss: {loss:.4} - mae: {mae:.4}\n"));
    let spe = result["seconds_per_epoch"].as_f64().unwrap();
    let test_line = se.lines().find(|l| l.starts_with("Test: ")).unwrap();
    assert!(
        test_line.starts_with(&format!(
            "Test: loss: {loss:.4} - mae: {mae:.4} - 1 epoch, {spe:.2} s/epoch"
        )),
        "{test_line}"
    );
    assert!(!se.contains("1 epochs"), "{se}");
    assert_eq!(se.matches("s/epoch").count(), 1, "one s/epoch figure: {se}");
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(
        svg.contains(&format!("this run: test mae {mae:.4} after 1 epoch")),
        "{svg}"
    );

    let o = kestrel(&[
        "train",
        &cfg,
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "2",
        "--overwrite",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("stdout is JSON");
    assert_eq!(j, json_file(&out.join("result.json")));
    assert_eq!(j["status"], "finished");
    assert_eq!(j["epochs"], 2);
}

#[test]
fn summary_shows_user_facing_names() {
    let o = kestrel(&["summary", &config_path("s001-early-stopping")]);
    assert!(o.status.success(), "{}", text(&o));
    let s = stdout(&o);
    assert!(s.contains("data: synthetic_two_class"), "{s}");
    assert!(s.contains("mode auto"), "{s}");
    assert!(
        !s.contains("Auto") && !s.contains("synthetictwoclass"),
        "{s}"
    );
}

/// Every `kestrel train` option is in the README, as is how to run the
/// binary itself.
#[test]
fn readme_lists_every_train_option() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let help = stdout(&kestrel(&["train", "--help"]));
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-'))
        .filter(|w| *w != "--help")
        .collect();
    assert!(flags.len() >= 10, "{help}");
    for f in flags {
        assert!(readme.contains(f), "README does not mention {f}");
    }
    assert!(
        readme.contains("target/release/kestrel"),
        "README: how to run kestrel"
    );
}

/// The progress bar keeps the Keras look: not on a terminal, one line per
/// epoch (`steps/steps [=====] - time per-step - metrics`); on a terminal
/// (through `script`, where installed) a live bar with the ETA.
#[test]
fn progress_keeps_the_keras_look() {
    let d = tmpdir("progress");
    let cfg = small_config(&d);
    let o = kestrel(&[
        "train",
        &cfg,
        "--out",
        d.join("o").to_str().unwrap(),
        "--epochs",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let se = stderr(&o);
    let lines: Vec<&str> = se.lines().filter(|l| l.contains("/step")).collect();
    assert_eq!(lines.len(), 2, "one line per epoch: {se}");
    for l in lines {
        assert!(
            l.starts_with(&format!("5/5 [{}] - ", "=".repeat(30))) && l.contains(" - loss: "),
            "{l}"
        );
    }
    assert!(!se.contains("ETA"), "no live bar off a terminal: {se}");

    let script = Path::new("/usr/bin/script");
    if !script.exists() {
        eprintln!("note: no /usr/bin/script, the live bar on a terminal is not checked");
        return;
    }
    // Enough steps (batch 2) that the bar redraws (every 0.1 s).
    let big = d.join("big.toml");
    std::fs::write(
        &big,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("samples = 96", "samples = 20000")
            .replace("batch_size = 16", "batch_size = 2"),
    )
    .unwrap();
    let cmd = format!(
        "{} train {} --out {} --epochs 1 --device cpu",
        env!("CARGO_BIN_EXE_kestrel"),
        big.display(),
        d.join("tty").display()
    );
    let o = Command::new(script)
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("KESTREL_DATA")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let frame = t
        .split(['\r', '\n'])
        .find(|l| l.contains("ETA: "))
        .unwrap_or_else(|| panic!("no live bar on a terminal: {t:?}"));
    assert!(
        frame.contains("/8000 [")
            && frame.contains(">")
            && frame.contains("] - ETA: ")
            && frame.contains(" - loss: "),
        "{frame:?}"
    );
}

/// `--no-cuda-graph` and `--no-staged-upload` are accepted and, on the CPU
/// (which never captures steps and has no uploads), change nothing: the
/// same test metrics as without them.
#[test]
fn no_cuda_graph_changes_nothing_on_the_cpu() {
    let d = tmpdir("no-cuda-graph");
    let cfg = small_config(&d);
    let run = |dir: &str, extra: &[&str]| {
        let out = d.join(dir);
        let mut args = vec![
            "train",
            &cfg,
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "2",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let o = kestrel(&args);
        assert!(o.status.success(), "{}", text(&o));
        stdout(&o)
    };
    let with_graph = run("default", &[]);
    let without = run("no-graph", &["--no-cuda-graph"]);
    let plain = run("no-staged", &["--no-staged-upload"]);
    assert!(!with_graph.trim().is_empty(), "no test metrics printed");
    assert_eq!(with_graph, without);
    assert_eq!(with_graph, plain);
}
