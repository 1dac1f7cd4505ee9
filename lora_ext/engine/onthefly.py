"""On-the-fly application: a forward hook adds the adapters' contribution, weights untouched.

One hook per module, whatever the number of live adapters on it:

* low-rank types (``adapter.lowrank()``): ``out += up(down(x) * s * scale)``; on a conv,
  ``down`` is a conv with the module's own kernel, stride, padding, dilation (and padding
  mode) and ``up`` a 1x1 conv, so LoCon 3x3 is exact;
* every other type: its delta is materialised once from the *pristine* weight (so DoRA, OFT,
  IA3, GLoRA see ``W0`` even when other LoRAs are fused into the module), cached, and the
  strength-weighted sum of those deltas is rebuilt only when a strength changes;
  ``out += linear/conv(x, sum)``;
* bias changes are added to the output; norms (LayerNorm/GroupNorm adapters) and embeddings
  are recomputed functionally with ``W + sum``.

The hook also counts the rows it saw (tokens x batch) per call, which is what the auto rule
needs to price on-the-fly against re-fusing.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..deltas import check_finite

Tensor = torch.Tensor

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def module_kind(module: nn.Module) -> str:
    if not isinstance(module, nn.Module):  # a view of part of a module (hostmodel.InputSlice)
        module = getattr(module, "owner", module)
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "other"


_PLAIN = (torch.Tensor, nn.Parameter)


def is_quantised(w) -> bool:
    """A weight whose stored values are not the layer's weight (integer or packed storage, or a
    tensor subclass wrapping one)."""
    return isinstance(w, torch.Tensor) and (type(w) not in _PLAIN or not w.is_floating_point())


def logical_shape(module) -> tuple:
    """The weight's shape as the layer computes with it. A quantised weight may be stored
    packed (bitsandbytes 4-bit keeps ``(n/2, 1)`` bytes, GGUF its blocks): the layer's own
    dimensions (or bitsandbytes' ``quant_state.shape``) give the real one."""
    w = module.weight
    shape = tuple(w.shape)
    if not is_quantised(w):
        return shape
    qs = getattr(w, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return tuple(int(d) for d in qs.shape)
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    return shape


class LiveModule:
    """The live (on-the-fly) adapters of one module and the hook that applies them."""

    def __init__(self, module: nn.Module, pristine: Callable[[], tuple]):
        self.module = module
        self.kind = module_kind(module)
        self.shape = logical_shape(module)  # the weight's shape as the layer uses it
        self.pristine = pristine  # () -> (W0 fp32, b0 fp32 or None), decoded on demand
        self.items: dict = {}  # key -> (contribution, strength)
        self.handle = None
        self._factors: dict = {}  # key -> {(device, dtype): (down_op weight, up weight, scale)}
        self._dense: dict = {}  # key -> (delta fp32, bias delta fp32 or None)
        self._sum: Optional[tuple] = None  # (weight sum, bias sum) in fp32, None when stale
        self._checked: set = set()  # low-rank keys whose factors were checked finite
        self.probe = False
        self._sum_cast: dict = {}
        self._lowrank_items: list = []
        self.rows_seen = 0  # rows (batch x tokens) since the last reset
        self.calls = 0

    # --- state -----------------------------------------------------------------------------
    def set(self, items: dict, probe: bool = False) -> None:
        """Make ``items`` (key -> (contribution, strength)) the live set; hook on/off as needed.

        ``probe`` keeps the hook on with no items, to measure the rows a module sees.
        Everything that can fail (deltas, finiteness checks) runs before any state changes.
        """
        if items == self.items and probe == self.probe:
            return
        sums_changed = False
        new_lowrank = []
        for key, (c, s) in items.items():
            if self._lowrank_ok(c):
                new_lowrank.append((key, c, s))
            old = self.items.get(key)
            if self._in_sums(c) and (old is None or old[1] != s):
                sums_changed = True
        for key, (c, s) in self.items.items():
            if key not in items and self._in_sums(c):
                sums_changed = True
        for key, c, _ in new_lowrank:
            if key not in self._checked:
                _check_lowrank(c, self.shape)
        new_sum, new_dense = (self._sum, self._dense)
        if sums_changed:
            new_sum, new_dense = self._compute_sums(items)
        # commit
        self._checked = {k for k, _, _ in new_lowrank}
        self._dense = {k: v for k, v in new_dense.items() if k in items}
        self._factors = {k: v for k, v in self._factors.items() if k in items}
        self.items = dict(items)
        self._lowrank_items = sorted(new_lowrank, key=lambda t: t[0])
        if sums_changed:
            self._sum = new_sum
            self._sum_cast = {}
        self.probe = probe
        if (self.items or probe) and self.handle is None:
            self.handle = self.module.register_forward_hook(self._hook)
        elif not (self.items or probe) and self.handle is not None:
            self.remove_hook()

    def remove_hook(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def cached_bytes(self) -> int:
        n = 0
        for pair in self._dense.values():
            n += sum(t.numel() * t.element_size() for t in pair if t is not None)
        for per in self._factors.values():
            for down, up, _ in per.values():
                n += down.numel() * down.element_size() + up.numel() * up.element_size()
        return n

    # --- preparation -----------------------------------------------------------------------
    def _lowrank_ok(self, c) -> bool:
        """Whether ``c`` runs as two small ops (else its delta is materialised)."""
        if self.kind not in ("linear", "conv"):
            return False
        if self.kind == "conv" and self.module.groups != 1:
            return False
        return c.lowrank(self.shape) is not None

    def _in_sums(self, c) -> bool:
        """Whether ``c`` takes part in the materialised sums (dense delta or a bias change)."""
        return not self._lowrank_ok(c) or _changes_bias(c)

    def _factors_for(self, key, c, device, dtype):
        per = self._factors.setdefault(key, {})
        f = per.get((device, dtype))
        if f is None:
            shape = self.shape
            up, down, scale = c.lowrank(shape)
            if self.kind == "conv":
                nd = len(shape) - 2
                down = down.reshape(down.shape[0], *shape[1:])
                up = up.reshape(up.shape[0], up.shape[1], *([1] * nd))
            f = (down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype), scale)
            per[(device, dtype)] = f
        return f

    def _compute_sums(self, items) -> tuple:
        """((weight sum, bias sum) fp32, dense cache) of what is not applied as low-rank ops."""
        ws = bs = None
        w0 = b0 = None
        dense = dict(self._dense)
        for key, (c, s) in sorted(items.items(), key=lambda t: t[0]):
            if not self._in_sums(c):
                continue
            cached = dense.get(key)
            if cached is None:
                if self._lowrank_ok(c):  # weight as two ops; only its bias change here
                    m = self.module
                    b = None if m.bias is None else m.bias.detach().float()
                    w = m.weight.detach()
                    w = torch.zeros(self.shape) if is_quantised(w) else w.float()  # read for its shape
                    cached = (None, c.bias_delta(b, w))
                else:
                    if w0 is None:
                        w0, b0 = self.pristine()
                    cached = (c.delta(w0), c.bias_delta(b0, w0))
                for t in cached:
                    if t is not None:
                        check_finite(t, f"delta of {c.target.module}")
                dense[key] = cached
            d, db = cached
            if d is not None:
                ws = d * float(s) if ws is None else ws.add_(d, alpha=float(s))
            if db is not None:
                bs = db * float(s) if bs is None else bs.add_(db, alpha=float(s))
        return (ws, bs), dense

    def _sums(self):
        if self._sum is None:
            self._sum, self._dense = self._compute_sums(self.items)
        return self._sum

    def _cast_sums(self, device, dtype):
        c = self._sum_cast.get((device, dtype))
        if c is None:
            ws, bs = self._sums()
            c = (None if ws is None else ws.to(device=device, dtype=dtype),
                 None if bs is None else bs.to(device=device, dtype=dtype))
            self._sum_cast[(device, dtype)] = c
        return c

    # --- the hook --------------------------------------------------------------------------
    def _hook(self, module, args, output):
        x = args[0] if args else None
        if x is None or not torch.is_tensor(output):
            return output
        kind = self.kind
        self.calls += 1
        if not self.items:  # probing only
            self.rows_seen += max(1, output.numel() // max(1, output.shape[-1] if kind != "conv" else output.shape[1]))
            return output
        if kind in ("layernorm", "groupnorm", "embedding"):
            self.rows_seen += max(1, output.numel() // max(1, module.weight.shape[-1]))
            return self._functional(module, x, output)
        dtype, device = output.dtype, output.device
        # in place into the module's fresh output when no graph is being recorded
        in_place = not (torch.is_grad_enabled() and output.requires_grad) and output.is_contiguous()
        out = output
        if kind == "linear":
            self.rows_seen += max(1, x.numel() // module.in_features)
            xin = x.to(dtype) if x.dtype != dtype else x
            if in_place and self._lowrank_items:
                x2 = xin.reshape(-1, module.in_features)
                o2 = out.view(-1, out.shape[-1])
                for key, c, s in self._lowrank_items:
                    down, up, scale = self._factors_for(key, c, device, dtype)
                    o2.addmm_(torch.mm(x2, down.t()), up.t(), alpha=s * scale)
            else:
                for key, c, s in self._lowrank_items:
                    down, up, scale = self._factors_for(key, c, device, dtype)
                    out = out + F.linear(F.linear(xin, down) * (s * scale), up)
            ws, bs = self._cast_sums(device, dtype)
            if ws is not None:
                out = out.add_(F.linear(xin, ws)) if in_place else out + F.linear(xin, ws)
            if bs is not None:
                out = out.add_(bs) if in_place else out + bs
            return out
        if kind == "conv":
            self.rows_seen += max(1, output.numel() // module.out_channels)
            xin = x.to(dtype) if x.dtype != dtype else x
            conv = _CONV_FN[len(self.shape) - 2]
            for key, c, s in self._lowrank_items:
                down, up, scale = self._factors_for(key, c, device, dtype)
                h = module._conv_forward(xin, down, None)
                if in_place:  # the 1x1 up conv as a batched matmul straight into the output
                    n, r = h.shape[0], h.shape[1]
                    o3 = out.view(n, out.shape[1], -1)
                    o3.baddbmm_(up.reshape(up.shape[0], r).expand(n, -1, -1), h.reshape(n, r, -1), alpha=s * scale)
                else:
                    out = out + conv(h * (s * scale), up)
            ws, bs = self._cast_sums(device, dtype)
            if ws is not None:
                extra = module._conv_forward(xin, ws, None)
                out = out.add_(extra) if in_place else out + extra
            if bs is not None:
                bias = bs.reshape(1, -1, *([1] * (out.dim() - 2)))
                out = out.add_(bias) if in_place else out + bias
            return out
        return output

    def _functional(self, module, x, output):
        ws, bs = self._sums()
        w = module.weight
        we = w if ws is None else (w.float() + ws.to(w.device)).to(w.dtype)
        b = module.bias
        if bs is not None:
            b = (bs.to(w.device) if b is None else b.float() + bs.to(b.device)).to(w.dtype)
        if self.kind == "layernorm":
            return F.layer_norm(x, module.normalized_shape, we, b, module.eps)
        if self.kind == "groupnorm":
            return F.group_norm(x, module.num_groups, we, b, module.eps)
        return F.embedding(x, we, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)


def _check_lowrank(c, shape) -> None:
    """Factors finite, and their product too (checked exactly only when a cheap bound overflows)."""
    up, down, scale = c.lowrank(shape)
    check_finite(up, f"lora_up of {c.target.module}")
    check_finite(down, f"lora_down of {c.target.module}")
    bound = abs(scale) * float((up.abs().amax(0) * down.abs().amax(1)).sum())
    if not math.isfinite(bound) or bound > 1e30:
        check_finite((up @ down) * scale, f"delta of {c.target.module}")


def _changes_bias(c) -> bool:
    """Whether a low-rank contribution also changes the bias (PEFT ``lora_bias``)."""
    t = getattr(c.adapter, "tensors", None) or {}
    return "lora_up.bias" in t or "diff_b" in t
