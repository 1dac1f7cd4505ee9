"""lora-ext's InvokeAI nodes (InvokeAI 6.x invocation API).

* ``lora_ext_lora_loader`` **LoRA (lora-ext)**: one LoRA file of any type the core reads
  (LoRA/LoCon, LoHa, LoKr, DoRA, IA3, OFT, BOFT, GLoRA, full, norm; InvokeAI's model manager
  is not needed), strengths for the UNet and the text encoders, block weights, keyframes.
  Chains: its ``lora_ext`` output feeds the next loader. InvokeAI's own LoRA fields stay
  untouched (use both if you like).
* ``lora_ext_compel`` / ``lora_ext_sdxl_compel_prompt`` **Prompt (lora-ext)**: InvokeAI's prompt
  nodes, with a ``lora_ext`` stack input; ``<lora:...>`` tags in the prompt are read (full
  grammar), removed from the text, and added to the stack. The text encoders run with the
  LoRAs' text-encoder strengths (step 0); the output carries the stack on.
* ``lora_ext_denoise_latents`` **Denoise (lora-ext)**: InvokeAI's denoise node with a
  ``lora_ext`` stack input: the UNet runs with each LoRA's strength at every step.
* ``lora_ext_flux_text_encoder`` **Prompt - FLUX (lora-ext)** and ``lora_ext_flux_denoise``
  **FLUX Denoise (lora-ext)**: the same for FLUX.1. InvokeAI's FLUX transformer
  (backend/flux/model.py) keeps the BFL module names, so it binds as the original layout (fused
  ``qkv``, ``linear1`` = q|k|v|mlp): every FLUX format and type the core reads applies, those
  InvokeAI's own loader reports as unknown included (OneTrainer DoRA, fal Kontext
  ``base_model.model.double_blocks.*``, ``norm_out`` / ``final_layer.adaLN_modulation``). The prompt
  node runs CLIP-L (``te1``) and T5 (``te3``) with the text-encoder strengths; the denoise node
  takes each call's step from InvokeAI's own ``timestep_index`` / ``total_num_timesteps``
  arguments (Heun's second evaluation stays on its step). Block weights take the FLUX ids
  (``D00..``, ``S00..``, lbw's 61-value vectors).

Everything is applied on the fly (forward hooks): InvokeAI's model cache owns the weights
and restores the ones its own patches change from its CPU copy, so lora-ext never writes
them. Hooks come off when the node finishes, failed or not. While they are on, each hooked
model is pinned in InvokeAI's RAM cache (``LoadedModel.model_in_ram()``, as InvokeAI's own
nodes pin the LoRA models they patch with), so the cache cannot drop it and hand the base
node a fresh copy without the hooks; a hooked model that never ran fails the node.

What of each LoRA does not apply to the model a node is given is reported through
``context.logger`` (one warning per LoRA, every key at debug level); a LoRA for another base
model (an SDXL LoRA in an SD1.5 graph, whose CLIP-L keys fit) gets a warning in the prompt
node and fails the denoise node, and a node fails whenever a LoRA has keys for its model and
none of them applies. lora-ext's own log lines reach InvokeAI's log at their level while a
node runs.

LoRA names are looked up (``lora_ext.resolve``) in the folders of the ``LORA_EXT_DIRS``
environment variable (``os.pathsep``-separated), then InvokeAI's models folder; a path works too.
"""
import contextlib
import logging
import os
import threading
from typing import Optional

import torch

from invokeai.app.invocations.baseinvocation import BaseInvocationOutput, invocation, invocation_output
from invokeai.app.invocations.baseinvocation import BaseInvocation
from invokeai.app.invocations.compel import CompelInvocation, SDXLCompelPromptInvocation
from invokeai.app.invocations.denoise_latents import DenoiseLatentsInvocation, get_scheduler
from invokeai.app.invocations.fields import Input, InputField, OutputField
from invokeai.app.invocations.flux_denoise import FluxDenoiseInvocation
from invokeai.app.invocations.flux_text_encoder import FluxTextEncoderInvocation
from invokeai.app.invocations.primitives import ConditioningOutput, FluxConditioningOutput, LatentsOutput

from lora_ext.errors import LoraExtError
from lora_ext.hostmodel import HostModel, TimestepClock
from lora_ext.prompt import format_tag, parse_prompt, parse_tag
from lora_ext.resolve import LoraLibrary, resolve_specs
from lora_ext.session import Session, spec_from_inputs

try:
    from pydantic import BaseModel, Field
