#!/usr/bin/env python3
"""Compiles kernels/*.cu to kernels/ptx/*.ptx with the pinned NVRTC (ci/setup).

    ci/ptx            regenerate the PTX and kernels/ptx/manifest.json
    ci/ptx --check    fail when the committed PTX or manifest differs from a fresh one

A kernel file targets compute_70 (every GPU since Volta) unless its first
lines say otherwise with `// kestrel-target: compute_XX`, for kernels that
need newer hardware; the host picks those by compute capability at run time.
NVRTC runs without a GPU, so this works on any x86-64 Linux machine.

The manifest (ci/ptx_manifest.py, docs/manifest.md) describes every entry
point, its parameters and the layout of the structs it takes, for frameworks
that launch the PTX without kestrel's Rust code.
"""
import ctypes
import os
import difflib
import pathlib
import re
import sys

import ptx_manifest

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
PTX_DIR = KERNELS / "ptx"
MANIFEST = PTX_DIR / "manifest.json"
NVRTC = ROOT / ".tools/cuda/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
DEFAULT_TARGET = "compute_70"
# -lineinfo keeps source lines for compute-sanitizer and ncu without slowing
# the code; fast-math stays off so the kernels round like the CPU reference.
OPTIONS = ["-std=c++17", "-lineinfo", "-default-device", "-I."]


def load_nvrtc():
    if not NVRTC.exists():
        sys.exit(f"ci/ptx: {NVRTC} is missing: run ci/setup first")
    lib = ctypes.CDLL(str(NVRTC))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def check(lib, status, what):
    if status != 0:
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")


def target_of(source: str) -> str:
    m = re.search(r"^// kestrel-target: (compute_\w+)", source, re.M)
    return m.group(1) if m else DEFAULT_TARGET


def compile_one(lib, path: pathlib.Path) -> str:
    source = path.read_text()
    prog = ctypes.c_void_p()
    check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), path.name.encode(),
                                      0, None, None), f"{path.name}: nvrtcCreateProgram")
    try:
        opts = OPTIONS + [f"-arch={target_of(source)}"]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        log_size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
        log = ctypes.create_string_buffer(log_size.value)
        lib.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace").strip()
        if status != 0:
            raise RuntimeError(f"{path.name} failed to compile:\n{text}")
        if text:
            # Warnings fail the build too: they are how NVRTC reports most slips.
            raise RuntimeError(f"{path.name} compiled with warnings:\n{text}")
        size = ctypes.c_size_t()
        check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        buf = ctypes.create_string_buffer(size.value)
        check(lib, lib.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
        # -lineinfo records source paths, which NVRTC makes absolute from the
        # working directory (main() runs in kernels/); strip that prefix so
        # the PTX is the same in every checkout.
        return buf.value.decode().replace(f'"{KERNELS}/', '"kernels/')
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def diff_lines(old: str, new: str, name: str):
    return list(difflib.unified_diff(old.splitlines(), new.splitlines(), name, "fresh", lineterm="", n=1))


def manifest(compiled, check_only: bool) -> bool:
    """Writes (or, with --check, compares) kernels/ptx/manifest.json; False on failure."""
    try:
        text = ptx_manifest.build(compiled, ROOT)
    except ptx_manifest.ManifestError as e:
        print(f"ci/ptx: manifest: {e}", file=sys.stderr)
        return False
    rel = MANIFEST.relative_to(ROOT)
    if check_only:
        old = MANIFEST.read_text() if MANIFEST.exists() else ""
        if old != text:
            print(f"ci/ptx --check: {rel} differs from a fresh manifest (run ci/ptx and commit):",
                  file=sys.stderr)
            print("\n".join(diff_lines(old, text, str(rel))[:40]), file=sys.stderr)
            return False
        return True
    tmp = MANIFEST.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(MANIFEST)
    print(f"manifest -> {rel} ({len(text.encode())} bytes)")
    return True


def main(argv):
    check_only = "--check" in argv
    lib = load_nvrtc()
    os.chdir(KERNELS)
    sources = sorted(KERNELS.glob("*.cu"))
    if not sources:
        sys.exit("ci/ptx: no kernels/*.cu found")
    PTX_DIR.mkdir(exist_ok=True)
    failed = False
    expected = set()
    compiled = []
    for src in sources:
        out = PTX_DIR / (src.stem + ".ptx")
        expected.add(out.name)
        try:
            ptx = compile_one(lib, src)
        except RuntimeError as e:
            print(f"ci/ptx: {e}", file=sys.stderr)
            failed = True
            continue
        compiled.append((src, ptx, target_of(src.read_text())))
        if check_only:
            old = out.read_text() if out.exists() else ""
            if old != ptx:
                diff = list(difflib.unified_diff(old.splitlines(), ptx.splitlines(),
                                                 str(out), "fresh compile", lineterm="", n=1))
                print(f"ci/ptx --check: {out.relative_to(ROOT)} differs from a fresh compile of "
                      f"{src.relative_to(ROOT)} (run ci/ptx and commit):", file=sys.stderr)
                print("\n".join(diff[:40]), file=sys.stderr)
                failed = True
        else:
            tmp = out.with_suffix(".ptx.tmp")
            tmp.write_text(ptx)
            tmp.replace(out)
            print(f"{src.relative_to(ROOT)} -> {out.relative_to(ROOT)} ({target_of(src.read_text())})")
    if not failed:
        failed = not manifest(compiled, check_only)
    stale = sorted(p.name for p in PTX_DIR.glob("*.ptx") if p.name not in expected)
    if stale:
        print(f"ci/ptx: PTX without a source: {stale}", file=sys.stderr)
        failed = True
    if check_only and not failed:
        print(f"ci/ptx --check: {len(sources)} kernel files match their committed PTX, "
              f"and {MANIFEST.relative_to(ROOT)} matches a fresh manifest")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
