//! The staged batch upload of `GpuBackend` (`kestrel::cuda::StagedUploader`:
//! page-locked slots, a copy stream, events) against the host data and
//! against the plain upload.
//!
//! On the emulated device a copy from page-locked memory is deferred until
//! its stream is synchronized with (`docs/emulator.md`), so a missing event
//! wait or a slot rewritten too early shows here as wrong data, as it would
//! on a GPU when the DMA runs late.
//!
//! Every test needs a CUDA device and is ignored otherwise:
//! `cargo test --release --test gpu_upload -- --include-ignored`.

mod common;

use common::{POISON, Rng, assert_err_mentions, data};
use kestrel::backend::{Backend, GpuBackend, GpuBuf};
use kestrel::nn::{Act, Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential};
use kestrel::ops::optim::Optimizer;
use kestrel::train::{FitOptions, Loss, Metric, Targets, Validation};

fn backend() -> GpuBackend {
    GpuBackend::new(0).unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e}"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// What one upload was meant to write.
enum Want {
    F32(GpuBuf<f32>, Vec<f32>),
    U32(GpuBuf<u32>, Vec<u32>),
}

/// Many uploads back to back, f32 and u32 rows and whole slices, of sizes
/// that grow (every slot of the ring is reallocated several times while
/// earlier uploads are still in flight) and shrink, each into its own
/// poisoned destination, from one host source rewritten after every call;
/// no host synchronization until the end, when every destination must hold
/// exactly what its call was given.
#[test]
#[ignore = "needs a CUDA device"]
fn back_to_back_uploads_land_intact() {
    let be = backend();
    assert!(be.staged_upload(), "the staged path is the default");
    let mut rng = Rng::new(11);
    let mut src_f32 = data(1, 300 * 40, -1.0, 1.0);
    let mut src_u32: Vec<u32> = (0..300 * 3).map(|i| i as u32 * 7).collect();
    let mut wants = Vec::new();
    let mut staged = 0u64;
    for k in 0..72 {
        // Row counts that mostly grow, with small ones in between (and an
        // empty batch now and then).
        let rows_n = match k % 6 {
            0 => 0,
            1 => 1 + k,
            2 => 3,
            3 => 4 * k + 2,
            4 => 1,
            _ => 260 + k / 3,
        };
        let rows: Vec<usize> = (0..rows_n).map(|_| rng.below(300)).collect();
        match k % 3 {
            0 => {
                let row_len = 40;
                let mut dst = be.upload_f32(&vec![POISON; rows_n * row_len]).unwrap();
                be.upload_rows_f32(&src_f32, row_len, &rows, &mut dst)
                    .unwrap();
                let want: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| src_f32[r * row_len..(r + 1) * row_len].to_vec())
                    .collect();
                wants.push(Want::F32(dst, want));
            }
            1 => {
                let row_len = 3;
                let mut dst = be.alloc_u32(rows_n * row_len).unwrap();
                be.upload_rows_u32(&src_u32, row_len, &rows, &mut dst)
                    .unwrap();
                let want: Vec<u32> = rows
                    .iter()
                    .flat_map(|&r| src_u32[r * row_len..(r + 1) * row_len].to_vec())
                    .collect();
                wants.push(Want::U32(dst, want));
            }
            _ => {
                let n = rows_n * 17;
                let host = data(100 + k as u64, n, -5.0, 5.0);
                let mut dst = be.upload_f32(&vec![POISON; n]).unwrap();
                be.upload_into_f32(&host, &mut dst).unwrap();
                wants.push(Want::F32(dst, host));
            }
        }
        if rows_n > 0 {
            staged += 1;
        }
        // The caller may reuse its memory at once: the gather has copied it.
        for v in src_f32.iter_mut() {
            *v = -*v + 0.5;
        }
        for v in src_u32.iter_mut() {
            *v = v.wrapping_mul(3).wrapping_add(1);
        }
    }
    assert_eq!(be.staged_uploads(), staged, "every non-empty upload staged");
    for (k, w) in wants.iter().enumerate() {
        match w {
            Want::F32(dst, want) => {
                assert_eq!(
                    bits(&be.download_f32(dst).unwrap()),
                    bits(want),
                    "upload {k} (f32, {} elements)",
                    want.len()
                );
            }
            Want::U32(dst, want) => {
                assert_eq!(
                    &be.download_u32(dst).unwrap(),
                    want,
                    "upload {k} (u32, {} elements)",
                    want.len()
                );
            }
        }
    }
}

/// A destination written by an upload and then read by work already on the
/// compute stream: the upload lands after that work (stream order), as a
/// plain copy would. Here: copy the buffer, upload new data into it, copy
/// again; the first copy holds the old data, the second the new.
#[test]
#[ignore = "needs a CUDA device"]
fn uploads_keep_the_compute_stream_order() {
    let be = backend();
    let n = 4099;
    let first = data(5, n, -1.0, 1.0);
    let second = data(6, n, -1.0, 1.0);
    let mut buf = be.alloc_f32(n).unwrap();
    let (mut before, mut after) = (be.alloc_f32(n).unwrap(), be.alloc_f32(n).unwrap());
    be.upload_into_f32(&first, &mut buf).unwrap();
    be.copy_f32(&buf, &mut before).unwrap();
    be.upload_into_f32(&second, &mut buf).unwrap();
    be.copy_f32(&buf, &mut after).unwrap();
    assert_eq!(bits(&be.download_f32(&before).unwrap()), bits(&first));
    assert_eq!(bits(&be.download_f32(&after).unwrap()), bits(&second));
}

