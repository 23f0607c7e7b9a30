"""The PTX manifest (kernels/ptx/manifest.json), written by ci/ptx beside the PTX.

What a framework in another language needs to launch kestrel's kernels from
the PTX alone: per module its file, target and minimum compute capability;
per entry point its parameters in order (name and C type from the .cu
signature, size and alignment from the PTX `.param` declarations), its launch
bounds and the comment above it in the source; the C layout of every struct
an entry takes (by value or through a pointer), computed from the .cu struct
definition and checked against the source's `static_assert(sizeof(X) == N)`
and against the PTX; and the values of the enums those structs carry.
docs/manifest.md describes the schema.

Every disagreement between the source and the PTX (an entry on one side
only, a parameter count or size that differs, a struct whose computed size
differs from its static_assert) is an error: ci/ptx fails on it.
"""
import hashlib
import json
import pathlib
import re

SCHEMA = 1

# (size, alignment) of the C types the kernels use (64-bit CUDA ABI).
SCALARS = {
    "bool": (1, 1),
    "char": (1, 1),
    "unsigned char": (1, 1),
    "signed char": (1, 1),
    "short": (2, 2),
    "unsigned short": (2, 2),
    "int": (4, 4),
    "unsigned int": (4, 4),
    "u32": (4, 4),
    "float": (4, 4),
    "long long": (8, 8),
    "unsigned long long": (8, 8),
    "u64": (8, 8),
    "double": (8, 8),
}
POINTER = (8, 8)


class ManifestError(RuntimeError):
    pass


def blank_comments(text: str) -> str:
    """The text with every // comment replaced by spaces (offsets and lines kept)."""
    return re.sub(r"//[^\n]*", lambda m: " " * len(m.group()), text)


def translation_unit(path: pathlib.Path, seen=None):
    """The file and every file it #includes with quotes, depth first, each once."""
    seen = [] if seen is None else seen
    if path in seen:
        return seen
    seen.append(path)
    for inc in re.findall(r'^#include "([^"]+)"', path.read_text(), re.M):
        translation_unit(path.parent / inc, seen)
    return seen


def normalize_type(t: str) -> str:
    t = t.replace("__restrict__", " ").replace("*", " * ")
    t = " ".join(t.split())
    return t.replace(" *", "*")


