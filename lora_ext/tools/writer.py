"""Writing LoRA files every host loads: kohya naming by default, PEFT/diffusers on request.

A tool produces one :class:`Entry` per module: the target module and its tensors under kohya
names (``lora_up.weight``, ``lora_down.weight``, ``alpha``, optional ``lora_mid.weight``,
``dora_scale``, ``lora_up.bias``; other adapter types carried unchanged keep their own names).

kohya (A1111, SD.Next, ComfyUI, InvokeAI, diffusers all read it)
    ``lora_unet_<path>``, ``lora_te_<path>`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL),
    with the text encoder's ``text_model_`` level, exactly as kohya's sd-scripts write them.
    SD1/SD2 UNet modules use diffusers paths (``lora_unet_down_blocks_0_attentions_0_proj_in``);
    SDXL's use the ldm/SGM paths sd-scripts uses for SDXL (``lora_unet_input_blocks_4_1_...``).
    Every module has an ``alpha``: the delta is ``alpha / rank * up @ down``. DoRA magnitudes
    are ``dora_scale`` of shape (out, 1) / (out, 1, 1, 1), the per-output convention of kohya,
    LyCORIS (``wd_on_out``) and ComfyUI.
PEFT / diffusers (``pipe.load_lora_weights``, ``load_lora_adapter``)
    ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.text_model.<path>``,
    ``text_encoder_2.``), DoRA as ``lora_magnitude_vector`` ((out,) for Linear, (1, out, 1, 1)
    for conv, PEFT's own shapes; ``.weight``-suffixed on text encoders, see ``peft_state_dict``); ranks and alphas in the ``lora_adapter_metadata`` JSON the way
    diffusers writes it (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``,
    ``unet.alpha_pattern``, ...), so scales are exact per module.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch

from ..errors import LoraExtError, LoraFileError
from ..io import check_output_target, save_safetensors
from ..keys import Target

Tensor = torch.Tensor

FORMATS = ("kohya", "peft")
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "half": torch.float16}
PEFT_COMPONENT = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2", "te3": "text_encoder_3"}


def peft_components(family: str) -> dict:
    """diffusers' component names for ``family``: a DiT pipeline's denoiser is its
    ``transformer``; Flux's (and HunyuanVideo's) T5 is ``text_encoder_2``, SD3's ``text_encoder_3``."""
    from .. import dit

    fam = dit.VARIANTS[family][0] if family in dit.VARIANTS else family
    if fam not in dit.FAMILIES:
        return dict(PEFT_COMPONENT)
    out = dict(PEFT_COMPONENT, unet="transformer")
    if fam != "sd3":
        out["te3"] = "text_encoder_2"
    return out
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                "sdxl": "stable-diffusion-xl-v1-base/lora"}
# The metadata key where a converted file remembers what only the other format can hold.
CONVERT_META = "lora_ext.convert"
LORA_NAMES = frozenset({"lora_up.weight", "lora_down.weight", "alpha", "lora_mid.weight", "dora_scale", "lora_up.bias"})


class FormatError(LoraExtError, ValueError):
    """Something the requested output format cannot hold."""


def parse_dtype(name) -> Optional[torch.dtype]:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r}; expected fp16, bf16 or fp32") from None


@dataclass
class Entry:
    """One module of an output LoRA: tensors under kohya names."""

    target: Optional[Target]  # None only for carried groups spanning several modules
    tensors: dict  # kohya tensor name -> Tensor
    weight_shape: tuple = ()  # the module's weight shape
    prefix: Optional[str] = None  # kohya prefix for a carried multi-module group (OpenCLIP in_proj)
    note: str = ""

    @property
    def is_lora(self) -> bool:
        return {"lora_up.weight", "lora_down.weight"} <= set(self.tensors) and set(self.tensors) <= LORA_NAMES

    @property
    def rank(self) -> Optional[int]:
        d = self.tensors.get("lora_down.weight")
        return None if d is None else int(d.shape[0])


def lora_entry(target: Target, weight_shape, up: Tensor, down: Tensor, *, alpha: Optional[float] = None,
               dtype: torch.dtype = torch.float32, dora_scale: Optional[Tensor] = None, note: str = "") -> Entry:
    """An Entry from fp32 2-D factors (``delta = alpha/rank * up @ down``; alpha defaults to rank).

    Conv targets get conv-shaped factors: ``down`` (r, in, kh, kw), ``up`` (out, r, 1, 1).
    """
    shape = tuple(int(x) for x in weight_shape)
    r = int(down.shape[0])
    if len(shape) > 2:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
    tensors = {
        "lora_up.weight": up.to(dtype).contiguous(),
        "lora_down.weight": down.to(dtype).contiguous(),
        # alpha in fp32 whatever the factors' dtype: its value sets the scale exactly
        "alpha": torch.tensor(float(r if alpha is None else alpha), dtype=torch.float32),
    }
    if dora_scale is not None:
        tensors["dora_scale"] = dora_scale.to(dtype).contiguous()
    return Entry(target, tensors, shape, note=note)