except ImportError:  # a host without pydantic (the test fakes): plain data classes
    BaseModel = None

if BaseModel is not None:
    class LoraExtStackField(BaseModel):
        """LoRAs for lora-ext's prompt and denoise nodes: ``{"name", "path", "tag"}`` each."""

        loras: list = Field(default_factory=list, description="name, path and canonical tag of each LoRA")
else:
    from dataclasses import dataclass, field

    @dataclass
    class LoraExtStackField:
        """LoRAs for lora-ext's prompt and denoise nodes: ``{"name", "path", "tag"}`` each."""

        loras: list = field(default_factory=list)

STACK_TITLE = "LoRA stack (lora-ext)"
_LIBRARIES: dict = {}


def encode(spec) -> dict:
    """A spec as stack data (JSON-friendly; the canonical tag keeps every strength)."""
    import copy

    named = copy.copy(spec)
    named.name = "x"
    return {"name": spec.name, "path": spec.path, "tag": format_tag(named)}


def decode(stack) -> list:
    out = []
    for e in (stack.loras if stack is not None else []):
        spec = parse_tag(e["tag"])
        spec.name, spec.path = e["name"], e["path"]
        spec.tag = e["tag"].replace("<lora:x:", f"<lora:{e['name']}:", 1)
        out.append(spec)
    return out


def library(context) -> LoraLibrary:
    folders = [f for f in os.environ.get("LORA_EXT_DIRS", "").split(os.pathsep) if f]
    models = getattr(context.config.get(), "models_path", None)
    if models:
        folders.append(str(models))
    key = tuple(folders)
    lib = _LIBRARIES.get(key)
    if lib is None:
        lib = _LIBRARIES[key] = LoraLibrary(folders)
    return lib


def _session(components: dict, label: str = "InvokeAI model", naming="diffusers") -> Session:
    """An on-the-fly session on InvokeAI's modules: diffusers / transformers names (SD UNets, CLIP,
    T5), or ``naming={"unet": "ldm"}`` for InvokeAI's FLUX transformer (backend/flux/model.py keeps
    the BFL module names: fused ``qkv``, ``single_blocks.N.linear1``)."""
    s = Session(None, method="onthefly", te_method="onthefly", label="InvokeAI")
    s.load_model(HostModel(components, naming=naming, label=label))
    return s


# --- lora-ext's log lines in InvokeAI's log ------------------------------------------------
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}
_LOG_LOCK = threading.Lock()
_LOG_USERS = [0, None]  # nodes running, the lora_ext logger's level before the first


class _ToInvokeAI(logging.Handler):
    """The ``lora_ext`` records of one thread (the node's), to its ``context.logger`` at their level
    (``LoggerInterface`` has debug/info/warning/error)."""

    def __init__(self, logger, thread: int):
        super().__init__(logging.DEBUG)
        self._logger = logger
        self._thread = thread

    def emit(self, record):
        if record.thread != self._thread:
            return
        try:
            msg = record.getMessage()
            lv = record.levelno
            if record.msg.startswith("lora-ext: %s: %d keys not applied"):
                # the session's own count, made without knowing which keys are for the other
                # node (UNet keys in a prompt node): check_fit reports them per node
                lv = logging.DEBUG
            fn = (self._logger.error if lv >= logging.ERROR else self._logger.warning if lv >= logging.WARNING
                  else self._logger.info if lv >= logging.INFO else self._logger.debug)
            fn(msg)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def host_log(context):
    """While a node runs, lora-ext's log records reach ``context.logger`` at their level (down to
    InvokeAI's ``log_level``), and not Python's last-resort stderr handler."""
    lg = logging.getLogger("lora_ext")
    level = _LEVELS.get(str(getattr(context.config.get(), "log_level", "info")).lower(), logging.INFO)
    handler = _ToInvokeAI(context.logger, threading.get_ident())
    with _LOG_LOCK:
        if _LOG_USERS[0] == 0:
            _LOG_USERS[1] = lg.level
        _LOG_USERS[0] += 1
        if lg.getEffectiveLevel() > level:
            lg.setLevel(level)
        lg.addHandler(handler)
    try:
        yield
    finally:
        with _LOG_LOCK:
            lg.removeHandler(handler)
            _LOG_USERS[0] -= 1
            if _LOG_USERS[0] == 0:
                lg.setLevel(_LOG_USERS[1])


