"""Names some writers give to parts of a DiT that no layout table spells.

XLabs (``XLabs-AI/x-flux src/flux/modules/layers.py``) trains LoRA processors beside the
original Flux modules: ``double_blocks.N.processor.qkv_lora1`` is added to the image stream's
fused qkv, ``proj_lora1`` to its output projection, ``qkv_lora2`` / ``proj_lora2`` the same
for the text stream, and ``single_blocks.N.processor.qkv_lora`` to the q|k|v rows (not the
MLP rows) of ``linear1``. Each alias here names the diffusers modules it spans, in row order.
(The single-block ``proj_lora`` is applied to the block's *output*, ``y + L(y)``, which is no
weight delta of any one module: it stays unmatched, with its reason.)
"""
from __future__ import annotations

import re

_DOUBLE = (
    ("processor.qkv_lora1", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("processor.proj_lora1", ("attn.to_out.0",)),
    ("processor.qkv_lora2", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("processor.proj_lora2", ("attn.to_add_out",)),
)
_SINGLE = (("processor.qkv_lora", ("attn.to_q", "attn.to_k", "attn.to_v")),)

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.to_q$")


_IMAGE_BRANCH = re.compile(r"k_img|v_img|norm_k_img|img_emb|image_embedder|attn2[._]add_[kv]_proj|attn2[._]norm_added_k")


def not_applicable(table):
    """``[(pattern, reason)]``: key groups a LoRA may carry that this model lacks by design."""
    out = []
    if "blocks.0.attn2.to_q" in table and "blocks.0.attn2.add_k_proj" not in table:
        # Wan 2.1 I2V LoRAs train the CLIP image branch, which Wan 2.2 (and T2V) do not have
        # (ostris/ai-toolkit#349): report them as such, not as unknown keys
        out.append((_IMAGE_BRANCH, "this Wan model has no CLIP image branch (k_img / v_img / img_emb are "
                                   "Wan 2.1 I2V modules)"))
    return out


def extra_aliases(table):
    """``[(alias, (canonical paths...))]`` for the Flux-shaped blocks of a denoiser table."""
    out = []
    for path, info in table.items():
        m = _BLOCK.match(path)
        ldm = getattr(info, "ldm_path", None) or ""
        if m is None or not ldm.startswith(("double_blocks.", "single_blocks.")):
            continue
        diff_block = f"{m.group(1)}.{m.group(2)}."
        orig_block = ldm.split(".")[0] + f".{m.group(2)}."
        for alias, parts in (_DOUBLE if m.group(1) == "transformer_blocks" else _SINGLE):
            paths = tuple(diff_block + p for p in parts)
            if all(p in table for p in paths):
                out.append((orig_block + alias, paths))
    return out
