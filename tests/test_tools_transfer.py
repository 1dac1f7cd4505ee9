"""``transfer``: a LoRA carried to a related base lands closer to one fitted on that base.

Synthetic pair on full-size SD1.5 shapes (partial checkpoints, tests/test_merge.py helpers):
the source weights have a decaying spectrum, the target is the source with its output and
input features rotated by small random rotations ``G_L``, ``G_R`` (the "small structured
change"). The LoRA adapts the source inside its dominant subspaces. The same adaptation fitted
directly on the target is ``G_L delta G_R^T`` (for a rotated model the least-squares fit of the
target's adapted outputs is exactly that), written as the reference LoRA.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_ext.cli import main
from lora_ext.layouts import arch_layout
from lora_ext.tools import transfer
from test_merge import write_single_file
from tiny_models import one_thread_fixture
from tools_util import kohya_name

ROTATED = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),  # 320 x 320
    ("unet", "down_blocks.0.attentions.0.proj_in"),  # 320 x 320 x 1 x 1
    ("unet", "down_blocks.0.resnets.0.conv1"),  # 320 x 320 x 3 x 3
]
IDENTICAL = ("te1", "encoder.layers.0.self_attn.q_proj")
UNRELATED = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2")  # 320 x 1280
RANK = 8


one_thread = one_thread_fixture()


def _orth(n, k, g):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def _rotation(n, eps, g):
    s = torch.randn(n, n, generator=g, dtype=torch.float64)
    s = s - s.T
    return torch.linalg.matrix_exp(eps * s / torch.linalg.matrix_norm(s, 2))


def _spectral(shape, g):
    m, n = shape[0], int(torch.tensor(shape[1:]).prod())
    u, v = _orth(m, min(m, n), g), _orth(n, min(m, n), g)
    s = torch.exp(-torch.arange(min(m, n), dtype=torch.float64) / 30) + 0.01
    return u, s, v


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tr")
    g = torch.Generator().manual_seed(0)
    table = arch_layout("sd1")
    src_w, dst_w, lora, ref = {}, {}, {}, {}
    for comp, path in ROTATED + [IDENTICAL, UNRELATED]:
        shape = table[comp][path].weight_shape
        u, s, v = _spectral(shape, g)
        w = (u * s) @ v.T
        src_w[(comp, path, "weight")] = w.reshape(shape).float()
        if (comp, path) == IDENTICAL:
            dst_w[(comp, path, "weight")] = src_w[(comp, path, "weight")].clone()
        elif (comp, path) == UNRELATED:
            u2, s2, v2 = _spectral(shape, g)
            dst_w[(comp, path, "weight")] = ((u2 * s2) @ v2.T).reshape(shape).float()
        else:
            gl, gr = _rotation(shape[0], 0.08, g), _rotation(shape[1], 0.08, g)
            w4 = w.reshape(shape[0], shape[1], -1)
            wt = torch.einsum("ij,jck,dc->idk", gl, w4, gr)  # rotate outputs and input channels
            dst_w[(comp, path, "weight")] = wt.reshape(shape).float()
        # the LoRA: a change inside the source's top-RANK subspaces
        a = torch.randn(RANK, RANK, generator=g, dtype=torch.float64) * 0.05
        up, down = u[:, :RANK] @ a, v[:, :RANK].T
        lora[kohya_name(comp, path)] = (up, down, shape)
        if (comp, path) in ROTATED:
            d4 = down.reshape(RANK, shape[1], -1)
            ref[kohya_name(comp, path)] = (gl @ up, torch.einsum("rck,dc->rdk", d4, gr).reshape(RANK, -1), shape)
        else:
            ref[kohya_name(comp, path)] = (up, down, shape)
    for name, files in (("a", src_w), ("b", dst_w)):
        write_single_file(root / f"{name}.safetensors", "sd1", files)
    for name, parts in (("lora", lora), ("ref", ref)):
        sd = {}
        for prefix, (up, down, shape) in parts.items():
            kernel = tuple(shape[2:])
            sd[f"{prefix}.lora_up.weight"] = up.reshape(shape[0], RANK, *([1] * len(kernel))).float().contiguous()
            sd[f"{prefix}.lora_down.weight"] = down.reshape(RANK, *shape[1:]).float().contiguous()
            sd[f"{prefix}.alpha"] = torch.tensor(float(RANK))
        save_file(sd, root / f"{name}.safetensors")
    return {k: str(root / f"{k}.safetensors") for k in ("a", "b", "lora", "ref")}


def test_transferred_delta_is_closer_to_the_target_fit(pair, tmp_path):
    out = tmp_path / "moved.safetensors"
    report = transfer(pair["lora"], out, source=pair["a"], target=pair["b"], reference=pair["ref"], subspace_rank=32,
                      dtype="fp32", progress=False)
    rows = {r.module: r for r in report.rows}
    for comp, path in ROTATED:
        r = rows[f"{comp}:{path}"]
        assert r.status == "transferred" and r.values["similarity"] > 0.9, r.line()
        # closer to the LoRA fitted on the target than the untransferred delta is, by a margin
        assert r.values["ref_transferred"] < 0.6 * r.values["ref_source"], r.line()
        assert r.rank == RANK
    assert rows[f"{IDENTICAL[0]}:{IDENTICAL[1]}"].status == "identical"
    unrelated = rows[f"{UNRELATED[0]}:{UNRELATED[1]}"]
    assert unrelated.status == "kept" and unrelated.values["similarity"] < 0.5
    assert f"closer than the source delta in {len(ROTATED)} of {len(ROTATED)} modules" in "\n".join(report.summary)
    # untransferred modules are carried bit for bit
    a, b = load_file(pair["lora"]), load_file(out)
    for comp, path in (IDENTICAL, UNRELATED):
        k = kohya_name(comp, path)
        assert all(torch.equal(a[f"{k}.{n}"], b[f"{k}.{n}"]) for n in ("lora_up.weight", "lora_down.weight", "alpha"))


def test_project_method_and_dropping_dissimilar_modules(pair, tmp_path):
    report = transfer(pair["lora"], tmp_path / "p.safetensors", source=pair["a"], target=pair["b"], reference=pair["ref"],
                      subspace_rank=32, method="project", on_dissimilar="drop", progress=False)
    rows = {r.module: r for r in report.rows}
    for comp, path in ROTATED:
        r = rows[f"{comp}:{path}"]
        assert r.values["ref_transferred"] < r.values["ref_source"], r.line()
    assert rows[f"{UNRELATED[0]}:{UNRELATED[1]}"].status == "dropped"
    assert not any(k.startswith(kohya_name(*UNRELATED)) for k in load_file(tmp_path / "p.safetensors"))


def test_cli_transfer(pair, tmp_path, capsys):
    assert main(["transfer", pair["lora"], "--from", pair["a"], "--to", pair["b"], "--out", str(tmp_path / "c.safetensors"),
                 "--min-similarity", "0.95", "--subspace-rank", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "transferred" in out and "similarity" in out