# ---------------------------------------------------------------------------------------------
# names
def kohya_prefix(target: Target, family: str, ldm_path: Optional[str] = None, has_te2: bool = False,
                 unet_names: Optional[str] = None) -> str:
    """kohya prefix of a module. ``unet_names``: "ldm" | "diffusers" | None (sd-scripts' choice:
    ldm paths for SDXL, diffusers paths otherwise)."""
    if target.component == "unet":
        style = unet_names or ("ldm" if family == "sdxl" else "diffusers")
        if style == "ldm" and ldm_path:
            return "lora_unet_" + ldm_path.replace(".", "_")
        return "lora_unet_" + target.module.replace(".", "_")
    te = {"te1": "lora_te1_" if (family == "sdxl" or has_te2) else "lora_te_", "te2": "lora_te2_"}[target.component]
    return te + "text_model_" + target.module.replace(".", "_")


def peft_prefix(target: Target, te_text_model: bool = True, components: Optional[Mapping] = None) -> str:
    comp = (components or PEFT_COMPONENT)[target.component]
    if target.component == "te3":  # T5: no text_model level
        return f"{comp}.{target.module}"
    if target.component == "unet":
        return f"{comp}.{target.module}"
    return f"{comp}.{'text_model.' if te_text_model else ''}{target.module}"


# ---------------------------------------------------------------------------------------------
def _scalar(t) -> float:
    return float(t.reshape(()).double()) if isinstance(t, Tensor) else float(t)


def kohya_state_dict(entries: Iterable[Entry], family: str, layout: Mapping, unet_names: Optional[str] = None) -> dict:
    has_te2 = "te2" in layout
    out = {}
    from .. import dit

    if family in dit.VARIANTS or family in dit.FAMILIES:
        entries = list(entries)
        return _dit_kohya_state_dict(entries, layout)
    for e in entries:
        if e.prefix is not None:
            prefix = e.prefix
        else:
            info = layout.get(e.target.component, {}).get(e.target.module)
            prefix = kohya_prefix(e.target, family, getattr(info, "ldm_path", None), has_te2, unet_names)
        for name, t in e.tensors.items():
            key = f"{prefix}.{name}"
            if key in out:
                raise FormatError(f"two modules write {key}")
            out[key] = t.contiguous()
    return out


def _peft_magnitude(scale: Tensor, weight_shape) -> Tensor:
    """kohya per-output ``dora_scale`` -> PEFT ``lora_magnitude_vector`` (same values)."""
    out = int(weight_shape[0])
    s = tuple(scale.shape)
    per_output = scale.numel() == out and (len(s) == 1 or s[0] == out)
    if not per_output:
        raise FormatError(
            f"DoRA scale of shape {s} is per input column (LyCORIS wd_on_out=False); PEFT/diffusers DoRA is "
            "per output row only, so this module cannot be written as PEFT")
    if len(weight_shape) > 2:
        return scale.reshape(1, out, *([1] * (len(weight_shape) - 2)))
    return scale.reshape(out)


def kohya_dora_scale(scale: Tensor, weight_shape) -> Tensor:
    """Any per-output magnitude (PEFT (out,), (1, out, 1, 1)) -> kohya's (out, 1[, 1, 1])."""
    out = int(weight_shape[0])
    s = tuple(scale.shape)
    if scale.numel() == out and (len(s) == 1 or s[0] == out):
        return scale.reshape(out, *([1] * (len(weight_shape) - 1)))
    return scale  # per-input (1, in, ...): kohya/LyCORIS spelling already


