"""Module tables and ldm <-> diffusers conversion for SD1, SD2 and SDXL (meta tensors only)."""
import functools

import pytest
import torch

from lora_ext import arch as A

ALL = [(a, c) for a in A.ARCHS for c in A.components(a)]

# (modules with a weight, tensors in a diffusers/transformers state dict,
#  tensors in an A1111 single-file checkpoint for this component).
# The ldm figures are what real checkpoints hold, minus buffers and logit_scale:
# SD1.5's UNet has 686 tensors; SD2's OpenCLIP has 24 resblocks (12 tensors each) of which
# diffusers keeps 23, plus token/positional embedding and ln_final (its text_projection
# is unused by CLIPTextModel); SDXL's bigG adds text_projection.
COUNTS = {
    ("sd1", "unet"): (391, 686, 686),
    ("sd1", "te1"): (99, 196, 196),
    ("sd2", "unet"): (391, 686, 686),
    ("sd2", "te1"): (187, 372, 23 * 12 + 4),
    ("sdxl", "unet"): (1050, 1680, 1680),
    ("sdxl", "te1"): (99, 196, 196),
    ("sdxl", "te2"): (260, 517, 32 * 12 + 5),
}

# Parameter counts of the official models: a check that the shipped configs are the real ones.
PARAMS = {
    ("sd1", "unet"): 859_520_964,
    ("sd1", "te1"): 123_060_480,
    ("sd2", "unet"): 865_910_724,
    ("sd2", "te1"): 340_387_840,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "te1"): 123_060_480,
    ("sdxl", "te2"): 694_659_840,
}


@functools.lru_cache(maxsize=None)
def meta_state(arch, component):
    return dict(A.build_meta(arch, component).state_dict())


def ldm_keys(info):
    return [k for k in (info.ldm_weight, info.ldm_bias) if k]


def test_archs_and_components():
    assert A.ARCHS == ("sd1", "sd2", "sdxl")
    assert A.components("sd1") == ("unet", "te1")
    assert A.components("sd2") == ("unet", "te1")
    assert A.components("sdxl") == ("unet", "te1", "te2")
    with pytest.raises(ValueError):
        A.components("sd3")
    with pytest.raises(ValueError):
        A.module_table("sd1", "te2")


def test_config_copies_and_key_facts():
    cfg = A.load_config("sd2", "unet")
    assert cfg["attention_head_dim"] == [5, 10, 20, 20]
    assert cfg["cross_attention_dim"] == 1024 and cfg["use_linear_projection"] is True
    cfg["in_channels"] = 9
    assert A.load_config("sd2", "unet")["in_channels"] == 4  # callers get their own copy
    te2 = A.load_config("sdxl", "te2")
    assert (te2["hidden_size"], te2["num_hidden_layers"], te2["num_attention_heads"]) == (1280, 32, 20)
    assert (te2["intermediate_size"], te2["projection_dim"], te2["hidden_act"]) == (5120, 1280, "gelu")
    te = A.load_config("sd2", "te1")
    assert (te["hidden_size"], te["num_hidden_layers"], te["num_attention_heads"]) == (1024, 23, 16)
    assert A.load_config("sd1", "te1")["hidden_act"] == "quick_gelu"
    assert A.load_config("sdxl", "unet")["transformer_layers_per_block"] == [1, 2, 10]


def test_build_meta_types():
    assert type(A.build_meta("sdxl", "te2")).__name__ == "CLIPTextModelWithProjection"
    assert type(A.build_meta("sdxl", "te1")).__name__ == "CLIPTextModel"
    unet = A.build_meta("sd1", "unet")
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert all(p.is_meta for p in unet.parameters())


