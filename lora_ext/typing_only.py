"""What a LoRA file holds, from its keys and shapes alone (no base model needed).

``inspect`` used to count types, ranks and alphas only over the groups that bound to a known
base; a LoHa for a custom UNet then showed ``types: none``. Here every key group is typed by
the adapter the registered types built for it in ``load_lora`` (names and shapes only), groups
no type claims are explained from their tensors where shapes alone allow it (what the
structural auto-detector would try), and the not-applied keys of a binding are summarised per
reason and module instead of one line per key.
"""
from __future__ import annotations

import functools
import re
from collections import Counter

#: ``adapter.COMMON_NAMES`` (names any type may carry), spelled here: ``adapter`` imports torch
COMMON_NAMES = frozenset({"alpha", "dora_scale"})

#: key prefixes -> component, tried in order (kohya, diffusers/PEFT, LyCORIS, ldm, DiT)
_COMPONENT_PREFIXES = (
    ("te1", ("lora_te1_", "text_encoder.", "base_model.model.text_encoder.", "lora_te_", "te1.", "clip_l.",
             "cond_stage_model", "conditioner.embedders.0.", "text_encoders.clip_l.")),
    ("te2", ("lora_te2_", "text_encoder_2.", "conditioner.embedders.1.", "te2.", "clip_g.", "text_encoders.clip_g.")),
    ("te3", ("lora_te3_", "text_encoder_3.", "t5.", "text_encoders.t5xxl.")),
)


_TEXT_BODY = re.compile(r"text_model|(^|[._])encoder[._]layers?[._]\d+[._](self_attn|mlp)")


@functools.lru_cache(maxsize=65536)
def component_of_prefix(prefix: str) -> str:
    """te1 / te2 / te3 for text-encoder spellings, else unet (the denoiser: UNet or DiT)."""
    for comp, starts in _COMPONENT_PREFIXES:
        if prefix.startswith(starts):
            return comp
    if _TEXT_BODY.search(prefix):  # a CLIP text encoder's modules under a neutral prefix (PEFT)
        return "te1"
    return "unet"


def _num(x) -> str:
    return f"{float(x):g}"


def _shape_of(adapter):
    try:
        ws = adapter.weight_shape()
    except Exception:  # a type whose shape needs the target (IA3, OFT): unknown here
        return None
    return None if ws is None else tuple(int(d) for d in ws)


def explain_unclaimed(group) -> str:
    """What the tensors of a group no registered type claims could be, from shapes alone
    (the structural auto-detector proves it only against a target weight's shape)."""
    main = {k: tuple(v.shape) for k, v in group.tensors.items() if k not in COMMON_NAMES}
    shown = ", ".join(f"{k} {list(s)}" for k, s in sorted(main.items()))
    if len(main) == 1:
        (s,) = main.values()
        if sum(1 for d in s if d != 1) <= 1:
            return f"one vector ({shown}): an elementwise scale (IA3-like) if a module's output or input has {max(s or (0,))} channels"
        return f"one tensor ({shown}): a full weight diff if a module has exactly this shape"
    if len(main) == 2:
        (na, a), (nb, b) = sorted(main.items())
        if len(a) >= 2 and len(b) >= 2:
            orders = [(x, y) for x, y in ((a, b), (b, a)) if x[1] == y[0] and all(d == 1 for d in x[2:])]
            if len(orders) == 1:
                up, down = orders[0]
                r = up[1]
                return (f"a low-rank pair by shape ({shown}): rank {r}, makes {(up[0],) + tuple(down[1:])}; "
                        "used where a module of that shape exists")
            if len(orders) == 2:
                return f"two tensors ({shown}) that multiply in both orders: up and down cannot be told apart by shape"
            return f"two tensors ({shown}): no low-rank product; a Kronecker pair if a module has their product's shape"
    return f"{len(main)} tensors ({shown}): no structural rule covers this many"


