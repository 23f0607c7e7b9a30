//! Model building: summaries with Keras's exact parameter counts, shape
//! errors naming the layer, and a whole-model gradient check.
mod common;

use common::Rng;
use kestrel::backend::CpuBackend;
use kestrel::nn::{
    Act, Activation, BatchNormalization, Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential,
};
use kestrel::ops::optim::Optimizer;
use kestrel::train::{Loss, Metric, Targets};

fn keras_cnn() -> Sequential<CpuBackend> {
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Conv2D::new(32, 3).same().activation(Act::Relu))
        .add(Conv2D::new(32, 3).activation(Act::Relu))
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.25))
        .add(Conv2D::new(64, 3).same().activation(Act::Relu))
        .add(Conv2D::new(64, 3).activation(Act::Relu))
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.25))
        .add(Flatten)
        .add(Dense::new(512).activation(Act::Relu))
        .add(Dropout::new(0.5))
        .add(Dense::new(10).activation(Act::Softmax));
    m.build(&[3, 32, 32]).unwrap();
    m
}

#[test]
fn summary_keras_cnn() {
    let m = keras_cnn();
    let s = m.summary();
    assert!(s.contains("Total params: 1,250,858\n"), "{s}");
    assert!(s.contains("Trainable params: 1,250,858\n"), "{s}");
    assert!(s.contains("Non-trainable params: 0\n"), "{s}");
    // Keras 2.3.1's layout: columns at 29 and 55, line length 65.
    assert!(
        s.contains("conv2d (Conv2D)              (None, 32, 32, 32)        896       \n"),
        "{s}"
    );
    assert!(s.contains("conv2d_1 (Conv2D)            (None, 30, 30, 32)        9248"));
    assert!(s.contains("max_pooling2d_1 (MaxPooling2 (None, 6, 6, 64)          0"));
    assert!(s.contains("flatten (Flatten)            (None, 2304)              0"));
    assert!(s.contains("dense (Dense)                (None, 512)               1180160"));
    assert!(s.contains("dropout_2 (Dropout)          (None, 512)               0"));
    assert!(s.contains("dense_1 (Dense)              (None, 10)                5130"));
    assert!(s.starts_with(
        "Model: \"sequential\"\n_________________________________________________________________\n\
         Layer (type)                 Output Shape              Param #   \n\
         =================================================================\n"
    ));
    for line in s.lines().skip(1) {
        assert!(line.len() <= 65, "line longer than 65: {line:?}");
    }
}

fn mlp(bn: bool) -> Sequential<CpuBackend> {
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Flatten);
    if bn {
        m.add(BatchNormalization::new());
    }
    m.add(Dense::new(300).activation(Act::Relu));
    if bn {
        m.add(BatchNormalization::new());
    }
    m.add(Dense::new(100).activation(Act::Relu));
    if bn {
        m.add(BatchNormalization::new());
    }
    m.add(Dense::new(10).activation(Act::Softmax));
    m.build(&[1, 28, 28]).unwrap();
    m
}

#[test]
fn summary_mlp_and_f4() {
    let s = mlp(false).summary();
    assert!(s.contains("Total params: 266,610\n"), "{s}");
    assert!(s.contains("Trainable params: 266,610\n"), "{s}");
    assert!(s.contains("Non-trainable params: 0\n"), "{s}");
    assert!(s.contains("flatten (Flatten)            (None, 784)               0"));
    let m = mlp(true);
    let s = m.summary();
    assert!(s.contains("Total params: 271,346\n"), "{s}");
    assert!(s.contains("Trainable params: 268,978\n"), "{s}");
    assert!(s.contains("Non-trainable params: 2,368\n"), "{s}");
    assert!(s.contains("batch_normalization (BatchNo (None, 784)               3136"));
    assert!(s.contains("batch_normalization_2 (Batch (None, 100)               400"));
    assert_eq!(m.count_params(), (271_346, 268_978, 2_368));
    let names: Vec<String> = m.params().into_iter().map(|p| p.name).collect();
    assert!(names.contains(&"batch_normalization/moving_mean".to_string()));
    assert!(names.contains(&"dense_2/kernel".to_string()));
}

