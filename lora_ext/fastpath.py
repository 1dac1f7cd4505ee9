"""``inspect`` of a safetensors LoRA without torch: the same report, from the header alone.

``inspect`` needs no tensor maths: types, ranks, alphas and module shapes come from the tensor
names and shapes, detection and binding compare shapes with the full-size layouts. This module
does that work without importing torch (whose import alone is most of a small file's
``inspect``):

* the header is read by ``io`` (json + struct, every check of the full path);
* the few values ``inspect`` needs (alphas, IA3's ``on_input``) are decoded with ``struct``
  from their bytes; the other tensors stay shapes (:class:`ShapeT`);
* each key group is typed by the registered types' claiming rules and the shape rules of the
  built-in types LoRA, LoHa, LoKr, full, norm and IA3, with DoRA on top (:func:`_build`),
  which mirror ``adapters/*.py``;
* binding uses the real ``keys.KeyMap`` over the full-size layouts from ``fastdata``.

Whatever this reading does not cover exactly, it hands back to the full path (``load`` returns
None, or :class:`NeedsFullPath` is raised while binding): another file type, a type other than
those above (OFT, BOFT, GLoRA, PEFT OFT ...), a group no type claims that would go to the
structural auto-detector, any tensor or alpha the full path would refuse (NaN/Inf, complex,
truncated, a bad alpha, shapes an adapter type refuses: the full path words the error), a
third-party adapter plugin, stale ``fastdata``. So the report is the full path's, always;
``tests/test_fast_start.py`` compares the two on many files.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import struct
import sys
import weakref
from typing import Optional

from .errors import LoraExtError
from .io import _ST_DTYPES
from .keys import KeyMap, normalise_key, split_key
from .metadata import peft_config_for as _config_for, peft_pattern_value as _pattern_value
from .shapes import prod, shapes_compatible

COMMON_NAMES = frozenset({"alpha", "dora_scale"})
MAX_ALPHA = None  # set from metadata on first use (kept in one place: metadata.MAX_ALPHA)
EPS32 = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps
#: tensors of at most this many values are read in shape-only mode (as ``library.SMALL``)
SMALL = 64


class NeedsFullPath(Exception):
    """This file (or group) needs the full path (torch) for an exact report."""


# --- shapes and small values --------------------------------------------------------------------
class ShapeT:
    """A tensor as the header describes it: ``shape``, ``dtype_name``, and its values when
    they were read (``values``: a tuple of Python numbers, None when not read)."""

    __slots__ = ("shape", "dtype_name", "values")

    def __init__(self, shape: tuple, dtype_name: str, values=None):
        self.shape = tuple(shape)
        self.dtype_name = dtype_name
        self.values = values

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def reshape_flat(self) -> "ShapeT":
        return ShapeT((self.numel(),), self.dtype_name, self.values)


_FLOAT = {"F16": "e", "F32": "f", "F64": "d"}
_INT = {"I8": "b", "I16": "h", "I32": "i", "I64": "q", "U8": "B"}
_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
         "I64": 8, "U64": 8, "F64": 8}


def _decode(dtype: str, data: bytes):
    """Values of a float or int tensor as Python numbers (little-endian), or None when this
    dtype is not decoded here."""
    if dtype in _FLOAT:
        return struct.unpack(f"<{len(data) // struct.calcsize(_FLOAT[dtype])}{_FLOAT[dtype]}", data)
    if dtype == "BF16":
        n = len(data) // 2
        return struct.unpack(f"<{n}f", b"".join(b"\0\0" + data[2 * i:2 * i + 2] for i in range(n)))
    if dtype in _INT:
        return struct.unpack(f"<{len(data) // struct.calcsize(_INT[dtype])}{_INT[dtype]}", data)
    return None


def _table(pred) -> bytes:
    return bytes(1 if pred(b) else 0 for b in range(256))


# the byte of each element that holds its exponent's top bits: every NaN/Inf (and only the
# very largest finite values) has these bits set; such an element sends the file to the full path
_SUSPECT = {
    "F16": (2, 1, _table(lambda b: b & 0x7C == 0x7C)),
    "BF16": (2, 1, _table(lambda b: b & 0x7F == 0x7F)),
    "F32": (4, 3, _table(lambda b: b & 0x7F == 0x7F)),
    "F64": (8, 7, _table(lambda b: b & 0x7F == 0x7F)),
}
_NO_CHECK = frozenset({"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"})


def _plainly_finite(dtype: str, data: bytes) -> bool:
    """True when no element can be NaN or Inf (a cheap bytewise test); False when one might
    be, or for a dtype not tested here (the full path then decides)."""
    if dtype in _NO_CHECK:
        return True
    test = _SUSPECT.get(dtype)
    if test is None:
        return False
    step, at, table = test
    return 1 not in data[at::step].translate(table)


# --- shape-only adapters (mirroring adapters/*.py) ----------------------------------------------
class _Bad(Exception):
    """The group's tensors are something an adapter type refuses: the full path words it."""


