"""lora-ext as a ComfyUI custom node package (ComfyUI imports this file from custom_nodes/).

Kept import-light: it exports the node mappings and the web folder; nothing heavy is
imported until a node runs. ``install.py`` installs the package (ComfyUI-Manager runs it).
When ``lora_ext`` is not installed, the package is loaded from this folder under its own name
only: this folder never goes on ``sys.path`` (its ``tests``, ``scripts``, ``install`` ...
must not become top-level modules in ComfyUI's process).
pytest and ``pip install -e .`` never import it (it is not in the package list).
"""
import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
try:
    import lora_ext  # noqa: F401
except ImportError:
    _spec = importlib.util.spec_from_file_location(
        "lora_ext", os.path.join(_here, "lora_ext", "__init__.py"),
        submodule_search_locations=[os.path.join(_here, "lora_ext")])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["lora_ext"] = _mod
    try:
        _spec.loader.exec_module(_mod)
    except BaseException:
        sys.modules.pop("lora_ext", None)
        raise

from lora_ext.hosts.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

# the inspector's report shown on the node (ComfyUI serves this folder to its frontend)
WEB_DIRECTORY = "./hosts/comfyui/web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
