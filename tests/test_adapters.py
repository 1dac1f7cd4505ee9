"""Adapter types against the trainers' own forward passes (lycoris-lora 4.1.3, peft).

Each oracle case builds the peer's module around a tiny Linear / 1x1 conv / 3x3 conv,
randomises every parameter (the zero-initialised ones too, alpha != rank), runs the peer's
forward at multiplier 1, then feeds our adapter the tensors the peer writes to its state dict
and checks ``layer(x; W + delta(W), b + bias_delta)`` against it. The error is measured
relative to the adapter's contribution (``ref - base``), which is stricter than relative to
the output. lycoris's own merge helpers are never used as the reference (they apply
alpha/rank twice for LoHa/LoKr).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_ext import plugins
from lora_ext.adapter import COMMON_NAMES
from lora_ext.errors import AdapterError
from lora_ext.adapters.dora import with_dora
from lora_ext.adapters._common import shapes_compatible

lycoris_modules = pytest.importorskip("lycoris.modules")

TOL = 1e-5
IN, OUT = 24, 32


# --- helpers ---------------------------------------------------------------------------------
def layers():
    torch.manual_seed(0)
    return {
        "lin": nn.Linear(IN, OUT),
        "c1": nn.Conv2d(IN, OUT, 1),
        "c3": nn.Conv2d(IN, OUT, 3, padding=1),
    }


def make_layer(kind):
    return layers()[kind]


def make_input(layer, gen):
    if isinstance(layer, nn.Linear):
        return torch.randn(5, layer.in_features, generator=gen)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, generator=gen)
    if isinstance(layer, nn.GroupNorm):
        return torch.randn(2, layer.num_channels, 4, 4, generator=gen)
    return torch.randn(5, *layer.normalized_shape, generator=gen)


def run(layer, x, weight, bias):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)


@torch.no_grad()
def randomise(module, gen, std=0.3, layer=None):
    """Every parameter random (also the zero-initialised 'up' halves); dora_scale near |W|."""
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("dora_scale"):
            p.copy_(p * (1 + 0.3 * noise).abs() + 0.05)
        elif name.endswith("rescale"):
            p.copy_(1 + 0.2 * noise)
        elif name.endswith("oft_blocks"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(std * noise)


def build(tensors, **dora_kw):
    """What the core does: exactly one registered type claims the names; DoRA wraps it."""
    names = frozenset(tensors)
    claimers = [t for t in plugins.adapter_types() if t.claims(names)]
    assert len(claimers) == 1, f"{sorted(names)} claimed by {[t.type_name for t in claimers]}"
    inner = {k: v for k, v in tensors.items() if k != "dora_scale"}
    adapter = claimers[0].from_tensors(inner)
    if "dora_scale" in tensors:
        adapter = with_dora(adapter, tensors["dora_scale"], **dora_kw)
    return adapter


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


ERRORS: dict = {}


@torch.no_grad()
def compare(case, layer, ref_fn, tensors, seed=1, adapter=None, **dora_kw):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(layer, gen)
    w = layer.weight.detach().clone()
    b = None if layer.bias is None else layer.bias.detach().clone()
    ref = ref_fn(x)
    base = run(layer, x, w, b)
    adapter = adapter or build(tensors, **dora_kw)
    assert adapter.fits(tuple(w.shape))
    d = adapter.delta(w)
    assert d.dtype == torch.float32 and d.shape == w.shape
    bd = adapter.bias_delta(b, w)
    if bd is not None:
        b = (torch.zeros(OUT) if b is None else b) + bd
    ours = run(layer, x, w + d, b)
    contrib = (ref - base).abs().max()
    assert contrib > 1e-3, "the reference adapter does nothing: the case tests nothing"
    err = float((ours - ref).abs().max() / contrib)
    ERRORS[case] = err
    print(f"ORACLE {case}: max rel err {err:.2e} (contribution/base {float(contrib / base.abs().max()):.2f})")
    assert err <= TOL, f"{case}: relative error {err:.2e}"
    return adapter


def lyco_case(case, cls, kind, seed=1, tweak=None, **kw):
    layer = make_layer(kind)
    mod = cls("t", layer, multiplier=1.0, **kw)
    randomise(mod, torch.Generator().manual_seed(seed + 100))
    mod.eval()
    tensors = state(mod)
    if tweak:
        tweak(mod, tensors)
    return compare(case, layer, mod, tensors, seed), tensors, mod


# --- LoCon ----------------------------------------------------------------------------------
LOCON = [
    ("lin", {}),
    ("c1", {}),
    ("c3", {}),
    ("c3", {"use_tucker": True}),
    ("lin", {"rs_lora": True}),
    ("c3", {"use_scalar": True}),
]


@pytest.mark.parametrize("kind,kw", LOCON, ids=[f"{k}-{'-'.join(kw) or 'plain'}" for k, kw in LOCON])
def test_locon(kind, kw):
    adapter, tensors, mod = lyco_case(f"locon-{kind}-{kw}", lycoris_modules.LoConModule, kind,
                                      lora_dim=4, alpha=3, **kw)
    assert adapter.type_name == "lora" and adapter.rank == 4
    if kw.get("use_tucker"):
        assert "lora_mid.weight" in tensors
    # the low-rank view reproduces the delta exactly (mid folded into down)
    up, down, scale = adapter.lowrank()
    w = mod.org_module[0].weight.detach()
    lr = (scale * up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    torch.testing.assert_close(lr, adapter.delta(w), rtol=1e-5, atol=1e-6)


def test_lora_linear_factors_on_1x1_conv_and_back():
    """Linear-shaped factors on a 1x1 conv (and 1x1 conv factors on a Linear) give the same delta."""
    layer = make_layer("c1")
    mod = lycoris_modules.LoConModule("t", layer, multiplier=1.0, lora_dim=4, alpha=3)
    randomise(mod, torch.Generator().manual_seed(30))
    t = state(mod)
    flat = dict(t, **{k: t[k].flatten(1) for k in ("lora_up.weight", "lora_down.weight")})
    adapter = compare("locon-c1-2d-factors", layer, mod, flat)
    assert adapter.weight_shape() == (OUT, IN) and adapter.fits((OUT, IN, 1, 1))
    lin = nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight.copy_(layer.weight.flatten(1))
        lin.bias.copy_(layer.bias)
    compare("locon-lin-4d-factors", lin,
            lambda x: mod(x[:, :, None, None]).flatten(1), t)


DORA = [("lin", True), ("lin", False), ("c3", True), ("c3", False), ("c1", False)]


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("kind,on_out", DORA, ids=[f"{k}-{'out' if o else 'in'}" for k, o in DORA])
def test_dora_lycoris(algo, kind, on_out):
    cls = {"locon": lycoris_modules.LoConModule, "loha": lycoris_modules.LohaModule,
           "lokr": lycoris_modules.LokrModule}[algo]
    kw = {"lora_dim": 2 if algo == "lokr" else 4, "alpha": 3}
    adapter, tensors, _ = lyco_case(f"dora-{algo}-{kind}-{'out' if on_out else 'in'}", cls, kind,
                                    weight_decompose=True, wd_on_out=on_out, **kw)
    assert adapter.type_name.endswith("+dora")
    expected = (OUT, 1) if on_out else (1, IN)
    assert tuple(tensors["dora_scale"].shape[:2]) == expected


def test_dora_locon_tucker():
    lyco_case("dora-locon-c3-tucker", lycoris_modules.LoConModule, "c3", lora_dim=4, alpha=3,
              use_tucker=True, weight_decompose=True)


# --- LoHa ------------------------------------------------------------------------------------
LOHA = [("lin", {}), ("c1", {}), ("c3", {}), ("c3", {"use_tucker": True}), ("lin", {"rs_lora": True})]


@pytest.mark.parametrize("kind,kw", LOHA, ids=[f"{k}-{'-'.join(kw) or 'plain'}" for k, kw in LOHA])
def test_loha(kind, kw):
    adapter, tensors, _ = lyco_case(f"loha-{kind}-{kw}", lycoris_modules.LohaModule, kind,
                                    lora_dim=4, alpha=3, **kw)
    assert adapter.type_name == "loha" and adapter.rank == 4
    if kw.get("use_tucker"):
        assert "hada_t1" in tensors and adapter.weight_shape() == (OUT, IN, 3, 3)
    if kind == "c3" and not kw:
        # LyCORIS folds the kernel into the in axis: the shape still fits the conv
        assert adapter.weight_shape() == (OUT, IN * 9) and adapter.fits((OUT, IN, 3, 3))
        assert not adapter.fits((OUT, IN + 1, 3, 3))


# --- LoKr ------------------------------------------------------------------------------------
def _alpha(value):
    def tweak(mod, tensors):
        tensors["alpha"] = torch.tensor(float(value))
    return tweak


LOKR = [
    # (id, kind, kwargs, keys that must be present, expected scale)
    ("lin-w2lowrank", "lin", {"lora_dim": 2, "alpha": 3}, {"lokr_w1", "lokr_w2_a"}, 1.5),
    ("lin-both-lowrank", "lin", {"lora_dim": 1, "alpha": 3, "decompose_both": True}, {"lokr_w1_a", "lokr_w2_a"}, 3.0),
    ("lin-w1lowrank-w2full", "lin", {"lora_dim": 3, "alpha": 2, "decompose_both": True,
                                     "unbalanced_factorization": True}, {"lokr_w1_a", "lokr_w2"}, 2 / 3),
    ("lin-full", "lin", {"lora_dim": 8, "alpha": 3}, {"lokr_w1", "lokr_w2"}, 1.0),
    ("c1", "c1", {"lora_dim": 2, "alpha": 3}, {"lokr_w1", "lokr_w2_a"}, 1.5),
    ("c3", "c3", {"lora_dim": 2, "alpha": 3}, {"lokr_w1", "lokr_w2_a"}, 1.5),
    ("c3-tucker", "c3", {"lora_dim": 2, "alpha": 3, "use_tucker": True}, {"lokr_t2"}, 1.5),
    ("c3-tucker-both", "c3", {"lora_dim": 1, "alpha": 5, "use_tucker": True, "decompose_both": True},
     {"lokr_t2", "lokr_w1_a"}, 5.0),
    ("c3-full", "c3", {"lora_dim": 8, "alpha": 3}, {"lokr_w1", "lokr_w2"}, 1.0),
    ("lin-rslora", "lin", {"lora_dim": 2, "alpha": 3, "rs_lora": True}, {"lokr_w2_a"}, 3 / math.sqrt(2)),
]


@pytest.mark.parametrize("case,kind,kw,keys,scale", LOKR, ids=[c[0] for c in LOKR])
def test_lokr(case, kind, kw, keys, scale):
    adapter, tensors, mod = lyco_case(f"lokr-{case}", lycoris_modules.LokrModule, kind, **kw)
    assert keys <= set(tensors), sorted(tensors)
    assert adapter.scale() == pytest.approx(scale) == pytest.approx(mod.scale)


def test_lokr_full_matrix_ignores_alpha():
    """Both factors full: LyCORIS forces scale 1, whatever alpha a file carries."""
    lyco_case("lokr-lin-full-alpha7", lycoris_modules.LokrModule, "lin", lora_dim=8, alpha=3, tweak=_alpha(7))


# --- IA3, OFT, BOFT, GLoRA, full, norm -------------------------------------------------------
IA3 = [("lin", False), ("lin", True), ("c3", False), ("c3", True)]


@pytest.mark.parametrize("kind,on_input", IA3, ids=[f"{k}-{'in' if i else 'out'}" for k, i in IA3])
def test_ia3(kind, on_input):
    adapter, tensors, _ = lyco_case(f"ia3-{kind}-{'in' if on_input else 'out'}", lycoris_modules.IA3Module,
                                    kind, train_on_input=on_input)
    assert adapter.type_name == "ia3" and adapter.on_input == on_input


OFT = [("lin", 0, False), ("lin", 0.025, True), ("c3", 0.025, False), ("c1", 0, True), ("c3", 0.5, True)]


@pytest.mark.parametrize("kind,constraint,rescaled", OFT, ids=[f"{k}-c{c}-{'rs' if r else 'plain'}" for k, c, r in OFT])
def test_diag_oft(kind, constraint, rescaled):
    adapter, tensors, mod = lyco_case(f"oft-{kind}-c{constraint}-{rescaled}", lycoris_modules.DiagOFTModule, kind,
                                      lora_dim=4, constraint=constraint, rescaled=rescaled)
    assert adapter.type_name == "oft" and tensors["oft_blocks"].dim() == 3
    if constraint:  # the constraint actually bites in these cases
        q = tensors["oft_blocks"] - tensors["oft_blocks"].transpose(1, 2)
        assert (q.norm() > constraint * OUT) == (constraint < 0.1)


BOFT = [("lin", 4, 0, False), ("lin", 4, 0.05, True), ("c3", 2, 0, False), ("c1", 4, 0, True), ("c3", 8, 0.5, True)]


@pytest.mark.parametrize("kind,dim,constraint,rescaled", BOFT,
                         ids=[f"{k}-b{d}-c{c}-{'rs' if r else 'plain'}" for k, d, c, r in BOFT])
def test_boft(kind, dim, constraint, rescaled):
    adapter, tensors, _ = lyco_case(f"boft-{kind}-b{dim}-c{constraint}-{rescaled}", lycoris_modules.ButterflyOFTModule,
                                    kind, lora_dim=dim, constraint=constraint, rescaled=rescaled)
    assert adapter.type_name == "boft" and tensors["oft_blocks"].dim() == 4
    if constraint:
        q = tensors["oft_blocks"] - tensors["oft_blocks"].transpose(-1, -2)
        assert (q.norm() > constraint * OUT) == (constraint < 0.1)


@pytest.mark.parametrize("kind", ["lin", "c1", "c3"])
def test_glora(kind):
    adapter, _, _ = lyco_case(f"glora-{kind}", lycoris_modules.GLoRAModule, kind, lora_dim=4, alpha=3)
    assert adapter.type_name == "glora" and adapter.layout == "lycoris2" and adapter.rank == 4


def test_glora_rs_lora():
    """lycoris stores GLoRA's plain alpha under rs_lora; the flag from the metadata restores it."""
    layer = make_layer("lin")
    mod = lycoris_modules.GLoRAModule("t", layer, multiplier=1.0, lora_dim=4, alpha=3, rs_lora=True)
    randomise(mod, torch.Generator().manual_seed(22))
    tensors = state(mod)
    adapter = build(tensors).with_rs_lora()
    compare("glora-lin-rs_lora", layer, mod, tensors, adapter=adapter)


