//! compile / fit / evaluate / predict with Keras 2 semantics.
//!
//! - `compile` takes an [`Optimizer`], a [`Loss`] and [`Metric`]s. Cross-entropy
//!   losses are fused with the final softmax / sigmoid: the model trains on
//!   the logits (log-softmax, no probability clipping, as tf.keras's `fit`
//!   does) while `predict` still returns probabilities. Categorical and
//!   sparse categorical cross-entropy need a final softmax, binary
//!   cross-entropy a final sigmoid; anything else is a compile error.
//!   Re-compiling keeps the weights and starts a fresh optimizer state.
//! - `accuracy` resolves as in Keras 2.3.1: binary accuracy for binary
//!   cross-entropy or a single output, sparse categorical accuracy for the
//!   sparse loss, categorical accuracy otherwise.
//! - `fit`: `validation_split` takes the *last* fraction of the samples
//!   (before any shuffle); the training indices are shuffled every epoch
//!   (a fresh `0..n` permuted by the model's generator); the last partial
//!   batch is kept; epoch metrics are batch-size-weighted means (training
//!   metrics in training mode, validation ones in inference mode). A NaN or
//!   infinite training loss stops training with an error naming the epoch
//!   and the batch. [`FitOptions::batch_transform`] may change each
//!   gathered training batch on the host before it is uploaded (data
//!   augmentation).
//! - On CUDA, every full-batch training step after an epoch's first is one
//!   replay of a CUDA graph recorded once per epoch (forward, loss, backward and
//!   the optimizer update; the per-step values live in device memory);
//!   the last partial batch and evaluation run uncaptured. The same bits
//!   as launching every op ([`FitOptions::cuda_graph`] = false); the
//!   CPU backend always runs steps directly.

mod callbacks;
mod captured;
mod checkpoint;
mod progress;

pub use callbacks::{
    Callback, EarlyStopping, EarlyStoppingMode, EarlyStoppingStep, ModelCheckpoint, Verdict,
};

use std::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::{Act, Sequential};
use crate::ops::activation::{Activation as OpAct, Softmax};
use crate::ops::loss::LossParams;
use crate::ops::optim::Optimizer;
use captured::CapturedStep;
use progress::Progress;

/// Gradients by tensor name, as [`Sequential::compute_gradients`] returns them.
pub type NamedGrads = Vec<(String, Vec<f32>)>;

/// The training loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Softmax + categorical cross-entropy, one-hot (or soft) f32 targets.
    CategoricalCrossentropy,
    /// Softmax + cross-entropy with class-index (u32) targets.
    SparseCategoricalCrossentropy,
    /// Sigmoid + binary cross-entropy, f32 targets in `[0, 1]`.
    BinaryCrossentropy,
    /// Mean squared error, f32 targets.
    Mse,
}

impl Loss {
    /// Keras's name of the loss.
    pub fn name(self) -> &'static str {
        match self {
            Loss::CategoricalCrossentropy => "categorical_crossentropy",
            Loss::SparseCategoricalCrossentropy => "sparse_categorical_crossentropy",
            Loss::BinaryCrossentropy => "binary_crossentropy",
            Loss::Mse => "mse",
        }
    }
}

/// A metric as `compile` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Accuracy, resolved by the loss (see the module docs); logged as `accuracy`.
    Accuracy,
    /// Mean absolute error; logged as `mae`.
    Mae,
}

impl Metric {
    /// The name in logs and history.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Mae => "mae",
        }
    }
}

/// A metric after resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolved {
    Categorical,
    Sparse,
    Binary,
    Mae,
}

/// The final activation fused with the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Head {
    Softmax,
    Sigmoid,
    None,
}

/// What `compile` sets up: the optimizer, its state, the loss and metrics.
pub(crate) struct Compiled<B: Backend> {
    pub optimizer: Optimizer,
    pub loss: Loss,
    metrics: Vec<Metric>,
    resolved: Vec<Resolved>,
    pub head: Head,
    pub state: B::OptState,
}

