"""GLoRA (LyCORIS): ``W' = W + scale * (W A + B)`` with low-rank A (on the input side) and B.

Two layouts exist, told apart by shapes (as ComfyUI does):

- LyCORIS >= 2 (what lycoris-lora 4.1.3 writes): a1 (in, r), a2 (r, in), b1 (out, r),
  b2 (r, in[, k, k]); ``delta = s * (W x_1 (a1 @ a2) + b1 @ b2)`` where ``x_1`` multiplies the
  in-channel axis of W (so a conv keeps its kernel); rank = a2.shape[0]. Optional ``bm.weight``
  (a Tucker core for B, which 4.1.3 declares but never builds) gives
  ``B = bm x_0 b1 x_1 b2``.
- old LyCORIS 1.x: a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r);
  ``delta = s * (W_flat @ a2 @ a1 + b2 @ b1)``; rank = a1.shape[0].

s = alpha / rank (1 without alpha). When both layouts fit (only if in == out == rank) the
LyCORIS >= 2 layout is used.

lycoris 4.1.3 quirk: with ``rs_lora=True`` GLoRA trains with s = alpha / sqrt(rank) but, unlike
LoCon/LoHa/LoKr, stores the plain alpha, so the file alone gives alpha / rank. When the
metadata says ``rs_lora`` the core calls ``adapter.with_rs_lora()``.
"""
from __future__ import annotations

import torch

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl
from lora_ext.metadata import network_arg

from ._common import BaseAdapter, fit_to, prod, tucker

A1, A2, B1, B2, BM = "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"


def _flat(t):
    return t.reshape(t.shape[0], -1)


class GLoRAAdapter(BaseAdapter):
    type_name = "glora"
    required = frozenset({A1, A2, B1, B2})
    optional = frozenset({BM})
    weight_dependent = True

    def __init__(self, tensors):
        super().__init__(tensors)
        a1, a2, b1, b2 = (tensors.get(n) for n in (A1, A2, B1, B2))
        expect(all(t is not None and t.dim() >= 2 for t in (a1, a2, b1, b2)), "glora: need a1/a2/b1/b2 weights (2-D or conv)")
        bm = tensors.get(BM)
        a1s, a2s, b1s, b2s = (_flat(t).shape for t in (a1, a2, b1, b2))
        new = (a1s[1] == a2s[0] == b1s[1] == b2s[0]) and a1s[0] == a2s[1]
        if bm is not None:
            expect(new, "glora: bm.weight only exists in the LyCORIS >= 2 layout")
            expect(bm.dim() >= 3 and bm.shape[0] == bm.shape[1] == b1s[1],
                   f"glora: bm.weight {tuple(bm.shape)} does not match rank {b1s[1]}")
            new = new and prod(b2.shape[2:]) == 1
        old = (a1s[0] == a2s[1] == b1s[0] == b2s[1]) and a1s[1] == a2s[0] and bm is None
        expect(new or old, f"glora: shapes a1 {tuple(a1.shape)}, a2 {tuple(a2.shape)}, b1 {tuple(b1.shape)}, "
                           f"b2 {tuple(b2.shape)} fit neither GLoRA layout")
        self.layout = "lycoris2" if new else "old"
        self.rs_lora = False
        if new:
            in_ = int(a1s[0])
            if bm is not None:
                self._shape = (int(b1s[0]), int(b2.shape[1]), *(int(d) for d in bm.shape[2:]))
            elif b2.dim() > 2:
                self._shape = (int(b1s[0]), *(int(d) for d in b2.shape[1:]))
            else:
                self._shape = (int(b1s[0]), int(b2s[1]))
            folded = len(self._shape) == 2 and self._shape[1] % in_ == 0  # a conv's kernel folded into b2
            expect(self._shape[1] == in_ or folded,
                   f"glora: a1 {tuple(a1.shape)} and b2 {tuple(b2.shape)} disagree on the in channels")
        else:
            expect(b1s[1] == a1s[1], f"glora: b1 {tuple(b1.shape)} and a1 {tuple(a1.shape)} disagree on the in channels")
            self._shape = (int(b2s[0]), int(b1s[1]))

    @property
    def rank(self):
        return int(self.tensors[A2 if self.layout == "lycoris2" else A1].shape[0])

    def natural_shape(self):
        return self._shape

    def configure(self, prefix, metadata):
        self.with_rs_lora(bool(network_arg(metadata, "rs_lora")))

    def with_rs_lora(self, on: bool = True) -> "GLoRAAdapter":
        self.rs_lora = bool(on)
        return self

    def scale(self):
        a = self.alpha
        if a is None or not self.rank:
            return 1.0
        return a / (self.rank ** 0.5 if self.rs_lora else self.rank)

    def describe(self):
        d = super().describe()
        d["layout"] = self.layout
        return d

    def rows_independent(self, shape, parts):
        return True  # W @ (a1 a2) + b: row i of the delta reads row i of W only

    def delta(self, weight):
        self.check_weight(weight)
        w = weight.float()
        a1, a2, b1, b2 = (_flat(self.t(n, weight)) for n in (A1, A2, B1, B2))
        if self.layout == "old":
            d = _flat(w) @ a2 @ a1 + b2 @ b1
        else:
            bm = self.t(BM, weight)
            b = b1 @ b2 if bm is None else tucker(bm, b1.T, b2)
            b = fit_to(b, w, "glora")
            wa = torch.einsum("oi...,ij->oj...", w, a1 @ a2) if w.dim() > 2 else w @ (a1 @ a2)
            d = wa + b
        return fit_to(d * self.scale(), weight, "glora")


@hookimpl
def lora_ext_adapter_types():
    return [GLoRAAdapter]
