"""Mirrors comfy/weight_adapter/__init__.py (ComfyUI 0.3.64): exports WeightAdapterBase."""
from .base import WeightAdapterBase, WeightAdapterTrainBase  # noqa: F401