@pytest.mark.parametrize("kind", ["lin", "c3"])
def test_full(kind):
    """As in training: apply_to() folds W into the module, whose weight then trains; the file
    holds weight - W. (Before apply_to, lycoris 4.1.3's state_dict would subtract W from a
    weight that is already the diff.)"""
    layer = make_layer(kind)
    orig = make_layer(kind)  # same seed: a pristine copy, apply_to() takes the weight off `layer`
    mod = lycoris_modules.FullModule("t", layer, multiplier=1.0)
    mod.apply_to()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(21)
        mod.weight.add_(0.1 * torch.randn(mod.weight.shape, generator=gen))
        mod.bias.add_(0.1 * torch.randn(mod.bias.shape, generator=gen))
    tensors = state(mod)
    assert set(tensors) == {"diff", "diff_b"}
    adapter = compare(f"full-{kind}", orig, mod, tensors)
    assert adapter.type_name == "full"


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm"])
def test_norm(norm):
    torch.manual_seed(0)
    layer = nn.LayerNorm(OUT) if norm == "layernorm" else nn.GroupNorm(4, OUT)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    mod = lycoris_modules.NormModule("t", layer, 1.0)
    randomise(mod, torch.Generator().manual_seed(5))
    adapter = compare(f"norm-{norm}", layer, mod, state(mod))
    assert adapter.type_name == "norm"


