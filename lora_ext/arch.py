"""Module tables of the base architectures (SD1.x, SD2.x, SDXL) in both naming layouts.

A LoRA names the module it patches in one of two layouts:

* **diffusers / transformers** (``down_blocks.0.attentions.0.proj_in``,
  ``encoder.layers.3.self_attn.q_proj``), which is what kohya and PEFT files use;
* **ldm / compvis** (``input_blocks.1.1.proj_in``, ``transformer.resblocks.3.attn``), which is
  what A1111 single-file checkpoints and compvis-style LoRA files use.

This module lists, for every weight-bearing module of every component, both names, its
shapes and its lbw block id, so the rest of the core can go from any LoRA key to a module and
from a module to its weight in either kind of checkpoint. No weights are ever needed: the
full-size SD1.x / SD2.x / SDXL tables come from shipped data (``lora_ext/tables``, the
weight-bearing modules of each component in ``named_modules()`` order, generated from the
shipped configs by ``python -m lora_ext.tables.generate`` with diffusers/transformers models
built on the ``meta`` device), so hosts need neither diffusers nor transformers. Models of
other sizes get their tables from live modules (``table_for_model``) or, with diffusers /
transformers installed, from a config (``table_for_config``).

Conventions
-----------
``ModuleInfo.path``
    Canonical path. UNet: diffusers ``UNet2DConditionModel`` naming. Text encoders:
    transformers CLIP naming *without* the ``text_model.`` level (transformers 5 dropped it
    from ``CLIPTextModel`` but ``CLIPTextModelWithProjection`` still has it, so neither form
    can be relied upon; the short one is the common denominator).
``ModuleInfo.ldm_path``
    The path of the *module* that owns the weight inside the ldm component, relative to
    ``ldm_root(arch, component)``, as ``named_modules()`` of the ldm model would print it.
    So ``ldm_root + ldm_path + ".weight" == ldm_weight`` for ordinary modules. Three
    OpenCLIP cases do not follow that pattern and are the reason ``ldm_weight`` /
    ``ldm_bias`` are the authoritative keys:

    * q/k/v projections live fused in ``nn.MultiheadAttention``: ``ldm_path`` is that module
      (``transformer.resblocks.N.attn``), the keys are ``...attn.in_proj_weight`` /
      ``in_proj_bias``, and ``ldm_rows`` says which rows belong to this projection;
    * ``positional_embedding`` and ``text_projection`` are bare parameters on the root
      module: ``ldm_path`` is the parameter's own name and ``ldm_weight`` has no ``.weight``
      suffix. ``text_projection`` is also stored transposed (``x @ P`` rather than
      ``x @ W.T``), flagged by ``ldm_transposed``.
``ModuleInfo.block``
    The sd-webui-lora-block-weight id (compvis numbering): modules inside ldm
    ``input_blocks.N`` are ``IN%02d`` (so ``conv_in``, which is ``input_blocks.0.0``, is
    ``IN00``), ``middle_block`` is ``M00``, ``output_blocks.N`` is ``OUT%02d``; everything
    else in the UNet (time/label embeddings, ``out``) and every text-encoder module is
    ``BASE``.
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

from .errors import LoraExtError

__all__ = [
    "ARCHS",
    "ModuleInfo",
    "components",
    "load_config",
    "build_meta",
    "ldm_root",
    "te_layout",
    "module_table",
    "table_for_model",
    "module_entries",
    "MissingDependencyError",
    "model_config",
    "table_for_config",
    "ldm_index",
    "ldm_to_diffusers",
    "diffusers_to_ldm",
]

ARCHS = ("sd1", "sd2", "sdxl")

_COMPONENTS = {
    "sd1": ("unet", "te1"),
    "sd2": ("unet", "te1"),
    "sdxl": ("unet", "te1", "te2"),
}

# Where each component lives in an A1111 / ldm single-file checkpoint.
_LDM_ROOTS = {
    ("sd1", "unet"): "model.diffusion_model.",
    ("sd1", "te1"): "cond_stage_model.transformer.text_model.",
    ("sd2", "unet"): "model.diffusion_model.",
    ("sd2", "te1"): "cond_stage_model.model.",
    ("sdxl", "unet"): "model.diffusion_model.",
    ("sdxl", "te1"): "conditioner.embedders.0.transformer.text_model.",
    ("sdxl", "te2"): "conditioner.embedders.1.model.",
}

# SD1's CLIP-L (and SDXL's te1) is stored with transformers names in ldm checkpoints too;
# SD2's and SDXL te2's text encoders are OpenCLIP modules with their own names.
_TE_LAYOUT = {
    ("sd1", "te1"): "hf",
    ("sd2", "te1"): "openclip",
    ("sdxl", "te1"): "hf",
    ("sdxl", "te2"): "openclip",
}

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _check(arch: str, component: str | None = None) -> None:
    if arch not in _COMPONENTS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if component is not None and component not in _COMPONENTS[arch]:
        raise ValueError(
            f"{arch} has no component {component!r}; it has {', '.join(_COMPONENTS[arch])}"
        )


def components(arch: str) -> tuple[str, ...]:
    """The components of ``arch`` that LoRAs patch: ("unet", "te1"[, "te2"])."""
    _check(arch)
    return _COMPONENTS[arch]


def ldm_root(arch: str, component: str) -> str:
    """Key prefix of ``component`` in an A1111 / ldm single-file checkpoint (ends with '.')."""
    _check(arch, component)
    return _LDM_ROOTS[(arch, component)]


def te_layout(arch: str, component: str) -> str | None:
    """How a text encoder is named in ldm checkpoints: "hf", "openclip"; None for the UNet."""
    _check(arch, component)
    return _TE_LAYOUT.get((arch, component))


# --------------------------------------------------------------------------------------------
# configs and meta models


@functools.lru_cache(maxsize=None)
def _read_config(arch: str, component: str) -> dict:
    with open(os.path.join(_CONFIG_DIR, f"{arch}_{component}.json"), encoding="utf-8") as f:
        return json.load(f)


def load_config(arch: str, component: str) -> dict:
    """The shipped config: a diffusers UNet2DConditionModel config or a CLIPTextConfig dict.

    Returns a fresh copy each time, so callers may edit it (e.g. in_channels=9 for inpainting).
    """
    _check(arch, component)
    return copy.deepcopy(_read_config(arch, component))


class MissingDependencyError(LoraExtError, ImportError):
    """An optional model library (diffusers, transformers) is needed here but cannot be imported."""


def _import_from(package: str, names: tuple[str, ...], what: str):
    """``names`` from ``package``, or a :class:`MissingDependencyError` naming the package.

    diffusers / transformers are optional: hosts run on the shipped tables. Anything the import
    raises counts as "cannot be imported" (a diffusers too new for the host's huggingface_hub
    fails with ImportError or, through its lazy modules, RuntimeError).
    """
    try:
        module = importlib.import_module(package)
        return tuple(getattr(module, n) for n in names)
    except Exception as e:  # noqa: BLE001 - re-raised with the package named
        raise MissingDependencyError(
            f"{what} needs the {package!r} package, which cannot be imported here ({type(e).__name__}: {e}); "
            f"install it (`pip install \"lora-ext[full]\"`) in an environment where it works. "
            f"Binding LoRAs to SD1.x/SD2.x/SDXL models in a host does not need it."
        ) from e


def _meta_model(component: str, config: Mapping, with_projection: bool, what: str) -> torch.nn.Module:
    """A diffusers UNet / transformers CLIP text model built from ``config`` (call under a device)."""
    if component == "unet":
        (unet_cls,) = _import_from("diffusers", ("UNet2DConditionModel",), what)
        return unet_cls.from_config(dict(config))
    config_cls, model_cls, proj_cls = _import_from(
        "transformers", ("CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection"), what)
    return (proj_cls if with_projection else model_cls)(config_cls(**config))


def build_meta(arch: str, component: str) -> torch.nn.Module:
    """The component built from its shipped config on the ``meta`` device (no memory, ~0.1 s).

    Needs diffusers (UNet) / transformers (text encoders); raises :class:`MissingDependencyError`
    naming the package when it cannot be imported. Not cached: callers may wrap or alter the
    modules. ``module_table`` does not use it (shipped data).
    """
    import torch
    _check(arch, component)
    config = load_config(arch, component)
    with torch.device("meta"):
        return _meta_model(component, config, (arch, component) == ("sdxl", "te2"),
                           f"building the {arch} {component} model")


# --------------------------------------------------------------------------------------------
# module table


@dataclass(frozen=True)
class ModuleInfo:
    """One weight-bearing module, with its names in both layouts. See the module docstring."""

    component: str
    path: str
    kind: str  # "linear" | "conv" | "norm" | "embedding"
    weight_shape: tuple
    bias_shape: tuple | None
    block: str
    ldm_path: str | None
    ldm_weight: str | None
    ldm_bias: str | None
    ldm_rows: tuple[int, int] | None = None
    ldm_transposed: bool = False
    # DiT families: the original layout stores this modulation's two row halves in the other
    # order (diffusers ``norm_out.linear`` vs BFL/SAI ``final_layer.adaLN_modulation.1``)
    ldm_swap: bool = False
    # DiT families whose original layout has a second spelling (HunyuanVideo: ComfyUI renames
    # Tencent's ``img_attn_qkv`` / ``mlp.fc1`` to Flux-style ``img_attn.qkv`` / ``mlp.0`` on
    # load): the other original name of the same module, which LoRAs and files also use
    ldm_alias: str | None = None


KINDS = ("linear", "conv", "norm", "embedding")


def _kind(module: torch.nn.Module) -> str:
    import torch
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return "conv"
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        return "norm"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    # A new module type in a future diffusers/transformers: fail loudly rather than
    # mis-describe it, since the adapters pick their maths by kind.
    raise TypeError(f"unsupported weight-bearing module type {type(module).__name__}")


def _strip_text_model(path: str) -> str:
    if path == "text_model":
        return ""
    return path[len("text_model."):] if path.startswith("text_model.") else path


# ---- UNet: diffusers -> ldm


# Inside a ResnetBlock2D the two layouts differ; inside a Transformer2DModel / SpatialTransformer
# they agree, so attentions only need their prefix mapped.
_RESNET_INNER = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Modules outside the blocks: complete paths, not prefixes.
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _unet_prefix_map(config: Mapping) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix -> (ldm prefix, is_resnet), derived from the UNet config.

    The ldm UNet is a flat sequence: ``input_blocks`` gets one entry per down resnet (with its
    attention, if any, as sub-module 1) and one per downsampler; ``output_blocks`` one per up
    resnet (layers_per_block + 1 of them per up block), the upsampler riding along in the last
    one. Counting through the config gives the numbering for any depth, rather than a list
    written for one model.
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = _per_block(config["layers_per_block"], len(down_types))
    up_layers = list(reversed(layers))
    out: dict[str, tuple[str, bool]] = {}

    idx = 1  # input_blocks.0 is conv_in
    for i, btype in enumerate(down_types):
        has_attn = "Attn" in btype
        for j in range(layers[i]):
            out[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{idx}.0", True)
            if has_attn:
                out[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{idx}.1", False)
            idx += 1
        if i < len(down_types) - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{idx}.0.op", False)
            idx += 1

    out["mid_block.resnets.0"] = ("middle_block.0", True)
    out["mid_block.attentions.0"] = ("middle_block.1", False)
    out["mid_block.resnets.1"] = ("middle_block.2", True)

    idx = 0
    for i, btype in enumerate(up_types):
        has_attn = "Attn" in btype
        n = up_layers[i] + 1
        for j in range(n):
            out[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{idx + j}.0", True)
            if has_attn:
                out[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{idx + j}.1", False)
        if i < len(up_types) - 1:
            sub = 2 if has_attn else 1
            out[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{idx + n - 1}.{sub}.conv", False)
        idx += n

    for k, v in _UNET_TOP.items():
        out[k] = (v, False)
    return out


def _unet_ldm_path(path: str, prefixes: Mapping[str, tuple[str, bool]]) -> str | None:
    # Try the whole path, then ever shorter prefixes: the longest mapped prefix wins.
    head, tail = path, ""
    while True:
        hit = prefixes.get(head)
        if hit is not None:
            ldm_prefix, is_resnet = hit
            if not tail:
                return ldm_prefix
            if is_resnet:
                inner = _RESNET_INNER.get(tail)
                return None if inner is None else f"{ldm_prefix}.{inner}"
            return f"{ldm_prefix}.{tail}"
        if "." not in head:
            return None
        head, last = head.rsplit(".", 1)
        tail = f"{last}.{tail}" if tail else last


_BLOCK_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")


def _block_id(ldm_path: str | None) -> str:
    if ldm_path is None:
        return "BASE"
    if ldm_path.startswith("middle_block."):
        return "M00"
    m = _BLOCK_RE.match(ldm_path)
    if m is None:
        return "BASE"
    return ("IN%02d" if m.group(1) == "input_blocks" else "OUT%02d") % int(m.group(2))


# ---- text encoders: HF -> OpenCLIP

# Per-layer renames inside encoder.layers.N -> transformer.resblocks.N (q/k/v handled apart).
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _openclip_entry(path: str, weight_shape: tuple, root: str) -> dict | None:
    """ldm fields for one HF CLIP module in an OpenCLIP checkpoint, or None if it has none."""
    if path == "embeddings.token_embedding":
        return _plain("token_embedding", root)
    if path == "embeddings.position_embedding":
        # A bare nn.Parameter on the OpenCLIP root, same (77, width) shape as the Embedding.
        return dict(ldm_path="positional_embedding", ldm_weight=root + "positional_embedding", ldm_bias=None)
    if path == "final_layer_norm":
        return _plain("ln_final", root)
    if path == "text_projection":
        # Bare parameter used as x @ P: the HF Linear weight is its transpose.
        return dict(
            ldm_path="text_projection", ldm_weight=root + "text_projection", ldm_bias=None, ldm_transposed=True
        )
    m = _LAYER_RE.match(path)
    if m is None:
        return None
    layer, inner = m.group(1), m.group(2)
    base = f"transformer.resblocks.{layer}"
    if inner.startswith("self_attn.") and inner[len("self_attn."):] in _QKV:
        # nn.MultiheadAttention keeps q, k, v stacked along the output rows.
        n = weight_shape[0]
        k = _QKV.index(inner[len("self_attn."):])
        return dict(
            ldm_path=f"{base}.attn",
            ldm_weight=f"{root}{base}.attn.in_proj_weight",
            ldm_bias=f"{root}{base}.attn.in_proj_bias",
            ldm_rows=(k * n, (k + 1) * n),
        )
    renamed = _OPENCLIP_LAYER.get(inner)
    return None if renamed is None else _plain(f"{base}.{renamed}", root)


def _plain(ldm_path: str, root: str) -> dict:
    return dict(ldm_path=ldm_path, ldm_weight=f"{root}{ldm_path}.weight", ldm_bias=f"{root}{ldm_path}.bias")


@functools.lru_cache(maxsize=None)
def _table(arch: str, component: str) -> Mapping[str, ModuleInfo]:
    # shipped data (lora_ext/tables): no diffusers / transformers needed
    from . import tables

    config = load_config(arch, component)
    return _build_table(
        component, tables.entries(arch, component, config), config,
        ldm_root(arch, component), te_layout(arch, component),
    )


# Where a model of another size (a custom config, a live model) would sit in an ldm file:
# SD1's roots and naming, the layout compvis-style LoRAs for such models assume.
_CUSTOM_ROOTS = {"unet": "model.diffusion_model.", "te1": "cond_stage_model.transformer.text_model.",
                 "te2": "conditioner.embedders.1.model."}
_OPENCLIP_ROOTS = {"te1": "cond_stage_model.model.", "te2": "conditioner.embedders.1.model."}


def model_config(model) -> dict:
    """A model's config as a plain dict: diffusers' FrozenDict or transformers' PretrainedConfig."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # transformers: a PretrainedConfig is not a mapping
        return cfg.to_dict()
    return dict(cfg)


