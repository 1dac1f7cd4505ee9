"""Fusing one weight, and getting its pristine value back (with ``record``).

``refuse(param, record, items)`` moves a weight from its current state (pristine, or fused
with ``record``) to ``round(W0 + sum s*delta)`` over ``items`` (W0 when empty) and returns the
new restore record; ``restore_weight(record, wf)`` returns ``W0`` as a new tensor.

The common case, every item low-rank (LoRA/LoCon), runs in row blocks of ~512K elements:
per block one GEMM per delta and a handful of elementwise steps whose temporaries stay in
cache, so the weight itself is read and written about once, even for a switch (decode the
old fusion, fuse the new one, in the same pass). Each block's W0 is checked against a
checksum kept per block before anything is built on it, and a failure midway puts back the
blocks already written. Everything else (LoHa, LoKr, DoRA, OFT, IA3, GLoRA, full, norms)
takes the plain path: fp32 deltas of the whole weight. Which path a record uses is a
function of its items, so a restore recomputes the estimate exactly the way it was made.
fp8 weights (``float8_e4m3fn`` / ``float8_e5m2``, optionally scaled) take ``fp8``'s
whole-weight path: dequantise, fp32 maths, one rounding (nearest or ComfyUI's stochastic).
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Optional

import torch

try:
    import numpy as _numpy
except ImportError:  # pragma: no cover
    _numpy = None

from ..errors import AdapterError
from . import fp8
from .contrib import delta_sum, estimate
from .record import (Record, bits_choices, plain_record, RestoreError, check_fused, checksum, compact_dtype, decode,
                     diff_scratch, encode, full_record, gather_diff, int_view, ordered_diff, same_bits, scatter, _np,
                     sparse_bytes, store_exceptions as _store_exceptions)

Tensor = torch.Tensor
CHUNK = 1 << 19  # elements per row block of the low-rank path (fp32 temporaries stay in L3; 2x 1 << 18
# measured 3-8 % faster for apply, switch and remove, 1 << 17 slower: fewer per-block calls)
FP32_MAX = float(torch.finfo(torch.float32).max)
# Sparse records need no second pass over the weight: kept while they stay under this share
# of the weight's bytes, even when a code would be a little smaller.
SPARSE_BUDGET = 0.125


# --- the low-rank path ---------------------------------------------------------------------
def lowrank_plan(items, shape: tuple, device, arena=None, tag: str = "") -> Optional[list]:
    """[(up * s * scale, down)] (fp32, 2-D) when every item is a plain low-rank one, else None.

    ``arena`` (CPU): the scaled ``up`` factors are written into its buffers ``tag`` + item
    index (the same values; valid until the arena is handed back) instead of fresh memory."""
    if len(shape) < 2 or not items:
        return None
    plan = []
    for n, (_, c, s) in enumerate(items):
        if c.weight_dependent:
            return None
        lr = c.lowrank_stored(tuple(shape))  # the file's factors (fp16 / bf16 / fp32), not widened
        if lr is None:
            return None
        up, down, scale = lr
        k = float(s) * scale
        if arena is not None and up.device == torch.device(device):
            up_s = arena.get(f"{tag}{n}", up.numel(), torch.float32, device, up.shape)
            if up.dtype == torch.float32:
                torch.mul(up, k, out=up_s)
            else:  # widened exactly, then scaled in fp32: the values of up.float() * k
                up_s.copy_(up).mul_(k)
            if down.dtype != torch.float32:
                down = arena.get(f"{tag}{n}d", down.numel(), torch.float32, device, down.shape).copy_(down)
            plan.append((up_s, down))
        else:
            plan.append((torch.mul(up.to(device=device, dtype=torch.float32), k),
                         down.to(device=device, dtype=torch.float32)))
    return plan


def check_plan(plan, items) -> None:
    """Every factor finite and the delta bounded below fp32's max (so the sum cannot overflow)."""
    total = 0.0
    for (up, down), (_, c, _) in zip(plan, items):
        bound = float((up.abs().amax(0) * down.abs().amax(1)).sum())
        if not math.isfinite(bound) or bound > FP32_MAX / 4:
            raise AdapterError(f"{c.name}: the delta of {c.target.component}:{c.target.module} is not finite "
                               "(NaN or Inf) or overflows fp32")
        total += bound
    if total > FP32_MAX / 4:
        raise AdapterError(f"the deltas of {items[0][1].target.module} overflow fp32")


