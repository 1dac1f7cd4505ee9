"""A host's model as the core sees it: which modules it has, under which names.

Hosts hold the same Stable Diffusion networks under different names. InvokeAI and SD.Next
use diffusers/transformers classes (``down_blocks.0.attentions.0.proj_in``); A1111 and
ComfyUI keep the compvis/ldm UNet (``input_blocks.1.1.proj_in``), A1111 the OpenCLIP text
encoders of SD2/SDXL (``transformer.resblocks.3.attn`` with q/k/v fused in one parameter).
A shim describes what it has with a :class:`HostModel`; :func:`bind` finds the architecture
(the module table whose names *and* weight shapes the host's modules match), and gives back
a :class:`BoundModel`: one :class:`ModuleView` per component, mapping the core's canonical
module paths (see :mod:`lora_ext.arch`) to the host's own module objects, plus the KeyMap that
binds LoRA keys to exactly those modules. The apply engine then works on the host's modules
in place, whatever their names.

Also here, for shims that hand weights to the host's own patching (ComfyUI):
:func:`static_patches` (per module, the fp32 change of a list of LoRAs at one step) and
:func:`step_from_sigma` (which step a sampler is on, from its sigma schedule).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch

from . import arch
from .deltas import target_bias_delta, target_delta
from .errors import AdapterError, LoraExtError
from .keys import KeyMap

__all__ = ["HostModel", "BoundModel", "ModuleView", "RowSlice", "InputSlice", "bind", "register_layout",
           "unregister_layout", "ModulePatch", "weights_digest", "static_patches", "step_from_sigma", "varies_per_step", "TimestepClock", "NAMINGS"]

#: how a component's modules are named: ``"diffusers"`` (diffusers UNet / transformers CLIP
#: naming, ``text_model.`` optional) or ``"ldm"`` (compvis UNet, OpenCLIP or HF CLIP text
#: encoders as they sit in an A1111 checkpoint, relative to the component's root)
NAMINGS = ("diffusers", "ldm")
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass
class HostModel:
    """What a shim tells the core about the host's model (the ``model loaded`` seam).

    ``components``: ``{"unet"|"te1"|"te2": root module}``: for ``"ldm"`` naming the module the
    table's ``ldm_path`` s are relative to (A1111: ``sd_model.model.diffusion_model``,
    ``cond_stage_model.wrapped.transformer.text_model``, ``...wrapped.model`` for OpenCLIP);
    for ``"diffusers"`` naming the UNet / CLIP model itself.
    ``naming``: one of :data:`NAMINGS` for every component, or ``{component: naming}``.
    ``family``: ``"sd1"``/``"sd2"``/``"sdxl"`` when the host knows it (checked, never trusted).
    ``label``: how messages name the model (``"v1-5-pruned-emaonly"``).
    """

    components: dict
    naming: object = "diffusers"
    family: Optional[str] = None
    label: str = ""
    #: which expert of a two-expert model this is ("high" or "low": Wan 2.2 A14B's high-noise
    #: transformer and low-noise transformer_2), or None; a LoRA pair applies that expert's file
    expert: Optional[str] = None
    #: the other expert of a two-expert model held as one pipeline (SD.Next's Wan 2.2 A14B:
    #: ``transformer`` is this model, expert "high"; ``transformer_2`` is ``second_expert``,
    #: expert "low", a denoiser-only HostModel): the session applies the same LoRA list to it,
    #: each expert taking its own file of a pair, on the same step clock
    second_expert: Optional["HostModel"] = None

    def naming_of(self, component: str) -> str:
        n = self.naming.get(component, "diffusers") if isinstance(self.naming, Mapping) else self.naming
        if n not in NAMINGS:
            raise LoraExtError(f"unknown module naming {n!r} for {component} (one of {', '.join(NAMINGS)})")
        return n


class RowSlice:
    """A q/k/v projection that lives as rows of a fused parameter (``nn.MultiheadAttention``).

    Looks like a module with ``weight`` and ``bias`` to the fuse engine: both are views into
    the live fused parameters, re-read on every access (a host moving the model between
    devices replaces the parameters), so writing them writes the fused weight. It has no
    forward of its own, so on-the-fly application cannot reach it; shims fuse text encoders.
    """

    def __init__(self, owner: torch.nn.Module, rows: tuple, weight: str = "in_proj_weight",
                 bias: str = "in_proj_bias"):
        self.owner = owner
        self.rows = tuple(rows)
        self._w = weight
        self._b = bias

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self._w)[self.rows[0]:self.rows[1]]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        b = getattr(self.owner, self._b, None)
        return None if b is None else b[self.rows[0]:self.rows[1]]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def register_forward_hook(self, hook):
        """On-the-fly application for rows of a fused ``nn.Linear`` (a DiT's q|k|v|mlp): the
        hook sees this slice's rows of the output and what it returns goes back there."""
        if not isinstance(self.owner, torch.nn.Linear):
            raise LoraExtError(f"{self!r} has no forward of its own")
        r0, r1 = self.rows

        def sliced(module, args, output):
            part = output[..., r0:r1]
            new = hook(self, args, part)
            if new is None or new is part:
                return None
            if new.data_ptr() == part.data_ptr():
                return None  # added in place into the owner's output
            out = output.clone() if output.requires_grad else output
            out[..., r0:r1] = new
            return out

        return self.owner.register_forward_hook(sliced)

    def __repr__(self):
        return f"RowSlice({type(self.owner).__name__}, rows={self.rows})"


class _BareParameter:
    """A parameter that sits directly on a module (OpenCLIP's ``positional_embedding``)."""

    def __init__(self, owner: torch.nn.Module, name: str):
        self.owner = owner
        self.name = name
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.name)


