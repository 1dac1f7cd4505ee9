"""What lora-ext's nodes do to ComfyUI's MODEL and CLIP (ModelPatcher clones).

Constant strengths become **weight patches** (``ModelPatcher.add_patches``), in the form
ComfyUI computes fastest:

* a plain LoRA (``lora_up``/``lora_down``, no Tucker core, no bias, no DoRA, one module) is
  handed over as ComfyUI's own ``comfy.weight_adapter.LoRAAdapter`` with the file's factors and
  alpha, at the spec's strength (block weight included): ComfyUI then computes exactly what
  its ``LoraLoader`` computes, on the weight's device, in every memory mode (full load,
  partial/low-VRAM loads through ``LowVramPatch``, dynamic VRAM, bypass mode);
* every other type (LoCon with a Tucker core, LoHa, LoKr, DoRA, IA3, OFT/BOFT, GLoRA, full
  diffs, norms, PEFT biases, q/k/v splits, inpainting ``conv_in``) is a ``LoraExtWeightPatch``,
  a subclass of ComfyUI's ``WeightAdapterBase`` whose ``calculate_weight`` adds lora-ext's
  deltas (``W + strength * sum(s * delta)``) on the device and in the tensor ComfyUI gives it,
  in one pass per adapter as ComfyUI's own adapters do. Factors small against the weight are
  cached per device in fp32 (ComfyUI recomputes a patch on every forward of a partly loaded
  model); its ``h`` gives the additive term for ComfyUI's bypass mode, and says so where an
  adapter's maths needs the layer's weight (which bypass mode never reads).

ComfyUI rounds once to the weight's dtype, backs the original up and restores it, and stacks
the patches with other nodes' in node order.

Strengths that change per step (keyframes, start/stop, scheduled block weights) go through
the model patcher's **wrapper and callback** mechanism, under lora-ext's own key (other
custom nodes' wrappers are kept and called): a ``SAMPLER_SAMPLE`` wrapper runs once the
model is loaded and patched; it opens a :class:`lora_ext.session.Session` on the loaded
diffusion model with the engine's on-the-fly method (forward hooks: ComfyUI's weights, and
whatever other patches it applied, stay untouched), and an ``ON_PREPARE_STATE`` callback,
which ComfyUI calls before every model evaluation with the current sigma, moves the session
to the step that sigma is in. A run split over several ``KSamplerAdvanced`` nodes (start/end
step) follows the schedule of the whole run: the sampler's full sigma list is taken from
ComfyUI's ``KSampler.sample`` (which slices it for each node). The hooks are removed when
sampling ends, failed or not.

The text encoders run once per prompt, so CLIP always gets weight patches, at the strengths
of step 0. MODEL and CLIP are patched independently: a problem with one is reported and
leaves it unchanged, the other still takes the LoRA.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import threading

import torch

from lora_ext.errors import LoraExtError
from lora_ext.hostmodel import HostModel, bind, static_patches, step_from_sigma, varies_per_step
from lora_ext.network import load_lora
from lora_ext.session import Session

log = logging.getLogger("lora_ext")

KEY = "lora_ext"
# ComfyUI's supported_models config classes -> the family the core calls them
FAMILY_BY_CONFIG = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2",
                    "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl"}
# an adapter whose tensors hold at most this fraction of its weight's elements keeps an fp32
# copy of them on the compute device (a partly loaded model is patched at every forward); more
# (a full diff, a large LoKr factor) is converted per call, as ComfyUI does for its own
CACHE_FRACTION = 1 / 16

_WEIGHT_PATCH_CLASSES: dict = {}
_LORAS: dict = {}  # path -> ((size, mtime), Lora): files shared by the nodes that use them
_LOCK = threading.Lock()


class LoraExtAttachment:
    """The per-step LoRAs of one MODEL (a ModelPatcher attachment; each clone gets a copy)."""

    def __init__(self, specs=()):
        self.specs = list(specs)
        self.run = None  # (session, sigmas of the whole run, total steps) while sampling

    def on_model_patcher_clone(self):
        return LoraExtAttachment(self.specs)


# --- the deltas ------------------------------------------------------------------------------------
def _rows(binding, index):
    if len(binding.targets) == 1:
        return None, None
    shape = tuple(binding.candidate.weight_shape)
    counts = binding.candidate.row_counts  # uneven for Flux's linear1 (q|k|v|mlp)
    start = sum(counts[:index])
    return shape, (start, start + counts[index])


class _Item:
    """One adapter's share of one weight: ``s * delta``, with its factors cached per device."""

    __slots__ = ("binding", "index", "s", "adapter", "_dev")

    def __init__(self, binding, index, s):
        self.binding, self.index, self.s = binding, index, float(s)
        self.adapter = binding.adapter
        self._dev = {}  # (device) -> the adapter with fp32 tensors on that device

    @property
    def weight_dependent(self) -> bool:
        return bool(getattr(self.adapter, "weight_dependent", False))

    def _on(self, w: torch.Tensor):
        """The adapter with its tensors on ``w``'s device in fp32 (cached when small)."""
        a = self.adapter
        tensors = getattr(a, "tensors", None)
        if w is None or not isinstance(tensors, dict) or w.device.type == "meta":
            return a
        hit = self._dev.get(w.device)
        if hit is not None:
            return hit
        size = sum(t.numel() for t in tensors.values() if torch.is_tensor(t))
        if size > CACHE_FRACTION * max(w.numel(), 1):
            return a  # a full-size diff: converted per call, never held twice
        moved = copy.copy(a)
        moved.tensors = {k: (t.detach().to(device=w.device, dtype=torch.float32)
                             if torch.is_tensor(t) and t.is_floating_point() else t)
                         for k, t in tensors.items()}
        self._dev[w.device] = moved
        return moved

    def delta(self, w32: torch.Tensor) -> torch.Tensor:
        """fp32 ``delta`` (strength 1) on ``w32``'s device."""
        from lora_ext.deltas import target_delta

        return target_delta(self._on(w32), w32, *_rows(self.binding, self.index))

    def bias_delta(self, b32, w32):
        from lora_ext.deltas import target_bias_delta

        return target_bias_delta(self._on(w32), b32, w32, *_rows(self.binding, self.index))


