"""Block weights on the DiT families (issue 15): family-native ids, lbw's 61-value Flux vectors,
ComfyUI Inspire Pack's positional vectors, the coarse in=/mid=/out= form per family, and an
end-to-end check on a tiny diffusers Flux.

The 61-value vector is checked module by module on the full-size Flux-dev layout against a
transcription of lbw's own key classifier (``get_flux_blocks`` in
sd-webui-lora-block-weight, on Forge's model keys); the Inspire semantics against a
transcription of Inspire Pack's ``load_lbw`` loop over ComfyUI model keys.
"""
from __future__ import annotations

import re

import pytest
import torch

from lora_ext import blocks as B
from lora_ext.layouts import arch_layout
from lora_ext.prompt import PromptSyntaxError, format_tag, parse_prompt, parse_tag
from lora_ext.spec import Keyframes, LoraSpec


def one(text):
    return parse_tag(text)


def model_blocks(variant):
    return {m.block for m in arch_layout(variant)["unet"].values()}


# ---------------------------------------------------------------------------------------------
# ids per family

def _ids(p, n):
    return tuple(f"{p}{i:02d}" for i in range(n))


FAMILY_IDS = {
    "flux": ("IN",) + _ids("D", 19) + _ids("S", 38) + ("OUT",),
    "flux-dev": ("IN",) + _ids("D", 19) + _ids("S", 38) + ("OUT",),
    "flux-schnell": ("IN",) + _ids("D", 19) + _ids("S", 38) + ("OUT",),
    "chroma": ("IN",) + _ids("D", 19) + _ids("S", 38) + ("OUT",),
    "sd3-medium": ("IN",) + _ids("J", 24) + ("OUT",),
    "sd3.5-medium": ("IN",) + _ids("J", 24) + ("OUT",),
    "sd3.5-large": ("IN",) + _ids("J", 38) + ("OUT",),
    "qwen-image": ("IN",) + _ids("B", 60) + ("OUT",),
    "qwen_image": ("IN",) + _ids("B", 60) + ("OUT",),
    # issue 12's families follow from their tables (token refiners are IN)
    "hunyuan_video": ("IN",) + _ids("D", 20) + _ids("S", 40) + ("OUT",),
    "wan2.1-t2v-1.3b": ("IN",) + _ids("B", 30) + ("OUT",),
    "wan-14b-t2v": ("IN",) + _ids("B", 40) + ("OUT",),
}


@pytest.mark.parametrize("name", sorted(FAMILY_IDS))
def test_family_ids(name):
    assert B.dit_block_ids(name) == FAMILY_IDS[name]


@pytest.mark.parametrize("variant", ["flux-dev", "chroma", "sd3-medium", "sd3.5-large", "qwen-image",
                                     "hunyuan-video"])
def test_ids_are_the_tables_blocks(variant):
    """Every module of the full-size table sits in one of the family's ids, and every id has modules."""
    assert model_blocks(variant) == set(B.dit_block_ids(variant))
    layout = arch_layout(variant)
    for comp in set(layout) - {"unet"}:
        assert {m.block for m in layout[comp].values()} == {"BASE"}, comp


def test_family_with_several_depths_needs_the_variant():
    with pytest.raises(B.BlockWeightError, match="differ in depth; name one of sd3-medium"):
        B.dit_block_ids("sd3")
    with pytest.raises(B.BlockWeightError, match="differ in depth"):
        B.dit_block_ids("wan")
    with pytest.raises(B.BlockWeightError, match="no DiT family"):
        B.dit_block_ids("sd9")


def test_id_predicates():
    assert B.is_dit_block("D18") and B.is_dit_block("S37") and B.is_dit_block("J05") and B.is_dit_block("B59")
    assert B.is_dit_block("IN") and B.is_dit_block("OUT")
    assert not B.is_dit_block("IN04") and not B.is_dit_block("M00") and not B.is_dit_block("Q01")
    assert not B.is_dit_block("BASE") and not B.is_dit_block("CLIP")
    assert [b for b in sorted(["OUT", "S00", "D18", "IN", "S10", "D02"], key=B.dit_order)] == \
        ["IN", "D02", "D18", "S00", "S10", "OUT"]


# ---------------------------------------------------------------------------------------------
# lbw's 61-value Flux vector, position by position, against lbw's own classifier