def _expect(cond) -> None:
    if not cond:
        raise _Bad()


_prod = prod


class ShapeAdapter:
    """What ``inspect`` asks of an adapter: type name, rank, alpha, weight shape, fits."""

    weight_dependent = False
    scale_override = None

    def __init__(self, type_name: str, tensors: dict, rank=None, shape=None, fits=None, fit_key=None):
        self.type_name = type_name
        self.tensors = tensors
        self.rank = rank
        self._shape = shape
        self._fits = fits
        # everything ``fits`` depends on: adapters with equal keys fit the same modules
        self.fit_key = ("shape", shape) if fits is None else fit_key

    @property
    def alpha(self):
        a = self.tensors.get("alpha")
        if a is None:
            return None
        if a.values is None or len(a.values) != 1:
            raise NeedsFullPath("alpha not read")
        return float(a.values[0])

    def natural_shape(self):
        return self._shape

    def weight_shape(self):
        return self._shape

    def fits(self, target_shape) -> bool:
        if self._fits is not None:
            return self._fits(tuple(target_shape))
        ws = self._shape
        return True if ws is None else shapes_compatible(ws, target_shape)


def _need(tensors, name, ndims) -> ShapeT:
    t = tensors.get(name)
    _expect(t is not None and t.dim() in ndims)
    return t


def _lora(t):
    up = _need(t, "lora_up.weight", (2, 3, 4, 5)).shape
    down = _need(t, "lora_down.weight", (2, 3, 4, 5)).shape
    mid = t.get("lora_mid.weight")
    r = down[0]
    _expect(up[1] == r and _prod(up[2:]) == 1)
    out = up[0]
    if mid is not None:
        m = mid.shape
        _expect(len(m) >= 3 and m[0] == r and m[1] == r and _prod(down[2:]) == 1)
        shape = (out, down[1], *m[2:])
    else:
        shape = (out, *down[1:])
    b = t.get("lora_up.bias")
    _expect(b is None or b.numel() == out)
    return ShapeAdapter("lora", t, int(r), tuple(int(d) for d in shape))


def _loha_half(t, i):
    a = _need(t, f"hada_w{i}_a", (2, 3, 4, 5)).shape
    b = _need(t, f"hada_w{i}_b", (2, 3, 4, 5)).shape
    c = t.get(f"hada_t{i}")
    if c is None:
        _expect(a[1] == b[0])
        return (int(a[0]), *(int(d) for d in b[1:]))
    _expect(len(a) == 2 and len(b) == 2)
    _expect(c.dim() >= 3 and c.shape[0] == a[0] and c.shape[1] == b[0])
    return (int(a[1]), int(b[1]), *(int(d) for d in c.shape[2:]))


def _loha(t):
    s1, s2 = _loha_half(t, 1), _loha_half(t, 2)
    if s1 != s2:
        flat = [s if len(s) == 2 else (s[0], s[1] * _prod(s[2:])) for s in (s1, s2)]
        _expect(flat[0] == flat[1])
        s1 = s1 if len(s1) > 2 else s2
    return ShapeAdapter("loha", t, int(t["hada_w1_b"].shape[0]), s1)


