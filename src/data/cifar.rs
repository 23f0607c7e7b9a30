//! The binary version of CIFAR-10.
//!
//! Each file is a run of 3,073-byte records: one label byte (0..=9), then
//! 3,072 pixel bytes: the red plane, the green plane, the blue plane, each
//! 32x32 row-major. That is already CHW, so a record's pixels are one NCHW
//! sample as they lie.

use super::idx::{labels_to_classes, unit};
use super::{Dataset, thousands};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Bytes per record: 1 label byte and 3 x 32 x 32 pixel bytes.
pub const CIFAR_RECORD_BYTES: usize = 1 + CIFAR_PIXELS;
const CIFAR_PIXELS: usize = 3 * 32 * 32;
/// CIFAR-10's ten classes (airplane, automobile, ..., truck).
pub const CIFAR10_CLASSES: usize = 10;
/// Records in each file of the official release.
pub const CIFAR10_RECORDS_PER_FILE: usize = 10_000;
/// The five training files, in the order their records are concatenated.
pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test file.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";
/// The official archive of the binary version.
pub const CIFAR10_TARBALL: &str = "cifar-10-binary.tar.gz";
/// The directory inside the archive that holds the files.
pub(crate) const CIFAR10_DIR: &str = "cifar-10-batches-bin";

/// Loads one file of CIFAR-10 records, any whole number of them (at least
/// one), as a [`Dataset`] of `[3, 32, 32]` samples divided by 255.
pub fn load_cifar_bin_file(path: &Path) -> Result<Dataset> {
    let raw = std::fs::read(path).map_err(|source| Error::io(path, source))?;
    if raw.is_empty() || raw.len() % CIFAR_RECORD_BYTES != 0 {
        return Err(Error::format(
            path,
            format!(
                "{} bytes is not a whole, non-zero number of {}-byte records \
                 (1 label byte + 3,072 pixel bytes): {} records and {} bytes left over",
                thousands(raw.len() as u64),
                thousands(CIFAR_RECORD_BYTES as u64),
                thousands((raw.len() / CIFAR_RECORD_BYTES) as u64),
                thousands((raw.len() % CIFAR_RECORD_BYTES) as u64)
            ),
        ));
    }
    records_to_dataset(path, &raw)
}

fn records_to_dataset(path: &Path, raw: &[u8]) -> Result<Dataset> {
    let n = raw.len() / CIFAR_RECORD_BYTES;
    let labels: Vec<u8> = raw.chunks_exact(CIFAR_RECORD_BYTES).map(|r| r[0]).collect();
    let y = labels_to_classes(path, &labels, CIFAR10_CLASSES)?;
    let mut x = vec![0.0f32; n * CIFAR_PIXELS];
    x.par_chunks_mut(CIFAR_PIXELS)
        .zip(raw.par_chunks(CIFAR_RECORD_BYTES))
        .for_each(|(xs, rec)| {
            for (v, &b) in xs.iter_mut().zip(&rec[1..]) {
                *v = unit(b);
            }
        });
    Ok(Dataset {
        x,
        y,
        sample_shape: vec![3, 32, 32],
        classes: CIFAR10_CLASSES,
    })
}

fn has_all_files(dir: &Path) -> bool {
    CIFAR10_TRAIN_FILES
        .iter()
        .chain([&CIFAR10_TEST_FILE])
        .all(|f| dir.join(f).is_file())
}

/// Which of the six files `dir` lacks.
pub(crate) fn missing_files(dir: &Path) -> Vec<&'static str> {
    CIFAR10_TRAIN_FILES
        .iter()
        .chain([&CIFAR10_TEST_FILE])
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect()
}

/// The directory that holds the six CIFAR-10 `.bin` files, from `path`:
/// `path` itself, `path/cifar-10-batches-bin`, or the official archive
/// (`path` itself, or `path/cifar-10-binary.tar.gz`), which is then
/// extracted beside itself. `Ok(None)` when none of these is there.
pub fn cifar10_files_dir(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        let dest = path.parent().unwrap_or(Path::new("."));
        return extract_cifar10_tarball(path, dest).map(Some);
    }
    for dir in [path.to_path_buf(), path.join(CIFAR10_DIR)] {
        if has_all_files(&dir) {
            return Ok(Some(dir));
        }
    }
    let tarball = path.join(CIFAR10_TARBALL);
    if tarball.is_file() {
        return extract_cifar10_tarball(&tarball, path).map(Some);
    }
    Ok(None)
}

