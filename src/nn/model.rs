//! The [`Sequential`] model: layers in order, built for one input shape.

use super::layers::{self, Layer, Mode, Plan, Workspace};
use super::{LayerSpec, Rng, keras_shape};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::train::{Compiled, History};

/// A parameter tensor as the outside sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// `"<layer>/<tensor>"`, e.g. `"dense/kernel"`, `"batch_normalization/moving_mean"`.
    pub name: String,
    /// Its shape (Dense kernels `[in, units]`, Conv2D kernels OIHW).
    pub shape: Vec<usize>,
    /// Whether the optimizer updates it.
    pub trainable: bool,
}

/// A Keras-like sequential model over a compute backend `B`.
///
/// `add` layers, `build` with the per-sample input shape (`[C, H, W]` or
/// `[F]`, NCHW), then `compile` and `fit` (see [`crate::train`]).
pub struct Sequential<B: Backend> {
    pub(crate) backend: B,
    pub(crate) specs: Vec<LayerSpec>,
    pub(crate) layers: Vec<Layer<B>>,
    pub(crate) input_shape: Vec<usize>,
    pub(crate) plan: Plan,
    pub(crate) built: bool,
    /// Initialization and shuffling.
    pub(crate) rng: Rng,
    /// The Philox key of every dropout mask.
    pub(crate) dropout_seed: u64,
    /// Training steps taken (feeds the dropout offsets).
    pub(crate) step: u64,
    /// Epochs completed (where `fit` resumes by default).
    pub(crate) epoch: usize,
    pub(crate) workspaces: Vec<Workspace<B>>,
    pub(crate) compiled: Option<Compiled<B>>,
    pub(crate) history: History,
}

impl<B: Backend> Sequential<B> {
    /// An empty model on `backend`; `seed` drives weight initialization,
    /// shuffling and the dropout masks (the same seed gives the same run).
    pub fn new(backend: B, seed: u64) -> Self {
        // The dropout key comes from its own stream, so it does not depend
        // on how many numbers the initialization draws.
        let dropout_seed = Rng::new(seed ^ 0x000d_4090_u64.wrapping_mul(0x9e37_79b9)).next_u64();
        Sequential {
            backend,
            specs: Vec::new(),
            layers: Vec::new(),
            input_shape: Vec::new(),
            plan: Plan::default(),
            built: false,
            rng: Rng::new(seed),
            dropout_seed,
            step: 0,
            epoch: 0,
            workspaces: Vec::new(),
            compiled: None,
            history: History::default(),
        }
    }

    /// Appends a layer (shapes are checked by [`Sequential::build`]).
    pub fn add(&mut self, layer: impl Into<LayerSpec>) -> &mut Self {
        self.specs.push(layer.into());
        self
    }

    /// Infers every layer's shape from the per-sample `input_shape`
    /// (`[C, H, W]` images or `[F]` features), names the layers as Keras
    /// does, and allocates and initializes the parameters. A shape that a
    /// layer cannot take is an error naming the layer, e.g.
    /// `dense_2 (Dense): expected a flat input, got (None, 13, 13, 64)`.
    /// Building again re-initializes the weights (drawing on from the
    /// model's generator).
    pub fn build(&mut self, input_shape: &[usize]) -> Result<()> {
        if input_shape.is_empty() || input_shape.len() == 2 || input_shape.len() > 3 {
            return Err(Error::Config(format!(
                "input shape {input_shape:?}: expected [features] or [channels, height, width]"
            )));
        }
        if input_shape.contains(&0) {
            return Err(Error::Config(format!(
                "input shape {input_shape:?}: every dimension must be at least 1"
            )));
        }
        if self.specs.is_empty() {
            return Err(Error::Config("the model has no layer".into()));
        }
        let mut counts = std::collections::HashMap::<&str, usize>::new();
        let mut layers = Vec::with_capacity(self.specs.len());
        let mut shape = input_shape.to_vec();
        for spec in &self.specs {
            let prefix = spec.name_prefix();
            let k = counts.entry(prefix).or_insert(0);
            let name = if *k == 0 {
                prefix.to_string()
            } else {
                format!("{prefix}_{k}")
            };
            *k += 1;
            let layer = layers::build_layer(&self.backend, spec, name, &shape, &mut self.rng)?;
            shape = layer.out_shape.clone();
            layers.push(layer);
        }
        self.plan = Plan::new(input_shape.iter().product(), &layers);
        self.layers = layers;
        self.input_shape = input_shape.to_vec();
        self.workspaces.clear();
        self.built = true;
        if let Some(c) = self.compiled.take() {
            // The parameter list changed: compile again for a fresh state.
            self.compile(c.optimizer, c.loss, &c.metric_names())?;
        }
        Ok(())
    }

