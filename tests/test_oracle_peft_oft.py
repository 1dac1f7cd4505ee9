"""Oracle: files written by PEFT's own OFT (``peft.OFTConfig``: ``oft_R.weight``) and BOFT
(``peft.BOFTConfig``: ``boft_R``, ``boft_s``) via ``save_pretrained`` (``adapter_model.safetensors``
+ ``adapter_config.json``), merged or fused by lora-ext, must reproduce PEFT's forward with the
adapter attached (fp32, max relative error <= 1e-5) on the tiny SD UNet / CLIP and the tiny
diffusers Flux (and its original-layout twin), and must really change the output.

PEFT OFT rotates the layer input, so its delta keeps every row to itself: a file trained on the
original Flux's fused q|k|v(|mlp) Linears applies exactly to the diffusers model's separate
modules (``rows_independent``), checked against PEFT's forward on the fused layers.
"""
import copy
import json

import pytest
import torch

from dit_models import OriginalTree, diffusers_state, dit_table, forward, max_rel, original_state, tiny
from lora_ext.engine import apply
from lora_ext.hostmodel import HostModel, bind
from lora_ext.merge import merge
from lora_ext.network import load_lora
from tiny_models import load_pipeline, max_rel_err, one_thread_fixture, save_pipeline, te_out, tiny_text_encoder, \
    tiny_unet, unet_out

peft = pytest.importorskip("peft")
from test_dit_oracles import FLUX_TARGETS, _apply_both  # noqa: E402

one_thread = one_thread_fixture()
pytestmark = pytest.mark.filterwarnings("ignore:.*(oft_block_size|Adjusted|CUDA extension|butterfly).*")

UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]
UNET_1X1 = ["proj_in", "proj_out", "conv_shortcut"]
UNET_3X3 = ["conv1", "conv2", "conv_in", "conv_out"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _randomise(model, seed, scale=0.05):
    """Every OFT/BOFT parameter random (the init is the identity rotation); boft_s around 1."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_s" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "oft_R" in name or "boft_R" in name or "oft_embedding_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            else:
                continue
            n += 1
    assert n > 0


class _FakeFBD:
    """Stands in for PEFT's CUDA block-diagonal extension (the only way PEFT builds BOFT with
    several butterfly stages): one block-diagonal matrix per stage, PEFT does the rest."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*stage) for stage in blocks])]


