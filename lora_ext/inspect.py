"""``lora-ext inspect``: what a LoRA file is, and what of it would not apply."""
from __future__ import annotations

from collections import Counter

from .detect import LABELS, detect_base_model, naming_family
from .io import addnet_hash
from .layouts import arch_keymap
from .metadata import training_info, trigger_words
from .network import Unmatched, load_lora
from .textsafe import printable


def inspect_lora(path) -> dict:
    """One JSON-ready dict describing the file (see README, "inspect")."""
    lora = load_lora(path)
    base = detect_base_model(lora)
    if base.supported:
        res = lora.resolve(arch_keymap(base.name))
        bindings, unmatched = res.bindings, res.unmatched
    else:
        why = (
            f"{base.label} names, but no module of a known {base.label} model has this name and shape"
            if base.name != "unknown"
            else "no module of SD1.x, SD2.x, SDXL, Flux.1, Chroma, SD3 or Qwen-Image has this name and shape"
        )
        bindings = []
        unmatched = [Unmatched(k, why) for g in lora.groups.values() for k in sorted(g.keys.values())]
    types = Counter(b.adapter.type_name for b in bindings)
    ranks = Counter(str(b.adapter.rank) for b in bindings if b.adapter.rank is not None)
    alphas = Counter(_num(b.adapter.alpha) for b in bindings if b.adapter.alpha is not None)
    blocks = Counter(t.block if t.component == "unet" else t.component.upper() for b in bindings for t in b.targets)
    components = Counter(t.component for b in bindings for t in b.targets)
    info = {
        "path": str(path),
        "format": naming_family(lora.groups),
        "container": lora.file_format,
        "base_model": base.name,
        "base_model_label": base.label,
        "base_model_evidence": base.evidence,
        "v_prediction": base.v_prediction,
        "types": dict(sorted(types.items())),
        "modules": len(bindings),
        "components": dict(sorted(components.items())),
        "ranks": dict(sorted(ranks.items(), key=lambda kv: int(kv[0]))),
        "alphas": dict(sorted(alphas.items())),
        "blocks": dict(sorted(blocks.items(), key=lambda kv: _block_order(kv[0]))),
        "keys": sum(len(g.keys) for g in lora.groups.values()),
        "unmatched": [u.as_dict() for u in unmatched],
        "trigger_words": trigger_words(lora.metadata),
        "training": training_info(lora.metadata),
        "metadata": dict(lora.metadata),
    }
    if lora.file_format == "safetensors":
        full = addnet_hash(path)
        info["hashes"] = {"addnet": full[:12], "addnet_full": full}
    return info


def _num(x: float) -> str:
    return f"{x:g}"


def _block_order(block: str):
    order = {"TE1": 0, "TE2": 1, "BASE": 2}
    if block in order:
        return (order[block], 0)
    kind = {"IN": 3, "M": 4, "OUT": 5}.get(block.rstrip("0123456789"), 6)
    digits = "".join(ch for ch in block if ch.isdigit())
    return (kind, int(digits or 0))


def render_text(info: dict) -> str:
    """The text report; every value that comes from the file is escaped (see textsafe)."""
    t = printable
    lines = [
        t(info["path"]),
        f"  format:       {t(info['format'])} ({t(info['container'])})",
        f"  base model:   {t(info['base_model_label'])}{' (v-prediction)' if info['v_prediction'] else ''}"
        f"  [{t(info['base_model_evidence'])}]",
        f"  types:        {_counts(info['types']) or 'none'}  ({info['modules']} modules, {info['keys']} keys)",
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
    if info["unmatched"]:
        lines.append(f"  NOT APPLIED:  {len(info['unmatched'])} keys")
        for u in info["unmatched"]:
            lines.append(f"    {t(u['key'])}: {t(u['reason'])}")
    else:
        lines.append("  not applied:  none (every key maps to a module)")
    return "\n".join(lines)


def _counts(d: dict) -> str:
    return ", ".join(f"{printable(k)}: {printable(v)}" for k, v in d.items())


__all__ = ["inspect_lora", "render_text", "LABELS"]