def lbw_flux_block(key: str) -> str:
    """sd-webui-lora-block-weight's get_flux_blocks (scripts/lora_block_weight.py), on a Forge
    key with '.' replaced by '_' (transcribed: the order of the tests matters)."""
    if "vae" in key:
        return "VAE"
    if "t5xxl" in key:
        return "T5"
    if "clip_" in key:
        return "CLIP"
    m = re.search(r"\_(\d+)\_", key)
    if "double_blocks" in key:
        return f"D{m.group(1).zfill(2)}"
    if "single_blocks" in key:
        return f"S{m.group(1).zfill(2)}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    return "Not Merge"


def forge_key(component: str, info) -> str:
    """The Forge model key of a module of our Flux layout, '.' -> '_' (as lbw reads it)."""
    if component == "unet":
        key = "diffusion_model." + info.ldm_path + ".weight"
    else:
        enc = {"te1": "clip_l", "te3": "t5xxl"}[component]
        key = f"text_encoders.{enc}.transformer." + info.path + ".weight"
    return key.replace(".", "_")


def test_lbw_flux_layout_is_lbws():
    assert len(B.LBW_FLUX_IDS) == 61 == len(set(B.LBW_FLUX_IDS))
    assert B.LBW_FLUX_IDS[:4] == ("CLIP", "T5", "IN", "D00")
    assert B.LBW_FLUX_IDS[21:23] == ("D18", "S00") and B.LBW_FLUX_IDS[-2:] == ("S37", "OUT")
    assert B.LBW_LAYOUTS[61] == B.LBW_FLUX_IDS
    assert B.preset("FLUXALL") == dict.fromkeys(B.LBW_FLUX_IDS, 1.0)


def test_61_value_vector_maps_every_position_to_lbws_modules():
    layout = arch_layout("flux-dev")
    vec = [round(0.01 * (i + 1), 2) for i in range(61)]  # every position its own value
    spec = one("<lora:x:1:lbw=" + ",".join(str(v) for v in vec) + ">")
    bound = spec.bind_blocks(model_blocks=model_blocks("flux-dev"), present=set())
    by_id = dict(zip(B.LBW_FLUX_IDS, vec))
    seen = set()
    n = 0
    for comp, table in layout.items():
        for path, info in table.items():
            block = lbw_flux_block(forge_key(comp, info))
            want = 1.0 if block == "Not Merge" else by_id[block]
            assert bound.strength(comp, info.block) == pytest.approx(want), (comp, path, block)
            seen.add(block)
            n += 1
    assert seen == set(B.LBW_FLUX_IDS)  # every position reaches modules
    assert n > 900


def test_61_value_vector_weights_only_its_position():
    layout = arch_layout("flux-dev")
    mb = model_blocks("flux-dev")
    for pos, name in enumerate(B.LBW_FLUX_IDS):
        vec = ["1"] * 61
        vec[pos] = "0"
        spec = one("<lora:x:1:lbw=" + ",".join(vec) + ">").bind_blocks(model_blocks=mb, present=set())
        zero = {(c, p) for c, t in layout.items() for p, i in t.items() if spec.strength(c, i.block) == 0.0}
        want = {(c, p) for c, t in layout.items() for p, i in t.items() if lbw_flux_block(forge_key(c, i)) == name}
        assert zero == want and zero, name


# ---------------------------------------------------------------------------------------------
# Inspire Pack: positional over the blocks the LoRA has

def inspire_oracle(keys, vector):
    """Inspire Pack's load_lbw (inspire/lora_block_weight.py), transcribed, on ComfyUI model keys
    (``diffusion_model.double_blocks.3.img_attn.qkv.weight``, text-encoder keys): key -> ratio."""
    def parse_unet_num(s):
        return int(s[0]) if s[1] == "." else int(s)

    double, single, others = [], [], []
    for k in keys:
        k_unet = k[len("diffusion_model."):]
        if k_unet.startswith("double_blocks."):
            double.append((k, parse_unet_num(k_unet[len("double_blocks."):len("double_blocks.") + 2])))
        elif k_unet.startswith("single_blocks."):
            single.append((k, parse_unet_num(k_unet[len("single_blocks."):len("single_blocks.") + 2])))
        else:
            others.append(k)
    double = sorted(double, key=lambda x: x[1])
    single = sorted(single, key=lambda x: x[1])
    out = {}
    ratio, vector_i, last = 1.0, 1, None
    for k, num in double + single:
        if last != num and len(vector) > vector_i:
            ratio = float(vector[vector_i])
            vector_i += 1
        last = num
        out[k] = ratio
    for k in others:
        out[k] = float(vector[0])
    return out


