"""The ComfyUI nodes driven through a fake of ComfyUI (tests/fakes/comfyui, mirroring ComfyUI
0.3.64): the custom-node package is loaded the way ComfyUI loads it (the repository's
``__init__.py``), the nodes patch MODEL/CLIP clones, sampling goes through CFGGuider with
its wrappers and callbacks, and at every model evaluation the UNet must compute what the
independent reference computes at that step; afterwards ComfyUI's unpatching gives the
pristine weights back bit-exactly and no hook is left."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

from host_common import FAKES, ROOT, bits, close_weights, make_loras, one_thread_fixture, purge, reference, same_bits, tables
from lora_ext import hostmodel
from lora_ext.spec import Keyframes, LoraSpec
from test_engine import no_hooks
from tiny_models import max_rel_err, tiny_text_encoder, tiny_unet, unet_out

one_thread = one_thread_fixture()
HOST_MODULES = ("comfy", "folder_paths", "nodes", "lora_ext.hosts.comfyui", "lora_ext_custom_nodes")


@pytest.fixture(scope="module")
def tiny():
    return tiny_unet(), tiny_text_encoder()


@pytest.fixture
def comfy(tiny, tmp_path, monkeypatch):
    unet, te = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    purge(*HOST_MODULES)
    monkeypatch.syspath_prepend(os.path.join(FAKES, "comfyui"))
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.samplers
    import comfy.sd
    import folder_paths

    loras = make_loras(str(tmp_path / "loras"), unet, te)
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], folder_paths.supported_pt_extensions)
    hostmodel.register_layout("tiny-sd", tables(unet, te))
    base = comfy.model_base.BaseModel(unet, tables(unet, te)["unet"])
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    clip = comfy.sd.CLIP(te)
    # ComfyUI's load_custom_node: the folder's __init__.py under the folder's name
    spec = importlib.util.spec_from_file_location("lora_ext_custom_nodes", os.path.join(ROOT, "__init__.py"))
    package = importlib.util.module_from_spec(spec)
    sys.modules["lora_ext_custom_nodes"] = package
    spec.loader.exec_module(package)
    ns = types.SimpleNamespace(nodes=package.NODE_CLASS_MAPPINGS, names=package.NODE_DISPLAY_NAME_MAPPINGS,
                               model=model, clip=clip, unet=unet, te=te, loras=loras, comfy=comfy,
                               samplers=comfy.samplers, mm=comfy.model_management,
                               base_unet=copy.deepcopy(unet), base_te=copy.deepcopy(te))
    yield ns
    comfy.model_management.unload_all_models()
    hostmodel.unregister_layout("tiny-sd")
    purge(*HOST_MODULES)


def sample(ns, model, steps=4, second_order=False, observe=None):
    if observe is not None:
        model.add_callback_with_key(ns.comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE, "test-observer", observe)
    sigmas = torch.linspace(10.0, 0.0, steps + 1)
    return ns.samplers.sample(model, torch.zeros(1, 4, 8, 8), None, None, 1.0, torch.device("cpu"),
                              ns.samplers.KSAMPLER(second_order=second_order), sigmas)


def test_node_list_and_inputs(comfy):
    ns = comfy
    assert set(ns.nodes) == {"LoraExtLoader", "LoraExtLoaderModelOnly", "LoraExtPromptLoader", "LoraExtInspector",
                             "LoraExtExpertLoader"}
    assert set(ns.names) == set(ns.nodes)
    inputs = ns.nodes["LoraExtLoader"].INPUT_TYPES()
    assert inputs["required"]["lora_name"][0] == ["alpha.safetensors", "beta.safetensors", "gamma.safetensors"]
    assert {"block_weights", "keyframes"} <= set(inputs["optional"])
    assert ns.nodes["LoraExtLoader"].RETURN_TYPES == ("MODEL", "CLIP")


def test_constant_loras_are_weight_patches_comfy_computes_exactly(comfy):
    ns = comfy
    pristine_u, pristine_t = bits(ns.unet), bits(ns.te)
    loader = ns.nodes["LoraExtLoader"]()
    m1, c1 = loader.load(ns.model, ns.clip, "alpha.safetensors", 0.8, 0.5)
    m2, c2 = loader.load(m1, c1, "beta.safetensors", -0.4, 1.0, block_weights="in=0.5:mid=0:out=1")
    assert ns.model.patches == {} and ns.clip.patcher.patches == {}, "the inputs are not changed (clones)"
    assert not m2.get_wrappers(ns.comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "lora_ext")
    specs = [LoraSpec("alpha", path=ns.loras["alpha"], te=0.5, unet=0.8),
             LoraSpec("beta", path=ns.loras["beta"], te=1.0, unet=-0.4,
                      blocks={**{f"IN{i:02d}": 0.5 for i in range(12)}, "M00": 0.0,
                              **{f"OUT{i:02d}": 1.0 for i in range(12)}})]
    # CLIP: encoding loads the clip patcher, ComfyUI patches the weights
    c2.encode_from_tokens(torch.arange(2, 8).reshape(1, 6))
    assert close_weights(ns.te, reference({"te1": ns.base_te}, specs, 0)["te1"])
    sample(ns, m2)
    assert close_weights(ns.unet, reference({"unet": ns.base_unet}, specs, 0)["unet"])
    assert no_hooks(ns.unet)
    # sampling with the original MODEL: ComfyUI unpatches the clone, the weights are pristine again
    sample(ns, ns.model)
    ns.clip.encode_from_tokens(torch.arange(2, 8).reshape(1, 6))
    assert same_bits(ns.unet, pristine_u) and same_bits(ns.te, pristine_t)


def test_keyframes_per_step_with_other_nodes_wrappers(comfy):
    ns = comfy
    pe = ns.comfy.patcher_extension
    loader = ns.nodes["LoraExtLoader"]()
    m1, c1 = loader.load(ns.model, ns.clip, "gamma.safetensors", 0.7, 0.0)  # constant: a weight patch
    m2, _ = loader.load(m1, c1, "beta.safetensors", 1.0, 1.0, block_weights="in=0.5:mid=1:out=1",
                        keyframes="0@0,1@1")
    m3, _ = loader.load(m2, c1, "alpha.safetensors", 0.9, 1.0, keyframes="1@0,0@2")
    # another custom node's wrappers and callbacks, added before and after ours
    calls = []

    def foreign_outer(executor, *args, **kwargs):
        calls.append("outer")
        return executor(*args, **kwargs)

    def foreign_sampler(executor, *args, **kwargs):
        calls.append("sampler")
        return executor(*args, **kwargs)

    m3 = m3.clone()
    m3.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "other-node", foreign_outer)
    m3.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, "other-node", foreign_sampler)
    assert len(m3.get_wrappers(pe.WrappersMP.SAMPLER_SAMPLE, "lora_ext")) == 1, "one wrapper for all our LoRAs"
    gamma = LoraSpec("gamma", path=ns.loras["gamma"], te=0.0, unet=0.7)
    beta = LoraSpec("beta", path=ns.loras["beta"], unet=Keyframes(((0.0, 0.0), (1.0, 1.0))),
                    blocks={**{f"IN{i:02d}": 0.5 for i in range(12)}, "M00": 1.0, **{f"OUT{i:02d}": 1.0 for i in range(12)}})
    alpha = LoraSpec("alpha", path=ns.loras["alpha"], unet=Keyframes(((0.9, 0.0), (0.0, 2.0))))
    seen = []
    refs = {}

    def observe(patcher, timestep):
        step = {10.0: 0, 7.5: 1, 5.0: 2, 2.5: 3}[round(float(timestep), 3)]
        if step not in refs:
            refs[step] = unet_out(reference({"unet": ns.base_unet}, [gamma, beta, alpha], step, 4)["unet"])
        assert max_rel_err(unet_out(ns.unet), refs[step]) <= 1e-5, f"step {step}"
        seen.append(step)

    sample(ns, m3, steps=4, observe=observe)
    assert seen == [0, 1, 2, 3]
    assert calls == ["outer", "sampler"]
    assert max_rel_err(refs[0], refs[3]) > 1e-3, "the schedule changes the output"
    assert no_hooks(ns.unet), "hooks are taken off when sampling ends"
    assert close_weights(ns.unet, reference({"unet": ns.base_unet}, [gamma], 0)["unet"])
    # a failing sampling run still takes the hooks off
    m4 = m3.clone()

    def boom(patcher, timestep):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        sample(ns, m4, observe=boom)
    assert no_hooks(ns.unet)
    ns.mm.unload_all_models()
    assert same_bits(ns.unet, bits(ns.base_unet))


def test_second_order_sampler_steps(comfy):
    ns = comfy
    m, _ = ns.nodes["LoraExtLoader"]().load(ns.model, ns.clip, "alpha.safetensors", 1.0, 1.0, keyframes="0@0,1@1")
    steps = []

    def observe(patcher, timestep):
        steps.append(patcher.get_attachment("lora_ext").run[0].step)

    sample(ns, m, steps=3, second_order=True, observe=observe)
    assert steps == [0, 1, 1, 2, 2], "the evaluation at sigma_i+1 belongs to the next step's strengths"


def test_prompt_tag_loader_and_inspector(comfy):
    ns = comfy
    m, c, text = ns.nodes["LoraExtPromptLoader"]().load(
        ns.model, ns.clip, "a castle, <lora:alpha:0.7:te=0.3>, snow <lyco:gamma:1:unet=0@0,1@1>")
    assert text == "a castle, snow"
    assert m.get_attachment("lora_ext").specs[0].name == "gamma"
    c.encode_from_tokens(torch.arange(2, 8).reshape(1, 6))
    spec = LoraSpec("alpha", path=ns.loras["alpha"], te=0.3, unet=0.3)
    assert close_weights(ns.te, reference({"te1": ns.base_te}, [spec], 0)["te1"])
    with pytest.raises(Exception, match="nope"):
        ns.nodes["LoraExtPromptLoader"]().load(ns.model, ns.clip, "<lora:nope:1>")
    out = ns.nodes["LoraExtInspector"]().inspect("beta.safetensors")
    report = out["result"][0]
    assert "lokr" in report and "oft" in report and "base model" in report and "NOT APPLIED" in report


def test_repository_init_is_import_light():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('lora_ext_nodes', {os.path.join(ROOT, '__init__.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert set(m.NODE_CLASS_MAPPINGS) == {'LoraExtLoader', 'LoraExtLoaderModelOnly', 'LoraExtPromptLoader', 'LoraExtExpertLoader', "
            "'LoraExtInspector'}\n"
            "heavy = [x for x in ('torch', 'comfy', 'diffusers', 'transformers') if x in sys.modules]\n"
            "assert not heavy, heavy\n"
            f"assert {ROOT!r} not in [os.path.abspath(p) for p in sys.path], 'the repository root went on sys.path'\n"
            "import importlib.util as u\n"
            "top = [n for n in ('tests', 'scripts', 'hosts', 'adapters', 'install', 'benchmarks') if u.find_spec(n)]\n"
            "assert not top, top\n"
            "import lora_ext.hosts.comfyui.patching\n")
    subprocess.run([sys.executable, "-c", "import os\n" + code], check=True, cwd="/")


def test_node_pack_loads_from_its_folder_when_lora_ext_is_not_installed(tmp_path):
    """A checkout in custom_nodes before install.py ran: lora_ext loads from the folder under its
    own name, and the folder itself never goes on sys.path."""
    code = ("import importlib.util, os, sys\n"
            "sys.path = [p for p in sys.path if 'site-packages' not in p and os.path.abspath(p or '.') != "
            f"{ROOT!r}]\n"
            "sys.modules.pop('lora_ext', None)\n"
            "assert importlib.util.find_spec('lora_ext') is None\n"
            f"spec = importlib.util.spec_from_file_location('custom_nodes.lora-ext', {os.path.join(ROOT, '__init__.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "import lora_ext\n"
            f"assert os.path.dirname(lora_ext.__file__) == {os.path.join(ROOT, 'lora_ext')!r}\n"
            "assert 'LoraExtLoader' in m.NODE_CLASS_MAPPINGS and m.WEB_DIRECTORY\n"
            f"assert {ROOT!r} not in [os.path.abspath(p or '.') for p in sys.path]\n"
            "assert importlib.util.find_spec('tests') is None and importlib.util.find_spec('install') is None\n")
    subprocess.run([sys.executable, "-S", "-c", code], check=True, cwd=str(tmp_path))


def test_inpainting_model_takes_the_lora_on_conv_ins_first_channels(comfy, tmp_path):
    """A 9-channel (inpainting) MODEL: the LoRA's conv_in delta lands on the 4 channels it was
    trained for, zeros on the others (what ComfyUI's own key-based loader does)."""
    from diffusers import UNet2DConditionModel

    from test_engine import write_lora

    ns = comfy
    cfg = dict(ns.unet.config)
    cfg["in_channels"] = 9
    torch.manual_seed(2)
    wide = UNet2DConditionModel.from_config(cfg)
    base = ns.comfy.model_base.BaseModel(wide, tables(ns.unet, ns.te)["unet"])
    model = ns.comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    out_c = wide.conv_in.weight.shape[0]
    write_lora(tmp_path / "loras" / "cin.safetensors", [("unet", "conv_in", "lora", (out_c, 4, 3, 3))], seed=3)
    import folder_paths

    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], folder_paths.supported_pt_extensions)
    pristine = bits(wide)
    m, _ = ns.nodes["LoraExtLoader"]().load(model, ns.clip, "cin.safetensors", 0.7, 0.0)
    m.patch_model()
    narrow = copy.deepcopy(ns.unet)
    with torch.no_grad():
        narrow.conv_in.weight.copy_(pristine["conv_in.weight"][:, :4])
    ref = reference({"unet": narrow}, [LoraSpec("cin", path=str(tmp_path / "loras" / "cin.safetensors"),
                                                 unet=0.7, te=0.0)], 0)["unet"]
    got = wide.conv_in.weight
    assert torch.allclose(got[:, :4], ref.conv_in.weight, atol=1e-6)
    assert torch.equal(got[:, 4:], pristine["conv_in.weight"][:, 4:])
    m.unpatch_model()
    assert same_bits(wide, pristine)