@pytest.mark.parametrize("arch,component", ALL)
def test_table_covers_meta_model(arch, component):
    model = A.build_meta(arch, component)
    expected = {}
    for name, module in model.named_modules():
        w = module._parameters.get("weight")
        if w is not None:
            b = module._parameters.get("bias")
            name = name[len("text_model."):] if name.startswith("text_model.") else name
            expected[name] = (tuple(w.shape), None if b is None else tuple(b.shape))
    table = A.module_table(arch, component)
    assert {k: (v.weight_shape, v.bias_shape) for k, v in table.items()} == expected
    assert all(k == v.path and v.component == component for k, v in table.items())
    assert all(v.ldm_path is not None for v in table.values())  # every module has an ldm twin

    n_modules, n_diffusers, n_ldm = COUNTS[(arch, component)]
    assert len(table) == n_modules
    assert len(meta_state(arch, component)) == n_diffusers
    assert len({k for v in table.values() for k in ldm_keys(v)}) == n_ldm
    assert sum(p.numel() for p in model.parameters()) == PARAMS[(arch, component)]

    root = A.ldm_root(arch, component)
    for info in table.values():
        assert all(k.startswith(root) for k in ldm_keys(info))
        if info.ldm_rows is None and not info.ldm_weight.endswith(("_embedding", "text_projection")):
            assert info.ldm_weight == root + info.ldm_path + ".weight"  # the documented convention


def test_kinds():
    unet = A.module_table("sd1", "unet")
    assert unet["conv_in"].kind == "conv"
    assert unet["down_blocks.0.attentions.0.proj_in"].kind == "conv"  # SD1: 1x1 conv
    assert A.module_table("sd2", "unet")["down_blocks.0.attentions.0.proj_in"].kind == "linear"
    assert unet["down_blocks.0.resnets.0.norm1"].kind == "norm"
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.norm1"].kind == "norm"
    te = A.module_table("sd1", "te1")
    assert te["embeddings.token_embedding"].kind == "embedding"
    assert te["final_layer_norm"].kind == "norm"
    assert te["encoder.layers.3.self_attn.q_proj"].kind == "linear"
    assert A.module_table("sdxl", "te2")["text_projection"].bias_shape is None


# ---- known keys of real checkpoints


def by_ldm(arch, key):
    hits = [
        (i, k == i.ldm_bias)
        for c in A.components(arch)
        for i in A.module_table(arch, c).values()
        for k in ldm_keys(i)
        if k == key
    ]
    assert hits, key
    return hits


SD1_REAL_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": "conv_in",
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": "down_blocks.0.resnets.0.time_emb_proj",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "model.diffusion_model.input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut",
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": "down_blocks.3.resnets.1.conv2",
    "model.diffusion_model.middle_block.0.in_layers.0.weight": "mid_block.resnets.0.norm1",
    "model.diffusion_model.middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in",
    "model.diffusion_model.middle_block.2.out_layers.0.bias": "mid_block.resnets.1.norm2",
    "model.diffusion_model.output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv",
    "model.diffusion_model.output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv",
    "model.diffusion_model.output_blocks.8.2.conv.weight": "up_blocks.2.upsamplers.0.conv",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight":
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.bias":
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
    "model.diffusion_model.time_embed.0.weight": "time_embedding.linear_1",
    "model.diffusion_model.time_embed.2.bias": "time_embedding.linear_2",
    "model.diffusion_model.out.0.weight": "conv_norm_out",
    "model.diffusion_model.out.2.weight": "conv_out",
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": "encoder.layers.11.mlp.fc2",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight":
        "embeddings.position_embedding",
}


@pytest.mark.parametrize("key,path", sorted(SD1_REAL_KEYS.items()))
def test_sd1_real_keys(key, path):
    [(info, is_bias)] = by_ldm("sd1", key)
    assert info.path == path and is_bias == key.endswith(".bias")


def test_sd1_conversion_shapes():
    sd = {"model.diffusion_model.output_blocks.2.1.conv.weight": torch.empty(1280, 1280, 3, 3, device="meta")}
    out, left = A.ldm_to_diffusers(sd, "sd1")
    assert out["unet"]["up_blocks.0.upsamplers.0.conv.weight"].shape == (1280, 1280, 3, 3)
    assert left == [] and out["te1"] == {}


