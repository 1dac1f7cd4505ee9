"""``convert``: a LoRA/DoRA file between kohya and PEFT/diffusers naming, losslessly.

Tensors are copied bit for bit (only reshaped between the 2-D and 1x1-conv spellings of the
same values, and DoRA magnitudes between PEFT's (out,) / (1, out, 1, 1) and kohya's
(out, 1[, 1, 1])); each module's scale ``alpha / rank`` is carried exactly: kohya ``alpha``
tensors become PEFT ``lora_alpha`` values (``alpha_pattern`` per module where they differ) and
back. What only one side can hold is remembered in the output's metadata (``lora_ext.convert``:
the kohya alpha dtype, the original ``lora_adapter_metadata`` and text-encoder key style), so a
round trip kohya -> PEFT -> kohya or PEFT -> kohya -> PEFT gives the same tensors and names.

Not convertible to PEFT (a clear error, nothing written): LoHa/LoKr/OFT/IA3/... (use ``resize``
to turn them into a LoRA first), LyCORIS per-input DoRA (``wd_on_out=False``), and a mix of
DoRA and plain modules in one component. A Tucker ``lora_mid`` core is folded into
``lora_down`` for PEFT (exact math, rounded once to the file's dtype; the report says so).
Converting to kohya writes other LyCORIS types unchanged under kohya names.
"""
from __future__ import annotations

import json
from typing import Optional

import torch

from ..errors import LoraExtError
from ..network import Group, _inject_peft_alpha, load_lora
from .common import Report, Row, emit, load_source, module_name, open_model
from .entries import copy_entries, is_plain_lora
from .progress import progress as progress_bar
from .writer import CONVERT_META, FormatError, check_out, peft_prefix, peft_state_dict, write_lora

DTYPE_NAMES = {"torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16, "torch.float32": torch.float32,
               "torch.float64": torch.float64}


def convert(path, out, *, to: str = "kohya", base=None, progress: Optional[bool] = None, log=None) -> Report:
    """Write ``path`` in ``to`` ("kohya" | "peft"/"diffusers") naming at ``out``."""
    to = {"diffusers": "peft"}.get(to, to)
    out = check_out(out, to)
    lora = load_lora(path)
    model = open_model(base, [lora])
    report = Report("convert", out)
    try:
        src = load_source(path, model, lora=lora)
        report.unmatched.extend((src.path, u) for u in src.unmatched)
        remembered = _remembered(lora.metadata)
        entries = []
        bad = []
        for bnd in progress_bar(src.bindings, desc="convert", enabled=progress):
            if to == "peft" and not is_plain_lora(bnd):
                bad.append(f"{bnd.group.prefix} ({bnd.adapter.type_name})")
                continue
            for e in _diffusers_order(copy_entries(bnd, model.layout), model):
                note = bnd.adapter.type_name
                if to == "peft" and "lora_mid.weight" in e.tensors:
                    _fold_mid(e)
                    note += "; Tucker core folded into lora_down"
                if "lora_down.weight" in e.tensors and "alpha" not in e.tensors:
                    e.tensors["alpha"] = torch.tensor(float(e.rank))
                    note += "; alpha = rank written"
                entries.append(e)
                name = module_name(e.target) if e.target is not None else e.prefix
                report.rows.append(Row(name, "converted", e.rank, detail=note))
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise FormatError(f"{path}: PEFT/diffusers LoRA files hold LoRA and DoRA only; {', '.join(bad[:3])}{more} "
                              "cannot be converted losslessly (lora-ext resize turns them into a LoRA)")
        meta = {k: v for k, v in lora.metadata.items() if k not in (CONVERT_META, "lora_adapter_metadata", "format")}
        te_text_model = True
        if to == "kohya":
            dtype = remembered.get("kohya_alpha_dtype")
            if dtype in DTYPE_NAMES:
                for e in entries:
                    if "alpha" in e.tensors:
                        e.tensors["alpha"] = e.tensors["alpha"].to(DTYPE_NAMES[dtype])
            keep = {}
            unet_names = remembered.get("kohya_unet_names") or _kohya_unet_names(lora.groups)
            if "lora_adapter_metadata" in lora.metadata:
                keep["lora_adapter_metadata"] = lora.metadata["lora_adapter_metadata"]
                keep["te_text_model"] = _te_text_model(lora.groups)
                keep["te_magnitude_weight"] = _te_magnitude_weight(lora.groups)
            if keep:
                meta[CONVERT_META] = json.dumps(keep)
            write_lora(out, entries, fmt="kohya", family=model.family, layout=model.layout, metadata=meta,
                       unet_names=unet_names)
        else:
            alphas = {str(e.tensors["alpha"].dtype) for e in entries if "alpha" in e.tensors}
            keep = {"kohya_alpha_dtype": alphas.pop()} if len(alphas) == 1 else {}
            if _kohya_unet_names(lora.groups):
                keep["kohya_unet_names"] = _kohya_unet_names(lora.groups)
            te_text_model = remembered.get("te_text_model", True)
            meta[CONVERT_META] = json.dumps(keep)
            original = remembered.get("lora_adapter_metadata")
            from .writer import peft_components

            tensors, generated = peft_state_dict(entries, te_text_model, remembered.get("te_magnitude_weight", True),
                                                 peft_components(model.family))
            use = original if original and _same_scales(json.loads(original), entries, te_text_model) else None
            from ..io import save_safetensors

            meta["format"] = "pt"
            meta["lora_adapter_metadata"] = use or json.dumps(generated, indent=2, sort_keys=True)
            save_safetensors(out, tensors, {k: str(v) for k, v in meta.items()})
        report.summary.append(f"convert: {path} -> {out} ({to}{', text_encoder.text_model.* keys' if to == 'peft' and te_text_model else ''})")
        report.summary.append(f"  {len(entries)} modules, tensors copied bit for bit; alpha/rank scales kept exactly")
        if report.unmatched:
            report.summary.append(f"  {len(report.unmatched)} keys of {path} fit no module and are not in the output")
    finally:
        model.close()
    emit(log, report)
    return report


