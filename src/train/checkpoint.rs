//! Checkpoints: weights + optimizer state + epoch + step counter +
//! generator state + history, in one safetensors file (written
//! atomically), so that a resumed run gives the same weights, bit for bit,
//! as an uninterrupted one.
//!
//! Layout: the weights under their usual names; the optimizer's slots as
//! `optimizer/<tensor>/slot0` (and `slot1` for Adam); scalars and the
//! history in the metadata (`epoch`, `step`, `dropout_seed`, `iterations`, `rng` as four
//! hex u64, `optimizer`, `history` as `name=v,v,...;...` with f64 values
//! printed so that they parse back exactly). The optimizer's
//! hyper-parameters come from `compile`, not from the file.

use std::collections::HashMap;
use std::path::Path;

use super::{History, Logs};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::Rng;
use crate::nn::Sequential;
use crate::nn::weights_io::{
    atomic_write, f32_bytes, metadata, parse, read, serialize, tensor_f32,
};
use crate::ops::optim::OptimizerState;

const FORMAT: &str = "kestrel-checkpoint-1";

fn encode_history(h: &History) -> (String, String) {
    let epochs = h
        .epoch
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let metrics = h
        .metrics
        .iter()
        .map(|(k, v)| {
            let vals = v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>();
            format!("{k}={}", vals.join(","))
        })
        .collect::<Vec<_>>()
        .join(";");
    (epochs, metrics)
}

fn decode_history(path: &Path, epochs: &str, metrics: &str) -> Result<History> {
    let bad = |what: &str| Error::format(path, format!("checkpoint history: cannot parse {what}"));
    let epoch: Vec<usize> = if epochs.is_empty() {
        Vec::new()
    } else {
        epochs
            .split(',')
            .map(|s| s.parse().map_err(|_| bad(s)))
            .collect::<Result<_>>()?
    };
    let mut h = History {
        epoch: Vec::new(),
        metrics: Vec::new(),
    };
    let mut cols: Vec<(String, Vec<f64>)> = Vec::new();
    if !metrics.is_empty() {
        for part in metrics.split(';') {
            let (k, v) = part.split_once('=').ok_or_else(|| bad(part))?;
            let vals: Vec<f64> = if v.is_empty() {
                Vec::new()
            } else {
                v.split(',')
                    .map(|s| s.parse().map_err(|_| bad(s)))
                    .collect::<Result<_>>()?
            };
            if vals.len() != epoch.len() {
                return Err(bad(k));
            }
            cols.push((k.to_string(), vals));
        }
    }
    for (i, &e) in epoch.iter().enumerate() {
        let mut logs = Logs::default();
        for (k, v) in &cols {
            logs.set(k, v[i]);
        }
        h.push(e, &logs);
    }
    Ok(h)
}

impl<B: Backend> Sequential<B> {
    /// Saves a checkpoint (see the module docs); the model must be compiled.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let c = self.compiled("save_checkpoint")?;
        let state = self.backend.opt_state_download(&c.optimizer, &c.state)?;
        let mut tensors = self.weight_tensors()?;
        let names = self.trainable_names();
        let info = self.params();
        for (i, name) in names.iter().enumerate() {
            let shape = info
                .iter()
                .find(|p| &p.name == name)
                .map(|p| p.shape.clone())
                .unwrap_or_default();
            let (s0, s1) = state.slots(i).ok_or_else(|| {
                Error::format(path, format!("optimizer state has no slots for {name}"))
            })?;
            tensors.push((
                format!("optimizer/{name}/slot0"),
                shape.clone(),
                f32_bytes(s0),
            ));
            if !s1.is_empty() {
                tensors.push((format!("optimizer/{name}/slot1"), shape, f32_bytes(s1)));
            }
        }
        let (epochs, metrics) = encode_history(&self.history);
        let rng = self.rng.state();
        let mut meta = HashMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("epoch".into(), self.epoch.to_string());
        meta.insert("step".into(), self.step.to_string());
        meta.insert("dropout_seed".into(), self.dropout_seed.to_string());
        meta.insert("iterations".into(), state.iterations().to_string());
        meta.insert("optimizer".into(), format!("{:?}", state.kind()));
        meta.insert(
            "rng".into(),
            rng.iter()
                .map(|v| format!("{v:016x}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        meta.insert("history_epochs".into(), epochs);
        meta.insert("history".into(), metrics);
        let bytes = serialize(path, &tensors, Some(meta))?;
        atomic_write(path, &bytes)
    }

    /// Loads a checkpoint into a model built with the same layers and
    /// compiled with the same kind of optimizer: weights, optimizer state,
    /// epoch, step counter, generator state and history. Continue with
    /// `fit(.., FitOptions { initial_epoch: model.epochs_done(), .. })`.
    /// Everything is read and checked before anything is changed.
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let c = self.compiled("load_checkpoint")?;
        let bytes = read(path)?;
        let st = parse(path, &bytes)?;
        let meta = metadata(path, &bytes)?;
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| Error::format(path, format!("checkpoint metadata lacks {k:?}")))
        };
        if get("format")? != FORMAT {
            return Err(Error::format(
                path,
                format!("expected format {FORMAT}, got {:?}", get("format")?),
            ));
        }
        let num = |k: &str| -> Result<u64> {
            get(k)?
                .parse()
                .map_err(|_| Error::format(path, format!("checkpoint {k:?} is not a number")))
        };
        let (epoch, step, iterations) = (num("epoch")?, num("step")?, num("iterations")?);
        let dropout_seed = num("dropout_seed")?;
        let mut state = OptimizerState::new(&c.optimizer, &self.trainable_sizes())?;
        let kind = format!("{:?}", state.kind());
        if get("optimizer")? != &kind {
            return Err(Error::format(
                path,
                format!(
                    "checkpoint optimizer is {}, the model is compiled with {kind}",
                    get("optimizer")?
                ),
            ));
        }
        let rng_words: Vec<u64> = get("rng")?
            .split(',')
            .map(|s| u64::from_str_radix(s, 16))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::format(path, "checkpoint rng state is malformed"))?;
        let rng: [u64; 4] = rng_words
            .try_into()
            .map_err(|_| Error::format(path, "checkpoint rng state needs 4 words"))?;
        let history = decode_history(path, get("history_epochs")?, get("history")?)?;
        let info = self.params();
        for (i, name) in self.trainable_names().iter().enumerate() {
            let shape = info
                .iter()
                .find(|p| &p.name == name)
                .map(|p| p.shape.clone())
                .unwrap_or_default();
            let (s0, s1) = state.slots_mut(i).expect("sized from the model");
            s0.copy_from_slice(&tensor_f32(
                path,
                &st,
                &format!("optimizer/{name}/slot0"),
                &shape,
            )?);
            if !s1.is_empty() {
                s1.copy_from_slice(&tensor_f32(
                    path,
                    &st,
                    &format!("optimizer/{name}/slot1"),
                    &shape,
                )?);
            }
        }
        state.set_iterations(iterations);
        let dev_state = self.backend.opt_state_upload(&c.optimizer, &state)?;
        self.load_weight_tensors(path, &st)?;
        let c = self.compiled.as_mut().expect("checked above");
        c.state = dev_state;
        self.epoch = epoch as usize;
        self.step = step;
        self.dropout_seed = dropout_seed;
        self.rng = Rng::from_state(rng);
        self.history = history;
        Ok(())
    }
}
