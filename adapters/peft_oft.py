"""PEFT OFT (``peft.OFTConfig``, PEFT >= 0.16): ``oft_R.weight`` (K, b(b-1)/2) per module.

PEFT's OFT rotates the layer's *input*, not its weight rows as LyCORIS does. Each of the K
rows of ``oft_R.weight`` packs the strict upper triangle of one b x b block, row by row
(``triu_indices(b, b, 1)`` order); the skew-symmetric block is ``Q = U - U^T``. The rotation
of a block, as ``peft/tuners/oft/layer.py`` computes it:

    use_cayley_neumann (default):  R = I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)   (PEFT >= 0.18;
                                   n = num_cayley_neumann_terms; n = 3 gives I + 2Q + 2Q^2 + Q^3)
                                   R = I + 2Q + 2Q^2 + ... + 2Q^(n-1)             (PEFT 0.16/0.17)
    otherwise:                     R = (I - Q)(I + Q)^-1                           (exact Cayley)

and ``coft`` first pulls every block whose ``|Q|_F`` exceeds ``eps / sqrt(K)`` back onto that
radius. With ``block_share`` K is 1 and the one block serves every group of b inputs. The
forward is ``base(x @ blockdiag(R))``, so the weight the layer really uses is

    W' = W_flat @ blockdiag(R)^T          W_flat = W viewed (out, in)      delta = W' - W

and the bias is untouched. Each row of W' is that row of W times the same matrix, so fused
q/k/v (or Flux's q|k|v|mlp) split into exact per-part deltas. For a Conv2d PEFT unfolds the
input into kernel patches, rotates them and folds them back (summing overlaps) before the
conv: for a 1x1 kernel that is the rotation above, exactly; for a larger kernel it is not a
change of the weight at all (it alters the output even when R = I), so such groups do not fit
any k x k conv and are reported rather than approximated. ``module_dropout`` acts only while
training (and not at all in PEFT >= 0.16's forward). The settings the tensors cannot tell
(parametrisation, terms, coft/eps, the PEFT version for the Neumann formula) come from the
adapter config (``adapter_config.json`` beside the file, or ``lora_adapter_metadata``); without
one, PEFT's current defaults are assumed and ``describe()`` says so.

Older PEFT files hold full blocks in ``oft_r`` (K, b, b), rotated by the Cayley map of their
half skew part ``R = (I - S)(I + S)^-1``, ``S = (A - A^T) / 2``:

* PEFT 0.14 / 0.15 (``oft_r`` + ``oft_s``): the input rotation above, then the outputs scaled,
  ``W' = diag(oft_s) W_flat blockdiag(R)^T`` (convs of any square kernel: PEFT rotates the
  flattened filter there);
* PEFT <= 0.13 (``oft_r`` alone, LyCORIS-style): the *output* channels rotated, bias excepted,
  ``W' = blockdiag(R)[:out, :out]^T W`` with blocks of ceil(out / r) (cut to out rows).

Their COFT radius is PEFT's ``eps * ceil(out / r)^2 / sqrt(K)`` on the stored blocks.
"""
from __future__ import annotations

import math
import re

import torch

from lora_ext.adapter import expect
from lora_ext.hookspecs import hookimpl

from ._common import BaseAdapter, prod

MAX_TERMS = 64  # num_cayley_neumann_terms beyond this is refused (PEFT's default is 5)


def _block_size(n_packed: int) -> int:
    """b with b(b-1)/2 == n_packed, or -1 when there is none."""
    b = (1 + math.isqrt(1 + 8 * n_packed)) // 2
    return b if b * (b - 1) // 2 == n_packed else -1


def unpack_skew(packed: torch.Tensor, b: int) -> torch.Tensor:
    """(K, b(b-1)/2) strict upper triangles, row-major -> (K, b, b) skew-symmetric blocks."""
    k = packed.shape[0]
    upper = packed.new_zeros(k, b, b)
    i, j = torch.triu_indices(b, b, 1, device=packed.device)
    upper[:, i, j] = packed
    return upper - upper.transpose(1, 2)


