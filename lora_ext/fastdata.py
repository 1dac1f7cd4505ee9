"""Precomputed data for the torch-free ``inspect`` path (``fastpath``).

The full-size layouts (SD1.x/SD2.x/SDXL and every DiT variant), the DiT variants' families and
labels, the tensor names of the registered adapter types and their claiming order all come from
modules that import torch (``arch`` and everything built on its ``ModuleInfo``, the adapter
types). ``inspect`` of a safetensors file needs none of torch's maths, so this module keeps
what it needs as data: ``lora_ext/tables/fast_layouts.json.gz``, written by

    python -m lora_ext.fastdata --write

The data carries a fingerprint of the sources it was made from (``SOURCES``); when they change
and the data was not rewritten, :func:`load` returns None and ``inspect`` takes the full path
(same results, torch's start-up), after writing a fresh copy to the user cache so that the
next call is fast again.
"""
from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

VERSION = 1
_PKG = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_PKG)
DATA_PATH = os.path.join(_PKG, "tables", "fast_layouts.json.gz")

#: the sources whose behaviour the data (or fastpath's reading of shapes) stands for
SOURCES = (
    "lora_ext/arch.py", "lora_ext/layouts.py", "lora_ext/dit/*.py", "lora_ext/tables/__init__.py",
    "lora_ext/tables/*.json.gz", "lora_ext/configs/*.json", "lora_ext/adapter.py", "lora_ext/network.py",
    "lora_ext/plugins.py", "lora_ext/keys.py", "adapters/*.py", "lora_ext/adapters/*.py",
)
_FIELDS = ("path", "kind", "weight_shape", "bias_shape", "block", "ldm_path", "ldm_weight", "ldm_bias",
           "ldm_rows", "ldm_transposed", "ldm_swap", "ldm_alias")


@dataclass(frozen=True)
class ModuleRow:
    """``arch.ModuleInfo`` as data (same fields; ``KeyMap`` reads it the same way)."""

    component: str
    path: str
    kind: str
    weight_shape: tuple
    bias_shape: Optional[tuple]
    block: str
    ldm_path: Optional[str]
    ldm_weight: Optional[str]
    ldm_bias: Optional[str]
    ldm_rows: Optional[tuple] = None
    ldm_transposed: bool = False
    ldm_swap: bool = False
    ldm_alias: Optional[str] = None


