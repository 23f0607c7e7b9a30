//! Weights as safetensors files (`"dense/kernel"`, `"dense/bias"`,
//! `"batch_normalization/moving_mean"`, ... as f32 little-endian), written
//! atomically: a temporary file in the same directory, fsync, rename, and
//! an fsync of the directory, so a crash leaves the old file or the new
//! one, never a partial one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::Sequential;
use crate::backend::Backend;
use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically (see the module docs): a
/// `tempfile` in the same directory, synced, then persisted (renamed) over
/// `path`. On failure the temporary file is removed and `path` is
/// untouched. Every file kestrel writes goes through here.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::format(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    // Dropping a `NamedTempFile` (on an error above, or the one `persist`
    // hands back on failure) deletes it.
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    // Make the rename itself durable; not every platform can open a
    // directory, so a failure here is not an error.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A tensor to serialize: name, shape, little-endian f32 bytes.
pub(crate) type NamedTensor = (String, Vec<usize>, Vec<u8>);

/// f32 values as little-endian bytes.
pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serializes named f32 tensors with metadata.
pub(crate) fn serialize(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, bytes) in tensors {
        let v = TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| Error::format(path, format!("tensor {name}: {e}")))?;
        views.push((name.clone(), v));
    }
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::format(path, format!("cannot serialize: {e}")))
}

/// Reads a whole file.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Parses a safetensors buffer, with an error that says what is wrong.
pub(crate) fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        Error::format(
            path,
            format!(
                "not a valid safetensors file ({} bytes; truncated or corrupted?): {e}",
                bytes.len()
            ),
        )
    })
}

/// The metadata of a safetensors buffer.
pub(crate) fn metadata(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, m) = SafeTensors::read_metadata(bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a valid safetensors file ({} bytes): {e}", bytes.len()),
        )
    })?;
    Ok(m.metadata().clone().unwrap_or_default())
}

/// Tensor `name` as f32 values of exactly `shape`.
pub(crate) fn tensor_f32(
    path: &Path,
    st: &SafeTensors,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::format(path, format!("missing tensor {name:?} (shape {shape:?})")))?;
    if t.dtype() != Dtype::F32 {
        return Err(Error::format(
            path,
            format!("tensor {name:?}: expected dtype F32, got {:?}", t.dtype()),
        ));
    }
    if t.shape() != shape {
        return Err(Error::format(
            path,
            format!(
                "tensor {name:?}: expected shape {shape:?}, got {:?}",
                t.shape()
            ),
        ));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

impl<B: Backend> Sequential<B> {
    /// The weights as named tensors (name, shape, little-endian bytes).
    pub(crate) fn weight_tensors(&self) -> Result<Vec<NamedTensor>> {
        let values = self.get_weights()?;
        Ok(self
            .params()
            .into_iter()
            .zip(values)
            .map(|(p, v)| (p.name, p.shape, f32_bytes(&v)))
            .collect())
    }

    /// Reads every weight tensor from a parsed file (all checked before
    /// any is set), then sets them.
    pub(crate) fn load_weight_tensors(&mut self, path: &Path, st: &SafeTensors) -> Result<()> {
        let mut values = Vec::new();
        for p in self.params() {
            values.push(tensor_f32(path, st, &p.name, &p.shape)?);
        }
        self.set_weights(&values)
    }

    /// Saves every parameter tensor (trainable or not) to a safetensors
    /// file, atomically.
    pub fn save_weights(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.check_built("save_weights")?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "kestrel-weights-1".to_string());
        let bytes = serialize(path, &self.weight_tensors()?, Some(meta))?;
        atomic_write(path, &bytes)
    }

    /// Loads weights saved by [`Sequential::save_weights`] (or the weights of
    /// a checkpoint) into a model built with the same layers. Every tensor
    /// must be present with the same shape; a truncated or corrupted file,
    /// a missing tensor or a wrong shape is an error naming the file and
    /// the tensor, and leaves the model unchanged.
    pub fn load_weights(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.check_built("load_weights")?;
        let bytes = read(path)?;
        let st = parse(path, &bytes)?;
        self.load_weight_tensors(path, &st)
    }
}
