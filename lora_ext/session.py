"""The host-agnostic runtime a host shim drives: one model, its LoRAs, their per-step strengths.

A shim creates one :class:`Session` per host model (A1111/SD.Next: one for the loaded
checkpoint; ComfyUI / InvokeAI: one per sampling run) and translates its host's events into
the four seam calls of :mod:`lora_ext.hookspecs`, through the convenience methods here::

    s = Session(LoraLibrary(folders), method="auto")
    s.load_model(HostModel({"unet": unet, "te1": te}, naming="diffusers"))   # model loaded
    prompt = s.use_prompt("a castle <lora:ink:0.8:unet=0@0,1@1>", total_steps=20)  # specs resolved
    for i, sigma in enumerate(sigmas[:-1]):
        s.begin_step(i, 20, sigma)                                           # step begins
        ...                                                                  # run the model
    s.end_run(restore=True)                                                  # run ends

The session is itself the plugin that implements those hooks (registered on ``s.pm``); a
shim may register more plugins on ``s.pm`` to react to the same events.

What it does with them: the model is bound to its architecture (:func:`hostmodel.bind`);
the LoRAs are applied with the engine (``lora_ext.apply``) in two groups, the text encoders
(``te_method``, "fuse" by default: they run once per prompt, at the strengths of step 0) and
the UNet (``method``, moved to each announced step); a changed list of LoRAs is applied as
a change (modules whose weights stay the same are not touched); a new model first gets its
old LoRAs taken off; restoring is bit-exact.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable, Optional

import pluggy

from . import hookspecs
from .errors import LoraExtError
from .hookspecs import hookimpl
from .hostmodel import BoundModel, HostModel, bind
from .prompt import ParsedPrompt, parse_prompt
from .resolve import LoraLibrary, resolve_specs
from .spec import LoraSpec

__all__ = ["Session", "HostModel", "LoraReport", "new_plugin_manager", "spec_from_inputs"]

log = logging.getLogger("lora_ext")

TE_COMPONENTS = ("te1", "te2", "te3")


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager with the seam's hookspecs (and the adapter ones), nothing registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


class LoraReport:
    """What became of one LoRA of the current list: modules reached, keys not applied."""

    def __init__(self, spec: LoraSpec, applied: int, unmatched: list):
        self.spec = spec
        self.name = spec.name
        self.path = spec.path
        self.applied = applied
        self.unmatched = unmatched  # [{"key", "reason"}]

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "applied": self.applied, "unmatched": list(self.unmatched)}


def _abandon(handle) -> None:
    """Forget a handle whose model's weights the host replaced: no weight is written."""
    fn = getattr(handle, "abandon", None)
    if callable(fn):
        fn()
        return
    # Engines without abandon(): take the hooks off and drop the records.
    for m in list(getattr(handle, "_mods", {}).values()):
        live = getattr(m, "live", None)
        if live is not None:
            live.remove_hook()
    mods = getattr(handle, "_mods", None)
    if isinstance(mods, dict):
        mods.clear()
    if hasattr(handle, "_alive"):
        handle._alive = False


