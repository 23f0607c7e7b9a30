#!/usr/bin/env python3
"""PyTorch baseline for kestrel's benchmarks: the same networks, batch sizes,
optimizers and layer shapes, on the same GPU (or on the CPU).

GPU (default, --device cuda):
  - training steps of keras-cnn (batch 32 and 128) and elu-cnn (32 and 128)
    with the seed runs' optimizers (RMSprop lr 1e-4 for keras-cnn c1 and
    elu-cnn c11, Adam for c10, SGD for c7), each in three modes:
      eager; eager with torch.optim.Adam(fused=True) / fused RMSprop-SGD
      where PyTorch has them; and a CUDA graph of the whole step
      (torch.cuda.graphs with capturable optimizers), or
      torch.compile(mode="reduce-overhead") with --compile;
  - per-layer convolution forward / backward-data / backward-filter of
    every conv layer of both networks at batch 32 and 128
    (torch.ops.aten.convolution_backward, i.e. cuDNN);
  - GEMMs at the same shapes as benches/gpu.rs (square 1024/2048/4096, every
    conv-as-GEMM and dense shape), torch.mm.
  cuDNN with benchmark=True; TF32 off for matmul and cuDNN (FP32 like ours).
  Timing: CUDA events around N calls after warm-up, median over repeats.

CPU (--device cpu): the Fashion-MNIST mlp epoch (784-300-100-10 relu,
  softmax, batch 32, SGD lr 0.01, 55,000 samples, shuffled) with
  torch.set_num_threads(--threads, default 2): seconds per epoch; plus the
  keras-cnn step at batch 32, the per-layer conv timings at batch 32, the
  GEMMs of benches/gemm_cpu.rs (torch.mm: square 512 and 2048, the mlp's
  layers at batch 32, the conv-like 64x3136x576; "cpugemm"), and the
  memory-bound ops of benches/ops_cpu.rs ("mem": max pooling, batch norm,
  dropout, the optimizers over keras-cnn's parameters), each with the id of
  the kestrel bench it goes beside.
  Only on a quiet machine: PyTorch's OpenMP threads collapse when the cores
  are shared, so check /proc/loadavg before and after (docs/perf-log.md).

Output: one JSON object on stdout: device, torch / cuDNN versions, settings,
and "results": [{"family", "id", "median_ms", "work", "unit"}], where "id"
follows kestrel's bench ids (benches/common/mod.rs), so that
`ci/bench-report --pytorch FILE` can put each beside ours.

  python3 benches/pytorch_baseline.py > pytorch-h100.json
  python3 benches/pytorch_baseline.py --device cpu > pytorch-cpu.json
"""

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# (net, layer, in channels, in size, filters, padding) -- benches/common/mod.rs
KERAS_CNN_CONVS = [
    ("keras-cnn", "conv1", 3, 32, 32, 1),
    ("keras-cnn", "conv2", 32, 32, 32, 0),
    ("keras-cnn", "conv3", 32, 15, 64, 1),
    ("keras-cnn", "conv4", 64, 15, 64, 0),
]
ELU_CNN_CONVS = [
    ("elu-cnn", "conv1", 3, 32, 128, 1),
    ("elu-cnn", "conv2", 128, 32, 128, 0),
    ("elu-cnn", "conv3", 128, 15, 256, 1),
    ("elu-cnn", "conv4", 256, 15, 256, 0),
    ("elu-cnn", "conv5", 256, 6, 512, 1),
    ("elu-cnn", "conv6", 512, 6, 512, 0),
]
DENSES = [
    ("keras-cnn", "dense1", 2304, 512),
    ("keras-cnn", "dense2", 512, 10),
    ("elu-cnn", "dense1", 2048, 1024),
    ("elu-cnn", "dense2", 1024, 10),
]
MLP_DENSES = [("mlp", "dense1", 784, 300), ("mlp", "dense2", 300, 100), ("mlp", "dense3", 100, 10)]


def keras_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(2304, 512), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(512, 10),
    )


