"""Block ids, lbw layouts and presets, the coarse form, and writing blocks back as tag text.

The layouts are checked position by position against sd-webui-lora-block-weight's tables
(README "Weights Setting"): e.g. the 17-value SD1.x LoRA vector is
BASE,IN01,IN02,IN04,IN05,IN07,IN08,MID,OUT03..OUT11, and the 12-value SDXL one
BASE,IN04,IN05,IN07,IN08,MID,OUT00..OUT05.
"""
from __future__ import annotations

import pytest

from lora_ext import blocks as B
from lora_ext.errors import LoraExtError
from lora_ext.spec import Keyframes


def test_block_id_sets():
    assert len(B.SD1_BLOCKS) == 26 and len(B.SDXL_BLOCKS) == 20
    assert B.SD1_BLOCKS[:3] == ("BASE", "IN00", "IN01") and B.SD1_BLOCKS[-1] == "OUT11"
    assert B.SDXL_BLOCKS[9] == "IN08" and B.SDXL_BLOCKS[10] == "M00" and B.SDXL_BLOCKS[-1] == "OUT08"
    assert set(B.SDXL_BLOCKS) < set(B.SD1_BLOCKS) == set(B.ALL_IDS)
    assert B.family_blocks("SD1.x") == B.family_blocks("sd2") == B.SD1_BLOCKS
    assert B.family_blocks("SDXL") == B.SDXL_BLOCKS
    with pytest.raises(LoraExtError):
        B.family_blocks("flux")
    assert B.is_block_id("OUT03") and B.is_block_id("BASE") and not B.is_block_id("OUT12")


# (layout length, 0-based position, block id) per lbw's README tables
POSITIONS = [
    (17, 0, "BASE"), (17, 1, "IN01"), (17, 2, "IN02"), (17, 3, "IN04"), (17, 6, "IN08"),
    (17, 7, "M00"), (17, 8, "OUT03"), (17, 16, "OUT11"),
    (26, 0, "BASE"), (26, 1, "IN00"), (26, 12, "IN11"), (26, 13, "M00"), (26, 14, "OUT00"),
    (26, 25, "OUT11"),
    (12, 0, "BASE"), (12, 1, "IN04"), (12, 4, "IN08"), (12, 5, "M00"), (12, 6, "OUT00"),
    (12, 11, "OUT05"),
    (20, 0, "BASE"), (20, 1, "IN00"), (20, 9, "IN08"), (20, 10, "M00"), (20, 11, "OUT00"),
    (20, 19, "OUT08"),
]


@pytest.mark.parametrize("n,pos,block", POSITIONS)
def test_layout_positions(n, pos, block):
    assert B.LBW_LAYOUTS[n][pos] == block
    vec = [0.0] * n
    vec[pos] = 0.5
    d = B.expand_vector(vec)
    assert d[block] == 0.5
    assert sum(d.values()) == 0.5  # nothing else set


def test_layouts_are_the_attention_blocks():
    """The short layouts name exactly the blocks holding attention (what a plain LoRA trains),
    per our own SD1.5 / SDXL module tables."""
    arch = pytest.importorskip("lora_ext.arch")
    for name, n in (("sd1", 17), ("sdxl", 12)):
        table = arch.module_table(name, "unet")
        attn = {m.block for path, m in table.items() if ".attn1." in path or ".attn2." in path}
        assert attn == set(B.LBW_LAYOUTS[n][1:]), name
        assert {m.block for m in table.values()} == set(B.family_blocks(name))


def test_expand_zero_fills_like_lbw():
    d = B.expand_vector([1.0] * 17)
    assert set(d) == set(B.ALL_IDS)
    assert [b for b, v in d.items() if v == 0] == [
        "IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"]
    d = B.expand_vector([1.0] * 20)
    assert [b for b, v in d.items() if v == 0] == ["IN09", "IN10", "IN11", "OUT09", "OUT10", "OUT11"]
    with pytest.raises(B.BlockWeightError, match="has 5 values"):
        B.expand_vector([1] * 5)
    with pytest.raises(B.BlockWeightError, match="finite"):
        B.expand_vector([float("inf")] + [1] * 16)