def _plain_lora(binding, narrow):
    """``(up, down, alpha)`` of a LoRA ComfyUI's own LoRAAdapter computes the same way, or None."""
    from lora_ext.adapters.lora import LoRAAdapter as Ours

    a = binding.adapter
    if type(a) is not Ours or narrow is not None or len(binding.targets) != 1:
        return None
    t = a.tensors
    if "lora_mid.weight" in t or "lora_up.bias" in t or set(t) - {"lora_up.weight", "lora_down.weight", "alpha"}:
        return None
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    if not (up.is_floating_point() and down.is_floating_point()):
        return None
    rank = int(down.shape[0])
    alpha = a.alpha
    if alpha is None:
        if a.scale() != 1.0:
            return None
    elif rank == 0 or alpha / rank != a.scale():
        return None
    return up, down, alpha


def weight_patch_class():
    """``LoraExtWeightPatch``, a subclass of the running ComfyUI's ``WeightAdapterBase``."""
    from comfy.weight_adapter import WeightAdapterBase

    cls = _WEIGHT_PATCH_CLASSES.get(WeightAdapterBase)
    if cls is not None:
        return cls

    class LoraExtWeightPatch(WeightAdapterBase):
        """lora-ext's change of one weight (or bias), computed when ComfyUI patches it."""

        name = "lora-ext"

        def __init__(self, items, part, narrow=None, where=""):
            self.items = list(items)  # [_Item]
            self.part = part  # "weight" | "bias"
            self.narrow = narrow  # a wider input layer: the LoRAs' input channels
            self.where = where  # "unet:input_blocks.1.1.proj_in" (for messages)
            self.loaded_keys = set()
            self.weights = ()

        # what ComfyUI asks when it patches (patch_weight_to_device, LowVramPatch)
        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            if self.part == "bias":
                return self._bias(weight, strength, function)
            target = weight
            if self.narrow is not None and weight.dim() >= 2 and weight.shape[1] > self.narrow:
                target = weight[:, :self.narrow]  # the extra input channels keep their weights
            items = self.items
            if (target.dtype == torch.float32 and _is_identity(function)
                    and (len(items) == 1 or not any(it.weight_dependent for it in items))):
                # the usual case (ComfyUI patches an fp32 copy, no function): each delta goes
                # into the weight in one multiply-add pass, as ComfyUI's own adapters do
                for it in items:
                    target.add_(it.delta(target), alpha=it.s * strength)
                return weight
            w32 = None
            acc = None
            for it in items:
                if it.weight_dependent:
                    if w32 is None:
                        w32 = target if target.dtype == torch.float32 else target.float()
                    d = it.delta(w32)
                else:
                    d = it.delta(target)  # reads the device and shape only
                # d may be the adapter's own tensor (a full diff): never scaled in place
                if acc is None:
                    acc = d * (it.s * strength)
                else:
                    acc.add_(d, alpha=it.s * strength)
            if acc is None:
                return weight
            target += function(acc if acc.dtype == target.dtype else acc.to(target.dtype))
            return weight

        def _bias(self, bias, strength, function):
            acc = None
            b32 = bias if bias.dtype == torch.float32 else bias.float()
            w32 = self._module_weight(bias)
            for it in self.items:
                db = it.bias_delta(b32, w32)
                if db is not None:
                    if acc is None:
                        acc = db * (it.s * strength)
                    else:
                        acc.add_(db, alpha=it.s * strength)
            if acc is not None:
                bias += function(acc if acc.dtype == bias.dtype else acc.to(bias.dtype))
            return bias

        def _module_weight(self, like):
            w = getattr(self, "module_weight", None)
            w = w() if callable(w) else w
            if w is None:
                return None
            w = w.detach().to(device=like.device, dtype=torch.float32)
            if self.narrow is not None and w.dim() >= 2 and w.shape[1] > self.narrow:
                w = w[:, :self.narrow]
            return w

        # ComfyUI's bypass mode (comfy/weight_adapter/bypass.py, 2026 builds): g(f(x) + h(x))
        def h(self, x, base_out):
            dep = sorted({it.adapter.type_name for it in self.items if it.weight_dependent})
            if dep:
                raise LoraExtError(
                    f"lora-ext: {self.where}: {', '.join(dep)} changes depend on the layer's weight, which "
                    "ComfyUI's bypass mode never reads; load this LoRA with lora-ext's loader (weight patches) "
                    "instead of in bypass mode")
            if self.part != "weight":
                return torch.zeros_like(base_out)
            shape = tuple(getattr(self, "weight_shape", ()) or ())
            if not shape:
                raise LoraExtError(f"lora-ext: {self.where}: bypass mode needs the layer's weight shape")
            probe = torch.empty(shape, device=x.device, dtype=torch.float32)
            if self.narrow is not None:
                probe = probe[:, :self.narrow]
            acc = None
            for it in self.items:
                d = it.delta(probe)
                acc = d.mul_(it.s) if acc is None else acc.add_(d, alpha=it.s)
            acc = acc * float(getattr(self, "multiplier", 1.0))
            xin = x[:, :self.narrow] if self.narrow is not None else x
            d = acc.to(x.dtype)
            if getattr(self, "is_conv", False):
                op = (torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                      torch.nn.functional.conv3d)[int(getattr(self, "conv_dim", 2)) - 1]
                return op(xin, d, **dict(getattr(self, "kw_dict", {}) or {}))
            return torch.nn.functional.linear(xin, d)

        def g(self, y):
            return y

    _WEIGHT_PATCH_CLASSES[WeightAdapterBase] = LoraExtWeightPatch
    return LoraExtWeightPatch