_W1 = ("lokr_w1", "lokr_w1_a", "lokr_w1_b")
_W2 = ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_LOKR_ALL = frozenset(_W1 + _W2)


def _lokr_claims(names) -> bool:
    n = frozenset(names) - COMMON_NAMES
    if not n or not n <= _LOKR_ALL:
        return False
    w1 = {"lokr_w1"} == n & set(_W1) or {"lokr_w1_a", "lokr_w1_b"} == n & set(_W1)
    w2_names = n & set(_W2)
    w2 = w2_names == {"lokr_w2"} or w2_names in ({"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"})
    return bool(w1 and w2)


def _lokr(t):
    _expect(_lokr_claims(frozenset(t)))
    if "lokr_w1" in t:
        w1 = _need(t, "lokr_w1", (2,)).shape
        r1 = None
    else:
        a = _need(t, "lokr_w1_a", (2,)).shape
        b = _need(t, "lokr_w1_b", (2,)).shape
        _expect(a[1] == b[0])
        w1, r1 = (a[0], b[1]), int(b[0])
    if "lokr_w2" in t:
        w2 = _need(t, "lokr_w2", (2, 3, 4, 5)).shape
        r2 = None
    else:
        a = _need(t, "lokr_w2_a", (2,)).shape
        b = _need(t, "lokr_w2_b", (2, 3, 4, 5)).shape
        c = t.get("lokr_t2")
        if c is None:
            _expect(a[1] == b[0])
            w2 = (a[0], *b[1:])
        else:
            _expect(len(b) == 2)
            _expect(c.dim() >= 3 and c.shape[0] == a[0] and c.shape[1] == b[0])
            w2 = (a[1], b[1], *c.shape[2:])
        r2 = int(b[0])
    shape = (int(w1[0] * w2[0]), int(w1[1] * w2[1]), *(int(d) for d in w2[2:]))
    return ShapeAdapter("lokr", t, r2 if r2 is not None else r1, shape)


def _full(t):
    diff = t.get("diff")
    _expect(diff is not None and diff.dim() >= 1)
    db = t.get("diff_b")
    _expect(db is None or db.numel() == diff.shape[0])
    return ShapeAdapter("full", t, None, tuple(int(d) for d in diff.shape))


def _bias_only(t):
    db = t.get("diff_b")
    _expect(db is not None and db.dim() == 1)
    n = int(db.numel())
    return ShapeAdapter("full (bias only)", t, None, None, fits=lambda s: int(s[0]) == n, fit_key=("bias", n))


def _norm(t):
    w = t.get("w_norm")
    _expect(w is not None)
    b = t.get("b_norm")
    _expect(b is None or b.numel() == w.numel())
    shape, n = tuple(int(d) for d in w.shape), w.numel()
    return ShapeAdapter("norm", t, None, shape, fits=lambda s: s == shape or (len(s) == 1 and s[0] == n),
                        fit_key=("norm", shape, n))


def _ia3(t):
    w = t.get("weight")
    _expect(w is not None and sum(1 for d in w.shape if d != 1) <= 1)
    oi = t.get("on_input")
    _expect(oi is None or oi.numel() == 1)
    if oi is not None and (oi.values is None or len(oi.values) != 1):
        raise NeedsFullPath("on_input not read")
    on_input = bool(oi is not None and float(oi.values[0]) != 0)
    n = int(w.numel())
    return ShapeAdapter("ia3", t, None, None, fits=lambda s: len(s) >= 2 and s[1 if on_input else 0] == n,
                        fit_key=("ia3", on_input, n))


_BUILDERS = {("lora", "lora_ext.adapters.lora"): _lora, ("loha", "lora_ext.adapters.loha"): _loha,
             ("lokr", "lora_ext.adapters.lokr"): _lokr, ("full", "lora_ext.adapters.full"): _full,
             ("full (bias only)", "lora_ext.adapters.full"): _bias_only,
             ("norm", "lora_ext.adapters.norm"): _norm, ("ia3", "lora_ext.adapters.ia3"): _ia3}


