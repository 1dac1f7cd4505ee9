"""Video and newer DiT families (issue 12): HunyuanVideo, Wan 2.1 / 2.2, Lumina2, Z-Image.

* Oracles: PEFT files on tiny diffusers HunyuanVideo / Wan (I2V, with the image branch) /
  Lumina2 / Z-Image reproduce PEFT's forward within 1e-5; each also applied to the original-layout twin
  (ComfyUI names: HunyuanVideo's Flux-style fused qkv and linear1, Lumina2's uneven GQA qkv,
  Z-Image's fused qkv and x_embedder / final_layer)
  gives the same merged weights and output (the fused-vs-split golden test).
* Formats: musubi-tuner, diffusion-pipe, old musubi-converted, Tencent's I2V prefix, diffusers,
  ComfyUI generic, OneTrainer OMI (HunyuanVideo); musubi, Wan-Fun, native PEFT, Kijai /
  lightx2v (diff, diff_b, diff_m, norm3, head), diffusers and kohya-on-diffusers (Wan); and
  Lumina2's diffusion-pipe / diffusers / kohya spellings: every key maps to the right module.
* Full-size key layouts bind completely; a Wan 2.1 I2V LoRA on Wan 2.2 reports exactly its
  image-branch keys as not applicable.
"""
import copy

import pytest
import torch

from dit_models import OriginalTree, diffusers_state, dit_table, forward, max_rel, original_state, tiny
from lora_ext.detect import detect_base_model
from lora_ext.engine import apply
from lora_ext.hostmodel import HostModel, bind
from lora_ext.layouts import arch_keymap, arch_layout
from test_dit_formats import lora_of, lowrank

peft = pytest.importorskip("peft")

TARGETS = {
    "hunyuan_video": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                      "norm1.linear", "norm.linear", "norm_out.linear", "proj_in"],
    "wan": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2", "time_proj",
            "proj_out", "linear_1", "linear_2"],
    "lumina2": ["to_q", "to_k", "to_v", "to_out.0", "linear_1", "linear_2", "linear_3", "norm1.linear", "x_embedder"],
    "z_image": ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "0.adaLN_modulation.0", "1.adaLN_modulation.0",
                "all_x_embedder.2-1", "linear", "adaLN_modulation.1", "cap_embedder.1", "mlp.0", "mlp.2"],
}


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["hunyuan_video", "wan", "lumina2", "z_image"])
def test_peft_lora_on_both_layouts(tmp_path, family):
    base = tiny(family)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=7, target_modules=TARGETS[family]))
    _randomise(pm, 3)
    want = forward(pm.base_model.model, family)
    pm.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    model = copy.deepcopy(base)
    h = apply(model, [path], "fuse")
    assert h.unmatched == []
    assert max_rel(forward(model, family), want) <= 1e-5
    assert max_rel(forward(base, family), want) > 1e-3
    # the same file on the original-layout twin: the same merged weights, bit for bit
    table = dit_table(base)
    tree = OriginalTree(original_state(base, table))
    bound = bind(HostModel({"unet": tree}, naming="ldm"))
    assert bound.skipped["unet"] == []
    h2 = apply({"unet": bound.views["unet"]}, [path], "fuse", keymap=bound.keymap_for(["unet"]))
    assert h2.unmatched == []
    back = diffusers_state(tree.state_dict(), table)
    merged = model.state_dict()
    assert all(torch.equal(t, merged[k]) for k, t in back.items())
    h2.remove()
    assert all(torch.equal(t, base.state_dict()[k]) for k, t in diffusers_state(tree.state_dict(), table).items())


H, M, R = 32, 128, 4
QKV = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
LINEAR1 = ("single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k",
           "single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp")
REFINER_QKV = tuple(f"context_embedder.token_refiner.refiner_blocks.0.attn.to_{x}" for x in "qkv")

