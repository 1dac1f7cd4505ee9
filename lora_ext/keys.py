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


def _put(index: dict, name: str, entry: tuple) -> None:
    """``index[name]``: one entry, or a list once a second one shares the name (rare)."""
    prev = index.setdefault(name, entry)
    if prev is not entry:
        index[name] = (prev if isinstance(prev, list) else [prev]) + [entry]


class _ComponentIndex:
    """One component table's names: its modules' bodies (dotted, and flattened) -> entry or
    [entries], an entry being (module index, body index, is_ldm), or (order, candidate, is_ldm,
    "fused") for the parts and wholes of fused weights; exact names (ldm weight names, fused
    weights, extra aliases) -> [(order, candidate)]. Orders leave out the component's place in
    the layout (the key map puts it first). Candidates of plain modules are made when asked for.
    """

    def __init__(self, component: str, table, naming: str):
        self.component = component
        self.naming = naming
        self.table = table  # (kept: the cache is keyed by its id)
        self.size = len(table)
        self.infos = list(table.values())
        self.dotted: dict = {}
        self.flat: dict = {}
        self.exact: dict[str, list] = {}
        self.not_applicable: list = []
        self._made: dict = {}
        self.rules = _prefix_rules(component)
        # the rules by their prefix's first character (the empty prefix's with every one): a
        # name is tried against the few prefixes it can start with
        by_char: dict = {}
        for rule in self.rules:
            if rule[0]:
                by_char.setdefault(rule[0][0], []).append(rule)
        empty = [r for r in self.rules if not r[0]]
        self.rules_by_char = {c: rules + empty for c, rules in by_char.items()}
        self.rules_empty = empty
        ldm_model = naming == "ldm"
        dotted, flat, unet = self.dotted, self.flat, component == "unet"
        for ii, info in enumerate(self.infos):
            # the module's bodies: its path; text_model.path (text encoders); its ldm path, ldm
            # alias, and a norm scale's module (".scale" dropped)
            path, ldm, rows = info.path, info.ldm_path, info.ldm_rows
            _put(dotted, path, (ii, 0, False))
            _put(flat, path.replace(".", "_"), (ii, 0, False))
            bi = 1
            if not unet:
                body = "text_model." + path
                _put(dotted, body, (ii, 1, False))
                _put(flat, body.replace(".", "_"), (ii, 1, False))
                bi = 2
            if ldm and rows is None:
                bodies = [ldm]
                alias = getattr(info, "ldm_alias", None)
                if alias:
                    bodies.append(alias[: -len(".scale")] if alias.endswith(".scale") else alias)
                if ldm.endswith(".scale"):
                    bodies.append(ldm[: -len(".scale")])  # a norm scale named by its module
                for body in bodies:
                    _put(dotted, body, (ii, bi, True))
                    _put(flat, body.replace(".", "_"), (ii, bi, True))
                    bi += 1
            if info.ldm_weight and rows is None:
                # the ldm weight's own name: the module's ldm-side candidate, made when asked for
                full = info.ldm_weight.rsplit(".", 1)[0]
                order = (0, ii, bi)
                self._add(full, ii, order)
                self._add(full.replace(".", "_"), ii, order)
        self._add_fused(table)

    def candidate(self, ii: int, is_ldm: bool) -> Candidate:
        made = self._made.get((ii, is_ldm))
        if made is None:
            info = self.infos[ii]
            swap = bool(getattr(info, "ldm_swap", False)) and is_ldm != (self.naming == "ldm")
            made = self._made[(ii, is_ldm)] = Candidate(
                (Target(self.component, info.path, info.block),), tuple(info.weight_shape), swap=swap)
        return made

    def _add(self, alias: str, cand, order: tuple) -> None:
        """``cand``: a candidate, or a module's index (its ldm-side candidate, made when asked for)."""
        self.exact.setdefault(alias, []).append((order, cand))

    def _put_body(self, body: str, entry: tuple) -> None:
        _put(self.dotted, body, entry)
        _put(self.flat, body.replace(".", "_"), entry)

    def _add_fused(self, table) -> None:
        """Modules stored as rows of one fused weight: OpenCLIP's ``attn.in_proj`` (q/k/v) and
        the DiT originals (Flux ``img_attn.qkv``, ``linear1`` = q|k|v|mlp, SD3 ``attn.qkv``)."""
        component = self.component
        fused: dict[str, list] = {}
        for info in self.infos:
            if info.ldm_rows is not None and info.ldm_weight:
                fused.setdefault(info.ldm_weight, []).append(info)
        seq = iter(range(1 << 62))
        for key, parts in fused.items():
            parts.sort(key=lambda i: i.ldm_rows[0])
            counts = tuple(i.ldm_rows[1] - i.ldm_rows[0] for i in parts)
            shape = (sum(counts),) + tuple(parts[0].weight_shape[1:])
            cand = Candidate(tuple(Target(component, i.path, i.block) for i in parts), shape,
                             parts=counts if len(set(counts)) > 1 else ())
            if key.endswith(parts[0].ldm_path + ".weight"):  # a Linear holding the parts (DiT)
                aliases = [key[: -len(".weight")], _flat(key[: -len(".weight")])]
                bodies = [b for b in (parts[0].ldm_path, getattr(parts[0], "ldm_alias", None)) if b]
                singles = [Candidate((Target(component, i.path, i.block),), tuple(i.weight_shape)) for i in parts]
                for body in bodies:
                    for k, single in enumerate(singles):  # OneTrainer OMI: ".qkv.0" / ".linear1.3" per part
                        self._put_body(f"{body}.{k}", ((1, next(seq)), single, True, "fused"))
                order = (1, next(seq))
                for body in bodies:  # every spelling of the fused module's own name
                    self._put_body(body, (order, cand, True, "fused"))
            else:  # OpenCLIP: ldm_path is the MultiheadAttention, the weight its in_proj_weight
                full = key[: -len("_weight")] if key.endswith("_weight") else key.rsplit(".", 1)[0]
                ldm_body = parts[0].ldm_path + ".in_proj"
                aliases = [full, _flat(full), ldm_body, "model." + ldm_body]
                aliases += [p + _flat(ldm_body) for p in KOHYA_PREFIX[component] + NEUTRAL_FLAT]
                aliases += [p + "model_" + _flat(ldm_body) for p in KOHYA_PREFIX[component]]
                order = (1, next(seq))
            for alias in aliases:
                self._add(alias, cand, order)
        if component == "unet":
            from .dit.aliases import extra_aliases, not_applicable

            self.not_applicable.extend(not_applicable(table))

            for alias, paths in extra_aliases(table):
                infos = [table[p] for p in paths]
                counts = tuple(int(i.weight_shape[0]) for i in infos)
                shape = (sum(counts),) + tuple(infos[0].weight_shape[1:])
                cand = Candidate(tuple(Target(component, i.path, i.block) for i in infos), shape,
                                 parts=counts if len(set(counts)) > 1 else ())
                order = (1, next(seq))
                for p in ("",) + LDM_DOTTED:
                    self._add(p + alias, cand, order)