def table_for_model(component: str, model: torch.nn.Module, config: Mapping | None = None) -> dict[str, ModuleInfo]:
    """Module table of a concrete model (any size), with the same naming rules as the archs."""
    if component not in _CUSTOM_ROOTS:
        raise ValueError(f"unknown component {component!r}")
    if config is None:
        config = model_config(model)
    layout, root = (None if component == "unet" else "hf"), _CUSTOM_ROOTS[component]
    if component != "unet" and config.get("hidden_act") == "gelu":
        # converted from OpenCLIP (SD2's ViT-H, SDXL's bigG; OpenAI's CLIP uses quick_gelu):
        # LoRAs may name its modules the OpenCLIP way, q/k/v fused in one in_proj
        layout, root = "openclip", _OPENCLIP_ROOTS[component]
    return dict(_build_table(component, model, config, root, layout))


def table_for_config(component: str, config: Mapping) -> dict[str, ModuleInfo]:
    """Module table of a component described by a diffusers / transformers config dict.

    Builds the model on ``meta``, so it needs diffusers (UNet) / transformers (text encoders):
    :class:`MissingDependencyError` when they cannot be imported. The full-size SD families need
    neither (``module_table``).
    """
    import torch
    config = dict(config)
    if component == "unet":
        fields, with_projection = config, False
    else:
        fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype", "dtype")}
        with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
    with torch.device("meta"):
        model = _meta_model(component, fields, with_projection, f"a {component} module table from a config")
    return table_for_model(component, model, config)