def dora_axis(scale_shape, weight_shape):
    """``adapters.dora.dora_axis`` (no forced axis): the reading, or _Bad."""
    s, w = tuple(scale_shape), tuple(weight_shape)
    out, in_ = w[0], (w[1] if len(w) > 1 else None)
    n = _prod(s)
    cands = []
    if len(s) == 1:
        if n == out:
            cands.append(("out", 0.0))
        if n == in_:
            cands.append(("in", EPS32))
    else:
        if s[0] == out and n == out:
            cands.append(("out", EPS32))
        if s[0] == 1 and len(s) > 1 and s[1] == n:
            if n == in_:
                cands.append(("in", EPS32))
            if n == out and len(w) > 2 and ("out", EPS32) not in cands:
                cands.append(("out", 0.0))
    _expect(cands)
    return cands[0]


def _with_dora(inner: ShapeAdapter, scale: ShapeT) -> ShapeAdapter:
    s = scale.shape
    _expect(scale.numel() > 0 and sum(1 for d in s if d != 1) <= 1)
    ws = inner.weight_shape()
    if ws is not None and len(ws) >= 2 and (len(s) == 1 or len(s) == len(ws)):
        dora_axis(s, ws)

    def fits(target):
        if not inner.fits(target) or len(target) < 2:
            return False
        try:
            dora_axis(s, target)
        except _Bad:
            return False
        return True

    a = ShapeAdapter(f"{inner.type_name}+dora", dict(inner.tensors, dora_scale=scale), inner.rank, ws, fits=fits,
                     fit_key=("dora", inner.fit_key, s))
    a.inner = inner
    a.weight_dependent = True
    return a


# --- the file as groups ---------------------------------------------------------------------------
def _literals(pattern) -> tuple:
    """(text every match starts with, text every match ends with when the pattern ends at the
    end of the string, else ""): a key holding the first and ending with the second may match."""
    try:
        from re import _parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover
        import sre_parse
    from re import _constants as c

    if pattern.flags & (re.IGNORECASE | re.VERBOSE | re.MULTILINE):
        return "", ""

    def lead(items, out) -> bool:
        for op, av in items:
            if op is c.LITERAL:
                out.append(chr(av))
            elif op is c.SUBPATTERN:
                if not lead(av[-1], out):
                    return False
            else:
                return False
        return True

    def tail(items, out) -> bool:
        for op, av in reversed(list(items)):
            if op is c.LITERAL:
                out.append(chr(av))
            elif op is c.SUBPATTERN:
                if not tail(av[-1], out):
                    return False
            else:
                return False
        return True

    try:
        items = list(sre_parse.parse(pattern.pattern, pattern.flags))
    except Exception:  # noqa: BLE001
        return "", ""
    first, last = [], []
    lead(items, first)
    if items and items[-1][0] is c.AT and items[-1][1] is c.AT_END:
        tail(items[:-1], last)
    return "".join(first), "".join(reversed(last))


@functools.lru_cache(maxsize=8)
def _grouper(names: tuple):
    """(every tensor name, as a set, longest length, the (start, end) texts of ``normalise_key``'s
    rules: a key that holds no rule's start text and ends with its end text is left as it is;
    None when a rule has no start text)."""
    from . import keys

    all_names = tuple(set(keys._BASE_NAMES) | set(names))
    patterns = [keys._DIFF_M, keys._PROCESSOR, keys._XLABS] + [p for p, _ in keys._REWRITES]
    pairs = tuple(sorted({_literals(p) for p in patterns}))
    if any(len(first) < 3 for first, _ in pairs):
        pairs = None  # no cheap test: every key goes through normalise_key
    return all_names, frozenset(all_names), max(map(len, all_names)), pairs


