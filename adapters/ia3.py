"""(IA)^3 (LyCORIS ``ia3``): a learned per-channel scale of the weight.

    W' = W * (1 + weight)    weight broadcast along the out axis, or the in axis if on_input
    delta = W * weight

``weight`` is (out,) / (in,) for a Linear and (1, C, 1, 1) for a conv in LyCORIS files; any
vector-shaped tensor is read by its size. The bias is left alone (LyCORIS's rebuild forward,
which is what nn.Linear/nn.Conv2d use; its bypass forward would also scale the bias).
"""
from __future__ import annotations

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl

from ._common import BaseAdapter


class IA3Adapter(BaseAdapter):
    type_name = "ia3"
    required = frozenset({"weight"})
    optional = frozenset({"on_input"})
    weight_dependent = True

    def __init__(self, tensors):
        super().__init__(tensors)
        w = tensors.get("weight")
        expect(w is not None, "ia3: missing weight")
        expect(sum(1 for d in w.shape if d != 1) <= 1,
               f"ia3: weight must be a per-channel vector, got shape {tuple(w.shape)}")
        oi = tensors.get("on_input")
        expect(oi is None or oi.numel() == 1, "ia3: on_input must be a scalar")
        self.on_input = bool(oi is not None and float(oi.reshape(()).float()) != 0)
        self._n = int(w.numel())

    @property
    def rank(self):
        return None

    def fits(self, target_shape):
        if len(target_shape) < 2:
            return False
        return target_shape[1 if self.on_input else 0] == self._n

    def describe(self):
        d = super().describe()
        d["on_input"] = self.on_input
        return d

    def rows_independent(self, shape, parts):
        return True  # an elementwise scaling: every row of the delta is that row of W, scaled

    def delta(self, weight):
        self.check_weight(weight)
        w = self.t("weight", weight).reshape(-1)
        shape = [1] * weight.dim()
        shape[1 if self.on_input else 0] = -1
        return weight.float() * w.reshape(shape)


@hookimpl
def lora_ext_adapter_types():
    return [IA3Adapter]
