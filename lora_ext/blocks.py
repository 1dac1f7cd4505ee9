"""Block ids, sd-webui-lora-block-weight ("lbw") vectors and presets, and the coarse in/mid/out form.

Block ids
---------
The numbering sd-webui-lora-block-weight made standard, on the compvis/ldm UNet
(``lora_ext.arch`` assigns them to modules):

* ``INnn``: every module inside ldm ``input_blocks.N`` (so ``conv_in``, which is
  ``input_blocks.0.0``, is ``IN00``);
* ``M00``: everything inside ``middle_block``;
* ``OUTnn``: every module inside ``output_blocks.N``;
* ``BASE``: the text encoders (both of them on SDXL).

SD1.x/SD2.x have ``IN00..IN11``, ``M00``, ``OUT00..OUT11``; SDXL has ``IN00..IN08``, ``M00``,
``OUT00..OUT08`` (see :data:`FAMILY_BLOCKS`).

How ``BASE`` applies
~~~~~~~~~~~~~~~~~~~~
``BASE`` is the text encoder, as in lbw (lbw gives its first value to every key containing
``encoder``/``embedders``/``transformer_resblocks``, i.e. to the text encoders only). The UNet's
modules outside the numbered blocks (time and label embeddings, ``out`` norm and conv;
``lora_ext.arch`` labels them ``BASE`` too) are **not** block-weighted: they keep the UNet
strength, multiplier 1, whatever the vector says. That is what lbw does (they match none of its
block patterns, so it leaves them at 1), and it keeps ``lbw=...`` with ``BASE=0`` meaning "no
text-encoder effect" rather than also switching off the UNet's time embedding.
:meth:`lora_ext.spec.LoraSpec.strength` implements this rule.

lbw vectors
-----------
An explicit vector has 12 (SDXL LoRA), 17 (SD1.x LoRA), 20 (SDXL LyCORIS/LoCon) or 26 (SD1.x
LyCORIS/LoCon) numbers; :data:`LBW_LAYOUTS` says which block each position is, position for
position as lbw's ``BLOCKID12/17/20/26`` tables (and its README tables) define them. As in lbw
(its ``to26``), a vector is expanded to the 26 SD1.x ids and **every id the vector does not name
is 0**: a 17-value vector switches off ``IN00, IN03, IN06, IN09..IN11, OUT00..OUT02`` (blocks a
plain SD1.x LoRA has no modules in, but a LoCon does), and the lbw default presets (all 17-value)
used on an SDXL LoRA switch off ``OUT00..OUT02``; use the ``SDXL-*`` presets there. The expanded
dict always holds all 26 ids, so it also serves SDXL models (whose ids are a subset).

Supported: plain numbers (``1``, ``0.5``, ``-0.25``, ``1e-1``). Not supported, with a clear
error: lbw's random values ``R`` and ``U``, its inherited weight ``X``/``X+0.5`` (and the ``x=``
argument), ComfyUI Inspire Pack's ``A``/``B`` variables, lbw's 61-value Flux vectors, and
``lbwe=`` elemental weights.

Presets (:data:`PRESETS`)
~~~~~~~~~~~~~~~~~~~~~~~~~
* lbw's defaults (17 values, SD1.x LoRA): ``NONE ALL INS IND INALL MIDD OUTD OUTS OUTALL ALL0.5``;
* the further 17-value presets circulated with ComfyUI Inspire Pack's lbw preset list:
  ``MIDD0.2 MIDD0.8 MOUT``; every 17-value preset is also available with an ``SD-`` prefix
  (``SD-ALL``, ``SD-OUTD`` ...), Inspire Pack's naming;
* per-version group presets under Inspire Pack's names, written here in lbw's own layouts:
  ``SDXL-NONE SDXL-ALL SDXL-INALL SDXL-MIDALL SDXL-OUTALL`` (12 values, SDXL LoRA),
  ``SDXL-LyC-NONE/ALL/INALL/MIDALL/OUTALL`` (20 values) and
  ``SD-LyC-NONE/ALL/INALL/MIDALL/OUTALL`` (26 values). ``INALL``/``MIDALL``/``OUTALL`` are BASE
  plus every IN / the middle / every OUT block of that layout; ``ALL`` is everything, ``NONE``
  nothing.

Preset names are matched exactly first, then case-insensitively. Hosts can add a user's own
lbw presets (lbw's ``lbwpresets.txt`` format) with :func:`parse_preset_text`.

Coarse form
-----------
``in=``, ``mid=``, ``out=`` multiply every ``IN..`` id, ``M00``, every ``OUT..`` id
(:func:`coarse`); together with ``lbw=`` they multiply its values. Unlike SD.Next, where
``in=V`` *replaces* the UNet strength for the down blocks, here they are block multipliers like
lbw's values (the same result whenever the UNet strength is 1 or the value is 0).
"""
from __future__ import annotations

