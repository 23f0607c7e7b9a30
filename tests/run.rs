//! Run configs, augmentation, run outputs, resume and interruption, in
//! process (the binary itself is exercised in tests/cli.rs).
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use kestrel::error::Error;
use kestrel::run::augment::{Augmenter, shift_flip};
use kestrel::run::config::{AugmentationConfig, LoadedConfig, named_network};
use kestrel::run::outputs::{EpochRow, RunHistory, curves_svg, nice_ticks};
use kestrel::run::{self, DeviceChoice, Ending, TrainOptions, files};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-run-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

fn all_configs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(configs_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

fn parse(text: &str) -> kestrel::Result<LoadedConfig> {
    LoadedConfig::parse(text, Path::new("configs/test-bad.toml"))
}

/// A small valid config that the error tests break one key at a time.
const GOOD: &str = r#"
seed = 3
loss = "categorical_crossentropy"
metrics = ["accuracy"]

[data]
dataset = "synthetic_multiclass"
samples = 120
test_samples = 40
features = 6
classes = 3
noise = 1.0
seed = 9

[fit]
batch_size = 16
epochs = 2
validation_split = 0.25

[model]
layers = [
  { type = "dense", units = 16, activation = "relu" },
  { type = "batch_normalization" },
  { type = "dropout", rate = 0.2 },
  { type = "dense", units = 3, activation = "softmax" },
]

[optimizer]
kind = "adam"
lr = 0.01
"#;

#[test]
fn the_good_config_parses() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.config.seed, 3);
    assert_eq!(c.layers().unwrap().len(), 4);
    assert_eq!(c.stem(), "test-bad");
}

/// Each kind of mistake gives an error naming the file and the key.
#[test]
fn bad_configs_name_the_file_and_the_key() {
    let cases: &[(&str, &str, &[&str])] = &[
        // (what to replace, with what, what the message must mention)
        ("seed = 3", "seed = 3\nsed = 4", &["unknown field", "sed"]),
        (
            "{ type = \"dense\", units = 16,",
            "{ type = \"dense\", unit = 16,",
            &["unknown field", "unit"],
        ),
        ("type = \"dropout\"", "type = \"dropuot\"", &["dropuot"]),
        ("lr = 0.01", "lr = \"fast\"", &["lr", "invalid type"]),
        ("rate = 0.2", "rate = 1.5", &["model.layers[2].rate", "1.5"]),
        ("lr = 0.01", "lr = -1.0", &["optimizer", "lr", "-1"]),
        (
            "validation_split = 0.25",
            "validation_split = 0.25\nvalidation_first = 10",
            &["fit.validation_first", "at most one"],
        ),
        (
            "validation_split = 0.25",
            "validation_split = 1.5",
            &["fit.validation_split"],
        ),
        (
            "lr = 0.01",
            "lr = 0.01\nmomentum = 0.9",
            &["optimizer.momentum", "adam"],
        ),
        (
            "activation = \"relu\"",
            "activation = \"rellu\"",
            &["rellu"],
        ),
        ("batch_size = 16", "batch_size = 0", &["fit.batch_size"]),
        ("features = 6\n", "", &["data.features", "required"]),
        ("classes = 3", "classes = 1", &["data.classes"]),
        (
            "[optimizer]\nkind = \"adam\"\nlr = 0.01",
            "",
            &["missing field", "optimizer"],
        ),
        (
            "loss = \"categorical_crossentropy\"",
            "loss = \"mse\"",
            &["loss", "class labels"],
        ),
        (
            "loss = \"categorical_crossentropy\"",
            "loss = \"hinge\"",
            &["hinge"],
        ),
        (
            "[model]",
            "[model]\nnetwork = \"keras-cnn\"",
            &["model", "either `network` or `layers`"],
        ),
        (
            "[optimizer]",
            "[early_stopping]\nmonitor = \"val_loss\"\npatience = 2\nfoo = 1\n\n[optimizer]",
            &["unknown field", "foo"],
        ),
        ("units = 3,", "units = 0,", &["model.layers[3].units"]),
        (
            "dataset = \"synthetic_multiclass\"",
            "dataset = \"mnist\"",
            &["mnist"],
        ),
        (
            "seed = 9",
            "seed = 9\n[augmentation]\nwidth_shift_range = 0.1",
            &["augmentation", "image"],
        ),
    ];
    for (from, to, wants) in cases {
        assert!(GOOD.contains(from), "test case does not apply: {from}");
        let text = GOOD.replacen(from, to, 1);
        let e = match parse(&text) {
            Ok(_) => panic!("accepted a bad config ({from} -> {to})"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("configs/test-bad.toml"),
            "error does not name the file: {e}"
        );
        for w in *wants {
            assert!(e.contains(w), "error for ({from} -> {to}) lacks {w:?}: {e}");
        }
    }
}

#[test]
fn early_stopping_on_validation_needs_validation_data() {
    let text = GOOD.replace("validation_split = 0.25", "")
        + "\n[early_stopping]\nmonitor = \"val_acc\"\npatience = 1\n";
    let e = parse(&text).unwrap_err().to_string();
    assert!(
        e.contains("early_stopping.monitor") && e.contains("validation"),
        "{e}"
    );
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    let e = LoadedConfig::load("configs/no-such-run.toml").unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().contains("no-such-run.toml"), "{e}");
}