HV_FORMATS = {
    "musubi-tuner (Tencent names)": {
        **lowrank("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H), **lowrank("lora_unet_double_blocks_1_img_mlp_fc1", M, H),
        **lowrank("lora_unet_double_blocks_1_txt_mlp_fc2", H, M), **lowrank("lora_unet_single_blocks_1_linear1", 3 * H + M, H),
        **lowrank("lora_unet_txt_in_individual_token_refiner_blocks_0_self_attn_qkv", 3 * H, H)},
    "musubi-converted / old diffusion-pipe": {
        **lowrank("diffusion_model.double_blocks.0.img_attn_qkv", 3 * H, H, "lora_A.weight", "lora_B.weight", False),
        **lowrank("diffusion_model.double_blocks.1.img_mlp.fc1", M, H, "lora_A.weight", "lora_B.weight", False)},
    "diffusion-pipe (transformer. + Tencent names)": {
        **lowrank("transformer.double_blocks.0.img_attn_qkv", 3 * H, H, "lora_A.weight", "lora_B.weight", False),
        **lowrank("transformer.single_blocks.1.linear1", 3 * H + M, H, "lora_A.weight", "lora_B.weight", False)},
    "Tencent HunyuanVideo-I2V trainer": {
        **lowrank("Hunyuan_video_I2V_lora_double_blocks_0_img_attn_qkv", 3 * H, H),
        **lowrank("Hunyuan_video_I2V_lora_double_blocks_1_img_mlp_fc1", M, H)},
    "diffusers / finetrainers": {
        **lowrank("transformer.transformer_blocks.0.attn.to_q", H, H, "lora_A.weight", "lora_B.weight", False),
        **lowrank("transformer.single_transformer_blocks.1.proj_mlp", M, H, "lora_A.weight", "lora_B.weight", False),
        **lowrank("transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q", H, H, "lora_A.weight", "lora_B.weight", False)},
    "ComfyUI generic (Flux-style names)": {
        **lowrank("diffusion_model.double_blocks.0.img_attn.qkv", 3 * H, H),
        "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": (3 * H,),
        **lowrank("diffusion_model.double_blocks.1.img_mlp.0", M, H)},
    "OneTrainer OMI": {
        **lowrank("transformer.double_blocks.0.img_attn_qkv.2", H, H),
        **lowrank("transformer.single_blocks.1.linear1.3", M, H),
        **lowrank("transformer.txt_in.individual_token_refiner.blocks.0.self_attn_qkv.0", H, H)},
}
HV_WANT = {  # group prefix ending -> target modules
    "double_blocks_0_img_attn_qkv": QKV, "double_blocks.0.img_attn_qkv": QKV, "double_blocks.0.img_attn.qkv": QKV,
    "double_blocks_1_img_mlp_fc1": ("transformer_blocks.1.ff.net.0.proj",),
    "double_blocks.1.img_mlp.fc1": ("transformer_blocks.1.ff.net.0.proj",),
    "double_blocks.1.img_mlp.0": ("transformer_blocks.1.ff.net.0.proj",),
    "double_blocks_1_txt_mlp_fc2": ("transformer_blocks.1.ff_context.net.2",),
    "single_blocks_1_linear1": LINEAR1, "single_blocks.1.linear1": LINEAR1,
    "txt_in_individual_token_refiner_blocks_0_self_attn_qkv": REFINER_QKV,
    "transformer_blocks.0.attn.to_q": ("transformer_blocks.0.attn.to_q",),
    "single_transformer_blocks.1.proj_mlp": ("single_transformer_blocks.1.proj_mlp",),
    "refiner_blocks.0.attn.to_q": ("context_embedder.token_refiner.refiner_blocks.0.attn.to_q",),
    "img_attn_qkv.2": ("transformer_blocks.0.attn.to_v",), "linear1.3": ("single_transformer_blocks.1.proj_mlp",),
    "self_attn_qkv.0": ("context_embedder.token_refiner.refiner_blocks.0.attn.to_q",),
}


@pytest.fixture(scope="module")
def hv_maps():
    base = tiny("hunyuan_video")
    tree = OriginalTree(original_state(base, dit_table(base)))
    return [bind(HostModel({"unet": base}, naming="diffusers")).keymap,
            bind(HostModel({"unet": tree}, naming="ldm")).keymap]


@pytest.mark.parametrize("fmt", sorted(HV_FORMATS))
def test_hunyuan_video_formats(hv_maps, fmt):
    for km in hv_maps:
        res = lora_of(HV_FORMATS[fmt]).resolve(km)
        assert res.unmatched == [], res.unmatched[:2]
        for b in res.bindings:
            want = next(v for k, v in HV_WANT.items() if b.group.prefix.endswith(k))
            assert tuple(t.module for t in b.targets) == want, b.group.prefix


W = 32
WAN_FORMATS = {
    "musubi-tuner": {**lowrank("lora_unet_blocks_0_self_attn_q", W, W), **lowrank("lora_unet_blocks_1_cross_attn_k_img", W, W),
                     **lowrank("lora_unet_blocks_1_ffn_0", 64, W)},
    "Wan-Fun (double underscore)": {**lowrank("lora_unet__blocks_0_cross_attn_k", W, W)},
    "native PEFT (ComfyUI, Kijai, DiffSynth, diffusion-pipe, ai-toolkit)": {
        **lowrank("diffusion_model.blocks.0.self_attn.q", W, W, "lora_A.weight", "lora_B.weight", False),
        **lowrank("diffusion_model.blocks.1.cross_attn.v_img", W, W, "lora_A.weight", "lora_B.weight", False),
        **lowrank("diffusion_model.blocks.0.ffn.2", W, 64, "lora_A.weight", "lora_B.weight", False)},
    "Kijai / lightx2v distillation": {
        **lowrank("diffusion_model.blocks.0.self_attn.o", W, W), "diffusion_model.blocks.0.self_attn.o.diff_b": (W,),
        "diffusion_model.blocks.1.norm3.diff": (W,), "diffusion_model.blocks.1.norm3.diff_b": (W,),
        "diffusion_model.blocks.0.self_attn.norm_q.diff": (W,), "diffusion_model.blocks.1.diff_m": (1, 6, W),
        **lowrank("diffusion_model.head.head", 16, W), **lowrank("diffusion_model.time_projection.1", 6 * W, W),
        **lowrank("diffusion_model.text_embedding.0", W, 8), **lowrank("diffusion_model.img_emb.proj.1", 12, 12)},
    "diffusers PEFT": {
        **lowrank("transformer.blocks.0.attn1.to_q", W, W, "lora_A.weight", "lora_B.weight", False),
        "transformer.blocks.0.attn1.to_q.lora_B.bias": (W,),
        **lowrank("transformer.blocks.1.attn2.add_k_proj", W, W, "lora_A.weight", "lora_B.weight", False),
        **lowrank("transformer.condition_embedder.time_proj", 6 * W, W, "lora_A.weight", "lora_B.weight", False),
        **lowrank("transformer.proj_out", 16, W, "lora_A.weight", "lora_B.weight", False)},
    "kohya names on diffusers modules": {**lowrank("lora_unet_blocks_0_attn1_to_q", W, W),
                                         **lowrank("lora_unet_blocks_1_ffn_net_0_proj", 64, W)},
}
WAN_WANT = {
    "self_attn_q": "blocks.0.attn1.to_q", "cross_attn_k_img": "blocks.1.attn2.add_k_proj", "ffn_0": "blocks.1.ffn.net.0.proj",
    "blocks_0_cross_attn_k": "blocks.0.attn2.to_k", "self_attn.q": "blocks.0.attn1.to_q",
    "cross_attn.v_img": "blocks.1.attn2.add_v_proj", "ffn.2": "blocks.0.ffn.net.2", "self_attn.o": "blocks.0.attn1.to_out.0",
    "norm3": "blocks.1.norm2", "norm_q": "blocks.0.attn1.norm_q", "blocks.1.modulation": "blocks.1.scale_shift_table",
    "head.head": "proj_out", "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1", "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "attn1.to_q": "blocks.0.attn1.to_q", "add_k_proj": "blocks.1.attn2.add_k_proj", "time_proj": "condition_embedder.time_proj",
    "proj_out": "proj_out", "attn1_to_q": "blocks.0.attn1.to_q", "ffn_net_0_proj": "blocks.1.ffn.net.0.proj",
}


@pytest.mark.parametrize("fmt", sorted(WAN_FORMATS))
def test_wan_formats(fmt):
    base = tiny("wan")
    tree = OriginalTree(original_state(base, dit_table(base)))
    for km in (bind(HostModel({"unet": base}, naming="diffusers")).keymap,
               bind(HostModel({"unet": tree}, naming="ldm")).keymap):
        res = lora_of(WAN_FORMATS[fmt]).resolve(km)
        assert res.unmatched == [], res.unmatched[:2]
        for b in res.bindings:
            want = next(v for k, v in WAN_WANT.items() if b.group.prefix.endswith(k))
            assert b.targets[0].module == want, b.group.prefix


def test_wan_kijai_file_applies_exactly(tmp_path):
    """diff / diff_b / diff_m / norm3 from a lightx2v-style file change exactly those parameters."""
    from safetensors.torch import save_file

    base = tiny("wan")
    g = torch.Generator().manual_seed(5)
    sd = {k: torch.randn(s, generator=g) * 0.1 if s else torch.tensor(4.0)
          for k, s in WAN_FORMATS["Kijai / lightx2v distillation"].items()}
    save_file(sd, tmp_path / "kijai.safetensors")
    model = copy.deepcopy(base)
    h = apply(model, [tmp_path / "kijai.safetensors"], "fuse")
    assert h.unmatched == []
    w0, w1 = base.state_dict(), model.state_dict()
    assert torch.equal(w1["blocks.1.scale_shift_table"], w0["blocks.1.scale_shift_table"] + sd["diffusion_model.blocks.1.diff_m"])
    assert torch.equal(w1["blocks.1.norm2.weight"], w0["blocks.1.norm2.weight"] + sd["diffusion_model.blocks.1.norm3.diff"])
    assert torch.equal(w1["blocks.1.norm2.bias"], w0["blocks.1.norm2.bias"] + sd["diffusion_model.blocks.1.norm3.diff_b"])
    assert torch.equal(w1["blocks.0.attn1.to_out.0.bias"], w0["blocks.0.attn1.to_out.0.bias"] + sd["diffusion_model.blocks.0.self_attn.o.diff_b"])
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed == {"blocks.1.scale_shift_table", "blocks.1.norm2.weight", "blocks.1.norm2.bias", "blocks.0.attn1.norm_q.weight",
                       "blocks.0.attn1.to_out.0.weight", "blocks.0.attn1.to_out.0.bias", "proj_out.weight",
                       "condition_embedder.time_proj.weight", "condition_embedder.text_embedder.linear_1.weight",
                       "condition_embedder.image_embedder.ff.net.0.proj.weight"}
    h.remove()
    assert all(torch.equal(model.state_dict()[k], w0[k]) for k in w0)


def test_lumina2_formats():
    base = tiny("lumina2")
    tree = OriginalTree(original_state(base, dit_table(base)))
    shapes = {**lowrank("diffusion_model.layers.0.attention.qkv", 48 + 16 + 16, 48, "lora_A.weight", "lora_B.weight", False),
              **lowrank("transformer.layers.1.attn.to_k", 16, 48, "lora_A.weight", "lora_B.weight", False),
              **lowrank("lora_unet_noise_refiner_0_attention_qkv", 80, 48),
              **lowrank("lora_unet_layers_1_feed_forward_w3", 192, 48),
              **lowrank("lora_unet_context_refiner_0_attention_out", 48, 48)}
    for km in (bind(HostModel({"unet": base}, naming="diffusers")).keymap,
               bind(HostModel({"unet": tree}, naming="ldm")).keymap):
        got = {b.group.prefix: b for b in _resolved(shapes, km)}
        qkv = got["diffusion_model.layers.0.attention.qkv"]
        assert [t.module for t in qkv.targets] == ["layers.0.attn.to_q", "layers.0.attn.to_k", "layers.0.attn.to_v"]
        assert tuple(qkv.candidate.parts) == (48, 16, 16)  # grouped-query: uneven rows
        assert got["lora_unet_layers_1_feed_forward_w3"].targets[0].module == "layers.1.feed_forward.linear_3"
        assert got["lora_unet_context_refiner_0_attention_out"].targets[0].module == "context_refiner.0.attn.to_out.0"



def test_z_image_formats():
    """Z-Image spellings on both layouts: ComfyUI / original (fused ``attention.qkv``,
    ``attention.out``, ``x_embedder``, ``final_layer``), diffusers (``transformer.`` +
    ``attention.to_q``, ``all_x_embedder.2-1``), musubi-tuner (``lora_unet_`` + the diffusers names,
    networks/lora_zimage.py) and its ComfyUI conversion (``attention_qkv``, ``attention_out``;
    networks/convert_z_image_lora_to_comfy.py)."""
    base = tiny("z_image")
    tree = OriginalTree(original_state(base, dit_table(base)))
    shapes = {**lowrank("diffusion_model.layers.0.attention.qkv", 3 * 48, 48, "lora_A.weight", "lora_B.weight", False),
              **lowrank("transformer.layers.1.attention.to_k", 48, 48, "lora_A.weight", "lora_B.weight", False),
              **lowrank("transformer.all_x_embedder.2-1", 48, 16, "lora_A.weight", "lora_B.weight", False),
              **lowrank("diffusion_model.final_layer.linear", 16, 48, "lora_A.weight", "lora_B.weight", False),
              **lowrank("lora_unet_layers_1_attention_to_out_0", 48, 48),
              **lowrank("lora_unet_layers_0_feed_forward_w2", 48, 128),
              **lowrank("lora_unet_layers_1_attention_qkv", 3 * 48, 48),
              **lowrank("lora_unet_layers_0_attention_out", 48, 48),
              **lowrank("lora_unet_noise_refiner_0_adaLN_modulation_0", 4 * 48, 48),
              **lowrank("lora_unet_context_refiner_0_feed_forward_w1", 128, 48)}
    want = {"transformer.layers.1.attention.to_k": ["layers.1.attention.to_k"],
            "transformer.all_x_embedder.2-1": ["all_x_embedder.2-1"],
            "diffusion_model.final_layer.linear": ["all_final_layer.2-1.linear"],
            "lora_unet_layers_1_attention_to_out_0": ["layers.1.attention.to_out.0"],
            "lora_unet_layers_0_feed_forward_w2": ["layers.0.feed_forward.w2"],
            "lora_unet_layers_1_attention_qkv": [f"layers.1.attention.to_{x}" for x in "qkv"],
            "lora_unet_layers_0_attention_out": ["layers.0.attention.to_out.0"],
            "lora_unet_noise_refiner_0_adaLN_modulation_0": ["noise_refiner.0.adaLN_modulation.0"],
            "lora_unet_context_refiner_0_feed_forward_w1": ["context_refiner.0.feed_forward.w1"]}
    for km in (bind(HostModel({"unet": base}, naming="diffusers")).keymap,
               bind(HostModel({"unet": tree}, naming="ldm")).keymap):
        got = {b.group.prefix: b for b in _resolved(shapes, km)}
        qkv = got["diffusion_model.layers.0.attention.qkv"]
        assert [t.module for t in qkv.targets] == [f"layers.0.attention.to_{x}" for x in "qkv"]
        assert tuple(qkv.candidate.row_counts) == (48, 48, 48)
        for prefix, modules in want.items():
            assert [t.module for t in got[prefix].targets] == modules, prefix


def _resolved(shapes, km):
    res = lora_of(shapes).resolve(km)
    assert res.unmatched == [], res.unmatched[:2]
    return res.bindings


def _full_lora(variant, spelling):
    out, fused = {}, {}
    for path, info in arch_layout(variant)["unet"].items():
        if info.kind != "linear":
            continue
        if spelling == "diffusers":
            out.update(lowrank("transformer." + path, *info.weight_shape, "lora_A.weight", "lora_B.weight", False))
        elif info.ldm_rows is not None:
            fused.setdefault(info.ldm_alias or info.ldm_path, [0, info.weight_shape[1]])[0] += info.weight_shape[0]
        else:
            out.update(lowrank("lora_unet_" + (info.ldm_alias or info.ldm_path).replace(".", "_"), *info.weight_shape))
    for body, (rows, inp) in fused.items():
        out.update(lowrank("lora_unet_" + body.replace(".", "_"), rows, inp))
    return out


@pytest.mark.parametrize("variant", ["hunyuan-video", "wan-14b-t2v", "wan2.1-i2v-14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b",
                                     "lumina-image-2", "z-image-turbo"])
@pytest.mark.parametrize("spelling", ["diffusers", "original"])
def test_full_size_video_layouts_bind_completely(variant, spelling):
    lora = lora_of(_full_lora(variant, spelling), device="meta")
    assert lora.resolve(arch_keymap(variant)).unmatched == []
    base = detect_base_model(lora)
    assert base.supported and (base.name == variant or variant in base.evidence or base.label != ""), base.evidence
    if variant in ("hunyuan-video", "wan2.1-i2v-14b", "wan2.2-ti2v-5b", "lumina-image-2", "z-image-turbo"):
        assert base.name == variant, base.evidence


def test_wan21_i2v_lora_on_wan22_reports_only_the_image_branch():
    lora = lora_of(_full_lora("wan2.1-i2v-14b", "original"), device="meta")
    res = lora.resolve(arch_keymap("wan2.2-i2v-a14b"))
    bad = {u.key for u in res.unmatched}
    assert bad and all(("k_img" in k or "v_img" in k or "img_emb" in k) for k in bad)
    assert all(u.reason.startswith("not applicable to Wan 2.2 I2V-A14B: this Wan model has no CLIP image branch")
               for u in res.unmatched)
    assert len(res.bindings) == len(lora.groups) - len({k.split(".")[0] for k in bad})


def test_flux_and_hunyuan_video_loras_are_told_apart():
    flux = lora_of({**lowrank("lora_unet_double_blocks_18_img_attn_qkv", 9216, 3072),
                    **lowrank("lora_unet_single_blocks_37_linear1", 21504, 3072),
                    **lowrank("lora_unet_double_blocks_3_img_mod_lin", 18432, 3072)}, device="meta")
    hv = lora_of({**lowrank("lora_unet_double_blocks_18_img_attn_qkv", 9216, 3072),
                  **lowrank("lora_unet_single_blocks_39_linear1", 21504, 3072)}, device="meta")
    assert detect_base_model(flux).label == "Flux.1 or HunyuanVideo" or detect_base_model(flux).name.startswith("flux")
    assert detect_base_model(hv).name.startswith("hunyuan-video"), detect_base_model(hv).evidence
    # Tencent's mlp names are HunyuanVideo's alone
    mlp = lora_of(lowrank("lora_unet_double_blocks_2_txt_mlp_fc2", 3072, 12288), device="meta")
    assert detect_base_model(mlp).name.startswith("hunyuan-video")


def test_hidream_peft_lora_merges_like_peft(tmp_path):
    """HiDream (mixture-of-experts feed-forward; the same names in diffusers and ComfyUI): a PEFT
    LoRA on attention, experts, shared experts and the text stream's feed-forward, fused by
    lora-ext, equals PEFT's own merge; the ai-toolkit / diffusion-pipe spelling binds the same."""
    import diffusers

    from test_dit_tables import TINY

    torch.manual_seed(0)
    base = diffusers.HiDreamImageTransformer2DModel(**TINY["HiDreamImageTransformer2DModel"]).eval()
    targets = ["to_q", "to_k", "to_v", "to_out", "to_q_t", "w1", "w2", "w3", "adaLN_modulation.1"]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=7, target_modules=targets))
    _randomise(pm, 9)
    pm.save_pretrained(tmp_path / "adapter")
    want = pm.merge_and_unload().state_dict()
    model = copy.deepcopy(base)
    h = apply(model, [tmp_path / "adapter" / "adapter_model.safetensors"], "fuse")
    assert h.unmatched == []
    got = model.state_dict()
    changed = [k for k in got if not torch.equal(got[k], base.state_dict()[k])]
    assert any(".experts.3." in k for k in changed) and any("ff_t" in k for k in changed)
    assert max(max_rel(got[k], want[k]) for k in want) <= 1e-5
    shapes = {**lowrank("diffusion_model.double_stream_blocks.1.block.ff_i.experts.2.w2", 32, 256, "lora_A.weight", "lora_B.weight", False),
              **lowrank("lycoris_single_stream_blocks_0_block_attn1_to_q", 32, 32)}
    km = bind(HostModel({"unet": base}, naming="diffusers")).keymap
    res = lora_of(shapes).resolve(km)
    assert res.unmatched == []
    assert {b.targets[0].module for b in res.bindings} == {"double_stream_blocks.1.block.ff_i.experts.2.w2",
                                                          "single_stream_blocks.0.block.attn1.to_q"}
