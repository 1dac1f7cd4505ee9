"""``extract`` / ``unmerge``: a known LoRA merged at strength 1 comes back out.

Tiny pipelines (tests/tiny_models.py) as diffusers folders, and partial full-size SD1.5
checkpoints (tests/test_merge.py's helpers) as A1111 single files and diffusers folders.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from lora_ext.cli import main
from lora_ext.layouts import arch_layout
from lora_ext.merge import merge
from lora_ext.tools import extract, unmerge
from lora_ext.tools.common import rounding_step
from test_merge import SD1_MODULES, _weights, write_diffusers_folder, write_single_file
from tiny_models import one_thread_fixture
from tools_util import kohya_name, lora_deltas, lora_modules, read_weights, rel, tiny_base, write_kohya


one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def merged32(tmp_path_factory):
    """fp32 tiny pipeline, a rank-3 LoRA (alpha 2) on every LoRA-able module, merged at 1."""
    root = tmp_path_factory.mktemp("m32")
    base = tiny_base(root / "base")
    modules = lora_modules(base)
    lora = root / "known.safetensors"
    write_kohya(lora, modules, rank=3, alpha=2.0)
    merge(base, [(lora, 1.0)], root / "merged")
    return base, str(root / "merged"), str(lora)


def test_unmerge_at_the_original_rank_reproduces_the_delta(merged32, tmp_path):
    base, merged, known = merged32
    out = tmp_path / "rec.safetensors"
    report = unmerge(merged, out, base=base, rank=4, dtype="fp32", progress=False)
    want, got = lora_deltas(known, base), lora_deltas(out, base)
    assert set(got) == set(want)
    worst = max(rel(got[k], want[k]) for k in want)
    assert worst <= 1e-4, worst
    assert report.values["explained"] > 1 - 1e-6
    assert report.count("extracted") == len(want) and report.count("not extracted") == 0
    # kohya names, alpha = rank, fp32 as asked
    sd = load_file(out)
    k = kohya_name("unet", "down_blocks.0.resnets.0.conv1")
    # rank 4 asked, 3 kept: the 4th singular value of the merged difference is fp32 rounding noise
    assert sd[f"{k}.lora_down.weight"].shape == (3, 8, 3, 3) and sd[f"{k}.lora_up.weight"].shape == (8, 3, 1, 1)
    assert float(sd[f"{k}.alpha"]) == 3.0 and sd[f"{k}.lora_up.weight"].dtype == torch.float32
    assert any(key.startswith("lora_te_text_model_encoder_layers_") for key in sd)


def test_lower_rank_reports_the_energy_of_the_singular_values(merged32, tmp_path):
    base, merged, _ = merged32
    report = unmerge(merged, tmp_path / "r2.safetensors", base=base, rank=2, dtype="fp32", progress=False)
    w0, w1 = read_weights(base), read_weights(merged)
    kept = total = 0.0
    for row in report.rows:
        comp, path = row.module.split(":", 1)
        d = (w1[(comp, path)].float() - w0[(comp, path)].float()).flatten(1)
        s = torch.linalg.svdvals(d.double())
        want = float((s[:2] ** 2).sum() / (s ** 2).sum())
        assert row.rank == 2 and abs(row.energy - want) <= 1e-6, (row.module, row.energy, want)
        kept += float((s[:2] ** 2).sum())
        total += float((s ** 2).sum())
    assert abs(report.values["explained"] - kept / total) <= 1e-6
    # and the file really keeps that much: its delta is the best rank-2 approximation
    got = lora_deltas(tmp_path / "r2.safetensors", base)
    comp, path = report.rows[0].module.split(":", 1)
    d = (w1[(comp, path)].float() - w0[(comp, path)].float())
    err = float(torch.linalg.vector_norm(got[(comp, path)] - d) ** 2 / torch.linalg.vector_norm(d) ** 2)
    assert abs(err - (1 - report.rows[0].energy)) <= 1e-5


def test_rank_by_energy_and_ratio(merged32, tmp_path):
    base, merged, _ = merged32
    rep = unmerge(merged, tmp_path / "e.safetensors", base=base, rank=8, rank_by="energy", energy=0.9, dtype="fp32",
                  progress=False)
    assert all(r.energy >= 0.9 - 1e-9 for r in rep.rows)
    assert any(r.rank < 3 for r in rep.rows)  # the rule stops early where two values suffice
    rep = unmerge(merged, tmp_path / "q.safetensors", base=base, rank=8, rank_by="ratio", ratio=1e6, dtype="fp32",
                  progress=False)
    assert all(r.rank == 3 for r in rep.rows if r.module.endswith("conv1"))  # rank-3 changes, zero tail dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unmerge_with_the_known_lora_restores_the_base(tmp_path, dtype):
    base = tiny_base(tmp_path / "base", dtype=dtype)
    lora = tmp_path / "known.safetensors"
    write_kohya(lora, lora_modules(base), rank=3, alpha=2.0, scale=0.1)
    merge(base, [(lora, 0.8)], tmp_path / "merged")
    report = unmerge(tmp_path / "merged", tmp_path / "restored", loras=[(str(lora), 0.8)], base=base, progress=False)
    w0, w1, wr = read_weights(base), read_weights(tmp_path / "merged"), read_weights(tmp_path / "restored")
    differ = 0
    for key, orig in w0.items():
        got = wr[key]
        assert got.dtype == dtype
        step = torch.maximum(rounding_step(orig), rounding_step(w1[key]))
        assert bool(((got.double() - orig.double()).abs() <= step).all()), key  # one rounding step at most
        differ += int((got != orig).sum())
    assert report.values["ref_diff"] == differ and report.values["ref_far"] == 0
    assert report.values["remerge_miss"] == 0
    assert f"{differ} of " in "\n".join(report.summary)
    # re-merging the restored base gives the merged checkpoint back, bit for bit
    merge(tmp_path / "restored", [(lora, 0.8)], tmp_path / "again")
    again = read_weights(tmp_path / "again")
    assert all(torch.equal(again[k], w1[k]) for k in w1)


def test_text_encoder_unchanged_is_skipped(tmp_path):
    base = tiny_base(tmp_path / "base")
    lora = tmp_path / "unet_only.safetensors"
    write_kohya(lora, lora_modules(base, components=("unet",)), rank=2)
    merge(base, [(lora, 1.0)], tmp_path / "merged")
    report = extract(base, tmp_path / "merged", tmp_path / "x.safetensors", rank=2, dtype="fp32", progress=False)
    assert "  te1: unchanged, skipped" in report.summary
    assert not any(k.startswith("lora_te") for k in load_file(tmp_path / "x.safetensors"))


def test_full_size_sd15_single_file_and_folder_give_the_same_lora(tmp_path):
    weights = _weights("sd1", SD1_MODULES, torch.float32)
    single, folder = tmp_path / "base.safetensors", tmp_path / "pipe"
    write_single_file(single, "sd1", weights)
    write_diffusers_folder(folder, "sd1", weights)
    table = arch_layout("sd1")
    modules = [(c, p, table[c][p].weight_shape) for c, p in SD1_MODULES]
    lora = tmp_path / "known.safetensors"
    write_kohya(lora, modules, rank=6, alpha=6.0, scale=0.05)
    merge(single, [(lora, 1.0)], tmp_path / "merged.safetensors")
    merge(folder, [(lora, 1.0)], tmp_path / "merged_pipe")
    r1 = extract(single, tmp_path / "merged.safetensors", tmp_path / "a.safetensors", rank=8, dtype="fp32", progress=False)
    r2 = extract(folder, tmp_path / "merged_pipe", tmp_path / "b.safetensors", rank=8, dtype="fp32", progress=False)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "randomized" in {r.values["method"] for r in r1.rows}  # full-size modules take the fast path
    want, got = lora_deltas(lora, single), lora_deltas(tmp_path / "a.safetensors", single)
    assert max(rel(got[k], want[k]) for k in want) <= 1e-4
    assert r2.values["explained"] > 1 - 1e-6


def test_cli_extract_and_unmerge(merged32, tmp_path, capsys):
    base, merged, known = merged32
    assert main(["extract", "--base", base, "--tuned", merged, "--rank", "3", "--out", str(tmp_path / "c.safetensors"),
                 "--dtype", "fp32", "--no-progress", "--report-json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "the LoRA explains 100% of the difference" in out and "unet:down_blocks.0.resnets.0.conv1  extracted  rank 3" in out
    assert os.path.getsize(tmp_path / "r.json") > 0
    assert main(["unmerge", "--merged", merged, "--lora", known, "--base", base, "--out", str(tmp_path / "clean"),
                 "--no-progress", "--summary-only"]) == 0
    out = capsys.readouterr().out
    assert "re-merge check: bit-exact" in out and "modules:" not in out
    # an existing output is refused with one clear line
    assert main(["extract", "--base", base, "--tuned", merged, "--rank", "3", "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_sd2_and_sdxl_names_round_trip(tmp_path, name):
    """SD2's fused OpenCLIP q/k/v and SDXL's kohya names (ldm UNet paths, lora_te1_/lora_te2_)."""
    from test_merge import SD2_MODULES, SDXL_MODULES, write_kohya_lora

    mods = {"sd2": SD2_MODULES, "sdxl": SDXL_MODULES}[name]
    single = tmp_path / "base.safetensors"
    write_single_file(single, name, _weights(name, mods, torch.float16))
    lora = tmp_path / "known.safetensors"
    write_kohya_lora(lora, name, mods, rank=4, alpha=4.0)
    merge(single, [(lora, 1.0)], tmp_path / "merged.safetensors")
    out = tmp_path / "x.safetensors"
    report = extract(single, tmp_path / "merged.safetensors", out, rank=8, dtype="fp32", progress=False)
    assert report.count("extracted") == len(mods)
    keys = {k.split(".")[0] for k in load_file(out)}
    if name == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in keys
        assert "lora_te2_text_model_encoder_layers_31_self_attn_q_proj" in keys
        assert "lora_te1_text_model_encoder_layers_11_self_attn_v_proj" in keys
    else:
        assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj" in keys
    want, got = lora_deltas(lora, single), lora_deltas(out, single)
    # fp16 checkpoints: the merged difference carries the fp16 rounding of the merge
    assert max(rel(got[k], want[k]) for k in want) <= 2e-3, max(rel(got[k], want[k]) for k in want)
