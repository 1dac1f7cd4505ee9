"""Key-mapping coverage on the full-size SD1.5 / SD2.1 / SDXL layouts (meta device, no weights).

Every module a kohya, diffusers/PEFT or LyCORIS LoRA can target must map to the right module,
and that module's weight must be found both in a diffusers state dict and in an A1111/ldm
single-file checkpoint (tested both ways).
"""
import pytest
import torch

from lora_ext import arch
from lora_ext.keys import KeyMap, Target, group_keys, normalise_key, split_key
from lora_ext.layouts import arch_keymap, arch_layout

TARGETABLE = ("linear", "conv")


def _spellings(name, comp, info):
    """The prefixes real trainers write for one module."""
    flat = info.path.replace(".", "_")
    out = {}
    if comp == "unet":
        out["kohya"] = "lora_unet_" + flat
        out["lycoris"] = "lycoris_" + flat
        out["diffusers"] = "unet." + info.path
        out["peft"] = "base_model.model." + info.path
        if info.ldm_path:
            out["kohya-ldm"] = "lora_unet_" + info.ldm_path.replace(".", "_")
            out["ldm"] = "model.diffusion_model." + info.ldm_path
            out["compvis"] = "diffusion_model_" + info.ldm_path.replace(".", "_")
    else:
        kp = {"te1": "lora_te1_" if name == "sdxl" else "lora_te_", "te2": "lora_te2_"}[comp]
        dp = {"te1": "text_encoder.", "te2": "text_encoder_2."}[comp]
        out["kohya"] = kp + "text_model_" + flat
        out["kohya-no-text_model"] = kp + flat
        out["diffusers"] = dp + "text_model." + info.path
        out["diffusers-tf5"] = dp + info.path  # transformers 5 dropped the text_model level
        if info.ldm_weight and info.ldm_rows is None and info.ldm_weight.endswith(".weight"):
            out["ldm"] = info.ldm_weight[: -len(".weight")]
    return out


@pytest.mark.parametrize("name", arch.ARCHS)
def test_every_targetable_module_maps_from_every_family(name):
    km = arch_keymap(name)
    checked = 0
    for comp, table in arch_layout(name).items():
        for info in table.values():
            if info.kind not in TARGETABLE:
                continue
            for family, prefix in _spellings(name, comp, info).items():
                cand, reason = km.choose(prefix, info.weight_shape)
                assert cand is not None, (family, prefix, reason)
                assert cand.targets == (Target(comp, info.path, info.block),), (family, prefix)
                checked += 1
    assert checked > 1000


@pytest.mark.parametrize("name", arch.ARCHS)
def test_targets_found_in_both_checkpoint_layouts(name):
    """diffusers -> module -> ldm key, and ldm key -> module -> diffusers key."""
    comps = {}
    for comp in arch.components(name):
        model = arch.build_meta(name, comp)
        comps[comp] = {k: v for k, v in model.state_dict().items()}
    ldm = arch.diffusers_to_ldm(comps, name)
    ldm_keys = set(ldm)
    for comp, table in arch_layout(name).items():
        diff_keys = {k.removeprefix("text_model.") for k in comps[comp]}
        for info in table.values():
            assert info.path + ".weight" in diff_keys, info.path
            if info.ldm_weight is None:
                # only SD2/SDXL modules with no ldm twin may lack one; none of the targetable
                assert info.kind not in TARGETABLE or comp != "unet", info.path
                continue
            assert info.ldm_weight in ldm_keys, info.ldm_weight
            stored = tuple(ldm[info.ldm_weight].shape)
            if info.ldm_rows:
                assert stored[0] == 3 * info.weight_shape[0]
            elif info.ldm_transposed:
                assert stored == tuple(reversed(info.weight_shape))
            else:
                assert torch.Size(stored).numel() == torch.Size(info.weight_shape).numel()
    # reverse: every ldm module key named by an ldm-style LoRA lands on a module that owns it
    km = arch_keymap(name)
    by_ldm = {i.ldm_weight: i for t in arch_layout(name).values() for i in t.values() if i.ldm_weight}
    for key in ldm_keys:
        if not key.endswith(".weight") or key not in by_ldm:
            continue
        info = by_ldm[key]
        if info.kind not in TARGETABLE or info.ldm_rows:
            continue
        cand, reason = km.choose(key[: -len(".weight")], info.weight_shape)
        assert cand is not None and cand.targets[0].module == info.path, (key, reason)


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_openclip_fused_in_proj_spans_q_k_v(name):
    km = arch_keymap(name)
    comp = "te1" if name == "sd2" else "te2"
    root = arch.ldm_root(name, comp)
    width = arch_layout(name)[comp]["encoder.layers.0.self_attn.q_proj"].weight_shape[0]
    kohya = {"te1": "lora_te_", "te2": "lora_te2_"}[comp] + "model_transformer_resblocks_0_attn_in_proj"
    for prefix in (root + "transformer.resblocks.0.attn.in_proj", kohya):
        cand, reason = km.choose(prefix, (3 * width, width))
        assert cand is not None, reason
        assert [t.module for t in cand.targets] == [f"encoder.layers.0.self_attn.{p}_proj" for p in "qkv"]
    # and the OpenCLIP names of ordinary modules
    cand, _ = km.choose(root + "transformer.resblocks.3.mlp.c_fc", (4 * width if name == "sdxl" else 4096, width))
    assert cand is not None and cand.targets[0].module == "encoder.layers.3.mlp.fc1"


