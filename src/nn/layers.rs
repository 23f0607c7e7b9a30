//! Built layers: shapes, parameters on the backend, and the forward and
//! backward passes over a batch, written once for every backend.

use super::{Act, Init, LayerSpec, Rng, keras_shape};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::activation::{Activation as OpAct, Softmax};
use crate::ops::batchnorm::BatchNorm;
use crate::ops::bias::BiasShape;
use crate::ops::conv::Conv2d;
use crate::ops::dropout::Dropout as DropoutOp;
use crate::ops::gemm::Bias;
use crate::ops::gemm::Gemm;
use crate::ops::pool::MaxPool2d;

/// One parameter tensor of a layer.
pub(crate) struct Param<B: Backend> {
    /// "kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance".
    pub name: &'static str,
    /// Its shape (kernels: Dense `[in, units]`, Conv2D OIHW).
    pub shape: Vec<usize>,
    pub value: B::Buf,
    /// The gradient buffer; `None` for non-trainable tensors.
    pub grad: Option<B::Buf>,
}

/// What a layer computes, with its shapes resolved (op structs are built
/// for one image and re-batched with the batch size of each call).
#[derive(Clone, Debug)]
pub(crate) enum Kind {
    Dense {
        inputs: usize,
        units: usize,
        act: Act,
        use_bias: bool,
    },
    Conv {
        conv: Conv2d,
        act: Act,
        use_bias: bool,
    },
    Pool {
        pool: MaxPool2d,
    },
    Bn {
        bn: BatchNorm,
    },
    Dropout {
        rate: f32,
    },
    Activation {
        act: Act,
    },
    Flatten,
}

/// A layer after [`super::Sequential::build`].
pub(crate) struct Layer<B: Backend> {
    pub name: String,
    pub spec: LayerSpec,
    pub kind: Kind,
    pub out_shape: Vec<usize>,
    pub params: Vec<Param<B>>,
}

impl<B: Backend> Layer<B> {
    /// Elements per sample of the output.
    pub fn out_len(&self) -> usize {
        self.out_shape.iter().product()
    }

    /// Whether the output is a separate buffer (Flatten reuses its input's).
    pub fn has_own_output(&self) -> bool {
        !matches!(self.kind, Kind::Flatten)
    }

    /// The layer's activation when it ends in softmax or sigmoid (the
    /// candidates for fusion with the loss).
    pub fn final_act(&self) -> Option<Act> {
        match &self.kind {
            Kind::Dense { act, .. } | Kind::Conv { act, .. } | Kind::Activation { act } => {
                Some(*act)
            }
            _ => None,
        }
    }
}

fn shape_err(name: &str, ty: &str, msg: String) -> Error {
    Error::Config(format!("{name} ({ty}): {msg}"))
}

fn init_values(rng: &mut Rng, init: Init, len: usize, fan_in: usize, fan_out: usize) -> Vec<f32> {
    match init {
        Init::Zeros => vec![0.0; len],
        Init::Ones => vec![1.0; len],
        Init::GlorotUniform => {
            let limit = (6.0 / (fan_in + fan_out).max(1) as f64).sqrt() as f32;
            (0..len).map(|_| rng.uniform(-limit, limit)).collect()
        }
        Init::HeNormal => {
            // 0.87962566 is the std of a standard normal truncated at +-2:
            // dividing by it makes the truncated draws have std sqrt(2/fan_in).
            let sigma = (2.0 / fan_in.max(1) as f64).sqrt() / 0.879_625_66;
            (0..len)
                .map(|_| {
                    loop {
                        let z = rng.normal();
                        if z.abs() <= 2.0 {
                            break (z * sigma) as f32;
                        }
                    }
                })
                .collect()
        }
    }
}

fn param<B: Backend>(
    backend: &B,
    name: &'static str,
    shape: Vec<usize>,
    values: Vec<f32>,
    trainable: bool,
) -> Result<Param<B>> {
    let value = backend.upload_f32(&values)?;
    let grad = if trainable {
        Some(backend.alloc_f32(values.len())?)
    } else {
        None
    };
    Ok(Param {
        name,
        shape,
        value,
        grad,
    })
}

fn check_act(name: &str, ty: &str, act: Act, flat: bool) -> Result<()> {
    if act == Act::Softmax && !flat {
        return Err(shape_err(
            name,
            ty,
            "softmax is supported on flat outputs only (add Flatten first)".into(),
        ));
    }
    if let Some(a) = act.elementwise() {
        a.check("activation")
            .map_err(|e| shape_err(name, ty, e.to_string()))?;
    }
    Ok(())
}