def comfy_keys(layout, present):
    """ComfyUI model keys of the modules of ``layout`` in the blocks ``present`` (and the top
    level and the text encoders), in the table's order."""
    keys = {}
    for comp, table in layout.items():
        for path, info in table.items():
            if comp == "unet":
                if info.block not in present:
                    continue
                key = "diffusion_model." + info.ldm_path + ".weight"
            else:
                key = f"clip_{comp}.transformer.{path}.weight"
            keys[key] = (comp, info.block)
    return keys


CASES = [
    # (present numbered blocks, vector)
    (set(_ids("D", 19)) | set(_ids("S", 38)), [0.5] + [round(0.01 * i, 2) for i in range(1, 58)]),
    # a LoRA without D00..D01, D07 and S05..S09: everything after them shifts
    ((set(_ids("D", 19)) - {"D00", "D01", "D07"}) | (set(_ids("S", 38)) - set(_ids("S", 10)[5:])),
     [0.25] + [round(0.01 * i, 2) for i in range(1, 58)]),
    # double blocks only, vector shorter than the blocks: the last value stays (FLUX-DBL-TAIL, 18)
    (set(_ids("D", 19)), list(B.INSPIRE_PRESETS["FLUX-DBL-TAIL"])),
    # D18 then S18 (no S00..S17): the number does not change, so S18 keeps D18's value
    ({"D03", "D18", "S18", "S19", "S30"}, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]),
    # single blocks only
    ({"S02", "S03", "S20"}, [0.7] + [round(0.1 * i, 1) for i in range(1, 12)]),
]


@pytest.mark.parametrize("present,vector", CASES)
def test_inspire_matches_inspire_pack_on_every_key(present, vector):
    _check_inspire("flux-dev", present, vector)


def test_inspire_on_hunyuan_video_double_single_blocks():
    """ComfyUI's HunyuanVideo keys are double_blocks/single_blocks too: Inspire walks them."""
    _check_inspire("hunyuan-video", set(_ids("D", 20)[3:]) | set(_ids("S", 40)[:30]),
                   [0.5] + [round(0.01 * i, 2) for i in range(1, 61)])


def _check_inspire(variant, present, vector):
    layout = arch_layout(variant)
    keys = comfy_keys(layout, present | {"IN", "OUT"})
    want = inspire_oracle(list(keys), [str(v) for v in vector])
    spec = one("<lora:x:1:inspire=" + ",".join(str(v) for v in vector) + ">")
    bound = spec.bind_blocks(model_blocks=model_blocks(variant), present=present | {"IN", "OUT"})
    assert bound.inspire is None
    for key, (comp, block) in keys.items():
        assert bound.strength(comp, block) == pytest.approx(want[key]), (key, block)


def test_inspire_positions_shift_on_a_lora_without_some_blocks():
    """Hand-checked: BASE, then one value per *present* block in order."""
    vec = [9.0] + [float(i) for i in range(1, 58)]
    present = (set(_ids("D", 19)) - {"D00", "D07"}) | set(_ids("S", 38))
    w = B.inspire_weights(vec, present, model_blocks("flux-dev"))
    assert w["D01"] == 1 and w["D06"] == 6 and w["D08"] == 7 and w["D18"] == 17
    assert w["S00"] == 18 and w["S37"] == 55  # the last two values (56, 57) are not used
    assert "D00" not in w and "D07" not in w
    assert w["BASE"] == w["IN"] == w["OUT"] == 9
    # the same vector on a LoRA with every block: fixed positions
    w_full = B.inspire_weights(vec, set(_ids("D", 19)) | set(_ids("S", 38)), model_blocks("flux-dev"))
    assert w_full["D07"] == 8 and w_full["S00"] == 20 and w_full["S37"] == 57