impl<B: Backend> Compiled<B> {
    pub fn metric_names(&self) -> Vec<Metric> {
        self.metrics.clone()
    }
}

/// Training targets.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Class indices, one per sample (sparse categorical cross-entropy).
    Sparse(&'a [u32]),
    /// Dense f32 targets, `outputs` per sample (one-hot, binary, regression).
    Dense(&'a [f32]),
}

impl Targets<'_> {
    fn slice_rows(&self, from: usize, to: usize, width: usize) -> Targets<'_> {
        match *self {
            Targets::Sparse(v) => Targets::Sparse(&v[from..to]),
            Targets::Dense(v) => Targets::Dense(&v[from * width..to * width]),
        }
    }
}

/// Where `fit` gets its validation data.
#[derive(Clone, Copy, Debug, Default)]
pub enum Validation<'a> {
    /// None.
    #[default]
    None,
    /// The last fraction of the training data, in `(0, 1)`.
    Split(f64),
    /// Separate data (inputs, targets).
    Data(&'a [f32], Targets<'a>),
}

/// A host-side transform of a training batch (`[n, sample...]`, in place):
/// data augmentation, see [`FitOptions::batch_transform`].
pub type BatchTransform<'a> = dyn FnMut(&mut [f32]) -> Result<()> + 'a;

/// `fit`'s options (Keras's arguments).
pub struct FitOptions<'a, B: Backend> {
    /// Samples per step (Keras default 32).
    pub batch_size: usize,
    /// Train up to this epoch (exclusive upper bound, as Keras's `epochs`).
    pub epochs: usize,
    /// The first epoch to run (to continue a run).
    pub initial_epoch: usize,
    /// Validation data.
    pub validation: Validation<'a>,
    /// Shuffle the training samples every epoch.
    pub shuffle: bool,
    /// Callbacks, called in order at the end of each epoch.
    pub callbacks: Vec<&'a mut dyn Callback<B>>,
    /// 0 silent, 1 progress bar, 2 one line per epoch.
    pub verbose: u8,
    /// With `verbose > 0`, end with a line of the epochs trained, the time
    /// and the seconds per epoch (`true` by default; `kestrel train` prints
    /// its own).
    pub summary: bool,
    /// Transforms each training batch on the host before it is uploaded
    /// (data augmentation): called with the gathered batch, `[n, sample...]`
    /// row-major, which it may change in place. `None`: the batch goes
    /// straight from `x` into the backend's buffer.
    pub batch_transform: Option<&'a mut BatchTransform<'a>>,
    /// On a backend that captures steps (CUDA), record the full-batch
    /// training step once in a CUDA graph and replay it for every full
    /// batch (`true` by default; the results are the same bits either way,
    /// see the module docs). `false`: launch every op of every step
    /// (`kestrel train --no-cuda-graph`).
    pub cuda_graph: bool,
}

impl<B: Backend> Default for FitOptions<'_, B> {
    fn default() -> Self {
        FitOptions {
            batch_size: 32,
            epochs: 1,
            initial_epoch: 0,
            validation: Validation::None,
            shuffle: true,
            callbacks: Vec::new(),
            verbose: 1,
            summary: true,
            batch_transform: None,
            cuda_graph: true,
        }
    }
}

/// Keras accepts `acc` for `accuracy` in monitors and lookups.
pub(crate) fn canonical(name: &str) -> String {
    match name {
        "acc" => "accuracy".into(),
        "val_acc" => "val_accuracy".into(),
        other => other.into(),
    }
}

/// One epoch's results: `loss`, the metrics, and `val_` versions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Logs {
    /// (name, value) in Keras's order.
    pub entries: Vec<(String, f64)>,
}

impl Logs {
    /// The value of `name` (`acc` / `val_acc` accepted as aliases).
    pub fn get(&self, name: &str) -> Option<f64> {
        let name = canonical(name);
        self.entries
            .iter()
            .find(|(k, _)| *k == name)
            .map(|&(_, v)| v)
    }
    /// Sets (or adds) an entry (`acc` / `val_acc` are stored as
    /// `accuracy` / `val_accuracy`).
    pub fn set(&mut self, name: &str, v: f64) {
        let name = canonical(name);
        match self.entries.iter_mut().find(|(k, _)| *k == name) {
            Some(e) => e.1 = v,
            None => self.entries.push((name, v)),
        }
    }
}

