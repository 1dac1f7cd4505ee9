"""ComfyUI shim: custom nodes (``nodes``) and what they do to ComfyUI's model patchers
(``patching``). The repository root's ``__init__.py`` exports ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS`` from here. Nothing of ComfyUI is imported until a node runs.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
