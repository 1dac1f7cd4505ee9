"""Forge 2.x with FLUX.1, end to end through the A1111-family shim and the webui fake: Forge holds a
``ForgeDiffusionEngine`` whose ``forge_objects.unet.model.diffusion_model`` is its
``IntegratedFluxTransformer2DModel`` (BFL module names; tests/fakes/a1111/fake_model.py cites
backend/nn/flux.py at dfdcbab6) and whose CLIP-L and T5 sit in ``forge_objects.clip.cond_stage_model``.

A txt2img run with ``<lora:...>`` tags goes through ``process_images``; at every denoiser call
the effective weight of each patched Linear (what its forward computes, fused weights and
on-the-fly hooks alike: ``f(I) - f(0)``) must be the hand-merged weight at that step's strength,
with FLUX block weights (lbw ``D00=``, ``S01=``) and keyframes; CLIP-L and T5 take the
text-encoder strength; after a "restore" generation everything is bit-identical."""
from __future__ import annotations

import copy
import sys

import torch
from safetensors.torch import save_file

import dit_models
from host_common import bits, same_bits
from test_engine import no_hooks
from test_host_a1111 import HOST_MODULES, run, tiny, webui  # noqa: F401 (fixtures)
from tiny_models import one_thread_fixture

one_thread = one_thread_fixture()
H, M, R = 32, 128, 4


def _encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(3)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                        vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                                        pad_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(d_model=24, d_kv=8, d_ff=32, num_layers=2, num_heads=3, vocab_size=64)).eval()
    return clip, t5


def _forge_flux(fake_model):
    model = fake_model.IntegratedFluxTransformer2DModel(
        in_channels=2, vec_in_dim=12, context_in_dim=24, hidden_size=H, mlp_ratio=4.0, num_heads=2, depth=2,
        depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000, qkv_bias=True, guidance_embed=True)
    model.load_state_dict(dit_models.original_state(dit_models.tiny("flux")), strict=True)
    return model.requires_grad_(False)


def _effective(module):
    """The weight a Linear's forward acts with (fused or through hooks), (out, in)."""
    eye = torch.eye(module.in_features)
    with torch.no_grad():
        return (module(eye) - module(torch.zeros(1, module.in_features))).T


def _write(path):
    g = torch.Generator().manual_seed(5)
    sd, eff = {}, {}
    for prefix, comp, mod, out, inp, alpha in (
            ("lora_unet_double_blocks_0_img_attn_qkv", "unet", "double_blocks.0.img_attn.qkv", 3 * H, H, 2.0),
            ("lora_unet_single_blocks_1_linear1", "unet", "single_blocks.1.linear1", 3 * H + M, H, 8.0),
            ("lora_unet_final_layer_adaLN_modulation_1", "unet", "final_layer.adaLN_modulation.1", 2 * H, H, 4.0),
            ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "te1", "text_model.encoder.layers.0.self_attn.q_proj",
             12, 12, 1.0),
            ("lora_te3_encoder_block_1_layer_0_SelfAttention_v", "te3", "encoder.block.1.layer.0.SelfAttention.v",
             24, 24, 1.0)):
        down, up = torch.randn(R, inp, generator=g) * 0.3, torch.randn(out, R, generator=g) * 0.3
        sd.update({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
                   f"{prefix}.alpha": torch.tensor(alpha)})
        eff[(comp, mod)] = alpha / R * (up @ down)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return eff


def _module(root, path):
    if not hasattr(root, "text_model") and path.startswith("text_model."):
        path = path[len("text_model."):]  # transformers 5's CLIPTextModel
    return root.get_submodule(path)


def test_forge_flux_txt2img_block_weights_keyframes_and_restore(webui):
    ns = webui
    import fake_model

    clip, t5 = _encoders()
    transformer = _forge_flux(fake_model)
    model = fake_model.ForgeFluxEngine(transformer, clip, t5)
    roots = {"unet": transformer, "te1": clip, "te3": t5}
    base = {c: copy.deepcopy(m) for c, m in roots.items()}
    pristine = {c: bits(m) for c, m in roots.items()}
    eff = _write(ns.tmp / "Lora" / "fluxk.safetensors")
    ns.model = model
    ns.shared.sd_model = model
    ns.cb.model_loaded_callback(model)

    # lbw: double block 0 at 0.5, single block 1 off, the final layer (OUT) at 1; keyframes 0 -> 1
    block = {"double_blocks.0.img_attn.qkv": 0.5, "single_blocks.1.linear1": 0.0, "final_layer.adaLN_modulation.1": 1.0}
    steps = 3
    seen = []

    def observe(stage, info):
        if stage != "unet":
            return
        i = len(seen)
        s = 0.8 * i / (steps - 1)
        for mod, b in block.items():
            want = _module(base["unet"], mod).weight + s * b * eff[("unet", mod)]
            got = _effective(_module(transformer, mod))
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (i, mod, (got - want).abs().max())
        seen.append(i)

    ns.shared.opts.lora_ext_restore = "keep"
    p, _ = run(ns, "x <lora:fluxk:1:te=0.5:unet=0@0,0.8@1:lbw=D00=0.5,S01=0>", steps=steps, observe=observe)
    assert seen == [0, 1, 2]
    assert not ns.errors.displayed, ns.errors.displayed
    assert "fluxk" in p.extra_generation_params["lora-ext"]
    for comp in ("te1", "te3"):
        mod = next(m for c, m in eff if c == comp)
        want = _module(base[comp], mod).weight + 0.5 * eff[(comp, mod)]
        assert torch.allclose(_effective(_module(roots[comp], mod)), want, atol=1e-5, rtol=1e-5), comp
    shim = sys.modules["lora_ext.hosts.a1111.shim"].SHIM
    assert shim.session.bound.family == "flux" and [r.unmatched for r in shim.session.reports()] == [[]]
    # a constant strength: fused into Forge's live modules (what every patcher clone shares)
    run(ns, "x <lora:fluxk:0.6>", steps=1)
    mod = "double_blocks.0.img_attn.qkv"
    assert torch.allclose(_module(transformer, mod).weight, _module(base["unet"], mod).weight + 0.6 * eff[("unet", mod)],
                          atol=1e-5, rtol=1e-5)
    ns.shared.opts.lora_ext_restore = "restore"
    run(ns, "x", steps=1)
    for c, m in roots.items():
        assert same_bits(m, pristine[c]) and no_hooks(m), c
