"""Block ids, sd-webui-lora-block-weight ("lbw") vectors and presets, the coarse in/mid/out form,
and the DiT families' block weights (family-native ids, lbw's 61-value Flux vectors, ComfyUI
Inspire Pack's positional vectors): see *DiT families* below.

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
argument), ComfyUI Inspire Pack's ``A``/``B`` variables and space-separated per-key values, and
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

DiT families
------------
Block ids (``ModuleInfo.block``, from the family tables in ``lora_ext.dit.families``; a new
family's ids follow from its table, see :func:`dit_block_ids`):

=================  ===========================================================================
Flux.1, Chroma     ``IN`` (``img_in txt_in time_in vector_in guidance_in``; Chroma's
                   ``distilled_guidance_layer``), ``D00..D18`` (double blocks), ``S00..S37``
                   (single blocks), ``OUT`` (``final_layer``: ``proj_out``, ``norm_out.linear``)
SD3 / SD3.5        ``IN`` (``x_embedder`` ``t_embedder`` ``y_embedder`` ``context_embedder``),
                   ``J00..J23`` (Medium) / ``J00..J37`` (Large), ``OUT``
Qwen-Image         ``IN``, ``B00..B59``, ``OUT``
text encoders      ``BASE`` (every text encoder), ``CLIP`` (CLIP-L ``te1``, SD3's CLIP-G
                   ``te2``) and ``T5`` (T5-XXL ``te3``); ``CLIP``/``T5`` win over ``BASE``
=================  ===========================================================================

``lbw=`` on a DiT LoRA takes: lbw's **61-value Flux vector** (:data:`LBW_FLUX_IDS`:
``CLIP, T5, IN, D00..D18, S00..S37, OUT``, lbw's ``BLOCKIDFLUX``; its preset ``FLUXALL``), which
names every id, so nothing is zero-filled; lbw's key classifier puts ``img_in/txt_in/time_in/
vector_in/guidance_in`` in IN and ``final_layer`` in OUT, exactly our IN and OUT (Chroma's
approximator, which lbw would leave at 1 except its ``in_proj``/``in_layer``, is IN here), or
**explicit weights** ``ID=v,ID-ID=v`` (:func:`parse_ids`; ``lbw=S00-S37=0,T5=0``), where ids not
named stay 1. An SD vector or preset on a DiT LoRA, a Flux vector on an SD or SD3 LoRA, or ids of
another family are errors once the LoRA is bound (:func:`resolve`), not silently ignored.

**Coarse form on DiT**: SD's ``in/mid/out`` are positions in depth (input, middle, output of the
UNet), and users reach for ``out=`` for style/detail and ``in=`` for composition. A DiT has no U
shape, so the same intent maps to depth: the numbered blocks in order are cut into thirds
(:func:`coarse_groups`), ``IN`` joins "in" and ``OUT`` joins "out" (as SD's ``conv_in`` is in
``IN00``). On Flux and Chroma the thirds fall exactly on the architecture: in = IN + the 19
double-stream blocks, mid = ``S00..S18``, out = ``S19..S37`` + OUT; SD3 Medium 8/8/8, SD3.5 Large
13/12/13, Qwen-Image 20/20/20; a custom-size model uses its own depth. (Rejected: in = double,
out = single with no "mid", which leaves ``mid=`` doing nothing and has no answer for the
single-stack SD3 and Qwen-Image.) The depth is the model's, so the coarse form is resolved when
the LoRA is bound; the text encoders are untouched by it, as on SD.

**Inspire Pack** vectors (``inspire=``, :func:`inspire_weights`): ``BASE``, then one value per
double/single block *present in the LoRA* in sorted order (58 for a LoRA with every Flux
block), exactly as its "LoRA Loader (Block Weight)": a LoRA that lacks blocks shifts the
mapping; the vector advances when the block number changes (a single block numbered like the
last double block keeps its value); past the vector's end the last value stays; extra values
are unused; every other module (embedders, output layers, all blocks of families without
double/single blocks, text encoders) takes BASE. Which blocks Inspire walks follows their
ComfyUI names, as Inspire matches them (:func:`inspire_walked`): Flux's, Chroma's and
HunyuanVideo's ``double_blocks``/``single_blocks`` are walked, HiDream's
``double_stream_blocks`` are "others". Inspire's own rule for a vector is at least 12
values; its numeric presets are :data:`INSPIRE_PRESETS`. Inspire's ``%``-spec syntax, ``A/B/R/U``
and ``inverse`` are not supported; on an SD LoRA ``inspire=`` is refused (Inspire counts the
middle block's three parts as three positions, which SD block ids cannot express).

**KJNodes** alpha per block (``kjalpha=``, :func:`parse_kj_alpha`): the values of its "Flux
Block Lora Select" set each block's *alpha*, so the module's scale becomes ``value / rank``
instead of the file's ``alpha / rank`` (or 1 without an alpha): a multiplier of ``value / file
alpha`` (``value / rank`` without one); 0 drops the block. 57 numbers in KJNodes' order (double
0..18, single 0..37) or ``ID=alpha``; blocks not named keep the file's scale (in KJNodes' node
every block has a value, default 0). A block whose modules have different alphas or ranks
cannot take one multiplier and is an error.

Later families (HunyuanVideo ``IN, D00..D19, S00..S39, OUT``; Wan ``IN, B00..B29/B39, OUT``;
Lumina2 ``IN, L00..L25``, Z-Image ``IN, L00..L29, OUT``) get their ids from their tables in ``lora_ext.dit.families``: a
group tagged ``IN`` (token and noise refiners) is all ``IN``, any other tag numbers its blocks;
the coarse thirds, explicit ids, Inspire (on ``D``/``S`` blocks, as ComfyUI names HunyuanVideo's
``double_blocks``/``single_blocks``) and KJNodes values follow without code per family.

Binding: :meth:`lora_ext.spec.LoraSpec.bind_blocks` turns the DiT coarse form, Inspire vectors
and KJNodes alphas into plain per-id multipliers once the model's blocks and the LoRA's are
known.
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

#: text-encoder ids: BASE (every text encoder), and lbw's Flux ids CLIP (the CLIP encoders,
#: components te1/te2) and T5 (T5-XXL, component te3), which take precedence over BASE
TE_IDS = ("BASE", "CLIP", "T5")
_TE_SPECIFIC = {"te1": "CLIP", "te2": "CLIP", "te3": "T5"}
#: the denoiser's top-level ids of every DiT family: input embedders, output layers
DIT_TOP_IDS = ("IN", "OUT")
#: lbw's 61 Flux ids, in lbw's order (its BLOCKIDFLUX)
LBW_FLUX_IDS = ("CLIP", "T5", "IN") + _ids("D", 19) + _ids("S", 38) + ("OUT",)


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
    """An SD block id of lbw's numbering (``BASE``, ``IN00``..``IN11``, ``M00``, ``OUT00``..)."""
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
    # Flux.1 (lbw's BLOCKIDFLUX): CLIP, T5, IN, D00..D18, S00..S37, OUT
    61: LBW_FLUX_IDS,
})
LBW_LAYOUT_NAMES = MappingProxyType({
    12: "SDXL LoRA", 17: "SD1.x LoRA", 20: "SDXL LyCORIS", 26: "SD1.x LyCORIS", 61: "Flux.1",
})


