"""The A1111 / SD.Next shim: host events in, seam calls out (see ``lora_ext.session``).

What it registers (``install()``, called by ``scripts/lora_ext_script.py``):

* the ``lora`` extra-network handler, with ``lyco`` and ``loractl`` as aliases, in place of the
  built-in one (re-asserted before every generation); with the setting "Handle ... with
  lora-ext" off, it hands every call to the built-in handler instead;
* ``on_model_loaded``: the session is told the new model (LoRAs come off the old one, go on
  the new one);
* ``on_cfg_denoiser``: the step about to run (A1111's own prompt-editing step count:
  denoiser calls, divided by two for second-order samplers); on diffusers models (SD.Next) a
  forward pre-hook on the UNet reads the host's ``state.sampling_step`` instead;
* ``on_infotext_pasted``: LoRA names mapped back to local files by hash, recorded tags put
  back into the prompt;
* ``on_ui_settings``: the "lora-ext" settings section (folders, method, restore, infotext).

The extra-network handler's ``activate`` parses the tags with the one grammar
(:func:`lora_ext.prompt.parse_tag`), resolves them in the LoRA folders and hands them to the
session (the hires pass, ``p.is_hr_pass``, uses ``hr=``); ``deactivate`` ends the run.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Optional

from lora_ext.errors import LoraExtError
from lora_ext.hostmodel import HostModel
from lora_ext.prompt import format_tag, parse_tag
from lora_ext.resolve import LoraLibrary
from lora_ext.session import Session

log = logging.getLogger("lora_ext")

SECTION = ("lora_ext", "lora-ext")
KINDS = ("lora", "lyco", "loractl")
#: setting key -> (default, label, widget, choices)
OPTIONS = {
    "lora_ext_enabled": (True, "Handle <lora:...>, <lyco:...> and <loractl:...> with lora-ext (replaces the "
                               "built-in Lora handler; off: the built-in handler takes them)", None, None),
    "lora_ext_dirs": ("", "LoRA folders, one per line or separated by ';' (empty: the webui's Lora and "
                          "LyCORIS folders)", "textbox", None),
    "lora_ext_method": ("auto", "Apply method: auto (fuse what is constant, per LoRA the faster way for what "
                                "changes per step), fuse, or onthefly", "radio", ["auto", "fuse", "onthefly"]),
    "lora_ext_restore": ("keep", "After a generation: keep the LoRAs applied until they change (fastest), or "
                                 "restore the model's weights", "radio", ["keep", "restore"]),
    "lora_ext_infotext": (True, "Write LoRA names, hashes and schedules to infotext", None, None),
    "lora_ext_fallback": (True, "Hand a LoRA lora-ext cannot apply (a model or file kind it does not handle, "
                                "bundled embeddings) to the built-in handler", None, None),
    "lora_ext_trigger_words": (False, "Append each LoRA's trigger words (from its metadata) to the prompt",
                               None, None),
}
STATUS_ROUTE = "/lora-ext/v1/status"
INFOTEXT_FALLBACK = "lora-ext fallback"  # "name: why, ..." for LoRAs the built-in handler took
INFOTEXT_TRIGGERS = "lora-ext triggers"
INFOTEXT_TAGS = "lora-ext"  # the canonical tags of the run (schedules included)
INFOTEXT_HASHES = "Lora hashes"  # same key and format as the built-in handler ("name: hash, ...")
_REMOVE_SYMBOLS = str.maketrans("", "", ":,")
_TAG_NAME = re.compile(r"<(lora|lyco|loractl):([^:>]+)", re.IGNORECASE)
_TAG = re.compile(r"<(?:lora|lyco|loractl):[^>]*>", re.IGNORECASE)


def _gradio():
    try:
        import gradio
    except ImportError:  # settings work without widgets (tests, API-only use)
        return None
    # a folder named gradio on the path (the webuis' /tmp/gradio temp folder when the cwd is
    # /tmp) imports as an empty namespace package
    return gradio if hasattr(gradio, "Radio") and hasattr(gradio, "Textbox") else None


def _tag_text(params) -> str:
    """The tag an ExtraNetworkParams came from (the webui split it on ':')."""
    return "<lora:" + ":".join(str(x) for x in params.items) + ">"


class _StepCounter:
    """A1111's step numbering: the CFG denoiser's call count (what prompt editing uses), per
    sampler step (second-order samplers call it twice)."""

    def step(self, params) -> int:
        den = getattr(params, "denoiser", None)
        calls = getattr(den, "step", None)
        total = max(int(params.total_sampling_steps or 1), 1)
        if calls is None:
            return min(int(params.sampling_step), total - 1)
        sampler = getattr(den, "sampler", None)
        options = getattr(getattr(sampler, "config", None), "options", None) or {}
        per_step = 2 if options.get("second_order") else 1
        return min(int(calls) // per_step, total - 1)


class A1111Shim:
    """One per webui process (``SHIM``)."""

    def __init__(self):
        self.session: Optional[Session] = None
        self.handlers: dict = {}  # kind -> our handler object
        self.builtin = None  # the handler we replaced
        self.builtin_aliases: dict = {}
        self._builtin_used = False  # the built-in handler applied something since we last ran
        self._params: dict = {}  # kind -> params of the current activation
        self._model = None  # the sd_model the session is bound to
        self._library: Optional[LoraLibrary] = None
        self._hashes: dict = {}  # path -> ((size, mtime), short hash)
        self._steps = _StepCounter()
        self._step_hook = None  # forward pre-hooks on a diffusers model (SD.Next)
        self._p = None  # the processing object of the current generation
        self._fallback: list = []  # params handed to the built-in handler this generation
        self._handed: list = []  # [(tag, why)] the built-in handler took in the last generation
        self._lock = threading.RLock()
        self._module_init_warned: Optional[str] = None

    # --- settings ----------------------------------------------------------------------------
    @staticmethod
    def opt(key):
        from modules import shared

        default = OPTIONS[key][0]
        data = getattr(shared.opts, "data", None)
        if isinstance(data, dict) and key in data:
            return data[key]
        return getattr(shared.opts, key, default)

    def folders(self) -> list:
        text = str(self.opt("lora_ext_dirs") or "").strip()
        if text:
            return [f.strip() for f in re.split(r"[;\n]", text) if f.strip()]
        from modules import shared

        cmd = getattr(shared, "cmd_opts", None)
        out = [getattr(cmd, "lora_dir", None), getattr(cmd, "lyco_dir_backcompat", None), getattr(cmd, "lyco_dir", None)]
        out = [f for f in out if f]
        if not out:
            out = [os.path.join(getattr(shared, "models_path", "models"), "Lora")]
        return list(dict.fromkeys(out))

    def library(self) -> LoraLibrary:
        folders = self.folders()
        if self._library is None or self._library.folders != folders:
            self._library = LoraLibrary(folders)
        return self._library

    # --- registration ------------------------------------------------------------------------
    def install(self) -> None:
        """Register the callbacks (idempotent; the webui clears them before reloading scripts)."""
        from modules import script_callbacks as cb

        pairs = [(cb.on_model_loaded, self.on_model_loaded), (cb.on_cfg_denoiser, self.on_cfg_denoiser),
                 (cb.on_infotext_pasted, self.on_infotext_pasted), (cb.on_ui_settings, self.on_ui_settings),
                 (cb.on_before_ui, self.take_over), (cb.on_app_started, self._on_app_started),
                 (cb.on_script_unloaded, self.unload)]
        if hasattr(cb, "on_ui_tabs"):
            pairs.append((cb.on_ui_tabs, self.on_ui_tabs))
        remove = getattr(cb, "remove_callbacks_for_function", None)
        for register, fn in pairs:
            if remove is not None:
                remove(fn)
            register(fn)

    def _on_app_started(self, demo, app) -> None:
        # before_ui callbacks run last-registered first, so the built-in handler registers
        # after ours there; once the app has started, ours takes the tag back
        self.take_over()
        add_route = getattr(app, "add_api_route", None)
        if add_route is not None:
            add_route(STATUS_ROUTE, self.status, methods=["GET"])
            from .inspect_view import INSPECT_ROUTE, api_inspect

            add_route(INSPECT_ROUTE, api_inspect(self), methods=["GET"])

    def on_ui_tabs(self) -> list:
        """The "lora-ext" tab: the inspect report of one LoRA (hosts/a1111/inspect_view.py)."""
        from .inspect_view import ui_tabs

        return ui_tabs(self, _gradio())

    def status(self, weights: bool = False) -> dict:
        """What lora-ext holds now (``GET /lora-ext/v1/status``): the bound model, the LoRAs of
        the last generation, what went to the built-in handler, binding notes, problems; with
        ``weights=true`` a digest of every UNet / text-encoder weight (to check a restore)."""
        # never touches shared.sd_model: in the webuis reading it may wait for the main thread
        # to load a model, which calls on_model_loaded, which waits for this lock
        with self._lock:
            s = self.session
            out = {"enabled": bool(self.opt("lora_ext_enabled")),
                   "model": None if s is None or s.bound is None else s.bound.label,
                   "family": None if s is None else s.family,
                   "method": None if s is None else s.method,
                   "loras": [] if s is None else [x for x in (_safe_tag(sp) for sp in s.specs) if x],
                   "fallback": [f"{tag}: {why}" for tag, why in self._handed],
                   "notes": [] if s is None or s.bound is None else list(s.bound.notes),
                   "errors": [] if s is None else list(s.errors),
                   "warnings": [w for w in (module_init_problem(),) if w]}
            if weights:
                from lora_ext.hostmodel import weights_digest

                if s is None or s.bound is None:
                    out["weights"] = {"error": "no model bound yet (lora-ext binds at the first generation)"}
                else:
                    out["weights"] = weights_digest(s.bound.host)
            return out

    def _make_handlers(self) -> None:
        if self.handlers:
            return
        from modules import extra_networks

        shim = self

        class LoraExtNetwork(extra_networks.ExtraNetwork):
            """lora-ext's handler for one tag kind (the webui's ExtraNetwork interface)."""

            def __init__(self, kind):
                super().__init__(kind)
                self.kind = kind

            def activate(self, p, params_list, *args, **kwargs):
                shim.activate(p, params_list, kind=self.kind)

            def deactivate(self, p, *args, **kwargs):
                shim.deactivate(p)

        for kind in KINDS:
            self.handlers[kind] = LoraExtNetwork(kind)

    def take_over(self) -> None:
        """Be the handler of ``lora`` (aliases ``lyco``, ``loractl``); remember the built-in one."""
        from modules import extra_networks as en

        self._make_handlers()
        reg = en.extra_network_registry
        ours = self.handlers["lora"]
        cur = reg.get("lora")
        if cur is not ours:
            if cur is not None:
                self.builtin = cur
            reg["lora"] = ours
        aliases = getattr(en, "extra_network_aliases", None)
        for kind in KINDS[1:]:
            if aliases is not None:  # A1111: aliases merge into one activate() call
                prev = aliases.get(kind)
                if prev is not None and prev is not ours:
                    self.builtin_aliases[kind] = prev
                aliases[kind] = ours
            else:  # SD.Next: no aliases; each kind is its own handler, merged in activate()
                prev = reg.get(kind)
                if prev is not None and prev is not self.handlers[kind]:
                    self.builtin_aliases[kind] = prev
                reg[kind] = self.handlers[kind]

    def give_back(self) -> None:
        """Put the built-in handler back (scripts unloading)."""
        try:
            from modules import extra_networks as en
        except ImportError:
            return
        reg = en.extra_network_registry
        if self.builtin is not None and reg.get("lora") is self.handlers.get("lora"):
            reg["lora"] = self.builtin
        aliases = getattr(en, "extra_network_aliases", None)
        for kind in KINDS[1:]:
            table = aliases if aliases is not None else reg
            if table.get(kind) in (self.handlers.get("lora"), self.handlers.get(kind)):
                if kind in self.builtin_aliases:
                    table[kind] = self.builtin_aliases[kind]
                else:
                    table.pop(kind, None)

    def unload(self) -> None:
        with self._lock:
            if self.session is not None:
                self.session.close()
            self._remove_step_hook()
            self.give_back()

    # --- the model ---------------------------------------------------------------------------
    @staticmethod
    def host_model(sd_model) -> HostModel:
        """How the webui holds its model: compvis (A1111, reForge), Forge 2.x's ``forge_objects``,
        or a diffusers pipeline (SD.Next). Text encoders are named per component: reForge's
        (and Forge's) CLIP-G / CLIP-H are transformers-named, A1111's OpenCLIP ones are not."""
        label = getattr(getattr(sd_model, "sd_checkpoint_info", None), "name_for_extra", "") or ""
        family = ("sdxl" if getattr(sd_model, "is_sdxl", False) else "sd2" if getattr(sd_model, "is_sd2", False)
                  else "sd1" if getattr(sd_model, "is_sd1", False) else None)
        inner = getattr(sd_model, "model", None)
        if inner is not None and hasattr(inner, "diffusion_model"):
            comps, naming = {"unet": inner.diffusion_model}, {"unet": "ldm"}
            if hasattr(sd_model, "conditioner"):
                embedders = [getattr(e, "wrapped", e) for e in getattr(sd_model.conditioner, "embedders", [])]
            else:
                embedders = [getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)]
            texts = [t for t in (_text_component(e) for e in embedders) if t is not None]
            for comp, (root, how) in zip(("te1", "te2"), texts):
                comps[comp], naming[comp] = root, how
            return HostModel(comps, naming=naming, family=family, label=label)
        forge = getattr(sd_model, "forge_objects", None)
        if forge is not None:
            return _forge_host_model(forge, family, label)
        pipe = getattr(sd_model, "pipe", sd_model)
        comps = _pipeline_components(pipe)
        if not comps:
            raise LoraExtError(f"lora-ext does not know how this webui holds its model ({type(sd_model).__name__})")
        first, second = _experts(pipe)
        if first is not None and second is not None:
            # Wan 2.2 A14B with both experts resident: transformer is the high-noise expert,
            # transformer_2 the low-noise one; each takes its own file of a HIGH/LOW pair
            low = HostModel({"unet": second}, naming="diffusers", label=f"{label} transformer_2".strip(), expert="low")
            return HostModel(comps, naming="diffusers", label=label, expert="high", second_expert=low)
        if second is not None:
            return HostModel(comps, naming="diffusers", label=label, expert="low")  # a low-noise-only stage
        return HostModel(comps, naming="diffusers", label=label)

    def _session_for(self, sd_model, method: Optional[str] = None) -> Session:
        method = method or self.opt("lora_ext_method")
        if self.session is None:
            self.session = Session(self.library(), method=method, te_method="fuse", label="webui")
        s = self.session
        s.library = self.library()
        if s.method != method:
            s.end_run(restore=True)
            s.method = method
        if s.bound is None or self._model is not sd_model:
            host = self.host_model(sd_model)
            # Every host keeps the engine's background restore record, SD.Next included. (Issue 14:
            # SD.Next's own handler failing with "Cannot copy out of meta tensor" after a lora-ext
            # generation was blamed on it; the cause was two overlapping model loads that left
            # torch's module constructor patched, see ``module_init_problem``.)
            s.load_model(host)
            self._model = sd_model
            self._install_step_hook(s)
        return s

    def _install_step_hook(self, s: Session) -> None:
        """Diffusers models (SD.Next) have no CFG-denoiser callback: read the host's step counter
        from a forward pre-hook on the UNet."""
        self._remove_step_hook()
        if s.bound is None or s.bound.host.naming_of("unet") != "diffusers":
            return
        unet = s.bound.host.components.get("unet")
        if unet is None or not hasattr(unet, "register_forward_pre_hook"):
            return

        def pre(module, args):
            from modules import shared

            st = shared.state
            total = max(int(getattr(st, "sampling_steps", 0) or 0), 1)
            if self.session is not None and self.session.handles:
                self._follow_hires()
                self.session.begin_step(min(int(getattr(st, "sampling_step", 0) or 0), total - 1), total)

        def pre_te(module, args):
            if self.session is not None and self.session.handles:
                self._follow_hires()

        hooks = [unet.register_forward_pre_hook(pre)]
        second = s.bound.host.second_expert
        if second is not None and hasattr(second.components.get("unet"), "register_forward_pre_hook"):
            # Wan 2.2's low-noise expert runs the later steps without the first one
            hooks.append(second.components["unet"].register_forward_pre_hook(pre))
        for comp in ("te1", "te2", "te3"):
            te = s.bound.host.components.get(comp)
            if te is not None and hasattr(te, "register_forward_pre_hook"):
                hooks.append(te.register_forward_pre_hook(pre_te))
        self._step_hook = hooks

    def _follow_hires(self) -> None:
        """SD.Next sets ``p.is_hr_pass`` for the hires pass without activating extra networks
        again (processing_diffusers.py: only with a refiner prompt or a skipped base pass):
        the first text-encoder or UNet call of that pass switches to the hires strengths."""
        p = self._p
        s = self.session
        if p is None or s is None:
            return
        hires = bool(getattr(p, "is_hr_pass", False))
        if hires != s.hires:
            s.use_specs(s.specs, hires=hires, total_steps=_expected_steps(p, hires))
            if self.opt("lora_ext_infotext"):
                self._write_infotext(p, s.specs, hires)

    def _remove_step_hook(self) -> None:
        if self._step_hook is not None:
            for h in self._step_hook:
                h.remove()
            self._step_hook = None

    # --- host events -------------------------------------------------------------------------
    def before_generation(self, p) -> None:
        """The always-on script's ``process``: make sure our handler is the one the webui calls."""
        with self._lock:
            self.take_over()
            self._handed = []
            if getattr(p, "disable_extra_networks", False) and self.session is not None:
                self.session.end_run(restore=True)  # no tags will be read: run without LoRAs

    def activate(self, p, params_list, kind: str = "lora") -> None:
        self._warn_module_init()
        with self._lock:
            if not self.opt("lora_ext_enabled"):
                self._step_aside(p, params_list, kind)
                return
            self._release_builtin(p)
            self._p = p
            self._params[kind] = list(params_list)
            params = [x for k in KINDS for x in self._params.get(k, [])]
            specs = [parse_tag(_tag_text(x)) for x in params]
            hires = bool(getattr(p, "is_hr_pass", False))
            try:
                s = self._session_for(_sd_model(p))
            except LoraExtError as exc:  # a model lora-ext cannot bind: every LoRA to the built-in
                if not self._hand_over(p, [(x, sp, str(exc)) for x, sp in zip(params, specs)]):
                    raise
                return
            handled, fallback = list(zip(params, specs)), []
            if self.opt("lora_ext_fallback") and self.builtin is not None:
                for sp in specs:
                    _resolvable(s, sp)
                unhandled = {id(sp): why for sp, why in s.screen(specs)}
                fallback = [(x, sp, unhandled[id(sp)]) for x, sp in handled if id(sp) in unhandled]
                handled = [(x, sp) for x, sp in handled if id(sp) not in unhandled]
            if fallback:
                # the built-in handler patches weights behind our back: keep ours out of the
                # UNet's weights (on the fly) while it is in, so neither undoes the other
                s = self._session_for(_sd_model(p), method="onthefly")
            mine = [sp for _, sp in handled]
            s.use_specs(mine, hires=hires, total_steps=_expected_steps(p, hires))
            p.lora_ext_deactivated = False
            if self.opt("lora_ext_trigger_words"):
                self._add_trigger_words(p, mine, hires)
            if self.opt("lora_ext_infotext"):
                self._write_infotext(p, mine, hires)
            if fallback:
                self._hand_over(p, fallback, partial=True)

    def _hand_over(self, p, items, partial: bool = False) -> bool:
        """Give ``items`` (``[(params, spec, why)]``) to the built-in handler, saying so once per
        LoRA on the console and in the infotext. False when there is no built-in to take them."""
        if self.builtin is None or not self.opt("lora_ext_fallback"):
            return False
        if not partial and self.session is not None and self.session.handles:
            self.session.end_run(restore=True)
        notes = []
        for x, spec, why in items:
            name = spec.name or _tag_text(x)
            log.warning("lora-ext: %s: %s; the built-in Lora handler took it", name, why)
            notes.append(f"{name}: {why}".translate(str.maketrans(",", ";")))
            self._handed.append((_tag_text(x), why))
        if notes:
            p.extra_generation_params[INFOTEXT_FALLBACK] = ", ".join(notes)
        if not self._builtin_used:
            self._forget_cached_prompts()
        self._builtin_used = True
        self._fallback = [x for x, _, _ in items]
        self.builtin.activate(p, list(self._fallback))
        return True

    def _add_trigger_words(self, p, specs, hires: bool) -> None:
        """Append each LoRA's trigger words to the prompts of this pass (opt-in), once."""
        from lora_ext.metadata import trigger_words

        words = []
        for sp in specs:
            lora = None
            if sp.path:
                from lora_ext.engine.models import cached_lora

                lora = cached_lora(sp.path)
            for w in (trigger_words(getattr(lora, "metadata", None) or {}) if lora is not None else []):
                if w not in words:
                    words.append(w)
        if not words:
            return
        attr = "hr_prompts" if hires and hasattr(p, "hr_prompts") else "prompts"
        prompts = getattr(p, attr, None)
        if isinstance(prompts, list):
            add = ", ".join(words)
            setattr(p, attr, [q if add in q else (f"{q}, {add}" if q.strip() else add) for q in prompts])
            p.extra_generation_params[INFOTEXT_TRIGGERS] = add.translate(str.maketrans(",", ";"))

    def deactivate(self, p) -> None:
        with self._lock:
            if not self.opt("lora_ext_enabled"):
                if self.builtin is not None and not getattr(p, "lora_ext_builtin_deactivated", False):
                    p.lora_ext_builtin_deactivated = True
                    self.builtin.deactivate(p)
                return
            if getattr(p, "lora_ext_deactivated", False) or self.session is None:
                return
            p.lora_ext_deactivated = True
            if self._fallback and self.builtin is not None:
                self.builtin.deactivate(p)
            for e in self.session.errors:
                p.comment(f"lora-ext: {e}")
            restore = self.opt("lora_ext_restore") == "restore"
            if restore:
                self._release_builtin(p)  # its patches come off first: ours restore from what we wrote
            self.session.end_run(restore=restore)

    def on_cfg_denoiser(self, params) -> None:
        s = self.session
        if s is None or not s.handles or self._step_hook is not None:
            return
        s.begin_step(self._steps.step(params), max(int(params.total_sampling_steps or 1), 1), params.sigma)

    def on_model_loaded(self, sd_model) -> None:
        with self._lock:
            if self.session is None:
                return  # bound at the first generation
            try:
                self.session.load_model(self.host_model(sd_model))
                self._model = sd_model
                self._install_step_hook(self.session)
            except LoraExtError as exc:
                log.warning("lora-ext: %s", exc)
                self.session.close()
                self._model = None

    def _warn_module_init(self) -> None:
        """Say once on the console when torch builds new modules on ``meta`` (``module_init_problem``):
        the webui's own LoRA handler cannot work then, and it is not lora-ext's doing."""
        why = module_init_problem()
        if why and why != self._module_init_warned:
            log.warning("lora-ext: %s", why)
        self._module_init_warned = why

    # --- the built-in handler ----------------------------------------------------------------
    def _step_aside(self, p, params_list, kind) -> None:
        """Setting off: our LoRAs come off, the built-in handler gets the tags."""
        if self.session is not None and self.session.handles:
            self.session.end_run(restore=True)
        target = self.builtin if kind == "lora" else self.builtin_aliases.get(kind)
        if target is not None:
            if not self._builtin_used:
                self._forget_cached_prompts()
            self._builtin_used = True
            target.activate(p, params_list)

    @staticmethod
    def _forget_cached_prompts() -> None:
        """SD.Next caches prompt embeddings keyed by the prompt and its tags
        (modules/prompt_parser_diffusers.py ``cache``): when the handler of the tags changes,
        the same tags no longer mean the same text-encoder weights."""
        cache = getattr(sys.modules.get("modules.prompt_parser_diffusers"), "cache", None)
        if hasattr(cache, "clear"):
            cache.clear()

    def _release_builtin(self, p) -> None:
        """Back from the built-in handler: let it take its networks off before we patch weights
        (its patched forwards would otherwise restore its backups over ours later), and forget
        its backups, which hold weights of before our last change."""
        if not self._builtin_used or self.builtin is None:
            return
        self._builtin_used = False
        self._forget_cached_prompts()
        self._fallback = []
        self.builtin.activate(p, [])
        sd_model = _sd_model(p)
        if getattr(sd_model, "forge_objects", None) is not None:
            _unpatch_forge(sd_model)
        try:
            import networks as builtin_networks  # extensions-builtin/Lora, on sys.path in the webui
        except ImportError:
            return
        apply_weights = getattr(builtin_networks, "network_apply_weights", None)
        if apply_weights is None:
            return
        reset = getattr(builtin_networks, "network_reset_cached_weight", None)
        try:
            host = self.host_model(sd_model)
        except LoraExtError:
            return
        for root in host.components.values():
            for m in root.modules():
                if getattr(m, "network_current_names", ()):
                    apply_weights(m)  # nothing wanted any more: restores its backup now
                if reset is not None and getattr(m, "network_weights_backup", None) is not None:
                    reset(m)

    # --- infotext ----------------------------------------------------------------------------
    def short_hash(self, path) -> Optional[str]:
        from lora_ext.io import short_hash

        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = (st.st_size, st.st_mtime_ns)
        hit = self._hashes.get(path)
        if hit is None or hit[0] != stamp:
            try:
                hit = (stamp, short_hash(path) if str(path).lower().endswith(".safetensors") else None)
            except (LoraExtError, OSError):
                hit = (stamp, None)
            self._hashes[path] = hit
        return hit[1]

    def _write_infotext(self, p, specs, hires: bool) -> None:
        if not hires or not hasattr(p, "lora_hashes"):
            p.lora_hashes = {}
        for s in specs:
            h = self.short_hash(s.path) if s.path else None
            if h:
                p.lora_hashes[s.name.translate(_REMOVE_SYMBOLS)] = h
        if p.lora_hashes:
            p.extra_generation_params[INFOTEXT_HASHES] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())
        tags = []
        for s in specs:
            try:
                tags.append(format_tag(s))
            except ValueError:
                pass
        key = INFOTEXT_TAGS + (" hr" if hires else "")
        if tags:
            p.extra_generation_params[key] = " ".join(tags)
        else:
            p.extra_generation_params.pop(key, None)

    def find_by_hash(self, short: str):
        for f in self.library().files():
            if f.ext == ".safetensors" and self.short_hash(f.path) == short:
                return f
        return None

    def on_infotext_pasted(self, infotext, d) -> None:
        prompt = d.get("Prompt")
        if not isinstance(prompt, str):
            return
        hashes = {}
        for item in str(d.get(INFOTEXT_HASHES) or "").split(","):
            name, sep, h = item.partition(":")
            if sep and name.strip() and h.strip():
                hashes[name.strip()] = h.strip()
        lib = self.library()
        renamed = {}

        def local_name(name: str) -> str:
            if name in renamed:
                return renamed[name]
            new = name
            if lib.find(name) is None and name.translate(_REMOVE_SYMBOLS) in hashes:
                f = self.find_by_hash(hashes[name.translate(_REMOVE_SYMBOLS)])
                if f is not None:
                    new = f.key
            renamed[name] = new
            return new

        def fix(tag_text: str) -> str:
            return _TAG_NAME.sub(lambda m: f"<{m.group(1)}:{local_name(m.group(2).strip())}", tag_text)

        prompt = fix(prompt)
        present = {local_name(m.group(2).strip()) for m in _TAG_NAME.finditer(prompt)}
        missing = [fix(t) for t in _TAG.findall(str(d.get(INFOTEXT_TAGS) or ""))]
        missing = [t for t in missing if _TAG_NAME.match(t) and _TAG_NAME.match(t).group(2).strip() not in present]
        if missing:
            prompt = (prompt.rstrip() + " " + " ".join(missing)).strip()
        d["Prompt"] = prompt

    # --- settings page -----------------------------------------------------------------------
    def on_ui_settings(self) -> None:
        from modules import shared

        gr = _gradio()
        for key, (default, label, widget, choices) in OPTIONS.items():
            component, args = None, None
            if gr is not None and widget == "radio":
                component, args = gr.Radio, {"choices": choices}
            elif gr is not None and widget == "textbox":
                component, args = gr.Textbox, {"lines": 2}
            shared.opts.add_option(key, shared.OptionInfo(default, label, component, args, section=SECTION))


