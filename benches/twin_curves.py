#!/usr/bin/env python3
"""Validation accuracy per epoch of a kestrel run beside its PyTorch twin,
as one SVG (no plotting library: the standard library only).

    python3 benches/twin_curves.py docs/cifar-cpu/c7-kestrel-history.csv \
        docs/cifar-cpu/c7-pytorch-history.csv "c7: SGD 0.01" docs/c7-twin.svg

Each history is the `history.csv` a run wrote (kestrel's or
`benches/pytorch_cifar.py`'s): one row per epoch with `val_accuracy`.
The output is written atomically (a temporary file, then a rename)."""

import csv
import os
import sys
import tempfile

W, H = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 48, 52
SERIES = [("kestrel (CPU)", "#1f5fbf"), ("PyTorch twin (CPU)", "#d0602a")]


def val_accuracy(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "val_accuracy" not in rows[0]:
        sys.exit(f"{path}: expected a history.csv with a val_accuracy column")
    return [100.0 * float(r["val_accuracy"]) for r in rows]


def svg(curves, title):
    n = max(len(c) for c in curves)
    lo = min(min(c) for c in curves)
    hi = max(max(c) for c in curves)
    ylo, yhi = 5 * int(lo // 5), 5 * (int(hi // 5) + 1)
    x = lambda e: LEFT + (e - 1) / max(n - 1, 1) * (W - LEFT - RIGHT)
    y = lambda v: TOP + (yhi - v) / (yhi - ylo) * (H - TOP - BOTTOM)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="13">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16">{title}</text>',
    ]
    for v in range(ylo, yhi + 1, 5):
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>')
    step = 10 if n > 30 else 5
    for e in [1] + list(range(step, n + 1, step)):
        out.append(f'<text x="{x(e):.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">{e}</text>')
    out.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
        f'fill="none" stroke="#333"/>'
    )
    out.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">epoch</text>')
    out.append(
        f'<text transform="translate(18,{(TOP + H - BOTTOM) / 2}) rotate(-90)" '
        f'text-anchor="middle">validation accuracy (%)</text>'
    )
    for k, (curve, (name, colour)) in enumerate(zip(curves, SERIES)):
        pts = " ".join(f"{x(i + 1):.1f},{y(v):.1f}" for i, v in enumerate(curve))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        best = max(range(len(curve)), key=lambda i: curve[i])
        label = f"{name}: {len(curve)} epochs, end {curve[-1]:.2f}%, best {curve[best]:.2f}% (epoch {best + 1})"
        ly = H - BOTTOM - 40 + 18 * k
        out.append(f'<line x1="{LEFT + 110}" x2="{LEFT + 134}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{LEFT + 140}" y="{ly}">{label}</text>')
    out.append("</svg>\n")
    return "\n".join(out)


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    ours, twin, title, dest = sys.argv[1:]
    text = svg([val_accuracy(ours), val_accuracy(twin)], title)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets, not a figure
    os.replace(tmp, dest)


if __name__ == "__main__":
    main()
