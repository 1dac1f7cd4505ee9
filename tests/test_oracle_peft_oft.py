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
            elif "oft_R" in name or "boft_R" in name:
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