def test_lbw_default_presets():
    assert set(B.PRESETS) >= {"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS",
                              "OUTALL", "ALL0.5"}
    on = lambda name: sorted(b for b, v in B.preset(name).items() if v)  # noqa: E731
    assert on("NONE") == []
    assert on("INS") == ["BASE", "IN01", "IN02", "IN04"]
    assert on("IND") == ["BASE", "IN05", "IN07", "IN08"]
    assert on("OUTD") == ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"]
    assert on("OUTS") == ["BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
    assert on("MIDD") == ["BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"]
    assert set(B.preset("ALL0.5").values()) == {0.0, 0.5}
    assert B.preset("SD-OUTD") == B.preset("OUTD")
    assert B.preset("MOUT")["OUT09"] == 0.5


def test_per_version_presets():
    on = lambda name: sorted(b for b, v in B.preset(name).items() if v)  # noqa: E731
    assert len(B.PRESETS["SDXL-ALL"]) == 12 and len(B.PRESETS["SDXL-LyC-ALL"]) == 20
    assert len(B.PRESETS["SD-LyC-ALL"]) == 26
    assert on("SDXL-INALL") == ["BASE", "IN04", "IN05", "IN07", "IN08"]
    assert on("SDXL-MIDALL") == ["BASE", "M00"]
    assert on("SDXL-OUTALL") == ["BASE"] + ["OUT%02d" % i for i in range(6)]
    assert on("SDXL-LyC-OUTALL") == ["BASE"] + ["OUT%02d" % i for i in range(9)]
    assert on("SDXL-LyC-INALL") == ["BASE"] + ["IN%02d" % i for i in range(9)]
    assert on("SD-LyC-ALL") == sorted(B.ALL_IDS)
    assert on("SD-LyC-NONE") == []
    # the SDXL presets cover every SDXL attention block, unlike lbw's 17-value ALL
    assert B.preset("SDXL-ALL")["OUT00"] == 1.0 and B.preset("ALL")["OUT00"] == 0.0


def test_preset_lookup():
    assert B.preset("outd") == B.preset("OUTD")
    with pytest.raises(B.BlockWeightError, match="did you mean"):
        B.preset("OUTDD")
    mine = {"OUTD": (0.0,) * 17}
    assert set(B.preset("OUTD", mine).values()) == {0.0}  # a host's own presets come first


def test_parse_vector_and_lbw():
    assert B.parse_lbw(" OUTD ") == B.preset("OUTD")
    assert B.parse_lbw("1, 0.5 ,1,1,1,1,1,1,1,1,1,1")["IN04"] == 0.5
    for bad, msg in [("", "empty"), ("1,2", "has 2 values"), ("R," * 16 + "R", "random value R"),
                     ("X+0.5" + ",1" * 16, "inherited weight X"), ("A" + ",1" * 11, "variable A/B"),
                     ("1,,1" + ",1" * 14, "block weight 2 is empty"),
                     ("1e999" + ",1" * 11, "not a finite number"), ("q" + ",1" * 11, "'q', not a number")]:
        with pytest.raises(B.BlockWeightError, match=msg):
            B.parse_lbw(bad)


def test_parse_preset_text():
    text = """
# my presets
MINE:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1
XL:1,1,1,1,1,0,0,0,0,0,0,0
BROKEN:1,2,3
RAND:1,1,1,1,1,1,1,1,R,R,R,R,R,R,R,R,R
just a comment
"""
    presets = B.parse_preset_text(text)
    assert set(presets) == {"MINE", "XL"}
    assert len(presets["XL"]) == 12


def test_coarse():
    d = B.coarse(0.5, None, 2)
    assert set(d) == set(B.IN_IDS) | set(B.OUT_IDS)
    assert d["IN00"] == 0.5 and d["OUT11"] == 2.0 and "M00" not in d and "BASE" not in d
    assert B.coarse() == {}
    k = Keyframes(((0, 0), (1, 1)))
    assert B.coarse(mid=k) == {"M00": k}


@pytest.mark.parametrize("blocks,args", [
    (None, []),
    (B.coarse(0.0, 1.0, 0.5), ["in=0", "mid=1", "out=0.5"]),
    (B.coarse(None, 0.25), ["mid=0.25"]),
    (B.preset("OUTD"), ["lbw=OUTD"]),
    (B.preset("SDXL-ALL"), ["lbw=SDXL-ALL"]),
    (B.expand_vector([1] + [0.5] * 16), ["lbw=1" + ",0.5" * 16]),
    (B.expand_vector([1] + [0.5] * 11), ["lbw=1" + ",0.5" * 11]),
    (B.expand_vector([0.5] * 20), ["lbw=" + ",".join(["0.5"] * 20)]),
    (B.expand_vector([0.5] * 26), ["lbw=" + ",".join(["0.5"] * 26)]),
    ({"BASE": 0.0}, ["lbw=" + ",".join(["0"] + ["1"] * 25)]),  # missing ids mean 1
])
def test_block_args(blocks, args):
    assert B.block_args(blocks) == args
    if blocks is not None:
        back = B.parse_lbw(args[0][4:]) if args[0].startswith("lbw=") else None
        if back is not None:
            assert back == {b: float(blocks.get(b, 1.0)) for b in B.ALL_IDS}


def test_block_args_refuses_what_no_tag_says():
    k = Keyframes(((0, 0), (1, 1)))
    with pytest.raises(B.BlockWeightError, match="unknown block ids"):
        B.block_args({"IN99": 1.0})
    with pytest.raises(B.BlockWeightError, match="per step"):
        B.block_args({"IN04": k})
    with pytest.raises(B.BlockWeightError, match="cannot write"):
        B.block_args(B.coarse(k))  # keyframes need a formatter
    assert B.block_args(B.coarse(k), lambda w: "KF") == ["in=KF"]
