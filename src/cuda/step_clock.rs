//! The step clock of a captured training step (`kernels/step_clock.cu`):
//! the values that change from one training step to the next, kept in
//! device memory so that a CUDA graph recorded once reads fresh ones on
//! every replay (a graph replays its launches with the parameter bytes
//! they had at capture; a step count passed by value would be replayed
//! stale).
//!
//! - `clock[0]`, the training step: the dropout Philox offsets of the
//!   `*_clocked` dropout forward (`offset = layer | step << 16`, as
//!   uncaptured);
//! - `clock[1]`, the step's row in the epoch: which row of the
//!   learning-rate table the `*_clocked` optimizer update takes (`lr_t` and
//!   Adam's bias-corrected step, formed on the host by
//!   [`crate::ops::optim::Optimizer::scalars`] for each step of the epoch,
//!   so they are the uncaptured step's bits), and which row of the epoch's
//!   results the step's loss and metrics are copied to.
//!
//! The host sets both counters and the table once per epoch
//! ([`StepClock::set`], [`StepClock::set_lr_rows`], outside any capture);
//! the captured step
//! ends with [`StepClock::tick`], which copies the step's results and
//! advances both counters on the device.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{CudaBackend, STEP_CLOCK};
use crate::error::{Error, Result};

/// Device-resident per-step counters and the epoch's learning-rate rows
/// (see the module docs).
#[derive(Debug)]
pub struct StepClock {
    /// `[step, row]`.
    clock: CudaSlice<u64>,
    /// `[rows][2]`: (`lr_t`, `adam_step`) per row.
    lr_rows: CudaSlice<f32>,
    rows: usize,
}

impl StepClock {
    /// A clock for epochs of up to `rows` steps (at least 1), at step 0,
    /// row 0. Loads the clock's module, so that a capture that follows
    /// loads nothing.
    pub fn new(gpu: &CudaBackend, rows: usize) -> Result<Self> {
        let rows = rows.max(1);
        gpu.function(&STEP_CLOCK, "step_clock_tick")?;
        Ok(StepClock {
            clock: gpu.zeros(2)?,
            lr_rows: gpu.zeros(2 * rows)?,
            rows,
        })
    }

    /// Rows of the learning-rate table (and of the results it copies to).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Sets the counters to (`step`, `row`): a 16-byte copy from pageable
    /// memory, so outside a capture (at the start of an epoch, and after an
    /// uncaptured step, which does not tick the clock).
    pub fn set(&mut self, gpu: &CudaBackend, step: u64, row: u64) -> Result<()> {
        gpu.stream()
            .memcpy_htod(&[step, row], &mut self.clock)
            .map_err(|e| gpu.error("cuMemcpyHtoD (step clock)", e))
    }

    /// Sets the learning-rate table to `lr_rows` (`(lr_t, adam_step)` of
    /// each step of the epoch from row 0, at most [`StepClock::rows`]): a
    /// copy from pageable memory, so outside a capture, once per epoch.
    pub fn set_lr_rows(&mut self, gpu: &CudaBackend, lr_rows: &[[f32; 2]]) -> Result<()> {
        if lr_rows.len() > self.rows {
            return Err(Error::invalid(
                "step_clock.set_lr_rows",
                "lr_rows",
                format!(
                    "{} rows, the clock was made for at most {}",
                    lr_rows.len(),
                    self.rows
                ),
            ));
        }
        if lr_rows.is_empty() {
            return Ok(());
        }
        let flat: Vec<f32> = lr_rows.iter().flatten().copied().collect();
        gpu.stream()
            .memcpy_htod(&flat, &mut self.lr_rows.slice_mut(..flat.len()))
            .map_err(|e| gpu.error("cuMemcpyHtoD (step clock lr rows)", e))
    }

    /// The counters `[step, row]`, for the `*_clocked` kernels.
    pub fn counters(&self) -> &CudaSlice<u64> {
        &self.clock
    }

    /// The learning-rate rows, for the clocked optimizer update.
    pub fn lr_rows(&self) -> &CudaSlice<f32> {
        &self.lr_rows
    }

    /// The counters on the host (synchronizes; for tests and checks).
    pub fn read(&self, gpu: &CudaBackend) -> Result<[u64; 2]> {
        let v = gpu.download(&self.clock)?;
        Ok([v[0], v[1]])
    }

    /// Copies `step_row` (`width` results) to row `clock[1]` of `results`
    /// (`[rows][width]`, rows beyond it are not written), then advances
    /// the step and the row by one; all on the device.
    pub fn tick(
        &mut self,
        gpu: &CudaBackend,
        step_row: &CudaView<'_, f64>,
        results: &mut CudaViewMut<'_, f64>,
    ) -> Result<()> {
        let width = step_row.len();
        if width == 0 || !results.len().is_multiple_of(width) {
            return Err(Error::invalid(
                "step_clock.tick",
                "results",
                format!(
                    "{} results is not a whole number of rows of {width} (the step row's width, \
                     at least 1)",
                    results.len()
                ),
            ));
        }
        let (w, rows) = (width as u32, (results.len() / width) as u64);
        let f = gpu.function(&STEP_CLOCK, "step_clock_tick")?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: clock holds 2 counters; step_row `width` values; the
        // kernel writes row clock[1] of `results` only when it is below
        // `rows` (the view holds rows * width values).
        let r = unsafe {
            gpu.stream()
                .launch_builder(&f)
                .arg(&mut self.clock)
                .arg(step_row)
                .arg(results)
                .arg(&w)
                .arg(&rows)
                .launch(cfg)
        };
        gpu.launched("step_clock_tick", r)
    }
}
