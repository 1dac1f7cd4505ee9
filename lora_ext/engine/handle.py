"""``apply()`` and its ``Handle``: LoRAs on a live model, per-step strengths, exact restore.

State is kept per module: which contributions are fused into its weight (with the record
that gives the pristine weight back) and which run live in a forward hook. Every change
(``apply``, ``set``, ``update``, ``remove``) computes the wanted state of the modules it
concerns and moves each module there; a module whose wanted state equals its current one is
not touched. A change is a transaction: if anything fails, every module already moved is
moved back, so the model is bit-identical to before and has no hook left from it.
"""
from __future__ import annotations

import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import LoraExtError
from ..keys import KeyMap
from ..network import Lora, Unmatched, load_lora
from ..spec import LoraSpec
from .auto import decide
from .contrib import Contribution, bias_sum
from .fuse import refuse, restore_weight
from .models import as_spec, cached_lora, components_of, keymap_for, live_index, remember_lora
from .onthefly import LiveModule
from .record import Record, full_record, same_bits

METHODS = ("auto", "fuse", "onthefly")


@dataclass
class ApplyReport:
    """What became of one LoRA: modules it reaches, keys that do not apply (with reasons)."""

    name: str
    path: str
    strength: float
    applied: int = 0
    unmatched: list = field(default_factory=list)  # [network.Unmatched]

    def lines(self) -> list:
        out = [f"{self.path} @ {self.strength:g}: {self.applied} modules"]
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


class _Mod:
    """Engine state of one module."""

    __slots__ = ("key", "module", "component", "block", "contribs", "fused", "rec_w", "rec_b", "live")

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
    needs_w = any(_may_change_bias(c) and c.lowrank(shape) is None for _, c, _ in items)
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


def _signature(items) -> tuple:
    return tuple((k, s) for k, _, s in items)


