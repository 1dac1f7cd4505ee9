"""Oracles for the DiT families (issue 15): files written by PEFT and LyCORIS on tiny diffusers
Flux / Chroma / SD3.5 / Qwen-Image denoisers, applied by lora-ext, must reproduce the writer's
own forward pass with the adapter attached (fp32, max relative error <= 1e-5); alpha != rank
throughout, so a reader that ignores the stored alpha fails.

Each file is also applied to the model's original-layout twin (BFL / SAI names: q|k|v fused in
one Linear, Flux's single-block linear1 = q|k|v|mlp, the final modulation's halves swapped),
and the merged weights, mapped back, must equal the diffusers-side merge (exactly for plain
LoRA, 1e-6 otherwise) and give the same forward output: the fused-vs-split golden test.
"""
import copy
import json

import pytest
import torch

from dit_models import OriginalTree, diffusers_state, dit_table, forward, max_rel, original_state, tiny
from lora_ext.engine import apply
from lora_ext.hostmodel import HostModel, bind

peft = pytest.importorskip("peft")
lycoris = pytest.importorskip("lycoris")

FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm.linear", "norm1.linear", "norm1_context.linear", "norm_out.linear", "x_embedder",
                "context_embedder", "linear_1", "linear_2"]
TARGETS = {
    "flux": FLUX_TARGETS,
    "chroma": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out", "in_proj", "out_proj", "linear_1", "linear_2"],
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
            "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder"],
    "qwen_image": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1",
                   "txt_mod.1", "norm_out.linear", "proj_out", "img_in", "txt_in"],
}


def _randomise(model, seed, oft=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in ("lora_", "hada_", "lokr_", "oft_", "boft_", "oft_r", "dora_scale")):
                continue
            if "magnitude" in name or "dora_scale" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "oft" in name or "boft" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _apply_both(base, family, path, *, exact):
    """Fuse ``path`` into a copy of ``base`` and into its original-layout twin; check the twin
    agrees; return (fused diffusers model, handle)."""
    model = copy.deepcopy(base)
    h = apply(model, [path], "fuse")
    assert h.unmatched == [], h.unmatched[:3]
    table = dit_table(base)
    tree = OriginalTree(original_state(base, table))
    bound = bind(HostModel({"unet": tree}, naming="ldm"))
    assert bound.skipped["unet"] == []
    h2 = apply({"unet": bound.views["unet"]}, [path], "fuse", keymap=bound.keymap_for(["unet"]))
    assert h2.unmatched == [], h2.unmatched[:3]
    back = diffusers_state(tree.state_dict(), table)
    merged = model.state_dict()
    for k, t in back.items():
        if exact:
            assert torch.equal(t, merged[k]), k
        else:
            assert max_rel(t, merged[k]) <= 1e-6, k
    twin = copy.deepcopy(base)
    twin.load_state_dict(back, strict=False)
    assert max_rel(forward(twin, family), forward(model, family)) <= 1e-6
    # and the twin comes back bit-exact
    h2.remove()
    assert all(torch.equal(t, base.state_dict()[k]) for k, t in diffusers_state(tree.state_dict(), table).items())
    return model, h


PEFT_CASES = {
    "lora": lambda t: peft.LoraConfig(r=4, lora_alpha=7, target_modules=t),
    "lora-rslora-patterns": lambda t: peft.LoraConfig(r=4, lora_alpha=9, target_modules=t, use_rslora=True,
                                                      rank_pattern={"proj_out": 2}, alpha_pattern={"to_k": 3}),
    "dora": lambda t: peft.LoraConfig(r=4, lora_alpha=7, target_modules=t, use_dora=True),
    "loha": lambda t: peft.LoHaConfig(r=4, alpha=7, target_modules=t),
    "lokr": lambda t: peft.LoKrConfig(r=4, alpha=7, target_modules=t),
}


@pytest.mark.parametrize("family", ["flux", "chroma", "sd3", "qwen_image"])
def test_peft_lora_save_pretrained(tmp_path, family):
    _peft_case(tmp_path, family, "lora")


@pytest.mark.parametrize("case", sorted(set(PEFT_CASES) - {"lora"}))
def test_peft_types_on_flux(tmp_path, case):
    _peft_case(tmp_path, "flux", case)


def _peft_case(tmp_path, family, case):
    base = tiny(family)
    targets = TARGETS[family]
    if case in ("oft", "boft"):  # block sizes must divide every target's width
        targets = [t for t in targets if t not in ("x_embedder", "context_embedder", "linear_1", "proj_out")]
    cfg = PEFT_CASES[case](targets)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomise(pm, 3)
    want = forward(pm.base_model.model, family)
    pm.save_pretrained(tmp_path / "adapter")  # base_model.model.* keys, adapter_config.json beside
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    model, _ = _apply_both(base, family, path, exact=case.startswith("lora"))
    got = forward(model, family)
    assert max_rel(got, want) <= 1e-5
    assert max_rel(forward(base, family), want) > 1e-3  # the adapter changes the output