def bare_parameter(index: Mapping, path: str):
    """A parameter that sits directly on a module (Wan's ``scale_shift_table``), found through
    ``index`` (module name -> module), as a ``_BareParameter``; or None."""
    owner_path, _, name = path.rpartition(".")
    owner = index.get(owner_path)
    if owner is None or name in ("weight", "bias") or not isinstance(getattr(owner, "_parameters", {}).get(name), torch.Tensor):
        return None
    return _BareParameter(owner, name)


class InputSlice:
    """The first ``n`` input channels of a wider input layer: ``conv_in`` of an inpainting (9
    channels), instruct-pix2pix (8) or depth (5) UNet, for LoRAs trained on the 4-channel base.

    As A1111's built-in handler pads the delta with zeros, the extra channels keep their
    weights. ``weight`` is a view into the live parameter (so fusing writes the real weight);
    a forward hook sees only the first ``n`` channels of the input, which is what the
    adapter's contribution is computed from. Everything else is the owner's.
    """

    def __init__(self, owner: torch.nn.Module, n: int):
        self.owner = owner
        self.n = int(n)

    @property
    def weight(self) -> torch.Tensor:
        return self.owner.weight[:, :self.n]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.owner, "bias", None)

    def __getattr__(self, name):  # stride, padding, groups, ... (only reached for other names)
        if name == "owner":
            raise AttributeError(name)
        return getattr(self.owner, name)

    def register_forward_hook(self, hook):
        def narrowed(module, args, output):
            if args and torch.is_tensor(args[0]):
                args = (args[0][:, :self.n],) + tuple(args[1:])
            return hook(self, args, output)

        return self.owner.register_forward_hook(narrowed)

    def __repr__(self):
        return f"InputSlice({type(self.owner).__name__}, first {self.n} of {self.owner.weight.shape[1]} channels)"


def wider_input(info, shape: tuple) -> bool:
    """Whether the host's ``shape`` is the table's input layer with more input channels."""
    want = tuple(info.weight_shape)
    return (info.component == "unet" and info.path == "conv_in" and len(shape) == len(want) >= 2
            and shape[0] == want[0] and shape[2:] == want[2:] and shape[1] > want[1])


