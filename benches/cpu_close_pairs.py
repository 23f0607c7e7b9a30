"""kestrel against PyTorch on the CPU in pairs milliseconds apart: keras-cnn's
convolutions (`--family conv`) or the GEMM shapes of the issue-16 targets
(`--family gemm`).

    benches/cpu_close_pairs.py OUT.md [--family conv] [--threads 2] [--reps 20] [--rounds 5]

`benches/cpu_quiet_pairs.sh` runs each side's whole family (seconds to
minutes) before the other's; this VM's speed drifts by up to 2x over such
spans (docs/perf-log.md, fifth sitting), so one side can land in a slow
stretch and the other in a fast one. Here both sides stay loaded in their
own process (`cpu_conv_ab serve` / `cpu_gemm_ab serve`,
`pytorch_baseline.py --serve-conv` / `--serve-gemm`) and every row
alternates between them: for each repetition and each row, `ROUNDS` timed
calls of one side, then of the other (the order flips each repetition).
The table gives each side's median over all calls, and the median and
quartiles of the per-repetition ratios. A GEMM "call" is timed over
enough repeated products for ~20 MFLOP (one for the large shapes).

The first calls of each side's turn, at least one and at least 40 ms of
them, are made and not counted: they absorb the hand-over. PyTorch's
OpenMP threads spin after their last call (libgomp's default; its process
took 10 ms of CPU in the 25 ms after a call here), on the cores kestrel's
next call needs; rayon's workers spin for microseconds only. Resting
instead is worse: rayon's workers, asleep after a rest, wake with a delay
on this VM; with half a second of rest before each turn (`--gap 0.5`),
kestrel's median of five calls of conv4's forward ranged over 3.8-8.1 ms
against 3.3-4.1 ms without rest, kestrel against itself (docs/perf-log.md,
fifth sitting).

It refuses to start when the 1-minute load average is above --max-load
(PyTorch's OpenMP threads collapse on shared cores) unless --force, and
marks the figures UNDER LOAD when other processes took more than 5% of the
machine's CPU time during the run.
"""

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import time

LAYERS = ["conv1", "conv2", "conv3", "conv4"]
PASSES = ["fwd", "bwd_data", "bwd_filter"]
# The GEMM rows that have targets (docs/perf-log.md): square, the mlp's
# layers at batch 32, the conv-like shape.
GEMMS = [(512, 512, 512), (2048, 2048, 2048), (32, 300, 784), (32, 100, 300), (32, 10, 100),
         (64, 3136, 576)]


def rows(family):
    """(row id, request without its ROUNDS) of a family."""
    if family == "conv":
        return [(f"keras-cnn.{l}.b32.{p}", f"{l} {p}") for l in LAYERS for p in PASSES]
    out = []
    for m, n, k in GEMMS:
        reps = max(1, round(2e7 / (2 * m * n * k)))
        out.append((f"{m}x{n}x{k}", f"{m}x{n}x{k} {reps}"))
    return out
# Uncounted time at the start of each turn: longer than libgomp's spinning
# after PyTorch's last call (about 25 ms here), so that kestrel's counted
# calls never share a core with it.
HANDOVER_MS = 40.0
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

    def times(self, request, rounds):
        self.p.stdin.write(f"{request} {rounds}\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line or line.startswith("error"):
            sys.exit(f"cpu_close_pairs: {self.name} answered {line.strip()!r} "
                     f"to {request} {rounds}")
        return [float(t) for t in line.split()]

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def cpu_and_simd_flags():
    """The CPU's model name and its SIMD flags, from the first processor in
    /proc/cpuinfo."""
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    want = ("avx", "avx2", "fma", "sse4_2")
    flags = " ".join(x for x in info.get("flags", "").split()
                     if x in want or x.startswith("avx512") or x.startswith("amx"))
    return info.get("model name", "unknown CPU"), flags


def quartiles(v):
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], q[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--family", choices=["conv", "gemm"], default="conv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
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
            sys.exit(f"cpu_close_pairs: load average {load0} is above {a.max_load}: not quiet "
                     "(--force marks every figure UNDER LOAD)")
        under = True
    example = "cpu_conv_ab" if a.family == "conv" else "cpu_gemm_ab"
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", example],
                   cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    # From here on, every CPU second our two servers spend is in the window
    # [busy0, busy1]: the rest of the machine's busy time is other work.
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, wall0 = busy_seconds(), time.time()
    sides = [
        Server("kestrel", [os.path.join(ROOT, "target/release/examples", example), "serve"], env),
        Server("PyTorch", [a.python, os.path.join(ROOT, "benches/pytorch_baseline.py"),
                           "--device", "cpu", "--threads", str(a.threads),
                           f"--serve-{a.family}"], env),
    ]
    table = rows(a.family)
    # Warm-up: every row three times; from it, how many calls of a turn go
    # uncounted: enough for HANDOVER_MS (module docs), at least one.
    skip = {}
    for s in sides:
        for rid, req in table:
            ms = statistics.median(s.times(req, 3))
            skip[(s.name, rid)] = max(1, min(500, math.ceil(HANDOVER_MS / max(ms, 1e-3))))

    calls = {(s.name, rid): [] for s in sides for rid, _ in table}
    ratios = {rid: [] for rid, _ in table}
    for rep in range(a.reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        for rid, req in table:
            med = {}
            for s in order:
                time.sleep(a.gap)
                # The first calls absorb the hand-over (module docs).
                n = skip[(s.name, rid)]
                t = s.times(req, a.rounds + n)[n:]
                calls[(s.name, rid)] += t
                med[s.name] = statistics.median(t)
            ratios[rid].append(med["kestrel"] / med["PyTorch"])
    for s in sides:
        s.close()
    busy1, wall1 = busy_seconds(), time.time()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (ru.ru_utime + ru.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    others = max(0.0, (busy1 - busy0) - ours) / ((wall1 - wall0) * os.cpu_count())
    under = under or others > 0.05

    cpu, flags = cpu_and_simd_flags()
    mark = " **UNDER LOAD: void for comparison**" if under else ""
    what = {"conv": "keras-cnn convolutions at batch 32", "gemm": "GEMM (C = A B, row-major)"}
    lines = [
        f"# {what[a.family]}, kestrel vs PyTorch on the CPU: pairs milliseconds apart",
        "",
        f"- CPU: {cpu}; SIMD flags: {flags}",
        f"- threads: {a.threads} each; {a.reps} repetitions x {a.rounds} calls per side and row "
        f"(after {HANDOVER_MS:.0f} ms of uncounted ones), the sides alternating per row (order flipped each repetition), "
        f"{a.gap} s of rest before each turn",
        f"- load average {load0:.2f} before; other processes' share of the CPU time during "
        f"the run: {others:.1%}{mark}",
        "",
        "| row | kestrel ms | PyTorch ms | kestrel / PyTorch, time (median of the repetitions' ratios) | quartiles |",
        "|---|---:|---:|---:|---|",
    ]
    for rid, _ in table:
        k = statistics.median(calls[("kestrel", rid)])
        t = statistics.median(calls[("PyTorch", rid)])
        r = ratios[rid]
        lo, hi = quartiles(r)
        lines.append(f"| {rid} | {k:.4f} | {t:.4f} | {statistics.median(r):.2f} | {lo:.2f}-{hi:.2f} |")
    text = "\n".join(lines) + "\n"
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, a.out)
    print(text)


if __name__ == "__main__":
    main()
