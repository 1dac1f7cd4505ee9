"""The LoRA prompt syntax: one grammar for every host and the standalone sampler.

::

    <lora:NAME[:W[:UNET[:DYN]]][:te=V][:unet=V][:in=V][:mid=V][:out=V]
          [:lbw=PRESET|v,v,...|ID=v,...][:inspire=PRESET|v,v,...][:kjalpha=v,...|ID=v,...]
          [:start=N][:stop=N][:step=A-B][:hr=V][:hrte=V][:hrunet=V][:dyn=N]>
    aliases: <lyco:...>, <loractl:...>    (the tag kind is matched case-insensitively)

    V := number | keyframes        keyframes := w@pos([,;]w@pos)*   ("~" may replace "@")

Semantics, with the peer each rule follows:

* **A1111 positional** (``extra_networks_lora``): ``W`` is the text-encoder strength and, unless
  ``UNET`` is given, the UNet strength too; ``DYN`` is ``dyn_dim``. A named ``te=`` overrides
  ``W``, and the UNet strength still defaults to the final te value (so ``<lora:x:1:te=0>``
  switches the UNet off too, exactly as in A1111, SD.Next, loractl and lbw; write
  ``te=0:unet=1`` to silence only the text encoder). ``unet=`` overrides ``UNET``.
* **SD.Next named** ``te= unet= in= mid= out= dyn=``; ``in``/``mid``/``out`` are block
  multipliers here (see :mod:`lora_ext.blocks` for how that compares with SD.Next).
* **loractl keyframes** in any weight: ``0@0,1@0.5`` or ``te=0.1@1,0.6@6``; entries separated by
  ``,`` or ``;``, weight and position by ``@`` or ``~``; an entry without a position has
  position 1 (loractl's rule), but a list must have at least one explicit position. Positions
  are fractions of the pass when the largest is <= 1, else step numbers; piecewise linear,
  clamped. ``hr=`` is the weight of both components on the hires pass, ``hrte=``/``hrunet=``
  of one of them (loractl).
* **lbw** (sd-webui-lora-block-weight): ``lbw=PRESET`` or ``lbw=v,v,...`` with 12/17/20/26
  numbers, or lbw's 61 Flux numbers (``CLIP,T5,IN,D00..D18,S00..S37,OUT``; preset
  ``FLUXALL``) (``w=`` is accepted as lbw does); the older lbw form with the preset or vector
  in the ``UNET`` position (``<lora:x:1:OUTD>``) is read too. ``lbw=ID=v,ID-ID=v,...`` sets
  family-native ids explicitly (``lbw=S00-S37=0,IN=0.5,T5=0``; unnamed ids are 1).
* **ComfyUI Inspire Pack** ``inspire=PRESET|v,v,...``: its "LoRA Loader (Block Weight)"
  vectors (``BASE``, then one value per double/single block *the LoRA has*, e.g. 58 for a
  full Flux LoRA), with Inspire's positional semantics (see :func:`lora_ext.blocks.inspire_weights`);
  cannot be combined with ``lbw=``.
* **KJNodes** ``kjalpha=v,...|ID=v,...``: its "Flux Block Lora Select" values, which set each
  block's *alpha* (so multiply by value / the file's alpha, or / rank without one; 0 drops the
  block): 57 numbers (double blocks 0..18, single blocks 0..37) or ``D05=8,S00-S37=0``;
  blocks not named keep the file's scale. Multiplies with the other block weights. ``start=N``/``stop=N``: the LoRA acts
  from step N / stops acting at step N; a value strictly between 0 and 1 is a fraction of the
  run. ``step=A-B`` is ``start=A:stop=B``. Not supported (clear errors): ``lbwe=``, ``x=``,
  random/inherited vector values (``R``, ``U``, ``X``).

Anything else is an error naming the tag and the 0-based character position in the original
text: unknown arguments (with a suggestion), bad numbers, tags nested in tags, unclosed tags.
Other extra networks (``<hypernet:...>``, ``<ti:...>``) are left in the prompt for the host.

The returned prompt has the tags removed; the whitespace and commas around each removed run
of tags collapse to one separator (``", "`` if there was a comma, else a newline if there was
one, else a space), or to nothing at the start or end of the prompt.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from . import blocks as _blocks
from .errors import LoraExtError
from .spec import Keyframes, LoraSpec, Weight

__all__ = ["PromptSyntaxError", "ParsedPrompt", "parse_prompt", "parse_tag", "parse_weight",
           "format_tag", "format_weight", "TAG_KINDS"]

#: tag kinds this grammar handles
TAG_KINDS = ("lora", "lyco", "loractl")

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DYN_RE = re.compile(r"\d{1,9}")
_STEP_RANGE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*-\s*(\d+(?:\.\d*)?|\.\d+)\s*")

_WEIGHT_KEYS = ("te", "unet", "in", "mid", "out", "hr", "hrte", "hrunet")
_KNOWN_KEYS = _WEIGHT_KEYS + ("lbw", "w", "inspire", "kjalpha", "start", "stop", "step", "dyn", "high", "low")
_UNSUPPORTED_KEYS = {
    "lbwe": "lbw's elemental weights (lbwe=) are not supported",
    "x": "lbw's inherited weight (x=) is not supported",
}


class PromptSyntaxError(LoraExtError, ValueError):
    """A LoRA tag that cannot be read. ``str()``: ``<tag> at position N: problem``.

    Attributes: ``tag`` (the tag text), ``position`` (0-based index of the problem in the
    original text), ``problem``.
    """

    def __init__(self, tag: str, position: int, problem: str):
        self.tag = tag
        self.position = position
        self.problem = problem
        shown = tag if len(tag) <= 160 else tag[:157] + "..."
        shown = shown.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(f"{shown} at position {position}: {problem}")


@dataclass
class ParsedPrompt:
    """The prompt with its LoRA tags removed, and one spec per tag, in order."""

    prompt: str
    specs: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# weights

class _Bad(ValueError):
    """A problem inside one argument; ``offset`` is relative to the argument's text."""

    def __init__(self, problem: str, offset: int = 0):
        super().__init__(problem)
        self.problem = problem
        self.offset = offset


