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


# --- one target's delta (a fused OpenCLIP in_proj spans q, k and v: one target per part) -----
def target_delta(adapter, w32: Tensor, stacked_shape: Optional[tuple] = None,
                 rows: Optional[tuple] = None) -> Tensor:
    """fp32 delta (strength 1) for one target module, given its own fp32 weight.

    ``rows``: the target's rows ``(start, stop)`` inside the fused weight of ``stacked_shape``
    the adapter was trained on; None when the adapter is for this module alone.
    """
    d = adapter.delta(w32) if rows is None else _part_delta(adapter, stacked_shape, rows, w32)
    if d.shape != w32.shape:
        if d.numel() != w32.numel():
            raise AdapterError(f"delta of shape {tuple(d.shape)} does not fit weight {tuple(w32.shape)}")
        d = d.reshape(w32.shape)
    return d.to(device=w32.device, dtype=torch.float32)


def target_bias_delta(adapter, b32: Optional[Tensor], w32: Tensor, stacked_shape: Optional[tuple] = None,
                      rows: Optional[tuple] = None) -> Optional[Tensor]:
    """fp32 bias delta (strength 1) for one target module, or None; see ``target_delta``."""
    if rows is None:
        db = adapter.bias_delta(b32, w32)
    else:
        db = _part_bias_delta(adapter, stacked_shape, rows, b32, w32)
    if db is None:
        return None
    if b32 is None:
        raise AdapterError("the adapter changes a bias but the module has none")
    return db.reshape(b32.shape).to(device=b32.device, dtype=torch.float32)


def splits_into_parts(adapter, stacked_shape: tuple, parts: int) -> bool:
    """Whether an adapter for a weight stacked from ``parts`` equal row slices applies to
    each part on its own (``Adapter.rows_independent``, and the rows divide evenly)."""
    return parts > 0 and stacked_shape[0] % parts == 0 and adapter.rows_independent(tuple(stacked_shape), parts)


def _stacked(part: Tensor, stacked_shape: tuple, rows: tuple) -> Tensor:
    """A stand-in for the fused weight around one part: the part repeated in every slot.

    Used only for adapters whose delta rows depend on the same rows of the weight alone
    (``Adapter.rows_independent``), so what fills the other slots cannot matter; the part's
    own values keep the stand-in finite and realistic (a zero row would make a DoRA norm 0).
    """
    n = rows[1] - rows[0]
    parts = stacked_shape[0] // n
    p = part.reshape(n, *stacked_shape[1:]) if len(stacked_shape) > 1 else part.reshape(n)
    return p.repeat(parts, *([1] * (p.dim() - 1)))


def _check_parts(adapter, stacked_shape: tuple, rows: tuple) -> None:
    n = rows[1] - rows[0]
    if n <= 0 or rows[0] % n or not splits_into_parts(adapter, stacked_shape, stacked_shape[0] // n):
        raise AdapterError(f"a {adapter.type_name} adapter spanning fused q/k/v mixes the parts' rows; "
                           "it cannot be applied to separate q/k/v modules")


def _part_delta(adapter, stacked_shape: tuple, rows: tuple, w32: Tensor) -> Tensor:
    if getattr(adapter, "weight_dependent", False):
        _check_parts(adapter, stacked_shape, rows)
        full = _stacked(w32.float(), stacked_shape, rows)
    else:  # the delta does not look at the weight
        full = torch.zeros(stacked_shape, dtype=torch.float32, device=w32.device)
    return adapter.delta(full).reshape(stacked_shape)[rows[0]:rows[1]]


def _part_bias_delta(adapter, stacked_shape: tuple, rows: tuple, b32: Optional[Tensor],
                     w32: Tensor) -> Optional[Tensor]:
    n = stacked_shape[0]
    if getattr(adapter, "weight_dependent", False):
        _check_parts(adapter, stacked_shape, rows)
        full_w = _stacked(w32.float(), stacked_shape, rows)
        full_b = None if b32 is None else _stacked(b32.float(), (n,), rows)
    else:
        full_w = torch.zeros(stacked_shape, dtype=torch.float32, device=w32.device)
        full_b = torch.zeros(n, dtype=torch.float32, device=w32.device)
    db = adapter.bias_delta(full_b, full_w)
    return None if db is None else db.reshape(-1)[rows[0]:rows[1]]
