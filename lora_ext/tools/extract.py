"""``extract`` and ``unmerge``: a LoRA from the difference of two checkpoints, and back.

extract(base, tuned)
    For every Linear/conv module both checkpoints hold, ``D = tuned - base`` (fp32) is
    factorised by truncated SVD (``svd.factorize``: exact for small modules, randomized for
    large ones); the kept energy ``sum(s_i^2)/||D||^2`` is reported per module and overall.
    Modules whose weights are identical are skipped (a whole text encoder that did not change
    is reported as skipped); changes a LoRA cannot hold (norms, embeddings, biases) are
    counted in the report, never dropped silently.

unmerge(merged, base=...)
    The same, from a checkpoint with LoRAs baked in and the checkpoint they were baked into.

unmerge(merged, loras=[...])
    Given the LoRAs that were merged (and their strengths), recompute their fp32 deltas exactly
    as ``merge`` did and take them out: ``W0' = round(W_merged - sum s*delta)``, then, where
    re-merging ``W0'`` would not give the merged value back, move ``W0'`` by one ulp toward the
    values that do. The result is within one rounding step of the merge of the original base
    (usually identical); with ``base=`` given too, the report counts the elements that differ.
    Weight-dependent types (DoRA, OFT/BOFT, IA3, GLoRA) are inverted by fixed-point
    iteration; DoRA cannot be inverted exactly (the base's row norms are not recoverable from
    the merged weights), and the report's re-merge check shows how close it got.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

import torch

from ..checkpoint import open_checkpoint
from ..deltas import binding_deltas
from ..detect import LABELS
from ..errors import AdapterError, BaseModelMismatch, LoraExtError
from ..keys import KeyMap, Target
from ..merge import check_output_path, finite_result
from ..network import load_lora
from .common import Report, Row, emit, module_name, rounding_step
from .progress import progress as progress_bar
from .svd import check_rule, factorize, sq_norm
from .writer import lora_entry, parse_dtype, write_lora, check_out

Tensor = torch.Tensor

# Text-encoder modules a LoRA trains (kohya's CLIPAttention / CLIPMLP targets).
_TE_TARGET = re.compile(r"^encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def extractable(component: str, info) -> str:
    """Empty when a LoRA can hold this module's change, else the reason it cannot."""
    if info.kind not in ("linear", "conv"):
        return f"{info.kind} weights are not low-rank adaptable"
    if component != "unet" and not _TE_TARGET.match(info.path):
        return "not a text-encoder module LoRA loaders patch (embeddings, final norm, projection)"
    return ""


def _pair(base, tuned):
    a = open_checkpoint(base)
    try:
        b = open_checkpoint(tuned)
    except BaseException:
        a.close()
        raise
    if a.family != b.family:
        a.close()
        b.close()
        raise BaseModelMismatch(f"{tuned} is {LABELS.get(b.family, b.family)} but {base} is {LABELS.get(a.family, a.family)}")
    return a, b


