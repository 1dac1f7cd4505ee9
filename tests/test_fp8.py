"""fp8 base weights (issue 15, "Weights in low precision"): Flux / SD3.5 users run
``float8_e4m3fn`` / ``float8_e5m2`` weights, plain or with ComfyUI's ``scale_weight``.

* fusing computes in fp32 from the fp32 upcast and rounds once: the fused weight equals
  round-to-nearest-even of the fp32 result, element for element (LoRA factors with few
  significant bits make that fp32 result exact, so the reference is independent of the order
  the engine sums in);
* ComfyUI's seeded stochastic rounding on request: deterministic per key and seed, unbiased,
  different from round-to-nearest; bit-identical to ComfyUI's own ``comfy/float.py`` when a
  checkout is given (``LORA_EXT_COMFYUI_DIR``);
* restore is bit-exact over 100 random fuse / switch / remove cycles, with a record of at most
  one byte per patched element (reported per module);
* quantised modules (int8, NF4-like packed, tensor subclasses) are never requantised: on the
  fly, with the reason reported.

A tiny Flux in fp8 cannot run its forward on the CPU, so the weights are tested.
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import os
import random
import warnings
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import lora_ext
from lora_ext.engine import fp8 as fp8mod
from lora_ext.engine.transact import unfusable_reason
from lora_ext.errors import LoraExtError
from lora_ext.network import load_lora
from lora_ext.spec import Keyframes, LoraSpec

from dit_models import tiny
from test_engine import adapter_tensors
from tiny_models import one_thread_fixture

one_thread = one_thread_fixture()

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
IDS = ["e4m3fn", "e5m2"]
# a handful of the tiny Flux's linears (double and single blocks, MLPs, modulation, embedders)
MODS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.1.norm1.linear", "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.1.proj_out", "context_embedder", "x_embedder"]


@pytest.fixture(scope="module")
def flux0():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny("flux")


def as_dtype(model, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model).to(dtype)


def raw(t):
    t = t.detach().reshape(-1)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert now[k].dtype == v.dtype and torch.equal(raw(now[k]), raw(v)), f"{k} differs"


def no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def peft_file(path, model, modules, seed, *, rank=4, dyadic=False, mag=0.1):
    """A diffusers/PEFT-named LoRA (``transformer.<path>.lora_A/B``; no alpha: scale 1).

    ``dyadic``: factors k/64 with |k| <= 8, so every product and sum is exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for p in modules:
        out, inn = model.get_submodule(p).weight.shape
        if dyadic:
            a = torch.randint(-8, 9, (rank, inn), generator=g).float() / 64
            b = torch.randint(-8, 9, (out, rank), generator=g).float() / 64
        else:
            a = torch.randn(rank, inn, generator=g) * mag
            b = torch.randn(out, rank, generator=g) * mag
        sd[f"transformer.{p}.lora_A.weight"] = a
        sd[f"transformer.{p}.lora_B.weight"] = b
    save_file(sd, str(path))
    return str(path), sd


