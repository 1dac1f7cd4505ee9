"""The prompt grammar: A1111 positional, SD.Next named, loractl keyframes, lbw, errors, cleaning.

Table-driven cases check each peer's rule; hypothesis checks that any text either parses or
raises PromptSyntaxError, that parsing the cleaned prompt finds nothing more, and that
``format_tag`` round-trips every spec the parser can produce.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_ext
from lora_ext import blocks as B
from lora_ext.prompt import (ParsedPrompt, PromptSyntaxError, format_tag, format_weight,
                             parse_prompt, parse_tag, parse_weight)
from lora_ext.spec import Keyframes, LoraSpec

KF = Keyframes


def one(text, **kw) -> LoraSpec:
    res = parse_prompt(text, **kw)
    assert len(res.specs) == 1, res
    return res.specs[0]


def test_public_names():
    assert lora_ext.parse_prompt is parse_prompt
    assert lora_ext.format_tag is format_tag
    assert issubclass(PromptSyntaxError, lora_ext.LoraExtError)
    assert isinstance(parse_prompt("x"), ParsedPrompt)


# ---------------------------------------------------------------------------------------------
# grammar: (tag, expected fields)

GRAMMAR = [
    # A1111 positional: <lora:name[:te[:unet[:dyn]]]>
    ("<lora:x>", dict(te=1.0, unet=1.0)),
    ("<lora:x:0.8>", dict(te=0.8, unet=0.8)),
    ("<lora:x:0.8:0.3>", dict(te=0.8, unet=0.3)),
    ("<lora:x:1:0.5:16>", dict(te=1.0, unet=0.5, extra={"dyn": 16})),
    ("<lora:x:-0.5>", dict(te=-0.5, unet=-0.5)),
    ("<lora:x:.5>", dict(te=0.5, unet=0.5)),
    ("<lora:x:1.>", dict(te=1.0, unet=1.0)),
    ("<lora:x:+2e-1>", dict(te=0.2, unet=0.2)),
    ("<lora:x: 0.7 >", dict(te=0.7, unet=0.7)),
    # SD.Next / A1111 named; unet defaults to the final te (A1111's own rule)
    ("<lora:x:te=0.4>", dict(te=0.4, unet=0.4)),
    ("<lora:x:1:te=0>", dict(te=0.0, unet=0.0)),
    ("<lora:x:te=0:unet=1>", dict(te=0.0, unet=1.0)),
    ("<lora:x:0.9:unet=0.2>", dict(te=0.9, unet=0.2)),
    ("<lora:x:0.9:0.1:unet=0.2>", dict(te=0.9, unet=0.2)),
    ("<lora:x:unet=0.2:te=0.6>", dict(te=0.6, unet=0.2)),
    ("<lora:x:TE=0.6>", dict(te=0.6, unet=0.6)),
    ("<lora:x:dyn=8>", dict(extra={"dyn": 8})),
    ("<lora:x:te = 0.3 : unet= 0.2>", dict(te=0.3, unet=0.2)),
    ("<lora:x:in=0>", dict(blocks=B.coarse(0.0))),
    ("<lora:x:0.7:in=0:mid=1:out=0.5>", dict(te=0.7, unet=0.7, blocks=B.coarse(0.0, 1.0, 0.5))),
    ("<lora:x:mid=0.25>", dict(blocks={"M00": 0.25})),
    # loractl keyframes: positional, named, ~ and ; separators, implicit position 1
    ("<lora:x:0.5@0,1@0.5>", dict(te=KF(((0.5, 0), (1, 0.5))), unet=KF(((0.5, 0), (1, 0.5))))),
    ("<lora:x:te=0.1@1,0.6@6>", dict(te=KF(((0.1, 1), (0.6, 6))), unet=KF(((0.1, 1), (0.6, 6))))),
    ("<lora:x:1:0@5,1@6>", dict(te=1.0, unet=KF(((0, 5), (1, 6))))),
    ("<lora:x:te=1:unet=0@0;1@1>", dict(te=1.0, unet=KF(((0, 0), (1, 1))))),
    ("<lora:x:0~0,1~10>", dict(te=KF(((0, 0), (1, 10))))),
    ("<lora:x:1@0.5,0.25@0>", dict(te=KF(((0.25, 0), (1, 0.5))))),  # sorted by position
    ("<lora:x:0@0,0.5>", dict(te=KF(((0, 0), (0.5, 1))))),  # loractl: no position -> 1
    ("<lora:x:0.3@2>", dict(te=KF(((0.3, 2),)))),
    ("<lora:x:in=0@0,1@1>", dict(blocks=B.coarse(KF(((0, 0), (1, 1)))))),
    # hires (loractl)
    ("<lora:x:0.5:hr=1.0>", dict(te=0.5, unet=0.5, hr=1.0)),
    ("<lora:x:0@0,1@1:hr=1@0,0@1>", dict(hr=KF(((1, 0), (0, 1))))),
    ("<lora:x:hrte=0:hrunet=0.7>", dict(hr=None, hr_te=0.0, hr_unet=0.7)),
    # start / stop / step (lbw)
    ("<lora:x:start=10>", dict(start=10.0, stop=None)),
    ("<lora:x:stop=10>", dict(stop=10.0)),
    ("<lora:x:start=0.25:stop=0.75>", dict(start=0.25, stop=0.75)),
    ("<lora:x:start=0:stop=0.5>", dict(start=0.0, stop=0.5)),
    ("<lora:x:start=0.5:stop=12>", dict(start=0.5, stop=12.0)),  # fraction vs step: not compared
    ("<lora:x:step=5-10>", dict(start=5.0, stop=10.0)),
    # aliases and case
    ("<lyco:x:0.6>", dict(te=0.6)),
    ("<loractl:x:0.6:hr=1>", dict(te=0.6, hr=1.0)),
    ("<LoRA:x:0.6>", dict(te=0.6)),
    # names
    ("<lora:styles/ink wash:0.8>", dict(name="styles/ink wash", te=0.8)),
    (r"<lora:styles\ink wash:0.8>", dict(name="styles\\ink wash")),
    ("<lora:  spaced name  >", dict(name="spaced name")),
    ("<lora:v1.5-style_(final)>", dict(name="v1.5-style_(final)")),
    ("<lora:名前:1>", dict(name="名前")),
]


@pytest.mark.parametrize("tag,fields", GRAMMAR, ids=[g[0] for g in GRAMMAR])
def test_grammar(tag, fields):
    spec = one(tag)
    assert spec.tag == tag
    if "name" not in fields:
        assert spec.name == "x"
    for k, v in fields.items():
        assert getattr(spec, k) == v, (k, getattr(spec, k), v)
    # and the canonical text reads back the same
    assert one(format_tag(spec)) == spec


# ---------------------------------------------------------------------------------------------
# keyframe values at exact steps

def test_keyframes_step_numbers():
    spec = one("<lora:x:te=0.1@1,0.6@6>")
    got = [spec.strength("te1", "BASE", s, 10) for s in (0, 1, 3, 6, 9)]
    assert got == pytest.approx([0.1, 0.1, 0.3, 0.6, 0.6])
    # unet defaults to te (A1111 rule), so it follows the same curve
    assert spec.strength("unet", "IN04", 3, 10) == pytest.approx(0.3)


def test_keyframes_fractions():
    # positions are fractions of the run: 0 is the first step, 1 the last
    spec = one("<lora:x:0.5@0,1@0.5>")
    got = [spec.strength("unet", "M00", s, 11) for s in (0, 1, 5, 7, 10)]
    assert got == pytest.approx([0.5, 0.6, 1.0, 1.0, 1.0])
    spec = one("<lora:x:0@0,1@0.5,0@1>")
    assert [spec.strength("unet", "M00", s, 5) for s in range(5)] == pytest.approx([0, 0.5, 1, 0.5, 0])


def test_keyframes_largest_position_decides():
    # 0.25@0.5,1@1: fractions; 0@5,1@6: steps (loractl warmup example)
    assert one("<lora:x:0.25@0.5,1@1>").strength("unet", "M00", 0, 21) == pytest.approx(0.25)
    assert one("<lora:x:0.25@0.5,1@1>").strength("unet", "M00", 15, 21) == pytest.approx(0.625)
    warm = one("<lora:x:1:0@5,1@6>")
    assert [warm.strength("unet", "IN01", s, 20) for s in (0, 5, 6, 19)] == [0, 0, 1, 1]
    assert [warm.strength("te1", "BASE", s, 20) for s in (0, 5, 6, 19)] == [1, 1, 1, 1]


def test_keyframes_without_step_use_first_weight():
    spec = one("<lora:x:0.2@0,1@1>")
    assert spec.strength("unet", "M00") == pytest.approx(0.2)


def test_keyframes_jump_at_equal_positions():
    k = parse_weight("0@0,0@5,1@5,1@9")
    assert [k.value(s, 10) for s in (4, 5, 6)] == [0.0, 1.0, 1.0]


def test_keyframes_normalised_and_validated():
    assert Keyframes([(1, 0.5), (0, 0)]).points == ((0.0, 0.0), (1.0, 0.5))
    with pytest.raises(ValueError):
        Keyframes(())
    with pytest.raises(ValueError):
        Keyframes(((float("nan"), 0),))


# ---------------------------------------------------------------------------------------------
# strength(): blocks, BASE, hires, start/stop

def test_block_weights_apply_per_block_and_base_is_the_text_encoder():
    spec = one("<lora:x:0.8:lbw=OUTD>")  # BASE 1, OUT03..OUT06 1, the rest 0
    assert spec.strength("te1", "BASE") == pytest.approx(0.8)
    assert spec.strength("te2", "BASE") == pytest.approx(0.8)
    assert spec.strength("unet", "OUT04") == pytest.approx(0.8)
    assert spec.strength("unet", "IN04") == 0.0
    assert spec.strength("unet", "M00") == 0.0
    # UNet modules outside the numbered blocks are not block-weighted (lbw)
    assert spec.strength("unet", "BASE") == pytest.approx(0.8)
    spec = one("<lora:x:0.8:lbw=0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1>")
    assert spec.strength("te1", "BASE") == 0.0
    assert spec.strength("unet", "BASE") == pytest.approx(0.8)


def test_coarse_blocks_multiply_the_unet_strength():
    spec = one("<lora:x:0.5:in=0:out=2>")
    assert spec.strength("unet", "IN05") == 0.0
    assert spec.strength("unet", "M00") == pytest.approx(0.5)
    assert spec.strength("unet", "OUT07") == pytest.approx(1.0)
    assert spec.strength("te1", "BASE") == pytest.approx(0.5)


def test_coarse_combined_with_lbw_multiplies():
    spec = one("<lora:x:lbw=ALL0.5:out=0.5>")
    assert spec.blocks["OUT05"] == pytest.approx(0.25)
    assert spec.blocks["IN04"] == pytest.approx(0.5)
    assert spec.blocks["BASE"] == pytest.approx(0.5)


def test_keyframed_block_multiplier():
    spec = one("<lora:x:mid=0@0,1@1>")
    assert spec.is_scheduled()
    assert [spec.strength("unet", "M00", s, 3) for s in range(3)] == pytest.approx([0, 0.5, 1])
    assert spec.strength("unet", "IN04", 0, 3) == 1.0


def test_hires_weights():
    spec = one("<lora:x:0.5:hr=1.0>")
    assert spec.strength("unet", "M00", hires=False) == 0.5
    assert spec.strength("unet", "M00", hires=True) == 1.0
    assert spec.strength("te1", "BASE", hires=True) == 1.0  # loractl: hr is both
    spec = one("<lora:x:0.5:hr=1:hrte=0.2>")
    assert spec.strength("te1", "BASE", hires=True) == pytest.approx(0.2)
    assert spec.strength("unet", "M00", hires=True) == 1.0
    spec = one("<lora:x:0.5:hrunet=0.9>")
    assert spec.strength("te1", "BASE", hires=True) == 0.5
    assert spec.strength("unet", "M00", hires=True) == 0.9
    assert spec.has_hires() and not one("<lora:x:0.5>").has_hires()
    spec = one("<lora:x:0.5:hr=0@0,1@1>")
    assert spec.is_scheduled()
    assert spec.strength("unet", "M00", 2, 5, hires=True) == pytest.approx(0.5)


def test_start_stop_steps_and_fractions():
    spec = one("<lora:x:start=2:stop=5>")
    assert [spec.strength("unet", "M00", s, 10) for s in range(7)] == [0, 0, 1, 1, 1, 0, 0]
    spec = one("<lora:x:stop=0.5>")  # fraction of the run: the first half of 20 steps
    assert [spec.strength("unet", "M00", s, 20) for s in (0, 9, 10, 19)] == [1, 1, 0, 0]
    spec = one("<lora:x:step=3-4>")
    assert [spec.strength("te1", "BASE", s, 10) for s in (2, 3, 4)] == [0, 1, 0]
    assert spec.is_scheduled()
    assert not one("<lora:x:0.5:lbw=OUTD>").is_scheduled()


# ---------------------------------------------------------------------------------------------
# lbw in tags

def test_lbw_preset_and_legacy_positional_form():
    named = one("<lora:x:1:lbw=MIDD>")
    legacy = one("<lora:x:1:MIDD>")
    assert named == legacy
    assert named.blocks == B.preset("MIDD")
    assert named.unet == 1.0
    assert one("<lora:x:1:w=MIDD>") == named  # lbw's alternative key
    assert one("<lora:x:1:lbw=midd>") == named  # case-insensitive fallback


@pytest.mark.parametrize("n", [12, 17, 20, 26])
def test_lbw_vectors_of_every_length(n):
    vals = [round(0.1 * (i + 1), 1) for i in range(n)]
    text = ",".join(str(v) for v in vals)
    spec = one(f"<lora:x:lbw={text}>")
    assert spec.blocks == B.expand_vector(vals)
    assert one(f"<lora:x:1:{text}>").blocks == spec.blocks  # legacy positional
    for block, v in zip(B.LBW_LAYOUTS[n], vals):
        assert spec.blocks[block] == v


def test_lbw_user_presets():
    mine = B.parse_preset_text("MINE:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1")
    spec = one("<lora:x:lbw=MINE>", presets=mine)
    assert spec.blocks["OUT11"] == 1 and spec.blocks["OUT10"] == 0
    with pytest.raises(PromptSyntaxError, match="unknown block-weight preset"):
        parse_prompt("<lora:x:lbw=MINE>")


# ---------------------------------------------------------------------------------------------
# the cleaned prompt

CLEAN = [
    ("a cat, <lora:x:0.8>, blue sky", "a cat, blue sky"),
    ("a cat <lora:x:0.8> blue sky", "a cat blue sky"),
    ("<lora:x> a cat", "a cat"),
    ("a cat, <lora:x>", "a cat"),
    ("a cat,<lora:a><lora:b>, <lyco:c:1>,blue", "a cat, blue"),
    ("a cat\n<lora:x>\nblue", "a cat\nblue"),
    ("a cat,\n<lora:x>\nblue", "a cat,\nblue"),
    ("foo<lora:a><lora:b>bar", "foobar"),
    ("(<lora:x:1>:1.2), cat", "(:1.2), cat"),
    ("<lora:a>", ""),
    ("  <lora:a>  ,  ", ""),
    ("keep  double  spaces <lora:a>", "keep  double  spaces"),
    ("<hypernet:h:1> cat <lora:a>", "<hypernet:h:1> cat"),  # other extra networks stay
    ("a <lora b> <lora:>x", None),  # '<lora b>' is no tag; '<lora:>' has an empty name
    ("<lo<lora:x>ra:y>", "<lo ra:y>"),  # removal must not form a new tag
    ("no tags,  at   all ,", "no tags,  at   all ,"),  # untouched without tags
]


@pytest.mark.parametrize("text,cleaned", CLEAN, ids=[c[0] for c in CLEAN])
def test_cleaned_prompt(text, cleaned):
    if cleaned is None:
        with pytest.raises(PromptSyntaxError):
            parse_prompt(text)
        return
    res = parse_prompt(text)
    assert res.prompt == cleaned
    assert parse_prompt(res.prompt) == ParsedPrompt(cleaned, [])


def test_tags_in_order_and_repeated():
    res = parse_prompt("<lora:a:0.1> x <lyco:b:0.2> y <lora:a:0.3>")
    assert [(s.name, s.te) for s in res.specs] == [("a", 0.1), ("b", 0.2), ("a", 0.3)]
    assert res.prompt == "x y"


# ---------------------------------------------------------------------------------------------
# errors: message names the tag and the 0-based position of the problem

ERRORS = [
    ("<lora:x:te=abc>", 11, "te= expects a number or keyframes w@pos"),
    ("a <lora:x:te=abc>", 13, "te= expects a number"),
    ("<lora:x:abc>", 8, "the strength expects a number"),
    ("<lora:x:1:abc>", 10, "the UNet strength expects a number"),
    ("<lora:x:1:1:abc>", 12, "dyn expects a whole number"),
    ("<lora:x:1:1:8:9>", 14, "too many positional arguments"),
    ("<lora:x:dyn=1.5>", 12, "dyn expects a whole number"),
    ("<lora:x:8:dyn=8:1:3:4>", 20, "too many positional"),
    ("<lora:x:1:1:8:dyn=8>", 14, "dyn= is given twice"),
    ("<lora:x:te=1:te=2>", 13, "te= is given twice"),
    ("<lora:x:strat=3>", 8, "did you mean start=?"),
    ("<lora:x:foo=1>", 8, "unknown argument foo="),
    ("<lora:x:a b=1>", 8, "not name=value"),
    ("<lora:x:lbwe=ATTN>", 8, "elemental weights (lbwe=) are not supported"),
    ("<lora:x:x=0.5>", 8, "inherited weight (x=) is not supported"),
    ("<lora:x:lbw=NOPE>", 12, "unknown block-weight preset 'NOPE'"),
    ("<lora:x:lbw=1,2,3>", 12, "has 3 values; expected 12 (SDXL LoRA), 17 (SD1.x LoRA)"),
    ("<lora:x:lbw=" + ",".join(["1"] * 60) + ">", 12, "has 60 values; expected 12 (SDXL LoRA), 17 (SD1.x LoRA), 20 (SDXL LyCORIS), 26 (SD1.x LyCORIS), 61 (Flux.1)"),
    ("<lora:x:inspire=" + ",".join(["1"] * 11) + ">", 16, "11 values; it needs at least 12"),
    ("<lora:x:inspire=1,0,0,0,0,0,0,0,0,0,0,1 0>", 16, "per-key values"),
    ("<lora:x:lbw=OUTD:inspire=FLUX-DBL-TAIL>", 17, "cannot be combined with lbw="),
    ("<lora:x:lbw=D05=0,Q07=1>", 12, "unknown block id 'Q07'"),
    ("<lora:x:lbw=D05=0,D05=1>", 12, "D05 is given twice"),
    ("<lora:x:lbw=IN04=0,D05=1>", 12, "mix SD ids"),
    ("<lora:x:lbw=D00-S03=1>", 12, "not a range of one kind"),
    ("<lora:x:lbw=1,1,1,1,1,1,1,1,R,R,R,R,R,R,R,R,R>", 12, "random value R"),
    ("<lora:x:lbw=X,1,1,1,1,1,1,1,1,1,1,1,X,X,X,X,X>", 12, "inherited weight X"),
    ("<lora:x:lbw=1,1,1,1,1,1,1,1,1,1,1,U>", 12, "random value U"),
    ("<lora:x:lbw=1,1,1,1,1,1,1,1,1,1,1,>", 12, "block weight 12 is empty"),
    ("<lora:x:1:0,1>", 10, "block weights: a block-weight vector has 2 values"),
    ("<lora:x:1:MIDD:lbw=OUTD>", 15, "lbw= is given twice"),
    ("<lora:x:lbw=OUTD:in=0@0,1@1>", 20, "in= keyframes cannot be combined with an SD lbw= vector"),
    ("<lora:x:start=-1>", 14, "start= expects a step number"),
    ("<lora:x:start=abc>", 14, "start= expects"),
    ("<lora:x:start=5:stop=2>", 21, "start must come before stop"),
    ("<lora:x:start=0.6:stop=0.5>", 23, "start must come before stop"),
    ("<lora:x:step=5>", 13, "step= expects A-B"),
    ("<lora:x:step=1-2:stop=3>", 8, "step= cannot be combined"),
    ("<lora:x:0.5,1>", 8, "the strength expects a number or keyframes"),
    ("<lora:x:1@>", 8, "keyframe '1@' is not w@pos"),
    ("<lora:x:te=0@0,1@1@2>", 15, "keyframe '1@1@2' is not w@pos"),
    ("<lora:x:0@0, @1>", 13, "keyframe '@1' is not w@pos"),
    ("<lora:x:1e999>", 8, "expects a number"),
    ("<lora:x:nan>", 8, "expects a number"),
    ("<lora:x::1>", 8, "empty argument"),
    ("<lora:x:1:>", 10, "empty argument"),
    ("<lora:>", 6, "the LoRA name is empty"),
    ("<lora: :1>", 6, "the LoRA name is empty"),
    ("cat <lora:x:1", 4, "unclosed tag"),
    ("<lora:a:<lora:b>>", 8, "tags cannot be nested"),
    ("ok <lora:a> then <lyco:b", 17, "unclosed tag"),
]


@pytest.mark.parametrize("text,pos,problem", ERRORS, ids=[e[0][:60] for e in ERRORS])
def test_errors_name_tag_and_position(text, pos, problem):
    with pytest.raises(PromptSyntaxError) as ei:
        parse_prompt(text)
    e = ei.value
    assert e.position == pos, (str(e), e.position)
    assert problem in str(e)
    assert str(e).startswith(e.tag[:100])
    assert f" at position {pos}: " in str(e)
    assert e.tag in text
    assert "\n" not in str(e)


def test_error_message_shape():
    with pytest.raises(PromptSyntaxError) as ei:
        parse_prompt("a <lora:x:te=abc>")
    assert str(ei.value) == "<lora:x:te=abc> at position 13: te= expects a number or keyframes w@pos,..."
    assert ei.value.tag == "<lora:x:te=abc>"


def test_parse_tag_alone():
    assert parse_tag("<lora:x:0.5>") == LoraSpec("x", te=0.5, unet=0.5)
    with pytest.raises(PromptSyntaxError):
        parse_tag("<hypernet:x:0.5>")
    with pytest.raises(PromptSyntaxError) as ei:
        parse_tag("<lora:x:te=q>", position=100)
    assert ei.value.position == 111


def test_parse_prompt_rejects_non_strings():
    with pytest.raises(TypeError):
        parse_prompt(None)


# ---------------------------------------------------------------------------------------------
# format_tag

def test_format_tag_canonical_text():
    assert format_tag(one("<lyco:x:0.80>")) == "<lora:x:0.8>"
    assert format_tag(one("<lora:x:1:0.5:16>")) == "<lora:x:1:0.5:dyn=16>"
    assert format_tag(one("<lora:x:te=0.1@1,0.6@6:unet=1>")) == "<lora:x:0.1@1,0.6@6:1>"
    assert format_tag(one("<lora:x:1:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0>")) == "<lora:x:1:lbw=OUTD>"
    assert format_tag(one("<lora:x:0.5:in=0:out=1@0,0@1>")) == "<lora:x:0.5:in=0:out=1@0,0@1>"
    assert format_tag(one("<lora:x:step=2-8:hr=0.5:hrte=0>")) == "<lora:x:1:start=2:stop=8:hr=0.5:hrte=0>"
    assert format_weight(1e-7) == "1e-07" and format_weight(-0.0) == "0"


def test_format_tag_of_specs_built_in_code():
    # a partial dict of numbers comes back as an equivalent full vector
    spec = LoraSpec("x", blocks={"IN04": 0.5, "BASE": 0.0})
    back = one(format_tag(spec))
    for b in B.ALL_IDS:
        assert back.blocks[b] == spec.blocks.get(b, 1.0)
    with pytest.raises(ValueError):
        format_tag(LoraSpec("a:b"))
    with pytest.raises(ValueError):
        format_tag(LoraSpec("x", blocks={"IN04": Keyframes(((0, 0), (1, 1)))}))
    with pytest.raises(ValueError):
        format_tag(LoraSpec("x", blocks={"TE7": 1.0}))


def test_tag_does_not_take_part_in_equality():
    assert one("<lora:x:0.5>") == one("<lyco:x:0.5:0.5>")
    assert one("<lora:x:0.5>") != one("<lora:y:0.5>")


# ---------------------------------------------------------------------------------------------
# properties

FRAGMENTS = st.sampled_from([
    "<lora:", "<lyco:", "<loractl:", "<LORA:", "<", ">", ":", "=", ",", ";", "@", "~", " ", "\n",
    "x", "a b", "sub/dir", "sub\\dir", "0.5", "1", "-2", "1e3", ".5", "0@0", "1@0.5", "0.1@1",
    "te=", "unet=", "in=", "mid=", "out=", "lbw=", "w=", "start=", "stop=", "step=", "3-9",
    "hr=", "hrte=", "hrunet=", "dyn=", "16", "OUTD", "ALL", "SDXL-ALL", "R", "X+1", "lbwe=",
    ",".join(["1"] * 12), ",".join(["0.5"] * 17), ",".join(["1"] * 20), ",".join(["0"] * 26),
    "<hypernet:h:1>", "(", ")", "[", "]", "BREAK", "é", "\x00",
    "FLUXALL", "inspire=", "D05", "S00-S37", "IN", "T5", "FLUX-DBL-TAIL", ",".join(["1"] * 61),
    ",".join(["0.5"] * 58),
])
TAGLIKE = st.lists(FRAGMENTS, max_size=14).map("".join)
PROP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_parse(text):
    try:
        res = parse_prompt(text)
    except PromptSyntaxError as e:
        assert 0 <= e.position <= len(text)
        assert e.tag and e.tag in text
        return
    # idempotent: the cleaned prompt has no tags left and comes back unchanged
    again = parse_prompt(res.prompt)
    assert again.specs == [] and again.prompt == res.prompt
    # every spec round-trips through its canonical tag
    for spec in res.specs:
        tag = format_tag(spec)
        assert one(tag) == spec, (spec.tag, tag)
        assert format_tag(one(tag)) == tag


@PROP
@given(st.text(max_size=80))
def test_any_text_parses_or_raises_syntax_error(text):
    _check_parse(text)


@PROP
@given(TAGLIKE)
def test_tag_like_text_parses_or_raises_syntax_error(text):
    _check_parse(text)


@PROP
@given(st.lists(st.tuples(st.text(max_size=6), TAGLIKE), max_size=4)
       .map(lambda parts: "".join(a + "<lora:" + b + ">" for a, b in parts)))
def test_text_with_tags_parses_or_raises_syntax_error(text):
    _check_parse(text)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
positions = st.one_of(st.floats(min_value=0, max_value=1), st.integers(0, 60).map(float))
keyframes = st.lists(st.tuples(finite, positions), min_size=1, max_size=5).map(
    lambda pts: Keyframes(tuple(pts)))
weights = st.one_of(finite, keyframes)
names = st.text(st.characters(blacklist_characters=":<>", blacklist_categories=("Cs",)),
                min_size=1, max_size=20).map(str.strip).filter(bool)
lbw_blocks = st.one_of(
    st.sampled_from(sorted(B.PRESETS)).map(B.preset),
    st.sampled_from([12, 17, 20, 26]).flatmap(
        lambda n: st.lists(finite, min_size=n, max_size=n)).map(B.expand_vector),
)
coarse_blocks = st.tuples(st.one_of(st.none(), weights), st.one_of(st.none(), weights),
                          st.one_of(st.none(), weights)).map(lambda t: B.coarse(*t) or None)
DIT_IDS = ["IN", "OUT", "CLIP", "T5", "BASE"] + [f"{p}{i:02d}" for p in "DSJB" for i in range(0, 60, 7)]
dit_blocks = st.one_of(
    st.just(B.preset("FLUXALL")),
    st.lists(finite, min_size=61, max_size=61).map(B.expand_vector),
    st.dictionaries(st.sampled_from(DIT_IDS), finite, min_size=1, max_size=8)
    .filter(lambda d: B.kind_of(d) == "dit"),
).flatmap(lambda d: coarse_blocks.map(lambda c: {**d, **(c or {})}))
inspire_vectors = st.lists(finite, min_size=12, max_size=60).map(tuple)
starts = st.one_of(st.none(), st.floats(0, 1, exclude_min=True, exclude_max=True),
                   st.integers(0, 100).map(float))


@st.composite
def specs(draw):
    te = draw(weights)
    unet = draw(st.one_of(st.just(te), weights))
    blocks = draw(st.one_of(st.none(), lbw_blocks, coarse_blocks, dit_blocks))
    inspire = None
    if blocks is None or B.coarse_values(blocks) is not None and B.kind_of(blocks) == "sd" and "BASE" not in blocks:
        inspire = draw(st.one_of(st.none(), inspire_vectors))
    kj = draw(st.one_of(st.none(), st.dictionaries(
        st.sampled_from([b for b in DIT_IDS if b not in ("IN", "OUT", "CLIP", "T5", "BASE")]), finite, min_size=1)))
    spec = LoraSpec(draw(names), te=te, unet=unet, blocks=blocks, inspire=inspire, kj_alpha=kj,
                    hr=draw(st.one_of(st.none(), weights)),
                    hr_te=draw(st.one_of(st.none(), weights)),
                    hr_unet=draw(st.one_of(st.none(), weights)))
    if draw(st.booleans()):
        spec.extra["dyn"] = draw(st.integers(1, 10 ** 6))
    a, b = draw(starts), draw(starts)
    if a is not None and b is not None and a >= b:
        a, b = None, b
    spec.start, spec.stop = a, b
    return spec


@settings(max_examples=400, deadline=None)
@given(specs())
def test_format_tag_round_trip(spec):
    tag = format_tag(spec)
    back = one(tag)
    if spec.blocks is not None and isinstance(spec.blocks, dict) and "BASE" in spec.blocks:
        # lbw expansions are full 26-id dicts: equal as dicts
        assert back.blocks == spec.blocks
    assert back == spec, (tag, back, spec)
    # the canonical text is a fixed point
    assert format_tag(back) == tag
    # and inside a prompt
    res = parse_prompt(f"a, {tag}, b")
    assert res.specs == [spec] and res.prompt == "a, b"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(finite, positions), min_size=1, max_size=6), st.integers(0, 70),
       st.integers(1, 70))
def test_keyframes_agree_with_loractl_interpolation(points, step, total):
    """loractl: np.interp over the stably sorted points, at step/(total-1) for fractions."""
    np = pytest.importorskip("numpy")
    k = Keyframes(tuple(points))
    pts = sorted(points, key=lambda wp: wp[1])
    xs, ys = [p for _, p in pts], [w for w, _ in pts]
    pos = step / max(total - 1, 1) if max(xs) <= 1 else step
    assert k.value(step, total) == pytest.approx(float(np.interp(pos, xs, ys)), rel=1e-9, abs=1e-6)


_num_text = st.one_of(finite.map(repr), st.integers(-5, 30).map(str),
                      st.sampled_from(["0.5", ".5", "1.", "-0", "1e-3", "2E+1"]))
_kf_text = st.lists(st.tuples(_num_text, st.one_of(_num_text, st.none()), st.sampled_from("@~")),
                    min_size=1, max_size=4).map(
    lambda es: ",".join(w if p is None else f"{w}{sep}{p}" for w, p, sep in es))
_value_text = st.one_of(
    _num_text, _kf_text, st.sampled_from(sorted(B.PRESETS)[:12] + ["3-9", "0.2-0.8", "16", "x"]),
    st.sampled_from([12, 17, 20, 26, 5]).flatmap(
        lambda n: st.lists(_num_text, min_size=n, max_size=n).map(",".join)))
_arg = st.one_of(_value_text, st.tuples(
    st.sampled_from(["te", "unet", "in", "mid", "out", "lbw", "w", "start", "stop", "step",
                     "hr", "hrte", "hrunet", "dyn", "Te", "bogus"]), _value_text).map("=".join))
_tag = st.tuples(st.sampled_from(["lora", "lyco", "loractl"]), names,
                 st.lists(_arg, max_size=5)).map(lambda t: f"<{t[0]}:{':'.join([t[1], *t[2]])}>")


@PROP
@given(st.lists(st.tuples(st.sampled_from(["", " ", ", ", "cat, ", "\n", "(x:1.1) "]), _tag),
                min_size=1, max_size=3).map(lambda parts: "".join(a + b for a, b in parts)))
def test_structured_tags_parse_or_raise_syntax_error(text):
    _check_parse(text)
