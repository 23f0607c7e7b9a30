//! Synthetic data sets for the workflows whose data are not shipped
//! (seed 001's tabular set, seed 004's IMDB and Boston housing).
//!
//! Every set is a pure function of its parameters and a seed (drawn with
//! [`crate::nn::Rng`], normals by Box-Muller): the same config gives the same
//! numbers on every machine. Features are standard normal, `x ~ N(0, I_d)`;
//! the "teacher" (the hidden rule that makes the targets) is drawn first
//! from the same generator, then the training samples, then the test
//! samples, so the two sets share one rule.
//!
//! - `two_class` (seed 001): `w ~ N(0, I)/sqrt(d)`; score
//!   `s = w.x + 0.5 * x0 * x1 + noise * e`, `e ~ N(0, 1)`; class `s > 0`
//!   (one-hot or index targets, 2 classes). The label noise keeps the best
//!   possible accuracy well below 100% (the s001 configs, `noise = 1`, reach
//!   about 80%), so the curves plateau as the seed's do.
//! - `multiclass` (seed 004, in place of MNIST): `classes` centres
//!   `c_k ~ 2 * N(0, I)`; a sample picks its class uniformly and is
//!   `c_k + noise * N(0, I)`.
//! - `binary` (seed 004, in place of IMDB): as `two_class`, but the target
//!   is one value, 0.0 or 1.0 (for a sigmoid head and binary cross-entropy).
//! - `regression` (seed 004, in place of Boston housing): `y = 3 + 2 w.x +
//!   sin(2 x0) + noise * e`, one real target (linear head, mse, mae).

use crate::error::Result;
use crate::nn::Rng;
use crate::run::config::{DataConfig, DatasetKind};

/// Targets as a data set holds them.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetData {
    /// Class indices and the class count.
    Classes(Vec<u32>, usize),
    /// Real targets, `width` per sample.
    Real(Vec<f32>, usize),
}

impl TargetData {
    /// Samples.
    pub fn len(&self) -> usize {
        match self {
            TargetData::Classes(y, _) => y.len(),
            TargetData::Real(y, w) => y.len() / (*w).max(1),
        }
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `[from, to)`.
    pub fn slice(&self, from: usize, to: usize) -> TargetData {
        match self {
            TargetData::Classes(y, c) => TargetData::Classes(y[from..to].to_vec(), *c),
            TargetData::Real(y, w) => TargetData::Real(y[from * w..to * w].to_vec(), *w),
        }
    }
}

/// Inputs and targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// `[n, sample...]` row-major.
    pub x: Vec<f32>,
    /// The targets.
    pub y: TargetData,
}

impl Split {
    /// Samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Splits off the first `k` samples: `(first k, rest)`.
    pub fn split_first(&self, k: usize, per: usize) -> (Split, Split) {
        let n = self.len();
        (
            Split {
                x: self.x[..k * per].to_vec(),
                y: self.y.slice(0, k),
            },
            Split {
                x: self.x[k * per..].to_vec(),
                y: self.y.slice(k, n),
            },
        )
    }
}

fn normals(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

/// Generates `(train, test)` for a synthetic `[data]` table (validated
/// beforehand: `samples`, `test_samples`, `features` set; `classes` for
/// multiclass). `default_seed` is used when the table has no `seed`.
pub fn generate(d: &DataConfig, default_seed: u64) -> Result<(Split, Split)> {
    let seed = d.seed.unwrap_or(default_seed);
    let mut rng = Rng::new(seed ^ 0x5eed_da7a);
    let f = d.features.unwrap_or(1).max(1);
    let (n_train, n_test) = (d.samples.unwrap_or(0), d.test_samples.unwrap_or(0));
    let noise = d.noise.unwrap_or(1.0);
    let scale = 1.0 / (f as f64).sqrt();
    let w: Vec<f64> = normals(&mut rng, f).iter().map(|v| v * scale).collect();
    let dot = |x: &[f64]| -> f64 { x.iter().zip(&w).map(|(a, b)| a * b).sum() };
    let classes = d.classes.unwrap_or(2);
    let centres: Vec<f64> = match d.dataset {
        DatasetKind::SyntheticMulticlass => normals(&mut rng, classes * f)
            .iter()
            .map(|v| 2.0 * v)
            .collect(),
        _ => Vec::new(),
    };
    let make = |n: usize, rng: &mut Rng| -> Split {
        let mut xs = Vec::with_capacity(n * f);
        let mut labels = Vec::new();
        let mut reals = Vec::new();
        for _ in 0..n {
            let x: Vec<f64> = match d.dataset {
                DatasetKind::SyntheticMulticlass => {
                    let k = rng.below(classes as u64) as usize;
                    labels.push(k as u32);
                    let e = normals(rng, f);
                    (0..f).map(|j| centres[k * f + j] + noise * e[j]).collect()
                }
                _ => normals(rng, f),
            };
            let e = rng.normal();
            let x1 = if f > 1 { x[1] } else { 0.0 };
            match d.dataset {
                DatasetKind::SyntheticTwoClass => {
                    labels.push((dot(&x) + 0.5 * x[0] * x1 + noise * e > 0.0) as u32)
                }
                DatasetKind::SyntheticBinary => {
                    reals.push((dot(&x) + 0.5 * x[0] * x1 + noise * e > 0.0) as u32 as f32)
                }
                DatasetKind::SyntheticRegression => {
                    reals.push((3.0 + 2.0 * dot(&x) + (2.0 * x[0]).sin() + noise * e) as f32)
                }
                _ => {}
            }
            xs.extend(x.iter().map(|&v| v as f32));
        }
        let y = match d.dataset {
            DatasetKind::SyntheticTwoClass => TargetData::Classes(labels, 2),
            DatasetKind::SyntheticMulticlass => TargetData::Classes(labels, classes),
            _ => TargetData::Real(reals, 1),
        };
        Split { x: xs, y }
    };
    let train = make(n_train, &mut rng);
    let test = make(n_test, &mut rng);
    Ok((train, test))
}
