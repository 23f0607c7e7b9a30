//! Reproduction runs: a TOML config ([`config`]) in, a trained model and its
//! records out.
//!
//! [`train`] loads the data, builds and compiles the model, runs the
//! config's stages (one `fit` call each, re-compiling where a stage names a
//! new optimizer), evaluates on the test set and writes into the output
//! directory:
//!
//! - `summary.txt`: the config's description, the model summary and the
//!   data files read, with their SHA-256;
//! - `history.json`, `history.csv`: every logged value per epoch;
//! - `curves.svg`: the learning curves, titled with the config's
//!   description and this run's own test result;
//! - `checkpoint.safetensors` + `checkpoint.json`: written (atomically)
//!   after every epoch; `--resume` continues from them, bit for bit as if
//!   never stopped, with the flags the run was started with ([`RunFlags`]);
//! - `weights.safetensors`: the final weights;
//! - `result.json`: test metrics, epochs, seconds per epoch (one figure,
//!   [`seconds_per_epoch`], also in the final line), the data files, the
//!   flags, device, version, commit, config.
//!
//! An output directory that holds a run is refused unless
//! [`TrainOptions::overwrite`] (replace it) or [`TrainOptions::resume`]
//! (continue it) is set; nothing is written before the options, the
//! checkpoint, the data and the model have passed their checks.
//!
//! A NaN or infinite training loss stops the run with an error; the
//! checkpoint of the last good epoch stays. Setting the stop flag (Ctrl-C
//! does) ends the run at the end of the current epoch, after its checkpoint.

pub mod augment;
pub mod config;
pub mod outputs;
pub mod synthetic;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, CpuBackend};
use crate::data::{DatasetName, one_hot};
use crate::error::{Error, Result};
use crate::nn::Sequential;
use crate::ops::optim::Optimizer;
use crate::train::{
    Callback, EarlyStopping, EarlyStoppingStep, FitOptions, Logs, Loss, Metric, Targets,
    Validation, Verdict,
};
use augment::Augmenter;
use config::{DatasetKind, LoadedConfig, ValidationPlan};
use outputs::{EpochRow, RunHistory, write_atomic, write_json};
use synthetic::{Split, TargetData};

pub use crate::backend::DeviceChoice;

/// What `kestrel train` takes besides the config.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// The backend.
    pub device: DeviceChoice,
    /// `--data DIR`: where to look for (or download) the data sets.
    pub data_dir: Option<PathBuf>,
    /// `--out DIR` (default `runs/<config stem>`).
    pub out_dir: Option<PathBuf>,
    /// `--epochs N`: the epochs of a single-stage run, or a cap on each stage.
    pub epochs: Option<usize>,
    /// `--seed S`: replaces the config's seed.
    pub seed: Option<u64>,
    /// `--resume`: continue from the output directory's checkpoint.
    pub resume: bool,
    /// `--overwrite`: replace the run already in the output directory
    /// (without it, or `resume`, a directory holding a run is refused).
    pub overwrite: bool,
    /// `--stop-after N`: stop (with a checkpoint, as Ctrl-C does) after N
    /// epochs of this invocation.
    pub stop_after: Option<usize>,
    /// fit's verbosity (1: progress bar).
    pub verbose: u8,
    /// `--no-cuda-graph`: launch every op of every training step instead of
    /// replaying one captured CUDA graph per full batch (the same results;
    /// see [`crate::train::FitOptions::cuda_graph`]). No effect on the CPU.
    pub no_cuda_graph: bool,
    /// `--no-staged-upload`: upload each batch with a plain copy on the
    /// compute stream instead of the staged path (the same results; see
    /// [`crate::backend::GpuBackend::set_staged_upload`]). No effect on the
    /// CPU.
    pub no_staged_upload: bool,
    /// Set it to stop at the end of the current epoch, after the checkpoint
    /// (the Ctrl-C handler sets it).
    pub stop: Arc<AtomicBool>,
}

/// How a training run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Ending {
    /// Every stage ran (or early stopping ended them).
    Finished,
    /// Stopped by the stop flag or `--stop-after`; resume with `--resume`.
    Interrupted,
}

/// What [`train`] returns.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// How it ended.
    pub ending: Ending,
    /// The output directory.
    pub out_dir: PathBuf,
    /// The test metrics (`loss`, `accuracy`, ...) when finished.
    pub test: Option<Logs>,
    /// Epochs run in all (all stages, all invocations).
    pub epochs: usize,
    /// Mean seconds per epoch.
    pub seconds_per_epoch: f64,
    /// The backend's name.
    pub device: String,
    /// What `result.json` holds.
    pub result: serde_json::Value,
}

/// Targets in the form a loss wants, owned.
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedTargets {
    /// Class indices.
    Sparse(Vec<u32>),
    /// f32 rows.
    Dense(Vec<f32>),
}

impl OwnedTargets {
    /// Borrowed, for fit / evaluate.
    pub fn as_targets(&self) -> Targets<'_> {
        match self {
            OwnedTargets::Sparse(v) => Targets::Sparse(v),
            OwnedTargets::Dense(v) => Targets::Dense(v),
        }
    }
}