/// Every logged value per epoch, as Keras's `History.history`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    /// The epochs recorded (0-based).
    pub epoch: Vec<usize>,
    /// (name, one value per recorded epoch), in Keras's order.
    pub metrics: Vec<(String, Vec<f64>)>,
}

impl History {
    /// The values of `name` (`acc` / `val_acc` accepted).
    pub fn get(&self, name: &str) -> Option<&[f64]> {
        let name = canonical(name);
        self.metrics
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_slice())
    }
    /// Appends one epoch's logs.
    pub fn push(&mut self, epoch: usize, logs: &Logs) {
        self.epoch.push(epoch);
        for (k, v) in &logs.entries {
            match self.metrics.iter_mut().find(|(name, _)| name == k) {
                Some((_, vals)) => vals.push(*v),
                None => self.metrics.push((k.clone(), vec![*v])),
            }
        }
    }
}

/// The running sums of one epoch, fed from the per-step results as they
/// are read back (see the fit loop).
struct EpochSums {
    /// Steps absorbed so far.
    read: usize,
    seen: usize,
    loss: f64,
    metrics: Vec<f64>,
}

impl EpochSums {
    fn new(metrics: usize) -> Self {
        EpochSums {
            read: 0,
            seen: 0,
            loss: 0.0,
            metrics: vec![0.0; metrics],
        }
    }

    /// Reads the results of the steps run so far (`sizes` holds their batch
    /// sizes) and adds those not yet absorbed; a non-finite loss stops
    /// training with an error naming its batch. `at` is (epoch, epochs,
    /// steps) for the message.
    fn absorb<B: Backend>(
        &mut self,
        backend: &B,
        results: &B::Scalars,
        sizes: &[usize],
        width: usize,
        progress: &mut Progress,
        at: (usize, usize, usize),
    ) -> Result<()> {
        let done = sizes.len();
        if done == self.read {
            return Ok(());
        }
        let v = backend.scalars_read(results, done * width)?;
        for (s, &n) in sizes.iter().enumerate().skip(self.read) {
            let row = &v[s * width..(s + 1) * width];
            let loss = row[0];
            if !loss.is_finite() {
                progress.abort();
                let (epoch, epochs, steps) = at;
                let weights = if s + 1 == done {
                    "the weights hold the last update".to_string()
                } else {
                    format!(
                        "the weights hold the updates through batch {done} (losses are read \
                         back from the device in bulk)"
                    )
                };
                return Err(Error::invalid(
                    "fit",
                    "loss",
                    format!(
                        "the training loss is {loss} at epoch {} (of {epochs}), batch {} (of \
                         {steps}): training stopped (TerminateOnNaN); {weights}",
                        epoch + 1,
                        s + 1
                    ),
                ));
            }
            self.seen += n;
            self.loss += loss * n as f64;
            for (a, m) in self.metrics.iter_mut().zip(&row[1..]) {
                *a += m;
            }
        }
        self.read = done;
        Ok(())
    }

    /// The epoch means so far.
    fn logs(&self, names: &[&str]) -> Logs {
        let mut logs = Logs::default();
        logs.set("loss", self.loss / self.seen as f64);
        for (name, v) in names.iter().zip(&self.metrics) {
            logs.set(name, v / self.seen as f64);
        }
        logs
    }
}

fn resolve(loss: Loss, m: Metric, outputs: usize) -> Resolved {
    match m {
        Metric::Mae => Resolved::Mae,
        Metric::Accuracy => match loss {
            Loss::BinaryCrossentropy => Resolved::Binary,
            _ if outputs == 1 => Resolved::Binary,
            Loss::SparseCategoricalCrossentropy => Resolved::Sparse,
            _ => Resolved::Categorical,
        },
    }
}