def module_entries(model: torch.nn.Module) -> Iterator[tuple[str, str, tuple, tuple | None]]:
    """``(name, kind, weight shape, bias shape or None)`` of every module of ``model`` that has a
    weight, in ``named_modules()`` order: what :func:`_build_table` reads (the shipped tables
    are these entries, stored)."""
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue  # containers, activations, dropout, norms without affine
        bias = module._parameters.get("bias")
        yield name, _kind(module), tuple(weight.shape), None if bias is None else tuple(bias.shape)


def _build_table(component, entries, config, root, layout) -> Mapping[str, ModuleInfo]:
    """The table of one component from ``entries`` (``(name, kind, weight shape, bias shape)``,
    see :func:`module_entries`; a module is read through it)."""
    import torch
    if isinstance(entries, torch.nn.Module):
        entries = module_entries(entries)
    prefixes = _unet_prefix_map(config) if component == "unet" else None

    table: dict[str, ModuleInfo] = {}
    for name, kind, weight_shape, bias_shape in entries:
        if kind not in KINDS:
            raise ValueError(f"{name}: unknown module kind {kind!r}")
        path = _strip_text_model(name) if component != "unet" else name
        weight_shape = tuple(weight_shape)
        bias_shape = None if bias_shape is None else tuple(bias_shape)

        if component == "unet":
            ldm_path = _unet_ldm_path(path, prefixes)
            fields = {} if ldm_path is None else _plain(ldm_path, root)
            block = _block_id(ldm_path)
        elif layout == "hf":
            fields = _plain(path, root)
            block = "BASE"
        else:
            fields = _openclip_entry(path, weight_shape, root) or {}
            block = "BASE"
        if not fields:
            fields = dict(ldm_path=None, ldm_weight=None, ldm_bias=None)
        if bias_shape is None:
            fields["ldm_bias"] = None  # the ldm twin has no bias either

        table[path] = ModuleInfo(
            component=component,
            path=path,
            kind=kind,
            weight_shape=weight_shape,
            bias_shape=bias_shape,
            block=block,
            **fields,
        )
    return table


