"""Two-expert models (Wan 2.2 A14B: a high-noise ``transformer`` and a low-noise
``transformer_2``) and the LoRA pairs trained for them, as one user-facing unit.

Trainers and hubs publish such a LoRA as two files whose names differ only by the expert:
``Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16`` / ``..._LOW_fp16``, ``mylora_high_noise`` /
``mylora_low_noise``, ``high_noise_model`` / ``low_noise_model`` in one folder. The pair's name is
the file name without that token (``Wan2.2-Lightning_T2V-A14B-4steps-lora_fp16``, ``mylora``,
``noise_model`` is avoided: a folder-named pair is called by its folder). A tag naming the pair
(``<lora:mylora:0.8>``) gives one strength and schedule to both experts; ``high=`` / ``low=``
(a number or keyframes) give an expert its own. A host that runs one expert says which
(:attr:`lora_ext.hostmodel.HostModel.expert`); :func:`for_expert` is what that expert applies.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

EXPERTS = ("high", "low")
# the expert token: HIGH / low_noise / high-noise-model ..., between separators
_TOKEN = re.compile(r"(?i)(?:^|(?<=[_\-. ]))(high|low)(?:[_\-]?noise)?(?:[_\-]?model)?(?=$|[_\-. ])")


def split_expert(stem: str) -> Optional[tuple]:
    """``(pair name, "high" | "low")`` for a file stem that names one expert of a pair, else None.

    The last expert token wins (``low_light_high_noise`` is the high expert of ``low_light``)."""
    found = list(_TOKEN.finditer(stem))
    if not found:
        return None
    m = found[-1]
    rest = (stem[: m.start()].rstrip("_-. ") + ("_" if m.start() and m.end() < len(stem) else "")
            + stem[m.end():].lstrip("_-. "))
    return rest.strip("_-. "), m.group(1).lower()


def pair_spec(spec, paths: dict):
    """``spec`` for a pair: its path is the high expert's (what a host without experts would
    load), both paths are kept for :func:`for_expert`."""
    spec.path = paths["high"]
    spec.extra = dict(spec.extra, experts=dict(paths))
    return spec


def is_pair(spec) -> bool:
    return isinstance(spec.extra.get("experts"), dict)


def for_expert(spec, expert: Optional[str]):
    """The spec one expert applies: the pair's file for that expert, scaled by its own
    ``high=`` / ``low=`` strength when given. A spec that is no pair is returned as it is."""
    paths = spec.extra.get("experts")
    if not isinstance(paths, dict) or expert is None:
        return spec
    if expert not in EXPERTS:
        raise ValueError(f"unknown expert {expert!r} (high or low)")
    own = spec.extra.get(f"{expert}_weight")
    changes = dict(path=paths[expert], extra={k: v for k, v in spec.extra.items() if k != "experts"})
    if own is not None:
        changes["unet"] = own
    return dataclasses.replace(spec, **changes)
