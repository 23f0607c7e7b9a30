#!/usr/bin/env bash
# The Fashion-MNIST mlp (784-300-100-10 relu, SGD lr 0.01, batch 32, 55,000
# training samples) one epoch at a time on the CPU: kestrel's f1 run and
# PyTorch's CPU build (benches/pytorch_baseline.py --device cpu), one after
# the other in the same invocation, with the same thread count, so the two
# seconds-per-epoch figures are comparable.
#
#   benches/cpu_mlp_epoch.sh [PYTHON] [EPOCHS]
#
# PYTHON must have torch (and numpy); EPOCHS (default 3) epochs of each.
# Prints one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
epochs=${2:-3}
threads=$(nproc)
cargo build --release --quiet --bin kestrel
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
load_before=$(cut -d' ' -f1 /proc/loadavg)
./target/release/kestrel train configs/f1-mlp-sgd.toml --device cpu --epochs "$epochs" \
    --out "$out/f1" --quiet >/dev/null 2>"$out/kestrel.log"
# kestrel reports the mean over its epochs (PyTorch's side the median): if
# anything this favours PyTorch.
kestrel_s=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds_per_epoch"])' "$out/f1/result.json")
RAYON_NUM_THREADS=$threads "$py" benches/pytorch_baseline.py --device cpu --threads "$threads" --only epoch \
    > "$out/torch.json" 2>"$out/torch.log"
torch_s=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print([b["median_ms"] for b in r["results"] if b["id"]=="mlp.epoch.b32"][0]/1e3)' "$out/torch.json")
torch_v=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("torch","?"))' "$out/torch.json")
load_after=$(cut -d' ' -f1 /proc/loadavg)
python3 - "$kestrel_s" "$torch_s" "$torch_v" "$threads" "$load_before" "$load_after" <<'PY'
import json, sys, platform
k, t = float(sys.argv[1]), float(sys.argv[2])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(json.dumps(dict(bench="mlp epoch, batch 32, SGD, 55,000 samples", cpu=cpu, threads=int(sys.argv[4]),
                      kestrel_s_per_epoch=round(k, 3), pytorch_s_per_epoch=round(t, 3), torch=sys.argv[3],
                      pytorch_over_kestrel=round(t / k, 3), loadavg_before=sys.argv[5], loadavg_after=sys.argv[6])))
PY