/// Builds one layer from its spec and input shape: checks the shape,
/// infers the output shape, initializes the parameters (drawing from `rng`
/// in order: kernel, then bias).
pub(crate) fn build_layer<B: Backend>(
    backend: &B,
    spec: &LayerSpec,
    name: String,
    in_shape: &[usize],
    rng: &mut Rng,
) -> Result<Layer<B>> {
    let ty = spec.type_name();
    let expect_image = |what: &str| -> Result<[usize; 3]> {
        match in_shape {
            [c, h, w] => Ok([*c, *h, *w]),
            _ => Err(shape_err(
                &name,
                ty,
                format!(
                    "expected an image input (None, H, W, C) {what}, got {}",
                    keras_shape(in_shape)
                ),
            )),
        }
    };
    let wrap = |e: Error| shape_err(&name, ty, e.to_string());
    let mut params = Vec::new();
    let (kind, out_shape) = match spec {
        LayerSpec::Dense(d) => {
            let inputs = match in_shape {
                [f] => *f,
                _ => {
                    return Err(shape_err(
                        &name,
                        ty,
                        format!(
                            "expected a flat input, got {} (add Flatten first)",
                            keras_shape(in_shape)
                        ),
                    ));
                }
            };
            if d.units == 0 {
                return Err(shape_err(
                    &name,
                    ty,
                    "units must be at least 1, got 0".into(),
                ));
            }
            check_act(&name, ty, d.activation, true)?;
            let w = init_values(rng, d.kernel_initializer, inputs * d.units, inputs, d.units);
            params.push(param(backend, "kernel", vec![inputs, d.units], w, true)?);
            if d.use_bias {
                params.push(param(
                    backend,
                    "bias",
                    vec![d.units],
                    vec![0.0; d.units],
                    true,
                )?);
            }
            (
                Kind::Dense {
                    inputs,
                    units: d.units,
                    act: d.activation,
                    use_bias: d.use_bias,
                },
                vec![d.units],
            )
        }
        LayerSpec::Conv2D(c) => {
            let [ch, h, w] = expect_image("for a 2-D convolution")?;
            let conv = Conv2d::new(
                [1, ch, h, w],
                c.filters,
                c.kernel_size,
                c.strides,
                c.padding,
            )
            .map_err(wrap)?;
            check_act(&name, ty, c.activation, false)?;
            let (r, s) = (c.kernel_size[0], c.kernel_size[1]);
            let wv = init_values(
                rng,
                c.kernel_initializer,
                conv.w_len(),
                ch * r * s,
                c.filters * r * s,
            );
            params.push(param(
                backend,
                "kernel",
                vec![c.filters, ch, r, s],
                wv,
                true,
            )?);
            if c.use_bias {
                params.push(param(
                    backend,
                    "bias",
                    vec![c.filters],
                    vec![0.0; c.filters],
                    true,
                )?);
            }
            let out = vec![c.filters, conv.out_h, conv.out_w];
            (
                Kind::Conv {
                    conv,
                    act: c.activation,
                    use_bias: c.use_bias,
                },
                out,
            )
        }
        LayerSpec::MaxPooling2D(p) => {
            let [ch, h, w] = expect_image("for 2-D pooling")?;
            let pool = MaxPool2d::new(
                [1, ch, h, w],
                p.pool_size,
                p.strides.unwrap_or(p.pool_size),
                p.padding,
            )
            .map_err(wrap)?;
            let out = vec![ch, pool.out_h, pool.out_w];
            (Kind::Pool { pool }, out)
        }
        LayerSpec::BatchNormalization(b) => {
            let (c, spatial, is_conv) = match in_shape {
                [f] => (*f, 1, false),
                [c, h, w] => (*c, h * w, true),
                _ => {
                    return Err(shape_err(
                        &name,
                        ty,
                        format!(
                            "expected a flat or image input, got {}",
                            keras_shape(in_shape)
                        ),
                    ));
                }
            };
            let bn = BatchNorm::new(
                1,
                c,
                spatial,
                is_conv,
                b.momentum,
                b.epsilon,
                b.variance_mode,
            )
            .map_err(wrap)?;
            params.push(param(backend, "gamma", vec![c], vec![1.0; c], true)?);
            params.push(param(backend, "beta", vec![c], vec![0.0; c], true)?);
            params.push(param(backend, "moving_mean", vec![c], vec![0.0; c], false)?);
            params.push(param(
                backend,
                "moving_variance",
                vec![c],
                vec![1.0; c],
                false,
            )?);
            (Kind::Bn { bn }, in_shape.to_vec())
        }
        LayerSpec::Dropout(d) => {
            DropoutOp::new(0, d.rate, 0, 0).map_err(wrap)?;
            (Kind::Dropout { rate: d.rate }, in_shape.to_vec())
        }
        LayerSpec::Activation(a) => {
            check_act(&name, ty, a.0, in_shape.len() == 1)?;
            (Kind::Activation { act: a.0 }, in_shape.to_vec())
        }
        LayerSpec::Flatten(_) => (Kind::Flatten, vec![in_shape.iter().product()]),
    };
    Ok(Layer {
        name,
        spec: spec.clone(),
        kind,
        out_shape,
        params,
    })
}

