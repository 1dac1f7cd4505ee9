"""Mirrors comfy/weight_adapter/__init__.py (ComfyUI 0.3.64): exports WeightAdapterBase and LoRAAdapter."""
from .base import WeightAdapterBase, WeightAdapterTrainBase  # noqa: F401
from .lora import LoRAAdapter  # noqa: F401
