"""Shipped module tables of the full-size SD1.x / SD2.x / SDXL components (package data).

``sd_modules.json.gz`` holds, for every (arch, component), the weight-bearing modules of the
diffusers ``UNet2DConditionModel`` / transformers CLIP text model built from the shipped config
(``lora_ext/configs``), in ``named_modules()`` order: ``[name, kind, weight shape, bias shape or
null]``. Text-encoder names are given without the ``text_model.`` level (the canonical paths,
which do not depend on the transformers version). ``arch.module_table`` builds its tables from
these entries, so hosts need neither diffusers nor transformers.

Regenerate after changing a config or the naming rules: ``python -m lora_ext.tables.generate``
(needs diffusers and transformers); tests/test_tables_data.py checks the file against a fresh
generation.

File layout (JSON, gzip)::

    {"format": 1,
     "generated_with": {"torch": ..., "diffusers": ..., "transformers": ...},
     "tables": {"sd1/unet": {"config_sha256": <sha256 of the config, see config_digest>,
                             "modules": [[name, kind, [weight shape], [bias shape] | null], ...]},
                ...}}
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from typing import Mapping

from ..errors import LoraExtError

FORMAT = 1
DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd_modules.json.gz")


def config_digest(config: Mapping) -> str:
    """sha256 of a config in canonical JSON (sorted keys): ties a stored table to its config."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dumps(data: Mapping) -> bytes:
    """The file's bytes for ``data`` (deterministic: one module per line, gzip without a timestamp)."""
    lines = ["{", f'"format":{json.dumps(data["format"])},',
             f'"generated_with":{json.dumps(data["generated_with"], sort_keys=True)},', '"tables":{']
    names = list(data["tables"])
    for i, key in enumerate(names):
        t = data["tables"][key]
        lines.append(f'{json.dumps(key)}:{{"config_sha256":{json.dumps(t["config_sha256"])},"modules":[')
        mods = [json.dumps(list(m), separators=(",", ":")) for m in t["modules"]]
        lines.append(",\n".join(mods))
        lines.append("]}" + ("," if i < len(names) - 1 else ""))
    lines.append("}}")
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=9, mtime=0)


@functools.lru_cache(maxsize=1)
def load(path: str = DATA_FILE) -> dict:
    """The shipped data (read once per process)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise LoraExtError(f"{path}: cannot read lora-ext's shipped module tables ({e}); reinstall lora-ext") from e
    if data.get("format") != FORMAT:
        raise LoraExtError(f"{path}: module tables in format {data.get('format')!r}, this lora-ext reads {FORMAT}")
    return data


def entries(arch: str, component: str, config: Mapping | None = None) -> list[tuple]:
    """``[(name, kind, weight shape, bias shape or None)]`` of one shipped table.

    With ``config``, checks that the table was generated from that very config (a config edited
    without regenerating would bind LoRAs to the wrong shapes).
    """
    key = f"{arch}/{component}"
    table = load()["tables"].get(key)
    if table is None:
        raise LoraExtError(f"no shipped module table for {key}")
    if config is not None and table["config_sha256"] != config_digest(config):
        raise LoraExtError(f"the shipped module table for {key} was generated from another config; "
                           f"regenerate it: python -m lora_ext.tables.generate")
    return [(name, kind, tuple(w), None if b is None else tuple(b)) for name, kind, w, b in table["modules"]]