@pytest.fixture(autouse=True)
def no_extension_build(monkeypatch):
    """PEFT's BOFT tries to compile its CUDA extension on first use; tell it there is none."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", False)


@pytest.fixture
def butterfly_stages(monkeypatch, no_extension_build):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _FakeFBD())


# ------------------------------------------------------------------------------------------
# keys and types

def test_peft_oft_and_boft_keys_group_and_claim(tmp_path):
    from torch import nn

    m = nn.Sequential()
    m.add_module("to_q", nn.Linear(8, 8))
    m.add_module("to_k", nn.Linear(8, 8))
    for name, cfg in (("oft", peft.OFTConfig(oft_block_size=4, r=0, target_modules=["to_q"])),
                      ("boft", peft.BOFTConfig(boft_block_size=4, target_modules=["to_k"]))):
        pm = peft.get_peft_model(copy.deepcopy(m), cfg)
        pm.save_pretrained(tmp_path / name)
    oft = load_lora(tmp_path / "oft" / "adapter_model.safetensors")
    assert set(oft.groups) == {"base_model.model.to_q"}
    g = oft.groups["base_model.model.to_q"]
    assert g.names == {"oft_R.weight"} and g.adapter.type_name == "peft_oft"  # not IA3's "weight"
    assert g.adapter.describe()["block_size"] == 4 and "settings" not in g.adapter.describe()
    boft = load_lora(tmp_path / "boft" / "adapter_model.safetensors")
    g = boft.groups["base_model.model.to_k"]
    assert g.names == {"boft_R", "boft_s"} and g.adapter.type_name == "peft_boft"
    # the identity init changes nothing
    w = torch.randn(8, 8)
    assert torch.equal(oft.groups["base_model.model.to_q"].adapter.delta(w), torch.zeros(8, 8))
    assert boft.groups["base_model.model.to_k"].adapter.delta(w).abs().max() == 0


def test_config_settings_read_and_checked(tmp_path):
    from torch import nn

    m = nn.Sequential()
    m.add_module("lin", nn.Linear(8, 8))
    pm = peft.get_peft_model(m, peft.OFTConfig(oft_block_size=4, r=0, target_modules=["lin"]))
    _randomise(pm, 0, 0.3)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    w = torch.randn(8, 8)
    base = load_lora(path).groups["base_model.model.lin"].adapter
    assert base.describe()["parametrisation"] == "cayley-neumann(5, peft >=0.18)"

    def adapter_with(**fields):
        (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, **fields)))
        return load_lora(path).groups["base_model.model.lin"]

    # PEFT < 0.18 (no peft_version in its configs) summed another Neumann series
    old = adapter_with(peft_version=None).adapter
    assert old.describe()["parametrisation"] == "cayley-neumann(5, peft <0.18)"
    u = load_lora(path).groups["base_model.model.lin"].tensors["oft_R.weight"].float()
    i, j = torch.triu_indices(4, 4, 1)
    q = torch.zeros(2, 4, 4)
    q[:, i, j] = u
    q = q - q.transpose(1, 2)
    eye = torch.eye(4)
    series = eye + 2 * (q + q @ q + q @ q @ q + q @ q @ q @ q)
    want = w @ torch.block_diag(*series).T - w
    torch.testing.assert_close(old.delta(w), want, rtol=0, atol=1e-6)
    assert (old.delta(w) - base.delta(w)).abs().max() > 1e-5
    for bad in (dict(num_cayley_neumann_terms=-1), dict(num_cayley_neumann_terms=1.5), dict(coft="yes"),
                dict(eps=float("inf")), dict(use_cayley_neumann=1)):
        g = adapter_with(**bad)
        assert g.adapter is None and g.problem.startswith("bad peft_oft config"), bad
    # without any config: PEFT's defaults, said so
    (tmp_path / "adapter_config.json").unlink()
    g = load_lora(path).groups["base_model.model.lin"]
    assert g.adapter.describe()["settings"].startswith("assumed")
    assert torch.equal(g.adapter.delta(w), base.delta(w))


# ------------------------------------------------------------------------------------------
# tiny SD UNet and CLIP, merged into a checkpoint

@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    save_pipeline(folder, tiny_unet(), tiny_text_encoder())
    return folder


SD_CASES = {
    # (unet config, te config)
    "oft-b4-neumann5": (lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=UNET_ATTN + UNET_1X1),
                        lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=TE_TARGETS)),
    "oft-b8-cayley-r": (lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=UNET_ATTN + UNET_1X1,
                                               use_cayley_neumann=False),
                        lambda: peft.OFTConfig(r=2, oft_block_size=0, target_modules=TE_TARGETS,
                                               use_cayley_neumann=False)),
    "oft-share-neumann3": (lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=UNET_ATTN + UNET_1X1,
                                                  block_share=True, num_cayley_neumann_terms=3),
                           lambda: peft.OFTConfig(oft_block_size=2, r=0, target_modules=TE_TARGETS,
                                                  num_cayley_neumann_terms=8)),
    "oft-coft": (lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=UNET_ATTN + UNET_1X1, coft=True,
                                        eps=0.2),
                 lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=TE_TARGETS, coft=True, eps=0.2)),
    "boft-b4": (lambda: peft.BOFTConfig(boft_block_size=4, target_modules=UNET_ATTN + UNET_1X1 + UNET_3X3),
                lambda: peft.BOFTConfig(boft_block_num=4, boft_block_size=0, target_modules=TE_TARGETS)),
}


def _peft_attach(model, cfg, seed, folder, scale=0.05):
    """Attach PEFT's adapter in place, randomise, save (before any forward: COFT projects the
    parameters inside its forward, so the file holds the raw ones)."""
    pm = peft.get_peft_model(model, cfg)
    _randomise(pm, seed, scale)
    pm.save_pretrained(folder)
    return pm.base_model.model


@pytest.mark.parametrize("case", sorted(SD_CASES))
def test_sd_unet_and_clip_merge(sd_base, tmp_path, case):
    ucfg, tcfg = SD_CASES[case]
    unet, te = load_pipeline(sd_base)
    unet = _peft_attach(unet, ucfg(), 1, tmp_path / "unet_adapter", scale=0.1)
    te = _peft_attach(te, tcfg(), 2, tmp_path / "te_adapter", scale=0.1)
    want_unet, want_te = unet_out(unet), te_out(te)
    files = [(tmp_path / d / "adapter_model.safetensors", 1.0) for d in ("unet_adapter", "te_adapter")]
    if case == "oft-coft":  # the projection really acts on some blocks of this file
        g = next(iter(load_lora(files[1][0]).groups.values()))
        from lora_ext.adapters.peft_oft import coft_project

        raw = g.tensors["oft_R.weight"].float()
        assert (coft_project(raw, 4, 0.2) - raw).abs().max() > 1e-3
    reports = merge(sd_base, files, tmp_path / "merged")
    assert [r.unmatched for r in reports] == [[], []]
    assert reports[1].applied == 2 * 6
    unet2, te2 = load_pipeline(tmp_path / "merged")
    e_unet, e_te = max_rel_err(unet_out(unet2), want_unet), max_rel_err(te_out(te2), want_te)
    print(f"{case}: unet {e_unet:.2e} te {e_te:.2e}")
    assert e_unet <= 1e-5 and e_te <= 1e-5
    unet0, te0 = load_pipeline(sd_base)
    assert max_rel_err(unet_out(unet0), want_unet) > 1e-3
    assert max_rel_err(te_out(te0), want_te) > 1e-3


def test_sd_oft_on_3x3_convs_is_reported_not_approximated(sd_base, tmp_path):
    """PEFT's OFT on a k x k conv rotates overlapping input patches and sums them back: no
    weight reproduces it (it changes the output even at the identity rotation). Those groups
    are reported; the rest of the file applies, and the engine leaves the convs untouched."""
    unet, _ = load_pipeline(sd_base)
    ref = unet_out(unet)
    pm = peft.get_peft_model(unet, peft.OFTConfig(oft_block_size=4, r=0, target_modules=["to_q", "conv1"]))
    assert max_rel_err(unet_out(pm.base_model.model), ref) > 1e-2  # identity rotation, yet a change
    _randomise(pm, 3)
    pm.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    unet2, _ = load_pipeline(sd_base)
    before = {k: v.clone() for k, v in unet2.state_dict().items()}
    h = apply({"unet": unet2}, [path], "fuse")
    conv_keys = {u["key"] for u in h.unmatched}
    assert conv_keys and all(".conv1." in k for k in conv_keys)
    assert all(".conv1." not in k or torch.equal(v, before[k]) for k, v in unet2.state_dict().items())
    assert any("to_q" in k and not torch.equal(v, before[k]) for k, v in unet2.state_dict().items())
    h.remove()
    assert all(torch.equal(v, before[k]) for k, v in unet2.state_dict().items())


def test_sd_engine_apply_matches_and_restores(sd_base, tmp_path):
    unet, te = load_pipeline(sd_base)
    unet = _peft_attach(unet, peft.OFTConfig(oft_block_size=4, r=0, target_modules=UNET_ATTN + UNET_1X1), 5,
                        tmp_path / "u")
    want = unet_out(unet)
    unet2, _ = load_pipeline(sd_base)
    before = {k: v.clone() for k, v in unet2.state_dict().items()}
    h = apply({"unet": unet2}, [tmp_path / "u" / "adapter_model.safetensors"], "fuse")
    assert h.unmatched == []
    assert max_rel_err(unet_out(unet2), want) <= 1e-5
    h.remove()
    assert all(torch.equal(v, before[k]) for k, v in unet2.state_dict().items())


# ------------------------------------------------------------------------------------------
# tiny diffusers Flux and its original-layout twin

FLUX_CASES = {
    "oft-b4-neumann5": lambda t: peft.OFTConfig(oft_block_size=4, r=0, target_modules=t),
    "oft-b8-cayley": lambda t: peft.OFTConfig(oft_block_size=8, r=0, target_modules=t, use_cayley_neumann=False),
    "oft-b2-share-neumann7": lambda t: peft.OFTConfig(oft_block_size=2, r=0, target_modules=t, block_share=True,
                                                      num_cayley_neumann_terms=7),
    "oft-b4-coft": lambda t: peft.OFTConfig(oft_block_size=4, r=0, target_modules=t, coft=True, eps=0.1),
    "boft-b4": lambda t: peft.BOFTConfig(boft_block_size=4, target_modules=t),
    "boft-b2-3stages": lambda t: peft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3, target_modules=t),
}


@pytest.mark.parametrize("case", sorted(FLUX_CASES))
def test_flux_save_pretrained(tmp_path, case, butterfly_stages):
    base = tiny("flux")
    targets = FLUX_TARGETS
    if case == "boft-b2-3stages":  # 3 stages of 2-blocks need widths divisible by 8
        targets = [t for t in targets if t != "linear_1"] + ["timestep_embedder.linear_1"]
    pm = peft.get_peft_model(copy.deepcopy(base), FLUX_CASES[case](targets))
    _randomise(pm, 3, 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    want = forward(pm.base_model.model, "flux")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    if case == "boft-b2-3stages":
        assert {g.adapter.describe()["stages"] for g in load_lora(path).groups.values()} == {3}
    model, h = _apply_both(base, "flux", path, exact=False)
    err = max_rel(forward(model, "flux"), want)
    print(f"flux {case}: {err:.2e}")
    assert err <= 1e-5
    assert max_rel(forward(base, "flux"), want) > 1e-3
    h.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["oft-b4-neumann5", "oft-b8-cayley", "boft-b4"])
def test_flux_fused_file_on_split_model(tmp_path, case):
    """PEFT trained on the original layout's fused Linears (double blocks' img/txt qkv, single
    blocks' linear1 = q|k|v|mlp, and linear2): applied to the diffusers model, whose q, k, v and
    mlp are separate modules, each part's delta comes from its own rows (rows_independent).
    The oracle is PEFT's own forward of each fused layer, read back as its weight."""
    base = tiny("flux")
    table = dit_table(base)
    tree = OriginalTree(original_state(base, table))
    pm = peft.get_peft_model(tree, FLUX_CASES[case](["qkv", "linear1", "linear2"]))
    _randomise(pm, 4, 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    assert any(p.endswith("linear1") for p in load_lora(path).groups)
    # PEFT's forward on each adapted Linear, fed the identity: rows are x @ W'^T + b
    fused = {}
    with torch.no_grad():
        for name, mod in pm.base_model.model.named_modules():
            if hasattr(mod, "base_layer") and isinstance(mod.base_layer, torch.nn.Linear):
                lin = mod.base_layer
                out = mod(torch.eye(lin.in_features))
                fused[f"{name}.weight"] = (out - (lin.bias if lin.bias is not None else 0)).T.contiguous()
    assert len(fused) == 2 * 2 + 2 * 2  # img/txt qkv of 2 double blocks, linear1/linear2 of 2 single
    want_state = original_state(base, table)
    want_state.update(fused)
    twin = copy.deepcopy(base)
    twin.load_state_dict(diffusers_state(want_state, table), strict=False)
    want = forward(twin, "flux")

    model = copy.deepcopy(base)
    h = apply(model, [path], "fuse")
    assert h.unmatched == [], h.unmatched[:3]  # no "mixes the rows of q, k and v"
    err = max_rel(forward(model, "flux"), want)
    print(f"flux fused {case}: {err:.2e}")
    assert err <= 1e-5
    assert max_rel(forward(base, "flux"), want) > 1e-3
    # each split module's weight is its rows of PEFT's fused weight
    got_state, want_split = model.state_dict(), diffusers_state(want_state, table)
    assert max(max_rel(got_state[k], v) for k, v in want_split.items()) <= 1e-5
    h.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())

    # and on the original layout itself (one target per group)
    tree2 = OriginalTree(original_state(base, table))
    bound = bind(HostModel({"unet": tree2}, naming="ldm"))
    h2 = apply({"unet": bound.views["unet"]}, [path], "fuse", keymap=bound.keymap_for(["unet"]))
    assert h2.unmatched == []
    sd2 = tree2.state_dict()
    assert max(max_rel(sd2[k], v) for k, v in fused.items()) <= 1e-5
    h2.remove()
    assert all(torch.equal(v, original_state(base, table)[k]) for k, v in tree2.state_dict().items())


