//! Callbacks: the hook trait, EarlyStopping and ModelCheckpoint.

use std::path::PathBuf;

use super::{Logs, canonical};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::Sequential;

/// What a callback wants after an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on training.
    Continue,
    /// Stop after this epoch.
    Stop,
}

/// Hooks into `fit`. Every method may fail, which ends `fit` with the error.
pub trait Callback<B: Backend> {
    /// Before the first epoch of a `fit`.
    fn on_train_begin(&mut self, _model: &mut Sequential<B>) -> Result<()> {
        Ok(())
    }
    /// After each epoch (0-based `epoch`), with that epoch's logs; the
    /// model's epoch counter and history already include it.
    fn on_epoch_end(
        &mut self,
        epoch: usize,
        logs: &Logs,
        model: &mut Sequential<B>,
    ) -> Result<Verdict>;
    /// After the last epoch (also after an early stop).
    fn on_train_end(&mut self, _model: &mut Sequential<B>) -> Result<()> {
        Ok(())
    }
}

/// Whether larger or smaller values of the monitored quantity are better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyStoppingMode {
    /// `max` when the monitor's name contains "acc", else `min` (Keras).
    Auto,
    /// Smaller is better.
    Min,
    /// Larger is better.
    Max,
}

/// Keras 2.3.1's EarlyStopping: an epoch improves when
/// `current - min_delta > best` (max mode; `current + min_delta < best` in
/// min mode); otherwise
/// `wait` grows, and training stops when `wait >= patience`. With
/// `restore_best_weights`, the weights of the best epoch are put back only
/// when it stops (not when training simply runs out of epochs). A missing
/// monitor is an error (Keras warns and goes on; a typo that silently
/// disables stopping is worse).
#[derive(Clone, Debug)]
pub struct EarlyStopping {
    /// The logged quantity (`val_loss`, `val_accuracy`; `val_acc` accepted).
    pub monitor: String,
    /// The smallest change that counts as an improvement (>= 0).
    pub min_delta: f64,
    /// Epochs without improvement before stopping.
    pub patience: usize,
    /// Min, max or auto.
    pub mode: EarlyStoppingMode,
    /// Put back the best epoch's weights when stopping.
    pub restore_best_weights: bool,
    /// tf.keras: with `restore_best_weights`, put the best weights back at
    /// the end of training even when it did not stop early (standalone
    /// Keras 2.2/2.3 restores them only when it stops).
    pub restore_at_train_end: bool,
    best: f64,
    wait: usize,
    stopped_epoch: Option<usize>,
    best_epoch: Option<usize>,
    best_weights: Option<Vec<Vec<f32>>>,
}

/// What one epoch did to an [`EarlyStopping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyStoppingStep {
    /// The epoch improved on the best.
    Improved,
    /// No improvement; `wait` grew but is still below the patience.
    Waiting,
    /// No improvement for `patience` epochs: stop.
    Stop,
}

impl EarlyStopping {
    /// `EarlyStopping(monitor, min_delta=0, patience=0, mode='auto')`.
    pub fn new(monitor: &str) -> Self {
        EarlyStopping {
            monitor: monitor.to_string(),
            min_delta: 0.0,
            patience: 0,
            mode: EarlyStoppingMode::Auto,
            restore_best_weights: false,
            restore_at_train_end: false,
            best: f64::NAN,
            wait: 0,
            stopped_epoch: None,
            best_epoch: None,
            best_weights: None,
        }
        .reset()
    }
    /// Sets the patience.
    pub fn patience(mut self, p: usize) -> Self {
        self.patience = p;
        self
    }
    /// Sets min_delta (its absolute value, as Keras takes it).
    pub fn min_delta(mut self, d: f64) -> Self {
        self.min_delta = d.abs();
        self
    }
    /// Sets the mode.
    pub fn mode(mut self, m: EarlyStoppingMode) -> Self {
        self.mode = m;
        self.reset()
    }
    /// Restores the best weights when stopping.
    pub fn restore_best_weights(mut self, r: bool) -> Self {
        self.restore_best_weights = r;
        self
    }
    /// tf.keras's rule: restore the best weights at the end of training
    /// whether or not it stopped early (with `restore_best_weights`).
    pub fn restore_at_train_end(mut self, r: bool) -> Self {
        self.restore_at_train_end = r;
        self
    }

