"""Tiny random Stable Diffusion pipelines (SD1-, SD2- and SDXL-shaped), for tests and demos.

Nothing is downloaded: the modules are built from small configs with seeded random weights
and a 64-token CLIP-style vocabulary (the letters, a few merges and the special tokens).
``save_diffusers`` writes a diffusers pipeline folder; ``save_single_file`` an A1111 single
file laid out like the family, its configs in the ``lora_ext.configs`` metadata, with a
``tokenizer/`` folder beside it. Images are 16x16 pixels (8x8 latents).
"""
from __future__ import annotations

import json
import os
import string

import torch

__all__ = ["tiny_components", "tiny_vocab", "write_tokenizer", "save_diffusers", "save_single_file",
           "SCHEDULER"]

SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"}

_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
             norm_num_groups=4)
_TE = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=64,
           max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16,
           hidden_act="quick_gelu")
_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)


def tiny_vocab() -> tuple[dict, list]:
    """A 64-token byte-level BPE vocabulary in CLIP's format: ids 0 and 1 are BOS and EOS."""
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    tokens += ["!", "!</w>", ",</w>", ".</w>"] + ["".join(m) for m in merges]
    tokens += ["a" + c for c in "bcd"]  # pad to 64 with tokens no merge makes
    tokens = tokens[:64]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: str, pad: str = "<|endoftext|>") -> str:
    """``vocab.json``, ``merges.txt`` and ``special_tokens_map.json`` of the tiny vocabulary."""
    vocab, merges = tiny_vocab()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad}, fh)
    return folder


def _jitter(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    # default inits leave some weights exactly zero (conv_out, proj_out): make every one count
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval().requires_grad_(False)


def tiny_components(family: str = "sd1", seed: int = 0) -> dict:
    """``{"unet", "te1"[, "te2"], "vae"}`` shaped like ``family`` ("sd1", "sd2", "sdxl")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet_cfg = dict(_UNET)
    te = dict(_TE)
    out = {}
    if family == "sd2":
        te["hidden_act"] = "gelu"
        unet_cfg.update(use_linear_projection=True)
    if family == "sdxl":
        unet_cfg.update(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
                        projection_class_embeddings_input_dim=16 + 6 * 4, use_linear_projection=True)
        out["te1"] = _jitter(CLIPTextModel(CLIPTextConfig(**te)))
        out["te2"] = _jitter(CLIPTextModelWithProjection(CLIPTextConfig(**dict(te, hidden_act="gelu"))))
    else:
        out["te1"] = _jitter(CLIPTextModel(CLIPTextConfig(**te)))
    out["unet"] = _jitter(UNet2DConditionModel(**unet_cfg))
    out["vae"] = _jitter(AutoencoderKL(**_VAE), 0.02)
    return out


def _pads(family: str) -> list:
    return {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[family]


def save_diffusers(folder: str, components: dict, family: str = "sd1", prediction: str = "epsilon") -> str:
    """A diffusers pipeline folder (safetensors weights, tokenizer folders, scheduler config)."""
    os.makedirs(folder, exist_ok=True)
    names = {"unet": "unet", "vae": "vae", "te1": "text_encoder", "te2": "text_encoder_2"}
    for comp, module in components.items():
        module.save_pretrained(os.path.join(folder, names[comp]), safe_serialization=True)
    for i, pad in enumerate(_pads(family)):
        write_tokenizer(os.path.join(folder, "tokenizer" if i == 0 else "tokenizer_2"), pad)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as fh:
        json.dump(dict(SCHEDULER, prediction_type=prediction), fh)
    cls = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as fh:
        json.dump({"_class_name": cls}, fh)
    return folder


def save_single_file(path: str, components: dict, family: str = "sd1", prediction: str = "epsilon",
                     tokenizer: bool = True) -> str:
    """An A1111 single file laid out like ``family``, configs in its metadata; with
    ``tokenizer`` a ``tokenizer/`` folder is written beside it."""
    from .loading import write_single_file

    write_single_file(path, components, family, scheduler=dict(SCHEDULER, prediction_type=prediction))
    if tokenizer:
        folder = os.path.dirname(os.path.abspath(path))
        for i, pad in enumerate(_pads(family)):
            write_tokenizer(os.path.join(folder, "tokenizer" if i == 0 else "tokenizer_2"), pad)
    return path
