//! IDX files (the format of MNIST and Fashion-MNIST), gzipped or not.
//!
//! An IDX file is a big-endian header, then the data: magic `0x00000803`
//! and three `u32` dimensions `[count, rows, cols]` for unsigned-byte images,
//! magic `0x00000801` and one `u32` count for unsigned-byte labels.

use super::{Dataset, file_name, thousands};
use crate::error::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The magic number of an IDX file of unsigned-byte images (3 dimensions).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// The magic number of an IDX file of unsigned-byte labels (1 dimension).
const LABELS_MAGIC: u32 = 0x0000_0801;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Fashion-MNIST's ten classes (T-shirt/top, Trouser, ..., Ankle boot).
pub const FASHION_MNIST_CLASSES: usize = 10;

/// The four Fashion-MNIST files, without the `.gz` that the published
/// copies carry: train images, train labels, test images, test labels.
pub const FASHION_MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Images read from an IDX file, still as bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct IdxImages {
    /// The number of images.
    pub count: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `count * rows * cols` bytes, image after image, each row-major.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The pixels divided by 255 (as `f32`, like Keras's
    /// `x.astype("float32") / 255`), so every value lies in `[0, 1]`.
    pub fn to_unit_f32(&self) -> Vec<f32> {
        bytes_to_unit_f32(&self.pixels)
    }
}

/// A pixel byte scaled to `[0, 1]`: one correctly rounded `f32` division,
/// the same value numpy gives for `np.float32(b) / 255`.
pub(crate) fn unit(b: u8) -> f32 {
    b as f32 / 255.0
}

fn bytes_to_unit_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&b| unit(b)).collect()
}

/// A file's contents, decompressed when it was gzipped.
pub(crate) struct Contents {
    pub bytes: Vec<u8>,
    pub gzip: bool,
    pub disk_size: u64,
    /// Set when the gzip stream broke off; `bytes` then holds what came out
    /// before, so that the caller can still say how much was expected.
    pub gzip_error: Option<String>,
}

impl Contents {
    /// `" after decompression"` for a gzipped file, for size messages.
    fn after(&self) -> &'static str {
        if self.gzip {
            " after decompression"
        } else {
            ""
        }
    }

    /// What to append to a message when the gzip stream was broken.
    fn gzip_note(&self) -> String {
        match &self.gzip_error {
            Some(e) => format!(
                "; the gzip data ({} bytes on disk) is truncated or corrupt: {e}",
                thousands(self.disk_size)
            ),
            None => String::new(),
        }
    }
}

/// Reads a file whole, gunzipping it when it starts with the gzip magic
/// bytes (whatever its name), keeping what a broken stream yielded.
pub(crate) fn read_contents(path: &Path) -> Result<Contents> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let disk_size = raw.len() as u64;
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(Contents {
            bytes: raw,
            gzip: false,
            disk_size,
            gzip_error: None,
        });
    }
    let mut bytes = Vec::with_capacity(raw.len().saturating_mul(4));
    // MultiGz: a gzip file may hold several members, all of them data.
    let gzip_error = flate2::read::MultiGzDecoder::new(raw.as_slice())
        .read_to_end(&mut bytes)
        .err()
        .map(|e| e.to_string());
    Ok(Contents {
        bytes,
        gzip: true,
        disk_size,
        gzip_error,
    })
}

/// A file's bytes, decompressed when it starts with the gzip magic bytes
/// (`1f 8b`), whatever its name. A broken gzip stream is an error that
/// gives the file's size and how much came out before the break.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let c = read_contents(path)?;
    if let Some(e) = &c.gzip_error {
        return Err(Error::format(
            path,
            format!(
                "gzip data ({} bytes on disk) is truncated or corrupt after {} bytes \
                 decompressed: {e}",
                thousands(c.disk_size),
                thousands(c.bytes.len() as u64)
            ),
        ));
    }
    Ok(c.bytes)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks the magic number and that the header fits; `what` describes the
/// file kind for messages.
fn check_header(path: &Path, c: &Contents, magic: u32, header: usize, what: &str) -> Result<()> {
    let b = &c.bytes;
    if b.len() >= 4 && be_u32(b, 0) != magic {
        let found = be_u32(b, 0);
        let hint = match found {
            IMAGES_MAGIC => " (this is an IDX image file)",
            LABELS_MAGIC => " (this is an IDX label file)",
            _ => "",
        };
        return Err(Error::format(
            path,
            format!(
                "magic number 0x{found:08x}{hint}, expected 0x{magic:08x} ({what}){}",
                c.gzip_note()
            ),
        ));
    }
    if b.len() < header {
        return Err(Error::format(
            path,
            format!(
                "{} bytes{}, too short for the {header}-byte header of {what}{}",
                thousands(b.len() as u64),
                c.after(),
                c.gzip_note()
            ),
        ));
    }
    Ok(())
}

/// The expected file size `header + product(dims)`, or an error when it
/// does not fit in memory addresses.
fn expected_size(path: &Path, header: usize, dims: &[u32]) -> Result<usize> {
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .and_then(|p| p.checked_add(header as u64))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::format(path, format!("dimensions {dims:?} are too large")))
}