def elu_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 128, 3, padding=1), nn.ELU(),
        nn.Conv2d(128, 128, 3), nn.ELU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(128, 256, 3, padding=1), nn.ELU(),
        nn.Conv2d(256, 256, 3), nn.ELU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(256, 512, 3, padding=1), nn.ELU(),
        nn.Conv2d(512, 512, 3), nn.ELU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(2048, 1024), nn.ELU(), nn.Dropout(0.5),
        nn.Linear(1024, 10),
    )


def mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )


class Timer:
    """Median milliseconds per call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device, repeats, min_ms):
        self.device = device
        self.repeats = repeats
        self.min_ms = min_ms

    def _once(self, fn, n):
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) * 1e3

    def median_ms(self, fn, warmup=3):
        for _ in range(warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        # Calls per repeat: enough for min_ms of work.
        n = 1
        while True:
            ms = self._once(fn, n)
            if ms >= self.min_ms or n >= 1 << 16:
                break
            n *= 4
        per = [self._once(fn, n) / n for _ in range(self.repeats)]
        return statistics.median(per)


def conv_flops(n, c, hw, k, pad):
    out = hw + 2 * pad - 2
    return 2.0 * n * k * out * out * c * 9


def conv_passes(device, n, c, hw, k, pad):
    """The three timed passes of one convolution: (name, callable) pairs."""
    x = torch.randn(n, c, hw, hw, device=device)
    w = torch.randn(k, c, 3, 3, device=device)
    y = F.conv2d(x, w, padding=pad)
    dy = torch.randn_like(y)

    def fwd():
        F.conv2d(x, w, padding=pad)

    def bwd(mask):
        torch.ops.aten.convolution_backward(
            dy, x, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, mask)

    return [("fwd", fwd), ("bwd_data", lambda: bwd([True, False, False])),
            ("bwd_filter", lambda: bwd([False, True, False]))]


def bench_convs(timer, device, batches, out):
    for n in batches:
        for net, name, c, hw, k, pad in KERAS_CNN_CONVS + ELU_CNN_CONVS:
            flops = conv_flops(n, c, hw, k, pad)
            base = f"{net}.{name}.b{n}"
            for pass_, fn in conv_passes(device, n, c, hw, k, pad):
                ms = timer.median_ms(fn)
                out.append(dict(family="conv", id=f"{base}.{pass_}", median_ms=ms,
                                work=flops, unit="GFLOP/s"))


def serve_gemms():
    """Answers `MxNxK REPS ROUNDS` lines on stdin with ROUNDS milliseconds per
    call of torch.mm (each over REPS calls) on one line, as kestrel's
    `cpu_gemm_ab serve` does (benches/cpu_close_pairs.py --family gemm)."""
    cache = {}
    for line in sys.stdin:
        f = line.split()
        try:
            m, n, k = (int(d) for d in f[0].split("x"))
            reps, rounds = int(f[1]), int(f[2])
            assert len(f) == 3 and reps > 0
        except (ValueError, IndexError, AssertionError):
            print(f"error: expected MxNxK REPS ROUNDS, got {line.strip()!r}", flush=True)
            continue
        if (m, n, k) not in cache:
            cache[(m, n, k)] = (torch.randn(m, k), torch.randn(k, n), torch.empty(m, n))
        a, b, c = cache[(m, n, k)]
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            times.append((time.perf_counter() - t) * 1e3 / reps)
        print(" ".join(f"{t:.6f}" for t in times), flush=True)


def serve_convs(device, n):
    """Answers `LAYER PASS ROUNDS` lines on stdin (`conv2 fwd 5`, keras-cnn's
    layers) with that many milliseconds of single calls on one line, as
    kestrel's `cpu_conv_ab serve` does: benches/cpu_close_pairs.py alternates
    the two."""
    passes = {}
    for net, name, c, hw, k, pad in KERAS_CNN_CONVS:
        for pass_, fn in conv_passes(device, n, c, hw, k, pad):
            passes[(name, pass_)] = fn
    for line in sys.stdin:
        f = line.split()
        fn = passes.get(tuple(f[:2])) if len(f) == 3 and f[2].isdigit() else None
        if fn is None:
            print(f"error: unknown request {line.strip()!r}", flush=True)
            continue
        times = []
        for _ in range(int(f[2])):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        print(" ".join(f"{t:.4f}" for t in times), flush=True)


def gemm_shapes(batches):
    """(id, m, n, k, trans_a, trans_b) as in benches/common/mod.rs."""
    shapes = [(f"square.{s}", s, s, s, False, False) for s in (1024, 2048, 4096)]
    for n in batches:
        for net, name, c, hw, k, pad in KERAS_CNN_CONVS + ELU_CNN_CONVS:
            o = hw + 2 * pad - 2
            crs, np_ = c * 9, n * o * o
            b = f"{net}.{name}.b{n}"
            shapes += [(f"{b}.fwd", k, np_, crs, False, False),
                       (f"{b}.bwd_data", crs, np_, k, True, False),
                       (f"{b}.bwd_filter", k, crs, np_, False, True)]
        for net, name, i, u in DENSES:
            b = f"{net}.{name}.b{n}"
            shapes += [(f"{b}.fwd", n, u, i, False, False),
                       (f"{b}.bwd_data", n, i, u, False, True),
                       (f"{b}.bwd_filter", i, u, n, True, False)]
    for net, name, i, u in MLP_DENSES:
        b = f"{net}.{name}.b32"
        shapes += [(f"{b}.fwd", 32, u, i, False, False),
                   (f"{b}.bwd_data", 32, i, u, False, True),
                   (f"{b}.bwd_filter", i, u, 32, True, False)]
    return shapes


def bench_gemms(timer, device, batches, out):
    for gid, m, n, k, ta, tb in gemm_shapes(batches):
        a = torch.randn(k, m, device=device).t() if ta else torch.randn(m, k, device=device)
        b = torch.randn(n, k, device=device).t() if tb else torch.randn(k, n, device=device)
        c = torch.empty(m, n, device=device)
        ms = timer.median_ms(lambda: torch.mm(a, b, out=c))
        out.append(dict(family="gemm", id=gid, median_ms=ms, work=2.0 * m * n * k,
                        unit="GFLOP/s"))


# benches/gemm_cpu.rs: (id, m, n, k), C = A B, all row-major.
CPU_GEMMS = [(512, 512, 512), (2048, 2048, 2048), (32, 300, 784), (32, 100, 300),
             (32, 10, 100), (64, 3136, 576)]


def bench_cpu_gemms(timer, out):
    for m, n, k in CPU_GEMMS:
        a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        ms = timer.median_ms(lambda: torch.mm(a, b, out=c))
        out.append(dict(family="gemm", id=f"{m}x{n}x{k}", median_ms=ms, work=2.0 * m * n * k,
                        unit="GFLOP/s"))


# benches/common/mod.rs: POOLS (net, name, channels, size), DROPOUTS (net,
# name, elements per sample), KERAS_CNN_PARAMS.
POOLS = [("keras-cnn", "pool1", 32, 30), ("keras-cnn", "pool2", 64, 13),
         ("elu-cnn", "pool1", 128, 30), ("elu-cnn", "pool2", 256, 13), ("elu-cnn", "pool3", 512, 4)]
DROPOUTS = [("keras-cnn", "drop1", 32 * 15 * 15), ("keras-cnn", "drop2", 64 * 6 * 6),
            ("keras-cnn", "drop3", 512), ("elu-cnn", "drop1", 128 * 15 * 15),
            ("elu-cnn", "drop2", 256 * 6 * 6), ("elu-cnn", "drop3", 512 * 2 * 2),
            ("elu-cnn", "drop4", 1024)]
KERAS_CNN_PARAM_SHAPES = [(32, 3, 3, 3), (32,), (32, 32, 3, 3), (32,), (64, 32, 3, 3), (64,),
                          (64, 64, 3, 3), (64,), (2304, 512), (512,), (512, 10), (10,)]


def bench_memory_bound(timer, out):
    """The ops of benches/ops_cpu.rs at the same sizes, batch 32. "work" is
    the bytes kestrel's bench counts for the same op, so rates compare."""
    n = 32
    for net, name, c, hw in POOLS:
        x = torch.randn(n, c, hw, hw)
        y, idx = F.max_pool2d(x, 2, 2, return_indices=True)
        dy = torch.randn_like(y)
        base = f"{net}.{name}.b{n}"
        fwd_bytes = 4 * x.numel() + 8 * y.numel()
        ms = timer.median_ms(lambda: F.max_pool2d(x, 2, 2, return_indices=True))
        out.append(dict(family="pool", id=f"{base}.fwd", median_ms=ms, work=fwd_bytes, unit="GB/s"))
        ms = timer.median_ms(lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            dy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx))
        out.append(dict(family="pool", id=f"{base}.bwd", median_ms=ms, work=fwd_bytes, unit="GB/s"))
    for bid, ch, spatial in [("mlp.bn784.b32", 784, 1), ("mlp.bn300.b32", 300, 1),
                             ("mlp.bn100.b32", 100, 1), ("keras-cnn.conv1-out.b32", 32, 32 * 32)]:
        shape = (n, ch) if spatial == 1 else (n, ch, 32, 32)
        x, dy = torch.randn(*shape), torch.randn(*shape)
        g, b = torch.randn(ch), torch.randn(ch)
        rm, rv = torch.zeros(ch), torch.ones(ch)
        length = x.numel()
        ms = timer.median_ms(lambda: torch.native_batch_norm(x, g, b, rm, rv, True, 0.01, 1e-3))
        out.append(dict(family="batchnorm", id=f"{bid}.fwd", median_ms=ms,
                        work=4 * (2 * length + 8 * ch), unit="GB/s"))
        _, sm, si = torch.native_batch_norm(x, g, b, rm, rv, True, 0.01, 1e-3)
        ms = timer.median_ms(lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, g, rm, rv, sm, si, True, 1e-3, [True, True, True]))
        out.append(dict(family="batchnorm", id=f"{bid}.bwd", median_ms=ms,
                        work=4 * (3 * length + 5 * ch), unit="GB/s"))
    for net, name, per in DROPOUTS:
        rate = 0.25 if name in ("drop1", "drop2") else 0.5
        x, dy = torch.randn(n * per), torch.randn(n * per)
        _, mask = torch.native_dropout(x, rate, True)
        base = f"{net}.{name}.b{n}"
        ms = timer.median_ms(lambda: torch.native_dropout(x, rate, True))
        out.append(dict(family="dropout", id=f"{base}.fwd", median_ms=ms, work=9 * x.numel(),
                        unit="GB/s"))
        ms = timer.median_ms(lambda: torch.ops.aten.native_dropout_backward(dy, mask, 1 / (1 - rate)))
        out.append(dict(family="dropout", id=f"{base}.bwd", median_ms=ms, work=9 * x.numel(),
                        unit="GB/s"))
    total = sum(torch.Size(s).numel() for s in KERAS_CNN_PARAM_SHAPES)
    for oid, make, clip, slots in [
            ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.01), False, 1),
            ("momentum", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.5), False, 1),
            ("nesterov", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.5, nesterov=True), False, 1),
            ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=0.01, eps=1e-7), False, 1),
            ("rmsprop", lambda ps: torch.optim.RMSprop(ps, lr=1e-4, alpha=0.9, eps=1e-7), False, 1),
            ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-7), False, 2),
            ("adam_clipnorm", lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-7), True, 2)]:
        ps = [torch.randn(*s, requires_grad=True) for s in KERAS_CNN_PARAM_SHAPES]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(ps)

        def step():
            if clip:
                torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()

        ms = timer.median_ms(step)
        per = 4 + 4 + 4 + slots * 8 + (4 if clip else 0)
        out.append(dict(family="optim", id=f"keras-cnn.{oid}.p{total}", median_ms=ms,
                        work=per * total, unit="GB/s"))