    /// Whether larger is better for this monitor and mode.
    pub fn maximizes(&self) -> bool {
        match self.mode {
            EarlyStoppingMode::Max => true,
            EarlyStoppingMode::Min => false,
            EarlyStoppingMode::Auto => canonical(&self.monitor).contains("acc"),
        }
    }

    /// Forgets the past (Keras's `on_train_begin`).
    pub fn reset(mut self) -> Self {
        self.reset_state();
        self
    }

    fn reset_state(&mut self) {
        self.wait = 0;
        self.stopped_epoch = None;
        self.best_epoch = None;
        self.best_weights = None;
        self.best = if self.maximizes() {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
    }

    /// The monitored value in an epoch's logs, or an error listing the
    /// metrics that are there.
    pub fn monitored(&self, logs: &Logs) -> Result<f64> {
        logs.get(&self.monitor).ok_or_else(|| {
            Error::Config(format!(
                "EarlyStopping: monitor {:?} is not in the logs (available: {})",
                self.monitor,
                logs.entries
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// The rule, on one epoch's value of the monitor (no weights involved).
    pub fn update(&mut self, epoch: usize, current: f64) -> EarlyStoppingStep {
        let improved = if self.maximizes() {
            current - self.min_delta > self.best
        } else {
            current + self.min_delta < self.best
        };
        if improved {
            self.best = current;
            self.best_epoch = Some(epoch);
            self.wait = 0;
            EarlyStoppingStep::Improved
        } else {
            self.wait += 1;
            if self.wait >= self.patience {
                self.stopped_epoch = Some(epoch);
                EarlyStoppingStep::Stop
            } else {
                EarlyStoppingStep::Waiting
            }
        }
    }

    /// The best value seen.
    pub fn best(&self) -> f64 {
        self.best
    }
    /// The epoch of the best value.
    pub fn best_epoch(&self) -> Option<usize> {
        self.best_epoch
    }
    /// The epoch at which it stopped training, if it did.
    pub fn stopped_epoch(&self) -> Option<usize> {
        self.stopped_epoch
    }
    /// Epochs since the last improvement.
    pub fn wait(&self) -> usize {
        self.wait
    }
}

impl<B: Backend> Callback<B> for EarlyStopping {
    fn on_train_begin(&mut self, _model: &mut Sequential<B>) -> Result<()> {
        self.reset_state();
        Ok(())
    }

    fn on_epoch_end(
        &mut self,
        epoch: usize,
        logs: &Logs,
        model: &mut Sequential<B>,
    ) -> Result<Verdict> {
        let current = self.monitored(logs)?;
        match self.update(epoch, current) {
            EarlyStoppingStep::Improved => {
                if self.restore_best_weights {
                    self.best_weights = Some(model.get_weights()?);
                }
                Ok(Verdict::Continue)
            }
            EarlyStoppingStep::Waiting => Ok(Verdict::Continue),
            EarlyStoppingStep::Stop => {
                if let (true, Some(w)) = (self.restore_best_weights, &self.best_weights) {
                    model.set_weights(w)?;
                }
                Ok(Verdict::Stop)
            }
        }
    }

    fn on_train_end(&mut self, model: &mut Sequential<B>) -> Result<()> {
        if self.restore_best_weights
            && self.restore_at_train_end
            && self.stopped_epoch.is_none()
            && let Some(w) = &self.best_weights
        {
            model.set_weights(w)?;
        }
        Ok(())
    }
}

/// Saves a full checkpoint (weights, optimizer state, epoch, generator
/// state, history) after every `every` epochs, atomically.
#[derive(Clone, Debug)]
pub struct ModelCheckpoint {
    /// Where to write.
    pub path: PathBuf,
    /// Save after epochs `every - 1`, `2 * every - 1`, ... (>= 1).
    pub every: usize,
}

impl ModelCheckpoint {
    /// A checkpoint written after every epoch.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ModelCheckpoint {
            path: path.into(),
            every: 1,
        }
    }
}

impl<B: Backend> Callback<B> for ModelCheckpoint {
    fn on_epoch_end(
        &mut self,
        epoch: usize,
        _logs: &Logs,
        model: &mut Sequential<B>,
    ) -> Result<Verdict> {
        if (epoch + 1).is_multiple_of(self.every.max(1)) {
            model.save_checkpoint(&self.path)?;
        }
        Ok(Verdict::Continue)
    }
}