def test_low_vram_partial_load_computes_every_forward_from_pristine_weights(comfy):
    """A partial load (ComfyUI's LowVramPatch on the modules beyond the budget): the weights
    stay pristine, every forward computes the patched weight, and the UNet computes what the
    reference computes; plain LoRAs reach ComfyUI as its own LoRAAdapter."""
    ns = comfy
    pristine = bits(ns.unet)
    ns.mm.LOWVRAM_BUDGET = 1  # nothing fits: every module through LowVramPatch
    try:
        loader = ns.nodes["LoraExtLoader"]()
        m1, c1 = loader.load(ns.model, ns.clip, "alpha.safetensors", 0.8, 0.0)
        m2, _ = loader.load(m1, c1, "beta.safetensors", 0.6, 0.0)
        m3, _ = loader.load(m2, c1, "gamma.safetensors", 1.0, 0.0, keyframes="0@0,1@1")
        kinds = {type(p[1]).__name__ for ps in m3.patches.values() for p in ps}
        assert kinds == {"LoRAAdapter", "LoraExtWeightPatch"}, kinds
        alpha = LoraSpec("alpha", path=ns.loras["alpha"], te=0.0, unet=0.8)
        beta = LoraSpec("beta", path=ns.loras["beta"], te=0.0, unet=0.6)
        gamma = LoraSpec("gamma", path=ns.loras["gamma"], te=0.0, unet=Keyframes(((0.0, 0.0), (1.0, 1.0))))
        refs, seen = {}, []

        def observe(patcher, timestep):
            step = {10.0: 0, 7.5: 1, 5.0: 2, 2.5: 3}[round(float(timestep), 3)]
            assert same_bits(ns.unet, pristine), "a partly loaded model keeps its weights"
            if step not in refs:
                refs[step] = unet_out(reference({"unet": ns.base_unet}, [alpha, beta, gamma], step, 4)["unet"])
            assert max_rel_err(unet_out(ns.unet), refs[step]) <= 1e-5, f"step {step}"
            seen.append(step)

        sample(ns, m3, steps=4, observe=observe)
        assert seen == [0, 1, 2, 3]
        assert ns.model.model.model_lowvram
    finally:
        ns.mm.LOWVRAM_BUDGET = 0
    ns.mm.unload_all_models()
    assert same_bits(ns.unet, pristine)
    assert not any("weight_function" in m.__dict__ for m in ns.unet.modules())


