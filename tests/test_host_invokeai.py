"""The InvokeAI nodes driven through a fake of InvokeAI's invocation API (tests/fakes/invokeai,
mirroring InvokeAI 6.14): the node pack is imported the way InvokeAI imports a ``nodes/``
folder, a graph loader -> prompt -> denoise runs, and at every UNet call the output must be
what the independent reference computes at that step; the text encoders must run with the
text-encoder strengths; afterwards the cached models are untouched (bit-exact, no hooks).

An opt-in test (``-m host``) runs the node pack in the real InvokeAI, from its own virtualenv
(``LORA_EXT_INVOKEAI_PYTHON`` = that venv's python)."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from host_common import FAKES, ROOT, bits, make_loras, one_thread_fixture, purge, reference, same_bits
from lora_ext.spec import Keyframes, LoraSpec
from test_engine import no_hooks
from tiny_models import max_rel_err, tiny_text_encoder, tiny_unet

one_thread = one_thread_fixture()
HOST_MODULES = ("invokeai", "lora_ext.hosts.invokeai", "lora_ext_nodes")


@pytest.fixture(scope="module")
def tiny():
    return tiny_unet(), tiny_text_encoder()


def _tokenizer(prompt):
    ids = [2 + (sum(map(ord, w)) % 60) for w in prompt.split()][:6]
    return torch.tensor([ids + [1] * (6 - len(ids))])


@pytest.fixture
def invoke(tiny, tmp_path, monkeypatch):
    import types

    unet, te = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    purge(*HOST_MODULES)
    monkeypatch.syspath_prepend(os.path.join(FAKES, "invokeai"))
    loras = make_loras(str(tmp_path / "loras"), unet, te)
    monkeypatch.setenv("LORA_EXT_DIRS", str(tmp_path / "loras"))
    from invokeai.app.invocations.fields import ConditioningField  # noqa: F401
    from invokeai.app.invocations.model import CLIPField, ModelIdentifierField, UNetField
    from invokeai.app.services.shared.invocation_context import InvocationContext

    ctx = InvocationContext(models_path=str(tmp_path / "models"))
    ctx.models.add("unet", unet)
    ctx.models.add("te", te)
    ctx.models.add("tok", _tokenizer, kind="tokenizer")
    ctx.models.add("sched", None, kind="scheduler")
    # InvokeAI imports each folder of nodes/ as a package named after the folder
    spec = importlib.util.spec_from_file_location("lora_ext_nodes", os.path.join(ROOT, "hosts", "invokeai", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(ROOT, "hosts", "invokeai")])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["lora_ext_nodes"] = pack
    spec.loader.exec_module(pack)
    ids = ModelIdentifierField
    ns = types.SimpleNamespace(pack=pack, ctx=ctx, unet=unet, te=te, loras=loras,
                               unet_field=UNetField(unet=ids("unet"), scheduler=ids("sched")),
                               clip_field=CLIPField(tokenizer=ids("tok"), text_encoder=ids("te")),
                               base_unet=copy.deepcopy(unet), base_te=copy.deepcopy(te))
    yield ns
    purge(*HOST_MODULES)


def test_nodes_register(invoke):
    from invokeai.app.invocations.baseinvocation import INVOCATIONS

    assert {"lora_ext_lora_loader", "lora_ext_compel", "lora_ext_sdxl_compel_prompt",
            "lora_ext_denoise_latents"} <= set(INVOCATIONS)
    assert INVOCATIONS["lora_ext_denoise_latents"].UIConfig.title == "Denoise - SD1.5, SDXL (lora-ext)"


@pytest.mark.parametrize("scheduler", ["euler", "heun"])
def test_graph_loader_prompt_denoise_per_step(invoke, scheduler):
    ns = invoke
    P = ns.pack
    pristine_u, pristine_t = bits(ns.unet), bits(ns.te)
    # loader nodes: an OFT/LoKr/DoRA file with block weights and keyframes, then an IA3/full one
    s1 = P.LoraExtLoaderInvocation(lora="beta", weight=0.9, clip_weight=0.5, block_weights="in=0.5:mid=1:out=1",
                                   keyframes="0@0,1@1").invoke(ns.ctx)
    s2 = P.LoraExtLoaderInvocation(lora=ns.loras["gamma"], weight=0.7, lora_ext=s1.lora_ext).invoke(ns.ctx)
    # the prompt node: a tag in the prompt joins the stack; the text encoder runs with the TE strengths
    seen_te = []
    hook = ns.te.register_forward_hook(lambda m, a, o: seen_te.append(_te_matches(ns, specs_te)))
    specs_te = [LoraSpec("beta", path=ns.loras["beta"], te=0.5), LoraSpec("alpha", path=ns.loras["alpha"], te=0.8)]
    cond = P.LoraExtCompelInvocation(prompt="a castle <lora:alpha:0.8:unet=1@0,0@1>", clip=ns.clip_field,
                                     lora_ext=s2.lora_ext).invoke(ns.ctx)
    hook.remove()
    assert seen_te == [True]
    assert ns.ctx.conditioning.load(cond.conditioning.conditioning_name)["prompt"] == "a castle"
    assert [e["name"] for e in cond.lora_ext.loras] == ["beta", "gamma", "alpha"]
    assert same_bits(ns.te, pristine_t) and no_hooks(ns.te)
    # the denoise node: every UNet call at the strengths of its step
    blocks = {**{f"IN{i:02d}": 0.5 for i in range(12)}, "M00": 1.0, **{f"OUT{i:02d}": 1.0 for i in range(12)}}
    specs = [LoraSpec("beta", path=ns.loras["beta"], unet=Keyframes(((0.0, 0.0), (0.9, 1.0))), blocks=blocks),
             LoraSpec("gamma", path=ns.loras["gamma"], unet=0.7),
             LoraSpec("alpha", path=ns.loras["alpha"], unet=Keyframes(((1.0, 0.0), (0.0, 1.0))))]
    steps = 4
    refs = {}
    calls = []

    def check(module, args, kwargs, output):
        t = int(args[1])
        order = [999, 666, 333, 0]
        step = order.index(t)
        if step not in refs:
            refs[step] = reference({"unet": ns.base_unet}, specs, step, steps)["unet"]
        with torch.no_grad():
            want = refs[step](*args, **kwargs).sample
        assert max_rel_err(output.sample, want) <= 1e-5, f"step {step}"
        calls.append(step)

    h = ns.unet.register_forward_hook(check, with_kwargs=True)
    try:
        P.LoraExtDenoiseLatentsInvocation(positive_conditioning=cond.conditioning, unet=ns.unet_field, steps=steps,
                                          scheduler=scheduler, lora_ext=cond.lora_ext).invoke(ns.ctx)
    finally:
        h.remove()
    assert calls == ([0, 1, 2, 3] if scheduler == "euler" else [0, 1, 1, 2, 2, 3, 3])
    with torch.no_grad():
        x, enc = torch.zeros(1, 4, 8, 8), torch.zeros(1, 5, 16)
        assert max_rel_err(refs[0](x, 10, encoder_hidden_states=enc).sample,
                           refs[3](x, 10, encoder_hidden_states=enc).sample) > 1e-3, 'the schedule matters'
    assert same_bits(ns.unet, pristine_u) and no_hooks(ns.unet)
    assert not ns.unet._forward_pre_hooks


def _te_matches(ns, specs):
    """Whether the text encoder now computes what the reference text encoder computes."""
    ref = reference({"te1": ns.base_te}, specs, 0)["te1"]
    ids = torch.arange(2, 8).reshape(1, 6)
    h = ns.te._forward_hooks.copy()
    ns.te._forward_hooks.clear()
    try:
        with torch.no_grad():
            return max_rel_err(ns.te(ids).last_hidden_state, ref(ids).last_hidden_state) <= 1e-5
    finally:
        ns.te._forward_hooks.update(h)


def test_denoise_without_loras_is_invokeai_s_own(invoke):
    ns = invoke
    cond = ns.pack.LoraExtCompelInvocation(prompt="a castle", clip=ns.clip_field).invoke(ns.ctx)
    assert cond.lora_ext.loras == []
    out = ns.pack.LoraExtDenoiseLatentsInvocation(positive_conditioning=cond.conditioning, unet=ns.unet_field,
                                                  steps=2).invoke(ns.ctx)
    assert out.latents.latents_name in ns.ctx.tensors.items


def test_failed_denoise_takes_hooks_off(invoke):
    ns = invoke
    s = ns.pack.LoraExtLoaderInvocation(lora="alpha", keyframes="0@0,1@1").invoke(ns.ctx)
    cond = ns.pack.LoraExtCompelInvocation(prompt="x", clip=ns.clip_field).invoke(ns.ctx)

    def boom(module, args):
        raise RuntimeError("canceled")

    h = ns.unet.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="canceled"):
            ns.pack.LoraExtDenoiseLatentsInvocation(positive_conditioning=cond.conditioning, unet=ns.unet_field,
                                                    steps=2, lora_ext=s.lora_ext).invoke(ns.ctx)
    finally:
        h.remove()
    assert no_hooks(ns.unet) and not ns.unet._forward_pre_hooks
    assert same_bits(ns.unet, bits(ns.base_unet))


def test_missing_lora_names_the_folders(invoke):
    ns = invoke
    with pytest.raises(Exception, match="nope.*loras"):
        ns.pack.LoraExtLoaderInvocation(lora="nope").invoke(ns.ctx)


def test_modular_denoise_extension(invoke):
    ns = invoke
    from invokeai.backend.stable_diffusion.denoise_context import DenoiseContext, DenoiseInputs
    from invokeai.backend.stable_diffusion.extension_callback_type import ExtensionCallbackType
    from invokeai.backend.stable_diffusion.extensions_manager import ExtensionsManager

    ext_mod = importlib.import_module("lora_ext_nodes.extension")
    spec = LoraSpec("alpha", path=ns.loras["alpha"], unet=Keyframes(((0.0, 0.0), (1.0, 1.0))))
    manager = ExtensionsManager()
    manager.add_extension(ext_mod.LoraExtDenoiseExtension([spec]))
    timesteps = torch.tensor([999, 500, 0])
    ctx = DenoiseContext(inputs=DenoiseInputs(torch.zeros(1, 4, 8, 8), {}, None, None, 0, timesteps, timesteps[:1]),
                         scheduler=None, unet=ns.unet)
    x = torch.zeros(1, 4, 8, 8)
    enc = torch.zeros(1, 5, 16)
    with manager.patch_unet(ns.unet, None):
        for ctx.step_index, ctx.timestep in enumerate(timesteps):
            manager.run_callback(ExtensionCallbackType.PRE_STEP, ctx)
            with torch.no_grad():
                got = ns.unet(x, ctx.timestep, encoder_hidden_states=enc).sample
                want = reference({"unet": ns.base_unet}, [spec], ctx.step_index, 3)["unet"](
                    x, ctx.timestep, encoder_hidden_states=enc).sample
            assert max_rel_err(got, want) <= 1e-5
    assert no_hooks(ns.unet) and same_bits(ns.unet, bits(ns.base_unet))


_REAL_HOST_CHECK = """
import importlib.util, json, sys, types
root, tests, lora_dir, pack_dir = sys.argv[1:5]
sys.path[:0] = [root, tests]
spec = importlib.util.spec_from_file_location("lora_ext_nodes", pack_dir + "/__init__.py",
                                              submodule_search_locations=[pack_dir])
