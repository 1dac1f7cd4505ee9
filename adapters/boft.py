"""BOFT (LyCORIS butterfly OFT): ``oft_blocks`` (m, K, b, b), optional ``rescale``.

As lycoris-lora 4.1.3's forward (the constraint covers all m stages at once)::

    R = cayley(oft_blocks, alpha * out)               see oft.py; R[i] is (K, b, b)
    for stage i in 0..m-1:                            k = 2**i * b/2
        P_i = rows viewed as (-1, 2, k), swapped to (-1, k, 2)
        W   = P_i^T blockdiag(R[i]) P_i W             each block b x b acts as R[i][j] @ rows
    W' = rescale * W
    delta = W' - W0

Note: unlike diag-OFT, each butterfly block multiplies from the left (R, not R^T).

The names are the same as diag-OFT's; the oft type claims ``oft_blocks`` and hands 4-D ones
to this class, so this type never claims a group on its own.
"""
from __future__ import annotations

import torch

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl

from .oft import Orthogonal, cayley


def butterfly_perm(n: int, k: int, device=None) -> torch.Tensor:
    """Row order of one stage: position (c, j, g) takes row (c, g, j) of the (-1, 2, k) view."""
    return torch.arange(n, device=device).reshape(-1, 2, k).transpose(1, 2).reshape(-1)


class BOFTAdapter(Orthogonal):
    type_name = "boft"
    required = frozenset()  # claimed through the oft type (same names), see oft.OFTAdapter
    optional = frozenset({"oft_blocks", "rescale"})
    weight_dependent = True

    @classmethod
    def claims(cls, names):
        return False

    def __init__(self, tensors):
        super().__init__(tensors)
        blocks = tensors.get("oft_blocks")
        expect(blocks is not None, "boft: missing oft_blocks")
        expect(blocks.dim() == 4 and blocks.shape[2] == blocks.shape[3],
               f"boft: oft_blocks must be (stages, blocks, b, b), got {tuple(blocks.shape)}")
        m, k, b, _ = (int(d) for d in blocks.shape)
        expect(b % 2 == 0, f"boft: block size {b} must be even")
        self._out = k * b
        expect(self._out % (2 ** (m - 1) * b) == 0,
               f"boft: {m} butterfly stages do not fit {k} blocks of {b}")
        rescale = tensors.get("rescale")
        expect(rescale is None or rescale.numel() == self._out,
               f"boft: rescale has {None if rescale is None else rescale.numel()} values for {self._out} outputs")

    @property
    def rank(self):
        return int(self.tensors["oft_blocks"].shape[1])

    def describe(self):
        d = super().describe()
        blocks = self.tensors["oft_blocks"]
        d.update(constraint=self.alpha, stages=int(blocks.shape[0]), block_size=int(blocks.shape[2]))
        return d

    def delta(self, weight):
        self.check_weight(weight)
        w0 = weight.float()
        r = cayley(self.t("oft_blocks", weight), self.alpha * self._out)
        m, nb, b, _ = r.shape
        w = w0
        for i in range(m):
            perm = butterfly_perm(self._out, 2 ** i * (b // 2), w.device)
            rows = w[perm].reshape(nb, b, *w.shape[1:])
            rows = torch.einsum("kij,kj...->ki...", r[i], rows).reshape(w.shape)
            w = torch.empty_like(rows)
            w[perm] = rows
        rescale = self.t("rescale", weight)
        if rescale is not None:
            w = w * rescale.reshape(-1, *([1] * (w.dim() - 1)))
        return w - w0


@hookimpl
def lora_ext_adapter_types():
    return [BOFTAdapter]