def extract(base, tuned, out, *, rank: int, conv_rank: Optional[int] = None, rank_by: str = "fixed",
            energy: float = 0.99, ratio: float = 10.0, min_diff: float = 0.0, fmt: str = "kohya",
            dtype="fp16", method: str = "auto", progress: Optional[bool] = None, log=None,
            tool: str = "extract") -> Report:
    """Write a LoRA for ``tuned - base`` to ``out``; returns the report (also sent to ``log``).

    ``rank`` caps Linear and 1x1-conv modules, ``conv_rank`` (default ``rank``; 0 skips them)
    the k x k convs. ``rank_by``: ``fixed`` (that many), ``ratio`` (singular values within
    ``ratio`` of the largest), ``energy`` (the fewest keeping ``energy`` of ``||D||^2``).
    ``min_diff``: modules whose change is at most this fraction of the weight (Frobenius) are
    treated as unchanged (0: only bit-identical weights).
    """
    out = check_out(out, fmt)
    if rank is None or int(rank) < 1:
        raise LoraExtError("--rank must be at least 1")
    rank = int(rank)
    conv_rank = rank if conv_rank is None else int(conv_rank)
    check_rule(rank_by, energy, ratio)
    dt = parse_dtype(dtype) or torch.float16
    a, b = _pair(base, tuned)
    report = Report(tool, out)
    try:
        entries, stats = [], {"total": 0.0, "kept": 0.0, "bias_total": 0.0, "other_total": 0.0}
        changed_by_comp, modules_by_comp = {}, {}
        todo = []
        for comp, table in a.layout.items():
            other = b.layout.get(comp, {})
            for path, info in table.items():
                if path in other and tuple(other[path].weight_shape) == tuple(info.weight_shape):
                    todo.append((Target(comp, path, info.block), info))
        for t, info in progress_bar(todo, desc=tool, enabled=progress):
            modules_by_comp[t.component] = modules_by_comp.get(t.component, 0) + 1
            w0, w1 = a.read(t, "weight"), b.read(t, "weight")
            if w0 is None or w1 is None:
                continue
            d = w1.float() - w0.float()
            total = sq_norm(d)
            b0, b1 = a.read(t, "bias"), b.read(t, "bias")
            bias_total = 0.0
            if b0 is not None and b1 is not None:
                bias_total = sq_norm(b1.float() - b0.float())
            wnorm = sq_norm(w0) if min_diff > 0 else 0.0
            if total <= (min_diff ** 2) * wnorm and bias_total <= (min_diff ** 2) * wnorm:
                continue  # unchanged
            changed_by_comp[t.component] = changed_by_comp.get(t.component, 0) + 1
            stats["bias_total"] += bias_total
            if total <= (min_diff ** 2) * wnorm:
                report.rows.append(Row(module_name(t), "bias only", detail="bias changed; a LoRA has no bias"))
                continue
            reason = extractable(t.component, info)
            kernel = tuple(info.weight_shape[2:])
            cap = conv_rank if kernel and math.prod(kernel) > 1 else rank
            if not reason and cap == 0:
                reason = "k x k conv skipped (--conv-rank 0)"
            if reason:
                stats["other_total"] += total
                report.rows.append(Row(module_name(t), "not extracted", detail=reason, values={"change": math.sqrt(total)}))
                continue
            f = factorize(d.reshape(d.shape[0], -1), cap, rank_by, energy=energy, ratio=ratio, method=method)
            stats["total"] += total
            stats["kept"] += f.kept
            entries.append(lora_entry(t, info.weight_shape, f.up, f.down, dtype=dt))
            detail = f"rel. error {f.rel_error:.2e}" + ("; bias change not kept" if bias_total else "")
            report.rows.append(Row(module_name(t), "extracted", f.rank, f.energy, detail,
                                   {"singular_values": [float(x) for x in f.candidates[: max(f.rank, 1) * 2]],
                                    "change": math.sqrt(total), "method": f.method}))
        every = stats["total"] + stats["other_total"] + stats["bias_total"]
        explained = stats["kept"] / every if every > 0 else 1.0
        report.values.update({"explained": explained, "extracted_energy": (stats["kept"] / stats["total"]) if stats["total"] else 1.0,
                              "family": a.family})
        s = report.summary
        s.append(f"{tool}: {tuned} - {base} ({LABELS.get(a.family, a.family)}) -> {out}")
        for comp in a.layout:
            n = changed_by_comp.get(comp, 0)
            if comp != "unet" and n == 0 and modules_by_comp.get(comp):
                s.append(f"  {comp}: unchanged, skipped")
            elif modules_by_comp.get(comp):
                s.append(f"  {comp}: {n} of {modules_by_comp[comp]} modules changed")
        ranks = sorted({e.rank for e in entries})
        s.append(f"  extracted {len(entries)} modules, rank {_span(ranks)} by {rank_by}"
                 f" ({'cap ' if rank_by != 'fixed' else ''}{rank}{'' if conv_rank == rank else f', conv {conv_rank}'}), {_dtname(dt)}")
        if report.count("not extracted"):
            s.append(f"  {report.count('not extracted')} changed modules a LoRA cannot hold "
                     f"({_pct(stats['other_total'] / every if every else 0)} of the change)")
        if stats["bias_total"]:
            s.append(f"  bias changes not kept: {_pct(stats['bias_total'] / every)} of the change")
        s.append(f"  the LoRA explains {_pct(explained)} of the difference (squared norm; "
                 f"{_pct(report.values['extracted_energy'])} of what it covers)")
        if not entries:
            raise LoraExtError(f"{tuned} and {base} do not differ in any module a LoRA can hold; nothing written")
        meta = {"lora_ext.tool": tool, "lora_ext.source": json.dumps({
            "base": os.path.basename(os.fspath(base)), "tuned": os.path.basename(os.fspath(tuned)),
            "rank_by": rank_by, "rank": rank, "conv_rank": conv_rank,
            **({"energy": energy} if rank_by == "energy" else {}), **({"ratio": ratio} if rank_by == "ratio" else {}),
            "explained": round(explained, 6)})}
        write_lora(out, entries, fmt=fmt, family=a.family, layout=a.layout, metadata=meta)
    finally:
        a.close()
        b.close()
    emit(log, report)
    return report