#[test]
fn every_config_parses_builds_and_summarizes() {
    let configs = all_configs();
    assert!(
        configs.len() >= 24,
        "configs/ holds {} files",
        configs.len()
    );
    for p in &configs {
        let c = LoadedConfig::load(p).unwrap_or_else(|e| panic!("{e}"));
        let s = run::summary_text(&c).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(s.contains("Total params:"), "{}", p.display());
        assert!(
            !c.config.description.is_empty(),
            "{} has no description",
            p.display()
        );
        assert!(c.stages(None).unwrap().iter().all(|s| s.epochs > 0));
    }
}

fn summary_of(prefix: &str) -> String {
    let p = all_configs()
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .unwrap_or_else(|| panic!("no config {prefix}*"));
    run::summary_text(&LoadedConfig::load(&p).unwrap()).unwrap()
}

#[test]
fn parameter_counts_match_seed_runs() {
    for id in [
        "c1-", "c2-", "c3-", "c4-", "c5-", "c6-", "c7-", "c8-", "c9-", "c10-",
    ] {
        assert!(
            summary_of(id).contains("Total params: 1,250,858"),
            "{id}: keras-cnn must have 1,250,858 params"
        );
    }
    for id in ["f1-", "f2-"] {
        let s = summary_of(id);
        assert!(s.contains("Total params: 266,610"), "{id}\n{s}");
    }
    let f4 = summary_of("f4-");
    for want in [
        "Total params: 271,346",
        "Trainable params: 268,978",
        "Non-trainable params: 2,368",
    ] {
        assert!(f4.contains(want), "f4 lacks {want}\n{f4}");
    }
}

#[test]
fn explicit_layer_lists_match_the_named_networks() {
    let cases = [
        ("c1-keras-cnn-rmsprop-1e-4.toml", "keras-cnn"),
        ("c10-keras-cnn-adam-3-stages.toml", "keras-cnn"),
        ("c11-elu-cnn-rmsprop.toml", "elu-cnn"),
        ("c11-elu-cnn-rmsprop-augmented.toml", "elu-cnn"),
        ("f1-mlp-sgd.toml", "mlp"),
    ];
    for (file, net) in cases {
        let c = LoadedConfig::load(configs_dir().join(file)).unwrap();
        assert_eq!(
            c.config.model.layers,
            named_network(net).unwrap(),
            "{file} is not {net}"
        );
    }
}

#[test]
fn c10_and_c3_stages() {
    let c10 = LoadedConfig::load(configs_dir().join("c10-keras-cnn-adam-3-stages.toml")).unwrap();
    let st = c10.stages(None).unwrap();
    assert_eq!(st.len(), 3);
    assert!(st[0].recompile.is_none());
    assert_eq!(st[1].recompile.unwrap().lr, 1e-4);
    assert_eq!(st[2].recompile.unwrap().lr, 1e-5);
    assert_eq!(st[2].recompile.unwrap().epsilon, 1e-8);
    // --epochs caps each stage.
    assert!(c10.stages(Some(2)).unwrap().iter().all(|s| s.epochs == 2));
    let c3 = LoadedConfig::load(configs_dir().join("c3-keras-cnn-rmsprop-1e-5.toml")).unwrap();
    let st = c3.stages(None).unwrap();
    assert_eq!(st.len(), 2);
    assert!(st.iter().all(|s| s.recompile.is_none() && s.epochs == 100));
}

// ---------------------------------------------------------------- augmentation

