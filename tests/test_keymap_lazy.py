"""The lazy ``KeyMap`` answers exactly what the full table of spellings answered.

``EagerKeyMap`` below is the map as it was built before (every spelling of every module
stored up front, lora-ext 0.x): it is the oracle. For every full-size layout (SD families
and DiT variants, both namings) and some tiny custom ones, every name the eager table holds
gets the same candidates, in the same order, from the lazy map, and the lazy map answers no
name the eager table lacks (``spellings()`` enumerates exactly the same names).
"""
from __future__ import annotations

import random
import zlib
from typing import Iterable, Mapping

import pytest

from lora_ext.keys import (DIFFUSERS_PREFIX, KOHYA_PREFIX, LDM_DOTTED, LDM_FLAT, NEUTRAL_DOTTED, NEUTRAL_FLAT,
                           Candidate, KeyMap, Target, _flat)
from lora_ext.layouts import SD_ARCHS, arch_layout


class EagerKeyMap:
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
            from lora_ext.dit.aliases import extra_aliases, not_applicable

            self._not_applicable.extend(not_applicable(table))

            for alias, paths in extra_aliases(table):
                infos = [table[p] for p in paths]
                counts = tuple(int(i.weight_shape[0]) for i in infos)
                shape = (sum(counts),) + tuple(infos[0].weight_shape[1:])
                cand = Candidate(tuple(Target(component, i.path, i.block) for i in infos), shape,
                                 parts=counts if len(set(counts)) > 1 else ())
                for p in ("",) + LDM_DOTTED:
                    self._add(p + alias, cand)


    def candidates(self, prefix):
        found = self._aliases.get(prefix)
        if found is None and prefix.endswith("_"):
            found = self._aliases.get(prefix.rstrip("_"))
        return list(found or ())


def _layouts():
    from lora_ext import dit

    names = list(SD_ARCHS) + sorted(dit.VARIANTS)
    return names


def _probes(eager: EagerKeyMap, rng: random.Random) -> list:
    """Names near the real ones that must not match: a character changed, cut, or added."""
    names = rng.sample(sorted(eager._aliases), min(400, len(eager._aliases)))
    out = []
    for n in names:
        i = rng.randrange(len(n))
        out += [n[:i] + "x" + n[i + 1:], n[:-1], n + "_0", "lora_unet_" + n, n.replace("_", ".", 1)]
    return out


@pytest.mark.parametrize("name", _layouts())
@pytest.mark.parametrize("naming", ["diffusers", "ldm"])
def test_lazy_keymap_equals_the_full_table(name, naming):
    layout = arch_layout(name)
    eager = EagerKeyMap(layout, label=name, naming=naming)
    lazy = KeyMap(layout, label=name, naming=naming)
    for alias, cands in eager._aliases.items():
        assert lazy.candidates(alias) == cands, alias
        assert alias in lazy
    assert set(lazy.spellings()) == set(eager._aliases)
    rng = random.Random(zlib.crc32(name.encode()))
    for probe in _probes(eager, rng):
        assert lazy.candidates(probe) == eager.candidates(probe), probe


def test_lazy_keymap_trailing_underscore_and_unknown():
    layout = arch_layout("sd1")
    lazy = KeyMap(layout)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    assert lazy.candidates(name + "_") == lazy.candidates(name) != []
    assert lazy.candidates("lora_unet_nothing_here") == []
    assert lazy.choose("lora_unet_nothing_here")[1].startswith("no such module")