def _span(values) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"


def _pct(x: float) -> str:
    return f"{100 * x:.4g}%"


def _dtname(dt) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dt]


# ---------------------------------------------------------------------------------------------
def unmerge(merged, out, *, base=None, loras=None, rank: Optional[int] = None, progress: Optional[bool] = None,
            log=None, **extract_options) -> Report:
    """Recover the LoRA (``base=`` given) or the clean base (``loras=[(path, strength)]`` given).

    With ``loras``, ``out`` is a checkpoint in the merged one's layout and ``base`` (optional)
    is only used to count how many elements of the recovered base differ from it.
    """
    if loras:
        return restore_base(merged, loras, out, reference=base, progress=progress, log=log)
    if base is None:
        raise LoraExtError("unmerge needs --base (the checkpoint the LoRA was merged into) or --lora (the merged LoRA)")
    if rank is None:
        raise LoraExtError("unmerge --base needs --rank (at least the merged LoRA's rank to recover it exactly)")
    return extract(base, merged, out, rank=rank, progress=progress, log=log, tool="unmerge", **extract_options)


def restore_base(merged, loras, out, *, reference=None, max_iter: int = 30, progress: Optional[bool] = None,
                 log=None) -> Report:
    """Take the merged ``loras`` ([(path, strength)]) out of ``merged``; write the base to ``out``."""
    out = check_output_path(out, merged, "merged")
    from ..detect import detect_base_model
    from ..merge import _check_base

    ckpt = open_checkpoint(merged)
    ref = open_checkpoint(reference) if reference is not None else None
    report = Report("unmerge", out)
    try:
        keymap = KeyMap(ckpt.layout, label=f"this checkpoint ({LABELS.get(ckpt.family, ckpt.family)})",
                        naming=ckpt.naming)
        work = []  # (binding, strength)
        for path, strength in loras:
            lora = load_lora(path)
            _check_base(lora, detect_base_model(lora), ckpt.family)
            res = lora.resolve(keymap)
            report.unmatched.extend((os.fspath(path), u) for u in res.unmatched)
            if not res.bindings and lora.groups:
                raise BaseModelMismatch(f"{path}: nothing in this LoRA applies to {merged}")
            work.extend((bnd, float(strength)) for bnd in res.bindings)
        fixed = [(bnd, s) for bnd, s in work if not bnd.adapter.weight_dependent]
        moving = [(bnd, s) for bnd, s in work if bnd.adapter.weight_dependent]
        targets = []
        for bnd, _ in work:
            for t in bnd.targets:
                if t not in targets:
                    targets.append(t)

        def accumulate(pairs, read, acc):
            for bnd, s in pairs:
                try:
                    deltas = binding_deltas(bnd, read)
                except (AdapterError, RuntimeError) as exc:
                    raise LoraExtError(f"{bnd.group.prefix}: cannot compute its delta: {exc}".splitlines()[0]) from None
                for t, (dw, db) in deltas.items():
                    cur = acc.setdefault(t, [None, None])
                    cur[0] = s * dw if cur[0] is None else cur[0] + s * dw
                    if db is not None:
                        cur[1] = s * db if cur[1] is None else cur[1] + s * db
            return acc

        const = accumulate(progress_bar(fixed, desc="deltas", enabled=progress), ckpt.read, {})
        estimate = {}  # (target, param) -> tensor in the stored dtype

        def read_estimate(t, param):
            return estimate.get((t, param), ckpt.read(t, param))

        iterations = 0
        for iterations in range(1, (max_iter if moving else 1) + 1):
            acc = accumulate(moving, read_estimate, {k: [v[0], v[1]] for k, v in const.items()})
            new = {}
            for t, (dw, db) in acc.items():
                for param, d in (("weight", dw), ("bias", db)):
                    if d is None:
                        continue
                    m = ckpt.read(t, param)
                    new[(t, param)] = finite_result(m, m.float() - d.reshape(m.shape), f"{t.component}:{t.module}.{param}")
            done = all(k in estimate and torch.equal(estimate[k], v) for k, v in new.items())
            estimate = new
            if done:
                break
        # Where re-merging the estimate misses the merged value, step one ulp toward it.
        final = accumulate(moving, read_estimate, {k: [v[0], v[1]] for k, v in const.items()})
        totals = {"elements": 0, "changed": 0, "remerge_miss": 0, "fixed": 0, "ref_diff": 0, "ref_far": 0, "ref_steps": 0.0}
        for t in targets:
            parts = []
            for param, d in (("weight", final.get(t, [None, None])[0]), ("bias", final.get(t, [None, None])[1])):
                if d is None or (t, param) not in estimate:
                    continue
                m = ckpt.read(t, param)
                w = _one_ulp_fix(estimate[(t, param)], d.reshape(m.shape), m)
                nfix = int((w != estimate[(t, param)]).sum())
                estimate[(t, param)] = w
                miss = int(((w.float() + d.reshape(m.shape)).to(m.dtype) != m).sum())
                changed = int((w != m).sum())
                totals["elements"] += m.numel()
                totals["changed"] += changed
                totals["remerge_miss"] += miss
                totals["fixed"] += nfix
                ckpt.write(t, param, w)
                line = f"{param}: {changed} of {m.numel()} elements changed, re-merge {'exact' if miss == 0 else f'misses {miss}'}"
                if ref is not None:
                    r = ref.read(t, param)
                    if r is not None and r.shape == w.shape and r.dtype == w.dtype:
                        diff = int((r != w).sum())
                        step = torch.maximum(rounding_step(r), rounding_step(m))
                        ratio = (r.double() - w.double()).abs() / step
                        far = int((ratio > 1).sum())
                        steps = float(ratio.max()) if diff else 0.0
                        totals["ref_diff"] += diff
                        totals["ref_far"] += far
                        totals["ref_steps"] = max(totals["ref_steps"], steps)
                        line += f"; vs base: {diff} differ" + (f" (max {steps:.2g} rounding steps)" if diff else "")
                parts.append(line)
            report.rows.append(Row(module_name(t), "restored", detail="; ".join(parts)))
        s = report.summary
        s.append(f"unmerge: {merged} - {', '.join(f'{p} @ {st:g}' for p, st in loras)} -> {out}")
        s.append(f"  {len(targets)} modules restored ({totals['changed']} of {totals['elements']} elements changed)"
                 + (f", fixed point in {iterations} iterations" if moving else ""))
        s.append(f"  re-merge check: {'bit-exact' if totals['remerge_miss'] == 0 else str(totals['remerge_miss']) + ' elements differ'}"
                 f" ({totals['fixed']} elements moved one ulp to make it so)")
        if any(bnd.adapter.type_name.endswith("+dora") for bnd, _ in moving):
            s.append("  note: DoRA cannot be inverted exactly (the base's row norms are lost in the merge); "
                     "the restored rows re-merge to the checkpoint but may differ from the original base")
        if ref is not None:
            s.append(f"  vs {reference}: {totals['ref_diff']} of {totals['elements']} elements differ"
                     + (f", {totals['ref_far']} by more than one rounding step of the merge (max {totals['ref_steps']:.2g} steps)"
                        if totals["ref_diff"] else ""))
        report.values.update({k: v for k, v in totals.items()})
        report.values["iterations"] = iterations
        ckpt.save(out)
    finally:
        ckpt.close()
        if ref is not None:
            ref.close()
    emit(log, report)
    return report


def _one_ulp_fix(w: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """Where ``round(w + d) != m``, try the neighbours of ``w`` and keep one that re-merges to ``m``."""
    dt = m.dtype
    miss = (w.float() + d).to(dt) != m
    if not bool(miss.any()):
        return w
    w = w.clone()
    target = m.float() - d  # the real-valued preimage
    inf = torch.full_like(w, float("inf"))
    lo, hi = torch.nextafter(w, -inf), torch.nextafter(w, inf)
    ok_lo = (lo.float() + d).to(dt) == m
    ok_hi = (hi.float() + d).to(dt) == m
    pick_lo = ok_lo & (~ok_hi | ((lo.float() - target).abs() <= (hi.float() - target).abs()))
    w[miss & pick_lo] = lo[miss & pick_lo]
    w[miss & ~pick_lo & ok_hi] = hi[miss & ~pick_lo & ok_hi]
    return w


__all__ = ["extract", "unmerge", "restore_base", "extractable"]
