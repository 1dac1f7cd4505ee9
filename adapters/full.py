"""Full (LyCORIS ``full``): the whole weight change is stored.

    delta = diff                 (reshaped to the weight when only the layout differs)
    bias delta = diff_b
"""
from __future__ import annotations

import torch

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl

from ._common import BaseAdapter, fit_to


class FullAdapter(BaseAdapter):
    type_name = "full"
    required = frozenset({"diff"})
    optional = frozenset({"diff_b"})

    def __init__(self, tensors):
        super().__init__(tensors)
        diff = tensors.get("diff")
        expect(diff is not None and diff.dim() >= 1, "full: missing diff")
        db = tensors.get("diff_b")
        expect(db is None or db.numel() == diff.shape[0],
               f"full: diff_b has {None if db is None else db.numel()} values for {diff.shape[0]} outputs")

    def scale(self):
        return 1.0  # a stored difference: an alpha key, if any, does not scale it

    def natural_shape(self):
        return tuple(int(d) for d in self.tensors["diff"].shape)

    def delta(self, weight):
        self.check_weight(weight)
        return fit_to(self.t("diff", weight), weight, "full")

    def bias_delta(self, bias, weight):
        db = self.t("diff_b", weight)
        return None if db is None else db.reshape(-1)


class BiasDiffAdapter(BaseAdapter):
    """A stored bias change alone (``diff_b`` without ``diff``: ComfyUI's and Kijai's Wan / Flux
    files, diffusers' ``lora_B.bias``-only exports): the weight is untouched."""

    type_name = "full (bias only)"
    required = frozenset({"diff_b"})

    def __init__(self, tensors):
        super().__init__(tensors)
        db = tensors.get("diff_b")
        expect(db is not None and db.dim() == 1, "full: diff_b must be a vector")

    def scale(self):
        return 1.0

    def weight_shape(self):
        return None

    def fits(self, target_shape) -> bool:
        return int(target_shape[0]) == int(self.tensors["diff_b"].numel())

    def delta(self, weight):
        return weight.new_zeros(weight.shape, dtype=torch.float32) if weight.is_floating_point() else \
            torch.zeros(weight.shape, dtype=torch.float32)

    def bias_delta(self, bias, weight):
        return self.t("diff_b", weight).reshape(-1)


@hookimpl
def lora_ext_adapter_types():
    return [FullAdapter, BiasDiffAdapter]
