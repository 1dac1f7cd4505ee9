"""``lora-ext merge`` on real-size module shapes in both checkpoint layouts.

The checkpoints hold only a handful of full-size SD1.5 / SD2.1 tensors (a merge only touches
what it needs, and a partial checkpoint keeps the test fast), once as an A1111 single file
and once as a diffusers folder; the same LoRA must change the same weights identically.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_ext import arch
from lora_ext.cli import main
from lora_ext.errors import BaseModelMismatch, LoraFileError
from lora_ext.layouts import arch_layout
from lora_ext.merge import merge, parse_lora_arg

SD1_MODULES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("unet", "down_blocks.0.attentions.0.proj_in"),  # 1x1 conv in SD1
    ("unet", "down_blocks.0.resnets.0.conv1"),  # 3x3 conv
    ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
    ("te1", "encoder.layers.0.self_attn.q_proj"),
    ("te1", "encoder.layers.0.mlp.fc1"),
]
SD2_MODULES = [
    ("unet", "down_blocks.0.attentions.0.proj_in"),  # Linear in SD2
    ("te1", "encoder.layers.0.self_attn.q_proj"),
    ("te1", "encoder.layers.0.self_attn.k_proj"),
    ("te1", "encoder.layers.0.self_attn.v_proj"),
    ("te1", "encoder.layers.0.mlp.fc2"),
]


def _weights(name, modules, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = arch_layout(name)
    out = {}
    for comp, path in modules:
        info = table[comp][path]
        out[(comp, path, "weight")] = (torch.randn(info.weight_shape, generator=g) * 0.05).to(dtype)
        if info.bias_shape:
            out[(comp, path, "bias")] = (torch.randn(info.bias_shape, generator=g) * 0.05).to(dtype)
    return out
SDXL_MODULES = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),  # (640, 2048)
    ("unet", "up_blocks.0.attentions.2.proj_out"),
    ("te1", "encoder.layers.11.self_attn.v_proj"),
    ("te2", "encoder.layers.31.self_attn.q_proj"),  # fused in_proj in the single file
    ("te2", "encoder.layers.31.self_attn.k_proj"),
    ("te2", "encoder.layers.31.self_attn.v_proj"),
    ("te2", "encoder.layers.31.mlp.fc1"),
]


def write_single_file(path, name, weights):
    """An A1111 single file with these modules (fused OpenCLIP q/k/v written as in_proj)."""
    comps = {}
    for (comp, p, param), t in weights.items():
        comps.setdefault(comp, {})[f"{p}.{param}"] = t
    ldm = arch.diffusers_to_ldm(comps, name)
    save_file({k: v.contiguous() for k, v in ldm.items()}, path)


def write_diffusers_folder(folder, name, weights):
    subs = {"unet": ("unet", "diffusion_pytorch_model.safetensors"), "te1": ("text_encoder", "model.safetensors"),
            "te2": ("text_encoder_2", "model.safetensors")}
    per = {}
    for (comp, p, param), t in weights.items():
        prefix = "" if comp == "unet" else "text_model."
        per.setdefault(comp, {})[f"{prefix}{p}.{param}"] = t.contiguous()
    for comp, sd in per.items():
        sub, fname = subs[comp]
        os.makedirs(os.path.join(folder, sub))
        with open(os.path.join(folder, sub, "config.json"), "w") as fh:
            json.dump(arch.load_config(name, comp), fh)
        save_file(sd, os.path.join(folder, sub, fname))
    with open(os.path.join(folder, "model_index.json"), "w") as fh:
        json.dump({"_class_name": "StableDiffusionPipeline"}, fh)


def write_kohya_lora(path, name, modules, rank=4, alpha=3.0, seed=1, ldm_names=False):
    g = torch.Generator().manual_seed(seed)
    table = arch_layout(name)
    sd, expected = {}, {}
    for comp, p in modules:
        info = table[comp][p]
        shape = info.weight_shape
        kernel = tuple(shape[2:])
        down = torch.randn((rank, shape[1], *kernel), generator=g) * 0.1
        up = torch.randn((shape[0], rank) + ((1, 1) if kernel else ()), generator=g) * 0.1
        if ldm_names and comp == "unet":
            prefix = "lora_unet_" + info.ldm_path.replace(".", "_")
        else:
            te1 = "lora_te1_text_model_" if name == "sdxl" else "lora_te_text_model_"
            prefix = {"unet": "lora_unet_", "te1": te1, "te2": "lora_te2_text_model_"}[comp] + p.replace(".", "_")
        sd[f"{prefix}.lora_down.weight"] = down
        sd[f"{prefix}.lora_up.weight"] = up
        sd[f"{prefix}.alpha"] = torch.tensor(alpha)
        expected[(comp, p)] = (up.flatten(1) @ down.flatten(1)).reshape(shape) * (alpha / rank)
    save_file(sd, path)
    return expected


def read_diffusers_folder(folder):
    out = {}
    for comp, sub in (("unet", "unet/diffusion_pytorch_model.safetensors"), ("te1", "text_encoder/model.safetensors"),
                      ("te2", "text_encoder_2/model.safetensors")):
        if os.path.exists(os.path.join(folder, sub)):
            for k, v in load_file(os.path.join(folder, sub)).items():
                out[(comp, k.removeprefix("text_model."))] = v
    return out


@pytest.mark.parametrize("name,modules", [("sd1", SD1_MODULES), ("sd2", SD2_MODULES), ("sdxl", SDXL_MODULES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_both_layouts_agree_with_the_math(tmp_path, name, modules, dtype):
    weights = _weights(name, modules, dtype)
    single, folder = tmp_path / "model.safetensors", tmp_path / "pipe"
    write_single_file(single, name, weights)
    write_diffusers_folder(folder, name, weights)
    lora = tmp_path / "lora.safetensors"
    expected = write_kohya_lora(lora, name, modules)
    strength = 0.7
    before_single = single.read_bytes()

    merge(single, [(lora, strength)], tmp_path / "out.safetensors")
    merge(folder, [(str(lora), strength)], tmp_path / "out_pipe")
    assert single.read_bytes() == before_single  # the base is never touched

    ldm_out = arch.ldm_to_diffusers(load_file(tmp_path / "out.safetensors"), name)[0]
    diff_out = read_diffusers_folder(tmp_path / "out_pipe")
    for (comp, p, param), w0 in weights.items():
        want = w0.float() + (strength * expected[(comp, p)] if param == "weight" else 0)
        want = want.to(dtype)  # rounded once from fp32
        got_ldm = ldm_out[comp][f"{p}.{param}"]
        got_diff = diff_out[(comp, f"{p}.{param}")]
        assert got_ldm.dtype == dtype and got_diff.dtype == dtype
        assert torch.equal(got_ldm, want), (comp, p, param)
        assert torch.equal(got_diff, want), (comp, p, param)


def test_sgm_names_on_sd15_lora_merge_into_sd15(tmp_path):
    weights = _weights("sd1", SD1_MODULES, torch.float32)
    single = tmp_path / "model.safetensors"
    write_single_file(single, "sd1", weights)
    lora = tmp_path / "lora.safetensors"
    expected = write_kohya_lora(lora, "sd1", SD1_MODULES, ldm_names=True)
    reports = merge(single, [(lora, 1.0)], tmp_path / "out.safetensors")
    assert reports[0].base_model == "sd1" and reports[0].applied == len(SD1_MODULES)
    out = arch.ldm_to_diffusers(load_file(tmp_path / "out.safetensors"), "sd1")[0]
    p = "down_blocks.0.resnets.0.conv1"
    torch.testing.assert_close(out["unet"][p + ".weight"], weights[("unet", p, "weight")] + expected[("unet", p)], rtol=0, atol=1e-6)


def test_wrong_base_is_a_clear_error_and_writes_nothing(tmp_path):
    weights = _weights("sd1", SD1_MODULES, torch.float16)
    single = tmp_path / "model.safetensors"
    write_single_file(single, "sd1", weights)
    lora = tmp_path / "sd2_lora.safetensors"
    write_kohya_lora(lora, "sd2", SD2_MODULES)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(BaseModelMismatch, match=r"SD2\.x LoRA.*checkpoint is SD1\.x"):
        merge(single, [(lora, 1.0)], tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == before


def test_cli_merge_reports_unapplied_keys(tmp_path, capsys):
    weights = _weights("sd1", SD1_MODULES, torch.float16)
    folder = tmp_path / "pipe"
    write_diffusers_folder(folder, "sd1", weights)
    lora = tmp_path / "lora.safetensors"
    write_kohya_lora(lora, "sd1", SD1_MODULES)
    sd = load_file(lora)
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_up.weight"] = torch.zeros(320, 4)
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_down.weight"] = torch.zeros(4, 320)
    save_file(sd, lora)
    assert main(["merge", "--base", str(folder), "--lora", f"{lora}:0.5", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert f"{lora} @ 0.5: {len(SD1_MODULES)} modules applied" in out
    # to_v is a real SD1.5 module, but this partial checkpoint does not store it: reported
    assert "attn1_to_v.lora_up.weight: " in out


def test_output_exists_or_equals_base_is_refused(tmp_path):
    single = tmp_path / "model.safetensors"
    write_single_file(single, "sd1", _weights("sd1", SD1_MODULES[:1], torch.float32))
    with pytest.raises(LoraFileError, match="overwrite the base"):
        merge(single, [], single)
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(LoraFileError, match="already exists"):
        merge(single, [], tmp_path / "exists.safetensors")


@pytest.mark.parametrize("arg,expected", [("a.safetensors", ("a.safetensors", 1.0)), ("a.safetensors:0.5", ("a.safetensors", 0.5)),
                                          (r"C:\x\a.safetensors", (r"C:\x\a.safetensors", 1.0)), (r"C:\a.st:-1", (r"C:\a.st", -1.0))])
def test_parse_lora_arg(arg, expected):
    assert parse_lora_arg(arg) == expected


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def _bad_loras(tmp_path):
    good = tmp_path / "good.safetensors"
    write_kohya_lora(good, "sd1", SD1_MODULES[:2])
    data = good.read_bytes()
    cases = {}
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(data[: len(data) // 2])
    cases[p] = "truncated"
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(data[:8] + b"{not json" + data[17:])
    cases[p] = "header"
    p = tmp_path / "huge.safetensors"
    p.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    cases[p] = "header length"
    p = tmp_path / "nan.safetensors"
    sd = load_file(good)
    next(iter(v for k, v in sd.items() if k.endswith("lora_up.weight")))[0, 0] = float("nan")
    save_file(sd, p)
    cases[p] = "NaN"
    p = tmp_path / "strings.pt"
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(2, 2), "note": "hello"}, p)
    cases[p] = "not a tensor"
    p = tmp_path / "evil.ckpt"
    torch.save({"x": _Evil()}, p)
    cases[p] = "refused to unpickle"
    return cases


def test_bad_lora_files_fail_clearly_and_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    single = tmp_path / "model.safetensors"
    write_single_file(single, "sd1", _weights("sd1", SD1_MODULES, torch.float16))
    base_bytes = single.read_bytes()
    for bad, problem in _bad_loras(tmp_path).items():
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(LoraFileError) as err:
            merge(single, [(bad, 1.0)], tmp_path / "out.safetensors")
        msg = str(err.value)
        assert str(bad) in msg and problem in msg and "\n" not in msg, msg
        assert main(["merge", "--base", str(single), "--lora", str(bad), "--out", str(tmp_path / "o.safetensors")]) == 2
        stderr = capsys.readouterr().err.strip().splitlines()
        assert len(stderr) == 1 and stderr[0].startswith("error: ") and str(bad) in stderr[0]
        assert sorted(os.listdir(tmp_path)) == before
        assert single.read_bytes() == base_bytes
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_ckpt_base_with_state_dict_wrapper(tmp_path):
    """Old A1111 .ckpt files: {"state_dict": {...}, "global_step": N}, read with weights_only."""
    weights = _weights("sd1", SD1_MODULES, torch.float16)
    comps = {}
    for (comp, p, param), t in weights.items():
        comps.setdefault(comp, {})[f"{p}.{param}"] = t
    torch.save({"state_dict": arch.diffusers_to_ldm(comps, "sd1"), "global_step": 470000}, tmp_path / "model.ckpt")
    lora = tmp_path / "lora.safetensors"
    expected = write_kohya_lora(lora, "sd1", SD1_MODULES)
    reports = merge(tmp_path / "model.ckpt", [(lora, 1.0)], tmp_path / "out.safetensors")
    assert reports[0].applied == len(SD1_MODULES) and not reports[0].unmatched
    out = arch.ldm_to_diffusers(load_file(tmp_path / "out.safetensors"), "sd1")[0]
    p = "down_blocks.0.attentions.0.proj_in"
    want = (weights[("unet", p, "weight")].float() + expected[("unet", p)]).half()
    assert torch.equal(out["unet"][p + ".weight"], want)


@pytest.mark.parametrize("channels", [9, 8, 5])
def test_merge_into_wider_conv_in_acts_on_the_first_channels(tmp_path, channels):
    """Inpainting (9), instruct-pix2pix (8) and depth (5) checkpoints: a LoRA on conv_in reaches
    the 4 channels it was trained for; the others keep their bits (A1111's built-in pads)."""
    modules = SD1_MODULES[:2] + [("unet", "conv_in")]
    weights = _weights("sd1", modules, torch.float16)
    w9 = (torch.randn(320, channels, 3, 3, generator=torch.Generator().manual_seed(4)) * 0.05).to(torch.float16)
    weights[("unet", "conv_in", "weight")] = w9
    single, folder = tmp_path / "inpaint.safetensors", tmp_path / "pipe"
    write_single_file(single, "sd1", weights)
    write_diffusers_folder(folder, "sd1", weights)
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["in_channels"] = channels
    cfg_path.write_text(json.dumps(cfg))
    lora = tmp_path / "lora.safetensors"
    expected = write_kohya_lora(lora, "sd1", modules)
    lines = []
    reports = merge(single, [(lora, 0.6)], tmp_path / "out.safetensors", log=lines.append)
    merge(folder, [(str(lora), 0.6)], tmp_path / "out_pipe", log=lines.append)
    assert reports[0].applied == len(modules) and not reports[0].unmatched
    assert sum(f"conv_in has {channels} input channels" in x for x in lines) == 2
    want = w9.float()
    want[:, :4] += 0.6 * expected[("unet", "conv_in")]
    want = want.to(torch.float16)
    got_single = load_file(tmp_path / "out.safetensors")["model.diffusion_model.input_blocks.0.0.weight"]
    got_folder = read_diffusers_folder(tmp_path / "out_pipe")[("unet", "conv_in.weight")]
    for got in (got_single, got_folder):
        assert torch.equal(got, want)
        assert torch.equal(got[:, 4:], w9[:, 4:])


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf", "1e309"])
def test_non_finite_strength_is_one_line_error_and_writes_nothing(tmp_path, capsys, strength):
    weights = _weights("sd1", SD1_MODULES, torch.float16)
    single = tmp_path / "model.safetensors"
    write_single_file(single, "sd1", weights)
    lora = tmp_path / "lora.safetensors"
    write_kohya_lora(lora, "sd1", SD1_MODULES)
    out = tmp_path / "out.safetensors"
    for argv in (["merge", "--base", str(single), "--lora", f"{lora}:{strength}", "--out", str(out)],
                 ["unmerge", "--merged", str(single), "--lora", f"{lora}:{strength}", "--out", str(out)],
                 ["combine", f"{lora}:{strength}", f"{lora}:0.5", "--rank", "4", "--out", str(out)]):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and not out.exists(), argv
        assert len(err) == 1 and "not a finite number" in err[0], (argv, err)


def test_merge_that_overflows_fp16_refuses_and_writes_nothing(tmp_path, capsys):
    weights = _weights("sd1", SD1_MODULES, torch.float16)
    single = tmp_path / "model.safetensors"
    write_single_file(single, "sd1", weights)
    before = single.read_bytes()
    lora = tmp_path / "lora.safetensors"
    write_kohya_lora(lora, "sd1", SD1_MODULES)
    out = tmp_path / "out.safetensors"
    code = main(["merge", "--base", str(single), "--lora", f"{lora}:1e30", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not out.exists() and single.read_bytes() == before
    assert len(err) == 1 and "non-finite" in err[0] and "float16" in err[0], err