# ------------------------------------------------------------------------------------------
# older PEFT layouts: 0.14/0.15 (oft_r + oft_s, input rotation) and <= 0.13 (oft_r, output rotation)

def _rename(src, dst, mapping, cfg):
    from safetensors.torch import load_file, save_file

    sd = load_file(src / "adapter_model.safetensors")
    out = {}
    for k, v in sd.items():
        for old, (new, fn) in mapping.items():
            if k.endswith("." + old):
                out[k[: -len(old)] + new] = fn(v)
    assert len(out) == len(sd)
    dst.mkdir()
    save_file(out, dst / "adapter_model.safetensors")
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst / "adapter_model.safetensors"


def test_peft_014_layout_equals_peft_boft_forward(sd_base, tmp_path):
    """PEFT 0.14/0.15 OFT is ``W' = diag(oft_s) W blockdiag(R)^T`` with R the Cayley map of the
    half skew part of each oft_r block: PEFT's one-stage BOFT with boft_R = oft_r[None]. A BOFT
    file renamed to the old OFT names must reproduce PEFT BOFT's forward (convs included)."""
    unet, te = load_pipeline(sd_base)
    unet = _peft_attach(unet, peft.BOFTConfig(boft_block_size=4, target_modules=UNET_ATTN + UNET_1X1 + UNET_3X3),
                        6, tmp_path / "u", scale=0.1)
    te = _peft_attach(te, peft.BOFTConfig(boft_block_size=4, target_modules=TE_TARGETS), 7, tmp_path / "t", scale=0.1)
    want_unet, want_te = unet_out(unet), te_out(te)
    mapping = {"boft_R": ("oft_r", lambda v: v[0].contiguous()), "boft_s": ("oft_s", lambda v: v.reshape(-1, 1))}
    cfg = {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "coft": False, "eps": 6e-5}
    files = [(_rename(tmp_path / d, tmp_path / f"{d}_old", mapping, cfg), 1.0) for d in ("u", "t")]
    g = next(iter(load_lora(files[0][0]).groups.values()))
    assert g.adapter.type_name == "peft_oft" and g.adapter.describe()["layout"].startswith("peft 0.14")
    reports = merge(sd_base, files, tmp_path / "merged")
    assert [r.unmatched for r in reports] == [[], []]
    unet2, te2 = load_pipeline(tmp_path / "merged")
    e_unet, e_te = max_rel_err(unet_out(unet2), want_unet), max_rel_err(te_out(te2), want_te)
    print(f"peft 0.14 layout: unet {e_unet:.2e} te {e_te:.2e}")
    assert e_unet <= 1e-5 and e_te <= 1e-5
    unet0, te0 = load_pipeline(sd_base)
    assert max_rel_err(unet_out(unet0), want_unet) > 1e-3