# --- independent oracles for layouts lycoris 4.1.3 no longer writes --------------------------
def test_glora_old_layout():
    """LyCORIS 1.x GLoRA: y = W(x + s*a2(a1(x))) + b + s*b2(b1(x)) (a1: in->r, a2: r->in, ...)."""
    gen = torch.Generator().manual_seed(3)
    layer = make_layer("lin")
    r, alpha = 4, 2.0
    t = {"a1.weight": torch.randn(r, IN, generator=gen) * 0.3, "a2.weight": torch.randn(IN, r, generator=gen) * 0.3,
         "b1.weight": torch.randn(r, IN, generator=gen) * 0.3, "b2.weight": torch.randn(OUT, r, generator=gen) * 0.3,
         "alpha": torch.tensor(alpha)}
    s = alpha / r

    def old_forward(x):
        a = F.linear(F.linear(x, t["a1.weight"]), t["a2.weight"])
        bb = F.linear(F.linear(x, t["b1.weight"]), t["b2.weight"])
        return layer(x + s * a) + s * bb

    adapter = compare("glora-old-lin", layer, old_forward, t)
    assert adapter.layout == "old" and adapter.rank == r


def _orthogonal_blocks(k, b, gen):
    q, _ = torch.linalg.qr(torch.randn(k, b, b, generator=gen))
    return q