def expand_vector(values: Iterable[float]) -> dict:
    """An lbw vector (12, 17, 20 or 26 numbers) as a dict over all 26 ids, 0 where not named;
    61 numbers (lbw's Flux vector) as a dict over :data:`LBW_FLUX_IDS`."""
    vals = [float(v) for v in values]
    layout = LBW_LAYOUTS.get(len(vals))
    if layout is None:
        raise BlockWeightError(_length_problem(len(vals)))
    for v in vals:
        if not math.isfinite(v):
            raise BlockWeightError(f"block weight {v!r} is not a finite number")
    if layout is LBW_FLUX_IDS:  # every one of lbw's Flux ids is named
        return dict(zip(layout, vals))
    out = dict.fromkeys(ALL_IDS, 0.0)
    out.update(zip(layout, vals))
    return out


def _length_problem(n: int) -> str:
    kinds = ", ".join(f"{k} ({v})" for k, v in LBW_LAYOUT_NAMES.items())
    return f"a block-weight vector has {n} values; expected {kinds}"


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
    p["FLUXALL"] = (1.0,) * 61  # lbw's Flux preset (its DEF_WEIGHT_PRESET)
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
            f"{', '.join(list(_LBW_DEFAULTS) + ['FLUXALL', 'SD-...', 'SDXL-...', 'SD-LyC-...', 'SDXL-LyC-...'])},"
            f" 12/17/20/26/61 numbers, or ID=v,...")


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_UNSUPPORTED_TOKENS = (
    (re.compile(r"R\Z"), "lbw's random value R"),
    (re.compile(r"U\Z"), "lbw's random value U"),
    (re.compile(r"X(?:[+-].*)?\Z"), "lbw's inherited weight X"),
    (re.compile(r"[AB]\Z"), "the Inspire Pack variable A/B"),
)


def _numbers(text: str) -> tuple:
    vals = []
    for i, raw in enumerate(str(text).split(",")):
        tok = raw.strip()
        if not _NUMBER.fullmatch(tok):
            what = next((w for rx, w in _UNSUPPORTED_TOKENS if rx.match(tok)), None)
            if what is None and len(tok.split()) > 1 and all(_NUMBER.fullmatch(t) for t in tok.split()):
                what = "the Inspire Pack's per-key values within one block (space-separated)"
            if what:
                raise BlockWeightError(
                    f"block weight {i + 1} is {tok!r}, {what}, which is not supported: use numbers")
            shown = repr(tok) if tok else "empty"
            raise BlockWeightError(f"block weight {i + 1} is {shown}, not a number")
        v = float(tok)
        if not math.isfinite(v):
            raise BlockWeightError(f"block weight {i + 1} ({tok}) is not a finite number")
        vals.append(v)
    return tuple(vals)