def test_peft_013_layout_equals_lycoris_diag_oft():
    """PEFT <= 0.13 rotates output rows by R = (I - S)(I + S)^-1, S = (A - A^T)/2: LyCORIS's
    diag-OFT ((I + Q)(I - Q)^-1, Q = B - B^T) with B = -A/2. Checked against lycoris-lora's
    own diff_weight, on a Linear and a 3x3 conv; and the block diagonal is cut to the rows
    when b does not divide them (checked against the explicit matrix)."""
    lycoris_oft = pytest.importorskip("lycoris.functional.diag_oft")
    from lora_ext.adapters.peft_oft import PeftOFTOutputAdapter

    g = torch.Generator().manual_seed(9)
    for shape, k, b in (((12, 7), 3, 4), ((8, 4, 3, 3), 2, 4)):
        a = torch.randn(k, b, b, generator=g) * 0.3
        w = torch.randn(*shape, generator=g)
        got = PeftOFTOutputAdapter({"oft_r": a}).delta(w)
        want = lycoris_oft.diff_weight(w, -a / 2, None, constraint=0, backend="torch")
        assert max_rel(got, want.reshape(w.shape)) <= 1e-5
        assert got.abs().max() > 1e-2
    # out = 10 with r = 4 blocks of ceil(10/4) = 3: the last block is cut
    a = torch.randn(4, 3, 3, generator=g) * 0.3
    w = torch.randn(10, 5, generator=g)
    s = (a - a.transpose(1, 2)) / 2
    eye = torch.eye(3)
    r = torch.stack([(eye - q) @ torch.linalg.inv(eye + q) for q in s])
    full = torch.block_diag(*r)[:10, :10]
    adapter = PeftOFTOutputAdapter({"oft_r": a})
    assert adapter.fits((10, 5)) and not adapter.fits((13, 5))
    assert max_rel(adapter.delta(w), full.T @ w - w) <= 1e-5
    # output rotation mixes the rows inside a block: fused parts split only along block edges
    assert not adapter.rows_independent((10, 5), 2)
    assert not PeftOFTOutputAdapter({"oft_r": a[:2]}).rows_independent((6, 5), (2, 4))
    assert PeftOFTOutputAdapter({"oft_r": a[:2]}).rows_independent((6, 5), 2)