fn ramp(shape: [usize; 3]) -> Vec<f32> {
    (0..shape.iter().product::<usize>())
        .map(|i| i as f32)
        .collect()
}

#[test]
fn zero_shift_without_flip_is_the_identity() {
    let shape = [3, 5, 7];
    let x = ramp(shape);
    let mut y = vec![0.0; x.len()];
    shift_flip(&x, &mut y, shape, 0, 0, false).unwrap();
    assert_eq!(x, y);
    // An augmenter with nothing switched on leaves batches alone.
    let cfg = AugmentationConfig {
        width_shift_range: 0.0,
        height_shift_range: 0.0,
        horizontal_flip: false,
        fill_mode: Default::default(),
    };
    let mut a = Augmenter::new(&cfg, &shape, 1).unwrap();
    let mut batch: Vec<f32> = x.iter().chain(&x).copied().collect();
    let before = batch.clone();
    a.apply(&mut batch).unwrap();
    assert_eq!(batch, before);
}

#[test]
fn flipping_twice_is_the_identity() {
    let shape = [2, 4, 5];
    let x = ramp(shape);
    let (mut y, mut z) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    shift_flip(&x, &mut y, shape, 0, 0, true).unwrap();
    assert_ne!(x, y);
    assert_eq!(y[0], x[4], "the first pixel of a row comes from its last");
    shift_flip(&y, &mut z, shape, 0, 0, true).unwrap();
    assert_eq!(x, z);
}

#[test]
fn shifts_move_the_content_and_fill_with_the_nearest_border_pixel() {
    let shape = [1, 4, 6];
    let [_, h, w] = shape;
    let x = ramp(shape);
    let at = |v: &[f32], y: usize, xx: usize| v[y * w + xx];
    // Right by 2, up by 1.
    let mut y = vec![0.0; x.len()];
    shift_flip(&x, &mut y, shape, -1, 2, false).unwrap();
    for r in 0..h {
        let sr = (r + 1).min(h - 1);
        for c in 0..w {
            let sc = c.saturating_sub(2);
            assert_eq!(at(&y, r, c), at(&x, sr, sc), "pixel ({r}, {c})");
        }
    }
    // The two columns shifted in repeat the border column; the last row
    // repeats the bottom row.
    assert_eq!(at(&y, 0, 0), at(&x, 1, 0));
    assert_eq!(at(&y, 0, 1), at(&x, 1, 0));
    assert_eq!(at(&y, h - 1, 3), at(&x, h - 1, 1));
    // A shift larger than the image fills everything from the border.
    shift_flip(&x, &mut y, shape, 0, 100, false).unwrap();
    for r in 0..h {
        for c in 0..w {
            assert_eq!(at(&y, r, c), at(&x, r, 0));
        }
    }
}

#[test]
fn augmenter_keeps_the_shape_stays_in_range_and_is_seeded() {
    let shape = [3, 32, 32];
    let per: usize = shape.iter().product();
    let cfg = AugmentationConfig {
        width_shift_range: 0.1,
        height_shift_range: 0.1,
        horizontal_flip: true,
        fill_mode: Default::default(),
    };
    let x = ramp(shape);
    let n = 400;
    let mut batch: Vec<f32> = (0..n).flat_map(|_| x.iter().copied()).collect();
    let mut a = Augmenter::new(&cfg, &shape, 7).unwrap();
    a.apply(&mut batch).unwrap();
    assert_eq!(batch.len(), n * per);
    // The centre pixel's source tells the displacement and the flip.
    let (mut flips, mut max_dx, mut max_dy, mut neg) = (0, 0isize, 0isize, false);
    for s in batch.chunks_exact(per) {
        let v = s[16 * 32 + 16] as usize;
        let (sy, sx) = (v / 32, v % 32);
        let dy = 16 - sy as isize;
        // Without a flip the centre comes from 16 - dx; with one from
        // 31 - 16 - dx = 15 - dx.
        let left = s[16 * 32 + 15] as usize % 32;
        let flipped = left > sx;
        flips += flipped as usize;
        let dx = if flipped {
            15 - sx as isize
        } else {
            16 - sx as isize
        };
        max_dx = max_dx.max(dx.abs());
        max_dy = max_dy.max(dy.abs());
        neg |= dx < 0;
    }
    assert!(
        max_dx <= 3 && max_dy <= 3,
        "shift beyond 10% of 32: {max_dx} {max_dy}"
    );
    assert!(
        max_dx == 3 && max_dy == 3 && neg,
        "the range is not covered"
    );
    assert!((150..250).contains(&flips), "{flips} flips of {n}");
    // Same seed, same batch; another seed, another batch.
    let mut again: Vec<f32> = (0..n).flat_map(|_| x.iter().copied()).collect();
    Augmenter::new(&cfg, &shape, 7)
        .unwrap()
        .apply(&mut again)
        .unwrap();
    assert_eq!(batch, again);
    let mut other: Vec<f32> = (0..n).flat_map(|_| x.iter().copied()).collect();
    Augmenter::new(&cfg, &shape, 8)
        .unwrap()
        .apply(&mut other)
        .unwrap();
    assert_ne!(batch, other);
    // A batch that is not whole samples is an error, not a panic.
    let e = a.apply(&mut vec![0.0; per + 1]).unwrap_err().to_string();
    assert!(e.contains("augment") && e.contains("multiple"), "{e}");
}