def test_sdxl_real_keys():
    unet = A.module_table("sdxl", "unet")
    [(info, _)] = by_ldm("sdxl", "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight")
    assert info.path == "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    assert info.weight_shape == (640, 2048) and info.bias_shape is None
    [(info, _)] = by_ldm("sdxl", "model.diffusion_model.label_emb.0.0.weight")
    assert info.path == "add_embedding.linear_1" and info.weight_shape == (1280, 2816)
    assert unet["add_embedding.linear_2"].ldm_path == "label_emb.0.2"
    assert unet["up_blocks.0.upsamplers.0.conv"].ldm_path == "output_blocks.2.2.conv"
    assert unet["up_blocks.1.upsamplers.0.conv"].ldm_path == "output_blocks.5.2.conv"
    assert unet["down_blocks.1.downsamplers.0.conv"].ldm_path == "input_blocks.6.0.op"
    # Ten transformer blocks in the 1280-wide level and the middle.
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn1.to_v.weight" in {
        info.ldm_weight for info in unet.values()
    }
    assert unet["mid_block.attentions.0.transformer_blocks.9.ff.net.2"].ldm_path == (
        "middle_block.1.transformer_blocks.9.ff.net.2"
    )
    te1 = A.module_table("sdxl", "te1")["encoder.layers.0.self_attn.q_proj"]
    assert te1.ldm_weight == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    te2 = A.module_table("sdxl", "te2")
    assert te2["encoder.layers.31.mlp.fc1"].ldm_weight == (
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"
    )
    tp = te2["text_projection"]
    assert (tp.ldm_weight, tp.ldm_transposed, tp.weight_shape) == (
        "conditioner.embedders.1.model.text_projection", True, (1280, 1280)
    )


def test_sd2_openclip_keys():
    te = A.module_table("sd2", "te1")
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    rows = {}
    for info, is_bias in by_ldm("sd2", key):
        assert not is_bias and info.ldm_bias == key.replace("weight", "bias")
        rows[info.path] = info.ldm_rows
    assert rows == {
        "encoder.layers.0.self_attn.q_proj": (0, 1024),
        "encoder.layers.0.self_attn.k_proj": (1024, 2048),
        "encoder.layers.0.self_attn.v_proj": (2048, 3072),
    }
    assert [i.path for i in A.ldm_index("sd2", "te1")["transformer.resblocks.0.attn"]] == [
        "encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.k_proj", "encoder.layers.0.self_attn.v_proj"
    ]
    expect = {
        "encoder.layers.5.self_attn.out_proj": "cond_stage_model.model.transformer.resblocks.5.attn.out_proj.weight",
        "encoder.layers.5.layer_norm1": "cond_stage_model.model.transformer.resblocks.5.ln_1.weight",
        "encoder.layers.5.layer_norm2": "cond_stage_model.model.transformer.resblocks.5.ln_2.weight",
        "encoder.layers.5.mlp.fc1": "cond_stage_model.model.transformer.resblocks.5.mlp.c_fc.weight",
        "encoder.layers.5.mlp.fc2": "cond_stage_model.model.transformer.resblocks.5.mlp.c_proj.weight",
        "final_layer_norm": "cond_stage_model.model.ln_final.weight",
        "embeddings.token_embedding": "cond_stage_model.model.token_embedding.weight",
        "embeddings.position_embedding": "cond_stage_model.model.positional_embedding",
    }
    assert {p: te[p].ldm_weight for p in expect} == expect
    assert te["embeddings.position_embedding"].ldm_bias is None
    assert "encoder.layers.23.mlp.fc1" not in te and "text_projection" not in te


# ---- block ids


