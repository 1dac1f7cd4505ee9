"""lora-ext as a ComfyUI custom node package (ComfyUI imports this file from custom_nodes/).

Kept import-light: it only makes ``lora_ext`` importable (from this folder when it is not
installed) and exports the node mappings; nothing heavy is imported until a node runs.
pytest and ``pip install -e .`` never import it (it is not in the package list).
"""
import os
import sys

try:
    import lora_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lora_ext.hosts.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