def module_table(arch: str, component: str) -> dict[str, ModuleInfo]:
    """Every module of ``component`` that has a weight, keyed by canonical path (cached)."""
    _check(arch, component)
    return dict(_table(arch, component))


@functools.lru_cache(maxsize=None)
def _ldm_index(arch: str, component: str) -> Mapping[str, tuple[ModuleInfo, ...]]:
    index: dict[str, list[ModuleInfo]] = {}
    for info in _table(arch, component).values():
        if info.ldm_path is not None:
            index.setdefault(info.ldm_path, []).append(info)
    # transformers registers k_proj before q_proj; fused entries are promised in row order.
    return {k: tuple(sorted(v, key=lambda i: i.ldm_rows or (0, 0))) for k, v in index.items()}


def ldm_index(arch: str, component: str) -> dict[str, tuple[ModuleInfo, ...]]:
    """ldm module path -> the modules it holds (three for a fused OpenCLIP ``attn``, in q, k, v order).

    For resolving compvis-style LoRA names (``lora_unet_input_blocks_4_1_proj_in``).
    """
    _check(arch, component)
    return dict(_ldm_index(arch, component))


# --------------------------------------------------------------------------------------------
# whole-checkpoint conversion


@dataclass(frozen=True)
class _Slot:
    component: str
    key: str  # diffusers key, without text_model.
    rows: tuple[int, int] | None
    transposed: bool


