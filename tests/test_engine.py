"""The apply engine on live tiny models: fuse, on-the-fly, auto, schedules, exact restore.

LoRA files are hand-built kohya tensors for the tiny UNet / CLIP of ``tiny_models`` with
random values for every factor (never the zero-initialised halves), one file per adapter
type. References are computed independently of the engine: the pristine weights plus the
fp32 sum of the adapters' deltas (``lora_ext.deltas``), loaded into a copy of the model.
"""
from __future__ import annotations

import copy
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

import lora_ext
from lora_ext.deltas import binding_deltas
from lora_ext.engine import Handle
from lora_ext.errors import AdapterError, LoraExtError
from lora_ext.network import load_lora
from lora_ext.spec import Keyframes, LoraSpec

from tiny_models import max_rel_err, one_thread_fixture, te_out, tiny_text_encoder, tiny_unet, unet_inputs, unet_out

# Modules of the tiny UNet (block ids from the compvis numbering) and of the tiny CLIP.
LIN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # IN01, (8, 8)
LIN_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # IN01, (8, 16)
FF = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"  # OUT02, (64, 8)
MID_Q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"  # M00, (16, 16)
OUT3_V = "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v"  # OUT03, (8, 8)
PROJ = "down_blocks.0.attentions.0.proj_in"  # IN01, 1x1 conv (8, 8, 1, 1)
SHORT = "down_blocks.1.resnets.0.conv_shortcut"  # IN03, 1x1 conv (16, 8, 1, 1)
C3 = "down_blocks.0.resnets.0.conv1"  # IN01, 3x3 conv (8, 8, 3, 3)
C3_MID = "mid_block.resnets.0.conv1"  # M00, 3x3 (16, 16, 3, 3)
C3_OUT = "up_blocks.0.resnets.0.conv1"  # OUT00, 3x3 (16, 32, 3, 3)
DOWNS = "down_blocks.0.downsamplers.0.conv"  # IN02, 3x3 stride 2
GN = "down_blocks.0.resnets.0.norm1"  # GroupNorm(4, 8)
LN = "down_blocks.0.attentions.0.transformer_blocks.0.norm1"  # LayerNorm(8)
TE_Q = "encoder.layers.0.self_attn.q_proj"
TE_FC1 = "encoder.layers.1.mlp.fc1"

UNET_MODULES = [LIN, LIN_K, FF, MID_Q, OUT3_V, PROJ, SHORT, C3, C3_MID, C3_OUT, DOWNS]


# --- building LoRA files -----------------------------------------------------------------------
def _shape(model, path):
    return tuple(model.get_submodule(path).weight.shape)


def _te_module(te, path):
    try:
        return te.get_submodule(path)
    except AttributeError:
        return te.get_submodule("text_model." + path)