def kohya_file(path, model, entries, seed, *, mag=0.1):
    """entries: [(module path, kind)] with the SimpleTuner/kohya ``lora_transformer_`` prefix."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for p, kind in entries:
        shape = tuple(model.get_submodule(p).weight.shape)
        for k, v in adapter_tensors(kind, shape, g, mag=mag).items():
            sd[f"lora_transformer_{p.replace('.', '_')}.{k}"] = v.contiguous()
    save_file(sd, str(path))
    return str(path)


def ulps_apart(a, b):
    """|ordered(a) - ordered(b)| per element of two fp8 tensors (grid steps between them)."""
    def ordered(t):
        v = raw(t).view(torch.int8).to(torch.int32)
        return torch.where(v < 0, -(v & 0x7F), v)
    return (ordered(a) - ordered(b)).abs()


# --- fuse = round-to-nearest of the fp32 result --------------------------------------------------
@pytest.mark.parametrize("dtype", FP8, ids=IDS)
def test_fuse_equals_round_to_nearest_of_the_fp32_result(flux0, tmp_path, dtype):
    model = as_dtype(flux0, dtype)
    base = snapshot(model)
    mods = linears(model)
    path, sd = peft_file(tmp_path / "d.safetensors", model, mods, seed=3, dyadic=True)
    h = lora_ext.apply(model, [(path, 0.5)], method="fuse")
    assert h.unmatched == [] and h.unfusable == {}
    assert sorted(k[1] for k in h.modules("fuse")) == sorted(mods)
    moved = 0
    for p in mods:
        w0 = base[f"{p}.weight"].float()
        d = 0.5 * (sd[f"transformer.{p}.lora_B.weight"].double() @ sd[f"transformer.{p}.lora_A.weight"].double())
        exact = w0.double() + d
        assert torch.equal(exact.float().double(), exact), "the fp32 result is exact (dyadic factors)"
        want = exact.float().to(dtype)  # round to nearest even, once, from the fp32 result
        got = model.get_submodule(p).weight
        assert got.dtype == dtype
        assert torch.equal(raw(got), raw(want)), f"{p}: not round-to-nearest of the fp32 result"
        moved += int((raw(got) != raw(base[f"{p}.weight"])).sum())
    assert moved > 1000
    recs = h.records()
    assert {r["module"][1] for r in recs} == set(mods) and all(r["bytes"] <= r["elements"] for r in recs)
    h.remove()
    assert_same(model, base)
    assert no_hooks(model)


# --- restore: bit-exact over 100 cycles, record <= 1 byte per element ------------------------------
CASES = [(torch.float8_e4m3fn, "nearest"), (torch.float8_e4m3fn, "stochastic"), (torch.float8_e5m2, "nearest")]


@pytest.mark.parametrize("dtype,rounding", CASES, ids=["e4m3fn-nearest", "e4m3fn-stochastic", "e5m2-nearest"])
def test_restore_bit_exact_over_100_cycles(flux0, tmp_path, dtype, rounding):
    model = as_dtype(flux0, dtype)
    files = {
        "lora": peft_file(tmp_path / "a.safetensors", model, MODS[:6], seed=21, mag=0.2)[0],
        "loha": kohya_file(tmp_path / "b.safetensors", model, [(MODS[0], "loha"), (MODS[4], "lora"),
                                                              (MODS[6], "lokr")], seed=22, mag=0.3),
        "dora": kohya_file(tmp_path / "c.safetensors", model, [(MODS[1], "dora"), (MODS[2], "ia3"),
                                                              (MODS[7], "lora_bias")], seed=23, mag=0.3),
        "full": kohya_file(tmp_path / "d.safetensors", model, [(MODS[3], "full"), (MODS[5], "oft")], seed=24, mag=1.0),
    }
    loras = {k: load_lora(v) for k, v in files.items()}
    base = snapshot(model)
    rnd = random.Random(7)
    names = sorted(loras)

    def pick():
        out = []
        for name in rnd.sample(names, rnd.randint(1, 3)):
            r = rnd.random()
            if r < 0.25:
                spec = LoraSpec(name, path=loras[name].path)
                spec.unet = Keyframes(((rnd.uniform(-1, 2), 0), (rnd.uniform(-1, 2), 1.0)))
                out.append((spec, 1.0))
            else:
                out.append((loras[name], rnd.choice([1.0, 0.5, -0.7, 1.3, round(rnd.uniform(-2, 2), 4)])))
        return out

    per_elem, schemes, fused = [], Counter(), 0
    for cycle in range(100):
        h = lora_ext.apply(model, pick(), method=rnd.choice(["fuse", "fuse", "auto", "onthefly"]), rounding=rounding)
        assert h.unmatched == [] and h.unfusable == {}
        if rnd.random() < 0.3:
            h.update(rnd.randint(0, 4), 5)
        for r in h.records():
            assert r["bytes"] <= r["elements"], f"{r}: more than a full copy"
            per_elem.append(r["bytes_per_element"])
            schemes[r["scheme"]] += 1
        fused += len(h.modules("fuse"))
        h.set(pick())
        if rnd.random() < 0.3:
            h.update(rnd.randint(0, 4), 5)
            h.update(rnd.randint(0, 4), 5)
        h.remove()
        if cycle % 25 == 24:
            assert_same(model, base)
            assert no_hooks(model)
    assert_same(model, base)
    assert no_hooks(model)
    assert fused > 100 and per_elem
    print(f"{dtype} {rounding}: record {sum(per_elem) / len(per_elem):.3f} B/element on average "
          f"(max {max(per_elem):.3f}) over {len(per_elem)} records; schemes {dict(schemes)}")


@pytest.mark.parametrize("dtype", FP8, ids=IDS)
def test_record_size_is_reported_and_at_most_a_byte_per_element(flux0, tmp_path, dtype):
    """A realistic LoRA (deltas a few % of the weights) on every linear: the records' sizes per
    module, for round-to-nearest and for stochastic rounding."""
    model = as_dtype(flux0, dtype)
    base = snapshot(model)
    path, _ = peft_file(tmp_path / "r.safetensors", model, linears(model), seed=5, rank=8, mag=0.03)
    figures = {}
    for rounding in ("nearest", "stochastic", "stochastic-torch"):
        h = lora_ext.apply(model, [path], method="fuse", rounding=rounding)
        recs = h.records()
        assert len(recs) == len(linears(model))
        assert all(r["dtype"] == str(dtype).replace("torch.", "") and r["rounding"] == rounding for r in recs)
        assert all(r["bytes"] <= r["elements"] and r["bytes_per_element"] <= 1.0 for r in recs)
        elements = sum(r["elements"] for r in recs)
        assert h.restore_record_bytes == sum(r["bytes"] for r in recs)
        assert h.patched_bytes == elements  # one byte per fp8 element
        figures[rounding] = (h.restore_record_bytes / elements, Counter(r["scheme"] for r in recs))
        h.remove()
        assert_same(model, base)
    print(f"{dtype}: record bytes per patched element: " +
          "; ".join(f"{k} {v[0]:.3f} {dict(v[1])}" for k, v in figures.items()))
    # round-to-nearest leaves few positions the estimate misses: far below a copy
    assert figures["nearest"][0] <= 0.25
    assert figures["stochastic"][0] <= 0.5 and figures["stochastic-torch"][0] <= 0.5
    for _ in range(5):  # and back and forth between the roundings, bit-exact
        h = lora_ext.apply(model, [path], method="fuse", rounding="stochastic-torch")
        h.set([(path, -0.5)])
        h.remove()
        assert_same(model, base)


# --- stochastic rounding -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["stochastic", "stochastic-torch"])
@pytest.mark.parametrize("dtype", FP8, ids=IDS)
def test_stochastic_rounding_is_seeded_unbiased_and_not_rtn(dtype, mode):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(256, 512, generator=g) * 0.05
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    a = fp8mod.round_to(v, dtype, (mode, key))
    b = fp8mod.round_to(v.clone(), dtype, (mode, key))
    other = fp8mod.round_to(v, dtype, (mode, key.replace("0", "1")))
    rtn = v.to(dtype)
    assert a.dtype == dtype and torch.equal(raw(a), raw(b)), "deterministic per key (seed)"
    assert not torch.equal(raw(a), raw(other)), "another key, another seed, another result"
    assert not torch.equal(raw(a), raw(rtn)), "stochastic differs from round-to-nearest"
    apart = ulps_apart(a, rtn)
    # one of the two grid neighbours; ComfyUI's algorithm takes log2 in half precision, so just
    # below a power of two it may land on the next lower step of the binade above (2 steps)
    assert int(apart.max()) <= 2 and float((apart == 2).float().mean()) < 0.01
    err = a.float() - v
    step = (rtn.float() - v).abs().mean()  # of the order of a quarter grid step
    assert abs(float(err.mean())) <= 0.02 * float(step) * 4, "unbiased: mean error far below a step"
    assert float(err.abs().mean()) > float((rtn.float() - v).abs().mean()), "noisier than RTN per element"
    print(f"{dtype} {mode}: mean error {float(err.mean()):.2e}, mean |error| {float(err.abs().mean()):.2e} "
          f"(RTN: mean {float((rtn.float() - v).mean()):.2e}, mean |error| {float(step):.2e})")


def test_engine_stochastic_rounding_is_seeded_by_key(flux0, tmp_path):
    dtype = torch.float8_e4m3fn
    m1, m2, m3, m4 = (as_dtype(flux0, dtype) for _ in range(4))
    path, _ = peft_file(tmp_path / "s.safetensors", m1, MODS, seed=9, mag=0.05)
    h1 = lora_ext.apply(m1, [path], "fuse", rounding="stochastic")
    h2 = lora_ext.apply(m2, [path], "fuse", rounding="stochastic")
    h3 = lora_ext.apply(m3, [path], "fuse", rounding="stochastic",
                        seed_key=lambda comp, p, param: f"diffusion_model.{p}.{param}")
    h4 = lora_ext.apply(m4, [path], "fuse")
    w = {i: m.get_submodule(MODS[0]).weight for i, m in enumerate((m1, m2, m3, m4))}
    assert torch.equal(raw(w[0]), raw(w[1]))
    assert not torch.equal(raw(w[0]), raw(w[2])) and not torch.equal(raw(w[0]), raw(w[3]))
    # the default key is "<path>.weight": the same numbers as round_to with that key
    p = MODS[0]
    h4.remove()
    w0 = m4.get_submodule(p).weight.float()
    assert torch.equal(raw(fp8mod.round_to(w0 + _delta(m4, h1, p), dtype, ("stochastic", f"{p}.weight"))), raw(w[0]))
    for h in (h1, h2, h3):
        h.remove()


def _delta(model, h, path):
    """The fp32 delta the engine adds to ``path`` (its contribution at strength 1)."""
    from lora_ext.engine.contrib import delta_sum

    m = h._mods[("unet", path)]
    return delta_sum(tuple((c.key, c, 1.0) for c in m.contribs), model.get_submodule(path).weight.float())


def test_comfy_seed_is_crc32():
    assert fp8mod.comfy_seed("") == 0
    assert fp8mod.comfy_seed("123456789") == 0xCBF43926  # the CRC-32 check value
    k = "diffusion_model.single_blocks.3.linear1.weight"
    assert fp8mod.comfy_seed(k) != fp8mod.comfy_seed(k.replace("3", "4"))
    fp8mod.comfy_seed("ключ")  # code points above 255 do not fail


COMFY = os.environ.get("LORA_EXT_COMFYUI_DIR")


@pytest.mark.skipif(not COMFY or not os.path.isfile(os.path.join(COMFY or "", "comfy", "float.py")),
                    reason="set LORA_EXT_COMFYUI_DIR to a ComfyUI checkout to compare with its comfy/float.py")
@pytest.mark.parametrize("dtype", FP8, ids=IDS)
def test_stochastic_rounding_equals_comfyui(dtype):
    """ComfyUI's own code as the oracle: comfy/float.py loaded from the checkout (its
    comfy-kitchen path when comfy_kitchen imports, else its torch path), and its
    ``string_to_seed`` taken from comfy/model_patcher.py."""
    spec = importlib.util.spec_from_file_location("_comfy_float_oracle", os.path.join(COMFY, "comfy", "float.py"))
    cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cf)
    src = open(os.path.join(COMFY, "comfy", "model_patcher.py")).read()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "string_to_seed")
    ns = {}
    exec(compile(ast.Module([fn], []), "model_patcher.py", "exec"), ns)
    keys = ["diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.final_layer.linear.bias"]
    for k in keys:
        assert ns["string_to_seed"](k) == fp8mod.comfy_seed(k)
    mode = "stochastic" if getattr(cf, "_CK_STOCHASTIC_ROUNDING_AVAILABLE", False) else "stochastic-torch"
    g = torch.Generator().manual_seed(1)
    for shape in [(64, 48), (3, 5000), (17,)]:
        v = torch.randn(*shape, generator=g) * 0.1
        v[..., :3] = torch.tensor([0.0, 1e-6, 500.0])  # zero, subnormal, beyond e4m3's range
        for k in keys:
            want = cf.stochastic_rounding(v, dtype, seed=ns["string_to_seed"](k))
            got = fp8mod.round_to(v, dtype, (mode, k))
            assert torch.equal(raw(want), raw(got)), f"{mode} {shape} {k}"
    print(f"ComfyUI parity ({mode}): bit-identical")


# --- scaled fp8 (ComfyUI scaled_fp8: scale_weight) ------------------------------------------------
class ScaledFP8Linear(nn.Linear):
    """ComfyUI's scaled_fp8 Linear: stored ``W8``, real weight ``W8 * scale_weight``."""

    def quantise(self, dtype, scale):
        w = self.weight.detach()
        self.scale_weight = nn.Parameter(scale.float(), requires_grad=False)
        s = scale.reshape(-1, 1) if scale.numel() > 1 else scale
        self.weight = nn.Parameter((w / s).to(dtype), requires_grad=False)
        return self

    def forward(self, x):
        s = self.scale_weight.reshape(-1, 1) if self.scale_weight.numel() > 1 else self.scale_weight
        return F.linear(x, self.weight.float() * s, self.bias)