def parse_vector(text: str) -> tuple:
    """Comma-separated numbers, 12/17/20/26/61 of them; raises :class:`BlockWeightError`
    naming the first bad value, or the length."""
    vals = _numbers(text)
    if len(vals) not in LBW_LAYOUTS:
        raise BlockWeightError(_length_problem(len(vals)))
    return vals


def parse_lbw(text: str, presets: Optional[Mapping[str, Iterable[float]]] = None) -> dict:
    """``lbw=`` text as a dict of block weights: a preset name, a 12/17/20/26-number vector
    (over the 26 SD ids), a 61-number Flux vector (over :data:`LBW_FLUX_IDS`), or explicit
    ``ID=v,ID-ID=v,...`` weights (:func:`parse_ids`)."""
    s = str(text).strip()
    if not s:
        raise BlockWeightError("empty block weights: give a preset name, 12/17/20/26/61 numbers or ID=v,...")
    if "=" in s:
        return parse_ids(s)
    if "," in s or _NUMBER.fullmatch(s):
        return expand_vector(parse_vector(s))
    return preset(s, presets)


def parse_preset_text(text: str) -> dict:
    """Presets in lbw's ``lbwpresets.txt`` format: ``NAME:v,v,...`` per line.

    As in lbw, a line that is not a name, a colon and 12/17/20/26/61 numbers is a comment.
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
# DiT families: family-native ids, explicit ID=v weights, the coarse form per depth, Inspire

def _dit_tags() -> dict:
    """Numbered-block prefixes of every DiT family (``lora_ext.dit.families``): tag -> its rank
    inside its family (Flux: D 0, S 1), which orders the blocks by depth."""
    global _TAGS
    if _TAGS is None:
        from .dit.families import FAMILIES

        tags = {}
        for fam in FAMILIES.values():
            numbered = [g for g in fam.blocks if g.tag not in DIT_TOP_IDS]  # a group tagged "IN" is all IN
            for i, g in enumerate(numbered):
                tags.setdefault(g.tag, i)
        _TAGS = tags
    return _TAGS


_TAGS: Optional[dict] = None
_DIT_NUMBERED = re.compile(r"([A-Z])(\d\d)\Z")


def is_dit_block(name: str) -> bool:
    """A DiT denoiser block id: ``IN``, ``OUT`` or a family's numbered id (``D05``, ``S37``,
    ``J12``, ``B59``)."""
    if name in DIT_TOP_IDS:
        return True
    if name in _GROUP:  # SD's M00 stays SD's whatever tags DiT families take
        return False
    m = _DIT_NUMBERED.match(name)
    return m is not None and m.group(1) in _dit_tags()


def is_known_id(name: str) -> bool:
    """Any id a block-weight dict may hold: SD ids, text-encoder ids, DiT ids."""
    return name in _GROUP or name in TE_IDS or is_dit_block(name)


def dit_order(block: str) -> tuple:
    """Sort key of DiT ids in depth order: IN, the numbered blocks (a family's groups in order,
    e.g. every D before every S), OUT."""
    if block == "IN":
        return (0, 0, 0)
    if block == "OUT":
        return (2, 0, 0)
    return (1, _dit_tags().get(block[0], 99), int(block[1:]))


def dit_block_ids(name: str) -> tuple:
    """The block ids of a DiT family or full-size variant, in depth order: ``IN``, numbered
    blocks, ``OUT`` (``"flux"``/``"flux-dev"``: IN, D00..D18, S00..S37, OUT; ``"sd3.5-large"``:
    IN, J00..J37, OUT; ``"qwen-image"``: IN, B00..B59, OUT), read from the family's module
    table. A family whose variants differ in depth (SD3, Wan) needs the variant."""
    from .dit.families import FAMILIES, VARIANTS, variant_table

    if name in VARIANTS:
        fam, names = VARIANTS[name][0], [name]
    elif name in FAMILIES:
        fam, names = name, [v for v, (f, _, _) in VARIANTS.items() if f == name]
    else:
        raise BlockWeightError(f"no DiT family or variant {name!r}; known: "
                               f"{', '.join(list(FAMILIES) + list(VARIANTS))}")
    found = {tuple(sorted({m.block for m in variant_table(v).values()}, key=dit_order)) for v in names}
    if len(found) != 1:
        raise BlockWeightError(f"the {fam} variants differ in depth; name one of {', '.join(names)}")
    return found.pop()


def coarse_groups(model_blocks: Iterable[str]) -> dict:
    """DiT id -> ``"in"``/``"mid"``/``"out"`` for a model with these block ids (the coarse form).

    The numbered blocks in depth order are cut into thirds: the first ``round(n/3)`` are "in",
    up to ``round(2n/3)`` "mid", the rest "out"; ``IN`` (input embedders) is "in", ``OUT``
    (output layers) "out". Flux (57 blocks): in = IN + D00..D18, mid = S00..S18, out =
    S19..S37 + OUT; SD3 Medium (24): J00..J07 / J08..J15 / J16..J23; SD3.5 Large (38):
    J00..J12 / J13..J24 / J25..J37; Qwen-Image (60): B00..B19 / B20..B39 / B40..B59.
    """
    ids = sorted({b for b in model_blocks if is_dit_block(b)}, key=dit_order)
    numbered = [b for b in ids if b not in DIT_TOP_IDS]
    n = len(numbered)
    a, b = round(n / 3), round(2 * n / 3)
    out = {blk: ("in" if i < a else "mid" if i < b else "out") for i, blk in enumerate(numbered)}
    if "IN" in ids:
        out["IN"] = "in"
    if "OUT" in ids:
        out["OUT"] = "out"
    return out


_ID_ITEM = re.compile(r"\s*([A-Za-z]+\d*)\s*(?:-\s*([A-Za-z]+\d*)\s*)?=\s*(\S*)\s*\Z")


def parse_ids(text: str) -> dict:
    """Explicit weights ``ID=v,ID-ID=v,...`` (ids case-insensitive; a range runs over one
    prefix, ``D00-D18``, ``S10-S37``, ``IN04-IN08``).

    DiT ids (``IN OUT Dnn Snn Jnn Bnn``) and the text-encoder ids ``BASE CLIP T5``: only the
    named ids are in the dict (the others mean 1). SD ids (``IN00..``, ``M00``, ``OUT00..``,
    or ``BASE`` alone): the dict holds all 26 SD ids, 1 where not named, so it reads like an
    lbw vector. SD and DiT block ids cannot be mixed.
    """
    out: dict = {}
    for i, raw in enumerate(str(text).split(",")):
        m = _ID_ITEM.match(raw)
        if m is None:
            raise BlockWeightError(f"block weight {i + 1} ({raw.strip()!r}) is not ID=value")
        first, last, val = m.group(1).upper(), (m.group(2) or "").upper(), m.group(3)
        if not _NUMBER.fullmatch(val) or not math.isfinite(float(val)):
            raise BlockWeightError(f"block weight {i + 1} ({raw.strip()}): {val!r} is not a number")
        for b in _id_range(first, last, i):
            if b in out:
                raise BlockWeightError(f"block {b} is given twice")
            out[b] = float(val)
    sd = [b for b in out if b in _GROUP]
    dit = [b for b in out if is_dit_block(b)]
    if sd and (dit or any(b in ("CLIP", "T5") for b in out)):
        raise BlockWeightError(f"block weights mix SD ids ({sd[0]}) and DiT ids "
                               f"({(dit or ['CLIP/T5'])[0]}); a LoRA has one kind")
    if sd or set(out) == {"BASE"}:
        full = dict.fromkeys(ALL_IDS, 1.0)
        full.update(out)
        return full
    return out


def _id_range(first: str, last: str, i: int) -> list:
    for b in (first, last):
        if b and not is_known_id(b):
            raise BlockWeightError(f"block weight {i + 1}: unknown block id {b!r}; ids are BASE, "
                                   f"IN00..IN11, M00, OUT00..OUT11 (SD), CLIP, T5, IN, OUT, "
                                   f"{', '.join(t + 'nn' for t in _dit_tags())} (DiT)")
    if not last:
        return [first]
    m1, m2 = re.match(r"([A-Z]+)(\d+)\Z", first), re.match(r"([A-Z]+)(\d+)\Z", last)
    if not (m1 and m2) or m1.group(1) != m2.group(1):
        raise BlockWeightError(f"block weight {i + 1}: {first}-{last} is not a range of one kind of block")
    lo, hi = sorted((int(m1.group(2)), int(m2.group(2))))
    ids = [f"{m1.group(1)}{k:02d}" for k in range(lo, hi + 1)]
    bad = [b for b in ids if not is_known_id(b)]
    if bad:
        raise BlockWeightError(f"block weight {i + 1}: {first}-{last} runs past the known ids ({bad[0]})")
    return ids


def kind_of(blocks: Optional[Mapping]) -> str:
    """``"sd"`` (SD block ids), ``"dit"`` (DiT block ids or CLIP/T5, maybe with the SD coarse
    form), ``"te"`` (text-encoder ids only) or ``"none"``."""
    if not blocks:
        return "none"
    if any(b in ("CLIP", "T5") or is_dit_block(b) for b in blocks):
        return "dit"
    if any(b in _GROUP for b in blocks):
        return "sd"
    return "te"


def coarse_values(blocks: Mapping) -> Optional[dict]:
    """``{"in"|"mid"|"out": value}`` when the SD block ids of ``blocks`` are exactly the coarse
    form (whole groups, one value each), else None. No SD ids: ``{}``."""
    groups = {}
    for ids, g in ((IN_IDS, "in"), (MID_IDS, "mid"), (OUT_IDS, "out")):
        present = [i for i in ids if i in blocks]
        if not present:
            continue
        vals = [blocks[i] for i in present]
        if len(present) != len(ids) or any(v != vals[0] for v in vals[1:]):
            return None
        groups[g] = vals[0]
    return groups


def _mul(a, b):
    """Product of two weights, at most one of them keyframes (scaled point by point, which
    commutes with the linear interpolation)."""
    from .spec import Keyframes

    ka, kb = isinstance(a, Keyframes), isinstance(b, Keyframes)
    if ka and kb:
        raise BlockWeightError("two keyframed block weights cannot be multiplied")
    if ka or kb:
        k, c = (a, b) if ka else (b, a)
        return k if float(c) == 1.0 else Keyframes(tuple((w * float(c), p) for w, p in k.points))
    return float(a) * float(b)


# --- ComfyUI Inspire Pack: positional over the blocks present in the LoRA ----------------------

#: Inspire's block groups walked positionally, in its order (its ``double_blocks``, then
#: ``single_blocks``); every other module ("others") takes BASE, the vector's first value.
#: The default; :func:`inspire_walked` finds them from a model's table (HiDream's
#: ``double_stream_blocks`` are "others" to Inspire, HunyuanVideo's ``double_blocks`` are not)
INSPIRE_GROUPS = ("D", "S")
_INSPIRE_PREFIXES = ("double_blocks.", "single_blocks.")


def inspire_walked(infos: Iterable) -> tuple:
    """The block-id tags Inspire walks on a model whose denoiser modules are ``infos``
    (``ModuleInfo`` s): those whose original (ComfyUI) name starts with ``double_blocks.``,
    then ``single_blocks.``, which is all Inspire recognises."""
    found = {}
    for m in infos:
        b, path = getattr(m, "block", ""), getattr(m, "ldm_path", None) or ""
        if not _DIT_NUMBERED.match(b) or b in _GROUP:
            continue
        for i, prefix in enumerate(_INSPIRE_PREFIXES):
            if path.startswith(prefix):
                found.setdefault(b[0], i)
    return tuple(sorted(found, key=found.get))
#: Inspire Pack's numeric presets (``resources/lbw-preset.txt``; R/U/A/B ones left out)
INSPIRE_PRESETS = MappingProxyType({
    **{"SD-" + k: v for k, v in _LBW_DEFAULTS.items()}, **{"SD-" + k: v for k, v in _SD_EXTRA.items()},
    "SD-LyC-NONE": (0.0,) * 27, "SD-LyC-ALL": (1.0,) * 27,
    "SD-LyC-INALL": (1.0,) * 12 + (0.0,) * 15,
    "SD-LyC-MIDALL": (1.0,) + (0.0,) * 11 + (1.0,) * 3 + (0.0,) * 12,
    "SD-LyC-OUTALL": (1.0,) + (0.0,) * 14 + (1.0,) * 12,
    "SDXL-NONE": (0.0,) * 12, "SDXL-ALL": (1.0,) * 12,
    "SDXL-INALL": (1.0,) * 5 + (0.0,) * 7, "SDXL-MIDALL": (1.0,) + (0.0,) * 4 + (1.0,) + (0.0,) * 6,
    "SDXL-OUTALL": (1.0,) + (0.0,) * 5 + (1.0,) * 6,
    "SDXL-LyC-NONE": (0.0,) * 21, "SDXL-LyC-ALL": (1.0,) * 21,
    "SDXL-LyC-INALL": (1.0,) * 9 + (0.0,) * 12,
    "SDXL-LyC-MIDALL": (1.0,) + (0.0,) * 8 + (1.0,) * 3 + (0.0,) * 9,
    "SDXL-LyC-OUTALL": (1.0,) + (0.0,) * 11 + (1.0,) * 9,
    "FLUX-DBL-FRONT": (1.0,) * 6 + (0.0,) * 12,
    "FLUX-DBL-MID": (0.0,) * 6 + (1.0,) * 6 + (0.0,) * 6,
    "FLUX-DBL-TAIL": (0.0,) * 12 + (1.0,) * 6,
})
INSPIRE_MIN = 12  # Inspire's validate(): fewer values are not a vector


def parse_inspire(text: str) -> tuple:
    """``inspire=`` text: an Inspire Pack preset name or at least 12 comma-separated numbers
    (Inspire's own rule; a full Flux LoRA takes 58: BASE, 19 double, 38 single)."""
    s = str(text).strip()
    if not s:
        raise BlockWeightError("empty Inspire block vector: give a preset name or numbers (58 for Flux)")
    if "," not in s and not _NUMBER.fullmatch(s):
        hit = INSPIRE_PRESETS.get(s) or next(
            (v for k, v in INSPIRE_PRESETS.items() if k.lower() == s.lower()), None)
        if hit is None:
            raise BlockWeightError(f"unknown Inspire preset {s!r}; presets: {', '.join(INSPIRE_PRESETS)},"
                                   f" or {INSPIRE_MIN}+ numbers (58 for Flux)")
        return tuple(hit)
    vals = _numbers(s)
    if len(vals) < INSPIRE_MIN:
        raise BlockWeightError(f"an Inspire block vector has {len(vals)} values; it needs at least "
                               f"{INSPIRE_MIN} (58 for Flux: BASE, 19 double, 38 single)")
    return vals


def inspire_name(values: tuple) -> Optional[str]:
    """The Inspire preset that is exactly ``values``, or None."""
    return next((k for k, v in INSPIRE_PRESETS.items() if tuple(v) == tuple(values)), None)


def inspire_weights(values: Iterable[float], present: Iterable[str],
                    model_blocks: Iterable[str] = (), walked: tuple = INSPIRE_GROUPS) -> dict:
    """Inspire Pack's "LoRA Loader (Block Weight)" semantics, exactly (its ``load_lbw``).

    ``present``: the denoiser block ids the LoRA has modules in. Inspire walks the LoRA's
    double blocks (sorted by number), then its single blocks, and takes the vector's next value
    whenever the block *number* differs from the previous one's (so a single block with the
    same number as the last double block keeps that block's value); once the vector is used up
    the last value stays. Every other module (``IN``/``OUT`` embedders and output layers,
    Chroma's approximator, every block of a family without double/single blocks, the text
    encoders) gets the first value, BASE. Returns block id -> weight, with ``BASE`` and every
    non-positional id of ``model_blocks``. ``walked``: the tags of the double and single blocks
    (:func:`inspire_walked`).
    """
    vals = [float(v) for v in values]
    base = vals[0]
    out = {"BASE": base}
    for b in model_blocks:
        if is_dit_block(b) and (b in DIT_TOP_IDS or b[0] not in walked):
            out[b] = base
    ratio = 1.0
    vi = 1
    last = None
    for tag in walked:
        nums = sorted(int(b[1:]) for b in present if _DIT_NUMBERED.match(b) and b[0] == tag and b not in _GROUP)
        for n in nums:
            if last != n and len(vals) > vi:
                ratio = vals[vi]
                vi += 1
            last = n
            out[f"{tag}{n:02d}"] = ratio
    for b in present:
        if b not in out and is_dit_block(b):
            out[b] = base
    return out


# --- KJNodes: alpha per block ---------------------------------------------------------------------

#: KJNodes FluxBlockLoraSelect's inputs in order (``double_blocks.0.`` .. ``single_blocks.37.``)
KJ_FLUX_IDS = _ids("D", 19) + _ids("S", 38)


def parse_kj_alpha(text: str) -> dict:
    """``kjalpha=`` text: KJNodes' "Flux Block Lora Select" values, which *set each block's
    alpha* (0 drops the block): 57 numbers in its order (double blocks 0..18, single blocks
    0..37), or ``ID=alpha,ID-ID=alpha`` on numbered DiT blocks. Blocks not named keep the
    file's own scale."""
    s = str(text).strip()
    if not s:
        raise BlockWeightError("empty KJNodes alpha values: give 57 numbers (Flux) or ID=alpha,...")
    if "=" in s:
        out = parse_ids(s)
        if kind_of(out) == "sd":
            raise BlockWeightError("KJNodes alpha values are per numbered DiT block (D05, S12, ...), not SD blocks")
        bad = next((b for b in out if not is_dit_block(b) or b in DIT_TOP_IDS), None)
        if bad is not None:
            raise BlockWeightError(f"KJNodes alpha values are per numbered DiT block (D05, S12, ...), not {bad}")
        return out
    vals = _numbers(s)
    if len(vals) != len(KJ_FLUX_IDS):
        raise BlockWeightError(f"a KJNodes alpha vector has {len(vals)} values; expected 57 (Flux: "
                               "double_blocks.0-18, single_blocks.0-37) or ID=alpha,...")
    return dict(zip(KJ_FLUX_IDS, vals))


def kj_args(kj: Mapping) -> str:
    """``kjalpha=`` text for ``kj``."""
    if set(kj) == set(KJ_FLUX_IDS):
        return ",".join(_fmt(kj[b]) for b in KJ_FLUX_IDS)
    return _id_args(kj)


def kj_multipliers(kj: Mapping, bindings, label: str = "this LoRA") -> dict:
    """Block id -> multiplier that makes each module's scale ``alpha / rank`` with KJNodes'
    alpha (``value / rank`` replaces the file's ``alpha / rank``, or ``1`` where the file has no
    alpha; so the multiplier is ``value / file alpha``, or ``value / rank``).

    ``bindings``: the LoRA's bindings on the model. Every module of one block must come to the
    same multiplier (one alpha and rank per block, as trainers write them), else an error."""
    found: dict = {}
    for b in bindings:
        blocks = {t.block for t in b.targets if t.component == "unet" and t.block in kj}
        if not blocks:
            continue
        adapter = b.adapter
        rank, scale = adapter.rank, float(adapter.scale())
        if not rank or scale == 0.0:
            raise BlockWeightError(f"kjalpha= sets alpha/rank, but a {adapter.type_name} module in block "
                                   f"{sorted(blocks)[0]} of {label} has no rank or a zero scale")
        for blk in blocks:
            m = float(kj[blk]) / float(rank) / scale
            prev = found.setdefault(blk, m)
            if not math.isclose(prev, m, rel_tol=1e-9, abs_tol=0.0):
                raise BlockWeightError(
                    f"kjalpha= gives block {blk} one alpha, but its modules in {label} have different "
                    "ranks or alphas; use lbw= multipliers for this file")
    return found


# --- resolving against a model and a LoRA --------------------------------------------------------

def resolve(blocks: Optional[Mapping], inspire: Optional[tuple], *, model_blocks: Iterable[str],
            present: Iterable[str] = (), label: str = "this model",
            inspire_groups: tuple = INSPIRE_GROUPS) -> Optional[dict]:
    """Block weights as plain per-id multipliers for one model and one LoRA.

    ``model_blocks``: the block ids of the model's denoiser (empty when it has none bound);
    ``present``: those the LoRA has modules in (needed for ``inspire``). On an SD model the
    weights must be SD ones and come back unchanged. On a DiT model SD ids may only be the
    coarse form, which becomes per-id multipliers (:func:`coarse_groups`) folded into the DiT
    ids; explicit and Inspire weights multiply with it. Raises :class:`BlockWeightError` for
    weights of another family.
    """
    model_blocks = set(model_blocks)
    dit_model = any(is_dit_block(b) for b in model_blocks)
    sd_model = any(b in _GROUP for b in model_blocks)
    kind = kind_of(blocks)
    if sd_model:
        if inspire is not None:
            raise BlockWeightError(
                "inspire= (Inspire Pack's positional vectors) works on Flux-style double/single "
                f"blocks; {label} has SD blocks: use lbw=")
        if kind == "dit":
            bad = next(b for b in blocks if is_dit_block(b) or b in ("CLIP", "T5"))
            raise BlockWeightError(f"block weights name DiT block {bad}; {label} has SD blocks "
                                   "(BASE, IN00.., M00, OUT00..)")
        return None if blocks is None else dict(blocks)
    if not dit_model and inspire is None:
        return None if blocks is None else dict(blocks)
    blocks = dict(blocks or {})
    groups = coarse_values(blocks)
    if groups is None:
        raise BlockWeightError(
            f"an SD block vector (lbw= with 12/17/20/26 values or an SD preset) does not fit {label}; "
            f"its blocks are {_describe(model_blocks)}: use ID=v weights, FLUXALL or 61 values "
            "(Flux), inspire=, or in=/mid=/out=")
    tags = {m[0] for m in model_blocks if is_dit_block(m) and m not in DIT_TOP_IDS}
    bad = next((b for b in blocks if is_dit_block(b) and b not in DIT_TOP_IDS and b[0] not in tags), None)
    if bad is not None and tags:
        raise BlockWeightError(f"block weights name block {bad}; {label} has blocks {_describe(model_blocks)}")
    out = {b: v for b, v in blocks.items() if b in TE_IDS or is_dit_block(b)}
    if inspire is not None:
        for b, v in inspire_weights(inspire, present, model_blocks, inspire_groups).items():
            out[b] = _mul(out[b], v) if b in out else v
    if groups:
        for b, g in coarse_groups(model_blocks).items():
            if g in groups:
                out[b] = _mul(out.get(b, 1.0), groups[g])
    return out


def _describe(model_blocks) -> str:
    ids = sorted({b for b in model_blocks if is_dit_block(b)}, key=dit_order)
    if not ids:
        return "none"
    runs, prev = [], None
    for b in ids:
        if prev and b[0] == prev[-1][0] and len(b) == 3 and len(prev[-1]) == 3 and b not in DIT_TOP_IDS \
                and prev[-1] not in DIT_TOP_IDS and int(b[1:]) == int(prev[-1][1:]) + 1:
            prev.append(b)
            continue
        prev = [b]
        runs.append(prev)
    return ", ".join(r[0] if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)


def te_weight(blocks: Mapping, component: str):
    """The multiplier of a text encoder ``component``: ``CLIP`` (te1/te2) or ``T5`` (te3) when
    given, else ``BASE``, else 1."""
    k = _TE_SPECIFIC.get(component)
    if k is not None and k in blocks:
        return blocks[k]
    return blocks.get("BASE", 1.0)


def block_weight(blocks: Mapping, block: str):
    """The multiplier of a denoiser module in ``block`` (not ``BASE``: those are not weighted).

    Raises :class:`BlockWeightError` when the weights are for another kind of model or still
    need resolving against the model (DiT coarse form: see :func:`resolve`)."""
    if block in _GROUP:
        if any(b in ("CLIP", "T5") or is_dit_block(b) for b in blocks):
            raise BlockWeightError(f"block weights name DiT blocks; this module is in SD block {block}")
    elif any(b in _GROUP for b in blocks):
        raise BlockWeightError(
            f"SD block ids or the coarse in=/mid=/out= form need resolving for DiT block {block} "
            "(LoraSpec.bind_blocks with the LoRA's resolution and the model's key map)")
    return blocks.get(block, 1.0)


# ---------------------------------------------------------------------------------------------
# back to text (for format_tag / infotext)

def _fmt(x: float) -> str:
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x)) if x != 0 else "0"
    return repr(x)


