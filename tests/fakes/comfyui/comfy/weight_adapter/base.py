"""Mirrors comfy/weight_adapter/base.py (ComfyUI 0.3.64): the weight-adapter interface that
comfy.lora.calculate_weight dispatches to (``calculate_weight(weight, key, strength,
strength_model, offset, function, intermediate_dtype, original_weight)``)."""
import torch


class WeightAdapterBase:
    name: str
    loaded_keys: set
    weights: list

    @classmethod
    def load(cls, x, lora, alpha, dora_scale):
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError


class WeightAdapterTrainBase(torch.nn.Module):
    pass