/// Extracts the official `cifar-10-binary.tar.gz` into
/// `dest/cifar-10-batches-bin/` and returns that directory.
///
/// Only the known members are written (the six `.bin` files,
/// `batches.meta.txt`, `readme.html`), each through a temporary file renamed
/// when complete, so an interrupted extraction never looks finished and no
/// member can write outside `dest`.
pub fn extract_cifar10_tarball(tarball: &Path, dest: &Path) -> Result<PathBuf> {
    let out_dir = dest.join(CIFAR10_DIR);
    std::fs::create_dir_all(&out_dir).map_err(|source| Error::io(&out_dir, source))?;
    let file = std::fs::File::open(tarball).map_err(|source| Error::io(tarball, source))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bad = |e: std::io::Error| {
        Error::format(
            tarball,
            format!(
                "not a readable gzipped tar archive ({} bytes): {e}",
                thousands(size)
            ),
        )
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let known: Vec<&str> = CIFAR10_TRAIN_FILES
        .iter()
        .copied()
        .chain([CIFAR10_TEST_FILE, "batches.meta.txt", "readme.html"])
        .collect();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let member = entry.path().map_err(bad)?.into_owned();
        let mut parts = member.components().map(|c| c.as_os_str().to_string_lossy());
        let (Some(top), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if top != CIFAR10_DIR || !entry.header().entry_type().is_file() {
            continue;
        }
        let Some(&name) = known.iter().find(|&&k| k == name) else {
            continue;
        };
        let target = out_dir.join(name);
        // A `tempfile` beside the target (removed on failure), persisted
        // over it when complete.
        let written = (|| -> std::io::Result<()> {
            let mut part = tempfile::Builder::new()
                .prefix(&format!(".{name}.part-"))
                .tempfile_in(&out_dir)?;
            std::io::copy(&mut entry, &mut part)?;
            part.as_file().sync_all()?;
            part.persist(&target).map_err(|e| e.error)?;
            Ok(())
        })();
        if let Err(e) = written {
            return Err(Error::format(
                tarball,
                format!(
                    "extracting {} to {} failed: {e}",
                    member.display(),
                    target.display()
                ),
            ));
        }
    }
    let missing = missing_files(&out_dir);
    if !missing.is_empty() {
        return Err(Error::format(
            tarball,
            format!(
                "the archive ({} bytes) lacks {}/{}: is it the binary version \
                 (cifar-10-binary.tar.gz, not the python or matlab one)?",
                thousands(size),
                CIFAR10_DIR,
                missing.join(", ")
            ),
        ));
    }
    Ok(out_dir)
}

/// Loads CIFAR-10 from `path` (see [`cifar10_files_dir`] for where it
/// looks), insisting on the official 10,000 records per file. Returns
/// `(train, test)`: 50,000 and 10,000 samples `[3, 32, 32]`, pixels divided
/// by 255, training files concatenated in order 1..5.
pub fn load_cifar10(path: &Path) -> Result<(Dataset, Dataset)> {
    load_cifar10_dir(path, Some(CIFAR10_RECORDS_PER_FILE))
}

/// [`load_cifar10`] with the number of records each file must hold, or
/// `None` to accept any whole number (for small sets in the same layout).
pub fn load_cifar10_dir(
    path: &Path,
    records_per_file: Option<usize>,
) -> Result<(Dataset, Dataset)> {
    let Some(dir) = cifar10_files_dir(path)? else {
        let missing = missing_files(path);
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "CIFAR-10 binary files not found: {} missing here and in {CIFAR10_DIR}/, \
                     and no {CIFAR10_TARBALL}",
                    missing.join(", ")
                ),
            ),
        });
    };
    let load = |name: &str| -> Result<Dataset> {
        let file = dir.join(name);
        if let Some(records) = records_per_file {
            let expected = (records * CIFAR_RECORD_BYTES) as u64;
            let size = std::fs::metadata(&file)
                .map_err(|source| Error::io(&file, source))?
                .len();
            if size != expected {
                return Err(Error::format(
                    &file,
                    format!(
                        "{} bytes, expected {} for {} records of {} bytes \
                         (1 label + 3,072 pixels)",
                        thousands(size),
                        thousands(expected),
                        thousands(records as u64),
                        thousands(CIFAR_RECORD_BYTES as u64)
                    ),
                ));
            }
        }
        load_cifar_bin_file(&file)
    };
    let mut train = load(CIFAR10_TRAIN_FILES[0])?;
    // The other files are (nearly always) the size of the first.
    train
        .x
        .reserve(train.x.len() * (CIFAR10_TRAIN_FILES.len() - 1));
    train
        .y
        .reserve(train.y.len() * (CIFAR10_TRAIN_FILES.len() - 1));
    for name in &CIFAR10_TRAIN_FILES[1..] {
        let part = load(name)?;
        train.x.extend_from_slice(&part.x);
        train.y.extend_from_slice(&part.y);
    }
    let test = load(CIFAR10_TEST_FILE)?;
    Ok((train, test))
}