def test_weight_patch_computes_on_the_weights_device_and_in_one_tensor(comfy):
    """LowVramPatch hands the patch the weight on the compute device in its dtype: the delta is
    computed there (a 'meta' weight stays on 'meta': nothing goes through the CPU), added into
    the tensor given, and the extra input channels of a wider conv_in keep their weights."""
    from lora_ext.hosts.comfyui import patching

    ns = comfy
    m, _ = ns.nodes["LoraExtLoader"]().load(ns.model, ns.clip, "beta.safetensors", 0.5, 0.0)
    ours = [(k, p[1]) for k, ps in m.patches.items() for p in ps if type(p[1]).__name__ == "LoraExtWeightPatch"]
    assert ours
    identity = lambda a: a  # noqa: E731
    for key, patch in ours:
        w = ns.comfy.utils.get_attr(m.model, key).detach()
        meta = torch.empty(w.shape, device="meta", dtype=torch.float16)
        out = patch.calculate_weight(meta, key, 1.0, 1.0, None, identity, torch.float16)
        assert out.device.type == "meta" and out.dtype == torch.float16
        w16 = w.to(torch.float16)
        got = patch.calculate_weight(w16.clone(), key, 1.0, 1.0, None, identity, torch.float16)
        ref = w.float().clone()
        ref = patch.calculate_weight(ref, key, 1.0, 1.0, None, identity, torch.float32)
        assert got.dtype == torch.float16 and torch.allclose(got.float(), ref, atol=2e-3, rtol=1e-2)
    # an adapter's tensors, small against its weight, are kept per device in fp32 (here: any size)
    key, patch = ours[0]
    item = patch.items[0]
    w = ns.comfy.utils.get_attr(m.model, key).detach()
    assert 0 < patching.CACHE_FRACTION < 1
    old = patching.CACHE_FRACTION
    patching.CACHE_FRACTION = 1e9
    try:
        a = item._on(w)
        assert a is not item.adapter and a is item._on(w.clone())
        assert all(t.dtype == torch.float32 for t in a.tensors.values() if t.is_floating_point())
        assert torch.equal(patch.calculate_weight(w.clone(), key, 1.0, 1.0, None, identity),
                           patch.calculate_weight(w.clone(), key, 1.0, 1.0, None, identity))
    finally:
        patching.CACHE_FRACTION = old


