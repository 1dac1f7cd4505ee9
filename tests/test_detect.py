"""Base-model detection from keys, shapes and metadata; other families named, not applied."""
import pytest
import torch
from safetensors.torch import save_file

from lora_ext.detect import detect_base_model, naming_family
from lora_ext.inspect import inspect_lora
from lora_ext.layouts import arch_layout
from lora_ext.network import load_lora


def _lora_for(name, modules, spell, rank=2):
    sd = {}
    for comp, path in modules:
        info = arch_layout(name)[comp][path]
        shape = info.weight_shape
        prefix = spell(comp, info)
        sd[f"{prefix}.lora_up.weight"] = torch.zeros(shape[0], rank, *([1, 1] if len(shape) == 4 else []))
        sd[f"{prefix}.lora_down.weight"] = torch.zeros(rank, *shape[1:])
    return sd


def kohya(comp, info):
    return {"unet": "lora_unet_", "te1": "lora_te_text_model_", "te2": "lora_te2_text_model_"}[comp] + info.path.replace(".", "_")


def kohya_xl(comp, info):
    if comp == "unet":
        return "lora_unet_" + info.ldm_path.replace(".", "_")  # sd-scripts SDXL uses SGM names
    return {"te1": "lora_te1_text_model_", "te2": "lora_te2_text_model_"}[comp] + info.path.replace(".", "_")


ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"


def _detect(tmp_path, sd, metadata=None):
    path = tmp_path / "x.safetensors"
    save_file(sd, path, metadata)
    return detect_base_model(load_lora(path))


def test_sd1_sd2_sdxl_by_shapes(tmp_path):
    mods = [("unet", f"{ATTN}.attn2.to_k"), ("unet", f"{ATTN}.attn1.to_q"), ("te1", "encoder.layers.0.self_attn.q_proj")]
    assert _detect(tmp_path, _lora_for("sd1", mods, kohya)).name == "sd1"
    assert _detect(tmp_path, _lora_for("sd2", mods, kohya)).name == "sd2"
    xl = [("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"), ("te1", "encoder.layers.0.mlp.fc1"),
          ("te2", "encoder.layers.30.mlp.fc2")]
    got = _detect(tmp_path, _lora_for("sdxl", xl, kohya_xl))
    assert got.name == "sdxl" and "3 of 3" in got.evidence


def test_sgm_names_on_sd15_lora_are_not_sdxl(tmp_path):
    def sgm(comp, info):
        return "lora_unet_" + info.ldm_path.replace(".", "_") if comp == "unet" else kohya(comp, info)

    mods = [("unet", f"{ATTN}.attn2.to_k"), ("unet", "up_blocks.1.attentions.2.proj_out"), ("unet", "down_blocks.0.resnets.0.conv1")]
    sd = _lora_for("sd1", mods, sgm)
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in sd)
    got = _detect(tmp_path, sd, {"ss_base_model_version": "sdxl_base_v1-0"})  # even a lying hint
    assert got.name == "sd1" and "shapes win" in got.evidence


def test_metadata_breaks_ties_between_families_with_identical_shapes(tmp_path):
    mods = [("unet", "down_blocks.0.resnets.0.conv1")]  # same shape in SD1 and SD2
    sd = _lora_for("sd1", mods, kohya)
    assert _detect(tmp_path, sd, {"ss_v2": "True", "ss_v_parameterization": "True"}).name == "sd2"
    got = _detect(tmp_path, sd, {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"})
    assert got.name == "sd2" and got.v_prediction
    assert _detect(tmp_path, sd, {"modelspec.architecture": "stable-diffusion-v1/lora"}).name == "sd1"


@pytest.mark.parametrize("family,keys", [
    ("flux", ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1"]),
    ("flux", ["transformer.single_transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_q_proj"]),
    ("sd3", ["transformer.transformer_blocks.0.attn.add_q_proj", "transformer.transformer_blocks.1.attn.to_k"]),
    ("sd3", ["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"]),
    ("stable_cascade", ["lora_prior_unet_down_blocks_0_1_attention_attn_to_q"]),
])
def test_other_families_are_recognised_and_reported(tmp_path, family, keys):
    sd = {}
    for k in keys:
        sep = "." if k.startswith("transformer.") else "."
        up, down = ("lora_B.weight", "lora_A.weight") if k.startswith("transformer.") else ("lora_up.weight", "lora_down.weight")
        sd[f"{k}{sep}{up}"] = torch.zeros(8, 2)
        sd[f"{k}{sep}{down}"] = torch.zeros(2, 8)
    path = tmp_path / "x.safetensors"
    save_file(sd, path)
    info = inspect_lora(path)
    assert info["base_model"] == family
    assert len(info["unmatched"]) == len(sd) and info["modules"] == 0
    # names of a known family, shapes of none of its models (8x2 factors): named, every key reported
    # (full-size DiT files bind: tests/test_dit_formats.py)
    assert all("names, but no module of a known" in u["reason"] for u in info["unmatched"])


def test_unknown_keys_are_unknown_and_every_key_reported(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"foo.bar": torch.zeros(3), "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 2)}, path)
    info = inspect_lora(path)
    assert info["base_model"] == "unknown"
    assert sorted(u["key"] for u in info["unmatched"]) == ["foo.bar", "lora_unet_nothing_here.lora_up.weight"]


def test_naming_family():
    assert naming_family(["lora_unet_a", "lora_te_b"]) == "kohya"
    assert naming_family(["lora_unet_input_blocks_1_1_proj_in"]) == "kohya (ldm/sgm names)"
    assert naming_family(["unet.a", "text_encoder.b"]) == "diffusers"
    assert naming_family(["lycoris_a"]) == "lycoris"
    assert naming_family(["base_model.model.a"]) == "peft"
    assert naming_family(["lora_unet_a", "lycoris_b"]) == "mixed: kohya + lycoris"
