"""lora-ext inside a REAL ComfyUI server, driven over its HTTP API (``pytest -m realhost``).

``LORA_EXT_COMFYUI_DIR`` names a Comfy-Org/ComfyUI checkout with its own venv (``<dir>/venv``
or ``LORA_EXT_COMFYUI_PYTHON``); without it every test here is skipped. The test installs
lora-ext the README way (a copy of this repository in ``custom_nodes/lora-ext``, its
``install.py`` run from that folder with ComfyUI's Python), writes a full-size random SD1.5
checkpoint (and a 9-channel inpainting one) and LoRA files of every adapter type, starts
``main.py --cpu --listen 127.0.0.1`` and queues API-format workflows (64x64, 2-4 steps,
``SaveLatent``), comparing lora-ext's nodes with ComfyUI's own ``LoraLoader`` latent for latent.

A small probe node pack (written into ``custom_nodes/lora_ext_realhost_probe`` by this test, not
part of lora-ext) logs the time of every UNet evaluation and weight load, gives a digest of the
UNet's weights, and, with ``LORA_EXT_PROBE_LOWVRAM_MB``, makes ComfyUI load the diffusion model
partially (on ``--cpu`` ComfyUI always loads whole: ``load_models_gpu`` sets
``VRAMState.DISABLED`` for a CPU load device, comfy/model_management.py 0.3.64 L671-L681); the
budget goes through ComfyUI's own ``LoadedModel.model_load`` / ``ModelPatcher.partially_load``,
so the modules beyond it get ComfyUI's ``LowVramPatch`` weight functions exactly as on a GPU
that is too small.

Models are cached in ``LORA_EXT_REALHOST_CACHE`` (default ``~/.cache/lora-ext-realhost``).
``LORA_EXT_COMFYUI_TIMING_ROUNDS`` (default 3) sets the rounds of the timing comparison.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

import realhost_util as rh

pytestmark = pytest.mark.realhost
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = "lora-ext-rand15.safetensors"
INPAINT = "lora-ext-rand15-inpainting.safetensors"
KINDS = ("lora", "locon_tucker", "loha", "lokr", "dora", "full", "oft", "ia3")
# lora-ext hands ComfyUI its own LoRAAdapter with the file's factors: latents must be bit-identical
BIT_IDENTICAL = ("lora",)
# the same maths, lora-ext's order of operations (one fused multiply-add into the weight; rounding
# only, measured 1e-6 relative on the latents): relative difference of the latents
SAME_MATHS = {"locon_tucker": 1e-4, "loha": 1e-4, "lokr": 1e-4, "full": 1e-4, "oft": 1e-4}
# strengths (model, clip) per type: OFT at 1.0, where ComfyUI and lora-ext (LyCORIS) rotate the
# same; below 1 ComfyUI interpolates W + s(R - I)W linearly, LyCORIS does not
STRENGTHS = {"oft": (1.0, 1.0)}
# measured, not asserted: ComfyUI 0.3.64's DoRA normalises by ||W|| on the output axis
# (comfy/weight_adapter/base.py weight_decompose L67-L73), LyCORIS and kohya by ||W + dW||, which
# lora-ext follows; ComfyUI has no IA3 (LoraLoader logs its keys as not loaded)
DIFFERENT_MATHS = ("dora", "ia3")
LOWVRAM_KINDS = ("lora", "loha", "lokr", "full")
LOWVRAM_MB = 1000  # of a 3.4 GB fp32 UNet: most modules go through LowVramPatch
ROUNDS = int(os.environ.get("LORA_EXT_COMFYUI_TIMING_ROUNDS", "3"))

PROBE = r'''
"""Test probe for lora-ext's real-ComfyUI tests (written by tests/test_realhost_comfyui.py)."""
import hashlib
import logging
import os
import time

import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher

_BUDGET = float(os.environ.get("LORA_EXT_PROBE_LOWVRAM_MB", "0") or 0) * 1024 * 1024
_model_load = mm.LoadedModel.model_load
_apply_model = comfy.model_base.BaseModel.apply_model
_load = comfy.model_patcher.ModelPatcher.load