class Layouts:
    """Struct and enum definitions of one translation unit, and their C layouts."""

    def __init__(self, files, root: pathlib.Path):
        self.structs = {}  # name -> (fields [(type, name, count)], defined_in)
        self.enums = {}  # name -> (underlying type, [(name, value)], defined_in)
        self.asserts = {}  # name -> (size, file)
        for f in files:
            rel = f.relative_to(root).as_posix()
            text = blank_comments(f.read_text())
            for m in re.finditer(r"\benum\s+(\w+)\s*(?::\s*(\w+))?\s*\{([^}]*)\}", text):
                if m.group(2) is None:
                    raise ManifestError(f"{rel}: enum {m.group(1)} has no fixed underlying type "
                                        f"(write `enum {m.group(1)} : u32`)")
                values, nxt = [], 0
                for item in filter(None, (s.strip() for s in m.group(3).split(","))):
                    name, _, value = (p.strip() for p in item.partition("="))
                    nxt = int(value, 0) if value else nxt
                    values.append((name, nxt))
                    nxt += 1
                self.enums[m.group(1)] = (m.group(2), values, rel)
            for m in re.finditer(r"\bstruct\s+(\w+)\s*\{([^}]*)\}\s*;", text):
                self.structs[m.group(1)] = (self.parse_fields(m.group(2), f"{rel}: struct {m.group(1)}"), rel)
            for m in re.finditer(r"static_assert\s*\(\s*sizeof\s*\(\s*(\w+)\s*\)\s*==\s*(\d+)", text):
                self.asserts[m.group(1)] = (int(m.group(2)), rel)

    @staticmethod
    def parse_fields(body: str, what: str):
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            first, *more = (p.strip() for p in decl.split(","))
            m = re.fullmatch(r"(.*?)(\w+)\s*(?:\[\s*(\d+)\s*\])?", first, re.S)
            if not m or not m.group(1).strip():
                raise ManifestError(f"{what}: cannot read the field declaration `{decl}`")
            ctype = normalize_type(m.group(1))
            fields.append((ctype, m.group(2), int(m.group(3) or 1)))
            for name in more:
                n = re.fullmatch(r"(\w+)\s*(?:\[\s*(\d+)\s*\])?", name)
                if not n:
                    raise ManifestError(f"{what}: cannot read the field `{name}` of `{decl}`")
                fields.append((ctype, n.group(1), int(n.group(2) or 1)))
        return fields

    def size_align(self, ctype: str, what: str):
        if ctype.endswith("*"):
            return POINTER
        base = ctype.removeprefix("const ").removeprefix("volatile ")
        if base in SCALARS:
            return SCALARS[base]
        if base in self.enums:
            return self.size_align(self.enums[base][0], what)
        if base in self.structs:
            layout = self.layout(base)
            return layout["size"], layout["align"]
        raise ManifestError(f"{what}: unknown C type `{ctype}` (add it to ci/ptx_manifest.py)")

    def layout(self, name: str):
        """The C layout: fields at their alignment, the size rounded up to the largest."""
        fields, rel = self.structs[name]
        offset, align, out = 0, 1, []
        for ctype, fname, count in fields:
            size, falign = self.size_align(ctype, f"{rel}: {name}.{fname}")
            offset = (offset + falign - 1) // falign * falign
            field = {"name": fname, "type": ctype, "offset": offset, "size": size * count}
            if count > 1:
                field["count"] = count
            out.append(field)
            offset += size * count
            align = max(align, falign)
        size = (offset + align - 1) // align * align
        return {"defined_in": rel, "size": size, "align": align, "fields": out}

    def struct_of(self, ctype: str):
        base = ctype.removeprefix("const ").rstrip("*")
        return base if base in self.structs else None

    def checked_layout(self, name: str, module: str):
        layout = self.layout(name)
        if name not in self.asserts:
            raise ManifestError(f"{module}: struct {name} ({layout['defined_in']}) is passed to a kernel "
                                f"but its translation unit has no static_assert(sizeof({name}) == N)")
        want, where = self.asserts[name]
        if want != layout["size"]:
            raise ManifestError(f"{module}: struct {name} laid out by the C rules is {layout['size']} bytes, "
                                f"but {where} asserts sizeof({name}) == {want}")
        return layout


PTX_SCALAR_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8}


def ptx_entries(ptx: str, module: str):
    """name -> {"params": [(size, align)], directives} for every .entry of the PTX."""
    entries = {}
    for m in re.finditer(r"^\.(?:visible|weak) \.entry (\w+)\(\s*(.*?)\)\s*\n((?:\.\w+[^\n]*\n)*)\{", ptx,
                         re.M | re.S):
        params = []
        for line in filter(None, (p.strip() for p in m.group(2).split(","))):
            p = re.fullmatch(r"\.param\s+(?:\.align\s+(\d+)\s+)?\.([a-z]+)(\d+)\s+\w+(?:\[(\d+)\])?", line)
            if not p:
                raise ManifestError(f"{module}: cannot read the PTX parameter `{line}` of {m.group(1)}")
            elem = PTX_SCALAR_BYTES[p.group(3)]
            size = elem * int(p.group(4) or 1)
            params.append((size, int(p.group(1) or elem)))
        directives = {}
        for d in re.finditer(r"^\.(maxntid|reqntid|minnctapersm|maxnreg)\s+([\d,\s]+?)\s*$", m.group(3), re.M):
            directives[d.group(1)] = [int(v) for v in d.group(2).split(",")]
        entries[m.group(1)] = {"params": params, "directives": directives}
    return entries


def comment_above(lines, index: int) -> str:
    """The // comment lines directly above line `index`, joined into one string."""
    out = []
    i = index - 1
    while i >= 0 and lines[i].strip().startswith("//"):
        out.append(lines[i].strip()[2:].strip())
        i -= 1
    return " ".join(reversed(out))


SIGNATURE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')


