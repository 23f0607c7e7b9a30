#!/usr/bin/env python3
"""The CIFAR-10 runs of SEED_RUNS.md (c1..c11) in PyTorch, side by side with kestrel.

Everything that can be the same as in `kestrel train configs/<run>.toml` is:

- the network (keras-cnn / elu-cnn, the exact layer list; Flatten over NCHW,
  which is PyTorch's natural order and kestrel's);
- the initial weights, bit for bit: kestrel's generator (xoshiro256**
  seeded by SplitMix64, `src/nn/rng.rs`) is reimplemented here, and the
  kernels are drawn from it in kestrel's order (layer by layer, glorot_uniform
  with fan_in = in*kh*kw, fan_out = out*kh*kw, `uniform(-limit, limit)`
  computed in f64 and rounded to f32; biases zero, no draws);
- the order of the training samples: after the initialization draws, the
  *same* generator shuffles a fresh `0..n` at the start of every epoch
  (Fisher-Yates from the end, `below(i + 1)`, rejection sampling), exactly as
  `Sequential::fit` does, so every batch holds the same images as kestrel's;
- the augmentation draws (c11a): a second generator seeded `seed ^ 0xa063e47`
  draws, per sample in batch order, the vertical shift, the horizontal shift
  and the flip; shifts are whole pixels `round((2u - 1) * 0.1 * 32)` (round
  half away from zero), nearest fill, flip after the shift (kestrel's
  `src/run/augment.rs`);
- the optimizer: Keras 2 semantics implemented here (NOT torch.optim):
  `lr_t = lr / (1 + decay * iterations)` (f64, rounded to f32), RMSprop
  `a = rho*a + (1-rho)*g^2; p -= lr_t*g / (sqrt(a) + eps)`, SGD / momentum /
  Nesterov, Adagrad, Adam, element operations in kestrel's order;
- the loss (softmax cross-entropy from the logits, batch mean), accuracy
  (argmax, first maximum), Keras's EarlyStopping(val_acc, patience 5,
  min_delta 0, no restore), validation on the test set after every epoch
  (inference mode, batches of 32), the data (the binary CIFAR-10 files of
  `cifar10_to_bin.py`, pixels / 255 in f32, training files 1..5 in order).

What differs: the dropout masks (kestrel draws them with Philox4x32-10,
PyTorch with its own generator) and the floating-point rounding of the
convolutions and GEMMs (cuDNN / cuBLAS algorithms). The two runs therefore
start from the same point and see the same batches, and drift apart as the
differences accumulate: compare the curves, not the bits.

Precision: TF32 is switched off (kestrel computes in f32) unless --tf32;
cuDNN is deterministic unless --fast (benchmark mode).

Usage:

    python3 benches/pytorch_cifar.py --run c1 --data DIR --out OUT [--device cuda]
        [--resume] [--time-budget SECONDS] [--epochs N] [--seed S]
    python3 benches/pytorch_cifar.py --selftest [--seed S]
    python3 benches/pytorch_cifar.py --write-fixture tests/fixtures/rng_twin.json
    python3 benches/pytorch_cifar.py --run c1 --device cpu --synthetic 96 --max-steps 3 --out /tmp/smoke

Runs: c1..c10 (keras-cnn, as configs/c*-keras-cnn-*.toml), c11 (elu-cnn, no
augmentation), c11a (elu-cnn with augmentation).

OUT receives result.json (status, test accuracy per epoch, best epoch,
seconds per epoch, device, torch version, the recipe), history.json and
history.csv (the learning curves), checkpoint.pt (written atomically after
every epoch; --resume continues from it) and log.txt. With --time-budget
the run stops by itself, after a checkpoint, before the next epoch would
end past the budget (status "interrupted", exit code 75); SIGINT / SIGTERM
stop it at the end of the current epoch the same way (twice: at once).

Needs only torch and numpy to train; --selftest and --write-fixture need
neither (numpy, when present, is cross-checked against the pure-Python
generator).

The fixture tests/fixtures/rng_twin.json is this script's output, checked by
`cargo test --release --test rng_python_twin` against kestrel::nn::Rng and
kestrel's own models. Regenerate it after any change to the generator, the
init order or the augmentation draws:

    python3 benches/pytorch_cifar.py --write-fixture tests/fixtures/rng_twin.json
"""

import argparse
import hashlib
import json
import math
import os
import signal
import struct
import sys
import time

MASK64 = (1 << 64) - 1
TWO_NEG_53 = 1.0 / (1 << 53)
AUGMENT_SEED_XOR = 0xA063E47  # src/run/augment.rs: Rng::new(seed ^ 0xa06_3e47)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped with a checkpoint; run again with --resume

# ---------------------------------------------------------------------------
# kestrel's generator (src/nn/rng.rs), in Python integers masked to 64 bits
# (wrapping arithmetic, exactly as Rust's wrapping_* and rotate_left).
# ---------------------------------------------------------------------------


def f32(x):
    """Rounds a Python float (f64) to the nearest f32, as Rust's `as f32`."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def splitmix64(x):
    """One SplitMix64 step: returns (new state, output)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return x, z ^ (z >> 31)


def _rotl(v, k):
    return ((v << k) | (v >> (64 - k))) & MASK64


class Rng:
    """xoshiro256** as kestrel::nn::Rng: same seeding, same draws."""

    def __init__(self, seed):
        x = seed & MASK64
        s = []
        for _ in range(4):
            x, z = splitmix64(x)
            s.append(z)
        self.s = s

    @classmethod
    def from_state(cls, s):
        r = cls.__new__(cls)
        s = [int(v) & MASK64 for v in s]
        r.s = s if any(s) else Rng(0).s
        return r

    def state(self):
        return list(self.s)

    def next_u64(self):
        s0, s1, s2, s3 = self.s
        result = (_rotl((s1 * 5) & MASK64, 7) * 9) & MASK64
        t = (s1 << 17) & MASK64
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = _rotl(s3, 45)
        self.s = [s0, s1, s2, s3]
        return result

    def u64s(self, n):
        """The next n outputs as a list (the same as n next_u64 calls, faster)."""
        s0, s1, s2, s3 = self.s
        m = MASK64
        out = [0] * n
        for i in range(n):
            v = (s1 * 5) & m
            out[i] = ((((v << 7) | (v >> 57)) & m) * 9) & m
            t = (s1 << 17) & m
            s2 ^= s0
            s3 ^= s1
            s1 ^= s2
            s0 ^= s3
            s2 ^= t
            s3 = ((s3 << 45) | (s3 >> 19)) & m
        self.s = [s0, s1, s2, s3]
        return out

    def next_f64(self):
        return (self.next_u64() >> 11) * TWO_NEG_53

    def uniform(self, lo, hi):
        """Uniform in [lo, hi): lo, hi are f32 values; computed in f64, rounded to f32."""
        lo, hi = f32(lo), f32(hi)
        return f32(lo + (hi - lo) * self.next_f64())

    def normal(self):
        u1 = 1.0 - self.next_f64()
        u2 = self.next_f64()
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)

    def below(self, n):
        """Uniform integer in [0, n), rejection on the incomplete top zone; 0 for n = 0."""
        if n == 0:
            return 0
        zone = MASK64 - ((MASK64 - n + 1) % n)
        while True:
            v = self.next_u64()
            if v <= zone:
                return v % n

    def shuffle(self, v):
        """Fisher-Yates from the last element down (in place), as Rng::shuffle."""
        below = self.below
        for i in range(len(v) - 1, 0, -1):
            j = below(i + 1)
            v[i], v[j] = v[j], v[i]

    def permutation(self, n):
        """What fit does each epoch: a fresh 0..n, shuffled."""
        p = list(range(n))
        self.shuffle(p)
        return p


