"""``transfer``: carry a LoRA from one base model to another of the same family, without training.

In the spirit of LoRA-X (Farhadzadeh et al., arXiv 2501.16559) and ProLoRA (arXiv 2506.04244):
a LoRA trained on base A mostly acts inside the dominant singular subspaces of A's weights; on
a related base B those subspaces have moved a little, and the delta should move with them.
Per module, with ``W_A`` and ``W_B`` (a conv's kernel folded into the input axis):

1. ``U_A, V_A`` and ``U_B, V_B``: the top-``k`` left/right singular subspaces (exact, from the
   fp64 Gram matrix). ``k`` is ``subspace_rank`` moved to the largest relative spectral gap of
   ``W_A`` within ``[k/2, 2k]`` (a subspace is only well defined at a gap).
2. Similarity: ``min(||U_B^T U_A||_F^2, ||V_B^T V_A||_F^2) / k``, the mean squared cosine of the
   principal angles (1: same subspaces; about ``k / n`` for unrelated weights). Modules below
   ``min_similarity`` are not transferred: kept as they are (``on_dissimilar="keep"``, what
   applying the LoRA to B directly would do) or dropped (``"drop"``, LoRA-X's choice).
3. ``method="align"`` (default): the rotation ``O_U = polar(U_B^T U_A)`` (orthogonal
   Procrustes) carries ``U_A`` onto the closest basis of ``U_B``'s span, and
   ``L = I + (U_B O_U - U_A) U_A^T`` maps A's subspace onto B's while leaving its complement
   alone (``R`` likewise on the input side); the new delta is ``L delta R^T``, i.e.
   ``up' = L up`` and ``down' = down R^T``: same rank, same alpha. ``method="project"`` is
   LoRA-X's projection ``U_B U_B^T delta V_B V_B^T`` (drops what lies outside B's subspaces).
4. DoRA: the low-rank direction moves as above and each magnitude is rescaled by
   ``||W_B + delta'|| / ||W_A + delta||`` on its axis, so DoRA's per-row factor is kept.
   LoHa/LoKr/full deltas are moved densely and refactorised (rank ``rank``); weight-relative
   types (OFT/BOFT, IA3, GLoRA) already act on whatever weight they meet and are carried
   unchanged, as are modules whose weights are identical in A and B.

With ``reference`` (a LoRA trained on B), each module also reports how far the transferred and
the untransferred deltas are from the reference's (relative Frobenius distances).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..adapters.dora import dora_axis
from ..checkpoint import open_checkpoint
from ..deltas import binding_deltas
from ..detect import LABELS
from ..errors import AdapterError, BaseModelMismatch, LoraExtError
from ..keys import KeyMap
from ..network import Unmatched, load_lora
from .common import Model, Report, Row, emit, group_keys, load_source, module_name
from .entries import copy_entries, input_dtype
from .progress import progress as progress_bar
from .svd import factorize, subspaces
from .writer import check_out, kohya_dora_scale, lora_entry, parse_dtype, write_lora

Tensor = torch.Tensor
METHODS = ("align", "project")


def _model(path) -> Model:
    ckpt = open_checkpoint(path)
    label = LABELS.get(ckpt.family, ckpt.family)
    return Model(ckpt.family, ckpt.layout, KeyMap(ckpt.layout, label=f"{path} ({label})", naming=ckpt.naming), ckpt)


def _stack(model: Model, targets) -> Optional[Tensor]:
    ws = []
    for t in targets:
        if t.module not in model.layout.get(t.component, {}):
            return None
        w = model.read(t, "weight")
        if w is None:
            return None
        ws.append(w.float())
    return torch.cat(ws, 0) if len(ws) > 1 else ws[0]


def _polar(c: Tensor) -> Tensor:
    p, _, qh = torch.linalg.svd(c)
    return p @ qh


def pick_k(s: Tensor, k: int, limit: int) -> int:
    """``k`` moved to the largest relative gap ``s[j-1]/s[j]`` for j in [k/2, 2k] (at most ``limit``)."""
    lo, hi = max(1, k // 2), min(2 * k, limit)
    if hi < lo:
        return max(1, min(k, limit))
    best, arg = -1.0, min(k, hi)
    for j in range(lo, hi + 1):
        if j >= s.numel():
            break
        gap = float(s[j - 1] / s[j]) if float(s[j]) > 0 else float("inf")
        if gap > best * (1 + 1e-9):
            best, arg = gap, j
    return arg


class SubspaceMap:
    """Moves a delta from base A's weight to base B's: ``x -> L x R^T`` (see module docstring)."""

    def __init__(self, wa: Tensor, wb: Tensor, k: int, method: str):
        m, n = wa.shape
        limit = max(1, min(m, n) // 2)
        kmax = min(2 * k, limit)
        ua, sa, va = subspaces(wa, kmax)
        ub, _, vb = subspaces(wb, kmax)
        self.k = kk = pick_k(sa, min(k, limit), kmax)
        ua, va, ub, vb = ua[:, :kk], va[:, :kk], ub[:, :kk], vb[:, :kk]
        cu, cv = ub.T @ ua, vb.T @ va
        self.sim_left = float((cu ** 2).sum()) / kk
        self.sim_right = float((cv ** 2).sum()) / kk
        self.method = method
        if method == "align":
            self._l = (ub @ _polar(cu) - ua, ua)
            self._r = (vb @ _polar(cv) - va, va)
        else:
            self._l, self._r = (ub, ub), (vb, vb)

    @property
    def similarity(self) -> float:
        return min(self.sim_left, self.sim_right)

    def left(self, x: Tensor) -> Tensor:
        """``L x`` for x of shape (out, r)."""
        a, b = self._l
        xd = x.double()
        if self.method == "align":
            return (xd + a @ (b.T @ xd)).float()
        return (a @ (b.T @ xd)).float()

    def right(self, y: Tensor) -> Tensor:
        """``y R^T`` for y of shape (r, in)."""
        a, b = self._r
        yd = y.double()
        if self.method == "align":
            return (yd + (yd @ b) @ a.T).float()
        return ((yd @ b) @ a.T).float()

    def both(self, d: Tensor) -> Tensor:
        return self.right(self.left(d))


def transfer(path, out, *, source, target, min_similarity: float = 0.8, subspace_rank: int = 64,
             method: str = "align", on_dissimilar: str = "keep", rank: Optional[int] = None, reference=None,
             fmt: str = "kohya", dtype=None, progress: Optional[bool] = None, log=None) -> Report:
    """Carry the LoRA at ``path`` from checkpoint ``source`` to checkpoint ``target``; write ``out``."""
    out = check_out(out, fmt)
    if method not in METHODS:
        raise LoraExtError(f"unknown transfer method {method!r}; expected {' or '.join(METHODS)}")
    if on_dissimilar not in ("keep", "drop"):
        raise LoraExtError(f"on_dissimilar must be keep or drop, not {on_dissimilar!r}")
    if not 0.0 <= min_similarity <= 1.0:
        raise LoraExtError(f"--min-similarity must be in [0, 1], got {min_similarity}")
    lora = load_lora(path)
    a = _model(source)
    try:
        b = _model(target)
    except BaseException:
        a.close()
        raise
    report = Report("transfer", out)
    try:
        if a.family != b.family:
            raise BaseModelMismatch(f"{target} is {b.label} but {source} is {a.label}; transfer works within one family")
        src = load_source(path, a, lora=lora)
        report.unmatched.extend((src.path, u) for u in src.unmatched)
        ref = _reference(reference, b) if reference is not None else {}
        dt = parse_dtype(dtype) or input_dtype(lora)
        entries, counts = [], {}
        for bnd in progress_bar(src.bindings, desc="transfer", enabled=progress):
            try:
                made, rows = _transfer_binding(bnd, a, b, min_similarity, subspace_rank, method, on_dissimilar,
                                               rank, dt, ref)
            except (AdapterError, RuntimeError) as exc:
                reason = f"cannot transfer: {exc}".splitlines()[0]
                report.unmatched.extend((src.path, Unmatched(k, reason)) for k in group_keys(bnd))
                continue
            entries.extend(made)
            report.rows.extend(rows)
            for r in rows:
                counts[r.status] = counts.get(r.status, 0) + 1
        s = report.summary
        s.append(f"transfer: {path} from {source} to {target} ({a.label}) -> {out}")
        s.append(f"  method {method}, subspace rank {subspace_rank}, min similarity {min_similarity:g}; "
                 + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        if ref:
            moved = [r for r in report.rows if "ref_transferred" in r.values]
            better = sum(1 for r in moved if r.values["ref_transferred"] < r.values["ref_source"])
            s.append(f"  vs reference {reference}: transferred delta closer than the source delta in {better} of {len(moved)} modules")
        report.values["counts"] = counts
        if not entries:
            raise LoraExtError("nothing to write: every module was dropped")
        meta = dict(lora.metadata)
        meta.pop("lora_adapter_metadata", None)
        meta.update({"lora_ext.tool": "transfer", "lora_ext.transfer": (
            f"{os.path.basename(os.fspath(source))} -> {os.path.basename(os.fspath(target))}, {method}, "
            f"min_similarity {min_similarity:g}, subspace_rank {subspace_rank}")})
        write_lora(out, entries, fmt=fmt, family=b.family, layout=b.layout, metadata=meta)
    finally:
        a.close()
        b.close()
    emit(log, report)
    return report


def _reference(path, b: Model) -> dict:
    """{target: dense fp32 delta} of a LoRA fitted on the target base."""
    src = load_source(path, b)
    out = {}
    for bnd in src.bindings:
        for t, (dw, _) in binding_deltas(bnd, b.read).items():
            out[t] = out.get(t, 0) + dw
    return out


def _carry(bnd, layout, status, detail, values=None):
    entries = copy_entries(bnd, layout)
    rows = [Row(module_name(e.target) if e.target else e.prefix, status, bnd.adapter.rank, detail=detail,
                values=dict(values or {})) for e in entries]
    return entries, rows


def _transfer_binding(bnd, a: Model, b: Model, min_sim, k, method, on_dissimilar, rank, dt, ref):
    targets = bnd.targets
    wa, wb = _stack(a, targets), _stack(b, targets)
    if wb is None:
        return [], [Row(module_name(t), "dropped", detail="the target checkpoint has no such module") for t in targets]
    if wa.shape != wb.shape:
        return [], [Row(module_name(targets[0]), "dropped", detail=f"shape {tuple(wa.shape)} -> {tuple(wb.shape)}")]
    adapter = bnd.adapter
    inner = getattr(adapter, "inner", None)
    dora_low = inner is not None and getattr(inner, "lowrank", None) is not None and inner.lowrank() is not None \
        and len(targets) == 1
    if torch.equal(wa, wb):
        return _carry(bnd, b.layout, "identical", "same weights in both bases: carried unchanged", {"similarity": 1.0})
    if adapter.weight_dependent and not dora_low:
        return _carry(bnd, b.layout, "carried", f"{adapter.type_name} acts on whatever weight it meets: carried unchanged")
    shape = tuple(wa.shape)
    wa2, wb2 = wa.reshape(shape[0], -1), wb.reshape(shape[0], -1)
    smap = SubspaceMap(wa2, wb2, k, method)
    vals = {"similarity": smap.similarity, "sim_left": smap.sim_left, "sim_right": smap.sim_right, "k": smap.k}
    if smap.similarity < min_sim:
        if on_dissimilar == "drop":
            return [], [Row(module_name(t), "dropped", detail=f"similarity {smap.similarity:.3f} < {min_sim:g}", values=vals)
                        for t in targets]
        return _carry(bnd, b.layout, "kept", f"similarity {smap.similarity:.3f} < {min_sim:g}: not transferred", vals)

    fn = getattr(adapter, "lowrank", None)
    lr = fn() if fn is not None and not adapter.weight_dependent else None
    if lr is None and dora_low:
        lr = inner.lowrank()
    entries, rows = [], []
    if lr is not None:
        up, down, scale = lr
        up2, down2 = up.flatten(1).float(), down.flatten(1).float()
        r = down2.shape[0]
        new_up, new_down = smap.left(up2), smap.right(down2)
        delta_a = (up2 @ down2) * scale
        delta_b = (new_up @ new_down) * scale
        mags = None
        if dora_low:
            mags = _moved_magnitude(adapter, shape, wa2, wb2, delta_a, delta_b)
        row0 = 0
        for t in targets:
            info = b.info(t)
            n = info.weight_shape[0]
            ds = None if mags is None else kohya_dora_scale(mags, info.weight_shape)
            entries.append(lora_entry(t, info.weight_shape, new_up[row0:row0 + n], new_down, alpha=scale * r, dtype=dt,
                                      dora_scale=ds))
            rows.append(_row(t, "transferred", r, None, delta_a[row0:row0 + n], delta_b[row0:row0 + n], vals, ref,
                             "DoRA magnitude rescaled" if mags is not None else ""))
            row0 += n
        return entries, rows
    # LoHa / LoKr / full: move the dense delta, refactorise
    delta_a = torch.cat([dw.reshape(dw.shape[0], -1) for dw, _ in binding_deltas(bnd, a.read).values()], 0)
    delta_b = smap.both(delta_a)
    cap = rank or min(2 * (adapter.rank or 16), *delta_b.shape)
    f = factorize(delta_b, cap)
    row0 = 0
    for t in targets:
        info = b.info(t)
        n = info.weight_shape[0]
        entries.append(lora_entry(t, info.weight_shape, f.up[row0:row0 + n], f.down, dtype=dt))
        rows.append(_row(t, "transferred", f.rank, f.energy, delta_a[row0:row0 + n], (f.up @ f.down)[row0:row0 + n],
                         vals, ref, f"{adapter.type_name} -> lora"))
        row0 += n
    return entries, rows


def _moved_magnitude(adapter, shape, wa, wb, delta_a, delta_b) -> Tensor:
    """DoRA magnitudes times ``||W_B + delta_B|| / ||W_A + delta_A||`` along their own axis."""
    m = adapter.tensors["dora_scale"]
    axis, _ = dora_axis(m.shape, shape, getattr(adapter, "axis_hint", None))

    def norms(v):
        v = v.reshape(shape)
        if axis == "out":
            return torch.linalg.vector_norm(v.reshape(shape[0], -1), dim=1)
        return torch.linalg.vector_norm(v.transpose(0, 1).reshape(shape[1], -1), dim=1)

    ratio = norms(wb + delta_b) / norms(wa + delta_a).clamp_min(torch.finfo(torch.float32).tiny)
    return (m.float().reshape(-1) * ratio).reshape(m.shape).to(m.dtype)


def _row(t, status, rank, energy, d_source, d_moved, vals, ref, note):
    values = dict(vals)
    norm = float(torch.linalg.vector_norm(d_source))
    values["moved"] = float(torch.linalg.vector_norm(d_moved - d_source)) / norm if norm else 0.0
    detail = f"similarity {vals['similarity']:.4f} (k={vals['k']}); delta moved {100 * values['moved']:.3g}%"
    if t in ref:
        r = ref[t].reshape(ref[t].shape[0], -1)
        rn = float(torch.linalg.vector_norm(r)) or 1.0
        values["ref_transferred"] = float(torch.linalg.vector_norm(d_moved - r)) / rn
        values["ref_source"] = float(torch.linalg.vector_norm(d_source - r)) / rn
        detail += (f"; vs reference: transferred {values['ref_transferred']:.4g}, "
                   f"untransferred {values['ref_source']:.4g}")
    if note:
        detail += f"; {note}"
    return Row(module_name(t), status, rank, energy, detail, values)


__all__ = ["transfer", "SubspaceMap", "pick_k", "METHODS"]
