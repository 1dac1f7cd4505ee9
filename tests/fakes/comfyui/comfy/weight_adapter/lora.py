"""Mirrors LoRAAdapter of comfy/weight_adapter/lora.py (ComfyUI 0.3.64) for what lora-ext hands
it: ``weights = (up, down, alpha, mid, dora_scale, reshape)``; ``calculate_weight`` (L150-L211)
casts both factors to the weight's device in ``intermediate_dtype``, takes ``alpha / rank``
(``rank = down.shape[0]``; 1.0 without alpha), and adds
``function(((strength * alpha) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)).type(W.dtype))``
to the weight in place. The Tucker ``mid``, DoRA and ``reshape`` branches are not mirrored
(lora-ext computes those itself)."""
import logging

import torch

import comfy.model_management

from .base import WeightAdapterBase


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        v = self.weights
        if v[3] is not None or v[4] is not None or v[5] is not None:
            raise NotImplementedError("the fake mirrors plain LoRA factors only")
        mat1 = comfy.model_management.cast_to_device(v[0], weight.device, intermediate_dtype)
        mat2 = comfy.model_management.cast_to_device(v[1], weight.device, intermediate_dtype)
        alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
        try:
            diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
            weight += function(((strength * alpha) * diff).type(weight.dtype))
        except Exception as e:  # noqa: BLE001 - as the real one: logged, weight unchanged
            logging.error("ERROR {} {} {}".format(self.name, key, e))
        return weight