/// Per-layer scratch for one batch size.
pub(crate) struct LayerWs<B: Backend> {
    /// Pre-activation output and its gradient, for activations that
    /// cannot be fused into the GEMM epilogue.
    pre: Option<(B::Buf, B::Buf)>,
    argmax: Option<B::BufU32>,
    mask: Option<B::BufU8>,
    bn_save: Option<(B::Buf, B::Buf)>,
}

/// Activations and gradients for one batch size (allocated once, reused
/// by every step with that batch size).
pub(crate) struct Workspace<B: Backend> {
    pub n: usize,
    pub training: bool,
    /// `acts[slot]`: slot 0 is the input; layer `i` reads `in_slot[i]` and
    /// writes `out_slot[i]`.
    pub acts: Vec<B::Buf>,
    /// Gradients, same slots (empty for inference workspaces).
    pub grads: Vec<B::Buf>,
    pub scratch: Vec<LayerWs<B>>,
    /// Per-sample losses `[n]`.
    pub losses: B::Buf,
    /// Probabilities `[n, outputs]` (the fused head's output).
    pub probs: B::Buf,
    /// Dense targets `[n, outputs]`.
    pub targets: B::Buf,
    /// Sparse targets `[n]`.
    pub labels: B::BufU32,
}

/// Whether a layer's activation runs in the GEMM epilogue (so the layer
/// keeps no pre-activation).
fn fused_epilogue(act: Act) -> bool {
    act.backward_from_output()
}

impl<B: Backend> Workspace<B> {
    pub fn new(
        backend: &B,
        layers: &[Layer<B>],
        plan: &Plan,
        input_len: usize,
        n: usize,
        training: bool,
    ) -> Result<Self> {
        let mut acts = Vec::with_capacity(plan.slot_len.len());
        for (s, &len) in plan.slot_len.iter().enumerate() {
            let per = if s == 0 { input_len } else { len };
            acts.push(backend.alloc_f32(n * per)?);
        }
        let mut grads = Vec::new();
        if training {
            for a in &acts {
                grads.push(backend.alloc_f32(backend.len_f32(a))?);
            }
        }
        let mut scratch = Vec::with_capacity(layers.len());
        for l in layers {
            let mut ws = LayerWs {
                pre: None,
                argmax: None,
                mask: None,
                bn_save: None,
            };
            match &l.kind {
                Kind::Dense { act, .. } | Kind::Conv { act, .. } if !fused_epilogue(*act) => {
                    let len = n * l.out_len();
                    ws.pre = Some((backend.alloc_f32(len)?, backend.alloc_f32(len)?));
                }
                Kind::Pool { .. } if training => {
                    ws.argmax = Some(backend.alloc_u32(n * l.out_len())?);
                }
                Kind::Dropout { .. } if training => {
                    ws.mask = Some(backend.alloc_u8(n * l.out_len())?);
                }
                Kind::Bn { bn } if training => {
                    ws.bn_save = Some((backend.alloc_f32(bn.c)?, backend.alloc_f32(bn.c)?));
                }
                _ => {}
            }
            scratch.push(ws);
        }
        let outputs = layers.last().map_or(input_len, |l| l.out_len());
        Ok(Workspace {
            n,
            training,
            acts,
            grads,
            scratch,
            losses: backend.alloc_f32(n)?,
            probs: backend.alloc_f32(n * outputs)?,
            targets: backend.alloc_f32(n * outputs)?,
            labels: backend.alloc_u32(n)?,
        })
    }
}