import math
import re
from types import MappingProxyType
from typing import Iterable, Mapping, Optional

from .errors import LoraExtError

__all__ = [
    "BlockWeightError",
    "IN_IDS",
    "MID_IDS",
    "OUT_IDS",
    "ALL_IDS",
    "SD1_BLOCKS",
    "SDXL_BLOCKS",
    "FAMILY_BLOCKS",
    "family_blocks",
    "LBW_LAYOUTS",
    "LBW_LAYOUT_NAMES",
    "PRESETS",
    "expand_vector",
    "preset",
    "parse_vector",
    "parse_lbw",
    "parse_preset_text",
    "coarse",
    "is_block_id",
    "block_args",
]


class BlockWeightError(LoraExtError, ValueError):
    """A block-weight preset or vector that cannot be used."""


def _ids(prefix: str, n: int) -> tuple:
    return tuple("%s%02d" % (prefix, i) for i in range(n))


#: every IN id of the SD1.x numbering (SDXL uses the first nine)
IN_IDS = _ids("IN", 12)
MID_IDS = ("M00",)
OUT_IDS = _ids("OUT", 12)
#: lbw's 26 ids, in lbw's order: BASE, IN00..IN11, M00, OUT00..OUT11
ALL_IDS = ("BASE",) + IN_IDS + MID_IDS + OUT_IDS

SD1_BLOCKS = ALL_IDS
SDXL_BLOCKS = ("BASE",) + _ids("IN", 9) + MID_IDS + _ids("OUT", 9)
#: block ids per base-model family (SD2.x numbers its blocks as SD1.x)
FAMILY_BLOCKS = MappingProxyType({"sd1": SD1_BLOCKS, "sd2": SD1_BLOCKS, "sdxl": SDXL_BLOCKS})

_GROUP = {**{i: "in" for i in IN_IDS}, "M00": "mid", **{o: "out" for o in OUT_IDS}}


def family_blocks(family: str) -> tuple:
    """The block ids of ``family`` ("sd1", "SD1.x", "sd2", "sdxl", "SDXL" ...)."""
    key = re.sub(r"[^a-z0-9]", "", str(family).lower())
    key = {"sd1x": "sd1", "sd15": "sd1", "sd2x": "sd2", "sd21": "sd2", "sdxl10": "sdxl"}.get(key, key)
    try:
        return FAMILY_BLOCKS[key]
    except KeyError:
        raise BlockWeightError(
            f"no block numbering for base model {family!r}; known: {', '.join(FAMILY_BLOCKS)}"
        ) from None


def is_block_id(name: str) -> bool:
    return name in _GROUP or name == "BASE"


# ---------------------------------------------------------------------------------------------
# lbw layouts: which block each position of a 12/17/20/26-value vector is (lbw's BLOCKIDnn)

LBW_LAYOUTS = MappingProxyType({
    # SDXL LoRA: the attention blocks of SDXL's UNet
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
         "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
    # SD1.x LoRA: the blocks with attention (the ones a plain kohya LoRA trains)
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
         "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
    # SDXL LyCORIS/LoCon: every SDXL block
    20: SDXL_BLOCKS,
    # SD1.x LyCORIS/LoCon: every SD1.x block
    26: SD1_BLOCKS,
})
LBW_LAYOUT_NAMES = MappingProxyType({
    12: "SDXL LoRA", 17: "SD1.x LoRA", 20: "SDXL LyCORIS", 26: "SD1.x LyCORIS",
})


def expand_vector(values: Iterable[float]) -> dict:
    """An lbw vector (12, 17, 20 or 26 numbers) as a dict over all 26 ids, 0 where not named."""
    vals = [float(v) for v in values]
    layout = LBW_LAYOUTS.get(len(vals))
    if layout is None:
        raise BlockWeightError(_length_problem(len(vals)))
    for v in vals:
        if not math.isfinite(v):
            raise BlockWeightError(f"block weight {v!r} is not a finite number")
    out = dict.fromkeys(ALL_IDS, 0.0)
    out.update(zip(layout, vals))
    return out


def _length_problem(n: int) -> str:
    kinds = ", ".join(f"{k} ({v})" for k, v in LBW_LAYOUT_NAMES.items())
    extra = " (lbw's 61-value Flux vectors are not supported)" if n == 61 else ""
    return f"a block-weight vector has {n} values; expected {kinds}{extra}"


