//! Timing of keras-cnn's four convolutions at batch 32 on the CPU backend,
//! each in its three passes (forward with bias and relu, backward-data,
//! backward-filter): every pass once per round, rounds repeated, median
//! and best printed in milliseconds and GFLOP/s. Build it at two commits
//! and run the binaries alternately for an A/B on a loaded machine
//! (`docs/perf-log.md`); `benches/cpu_quiet_pairs.sh` runs it beside
//! PyTorch's `conv` rows, whose ids (`keras-cnn.conv1.b32.fwd`) it prints
//! for the algorithm `CpuConvAlgo::select` (`select_filter`) picks. Every algorithm that runs
//! the layer here is timed in the same rounds too, under the id with its
//! name appended (`keras-cnn.conv2.b32.fwd.im2col_gemm`).
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example cpu_conv_ab [ROUNDS [BATCH [LAYER]]]
//!
//! `LAYER` (`conv1` .. `conv4`) times that layer alone, for `perf stat`.
//!
//!     cpu_conv_ab serve [BATCH]
//!
//! answers lines `LAYER PASS ROUNDS` on standard input (`conv2 fwd 5`) with
//! that many times in milliseconds of the pass the algorithm selection
//! picks, on one line: `benches/cpu_close_pairs.py` alternates it with a
//! PyTorch process serving the same requests, so that both sides of a
//! pair run within a second of each other.

use std::time::Instant;

use kestrel::ops::activation::Activation;
use kestrel::ops::conv::cpu::CpuConvAlgo;
use kestrel::ops::conv::{Conv2d, Padding, cpu as conv};

mod common;
use common::{data, median, ms_line, serve_lines};

fn main() {
    // On a worker of rayon's pool, as `kestrel train` runs its loop: each
    // pass's parallel loop then starts from inside the pool instead of
    // waking it from outside (`kestrel::backend::cpu::on_pool`).
    kestrel::backend::cpu::on_pool(run)
}

/// keras-cnn's convolutions (benches/common/mod.rs): (name, C, H = W, K,
/// padding).
const LAYERS: [(&str, usize, usize, usize, Padding); 4] = [
    ("conv1", 3, 32, 32, Padding::Same),
    ("conv2", 32, 32, 32, Padding::Valid),
    ("conv3", 32, 15, 64, Padding::Same),
    ("conv4", 64, 15, 64, Padding::Valid),
];

/// One layer's operands.
struct Layer {
    p: Conv2d,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    dy: Vec<f32>,
    y: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
}

impl Layer {
    fn new(n: usize, c: usize, hw: usize, k: usize, pad: Padding) -> Layer {
        let p = Conv2d::new([n, c, hw, hw], k, [3, 3], [1, 1], pad).expect("valid layer");
        Layer {
            x: data(1, p.x_len()),
            w: data(2, p.w_len()),
            bias: data(3, p.k),
            dy: data(4, p.y_len()),
            y: vec![0.0; p.y_len()],
            dx: vec![0.0; p.x_len()],
            dw: vec![0.0; p.w_len()],
            p,
        }
    }

    /// Runs pass 0 (forward with bias and relu), 1 (data gradient) or 2
    /// (filter gradient) with `algo`; seconds.
    fn pass(&mut self, pass: usize, algo: CpuConvAlgo) -> f64 {
        let t0 = Instant::now();
        let p = &self.p;
        match pass {
            0 => conv::forward_with(
                algo,
                p,
                &self.x,
                &self.w,
                Some(&self.bias),
                Activation::RELU,
                &mut self.y,
            ),
            1 => conv::backward_data_with(algo, p, &self.dy, &self.w, &mut self.dx),
            _ => conv::backward_filter_with(algo, p, &self.x, &self.dy, &mut self.dw),
        }
        .unwrap();
        t0.elapsed().as_secs_f64()
    }
}

const PASSES: [&str; 3] = ["fwd", "bwd_data", "bwd_filter"];

/// The algorithm the library's default picks for `pass` (0 forward, 1
/// data gradient, 2 filter gradient).
fn picked(p: &Conv2d, pass: usize) -> CpuConvAlgo {
    if pass == 2 {
        CpuConvAlgo::select_filter(p)
    } else {
        CpuConvAlgo::select(p, pass == 1)
    }
}

/// The `serve` mode (module docs).
fn serve(n: usize) {
    let mut layers: Vec<(&str, Layer)> = LAYERS
        .iter()
        .map(|&(name, c, hw, k, pad)| (name, Layer::new(n, c, hw, k, pad)))
        .collect();
    serve_lines(|words, line| {
        let [name, pass_name, rounds] = words[..] else {
            return format!("error: expected LAYER PASS ROUNDS, got {line:?}");
        };
        let layer = layers.iter_mut().find(|(l, _)| *l == name);
        let pass = PASSES.iter().position(|&q| q == pass_name);
        match (layer, pass, rounds.parse::<usize>()) {
            (Some((_, l)), Some(pass), Ok(rounds)) => {
                let algo = picked(&l.p, pass);
                ms_line((0..rounds).map(|_| l.pass(pass, algo) * 1e3))
            }
            _ => format!("error: unknown request {line:?}"),
        }
    });
}

fn run() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("serve") {
        args.next();
        return serve(args.next().and_then(|s| s.parse().ok()).unwrap_or(32));
    }
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(7);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(32);
    let only = args.next();
    println!(
        "threads: rayon {}, load average {}",
        rayon::current_num_threads(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mut total = 0.0;
    for (name, c, hw, k, pad) in LAYERS {
        if only.as_deref().is_some_and(|l| l != name) {
            continue;
        }
        let mut l = Layer::new(n, c, hw, k, pad);
        let p = l.p;
        // (pass, algorithm) pairs: every algorithm that runs the pass here.
        let runs: Vec<(usize, CpuConvAlgo)> = (0..3)
            .flat_map(|pass| CpuConvAlgo::ALL.into_iter().map(move |a| (pass, a)))
            .filter(|&(pass, a)| a.runs(&p, pass == 1))
            .collect();
        let mut times = vec![Vec::new(); runs.len()];
        for round in 0..=rounds {
            for (&(pass, algo), t) in runs.iter().zip(times.iter_mut()) {
                let secs = l.pass(pass, algo);
                // Round 0 warms up.
                if round > 0 {
                    t.push(secs);
                }
            }
        }
        let line = |id: &str, t: &mut Vec<f64>| {
            let med = median(t);
            println!(
                "{id:<40} {:9.3} ms {:6.1} GFLOP/s | best {:9.3} ms",
                med * 1e3,
                p.flops() / med / 1e9,
                t[0] * 1e3
            );
            med
        };
        for (pass, pname) in PASSES.iter().enumerate() {
            let picked = picked(&p, pass);
            let id = format!("keras-cnn.{name}.b{n}.{pname}");
            for (&(ps, algo), t) in runs.iter().zip(times.iter_mut()) {
                if ps == pass && algo == picked {
                    total += line(&id, t);
                }
            }
            for (&(ps, algo), t) in runs.iter().zip(times.iter_mut()) {
                if ps == pass {
                    line(&format!("  {id}.{}", algo.name()), t);
                }
            }
        }
    }
    println!("sum of medians {:.3} ms", total * 1e3);
}
