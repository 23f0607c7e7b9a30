#!/usr/bin/env bash
# Every issue-16 comparison of kestrel's CPU backend with PyTorch's CPU
# build, as interleaved pairs on a quiet machine: each repetition runs
# kestrel, then PyTorch, for every family in turn, with the same thread
# count; the table gives the median over the repetitions of each side.
#
#   benches/cpu_quiet_pairs.sh OUT.md
#
# Environment:
#   REPS=3                         repetitions (pairs) per family
#   THREADS=2                      threads for both (RAYON_NUM_THREADS,
#                                  MATMUL_NUM_THREADS, torch.set_num_threads)
#   KESTREL_TORCH_PYTHON=/tmp/tv/bin/python   a python with torch and numpy
#   MAX_LOAD=1.0                   refuse to start when the 1-minute load
#                                  average is above this ...
#   FORCE=1                        ... unless forced: then every figure is
#                                  marked UNDER LOAD (void for comparisons:
#                                  PyTorch's OpenMP threads collapse when the
#                                  cores are shared, docs/perf-log.md)
#   MAX_OTHERS=0.05                after the run, figures are marked UNDER
#                                  LOAD too when other processes took more
#                                  than this share of the machine's CPU time
#                                  (/proc/stat's busy time less our own
#                                  children's; the load average after the
#                                  run would count our own threads)
#   FAMILIES=gemm,conv,step,epoch,mem   which families to run
#
# The harness is the existing one: kestrel examples/cpu_gemm_ab (with the
# matrixmultiply crate beside it), examples/cpu_conv_ab, examples/cpu_mem_ab
# (each op beside a memcpy of its bytes in the same rounds), the criterion
# benches step_cpu (keras-cnn.step.b32) and ops_cpu (cpu_optim, with their
# memcpy baselines), benches/cpu_mlp_epoch.sh; PyTorch through
# benches/pytorch_baseline.py --device cpu (--only cpugemm, conv, step, mem),
# whose ids match kestrel's.
set -euo pipefail
cd "$(dirname "$0")/.."
out_md=${1:?usage: benches/cpu_quiet_pairs.sh OUT.md}
reps=${REPS:-3}
threads=${THREADS:-2}
py=${KESTREL_TORCH_PYTHON:-/tmp/tv/bin/python}
max_load=${MAX_LOAD:-1.0}
families=${FAMILIES:-gemm,conv,step,epoch,mem}
want() { [[ ",$families," == *",$1,"* ]]; }

load_now() { cut -d' ' -f1 /proc/loadavg; }
above() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a > b) }'; }

load0=$(load_now)
under_load=0
if above "$load0" "$max_load"; then
    if [ "${FORCE:-0}" != 1 ]; then
        echo "cpu_quiet_pairs: load average $load0 is above $max_load: the machine is not quiet," >&2
        echo "  and PyTorch's OpenMP threads collapse on shared cores. Refusing (FORCE=1 overrides," >&2
        echo "  marking every figure UNDER LOAD)." >&2
        exit 3
    fi
    under_load=1
    for _ in 1 2 3; do
        echo "cpu_quiet_pairs: WARNING: load average $load0 > $max_load: UNDER LOAD, figures void for comparison" >&2
    done
fi
"$py" -c 'import torch' 2>/dev/null || {
    echo "cpu_quiet_pairs: $py has no torch (set KESTREL_TORCH_PYTHON)" >&2
    exit 2
}

cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
simd_flags=$(tr ' ' '\n' <<<"$cpu_flags" | grep -E '^(sse4_2|avx|avx2|fma|avx512[a-z0-9_]*|amx[a-z0-9_]*)$' | tr '\n' ' ')
echo "CPU: $cpu_model ($(nproc) logical CPUs)"
echo "flags: $cpu_flags"
echo "load average before: $(cat /proc/loadavg)"

export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
echo "building (release: examples, kestrel, benches step_cpu and ops_cpu) ..." >&2
cargo build --release --quiet --examples --bin kestrel
cargo bench --quiet --no-run --bench step_cpu --bench ops_cpu 2>/dev/null

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
# CPU time the whole machine spends busy (/proc/stat, clock ticks), to
# subtract ours from at the end: the 1-minute load average after the run
# counts our own two threads, so it cannot tell whether anything else ran.
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
busy0=$(busy_ticks)
wall0=$(date +%s.%N)
export RAYON_NUM_THREADS=$threads MATMUL_NUM_THREADS=$threads
torch_run() { "$py" benches/pytorch_baseline.py --device cpu --threads "$threads" --only "$1"; }
# The criterion median (ns) of GROUP/FUNCTION/ID, just written.
crit() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["median"]["point_estimate"])' \
    "target/criterion/$1/new/estimates.json"; }

