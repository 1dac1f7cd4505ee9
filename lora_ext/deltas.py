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


def splits_into_parts(adapter, stacked_shape: tuple, parts) -> bool:
    """Whether an adapter for a weight stacked from ``parts`` row slices (a count of equal
    slices, or their row counts) applies to each slice on its own (``Adapter.rows_independent``,
    and the slices tile the rows)."""
    from .adapter import part_bounds

    return part_bounds(tuple(stacked_shape), parts) is not None and adapter.rows_independent(tuple(stacked_shape), parts)


def _stacked(part: Tensor, stacked_shape: tuple, rows: tuple) -> Tensor:
    """A stand-in for the fused weight around one part: the part's rows repeated cyclically
    into every other row.

    Used only for adapters whose delta rows depend on the same rows of the weight alone
    (``Adapter.rows_independent``), so what fills the other rows cannot matter; the part's
    own values keep the stand-in finite and realistic (a zero row would make a DoRA norm 0).
    """
    n = rows[1] - rows[0]
    p = part.reshape(n, *stacked_shape[1:]) if len(stacked_shape) > 1 else part.reshape(n)
    index = (torch.arange(int(stacked_shape[0]), device=p.device) - rows[0]) % n
    return p.index_select(0, index)


def _check_parts(adapter, stacked_shape: tuple, rows: tuple) -> None:
    n = rows[1] - rows[0]
    parts = tuple(c for c in (rows[0], n, int(stacked_shape[0]) - rows[1]) if c)
    if n <= 0 or not splits_into_parts(adapter, stacked_shape, parts):
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


# --- a modulation stored with its halves the other way round ----------------------------------
def swap_halves(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` with its two halves along dim 0 exchanged (shift|scale <-> scale|shift)."""
    if t is None:
        return None
    n = t.shape[0]
    if n % 2:
        raise AdapterError(f"cannot swap the halves of {n} rows")
    return torch.cat([t[n // 2:], t[: n // 2]], 0)


class SwappedHalves:
    """An adapter trained on a modulation whose two row halves the target stores the other way
    round (diffusers ``norm_out.linear`` = scale|shift, BFL/SAI ``final_layer.adaLN_modulation.1``
    = shift|scale, see ``ModuleInfo.ldm_swap``). Its delta is the inner one's in the target's
    row order: the weight goes in swapped and the delta comes out swapped back, which is exact
    for every type (swapping rows commutes with row-wise and low-rank maths alike)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # type_name, rank, alpha, describe(), weight_dependent ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def fits(self, shape) -> bool:
        return self.inner.fits(shape)

    def delta(self, weight: Tensor) -> Tensor:
        return swap_halves(self.inner.delta(swap_halves(weight)))

    def bias_delta(self, bias, weight):
        return swap_halves(self.inner.bias_delta(swap_halves(bias), swap_halves(weight)))

    def lowrank(self):
        return self._swapped("lowrank")

    def lowrank_raw(self):
        return self._swapped("lowrank_raw")  # (rows exchanged in the file's dtype: exact)

    def _swapped(self, name: str):
        """The inner adapter's ``name()`` factors with ``up``'s row halves exchanged."""
        fn = getattr(self.inner, name, None)
        lr = fn() if fn is not None else None
        if lr is None:
            return None
        up, down, scale = lr
        return swap_halves(up), down, scale

    def rows_independent(self, shape, parts) -> bool:
        return False


class WithBiasDiff:
    """An adapter plus a stored bias change on the same module (``diff_b`` beside a LoRA's
    factors, as Kijai's and lightx2v's Wan files write them): the weight change is the inner
    adapter's, the bias change its own (if any) plus ``diff_b``."""

    def __init__(self, inner, diff_b: Tensor):
        if diff_b.dim() != 1:
            raise AdapterError(f"diff_b must be a vector, got shape {tuple(diff_b.shape)}")
        self.inner = inner
        self.diff_b = diff_b
        self.type_name = f"{inner.type_name} + diff_b"
        self.tensors = dict(inner.tensors, diff_b=diff_b)

    def __getattr__(self, name):
        if name in ("inner", "diff_b", "type_name", "tensors"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def fits(self, shape) -> bool:
        return self.inner.fits(shape) and int(shape[0]) == int(self.diff_b.numel())

    def delta(self, weight: Tensor) -> Tensor:
        return self.inner.delta(weight)

    def bias_delta(self, bias, weight):
        own = self.inner.bias_delta(bias, weight)
        ref = bias if bias is not None else weight
        db = self.diff_b.to(device=ref.device if ref is not None else "cpu", dtype=torch.float32)
        return db if own is None else own.float() + db

    def lowrank(self):
        fn = getattr(self.inner, "lowrank", None)
        return fn() if fn is not None else None

    def lowrank_raw(self):
        fn = getattr(self.inner, "lowrank_raw", None)
        return fn() if fn is not None else None

    def rows_independent(self, shape, parts) -> bool:
        return self.inner.rows_independent(shape, parts)
