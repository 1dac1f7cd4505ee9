"""``combine`` (several LoRAs into one) and ``resize`` (one LoRA to another rank).

Both reduce each module's total change to the best low-rank factors:

* when every contribution is a plain low-rank product (LoRA/LoCon), the weighted sum
  ``sum_i w_i * s_i * up_i @ down_i`` is itself a product ``P @ Q`` of the stacked factors, and
  its SVD comes exactly from QR of ``P`` and ``Q^T`` and the SVD of the small core
  (``svd.factorize_product``): no dense matrix, exact singular values, exact energies;
* any other type (LoHa, LoKr, full, and with ``base`` DoRA/OFT/IA3/GLoRA) contributes its dense
  fp32 delta and the module is factorised with ``svd.factorize``.

A rank at least the sum of the input ranks (``rank=None``) is lossless. Block weights follow
sd-webui-lora-block-weight: text encoders take ``BASE``, UNet modules their block's value, UNet
modules outside the numbered blocks keep 1.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch

from ..errors import AdapterError, LoraExtError
from ..network import Unmatched, load_lora
from .common import (Report, Row, block_multiplier, dense_deltas, emit, group_keys, load_source, lowrank_parts,
                     module_name, open_model)
from .entries import copy_entries, input_dtype, is_plain_lora
from .progress import progress as progress_bar
from .svd import check_rule, factorize, factorize_product
from .writer import kohya_dora_scale, lora_entry, parse_dtype, write_lora, check_out

Tensor = torch.Tensor


def _cap(shape, rank: Optional[int], conv_rank: Optional[int]) -> Optional[int]:
    kernel = tuple(shape[2:])
    if kernel and math.prod(kernel) > 1 and conv_rank is not None:
        return conv_rank
    return rank


def _rule(rank, energy, ratio, rank_by=None) -> str:
    if rank_by:
        return rank_by
    if energy is not None:
        return "energy"
    if ratio is not None:
        return "ratio"
    return "fixed"


def combine(sources, out, *, rank: Optional[int] = None, conv_rank: Optional[int] = None, rank_by: Optional[str] = None,
            energy: Optional[float] = None, ratio: Optional[float] = None, base=None, fmt: str = "kohya", dtype=None,
            method: str = "auto", progress: Optional[bool] = None, log=None) -> Report:
    """Combine ``sources`` ([(path, weight[, blocks])]) into one LoRA at ``out``.

    ``rank=None`` keeps every nonzero singular value (exact). ``base``: a checkpoint, needed
    for weight-dependent types and for models that are not full-size SD1.x/SD2.x/SDXL.
    """
    out = check_out(out, fmt)
    rule = _rule(rank, energy, ratio, rank_by)
    check_rule(rule, energy, ratio)
    if rule != "fixed" and rank is None and energy is None and ratio is None:
        raise LoraExtError("give --rank or --energy")
    specs = [tuple(s) if isinstance(s, (tuple, list)) else (s, 1.0) for s in sources]
    if not specs:
        raise LoraExtError("combine needs at least one LoRA")
    loras = [load_lora(spec[0]) for spec in specs]
    model = open_model(base, loras)
    report = Report("combine", out)
    try:
        srcs = [load_source(spec[0], model, weight=spec[1], blocks=spec[2] if len(spec) > 2 else None, lora=lora)
                for spec, lora in zip(specs, loras)]
        dt = parse_dtype(dtype) or input_dtype(loras[0])
        per = {}  # target -> {"low": [(P, Q)], "dense": [D], "from": [...]}
        for src in srcs:
            report.unmatched.extend((src.path, u) for u in src.unmatched)
            for bnd in src.bindings:
                try:
                    _collect(bnd, src, model, per, report)
                except (AdapterError, RuntimeError) as exc:
                    reason = f"cannot combine: {exc}".splitlines()[0]
                    report.unmatched.extend((src.path, Unmatched(k, reason)) for k in group_keys(bnd))
        entries, kept, total = [], 0.0, 0.0
        for t, c in progress_bar(list(per.items()), desc="combine", enabled=progress):
            info = model.info(t)
            shape = tuple(info.weight_shape)
            if info.kind not in ("linear", "conv"):
                report.rows.append(Row(module_name(t), "not combined", detail=f"{info.kind} weights have no LoRA form"))
                continue
            cap = _cap(shape, rank, conv_rank)
            f = _factor_sum(c, shape, cap, rule, energy, ratio, method)
            if f is None or f.rank == 0:
                report.rows.append(Row(module_name(t), "zero", detail="contributions cancel or are weighted 0"))
                continue
            kept += f.kept
            total += f.total
            entries.append(lora_entry(t, shape, f.up, f.down, dtype=dt))
            report.rows.append(Row(module_name(t), "combined", f.rank, f.energy,
                                   f"from {', '.join(c['from'])}" + ("; bias change not kept" if c.get("bias") else "")))
        overall = kept / total if total else 1.0
        report.values["energy"] = overall
        s = report.summary
        s.append(f"combine: {' + '.join(f'{os.path.basename(sp[0])}:{sp[1]:g}' + (' (blocks)' if len(sp) > 2 and sp[2] else '') for sp in specs)} -> {out}")
        ranks = sorted({e.rank for e in entries})
        s.append(f"  {len(entries)} modules, rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}' if ranks else '-'}"
                 f" ({rule}{'' if rank is None else f', cap {rank}'}), energy kept {100 * overall:.4g}%")
        meta = {"lora_ext.tool": "combine", "lora_ext.source": json.dumps(
            {"loras": [[os.path.basename(sp[0]), sp[1]] for sp in specs], "rank": rank, "rank_by": rule, "energy": overall})}
        write_lora(out, entries, fmt=fmt, family=model.family, layout=model.layout, metadata=meta)
    finally:
        model.close()
    emit(log, report)
    return report


def _collect(bnd, src, model, per, report) -> None:
    mults = {t: src.weight * block_multiplier(src.blocks, t) for t in bnd.targets}
    label = f"{os.path.basename(src.path)} ({bnd.adapter.type_name})"
    parts = lowrank_parts(bnd)
    if parts is not None:
        bias = "lora_up.bias" in bnd.adapter.tensors
        for t, up, down in parts:
            c = per.setdefault(t, {"low": [], "dense": [], "from": []})
            c["from"].append(label)
            c["bias"] = c.get("bias") or bias
            if mults[t] != 0.0:
                c["low"].append((up * mults[t], down))
        return
    for t, (dw, db) in dense_deltas(bnd, model).items():
        c = per.setdefault(t, {"low": [], "dense": [], "from": []})
        c["from"].append(label)
        c["bias"] = c.get("bias") or (db is not None and bool(db.any()))
        if mults[t] != 0.0:
            c["dense"].append(dw.reshape(dw.shape[0], -1) * mults[t])


def _factor_sum(c, shape, cap, rule, energy, ratio, method):
    if not c["low"] and not c["dense"]:
        return None
    if not c["dense"]:
        p = torch.cat([u for u, _ in c["low"]], 1)
        q = torch.cat([d for _, d in c["low"]], 0)
        return factorize_product(p, q, cap, rule, energy=energy, ratio=ratio)
    d = torch.zeros(shape[0], math.prod(shape[1:]))
    for x in c["dense"]:
        d += x
    for u, dn in c["low"]:
        d += u @ dn
    return factorize(d, min(d.shape) if cap is None else cap, rule, energy=energy, ratio=ratio, method=method)


# ---------------------------------------------------------------------------------------------
def resize(path, out, *, rank: Optional[int] = None, energy: Optional[float] = None, ratio: Optional[float] = None,
           conv_rank: Optional[int] = None, base=None, fmt: str = "kohya", dtype=None, method: str = "auto",
           progress: Optional[bool] = None, log=None) -> Report:
    """Write ``path`` at a new rank: ``rank`` (fixed), or the fewest keeping ``energy`` (capped
    by ``rank`` when both are given), or within ``ratio`` of the largest singular value.

    LoRA/LoCon modules are re-factorised exactly from their factors; DoRA keeps its magnitude
    and resizes its low-rank part; LoHa/LoKr/full become LoRA; a module already at or below a
    fixed ``rank`` is copied unchanged. Reports the energy kept per module and overall.
    """
    out = check_out(out, fmt)
    if rank is None and energy is None and ratio is None:
        raise LoraExtError("resize needs --rank or --energy (or --ratio)")
    rule = _rule(rank, energy, ratio)
    check_rule(rule, energy, ratio)
    lora = load_lora(path)
    model = open_model(base, [lora])
    report = Report("resize", out)
    try:
        src = load_source(path, model, lora=lora)
        report.unmatched.extend((src.path, u) for u in src.unmatched)
        dt = parse_dtype(dtype) or input_dtype(lora)
        entries, kept, total = [], 0.0, 0.0
        for bnd in progress_bar(src.bindings, desc="resize", enabled=progress):
            try:
                made = _resize_binding(bnd, model, rank, conv_rank, rule, energy, ratio, method, dt)
            except (AdapterError, RuntimeError) as exc:
                reason = f"cannot resize: {exc}".splitlines()[0]
                report.unmatched.extend((src.path, Unmatched(k, reason)) for k in group_keys(bnd))
                continue
            for entry, row, f in made:
                entries.append(entry)
                report.rows.append(row)
                if f is not None:
                    kept += f.kept
                    total += f.total
        overall = kept / total if total else 1.0
        report.values["energy"] = overall
        before = sorted({b.adapter.rank for b in src.bindings if b.adapter.rank})
        after = sorted({e.rank for e in entries if e.rank})
        report.summary.append(f"resize: {path} -> {out}")
        how = (f"energy >= {energy:g}" if rule == "energy" else f"ratio {ratio:g}" if rule == "ratio" else f"rank {rank}")
        if rule != "fixed" and rank is not None:
            how += f", rank <= {rank}"
        report.summary.append(f"  {len(entries)} modules, rank {_span(before)} -> {_span(after)} ({how}),"
                              f" energy kept {100 * overall:.4g}%")
        meta = {k: v for k, v in lora.metadata.items() if not k.startswith(("ss_network_dim", "ss_network_alpha"))}
        meta.update({"lora_ext.tool": "resize", "lora_ext.source": json.dumps(
            {"lora": os.path.basename(os.fspath(path)), "rank": rank, "energy": energy, "ratio": ratio,
             "energy_kept": overall})})
        write_lora(out, entries, fmt=fmt, family=model.family, layout=model.layout, metadata=meta)
    finally:
        model.close()
    emit(log, report)
    return report


def _span(v) -> str:
    return "-" if not v else (str(v[0]) if len(v) == 1 else f"{v[0]}..{v[-1]}")


def _resize_binding(bnd, model, rank, conv_rank, rule, energy, ratio, method, dt):
    adapter = bnd.adapter
    inner = getattr(adapter, "inner", None)
    made = []
    shapes = {t: tuple(model.info(t).weight_shape) for t in bnd.targets}
    dora_lowrank = inner is not None and getattr(inner, "lowrank", None) is not None and inner.lowrank() is not None
    kinds = {model.info(t).kind for t in bnd.targets}
    if not kinds <= {"linear", "conv"} or (adapter.weight_dependent and not dora_lowrank):
        why = (f"{'/'.join(sorted(kinds))} module" if not kinds <= {"linear", "conv"}
               else f"{adapter.type_name} has no rank to resize")
        for e in copy_entries(bnd, model.layout):
            made.append((e, Row(module_name(e.target) if e.target else e.prefix, "kept", adapter.rank, None,
                                f"{why}: copied unchanged"), None))
        return made
    if is_plain_lora(bnd) and "lora_mid.weight" not in bnd.group.tensors:
        cur = adapter.rank
        caps = [_cap(s, rank, conv_rank) for s in shapes.values()]
        if rule == "fixed" and all(c is not None and cur <= c for c in caps):
            for e in copy_entries(bnd, model.layout):
                made.append((e, Row(module_name(e.target) if e.target else e.prefix, "kept", cur, 1.0,
                                    f"rank {cur} <= {rank}: copied unchanged"), None))
            return made
    parts = lowrank_parts(bnd)
    dora = None
    if parts is None and dora_lowrank:
        # DoRA over a LoRA: resize the low-rank direction, keep the magnitude as it is
        up, down, scale = inner.lowrank()
        up2, down2 = up.flatten(1).float() * float(scale), down.flatten(1).float()
        if len(bnd.targets) != 1:
            raise AdapterError("DoRA on a fused q/k/v module cannot be resized")
        parts = [(bnd.targets[0], up2, down2)]
        dora = adapter.tensors["dora_scale"]
    if parts is not None:
        for t, up, down in parts:
            cap = _cap(shapes[t], rank, conv_rank)
            f = factorize_product(up, down, cap if cap is not None else up.shape[1], rule, energy=energy, ratio=ratio)
            ds = None if dora is None else kohya_dora_scale(dora, shapes[t])
            e = lora_entry(t, shapes[t], f.up, f.down, dtype=dt, dora_scale=ds)
            made.append((e, Row(module_name(t), "resized", f.rank, f.energy,
                                f"from rank {up.shape[1]}" + (" (DoRA magnitude kept)" if dora is not None else "")), f))
        return made
    for t, (dw, db) in dense_deltas(bnd, model).items():
        d2 = dw.reshape(dw.shape[0], -1)
        cap = _cap(shapes[t], rank, conv_rank)
        f = factorize(d2, min(d2.shape) if cap is None else cap, rule, energy=energy, ratio=ratio, method=method)
        if f.rank == 0:
            continue
        e = lora_entry(t, shapes[t], f.up, f.down, dtype=dt)
        note = f"{adapter.type_name} -> lora" + ("; bias change not kept" if db is not None and bool(db.any()) else "")
        made.append((e, Row(module_name(t), "resized", f.rank, f.energy, note), f))
    return made