def peft_state_dict(entries: Iterable[Entry], te_text_model: bool = True, te_magnitude_weight: bool = True,
                    components: Optional[Mapping] = None) -> tuple[dict, dict]:
    """(tensors, lora_adapter_metadata dict) in diffusers' PEFT layout.

    Text-encoder DoRA magnitudes are written ``lora_magnitude_vector.weight`` by default: PEFT
    reads both spellings, but transformers 5's ``load_adapter`` (what diffusers uses for text
    encoders) silently drops the bare ``lora_magnitude_vector`` that diffusers itself writes.
    """
    tensors, per_comp = {}, {}
    for e in entries:
        if not e.is_lora or e.target is None:
            names = ", ".join(sorted(e.tensors))
            where = e.target.module if e.target is not None else e.prefix
            raise FormatError(f"{where}: PEFT/diffusers LoRA files hold LoRA and DoRA only, not tensors {names}")
        if "lora_mid.weight" in e.tensors:
            raise FormatError(f"{e.target.module}: a Tucker lora_mid core has no PEFT form; fold it first")
        prefix = peft_prefix(e.target, te_text_model, components)
        t = e.tensors
        tensors[f"{prefix}.lora_A.weight"] = t["lora_down.weight"].contiguous()
        tensors[f"{prefix}.lora_B.weight"] = t["lora_up.weight"].contiguous()
        if "lora_up.bias" in t:
            tensors[f"{prefix}.lora_B.bias"] = t["lora_up.bias"].contiguous()
        if "dora_scale" in t:
            suffix = ".weight" if te_magnitude_weight and e.target.component != "unet" else ""
            tensors[f"{prefix}.lora_magnitude_vector{suffix}"] = _peft_magnitude(t["dora_scale"], e.weight_shape).contiguous()
        rank = e.rank
        alpha = _scalar(t["alpha"]) if "alpha" in t else float(rank)
        per_comp.setdefault(e.target.component, []).append((e.target.module, rank, alpha, "dora_scale" in t,
                                                           "lora_up.bias" in t))
    meta = {}
    for comp, mods in per_comp.items():
        doras = {m[3] for m in mods}
        if len(doras) > 1:
            raise FormatError(f"{(components or PEFT_COMPONENT)[comp]}: some modules are DoRA and some plain LoRA; one PEFT config "
                              "cannot hold both (write kohya instead)")
        r0 = Counter(m[1] for m in mods).most_common(1)[0][0]
        a0 = Counter(m[2] for m in mods).most_common(1)[0][0]
        cfg = {
            "r": r0, "lora_alpha": a0,
            "target_modules": sorted(m[0] for m in mods),
            "rank_pattern": {m[0]: m[1] for m in mods if m[1] != r0},
            "alpha_pattern": {m[0]: m[2] for m in mods if m[2] != a0},
            "use_dora": bool(doras.pop()), "lora_bias": any(m[4] for m in mods),
            "use_rslora": False, "bias": "none", "peft_type": "LORA",
        }
        for k, v in cfg.items():
            meta[f"{(components or PEFT_COMPONENT)[comp]}.{k}"] = v
    return tensors, meta


def kohya_metadata(entries: list, family: str, extra: Optional[Mapping] = None) -> dict:
    ranks = Counter(e.rank for e in entries if e.rank is not None)
    alphas = Counter(_scalar(e.tensors["alpha"]) for e in entries if "alpha" in e.tensors)
    conv = [e for e in entries if e.is_lora and len(e.weight_shape) == 4 and tuple(e.weight_shape[2:]) != (1, 1)]
    types = {"lora" if e.is_lora else "other" for e in entries}
    meta = {
        "ss_network_module": "networks.lora" if types <= {"lora"} else "lycoris.kohya",
        "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": (f"{next(iter(alphas)):g}" if len(alphas) == 1 else "Dynamic"),
    }
    if conv:
        cr = Counter(e.rank for e in conv)
        meta["ss_network_args"] = json.dumps({"conv_dim": str(next(iter(cr))) if len(cr) == 1 else "Dynamic"})
    if family in BASE_MODEL_VERSION:
        meta["ss_base_model_version"] = BASE_MODEL_VERSION[family]
        meta["modelspec.architecture"] = ARCHITECTURE[family]
        meta["ss_v2"] = "True" if family == "sd2" else "False"
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def check_out(out, fmt: str) -> str:
    out = os.fspath(out)
    if fmt not in FORMATS:
        raise FormatError(f"unknown output format {fmt!r}; expected kohya or peft")
    if not out.endswith(".safetensors"):
        raise LoraFileError(out, "a LoRA output must end in .safetensors")
    if os.path.lexists(out):
        raise LoraFileError(out, "output already exists; choose a new path")
    return check_output_target(out)


def write_lora(out, entries: list, *, fmt: str = "kohya", family: str = "custom", layout: Mapping = None,
               metadata: Optional[Mapping] = None, te_text_model: bool = True, unet_names: Optional[str] = None) -> None:
    """Write ``entries`` to ``out`` (atomically) in ``fmt``; ``metadata`` is added as given."""
    out = check_out(out, fmt)
    if not entries:
        raise FormatError("nothing to write: no module has a change to keep")
    layout = layout or {}
    if fmt == "kohya":
        tensors = kohya_state_dict(entries, family, layout, unet_names)
        meta = {k: v for k, v in (metadata or {}).items() if k != "lora_adapter_metadata"}
        for k, v in kohya_metadata(entries, family).items():
            meta.setdefault(k, v)
    else:
        tensors, peft_meta = peft_state_dict(entries, te_text_model)
        meta = {k: v for k, v in (metadata or {}).items() if not k.startswith(("ss_network", "ss_base_model"))}
        meta["format"] = "pt"
        meta["lora_adapter_metadata"] = json.dumps(peft_meta, indent=2, sort_keys=True)
    save_safetensors(out, tensors, {k: str(v) for k, v in meta.items()})


