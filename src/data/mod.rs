//! Data sets for the training loop: an in-memory [`Dataset`], loaders for the
//! IDX files of (Fashion-)MNIST and the binary version of CIFAR-10, and
//! [`locate`], which finds (or downloads) them.
//!
//! Images come out as `f32` in `[0, 1]` (the byte divided by 255, as the seed
//! runs do), NCHW: Fashion-MNIST samples are `[1, 28, 28]`, CIFAR-10 samples
//! `[3, 32, 32]`. Labels are class indices (`u32`), checked against the
//! number of classes when loaded; [`Dataset::one_hot`] expands them when a
//! loss wants one-hot targets.
//!
//! The loop takes batches without copying the set: contiguous batches as
//! slices ([`Dataset::rows`]), shuffled batches with [`Dataset::gather`] or
//! [`Dataset::gather_into`] (which refills buffers the loop keeps).

mod cifar;
mod download;
mod idx;
mod locate;

pub use cifar::{
    CIFAR_RECORD_BYTES, CIFAR10_CLASSES, CIFAR10_RECORDS_PER_FILE, CIFAR10_TARBALL,
    CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES, cifar10_files_dir, extract_cifar10_tarball,
    load_cifar_bin_file, load_cifar10, load_cifar10_dir,
};
pub use download::{Checksum, download};
pub use idx::{
    FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, IdxImages, load_fashion_mnist, load_idx_dataset,
    load_idx_images, load_idx_labels, read_maybe_gzip,
};
pub use locate::{
    CIFAR10_MD5, CIFAR10_URL_BASE, DataFile, DatasetName, FASHION_MNIST_MD5,
    FASHION_MNIST_URL_BASE, Locator, data_files, load, load_recorded, locate,
};

use crate::error::{Error, Result, checked_product};
use std::ops::Range;

/// A labelled data set held in memory.
///
/// `x` is row-major `[len, sample_shape...]`; `y[i]` is the class of sample
/// `i`, always `< classes` (checked by [`Dataset::new`] and the loaders).
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Samples, row-major `[len(), sample_shape...]`, pixels scaled to `[0, 1]`.
    pub x: Vec<f32>,
    /// One class index per sample.
    pub y: Vec<u32>,
    /// The shape of one sample, e.g. `[1, 28, 28]` (CHW).
    pub sample_shape: Vec<usize>,
    /// The number of classes; every label is below it.
    pub classes: usize,
}

/// A batch gathered from a [`Dataset`]: `x` is `[shape[0], sample_shape...]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Samples, row-major with shape `shape`.
    pub x: Vec<f32>,
    /// One class index per sample.
    pub y: Vec<u32>,
    /// `[batch size, sample_shape...]`.
    pub shape: Vec<usize>,
}

/// The index at which Keras's `validation_split` cuts `n` samples:
/// `int(n * (1 - validation_split))` in float64, as Keras 2 computes it.
/// Samples `[0, at)` train, samples `[at, n)` validate.
///
/// `fraction` must lie in `[0, 1)`.
pub fn validation_split_at(n: usize, fraction: f64) -> Result<usize> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::invalid(
            "dataset.split_last_fraction",
            "fraction",
            format!("{fraction} is outside [0, 1)"),
        ));
    }
    // Truncation toward zero, like Python's int() on a positive float.
    Ok(((n as f64) * (1.0 - fraction)) as usize)
}

/// One-hot rows `[labels.len(), classes]` (1.0 at the label, 0.0 elsewhere).
/// A label `>= classes` is an error.
pub fn one_hot(labels: &[u32], classes: usize) -> Result<Vec<f32>> {
    let len = checked_product("one_hot", "output", &[labels.len(), classes])?;
    let mut out = vec![0.0f32; len];
    for (i, &label) in labels.iter().enumerate() {
        if label as usize >= classes {
            return Err(Error::invalid(
                "one_hot",
                "labels",
                format!("label {label} at index {i} is not below {classes} classes"),
            ));
        }
        out[i * classes + label as usize] = 1.0;
    }
    Ok(out)
}