def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
    if _BUDGET and isinstance(getattr(self.model, "model", None), comfy.model_base.BaseModel):
        # as load_models_gpu computes it for a GPU with _BUDGET bytes free
        lowvram_model_memory = max(0.1, _BUDGET - self.model_loaded_memory())
    return _model_load(self, lowvram_model_memory, force_patch_weights=force_patch_weights)


def apply_model(self, *args, **kwargs):
    t = time.perf_counter()
    try:
        return _apply_model(self, *args, **kwargs)
    finally:
        logging.info("lora-ext-probe apply_model %.6f", time.perf_counter() - t)


def load(self, *args, **kwargs):
    t = time.perf_counter()
    try:
        return _load(self, *args, **kwargs)
    finally:
        if isinstance(self.model, comfy.model_base.BaseModel):
            logging.info("lora-ext-probe unet_load %.6f", time.perf_counter() - t)


mm.LoadedModel.model_load = model_load
comfy.model_base.BaseModel.apply_model = apply_model
comfy.model_patcher.ModelPatcher.load = load


class LoraExtProbeDigest:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, model, tag):
        mm.load_models_gpu([model])
        h = hashlib.sha256()
        for k, v in sorted(model.model.diffusion_model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
        return {"ui": {"text": [h.hexdigest()]}}


NODE_CLASS_MAPPINGS = {"LoraExtProbeDigest": LoraExtProbeDigest}
'''


def _cache_dir():
    d = os.environ.get("LORA_EXT_REALHOST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "lora-ext-realhost")
    os.makedirs(d, exist_ok=True)
    return d


def _cached(name, write):
    path = os.path.join(_cache_dir(), name)
    if not os.path.exists(path):
        write(path + ".part")
        os.replace(path + ".part", path)
    return path


def _place(src, folder, name=None):
    os.makedirs(folder, exist_ok=True)
    dst = os.path.join(folder, name or os.path.basename(src))
    if os.path.exists(dst):
        if os.path.samefile(src, dst):
            return
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_inpainting(src, path):
    sd = load_file(src)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    w = sd[key]
    extra = torch.randn(w.shape[0], 5, *w.shape[2:], generator=torch.Generator().manual_seed(5)) * 0.02
    sd[key] = torch.cat([w, extra.to(w.dtype)], 1).contiguous()
    save_file(sd, path)


def _install(d):
    """The README way: the repository in custom_nodes/lora-ext, install.py run from there."""
    dest = os.path.join(d, "custom_nodes", "lora-ext")
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".ci-venv", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "out"))
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    res = subprocess.run([rh.comfyui_python(), "install.py"], cwd=dest, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # installed (not merely importable from the node folder): from anywhere, the node folder's package
    res = subprocess.run([rh.comfyui_python(), "-c", "import os, lora_ext; print(os.path.realpath(lora_ext.__file__))"],
                         cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == os.path.realpath(
        os.path.join(dest, "lora_ext", "__init__.py")), res.stdout + res.stderr
    probe = os.path.join(d, "custom_nodes", "lora_ext_realhost_probe")
    os.makedirs(probe, exist_ok=True)
    with open(os.path.join(probe, "__init__.py"), "w") as f:
        f.write(PROBE)


def _write_models(d):
    ckpt = _cached(CKPT, lambda p: rh.write_sd_checkpoint(p, "sd15", seed=0))
    inpaint = _cached(INPAINT, lambda p: _write_inpainting(ckpt, p))
    ckdir = os.path.join(d, "models", "checkpoints")
    _place(ckpt, ckdir)
    _place(inpaint, ckdir)
    loras = os.path.join(d, "models", "loras")
    mods = rh.sd15_lora_modules()
    for kind in KINDS:
        f = _cached(f"lxt_comfy_{kind}.safetensors", lambda p, k=kind: rh.write_lycoris_lora(p, k, mods, seed=3))
        _place(f, loras, f"lxt_{kind}.safetensors")
    conv_in = {"lora_unet_input_blocks_0_0": (320, 4, 3, 3)}
    f = _cached("lxt_comfy_conv_in.safetensors", lambda p: rh.write_lycoris_lora(p, "lora", conv_in, seed=4))
    _place(f, loras, "lxt_conv_in.safetensors")


class Comfy:
    """At most one ComfyUI server at a time: ``server(mode)`` stops the other mode's first."""

    def __init__(self, d):
        self.dir = d
        self.mode = None
        self._cm = None
        self.host = None
        self.counter = 0

    def server(self, mode="full"):
        if self.mode == mode and self.host is not None and self.host.proc.poll() is None:
            return self.host
        self.stop()
        env = {"LORA_EXT_PROBE_LOWVRAM_MB": str(LOWVRAM_MB) if mode == "lowvram" else "0"}
        log_dir = os.environ.get("LORA_EXT_COMFYUI_LOGS")
        log_path = os.path.join(log_dir, f"comfyui-{mode}.log") if log_dir else None
        self._cm = rh.start_comfyui(env=env, log_path=log_path)
        self.host = self._cm.__enter__()
        self.mode = mode
        return self.host

    def stop(self):
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
        self._cm = self.host = self.mode = None

    def log_offset(self):
        return len(self.host.log())

    def run(self, graph):
        entry = rh.comfy_run(self.host.url, graph)
        return entry

    def latent(self, entry):
        for out in entry["outputs"].values():
            for lat in out.get("latents", []):
                path = os.path.join(self.dir, "output", lat.get("subfolder", ""), lat["filename"])
                t = load_file(path)["latent_tensor"]
                os.remove(path)
                return t
        raise AssertionError(f"no latent in {json.dumps(entry['outputs'])[:500]}")

    def unique(self):
        self.counter += 1
        return f"lxt{os.getpid()}_{self.counter}"


@pytest.fixture(scope="module")
def comfy():
    d = rh.comfyui_dir()
    if d is None or rh.comfyui_python() is None:
        pytest.skip("set LORA_EXT_COMFYUI_DIR to a ComfyUI checkout with its venv to run the real-ComfyUI tests")
    _install(d)
    _write_models(d)
    c = Comfy(d)
    try:
        yield c
    finally:
        c.stop()


# --------------------------------------------------------------------------- workflows

def graph(c, *, loader=None, lora="lxt_lora.safetensors", sm=0.8, sc=0.6, ckpt=CKPT, steps=2, seed=7,
          split=None, keyframes="", text="a photo of a cat", prompt_node=False, extra=None):
    """An API-format workflow: checkpoint -> (loader) -> CLIP encode -> sampler -> SaveLatent.

    ``loader``: None, "LoraLoader", "LoraLoaderModelOnly", "LoraExtLoader",
    "LoraExtLoaderModelOnly"; ``prompt_node``: LoraExtPromptLoader reads ``text``;
    ``split``: run the steps as two KSamplerAdvanced nodes split at that step."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model, clip = ["1", 0], ["1", 1]
    if loader in ("LoraLoader", "LoraExtLoader"):
        inputs = {"model": model, "clip": clip, "lora_name": lora, "strength_model": sm, "strength_clip": sc}
        if loader == "LoraExtLoader" and keyframes:
            inputs["keyframes"] = keyframes
        g["2"] = {"class_type": loader, "inputs": inputs}
        model, clip = ["2", 0], ["2", 1]
    elif loader in ("LoraLoaderModelOnly", "LoraExtLoaderModelOnly"):
        inputs = {"model": model, "lora_name": lora, "strength_model": sm}
        if keyframes:
            inputs["keyframes"] = keyframes
        g["2"] = {"class_type": loader, "inputs": inputs}
        model = ["2", 0]
    if prompt_node:
        g["9"] = {"class_type": "LoraExtPromptLoader", "inputs": {"model": model, "clip": clip, "text": text}}
        model, clip, text_in = ["9", 0], ["9", 1], ["9", 2]
    else:
        text_in = text
    g["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text_in, "clip": clip}}
    g["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
    g["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    common = {"cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0]}
    if split is None:
        g["6"] = {"class_type": "KSampler", "inputs": {"model": model, "seed": seed, "steps": steps, "denoise": 1.0,
                                                       "latent_image": ["5", 0], **common}}
        last = "6"
    else:
        g["6"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model, "add_noise": "enable", "noise_seed": seed, "steps": steps, "start_at_step": 0,
            "end_at_step": split, "return_with_leftover_noise": "enable", "latent_image": ["5", 0], **common}}
        g["8"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model, "add_noise": "disable", "noise_seed": seed, "steps": steps, "start_at_step": split,
            "end_at_step": 10000, "return_with_leftover_noise": "disable", "latent_image": ["6", 0], **common}}
        last = "8"
    g["7"] = {"class_type": "SaveLatent", "inputs": {"samples": [last, 0], "filename_prefix": f"latents/{c.unique()}"}}
    if extra:
        g.update(extra)
    return g


def latent_of(c, **kw):
    return c.latent(c.run(graph(c, **kw)))


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _warnings(text):
    return [ln for ln in text.splitlines() if "lora-ext" in ln.lower() and "lora-ext-probe" not in ln
            and re.search(r"warn|error|not applied|skipped|left unchanged|traceback", ln, re.I)]


# --------------------------------------------------------------------------- tests

def test_nodes_load_and_restore_digest(comfy):
    h = comfy.server("full")
    info = rh._get(h.url + "/object_info/LoraExtLoader", timeout=60)
    assert "LoraExtLoader" in info and "clip" in info["LoraExtLoader"]["input"]["optional"]
    for n in ("LoraExtLoaderModelOnly", "LoraExtPromptLoader", "LoraExtInspector"):
        assert n in rh._get(h.url + f"/object_info/{n}", timeout=60)
    exts = rh._get(h.url + "/extensions", timeout=60)
    assert any(e.endswith("lora_ext.js") for e in exts), exts
    assert "IMPORT FAILED" not in "\n".join(ln for ln in h.log().splitlines() if "lora-ext" in ln)


def _digest(c):
    tag = c.unique()
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
         "2": {"class_type": "LoraExtProbeDigest", "inputs": {"model": ["1", 0], "tag": tag}}}
    out = c.run(g)["outputs"]["2"]["text"]
    return out[0]


def test_loader_equals_loraloader_for_every_adapter_type(comfy):
    parity(comfy, "full")


def parity(c, mode, kinds=KINDS):
    h = c.server(mode)
    digest0 = _digest(c)
    base = latent_of(c)
    results = {}
    start = c.log_offset()
    for kind in kinds:
        lora = f"lxt_{kind}.safetensors"
        sm, sc = STRENGTHS.get(kind, (0.8, 0.6))
        ours = latent_of(c, loader="LoraExtLoader", lora=lora, sm=sm, sc=sc)
        theirs = latent_of(c, loader="LoraLoader", lora=lora, sm=sm, sc=sc)
        results[kind] = (float((ours - theirs).abs().max()), rel(ours, theirs), rel(ours, base))
    log = h.log()[start:]
    print(f"\n[{mode}] latent max|ours-LoraLoader| / relative / relative effect vs no LoRA:")
    for kind, (d, r, e) in results.items():
        print(f"  {kind:14s} {d:.3e} {r:.3e} {e:.3e}")
    if mode == "lowvram":
        assert "loaded partially" in log, "the probe did not force a partial load"
    for kind, (d, r, e) in results.items():
        assert e > 1e-3, f"{kind}: the LoRA changes nothing"
        if kind in BIT_IDENTICAL:
            assert d == 0.0, f"{kind}: lora-ext differs from LoraLoader by {d}"
        elif kind in SAME_MATHS:
            assert r < SAME_MATHS[kind], f"{kind}: lora-ext differs from LoraLoader by {r:.2e} (relative)"
    assert not _warnings(log), _warnings(log)[:5]
    # the weights come back bit-exactly: a digest of the UNet equals the one before, and so does the latent
    assert _digest(c) == digest0
    assert torch.equal(latent_of(c), base)


def test_weights_restored_bit_exactly(comfy):
    """After lora-ext's patches (ComfyUI's LoRAAdapter and lora-ext's own, constant and keyframed),
    a plain MODEL has the UNet weights it had before (digest) and gives the same latent."""
    c = comfy
    c.server("full")
    digest0 = _digest(c)
    base = latent_of(c)
    latent_of(c, loader="LoraExtLoader", lora="lxt_loha.safetensors")
    latent_of(c, loader="LoraExtLoader", lora="lxt_lora.safetensors", keyframes="0@0,1@1")
    assert _digest(c) == digest0
    assert torch.equal(latent_of(c), base)


def test_prompt_tags_node_equals_loader(comfy):
    c = comfy
    c.server("full")
    a = latent_of(c, loader="LoraExtLoader", lora="lxt_loha.safetensors", sm=0.8, sc=0.6)
    b = latent_of(c, prompt_node=True, text="a photo of a cat <lora:lxt_loha:te=0.6:unet=0.8>")
    assert torch.equal(a, b)


def test_model_only_loader_equals_comfys_and_logs_nothing(comfy):
    c = comfy
    h = c.server("full")
    start = c.log_offset()
    ours = latent_of(c, loader="LoraExtLoaderModelOnly", lora="lxt_lora.safetensors", sm=0.8)
    theirs = latent_of(c, loader="LoraLoaderModelOnly", lora="lxt_lora.safetensors", sm=0.8)
    assert torch.equal(ours, theirs)
    # the optional CLIP left open on the full loader: the same
    g = graph(c, loader="LoraExtLoader", lora="lxt_lora.safetensors", sm=0.8)
    del g["2"]["inputs"]["clip"]
    g["3"]["inputs"]["clip"] = g["4"]["inputs"]["clip"] = ["1", 1]
    assert torch.equal(c.latent(c.run(g)), theirs)
    log = h.log()[start:]
    assert not _warnings(log), _warnings(log)[:5]


def test_keyframes_follow_the_whole_run_across_split_ksampleradvanced(comfy):
    c = comfy
    c.server("full")
    plain_one = latent_of(c, steps=4)
    plain_split = latent_of(c, steps=4, split=2)
    # ComfyUI itself: a split run equals one run up to rounding (the latent goes out of and back
    # into the model's latent scale between the two nodes)
    base_gap = rel(plain_split, plain_one)
    assert base_gap < 1e-5
    kw = dict(loader="LoraExtLoader", lora="lxt_lora.safetensors", sm=1.0, sc=0.0, steps=4, keyframes="0@0,1@1")
    one = latent_of(c, **kw)
    split = latent_of(c, split=2, **kw)
    constant = latent_of(c, loader="LoraExtLoader", lora="lxt_lora.safetensors", sm=1.0, sc=0.0, steps=4)
    effect = rel(one, constant)
    assert effect > 1e-3 and rel(one, plain_one) > 1e-3, "the keyframes act"
    gap = rel(split, one)
    print(f"\nsplit vs one run: no LoRA {base_gap:.2e}, keyframed LoRA {gap:.2e} (keyframes vs constant {effect:.2e})")
    assert gap < max(10 * base_gap, 1e-6), f"split run {gap:.2e} from one run (ComfyUI alone: {base_gap:.2e})"


def test_inpainting_checkpoint_takes_a_lora(comfy):
    c = comfy
    h = c.server("full")
    start = c.log_offset()
    base = latent_of(c, ckpt=INPAINT)
    ours = latent_of(c, ckpt=INPAINT, loader="LoraExtLoader", lora="lxt_lora.safetensors")
    theirs = latent_of(c, ckpt=INPAINT, loader="LoraLoader", lora="lxt_lora.safetensors")
    assert rel(ours, base) > 1e-3
    assert torch.equal(ours, theirs)
    # a conv_in LoRA trained on 4 channels: lora-ext applies it to the first 4 of 9 (ComfyUI's
    # own loader logs a shape error and leaves conv_in alone)
    wide = latent_of(c, ckpt=INPAINT, loader="LoraExtLoader", lora="lxt_conv_in.safetensors", sm=1.0, sc=0.0)
    assert rel(wide, base) > 1e-4
    assert not _warnings(h.log()[start:]), _warnings(h.log()[start:])[:5]


def _times(text):
    steps = [float(x) for x in re.findall(r"lora-ext-probe apply_model ([0-9.]+)", text)]
    loads = [float(x) for x in re.findall(r"lora-ext-probe unet_load ([0-9.]+)", text)]
    return steps, loads


def timing_series(c, mode, kinds=("lora", "loha"), rounds=ROUNDS, steps=2):
    """Per kind: per-workflow seconds, per-step seconds and UNet load seconds for LoraLoader
    and lora-ext, alternating, the model unloaded (POST /free, then ComfyUI's 10 s idle wait)
    before every run so each run patches again."""
    h = c.server(mode)
    out = {}
    for kind in kinds:
        lora = f"lxt_{kind}.safetensors"
        rec = {"LoraLoader": ([], [], []), "LoraExtLoader": ([], [], [])}
        lat = {}
        latent_of(c, loader="LoraLoader", lora=lora, steps=steps)  # warm up
        latent_of(c, loader="LoraExtLoader", lora=lora, steps=steps)
        for r in range(rounds):
            for loader in (("LoraLoader", "LoraExtLoader") if r % 2 == 0 else ("LoraExtLoader", "LoraLoader")):
                rh.comfy_free(h.url)
                start = c.log_offset()
                entry = c.run(graph(c, loader=loader, lora=lora, steps=steps, seed=100 + r))
                lat.setdefault(r, {})[loader] = c.latent(entry)
                st, ld = _times(h.log()[start:])
                rec[loader][0].append(rh.comfy_seconds(entry))
                rec[loader][1].append(statistics.median(st) if st else float("nan"))
                rec[loader][2].append(sum(ld))
        out[kind] = {k: {"median": tuple(statistics.median(x) for x in v), "best": tuple(min(x) for x in v)}
                     for k, v in rec.items()}
        # the same seeds: the two loaders' latents (parity in this mode, from the timed runs)
        out[kind]["rel_diff"] = max(rel(v["LoraExtLoader"], v["LoraLoader"]) for v in lat.values())
    return out


def test_time_against_loraloader_whole_model_loaded(comfy):
    check_time(comfy, "full", 1.1)


# the low-VRAM server last: one server at a time, started once per mode
def test_low_vram_loader_equals_loraloader(comfy):
    # both of lora-ext's paths (ComfyUI's LoRAAdapter for plain LoRAs, its own patch for the rest)
    parity(comfy, "lowvram", kinds=LOWVRAM_KINDS)


def test_time_against_loraloader_low_vram(comfy):
    check_time(comfy, "lowvram", 1.2)


def check_time(comfy, mode, limit):
    """Best of the rounds is compared (the machine may be shared: the minimum is the least
    disturbed run of each); medians are printed too."""
    res = timing_series(comfy, mode)
    print(f"\n[{mode}] {ROUNDS} rounds, best (median): workflow s | per-step s | UNet load s")
    for kind, r in res.items():
        a, b = r["LoraExtLoader"], r["LoraLoader"]
        cells = [f"{a['best'][i]:.2f} ({a['median'][i]:.2f}) vs {b['best'][i]:.2f} ({b['median'][i]:.2f}) = "
                 f"{a['best'][i] / b['best'][i]:.2f}x" for i in range(3)]
        print(f"  {kind:6s} lora-ext vs LoraLoader: " + " | ".join(cells))
        print(f"  {kind:6s} latents: relative difference lora-ext vs LoraLoader {r['rel_diff']:.2e}")
    if mode == "lowvram":
        assert "loaded partially" in comfy.host.log(), "the probe did not force a partial load"
    for kind, r in res.items():
        a, b = r["LoraExtLoader"]["best"], r["LoraLoader"]["best"]
        assert a[0] <= limit * b[0], f"{kind} ({mode}): workflow {a[0]:.2f}s vs LoraLoader {b[0]:.2f}s"
        if kind in BIT_IDENTICAL:
            assert r["rel_diff"] == 0.0, f"{kind} ({mode}): latents differ from LoraLoader's"
        elif kind in SAME_MATHS:
            assert r["rel_diff"] < SAME_MATHS[kind], f"{kind} ({mode}): latents differ by {r['rel_diff']:.2e}"