def _number(tok: str) -> Optional[float]:
    if not _NUMBER_RE.fullmatch(tok):
        return None
    v = float(tok)
    return v if math.isfinite(v) else None


def parse_weight(text: str) -> Weight:
    """A number, or loractl keyframes (``w@pos,...``). Raises ``ValueError`` when neither."""
    try:
        return _weight(text)
    except _Bad as e:
        raise ValueError(e.problem) from None


def _weight(text: str) -> Weight:
    s = text.strip()
    v = _number(s)
    if v is not None:
        return v
    if "@" not in s and "~" not in s:
        raise _Bad("expects a number or keyframes w@pos,...")
    points = []
    explicit = False
    offset = 0
    for entry in re.split(r"[,;]", text):
        parts = re.split(r"[@~]", entry)
        nums = [_number(p.strip()) for p in parts]
        if len(parts) > 2 or any(n is None for n in nums):
            raise _Bad(f"keyframe {entry.strip()!r} is not w@pos (two numbers)",
                       offset + len(entry) - len(entry.lstrip()))
        if len(parts) == 2:
            explicit = True
            points.append((nums[0], nums[1]))
        else:
            points.append((nums[0], 1.0))  # loractl: an entry without a position is at 1
        offset += len(entry) + 1
    if not explicit:  # pragma: no cover - guarded by the "@"/"~" check above
        raise _Bad("expects a number or keyframes w@pos,...")
    return Keyframes(tuple(points))


def _fmt_number(x: float) -> str:
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def format_weight(w: Weight) -> str:
    """A weight as tag text: ``0.8`` or ``0@0,1@0.5``."""
    if isinstance(w, Keyframes):
        return ",".join(f"{_fmt_number(a)}@{_fmt_number(p)}" for a, p in w.points)
    return _fmt_number(w)


# ---------------------------------------------------------------------------------------------
# one tag

@dataclass
class _Item:
    text: str  # stripped
    pos: int  # index of text[0] in the original prompt


def _split_items(body: str, body_pos: int) -> list:
    items = []
    i = 0
    for raw in body.split(":"):
        lead = len(raw) - len(raw.lstrip()) if raw.strip() else 0
        items.append(_Item(raw.strip(), body_pos + i + lead))
        i += len(raw) + 1
    return items


def _is_weight(text: str) -> bool:
    try:
        _weight(text)
        return True
    except _Bad:
        return False