# --------------------------------------------------------------------------------------------
class Handle:
    """LoRAs applied to a live model. See ``apply``."""

    def __init__(self, model, method: str = "auto", keymap: Optional[KeyMap] = None):
        if method not in METHODS:
            raise LoraExtError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
        self.method = method
        self.components = components_of(model)
        self._index = {c: live_index(c, m) for c, m in self.components.items()}
        self.keymap = keymap if keymap is not None else keymap_for(self.components, self._index)
        self._loras: dict = {}  # path -> Lora, reused across set()
        self._entries: list = []
        self._mods: dict = {}  # (component, path) -> _Mod
        self._step = self._total = None
        self._hires = False
        self._alive = True
        self.stats = Counter()  # writes (parameter writes), refused (modules), restored, decoded ...
        self._lock = threading.Lock()
        self.reports: list = []
        self.unmatched: list = []

    # --- public ------------------------------------------------------------------------------
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
        for m in self._mods.values():
            if m.live is not None:
                m.live.remove_hook()
        self._mods.clear()
        self._alive = False

    def abandon(self) -> None:
        """Forget everything without writing a weight (the host replaced the model's weights,
        so there is nothing left to restore): hooks off, records dropped, handle dead."""
        for m in self._mods.values():
            if m.live is not None:
                m.live.remove_hook()
        self._mods.clear()
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

    @property
    def restore_record_bytes(self) -> int:
        """Bytes held to restore the patched weights (records of every fused parameter)."""
        return sum(r.nbytes for m in self._mods.values() for r in (m.rec_w, m.rec_b) if r is not None)

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

    @property
    def record_schemes(self) -> Counter:
        """How the records are stored: {"sparse": n, "1-bit": n, ..., "full": n}."""
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
                lora = self._loras.get(key) or cached_lora(key)
                if lora is None:
                    lora = load_lora(spec.path)
                    remember_lora(key, lora)
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
        entry.report.unmatched = list(res.unmatched)
        for b in res.bindings:
            targets = b.targets
            if len(targets) > 1 and getattr(b.adapter, "weight_dependent", False):
                entry.report.unmatched.extend(
                    Unmatched(k, "a weight-dependent adapter spanning fused q/k/v cannot be applied to a live model")
                    for k in sorted(b.group.keys.values()))
                continue
            row = 0
            for i, t in enumerate(targets):
                module = self._index.get(t.component, {}).get(t.module)
                weight = getattr(module, "weight", None) if module is not None else None
                if not isinstance(weight, torch.Tensor):
                    raise LoraExtError(f"{entry.lora.path}: module {t.component}:{t.module} is not in the model")
                n = int(weight.shape[0])
                rows = None if len(targets) == 1 else (row, row + n)
                row += n
                c = Contribution(entry, b, i, rows, tuple(b.candidate.weight_shape))
                if len(targets) == 1 and tuple(weight.shape) != tuple(b.candidate.weight_shape):
                    raise LoraExtError(f"{entry.lora.path}: module {t.component}:{t.module} has weight "
                                       f"{tuple(weight.shape)}, the key map says {tuple(b.candidate.weight_shape)}")
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
            d = fused if e.placement == "fuse" else live
            prev = d.get(c.key)
            d[c.key] = (c, s if prev is None else prev[1] + s)
        fused_items = tuple((k, c, s) for k, (c, s) in sorted(fused.items(), key=lambda t: t[0]) if s != 0.0)
        live = {k: v for k, v in live.items() if v[1] != 0.0}
        return fused_items, live

    # --- moving modules ----------------------------------------------------------------------
    def _reconcile(self, keys) -> None:
        """Move the modules ``keys`` to their wanted state, all or nothing."""
        journal = []
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
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                def run(m, fused):
                    if errors:
                        return
                    old = m.fused
                    try:
                        with torch.no_grad():
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

    def _write(self, param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value)  # under no_grad; bumps the parameter's version counter
        self._bump("writes")

    def _bump(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def _refuse(self, m: _Mod, items: tuple) -> None:
        """Make the module's weight ``round(W0 + sum s*delta)`` over ``items`` (W0 if empty)."""
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
        db = _bias_delta_sum(items, tuple(w.shape), lambda: self._pristine(m)[0], b0) if items else None
        if db is not None:
            bf = torch.add(b0.float(), db).to(b.dtype)
            write_b = not same_bits(bf, b.detach())
            if new_rec_b is None and write_b:
                new_rec_b = full_record(b0)
        elif m.rec_b is not None:
            bf, write_b, new_rec_b = b0.clone(), True, None
        # the weight: block by block where its bits change; undoes itself on failure
        new_rec_w, changed = refuse(w, m.rec_w, items, f"{m.component}:{m.key[1]}.weight")
        if changed:
            self._bump("writes")
        if write_b:
            self._write(b, bf)
        m.rec_w, m.rec_b = new_rec_w, new_rec_b
        m.fused = items
        self._bump("refused" if items else "restored")

    def _set_live(self, m: _Mod, items: dict, probe: bool = False) -> None:
        if m.live is None:
            if not items and not probe:
                return
            m.live = LiveModule(m.module, lambda m=m: tuple(
                None if t is None else t.float() for t in self._pristine(m)))
        m.live.set(items, probe)


# --------------------------------------------------------------------------------------------
def apply(model, specs, method: str = "auto", *, keymap: Optional[KeyMap] = None) -> Handle:
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

    Keys that do not apply are in ``handle.unmatched`` (and per LoRA in ``handle.reports``).
    If anything fails, the model is left bit-identical and the error is raised.
    """
    handle = Handle(model, method, keymap=keymap)
    entries = handle._load(specs)
    try:
        handle._install(entries)
        handle._reconcile(sorted({c.target_key for e in entries for c in e.contribs}))
    except BaseException:
        for m in handle._mods.values():
            if m.live is not None:
                m.live.remove_hook()
        raise
    return handle
