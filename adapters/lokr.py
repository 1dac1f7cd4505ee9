"""LoKr (LyCORIS): Kronecker product of a small and a big factor, either possibly low-rank.

    W1 = lokr_w1  or  lokr_w1_a @ lokr_w1_b                        (a, c)
    W2 = lokr_w2  or  lokr_w2_a @ lokr_w2_b                        (b, d) / (b, d*k*k) / (b, d, k, k)
         or  lokr_t2 x_0 lokr_w2_a x_1 lokr_w2_b                   Tucker: t2 (r, r, k, k), w2_a (r, b), w2_b (r, d)
    delta = scale * kron(W1, W2)                                   (a*b, c*d, k, k)

Scale, exactly as LyCORIS 4.1.3's forward: ``alpha / rank`` where rank is the rank of the
decomposed factor(s) (``lokr_w2_b.shape[0]`` if W2 is decomposed, else ``lokr_w1_b.shape[0]``;
LyCORIS shares one rank between both), and 1 when neither factor is decomposed: LyCORIS forces
``alpha = lora_dim`` in full-matrix mode, so the stored alpha carries no scale. Alpha missing
also means 1 (kohya convention).
"""
from __future__ import annotations

import torch

from lora_ext.adapter import COMMON_NAMES, expect
from lora_ext.hookspecs import hookimpl

from ._common import BaseAdapter, fit_to, need, tucker

_W1 = ("lokr_w1", "lokr_w1_a", "lokr_w1_b")
_W2 = ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LoKrAdapter(BaseAdapter):
    type_name = "lokr"
    # No single name is required: each factor is either full or an a/b pair (see claims()).
    required = frozenset()
    optional = frozenset(_W1 + _W2)

    @classmethod
    def claims(cls, names):
        n = frozenset(names) - COMMON_NAMES
        if not n or not n <= cls.optional:
            return False
        w1 = {"lokr_w1"} == n & set(_W1) or {"lokr_w1_a", "lokr_w1_b"} == n & set(_W1)
        w2_names = n & set(_W2)
        w2 = w2_names == {"lokr_w2"} or w2_names in ({"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"})
        return bool(w1 and w2)

    def __init__(self, tensors):
        super().__init__(tensors)
        expect(self.claims(frozenset(tensors)),
               f"lokr: need lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b[/lokr_t2]; got {sorted(tensors)}")
        if "lokr_w1" in tensors:
            w1 = need(tensors, "lokr_w1", (2,), "lokr")
            w1_shape = tuple(w1.shape)
            self._r1 = None
        else:
            a = need(tensors, "lokr_w1_a", (2,), "lokr")
            b = need(tensors, "lokr_w1_b", (2,), "lokr")
            expect(a.shape[1] == b.shape[0],
                   f"lokr: lokr_w1_a {tuple(a.shape)} and lokr_w1_b {tuple(b.shape)} disagree on the rank")
            w1_shape = (a.shape[0], b.shape[1])
            self._r1 = int(b.shape[0])
        if "lokr_w2" in tensors:
            w2 = need(tensors, "lokr_w2", (2, 3, 4, 5), "lokr")
            w2_shape = tuple(w2.shape)
            self._r2 = None
        else:
            a = need(tensors, "lokr_w2_a", (2,), "lokr")
            b = need(tensors, "lokr_w2_b", (2, 3, 4, 5), "lokr")
            t = tensors.get("lokr_t2")
            if t is None:
                expect(a.shape[1] == b.shape[0],
                       f"lokr: lokr_w2_a {tuple(a.shape)} and lokr_w2_b {tuple(b.shape)} disagree on the rank")
                w2_shape = (a.shape[0], *b.shape[1:])
            else:
                expect(b.dim() == 2, f"lokr: with lokr_t2, lokr_w2_b must be 2-D, got {tuple(b.shape)}")
                expect(t.dim() >= 3 and t.shape[0] == a.shape[0] and t.shape[1] == b.shape[0],
                       f"lokr: lokr_t2 {tuple(t.shape)} does not match lokr_w2_a {tuple(a.shape)} / lokr_w2_b {tuple(b.shape)}")
                w2_shape = (a.shape[1], b.shape[1], *t.shape[2:])
            self._r2 = int(b.shape[0])
        self._shape = (int(w1_shape[0] * w2_shape[0]), int(w1_shape[1] * w2_shape[1]),
                       *(int(d) for d in w2_shape[2:]))

    @property
    def rank(self):
        return self._r2 if self._r2 is not None else self._r1

    def scale(self):
        if self.scale_override is not None:
            return self.scale_override
        if self.rank is None:  # both factors full: LyCORIS uses scale 1 whatever alpha says
            return 1.0
        return super().scale()

    def natural_shape(self):
        return self._shape

    def factors(self, like=None):
        """(W1, W2) rebuilt, W2 possibly with kernel dims (or a kernel folded into dim 1)."""
        w1 = self.t("lokr_w1", like)
        if w1 is None:
            w1 = self.t("lokr_w1_a", like) @ self.t("lokr_w1_b", like)
        w2 = self.t("lokr_w2", like)
        if w2 is None:
            a, b, t = self.t("lokr_w2_a", like), self.t("lokr_w2_b", like), self.t("lokr_t2", like)
            if t is None:
                w2 = (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])
            else:
                w2 = tucker(t, a, b)
        return w1, w2

    def delta(self, weight):
        self.check_weight(weight)
        w1, w2 = self.factors(weight)
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
        # torch.kron needs contiguous operands (a Tucker rebuild is a strided einsum view)
        return fit_to(torch.kron(w1.contiguous(), w2.contiguous()) * self.scale(), weight, "lokr")


@hookimpl
def lora_ext_adapter_types():
    return [LoKrAdapter]