def _legacy_lbw(text: str, presets) -> bool:
    """Whether a non-weight UNET positional is an lbw preset name or vector (old lbw syntax)."""
    if "," in text and "@" not in text and "~" not in text:
        return True
    return _blocks._lookup(text, presets) is not None


def parse_tag(tag: str, *, position: int = 0,
              presets: Optional[Mapping[str, Iterable[float]]] = None) -> LoraSpec:
    """One tag (``<lora:...>``) as a :class:`LoraSpec`. ``position`` is where the tag starts in
    the text it came from (for error messages)."""
    m = re.match(r"<(\w+):", tag)
    if m is None or m.group(1).lower() not in TAG_KINDS or not tag.endswith(">"):
        raise PromptSyntaxError(tag, position, f"not a tag of kind {'/'.join(TAG_KINDS)}")
    body = tag[m.end():-1]
    if "<" in body or ">" in body:
        bad = m.end() + min(i for i in (body.find("<"), body.find(">")) if i >= 0)
        raise PromptSyntaxError(tag, position + bad, "'<' or '>' inside a tag")
    return _parse_body(tag, position, body, position + m.end(), presets)


def _parse_body(tag: str, tag_pos: int, body: str, body_pos: int, presets) -> LoraSpec:
    def fail(item_pos: int, problem: str):
        raise PromptSyntaxError(tag, item_pos, problem)

    items = _split_items(body, body_pos)
    name = items[0]
    if not name.text:
        fail(name.pos, "the LoRA name is empty")
    positional: list = []
    named: dict = {}
    key_at: dict = {}  # where each named argument starts
    for it in items[1:]:
        if not it.text:
            fail(it.pos, "empty argument (two ':' in a row, or a ':' before '>')")
        key, eq, value = it.text.partition("=")
        if not eq:
            positional.append(it)
            continue
        key = key.strip()
        if not _KEY_RE.fullmatch(key):
            fail(it.pos, f"{it.text!r} is not name=value")
        lkey = key.lower()
        if lkey in _UNSUPPORTED_KEYS:
            fail(it.pos, _UNSUPPORTED_KEYS[lkey])
        if lkey not in _KNOWN_KEYS:
            close = difflib.get_close_matches(lkey, _KNOWN_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}=?)" if close else ""
            fail(it.pos, f"unknown argument {key}={hint}; known: {'= '.join(_KNOWN_KEYS)}=")
        if lkey == "w":
            lkey = "lbw"
        if lkey in named:
            fail(it.pos, f"{lkey}= is given twice")
        vstart = it.text.index("=") + 1
        vlead = len(it.text[vstart:]) - len(it.text[vstart:].lstrip())
        named[lkey] = _Item(value.strip(), it.pos + vstart + vlead)
        key_at[lkey] = it.pos

    def weight(item: _Item, what: str) -> Weight:
        try:
            return _weight(item.text)
        except _Bad as e:
            fail(item.pos + e.offset, f"{what} {e.problem}")

    spec = LoraSpec(name=name.text, tag=tag)

    # positional: te, unet (or old-style lbw), dyn
    lbw_item = None
    if len(positional) > 3:
        fail(positional[3].pos, "too many positional arguments (NAME:TE:UNET:DYN at most)")
    te: Weight = 1.0
    unet: Optional[Weight] = None
    dyn_item = None
    if len(positional) > 0:
        te = weight(positional[0], "the strength")
    if len(positional) > 1:
        p = positional[1]
        if not _is_weight(p.text) and _legacy_lbw(p.text, presets):
            lbw_item = p
        else:
            unet = weight(p, "the UNet strength")
    if len(positional) > 2:
        dyn_item = positional[2]

    if "te" in named:
        te = weight(named["te"], "te=")
    if "unet" in named:
        unet = weight(named["unet"], "unet=")
    spec.te = te
    spec.unet = te if unet is None else unet
    for key, attr in (("hr", "hr"), ("hrte", "hr_te"), ("hrunet", "hr_unet")):
        if key in named:
            setattr(spec, attr, weight(named[key], f"{key}="))
    for key in ("high", "low"):  # a two-expert pair's own strength per expert (lora_ext.experts)
        if key in named:
            spec.extra[f"{key}_weight"] = weight(named[key], f"{key}=")

    # dyn
    if "dyn" in named:
        if dyn_item is not None:
            fail(key_at["dyn"], "dyn= is given twice (also as the fourth positional value)")
        dyn_item = named["dyn"]
    if dyn_item is not None:
        if not _DYN_RE.fullmatch(dyn_item.text) or int(dyn_item.text) < 1:
            fail(dyn_item.pos, "dyn expects a whole number >= 1 (the rank to use)")
        spec.extra["dyn"] = int(dyn_item.text)

    # blocks
    if "lbw" in named:
        if lbw_item is not None:
            fail(key_at["lbw"], "lbw= is given twice (also in the UNET position)")
        lbw_item = named["lbw"]
    block_weights = None
    if lbw_item is not None:
        try:
            block_weights = _blocks.parse_lbw(lbw_item.text, presets)
        except _blocks.BlockWeightError as e:
            fail(lbw_item.pos, f"{'lbw=' if lbw_item is named.get('lbw') else 'block weights:'} {e}")
    if "inspire" in named:
        if lbw_item is not None:
            fail(key_at["inspire"], "inspire= cannot be combined with lbw= (two ways of giving block weights)")
        try:
            spec.inspire = _blocks.parse_inspire(named["inspire"].text)
        except _blocks.BlockWeightError as e:
            fail(named["inspire"].pos, f"inspire= {e}")
    if "kjalpha" in named:
        try:
            spec.kj_alpha = _blocks.parse_kj_alpha(named["kjalpha"].text)
        except _blocks.BlockWeightError as e:
            fail(named["kjalpha"].pos, f"kjalpha= {e}")
    coarse = {}
    for key in ("in", "mid", "out"):
        if key in named:
            v = weight(named[key], f"{key}=")
            if isinstance(v, Keyframes) and block_weights is not None and _blocks.kind_of(block_weights) != "dit":
                fail(named[key].pos, f"{key}= keyframes cannot be combined with an SD lbw= vector; "
                     "use a number, or drop lbw=")
            coarse[key] = v
    if coarse:
        groups = _blocks.coarse(coarse.get("in"), coarse.get("mid"), coarse.get("out"))
        if block_weights is None:
            block_weights = groups
        elif _blocks.kind_of(block_weights) == "dit":
            # DiT ids: the coarse form is resolved against the model's depth when bound
            block_weights.update(groups)
        else:
            for b, v in groups.items():
                block_weights[b] = block_weights[b] * v
    spec.blocks = block_weights

    # start / stop
    def when(item: _Item, what: str) -> float:
        v = _number(item.text)
        if v is None or v < 0:
            fail(item.pos, f"{what} expects a step number or a fraction of the run (>= 0)")
        return v

    if "step" in named:
        if "start" in named or "stop" in named:
            fail(key_at["step"], "step= cannot be combined with start=/stop=")
        mm = _STEP_RANGE_RE.fullmatch(named["step"].text)
        if mm is None:
            fail(named["step"].pos, "step= expects A-B (start and stop steps)")
        spec.start, spec.stop = float(mm.group(1)), float(mm.group(2))
        if not all(math.isfinite(v) for v in (spec.start, spec.stop)):
            fail(named["step"].pos, "step= expects A-B (start and stop steps)")
        where = named["step"].pos
    else:
        if "start" in named:
            spec.start = when(named["start"], "start=")
        if "stop" in named:
            spec.stop = when(named["stop"], "stop=")
        where = named["stop"].pos if "stop" in named else 0
    if spec.start is not None and spec.stop is not None:
        def kind(v):
            return "fraction" if 0 < v < 1 else "step"

        a, b = spec.start, spec.stop
        if (a == 0 or b == 0 or kind(a) == kind(b)) and a >= b:
            fail(where, "the LoRA would never act: start must come before stop")
    return spec


