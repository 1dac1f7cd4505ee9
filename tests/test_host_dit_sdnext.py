"""SD.Next with DiT pipelines, through the A1111-family shim and the webui fake (tests/fakes/a1111):
SD.Next holds a diffusers pipeline in ``shared.sd_model`` (here real diffusers pipeline classes
with tiny components) whose denoiser is ``transformer`` and whose text encoders sit in
``text_encoder`` .. ``text_encoder_3`` in an order that depends on the pipeline
(vladmandic/sdnext 058a7f0c modules/lora/networks.py ``default_components``; Flux: CLIP-L, T5;
SD3: CLIP-L, CLIP-G, T5; Chroma and Wan: T5/UMT5; HunyuanVideo: Llama, CLIP-L; Qwen-Image:
Qwen2.5-VL). The shim must hand the transformer (diffusers names) and CLIP-L / CLIP-G / T5 as
te1 / te2 / te3 to the core, and follow SD.Next's step counter.

Expectations are computed by hand from the LoRA tensors (``W + s * scale * up @ down``, the
rows of a fused kohya ``qkv`` split onto ``to_q/to_k/to_v``): every output must be what a
hand-merged copy computes; after a "restore" generation every weight is bit-identical."""
from __future__ import annotations

import copy
import os
import types

import pytest
import torch
from safetensors.torch import save_file

from dit_models import forward, tiny
from host_common import FAKES, ROOT, bits, purge, same_bits
from test_engine import no_hooks
from test_host_a1111 import HOST_MODULES
from tiny_models import max_rel_err, one_thread_fixture

one_thread = one_thread_fixture()
R = 4


def _clip(hidden=12, projection=False, seed=3):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                         projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model=24, umt5=False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(4)
    if umt5:
        return UMT5EncoderModel(UMT5Config(d_model=d_model, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                                           vocab_size=64)).eval()
    return T5EncoderModel(T5Config(d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=3, vocab_size=64)).eval()


def _llm(kind):
    import transformers

    torch.manual_seed(5)
    if kind == "llama":
        return transformers.LlamaModel(transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                                num_attention_heads=2, num_key_value_heads=1,
                                                                vocab_size=64)).eval()
    return transformers.Qwen2Model(transformers.Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, num_key_value_heads=1,
                                                            vocab_size=64)).eval()


def pipeline(family: str):
    """(pipeline, {component: (pipeline attribute, module)}) for a tiny DiT pipeline of ``family``."""
    import diffusers

    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    t = tiny(family)
    if family == "flux":
        clip, t5 = _clip(), _t5()
        pipe = diffusers.FluxPipeline(scheduler=sched, vae=None, text_encoder=clip, tokenizer=None, text_encoder_2=t5,
                                      tokenizer_2=None, transformer=t)
        return pipe, {"unet": ("transformer", t), "te1": ("text_encoder", clip), "te3": ("text_encoder_2", t5)}
    if family == "sd3":
        c1, c2, t5 = _clip(projection=True), _clip(hidden=16, projection=True, seed=6), _t5()
        pipe = diffusers.StableDiffusion3Pipeline(transformer=t, scheduler=sched, vae=None, text_encoder=c1,
                                                  tokenizer=None, text_encoder_2=c2, tokenizer_2=None,
                                                  text_encoder_3=t5, tokenizer_3=None)
        return pipe, {"unet": ("transformer", t), "te1": ("text_encoder", c1), "te2": ("text_encoder_2", c2),
                      "te3": ("text_encoder_3", t5)}
    if family == "chroma":
        t5 = _t5()
        pipe = diffusers.ChromaPipeline(scheduler=sched, vae=None, text_encoder=t5, tokenizer=None, transformer=t)
        return pipe, {"unet": ("transformer", t), "te3": ("text_encoder", t5)}
    if family == "qwen_image":
        llm = _llm("qwen")
        pipe = diffusers.QwenImagePipeline(scheduler=sched, vae=None, text_encoder=llm, tokenizer=None, transformer=t)
        return pipe, {"unet": ("transformer", t)}
    if family == "hunyuan_video":
        llm, clip = _llm("llama"), _clip()
        pipe = diffusers.HunyuanVideoPipeline(text_encoder=llm, tokenizer=None, transformer=t, vae=None, scheduler=sched,
                                              text_encoder_2=clip, tokenizer_2=None)
        return pipe, {"unet": ("transformer", t), "te1": ("text_encoder_2", clip)}
    if family == "wan":
        umt5 = _t5(d_model=8, umt5=True)
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=umt5, vae=None, scheduler=sched, transformer=t)
        return pipe, {"unet": ("transformer", t), "te3": ("text_encoder", umt5)}
    raise KeyError(family)