def test_diffusers_save_lora_weights_flux(tmp_path):
    """``transformer.`` keys, alpha in ``lora_adapter_metadata`` (diffusers >= 0.35)."""
    from diffusers import FluxPipeline
    from peft import get_peft_model_state_dict

    base = tiny("flux")
    model = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=7, target_modules=FLUX_TARGETS)
    model.add_adapter(cfg)
    _randomise(model, 5)
    want = forward(model, "flux")
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    got_model, _ = _apply_both(base, "flux", tmp_path / "pytorch_lora_weights.safetensors", exact=True)
    assert max_rel(forward(got_model, "flux"), want) <= 1e-5


LYCORIS_CASES = {
    "lora": dict(algo="lora"),
    "loha": dict(algo="loha"),
    "lokr": dict(algo="lokr", factor=4),
    "full": dict(algo="full"),
    "diag-oft": dict(algo="diag-oft", block_size=8),
}


@pytest.fixture
def flux_preset():
    from lycoris.wrapper import LycorisNetwork

    saved = {k: getattr(LycorisNetwork, k) for k in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "ENABLE_CONV")}
    LycorisNetwork.apply_preset({"target_module": ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
                                 "enable_conv": False})
    yield
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


@pytest.mark.parametrize("case", sorted(LYCORIS_CASES))
def test_lycoris_on_flux(tmp_path, flux_preset, case):
    base = tiny("flux")
    model = copy.deepcopy(base)
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=3, **LYCORIS_CASES[case])
    net.apply_to()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in net.named_parameters():
            scale = 0.05 if ("oft" in name or name.endswith("diff") or name.endswith("diff_b")) else 0.3
            if name.endswith(("diff", "diff_b")):
                p.add_(torch.randn(p.shape, generator=g) * scale)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    want = forward(model, "flux")
    path = tmp_path / f"{case}.safetensors"
    net.save_weights(str(path), torch.float32, None)
    got_model, h = _apply_both(base, "flux", path, exact=case == "lora")
    assert max_rel(forward(got_model, "flux"), want) <= 1e-5
    assert max_rel(forward(base, "flux"), want) > 1e-3


def test_kohya_fused_file_equals_split(tmp_path):
    """A BFL-named kohya LoRA on the fused qkv / linear1 (alpha != rank, kohya names) applied to
    the diffusers model (split q/k/v/mlp) equals the same file on the original layout, and
    equals W + alpha/r * up[rows] @ down for each split module."""
    from safetensors.torch import save_file

    base = tiny("flux")
    g = torch.Generator().manual_seed(11)
    h, m, r = 32, 128, 4
    sd = {}
    for name, out in (("lora_unet_double_blocks_0_img_attn_qkv", 3 * h), ("lora_unet_double_blocks_1_txt_attn_qkv", 3 * h),
                      ("lora_unet_single_blocks_1_linear1", 3 * h + m), ("lora_unet_single_blocks_0_linear2", h),
                      ("lora_unet_final_layer_adaLN_modulation_1", 2 * h)):
        sd[f"{name}.lora_down.weight"] = torch.randn(r, h + m if name.endswith("linear2") else h, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(out, r, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(3.0)
    path = tmp_path / "kohya_flux.safetensors"
    save_file(sd, path)
    model, h_ = _apply_both(base, "flux", path, exact=True)
    w0, w1 = base.state_dict(), model.state_dict()
    up, down = sd["lora_unet_single_blocks_1_linear1.lora_up.weight"], sd["lora_unet_single_blocks_1_linear1.lora_down.weight"]
    for k, (a, b) in {"attn.to_q": (0, h), "attn.to_k": (h, 2 * h), "attn.to_v": (2 * h, 3 * h), "proj_mlp": (3 * h, 3 * h + m)}.items():
        key = f"single_transformer_blocks.1.{k}.weight"
        want = w0[key] + 0.75 * up[a:b] @ down
        assert max_rel(w1[key], want) <= 1e-6, k
    # the swapped modulation: BFL rows (shift|scale) land on diffusers' (scale|shift)
    up, down = sd["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"], sd["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
    d = 0.75 * up @ down
    want = w0["norm_out.linear.weight"] + torch.cat([d[h:], d[:h]], 0)
    assert max_rel(w1["norm_out.linear.weight"], want) <= 1e-6


def test_restore_is_bit_exact_in_bf16(tmp_path):
    from safetensors.torch import save_file

    base = tiny("flux").to(torch.bfloat16)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    sd = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(4, 32, generator=g),
          "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(224, 4, generator=g),
          "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(2.0),
          "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}
    save_file(sd, tmp_path / "mix.safetensors")
    for _ in range(20):
        h = apply(base, [(tmp_path / "mix.safetensors", 0.7)], "fuse")
        assert h.unmatched == []
        assert not torch.equal(base.state_dict()["single_transformer_blocks.0.proj_mlp.weight"],
                               before["single_transformer_blocks.0.proj_mlp.weight"])
        h.remove()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