/// Which buffer each layer reads and writes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Plan {
    pub in_slot: Vec<usize>,
    pub out_slot: Vec<usize>,
    /// Elements per sample of each slot.
    pub slot_len: Vec<usize>,
}

impl Plan {
    pub fn new<B: Backend>(input_len: usize, layers: &[Layer<B>]) -> Self {
        let mut p = Plan {
            slot_len: vec![input_len],
            ..Default::default()
        };
        let mut cur = 0;
        for l in layers {
            p.in_slot.push(cur);
            if l.has_own_output() {
                p.slot_len.push(l.out_len());
                cur = p.slot_len.len() - 1;
            }
            p.out_slot.push(cur);
        }
        p
    }

    /// The slot holding the network's output.
    pub fn output_slot(&self) -> usize {
        self.out_slot.last().copied().unwrap_or(0)
    }
}

/// `(&v[i], &mut v[j])` for `i != j`.
fn split<T>(v: &mut [T], i: usize, j: usize) -> (&T, &mut T) {
    assert_ne!(i, j, "layer input and output share a buffer");
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&a[i], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&b[0], &mut a[j])
    }
}

/// `(&mut v[i], &mut v[j])` for `i != j`.
fn split_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j, "layer input and output share a buffer");
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
}

/// How a forward pass runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mode {
    /// Training (batch statistics, dropout, argmax kept) or inference.
    pub training: bool,
    /// The last layer outputs logits: its softmax / sigmoid is fused with
    /// the loss (or applied separately by `predict`).
    pub logits_out: bool,
    /// Dropout key and the step counter that feeds the Philox offset.
    pub dropout_seed: u64,
    pub step: u64,
}

/// The Philox offset of a dropout call: the step in the high bits, the
/// layer's index in the low 16, so no two calls share counters (the
/// clocked dropout kernel forms the same offset from the device's step,
/// `kernels/dropout.cu`).
pub(crate) fn dropout_offset(step: u64, layer: usize) -> u64 {
    (step << 16) | (layer as u64 & 0xffff)
}

/// Runs every layer on `ws.acts[0]` (already uploaded). With a `clock`
/// (a step being captured), dropout reads the step from the clock on the
/// device instead of taking `mode.step` by value.
pub(crate) fn forward<B: Backend>(
    backend: &B,
    layers: &mut [Layer<B>],
    plan: &Plan,
    ws: &mut Workspace<B>,
    mode: Mode,
    clock: Option<&B::StepClock>,
) -> Result<()> {
    let n = ws.n;
    let last = layers.len().saturating_sub(1);
    for (i, layer) in layers.iter_mut().enumerate() {
        let (si, so) = (plan.in_slot[i], plan.out_slot[i]);
        if si == so {
            continue; // Flatten
        }
        let (x, y) = split(&mut ws.acts, si, so);
        let sc = &mut ws.scratch[i];
        let strip = mode.logits_out && i == last;
        match &layer.kind {
            Kind::Dense {
                inputs,
                units,
                act,
                use_bias,
            } => {
                let g = Gemm::new(n, *units, *inputs);
                let w = &layer.params[0].value;
                let bias = if *use_bias {
                    Bias::PerCol(&layer.params[1].value)
                } else {
                    Bias::None
                };
                let act = if strip { Act::Linear } else { *act };
                run_with_act(backend, act, n, *units, &mut sc.pre, y, |out, a| {
                    backend.gemm(&g, x, w, out, bias, a)
                })?;
            }
            Kind::Conv {
                conv,
                act,
                use_bias,
            } => {
                let p = conv.with_batch(n);
                let w = &layer.params[0].value;
                let bias = if *use_bias {
                    Some(&layer.params[1].value)
                } else {
                    None
                };
                let act = if strip { Act::Linear } else { *act };
                run_with_act(backend, act, n, 0, &mut sc.pre, y, |out, a| {
                    backend.conv_forward(&p, x, w, bias, a, out)
                })?;
            }
            Kind::Pool { pool } => {
                let p = MaxPool2d { n, ..*pool };
                match (&mut sc.argmax, mode.training) {
                    (Some(am), true) => backend.maxpool_forward(&p, x, y, am)?,
                    _ => backend.maxpool_forward_inference(&p, x, y)?,
                }
            }
            Kind::Bn { bn } => {
                let p = BatchNorm { n, ..*bn };
                let [gamma, beta, mm, mv] = &mut layer.params[..] else {
                    unreachable!("batch normalization has four tensors")
                };
                match (&mut sc.bn_save, mode.training) {
                    (Some((sm, si)), true) => backend.batchnorm_forward_training(
                        &p,
                        x,
                        &gamma.value,
                        &beta.value,
                        y,
                        sm,
                        si,
                        &mut mm.value,
                        &mut mv.value,
                    )?,
                    _ => backend.batchnorm_forward_inference(
                        &p,
                        x,
                        &gamma.value,
                        &beta.value,
                        &mm.value,
                        &mv.value,
                        y,
                    )?,
                }
            }
            Kind::Dropout { rate } => match (&mut sc.mask, mode.training) {
                (Some(mask), true) => {
                    let len = n * layer.out_len();
                    match clock {
                        None => {
                            let p = DropoutOp::new(
                                len,
                                *rate,
                                mode.dropout_seed,
                                dropout_offset(mode.step, i),
                            )?;
                            backend.dropout_forward(&p, x, y, mask)?;
                        }
                        Some(c) => {
                            // The step's bits come from the clock.
                            let p = DropoutOp::new(
                                len,
                                *rate,
                                mode.dropout_seed,
                                dropout_offset(0, i),
                            )?;
                            backend.dropout_forward_clocked(&p, c, x, y, mask)?;
                        }
                    }
                }
                _ => backend.copy_f32(x, y)?,
            },
            Kind::Activation { act } => {
                if strip || *act == Act::Linear {
                    backend.copy_f32(x, y)?;
                } else if let Some(a) = act.elementwise() {
                    backend.activation_forward(a, x, y)?;
                } else {
                    backend.softmax_forward(&Softmax::new(n, layer.out_len())?, x, y)?;
                }
            }
            Kind::Flatten => {}
        }
    }
    Ok(())
}

