"""``lora-ext demo-files DIR``: small LoRA files in real formats, for a first ``inspect``.

Each file uses the key names and tensor shapes of a real full-size base model (taken from the
shipped layouts), with a few modules and low ranks so they stay small. Values are seeded
random numbers: these files exercise the reading code, they are not trained.
"""
from __future__ import annotations

import json
import os

import torch

from .io import save_safetensors
from .layouts import arch_layout


def _pair(gen, out_dim, in_dim, rank, conv=None):
    down_shape = (rank, in_dim) if conv is None else (rank, in_dim, *conv)
    up_shape = (out_dim, rank) if conv is None else (out_dim, rank, 1, 1)
    return (torch.randn(up_shape, generator=gen) * 0.01, torch.randn(down_shape, generator=gen) * 0.01)


def _kohya_lora(gen, layout, modules, rank, alpha, name_of):
    sd = {}
    for comp, path in modules:
        info = layout[comp][path]
        shape = info.weight_shape
        conv = tuple(shape[2:]) if len(shape) == 4 else None
        up, down = _pair(gen, shape[0], shape[1], rank, conv)
        prefix = name_of(comp, info)
        sd[f"{prefix}.lora_up.weight"] = up
        sd[f"{prefix}.lora_down.weight"] = down
        sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return sd


def _kohya_name(comp, info):
    return {"unet": "lora_unet_", "te1": "lora_te_", "te2": "lora_te2_"}[comp] + info.path.replace(".", "_")


def write_demo_files(folder) -> list:
    """Write the demo files into ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    written = []

    def save(name, sd, meta):
        path = os.path.join(folder, name)
        save_safetensors(path, {k: v.contiguous() for k, v in sd.items()}, meta)
        written.append(path)

    sd1 = arch_layout("sd1")
    attn = "down_blocks.0.attentions.0.transformer_blocks.0"
    unet_mods = [("unet", f"{attn}.{m}") for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k")]
    unet_mods += [("unet", "up_blocks.3.attentions.2.proj_out"), ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2")]
    te_mods = [("te1", f"encoder.layers.{i}.self_attn.{p}") for i in (0, 11) for p in ("q_proj", "v_proj")]
    sd = _kohya_lora(gen, sd1, unet_mods + te_mods, rank=4, alpha=2, name_of=lambda c, i: _kohya_name(c, i).replace("lora_te_", "lora_te_text_model_"))
    tags = {"10_inkwash style": {"inkwash style": 40, "mountains": 12, "monochrome": 25, "1girl": 3}}
    save("inkwash_sd15_lora.safetensors", sd, {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2",
        "ss_base_model_version": "sd_v1", "ss_output_name": "inkwash", "ss_resolution": "(512, 512)",
        "ss_num_epochs": "10", "ss_learning_rate": "0.0001", "ss_tag_frequency": json.dumps(tags),
    })

    # An SD1.5 LoCon written with ldm/SGM module names (as some trainers do): shapes say SD1.5.
    def ldm_name(comp, info):
        return "lora_unet_" + info.ldm_path.replace(".", "_")

    convs = [("unet", "down_blocks.0.resnets.0.conv1"), ("unet", "down_blocks.0.attentions.0.proj_in"),
             ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")]
    save("castle_sd15_locon_ldm_names.safetensors", _kohya_lora(gen, sd1, convs, rank=8, alpha=4, name_of=ldm_name),
         {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "locon", "conv_dim": 8, "conv_alpha": 4}),
          "modelspec.trigger_phrase": "old castle"})

    # An SDXL LoHa in LyCORIS/kohya naming with both text encoders.
    sdxl = arch_layout("sdxl")
    sd = {}
    for comp, path in [("unet", "down_blocks.2.attentions.1.transformer_blocks.3.attn2.to_k"),
                       ("te1", "encoder.layers.3.mlp.fc1"), ("te2", "encoder.layers.20.self_attn.out_proj")]:
        out_dim, in_dim = sdxl[comp][path].weight_shape[:2]
        prefix = {"unet": "lora_unet_", "te1": "lora_te1_text_model_", "te2": "lora_te2_text_model_"}[comp] + path.replace(".", "_")
        for w in ("w1", "w2"):
            sd[f"{prefix}.hada_{w}_a"] = torch.randn(out_dim, 4, generator=gen) * 0.05
            sd[f"{prefix}.hada_{w}_b"] = torch.randn(4, in_dim, generator=gen) * 0.05
        sd[f"{prefix}.alpha"] = torch.tensor(2.0)
    save("watercolor_sdxl_loha.safetensors", sd, {"ss_base_model_version": "sdxl_base_v1-0",
                                                  "ss_network_args": json.dumps({"algo": "loha"})})

    # A diffusers/PEFT DoRA: lora_A/lora_B/lora_magnitude_vector, alpha in lora_adapter_metadata.
    sd = {}
    for path in (f"{attn}.attn1.to_q", f"{attn}.attn1.to_v"):
        out_dim, in_dim = sd1["unet"][path].weight_shape
        sd[f"unet.{path}.lora_A.weight"] = torch.randn(8, in_dim, generator=gen) * 0.01
        sd[f"unet.{path}.lora_B.weight"] = torch.randn(out_dim, 8, generator=gen) * 0.01
        sd[f"unet.{path}.lora_magnitude_vector"] = torch.rand(out_dim, generator=gen) + 0.5
    meta = {"lora_adapter_metadata": json.dumps({"unet": {"r": 8, "lora_alpha": 16, "use_dora": True}})}
    save("pixel_sd15_peft_dora.safetensors", sd, meta)

    # A file with a renamed low-rank pair (explained by the auto-detector) and a key for a
    # module SD1.5 does not have (reported, never dropped).
    sd = {}
    path = "mid_block.attentions.0.proj_in"  # a 1x1 conv in SD1.5: the pair is Linear-shaped
    out_dim, in_dim = sd1["unet"][path].weight_shape[:2]
    sd[f"lora_unet_{path.replace('.', '_')}.weird_b"] = torch.randn(out_dim, 2, generator=gen) * 0.01
    sd[f"lora_unet_{path.replace('.', '_')}.weird_a"] = torch.randn(2, in_dim, generator=gen) * 0.01
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(320, 2)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 320)
    save("odd_keys_sd15.safetensors", sd, {})
    return written