def _blocks(out: int, k: int):
    rows = max(1, CHUNK // max(1, k))
    for i in range(0, out, rows):
        yield i, min(out, i + rows)


class _Arena:
    """Named byte buffers that outlive a pass (CPU): block buffers, the mask, scaled plan factors.

    One arena per move holds what the move's passes need, allocated once: fresh memory can cost
    more than the arithmetic done in it (pages faulted in and zeroed by the kernel: on the
    benchmark VM ~3.5 us per 4 KB page, ~0.85 ns per byte). ``_arena`` can also pool arenas
    across passes (``ARENAS_KEPT``, off by default: see there). Buffers only grow; an arena
    holding more than ``ARENA_MAX_BYTES`` is not pooled."""

    __slots__ = ("bufs",)

    def __init__(self):
        self.bufs: dict = {}

    def get(self, name: str, n: int, dtype, device, shape=None) -> Tensor:
        """``n`` elements of ``dtype`` (contents undefined), as ``shape`` when given."""
        nbytes = n * _ITEMSIZE.get(dtype, 0) or n * torch.empty(0, dtype=dtype).element_size()
        b = self.bufs.get(name)
        if b is None or b.numel() < nbytes or b.device != torch.device(device):
            b = torch.empty(max(nbytes, 64), dtype=torch.uint8, device=device)
            self.bufs[name] = b
        t = b[:nbytes].view(dtype)
        return t if shape is None else t.view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.bufs.values())


_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8, torch.int16: 2,
             torch.int32: 4, torch.int64: 8, torch.uint8: 1, torch.int8: 1, torch.bool: 1}
_ARENAS: list = []
_ARENA_LOCK = threading.Lock()
# Arenas pooled at most (one per thread running a pass: caller, workers, compactor). 0 on CPU by
# default, measured: pooled block buffers leave glibc's heap laid out so that more of the freed
# plain copies go back to the kernel, and the next switch faults them in again (SD1.5 fp16, one
# thread: 43-48K page faults per switch against 16-19K, 0.91-0.92 s against 0.88-0.89 s median)
ARENAS_KEPT = 0
ARENA_MAX_BYTES = 64 << 20  # an arena grown beyond this (a very wide weight) is dropped after use


@contextmanager
def _arena(device):
    """An arena from the pool for one pass on ``device`` (a fresh one off the CPU: CUDA's
    caching allocator already reuses memory)."""
    if torch.device(device).type != "cpu":
        yield _Arena()
        return
    with _ARENA_LOCK:
        a = _ARENAS.pop() if _ARENAS else None
    if a is None:
        a = _Arena()
    try:
        yield a
    finally:
        if a.nbytes <= ARENA_MAX_BYTES:
            with _ARENA_LOCK:
                if len(_ARENAS) < ARENAS_KEPT:
                    _ARENAS.append(a)


class _Scratch:
    """Block-sized buffers reused by every block of a pass (carved from an ``_Arena``)."""

    def __init__(self, rows: int, k: int, dtype, device, arena: Optional[_Arena] = None):
        n = rows * k
        self.k = k
        a = arena if arena is not None else _Arena()
        self.d = a.get("d", n, torch.float32, device)  # the block's delta
        self.f = a.get("f", n, torch.float32, device)  # fp32 working copy
        self.t = a.get("t", n, dtype, device)  # the fused block
        self.e = a.get("e", n, dtype, device)  # round(estimate)
        self.w = a.get("w", n, dtype, device)  # W0 decoded from an old fusion
        # where round(estimate) != W0 (a numpy bool buffer for gather_diff; None off the CPU)
        self.mask = a.get("mask", n, torch.bool, device).numpy() if diff_scratch(0, device) is not None else None

    def view(self, name: str, rows: int) -> Tensor:
        return getattr(self, name)[:rows * self.k].view(rows, self.k)


# (device type, M, N, K, threads) -> whether ``c.addmm_(a, b)`` gives the bits of ``c + a @ b``
# (``mm`` then ``add``) for that GEMM shape: the fast pass then adds W0 in the GEMM's epilogue
# instead of in a pass of its own (~20 % of a block's time). The answer depends on the shape: on
# this machine's MKL, GEMMs of up to ~11 rows (or a few columns) sum in another order when C is
# an input, larger ones do not. Found once per shape and process by ``_addmm_exact``; where it
# says no, the delta is computed first and added, as before. (Restores never depend on it: the
# record is compacted against the pristine copy.)
_ADDMM_OK: dict = {}
ADDMM_FUSE = True  # False: never (the separate add)


