"""Structural auto-detection for key groups no registered type claimed.

Only explains what the shapes prove, always against the target weight's shape; anything
ambiguous or unfitting gives None (the core then reports the keys, it never guesses):

- one tensor with exactly the target's shape            -> full diff (``delta = t``)
- one per-channel vector of size out (or in), not both  -> elementwise scale, LyCORIS IA3
                                                          convention (``delta = W * t``)
- two 2-D/4-D tensors ``up (out, r[,1,1])``, ``down (r, in[, k, k])`` whose product is the
  target, in exactly one order                          -> low-rank pair (alpha/rank if an
                                                          ``alpha`` is present)
- two tensors whose Kronecker product is the target, when the factor order is fixed by
  shape (LyCORIS keeps the smaller factor first, the kernel on the second) -> LoKr, scale 1

``dora_scale`` on top of any of these is applied as DoRA.
"""
from __future__ import annotations

import torch

from lora_ext.adapter import COMMON_NAMES
from lora_ext.errors import AdapterError
from lora_ext.hookspecs import hookimpl

from ._common import prod, shapes_compatible
from .dora import with_dora
from .full import FullAdapter
from .ia3 import IA3Adapter
from .lokr import LoKrAdapter
from .lora import LoRAAdapter


def _lowrank_fits(up, down, target):
    if up.dim() not in (2, 4) or down.dim() not in (2, 4):
        return False
    if prod(up.shape[2:]) != 1 or up.shape[1] != down.shape[0] or up.shape[0] != target[0]:
        return False
    r = down.shape[0]
    if r > min(target[0], prod(target[1:])):
        return False
    shape = (up.shape[0], *down.shape[1:])
    return shapes_compatible(shape, target)


def _kron_fits(w1, w2, target):
    if w1.dim() != 2 or w2.dim() not in (2, 4):
        return False
    shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    return shapes_compatible(shape, target)


def _explain(tensors, target):
    main = {k: v for k, v in tensors.items() if k not in COMMON_NAMES}
    alpha = tensors.get("alpha")
    if len(main) == 1:
        (t,) = main.values()
        if tuple(t.shape) == target:
            return FullAdapter({"diff": t})
        if len(target) >= 2 and sum(1 for d in t.shape if d != 1) == 1:
            n = t.numel()
            out, in_ = target[0], target[1]
            if (n == out) != (n == in_):
                ia3 = {"weight": t.reshape(-1), "on_input": torch.tensor(int(n == in_))}
                return IA3Adapter(ia3)
        return None
    if len(main) != 2:
        return None
    a, b = main.values()
    if a.dim() < 2 or b.dim() < 2:
        return None
    pairs = [(u, d) for u, d in ((a, b), (b, a)) if _lowrank_fits(u, d, target)]
    if len(pairs) == 1:
        up, down = pairs[0]
        group = {"lora_up.weight": up, "lora_down.weight": down}
        if alpha is not None:
            group["alpha"] = alpha
        return LoRAAdapter(group)
    if pairs:
        return None  # both orders fit: up/down cannot be told apart
    orders = [(x, y) for x, y in ((a, b), (b, a)) if _kron_fits(x, y, target)]
    if len(orders) == 2:
        # same product shape both ways: the smaller factor (both dims) is LyCORIS's w1
        (x, y) = orders[0]
        if x.shape == y.shape:
            return None
        small = [(p, q) for p, q in orders if p.shape[0] <= q.shape[0] and p.shape[1] <= q.shape[1]]
        if len(small) != 1:
            return None
        orders = small
    if len(orders) == 1:
        w1, w2 = orders[0]
        return LoKrAdapter({"lokr_w1": w1, "lokr_w2": w2})
    return None


@hookimpl
def lora_ext_explain_group(names, tensors, target_shape):
    if target_shape is None:
        return None
    target = tuple(int(d) for d in target_shape)
    try:
        adapter = _explain({k: tensors[k] for k in names if k in tensors}, target)
        if adapter is None:
            return None
        adapter.bind(target)
        if "dora_scale" in names:
            adapter = with_dora(adapter, tensors["dora_scale"])
            adapter.bind(target)
        return adapter
    except AdapterError:
        return None
