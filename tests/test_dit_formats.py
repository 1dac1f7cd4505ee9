"""Format coverage for the DiT families (issue 15): for each LoRA format in the reference
(``dit-lora-formats.md`` §2), a file with exactly its key spelling binds every key to the
right module and row range, on a tiny model in both layouts; and a full-size Flux-dev,
Flux-schnell, SD3.5-Large, SD3.5-Medium and Qwen-Image key layout (meta tensors, no memory)
binds completely and is detected as its variant.
"""
import pytest
import torch

from dit_models import OriginalTree, dit_table, original_state, tiny
from lora_ext import plugins
from lora_ext.detect import detect_base_model
from lora_ext.hostmodel import HostModel, bind
from lora_ext.keys import group_keys
from lora_ext.layouts import arch_layout, arch_keymap
from lora_ext.network import Group, Lora, build_adapter

H, M, R = 32, 128, 4


def lora_of(shapes: dict, device="cpu", metadata=None) -> Lora:
    """A Lora built in memory from {key: shape} (alphas real, everything else on ``device``)."""
    types = plugins.adapter_types()
    names = {n for t in types for n in (t.required | t.optional)}
    groups = {}
    for prefix, keys in group_keys(shapes, names).items():
        tensors = {n: torch.tensor(2.0) if n == "alpha" else torch.zeros(shapes[k], device=device)
                   for n, k in keys.items()}
        g = Group(prefix, keys, tensors)
        build_adapter(g, types, metadata or {})
        groups[prefix] = g
    return Lora("memory.safetensors", metadata or {}, groups)


def lowrank(prefix, out, inp, down="lora_down.weight", up="lora_up.weight", alpha=True):
    keys = {f"{prefix}.{down}": (R, inp), f"{prefix}.{up}": (out, R)}
    if alpha:
        keys[f"{prefix}.alpha"] = ()
    return keys


@pytest.fixture(scope="module")
def flux_maps():
    base = tiny("flux")
    tree = OriginalTree(original_state(base, dit_table(base)))
    return {"diffusers": bind(HostModel({"unet": base}, naming="diffusers")).keymap,
            "ldm": bind(HostModel({"unet": tree}, naming="ldm")).keymap}


def _bound(lora, keymap):
    res = lora.resolve(keymap)
    assert res.unmatched == [], res.unmatched[:3]
    return {b.group.prefix: b for b in res.bindings}


QKV = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
TXT_QKV = ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
           "transformer_blocks.0.attn.add_v_proj")
LINEAR1 = ("single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k",
           "single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp")