def module_init_problem() -> Optional[str]:
    """A sentence when torch builds new modules with their parameters on ``meta``, else None.

    Found in the real SD.Next 058a7f0c (issue 14): diffusers' single-file loader builds every
    component under accelerate's ``init_empty_weights()``, which replaces
    ``torch.nn.Module.register_parameter`` for the whole process and, on exit, puts back the
    function it found (accelerate/big_modeling.py ``init_on_device``). Two model loads that
    overlap (SD.Next's boot-time autoload thread and a load asked for over the API meanwhile)
    can leave in that order: the second puts back the first one's patch, for good. Every module
    built afterwards has its parameters on ``meta``; SD.Next's own LoRA handler builds one
    ``nn.Linear`` / ``nn.Conv2d`` per LoRA factor (modules/lora/network_lora.py
    ``create_module``) and fails on every layer ("Cannot copy out of meta tensor"), so its
    images equal no LoRA at all. lora-ext builds no module when it applies or restores, and is
    unaffected. While a model load is under way the same state is normal (hence the "unless"
    in the sentence).
    """
    import torch

    fn = torch.nn.Module.register_parameter
    if getattr(fn, "__module__", None) == "torch.nn.modules.module":
        return None
    try:
        probe = torch.nn.Linear(1, 1, bias=False)
    except Exception:  # pragma: no cover - a patch that breaks module building altogether
        probe = None
    if probe is not None and probe.weight.device.type != "meta":
        return None
    owner = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
    return (f"torch.nn.Module.register_parameter is replaced by {owner}: modules built now get their "
            "parameters on the meta device (no data). Unless a model is loading right now, two model loads "
            "overlapped and left accelerate's init_empty_weights() patch in place; the webui's own LoRA "
            "handler will fail with \"Cannot copy out of meta tensor\" (lora-ext is unaffected). "
            "Restart the webui, and load one model at a time.")