def _prefix_rules(component: str) -> list[tuple[str, bool, bool]]:
    """(prefix, flattened?, only ldm bodies?) for the lookup: every spelling rule of either kind of body."""
    plain = set(KeyMap._spelling_rules(component, False))
    both = KeyMap._spelling_rules(component, False) + KeyMap._spelling_rules(component, True)
    return [(rule[0], rule[1], rule not in plain) for rule in dict.fromkeys(both)]


#: component indexes by (id of the table, component, naming): a table is indexed once per
#: process however many key maps hold it (the cache keeps the table, so its id stays its own)
_INDEXES: dict = {}
_INDEXES_MAX = 64
#: names a key map remembers its answer for, at most
_MEMO_NAMES = 100_000


def _component_index(component: str, table, naming: str) -> _ComponentIndex:
    key = (id(table), component, naming)
    idx = _INDEXES.get(key)
    if idx is not None and idx.table is table and idx.size == len(table):
        return idx
    idx = _INDEXES[key] = _ComponentIndex(component, table, naming)
    while len(_INDEXES) > _INDEXES_MAX:
        _INDEXES.pop(next(iter(_INDEXES)))
    return idx


class KeyMap:
    """Every spelling of every module of one model layout -> candidate targets.

    ``layout``: component -> {canonical path: ModuleInfo-like} (needs ``path``, ``block``,
    ``weight_shape``, ``ldm_path``, ``ldm_weight``, ``ldm_rows``, ``kind``; ``ldm_swap``
    optional). ``naming``: how the model being patched names its modules, ``"diffusers"``
    (default) or ``"ldm"``, for all components or ``{component: naming}``; it only matters
    for modules whose two layouts order their rows differently (``ldm_swap``): a LoRA spelled
    in the other layout gets its delta's halves swapped.

    A module has ~25 spellings per body (prefix x flat/dotted), ~10^5-10^6 for a full-size
    model: instead of storing them all, the map indexes each module's bodies (dotted and
    flattened) and, asked about a name, strips each known prefix and looks the rest up. The
    answers, and their order, are those of the full table of spellings (``spellings()``):
    candidates come in the order the table would have added them (component, module, body).
    """

    def __init__(self, layout: Mapping[str, Mapping[str, object]], label: str = "this model",
                 naming="diffusers"):
        self.layout = layout
        self.label = label
        self.naming = naming
        # one index per component table (shared by the maps of every model holding that table:
        # the DiT variants of a family share their text encoders' tables)
        self._parts = [(ci, component, _component_index(component, table, self._naming_of(component)))
                       for ci, (component, table) in enumerate(layout.items())]
        # (compiled pattern, reason): keys this model cannot have
        self._not_applicable: list = [x for _, _, idx in self._parts for x in idx.not_applicable]
        self._memo: dict[str, tuple] = {}

    def _naming_of(self, component: str) -> str:
        n = self.naming
        return n.get(component, "diffusers") if isinstance(n, Mapping) else (n or "diffusers")

    # --- spelling rules ------------------------------------------------------------------
    @staticmethod
    def _spelling_rules(component: str, is_ldm: bool) -> list[tuple[str, bool]]:
        """(prefix, flattened?) of each spelling of a body: ``prefix + flat(body)`` or ``prefix + body``."""
        rules = [(p, True) for p in KOHYA_PREFIX[component] + NEUTRAL_FLAT]
        if component == "unet" and is_ldm:
            rules += [(p, True) for p in LDM_FLAT] + [(p, False) for p in LDM_DOTTED]
        rules += [(p, False) for p in DIFFUSERS_PREFIX[component] + NEUTRAL_DOTTED]
        if is_ldm and component != "unet":
            # OpenCLIP module names as they appear under the component root ("model.")
            rules += [(p + "model_", True) for p in KOHYA_PREFIX[component]]
        return rules

    @classmethod
    def _body_spellings(cls, component: str, body: str, is_ldm: bool) -> list[str]:
        flat = _flat(body)
        return [p + (flat if is_flat else body) for p, is_flat in cls._spelling_rules(component, is_ldm)]

    # --- lookup --------------------------------------------------------------------------
    def _lookup(self, alias: str) -> tuple:
        """The candidates spelled ``alias``, in the table's order (each once)."""
        got = self._memo.get(alias)
        if got is not None:
            return got
        found = []
        for ci, component, idx in self._parts:
            for order, cand in idx.exact.get(alias, ()):
                # (an int: a module's ldm weight name, its ldm-side candidate)
                found.append(((ci,) + order, idx.candidate(cand, True) if type(cand) is int else cand))
            dotted, flat = idx.dotted, idx.flat
            for prefix, is_flat, ldm_only in idx.rules_by_char.get(alias[:1], idx.rules_empty):
                if not alias.startswith(prefix):
                    continue
                hit = (flat if is_flat else dotted).get(alias[len(prefix):])
                if hit is None:
                    continue
                for e in (hit if isinstance(hit, list) else (hit,)):
                    if len(e) == 4:  # made up front (a part or the whole of a fused weight)
                        if e[2] or not ldm_only:
                            found.append(((ci,) + e[0], e[1]))
                    elif e[2] or not ldm_only:
                        found.append(((ci, 0, e[0], e[1]), idx.candidate(e[0], e[2])))
        if len(found) > 1:
            found.sort(key=lambda oc: oc[0])
        out: list = []
        for _, cand in found:
            if cand not in out:  # the same candidate under several spellings: first one wins
                out.append(cand)
        if len(self._memo) >= _MEMO_NAMES:  # a long-lived host map: bounded
            self._memo.clear()
        got = self._memo[alias] = tuple(out)
        return got

    def spellings(self) -> dict:
        """Every name this map answers -> its candidates: the whole table, built on demand
        (tests compare it with what ``candidates`` answers)."""
        names: dict = {}
        for _, component, idx in self._parts:
            for body, hit in idx.dotted.items():
                for e in (hit if isinstance(hit, list) else (hit,)):
                    for alias in self._body_spellings(component, body, e[2]):
                        names[alias] = None
            names.update(dict.fromkeys(idx.exact))
        return {a: self._lookup(a) for a in names}

    # --- lookup --------------------------------------------------------------------------
    def candidates(self, prefix: str) -> list[Candidate]:
        found = self._lookup(prefix)
        if not found and prefix.endswith("_"):
            # SimpleTuner wrote kohya-style names with a trailing underscore
            # ("..._attn_to_k_.lora_down.weight", Comfy-Org/ComfyUI#4347)
            found = self._lookup(prefix.rstrip("_"))
        return list(found)

    def __contains__(self, prefix: str) -> bool:
        return bool(self._lookup(prefix))

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
