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

from host_common import (FAKES, LIN, FF, MID_Q, ROOT, TE_FC1, TE_Q, _te_module, bits, make_loras, one_thread_fixture,
                         purge, reference, same_bits, write_lora)
from lora_ext.errors import LoraExtError
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


def _wrong_base_lora(ns, tmp_path):
    """An "SDXL" LoRA for the tiny SD1.5-like graph: its CLIP-L keys fit the text encoder (as an
    SDXL LoRA's te1 keys fit SD1.5's), its UNet keys have the other base's shapes; metadata says SDXL."""
    from safetensors.torch import load_file, save_file
    from test_engine import _shape as shape_of

    lin = shape_of(ns.unet, LIN)
    te_q = tuple(_te_module(ns.te, TE_Q).weight.shape)
    path = write_lora(tmp_path / "loras" / "xl.safetensors", [("unet", LIN, "lora", (lin[0] * 2, lin[1] * 2)),
                                                     ("unet", FF, "lora", (7, 5)), ("te", TE_Q, "lora", te_q)], seed=4)
    save_file(load_file(path), path, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return path


def _graph(ns, stack, prompt="a castle", steps=2, **denoise):
    cond = ns.pack.LoraExtCompelInvocation(prompt=prompt, clip=ns.clip_field, lora_ext=stack).invoke(ns.ctx)
    out = ns.pack.LoraExtDenoiseLatentsInvocation(positive_conditioning=cond.conditioning, unet=ns.unet_field,
                                                  steps=steps, lora_ext=cond.lora_ext, **denoise).invoke(ns.ctx)
    return cond, out


def test_wrong_base_lora_is_reported_and_fails_the_denoise(invoke, tmp_path):
    ns = invoke
    pristine_u, pristine_t = bits(ns.unet), bits(ns.te)
    path = _wrong_base_lora(ns, tmp_path)
    stack = ns.pack.LoraExtLoaderInvocation(lora=path).invoke(ns.ctx).lora_ext
    seen = []
    hook = ns.te.register_forward_hook(
        lambda m, a, o: seen.append(_te_matches(ns, [LoraSpec("xl", path=path, te=1.0)])))
    try:
        cond = ns.pack.LoraExtCompelInvocation(prompt="a castle", clip=ns.clip_field, lora_ext=stack).invoke(ns.ctx)
    finally:
        hook.remove()
    assert seen == [True], "its CLIP-L keys applied"
    warnings = [m for lv, m in ns.ctx.logger.records if lv == "warning"]
    assert any("is for SDXL, but this text encoder is SD1.x" in m and "1 of its modules" in m for m in warnings), \
        warnings
    with pytest.raises(LoraExtError, match=r"none of its 6 keys for it fits this SD1.x UNet \(it is an SDXL LoRA\)"):
        ns.pack.LoraExtDenoiseLatentsInvocation(positive_conditioning=cond.conditioning, unet=ns.unet_field, steps=2,
                                                lora_ext=cond.lora_ext).invoke(ns.ctx)
    assert same_bits(ns.unet, pristine_u) and no_hooks(ns.unet) and not ns.unet._forward_pre_hooks
    assert same_bits(ns.te, pristine_t) and no_hooks(ns.te) and not ns.te._forward_pre_hooks
    assert all(rec["locks"] == 0 for rec in ns.ctx.models.records.values())
    debug = [m for lv, m in ns.ctx.logger.records if lv == "debug"]
    assert sum("not applied to the UNet" in m for m in debug) == 9, "every key reported"
    # an SDXL LoRA with nothing for the text encoder: a warning there (the denoise node fails on it)
    from safetensors.torch import load_file, save_file

    unet_only = str(tmp_path / "loras" / "xl_unet.safetensors")
    save_file({k: v for k, v in load_file(path).items() if k.startswith("lora_unet_")}, unet_only,
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    ns.ctx.logger.records.clear()
    stack = ns.pack.LoraExtLoaderInvocation(lora=unet_only).invoke(ns.ctx).lora_ext
    ns.pack.LoraExtCompelInvocation(prompt="a castle", clip=ns.clip_field, lora_ext=stack).invoke(ns.ctx)
    assert [m for lv, m in ns.ctx.logger.records if lv == "warning"] == [
        "lora-ext: <lora:xl_unet:1> is for SDXL, but this text encoder is SD1.x: it has no keys for the text "
        "encoder; 6 keys are for the UNet"]


def test_a_lora_with_nothing_for_the_text_encoder_fails_the_prompt_node(invoke, tmp_path):
    ns = invoke
    te_fc1 = tuple(_te_module(ns.te, TE_FC1).weight.shape)
    path = write_lora(tmp_path / "loras" / "bad_te.safetensors", [("te", TE_FC1, "lora", (te_fc1[0] + 3, te_fc1[1]))], seed=5)
    stack = ns.pack.LoraExtLoaderInvocation(lora=path).invoke(ns.ctx).lora_ext
    with pytest.raises(LoraExtError, match="none of its 3 keys for it fits this SD1.x text encoder"):
        ns.pack.LoraExtCompelInvocation(prompt="x", clip=ns.clip_field, lora_ext=stack).invoke(ns.ctx)
    assert no_hooks(ns.te) and not ns.te._forward_pre_hooks
    # a UNet-only LoRA has nothing for the text encoder: not an error there, and not "not applied"
    stack = ns.pack.LoraExtLoaderInvocation(lora="gamma").invoke(ns.ctx).lora_ext
    ns.ctx.logger.records.clear()
    _graph(ns, stack)
    assert not [m for lv, m in ns.ctx.logger.records if lv in ("warning", "error")], ns.ctx.logger.records
    assert any(lv == "info" and "modules applied to the UNet" in m for lv, m in ns.ctx.logger.records)


def test_lora_ext_log_lines_reach_the_invokeai_logger_at_their_level(invoke):
    import logging

    ns = invoke
    ns.ctx.config.get().log_level = "debug"
    lg = logging.getLogger("lora_ext")
    level, handlers = lg.level, list(lg.handlers)

    def talk(module, args):
        logging.getLogger("lora_ext.engine").debug("d-line %d", 1)
        logging.getLogger("lora_ext.engine").info("i-line")
        logging.getLogger("lora_ext").warning("w-line")
        logging.getLogger("lora_ext.session").error("e-line")

    h = ns.te.register_forward_pre_hook(talk)
    try:
        stack = ns.pack.LoraExtLoaderInvocation(lora="alpha").invoke(ns.ctx).lora_ext
        ns.pack.LoraExtCompelInvocation(prompt="x", clip=ns.clip_field, lora_ext=stack).invoke(ns.ctx)
    finally:
        h.remove()
    got = [r for r in ns.ctx.logger.records if r[1].endswith("-line") or r[1] == "d-line 1"]
    assert got == [("debug", "d-line 1"), ("info", "i-line"), ("warning", "w-line"), ("error", "e-line")]
    # the session's raw count (UNet keys seen from the prompt node) is at debug, not "not applied" at info
    assert not any(lv != "debug" and "keys not applied" in m for lv, m in ns.ctx.logger.records)
    assert lg.level == level and lg.handlers == handlers


def test_models_are_pinned_so_an_eviction_cannot_leave_hooks_on_a_stale_module(invoke):
    """Under memory pressure every load drops the unlocked records of the other models (InvokeAI's
    cache making room): lora-ext pins what it hooks, so InvokeAI's node runs that same module."""
    ns = invoke
    specs_stack = ns.pack.LoraExtLoaderInvocation(lora="alpha", weight=0.8, clip_weight=0.6).invoke(ns.ctx).lora_ext
    _, calm = _graph(ns, specs_stack)
    want = ns.ctx.tensors.load(calm.latents.latents_name)
    ns.ctx.models.memory_pressure = True
    _, stressed = _graph(ns, specs_stack)
    assert torch.equal(ns.ctx.tensors.load(stressed.latents.latents_name), want)
    for key in ("unet", "te"):
        for m in ns.ctx.models.built[key]:
            assert no_hooks(m) and not m._forward_pre_hooks
    assert len(ns.ctx.models.built["unet"]) > 1, "the cache did drop and reload the UNet"
    _, plain = _graph(ns, None)
    assert not torch.equal(ns.ctx.tensors.load(plain.latents.latents_name), want), "the LoRA acts"


def test_a_node_fails_when_invokeai_runs_another_copy_than_the_hooked_one(invoke, monkeypatch):
    import contextlib

    ns = invoke
    from invokeai.app.services.shared import invocation_context as ic

    @contextlib.contextmanager
    def stale(self):  # the pinned module is not the one InvokeAI then runs
        yield copy.deepcopy(self.model)

    monkeypatch.setattr(ic.LoadedModel, "model_in_ram", stale)
    stack = ns.pack.LoraExtLoaderInvocation(lora="alpha").invoke(ns.ctx).lora_ext
    with pytest.raises(LoraExtError, match="ran a copy of the text encoder other than"):
        ns.pack.LoraExtCompelInvocation(prompt="x", clip=ns.clip_field, lora_ext=stack).invoke(ns.ctx)
    monkeypatch.undo()
    cond = ns.pack.LoraExtCompelInvocation(prompt="x", clip=ns.clip_field, lora_ext=stack).invoke(ns.ctx)
    monkeypatch.setattr(ic.LoadedModel, "model_in_ram", stale)
    with pytest.raises(LoraExtError, match="ran a copy of the UNet other than"):
        ns.pack.LoraExtDenoiseLatentsInvocation(positive_conditioning=cond.conditioning, unet=ns.unet_field, steps=2,
                                                lora_ext=cond.lora_ext).invoke(ns.ctx)


def test_sdxl_prompt_node_reads_tags_in_the_style_too(invoke):
    ns = invoke
    from invokeai.app.invocations.model import CLIPField, ModelIdentifierField

    te2 = copy.deepcopy(ns.te)
    ns.ctx.models.add("te2", te2)
    clip2 = CLIPField(tokenizer=ModelIdentifierField("tok"), text_encoder=ModelIdentifierField("te2"))
    specs = [LoraSpec("beta", path=ns.loras["beta"], te=0.5), LoraSpec("alpha", path=ns.loras["alpha"], te=0.8)]
    seen = []
    hooks = [ns.te.register_forward_hook(lambda m, a, o: seen.append(("te1", _te_matches(ns, specs[:1])))),
             te2.register_forward_hook(lambda m, a, o: seen.append(("te2", _te2_matches(ns, te2, specs[1:]))))]
    try:
        node = ns.pack.LoraExtSDXLCompelInvocation(prompt="a castle <lora:beta:0.5>", style="ink <lora:alpha:0.8>",
                                                   clip=ns.clip_field, clip2=clip2)
        # beta's text-encoder module is in CLIP-L only, alpha's in both: each encoder runs with what fits it
        cond = node.invoke(ns.ctx)
    finally:
        for h in hooks:
            h.remove()
    saved = ns.ctx.conditioning.load(cond.conditioning.conditioning_name)
    assert (saved["prompt"], saved["style"]) == ("a castle", "ink")
    assert [e["name"] for e in cond.lora_ext.loras] == ["beta", "alpha"]
    assert [c for c, _ in seen] == ["te1", "te2"]
    # the same LoRA tagged in the prompt and the style (InvokeAI's UI copies the prompt) applies once
    node = ns.pack.LoraExtSDXLCompelInvocation(prompt="a <lora:alpha:0.8>", style="a <lora:alpha:0.8>",
                                               clip=ns.clip_field, clip2=clip2)
    assert [e["name"] for e in node.invoke(ns.ctx).lora_ext.loras] == ["alpha"]
    assert no_hooks(ns.te) and no_hooks(te2)


def _te2_matches(ns, te2, specs):
    ref = reference({"te1": ns.base_te}, specs, 0)["te1"]
    ids = torch.arange(2, 8).reshape(1, 6)
    h = te2._forward_hooks.copy()
    te2._forward_hooks.clear()
    try:
        with torch.no_grad():
            return max_rel_err(te2(ids).last_hidden_state, ref(ids).last_hidden_state) <= 1e-5
    finally:
        te2._forward_hooks.update(h)


def real_host_loras(folder) -> list:
    """LoRA files for the real-InvokeAI check (kohya names, as InvokeAI's own loader reads them:
    ``lora_unet_`` + the diffusers module path, ``lora_te_text_model_...``): "mix" holds LoRA
    (linear, 3x3 conv), LoHa and LoKr modules for the UNet and LoRA / LoHa for the text encoder;
    "wrong_xl" says SDXL in its metadata, its text-encoder module fits, its UNet ones do not."""
    from safetensors.torch import save_file
    from test_engine import C3, adapter_tensors

    os.makedirs(folder, exist_ok=True)
    unet, te = tiny_unet(), tiny_text_encoder()
    def shape(root, path):  # transformers 5.25 has no ``text_model`` level; InvokeAI's 5.5 has it
        if path.startswith("text_model.") and not hasattr(root, "text_model"):
            path = path[len("text_model."):]
        return tuple(root.get_submodule(path).weight.shape)
    g = torch.Generator().manual_seed(11)

    def entries(items):
        sd = {}
        for comp, path, kind, shp in items:
            prefix = ("lora_unet_" if comp == "unet" else "lora_te_") + path.replace(".", "_")
            for k, t in adapter_tensors(kind, shp, g, rank=2, mag=0.3).items():
                sd[f"{prefix}.{k}"] = t.contiguous()
        return sd

    q, fc1 = "text_model." + TE_Q, "text_model." + TE_FC1
    mix = entries([("unet", LIN, "lora", shape(unet, LIN)), ("unet", C3, "lora", shape(unet, C3)),
                   ("unet", FF, "loha", shape(unet, FF)), ("unet", MID_Q, "lokr", shape(unet, MID_Q)),
                   ("te", q, "lora", shape(te, q)), ("te", fc1, "loha", shape(te, fc1))])
    save_file(mix, os.path.join(folder, "mix.safetensors"))
    lin = shape(unet, LIN)
    wrong = entries([("unet", LIN, "lora", (lin[0] * 2, lin[1] * 2)), ("unet", FF, "lora", (7, 5)),
                     ("te", q, "lora", shape(te, q))])
    save_file(wrong, os.path.join(folder, "wrong_xl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    # for the tiny SDXL model: the same UNet modules, LoRA on CLIP-L and LoHa on CLIP-G ("lora_te1_"/"lora_te2_")
    xl = entries([("unet", LIN, "lora", shape(unet, LIN)), ("unet", C3, "lora", shape(unet, C3)),
                  ("unet", FF, "loha", shape(unet, FF)), ("unet", MID_Q, "lokr", shape(unet, MID_Q))])
    for comp, path, kind in (("lora_te1_", q, "lora"), ("lora_te2_", fc1, "loha")):
        for k, t in adapter_tensors(kind, shape(te, path), g, rank=2, mag=0.3).items():
            xl[f"{comp}{path.replace('.', '_')}.{k}"] = t.contiguous()
    save_file(xl, os.path.join(folder, "mix_sdxl.safetensors"))
    return ["mix", "wrong_xl", "mix_sdxl"]


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
    python = _invokeai_python()
    make_loras(str(tmp_path / "loras"), tiny_unet(), tiny_text_encoder())
    args = [ROOT, os.path.join(ROOT, "tests"), str(tmp_path / "loras"), os.path.join(ROOT, "hosts", "invokeai")]
    res = subprocess.run([python, "-c", _REAL_HOST_CHECK, *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def _invokeai_python():
    python = os.environ.get("LORA_EXT_INVOKEAI_PYTHON")
    if not python or not os.path.exists(python):
        pytest.skip("set LORA_EXT_INVOKEAI_PYTHON to the python of a virtualenv with InvokeAI installed")
    return python


@pytest.mark.host
@pytest.mark.parametrize("cache", ["room", "ram-pressure"])
def test_real_invokeai_runs_the_nodes(tmp_path, cache):
    """Opt-in (``-m host``): tests/invokeai_realhost_check.py, in InvokeAI's own virtualenv, starts
    InvokeAI's services (model manager and cache, session queue and processor), loads the pack
    from a ``nodes/`` folder and runs graphs on the queue with InvokeAI's own invocation code:
    lora-ext's loader -> prompt -> denoise equals InvokeAI's ``lora_loader`` path (LoRA, LoHa, LoKr
    on the UNet, LoRA and LoHa on the text encoder), a prompt tag equals the loader, every node
    completes (a node that raises fails this test with InvokeAI's error), a LoRA for another base
    gets a warning from the prompt node and fails the denoise node, lora-ext's log lines reach
    InvokeAI's logger at their level, and the cached models end with no hook and their files' weights.
    "ram-pressure" runs it all with a RAM cache of 1 kB (``max_cache_ram_gb``), so InvokeAI drops every
    model it may between loads: lora-ext's pinned models are still the ones InvokeAI runs (measured:
    unpinned, the denoise and SDXL prompt nodes found their hooks on a dropped copy)."""
    import json

    python = _invokeai_python()
    loras = real_host_loras(str(tmp_path / "loras"))
    (tmp_path / "root").mkdir()
    out = tmp_path / "result.json"
    res = subprocess.run([python, os.path.join(ROOT, "tests", "invokeai_realhost_check.py"), str(tmp_path / "root"),
                          str(tmp_path / "loras"), str(out)] + (["--ram-pressure"] if cache == "ram-pressure" else []),
                         capture_output=True, text=True, timeout=900)
    assert out.exists(), (res.stdout + res.stderr)[-3000:]
    r = json.loads(out.read_text())
    assert not r["errors"], r["errors"][0][-3000:]
    print(f"InvokeAI {r['invokeai']} (torch {r['torch']}), cache {cache}: {json.dumps(r['compare'])}")
    assert set(r["registered"]) >= {"lora_ext_lora_loader", "lora_ext_compel", "lora_ext_sdxl_compel_prompt",
                                    "lora_ext_denoise_latents"}
    for name, run in r["runs"].items():
        if not name.startswith("lora_ext:wrong"):
            assert run["status"] == "completed", f"{name}: {run['error_type']}: {run['error_message']}"
    for name in loras:
        if name.startswith("wrong"):
            continue
        c = r["compare"][name]
        for k in ("lora_ext_vs_builtin", "tag_vs_builtin", "style_tag_vs_builtin"):
            assert c.get(k, 0) <= 1e-5, (name, c)
        assert c["builtin_vs_plain"] > 1e-2, ("the LoRA acts", name, c)
    assert "style_tag_vs_builtin" in r["compare"]["mix_sdxl"], "the SDXL prompt node read the tag in the style"
    wrong = r["runs"]["lora_ext:wrong_xl"]
    assert wrong["status"] == "failed" and wrong["error_type"] == "LoraExtError", wrong
    assert "none of its 6 keys for it fits this SD1.x UNet (it is an SDXL LoRA)" in wrong["error_message"]
    assert any(lv == "warning" and "is for SDXL, but this text encoder is SD1.x" in m for lv, m in r["wrong_base_log"])
    # lora-ext's own log lines (the engine's, the session's) reach InvokeAI's logger at their level
    assert any(lv == "info" and "modules applied to the UNet" in m for lv, m in r["lora_ext_log"])
    assert any(lv == "debug" and "keys not applied (first:" in m for lv, m in r["wrong_base_log"]), r["wrong_base_log"]
    assert r["clean"] == {"unet": {"hooks": 0, "weights_equal_file": True},
                          "text_encoder": {"hooks": 0, "weights_equal_file": True}}
