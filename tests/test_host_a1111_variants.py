"""The A1111-family shim on the model objects the other webuis really hold (fakes in
tests/fakes/a1111/fake_model.py cite the host files): reForge's transformers-named CLIP-G,
Forge 2.x's ``forge_objects``, inpainting-style UNets with more input channels, and the
per-LoRA fallback to the built-in handler; plus SD.Next's hires pass and trigger words."""
from __future__ import annotations

import copy
import json
import os
import types

import pytest
import torch
from safetensors.torch import save_file

from host_common import bits, close_weights, reference, same_bits, tables
from lora_ext import arch, hostmodel
from lora_ext.hostmodel import HostModel, InputSlice
from lora_ext.session import Session
from lora_ext.spec import LoraSpec
from test_engine import TE_Q, _te_module, adapter_tensors, write_lora
from test_host_a1111 import HOST_MODULES, run, sdnext, tiny, webui  # noqa: F401 (fixtures)
from tiny_models import ldm_tree, max_rel_err, tiny_unet, unet_inputs


def _te2_lora(path, te2, seed=7):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(_te_module(te2, TE_Q).weight.shape)
    sd = {f"lora_te2_{TE_Q.replace('.', '_')}.{k}": v.contiguous()
          for k, v in adapter_tensors("lora", shape, g).items()}
    save_file(sd, str(path))
    return str(path)


def _te_weight(te, path=TE_Q):
    return _te_module(te, path).weight


def test_reforge_sdxl_transformers_named_clip_g_binds_and_restores(webui):
    ns = webui
    import fake_model

    te2 = copy.deepcopy(ns.te)
    xl = dict(tables(ns.unet, ns.te))
    xl["te2"] = arch.table_for_model("te2", te2, {"hidden_act": "gelu"})  # A1111 would name it OpenCLIP
    assert xl["te2"][TE_Q].ldm_rows is not None
    hostmodel.register_layout("tiny-xl", xl)
    try:
        _te2_lora(ns.tmp / "Lora" / "gee.safetensors", te2)
        model = fake_model.ReForgeSDXLModel(ns.unet, xl["unet"], ns.te, te2)
        ns.model = model
        ns.shared.sd_model = model
        ns.cb.model_loaded_callback(model)
        before = _te_weight(te2).detach().clone()
        pristine = bits(ns.unet), bits(ns.te), bits(te2)
        ns.shared.opts.lora_ext_restore = "keep"
        run(ns, "x <lora:alpha:0.5> <lora:gee:0.8>")
        assert not ns.errors.displayed, ns.errors.displayed
        assert not torch.equal(_te_weight(te2), before), "CLIP-G got its LoRA"
        ns.shared.opts.lora_ext_restore = "restore"
        run(ns, "x")
        assert same_bits(ns.unet, pristine[0]) and same_bits(ns.te, pristine[1]) and same_bits(te2, pristine[2])
    finally:
        hostmodel.unregister_layout("tiny-xl")


def test_forge_engine_gets_loras_through_its_live_modules(webui):
    ns = webui
    import fake_model

    model = fake_model.ForgeEngine(ns.unet, tables(ns.unet, ns.te)["unet"], ns.te)
    ns.model = model
    ns.shared.sd_model = model
    ns.cb.model_loaded_callback(model)
    pristine = bits(ns.unet), bits(ns.te)
    base = {"unet": copy.deepcopy(ns.unet), "te1": copy.deepcopy(ns.te)}
    ns.shared.opts.lora_ext_restore = "keep"
    p, _ = run(ns, "x <lora:alpha:0.7> <lora:beta:0.4>", steps=2)
    assert not ns.errors.displayed, ns.errors.displayed
    specs = [LoraSpec("alpha", path=ns.loras["alpha"], te=0.7, unet=0.7),
             LoraSpec("beta", path=ns.loras["beta"], te=0.4, unet=0.4)]
    ref = reference(base, specs, 0, 2)
    assert close_weights(ns.unet, ref["unet"], atol=1e-5) and close_weights(ns.te, ref["te1"], atol=1e-5)
    assert "Lora hashes" in p.extra_generation_params
    ns.shared.opts.lora_ext_restore = "restore"
    run(ns, "x")
    assert same_bits(ns.unet, pristine[0]) and same_bits(ns.te, pristine[1])


def _write_embedding_lora(path, unet):
    g = torch.Generator().manual_seed(11)
    mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    shape = tuple(unet.get_submodule(mod).weight.shape)
    sd = {f"lora_unet_{mod.replace('.', '_')}.{k}": v.contiguous() for k, v in adapter_tensors("lora", shape, g).items()}
    sd["bundle_emb.mychar.string_to_param.*"] = torch.randn(2, 16, generator=g)
    save_file(sd, str(path))


