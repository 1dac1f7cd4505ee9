"""``inspect`` for any LoRA against any base: types from the file alone, binding to the
detected full-size base or to a given checkpoint (``--base``), grouped accounting.

``inspect.inspect_lora`` / ``inspect.render_text`` call into this module. The JSON keeps every
key (``unmatched``); the text groups them by reason and module (``--keys`` lists them all).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Optional

from .detect import LIVE, detect_base_model, naming_family
from .io import addnet_hash
from .keys import KeyMap
from .metadata import training_info, trigger_words
from .textsafe import printable
from .typing_only import closest_family, file_summary, group_unmatched, unknown_evidence


class _Unmatched:
    """``network.Unmatched`` (that module imports torch)."""

    __slots__ = ("key", "reason")

    def __init__(self, key, reason):
        self.key, self.reason = key, reason

    def as_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason}


class BaseModelRef:
    """A checkpoint given with ``--base``: its module layout as a KeyMap (opened once)."""

    def __init__(self, path):
        from .checkpoint import open_checkpoint
        from .detect import LABELS

        self.path = os.fspath(path)
        ckpt = open_checkpoint(self.path)
        try:
            self.family = ckpt.family
            fam = LABELS.get(ckpt.family) or _dit_label(ckpt.family)
            self.family_label = fam
            self.label = f"{os.path.basename(os.path.normpath(self.path))} ({fam})"
            self.keymap = KeyMap(ckpt.layout, label=self.label, naming=ckpt.naming)
            self.modules = sum(len(t) for t in ckpt.layout.values())
        finally:
            ckpt.close()


def _dit_label(name: str) -> str:
    try:
        from .detect import _label

        return _label(name)
    except Exception:
        return name


def inspect_any(path, base: Optional[BaseModelRef] = None, *, lora=None, addnet: bool = True) -> dict:
    """One JSON-ready dict describing the file; bound to ``base`` when given, else to the
    detected full-size base model (when one fits).

    A safetensors file is read by shapes first, without torch (``fastpath``); whatever that
    reading does not cover exactly goes through ``network.load_lora``: the same report."""
    if lora is None:
        from .fastpath import NeedsFullPath, load_fast

        fast = load_fast(path)
        if fast is not None:
            try:
                return _inspect(path, base, fast, addnet, fast.models)
            except NeedsFullPath:
                pass
        from .network import load_lora

        lora = load_lora(path)
        if str(path).lower().endswith(".safetensors"):
            from . import fastdata

            if fastdata.load() is None:
                fastdata.refresh_user_cache()
    return _inspect(path, base, lora, addnet, _models_for(lora))


def _models_for(lora):
    """The layouts to detect against: precomputed (``fastpath.MODELS``, the same key maps
    without torch's start-up) when they are current, else the live tables."""
    models = getattr(lora, "models", None)
    if models is None:
        from .fastpath import MODELS, available

        models = MODELS if available() else None
    return models


def _inspect(path, base, lora, addnet: bool, models) -> dict:
    from .inspect import _block_order, _num  # the helpers the report shares

    m = models or LIVE
    arch_keymap = m.keymap
    Unmatched = _Unmatched
    detected = detect_base_model(lora, models)
    summary = file_summary(lora)
    if base is not None:
        res = lora.resolve(base.keymap)
        bindings, unmatched, label = res.bindings, res.unmatched, base.label
    elif detected.supported:
        res = lora.resolve(arch_keymap(detected.name))
        bindings, unmatched, label = res.bindings, res.unmatched, detected.label
    elif detected.name == "unknown" and closest_family(lora, detected.scores, models)[0] is not None:
        # name the keys' fate in the closest known layout (its names, not its shapes)
        closest = closest_family(lora, detected.scores, models)[0]
        res = lora.resolve(arch_keymap(closest))
        label = arch_keymap(closest).label
        bindings, unmatched = [], res.unmatched + [
            Unmatched(k, f"no module of this shape in {label}") for b in res.bindings for k in sorted(b.group.keys.values())]
    else:
        label = detected.label
        why = (
            f"{detected.label} names, but no module of a known {detected.label} model has this name and shape"
            if detected.name != "unknown"
            else "no module of SD1.x, SD2.x, SDXL, Flux.1, Chroma, SD3 or Qwen-Image has this name and shape"
        )
        bindings = []
        unmatched = [Unmatched(k, why) for g in lora.groups.values() for k in sorted(g.keys.values())]
    evidence = detected.evidence
    if detected.name == "unknown" or (not detected.supported and summary["modules"]):
        evidence = f"{evidence}; {unknown_evidence(lora, summary, detected.scores, models)}"

    # types/ranks/alphas/components from the file; a group only the auto-detector explains
    # (at bind time, against the target's shape) counts with the type it was found to be
    types = Counter(summary["types"])
    ranks, alphas = Counter(summary["ranks"]), Counter(summary["alphas"])
    from .typing_only import component_of_prefix

    # components: where a group binds, else what its name says
    bound_comp = {b.group.prefix: b.targets[0].component for b in bindings}
    comps = Counter(bound_comp.get(p) or component_of_prefix(p) for p, g in lora.groups.items()
                    if g.adapter is not None or p in bound_comp)
    bound_prefixes = set()
    for b in bindings:
        bound_prefixes.add(b.group.prefix)
        if b.group.adapter is None:  # auto-detected
            types[b.adapter.type_name] += 1
            if b.adapter.rank is not None:
                ranks[str(b.adapter.rank)] += 1
            if b.adapter.alpha is not None:
                alphas[_num(b.adapter.alpha)] += 1
    unclaimed = [u for u in summary["unclaimed"] if u["module"] not in bound_prefixes]
    blocks = Counter(t.block if t.component == "unet" else t.component.upper() for b in bindings for t in b.targets)
    applied_keys = sum(len(b.group.keys) for b in bindings)
    total_keys = sum(len(g.keys) for g in lora.groups.values())
    info = {
        "path": str(path),
        "format": naming_family(lora.groups),
        "container": lora.file_format,
        "base_model": detected.name,
        "base_model_label": detected.label,
        "base_model_evidence": evidence,
        "v_prediction": detected.v_prediction,
        "types": dict(sorted(types.items())),
        "typed_modules": summary["modules"] + sum(1 for b in bindings if b.group.adapter is None),
        "modules": len(bindings),  # modules that apply to the bound model
        "components": dict(sorted(comps.items())),
        "ranks": dict(sorted(ranks.items(), key=lambda kv: int(kv[0]))),
        "alphas": dict(sorted(alphas.items(), key=lambda kv: float(kv[0]))),
        "blocks": dict(sorted(blocks.items(), key=lambda kv: _block_order(kv[0]))),
        "keys": total_keys,
        "bound_to": label if (base is not None or detected.supported) else None,
        "bound_to_path": base.path if base is not None else None,
        "applied_keys": applied_keys,
        "unmatched": [u.as_dict() for u in unmatched],
        "not_applied": group_unmatched(lora, unmatched, label),
        "unclaimed_groups": unclaimed,
        "bad_groups": summary["bad_groups"],
        "trigger_words": trigger_words(lora.metadata),
        "training": training_info(lora.metadata),
        "metadata": dict(lora.metadata),
    }
    if base is not None:
        info["wrong_base"] = _wrong_base(detected, base, len(bindings), len(lora.groups))
    if addnet and lora.file_format == "safetensors":
        full = addnet_hash(path)
        info["hashes"] = {"addnet": full[:12], "addnet_full": full}
    return info


def _wrong_base(detected, base: BaseModelRef, applied: int, groups: int) -> Optional[str]:
    """Why the file is not for ``base`` (None when it is)."""
    if groups and applied == 0:
        made = "made for another model" if detected.name == "unknown" else f"made for {detected.label}"
        return f"{made}: none of its {groups} modules applies to {base.label}"
    fam = base.family
    if detected.supported and fam not in ("custom", None) and detected.name != fam and applied < groups:
        return f"made for {detected.label}, not {base.label}: {groups - applied} of {groups} modules do not apply"
    return None


def render_any(info: dict, *, keys: bool = False, examples: int = 3) -> str:
    """The text report; every value that comes from the file is escaped (see textsafe)."""
    from .inspect import _counts

    t = printable
    n_typed = info.get("typed_modules", info["modules"])
    bound = info.get("bound_to")
    applied = (f"; {info['modules']} modules ({info.get('applied_keys', 0)} keys) apply to {t(bound)}"
               if bound else "; no known base model to bind to")
    lines = [
        t(info["path"]),
        f"  format:       {t(info['format'])} ({t(info['container'])})",
        f"  base model:   {t(info['base_model_label'])}{' (v-prediction)' if info['v_prediction'] else ''}"
        f"  [{t(info['base_model_evidence'])}]",
    ]
    if info.get("bound_to_path"):
        lines.append(f"  bound to:     {t(info['bound_to_path'])}")
    lines += [
        f"  types:        {_counts(info['types']) or 'none'}  ({n_typed} modules, {info['keys']} keys{applied})",
        f"  components:   {_counts(info['components']) or 'none'}",
        f"  ranks:        {_counts(info['ranks']) or '-'}",
        f"  alphas:       {_counts(info['alphas']) or '-'}",
        f"  blocks:       {_counts(info['blocks']) or '-'}",
        f"  triggers:     {', '.join(t(w) for w in info['trigger_words']) or '-'}",
    ]
    if info.get("hashes"):
        lines.append(f"  addnet hash:  {t(info['hashes']['addnet'])}")
    for key, value in info["training"].items():
        lines.append(f"  {t(key.replace('_', ' ')) + ':':<13} {t(value)}")
    if info.get("wrong_base"):
        lines.append(f"  WRONG BASE:   {t(info['wrong_base'])}")
    for u in info.get("unclaimed_groups", []):
        lines.append(f"  UNCLAIMED:    {t(u['module'])} ({len(u['keys'])} keys): no registered type claims "
                     f"its tensors; by shape: {t(u['tried'])}")
    if info["unmatched"]:
        lines.append(f"  NOT APPLIED:  {len(info['unmatched'])} keys")
        if keys:
            for u in info["unmatched"]:
                lines.append(f"    {t(u['key'])}: {t(u['reason'])}")
        else:
            for g in info.get("not_applied") or []:
                mods = "module" if g["modules"] == 1 else "modules"
                lines.append(f"    {g['modules']} {mods} ({g['keys']} keys): {t(g['reason'])}")
                for ex in g["examples"][:examples]:
                    detail = "" if ex["detail"] == g["reason"] else f"  [{t(ex['detail'])}]"
                    lines.append(f"      {t(ex['module'])}{detail}")
                if g["modules"] > examples:
                    lines.append(f"      ... and {g['modules'] - examples} more (--keys lists every key)")
    else:
        lines.append("  not applied:  none (every key maps to a module)")
    return "\n".join(lines)
