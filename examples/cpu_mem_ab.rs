//! Timing of the memory-bound CPU ops at keras-cnn's conv1 output size
//! (batch 32: 32 x 32 x 32 x 32 f32, 4 MiB), and of keras-cnn's max pools
//! and dropouts and the mlp's (dense) batch norms at batch 32, each beside a `memcpy` of the same bytes: every op twice per round (the
//! second call, with its buffers in cache as a training step and the
//! memcpy find theirs, is the figure; the first, "cold", is printed too),
//! rounds repeated, median and minimum printed in microseconds. Build it at two commits and run the binaries
//! alternately for an A/B on a loaded machine (`docs/perf-log.md`).
//!
//!     RAYON_NUM_THREADS=1 cargo run --release --example cpu_mem_ab [ROUNDS] [FILTER]
//!
//! FILTER keeps only the ops whose name contains it (`mlp.bn784`), to time
//! or profile (`perf record`) one op alone.

use std::hint::black_box;
use std::time::Instant;

use kestrel::ops::activation::{Activation, cpu as act};
use kestrel::ops::batchnorm::{BatchNorm, VarianceMode, cpu as bn};
use kestrel::ops::bias::{BiasShape, cpu as bias};
use kestrel::ops::conv::Padding;
use kestrel::ops::dropout::{Dropout, cpu as dropout};
use kestrel::ops::pool::{MaxPool2d, cpu as pool};

mod common;
use common::data;

fn main() {
    // On a worker of rayon's pool, as `kestrel train` runs its loop: each
    // op's parallel loop then starts from inside the pool instead of
    // waking it from outside (`kestrel::backend::cpu::on_pool`).
    kestrel::backend::cpu::on_pool(run)
}