def rust_round(x):
    """f64::round: half away from zero (Python's round() is half to even)."""
    a = abs(x)
    r = math.floor(a)
    if a - r >= 0.5:
        r += 1
    return int(r) if x >= 0 else -int(r)


class AugmentDraws:
    """The augmenter's draws (src/run/augment.rs): per sample dy, dx, flip."""

    def __init__(self, seed, width_shift=0.1, height_shift=0.1, flip=True, shape=(3, 32, 32)):
        self.rng = Rng((seed ^ AUGMENT_SEED_XOR) & MASK64)
        self.width_shift, self.height_shift, self.flip = width_shift, height_shift, flip
        self.h, self.w = shape[1], shape[2]

    def draw(self, n):
        """(dy, dx, flip) lists for the next n samples, in batch order."""
        u = self.rng.u64s(3 * n)
        dys, dxs, flips = [0] * n, [0] * n, [False] * n
        for k in range(n):
            uy = (u[3 * k] >> 11) * TWO_NEG_53
            ux = (u[3 * k + 1] >> 11) * TWO_NEG_53
            uf = (u[3 * k + 2] >> 11) * TWO_NEG_53
            dys[k] = rust_round((2.0 * uy - 1.0) * self.height_shift * self.h)
            dxs[k] = rust_round((2.0 * ux - 1.0) * self.width_shift * self.w)
            flips[k] = uf < 0.5 and self.flip
        return dys, dxs, flips