def group_keys(keys, names) -> dict:
    """``keys.group_keys`` (the same groups): a key runs through ``normalise_key``'s rules only
    when it holds one of the texts they start with, and the tensor name is found by its suffix
    instead of trying every name."""
    all_names, nameset, maxlen, pairs = _grouper(tuple(sorted(set(names))))
    groups: dict = {}
    for key in keys:
        if pairs is None or any(first in key and key.endswith(last) for first, last in pairs):
            k = normalise_key(key)
        else:
            k = key
        i = k.find(".", max(1, len(k) - maxlen - 1))
        while i != -1 and k[i + 1:] not in nameset:
            i = k.find(".", i + 1)
        if i != -1:
            prefix, name = k[:i], k[i + 1:]
        else:
            prefix, name = split_key(k, all_names)
        g = groups.get(prefix)
        if g is None:
            g = groups[prefix] = {}
        g[name] = key
    return groups



class Group:
    """``network.Group`` as shapes."""

    __slots__ = ("prefix", "keys", "tensors", "adapter", "problem")

    def __init__(self, prefix, keys, tensors):
        self.prefix, self.keys, self.tensors = prefix, keys, tensors
        self.adapter, self.problem = None, ""

    @property
    def names(self) -> frozenset:
        return frozenset(self.keys)


class Unmatched:
    __slots__ = ("key", "reason")

    def __init__(self, key, reason):
        self.key, self.reason = key, reason

    def as_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason}


class _Binding:
    __slots__ = ("group", "adapter", "candidate")

    def __init__(self, group, adapter, candidate):
        self.group, self.adapter, self.candidate = group, adapter, candidate

    @property
    def targets(self):
        return self.candidate.targets


class _Resolution:
    def __init__(self):
        self.bindings, self.unmatched = [], []


_CHOICES = weakref.WeakKeyDictionary()  # keymap -> {(prefix, fit key): keymap.choose(...)}


def _memo(keymap) -> dict:
    memo = _CHOICES.get(keymap)
    if memo is None:
        memo = _CHOICES[keymap] = {}
    return memo


def _choose(keymap, prefix, adapter, memo=None):
    """``keymap.choose(prefix, adapter.fits)``, remembered per key map for adapters that fit
    alike (a library's files repeat the same modules and shapes)."""
    if memo is None:
        memo = _memo(keymap)
    k = (prefix, adapter.fit_key)
    got = memo.get(k)
    if got is None:
        got = memo[k] = keymap.choose(prefix, adapter.fits)
    return got


def bind_group(group, keymap, memo=None):
    """``network.bind_group`` for shape adapters; a group the auto-detector would try raises
    NeedsFullPath."""
    if group.adapter is not None:
        cand, reason = _choose(keymap, group.prefix, group.adapter, memo)
        if cand is None:
            return None, reason
        return _Binding(group, group.adapter, cand), ""
    if group.problem:
        return None, group.problem
    if not keymap.candidates(group.prefix):
        return None, f"unknown adapter type (tensors: {', '.join(sorted(group.names))}) on an unknown module"
    raise NeedsFullPath("a group for the structural auto-detector")


class FastLora:
    """``network.Lora`` as shapes (what ``inspect_any`` reads)."""

    def __init__(self, path, metadata, groups, file_format="safetensors"):
        self.path, self.metadata, self.groups, self.file_format = path, metadata, groups, file_format
        self.models = MODELS

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    def resolve(self, keymap) -> _Resolution:
        res = _Resolution()
        memo = _memo(keymap)
        for group in self.groups.values():
            binding, reason = bind_group(group, keymap, memo)
            if binding is not None:
                res.bindings.append(binding)
            else:
                res.unmatched.extend(Unmatched(k, reason) for k in sorted(group.keys.values()))
        return res


def _type_list(data):
    """[(claims(names) -> bool, builder or None)] in the registered types' claiming order."""
    out = []
    for t in data["types"]:
        req, opt = frozenset(t["required"]), frozenset(t["optional"])
        if t["claims"] == "default":
            def claims(names, req=req, opt=opt):
                names = frozenset(names) - COMMON_NAMES
                return bool(req) and req <= names <= (req | opt)
        elif t["claims"] == "lokr":
            claims = _lokr_claims
        elif t["claims"] == "boft":
            def claims(names):
                return False
        else:
            return None  # a claiming rule not mirrored here
        out.append((claims, _BUILDERS.get((t["name"], t["module"]))))
    return out