// --------------------------------------------------------------- outputs

fn history(n: usize) -> RunHistory {
    RunHistory {
        rows: (0..n)
            .map(|i| EpochRow {
                epoch: i + 1,
                stage: i / 3,
                seconds: 0.5,
                values: vec![
                    ("loss".into(), Some(1.0 / (i + 1) as f64)),
                    ("accuracy".into(), Some(0.5 + 0.04 * i as f64)),
                    (
                        "val_loss".into(),
                        if i == 2 {
                            None
                        } else {
                            Some(1.2 / (i + 1) as f64)
                        },
                    ),
                    ("val_accuracy".into(), Some(0.45 + 0.04 * i as f64)),
                ],
            })
            .collect(),
    }
}

#[test]
fn history_files_hold_every_metric_per_epoch() {
    let h = history(5);
    let csv = h.to_csv().unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "epoch,stage,loss,accuracy,val_loss,val_accuracy,seconds"
    );
    assert_eq!(lines.len(), 6);
    assert!(lines[3].starts_with("3,0,"), "{}", lines[3]);
    assert!(lines[4].starts_with("4,1,"), "{}", lines[4]);
    assert!(
        lines[3].contains(",,"),
        "a missing value is an empty cell: {}",
        lines[3]
    );
    let j = h.to_json();
    assert_eq!(j["loss"].as_array().unwrap().len(), 5);
    assert_eq!(j["epoch"][4], 5);
    assert!(j["val_loss"][2].is_null());
}

/// The contents of an SVG's `<text>` elements, trimmed.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

#[test]
fn curves_svg_has_axes_ticks_labels_and_a_legend() {
    let svg = curves_svg(
        &history(7),
        "a <test> run; reported 88.69%",
        "this run: test accuracy 88.20% after 7 epochs",
    )
    .unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<svg").count(), 1);
    // Two panels (loss, accuracy), two curves each (the gap splits one).
    assert!(svg.matches("<polyline").count() >= 4);
    let texts = svg_texts(&svg);
    for label in ["epoch", "loss", "val_loss", "accuracy", "val_accuracy"] {
        assert!(texts.iter().any(|t| t == label), "no {label}: {texts:?}");
    }
    // Ticks: the epochs and round values.
    for tick in ["2", "4", "6", "0.5", "1.0"] {
        assert!(texts.iter().any(|t| t == tick), "no tick {tick}: {texts:?}");
    }
    assert!(
        texts.contains(&"a &lt;test&gt; run; reported 88.69%".to_string()),
        "the title is escaped: {texts:?}"
    );
    assert!(
        texts.contains(&"this run: test accuracy 88.20% after 7 epochs".to_string()),
        "the run's own result is in the title"
    );
    // Stage boundaries (after epochs 3 and 6): dashed grey lines, one short
    // segment per dash, in both panels.
    assert!(
        svg.matches("stroke=\"#999999\" stroke-width=\"1\" points=")
            .count()
            >= 8,
        "stage boundaries are drawn"
    );
    // A dot per epoch and series where the value is finite: 7 + 6 + 7 + 7.
    assert_eq!(svg.matches("<circle").count(), 27);
    // One curve with no epochs at all still gives a document.
    let empty = curves_svg(&RunHistory::default(), "t", "s").unwrap();
    assert!(empty.starts_with("<svg") && svg_texts(&empty).contains(&"t".to_string()));
    // Every tag is closed or self-closing.
    assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
}

