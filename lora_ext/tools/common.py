"""What the LoRA tools share: where modules live, deltas of input LoRAs, reports, ulp counts."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..checkpoint import open_checkpoint
from ..deltas import binding_deltas
from ..detect import LABELS, detect_base_model
from ..errors import AdapterError, BaseModelMismatch, LoraExtError
from ..keys import KeyMap, Target
from ..layouts import arch_keymap, arch_layout
from ..merge import _check_base, parse_lora_arg
from ..network import load_lora

Tensor = torch.Tensor
Log = Optional[Callable[[str], None]]


def module_name(t: Target) -> str:
    return f"{t.component}:{t.module}"


# ---------------------------------------------------------------------------------------------
# reports
@dataclass
class Row:
    """One module in a tool's report."""

    module: str  # "unet:down_blocks.0.attentions.0.proj_in"
    status: str  # what happened: extracted, unchanged, skipped, transferred, kept, ...
    rank: Optional[int] = None
    energy: Optional[float] = None  # fraction of the module's change (squared norm) kept
    detail: str = ""
    values: dict = field(default_factory=dict)  # tool-specific numbers (similarity, distances, ...)

    def line(self) -> str:
        parts = [f"  {self.module}", self.status]
        if self.rank is not None:
            parts.append(f"rank {self.rank}")
        if self.energy is not None:
            parts.append(f"energy {100 * self.energy:.3f}%")
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)

    def as_dict(self) -> dict:
        d = {"module": self.module, "status": self.status, "rank": self.rank, "energy": self.energy,
             "detail": self.detail}
        d.update(self.values)
        return d


@dataclass
class Report:
    """What a tool did: a summary, one row per module, and every input key not used."""

    tool: str
    out: str = ""
    summary: list = field(default_factory=list)  # lines
    rows: list = field(default_factory=list)  # [Row]
    unmatched: list = field(default_factory=list)  # [(source path, Unmatched)]
    values: dict = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)

    def lines(self, per_module: bool = True) -> list:
        out = list(self.summary)
        if per_module and self.rows:
            out.append("modules:")
            out.extend(r.line() for r in self.rows)
        if self.unmatched:
            out.append(f"{len(self.unmatched)} input keys not used:")
            out.extend(f"  {src}: {u.key}: {u.reason}" for src, u in self.unmatched)
        return out

    def as_dict(self) -> dict:
        return {"tool": self.tool, "out": self.out, "summary": self.summary, **self.values,
                "modules": [r.as_dict() for r in self.rows],
                "unmatched": [{"source": s, **u.as_dict()} for s, u in self.unmatched]}

    def write_json(self, path) -> None:
        with open(os.fspath(path), "w", encoding="utf-8") as fh:
            json.dump(self.as_dict(), fh, indent=1)


def emit(log: Log, report: Report) -> None:
    if log is not None:
        for line in report.lines():
            log(line)


# ---------------------------------------------------------------------------------------------
# where modules live
@dataclass
class Model:
    """The module layout LoRAs are resolved against, and (when a checkpoint was given) its weights."""

    family: str
    layout: dict
    keymap: KeyMap
    ckpt: object = None  # a Checkpoint, or None: shapes only

    @property
    def label(self) -> str:
        return LABELS.get(self.family, self.family)

    def info(self, t: Target):
        return self.layout[t.component][t.module]

    def read(self, t: Target, param: str) -> Optional[Tensor]:
        """The checkpoint's tensor, or zeros of the module's shape when there is no checkpoint."""
        if self.ckpt is not None:
            return self.ckpt.read(t, param)
        info = self.info(t)
        shape = info.weight_shape if param == "weight" else info.bias_shape
        return None if shape is None else torch.zeros(shape)

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()


def open_model(base=None, loras=(), *, what: str = "this LoRA") -> Model:
    """The checkpoint ``base``, or the full-size layout the (already loaded) ``loras`` were made for."""
    if base is not None:
        ckpt = open_checkpoint(base)
        label = LABELS.get(ckpt.family, ckpt.family)
        return Model(ckpt.family, ckpt.layout, KeyMap(ckpt.layout, label=f"this checkpoint ({label})",
                                                        naming=ckpt.naming), ckpt)
    names = set()
    for lora in loras:
        found = detect_base_model(lora)
        if not found.supported:
            raise BaseModelMismatch(
                f"{lora.path}: cannot tell which SD1.x/SD2.x/SDXL model {what} is for ({found.evidence}); "
                "pass --base with a checkpoint of that model")
        names.add(found.name)
    if len(names) != 1:
        if not names:
            raise LoraExtError("no LoRA given")
        raise BaseModelMismatch(f"the LoRAs are for different base models: {', '.join(sorted(LABELS[n] for n in names))}")
    name = names.pop()
    return Model(name, arch_layout(name), arch_keymap(name))