def _addmm_exact(m: int, n: int, rank: int, device, alpha: float = 1.0) -> bool:
    """Whether ``c.addmm_(up, down, alpha=alpha)`` equals ``c + mm(up, down)`` (``alpha`` 1) or
    ``c - mm(up, down)`` (``alpha`` -1) bit for bit for an (``m`` x ``rank``) @ (``rank`` x ``n``)
    GEMM, tried once on values whose every sum rounds (an order of summation that differs shows
    in most elements)."""
    if not ADDMM_FUSE:
        return False
    dev = torch.device(device)
    key = (dev.type, int(m), int(n), int(rank), torch.get_num_threads(), alpha)
    ok = _ADDMM_OK.get(key)
    if ok is None:
        g = torch.Generator().manual_seed(1000 + int(rank))
        up = torch.randn(m, rank, generator=g).to(dev)
        down = torch.randn(rank, n, generator=g).to(dev)
        # C: fractions spread over [-2, 2) (cheaper than randn for a block-sized matrix)
        c = torch.arange(m * n, dtype=torch.float32, device=dev).mul_(0.6180339887).frac_().sub_(0.5).mul_(4.0)
        c = c.view(m, n)
        ref = c.clone().sub_(torch.mm(up, down)) if alpha == -1.0 else torch.mm(up, down).add_(c)
        got = c.addmm_(up, down, alpha=alpha)
        ok = bool(torch.equal(ref.view(torch.int32), got.view(torch.int32)))
        _ADDMM_OK[key] = ok
    return ok


def _fused_block(plan, i: int, j: int, w0b: Tensor, d: Tensor, one_gemm: bool, exact: Optional[bool] = None) -> Tensor:
    """``float(W0) + D`` for one block, in the fp32 buffer ``d`` (rounded by the caller's copy).

    ``one_gemm`` (a single-item plan) and ``_addmm_exact`` holds for this block's GEMM: W0
    widened into ``d`` and the delta's GEMM adds to it; otherwise the delta first, then W0
    added. The same bits. ``exact``: ``_addmm_exact`` for this block's GEMM, when the caller
    already knows it."""
    if one_gemm and (exact if exact is not None else _addmm_exact(j - i, d.shape[1], plan[0][0].shape[1], d.device)):
        d.copy_(w0b)
        up, down = plan[0]
        return d.addmm_(up[i:j], down)
    d = _block_delta(plan, i, j, d)
    return d.add_(w0b)


def _decode_block(exc, t: int, plan_old, i: int, j: int, wf_blk: Tensor, d: Tensor, dec: Tensor, f: Tensor,
                  flat: Optional[Tensor], fast: Optional[bool] = None) -> Optional[Tensor]:
    """W0 of row block ``t`` (rows ``i:j``) from its fused ``wf_blk``: the estimate rounded into
    ``dec`` (the weight's dtype), the record's exceptions put back, the block checksum checked.
    Returns ``dec``, or None when the checksum does not match.

    ``flat``: the flat int view the exceptions go to at their weight positions (the whole plain
    copy ``dec`` is a slice of), or None (``dec`` itself, positions less ``i * k``). ``d``, ``f``:
    fp32 block buffers. With a one-item plan on a 16-bit weight, where ``_addmm_exact`` holds,
    the estimate ``float(Wf) - D`` is one GEMM with the subtraction in its epilogue (the bits
    of ``_block_estimate``); should the checksum fail that way, the block is decoded again the
    plain way before anything is called wrong. ``fast``: whether that one-GEMM estimate applies,
    when the caller already knows it."""
    k = f.shape[1]
    if fast is None:
        fast = _decode_fast(plan_old, j - i, k, wf_blk.dtype, f.device)
    for one_gemm in ((True, False) if fast else (False,)):
        if one_gemm:
            f.copy_(wf_blk)
            up, down = plan_old[0]
            f.addmm_(up[i:j], down, alpha=-1.0)
            w0b = dec.copy_(f)
        else:
            w0b = _block_estimate(wf_blk, _block_delta(plan_old, i, j, d), dec, f)
        if flat is None:
            exc.put(t, int_view(w0b), i * k)
        else:
            exc.put(t, flat, 0)
        if checksum(int_view(w0b)) == exc.sums[t]:
            return w0b
    return None


def _decode_fast(plan_old, rows: int, k: int, dtype, device) -> bool:
    return (len(plan_old) == 1 and dtype != torch.float32
            and _addmm_exact(rows, k, plan_old[0][0].shape[1], device, -1.0))


def _block_delta(plan, i: int, j: int, out: Optional[Tensor] = None) -> Tensor:
    up, down = plan[0]
    d = torch.mm(up[i:j], down, out=out) if out is not None else torch.mm(up[i:j], down)
    for up, down in plan[1:]:
        d.addmm_(up[i:j], down)
    return d