#[test]
fn nice_ticks_cover_the_range_with_round_steps() {
    for (lo, hi) in [
        (0.0, 1.0),
        (0.2277, 0.7202),
        (1.0, 30.0),
        (5.0, 5.0),
        (-3.0, 250.0),
    ] {
        let t = nice_ticks(lo, hi, 5);
        assert!(
            t.len() >= 2 && t[0] <= lo && *t.last().unwrap() >= hi,
            "{lo} {hi}: {t:?}"
        );
        let step = t[1] - t[0];
        let m = step / 10f64.powf(step.log10().floor());
        assert!(
            [1.0, 2.0, 5.0, 10.0].iter().any(|v| (m - v).abs() < 1e-9),
            "{lo} {hi}: step {step}"
        );
    }
}

// ------------------------------------------------------------ training runs

const STAGED: &str = r#"
description = "a two-stage test run"
seed = 5
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]

[data]
dataset = "synthetic_multiclass"
samples = 150
test_samples = 40
features = 6
classes = 3
noise = 1.0
seed = 9

[fit]
batch_size = 16
validation_split = 0.2

[model]
layers = [
  { type = "dense", units = 16, activation = "relu" },
  { type = "batch_normalization" },
  { type = "dropout", rate = 0.2 },
  { type = "dense", units = 3, activation = "softmax" },
]

[optimizer]
kind = "adam"
lr = 0.01

[early_stopping]
monitor = "val_loss"
patience = 10

[[stages]]
epochs = 3

[[stages]]
epochs = 2
optimizer = { kind = "sgd", lr = 0.05, momentum = 0.9 }
"#;

fn write_config(dir: &Path, name: &str, text: &str) -> LoadedConfig {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    LoadedConfig::load(&p).unwrap()
}

fn opts(out: &Path) -> TrainOptions {
    TrainOptions {
        device: DeviceChoice::Cpu,
        out_dir: Some(out.to_path_buf()),
        verbose: 0,
        ..Default::default()
    }
}

fn weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join(files::WEIGHTS)).unwrap()
}

fn history_without_times(out: &Path) -> serde_json::Value {
    let mut h: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(files::HISTORY_JSON)).unwrap())
            .unwrap();
    h.as_object_mut().unwrap().remove("seconds");
    h
}

#[test]
fn a_run_writes_every_output() {
    let d = tmpdir("outputs");
    let cfg = write_config(&d, "staged.toml", STAGED);
    let out = d.join("out");
    let r = run::train(&cfg, &opts(&out)).unwrap();
    assert_eq!(r.ending, Ending::Finished);
    assert_eq!(r.epochs, 5);
    assert_eq!(r.device, "cpu");
    for f in [
        files::HISTORY_JSON,
        files::HISTORY_CSV,
        files::SUMMARY,
        files::WEIGHTS,
        files::CHECKPOINT,
        files::CHECKPOINT_STATE,
        files::CURVES,
        files::RESULT,
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(files::RESULT)).unwrap()).unwrap();
    assert_eq!(result["status"], "finished");
    assert_eq!(result["epochs"], 5);
    assert_eq!(result["epochs_per_stage"], serde_json::json!([3, 2]));
    assert_eq!(result["device"], "cpu");
    assert!(result["test"]["accuracy"].as_f64().unwrap() > 0.5);
    assert!(result["seconds_per_epoch"].as_f64().unwrap() > 0.0);
    assert_eq!(result["kestrel_version"], env!("CARGO_PKG_VERSION"));
    assert!(result["config"].as_str().unwrap().ends_with("staged.toml"));
    let csv = std::fs::read_to_string(out.join(files::HISTORY_CSV)).unwrap();
    assert_eq!(csv.lines().count(), 6);
    assert!(csv.lines().nth(4).unwrap().starts_with("4,1,"));
    // The weights evaluate to the reported test metrics.
    let logs = run::evaluate(&cfg, &out.join(files::WEIGHTS), None).unwrap();
    assert_eq!(
        logs.get("accuracy").unwrap(),
        result["test"]["accuracy"].as_f64().unwrap()
    );
}