def _swap_scaled(model, paths, dtype, scales):
    for p, scale in zip(paths, scales):
        old = model.get_submodule(p)
        new = ScaledFP8Linear(old.in_features, old.out_features, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        new.quantise(dtype, scale)
        parent, name = p.rsplit(".", 1)
        setattr(model.get_submodule(parent), name, new)
    return model


@pytest.mark.parametrize("dtype", FP8, ids=IDS)
def test_scaled_fp8_is_fused_exactly_and_restored(flux0, tmp_path, dtype):
    model = copy.deepcopy(flux0)
    paths = MODS[:4]
    out0 = model.get_submodule(paths[2]).weight.shape[0]
    scales = [torch.tensor(0.125), torch.tensor(0.37), torch.rand(out0) * 0.5 + 0.05, torch.tensor([0.02])]
    _swap_scaled(model, paths, dtype, scales)
    assert all(unfusable_reason(model.get_submodule(p)) is None for p in paths)
    base = snapshot(model)
    path, sd = peft_file(tmp_path / "d.safetensors", model, paths, seed=4, dyadic=True)
    h = lora_ext.apply(model, [(path, 0.5)], method="fuse")
    assert h.unmatched == [] and h.unfusable == {}
    for p in paths:
        mod = model.get_submodule(p)
        s = mod.scale_weight.reshape(-1, 1) if mod.scale_weight.numel() > 1 else mod.scale_weight
        d = 0.5 * (sd[f"transformer.{p}.lora_B.weight"] @ sd[f"transformer.{p}.lora_A.weight"])
        want = ((base[f"{p}.weight"].float() * s + d) / s).to(dtype)  # dequantise, add, requantise
        assert torch.equal(raw(mod.weight), raw(want)), p
        assert torch.equal(mod.scale_weight, base[f"{p}.scale_weight"]), "the scale is kept"
    for _ in range(10):
        h.set([(path, -0.3)])
        h.set([(path, 1.7)])
    h.remove()
    assert_same(model, base)


def test_fp8_with_an_unknown_scale_runs_on_the_fly(flux0, tmp_path):
    model = copy.deepcopy(flux0)
    p = MODS[0]
    _swap_scaled(model, [p], torch.float8_e4m3fn, [torch.tensor(0.25)])
    mod = model.get_submodule(p)
    mod.weight_scale = mod.scale_weight  # a second scaling convention we do not reproduce
    del mod.scale_weight
    mod.forward = lambda x: F.linear(x, mod.weight.float() * mod.weight_scale, mod.bias)
    assert "weight_scale" in unfusable_reason(mod)
    stored = raw(mod.weight).clone()
    path, sd = peft_file(tmp_path / "u.safetensors", model, [p], seed=2)
    x = torch.randn(3, mod.in_features)
    want = mod(x) + x @ (sd[f"transformer.{p}.lora_B.weight"] @ sd[f"transformer.{p}.lora_A.weight"]).T
    h = lora_ext.apply(model, [path], method="fuse")
    assert "weight_scale" in h.unfusable[("unet", p)]
    assert any("on the fly" in n and "weight_scale" in n for n in h.reports[0].notes)
    assert torch.equal(raw(mod.weight), stored)
    assert torch.allclose(mod(x), want, rtol=1e-5, atol=1e-6)
    h.remove()
    assert torch.equal(raw(mod.weight), stored) and not mod._forward_hooks


# --- host-style fp8 storage (A1111 fp8_storage): fused now, output within fp8 precision ------------
def test_a1111_style_fp8_storage_is_fused(flux0, tmp_path):
    model = copy.deepcopy(flux0)
    p = MODS[4]
    mod = model.get_submodule(p)
    w32 = mod.weight.detach().clone()
    mod.weight = nn.Parameter(w32.to(torch.float8_e4m3fn), requires_grad=False)
    mod.forward = lambda x: F.linear(x, mod.weight.to(x.dtype), mod.bias)  # A1111 casts to the compute dtype
    stored = raw(mod.weight).clone()
    path, sd = peft_file(tmp_path / "a.safetensors", model, [p], seed=6, mag=0.1)
    x = torch.randn(4, mod.in_features)
    d = sd[f"transformer.{p}.lora_B.weight"] @ sd[f"transformer.{p}.lora_A.weight"]
    want = F.linear(x, (mod.weight.float() + d).to(torch.float8_e4m3fn).float(), mod.bias)
    h = lora_ext.apply(model, [path], method="fuse")
    assert h.unfusable == {} and ("unet", p) in h.modules("fuse")
    assert not torch.equal(raw(mod.weight), stored)
    assert torch.allclose(mod(x), want, rtol=1e-5, atol=1e-5)
    h.remove()
    assert torch.equal(raw(mod.weight), stored)


# --- failures leave the model bit-identical --------------------------------------------------------
def test_overflow_to_infinity_is_an_error_and_the_model_is_untouched(flux0, tmp_path):
    """float8_e5m2 has infinities: a fused value beyond its range is an error (an Inf weight
    is never written); float8_e4m3fn has none, and torch's cast saturates at 448 (Forge's and
    kohya's merges get the same), as does ComfyUI's stochastic rounding."""
    model = as_dtype(flux0, torch.float8_e5m2)
    p = MODS[0]
    with torch.no_grad():
        model.get_submodule(p).weight.copy_(torch.full_like(model.get_submodule(p).weight, 49152.0,
                                                            dtype=torch.float32))
    base = snapshot(model)
    path, _ = peft_file(tmp_path / "big.safetensors", model, MODS[:3], seed=1, mag=80.0)
    with pytest.raises(LoraExtError, match="range"):
        lora_ext.apply(model, [path], method="fuse")
    assert_same(model, base)
    assert no_hooks(model)
    m4 = as_dtype(flux0, torch.float8_e4m3fn)
    with torch.no_grad():
        m4.get_submodule(p).weight.fill_(416.0)
    base4 = snapshot(m4)
    for rounding in ("nearest", "stochastic"):
        h = lora_ext.apply(m4, [path], method="fuse", rounding=rounding)
        assert float(m4.get_submodule(p).weight.detach().float().abs().max()) == 448.0
        h.remove()
        assert_same(m4, base4)


def test_unknown_rounding_is_refused(flux0):
    with pytest.raises(LoraExtError, match="rounding"):
        lora_ext.apply(as_dtype(flux0, torch.float8_e4m3fn), [], rounding="floor")


# --- quantised modules: never requantised, on the fly with the reason --------------------------------
NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


class FakeParams4bit(nn.Parameter):
    """bitsandbytes-style packed 4-bit weight: uint8 storage, two codes per byte, absmax per block."""

    def __new__(cls, data, absmax=None, shape=None):
        p = torch.Tensor._make_subclass(cls, data, False)
        p.absmax, p.orig_shape = absmax, shape
        return p


class FakeLinear4bit(nn.Linear):
    BLOCK = 16

    def quantise(self):
        w = self.weight.detach().reshape(-1, self.BLOCK)
        absmax = w.abs().amax(1, keepdim=True)
        codes = (w / absmax).unsqueeze(-1).sub(NF4).abs().argmin(-1).to(torch.uint8).reshape(-1)
        packed = (codes[0::2] << 4) | codes[1::2]
        self.weight = FakeParams4bit(packed, absmax, tuple(self.weight.shape))
        return self

    def dequantised(self):
        p = self.weight
        codes = torch.stack([p >> 4, p & 15], 1).reshape(-1).long()
        return (NF4[codes].reshape(-1, self.BLOCK) * p.absmax).reshape(p.orig_shape)

    def forward(self, x):
        return F.linear(x, self.dequantised(), self.bias)


class FakeWrapped(torch.Tensor):
    """A quantised tensor subclass that reports a float dtype (torchao / GGUF wrappers do)."""


class FakeWrappedLinear(nn.Linear):
    def quantise(self):
        self.stored = self.weight.detach().to(torch.bfloat16).float()
        self.weight = nn.Parameter(FakeWrapped._make_subclass(FakeWrapped, self.stored.to(torch.bfloat16)),
                                   requires_grad=False)
        return self

    def forward(self, x):
        return F.linear(x, self.stored, self.bias)


@pytest.mark.parametrize("kind", ["nf4", "wrapped"])
@pytest.mark.parametrize("method", ["fuse", "auto"])
def test_quantised_fake_module_goes_on_the_fly_with_its_reason(flux0, tmp_path, kind, method):
    model = copy.deepcopy(flux0)
    p = MODS[4]
    path, sd = peft_file(tmp_path / "q.safetensors", model, [p, MODS[0]], seed=8, mag=0.2)
    old = model.get_submodule(p)
    cls = FakeLinear4bit if kind == "nf4" else FakeWrappedLinear
    new = cls(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    new.quantise()
    parent, name = p.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, new)
    reason = unfusable_reason(new)
    assert reason is not None and "quantised" in reason
    assert ("FakeParams4bit" if kind == "nf4" else "FakeWrapped") in reason
    stored = new.weight.detach().clone()
    x = torch.randn(5, new.in_features)
    d = sd[f"transformer.{p}.lora_B.weight"] @ sd[f"transformer.{p}.lora_A.weight"]
    want = new(x) + x @ (0.8 * d).T  # y = Q(x) + s * B(A(x))
    h = lora_ext.apply(model, [(path, 0.8)], method=method)
    assert h.unmatched == []
    assert h.unfusable == {("unet", p): reason}
    assert any(reason in n and "1 module on the fly" in n for n in h.reports[0].notes)
    assert ("unet", p) in h.modules("onthefly") and ("unet", MODS[0]) in h.modules("fuse")
    assert torch.equal(new.weight.detach(), stored), "never requantised"
    assert torch.allclose(new(x), want, rtol=1e-5, atol=1e-6)
    h.remove()
    assert torch.equal(new.weight.detach(), stored) and not new._forward_hooks


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fnuz"), reason="torch without fnuz fp8")
def test_other_fp8_formats_stay_on_the_fly():
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(lin.weight.detach().to(torch.float8_e4m3fnuz), requires_grad=False)
    assert "fused only as" in unfusable_reason(lin)


def test_weight_dependent_adapter_on_a_quantised_module_is_a_clear_error(flux0, tmp_path):
    """DoRA/IA3/OFT need the weight's values, which a packed quantised weight does not give
    exactly: a clear error, and the model is left as it was."""
    model = copy.deepcopy(flux0)
    p = MODS[4]
    path = kohya_file(tmp_path / "dora.safetensors", model, [(p, "dora"), (MODS[0], "lora")], seed=3)
    old = model.get_submodule(p)
    new = FakeLinear4bit(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    new.quantise()
    parent, name = p.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, new)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraExtError, match="quantised"):
        lora_ext.apply(model, [path], method="fuse")
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items())
    assert no_hooks(model)
