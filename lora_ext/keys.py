"""Naming: turn any LoRA key into (group prefix, tensor name) and any prefix into a module.

Two steps, both pure:

1. ``split_key`` normalises the tensor-name end of a key to kohya/LyCORIS spelling (PEFT's
   ``lora_A``/``lora_B``/``lora_magnitude_vector`` and adapter names like ``.default``, old
   diffusers ``.lora.down``/``processor.to_q_lora`` forms) and splits it into the module
   prefix and the tensor name.
2. ``KeyMap`` knows every spelling of every module of one model layout (kohya flat names of
   the diffusers and the ldm/compvis paths, LyCORIS ``lycoris_*``, diffusers ``unet.`` /
   ``text_encoder.``, PEFT ``base_model.model.``, ldm single-file keys, OpenCLIP text-encoder
   names) and maps a prefix to its candidate targets.
"""
from __future__ import annotations

import re
from functools import lru_cache
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

# Tensor names (after normalisation) that adapter types use. The core asks the registered
# types for theirs too, so a third-party type's names split correctly.
_BASE_NAMES = (
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_up.bias", "alpha",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "dora_scale", "weight", "on_input", "oft_blocks", "oft_diag", "rescale",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight", "diff", "diff_b", "w_norm", "b_norm",
)

# PEFT / diffusers spellings -> kohya spelling. ``(?:\.[A-Za-z0-9_]+)?`` is PEFT's adapter
# name level (".default" or a user name) that sits before ".weight".
_REWRITES = (
    (re.compile(r"\.lora_A(?:\.(?!weight$)[A-Za-z0-9_-]+)?\.weight$"), ".lora_down.weight"),
    (re.compile(r"\.lora_B(?:\.(?!weight$|bias$)[A-Za-z0-9_-]+)?\.weight$"), ".lora_up.weight"),
    (re.compile(r"\.lora_B(?:\.(?!weight$|bias$)[A-Za-z0-9_-]+)?\.bias$"), ".lora_up.bias"),
    (re.compile(r"\.lora_magnitude_vector(?:\.(?!weight$)[A-Za-z0-9_-]+)?(?:\.weight)?$"), ".dora_scale"),
    # diffusers LoRACompatibleLinear / LoRALinearLayer (diffusers 0.14-0.24 era)
    (re.compile(r"\.lora(?:_linear_layer)?\.down\.weight$"), ".lora_down.weight"),
    (re.compile(r"\.lora(?:_linear_layer)?\.up\.weight$"), ".lora_up.weight"),
)
# diffusers attention-processor LoRA: "attn1.processor.to_q_lora.down.weight"
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")
# XLabs Flux processors: "double_blocks.0.processor.qkv_lora1.down.weight" (the module part
# stays: KeyMap knows "processor.qkv_lora1" as an alias of the fused img qkv)
_XLABS = re.compile(r"(\.processor\.(?:qkv|proj)_lora\d?)\.(up|down)\.weight$")


_DIFF_M = re.compile(r"\.diff_m$")


def normalise_key(key: str) -> str:
    """The key with its tensor-name end in kohya spelling (the module part is untouched)."""
    if _DIFF_M.search(key):
        # lightx2v / Kijai Wan LoRAs: "blocks.0.diff_m" is a full delta of the block's bare
        # "modulation" parameter (kijai/ComfyUI-WanVideoWrapper#807)
        return key[: -len(".diff_m")] + ".modulation.diff"
    m = _PROCESSOR.search(key)
    if m:
        module = m.group(1) + (".0" if m.group(1) == "to_out" else "")
        return key[: m.start()] + f".{module}.lora_{m.group(2)}.weight"
    m = _XLABS.search(key)
    if m:
        return key[: m.start()] + f"{m.group(1)}.lora_{m.group(2)}.weight"
    for pattern, repl in _REWRITES:
        new = pattern.sub(repl, key)
        if new != key:
            return new
    return key


@lru_cache(maxsize=64)
def _longest_first(names: tuple) -> tuple:
    return tuple(sorted(set(names), key=len, reverse=True))


def split_key(key: str, names: Iterable[str] = _BASE_NAMES) -> tuple[str, str]:
    """(module prefix, tensor name) of a normalised key.

    A known tensor name at the end wins (longest first); otherwise a kohya-style key
    ``prefix.rest`` splits at its first dot and anything else at its last one, so unknown
    names still group per module for the auto-detector.
    """
    for name in _longest_first(names if isinstance(names, tuple) else tuple(names)):
        if key.endswith("." + name) and len(key) > len(name) + 1:
            return key[: -len(name) - 1], name
    head, dot, rest = key.partition(".")
    if dot and ("_" in head) and not head.startswith(("unet", "text_encoder", "base_model", "model")):
        return head, rest
    head, dot, rest = key.rpartition(".")
    return (head, rest) if dot else (key, "")


