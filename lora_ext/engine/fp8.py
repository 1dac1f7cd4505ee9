"""Fusing into fp8 weights (Flux / SD3.5 fp8 checkpoints) and getting them back bit-exactly.

An fp8 weight ``W8`` (``float8_e4m3fn`` or ``float8_e5m2``, optionally with ComfyUI's
``scale_weight``: the real weight is ``W8 * s``) is fused the way the issue asks: the fp32
upcast is dequantised (``W = W8.float() * s``), the fp32 sum of the deltas ``D`` is taken at
that ``W`` (so DoRA/OFT/IA3 see the real weight), added, requantised with the same scale and
rounded **once** to the storage dtype::

    Wf8 = round((W + D) / s)

``round`` is round-to-nearest-even by default (``tensor.to(float8)``, what Forge and kohya's
``flux_merge_lora`` do), or ComfyUI's seeded stochastic rounding when asked for (see
:func:`round_to`). A value that rounds out of range (``e4m3fn`` has no infinity: NaN) is an
error naming the module, never a silent NaN; the stochastic modes saturate, as ComfyUI does.

The restore record is the one of ``record``: the estimate ``E = (Wf8 * s - D) / s`` (the
deltas recomputed from the fused weight; a few fixed-point steps for the weight-dependent
types) rounded to fp8 is ``W8`` for most elements; the record keeps the positions where it is
not (sparse), or low-bit codes of every element plus what they still miss, or a full copy
(1 byte per element, the ceiling) when that is smaller, chosen per weight. With round-to-
nearest the estimate is off by at most half an fp8 ulp, so few exceptions remain; stochastic
rounding moves a value up to a whole ulp, so ~a third of the elements need a 1-bit code.
"""
from __future__ import annotations

import zlib
from typing import Optional

import torch

from ..errors import LoraExtError
from .contrib import FIXED_POINT_ITERATIONS, delta_sum
from .record import FLOAT8, check_fused, decode, encode, full_record, same_bits, upcast

Tensor = torch.Tensor

# "nearest": round to nearest even (Forge, kohya, A1111). The two stochastic modes are
# ComfyUI's seeded stochastic rounding (comfy/float.py ``stochastic_rounding``), reimplemented:
#  "stochastic":       with comfy-kitchen installed (ComfyUI's requirements pin it): one byte of
#                      noise per element, ``torch.randint(0, 256, uint8)`` over the whole tensor;
#  "stochastic-torch": ComfyUI without comfy-kitchen, and versions before it: half-precision
#                      ``torch.rand`` noise drawn in slices of about 4096 x 4096 elements.
ROUNDINGS = ("nearest", "stochastic", "stochastic-torch")

# exponent bits, mantissa bits, exponent bias of the formats ComfyUI rounds stochastically
_FORMAT = {}
if hasattr(torch, "float8_e4m3fn"):
    _FORMAT[torch.float8_e4m3fn] = (4, 3, 7)
if hasattr(torch, "float8_e5m2"):
    _FORMAT[torch.float8_e5m2] = (5, 2, 15)
_SLICE = 4096 * 4096  # elements per noise slice of "stochastic-torch"

# module attributes that mean "the stored weight is multiplied by something we do not know"
_OTHER_SCALES = ("weight_scale", "weight_scale_inv", "weight_scale_2", "scales", "scale", "weight_global_scale")


def is_fp8(dtype) -> bool:
    return dtype in FLOAT8


def comfy_seed(key: str) -> int:
    """The seed ComfyUI derives from a weight's key (``comfy.utils.string_to_seed``): the
    reflected CRC-32 of the characters' code points (``zlib.crc32`` of the Latin-1 bytes)."""
    try:
        return zlib.crc32(key.encode("latin-1"))
    except UnicodeEncodeError:  # code points above 255 are XORed in whole, as ComfyUI does
        crc = 0xFFFFFFFF
        for ch in key:
            crc ^= ord(ch)
            for _ in range(8):
                crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
        return crc ^ 0xFFFFFFFF


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise LoraExtError(f"unknown rounding {rounding!r} (one of {', '.join(ROUNDINGS)})")
    return rounding