def adapter_tensors(kind, shape, g, *, rank=2, mag=0.1):
    """kohya/LyCORIS tensors of ``kind`` for a weight of ``shape``, all values random."""
    out, inn, *k = shape
    kk = 1
    for d in k:
        kk *= d
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    alpha = torch.tensor(float(rank) * 0.75)
    if kind in ("lora", "lora_bias", "dora"):
        t = {"lora_down.weight": r(rank, inn, *k) * mag,
             "lora_up.weight": r(out, rank, *([1] * len(k))) * mag, "alpha": alpha}
        if kind == "lora_bias":
            t["lora_up.bias"] = r(out) * mag * 0.1
        if kind == "dora":
            t["dora_scale"] = (torch.rand(out, *([1] * (len(shape) - 1)), generator=g) + 0.5)
        return t
    if kind == "loha":
        return {"hada_w1_a": r(out, rank) * mag * 2, "hada_w1_b": r(rank, inn * kk) * mag * 2,
                "hada_w2_a": r(out, rank) * mag * 2, "hada_w2_b": r(rank, inn * kk) * mag * 2, "alpha": alpha}
    if kind == "lokr":
        a = 2 if out % 2 == 0 else 1
        c = 2 if inn % 2 == 0 else 1
        return {"lokr_w1": r(a, c) * mag * 2, "lokr_w2": r(out // a, inn // c, *k) * mag * 2}
    if kind == "ia3":
        return {"weight": r(out) * 0.3}
    if kind == "oft":
        b = 4 if out % 4 == 0 else out
        return {"oft_blocks": r(out // b, b, b) * 0.05, "alpha": torch.tensor(0.0)}
    if kind == "full":
        return {"diff": r(*shape) * mag * 0.1, "diff_b": r(out) * mag * 0.1}
    raise ValueError(kind)


def write_lora(path, entries, seed=0, *, rank=2, mag=0.1):
    """entries: [(component, module path, kind, shape)] -> a kohya-named safetensors file."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for comp, mod, kind, shape in entries:
        prefix = ("lora_unet_" if comp == "unet" else "lora_te_") + mod.replace(".", "_")
        if kind == "norm":
            sd[f"{prefix}.w_norm"] = torch.randn(shape, generator=g) * 0.1
            sd[f"{prefix}.b_norm"] = torch.randn(shape, generator=g) * 0.1
            continue
        for name, t in adapter_tensors(kind, shape, g, rank=rank, mag=mag).items():
            sd[f"{prefix}.{name}"] = t.contiguous()
    save_file(sd, str(path))
    return str(path)


def state_bits(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, ref):
    now = model.state_dict()
    assert now.keys() == ref.keys()
    for k, v in ref.items():
        a, b = now[k], v
        assert a.dtype == b.dtype
        ib = {2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()] if b.is_floating_point() else None
        same = torch.equal(a.view(ib), b.view(ib)) if ib is not None else torch.equal(a, b)
        assert same, f"{k} differs"


def no_hooks(*models):
    return all(not m._forward_hooks for model in models for m in model.modules())


one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def unet0():
    return tiny_unet()


@pytest.fixture(scope="module")
def te0():
    return tiny_text_encoder()


@pytest.fixture
def unet(unet0):
    return copy.deepcopy(unet0)


@pytest.fixture
def te(te0):
    return copy.deepcopy(te0)


def reference(unet, specs, step=None, total=None):
    """A copy of ``unet`` with W0 + sum(s * delta) written in fp32: the independent reference."""
    from lora_ext.arch import table_for_model
    from lora_ext.keys import KeyMap

    ref = copy.deepcopy(unet)
    km = KeyMap({"unet": table_for_model("unet", ref)})
    params = dict(ref.named_parameters())
    acc = {}
    for spec, mult in specs:
        lora = load_lora(spec.path)
        for b in lora.resolve(km).bindings:
            t = b.targets[0]
            s = spec.strength(t.component, t.block, step, total) * mult
            read = lambda tt, p: params.get(f"{tt.module}.{p}")  # noqa: E731
            for tt, (dw, db) in binding_deltas(b, read).items():
                a = acc.setdefault(tt.module, [0, 0])
                a[0] = a[0] + s * dw
                if db is not None:
                    a[1] = a[1] + s * db
    with torch.no_grad():
        for mod, (dw, db) in acc.items():
            w = params[f"{mod}.weight"]
            w.copy_((w.float() + dw).to(w.dtype))
            if not isinstance(db, int):
                b = params[f"{mod}.bias"]
                b.copy_((b.float() + db).to(b.dtype))
    return ref


# --- every type: fuse == on-the-fly == the fp32 reference, restore bit-exact ----------------------
TYPE_CASES = {
    "lora": ("lora", [LIN, LIN_K, FF, PROJ, SHORT]),
    "locon3x3": ("lora", [C3, C3_MID, C3_OUT, DOWNS]),
    "loha": ("loha", [LIN, FF, PROJ, C3]),
    "lokr": ("lokr", [LIN, FF, PROJ, C3]),
    "dora": ("dora", [LIN, FF, C3]),
    "ia3": ("ia3", [LIN, FF, PROJ]),
    "oft": ("oft", [LIN, FF, MID_Q, C3]),
    "full": ("full", [FF, C3]),
    "lora_bias": ("lora_bias", [FF, PROJ, SHORT]),
    "norm": ("norm", [GN, LN]),
}


@pytest.mark.parametrize("case", sorted(TYPE_CASES))
def test_fuse_equals_onthefly(case, unet, tmp_path):
    kind, mods = TYPE_CASES[case]
    path = write_lora(tmp_path / f"{case}.safetensors",
                      [("unet", m, kind, _shape(unet, m)) for m in mods], seed=hash(case) % 1000)
    spec = LoraSpec(case, path=path)
    base = state_bits(unet)
    out0 = unet_out(unet)
    ref = unet_out(reference(unet, [(spec, 0.7)]))
    assert max_rel_err(ref, out0) > 1e-3, "the LoRA does nothing: the case tests nothing"
    outs = {}
    for method in ("fuse", "onthefly"):
        with lora_ext.apply(unet, [(spec, 0.7)], method=method) as h:
            assert h.unmatched == []
            assert h.reports[0].applied == len(mods)
            outs[method] = unet_out(unet)
            if method == "onthefly":
                assert h.stats["writes"] == 0 and h.restore_record_bytes == 0
                assert len(h.modules("onthefly")) == len(mods)
            else:
                assert len(h.modules("fuse")) == len(mods) and no_hooks(unet)
        assert_bit_identical(unet, base)
        assert no_hooks(unet)
    assert max_rel_err(outs["fuse"], ref) <= 1e-5
    assert max_rel_err(outs["onthefly"], ref) <= 1e-5
    assert max_rel_err(outs["onthefly"], outs["fuse"]) <= 1e-5


def test_text_encoder_and_dict_model(unet, te, tmp_path):
    path = write_lora(tmp_path / "both.safetensors", [
        ("unet", LIN, "lora", _shape(unet, LIN)), ("unet", C3, "loha", _shape(unet, C3)),
        ("te", TE_Q, "lora", tuple(_te_module(te, TE_Q).weight.shape)),
        ("te", TE_FC1, "dora", tuple(_te_module(te, TE_FC1).weight.shape))])
    base_u, base_t = state_bits(unet), state_bits(te)
    t0 = te_out(te)
    outs = {}
    for method in ("fuse", "onthefly"):
        with lora_ext.apply({"unet": unet, "te1": te}, [(path, 0.9)], method=method) as h:
            assert h.unmatched == [] and h.reports[0].applied == 4
            outs[method] = (te_out(te), unet_out(unet))
        assert_bit_identical(unet, base_u)
        assert_bit_identical(te, base_t)
    assert max_rel_err(outs["fuse"][0], t0) > 1e-3
    assert max_rel_err(outs["onthefly"][0], outs["fuse"][0]) <= 1e-5
    assert max_rel_err(outs["onthefly"][1], outs["fuse"][1]) <= 1e-5
    # a text encoder on its own is "te1"; the UNet keys are then reported, not dropped
    with lora_ext.apply(te, [(path, 1.0)], method="fuse") as h:
        assert h.reports[0].applied == 2
        assert {u["key"].split(".")[0] for u in h.unmatched} == {
            "lora_unet_" + LIN.replace(".", "_"), "lora_unet_" + C3.replace(".", "_")}
        assert all(u["reason"].startswith("no such module") for u in h.unmatched)
    assert_bit_identical(te, base_t)


def test_unmatched_reported_and_inputs(unet, tmp_path):
    path = write_lora(tmp_path / "odd.safetensors", [("unet", LIN, "lora", _shape(unet, LIN))])
    from safetensors.torch import load_file

    sd = load_file(path)
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.randn(2, 8)
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.randn(8, 2)
    sd["lora_unet_" + FF.replace(".", "_") + ".lora_down.weight"] = torch.randn(2, 5)  # wrong shape
    sd["lora_unet_" + FF.replace(".", "_") + ".lora_up.weight"] = torch.randn(64, 2)
    save_file(sd, path)
    base = state_bits(unet)
    lora = load_lora(path)
    for specs in ([path], [(path, 1.0)], [LoraSpec("odd", path=path)], [lora], [(lora, 0.5)]):
        with lora_ext.apply(unet, specs) as h:
            assert isinstance(h, Handle)
            reasons = {u["key"]: u["reason"] for u in h.unmatched}
            assert len(reasons) == 4
            assert any("no such module" in r for r in reasons.values())
            assert any("shape mismatch" in r for r in reasons.values())
            assert h.reports[0].applied == 1
        assert_bit_identical(unet, base)
    with pytest.raises(LoraExtError, match="path is not set"):
        lora_ext.apply(unet, [LoraSpec("nowhere")])
    with pytest.raises(LoraExtError, match="unknown method"):
        lora_ext.apply(unet, [path], method="bake")
    h = lora_ext.apply(unet, [path])
    h.remove()
    h.remove()  # idempotent
    with pytest.raises(LoraExtError, match="removed"):
        h.update(0, 10)


# --- stacking: many types on one module, any methods, any order = one fp32 sum ----------------------
STACK_KINDS = ["lora", "loha", "lokr", "dora", "ia3", "oft", "full"]


@pytest.fixture
def stack_files(unet, tmp_path):
    mods = [FF, C3, LIN]
    files = {}
    for i, kind in enumerate(STACK_KINDS):
        use = [m for m in mods if not (kind == "full" and m == LIN)]  # to_q has no bias for diff_b
        files[kind] = write_lora(tmp_path / f"s_{kind}.safetensors",
                                 [("unet", m, kind, _shape(unet, m)) for m in use], seed=100 + i)
    return files


def test_stacking_mixed_types_methods_and_orders(unet, stack_files):
    rnd = random.Random(5)
    specs = [(LoraSpec(k, path=p), round(rnd.uniform(-0.8, 1.2), 3)) for k, p in stack_files.items()]
    ref_model = reference(unet, specs)
    ref = unet_out(ref_model)
    base = state_bits(unet)
    fused_weights = None
    for trial in range(4):
        order = specs[:]
        rnd.shuffle(order)
        method = ["fuse", "onthefly", "auto", "fuse"][trial]
        if method == "auto":  # scheduled specs (constant keyframes) run on-the-fly, the rest fused
            order = [(LoraSpec(s.name, path=s.path, unet=Keyframes(((1.0, 0), (1.0, 1)))) if i % 2 else s, m)
                     for i, (s, m) in enumerate(order)]
        with lora_ext.apply(unet, order, method=method) as h:
            out = unet_out(unet)
            if method == "auto":
                assert set(h.placement.values()) == {"fuse", "onthefly"}
            if method == "fuse":
                w = unet.get_submodule(FF).weight.detach().clone()
                if fused_weights is None:
                    fused_weights = w
                else:  # the sum runs in a canonical order: bit-identical whatever the spec order
                    assert torch.equal(w, fused_weights)
                rw = ref_model.get_submodule(FF).weight.detach()
                assert float((w - rw).abs().max()) <= 1e-6 * float(rw.abs().max())
        assert max_rel_err(out, ref) <= 1e-5, method
        assert_bit_identical(unet, base)
        assert no_hooks(unet)


def test_same_lora_twice_adds_strengths(unet, stack_files):
    spec = LoraSpec("lora", path=stack_files["lora"])
    ref = unet_out(reference(unet, [(spec, 0.9)]))
    with lora_ext.apply(unet, [(spec, 0.4), (spec, 0.5)], method="fuse") as h:
        assert max_rel_err(unet_out(unet), ref) <= 1e-5
        assert all(abs(v["lora"] - 0.9) < 1e-12 for v in h.strengths().values())


# --- block and step weights reach exactly the modules and steps they name ----------------------------
BLOCK_MODS = {LIN: "IN01", DOWNS: "IN02", SHORT: "IN03", MID_Q: "M00", C3_OUT: "OUT00", FF: "OUT02",
              OUT3_V: "OUT03"}


def _block_file(unet, te, tmp_path):
    ents = [("unet", m, "lora", _shape(unet, m)) for m in BLOCK_MODS]
    ents.append(("te", TE_Q, "lora", tuple(_te_module(te, TE_Q).weight.shape)))
    return write_lora(tmp_path / "blocks.safetensors", ents, seed=7)


@pytest.mark.parametrize("method", ["fuse", "onthefly"])
def test_block_weights_reach_exactly_their_modules(unet, unet0, te, tmp_path, method):
    path = _block_file(unet, te, tmp_path)
    coarse_in = {f"IN{i:02d}": 0.25 for i in range(12)}  # the parser's expansion of in=0.25
    cases = [
        (LoraSpec("b", path=path, blocks={"IN01": 0.0, "M00": 0.5, "OUT03": 2.0}, unet=0.8, te=0.0),
         lambda blk: 0.8 * {"IN01": 0.0, "M00": 0.5, "OUT03": 2.0}.get(blk, 1.0), 0.0),
        (LoraSpec("b", path=path, blocks={**coarse_in, "M00": 0.0, "BASE": 0.3}, unet=1.0, te=0.5),
         lambda blk: {**coarse_in, "M00": 0.0}.get(blk, 1.0), 0.5 * 0.3),
    ]
    base_u, base_t = state_bits(unet), state_bits(te)
    for spec, want_unet, want_te in cases:
        versions = {n: p._version for n, p in unet.named_parameters()}
        with lora_ext.apply({"unet": unet, "te1": te}, [(spec, 1.0)], method=method) as h:
            got = h.strengths()
            for mod, blk in BLOCK_MODS.items():
                s = want_unet(blk)
                assert got.get(("unet", mod), {}).get("b", 0.0) == pytest.approx(s), (mod, blk)
                changed = unet.get_submodule(mod).weight._version != versions[f"{mod}.weight"]
                assert changed == (s != 0.0 and method == "fuse"), mod
            assert got.get(("te1", TE_Q), {}).get("b", 0.0) == pytest.approx(want_te)
            ref = unet_out(reference(unet0, [(spec, 1.0)]))
            assert max_rel_err(unet_out(unet), ref) <= 1e-5
        assert_bit_identical(unet, base_u)
        assert_bit_identical(te, base_t)


@pytest.mark.parametrize("method", ["fuse", "onthefly", "auto"])
def test_step_weights_reach_exactly_their_steps(unet, unet0, te, tmp_path, method):
    path = _block_file(unet, te, tmp_path)
    total = 6
    ramp = LoraSpec("ramp", path=path, unet=Keyframes(((0.0, 0), (1.0, 4))), te=Keyframes(((1.0, 0.0), (0.0, 1.0))))
    window = LoraSpec("window", path=path, unet=0.5, te=0.0, start=2, stop=4, blocks={"OUT02": 0.0})
    expect = {
        "ramp": lambda t, blk, comp: (min(t / 4, 1.0) if comp == "unet" else 1.0 - t / (total - 1)),
        "window": lambda t, blk, comp: (0.5 if 2 <= t < 4 and comp == "unet" and blk != "OUT02" else 0.0),
    }
    base_u, base_t = state_bits(unet), state_bits(te)
    with lora_ext.apply({"unet": unet, "te1": te}, [ramp, window], method=method) as h:
        for t in range(total):
            h.update(t, total)
            got = h.strengths()
            for name in ("ramp", "window"):
                for mod, blk in list(BLOCK_MODS.items()) + [(TE_Q, "BASE")]:
                    comp = "te1" if mod == TE_Q else "unet"
                    want = expect[name](t, blk, comp)
                    assert got.get((comp, mod), {}).get(name, 0.0) == pytest.approx(want, abs=1e-12), (t, name, mod)
            ref = reference(unet0, [(ramp, 1.0), (window, 1.0)], t, total)
            assert max_rel_err(unet_out(unet), unet_out(ref)) <= 1e-5, t
    assert_bit_identical(unet, base_u)
    assert_bit_identical(te, base_t)
    assert no_hooks(unet, te)


def test_hires_strength(unet, unet0, te, tmp_path):
    path = _block_file(unet, te, tmp_path)
    spec = LoraSpec("h", path=path, unet=1.0, hr=0.25)
    with lora_ext.apply(unet, [spec], method="fuse") as h:
        h.update(0, 4)
        assert h.strengths()[("unet", LIN)]["h"] == 1.0
        h.update(0, 4, hires=True)
        assert h.strengths()[("unet", LIN)]["h"] == 0.25
        assert max_rel_err(unet_out(unet), unet_out(reference(unet0, [(spec, 0.25)]))) <= 1e-5


# --- auto: constant fused; scheduled per LoRA, on-the-fly or re-fused, by cost ------------------------
def test_auto_rule_and_results(unet, unet0, te, tmp_path):
    path = _block_file(unet, te, tmp_path)
    total = 40
    const = LoraSpec("const", path=path, unet=0.6)
    late = LoraSpec("late", path=path, unet=0.7, start=20)  # one change in the run
    ramp = LoraSpec("ramp", path=path, unet=Keyframes(((0.0, 0), (1.0, total - 1))))  # changes every step
    base = state_bits(unet)
    with lora_ext.apply(unet, [const, late, ramp], method="auto") as h:
        assert h.placement == {"const": "fuse", "late": "onthefly", "ramp": "onthefly"}
        for t in range(total):
            h.update(t, total)
            if t in (0, 1, 19, 20, 21, 39):
                ref = reference(unet0, [(const, 1), (late, 1), (ramp, 1)], t, total)
                assert max_rel_err(unet_out(unet), unet_out(ref)) <= 1e-5, t
            else:
                unet_out(unet)
            if t >= 1:
                assert h.placement == {"const": "fuse", "late": "fuse", "ramp": "onthefly"}, h.placement_reasons
        writes = h.stats["writes"]
    assert_bit_identical(unet, base)
    # "late" went to the weights once (step 1: off; step 20: on), "const" once at apply
    assert writes <= 3 * len(BLOCK_MODS) + 2


# --- set(): only modules whose weights change are touched ---------------------------------------------
def test_set_touches_only_changed_modules(unet, unet0, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", [("unet", m, "lora", _shape(unet, m)) for m in (LIN, FF, C3)], seed=1)
    b = write_lora(tmp_path / "b.safetensors", [("unet", m, "loha", _shape(unet, m)) for m in (FF, MID_Q)], seed=2)
    c = write_lora(tmp_path / "c.safetensors", [("unet", m, "dora", _shape(unet, m)) for m in (MID_Q, C3_OUT)], seed=3)
    base = state_bits(unet)
    h = lora_ext.apply(unet, [(a, 0.5), (b, 1.0)], method="fuse")
    assert h.stats["writes"] == 4
    ver = {n: p._version for n, p in unet.named_parameters()}
    h.set([(a, 0.5), (c, 1.0)])
    changed = {n for n, p in unet.named_parameters() if p._version != ver[n]}
    assert changed == {f"{FF}.weight", f"{MID_Q}.weight", f"{C3_OUT}.weight"}
    assert h.stats["writes"] == 4 + 3
    ref = reference(unet0, [(LoraSpec("a", path=a), 0.5), (LoraSpec("c", path=c), 1.0)])
    assert max_rel_err(unet_out(unet), unet_out(ref)) <= 1e-5
    ver = {n: p._version for n, p in unet.named_parameters()}
    h.set([(c, 1.0), (a, 0.5)])  # same LoRAs, other order: nothing to do
    h.set([(a, 0.25), (c, 1.0)])  # only a's strength: only a's modules
    changed = {n for n, p in unet.named_parameters() if p._version != ver[n]}
    assert changed == {f"{LIN}.weight", f"{FF}.weight", f"{C3}.weight"}
    h.remove()
    assert_bit_identical(unet, base)


# --- 1000 apply / switch / remove cycles end bit-identical (fp16, bf16) ------------------------------
CYCLE_FILES = {  # every module is shared by several types, 1x1 and 3x3 convs included
    "lora": ("lora", [LIN, PROJ, C3]),
    "loha": ("loha", [FF, C3]),
    "lokr": ("lokr", [LIN]),
    "dora": ("dora", [C3]),
    "ia3": ("ia3", [PROJ]),
    "oft": ("oft", [FF, LIN]),
    "full": ("full", [FF]),
    "norm": ("norm", [GN]),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_thousand_cycles_bit_identical(unet0, tmp_path, dtype):
    unet = copy.deepcopy(unet0).to(dtype)
    loras = {}
    for i, (name, (kind, mods)) in enumerate(CYCLE_FILES.items()):
        p = write_lora(tmp_path / f"{name}.safetensors", [("unet", m, kind, _shape(unet, m)) for m in mods],
                       seed=200 + i, mag=0.3)
        loras[name] = load_lora(p)
    base = state_bits(unet)
    rnd = random.Random(1234)
    names = sorted(loras)

    def pick():
        out = []
        for name in rnd.sample(names, rnd.randint(1, 3)):
            spec = LoraSpec(name, path=loras[name].path)
            r = rnd.random()
            if r < 0.2:
                spec.unet = Keyframes(((rnd.uniform(-1, 2), 0), (rnd.uniform(-1, 2), 1.0)))
            elif r < 0.3:
                spec.start, spec.stop = 1, 3
            out.append((spec, rnd.choice([1.0, 0.5, -0.7, 1.3, round(rnd.uniform(-2, 2), 4)])))
        return out

    cycles = 1000
    record_fraction = []
    schemes = Counter()
    for cycle in range(cycles):
        # preloaded Lora objects; the specs' paths point at them, tuples carry the strengths
        h = lora_ext.apply(unet, [(loras[s.name], m) if not s.is_scheduled() and s.unet == 1.0 else (s, m)
                                  for s, m in pick()], method=rnd.choice(["fuse", "fuse", "onthefly", "auto"]))
        if rnd.random() < 0.3:
            h.update(rnd.randint(0, 4), 5)
        # the records at the next move: plain copies, mid-compaction, or compacted (background)
        if rnd.random() < 0.5:
            assert h.wait_records(60)
        if h.patched_bytes and h.records_complete:
            record_fraction.append(h.restore_record_bytes / h.patched_bytes)
            schemes.update(h.record_schemes)
        h.set(pick())
        if rnd.random() < 0.3:
            h.update(rnd.randint(0, 4), 5)
            h.update(rnd.randint(0, 4), 5)
        h.remove()
        if cycle % 100 == 99:
            assert_bit_identical(unet, base)
            assert no_hooks(unet)
    assert_bit_identical(unet, base)
    assert no_hooks(unet)
    print(f"{dtype}: mean restore record {sum(record_fraction) / len(record_fraction):.1%} of the patched bytes; "
          f"schemes {dict(schemes)}")
    # every record form took part: sparse, codes, full copies (the small norm/bias ones)
    assert schemes["sparse"] and schemes["full"] and any(schemes[f"{b}-bit"] for b in (1, 2, 4, 8))


# --- transactional: a failure midway leaves the model bit-identical, with no hook ---------------------
def _flaky_loha(monkeypatch, nth):
    from lora_ext.adapters.loha import LoHaAdapter

    calls = {"n": 0}
    orig = LoHaAdapter.delta

    def flaky(self, weight):
        calls["n"] += 1
        if calls["n"] == nth:
            raise RuntimeError("injected failure")
        return orig(self, weight)

    monkeypatch.setattr(LoHaAdapter, "delta", flaky)
    return calls


@pytest.mark.parametrize("method", ["fuse", "auto"])
@pytest.mark.parametrize("nth", [1, 3, 5])
def test_failure_midway_during_apply(unet, stack_files, monkeypatch, method, nth):
    specs = [(LoraSpec(k, path=p), 0.8) for k, p in stack_files.items()]
    if method == "auto":  # some of them scheduled: hooks go on before the failure
        specs = [(LoraSpec(s.name, path=s.path, unet=Keyframes(((0.2, 0), (1.0, 1)))) if s.name in ("lora", "dora")
                  else s, m) for s, m in specs]
    base = state_bits(unet)
    writes = []
    orig_write = Handle._write
    monkeypatch.setattr(Handle, "_write", lambda self, p, v: (writes.append(p), orig_write(self, p, v)))
    calls = _flaky_loha(monkeypatch, nth)
    with pytest.raises(RuntimeError, match="injected"):
        lora_ext.apply(unet, specs, method=method)
    assert calls["n"] == nth
    if nth == 5:  # modules before the failing one had been written (and were written back)
        assert writes
    assert_bit_identical(unet, base)
    assert no_hooks(unet)


def test_failure_during_set_and_update_restores_previous_state(unet, stack_files, monkeypatch):
    f = stack_files
    base = state_bits(unet)
    ramp = LoraSpec("ia3", path=f["ia3"], unet=Keyframes(((0.0, 0), (1.0, 3))))
    h = lora_ext.apply(unet, [(f["lora"], 0.7), (f["dora"], 1.0), ramp], method="auto")
    h.update(1, 4)
    unet_out(unet)
    h.update(2, 4)
    before, hooks = state_bits(unet), sorted(n for n, m in unet.named_modules() if m._forward_hooks)
    out_before = unet_out(unet)
    _flaky_loha(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="injected"):
        h.set([(f["lora"], 0.7), (f["loha"], 1.0), (f["oft"], 0.5), ramp])
    assert_bit_identical(unet, before)
    assert sorted(n for n, m in unet.named_modules() if m._forward_hooks) == hooks
    assert torch.equal(unet_out(unet), out_before)
    h.update(3, 4)  # the handle still works
    h.remove()
    assert_bit_identical(unet, base)
    assert no_hooks(unet)


@pytest.mark.parametrize("method", ["fuse", "onthefly"])
def test_bad_tensor_fails_cleanly(unet, tmp_path, method):
    path = write_lora(tmp_path / "nan.safetensors", [("unet", m, "lora", _shape(unet, m)) for m in (C3, FF, LIN)])
    from safetensors.torch import load_file

    sd = load_file(path)
    # finite in the file (the loader refuses NaN/Inf), but the delta overflows fp32
    sd["lora_unet_" + LIN.replace(".", "_") + ".lora_up.weight"] *= 1e30
    sd["lora_unet_" + LIN.replace(".", "_") + ".lora_down.weight"] *= 1e30
    save_file(sd, path)
    base = state_bits(unet)
    with pytest.raises(AdapterError, match="not finite"):
        lora_ext.apply(unet, [path], method=method)
    assert_bit_identical(unet, base)
    assert no_hooks(unet)


def test_missing_module_fails_cleanly(unet, unet0, tmp_path):
    from lora_ext.arch import table_for_model
    from lora_ext.keys import KeyMap

    path = write_lora(tmp_path / "m.safetensors", [("unet", m, "lora", _shape(unet, m)) for m in (C3, FF, MID_Q)])
    keymap = KeyMap({"unet": table_for_model("unet", unet0)})
    parent, _, leaf = MID_Q.rpartition(".")
    setattr(unet.get_submodule(parent), leaf, torch.nn.Identity())  # the key map still lists it
    base = state_bits(unet)
    with pytest.raises(LoraExtError, match="not in the model"):
        lora_ext.apply(unet, [path], method="fuse", keymap=keymap)
    assert_bit_identical(unet, base)
    assert no_hooks(unet)


# --- the restore record is far smaller than a copy of the patched weights -----------------------------
@pytest.mark.parametrize("buffer", [None, 0], ids=["background", "sync"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_restore_record_is_small(unet0, tmp_path, dtype, buffer):
    """The steady-state record (after the background compaction, or built synchronously with
    ``record_buffer=0``) is far below a copy of the patched weights."""
    unet = copy.deepcopy(unet0).to(dtype)
    mods = [n for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.numel() >= 64]
    path = write_lora(tmp_path / "all.safetensors", [("unet", m, "lora", _shape(unet, m)) for m in mods],
                      seed=11, rank=4, mag=0.1)
    base = state_bits(unet)
    h = lora_ext.apply(unet, [(path, 1.0)], method="fuse", record_buffer=buffer)
    patched = sum(unet.get_submodule(m).weight.numel() * unet.get_submodule(m).weight.element_size() for m in mods)
    assert h.patched_bytes == patched
    if buffer is None:  # plain copies first, at most one per patched weight
        assert h.restore_record_bytes <= h.patched_bytes
        assert h.wait_records(60)
    assert h.records_complete and "plain" not in h.record_schemes
    frac = h.restore_record_bytes / h.patched_bytes
    print(f"{dtype}: restore record {h.restore_record_bytes} B for {h.patched_bytes} B patched ({frac:.1%}); "
          f"schemes {dict(h.record_schemes)}")
    assert 0 < frac <= 0.25
    h.set([(path, 0.5)])
    assert h.wait_records(60)
    assert h.restore_record_bytes / h.patched_bytes <= 0.25
    h.remove()
    assert_bit_identical(unet, base)


@pytest.mark.parametrize("buffer", [None, 0], ids=["background", "sync"])
@pytest.mark.parametrize("workers", [1, 2])
def test_failure_inside_a_block_loop_and_in_parallel(unet0, tmp_path, monkeypatch, workers, buffer):
    """Small blocks (several per weight), modules re-fused on worker threads, failure midway."""
    from lora_ext.engine import fuse, transact

    unet = copy.deepcopy(unet0).half()
    mods = [LIN, LIN_K, FF, MID_Q, OUT3_V, PROJ, SHORT, C3, C3_MID, C3_OUT, DOWNS]
    path = write_lora(tmp_path / "p.safetensors", [("unet", m, "lora", _shape(unet, m)) for m in mods], mag=0.3)
    monkeypatch.setattr(fuse, "CHUNK", 24)
    monkeypatch.setattr(transact, "WORKERS", workers)
    monkeypatch.setattr(transact, "PARALLEL_MIN_ELEMENTS", 0)
    base = state_bits(unet)
    with lora_ext.apply(unet, [(path, 0.9)], method="fuse", record_buffer=buffer) as h:  # the parallel path works
        assert h.stats["writes"] == len(mods)
        fused = state_bits(unet)
    assert_bit_identical(unet, base)
    with lora_ext.apply(unet, [(path, 0.9)], method="fuse", record_buffer=buffer) as h:
        assert_bit_identical(unet, fused)  # same bits on one thread or several
    calls = {"n": 0}
    # the synchronous path estimates every block; the fast one computes the deltas of every block
    name = "_block_estimate" if buffer == 0 else "_block_delta"
    orig = getattr(fuse, name)

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 40:
            raise MemoryError("injected")
        return orig(*a)

    monkeypatch.setattr(fuse, name, flaky)
    with pytest.raises(MemoryError):
        lora_ext.apply(unet, [(path, 0.9)], method="fuse", record_buffer=buffer)
    assert calls["n"] >= 40
    assert_bit_identical(unet, base)


@pytest.mark.parametrize("state", ["sync", "plain", "compact"])
def test_failure_midway_through_a_switch_pass(unet0, tmp_path, monkeypatch, state):
    """set() decodes the old fusion (or takes the plain copy) and fuses the new one in one
    pass: a failure puts it back. ``state``: the records at the switch are built synchronously,
    still plain copies (the worker held), or compacted in the background."""
    from lora_ext.engine import background, fuse

    unet = copy.deepcopy(unet0).half()
    mods = [LIN, FF, MID_Q, PROJ, C3, C3_OUT]
    a = write_lora(tmp_path / "a.safetensors", [("unet", m, "lora", _shape(unet, m)) for m in mods], seed=1, mag=0.3)
    b = write_lora(tmp_path / "b.safetensors", [("unet", m, "lora", _shape(unet, m)) for m in mods], seed=2)
    monkeypatch.setattr(fuse, "CHUNK", 40)
    base = state_bits(unet)
    if state == "plain":  # the worker drops every module it starts (deterministic: nothing compacts)
        monkeypatch.setattr(background, "HOOK", lambda ev, key, blk: (_ for _ in ()).throw(RuntimeError("held")))
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse", record_buffer=0 if state == "sync" else None)
    assert h.wait_records(60)
    want = {"sync": {"sparse", "1-bit", "2-bit", "4-bit", "8-bit", "full"}, "plain": {"plain"},
            "compact": {"sparse", "1-bit", "2-bit", "4-bit", "8-bit", "full"}}[state]
    assert set(h.record_schemes) <= want
    monkeypatch.setattr(background, "HOOK", None)
    fused_a = state_bits(unet)
    calls = {"n": 0}
    orig = fuse._block_delta

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 25:
            raise RuntimeError("injected")
        return orig(*args)

    monkeypatch.setattr(fuse, "_block_delta", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        h.set([(b, 1.0), (a, 0.3)])
    assert_bit_identical(unet, fused_a)
    h.set([(b, 1.0), (a, 0.3)])
    ref = reference(copy.deepcopy(unet0).half(), [(LoraSpec("b", path=b), 1.0), (LoraSpec("a", path=a), 0.3)])
    for m in mods:  # the switched weights are the one-rounding fusion from W0 (up to fp32 sum order)
        w, rw = unet.get_submodule(m).weight.detach().float(), ref.get_submodule(m).weight.detach().float()
        assert float((w - rw).abs().max()) <= 2 * float(rw.abs().max()) * 2 ** -10
    h.remove()
    assert_bit_identical(unet, base)


def test_weight_changed_behind_the_engines_back_is_an_error(unet, tmp_path):
    from lora_ext.engine import RestoreError

    path = write_lora(tmp_path / "x.safetensors", [("unet", m, "lora", _shape(unet, m)) for m in (LIN, C3)])
    h = lora_ext.apply(unet, [path], method="fuse")
    assert h.wait_records(60)  # (while a plain copy is held, a restore copies it back whatever happened)
    with torch.no_grad():
        unet.get_submodule(C3).weight[0, 0, 0, 0] += 1.0  # someone else edits a patched weight
    with pytest.raises(RestoreError, match="changed by something else"):
        h.remove()


def test_onthefly_with_autograd(unet, tmp_path):
    """With a graph being recorded the hooks add out of place, and gradients flow."""
    path = write_lora(tmp_path / "g.safetensors",
                      [("unet", m, kind, _shape(unet, m)) for m, kind in ((LIN, "lora"), (C3, "lora"), (FF, "loha"))])
    with lora_ext.apply(unet, [(path, 0.7)], method="onthefly"):
        ref = unet_out(unet)
        sample, t, ctx = unet_inputs()
        with torch.enable_grad():
            out = unet(sample, t, encoder_hidden_states=ctx).sample
            assert out.requires_grad
            out.square().mean().backward()
    assert max_rel_err(out.detach(), ref) <= 1e-6
    assert unet.get_submodule(LIN).weight.grad is not None


def test_pipeline_object_and_abandon(unet, te, tmp_path):
    path = write_lora(tmp_path / "p.safetensors", [
        ("unet", LIN, "lora", _shape(unet, LIN)), ("te", TE_Q, "lora", tuple(_te_module(te, TE_Q).weight.shape))])

    class Pipe:  # what a diffusers pipeline exposes
        def __init__(self, unet, te):
            self.unet, self.text_encoder = unet, te

    base_u, base_t = state_bits(unet), state_bits(te)
    h = lora_ext.apply(Pipe(unet, te), [path], method="onthefly")
    assert h.reports[0].applied == 2 and not no_hooks(unet, te)
    h.abandon()  # the host replaced the weights: nothing is written, hooks go
    assert no_hooks(unet, te) and not h.alive
    assert_bit_identical(unet, base_u)
    assert_bit_identical(te, base_t)
    with pytest.raises(LoraExtError, match="cannot apply LoRAs to a"):
        lora_ext.apply(object(), [path])


# --- a LoRA trained on OpenCLIP's fused q/k/v, applied to separate q/k/v modules -------------------
IN_PROJ = "lora_te_model_transformer_resblocks_0_attn_in_proj"


def _openclip_born_te():
    """A tiny text encoder converted from OpenCLIP (gelu): LoRAs may name its q/k/v as one in_proj."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in tiny_text_encoder().config.to_dict().items()
           if not k.startswith("_") and k not in ("architectures", "dtype", "torch_dtype")}
    cfg["hidden_act"] = "gelu"
    torch.manual_seed(5)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def _in_proj_file(path, te, kind, **kw):
    d = _te_module(te, "encoder.layers.0.self_attn.q_proj").weight.shape[1]
    g = torch.Generator().manual_seed(11)
    t = adapter_tensors("dora" if kind == "dora_in" else kind, (3 * d, d), g, rank=2, mag=0.3)
    if kind == "dora_in":  # a norm per input column: runs across q, k and v
        t["dora_scale"] = torch.rand(1, d, generator=g) + 0.5
    if kind == "oft" and kw.get("block"):
        b = kw["block"]
        t["oft_blocks"] = torch.randn(3 * d // b, b, b, generator=g) * 0.05
    save_file({f"{IN_PROJ}.{k}": v.contiguous() for k, v in t.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "oft"])
def test_fused_qkv_adapter_on_separate_modules(tmp_path, kind):
    """Each of q, k, v gets its rows of the delta the adapter makes on the fused weight
    (weight-dependent types included, when their maths keeps to rows)."""
    te = _openclip_born_te()
    path = _in_proj_file(tmp_path / f"{kind}.safetensors", te, kind)
    qkv = [_te_module(te, f"encoder.layers.0.self_attn.{p}_proj") for p in "qkv"]
    stacked = torch.cat([m.weight.detach() for m in qkv]).float()
    base = state_bits(te)
    t0 = te_out(te)
    with lora_ext.apply(te, [(path, 0.7)], method="fuse") as h:
        assert h.unmatched == [] and h.reports[0].applied == 1
        adapter = h._entries[0].contribs[0].adapter
        want = stacked + 0.7 * adapter.delta(stacked)  # the adapter on the real fused weight
        got = torch.cat([m.weight.detach() for m in qkv])
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
        fused = te_out(te)
    assert_bit_identical(te, base)
    with lora_ext.apply(te, [(path, 0.7)], method="onthefly"):
        live = te_out(te)
    assert_bit_identical(te, base)
    assert max_rel_err(fused, t0) > 1e-4
    assert max_rel_err(live, fused) <= 1e-5


@pytest.mark.parametrize("kind,kw", [("dora_in", {}), ("oft", {"block": 3})])
def test_fused_qkv_adapter_mixing_rows_is_reported(tmp_path, kind, kw):
    """A per-input DoRA norm, or OFT blocks straddling q|k|v, cannot be split: reported, model untouched."""
    te = _openclip_born_te()
    path = _in_proj_file(tmp_path / f"{kind}.safetensors", te, kind, **kw)
    base = state_bits(te)
    with lora_ext.apply(te, [(path, 1.0)], method="fuse") as h:
        assert h.reports[0].applied == 0
        assert h.unmatched and all("mixes the rows" in u["reason"] for u in h.unmatched)
        assert_bit_identical(te, base)
    assert_bit_identical(te, base)
