//! The `kestrel` command line: argument parsing (clap) and the commands.
//!
//! `main.rs` only calls [`main`]; everything here is testable in-process
//! through [`run()`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};

use crate::backend::DeviceChoice;
use crate::error::Result;
use crate::run::config::LoadedConfig;
use crate::run::{self, Ending, TrainOptions};

/// kestrel: train the seed networks on a CUDA device or the CPU.
#[derive(Debug, Parser)]
#[command(name = "kestrel", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// `--device`: `auto`, `cpu`, `cuda` (device 0) or `cuda:N`.
fn parse_device(s: &str) -> std::result::Result<DeviceChoice, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train the run a config describes; outputs go to --out (default runs/CONFIG-NAME/).
    Train {
        /// The run config (configs/*.toml).
        config: PathBuf,
        /// Backend: auto (CUDA device 0 when one is found, else the CPU),
        /// cpu, cuda, or cuda:N.
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: DeviceChoice,
        /// Where the data sets are (or are downloaded to).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Epochs (a single-stage run), or a cap on every stage's epochs.
        #[arg(long)]
        epochs: Option<usize>,
        /// Replaces the config's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Continue the run in the output directory from its checkpoint (the
        /// flags it was started with apply again); with --epochs above a
        /// finished single-stage run's epochs, train it further.
        #[arg(long, conflicts_with = "overwrite")]
        resume: bool,
        /// Replace the run already in the output directory (without it or
        /// --resume, a directory holding a run is refused).
        #[arg(long)]
        overwrite: bool,
        /// Stop after N epochs of this invocation, with a checkpoint (as Ctrl-C
        /// does); continue later with --resume.
        #[arg(long, value_name = "N")]
        stop_after: Option<usize>,
        /// One line per epoch instead of the live progress bar.
        #[arg(long)]
        quiet: bool,
        /// On CUDA, launch every op of every training step instead of
        /// replaying one captured CUDA graph per full batch (same results;
        /// for comparison and as a fallback). No effect on the CPU.
        #[arg(long)]
        no_cuda_graph: bool,
        /// On CUDA, upload each batch with a plain copy on the compute
        /// stream (gathered into pageable memory) instead of staging it
        /// through page-locked buffers and a copy stream (same results; for
        /// comparison and as a fallback). No effect on the CPU.
        #[arg(long)]
        no_staged_upload: bool,
        /// Print result.json's contents on stdout at the end instead of the
        /// one line of test metrics.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate saved weights on the config's test set.
    Evaluate {
        /// The run config.
        config: PathBuf,
        /// A weights file (weights.safetensors or checkpoint.safetensors).
        #[arg(long)]
        weights: PathBuf,
        /// Where the data sets are.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Print the model summary and the recipe of a config.
    Summary {
        /// The run config.
        config: PathBuf,
    },
    /// List the CUDA devices.
    Devices,
}

/// The text of `kestrel devices`.
pub fn devices_text() -> Result<String> {
    if !crate::cuda::driver_present() {
        return Ok(
            "no CUDA driver found (libcuda could not be loaded): kestrel runs on the CPU\n".into(),
        );
    }
    let n = crate::cuda::device_count()?;
    let mut s = format!(
        "CUDA driver {}; {n} device{}\n",
        crate::cuda::driver_version()
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
            .unwrap_or_else(|| "unknown".into()),
        if n == 1 { "" } else { "s" }
    );
    for i in 0..n {
        match crate::cuda::CudaBackend::new(i) {
            Ok(b) => {
                let d = b.info();
                s += &format!(
                    "cuda:{i}: {} - compute capability {} - {:.1} GiB - {} SMs\n",
                    d.name,
                    d.cc_string(),
                    d.total_memory as f64 / (1u64 << 30) as f64,
                    d.multiprocessors
                );
            }
            Err(e) => s += &format!("cuda:{i}: cannot be opened: {e}\n"),
        }
    }
    Ok(s)
}

/// Runs one parsed command; `stop` is the flag the Ctrl-C handler sets.
/// Returns the process exit code.
pub fn run(cli: Cli, stop: Arc<AtomicBool>) -> Result<i32> {
    match cli.command {
        Command::Train {
            config,
            device,
            data,
            out,
            epochs,
            seed,
            resume,
            overwrite,
            stop_after,
            quiet,
            no_cuda_graph,
            no_staged_upload,
            json,
        } => {
            let cfg = LoadedConfig::load(&config)?;
            let opts = TrainOptions {
                device,
                data_dir: data,
                out_dir: out,
                epochs,
                seed,
                resume,
                overwrite,
                stop_after,
                verbose: if quiet { 2 } else { 1 },
                no_cuda_graph,
                no_staged_upload,
                stop: stop.clone(),
            };
            let outcome = run::train(&cfg, &opts)?;
            // The final metrics on stdout, for scripts; progress and the
            // human-readable final lines stay on stderr.
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&outcome.result).unwrap_or_default()
                );
            } else if let Some(test) = &outcome.test {
                println!("{}", run::format_logs(test));
            }
            Ok(match outcome.ending {
                Ending::Finished => 0,
                // 130: stopped by SIGINT, as shells report it.
                Ending::Interrupted if stop.load(Ordering::SeqCst) => 130,
                Ending::Interrupted => 0,
            })
        }
        Command::Evaluate {
            config,
            weights,
            data,
        } => {
            let cfg = LoadedConfig::load(&config)?;
            let logs = run::evaluate(&cfg, &weights, data.as_deref())?;
            println!("{}", run::format_logs(&logs));
            Ok(0)
        }
        Command::Summary { config } => {
            let cfg = LoadedConfig::load(&config)?;
            print!("{}", run::summary_text(&cfg)?);
            Ok(0)
        }
        Command::Devices => {
            print!("{}", devices_text()?);
            Ok(0)
        }
    }
}

/// The binary's entry point: parses the arguments, installs the Ctrl-C
/// handler (first press: stop after the current epoch with a checkpoint;
/// second press: quit at once), runs, and returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handler = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nkestrel: second Ctrl-C, quitting without saving");
            std::process::exit(130);
        }
        eprintln!(
            "\nkestrel: Ctrl-C: stopping at the end of this epoch, after saving a checkpoint (Ctrl-C again to quit at once)"
        );
    });
    if let Err(e) = handler {
        eprintln!("kestrel: warning: cannot install the Ctrl-C handler: {e}");
    }
    match run(cli, stop) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