def _sd_model(p):
    model = getattr(p, "sd_model", None)
    if model is None:
        from modules import shared

        model = shared.sd_model
    return model


#: SD.Next's pipeline attributes (modules/lora/networks.py ``default_components``): the denoiser is
#: ``unet`` (SD1/SD2/SDXL) or ``transformer`` (Flux, Chroma, SD3, Qwen-Image, HunyuanVideo, Wan,
#: Lumina2, ...); the text encoders are ``text_encoder`` .. ``text_encoder_3`` in an order that
#: depends on the pipeline (Flux: CLIP-L, T5; SD3: CLIP-L, CLIP-G, T5; Chroma, Wan: T5 / UMT5
#: only; HunyuanVideo: Llama, CLIP-L; Qwen-Image: Qwen2.5-VL)
_PIPE_TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")
_T5_TYPES = ("t5", "umt5", "mt5")


def _model_type(module) -> str:
    cfg = getattr(module, "config", None)
    kind = getattr(cfg, "model_type", None) or (cfg.get("model_type") if isinstance(cfg, dict) else None)
    if kind:
        return str(kind)
    name = type(module).__name__
    return "clip_text_model" if name.startswith("CLIPText") else "t5" if name.startswith(("T5", "UMT5")) else name


def _pipeline_components(pipe) -> dict:
    """``{component: module}`` of a diffusers pipeline as SD.Next holds it: the denoiser as
    ``unet``, each CLIP text encoder as ``te1`` then ``te2`` (CLIP-L, CLIP-G) and a T5 as ``te3``,
    whatever the pipeline's attribute order. Encoders lora-ext does not bind (HunyuanVideo's Llama,
    Qwen-Image's Qwen2.5-VL) are left out and logged once; Wan 2.2's second transformer is the
    second expert (:func:`_experts`)."""
    comps = {}
    denoiser = getattr(pipe, "unet", None)
    if denoiser is None:
        denoiser = getattr(pipe, "transformer", None)
    if denoiser is not None:
        comps["unet"] = denoiser
    clips = iter(("te1", "te2"))
    left = []
    for attr in _PIPE_TEXT:
        te = getattr(pipe, attr, None)
        if te is None or not hasattr(te, "named_modules"):
            continue
        kind = _model_type(te)
        if kind in _T5_TYPES and "te3" not in comps:
            comps["te3"] = te
        elif kind.startswith("clip"):
            comp = next(clips, None)
            if comp is None:
                left.append(f"{attr} ({kind})")
            else:
                comps[comp] = te
        else:
            left.append(f"{attr} ({kind})")
    second = getattr(pipe, "transformer_2", None)
    if second is not None and "unet" not in comps:
        comps["unet"] = second  # transformer_2 is the host model's second expert otherwise (_experts)
    if left:
        key = (id(pipe), tuple(left))
        if key not in _NOTED:
            _NOTED.add(key)
            log.warning("lora-ext: %s: not taken by lora-ext (LoRA keys for it are reported as not applied): %s",
                        type(pipe).__name__, ", ".join(left))
    return comps