/// Stopping (the flag the Ctrl-C handler sets) and resuming gives the same
/// weights and history as running straight through, across a stage
/// boundary with a re-compile, with dropout, batch norm and early stopping.
#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    let d = tmpdir("resume");
    let cfg = write_config(&d, "staged.toml", STAGED);
    let straight = d.join("straight");
    run::train(&cfg, &opts(&straight)).unwrap();

    let out = d.join("stopped");
    // The flag is already set: the run stops after its first epoch.
    let stop = Arc::new(AtomicBool::new(true));
    let r = run::train(
        &cfg,
        &TrainOptions {
            stop: stop.clone(),
            ..opts(&out)
        },
    )
    .unwrap();
    assert_eq!(r.ending, Ending::Interrupted);
    assert_eq!(r.epochs, 1);
    assert!(!out.join(files::WEIGHTS).exists());
    let result = std::fs::read_to_string(out.join(files::RESULT)).unwrap();
    assert!(result.contains("\"interrupted\""), "{result}");
    // Resume, stopping again at the end of the first stage (2 more epochs).
    let r = run::train(
        &cfg,
        &TrainOptions {
            resume: true,
            stop_after: Some(2),
            ..opts(&out)
        },
    )
    .unwrap();
    assert_eq!((r.ending, r.epochs), (Ending::Interrupted, 3));
    // And to the end.
    let r = run::train(
        &cfg,
        &TrainOptions {
            resume: true,
            ..opts(&out)
        },
    )
    .unwrap();
    assert_eq!((r.ending, r.epochs), (Ending::Finished, 5));
    assert_eq!(
        weights(&out),
        weights(&straight),
        "weights differ after resume"
    );
    assert_eq!(
        history_without_times(&out),
        history_without_times(&straight)
    );
}

#[test]
fn resume_without_a_checkpoint_says_so() {
    let d = tmpdir("nockpt");
    let cfg = write_config(&d, "staged.toml", STAGED);
    let e = run::train(
        &cfg,
        &TrainOptions {
            resume: true,
            ..opts(&d.join("empty"))
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--resume") && e.contains("checkpoint.json"),
        "{e}"
    );
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if kestrel::cuda::driver_present() {
        eprintln!("a CUDA driver is present: the no-driver error path cannot be exercised here");
        return;
    }
    let d = tmpdir("cuda");
    let cfg = write_config(&d, "staged.toml", STAGED);
    let e = run::train(
        &cfg,
        &TrainOptions {
            device: DeviceChoice::Cuda(0),
            ..opts(&d.join("o"))
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no CUDA driver"), "{e}");
}

/// A loss that blows up stops the run with a clear message; the checkpoint
/// of the last good epoch stays and loads.
#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let d = tmpdir("nan");
    let text = r#"
description = "diverges in its second stage"
seed = 2
loss = "mse"
metrics = ["mae"]

[data]
dataset = "synthetic_regression"
samples = 64
test_samples = 16
features = 4
seed = 1

[fit]
batch_size = 16

[model]
layers = [
  { type = "dense", units = 8, activation = "relu" },
  { type = "dense", units = 1 },
]

[optimizer]
kind = "sgd"
lr = 0.001

[[stages]]
epochs = 1

[[stages]]
epochs = 5
optimizer = { kind = "sgd", lr = 1e30 }
"#;
    let cfg = write_config(&d, "nan.toml", text);
    let out = d.join("out");
    let e = run::train(&cfg, &opts(&out)).unwrap_err().to_string();
    assert!(
        e.contains("loss") && e.contains("last good epoch (1)"),
        "{e}"
    );
    let result = std::fs::read_to_string(out.join(files::RESULT)).unwrap();
    assert!(result.contains("\"diverged\""), "{result}");
    let h = std::fs::read_to_string(out.join(files::HISTORY_CSV)).unwrap();
    assert_eq!(h.lines().count(), 2, "one good epoch recorded:\n{h}");
    // The checkpoint is the good one: its weights are finite and it loads.
    let mut m = run::build_model(&cfg, kestrel::backend::CpuBackend, 2).unwrap();
    m.load_checkpoint(out.join(files::CHECKPOINT)).unwrap();
    assert_eq!(m.epochs_done(), 1);
    assert!(
        m.get_weights()
            .unwrap()
            .iter()
            .flatten()
            .all(|v| v.is_finite())
    );
}

// ------------------------------------------------- tf.keras flavour gaps

fn optimizer_of(extra: &str, keras: &str) -> kestrel::Result<kestrel::ops::optim::Optimizer> {
    let text = GOOD
        .replace("seed = 3", &format!("seed = 3\nkeras = \"{keras}\""))
        .replace("lr = 0.01", &format!("lr = 0.01\n{extra}"));
    parse(&text)?.optimizer()
}

/// tf.keras's `clipnorm` is per tensor and its `global_clipnorm` is the one
/// global norm; standalone Keras has only `clipnorm` (global).
#[test]
fn global_clipnorm_is_its_own_option_in_the_tf_keras_flavour() {
    let o = optimizer_of("clipnorm = 2.0", "tf_keras").unwrap();
    assert_eq!((o.clipnorm, o.clipnorm_per_tensor), (Some(2.0), true));
    let o = optimizer_of("global_clipnorm = 3.0", "tf_keras").unwrap();
    assert_eq!((o.clipnorm, o.clipnorm_per_tensor), (Some(3.0), false));
    // tf.keras still clips values before the norm.
    assert!(o.clipvalue_first);
    let o = optimizer_of("clipnorm = 2.0", "standalone").unwrap();
    assert_eq!((o.clipnorm, o.clipnorm_per_tensor), (Some(2.0), false));
    let e = optimizer_of("clipnorm = 1.0\nglobal_clipnorm = 1.0", "tf_keras")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("optimizer.global_clipnorm") && e.contains("at most one"),
        "{e}"
    );
    let e = optimizer_of("global_clipnorm = 1.0", "standalone")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("global_clipnorm") && e.contains("tf_keras"),
        "{e}"
    );
    let e = optimizer_of("global_clipnorm = -1.0", "tf_keras")
        .unwrap_err()
        .to_string();
    assert!(e.contains("clipnorm") && e.contains("-1"), "{e}");
}

