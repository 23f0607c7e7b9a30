//! Helpers shared by the CPU timing examples (`cpu_gemm_ab`, `cpu_conv_ab`,
//! `cpu_mem_ab`): seeded data (the benches'), the median, and the request
//! loop of their `serve` modes.
//!
//! Each example includes this with `mod common;`; not every one uses every
//! helper.
#![allow(dead_code)]

// The benches' seeded data (one generator, so the examples time the same
// operands as the criterion benches).
#[path = "../../benches/common/mod.rs"]
mod bench_common;
pub use bench_common::data;

/// The median of `v` (sorted in place, so `v[0]` is then the minimum).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `serve` modes' loop: each line of standard input, split into
/// words, goes to `answer`, whose reply is written as one line and flushed
/// (`benches/cpu_close_pairs.py` waits for it before its next request).
pub fn serve_lines(mut answer: impl FnMut(&[&str], &str) -> String) {
    use std::io::{BufRead, Write};
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = answer(&words, &line);
        let mut out = stdout.lock();
        writeln!(out, "{reply}")
            .and_then(|()| out.flush())
            .expect("stdout");
    }
}

/// Milliseconds, as the serve modes print them: space-separated.
pub fn ms_line(times_ms: impl Iterator<Item = f64>) -> String {
    times_ms
        .map(|t| format!("{t:.6}"))
        .collect::<Vec<_>>()
        .join(" ")
}