__all__ = ["Entry", "lora_entry", "write_lora", "kohya_prefix", "peft_prefix", "FORMATS", "FormatError",
           "parse_dtype", "kohya_dora_scale", "CONVERT_META"]


# ---------------------------------------------------------------------------------------------
# DiT families: kohya's names are the original layout's (``lora_unet_double_blocks_0_img_attn_qkv``)
def _swap_rows(t: Tensor) -> Tensor:
    n = t.shape[0] // 2
    return torch.cat([t[n:], t[:n]], 0)


def _dit_kohya_state_dict(entries: list, layout: Mapping) -> dict:
    """kohya naming on a DiT: original-layout module names (HunyuanVideo: Tencent's, as musubi
    writes them); the modulation whose halves the original stores the other way round gets its
    rows swapped; modules the original fuses (q|k|v, Flux's q|k|v|mlp) are written as one LoRA
    on the fused weight: ``down`` stacks the parts' ``down``s, ``up`` is block-diagonal, so the
    fused delta is exactly the parts' deltas (a part the file lacks gets zero rows). Parts with
    one ``alpha / rank`` keep it as ``alpha``; different ones are folded into ``up`` in fp32."""
    out, fused = {}, {}
    unet = layout.get("unet", {})

    def put(prefix, tensors):
        for name, t in tensors.items():
            key = f"{prefix}.{name}"
            if key in out:
                raise FormatError(f"two modules write {key}")
            out[key] = t.contiguous()

    for e in entries:
        if e.prefix is not None:
            put(e.prefix, e.tensors)
            continue
        t = e.target
        if t.component != "unet":
            lead = "text_model_" if t.component in ("te1", "te2") else ""
            put({"te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}[t.component] + lead
                + t.module.replace(".", "_"), e.tensors)
            continue
        info = unet[t.module]
        if info.ldm_rows is not None:
            if not e.is_lora or set(e.tensors) - {"lora_up.weight", "lora_down.weight", "alpha"}:
                raise FormatError(f"{t.module}: only plain LoRA parts can be joined into the fused "
                                  f"{info.ldm_path} (write PEFT / diffusers names instead)")
            fused.setdefault(info.ldm_alias or info.ldm_path, []).append((info, e))
            continue
        name = (info.ldm_alias or info.ldm_path or t.module)
        tensors = dict(e.tensors)
        if info.ldm_swap:
            for k in ("lora_up.weight", "lora_up.bias", "dora_scale", "diff", "diff_b"):
                if k in tensors:
                    tensors[k] = _swap_rows(tensors[k])
        put("lora_unet_" + (name[: -len(".scale")] if name.endswith(".scale") else name).replace(".", "_"), tensors)
    for body, parts in fused.items():
        infos = sorted({i.path: i for i in unet.values() if (i.ldm_alias or i.ldm_path) == body and i.ldm_rows}.values(),
                       key=lambda i: i.ldm_rows[0])
        have = {i.path: e for i, e in parts}
        downs, ups, scales = [], [], []
        for i in infos:
            e = have.get(i.path)
            if e is None:
                continue
            down = e.tensors["lora_down.weight"].reshape(e.tensors["lora_down.weight"].shape[0], -1)
            up = e.tensors["lora_up.weight"].reshape(e.tensors["lora_up.weight"].shape[0], -1)
            alpha = _scalar(e.tensors["alpha"]) if "alpha" in e.tensors else float(down.shape[0])
            downs.append(down)
            ups.append((i, up))
            scales.append(alpha / float(down.shape[0]))
        rank = sum(d.shape[0] for d in downs)
        rows = infos[-1].ldm_rows[1]
        dtype = downs[0].dtype
        same = len({round(s, 12) for s in scales}) == 1
        big_up = torch.zeros(rows, rank, dtype=torch.float32)
        col = 0
        for (i, up), s in zip(ups, scales):
            r = up.shape[1]
            big_up[i.ldm_rows[0]:i.ldm_rows[1], col:col + r] = up.float() * (1.0 if same else s)
            col += r
        alpha = scales[0] * rank if same else float(rank)
        put("lora_unet_" + body.replace(".", "_"), {
            "lora_down.weight": torch.cat(downs, 0).to(dtype), "lora_up.weight": big_up.to(dtype),
            "alpha": torch.tensor(alpha, dtype=torch.float32)})
    return out
