"""What one LoRA tag asks for: the spec the parser produces and the engine consumes.

Effective strength on one module at one step (DESIGN section 4)::

    strength x component(te|unet) x block(BASE, IN00..IN11, M00, OUT00..OUT11) x keyframes(step)

``te`` and ``unet`` may themselves be keyframed (``te=0.1@1,0.6@6``), and so may the values of
``blocks`` (``in=0@0,1@1``). ``start``/``stop`` switch the LoRA off outside [start, stop).
On the hires pass (loractl's ``hr``/``hrte``/``hrunet``) the UNet uses ``hr_unet``, else ``hr``,
else ``unet``; the text encoders use ``hr_te``, else ``hr``, else ``te``.

Block weights (see :mod:`lora_ext.blocks`): text-encoder modules use ``blocks["CLIP"]``
(te1/te2) or ``blocks["T5"]`` (te3) when given, else ``blocks["BASE"]``; denoiser modules use
their block's id (SD ``IN04``, Flux ``D05``/``S12``/``IN``/``OUT``, SD3 ``J07``, Qwen ``B42``);
UNet modules outside the numbered blocks (block id "BASE": time embedding, ``out``) are not
block-weighted, as in sd-webui-lora-block-weight. An id missing from ``blocks`` means 1.

Weights that depend on the model or on the LoRA file are resolved once the LoRA is bound to
the model, by :meth:`LoraSpec.bind_blocks`: the coarse ``in=/mid=/out=`` form on a DiT model
(the thirds of its depth) and Inspire Pack vectors (``inspire``, positional over the blocks
the LoRA has). Whoever turns a spec into per-module strengths (the engine, ``hostmodel``,
host patchers) calls it with the LoRA's resolution and the model's key map; a spec that still
needs it raises :class:`lora_ext.blocks.BlockWeightError` from :meth:`LoraSpec.strength`
rather than giving a wrong strength.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from . import blocks as _blocks


@dataclass(frozen=True)
class Keyframes:
    """loractl keyframes: ``w@pos`` points, piecewise linear, clamped at the ends.

    Positions are fractions of the run when the largest is <= 1, else step numbers. As a
    fraction, position 0 is the first step and 1 the last (``step / (total - 1)``).
    ``points`` is normalised to a tuple of ``(weight, position)`` float pairs, stably sorted by
    position (equal positions keep their order: a jump, where the later weight holds from that
    position on, as loractl's ``np.interp``).
    """

    points: tuple  # ((weight, position), ...) sorted by position

    def __post_init__(self):
        pts = tuple((float(w), float(p)) for w, p in self.points)
        if not pts:
            raise ValueError("Keyframes needs at least one point")
        if not all(math.isfinite(w) and math.isfinite(p) for w, p in pts):
            raise ValueError(f"Keyframes points must be finite numbers: {pts}")
        object.__setattr__(self, "points", tuple(sorted(pts, key=lambda wp: wp[1])))

    @property
    def fractional(self) -> bool:
        return max(p for _, p in self.points) <= 1

    def value(self, step: Optional[int], total: Optional[int]) -> float:
        """Weight at ``step`` (0-based) of ``total`` steps; the first point's weight if unknown."""
        pts = self.points
        if step is None or len(pts) == 1:
            return float(pts[0][0])
        if self.fractional:
            if total is None:
                return float(pts[0][0])
            pos = step / max(total - 1, 1)
        else:
            pos = float(step)
        if pos < pts[0][1]:
            return float(pts[0][0])
        if pos >= pts[-1][1]:
            return float(pts[-1][0])
        # the last point at or before pos (at a jump, the later weight wins, as np.interp)
        i = max(k for k, (_, p) in enumerate(pts) if p <= pos)
        (w0, p0), (w1, p1) = pts[i], pts[i + 1]
        return float(w0 + (w1 - w0) * (pos - p0) / (p1 - p0))


Weight = Union[float, Keyframes]


def weight_at(w: Weight, step: Optional[int], total: Optional[int]) -> float:
    return w.value(step, total) if isinstance(w, Keyframes) else float(w)


@dataclass
class LoraSpec:
    """One LoRA to apply, with its strengths. ``path`` is set once the name is resolved.

    ``tag`` (the text as written) takes no part in ``==``: two specs that ask for the same
    thing are equal however they were written.
    """

    name: str
    path: Optional[str] = None
    te: Weight = 1.0
    unet: Weight = 1.0
    blocks: Optional[dict] = None  # block id ("BASE", "IN01", "M00", "OUT11", ...) -> Weight
    start: Optional[float] = None  # step number, or fraction of the run when 0 < start < 1
    stop: Optional[float] = None
    hr: Optional[Weight] = None  # both components on the hires pass (loractl's hr=)
    tag: str = field(default="", compare=False)  # the tag as written, for messages and infotext
    extra: dict = field(default_factory=dict)  # "dyn": int (A1111/SD.Next dyn_dim)
    hr_te: Optional[Weight] = None  # loractl's hrte=: text encoders on the hires pass
    hr_unet: Optional[Weight] = None  # loractl's hrunet=: UNet on the hires pass
    # ComfyUI Inspire Pack vector (BASE, then one value per block the LoRA has), resolved by
    # bind_blocks; None when not used
    inspire: Optional[tuple] = None
    # KJNodes alpha per block (block id -> the alpha it sets), resolved by bind_blocks against
    # the file's alphas and ranks; None when not used
    kj_alpha: Optional[dict] = None

    def is_scheduled(self) -> bool:
        """Whether the strength can change from one step to the next (of either pass)."""
        ws = [self.te, self.unet, self.hr, self.hr_te, self.hr_unet]
        if self.blocks:
            ws.extend(self.blocks.values())
        return (
            any(isinstance(w, Keyframes) for w in ws)
            or self.start is not None or self.stop is not None
        )

    def has_hires(self) -> bool:
        """Whether the hires pass uses other weights (``hr``, ``hr_te`` or ``hr_unet`` set)."""
        return any(w is not None for w in (self.hr, self.hr_te, self.hr_unet))

    def _active(self, step, total) -> bool:
        if step is None:
            return True

        def at(v):
            if 0 < v < 1:  # a fraction of the run; unknowable without the total
                return v * total if total else None
            return v

        start = None if self.start is None else at(self.start)
        stop = None if self.stop is None else at(self.stop)
        if start is not None and step < start:
            return False
        if stop is not None and step >= stop:
            return False
        return True

    def bind_blocks(self, resolution=None, keymap=None, *, present=None, model_blocks=None) -> "LoraSpec":
        """This spec with its block weights resolved for one LoRA file on one model.

        ``resolution``: the LoRA's ``network.Resolution`` on the model (its bindings say which
        blocks the LoRA has); ``keymap``: the model's ``keys.KeyMap`` (its "unet" table says
        which blocks the model has). ``present`` / ``model_blocks`` give those block-id sets
        directly instead. Returns ``self`` when nothing needs resolving (every SD spec on an
        SD model), else a copy whose ``blocks`` are plain per-id multipliers and ``inspire``
        None. Raises :class:`lora_ext.blocks.BlockWeightError` for block weights of another
        family (an SD vector on a Flux LoRA, a Flux vector on an SD one, ``inspire`` on SD).
        """
        if self.blocks is None and self.inspire is None and self.kj_alpha is None:
            return self
        table = (getattr(keymap, "layout", None) or {}).get("unet", {}) if keymap is not None else {}
        walked = _blocks.inspire_walked(table.values()) if table else _blocks.INSPIRE_GROUPS
        if model_blocks is None:
            model_blocks = {getattr(m, "block", None) for m in table.values()}
            model_blocks.discard(None)
        if present is None:
            present = set()
            if resolution is not None:
                present = {t.block for b in resolution.bindings for t in b.targets if t.component == "unet"}
        label = getattr(keymap, "label", None) or "this model"
        resolved = _blocks.resolve(self.blocks, self.inspire, model_blocks=model_blocks, present=present,
                                   label=label, inspire_groups=walked)
        if self.kj_alpha is not None:
            if any(_blocks.is_block_id(b) and b != "BASE" for b in model_blocks):
                raise _blocks.BlockWeightError(f"kjalpha= (KJNodes' alpha per block) works on DiT blocks; "
                                               f"{label} has SD blocks")
            mult = _blocks.kj_multipliers(self.kj_alpha, resolution.bindings if resolution is not None else (),
                                          label=self.tag or self.name)
            resolved = dict(resolved or {})
            for b, m in mult.items():
                resolved[b] = _blocks._mul(resolved.get(b, 1.0), m)
        if self.inspire is None and self.kj_alpha is None and resolved == self.blocks:
            return self
        return dataclasses.replace(self, blocks=resolved, inspire=None, kj_alpha=None)

    def strength(self, component: str, block: str, step: Optional[int] = None,
                 total: Optional[int] = None, hires: bool = False) -> float:
        """Multiplier for a module of ``component`` ("unet", "te1", "te2", "te3") in ``block``."""
        if self.inspire is not None or self.kj_alpha is not None:
            raise _blocks.BlockWeightError(
                f"{self.tag or self.name}: {'inspire=' if self.inspire is not None else 'kjalpha='} block "
                "weights need the LoRA's blocks (LoraSpec.bind_blocks) before strengths can be read")
        if not self._active(step, total):
            return 0.0
        if component == "unet":
            chain = (self.hr_unet, self.hr, self.unet) if hires else (self.unet,)
        else:
            chain = (self.hr_te, self.hr, self.te) if hires else (self.te,)
        w = next(c for c in chain if c is not None)
        base = weight_at(w, step, total)
        if self.blocks is not None and base != 0.0:
            if component != "unet":
                m = _blocks.te_weight(self.blocks, component)
            elif block == "BASE":
                m = 1.0  # UNet modules outside the numbered blocks: not block-weighted (as lbw)
            else:
                m = _blocks.block_weight(self.blocks, block)
            base *= weight_at(m, step, total)
        return base
