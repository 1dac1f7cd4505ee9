"""One adapter's share of one module, and the fp32 sums the engine builds from them.

A binding (one adapter on one candidate) becomes one ``Contribution`` per target module (a
fused q/k/v candidate spans three). A contribution computes its fp32 delta at strength 1 for
its module; low-rank ones (``adapter.lowrank()``) add ``scale * up @ down`` straight into the
sum with one ``addmm``, without materialising their delta on its own.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..deltas import check_finite, target_bias_delta, target_delta
from ..errors import AdapterError

Tensor = torch.Tensor
# dtypes the file's low-rank factors are kept in as they are (widened to fp32 where used)
_STORED = (torch.float16, torch.bfloat16, torch.float32)


class Contribution:
    """The part of ``binding`` that lands on ``target`` (rows ``rows`` of a stacked candidate)."""

    __slots__ = ("key", "entry", "binding", "adapter", "target", "index", "rows", "stacked_shape",
                 "weight_dependent", "_lowrank", "name", "target_key")

    def __init__(self, entry, binding, index: int, rows: Optional[tuple], stacked_shape: tuple):
        self.entry = entry
        self.binding = binding
        self.adapter = binding.adapter
        self.target = binding.targets[index]
        self.index = index
        self.rows = rows  # (start, stop) inside the stacked weight, None for a single target
        self.stacked_shape = stacked_shape
        self.weight_dependent = bool(getattr(self.adapter, "weight_dependent", False))
        lora = entry.lora
        # Canonical identity: the n-th use of a file's group on a module is the same
        # contribution whichever spec list it comes from (set() relies on it), and sums
        # run in this order whatever order the specs were given in.
        self.key = (str(lora.path), id(lora), entry.occurrence, binding.group.prefix, index)
        self.name = entry.name
        self.target_key = (self.target.component, self.target.module)
        self._lowrank = False  # not looked up yet

    def __repr__(self):
        return f"<{self.adapter.type_name} of {self.name} on {self.target.component}:{self.target.module}>"

    # --- low-rank form ---------------------------------------------------------------------
    def lowrank_stored(self, weight_shape: tuple):
        """``(up (out, r), down (r, in*k*k), scale)`` as stored: the file's own tensors (fp16 /
        bf16 / fp32, views) where the adapter gives them (``adapter.lowrank_raw()``), else its
        fp32 ``lowrank()``; None for a dense type. Kept for the contribution's life: no fp32
        copy of an fp16 file's factors stays resident (2x the file's size, ~0.1x the patched
        bytes of an SD1.5 rank-32 LoRA); the fuse engine widens them into its block buffers."""
        shape = tuple(int(d) for d in weight_shape)
        if self._lowrank is False or self._lowrank[0] != shape:
            self._lowrank = (shape, self._lowrank_for(shape))
        return self._lowrank[1]

    def lowrank(self, weight_shape: tuple):
        """``(up (out, r), down (r, in*k*k), scale)`` fp32 (the values ``adapter.lowrank()``
        gives; a fresh widened copy when the file's factors are narrower: read-only either
        way), or None for a dense type."""
        lr = self.lowrank_stored(weight_shape)
        if lr is None:
            return None
        up, down, scale = lr
        return up.float(), down.float(), scale

    def lowrank_rank(self, weight_shape: tuple) -> Optional[int]:
        """The rank of the low-rank form (None for a dense type), without widening anything."""
        lr = self.lowrank_stored(weight_shape)
        return None if lr is None else int(lr[0].shape[1])

    def _fit(self, up, down, scale, weight_shape: tuple, convert: bool = True):
        up2 = up.reshape(up.shape[0], -1)
        down2 = down.reshape(down.shape[0], -1)
        if self.rows is not None:
            up2 = up2[self.rows[0]:self.rows[1]]
        k = 1
        for d in weight_shape[1:]:
            k *= int(d)
        if up2.shape[0] == weight_shape[0] and up2.shape[1] == down2.shape[0] and down2.shape[1] == k:
            return (up2.float(), down2.float(), float(scale)) if convert else (up2, down2, float(scale))
        return None

    def _lowrank_for(self, weight_shape: tuple):
        lr = _raw_factors(self.adapter)
        if lr is not None and all(t.dtype in _STORED for t in lr[:2]):
            up, down, scale = lr
            return self._fit(up.detach(), down.detach(), scale, weight_shape, convert=False)
        fn = getattr(self.adapter, "lowrank", None)
        lr = fn() if fn is not None else None
        if lr is None:
            return None
        up, down, scale = lr
        return self._fit(up, down, scale, weight_shape)

    # --- dense form ------------------------------------------------------------------------
    def delta(self, w32: Tensor) -> Tensor:
        """fp32 delta at strength 1 for this module, given its (pristine or estimated) fp32 weight."""
        return target_delta(self.adapter, w32, self.stacked_shape, self.rows)

    def bias_delta(self, b32: Optional[Tensor], w32: Tensor) -> Optional[Tensor]:
        return target_bias_delta(self.adapter, b32, w32, self.stacked_shape, self.rows)


def _defined_by(cls, name: str):
    return next((k for k in cls.__mro__ if name in vars(k)), None)


def _raw_factors(adapter):
    """``adapter.lowrank_raw()`` where it belongs to the ``lowrank()`` in force: a class that
    overrides ``lowrank`` (or a wrapper that reaches ``lowrank_raw`` through ``__getattr__``)
    without its own ``lowrank_raw`` gets the fp32 ``lowrank()`` path, never stale raw factors."""
    cls = type(adapter)
    raw_cls, lr_cls = _defined_by(cls, "lowrank_raw"), _defined_by(cls, "lowrank")
    if raw_cls is None or lr_cls is None or not issubclass(raw_cls, lr_cls):
        return None
    return adapter.lowrank_raw()


def delta_sum(items, w32: Tensor, *, check: bool = False) -> Tensor:
    """``sum(s * delta)`` in fp32 over ``items`` ((key, contribution, s), in the given order).

    ``w32`` is the fp32 weight the weight-dependent deltas are taken at.
    """
    acc = torch.zeros_like(w32, dtype=torch.float32)
    flat = acc.view(acc.shape[0], -1) if acc.dim() > 1 else acc.view(-1, 1)
    for _, c, s in items:
        lr = c.lowrank(tuple(w32.shape)) if w32.dim() > 1 else None
        if lr is not None:
            up, down, scale = lr
            flat.addmm_(up.to(acc.device), down.to(acc.device), alpha=float(s) * scale)
        else:
            acc.add_(c.delta(w32), alpha=float(s))
    # NaN/Inf anywhere survive the sum (a finite total is the cheap proof that every element is)
    if check and not bool(torch.isfinite(acc.sum())) and not bool(torch.isfinite(acc).all()):
        bad = [c for _, c, _ in items if not _finite_delta(c, w32)]
        what = bad[0] if bad else items[0][1]
        raise AdapterError(f"{what.name}: the delta of {what.target.component}:{what.target.module} "
                           "is not finite (NaN or Inf)")
    return acc


def _finite_delta(c, w32) -> bool:
    lr = c.lowrank(tuple(w32.shape)) if w32.dim() > 1 else None
    if lr is not None:
        return bool(torch.isfinite(lr[0]).all() and torch.isfinite(lr[1]).all())
    return bool(torch.isfinite(c.delta(w32)).all())


def bias_sum(items, b32: Optional[Tensor], w32: Tensor) -> Optional[Tensor]:
    acc = None
    for _, c, s in items:
        db = c.bias_delta(b32, w32)
        if db is None:
            continue
        check_finite(db, f"bias delta of {c.target.module}")
        acc = db * float(s) if acc is None else acc.add_(db, alpha=float(s))
    return acc


FIXED_POINT_ITERATIONS = 4


def estimate(items, wf: Tensor, d_lin: Optional[Tensor] = None) -> Tensor:
    """Estimate of the pristine weight from the fused ``wf`` and the items fused into it.

    Linear items: ``wf - D`` exactly (fp64 for an fp32 model, where the subtraction must not
    add its own rounding). Weight-dependent items (DoRA, OFT, IA3, GLoRA) depend on the very
    weight being recovered: a few fixed-point steps ``W = wf - D_lin - sum s*delta(W)``. The
    estimate only has to be close; the record stores what it gets wrong.
    """
    lin = [it for it in items if not it[1].weight_dependent]
    dep = [it for it in items if it[1].weight_dependent]
    wf32 = wf.float()
    if d_lin is None:
        d_lin = delta_sum(lin, wf32)
    if not dep:
        if wf.dtype == torch.float32:
            return wf.double() - d_lin.double()
        return wf32.sub_(d_lin)
    base = wf32 - d_lin
    est = base
    for _ in range(FIXED_POINT_ITERATIONS):
        est = base - delta_sum(dep, est)
        if not torch.isfinite(est).all():
            return base
    return est