/// A tf.keras run with `global_clipnorm` trains exactly as a standalone run
/// with `clipnorm` (same rule), and differently from tf.keras's per-tensor
/// `clipnorm`.
#[test]
fn global_clipnorm_trains_as_standalone_clipnorm() {
    let d = tmpdir("gclip");
    // Dense layers and SGD only: no other tf.keras difference applies.
    let base = GOOD
        .replace("  { type = \"batch_normalization\" },\n", "")
        .replace("  { type = \"dropout\", rate = 0.2 },\n", "")
        .replace("kind = \"adam\"", "kind = \"sgd\"");
    let run = |name: &str, keras: &str, clip: &str| {
        let text = base
            .replace("seed = 3", &format!("seed = 3\nkeras = \"{keras}\""))
            .replace("lr = 0.01", &format!("lr = 0.5\n{clip}"));
        let cfg = write_config(&d, &format!("{name}.toml"), &text);
        let out = d.join(name);
        run::train(&cfg, &opts(&out)).unwrap();
        weights(&out)
    };
    let standalone = run("standalone", "standalone", "clipnorm = 0.05");
    let global = run("global", "tf_keras", "global_clipnorm = 0.05");
    let per_tensor = run("per_tensor", "tf_keras", "clipnorm = 0.05");
    assert!(
        standalone == global,
        "global_clipnorm differs from standalone clipnorm"
    );
    assert!(
        standalone != per_tensor,
        "per-tensor clipnorm should differ"
    );
}

#[test]
fn adagrad_initial_accumulator_value_is_settable() {
    let ada = |extra: &str, keras: &str| {
        let text = GOOD
            .replace("seed = 3", &format!("seed = 3\nkeras = \"{keras}\""))
            .replace("kind = \"adam\"", "kind = \"adagrad\"")
            .replace("lr = 0.01", &format!("lr = 0.01\n{extra}"));
        parse(&text)?.optimizer()
    };
    assert_eq!(ada("", "standalone").unwrap().initial_accumulator, 0.0);
    assert_eq!(ada("", "tf_keras").unwrap().initial_accumulator, 0.1);
    for keras in ["standalone", "tf_keras"] {
        let o = ada("initial_accumulator_value = 0.25", keras).unwrap();
        assert_eq!(o.initial_accumulator, 0.25, "{keras}");
    }
    // Only Adagrad takes it, and not below 0.
    let e = optimizer_of("initial_accumulator_value = 0.25", "tf_keras")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("optimizer.initial_accumulator_value") && e.contains("adam"),
        "{e}"
    );
    let text = GOOD
        .replace("kind = \"adam\"", "kind = \"adagrad\"")
        .replace("lr = 0.01", "lr = 0.01\ninitial_accumulator_value = -1.0");
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.contains("initial_accumulator") && e.contains("-1"), "{e}");
    // The summary shows it.
    let text = GOOD
        .replace("kind = \"adam\"", "kind = \"adagrad\"")
        .replace("lr = 0.01", "lr = 0.01\ninitial_accumulator_value = 0.25");
    let s = run::summary_text(&parse(&text).unwrap()).unwrap();
    assert!(s.contains("initial_accumulator_value=0.25"), "{s}");
}