_OLD_PEFT_CHILD = r'''
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch
from tiny_models import te_out, tiny_text_encoder, tiny_unet, unet_out
out_dir, configs, old = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
tiny_unet(), tiny_text_encoder()  # diffusers / transformers bind the installed peft first
for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
    del sys.modules[name]
sys.path.insert(0, old)
import peft
assert os.path.abspath(peft.__file__).startswith(os.path.abspath(old)), peft.__file__
for case, (ukw, tkw) in configs.items():
    outs = {}
    for comp, kw, make, run, seed in (("unet", ukw, tiny_unet, unet_out, 1), ("te", tkw, tiny_text_encoder, te_out, 2)):
        pm = peft.get_peft_model(make(), peft.OFTConfig(**kw))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "oft_s" in n:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                elif "oft_r" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        pm.save_pretrained(os.path.join(out_dir, case, comp))  # before the forward: coft projects in it
        outs[comp] = run(pm.base_model.model)
    torch.save(outs, os.path.join(out_dir, case, "want.pt"))
print(peft.__version__)
'''
OLD_CASES = {
    "0.13": {"r4": ({"r": 4, "target_modules": UNET_ATTN + UNET_1X1 + ["conv1"]},
                    {"r": 4, "target_modules": TE_TARGETS}),
             "r3-share-coft": ({"r": 3, "block_share": True, "coft": True, "eps": 0.005,
                                "target_modules": ["to_q", "to_k", "proj_in", "conv1"]},
                               {"r": 6, "coft": True, "eps": 0.01, "target_modules": ["q_proj", "fc2"]})},
    "0.14": {"b4": ({"r": 0, "oft_block_size": 4, "target_modules": UNET_ATTN + UNET_1X1 + ["conv1"]},
                    {"r": 0, "oft_block_size": 4, "target_modules": TE_TARGETS}),
             "share-coft": ({"r": 0, "oft_block_size": 4, "block_share": True, "coft": True, "eps": 0.02,
                             "target_modules": ["to_q", "to_k", "proj_in", "conv1"]},
                            {"r": 2, "oft_block_size": 0, "coft": True, "eps": 0.01,
                             "target_modules": ["q_proj", "fc2"]})},
}


