"""Full (LyCORIS ``full``): the whole weight change is stored.

    delta = diff                 (reshaped to the weight when only the layout differs)
    bias delta = diff_b
"""
from __future__ import annotations

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


@hookimpl
def lora_ext_adapter_types():
    return [FullAdapter]