def test_oft_diag_old():
    """Old LyCORIS ``oft_diag`` is the rotation itself: W' = einsum('knm,kn...->km...', R, W)."""
    gen = torch.Generator().manual_seed(4)
    layer = make_layer("c3")
    rot = _orthogonal_blocks(8, 4, gen)

    def ref(x):
        w = layer.weight.detach()
        w2 = torch.einsum("knm,kn...->km...", rot, w.reshape(8, 4, *w.shape[1:])).reshape(w.shape)
        return run(layer, x, w2, layer.bias)

    assert build({"oft_diag": rot}).type_name == "oft_diag"
    compare("oft_diag-c3", layer, ref, {"oft_diag": rot})


@pytest.mark.parametrize("alpha", [0.03, 0.0, 10.0])
def test_oft_kohya_flavour(alpha):
    """kohya networks.oft: y = (W x + b) @ blockdiag(R), Q clamped by (min(|Q|,c)+1e-8)/(|Q|+1e-8)."""
    gen = torch.Generator().manual_seed(6)
    layer = make_layer("lin")
    blocks = 0.1 * torch.randn(4, 8, 8, generator=gen)
    t = {"oft_blocks": blocks, "alpha": torch.tensor(alpha)}

    def kohya_forward(x):
        q = blocks - blocks.transpose(1, 2)
        n = torch.norm(q.flatten())
        q = q * ((torch.clamp(n, max=alpha * OUT) + 1e-8) / (n + 1e-8))
        eye = torch.eye(8).unsqueeze(0).repeat(4, 1, 1)
        rot = torch.block_diag(*torch.matmul(eye + q, (eye - q).inverse()))
        return layer(x) @ rot

    adapter = build(t).with_flavour("kohya")
    if alpha == 0.0:  # kohya: constraint 0 clamps Q to ~0, the rotation is the identity
        assert adapter.delta(layer.weight.detach()).abs().max() < 1e-6
        return
    compare(f"oft-kohya-lin-a{alpha}", layer, kohya_forward, t, adapter=adapter)


