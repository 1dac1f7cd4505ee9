"""OFT: block-diagonal orthogonal rotation of the output channels.

LyCORIS diag-OFT (``oft_blocks`` (K, b, b), optional ``rescale`` (out, 1, ...), alpha =
constraint), exactly as lycoris-lora 4.1.3's forward::

    Q = B - B^T                                  skew-symmetric, all K blocks
    if alpha > 0 and |Q|_F + 1e-8 > alpha*out:  Q = Q * alpha*out / (|Q|_F + 1e-8)
    R_k = (I + Q_k) (I - Q_k)^-1                 Cayley, per block
    W'[k*b + m] = sum_n R_k[n, m] W[k*b + n]     i.e. W' = blockdiag(R)^T W
    W' = rescale * W'                            when rescale is present
    delta = W' - W

kohya's ``networks.oft`` writes the same tensor names but its forward rotates the layer
*output*, bias included (``y @ R``), clamps ``Q`` by ``(min(|Q|, c) + 1e-8) / (|Q| + 1e-8)``
unconditionally, and has no rescale. The names cannot tell the two apart; the core picks the
kohya flavour from the file (``ss_network_module == "networks.oft"`` / ``oft_unet_`` keys) with
``adapter.with_flavour("kohya")``.

Old LyCORIS ``oft_diag`` (K, b, b) stores the rotation itself (A1111 reads it as R): no Cayley,
no constraint, ``W' = blockdiag(oft_diag)^T W``.
"""
from __future__ import annotations

import torch

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl

from ._common import BaseAdapter


def cayley(blocks: torch.Tensor, constraint: float, flavour: str = "lycoris") -> torch.Tensor:
    """Orthogonal blocks from the skew part of ``blocks`` (any leading dims, last two b x b)."""
    q = blocks - blocks.transpose(-1, -2)
    if flavour == "kohya":
        n = torch.linalg.vector_norm(q)
        q = q * ((torch.clamp(n, max=constraint) + 1e-8) / (n + 1e-8))
    elif constraint > 0:
        n = torch.linalg.vector_norm(q) + 1e-8
        if n > constraint:
            q = q * (constraint / n)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def rotate_rows(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``blockdiag(r)^T @ w`` over dim 0 of ``w`` (r: (K, b, b)); works on any trailing dims."""
    k, b, _ = r.shape
    out = torch.einsum("knm,kn...->km...", r, w.reshape(k, b, *w.shape[1:]))
    return out.reshape(w.shape)


class Orthogonal(BaseAdapter):
    """What OFT and BOFT share: alpha is the rotation constraint (0 = none), not a scale,
    and the rotation acts on the output rows, so only the out dimension must match."""

    _out: int

    @property
    def alpha(self):
        a = super().alpha
        return 0.0 if a is None else a

    def scale(self):
        return 1.0

    def fits(self, target_shape):
        return len(target_shape) >= 2 and target_shape[0] == self._out


def _blocks_within_parts(blocks: torch.Tensor, shape: tuple, parts) -> bool:
    """A block-diagonal rotation of the rows keeps each part's rows to itself when every
    block lies inside one part (each part boundary is a multiple of the block size)."""
    from ..adapter import part_bounds

    bounds = part_bounds(shape, parts)
    size = int(blocks.shape[1])
    return bounds is not None and shape[0] % size == 0 and all(b % size == 0 for b in bounds)


class OFTAdapter(Orthogonal):
    type_name = "oft"
    required = frozenset({"oft_blocks"})
    optional = frozenset({"rescale"})
    weight_dependent = True

    @classmethod
    def from_tensors(cls, tensors):
        blocks = tensors.get("oft_blocks")
        if blocks is not None and blocks.dim() == 4:  # same names, butterfly layout
            from .boft import BOFTAdapter

            return BOFTAdapter(tensors)
        return cls(tensors)

    def __init__(self, tensors):
        super().__init__(tensors)
        blocks = tensors.get("oft_blocks")
        expect(blocks is not None, "oft: missing oft_blocks")
        expect(blocks.dim() == 3 and blocks.shape[1] == blocks.shape[2],
               f"oft: oft_blocks must be (blocks, b, b), got {tuple(blocks.shape)}")
        self._out = int(blocks.shape[0] * blocks.shape[1])
        rescale = tensors.get("rescale")
        expect(rescale is None or rescale.numel() == self._out,
               f"oft: rescale has {None if rescale is None else rescale.numel()} values for {self._out} outputs")
        self.flavour = "lycoris"

    def configure(self, prefix, metadata):
        # kohya's networks.oft shares LyCORIS's tensor names but rotates differently.
        if metadata.get("ss_network_module") == "networks.oft" or prefix.startswith("oft_"):
            self.with_flavour("kohya")

    def with_flavour(self, flavour: str) -> "OFTAdapter":
        expect(flavour in ("lycoris", "kohya"), f"oft: unknown flavour {flavour!r}")
        self.flavour = flavour
        return self

    @property
    def rank(self):
        return int(self.tensors["oft_blocks"].shape[0])

    def describe(self):
        d = super().describe()
        d["constraint"] = self.alpha
        d["block_size"] = int(self.tensors["oft_blocks"].shape[1])
        if self.flavour != "lycoris":
            d["flavour"] = self.flavour
        return d

    def rows_independent(self, shape, parts):
        return _blocks_within_parts(self.tensors["oft_blocks"], shape, parts)

    def rotation(self, like=None):
        blocks = self.t("oft_blocks", like)
        return cayley(blocks, self.alpha * self._out, self.flavour)

    def delta(self, weight):
        self.check_weight(weight)
        w = weight.float()
        new = rotate_rows(self.rotation(weight), w)
        rescale = self.t("rescale", weight)
        if rescale is not None and self.flavour == "lycoris":
            new = new * rescale.reshape(-1, *([1] * (w.dim() - 1)))
        return new - w

    def bias_delta(self, bias, weight):
        if self.flavour != "kohya" or bias is None:
            return None
        b = bias.float().to(weight.device)
        return rotate_rows(self.rotation(weight), b) - b


class OFTDiagAdapter(BaseAdapter):
    type_name = "oft_diag"
    required = frozenset({"oft_diag"})
    optional = frozenset()
    weight_dependent = True

    def __init__(self, tensors):
        super().__init__(tensors)
        r = tensors.get("oft_diag")
        expect(r is not None and r.dim() == 3 and r.shape[1] == r.shape[2],
               f"oft: oft_diag must be (blocks, b, b), got {None if r is None else tuple(r.shape)}")
        self._out = int(r.shape[0] * r.shape[1])

    @property
    def rank(self):
        return int(self.tensors["oft_diag"].shape[0])

    def scale(self):
        return 1.0

    def fits(self, target_shape):
        return len(target_shape) >= 2 and target_shape[0] == self._out

    def rows_independent(self, shape, parts):
        return _blocks_within_parts(self.tensors["oft_diag"], shape, parts)

    def delta(self, weight):
        self.check_weight(weight)
        w = weight.float()
        return rotate_rows(self.t("oft_diag", weight), w) - w


@hookimpl
def lora_ext_adapter_types():
    return [OFTAdapter, OFTDiagAdapter]