def offload_hooks(root) -> Optional[str]:
    """Which offloading moves this component's weights behind the host's back, or None.

    accelerate's CPU / sequential offload (``_hf_hook``: parameters live on ``meta`` or are
    swapped in per forward) and diffusers' group offloading (``_diffusers_hook``, which swaps
    ``param.data`` with copies it keeps) both put their own copy back over a fused weight, so
    such a component takes its LoRAs on the fly (SD.Next's "sequential" / "group" offload).
    """
    if root is None or not hasattr(root, "modules"):
        return None
    for m in root.modules():
        if getattr(m, "_hf_hook", None) is not None:
            return "accelerate offload"
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and "offload" in repr(getattr(registry, "hooks", registry)).lower():
            return "diffusers group offloading"
    return None


def widened_note(component: str, path: str, have: int, base: int) -> str:
    return (f"{component} {path} has {have} input channels (the base has {base}): LoRAs act on the first "
            f"{base}, the other {have - base} keep their weights")


class ModuleView:
    """The host's modules of one component, under the core's canonical paths.

    Stands in for a diffusers / transformers component in ``lora_ext.apply``: its
    ``named_modules()`` yields ``(canonical path, host module)``.
    """

    def __init__(self, component: str, modules: Mapping[str, object], table: Mapping[str, object],
                 root=None, widened: Optional[dict] = None):
        self.component = component
        self.modules = dict(modules)
        self.table = dict(table)  # canonical path -> arch.ModuleInfo, only the modules present
        self.root = root
        # canonical path -> (host's input channels, the table's): input layers wider than the
        # base's, which LoRAs reach on their first channels (see InputSlice)
        self.widened = dict(widened or {})
        self.offloaded = offload_hooks(root)

    def named_modules(self):
        return iter(self.modules.items())

    def __contains__(self, path: str) -> bool:
        return path in self.modules

    def __getitem__(self, path: str):
        return self.modules[path]

    def __len__(self) -> int:
        return len(self.modules)


@dataclass
class BoundModel:
    """A host model bound to an architecture: views, key map, and where it came from."""

    host: HostModel
    family: str  # "sd1" | "sd2" | "sdxl" | a registered layout name | "custom"
    views: dict  # component -> ModuleView
    keymap: KeyMap
    skipped: dict = field(default_factory=dict)  # component -> [canonical paths the host lacks]

    @property
    def notes(self) -> list:
        """What binding adapted, one line each (for consoles, infotext and inspect output)."""
        out = []
        for comp, view in self.views.items():
            if view.offloaded:
                out.append(f"{comp} is offloaded ({view.offloaded}): its LoRAs run on the fly, weights untouched")
            for path, (have, base) in view.widened.items():
                out.append(widened_note(comp, path, have, base))
        return out

    @property
    def label(self) -> str:
        if self.host.label:
            return self.host.label
        if self.family in FAMILY_LABELS:
            return FAMILY_LABELS[self.family]
        from .dit import family_label

        return family_label(self.family)

    def keymap_for(self, components: Iterable[str]) -> KeyMap:
        """A KeyMap over ``components`` only (the others' keys report "no such module")."""
        comps = [c for c in components if c in self.views]
        return KeyMap({c: self.views[c].table for c in comps}, label=self.label,
                      naming={c: self.host.naming_of(c) for c in comps})


# --------------------------------------------------------------------------------------------
# layouts

_EXTRA_LAYOUTS: dict = {}
_LOCK = threading.Lock()


def register_layout(name: str, layout: Mapping[str, Mapping[str, object]]) -> None:
    """Add a model layout (``{component: {canonical path: arch.ModuleInfo}}``) for :func:`bind`
    to try (before SD1.x/SD2.x/SDXL, after the host's hint): for hosts running a model of
    another size (a pruned or distilled UNet, the tiny models of the tests).
    ``arch.table_for_model`` builds one."""
    with _LOCK:
        _EXTRA_LAYOUTS[name] = {c: dict(t) for c, t in layout.items()}


