"""PEFT BOFT (``peft.BOFTConfig``): ``boft_R`` (m, K, b, b) and ``boft_s`` (out values).

As ``peft/tuners/boft/layer.py`` computes it: each of the m butterfly stages has K blocks,
made orthogonal by the Cayley map of their skew part,

    S = (A - A^T) / 2          B = (I - S)(I + S)^-1          B_i = blockdiag(B[i, 0..K-1])

and stage i permutes the n = K*b inputs by P_i: within each group of b * 2^i inputs, the
pieces of b/2 come as (even pieces, then odd ones); P_0, and every P_i when m = 1, is the
identity. The stages multiply as ``M = (P_{m-1} B_{m-1} P_{m-1}^T) ... (P_0 B_0 P_0^T)``, the
input is rotated (``x @ M``) and the output, bias excepted, scaled by ``boft_s``, so

    W' = diag(s) W_flat M^T          W_flat = W viewed (out, in*kh*kw)        delta = W' - W

with the bias untouched. Row o of W' is row o of W times the same M^T, scaled by s[o]: fused
q/k/v split into exact per-part deltas. The tensors fix everything (m, K, b, the scale);
``boft_dropout`` acts only while training. PEFT's CPU path writes m = 1 (its multi-stage
factors need its CUDA extension); files trained with it hold m > 1 and are read the same way.
A Conv2d's flattened weight is rotated as a Linear's (PEFT's conv forward uses that weight).
"""
from __future__ import annotations

import torch

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl

from ._common import BaseAdapter, prod


def cayley_half_skew(blocks: torch.Tensor) -> torch.Tensor:
    """(..., b, b) -> (I - S)(I + S)^-1 with S the skew half of each block."""
    s = (blocks - blocks.transpose(-1, -2)) / 2
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device).expand_as(s)
    # R (I + S) = I - S  <=>  (I + S)^T R^T = (I - S)^T
    return torch.linalg.solve((eye + s).transpose(-1, -2), (eye - s).transpose(-1, -2)).transpose(-1, -2)


def stage_order(n: int, block: int, stage: int, stages: int, device=None) -> torch.Tensor:
    """idx with (P v)[a] = v[idx[a]] for butterfly stage ``stage`` of ``stages`` over n inputs."""
    idx = torch.arange(n, device=device)
    if stages == 1:
        return idx
    half = block // 2
    # groups of block * 2^stage inputs, pieces of b/2: position (group, parity, j) takes piece 2j+parity
    return idx.reshape(-1, 2 ** stage, 2, half).transpose(1, 2).reshape(-1)


class PeftBOFTAdapter(BaseAdapter):
    type_name = "peft_boft"
    required = frozenset({"boft_R", "boft_s"})
    optional = frozenset()
    weight_dependent = True

    def __init__(self, tensors):
        super().__init__(tensors)
        r, s = tensors.get("boft_R"), tensors.get("boft_s")
        expect(r is not None and s is not None, "peft_boft: needs boft_R and boft_s")
        expect(r.dim() == 4 and r.shape[2] == r.shape[3] and min(r.shape) >= 1,
               f"peft_boft: boft_R must be (stages, blocks, b, b), got {tuple(r.shape)}")
        expect(r.is_floating_point() and s.is_floating_point(), "peft_boft: boft_R and boft_s must be floating point")
        m, k, b, _ = (int(d) for d in r.shape)
        if m > 1:
            expect(b % 2 == 0, f"peft_boft: block size {b} must be even for {m} butterfly stages")
            expect(k % 2 ** (m - 1) == 0, f"peft_boft: {k} blocks do not fit {m} butterfly stages")
        self._m, self._k, self._b = m, k, b
        self._n = k * b
        self._out = int(s.numel())
        expect(s.dim() <= 2 and self._out == max(s.shape, default=1),
               f"peft_boft: boft_s must hold one value per output, got shape {tuple(s.shape)}")

    @property
    def rank(self):
        return self._k

    def scale(self):
        return 1.0

    def fits(self, target_shape):
        shape = tuple(int(d) for d in target_shape)
        if len(shape) not in (2, 4) or shape[0] != self._out:
            return False
        if len(shape) == 4 and shape[2] != shape[3]:
            return False  # PEFT's conv path assumes square kernels
        return prod(shape[1:]) == self._n

    def rows_independent(self, shape, parts):
        return True  # row o of W' is s[o] * (row o of W) @ M^T

    def describe(self):
        d = super().describe()
        d.update(stages=self._m, block_size=self._b)
        return d

    def delta(self, weight):
        shape = tuple(weight.shape)
        expect(self.fits(shape), f"peft_boft: {self._m}x{self._k} blocks of {self._b} and {self._out} scales "
                                 f"do not fit a weight {shape}")
        w0 = weight.float().reshape(shape[0], -1)
        blocks = cayley_half_skew(self.t("boft_R", weight))
        y = w0
        for i in range(self._m):  # y <- y M_i^T, first stage first
            idx = stage_order(self._n, self._b, i, self._m, y.device)
            inv = torch.argsort(idx)
            z = y[:, inv].reshape(shape[0], self._k, self._b)
            z = torch.einsum("okn,kmn->okm", z, blocks[i]).reshape(shape[0], self._n)
            y = z[:, idx]
        y = y * self.t("boft_s", weight).reshape(-1, 1)
        return (y - w0).reshape(shape)


@hookimpl
def lora_ext_adapter_types():
    return [PeftBOFTAdapter]
