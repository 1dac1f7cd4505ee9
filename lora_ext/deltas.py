"""Deltas of bound adapters, computed in fp32 from pristine weights.

Shared by ``merge`` (bake into a checkpoint) and the live apply engine. A binding's candidate
is one module or several stacked by rows (OpenCLIP's fused q/k/v): the adapter sees the
stacked pristine weight and its delta is split back per module.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .errors import AdapterError
from .keys import Target

Tensor = torch.Tensor
# read(target, "weight" | "bias") -> pristine tensor (any dtype) or None when it has no such param
Reader = Callable[[Target, str], Optional[Tensor]]


def binding_deltas(binding, read: Reader) -> dict:
    """{target: (weight delta, bias delta or None)} in fp32 at strength 1."""
    targets = binding.targets
    weights = [read(t, "weight") for t in targets]
    if any(w is None for w in weights):
        raise AdapterError("the module has no weight")
    w = torch.cat([x.detach().float() for x in weights], 0) if len(weights) > 1 else weights[0].detach().float()
    dw = binding.adapter.delta(w)
    if dw.shape != w.shape:
        if dw.numel() != w.numel():
            raise AdapterError(f"delta of shape {tuple(dw.shape)} does not fit weight {tuple(w.shape)}")
        dw = dw.reshape(w.shape)  # a Linear-shaped delta on a 1x1 conv
    biases = [read(t, "bias") for t in targets]
    b = None
    if all(x is not None for x in biases):
        b = torch.cat([x.detach().float() for x in biases], 0) if len(biases) > 1 else biases[0].detach().float()
    db = binding.adapter.bias_delta(b, w)
    if db is not None and b is None:
        raise AdapterError("the adapter changes a bias but the module has none")
    if db is not None:
        db = db.reshape(b.shape).float()
    out = {}
    row = 0
    for t, wt in zip(targets, weights):
        n = wt.shape[0]
        out[t] = (dw[row:row + n], None if db is None else db[row:row + n])
        row += n
    return out


def check_finite(t: Tensor, what: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise AdapterError(f"{what} is not finite (NaN or Inf)")
