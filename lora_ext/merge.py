"""``lora-ext merge``: bake LoRAs into a checkpoint, deltas in fp32, dtypes kept."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .checkpoint import open_checkpoint
from .deltas import binding_deltas, check_finite
from .detect import LABELS, detect_base_model
from .errors import AdapterError, BaseModelMismatch, LoraExtError, LoraFileError
from .io import check_output_target
from .keys import KeyMap
from .network import Unmatched, load_lora


@dataclass
class LoraReport:
    path: str
    strength: float
    base_model: str
    applied: int = 0
    unmatched: list = field(default_factory=list)  # [Unmatched]

    def lines(self) -> list:
        out = [f"{self.path} @ {self.strength:g}: {self.applied} modules applied ({LABELS.get(self.base_model, self.base_model)} LoRA)"]
        if self.unmatched:
            out.append(f"  {len(self.unmatched)} keys not applied:")
            out.extend(f"    {u.key}: {u.reason}" for u in self.unmatched)
        return out


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``PATH[:STRENGTH]``; a path may itself contain ':' (C:\\...), so only a numeric tail counts.
    A strength must be a finite number (``nan``, ``inf``, ``1e309`` are refused)."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            value = float(tail)
        except ValueError:
            return arg, 1.0
        if not math.isfinite(value):
            raise LoraExtError(f"{arg}: strength {tail!r} is not a finite number")
        return head, value
    return arg, 1.0


def finite_result(base: torch.Tensor, value32: torch.Tensor, what: str) -> torch.Tensor:
    """``value32`` rounded to ``base``'s dtype, refused when that holds a NaN or an infinity
    where the base held a finite number (a strength too large for fp16 overflows there)."""
    out = value32.to(base.dtype)
    if out.is_floating_point():
        # fp8 has no isfinite kernel: check its fp32 upcast (exact), which keeps NaN / Inf
        check = out if out.element_size() > 1 else out.float()
        ref = base if base.element_size() > 1 else base.float()
        bad = ~torch.isfinite(check) & torch.isfinite(ref.reshape(out.shape))
        if bool(bad.any()):
            raise LoraExtError(f"{what}: the result holds {int(bad.sum())} non-finite values where the base "
                               f"is finite (a strength too large for {str(base.dtype).replace('torch.', '')}?); "
                               "nothing written")
    return out


def check_output_path(out, source, what: str) -> str:
    """Refuse a checkpoint output ``out`` written from ``source`` (the ``what`` checkpoint); returns it as a str.

    It may not be ``source`` itself nor exist already, and beside a single-file ``source`` it
    must be a ``.safetensors`` file (a folder source is written as a folder).
    """
    out, source = os.fspath(out), os.fspath(source)
    if os.path.abspath(out) == os.path.abspath(source):
        raise LoraFileError(out, f"output would overwrite the {what} checkpoint")
    if os.path.lexists(out):
        raise LoraFileError(out, "output already exists; choose a new path")
    folder_source = os.path.isdir(source)
    if not folder_source and not out.endswith(".safetensors"):
        raise LoraFileError(out, "a single-file output must end in .safetensors")
    if folder_source:
        inside = os.path.realpath(os.path.dirname(os.path.abspath(out)))
        src = os.path.realpath(source)
        if inside == src or inside.startswith(src.rstrip(os.sep) + os.sep):
            raise LoraFileError(out, f"the output folder would lie inside the {what} folder {source}")
    need = 0
    if not folder_source:
        try:
            need = os.path.getsize(source)  # the output is about as large as the checkpoint
        except OSError:
            need = 0
    return check_output_target(out, need_bytes=need)


def merge(base, loras, out, *, log: Optional[Callable[[str], None]] = None, allow_empty: bool = False) -> list:
    """Bake ``loras`` ([(path, strength)]) into ``base`` and write ``out``; returns reports.

    A LoRA that changes nothing (no modules, rank 0 or all-zero factors) is an error unless
    ``allow_empty`` (then the output is the base, rewritten unchanged); an explicit strength 0
    is not (the caller asked for a no-op)."""
    log = log or (lambda s: None)
    out = check_output_path(out, base, "base")
    ckpt = open_checkpoint(base)
    try:
        keymap = KeyMap(ckpt.layout, label=f"this checkpoint ({_label(ckpt.family)})", naming=ckpt.naming)
        for note in ckpt.notes:
            log(note)
        reports, per_target = [], {}
        for path, strength in loras:
            lora = load_lora(path)
            detected = detect_base_model(lora)
            report = LoraReport(os.fspath(path), float(strength), detected.name)
            _check_base(lora, detected, ckpt.family)
            res = lora.resolve(keymap)
            report.unmatched.extend(res.unmatched)
            changes = 0  # modules whose delta is not all zeros
            for binding in res.bindings:
                try:
                    deltas = binding_deltas(binding, ckpt.read)
                    for t, (dw, db) in deltas.items():
                        check_finite(dw, f"delta of {t.module}")
                except (AdapterError, RuntimeError) as exc:
                    reason = f"cannot apply: {exc}".splitlines()[0]
                    report.unmatched.extend(Unmatched(k, reason) for k in sorted(binding.group.keys.values()))
                    continue
                report.applied += 1
                changes += any(bool(dw.any()) or (db is not None and bool(db.any())) for dw, db in deltas.values())
                for t, (dw, db) in deltas.items():
                    acc = per_target.setdefault(t, [None, None])
                    acc[0] = strength * dw if acc[0] is None else acc[0] + strength * dw
                    if db is not None:
                        acc[1] = strength * db if acc[1] is None else acc[1] + strength * db
            if report.applied == 0 and lora.groups:
                raise BaseModelMismatch(f"{path}: nothing in this LoRA applies to {base} ({len(report.unmatched)} keys, e.g. {report.unmatched[0].key}: {report.unmatched[0].reason})")
            # (an explicit strength 0 is the caller's choice: a no-op merge they asked for)
            if not allow_empty and changes == 0 and strength != 0:
                why = ("it holds no LoRA modules" if not lora.groups else
                       f"its {report.applied} modules have rank 0 or all-zero factors")
                raise LoraExtError(f"{path}: this LoRA changes nothing ({why}); nothing written "
                                   "(--allow-empty writes the base unchanged)")
            reports.append(report)
            for line in report.lines():
                log(line)
        # W0 + sum(s * delta) in fp32, rounded once into the stored dtype.
        for t, (dw, db) in per_target.items():
            w0 = ckpt.read(t, "weight")
            ckpt.write(t, "weight", finite_result(w0, w0.float() + dw.reshape(w0.shape), f"{t.component}:{t.module}.weight"))
            if db is not None:
                b0 = ckpt.read(t, "bias")
                ckpt.write(t, "bias", finite_result(b0, b0.float() + db.reshape(b0.shape), f"{t.component}:{t.module}.bias"))
        ckpt.save(out)
        for note in getattr(ckpt, "save_notes", ()):
            log(note)
        log(f"wrote {out}: {len(per_target)} modules changed")
        return reports
    finally:
        ckpt.close()


def _label(family: str) -> str:
    from .detect import _label as label

    return label(family)


def _check_base(lora, detected, family: str) -> None:
    if family not in ("sd1", "sd2", "sdxl"):
        return  # a custom-size model: per-module shape checks decide
    if detected.name in ("sd1", "sd2", "sdxl"):
        if detected.name != family:
            raise BaseModelMismatch(
                f"{lora.path}: this is an {detected.label} LoRA ({detected.evidence}), "
                f"but the checkpoint is {LABELS[family]}"
            )
    elif detected.name != "unknown":
        raise BaseModelMismatch(f"{lora.path}: this is a {detected.label} LoRA ({detected.evidence}); it cannot be applied to {LABELS[family]}")


__all__ = ["merge", "parse_lora_arg", "check_output_path", "LoraReport", "LoraExtError", "torch"]