m = importlib.util.module_from_spec(spec); sys.modules["lora_ext_nodes"] = m; spec.loader.exec_module(m)
from invokeai.app.invocations.baseinvocation import InvocationRegistry
types_ = {c.get_type() for c in InvocationRegistry.get_invocation_classes()}
need = {"lora_ext_lora_loader", "lora_ext_compel", "lora_ext_sdxl_compel_prompt", "lora_ext_denoise_latents"}
assert need <= types_, need - types_
InvocationRegistry.get_invocation_typeadapter()  # the graph's union of every node type builds
from lora_ext_nodes import nodes
for cls in (nodes.LoraExtLoaderInvocation, nodes.LoraExtDenoiseLatentsInvocation, nodes.LoraExtCompelInvocation):
    cls.model_json_schema()  # what the UI reads
# the loader node with pydantic validation, its output through JSON (how graphs store it)
ctx = types.SimpleNamespace(config=types.SimpleNamespace(get=lambda: types.SimpleNamespace(models_path=lora_dir)))
node = nodes.LoraExtLoaderInvocation(id="a", lora="beta", weight=0.9, block_weights="in=0.5:out=1", keyframes="0@0,1@1")
out = node.invoke(ctx)
again = type(out).model_validate_json(out.model_dump_json())
specs = nodes.decode(again.lora_ext)
assert specs[0].name == "beta" and specs[0].is_scheduled(), specs
# the denoise extension with InvokeAI's own ExtensionsManager on a diffusers UNet
import torch
from invokeai.backend.stable_diffusion.extensions_manager import ExtensionsManager
from invokeai.backend.stable_diffusion.extension_callback_type import ExtensionCallbackType
from tiny_models import tiny_unet
from lora_ext.spec import Keyframes, LoraSpec
import lora_ext_nodes.extension as ext
unet = tiny_unet()
before = {k: v.clone() for k, v in unet.state_dict().items()}
spec = LoraSpec("alpha", path=lora_dir + "/alpha.safetensors", unet=Keyframes(((0.0, 0.0), (1.0, 1.0))))
manager = ExtensionsManager()
manager.add_extension(ext.LoraExtDenoiseExtension([spec]))
ts = torch.tensor([999, 500, 0])
ctx = types.SimpleNamespace(inputs=types.SimpleNamespace(timesteps=ts), step_index=None, timestep=None)
x, enc = torch.zeros(1, 4, 8, 8), torch.zeros(1, 5, 16)
with torch.no_grad():
    plain = unet(x, 500, encoder_hidden_states=enc).sample
    outs = []
    with manager.patch_unet(unet, None):
        for ctx.step_index, ctx.timestep in enumerate(ts):
            manager.run_callback(ExtensionCallbackType.PRE_STEP, ctx)
            outs.append(unet(x, 500, encoder_hidden_states=enc).sample)
assert torch.equal(outs[0], plain) and not torch.allclose(outs[2], plain), "strength 0 at step 0, 1 at the end"
assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
assert not any(mod._forward_hooks for mod in unet.modules())
print("ok")
"""


@pytest.mark.host
def test_real_invokeai_node_pack(tmp_path):
    """Opt-in (``-m host``): in the real InvokeAI's own virtualenv (``LORA_EXT_INVOKEAI_PYTHON``),
    the pack registers its nodes, their schemas build, the loader validates and its stack
    survives JSON, and the denoise extension runs under InvokeAI's ExtensionsManager."""
    python = os.environ.get("LORA_EXT_INVOKEAI_PYTHON")
    if not python or not os.path.exists(python):
        pytest.skip("set LORA_EXT_INVOKEAI_PYTHON to the python of a virtualenv with InvokeAI installed")
    make_loras(str(tmp_path / "loras"), tiny_unet(), tiny_text_encoder())
    args = [ROOT, os.path.join(ROOT, "tests"), str(tmp_path / "loras"), os.path.join(ROOT, "hosts", "invokeai")]
    res = subprocess.run([python, "-c", _REAL_HOST_CHECK, *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