def _block_estimate(wf_blk: Tensor, d: Tensor, out: Optional[Tensor] = None, buf: Optional[Tensor] = None) -> Tensor:
    """``wf - D`` for one block: fp32 (fp64 for an fp32 weight, so the subtraction adds no rounding).

    With ``out`` (the weight's dtype) the estimate is written there rounded, through the fp32
    ``buf``; the values are the same as ``_block_estimate(wf, d).to(dtype)``.
    """
    if wf_blk.dtype == torch.float32:
        est = wf_blk.double().sub_(d.double())
        return est if out is None else out.copy_(est)
    if out is None:
        return wf_blk.float().sub_(d)
    buf.copy_(wf_blk)  # (two vectorised passes: faster than one mixed-dtype torch.sub)
    buf.sub_(d)
    return out.copy_(buf)


def _block_fuse(w0_blk: Tensor, d: Tensor, out: Optional[Tensor] = None, buf: Optional[Tensor] = None) -> Tensor:
    """``round(W0 + D)`` for one block, in W0's dtype (the one rounding of the whole scheme)."""
    if w0_blk.dtype == torch.float32:
        return torch.add(w0_blk, d) if out is None else torch.add(w0_blk, d, out=out)
    if out is None:
        return w0_blk.float().add_(d).to(w0_blk.dtype)
    buf.copy_(w0_blk)
    buf.add_(d)
    return out.copy_(buf)


def _is_block_record(rec) -> bool:
    return rec is not None and rec.block_sums is not None


class _OldExceptions:
    """The exceptions of a block record, split by the row blocks of a pass (numpy on the CPU:
    one fancy-index assignment per block, no tensor arithmetic)."""

    def __init__(self, rec, blocks, k: int, n: int, device):
        self.pos = rec.exception_positions().to(device)
        self.vals = rec.exc_val.to(device)
        starts = [i * k for i, _ in blocks] + [n]
        self.pn, self.vn = _np(self.pos), _np(self.vals)
        if self.pn is not None and self.vn is not None:
            self.bounds = _numpy.searchsorted(self.pn, starts).tolist()
        else:
            self.pn = None
            self.bounds = torch.searchsorted(self.pos, torch.tensor(starts, dtype=torch.int64,
                                                                    device=self.pos.device)).tolist()
        self.sums = [tuple(x) for x in rec.block_sums.tolist()]

    def put(self, t: int, flat_int: Tensor, offset: int) -> None:
        """Write block ``t``'s exceptions into ``flat_int`` (an int view; flat position ``p``
        of the weight at ``p - offset``)."""
        lo, hi = self.bounds[t], self.bounds[t + 1]
        if hi <= lo:
            return
        fn = _np(flat_int) if self.pn is not None else None
        if fn is not None:
            fn[self.pn[lo:hi] - offset if offset else self.pn[lo:hi]] = self.vn[lo:hi]
        else:
            scatter(flat_int, self.pos[lo:hi] - offset, self.vals[lo:hi])


def _lowrank_pass(dst: Tensor, *, src: Optional[Tensor] = None, w0: Optional[Tensor] = None, old=None,
                  plan=None, items=()):
    with _arena(dst.device) as arena:
        return _lowrank_pass_in(arena, dst, src=src, w0=w0, old=old, plan=plan, items=items)


def _lowrank_pass_in(arena, dst: Tensor, *, src: Optional[Tensor] = None, w0: Optional[Tensor] = None, old=None,
                     plan=None, items=()):
    """One pass over the row blocks of a weight; returns (new record or None, dst changed).

    The pristine block comes from ``w0`` (may be ``dst`` itself), or, with ``old = (record,
    plan)``, is decoded from the fused ``src`` (default ``dst``) and checked against the
    record's block checksum. With ``plan`` the block is fused and recorded; without, W0 is
    written. ``dst`` is written only where its bits change, and if anything fails the blocks
    already written are put back (``dst`` a fresh buffer: written throughout, never undone).
    """
    dtype = dst.dtype
    out = dst.shape[0]
    k = dst.numel() // out
    n = dst.numel()
    d2 = dst.detach().view(out, k)
    s2 = d2 if src is None else src.detach().reshape(out, k)
    fresh = src is not None and src.data_ptr() != dst.data_ptr()
    in_place = w0 is not None and w0.data_ptr() == dst.data_ptr()
    w2 = None if w0 is None else w0.detach().reshape(out, k)
    blocks = list(_blocks(out, k))
    sc = _Scratch(blocks[0][1] - blocks[0][0], k, dtype, dst.device, arena)
    if old is not None:
        rec_old, plan_old = old
        exc_old = _OldExceptions(rec_old, blocks, k, n, dst.device)
    new_exc = {}  # block -> (local positions, original bits) of the new record's exceptions
    sums = []
    written = []
    changed = differs = False
    try:
        for t, (i, j) in enumerate(blocks):
            r = j - i
            d, f = sc.view("d", r), sc.view("f", r)
            if old is not None:
                w0b = _decode_block(exc_old, t, plan_old, i, j, s2[i:j], d, sc.view("w", r), f, None)
                if w0b is None:
                    raise RestoreError("restoring did not reproduce the pristine weight (block checksum mismatch)")
            else:
                w0b = w2[i:j]
            if plan is None:
                target = w0b
            else:
                d = _block_delta(plan, i, j, d)
                target = _block_fuse(w0b, d, sc.view("t", r), f)
                w0i = int_view(w0b)
                est = _block_estimate(target, d, sc.view("e", r), f)
                bad, vals = gather_diff(w0i, int_view(est), None if sc.mask is None else sc.mask[:r * k])
                if bad.numel():
                    new_exc[t] = (bad, vals)
                sums.append(checksum(w0i))
                if not differs:  # whether the fusion changes anything at all, told by the first change
                    differs = not same_bits(target, w0b)
                    if in_place and not differs:
                        continue  # an unchanged block of a pristine weight: nothing to write
            d2[i:j].copy_(target)
            changed = True
            if not fresh:
                written.append(t)
        if plan is None or not differs:
            return None, changed
        return _finish_lowrank(dst, dtype, plan, items, blocks, k, new_exc, sums), changed
    except BaseException:
        _undo(d2, blocks, written, k, plan, new_exc, old)
        raise


