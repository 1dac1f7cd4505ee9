"""Two-expert LoRA pairs (Wan 2.2 A14B, issue 12): one tag for both files, or an expert's own
strength; each expert model applies its own file."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from dit_models import tiny
from lora_ext.experts import for_expert, split_expert
from lora_ext.hostmodel import HostModel
from lora_ext.prompt import format_tag, parse_prompt
from lora_ext.resolve import LoraLibrary, resolve_specs
from lora_ext.session import Session


@pytest.mark.parametrize("stem,want", [
    ("Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16", ("Wan2.2-Lightning_T2V-A14B-4steps-lora_fp16", "high")),
    ("Wan2.2-Lightning_T2V-A14B-4steps-lora_LOW_fp16", ("Wan2.2-Lightning_T2V-A14B-4steps-lora_fp16", "low")),
    ("mylora_high_noise", ("mylora", "high")),
    ("mylora-low-noise", ("mylora", "low")),
    ("high_noise_model", ("", "high")),
    ("low_light_high_noise", ("low_light", "high")),
    ("highway_style", None),
    ("shallow", None),
])
def test_expert_names(stem, want):
    assert split_expert(stem) == want


def _lora(path, seed, h=32):
    g = torch.Generator().manual_seed(seed)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, h, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(h, 4, generator=g),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}, path)


def test_library_finds_pairs(tmp_path):
    (tmp_path / "wan" / "lightx").mkdir(parents=True)
    _lora(tmp_path / "wan" / "lightning_HIGH_fp16.safetensors", 1)
    _lora(tmp_path / "wan" / "lightning_LOW_fp16.safetensors", 2)
    _lora(tmp_path / "wan" / "lightx" / "high_noise_model.safetensors", 3)
    _lora(tmp_path / "wan" / "lightx" / "low_noise_model.safetensors", 4)
    _lora(tmp_path / "solo_high.safetensors", 5)  # no low twin: not a pair
    lib = LoraLibrary([str(tmp_path)])
    pair = lib.find_pair("lightning_fp16")
    assert {k: v.stem for k, v in pair.items()} == {"high": "lightning_HIGH_fp16", "low": "lightning_LOW_fp16"}
    assert lib.find_pair("LIGHTNING_FP16") is not None
    assert {k: v.stem for k, v in lib.find_pair("wan/lightx").items()} == {"high": "high_noise_model", "low": "low_noise_model"}
    assert lib.find_pair("solo") is None
    # a name that is a file stays that file
    specs = parse_prompt("<lora:lightning_HIGH_fp16:1> <lora:lightning_fp16:0.8:low=0.5>").specs
    resolve_specs(specs, lib)
    assert specs[0].path.endswith("lightning_HIGH_fp16.safetensors") and "experts" not in specs[0].extra
    assert specs[1].extra["experts"]["low"].endswith("lightning_LOW_fp16.safetensors")
    assert specs[1].extra["low_weight"] == 0.5
    assert parse_prompt(format_tag(specs[1])).specs[0].extra["low_weight"] == 0.5
    low = for_expert(specs[1], "low")
    assert low.path.endswith("LOW_fp16.safetensors") and low.unet == 0.5 and low.te == 0.8
    high = for_expert(specs[1], "high")
    assert high.path.endswith("HIGH_fp16.safetensors") and high.unet == 0.8


def test_each_expert_applies_its_file(tmp_path):
    _lora(tmp_path / "pair_high_noise.safetensors", 1)
    _lora(tmp_path / "pair_low_noise.safetensors", 2)
    base = tiny("wan")
    results = {}
    for expert in ("high", "low"):
        model = copy.deepcopy(base)
        s = Session(LoraLibrary([str(tmp_path)]), method="fuse")
        s.load_model(HostModel({"unet": model}, naming="diffusers", expert=expert))
        s.use_prompt("a cat <lora:pair:1:low=0.5>", total_steps=4)
        s.begin_step(0, 4)
        assert not s.errors, s.errors
        results[expert] = model.blocks[0].attn1.to_q.weight.detach().clone()
        s.end_run()
        assert torch.equal(model.blocks[0].attn1.to_q.weight, base.blocks[0].attn1.to_q.weight)
    w0 = base.blocks[0].attn1.to_q.weight.detach()
    from safetensors.torch import load_file

    for expert, s_ in (("high", 1.0), ("low", 0.5)):
        sd = load_file(tmp_path / f"pair_{expert}_noise.safetensors")
        want = w0 + s_ * sd["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] @ sd[
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
        assert torch.allclose(results[expert], want, atol=1e-5), expert