def unregister_layout(name: str) -> None:
    with _LOCK:
        _EXTRA_LAYOUTS.pop(name, None)


def _candidate_tables(hint: Optional[str], component: str):
    """(family, table) pairs to try for one component."""
    with _LOCK:
        extras = dict(_EXTRA_LAYOUTS)
    # the hint, then the layouts registered on purpose (cheap), then the SD families (whose
    # tables are built once per process)
    order = [hint] if (hint in arch.ARCHS or hint in extras) else []
    order += [n for n in extras if n not in order]
    order += [a for a in arch.ARCHS if a not in order]
    for fam in order:
        if fam in extras:
            table = extras[fam].get(component)
        elif component in arch.components(fam):
            table = arch.module_table(fam, component)
        else:
            table = None
        if table:
            yield fam, table


def _get(root, path: str):
    obj = root
    for part in path.split("."):
        if part.isdigit() and not hasattr(obj, part):
            try:
                obj = obj[int(part)]
                continue
            except (TypeError, IndexError, KeyError):
                return None
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _diffusers_index(component: str, root) -> dict:
    index = {}
    for name, module in root.named_modules():
        if component != "unet":
            if name == "text_model":
                continue
            if name.startswith("text_model."):
                name = name[len("text_model."):]
        index.setdefault(name, module)
    return index


def _shape(obj) -> Optional[tuple]:
    w = getattr(obj, "weight", None)
    return tuple(w.shape) if isinstance(w, torch.Tensor) else None


def _view_from_table(component: str, root, table, naming: str) -> tuple:
    """(modules found, table entries found, paths missing, shape mismatches, widened inputs)."""
    modules, found, missing, wrong, widened = {}, {}, [], 0, {}
    index = _diffusers_index(component, root) if naming == "diffusers" else None
    for path, info in table.items():
        if naming == "diffusers":
            mod = index.get(path)
            if mod is None:
                mod = bare_parameter(index, path)
        elif info.ldm_path is None:
            mod = None
        elif info.ldm_rows is not None:
            owner = _get(root, info.ldm_path)
            if isinstance(getattr(owner, "in_proj_weight", None), torch.Tensor):
                mod = RowSlice(owner, info.ldm_rows)  # OpenCLIP's MultiheadAttention
            elif isinstance(getattr(owner, "weight", None), torch.Tensor) and owner.weight.dim() == 2:
                mod = RowSlice(owner, info.ldm_rows, "weight", "bias")  # a DiT's fused Linear
            else:
                mod = None
        elif info.ldm_transposed:
            mod = None  # OpenCLIP's text_projection is used as x @ P: not a Linear weight
        elif info.ldm_weight is not None and not info.ldm_weight.endswith(".weight"):
            owner = _get(root, info.ldm_path.rsplit(".", 1)[0]) if "." in info.ldm_path else root
            name = info.ldm_path.rsplit(".", 1)[-1]
            mod = _BareParameter(owner, name) if isinstance(getattr(owner, name, None), torch.Tensor) else None
        else:
            mod = _get(root, info.ldm_path)
        shape = _shape(mod) if mod is not None else None
        if shape is None:
            missing.append(path)
            continue
        if shape != tuple(info.weight_shape):
            if not (isinstance(mod, torch.nn.Module) and wider_input(info, shape)):
                wrong += 1
                continue
            widened[path] = (shape[1], info.weight_shape[1])
            mod = InputSlice(mod, info.weight_shape[1])
        modules[path] = mod
        found[path] = info
    return modules, found, missing, wrong, widened