# --- models from InvokeAI's cache -----------------------------------------------------------
@contextlib.contextmanager
def pinned(context, fields: dict):
    """``{component: module}`` of the models of ``fields`` (``ModelIdentifierField``s), each pinned
    in InvokeAI's RAM cache for the block (``LoadedModel.model_in_ram()``: locked without being
    moved to the execution device; the base node then locks it on its device with
    ``model_on_device()`` and gets this same module)."""
    with contextlib.ExitStack() as stack:
        yield {comp: stack.enter_context(context.models.load(f).model_in_ram()) for comp, f in fields.items()}


class _Runs:
    """Counts the forward calls of the hooked modules (a hooked module that never ran means the
    host ran another copy of the model, without the LoRAs)."""

    def __init__(self, modules: dict):
        self.count = {c: 0 for c in modules}
        self._hooks = [m.register_forward_pre_hook(self._counter(c)) for c, m in modules.items()]

    def _counter(self, comp):
        def hook(module, args):
            self.count[comp] += 1
        return hook

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []


_COMPONENT_NAMES = {"unet": "UNet", "te1": "text encoder", "te2": "text encoder 2", "te3": "T5 encoder"}


def _check_ran(runs: "_Runs", expected, specs, names: Optional[dict] = None) -> None:
    idle = [c for c in expected if runs.count.get(c) == 0]
    if idle:
        label = {**_COMPONENT_NAMES, **(names or {})}
        names = ", ".join(s.name for s in specs)
        raise LoraExtError(f"lora-ext: InvokeAI ran a copy of the {' and '.join(label[c] for c in idle)} "
                           f"other than the one the LoRAs ({names}) were put on (its model cache reloaded it?): "
                           f"they did not apply; run the graph again")


# --- what of each LoRA applies to the model a node is given --------------------------------
_INVOKE_BASES = {"sd-1": "sd1", "sd-2": "sd2", "sdxl": "sdxl", "flux": "flux"}
#: the full-size layouts whose LoRA key names tell which model of a graph a key is for
_NAME_ARCHS = {"flux": ("flux-dev",)}


def _model_base(field) -> Optional[str]:
    """lora-ext's name for the base of a ``ModelIdentifierField`` (``BaseModelType``), or None."""
    base = getattr(field, "base", None)
    base = getattr(base, "value", base)
    return _INVOKE_BASES.get(str(base)) if base is not None else None


def _component_of(prefix: str, family: Optional[str] = None) -> Optional[str]:
    """"unet" / "te1" / "te2" / "te3" when a module prefix names a module of a component of the
    graph's family (SD1.x/SD2.x/SDXL, or FLUX.1: its transformer, CLIP-L, T5), by name whatever
    its shape, else None."""
    from lora_ext.layouts import SD_ARCHS, arch_keymap

    archs = _NAME_ARCHS.get(family, ()) + tuple(SD_ARCHS)  # an SD LoRA's keys in a FLUX graph too
    comps = {c.component for arch in archs for c in arch_keymap(arch).candidates(prefix)}
    if "unet" in comps:
        return "unet"
    return min(comps) if comps else None


def _lora_of(path):
    from lora_ext.engine.models import cached_lora
    from lora_ext.network import load_lora

    return cached_lora(path) or load_lora(path)


def _label(base: Optional[str]) -> str:
    from lora_ext.detect import LABELS
    from lora_ext.layouts import label_of

    if not base:
        return "unknown"
    if base in LABELS:
        return LABELS[base]
    try:
        return label_of(base)
    except Exception:  # noqa: BLE001 - a name only detection knows
        return base


def _family(base: Optional[str]) -> Optional[str]:
    """The family of a detected base ("flux-dev" -> "flux"; SD names as they are)."""
    from lora_ext.dit import VARIANTS

    return VARIANTS[base][0] if base in VARIANTS else base