# ---------------------------------------------------------------------------------------------
# presets

def _vec(layout_len: int, ones: Iterable[str] = (), value: float = 1.0) -> tuple:
    """A vector of ``layout_len`` values: ``value`` at the named ids (BASE included if named)."""
    names = set(ones)
    return tuple(value if b in names else 0.0 for b in LBW_LAYOUTS[layout_len])


def _groups(layout_len: int, group: Optional[str]) -> tuple:
    """The group preset of one layout: BASE plus every id of ``group`` ("in"/"mid"/"out")."""
    layout = LBW_LAYOUTS[layout_len]
    if group == "all":
        return _vec(layout_len, layout)
    if group is None:
        return _vec(layout_len, ())
    return _vec(layout_len, ["BASE"] + [b for b in layout if _GROUP.get(b) == group])


def _nums(text: str) -> tuple:
    return tuple(float(t) for t in text.split(","))


# lbw's defaults (its DEF_WEIGHT_PRESET), SD1.x LoRA layout
_LBW_DEFAULTS = {
    "NONE": _nums("0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "ALL": _nums("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    "INS": _nums("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "IND": _nums("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "INALL": _nums("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "MIDD": _nums("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    "OUTD": _nums("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    "OUTS": _nums("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    "OUTALL": _nums("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    "ALL0.5": _nums("0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"),
}
# further SD1.x LoRA presets from ComfyUI Inspire Pack's list
_SD_EXTRA = {
    "MIDD0.2": _nums("1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0"),
    "MIDD0.8": _nums("1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0"),
    "MOUT": _nums("1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0"),
}


def _build_presets() -> dict:
    p = dict(_LBW_DEFAULTS)
    p.update(_SD_EXTRA)
    for name, v in list(p.items()):
        p["SD-" + name] = v
    for prefix, n in (("SDXL-", 12), ("SDXL-LyC-", 20), ("SD-LyC-", 26)):
        p[prefix + "NONE"] = _groups(n, None)
        p[prefix + "ALL"] = _groups(n, "all")
        p[prefix + "INALL"] = _groups(n, "in")
        p[prefix + "MIDALL"] = _groups(n, "mid")
        p[prefix + "OUTALL"] = _groups(n, "out")
    for name, v in p.items():
        assert len(v) in LBW_LAYOUTS, name
    return p


#: built-in presets: name -> vector (its length says its layout)
PRESETS = MappingProxyType(_build_presets())


def _lookup(name: str, presets: Optional[Mapping[str, Iterable[float]]]):
    tables = ([presets] if presets else []) + [PRESETS]
    for table in tables:
        if name in table:
            return table[name]
    low = name.lower()
    for table in tables:
        hits = [k for k in table if k.lower() == low]
        if len(hits) == 1:
            return table[hits[0]]
    return None


def preset(name: str, presets: Optional[Mapping[str, Iterable[float]]] = None) -> dict:
    """A preset by name (``presets`` first, then the built-in ones), expanded to 26 ids."""
    v = _lookup(name, presets)
    if v is None:
        raise BlockWeightError(_unknown_preset(name, presets))
    return expand_vector(v)


def _unknown_preset(name: str, presets) -> str:
    import difflib

    names = list(presets or ()) + list(PRESETS)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6) or difflib.get_close_matches(
        name.upper(), names, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"unknown block-weight preset {name!r}{hint}; presets: "
            f"{', '.join(list(_LBW_DEFAULTS) + ['SD-...', 'SDXL-...', 'SD-LyC-...', 'SDXL-LyC-...'])},"
            f" or 12/17/20/26 numbers")


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_UNSUPPORTED_TOKENS = (
    (re.compile(r"R\Z"), "lbw's random value R"),
    (re.compile(r"U\Z"), "lbw's random value U"),
    (re.compile(r"X(?:[+-].*)?\Z"), "lbw's inherited weight X"),
    (re.compile(r"[AB]\Z"), "the Inspire Pack variable A/B"),
)


def parse_vector(text: str) -> tuple:
    """Comma-separated numbers; raises :class:`BlockWeightError` naming the first bad value."""
    vals = []
    for i, raw in enumerate(str(text).split(",")):
        tok = raw.strip()
        if not _NUMBER.fullmatch(tok):
            what = next((w for rx, w in _UNSUPPORTED_TOKENS if rx.match(tok)), None)
            if what:
                raise BlockWeightError(
                    f"block weight {i + 1} is {tok!r}, {what}, which is not supported: use numbers")
            shown = repr(tok) if tok else "empty"
            raise BlockWeightError(f"block weight {i + 1} is {shown}, not a number")
        v = float(tok)
        if not math.isfinite(v):
            raise BlockWeightError(f"block weight {i + 1} ({tok}) is not a finite number")
        vals.append(v)
    if len(vals) not in LBW_LAYOUTS:
        raise BlockWeightError(_length_problem(len(vals)))
    return tuple(vals)


def parse_lbw(text: str, presets: Optional[Mapping[str, Iterable[float]]] = None) -> dict:
    """``lbw=`` text: a preset name or a 12/17/20/26-number vector, as a dict over 26 ids."""
    s = str(text).strip()
    if not s:
        raise BlockWeightError("empty block weights: give a preset name or 12/17/20/26 numbers")
    if "," in s or _NUMBER.fullmatch(s):
        return expand_vector(parse_vector(s))
    return preset(s, presets)


def parse_preset_text(text: str) -> dict:
    """Presets in lbw's ``lbwpresets.txt`` format: ``NAME:v,v,...`` per line.

    As in lbw, a line that is not a name, a colon and 12/17/20/26 numbers is a comment.
    """
    out = {}
    for line in str(text).splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, _, values = line.partition(":")
        name = name.strip()
        if not name:
            continue
        try:
            out[name] = parse_vector(values)
        except BlockWeightError:
            continue
    return out


def coarse(in_=None, mid=None, out=None) -> dict:
    """The coarse form: ``in_`` for every IN id, ``mid`` for M00, ``out`` for every OUT id.

    ``None`` leaves a group out of the dict (multiplier 1). Values may be numbers or
    :class:`~lora_ext.spec.Keyframes`.
    """
    res = {}
    for ids, v in ((IN_IDS, in_), (MID_IDS, mid), (OUT_IDS, out)):
        if v is not None:
            if isinstance(v, (int, float)):
                v = float(v)
            res.update(dict.fromkeys(ids, v))
    return res


# ---------------------------------------------------------------------------------------------
# back to text (for format_tag / infotext)

def _fmt(x: float) -> str:
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x)) if x != 0 else "0"
    return repr(x)


def block_args(blocks: Optional[Mapping], fmt_weight=None) -> list:
    """Tag arguments that re-create ``blocks``: ``["lbw=NAME"]``, ``["lbw=v,v,..."]`` or
    ``["in=V", "mid=V", "out=V"]``. ``fmt_weight`` formats a non-number value (keyframes).

    Ids absent from ``blocks`` mean 1 (as :meth:`LoraSpec.strength` reads them), so a partial
    dict of numbers comes back as an equivalent full vector. Raises :class:`BlockWeightError`
    for what no tag can say (unknown ids; keyframes other than the coarse form).
    """
    if blocks is None:
        return []
    unknown = [k for k in blocks if k not in ALL_IDS]
    if unknown:
        raise BlockWeightError(f"unknown block ids {unknown}; known: {', '.join(ALL_IDS)}")
    # pure coarse form: whole groups with one value each, BASE untouched
    if blocks and "BASE" not in blocks:
        groups = {}
        ok = True
        for ids, g in ((IN_IDS, "in"), (MID_IDS, "mid"), (OUT_IDS, "out")):
            present = [i for i in ids if i in blocks]
            if not present:
                continue
            vals = [blocks[i] for i in present]
            if len(present) != len(ids) or any(v != vals[0] for v in vals[1:]):
                ok = False
                break
            groups[g] = vals[0]
        if ok:
            out = []
            for g, v in groups.items():
                if isinstance(v, (int, float)):
                    out.append(f"{g}={_fmt(v)}")
                elif fmt_weight is not None:
                    out.append(f"{g}={fmt_weight(v)}")
                else:
                    raise BlockWeightError(f"cannot write block weight {v!r}")
            return out
    if not all(isinstance(v, (int, float)) for v in blocks.values()):
        raise BlockWeightError(
            "block weights that change per step can only be written as in=/mid=/out=")
    eff = {b: float(blocks.get(b, 1.0)) for b in ALL_IDS}
    for name, vec in PRESETS.items():
        if expand_vector(vec) == eff:
            return [f"lbw={name}"]
    for n in (17, 12, 20, 26):  # the most common layouts first
        vec = [eff[b] for b in LBW_LAYOUTS[n]]
        if expand_vector(vec) == eff:
            return ["lbw=" + ",".join(_fmt(v) for v in vec)]
    raise AssertionError("unreachable: the 26-value layout names every id")