def group_keys(keys: Iterable[str], names: Iterable[str] = _BASE_NAMES) -> dict[str, dict[str, str]]:
    """prefix -> {normalised tensor name: original key}."""
    names = tuple(set(_BASE_NAMES) | set(names))
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix, name = split_key(normalise_key(key), names)
        groups.setdefault(prefix, {})[name] = key
    return groups


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One module of the model: where a LoRA group's delta goes."""

    component: str  # "unet" | "te1" | "te2" | "te3" (a DiT's T5)
    module: str  # canonical path: diffusers naming (unet), HF CLIP without `text_model.` (te)
    block: str  # "BASE" | "INxx" | "M00" | "OUTxx"


@dataclass(frozen=True)
class Candidate:
    """What one spelling may mean: a single module, or several stacked by rows.

    OpenCLIP's fused ``attn.in_proj`` is q, k and v stacked; a LoRA on it spans three modules.
    """

    targets: tuple  # tuple[Target, ...]; stacked by rows in this order when len > 1
    weight_shape: tuple  # the (stacked) weight shape the adapter must produce
    # rows of each target when len(targets) > 1 (Flux's linear1 is q|k|v|mlp, uneven); empty
    # means equal parts
    parts: tuple = ()
    # the adapter's delta has its two row halves in the other order than the module's weight:
    # a diffusers-named LoRA on an original-layout modulation (or the reverse), see ModuleInfo.ldm_swap
    swap: bool = False

    @property
    def row_counts(self) -> tuple:
        if self.parts:
            return tuple(self.parts)
        n = len(self.targets)
        return (int(self.weight_shape[0]) // n,) * n

    @property
    def component(self) -> str:
        return self.targets[0].component


# kohya prefixes per component; "lora_te_" is SD1/SD2's only TE and SDXL's first.
# kohya's networks.oft writes "oft_unet_" / "oft_te_" instead of "lora_". OneTrainer's
# legacy DiT files name the denoiser "lora_transformer_" (diffusers paths, flattened).
# te3 is the DiT families' T5: kohya writes "lora_te3_", OneTrainer "lora_te2_" on Flux (its
# names cannot be confused with a CLIP's, so both prefixes are safe).
KOHYA_PREFIX = {"unet": ("lora_unet_", "oft_unet_", "lora_transformer_"),
                "te1": ("lora_te_", "lora_te1_", "oft_te_", "oft_te1_"),
                "te2": ("lora_te2_", "oft_te2_"),
                "te3": ("lora_te3_", "lora_te2_")}
# diffusers pipelines call the denoiser "unet" (SD) or "transformer" (DiT families); ComfyUI
# and OneTrainer's OMI files name the text encoders after the model (clip_l, clip_g, t5xxl)
DIFFUSERS_PREFIX = {"unet": ("unet.", "transformer.", "transformer.base_model.model."),
                    "te1": ("text_encoder.", "te.", "text_encoders.clip_l.transformer.", "clip_l."),
                    "te2": ("text_encoder_2.", "text_encoders.clip_g.transformer.", "clip_g."),
                    "te3": ("text_encoder_3.", "text_encoder_2.", "text_encoders.t5xxl.transformer.", "t5.")}
# Prefixes that don't say the component: resolve by shape among all components.
NEUTRAL_FLAT = ("lycoris_", "lora_")
NEUTRAL_DOTTED = ("base_model.model.", "")
# Original-layout (ldm / BFL / SAI) names of the denoiser, as single files and their LoRAs
# write them: ComfyUI's "diffusion_model.", checkpoints' "model.diffusion_model.", OMI and
# diffusion-pipe's "transformer.", SimpleTuner's "transformer.base_model.model."
LDM_DOTTED = ("diffusion_model.", "model.diffusion_model.", "transformer.", "transformer.base_model.model.")
# Wan-Fun writes "lora_unet__blocks_0_..." (double underscore, comfy/lora_convert.py), Tencent's
# HunyuanVideo-I2V trainer "Hunyuan_video_I2V_lora_double_blocks_0_..." (HunyuanVideo-I2V#61)
LDM_FLAT = ("diffusion_model_", "lora_unet_diffusion_model_", "lora_unet__", "Hunyuan_video_I2V_lora_")


def _flat(path: str) -> str:
    return path.replace(".", "_")


class KeyMap:
    """Every spelling of every module of one model layout -> candidate targets.

    ``layout``: component -> {canonical path: ModuleInfo-like} (needs ``path``, ``block``,
    ``weight_shape``, ``ldm_path``, ``ldm_weight``, ``ldm_rows``, ``kind``; ``ldm_swap``
    optional). ``naming``: how the model being patched names its modules, ``"diffusers"``
    (default) or ``"ldm"``, for all components or ``{component: naming}``; it only matters
    for modules whose two layouts order their rows differently (``ldm_swap``): a LoRA spelled
    in the other layout gets its delta's halves swapped.
    """

    def __init__(self, layout: Mapping[str, Mapping[str, object]], label: str = "this model",
                 naming="diffusers"):
        self.layout = layout
        self.label = label
        self.naming = naming
        self._aliases: dict[str, list[Candidate]] = {}
        self._not_applicable: list = []  # (compiled pattern, reason): keys this model cannot have
        for component, table in layout.items():
            ldm_model = self._naming_of(component) == "ldm"
            for info in table.values():
                swapped = bool(getattr(info, "ldm_swap", False))
                for body, is_ldm in self._bodies(component, info):
                    cand = Candidate((Target(component, info.path, info.block),), tuple(info.weight_shape),
                                     swap=swapped and is_ldm != ldm_model)
                    for alias in self._body_spellings(component, body, is_ldm):
                        self._add(alias, cand)
                if info.ldm_weight and info.ldm_rows is None:
                    full = info.ldm_weight.rsplit(".", 1)[0]
                    cand = Candidate((Target(component, info.path, info.block),), tuple(info.weight_shape),
                                     swap=swapped and not ldm_model)
                    self._add(full, cand)
                    self._add(_flat(full), cand)
            self._add_fused(component, table)

    def _naming_of(self, component: str) -> str:
        n = self.naming
        return n.get(component, "diffusers") if isinstance(n, Mapping) else (n or "diffusers")

    # --- building ------------------------------------------------------------------------
    def _add(self, alias: str, cand: Candidate) -> None:
        lst = self._aliases.get(alias)
        if lst is None:
            self._aliases[alias] = [cand]
        elif cand not in lst:  # identity first: the same candidate under several spellings
            lst.append(cand)

    @staticmethod
    def _bodies(component: str, info) -> list[tuple[str, bool]]:
        """(dotted body, is_ldm) spellings of one module inside its component."""
        bodies = [(info.path, False)]
        if component != "unet":
            bodies.append(("text_model." + info.path, False))
        if info.ldm_path and info.ldm_rows is None:
            bodies.append((info.ldm_path, True))
            alias = getattr(info, "ldm_alias", None)
            if alias:
                bodies.append((alias[: -len(".scale")] if alias.endswith(".scale") else alias, True))
        if info.ldm_path and info.ldm_path.endswith(".scale") and info.ldm_rows is None:
            bodies.append((info.ldm_path[: -len(".scale")], True))  # a norm scale named by its module
        return bodies

    @staticmethod
    def _body_spellings(component: str, body: str, is_ldm: bool) -> Iterable[str]:
        flat = _flat(body)
        for p in KOHYA_PREFIX[component]:
            yield p + flat
        for p in NEUTRAL_FLAT:
            yield p + flat
        if component == "unet" and is_ldm:
            for p in LDM_FLAT:
                yield p + flat
            for p in LDM_DOTTED:
                yield p + body
        for p in DIFFUSERS_PREFIX[component]:
            yield p + body
        for p in NEUTRAL_DOTTED:
            yield p + body
        if is_ldm and component != "unet":
            # OpenCLIP module names as they appear under the component root ("model.")
            for p in KOHYA_PREFIX[component]:
                yield p + "model_" + flat

    def _add_fused(self, component: str, table) -> None:
        """Modules stored as rows of one fused weight: OpenCLIP's ``attn.in_proj`` (q/k/v) and
        the DiT originals (Flux ``img_attn.qkv``, ``linear1`` = q|k|v|mlp, SD3 ``attn.qkv``)."""
        fused: dict[str, list] = {}
        for info in table.values():
            if info.ldm_rows is not None and info.ldm_weight:
                fused.setdefault(info.ldm_weight, []).append(info)
        for key, parts in fused.items():
            parts.sort(key=lambda i: i.ldm_rows[0])
            counts = tuple(i.ldm_rows[1] - i.ldm_rows[0] for i in parts)
            shape = (sum(counts),) + tuple(parts[0].weight_shape[1:])
            cand = Candidate(tuple(Target(component, i.path, i.block) for i in parts), shape,
                             parts=counts if len(set(counts)) > 1 else ())
            if key.endswith(parts[0].ldm_path + ".weight"):  # a Linear holding the parts (DiT)
                aliases = [key[: -len(".weight")], _flat(key[: -len(".weight")])]
                for body in filter(None, (parts[0].ldm_path, getattr(parts[0], "ldm_alias", None))):
                    aliases += list(self._body_spellings(component, body, True))
                    for k, info in enumerate(parts):  # OneTrainer OMI: ".qkv.0" / ".linear1.3" per part
                        single = Candidate((Target(component, info.path, info.block),), tuple(info.weight_shape))
                        for alias in self._body_spellings(component, f"{body}.{k}", True):
                            self._add(alias, single)
            else:  # OpenCLIP: ldm_path is the MultiheadAttention, the weight its in_proj_weight
                full = key[: -len("_weight")] if key.endswith("_weight") else key.rsplit(".", 1)[0]
                ldm_body = parts[0].ldm_path + ".in_proj"
                aliases = [full, _flat(full), ldm_body, "model." + ldm_body]
                aliases += [p + _flat(ldm_body) for p in KOHYA_PREFIX[component] + NEUTRAL_FLAT]
                aliases += [p + "model_" + _flat(ldm_body) for p in KOHYA_PREFIX[component]]
            for alias in aliases:
                self._add(alias, cand)
        if component == "unet":
            from .dit.aliases import extra_aliases, not_applicable

            self._not_applicable.extend(not_applicable(table))

            for alias, paths in extra_aliases(table):
                infos = [table[p] for p in paths]
                counts = tuple(int(i.weight_shape[0]) for i in infos)
                shape = (sum(counts),) + tuple(infos[0].weight_shape[1:])
                cand = Candidate(tuple(Target(component, i.path, i.block) for i in infos), shape,
                                 parts=counts if len(set(counts)) > 1 else ())
                for p in ("",) + LDM_DOTTED:
                    self._add(p + alias, cand)

    # --- lookup --------------------------------------------------------------------------
    def candidates(self, prefix: str) -> list[Candidate]:
        found = self._aliases.get(prefix)
        if found is None and prefix.endswith("_"):
            # SimpleTuner wrote kohya-style names with a trailing underscore
            # ("..._attn_to_k_.lora_down.weight", Comfy-Org/ComfyUI#4347)
            found = self._aliases.get(prefix.rstrip("_"))
        return list(found or ())

    def __contains__(self, prefix: str) -> bool:
        return prefix in self._aliases

    def __len__(self) -> int:
        return len(self._aliases)

    def choose(self, prefix: str, fits=None) -> tuple[Optional[Candidate], str]:
        """The candidate for ``prefix`` that fits, or (None, reason).

        ``fits`` is the adapter's weight shape, or a predicate over a module's weight shape
        (``Adapter.fits``), or None to accept any shape.
        """
        cands = self.candidates(prefix)
        if not cands:
            for pattern, why in self._not_applicable:
                if pattern.search(prefix):
                    return None, f"not applicable to {self.label}: {why}"
            return None, f"no such module in {self.label}"
        if fits is not None:
            test = fits if callable(fits) else (lambda shape: shape_fits(fits, shape))
            ok = [c for c in cands if test(tuple(c.weight_shape))]
            if not ok:
                want = " or ".join(str(tuple(c.weight_shape)) for c in cands)
                made = "" if callable(fits) else f"makes {tuple(fits)}, "
                return None, f"shape mismatch: the adapter {made}does not fit the module's weight {want}"
            cands = ok
        if len(cands) > 1:
            where = ", ".join(f"{c.component}:{c.targets[0].module}" for c in cands)
            return None, f"ambiguous: fits {where}"
        return cands[0], ""


def shape_fits(adapter_shape: tuple, module_shape: tuple) -> bool:
    """Equal shapes, allowing a Linear-shaped (out, in) delta on a 1x1 conv (out, in, 1, 1)."""
    a, m = tuple(adapter_shape), tuple(module_shape)
    if a == m:
        return True
    squeeze = lambda s: tuple(s[:2]) if len(s) == 4 and s[2:] == (1, 1) else tuple(s)  # noqa: E731
    return squeeze(a) == squeeze(m)