# --- PEFT --------------------------------------------------------------------------------------
class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(IN, OUT)
        self.conv = nn.Conv2d(IN, OUT, 3, padding=1)


PEFT = [("lin", {}), ("conv", {}), ("lin", {"use_dora": True}), ("conv", {"use_dora": True}),
        ("lin", {"lora_bias": True}), ("conv", {"lora_bias": True}), ("lin", {"use_rslora": True}),
        ("conv", {"use_dora": True, "flat": False})]


@pytest.mark.parametrize("kind,kw", PEFT, ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'plain'}" for k, kw in PEFT])
def test_peft_lora(kind, kw):
    peft = pytest.importorskip("peft")
    kw = dict(kw)
    flat = kw.pop("flat", True)
    r, lora_alpha = 4, 3.0
    model = peft.inject_adapter_in_model(
        peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["lin", "conv"], **kw), _Two())
    layer = getattr(model, kind)
    randomise(layer, torch.Generator().manual_seed(8), std=0.3)
    with torch.no_grad():
        for mag in layer.lora_magnitude_vector.values():
            w = layer.base_layer.weight
            mag.weight.copy_(w.reshape(OUT, -1).norm(dim=1).reshape(mag.weight.shape)
                             * (1 + 0.3 * torch.randn(mag.weight.shape, generator=torch.Generator().manual_seed(9))))
    model.eval()
    # what the core's renaming hands the adapter (lora_A -> lora_down, magnitude -> dora_scale)
    sd = state(layer)
    t = {"lora_down.weight": sd["lora_A.default.weight"], "lora_up.weight": sd["lora_B.default.weight"],
         "alpha": torch.tensor(lora_alpha * (math.sqrt(r) if kw.get("use_rslora") else 1.0))}
    if "lora_B.default.bias" in sd:
        t["lora_up.bias"] = sd["lora_B.default.bias"]
    if "lora_magnitude_vector.default.weight" in sd:
        mag = sd["lora_magnitude_vector.default.weight"]
        t["dora_scale"] = mag.reshape(-1) if flat else mag
    adapter = compare(f"peft-{kind}-{kw}{'' if flat else '-rawmag'}", layer.base_layer, layer, t)
    if kw.get("use_dora"):
        assert adapter.lowrank() is None
    else:
        assert adapter.lowrank() is not None


