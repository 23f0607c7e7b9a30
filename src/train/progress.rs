//! A Keras-like progress bar on stderr: a live bar with the ETA on a
//! terminal, one line per epoch otherwise, and a final line with the time
//! per epoch.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::Logs;

/// Seconds between redraws of the live bar.
const REDRAW: f64 = 0.1;

pub(crate) struct Progress {
    verbose: u8,
    tty: bool,
    epochs: usize,
    steps: usize,
    start: Instant,
    last_draw: Instant,
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
        }
    }

    fn bar(&self, step: usize) -> String {
        let width = 30;
        let done = step * width / self.steps.max(1);
        let mut b = String::from("[");
        for i in 0..width {
            b.push(if i + 1 < done || (i + 1 == done && step == self.steps) {
                '='
            } else if i + 1 == done {
                '>'
            } else {
                '.'
            });
        }
        b.push(']');
        let w = self.steps.to_string().len();
        format!("{step:>w$}/{} {b}", self.steps)
    }

    pub fn epoch_begin(&mut self, epoch: usize) {
        self.start = Instant::now();
        self.last_draw = self.start;
        if self.verbose >= 1 {
            eprintln!("Epoch {}/{}", epoch + 1, self.epochs);
        }
    }

    /// Whether a redraw is due (the caller then builds the logs).
    pub fn wants_update(&self) -> bool {
        self.verbose == 1 && self.tty && self.last_draw.elapsed().as_secs_f64() >= REDRAW
    }

    pub fn step(&mut self, step: usize, logs: &Logs) {
        self.last_draw = Instant::now();
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = elapsed / step as f64 * (self.steps - step) as f64;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} - ETA: {}{}\x1b[K",
            self.bar(step),
            fmt_time(eta),
            fmt_logs(logs)
        );
        let _ = err.flush();
    }

    pub fn epoch_end(&mut self, steps: usize, logs: &Logs) {
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
        let line = format!(
            "{} - {} {per}{}",
            self.bar(steps),
            fmt_time(elapsed),
            fmt_logs(logs)
        );
        if self.verbose == 1 && self.tty {
            eprintln!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    pub fn abort(&mut self) {
        if self.verbose == 1 && self.tty {
            eprintln!();
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
