"""``combine`` and ``resize``: weighted sums of any LoRA types, and rank changes, with exact energies."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_ext.cli import main
from lora_ext.errors import LoraExtError
from lora_ext.tools import combine, resize
from lora_ext.tools.common import parse_source_arg
from tiny_models import one_thread_fixture
from tools_util import kohya_name, lora_deltas, lora_modules, rel, tiny_base, write_kohya


one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("cb") / "base")


def _write_loha(path, modules, rank=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for comp, p, shape in modules:
        inner = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        pre = kohya_name(comp, p)
        sd[f"{pre}.hada_w1_a"] = torch.randn(shape[0], rank, generator=g) * 0.3
        sd[f"{pre}.hada_w1_b"] = torch.randn(rank, inner, generator=g) * 0.3
        sd[f"{pre}.hada_w2_a"] = torch.randn(shape[0], rank, generator=g) * 0.3
        sd[f"{pre}.hada_w2_b"] = torch.randn(rank, inner, generator=g) * 0.3
        sd[f"{pre}.alpha"] = torch.tensor(1.0)
    save_file(sd, path)


def test_combine_at_full_rank_is_the_weighted_sum(base, tmp_path):
    mods = lora_modules(base)
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    write_kohya(a, mods, rank=3, alpha=2.0, seed=1)
    _write_loha(b, mods[::2])  # a different type, on half the modules
    write_kohya(c, mods[1::3], rank=2, alpha=4.0, seed=2, dtype=torch.float16)
    blocks = {"BASE": 0.5, "IN01": 0.0, "OUT03": 2.0}  # lbw-style: te x0.5, one block off, one doubled
    out = tmp_path / "sum.safetensors"
    report = combine([(str(a), 0.7), (str(b), -0.4), (str(c), 1.0, blocks)], out, base=base, dtype="fp32", progress=False)
    da, db, dc, got = (lora_deltas(p, base) for p in (a, b, c, out))
    from lora_ext.checkpoint import open_checkpoint

    ck = open_checkpoint(base)
    block_of = {(comp, p): info.block for comp, t in ck.layout.items() for p, info in t.items()}
    ck.close()
    worst = 0.0
    for key in da:
        comp = key[0]
        mult = blocks["BASE"] if comp != "unet" else blocks.get(block_of[key], 1.0) if block_of[key] != "BASE" else 1.0
        want = 0.7 * da[key] + (-0.4 * db[key] if key in db else 0) + (mult * dc[key] if key in dc else 0)
        worst = max(worst, float((got[key] - want).abs().max() / want.abs().max()))
    assert worst <= 1e-5, worst
    assert abs(report.values["energy"] - 1.0) <= 1e-6
    assert any(r.detail.startswith("from a.safetensors (lora), b.safetensors (loha)") for r in report.rows)


def test_combine_at_lower_rank_reports_exact_energy(base, tmp_path):
    mods = lora_modules(base)[:6]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_kohya(a, mods, rank=3, seed=3)
    write_kohya(b, mods, rank=3, seed=4)
    report = combine([(str(a), 1.0), (str(b), 0.5)], tmp_path / "o.safetensors", rank=2, base=base, dtype="fp32",
                     progress=False)
    da, db = lora_deltas(a, base), lora_deltas(b, base)
    for row in report.rows:
        key = tuple(row.module.split(":", 1))
        s = torch.linalg.svdvals((da[key] + 0.5 * db[key]).flatten(1).double())
        assert row.rank == 2 and abs(row.energy - float((s[:2] ** 2).sum() / (s ** 2).sum())) <= 1e-6


def test_resize_keeps_what_it_says(base, tmp_path):
    mods = lora_modules(base)
    src = tmp_path / "r6.safetensors"
    write_kohya(src, mods, rank=6, alpha=3.0, seed=7)
    want = lora_deltas(src, base)
    report = resize(src, tmp_path / "r2.safetensors", rank=2, base=base, progress=False)
    got = lora_deltas(tmp_path / "r2.safetensors", base)
    kept = total = 0.0
    for row in report.rows:
        key = tuple(row.module.split(":", 1))
        s = torch.linalg.svdvals(want[key].flatten(1).double())
        assert row.rank == min(2, s.numel())
        assert abs(row.energy - float((s[:row.rank] ** 2).sum() / (s ** 2).sum())) <= 1e-6
        err = float(torch.linalg.vector_norm(got[key] - want[key]) ** 2 / torch.linalg.vector_norm(want[key]) ** 2)
        assert abs(err - (1 - row.energy)) <= 1e-5
        kept += float((s[:row.rank] ** 2).sum())
        total += float((s ** 2).sum())
    assert abs(report.values["energy"] - kept / total) <= 1e-6
    # energy rule: the fewest singular values reaching the share
    rep = resize(src, tmp_path / "e.safetensors", energy=0.95, base=base, progress=False)
    for row in rep.rows:
        key = tuple(row.module.split(":", 1))
        s = torch.linalg.svdvals(want[key].flatten(1).double())
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert row.rank == int((share < 0.95 - 1e-12).sum()) + 1 and row.energy >= 0.95 - 1e-9
    # a module already at or below the rank is copied bit for bit
    rep = resize(src, tmp_path / "same.safetensors", rank=8, base=base, progress=False)
    a, b = load_file(src), load_file(tmp_path / "same.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and rep.count("kept") == len(mods)


def test_resize_dora_keeps_its_magnitude(base, tmp_path):
    mods = lora_modules(base)[:5]
    src = tmp_path / "dora.safetensors"
    write_kohya(src, mods, rank=4, dora=True, seed=9)
    resize(src, tmp_path / "full.safetensors", rank=4 + 1, base=base, progress=False)  # copy
    rep = resize(src, tmp_path / "lossless.safetensors", energy=1.0, base=base, progress=False)
    a, b = lora_deltas(src, base), lora_deltas(tmp_path / "lossless.safetensors", base)
    assert max(rel(b[k], a[k]) for k in a) <= 1e-5
    sd = load_file(tmp_path / "lossless.safetensors")
    orig = load_file(src)
    for comp, p, _ in mods:
        k = kohya_name(comp, p) + ".dora_scale"
        assert torch.equal(sd[k], orig[k])
    assert all("DoRA magnitude kept" in r.detail for r in rep.rows)


def test_parse_source_arg_and_cli(base, tmp_path, capsys):
    assert parse_source_arg("a.safetensors") == ("a.safetensors", 1.0, None)
    assert parse_source_arg(r"C:\x\a.safetensors:0.5") == (r"C:\x\a.safetensors", 0.5, None)
    path, w, blocks = parse_source_arg("a.safetensors:0.8:lbw=1,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1,1")
    assert (path, w) == ("a.safetensors", 0.8) and blocks["IN01"] == 0.0 and blocks["OUT03"] == 1.0
    mods = lora_modules(base)[:4]
    a = tmp_path / "a.safetensors"
    write_kohya(a, mods, rank=2)
    assert main(["combine", f"{a}:0.5", f"{a}:0.5", "--rank", "2", "--base", base, "--out", str(tmp_path / "c.safetensors"),
                 "--no-progress"]) == 0
    assert "4 modules, rank 2" in capsys.readouterr().out
    got, want = lora_deltas(tmp_path / "c.safetensors", base), lora_deltas(a, base)
    assert max(rel(got[k], want[k]) for k in want) <= 1e-3  # fp32 input, fp32 output
    assert main(["resize", str(a), "--energy", "0.5", "--base", base, "--out", str(tmp_path / "r.safetensors"),
                 "--no-progress", "--summary-only"]) == 0
    assert "energy kept" in capsys.readouterr().out
    with pytest.raises(LoraExtError, match="--rank or --energy"):
        resize(a, tmp_path / "x.safetensors", base=base)
