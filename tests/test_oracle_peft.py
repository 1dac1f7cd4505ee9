"""Oracle: PEFT / diffusers LoRA and DoRA files, merged by ``lora-ext merge``, must reproduce
the peer's own forward pass with the adapter attached (fp32, max relative error <= 1e-5).

The files are written by the peers themselves: diffusers' ``save_lora_weights`` (``unet.`` /
``text_encoder.`` keys, alpha in ``lora_adapter_metadata``) and PEFT's ``save_pretrained``
(``base_model.model.`` keys, alpha in ``adapter_config.json``). alpha != rank throughout, so
a reader that ignores the config's alpha fails.
"""
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from lora_ext.merge import merge
from tiny_models import (load_pipeline, max_rel_err, save_pipeline, te_out, tiny_text_encoder, tiny_unet,
                         unet_out)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                if "magnitude" in name:
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    unet, te = tiny_unet(), tiny_text_encoder()
    save_pipeline(folder, unet, te)
    return folder


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_diffusers_save_lora_weights_file(base, tmp_path, dora):
    from diffusers import StableDiffusionPipeline

    unet, te = load_pipeline(base)
    ucfg = LoraConfig(r=4, lora_alpha=7, target_modules=UNET_TARGETS, use_dora=dora)
    tcfg = LoraConfig(r=3, lora_alpha=5, target_modules=TE_TARGETS, use_dora=dora)
    unet.add_adapter(ucfg)
    te = get_peft_model(te, tcfg).base_model.model  # attach in place, keep the plain model
    _randomise(unet, 1)
    _randomise(te, 2)
    want_unet, want_te = unet_out(unet), te_out(te)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict(),
    )
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    reports = merge(base, [(lora_file, 1.0)], tmp_path / "merged")
    assert reports[0].unmatched == []
    unet2, te2 = load_pipeline(tmp_path / "merged")
    assert max_rel_err(unet_out(unet2), want_unet) <= 1e-5
    assert max_rel_err(te_out(te2), want_te) <= 1e-5
    # and the merge really changed the model (the oracle is not trivially satisfied)
    unet0, te0 = load_pipeline(base)
    assert max_rel_err(unet_out(unet0), want_unet) > 1e-3
    assert max_rel_err(te_out(te0), want_te) > 1e-3


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_save_pretrained_file(base, tmp_path, dora):
    """PEFT's own format: base_model.model.* keys, alpha (and rslora) in adapter_config.json."""
    unet, te = load_pipeline(base)
    cfg = LoraConfig(r=4, lora_alpha=9, target_modules=TE_TARGETS, use_dora=dora, use_rslora=not dora,
                     alpha_pattern={"fc2": 2}, rank_pattern={"fc1": 2})
    peft_te = get_peft_model(te, cfg)
    _randomise(peft_te, 3)
    want = te_out(peft_te.base_model.model)
    peft_te.save_pretrained(tmp_path / "adapter")
    assert os.path.isfile(tmp_path / "adapter" / "adapter_config.json")
    reports = merge(base, [(tmp_path / "adapter" / "adapter_model.safetensors", 1.0)], tmp_path / "merged")
    assert reports[0].unmatched == [] and reports[0].applied == 2 * 6
    _, te2 = load_pipeline(tmp_path / "merged")
    assert max_rel_err(te_out(te2), want) <= 1e-5


def test_strength_zero_is_exact_noop_and_half_is_linear(base, tmp_path):
    unet, te = load_pipeline(base)
    cfg = LoraConfig(r=4, lora_alpha=7, target_modules=UNET_TARGETS, use_dora=True)
    unet.add_adapter(cfg)
    _randomise(unet, 4)
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=cfg.to_dict())
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    for s in (0.0, 0.5, 1.0):
        merge(base, [(lora, s)], tmp_path / f"m{s}")
    from safetensors.torch import load_file

    w = {s: load_file(tmp_path / f"m{s}" / "unet" / "diffusion_pytorch_model.safetensors") for s in (0.0, 0.5, 1.0)}
    w0 = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    for k in w0:
        assert torch.equal(w[0.0][k], w0[k])  # bit-exact no-op
        torch.testing.assert_close(w[0.5][k], (w0[k] + w[1.0][k]) / 2, rtol=0, atol=1e-6)
