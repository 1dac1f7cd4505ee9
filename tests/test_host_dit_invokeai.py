"""lora-ext's FLUX nodes in InvokeAI, through the fake of InvokeAI's API (tests/fakes/invokeai,
InvokeAI 6.14.2; its ``backend/flux/model.py`` has the real ``Flux`` module names and shapes):
loader -> "Prompt - FLUX (lora-ext)" -> "FLUX Denoise (lora-ext)" on a tiny FLUX.1 in InvokeAI's
BFL layout, with a tiny CLIP-L and T5.

Every expectation is computed by hand from the LoRA tensors (``W + s * scale * up @ down`` on
the BFL weight's rows, DoRA's row norms, the final modulation's swapped halves), not by
lora-ext: the text encoders must compute what hand-merged copies compute, and every call of the
transformer must return what a hand-merged copy returns at that step's strength. The formats
InvokeAI's own FLUX LoRA loader reports as unknown are among them: OneTrainer DoRA
(``lora_transformer_*`` with ``dora_scale``), fal Kontext (``base_model.model.double_blocks.*``),
``norm_out.linear`` / ``final_layer.adaLN_modulation.1``. Afterwards the cached models are
bit-identical, without hooks, unpinned."""
from __future__ import annotations

import copy
import importlib.util
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from dit_models import original_state, tiny
from host_common import FAKES, ROOT, bits, purge, same_bits
from lora_ext.errors import LoraExtError
from test_engine import no_hooks
from tiny_models import max_rel_err, one_thread_fixture

one_thread = one_thread_fixture()
HOST_MODULES = ("invokeai", "lora_ext.hosts.invokeai", "lora_ext_nodes")
H, M, R = 32, 128, 4


