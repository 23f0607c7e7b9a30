//! A Keras-like progress bar on stderr, drawn by `indicatif`: a live bar
//! (`  12/469 [=>............] - ETA: 3s - loss: 0.5123 - accuracy: 0.81`)
//! on a terminal, one line per epoch otherwise, and a final line with the
//! time per epoch.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Logs;

/// Seconds between updates of the live bar (the logs are only built, and on
/// a GPU read back, this often).
const REDRAW: f64 = 0.1;
/// The bar's width in characters, as Keras's.
const WIDTH: usize = 30;

pub(crate) struct Progress {
    verbose: u8,
    tty: bool,
    epochs: usize,
    steps: usize,
    start: Instant,
    last_draw: Instant,
    bar: Option<ProgressBar>,
    /// The metrics the bar shows (its `{logs}` key), so that one position
    /// update redraws the whole line once.
    logs: Arc<Mutex<String>>,
}

fn fmt_logs(logs: &Logs) -> String {
    logs.entries
        .iter()
        .map(|(k, v)| format!(" - {k}: {v:.4}"))
        .collect()
}

fn fmt_time(secs: f64) -> String {
    if secs >= 3600.0 {
        format!(
            "{}:{:02}:{:02}",
            secs as u64 / 3600,
            (secs as u64 % 3600) / 60,
            secs as u64 % 60
        )
    } else if secs >= 60.0 {
        format!("{}:{:02}", secs as u64 / 60, secs as u64 % 60)
    } else {
        format!("{}s", secs as u64)
    }
}

impl Progress {
    pub fn new(verbose: u8, epochs: usize, steps: usize) -> Self {
        let now = Instant::now();
        Progress {
            verbose,
            tty: std::io::stderr().is_terminal(),
            epochs,
            steps,
            start: now,
            last_draw: now,
            bar: None,
            logs: Arc::new(Mutex::new(String::new())),
        }
    }

    /// Whether the live bar is drawn (verbose 1 on a terminal).
    fn live(&self) -> bool {
        self.verbose == 1 && self.tty
    }

    fn new_bar(&self) -> ProgressBar {
        let w = self.steps.to_string().len();
        let template = format!("{{pos:>{w}}}/{{len}} [{{bar:{WIDTH}}}] - ETA: {{eta}}{{logs}}");
        let logs = self.logs.clone();
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=>.")
            .with_key(
                "logs",
                move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&logs.lock().map(|l| l.clone()).unwrap_or_default());
                },
            );
        let bar = ProgressBar::with_draw_target(
            Some(self.steps as u64),
            ProgressDrawTarget::stderr_with_hz(10),
        );
        bar.set_style(style);
        bar
    }

    pub fn epoch_begin(&mut self, epoch: usize) {
        self.start = Instant::now();
        self.last_draw = self.start;
        if self.verbose >= 1 {
            eprintln!("Epoch {}/{}", epoch + 1, self.epochs);
        }
        if self.live() {
            if let Ok(mut l) = self.logs.lock() {
                l.clear();
            }
            self.bar = Some(self.new_bar());
        }
    }

    /// Whether an update is due (the caller then builds the logs).
    pub fn wants_update(&self) -> bool {
        self.live() && self.last_draw.elapsed().as_secs_f64() >= REDRAW
    }

    pub fn step(&mut self, step: usize, logs: &Logs) {
        self.last_draw = Instant::now();
        if let Some(bar) = &self.bar {
            if let Ok(mut l) = self.logs.lock() {
                *l = fmt_logs(logs);
            }
            bar.set_position(step as u64);
        }
    }

    pub fn epoch_end(&mut self, steps: usize, logs: &Logs) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.verbose == 0 {
            return;
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let per_step = elapsed / steps.max(1) as f64;
        let per = if per_step >= 1.0 {
            format!("{per_step:.0}s/step")
        } else if per_step >= 1e-3 {
            format!("{:.0}ms/step", per_step * 1e3)
        } else {
            format!("{:.0}us/step", per_step * 1e6)
        };
        let w = self.steps.to_string().len();
        eprintln!(
            "{steps:>w$}/{} [{}] - {} {per}{}",
            self.steps,
            "=".repeat(WIDTH),
            fmt_time(elapsed),
            fmt_logs(logs)
        );
    }

    pub fn abort(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    pub fn finish(&self, epochs: usize, total: Duration) {
        if self.verbose == 0 || epochs == 0 {
            return;
        }
        let t = total.as_secs_f64();
        eprintln!(
            "Trained {epochs} epoch{} in {t:.1}s ({:.2} s/epoch)",
            if epochs == 1 { "" } else { "s" },
            t / epochs as f64
        );
    }
}
