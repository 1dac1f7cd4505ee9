"""``apply()`` and its ``Handle``: LoRAs on a live model, per-step strengths, exact restore.

State is kept per module: which contributions are fused into its weight (with the record
that gives the pristine weight back) and which run live in a forward hook. Every change
(``apply``, ``set``, ``update``, ``remove``) computes the wanted state of the modules it
concerns and moves each module there (``transact``); a module whose wanted state equals its
current one is not touched. A change is a transaction: if anything fails, every module
already moved is moved back, so the model is bit-identical to before and has no hook left
from it.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..deltas import splits_into_parts
from ..errors import LoraExtError
from ..keys import KeyMap
from ..network import Lora, Unmatched, load_lora
from ..spec import LoraSpec
from .amp import exact_maths, holds_inference_tensors, without_autocast
from . import lora_cache
from .background import Compactor, parse_bytes
from .auto import decide
from .contrib import Contribution
from .fp8 import check_rounding
from .onthefly import logical_shape
from .models import as_spec, cached_lora, components_of, keymap_for, live_index, remember_lora
from .transact import Transactions, _Mod

METHODS = ("auto", "fuse", "onthefly")
BUFFER_ENV = "LORA_EXT_RECORD_BUFFER_BYTES"
_log = logging.getLogger("lora_ext")


@dataclass
class ApplyReport:
    """What became of one LoRA: modules it reaches, keys that do not apply (with reasons)."""

    name: str
    path: str
    strength: float
    applied: int = 0
    unmatched: list = field(default_factory=list)  # [network.Unmatched]
    notes: list = field(default_factory=list)  # e.g. modules that take it on the fly, and why

    def lines(self) -> list:
        out = [f"{self.path} @ {self.strength:g}: {self.applied} modules"]
        out.extend(f"  {n}" for n in self.notes)
        if self.unmatched:
            out.append(f"  {len(self.unmatched)} keys not applied:")
            out.extend(f"    {u.key}: {u.reason}" for u in self.unmatched)
        return out


class _Entry:
    """One spec of the current list, loaded and bound."""

    def __init__(self, spec: LoraSpec, mult: float, lora: Lora):
        self.spec = spec
        self.mult = float(mult)
        self.lora = lora
        self.name = spec.name or lora.name
        self.scheduled = bool(spec.is_scheduled())
        self.contribs: list = []
        self.report = ApplyReport(self.name, str(lora.path), self.mult)
        self.placement = "fuse"
        self.reason = ""
        self.decided_for = None  # (total, hires) an auto decision was made for
        self.occurrence = 0  # how many earlier specs of the list use the same file
        self._cache: dict = {}

    def strength(self, component: str, block: str, step, total, hires) -> float:
        k = (component, block)
        s = self._cache.get(k)
        if s is None:
            s = self._cache[k] = float(self.spec.strength(component, block, step, total, hires=hires)) * self.mult
        return s


# --------------------------------------------------------------------------------------------
class Handle(Transactions):
    """LoRAs applied to a live model. See ``apply``."""

    def __init__(self, model, method: str = "auto", keymap: Optional[KeyMap] = None, *,
                 rounding: str = "nearest", seed_key=None, record_buffer=None):
        if method not in METHODS:
            raise LoraExtError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
        self.record_buffer = _check_buffer(record_buffer)
        self.method = method
        self.rounding = check_rounding(rounding)
        self.seed_key = seed_key  # (component, module path, "weight"|"bias") -> key seeding stochastic rounding
        self.components = components_of(model)
        self._index = {c: live_index(c, m) for c, m in self.components.items()}
        self._inference = holds_inference_tensors(m for idx in self._index.values() for m in idx.values())
        self.keymap = keymap if keymap is not None else keymap_for(self.components, self._index)
        self._loras: dict = {}  # path -> Lora, reused across set()
        self._entries: list = []
        self._mods: dict = {}  # (component, path) -> _Mod
        self._step = self._total = None
        self._hires = False
        self._alive = True
        self.stats = Counter()  # writes (parameter writes), refused (modules), restored, decoded ...
        self._lock = threading.Lock()
        # deferred records: plain copies compacted by a worker thread (``background``)
        self._rec_lock = threading.Lock()
        self._compactor = Compactor(self)
        self._inflight = 0  # bytes of plain copies being made by moves in progress
        self._plain_bytes = 0  # bytes of plain copies held by the modules' records
        self._peak_plain = 0
        self._faults: list = []  # [(module key, why)] compactions that failed (plain copy kept)
        self._target_bytes = 0  # bytes of the fusable weights the current LoRAs reach
        self.reports: list = []
        self.unmatched: list = []

    # --- public ------------------------------------------------------------------------------
    def needs_inference_mode(self) -> bool:
        """Whether the weights are inference tensors (looked at again on every call: a host
        may swap parameters, as reForge's built-in LoRA restores do, between two calls)."""
        return self._inference or holds_inference_tensors(m.module for m in self._mods.values())

    @without_autocast
    def update(self, step: Optional[int], total_steps: Optional[int], *, hires: bool = False) -> None:
        """Move to sampling step ``step`` (0-based) of ``total_steps``: per-step strengths."""
        self._check_alive()
        if (step, total_steps, hires) == (self._step, self._total, self._hires):
            return
        before = (self._step, self._total, self._hires, [(e.placement, e.reason, e.decided_for) for e in self._entries])
        self._step, self._total, self._hires = step, total_steps, bool(hires)
        for e in self._entries:
            e._cache.clear()
        try:
            moved = self._decide()
            keys = {c.target_key for e in self._entries
                    if e.scheduled or e in moved or e.spec.has_hires() for c in e.contribs}
            self._reconcile(sorted(keys))
        except BaseException:
            self._step, self._total, self._hires, placements = before
            for e, (p, r, d) in zip(self._entries, placements):
                e.placement, e.reason, e.decided_for = p, r, d
                e._cache.clear()
            raise
        for m in self._mods.values():
            if m.live is not None:
                m.live.rows_seen = m.live.calls = 0

    @without_autocast
    def set(self, specs) -> None:
        """Switch to another list of LoRAs; modules whose weights do not change are not touched."""
        self._check_alive()
        entries = self._load(specs)
        old_entries = self._entries
        old_contribs = {k: list(m.contribs) for k, m in self._mods.items()}
        old_reports = (self.reports, self.unmatched)
        touched = [k for k, m in self._mods.items() if m.contribs]
        try:
            self._install(entries)
            keys = set(touched) | {c.target_key for e in entries for c in e.contribs}
            self._reconcile(sorted(keys))
        except BaseException:
            self._entries = old_entries
            for k, m in self._mods.items():
                m.contribs = old_contribs.get(k, [])
            self.reports, self.unmatched = old_reports
            raise
        self._prune()

    @without_autocast
    def remove(self) -> None:
        """Restore every module bit-exactly and take every hook off. Idempotent."""
        if not self._alive:
            return
        old_entries = self._entries
        old_contribs = {k: list(m.contribs) for k, m in self._mods.items()}
        try:
            self._entries = []
            for m in self._mods.values():
                m.contribs = []
            self._reconcile(sorted(self._mods))
        except BaseException:
            self._entries = old_entries
            for k, m in self._mods.items():
                m.contribs = old_contribs[k]
            raise
        self._alive = False
        self._compactor.close()
        for m in self._mods.values():
            if m.live is not None:
                m.live.remove_hook()
        with self._rec_lock:
            self._mods.clear()
            self._plain_bytes = 0

    def abandon(self) -> None:
        """Forget everything without writing a weight (the host replaced the model's weights,
        so there is nothing left to restore): hooks off, records dropped, handle dead."""
        self._alive = False
        self._compactor.close()
        for m in self._mods.values():
            if m.live is not None:
                m.live.remove_hook()
        with self._rec_lock:
            self._mods.clear()
            self._plain_bytes = 0
        self._entries = []
        self._alive = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    @property
    def alive(self) -> bool:
        return self._alive

    # --- restore records and their memory ----------------------------------------------------
    def record_bound(self) -> float:
        """Bytes of plain copies the fast path may hold at once (beyond it, records are built
        synchronously): ``apply(record_buffer=...)``, else ``$LORA_EXT_RECORD_BUFFER_BYTES``,
        else the bytes of the weights the current LoRAs patch. 0: always synchronous."""
        v = self.record_buffer
        if v is None:
            env = os.environ.get(BUFFER_ENV)
            if env:
                try:
                    v = parse_bytes(env)
                except ValueError:
                    _log.warning("%s=%r is not a size (bytes, 512M, 2G, 0.5x, inf); using the default", BUFFER_ENV, env)
        if v is None:
            return float(self._target_bytes)
        if v < 0:  # a share of the default
            return -v * float(self._target_bytes)
        return float(v)

    def wait_records(self, timeout: Optional[float] = None) -> bool:
        """Block until every plain copy has been compacted (or failed to be: see
        ``record_memory()["faults"]``). False if ``timeout`` (seconds) ran out first."""
        return self._compactor.wait(timeout)

    @property
    def records_complete(self) -> bool:
        """Whether no plain copy is waiting for compaction (faulted ones aside)."""
        with self._rec_lock:
            return not any(m.rec_w is not None and m.rec_w.pending and m.rec_w.fault is None
                           for m in self._mods.values())

    def record_memory(self) -> dict:
        """Memory of the restore state: ``plain_bytes`` (plain copies waiting for compaction, or
        kept after a fault), ``record_bytes`` (compact records), ``bound`` (the transient bound,
        ``record_bound()``), ``peak_plain_bytes`` (most plain-copy bytes held at once so far),
        ``pending`` (modules with a plain copy), ``compacting`` (the worker is running),
        ``records_sync`` (records built synchronously because the bound was reached),
        ``compactions``, ``compactions_dropped`` (stale: the weight moved meanwhile),
        ``faults`` ([(module, why)]; their plain copies are kept)."""
        with self._rec_lock:
            plain = self._plain_held()
            pending = sum(1 for m in self._mods.values() if m.rec_w is not None and m.rec_w.pending)
            faults = list(self._faults)
        total = self.restore_record_bytes
        return {"plain_bytes": plain, "record_bytes": total - plain, "bound": self.record_bound(),
                "peak_plain_bytes": self._peak_plain, "pending": pending, "compacting": self._compactor.busy,
                "records_sync": self.stats["records_sync"], "compactions": self.stats["compactions"],
                "compactions_dropped": self.stats["compactions_dropped"], "faults": faults}

    @property
    def restore_record_bytes(self) -> int:
        """Bytes held to restore the patched weights (records of every fused parameter, plain
        copies waiting for compaction included)."""
        with self._rec_lock:
            return sum(r.nbytes for m in list(self._mods.values()) for r in (m.rec_w, m.rec_b) if r is not None)

    @property
    def patched_bytes(self) -> int:
        """Bytes of the parameters currently patched in place."""
        n = 0
        for m in self._mods.values():
            if m.rec_w is not None:
                n += m.module.weight.numel() * m.module.weight.element_size()
            if m.rec_b is not None:
                n += m.module.bias.numel() * m.module.bias.element_size()
        return n

    def records(self) -> list:
        """One dict per fused parameter: ``module`` ((component, path)), ``param``, ``dtype``,
        ``elements``, ``bytes`` (its restore record), ``scheme`` (sparse / b-bit / full),
        ``exceptions``, ``bytes_per_element`` and ``rounding``. ``scheme`` "plain": a plain copy
        waiting for the background compaction."""
        out = []
        with self._rec_lock:
            recs = [(k, (("weight", m.rec_w), ("bias", m.rec_b))) for k, m in sorted(self._mods.items())]
        for k, pairs in recs:
            for name, r in pairs:
                if r is None:
                    continue
                n = 1
                for d in r.shape:
                    n *= int(d)
                out.append({"module": k, "param": name, "dtype": str(r.dtype).replace("torch.", ""),
                            "elements": n, "bytes": r.nbytes, "scheme": r.scheme, "exceptions": r.n_exceptions,
                            "bytes_per_element": r.nbytes / max(1, n), "rounding": r.rounding})
        return out

    @property
    def unfusable(self) -> dict:
        """(component, path) -> why its weight is never written (its LoRAs run on the fly),
        for every module a current LoRA reaches."""
        return {k: m.unfusable for k, m in sorted(self._mods.items()) if m.unfusable is not None and m.contribs}

    @property
    def record_schemes(self) -> Counter:
        """How the records are stored: {"sparse": n, "1-bit": n, ..., "full": n, "plain": n}."""
        with self._rec_lock:
            return Counter(r.scheme for m in self._mods.values() for r in (m.rec_w, m.rec_b) if r is not None)

    @property
    def live_cache_bytes(self) -> int:
        return sum(m.live.cached_bytes() for m in self._mods.values() if m.live is not None)

    @property
    def placement(self) -> dict:
        """LoRA name -> "fuse" | "onthefly" (and why, for auto: ``placement_reasons``)."""
        return {e.name: e.placement for e in self._entries}

    @property
    def placement_reasons(self) -> dict:
        return {e.name: e.reason for e in self._entries}

    def strengths(self) -> dict:
        """(component, module path) -> {LoRA name: effective strength now} (fused and live)."""
        out = {}
        for k, m in self._mods.items():
            d = {}
            items = [(c, s) for _, c, s in m.fused]
            if m.live is not None:
                items += list(m.live.items.values())
            for c, s in items:
                d[c.name] = d.get(c.name, 0.0) + s
            if d:
                out[k] = d
        return out

    def modules(self, how: str = "any") -> list:
        """Keys of the modules that are fused ("fuse"), hooked ("onthefly") or either."""
        out = []
        for k, m in self._mods.items():
            f = m.rec_w is not None or m.rec_b is not None or bool(m.fused)
            o = m.live is not None and bool(m.live.items)
            if (how == "fuse" and f) or (how == "onthefly" and o) or (how == "any" and (f or o)):
                out.append(k)
        return sorted(out)

    # --- loading and binding -----------------------------------------------------------------
    def _check_alive(self):
        if not self._alive:
            raise LoraExtError("this handle was removed; apply the LoRAs again")

    def _load(self, specs) -> list:
        if isinstance(specs, (LoraSpec, Lora, str, os.PathLike)) or (
                isinstance(specs, tuple) and len(specs) == 2 and isinstance(specs[1], (int, float))):
            specs = [specs]
        entries = []
        for item in specs:
            spec, mult, lora = as_spec(item)
            if lora is None:
                if not spec.path:
                    raise LoraExtError(f"{spec.tag or spec.name}: no file for this LoRA (its path is not set)")
                key = os.path.abspath(os.fspath(spec.path))
                # the file as it is now (stat'ed before reading): a cached copy is used only
                # while the file is unchanged (``lora_cache``), else it is read again
                fid = lora_cache.file_id(key)
                lora = lora_cache.get(key, fid)
                if lora is None:
                    held = self._loras.get(key)
                    lora = cached_lora(key)
                    if lora is None and held is not None and getattr(held, "_lora_ext_fid", None) == fid:
                        lora = held
                if lora is None:
                    lora = load_lora(spec.path)
                    remember_lora(key, lora)
                    try:
                        lora._lora_ext_fid = fid
                    except AttributeError:
                        pass
                lora_cache.put(key, fid, lora)
                self._loras[key] = lora
            else:
                key = os.path.abspath(str(lora.path))
                self._loras.setdefault(key, lora)
                remember_lora(key, lora)
            entry = _Entry(spec, mult, lora)
            entry.occurrence = sum(1 for e in entries if e.lora is lora)
            entries.append(entry)
        return entries

    def _bind(self, entry: _Entry) -> None:
        res = entry.lora.resolve(self.keymap)
        entry.spec = entry.spec.bind_blocks(res, self.keymap)  # block weights that depend on the model / file
        entry.report.unmatched = list(res.unmatched)
        for b in res.bindings:
            targets = b.targets
            if len(targets) > 1 and not splits_into_parts(b.adapter, tuple(b.candidate.weight_shape), b.candidate.row_counts):
                entry.report.unmatched.extend(
                    Unmatched(k, f"a {b.adapter.type_name} adapter spanning fused q/k/v mixes the rows of q, k "
                                 "and v; it cannot be applied to separate q/k/v modules")
                    for k in sorted(b.group.keys.values()))
                continue
            row = 0
            for i, t in enumerate(targets):
                module = self._index.get(t.component, {}).get(t.module)
                weight = getattr(module, "weight", None) if module is not None else None
                if not isinstance(weight, torch.Tensor):
                    raise LoraExtError(f"{entry.lora.path}: module {t.component}:{t.module} is not in the model")
                shape = logical_shape(module)  # a packed quantised weight: the layer's own shape
                n = int(shape[0])
                rows = None if len(targets) == 1 else (row, row + n)
                row += n
                c = Contribution(entry, b, i, rows, tuple(b.candidate.weight_shape))
                if len(targets) == 1 and shape != tuple(b.candidate.weight_shape):
                    raise LoraExtError(f"{entry.lora.path}: module {t.component}:{t.module} has weight "
                                       f"{shape}, the key map says {tuple(b.candidate.weight_shape)}")
                entry.contribs.append(c)
            entry.report.applied += 1

    def _install(self, entries: list) -> None:
        """Bind ``entries`` and make them current (module states created as needed)."""
        for e in entries:
            self._bind(e)
            e.placement = self._initial_placement(e)
        self._entries = entries
        for m in self._mods.values():
            m.contribs = []
        for e in entries:
            for c in e.contribs:
                m = self._mods.get(c.target_key)
                if m is None:
                    comp, path = c.target_key
                    m = self._mods[c.target_key] = _Mod(c.target_key, self._index[comp][path], comp, c.target.block)
                m.contribs.append(c)
        for e in entries:  # modules whose weights are never written: say so, with the reason
            why = Counter(self._mods[c.target_key].unfusable for c in e.contribs
                          if self._mods[c.target_key].unfusable is not None)
            e.report.notes = [f"{n} module{'s' if n > 1 else ''} on the fly: {r}" for r, n in sorted(why.items())]
            for line in e.report.notes:
                _log.info("%s: %s", e.name, line)
        self.reports = [e.report for e in entries]
        self.unmatched = [{"lora": e.report.path, "key": u.key, "reason": u.reason}
                          for e in entries for u in e.report.unmatched]

    def _prune(self) -> None:
        for k in [k for k, m in self._mods.items() if m.idle]:
            m = self._mods.pop(k)
            if m.live is not None:
                m.live.remove_hook()

    # --- placement (the auto rule) -----------------------------------------------------------
    def _initial_placement(self, e: _Entry) -> str:
        if self.method != "auto":
            e.reason = f"method={self.method}"
            return self.method
        if not e.scheduled:
            e.reason = "constant strength: fused"
            return "fuse"
        e.reason = "scheduled: on-the-fly until one step has been measured"
        return "onthefly"

    def _decide(self) -> set:
        return decide(self)

    # --- wanted state ------------------------------------------------------------------------
    def _wanted(self, m: _Mod) -> tuple:
        fused, live = {}, {}
        step, total, hires = self._step, self._total, self._hires
        for c in m.contribs:
            e = c.entry
            s = e.strength(c.target.component, c.target.block, step, total, hires)
            if s == 0.0:
                continue
            # a module whose weight must not be written takes its fused LoRAs live; one with no
            # forward to hook (a fused q/k/v slice) keeps them fused and fails there, clearly
            live_only = m.unfusable is not None and hasattr(m.module, "register_forward_hook")
            d = fused if e.placement == "fuse" and not live_only else live
            prev = d.get(c.key)
            d[c.key] = (c, s if prev is None else prev[1] + s)
        fused_items = tuple((k, c, s) for k, (c, s) in sorted(fused.items(), key=lambda t: t[0]) if s != 0.0)
        live = {k: v for k, v in live.items() if v[1] != 0.0}
        return fused_items, live

def _check_buffer(v):
    if v is None:
        return None
    if isinstance(v, str):
        try:
            return parse_bytes(v)
        except ValueError:
            raise LoraExtError(f"record_buffer={v!r}: not a size (bytes, '512M', '2G', '0.5x', 'inf')") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise LoraExtError(f"record_buffer={v!r}: a number of bytes >= 0, or a string such as '512M'")
    return float(v)


# --------------------------------------------------------------------------------------------
def apply(model, specs, method: str = "auto", *, keymap: Optional[KeyMap] = None, rounding: str = "nearest",
          seed_key=None, record_buffer=None) -> Handle:
    """Apply LoRAs to a live model; returns a ``Handle`` (``update``, ``set``, ``remove``).

    ``model``: a diffusers ``UNet2DConditionModel``, a transformers ``CLIPTextModel`` /
    ``CLIPTextModelWithProjection``, a dict ``{"unet": ..., "te1": ..., "te2": ...}``, or a
    pipeline with ``unet`` / ``text_encoder`` / ``text_encoder_2`` attributes.
    ``specs``: ``LoraSpec`` s (with ``path`` set), paths, loaded ``Lora`` objects, or
    ``(any of those, strength)`` tuples; the tuple's strength multiplies the spec's.
    ``method``: ``"fuse"`` (weights patched in place, restore bit-exact from a compact
    record), ``"onthefly"`` (forward hooks, weights untouched) or ``"auto"`` (constant LoRAs
    fused; each scheduled one on-the-fly or re-fused on the steps its strength changes,
    whichever the cost model finds cheaper once one step has been measured).

    ``rounding`` (fp8 weights only): ``"nearest"`` (round to nearest even, as Forge and kohya),
    ``"stochastic"`` or ``"stochastic-torch"`` (ComfyUI's seeded stochastic rounding, with and
    without comfy-kitchen; device-dependent, see ``engine.fp8``). ``seed_key(component, path,
    "weight"|"bias")`` gives the key the seed is taken from (default ``"<path>.weight"``; ComfyUI
    seeds with its own state-dict key, e.g. ``"diffusion_model.<path>.weight"``).

    Keys that do not apply are in ``handle.unmatched`` (and per LoRA in ``handle.reports``);
    modules whose weights are never written (quantised, offloaded) are in ``handle.unfusable``
    with the reason, and in the reports' ``notes``. ``handle.records()`` lists the restore
    records. If anything fails, the model is left bit-identical and the error is raised.

    ``record_buffer``: how many bytes of plain copies of pristine weights the fast path may
    hold at once (int bytes, or a string: ``"512M"``, ``"2G"``, ``"0.5x"`` of the default,
    ``"inf"``). Low-rank LoRAs on fp16/bf16/fp32 weights are fused without building the small
    restore record first: the pristine weights are kept as plain host copies and compacted
    into the record by a background thread (``handle.wait_records()``); beyond the bound,
    records are built synchronously as the weights are fused. Default: the environment
    variable ``LORA_EXT_RECORD_BUFFER_BYTES``, else the bytes of the weights being patched
    (never more than one plain copy of each). 0: always synchronous.
    """
    handle = Handle(model, method, keymap=keymap, rounding=rounding, seed_key=seed_key, record_buffer=record_buffer)
    entries = handle._load(specs)
    try:
        with exact_maths(handle.needs_inference_mode()):
            handle._install(entries)
            handle._reconcile(sorted({c.target_key for e in entries for c in e.contribs}))
    except BaseException:
        handle._alive = False
        handle._compactor.close()
        for m in handle._mods.values():
            if m.live is not None:
                m.live.remove_hook()
        raise
    return handle
