"""What one LoRA tag asks for: the spec the parser produces and the engine consumes.

Effective strength on one module at one step (DESIGN section 4)::

    strength x component(te|unet) x block(BASE, IN00..IN11, M00, OUT00..OUT11) x keyframes(step)

``te`` and ``unet`` may themselves be keyframed (``te=0.1@1,0.6@6``). ``start``/``stop``
switch the LoRA off outside [start, stop). ``hr`` replaces ``unet`` on the hires pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class Keyframes:
    """loractl keyframes: ``w@pos`` points, piecewise linear, clamped at the ends.

    Positions are fractions of the run when the largest is <= 1, else step numbers.
    """

    points: tuple  # ((weight, position), ...) sorted by position

    def value(self, step: Optional[int], total: Optional[int]) -> float:
        """Weight at ``step`` (0-based) of ``total`` steps; the first point's weight if unknown."""
        pts = self.points
        if step is None or total is None or len(pts) == 1:
            return float(pts[0][0])
        fractional = max(p for _, p in pts) <= 1
        pos = (step / max(total - 1, 1)) if fractional else float(step)
        if pos <= pts[0][1]:
            return float(pts[0][0])
        for (w0, p0), (w1, p1) in zip(pts, pts[1:]):
            if pos <= p1:
                if p1 == p0:
                    return float(w1)
                return float(w0 + (w1 - w0) * (pos - p0) / (p1 - p0))
        return float(pts[-1][0])


Weight = Union[float, Keyframes]


def weight_at(w: Weight, step: Optional[int], total: Optional[int]) -> float:
    return w.value(step, total) if isinstance(w, Keyframes) else float(w)


@dataclass
class LoraSpec:
    """One LoRA to apply, with its strengths. ``path`` is set once the name is resolved."""

    name: str
    path: Optional[str] = None
    te: Weight = 1.0
    unet: Weight = 1.0
    blocks: Optional[dict] = None  # block id ("BASE", "IN01", "M00", "OUT11", ...) -> multiplier
    start: Optional[float] = None  # step number, or fraction of the run when < 1
    stop: Optional[float] = None
    hr: Optional[Weight] = None
    tag: str = ""  # the tag as written, for messages and infotext
    extra: dict = field(default_factory=dict)

    def is_scheduled(self) -> bool:
        """Whether the strength can change from one step to the next."""
        return (
            isinstance(self.te, Keyframes) or isinstance(self.unet, Keyframes)
            or self.start is not None or self.stop is not None
        )

    def _active(self, step, total) -> bool:
        if step is None:
            return True

        def at(v):
            return v * total if (total and 0 < v < 1) else v

        if self.start is not None and step < at(self.start):
            return False
        if self.stop is not None and step >= at(self.stop):
            return False
        return True

    def strength(self, component: str, block: str, step: Optional[int] = None,
                 total: Optional[int] = None, hires: bool = False) -> float:
        """Multiplier for a module of ``component`` ("unet", "te1", "te2") in ``block``."""
        if not self._active(step, total):
            return 0.0
        if component == "unet":
            base = weight_at(self.hr if (hires and self.hr is not None) else self.unet, step, total)
        else:
            base = weight_at(self.te, step, total)
        if self.blocks is not None and base != 0.0:
            key = "BASE" if component != "unet" else block
            base *= float(self.blocks.get(key, self.blocks.get("BASE", 1.0) if key == "BASE" else 1.0))
        return base