def _diffusers_order(entries, model):
    """Entries with every row in the diffusers order the output names assume: on an
    original-layout (ldm-named) base, a DiT modulation the original stores halves-swapped
    (``ModuleInfo.ldm_swap``) comes out of the binding in the original's order."""
    if getattr(model.keymap, "naming", "diffusers") != "ldm":
        return entries
    for e in entries:
        info = model.layout.get(e.target.component, {}).get(e.target.module) if e.target is not None else None
        if info is not None and getattr(info, "ldm_swap", False):
            for k in ("lora_up.weight", "lora_up.bias", "dora_scale"):
                if k in e.tensors:
                    t = e.tensors[k]
                    e.tensors[k] = torch.cat([t[t.shape[0] // 2:], t[: t.shape[0] // 2]], 0)
    return entries


def _remembered(metadata) -> dict:
    raw = metadata.get(CONVERT_META)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def _te_text_model(groups) -> bool:
    tes = [p for p in groups if p.startswith(("text_encoder.", "text_encoder_2."))]
    return not tes or any(".text_model." in p for p in tes)


def _kohya_unet_names(groups):
    """"ldm" or "diffusers" for a kohya file's UNet module names (None when it has none)."""
    unet = [p for p in groups if p.startswith("lora_unet_")]
    if not unet:
        return None
    ldm = sum(p.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")) for p in unet)
    return "ldm" if ldm * 2 > len(unet) else "diffusers"


def _te_magnitude_weight(groups) -> bool:
    keys = [g.keys["dora_scale"] for p, g in groups.items()
            if p.startswith(("text_encoder.", "text_encoder_2.")) and "dora_scale" in g.keys]
    return not keys or any(k.endswith(".weight") for k in keys)


def _fold_mid(e) -> None:
    mid, down, up = e.tensors.pop("lora_mid.weight"), e.tensors["lora_down.weight"], e.tensors["lora_up.weight"]
    d2 = down.float().reshape(down.shape[0], down.shape[1])
    folded = torch.einsum("ij...,jq->iq...", mid.float(), d2)  # (r, in, kh, kw)
    e.tensors["lora_down.weight"] = folded.to(down.dtype).contiguous()
    e.tensors["lora_up.weight"] = up.reshape(up.shape[0], up.shape[1], *([1] * (folded.dim() - 2)))


def _same_scales(config: dict, entries, te_text_model: bool) -> bool:
    """Whether a remembered PEFT config gives every entry the scale its kohya alpha says."""
    for e in entries:
        if e.target is None:
            return False
        g = Group(peft_prefix(e.target, te_text_model), {}, {"lora_down.weight": e.tensors["lora_down.weight"]})
        try:
            _inject_peft_alpha(g, config)
        except (TypeError, ValueError, KeyError, LoraExtError):
            return False
        want = e.tensors.get("alpha")
        got = g.tensors.get("alpha")
        if got is None or want is None or float(got.float()) != float(want.float()):
            return False
        dora = any(k.endswith("use_dora") and v for k, v in config.items())
        if dora != ("dora_scale" in e.tensors):
            return False
    return True