def test_bypass_mode_adds_what_the_weight_patch_adds(comfy):
    """ComfyUI's bypass mode (2026 builds) calls ``h(x, base_out)`` with ``multiplier``,
    ``is_conv``, ``conv_dim``, ``kw_dict`` set on the adapter: lora-ext's patch gives the
    same change as its weight patch, and refuses, naming the types, where the maths needs the
    layer's weight (which bypass never reads)."""
    ns = comfy
    m, _ = ns.nodes["LoraExtLoader"]().load(ns.model, ns.clip, "alpha.safetensors", 1.0, 0.0)
    identity = lambda a: a  # noqa: E731
    checked = 0
    for key, ps in m.patches.items():
        for p in ps:
            patch = p[1]
            if type(patch).__name__ != "LoraExtWeightPatch" or patch.part != "weight":
                continue
            w = ns.comfy.utils.get_attr(m.model, key).detach().float()
            new = patch.calculate_weight(w.clone(), key, 1.0, 1.0, None, identity)
            patch.multiplier = 0.5
            patch.is_conv = w.dim() == 4
            patch.conv_dim = 2
            patch.kw_dict = {"stride": (1, 1), "padding": (1, 1) if w.shape[-1] == 3 else (0, 0),
                             "dilation": (1, 1), "groups": 1}
            x = torch.randn(2, w.shape[1], 6, 6) if patch.is_conv else torch.randn(3, w.shape[1])
            op = (lambda t, k: torch.nn.functional.conv2d(t, k, **patch.kw_dict)) if patch.is_conv else \
                torch.nn.functional.linear
            want = 0.5 * (op(x, new) - op(x, w))
            got = patch.g(op(x, w) + patch.h(x, op(x, w))) - op(x, w)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), key
            checked += 1
    assert checked
    m2, _ = ns.nodes["LoraExtLoader"]().load(ns.model, ns.clip, "beta.safetensors", 1.0, 0.0)
    dep = [p[1] for ps in m2.patches.values() for p in ps
           if type(p[1]).__name__ == "LoraExtWeightPatch" and any(i.weight_dependent for i in p[1].items)]
    assert dep
    with pytest.raises(Exception, match="bypass mode"):
        dep[0].h(torch.randn(2, 3), torch.zeros(2, 3))