fn run() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(21);
    let (n, c, sp) = (32, 32, 32 * 32);
    let len = n * c * sp;
    let x = data(1, len);
    let dy = data(2, len);
    let gamma = data(3, c);
    let beta = data(4, c);
    let mut y = vec![0.0f32; len];
    let (mut mean, mut inv) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (mut rm, mut rv) = (vec![0.0f32; c], vec![1.0f32; c]);
    let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    let p = BatchNorm::new(n, c, sp, true, 0.99, 1e-3, VarianceMode::Keras).unwrap();
    let bs = BiasShape::conv(n, c, sp).unwrap();
    bn::forward_training(
        &p, &x, &gamma, &beta, &mut y, &mut mean, &mut inv, &mut rm, &mut rv,
    )
    .unwrap();
    let yk = y.clone();
    let (mean_b, inv_b) = (mean.clone(), inv.clone());
    let (mut dx_b, mut db_b, mut dx_c) = (vec![0.0f32; len], vec![0.0f32; c], dy.clone());
    let src: Vec<u8> = (0..16 * len).map(|i| i as u8).collect();
    let mut dst = vec![0u8; 16 * len];
    // (name, bytes a perfect kernel moves, the op)
    type Op<'a> = Box<dyn FnMut() + 'a>;
    let mut ops: Vec<(&str, usize, Op)> = Vec::new();
    ops.push((
        "bn.fwd",
        8 * len,
        Box::new(|| {
            bn::forward_training(
                &p, &x, &gamma, &beta, &mut y, &mut mean, &mut inv, &mut rm, &mut rv,
            )
            .unwrap()
        }),
    ));
    ops.push((
        "bn.bwd",
        12 * len,
        Box::new(|| {
            bn::backward(
                &p, &x, &dy, &gamma, &mean_b, &inv_b, &mut dx_b, &mut dg, &mut db_b,
            )
            .unwrap()
        }),
    ));
    ops.push((
        "bias.bwd",
        4 * len,
        Box::new(|| bias::backward(&bs, &dy, &mut db).unwrap()),
    ));
    ops.push((
        "bias.add_inplace",
        8 * len,
        Box::new(|| bias::add_inplace(&bs, &mut dx_c, &gamma).unwrap()),
    ));
    // (forward, backward from the output, forward in place: the public op
    // `forward_inplace`; after its first call the buffer holds outputs,
    // negative ones staying negative under elu and zero under relu, which
    // costs the same).
    for (a, fwd, bwd, inplace) in [
        (
            Activation::RELU,
            "relu.fwd",
            "relu.bwd_from_output",
            "relu.fwd_inplace",
        ),
        (
            Activation::elu(1.0),
            "elu.fwd",
            "elu.bwd_from_output",
            "elu.fwd_inplace",
        ),
    ] {
        let (xr, yr, dyr) = (&x, &yk, &dy);
        let mut out = vec![0.0f32; len];
        let mut g = dy.clone();
        let mut z = x.clone();
        ops.push((
            fwd,
            8 * len,
            Box::new(move || act::forward(a, xr, &mut out).unwrap()),
        ));
        ops.push((
            bwd,
            12 * len,
            Box::new(move || {
                g.copy_from_slice(dyr);
                act::backward_from_output(a, yr, &mut g).unwrap()
            }),
        ));
        ops.push((
            inplace,
            8 * len,
            Box::new(move || act::forward_inplace(a, &mut z).unwrap()),
        ));
    }
    // keras-cnn's pools and dropouts at batch 32, under the ids of
    // benches/ops_cpu.rs and benches/pytorch_baseline.py (`mem` rows), with
    // the bytes those count: pool x + y + an index per output (PyTorch's
    // are 8 bytes, ours 4: counted as 8, as there), dropout x + y + mask.
    let pools = [
        ("keras-cnn.pool1.b32", 32, 30),
        ("keras-cnn.pool2.b32", 64, 13),
    ];
    let mut pool_bufs = Vec::new();
    for (id, ch, hw) in pools {
        let p = MaxPool2d::new([32, ch, hw, hw], [2, 2], [2, 2], Padding::Valid).unwrap();
        let px = data(7, 32 * ch * hw * hw);
        let ylen = 32 * ch * p.out_h * p.out_w;
        let pdy = data(8, ylen);
        pool_bufs.push((id, p, px, pdy, ylen));
    }
    // Leaked: the ops borrow them and live to the end of main.
    for (id, p, px, pdy, ylen) in pool_bufs.leak().iter() {
        let bytes = 4 * px.len() + 8 * ylen;
        let (mut py, mut arg) = (vec![0.0f32; *ylen], vec![0u32; *ylen]);
        pool::forward(p, px, &mut py, &mut arg).unwrap();
        let arg_b = arg.clone();
        let mut pdx = vec![0.0f32; px.len()];
        let fwd: &'static str = format!("{id}.fwd").leak();
        let bwd: &'static str = format!("{id}.bwd").leak();
        ops.push((
            fwd,
            bytes,
            Box::new(move || pool::forward(p, px, &mut py, &mut arg).unwrap()),
        ));
        ops.push((
            bwd,
            bytes,
            Box::new(move || pool::backward(p, pdy, &arg_b, &mut pdx).unwrap()),
        ));
    }
    let drops = [
        ("keras-cnn.drop1.b32", 32 * 15 * 15, 0.25),
        ("keras-cnn.drop2.b32", 64 * 6 * 6, 0.25),
        ("keras-cnn.drop3.b32", 512, 0.5),
    ];
    let mut drop_bufs = Vec::new();
    for (id, per, rate) in drops {
        let len = 32 * per;
        let p = Dropout::new(len, rate, 1234, 0).unwrap();
        drop_bufs.push((id, p, data(9, len), data(10, len)));
    }
    for (id, p, dx_in, ddy) in drop_bufs.leak().iter() {
        let len = dx_in.len();
        let (mut dy_out, mut mask) = (vec![0.0f32; len], vec![0u8; len]);
        dropout::forward(p, dx_in, &mut dy_out, &mut mask).unwrap();
        let mask_b = mask.clone();
        let mut ddx = vec![0.0f32; len];
        let fwd: &'static str = format!("{id}.fwd").leak();
        let bwd: &'static str = format!("{id}.bwd").leak();
        ops.push((
            fwd,
            9 * len,
            Box::new(move || dropout::forward(p, dx_in, &mut dy_out, &mut mask).unwrap()),
        ));
        ops.push((
            bwd,
            9 * len,
            Box::new(move || dropout::backward(p, ddy, &mask_b, &mut ddx).unwrap()),
        ));
        // The forward's floor on the arithmetic side: the same Philox draws
        // and mask, without x and y (its "memcpy" is of the mask's bytes).
        let mut mask_o = vec![0u8; len];
        let only: &'static str = format!("{id}.mask_only").leak();
        ops.push((
            only,
            len,
            Box::new(move || dropout::mask_only(p, &mut mask_o).unwrap()),
        ));
    }
    // The mlp's batch norms (f3: dense inputs, batch 32), under the ids
    // of benches/ops_cpu.rs, with the bytes counted as for bn above.
    let dense = [
        ("mlp.bn784.b32", 784),
        ("mlp.bn300.b32", 300),
        ("mlp.bn100.b32", 100),
    ];
    let mut dense_bufs = Vec::new();
    for (id, ch) in dense {
        let p = BatchNorm::new(32, ch, 1, true, 0.99, 1e-3, VarianceMode::Keras).unwrap();
        dense_bufs.push((id, p, data(11, 32 * ch), data(12, 32 * ch), data(13, ch)));
    }
    for (id, p, dx_in, ddy, g) in dense_bufs.leak().iter() {
        let (len, ch) = (dx_in.len(), p.c);
        let mut out = vec![0.0f32; len];
        let (mut m, mut is) = (vec![0.0f32; ch], vec![0.0f32; ch]);
        let (mut rm, mut rv) = (vec![0.0f32; ch], vec![1.0f32; ch]);
        bn::forward_training(p, dx_in, g, g, &mut out, &mut m, &mut is, &mut rm, &mut rv).unwrap();
        let (mb, ib) = (m.clone(), is.clone());
        let mut dxo = vec![0.0f32; len];
        let (mut dg, mut db) = (vec![0.0f32; ch], vec![0.0f32; ch]);
        let fwd: &'static str = format!("{id}.fwd").leak();
        let bwd: &'static str = format!("{id}.bwd").leak();
        ops.push((
            fwd,
            8 * len,
            Box::new(move || {
                bn::forward_training(p, dx_in, g, g, &mut out, &mut m, &mut is, &mut rm, &mut rv)
                    .unwrap()
            }),
        ));
        ops.push((
            bwd,
            12 * len,
            Box::new(move || {
                bn::backward(p, dx_in, ddy, g, &mb, &ib, &mut dxo, &mut dg, &mut db).unwrap()
            }),
        ));
    }
    if let Some(only) = std::env::args().nth(2) {
        ops.retain(|(name, _, _)| name.contains(&only));
        if ops.is_empty() {
            eprintln!("no op's name contains {only:?}");
            std::process::exit(2);
        }
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); ops.len()];
    let mut cold: Vec<Vec<f64>> = vec![Vec::new(); ops.len()];
    let mut copies: Vec<Vec<f64>> = vec![Vec::new(); ops.len()];
    for _ in 0..rounds {
        for (k, (_, bytes, op)) in ops.iter_mut().enumerate() {
            // Each op runs twice in a row: the first call finds its
            // buffers evicted by the other ops of the round ("cold"), the
            // second finds them where a training step leaves them and
            // where the memcpy beside it (always the same buffers) and
            // PyTorch's timer (repeated calls) find theirs: the figure
            // compared.
            let t = Instant::now();
            op();
            cold[k].push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            op();
            times[k].push(t.elapsed().as_secs_f64());
            let half = *bytes / 2;
            let t = Instant::now();
            dst[..half].copy_from_slice(black_box(&src[..half]));
            copies[k].push(t.elapsed().as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2] * 1e6, v[0] * 1e6)
    };
    println!("op median_us min_us memcpy_median_us ratio_median cold_median_us");
    for (k, (name, _, _)) in ops.iter().enumerate() {
        let (m, lo) = med(&mut times[k]);
        let (cm, _) = med(&mut copies[k]);
        let (cold_m, _) = med(&mut cold[k]);
        println!("{name} {m:.1} {lo:.1} {cm:.1} {:.2} {cold_m:.1}", m / cm);
    }
    black_box(&dst);
}
