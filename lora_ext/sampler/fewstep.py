"""Few-step LoRAs (LCM, Lightning, Hyper-SD, TCD, DMD, Turbo) and the settings they are made for.

A LoRA is recognised from its metadata and file name by :func:`lora_ext.metadata.few_step_hint`
(through ``training_info``). Its usual sampler, schedule, steps and CFG are used for whatever
the user did not set; a step count in the name ("8steps", "4-step") is honoured.

============  ===============  =============  =====  =====
kind          sampler          schedule       steps  CFG
============  ===============  =============  =====  =====
LCM           lcm              sgm_uniform    6      1.5
Lightning     euler            sgm_uniform    4      1
Hyper-SD      euler (DDIM)     trailing       8      1
TCD           lcm (gamma = 1)  sgm_uniform    4      1
DMD           lcm              sgm_uniform    4      1
Turbo         euler_a          sgm_uniform    4      1
============  ===============  =============  =====  =====

Hyper-SD's "1step" LoRAs use lcm; its "CFG" LoRAs keep CFG 5.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = ["FewStep", "detect_few_step", "settings_for"]


@dataclass(frozen=True)
class FewStep:
    kind: str
    sampler: str
    schedule: str
    steps: int
    cfg: float
    source: str  # the LoRA it came from


_TABLE = {
    "LCM": ("lcm", "sgm_uniform", 6, 1.5),
    "Lightning": ("euler", "sgm_uniform", 4, 1.0),
    "Hyper-SD": ("euler", "trailing", 8, 1.0),
    "TCD": ("lcm", "sgm_uniform", 4, 1.0),
    "DMD": ("lcm", "sgm_uniform", 4, 1.0),
    "Turbo": ("euler_a", "sgm_uniform", 4, 1.0),
}
_STEPS_RE = re.compile(r"(?<![0-9])(\d{1,2})[-_ ]?steps?(?![a-z])", re.IGNORECASE)


def settings_for(kind: str, name: str = "", source: str = "") -> FewStep:
    sampler, schedule, steps, cfg = _TABLE[kind]
    m = _STEPS_RE.search(name or "")
    if m:
        steps = max(1, int(m.group(1)))
    if kind == "Hyper-SD":
        if steps == 1:
            sampler = "lcm"
        if re.search(r"(?<![a-z])cfg(?![a-z])", (name or "").lower()):
            cfg = 5.0
    return FewStep(kind, sampler, schedule, steps, cfg, source or name)


def detect_few_step(paths: Iterable[str]) -> Optional[FewStep]:
    """The first of ``paths`` (LoRA files) that is a few-step LoRA, with its settings."""
    from ..io import open_tensors
    from ..metadata import training_info

    for path in paths:
        if path is None:
            continue
        name = os.path.splitext(os.path.basename(path))[0]
        metadata = {}
        if path.lower().endswith(".safetensors"):
            try:
                with open_tensors(path) as tf:
                    metadata = dict(tf.metadata)
            except Exception:  # a bad file is reported when it is applied
                metadata = {}
        kind = training_info(metadata, name=name).get("few_step")
        if kind in _TABLE:
            title = metadata.get("ss_output_name") or metadata.get("modelspec.title") or ""
            return settings_for(kind, f"{name} {title}", source=name)
    return None