def test_inspire_walks_what_comfyui_names_double_and_single_blocks():
    """Inspire matches ComfyUI key prefixes: HunyuanVideo's double_blocks/single_blocks are walked,
    HiDream's double_stream_blocks/single_stream_blocks are "others" (BASE), as in the reference."""
    from types import SimpleNamespace

    assert B.inspire_walked(arch_layout("flux-dev")["unet"].values()) == ("D", "S")
    assert B.inspire_walked(arch_layout("hunyuan-video")["unet"].values()) == ("D", "S")
    assert B.inspire_walked(arch_layout("hidream-i1")["unet"].values()) == ()
    vec = ",".join(["0.5"] + ["0"] * 57)
    km = SimpleNamespace(layout=arch_layout("hidream-i1"), label="HiDream-I1")
    mb = model_blocks("hidream-i1")
    bound = one(f"<lora:x:1:inspire={vec}>").bind_blocks(None, km, present=mb)
    assert {bound.strength("unet", b) for b in mb} == {0.5}
    km = SimpleNamespace(layout=arch_layout("flux-dev"), label="Flux.1 dev")
    bound = one(f"<lora:x:1:inspire={vec}>").bind_blocks(None, km, present=model_blocks("flux-dev"))
    assert bound.strength("unet", "D00") == 0 and bound.strength("unet", "IN") == 0.5


def test_inspire_on_families_without_double_single_blocks_is_base():
    """Inspire recognises only double_blocks/single_blocks: SD3 and Qwen blocks are "others"."""
    for variant in ("sd3.5-large", "qwen-image"):
        mb = model_blocks(variant)
        spec = one("<lora:x:1:inspire=" + ",".join(["0.5"] + ["0"] * 57) + ">")
        bound = spec.bind_blocks(model_blocks=mb, present=mb)
        assert {bound.strength("unet", b) for b in mb} == {0.5}
        assert bound.strength("te1", "BASE") == 0.5


# Inspire Pack's resources/lbw-preset.txt, its numeric lines (R/A/B ones and @-generators left out)
INSPIRE_PRESET_TEXT = """\
SD-NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
SD-ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
SD-INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
SD-IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
SD-INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
SD-MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
SD-MIDD0.2:1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0
SD-MIDD0.8:1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0
SD-MOUT:1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0
SD-OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
SD-OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
SD-OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
SD-ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
SD-LyC-NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
SD-LyC-ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
SD-LyC-INALL:1,1,1,1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
SD-LyC-MIDALL:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0
SD-LyC-OUTALL:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1
SDXL-NONE:0,0,0,0,0,0,0,0,0,0,0,0
SDXL-ALL:1,1,1,1,1,1,1,1,1,1,1,1
SDXL-INALL:1,1,1,1,1,0,0,0,0,0,0,0
SDXL-MIDALL:1,0,0,0,0,1,0,0,0,0,0,0
SDXL-OUTALL:1,0,0,0,0,0,1,1,1,1,1,1
SDXL-LyC-NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
SDXL-LyC-ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
SDXL-LyC-INALL:1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0
SDXL-LyC-MIDALL:1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0
SDXL-LyC-OUTALL:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
FLUX-DBL-FRONT:1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0
FLUX-DBL-MID:0,0,0,0,0,0,1,1,1,1,1,1,0,0,0,0,0,0
FLUX-DBL-TAIL:0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1
"""


def test_inspire_presets_are_inspire_packs():
    want = {}
    for line in INSPIRE_PRESET_TEXT.splitlines():
        name, _, vals = line.partition(":")
        want[name] = tuple(float(v) for v in vals.split(","))
    assert dict(B.INSPIRE_PRESETS) == want


def test_inspire_presets_and_tags():
    assert len(B.INSPIRE_PRESETS["FLUX-DBL-FRONT"]) == 18
    assert one("<lora:x:1:inspire=flux-dbl-mid>").inspire == B.INSPIRE_PRESETS["FLUX-DBL-MID"]
    assert format_tag(one("<lora:x:1:inspire=FLUX-DBL-MID>")) == "<lora:x:1:inspire=FLUX-DBL-MID>"
    tag = "<lora:x:1:inspire=" + ",".join(["1", "0.5"] + ["0"] * 56) + ">"
    assert format_tag(one(tag)) == tag
    assert one(format_tag(one(tag))) == one(tag)
    with pytest.raises(PromptSyntaxError, match="unknown Inspire preset"):
        one("<lora:x:1:inspire=NOPE>")
    with pytest.raises(B.BlockWeightError, match="need the LoRA's blocks"):
        one(tag).strength("unet", "D00")


# ---------------------------------------------------------------------------------------------
# the coarse form per family