class Session:
    """One host model and the LoRAs applied to it. See the module docstring.

    ``library``: where LoRA names are looked up (``None``: every spec must come with a path).
    ``method``: the engine method for the UNet (``"auto"``, ``"fuse"``, ``"onthefly"``);
    ``te_method`` for the text encoders (``"fuse"``; ``"onthefly"`` for hosts that restore
    weights themselves, like InvokeAI). ``label`` names the session in messages.
    """

    def __init__(self, library: Optional[LoraLibrary] = None, *, method: str = "auto",
                 te_method: str = "fuse", label: str = "", record_buffer=None):
        self.library = library
        self.method = method
        #: the engine's bound on plain copies for the background restore record
        #: (``lora_ext.apply(record_buffer=...)``; 0: records built synchronously; None: default)
        self.record_buffer = record_buffer
        self.te_method = te_method
        self.label = label
        self.pm = new_plugin_manager()
        self.pm.register(self, name="lora_ext.session")
        self.hook = self.pm.hook
        self.bound: Optional[BoundModel] = None
        self.specs: list = []
        self.hires = False
        self.total_steps: Optional[int] = None
        self.step: Optional[int] = None
        self.sigma: Optional[float] = None
        self.handles: dict = {}  # "te" | "unet" -> engine Handle
        self.errors: list = []  # one line per problem of the current list (shims show them)
        self._applied: list = []  # the specs the handles currently hold
        self._lock = threading.RLock()
        #: the session of the model's second expert (HostModel.second_expert), driven with this one
        self.partner: Optional["Session"] = None

    # --- driving the seam (what shims call) ------------------------------------------------
    def load_model(self, model: HostModel) -> None:
        self.hook.lora_ext_model_loaded(session=self, model=model)

    def use_specs(self, specs: Iterable[LoraSpec], *, hires: bool = False,
                  total_steps: Optional[int] = None) -> None:
        self.hook.lora_ext_specs_resolved(session=self, specs=list(specs), hires=bool(hires),
                                          total_steps=total_steps)

    def use_prompt(self, text: str, *, hires: bool = False, total_steps: Optional[int] = None) -> str:
        """Parse ``text``'s LoRA tags, apply them, return the prompt without them."""
        parsed = self.parse(text)
        self.use_specs(parsed.specs, hires=hires, total_steps=total_steps)
        return parsed.prompt

    def begin_step(self, step: int, total_steps: int, sigma=None) -> None:
        self.hook.lora_ext_step_begins(session=self, step=int(step), total_steps=int(total_steps),
                                       sigma=None if sigma is None else _as_float(sigma))

    def end_run(self, restore: bool = True) -> None:
        self.hook.lora_ext_run_ends(session=self, restore=bool(restore))

    # --- helpers -----------------------------------------------------------------------------
    def parse(self, text: str) -> ParsedPrompt:
        """The prompt without its tags, and the tags' specs resolved to files."""
        parsed = parse_prompt(text)
        self.resolve(parsed.specs)
        return parsed

    def resolve(self, specs: Iterable[LoraSpec]) -> None:
        """Set the path of every spec that has none (``LoraNotFound`` names the folders searched)."""
        specs = list(specs)
        if any(s.path is None for s in specs):
            if self.library is None:
                missing = next(s for s in specs if s.path is None)
                raise LoraExtError(f"{missing.tag or missing.name}: no file for this LoRA and no LoRA folders")
            resolve_specs(specs, self.library)

    def screen(self, specs: Iterable[LoraSpec]) -> list:
        """``[(spec, reason)]`` for the specs lora-ext cannot apply itself, so that a shim can hand
        them to its host's built-in handler: files lora-ext cannot read, and files that bundle
        textual-inversion embeddings (``bundle_emb.*``, which a text encoder's token table takes,
        not a weight patch). Specs without a file are left to :meth:`use_specs` to report."""
        from .engine.models import cached_lora, remember_lora
        from .network import load_lora

        out = []
        for spec in specs:
            if spec.path is None:
                continue
            lora = cached_lora(spec.path)
            if lora is None:
                try:
                    lora = load_lora(spec.path)
                except (LoraExtError, OSError) as exc:
                    out.append((spec, f"lora-ext cannot read it ({exc})"))
                    continue
                remember_lora(spec.path, lora)
            bundled = {key.split(".")[1] for prefix, group in lora.groups.items() if prefix.startswith("bundle_emb")
                       for key in getattr(group, "keys", {}).values() if key.count(".") >= 1}
            if bundled:
                out.append((spec, f"it bundles {len(bundled)} textual-inversion embedding"
                                  f"{'s' if len(bundled) > 1 else ''} ({', '.join(sorted(bundled))})"))
        return out

    @property
    def family(self) -> Optional[str]:
        return None if self.bound is None else self.bound.family

    def reports(self) -> list:
        """One :class:`LoraReport` per LoRA of the current list (applied modules, unmatched keys).

        A key is reported when no component group applied it; its reason is the most specific
        one given (a shape mismatch rather than "no such module" in the other group).
        """
        hs = [h for h in self.handles.values() if getattr(h, "alive", False)]
        out = []
        for i, spec in enumerate(self._applied):
            applied = 0
            reasons: dict = {}
            counts: dict = {}
            for h in hs:
                reps = getattr(h, "reports", [])
                if i >= len(reps):
                    continue
                r = reps[i]
                applied += r.applied
                for u in r.unmatched:
                    counts[u.key] = counts.get(u.key, 0) + 1
                    old = reasons.get(u.key)
                    if old is None or (old.startswith("no such module") and not u.reason.startswith("no such module")):
                        reasons[u.key] = u.reason
            unmatched = [{"key": k, "reason": reasons[k]} for k in sorted(reasons) if counts[k] == len(hs)]
            out.append(LoraReport(spec, applied, unmatched))
        return out

    def strengths(self) -> dict:
        """(component, module path) -> {LoRA name: strength now}, over both groups."""
        out = {}
        for h in self.handles.values():
            if getattr(h, "alive", False):
                out.update(h.strengths())
        if self.partner is not None:
            expert = getattr(self.partner.bound.host, "expert", None) if self.partner.bound else None
            out.update({(f"{c} ({expert or 'second'} expert)", m): v for (c, m), v in self.partner.strengths().items()})
        return out

    def close(self) -> None:
        """Restore everything and forget the model."""
        with self._lock:
            self._release()
            self._drop_partner()
            self.bound = None

    # --- hook implementations -------------------------------------------------------------
    @hookimpl
    def lora_ext_model_loaded(self, session, model):
        if session is not self:
            return
        with self._lock:
            new = bind(model)
            second = getattr(model, "second_expert", None)
            self._release()
            self._drop_partner()
            self.bound = new
            if second is not None:
                # the second expert: its own binding and handles, the same LoRAs and step clock
                self.partner = Session(self.library, method=self.method, te_method=self.te_method,
                                       label=f"{self.label} ({second.expert or 'second'} expert)".strip(),
                                       record_buffer=self.record_buffer)
                self.partner.load_model(second)
            if self.specs:
                self._apply()
                self._position(0)
                self._follow_partner()

    @hookimpl
    def lora_ext_specs_resolved(self, session, specs, hires, total_steps):
        if session is not self:
            return
        with self._lock:
            specs = list(specs)
            self.resolve(specs)
            changed = specs != self._applied or not self._alive_handles(bool(specs))
            self.specs = specs
            self.hires = bool(hires)
            self.total_steps = total_steps
            self.step = None
            if self.bound is None:
                return  # applied when the model arrives
            if changed:
                self._apply()
            self._position(0)
            self._follow_partner()

    @hookimpl
    def lora_ext_step_begins(self, session, step, total_steps, sigma):
        if session is not self:
            return
        with self._lock:
            self.step, self.total_steps, self.sigma = step, total_steps, sigma
            h = self.handles.get("unet")
            if h is not None and h.alive:
                h.update(step, total_steps, hires=self.hires)
            if self.partner is not None:
                self.partner.begin_step(step, total_steps, sigma)

    @hookimpl
    def lora_ext_run_ends(self, session, restore):
        if session is not self:
            return
        with self._lock:
            self.step = None
            if restore:
                self._release()
            if self.partner is not None:
                self.partner.end_run(restore=restore)

    # --- internals ---------------------------------------------------------------------------
    def _alive_handles(self, want: bool) -> bool:
        if not want:
            return True
        return bool(self.handles) and all(h.alive for h in self.handles.values())

    def _groups(self) -> list:
        comps = list(self.bound.views)
        groups = []
        te = [c for c in comps if c in TE_COMPONENTS]
        # offloaded components get their weights put back by the offloader: never fuse there
        moved = {c for c in comps if getattr(self.bound.views[c], "offloaded", None)}
        if te:
            groups.append(("te", te, "onthefly" if moved & set(te) else self.te_method))
        if "unet" in comps:
            groups.append(("unet", ["unet"], "onthefly" if "unet" in moved else self.method))
        return groups

    def _apply(self) -> None:
        from .engine import apply  # the engine needs torch; import it when first used

        from .experts import for_expert

        # a two-expert LoRA pair: this model's expert applies its own file (lora_ext.experts)
        specs = [for_expert(s, getattr(self.bound.host, "expert", None)) for s in self.specs]
        shared_cache = None
        for group, comps, method in self._groups():
            h = self.handles.get(group)
            if h is not None and h.alive:
                h.set(specs)
            elif specs:
                model = {c: self.bound.views[c] for c in comps}
                h = apply(model, specs, method, keymap=self.bound.keymap_for(comps), record_buffer=self.record_buffer)
                self.handles[group] = h
            else:
                continue
            # both groups read the same files: one loaded copy serves both
            cache = getattr(h, "_loras", None)
            if isinstance(cache, dict):
                if shared_cache is None:
                    shared_cache = cache
                elif cache is not shared_cache:
                    shared_cache.update(cache)
                    h._loras = shared_cache
        self._applied = specs
        self._check_reports()

    def _position(self, step: int) -> None:
        """Text encoders at step 0 of the run; the UNet at ``step`` until a step is announced."""
        for group, h in self.handles.items():
            if h.alive:
                h.update(step, self.total_steps, hires=self.hires)

    def _check_reports(self) -> None:
        self.errors = []
        # a model with only some components (a host's text-encoder or UNet node) legitimately
        # gets LoRAs with nothing for it: only a whole model makes "nothing fits" an error
        whole = "unet" in self.bound.views and any(c in self.bound.views for c in TE_COMPONENTS)
        for r in self.reports():
            if r.applied == 0 and r.unmatched and whole:
                why = _base_model_note(r.path, self.bound)
                self.errors.append(f"{r.spec.tag or r.name}: none of its {len(r.unmatched)} keys fits "
                                   f"{self.bound.label}{why}")
            elif r.unmatched:
                log.info("lora-ext: %s: %d keys not applied (first: %s: %s)", r.name, len(r.unmatched),
                         r.unmatched[0]["key"], r.unmatched[0]["reason"])
        for e in self.errors:
            log.warning("lora-ext: %s", e)

    def _follow_partner(self) -> None:
        """The second expert takes the same list (each expert its own file of a pair); its
        problems are this session's problems."""
        if self.partner is None:
            return
        self.partner.library = self.library
        if self.partner.method != self.method:
            self.partner.end_run(restore=True)
            self.partner.method = self.method
        self.partner.use_specs(self.specs, hires=self.hires, total_steps=self.total_steps)
        self.errors.extend(e for e in self.partner.errors if e not in self.errors)

    def _drop_partner(self) -> None:
        if self.partner is not None:
            self.partner.close()
            self.partner = None

    def _release(self) -> None:
        """Take every LoRA off the current model; forget handles whose weights were replaced."""
        for group, h in list(self.handles.items()):
            try:
                h.remove()
            except Exception as exc:  # the host replaced the weights: nothing to give back
                log.info("lora-ext: %s weights changed under the LoRAs (%s); forgetting them", group, exc)
                _abandon(h)
        self.handles.clear()
        self._applied = []