#[test]
fn shape_mismatch_names_the_layer() {
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Conv2D::new(32, 3).activation(Act::Relu))
        .add(Conv2D::new(64, 3))
        .add(MaxPooling2D::new(2))
        .add(Dense::new(10));
    let e = m.build(&[1, 30, 30]).unwrap_err().to_string();
    assert!(
        e.contains("dense (Dense): expected a flat input, got (None, 13, 13, 64)"),
        "{e}"
    );
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Dense::new(4))
        .add(Dense::new(4))
        .add(Dense::new(4))
        .add(Conv2D::new(2, 3));
    let e = m.build(&[8]).unwrap_err().to_string();
    assert!(
        e.contains("conv2d (Conv2D): expected an image input"),
        "{e}"
    );
    assert!(e.contains("got (None, 4)"), "{e}");
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Conv2D::new(2, 5));
    let e = m.build(&[1, 3, 3]).unwrap_err().to_string();
    assert!(
        e.contains("conv2d (Conv2D)") && e.contains("kernel height 5"),
        "{e}"
    );
    // A rate of 1 is rejected at build time, naming the layer.
    let mut m = Sequential::new(CpuBackend, 1);
    m.add(Flatten).add(Dropout::new(1.0));
    let e = m.build(&[2]).unwrap_err().to_string();
    assert!(e.contains("dropout (Dropout)") && e.contains("rate"), "{e}");
}

/// f32 forward, f64 central differences of the f32 loss: the loss (~1) is
/// summed in f64 from f32 per-sample values accurate to ~1e-7 relative, so
/// with h = 1e-3 the difference quotient carries ~1e-7/2e-3 = 5e-5 (a few
/// times that after the network's rounding) of noise, and the O(h^2)
/// truncation is ~1e-6 relative. h is kept small so that no max-pool window
/// changes its argmax between x - h and x + h (with h = 1e-2 one did: a
/// kink, not a gradient error). 2e-3 absolute + 2e-2 relative leaves a
/// margin while a wrong gradient (a missing term, a transposed kernel) is
/// off by O(1).
const GRAD_TOL: common::Tol = common::Tol::new(2e-3, 2e-2);

#[test]
fn whole_model_gradient_check() {
    let mut m = Sequential::new(CpuBackend, 7);
    m.add(Conv2D::new(3, 3).same().activation(Act::Tanh))
        .add(BatchNormalization::new())
        .add(MaxPooling2D::new(2))
        .add(Dropout::new(0.5))
        .add(Flatten)
        .add(Dense::new(5).activation(Act::ELU))
        .add(Dense::new(4))
        .add(Activation(Act::Softmax));
    m.build(&[2, 6, 6]).unwrap();
    m.compile(
        Optimizer::sgd(0.01, 0.0, false).unwrap(),
        Loss::CategoricalCrossentropy,
        &[Metric::Accuracy],
    )
    .unwrap();
    let n = 5;
    let mut rng = Rng::new(3);
    let x = rng.vec(n * 2 * 6 * 6, -1.0, 1.0);
    let mut y = vec![0.0f32; n * 4];
    for i in 0..n {
        y[i * 4 + rng.below(4)] = 1.0;
    }
    let weights = m.get_weights().unwrap();
    let (_, grads) = m.compute_gradients(&x, Targets::Dense(&y)).unwrap();
    let info = m.params();
    let h = 1e-3f32;
    let mut checked = 0;
    for (name, g) in &grads {
        let ti = info.iter().position(|p| &p.name == name).unwrap();
        let mut fd = vec![0.0f64; g.len()];
        for (j, fdj) in fd.iter_mut().enumerate() {
            let mut loss_at = |delta: f32| {
                let mut w = weights.clone();
                w[ti][j] += delta;
                m.set_weights(&w).unwrap();
                m.compute_gradients(&x, Targets::Dense(&y)).unwrap().0
            };
            *fdj = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
        }
        common::assert_close(name, g, &fd, GRAD_TOL);
        checked += 1;
    }
    // conv kernel+bias, bn gamma+beta, two dense kernels+biases.
    assert_eq!(checked, 8);
    // The dropout layer did drop something (the mask is fixed across calls).
    m.set_weights(&weights).unwrap();
}
