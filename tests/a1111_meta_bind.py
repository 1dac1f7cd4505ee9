"""Bind, apply, switch and restore LoRAs through the A1111 shim on full-size SD1.5, SD2 and SDXL
models, with nothing but torch, safetensors, numpy, pluggy and lora-ext (no diffusers, no
transformers): a helper script, run in a subprocess by tests/test_tables_data.py (diffusers and
transformers made unimportable) and by tests/test_a1111_deps.py (inside a fresh venv holding
A1111 v1.10.1's pins, after install.py).

    python tests/a1111_meta_bind.py [--block]

The webui is tests/fakes/a1111. Each model is A1111's compvis layout (``model.diffusion_model``
with ``input_blocks.1.1.proj_in`` ..., CLIP-L under ``transformer.text_model``, OpenCLIP with
q/k/v fused in ``nn.MultiheadAttention``) built on the ``meta`` device from lora-ext's shipped
tables, so it costs no memory; only the modules the LoRAs patch get real (seeded) weights. The
expected weights are computed here independently (W0 + strength * alpha/rank * up @ down).
Prints one JSON line ``{"ok": true, ...}``; any failed check raises.
"""
from __future__ import annotations

import sys

BLOCKED = ("diffusers", "transformers")


class _Unimportable:
    """Meta-path finder that makes ``diffusers`` and ``transformers`` (and submodules) fail to import."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is made unimportable for this check")
        return None


if __name__ == "__main__" and "--block" in sys.argv:
    sys.meta_path.insert(0, _Unimportable())

import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAKES = os.path.join(HERE, "fakes", "a1111")

RANK, ALPHA = 4, 2.0

# (family, kohya key prefix, component, canonical module path): what the LoRAs of each family patch.
# The te entries of SD2 and SDXL's te2 are q projections, fused in OpenCLIP's in_proj_weight.
TARGETS = {
    "sd1": [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in"),  # 1x1 conv
        ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1"),  # compvis name, 3x3
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "unet",
         "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "te1", "encoder.layers.0.self_attn.q_proj"),
    ],
    "sd2": [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in"),  # linear
        ("lora_unet_up_blocks_3_resnets_2_conv2", "unet", "up_blocks.3.resnets.2.conv2"),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "te1", "encoder.layers.0.self_attn.q_proj"),
        ("lora_te_text_model_encoder_layers_1_mlp_fc1", "te1", "encoder.layers.1.mlp.fc1"),
    ],
    "sdxl": [
        ("lora_unet_down_blocks_1_attentions_0_proj_in", "unet", "down_blocks.1.attentions.0.proj_in"),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_9_attn1_to_out_0", "unet",
         "mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0"),
        ("lora_unet_output_blocks_8_0_skip_connection", "unet", "up_blocks.2.resnets.2.conv_shortcut"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "te1", "encoder.layers.0.self_attn.q_proj"),
        ("lora_te2_text_model_encoder_layers_0_self_attn_v_proj", "te2", "encoder.layers.0.self_attn.v_proj"),
        ("lora_te2_text_model_encoder_layers_5_mlp_fc2", "te2", "encoder.layers.5.mlp.fc2"),
    ],
}


# ---- compvis trees on meta, from lora-ext's tables ------------------------------------------

def _get(root, path):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _put(root, path, module):
    parts = path.split(".")
    cur = root
    for q in parts[:-1]:
        if not hasattr(cur, q):
            cur.add_module(q, nn.Module())
        cur = getattr(cur, q)
    cur.add_module(parts[-1], module)


def _module(info):
    w, bias = info.weight_shape, info.bias_shape is not None
    kw = dict(device="meta")
    if info.kind == "linear":
        return nn.Linear(w[1], w[0], bias=bias, **kw)
    if info.kind == "conv":
        return nn.Conv2d(w[1], w[0], tuple(w[2:]), bias=bias, **kw)
    if info.kind == "norm":
        return nn.LayerNorm(w[0], bias=bias, **kw)
    # given its (meta) weight: Embedding's own init on meta drags in torch._dynamo (seconds)
    return nn.Embedding(w[0], w[1], _weight=torch.empty(w, device="meta"))


def ldm_tree(table):
    """The ldm (compvis / OpenCLIP) module tree a table describes, on ``meta``."""
    root = nn.Module()
    infos = sorted(table.values(), key=lambda i: i.ldm_rows is None)  # fused attn first: it owns out_proj
    for info in infos:
        if info.ldm_rows is not None:
            if _get(root, info.ldm_path) is None:
                _put(root, info.ldm_path, nn.MultiheadAttention(info.weight_shape[1], 1, device="meta"))
        elif not info.ldm_weight.endswith(".weight"):  # OpenCLIP's bare positional_embedding / text_projection
            shape = tuple(reversed(info.weight_shape)) if info.ldm_transposed else info.weight_shape
            owner, _, name = info.ldm_path.rpartition(".")
            (_get(root, owner) if owner else root).register_parameter(
                name, nn.Parameter(torch.empty(shape, device="meta")))
        elif _get(root, info.ldm_path) is None:
            _put(root, info.ldm_path, _module(info))
    return root


def fake_sd_model(family, trees):
    """What A1111 v1.10.1 holds in ``shared.sd_model`` for this family (the parts lora-ext reads)."""
    def hf(tree):  # FrozenCLIPEmbedder: .transformer is transformers' CLIPTextModel
        t = nn.Module()
        t.text_model = tree
        return types.SimpleNamespace(transformer=t)

    m = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=trees["unet"]),
                              is_sd1=family == "sd1", is_sd2=family == "sd2", is_sdxl=family == "sdxl",
                              sd_checkpoint_info=types.SimpleNamespace(name_for_extra=f"{family}-meta",
                                                                       filename=f"{family}-meta.safetensors"),
                              apply_model=lambda x, sigma, cond: x,
                              get_learned_conditioning=lambda prompts: None)
    if family == "sd1":
        m.cond_stage_model = types.SimpleNamespace(wrapped=hf(trees["te1"]))
    elif family == "sd2":
        m.cond_stage_model = types.SimpleNamespace(wrapped=types.SimpleNamespace(model=trees["te1"]))
    else:
        m.conditioner = types.SimpleNamespace(embedders=[hf(trees["te1"]), types.SimpleNamespace(model=trees["te2"])])
    return m


# ---- weights and LoRAs ------------------------------------------------------------------------

class Target:
    """One patched module: where its weight lives in the compvis tree, and which rows."""

    def __init__(self, key, component, path, info, tree, gen):
        self.key, self.component, self.path, self.info = key, component, path, info
        owner = _get(tree, info.ldm_path)
        if owner.in_proj_weight.is_meta if info.ldm_rows else owner.weight.is_meta:
            owner.to_empty(device="cpu")
            with torch.no_grad():
                for p in owner.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        self.owner = owner
        self.rows = info.ldm_rows

    def weight(self):
        w = self.owner.in_proj_weight if self.rows else self.owner.weight
        return w[self.rows[0]:self.rows[1]] if self.rows else w


def lora_tensors(targets, gen):
    sd, deltas = {}, {}
    for t in targets:
        shape = t.info.weight_shape
        out_f, in_f = shape[0], shape[1]
        k = tuple(shape[2:])
        down = torch.randn((RANK, in_f, *k), generator=gen) * 0.1
        up = torch.randn((out_f, RANK, *((1,) * len(k))), generator=gen) * 0.1
        sd[f"{t.key}.lora_down.weight"] = down.contiguous()
        sd[f"{t.key}.lora_up.weight"] = up.contiguous()
        sd[f"{t.key}.alpha"] = torch.tensor(ALPHA)
        deltas[t.key] = (up.reshape(out_f, RANK) @ down.reshape(RANK, -1)).reshape(shape) * (ALPHA / RANK)
    return sd, deltas


# Everything a host binding reaches: must import with diffusers and transformers absent.
HOST_PATH = ("lora_ext", "lora_ext.arch", "lora_ext.layouts", "lora_ext.hostmodel", "lora_ext.session",
             "lora_ext.engine", "lora_ext.prompt", "lora_ext.network", "lora_ext.adapters",
             "lora_ext.hosts.a1111.shim", "lora_ext.tables")


def main():
    import importlib

    from safetensors.torch import save_file

    for name in HOST_PATH:
        importlib.import_module(name)
    from lora_ext import arch, layouts

    t0 = time.perf_counter()
    sizes = {}
    for fam in arch.ARCHS:
        layout = layouts.arch_layout(fam)
        sizes[fam] = {c: len(t) for c, t in layout.items()}
    t_tables = time.perf_counter() - t0

    sys.path[:0] = [FAKES, os.path.join(FAKES, "builtin_lora")]
    from modules import errors, processing, script_callbacks, scripts, shared

    tmp = tempfile.mkdtemp(prefix="lora-ext-meta-bind-")
    lora_dir = os.path.join(tmp, "Lora")
    os.makedirs(lora_dir)
    shared.cmd_opts.lora_dir = lora_dir
    shared.cmd_opts.lyco_dir_backcompat = os.path.join(tmp, "LyCORIS")
    import lora_script  # noqa: F401  (the built-in Lora extension loads first)

    scripts.load_script_file(os.path.join(ROOT, "scripts", "lora_ext_script.py"), ROOT)
    script_callbacks.before_ui_callback()
    script_callbacks.ui_settings_callback()
    script_callbacks.app_started_callback(None, None)
    from lora_ext.hosts.a1111 import shim

    runner = scripts.ScriptRunner()
    shared.opts.lora_ext_method = "fuse"

    def run(model, prompt, observe=None):
        def apply_model(x, sigma, cond):
            if observe:
                observe()
            return x

        model.apply_model = apply_model
        p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, steps=2, sd_model=model, scripts=runner)
        processing.process_images(p)
        assert not errors.displayed, errors.displayed

    report = {}
    for fam in arch.ARCHS:
        t1 = time.perf_counter()
        gen = torch.Generator().manual_seed(len(fam))
        layout = layouts.arch_layout(fam)
        trees = {c: ldm_tree(t) for c, t in layout.items()}
        targets = [Target(key, comp, path, layout[comp][path], trees[comp], gen) for key, comp, path in TARGETS[fam]]
        pristine = [t.weight().detach().clone() for t in targets]
        pristine_full = [(t.owner.in_proj_weight if t.rows else t.owner.weight).detach().clone() for t in targets]
        # "a" patches every target, "b" all but the first (so switching a -> b must restore it)
        sd_a, delta_a = lora_tensors(targets, gen)
        sd_b, delta_b = lora_tensors(targets[1:], gen)
        save_file(sd_a, os.path.join(lora_dir, f"a_{fam}.safetensors"))
        save_file(sd_b, os.path.join(lora_dir, f"b_{fam}.safetensors"))

        model = fake_sd_model(fam, trees)
        shared.sd_model = model
        script_callbacks.model_loaded_callback(model)

        def check(strength, deltas, where):
            for t, w0 in zip(targets, pristine):
                now = t.weight()
                if t.key in deltas:
                    want = w0 + strength * deltas[t.key]
                    err = float((now.detach() - want).abs().max())
                    assert err <= 1e-6, f"{fam} {where}: {t.path} off by {err}"
                    assert not torch.equal(now, w0), f"{fam} {where}: {t.path} unchanged"
                else:
                    assert torch.equal(now, w0), f"{fam} {where}: {t.path} should be pristine"
            for t, full0 in zip(targets, pristine_full):
                if t.rows:  # the other rows of a fused in_proj (k, v or q) stay put
                    w = t.owner.in_proj_weight
                    assert torch.equal(w[:t.rows[0]], full0[:t.rows[0]]) and torch.equal(
                        w[t.rows[1]:], full0[t.rows[1]:]), f"{fam} {where}: {t.path}: other q/k/v rows changed"

        def pristine_bits(where):
            for t, w0 in zip(targets, pristine):
                assert torch.equal(t.weight(), w0), f"{fam} {where}: {t.path} not restored bit-exactly"

        shared.opts.lora_ext_restore = "keep"
        run(model, f"a castle <lora:a_{fam}:0.8>")
        session = shim.SHIM.session
        assert session.bound.family == fam, (fam, session.bound.family)
        assert set(session.bound.views) == set(arch.components(fam)), set(session.bound.views)
        check(0.8, delta_a, "a applied (keep)")
        run(model, f"a castle <lora:b_{fam}:1>")
        check(1.0, delta_b, "switched to b")
        run(model, "a castle")
        pristine_bits("no tags after b")

        shared.opts.lora_ext_restore = "restore"
        seen = []
        run(model, f"a castle <lora:a_{fam}:0.5>", observe=lambda: seen.append(check(0.5, delta_a, "a during run")))
        assert seen, "the model ran"
        pristine_bits("restore setting")
        run(model, "a castle")  # no LoRAs left to carry over to the next family's model
        pristine_bits("no tags")
        report[fam] = {"bound": session.bound.family, "components": sorted(session.bound.views),
                       "seconds": round(time.perf_counter() - t1, 2)}

    script_callbacks.script_unloaded_callback()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, f"imported: {leaked[:5]}"
    print(json.dumps({"ok": True, "tables_seconds": round(t_tables, 3), "table_sizes": sizes, "families": report,
                      "blocked": "--block" in sys.argv}))


if __name__ == "__main__":
    main()