def _coarse_args(groups: Mapping, fmt_weight) -> list:
    out = []
    for g, v in groups.items():
        if isinstance(v, (int, float)):
            out.append(f"{g}={_fmt(v)}")
        elif fmt_weight is not None:
            out.append(f"{g}={fmt_weight(v)}")
        else:
            raise BlockWeightError(f"cannot write block weight {v!r}")
    return out


def _id_args(ids: Mapping) -> str:
    """``ID=v,...`` text for DiT/text-encoder weights, runs of equal numbered ids as ranges."""
    te = [b for b in TE_IDS if b in ids]
    dit = sorted((b for b in ids if b not in TE_IDS), key=dit_order)
    parts = [f"{b}={_fmt(ids[b])}" for b in te]
    run: list = []

    def flush():
        if run:
            parts.append(f"{run[0]}={_fmt(ids[run[0]])}" if len(run) == 1
                         else f"{run[0]}-{run[-1]}={_fmt(ids[run[0]])}")

    for b in dit:
        p = run[-1] if run else None
        if (p is not None and b not in DIT_TOP_IDS and p not in DIT_TOP_IDS and b[0] == p[0]
                and int(b[1:]) == int(p[1:]) + 1 and float(ids[b]) == float(ids[p])):
            run.append(b)
            continue
        flush()
        run = [b]
    flush()
    return ",".join(parts)