def _linear(model, suffix):
    return next(name for name, m in model.named_modules() if name.endswith(suffix) and isinstance(m, torch.nn.Linear))


def _te_linear(te):
    return next(name for name, m in te.named_modules()
                if isinstance(m, torch.nn.Linear) and name.endswith(("q_proj", "SelfAttention.q")))


def write_lora(path, entries, g):
    """entries: [(key prefix, component, module path, (out, in), alpha or None)] -> {(component, path): delta}."""
    sd, deltas = {}, {}
    for prefix, comp, mod, (out, inp), alpha in entries:
        down, up = torch.randn(R, inp, generator=g) * 0.3, torch.randn(out, R, generator=g) * 0.3
        if prefix.startswith("lora_"):
            sd[f"{prefix}.lora_down.weight"], sd[f"{prefix}.lora_up.weight"] = down, up
        else:
            sd[f"{prefix}.lora_A.weight"], sd[f"{prefix}.lora_B.weight"] = down, up
        scale = 1.0
        if alpha is not None:
            sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
            scale = alpha / R
        for m, rows in (mod if isinstance(mod, list) else [(mod, None)]):
            d = scale * (up @ down)
            deltas[(comp, m)] = d if rows is None else d[rows[0]:rows[1]]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return deltas


def merged(model, deltas, comp, s):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for (c, mod), d in deltas.items():
            if c == comp:
                w = ref.get_submodule(mod).weight
                w.copy_(w.float() + s * d)
    return ref


@pytest.fixture
def sdnext(tmp_path, monkeypatch):
    purge(*HOST_MODULES)
    monkeypatch.syspath_prepend(os.path.join(FAKES, "a1111"))
    from modules import extra_networks, script_callbacks, scripts, shared

    (tmp_path / "Lora").mkdir()
    try:
        shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
        scripts.load_script_file(os.path.join(ROOT, "scripts", "lora_ext_script.py"), ROOT)
        script_callbacks.before_ui_callback()
        yield types.SimpleNamespace(en=extra_networks, shared=shared, folder=tmp_path / "Lora")
    finally:
        script_callbacks.script_unloaded_callback()
        purge(*HOST_MODULES)


def _p(pipe, steps):
    return types.SimpleNamespace(sd_model=pipe, steps=steps, is_hr_pass=False, extra_generation_params={},
                                 comment=lambda t: None)


def _te_out(te, comp):
    ids = torch.tensor([[0, 5, 9, 13, 2, 1]])
    with torch.no_grad():
        out = te(input_ids=ids)
    return out.last_hidden_state