/// Converts targets for `loss`, checking that they fit a model with
/// `outputs` outputs.
pub fn targets_for(y: &TargetData, loss: Loss, outputs: usize) -> Result<OwnedTargets> {
    let bad = |msg: String| Err(Error::Config(msg));
    match (y, loss) {
        (
            TargetData::Classes(l, c),
            Loss::SparseCategoricalCrossentropy | Loss::CategoricalCrossentropy,
        ) => {
            if outputs != *c {
                return bad(format!(
                    "the data have {c} classes but the model has {outputs} outputs"
                ));
            }
            Ok(if loss == Loss::SparseCategoricalCrossentropy {
                OwnedTargets::Sparse(l.clone())
            } else {
                OwnedTargets::Dense(one_hot(l, *c)?)
            })
        }
        (TargetData::Classes(l, 2), Loss::BinaryCrossentropy) if outputs == 1 => {
            Ok(OwnedTargets::Dense(l.iter().map(|&v| v as f32).collect()))
        }
        (TargetData::Real(v, w), Loss::Mse | Loss::BinaryCrossentropy) => {
            if outputs != *w {
                return bad(format!(
                    "the data have {w} target(s) per sample but the model has {outputs} outputs"
                ));
            }
            Ok(OwnedTargets::Dense(v.clone()))
        }
        (TargetData::Classes(_, c), l) => bad(format!(
            "loss {} does not fit {c}-class labels with {outputs} outputs",
            l.name()
        )),
        (TargetData::Real(..), l) => bad(format!("loss {} needs class labels", l.name())),
    }
}

/// The data of a run: training set, optional validation set, test set.
#[derive(Clone, Debug)]
pub struct RunData {
    /// Per-sample shape (NCHW).
    pub sample_shape: Vec<usize>,
    /// Training samples (before any `validation_split`).
    pub train: Split,
    /// Validation samples held out by `validation_first`.
    pub held_out: Option<Split>,
    /// Test samples.
    pub test: Split,
    /// Where the data came from, for people: `fashion_mnist from DIR` or
    /// `synthetic_binary, generated from seed 1`.
    pub source: String,
    /// The files read, with their checksums (none for generated data).
    pub files: Vec<crate::data::DataFile>,
}

impl RunData {
    /// The data's record for `result.json`.
    pub fn record(&self, dataset: DatasetKind) -> serde_json::Value {
        serde_json::json!({
            "dataset": dataset.name(),
            "source": self.source,
            "files": self.files,
        })
    }

    /// What the run prints once and writes into `summary.txt`: the source,
    /// then one line per file with its size and SHA-256.
    pub fn describe(&self) -> String {
        let mut s = format!("Data: {}\n", self.source);
        for f in &self.files {
            s += &format!(
                "  {} ({} bytes, sha256 {})\n",
                f.path.display(),
                f.bytes,
                f.sha256
            );
        }
        s
    }
}

/// Loads (or generates) the config's data and applies `validation_first`.
pub fn load_data(cfg: &LoadedConfig, data_dir: Option<&Path>, seed: u64) -> Result<RunData> {
    let c = &cfg.config;
    let from = |ds: crate::data::Dataset| Split {
        x: ds.x,
        y: TargetData::Classes(ds.y, ds.classes),
    };
    let (train, test, source, files) = match c.data.dataset {
        DatasetKind::FashionMnist | DatasetKind::Cifar10 => {
            let name = if c.data.dataset == DatasetKind::FashionMnist {
                DatasetName::FashionMnist
            } else {
                DatasetName::Cifar10
            };
            let (tr, te, files) = crate::data::load_recorded(name, data_dir)?;
            let dir = files
                .first()
                .and_then(|f| f.path.parent())
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            let source = format!("{} from {dir}", c.data.dataset.name());
            (from(tr), from(te), source, files)
        }
        kind => {
            if let Some(d) = data_dir {
                return Err(Error::invalid(
                    "data",
                    "--data",
                    format!(
                        "{}: the config's data set {} is generated, not read from files; \
                         leave out --data {}",
                        cfg.path.display(),
                        kind.name(),
                        d.display()
                    ),
                ));
            }
            let (tr, te) = synthetic::generate(&c.data, seed)?;
            let source = format!(
                "{}, generated{}",
                c.data.dataset.name(),
                c.data
                    .seed
                    .map(|s| format!(" from data seed {s}"))
                    .unwrap_or_else(|| format!(" from the run seed {seed}"))
            );
            (tr, te, source, Vec::new())
        }
    };
    let sample_shape = c.data.input_shape();
    let per: usize = sample_shape.iter().product();
    let (train, held_out) = match c.fit.validation() {
        ValidationPlan::First(k) => {
            if k >= train.len() {
                return Err(Error::Config(format!(
                    "{}: fit.validation_first: {k} is not below the {} training samples",
                    cfg.path.display(),
                    train.len()
                )));
            }
            let (v, t) = train.split_first(k, per);
            (t, Some(v))
        }
        _ => (train, None),
    };
    Ok(RunData {
        sample_shape,
        train,
        held_out,
        test,
        source,
        files,
    })
}

/// Builds and compiles the config's model on `backend` (first optimizer).
pub fn build_model<B: Backend>(cfg: &LoadedConfig, backend: B, seed: u64) -> Result<Sequential<B>> {
    let c = &cfg.config;
    let mut m = Sequential::new(backend, seed);
    for l in cfg.layers()? {
        m.add(l);
    }
    m.build(&c.data.input_shape())
        .map_err(|e| Error::Config(format!("{}: model: {e}", cfg.path.display())))?;
    let metrics: Vec<Metric> = c.metrics.iter().map(|&m| m.into()).collect();
    m.compile(cfg.optimizer()?, c.loss.into(), &metrics)
        .map_err(|e| Error::Config(format!("{}: {e}", cfg.path.display())))?;
    Ok(m)
}