@functools.lru_cache(maxsize=1)
def _max_alpha() -> float:
    from .metadata import MAX_ALPHA as m

    return m


def _checked_alpha(t: ShapeT) -> ShapeT:
    """``metadata.checked_alpha``: one real, finite number within MAX_ALPHA (else full path)."""
    if t.numel() != 1 or t.values is None or t.dtype_name not in ("F16", "BF16", "F32", "F64") + tuple(_INT):
        raise NeedsFullPath("alpha")
    v = float(t.values[0])
    if not math.isfinite(v) or abs(v) > _max_alpha():
        raise NeedsFullPath("alpha")
    return t


_CLAIMS: dict = {}


def _claim(names: frozenset, types):
    """(claimed, builder of the first type that claims ``names`` or None, a bias-diff split)."""
    got = _CLAIMS.get((names, id(types)))
    if got is None:
        claimers = [(c, b) for c, b in types if c(names)]
        split = False
        if not claimers and "diff_b" in names and len(names - {"diff_b", "alpha", "dora_scale"}) > 0:
            rest = names - {"diff_b"}
            split = any(c(rest) for c, _ in types)
        got = _CLAIMS[(names, id(types))] = (bool(claimers), claimers[0][1] if claimers else None, split)
    return got


def _build_adapter(group, types, metadata) -> None:
    names = group.names
    claimed, build, split = _claim(names, types)
    if not claimed:
        if split:
            raise NeedsFullPath("an adapter with a bias diff")
        if names <= {"alpha", "dora_scale"}:
            group.problem = f"incomplete adapter: only {', '.join(sorted(names))}"
        return
    if build is None:
        raise NeedsFullPath("a type not read by shapes here")
    inner = {k: v for k, v in group.tensors.items() if k != "dora_scale"}
    try:
        adapter = build(inner)
        if "dora_scale" in group.tensors:
            adapter = _with_dora(adapter, group.tensors["dora_scale"])
    except _Bad:
        raise NeedsFullPath("tensors an adapter type refuses") from None
    group.adapter = adapter


# --- PEFT alphas (network._peft_config and friends) ---------------------------------------------
def _peft_config(path: str, metadata: dict):
    from .metadata import MAX_CONFIG_BYTES, parse_peft_config

    raw = metadata.get("lora_adapter_metadata")
    if raw:
        return parse_peft_config(raw, f"{path}: metadata lora_adapter_metadata")
    side = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.isfile(side):
        try:
            with open(side, "rb") as fh:
                raw = fh.read(MAX_CONFIG_BYTES + 1)
        except OSError:
            raise NeedsFullPath("adapter config") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise NeedsFullPath("adapter config")
        return parse_peft_config(raw, side)
    return None


def _inject_peft_alpha(group, config) -> None:
    cfg = _config_for(group.prefix, config)
    if not cfg:
        return
    down = group.tensors["lora_down.weight"]
    if down.dim() < 2:
        return
    rank = int(down.shape[0])
    r = _pattern_value(cfg.get("rank_pattern"), group.prefix) or cfg.get("r") or rank
    alpha = _pattern_value(cfg.get("alpha_pattern"), group.prefix) or cfg.get("lora_alpha") or r
    try:
        scale = float(alpha) / (float(r) ** 0.5 if cfg.get("use_rslora") else float(r))
        (v,) = struct.unpack("<f", struct.pack("<f", scale * rank))  # stored as fp32, as torch.tensor does
    except (OverflowError, ZeroDivisionError, TypeError, ValueError):
        raise NeedsFullPath("PEFT alpha") from None
    group.tensors["alpha"] = ShapeT((), "F32", (v,))


# --- loading ----------------------------------------------------------------------------------------
def _third_party_plugins() -> bool:
    """Whether an installed package registers lora-ext plugins (their types are not mirrored)."""
    from importlib.metadata import entry_points

    try:
        return bool(list(entry_points(group="lora_ext")))
    except Exception:  # noqa: BLE001
        return True


