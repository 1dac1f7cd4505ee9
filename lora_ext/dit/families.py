"""DiT model families as data: one table per family, both layouts, fused row ranges.

Every DiT family exists in two layouts (``../shared/reference/dit-lora-formats.md`` §1):

* the **diffusers** one (``transformer_blocks.N.attn.to_q``), split q/k/v, which is the
  canonical path of a module here (``ModuleInfo.path``), as for SD;
* the **original** one (BFL / SAI / ComfyUI single files: ``double_blocks.N.img_attn.qkv``),
  which is ``ModuleInfo.ldm_path``. Where the original fuses several diffusers modules into one
  Linear (Flux ``img_attn.qkv`` = q|k|v, ``single_blocks.N.linear1`` = q|k|v|mlp, SD3
  ``attn.qkv``), each diffusers module says which rows it owns (``ldm_rows``); where the
  original stores the two halves of a modulation in the other order (``norm_out.linear`` vs
  ``final_layer.adaLN_modulation.1``, and SD3's last ``context_block``), ``ldm_swap`` is set.

A family is a list of rows ``(diffusers name, original name, out, in, first row, when)``:
sizes and row offsets are expressions over the family's dimensions (``h`` hidden size, ``m``
MLP width, ``d`` head dim, ...), ``in`` is None for a norm scale (a 1-D weight), and ``when``
names the condition under which the module exists (a Flux-dev guidance embedder, a dual
attention layer of SD3.5 Medium, SD3's last block). ``table(family, dims)`` turns the rows
into module tables for any size, so full-size key layouts and the tiny test models come from
the same data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from ..arch import ModuleInfo

# (diffusers name, original name, out, in, first row in the original fused weight, when)
Row = tuple

_FLUX_TOP = (
    ("x_embedder", "img_in", "h", "c_in", None, ""),
    ("context_embedder", "txt_in", "h", "ctx", None, ""),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", "h", "256", None, "mod"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", "h", "h", None, "mod"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", "h", "vec", None, "mod"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", "h", "h", None, "mod"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", "h", "256", None, "guidance"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", "h", "h", None, "guidance"),
    ("proj_out", "final_layer.linear", "c_out", "h", None, ""),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", "2*h", "h", "swap", "mod"),
    # Chroma: the approximator that replaces the per-block modulation
    ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj", "a", "a_in", None, "chroma"),
    ("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj", "h", "a", None, "chroma"),
)
_CHROMA_APPROX = (
    ("distilled_guidance_layer.layers.{i}.linear_1", "distilled_guidance_layer.layers.{i}.in_layer", "a", "a", None, ""),
    ("distilled_guidance_layer.layers.{i}.linear_2", "distilled_guidance_layer.layers.{i}.out_layer", "a", "a", None, ""),
    ("distilled_guidance_layer.norms.{i}", "distilled_guidance_layer.norms.{i}.scale", "a", None, None, ""),
)
_FLUX_DOUBLE = (
    ("norm1.linear", "img_mod.lin", "6*h", "h", None, "mod"),
    ("norm1_context.linear", "txt_mod.lin", "6*h", "h", None, "mod"),
    ("attn.to_q", "img_attn.qkv", "h", "h", "0", ""),
    ("attn.to_k", "img_attn.qkv", "h", "h", "h", ""),
    ("attn.to_v", "img_attn.qkv", "h", "h", "2*h", ""),
    ("attn.add_q_proj", "txt_attn.qkv", "h", "h", "0", ""),
    ("attn.add_k_proj", "txt_attn.qkv", "h", "h", "h", ""),
    ("attn.add_v_proj", "txt_attn.qkv", "h", "h", "2*h", ""),
    ("attn.to_out.0", "img_attn.proj", "h", "h", None, ""),
    ("attn.to_add_out", "txt_attn.proj", "h", "h", None, ""),
    ("attn.norm_q", "img_attn.norm.query_norm.scale", "d", None, None, ""),
    ("attn.norm_k", "img_attn.norm.key_norm.scale", "d", None, None, ""),
    ("attn.norm_added_q", "txt_attn.norm.query_norm.scale", "d", None, None, ""),
    ("attn.norm_added_k", "txt_attn.norm.key_norm.scale", "d", None, None, ""),
    ("ff.net.0.proj", "img_mlp.0", "m", "h", None, ""),
    ("ff.net.2", "img_mlp.2", "h", "m", None, ""),
    ("ff_context.net.0.proj", "txt_mlp.0", "m", "h", None, ""),
    ("ff_context.net.2", "txt_mlp.2", "h", "m", None, ""),
)
_FLUX_SINGLE = (
    ("norm.linear", "modulation.lin", "3*h", "h", None, "mod"),
    ("attn.to_q", "linear1", "h", "h", "0", ""),
    ("attn.to_k", "linear1", "h", "h", "h", ""),
    ("attn.to_v", "linear1", "h", "h", "2*h", ""),
    ("proj_mlp", "linear1", "m", "h", "3*h", ""),
    ("proj_out", "linear2", "h", "h+m", None, ""),
    ("attn.norm_q", "norm.query_norm.scale", "d", None, None, ""),
    ("attn.norm_k", "norm.key_norm.scale", "d", None, None, ""),
)

_SD3_TOP = (
    ("pos_embed.proj", "x_embedder.proj", "h", "c_in", None, ""),  # a Conv2d (patch x patch)
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0", "h", "256", None, ""),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2", "h", "h", None, ""),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0", "h", "vec", None, ""),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2", "h", "h", None, ""),
    ("context_embedder", "context_embedder", "h", "ctx", None, ""),
    ("proj_out", "final_layer.linear", "c_out", "h", None, ""),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", "2*h", "h", "swap", ""),
)
_SD3_JOINT = (
    ("norm1.linear", "x_block.adaLN_modulation.1", "6*h", "h", None, "single_attn"),
    ("norm1.linear", "x_block.adaLN_modulation.1", "9*h", "h", None, "dual"),
    ("norm1_context.linear", "context_block.adaLN_modulation.1", "6*h", "h", None, "not_last"),
    ("norm1_context.linear", "context_block.adaLN_modulation.1", "2*h", "h", "swap", "last"),
    ("attn.to_q", "x_block.attn.qkv", "h", "h", "0", ""),
    ("attn.to_k", "x_block.attn.qkv", "h", "h", "h", ""),
    ("attn.to_v", "x_block.attn.qkv", "h", "h", "2*h", ""),
    ("attn.add_q_proj", "context_block.attn.qkv", "h", "h", "0", ""),
    ("attn.add_k_proj", "context_block.attn.qkv", "h", "h", "h", ""),
    ("attn.add_v_proj", "context_block.attn.qkv", "h", "h", "2*h", ""),
    ("attn.to_out.0", "x_block.attn.proj", "h", "h", None, ""),
    ("attn.to_add_out", "context_block.attn.proj", "h", "h", None, "not_last"),
    ("attn.norm_q", "x_block.attn.ln_q", "d", None, None, "qk_norm"),
    ("attn.norm_k", "x_block.attn.ln_k", "d", None, None, "qk_norm"),
    ("attn.norm_added_q", "context_block.attn.ln_q", "d", None, None, "qk_norm"),
    ("attn.norm_added_k", "context_block.attn.ln_k", "d", None, None, "qk_norm"),
    ("attn2.to_q", "x_block.attn2.qkv", "h", "h", "0", "dual"),
    ("attn2.to_k", "x_block.attn2.qkv", "h", "h", "h", "dual"),
    ("attn2.to_v", "x_block.attn2.qkv", "h", "h", "2*h", "dual"),
    ("attn2.to_out.0", "x_block.attn2.proj", "h", "h", None, "dual"),
    ("attn2.norm_q", "x_block.attn2.ln_q", "d", None, None, "dual_qk_norm"),
    ("attn2.norm_k", "x_block.attn2.ln_k", "d", None, None, "dual_qk_norm"),
    ("ff.net.0.proj", "x_block.mlp.fc1", "m", "h", None, ""),
    ("ff.net.2", "x_block.mlp.fc2", "h", "m", None, ""),
    ("ff_context.net.0.proj", "context_block.mlp.fc1", "m", "h", None, "not_last"),
    ("ff_context.net.2", "context_block.mlp.fc2", "h", "m", None, "not_last"),
)

# Qwen-Image: ComfyUI keeps the diffusers names (no fusion, no swap)
_QWEN_TOP = (
    ("img_in", "img_in", "h", "c_in", None, ""),
    ("txt_in", "txt_in", "h", "ctx", None, ""),
    ("txt_norm", "txt_norm", "ctx", None, None, ""),
    ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_1", "h", "256", None, ""),
    ("time_text_embed.timestep_embedder.linear_2", "time_text_embed.timestep_embedder.linear_2", "h", "h", None, ""),
    ("norm_out.linear", "norm_out.linear", "2*h", "h", None, ""),
    ("proj_out", "proj_out", "c_out", "h", None, ""),
)
_QWEN_BLOCK = tuple((n, n, o, i, None, "") for n, o, i in (
    ("img_mod.1", "6*h", "h"), ("txt_mod.1", "6*h", "h"),
    ("attn.to_q", "h", "h"), ("attn.to_k", "h", "h"), ("attn.to_v", "h", "h"),
    ("attn.add_q_proj", "h", "h"), ("attn.add_k_proj", "h", "h"), ("attn.add_v_proj", "h", "h"),
    ("attn.to_out.0", "h", "h"), ("attn.to_add_out", "h", "h"),
    ("attn.norm_q", "d", None), ("attn.norm_k", "d", None),
    ("attn.norm_added_q", "d", None), ("attn.norm_added_k", "d", None),
    ("img_mlp.net.0.proj", "m", "h"), ("img_mlp.net.2", "h", "m"),
    ("txt_mlp.net.0.proj", "m", "h"), ("txt_mlp.net.2", "h", "m"),
))


# HunyuanVideo: original names are "ComfyUI|Tencent" (ComfyUI renames Tencent's on load,
# comfy/supported_models.py HunyuanVideo.process_unet_state_dict; musubi and diffusion-pipe
# LoRAs use Tencent's). Flux-shaped double/single blocks plus a token refiner.
_HV_TOP = (
    ("x_embedder.proj", "img_in.proj", "h", "c_in", None, ""),  # a Conv3d (pt x p x p)
    ("context_embedder.proj_in", "txt_in.input_embedder", "h", "ctx", None, ""),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.in_layer|txt_in.t_embedder.mlp.0", "h", "256", None, ""),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.out_layer|txt_in.t_embedder.mlp.2", "h", "h", None, ""),
    ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.in_layer|txt_in.c_embedder.linear_1", "h", "ctx", None, ""),
    ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.out_layer|txt_in.c_embedder.linear_2", "h", "h", None, ""),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer|time_in.mlp.0", "h", "256", None, ""),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer|time_in.mlp.2", "h", "h", None, ""),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", "h", "vec", None, ""),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", "h", "h", None, ""),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer|guidance_in.mlp.0", "h", "256", None, "guidance"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer|guidance_in.mlp.2", "h", "h", None, "guidance"),
    ("proj_out", "final_layer.linear", "c_out", "h", None, ""),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", "2*h", "h", "swap", ""),
)
_HV_REFINER = (
    ("norm1", "norm1", "h", "ln", None, ""),
    ("attn.to_q", "self_attn.qkv|self_attn_qkv", "h", "h", "0", ""),
    ("attn.to_k", "self_attn.qkv|self_attn_qkv", "h", "h", "h", ""),
    ("attn.to_v", "self_attn.qkv|self_attn_qkv", "h", "h", "2*h", ""),
    ("attn.to_out.0", "self_attn.proj|self_attn_proj", "h", "h", None, ""),
    ("norm2", "norm2", "h", "ln", None, ""),
    ("ff.net.0.proj", "mlp.0|mlp.fc1", "m", "h", None, ""),
    ("ff.net.2", "mlp.2|mlp.fc2", "h", "m", None, ""),
    ("norm_out.linear", "adaLN_modulation.1", "2*h", "h", None, ""),
)
_HV_DOUBLE = (
    ("norm1.linear", "img_mod.lin|img_mod.linear", "6*h", "h", None, ""),
    ("norm1_context.linear", "txt_mod.lin|txt_mod.linear", "6*h", "h", None, ""),
    ("attn.to_q", "img_attn.qkv|img_attn_qkv", "h", "h", "0", ""),
    ("attn.to_k", "img_attn.qkv|img_attn_qkv", "h", "h", "h", ""),
    ("attn.to_v", "img_attn.qkv|img_attn_qkv", "h", "h", "2*h", ""),
    ("attn.add_q_proj", "txt_attn.qkv|txt_attn_qkv", "h", "h", "0", ""),
    ("attn.add_k_proj", "txt_attn.qkv|txt_attn_qkv", "h", "h", "h", ""),
    ("attn.add_v_proj", "txt_attn.qkv|txt_attn_qkv", "h", "h", "2*h", ""),
    ("attn.to_out.0", "img_attn.proj|img_attn_proj", "h", "h", None, ""),
    ("attn.to_add_out", "txt_attn.proj|txt_attn_proj", "h", "h", None, ""),
    ("attn.norm_q", "img_attn.norm.query_norm.scale|img_attn_q_norm", "d", None, None, ""),
    ("attn.norm_k", "img_attn.norm.key_norm.scale|img_attn_k_norm", "d", None, None, ""),
    ("attn.norm_added_q", "txt_attn.norm.query_norm.scale|txt_attn_q_norm", "d", None, None, ""),
    ("attn.norm_added_k", "txt_attn.norm.key_norm.scale|txt_attn_k_norm", "d", None, None, ""),
    ("ff.net.0.proj", "img_mlp.0|img_mlp.fc1", "m", "h", None, ""),
    ("ff.net.2", "img_mlp.2|img_mlp.fc2", "h", "m", None, ""),
    ("ff_context.net.0.proj", "txt_mlp.0|txt_mlp.fc1", "m", "h", None, ""),
    ("ff_context.net.2", "txt_mlp.2|txt_mlp.fc2", "h", "m", None, ""),
)
_HV_SINGLE = (
    ("norm.linear", "modulation.lin|modulation.linear", "3*h", "h", None, ""),
    ("attn.to_q", "linear1", "h", "h", "0", ""),
    ("attn.to_k", "linear1", "h", "h", "h", ""),
    ("attn.to_v", "linear1", "h", "h", "2*h", ""),
    ("proj_mlp", "linear1", "m", "h", "3*h", ""),
    ("proj_out", "linear2", "h", "h+m", None, ""),
    ("attn.norm_q", "norm.query_norm.scale|q_norm", "d", None, None, ""),
    ("attn.norm_k", "norm.key_norm.scale|k_norm", "d", None, None, ""),
)

# Wan 2.1 / 2.2: no fusion; the diffusers cross-attention norm2 is the original norm3, and the
# modulations are bare parameters (a "1,6,h" shape: scale_shift_table <-> modulation)
_WAN_TOP = (
    ("patch_embedding", "patch_embedding", "h", "c_in", None, ""),  # a Conv3d (1 x 2 x 2)
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0", "h", "freq", None, ""),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2", "h", "h", None, ""),
    ("condition_embedder.time_proj", "time_projection.1", "6*h", "h", None, ""),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0", "h", "ctx", None, ""),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2", "h", "h", None, ""),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0", "img", "ln", None, "i2v"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1", "img", "img", None, "i2v"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3", "h", "img", None, "i2v"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4", "h", "ln", None, "i2v"),
    ("proj_out", "head.head", "c_out", "h", None, ""),
    ("scale_shift_table", "head.modulation", "1,2,h", None, None, ""),
)
_WAN_BLOCK = (
    ("attn1.to_q", "self_attn.q", "h", "h", None, ""),
    ("attn1.to_k", "self_attn.k", "h", "h", None, ""),
    ("attn1.to_v", "self_attn.v", "h", "h", None, ""),
    ("attn1.to_out.0", "self_attn.o", "h", "h", None, ""),
    ("attn1.norm_q", "self_attn.norm_q", "h", None, None, ""),
    ("attn1.norm_k", "self_attn.norm_k", "h", None, None, ""),
    ("attn2.to_q", "cross_attn.q", "h", "h", None, ""),
    ("attn2.to_k", "cross_attn.k", "h", "h", None, ""),
    ("attn2.to_v", "cross_attn.v", "h", "h", None, ""),
    ("attn2.to_out.0", "cross_attn.o", "h", "h", None, ""),
    ("attn2.norm_q", "cross_attn.norm_q", "h", None, None, ""),
    ("attn2.norm_k", "cross_attn.norm_k", "h", None, None, ""),
    ("attn2.add_k_proj", "cross_attn.k_img", "h", "h", None, "i2v"),
    ("attn2.add_v_proj", "cross_attn.v_img", "h", "h", None, "i2v"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img", "h", None, None, "i2v"),
    ("norm2", "norm3", "h", "ln", None, ""),
    ("ffn.net.0.proj", "ffn.0", "m", "h", None, ""),
    ("ffn.net.2", "ffn.2", "h", "m", None, ""),
    ("scale_shift_table", "modulation", "1,6,h", None, None, ""),
)

# Lumina-Image 2.0 (and Z-Image's namespace): q|k|v fused with grouped-query sizes (q = heads x
# d, k = v = kv_heads x d), "t" = min(h, 1024) the conditioning width
_LUMINA_TOP = (
    ("x_embedder", "x_embedder", "h", "c_in", None, ""),
    ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0", "t", "256", None, ""),
    ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2", "t", "t", None, ""),
    ("time_caption_embed.caption_embedder.0", "cap_embedder.0", "ctx", None, None, ""),
    ("time_caption_embed.caption_embedder.1", "cap_embedder.1", "h", "ctx", None, ""),
    ("norm_out.linear_1", "final_layer.adaLN_modulation.1", "h", "t", None, ""),
    ("norm_out.linear_2", "final_layer.linear", "c_out", "h", None, ""),
)
_LUMINA_LAYER = (
    ("attn.to_q", "attention.qkv", "q", "h", "0", ""),
    ("attn.to_k", "attention.qkv", "kv", "h", "q", ""),
    ("attn.to_v", "attention.qkv", "kv", "h", "q+kv", ""),
    ("attn.to_out.0", "attention.out", "h", "q", None, ""),
    ("attn.norm_q", "attention.q_norm", "d", None, None, ""),
    ("attn.norm_k", "attention.k_norm", "d", None, None, ""),
    ("feed_forward.linear_1", "feed_forward.w1", "m", "h", None, ""),
    ("feed_forward.linear_2", "feed_forward.w2", "h", "m", None, ""),
    ("feed_forward.linear_3", "feed_forward.w3", "m", "h", None, ""),
    ("norm1.linear", "adaLN_modulation.1", "4*h", "t", None, "modulated"),
    ("norm1.norm", "attention_norm1", "h", None, None, "modulated"),
    ("norm1", "attention_norm1", "h", None, None, "plain"),
    ("ffn_norm1", "ffn_norm1", "h", None, None, ""),
    ("norm2", "attention_norm2", "h", None, None, ""),
    ("ffn_norm2", "ffn_norm2", "h", None, None, ""),
)


# Z-Image (Tongyi-MAI Z-Image / Z-Image-Turbo; diffusers ZImageTransformer2DModel): Lumina2's
# namespace with its own spellings. The original / ComfyUI single file fuses q|k|v into
# ``attention.qkv`` (even thirds: diffusers' to_k / to_v are dim x dim whatever n_kv_heads says;
# single_file_utils.convert_z_image_transformer_checkpoint_to_diffusers chunks it in three) and
# keeps ``x_embedder`` / ``final_layer`` where diffusers has ``all_x_embedder.2-1`` /
# ``all_final_layer.2-1`` (patch 2, frame patch 1). "t" = min(h, 256) the conditioning width,
# "tm" the timestep MLP's 1024; the refiner and main layers are ``modulated`` (adaLN_modulation.0,
# 4h rows), the context refiner is ``plain``; ``x_pad_token`` / ``cap_pad_token`` are bare (1, h)
# parameters.
_ZIMAGE_TOP = (
    ("all_x_embedder.2-1", "x_embedder", "h", "c_in", None, ""),
    ("all_final_layer.2-1.linear", "final_layer.linear", "c_out", "h", None, ""),
    ("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1", "h", "t", None, ""),
    ("t_embedder.mlp.0", "t_embedder.mlp.0", "tm", "256", None, ""),
    ("t_embedder.mlp.2", "t_embedder.mlp.2", "t", "tm", None, ""),
    ("cap_embedder.0", "cap_embedder.0", "ctx", None, None, ""),
    ("cap_embedder.1", "cap_embedder.1", "h", "ctx", None, ""),
    ("x_pad_token", "x_pad_token", "1,h", None, None, ""),
    ("cap_pad_token", "cap_pad_token", "1,h", None, None, ""),
)
_ZIMAGE_LAYER = (
    ("attention.to_q", "attention.qkv", "h", "h", "0", ""),
    ("attention.to_k", "attention.qkv", "h", "h", "h", ""),
    ("attention.to_v", "attention.qkv", "h", "h", "2*h", ""),
    ("attention.to_out.0", "attention.out", "h", "h", None, ""),
    ("attention.norm_q", "attention.q_norm", "d", None, None, ""),
    ("attention.norm_k", "attention.k_norm", "d", None, None, ""),
    ("feed_forward.w1", "feed_forward.w1", "m", "h", None, ""),
    ("feed_forward.w2", "feed_forward.w2", "h", "m", None, ""),
    ("feed_forward.w3", "feed_forward.w3", "m", "h", None, ""),
    ("adaLN_modulation.0", "adaLN_modulation.0", "4*h", "t", None, "modulated"),
    ("attention_norm1", "attention_norm1", "h", None, None, ""),
    ("ffn_norm1", "ffn_norm1", "h", None, None, ""),
    ("attention_norm2", "attention_norm2", "h", None, None, ""),
    ("ffn_norm2", "ffn_norm2", "h", None, None, ""),
)

# HiDream-I1: the same names in diffusers and ComfyUI; a mixture-of-experts feed-forward
# ("{e}" rows repeat for each routed expert) beside shared experts and a router gate
_HIDREAM_TOP = (
    ("t_embedder.timestep_embedder.linear_1", "t_embedder.timestep_embedder.linear_1", "h", "256", None, ""),
    ("t_embedder.timestep_embedder.linear_2", "t_embedder.timestep_embedder.linear_2", "h", "h", None, ""),
    ("p_embedder.pooled_embedder.linear_1", "p_embedder.pooled_embedder.linear_1", "h", "vec", None, ""),
    ("p_embedder.pooled_embedder.linear_2", "p_embedder.pooled_embedder.linear_2", "h", "h", None, ""),
    ("x_embedder.proj", "x_embedder.proj", "h", "c_in", None, ""),
    ("final_layer.linear", "final_layer.linear", "c_out", "h", None, ""),
    ("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1", "2*h", "h", None, ""),
)
_HIDREAM_CAPTIONS = (
    ("caption_projection.{i}.linear", "caption_projection.{i}.linear", "h", "llm", None, "not_last"),
    ("caption_projection.{i}.linear", "caption_projection.{i}.linear", "h", "t5", None, "last"),
)
_HIDREAM_FF = (
    ("block.ff_i.shared_experts.w1", "block.ff_i.shared_experts.w1", "me", "h", None, ""),
    ("block.ff_i.shared_experts.w2", "block.ff_i.shared_experts.w2", "h", "me", None, ""),
    ("block.ff_i.shared_experts.w3", "block.ff_i.shared_experts.w3", "me", "h", None, ""),
    ("block.ff_i.experts.{e}.w1", "block.ff_i.experts.{e}.w1", "m", "h", None, ""),
    ("block.ff_i.experts.{e}.w2", "block.ff_i.experts.{e}.w2", "h", "m", None, ""),
    ("block.ff_i.experts.{e}.w3", "block.ff_i.experts.{e}.w3", "m", "h", None, ""),
    ("block.ff_i.gate", "block.ff_i.gate", "experts", "h", None, ""),
)
_HIDREAM_ATTN = tuple((n, n, o, i, None, "") for n, o, i in (
    ("block.attn1.to_q", "h", "h"), ("block.attn1.to_k", "h", "h"), ("block.attn1.to_v", "h", "h"),
    ("block.attn1.to_out", "h", "h")))
_HIDREAM_DOUBLE = (("block.adaLN_modulation.1", "block.adaLN_modulation.1", "12*h", "h", None, ""),) + _HIDREAM_ATTN + tuple(
    (n, n, o, i, None, "") for n, o, i in (
        ("block.attn1.to_q_t", "h", "h"), ("block.attn1.to_k_t", "h", "h"), ("block.attn1.to_v_t", "h", "h"),
        ("block.attn1.to_out_t", "h", "h"), ("block.attn1.q_rms_norm", "h", None), ("block.attn1.k_rms_norm", "h", None),
        ("block.attn1.q_rms_norm_t", "h", None), ("block.attn1.k_rms_norm_t", "h", None),
        ("block.ff_t.w1", "m", "h"), ("block.ff_t.w2", "h", "m"), ("block.ff_t.w3", "m", "h"))) + _HIDREAM_FF
_HIDREAM_SINGLE = (("block.adaLN_modulation.1", "block.adaLN_modulation.1", "6*h", "h", None, ""),) + _HIDREAM_ATTN + tuple(
    (n, n, o, i, None, "") for n, o, i in (("block.attn1.q_rms_norm", "h", None), ("block.attn1.k_rms_norm", "h", None))
) + _HIDREAM_FF


@dataclass(frozen=True)
class BlockGroup:
    """Blocks ``{diffusers}.N`` / ``{original}.N`` for N < dims[count], block ids ``{tag}%02d``."""

    diffusers: str
    original: str
    count: str  # name of the dimension holding the number of blocks
    tag: str  # block id prefix: "D" -> D00, D01 ...; "IN" alone: every block is "IN"
    rows: tuple
    kind: str = ""  # passed to the family's conditions (Lumina's refiners have no modulation)


@dataclass(frozen=True)
class Family:
    """One DiT family: its module rows, its conditions, its full-size variants."""

    name: str  # "flux", "chroma", "sd3", "qwen_image"
    label: str
    top: tuple  # rows outside the blocks (block id "IN" or "OUT", see _TOP_BLOCK)
    blocks: tuple  # BlockGroup, ...
    conditions: Callable  # (dims, block index or None, count or None) -> set of true condition names
    variants: Mapping  # variant name -> (label, dims)
    # the original layout's root inside a single-file checkpoint, by who wrote it
    roots: tuple = ("model.diffusion_model.", "diffusion_model.", "")
    extra: tuple = field(default_factory=tuple)  # (rows, count dim): per-index rows outside blocks


def _flux_conditions(dims, i, n, kind=""):
    out = set()
    if dims.get("mod", 1):
        out.add("mod")
    if dims.get("guidance", 0):
        out.add("guidance")
    if dims.get("chroma", 0):
        out.add("chroma")
    return out


def _sd3_conditions(dims, i, n, kind=""):
    out = set()
    dual = set(dims.get("dual_layers", ()))
    if dims.get("qk_norm", 0):
        out.add("qk_norm")
    if i is not None:
        out.add("last" if i == n - 1 else "not_last")
        if i in dual:
            out.add("dual")
            if dims.get("qk_norm", 0):
                out.add("dual_qk_norm")
        else:
            out.add("single_attn")
    return out


def _qwen_conditions(dims, i, n, kind=""):
    return set()


def _hv_conditions(dims, i, n, kind=""):
    return {"guidance"} if dims.get("guidance", 0) else set()


def _wan_conditions(dims, i, n, kind=""):
    return {"i2v"} if dims.get("img", 0) else set()


def _hidream_conditions(dims, i, n, kind=""):
    if kind == "captions":
        return {"last" if i == n - 1 else "not_last"}
    return set()


def _lumina_conditions(dims, i, n, kind=""):
    return {kind} if kind else set()


_FLUX_FULL = dict(h=3072, m=12288, d=128, c_in=64, c_out=64, ctx=4096, vec=768, double=19, single=38,
                  mod=1, guidance=1, chroma=0)

_HV_FULL = dict(h=3072, m=12288, d=128, c_in=16, c_out=64, ctx=4096, vec=768, double=20, single=40, refiner=2,
                guidance=1, kernel=(1, 2, 2))
_WAN_14B = dict(h=5120, m=13824, c_in=16, c_out=64, ctx=4096, freq=256, depth=40, img=0, kernel=(1, 2, 2))

FAMILIES = {
    "flux": Family(
        "flux", "Flux.1", _FLUX_TOP,
        (BlockGroup("transformer_blocks", "double_blocks", "double", "D", _FLUX_DOUBLE),
         BlockGroup("single_transformer_blocks", "single_blocks", "single", "S", _FLUX_SINGLE)),
        _flux_conditions,
        {
            "flux-dev": ("Flux.1 dev (also Kontext)", dict(_FLUX_FULL)),
            "flux-schnell": ("Flux.1 schnell", dict(_FLUX_FULL, guidance=0)),
            "flux-fill": ("Flux.1 Fill", dict(_FLUX_FULL, c_in=384)),
            "flux-control": ("Flux.1 Canny/Depth", dict(_FLUX_FULL, c_in=128)),
        },
        roots=("model.diffusion_model.", "diffusion_model.", ""),
    ),
    "chroma": Family(
        "chroma", "Chroma", _FLUX_TOP,
        (BlockGroup("transformer_blocks", "double_blocks", "double", "D", _FLUX_DOUBLE),
         BlockGroup("single_transformer_blocks", "single_blocks", "single", "S", _FLUX_SINGLE)),
        _flux_conditions,
        {"chroma": ("Chroma", dict(_FLUX_FULL, mod=0, guidance=0, chroma=1, a=5120, a_in=64, approx=5))},
        extra=((_CHROMA_APPROX, "approx"),),
    ),
    "sd3": Family(
        "sd3", "SD3", _SD3_TOP,
        (BlockGroup("transformer_blocks", "joint_blocks", "depth", "J", _SD3_JOINT),),
        _sd3_conditions,
        {
            "sd3-medium": ("SD3 Medium", dict(h=1536, m=6144, d=64, c_in=16, c_out=64, ctx=4096, vec=2048,
                                              depth=24, qk_norm=0, dual_layers=(), kernel=(2, 2))),
            "sd3.5-medium": ("SD3.5 Medium", dict(h=1536, m=6144, d=64, c_in=16, c_out=64, ctx=4096, vec=2048,
                                                  depth=24, qk_norm=1, dual_layers=tuple(range(13)), kernel=(2, 2))),
            "sd3.5-large": ("SD3.5 Large", dict(h=2432, m=9728, d=64, c_in=16, c_out=64, ctx=4096, vec=2048,
                                                depth=38, qk_norm=1, dual_layers=(), kernel=(2, 2))),
        },
    ),
    "qwen_image": Family(
        "qwen_image", "Qwen-Image", _QWEN_TOP,
        (BlockGroup("transformer_blocks", "transformer_blocks", "depth", "B", _QWEN_BLOCK),),
        _qwen_conditions,
        {"qwen-image": ("Qwen-Image", dict(h=3072, m=12288, d=128, c_in=64, c_out=64, ctx=3584, depth=60))},
    ),
    "hunyuan_video": Family(
        "hunyuan_video", "HunyuanVideo", _HV_TOP,
        (BlockGroup("context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks",
                    "refiner", "IN", _HV_REFINER),
         BlockGroup("transformer_blocks", "double_blocks", "double", "D", _HV_DOUBLE),
         BlockGroup("single_transformer_blocks", "single_blocks", "single", "S", _HV_SINGLE)),
        _hv_conditions,
        {
            "hunyuan-video": ("HunyuanVideo (T2V)", dict(_HV_FULL)),
            "hunyuan-video-i2v": ("HunyuanVideo I2V", dict(_HV_FULL, c_in=33)),
        },
    ),
    "wan": Family(
        "wan", "Wan", _WAN_TOP,
        (BlockGroup("blocks", "blocks", "depth", "B", _WAN_BLOCK),),
        _wan_conditions,
        {
            "wan2.1-t2v-1.3b": ("Wan 2.1 T2V-1.3B", dict(_WAN_14B, h=1536, m=8960, depth=30)),
            "wan-14b-t2v": ("Wan 2.1 T2V-14B / Wan 2.2 T2V-A14B", dict(_WAN_14B)),
            "wan2.1-i2v-14b": ("Wan 2.1 I2V-14B", dict(_WAN_14B, c_in=36, img=1280)),
            "wan2.2-i2v-a14b": ("Wan 2.2 I2V-A14B", dict(_WAN_14B, c_in=36)),
            "wan2.2-ti2v-5b": ("Wan 2.2 TI2V-5B", dict(_WAN_14B, h=3072, m=14336, depth=30, c_in=48, c_out=192)),
        },
    ),
    "lumina2": Family(
        "lumina2", "Lumina-Image 2.0", _LUMINA_TOP,
        (BlockGroup("noise_refiner", "noise_refiner", "noise", "IN", _LUMINA_LAYER, "modulated"),
         BlockGroup("context_refiner", "context_refiner", "context", "IN", _LUMINA_LAYER, "plain"),
         BlockGroup("layers", "layers", "depth", "L", _LUMINA_LAYER, "modulated")),
        _lumina_conditions,
        {"lumina-image-2": ("Lumina-Image 2.0", dict(h=2304, q=2304, kv=768, d=96, m=9216, t=1024, ctx=2304,
                                                       c_in=64, c_out=64, depth=26, noise=2, context=2))},
    ),
    "z_image": Family(
        "z_image", "Z-Image", _ZIMAGE_TOP,
        (BlockGroup("noise_refiner", "noise_refiner", "noise", "IN", _ZIMAGE_LAYER, "modulated"),
         BlockGroup("context_refiner", "context_refiner", "context", "IN", _ZIMAGE_LAYER, "plain"),
         BlockGroup("layers", "layers", "depth", "L", _ZIMAGE_LAYER, "modulated")),
        _lumina_conditions,
        # Tongyi-MAI/Z-Image-Turbo transformer/config.json: dim 3840, 30 heads (d 128), 30 layers,
        # 2 + 2 refiner layers, cap_feat_dim 2560 (Qwen3-4B), in_channels 16, patch 2 x 2
        {"z-image-turbo": ("Z-Image (Turbo)", dict(h=3840, d=128, m=10240, t=256, tm=1024, ctx=2560, c_in=64,
                                                   c_out=64, depth=30, noise=2, context=2))},
    ),
    "hidream": Family(
        "hidream", "HiDream-I1", _HIDREAM_TOP,
        (BlockGroup("double_stream_blocks", "double_stream_blocks", "double", "D", _HIDREAM_DOUBLE),
         BlockGroup("single_stream_blocks", "single_stream_blocks", "single", "S", _HIDREAM_SINGLE)),
        _hidream_conditions,
        {"hidream-i1": ("HiDream-I1", dict(h=2560, m=6912, me=3584, experts=4, vec=2048, c_in=64, c_out=64, llm=4096, t5=4096,
                                            double=16, single=32, captions=49))},
        extra=((_HIDREAM_CAPTIONS, "captions"),),
    ),
}

#: every full-size variant: name -> (family name, label, dims)
VARIANTS = {v: (fam.name, label, dims) for fam in FAMILIES.values() for v, (label, dims) in fam.variants.items()}

# Top-level modules: inputs and embedders are "IN", the output layers "OUT" (lbw's Flux ids).
_OUT_TOP = ("proj_out", "norm_out.linear", "norm_out.linear_1", "norm_out.linear_2", "final_layer.linear",
            "final_layer.adaLN_modulation.1", "scale_shift_table", "all_final_layer.2-1.linear",
            "all_final_layer.2-1.adaLN_modulation.1")


_CODE: dict = {}


def _value(expr: str, dims: Mapping) -> int:
    # expressions are this module's own constants ("2*h", "h+m"); names come from dims
    if expr.isdigit():
        return int(expr)
    if expr in dims and isinstance(dims[expr], int):
        return dims[expr]
    code = _CODE.get(expr)
    if code is None:
        code = _CODE[expr] = compile(expr, "<dims>", "eval")
    return int(eval(code, {"__builtins__": {}}, dims))


_CONV = ("pos_embed.proj", "x_embedder.proj", "patch_embedding")  # patch embeddings: kernel = dims["kernel"]


def _info(row: Row, dims: Mapping, root: str, block: str, i: Optional[int]) -> tuple:
    diff, orig, out, inp, first, _ = row
    fmt = (lambda t: t.format(i=i)) if i is not None else (lambda t: t)
    diff, orig = fmt(diff), fmt(orig)
    orig, _, alias = orig.partition("|")
    alias = alias or None
    if inp is None:  # a bare parameter: a norm scale (1-D) or a modulation table ("1,6,h")
        shape = tuple(_value(x, dims) for x in out.split(","))
        named = lambda n: n if n.endswith(".scale") or "," in out else n + ".weight"  # noqa: E731
        weight = named(orig)
        path = orig if (orig.endswith(".scale") or "," in out) else orig
        return diff, ModuleInfo("unet", diff, "norm", shape, None, block, path, root + weight, None,
                                ldm_alias=None if alias is None else alias)
    o = _value(out, dims)
    if inp == "ln":  # a LayerNorm with weight and bias
        return diff, ModuleInfo("unet", diff, "norm", (o,), (o,), block, orig, root + orig + ".weight",
                                root + orig + ".bias", ldm_alias=alias)
    kind, shape = "linear", (o, _value(inp, dims))
    if diff in _CONV and "kernel" in dims:
        kind, shape = "conv", shape + tuple(int(k) for k in dims.get("kernel", (2, 2)))
    rows, swap = None, False
    if first == "swap":
        swap = True
    elif first is not None:
        start = _value(first, dims)
        rows = (start, start + o)
    return diff, ModuleInfo("unet", diff, kind, shape, (o,), block, orig, root + orig + ".weight",
                            root + orig + ".bias", ldm_rows=rows, ldm_swap=swap, ldm_alias=alias)


def _experts(rows, dims):
    """Rows with an "{e}" placeholder, once per routed expert (HiDream's mixture of experts)."""
    for row in rows:
        if "{e}" in row[0]:
            for e in range(int(dims.get("experts", 0))):
                yield (row[0].replace("{e}", str(e)), row[1].replace("{e}", str(e))) + tuple(row[2:])
        else:
            yield row


def _prefixed(info: ModuleInfo, path: str, prefix: str, alias_prefix: str, root: str) -> ModuleInfo:
    rel = lambda key: None if key is None else root + prefix + key[len(root):]  # noqa: E731
    return ModuleInfo(
        "unet", path, info.kind, info.weight_shape, info.bias_shape, info.block, prefix + info.ldm_path,
        rel(info.ldm_weight), rel(info.ldm_bias), ldm_rows=info.ldm_rows, ldm_swap=info.ldm_swap,
        ldm_alias=None if info.ldm_alias is None else alias_prefix + info.ldm_alias)


def table(family: str, dims: Mapping, root: str = "", names: str = "") -> dict:
    """``{canonical path: ModuleInfo}`` of the denoiser (component "unet") of ``family`` with
    dimensions ``dims``; original-layout weight keys carry ``root``. ``names="alias"`` makes a
    family's second original spelling (HunyuanVideo's Tencent names) the one the weight keys
    use, as in files written with it."""
    fam = FAMILIES[family]
    out: dict = {}
    top_conds = fam.conditions(dims, None, None, "")
    for row in fam.top:
        if row[5] and row[5] not in top_conds:
            continue
        block = "OUT" if row[0] in _OUT_TOP else "IN"
        path, info = _info(row, dims, root, block, None)
        out[path] = info
    for rows, count in fam.extra:
        n = int(dims.get(count, 0))
        for i in range(n):
            conds = fam.conditions(dims, i, n, count)
            for row in rows:
                if row[5] and row[5] not in conds:
                    continue
                path, info = _info(row, dims, root, "IN", i)
                out[path] = info
    for group in fam.blocks:
        n = int(dims.get(group.count, 0))
        for i in range(n):
            conds = fam.conditions(dims, i, n, group.kind)
            block = group.tag if group.tag == "IN" else f"{group.tag}{i:02d}"
            for row in _experts(group.rows, dims):
                if row[5] and row[5] not in conds:
                    continue
                path, info = _info(row, dims, root, block, i)
                path = f"{group.diffusers}.{i}.{path}"
                prefix = f"{group.original}.{i}."
                out[path] = _prefixed(info, path, prefix, prefix, root)
    if names == "alias":
        out = {p: _use_alias(i, root) for p, i in out.items()}
    return out


def _use_alias(info: ModuleInfo, root: str) -> ModuleInfo:
    if info.ldm_alias is None:
        return info
    alias, param = info.ldm_alias, info.ldm_weight.rsplit(".", 1)[-1] if "." in info.ldm_weight else ""
    bare = not info.ldm_weight.endswith(".weight")
    weight = root + alias + ("" if bare else ".weight")
    if bare and info.ldm_weight.endswith(".scale") and not alias.endswith(".scale"):
        weight = root + alias + ".weight"  # Tencent's q_norm.weight for ComfyUI's query_norm.scale
    return dataclasses.replace(info, ldm_path=alias, ldm_alias=info.ldm_path, ldm_weight=weight,
                               ldm_bias=None if info.ldm_bias is None else root + alias + ".bias")


def variant_table(variant: str, root: str = "") -> dict:
    family, _, dims = VARIANTS[variant]
    return table(family, dims, root)
