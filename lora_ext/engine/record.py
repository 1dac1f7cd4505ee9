"""Restore records: enough to get the pristine weight back, bit for bit, from the fused one.

After fusing, a module holds ``Wf = round(W0 + D)`` (``D`` the fp32 sum of its deltas). The
engine can always recompute an *estimate* ``E`` of ``W0`` from ``Wf`` and the adapters it
still holds (``E = Wf - D`` for the linear types; a short fixed-point iteration for the
weight-dependent ones, see ``contrib.estimate``). ``E`` rounded to the model's dtype is
already ``W0`` for almost every element: rounding ``W0 + D`` lost at most half an ulp of
``Wf``, which is less than half an ulp of ``W0`` unless ``W0 + D`` moved into a higher binade.
The record keeps only what ``E`` cannot tell:

* ``bits == 0`` ("sparse"): the positions where ``round(E) != W0`` and the original values
  there. Positions are stored as their low 16 bits plus a count per block of 65536
  elements, so an exception costs 2 bytes of index and one element of value;
* ``bits == b`` (1, 2, 4 or 8): the low ``b`` bits of every element's *ordered* bit pattern
  (a monotone integer image of the float: neighbouring floats are neighbouring integers),
  packed; the decoder takes the value with those low bits nearest to ``E`` (a tie broken by
  the side ``E`` lies on), and what that still gets wrong is kept as sparse exceptions;
* a full copy, when that is smaller, or the dtype has no compact form;
* a *plain* copy (``pending``): the pristine weight as it was, kept by a fast apply or switch
  until the background worker (``background``) has compacted it into one of the forms above.

The cheapest form is chosen per weight (the code widths are priced on a sample). The
exceptions are found by running the decoder itself on the estimate the restore will compute,
so the record is exact by construction; a checksum of ``W0`` is checked on every restore, and
one of ``Wf`` before decoding, so a weight changed by someone else in between, or a delta that
did not recompute identically, raises ``RestoreError`` instead of drifting silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

try:
    import numpy as _numpy
except ImportError:  # pragma: no cover - numpy comes with every torch install in practice
    _numpy = None

Tensor = torch.Tensor

# dtype -> (int view, sign shift, magnitude mask): ordered(v) = v ^ ((v >> shift) & mask)
_INT = {
    torch.float16: (torch.int16, 15, 0x7FFF),
    torch.bfloat16: (torch.int16, 15, 0x7FFF),
    torch.float32: (torch.int32, 31, 0x7FFFFFFF),
}
# fp8 storage (Flux / SD3.5 checkpoints): the same ordered image on the int8 view. The fnuz
# variants order differently (no -0; 0x80 is NaN) and are not fused (``transact``).
FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
for _d in FLOAT8:
    _INT[_d] = (torch.int8, 7, 0x7F)
BITS_CHOICES = (1, 2, 4, 8)
BLOCK = 1 << 16  # exception positions: low 16 bits + a count per block of this many elements
SAMPLE = 1 << 16  # elements sampled to price the code widths


_LUT: dict = {}


def upcast(t: Tensor, dtype=torch.float32) -> Tensor:
    """``t.to(dtype)``; for fp8 on the CPU through a 256-entry table made with torch's own
    conversion (the same values, 2-3x faster than torch's scalar fp8 conversion)."""
    if t.dtype not in FLOAT8 or t.device.type != "cpu" or _numpy is None or not t.is_contiguous():
        return t.to(dtype)
    key = (t.dtype, dtype)
    lut = _LUT.get(key)
    if lut is None:
        lut = _LUT[key] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(t.dtype).to(dtype).numpy()
    return torch.from_numpy(lut[t.detach().view(torch.uint8).numpy()])


def compact_dtype(dtype: torch.dtype) -> bool:
    return dtype in _INT


def bits_choices(dtype: torch.dtype) -> tuple:
    """Code widths worth pricing: narrower than the element (an 8-bit code of an 8-bit weight
    is a full copy with extra steps)."""
    item = torch.empty(0, dtype=dtype).element_size()
    return tuple(b for b in BITS_CHOICES if b < 8 * item)


def int_view(t: Tensor) -> Tensor:
    return t.reshape(-1).view(_INT[t.dtype][0])


def ordered(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """Monotone integer image of float bit patterns, in the same int type (-0 just below +0).

    Negative floats (sign bit set) have their magnitude bits flipped, so larger magnitudes
    become more negative integers. The map is its own inverse.
    """
    _, shift, mask = _INT[dtype]
    return bits ^ ((bits >> shift) & mask)


def _np(t: Tensor):
    """A numpy view of a CPU tensor (numpy's compares and nonzero are several times faster)."""
    if _numpy is None or t.device.type != "cpu":
        return None
    return t.detach().numpy()


def _raw(t: Tensor) -> Tensor:
    ity = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().reshape(-1).view(ity)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit-for-bit equality (``torch.equal`` calls -0 and +0 equal, and NaN unequal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ra, rb = _raw(a), _raw(b)
    na, nb = _np(ra), _np(rb)
    if na is not None and nb is not None:
        return bool(_numpy.array_equal(na, nb))
    return torch.equal(ra, rb)


def diff_positions(a: Tensor, b: Tensor) -> Tensor:
    """Flat positions (int64) where two int views differ."""
    na, nb = _np(a), _np(b)
    if na is not None and nb is not None:
        return torch.from_numpy(_numpy.flatnonzero(na != nb))
    return (a != b).nonzero().reshape(-1)


def diff_scratch(n: int, device):
    """A reusable comparison buffer for ``gather_diff`` on ``n`` elements (None off the CPU)."""
    return _numpy.empty(n, dtype=bool) if _numpy is not None and torch.device(device).type == "cpu" else None


def gather_diff(a: Tensor, b: Tensor, mask=None) -> tuple:
    """(flat positions where two int views differ, ``a``'s values there).

    ``mask``: a buffer from ``diff_scratch`` of the same length, for the comparison.
    """
    na, nb = _np(a), _np(b)
    if na is not None and nb is not None:
        idx = _numpy.flatnonzero(_numpy.not_equal(na, nb, out=mask) if mask is not None else na != nb)
        return torch.from_numpy(idx), torch.from_numpy(na[idx])
    idx = (a != b).nonzero().reshape(-1)
    return idx, a[idx]


def scatter(a: Tensor, idx: Tensor, vals: Tensor) -> None:
    """``a[idx] = vals`` in place on a flat int view."""
    na, ni, nv = _np(a), _np(idx), _np(vals)
    if na is not None and ni is not None and nv is not None:
        na[ni] = nv
    else:
        a[idx.to(a.device)] = vals.to(a.device)


def ordered_diff(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """ordered(a) - ordered(b) in a wide int type (ulps between two bit patterns)."""
    wide = torch.int32 if a.dtype == torch.int16 else torch.int64
    return ordered(a, dtype).to(wide) - ordered(b, dtype).to(wide)


_LANES = 1024  # checksum lanes (even, so a lane holds only even or only odd positions)


def checksum(bits: Tensor) -> tuple:
    """Cheap exact fingerprint of a bit pattern tensor: two wrapping sums (all, every other)."""
    flat = bits.reshape(-1)
    if (flat.numel() * flat.element_size()) % 8 == 0 and flat.numel():
        v = flat.view(torch.int64)
    else:
        v = flat.to(torch.int64)
    nv = _np(v)
    if nv is not None and nv.flags.c_contiguous:
        # numpy's integer sums run ~1.5x faster than torch's here; summed as uint64 (wrapping
        # is defined there), read back as the int64 torch's wrapping sum gives. Both sums in one
        # read: the words are added into _LANES lane sums (rows of _LANES words), whose total is
        # the sum of all and whose odd lanes hold exactly the odd positions (the same wrapping
        # sums, ~1.6x faster than two reductions)
        u = nv.view(_numpy.uint64)
        m = u.size - u.size % _LANES
        if m >= 4 * _LANES:
            acc = _numpy.add.reduce(u[:m].reshape(-1, _LANES), axis=0)
            return (_signed64(int(acc.sum()) + int(u[m:].sum())),
                    _signed64(int(acc[1::2].sum()) + int(u[m + 1::2].sum())))
        return _signed64(int(u.sum())), _signed64(int(u[1::2].sum()))
    return int(v.sum()), int(v[1::2].sum())


def _signed64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _shifts(b: int, device) -> Tensor:
    return torch.arange(0, 8, b, dtype=torch.uint8, device=device)


def _pack(codes: Tensor, b: int) -> Tensor:
    """Codes (each < 2**b, any int type) packed 8/b to a byte."""
    c = codes.reshape(-1).to(torch.uint8)
    if b == 8:
        return c
    per = 8 // b
    pad = (-c.numel()) % per
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    return (c.reshape(-1, per) << _shifts(b, c.device)).sum(1, dtype=torch.uint8)


def _unpack(packed: Tensor, b: int, n: int) -> Tensor:
    if b == 8:
        return packed[:n]
    p = packed.unsqueeze(1) >> _shifts(b, packed.device)
    return torch.bitwise_and(p, (1 << b) - 1).reshape(-1)[:n]


def low_bits(bits: Tensor, dtype: torch.dtype, b: int) -> Tensor:
    """Low ``b`` bits of the ordered image (for b <= 8 these are the low bits of v ^ (v >> shift))."""
    return torch.bitwise_and(bits ^ (bits >> _INT[dtype][1]), (1 << b) - 1)


def decode_codes(codes: Tensor, e: Tensor, est: Tensor, b: int) -> Tensor:
    """Bit patterns (int view) whose ordered low ``b`` bits are ``codes``, nearest to ``est``.

    ``e`` is ``est`` rounded to the dtype; a tie (both neighbours ``2**(b-1)`` steps away) goes
    to the side of ``e`` that ``est`` lies on.
    """
    dtype = e.dtype
    eb = int_view(e)
    eo = ordered(eb, dtype)
    m = 1 << b
    half = m >> 1
    d0 = torch.bitwise_and(codes.to(eo.dtype) - eo, m - 1)
    up = est.reshape(-1) >= upcast(e.reshape(-1), est.dtype)
    if b == 1:
        d = torch.where(up, d0, -d0)
    else:
        d = torch.where(d0 > half, d0 - m, d0)
        d = torch.where((d0 == half) & ~up, d0 - m, d)
    return ordered(eo + d, dtype)


@dataclass
class Record:
    """How to get one weight's pristine value back from its fused value."""

    dtype: torch.dtype
    shape: tuple
    items: tuple = ()  # ((key, contribution, strength), ...) the estimate is computed from
    bits: int = 0  # 0: exceptions only; b: b-bit codes + exceptions; -1: full copy
    codes: Optional[Tensor] = None
    exc_lo: Optional[Tensor] = None  # low 16 bits of the exception positions (int16)
    exc_blocks: Optional[Tensor] = None  # exceptions per block of BLOCK elements (int32)
    exc_val: Optional[Tensor] = None  # original bit patterns there
    full: Optional[Tensor] = None
    sum_w0: tuple = ()
    sum_wf: tuple = ()
    block_sums: Optional[Tensor] = None  # (blocks, 2) checksums of W0 per row block (low-rank path)
    scale: Optional[Tensor] = None  # fp8 with a scale_weight: the scale the estimate was made with
    rounding: str = "nearest"  # how the fused value was rounded (fp8: "nearest" or a stochastic mode)
    pending: bool = False  # ``full`` is a plain copy awaiting compaction (background worker)
    fault: Optional[str] = None  # why compacting this plain copy failed (it is kept as it is)

    @property
    def nbytes(self) -> int:
        """Payload bytes (the tensors it holds)."""
        return sum(t.numel() * t.element_size() for t in (
            self.codes, self.exc_lo, self.exc_blocks, self.exc_val, self.full, self.block_sums, self.scale)
            if t is not None)

    @property
    def needs_estimate(self) -> bool:
        return self.full is None

    @property
    def scheme(self) -> str:
        if self.pending:
            return "plain"
        if self.full is not None:
            return "full"
        return "sparse" if self.bits == 0 else f"{self.bits}-bit"

    @property
    def n_exceptions(self) -> int:
        return 0 if self.exc_lo is None else self.exc_lo.numel()

    def exception_positions(self) -> Tensor:
        """Flat positions (int64, ascending) of the exceptions."""
        nc, nl = _np(self.exc_blocks), _np(self.exc_lo)
        if nc is not None and nl is not None:  # numpy's repeat: ~9x faster than repeat_interleave
            # the block starts repeated, the low bits or-ed in: one int64 array allocated, not
            # three (fresh memory costs more than the arithmetic on a VM)
            starts = _numpy.arange(nc.size, dtype=_numpy.int64)
            starts *= BLOCK
            pos = _numpy.repeat(starts, nc)
            pos |= nl.view(_numpy.uint16)
            return torch.from_numpy(pos)
        counts = self.exc_blocks.to(torch.int64)
        blocks = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        return blocks * BLOCK + torch.bitwise_and(self.exc_lo.to(torch.int64), 0xFFFF)


def full_record(w0: Tensor, items=()) -> Record:
    return Record(w0.dtype, tuple(w0.shape), tuple(items), bits=-1, full=w0.detach().clone())


def plain_record(copy: Tensor, items=()) -> Record:
    """A record holding ``copy`` (the pristine weight, not cloned) until it is compacted."""
    return Record(copy.dtype, tuple(copy.shape), tuple(items), bits=-1, full=copy, pending=True)


def store_exceptions(rec: Record, idx: Tensor, values: Tensor, n: int) -> None:
    """Store the (sorted) positions ``idx`` and the original bit patterns there in ``rec``."""
    idx = idx.reshape(-1).to(torch.int64)
    nblocks = (n + BLOCK - 1) // BLOCK
    rec.exc_blocks = torch.bincount(idx >> 16, minlength=nblocks).to(torch.int32)
    rec.exc_lo = torch.bitwise_and(idx, 0xFFFF).to(torch.int32).to(torch.int16)
    rec.exc_val = values.reshape(-1).clone()


def _exceptions(rec: Record, idx: Tensor, w0b: Tensor, n: int) -> None:
    store_exceptions(rec, idx, w0b[idx.reshape(-1).to(torch.int64)], n)


def sparse_bytes(n_exc: int, n: int, item: int) -> int:
    return n_exc * (2 + item) + 4 * ((n + BLOCK - 1) // BLOCK)


def make_sparse(w0: Tensor, wf: Tensor, wrong_idx: Tensor, items=()) -> Record:
    """A sparse record from the positions where round(estimate) != w0 (already known)."""
    rec = Record(w0.dtype, tuple(w0.shape), tuple(items), bits=0)
    w0b = int_view(w0.detach())
    _exceptions(rec, wrong_idx, w0b, w0b.numel())
    rec.sum_w0 = checksum(w0b)
    rec.sum_wf = checksum(int_view(wf.detach()))
    return rec


def _price_codes(w0b: Tensor, e: Tensor, est: Tensor, dtype) -> dict:
    """Fraction of elements each code width gets wrong, on a strided sample."""
    n = w0b.numel()
    step = max(1, n // SAMPLE)
    se = e.reshape(-1)[::step]
    sest = est.reshape(-1)[::step]
    wide = {torch.int8: torch.int32, torch.int16: torch.int32, torch.int32: torch.int64}[w0b.dtype]
    sw = w0b[::step].to(wide)
    se_b = int_view(se.contiguous()).to(wide)
    _, shift, mask = _INT[dtype]
    err = (sw ^ ((sw >> shift) & mask)) - (se_b ^ ((se_b >> shift) & mask))
    up = sest >= se.to(sest.dtype)
    mag = err.abs()
    wrong_side = (err > 0) != up
    k = max(1, sw.numel())
    out = {}
    for b in bits_choices(dtype):
        half = 1 << (b - 1)
        misses = int(((mag > half) | ((mag == half) & wrong_side)).sum())
        out[b] = misses / k
    return out


def encode(w0: Tensor, wf: Tensor, est: Tensor, items=(), wrong_idx: Optional[Tensor] = None,
           sparse_budget: float = 0.125) -> Record:
    """The smallest exact record of ``w0`` given the fused ``wf`` and the estimate ``est``.

    ``est`` must be exactly what the restore will compute from ``wf`` (``contrib.estimate``).
    ``wrong_idx``: the positions where ``round(est) != w0``, when the caller already has them.
    ``sparse_budget``: keep the (cheapest to make) sparse form while it is under this share
    of the weight's bytes, even if a code would be smaller.
    """
    dtype = w0.dtype
    n = w0.numel()
    item = w0.element_size()
    full_bytes = n * item
    if dtype not in _INT or n == 0:
        return full_record(w0, items)
    w0b = int_view(w0.detach())
    est = est.reshape(-1)
    e = est.to(dtype)
    if wrong_idx is None:
        wrong_idx = diff_positions(w0b, int_view(e))
    best_bits, best_size = 0, sparse_bytes(wrong_idx.numel(), n, item)
    if best_size > max((n + 7) // 8, sparse_budget * full_bytes):  # price the code widths
        for b, frac in _price_codes(w0b, e, est, dtype).items():
            size = (n * b + 7) // 8 + sparse_bytes(int(frac * n), n, item)
            if size < best_size:
                best_bits, best_size = b, size
    if best_size >= full_bytes:
        return full_record(w0, items)
    if best_bits == 0:
        rec = make_sparse(w0, wf, wrong_idx, items)
    else:
        rec = Record(dtype, tuple(w0.shape), tuple(items), bits=best_bits)
        rec.codes = _pack(low_bits(w0b, dtype, best_bits), best_bits)
        # the exceptions are what the decoder really gets wrong, found by running it
        decoded = decode_codes(_unpack(rec.codes, best_bits, n), e, est, best_bits)
        _exceptions(rec, diff_positions(decoded, w0b), w0b, n)
        rec.sum_w0 = checksum(w0b)
        rec.sum_wf = checksum(int_view(wf.detach()))
    if rec.nbytes >= full_bytes:
        return full_record(w0, items)
    return rec


class RestoreError(RuntimeError):
    """A record did not give back the weight it recorded (the weight was changed meanwhile)."""


def check_fused(rec: Record, wf: Tensor, what: str) -> None:
    if rec.full is None and checksum(int_view(wf.detach())) != rec.sum_wf:
        raise RestoreError(f"{what}: the patched weight was changed by something else since it was patched; "
                           "its pristine value cannot be recovered exactly")


def finish(rec: Record, out: Tensor, what: str = "weight") -> Tensor:
    """Patch the exceptions into ``out`` (the decoded weight, dtype) and verify it."""
    bits = int_view(out)
    if rec.n_exceptions:
        bits[rec.exception_positions().to(bits.device)] = rec.exc_val.to(bits.device)
    if checksum(bits) != rec.sum_w0:
        raise RestoreError(f"{what}: restoring did not reproduce the pristine weight (checksum mismatch)")
    return out.reshape(rec.shape)


def decode(rec: Record, est: Optional[Tensor], what: str = "weight") -> Tensor:
    """The pristine weight (a new tensor of ``rec.dtype``, on ``est``'s device)."""
    if rec.full is not None:
        return rec.full.clone()
    est = est.reshape(-1)
    e = est.to(rec.dtype)
    if rec.bits == 0:
        out = e if e.data_ptr() != est.data_ptr() else e.clone()
    else:
        codes = _unpack(rec.codes.to(est.device), rec.bits, est.numel())
        out = decode_codes(codes, e, est, rec.bits).view(rec.dtype)
    return finish(rec, out, what)
