"""DiT families (Flux.1, Chroma, SD3/SD3.5, Qwen-Image, HunyuanVideo, Wan, Lumina2, Z-Image,
HiDream): module tables and their sizes.

``families`` holds the tables as data. This module finds, from the parameter shapes of a
model or a checkpoint in either layout, which family it is and its dimensions
(:func:`dims_from_shapes`), and names the full-size variant when the dimensions are one
(:func:`variant_of`). Nothing here needs diffusers: a host's model or a file's header is
enough.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

from .families import FAMILIES, VARIANTS, table, variant_table

__all__ = ["FAMILIES", "VARIANTS", "table", "variant_table", "dims_from_shapes", "variant_of",
           "family_label", "table_for_shapes", "DIT_FAMILIES"]

DIT_FAMILIES = tuple(FAMILIES)


def family_label(name: str) -> str:
    if name in VARIANTS:
        return VARIANTS[name][1]
    fam = FAMILIES.get(name)
    return fam.label if fam else name


def _count(shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in shapes for m in [rx.match(k)] if m}
    return max(idx) + 1 if idx else 0


def _indices(shapes, pattern: str) -> set:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in shapes for m in [rx.match(k)] if m}


def _dim(shapes, key: str, axis: int, default=None):
    s = shapes.get(key)
    return int(s[axis]) if s is not None and len(s) > axis else default


def dims_from_shapes(shapes: Mapping[str, tuple]) -> Optional[tuple]:
    """``(family, dims, naming)`` of a DiT denoiser from ``{parameter name: shape}`` (names
    relative to the denoiser's root, either layout), or None when it is none of the families."""
    s = {k: tuple(v) for k, v in shapes.items()}
    if any(k.startswith("txt_in.individual_token_refiner.") for k in s):
        return _hv_original(s)
    if "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight" in s:
        return _hv_diffusers(s)
    if "blocks.0.self_attn.q.weight" in s or "blocks.0.attn1.to_q.weight" in s:
        return _wan(s)
    if ("x_pad_token" in s or "cap_pad_token" in s or "layers.0.attention.to_q.weight" in s
            or "layers.0.adaLN_modulation.0.weight" in s):
        return _zimage(s)
    if "layers.0.attention.qkv.weight" in s or "layers.0.feed_forward.linear_1.weight" in s:
        return _lumina(s)
    if "double_stream_blocks.0.block.attn1.to_q.weight" in s or "single_stream_blocks.0.block.attn1.to_q.weight" in s:
        return _hidream(s)
    if "double_blocks.0.img_attn.qkv.weight" in s or "single_blocks.0.linear1.weight" in s:
        return _flux_original(s)
    if "joint_blocks.0.x_block.attn.qkv.weight" in s:
        return _sd3_original(s)
    if "transformer_blocks.0.img_mod.1.weight" in s:
        return _qwen(s)
    if "single_transformer_blocks.0.proj_mlp.weight" in s or (
            "transformer_blocks.0.attn.to_q.weight" in s and "transformer_blocks.0.ff_context.net.0.proj.weight" in s
            and "pos_embed.proj.weight" not in s):
        return _flux_diffusers(s)
    if "transformer_blocks.0.attn.to_q.weight" in s and "pos_embed.proj.weight" in s:
        return _sd3_diffusers(s)
    return None


def _flux_original(s):
    b = "double_blocks.0."
    h = _dim(s, b + "img_attn.proj.weight", 1) or _dim(s, "single_blocks.0.linear1.weight", 1)
    m = _dim(s, b + "img_mlp.0.weight", 0, 4 * h)
    dims = dict(h=h, m=m, d=_dim(s, b + "img_attn.norm.query_norm.scale", 0, 128),
                c_in=_dim(s, "img_in.weight", 1, 64), c_out=_dim(s, "final_layer.linear.weight", 0, 64),
                ctx=_dim(s, "txt_in.weight", 1, 4096), vec=_dim(s, "vector_in.in_layer.weight", 1, 768),
                double=_count(s, r"double_blocks\.(\d+)\."), single=_count(s, r"single_blocks\.(\d+)\."),
                mod=int(b + "img_mod.lin.weight" in s or "single_blocks.0.modulation.lin.weight" in s),
                guidance=int("guidance_in.in_layer.weight" in s), chroma=0)
    if "distilled_guidance_layer.in_proj.weight" in s:
        dims.update(chroma=1, mod=0, a=_dim(s, "distilled_guidance_layer.in_proj.weight", 0),
                    a_in=_dim(s, "distilled_guidance_layer.in_proj.weight", 1),
                    approx=_count(s, r"distilled_guidance_layer\.layers\.(\d+)\."))
        return "chroma", dims, "ldm"
    return "flux", dims, "ldm"


def _flux_diffusers(s):
    b = "transformer_blocks.0."
    h = _dim(s, b + "attn.to_q.weight", 1) or _dim(s, "single_transformer_blocks.0.attn.to_q.weight", 1)
    dims = dict(h=h, m=_dim(s, b + "ff.net.0.proj.weight", 0, 4 * h), d=_dim(s, b + "attn.norm_q.weight", 0, 128),
                c_in=_dim(s, "x_embedder.weight", 1, 64), c_out=_dim(s, "proj_out.weight", 0, 64),
                ctx=_dim(s, "context_embedder.weight", 1, 4096),
                vec=_dim(s, "time_text_embed.text_embedder.linear_1.weight", 1, 768),
                double=_count(s, r"transformer_blocks\.(\d+)\."),
                single=_count(s, r"single_transformer_blocks\.(\d+)\."),
                mod=int(b + "norm1.linear.weight" in s or "single_transformer_blocks.0.norm.linear.weight" in s),
                guidance=int("time_text_embed.guidance_embedder.linear_1.weight" in s), chroma=0)
    if "distilled_guidance_layer.in_proj.weight" in s:
        dims.update(chroma=1, mod=0, a=_dim(s, "distilled_guidance_layer.in_proj.weight", 0),
                    a_in=_dim(s, "distilled_guidance_layer.in_proj.weight", 1),
                    approx=_count(s, r"distilled_guidance_layer\.layers\.(\d+)\."))
        return "chroma", dims, "diffusers"
    return "flux", dims, "diffusers"


def _sd3_original(s):
    b = "joint_blocks.0.x_block."
    h = _dim(s, b + "attn.proj.weight", 1)
    conv = s.get("x_embedder.proj.weight", (h, 16, 2, 2))
    dims = dict(h=h, m=_dim(s, b + "mlp.fc1.weight", 0, 4 * h), d=_dim(s, b + "attn.ln_q.weight", 0, 64),
                c_in=int(conv[1]), kernel=tuple(int(k) for k in conv[2:]) or (2, 2),
                c_out=_dim(s, "final_layer.linear.weight", 0, 64), ctx=_dim(s, "context_embedder.weight", 1, 4096),
                vec=_dim(s, "y_embedder.mlp.0.weight", 1, 2048), depth=_count(s, r"joint_blocks\.(\d+)\."),
                qk_norm=int(b + "attn.ln_q.weight" in s),
                dual_layers=tuple(sorted(_indices(s, r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight"))))
    return "sd3", dims, "ldm"


def _sd3_diffusers(s):
    b = "transformer_blocks.0."
    h = _dim(s, b + "attn.to_q.weight", 1)
    conv = s.get("pos_embed.proj.weight", (h, 16, 2, 2))
    dims = dict(h=h, m=_dim(s, b + "ff.net.0.proj.weight", 0, 4 * h), d=_dim(s, b + "attn.norm_q.weight", 0, 64),
                c_in=int(conv[1]), kernel=tuple(int(k) for k in conv[2:]) or (2, 2),
                c_out=_dim(s, "proj_out.weight", 0, 64), ctx=_dim(s, "context_embedder.weight", 1, 4096),
                vec=_dim(s, "time_text_embed.text_embedder.linear_1.weight", 1, 2048),
                depth=_count(s, r"transformer_blocks\.(\d+)\."), qk_norm=int(b + "attn.norm_q.weight" in s),
                dual_layers=tuple(sorted(_indices(s, r"transformer_blocks\.(\d+)\.attn2\.to_q\.weight"))))
    return "sd3", dims, "diffusers"


def _qwen(s):
    b = "transformer_blocks.0."
    h = _dim(s, b + "attn.to_q.weight", 1)
    dims = dict(h=h, m=_dim(s, b + "img_mlp.net.0.proj.weight", 0, 4 * h), d=_dim(s, b + "attn.norm_q.weight", 0, 128),
                c_in=_dim(s, "img_in.weight", 1, 64), c_out=_dim(s, "proj_out.weight", 0, 64),
                ctx=_dim(s, "txt_in.weight", 1, 3584), depth=_count(s, r"transformer_blocks\.(\d+)\."))
    return "qwen_image", dims, "diffusers"


def _hv_original(s):
    tencent = any(k.startswith("txt_in.individual_token_refiner.blocks.0.self_attn_qkv") for k in s)
    b = "double_blocks.0."
    proj = "img_attn_proj" if tencent else "img_attn.proj"
    h = _dim(s, b + proj + ".weight", 1) or _dim(s, "single_blocks.0.linear1.weight", 1)
    conv = s.get("img_in.proj.weight", (h, 16, 1, 2, 2))
    dims = dict(h=h, m=_dim(s, b + ("img_mlp.fc1" if tencent else "img_mlp.0") + ".weight", 0, 4 * h),
                d=_dim(s, b + ("img_attn_q_norm.weight" if tencent else "img_attn.norm.query_norm.scale"), 0, 128),
                c_in=int(conv[1]), kernel=tuple(int(k) for k in conv[2:]) or (1, 2, 2),
                c_out=_dim(s, "final_layer.linear.weight", 0, 64), ctx=_dim(s, "txt_in.input_embedder.weight", 1, 4096),
                vec=_dim(s, "vector_in.in_layer.weight", 1, 768), double=_count(s, r"double_blocks\.(\d+)\."),
                single=_count(s, r"single_blocks\.(\d+)\."),
                refiner=_count(s, r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."),
                guidance=int(any(k.startswith("guidance_in.") for k in s)))
    if tencent:
        dims["_names"] = "alias"
    return "hunyuan_video", dims, "ldm"


def _hv_diffusers(s):
    b = "transformer_blocks.0."
    h = _dim(s, b + "attn.to_q.weight", 1)
    conv = s.get("x_embedder.proj.weight", (h, 16, 1, 2, 2))
    dims = dict(h=h, m=_dim(s, b + "ff.net.0.proj.weight", 0, 4 * h), d=_dim(s, b + "attn.norm_q.weight", 0, 128),
                c_in=int(conv[1]), kernel=tuple(int(k) for k in conv[2:]) or (1, 2, 2),
                c_out=_dim(s, "proj_out.weight", 0, 64), ctx=_dim(s, "context_embedder.proj_in.weight", 1, 4096),
                vec=_dim(s, "time_text_embed.text_embedder.linear_1.weight", 1, 768),
                double=_count(s, r"transformer_blocks\.(\d+)\."), single=_count(s, r"single_transformer_blocks\.(\d+)\."),
                refiner=_count(s, r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\."),
                guidance=int("time_text_embed.guidance_embedder.linear_1.weight" in s))
    return "hunyuan_video", dims, "diffusers"


def _wan(s):
    orig = "blocks.0.self_attn.q.weight" in s
    n = dict(q="self_attn.q", ffn="ffn.0", emb="patch_embedding", text="text_embedding.0", time="time_embedding.0",
             head="head.head", img="img_emb.proj.1") if orig else dict(
        q="attn1.to_q", ffn="ffn.net.0.proj", emb="patch_embedding", text="condition_embedder.text_embedder.linear_1",
        time="condition_embedder.time_embedder.linear_1", head="proj_out",
        img="condition_embedder.image_embedder.ff.net.0.proj")
    h = _dim(s, f"blocks.0.{n['q']}.weight", 1)
    conv = s.get("patch_embedding.weight", (h, 16, 1, 2, 2))
    dims = dict(h=h, m=_dim(s, f"blocks.0.{n['ffn']}.weight", 0, 4 * h), c_in=int(conv[1]),
                kernel=tuple(int(k) for k in conv[2:]) or (1, 2, 2), c_out=_dim(s, n["head"] + ".weight", 0, 64),
                ctx=_dim(s, n["text"] + ".weight", 1, 4096), freq=_dim(s, n["time"] + ".weight", 1, 256),
                depth=_count(s, r"blocks\.(\d+)\."), img=_dim(s, n["img"] + ".weight", 0, 0))
    return "wan", dims, "ldm" if orig else "diffusers"


def _lumina(s):
    orig = "layers.0.attention.qkv.weight" in s
    if orig:
        h = _dim(s, "layers.0.attention.qkv.weight", 1)
        d = _dim(s, "layers.0.attention.q_norm.weight", 0, 96)
        q = _dim(s, "layers.0.attention.out.weight", 1, h)
        kv = (_dim(s, "layers.0.attention.qkv.weight", 0) - q) // 2
        m = _dim(s, "layers.0.feed_forward.w1.weight", 0)
        t = _dim(s, "layers.0.adaLN_modulation.1.weight", 1, min(h, 1024))
        ctx = _dim(s, "cap_embedder.1.weight", 1, h)
        c_in, c_out = _dim(s, "x_embedder.weight", 1, 64), _dim(s, "final_layer.linear.weight", 0, 64)
        noise, context = _count(s, r"noise_refiner\.(\d+)\."), _count(s, r"context_refiner\.(\d+)\.")
    else:
        h = _dim(s, "layers.0.attn.to_q.weight", 1)
        d = _dim(s, "layers.0.attn.norm_q.weight", 0, 96)
        q, kv = _dim(s, "layers.0.attn.to_q.weight", 0), _dim(s, "layers.0.attn.to_k.weight", 0)
        m = _dim(s, "layers.0.feed_forward.linear_1.weight", 0)
        t = _dim(s, "layers.0.norm1.linear.weight", 1, min(h, 1024))
        ctx = _dim(s, "time_caption_embed.caption_embedder.1.weight", 1, h)
        c_in, c_out = _dim(s, "x_embedder.weight", 1, 64), _dim(s, "norm_out.linear_2.weight", 0, 64)
        noise, context = _count(s, r"noise_refiner\.(\d+)\."), _count(s, r"context_refiner\.(\d+)\.")
    dims = dict(h=h, q=q, kv=kv, d=d, m=m, t=t, ctx=ctx, c_in=c_in, c_out=c_out, depth=_count(s, r"layers\.(\d+)\."),
                noise=noise, context=context)
    return "lumina2", dims, "ldm" if orig else "diffusers"


def _zimage(s):
    """Z-Image: Lumina2's ``layers.N.attention`` namespace, told apart by its pad tokens, its
    ``adaLN_modulation.0`` (Lumina2: ``.1``) and, in diffusers, ``attention.to_q`` (Lumina2:
    ``attn.to_q``)."""
    orig = "layers.0.attention.qkv.weight" in s or "x_embedder.weight" in s
    h = (_dim(s, "layers.0.attention.qkv.weight", 1) or _dim(s, "layers.0.attention.to_q.weight", 1)
         or _dim(s, "x_pad_token", 1))
    x_emb, final = ("x_embedder", "final_layer") if orig else ("all_x_embedder.2-1", "all_final_layer.2-1")
    dims = dict(h=h, d=_dim(s, "layers.0.attention." + ("q_norm" if orig else "norm_q") + ".weight", 0, 128),
                m=_dim(s, "layers.0.feed_forward.w1.weight", 0, int(h / 3 * 8)),
                t=_dim(s, "layers.0.adaLN_modulation.0.weight", 1, min(h, 256)),
                tm=_dim(s, "t_embedder.mlp.0.weight", 0, 1024), ctx=_dim(s, "cap_embedder.1.weight", 1, 2560),
                c_in=_dim(s, x_emb + ".weight", 1, 64), c_out=_dim(s, final + ".linear.weight", 0, 64),
                depth=_count(s, r"layers\.(\d+)\."), noise=_count(s, r"noise_refiner\.(\d+)\."),
                context=_count(s, r"context_refiner\.(\d+)\."))
    return "z_image", dims, "ldm" if orig else "diffusers"


def _hidream(s):
    b = "double_stream_blocks.0.block." if "double_stream_blocks.0.block.attn1.to_q.weight" in s else "single_stream_blocks.0.block."
    h = _dim(s, b + "attn1.to_q.weight", 1)
    captions = _count(s, r"caption_projection\.(\d+)\.")
    dims = dict(h=h, m=_dim(s, b + "ff_i.experts.0.w1.weight", 0, 4 * h),
                me=_dim(s, b + "ff_i.shared_experts.w1.weight", 0, 4 * h),
                experts=_count(s, r"(?:double|single)_stream_blocks\.0\.block\.ff_i\.experts\.(\d+)\."),
                vec=_dim(s, "p_embedder.pooled_embedder.linear_1.weight", 1, 2048), c_in=_dim(s, "x_embedder.proj.weight", 1, 64),
                c_out=_dim(s, "final_layer.linear.weight", 0, 64),
                llm=_dim(s, "caption_projection.0.linear.weight", 1, 4096),
                t5=_dim(s, f"caption_projection.{max(captions - 1, 0)}.linear.weight", 1, 4096),
                double=_count(s, r"double_stream_blocks\.(\d+)\."), single=_count(s, r"single_stream_blocks\.(\d+)\."),
                captions=captions)
    return "hidream", dims, "diffusers"


def variant_of(family: str, dims: Mapping) -> Optional[str]:
    """The full-size variant whose dimensions ``dims`` are, or None (a custom size)."""
    for name, (fam, _, want) in VARIANTS.items():
        if fam == family and all(dims.get(k) == v for k, v in want.items()):
            return name
    return None


def table_for_shapes(shapes: Mapping[str, tuple], root: str = "") -> Optional[tuple]:
    """``(family or variant name, naming, table)`` for a denoiser given its parameter shapes."""
    found = dims_from_shapes(shapes)
    if found is None:
        return None
    family, dims, naming = found
    return variant_of(family, dims) or family, naming, table(family, dims, root, dims.get("_names", ""))


# --- which families a LoRA may be for, cheaply ------------------------------------------------
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_", "lora_", "diffusion_model_",
                  "lora_unet_diffusion_model_", "lora_unet__", "Hunyuan_video_I2V_lora_", "oft_unet_",
                  "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_")
_DOTTED_PREFIXES = ("transformer.base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
                    "base_model.model.", "unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3.",
                    "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                    "text_encoders.t5xxl.transformer.", "clip_l.", "clip_g.", "t5.")
_BODIES: dict = {}


def _family_bodies(family: str) -> frozenset:
    """Every module name of ``family`` (both layouts, aliases, fused parts), flattened with "_"."""
    got = _BODIES.get(family)
    if got is None:
        from ..layouts import arch_layout
        from .aliases import extra_aliases

        variant = next(v for v, (f, _, _) in VARIANTS.items() if f == family)
        names = set()
        for comp, table in arch_layout(variant).items():
            for info in table.values():
                for n in (info.path, "text_model." + info.path if comp != "unet" else None, info.ldm_path,
                          getattr(info, "ldm_alias", None)):
                    if n:
                        names.add(n[: -len(".scale")] if n.endswith(".scale") else n)
                if info.ldm_rows is not None:
                    for base in filter(None, (info.ldm_path, getattr(info, "ldm_alias", None))):
                        names.update(f"{base}.{k}" for k in range(4))
            if comp == "unet":
                names.update(a for a, _ in extra_aliases(table))
        got = _BODIES[family] = frozenset(n.replace(".", "_") for n in names)
    return got


def _strip_index(body: str) -> str:
    # block numbers differ between sizes: compare names with their numbers masked
    return re.sub(r"(?<=_)\d+(?=_|$)", "#", body)


_MASKED: dict = {}


def families_for(prefixes) -> list:
    """The DiT families whose module names some of ``prefixes`` (LoRA key groups) use, with
    block numbers masked: which full-size variants are worth binding a LoRA against."""
    out = []
    bodies = set()
    for p in prefixes:
        for pre in _DOTTED_PREFIXES:
            if p.startswith(pre):
                bodies.add(_strip_index(p[len(pre):].replace(".", "_")))
        for pre in _FLAT_PREFIXES:
            if p.startswith(pre):
                bodies.add(_strip_index(p[len(pre):].replace(".", "_")))
        bodies.add(_strip_index(p.replace(".", "_")))
    for family in FAMILIES:
        masked = _MASKED.get(family)
        if masked is None:
            masked = _MASKED[family] = frozenset(_strip_index(b) for b in _family_bodies(family))
        if bodies & masked:
            out.append(family)
    return out