# format -> ({key: shape}, {group prefix: (target modules, row counts or (), swapped on a diffusers model)})
FLUX_FORMATS = {
    "kohya sd-scripts": (
        {**lowrank("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H),
         **lowrank("lora_unet_single_blocks_1_linear1", 3 * H + M, H),
         **lowrank("lora_unet_single_blocks_0_linear2", H, H + M),
         **lowrank("lora_unet_double_blocks_1_txt_mod_lin", 6 * H, H),
         **lowrank("lora_unet_final_layer_adaLN_modulation_1", 2 * H, H),
         **lowrank("lora_unet_guidance_in_in_layer", H, 256)},
        {"lora_unet_double_blocks_0_img_attn_qkv": (QKV, (), False),
         "lora_unet_single_blocks_1_linear1": (LINEAR1, (H, H, H, M), False),
         "lora_unet_single_blocks_0_linear2": (("single_transformer_blocks.0.proj_out",), (), False),
         "lora_unet_double_blocks_1_txt_mod_lin": (("transformer_blocks.1.norm1_context.linear",), (), False),
         "lora_unet_final_layer_adaLN_modulation_1": (("norm_out.linear",), (), True),
         "lora_unet_guidance_in_in_layer": (("time_text_embed.guidance_embedder.linear_1",), (), False)}),
    "ComfyUI generic (diffusion_model., diff, diff_b)": (
        {**lowrank("diffusion_model.double_blocks.0.txt_attn.qkv", 3 * H, H),
         "diffusion_model.single_blocks.1.linear1.diff": (3 * H + M, H),
         "diffusion_model.single_blocks.1.linear1.diff_b": (3 * H + M,),
         "diffusion_model.double_blocks.1.img_attn.norm.query_norm.scale.diff": (16,)},
        {"diffusion_model.double_blocks.0.txt_attn.qkv": (TXT_QKV, (), False),
         "diffusion_model.single_blocks.1.linear1": (LINEAR1, (H, H, H, M), False),
         "diffusion_model.double_blocks.1.img_attn.norm.query_norm.scale": (("transformer_blocks.1.attn.norm_q",), (), False)}),
    "BFL-named PEFT": (
        lowrank("diffusion_model.double_blocks.0.img_attn.qkv", 3 * H, H, "lora_A.weight", "lora_B.weight", False),
        {"diffusion_model.double_blocks.0.img_attn.qkv": (QKV, (), False)}),
    "BFL control (no prefix, lora_B.bias)": (
        {**lowrank("double_blocks.0.img_attn.qkv", 3 * H, H, "lora_A.weight", "lora_B.weight", False),
         "double_blocks.0.img_attn.qkv.lora_B.bias": (3 * H,)},
        {"double_blocks.0.img_attn.qkv": (QKV, (), False)}),
    "fal Kontext (base_model.model.)": (
        lowrank("base_model.model.single_blocks.1.linear1", 3 * H + M, H, "lora_A.weight", "lora_B.weight", False),
        {"base_model.model.single_blocks.1.linear1": (LINEAR1, (H, H, H, M), False)}),
    "diffusers / PEFT": (
        {**lowrank("transformer.transformer_blocks.0.attn.to_q", H, H, "lora_A.weight", "lora_B.weight", False),
         **lowrank("transformer.single_transformer_blocks.1.proj_mlp", M, H, "lora_A.weight", "lora_B.weight", False),
         **lowrank("transformer.norm_out.linear", 2 * H, H, "lora_A.weight", "lora_B.weight", False),
         **lowrank("base_model.model.single_transformer_blocks.0.proj_out", H, H + M, "lora_A.weight", "lora_B.weight", False),
         **lowrank("transformer.transformer_blocks.1.attn.to_k", H, H, "lora_A.default.weight", "lora_B.default.weight", False),
         **lowrank("transformer.transformer_blocks.1.ff.net.2", H, M, "lora.down.weight", "lora.up.weight", False),
         **lowrank("transformer.base_model.model.transformer_blocks.1.attn.to_v", H, H, "lora.down.weight", "lora.up.weight", False),
         **lowrank("transformer.time_text_embed.guidance_embedder.linear_2", H, H, "lora_A.weight", "lora_B.weight", False)},
        {"transformer.transformer_blocks.0.attn.to_q": (("transformer_blocks.0.attn.to_q",), (), False),
         "transformer.single_transformer_blocks.1.proj_mlp": (("single_transformer_blocks.1.proj_mlp",), (), False),
         "transformer.norm_out.linear": (("norm_out.linear",), (), False),
         "base_model.model.single_transformer_blocks.0.proj_out": (("single_transformer_blocks.0.proj_out",), (), False),
         "transformer.transformer_blocks.1.attn.to_k": (("transformer_blocks.1.attn.to_k",), (), False),
         "transformer.transformer_blocks.1.ff.net.2": (("transformer_blocks.1.ff.net.2",), (), False),
         "transformer.base_model.model.transformer_blocks.1.attn.to_v": (("transformer_blocks.1.attn.to_v",), (), False),
         "transformer.time_text_embed.guidance_embedder.linear_2": (("time_text_embed.guidance_embedder.linear_2",), (), False)}),
    "OneTrainer legacy (lora_transformer_)": (
        {**lowrank("lora_transformer_transformer_blocks_0_attn_to_q", H, H),
         "lora_transformer_transformer_blocks_0_attn_to_q.dora_scale": (H, 1),
         **lowrank("lora_transformer_single_transformer_blocks_1_proj_mlp", M, H)},
        {"lora_transformer_transformer_blocks_0_attn_to_q": (("transformer_blocks.0.attn.to_q",), (), False),
         "lora_transformer_single_transformer_blocks_1_proj_mlp": (("single_transformer_blocks.1.proj_mlp",), (), False)}),
    "OneTrainer OMI (.qkv.N, .linear1.N)": (
        {**lowrank("transformer.double_blocks.0.img_attn.qkv.1", H, H),
         **lowrank("transformer.single_blocks.1.linear1.3", M, H),
         **lowrank("transformer.final_layer.adaLN_modulation.1", 2 * H, H)},
        {"transformer.double_blocks.0.img_attn.qkv.1": (("transformer_blocks.0.attn.to_k",), (), False),
         "transformer.single_blocks.1.linear1.3": (("single_transformer_blocks.1.proj_mlp",), (), False),
         "transformer.final_layer.adaLN_modulation.1": (("norm_out.linear",), (), True)}),
    "LyCORIS (lycoris_)": (
        {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": (4, 4), "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": (8, 8),
         "lycoris_transformer_blocks_0_attn_to_q.alpha": (),
         "lycoris_single_transformer_blocks_1_proj_mlp.hada_w1_a": (M, R), "lycoris_single_transformer_blocks_1_proj_mlp.hada_w1_b": (R, H),
         "lycoris_single_transformer_blocks_1_proj_mlp.hada_w2_a": (M, R), "lycoris_single_transformer_blocks_1_proj_mlp.hada_w2_b": (R, H)},
        {"lycoris_transformer_blocks_0_attn_to_q": (("transformer_blocks.0.attn.to_q",), (), False),
         "lycoris_single_transformer_blocks_1_proj_mlp": (("single_transformer_blocks.1.proj_mlp",), (), False)}),
    "XLabs (processor.qkv_lora1 ...)": (
        {**lowrank("double_blocks.0.processor.qkv_lora1", 3 * H, H, "down.weight", "up.weight", False),
         **lowrank("double_blocks.0.processor.proj_lora2", H, H, "down.weight", "up.weight", False),
         **lowrank("single_blocks.1.processor.qkv_lora", 3 * H, H, "down.weight", "up.weight", False)},
        {"double_blocks.0.processor.qkv_lora1": (QKV, (), False),
         "double_blocks.0.processor.proj_lora2": (("transformer_blocks.0.attn.to_add_out",), (), False),
         "single_blocks.1.processor.qkv_lora": (LINEAR1[:3], (), False)}),
}


@pytest.mark.parametrize("fmt", sorted(FLUX_FORMATS))
@pytest.mark.parametrize("naming", ["diffusers", "ldm"])
def test_flux_format_binds_each_key(flux_maps, fmt, naming):
    shapes, want = FLUX_FORMATS[fmt]
    got = _bound(lora_of(shapes), flux_maps[naming])
    assert set(got) == set(want)
    for prefix, (modules, parts, swapped_on_diffusers) in want.items():
        b = got[prefix]
        assert tuple(t.module for t in b.targets) == modules, prefix
        assert tuple(b.candidate.parts) == tuple(parts), prefix
        # a swap is needed exactly on the final modulation, when the LoRA's layout is not the model's
        diffusers_spelling = prefix.startswith(("transformer.transformer_blocks", "transformer.single_transformer",
                                                "transformer.norm_out", "transformer.time", "transformer.base_model",
                                                "base_model.model.single_transformer", "lora_transformer_"))
        spelled = "diffusers" if diffusers_spelling else "ldm"
        assert b.candidate.swap == (modules[0] == "norm_out.linear" and spelled != naming), prefix
        assert swapped_on_diffusers == (modules[0] == "norm_out.linear" and spelled == "ldm")


def test_sd3_formats():
    base = tiny("sd3")
    km = bind(HostModel({"unet": base}, naming="diffusers")).keymap
    shapes = {**lowrank("lora_unet_joint_blocks_0_x_block_attn_qkv", 3 * H, H),
              **lowrank("lora_unet_joint_blocks_1_context_block_attn_qkv", 3 * H, H),
              **lowrank("lora_unet_joint_blocks_0_x_block_attn2_qkv", 3 * H, H),
              **lowrank("lora_unet_joint_blocks_2_context_block_adaLN_modulation_1", 2 * H, H),
              **lowrank("lora_unet_joint_blocks_1_context_block_adaLN_modulation_1", 6 * H, H),
              **lowrank("transformer.joint_blocks.0.x_block.attn.qkv.2", H, H),
              **lowrank("diffusion_model.joint_blocks.1.x_block.mlp.fc2", H, M),
              **lowrank("base_model.model.transformer_blocks.2.attn.to_q", H, H, "lora_A.weight", "lora_B.weight", False),
              **lowrank("transformer.transformer_blocks.0.attn2.to_out.0", H, H, "lora_A.weight", "lora_B.weight", False),
              **lowrank("lora_transformer_transformer_blocks_1_ff_context_net_0_proj", M, H),
              **lowrank("lycoris_transformer_blocks_0_attn_add_k_proj", H, H)}
    got = _bound(lora_of(shapes), km)
    assert tuple(t.module for t in got["lora_unet_joint_blocks_0_x_block_attn_qkv"].targets) == (
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
    assert got["lora_unet_joint_blocks_1_context_block_attn_qkv"].targets[0].module == "transformer_blocks.1.attn.add_q_proj"
    assert got["lora_unet_joint_blocks_0_x_block_attn2_qkv"].targets[2].module == "transformer_blocks.0.attn2.to_v"
    # the last block's context modulation is swapped (comfy/utils.py swap_scale_shift), the others are not
    assert got["lora_unet_joint_blocks_2_context_block_adaLN_modulation_1"].candidate.swap
    assert not got["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"].candidate.swap
    assert got["transformer.joint_blocks.0.x_block.attn.qkv.2"].targets[0].module == "transformer_blocks.0.attn.to_v"
    assert got["diffusion_model.joint_blocks.1.x_block.mlp.fc2"].targets[0].module == "transformer_blocks.1.ff.net.2"


def test_qwen_formats():
    base = tiny("qwen_image")
    km = bind(HostModel({"unet": base}, naming="diffusers")).keymap
    spellings = ["transformer_blocks.1.attn.to_q", "diffusion_model.transformer_blocks.1.attn.to_q",
                 "transformer.transformer_blocks.1.attn.to_q"]
    shapes = {}
    for s in spellings:
        shapes.update(lowrank(s, H, H, "lora_A.weight", "lora_B.weight", False))
    shapes.update(lowrank("transformer_blocks.0.img_mlp.net.2", H, M, "lora_A.default.weight", "lora_B.default.weight", False))
    shapes.update(lowrank("lora_unet_transformer_blocks_0_attn_add_q_proj", H, H))
    shapes.update({"lycoris_transformer_blocks_1_txt_mod_1.lokr_w1": (4, 4), "lycoris_transformer_blocks_1_txt_mod_1.lokr_w2": (48, 8)})
    got = _bound(lora_of(shapes), km)
    for s in spellings:
        assert got[s].targets[0].module == "transformer_blocks.1.attn.to_q"
    assert got["lycoris_transformer_blocks_1_txt_mod_1"].targets[0].module == "transformer_blocks.1.txt_mod.1"


def _full_size_lora(variant: str, spelling: str) -> dict:
    """{key: shape} of a rank-4 LoRA on every Linear (fused names where the layout fuses)."""
    layout = arch_layout(variant)
    out = {}
    fused = {}
    for path, info in layout["unet"].items():
        if info.kind != "linear":
            continue
        if spelling == "diffusers":
            out.update(lowrank("transformer." + path, info.weight_shape[0], info.weight_shape[1],
                               "lora_A.weight", "lora_B.weight", False))
        elif info.ldm_rows is not None:
            fused.setdefault(info.ldm_path, [0, info.weight_shape[1]])[0] += info.weight_shape[0]
        else:
            out.update(lowrank("lora_unet_" + info.ldm_path.replace(".", "_"), *info.weight_shape))
    for path, (rows, inp) in fused.items():
        out.update(lowrank("lora_unet_" + path.replace(".", "_"), rows, inp))
    return out


@pytest.mark.parametrize("variant", ["flux-dev", "flux-schnell", "sd3.5-large", "sd3.5-medium", "qwen-image"])
@pytest.mark.parametrize("spelling", ["diffusers", "kohya-original"])
def test_full_size_layout_binds_completely(variant, spelling):
    if variant == "qwen-image" and spelling != "diffusers":
        spelling = "diffusers"  # one layout only
    lora = lora_of(_full_size_lora(variant, spelling), device="meta")
    res = lora.resolve(arch_keymap(variant))
    assert res.unmatched == []
    base = detect_base_model(lora)
    if variant == "flux-schnell":  # without guidance keys a schnell LoRA fits dev too: named as the family
        assert base.name in ("flux-dev", "flux-schnell") and base.label == "Flux.1", base.evidence
    else:
        assert base.name == variant, base.evidence
    assert base.supported


def test_detection_names_the_family_when_variants_tie():
    shapes = lowrank("lora_unet_double_blocks_3_img_attn_qkv", 9216, 3072)
    base = detect_base_model(lora_of(shapes, device="meta"))
    # one double-block qkv fits Flux, Chroma and HunyuanVideo alike (same names, same shapes)
    assert base.name.startswith("flux") and base.label == "Flux.1 or Chroma or HunyuanVideo", base.evidence
    # a guidance-embedder key only fits dev; double block 20 fits no Flux
    shapes.update(lowrank("lora_unet_guidance_in_in_layer", 3072, 256))
    assert detect_base_model(lora_of(shapes, device="meta")).name == "flux-dev"
    # HunyuanVideo is told from Flux by Tencent's names (musubi) and by its block counts
    hv = lowrank("lora_unet_double_blocks_3_img_mlp_fc1", 12288, 3072)
    assert detect_base_model(lora_of(hv, device="meta")).name.startswith("hunyuan-video")
    hv = {**shapes, **lowrank("lora_unet_double_blocks_19_img_attn_qkv", 9216, 3072)}
    hv.pop("lora_unet_guidance_in_in_layer.lora_down.weight"), hv.pop("lora_unet_guidance_in_in_layer.lora_up.weight")
    hv.pop("lora_unet_guidance_in_in_layer.alpha")
    assert detect_base_model(lora_of(hv, device="meta")).label == "HunyuanVideo"
    # Qwen-Image is told from Flux by its names and its 60 blocks, though shapes coincide
    q = lowrank("transformer.transformer_blocks.45.img_mlp.net.0.proj", 12288, 3072, "lora_A.weight", "lora_B.weight", False)
    assert detect_base_model(lora_of(q, device="meta")).name == "qwen-image"
    s = lowrank("lora_unet_joint_blocks_30_x_block_attn_qkv", 3 * 2432, 2432)
    assert detect_base_model(lora_of(s, device="meta")).name == "sd3.5-large"


def test_text_encoder_keys_of_dit_loras():
    shapes = {**lowrank("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
              **lowrank("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 4096, 4096),
              **lowrank("lora_te2_encoder_block_1_layer_1_DenseReluDense_wi_0", 10240, 4096),  # OneTrainer's T5
              **lowrank("text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1", 3072, 768),
              **lowrank("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072)}
    res = lora_of(shapes, device="meta").resolve(arch_keymap("flux-dev"))
    assert res.unmatched == []
    comps = {b.group.prefix: b.targets[0].component for b in res.bindings}
    assert comps["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == "te1"
    assert comps["lora_te3_encoder_block_0_layer_0_SelfAttention_q"] == "te3"
    assert comps["lora_te2_encoder_block_1_layer_1_DenseReluDense_wi_0"] == "te3"
    assert comps["text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1"] == "te1"