def numpy_xoshiro_check(seeds, n):
    """The same generator written with numpy uint64 arrays (wrapping), one lane
    per seed: a cross-check of the integer version. Returns [seed][draw]."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = np.array([s & MASK64 for s in seeds], dtype=np.uint64)
        st = []
        for _ in range(4):
            x = x + np.uint64(0x9E3779B97F4A7C15)
            z = x.copy()
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            st.append(z ^ (z >> np.uint64(31)))
        s0, s1, s2, s3 = st

        def rotl(v, k):
            return (v << np.uint64(k)) | (v >> np.uint64(64 - k))

        out = []
        for _ in range(n):
            out.append(rotl(s1 * np.uint64(5), 7) * np.uint64(9))
            t = s1 << np.uint64(17)
            s2 = s2 ^ s0
            s3 = s3 ^ s1
            s1 = s1 ^ s2
            s0 = s0 ^ s3
            s2 = s2 ^ t
            s3 = rotl(s3, 45)
    return [[int(out[i][j]) for i in range(n)] for j in range(len(seeds))]


# ---------------------------------------------------------------------------
# The networks and the runs (mirroring configs/c*.toml)
# ---------------------------------------------------------------------------

# (kind, filters/units, activation, padding) ; "pool" and "dropout" entries.
KERAS_CNN = [
    ("conv", 32, "relu", "same"),
    ("conv", 32, "relu", "valid"),
    ("pool", 2),
    ("dropout", 0.25),
    ("conv", 64, "relu", "same"),
    ("conv", 64, "relu", "valid"),
    ("pool", 2),
    ("dropout", 0.25),
    ("flatten",),
    ("dense", 512, "relu"),
    ("dropout", 0.5),
    ("dense", 10, "softmax"),
]

ELU_CNN = [
    ("conv", 128, "elu", "same"),
    ("conv", 128, "elu", "valid"),
    ("pool", 2),
    ("dropout", 0.25),
    ("conv", 256, "elu", "same"),
    ("conv", 256, "elu", "valid"),
    ("pool", 2),
    ("dropout", 0.25),
    ("conv", 512, "elu", "same"),
    ("conv", 512, "elu", "valid"),
    ("pool", 2),
    ("dropout", 0.25),
    ("flatten",),
    ("dense", 1024, "elu"),
    ("dropout", 0.5),
    ("dense", 10, "softmax"),
]

NETWORKS = {"keras-cnn": KERAS_CNN, "elu-cnn": ELU_CNN}
EXPECTED_PARAMS = {"keras-cnn": 1250858}  # SEED_RUNS.md


def rmsprop(lr, decay):
    return {"kind": "rmsprop", "lr": lr, "decay": decay, "rho": 0.9, "epsilon": 1e-7}


def sgd(lr, momentum=0.0, nesterov=False):
    return {"kind": "sgd", "lr": lr, "decay": 0.0, "momentum": momentum, "nesterov": nesterov}


def adam(lr, epsilon=1e-8):
    return {"kind": "adam", "lr": lr, "decay": 0.0, "beta_1": 0.9, "beta_2": 0.999, "epsilon": epsilon}


ES = {"monitor": "val_accuracy", "patience": 5, "min_delta": 0.0}
AUG = {"width_shift_range": 0.1, "height_shift_range": 0.1, "horizontal_flip": True}


def _keras_run(desc, opt, stages=None):
    return {
        "description": desc, "network": "keras-cnn", "seed": 2, "batch_size": 32,
        "optimizer": opt, "early_stopping": ES, "augmentation": None,
        # (epochs, optimizer to re-compile with or None = keep the state)
        "stages": stages or [(100, None)],
    }


# Each entry mirrors configs/<id>-*.toml (seed, batch, epochs, stages).
RUNS = {
    "c1": _keras_run("keras-cnn, RMSprop lr 1e-4 decay 1e-6; reported 77.22% after 34 epochs", rmsprop(1e-4, 1e-6)),
    "c2": _keras_run("keras-cnn, RMSprop lr 1e-3 decay 1e-6; reported 51.86%", rmsprop(1e-3, 1e-6)),
    "c3": _keras_run("keras-cnn, RMSprop lr 1e-5 decay 1e-6, 100 epochs then fit again; reported 73.23%",
                     rmsprop(1e-5, 1e-6), [(100, None), (100, None)]),
    "c4": _keras_run("keras-cnn, RMSprop lr 1e-4 decay 1e-7; reported ~77%", rmsprop(1e-4, 1e-7)),
    "c5": _keras_run("keras-cnn, RMSprop lr 1e-4 decay 1e-5; reported ~77%", rmsprop(1e-4, 1e-5)),
    "c6": _keras_run("keras-cnn, RMSprop lr 1e-4 decay 1e-2; reported ~40%", rmsprop(1e-4, 1e-2)),
    "c7": _keras_run("keras-cnn, SGD lr 0.01; reported 80.75%", sgd(0.01)),
    "c8": _keras_run("keras-cnn, SGD lr 0.01 momentum 0.1; reported 79.75%", sgd(0.01, 0.1)),
    "c9": _keras_run("keras-cnn, SGD lr 0.01 momentum 0.5 nesterov; reported 80.20%", sgd(0.01, 0.5, True)),
    "c10": _keras_run("keras-cnn, Adam 1e-3, re-compiled with 1e-4, then 1e-5; reported 81.50%",
                      adam(1e-3), [(100, None), (100, adam(1e-4)), (100, adam(1e-5))]),
    "c11": {
        "description": "elu-cnn, RMSprop lr 1e-4 decay 1e-6, 120 epochs, no augmentation; reported 85.89%",
        "network": "elu-cnn", "seed": 0, "batch_size": 32, "optimizer": rmsprop(1e-4, 1e-6),
        "early_stopping": None, "augmentation": None, "stages": [(120, None)],
    },
}
RUNS["c11a"] = dict(RUNS["c11"], augmentation=AUG,
                    description="elu-cnn, RMSprop lr 1e-4 decay 1e-6, 120 epochs, shifts 0.1 + horizontal flips; "
                                "reported 85.89%")


def layer_shapes(network, in_shape=(3, 32, 32)):
    """Per trainable layer: (name, kernel shape in kestrel's layout, fan_in, fan_out, bias len),
    in kestrel's build order (conv kernels OIHW, dense kernels [inputs, units])."""
    c, h, w = in_shape
    flat = None
    out = []
    for spec in NETWORKS[network]:
        kind = spec[0]
        if kind == "conv":
            f, pad = spec[1], spec[3]
            out.append(("conv2d", (f, c, 3, 3), c * 9, f * 9, f))
            c = f
            if pad == "valid":
                h, w = h - 2, w - 2
        elif kind == "pool":
            h, w = h // spec[1], w // spec[1]
        elif kind == "flatten":
            flat = c * h * w
        elif kind == "dense":
            units = spec[1]
            out.append(("dense", (flat, units), flat, units, units))
            flat = units
    return out


def count_params(network):
    return sum(math.prod(k) + b for _, k, _, _, b in layer_shapes(network))


def glorot_limit(fan_in, fan_out):
    # layers.rs: (6.0 / (fan_in + fan_out) as f64).sqrt() as f32
    return f32(math.sqrt(6.0 / max(fan_in + fan_out, 1)))


def init_kernels_pure(rng, network, only_first=None):
    """Pure-Python kestrel init (slow; for the selftest): per kernel,
    (first values, f64 sum in order) drawing every value from rng."""
    res = []
    for name, shape, fi, fo, _ in layer_shapes(network):
        lim = glorot_limit(fi, fo)
        n = math.prod(shape)
        u = rng.u64s(n)
        lo, hi = -lim, lim
        vals = [f32(lo + (hi - lo) * ((v >> 11) * TWO_NEG_53)) for v in u]
        total = 0.0
        for v in vals:
            total += v
        res.append((name, shape, vals[:only_first] if only_first else vals, total))
    return res


def init_kernels_numpy(rng, network):
    """kestrel's initial kernels (numpy f32 arrays in kestrel's layouts), drawn from rng."""
    import numpy as np

    res = []
    for name, shape, fi, fo, _ in layer_shapes(network):
        lim = glorot_limit(fi, fo)
        n = math.prod(shape)
        # In chunks: a Python list of millions of ints is large.
        u = np.concatenate([np.array(rng.u64s(min(1 << 20, n - k)), dtype=np.uint64)
                            for k in range(0, n, 1 << 20)])
        f = (u >> np.uint64(11)).astype(np.float64) * TWO_NEG_53
        lo, hi = np.float64(-lim), np.float64(lim)
        vals = (lo + (hi - lo) * f).astype(np.float32)
        res.append((name, shape, vals.reshape(shape)))
    return res


# ---------------------------------------------------------------------------
# Self-test and the fixture for tests/rng_python_twin.rs
# ---------------------------------------------------------------------------

FIXTURE_SEEDS = [0, 2, 12345, MASK64]
BELOW_NS = [1, 2, 3, 10, 1000, 50000, (1 << 63) + 1, MASK64]


def fixture_values(log=print):
    """Every value the Rust twin test checks, computed in pure Python.
    Returns an ordered list of (key, value string)."""
    kv = []
    for seed in FIXTURE_SEEDS:
        tag = f"seed{seed}"
        r = Rng(seed)
        kv.append((f"{tag}.state", ",".join(f"{v:016x}" for v in r.state())))
        kv.append((f"{tag}.u64", ",".join(f"{v:016x}" for v in (r.next_u64() for _ in range(8)))))
        kv.append((f"{tag}.f64_bits", ",".join(f"{f64_bits(r.next_f64()):016x}" for _ in range(4))))
        kv.append((f"{tag}.uniform_bits", ",".join(f"{f32_bits(r.uniform(-0.25, 0.75)):08x}" for _ in range(4))))
        for n in BELOW_NS:
            kv.append((f"{tag}.below.{n}", ",".join(str(r.below(n)) for _ in range(6))))
        kv.append((f"{tag}.shuffle10", ",".join(map(str, r.permutation(10)))))
        kv.append((f"{tag}.state_after", ",".join(f"{v:016x}" for v in r.state())))
    # The models: the initial kernels and the generator after them (= what
    # fit's first shuffle starts from), then the epochs' permutations.
    for run in ("c1", "c11"):
        cfg = RUNS[run]
        net, seed = cfg["network"], cfg["seed"]
        t0 = time.time()
        r = Rng(seed)
        kernels = init_kernels_pure(r, net, only_first=4)
        tag = f"{run}.{net}.seed{seed}"
        kv.append((f"{tag}.params", str(count_params(net))))
        for i, (name, shape, first, total) in enumerate(kernels):
            kv.append((f"{tag}.kernel{i}.shape", ",".join(map(str, shape))))
            kv.append((f"{tag}.kernel{i}.first_bits", ",".join(f"{f32_bits(v):08x}" for v in first)))
            kv.append((f"{tag}.kernel{i}.sum_bits", f"{f64_bits(total):016x}"))
        after_init = r.state()
        kv.append((f"{tag}.state_after_init", ",".join(f"{v:016x}" for v in after_init)))
        p1 = r.permutation(50000)
        kv.append((f"{tag}.epoch1_perm_first16", ",".join(map(str, p1[:16]))))
        kv.append((f"{tag}.epoch1_perm_last4", ",".join(map(str, p1[-4:]))))
        p2 = r.permutation(50000)
        kv.append((f"{tag}.epoch2_perm_first16", ",".join(map(str, p2[:16]))))
        if net == "keras-cnn":
            # A tiny fit (5 samples, 2 epochs) from the same init: the state
            # after it (kestrel's test runs it on the CPU; keras-cnn only, to
            # keep the test fast).
            r5 = Rng.from_state(after_init)
            r5.permutation(5)
            r5.permutation(5)
            kv.append((f"{tag}.state_after_init_fit5x2", ",".join(f"{v:016x}" for v in r5.state())))
        log(f"  {tag}: {count_params(net):,} params, init + 2 permutations in {time.time() - t0:.1f} s")
    aug = AugmentDraws(RUNS["c11a"]["seed"])
    dy, dx, fl = aug.draw(16)
    kv.append(("c11a.augment.seed0.dy", ",".join(map(str, dy))))
    kv.append(("c11a.augment.seed0.dx", ",".join(map(str, dx))))
    kv.append(("c11a.augment.seed0.flip", ",".join(str(int(b)) for b in fl)))
    return kv


def write_fixture(path):
    kv = fixture_values()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # One "key": "value" pair per line, so the Rust test reads it without a
    # JSON library (kestrel has no serde_json dependency).
    lines = ["{",
             '  "generated_by": "python3 benches/pytorch_cifar.py --write-fixture tests/fixtures/rng_twin.json",']
    for i, (k, v) in enumerate(kv):
        lines.append(f'  "{k}": "{v}"' + ("," if i + 1 < len(kv) else ""))
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    json.loads(open(path).read())  # well-formed
    print(f"wrote {path}: {len(kv)} values")


def shift_flip_reference(img, dy, dx, flip):
    """src/run/augment.rs shift_flip, plainly ([c][h][w] nested lists)."""
    c, h, w = len(img), len(img[0]), len(img[0][0])
    out = [[[0.0] * w for _ in range(h)] for _ in range(c)]
    for ch in range(c):
        for y in range(h):
            sy = min(max(y - dy, 0), h - 1)
            for x in range(w):
                xs = w - 1 - x if flip else x
                sx = min(max(xs - dx, 0), w - 1)
                out[ch][y][x] = img[ch][sy][sx]
    return out


def selftest(seed):
    ok = True

    def check(cond, what):
        nonlocal ok
        print(("ok   " if cond else "FAIL ") + what)
        ok = ok and cond

    r = Rng(seed)
    print(f"Rng::new({seed}) state: " + " ".join(f"{v:016x}" for v in r.state()))
    first = [r.next_u64() for _ in range(8)]
    print("first 8 next_u64: " + " ".join(f"{v:016x}" for v in first))
    print("       (decimal): " + " ".join(str(v) for v in first))
    r2 = Rng(seed)
    check(r2.u64s(8) == first, "u64s(8) == 8 x next_u64")
    print("next 4 next_f64: " + " ".join(repr(r.next_f64()) for _ in range(4)))
    print("below(10) x 10: " + " ".join(str(r.below(10)) for _ in range(10)))
    print("permutation(10): " + " ".join(map(str, r.permutation(10))))
    # The splitmix/xoshiro reference value: SplitMix64 from 0 starts 0xe220a8397b1dcdaf.
    check(splitmix64(0)[1] == 0xE220A8397B1DCDAF, "SplitMix64(0) first output = e220a8397b1dcdaf (published)")
    # The rejection path: n = 2^63 + 1 rejects about half the draws.
    rr = Rng(seed)
    zone = MASK64 - ((MASK64 - ((1 << 63) + 1) + 1) % ((1 << 63) + 1))
    check(zone == 1 << 63, "below(2^63+1): zone = 2^63")
    vals = [rr.below((1 << 63) + 1) for _ in range(64)]
    check(all(0 <= v <= 1 << 63 for v in vals), "below(2^63+1) in range")
    check(Rng(seed).below(0) == 0, "below(0) = 0")
    check(sorted(Rng(seed).permutation(1000)) == list(range(1000)), "permutation(1000) is a permutation")
    check(Rng.from_state([0, 0, 0, 0]).state() == Rng(0).state(), "from_state(zeros) = seed 0")
    check([rust_round(v) for v in (0.5, 1.5, 2.5, -0.5, -1.5, 0.49999999999999994, -2.4999999)]
          == [1, 2, 3, -1, -2, 0, -2], "rust_round: half away from zero")
    for net, expected in EXPECTED_PARAMS.items():
        check(count_params(net) == expected, f"{net}: {count_params(net):,} params (SEED_RUNS.md: {expected:,})")
    print(f"elu-cnn: {count_params('elu-cnn'):,} params")
    # Augmentation: the shift/flip against the plain reference, on every
    # displacement the CIFAR draws can give.
    img = [[[float(ch * 100 + y * 8 + x) for x in range(8)] for y in range(7)] for ch in range(2)]
    aug = AugmentDraws(seed)
    dy, dx, fl = aug.draw(2000)
    check(set(dy) <= set(range(-3, 4)) and set(dx) <= set(range(-3, 4)), "augment shifts in -3..=3")
    check(abs(sum(fl) / len(fl) - 0.5) < 0.05, "augment flips about half")
    try:
        import numpy as np
        have_np = True
    except ImportError:
        have_np = False
        print("skip numpy cross-checks (numpy not installed)")
    if have_np:
        lanes = numpy_xoshiro_check(FIXTURE_SEEDS + [seed], 16)
        check(all(lanes[i] == Rng(s).u64s(16) for i, s in enumerate(FIXTURE_SEEDS + [seed])),
              "numpy uint64 twin == integer generator (16 draws, 5 seeds)")
        a = Rng(seed)
        b = Rng(seed)
        pure = init_kernels_pure(a, "keras-cnn")
        npk = init_kernels_numpy(b, "keras-cnn")
        same = all(np.array_equal(np.array(p[2], dtype=np.float32), q[2].ravel()) for p, q in zip(pure, npk))
        check(same and a.state() == b.state(), "numpy init == pure init (keras-cnn, bit for bit)")
        x = np.array(img, dtype=np.float32)[None].repeat(6, axis=0)
        cases = [(-3, 2, True), (3, -3, False), (0, 0, True), (1, 0, False), (-2, -1, True), (0, 3, False)]
        out = shift_flip_numpy(x, [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases])
        ref = np.array([shift_flip_reference(img, *c) for c in cases], dtype=np.float32)
        check(np.array_equal(out, ref), "shift_flip (numpy gather) == plain reference")
        try:
            import torch
            t = shift_flip_torch(torch.from_numpy(x), torch.tensor([c[0] for c in cases]),
                                 torch.tensor([c[1] for c in cases]), torch.tensor([c[2] for c in cases]))
            check(np.array_equal(t.numpy(), ref), "shift_flip (torch gather) == plain reference")
            check(torch_optimizer_selftest(), "Keras optimizers (torch foreach) == plain per-element formulas")
        except ImportError:
            print("skip torch checks (torch not installed)")
    print("model init + first permutations (pure Python, a few seconds):")
    t0 = time.time()
    rm = Rng(RUNS["c1"]["seed"])
    init_kernels_pure(rm, "keras-cnn", only_first=1)
    p = rm.permutation(50000)
    print(f"  c1 (keras-cnn, seed 2): generator after the init draws: {' '.join(f'{v:016x}' for v in rm.state())}")
    print(f"  epoch-1 permutation of the 50,000 training images starts {p[:10]} ({time.time() - t0:.1f} s)")
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return ok


def shift_flip_numpy(x, dy, dx, flip):
    import numpy as np

    n, c, h, w = x.shape
    dy, dx, flip = np.asarray(dy)[:, None], np.asarray(dx)[:, None], np.asarray(flip)[:, None]
    ys = np.arange(h)[None, :]
    xs = np.arange(w)[None, :]
    sy = np.clip(ys - dy, 0, h - 1)
    sx = np.clip(np.where(flip, w - 1 - xs, xs) - dx, 0, w - 1)
    rows = np.take_along_axis(x, np.broadcast_to(sy[:, None, :, None], (n, c, h, w)), axis=2)
    return np.take_along_axis(rows, np.broadcast_to(sx[:, None, None, :], (n, c, h, w)), axis=3)


def shift_flip_torch(x, dy, dx, flip):
    """Batch version of augment.rs shift_flip: out[y][x] = in[clamp(y-dy)][clamp(xf-dx)],
    xf = W-1-x when flipped; a pure gather, so exact."""
    import torch

    n, c, h, w = x.shape
    dev = x.device
    dy, dx, flip = dy.to(dev)[:, None], dx.to(dev)[:, None], flip.to(dev)[:, None]
    ys = torch.arange(h, device=dev)[None, :]
    xs = torch.arange(w, device=dev)[None, :]
    sy = (ys - dy).clamp(0, h - 1)
    sx = (torch.where(flip, w - 1 - xs, xs) - dx).clamp(0, w - 1)
    rows = x.gather(2, sy[:, None, :, None].expand(n, c, h, w))
    return rows.gather(3, sx[:, None, None, :].expand(n, c, h, w))


# ---------------------------------------------------------------------------
# Keras 2 optimizers (DESIGN.md), on lists of tensors
# ---------------------------------------------------------------------------


class KerasOptimizer:
    """Keras 2.3.1 SGD (momentum, Nesterov), Adagrad, RMSprop, Adam, with
    `decay`: `lr_t = lr / (1 + decay * iterations)`, iterations from 0. The
    step's scalars are computed in f64 and rounded to f32 once, the element
    operations follow kestrel's `ops::optim::update` in order. A new
    instance = Keras's re-compile (fresh slots, iterations 0)."""

    def __init__(self, cfg, params):
        import torch

        self.cfg = dict(cfg)
        self.kind = cfg["kind"]
        self.params = list(params)
        self.iterations = 0
        c = {k: f32(float(v)) for k, v in cfg.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.lr, self.decay = c["lr"], c.get("decay", 0.0)
        self.momentum = c.get("momentum", 0.0)
        self.nesterov = bool(cfg.get("nesterov", False))
        self.rho = c.get("rho", 0.9)
        self.eps = c.get("epsilon", 1e-7)
        self.b1, self.b2 = c.get("beta_1", 0.9), c.get("beta_2", 0.999)
        # 1 - rho etc. in f32, as kestrel's StepScalars.
        self.omr, self.omb1, self.omb2 = f32(1.0 - self.rho), f32(1.0 - self.b1), f32(1.0 - self.b2)
        zeros = lambda: [torch.zeros_like(p) for p in self.params]  # noqa: E731
        self.s0 = zeros()
        self.s1 = zeros() if self.kind == "adam" else []
        if self.kind not in ("sgd", "rmsprop", "adagrad", "adam"):
            raise SystemExit(f"optimizer {self.kind!r}: expected sgd, rmsprop, adagrad or adam")

    def lr_t(self):
        return self.lr / (1.0 + self.decay * self.iterations)

    @staticmethod
    def _f(name):
        import torch

        return getattr(torch, "_foreach_" + name)

    def step(self, grads):
        import torch

        lr_t64 = self.lr_t()
        lr_t = f32(lr_t64)
        p, g, s0 = self.params, grads, self.s0
        if self.kind == "sgd":
            # v = m*v - lr_t*g; p += v  (Nesterov: p += m*v - lr_t*g)
            lg = torch._foreach_mul(g, lr_t)
            torch._foreach_mul_(s0, self.momentum)
            torch._foreach_sub_(s0, lg)
            if self.nesterov:
                u = torch._foreach_mul(s0, self.momentum)
                torch._foreach_sub_(u, lg)
                torch._foreach_add_(p, u)
            else:
                torch._foreach_add_(p, s0)
        elif self.kind in ("rmsprop", "adagrad"):
            gg = torch._foreach_mul(g, g)
            if self.kind == "rmsprop":
                # a = rho*a + (1-rho)*(g*g)
                torch._foreach_mul_(gg, self.omr)
                torch._foreach_mul_(s0, self.rho)
            torch._foreach_add_(s0, gg)
            d = torch._foreach_sqrt(s0)
            torch._foreach_add_(d, self.eps)
            u = torch._foreach_mul(g, lr_t)  # lr_t*g / (sqrt(a) + eps)
            torch._foreach_div_(u, d)
            torch._foreach_sub_(p, u)
        else:
            t = self.iterations + 1.0
            step = f32(lr_t64 * math.sqrt(1.0 - float(self.b2) ** t) / (1.0 - float(self.b1) ** t))
            # m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*(g*g) ; p -= step*m / (sqrt(v) + eps)
            torch._foreach_mul_(s0, self.b1)
            torch._foreach_add_(s0, torch._foreach_mul(g, self.omb1))
            gg = torch._foreach_mul(g, g)
            torch._foreach_mul_(gg, self.omb2)
            torch._foreach_mul_(self.s1, self.b2)
            torch._foreach_add_(self.s1, gg)
            d = torch._foreach_sqrt(self.s1)
            torch._foreach_add_(d, self.eps)
            u = torch._foreach_mul(s0, step)
            torch._foreach_div_(u, d)
            torch._foreach_sub_(p, u)
        self.iterations += 1

    def state_dict(self):
        return {"cfg": self.cfg, "iterations": self.iterations,
                "s0": [t.detach().cpu() for t in self.s0], "s1": [t.detach().cpu() for t in self.s1]}

    def load_state_dict(self, st):
        self.iterations = int(st["iterations"])
        for dst, src in zip(self.s0, st["s0"]):
            dst.copy_(src)
        for dst, src in zip(self.s1, st["s1"]):
            dst.copy_(src)


def torch_optimizer_selftest():
    """Each optimizer's two steps against plain per-element f32 formulas
    (kestrel's `update`, written out with numpy f32 scalars)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(5)
    cfgs = [sgd(0.1), sgd(0.1, 0.5), sgd(0.1, 0.5, True), rmsprop(1e-3, 1e-2),
            {"kind": "adagrad", "lr": 0.01, "decay": 0.0, "epsilon": 1e-7}, adam(1e-3)]
    for cfg in cfgs:
        p0 = rng.standard_normal(7).astype(np.float32)
        gs = [rng.standard_normal(7).astype(np.float32) for _ in range(2)]
        tp = [torch.tensor(p0.copy())]
        opt = KerasOptimizer(cfg, tp)
        for g in gs:
            opt.step([torch.tensor(g)])
        # The reference.
        F = np.float32
        p, s0, s1 = p0.copy(), np.zeros(7, F), np.zeros(7, F)
        lr, decay = F(cfg["lr"]), F(cfg.get("decay", 0.0))
        for it, g in enumerate(gs):
            lr_t64 = float(lr) / (1.0 + float(decay) * it)
            lr_t = F(lr_t64)
            k = cfg["kind"]
            if k == "sgd":
                m = F(cfg["momentum"])
                v = m * s0 - lr_t * g
                s0 = v
                p = p + (m * v - lr_t * g if cfg["nesterov"] else v)
            elif k == "rmsprop":
                rho = F(0.9)
                s0 = rho * s0 + (F(1) - rho) * (g * g)
                p = p - lr_t * g / (np.sqrt(s0) + F(1e-7))
            elif k == "adagrad":
                s0 = s0 + g * g
                p = p - lr_t * g / (np.sqrt(s0) + F(1e-7))
            else:
                b1, b2 = F(0.9), F(0.999)
                t = it + 1.0
                step = F(lr_t64 * math.sqrt(1.0 - float(b2) ** t) / (1.0 - float(b1) ** t))
                s0 = b1 * s0 + (F(1) - b1) * g
                s1 = b2 * s1 + (F(1) - b2) * (g * g)
                p = p - step * s0 / (np.sqrt(s1) + F(1e-8))
        if not np.allclose(tp[0].numpy(), p, rtol=1e-6, atol=1e-7):
            print(f"  optimizer {cfg}: got {tp[0].numpy()}, expected {p}")
            return False
    return True


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"


def find_cifar_dir(d):
    for cand in (d, os.path.join(d, "cifar-10-batches-bin")):
        if all(os.path.exists(os.path.join(cand, f)) for f in TRAIN_FILES + [TEST_FILE]):
            return cand
    raise SystemExit(f"--data {d}: no CIFAR-10 binary files (data_batch_1..5.bin, test_batch.bin) there or in "
                     f"{d}/cifar-10-batches-bin; make them with cifar10_to_bin.py")


def load_cifar(d):
    """(x_train, y_train, x_test, y_test, sha256 prefixes): x as f32 [n, 3, 32, 32] / 255."""
    import numpy as np

    d = find_cifar_dir(d)
    hashes = {}

    def read(names):
        raws = []
        for name in names:
            b = open(os.path.join(d, name), "rb").read()
            hashes[name] = hashlib.sha256(b).hexdigest()[:16]
            if len(b) % 3073:
                raise SystemExit(f"{name}: {len(b)} bytes is not a whole number of 3073-byte records")
            raws.append(np.frombuffer(b, dtype=np.uint8).reshape(-1, 3073))
        r = np.concatenate(raws)
        x = r[:, 1:].astype(np.float32) / np.float32(255.0)
        return x.reshape(-1, 3, 32, 32), r[:, 0].astype(np.int64)

    xtr, ytr = read(TRAIN_FILES)
    xte, yte = read([TEST_FILE])
    if ytr.max() > 9 or yte.max() > 9:
        raise SystemExit(f"{d}: a label above 9")
    return xtr, ytr, xte, yte, hashes


def synthetic_data(n):
    """Random images (for smoke runs without the data): n train, n // 2 test."""
    import numpy as np

    g = np.random.default_rng(123)
    xs = g.integers(0, 256, size=(n + n // 2, 3, 32, 32)).astype(np.float32) / np.float32(255.0)
    ys = g.integers(0, 10, size=n + n // 2).astype(np.int64)
    return xs[:n], ys[:n], xs[n:], ys[n:], {"synthetic": f"{n} + {n // 2} random images"}


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def build_model(network, seed, device):
    """The network with kestrel's initial weights (drawn from Rng(seed)).
    Returns (model, the generator after the init draws)."""
    import numpy as np
    import torch
    import torch.nn as nn

    rng = Rng(seed)
    kernels = iter(init_kernels_numpy(rng, network))
    act = {"relu": nn.ReLU, "elu": lambda: nn.ELU(alpha=1.0)}
    layers = []
    for spec in NETWORKS[network]:
        kind = spec[0]
        if kind in ("conv", "dense"):
            _, kshape, w = next(kernels)
            if kind == "conv":  # OIHW in both
                m = nn.Conv2d(kshape[1], kshape[0], kshape[2], padding=1 if spec[3] == "same" else 0)
                w_t = w
            else:  # kestrel [inputs, units] -> torch [units, inputs]
                m = nn.Linear(kshape[0], kshape[1])
                w_t = w.T
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w_t)))
                m.bias.zero_()
            layers.append(m)
            if spec[2] != "softmax":  # softmax is fused into the loss: the model outputs logits
                layers.append(act[spec[2]]())
        elif kind == "pool":
            layers.append(nn.MaxPool2d(spec[1]))  # floor, as Keras's valid pooling
        elif kind == "dropout":
            layers.append(nn.Dropout(spec[1]))  # inverted scaling, as Keras
        elif kind == "flatten":
            layers.append(nn.Flatten())  # NCHW order, as kestrel's Flatten
    model = nn.Sequential(*layers).to(device)
    n = sum(p.numel() for p in model.parameters())
    if n != count_params(network):
        raise SystemExit(f"{network}: built {n} params, expected {count_params(network)}")
    return model, rng


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


class Stop:
    """SIGINT / SIGTERM: first one stops after the current epoch, second at once."""

    def __init__(self):
        self.requested = False
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.requested:
            print("\nsecond signal: quitting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print("\nsignal: stopping at the end of this epoch, after its checkpoint", file=sys.stderr, flush=True)


def atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(out, run_id, cfg, st, status, env, data_info, args):
    rows = st["history"]
    cols = ["epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "train_seconds", "lr_t"]
    csv = [",".join(cols)]
    for r in rows:
        csv.append(",".join("" if r.get(k) is None else (repr(r[k]) if isinstance(r[k], float) else str(r[k]))
                            for k in cols))
    atomic_write_text(os.path.join(out, "history.csv"), "\n".join(csv) + "\n")
    atomic_write_text(os.path.join(out, "history.json"), json.dumps({"epochs": rows}, indent=1) + "\n")
    accs = [r["val_accuracy"] for r in rows]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i)) if accs else None
    secs = [r["seconds"] for r in rows]
    result = {
        "run": run_id,
        "framework": "pytorch",
        "status": status,
        "description": cfg["description"],
        "epochs": len(rows),
        "steps": st["steps"],
        "test_accuracy_per_epoch": accs,
        "test_loss_per_epoch": [r["val_loss"] for r in rows],
        "best_epoch": None if best is None else best + 1,
        "best_test_accuracy": None if best is None else accs[best],
        "final_test_accuracy": accs[-1] if accs else None,
        "final_test_loss": rows[-1]["val_loss"] if rows else None,
        "seconds_per_epoch": secs,
        "mean_seconds_per_epoch": sum(secs) / len(secs) if secs else None,
        "mean_seconds_per_epoch_after_first": (sum(secs[1:]) / (len(secs) - 1)) if len(secs) > 1 else None,
        "mean_train_seconds_per_epoch": (sum(r["train_seconds"] for r in rows) / len(rows)) if rows else None,
        "seed": st["seed"],
        "recipe": cfg,
        "data": data_info,
        "options": {k: v for k, v in vars(args).items() if k not in ("selftest", "write_fixture")},
        **env,
    }
    atomic_write_text(os.path.join(out, "result.json"), json.dumps(result, indent=1) + "\n")
    return result


def train(args):
    import numpy as np
    import torch
    import torch.nn.functional as F

    run_id = args.run
    if run_id not in RUNS:
        raise SystemExit(f"--run {run_id}: expected one of {', '.join(RUNS)}")
    cfg = json.loads(json.dumps(RUNS[run_id]))  # a copy, JSON-clean
    if args.epochs is not None:
        cfg["stages"] = [[min(e, args.epochs), o] for e, o in cfg["stages"]]
    out = args.out or os.path.join("runs-pytorch", run_id)
    os.makedirs(out, exist_ok=True)
    logf = open(os.path.join(out, "log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    t_start = time.time()
    stop = Stop()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = args.fast
        torch.backends.cudnn.deterministic = not args.fast
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "tf32": bool(args.tf32 and device.type == "cuda"),
        "cudnn_benchmark": bool(args.fast and device.type == "cuda"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        env["compute_capability"] = f"{cap[0]}.{cap[1]}"
    if args.synthetic:
        xtr, ytr, xte, yte, data_info = synthetic_data(args.synthetic)
    else:
        if not args.data:
            raise SystemExit("--data DIR is needed (or --synthetic N for a smoke run)")
        xtr, ytr, xte, yte, data_info = load_cifar(args.data)
    n_train = len(xtr)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    seed = cfg["seed"] if args.seed is None else args.seed
    resume = args.resume and os.path.exists(ckpt_path)
    if args.resume and not resume:
        log(f"--resume: no {ckpt_path} yet, starting from the beginning")
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False) if resume else None
    if ck is not None:
        if ck["run"] != run_id:
            raise SystemExit(f"{ckpt_path} is a checkpoint of run {ck['run']}, not {run_id}")
        seed = ck["seed"]
    model, rng = build_model(cfg["network"], seed, device)
    params = list(model.parameters())
    aug = AugmentDraws(seed, cfg["augmentation"]["width_shift_range"], cfg["augmentation"]["height_shift_range"],
                       cfg["augmentation"]["horizontal_flip"]) if cfg["augmentation"] else None
    torch.manual_seed(seed)  # the dropout masks (not kestrel's: see the module docs)

    def stage_optimizer(si):
        # The optimizer in use in stage si: the latest re-compile at or before it.
        o = cfg["optimizer"]
        for e, ro in cfg["stages"][: si + 1]:
            if ro is not None:
                o = ro
        return o

    st = {"run": run_id, "seed": seed, "stage": 0, "stage_epoch": 0, "steps": 0, "history": [],
          "early": None}
    opt = KerasOptimizer(stage_optimizer(0), params)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt = KerasOptimizer(ck["optimizer"]["cfg"], params)
        opt.load_state_dict(ck["optimizer"])
        rng = Rng.from_state(ck["rng"])
        if aug is not None:
            aug.rng = Rng.from_state(ck["aug_rng"])
        torch.set_rng_state(ck["torch_rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        for k in ("stage", "stage_epoch", "steps", "history", "early"):
            st[k] = ck[k]
        log(f"resuming {run_id} after epoch {len(st['history'])} (stage {st['stage'] + 1}, "
            f"step {st['steps']}, optimizer iterations {opt.iterations})")
    else:
        log(f"{run_id}: {cfg['description']}")
        log(f"  {cfg['network']}, {count_params(cfg['network']):,} params, seed {seed}, kestrel's initial weights "
            f"and batch order; device {env['device']}, torch {env['torch']}, tf32 {env['tf32']}")

    X = torch.from_numpy(xtr).to(device)
    Y = torch.from_numpy(ytr).to(device)
    XT = torch.from_numpy(xte).to(device)
    YT = torch.from_numpy(yte).to(device)
    bs = cfg["batch_size"]
    eval_bs = args.eval_batch or bs

    def evaluate():
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad():
            for s in range(0, len(XT), eval_bs):
                z = model(XT[s:s + eval_bs])
                y = YT[s:s + eval_bs]
                loss_sum += F.cross_entropy(z, y, reduction="sum").double()
                correct += (z.argmax(1) == y).sum()
        model.train()
        return loss_sum.item() / len(XT), correct.item() / len(XT)

    def save_checkpoint():
        ckd = {"run": run_id, "seed": seed, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "optimizer": opt.state_dict(), "rng": rng.state(), "aug_rng": aug.rng.state() if aug else None,
               "torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        for k in ("stage", "stage_epoch", "steps", "history", "early"):
            ckd[k] = st[k]
        torch.save(ckd, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)

    status = "finished"
    epoch_times = []
    n_stages = len(cfg["stages"])
    model.train()
    while st["stage"] < n_stages and status == "finished":
        si = st["stage"]
        stage_epochs, recompile = cfg["stages"][si]
        if st["stage_epoch"] == 0:
            # The stage starts now (a mid-stage resume has stage_epoch > 0 and
            # keeps the checkpoint's optimizer).
            if recompile is not None:
                opt = KerasOptimizer(recompile, params)  # Keras re-compile: fresh state
                log(f"stage {si + 1}/{n_stages}: re-compiled, {recompile}")
            st["early"] = None  # a new fit call: a new EarlyStopping state
        es_cfg = cfg["early_stopping"]
        if es_cfg and st["early"] is None:
            st["early"] = {"best": -math.inf, "wait": 0}
        while st["stage_epoch"] < stage_epochs:
            # The time budget: stop before an epoch that would end past it.
            known = epoch_times or [r["seconds"] for r in st["history"][-1:]]
            if args.time_budget and known:
                est = max(known[-3:])
                if time.time() - t_start + 1.1 * est + 5 > args.time_budget:
                    log(f"time budget: {time.time() - t_start:.0f} s used of {args.time_budget} s, an epoch "
                        f"takes ~{est:.1f} s: stopping here (resume with --resume)")
                    status = "interrupted"
                    break
            t0 = time.time()
            perm = rng.permutation(n_train)
            idx_all = torch.tensor(perm, dtype=torch.int64, device=device)
            if aug is not None:
                dy, dx, fl = aug.draw(n_train)
                DY = torch.tensor(dy, dtype=torch.int64, device=device)
                DX = torch.tensor(dx, dtype=torch.int64, device=device)
                FL = torch.tensor(fl, dtype=torch.bool, device=device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            lr_t_first = f32(opt.lr_t())
            steps = (n_train + bs - 1) // bs
            hit_max = False
            for s in range(steps):
                if args.max_steps is not None and st["steps"] >= args.max_steps:
                    hit_max = True
                    break
                idx = idx_all[s * bs:(s + 1) * bs]
                xb, yb = X[idx], Y[idx]
                if aug is not None:
                    xb = shift_flip_torch(xb, DY[s * bs:(s + 1) * bs], DX[s * bs:(s + 1) * bs],
                                          FL[s * bs:(s + 1) * bs])
                z = model(xb)
                loss = F.cross_entropy(z, yb)
                for p in params:
                    p.grad = None
                loss.backward()
                with torch.no_grad():
                    opt.step([p.grad for p in params])
                    nb = len(idx)
                    loss_sum += loss.detach().double() * nb
                    correct += (z.argmax(1) == yb).sum()
                seen += len(idx)
                st["steps"] += 1
            if seen == 0:  # --max-steps reached at an epoch boundary
                st["stage"] = n_stages
                break
            tl = loss_sum.item() / seen  # syncs: the epoch's training time ends here
            tacc = correct.item() / seen
            t_train = time.time() - t0
            if not math.isfinite(tl):
                log(f"epoch {len(st['history']) + 1}: the training loss is {tl}: stopped (TerminateOnNaN)")
                status = "diverged"
            vl, vacc = evaluate()
            st["stage_epoch"] += 1
            row = {"epoch": len(st["history"]) + 1, "stage": si, "loss": tl, "accuracy": tacc,
                   "val_loss": vl, "val_accuracy": vacc, "seconds": None, "train_seconds": t_train,
                   "lr_t": lr_t_first}
            st["history"].append(row)
            stop_es = False
            if es_cfg:
                e = st["early"]
                if vacc - es_cfg["min_delta"] > e["best"]:
                    e["best"], e["wait"] = vacc, 0
                else:
                    e["wait"] += 1
                    stop_es = e["wait"] >= es_cfg["patience"]
            stage_done = stop_es or st["stage_epoch"] >= stage_epochs
            if stage_done:
                st["stage"] += 1
                st["stage_epoch"] = 0
            row["seconds"] = time.time() - t0  # train + validation, as kestrel's epoch rows
            if status != "diverged":
                save_checkpoint()
            epoch_times.append(time.time() - t0)
            write_outputs(out, run_id, cfg, st, "running", env, data_info, args)
            log(f"epoch {row['epoch']:3d} (stage {si + 1}): loss {tl:.4f} acc {tacc:.4f} - val_loss {vl:.4f} "
                f"val_acc {vacc:.4f} - {row['seconds']:.1f} s ({t_train:.1f} s training)"
                + ("  early stopping" if stop_es else ""))
            if status == "diverged":
                break
            if hit_max:
                log(f"--max-steps {args.max_steps} reached")
                st["stage"] = n_stages
                break
            if args.stop_after and len(epoch_times) >= args.stop_after and st["stage"] < n_stages:
                log(f"--stop-after {args.stop_after}: stopping (resume with --resume)")
                status = "interrupted"
                break
            if stop.requested and st["stage"] < n_stages:
                status = "interrupted"
                break
            if stage_done:
                break
        if status == "finished" and stop.requested and st["stage"] < n_stages:
            status = "interrupted"
    res = write_outputs(out, run_id, cfg, st, status, env, data_info, args)
    log(f"{run_id}: {status} after {res['epochs']} epochs; best test acc {res['best_test_accuracy']} at epoch "
        f"{res['best_epoch']}, final {res['final_test_accuracy']}; {res['mean_seconds_per_epoch']} s/epoch on "
        f"{env['device']}; outputs in {out}")
    return {"finished": 0, "interrupted": EXIT_INTERRUPTED, "diverged": 3}[status]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="c1..c10, c11, c11a")
    ap.add_argument("--data", help="the CIFAR-10 binary files (or their parent)")
    ap.add_argument("--out", help="output directory (default runs-pytorch/<run>)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seed", type=lambda s: int(s, 0), help="replaces the run's seed (kestrel's config seed)")
    ap.add_argument("--epochs", type=int, help="cap on the epochs of each stage")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    ap.add_argument("--time-budget", type=float, help="seconds: stop (with a checkpoint) before exceeding")
    ap.add_argument("--stop-after", type=int, metavar="N", help="stop (with a checkpoint) after N epochs of this call")
    ap.add_argument("--max-steps", type=int, help="stop after this many training steps in all (smoke runs)")
    ap.add_argument("--synthetic", type=int, metavar="N", help="N random training images instead of --data")
    ap.add_argument("--eval-batch", type=int, help="validation batch size (default: the run's, 32)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in cuDNN and cuBLAS (default: plain f32)")
    ap.add_argument("--fast", action="store_true", help="cudnn.benchmark on, not deterministic")
    ap.add_argument("--selftest", action="store_true", help="check the generator twin and print its first draws")
    ap.add_argument("--write-fixture", metavar="PATH", help="write the values tests/rng_python_twin.rs checks")
    args = ap.parse_args()
    if args.selftest:
        sys.exit(0 if selftest(2 if args.seed is None else args.seed) else 1)
    if args.write_fixture:
        write_fixture(args.write_fixture)
        return
    if not args.run:
        ap.error("--run is needed (or --selftest / --write-fixture)")
    sys.exit(train(args))


if __name__ == "__main__":
    main()