_IDENTITY_CODE = (lambda a: a).__code__.co_code


def _is_identity(function) -> bool:
    """Whether ``function`` is ComfyUI's ``lambda a: a`` (what calculate_weight passes for a patch
    without a function): same bytecode, no closure, no defaults."""
    code = getattr(function, "__code__", None)
    return (code is not None and code.co_code == _IDENTITY_CODE and code.co_argcount == 1
            and not getattr(function, "__closure__", None) and not getattr(function, "__defaults__", None))


def comfy_lora_adapter(up, down, alpha):
    """ComfyUI's own ``LoRAAdapter`` for a plain LoRA (what its LoraLoader builds)."""
    from comfy.weight_adapter.lora import LoRAAdapter

    return LoRAAdapter(set(), (up, down, alpha, None, None, None))


# --- the host's models -------------------------------------------------------------------------
def unet_host(patcher) -> HostModel:
    model = patcher.model
    family = FAMILY_BY_CONFIG.get(type(getattr(model, "model_config", None)).__name__)
    return HostModel({"unet": model.diffusion_model}, naming="ldm", family=family, label="the connected MODEL")


def clip_host(clip) -> HostModel:
    csm = clip.cond_stage_model
    have = {n: getattr(csm, n).transformer for n in ("clip_l", "clip_h", "clip_g")
            if hasattr(getattr(csm, n, None), "transformer")}
    t5 = getattr(getattr(csm, "t5xxl", None), "transformer", None)
    if t5 is not None:  # Flux (CLIP-L + T5), SD3 (CLIP-L, CLIP-G + T5): a DiT's text encoders
        comps = {"te3": t5}
        if "clip_l" in have:
            comps["te1"] = have["clip_l"]
        if "clip_g" in have:
            comps["te2"] = have["clip_g"]
        return HostModel(comps, naming="diffusers", family=None, label="the connected CLIP")
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
    """``(MODEL, CLIP, report lines)`` with ``specs`` (paths resolved) applied to clones.

    Either of ``model`` / ``clip`` may be None (a MODEL-only loader). Each is patched on its
    own: when one fails (a model lora-ext does not know, a broken adapter), the reason is
    logged and that input comes back unchanged; only when nothing given could take the LoRAs
    does this raise."""
    entries = [(s, loaded(s.path)) for s in specs]
    reports = {}  # index -> (applied, {key: reason}) merged over MODEL and CLIP
    other = {}  # index -> keys that belong to the input that is not connected
    errors = []
    new_model, new_clip = model, clip

    def account(results):
        for i, (_, applied, unmatched) in enumerate(results):
            a, u = reports.get(i, (0, None))
            keys = {x.key: x.reason for x in unmatched}
            reports[i] = (a + applied, keys if u is None else {k: u[k] for k in u if k in keys})

    if model is not None:
        try:
            new_model = _apply_model(model, entries, account, other if clip is None else None)
        except Exception as exc:  # noqa: BLE001 - reported; the MODEL stays as it was
            errors.append(f"MODEL: {exc}")
            log.error("lora-ext: %s: the MODEL is left unchanged: %s", _names(entries), exc)
            new_model = model
    if clip is not None:
        try:
            new_clip = _apply_clip(clip, entries, account, other if model is None else None)
        except Exception as exc:  # noqa: BLE001 - reported; the CLIP stays as it was
            errors.append(f"CLIP: {exc}")
            log.error("lora-ext: %s: the CLIP is left unchanged: %s", _names(entries), exc)
            new_clip = clip
    given = (model is not None) + (clip is not None)
    if given and len(errors) == given:
        raise LoraExtError(f"lora-ext: {_names(entries)}: " + "; ".join(errors))
    lines = list(errors)
    for i, (spec, _) in enumerate(entries):
        applied, unmatched = reports.get(i, (0, {}))
        unmatched = dict(unmatched or {})
        elsewhere = {k for k in other.get(i, ()) if k in unmatched}
        for k in elsewhere:
            del unmatched[k]
        lines.append(f"{spec.tag or spec.name}: {applied} modules")
        if elsewhere:
            lines.append(f"  {len(elsewhere)} keys for the {'CLIP' if clip is None else 'MODEL'}, "
                         "which is not connected to this node")
        for k in sorted(unmatched):
            lines.append(f"  not applied: {k}: {unmatched[k]}")
        if unmatched:
            log.warning("lora-ext: %s: %d keys not applied (first: %s)", spec.name, len(unmatched),
                        sorted(unmatched)[0])
    return new_model, new_clip, lines