def bind(host: HostModel, *, min_coverage: float = 0.9) -> BoundModel:
    """Bind a host model to the architecture its modules match (names and weight shapes).

    A table matches a component when no module it names has another shape in the host and
    at least ``min_coverage`` of its modules are found. The host's ``family`` hint is tried
    first, then layouts added with :func:`register_layout`, then SD1.x/SD2.x/SDXL; for
    ``"diffusers"`` naming a model of any other size gets a table of its own from its modules.
    Raises :class:`LoraExtError` naming the component when nothing fits.
    """
    if not host.components:
        raise LoraExtError("the host model has no components")
    views, skipped, families = {}, {}, []
    for comp, root in host.components.items():
        if root is None:
            continue
        if comp not in ("unet", "te1", "te2", "te3"):
            raise LoraExtError(f"unknown model component {comp!r} (use unet, te1, te2, te3)")
        naming = host.naming_of(comp)
        chosen = None
        tables = _candidate_tables(host.family, comp)
        dit_table = _dit_table(root) if comp == "unet" else _t5_table(root) if comp == "te3" else None
        if dit_table is not None:
            tables = iter([dit_table])
        for fam, table in tables:
            modules, found, missing, wrong, widened = _view_from_table(comp, root, table, naming)
            if wrong == 0 and modules and len(modules) >= min_coverage * len(table):
                chosen = (fam, modules, found, missing, widened)
                break
        if chosen is None and naming == "diffusers":
            cfg = getattr(root, "config", None)
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
            table = arch.table_for_model(comp, root, cfg)
            modules, found, missing, wrong, widened = _view_from_table(comp, root, table, naming)
            chosen = ("custom", modules, found, missing, widened)
        if chosen is None:
            raise LoraExtError(
                f"{host.label or 'the model'}: its {comp} is not SD1.x, SD2.x, SDXL, Flux.1, Chroma, SD3 or "
                f"Qwen-Image (no module table matches its {naming} module names and weight shapes)")
        fam, modules, found, missing, widened = chosen
        views[comp] = ModuleView(comp, modules, found, root=root, widened=widened)
        skipped[comp] = missing
        families.append(fam)
    if not views:
        raise LoraExtError("the host model has no components")
    named = [f for f in families if f != "custom"]
    family = named[0] if named else "custom"
    label = host.label or FAMILY_LABELS.get(family) or _dit_label(family)
    keymap = KeyMap({c: v.table for c, v in views.items()}, label=label,
                    naming={c: host.naming_of(c) for c in views})
    return BoundModel(host, family, views, keymap, skipped)


def _dit_label(family: str) -> str:
    from .dit import family_label

    return family_label(family)


def _t5_table(root):
    """("t5", table) of a T5 encoder (the DiT families' te3), or None."""
    from .dit.text import t5_dims, t5_table

    try:
        shapes = {name: tuple(t.shape) for name, t in root.state_dict(keep_vars=True).items()
                  if isinstance(t, torch.Tensor)}
    except Exception:  # noqa: BLE001
        return None
    dims = t5_dims(shapes)
    return None if dims is None else ("t5", {p: i for p, i in t5_table(dims).items()})


def _dit_table(root):
    """(family, table) when ``root`` is a DiT denoiser (Flux.1, Chroma, SD3, Qwen-Image) in
    either layout, else None."""
    from . import dit

    try:
        shapes = {name: tuple(t.shape) for name, t in root.state_dict(keep_vars=True).items()
                  if isinstance(t, torch.Tensor)}
    except Exception:  # noqa: BLE001 - not a module we can read: not a DiT
        return None
    found = dit.table_for_shapes(shapes)
    if found is None:
        return None
    name, _, table = found
    return name, table


def weights_digest(host: HostModel) -> dict:
    """``{component: sha256 hex}`` of every parameter and buffer of each component (names,
    dtypes, shapes and bits): two equal digests mean bit-identical weights. Hosts expose it so
    that a restore can be checked against a fresh load from outside the process."""
    import hashlib

    out = {}
    for comp, root in host.components.items():
        if root is None or not hasattr(root, "state_dict"):
            continue
        h = hashlib.sha256()
        for name, t in sorted(root.state_dict(keep_vars=False).items()):
            if not isinstance(t, torch.Tensor):
                continue
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.device.type != "meta":
                flat = t.detach().reshape(-1).contiguous().cpu()
                h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        out[comp] = h.hexdigest()
    second = getattr(host, "second_expert", None)
    if second is not None:
        out.update({f"{c} ({second.expert or 'second'} expert)": d for c, d in weights_digest(second).items()})
    return out