impl<B: Backend> Sequential<B> {
    /// Sets the optimizer, loss and metrics, with a fresh optimizer state
    /// (the weights are kept: re-compiling continues from them).
    pub fn compile(&mut self, optimizer: Optimizer, loss: Loss, metrics: &[Metric]) -> Result<()> {
        self.check_built("compile")?;
        optimizer.validate()?;
        let last = self.layers.last().and_then(|l| l.final_act());
        let head = match loss {
            Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy => {
                if last != Some(Act::Softmax) {
                    return Err(Error::Config(format!(
                        "loss {} needs a final softmax (Dense(..., activation=softmax) or \
                         Activation(softmax)); the last layer is {}",
                        loss.name(),
                        self.layers.last().map_or("none".into(), |l| l.name.clone())
                    )));
                }
                Head::Softmax
            }
            Loss::BinaryCrossentropy => {
                if last != Some(Act::Sigmoid) {
                    return Err(Error::Config(format!(
                        "loss binary_crossentropy needs a final sigmoid; the last layer is {}",
                        self.layers.last().map_or("none".into(), |l| l.name.clone())
                    )));
                }
                Head::Sigmoid
            }
            Loss::Mse => Head::None,
        };
        let outputs = self.output_len();
        let state = self
            .backend
            .opt_state_new(&optimizer, &self.trainable_sizes())?;
        self.compiled = Some(Compiled {
            optimizer,
            loss,
            metrics: metrics.to_vec(),
            resolved: metrics.iter().map(|&m| resolve(loss, m, outputs)).collect(),
            head,
            state,
        });
        self.history = History::default();
        Ok(())
    }

    fn compiled(&self, what: &str) -> Result<&Compiled<B>> {
        self.check_built(what)?;
        self.compiled
            .as_ref()
            .ok_or_else(|| Error::Config(format!("{what}: compile the model first")))
    }

    /// Checks `x` and the targets, returning the sample count.
    fn check_data(&self, what: &'static str, x: &[f32], y: Option<&Targets>) -> Result<usize> {
        let per = self.input_len();
        if per == 0 || !x.len().is_multiple_of(per) {
            return Err(Error::shape(
                what,
                format!("x length (a multiple of the sample size {per})"),
                format!("a multiple of {per}"),
                x.len(),
            ));
        }
        let n = x.len() / per;
        let loss = self.compiled.as_ref().map(|c| c.loss);
        match (y, loss) {
            (Some(Targets::Sparse(l)), Some(loss)) => {
                if loss != Loss::SparseCategoricalCrossentropy {
                    return Err(Error::invalid(
                        what,
                        "targets",
                        format!(
                            "class indices need sparse_categorical_crossentropy, the loss is {}",
                            loss.name()
                        ),
                    ));
                }
                crate::error::check_len(what, "targets (one class index per sample)", l.len(), n)?;
                let classes = self.output_len();
                if let Some((i, &v)) = l.iter().enumerate().find(|&(_, &v)| v as usize >= classes) {
                    return Err(Error::invalid(
                        what,
                        "targets",
                        format!(
                            "sample {i}: class index {v} is out of range (classes = {classes})"
                        ),
                    ));
                }
            }
            (Some(Targets::Dense(t)), Some(loss)) => {
                if loss == Loss::SparseCategoricalCrossentropy {
                    return Err(Error::invalid(
                        what,
                        "targets",
                        "sparse_categorical_crossentropy needs class indices (Targets::Sparse)",
                    ));
                }
                crate::error::check_len(
                    what,
                    &format!("targets ({} per sample x {n} samples)", self.output_len()),
                    t.len(),
                    n * self.output_len(),
                )?;
            }
            _ => {}
        }
        Ok(n)
    }

    /// Uploads the targets of `rows` into workspace `wi`.
    fn upload_targets(&mut self, wi: usize, y: &Targets, rows: &[usize]) -> Result<()> {
        let outputs = self.output_len();
        let ws = &mut self.workspaces[wi];
        match *y {
            Targets::Sparse(l) => self.backend.upload_rows_u32(l, 1, rows, &mut ws.labels),
            Targets::Dense(t) => self
                .backend
                .upload_rows_f32(t, outputs, rows, &mut ws.targets),
        }
    }