def check_fit(context, session: Session, own: tuple, model_base: Optional[str], what: str,
              others: Optional[str] = None) -> None:
    """Report, through ``context.logger``, what of each LoRA does not apply to this node's model
    (``own``: the components the node runs, e.g. ("unet",) or ("te1", "te2")); raise
    ``LoraExtError`` when a LoRA has keys for them (or keys for no known component) and none of
    its keys applies. A LoRA for another base model than the node's model gets a warning where
    some of it applies (or where it has nothing for this node)."""
    log = context.logger
    others = others or ("text encoders" if what == "UNet" else "UNet")
    failures = []
    for r in session.reports():
        try:
            lora = _lora_of(r.path)
            prefix_of = {k: p for p, g in lora.groups.items() for k in g.keys.values()}
            base = _detect(lora)
        except Exception:  # the engine read it already; best effort for the report only
            prefix_of, base = {}, None
        mine, other = [], []
        for u in r.unmatched:
            comp = _component_of(prefix_of.get(u["key"], u["key"]), model_base)
            (other if comp is not None and comp not in own else mine).append(u)
        wrong_base = base is not None and model_base is not None and _family(base) != model_base
        tag = r.spec.tag or r.name
        note = f" (it is {'an' if _label(base)[:1] in 'AEIOS' else 'a'} {_label(base)} LoRA)" if wrong_base else ""
        for u in mine + other:
            log.debug(f"lora-ext: {r.name}: not applied to the {what}: {u['key']}: {u['reason']}")
        if r.applied == 0 and mine:
            failures.append(f"{tag}: none of its {len(mine)} keys for it fits {'these' if what.endswith('s') else 'this'} "
                            f"{_label(model_base) + ' ' if model_base else ''}{what}{note}")
        elif wrong_base:
            msg = (f"lora-ext: {tag} is for {_label(base)}, but this {what} is {_label(model_base)}: "
                   + (f"only {r.applied} of its modules fit it and were applied" if r.applied else
                      f"it has no keys for the {what}"))
            if mine:
                msg += f"; {len(mine)} of its keys for it did not (first: {mine[0]['key']}: {mine[0]['reason']})"
            if other:
                msg += f"; {len(other)} keys are for the {others}"
            log.warning(msg)
        elif mine:
            log.warning(f"lora-ext: {tag}: {len(mine)} keys not applied to the {what} "
                        f"(first: {mine[0]['key']}: {mine[0]['reason']}); {r.applied} modules applied")
        elif r.applied:
            log.info(f"lora-ext: {r.name}: {r.applied} modules applied to the {what}")
    if failures:
        raise LoraExtError("lora-ext: " + "; ".join(failures))


_BASES: dict = {}


