"""Helpers for the LoRA-tool tests: tiny pipelines, kohya LoRAs for any layout, dense deltas."""
import os
import re

import torch
from safetensors.torch import save_file

from lora_ext.checkpoint import open_checkpoint
from lora_ext.deltas import binding_deltas
from lora_ext.keys import KeyMap
from lora_ext.network import load_lora
from tiny_models import save_pipeline, tiny_text_encoder, tiny_unet

TE_TARGET = re.compile(r"^encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def tiny_base(folder, dtype=torch.float32, seed=0, te=True):
    unet = tiny_unet(seed).to(dtype)
    text = tiny_text_encoder(seed).to(dtype) if te else None
    return str(save_pipeline(folder, unet, text))


def lora_modules(base, components=("unet", "te1"), kinds=("linear", "conv")):
    """(component, path, weight shape) of every module a kohya LoRA could patch."""
    ck = open_checkpoint(base)
    try:
        out = []
        for comp, table in ck.layout.items():
            if comp not in components:
                continue
            for path, info in table.items():
                if info.kind not in kinds or (comp != "unet" and not TE_TARGET.match(path)):
                    continue
                out.append((comp, path, tuple(info.weight_shape)))
        return out
    finally:
        ck.close()


def kohya_name(comp, path):
    return {"unet": "lora_unet_", "te1": "lora_te_text_model_", "te2": "lora_te2_text_model_"}[comp] + path.replace(".", "_")


def write_kohya(path, modules, rank=3, alpha=2.0, seed=0, scale=0.2, dtype=torch.float32, dora=False):
    """A kohya LoRA (optionally DoRA, per-output dora_scale) on ``modules``; returns {(comp, path): (up, down, alpha)}."""
    g = torch.Generator().manual_seed(seed)
    sd, parts = {}, {}
    for comp, p, shape in modules:
        r = min(rank, shape[0])
        down = torch.randn((r, shape[1], *shape[2:]), generator=g) * scale
        up = torch.randn((shape[0], r) + ((1, 1) if len(shape) == 4 else ()), generator=g) * scale
        pre = kohya_name(comp, p)
        sd[f"{pre}.lora_down.weight"] = down.to(dtype)
        sd[f"{pre}.lora_up.weight"] = up.to(dtype)
        sd[f"{pre}.alpha"] = torch.tensor(alpha, dtype=dtype)
        if dora:
            sd[f"{pre}.dora_scale"] = (1 + 0.3 * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=g)).to(dtype)
        parts[(comp, p)] = (up, down, alpha)
    save_file(sd, os.fspath(path))
    return parts


def lora_deltas(lora_path, base):
    """{(component, path): fp32 weight delta at strength 1} of a LoRA file on the checkpoint ``base``."""
    ck = open_checkpoint(base)
    try:
        lora = load_lora(lora_path)
        res = lora.resolve(KeyMap(ck.layout))
        assert not res.unmatched, res.unmatched[:3]
        out = {}
        for b in res.bindings:
            for t, (dw, _) in binding_deltas(b, ck.read).items():
                out[(t.component, t.module)] = out.get((t.component, t.module), 0) + dw
        return out
    finally:
        ck.close()


def read_weights(base):
    ck = open_checkpoint(base)
    try:
        from lora_ext.keys import Target

        out = {}
        for comp, table in ck.layout.items():
            for path, info in table.items():
                w = ck.read(Target(comp, path, info.block), "weight")
                if w is not None:
                    out[(comp, path)] = w.clone()
        return out
    finally:
        ck.close()


def rel(a, b):
    return float(torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float()))