    pub(crate) fn check_built(&self, what: &str) -> Result<()> {
        if self.built {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "{what}: the model is not built; call build(input_shape) first"
            )))
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The layer names, in order.
    pub fn layer_names(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.name.clone()).collect()
    }

    /// The per-sample input shape (NCHW order) given to `build`.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// The per-sample output shape.
    pub fn output_shape(&self) -> Vec<usize> {
        self.layers
            .last()
            .map_or_else(|| self.input_shape.clone(), |l| l.out_shape.clone())
    }

    /// Elements per sample of the input.
    pub fn input_len(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// Elements per sample of the output.
    pub fn output_len(&self) -> usize {
        self.output_shape().iter().product()
    }

    /// Training steps taken so far (the dropout masks' counter).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Epochs completed so far.
    pub fn epochs_done(&self) -> usize {
        self.epoch
    }

    /// The history of every `fit` since the last compile (or as loaded
    /// from a checkpoint).
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Every parameter tensor, in layer order (kernel, bias; gamma, beta,
    /// moving_mean, moving_variance).
    pub fn params(&self) -> Vec<ParamInfo> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.params.iter().map(move |p| ParamInfo {
                    name: format!("{}/{}", l.name, p.name),
                    shape: p.shape.clone(),
                    trainable: p.grad.is_some(),
                })
            })
            .collect()
    }

    /// (total, trainable, non-trainable) parameter counts.
    pub fn count_params(&self) -> (usize, usize, usize) {
        let mut t = (0, 0, 0);
        for p in self.params() {
            let n: usize = p.shape.iter().product();
            t.0 += n;
            if p.trainable {
                t.1 += n;
            } else {
                t.2 += n;
            }
        }
        t
    }

    /// Every parameter tensor's values on the host, in [`Sequential::params`] order.
    pub fn get_weights(&self) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for l in &self.layers {
            for p in &l.params {
                out.push(self.backend.download_f32(&p.value)?);
            }
        }
        Ok(out)
    }

    /// Sets every parameter tensor from host values in [`Sequential::params`]
    /// order; the count and every length must match (checked before
    /// anything is written).
    pub fn set_weights(&mut self, weights: &[Vec<f32>]) -> Result<()> {
        let info = self.params();
        if weights.len() != info.len() {
            return Err(Error::shape(
                "set_weights",
                "number of tensors",
                info.len(),
                weights.len(),
            ));
        }
        for (w, p) in weights.iter().zip(&info) {
            let n: usize = p.shape.iter().product();
            if w.len() != n {
                return Err(Error::shape(
                    "set_weights",
                    format!("{} length (shape {:?})", p.name, p.shape),
                    n,
                    w.len(),
                ));
            }
        }
        let mut it = weights.iter();
        for l in &mut self.layers {
            for p in &mut l.params {
                let w = it.next().expect("counted above");
                self.backend.upload_into_f32(w, &mut p.value)?;
            }
        }
        Ok(())
    }

    /// The model's summary in Keras 2.3.1's format (line length 65, columns
    /// at 29 / 55 / 65). Output shapes are printed channels-last, `(None,
    /// H, W, C)`, as Keras prints them, although kestrel computes NCHW.
    pub fn summary(&self) -> String {
        let positions = [29usize, 55, 65];
        let row = |fields: [&str; 3]| -> String {
            let mut line = String::new();
            for (i, f) in fields.iter().enumerate() {
                if i > 0 {
                    line.pop();
                    line.push(' ');
                }
                line.push_str(f);
                line = line.chars().take(positions[i]).collect();
                while line.chars().count() < positions[i] {
                    line.push(' ');
                }
            }
            line.push('\n');
            line
        };
        let rule = |c: char| -> String {
            let mut s: String = std::iter::repeat_n(c, 65).collect();
            s.push('\n');
            s
        };
        let mut s = String::from("Model: \"sequential\"\n");
        s += &rule('_');
        s += &row(["Layer (type)", "Output Shape", "Param #"]);
        s += &rule('=');
        for (i, l) in self.layers.iter().enumerate() {
            let count: usize = l
                .params
                .iter()
                .map(|p| p.shape.iter().product::<usize>())
                .sum();
            s += &row([
                &format!("{} ({})", l.name, l.spec.type_name()),
                &keras_shape(&l.out_shape),
                &count.to_string(),
            ]);
            s += &rule(if i + 1 == self.layers.len() { '=' } else { '_' });
        }
        let (total, trainable, non) = self.count_params();
        s += &format!("Total params: {}\n", thousands(total));
        s += &format!("Trainable params: {}\n", thousands(trainable));
        s += &format!("Non-trainable params: {}\n", thousands(non));
        s += &rule('_');
        s
    }

    /// The index of the workspace for batch size `n` (created on first use).
    pub(crate) fn workspace(&mut self, n: usize, training: bool) -> Result<usize> {
        if let Some(i) = self
            .workspaces
            .iter()
            .position(|w| w.n == n && w.training == training)
        {
            return Ok(i);
        }
        let ws = Workspace::new(
            &self.backend,
            &self.layers,
            &self.plan,
            self.input_len(),
            n,
            training,
        )?;
        self.workspaces.push(ws);
        Ok(self.workspaces.len() - 1)
    }

    pub(crate) fn mode(&self, training: bool, logits_out: bool) -> Mode {
        Mode {
            training,
            logits_out,
            dropout_seed: self.dropout_seed,
            step: self.step,
        }
    }

    /// Forward pass over workspace `wi` (input already in `acts[0]`).
    pub(crate) fn run_forward(&mut self, wi: usize, mode: Mode) -> Result<()> {
        let ws = &mut self.workspaces[wi];
        layers::forward(&self.backend, &mut self.layers, &self.plan, ws, mode, None)
    }

    /// [`Sequential::run_forward`] for a step being captured: dropout reads
    /// its step from `clock` on the device.
    pub(crate) fn run_forward_clocked(
        &mut self,
        wi: usize,
        mode: Mode,
        clock: &B::StepClock,
    ) -> Result<()> {
        let ws = &mut self.workspaces[wi];
        layers::forward(
            &self.backend,
            &mut self.layers,
            &self.plan,
            ws,
            mode,
            Some(clock),
        )
    }

    /// Backward pass over workspace `wi` (the loss gradient already in the
    /// output slot's gradient).
    pub(crate) fn run_backward(&mut self, wi: usize, mode: Mode) -> Result<()> {
        let ws = &mut self.workspaces[wi];
        layers::backward(&self.backend, &mut self.layers, &self.plan, ws, mode)
    }

    /// Trainable tensors and their gradients, for the optimizer step.
    pub(crate) fn trainable_mut(layers: &mut [Layer<B>]) -> (Vec<&mut B::Buf>, Vec<&B::Buf>) {
        let mut ps = Vec::new();
        let mut gs = Vec::new();
        for l in layers {
            for p in &mut l.params {
                if let Some(g) = &p.grad {
                    ps.push(&mut p.value);
                    gs.push(g);
                }
            }
        }
        (ps, gs)
    }

    /// Sizes of the trainable tensors.
    pub(crate) fn trainable_sizes(&self) -> Vec<usize> {
        self.params()
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.shape.iter().product())
            .collect()
    }

    /// Names of the trainable tensors.
    pub(crate) fn trainable_names(&self) -> Vec<String> {
        self.params()
            .into_iter()
            .filter(|p| p.trainable)
            .map(|p| p.name)
            .collect()
    }

    /// The gradients of the trainable tensors on the host, after a backward
    /// pass.
    pub(crate) fn download_grads(&self) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for l in &self.layers {
            for p in &l.params {
                if let Some(g) = &p.grad {
                    out.push(self.backend.download_f32(g)?);
                }
            }
        }
        Ok(out)
    }
}

/// `1250858` -> `"1,250,858"`.
pub(crate) fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