_NOTED: set = set()


def _experts(pipe) -> tuple:
    """``(transformer, transformer_2)`` of a two-expert pipeline (SD.Next's Wan 2.2 A14B; either
    may be None when SD.Next loaded one expert for a stage), ``(None, None)`` otherwise."""
    if not hasattr(pipe, "transformer_2"):
        return None, None
    def module(name):
        m = getattr(pipe, name, None)
        return m if m is not None and hasattr(m, "named_modules") else None
    return module("transformer"), module("transformer_2")


def _text_component(wrapped):
    """``(root, naming)`` of a text encoder: a transformers-named CLIP (A1111's CLIP-L, and
    reForge's / Forge's CLIP-L, CLIP-G and CLIP-H, ldm_patched or transformers modules) binds
    with diffusers naming from the CLIP model itself (so ``text_projection`` is found too); an
    OpenCLIP model (A1111's SD2 / SDXL CLIP-H, CLIP-G) with ldm naming."""
    transformer = getattr(wrapped, "transformer", None)
    if transformer is not None and hasattr(transformer, "named_modules"):
        return transformer, "diffusers"
    model = getattr(wrapped, "model", None)
    if model is not None and hasattr(model, "named_modules"):
        return model, "ldm"
    return None


def _forge_host_model(forge, family, label) -> HostModel:
    """Forge 2.x (backend/diffusion_engine/*.py): the UNet is ``forge_objects.unet.model.
    diffusion_model`` (backend/nn/unet.py, ldm names), the CLIPs are ``forge_objects.clip.
    cond_stage_model.clip_l / clip_g / clip_h`` (backend/nn/clip.py IntegratedCLIP, whose
    ``transformer`` is a transformers CLIPTextModel). The modules are shared by every clone
    of the patchers, so LoRAs fused into them stay in whatever patcher Forge samples with."""
    unet = getattr(getattr(getattr(forge, "unet", None), "model", None), "diffusion_model", None)
    if unet is None:
        raise LoraExtError("lora-ext does not know this Forge model (no forge_objects.unet.model.diffusion_model)")
    comps, naming = {"unet": unet}, {"unet": "ldm"}
    cond = getattr(getattr(forge, "clip", None), "cond_stage_model", None)
    texts = [getattr(getattr(cond, n, None), "transformer", None) for n in ("clip_l", "clip_h", "clip_g")]
    for comp, root in zip(("te1", "te2"), [t for t in texts if t is not None]):
        comps[comp], naming[comp] = root, "diffusers"
    # Flux / SD3 in Forge (backend/diffusion_engine/flux.py, sd35.py): the denoiser keeps BFL / SAI
    # names (bind finds the DiT family from them) and the T5 sits beside the CLIPs
    t5 = getattr(getattr(cond, "t5xxl", None), "transformer", None)
    if t5 is not None:
        comps["te3"], naming["te3"] = t5, "diffusers"
    if family not in ("sd1", "sd2", "sdxl"):
        family = None  # a DiT: its tables come from the module shapes
    return HostModel(comps, naming=naming, family=family, label=label)


