"""The DiT family tables (lora_ext/dit/families.py) are data; these tests hold them to the
real models: every weight-bearing module of diffusers' own class, tiny and full size (built on
``meta``: no memory), is in the table with its exact weight shape, and nothing else is; the
sizes read back from the shapes name the full-size variant."""
import pytest
import torch

from lora_ext import dit

TINY = {
    "FluxTransformer2DModel": dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                                   guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    "SD3Transformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                                  pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8,
                                  dual_attention_layers=(0,), qk_norm="rms_norm"),
    "ChromaTransformer2DModel": dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
                                     approximator_num_channels=8, approximator_hidden_dim=20, approximator_layers=2),
    "QwenImageTransformer2DModel": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6)),
    "HunyuanVideoTransformer3DModel": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                           patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                           pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)),
    "WanTransformer3DModel": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=8, freq_dim=16, ffn_dim=64, num_layers=2, image_dim=12,
                                  added_kv_proj_dim=32),
    "Lumina2Transformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=48, num_layers=1,
                                      num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=16,
                                      cap_feat_dim=8, axes_dim_rope=(4, 6, 6), axes_lens=(8, 8, 8)),
    "ZImageTransformer2DModel": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=48, n_layers=2,
                                     n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=8, axes_dims=[4, 6, 6],
                                     axes_lens=[8, 8, 8]),
    "HiDreamImageTransformer2DModel": dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
                                           attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4],
                                           text_emb_dim=8, num_routed_experts=4, num_activated_experts=2,
                                           axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=[0, 1, 2, 3]),
}
FULL = {  # variant -> (class, config): the published models' configs
    "flux-dev": ("FluxTransformer2DModel", dict(guidance_embeds=True)),
    "flux-schnell": ("FluxTransformer2DModel", dict(guidance_embeds=False)),
    "flux-fill": ("FluxTransformer2DModel", dict(guidance_embeds=True, in_channels=384, out_channels=64)),
    "sd3-medium": ("SD3Transformer2DModel", dict(num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                 caption_projection_dim=1536, pos_embed_max_size=192, out_channels=16)),
    "sd3.5-medium": ("SD3Transformer2DModel", dict(num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                   caption_projection_dim=1536, qk_norm="rms_norm", pos_embed_max_size=384,
                                                   dual_attention_layers=tuple(range(13)), out_channels=16)),
    "sd3.5-large": ("SD3Transformer2DModel", dict(num_layers=38, attention_head_dim=64, num_attention_heads=38,
                                                  caption_projection_dim=2432, qk_norm="rms_norm", pos_embed_max_size=192,
                                                  out_channels=16)),
    "qwen-image": ("QwenImageTransformer2DModel", {}),
    "hunyuan-video": ("HunyuanVideoTransformer3DModel", {}),
    "wan2.1-t2v-1.3b": ("WanTransformer3DModel", dict(num_attention_heads=12, ffn_dim=8960, num_layers=30)),
    "wan-14b-t2v": ("WanTransformer3DModel", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)),
    "wan2.1-i2v-14b": ("WanTransformer3DModel", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36,
                                                     image_dim=1280, added_kv_proj_dim=5120)),
    "wan2.2-i2v-a14b": ("WanTransformer3DModel", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36)),
    "wan2.2-ti2v-5b": ("WanTransformer3DModel", dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                                                     out_channels=48)),
    "lumina-image-2": ("Lumina2Transformer2DModel", dict(cap_feat_dim=2304)),
    # Tongyi-MAI/Z-Image-Turbo transformer/config.json (the class's defaults but axes_lens, which no weight has)
    "z-image-turbo": ("ZImageTransformer2DModel", dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840,
                                                       n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                                                       norm_eps=1e-05, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
                                                       t_scale=1000.0, axes_dims=[32, 48, 48],
                                                       axes_lens=[1536, 512, 512])),
    "hidream-i1": ("HiDreamImageTransformer2DModel", dict(patch_size=2, in_channels=16, out_channels=16,
                                                          caption_channels=[4096, 4096], llama_layers=list(range(48)))),
}


def _check(model):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    name, naming, table = dit.table_for_shapes(shapes)
    assert naming == "diffusers"
    modules = {}
    for n, mod in model.named_modules():
        for p, t in mod.named_parameters(recurse=False):
            if p == "weight":
                modules[n] = tuple(t.shape)
            elif p != "bias":  # a bare parameter (Wan's scale_shift_table)
                modules[f"{n}.{p}" if n else p] = tuple(t.shape)
    assert set(table) == set(modules), (sorted(set(modules) - set(table))[:5], sorted(set(table) - set(modules))[:5])
    wrong = {p: (table[p].weight_shape, s) for p, s in modules.items() if tuple(table[p].weight_shape) != s}
    assert not wrong, list(wrong.items())[:3]
    return name


@pytest.mark.parametrize("cls", sorted(TINY))
def test_tiny_models_match_their_tables(cls):
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls)(**TINY[cls])
    assert _check(model) in dit.FAMILIES


@pytest.mark.parametrize("variant", sorted(FULL))
def test_full_size_models_match_their_variant_tables(variant):
    import diffusers

    cls, cfg = FULL[variant]
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**cfg)
    assert _check(model) == variant


def test_z_image_original_names_are_what_diffusers_converts():
    """The Z-Image table's original layout (the ComfyUI / Tongyi single file: fused
    ``attention.qkv``, ``x_embedder``, ``final_layer``) is what diffusers' own single-file
    converter turns into ZImageTransformer2DModel's state dict, tensor for tensor; and the
    original-layout shapes are read back as Z-Image, not as Lumina2 (the same namespace)."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from dit_models import dit_table, original_state, tiny

    model = tiny("z_image")
    table = dit_table(model)
    orig = original_state(model, table)
    assert "layers.0.attention.qkv.weight" in orig and "layers.0.attention.to_q.weight" not in orig
    name, naming, orig_table = dit.table_for_shapes({k: tuple(v.shape) for k, v in orig.items()})
    assert (name, naming) == ("z_image", "ldm")
    assert {i.ldm_weight for i in orig_table.values()} == {i.ldm_weight for i in table.values()}
    back = convert_z_image_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v.clone()
                                                               for k, v in orig.items()})
    want = model.state_dict()
    assert set(back) == set(want), (sorted(set(back) ^ set(want)))[:5]
    assert all(torch.equal(back[k], want[k]) for k in want)