# --------------------------------------------------------------------------------------------
# static patches (for hosts that patch weights themselves)

def _rows(binding, index: int):
    """(stacked shape, rows of target ``index``) for a binding spanning fused q/k/v, else (None, None)."""
    if len(binding.targets) == 1:
        return None, None
    shape = tuple(binding.candidate.weight_shape)
    counts = binding.candidate.row_counts
    start = sum(counts[:index])
    return shape, (start, start + counts[index])


def _contribution_delta(binding, index: int, w32: torch.Tensor) -> torch.Tensor:
    """fp32 change of target ``index`` of ``binding`` at strength 1, given that target's weight."""
    return target_delta(binding.adapter, w32, *_rows(binding, index))


def _contribution_bias(binding, index: int, b32, w32) -> Optional[torch.Tensor]:
    return target_bias_delta(binding.adapter, b32, w32, *_rows(binding, index))


@dataclass
class ModulePatch:
    """The change a list of LoRAs makes to one module at one step (fp32, from the weight given).

    ``items``: ``[(binding, target index, strength)]``. ``weight(W)`` returns
    ``W + sum(s * delta(W))``, every delta taken at the ``W`` given (the pristine weight when
    the host patches from it), summed in fp32 in the items' order; ``bias(b, W)`` likewise.
    Both compute on the CPU and give back a tensor on ``W``'s device.
    """

    component: str
    path: str
    info: object  # arch.ModuleInfo
    items: list = field(default_factory=list)
    narrow: Optional[int] = None  # a wider input layer: the LoRAs' input channels (see InputSlice)

    def _narrowed(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.narrow is None or w.dim() < 2 or w.shape[1] <= self.narrow else w[:, :self.narrow]

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        full = w.detach().to("cpu", torch.float32)
        w32 = self._narrowed(full)
        acc = torch.zeros_like(w32)
        for binding, index, s in self.items:
            acc.add_(_contribution_delta(binding, index, w32), alpha=float(s))
        if not torch.isfinite(acc).all():
            raise AdapterError(f"delta of {self.component}:{self.path} is not finite (NaN or Inf)")
        if w32.shape != full.shape:  # zeros on the extra input channels, as A1111's built-in pads
            padded = torch.zeros_like(full)
            padded[:, :w32.shape[1]] = acc
            acc = padded
        return acc.to(w.device)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.float() + self.delta(w)

    def bias_delta(self, b: Optional[torch.Tensor], w: torch.Tensor) -> Optional[torch.Tensor]:
        w32 = self._narrowed(w.detach().to("cpu", torch.float32))
        b32 = None if b is None else b.detach().to("cpu", torch.float32)
        acc = None
        for binding, index, s in self.items:
            db = _contribution_bias(binding, index, b32, w32)
            if db is not None:
                acc = db * float(s) if acc is None else acc.add_(db, alpha=float(s))
        return None if acc is None else acc.to(w.device)

    @property
    def changes_bias(self) -> bool:
        return any(_has_bias(b) for b, _, _ in self.items)


def _has_bias(binding) -> bool:
    names = set(getattr(binding.group, "keys", {}) or {})
    return bool(names & {"lora_up.bias", "diff_b", "b_norm"})


def static_patches(bound: BoundModel, entries, *, components: Iterable[str], step: Optional[int] = 0,
                   total: Optional[int] = None, hires: bool = False) -> tuple:
    """Per module, the change the LoRAs make at ``step`` (constant over a run when unscheduled).

    ``entries``: ``[(LoraSpec, Lora)]`` (the file loaded with ``network.load_lora``).
    Returns ``(patches, reports)``: ``{(component, path): ModulePatch}`` for the modules some
    LoRA changes with a non-zero strength, and one ``(spec, applied modules, unmatched)`` per
    entry, ``unmatched`` being ``network.Unmatched`` records (nothing dropped silently).
    """
    keymap = bound.keymap_for(components)
    patches: dict = {}
    reports = []
    for spec, lora in entries:
        res = lora.resolve(keymap)
        weights = spec.bind_blocks(res, keymap)  # block weights that depend on the model / the file
        applied = 0
        for b in res.bindings:
            applied += 1
            for i, t in enumerate(b.targets):
                s = float(weights.strength(t.component, t.block, step, total, hires=hires))
                if s == 0.0:
                    continue
                key = (t.component, t.module)
                p = patches.get(key)
                if p is None:
                    view = bound.views[t.component]
                    wide = view.widened.get(t.module)
                    p = patches[key] = ModulePatch(t.component, t.module, view.table[t.module],
                                                   narrow=None if wide is None else wide[1])
                p.items.append((b, i, s))
        reports.append((spec, applied, list(res.unmatched)))
    return patches, reports


def varies_per_step(spec, component: str) -> bool:
    """Whether ``spec``'s strength on ``component`` ("unet", "te1", "te2") can change from one
    step to the next (keyframes on that component's weights or its blocks, start/stop)."""
    from .spec import Keyframes

    if spec.start is not None or spec.stop is not None:
        return True
    if component == "unet":
        ws = [spec.unet, spec.hr, spec.hr_unet] + list((spec.blocks or {}).values())
    else:
        ws = [spec.te, spec.hr, spec.hr_te, (spec.blocks or {}).get("BASE")]
    return any(isinstance(w, Keyframes) for w in ws)


# --------------------------------------------------------------------------------------------

def step_from_sigma(sigmas, sigma, *, rtol: float = 1e-4) -> int:
    """Which step of the schedule ``sigmas`` (decreasing, last one the end) ``sigma`` is in.

    Step ``i`` runs from ``sigmas[i]`` down to ``sigmas[i+1]``; a sigma between the two (a
    second-order sampler's intermediate evaluation) belongs to step ``i``. Clamped to
    ``[0, len(sigmas) - 2]``.
    """
    s = [float(x) for x in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
    if len(s) < 2:
        return 0
    v = float(sigma.max()) if hasattr(sigma, "max") and hasattr(sigma, "numel") and sigma.numel() > 1 \
        else float(sigma)
    n = len(s) - 1
    for i in range(n):
        hi = s[i] * (1 + rtol) + 1e-12
        lo = s[i + 1] * (1 + rtol) + 1e-12
        if lo < v <= hi:
            return i
        if abs(v - s[i]) <= rtol * max(abs(s[i]), 1e-12):
            return i
    return 0 if v > s[0] else n - 1


class TimestepClock:
    """The step a diffusers-style run is on, from the timestep its UNet is called with.

    ``timesteps``: the schedule as the host iterates it; consecutive equal entries are one
    step (a second-order scheduler's repeated timesteps, so its corrector evaluation at the
    next timestep takes that step's strengths, as the sigma rule of :func:`step_from_sigma`
    does). ``step(t)`` searches forward from the current step, so calling the UNet twice at
    one timestep (cond and uncond unbatched) stays on it. Without a schedule every new
    timestep value starts the next step and ``total`` is None.
    """

    def __init__(self, timesteps=None):
        self.groups = []
        if timesteps is not None:
            for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else list(timesteps)):
                if not self.groups or self.groups[-1] != float(t):
                    self.groups.append(float(t))
        self.current = None
        self._last = None

    @property
    def total(self) -> Optional[int]:
        return len(self.groups) or None

    def step(self, t) -> int:
        v = float(t.reshape(-1)[0]) if hasattr(t, "reshape") else float(t)
        if not self.groups:
            if self._last is None or v != self._last:
                self.current = 0 if self.current is None else self.current + 1
            self._last = v
            return self.current
        start = self.current or 0
        for i in range(start, len(self.groups)):
            if self.groups[i] == v:
                self.current = i
                return i
        # not in the schedule (a host that perturbs timesteps): the nearest one
        self.current = min(range(len(self.groups)), key=lambda i: abs(self.groups[i] - v))
        return self.current
