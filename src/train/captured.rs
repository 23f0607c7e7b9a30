//! The captured training step: on a backend that records steps (CUDA
//! graphs, [`Backend::captures_steps`]), `fit` records one full-batch step
//! (forward, loss and metrics, backward, optimizer update) once and replays
//! it for every full batch, one graph launch instead of dozens of kernel
//! launches ([`super::FitOptions::cuda_graph`] turns it off).
//!
//! What changes from step to step is read from device memory, never baked
//! into the graph's parameter bytes:
//! - the batch: uploaded into the full-batch workspace's fixed buffers
//!   before each replay, outside the graph;
//! - the dropout step and the optimizer's `lr_t` / Adam step: a step clock
//!   on the device ([`crate::cuda::StepClock`]); the host fills the
//!   epoch's learning-rate rows (from [`crate::ops::optim::Optimizer::scalars`],
//!   so the replayed step uses the uncaptured step's bits) and sets the
//!   clock at the start of each epoch, and the graph's last node advances
//!   it;
//! - the loss and metrics: written into a fixed step row, which that last
//!   node copies into the epoch's results at the clock's row; they are read
//!   back in bulk as before (when the progress bar redraws and at the end
//!   of the epoch), never per step.
//!
//! Uncaptured, as before: the first full-batch step of each epoch (it
//! allocates the ops' scratch and writes the optimizer's descriptor table,
//! which a capture may not do; the graph is recorded again by the second,
//! once per epoch, so that a callback that re-compiled or rebuilt the model
//! between epochs never leaves a graph on freed buffers), the last partial
//! batch of an epoch (another shape), and evaluation. After an uncaptured
//! step the host sets the clock again before the next replay. A graph whose
//! scratch buffers moved within an epoch is recorded again.

use super::{Compiled, Head};
use crate::backend::Backend;
use crate::error::Result;
use crate::nn::Mode;
use crate::nn::Sequential;

/// The state of the captured path through one `fit`.
pub(crate) struct CapturedStep<B: Backend> {
    clock: B::StepClock,
    /// The step's loss and metrics (one row of the epoch's results).
    step_row: B::Scalars,
    graph: Option<B::StepGraph>,
    /// The epoch's first full-batch step ran uncaptured (scratch and
    /// optimizer table in place).
    warmed: bool,
    /// The device clock holds the host's step and row (false after an
    /// uncaptured step, which does not advance it).
    synced: bool,
}

impl<B: Backend> CapturedStep<B> {
    /// For epochs of `steps` steps and result rows of `width` values.
    pub fn new(backend: &B, steps: usize, width: usize) -> Result<Self> {
        Ok(CapturedStep {
            clock: backend.step_clock_new(steps)?,
            step_row: backend.scalars_new(width)?,
            graph: None,
            warmed: false,
            synced: false,
        })
    }

    /// Records that an uncaptured step ran (the clock is behind).
    pub fn ran_uncaptured(&mut self) {
        self.synced = false;
    }
}

impl<B: Backend> Sequential<B> {
    /// Sets the epoch's learning-rate rows (steps `iterations..` of the
    /// optimizer) and the clock (the model's step, row 0), and drops the
    /// graph: the epoch's first full batch runs uncaptured and the second
    /// records the step again, so whatever the callbacks did between
    /// epochs (re-compiling, rebuilding, loading a checkpoint: buffers the
    /// old graph would still point to) is picked up.
    pub(crate) fn captured_epoch_begin(
        &mut self,
        cap: &mut CapturedStep<B>,
        steps: usize,
    ) -> Result<()> {
        cap.graph = None;
        cap.warmed = false;
        let c = self.compiled.as_ref().expect("checked by fit");
        let it0 = self.backend.opt_state_iterations(&c.state);
        let rows: Vec<[f32; 2]> = (0..steps as u64)
            .map(|r| {
                let s = c.optimizer.scalars(it0 + r);
                [s.lr_t, s.adam_step]
            })
            .collect();
        self.backend.step_clock_set_lr_rows(&mut cap.clock, &rows)?;
        self.backend.step_clock_set(&mut cap.clock, self.step, 0)?;
        cap.synced = true;
        Ok(())
    }

    /// Runs full-batch step `row` of the epoch (its batch already uploaded
    /// into workspace `wi`) through the graph, recording it first when
    /// there is none (or a stale one), and returns true; returns false,
    /// having run nothing, when the step must run uncaptured (the first
    /// full-batch step of the epoch).
    pub(crate) fn captured_step(
        &mut self,
        cap: &mut CapturedStep<B>,
        wi: usize,
        row: usize,
        mode: Mode,
        results: &mut B::Scalars,
    ) -> Result<bool> {
        if !cap.warmed {
            cap.warmed = true;
            return Ok(false);
        }
        if !cap.synced {
            self.backend
                .step_clock_set(&mut cap.clock, self.step, row as u64)?;
            cap.synced = true;
        }
        if !cap
            .graph
            .as_ref()
            .is_some_and(|g| self.backend.step_graph_current(g))
        {
            cap.graph = None;
            self.backend.step_capture_begin()?;
            let recorded = self.record_step(cap, wi, mode, results);
            // End the capture whatever happened, so the stream is usable.
            let ended = self.backend.step_capture_end();
            recorded?;
            cap.graph = Some(ended?);
        }
        let g = cap.graph.as_ref().expect("recorded above");
        self.backend.step_replay(g)?;
        let c = self.compiled.as_mut().expect("checked by fit");
        let it = self.backend.opt_state_iterations(&c.state);
        self.backend.opt_state_set_iterations(&mut c.state, it + 1);
        Ok(true)
    }

    /// The ops of one step, clocked (recorded, not run, by the caller's
    /// capture).
    fn record_step(
        &mut self,
        cap: &mut CapturedStep<B>,
        wi: usize,
        mode: Mode,
        results: &mut B::Scalars,
    ) -> Result<()> {
        debug_assert!(mode.logits_out == (self.head() != Head::None));
        self.run_forward_clocked(wi, mode, &cap.clock)?;
        self.loss_and_metrics(wi, true, &mut cap.step_row, 0)?;
        self.run_backward(wi, mode)?;
        let mut c: Compiled<B> = self.compiled.take().expect("checked by fit");
        let r = {
            let backend = &self.backend;
            let (mut ps, gs) = Self::trainable_mut(&mut self.layers);
            backend.optimizer_step_clocked(&c.optimizer, &mut c.state, &cap.clock, &mut ps, &gs)
        };
        self.compiled = Some(c);
        r?;
        self.backend
            .step_clock_tick(&mut cap.clock, &cap.step_row, results)
    }
}
