"""Which base model a LoRA was made for, and which naming family it uses.

The decision rests on what the tensors fit, not on how keys are spelled: every group is
bound against the full-size SD1.x, SD2.x and SDXL layouts and the layout where the most
groups fit by shape wins (so an SD1.5 LoRA written with SGM/ldm names is not mistaken for
SDXL). Other families (SD3, Flux, Stable Cascade) are recognised from their key patterns and
named even though they cannot be applied yet. Metadata only breaks ties.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .layouts import SD_ARCHS, arch_keymap

LABELS = {
    "sd1": "SD1.x",
    "sd2": "SD2.x",
    "sdxl": "SDXL",
    "sd3": "SD3",
    "flux": "Flux.1",
    "stable_cascade": "Stable Cascade",
    "unknown": "unknown",
}

# Recognised-but-unsupported families, most specific first (Flux's diffusers names share
# "add_q_proj" with SD3, so its single blocks are checked first).
_OTHER_FAMILIES = (
    ("flux", re.compile(r"double_blocks|single_blocks|single_transformer_blocks")),
    ("sd3", re.compile(r"joint_blocks|context_block|lora_te3_|add_q_proj|context_embedder")),
    ("stable_cascade", re.compile(r"lora_prior_unet_|lora_prior_te_")),
)

_METADATA_HINTS = (
    ("sdxl", re.compile(r"sdxl|stable-diffusion-xl", re.I)),
    ("sd2", re.compile(r"sd_v2|stable-diffusion-v2|sd2", re.I)),
    ("sd3", re.compile(r"sd3|stable-diffusion-v3|stable-diffusion-3", re.I)),
    ("flux", re.compile(r"flux", re.I)),
    ("sd1", re.compile(r"sd_v1|stable-diffusion-v1|sd1", re.I)),
)


class LiveModels:
    """Where detection gets the full-size layouts and the DiT variants: the live tables
    (``layouts``, ``dit``; they import ``arch`` and so torch). ``fastpath.FastModels`` answers
    the same questions from precomputed data without torch."""

    def keymap(self, name):
        return arch_keymap(name)

    def fitting(self, lora, keymap) -> int:
        return _fitting(lora, keymap)

    def variants(self) -> dict:
        """DiT variant -> its family."""
        from . import dit

        return {v: fam for v, (fam, _, _) in dit.VARIANTS.items()}

    def families_for(self, prefixes) -> list:
        from . import dit

        return dit.families_for(prefixes)

    def family_label(self, family: str) -> str:
        from . import dit

        return dit.FAMILIES[family].label

    def label(self, name: str) -> str:
        if name in LABELS:
            return LABELS[name]
        from .dit import family_label

        return family_label(name)


LIVE = LiveModels()


@dataclass
class BaseModel:
    # "sd1" | "sd2" | "sdxl" | a DiT variant ("flux-dev", "sd3.5-large", ... see lora_ext.dit)
    # | a family recognised by name only ("flux", "sd3", "stable_cascade") | "unknown"
    name: str
    evidence: str
    scores: dict = field(default_factory=dict)  # arch -> groups that fit by shape
    v_prediction: bool = False

    family_label: str = ""  # set when several variants of one DiT family fit alike
    models: object = field(default=None, repr=False, compare=False)  # LiveModels-like; None: LIVE

    @property
    def label(self) -> str:
        return self.family_label or (self.models or LIVE).label(self.name)

    @property
    def supported(self) -> bool:
        if self.name in SD_ARCHS:
            return True
        return self.name in (self.models or LIVE).variants()


def metadata_hint(metadata: dict):
    """The base model the metadata claims, or None."""
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2"
    for key in ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name"):
        value = str(metadata.get(key, ""))
        for name, pattern in _METADATA_HINTS:
            if value and pattern.search(value):
                return name
    return None


def is_v_prediction(metadata: dict) -> bool:
    return (
        str(metadata.get("ss_v_parameterization", "")).lower() == "true"
        or str(metadata.get("modelspec.prediction_type", "")).lower() in ("v", "v_prediction")
        or "768-v" in str(metadata.get("modelspec.architecture", ""))
    )


def _fitting(lora, keymap) -> int:
    """How many key groups bind to ``keymap``'s model (``len(lora.resolve(keymap).bindings)``
    without building the report of every key that does not: linear, with a small constant)."""
    from .network import bind_group

    return sum(1 for group in lora.groups.values() if bind_group(group, keymap)[0] is not None)


def detect_base_model(lora, models=None) -> BaseModel:
    """Best guess of the base model of a loaded ``Lora``, with the evidence for it.

    Every key group is bound against the full-size layouts (SD1.x, SD2.x, SDXL; and, when SD
    does not explain every group, each DiT variant: Flux.1 dev / schnell / Fill / Canny-Depth,
    Chroma, SD3 Medium, SD3.5 Medium / Large, Qwen-Image), and the layout where the most
    groups fit by name *and* shape wins. DiT variants that fit equally (a Flux LoRA without
    guidance or input keys fits dev and schnell alike) are named as their family.
    ``models``: where the layouts come from (default: the live tables, :data:`LIVE`).
    """
    m = models or LIVE
    _lbl = m.label
    prefixes = list(lora.groups)
    hint = metadata_hint(lora.metadata)
    vpred = is_v_prediction(lora.metadata)
    scores = {arch: m.fitting(lora, m.keymap(arch)) for arch in SD_ARCHS}
    if not prefixes or max(scores.values(), default=0) < len(prefixes):
        # bind against the variants of the families whose module names the file uses (cheap to
        # find; building every variant's key map is not)
        families = set(m.families_for(prefixes))
        for variant, family in m.variants().items():
            if family in families:
                scores[variant] = m.fitting(lora, m.keymap(variant))
    best = max(scores.values()) if scores else 0
    if best == 0:
        for name, pattern in _OTHER_FAMILIES:
            hits = sum(1 for p in prefixes if pattern.search(p))
            if hits and hits * 4 >= len(prefixes):
                return BaseModel(name, f"{hits} of {len(prefixes)} modules use {_lbl(name)} names, "
                                       "but none fits a known model of that family by shape", scores, vpred,
                                 models=models)
        if hint:
            return BaseModel(hint, f"no module fits a known base model; metadata says {_lbl(hint)}", scores, vpred,
                             models=models)
        return BaseModel("unknown", "no module fits SD1.x, SD2.x, SDXL, Flux.1, Chroma, SD3 or Qwen-Image by "
                                    "name and shape", scores, vpred, models=models)
    top = [a for a in scores if scores[a] == best]
    of = f"{best} of {len(prefixes)} {_modules(len(prefixes))}"
    if len(top) == 1:
        name = top[0]
        why = f"{of} fit {_lbl(name)} by name and shape"
    elif hint and any(a == hint or a.startswith((hint + "-", hint + ".")) for a in top):
        name = next(a for a in top if a == hint or a.startswith((hint + "-", hint + ".")))
        why = f"{of} fit {' and '.join(_lbl(a) for a in top)} alike; metadata says {_lbl(hint)}"
    else:
        name = top[0]
        why = f"{of} {'fits' if best == 1 else 'fit'} {' and '.join(_lbl(a) for a in top)} alike; chose {_lbl(name)}"
    if hint and hint != name and len(top) == 1 and hint in SD_ARCHS:
        why += f" (metadata claims {_lbl(hint)}; shapes win)"
    base = BaseModel(name, why, scores, vpred, models=models)
    if len(top) > 1 and name not in SD_ARCHS:
        variants = m.variants()
        if all(a in variants for a in top):  # variants fit alike: name their families
            families = list(dict.fromkeys(variants[a] for a in top))
            base.family_label = " or ".join(m.family_label(f) for f in families)
    return base


def _label(name: str) -> str:
    return LIVE.label(name)


def _modules(n: int) -> str:
    return "module" if n == 1 else "modules"


def naming_family(prefixes) -> str:
    """kohya / lycoris / diffusers / peft / ldm, or "mixed: a+b"."""
    found = []
    for p in prefixes:
        if p.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")):
            fam = "kohya (ldm/sgm names)"
        elif p.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_prior_", "oft_unet_", "oft_te")):
            fam = "kohya"
        elif p.startswith("lycoris_"):
            fam = "lycoris"
        elif p.startswith("base_model.model."):
            fam = "peft"
        elif p.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")):
            fam = "diffusers"
        elif p.startswith(("model.diffusion_model.", "diffusion_model", "cond_stage_model", "conditioner.")):
            fam = "ldm"
        else:
            fam = "other"
        if fam not in found:
            found.append(fam)
    if not found:
        return "empty"
    return found[0] if len(found) == 1 else "mixed: " + " + ".join(found)