def test_block_ids_sd1():
    t = A.module_table("sd1", "unet")
    assert t["down_blocks.0.attentions.1.proj_in"].block == "IN02"
    assert t["down_blocks.1.downsamplers.0.conv"].block == "IN06"
    assert t["mid_block.resnets.0.conv1"].block == "M00"
    assert t["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].block == "M00"
    assert t["up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q"].block == "OUT11"
    assert t["up_blocks.0.upsamplers.0.conv"].block == "OUT02"
    assert t["conv_in"].block == "IN00"
    for base in ("time_embedding.linear_1", "conv_norm_out", "conv_out"):
        assert t[base].block == "BASE"
    blocks = {i.block for i in t.values()}
    assert blocks == {"BASE", "M00"} | {f"IN{i:02d}" for i in range(12)} | {f"OUT{i:02d}" for i in range(12)}
    assert {i.block for i in A.module_table("sd1", "te1").values()} == {"BASE"}


def test_block_ids_sdxl():
    t = A.module_table("sdxl", "unet")
    assert t["down_blocks.2.attentions.1.proj_out"].block == "IN08"
    assert t["up_blocks.0.attentions.0.transformer_blocks.3.ff.net.2"].block == "OUT00"
    assert t["add_embedding.linear_1"].block == "BASE"
    blocks = {i.block for i in t.values()}
    assert blocks == {"BASE", "M00"} | {f"IN{i:02d}" for i in range(9)} | {f"OUT{i:02d}" for i in range(9)}
    assert {i.block for i in A.module_table("sdxl", "te2").values()} == {"BASE"}


# ---- whole-checkpoint conversion


@pytest.mark.parametrize("arch", A.ARCHS)
def test_roundtrip_from_diffusers(arch):
    comps = {c: meta_state(arch, c) for c in A.components(arch)}
    ldm = A.diffusers_to_ldm(comps, arch)
    expected_ldm = {k for c in A.components(arch) for i in A.module_table(arch, c).values() for k in ldm_keys(i)}
    assert set(ldm) == expected_ldm
    back, left = A.ldm_to_diffusers(ldm, arch)
    assert left == []
    for c in A.components(arch):
        want = {k[len("text_model."):] if k.startswith("text_model.") else k: v.shape for k, v in comps[c].items()}
        assert {k: v.shape for k, v in back[c].items()} == want


EXTRAS = {
    "sd1": [
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "first_stage_model.decoder.conv_out.weight",
        "model_ema.decay",
        "alphas_cumprod",
    ],
    "sd2": [
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.bias",
        "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale",
        "first_stage_model.encoder.conv_in.weight",
    ],
    "sdxl": [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale",
        "first_stage_model.quant_conv.weight",
    ],
}


@pytest.mark.parametrize("arch", A.ARCHS)
def test_roundtrip_from_ldm_with_leftovers(arch):
    ldm = A.diffusers_to_ldm({c: meta_state(arch, c) for c in A.components(arch)}, arch)
    for k in EXTRAS[arch]:
        ldm[k] = torch.empty(3, device="meta")
    comps, left = A.ldm_to_diffusers(ldm, arch)
    assert sorted(left) == sorted(EXTRAS[arch])  # nothing dropped, nothing invented
    again = A.diffusers_to_ldm(comps, arch)
    assert {k: v.shape for k, v in again.items()} == {
        k: v.shape for k, v in ldm.items() if k not in EXTRAS[arch]
    }


def test_values_qkv_and_projection():
    # Small real tensors: only the mapping matters here, shapes are not checked.
    q, k, v = (torch.arange(6.0).reshape(2, 3) + 10 * i for i in range(3))
    qb, kb, vb = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])
    proj = torch.arange(6.0).reshape(2, 3)
    te2 = {
        "text_model.encoder.layers.0.self_attn.q_proj.weight": q,
        "text_model.encoder.layers.0.self_attn.k_proj.weight": k,
        "text_model.encoder.layers.0.self_attn.v_proj.weight": v,
        "encoder.layers.0.self_attn.q_proj.bias": qb,
        "encoder.layers.0.self_attn.k_proj.bias": kb,
        "encoder.layers.0.self_attn.v_proj.bias": vb,
        "text_projection.weight": proj,
    }
    ldm = A.diffusers_to_ldm({"te2": te2}, "sdxl")
    root = "conditioner.embedders.1.model."
    assert torch.equal(ldm[root + "transformer.resblocks.0.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(ldm[root + "transformer.resblocks.0.attn.in_proj_bias"], torch.tensor([1.0, 2, 3, 4, 5, 6]))
    assert torch.equal(ldm[root + "text_projection"], proj.T)
    assert ldm[root + "text_projection"].is_contiguous()
    assert len(ldm) == 3

    # Back again, with the SD2 root and row sizes taken from the table (1024 per projection).
    w = torch.randn(3072, 4)
    out, left = A.ldm_to_diffusers({"cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight": w}, "sd2")
    assert left == []
    got = out["te1"]
    assert torch.equal(got["encoder.layers.2.self_attn.q_proj.weight"], w[:1024])
    assert torch.equal(got["encoder.layers.2.self_attn.k_proj.weight"], w[1024:2048])
    assert torch.equal(got["encoder.layers.2.self_attn.v_proj.weight"], w[2048:])
    got["encoder.layers.2.self_attn.q_proj.weight"].zero_()
    assert w[0].abs().sum() > 0  # split tensors are copies, not views of the fused one

    back, left = A.ldm_to_diffusers(ldm, "sdxl")
    assert left == []
    assert torch.equal(back["te2"]["text_projection.weight"], proj)
    assert torch.equal(back["te2"]["encoder.layers.0.self_attn.k_proj.weight"], k)
    assert torch.equal(back["te2"]["encoder.layers.0.self_attn.v_proj.bias"], vb)


def test_partial_qkv_is_refused():
    te = {"encoder.layers.0.self_attn.q_proj.weight": torch.empty(1024, 1024, device="meta")}
    with pytest.raises(ValueError, match="q, k and v"):
        A.diffusers_to_ldm({"te1": te}, "sd2")


def test_unknown_keys_pass_through():
    te = {"text_model.embeddings.position_ids": torch.zeros(1, 77, dtype=torch.long)}
    ldm = A.diffusers_to_ldm({"te1": te}, "sd1")
    assert list(ldm) == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    with pytest.raises(ValueError):
        A.diffusers_to_ldm({"vae": {}}, "sd1")


def test_old_sd1_text_encoder_prefix():
    # Checkpoints from before transformers added the text_model level.
    w = torch.empty(3072, 768, device="meta")
    sd = {
        "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight": w,
        "cond_stage_model.transformer.final_layer_norm.bias": torch.empty(768, device="meta"),
    }
    out, left = A.ldm_to_diffusers(sd, "sd1")
    assert left == []
    assert set(out["te1"]) == {"encoder.layers.0.mlp.fc1.weight", "final_layer_norm.bias"}
    # Both spellings at once: the second copy is reported, not silently overwritten.
    sd["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = w
    out, left = A.ldm_to_diffusers(sd, "sd1")
    assert left == ["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]


def test_fused_tensor_must_split_in_three():
    with pytest.raises(ValueError, match="3 equal row blocks"):
        A.ldm_to_diffusers({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": torch.zeros(4)}, "sd2")


def test_table_for_a_live_transformers_text_encoder():
    """A transformers config is not a mapping: the table reads it through ``to_dict``."""
    from tests.tiny_models import tiny_text_encoder

    te = tiny_text_encoder()
    table = A.table_for_model("te1", te)
    q = [k for k in table if k.endswith("layers.0.self_attn.q_proj")]
    assert q, sorted(table)[:5]
    assert tuple(table[q[0]].weight_shape) == tuple(te.get_submodule(q[0]).weight.shape)
    assert A.model_config(te)["hidden_size"] == te.config.hidden_size
