"""What ``apply`` accepts, turned into what the engine works on.

The model (a UNet, a text encoder, a dict of them, or a pipeline) becomes components with an
index of their live modules by canonical path and a ``KeyMap`` (cached per model while its
modules stay the same); each spec form becomes (``LoraSpec``, multiplier, loaded ``Lora``),
and loaded files are shared while anything holds them.
"""
from __future__ import annotations

import os
import weakref

import torch.nn as nn

from ..errors import LoraExtError
from ..keys import KeyMap
from ..network import Lora
from ..spec import LoraSpec

COMPONENT_ALIASES = {"unet": "unet", "te1": "te1", "te2": "te2", "te": "te1", "text_encoder": "te1",
                     "text_encoder_1": "te1", "text_encoder_2": "te2", "clip_l": "te1", "clip_g": "te2",
                     "transformer": "unet", "te3": "te3", "t5": "te3", "t5xxl": "te3", "text_encoder_3": "te3"}


def components_of(model) -> dict:
    if isinstance(model, dict):
        out = {}
        for k, v in model.items():
            if v is None:
                continue
            comp = COMPONENT_ALIASES.get(str(k).lower())
            if comp is None:
                raise LoraExtError(f"unknown model component {k!r} (use unet, te1, te2, te3)")
            out[comp] = v
        return out
    if isinstance(model, nn.Module):
        cfg = getattr(model, "config", None)
        if isinstance(cfg, dict) and "block_out_channels" in cfg:
            return {"unet": model}
        if dit_table(model) is not None:  # a DiT denoiser (Flux, Chroma, SD3, Qwen-Image)
            return {"unet": model}
        if t5_table(model) is not None:  # a DiT's T5 encoder
            return {"te3": model}
        return {"te1": model}
    # a diffusers pipeline (or anything with the same attributes); a DiT pipeline's denoiser
    # is its "transformer"
    out = {}
    for attr, comp in (("unet", "unet"), ("transformer", "unet"), ("text_encoder", "te1"),
                       ("text_encoder_2", "te2"), ("text_encoder_3", "te3")):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Module):
            if comp == "te2" and t5_table(m) is not None:
                comp = "te3"  # Flux's text_encoder_2 is its T5
            out[comp] = m
    if not out:
        raise LoraExtError(f"cannot apply LoRAs to a {type(model).__name__}: pass a UNet, a text encoder, "
                           "or a dict {'unet': ..., 'te1': ..., 'te2': ...}")
    return out


def config_of(model) -> dict:
    from ..arch import model_config

    return model_config(model)


def live_index(component: str, model: nn.Module) -> dict:
    """canonical path (as in the module tables) -> live module."""
    index = {}
    for name, module in model.named_modules():
        if component != "unet":
            if name == "text_model":
                name = ""
            elif name.startswith("text_model."):
                name = name[len("text_model."):]
        index.setdefault(name, module)
        for pname, p in getattr(module, "_parameters", {}).items():  # bare parameters (Wan's scale_shift_table)
            if p is not None and pname not in ("weight", "bias"):
                from ..hostmodel import _BareParameter

                index.setdefault(f"{name}.{pname}" if name else pname, _BareParameter(module, pname))
    return index


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (fingerprint, table)
_LAST_KEYMAP: list = [None]  # (tables, KeyMap) of the last model set applied to


def _fingerprint(index: dict) -> tuple:
    """Which modules a model has (a module replaced or added changes it)."""
    return tuple((name, id(getattr(mod, "owner", mod))) for name, mod in index.items())


def dit_table(model):
    """(family, table) of a DiT denoiser in diffusers naming, or None."""
    from ..hostmodel import _dit_table

    return _dit_table(model)


def t5_table(model):
    from ..hostmodel import _t5_table

    return _t5_table(model)


def keymap_for(components: dict, index: dict) -> KeyMap:
    """KeyMap of live models, cached while the models' modules stay the same."""
    from ..arch import table_for_model

    tables = {}
    for comp, model in components.items():
        fp = (comp, _fingerprint(index[comp]))
        cached = _TABLES.get(model)
        if cached is None or cached[0] != fp:
            dit = dit_table(model) if comp == "unet" else t5_table(model) if comp == "te3" else None
            cached = (fp, dit[1] if dit is not None else table_for_model(comp, model, config_of(model)))
            _TABLES[model] = cached
        tables[comp] = cached[1]
    last = _LAST_KEYMAP[0]
    if last is not None and last[0].keys() == tables.keys() and all(last[0][c] is t for c, t in tables.items()):
        return last[1]
    km = KeyMap(tables, label="this model")
    _LAST_KEYMAP[0] = (tables, km)
    return km


# Loaded LoRAs, while anything (a handle, the caller) still holds them: a host applying the
# same files generation after generation, or a spec naming a file the caller has loaded, does
# not read it again. Keyed by path and the file's size and mtime.
_LORAS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _file_id(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_size, st.st_mtime_ns)


def cached_lora(path: str):
    fid = _file_id(path)
    return None if fid is None else _LORAS.get(fid)


def remember_lora(path: str, lora) -> None:
    fid = _file_id(path)
    if fid is not None:
        try:
            _LORAS[fid] = lora
        except TypeError:  # not weak-referenceable: just don't cache
            pass


def as_spec(item) -> tuple:
    """(LoraSpec, multiplier, preloaded Lora or None) from any accepted spec form."""
    mult = 1.0
    if isinstance(item, tuple):
        if len(item) != 2:
            raise LoraExtError(f"a LoRA given as a tuple must be (path, strength), got {item!r}")
        item, mult = item
        mult = float(mult)
    if isinstance(item, LoraSpec):
        return item, mult, None
    if isinstance(item, Lora):
        return LoraSpec(name=item.name, path=str(item.path)), mult, item
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        return LoraSpec(name=os.path.splitext(os.path.basename(path))[0], path=path), mult, None
    raise LoraExtError(f"cannot apply {item!r}: give a LoraSpec, a path, a Lora, or (one of those, strength)")


