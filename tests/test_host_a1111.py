"""The A1111 / SD.Next shim driven through a fake of the webui (tests/fakes/a1111, mirroring
stable-diffusion-webui v1.10.1): the extension is loaded the way the webui loads it (the
built-in Lora extension first), a txt2img run with hires fix goes through
``process_images``, and at every denoiser step the model must compute what the
independent reference (W0 + sum of strength x delta, at that step) computes; afterwards the
weights are restored bit-exactly."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from host_common import (FAKES, ROOT, bits, close_weights, make_loras, one_thread_fixture, purge, reference,
                         same_bits, tables)
from lora_ext import arch, hostmodel
from test_engine import TE_Q, no_hooks
from tiny_models import max_rel_err, tiny_text_encoder, tiny_unet, unet_out

one_thread = one_thread_fixture()

HOST_MODULES = ("modules", "networks", "lora_patches", "extra_networks_lora", "lora_script", "fake_model",
                "lora_ext.hosts.a1111")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_unet(), tiny_text_encoder()


@pytest.fixture
def webui(tiny, tmp_path, monkeypatch):
    """A fake webui with lora-ext loaded; yields a namespace of its modules and helpers."""
    import copy
    import types

    unet, te = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    purge(*HOST_MODULES)
    monkeypatch.syspath_prepend(os.path.join(FAKES, "a1111", "builtin_lora"))
    monkeypatch.syspath_prepend(os.path.join(FAKES, "a1111"))
    from modules import errors, extra_networks, infotext_utils, processing, script_callbacks, scripts, shared

    import fake_model

    errors.displayed.clear()
    hostmodel.register_layout("tiny-sd", tables(unet, te))
    loras = make_loras(str(tmp_path / "Lora"), unet, te)
    shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
    shared.cmd_opts.lyco_dir_backcompat = str(tmp_path / "LyCORIS")
    # the webui's start-up: built-in extensions first, then user extensions, then the UI
    import lora_script  # noqa: F401  (extensions-builtin/Lora/scripts/lora_script.py)

    scripts.load_script_file(os.path.join(ROOT, "scripts", "lora_ext_script.py"), ROOT)
    script_callbacks.before_ui_callback()
    script_callbacks.ui_settings_callback()
    script_callbacks.app_started_callback(None, None)
    model = fake_model.FakeSDModel(unet, tables(unet, te)["unet"], te=te)
    shared.sd_model = model
    script_callbacks.model_loaded_callback(model)
    ns = types.SimpleNamespace(shared=shared, cb=script_callbacks, en=extra_networks, processing=processing,
                               scripts=scripts, infotext=infotext_utils, errors=errors, model=model, unet=unet,
                               te=te, loras=loras, tmp=tmp_path, runner=scripts.ScriptRunner())
    yield ns
    script_callbacks.script_unloaded_callback()
    hostmodel.unregister_layout("tiny-sd")
    purge(*HOST_MODULES)


def run(ns, prompt, steps=4, hires_steps=0, sampler="Euler", observe=None):
    p = ns.processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, steps=steps, enable_hr=bool(hires_steps), hr_second_pass_steps=hires_steps,
        sd_model=ns.model, scripts=ns.runner, sampler_name=sampler)
    ns.model.observers[:] = [observe] if observe else []
    return p, ns.processing.process_images(p)


def test_txt2img_with_hires_every_step_and_restore(webui):
    ns = webui
    from lora_ext.prompt import parse_prompt

    ns.shared.opts.lora_ext_restore = "restore"
    prompt = ("a castle, <lora:alpha:0.8:unet=0@0,1@1:hr=0.3>, "
              "<lyco:beta:0.6:in=0.5:out=1:start=1>, <loractl:gamma:1:te=0.2:unet=1@0,0@3>")
    specs = parse_prompt(prompt).specs
    for s, name in zip(specs, ("alpha", "beta", "gamma")):
        s.path = ns.loras[name]
    pristine = {"unet": bits(ns.unet), "te1": bits(ns.te)}
    import copy

    base_unet, base_te = copy.deepcopy(ns.unet), copy.deepcopy(ns.te)
    seen = []
    refs = {}

    def observe(stage, info):
        p = current[0]
        hires = bool(p.is_hr_pass)
        total = (p.hr_second_pass_steps or p.steps) if hires else p.steps
        if stage == "te":
            ref = reference({"te1": base_te}, specs, 0, total, hires)["te1"]
            assert close_weights(ns.te, ref), f"text encoder weights wrong (hires={hires})"
            seen.append(("te", hires))
            return
        step = len([x for x in seen if x[0] == "unet" and x[2] == hires])
        key = (step, total, hires)
        if key not in refs:
            refs[key] = unet_out(reference({"unet": base_unet}, specs, step, total, hires)["unet"])
        got = unet_out(ns.unet)
        assert max_rel_err(got, refs[key]) <= 1e-5, f"step {step} of {total} (hires={hires}) computes wrong"
        seen.append(("unet", step, hires))

    current = [None]
    p = ns.processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, steps=4, enable_hr=True, hr_second_pass_steps=3, sd_model=ns.model, scripts=ns.runner)
    current[0] = p
    ns.model.observers[:] = [observe]
    res = ns.processing.process_images(p)
    assert not ns.errors.displayed, ns.errors.displayed
    assert [x for x in seen if x[0] == "unet"] == [("unet", i, False) for i in range(4)] + \
        [("unet", i, True) for i in range(3)]
    assert ("te", False) in seen and ("te", True) in seen
    # the LoRAs changed the output at all (otherwise the checks above test nothing)
    assert max_rel_err(refs[(3, 4, False)], unet_out(base_unet)) > 1e-3
    # restore setting: the model is given back bit-exactly, no hook left
    assert same_bits(ns.unet, pristine["unet"]) and same_bits(ns.te, pristine["te1"])
    assert no_hooks(ns.unet, ns.te)
    # infotext: names, hashes (the built-in handler's format), canonical tags with schedules
    from lora_ext.io import short_hash

    info = res.infotexts[0]
    assert f"alpha: {short_hash(ns.loras['alpha'])}" in info and f"gamma: {short_hash(ns.loras['gamma'])}" in info
    assert "unet=0@0,1@1" in info and "hr=0.3" in info and "start=1" in info


def test_keep_setting_then_prompt_without_tags_restores(webui):
    ns = webui
    pristine = bits(ns.unet)
    run(ns, "a castle <lora:alpha:1>")
    assert not same_bits(ns.unet, pristine), "keep: the LoRA stays applied after the run"
    run(ns, "a castle")
    assert same_bits(ns.unet, pristine)


def test_infotext_paste_restores_tags_and_local_names(webui):
    ns = webui
    ns.shared.opts.lora_ext_restore = "restore"
    p, res = run(ns, "a castle <lora:alpha:0.7:unet=0@0,1@1> <lora:gamma:0.5>")
    # the user has alpha under another name, in another folder: found by hash
    other = ns.tmp / "Mine"
    other.mkdir()
    shutil.copy(ns.loras["alpha"], other / "alpha_v2.safetensors")
    os.remove(ns.loras["alpha"])
    ns.shared.opts.lora_ext_dirs = f"{ns.tmp / 'Lora'};{other}"
    first, rest = res.infotexts[0].split("\n", 1)
    text = first.replace(" <lora:gamma:0.5>", "") + "\n" + rest  # the user trimmed one tag from the prompt
    d = ns.infotext.parse_generation_parameters(text)
    assert "<lora:alpha_v2:0.7:unet=0@0,1@1>" in d["Prompt"]
    assert "<lora:gamma:0.5>" in d["Prompt"]


def test_builtin_handler_when_turned_off(webui):
    ns = webui
    import networks

    pristine = bits(ns.unet)
    ns.shared.opts.lora_ext_enabled = False
    run(ns, "a castle <lora:alpha:0.5>")
    assert networks.extra_network_lora.calls[-1] == [["alpha", "0.5"]]
    assert same_bits(ns.unet, pristine) is False  # the built-in one patched (its fake change)
    # back on: the built-in one takes its networks off first, then lora-ext applies
    ns.shared.opts.lora_ext_enabled = True
    ns.shared.opts.lora_ext_restore = "restore"
    run(ns, "a castle <lora:alpha:0.5>")
    assert networks.loaded_networks == []
    assert same_bits(ns.unet, pristine)
    assert not ns.errors.displayed, ns.errors.displayed


def test_handler_registered_with_aliases_and_given_back(webui):
    ns = webui
    import networks

    ours = ns.en.extra_network_registry["lora"]
    assert ours is not networks.extra_network_lora
    assert ns.en.extra_network_aliases["lyco"] is ours and ns.en.extra_network_aliases["loractl"] is ours
    labels = ns.shared.opts.data_labels
    assert {"lora_ext_dirs", "lora_ext_method", "lora_ext_restore", "lora_ext_enabled"} <= set(labels)
    assert labels["lora_ext_method"].section == ("lora_ext", "lora-ext")
    ns.cb.script_unloaded_callback()
    assert ns.en.extra_network_registry["lora"] is networks.extra_network_lora
    assert ns.en.extra_network_aliases["lyco"] is networks.extra_network_lora
    assert "loractl" not in ns.en.extra_network_aliases


def test_model_reloaded_in_place(webui):
    ns = webui
    run(ns, "a castle <lora:alpha:1>")  # keep: applied
    # the webui loads another checkpoint's weights into the same model objects
    other = tiny_unet(seed=5)
    with torch.no_grad():
        for (_, a), (_, b) in zip(ns.unet.named_parameters(), other.named_parameters()):
            a.copy_(b)
    loaded = bits(ns.unet)
    import copy

    from lora_ext.spec import LoraSpec

    want = reference({"unet": copy.deepcopy(ns.unet)}, [LoraSpec("alpha", path=ns.loras["alpha"])], 0, 4)["unet"]
    ns.cb.model_loaded_callback(ns.model)
    # the old LoRA state is forgotten (its weights are gone), the LoRAs go on the new weights
    assert close_weights(ns.unet, want), "the LoRAs are applied to the newly loaded weights"
    ns.shared.opts.lora_ext_restore = "restore"
    run(ns, "a castle <lora:alpha:1>")
    assert same_bits(ns.unet, loaded)
    assert not ns.errors.displayed, ns.errors.displayed


def test_second_order_sampler_counts_steps_like_the_webui(webui):
    ns = webui
    steps = []
    from lora_ext.hosts.a1111 import shim

    def spy(params):
        steps.append(shim.SHIM.session.step)

    run(ns, "x <lora:alpha:1:unet=0@0,1@1>", steps=3, sampler="Heun")
    ns.cb.on_cfg_denoiser(spy)
    run(ns, "x <lora:alpha:1:unet=0@0,1@1>", steps=3, sampler="Heun")
    assert steps == [0, 0, 1, 1, 2]


def test_bad_tag_and_missing_lora_are_reported(webui):
    ns = webui
    pristine = bits(ns.unet)
    run(ns, "a castle <lora:alpha:0.5:unte=1>")
    msg = str(ns.errors.displayed[-1][1])
    assert "unte" in msg and "position" in msg and "did you mean unet=" in msg
    run(ns, "a castle <lora:nope:1>")
    msg = str(ns.errors.displayed[-1][1])
    assert "nope" in msg and "Lora" in msg
    assert same_bits(ns.unet, pristine)


def test_openclip_text_encoder_fused_qkv(tiny, tmp_path, monkeypatch):
    """SD2-style text encoder: q/k/v live fused in nn.MultiheadAttention.in_proj_weight."""
    import copy

    unet, te = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    purge(*HOST_MODULES)
    monkeypatch.syspath_prepend(os.path.join(FAKES, "a1111"))
    from modules import processing, script_callbacks, scripts, shared

    import fake_model

    try:
        oc = fake_model.openclip_tree(te)
        te_table = arch._build_table("te1", te, {}, "cond_stage_model.model.", "openclip")
        hostmodel.register_layout("tiny-sd2", {"unet": tables(unet, te)["unet"], "te1": te_table})
        loras = make_loras(str(tmp_path / "Lora"), unet, te)
        shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
        scripts.load_script_file(os.path.join(ROOT, "scripts", "lora_ext_script.py"), ROOT)
        script_callbacks.before_ui_callback()
        script_callbacks.ui_settings_callback()
        model = fake_model.FakeSDModel(unet, tables(unet, te)["unet"], openclip=oc)
        shared.opts.lora_ext_restore = "keep"
        before = oc.transformer.resblocks[0].attn.in_proj_weight.detach().clone()
        p = processing.StableDiffusionProcessingTxt2Img(prompt="x <lora:alpha:0.9>", steps=2, sd_model=model,
                                                        scripts=scripts.ScriptRunner())
        processing.process_images(p)
        from lora_ext.spec import LoraSpec

        ref = reference({"te1": te}, [LoraSpec("alpha", path=loras["alpha"], te=0.9, unet=0.9)], 0, 2)["te1"]
        q = ref.get_submodule("text_model." + TE_Q if hasattr(ref, "text_model") else TE_Q).weight
        now = oc.transformer.resblocks[0].attn.in_proj_weight
        n = q.shape[0]
        assert torch.allclose(now[:n], q, atol=1e-6) and not torch.equal(now[:n], before[:n])
        assert torch.equal(now[n:], before[n:]), "k and v rows are untouched"
        p = processing.StableDiffusionProcessingTxt2Img(prompt="x", steps=2, sd_model=model,
                                                        scripts=scripts.ScriptRunner())
        processing.process_images(p)
        assert torch.equal(oc.transformer.resblocks[0].attn.in_proj_weight, before)
    finally:
        script_callbacks.script_unloaded_callback()
        hostmodel.unregister_layout("tiny-sd2")
        purge(*HOST_MODULES)


@pytest.fixture
def sdnext(tiny, tmp_path, monkeypatch):
    """An SD.Next-style webui: the extension loaded, a diffusers pipeline as the model."""
    import copy
    import types

    unet, te = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    purge(*HOST_MODULES)
    monkeypatch.syspath_prepend(os.path.join(FAKES, "a1111"))
    from modules import extra_networks, script_callbacks, scripts, shared

    try:
        loras = make_loras(str(tmp_path / "Lora"), unet, te)
        shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
        scripts.load_script_file(os.path.join(ROOT, "scripts", "lora_ext_script.py"), ROOT)
        script_callbacks.before_ui_callback()
        pipe = types.SimpleNamespace(unet=unet, text_encoder=te,
                                     sd_checkpoint_info=types.SimpleNamespace(name_for_extra="tiny"))
        yield types.SimpleNamespace(unet=unet, te=te, loras=loras, pipe=pipe, en=extra_networks, shared=shared)
    finally:
        script_callbacks.script_unloaded_callback()
        purge(*HOST_MODULES)


def test_sdnext_diffusers_pipeline_steps_from_host_state(sdnext):
    """SD.Next holds a diffusers pipeline; steps come from a pre-hook reading state.sampling_step."""
    import copy
    import types

    from lora_ext.spec import Keyframes, LoraSpec

    ns, unet = sdnext, sdnext.unet
    p = types.SimpleNamespace(sd_model=ns.pipe, steps=3, is_hr_pass=False, extra_generation_params={},
                              comment=lambda t: None)
    prompt, data = ns.en.parse_prompt("x <lora:alpha:1:unet=0@0,1@1>")
    pristine = bits(unet)
    ns.en.activate(p, data)
    spec = LoraSpec("alpha", path=ns.loras["alpha"], unet=Keyframes(((0, 0), (1, 1))))
    ns.shared.state.sampling_steps = 3
    base = copy.deepcopy(unet)
    for i in range(3):
        ns.shared.state.sampling_step = i
        got = unet_out(unet)
        want = unet_out(reference({"unet": base}, [spec], i, 3)["unet"])
        assert max_rel_err(got, want) <= 1e-5, f"step {i}"
    ns.en.activate(p, {})
    assert same_bits(unet, pristine)
