"""The base class every adapter type implements (the plugin seam for LoRA types).

An adapter is what one LoRA file holds for one module of the base model: a few tensors whose
names (normalised to kohya/LyCORIS spelling: ``lora_up.weight``, ``hada_w1_a``, ``alpha``,
``dora_scale`` ...) tell its type. The core groups a file's keys per module, asks the
registered types which one claims each group, builds the adapter from the tensors and asks it
for the module's weight change.

Strength: every type exposes its change at strength 1, ``delta(W) = W'(1) - W`` where
``W'(1)`` is exactly the weight the trainer's own forward pass uses. The core applies strength
``s`` as ``W + s * delta(W)``: exact no-op at 0, the trainer's forward at 1, linear in between
for every type, so several LoRAs on one module stack as one fp32 sum. (For weight-dependent
types, DoRA/OFT/BOFT/IA3/GLoRA, this is the interpolation ComfyUI uses; LyCORIS and PEFT curve
differently between 0 and 1; README explains the choice.)
"""
from __future__ import annotations

import math
from typing import ClassVar, Mapping, Optional

import torch

from .errors import AdapterError

Tensor = torch.Tensor

# Names any type may carry besides its own: alpha scales by alpha/rank; dora_scale turns any
# type into its DoRA variant (handled by the core around the inner adapter).
COMMON_NAMES = frozenset({"alpha", "dora_scale"})


class Adapter:
    """One adapter on one module. Subclasses live in ``lora_ext.adapters`` (one per type)."""

    #: short type name shown by ``inspect`` ("lora", "loha", "lokr", ...)
    type_name: ClassVar[str] = ""
    #: tensor names that must all be present for this type to claim a group
    required: ClassVar[frozenset] = frozenset()
    #: tensor names this type may also use
    optional: ClassVar[frozenset] = frozenset()
    #: True when delta() depends on the original weight (DoRA, OFT, BOFT, IA3, GLoRA, norm)
    weight_dependent: ClassVar[bool] = False

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.tensors = dict(tensors)

    # --- claiming -------------------------------------------------------------------------
    @classmethod
    def claims(cls, names: frozenset) -> bool:
        """Whether a group with exactly these tensor names is this type (alpha/dora_scale aside)."""
        names = frozenset(names) - COMMON_NAMES
        return bool(cls.required) and cls.required <= names <= (cls.required | cls.optional)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> "Adapter":
        """Build from a group's tensors; raises AdapterError if their shapes disagree."""
        return cls(tensors)

    def configure(self, prefix: str, metadata: Mapping[str, str]) -> None:
        """Read training settings the tensors cannot tell (called once after building).

        ``prefix`` is the group's key prefix, ``metadata`` the file's metadata. Types whose
        maths depends on how they were trained (kohya vs LyCORIS OFT, GLoRA under rs_lora)
        override this; the default needs nothing.
        """

    # --- what the core asks ---------------------------------------------------------------
    def weight_shape(self) -> Optional[tuple]:
        """Shape of the weight this adapter changes, if the tensors determine it (else None).

        The core compares it with the target module's weight before applying anything, so a
        LoRA for another base model is reported, not crashed on.
        """
        return None

    def fits(self, target_shape: tuple) -> bool:
        """Whether this adapter can change a weight of ``target_shape`` (used to bind by shape)."""
        from .keys import shape_fits

        ws = self.weight_shape()
        return True if ws is None else shape_fits(ws, target_shape)

    def delta(self, weight: Tensor) -> Tensor:
        """fp32 change of the module's weight at strength 1; ``weight`` is the pristine fp32 W."""
        raise NotImplementedError

    def bias_delta(self, bias: Optional[Tensor], weight: Tensor) -> Optional[Tensor]:
        """fp32 change of the module's bias at strength 1, or None if the type leaves it alone."""
        return None

    def rows_independent(self, shape: tuple, parts) -> bool:
        """Whether, on a weight of ``shape`` stacked from ``parts`` row slices (a count of equal
        slices, OpenCLIP's in_proj holding q, k and v; or the slices' row counts, Flux's linear1
        holding q|k|v|mlp: see :func:`part_bounds`), each slice's delta depends on that slice
        of the weight alone.

        Then an adapter trained on the fused weight applies exactly to separate q/k/v modules.
        True for every type whose delta ignores the weight; a weight-dependent type says when
        its maths keeps to rows (the default, False, refuses the split rather than guess).
        """
        return not self.weight_dependent

    @property
    def rank(self) -> Optional[int]:
        return None

    @property
    def alpha(self) -> Optional[float]:
        a = self.tensors.get("alpha")
        return None if a is None else float(a)

    #: a scale the file's own convention fixes (PEFT LoHa/LoKr: the config's alpha / r), or None
    scale_override: Optional[float] = None

    def scale(self) -> float:
        """alpha / rank, or 1 when the file has no alpha (kohya convention)."""
        if self.scale_override is not None:
            return self.scale_override
        a, r = self.alpha, self.rank
        if a is None or not r:
            return 1.0
        return a / r

    def describe(self) -> dict:
        return {"type": self.type_name, "rank": self.rank, "alpha": self.alpha}


def part_bounds(shape: tuple, parts) -> Optional[list]:
    """Row offsets where the slices after the first start, for ``parts`` (a count of equal
    slices or a tuple of row counts) of a weight of ``shape``; None when they do not tile its rows."""
    rows = int(shape[0])
    if isinstance(parts, int):
        if parts <= 0 or rows % parts:
            return None
        counts = (rows // parts,) * parts
    else:
        counts = tuple(int(c) for c in parts)
        if not counts or any(c <= 0 for c in counts) or sum(counts) != rows:
            return None
    out, at = [], 0
    for c in counts[:-1]:
        at += c
        out.append(at)
    return out


def f32(t: Tensor) -> Tensor:
    return t.detach().to(dtype=torch.float32)


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise AdapterError(message)


def numel(shape) -> int:
    return int(math.prod(shape))