def _clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    return CLIPTextModel(CLIPTextConfig(hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=64, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()


def _t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(4)
    return T5EncoderModel(T5Config(d_model=24, d_kv=8, d_ff=32, num_layers=2, num_heads=3, vocab_size=64)).eval()


def _tokenizer(length):
    def tok(texts, max_length=None):
        ids = [3 + (sum(map(ord, w)) % 50) for w in texts[0].split()][: length - 1] + [2]
        return {"input_ids": torch.tensor([ids + [1] * (length - len(ids))])}
    return tok


def _flux(params_module):
    """InvokeAI's FLUX model class (the fake's, with the real names) holding a tiny diffusers
    Flux's weights in BFL layout (fused qkv / linear1, final modulation halves swapped)."""
    p = params_module.FluxParams(in_channels=8, vec_in_dim=12, context_in_dim=24, hidden_size=H, mlp_ratio=4.0,
                                 num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000,
                                 qkv_bias=True, guidance_embed=True)
    model = params_module.Flux(p).eval()
    model.load_state_dict(original_state(tiny("flux")), strict=True)
    return model


# --- LoRA files, and their changes computed by hand -------------------------------------------
def _pair(g, out, inp, rank=R):
    return torch.randn(rank, inp, generator=g) * 0.3, torch.randn(out, rank, generator=g) * 0.3


def write_files(folder) -> dict:
    """name -> (path, {(component, param): fn(W, s) -> W'}) : the LoRA files and their exact effect."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    files = {}

    def lowrank(scale):
        def fn(down, up):
            return lambda w, s: w + s * scale * (up @ down)
        return fn

    # kohya sd-scripts, BFL names, alpha != rank; CLIP-L (lora_te1_) and T5 (lora_te3_) keys
    sd, eff = {}, {}
    for prefix, out, inp, param in (("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H, "double_blocks.0.img_attn.qkv"),
                                    ("lora_unet_single_blocks_1_linear1", 3 * H + M, H, "single_blocks.1.linear1"),
                                    ("lora_unet_double_blocks_1_txt_mlp_0", M, H, "double_blocks.1.txt_mlp.0")):
        down, up = _pair(g, out, inp)
        sd.update({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
                   f"{prefix}.alpha": torch.tensor(2.0)})
        eff[("unet", param)] = lowrank(2.0 / R)(down, up)
    for prefix, out, inp, comp, param in (
            ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 12, 12, "te1", "text_model.encoder.layers.0.self_attn.q_proj"),
            ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 24, 24, "te3", "encoder.block.0.layer.0.SelfAttention.q")):
        down, up = _pair(g, out, inp, 2)
        sd.update({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
                   f"{prefix}.alpha": torch.tensor(1.0)})
        eff[(comp, param)] = lowrank(1.0 / 2)(down, up)
    files["kohya"] = (sd, eff)

    # OneTrainer legacy names with DoRA (InvokeAI: unknown), and its norm_out
    sd, eff = {}, {}
    down, up = _pair(g, H, H)
    mag = torch.rand(H, 1, generator=g) + 0.5
    pre = "lora_transformer_transformer_blocks_0_attn_to_q"
    sd.update({f"{pre}.lora_down.weight": down, f"{pre}.lora_up.weight": up, f"{pre}.alpha": torch.tensor(8.0),
               f"{pre}.dora_scale": mag})

    def dora(w, s, down=down, up=up, mag=mag):
        q = w[:H]
        adapted = q + 2.0 * (up @ down)
        full = mag * adapted / adapted.norm(dim=1, keepdim=True)
        return torch.cat([q + s * (full - q), w[H:]], 0)
    eff[("unet", "double_blocks.0.img_attn.qkv")] = dora
    down, up = _pair(g, 2 * H, H)
    pre = "lora_transformer_norm_out_linear"
    sd.update({f"{pre}.lora_down.weight": down, f"{pre}.lora_up.weight": up, f"{pre}.alpha": torch.tensor(4.0)})
    d = up @ down  # diffusers' norm_out is (scale, shift); BFL's final_layer.adaLN_modulation.1 is (shift, scale)
    eff[("unet", "final_layer.adaLN_modulation.1")] = lambda w, s, d=d: w + s * torch.cat([d[H:], d[:H]], 0)
    files["onetrainer_dora"] = (sd, eff)

    # fal Kontext trainer: PEFT under base_model.model. with BFL names, only some blocks
    sd, eff = {}, {}
    for param, out, inp in (("double_blocks.1.img_attn.qkv", 3 * H, H), ("single_blocks.0.linear1", 3 * H + M, H),
                            ("final_layer.adaLN_modulation.1", 2 * H, H)):
        down, up = _pair(g, out, inp)
        sd.update({f"base_model.model.{param}.lora_A.weight": down, f"base_model.model.{param}.lora_B.weight": up})
        eff[("unet", param)] = lowrank(1.0)(down, up)
    files["fal_kontext"] = (sd, eff)

    # diffusers / PEFT names on the split modules: rows of the fused BFL weights
    sd, eff = {}, {}
    down, up = _pair(g, H, H)
    sd.update({"transformer.single_transformer_blocks.0.attn.to_v.lora_A.weight": down,
               "transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight": up})
    eff[("unet", "single_blocks.0.linear1")] = lambda w, s, d=up @ down: torch.cat([w[:2 * H], w[2 * H:3 * H] + s * d,
                                                                                   w[3 * H:]], 0)
    files["peft"] = (sd, eff)

    out = {}
    for name, (sd, eff) in files.items():
        path = os.path.join(folder, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        out[name] = (path, eff)
    return out


def merged(model, effects: list, component: str):
    """A copy of ``model`` with ``[(effects, strength)]`` of ``component`` written in by hand (fp32)."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    acc = {}
    for eff, s in effects:
        for (comp, param), fn in eff.items():
            if comp != component:
                continue
            if f"{param}.weight" not in params:  # transformers 5's CLIPTextModel has no text_model level
                param = param[len("text_model."):]
            w = params[f"{param}.weight"]
            base = acc.get(param, w.detach().float())
            acc[param] = base + (fn(w.detach().float(), s) - w.detach().float())
    with torch.no_grad():
        for param, w in acc.items():
            params[f"{param}.weight"].copy_(w)
    return ref


@pytest.fixture
def flux(tmp_path, monkeypatch):
    import types

    purge(*HOST_MODULES)
    monkeypatch.syspath_prepend(os.path.join(FAKES, "invokeai"))
    from invokeai.app.invocations.model import CLIPField, ModelIdentifierField, T5EncoderField, TransformerField
    from invokeai.app.services.shared.invocation_context import InvocationContext
    from invokeai.backend.flux import model as flux_model

    files = write_files(str(tmp_path / "loras"))
    monkeypatch.setenv("LORA_EXT_DIRS", str(tmp_path / "loras"))
    transformer, clip, t5 = _flux(flux_model), _clip(), _t5()
    ctx = InvocationContext(models_path=str(tmp_path / "models"))
    ctx.models.add("flux", transformer, base="flux")
    ctx.models.add("clip", clip, base="any", kind="clip_embed")
    ctx.models.add("t5", t5, base="any", kind="t5_encoder")
    ctx.models.add("clip_tok", _tokenizer(8), kind="tokenizer")
    ctx.models.add("t5_tok", _tokenizer(6), kind="tokenizer")
    spec = importlib.util.spec_from_file_location("lora_ext_nodes", os.path.join(ROOT, "hosts", "invokeai", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(ROOT, "hosts", "invokeai")])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["lora_ext_nodes"] = pack
    spec.loader.exec_module(pack)
    ids = ModelIdentifierField
    ns = types.SimpleNamespace(
        pack=pack, ctx=ctx, transformer=transformer, clip=clip, t5=t5, files=files,
        transformer_field=TransformerField(transformer=ids("flux", base="flux", type="main")),
        clip_field=CLIPField(tokenizer=ids("clip_tok"), text_encoder=ids("clip", base="any")),
        t5_field=T5EncoderField(tokenizer=ids("t5_tok"), text_encoder=ids("t5", base="any")),
        pristine={"flux": bits(transformer), "clip": bits(clip), "t5": bits(t5)},
        base={"unet": copy.deepcopy(transformer), "te1": copy.deepcopy(clip), "te3": copy.deepcopy(t5)})
    yield ns
    purge(*HOST_MODULES)


def _untouched(ns):
    return (same_bits(ns.transformer, ns.pristine["flux"]) and same_bits(ns.clip, ns.pristine["clip"])
            and same_bits(ns.t5, ns.pristine["t5"]) and no_hooks(ns.transformer, ns.clip, ns.t5)
            and not any(m._forward_pre_hooks for x in (ns.transformer, ns.clip, ns.t5) for m in x.modules())
            and all(rec["locks"] == 0 for rec in ns.ctx.models.records.values()))


def _prompt(ns, prompt, stack=None):
    return ns.pack.LoraExtFluxTextEncoderInvocation(prompt=prompt, clip=ns.clip_field, t5_encoder=ns.t5_field,
                                                    lora_ext=stack).invoke(ns.ctx)


def _check_calls(ns, effects_at, calls):
    """A forward hook comparing every transformer call with the hand-merged model at its step."""
    refs = {}

    def check(module, args, kwargs, output):
        step, total = kwargs["timestep_index"], kwargs["total_num_timesteps"]
        if step not in refs:
            refs[step] = merged(ns.base["unet"], effects_at(step, total), "unet")
        with torch.no_grad():
            want = refs[step](*args, **kwargs)
        assert max_rel_err(output, want) <= 1e-5, f"step {step}: {max_rel_err(output, want)}"
        calls.append(step)
    return ns.transformer.register_forward_hook(check, with_kwargs=True)


def test_flux_nodes_register(flux):
    from invokeai.app.invocations.baseinvocation import INVOCATIONS

    assert {"lora_ext_flux_text_encoder", "lora_ext_flux_denoise"} <= set(INVOCATIONS)
    assert INVOCATIONS["lora_ext_flux_denoise"].UIConfig.title == "FLUX Denoise (lora-ext)"


@pytest.mark.parametrize("scheduler", ["euler", "heun"])
def test_flux_graph_loader_prompt_denoise_per_step(flux, scheduler):
    ns = flux
    P = ns.pack
    kohya, kohya_eff = ns.files["kohya"]
    stack = P.LoraExtLoaderInvocation(lora="kohya", weight=0.8, clip_weight=0.5, keyframes="0@0,1@1").invoke(ns.ctx)
    # the prompt node: the tag joins the stack; CLIP-L and T5 run with the text-encoder strengths
    seen = []
    want_te = {c: merged(ns.base[c], [(kohya_eff, 0.5)], c) for c in ("te1", "te3")}

    def te_check(comp):
        def hook(module, args, kwargs, output):
            with torch.no_grad():
                want = want_te[comp](**kwargs)
            key = "pooler_output" if comp == "te1" else "last_hidden_state"
            seen.append((comp, max_rel_err(output[key], want[key]) <= 1e-5))
        return hook
    hooks = [ns.clip.register_forward_hook(te_check("te1"), with_kwargs=True),
             ns.t5.register_forward_hook(te_check("te3"), with_kwargs=True)]
    try:
        cond = _prompt(ns, "a castle <lora:fal_kontext:0.7>", stack.lora_ext)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [("te3", True), ("te1", True)]
    assert ns.ctx.conditioning.load(cond.conditioning.conditioning_name)["prompt"] == "a castle"
    assert [e["name"] for e in cond.lora_ext.loras] == ["kohya", "fal_kontext"]
    assert _untouched(ns)
    # the denoise node: every transformer call at its step's strengths (kohya ramps 0 -> 0.8)
    fal_eff = ns.files["fal_kontext"][1]

    def effects_at(step, total):
        return [(kohya_eff, 0.8 * step / (total - 1)), (fal_eff, 0.7)]

    calls = []
    h = _check_calls(ns, effects_at, calls)
    try:
        P.LoraExtFluxDenoiseInvocation(positive_text_conditioning=cond.conditioning, transformer=ns.transformer_field,
                                       num_steps=3, width=64, height=64, scheduler=scheduler,
                                       lora_ext=cond.lora_ext).invoke(ns.ctx)
    finally:
        h.remove()
    assert calls == ([0, 1, 2] if scheduler == "euler" else [0, 0, 1, 1, 2])
    assert _untouched(ns)
    info = [m for lv, m in ns.ctx.logger.records if lv == "info"]
    assert any("kohya: 3 modules applied to the transformer" in m for m in info), info


@pytest.mark.parametrize("name", ["onetrainer_dora", "fal_kontext", "peft"])
def test_formats_invokeai_reports_as_unknown_apply_exactly(flux, name):
    """OneTrainer DoRA, fal Kontext (partial), norm_out and final_layer.adaLN_modulation, PEFT rows of linear1."""
    ns = flux
    path, eff = ns.files[name]
    stack = ns.pack.LoraExtLoaderInvocation(lora=path, weight=1.0).invoke(ns.ctx).lora_ext
    cond = _prompt(ns, "a castle", stack)
    calls = []
    h = _check_calls(ns, lambda step, total: [(eff, 1.0)], calls)
    try:
        ns.pack.LoraExtFluxDenoiseInvocation(positive_text_conditioning=cond.conditioning, width=64, height=64,
                                             transformer=ns.transformer_field, num_steps=2,
                                             lora_ext=cond.lora_ext).invoke(ns.ctx)
    finally:
        h.remove()
    assert calls == [0, 1]
    assert _untouched(ns)
    bad = [m for lv, m in ns.ctx.logger.records if lv in ("warning", "error")]
    assert not bad, bad


def test_unknown_keys_are_reported_and_a_lora_with_nothing_that_fits_fails(flux, tmp_path):
    ns = flux
    path, eff = ns.files["fal_kontext"]
    from safetensors.torch import load_file

    sd = load_file(path)
    sd["base_model.model.double_blocks.7.img_attn.qkv.lora_A.weight"] = torch.zeros(R, H)  # no block 7
    sd["base_model.model.double_blocks.7.img_attn.qkv.lora_B.weight"] = torch.zeros(3 * H, R)
    sd["base_model.model.double_blocks.0.img_attn.proj.lora_A.weight"] = torch.zeros(R, H + 1)  # wrong shape
    sd["base_model.model.double_blocks.0.img_attn.proj.lora_B.weight"] = torch.zeros(H, R)
    extra = str(tmp_path / "loras" / "extra.safetensors")
    save_file(sd, extra)
    stack = ns.pack.LoraExtLoaderInvocation(lora=extra).invoke(ns.ctx).lora_ext
    cond = _prompt(ns, "x", stack)
    ns.ctx.logger.records.clear()
    calls = []
    h = _check_calls(ns, lambda step, total: [(eff, 1.0)], calls)
    try:
        ns.pack.LoraExtFluxDenoiseInvocation(positive_text_conditioning=cond.conditioning, width=32, height=32,
                                             transformer=ns.transformer_field, num_steps=1,
                                             lora_ext=cond.lora_ext).invoke(ns.ctx)
    finally:
        h.remove()
    assert calls == [0], "what fits applies"
    warnings = [m for lv, m in ns.ctx.logger.records if lv == "warning"]
    assert len(warnings) == 1 and "4 keys not applied to the transformer" in warnings[0], warnings
    debug = [m for lv, m in ns.ctx.logger.records if lv == "debug" and "not applied to the transformer" in m]
    assert {m.split(": ")[3] for m in debug} >= {"base_model.model.double_blocks.7.img_attn.qkv.lora_A.weight",
                                                 "base_model.model.double_blocks.0.img_attn.proj.lora_A.weight"}
    # a LoRA none of whose keys fits: the node fails, the model stays bit-identical
    only_bad = str(tmp_path / "loras" / "only_bad.safetensors")
    save_file({k: v for k, v in sd.items() if "blocks.7." in k or "proj" in k}, only_bad)
    stack = ns.pack.LoraExtLoaderInvocation(lora=only_bad).invoke(ns.ctx).lora_ext
    with pytest.raises(LoraExtError, match="none of its 4 keys for it fits this Flux.1 transformer"):
        ns.pack.LoraExtFluxDenoiseInvocation(positive_text_conditioning=cond.conditioning, width=32, height=32,
                                             transformer=ns.transformer_field, num_steps=1,
                                             lora_ext=stack).invoke(ns.ctx)
    assert _untouched(ns)


def test_an_sd_lora_in_a_flux_graph(flux, tmp_path):
    """An SD1.5 LoRA: nothing of it fits; the denoise fails naming what it is, the prompt warns."""
    ns = flux
    g = torch.Generator().manual_seed(1)
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320, generator=g),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4, generator=g),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768, generator=g),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4, generator=g)}
    path = str(tmp_path / "loras" / "sd15.safetensors")
    save_file(sd, path, metadata={"ss_base_model_version": "sd_v1"})
    stack = ns.pack.LoraExtLoaderInvocation(lora=path).invoke(ns.ctx).lora_ext
    with pytest.raises(LoraExtError, match=r"none of its 2 keys for it fits these Flux.1 text encoders \(it is an SD1.x "
                                           r"LoRA\)"):
        _prompt(ns, "x", stack)
    cond = _prompt(ns, "x")
    with pytest.raises(LoraExtError, match=r"none of its 2 keys for it fits this Flux.1 transformer \(it is an SD1.x LoRA\)"):
        ns.pack.LoraExtFluxDenoiseInvocation(positive_text_conditioning=cond.conditioning, width=32, height=32,
                                             transformer=ns.transformer_field, num_steps=1,
                                             lora_ext=stack).invoke(ns.ctx)
    assert _untouched(ns)