def bench_memory_bound_gpu(timer, device, out):
    """The >= 256 MB rows of benches/gpu.rs's memory-bound groups, on the
    GPU, with the ids of ours less the kernel version ("work" is the bytes
    our bench counts for the same op), and a device-to-device copy of 256 MB
    as the ceiling. PyTorch's own kernels (eager, FP32)."""
    big = 1 << 26
    src = torch.empty(big // 2, device=device)
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    out.append(dict(family="copy", id="dtod.256MB", median_ms=ms, work=4 * big, unit="GB/s"))
    # Max pooling 2x2/2 on [256, 64, 64, 64].
    x = torch.randn(256, 64, 64, 64, device=device)
    y, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    dy = torch.randn_like(y)
    work = 4 * x.numel() + 8 * y.numel()
    ms = timer.median_ms(lambda: F.max_pool2d(x, 2, 2, return_indices=True))
    out.append(dict(family="pool", id="large.256x64x64x64.fwd", median_ms=ms, work=work, unit="GB/s"))
    ms = timer.median_ms(lambda: torch.ops.aten.max_pool2d_with_indices_backward(
        dy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx))
    out.append(dict(family="pool", id="large.256x64x64x64.bwd", median_ms=ms, work=work, unit="GB/s"))
    del x, y, idx, dy
    # Batch norm (training forward, backward) and bias (add, gradient), both layouts.
    for bid, shape in [("dense.8192x8192", (8192, 8192)), ("large.256x64x64x64", (256, 64, 64, 64))]:
        ch = shape[1]
        x, dy = torch.randn(*shape, device=device), torch.randn(*shape, device=device)
        g, b = torch.randn(ch, device=device), torch.randn(ch, device=device)
        rm, rv = torch.zeros(ch, device=device), torch.ones(ch, device=device)
        length = x.numel()
        ms = timer.median_ms(lambda: torch.native_batch_norm(x, g, b, rm, rv, True, 0.01, 1e-3))
        out.append(dict(family="batchnorm", id=f"{bid}.fwd", median_ms=ms,
                        work=4 * (2 * length + 8 * ch), unit="GB/s"))
        _, sm, si = torch.native_batch_norm(x, g, b, rm, rv, True, 0.01, 1e-3)
        ms = timer.median_ms(lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, g, rm, rv, sm, si, True, 1e-3, [True, True, True]))
        out.append(dict(family="batchnorm", id=f"{bid}.bwd", median_ms=ms,
                        work=4 * (3 * length + 5 * ch), unit="GB/s"))
        bshape = (1, ch) if len(shape) == 2 else (1, ch, 1, 1)
        bb = b.view(bshape)
        ms = timer.median_ms(lambda: torch.add(x, bb))
        out.append(dict(family="bias", id=f"{bid}.fwd", median_ms=ms, work=4 * (2 * length + ch),
                        unit="GB/s"))
        dims = [0] if len(shape) == 2 else [0, 2, 3]
        ms = timer.median_ms(lambda: dy.sum(dims))
        out.append(dict(family="bias", id=f"{bid}.bwd", median_ms=ms, work=4 * (length + ch),
                        unit="GB/s"))
        del x, dy
    # Activations: forward y = f(x), backward from x, y, dy.
    x, dy = torch.randn(big, device=device), torch.randn(big, device=device)
    for name, fwd, bwd in [
            ("relu", F.relu, lambda y, d: torch.ops.aten.threshold_backward(d, y, 0.0)),
            ("elu", F.elu, lambda y, d: torch.ops.aten.elu_backward(d, 1.0, 1.0, 1.0, True, y)),
            ("tanh", torch.tanh, lambda y, d: torch.ops.aten.tanh_backward(d, y)),
            ("sigmoid", torch.sigmoid, lambda y, d: torch.ops.aten.sigmoid_backward(d, y))]:
        y = fwd(x)
        ms = timer.median_ms(lambda: fwd(x))
        out.append(dict(family="activation", id=f"large.64M.{name}.fwd", median_ms=ms, work=8 * big,
                        unit="GB/s"))
        ms = timer.median_ms(lambda: bwd(y, dy))
        out.append(dict(family="activation", id=f"large.64M.{name}.bwd", median_ms=ms, work=16 * big,
                        unit="GB/s"))
    # Dropout 0.5 over 2^26 floats.
    _, mask = torch.native_dropout(x, 0.5, True)
    ms = timer.median_ms(lambda: torch.native_dropout(x, 0.5, True))
    out.append(dict(family="dropout", id="large.64M.fwd", median_ms=ms, work=9 * big, unit="GB/s"))
    ms = timer.median_ms(lambda: torch.ops.aten.native_dropout_backward(dy, mask, 2.0))
    out.append(dict(family="dropout", id="large.64M.bwd", median_ms=ms, work=9 * big, unit="GB/s"))
    del x, dy, mask
    # Softmax + cross-entropy (forward and the logits' gradient), 2^23 x 10.
    n, classes = 1 << 23, 10
    z = torch.randn(n, classes, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (n,), device=device)

    def xent():
        loss = F.cross_entropy(z, labels)
        (gz,) = torch.autograd.grad(loss, z)
        return gz

    ms = timer.median_ms(xent)
    out.append(dict(family="softmax_ce", id="large.8Mx10.fwd_bwd", median_ms=ms,
                    work=4 * (3 * n * classes + n), unit="GB/s"))
    del z
    # Fused optimizers over all of keras-cnn's parameters and over one 2^26 tensor.
    total = sum(torch.Size(s).numel() for s in KERAS_CNN_PARAM_SHAPES)
    for oid, make, slots in [
            ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.01, foreach=True), 1),
            ("momentum", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.5, foreach=True), 1),
            ("rmsprop", lambda ps: torch.optim.RMSprop(ps, lr=1e-4, alpha=0.9, eps=1e-7, foreach=True), 1),
            ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=0.01, eps=1e-7, foreach=True), 1),
            ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-7, fused=True), 2)]:
        for oid_full, shapes in [(f"keras-cnn.{oid}.p{total}", KERAS_CNN_PARAM_SHAPES),
                                 (f"large.{oid}.p{big}", [(big,)])]:
            ps = [torch.randn(*s, device=device, requires_grad=True) for s in shapes]
            for p in ps:
                p.grad = torch.randn_like(p) * 1e-3
            opt = make(ps)
            count = sum(p.numel() for p in ps)
            ms = timer.median_ms(opt.step)
            out.append(dict(family="optim", id=oid_full, median_ms=ms,
                            work=(4 + 4 + 4 + slots * 8) * count, unit="GB/s"))
            del ps, opt