def _old_peft_dirs():
    import os

    return [d for d in os.environ.get("LORA_EXT_OLD_PEFT", "").split(os.pathsep) if d]


@pytest.mark.parametrize("old", _old_peft_dirs() or [None])
def test_old_peft_versions_opt_in(sd_base, tmp_path, old):
    """Opt-in: ``LORA_EXT_OLD_PEFT`` lists folders holding an older ``peft`` package (an
    unpacked wheel of peft 0.13.x or 0.14/0.15.x, which import fine beside torch 2.13); the
    old PEFT writes and runs the adapters in a subprocess, lora-ext merges its files."""
    import os
    import subprocess
    import sys

    if old is None:
        pytest.skip("set LORA_EXT_OLD_PEFT to folders with peft 0.13 / 0.14 packages")
    version = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import peft; "
                              "print(peft.__version__)", old], capture_output=True, text=True).stdout.strip()
    key = "0.13" if version.startswith(("0.10", "0.11", "0.12", "0.13")) else "0.14"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=tests_dir)
    run = subprocess.run([sys.executable, "-c", _OLD_PEFT_CHILD, str(tmp_path), json.dumps(OLD_CASES[key]), old],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for case in OLD_CASES[key]:
        want = torch.load(tmp_path / case / "want.pt")
        files = [(tmp_path / case / comp / "adapter_model.safetensors", 1.0) for comp in ("unet", "te")]
        layout = next(iter(load_lora(files[0][0]).groups.values())).adapter.describe()["layout"]
        assert layout.startswith("peft <=0.13" if key == "0.13" else "peft 0.14")
        reports = merge(sd_base, files, tmp_path / f"m_{case}")
        assert [r.unmatched for r in reports] == [[], []]
        unet2, te2 = load_pipeline(tmp_path / f"m_{case}")
        e_unet, e_te = max_rel_err(unet_out(unet2), want["unet"]), max_rel_err(te_out(te2), want["te"])
        print(f"peft {version} {case}: unet {e_unet:.2e} te {e_te:.2e}")
        assert e_unet <= 1e-5 and e_te <= 1e-5
        unet0, te0 = load_pipeline(sd_base)
        assert max_rel_err(unet_out(unet0), want["unet"]) > 1e-3 and max_rel_err(te_out(te0), want["te"]) > 1e-3


def test_peft_oft_on_token_embedding(sd_base, tmp_path):
    """OFT on an nn.Embedding (``oft_embedding_R.weight``) rotates the looked-up vectors:
    W' = W blockdiag(R). The CLIP token table with PEFT's adapter, merged, equals PEFT."""
    _, te = load_pipeline(sd_base)
    te = _peft_attach(te, peft.OFTConfig(oft_block_size=4, r=0, target_modules=["token_embedding", "q_proj"]), 8,
                      tmp_path / "t", scale=0.2)
    want = te_out(te)
    path = tmp_path / "t" / "adapter_model.safetensors"
    types = {g.adapter.type_name for g in load_lora(path).groups.values()}
    groups = load_lora(path).groups
    emb = [g for p, g in groups.items() if p.endswith("token_embedding")]
    assert types == {"peft_oft"} and len(emb) == 1
    assert emb[0].adapter.delta(torch.randn(64, 16)).abs().max() > 1e-2  # a real rotation, not the init
    reports = merge(sd_base, [(path, 1.0)], tmp_path / "merged")
    assert reports[0].unmatched == [] and reports[0].applied == 1 + 2
    _, te2 = load_pipeline(tmp_path / "merged")
    err = max_rel_err(te_out(te2), want)
    print(f"token embedding: {err:.2e}")
    assert err <= 1e-5
    _, te0 = load_pipeline(sd_base)
    assert max_rel_err(te_out(te0), want) > 1e-3