def _names(entries) -> str:
    return ", ".join(s.name for s, _ in entries)


def _apply_model(model, entries, account, other):
    new_model = model.clone()
    bound = bind(unet_host(new_model))
    _, results = static_patches(bound, entries, components=["unet"], step=0)
    account(results)
    if other is not None:
        _keys_of(bound, entries, [c for c in ("te1", "te2")], other)
    constant = [e for e in entries if not varies_per_step(e[0], "unet")]
    _add(new_model, bound, constant, ["unet"])
    scheduled = [s for s, _ in entries if varies_per_step(s, "unet")]
    if scheduled:
        _schedule(new_model, scheduled)
    return new_model


def _apply_clip(clip, entries, account, other):
    new_clip = clip.clone()
    bound = bind(clip_host(new_clip))
    _, results = static_patches(bound, entries, components=list(bound.views), step=0)
    account(results)
    if other is not None:
        _keys_of(bound, entries, ["unet"], other)
    _add(new_clip.patcher, bound, entries, list(bound.views))
    return new_clip


def _keys_of(bound, entries, components, out) -> None:
    """The keys of each entry that bind to ``components`` of the same family (the input that
    is not connected): they are not "not applied", they are for the other input."""
    from lora_ext.hostmodel import _candidate_tables
    from lora_ext.keys import KeyMap

    layout = {}
    for comp in components:
        for fam, table in _candidate_tables(bound.family, comp):
            if fam == bound.family:
                layout[comp] = table
            break  # the family's own table comes first, or there is none
    if not layout:
        return
    keymap = KeyMap(layout)
    for i, (_, lora) in enumerate(entries):
        res = lora.resolve(keymap)
        out.setdefault(i, set()).update(k for b in res.bindings for k in b.group.keys.values())


