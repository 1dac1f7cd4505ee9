"""Input LoRA modules as output entries: lossless copies (for convert, resize, transfer)."""
from __future__ import annotations

import torch

from .writer import Entry, LORA_NAMES, kohya_dora_scale

Tensor = torch.Tensor


def is_plain_lora(binding) -> bool:
    """LoRA/LoCon (optionally DoRA on top): tensors a kohya or PEFT LoRA file can hold."""
    names = set(binding.group.tensors)
    return {"lora_up.weight", "lora_down.weight"} <= names <= LORA_NAMES


def _canonical(tensors: dict, shape: tuple) -> dict:
    """Factor shapes as the module wants them (values untouched): 4-D for convs, 2-D for Linear."""
    t = dict(tensors)
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    r = int(down.shape[0])
    if "lora_mid.weight" not in t:
        if len(shape) > 2:
            t["lora_down.weight"] = down.reshape(r, *shape[1:])
            t["lora_up.weight"] = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        else:
            t["lora_down.weight"] = down.reshape(r, shape[1])
            t["lora_up.weight"] = up.reshape(shape[0], r)
    if "dora_scale" in t:
        t["dora_scale"] = kohya_dora_scale(t["dora_scale"], shape)
    return t


def copy_entries(binding, layout) -> list:
    """The binding's own tensors as entries, one per module (values bit-identical).

    A plain LoRA on OpenCLIP's fused q/k/v is split into q, k and v entries (rows of
    ``lora_up``; ``lora_down`` and ``alpha`` shared); any other type on a fused module is kept
    as one group under its original prefix.
    """
    tensors = binding.group.tensors
    targets = binding.targets
    if getattr(binding.candidate, "swap", False):
        # a DiT modulation spelled in the other layout: rows into the target's (diffusers) order
        n = lambda t: torch.cat([t[t.shape[0] // 2:], t[: t.shape[0] // 2]], 0)  # noqa: E731
        tensors = {k: (n(v) if k in ("lora_up.weight", "lora_up.bias", "dora_scale", "diff", "diff_b") else v)
                   for k, v in tensors.items()}
    if len(targets) == 1:
        t = targets[0]
        shape = tuple(layout[t.component][t.module].weight_shape)
        if is_plain_lora(binding):
            return [Entry(t, _canonical(tensors, shape), shape)]
        return [Entry(t, dict(tensors), shape)]
    scale = tensors.get("dora_scale")
    per_input = scale is not None and scale.dim() > 1 and scale.shape[0] == 1
    if not is_plain_lora(binding) or "lora_mid.weight" in tensors or per_input:
        return [Entry(None, dict(tensors), tuple(binding.candidate.weight_shape), prefix=binding.group.prefix)]
    out, row = [], 0
    for t in targets:
        shape = tuple(layout[t.component][t.module].weight_shape)
        n = shape[0]
        part = {"lora_down.weight": tensors["lora_down.weight"].clone(), "lora_up.weight": tensors["lora_up.weight"][row:row + n].clone()}
        if "alpha" in tensors:
            part["alpha"] = tensors["alpha"].clone()
        if "lora_up.bias" in tensors:
            part["lora_up.bias"] = tensors["lora_up.bias"][row:row + n].clone()
        if scale is not None:
            part["dora_scale"] = scale.reshape(-1)[row:row + n].clone()
        out.append(Entry(t, _canonical(part, shape), shape))
        row += n
    return out


def input_dtype(lora) -> torch.dtype:
    """The dtype most of a LoRA's factor tensors have (what its outputs default to)."""
    counts = {}
    for g in lora.groups.values():
        for name, t in g.tensors.items():
            if name != "alpha" and t.is_floating_point():
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32
