"""What lora-ext's nodes do to ComfyUI's MODEL and CLIP (ModelPatcher clones).

Constant strengths become **weight patches**: ``ModelPatcher.add_patches`` with one patch per
module whose value is a ``comfy.weight_adapter.WeightAdapterBase`` (ComfyUI's own interface
for adapter types, the one its LoRA/LoHa/LoKr/OFT use). When ComfyUI loads the model it calls
``calculate_weight(weight, ...)`` with the module's fp32 weight and gets back
``weight + strength * sum(s * delta(weight))``, the deltas computed by lora-ext's adapters
(every type the core reads, OFT/BOFT/GLoRA/DoRA included); ComfyUI rounds once to the
weight's dtype, backs the original up and restores it, handles low-VRAM and partial loading
as for its own LoRAs, and stacks the patches with other nodes' in node order. A ``diff`` patch
would need every delta materialised up front (a full-size copy per LoRA); this form computes
them when ComfyUI patches, from the weight it patches.

Strengths that change per step (keyframes, start/stop, scheduled block weights) go through
the model patcher's **wrapper and callback** mechanism, under lora-ext's own key (other
custom nodes' wrappers are kept and called): a ``SAMPLER_SAMPLE`` wrapper runs once the
model is loaded and patched; it opens a :class:`lora_ext.session.Session` on the loaded
diffusion model with the engine's on-the-fly method (forward hooks: ComfyUI's weights, and
whatever other patches it applied, stay untouched), and an ``ON_PREPARE_STATE`` callback,
which ComfyUI calls before every model evaluation with the current sigma, moves the session
to the step that sigma is in (``transformer_options``' ``sample_sigmas`` schedule, passed to
the wrapper). The hooks are removed when sampling ends, failed or not.

The text encoders run once per prompt, so CLIP always gets weight patches, at the strengths
of step 0.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

from lora_ext.hostmodel import HostModel, bind, static_patches, step_from_sigma, varies_per_step
from lora_ext.network import load_lora
from lora_ext.session import Session

log = logging.getLogger("lora_ext")

KEY = "lora_ext"
# ComfyUI's supported_models config classes -> the family the core calls them
FAMILY_BY_CONFIG = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2",
                    "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl"}

_WEIGHT_PATCH_CLASSES: dict = {}
_LORAS: dict = {}  # path -> ((size, mtime), Lora): files shared by the nodes that use them
_LOCK = threading.Lock()


class LoraExtAttachment:
    """The per-step LoRAs of one MODEL (a ModelPatcher attachment; each clone gets a copy)."""

    def __init__(self, specs=()):
        self.specs = list(specs)
        self.run = None  # (session, sigmas) while sampling

    def on_model_patcher_clone(self):
        return LoraExtAttachment(self.specs)


def weight_patch_class():
    """``LoraExtWeightPatch``, a subclass of the running ComfyUI's ``WeightAdapterBase``."""
    from comfy.weight_adapter import WeightAdapterBase

    cls = _WEIGHT_PATCH_CLASSES.get(WeightAdapterBase)
    if cls is not None:
        return cls

    class LoraExtWeightPatch(WeightAdapterBase):
        """lora-ext's change of one weight (or bias), computed when ComfyUI patches it."""

        name = "lora-ext"

        def __init__(self, patch, part, module):
            self.patch = patch  # lora_ext.hostmodel.ModulePatch
            self.part = part  # "weight" | "bias"
            self.module = module
            self.loaded_keys = set()
            self.weights = []

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            if self.part == "weight":
                d = self.patch.delta(weight)
            else:
                d = self.patch.bias_delta(weight, self.module.weight)
                if d is None:
                    return weight
            weight += function((strength * d).to(weight.dtype))
            return weight

    _WEIGHT_PATCH_CLASSES[WeightAdapterBase] = LoraExtWeightPatch
    return LoraExtWeightPatch


# --- the host's models -------------------------------------------------------------------------
def unet_host(patcher) -> HostModel:
    model = patcher.model
    family = FAMILY_BY_CONFIG.get(type(getattr(model, "model_config", None)).__name__)
    return HostModel({"unet": model.diffusion_model}, naming="ldm", family=family, label="the connected MODEL")


def clip_host(clip) -> HostModel:
    csm = clip.cond_stage_model
    have = {n: getattr(csm, n).transformer for n in ("clip_l", "clip_h", "clip_g")
            if hasattr(getattr(csm, n, None), "transformer")}
    if "clip_l" in have and "clip_g" in have:
        comps, family = {"te1": have["clip_l"], "te2": have["clip_g"]}, "sdxl"
    elif "clip_h" in have:
        comps, family = {"te1": have["clip_h"]}, "sd2"
    elif "clip_l" in have:
        comps, family = {"te1": have["clip_l"]}, "sd1"
    elif "clip_g" in have:
        comps, family = {"te2": have["clip_g"]}, None
    else:
        raise ValueError("lora-ext: this CLIP has no CLIP-L/H/G text encoder (SD1.x, SD2.x, SDXL only)")
    return HostModel(comps, naming="diffusers", family=family, label="the connected CLIP")