fn parse_images(path: &Path, c: Contents) -> Result<IdxImages> {
    check_header(
        path,
        &c,
        IMAGES_MAGIC,
        16,
        "IDX unsigned-byte images, 3 dimensions",
    )?;
    let b = &c.bytes;
    let dims = [be_u32(b, 4), be_u32(b, 8), be_u32(b, 12)];
    let expected = expected_size(path, 16, &dims)?;
    if b.len() != expected || c.gzip_error.is_some() {
        return Err(Error::format(
            path,
            format!(
                "{} bytes{}, expected {} for {} images of {}x{}{}",
                thousands(b.len() as u64),
                c.after(),
                thousands(expected as u64),
                thousands(dims[0] as u64),
                dims[1],
                dims[2],
                c.gzip_note()
            ),
        ));
    }
    let mut pixels = c.bytes;
    pixels.drain(..16);
    Ok(IdxImages {
        count: dims[0] as usize,
        rows: dims[1] as usize,
        cols: dims[2] as usize,
        pixels,
    })
}

fn parse_labels(path: &Path, c: Contents) -> Result<Vec<u8>> {
    check_header(
        path,
        &c,
        LABELS_MAGIC,
        8,
        "IDX unsigned-byte labels, 1 dimension",
    )?;
    let b = &c.bytes;
    let n = be_u32(b, 4);
    let expected = expected_size(path, 8, &[n])?;
    if b.len() != expected || c.gzip_error.is_some() {
        return Err(Error::format(
            path,
            format!(
                "{} bytes{}, expected {} for {} labels{}",
                thousands(b.len() as u64),
                c.after(),
                thousands(expected as u64),
                thousands(n as u64),
                c.gzip_note()
            ),
        ));
    }
    let mut labels = c.bytes;
    labels.drain(..8);
    Ok(labels)
}

/// Reads an IDX file of unsigned-byte images (magic `0x00000803`), gzipped
/// or not. The file must hold exactly the bytes its header announces.
pub fn load_idx_images(path: &Path) -> Result<IdxImages> {
    parse_images(path, read_contents(path)?)
}

/// Reads an IDX file of unsigned-byte labels (magic `0x00000801`), gzipped
/// or not. The file must hold exactly the bytes its header announces.
pub fn load_idx_labels(path: &Path) -> Result<Vec<u8>> {
    parse_labels(path, read_contents(path)?)
}

/// An image file and a label file as a [`Dataset`] of samples
/// `[1, rows, cols]`, pixels divided by 255. The counts must agree and every
/// label must be below `classes`.
pub fn load_idx_dataset(images: &Path, labels: &Path, classes: usize) -> Result<Dataset> {
    let img = load_idx_images(images)?;
    let lab = load_idx_labels(labels)?;
    if lab.len() != img.count {
        return Err(Error::format(
            labels,
            format!(
                "{} labels, but {} holds {} images: the counts must agree",
                thousands(lab.len() as u64),
                file_name(images),
                thousands(img.count as u64)
            ),
        ));
    }
    let y = labels_to_classes(labels, &lab, classes)?;
    Ok(Dataset {
        x: img.to_unit_f32(),
        y,
        sample_shape: vec![1, img.rows, img.cols],
        classes,
    })
}

/// Widens byte labels to `u32`, rejecting any label `>= classes`.
pub(crate) fn labels_to_classes(path: &Path, labels: &[u8], classes: usize) -> Result<Vec<u32>> {
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= classes)
    {
        return Err(Error::format(
            path,
            format!(
                "label {l} at index {} is out of range: expected a class below {classes}",
                thousands(i as u64)
            ),
        ));
    }
    Ok(labels.iter().map(|&l| l as u32).collect())
}

/// `dir/name`, or `dir/name.gz` when only that exists; `None` when neither.
pub(crate) fn find_plain_or_gz(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

/// Loads Fashion-MNIST from `dir`, which holds the four IDX files of
/// [`FASHION_MNIST_FILES`], each gzipped (`.gz`) or not. Returns
/// `(train, test)`, samples `[1, 28, 28]`, pixels divided by 255, labels
/// below 10. The counts are not fixed (60,000 and 10,000 in the real set),
/// so small sets in the same format load too.
pub fn load_fashion_mnist(dir: &Path) -> Result<(Dataset, Dataset)> {
    let find = |name: &str| {
        find_plain_or_gz(dir, name).ok_or_else(|| Error::Io {
            path: dir.join(format!("{name}.gz")),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("Fashion-MNIST file not found (looked for {name}.gz and {name})"),
            ),
        })
    };
    let mut sets = Vec::with_capacity(2);
    for pair in FASHION_MNIST_FILES.chunks_exact(2) {
        let (images, labels) = (find(pair[0])?, find(pair[1])?);
        let set = load_idx_dataset(&images, &labels, FASHION_MNIST_CLASSES)?;
        if set.sample_shape[1..] != [28, 28] {
            return Err(Error::format(
                &images,
                format!(
                    "images of {}x{}, expected 28x28 for Fashion-MNIST",
                    set.sample_shape[1], set.sample_shape[2]
                ),
            ));
        }
        sets.push(set);
    }
    let test = sets.pop().expect("two sets were loaded");
    let train = sets.pop().expect("two sets were loaded");
    Ok((train, test))
}