COARSE = {
    "flux-dev": (_ids("D", 19), _ids("S", 38)[:19], _ids("S", 38)[19:]),
    "chroma": (_ids("D", 19), _ids("S", 38)[:19], _ids("S", 38)[19:]),
    "sd3-medium": (_ids("J", 8), _ids("J", 16)[8:], _ids("J", 24)[16:]),
    "sd3.5-large": (_ids("J", 13), _ids("J", 25)[13:], _ids("J", 38)[25:]),
    "qwen-image": (_ids("B", 20), _ids("B", 40)[20:], _ids("B", 60)[40:]),
    "hunyuan-video": (_ids("D", 20), _ids("S", 20), _ids("S", 40)[20:]),
    "wan-14b-t2v": (_ids("B", 13), _ids("B", 27)[13:], _ids("B", 40)[27:]),
}


@pytest.mark.parametrize("variant", sorted(COARSE))
def test_coarse_thirds_per_family(variant):
    ins, mids, outs = COARSE[variant]
    g = B.coarse_groups(model_blocks(variant))
    assert {b for b, x in g.items() if x == "in"} == set(ins) | {"IN"}
    assert {b for b, x in g.items() if x == "mid"} == set(mids)
    assert {b for b, x in g.items() if x == "out"} == set(outs) | {"OUT"}
    spec = one("<lora:x:0.8:in=0.5:mid=0:out=2>")
    bound = spec.bind_blocks(model_blocks=model_blocks(variant), present=set())
    for b in ins + ("IN",):
        assert bound.strength("unet", b) == pytest.approx(0.4)
    for b in mids:
        assert bound.strength("unet", b) == 0.0
    for b in outs + ("OUT",):
        assert bound.strength("unet", b) == pytest.approx(1.6)
    assert bound.strength("te1", "BASE") == pytest.approx(0.8)  # the coarse form leaves the text encoders


def test_coarse_is_unchanged_on_sd():
    spec = one("<lora:x:1:in=0:mid=1:out=0.5>")
    assert spec.blocks == B.coarse(0.0, 1.0, 0.5)
    assert spec.bind_blocks(model_blocks={m.block for m in arch_layout("sd1")["unet"].values()}) is spec
    assert spec.strength("unet", "IN04") == 0.0 and spec.strength("unet", "OUT03") == 0.5


def test_coarse_keyframes_and_explicit_ids_multiply():
    spec = one("<lora:x:1:lbw=D00=0.5,S37=0:out=0@0,1@1>")
    assert spec.blocks["D00"] == 0.5 and spec.blocks["OUT05"] == Keyframes(((0, 0), (1, 1)))
    bound = spec.bind_blocks(model_blocks=model_blocks("flux-dev"), present=set())
    assert bound.strength("unet", "D00") == 0.5
    assert bound.strength("unet", "S30", 0, 11) == 0.0 and bound.strength("unet", "S30", 10, 11) == 1.0
    assert bound.strength("unet", "S37", 10, 11) == 0.0
    assert bound.is_scheduled()
    # unbound, a DiT block cannot be read: the coarse form needs the model's depth
    with pytest.raises(B.BlockWeightError, match="need resolving for DiT block D00"):
        spec.strength("unet", "D00")


def test_coarse_on_a_tiny_model_uses_its_own_depth():
    mb = {"IN", "D00", "D01", "S00", "S01", "OUT"}
    assert B.coarse_groups(mb) == {"IN": "in", "D00": "in", "D01": "mid", "S00": "mid", "S01": "out", "OUT": "out"}


# ---------------------------------------------------------------------------------------------
# explicit ids, text encoders, round trips

def test_explicit_ids():
    spec = one("<lora:x:1:lbw=s00-s37=0,IN=0.5,t5=0,CLIP=0.25,D18-D17=2>")
    assert spec.blocks == {**dict.fromkeys(_ids("S", 38), 0.0), "IN": 0.5, "T5": 0.0, "CLIP": 0.25,
                           "D17": 2.0, "D18": 2.0}
    bound = spec.bind_blocks(model_blocks=model_blocks("flux-dev"), present=set())
    assert bound.strength("unet", "S12") == 0 and bound.strength("unet", "D00") == 1
    assert bound.strength("te1", "BASE") == 0.25 and bound.strength("te2", "BASE") == 0.25
    assert bound.strength("te3", "BASE") == 0.0
    # BASE is every text encoder, CLIP/T5 take precedence
    spec = one("<lora:x:1:lbw=BASE=0.5,T5=1,J03=0>").bind_blocks(model_blocks=model_blocks("sd3-medium"))
    assert spec.strength("te1", "BASE") == spec.strength("te2", "BASE") == 0.5
    assert spec.strength("te3", "BASE") == 1.0 and spec.strength("unet", "J03") == 0
    # SD ids in the explicit form read as a full 26-id vector, unnamed ids 1
    sd = one("<lora:x:1:lbw=IN04=0,OUT03-OUT05=0.5>").blocks
    assert sd["IN04"] == 0 and sd["OUT04"] == 0.5 and sd["IN05"] == 1 and len(sd) == 26