def _safe_tag(spec) -> Optional[str]:
    try:
        return format_tag(spec)
    except ValueError:
        return None


def _forge_patchers(sd_model) -> list:
    """Every weight patcher that may hold the built-in handler's patches of ``sd_model``: those
    of its ``forge_objects`` (original, current, after LoRAs) and those the host's model
    management has loaded for it."""
    found = []
    for attr in ("forge_objects_original", "forge_objects", "forge_objects_after_applying_lora"):
        objs = getattr(sd_model, attr, None)
        found += [getattr(objs, "unet", None), getattr(getattr(objs, "clip", None), "patcher", None)]
    models = {id(getattr(p, "model", None)) for p in found if p is not None}
    for mm_name in ("ldm_patched.modules.model_management", "backend.memory_management"):
        mm = sys.modules.get(mm_name)
        for loaded in getattr(mm, "current_loaded_models", None) or []:
            patcher = getattr(loaded, "model", None)
            if id(getattr(patcher, "model", None)) in models:
                found.append(patcher)
    unique, seen = [], set()
    for p in found:
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def _unpatch_forge(sd_model) -> None:
    """Take the built-in handler's weight patches off Forge's / reForge's models now, before
    lora-ext writes weights (else the host writes its backups over them when it next loads a
    patcher for sampling). Forge 2.x: its LoraLoader restores its backups when refreshed with
    no patches (backend/patcher/lora.py). reForge and Forge Classic: ComfyUI-style
    ModelPatchers (ldm_patched/modules/model_patcher.py) keep a ``backup`` (shared by clones
    in reForge, per clone in Classic) that ``unpatch_model`` writes back and clears."""
    for patcher in _forge_patchers(sd_model):
        loader = getattr(patcher, "lora_loader", None)
        if loader is not None:
            loader.refresh(lora_patches={}, offload_device=getattr(patcher, "offload_device", "cpu"))
        elif getattr(patcher, "backup", None) and hasattr(patcher, "unpatch_model"):
            patcher.unpatch_model()


def _resolvable(session, spec) -> bool:
    """Whether ``spec``'s file can be found (a missing one is reported by the session)."""
    if spec.path is not None:
        return True
    try:
        session.resolve([spec])
    except LoraExtError:
        return False
    return True


def _expected_steps(p, hires: bool) -> Optional[int]:
    """The steps the pass is likely to take (the CFG callback gives the real number)."""
    steps = int(getattr(p, "steps", 0) or 0)
    if hires:
        steps = int(getattr(p, "hr_second_pass_steps", 0) or 0) or steps
    strength = getattr(p, "denoising_strength", None)
    if (hires or getattr(p, "init_images", None)) and strength:
        steps = max(1, int(min(float(strength), 0.999) * steps))
    return steps or None


SHIM = A1111Shim()


def install() -> A1111Shim:
    SHIM.install()
    return SHIM