# --- claiming, autodetect, errors ---------------------------------------------------------------
NAME_SETS = {
    "lora": {"lora_up.weight", "lora_down.weight", "alpha"},
    "lora+mid": {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale"},
    "lora+bias": {"lora_up.weight", "lora_down.weight", "lora_up.bias"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "loha+t": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "alpha"},
    "lokr-a": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "lokr-t": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"},
    "ia3": {"weight", "on_input"},
    "oft": {"oft_blocks", "rescale", "alpha"},
    "oft_diag": {"oft_diag"},
    "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"},
    "full": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm"},
}


@pytest.mark.parametrize("key", sorted(NAME_SETS))
def test_claims_exactly_one(key):
    names = frozenset(NAME_SETS[key])
    claimers = [t.type_name for t in plugins.adapter_types() if t.claims(names)]
    assert claimers == [key.split("+")[0].split("-")[0]]


@pytest.mark.parametrize("names", [
    {"lokr_w1", "lokr_w1_a", "lokr_w2"}, {"lokr_w1"}, {"lokr_w1", "lokr_w2", "lokr_t2"},
    {"lora_up.weight"}, {"hada_w1_a", "hada_w1_b"}, {"alpha"}, {"foo", "bar"}, {"lora_up.weight", "lora_down.weight", "diff"},
])
def test_claims_none(names):
    assert not [t.type_name for t in plugins.adapter_types() if t.claims(frozenset(names))]


def explain(tensors, target):
    hook = plugins.plugin_manager().hook.lora_ext_explain_group
    return hook(names=frozenset(tensors), tensors=tensors, target_shape=target)


