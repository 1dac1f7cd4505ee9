"""Helpers shared by the built-in adapter types (not a plugin: registers nothing)."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from lora_ext.adapter import Adapter, expect, f32
from lora_ext.errors import AdapterError
from lora_ext.shapes import prod, shapes_compatible  # noqa: F401  (re-exported)

Tensor = torch.Tensor


# the shape rules live in lora_ext.shapes (torch-free, shared with the inspect fast path)


class BaseAdapter(Adapter):
    """Adapter plus what every built-in type shares: shape binding, fits(), lowrank()."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__(tensors)
        self._bound: Optional[tuple] = None

    # --- shapes ----------------------------------------------------------------------------
    def natural_shape(self) -> Optional[tuple]:
        """The weight shape the tensors imply on their own (may fold a kernel into dim 1)."""
        return None

    def weight_shape(self) -> Optional[tuple]:
        return self._bound if self._bound is not None else self.natural_shape()

    def fits(self, target_shape) -> bool:
        """Whether this adapter can change a weight of ``target_shape``."""
        ws = self.natural_shape()
        return True if ws is None else shapes_compatible(ws, target_shape)

    def bind(self, target_shape) -> "BaseAdapter":
        """Pin ``weight_shape()`` to the target's exact shape (checked with ``fits``)."""
        target_shape = tuple(int(d) for d in target_shape)
        expect(self.fits(target_shape),
               f"{self.type_name}: tensors make {self.natural_shape()}, not {target_shape}")
        self._bound = target_shape
        return self

    def check_weight(self, weight: Tensor) -> None:
        expect(self.fits(tuple(weight.shape)),
               f"{self.type_name}: tensors make {self.natural_shape()}, the weight is {tuple(weight.shape)}")

    def lowrank(self):
        """``(up, down, scale)`` with ``delta == scale * up.flatten(1) @ down.flatten(1)``, or None."""
        return None

    # --- tensors ---------------------------------------------------------------------------
    def t(self, name: str, like: Optional[Tensor] = None) -> Optional[Tensor]:
        """Tensor ``name`` as fp32 (on ``like``'s device), or None when absent."""
        v = self.tensors.get(name)
        if v is None:
            return None
        v = f32(v)
        return v if like is None else v.to(like.device)

    def describe(self) -> dict:
        d = super().describe()
        ws = self.weight_shape()
        if ws is not None:
            d["shape"] = tuple(ws)
        return d


def fit_to(delta: Tensor, weight: Tensor, what: str) -> Tensor:
    """``delta`` reshaped to ``weight``'s shape (a folded kernel or a 1x1 conv), or AdapterError."""
    if tuple(delta.shape) == tuple(weight.shape):
        return delta
    if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
        raise AdapterError(f"{what}: delta of shape {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    return delta.reshape(weight.shape)


def need(tensors: Mapping[str, Tensor], name: str, ndims, type_name: str) -> Tensor:
    t = tensors.get(name)
    expect(t is not None, f"{type_name}: missing {name}")
    expect(t.dim() in ndims, f"{type_name}: {name} has shape {tuple(t.shape)}, expected {'/'.join(map(str, ndims))}-D")
    return t


def scalar_float(t) -> Optional[float]:
    if t is None:
        return None
    expect(t.numel() == 1, f"alpha must be a scalar, got shape {tuple(t.shape)}")
    return float(t.reshape(()).float())


def tucker(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``W[p, q, ...] = sum_ij core[i, j, ...] * left[i, p] * right[j, q]``.

    The Tucker/CP rebuild LoCon (``lora_mid``), LoHa (``hada_t*``) and LoKr (``lokr_t2``) share;
    ``left`` is (rank_i, out) and ``right`` is (rank_j, in).
    """
    return torch.einsum("ij...,ip,jq->pq...", core, left, right)