def _add(patcher, bound, entries, components) -> None:
    """Add the entries' constant patches to ``patcher``, in the entries' order: plain LoRAs as
    ComfyUI's own LoRAAdapter at their strength, the rest as LoraExtWeightPatch."""
    if not entries:
        return
    cls = weight_patch_class()
    names = {id(m): n for n, m in patcher.model.named_modules()}
    keymap = bound.keymap_for(components)
    missing = set()
    for spec, lora in entries:
        res = lora.resolve(keymap)
        weights = spec.bind_blocks(res, keymap)  # block weights that depend on the model / the file
        # per module: [(strength, comfy LoRAAdapter)] or lora-ext items, in the file's order
        ours: dict = {}
        native: list = []
        for b in res.bindings:
            for i, t in enumerate(b.targets):
                s = float(weights.strength(t.component, t.block, 0, None))
                if s == 0.0:
                    continue
                view = bound.views[t.component]
                module = view[t.module]
                owner = getattr(module, "owner", None) if not isinstance(module, torch.nn.Module) else module
                name = names.get(id(owner))
                if name is None:
                    missing.add(f"{t.component}:{t.module}")
                    continue
                wide = view.widened.get(t.module)
                narrow = None if wide is None else wide[1]
                keys = _patch_keys(module, owner, name)
                plain = _plain_lora(b, narrow)
                if plain is not None:
                    native.append((s, keys[0], comfy_lora_adapter(*plain)))
                    continue
                item = _Item(b, i, s)
                ours.setdefault(keys[0], (module, owner, narrow, t, keys, []))[5].append(item)
        for s, key, adapter in native:
            _add_patches(patcher, {key: adapter}, s)
        out = {}
        for key, (module, owner, narrow, t, keys, items) in ours.items():
            wp = cls(items, "weight", narrow, f"{t.component}:{t.module}")
            wp.weight_shape = keys[2]
            out[key] = wp
            if keys[1] is not None and getattr(owner, "bias", None) is not None and any(
                    _changes_bias(it.binding) for it in items):
                bp = cls(items, "bias", narrow, f"{t.component}:{t.module}")
                bp.module_weight = keys[3]
                out[keys[1]] = bp
        _add_patches(patcher, out, 1.0)
    for m in sorted(missing):
        log.warning("lora-ext: %s is not a module of the patched model; skipped", m)


