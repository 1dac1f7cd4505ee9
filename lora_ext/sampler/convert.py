"""A1111 / ldm single-file checkpoints <-> diffusers component state dicts, for models of any
size, VAE included.

The UNet and text-encoder names come from :mod:`lora_ext.arch`'s module tables (built here
from the live model and its config, so a fine-tune with another config or a tiny test model
converts by the same rules as the full-size families). The VAE (``first_stage_model.*``) is
added here; its ldm names differ from diffusers' as follows:

=====================================================  =========================================
diffusers ``AutoencoderKL``                             ldm
=====================================================  =========================================
``encoder.down_blocks.I.resnets.J.*``                  ``encoder.down.I.block.J.*``
``encoder.down_blocks.I.downsamplers.0.conv``          ``encoder.down.I.downsample.conv``
``decoder.up_blocks.I.resnets.J.*``                    ``decoder.up.(N-1-I).block.J.*``
``decoder.up_blocks.I.upsamplers.0.conv``              ``decoder.up.(N-1-I).upsample.conv``
``*.mid_block.resnets.0`` / ``.1``                     ``*.mid.block_1`` / ``.block_2``
``*.mid_block.attentions.0.group_norm``                ``*.mid.attn_1.norm``
``*.mid_block.attentions.0.to_q/to_k/to_v/to_out.0``   ``*.mid.attn_1.q/k/v/proj_out`` (1x1 convs)
``*.conv_norm_out``; resnet ``conv_shortcut``           ``*.norm_out``; ``nin_shortcut``
=====================================================  =========================================

(``N`` is the number of decoder blocks: ldm counts them from the bottom.) ``conv_in``,
``conv_out``, ``quant_conv`` and ``post_quant_conv`` keep their names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from .. import arch

__all__ = ["VAE_ROOT", "Slot", "ldm_slots", "vae_ldm_key", "split_ldm", "join_ldm"]

VAE_ROOT = "first_stage_model."


@dataclass(frozen=True)
class Slot:
    """Where one diffusers tensor lives in an ldm file."""

    ldm_key: str
    rows: Optional[tuple] = None  # (start, stop) inside a fused OpenCLIP in_proj
    transposed: bool = False  # OpenCLIP text_projection
    conv1x1: bool = False  # VAE attention: ldm Conv2d 1x1 vs diffusers Linear


# ---- VAE

_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RULES: list = [
    (re.compile(r"^(encoder|decoder)\.conv_norm_out\.(\w+)$"), lambda m, n: (f"{m[1]}.norm_out.{m[2]}", False)),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$"),
     lambda m, n: (f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET.get(m[3], m[3])}.{m[4]}", False)),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)$"),
     lambda m, n: (f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False)),
    (re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$"),
     lambda m, n: (f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_RESNET.get(m[3], m[3])}.{m[4]}", False)),
    (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)$"),
     lambda m, n: (f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}", False)),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)$"),
     lambda m, n: (f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET.get(m[3], m[3])}.{m[4]}", False)),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$"),
     lambda m, n: (f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}.{m[3]}", m[2] != "group_norm" and m[3] == "weight")),
]

# Names diffusers used for the VAE attention before 0.14 (still in some saved folders).
_OLD_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def vae_ldm_key(key: str, n_up: int) -> tuple[str, bool]:
    """A diffusers ``AutoencoderKL`` key -> (its ldm key without the root, is a 1x1-conv weight)."""
    for pattern, rule in _VAE_RULES:
        m = pattern.match(key)
        if m:
            return rule(m, n_up)
    return key, False


def modern_vae_key(key: str) -> str:
    """Old diffusers VAE attention names (``query``, ``proj_attn``) -> current ones."""
    if ".mid_block.attentions." in key:
        for old, new in _OLD_ATTN.items():
            key = key.replace(old, new)
    return key


# ---- all components


def _strip_text_model(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def ldm_slots(component: str, model: torch.nn.Module, config: Mapping, family: str) -> dict[str, Slot]:
    """model state-dict key -> Slot, for ``component`` ("unet", "te1", "te2", "vae") of a
    model whose ldm file is laid out like ``family``'s ("sd1", "sd2", "sdxl")."""
    keys = list(model.state_dict().keys())
    if component == "vae":
        n_up = len(config.get("up_block_types") or config["block_out_channels"])
        out = {}
        for k in keys:
            ldm, conv = vae_ldm_key(k, n_up)
            out[k] = Slot(VAE_ROOT + ldm, conv1x1=conv)
        return out
    table = arch._build_table(component, model, dict(config), arch.ldm_root(family, component),
                              arch.te_layout(family, component))
    out = {}
    for k in keys:
        path, _, param = _strip_text_model(k).rpartition(".")
        info = table.get(path)
        if info is None or param not in ("weight", "bias"):
            continue  # buffers such as position_ids
        ldm = info.ldm_weight if param == "weight" else info.ldm_bias
        if ldm is None:
            continue
        out[k] = Slot(ldm, rows=info.ldm_rows, transposed=info.ldm_transposed and param == "weight")
    return out


def _aliases(family: str, component: str, key: str) -> list[str]:
    """Other names a key may have in older ldm files (CLIP-L without ``text_model.``)."""
    if component in ("te1", "te2") and arch.te_layout(family, component) == "hf":
        root = arch.ldm_root(family, component)
        if root.endswith("text_model.") and key.startswith(root):
            return [root[: -len("text_model.")] + key[len(root):]]
    return []


def split_ldm(read: Callable[[str], Optional[torch.Tensor]], slots: Mapping[str, Slot], family: str,
              component: str) -> tuple[dict, list]:
    """Read one component from an ldm file: ``({model key: tensor}, [model keys not found])``.

    ``read(ldm_key)`` returns the tensor or None when the file lacks it.
    """
    cache: dict = {}

    def get(key):
        if key not in cache:
            t = read(key)
            for alias in _aliases(family, component, key) if t is None else ():
                t = read(alias)
                if t is not None:
                    break
            cache[key] = t
        return cache[key]

    out, missing = {}, []
    for model_key, slot in slots.items():
        t = get(slot.ldm_key)
        if t is None:
            missing.append(model_key)
            continue
        if slot.rows is not None:
            n = t.shape[0] // 3
            part = slot.rows[0] // (slot.rows[1] - slot.rows[0])
            t = t[part * n:(part + 1) * n]
        if slot.transposed:
            t = t.t()
        if slot.conv1x1 and t.ndim == 4:
            t = t[:, :, 0, 0]
        out[model_key] = t.contiguous()
    return out, missing


def join_ldm(state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
             slots: Mapping[str, Mapping[str, Slot]]) -> dict[str, torch.Tensor]:
    """Component state dicts (diffusers names) -> one ldm single-file state dict."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict] = {}
    for component, sd in state_dicts.items():
        table = slots[component]
        for key, value in sd.items():
            slot = table.get(key)
            if slot is None:
                continue
            if slot.rows is not None:
                fused.setdefault(slot.ldm_key, {})[slot.rows[0]] = value
                continue
            if slot.transposed:
                value = value.t()
            if slot.conv1x1:
                value = value[:, :, None, None]
            out[slot.ldm_key] = value.contiguous()
    for key, parts in fused.items():
        if len(parts) != 3:
            raise ValueError(f"{key}: needs q, k and v; got {len(parts)} of 3")
        out[key] = torch.cat([parts[k] for k in sorted(parts)], dim=0)
    return out