/// Bad rows are refused, naming the row, with nothing uploaded; an upload
/// while the compute stream captures a graph is refused, naming the
/// capture, and leaves the capture usable.
#[test]
#[ignore = "needs a CUDA device"]
fn errors_name_what_is_wrong() {
    let be = backend();
    let src = data(1, 30, -1.0, 1.0);
    let mut dst = be.upload_f32(&[POISON; 6]).unwrap();
    assert_err_mentions(
        be.upload_rows_f32(&src, 3, &[0, 10], &mut dst),
        "upload_rows",
        &["row 10", "10 rows"],
    );
    assert_err_mentions(
        be.upload_into_f32(&src[..5], &mut dst),
        "upload",
        &["dst", "6", "5"],
    );
    assert_eq!(bits(&be.download_f32(&dst).unwrap()), bits(&[POISON; 6]));

    let gpu = be.device().clone();
    gpu.begin_capture().unwrap();
    let r = be.upload_rows_f32(&src, 3, &[0, 1], &mut dst);
    let ended = gpu.end_capture();
    assert_err_mentions(r, "upload_rows", &["capturing", "CUDA graph"]);
    assert!(
        ended.is_ok(),
        "the refused upload invalidated the capture: {ended:?}"
    );
    // And after the capture the same upload goes through.
    be.upload_rows_f32(&src, 3, &[0, 1], &mut dst).unwrap();
    assert_eq!(bits(&be.download_f32(&dst).unwrap()), bits(&src[..6]));
}

const SAMPLES: usize = 46;
const BATCH: usize = 8;
const CLASSES: usize = 5;
const INPUT: [usize; 3] = [2, 9, 9];

struct Run {
    weights: Vec<Vec<f32>>,
    losses: Vec<Vec<f64>>,
    steps: u64,
    staged_uploads: u64,
    replays: u64,
}

/// Two epochs of a small convolutional model (five steps each, the last
/// partial, a validation split), with or without the staged upload; the
/// captured step (the default) replays between the uploads.
fn train(staged: bool, sparse: bool) -> Run {
    let be = backend();
    be.set_staged_upload(staged);
    let mut m = Sequential::new(be, 23);
    m.add(Conv2D::new(4, 3).same().activation(Act::Relu))
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.3))
        .add(Flatten)
        .add(Dense::new(12).activation(Act::Relu))
        .add(Dense::new(CLASSES).activation(Act::Softmax));
    m.build(&INPUT).unwrap();
    let loss = if sparse {
        Loss::SparseCategoricalCrossentropy
    } else {
        Loss::CategoricalCrossentropy
    };
    let opt = Optimizer::adam(0.01).unwrap();
    m.compile(opt, loss, &[Metric::Accuracy]).unwrap();
    let x = data(3, SAMPLES * INPUT.iter().product::<usize>(), -1.0, 1.0);
    let labels: Vec<u32> = (0..SAMPLES).map(|i| (i * 7 % CLASSES) as u32).collect();
    let one_hot: Vec<f32> = labels
        .iter()
        .flat_map(|&l| (0..CLASSES).map(move |c| if c == l as usize { 1.0 } else { 0.0 }))
        .collect();
    let y = if sparse {
        Targets::Sparse(&labels)
    } else {
        Targets::Dense(&one_hot)
    };
    let opts = FitOptions {
        batch_size: BATCH,
        epochs: 2,
        validation: Validation::Split(0.18),
        verbose: 0,
        ..Default::default()
    };
    let history = m.fit(&x, y, opts).unwrap();
    Run {
        weights: m.get_weights().unwrap(),
        losses: history.metrics.iter().map(|(_, v)| v.clone()).collect(),
        steps: m.steps(),
        staged_uploads: m.backend().staged_uploads(),
        replays: m.backend().step_replays(),
    }
}

/// A fit with the staged upload gives the plain upload's bits: weights and
/// every logged loss and metric, one-hot and sparse labels.
#[test]
#[ignore = "needs a CUDA device"]
fn fit_with_staged_upload_is_the_plain_bits() {
    for sparse in [false, true] {
        let plain = train(false, sparse);
        let staged = train(true, sparse);
        assert_eq!(plain.staged_uploads, 0, "the plain path staged an upload");
        // Inputs and labels of every training and validation batch.
        assert!(
            staged.staged_uploads >= 2 * staged.steps,
            "{} staged uploads for {} steps",
            staged.staged_uploads,
            staged.steps
        );
        assert!(staged.replays > 0, "the captured step never replayed");
        assert_eq!(staged.steps, plain.steps);
        for (i, (s, p)) in staged.weights.iter().zip(&plain.weights).enumerate() {
            assert_eq!(bits(s), bits(p), "sparse {sparse}: weight tensor {i}");
        }
        assert_eq!(staged.losses.len(), plain.losses.len());
        for (s, p) in staged.losses.iter().zip(&plain.losses) {
            let b = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(b(s), b(p), "sparse {sparse}: logged metrics differ");
        }
    }
}