@pytest.mark.parametrize("tag", [
    "<lora:x:1:lbw=FLUXALL>",
    "<lora:x:1:lbw=" + ",".join(["1"] * 60 + ["0"]) + ">",
    "<lora:x:1:lbw=D00-D18=0,S05=0.5>",
    "<lora:x:1:lbw=T5=0,IN=0.5,J00-J11=0,OUT=2>",
    "<lora:x:1:lbw=CLIP=0,D03=1:in=0.5:out=0@0,1@1>",
    "<lora:x:1:lbw=FLUXALL:mid=0>",
    "<lora:x:0.5:in=0:inspire=FLUX-DBL-FRONT>",
])
def test_format_tag_round_trip(tag):
    spec = one(tag)
    again = format_tag(spec)
    assert one(again) == spec
    assert format_tag(one(again)) == again
    assert parse_prompt(f"a, {again}, b").specs == [spec]


def test_format_tag_writes_ranges():
    spec = LoraSpec("x", blocks={**dict.fromkeys(_ids("S", 38), 0.0), "D05": 0.5, "D06": 0.5, "T5": 0})
    assert format_tag(spec) == "<lora:x:1:lbw=T5=0,D05-D06=0.5,S00-S37=0>"


# ---------------------------------------------------------------------------------------------
# errors: one clear line

ERRORS = [
    ("<lora:x:lbw=" + ",".join(["1"] * 58) + ">", "has 58 values; expected 12 (SDXL LoRA), 17 (SD1.x LoRA), "
     "20 (SDXL LyCORIS), 26 (SD1.x LyCORIS), 61 (Flux.1)"),
    ("<lora:x:lbw=" + ",".join(["1"] * 62) + ">", "has 62 values"),
    ("<lora:x:inspire=" + ",".join(["1"] * 5) + ">", "has 5 values; it needs at least 12 (58 for Flux"),
    ("<lora:x:inspire=1,1,1,1,1,1,1,1,1,1,1,A>", "Inspire Pack variable A/B"),
    ("<lora:x:lbw=D00-X40=1>", "unknown block id 'X40'"),
    ("<lora:x:lbw=D00=1,D00=0>", "block D00 is given twice"),
]


@pytest.mark.parametrize("text,problem", ERRORS, ids=[e[1][:30] for e in ERRORS])
def test_parse_errors(text, problem):
    with pytest.raises(PromptSyntaxError) as ei:
        parse_prompt(text)
    assert problem in str(ei.value) and "\n" not in str(ei.value)


def test_weights_of_another_family_are_refused_when_bound():
    flux, sd1 = model_blocks("flux-dev"), {m.block for m in arch_layout("sd1")["unet"].values()}
    cases = [
        (one("<lora:x:1:lbw=OUTD>"), flux, "an SD block vector"),
        (one("<lora:x:1:lbw=FLUXALL>"), sd1, "name DiT block"),
        (one("<lora:x:1:lbw=D03=0>"), sd1, "name DiT block D03"),
        (one("<lora:x:1:inspire=FLUX-DBL-MID>"), sd1, "inspire= (Inspire Pack's positional vectors)"),
        (one("<lora:x:1:lbw=J03=0>"), flux, "name block J03; this model has blocks IN, D00..D18, S00..S37, OUT"),
        (one("<lora:x:1:lbw=FLUXALL>"), model_blocks("sd3-medium"), "name block D00"),
        (one("<lora:x:1:kjalpha=D00=1>"), sd1, "kjalpha= (KJNodes' alpha per block) works on DiT blocks"),
    ]
    for spec, mb, problem in cases:
        with pytest.raises(B.BlockWeightError) as ei:
            spec.bind_blocks(model_blocks=mb, present=set())
        assert problem in str(ei.value) and "\n" not in str(ei.value), spec.tag
    # and unbound, the wrong kind of block cannot be read either
    with pytest.raises(B.BlockWeightError, match="name DiT blocks"):
        one("<lora:x:1:lbw=FLUXALL>").strength("unet", "IN04")