/// `kestrel summary`: the description, the model summary and the recipe.
pub fn summary_text(cfg: &LoadedConfig) -> Result<String> {
    let c = &cfg.config;
    let m = build_model(cfg, CpuBackend, c.seed)?;
    let mut s = String::new();
    s += &format!("config: {}\n", cfg.path.display());
    if !c.description.is_empty() {
        s += &format!("{}\n", c.description);
    }
    s += &format!(
        "data: {}, input {:?}\n",
        c.data.dataset.name(),
        c.data.input_shape()
    );
    s += "\n";
    s += &m.summary();
    s += &format!("\noptimizer: {}\n", describe_optimizer(&cfg.optimizer()?));
    s += &format!(
        "loss: {}; metrics: {}\n",
        Loss::from(c.loss).name(),
        c.metrics
            .iter()
            .map(|&m| Metric::from(m).name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    s += &format!(
        "fit: batch_size {}, shuffle {}, validation {}\n",
        c.fit.batch_size,
        c.fit.shuffle,
        match c.fit.validation() {
            ValidationPlan::None => "none".to_string(),
            ValidationPlan::Split(f) => format!("last {f} of the training set"),
            ValidationPlan::First(k) => format!("first {k} training samples"),
            ValidationPlan::Test => "the test set".to_string(),
        }
    );
    for (i, st) in cfg.stages(None)?.iter().enumerate() {
        s += &format!(
            "stage {}: up to {}{}\n",
            i + 1,
            plural(st.epochs, "epoch"),
            st.recompile
                .map(|o| format!(", re-compiled with {}", describe_optimizer(&o)))
                .unwrap_or_default()
        );
    }
    if let Some(es) = &c.early_stopping {
        s += &format!(
            "early stopping: monitor {}, patience {}, min_delta {}, mode {}{}\n",
            es.monitor,
            es.patience,
            es.min_delta,
            es.mode.name(),
            if es.restore_best_weights {
                ", restore best weights"
            } else {
                ""
            }
        );
    }
    if let Some(a) = &c.augmentation {
        s += &format!(
            "augmentation: width shift {}, height shift {}, horizontal flip {}, fill nearest\n",
            a.width_shift_range, a.height_shift_range, a.horizontal_flip
        );
    }
    Ok(s)
}

/// One line describing an optimizer.
pub fn describe_optimizer(o: &Optimizer) -> String {
    use crate::ops::optim::OptimizerKind as K;
    let mut s = match o.kind {
        K::Sgd => format!(
            "SGD(lr={}, momentum={}, nesterov={})",
            o.lr, o.momentum, o.nesterov
        ),
        K::Adagrad => format!(
            "Adagrad(lr={}, initial_accumulator_value={})",
            o.lr, o.initial_accumulator
        ),
        K::RmsProp => format!("RMSprop(lr={}, rho={})", o.lr, o.rho),
        K::Adam => format!("Adam(lr={}, beta_1={}, beta_2={})", o.lr, o.beta1, o.beta2),
    };
    s += &format!(" decay={} epsilon={:e}", o.decay, o.epsilon);
    match (o.clipnorm, o.clipnorm_per_tensor) {
        (Some(c), true) => s += &format!(" clipnorm={c} (per tensor)"),
        (Some(c), false) => s += &format!(" clipnorm={c} (global norm)"),
        (None, _) => {}
    }
    if let Some(c) = o.clipvalue {
        s += &format!(" clipvalue={c}");
    }
    s
}

/// `checkpoint.json`: where a run stands, beside `checkpoint.safetensors`
/// (which holds the model's side: weights, optimizer state, generator).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// `"kestrel-run-1"`.
    pub format: String,
    /// The stage to run next (== the number of stages when all ran).
    pub stage: usize,
    /// Epochs done in that stage.
    pub stage_epoch: usize,
    /// The stage whose optimizer was in use at the checkpoint.
    pub optimizer_stage: Option<usize>,
    /// The model's epoch counter and step counter at the checkpoint (checked
    /// against the checkpoint on resume).
    pub model_epoch: usize,
    /// See `model_epoch`.
    pub model_step: u64,
    /// The augmentation generator's state.
    pub augment_rng: Option<[u64; 4]>,
    /// Every epoch so far.
    pub history: RunHistory,
    /// The config's seed in effect.
    pub seed: u64,
    /// The flags the run was started with that shape it; `--resume`
    /// applies them again unless given anew.
    #[serde(default)]
    pub flags: RunFlags,
    /// The run finished (tested, final weights written).
    #[serde(default)]
    pub finished: bool,
    /// Early stopping ended the last stage that ran.
    #[serde(default)]
    pub stopped_early: bool,
}

/// The `kestrel train` flags that shape a run, as its checkpoint remembers
/// them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunFlags {
    /// `--epochs`.
    pub epochs: Option<usize>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--data`.
    pub data: Option<PathBuf>,
    /// `--device`, when not `auto`.
    pub device: Option<String>,
}

impl RunFlags {
    /// The flags as a command line would give them (` --epochs 3 ...`).
    pub fn args(&self) -> String {
        let mut s = String::new();
        if let Some(e) = self.epochs {
            s += &format!(" --epochs {e}");
        }
        if let Some(v) = self.seed {
            s += &format!(" --seed {v}");
        }
        if let Some(d) = &self.data {
            s += &format!(" --data {}", shell_word(&d.display().to_string()));
        }
        if let Some(d) = &self.device {
            s += &format!(" --device {d}");
        }
        s
    }
}

/// `w` quoted for a POSIX shell when it needs quoting.
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=,@%".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

const STATE_FORMAT: &str = "kestrel-run-1";

/// The file names in the output directory.
pub mod files {
    /// Per-epoch history, JSON.
    pub const HISTORY_JSON: &str = "history.json";
    /// Per-epoch history, CSV.
    pub const HISTORY_CSV: &str = "history.csv";
    /// Model summary.
    pub const SUMMARY: &str = "summary.txt";
    /// Final weights.
    pub const WEIGHTS: &str = "weights.safetensors";
    /// Checkpoint (model side).
    pub const CHECKPOINT: &str = "checkpoint.safetensors";
    /// Checkpoint (run side).
    pub const CHECKPOINT_STATE: &str = "checkpoint.json";
    /// The best weights seen (only with `restore_best_weights`).
    pub const BEST_WEIGHTS: &str = "best_weights.safetensors";
    /// Learning curves.
    pub const CURVES: &str = "curves.svg";
    /// Final result.
    pub const RESULT: &str = "result.json";
}

/// The commit kestrel was built from, with `-dirty` when the checkout had
/// uncommitted changes then: recorded by `build.rs` at build time
/// (`$KESTREL_GIT_COMMIT` there overrides it). `None` for a build outside
/// a git checkout. (It is not asked of git at run time: the checkout may
/// have moved on since the build, and a run would then name code that did
/// not compute it.)
pub fn git_commit() -> Option<String> {
    option_env!("KESTREL_BUILD_COMMIT").map(str::to_string)
}

/// Trains the config's model (see the module docs), on the backend chosen
/// by `opts.device`.
pub fn train(cfg: &LoadedConfig, opts: &TrainOptions) -> Result<TrainOutcome> {
    if opts.stop_after == Some(0) {
        return Err(Error::invalid(
            "train",
            "--stop-after",
            "must be at least 1, got 0",
        ));
    }
    if opts.resume && opts.overwrite {
        return Err(Error::invalid(
            "train",
            "--resume",
            "cannot go with --overwrite: --resume continues the run in the output directory, \
             --overwrite replaces it",
        ));
    }
    // Everything that can refuse the run comes before anything is written.
    cfg.stages(opts.epochs)?;
    let out = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(cfg.stem()));
    let start = prepare(cfg, opts, &out)?;
    // The one place that maps a device choice to a backend: `select` says
    // once which one it picked, and never falls back from an explicit CUDA
    // choice.
    let backend = crate::backend::select(opts.device)?;
    if let crate::backend::AnyBackend::Cuda(g) = &backend {
        g.set_staged_upload(!opts.no_staged_upload);
    }
    match backend {
        // On a worker of the CPU pool: its ops' parallel loops then start
        // hot instead of waking the pool from outside (`on_pool`).
        crate::backend::AnyBackend::Cpu(b) => {
            crate::backend::cpu::on_pool(|| train_on(cfg, opts, start, b))
        }
        crate::backend::AnyBackend::Cuda(b) => train_on(cfg, opts, start, b),
    }
}

/// Where a run starts: a fresh state or the checkpoint's, and the options
/// in effect (the checkpoint's remembered flags where not given anew).
struct Start {
    out: PathBuf,
    state: RunState,
    data_dir: Option<PathBuf>,
    stages: Vec<config::Stage>,
    /// `Some(from)` when a finished run is extended to more epochs.
    extending: Option<usize>,
}

/// What an output directory holds from an earlier run, in words (`a
/// finished run (5 epochs)`), or `None` when it holds none.
fn existing_run(out: &Path) -> Option<String> {
    let read = |f: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(out.join(f)).ok()?).ok()
    };
    if let Some(r) = read(files::RESULT) {
        let epochs = r["epochs"].as_u64().unwrap_or(0);
        let n = plural(epochs as usize, "epoch");
        return Some(match r["status"].as_str().unwrap_or("") {
            "finished" => format!("a finished run ({n})"),
            "interrupted" => format!("an interrupted run (stopped after {n})"),
            other => format!("a run that ended {other} after {n}"),
        });
    }
    if let Some(st) = read(files::CHECKPOINT_STATE) {
        let n = st["history"]["rows"].as_array().map_or(0, Vec::len);
        return Some(format!(
            "an interrupted run (checkpoint after {})",
            plural(n, "epoch")
        ));
    }
    [
        files::WEIGHTS,
        files::CHECKPOINT,
        files::HISTORY_JSON,
        files::HISTORY_CSV,
        files::CURVES,
    ]
    .iter()
    .any(|f| out.join(f).exists())
    .then(|| "the outputs of an earlier run".to_string())
}

