"""``convert``: kohya <-> PEFT/diffusers round trips are bit-exact, and diffusers loads our PEFT files.

The PEFT side is checked against the peers themselves: files written by diffusers'
``save_lora_weights`` convert to kohya and back unchanged, and diffusers' own loader
(``pipe.load_lora_weights`` + ``fuse_lora``) fuses our PEFT output to the weights
``lora-ext merge`` gives.
"""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_ext.cli import main
from lora_ext.merge import merge
from lora_ext.tools import FormatError, convert
from tiny_models import load_pipeline, one_thread_fixture
from tools_util import kohya_name, lora_deltas, lora_modules, read_weights, rel, tiny_base, write_kohya


one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("cv") / "base")


def _same_file(a, b):
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and torch.equal(x[k], y[k]), k


def _kohya_varied(path, base, dora):
    """fp16 kohya LoRA/DoRA with per-module ranks and alphas (alpha != rank)."""
    mods = lora_modules(base)
    write_kohya(path, mods, rank=3, alpha=5.0, dtype=torch.float16, dora=dora, seed=11)
    sd = load_file(path)
    k = kohya_name(*mods[0][:2])  # one module with another rank and alpha
    sd[f"{k}.lora_down.weight"] = sd[f"{k}.lora_down.weight"][:2].clone()
    sd[f"{k}.lora_up.weight"] = sd[f"{k}.lora_up.weight"][:, :2].clone()
    sd[f"{k}.alpha"] = torch.tensor(1.5, dtype=torch.float16)
    save_file(sd, path, metadata={"ss_output_name": "demo"})


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_kohya_peft_kohya_round_trip_is_bit_exact(base, tmp_path, dora):
    src = tmp_path / "k.safetensors"
    _kohya_varied(src, base, dora)
    report = convert(src, tmp_path / "p.safetensors", to="peft", base=base, progress=False)
    assert report.count("converted") == len(lora_modules(base))
    convert(tmp_path / "p.safetensors", tmp_path / "k2.safetensors", to="kohya", base=base, progress=False)
    _same_file(src, tmp_path / "k2.safetensors")
    with safe_open(tmp_path / "k2.safetensors", "pt") as f:
        assert f.metadata()["ss_output_name"] == "demo"
    # and the PEFT file means the same as the kohya one (scales via rank/alpha patterns)
    a, b = lora_deltas(src, base), lora_deltas(tmp_path / "p.safetensors", base)
    assert max(rel(b[k], a[k]) for k in a) <= 1e-6


def _diffusers_file(base, folder, dora):
    from diffusers import StableDiffusionPipeline

    unet, te = load_pipeline(base)
    ucfg = LoraConfig(r=4, lora_alpha=7, target_modules=["to_q", "to_v", "proj_in", "conv1", "ff.net.2"], use_dora=dora,
                      rank_pattern={"proj_in": 2}, alpha_pattern={"conv1": 3})
    tcfg = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "fc1"], use_dora=dora)
    unet.add_adapter(ucfg)
    te = get_peft_model(te, tcfg).base_model.model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model in (unet, te):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(p * (1 + 0.2 * torch.randn(p.shape, generator=g)) if "magnitude" in name
                            else torch.randn(p.shape, generator=g) * 0.2)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_diffusers_file_peft_kohya_peft_round_trip_is_bit_exact(base, tmp_path, dora):
    src = _diffusers_file(base, tmp_path / "d", dora)
    convert(src, tmp_path / "k.safetensors", to="kohya", base=base, progress=False)
    kohya = load_file(tmp_path / "k.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya)
    assert any(k.endswith(".dora_scale") for k in kohya) == dora
    convert(tmp_path / "k.safetensors", tmp_path / "p.safetensors", to="peft", base=base, progress=False)
    _same_file(src, tmp_path / "p.safetensors")
    with safe_open(src, "pt") as f, safe_open(tmp_path / "p.safetensors", "pt") as g:
        assert json.loads(f.metadata()["lora_adapter_metadata"]) == json.loads(g.metadata()["lora_adapter_metadata"])
    a, b = lora_deltas(src, base), lora_deltas(tmp_path / "k.safetensors", base)
    assert max(rel(b[k], a[k]) for k in a) <= 1e-6


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_diffusers_loads_our_peft_output_and_fuses_to_our_merge(base, tmp_path, dora):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    src = tmp_path / "k.safetensors"
    _kohya_varied(src, base, dora)
    sd = {k: v.float() for k, v in load_file(src).items()}  # fp32, so both sides round alike
    save_file(sd, src)
    convert(src, tmp_path / "p.safetensors", to="peft", base=base, progress=False)
    merge(base, [(tmp_path / "p.safetensors", 1.0)], tmp_path / "merged")
    want = read_weights(tmp_path / "merged")

    unet, te = load_pipeline(base)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=te, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "p.safetensors"))
    pipe.fuse_lora()
    got = {}
    for comp, model in (("unet", unet), ("te1", te)):
        for name, p in model.named_parameters():
            if name.endswith(".weight") and "lora_" not in name:
                path = name[:-len(".weight")].replace(".base_layer", "")
                got[(comp, path.removeprefix("text_model."))] = p.detach()
    changed = 0
    for key, w in want.items():
        assert key in got, key
        torch.testing.assert_close(got[key], w, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(w, read_weights(base)[key]) if changed < 3 else 0
    assert changed >= 3  # the LoRA really changed weights


def test_diffusers_reads_our_kohya_output(base, tmp_path):
    """diffusers' own kohya converter accepts what we write (names, alpha)."""
    from diffusers import StableDiffusionPipeline

    src = tmp_path / "k.safetensors"
    write_kohya(src, [m for m in lora_modules(base) if "attentions" in m[1] or m[0] == "te1"], rank=2, alpha=1.0)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(src))
    assert state and all(k.startswith(("unet.", "text_encoder.")) for k in state)