def _undo(d2, blocks, written, k, plan, new_exc, old) -> None:
    """Put back the blocks this pass overwrote: their W0 again (from the new estimate and
    exceptions), then the old fusion of it."""
    for t in written:
        i, j = blocks[t]
        cur = d2[i:j]
        if plan is None:
            w0b = cur.clone()
        else:
            w0b = _block_estimate(cur, _block_delta(plan, i, j)).to(cur.dtype)
            if t in new_exc:
                scatter(int_view(w0b), *new_exc[t])
        d2[i:j] = _block_fuse(w0b, _block_delta(old[1], i, j)) if old is not None else w0b


def _finish_lowrank(dst, dtype, plan, items, blocks, k, new_exc, sums):
    """The record of a low-rank fuse, from what the block pass gathered."""
    n = dst.numel()
    item = dst.element_size()
    order = sorted(new_exc)
    idx = torch.cat([new_exc[t][0] + blocks[t][0] * k for t in order]) if order else \
        torch.zeros(0, dtype=torch.int64, device=dst.device)
    vals = torch.cat([new_exc[t][1] for t in order]) if order else idx.new_zeros(0).to(int_view(dst).dtype)
    best_bits, best = 0, sparse_bytes(idx.numel(), n, item)
    est = None
    if order and best > SPARSE_BUDGET * n * item:
        # price the code widths exactly: how far round(est) is off at the exceptions, and on
        # which side est lies (the estimate again, from the fused weight now in dst)
        est = _lowrank_estimate(plan, dst).reshape(-1)
        e_at = int_view(est[idx].to(dtype))
        err = ordered_diff(vals, e_at, dtype)
        up = est[idx] >= e_at.view(dtype).to(est.dtype)
        mag, wrong_side = err.abs(), (err > 0) != up
        for b in bits_choices(dtype):
            half = 1 << (b - 1)
            misses = int(((mag > half) | ((mag == half) & wrong_side)).sum())
            size = (n * b + 7) // 8 + sparse_bytes(misses, n, item)
            if size < best:
                best_bits, best = b, size
    if best_bits == 0 and best < n * item:
        rec = Record(dtype, tuple(dst.shape), tuple(items), bits=0)
        _store_exceptions(rec, idx, vals, n)
        rec.block_sums = torch.tensor(sums, dtype=torch.int64)
        rec.sum_wf = checksum(int_view(dst.detach()))
        return rec
    # a code (or a full copy) is smaller: W0 again from the estimate and the exceptions,
    # then the general encoder
    if est is None:
        est = _lowrank_estimate(plan, dst).reshape(-1)
    w0_again = est.to(dtype)
    if idx.numel():
        scatter(int_view(w0_again), idx, vals)
    return encode(w0_again.reshape(dst.shape), dst, est, items, wrong_idx=idx)


def _lowrank_estimate(plan, wf: Tensor) -> Tensor:
    out = wf.shape[0]
    k = wf.numel() // out
    wf_2d = wf.detach().reshape(out, k)
    est = torch.empty((out, k), dtype=torch.float64 if wf.dtype == torch.float32 else torch.float32,
                      device=wf.device)
    for i, j in _blocks(out, k):
        est[i:j] = _block_estimate(wf_2d[i:j], _block_delta(plan, i, j))
    return est