    /// Writes the batch loss (mean) into `out[base]` and the metric sums
    /// into `out[base + 1..]`, on workspace `wi`, after a forward pass with
    /// the head stripped; writes dL/d(logits) into the output gradient when
    /// `grad`. Nothing is read back: see [`Backend::scalars_read`].
    fn loss_and_metrics(
        &mut self,
        wi: usize,
        grad: bool,
        out: &mut B::Scalars,
        base: usize,
    ) -> Result<()> {
        let c = self.compiled.as_ref().expect("checked by callers");
        let slot = self.plan.output_slot();
        let outputs = self.output_len();
        let b = &self.backend;
        let ws = &mut self.workspaces[wi];
        let p = LossParams::new(ws.n, outputs)?;
        let logits = &ws.acts[slot];
        let dz = if grad { ws.grads.get_mut(slot) } else { None };
        let (t, l) = (&ws.targets, &ws.labels);
        match c.loss {
            Loss::CategoricalCrossentropy => {
                b.softmax_cross_entropy(&p, logits, t, &mut ws.losses, dz, out, base)?
            }
            Loss::SparseCategoricalCrossentropy => {
                b.sparse_softmax_cross_entropy(&p, logits, l, &mut ws.losses, dz, out, base)?
            }
            Loss::BinaryCrossentropy => b.sigmoid_cross_entropy(
                &p,
                logits,
                t,
                &mut ws.losses,
                &mut ws.probs,
                dz,
                out,
                base,
            )?,
            Loss::Mse => b.mse(&p, logits, t, &mut ws.losses, dz, out, base)?,
        }
        let needs_probs = c
            .resolved
            .iter()
            .any(|r| matches!(r, Resolved::Binary | Resolved::Mae));
        if needs_probs && c.head == Head::Softmax {
            b.softmax_forward(&Softmax::new(ws.n, outputs)?, logits, &mut ws.probs)?;
        }
        let probs = if c.head == Head::None {
            logits
        } else {
            &ws.probs
        };
        for (i, r) in c.resolved.iter().enumerate() {
            let k = base + 1 + i;
            match r {
                Resolved::Categorical => b.categorical_accuracy(&p, logits, t, out, k)?,
                Resolved::Sparse => b.sparse_categorical_accuracy(&p, logits, l, out, k)?,
                Resolved::Binary => b.binary_accuracy(&p, probs, t, out, k)?,
                Resolved::Mae => b.mae(&p, probs, t, out, k)?,
            }
        }
        Ok(())
    }