for i in $(seq 1 "$reps"); do
    echo "repetition $i of $reps (load $(load_now))" >&2
    if want gemm; then
        target/release/examples/cpu_gemm_ab 5 >"$raw/k-gemm-$i.txt"
        torch_run cpugemm >"$raw/t-gemm-$i.json" 2>/dev/null
    fi
    if want conv; then
        target/release/examples/cpu_conv_ab 5 32 >"$raw/k-conv-$i.txt"
        torch_run conv >"$raw/t-conv-$i.json" 2>/dev/null
    fi
    if want step; then
        cargo bench --quiet --bench step_cpu -- 'keras-cnn.step.b32' >/dev/null 2>&1
        crit cpu_step/kestrel/keras-cnn.step.b32 >"$raw/k-step-$i.txt"
        torch_run step >"$raw/t-step-$i.json" 2>/dev/null
    fi
    if want epoch; then
        # One epoch each, kestrel then PyTorch, in one invocation.
        benches/cpu_mlp_epoch.sh "$py" 1 >"$raw/epoch-$i.json" 2>/dev/null
    fi
    if want mem; then
        target/release/examples/cpu_mem_ab 21 >"$raw/k-mem-$i.txt"
        cargo bench --quiet --bench ops_cpu -- 'cpu_optim/' >/dev/null 2>&1
        for d in target/criterion/cpu_optim/kestrel/*/; do
            id=$(basename "$d")
            echo "$id $(crit "cpu_optim/kestrel/$id") $(crit "cpu_optim/memcpy/$id")"
        done >"$raw/k-optim-$i.txt"
        torch_run mem >"$raw/t-mem-$i.json" 2>/dev/null
    fi
done
load1=$(load_now)
echo "load average after: $(cat /proc/loadavg)"
# Other processes' share of the machine during the run: all busy time less
# our children's (bash's `times`: user and system of finished children).
hz=$(getconf CLK_TCK)
times >"$raw/times" # in this shell: a subshell would report its own children
ours=$(tail -1 "$raw/times" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); t += a[1] * 60 + a[2] } print t }')
others=$(awk -v b0="$busy0" -v b1="$(busy_ticks)" -v hz="$hz" -v ours="$ours" \
    -v w0="$wall0" -v w1="$(date +%s.%N)" -v n="$(nproc)" \
    'BEGIN { o = (b1 - b0) / hz - ours; if (o < 0) o = 0; printf "%.3f", o / ((w1 - w0) * n) }')
echo "other processes used $others of the machine's CPU time during the run"
if above "$others" "${MAX_OTHERS:-0.05}"; then under_load=1; fi

python3 - "$raw" "$reps" "$out_md" "$cpu_model" "$simd_flags" "$threads" "$load0" "$load1" \
    "$under_load" "$("$py" -c 'import torch; print(torch.__version__)')" "$others" <<'PY'
import glob, json, os, re, statistics, sys
raw, reps, out_md, cpu, flags, threads, l0, l1, under, torch_v, others = sys.argv[1:]
reps = int(reps)
med = lambda v: statistics.median(v) if v else None

def torch_rows(kind):
    """id -> [median_ms per repetition] from pytorch_baseline.py's JSON."""
    rows = {}
    for f in sorted(glob.glob(f"{raw}/t-{kind}-*.json")):
        try:
            for r in json.load(open(f))["results"]:
                rows.setdefault(r["id"], []).append(r["median_ms"])
        except (ValueError, KeyError):
            pass
    return rows

def kestrel_lines(kind):
    return [open(f).read() for f in sorted(glob.glob(f"{raw}/k-{kind}-*.txt"))]

fmt = lambda v, d=3: "—" if v is None else f"{v:.{d}f}"
ratio = lambda a, b: "—" if a is None or b is None else f"{a / b:.2f}"
lines = [f"# kestrel vs PyTorch on the CPU: interleaved pairs", "",
         f"- CPU: {cpu}; SIMD flags: {flags}",
         f"- threads: {threads} each; {reps} pairs per family, kestrel then PyTorch; medians",
         f"- PyTorch {torch_v}; load average {l0} before, {l1} after (ours included); "
         f"other processes' share of the CPU time during the run: {float(others):.1%}", ""]
if under == "1":
    lines += ["**UNDER LOAD: the load average before the run, or other processes' CPU time "
              "during it, was above its limit; these figures are void for kestrel-vs-PyTorch "
              "comparisons (PyTorch's threads collapse on shared cores).**", ""]

# GEMM: cpu_gemm_ab prints "MxNxK (...)" then one line per kernel and matrixmultiply.
k_gemm, mm_gemm, best_kernel = {}, {}, None
for text in kestrel_lines("gemm"):
    shape = None
    for line in text.splitlines():
        m = re.match(r"^(\d+x\d+x\d+) \(", line)
        if m:
            shape = m.group(1)
            continue
        m = re.match(r"^\s+(\S+)\s+([\d.]+) ms\s+([\d.]+) GFLOP/s", line)
        if m and shape:
            name, gf = m.group(1), float(m.group(3))
            if name == "matrixmultiply":
                mm_gemm.setdefault(shape, []).append(gf)
            else:
                # The kernels come lowest first: the last one is what `gemm` picks.
                k_gemm.setdefault(shape, {})[name] = k_gemm.get(shape, {}).get(name, []) + [gf]
                best_kernel = name
t_gemm = torch_rows("gemm")
if k_gemm:
    lines += ["## GEMM (C = A B, row-major), GFLOP/s (higher is better)", "",
              f"| m x n x k | kestrel ({best_kernel}) | torch.matmul | kestrel / torch | matrixmultiply | kestrel / matrixmultiply |",
              "|---|---:|---:|---:|---:|---:|"]
    for shape, per in k_gemm.items():
        k = med(per.get(best_kernel, []))
        m_, n_, kk = map(int, shape.split("x"))
        t = med([2 * m_ * n_ * kk / (ms * 1e-3) / 1e9 for ms in t_gemm.get(shape, [])])
        mm = med(mm_gemm.get(shape, []))
        lines.append(f"| {shape} | {fmt(k, 1)} | {fmt(t, 1)} | {ratio(k, t)} | {fmt(mm, 1)} | {ratio(k, mm)} |")
    lines.append("")

# Conv layers: cpu_conv_ab prints "ID  X ms ..."; times, lower is better.
k_conv = {}
for text in kestrel_lines("conv"):
    for line in text.splitlines():
        m = re.match(r"^\s*(keras-cnn\.\S+)\s+([\d.]+) ms", line)
        if m:
            k_conv.setdefault(m.group(1), []).append(float(m.group(2)))
t_conv = torch_rows("conv")
if k_conv:
    lines += ["## keras-cnn convolutions at batch 32, ms (lower is better)", "",
              "| layer.pass | kestrel | PyTorch | kestrel / PyTorch (time) |", "|---|---:|---:|---:|"]
    for cid, v in k_conv.items():
        k, t = med(v), med(t_conv.get(cid, []))
        lines.append(f"| {cid} | {fmt(k)} | {fmt(t)} | {ratio(k, t)} |")
    lines.append("")

# Step and epoch.
k_step = [float(s) / 1e6 for s in kestrel_lines("step") if s.strip()]
t_step = torch_rows("step").get("keras-cnn.step.b32.rmsprop.eager", [])
epochs = []
for f in sorted(glob.glob(f"{raw}/epoch-*.json")):
    try:
        epochs.append(json.load(open(f)))
    except ValueError:
        pass
if k_step or epochs:
    lines += ["## Training, lower is better", "",
              "| what | kestrel | PyTorch | kestrel / PyTorch (time) | target |", "|---|---:|---:|---:|---|"]
    if k_step:
        k, t = med(k_step), med(t_step)
        lines.append(f"| keras-cnn step, batch 32, RMSprop (ms) | {fmt(k, 1)} | {fmt(t, 1)} | {ratio(k, t)} | <= 1.0 |")
    if epochs:
        k = med([e["kestrel_s_per_epoch"] for e in epochs])
        t = med([e["pytorch_s_per_epoch"] for e in epochs])
        lines.append(f"| Fashion-MNIST mlp epoch, batch 32, SGD (s) | {fmt(k)} | {fmt(t)} | {ratio(k, t)} | <= 0.8 |")
    lines.append("")

# Memory-bound ops: cpu_mem_ab "name median_us min_us memcpy_us ratio cold_us", the
# criterion optimizers "id kestrel_ns memcpy_ns", PyTorch's mem rows.
alias = {"bn.fwd": "keras-cnn.conv1-out.b32.fwd", "bn.bwd": "keras-cnn.conv1-out.b32.bwd"}
k_mem, c_mem = {}, {}
for text in kestrel_lines("mem"):
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 5:  # a 6th field: the op's cold first call (not compared)
            k_mem.setdefault(f[0], []).append(float(f[1]) / 1e3)
            c_mem.setdefault(f[0], []).append(float(f[3]) / 1e3)
for text in kestrel_lines("optim"):
    for line in text.splitlines():
        f = line.split()
        if len(f) == 3:
            k_mem.setdefault(f[0], []).append(float(f[1]) / 1e6)
            c_mem.setdefault(f[0], []).append(float(f[2]) / 1e6)
t_mem = torch_rows("mem")
if k_mem:
    lines += ["## Memory-bound ops, ms (lower is better); memcpy of the same bytes timed beside kestrel's", "",
              "| op | kestrel | memcpy | kestrel / memcpy (target <= 3) | PyTorch | kestrel / PyTorch (time) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, v in k_mem.items():
        k, c = med(v), med(c_mem[name])
        t = med(t_mem.get(alias.get(name, name), []))
        lines.append(f"| {alias.get(name, name)} ({name}) | {fmt(k)} | {fmt(c)} | {ratio(k, c)} | {fmt(t)} | {ratio(k, t)} |"
                     if name in alias else
                     f"| {name} | {fmt(k)} | {fmt(c)} | {ratio(k, c)} | {fmt(t)} | {ratio(k, t)} |")
    lines += ["", "cpu_mem_ab's memcpy is one thread's `copy_from_slice`; ops_cpu's (the optimizers) is "
              "split over the rayon pool like the ops.", ""]
open(out_md, "w").write("\n".join(lines) + "\n")
print(f"wrote {out_md}")
PY