def test_model_only_and_clip_failure_do_not_block_each_other(comfy, caplog):
    """MODEL only (CLIP left open, or the model-only node): the LoRA's text-encoder keys are
    not "not applied"; a CLIP lora-ext cannot bind leaves the CLIP as it was and the MODEL
    still takes the LoRA."""
    import logging

    ns = comfy
    caplog.set_level(logging.INFO, logger="lora_ext")
    m, c = ns.nodes["LoraExtLoader"]().load(ns.model, None, "alpha.safetensors", 0.8, 0.5)
    assert c is None and m.patches
    (m2,) = ns.nodes["LoraExtLoaderModelOnly"]().load(ns.model, "alpha.safetensors", 0.8)
    assert set(m2.patches) == set(m.patches)
    # keyframed: the sampling-time session must not call the text-encoder keys "not applied" either
    (m4,) = ns.nodes["LoraExtLoaderModelOnly"]().load(ns.model, "alpha.safetensors", 0.8, keyframes="0@0,1@1")
    sample(ns, m4)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "not applied" not in caplog.text, caplog.text
    from lora_ext.hosts.comfyui import patching

    _, _, lines = patching.apply(ns.model, None, [ns.nodes["LoraExtLoader"] and
                                                 __import__("lora_ext.session", fromlist=["x"]).spec_from_inputs(
                                                     "alpha", ns.loras["alpha"], unet=0.8, te=0.5)])
    assert any("keys for the CLIP, which is not connected" in ln for ln in lines), lines
    # a CLIP without any CLIP-L/H/G: reported, left unchanged; the MODEL still patched
    broken = ns.clip.clone()
    broken.cond_stage_model = torch.nn.Module()
    m3, c3 = ns.nodes["LoraExtLoader"]().load(ns.model, broken, "alpha.safetensors", 0.8, 0.5)
    assert c3 is broken and set(m3.patches) == set(m.patches)
    assert any("CLIP is left unchanged" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match="CLIP"):
        ns.nodes["LoraExtLoader"]().load(ns.model, broken, "alpha.safetensors", 0.0, 0.5)


def test_two_expert_loader_gives_each_model_its_file(comfy, tmp_path):
    """Wan 2.2 A14B workflows load the high- and low-noise experts as two MODELs: the pair's
    files go each to its expert, with one strength or the low expert's own."""
    import shutil

    ns = comfy
    shutil.copy(ns.loras["alpha"], tmp_path / "loras" / "pair_HIGH.safetensors")
    shutil.copy(ns.loras["beta"], tmp_path / "loras" / "pair_LOW.safetensors")
    clone = ns.model.clone()
    high, low = ns.nodes["LoraExtExpertLoader"]().load(ns.model, clone, "pair_LOW.safetensors", 0.8, 0.3)
    sample(ns, high)
    assert close_weights(ns.unet, reference({"unet": ns.base_unet}, [LoraSpec("a", path=ns.loras["alpha"], unet=0.8)], 0)["unet"])
    sample(ns, low)
    assert close_weights(ns.unet, reference({"unet": ns.base_unet}, [LoraSpec("b", path=ns.loras["beta"], unet=0.3)], 0)["unet"])
    with pytest.raises(ValueError, match="names no expert"):
        ns.nodes["LoraExtExpertLoader"]().load(ns.model, clone, "alpha.safetensors", 1.0)
