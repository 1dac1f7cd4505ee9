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


@dataclass(frozen=True)
class BlockGroup:
    """Blocks ``{diffusers}.N`` / ``{original}.N`` for N < dims[count], block ids ``{tag}%02d``."""

    diffusers: str
    original: str
    count: str  # name of the dimension holding the number of blocks
    tag: str  # block id prefix: "D" -> D00, D01 ...
    rows: tuple


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


def _flux_conditions(dims, i, n):
    out = set()
    if dims.get("mod", 1):
        out.add("mod")
    if dims.get("guidance", 0):
        out.add("guidance")
    if dims.get("chroma", 0):
        out.add("chroma")
    return out


def _sd3_conditions(dims, i, n):
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


def _qwen_conditions(dims, i, n):
    return set()


_FLUX_FULL = dict(h=3072, m=12288, d=128, c_in=64, c_out=64, ctx=4096, vec=768, double=19, single=38,
                  mod=1, guidance=1, chroma=0)

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
                                              depth=24, qk_norm=0, dual_layers=(), patch=2)),
            "sd3.5-medium": ("SD3.5 Medium", dict(h=1536, m=6144, d=64, c_in=16, c_out=64, ctx=4096, vec=2048,
                                                  depth=24, qk_norm=1, dual_layers=tuple(range(13)), patch=2)),
            "sd3.5-large": ("SD3.5 Large", dict(h=2432, m=9728, d=64, c_in=16, c_out=64, ctx=4096, vec=2048,
                                                depth=38, qk_norm=1, dual_layers=(), patch=2)),
        },
    ),
    "qwen_image": Family(
        "qwen_image", "Qwen-Image", _QWEN_TOP,
        (BlockGroup("transformer_blocks", "transformer_blocks", "depth", "B", _QWEN_BLOCK),),
        _qwen_conditions,
        {"qwen-image": ("Qwen-Image", dict(h=3072, m=12288, d=128, c_in=64, c_out=64, ctx=3584, depth=60))},
    ),
}

#: every full-size variant: name -> (family name, label, dims)
VARIANTS = {v: (fam.name, label, dims) for fam in FAMILIES.values() for v, (label, dims) in fam.variants.items()}

# Top-level modules: inputs and embedders are "IN", the output layers "OUT" (lbw's Flux ids).
_OUT_TOP = ("proj_out", "norm_out.linear")


def _value(expr: str, dims: Mapping) -> int:
    # expressions are this module's own constants ("2*h", "h+m"); names come from dims
    return int(eval(expr, {"__builtins__": {}}, {k: v for k, v in dims.items() if isinstance(v, int)}))


def _info(row: Row, dims: Mapping, root: str, block: str, i: Optional[int]) -> Optional[tuple]:
    diff, orig, out, inp, first, _ = row
    fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
    diff, orig = fmt(diff), fmt(orig)
    o = _value(out, dims)
    if inp is None:  # a norm scale: a bare 1-D parameter in the original layout
        weight = orig if orig.endswith(".scale") else orig + ".weight"
        path = orig[: -len(".scale")] if orig.endswith(".scale") else orig
        return diff, ModuleInfo("unet", diff, "norm", (o,), None, block, path if not orig.endswith(".scale") else orig,
                                root + weight, None)
    n_in = _value(inp, dims)
    kind, shape = "linear", (o, n_in)
    if diff == "pos_embed.proj":
        p = int(dims.get("patch", 2))
        kind, shape = "conv", (o, n_in, p, p)
    rows, swap = None, False
    if first == "swap":
        swap = True
    elif first is not None:
        start = _value(first, dims)
        rows = (start, start + o)
    return diff, ModuleInfo("unet", diff, kind, shape, (o,), block, orig, root + orig + ".weight",
                            root + orig + ".bias", ldm_rows=rows, ldm_swap=swap)


def table(family: str, dims: Mapping, root: str = "") -> dict:
    """``{canonical path: ModuleInfo}`` of the denoiser (component "unet") of ``family`` with
    dimensions ``dims``; original-layout weight keys carry ``root``."""
    fam = FAMILIES[family]
    out: dict = {}
    top_conds = fam.conditions(dims, None, None)
    for row in fam.top:
        if row[5] and row[5] not in top_conds:
            continue
        block = "OUT" if row[0] in _OUT_TOP else "IN"
        path, info = _info(row, dims, root, block, None)
        out[path] = info
    for rows, count in fam.extra:
        for i in range(int(dims.get(count, 0))):
            for row in rows:
                path, info = _info(row, dims, root, "IN", i)
                out[path] = info
    for group in fam.blocks:
        n = int(dims.get(group.count, 0))
        for i in range(n):
            conds = fam.conditions(dims, i, n)
            block = f"{group.tag}{i:02d}"
            for row in group.rows:
                if row[5] and row[5] not in conds:
                    continue
                path, info = _info(row, dims, root, block, i)
                path = f"{group.diffusers}.{i}.{path}"
                orig_path = info.ldm_path
                prefix = f"{group.original}.{i}."
                out[path] = ModuleInfo(
                    "unet", path, info.kind, info.weight_shape, info.bias_shape, block,
                    prefix + orig_path,
                    root + prefix + info.ldm_weight[len(root):],
                    None if info.ldm_bias is None else root + prefix + info.ldm_bias[len(root):],
                    ldm_rows=info.ldm_rows, ldm_swap=info.ldm_swap)
    return out


def variant_table(variant: str, root: str = "") -> dict:
    family, _, dims = VARIANTS[variant]
    return table(family, dims, root)