# --- the deferred-record path (background compaction) ---------------------------------------
def _plain_pass(dst: Tensor, plan, *, w0: Optional[Tensor] = None, old=None, keep: Optional[Tensor] = None,
                prev_plan=None, what: str = "weight", arena: Optional[_Arena] = None) -> None:
    """Write ``round(W0 + D)`` over ``plan`` (W0 itself when ``plan`` is None) into ``dst`` and build
    no record: the fast half of an apply or switch whose record is compacted later.

    W0 per row block comes from ``w0`` (``dst`` itself when it is pristine, or a plain copy) or
    is decoded from ``dst`` with ``old = (compact record, its plan)`` (block checksums checked).
    ``keep``: a buffer (``dst``'s shape and dtype, host memory) that receives W0, block by block,
    before the block is overwritten; on CUDA the copy is asynchronous (pinned ``keep``), ordered
    before the write by the stream. ``prev_plan``: the fusion ``dst`` holds when ``w0`` is a plain
    copy (None: ``dst`` is pristine), to put written blocks back if the pass fails.

    The fused bits are those of ``_lowrank_pass`` (``float(W0) + D``, one rounding). ``arena``:
    where the block buffers come from (default: one from the pool for this pass).
    """
    if arena is None:
        with _arena(dst.device) as a:
            return _plain_pass(dst, plan, w0=w0, old=old, keep=keep, prev_plan=prev_plan, what=what, arena=a)
    out = dst.shape[0]
    k = dst.numel() // out
    n = dst.numel()
    d2 = dst.detach().view(out, k)
    w2 = None if w0 is None else w0.detach().reshape(out, k)
    k2 = None if keep is None else keep.view(out, k)
    if k2 is not None and w2 is not None and w2.data_ptr() == k2.data_ptr():
        k2 = None  # already a copy
    blocks = list(_blocks(out, k))
    rows0 = blocks[0][1] - blocks[0][0]
    device = dst.device
    dbuf = arena.get("d", rows0 * k, torch.float32, device)
    if old is not None:
        rec_old, plan_old = old
        wbuf = arena.get("w", rows0 * k, dst.dtype, device)
        fbuf = arena.get("f", rows0 * k, torch.float32, device)
        exc_old = _OldExceptions(rec_old, blocks, k, n, device)
        fast = {}  # rows -> whether the one-GEMM estimate applies (_decode_fast)
    cuda = device.type == "cuda"
    one_gemm = plan is not None and len(plan) == 1
    host_dec = old is not None and k2 is not None and not cuda  # decoded straight into the copy
    kflat = int_view(keep) if host_dec else None
    up_buf = []

    def wbuf_for(r):  # a device buffer for one block of a host copy
        if not up_buf:
            up_buf.append(arena.get("t", rows0 * k, dst.dtype, device))
        return up_buf[0][:r * k].view(r, k)

    exact = {}  # rows -> _addmm_exact of the fusing GEMM
    rank = plan[0][0].shape[1] if one_gemm else 0

    written = []
    try:
        for t, (i, j) in enumerate(blocks):
            r = j - i
            d = dbuf[:r * k].view(r, k)
            if old is not None:  # decoded straight into the plain copy where it lives on this device
                dec = k2[i:j] if host_dec else wbuf[:r * k].view(r, k)
                fa = fast.get(r)
                if fa is None:
                    fa = fast[r] = _decode_fast(plan_old, r, k, dst.dtype, device)
                w0b = _decode_block(exc_old, t, plan_old, i, j, d2[i:j], d, dec, fbuf[:r * k].view(r, k), kflat, fa)
                if w0b is None:
                    raise RestoreError(f"{what}: restoring did not reproduce the pristine weight (block checksum "
                                       "mismatch): the patched weight was changed by something else since it was "
                                       "patched")
            else:
                w0b = w2[i:j]
                if w0b.device != device:  # a plain copy in host memory (pinned), the weight on the GPU
                    w0b = wbuf_for(r).copy_(w0b, non_blocking=True)
            if k2 is not None and w0b.data_ptr() != k2[i:j].data_ptr():
                k2[i:j].copy_(w0b, non_blocking=cuda)
            if plan is None:
                written.append(t)
                d2[i:j].copy_(w0b)
                continue
            ex = exact.get(r)
            if ex is None and one_gemm:
                ex = exact[r] = _addmm_exact(r, k, rank, device)
            d = _fused_block(plan, i, j, w0b, d, one_gemm, ex)  # float(W0) + D: the sum of _block_fuse
            written.append(t)
            d2[i:j].copy_(d)  # (the one rounding)
    except BaseException:
        src = k2 if k2 is not None else w2
        for t in written:  # put back what this pass overwrote
            i, j = blocks[t]
            w0b = src[i:j].to(device)
            undo = old[1] if old is not None else prev_plan
            d2[i:j] = _block_fuse(w0b, _block_delta(undo, i, j)) if undo is not None else w0b
        raise