@pytest.mark.parametrize("family", ["flux", "sd3", "chroma", "qwen_image", "hunyuan_video", "wan"])
def test_sdnext_dit_pipeline_transformer_and_text_encoders(sdnext, family):
    ns = sdnext
    pipe, comps = pipeline(family)
    t = comps["unet"][1]
    g = torch.Generator().manual_seed(1)
    q = _linear(t, "attn.to_q") if family != "wan" else _linear(t, "attn1.to_q")
    ff = _linear(t, "proj_out")
    entries = [(f"transformer.{q}", "unet", q, tuple(t.get_submodule(q).weight.shape), None),
               (f"transformer.{ff}", "unet", ff, tuple(t.get_submodule(ff).weight.shape), None)]
    te_prefix = {"te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}
    for comp in ("te1", "te2", "te3"):
        if comp in comps:
            te = comps[comp][1]
            mod = _te_linear(te)
            name = mod if mod.startswith("text_model.") or comp == "te3" else "text_model." + mod
            entries.append((te_prefix[comp] + name.replace(".", "_"), comp, mod, tuple(te.get_submodule(mod).weight.shape),
                            2.0))
    deltas = write_lora(ns.folder / "dit.safetensors", entries, g)
    pristine = {c: bits(m) for c, (_, m) in comps.items()}
    base = {c: copy.deepcopy(m) for c, (_, m) in comps.items()}
    ns.shared.sd_model = pipe
    steps = 3
    p = _p(pipe, steps)
    _, data = ns.en.parse_prompt("x <lora:dit:1:te=0.5:unet=0@0,0.8@1>")
    ns.en.activate(p, data)
    shim = __import__("lora_ext.hosts.a1111.shim", fromlist=["SHIM"]).SHIM
    bound = shim.session.bound
    assert {c: bound.host.components[c] for c in bound.host.components} == {c: m for c, (_, m) in comps.items()}
    for comp in ("te1", "te2", "te3"):
        if comp in comps:
            te = comps[comp][1]
            assert max_rel_err(_te_out(te, comp), _te_out(merged(base[comp], deltas, comp, 0.5), comp)) <= 1e-5, comp
    ns.shared.state.sampling_steps = steps
    for i in range(steps):
        ns.shared.state.sampling_step = i
        got = forward(t, family)
        want = forward(merged(base["unet"], deltas, "unet", 0.8 * i / (steps - 1)), family)
        assert max_rel_err(got, want) <= 1e-5, f"step {i}"
    assert shim.session.reports()[0].unmatched == []
    ns.shared.opts.lora_ext_restore = "restore"
    ns.en.activate(p, {})
    for c, (_, m) in comps.items():
        assert same_bits(m, pristine[c]) and no_hooks(m), c


def test_sdnext_flux_kohya_fused_qkv_onto_split_modules_and_skipped_encoders(sdnext, caplog):
    """A kohya BFL-named Flux LoRA (fused img_attn.qkv, single-block linear1 with the MLP rows)
    on SD.Next's diffusers Flux: row slices land on to_q/to_k/to_v and proj_mlp."""
    ns = sdnext
    pipe, comps = pipeline("flux")
    t = comps["unet"][1]
    H, M = 32, 128
    g = torch.Generator().manual_seed(2)
    deltas = write_lora(ns.folder / "kohya_flux.safetensors", [
        ("lora_unet_double_blocks_0_img_attn_qkv", "unet",
         [("transformer_blocks.0.attn.to_q", (0, H)), ("transformer_blocks.0.attn.to_k", (H, 2 * H)),
          ("transformer_blocks.0.attn.to_v", (2 * H, 3 * H))], (3 * H, H), 2.0),
        ("lora_unet_single_blocks_1_linear1", "unet",
         [("single_transformer_blocks.1.attn.to_q", (0, H)), ("single_transformer_blocks.1.attn.to_k", (H, 2 * H)),
          ("single_transformer_blocks.1.attn.to_v", (2 * H, 3 * H)),
          ("single_transformer_blocks.1.proj_mlp", (3 * H, 3 * H + M))], (3 * H + M, H), 8.0)], g)
    base = copy.deepcopy(t)
    pristine = bits(t)
    ns.shared.sd_model = pipe
    p = _p(pipe, 2)
    _, data = ns.en.parse_prompt("x <lora:kohya_flux:0.6>")
    ns.en.activate(p, data)
    ns.shared.state.sampling_steps, ns.shared.state.sampling_step = 2, 0
    assert max_rel_err(forward(t, "flux"), forward(merged(base, deltas, "unet", 0.6), "flux")) <= 1e-5
    ns.shared.opts.lora_ext_restore = "restore"
    ns.en.activate(p, {})
    assert same_bits(t, pristine)
    # a pipeline whose text encoder lora-ext does not bind (Qwen-Image's Qwen2.5-VL): said once
    pipe, comps = pipeline("qwen_image")
    ns.shared.sd_model = pipe
    with caplog.at_level("WARNING", logger="lora_ext"):
        ns.en.activate(_p(pipe, 2), data)
    lines = [r.getMessage() for r in caplog.records if "not taken by lora-ext" in r.getMessage()]
    assert len(lines) == 1 and "text_encoder (qwen2)" in lines[0], lines


def _wan22_pipeline():
    """SD.Next's Wan 2.2 A14B with both experts resident: WanPipeline(transformer=high-noise
    expert, transformer_2=low-noise expert, boundary_ratio) with tiny components."""
    import diffusers

    umt5 = _t5(d_model=8, umt5=True)
    high, low = tiny("wan", seed=0), tiny("wan", seed=7)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=umt5, vae=None,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), transformer=high,
                                 transformer_2=low, boundary_ratio=0.875)
    return pipe, high, low, umt5


def _wan_entries(t, *mods):
    return [(f"transformer.{m}", "unet", m, tuple(t.get_submodule(m).weight.shape), 2.0) for m in mods]