/// With `restore_best_weights` and no early stop, tf.keras puts the best
/// weights back at the end of training; standalone Keras keeps the last.
/// The monitor is the training loss with mode max, so that the best epoch
/// is the first one.
#[test]
fn tf_keras_restores_best_weights_at_the_end_without_an_early_stop() {
    let d = tmpdir("restore");
    let base = GOOD.replace("epochs = 2", "epochs = 4")
        + "\n[early_stopping]\nmonitor = \"loss\"\nmode = \"max\"\npatience = 10\nrestore_best_weights = true\n";
    let run = |keras: &str, restore: bool| {
        let text = base
            .replace("seed = 3", &format!("seed = 3\nkeras = \"{keras}\""))
            .replace(
                "restore_best_weights = true",
                &format!("restore_best_weights = {restore}"),
            );
        let name = format!("{keras}-{restore}");
        let cfg = write_config(&d, &format!("{name}.toml"), &text);
        let out = d.join(name);
        run::train(&cfg, &opts(&out)).unwrap();
        let load = |f: &str| {
            let mut m = run::build_model(&cfg, kestrel::backend::CpuBackend, 3).unwrap();
            m.load_weights(out.join(f)).unwrap();
            m.get_weights().unwrap()
        };
        let h: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(files::HISTORY_JSON)).unwrap())
                .unwrap();
        let loss: Vec<f64> = h["loss"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let best = loss
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(loss.len(), 4, "no early stop");
        assert_ne!(best, 3, "the best epoch is not the last: {loss:?}");
        let best = restore.then(|| load(files::BEST_WEIGHTS));
        (load(files::WEIGHTS), best)
    };
    // The last epoch's weights: the same runs without restore_best_weights.
    let (tf_last, _) = run("tf_keras", false);
    let (standalone_last, _) = run("standalone", false);
    let (fin, best) = run("tf_keras", true);
    assert!(
        Some(&fin) == best.as_ref(),
        "tf.keras: the final weights are the best epoch's"
    );
    assert!(fin != tf_last);
    let (fin, best) = run("standalone", true);
    assert!(
        fin == standalone_last,
        "standalone: the final weights are the last epoch's"
    );
    assert!(Some(&fin) != best.as_ref());
}

/// A run with no good epoch records 0 seconds, not -0.0 (an empty float
/// sum), and says there is no checkpoint.
#[test]
fn a_run_without_a_good_epoch_records_zero_seconds() {
    let d = tmpdir("zero-seconds");
    let text = GOOD
        .replace("lr = 0.01", "lr = 1e30")
        .replace("kind = \"adam\"", "kind = \"sgd\"");
    let cfg = write_config(&d, "boom.toml", &text);
    let out = d.join("out");
    let e = run::train(&cfg, &opts(&out)).unwrap_err().to_string();
    assert!(e.contains("no checkpoint"), "{e}");
    let r = std::fs::read_to_string(out.join(files::RESULT)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&r).unwrap();
    assert_eq!(v["status"], "diverged");
    assert_eq!(v["epochs"], 0);
    assert!(
        r.contains("\"train_seconds\": 0.0") && r.contains("\"seconds_per_epoch\": 0.0"),
        "{r}"
    );
}

/// The commit a build names is the one its sources were at when it was
/// built (recorded by `build.rs`), a commit that exists in this checkout;
/// not whatever the checkout holds when the binary runs.
#[test]
fn the_recorded_commit_is_a_commit_of_this_checkout() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        // Built outside a checkout: nothing may be claimed.
        assert_eq!(run::git_commit(), None);
        return;
    };
    let recorded = run::git_commit().expect("a build inside a git checkout names its commit");
    let hash = recorded.strip_suffix("-dirty").unwrap_or(&recorded);
    assert!(
        hash.len() == 40 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "not a commit hash: {recorded}"
    );
    assert!(
        git(&["cat-file", "-e", &format!("{hash}^{{commit}}")]).is_some(),
        "{hash} is no commit of this checkout"
    );
    // The tests were built from this HEAD (cargo rebuilds on a new commit).
    assert_eq!(hash, String::from_utf8_lossy(&head.stdout).trim());
}