def plain_fuse(param: Tensor, rec, items: tuple, keep, what: str = "weight"):
    """The fast path of ``refuse``: the fusion of low-rank ``items`` written, the pristine weight
    kept as a plain copy (a pending record, compacted later by ``compact``). Returns (record,
    True), or None when this move does not take the fast path (the caller does it the usual way).

    ``keep(param)`` gives a buffer for the copy, or None (the buffer bound is reached).
    """
    if fp8.is_fp8(param.dtype) or not compact_dtype(param.dtype) or not items:
        return None
    with _arena(param.device) as arena:  # the plans' scaled factors and the pass's block buffers
        return _plain_fuse_in(arena, param, rec, items, keep, what)


def _plain_fuse_in(arena, param: Tensor, rec, items: tuple, keep, what: str):
    shape = tuple(param.shape)
    if rec is not None and rec.pending:
        old_plan = lowrank_plan(rec.items, shape, param.device, arena, "old")
        if old_plan is None:
            return None
        plan = _plan_for(items, param, arena)
        if plan is None:
            return None
        _plain_pass(param, plan, w0=rec.full, prev_plan=old_plan, arena=arena)
        return plain_record(rec.full, items), True
    old_plan = None
    if rec is not None:
        old_plan = lowrank_plan(rec.items, shape, param.device, arena, "old")
        if old_plan is None:  # the weight holds a fusion the fast pass could not put back on failure
            return None
    plan = _plan_for(items, param, arena)
    if plan is None:
        return None
    buf = keep(param)
    if buf is None:
        return None
    if rec is None:
        _plain_pass(param, plan, w0=param, keep=buf, arena=arena)
    elif _is_block_record(rec):  # decoded block by block, each checked against its checksum
        _plain_pass(param, plan, old=(rec, old_plan), keep=buf, what=what, arena=arena)
    else:  # a code or full record: decoded whole (and checked), then the same pass from the copy
        buf.copy_(restore_weight(rec, param, what))
        _plain_pass(param, plan, w0=buf, prev_plan=old_plan, arena=arena)
    return plain_record(buf, items), True


def plain_restore(param: Tensor, rec) -> None:
    """Put the plain copy of a pending record back (block by block; undone on failure)."""
    _plain_pass(param, None, w0=rec.full, prev_plan=lowrank_plan(rec.items, tuple(param.shape), param.device))


def compact(rec, wf: Tensor, *, alive=None, hook=None):
    """The small exact record of the pending record ``rec`` (its plain copy ``rec.full``, the
    fusion of ``rec.items``), given the fused weight ``wf``. Only reads ``wf`` and the copy.

    ``alive()`` is asked before every row block; False stops the work (returns None): the
    weight is being moved, what was read may be torn and the result would be stale.
    ``hook(block)`` is called before every block (tests pause or fail the worker there).
    On CUDA the copy's blocks go up (pinned, asynchronously), the estimate and the
    exceptions are computed on the device, and only the exceptions come back.
    """
    p = rec.full
    dtype = wf.dtype
    out = wf.shape[0]
    k = wf.numel() // out
    wf2 = wf.detach().reshape(out, k)
    p2 = p.reshape(out, k)
    blocks = list(_blocks(out, k))
    with _arena(wf.device) as arena:
        plan = lowrank_plan(rec.items, tuple(wf.shape), wf.device, arena, "c")
        if plan is None:
            raise RestoreError("a pending plain copy of a weight without a low-rank plan")
        new_exc, sums = _compact_blocks(arena, plan, wf2, p2, blocks, k, dtype, alive, hook)
        if new_exc is None:
            return None
        new = _finish_lowrank(wf, dtype, plan, rec.items, blocks, k, new_exc, sums)
    if new.full is not None:
        new.full = p  # encode found a full copy smallest: the plain copy is that copy (host memory)
    for name in ("codes", "exc_lo", "exc_blocks", "exc_val", "block_sums"):  # records live in host memory
        t = getattr(new, name)
        if t is not None and t.device != p.device:
            setattr(new, name, t.to(p.device))
    return new


def _compact_blocks(arena, plan, wf2, p2, blocks, k, dtype, alive, hook):
    """The exceptions and block checksums of ``compact`` ((None, None): stopped)."""
    sc = _Scratch(blocks[0][1] - blocks[0][0], k, dtype, wf2.device, arena)
    on_host = p2.device == wf2.device
    new_exc, sums = {}, []
    for t, (i, j) in enumerate(blocks):
        if alive is not None and not alive():
            return None, None
        if hook is not None:
            hook(t)
        r = j - i
        w0b = p2[i:j] if on_host else sc.view("w", r).copy_(p2[i:j], non_blocking=True)
        d = _block_delta(plan, i, j, sc.view("d", r))
        est = _block_estimate(wf2[i:j], d, sc.view("e", r), sc.view("f", r))
        w0i = int_view(w0b)
        bad, vals = gather_diff(w0i, int_view(est), None if sc.mask is None else sc.mask[:r * k])
        if bad.numel():
            new_exc[t] = (bad, vals)
        sums.append(checksum(w0i))
    if alive is not None and not alive():
        return None, None
    return new_exc, sums


