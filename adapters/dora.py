"""DoRA on top of any adapter type (``dora_scale``): a helper the core calls, not a type.

With ``V = W + delta_inner(W)`` (the inner adapter's weight at strength 1)::

    W' = m * V / (||V|| + eps)        norm per output row, or per input column
    delta = W' - W

Which axis, by the shape of ``m`` (``dora_scale``) against the weight (out, in, ...):

- (out, 1, ...)      LyCORIS ``wd_on_out=True`` (kohya DoRA too): per output, eps = fp32 eps
- (1, in, ...)       LyCORIS ``wd_on_out=False``: per input column, eps = fp32 eps
- (out,)             PEFT ``lora_magnitude_vector`` (Linear): per output, no eps
- (1, out, 1, 1)     PEFT ``lora_magnitude_vector`` of a conv (out != in): per output, no eps

LyCORIS adds ``torch.finfo(float32).eps`` to the norm; PEFT does not (and detaches it, which
changes gradients only). When a (1, C, 1, ...) scale fits both conventions (a conv with
in == out) LyCORIS's per-input reading is used, unless the caller passes ``axis``; the core
should flatten PEFT magnitudes to 1-D when it renames them, which removes the ambiguity.
"""
from __future__ import annotations

from typing import Optional

import torch

from lora_ext.adapter import Adapter, expect, f32
from lora_ext.errors import AdapterError

from ._common import BaseAdapter, prod

EPS32 = float(torch.finfo(torch.float32).eps)


def dora_axis(scale_shape, weight_shape, axis: Optional[str] = None):
    """("out" | "in", eps) for a dora_scale of ``scale_shape`` on a weight of ``weight_shape``."""
    s, w = tuple(scale_shape), tuple(weight_shape)
    out, in_ = w[0], (w[1] if len(w) > 1 else None)
    n = prod(s)
    cands = []  # (axis, eps), the preferred reading first
    if len(s) == 1:
        if n == out:
            cands.append(("out", 0.0))  # PEFT lora_magnitude_vector of a Linear
        if n == in_:
            cands.append(("in", EPS32))
    else:
        if s[0] == out and n == out:
            cands.append(("out", EPS32))  # LyCORIS wd_on_out=True, kohya
        if s[0] == 1 and len(s) > 1 and s[1] == n:
            if n == in_:
                cands.append(("in", EPS32))  # LyCORIS wd_on_out=False
            if n == out and len(w) > 2 and ("out", EPS32) not in cands:
                cands.append(("out", 0.0))  # PEFT lora_magnitude_vector of a conv
    if axis is not None:
        cands = [c for c in cands if c[0] == axis]
        expect(cands, f"dora: dora_scale {s} cannot be per-{axis} on a weight {w}")
    expect(cands, f"dora: dora_scale of shape {s} fits neither the out nor the in axis of a weight {w}")
    return cands[0]


def decompose(v: torch.Tensor, m: torch.Tensor, axis: str, eps: float) -> torch.Tensor:
    """``m * v / (||v|| + eps)`` with the norm over every axis but ``axis``."""
    if axis == "out":
        norm = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)
        shape = (-1,) + (1,) * (v.dim() - 1)
    else:
        norm = torch.linalg.vector_norm(v.transpose(0, 1).reshape(v.shape[1], -1), dim=1)
        shape = (1, -1) + (1,) * (v.dim() - 2)
    return v * (m.reshape(shape) / (norm.reshape(shape) + eps))


class DoRAAdapter(BaseAdapter):
    """An inner adapter with weight decomposition applied on top."""

    weight_dependent = True

    def configure(self, prefix, metadata):
        self.inner.configure(prefix, metadata)

    def __init__(self, inner: Adapter, dora_scale: torch.Tensor, axis: Optional[str] = None):
        super().__init__(dict(inner.tensors, dora_scale=dora_scale))
        self.inner = inner
        self.axis_hint = axis
        self.type_name = f"{inner.type_name}+dora"
        expect(dora_scale.numel() > 0 and sum(1 for d in dora_scale.shape if d != 1) <= 1,
               f"dora: dora_scale must be a per-channel vector, got shape {tuple(dora_scale.shape)}")
        ws = inner.weight_shape()
        # raise early on a scale that fits neither axis (unless the inner shape folds a kernel)
        if ws is not None and len(ws) >= 2 and (dora_scale.dim() == 1 or dora_scale.dim() == len(ws)):
            dora_axis(dora_scale.shape, ws, axis)

    @property
    def rank(self):
        return self.inner.rank

    @property
    def alpha(self):
        return self.inner.alpha

    def scale(self):
        return self.inner.scale()

    def natural_shape(self):
        return self.inner.weight_shape()

    def fits(self, target_shape):
        inner_fits = getattr(self.inner, "fits", None)
        ok = inner_fits(target_shape) if inner_fits else (
            self.inner.weight_shape() in (None, tuple(target_shape)))
        if not ok or len(target_shape) < 2:
            return False
        try:
            dora_axis(self.tensors["dora_scale"].shape, target_shape, self.axis_hint)
        except AdapterError:
            return False
        return True

    def describe(self):
        d = dict(self.inner.describe())
        d["type"] = self.type_name
        d["dora"] = True
        return d

    def rows_independent(self, shape, parts):
        if not self.inner.rows_independent(shape, parts):
            return False
        try:
            axis, _ = dora_axis(self.tensors["dora_scale"].shape, tuple(shape), self.axis_hint)
        except AdapterError:
            return False
        return axis == "out"  # a norm per output row; per-input norms run down whole columns

    def delta(self, weight):
        self.check_weight(weight)
        w = weight.float()
        v = w + self.inner.delta(weight).reshape(w.shape)
        m = f32(self.tensors["dora_scale"]).to(w.device)
        axis, eps = dora_axis(m.shape, w.shape, self.axis_hint)
        return decompose(v, m.reshape(-1), axis, eps) - w

    def bias_delta(self, bias, weight):
        return self.inner.bias_delta(bias, weight)


def with_dora(adapter: Adapter, dora_scale: torch.Tensor, axis: Optional[str] = None) -> Adapter:
    """``adapter`` turned into its DoRA variant (``axis`` forces "out" or "in" when known)."""
    return DoRAAdapter(adapter, dora_scale, axis)
