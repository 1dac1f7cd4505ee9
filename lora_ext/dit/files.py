"""DiT single-file checkpoints: which family, and where each module's weights are.

BFL / SAI / ComfyUI single files hold the denoiser in the original layout under one of three
roots (``model.diffusion_model.`` in ComfyUI-saved and SAI checkpoints, ``diffusion_model.``,
or none in BFL's ``flux1-dev.safetensors``), and may carry the text encoders as ComfyUI saves
them (``text_encoders.clip_l.transformer.text_model.*``, ``clip_g``, ``t5xxl``).
:func:`single_file_layout` returns the module tables with those keys, so the generic
single-file merge (``lora_ext.checkpoint``) reads and writes them like an SD checkpoint's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

from . import table_for_shapes
from .families import FAMILIES
from .text import t5_dims, t5_table

_ROOTS = tuple(dict.fromkeys(r for f in FAMILIES.values() for r in f.roots))
# ComfyUI's text-encoder roots in a saved checkpoint: (component, root, lead of CLIP names)
_TE_ROOTS = (("te1", "text_encoders.clip_l.transformer.", "text_model."),
             ("te2", "text_encoders.clip_g.transformer.", "text_model."),
             ("te3", "text_encoders.t5xxl.transformer.", ""))


def single_file_layout(keys: Iterable[str], shape_of: Callable[[str], tuple]) -> Optional[tuple]:
    """``(family or variant, {component: table})`` of a DiT single file, or None."""
    keys = list(keys)
    for root in sorted(_ROOTS, key=len, reverse=True):
        sub = {k[len(root):]: k for k in keys if k.startswith(root)}
        if not sub:
            continue
        found = table_for_shapes({k: tuple(shape_of(full)) for k, full in sub.items()}, root)
        if found is None:
            continue
        name, naming, table = found
        if naming != "ldm":  # a diffusers-named transformer file: its keys are the canonical paths
            table = {p: dataclasses.replace(i, ldm_path=p, ldm_weight=root + p + ".weight",
                                            ldm_bias=None if i.bias_shape is None else root + p + ".bias",
                                            ldm_rows=None, ldm_swap=False) for p, i in table.items()}
        present = set(keys)
        layout = {"unet": {p: i for p, i in table.items() if i.ldm_weight in present}}
        layout.update(_text_encoders(present, shape_of))
        return name, layout
    return None


def _text_encoders(present: set, shape_of) -> dict:
    from .. import arch

    out = {}
    for comp, root, lead in _TE_ROOTS:
        if not any(k.startswith(root) for k in present):
            continue
        if comp == "te3":
            shapes = {k[len(root):]: tuple(shape_of(k)) for k in present if k.startswith(root)}
            dims = t5_dims(shapes)
            table = t5_table(dims, root) if dims else {}
        else:
            base = arch.module_table("sd1" if comp == "te1" else "sdxl", comp)
            table = {}
            for p, i in base.items():
                key = root + ("" if p == "text_projection" else lead) + p
                table[p] = dataclasses.replace(i, ldm_path=p, ldm_weight=key + ".weight",
                                               ldm_bias=None if i.bias_shape is None else key + ".bias",
                                               ldm_rows=None, ldm_transposed=False)
        table = {p: i for p, i in table.items() if i.ldm_weight in present
                 and tuple(shape_of(i.ldm_weight)) == tuple(i.weight_shape)}
        if table:
            out[comp] = table
    return out
