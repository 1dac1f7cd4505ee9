"""Moving modules between states, all or nothing (the part of ``Handle`` that writes).

A module's state is what is fused into its weight (with the record that gives the pristine
weight back) and what runs live in its forward hook. ``_reconcile`` moves a set of modules to
their wanted states: first the re-fuses (on worker threads for big CPU weights), then the
hook changes; each move is journaled, and if anything fails every journaled move is undone,
so the model ends bit-identical to before and with the hooks it had.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

import logging

from ..errors import LoraExtError
from .contrib import bias_sum
from .amp import exact_maths
from . import fp8
from . import background
from . import plainbuf
from .fuse import compact, refuse, restore_weight
from .onthefly import LiveModule, is_quantised, logical_shape
from .record import Record, full_record, same_bits


_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                             "float8_e8m0fnu") if hasattr(torch, n))
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_log = logging.getLogger("lora_ext")


def unfusable_reason(module) -> Optional[str]:
    """Why fusing into ``module``'s weight would be wrong, or None when it is fine.

    Quantised weights are never requantised: integer or packed storage (SD.Next's SDNQ int8,
    bitsandbytes int8 / NF4 / FP4, GGUF blocks) and tensor subclasses that wrap one (a
    ``Params4bit``, a ``GGMLTensor``, torchao's quantised tensors), whatever dtype they report.
    So are offloaded parameters (accelerate's sequential offload leaves them on ``meta``; the
    real copy lives elsewhere and is put back over ours) and non-contiguous views (an
    :class:`~lora_ext.hostmodel.InputSlice`). Their LoRAs run on the fly instead
    (``y = Q(x) + s*B(A(x))``, exact), when the module has a forward to hook.

    fp8 weights (``float8_e4m3fn`` / ``float8_e5m2``, with or without ComfyUI's per-tensor
    ``scale_weight``) are fused (``fp8``): fp32 maths, one rounding. The other fp8 formats and
    scaling conventions lora-ext does not reproduce exactly stay on the fly.
    """
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if type(w) not in _PLAIN:
        return (f"{type(w).__name__} weight ({w.dtype} storage: a quantised or packed tensor type; "
                "never requantised, applied on the fly)")
    if not w.is_floating_point():
        return f"{w.dtype} weight (quantised; never requantised, applied on the fly)"
    if w.device.type == "meta":
        return "offloaded weight (on the meta device)"
    if w.dtype in _FLOAT8:
        if not fp8.is_fp8(w.dtype):
            return f"{w.dtype} weight (fp8 storage fused only as float8_e4m3fn / float8_e5m2)"
        _, why = fp8.weight_scale(module, w)
        if why is not None:
            return why
    if not w.is_contiguous():
        return "a slice of a wider weight"
    return None


class _Mod:
    """Engine state of one module."""

    __slots__ = ("key", "module", "component", "block", "contribs", "fused", "rec_w", "rec_b", "live",
                 "unfusable", "gen")

    def __init__(self, key, module, component, block):
        self.key = key
        self.module = module
        self.component = component
        self.block = block
        self.contribs: list = []
        self.fused: tuple = ()  # ((key, contribution, strength), ...) sorted by key
        self.rec_w: Optional[Record] = None  # None: the weight is pristine
        self.rec_b: Optional[Record] = None
        self.live: Optional[LiveModule] = None
        # why this module's weight is never written (its LoRAs run in a forward hook), or None
        self.unfusable: Optional[str] = unfusable_reason(module)
        # seqlock of the weight: odd while a move writes it, bumped twice per move (background)
        self.gen = 0

    @property
    def idle(self) -> bool:
        return not self.contribs and self.rec_w is None and self.rec_b is None and (
            self.live is None or not (self.live.items or self.live.probe))


def _bias_delta_sum(items, shape, pristine_weight, b0):
    """fp32 sum of the items' bias changes (None if none changes the bias).

    ``pristine_weight()`` gives W0, asked for only when an item's bias change may depend on it.
    """
    if not any(_may_change_bias(c) for _, c, _ in items):
        return None
    needs_w = any(_may_change_bias(c) and c.lowrank_rank(shape) is None for _, c, _ in items)
    w32 = pristine_weight().float() if needs_w else None
    # an adapter that changes a bias the module lacks is an error (raised by bias_sum)
    return bias_sum(items, None if b0 is None else b0.float(), w32)


def _may_change_bias(c) -> bool:
    """False for adapters known to leave the bias alone (plain LoRA without lora_up.bias)."""
    t = getattr(c.adapter, "tensors", None) or {}
    if getattr(c.adapter, "type_name", "") == "lora" and "lora_up.bias" not in t:
        return False
    return True


# Re-fusing many big CPU weights runs on this many threads, each with one intra-op thread
# (block-sized ops parallelise badly inside torch, whole modules side by side do well).
# None: torch.get_num_threads(). 1: off.
WORKERS = None
PARALLEL_MIN_ELEMENTS = 1 << 20  # below this much work, threads cost more than they save


def _workers(work) -> int:
    if len(work) < 2:
        return 1
    n = WORKERS if WORKERS is not None else torch.get_num_threads()
    if n <= 1:
        return 1
    total = 0
    for m, _ in work:
        w = m.module.weight
        if w.device.type != "cpu":
            return 1
        total += w.numel()
    return min(n, len(work)) if total >= PARALLEL_MIN_ELEMENTS else 1


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _signature(items) -> tuple:
    return tuple((k, s) for k, _, s in items)



class Transactions:
    """Mixin of ``Handle``: needs ``_mods``, ``_wanted``, ``method``, ``stats``, ``_lock``,
    ``_rec_lock``, ``_compactor``, ``_inflight``, ``_peak_plain``, ``_faults``, ``_target_bytes``
    and ``record_bound()``."""

    def _reconcile(self, keys) -> None:
        """Move the modules ``keys`` to their wanted state, all or nothing."""
        journal = []
        self._target_bytes = sum(_nbytes(m.module.weight) for m in self._mods.values()
                                 if m.contribs and m.unfusable is None
                                 and isinstance(getattr(m.module, "weight", None), torch.Tensor))
        try:
            self._reconcile_inner(keys, journal)
        finally:
            self._kick()

    def _reconcile_inner(self, keys, journal) -> None:
        try:
            with torch.no_grad():
                refuse, live = [], []
                for k in keys:
                    m = self._mods.get(k)
                    if m is None:
                        continue
                    fused, items = self._wanted(m)
                    if _signature(fused) != _signature(m.fused):
                        refuse.append((m, fused))
                    probe = self.method == "auto" and any(
                        c.entry.placement == "onthefly" and c.entry.scheduled and c.entry.decided_for is None
                        for c in m.contribs)
                    current = m.live.items if m.live is not None else {}
                    current_probe = m.live.probe if m.live is not None else False
                    if items != current or probe != current_probe:
                        live.append((m, items, probe, (dict(current), current_probe)))
                self._refuse_all(refuse, journal)
                for m, items, probe, old in live:
                    journal.append((m, "live", old))
                    self._set_live(m, items, probe)
        except BaseException as exc:
            problems = self._rollback(journal)
            if problems:
                raise LoraExtError(f"{exc}; and rolling back failed for {len(problems)} modules "
                                   f"(first: {problems[0]})") from exc
            raise

    def _refuse_all(self, work, journal) -> None:
        """Re-fuse modules, in parallel on CPU (one intra-op thread per worker) when it pays."""
        workers = _workers(work)
        if workers <= 1:
            for m, fused in work:
                old = m.fused
                self._refuse(m, fused)
                journal.append((m, "fused", old))
            return
        work = sorted(work, key=lambda mf: -mf[0].module.weight.numel())  # big ones first
        errors = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        # grad and inference mode are per thread: workers take the caller's (inference mode
        # where the weights are inference tensors, which may only be written in it)
        inference = torch.is_inference_mode_enabled()
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                def run(m, fused):
                    if errors:
                        return
                    old = m.fused
                    try:
                        with exact_maths(inference):
                            self._refuse(m, fused)
                    except BaseException as exc:
                        errors.append(exc)
                        return
                    with self._lock:
                        journal.append((m, "fused", old))

                for f in [pool.submit(run, m, fused) for m, fused in work]:
                    f.result()
        finally:
            torch.set_num_threads(threads)
        if errors:
            raise errors[0]

    def _rollback(self, journal) -> list:
        problems = []
        with torch.no_grad():
            for m, what, old in reversed(journal):
                try:
                    if what == "fused":
                        self._refuse(m, old)
                    else:
                        self._set_live(m, *old)
                except Exception as exc:  # keep going: restore as much as possible
                    problems.append(f"{m.component}:{m.key[1]}: {exc}")
        return problems

    def _pristine(self, m: _Mod) -> tuple:
        """(W0, b0) in the model's dtype: decoded from the records, or the parameters themselves."""
        w = m.module.weight
        if m.rec_w is None:
            w0 = w.detach()
        else:
            w0 = restore_weight(m.rec_w, w, f"{m.component}:{m.key[1]}.weight")
            self._bump("decoded")
        b = getattr(m.module, "bias", None)
        if m.rec_b is not None:
            b0 = m.rec_b.full.clone()
        else:
            b0 = b.detach() if isinstance(b, torch.Tensor) else None
        return w0, b0

    def _pristine32(self, m: _Mod) -> tuple:
        """(W0, b0) in fp32, the weight dequantised where it is stored as scaled fp8."""
        w0, b0 = self._pristine(m)
        b32 = None if b0 is None else b0.float()
        if is_quantised(getattr(m.module, "weight", None)):  # values unknown to us: only deltas
            # that read none of them run here (weight-dependent ones are refused in _set_live)
            return torch.zeros(logical_shape(m.module), device=w0.device), b32
        scale = fp8.weight_scale(m.module, w0)[0] if fp8.is_fp8(w0.dtype) else None
        return fp8.dequantise(w0, scale), b32

    def _rounding(self, m: _Mod, param: str):
        """(mode, key) for rounding a fused fp8 value of ``param``, or None (round to nearest)."""
        mode = getattr(self, "rounding", "nearest")
        if mode == "nearest":
            return None
        fn = getattr(self, "seed_key", None)
        return mode, (fn(m.component, m.key[1], param) if fn is not None else f"{m.key[1]}.{param}")

    def _write(self, param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value)  # under no_grad; bumps the parameter's version counter
        self._bump("writes")

    def _bump(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    # --- the deferred records (background compaction) ---------------------------------------
    def _plain_held(self) -> int:
        """Bytes of plain copies held now (call with ``_rec_lock``)."""
        return self._plain_bytes

    def _set_rec_w(self, m: _Mod, new) -> None:
        """``m.rec_w = new``, keeping the count of plain-copy bytes (call with ``_rec_lock``)."""
        old = m.rec_w
        if old is not None and old.pending:
            self._plain_bytes -= _nbytes(old.full)
        if new is not None and new.pending:
            self._plain_bytes += _nbytes(new.full)
        m.rec_w = new

    def _keeper(self, reserved: list):
        """``keep(param)`` for ``fuse.refuse``: a host buffer for a plain copy, while the plain
        copies held stay within the bound (else None: this record is built synchronously)."""
        bound = self.record_bound()
        if bound <= 0:
            return None

        def keep(param):
            need = _nbytes(param)
            with self._rec_lock:
                held = self._plain_held() + self._inflight
                if held + need > bound:
                    self.stats["records_sync"] += 1
                    return None
                self._inflight += need
                reserved.append(need)
                self._peak_plain = max(self._peak_plain, held + need)
            try:
                if param.device.type == "cuda":
                    return torch.empty(tuple(param.shape), dtype=param.dtype, device="cpu", pin_memory=True)
                return plainbuf.empty(tuple(param.shape), param.dtype, bound)  # recycled without page faults
            except BaseException:
                with self._rec_lock:
                    self._inflight -= need
                    reserved.remove(need)
                raise
        return keep

    def _kick(self) -> None:
        """Hand the modules holding plain copies to the worker."""
        if not getattr(self, "_alive", True):
            return
        with self._rec_lock:
            todo = [m for m in self._mods.values()
                    if m.rec_w is not None and m.rec_w.pending and m.rec_w.fault is None and m.gen % 2 == 0]
        if todo:
            self._compactor.submit(todo)

    def _compact_one(self, m: _Mod) -> None:
        """(The worker.) Compact ``m``'s plain copy into its small record, if still current."""
        with self._rec_lock:
            gen, rec = m.gen, m.rec_w
            if gen % 2 or rec is None or not rec.pending or rec.fault is not None or not self._alive:
                return
        hook = background.HOOK
        key = m.key
        w = m.module.weight

        compactor = self._compactor

        def alive():
            return m.gen == gen and self._alive and not compactor.closed

        try:
            if hook is not None:
                hook("start", key, None)
            new = compact(rec, w, alive=alive, hook=None if hook is None else (lambda t: hook("block", key, t)))
            if new is not None and hook is not None:
                hook("install", key, None)
        except BaseException as exc:
            why = f"{type(exc).__name__}: {exc}"
            with self._rec_lock:
                rec.fault = why
                self.stats["compaction_faults"] += 1
                self._faults.append((key, why))
            _log.warning("lora-ext: compacting the restore record of %s:%s failed (%s); its plain copy is kept",
                         m.component, key[1], why)
            return
        with self._rec_lock:
            if new is not None and m.gen == gen and m.rec_w is rec and self._alive:
                self._set_rec_w(m, new)
                self.stats["compactions"] += 1
                return
            self.stats["compactions_dropped"] += 1

    def _refuse(self, m: _Mod, items: tuple) -> None:
        """Make the module's weight ``round(W0 + sum s*delta)`` over ``items`` (W0 if empty)."""
        reserved: list = []
        with self._rec_lock:
            m.gen += 1  # odd: the weight is being moved; a compaction of it is stale from here on
        try:
            self._refuse_inner(m, items, self._keeper(reserved), reserved)
        finally:
            with self._rec_lock:
                m.gen += 1
                self._inflight -= sum(reserved)  # (a failed move: its copy was never kept)

    def _refuse_inner(self, m: _Mod, items: tuple, keep, reserved: list) -> None:
        module = m.module
        w = module.weight
        if items and not w.is_floating_point():
            raise LoraExtError(f"{m.component}:{m.key[1]}: cannot fuse into a {w.dtype} weight "
                               "(quantised?); apply with method='onthefly'")
        b = getattr(module, "bias", None)
        b = b if isinstance(b, torch.Tensor) else None
        # the bias first: everything that can fail before the weight is written runs here
        b0 = m.rec_b.full if m.rec_b is not None else (None if b is None else b.detach())
        bf, new_rec_b, write_b = None, m.rec_b, False
        db = _bias_delta_sum(items, tuple(w.shape), lambda: self._pristine32(m)[0], b0) if items else None
        if db is not None:
            bf = fp8.round_to(torch.add(b0.float(), db), b.dtype, self._rounding(m, "bias"))
            if fp8.is_fp8(b.dtype) and bool((fp8.nonfinite(bf) & torch.isfinite(b0.float() + db)).any()):
                raise LoraExtError(f"{m.component}:{m.key[1]}.bias: the fused value leaves {b.dtype}'s range")
            write_b = not same_bits(bf, b.detach())
            if new_rec_b is None and write_b:
                new_rec_b = full_record(b0)
        elif m.rec_b is not None:
            bf, write_b, new_rec_b = b0.clone(), True, None
        # the weight: block by block where its bits change; undoes itself on failure
        scale = fp8.weight_scale(module, w)[0] if items and fp8.is_fp8(w.dtype) else None
        new_rec_w, changed = refuse(w, m.rec_w, items, f"{m.component}:{m.key[1]}.weight",
                                    rounding=self._rounding(m, "weight"), scale=scale, keep=keep)
        if changed:
            self._bump("writes")
        if write_b:
            self._write(b, bf)
        with self._rec_lock:  # the copy moves from "being made" to "held" at once (never counted twice)
            self._set_rec_w(m, new_rec_w)
            m.rec_b = new_rec_b
            self._inflight -= sum(reserved)
            reserved.clear()
        m.fused = items
        self._bump("refused" if items else "restored")

    def _set_live(self, m: _Mod, items: dict, probe: bool = False) -> None:
        if is_quantised(getattr(m.module, "weight", None)):
            for c, _ in items.values():
                if c.weight_dependent:
                    raise LoraExtError(
                        f"{c.name}: a {c.adapter.type_name} adapter on {m.component}:{m.key[1]} depends on the "
                        f"weight's values, and that module holds a quantised weight ({m.unfusable}); it is "
                        "never requantised, and lora-ext cannot dequantise it exactly")
        if m.live is None:
            if not items and not probe:
                return
            m.live = LiveModule(m.module, lambda m=m: self._pristine32(m))
        m.live.set(items, probe)