def _patch_keys(module, owner, name):
    """``(weight key, bias key or None, weight shape, weight getter)`` of a bound module in
    ComfyUI's ``add_patches`` form. A DiT module that is rows of a fused weight (Flux's q in
    ``img_attn.qkv``) is ComfyUI's ``(key, (dim, start, length))`` offset form, the way its own
    loader patches diffusers-named LoRAs onto fused weights (comfy/lora.py, model_lora_keys_unet);
    a bare parameter (Wan's ``modulation``, a norm's ``scale``) is keyed by its own name."""
    rows = getattr(module, "rows", None)
    if rows is not None and isinstance(owner, torch.nn.Linear):
        r0, r1 = int(rows[0]), int(rows[1])
        off = (0, r0, r1 - r0)
        return ((f"{name}.weight", off), (f"{name}.bias", off), (r1 - r0,) + tuple(owner.weight.shape[1:]),
                lambda o=owner: o.weight[r0:r1])
    pname = getattr(module, "name", None)
    if pname is not None and not isinstance(module, torch.nn.Module) and pname not in ("weight", "bias"):
        return f"{name}.{pname}" if name else pname, None, tuple(module.weight.shape), lambda m=module: m.weight
    return f"{name}.weight", f"{name}.bias", tuple(owner.weight.shape), lambda o=owner: o.weight


def _changes_bias(binding) -> bool:
    names = set(getattr(binding.group, "keys", {}) or {})
    return bool(names & {"lora_up.bias", "diff_b", "b_norm"})


def _add_patches(patcher, patches, strength) -> None:
    if not patches:
        return
    added = set(patcher.add_patches(patches, strength, 1.0))
    for key in sorted(set(patches) - added):
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
def whole_schedule(sigmas):
    """The sigma list of the whole run this sampling is part of.

    ComfyUI's ``KSampler.sample`` (behind ``KSampler`` and ``KSamplerAdvanced``) computes the
    run's sigmas and hands each node only its slice (``start_at_step``/``end_at_step``); the
    full list is that frame's ``self.sigmas``. Found on the call stack by code object (ComfyUI
    has no API for it); anything else (``SamplerCustom`` with its own sigmas) keeps ``sigmas``."""
    samplers = sys.modules.get("comfy.samplers")
    ks = getattr(getattr(samplers, "KSampler", None), "sample", None)
    code = getattr(ks, "__code__", None)
    if code is None:
        return sigmas
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is code:
            full = getattr(f.f_locals.get("self"), "sigmas", None)
            if full is not None and _is_slice(sigmas, full):
                return full
            return sigmas
        f = f.f_back
    return sigmas


def _is_slice(part, full) -> bool:
    try:
        p = [float(x) for x in part.reshape(-1).tolist()]
        w = [float(x) for x in full.reshape(-1).tolist()]
    except (AttributeError, TypeError, ValueError):
        return False
    if len(p) > len(w) or len(p) < 2:
        return False
    # the last sigma may be forced to 0 (force_full_denoise): compare all but the last
    for start in range(len(w) - len(p) + 1):
        if all(abs(a - b) <= 1e-6 * max(abs(b), 1.0) for a, b in zip(p[:-1], w[start:start + len(p) - 1])):
            return True
    return False


class _NodeReported(logging.Filter):
    """Drops the session's per-file "keys not applied" note: the UNet-only session would count
    the file's text-encoder keys, which the loader node has reported for what they are."""

    def filter(self, record):
        return not (record.levelno <= logging.INFO and "keys not applied" in str(record.msg))


def sampler_sample_wrapper(executor, guider, sigmas, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper: the model is loaded (its weight patches on); hook the per-step
    LoRAs on for this sampling, take them off after, whatever happens."""
    patcher = guider.model_patcher
    att = patcher.get_attachment(KEY)
    if att is None or not att.specs:
        return executor(guider, sigmas, *args, **kwargs)
    full = whole_schedule(sigmas)
    total = max(int(full.shape[-1]) - 1, 1)
    session = Session(None, method="onthefly", label="ComfyUI")
    session.load_model(unet_host(patcher))
    quiet = _NodeReported()
    log.addFilter(quiet)  # the loader node reported these files' keys already (text encoders apart)
    try:
        session.use_specs(att.specs, total_steps=total)
    finally:
        log.removeFilter(quiet)
    att.run = (session, full, total)
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
    session, sigmas, total = run
    session.begin_step(step_from_sigma(sigmas, timestep), total, timestep)