/// `n thing` or `n things`.
pub fn plural(n: usize, thing: &str) -> String {
    format!("{n} {thing}{}", if n == 1 { "" } else { "s" })
}

/// Reads the run state for `--resume`, refuses a directory that holds a run
/// unless `--resume` or `--overwrite` is given, and works out the options in
/// effect. Writes nothing.
fn prepare(cfg: &LoadedConfig, opts: &TrainOptions, out: &Path) -> Result<Start> {
    let c = &cfg.config;
    if !opts.resume {
        if !opts.overwrite
            && let Some(what) = existing_run(out)
        {
            return Err(Error::io(
                out,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "holds {what}; refusing to overwrite it. Pass --overwrite to replace it, \
                         --resume to continue it, or choose another --out"
                    ),
                ),
            ));
        }
        let flags = RunFlags {
            epochs: opts.epochs,
            seed: opts.seed,
            data: opts.data_dir.clone(),
            device: (opts.device != DeviceChoice::Auto).then(|| opts.device.to_string()),
        };
        let seed = opts.seed.unwrap_or(c.seed);
        return Ok(Start {
            out: out.to_path_buf(),
            state: RunState {
                format: STATE_FORMAT.into(),
                seed,
                flags,
                ..Default::default()
            },
            data_dir: opts.data_dir.clone(),
            stages: cfg.stages(opts.epochs)?,
            extending: None,
        });
    }
    // Resume: the run's state first (its seed wins over the config's).
    let p = out.join(files::CHECKPOINT_STATE);
    let text = std::fs::read_to_string(&p).map_err(|source| Error::Io {
        path: p.clone(),
        source: std::io::Error::new(
            source.kind(),
            format!(
                "--resume: cannot read the run state ({source}); was the run started with this --out?"
            ),
        ),
    })?;
    let mut st: RunState = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    if st.format != STATE_FORMAT {
        return Err(Error::Format {
            path: p,
            msg: format!("expected format {STATE_FORMAT}, got {:?}", st.format),
        });
    }
    if opts.seed.is_some_and(|s| s != st.seed) {
        return Err(Error::Config(format!(
            "--resume with --seed {} but the run was started with seed {}",
            opts.seed.unwrap_or(0),
            st.seed
        )));
    }
    let epochs = opts.epochs.or(st.flags.epochs);
    let data_dir = opts.data_dir.clone().or_else(|| st.flags.data.clone());
    st.flags.epochs = epochs;
    st.flags.data = data_dir.clone();
    if opts.device != DeviceChoice::Auto {
        st.flags.device = Some(opts.device.to_string());
    }
    let stages = cfg.stages(epochs)?;
    let done = st.history.rows.len();
    let single = c.stages.is_empty();
    let finished = st.finished || st.stage >= stages.len();
    let mut extending = None;
    if finished {
        let extendable = single && !st.stopped_early;
        match opts.epochs {
            Some(m) if extendable && m > done => {
                st.stage = 0;
                st.stage_epoch = done;
                st.finished = false;
                extending = Some(done);
            }
            _ => {
                let how = if extendable {
                    format!(
                        "To train it further, pass --resume --epochs N with N above {done}; \
                         to start it again, --overwrite."
                    )
                } else if single {
                    "It was ended by early stopping, so it cannot be extended; \
                     to start it again, pass --overwrite."
                        .to_string()
                } else {
                    "A multi-stage run cannot be extended; to start it again, pass --overwrite."
                        .to_string()
                };
                return Err(Error::io(
                    out,
                    std::io::Error::other(format!(
                        "--resume: the run is finished ({}), nothing to resume. {how}",
                        plural(done, "epoch")
                    )),
                ));
            }
        }
    } else if single && epochs.is_some_and(|e| e < st.stage_epoch) {
        return Err(Error::invalid(
            "train",
            "--epochs",
            format!(
                "{} is below the {} epochs the run has done already",
                epochs.unwrap_or(0),
                st.stage_epoch
            ),
        ));
    }
    Ok(Start {
        out: out.to_path_buf(),
        state: st,
        data_dir,
        stages,
        extending,
    })
}