    fn metric_names_logged(&self) -> Vec<&'static str> {
        self.compiled
            .as_ref()
            .map(|c| c.metrics.iter().map(|m| m.name()).collect())
            .unwrap_or_default()
    }

    /// Trains the model (see the module docs for the semantics). Returns
    /// the history of this call; the model also keeps the history of every
    /// fit since the last compile ([`Sequential::history`]).
    pub fn fit(&mut self, x: &[f32], y: Targets, mut opts: FitOptions<B>) -> Result<History> {
        const OP: &str = "fit";
        self.compiled(OP)?;
        let n_all = self.check_data(OP, x, Some(&y))?;
        if opts.batch_size == 0 {
            return Err(Error::invalid(
                OP,
                "batch_size",
                "must be at least 1, got 0",
            ));
        }
        let per = self.input_len();
        let outputs = self.output_len();
        let (n_train, val): (usize, Option<(&[f32], Targets)>) = match opts.validation {
            Validation::None => (n_all, None),
            Validation::Split(f) => {
                if !(f > 0.0 && f < 1.0) {
                    return Err(Error::invalid(
                        OP,
                        "validation_split",
                        format!("must be in (0, 1), got {f}"),
                    ));
                }
                // Keras: split_at = int(n * (1 - validation_split)).
                let split = (n_all as f64 * (1.0 - f)) as usize;
                if split == 0 || split == n_all {
                    return Err(Error::invalid(
                        OP,
                        "validation_split",
                        format!(
                            "{f} of {n_all} samples leaves an empty training or validation set"
                        ),
                    ));
                }
                (
                    split,
                    Some((&x[split * per..], y.slice_rows(split, n_all, outputs))),
                )
            }
            Validation::Data(vx, vy) => {
                self.check_data("fit (validation data)", vx, Some(&vy))?;
                (n_all, Some((vx, vy)))
            }
        };
        if n_train == 0 {
            return Err(Error::invalid(OP, "x", "no training samples"));
        }
        let bs = opts.batch_size;
        let steps = n_train.div_ceil(bs);
        let names = self.metric_names_logged();
        let mut history = History::default();
        let mut idx: Vec<usize> = (0..n_train).collect();
        let mut host_batch: Vec<f32> = Vec::new();
        let mut progress = Progress::new(opts.verbose, opts.epochs, steps);
        for cb in opts.callbacks.iter_mut() {
            cb.on_train_begin(self)?;
        }
        let t_start = Instant::now();
        let mut epochs_run = 0usize;
        let mut stop = false;
        // One row per step (loss, then the metrics), read back in bulk: at
        // every step where reading is free (CPU), else when the progress
        // bar redraws and at the end of the epoch, so that a GPU step never
        // waits for the device.
        let width = 1 + names.len();
        let mut results = self.backend.scalars_new(steps * width)?;
        let defer = self.backend.defers_scalars();
        // Only full batches replay the graph: without one, nothing to record.
        let mut captured = if opts.cuda_graph && self.backend.captures_steps() && n_train >= bs {
            Some(CapturedStep::new(&self.backend, steps, width)?)
        } else {
            None
        };
        for epoch in opts.initial_epoch..opts.epochs {
            progress.epoch_begin(epoch);
            if let Some(cap) = captured.as_mut() {
                self.captured_epoch_begin(cap, steps)?;
            }
            for (i, v) in idx.iter_mut().enumerate() {
                *v = i;
            }
            if opts.shuffle {
                self.rng.shuffle(&mut idx);
            }
            let mut acc = EpochSums::new(names.len());
            let mut sizes = Vec::with_capacity(steps);
            for s in 0..steps {
                let rows = &idx[s * bs..((s + 1) * bs).min(n_train)];
                let n = rows.len();
                let wi = self.workspace(n, true)?;
                if let Some(transform) = opts.batch_transform.as_mut() {
                    host_batch.clear();
                    for &r in rows {
                        host_batch.extend_from_slice(&x[r * per..(r + 1) * per]);
                    }
                    transform(&mut host_batch)?;
                    crate::error::check_len(
                        "fit (batch_transform)",
                        "transformed batch",
                        host_batch.len(),
                        n * per,
                    )?;
                    self.backend
                        .upload_into_f32(&host_batch, &mut self.workspaces[wi].acts[0])?;
                } else {
                    self.backend
                        .upload_rows_f32(x, per, rows, &mut self.workspaces[wi].acts[0])?;
                }
                self.upload_targets(wi, &y, rows)?;
                let mode = self.mode(true, self.head() != Head::None);
                let replayed = match captured.as_mut() {
                    Some(cap) if n == bs => self.captured_step(cap, wi, s, mode, &mut results)?,
                    _ => false,
                };
                if replayed {
                    sizes.push(n);
                } else {
                    self.run_forward(wi, mode)?;
                    self.loss_and_metrics(wi, true, &mut results, s * width)?;
                    sizes.push(n);
                    if !defer {
                        // The loss is on the host already: stop before the
                        // update, as Keras's TerminateOnNaN does.
                        acc.absorb(
                            &self.backend,
                            &results,
                            &sizes,
                            width,
                            &mut progress,
                            (epoch, opts.epochs, steps),
                        )?;
                    }
                    self.run_backward(wi, mode)?;
                    self.optimizer_step()?;
                    if let Some(cap) = captured.as_mut() {
                        cap.ran_uncaptured();
                    }
                }
                self.step += 1;
                if progress.wants_update() {
                    acc.absorb(
                        &self.backend,
                        &results,
                        &sizes,
                        width,
                        &mut progress,
                        (epoch, opts.epochs, steps),
                    )?;
                    progress.step(s + 1, &acc.logs(&names));
                }
            }
            acc.absorb(
                &self.backend,
                &results,
                &sizes,
                width,
                &mut progress,
                (epoch, opts.epochs, steps),
            )?;
            let mut logs = acc.logs(&names);
            if let Some((vx, vy)) = val {
                let v = self.evaluate(vx, vy, bs)?;
                for (k, val) in v.entries {
                    logs.set(&format!("val_{k}"), val);
                }
            }
            self.epoch = epoch + 1;
            epochs_run += 1;
            history.push(epoch, &logs);
            self.history.push(epoch, &logs);
            progress.epoch_end(steps, &logs);
            for cb in opts.callbacks.iter_mut() {
                if cb.on_epoch_end(epoch, &logs, self)? == Verdict::Stop {
                    stop = true;
                }
            }
            if stop {
                break;
            }
        }
        for cb in opts.callbacks.iter_mut() {
            cb.on_train_end(self)?;
        }
        if opts.summary {
            progress.finish(epochs_run, t_start.elapsed());
        }
        Ok(history)
    }

    pub(crate) fn head(&self) -> Head {
        self.compiled.as_ref().map_or(Head::None, |c| c.head)
    }

    fn optimizer_step(&mut self) -> Result<()> {
        let mut c = self.compiled.take().expect("compiled");
        let r = {
            let backend = &self.backend;
            let (mut ps, gs) = Self::trainable_mut(&mut self.layers);
            backend.optimizer_step(&c.optimizer, &mut c.state, &mut ps, &gs)
        };
        self.compiled = Some(c);
        r
    }

    /// Loss and metrics over `x` in inference mode, in batches of
    /// `batch_size` (the last one partial), as batch-size-weighted means.
    pub fn evaluate(&mut self, x: &[f32], y: Targets, batch_size: usize) -> Result<Logs> {
        const OP: &str = "evaluate";
        self.compiled(OP)?;
        let n = self.check_data(OP, x, Some(&y))?;
        if batch_size == 0 {
            return Err(Error::invalid(
                OP,
                "batch_size",
                "must be at least 1, got 0",
            ));
        }
        if n == 0 {
            return Err(Error::invalid(OP, "x", "no samples"));
        }
        let per = self.input_len();
        let names = self.metric_names_logged();
        let all: Vec<usize> = (0..n).collect();
        let width = 1 + names.len();
        let batches = n.div_ceil(batch_size);
        let mut results = self.backend.scalars_new(batches * width)?;
        let mut sizes = Vec::with_capacity(batches);
        for (b, start) in (0..n).step_by(batch_size).enumerate() {
            let rows = &all[start..(start + batch_size).min(n)];
            let wi = self.workspace(rows.len(), false)?;
            self.backend
                .upload_rows_f32(x, per, rows, &mut self.workspaces[wi].acts[0])?;
            self.upload_targets(wi, &y, rows)?;
            let mode = self.mode(false, self.head() != Head::None);
            self.run_forward(wi, mode)?;
            self.loss_and_metrics(wi, false, &mut results, b * width)?;
            sizes.push(rows.len());
        }
        // One read for the whole evaluation.
        let v = self.backend.scalars_read(&results, batches * width)?;
        let (mut loss_sum, mut sums) = (0.0f64, vec![0.0f64; names.len()]);
        for (row, &m) in v.chunks(width).zip(&sizes) {
            loss_sum += row[0] * m as f64;
            for (a, x) in sums.iter_mut().zip(&row[1..]) {
                *a += x;
            }
        }
        let mut logs = Logs::default();
        logs.set("loss", loss_sum / n as f64);
        for (name, v) in names.iter().zip(&sums) {
            logs.set(name, v / n as f64);
        }
        Ok(logs)
    }

    /// The model's outputs for `x` (class probabilities for a softmax or
    /// sigmoid head), `[n, outputs]` row-major, in inference mode.
    pub fn predict(&mut self, x: &[f32], batch_size: usize) -> Result<Vec<f32>> {
        const OP: &str = "predict";
        self.check_built(OP)?;
        let n = self.check_data(OP, x, None)?;
        if batch_size == 0 {
            return Err(Error::invalid(
                OP,
                "batch_size",
                "must be at least 1, got 0",
            ));
        }
        let (per, outputs) = (self.input_len(), self.output_len());
        let out_slot = self.plan.output_slot();
        let mut result = vec![0.0f32; n * outputs];
        // Without a compiled loss the final activation runs as a layer.
        let head = self.head();
        for start in (0..n).step_by(batch_size) {
            let end = (start + batch_size).min(n);
            let m = end - start;
            let wi = self.workspace(m, false)?;
            self.backend
                .upload_into_f32(&x[start * per..end * per], &mut self.workspaces[wi].acts[0])?;
            let mode = self.mode(false, head != Head::None);
            self.run_forward(wi, mode)?;
            let ws = &mut self.workspaces[wi];
            let dst = &mut result[start * outputs..end * outputs];
            match head {
                Head::Softmax => {
                    let p = Softmax::new(m, outputs)?;
                    self.backend
                        .softmax_forward(&p, &ws.acts[out_slot], &mut ws.probs)?;
                    self.backend.download_into_f32(&ws.probs, dst)?;
                }
                Head::Sigmoid => {
                    self.backend.activation_forward(
                        OpAct::SIGMOID,
                        &ws.acts[out_slot],
                        &mut ws.probs,
                    )?;
                    self.backend.download_into_f32(&ws.probs, dst)?;
                }
                Head::None => self.backend.download_into_f32(&ws.acts[out_slot], dst)?,
            }
        }
        Ok(result)
    }

    /// The training-mode loss of one batch made of all of `x` and the
    /// gradient of every trainable tensor (named as in
    /// [`Sequential::params`]), without updating the weights or advancing
    /// the step counter (so dropout masks stay the same between calls).
    /// Batch normalization's moving statistics are updated, as in any
    /// training forward pass.
    pub fn compute_gradients(&mut self, x: &[f32], y: Targets) -> Result<(f64, NamedGrads)> {
        const OP: &str = "compute_gradients";
        self.compiled(OP)?;
        let n = self.check_data(OP, x, Some(&y))?;
        if n == 0 {
            return Err(Error::invalid(OP, "x", "no samples"));
        }
        let all: Vec<usize> = (0..n).collect();
        let wi = self.workspace(n, true)?;
        let per = self.input_len();
        self.backend
            .upload_rows_f32(x, per, &all, &mut self.workspaces[wi].acts[0])?;
        self.upload_targets(wi, &y, &all)?;
        let mode = self.mode(true, self.head() != Head::None);
        self.run_forward(wi, mode)?;
        let width = 1 + self.metric_names_logged().len();
        let mut results = self.backend.scalars_new(width)?;
        self.loss_and_metrics(wi, true, &mut results, 0)?;
        self.run_backward(wi, mode)?;
        let loss = self.backend.scalars_read(&results, 1)?[0];
        let grads = self.download_grads()?;
        Ok((
            loss,
            self.trainable_names().into_iter().zip(grads).collect(),
        ))
    }

    /// The optimizer's state on the host (step counter and slots, as a
    /// checkpoint holds them; a copy from the device on a GPU).
    pub fn optimizer_state(&self) -> Result<crate::ops::optim::OptimizerState> {
        let c = self.compiled("optimizer_state")?;
        self.backend.opt_state_download(&c.optimizer, &c.state)
    }

    /// The optimizer's step counter (`iterations` in Keras), 0 right after
    /// compile.
    pub fn optimizer_iterations(&self) -> Result<u64> {
        let c = self.compiled("optimizer_iterations")?;
        Ok(self.backend.opt_state_iterations(&c.state))
    }
}
