"""LoHa (LyCORIS): Hadamard product of two low-rank products, optionally Tucker-factored.

    W1 = hada_w1_a @ hada_w1_b              (out, r) x (r, in*k*k)
    W1 = hada_t1 x_0 hada_w1_a x_1 hada_w1_b    Tucker: t1 (r, r, k, k), w1_a (r, out), w1_b (r, in)
    (W2 likewise)
    delta = (alpha / rank) * W1 * W2         rank = hada_w1_b.shape[0]

Each half is rebuilt on its own, so a file with Tucker on one half only still works (ComfyUI
reads it that way too). Non-Tucker conv factors fold the kernel into the in axis; the delta is
reshaped to the conv weight.
"""
from __future__ import annotations

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl

from ._common import BaseAdapter, fit_to, need, prod, tucker


class LoHaAdapter(BaseAdapter):
    type_name = "loha"
    required = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    optional = frozenset({"hada_t1", "hada_t2"})

    def __init__(self, tensors):
        super().__init__(tensors)
        shapes = [self._half_shape(tensors, i) for i in (1, 2)]
        s1, s2 = shapes
        if s1 != s2:
            # a Tucker half knows the kernel, a plain one folds it into dim 1
            flat = [s if len(s) == 2 else (s[0], s[1] * prod(s[2:])) for s in shapes]
            expect(flat[0] == flat[1], f"loha: the two halves make {s1} and {s2}")
            s1 = s1 if len(s1) > 2 else s2
        self._shape = s1

    @staticmethod
    def _half_shape(tensors, i):
        a = need(tensors, f"hada_w{i}_a", (2, 3, 4, 5), "loha")
        b = need(tensors, f"hada_w{i}_b", (2, 3, 4, 5), "loha")
        t = tensors.get(f"hada_t{i}")
        if t is None:
            expect(a.shape[1] == b.shape[0],
                   f"loha: hada_w{i}_a {tuple(a.shape)} and hada_w{i}_b {tuple(b.shape)} disagree on the rank")
            return (int(a.shape[0]), *(int(d) for d in b.shape[1:]))
        expect(a.dim() == 2 and b.dim() == 2, f"loha: with hada_t{i}, hada_w{i}_a/b must be 2-D")
        expect(t.dim() >= 3 and t.shape[0] == a.shape[0] and t.shape[1] == b.shape[0],
               f"loha: hada_t{i} {tuple(t.shape)} does not match hada_w{i}_a {tuple(a.shape)} / hada_w{i}_b {tuple(b.shape)}")
        return (int(a.shape[1]), int(b.shape[1]), *(int(d) for d in t.shape[2:]))

    @property
    def rank(self):
        return int(self.tensors["hada_w1_b"].shape[0])

    def natural_shape(self):
        return self._shape

    def _half(self, i, like):
        a, b, t = self.t(f"hada_w{i}_a", like), self.t(f"hada_w{i}_b", like), self.t(f"hada_t{i}", like)
        if t is None:
            return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])
        return tucker(t, a, b)

    def delta(self, weight):
        self.check_weight(weight)
        w1, w2 = self._half(1, weight), self._half(2, weight)
        if w1.shape != w2.shape:
            w1, w2 = w1.reshape(weight.shape), w2.reshape(weight.shape)
        return fit_to(w1 * w2 * self.scale(), weight, "loha")


@hookimpl
def lora_ext_adapter_types():
    return [LoHaAdapter]
