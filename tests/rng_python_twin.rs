//! The Python twin of kestrel's generator (`benches/pytorch_cifar.py`)
//! against `kestrel::nn::Rng` and kestrel's own models.
//!
//! The PyTorch side-by-side runs reproduce kestrel's initial weights and
//! batch order by reimplementing xoshiro256** in Python; this test holds the
//! values that script printed (`tests/fixtures/rng_twin.json`) to what the
//! Rust code computes now: raw draws, `below` (its rejection path included),
//! shuffles, f32 uniforms, the keras-cnn / elu-cnn initial kernels built by
//! `Sequential`, the generator state after the initialization draws (read
//! from a checkpoint), the first epochs' permutations, one shuffle per
//! epoch in `fit`, and the augmentation draws. Every expected value comes
//! from the fixture; nothing is hard-coded here.
//!
//! Regenerate the fixture after changing the generator, the init order, or
//! the augmentation draws (and update the Python script to match first):
//!
//!     python3 benches/pytorch_cifar.py --write-fixture tests/fixtures/rng_twin.json

use std::collections::HashMap;

use kestrel::backend::CpuBackend;
use kestrel::nn::{Act, Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Rng, Sequential};
use kestrel::ops::optim::Optimizer;
use kestrel::train::{FitOptions, Loss, Targets};

/// The fixture: one `"key": "value"` per line (written by the script).
struct Fixture {
    order: Vec<String>,
    map: HashMap<String, String>,
}

impl Fixture {
    fn load() -> Fixture {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rng_twin.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut order = Vec::new();
        let mut map = HashMap::new();
        for line in text.lines() {
            let line = line.trim().trim_end_matches(',');
            let Some(rest) = line.strip_prefix('"') else {
                continue;
            };
            let (key, value) = rest
                .split_once("\": \"")
                .unwrap_or_else(|| panic!("{path}: cannot read the line {line:?}"));
            let value = value
                .strip_suffix('"')
                .unwrap_or_else(|| panic!("{path}: unterminated value in {line:?}"));
            order.push(key.to_string());
            map.insert(key.to_string(), value.to_string());
        }
        assert!(map.len() > 50, "{path}: only {} values", map.len());
        Fixture { order, map }
    }

    fn get(&self, key: &str) -> &str {
        self.map.get(key).unwrap_or_else(|| {
            panic!("fixture has no {key:?}; regenerate it (see the module docs)")
        })
    }

    fn hex(&self, key: &str) -> Vec<u64> {
        self.get(key)
            .split(',')
            .map(|s| u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("{key}: bad hex {s:?}")))
            .collect()
    }

    fn dec<T: std::str::FromStr>(&self, key: &str) -> Vec<T> {
        self.get(key)
            .split(',')
            .map(|s| {
                s.parse()
                    .unwrap_or_else(|_| panic!("{key}: bad number {s:?}"))
            })
            .collect()
    }

    fn state(&self, key: &str) -> [u64; 4] {
        self.hex(key)
            .try_into()
            .unwrap_or_else(|_| panic!("{key}: expected 4 words"))
    }
}

