#!/usr/bin/env python3
"""keras-cnn's convolutions, kestrel against PyTorch on the CPU, in pairs a
second apart.

    benches/cpu_conv_pairs.py OUT.md [--threads 2] [--reps 12] [--rounds 5]

`benches/cpu_quiet_pairs.sh` runs each side's whole conv family (seconds to
minutes) before the other's; this VM's speed drifts by 30% and more over
such spans (docs/perf-log.md, fifth sitting), so one side can land in a
slow stretch and the other in a fast one. Here both sides stay loaded in
their own process (`cpu_conv_ab serve`, `pytorch_baseline.py
--serve-conv`) and every pass alternates between them: for each repetition
and each pass, `ROUNDS` calls of one side, then of the other (the order
flips each repetition). The table gives each side's median over all calls,
and the median and quartiles of the per-repetition ratios.

The first call of each side's turn is made and not counted: it absorbs the
hand-over. PyTorch's OpenMP threads spin for a while after their last call
(libgomp's default), on the cores kestrel's next call needs, and rayon's
workers, asleep after a rest, wake with a delay on this VM: with half a
second of rest before each turn (`--gap 0.5`), kestrel's median of five
calls of conv4's forward ranged over 3.8-8.1 ms against 3.3-4.1 ms without
rest, kestrel against itself (docs/perf-log.md, fifth sitting).

It refuses to start when the 1-minute load average is above --max-load
(PyTorch's OpenMP threads collapse on shared cores) unless --force, and
marks the figures UNDER LOAD when other processes took more than 5% of the
machine's CPU time during the run.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

LAYERS = ["conv1", "conv2", "conv3", "conv4"]
PASSES = ["fwd", "bwd_data", "bwd_filter"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def busy_seconds():
    """CPU time the whole machine spent busy, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, name, argv, env):
        self.name = name
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env, cwd=ROOT)

    def times(self, layer, pass_, rounds):
        self.p.stdin.write(f"{layer} {pass_} {rounds}\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line or line.startswith("error"):
            sys.exit(f"cpu_conv_pairs: {self.name} answered {line.strip()!r} "
                     f"to {layer} {pass_} {rounds}")
        return [float(t) for t in line.split()]

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def quartiles(v):
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], q[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--python", default=os.environ.get("KESTREL_TORCH_PYTHON", "/tmp/tv/bin/python"))
    ap.add_argument("--gap", type=float, default=0.0,
                    help="seconds of rest before each side's calls (see the module docs)")
    ap.add_argument("--max-load", type=float, default=1.0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()

    load0 = os.getloadavg()[0]
    under = False
    if load0 > a.max_load:
        if not a.force:
            sys.exit(f"cpu_conv_pairs: load average {load0} is above {a.max_load}: not quiet "
                     "(--force marks every figure UNDER LOAD)")
        under = True
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "cpu_conv_ab"],
                   cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    # From here on, every CPU second our two servers spend is in the window
    # [busy0, busy1]: the rest of the machine's busy time is other work.
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, wall0 = busy_seconds(), time.time()
    sides = [
        Server("kestrel", [os.path.join(ROOT, "target/release/examples/cpu_conv_ab"), "serve"], env),
        Server("PyTorch", [a.python, os.path.join(ROOT, "benches/pytorch_baseline.py"),
                           "--device", "cpu", "--threads", str(a.threads), "--serve-conv"], env),
    ]
    for s in sides:  # warm-up: every pass twice
        for layer in LAYERS:
            for pass_ in PASSES:
                s.times(layer, pass_, 2)

    calls = {(s.name, l, p): [] for s in sides for l in LAYERS for p in PASSES}
    ratios = {(l, p): [] for l in LAYERS for p in PASSES}
    for rep in range(a.reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        for layer in LAYERS:
            for pass_ in PASSES:
                med = {}
                for s in order:
                    time.sleep(a.gap)
                    # One call more than counted: the first absorbs the
                    # hand-over (module docs).
                    t = s.times(layer, pass_, a.rounds + 1)[1:]
                    calls[(s.name, layer, pass_)] += t
                    med[s.name] = statistics.median(t)
                ratios[(layer, pass_)].append(med["kestrel"] / med["PyTorch"])
    for s in sides:
        s.close()
    busy1, wall1 = busy_seconds(), time.time()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (ru.ru_utime + ru.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    others = max(0.0, (busy1 - busy0) - ours) / ((wall1 - wall0) * os.cpu_count())
    under = under or others > 0.05

    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                want = ("avx", "avx2", "fma", "sse4_2")
                flags = " ".join(x for x in line.split(":", 1)[1].split()
                                 if x in want or x.startswith("avx512") or x.startswith("amx"))
                break
    mark = " **UNDER LOAD: void for comparison**" if under else ""
    lines = [
        "# keras-cnn convolutions, kestrel vs PyTorch on the CPU: pairs a second apart",
        "",
        f"- CPU: {cpu}; SIMD flags: {flags}",
        f"- threads: {a.threads} each; {a.reps} repetitions x {a.rounds} calls per side and pass "
        f"(after one uncounted), the sides alternating per pass (order flipped each repetition), "
        f"{a.gap} s of rest before each turn",
        f"- load average {load0:.2f} before; other processes' share of the CPU time during "
        f"the run: {others:.1%}{mark}",
        "",
        "| layer.pass | kestrel ms | PyTorch ms | kestrel / PyTorch (median of the repetitions' ratios) | quartiles |",
        "|---|---:|---:|---:|---|",
    ]
    for layer in LAYERS:
        for pass_ in PASSES:
            k = statistics.median(calls[("kestrel", layer, pass_)])
            t = statistics.median(calls[("PyTorch", layer, pass_)])
            r = ratios[(layer, pass_)]
            lo, hi = quartiles(r)
            lines.append(f"| keras-cnn.{layer}.b32.{pass_} | {k:.3f} | {t:.3f} | "
                         f"{statistics.median(r):.2f} | {lo:.2f}-{hi:.2f} |")
    text = "\n".join(lines) + "\n"
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, a.out)
    print(text)


if __name__ == "__main__":
    main()
