"""Norm (LyCORIS ``norm``): additive change of a LayerNorm/GroupNorm affine weight and bias.

    delta = w_norm
    bias delta = b_norm
"""
from __future__ import annotations

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl

from ._common import BaseAdapter


class NormAdapter(BaseAdapter):
    type_name = "norm"
    required = frozenset({"w_norm"})
    optional = frozenset({"b_norm"})

    def __init__(self, tensors):
        super().__init__(tensors)
        w = tensors.get("w_norm")
        expect(w is not None, "norm: missing w_norm")
        b = tensors.get("b_norm")
        expect(b is None or b.numel() == w.numel(),
               f"norm: b_norm has {None if b is None else b.numel()} values, w_norm {w.numel()}")

    def scale(self):
        return 1.0  # a stored difference: an alpha key, if any, does not scale it

    def natural_shape(self):
        return tuple(int(d) for d in self.tensors["w_norm"].shape)

    def fits(self, target_shape):
        return tuple(target_shape) == self.natural_shape() or (
            len(target_shape) == 1 and target_shape[0] == self.tensors["w_norm"].numel())

    def delta(self, weight):
        self.check_weight(weight)
        return self.t("w_norm", weight).reshape(weight.shape)

    def bias_delta(self, bias, weight):
        b = self.t("b_norm", weight)
        return None if b is None else b.reshape(-1)


@hookimpl
def lora_ext_adapter_types():
    return [NormAdapter]