def test_autodetect_lowrank_renamed():
    gen = torch.Generator().manual_seed(11)
    up, down = torch.randn(OUT, 4, generator=gen), torch.randn(4, IN, generator=gen)
    w = torch.randn(OUT, IN, generator=gen)
    for names in (("A", "B"), ("B", "A")):  # either name order: roles come from shapes
        t = {names[0]: up, names[1]: down, "alpha": torch.tensor(2.0)}
        a = explain(t, (OUT, IN))
        assert a is not None and a.weight_shape() == (OUT, IN)
        torch.testing.assert_close(a.delta(w), up @ down * 0.5)
    # a 4-D pair on a 3x3 conv, and a 2-D pair on a 1x1 conv
    up4, down4 = torch.randn(OUT, 4, 1, 1, generator=gen), torch.randn(4, IN, 3, 3, generator=gen)
    a = explain({"x": down4, "y": up4}, (OUT, IN, 3, 3))
    assert a.weight_shape() == (OUT, IN, 3, 3)
    torch.testing.assert_close(a.delta(torch.zeros(OUT, IN, 3, 3)),
                               (up4.flatten(1) @ down4.flatten(1)).reshape(OUT, IN, 3, 3))
    a = explain({"x": down, "y": up}, (OUT, IN, 1, 1))
    assert a.weight_shape() == (OUT, IN, 1, 1)
    # with a dora_scale on top
    a = explain({"x": down, "y": up, "dora_scale": w.norm(dim=1, keepdim=True)}, (OUT, IN))
    assert a is not None and a.type_name == "lora+dora"


def test_autodetect_kron_scale_full():
    gen = torch.Generator().manual_seed(12)
    w1, w2 = torch.randn(4, 4, generator=gen), torch.randn(8, 6, generator=gen)
    w = torch.randn(OUT, IN, generator=gen)
    a = explain({"p": w2, "q": w1}, (OUT, IN))
    assert a is not None and a.type_name == "lokr"
    torch.testing.assert_close(a.delta(w), torch.kron(w1, w2))
    # a 2-D small factor with a 4-D kernel-carrying big one
    w2k = torch.randn(8, 6, 3, 3, generator=gen)
    a = explain({"p": w2k, "q": w1}, (OUT, IN, 3, 3))
    torch.testing.assert_close(a.delta(torch.zeros(OUT, IN, 3, 3)), torch.kron(w1[:, :, None, None], w2k))
    # elementwise scale on the out axis and on the in axis
    s_out, s_in = torch.randn(OUT, generator=gen), torch.randn(1, IN, 1, 1, generator=gen)
    a = explain({"s": s_out}, (OUT, IN))
    torch.testing.assert_close(a.delta(w), w * s_out[:, None])
    wc = torch.randn(OUT, IN, 3, 3, generator=gen)
    a = explain({"s": s_in}, (OUT, IN, 3, 3))
    assert a.weight_shape() == (OUT, IN, 3, 3)
    torch.testing.assert_close(a.delta(wc), wc * s_in)
    # full diff
    diff = torch.randn(OUT, IN, 3, 3, generator=gen)
    a = explain({"d": diff}, (OUT, IN, 3, 3))
    torch.testing.assert_close(a.delta(wc), diff)


def test_autodetect_refuses():
    gen = torch.Generator().manual_seed(13)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    assert explain({"a": r(OUT, 4), "b": r(4, IN)}, None) is None  # no target: never guess
    assert explain({"a": r(OUT, 4), "b": r(4, IN + 1)}, (OUT, IN)) is None  # product does not fit
    assert explain({"a": r(16, 16), "b": r(16, 16)}, (16, 16)) is None  # full-rank square: up/down?
    assert explain({"a": r(4, 4), "b": r(4, 4)}, (16, 16)) is None  # kron of equal shapes: order?
    assert explain({"a": r(8, 4), "b": r(4, 8)}, (32, 32)) is None  # kron orders disagree on roles
    assert explain({"s": r(16)}, (16, 16)) is None  # square weight: out or in axis?
    assert explain({"s": r(7)}, (OUT, IN)) is None
    assert explain({"a": r(OUT, 4), "b": r(4, IN), "c": r(3)}, (OUT, IN)) is None
    assert explain({"d": r(OUT, IN)}, (IN, OUT)) is None