def module_manifest(src: pathlib.Path, ptx: str, target: str, root: pathlib.Path, structs: dict, enums: dict):
    module = src.relative_to(root).as_posix()
    files = translation_unit(src)
    layouts = Layouts(files, root)
    raw = src.read_text()
    text = blank_comments(raw)
    lines = raw.splitlines()
    ptx_target = re.search(r"^\.target (sm_\d+)", ptx, re.M)
    if not ptx_target:
        raise ManifestError(f"{module}: the PTX has no .target line")
    cc = int(target.removeprefix("compute_").rstrip("af"))
    if ptx_target.group(1) != f"sm_{cc}":
        raise ManifestError(f"{module}: declared {target} but the PTX says .target {ptx_target.group(1)}")
    in_ptx = ptx_entries(ptx, module)
    entries = []
    for m in SIGNATURE.finditer(text):
        name = m.group(1)
        if name not in in_ptx:
            raise ManifestError(f"{module}: kernel {name} is not an .entry of the PTX")
        pinfo = in_ptx.pop(name)
        decls = [d.strip() for d in m.group(2).split(",") if d.strip()]
        if len(decls) != len(pinfo["params"]):
            raise ManifestError(f"{module}: {name} has {len(decls)} parameters in the source, "
                                f"{len(pinfo['params'])} in the PTX")
        params = []
        for decl, (size, align) in zip(decls, pinfo["params"]):
            d = re.fullmatch(r"(.*?)(\w+)", decl, re.S)
            ctype = normalize_type(d.group(1))
            csize, calign = layouts.size_align(ctype, f"{module}: {name}({d.group(2)})")
            if (csize, calign) != (size, align):
                raise ManifestError(f"{module}: {name}'s parameter {d.group(2)} ({ctype}) is {csize} bytes "
                                    f"aligned {calign} by the C rules, {size} aligned {align} in the PTX")
            param = {"name": d.group(2), "type": ctype, "size": size, "align": align,
                     "kind": "pointer" if ctype.endswith("*") else
                             "struct" if layouts.struct_of(ctype) else "scalar"}
            st = layouts.struct_of(ctype)
            if st:
                param["struct"] = st
                layout = layouts.checked_layout(st, module)
                if structs.setdefault(st, layout) != layout:
                    raise ManifestError(f"{module}: struct {st} differs from its namesake in another module")
                for f in layout["fields"]:
                    en = f["type"].removeprefix("const ")
                    if en in layouts.enums:
                        underlying, values, rel = layouts.enums[en]
                        enums[en] = {"defined_in": rel, "type": underlying,
                                     "values": [{"name": n, "value": v} for n, v in values]}
            params.append(param)
        entry = {"name": name, "params": params}
        d = pinfo["directives"]
        if "maxntid" in d:
            entry["max_threads_per_block"] = d["maxntid"]
        if "reqntid" in d:
            entry["required_block"] = d["reqntid"]
        if "minnctapersm" in d:
            entry["min_blocks_per_sm"] = d["minnctapersm"][0]
        comment = comment_above(lines, text.count("\n", 0, m.start()))
        if comment:
            entry["comment"] = comment
        entries.append(entry)
    if in_ptx:
        raise ManifestError(f"{module}: PTX entries without an extern \"C\" __global__ in the source: "
                            f"{sorted(in_ptx)}")
    entries.sort(key=lambda e: e["name"])
    return {
        "name": src.stem,
        "file": f"{src.stem}.ptx",
        "source": module,
        "sha256": hashlib.sha256(ptx.encode()).hexdigest(),
        "target": target,
        "ptx_target": ptx_target.group(1),
        "min_compute_capability": [cc // 10, cc % 10],
        "entries": entries,
    }


def build(sources_and_ptx, root: pathlib.Path) -> str:
    """The manifest's JSON text for [(source path, PTX text, target)], sorted and stable."""
    structs, enums, modules = {}, {}, []
    for src, ptx, target in sorted(sources_and_ptx, key=lambda t: t[0].name):
        modules.append(module_manifest(src, ptx, target, root, structs, enums))
    manifest = {
        "schema": SCHEMA,
        "generator": "ci/ptx (ci/ptx_manifest.py); schema in docs/manifest.md",
        "modules": modules,
        "structs": structs,
        "enums": enums,
    }
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"