def test_sdnext_wan22_two_experts_pair_and_single_lora(sdnext):
    """A HIGH/LOW pair is one LoRA: transformer takes the HIGH file, transformer_2 the LOW file,
    ``high=`` gives the high-noise expert its own strength, one step schedule drives both (the
    low-noise expert runs the later steps alone); a single (Wan 2.1) LoRA goes on both experts;
    restore is bit-exact on both and on the text encoder."""
    ns = sdnext
    pipe, high, low, umt5 = _wan22_pipeline()
    g = torch.Generator().manual_seed(3)
    q, ff = "blocks.0.attn1.to_q", "blocks.1.ffn.net.2"
    d_high = write_lora(ns.folder / "wan22_motion_HIGH.safetensors", _wan_entries(high, q, ff), g)
    d_low = write_lora(ns.folder / "wan22_motion_LOW.safetensors", _wan_entries(low, q), g)
    d_one = write_lora(ns.folder / "wan21_style.safetensors", _wan_entries(high, ff), g)
    pristine = {"high": bits(high), "low": bits(low), "te": bits(umt5)}
    base_high, base_low = copy.deepcopy(high), copy.deepcopy(low)
    ns.shared.sd_model = pipe
    steps = 3
    p = _p(pipe, steps)
    _, data = ns.en.parse_prompt("x <lora:wan22_motion:1:high=0.5:unet=0.5@0,1@2> <lora:wan21_style:0.7>")
    ns.en.activate(p, data)
    shim = __import__("lora_ext.hosts.a1111.shim", fromlist=["SHIM"]).SHIM
    s = shim.session
    assert s.bound.host.components["unet"] is high and s.bound.host.expert == "high"
    assert s.partner is not None and s.partner.bound.host.components["unet"] is low
    # SD.Next keeps the engine's background restore record, on both experts (issue 14: its own
    # handler's "Cannot copy out of meta tensor" came from two overlapping model loads,
    # tests/test_sdnext_meta_race.py, not from the record)
    assert s.record_buffer is None and s.partner.record_buffer is None
    for session in (s, s.partner):
        hs = list(session.handles.values())
        assert all(h.wait_records(60) for h in hs)
        mems = [h.record_memory() for h in hs]
        assert all(m["plain_bytes"] == 0 and not m["faults"] for m in mems), mems
        assert sum(m["compactions"] for m in mems) > 0, mems  # the records were compacted in the background
    assert s.errors == [], s.errors
    ns.shared.state.sampling_steps = steps

    def want(base, pair, own, step):
        # high=0.5 replaces the pair's strength (schedule included) on the high-noise expert;
        # the low-noise expert follows the schedule 0.5@0 -> 1@2 on the run's step clock
        ramp = own if own is not None else 0.5 + 0.5 * step / (steps - 1)
        deltas = {}
        for key, d in pair.items():
            deltas[key] = ramp * d
        for key, d in d_one.items():
            deltas[key] = deltas.get(key, 0) + 0.7 * d
        return merged(base, deltas, "unet", 1.0)

    # steps 0-1 on the high-noise expert, step 2 on the low-noise expert alone (as the pipeline does)
    for i, (model, base, pair, own) in enumerate([(high, base_high, d_high, 0.5), (high, base_high, d_high, 0.5),
                                                   (low, base_low, d_low, None)]):
        ns.shared.state.sampling_step = i
        got = forward(model, "wan")
        assert max_rel_err(got, forward(want(base, pair, own, i), "wan")) <= 1e-5, f"step {i}"
    for r in [*s.reports(), *s.partner.reports()]:
        assert r.unmatched == [], (r.name, r.unmatched)
    assert any("low expert" in c for c, _ in s.strengths())
    ns.shared.opts.lora_ext_restore = "restore"
    ns.en.activate(p, {})
    assert same_bits(high, pristine["high"]) and same_bits(low, pristine["low"]) and same_bits(umt5, pristine["te"])
    assert no_hooks(high) and no_hooks(low)


def test_sdnext_wan22_low_noise_stage_alone(sdnext):
    """SD.Next loads only ``transformer_2`` for a low-noise-only stage: that is the denoiser, and
    a pair applies its LOW file to it."""
    import diffusers

    ns = sdnext
    low = tiny("wan", seed=7)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=_t5(d_model=8, umt5=True), vae=None,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), transformer=None,
                                 transformer_2=low, boundary_ratio=0.875)
    g = torch.Generator().manual_seed(4)
    q = "blocks.0.attn1.to_q"
    write_lora(ns.folder / "pair_high_noise.safetensors", _wan_entries(low, "blocks.1.attn1.to_k"), g)
    d_low = write_lora(ns.folder / "pair_low_noise.safetensors", _wan_entries(low, q), g)
    base, pristine = copy.deepcopy(low), bits(low)
    ns.shared.sd_model = pipe
    p = _p(pipe, 2)
    _, data = ns.en.parse_prompt("x <lora:pair:0.8>")
    ns.en.activate(p, data)
    shim = __import__("lora_ext.hosts.a1111.shim", fromlist=["SHIM"]).SHIM
    assert shim.session.bound.host.components["unet"] is low and shim.session.bound.host.expert == "low"
    assert shim.session.partner is None
    ns.shared.state.sampling_steps, ns.shared.state.sampling_step = 2, 0
    assert max_rel_err(forward(low, "wan"), forward(merged(base, d_low, "unet", 0.8), "wan")) <= 1e-5
    ns.shared.opts.lora_ext_restore = "restore"
    ns.en.activate(p, {})
    assert same_bits(low, pristine)