def file_summary(lora) -> dict:
    """Types, ranks, alphas, components and weight shapes of every group, from the file alone."""
    types, ranks, alphas, comps, shapes = Counter(), Counter(), Counter(), Counter(), Counter()
    unclaimed, problems = [], []
    typed = 0
    for prefix, group in lora.groups.items():
        a = group.adapter
        if a is None:
            entry = {"module": prefix, "keys": sorted(group.keys.values())}
            if group.problem:
                entry["problem"] = group.problem
                problems.append(entry)
            else:
                entry["tried"] = explain_unclaimed(group)
                unclaimed.append(entry)
            continue
        typed += 1
        types[a.type_name] += 1
        comps[component_of_prefix(prefix)] += 1
        try:
            rank = a.rank
            if rank is not None:
                ranks[str(rank)] += 1
            alpha = a.alpha
            if alpha is not None:
                alphas[_num(alpha)] += 1
        except Exception:
            pass
        s = _shape_of(a)
        if s is not None:
            shapes[s] += 1
    return {
        "types": dict(sorted(types.items())),
        "modules": typed,
        "ranks": dict(sorted(ranks.items(), key=lambda kv: int(kv[0]))),
        "alphas": dict(sorted(alphas.items(), key=lambda kv: float(kv[0]))),
        "components": dict(sorted(comps.items())),
        "shapes": shapes,
        "unclaimed": unclaimed,
        "bad_groups": problems,
    }


def closest_family(lora, scores: dict, models=None):
    """(layout name, groups whose module name it has): the known layout with most of the file's
    module names, or (None, 0). ``models``: where layouts come from (``detect.LiveModels``)."""
    from .detect import LIVE

    m = models or LIVE
    best, best_hits = None, 0
    for arch in scores:
        km = m.keymap(arch)
        hits = sum(1 for prefix in lora.groups if km.candidates(prefix))
        if hits > best_hits:
            best, best_hits = arch, hits
    return best, best_hits


def unknown_evidence(lora, summary: dict, scores: dict, models=None) -> str:
    """Why no known base fits: module count, distinct weight shapes, the closest known layout
    (most module names it has) and why it does not fit."""
    from .detect import LIVE

    m = models or LIVE
    _label, arch_keymap = m.label, m.keymap

    n = len(lora.groups)
    shapes = summary["shapes"]
    common = ", ".join(str(s) for s, _ in shapes.most_common(3))
    parts = [f"{summary['modules']} typed modules of {n}",
             f"{len(shapes)} distinct weight shapes" + (f" (most common {common})" if common else "")]
    best, best_hits = closest_family(lora, scores, models)
    if best is None:
        parts.append("closest known family: none (no module name of SD1.x, SD2.x, SDXL or a DiT family matches)")
        return "; ".join(parts)
    km, example = arch_keymap(best), ""
    for prefix, group in lora.groups.items():
        cands = km.candidates(prefix)
        if cands and group.adapter is not None:
            have = _shape_of(group.adapter)
            want = " or ".join(str(tuple(c.weight_shape)) for c in cands)
            if have is not None:
                example = f"e.g. {prefix} makes {have}, {_label(best)} has {want}"
                break
    why = f"{best_hits} of {n} module names are {_label(best)} names, {scores.get(best, 0)} fit by shape"
    parts.append(f"closest known family {_label(best)}: {why}" + (f" ({example})" if example else ""))
    return "; ".join(parts)


_SHAPE_MISMATCH = re.compile(r"^shape mismatch\b")


def headline(reason: str, label: str) -> str:
    """The reason class of a not-applied key (per-module details folded away)."""
    if _SHAPE_MISMATCH.match(reason):
        return f"no module of this shape in {label}"
    if reason.startswith("unknown adapter type"):
        return "unknown adapter type (no registered type or structural rule explains the tensors)"
    if reason.startswith("bad ") and " tensors: " in reason:
        return reason.split(":", 1)[0]
    if reason.startswith("ambiguous: "):
        return "ambiguous: fits several modules"
    return reason


def group_unmatched(lora, unmatched, label: str) -> list:
    """[{reason, modules, keys, examples: [{module, detail}]}], largest first; every key of
    ``unmatched`` counted once (linear in the number of keys)."""
    owner = {k: p for p, g in lora.groups.items() for k in g.keys.values()}
    out: dict = {}
    for u in unmatched:
        head = headline(u.reason, label)
        e = out.setdefault(head, {"reason": head, "modules": 0, "keys": 0, "examples": [], "_seen": set()})
        e["keys"] += 1
        mod = owner.get(u.key, u.key)
        if mod not in e["_seen"]:
            e["_seen"].add(mod)
            e["modules"] += 1
            if len(e["examples"]) < 3:
                e["examples"].append({"module": mod, "detail": u.reason})
    res = sorted(out.values(), key=lambda e: (-e["keys"], e["reason"]))
    for e in res:
        del e["_seen"]
    return res