/// The callback that records, checkpoints, stops early and stops on request.
struct RunCallback<'a> {
    out: &'a Path,
    state: &'a mut RunState,
    stage: usize,
    stage_epochs: usize,
    last_stage: bool,
    verbose: u8,
    early: Option<EarlyStopping>,
    best_weights: Option<Vec<Vec<f32>>>,
    restore_best: bool,
    /// tf.keras: restore the best weights at the end of the stage even
    /// without an early stop.
    restore_at_end: bool,
    stopped_early: bool,
    augment: Option<&'a std::cell::RefCell<Augmenter>>,
    last: Instant,
    stop: &'a AtomicBool,
    stop_after: Option<usize>,
    epochs_this_run: &'a mut usize,
    interrupted: bool,
}

impl RunCallback<'_> {
    /// Puts the stage's best weights back (from memory, or from disk when the
    /// stage was resumed).
    fn restore<B: Backend>(&self, model: &mut Sequential<B>) -> Result<()> {
        match &self.best_weights {
            Some(w) => model.set_weights(w),
            None => {
                let p = self.out.join(files::BEST_WEIGHTS);
                if p.exists() {
                    model.load_weights(p)?;
                }
                Ok(())
            }
        }
    }
}

impl<B: Backend> Callback<B> for RunCallback<'_> {
    fn on_train_begin(&mut self, _model: &mut Sequential<B>) -> Result<()> {
        self.last = Instant::now();
        Ok(())
    }

    fn on_epoch_end(
        &mut self,
        epoch: usize,
        logs: &Logs,
        model: &mut Sequential<B>,
    ) -> Result<Verdict> {
        let seconds = self.last.elapsed().as_secs_f64();
        let row = EpochRow {
            epoch: self.state.history.rows.len() + 1,
            stage: self.stage,
            seconds,
            values: logs
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), v.is_finite().then_some(*v)))
                .collect(),
        };
        self.state.history.rows.push(row);
        let mut verdict = Verdict::Continue;
        if let Some(es) = &mut self.early {
            let current = es.monitored(logs)?;
            match es.update(epoch, current) {
                EarlyStoppingStep::Improved => {
                    if self.restore_best {
                        let w = model.get_weights()?;
                        // On disk too, so that a resumed run can restore them.
                        model.save_weights(self.out.join(files::BEST_WEIGHTS))?;
                        self.best_weights = Some(w);
                    }
                }
                EarlyStoppingStep::Waiting => {}
                EarlyStoppingStep::Stop => {
                    self.stopped_early = true;
                    if self.verbose > 0 {
                        eprintln!(
                            "Epoch {}: early stopping ({} did not improve for {})",
                            epoch + 1,
                            es.monitor,
                            plural(es.patience, "epoch")
                        );
                    }
                    verdict = Verdict::Stop;
                }
            }
        }
        if verdict == Verdict::Stop && self.restore_best {
            self.restore(model)?;
        }
        let stage_done = verdict == Verdict::Stop || epoch + 1 >= self.stage_epochs;
        self.state.stopped_early = self.stopped_early;
        if stage_done {
            self.state.stage = self.stage + 1;
            self.state.stage_epoch = 0;
        } else {
            self.state.stage = self.stage;
            self.state.stage_epoch = epoch + 1;
        }
        self.state.optimizer_stage = Some(self.stage);
        self.state.model_epoch = model.epochs_done();
        self.state.model_step = model.steps();
        self.state.augment_rng = self.augment.map(|a| a.borrow().rng_state());
        model.save_checkpoint(self.out.join(files::CHECKPOINT))?;
        write_json(&self.out.join(files::CHECKPOINT_STATE), &*self.state)?;
        *self.epochs_this_run += 1;
        let requested = self.stop.load(Ordering::SeqCst)
            || self.stop_after.is_some_and(|n| *self.epochs_this_run >= n);
        // A request at the run's very last epoch changes nothing: it finishes.
        if requested && !(stage_done && self.last_stage) {
            self.interrupted = true;
            verdict = Verdict::Stop;
        }
        self.last = Instant::now();
        Ok(verdict)
    }

    fn on_train_end(&mut self, model: &mut Sequential<B>) -> Result<()> {
        // tf.keras's EarlyStopping restores at the end of every fit call;
        // a stop on request is no end of training (the run resumes).
        if self.restore_best && self.restore_at_end && !self.stopped_early && !self.interrupted {
            self.restore(model)?;
            // The next stage (or a resume into it) starts from these.
            model.save_checkpoint(self.out.join(files::CHECKPOINT))?;
        }
        Ok(())
    }
}