# ---------------------------------------------------------------------------------------------
# the whole prompt

_OPENER_RE = re.compile(r"<(?:%s):" % "|".join(TAG_KINDS), re.IGNORECASE)
_SEP_CHARS = " \t\r\n\f\v,"


def _find_tags(text: str):
    """(start, end) of every tag; raises for unclosed or nested ones."""
    spans = []
    i = 0
    while True:
        m = _OPENER_RE.search(text, i)
        if m is None:
            return spans
        j = m.end()
        close = text.find(">", j)
        inner = text.find("<", j)
        if close < 0:
            raise PromptSyntaxError(text[m.start():m.start() + 80], m.start(),
                                    "unclosed tag: no '>' after it")
        if 0 <= inner < close:
            raise PromptSyntaxError(text[m.start():close + 1], inner,
                                    "'<' inside a tag (tags cannot be nested)")
        spans.append((m.start(), close + 1))
        i = close + 1


def _join(left: str, run: str, right: str) -> str:
    if not left or not right:
        sep = ""
    elif "," in run:
        sep = ",\n" if "\n" in run.split(",")[-1] else ", "
    elif "\n" in run:
        sep = "\n"
    elif run:
        sep = " "
    else:
        sep = ""
        # never let two halves form a new tag opener ("<lo" + "ra:x>")
        if _OPENER_RE.search(left[-10:] + right[:10]):
            sep = " "
    return left + sep + right


