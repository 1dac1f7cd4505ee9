"""``lora-ext inspect``: what a LoRA file is, and what of it would not apply."""
from __future__ import annotations

from .detect import LABELS
from .textsafe import printable


def inspect_lora(path, base=None, *, addnet: bool = True) -> dict:
    """One JSON-ready dict describing the file (see README, "inspect"). ``base``: a checkpoint
    path (or ``inspect_any.BaseModelRef``) to bind against instead of the detected base."""
    from .inspect_any import BaseModelRef, inspect_any

    if base is not None and not isinstance(base, BaseModelRef):
        base = BaseModelRef(base)
    return inspect_any(path, base, addnet=addnet)


def _num(x: float) -> str:
    return f"{x:g}"


def _block_order(block: str):
    order = {"TE1": 0, "TE2": 1, "BASE": 2}
    if block in order:
        return (order[block], 0)
    kind = {"IN": 3, "M": 4, "OUT": 5}.get(block.rstrip("0123456789"), 6)
    digits = "".join(ch for ch in block if ch.isdigit())
    return (kind, int(digits or 0))


def render_text(info: dict, *, keys: bool = False) -> str:
    """The text report (not-applied keys grouped by reason and module; ``keys``: every key)."""
    from .inspect_any import render_any

    return render_any(info, keys=keys)


def _counts(d: dict) -> str:
    return ", ".join(f"{printable(k)}: {printable(v)}" for k, v in d.items())


__all__ = ["inspect_lora", "render_text", "LABELS"]