fn train_on<B: Backend>(
    cfg: &LoadedConfig,
    opts: &TrainOptions,
    start: Start,
    backend: B,
) -> Result<TrainOutcome> {
    let c = &cfg.config;
    let device = backend.name();
    let Start {
        out,
        mut state,
        data_dir,
        stages,
        extending,
    } = start;
    let seed = state.seed;
    let data = load_data(cfg, data_dir.as_deref(), seed)?;
    if opts.verbose > 0 {
        eprint!("{}", data.describe());
    }
    let mut model = build_model(cfg, backend, seed)?;
    let loss: Loss = c.loss.into();
    let outputs = model.output_len();
    let wrap = |e: Error| Error::Config(format!("{}: {e}", cfg.path.display()));
    let y_train = targets_for(&data.train.y, loss, outputs).map_err(wrap)?;
    let y_test = targets_for(&data.test.y, loss, outputs).map_err(wrap)?;
    let y_held = data
        .held_out
        .as_ref()
        .map(|h| targets_for(&h.y, loss, outputs))
        .transpose()
        .map_err(wrap)?;
    // Only now, with the data loaded and the model built, is the output
    // directory created (or an earlier run's outputs removed, with
    // --overwrite).
    std::fs::create_dir_all(&out).map_err(|source| Error::Io {
        path: out.clone(),
        source,
    })?;
    if opts.overwrite && !opts.resume {
        for f in [
            files::HISTORY_JSON,
            files::HISTORY_CSV,
            files::SUMMARY,
            files::WEIGHTS,
            files::CHECKPOINT,
            files::CHECKPOINT_STATE,
            files::BEST_WEIGHTS,
            files::CURVES,
            files::RESULT,
        ] {
            let p = out.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    write_atomic(
        &out.join(files::SUMMARY),
        format!("{}\n{}", summary_text(cfg)?, data.describe()).as_bytes(),
    )?;
    let augment = c
        .augmentation
        .as_ref()
        .map(|a| Augmenter::new(a, &data.sample_shape, seed))
        .transpose()?
        .map(std::cell::RefCell::new);
    if opts.resume {
        // Compile with the optimizer in use when the checkpoint was written,
        // so that its state loads; the stage loop re-compiles from there.
        if let Some(k) = state.optimizer_stage
            && let Some(o) = stages[..=k.min(stages.len() - 1)]
                .iter()
                .rev()
                .find_map(|s| s.recompile)
        {
            model.compile(o, loss, &metrics_of(c))?;
        }
        model.load_checkpoint(out.join(files::CHECKPOINT))?;
        if model.epochs_done() != state.model_epoch || model.steps() != state.model_step {
            return Err(Error::Format {
                path: out.join(files::CHECKPOINT),
                msg: format!(
                    "the checkpoint (epoch {}, step {}) and checkpoint.json (epoch {}, step {}) disagree; \
                     the run was stopped while writing them: start it again with --overwrite",
                    model.epochs_done(),
                    model.steps(),
                    state.model_epoch,
                    state.model_step
                ),
            });
        }
        if let (Some(a), Some(s)) = (&augment, state.augment_rng) {
            a.borrow_mut().set_rng_state(s);
        }
        if opts.verbose > 0 {
            let done = state.history.rows.len();
            match extending {
                Some(from) => eprintln!(
                    "Extending the finished run {} from {} to {}",
                    cfg.path.display(),
                    plural(from, "epoch"),
                    plural(stages[0].epochs, "epoch")
                ),
                None => eprintln!(
                    "Resuming {} at epoch {} ({} done; stage {} of {})",
                    cfg.path.display(),
                    done + 1,
                    done,
                    (state.stage + 1).min(stages.len()),
                    stages.len()
                ),
            }
        }
    }
    let metrics: Vec<Metric> = c.metrics.iter().map(|&m| m.into()).collect();
    let mut epochs_this_run = 0usize;
    let mut interrupted = false;
    let start_stage = state.stage;
    for (si, stage) in stages.iter().enumerate().skip(start_stage) {
        let resuming_mid_stage = si == start_stage && state.stage_epoch > 0;
        if !resuming_mid_stage && let Some(o) = stage.recompile {
            model.compile(o, loss, &metrics)?;
        }
        if !resuming_mid_stage {
            // Best weights are per stage (EarlyStopping starts afresh).
            let _ = std::fs::remove_file(out.join(files::BEST_WEIGHTS));
        }
        let initial_epoch = if resuming_mid_stage {
            state.stage_epoch
        } else {
            0
        };
        if initial_epoch >= stage.epochs {
            continue;
        }
        let mut early = c.early_stopping.as_ref().map(|e| e.build(c.keras));
        if let Some(es) = &mut early
            && resuming_mid_stage
        {
            // Replay the stage's epochs so far (Keras keeps this state in
            // the callback object; kestrel rebuilds it from the history).
            let done: Vec<&EpochRow> = state
                .history
                .rows
                .iter()
                .filter(|r| r.stage == si)
                .collect();
            for (e, r) in done.iter().enumerate() {
                let v = r
                    .values
                    .iter()
                    .find(|(k, _)| {
                        crate::train::canonical(k) == crate::train::canonical(&es.monitor)
                    })
                    .and_then(|(_, v)| *v)
                    .unwrap_or(f64::NAN);
                es.update(e, v);
            }
        }
        let validation = match c.fit.validation() {
            ValidationPlan::None => Validation::None,
            ValidationPlan::Split(f) => Validation::Split(f),
            ValidationPlan::First(_) => {
                let h = data.held_out.as_ref().expect("split when loaded");
                Validation::Data(&h.x, y_held.as_ref().expect("with held_out").as_targets())
            }
            ValidationPlan::Test => Validation::Data(&data.test.x, y_test.as_targets()),
        };
        let fit_result = {
            let mut cb = RunCallback {
                out: &out,
                state: &mut state,
                stage: si,
                stage_epochs: stage.epochs,
                last_stage: si + 1 == stages.len(),
                verbose: opts.verbose,
                early,
                best_weights: None,
                restore_best: c
                    .early_stopping
                    .as_ref()
                    .is_some_and(|e| e.restore_best_weights),
                restore_at_end: c.keras == config::KerasFlavor::TfKeras,
                stopped_early: false,
                augment: augment.as_ref(),
                last: Instant::now(),
                stop: &opts.stop,
                stop_after: opts.stop_after,
                epochs_this_run: &mut epochs_this_run,
                interrupted: false,
            };
            let mut transform = |batch: &mut [f32]| -> Result<()> {
                match &augment {
                    Some(a) => a.borrow_mut().apply(batch),
                    None => Ok(()),
                }
            };
            if stages.len() > 1 && opts.verbose > 0 {
                eprintln!(
                    "Stage {}/{}: up to {}{}",
                    si + 1,
                    stages.len(),
                    plural(stage.epochs, "epoch"),
                    stage
                        .recompile
                        .map(|o| format!(", {}", describe_optimizer(&o)))
                        .unwrap_or_default()
                );
            }
            let fit_opts = FitOptions {
                batch_size: c.fit.batch_size,
                epochs: stage.epochs,
                initial_epoch,
                validation,
                shuffle: c.fit.shuffle,
                callbacks: vec![&mut cb],
                verbose: opts.verbose,
                // The run prints its own final line (one s/epoch figure).
                summary: false,
                batch_transform: if augment.is_some() {
                    Some(&mut transform)
                } else {
                    None
                },
                cuda_graph: !opts.no_cuda_graph,
            };
            let r = model.fit(&data.train.x, y_train.as_targets(), fit_opts);
            (r, cb.interrupted)
        };
        match fit_result {
            (Ok(_), stopped) => {
                if stopped {
                    interrupted = true;
                    break;
                }
            }
            (Err(e), _) => {
                write_history(&out, &state.history, cfg, None)?;
                let diverged = matches!(
                    &e,
                    Error::InvalidArgument {
                        op: "fit",
                        arg: "loss",
                        ..
                    }
                );
                let result = result_json(
                    cfg,
                    &state,
                    if diverged { "diverged" } else { "failed" },
                    None,
                    &data,
                    &device,
                );
                write_json(&out.join(files::RESULT), &result)?;
                let done = state.history.rows.len();
                return Err(if diverged {
                    Error::Config(format!(
                        "{e}\nThe run stopped. {}",
                        if done > 0 {
                            format!(
                                "The checkpoint of the last good epoch ({done}) is {}.",
                                out.join(files::CHECKPOINT).display()
                            )
                        } else {
                            "No epoch completed, so there is no checkpoint.".to_string()
                        }
                    ))
                } else {
                    e
                });
            }
        }
    }
    let epochs = state.history.rows.len();
    let spe = seconds_per_epoch(&state.history);
    if interrupted {
        write_history(&out, &state.history, cfg, None)?;
        let result = result_json(cfg, &state, "interrupted", None, &data, &device);
        write_json(&out.join(files::RESULT), &result)?;
        if opts.verbose > 0 {
            eprintln!(
                "Stopped after epoch {epochs}; checkpoint saved in {}. Continue with: {}",
                out.display(),
                resume_command(cfg, &out, &state.flags)
            );
        }
        return Ok(TrainOutcome {
            ending: Ending::Interrupted,
            out_dir: out,
            test: None,
            epochs,
            seconds_per_epoch: spe,
            device,
            result,
        });
    }
    let test = model.evaluate(&data.test.x, y_test.as_targets(), c.fit.batch_size)?;
    model.save_weights(out.join(files::WEIGHTS))?;
    write_history(&out, &state.history, cfg, Some(&test))?;
    let result = result_json(cfg, &state, "finished", Some(&test), &data, &device);
    write_json(&out.join(files::RESULT), &result)?;
    state.finished = true;
    write_json(&out.join(files::CHECKPOINT_STATE), &state)?;
    if opts.verbose > 0 {
        eprintln!(
            "Test: {} - {}, {spe:.2} s/epoch on {device}; outputs in {}",
            format_logs(&test),
            plural(epochs, "epoch"),
            out.display()
        );
    }
    Ok(TrainOutcome {
        ending: Ending::Finished,
        out_dir: out,
        test: Some(test),
        epochs,
        seconds_per_epoch: spe,
        device,
        result,
    })
}

/// `loss: 0.3312 - accuracy: 0.8820`, as `kestrel evaluate` prints it.
pub fn format_logs(logs: &Logs) -> String {
    logs.entries
        .iter()
        .map(|(k, v)| format!("{k}: {v:.4}"))
        .collect::<Vec<_>>()
        .join(" - ")
}

/// The run's seconds per epoch, the one figure every output shows: the sum
/// of the epochs' recorded seconds over their number (0 before any epoch).
pub fn seconds_per_epoch(h: &RunHistory) -> f64 {
    if h.rows.is_empty() {
        0.0
    } else {
        h.rows.iter().map(|r| r.seconds).sum::<f64>() / h.rows.len() as f64
    }
}

/// The command that continues an interrupted run, repeating the flags it
/// was started with.
pub fn resume_command(cfg: &LoadedConfig, out: &Path, flags: &RunFlags) -> String {
    format!(
        "kestrel train {} --out {}{} --resume",
        shell_word(&cfg.path.display().to_string()),
        shell_word(&out.display().to_string()),
        flags.args()
    )
}

fn metrics_of(c: &config::RunConfig) -> Vec<Metric> {
    c.metrics.iter().map(|&m| m.into()).collect()
}

fn write_history(
    out: &Path,
    h: &RunHistory,
    cfg: &LoadedConfig,
    test: Option<&Logs>,
) -> Result<()> {
    write_json(&out.join(files::HISTORY_JSON), &h.to_json())?;
    write_atomic(&out.join(files::HISTORY_CSV), h.to_csv()?.as_bytes())?;
    let title = if cfg.config.description.is_empty() {
        cfg.stem()
    } else {
        cfg.config.description.clone()
    };
    write_atomic(
        &out.join(files::CURVES),
        outputs::curves_svg(h, &title, &this_run_line(h, test))?.as_bytes(),
    )
}

/// The curves' second title line: this run's test result (beside the
/// seed's figure in the description), or where the run stands.
pub fn this_run_line(h: &RunHistory, test: Option<&Logs>) -> String {
    let n = plural(h.rows.len(), "epoch");
    match test {
        Some(t) => {
            let main = t
                .entries
                .iter()
                .find(|(k, _)| k != "loss")
                .or_else(|| t.entries.first());
            match main {
                Some((k, v)) if k.contains("acc") => {
                    format!("this run: test {k} {:.2}% after {n}", v * 100.0)
                }
                Some((k, v)) => format!("this run: test {k} {v:.4} after {n}"),
                None => format!("this run: {n}"),
            }
        }
        None => format!("this run: not finished ({n} so far, no test result yet)"),
    }
}

fn result_json(
    cfg: &LoadedConfig,
    state: &RunState,
    status: &str,
    test: Option<&Logs>,
    data: &RunData,
    device: &str,
) -> serde_json::Value {
    let epochs = state.history.rows.len();
    // A fold from +0.0: an empty float `sum()` is -0.0.
    let train_seconds = state.history.rows.iter().fold(0.0, |t, r| t + r.seconds);
    let seed = state.seed;
    let test = test.map(|t| {
        t.entries
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect::<serde_json::Map<_, _>>()
    });
    let stage_epochs: Vec<usize> = {
        let mut v = Vec::new();
        for r in &state.history.rows {
            if v.len() <= r.stage {
                v.resize(r.stage + 1, 0);
            }
            v[r.stage] += 1;
        }
        v
    };
    serde_json::json!({
        "status": status,
        "config": cfg.path.display().to_string(),
        "description": cfg.config.description,
        "test": test,
        "epochs": epochs,
        "epochs_per_stage": stage_epochs,
        "seconds_per_epoch": seconds_per_epoch(&state.history),
        "train_seconds": train_seconds,
        "data": data.record(cfg.config.data.dataset),
        "flags": state.flags,
        "device": device,
        "seed": seed,
        "kestrel_version": env!("CARGO_PKG_VERSION"),
        "git_commit": git_commit(),
    })
}

/// `kestrel evaluate`: the test metrics of `weights` under the config's
/// model, loss and metrics.
pub fn evaluate(cfg: &LoadedConfig, weights: &Path, data_dir: Option<&Path>) -> Result<Logs> {
    let c = &cfg.config;
    let mut model = build_model(cfg, CpuBackend, c.seed)?;
    model.load_weights(weights)?;
    let data = load_data(cfg, data_dir, c.seed)?;
    let y = targets_for(&data.test.y, c.loss.into(), model.output_len())?;
    model.evaluate(&data.test.x, y.as_targets(), c.fit.batch_size)
}
