"""The plugin manager: built-in adapter modules plus third-party entry points."""
from __future__ import annotations

import functools
import importlib

import pluggy

from . import hookspecs

BUILTIN_ADAPTER_MODULES = (
    "lora", "loha", "lokr", "ia3", "oft", "boft", "peft_oft", "peft_boft", "glora", "full", "norm",
    "autodetect",
)


@functools.lru_cache(maxsize=None)
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_ADAPTER_MODULES:
        pm.register(importlib.import_module(f"lora_ext.adapters.{name}"), name=f"lora_ext.{name}")
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


def adapter_types() -> list:
    """Registered Adapter subclasses, most specific first (more required names first)."""
    types = [t for group in plugin_manager().hook.lora_ext_adapter_types() for t in group]
    return sorted(types, key=lambda t: -len(t.required))


def reset() -> None:
    """Forget the cached manager (tests registering extra plugins call this)."""
    plugin_manager.cache_clear()