def make_optimizer(kind, params, device, fused, capturable=False):
    kw = {}
    if device.type == "cuda":
        if fused:
            kw["fused"] = True
        if capturable:
            kw["capturable"] = True
    if kind == "rmsprop":
        # Keras: rho 0.9, eps 1e-7 outside the sqrt (PyTorch: eps outside too).
        return torch.optim.RMSprop(params, lr=1e-4, alpha=0.9, eps=1e-7,
                                   **({} if not capturable else {"capturable": True}))
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3, eps=1e-7, **kw)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.01, **({"fused": True} if fused and device.type == "cuda" else {}))
    raise ValueError(kind)


def bench_steps(timer, device, cases, out, use_compile):
    for net, n, opt_kind in cases:
        for mode in ("eager", "fused", "graph"):
            if mode == "fused" and opt_kind == "rmsprop":
                continue  # RMSprop has no fused implementation
            if mode == "graph" and device.type != "cuda":
                continue
            torch.manual_seed(0)
            model = (keras_cnn() if net == "keras-cnn" else elu_cnn()).to(device)
            x = torch.randn(n, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (n,), device=device)
            loss_fn = nn.CrossEntropyLoss()
            try:
                if mode == "graph":
                    ms = graph_step_ms(timer, model, x, y, loss_fn, opt_kind, device, use_compile)
                else:
                    opt = make_optimizer(opt_kind, model.parameters(), device, mode == "fused")

                    def step():
                        opt.zero_grad(set_to_none=True)
                        loss_fn(model(x), y).backward()
                        opt.step()

                    ms = timer.median_ms(step, warmup=5)
            except Exception as e:  # noqa: BLE001 -- report and go on
                print(f"{net} b{n} {opt_kind} {mode}: {e}", file=sys.stderr)
                continue
            out.append(dict(family="step", id=f"{net}.step.b{n}.{opt_kind}.{mode}",
                            median_ms=ms, work=n, unit="samples/s"))