@functools.lru_cache(maxsize=None)
def _ldm_key_index(arch: str) -> Mapping[str, tuple[_Slot, ...]]:
    """Full ldm key -> the diffusers tensors it feeds (three for a fused in_proj)."""
    index: dict[str, list[_Slot]] = {}
    for component in components(arch):
        for info in _table(arch, component).values():
            if info.ldm_weight is not None:
                index.setdefault(info.ldm_weight, []).append(
                    _Slot(component, info.path + ".weight", info.ldm_rows, info.ldm_transposed)
                )
            if info.ldm_bias is not None:
                index.setdefault(info.ldm_bias, []).append(_Slot(component, info.path + ".bias", info.ldm_rows, False))
    return {k: tuple(v) for k, v in index.items()}


def _ldm_aliases(arch: str) -> list[tuple[str, str]]:
    """(old prefix, current prefix) pairs for HF-layout text encoders.

    Checkpoints saved with transformers < 4.x-era CLIPTextModel lack the ``text_model.`` level
    (``cond_stage_model.transformer.encoder...``); A1111 renames them on load and so do we.
    """
    out = []
    for component in components(arch):
        root = ldm_root(arch, component)
        if te_layout(arch, component) == "hf" and root.endswith("text_model."):
            out.append((root[: -len("text_model.")], root))
    return out