def test_inconsistent_shapes_raise():
    bad = [
        {"lora_up.weight": torch.zeros(OUT, 4), "lora_down.weight": torch.zeros(3, IN)},
        {"lora_up.weight": torch.zeros(OUT, 4, 3, 3), "lora_down.weight": torch.zeros(4, IN)},
        {"lora_up.weight": torch.zeros(OUT, 4), "lora_down.weight": torch.zeros(4, IN, 1, 1),
         "lora_mid.weight": torch.zeros(3, 3, 3, 3)},
        {"hada_w1_a": torch.zeros(OUT, 4), "hada_w1_b": torch.zeros(4, IN),
         "hada_w2_a": torch.zeros(OUT, 4), "hada_w2_b": torch.zeros(4, IN + 1)},
        {"lokr_w1": torch.zeros(4, 4), "lokr_w2_a": torch.zeros(8, 2), "lokr_w2_b": torch.zeros(3, 6)},
        {"oft_blocks": torch.zeros(4, 4, 3)},
        {"oft_blocks": torch.zeros(2, 4, 3, 3)},  # odd butterfly block
        {"a1.weight": torch.zeros(IN, 4), "a2.weight": torch.zeros(4, IN),
         "b1.weight": torch.zeros(OUT, 5), "b2.weight": torch.zeros(4, IN)},
        {"diff": torch.zeros(OUT, IN), "diff_b": torch.zeros(OUT + 1)},
        {"w_norm": torch.zeros(OUT), "b_norm": torch.zeros(OUT - 1)},
        {"weight": torch.zeros(OUT, IN), "on_input": torch.tensor(0)},
    ]
    for t in bad:
        with pytest.raises(AdapterError):
            build(t)
    # a weight the adapter does not fit
    a = build({"lora_up.weight": torch.zeros(OUT, 4), "lora_down.weight": torch.zeros(4, IN)})
    with pytest.raises(AdapterError):
        a.delta(torch.zeros(OUT, IN + 1))
    with pytest.raises(AdapterError):
        with_dora(a, torch.ones(7))
    with pytest.raises(AdapterError):
        build({"weight": torch.zeros(OUT), "on_input": torch.tensor(1)}).delta(torch.zeros(OUT, IN))


def test_dora_axis_hint_on_square_conv():
    """(1, C, 1, 1) on a conv with in == out: LyCORIS per-input unless told it is PEFT's per-output."""
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(8, 8, 3, 3, generator=gen)
    a = build({"lora_up.weight": torch.randn(8, 2, 1, 1, generator=gen),
               "lora_down.weight": torch.randn(2, 8, 3, 3, generator=gen)})
    m = torch.rand(1, 8, 1, 1, generator=gen) + 0.5
    v = w + a.delta(w)
    d_in = with_dora(a, m).delta(w)
    norm_in = v.transpose(0, 1).reshape(8, -1).norm(dim=1).reshape(1, 8, 1, 1)
    torch.testing.assert_close(w + d_in, v * m / (norm_in + torch.finfo(torch.float32).eps))
    d_out = with_dora(a, m, axis="out").delta(w)
    torch.testing.assert_close(w + d_out, v * m.reshape(8, 1, 1, 1) / v.reshape(8, -1).norm(dim=1).reshape(8, 1, 1, 1))


def test_shapes_compatible():
    assert shapes_compatible((OUT, IN), (OUT, IN, 1, 1))
    assert shapes_compatible((OUT, IN, 1, 1), (OUT, IN))
    assert shapes_compatible((OUT, IN * 9), (OUT, IN, 3, 3))
    assert not shapes_compatible((OUT, IN), (OUT, IN, 3, 3))
    assert not shapes_compatible((OUT, IN, 3, 3), (OUT, IN * 9))
    assert not shapes_compatible((OUT, IN), (IN, OUT))


def test_half_precision_inputs_give_fp32_deltas():
    gen = torch.Generator().manual_seed(15)
    t = {"lora_up.weight": torch.randn(OUT, 4, generator=gen).half(),
         "lora_down.weight": torch.randn(4, IN, generator=gen).bfloat16(), "alpha": torch.tensor(2.0).half()}
    w = torch.randn(OUT, IN, generator=gen).half()
    d = build(t).delta(w)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, t["lora_up.weight"].float() @ t["lora_down.weight"].float() * 0.5)


def test_common_names_are_shared():
    assert COMMON_NAMES == {"alpha", "dora_scale"}