# --- rounding --------------------------------------------------------------------------------
def _stochastic(v: Tensor, dtype, noise: Tensor) -> Tensor:
    """ComfyUI's stochastic rounding of ``v`` onto ``dtype``'s grid, in half precision as
    ComfyUI computes it; ``noise``: uniform in [0, 1), half. Returns half values on the grid."""
    e_bits, m_bits, bias = _FORMAT[dtype]
    h = v.half()
    mag = h.abs()
    sgn = torch.where(mag == 0, 0, torch.sign(h))  # zero (either sign) becomes +0
    expo = torch.clamp(torch.floor(torch.log2(mag)) + bias, 0, 2 ** e_bits - 1)
    normal = expo != 0
    # the mantissa counted in units of the last place (subnormals: of the smallest step)
    steps = torch.where(normal, (mag / (2.0 ** (expo - bias)) - 1.0) * (2 ** m_bits),
                        mag / (2.0 ** (1 - bias - m_bits)))
    steps = steps + noise
    frac = steps.floor() / (2 ** m_bits)
    out = sgn * torch.where(normal, (2.0 ** (expo - bias)) * (1.0 + frac), (2.0 ** (1 - bias)) * frac)
    info = torch.finfo(dtype)
    return out.clamp_(info.min, info.max)


def round_to(v: Tensor, dtype, rounding: Optional[tuple] = None) -> Tensor:
    """``v`` (fp32) rounded to ``dtype``. ``rounding``: None / ("nearest", key) for round to
    nearest even, or (stochastic mode, key): ComfyUI's seeded stochastic rounding with the seed
    ``comfy_seed(key)``; applies to fp8 only (ComfyUI casts fp16/bf16/fp32 plainly too).

    The stochastic result depends on the device's random number generator (CPU and CUDA draw
    different numbers from the same seed): deterministic per key, seed and device only.
    """
    mode = "nearest" if rounding is None else rounding[0]
    if mode == "nearest" or dtype not in _FORMAT:
        return v.to(dtype)
    gen = torch.Generator(device=v.device)
    gen.manual_seed(comfy_seed(rounding[1]))
    if mode == "stochastic":
        noise = torch.randint(0, 256, v.size(), dtype=torch.uint8, device=v.device, generator=gen)
        return _stochastic(v, dtype, noise.to(torch.float16) * (1.0 / 256.0)).to(dtype)
    if mode != "stochastic-torch":
        raise LoraExtError(f"unknown rounding {mode!r}")
    out = torch.empty_like(v, dtype=dtype)
    if v.dim() == 0:
        return _stochastic(v, dtype, torch.rand((), dtype=torch.float16, device=v.device, generator=gen)).to(dtype)
    per = max(1, round(v.shape[0] / max(1, v.numel() / _SLICE)))  # rows per slice, as ComfyUI cuts them
    for i in range(0, v.shape[0], per):
        part = v[i:i + per]
        noise = torch.rand(part.size(), dtype=torch.float16, device=v.device, generator=gen)
        out[i:i + per].copy_(_stochastic(part, dtype, noise))
    return out


# --- scales ----------------------------------------------------------------------------------
def weight_scale(module, w: Tensor) -> tuple:
    """(scale, None): the factor the stored fp8 weight is dequantised with (None: 1), shaped to
    broadcast against it; or (None, why) when the module's dequantisation is not one we can
    reproduce exactly (its LoRAs then run on the fly)."""
    for name in _OTHER_SCALES:
        if isinstance(getattr(module, name, None), torch.Tensor):
            return None, (f"{w.dtype} weight with a '{name}' tensor (a scaling convention lora-ext does not "
                          "fuse into; ComfyUI's scale_weight is fused)")
    s = getattr(module, "scale_weight", None)
    if s is None:
        return None, None
    if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.device.type == "meta":
        return None, f"{w.dtype} weight with a scale_weight that is not a float tensor"
    s = s.detach()
    if s.numel() == 1:
        scale = s.float().reshape([1] * max(1, w.dim()))
    elif w.dim() >= 1 and s.numel() == w.shape[0]:
        scale = s.float().reshape(w.shape[0], *([1] * (w.dim() - 1)))
    else:
        return None, (f"{w.dtype} weight with a scale_weight of shape {tuple(s.shape)} (per-tensor and "
                      "per-output-row scales are fused)")
    if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
        return None, f"{w.dtype} weight with a zero or non-finite scale_weight"
    return scale.to(w.device), None