def test_flux_block_weights_and_a_failing_run_leave_nothing_behind(flux):
    ns = flux
    path, eff = ns.files["kohya"]
    # lbw on FLUX: double block 0 off, single block 1 at 0.5 (the double block 1 MLP keeps 1)
    stack = ns.pack.LoraExtLoaderInvocation(lora=path, block_weights="lbw=D00=0,S01=0.5").invoke(ns.ctx).lora_ext
    cond = _prompt(ns, "x")
    per_block = {k: v for k, v in eff.items() if k[0] == "unet"}
    scaled = [({k: v}, 0.0 if "double_blocks.0" in k[1] else 0.5 if "single_blocks.1" in k[1] else 1.0)
              for k, v in per_block.items()]
    calls = []
    h = _check_calls(ns, lambda step, total: scaled, calls)
    try:
        ns.pack.LoraExtFluxDenoiseInvocation(positive_text_conditioning=cond.conditioning, width=32, height=32,
                                             transformer=ns.transformer_field, num_steps=1,
                                             lora_ext=stack).invoke(ns.ctx)
    finally:
        h.remove()
    assert calls == [0]

    def boom(module, args, kwargs):
        raise RuntimeError("canceled")
    h = ns.transformer.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="canceled"):
            ns.pack.LoraExtFluxDenoiseInvocation(positive_text_conditioning=cond.conditioning, width=32, height=32,
                                                 transformer=ns.transformer_field, num_steps=2,
                                                 lora_ext=stack).invoke(ns.ctx)
    finally:
        h.remove()
    assert _untouched(ns)