def graph_step_ms(timer, model, x, y, loss_fn, opt_kind, device, use_compile):
    if use_compile:
        opt = make_optimizer(opt_kind, model.parameters(), device, False)

        @torch.compile(mode="reduce-overhead")
        def fwd_bwd(x, y):
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        def step():
            opt.zero_grad(set_to_none=False)
            fwd_bwd(x, y)
            opt.step()

        return timer.median_ms(step, warmup=10)
    # Whole step (forward, backward, optimizer) captured in one CUDA graph,
    # following the recipe of the PyTorch CUDA-graphs documentation.
    opt = make_optimizer(opt_kind, model.parameters(), device, opt_kind != "rmsprop",
                         capturable=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return timer.median_ms(g.replay, warmup=5)


def mlp_epoch_seconds(device, samples=55_000, batch=32, epochs=3):
    """Seconds per epoch of the Fashion-MNIST mlp (SGD lr 0.01), median of `epochs`."""
    torch.manual_seed(0)
    model = mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.rand(samples, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (samples,), device=device)
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        perm = torch.randperm(samples, device=device)
        for i in range(0, samples, batch):
            idx = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    ap.add_argument("--compile", action="store_true",
                    help='graph mode via torch.compile(mode="reduce-overhead") instead of CUDA graphs')
    ap.add_argument("--only", default="",
                    help="comma list of: conv,gemm,step,epoch (GPU and CPU), gpumem (GPU), cpugemm,mem (CPU)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--serve-conv", action="store_true",
                    help="answer `LAYER PASS ROUNDS` requests on stdin (benches/cpu_close_pairs.py)")
    ap.add_argument("--serve-gemm", action="store_true",
                    help="answer `MxNxK REPS ROUNDS` requests on stdin (CPU; benches/cpu_close_pairs.py)")
    args = ap.parse_args()

    device = torch.device(args.device)
    # FP32 everywhere, like kestrel: no TF32 in matmul or cuDNN.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.serve_conv:
        serve_convs(device, 32)
        return
    if args.serve_gemm:
        serve_gemms()
        return
    only = set(filter(None, args.only.split(",")))

    def want(f):
        return not only or f in only

    results = []
    if device.type == "cuda":
        timer = Timer(device, args.repeats, min_ms=20.0)
        name = torch.cuda.get_device_name(0)
        batches = [32, 128]
        if want("gemm"):
            bench_gemms(timer, device, batches, results)
        if want("conv"):
            bench_convs(timer, device, batches, results)
        if want("step"):
            cases = [("keras-cnn", 32, "rmsprop"), ("keras-cnn", 32, "adam"),
                     ("keras-cnn", 32, "sgd"), ("keras-cnn", 128, "rmsprop"),
                     ("elu-cnn", 32, "rmsprop"), ("elu-cnn", 128, "rmsprop"),
                     ("elu-cnn", 32, "adam"), ("elu-cnn", 128, "adam")]
            bench_steps(timer, device, cases, results, args.compile)
        if want("epoch"):
            s = mlp_epoch_seconds(device)
            results.append(dict(family="epoch", id="mlp.epoch.b32", median_ms=s * 1e3,
                                work=55_000, unit="samples/s"))
        if want("gpumem"):
            bench_memory_bound_gpu(timer, device, results)
    else:
        timer = Timer(device, max(3, args.repeats // 2), min_ms=200.0)
        name = cpu_model()
        if want("epoch"):
            s = mlp_epoch_seconds(device)
            print(f"mlp epoch (55,000 samples, batch 32, SGD, {args.threads} threads): "
                  f"{s:.2f} s", file=sys.stderr)
            results.append(dict(family="epoch", id="mlp.epoch.b32", median_ms=s * 1e3,
                                work=55_000, unit="samples/s"))
        if want("step"):
            bench_steps(timer, device, [("keras-cnn", 32, "rmsprop")], results, False)
        if want("conv"):
            bench_convs(timer, device, [32], results)
        if want("cpugemm"):
            bench_cpu_gemms(timer, results)
        if want("mem"):
            bench_memory_bound(timer, results)

    json.dump(dict(
        device=name,
        device_type=device.type,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        settings=dict(tf32=False, cudnn_benchmark=True,
                      graph_mode="torch.compile reduce-overhead" if args.compile else "cuda graph"),
        time=int(time.time()),
        results=results,
    ), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