def block_args(blocks: Optional[Mapping], fmt_weight=None) -> list:
    """Tag arguments that re-create ``blocks``: ``["lbw=NAME"]``, ``["lbw=v,v,..."]``,
    ``["lbw=ID=v,..."]`` (DiT ids) and/or ``["in=V", "mid=V", "out=V"]``. ``fmt_weight``
    formats a non-number value (keyframes).

    SD ids absent from ``blocks`` mean 1 (as :meth:`LoraSpec.strength` reads them), so a
    partial dict of numbers comes back as an equivalent full vector. Raises
    :class:`BlockWeightError` for what no tag can say (unknown ids; keyframes other than the
    coarse form).
    """
    if blocks is None:
        return []
    unknown = [k for k in blocks if not is_known_id(k)]
    if unknown:
        raise BlockWeightError(f"unknown block ids {unknown}; known: {', '.join(ALL_IDS)}, "
                               f"CLIP, T5, IN, OUT, {', '.join(t + 'nn' for t in _dit_tags())}")
    if kind_of(blocks) == "dit":
        groups = coarse_values(blocks)
        if groups is None:
            raise BlockWeightError("SD block ids next to DiT ones can only be the in=/mid=/out= form")
        ids = {b: v for b, v in blocks.items() if b not in _GROUP}
        if not all(isinstance(v, (int, float)) for v in ids.values()):
            raise BlockWeightError(
                "block weights that change per step can only be written as in=/mid=/out=")
        if set(ids) == set(LBW_FLUX_IDS):
            vec = [float(ids[b]) for b in LBW_FLUX_IDS]
            arg = "lbw=FLUXALL" if vec == list(PRESETS["FLUXALL"]) else "lbw=" + ",".join(_fmt(v) for v in vec)
        else:
            arg = "lbw=" + _id_args(ids)
        return [arg] + _coarse_args(groups, fmt_weight)
    # pure coarse form: whole groups with one value each, BASE untouched
    if blocks and "BASE" not in blocks:
        groups = coarse_values(blocks)
        if groups is not None:
            return _coarse_args(groups, fmt_weight)
    if not all(isinstance(v, (int, float)) for v in blocks.values()):
        raise BlockWeightError(
            "block weights that change per step can only be written as in=/mid=/out=")
    eff = {b: float(blocks.get(b, 1.0)) for b in ALL_IDS}
    for name, vec in PRESETS.items():
        if len(vec) != 61 and expand_vector(vec) == eff:
            return [f"lbw={name}"]
    for n in (17, 12, 20, 26):  # the most common layouts first
        vec = [eff[b] for b in LBW_LAYOUTS[n]]
        if expand_vector(vec) == eff:
            return ["lbw=" + ",".join(_fmt(v) for v in vec)]
    raise AssertionError("unreachable: the 26-value layout names every id")