def _detect(lora) -> Optional[str]:
    """The base model a LoRA file is for (lora-ext's name), or None; once per file version."""
    from lora_ext.detect import detect_base_model

    try:
        st = os.stat(lora.path)
        key = (lora.path, st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _BASES:
        return _BASES[key]
    name = detect_base_model(lora).name
    base = None if name == "unknown" else name
    if key is not None:
        _BASES[key] = base
    return base


@invocation_output("lora_ext_stack_output")
class LoraExtStackOutput(BaseInvocationOutput):
    lora_ext: LoraExtStackField = OutputField(title=STACK_TITLE, description="The LoRAs so far")


@invocation_output("lora_ext_conditioning_output")
class LoraExtConditioningOutput(ConditioningOutput):
    lora_ext: LoraExtStackField = OutputField(title=STACK_TITLE, description="The stack plus the prompt's tags")


@invocation_output("lora_ext_flux_conditioning_output")
class LoraExtFluxConditioningOutput(FluxConditioningOutput):
    lora_ext: LoraExtStackField = OutputField(title=STACK_TITLE, description="The stack plus the prompt's tags")


@invocation("lora_ext_lora_loader", title="LoRA (lora-ext)", tags=["lora", "model", "lora-ext"], category="model",
            version="1.0.0")
class LoraExtLoaderInvocation(BaseInvocation):
    """Any LoRA type, with block weights and a per-step schedule, for lora-ext's prompt and denoise nodes."""

    lora: str = InputField(description="A LoRA file: a name in the LoRA folders, or a path")
    weight: float = InputField(default=1.0, description="Strength on the UNet")
    clip_weight: float = InputField(default=1.0, description="Strength on the text encoders")
    block_weights: str = InputField(default="", description="lbw preset or 12/17/20/26 numbers (FLUX: 61 numbers or "
                                                            "ids such as lbw=D00=0.5,S01=0), or in=..:mid=..:out=..")
    keyframes: str = InputField(default="", description="w@pos,... over the run, multiplying the UNet strength")
    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def invoke(self, context) -> LoraExtStackOutput:
        lib = library(context)
        path = lib.resolve(self.lora)
        name = os.path.splitext(os.path.basename(path))[0]
        spec = spec_from_inputs(name, path, unet=self.weight, te=self.clip_weight, blocks=self.block_weights,
                                keyframes=self.keyframes)
        loras = list(self.lora_ext.loras if self.lora_ext is not None else []) + [encode(spec)]
        return LoraExtStackOutput(lora_ext=LoraExtStackField(loras=loras))


def _tags(node, context, text: str):
    parsed = parse_prompt(text)
    if parsed.specs:
        resolve_specs(parsed.specs, library(context))
    return parsed


def _prompt_with_loras(node, context, base_invoke, clips: dict, texts: dict, *, model_base=None,
                       output=None, what: str = "text encoder", others: Optional[str] = None):
    """``texts``: the node's prompt fields that may hold tags ({"prompt": ..., "style": ...}).
    A LoRA tagged in the style that the prompt tags too is applied once, as the prompt has it
    (InvokeAI's UI fills the SDXL style with the prompt). ``clips``: {component: a field with a
    ``text_encoder`` model} (CLIPField, T5EncoderField); ``model_base``: the graph's base when
    the encoders' own configs do not say it (FLUX's CLIP-L and T5 are standalone models)."""
    parsed = {k: _tags(node, context, v) for k, v in texts.items()}
    specs = decode(node.lora_ext)
    in_prompt = {s.path for s in parsed["prompt"].specs}
    for field_name, p in parsed.items():
        for spec in p.specs:
            if field_name != "prompt" and spec.path in in_prompt:
                context.logger.debug(f"lora-ext: {spec.tag} in the {field_name}: the prompt tags this LoRA too; "
                                     f"applied once")
                continue
            specs.append(spec)
    plain = node.model_copy(update={k: p.prompt for k, p in parsed.items()})
    if not specs:
        out = base_invoke(plain, context)
    else:
        base = model_base or _model_base(next(iter(clips.values())).text_encoder)
        with host_log(context), pinned(context, {c: f.text_encoder for c, f in clips.items()}) as tes:
            session = _session(tes, label="InvokeAI text encoder")
            runs = None
            try:
                session.use_specs(specs)
                check_fit(context, session, tuple(tes), base, what, others)
                runs = _Runs(tes)
                out = base_invoke(plain, context)
                _check_ran(runs, [c for c in tes if _te_runs(plain, c)], specs)
            finally:
                if runs is not None:
                    runs.remove()
                session.end_run(restore=True)
    return (output or LoraExtConditioningOutput)(conditioning=out.conditioning,
                                                 lora_ext=LoraExtStackField(loras=[encode(s) for s in specs]))


def _te_runs(node, comp: str) -> bool:
    """Whether InvokeAI's prompt node runs text encoder ``comp`` for these fields (its SDXL node
    returns zeros for an empty prompt without running the encoder: compel.py ``run_clip_compel``)."""
    style = getattr(node, "style", None)
    if style is None:  # SD1.5/SD2 "compel": always
        return True
    if comp == "te1":
        return node.prompt != ""
    return (style if style.strip() else node.prompt) != ""


@invocation("lora_ext_compel", title="Prompt - SD1.5 (lora-ext)", tags=["prompt", "compel", "lora-ext"],
            category="prompt", version="1.0.0")
class LoraExtCompelInvocation(CompelInvocation):
    """The SD1.5 prompt node, with lora-ext LoRAs on the text encoder and <lora:...> tags read from the prompt."""

    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def invoke(self, context) -> LoraExtConditioningOutput:
        return _prompt_with_loras(self, context, CompelInvocation.invoke, {"te1": self.clip},
                                  {"prompt": self.prompt})


@invocation("lora_ext_sdxl_compel_prompt", title="Prompt - SDXL (lora-ext)", tags=["prompt", "sdxl", "lora-ext"],
            category="prompt", version="1.0.0")
class LoraExtSDXLCompelInvocation(SDXLCompelPromptInvocation):
    """The SDXL prompt node, with lora-ext LoRAs on both text encoders and <lora:...> tags read from the prompt and
    the style (a LoRA tagged in both is applied once)."""

    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def invoke(self, context) -> LoraExtConditioningOutput:
        return _prompt_with_loras(self, context, SDXLCompelPromptInvocation.invoke,
                                  {"te1": self.clip, "te2": self.clip2}, {"prompt": self.prompt, "style": self.style})


@invocation("lora_ext_denoise_latents", title="Denoise - SD1.5, SDXL (lora-ext)",
            tags=["latents", "denoise", "lora-ext"], category="latents", version="1.0.0")
class LoraExtDenoiseLatentsInvocation(DenoiseLatentsInvocation):
    """InvokeAI's denoise, with lora-ext LoRAs on the UNet at per-step strengths."""

    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def _lora_ext_timesteps(self, context):
        """The timesteps the denoise will iterate (InvokeAI's own scheduler set-up)."""
        try:
            unet_config = context.models.get_config(self.unet.unet.key)
            scheduler = get_scheduler(context=context, scheduler_info=self.unet.scheduler,
                                      scheduler_name=self.scheduler, seed=0, unet_config=unet_config)
            timesteps, _, _ = self.init_scheduler(scheduler, device=torch.device("cpu"), steps=self.steps,
                                                  denoising_start=self.denoising_start,
                                                  denoising_end=self.denoising_end, seed=0)
            return timesteps
        except Exception as exc:  # count timesteps as they come instead
            context.logger.warning(f"lora-ext: cannot read the schedule ({exc}); counting steps as they run")
            return None

    def invoke(self, context) -> LatentsOutput:
        specs = decode(self.lora_ext)
        if not specs:
            return super().invoke(context)
        with host_log(context), pinned(context, {"unet": self.unet.unet}) as held:
            unet = held["unet"]
            session = _session({"unet": unet}, label="InvokeAI UNet")
            hook = runs = None
            try:
                clock = TimestepClock(self._lora_ext_timesteps(context))
                total = clock.total or self.steps
                session.use_specs(specs, total_steps=total)
                check_fit(context, session, ("unet",), _model_base(self.unet.unet), "UNet")

                def pre(module, args, kwargs):
                    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
                    if t is not None:
                        session.begin_step(min(clock.step(t), total - 1), total)

                hook = unet.register_forward_pre_hook(pre, with_kwargs=True)
                runs = _Runs({"unet": unet})
                out = super().invoke(context)
                _check_ran(runs, ["unet"], specs)
                return out
            finally:
                if hook is not None:
                    hook.remove()
                if runs is not None:
                    runs.remove()
                session.end_run(restore=True)


# --- FLUX.1 ---------------------------------------------------------------------------------
@invocation("lora_ext_flux_text_encoder", title="Prompt - FLUX (lora-ext)", tags=["prompt", "flux", "lora-ext"],
            category="prompt", version="1.0.0")
class LoraExtFluxTextEncoderInvocation(FluxTextEncoderInvocation):
    """The FLUX prompt node, with lora-ext LoRAs on CLIP-L and T5 and <lora:...> tags read from the prompt."""

    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def invoke(self, context) -> LoraExtFluxConditioningOutput:
        return _prompt_with_loras(self, context, FluxTextEncoderInvocation.invoke,
                                  {"te1": self.clip, "te3": self.t5_encoder}, {"prompt": self.prompt},
                                  model_base="flux", output=LoraExtFluxConditioningOutput,
                                  what="text encoders", others="transformer")


@invocation("lora_ext_flux_denoise", title="FLUX Denoise (lora-ext)", tags=["image", "flux", "lora-ext"],
            category="latents", version="1.0.0")
class LoraExtFluxDenoiseInvocation(FluxDenoiseInvocation):
    """InvokeAI's FLUX denoise, with lora-ext LoRAs on the transformer at per-step strengths."""

    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def invoke(self, context) -> LatentsOutput:
        specs = decode(self.lora_ext)
        if not specs:
            return super().invoke(context)
        with host_log(context), pinned(context, {"unet": self.transformer.transformer}) as held:
            transformer = held["unet"]
            session = _session({"unet": transformer}, label="InvokeAI FLUX transformer", naming={"unet": "ldm"})
            hook = runs = None
            try:
                # InvokeAI's denoise passes the user-facing step and the step count to every call
                # of the model (backend/flux/denoise.py: timestep_index, total_num_timesteps; Heun's
                # second evaluation keeps its step's index)
                estimate = max(1, round(self.num_steps * (self.denoising_end - self.denoising_start)))
                session.use_specs(specs, total_steps=estimate)
                check_fit(context, session, ("unet",), "flux", "transformer", "text encoders")

                def pre(module, args, kwargs):
                    step, total = kwargs.get("timestep_index"), kwargs.get("total_num_timesteps")
                    if step is not None and total:
                        session.begin_step(min(int(step), int(total) - 1), int(total))

                hook = transformer.register_forward_pre_hook(pre, with_kwargs=True)
                runs = _Runs({"unet": transformer})
                out = super().invoke(context)
                _check_ran(runs, ["unet"], specs, {"unet": "FLUX transformer"})
                return out
            finally:
                if hook is not None:
                    hook.remove()
                if runs is not None:
                    runs.remove()
                session.end_run(restore=True)