def test_sdxl_te_spelling_without_component_is_resolved_by_shape():
    km = arch_keymap("sdxl")
    te1 = arch_layout("sdxl")["te1"]["encoder.layers.0.mlp.fc1"].weight_shape
    te2 = arch_layout("sdxl")["te2"]["encoder.layers.0.mlp.fc1"].weight_shape
    assert km.choose("lycoris_encoder_layers_0_mlp_fc1", te1)[0].component == "te1"
    assert km.choose("lycoris_encoder_layers_0_mlp_fc1", te2)[0].component == "te2"


def test_shape_mismatch_and_unknown_module_are_reasons():
    km = arch_keymap("sd1")
    cand, reason = km.choose("lora_unet_down_blocks_0_attentions_0_proj_in", (640, 640))
    assert cand is None and "shape mismatch" in reason
    cand, reason = km.choose("lora_unet_down_blocks_7_attentions_0_proj_in", (320, 320))
    assert cand is None and "no such module" in reason


@pytest.mark.parametrize(
    "key,expected",
    [
        ("unet.a.to_q.lora_A.weight", ("unet.a.to_q", "lora_down.weight")),
        ("unet.a.to_q.lora_B.default.weight", ("unet.a.to_q", "lora_up.weight")),
        ("base_model.model.a.to_q.lora_A.my-style.weight", ("base_model.model.a.to_q", "lora_down.weight")),
        ("unet.a.to_q.lora_magnitude_vector", ("unet.a.to_q", "dora_scale")),
        ("a.to_q.lora_magnitude_vector.default.weight", ("a.to_q", "dora_scale")),
        ("unet.a.attn1.processor.to_out_lora.up.weight", ("unet.a.attn1.to_out.0", "lora_up.weight")),
        ("unet.a.to_k.lora.down.weight", ("unet.a.to_k", "lora_down.weight")),
        ("lora_unet_a_b.lora_up.weight", ("lora_unet_a_b", "lora_up.weight")),
        ("lora_unet_a_b.alpha", ("lora_unet_a_b", "alpha")),
        ("lycoris_a_b.hada_w1_a", ("lycoris_a_b", "hada_w1_a")),
        ("lora_unet_a_b.oft_blocks", ("lora_unet_a_b", "oft_blocks")),
        ("lora_unet_a_b.mystery.thing", ("lora_unet_a_b", "mystery.thing")),
    ],
)
def test_split_key_normalises_every_family(key, expected):
    assert split_key(normalise_key(key)) == expected


def test_group_keys_keeps_original_keys():
    keys = ["unet.m.lora_A.default.weight", "unet.m.lora_B.default.weight", "unet.m.lora_magnitude_vector.default.weight"]
    groups = group_keys(keys)
    assert groups == {"unet.m": {"lora_down.weight": keys[0], "lora_up.weight": keys[1], "dora_scale": keys[2]}}


def test_keymap_on_a_custom_layout():
    """A non-standard layout (a live model) gets the same spellings."""
    from lora_ext.arch import ModuleInfo

    info = ModuleInfo("unet", "down_blocks.0.attentions.0.proj_in", "linear", (8, 8), (8,), "IN01",
                      "input_blocks.1.1.proj_in", "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                      "model.diffusion_model.input_blocks.1.1.proj_in.bias")
    km = KeyMap({"unet": {info.path: info}})
    for prefix in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_input_blocks_1_1_proj_in",
                   "unet.down_blocks.0.attentions.0.proj_in", "lycoris_down_blocks_0_attentions_0_proj_in"):
        assert km.choose(prefix, (8, 8))[0].targets[0].block == "IN01"