def test_fallback_per_lora_to_the_builtin_handler(webui, caplog):
    ns = webui
    import networks

    _write_embedding_lora(ns.tmp / "Lora" / "embby.safetensors", ns.unet)
    (ns.tmp / "Lora" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    pristine = bits(ns.unet), bits(ns.te)
    ns.shared.opts.lora_ext_restore = "restore"
    with caplog.at_level("WARNING", logger="lora_ext"):
        p, res = run(ns, "x <lora:alpha:0.5> <lora:embby:1> <lora:broken:0.3>")
    handed = networks.extra_network_lora.calls[-2]  # the last call is the release at deactivate
    assert sorted(x[0] for x in handed) == ["broken", "embby"]
    lines = [r.getMessage() for r in caplog.records if "built-in Lora handler took it" in r.getMessage()]
    assert len(lines) == 2 and any("embby" in x and "embedding" in x for x in lines)
    assert "embby" in p.extra_generation_params["lora-ext fallback"]
    assert "lora-ext fallback" in res.info
    assert "alpha" in p.extra_generation_params["lora-ext"]
    # after the "restore" generation both handlers' changes are gone, bit for bit
    assert networks.loaded_networks == []
    assert same_bits(ns.unet, pristine[0]) and same_bits(ns.te, pristine[1])
    # and lora-ext alone again, with the built-in's stale backups forgotten
    ns.shared.opts.lora_ext_restore = "keep"
    run(ns, "x <lora:alpha:0.5>")
    ref = reference({"unet": copy.deepcopy(ns.unet), "te1": copy.deepcopy(ns.te)}, [], 0, 4)
    assert not same_bits(ns.unet, pristine[0])
    ns.shared.opts.lora_ext_restore = "restore"
    run(ns, "x")
    assert same_bits(ns.unet, pristine[0]) and same_bits(ns.te, pristine[1]), ref


def test_model_lora_ext_cannot_bind_goes_to_the_builtin(webui):
    ns = webui
    import networks

    odd = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(3, 3)),
                                cond_stage_model=types.SimpleNamespace(wrapped=types.SimpleNamespace()),
                                sd_checkpoint_info=types.SimpleNamespace(name_for_extra="sd3-ish"),
                                observers=[], get_learned_conditioning=lambda prompts: None,
                                apply_model=lambda x, sigma, cond: x)
    ns.model = odd
    ns.shared.sd_model = odd
    ns.cb.model_loaded_callback(odd)
    p, _ = run(ns, "x <lora:alpha:0.5>", steps=1)
    assert networks.extra_network_lora.calls[-1] == [["alpha", "0.5"]]
    assert "not SD1.x" in p.extra_generation_params["lora-ext fallback"]
    assert not ns.errors.displayed, ns.errors.displayed


def test_trigger_words_opt_in(webui):
    ns = webui
    path = ns.tmp / "Lora" / "trig.safetensors"
    src = ns.loras["alpha"]
    from safetensors.torch import load_file

    save_file(load_file(src), str(path), metadata={"modelspec.trigger_phrase": "inkwash style"})
    seen = []
    p, _ = run(ns, "a castle <lora:trig:0.5>", steps=1, observe=lambda stage, info: seen.append((stage, info)))
    assert all("inkwash" not in q for st, info in seen if st == "te" for q in info["prompts"])
    ns.shared.opts.lora_ext_trigger_words = True
    seen.clear()
    p, _ = run(ns, "a castle <lora:trig:0.5>", steps=1, observe=lambda stage, info: seen.append((stage, info)))
    prompts = [q for st, info in seen if st == "te" for q in info["prompts"]]
    assert prompts and all(q.endswith("inkwash style") for q in prompts)
    assert p.extra_generation_params["lora-ext triggers"] == "inkwash style"


# --- a wider conv_in (inpainting 9, instruct-pix2pix 8, depth 5 channels) ------------------------