def _fused_part(tensor: torch.Tensor, rows: tuple[int, int], key: str) -> torch.Tensor:
    """One of q, k, v from a fused in_proj tensor, as a copy.

    Split by thirds of the tensor actually given rather than the table's rows, so a model of
    another width still splits correctly; cloned so the parts can be saved (safetensors
    refuses shared storage) or edited without touching the fused original.
    """
    if tensor.ndim == 0 or tensor.shape[0] % len(_QKV):
        raise ValueError(f"{key!r}: fused q/k/v tensor of shape {tuple(tensor.shape)} has no 3 equal row blocks")
    n = tensor.shape[0] // len(_QKV)
    part = rows[0] // (rows[1] - rows[0])
    return tensor[part * n : (part + 1) * n].clone()


def ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], arch: str
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Split an A1111 / ldm single-file state dict into diffusers-named component dicts.

    Returns ``({component: {key: tensor}}, leftovers)``: every component of ``arch`` is present
    (possibly empty); keys are ``<canonical path>.weight|.bias`` (text encoders without
    ``text_model.``). Fused OpenCLIP q/k/v are split into thirds (as clones);
    ``text_projection`` is transposed. ``leftovers`` lists, in input order, every input key that has no diffusers
    counterpart (VAE, SD2's 24th resblock, position_ids, logit_scale, EMA copies, ...).
    Shapes are not checked, so variants such as 9-channel inpainting UNets convert too.
    """
    import torch
    index = _ldm_key_index(arch)
    aliases = _ldm_aliases(arch)
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in components(arch)}
    leftovers: list[str] = []
    for key, tensor in state_dict.items():
        slots = index.get(key)
        if slots is None:
            for old, new in aliases:
                if key.startswith(old) and not key.startswith(new):
                    slots = index.get(new + key[len(old):])
                    break
        if slots is None or any(s.key in out[s.component] for s in slots):
            # No counterpart, or a second copy (old and new alias both present): keep it visible.
            leftovers.append(key)
            continue
        for s in slots:
            value = tensor
            if s.rows is not None:
                value = _fused_part(tensor, s.rows, key)
            if s.transposed:
                value = value.t().contiguous()
            out[s.component][s.key] = value
    return out, leftovers


def diffusers_to_ldm(components: Mapping[str, Mapping[str, torch.Tensor]], arch: str) -> dict[str, torch.Tensor]:
    """Join diffusers-named component state dicts into one A1111 / ldm single-file state dict.

    ``components`` maps "unet" / "te1" / "te2" to state dicts; text-encoder keys may carry a
    leading ``text_model.`` or not. q/k/v are concatenated into OpenCLIP ``in_proj`` (all three
    must be present) and ``text_projection`` is transposed. A key with no ldm counterpart is
    passed through under ``ldm_root(arch, component) + key`` rather than dropped.
    """
    import torch
    _check(arch)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}  # ldm key -> start -> (stop, tensor)

    def put(key: str, value: torch.Tensor, source: str) -> None:
        if key in out:
            raise ValueError(f"{arch}: two tensors map to ldm key {key!r} (second from {source!r})")
        out[key] = value

    for component, state_dict in components.items():
        _check(arch, component)
        table = _table(arch, component)
        root = ldm_root(arch, component)
        for key, value in state_dict.items():
            if component != "unet":
                key = _strip_text_model(key)
            module, _, param = key.rpartition(".")
            info = table.get(module) if param in ("weight", "bias") else None
            ldm_key = None
            if info is not None:
                ldm_key = info.ldm_weight if param == "weight" else info.ldm_bias
            if ldm_key is None:
                put(root + key, value, f"{component}:{key}")
            elif info.ldm_rows is not None:
                start, stop = info.ldm_rows
                fused.setdefault(ldm_key, {})[start] = (stop, value)
            elif info.ldm_transposed:
                put(ldm_key, value.t().contiguous(), f"{component}:{key}")
            else:
                put(ldm_key, value, f"{component}:{key}")

    for ldm_key, pieces in fused.items():
        # q, k, v must tile the fused rows exactly; a partial set would silently shrink the
        # attention, so refuse it.
        parts, at = [], 0
        while at in pieces:
            stop, value = pieces[at]
            parts.append(value)
            at = stop
        if len(parts) != len(_QKV) or len(parts) != len(pieces):
            raise ValueError(f"{arch}: {ldm_key!r} needs q, k and v projections; got {len(pieces)} of 3")
        put(ldm_key, torch.cat(parts, dim=0), ldm_key)
    return out