# ---------------------------------------------------------------------------------------------
# end to end: the engine on a tiny diffusers Flux

def _flux_lora(tmp_path, model, paths, name="blocks.safetensors"):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    sd = {}
    shapes = {k[:-len(".weight")]: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith(".weight")}
    for p in paths:
        out, inp = shapes[p]
        sd[f"transformer.{p}.lora_A.weight"] = torch.randn(4, inp, generator=g) * 0.3
        sd[f"transformer.{p}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.3
    path = tmp_path / name
    save_file(sd, path)
    return path


PATHS = {
    "IN": "x_embedder",
    "D00": "transformer_blocks.0.attn.to_q",
    "D01": "transformer_blocks.1.ff.net.0.proj",
    "S00": "single_transformer_blocks.0.proj_mlp",
    "S01": "single_transformer_blocks.1.attn.to_k",
    "OUT": "proj_out",
}


def _changed(tmp_path, tag, blocks=PATHS):
    from dit_models import tiny
    from lora_ext.engine import apply

    model = tiny("flux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = _flux_lora(tmp_path, model, list(blocks.values()))
    spec = parse_prompt(tag).specs[0]
    spec.path = str(path)
    h = apply(model, [spec], "fuse")
    assert h.unmatched == []
    after = model.state_dict()
    changed = {b for b, p in blocks.items() if not torch.equal(after[p + ".weight"], before[p + ".weight"])}
    h.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return changed


def test_end_to_end_zero_block_weight_leaves_the_block(tmp_path):
    assert _changed(tmp_path, "<lora:x:1>") == set(PATHS)
    assert _changed(tmp_path, "<lora:x:1:lbw=D01=0>") == set(PATHS) - {"D01"}
    assert _changed(tmp_path, "<lora:x:1:lbw=S00-S01=0,IN=0>") == {"D00", "D01", "OUT"}
    # the 61-value vector: position 4 is D01, 60 is OUT
    vec = ["1"] * 61
    vec[B.LBW_FLUX_IDS.index("D01")] = vec[B.LBW_FLUX_IDS.index("OUT")] = "0"
    assert _changed(tmp_path, "<lora:x:1:lbw=" + ",".join(vec) + ">") == set(PATHS) - {"D01", "OUT"}
    # coarse on the tiny model's own depth (2 double + 2 single): out = S01 + OUT
    assert _changed(tmp_path, "<lora:x:1:out=0>") == {"IN", "D00", "D01", "S00"}
    assert _changed(tmp_path, "<lora:x:1:in=0>") == {"D01", "S00", "S01", "OUT"}


def test_end_to_end_inspire_positions_follow_the_lora(tmp_path):
    # a LoRA without D00: Inspire's first block value goes to D01, the second to S00, ...
    paths = {b: p for b, p in PATHS.items() if b != "D00"}
    vec = ["1", "0", "1", "1"] + ["1"] * 8
    assert _changed(tmp_path, "<lora:x:1:inspire=" + ",".join(vec) + ">", paths) == set(paths) - {"D01"}
    # the same vector on a LoRA with D00: its first block value is D00's
    assert _changed(tmp_path, "<lora:x:1:inspire=" + ",".join(vec) + ">") == set(PATHS) - {"D00"}
    # BASE covers the others (embedders, output layers)
    vec = ["0"] + ["1"] * 11
    assert _changed(tmp_path, "<lora:x:1:inspire=" + ",".join(vec) + ">") == {"D00", "D01", "S00", "S01"}


def test_hostmodel_static_patches_binds_too(tmp_path):
    from dit_models import tiny
    from lora_ext.hostmodel import HostModel, bind, static_patches
    from lora_ext.network import load_lora

    model = tiny("flux")
    path = _flux_lora(tmp_path, model, list(PATHS.values()))
    bound = bind(HostModel({"unet": model}))
    spec = parse_prompt("<lora:x:1:out=0>").specs[0]
    patches, _ = static_patches(bound, [(spec, load_lora(str(path)))], components=["unet"])
    assert {p for _, p in patches} == set(PATHS.values()) - {PATHS["S01"], PATHS["OUT"]}


# ---------------------------------------------------------------------------------------------
# KJNodes: alpha per block

def test_kj_alpha_parse_and_format():
    spec = one("<lora:x:1:kjalpha=d05=8,S00-S02=0>")
    assert spec.kj_alpha == {"D05": 8.0, "S00": 0.0, "S01": 0.0, "S02": 0.0}
    assert format_tag(spec) == "<lora:x:1:kjalpha=D05=8,S00-S02=0>"
    tag = "<lora:x:1:kjalpha=" + ",".join(str(i) for i in range(57)) + ">"
    spec = one(tag)
    assert spec.kj_alpha["D00"] == 0 and spec.kj_alpha["D18"] == 18 and spec.kj_alpha["S00"] == 19
    assert spec.kj_alpha["S37"] == 56 and format_tag(spec) == tag
    for bad, problem in (("<lora:x:kjalpha=1,2>", "has 2 values; expected 57"),
                         ("<lora:x:kjalpha=IN=3>", "not IN"), ("<lora:x:kjalpha=IN04=1>", "not SD blocks")):
        with pytest.raises(PromptSyntaxError, match=problem):
            one(bad)
    with pytest.raises(B.BlockWeightError, match="kjalpha= block weights need"):
        one("<lora:x:1:kjalpha=D05=8>").strength("unet", "D05")


def _kohya_flux(tmp_path, alphas):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    h, m, r = 32, 128, 4
    sd = {}
    shapes = {"double_blocks_0_img_attn_qkv": (3 * h, h), "double_blocks_0_txt_attn_proj": (h, h),
              "single_blocks_1_linear2": (h, h + m), "double_blocks_1_img_mlp_0": (m, h)}
    for name, (out, inp) in shapes.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(r, inp, generator=g) * 0.3
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, r, generator=g) * 0.3
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(alphas.get(name, 2.0)))
    path = tmp_path / "kohya_flux.safetensors"
    save_file(sd, path)
    return path, sd