@pytest.mark.parametrize("channels", [9, 8, 5])
@pytest.mark.parametrize("method", ["auto", "fuse", "onthefly"])
def test_wider_conv_in_takes_the_lora_on_its_first_channels(tmp_path, channels, method):
    from diffusers import UNet2DConditionModel

    unet4 = tiny_unet()
    table = arch.table_for_model("unet", unet4)
    cfg = dict(unet4.config)
    cfg["in_channels"] = channels
    torch.manual_seed(3)
    wide = UNet2DConditionModel.from_config(cfg).eval()
    out_c = wide.conv_in.weight.shape[0]
    path = write_lora(tmp_path / "cin.safetensors", [("unet", "conv_in", "lora", (out_c, 4, 3, 3)),
                                                     ("unet", "down_blocks.0.resnets.0.conv1", "loha",
                                                      tuple(wide.down_blocks[0].resnets[0].conv1.weight.shape))],
                      seed=5, mag=0.3)
    blank = copy.deepcopy(wide)  # before any hook goes on (a deepcopy would copy hooks)
    hostmodel.register_layout("tiny-sd-4ch", {"unet": table})
    try:
        tree = ldm_tree(table, wide)
        s = Session(method=method)
        s.load_model(HostModel({"unet": tree}, naming="ldm"))
        assert any("conv_in has %d input channels" % channels in n for n in s.bound.notes)
        assert isinstance(s.bound.views["unet"]["conv_in"], InputSlice)
        pristine = bits(wide)
        s.use_specs([LoraSpec("cin", path=path, unet=0.8)], total_steps=1)
        assert not s.errors
        # reference: the 4-channel maths on the first channels, the others untouched
        narrow = copy.deepcopy(unet4)
        with torch.no_grad():
            narrow.load_state_dict({k: v for k, v in pristine.items() if not k.startswith("conv_in.")},
                                   strict=False)
            narrow.conv_in.weight.copy_(pristine["conv_in.weight"][:, :4])
            narrow.conv_in.bias.copy_(pristine["conv_in.bias"])
        ref4 = reference({"unet": narrow}, [LoraSpec("cin", path=path, unet=0.8)], 0, 1)["unet"]
        ref = blank
        with torch.no_grad():
            for k, v in ref4.state_dict().items():
                if k == "conv_in.weight":
                    ref.conv_in.weight[:, :4].copy_(v)
                else:
                    ref.state_dict()[k].copy_(v)
        x, t, ctx = unet_inputs()
        x = torch.randn(x.shape[0], channels, *x.shape[2:], generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            got, want = wide(x, t, encoder_hidden_states=ctx).sample, ref(x, t, encoder_hidden_states=ctx).sample
        assert max_rel_err(got, want) <= 1e-5
        assert torch.equal(wide.conv_in.weight, pristine["conv_in.weight"]), "conv_in's LoRA runs on the fly"
        s.end_run(restore=True)
        assert same_bits(wide, pristine)
    finally:
        hostmodel.unregister_layout("tiny-sd-4ch")


def test_sdnext_hires_pass_takes_hires_strengths(sdnext):
    """SD.Next sets p.is_hr_pass for the hires pass without re-activating extra networks
    (modules/processing_diffusers.py L247, L312-313 at 058a7f0c): hr= must still act."""
    from tiny_models import unet_out

    ns, unet = sdnext, sdnext.unet
    p = types.SimpleNamespace(sd_model=ns.pipe, steps=2, is_hr_pass=False, extra_generation_params={},
                              comment=lambda t: None, hr_second_pass_steps=2, denoising_strength=0.5)
    _, data = ns.en.parse_prompt("x <lora:alpha:1:hr=0>")
    pristine_out = unet_out(copy.deepcopy(unet))
    ns.en.activate(p, data)  # once, before the base pass, as SD.Next does
    ns.shared.state.sampling_steps, ns.shared.state.sampling_step = 2, 0
    assert max_rel_err(unet_out(unet), pristine_out) > 1e-3, "the LoRA acts in the base pass"
    p.is_hr_pass = True  # the hires pass: no activate call
    ns.shared.state.sampling_step = 0
    assert max_rel_err(unet_out(unet), pristine_out) <= 1e-6, "hr=0: no LoRA in the hires pass"
    assert "lora-ext hr" in p.extra_generation_params
    ns.en.activate(p, {})


def test_status_route_and_weights_digest(webui):
    ns = webui
    routes = {}
    app = types.SimpleNamespace(add_api_route=lambda path, fn, methods: routes.setdefault(path, fn))
    ns.cb.app_started_callback(None, app)
    status = routes["/lora-ext/v1/status"]
    assert "error" in status(weights=True)["weights"]  # nothing bound before the first generation
    run(ns, "x")
    fresh = status(weights=True)["weights"]
    assert set(fresh) == {"unet", "te1"}
    ns.shared.opts.lora_ext_restore = "keep"
    run(ns, "x <lora:alpha:0.5>")
    now = status(weights=True)
    assert now["loras"] == ["<lora:alpha:0.5>"] and now["family"] == "tiny-sd"
    assert now["weights"] != fresh
    ns.shared.opts.lora_ext_restore = "restore"
    run(ns, "x <lora:alpha:0.5>")
    assert status(weights=True)["weights"] == fresh
