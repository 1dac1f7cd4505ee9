"""Model layouts the core binds LoRAs to: the full-size SD families, or any concrete model.

A layout is ``{component: {canonical path: ModuleInfo}}``. The full-size SD1.x / SD2.x /
SDXL layouts come from the shipped tables (``arch``, ``lora_ext/tables``: no diffusers or
transformers needed, so hosts bind with neither); a live model of another size gets its own
layout from its modules (``layout_of_modules``), and a diffusers folder of another size (a
fine-tune with a changed config) from its config (``table_from_model``, which then builds the
model on ``meta`` and so needs diffusers / transformers), with the same naming rules.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

from .keys import KeyMap

#: the full-size SD families (``arch.ARCHS``; spelled here so that importing this module, and
#: ``detect``, does not import ``arch``, which imports torch)
SD_ARCHS = ("sd1", "sd2", "sdxl")


@functools.lru_cache(maxsize=None)
def arch_layout(name: str) -> dict:
    """The full-size layout of an SD family or a DiT variant (``lora_ext.dit.VARIANTS``)."""
    from . import arch

    if name in SD_ARCHS:
        return {comp: arch.module_table(name, comp) for comp in arch.components(name)}
    from . import dit
    from .dit.text import t5_table

    family = dit.VARIANTS[name][0]
    layout = {"unet": dit.variant_table(name)}
    # the text encoders LoRAs touch: CLIP-L (SD1's), SD3's CLIP-G (SDXL's second), T5-XXL
    if family in ("flux", "sd3"):
        layout["te1"] = arch.module_table("sd1", "te1")
    if family == "sd3":
        layout["te2"] = arch.module_table("sdxl", "te2")
    if family in ("flux", "chroma", "sd3"):
        layout["te3"] = t5_table()
    return layout


def label_of(name: str) -> str:
    if name in SD_ARCHS:
        return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[name]
    from .dit import family_label

    return family_label(name)


@functools.lru_cache(maxsize=None)
def arch_keymap(name: str) -> KeyMap:
    """KeyMap of a full-size SD family or DiT variant (built once per process)."""
    return KeyMap(arch_layout(name), label=label_of(name))


def family_from_unet_config(unet_config: Optional[Mapping], configs: Mapping = ()) -> str:
    """"sd1" | "sd2" | "sdxl" when the configs are exactly a full-size family, else "custom"."""
    from . import arch

    for name in SD_ARCHS:
        wanted = {comp: arch.load_config(name, comp) for comp in arch.components(name)}
        if all(_same_architecture(cfg, wanted.get(comp)) for comp, cfg in dict(configs).items()):
            if unet_config is None or _same_architecture(unet_config, wanted["unet"]):
                return name
    return "custom"


# Keys that decide module shapes; others (sample_size, prediction type, names) don't matter.
_SHAPE_KEYS = {
    "unet": ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
             "up_block_types", "transformer_layers_per_block", "in_channels", "out_channels",
             "addition_embed_type", "projection_class_embeddings_input_dim", "use_linear_projection"),
    "te": ("hidden_size", "num_hidden_layers", "intermediate_size", "projection_dim"),
}


def _same_architecture(cfg: Optional[Mapping], ref: Optional[Mapping]) -> bool:
    if cfg is None or ref is None:
        return False
    keys = _SHAPE_KEYS["unet"] if "block_out_channels" in ref else _SHAPE_KEYS["te"]
    defaults = {"transformer_layers_per_block": 1, "use_linear_projection": False, "addition_embed_type": None,
                "projection_class_embeddings_input_dim": None}
    for k in keys:
        a, b = cfg.get(k, defaults.get(k)), ref.get(k, defaults.get(k))
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if k == "transformer_layers_per_block" and not isinstance(a, tuple) and isinstance(b, tuple):
            a = (a,) * len(b)
        if k == "transformer_layers_per_block" and not isinstance(b, tuple) and isinstance(a, tuple):
            b = (b,) * len(a)
        if a != b:
            return False
    return True


def table_from_model(component: str, config: Mapping, family: str = "custom") -> dict:
    """Module table for one component described by its diffusers/transformers config.

    A full-size SD family is shipped data; any other config needs diffusers (UNet) or
    transformers (text encoders): ``arch.MissingDependencyError`` names the one missing."""
    from . import arch

    if family in SD_ARCHS and component in arch.components(family):
        return arch.module_table(family, component)
    return arch.table_for_config(component, dict(config))


def layout_of_modules(models: Mapping[str, object]) -> dict:
    """Layout of live models: {"unet": UNet2DConditionModel, "te1": CLIPTextModel, ...}."""
    from . import arch

    return {comp: arch.table_for_model(comp, model) for comp, model in models.items()}