fn hexs(v: &[u64]) -> String {
    v.iter()
        .map(|x| format!("{x:016x}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Raw draws, f64 / f32 conversions, `below` and `shuffle`, per seed, in the
/// order the script drew them from one generator.
#[test]
fn raw_draws_match_python() {
    let f = Fixture::load();
    let seeds: Vec<u64> = f
        .order
        .iter()
        .filter_map(|k| k.strip_prefix("seed")?.strip_suffix(".state")?.parse().ok())
        .collect();
    assert!(seeds.len() >= 3, "fixture seeds: {seeds:?}");
    for seed in seeds {
        let tag = format!("seed{seed}");
        let mut r = Rng::new(seed);
        assert_eq!(
            hexs(&r.state()),
            f.get(&format!("{tag}.state")),
            "{tag}: SplitMix64 seeding"
        );
        let u: Vec<u64> = (0..8).map(|_| r.next_u64()).collect();
        assert_eq!(u, f.hex(&format!("{tag}.u64")), "{tag}: next_u64");
        let d: Vec<u64> = (0..4).map(|_| r.next_f64().to_bits()).collect();
        assert_eq!(d, f.hex(&format!("{tag}.f64_bits")), "{tag}: next_f64");
        let un: Vec<u64> = (0..4)
            .map(|_| r.uniform(-0.25, 0.75).to_bits() as u64)
            .collect();
        assert_eq!(
            un,
            f.hex(&format!("{tag}.uniform_bits")),
            "{tag}: uniform(-0.25, 0.75)"
        );
        let prefix = format!("{tag}.below.");
        let below_keys: Vec<&String> = f.order.iter().filter(|k| k.starts_with(&prefix)).collect();
        assert!(below_keys.len() >= 5);
        for key in below_keys {
            let n: u64 = key[prefix.len()..].parse().unwrap();
            let got: Vec<u64> = (0..6).map(|_| r.below(n)).collect();
            assert_eq!(got, f.dec::<u64>(key), "{key}");
        }
        let mut p: Vec<usize> = (0..10).collect();
        r.shuffle(&mut p);
        assert_eq!(
            p,
            f.dec::<usize>(&format!("{tag}.shuffle10")),
            "{tag}: shuffle"
        );
        assert_eq!(
            hexs(&r.state()),
            f.get(&format!("{tag}.state_after")),
            "{tag}: state after all draws"
        );
    }
}

fn keras_cnn() -> Vec<kestrel::nn::LayerSpec> {
    vec![
        Conv2D::new(32, 3).same().activation(Act::Relu).into(),
        Conv2D::new(32, 3).activation(Act::Relu).into(),
        MaxPooling2D::new(2).into(),
        Dropout::new(0.25).into(),
        Conv2D::new(64, 3).same().activation(Act::Relu).into(),
        Conv2D::new(64, 3).activation(Act::Relu).into(),
        MaxPooling2D::new(2).into(),
        Dropout::new(0.25).into(),
        Flatten.into(),
        Dense::new(512).activation(Act::Relu).into(),
        Dropout::new(0.5).into(),
        Dense::new(10).activation(Act::Softmax).into(),
    ]
}

fn elu_cnn() -> Vec<kestrel::nn::LayerSpec> {
    let mut v = Vec::new();
    for f in [128, 256, 512] {
        v.push(Conv2D::new(f, 3).same().activation(Act::ELU).into());
        v.push(Conv2D::new(f, 3).activation(Act::ELU).into());
        v.push(MaxPooling2D::new(2).into());
        v.push(Dropout::new(0.25).into());
    }
    v.push(Flatten.into());
    v.push(Dense::new(1024).activation(Act::ELU).into());
    v.push(Dropout::new(0.5).into());
    v.push(Dense::new(10).activation(Act::Softmax).into());
    v
}

fn model(layers: Vec<kestrel::nn::LayerSpec>, seed: u64) -> Sequential<CpuBackend> {
    let mut m = Sequential::new(CpuBackend, seed);
    for l in layers {
        m.add(l);
    }
    m.build(&[3, 32, 32]).unwrap();
    m.compile(
        Optimizer::rmsprop(1e-4).unwrap().with_decay(1e-6).unwrap(),
        Loss::SparseCategoricalCrossentropy,
        &[],
    )
    .unwrap();
    m
}

/// The model generator's state, read from a checkpoint's metadata
/// (`"rng": "hex,hex,hex,hex"` in the safetensors header).
fn rng_state_of(m: &Sequential<CpuBackend>, tag: &str) -> [u64; 4] {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("{tag}.safetensors"));
    m.save_checkpoint(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let at = header
        .find("\"rng\":\"")
        .unwrap_or_else(|| panic!("no rng in the checkpoint metadata: {header:.300}"));
    let rest = &header[at + 7..];
    let v: Vec<u64> = rest[..rest.find('"').unwrap()]
        .split(',')
        .map(|s| u64::from_str_radix(s, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// The initial kernels `Sequential` builds, and the generator state after
/// them (where `fit`'s first shuffle starts), against the script's; then
/// the first two epochs' permutations of the 50,000 training images.
fn check_model(
    f: &Fixture,
    run: &str,
    layers: Vec<kestrel::nn::LayerSpec>,
) -> Sequential<CpuBackend> {
    let prefix = format!("{run}.");
    let tag = f
        .order
        .iter()
        .find(|k| k.starts_with(&prefix) && k.ends_with(".params"))
        .map(|k| k.trim_end_matches(".params").to_string())
        .unwrap_or_else(|| panic!("fixture has no {run}.*.params"));
    let seed: u64 = tag.rsplit_once(".seed").unwrap().1.parse().unwrap();
    let m = model(layers, seed);
    assert_eq!(
        m.count_params().0,
        f.dec::<usize>(&format!("{tag}.params"))[0],
        "{tag}: parameter count"
    );
    let info = m.params();
    let weights = m.get_weights().unwrap();
    let kernels: Vec<(&kestrel::nn::ParamInfo, &Vec<f32>)> = info
        .iter()
        .zip(&weights)
        .filter(|(p, _)| p.name.ends_with("/kernel"))
        .collect();
    for (i, (p, w)) in kernels.iter().enumerate() {
        let k = format!("{tag}.kernel{i}");
        assert_eq!(
            p.shape,
            f.dec::<usize>(&format!("{k}.shape")),
            "{k} ({}): shape",
            p.name
        );
        let first: Vec<u64> = w.iter().take(4).map(|v| v.to_bits() as u64).collect();
        assert_eq!(
            first,
            f.hex(&format!("{k}.first_bits")),
            "{k} ({}): first values",
            p.name
        );
        let sum: f64 = w.iter().map(|&v| v as f64).sum();
        assert_eq!(
            format!("{:016x}", sum.to_bits()),
            f.get(&format!("{k}.sum_bits")),
            "{k} ({}): f64 sum of every value, in order",
            p.name
        );
    }
    assert!(
        f.map
            .contains_key(&format!("{tag}.kernel{}.shape", kernels.len() - 1))
    );
    assert!(
        !f.map
            .contains_key(&format!("{tag}.kernel{}.shape", kernels.len()))
    );
    for (p, w) in info.iter().zip(&weights) {
        if p.name.ends_with("/bias") {
            assert!(w.iter().all(|&v| v == 0.0), "{}: zero biases", p.name);
        }
    }
    let after_init = f.state(&format!("{tag}.state_after_init"));
    assert_eq!(
        rng_state_of(&m, run),
        after_init,
        "{tag}: the model's generator after the init draws"
    );
    // fit: a fresh 0..n shuffled by that generator, every epoch.
    let mut r = Rng::from_state(after_init);
    let mut idx: Vec<usize> = (0..50_000).collect();
    r.shuffle(&mut idx);
    assert_eq!(
        idx[..16],
        f.dec::<usize>(&format!("{tag}.epoch1_perm_first16"))[..],
        "{tag}: epoch 1 permutation"
    );
    assert_eq!(
        idx[50_000 - 4..],
        f.dec::<usize>(&format!("{tag}.epoch1_perm_last4"))[..],
        "{tag}: epoch 1 permutation (end)"
    );
    let mut idx: Vec<usize> = (0..50_000).collect();
    r.shuffle(&mut idx);
    assert_eq!(
        idx[..16],
        f.dec::<usize>(&format!("{tag}.epoch2_perm_first16"))[..],
        "{tag}: epoch 2 permutation"
    );
    m
}

#[test]
fn keras_cnn_init_and_fit_order_match_python() {
    let f = Fixture::load();
    let mut m = check_model(&f, "c1", keras_cnn());
    // fit draws exactly one shuffle of 0..n per epoch from the same
    // generator, after the init draws (5 samples, 2 epochs).
    let x: Vec<f32> = (0..5 * 3 * 32 * 32)
        .map(|i| (i % 251) as f32 / 251.0)
        .collect();
    let y: Vec<u32> = vec![0, 1, 2, 3, 4];
    m.fit(
        &x,
        Targets::Sparse(&y),
        FitOptions {
            batch_size: 32,
            epochs: 2,
            verbose: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let key = "c1.keras-cnn.seed2.state_after_init_fit5x2";
    assert_eq!(rng_state_of(&m, "fit"), f.state(key), "{key}");
}

#[test]
fn elu_cnn_init_matches_python() {
    let f = Fixture::load();
    check_model(&f, "c11", elu_cnn());
}

/// The augmentation draws of `src/run/augment.rs` (the CLI's augmenter):
/// generator `seed ^ 0xa06_3e47`, per sample `dy`, `dx` (whole pixels,
/// `round((2u - 1) * range * size)`, f64 rounding half away from zero), flip
/// (`u < 0.5`); CIFAR-10 sizes and ranges (0.1 of 32 pixels).
#[test]
fn augmentation_draws_match_python() {
    let f = Fixture::load();
    let key = f
        .order
        .iter()
        .find(|k| k.starts_with("c11a.augment.seed") && k.ends_with(".dy"))
        .expect("fixture has no c11a.augment.*");
    let tag = key.trim_end_matches(".dy");
    let seed: u64 = tag.rsplit_once(".seed").unwrap().1.parse().unwrap();
    let (dy, dx, fl) = (
        f.dec::<i64>(&format!("{tag}.dy")),
        f.dec::<i64>(&format!("{tag}.dx")),
        f.dec::<u8>(&format!("{tag}.flip")),
    );
    let mut r = Rng::new(seed ^ 0xa06_3e47);
    let shift = |u: f64| ((2.0 * u - 1.0) * 0.1 * 32.0).round() as i64;
    for k in 0..dy.len() {
        let (a, b, c) = (r.next_f64(), r.next_f64(), r.next_f64());
        assert_eq!(
            (shift(a), shift(b), (c < 0.5) as u8),
            (dy[k], dx[k], fl[k]),
            "sample {k}"
        );
    }
}