def test_kj_alpha_end_to_end(tmp_path):
    """KJNodes sets alpha: the delta becomes value / rank * up @ down (file alpha 2, rank 4)."""
    from dit_models import tiny
    from lora_ext.engine import apply

    path, sd = _kohya_flux(tmp_path, {})
    model = tiny("flux")
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    spec = parse_prompt("<lora:x:1:kjalpha=D00=1,S01=0>").specs[0]
    spec.path = str(path)
    h = apply(model, [spec], "fuse")
    assert h.unmatched == []
    w1 = model.state_dict()
    up, down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    for k, (a, b) in {"to_q": (0, 32), "to_k": (32, 64), "to_v": (64, 96)}.items():
        want = w0[f"transformer_blocks.0.attn.{k}.weight"] + (1 / 4) * up[a:b] @ down
        assert torch.allclose(w1[f"transformer_blocks.0.attn.{k}.weight"], want, rtol=1e-6, atol=1e-7), k
    assert torch.equal(w1["single_transformer_blocks.1.proj_out.weight"], w0["single_transformer_blocks.1.proj_out.weight"])
    # a block not named keeps the file's alpha / rank
    up, down = sd["lora_unet_double_blocks_1_img_mlp_0.lora_up.weight"], sd["lora_unet_double_blocks_1_img_mlp_0.lora_down.weight"]
    want = w0["transformer_blocks.1.ff.net.0.proj.weight"] + (2 / 4) * up @ down
    assert torch.allclose(w1["transformer_blocks.1.ff.net.0.proj.weight"], want, rtol=1e-6, atol=1e-7)
    h.remove()


def test_kj_alpha_needs_one_alpha_per_block(tmp_path):
    from dit_models import tiny
    from lora_ext.engine import apply

    path, _ = _kohya_flux(tmp_path, {"double_blocks_0_txt_attn_proj": 3.0})
    model = tiny("flux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = parse_prompt("<lora:x:1:kjalpha=D00=1>").specs[0]
    spec.path = str(path)
    with pytest.raises(B.BlockWeightError, match="block D00 one alpha, but its modules"):
        apply(model, [spec], "fuse")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    spec = parse_prompt("<lora:x:1:kjalpha=D01=1>").specs[0]  # D01's modules agree
    spec.path = str(path)
    apply(model, [spec], "fuse").remove()