def test_what_peft_cannot_hold_is_a_clear_error(base, tmp_path, capsys):
    mods = lora_modules(base)[:3]
    loha = tmp_path / "loha.safetensors"
    sd = {}
    for comp, p, shape in mods:
        pre = kohya_name(comp, p)
        inner = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        for h in ("1", "2"):
            sd[f"{pre}.hada_w{h}_a"] = torch.randn(shape[0], 2)
            sd[f"{pre}.hada_w{h}_b"] = torch.randn(2, inner)
    save_file(sd, loha)
    with pytest.raises(FormatError, match="LoRA and DoRA only.*loha.*resize"):
        convert(loha, tmp_path / "x.safetensors", to="peft", base=base)
    assert not (tmp_path / "x.safetensors").exists()
    # kohya output of a LoHa: the LyCORIS tensors, unchanged, under kohya names
    convert(loha, tmp_path / "l.safetensors", to="kohya", base=base, progress=False)
    _same_file(loha, tmp_path / "l.safetensors")
    # per-input DoRA (LyCORIS wd_on_out=False) has no PEFT form
    k = tmp_path / "din.safetensors"
    write_kohya(k, [m for m in mods if len(m[2]) == 2][:1] or mods[:1], rank=2)
    sd = load_file(k)
    pre = next(iter(sd)).rsplit(".", 2)[0] if sd else ""
    down = next(v for n, v in sd.items() if n.endswith("lora_down.weight"))
    sd[f"{pre}.dora_scale"] = torch.rand(1, down.shape[1]) + 0.5
    save_file(sd, k)
    assert main(["convert", str(k), "--to", "peft", "--base", base, "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "per input column" in capsys.readouterr().err


@pytest.mark.parametrize("name,ldm", [("sd1", False), ("sd1", True), ("sd2", False), ("sdxl", False), ("sdxl", True)])
def test_full_size_round_trips_keep_the_kohya_spelling(tmp_path, name, ldm):
    """No --base: the family is detected; UNet names stay diffusers- or ldm-style as they came."""
    from test_merge import SD1_MODULES, SD2_MODULES, SDXL_MODULES, write_kohya_lora

    mods = {"sd1": SD1_MODULES, "sd2": SD2_MODULES, "sdxl": SDXL_MODULES}[name]
    src = tmp_path / "k.safetensors"
    write_kohya_lora(src, name, mods, ldm_names=ldm)
    convert(src, tmp_path / "p.safetensors", to="peft", progress=False)
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model."))
               for k in load_file(tmp_path / "p.safetensors"))
    convert(tmp_path / "p.safetensors", tmp_path / "k2.safetensors", to="kohya", progress=False)
    _same_file(src, tmp_path / "k2.safetensors")