impl Dataset {
    /// A data set from its parts, checking that `x` holds `y.len()` samples
    /// of `sample_shape` and that every label is below `classes`.
    pub fn new(x: Vec<f32>, y: Vec<u32>, sample_shape: Vec<usize>, classes: usize) -> Result<Self> {
        const OP: &str = "dataset.new";
        let sample = checked_product(OP, "sample shape", &sample_shape)?;
        let expected = checked_product(OP, "x", &[y.len(), sample])?;
        if x.len() != expected {
            return Err(Error::shape(
                OP,
                "x length",
                format!("{expected} ({} samples of {sample_shape:?})", y.len()),
                x.len(),
            ));
        }
        if classes == 0 {
            return Err(Error::invalid(OP, "classes", "must be at least 1"));
        }
        if let Some((i, &label)) = y.iter().enumerate().find(|&(_, &l)| l as usize >= classes) {
            return Err(Error::invalid(
                OP,
                "y",
                format!("label {label} at index {i} is not below {classes} classes"),
            ));
        }
        Ok(Dataset {
            x,
            y,
            sample_shape,
            classes,
        })
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether the set holds no sample.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The number of `f32` in one sample (the product of `sample_shape`).
    pub fn sample_len(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// `[n, sample_shape...]`: the shape of a batch of `n` samples.
    pub fn batch_shape(&self, n: usize) -> Vec<usize> {
        let mut shape = Vec::with_capacity(self.sample_shape.len() + 1);
        shape.push(n);
        shape.extend_from_slice(&self.sample_shape);
        shape
    }

    /// Sample `i`, or `None` past the end.
    pub fn sample(&self, i: usize) -> Option<&[f32]> {
        if i >= self.len() {
            return None;
        }
        let s = self.sample_len();
        self.x.get(i * s..(i + 1) * s)
    }

    /// Samples `range` and their labels, without copying: the batch of an
    /// unshuffled pass, or a fixed evaluation slice.
    pub fn rows(&self, range: Range<usize>) -> Result<(&[f32], &[u32])> {
        if range.start > range.end || range.end > self.len() {
            return Err(Error::invalid(
                "dataset.rows",
                "range",
                format!(
                    "{}..{} is not within the {} samples",
                    range.start,
                    range.end,
                    self.len()
                ),
            ));
        }
        let s = self.sample_len();
        Ok((&self.x[range.start * s..range.end * s], &self.y[range]))
    }

    /// The samples at `indices` (in that order, repeats allowed) as a new
    /// [`Batch`]: a shuffled mini-batch.
    pub fn gather(&self, indices: &[usize]) -> Result<Batch> {
        let mut x = vec![0.0f32; indices.len() * self.sample_len()];
        let mut y = vec![0u32; indices.len()];
        self.gather_into(indices, &mut x, &mut y)?;
        Ok(Batch {
            x,
            y,
            shape: self.batch_shape(indices.len()),
        })
    }

    /// [`Dataset::gather`] into buffers the caller keeps from batch to
    /// batch: `x` must hold exactly `indices.len() * sample_len()` values
    /// and `y` `indices.len()`; both are fully overwritten.
    pub fn gather_into(&self, indices: &[usize], x: &mut [f32], y: &mut [u32]) -> Result<()> {
        const OP: &str = "dataset.gather";
        let s = self.sample_len();
        crate::error::check_len(OP, "x", x.len(), indices.len() * s)?;
        crate::error::check_len(OP, "y", y.len(), indices.len())?;
        if let Some((pos, &i)) = indices.iter().enumerate().find(|&(_, &i)| i >= self.len()) {
            return Err(Error::invalid(
                OP,
                "indices",
                format!(
                    "index {i} at position {pos} is not below the {} samples",
                    self.len()
                ),
            ));
        }
        for (k, &i) in indices.iter().enumerate() {
            x[k * s..(k + 1) * s].copy_from_slice(&self.x[i * s..(i + 1) * s]);
            y[k] = self.y[i];
        }
        Ok(())
    }

    /// All labels as one-hot rows `[len(), classes]`.
    pub fn one_hot(&self) -> Vec<f32> {
        // Labels were checked against `classes` on construction, but the
        // fields are public: fall back to zeros rather than panic.
        let mut out = vec![0.0f32; self.len() * self.classes];
        for (row, &label) in out.chunks_exact_mut(self.classes.max(1)).zip(&self.y) {
            if let Some(v) = row.get_mut(label as usize) {
                *v = 1.0;
            }
        }
        out
    }

    /// Splits off the first `k` samples: returns `(first k, the rest)`.
    /// Fashion-MNIST's usual validation set is the first 5,000 training
    /// images: `train.split_first(5000)` gives `(validation, train)`.
    pub fn split_first(mut self, k: usize) -> Result<(Dataset, Dataset)> {
        if k > self.len() {
            return Err(Error::invalid(
                "dataset.split_first",
                "k",
                format!("{k} is more than the {} samples", self.len()),
            ));
        }
        let s = self.sample_len();
        let rest_x = self.x.split_off(k * s);
        let rest_y = self.y.split_off(k);
        let rest = Dataset {
            x: rest_x,
            y: rest_y,
            sample_shape: self.sample_shape.clone(),
            classes: self.classes,
        };
        Ok((self, rest))
    }

    /// Keras's `validation_split`: returns `(train, validation)` where the
    /// validation set is the *last* `fraction` of the samples (before any
    /// shuffle), cut at [`validation_split_at`].
    pub fn split_last_fraction(self, fraction: f64) -> Result<(Dataset, Dataset)> {
        let at = validation_split_at(self.len(), fraction)?;
        self.split_first(at)
    }
}

impl Batch {
    /// The batch's labels as one-hot rows `[len, classes]`.
    pub fn one_hot(&self, classes: usize) -> Result<Vec<f32>> {
        one_hot(&self.y, classes)
    }

    /// The number of samples in the batch.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }
}

/// `1234567` as `"1,234,567"`, for sizes in error messages.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The last component of a path, for messages that quote the file name.
pub(crate) fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