def _source_files() -> list:
    out = []
    for pattern in SOURCES:
        out += sorted(glob.glob(os.path.join(_ROOT, pattern)))
    return [p for p in out if os.path.isfile(p) and os.path.abspath(p) != DATA_PATH]


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """sha256 over the sources the data stands for (names relative to the checkout, contents)."""
    h = hashlib.sha256(f"v{VERSION}".encode())
    for p in _source_files():
        h.update(os.path.relpath(p, _ROOT).replace(os.sep, "/").encode() + b"\0")
        with open(p, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def _user_cache_path(fp: str) -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lora-ext", f"fast-layouts-{fp[:16]}.json.gz")


# --- making the data (needs torch and the live tables) ------------------------------------------
def _row(info) -> list:
    out = []
    for f in _FIELDS:
        v = getattr(info, f, None)
        out.append(list(v) if isinstance(v, tuple) else v)
    return out


def generate() -> dict:
    """The data, from the live tables (imports torch, the adapter types and every layout)."""
    from . import dit, plugins
    from .adapter import Adapter
    from .detect import LABELS
    from .dit import _DOTTED_PREFIXES, _FLAT_PREFIXES, _family_bodies, _strip_index
    from .layouts import SD_ARCHS, arch_layout, label_of

    tables: dict = {}
    layouts = {}
    for name in list(SD_ARCHS) + list(dit.VARIANTS):
        comps = {}
        for comp, table in arch_layout(name).items():
            rows = [_row(info) for info in table.values()]
            for info in table.values():
                assert info.component == comp, (name, comp, info.path)
            text = json.dumps(rows, separators=(",", ":"))
            tid = hashlib.sha256(text.encode()).hexdigest()[:16]
            tables[tid] = text
            comps[comp] = tid
        layouts[name] = {"label": label_of(name), "components": comps}
    types = []
    for t in plugins.adapter_types():
        claims = "default" if t.claims.__func__ is Adapter.claims.__func__ else t.type_name
        types.append({"name": t.type_name, "module": t.__module__, "required": sorted(t.required),
                      "optional": sorted(t.optional), "claims": claims})
    labels = dict(LABELS)
    for v in dit.VARIANTS:
        labels[v] = dit.family_label(v)
    for f in dit.FAMILIES:
        labels.setdefault(f, dit.family_label(f))
    return {
        "version": VERSION,
        "fingerprint": fingerprint(),
        "python": sys.version.split()[0],
        "types": types,
        "names": sorted({n for t in plugins.adapter_types() for n in (t.required | t.optional)}),
        "variants": [[v, fam] for v, (fam, _, _) in dit.VARIANTS.items()],  # in order: ties go to the first
        "family_labels": {f: dit.FAMILIES[f].label for f in dit.FAMILIES},
        "labels": labels,
        "masked": [[f, sorted(_strip_index(b) for b in _family_bodies(f))] for f in dit.FAMILIES],
        "dotted_prefixes": list(_DOTTED_PREFIXES),
        "flat_prefixes": list(_FLAT_PREFIXES),
        "layouts": layouts,
        "tables": tables,
    }


def write(path: str = DATA_PATH) -> str:
    data = generate()
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(gzip.compress(raw, compresslevel=9, mtime=0))
    os.replace(tmp, path)
    return path


# --- reading it -------------------------------------------------------------------------------
def _read(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as fh:
            data = json.loads(gzip.decompress(fh.read()))
    except (OSError, ValueError, EOFError):
        return None
    return data if isinstance(data, dict) and data.get("version") == VERSION else None


@functools.lru_cache(maxsize=1)
def load() -> Optional[dict]:
    """The data when it matches the sources (shipped, else the user cache), else None."""
    if os.environ.get("LORA_EXT_NO_FAST_INSPECT"):
        return None
    fp = fingerprint()
    for path in (DATA_PATH, _user_cache_path(fp)):
        if os.path.isfile(path):
            data = _read(path)
            if data is not None and data.get("fingerprint") == fp:
                return data
    return None


def refresh_user_cache() -> None:
    """After a full-path inspect found the data stale: write a fresh copy to the user cache
    (best effort, quietly), so the next call takes the fast path again."""
    try:
        fp = fingerprint()
        shipped = _read(DATA_PATH) if os.path.isfile(DATA_PATH) else None
        if shipped is not None and shipped.get("fingerprint") == fp:
            return  # current: nothing to write
        path = _user_cache_path(fp)
        if not os.path.exists(path):
            write(path)
    except Exception:  # noqa: BLE001 - an optimisation only
        pass


def table_rows(data: dict, tid: str, component: str) -> dict:
    """{path: ModuleRow} of one stored table."""
    rows = json.loads(data["tables"][tid])
    out = {}
    new = object.__new__
    for r in rows:
        kw = dict(zip(_FIELDS, r))
        for f in ("weight_shape", "bias_shape", "ldm_rows"):
            if kw[f] is not None:
                kw[f] = tuple(kw[f])
        # the frozen dataclass's fields set directly: its __init__ (a frozen __setattr__ per
        # field) is most of the cost of decoding a table; the object is the same
        row = new(ModuleRow)
        row.__dict__["component"] = component
        row.__dict__.update(kw)
        out[kw["path"]] = row
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lora_ext.fastdata")
    ap.add_argument("--write", action="store_true", help=f"rewrite {os.path.relpath(DATA_PATH, _ROOT)}")
    ap.add_argument("--check", action="store_true", help="exit 1 when the shipped data is stale")
    args = ap.parse_args(argv)
    if args.write:
        print(write())
        return 0
    data = _read(DATA_PATH)
    fresh = data is not None and data.get("fingerprint") == fingerprint()
    print("fresh" if fresh else "stale: run python -m lora_ext.fastdata --write")
    return 0 if fresh else 1


if __name__ == "__main__":
    sys.exit(main())