def check_base(lora, model: Model) -> None:
    _check_base(lora, detect_base_model(lora), model.family)


# ---------------------------------------------------------------------------------------------
# input LoRAs
@dataclass
class Source:
    path: str
    weight: float = 1.0
    blocks: Optional[dict] = None  # block id -> multiplier (lbw semantics, see block_multiplier)
    lora: object = None
    bindings: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)


def parse_source_arg(arg: str) -> tuple:
    """``PATH[:WEIGHT][:lbw=PRESET|v,v,...]`` -> (path, weight, blocks or None)."""
    blocks = None
    head, sep, spec = arg.rpartition(":lbw=")
    if sep:
        from ..blocks import parse_lbw

        blocks = parse_lbw(spec)
        arg = head
    path, weight = parse_lora_arg(arg)
    return path, weight, blocks


def load_source(path, model: Optional[Model] = None, *, weight: float = 1.0, blocks=None, lora=None) -> Source:
    lora = lora if lora is not None else load_lora(path)
    src = Source(os.fspath(path), float(weight), blocks, lora)
    if model is not None:
        check_base(lora, model)
        res = lora.resolve(model.keymap)
        src.bindings, src.unmatched = res.bindings, list(res.unmatched)
        if not src.bindings and lora.groups:
            u = src.unmatched[0]
            raise BaseModelMismatch(f"{path}: nothing in this LoRA fits {model.label} ({u.key}: {u.reason})")
    return src


def block_multiplier(blocks: Optional[dict], t: Target) -> float:
    """lbw semantics: text encoders take ``BASE``; UNet modules outside the numbered blocks keep 1."""
    if not blocks:
        return 1.0
    if t.component != "unet":
        from ..blocks import te_weight

        return float(te_weight(blocks, t.component))  # CLIP / T5 (DiT vectors) over BASE
    if t.block == "BASE":
        return 1.0
    return float(blocks.get(t.block, 1.0))


def lowrank_parts(binding) -> Optional[list]:
    """[(target, up (out, r) fp32 with the scale folded in, down (r, in) fp32)] or None.

    None when the adapter is not a plain low-rank product (LoHa, LoKr, DoRA, OFT, ...). A
    candidate spanning several modules (OpenCLIP's fused q/k/v) is split by output rows.
    """
    adapter = binding.adapter
    fn = getattr(adapter, "lowrank", None)
    lr = fn() if fn is not None and not adapter.weight_dependent else None
    if lr is None:
        return None
    up, down, scale = lr
    up2, down2 = up.flatten(1).float() * float(scale), down.flatten(1).float()
    out, row = [], 0
    for t in binding.targets:
        n = _rows(binding, t)
        out.append((t, up2[row:row + n], down2))
        row += n
    return out


def _rows(binding, t: Target) -> int:
    total = binding.candidate.weight_shape[0]
    return total // len(binding.targets)


def dense_deltas(binding, model: Model) -> dict:
    """{target: (weight delta, bias delta)} fp32 at strength 1, from the model's weights (or zeros)."""
    if binding.adapter.weight_dependent and model.ckpt is None:
        raise AdapterError(f"{binding.adapter.type_name} depends on the base weights; pass --base with the checkpoint")
    return binding_deltas(binding, model.read)


def group_keys(binding) -> list:
    return sorted(binding.group.keys.values())


# ---------------------------------------------------------------------------------------------
# rounding steps
_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def _ordered(t: Tensor) -> Tensor:
    """Float bits as integers that order like the values (so a difference counts ulps)."""
    i = t.contiguous().view(_INT_OF[t.dtype]).long()
    bits = torch.finfo(t.dtype).bits
    sign = 1 << (bits - 1)
    return torch.where(i < 0, -(i & (sign - 1)), i)


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """How many representable values of the dtype lie between ``a`` and ``b`` (elementwise)."""
    if a.dtype != b.dtype or a.dtype not in _INT_OF:
        raise TypeError(f"ulp distance needs two tensors of one float dtype, got {a.dtype} and {b.dtype}")
    return (_ordered(a) - _ordered(b)).abs()


def rounding_step(t: Tensor) -> Tensor:
    """The spacing of the dtype at each element's magnitude (one ulp), as fp32/fp64."""
    a = t.abs()
    up = torch.nextafter(a, torch.full_like(a, float("inf")))
    return (up.double() - a.double())