def parse_prompt(text: str, *, presets: Optional[Mapping[str, Iterable[float]]] = None
                 ) -> ParsedPrompt:
    """Every ``<lora:...>``/``<lyco:...>``/``<loractl:...>`` tag of ``text``, and ``text``
    without them. ``presets`` adds lbw presets (``name -> values``) to the built-in ones.

    Raises :class:`PromptSyntaxError` (and nothing else) for a tag it cannot read.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_prompt expects a str, not {type(text).__name__}")
    spans = _find_tags(text)
    if not spans:
        return ParsedPrompt(text, [])
    specs = []
    for a, b in spans:
        tag = text[a:b]
        m = _OPENER_RE.match(tag)
        specs.append(_parse_body(tag, a, tag[m.end():-1], a + m.end(), presets))

    out = text[:spans[0][0]]
    k = 0
    while k < len(spans):
        # a run of tags separated only by whitespace/commas is removed as one
        end = spans[k][1]
        while k + 1 < len(spans) and text[end:spans[k + 1][0]].strip(_SEP_CHARS) == "":
            k += 1
            end = spans[k][1]
        nxt = spans[k + 1][0] if k + 1 < len(spans) else len(text)
        right = text[end:nxt]
        left = out.rstrip(_SEP_CHARS)
        run_left = out[len(left):]
        right_core = right.lstrip(_SEP_CHARS)
        run = run_left + right[:len(right) - len(right_core)]
        out = _join(left, run, right_core)
        k += 1
    return ParsedPrompt(out, specs)


# ---------------------------------------------------------------------------------------------
# back to text

def format_tag(spec: LoraSpec) -> str:
    """The canonical tag for ``spec`` (for infotext): parsing it gives back an equal spec.

    ``<lora:NAME:W>`` when te and UNet agree, else ``<lora:NAME:TE:UNET>``, then the named
    arguments ``dyn= lbw=|in= mid= out= inspire= kjalpha= start= stop= hr= hrte= hrunet=`` that
    differ from the defaults. Raises ``ValueError`` for what no tag can say (a name with ``:<>``, or with
    surrounding whitespace; block weights other than lbw vectors or the coarse form).
    """
    name = spec.name
    if not name or name != name.strip() or any(c in name for c in ":<>"):
        raise ValueError(f"LoRA name {name!r} cannot be written in a tag")
    parts = [name]
    if spec.te == spec.unet:
        parts.append(format_weight(spec.te))
    else:
        parts += [format_weight(spec.te), format_weight(spec.unet)]
    dyn = spec.extra.get("dyn") if spec.extra else None
    if dyn is not None:
        parts.append(f"dyn={int(dyn)}")
    parts += _blocks.block_args(spec.blocks, format_weight)
    if spec.inspire is not None:
        name_ = _blocks.inspire_name(spec.inspire)
        parts.append("inspire=" + (name_ or ",".join(_fmt_number(v) for v in spec.inspire)))
    if spec.kj_alpha is not None:
        parts.append("kjalpha=" + _blocks.kj_args(spec.kj_alpha))
    if spec.start is not None:
        parts.append(f"start={_fmt_number(spec.start)}")
    if spec.stop is not None:
        parts.append(f"stop={_fmt_number(spec.stop)}")
    for key, w in (("hr", spec.hr), ("hrte", spec.hr_te), ("hrunet", spec.hr_unet)):
        if w is not None:
            parts.append(f"{key}={format_weight(w)}")
    for key in ("high", "low"):
        w = spec.extra.get(f"{key}_weight") if spec.extra else None
        if w is not None:
            parts.append(f"{key}={format_weight(w)}")
    return "<lora:" + ":".join(parts) + ">"
