"""LoRA / LoCon: ``lora_up`` x ``lora_down`` (optionally with a Tucker ``lora_mid`` core).

Covers kohya LoRA/LoCon, LyCORIS LoCon (incl. ``use_tucker``), diffusers/PEFT LoRA (after the
core renamed ``lora_A``/``lora_B``), PEFT ``lora_bias`` (``lora_up.bias``) and Linear-shaped
factors on a 1x1 conv (or 4-D 1x1 factors on a Linear).

    delta = (alpha / rank) * up @ down                       rank = down.shape[0]
    delta = (alpha / rank) * mid x_0 up x_1 down             with a Tucker core (3x3 LoCon)
    bias delta = (alpha / rank) * up.bias                    PEFT lora_bias=True
"""
from __future__ import annotations

import torch

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl

from ._common import BaseAdapter, fit_to, need, prod, tucker


class LoRAAdapter(BaseAdapter):
    type_name = "lora"
    required = frozenset({"lora_up.weight", "lora_down.weight"})
    optional = frozenset({"lora_mid.weight", "lora_up.bias"})

    def __init__(self, tensors):
        super().__init__(tensors)
        up = need(tensors, "lora_up.weight", (2, 3, 4, 5), "lora")
        down = need(tensors, "lora_down.weight", (2, 3, 4, 5), "lora")
        mid = tensors.get("lora_mid.weight")
        r = down.shape[0]
        expect(up.shape[1] == r, f"lora: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} disagree on the rank")
        expect(prod(up.shape[2:]) == 1, f"lora: lora_up must be 1x1, got {tuple(up.shape)}")
        self._out = up.shape[0]
        if mid is not None:
            expect(mid.dim() >= 3 and mid.shape[0] == r and mid.shape[1] == r,
                   f"lora: lora_mid {tuple(mid.shape)} does not match rank {r}")
            expect(prod(down.shape[2:]) == 1, f"lora: with lora_mid, lora_down must be 1x1, got {tuple(down.shape)}")
            self._shape = (self._out, down.shape[1], *mid.shape[2:])
        else:
            self._shape = (self._out, *down.shape[1:])
        b = tensors.get("lora_up.bias")
        if b is not None:
            expect(b.numel() == self._out, f"lora: lora_up.bias has {b.numel()} values for {self._out} outputs")

    @property
    def rank(self):
        return int(self.tensors["lora_down.weight"].shape[0])

    def natural_shape(self):
        return tuple(int(d) for d in self._shape)

    def _down(self, like=None):
        """``lora_down`` with the Tucker core folded in: a plain (rank, in, *kernel) factor."""
        down = self.t("lora_down.weight", like)
        mid = self.t("lora_mid.weight", like)
        if mid is None:
            return down
        d2 = down.reshape(down.shape[0], down.shape[1])
        return torch.einsum("ij...,jq->iq...", mid, d2)

    def lowrank(self):
        return self.t("lora_up.weight"), self._down(), self.scale()

    def lowrank_raw(self):
        """``lowrank()``'s factors as the file stores them (not widened; None with a Tucker
        core, whose folded ``down`` is computed): the engine widens them where it uses them."""
        if self.tensors.get("lora_mid.weight") is not None:
            return None
        return self.tensors["lora_up.weight"], self.tensors["lora_down.weight"], self.scale()

    def delta(self, weight):
        self.check_weight(weight)
        up = self.t("lora_up.weight", weight)
        mid = self.t("lora_mid.weight", weight)
        down = self.t("lora_down.weight", weight)
        if mid is None:
            d = up.flatten(1) @ down.flatten(1)
        else:
            d = tucker(mid, up.flatten(1).T, down.flatten(1))
        return fit_to(d * self.scale(), weight, "lora")

    def bias_delta(self, bias, weight):
        b = self.t("lora_up.bias", weight)
        return None if b is None else b.reshape(-1) * self.scale()


@hookimpl
def lora_ext_adapter_types():
    return [LoRAAdapter]