def spec_from_inputs(name: str, path: Optional[str], *, unet: float = 1.0, te: float = 1.0, blocks: str = "",
                     keyframes: str = "") -> LoraSpec:
    """A spec from a node's inputs, read with the prompt grammar (for node-based hosts).

    ``blocks``: what ``lbw=`` takes (a preset name, or 12/17/20/26 numbers) or named block
    arguments (``in=0.5:mid=0:out=1``, ``lbw=...``); ``keyframes``: ``w@pos,...`` that multiply
    the UNet strength over the run (``0@0,1@0.5``: off at the start, full from half way).
    Errors name the input.
    """
    from .prompt import PromptSyntaxError, format_weight, parse_tag, parse_weight
    from .spec import Keyframes

    parts = ["x", format_weight(float(te)), format_weight(float(unet))]
    b = (blocks or "").strip()
    if b:
        parts += [x.strip() for x in b.split(":") if x.strip()] if "=" in b else [f"lbw={b}"]
    tag = "<lora:" + ":".join(parts) + ">"
    try:
        spec = parse_tag(tag)
    except PromptSyntaxError as exc:
        raise LoraExtError(f"{name}: block weights {b!r}: {exc.problem}") from None
    kf = (keyframes or "").strip()
    if kf:
        try:
            w = parse_weight(kf)
        except ValueError as exc:
            raise LoraExtError(f"{name}: keyframes {kf!r}: {exc}") from None
        spec.unet = (Keyframes(tuple((a * unet, p) for a, p in w.points)) if isinstance(w, Keyframes)
                     else float(w) * unet)
    spec.name, spec.path = name, path
    spec.tag = f"{name} ({tag[len('<lora:x:'):-1]}{', keyframes ' + kf if kf else ''})"
    return spec


def _as_float(sigma) -> float:
    if hasattr(sigma, "numel"):
        return float(sigma.reshape(-1)[0]) if sigma.numel() else float("nan")
    return float(sigma)


def _base_model_note(path, bound) -> str:
    try:
        from .detect import detect_base_model
        from .network import load_lora

        base = detect_base_model(load_lora(path))
    except Exception:  # best effort: the message stands without it
        return ""
    if base.name not in ("unknown", bound.family):
        return f" (it is an {base.label} LoRA)" if base.label[:1] in "AEIOS" else f" (it is a {base.label} LoRA)"
    return ""