@functools.lru_cache(maxsize=1)
def _ready():
    """(data, types) when the fast path can run in this process, else None."""
    from . import fastdata

    if sys.byteorder != "little":
        return None
    data = fastdata.load()
    if data is None or _third_party_plugins():
        return None
    types = _type_list(data)
    if types is None:
        return None
    return data, types


def _runtime_plugins() -> bool:
    """Whether a plugin was registered at run time (tests, hosts): its types are not mirrored."""
    if "lora_ext.plugins" not in sys.modules:
        return False
    from . import plugins

    return any(not str(name).startswith("lora_ext.") for name, _ in plugins.plugin_manager().list_name_plugin())


def available() -> bool:
    return _ready() is not None


def load_fast(path, *, read_all: bool = True, tf=None):
    """A FastLora for ``path``, or None when the full path must read it.

    ``read_all``: read every tensor's bytes to find what the full path would refuse (NaN/Inf),
    as ``load_lora`` does; False reads only tensors of at most ``SMALL`` values (library mode,
    like ``library.load_lora_shapes``, which also checks the file is long enough).
    ``tf``: an already opened ``io.TensorFile`` (safetensors)."""
    ready = _ready()
    if ready is None or _runtime_plugins():
        return None
    data, types = ready
    spath = os.fspath(path)
    if tf is None:
        if not spath.lower().endswith(".safetensors"):
            return None
        from .io import open_tensors

        try:
            tf = open_tensors(spath, kind="lora")
        except LoraExtError:
            return None  # the full path words the error
        with tf:
            return _from_file(spath, tf, data, types, read_all)
    return _from_file(spath, tf, data, types, read_all)


def _from_file(path, tf, data, types, read_all):
    if tf.format != "safetensors":
        return None
    entries = tf._entries
    if any(tf.data_start + e.end > tf.file_size for e in entries.values()):
        return None  # truncated: the full path says where
    metadata = dict(tf.metadata)
    fh = tf._fh
    values = {}
    # every tensor (or the small ones) in file order: what the full path would refuse
    items = sorted(entries.items(), key=lambda kv: kv[1].begin) if read_all else entries.items()
    for key, e in items:
        dt = e.dtype_name
        if dt == "C64":
            return None
        n = e.end - e.begin
        small = n <= SMALL * _ST_DTYPES[dt][0]  # at most SMALL values (io checked the sizes)
        if not (read_all or small) or n == 0:
            continue
        fh.seek(tf.data_start + e.begin)
        raw = fh.read(n)
        if len(raw) < n or not _plainly_finite(dt, raw):
            return None
        if small:
            values[key] = _decode(dt, raw)
    grouped = group_keys(tf.keys(), data["names"])
    groups = {}
    try:
        for prefix, keys in grouped.items():
            tensors = {}
            for name, key in keys.items():
                e = entries[key]
                tensors[name] = ShapeT(e.shape, e.dtype_name, values.get(key))
            if "alpha" in tensors:
                tensors["alpha"] = _checked_alpha(tensors["alpha"])
            if "lora_magnitude_vector" in keys.get("dora_scale", ""):
                tensors["dora_scale"] = tensors["dora_scale"].reshape_flat()
            groups[prefix] = Group(prefix, keys, tensors)
        config = _peft_config(path, metadata)
        for group in groups.values():
            if config and "alpha" not in group.tensors and "lora_down.weight" in group.tensors:
                _inject_peft_alpha(group, config)
            _build_adapter(group, types, metadata)
    except NeedsFullPath:
        return None
    except LoraExtError:
        return None  # (a bad PEFT config) the full path words it
    return FastLora(path, metadata, groups, "safetensors")


# --- the full-size layouts, from fastdata ------------------------------------------------------------
_ALIASES_MODULE: list = []