def loaded(path):
    """The file's Lora, loaded once while it stays unchanged on disk."""
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns)
    with _LOCK:
        hit = _LORAS.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    lora = load_lora(path)
    with _LOCK:
        _LORAS[path] = (stamp, lora)
        while len(_LORAS) > 16:
            _LORAS.pop(next(iter(_LORAS)))
    return lora


# --- the loader nodes' work ----------------------------------------------------------------------
def apply(model, clip, specs) -> tuple:
    """``(MODEL, CLIP, report lines)`` with ``specs`` (paths resolved) applied to clones."""
    entries = [(s, loaded(s.path)) for s in specs]
    reports = {}  # index -> (applied, {key: reason}) merged over MODEL and CLIP
    new_model = new_clip = None

    def account(results):
        for i, (_, applied, unmatched) in enumerate(results):
            a, u = reports.get(i, (0, None))
            keys = {x.key: x.reason for x in unmatched}
            reports[i] = (a + applied, keys if u is None else {k: u[k] for k in u if k in keys})

    if model is not None:
        new_model = model.clone()
        bound = bind(unet_host(new_model))
        _, results = static_patches(bound, entries, components=["unet"], step=0)
        account(results)
        constant = [e for e in entries if not varies_per_step(e[0], "unet")]
        patches, _ = static_patches(bound, constant, components=["unet"], step=0)
        _add(new_model, bound, patches)
        scheduled = [s for s, _ in entries if varies_per_step(s, "unet")]
        if scheduled:
            _schedule(new_model, scheduled)
    if clip is not None:
        new_clip = clip.clone()
        bound = bind(clip_host(new_clip))
        patches, results = static_patches(bound, entries, components=list(bound.views), step=0)
        account(results)
        _add(new_clip.patcher, bound, patches)
    lines = []
    for i, (spec, _) in enumerate(entries):
        applied, unmatched = reports.get(i, (0, {}))
        lines.append(f"{spec.tag or spec.name}: {applied} modules")
        for k in sorted(unmatched or {}):
            lines.append(f"  not applied: {k}: {unmatched[k]}")
        if unmatched:
            log.warning("lora-ext: %s: %d keys not applied (first: %s)", spec.name, len(unmatched),
                        sorted(unmatched)[0])
    return new_model, new_clip, lines


def _add(patcher, bound, patches) -> None:
    if not patches:
        return
    cls = weight_patch_class()
    names = {id(m): n for n, m in patcher.model.named_modules()}
    out = {}
    for (comp, path), mp in patches.items():
        module = bound.views[comp][path]
        # a wider conv_in (inpainting) is bound as a view of its first channels: patch the
        # module itself, ModulePatch pads the delta
        name = names.get(id(getattr(module, "owner", module) if not isinstance(module, torch.nn.Module) else module))
        if name is None:
            log.warning("lora-ext: %s:%s is not a module of the patched model; skipped", comp, path)
            continue
        out[f"{name}.weight"] = cls(mp, "weight", module)
        if mp.changes_bias and getattr(module, "bias", None) is not None:
            out[f"{name}.bias"] = cls(mp, "bias", module)
    added = set(patcher.add_patches(out, 1.0, 1.0))
    for key in sorted(set(out) - added):
        log.warning("lora-ext: %s: not in the model's state dict; not patched", key)


def _schedule(patcher, specs) -> None:
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    old = patcher.get_attachment(KEY)
    patcher.set_attachments(KEY, LoraExtAttachment((old.specs if old is not None else []) + list(specs)))
    if not patcher.get_wrappers(WrappersMP.SAMPLER_SAMPLE, KEY):
        patcher.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, KEY, sampler_sample_wrapper)
    if not patcher.get_callbacks(CallbacksMP.ON_PREPARE_STATE, KEY):
        patcher.add_callback_with_key(CallbacksMP.ON_PREPARE_STATE, KEY, prepare_state_callback)


# --- per-step, during sampling ---------------------------------------------------------------------
def sampler_sample_wrapper(executor, guider, sigmas, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper: the model is loaded (its weight patches on); hook the per-step
    LoRAs on for this sampling, take them off after, whatever happens."""
    patcher = guider.model_patcher
    att = patcher.get_attachment(KEY)
    if att is None or not att.specs:
        return executor(guider, sigmas, *args, **kwargs)
    session = Session(None, method="onthefly", label="ComfyUI")
    session.load_model(unet_host(patcher))
    total = max(int(sigmas.shape[-1]) - 1, 1)
    session.use_specs(att.specs, total_steps=total)
    att.run = (session, sigmas)
    try:
        return executor(guider, sigmas, *args, **kwargs)
    finally:
        att.run = None
        session.end_run(restore=True)


def prepare_state_callback(patcher, timestep):
    """ON_PREPARE_STATE: ComfyUI is about to evaluate the model at ``timestep`` (a sigma)."""
    att = patcher.get_attachment(KEY)
    run = getattr(att, "run", None)
    if run is None:
        return
    session, sigmas = run
    session.begin_step(step_from_sigma(sigmas, timestep), max(int(sigmas.shape[-1]) - 1, 1), timestep)