/// Runs a GEMM-like op `f(out, epilogue_act)` and applies `act`: fused in
/// the epilogue when the backward can work from the output, else into the
/// pre-activation buffer followed by a separate activation / softmax.
fn run_with_act<B: Backend>(
    backend: &B,
    act: Act,
    n: usize,
    cols: usize,
    pre: &mut Option<(B::Buf, B::Buf)>,
    y: &mut B::Buf,
    f: impl FnOnce(&mut B::Buf, OpAct) -> Result<()>,
) -> Result<()> {
    if act == Act::Linear || fused_epilogue(act) {
        return f(y, act.elementwise().unwrap_or(OpAct::LINEAR));
    }
    let (z, _) = pre
        .as_mut()
        .ok_or_else(|| Error::Config("internal: missing pre-activation buffer".into()))?;
    f(z, OpAct::LINEAR)?;
    match act.elementwise() {
        Some(a) => backend.activation_forward(a, z, y),
        None => backend.softmax_forward(&Softmax::new(n, cols)?, z, y),
    }
}

/// Backpropagates `ws.grads[output slot]` (dL/d output, which the loss
/// wrote) through every layer, filling the parameter gradients. The input's
/// gradient is not computed.
pub(crate) fn backward<B: Backend>(
    backend: &B,
    layers: &mut [Layer<B>],
    plan: &Plan,
    ws: &mut Workspace<B>,
    mode: Mode,
) -> Result<()> {
    let n = ws.n;
    let last = layers.len().saturating_sub(1);
    for (i, layer) in layers.iter_mut().enumerate().rev() {
        let (si, so) = (plan.in_slot[i], plan.out_slot[i]);
        if si == so {
            continue;
        }
        let need_dx = si != 0;
        let strip = mode.logits_out && i == last;
        let x = &ws.acts[si];
        let y = &ws.acts[so];
        let sc = &mut ws.scratch[i];
        let (gx, gy) = split_mut(&mut ws.grads, si, so);
        match &layer.kind {
            Kind::Dense {
                inputs,
                units,
                act,
                use_bias,
            } => {
                let act = if strip { Act::Linear } else { *act };
                let dz = act_backward(backend, act, n, *units, &mut sc.pre, y, gy)?;
                let (w, rest) = layer.params.split_at_mut(1);
                let w = &mut w[0];
                let dw = w.grad.as_mut().expect("kernel is trainable");
                // dW = x^T dz: [inputs, n] x [n, units].
                let gw = Gemm::new(*inputs, *units, n).transpose(true, false);
                backend.gemm(&gw, x, dz, dw, Bias::None, OpAct::LINEAR)?;
                if *use_bias {
                    let db = rest[0].grad.as_mut().expect("bias is trainable");
                    backend.bias_backward(&BiasShape::dense(n, *units)?, dz, db)?;
                }
                if need_dx {
                    // dx = dz W^T: [n, units] x [units, inputs].
                    let gx_p = Gemm::new(n, *inputs, *units).transpose(false, true);
                    backend.gemm(&gx_p, dz, &w.value, gx, Bias::None, OpAct::LINEAR)?;
                }
            }
            Kind::Conv {
                conv,
                act,
                use_bias,
            } => {
                let p = conv.with_batch(n);
                let act = if strip { Act::Linear } else { *act };
                let dz = act_backward(backend, act, n, 0, &mut sc.pre, y, gy)?;
                let (w, rest) = layer.params.split_at_mut(1);
                let w = &mut w[0];
                let dw = w.grad.as_mut().expect("kernel is trainable");
                backend.conv_backward_filter(&p, x, dz, dw)?;
                if *use_bias {
                    let db = rest[0].grad.as_mut().expect("bias is trainable");
                    let bs = BiasShape::conv(n, p.k, p.out_h * p.out_w)?;
                    backend.bias_backward(&bs, dz, db)?;
                }
                if need_dx {
                    backend.conv_backward_data(&p, dz, &w.value, gx)?;
                }
            }
            Kind::Pool { pool } => {
                if need_dx {
                    let p = MaxPool2d { n, ..*pool };
                    let am = sc.argmax.as_ref().expect("training workspace");
                    backend.maxpool_backward(&p, gy, am, gx)?;
                }
            }
            Kind::Bn { bn } => {
                let p = BatchNorm { n, ..*bn };
                let (sm, sinv) = sc.bn_save.as_ref().expect("training workspace");
                let [gamma, beta, _, _] = &mut layer.params[..] else {
                    unreachable!("batch normalization has four tensors")
                };
                backend.batchnorm_backward(
                    &p,
                    x,
                    gy,
                    &gamma.value,
                    sm,
                    sinv,
                    gx,
                    gamma.grad.as_mut().expect("gamma is trainable"),
                    beta.grad.as_mut().expect("beta is trainable"),
                )?;
            }
            Kind::Dropout { rate } => {
                if need_dx {
                    let mask = sc.mask.as_ref().expect("training workspace");
                    let p = DropoutOp::new(
                        n * layer.out_len(),
                        *rate,
                        mode.dropout_seed,
                        dropout_offset(mode.step, i),
                    )?;
                    backend.dropout_backward(&p, gy, mask, gx)?;
                }
            }
            Kind::Activation { act } => {
                if need_dx {
                    if strip || *act == Act::Linear {
                        backend.copy_f32(gy, gx)?;
                    } else if let Some(a) = act.elementwise() {
                        backend.copy_f32(gy, gx)?;
                        backend.activation_backward_inplace(a, x, y, gx)?;
                    } else {
                        let p = Softmax::new(n, layer.out_len())?;
                        backend.softmax_backward(&p, y, gy, gx)?;
                    }
                }
            }
            Kind::Flatten => {}
        }
    }
    Ok(())
}

/// Turns dL/dy (`gy`) into dL/d(pre-activation) and returns the buffer
/// holding it: `gy` itself (updated in place) or the pre-activation
/// gradient buffer (softmax).
fn act_backward<'a, B: Backend>(
    backend: &B,
    act: Act,
    n: usize,
    cols: usize,
    pre: &'a mut Option<(B::Buf, B::Buf)>,
    y: &B::Buf,
    gy: &'a mut B::Buf,
) -> Result<&'a B::Buf> {
    if act == Act::Linear {
        return Ok(gy);
    }
    if fused_epilogue(act) {
        let a = act
            .elementwise()
            .expect("fused activations are element-wise");
        backend.activation_backward_from_output(a, y, gy)?;
        return Ok(gy);
    }
    let (z, dz) = pre
        .as_mut()
        .ok_or_else(|| Error::Config("internal: missing pre-activation buffer".into()))?;
    match act.elementwise() {
        Some(a) => {
            backend.activation_backward_inplace(a, z, y, gy)?;
            Ok(gy)
        }
        None => {
            backend.softmax_backward(&Softmax::new(n, cols)?, y, gy, dz)?;
            Ok(dz)
        }
    }
}