def _with_dit_aliases(build):
    """Run ``build`` (which makes a KeyMap with a denoiser component: ``KeyMap`` imports
    ``lora_ext.dit.aliases``) without importing the ``lora_ext.dit`` package, whose tables
    import torch: ``dit/aliases.py`` alone (it imports only ``re``) is loaded for the call."""
    name = "lora_ext.dit.aliases"
    if "lora_ext.dit" in sys.modules or name in sys.modules:
        return build()
    mod = _ALIASES_MODULE[0] if _ALIASES_MODULE else None
    if mod is None:  # loaded once, lent to sys.modules for each build
        here = os.path.dirname(os.path.abspath(__file__))
        spec = importlib.util.spec_from_file_location(name, os.path.join(here, "dit", "aliases.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _ALIASES_MODULE.append(mod)
    sys.modules[name] = mod
    try:
        return build()
    finally:
        if sys.modules.get(name) is mod and "lora_ext.dit" not in sys.modules:
            del sys.modules[name]


def _no_gc(build):
    """``build()`` with the cyclic collector paused: a key map is ~10^5 new objects, none of
    them garbage, and every collection the allocations trigger would walk them all."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        return build()
    finally:
        if was:
            gc.enable()


class FastModels:
    """``detect.LiveModels`` from ``fastdata``: the same answers without torch."""

    def __init__(self):
        self._keymaps: dict = {}
        self._tables: dict = {}
        self._masked: dict = {}
        self._variants = None

    @property
    def data(self) -> dict:
        return _ready()[0]

    def keymap(self, name):
        km = self._keymaps.get(name)
        if km is None:
            from . import fastdata

            d = self.data
            entry = d["layouts"][name]
            layout = {comp: self._table(tid, comp) for comp, tid in entry["components"].items()}
            km = self._keymaps[name] = _no_gc(lambda: _with_dit_aliases(lambda: KeyMap(layout, label=entry["label"])))
        return km

    def clear(self) -> None:
        """Forget the decoded tables and key maps (the stored data was reloaded)."""
        self._keymaps.clear()
        self._tables.clear()
        self._masked.clear()

    def _table(self, tid: str, comp: str) -> dict:
        """One stored table, decoded once: layouts that share it (the DiT variants of a family
        share their text encoders) share the object, and so the key map's index of it."""
        got = self._tables.get((tid, comp))
        if got is None:
            from . import fastdata

            got = self._tables[(tid, comp)] = fastdata.table_rows(self.data, tid, comp)
        return got

    def fitting(self, lora, keymap) -> int:
        """How many groups ``bind_group`` would bind (``keymap.choose``: exactly one candidate
        module that fits), without wording the reasons of those that do not."""
        if not isinstance(lora, FastLora):  # adapters built by torch (the full path)
            from .detect import _fitting

            return _fitting(lora, keymap)
        n = 0
        memo = _memo(keymap)
        for group in lora.groups.values():
            a = group.adapter
            if a is None:
                if not group.problem and keymap.candidates(group.prefix):
                    raise NeedsFullPath("a group for the structural auto-detector")
                continue
            got = memo.get((group.prefix, a.fit_key))
            if got is None:
                got = _choose(keymap, group.prefix, a, memo)
            if got[0] is not None:
                n += 1
        return n

    def variants(self) -> dict:
        if self._variants is None:
            self._variants = {name: fam for name, fam in self.data["variants"]}
        return self._variants

    def families_for(self, prefixes) -> list:
        d = self.data
        dotted, flat = d["dotted_prefixes"], d["flat_prefixes"]
        bodies = set()
        for p in prefixes:
            for pre in dotted:
                if p.startswith(pre):
                    bodies.add(_strip_index(p[len(pre):].replace(".", "_")))
            for pre in flat:
                if p.startswith(pre):
                    bodies.add(_strip_index(p[len(pre):].replace(".", "_")))
            bodies.add(_strip_index(p.replace(".", "_")))
        out = []
        for family, masked in d["masked"]:
            m = self._masked.get(family)
            if m is None:
                m = self._masked[family] = frozenset(masked)
            if bodies & m:
                out.append(family)
        return out

    def family_label(self, family: str) -> str:
        return self.data["family_labels"][family]

    def label(self, name: str) -> str:
        return self.data["labels"].get(name, name)


_INDEX = re.compile(r"(?<=_)\d+(?=_|$)")


def _strip_index(body: str) -> str:
    return _INDEX.sub("#", body)


MODELS = FastModels()