# --- public --------------------------------------------------------------------------------
def _plan_for(items, w: Tensor, arena=None):
    plan = lowrank_plan(items, tuple(w.shape), w.device, arena, "new") if compact_dtype(w.dtype) else None
    if plan is not None:
        check_plan(plan, items)
    return plan


def refuse(param: Tensor, rec, items: tuple, what: str = "weight", *, rounding=None, scale=None, keep=None):
    """Move ``param`` from its current state (``rec``: its record, None if pristine) to the
    fusion of ``items`` (W0 when empty); returns (new record or None, param changed).

    fp8 weights go to ``fp8.refuse`` (``rounding``: None for round-to-nearest or (mode, key);
    ``scale``: the weight's ``scale_weight``). On failure ``param`` is left as it was.
    ``keep``: the deferred-record fast path (``plain_fuse``) is taken where it applies;
    ``keep(param)`` gives a buffer for the plain copy, or None when the bound is reached.
    """
    if keep is not None:
        done = plain_fuse(param, rec, items, keep, what)
        if done is not None:
            return done
    if fp8.is_fp8(param.dtype):
        return fp8.refuse(param, rec, items, what, rounding=rounding, scale=scale)
    if rec is None:
        if not items:
            return None, False
        with _arena(param.device) as arena:  # (the plan's factors live there for this move)
            plan = _plan_for(items, param, arena)
            if plan is not None:
                return _lowrank_pass(param, w0=param, plan=plan, items=items)
        return _fuse_generic(param, param.detach(), items)
    if _is_block_record(rec):
        with _arena(param.device) as arena:
            old_plan = lowrank_plan(rec.items, tuple(param.shape), param.device, arena, "old")
            plan = _plan_for(items, param, arena) if items else None
            if old_plan is not None and (plan is not None or not items):
                check_fused(rec, param, what)
                return _lowrank_pass(param, old=(rec, old_plan), plan=plan, items=items)
    plan = _plan_for(items, param) if items else None
    if rec.pending and not items:  # a plain copy: put it back
        plain_restore(param, rec)
        return None, True
    # mixed or generic: the pristine weight as a tensor first, then the new state
    w0 = restore_weight(rec, param, what)
    if not items:
        param.detach().copy_(w0)
        return None, True
    if plan is not None:
        buf = torch.empty_like(param.detach())
        new, _ = _lowrank_pass(buf, src=buf, w0=w0, plan=plan, items=items)
        param.detach().copy_(buf)
        return new, True
    return _fuse_generic(param, w0, items)


def _fuse_generic(param: Tensor, w0: Tensor, items: tuple):
    dtype = w0.dtype
    w32 = w0.detach().float()
    d = delta_sum(items, w32, check=True)
    wf = torch.add(w32, d).to(dtype)
    if same_bits(wf, w0):
        rec = None
    elif not compact_dtype(dtype):
        rec = full_record(w0, items)
    else:
        est = estimate(items, wf) if any(c.weight_dependent for _, c, _ in items) else estimate(items, wf, d_lin=d)
        rec = encode(w0, wf, est, items)
    changed = not same_bits(wf, param.detach())
    if changed:
        param.detach().copy_(wf)
    return rec, changed


def restore_weight(rec, wf: Tensor, what: str = "weight") -> Tensor:
    """The pristine weight (a new tensor, on ``wf``'s device) from the fused ``wf`` and its record."""
    if fp8.is_fp8(rec.dtype):
        return fp8.restore(rec, wf, what)
    if rec.full is not None:  # (a plain copy lives in host memory)
        return rec.full.to(wf.device, copy=True)
    check_fused(rec, wf, what)
    plan = lowrank_plan(rec.items, tuple(wf.shape), wf.device) if _is_block_record(rec) else None
    if plan is not None:
        out = torch.empty_like(wf.detach())
        _lowrank_pass(out, src=wf, old=(rec, plan))
        return out
    plan = lowrank_plan(rec.items, tuple(wf.shape), wf.device)
    if plan is not None:
        return decode(rec, _lowrank_estimate(plan, wf), what)
    return decode(rec, estimate(rec.items, wf.detach()), what)


__all__ = ["refuse", "restore_weight", "RestoreError"]