def nonfinite(t: Tensor) -> Tensor:
    """NaN/Inf mask of an fp8 tensor, from its bits (torch has no isfinite for fp8 on CPU)."""
    if t.dtype not in _FORMAT:
        return ~torch.isfinite(t)
    e_bits, m_bits, _ = _FORMAT[t.dtype]
    mag = torch.bitwise_and(t.view(torch.uint8), 0x7F)
    if t.dtype == torch.float8_e4m3fn:  # no infinities; NaN is all ones
        return mag == 0x7F
    top = ((1 << e_bits) - 1) << m_bits  # exponent all ones: Inf or NaN
    return torch.bitwise_and(mag, top) == top


def dequantise(w8: Tensor, scale: Optional[Tensor]) -> Tensor:
    """fp32 value of a stored fp8 weight (a new tensor)."""
    w = upcast(w8.detach())
    return w if scale is None else w.mul_(scale)


# --- fuse and restore ------------------------------------------------------------------------
def estimate(items, wf: Tensor, scale: Optional[Tensor]) -> Tensor:
    """fp32 estimate of the stored pristine weight from the fused ``wf`` (what restore uses)."""
    w = dequantise(wf, scale)
    lin = [it for it in items if not it[1].weight_dependent]
    dep = [it for it in items if it[1].weight_dependent]
    base = w.sub_(delta_sum(lin, w)) if lin else w
    est = base
    for _ in range(FIXED_POINT_ITERATIONS if dep else 0):
        est = base - delta_sum(dep, est)
        if not bool(torch.isfinite(est).all()):
            est = base
            break
    return est if scale is None else est / scale


def fuse(param: Tensor, w0: Tensor, items: tuple, rounding: Optional[tuple] = None,
         scale: Optional[Tensor] = None, what: str = "weight"):
    """Write ``round((W0*s + sum s_i*delta_i) / s)`` into ``param``; returns (record, changed).

    Everything that can fail runs before ``param`` is written.
    """
    dtype = w0.dtype
    w32 = dequantise(w0, scale)
    d = delta_sum(items, w32, check=True)
    v = w32.add_(d)
    del d
    if scale is not None:
        v.div_(scale)
    wf = round_to(v, dtype, rounding)
    bad = nonfinite(wf)  # a finite value that became Inf/NaN (e4m3fn: torch saturates at 448)
    if bool(bad.any()):
        n = int(torch.isfinite(v[bad]).sum())
        if n:
            info = torch.finfo(dtype)
            raise LoraExtError(f"{what}: the fused value leaves {dtype}'s range (|x| <= {info.max:g}) at "
                               f"{n} elements; weights are left as they were")
    del v, bad
    if same_bits(wf, w0):
        rec = None
    else:
        rec = encode(w0, wf, estimate(items, wf, scale), items)
        if rec.full is None and scale is not None:
            rec.scale = scale.clone()
            if rec.nbytes >= w0.numel() * w0.element_size():  # a copy is the ceiling
                rec = full_record(w0, items)
        rec.rounding = "nearest" if rounding is None else rounding[0]
    changed = not same_bits(wf, param.detach())
    if changed:
        param.detach().copy_(wf)
    return rec, changed


def restore(rec, wf: Tensor, what: str = "weight") -> Tensor:
    """The pristine stored weight (a new tensor) from the fused ``wf`` and its record."""
    if rec.full is not None:
        return rec.full.clone()
    check_fused(rec, wf, what)
    return decode(rec, estimate(rec.items, wf.detach(), rec.scale), what)


def refuse(param: Tensor, rec, items: tuple, what: str = "weight", *, rounding=None, scale=None):
    """``fuse.refuse`` for an fp8 weight: from its current state to the fusion of ``items``."""
    if rec is None:
        if not items:
            return None, False
        return fuse(param, param.detach(), items, rounding, scale, what)
    w0 = restore(rec, param, what)
    if not items:
        param.detach().copy_(w0)
        return None, True
    return fuse(param, w0, items, rounding, scale, what)


__all__ = ["ROUNDINGS", "comfy_seed", "round_to", "weight_scale", "fuse", "restore", "refuse", "is_fp8"]