def coft_project(packed: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """COFT: blocks whose skew matrix has Frobenius norm above eps/sqrt(K) scaled back onto it."""
    q = unpack_skew(packed, b)
    radius = eps / math.sqrt(q.shape[0])
    norm = torch.linalg.matrix_norm(q).reshape(-1, 1, 1)
    q = torch.where(norm <= radius, q, q * (radius / norm))
    i, j = torch.triu_indices(b, b, 1, device=packed.device)
    return q[:, i, j]


def rotation_blocks(q: torch.Tensor, neumann: bool, terms: int, series: str = "0.18") -> torch.Tensor:
    """(K, b, b) rotations from skew blocks ``q``: PEFT's truncated Neumann form or exact Cayley."""
    b = q.shape[-1]
    eye = torch.eye(b, dtype=q.dtype, device=q.device).expand_as(q)
    if not neumann:
        # R (I + Q) = I - Q
        return torch.linalg.solve((eye + q).transpose(-1, -2), (eye - q).transpose(-1, -2)).transpose(-1, -2)
    out = eye.clone()
    if terms <= 1:
        return out
    if series == "0.16":  # I + 2 (Q + Q^2 + ... + Q^(n-1))
        power = q
        for _ in range(1, terms):
            out = out + 2 * power
            power = power @ q
        return out
    # PEFT >= 0.18: every power up to the last doubled, the last one (at least Q^3) single
    out = out + 2 * q
    if terms == 2:
        return out
    last = max(3, terms - 1)
    power = q
    for p in range(2, last + 1):
        power = power @ q
        out = out + (power if p == last else 2 * power)
    return out


def rotate_inputs(w_flat: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``w_flat @ blockdiag(r)^T`` for ``w_flat`` (out, K*b) and ``r`` (K, b, b)."""
    k, b, _ = r.shape
    out = torch.einsum("okc,kmc->okm", w_flat.reshape(w_flat.shape[0], k, b), r)
    return out.reshape(w_flat.shape)


def _version(text) -> tuple:
    m = re.match(r"\s*(\d+)\.(\d+)", str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class PeftOFTAdapter(BaseAdapter):
    type_name = "peft_oft"
    required = frozenset({"oft_R.weight"})
    optional = frozenset()
    weight_dependent = True

    def __init__(self, tensors):
        super().__init__(tensors)
        packed = tensors.get("oft_R.weight")
        expect(packed is not None, "peft_oft: missing oft_R.weight")
        expect(packed.dim() == 2 and packed.shape[0] >= 1,
               f"peft_oft: oft_R.weight must be (blocks, b(b-1)/2), got {tuple(packed.shape)}")
        expect(packed.is_floating_point(), f"peft_oft: oft_R.weight has dtype {packed.dtype}")
        self._b = _block_size(int(packed.shape[1]))
        expect(self._b >= 1, f"peft_oft: {packed.shape[1]} values per block are no b(b-1)/2 upper triangle")
        self._k = int(packed.shape[0])
        # PEFT's OFTConfig defaults (0.21), replaced by configure_peft() when a config is found
        self.neumann, self.terms, self.series = True, 5, "0.18"
        self.coft, self.eps = False, 6e-5
        self.assumed = True

    # --- settings -------------------------------------------------------------------------
    def configure_peft(self, cfg) -> None:
        """Read the OFTConfig fields the maths needs (``cfg``: the config dict, may be empty)."""
        if not cfg:
            return
        kind = str(cfg.get("peft_type", "OFT") or "OFT").upper()
        expect(kind == "OFT", f"peft_oft: the adapter config is for {kind}, not OFT")

        def flag(name, default):
            v = cfg.get(name, default)
            expect(isinstance(v, bool), f"peft_oft: config field {name} must be true or false, got {v!r}")
            return v

        self.neumann = flag("use_cayley_neumann", True)
        self.coft = flag("coft", False)
        terms = cfg.get("num_cayley_neumann_terms", 5)
        expect(isinstance(terms, int) and not isinstance(terms, bool) and 0 <= terms <= MAX_TERMS,
               f"peft_oft: num_cayley_neumann_terms must be an integer 0..{MAX_TERMS}, got {terms!r}")
        self.terms = terms
        eps = cfg.get("eps", 6e-5)
        expect(isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0,
               f"peft_oft: eps must be a positive number, got {eps!r}")
        self.eps = float(eps)
        # PEFT 0.18 changed the Neumann series; configs carry peft_version from 0.18 on.
        self.series = "0.18" if _version(cfg.get("peft_version")) >= (0, 18) else "0.16"
        self.assumed = False

    # --- shapes ---------------------------------------------------------------------------
    @property
    def rank(self):
        return self._k

    @property
    def block_size(self) -> int:
        return self._b

    def scale(self):
        return 1.0

    def _inputs(self, shape) -> int:
        """Input features PEFT rotates for a weight of ``shape``, or -1 when it cannot be one."""
        shape = tuple(int(d) for d in shape)
        if len(shape) == 2:
            return shape[1]
        if len(shape) == 4 and shape[2:] == (1, 1):
            return shape[1]
        return -1  # k x k convs: PEFT's forward there is no weight change (see the module doc)

    def fits(self, target_shape):
        d = self._inputs(target_shape)
        if d <= 0 or d % self._b:
            return False
        return self._k == 1 or d == self._k * self._b

    def rows_independent(self, shape, parts):
        return True  # every row of W' is that row of W times the same blockdiag(R)^T

    def describe(self):
        d = super().describe()
        d.update(block_size=self._b, shared=self._k == 1,
                 parametrisation=(f"cayley-neumann({self.terms}, peft {'>=0.18' if self.series == '0.18' else '<0.18'})"
                                  if self.neumann else "cayley"))
        if self.coft:
            d["coft_eps"] = self.eps
        if self.assumed:
            d["settings"] = "assumed (no adapter config found): PEFT defaults"
        return d

    # --- maths ----------------------------------------------------------------------------
    def rotation(self, inputs: int, like=None) -> torch.Tensor:
        """(inputs / b, b, b) rotation blocks for a layer with ``inputs`` input features."""
        packed = self.t("oft_R.weight", like)
        if self.coft:
            packed = coft_project(packed, self._b, self.eps)
        r = rotation_blocks(unpack_skew(packed, self._b), self.neumann, self.terms, self.series)
        n = inputs // self._b
        return r.expand(n, -1, -1) if self._k == 1 else r

    def delta(self, weight):
        shape = tuple(weight.shape)
        expect(self.fits(shape), f"peft_oft: {self._k} blocks of {self._b} do not fit a weight {shape}"
               + (" (PEFT's OFT on a k x k conv is no weight change)" if len(shape) == 4 else ""))
        w = weight.float().reshape(shape[0], -1)
        new = rotate_inputs(w, self.rotation(w.shape[1], weight))
        return (new - w).reshape(shape)


class PeftOFTEmbeddingAdapter(PeftOFTAdapter):
    """PEFT OFT on an ``nn.Embedding`` (``oft_embedding_R.weight``): the looked-up vectors are
    rotated, ``e' = e @ blockdiag(R)``, so the table becomes ``W' = W blockdiag(R)`` (R, not
    R^T as for a Linear's input). Each token's row stays its own."""

    required = frozenset({"oft_embedding_R.weight"})

    def __init__(self, tensors):
        super().__init__({"oft_R.weight": tensors.get("oft_embedding_R.weight")})
        self.tensors = dict(tensors)

    def t(self, name, like=None):
        return super().t("oft_embedding_R.weight" if name == "oft_R.weight" else name, like)

    def _inputs(self, shape):
        return int(shape[1]) if len(shape) == 2 else -1

    def delta(self, weight):
        shape = tuple(weight.shape)
        expect(self.fits(shape), f"peft_oft: {self._k} blocks of {self._b} do not fit an embedding {shape}")
        w = weight.float()
        new = rotate_inputs(w, self.rotation(w.shape[1], weight).transpose(-1, -2))
        return new - w


# --- PEFT 0.14 / 0.15 and PEFT <= 0.13: full b x b blocks in ``oft_r`` ------------------------

def _cayley_half(blocks: torch.Tensor) -> torch.Tensor:
    from .peft_boft import cayley_half_skew

    return cayley_half_skew(blocks)


def project_blocks(blocks: torch.Tensor, eps: float) -> torch.Tensor:
    """Old PEFT's COFT: blocks (as stored, not their skew part) with Frobenius norm above
    eps/sqrt(K) scaled back onto it."""
    radius = eps / math.sqrt(blocks.shape[0])
    norm = torch.linalg.matrix_norm(blocks).reshape(-1, 1, 1)
    return torch.where(norm <= radius, blocks, blocks * (radius / norm))


class _LegacyPeftOFT(BaseAdapter):
    """What both old layouts share: ``oft_r`` (K, b, b), Cayley of the half skew part
    ``R = (I - S)(I + S)^-1`` with ``S = (A - A^T) / 2``, optional COFT from the config."""

    type_name = "peft_oft"
    weight_dependent = True
    layout = ""

    def __init__(self, tensors):
        super().__init__(tensors)
        r = tensors.get("oft_r")
        expect(r is not None and r.dim() == 3 and r.shape[1] == r.shape[2] and min(r.shape) >= 1,
               f"peft_oft: oft_r must be (blocks, b, b), got {None if r is None else tuple(r.shape)}")
        expect(r.is_floating_point(), f"peft_oft: oft_r has dtype {r.dtype}")
        self._k, self._b = int(r.shape[0]), int(r.shape[1])
        self.coft, self.eps = False, 6e-5

    def configure_peft(self, cfg) -> None:
        if not cfg:
            return
        kind = str(cfg.get("peft_type", "OFT") or "OFT").upper()
        expect(kind == "OFT", f"peft_oft: the adapter config is for {kind}, not OFT")
        coft, eps = cfg.get("coft", False), cfg.get("eps", 6e-5)
        expect(isinstance(coft, bool), f"peft_oft: config field coft must be true or false, got {coft!r}")
        expect(isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0,
               f"peft_oft: eps must be a positive number, got {eps!r}")
        self.coft, self.eps = coft, float(eps)

    @property
    def rank(self):
        return self._k

    def scale(self):
        return 1.0

    def describe(self):
        d = super().describe()
        d.update(block_size=self._b, shared=self._k == 1, layout=self.layout, parametrisation="cayley")
        if self.coft:
            d["coft_eps"] = self.eps
        return d

    def _rotations(self, like, eps_scale: float) -> torch.Tensor:
        blocks = self.t("oft_r", like)
        if self.coft:
            blocks = project_blocks(blocks, self.eps * eps_scale)
        return _cayley_half(blocks)


class PeftOFTScaledAdapter(_LegacyPeftOFT):
    """PEFT 0.14 / 0.15: ``oft_r`` (K, b, b) rotates the K*b inputs (of a Conv2d: its
    in*k*k flattened filter, square kernels), ``oft_s`` scales the outputs::

        W' = diag(s) W_flat blockdiag(R)^T          bias untouched

    COFT's radius is ``eps * ceil(out / r)^2`` (r = input blocks) over sqrt(K)."""

    required = frozenset({"oft_r", "oft_s"})
    optional = frozenset()
    layout = "peft 0.14-0.15 (oft_r, oft_s)"

    def __init__(self, tensors):
        super().__init__(tensors)
        s = tensors.get("oft_s")
        expect(s is not None and s.is_floating_point() and s.dim() <= 2, "peft_oft: oft_s must be a float vector")
        self._out = int(s.numel())
        expect(self._out == max(s.shape, default=1), f"peft_oft: oft_s must hold one value per output, "
                                                     f"got shape {tuple(s.shape)}")

    def fits(self, target_shape):
        shape = tuple(int(d) for d in target_shape)
        if len(shape) not in (2, 4) or shape[0] != self._out or (len(shape) == 4 and shape[2] != shape[3]):
            return False
        d = prod(shape[1:])
        return d % self._b == 0 and (self._k == 1 or d == self._k * self._b)

    def rows_independent(self, shape, parts):
        return True  # row o of W' is s[o] * (row o of W) @ blockdiag(R)^T

    def delta(self, weight):
        shape = tuple(weight.shape)
        expect(self.fits(shape), f"peft_oft: {self._k} blocks of {self._b} and {self._out} scales do not fit "
                                 f"a weight {shape}")
        w = weight.float().reshape(shape[0], -1)
        n = w.shape[1] // self._b
        r = self._rotations(weight, math.ceil(self._out / n) ** 2)
        new = rotate_inputs(w, r.expand(n, -1, -1) if self._k == 1 else r)
        new = new * self.t("oft_s", weight).reshape(-1, 1)
        return (new - w).reshape(shape)


class PeftOFTOutputAdapter(_LegacyPeftOFT):
    """PEFT <= 0.13 (LyCORIS-style, ``oft_r`` alone): the rotation acts on the layer's output
    channels, bias excepted, ``y = (x W^T) R + b``: blocks of b = ceil(out / r) (block_share:
    one block repeated), the block diagonal cut to out x out, so::

        W' = blockdiag(R)[:out, :out]^T W             bias untouched

    COFT's radius is ``eps * b^2`` over sqrt(K)."""

    required = frozenset({"oft_r"})
    optional = frozenset()
    layout = "peft <=0.13 (oft_r, output rotation)"

    def _blocks_for(self, out: int) -> int:
        return -(-out // self._b)

    def fits(self, target_shape):
        shape = tuple(int(d) for d in target_shape)
        if len(shape) not in (2, 4):
            return False
        out = shape[0]
        if self._k > 1:
            return -(-out // self._k) == self._b
        return any(-(-out // r) == self._b for r in range(1, out + 1))  # some r of block_share

    def rows_independent(self, shape, parts):
        from lora_ext.adapter import part_bounds

        bounds = part_bounds(tuple(shape), parts)
        return bounds is not None and all(b % self._b == 0 for b in bounds)

    def delta(self, weight):
        shape = tuple(weight.shape)
        expect(self.fits(shape), f"peft_oft: {self._k} blocks of {self._b} do not fit a weight {shape}")
        w = weight.float().reshape(shape[0], -1)
        out = shape[0]
        n = self._blocks_for(out)
        r = self._rotations(weight, float(self._b ** 2))
        r = r.expand(n, -1, -1) if self._k == 1 else r
        padded = torch.cat([w, w.new_zeros(r.shape[0] * self._b - out, w.shape[1])], 0)
        new = torch.einsum("knm,knc->kmc", r, padded.reshape(r.shape[0], self._b, -1)).reshape(padded.shape)
        return (new[:out] - w).reshape(shape)


@hookimpl
def lora_ext_adapter_types():
    return [PeftOFTAdapter, PeftOFTEmbeddingAdapter, PeftOFTScaledAdapter, PeftOFTOutputAdapter]
