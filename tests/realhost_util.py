"""Helpers for opt-in tests against REAL host UIs (reForge, Forge, Forge Classic, SD.Next).

Nothing here imports a host: a host runs as a subprocess of its own venv, bound to 127.0.0.1
on a free port, and is driven through its A1111-style HTTP API (/sdapi/v1/*). Only the
standard library, numpy, safetensors and torch are used, so this works in the test venv.

Where the hosts are (all optional; a test skips a host whose checkout is not given):

    LORA_EXT_REFORGE_DIR, LORA_EXT_FORGE_DIR, LORA_EXT_FORGE_CLASSIC_DIR, LORA_EXT_SDNEXT_DIR
        the host checkout; its interpreter is <dir>/venv/bin/python unless
    LORA_EXT_REFORGE_PYTHON, LORA_EXT_FORGE_PYTHON, LORA_EXT_FORGE_CLASSIC_PYTHON,
    LORA_EXT_SDNEXT_PYTHON
        name another one.

Typical use::

    d = host_dir("reforge")                      # None -> skip
    write_sd_checkpoint(os.path.join(d, "models/Stable-diffusion/rand15.safetensors"), "sd15")
    write_kohya_lora(os.path.join(d, "models/Lora/tiny.safetensors"), "sd15")
    with start_host("reforge") as h:            # boots, waits for the API, kills on exit
        a = txt2img(h.url, "a cat")
        b = txt2img(h.url, "a cat <lora:tiny:1>")
        assert (a != b).any()

Checkpoints are full-size, random (normal * 0.02, norms weight 1 / bias 0), in the A1111 /
ldm single-file layout, so every host's own loader and architecture detection is exercised.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import torch

HOSTS = ("reforge", "forge", "forge_classic", "sdnext")

# Per host: command-line flags that boot it headless, on CPU, with no network access needed.
# Each entry point is run as `<python> <script> <flags> --port N` inside the checkout.
HOST_LAUNCH = {
    "reforge": ("launch.py", [
        "--skip-prepare-environment", "--skip-install", "--skip-python-version-check",
        "--skip-torch-cuda-test", "--skip-version-check", "--no-download-sd-model",
        "--use-cpu", "all", "--always-cpu", "--no-half", "--no-half-vae", "--precision", "full",
        "--api", "--nowebui", "--disable-safe-unpickle", "--server-name", "127.0.0.1"]),
    "forge": ("launch.py", [
        "--skip-prepare-environment", "--skip-install", "--skip-python-version-check",
        "--skip-torch-cuda-test", "--skip-version-check", "--no-download-sd-model",
        "--always-cpu", "--api", "--nowebui", "--disable-safe-unpickle", "--server-name", "127.0.0.1"]),
    "forge_classic": ("launch.py", [
        "--skip-prepare-environment", "--skip-install", "--skip-python-version-check",
        "--skip-torch-cuda-test", "--skip-version-check", "--no-download-sd-model",
        "--always-cpu", "--api", "--nowebui", "--disable-safe-unpickle", "--server-name", "127.0.0.1"]),
    "sdnext": ("launch.py", [
        # --experimental keeps the PyPI diffusers/transformers (else it uninstalls diffusers and
        # pip-installs a git commit); --quick skips the installer (so extension install.py files
        # are NOT run: run_extension_installer() first, see below).
        "--skip-git", "--skip-requirements", "--skip-torch", "--quick", "--experimental",
        "--use-cpu", "all", "--server-name", "127.0.0.1"]),
}
# Extra environment per host (merged over os.environ).
HOST_ENV = {
    "reforge": {},
    "forge": {},
    "forge_classic": {},
    "sdnext": {"SD_NOHISTORY": "true"},
}


def host_dir(host: str) -> str | None:
    """The host checkout from LORA_EXT_<HOST>_DIR, or None when unset / missing."""
    d = os.environ.get(f"LORA_EXT_{host.upper()}_DIR")
    return d if d and os.path.isdir(d) else None


def host_python(host: str) -> str | None:
    p = os.environ.get(f"LORA_EXT_{host.upper()}_PYTHON")
    if p:
        return p
    d = host_dir(host)
    if d is None:
        return None
    p = os.path.join(d, "venv", "bin", "python")
    return p if os.path.exists(p) else None


# --------------------------------------------------------------------------- checkpoints

def _resblock(p, cin, cout, emb):
    s = {f"{p}in_layers.0.weight": (cin,), f"{p}in_layers.0.bias": (cin,),
         f"{p}in_layers.2.weight": (cout, cin, 3, 3), f"{p}in_layers.2.bias": (cout,),
         f"{p}emb_layers.1.weight": (cout, emb), f"{p}emb_layers.1.bias": (cout,),
         f"{p}out_layers.0.weight": (cout,), f"{p}out_layers.0.bias": (cout,),
         f"{p}out_layers.3.weight": (cout, cout, 3, 3), f"{p}out_layers.3.bias": (cout,)}
    if cin != cout:
        s[f"{p}skip_connection.weight"] = (cout, cin, 1, 1)
        s[f"{p}skip_connection.bias"] = (cout,)
    return s


def _transformer(p, c, ctx, depth, linear):
    proj = (c, c) if linear else (c, c, 1, 1)
    s = {f"{p}norm.weight": (c,), f"{p}norm.bias": (c,),
         f"{p}proj_in.weight": proj, f"{p}proj_in.bias": (c,),
         f"{p}proj_out.weight": proj, f"{p}proj_out.bias": (c,)}
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for a, kv in (("attn1", c), ("attn2", ctx)):
            s[f"{b}{a}.to_q.weight"] = (c, c)
            s[f"{b}{a}.to_k.weight"] = (c, kv)
            s[f"{b}{a}.to_v.weight"] = (c, kv)
            s[f"{b}{a}.to_out.0.weight"] = (c, c)
            s[f"{b}{a}.to_out.0.bias"] = (c,)
        s[f"{b}ff.net.0.proj.weight"] = (8 * c, c)
        s[f"{b}ff.net.0.proj.bias"] = (8 * c,)
        s[f"{b}ff.net.2.weight"] = (c, 4 * c)
        s[f"{b}ff.net.2.bias"] = (c,)
        for n in ("norm1", "norm2", "norm3"):
            s[f"{b}{n}.weight"] = (c,)
            s[f"{b}{n}.bias"] = (c,)
    return s


def _unet_shapes(arch: str) -> dict:
    """ldm UNetModel state-dict shapes (openaimodel.UNetModel), prefix model.diffusion_model."""
    if arch == "sd15":
        mult, attn_depth, ctx, linear, adm = (1, 2, 4, 4), (1, 1, 1, 0), 768, False, None
    elif arch == "sdxl":
        mult, attn_depth, ctx, linear, adm = (1, 2, 4), (0, 2, 10), 2048, True, 2816
    else:
        raise ValueError(arch)
    mc, emb, nres = 320, 1280, 2
    P = "model.diffusion_model."
    s = {f"{P}time_embed.0.weight": (emb, mc), f"{P}time_embed.0.bias": (emb,),
         f"{P}time_embed.2.weight": (emb, emb), f"{P}time_embed.2.bias": (emb,)}
    if adm:
        s.update({f"{P}label_emb.0.0.weight": (emb, adm), f"{P}label_emb.0.0.bias": (emb,),
                  f"{P}label_emb.0.2.weight": (emb, emb), f"{P}label_emb.0.2.bias": (emb,)})
    s[f"{P}input_blocks.0.0.weight"] = (mc, 4, 3, 3)
    s[f"{P}input_blocks.0.0.bias"] = (mc,)
    chans, ch, i = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(nres):
            out = m * mc
            s.update(_resblock(f"{P}input_blocks.{i}.0.", ch, out, emb))
            ch = out
            if attn_depth[level]:
                s.update(_transformer(f"{P}input_blocks.{i}.1.", ch, ctx, attn_depth[level], linear))
            chans.append(ch)
            i += 1
        if level != len(mult) - 1:
            s[f"{P}input_blocks.{i}.0.op.weight"] = (ch, ch, 3, 3)
            s[f"{P}input_blocks.{i}.0.op.bias"] = (ch,)
            chans.append(ch)
            i += 1
    mid_depth = attn_depth[-1] or 1
    s.update(_resblock(f"{P}middle_block.0.", ch, ch, emb))
    s.update(_transformer(f"{P}middle_block.1.", ch, ctx, mid_depth, linear))
    s.update(_resblock(f"{P}middle_block.2.", ch, ch, emb))
    o = 0
    for level, m in list(enumerate(mult))[::-1]:
        for r in range(nres + 1):
            skip = chans.pop()
            out = m * mc
            s.update(_resblock(f"{P}output_blocks.{o}.0.", ch + skip, out, emb))
            ch = out
            j = 1
            if attn_depth[level]:
                s.update(_transformer(f"{P}output_blocks.{o}.1.", ch, ctx, attn_depth[level], linear))
                j = 2
            if level and r == nres:
                s[f"{P}output_blocks.{o}.{j}.conv.weight"] = (ch, ch, 3, 3)
                s[f"{P}output_blocks.{o}.{j}.conv.bias"] = (ch,)
            o += 1
    s.update({f"{P}out.0.weight": (mc,), f"{P}out.0.bias": (mc,),
              f"{P}out.2.weight": (4, mc, 3, 3), f"{P}out.2.bias": (4,)})
    return s


def _clip_hf_shapes(p, width, layers, inner, vocab=49408, ctx=77):
    """transformers CLIPTextModel names (SD1 / SDXL te1 in ldm checkpoints)."""
    s = {f"{p}embeddings.token_embedding.weight": (vocab, width),
         f"{p}embeddings.position_embedding.weight": (ctx, width),
         f"{p}final_layer_norm.weight": (width,), f"{p}final_layer_norm.bias": (width,)}
    for i in range(layers):
        b = f"{p}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{b}self_attn.{n}.weight"] = (width, width)
            s[f"{b}self_attn.{n}.bias"] = (width,)
        for n in ("layer_norm1", "layer_norm2"):
            s[f"{b}{n}.weight"] = (width,)
            s[f"{b}{n}.bias"] = (width,)
        s[f"{b}mlp.fc1.weight"] = (inner, width)
        s[f"{b}mlp.fc1.bias"] = (inner,)
        s[f"{b}mlp.fc2.weight"] = (width, inner)
        s[f"{b}mlp.fc2.bias"] = (width,)
    return s


def _openclip_shapes(p, width, layers, inner, vocab=49408, ctx=77):
    """OpenCLIP names (SDXL te2: conditioner.embedders.1.model.)."""
    s = {f"{p}token_embedding.weight": (vocab, width), f"{p}positional_embedding": (ctx, width),
         f"{p}ln_final.weight": (width,), f"{p}ln_final.bias": (width,),
         f"{p}text_projection": (width, width), f"{p}logit_scale": ()}
    for i in range(layers):
        b = f"{p}transformer.resblocks.{i}."
        s.update({f"{b}ln_1.weight": (width,), f"{b}ln_1.bias": (width,),
                  f"{b}ln_2.weight": (width,), f"{b}ln_2.bias": (width,),
                  f"{b}attn.in_proj_weight": (3 * width, width), f"{b}attn.in_proj_bias": (3 * width,),
                  f"{b}attn.out_proj.weight": (width, width), f"{b}attn.out_proj.bias": (width,),
                  f"{b}mlp.c_fc.weight": (inner, width), f"{b}mlp.c_fc.bias": (inner,),
                  f"{b}mlp.c_proj.weight": (width, inner), f"{b}mlp.c_proj.bias": (width,)})
    return s


def _vae_res(p, cin, cout):
    s = {f"{p}norm1.weight": (cin,), f"{p}norm1.bias": (cin,),
         f"{p}conv1.weight": (cout, cin, 3, 3), f"{p}conv1.bias": (cout,),
         f"{p}norm2.weight": (cout,), f"{p}norm2.bias": (cout,),
         f"{p}conv2.weight": (cout, cout, 3, 3), f"{p}conv2.bias": (cout,)}
    if cin != cout:
        s[f"{p}nin_shortcut.weight"] = (cout, cin, 1, 1)
        s[f"{p}nin_shortcut.bias"] = (cout,)
    return s


def _vae_mid(p, c):
    s = _vae_res(f"{p}mid.block_1.", c, c)
    s.update(_vae_res(f"{p}mid.block_2.", c, c))
    a = f"{p}mid.attn_1."
    s.update({f"{a}norm.weight": (c,), f"{a}norm.bias": (c,)})
    for n in ("q", "k", "v", "proj_out"):
        s[f"{a}{n}.weight"] = (c, c, 1, 1)
        s[f"{a}{n}.bias"] = (c,)
    return s


def _vae_shapes(P="first_stage_model."):
    """ldm AutoencoderKL (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4) - SD1/SD2/SDXL alike."""
    ch, mult, nres = 128, (1, 2, 4, 4), 2
    s = {f"{P}encoder.conv_in.weight": (ch, 3, 3, 3), f"{P}encoder.conv_in.bias": (ch,)}
    cin = ch
    for i, m in enumerate(mult):
        out = ch * m
        for b in range(nres):
            s.update(_vae_res(f"{P}encoder.down.{i}.block.{b}.", cin, out))
            cin = out
        if i != len(mult) - 1:
            s[f"{P}encoder.down.{i}.downsample.conv.weight"] = (cin, cin, 3, 3)
            s[f"{P}encoder.down.{i}.downsample.conv.bias"] = (cin,)
    s.update(_vae_mid(f"{P}encoder.", cin))
    s.update({f"{P}encoder.norm_out.weight": (cin,), f"{P}encoder.norm_out.bias": (cin,),
              f"{P}encoder.conv_out.weight": (8, cin, 3, 3), f"{P}encoder.conv_out.bias": (8,),
              f"{P}quant_conv.weight": (8, 8, 1, 1), f"{P}quant_conv.bias": (8,),
              f"{P}post_quant_conv.weight": (4, 4, 1, 1), f"{P}post_quant_conv.bias": (4,)})
    cin = ch * mult[-1]
    s.update({f"{P}decoder.conv_in.weight": (cin, 4, 3, 3), f"{P}decoder.conv_in.bias": (cin,)})
    s.update(_vae_mid(f"{P}decoder.", cin))
    for i in reversed(range(len(mult))):
        out = ch * mult[i]
        for b in range(nres + 1):
            s.update(_vae_res(f"{P}decoder.up.{i}.block.{b}.", cin, out))
            cin = out
        if i != 0:
            s[f"{P}decoder.up.{i}.upsample.conv.weight"] = (cin, cin, 3, 3)
            s[f"{P}decoder.up.{i}.upsample.conv.bias"] = (cin,)
    s.update({f"{P}decoder.norm_out.weight": (cin,), f"{P}decoder.norm_out.bias": (cin,),
              f"{P}decoder.conv_out.weight": (3, cin, 3, 3), f"{P}decoder.conv_out.bias": (3,)})
    return s


def checkpoint_shapes(arch: str = "sd15") -> dict:
    """Key -> shape of an A1111 / ldm single-file checkpoint ("sd15" or "sdxl")."""
    s = _unet_shapes(arch)
    if arch == "sd15":
        s.update(_clip_hf_shapes("cond_stage_model.transformer.text_model.", 768, 12, 3072))
    else:
        s.update(_clip_hf_shapes("conditioner.embedders.0.transformer.text_model.", 768, 12, 3072))
        s.update(_openclip_shapes("conditioner.embedders.1.model.", 1280, 32, 5120))
    s.update(_vae_shapes())
    return s


_NORM_MARKERS = ("norm", "ln_", "layer_norm", "in_layers.0.", "out_layers.0.", ".out.0.")


def _is_norm(key: str) -> bool:
    return any(m in key for m in _NORM_MARKERS)


def random_state_dict(arch: str = "sd15", seed: int = 0, std: float = 0.02,
                      dtype=torch.float16) -> dict:
    """Random weights for ``checkpoint_shapes(arch)``: weights ~ N(0, std), biases 0,
    norms weight 1 / bias 0, embeddings N(0, std); logit_scale = ln(100)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in checkpoint_shapes(arch).items():
        if k.endswith("logit_scale"):
            t = torch.tensor(4.6052)
        elif _is_norm(k) and len(shape) == 1:
            t = torch.ones(shape) if k.endswith("weight") else torch.zeros(shape)
        elif k.endswith("bias") or k.endswith("_bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        sd[k] = t.to(dtype).contiguous()
    return sd


def write_sd_checkpoint(path: str, arch: str = "sd15", seed: int = 0, std: float = 0.02,
                        dtype=torch.float16) -> str:
    """Write a full-size random ``arch`` ("sd15" | "sdxl") checkpoint as safetensors."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = random_state_dict(arch, seed, std, dtype)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt", "lora_ext_random": f"{arch} seed={seed} std={std}"})
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- LoRA

# kohya module name -> (lora_down shape, lora_up shape) builders, rank r.
_KOHYA_SD15 = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": lambda r: ((r, 320, 1, 1), (320, r, 1, 1)),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": lambda r: ((r, 320), (320, r)),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": lambda r: ((r, 768), (320, r)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0": lambda r: ((r, 1280), (1280, r)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": lambda r: ((r, 5120), (1280, r)),
    "lora_unet_up_blocks_3_attentions_2_proj_out": lambda r: ((r, 320, 1, 1), (320, r, 1, 1)),
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_v": lambda r: ((r, 320), (320, r)),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": lambda r: ((r, 768), (768, r)),
    "lora_te_text_model_encoder_layers_11_mlp_fc1": lambda r: ((r, 768), (3072, r)),
}
_KOHYA_SDXL = {
    "lora_unet_input_blocks_4_1_proj_in": lambda r: ((r, 640), (640, r)),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": lambda r: ((r, 640), (640, r)),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": lambda r: ((r, 2048), (640, r)),
    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0": lambda r: ((r, 1280), (1280, r)),
    "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2": lambda r: ((r, 2560), (640, r)),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": lambda r: ((r, 768), (768, r)),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": lambda r: ((r, 1280), (1280, r)),
}


def write_kohya_lora(path: str, arch: str = "sd15", rank: int = 4, seed: int = 1,
                     scale: float = 0.5, alpha: float | None = None, modules=None,
                     dtype=torch.float16) -> str:
    """A small kohya-format LoRA (``lora_down``/``lora_up``/``alpha``) with random,
    non-trivial weights (both factors N(0, scale)). Returns ``path``."""
    from safetensors.torch import save_file
    table = _KOHYA_SD15 if arch == "sd15" else _KOHYA_SDXL
    names = list(modules) if modules else list(table)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in names:
        dshape, ushape = table[n](rank)
        sd[f"{n}.lora_down.weight"] = (torch.randn(dshape, generator=g) * scale).to(dtype)
        sd[f"{n}.lora_up.weight"] = (torch.randn(ushape, generator=g) * scale).to(dtype)
        sd[f"{n}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank)).to(dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                  "ss_base_model_version": "sd_v1" if arch == "sd15" else "sdxl_base_v1-0"})
    return path


# --------------------------------------------------------------------------- running a host

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _post(url: str, payload: dict, timeout: float = 600):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
            return json.loads(body) if body.strip() else None
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> HTTP {e.code}: {e.read()[:2000]!r}") from None


class RunningHost:
    def __init__(self, host, proc, port, log_path):
        self.host, self.proc, self.port, self.log_path = host, proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.boot_s = None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 20):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)


@contextlib.contextmanager
def start_host(host: str, extra_args=(), env=None, boot_timeout: float = 900, log_path=None,
               checkout: str | None = None, python: str | None = None,
               sdnext_pipeline: str = "Stable Diffusion", webui: bool = False):
    """Boot ``host`` headless on CPU, API only, on 127.0.0.1:<free port>; wait until
    /sdapi/v1/sd-models answers (bounded by ``boot_timeout``), yield a RunningHost, and kill
    its whole process group on exit. The console goes to ``log_path`` (a temp file if None)."""
    d = checkout or host_dir(host)
    py = python or host_python(host)
    if not d or not py:
        raise RuntimeError(f"host {host!r} not configured (LORA_EXT_{host.upper()}_DIR)")
    script, flags = HOST_LAUNCH[host]
    if webui:  # the full UI (gradio) as well as the API: extension tabs are built
        flags = [f for f in flags if f != "--nowebui"]
    port = free_port()
    cmd = [py, script, *flags, "--port", str(port), *extra_args]
    e = dict(os.environ)
    e.update(HOST_ENV[host])
    e.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "DO_NOT_TRACK": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    e.pop("VIRTUAL_ENV", None)
    if env:
        e.update(env)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"{host}-", suffix=".log")
        os.close(fd)
    logf = open(log_path, "wb")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=d, env=e, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    h = RunningHost(host, proc, port, log_path)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{host} exited with {proc.returncode} during boot:\n{h.log()[-4000:]}")
            if time.time() - t0 > boot_timeout:
                raise TimeoutError(f"{host} did not answer within {boot_timeout}s:\n{h.log()[-4000:]}")
            try:
                _get(h.url + "/sdapi/v1/sd-models", timeout=5)
                break
            except (OSError, ValueError):
                time.sleep(2)
        _after_boot(h, sdnext_pipeline)
        h.boot_s = time.time() - t0
        yield h
    finally:
        h.stop()
        logf.close()


#: SD.Next logs this once webui.py ``load_model`` has returned, i.e. its autoload thread is done
SDNEXT_STARTED = "Startup time:"


def wait_sdnext_autoload(h: RunningHost, timeout: float = 900) -> float:
    """Block until SD.Next's boot-time model load has finished (its console says
    ``SDNEXT_STARTED``); returns the seconds waited.

    SD.Next's API answers while its autoload thread is still loading the checkpoint. A model
    load started then (``/sdapi/v1/reload-checkpoint``, or ``sd_model_checkpoint``) runs beside
    it, and both build their components under accelerate's ``init_empty_weights()``, which
    patches ``torch.nn.Module.register_parameter`` for the whole process and puts back, on
    exit, the function it found: when the first load leaves while the second is inside, the
    second puts back the first one's patch, and from then on every module built in the process
    has its parameters on ``meta``. SD.Next's own LoRA handler builds one ``nn.Linear`` /
    ``nn.Conv2d`` per LoRA factor and failed on every layer ("Cannot copy out of meta tensor";
    issue 14, tests/test_sdnext_meta_race.py)."""
    t0 = time.time()
    while SDNEXT_STARTED not in h.log():
        if h.proc.poll() is not None:
            raise RuntimeError(f"sdnext exited with {h.proc.returncode} during boot:\n{h.log()[-4000:]}")
        if time.time() - t0 > timeout:
            raise TimeoutError(f"sdnext did not finish its boot-time model load within {timeout}s:\n"
                               f"{h.log()[-4000:]}")
        time.sleep(1)
    return time.time() - t0


def _after_boot(h: RunningHost, sdnext_pipeline: str):
    """A1111 family: turn off live previews (they download models/VAE-approx/model.pt from
    GitHub on the first generation -> HTTP 500 URLError offline). SD.Next: its size-based
    autodetect calls a 2 GB SD1.5 "Stable Diffusion 1.5", for which it passes no local config to
    diffusers' from_single_file, which then needs the HF hub (LocalEntryNotFoundError offline);
    forcing the pipeline ("Stable Diffusion" / "Stable Diffusion XL") makes it use configs/sd15 or
    configs/sdxl. The API also answers before SD.Next has loaded the model ("Aborted: op=process
    model not loaded", no image), so the checkpoint is (re)loaded synchronously here, once the
    boot-time load is over: never two loads at once (``wait_sdnext_autoload``)."""
    if h.host == "sdnext":
        wait_sdnext_autoload(h)
        models = _get(h.url + "/sdapi/v1/sd-models", timeout=30)
        opts = {"diffusers_pipeline": sdnext_pipeline}
        if models:
            opts["sd_model_checkpoint"] = models[0]["title"]
        _post(h.url + "/sdapi/v1/options", opts, timeout=900)
        _post(h.url + "/sdapi/v1/reload-checkpoint", {}, timeout=900)
    else:
        _post(h.url + "/sdapi/v1/options", {"live_previews_enable": False}, timeout=120)


def run_extension_installer(host: str, ext_dir: str, checkout: str | None = None,
                            python: str | None = None, timeout: float = 600):
    """Run an extension's install.py the way the host's own installer does (the boot flags above
    skip it): A1111 family via modules.launch_utils.run_extension_installer, SD.Next via
    installer.run_extension_installer. Returns the CompletedProcess."""
    d = checkout or host_dir(host)
    py = python or host_python(host)
    if host == "sdnext":
        code = ("import sys; sys.argv=['launch.py']; import installer; installer.setup_logging(); "
                f"installer.run_extension_installer({ext_dir!r}); "
                "sys.exit(1 if installer.errors else 0)")
    else:
        code = ("import sys; sys.argv=['launch.py']; from modules import launch_utils; "
                f"launch_utils.run_extension_installer({ext_dir!r})")
    e = dict(os.environ)
    e.pop("VIRTUAL_ENV", None)
    return subprocess.run([py, "-c", code], cwd=d, env=e, capture_output=True, text=True,
                          timeout=timeout)


def decode_image(b64: str) -> np.ndarray:
    from PIL import Image  # pillow comes with torch's usual test deps; imported lazily
    if "," in b64[:64]:
        b64 = b64.split(",", 1)[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def txt2img(url: str, prompt: str, steps: int = 2, width: int = 64, height: int = 64,
            sampler_name: str = "Euler", seed: int = 1, cfg_scale: float = 1.0,
            timeout: float = 900, save_png: str | None = None, **extra) -> np.ndarray:
    """POST /sdapi/v1/txt2img and return the first image as an HxWx3 uint8 array."""
    payload = dict(prompt=prompt, steps=steps, width=width, height=height,
                   sampler_name=sampler_name, seed=seed, cfg_scale=cfg_scale, **extra)
    r = _post(url.rstrip("/") + "/sdapi/v1/txt2img", payload, timeout=timeout)
    imgs = r.get("images") or []
    if not imgs:
        raise RuntimeError(f"txt2img returned no image: {str(r)[:2000]}")
    if save_png:
        with open(save_png, "wb") as f:
            b64 = imgs[0].split(",", 1)[1] if "," in imgs[0][:64] else imgs[0]
            f.write(base64.b64decode(b64))
    return decode_image(imgs[0])


def set_model(url: str, title: str, timeout: float = 900):
    """Switch the host's checkpoint (A1111 options API)."""
    return _post(url.rstrip("/") + "/sdapi/v1/options", {"sd_model_checkpoint": title}, timeout)



# --------------------------------------------------------------------------- ComfyUI
# A real ComfyUI checkout (Comfy-Org/ComfyUI) in LORA_EXT_COMFYUI_DIR, its interpreter
# <dir>/venv/bin/python unless LORA_EXT_COMFYUI_PYTHON names another. It is driven through its
# own HTTP API (POST /prompt, GET /history/<id>, POST /free), on 127.0.0.1, --cpu.

def comfyui_dir() -> str | None:
    return host_dir("comfyui")


def comfyui_python() -> str | None:
    return host_python("comfyui")


def _wait_history(url: str, prompt_id: str, timeout: float) -> dict:
    t0 = time.time()
    while True:
        h = _get(f"{url}/history/{prompt_id}", timeout=30)
        if prompt_id in h:
            return h[prompt_id]
        if time.time() - t0 > timeout:
            raise TimeoutError(f"ComfyUI prompt {prompt_id} did not finish within {timeout}s")
        time.sleep(0.2)


def comfy_run(url: str, graph: dict, timeout: float = 900) -> dict:
    """Queue an API-format workflow and wait for it; returns its /history entry (with
    ``outputs`` and ``status``). Raises with ComfyUI's own error when the prompt fails."""
    r = _post(url.rstrip("/") + "/prompt", {"prompt": graph, "client_id": "lora-ext-tests"}, timeout=120)
    if r.get("node_errors"):
        raise RuntimeError(f"ComfyUI refused the prompt: {json.dumps(r['node_errors'])[:2000]}")
    entry = _wait_history(url.rstrip("/"), r["prompt_id"], timeout)
    status = entry.get("status") or {}
    if status.get("status_str") != "success":
        msgs = [m for m in status.get("messages", []) if m and m[0] == "execution_error"]
        raise RuntimeError(f"ComfyUI prompt failed: {json.dumps(msgs)[:4000]}")
    return entry


def comfy_seconds(entry: dict) -> float:
    """Wall time of one executed prompt, from ComfyUI's own execution_start/success timestamps."""
    ts = {m[0]: m[1].get("timestamp") for m in (entry.get("status") or {}).get("messages", []) if m}
    return (ts["execution_success"] - ts["execution_start"]) / 1000.0


def comfy_free(url: str, settle: float = 11.0) -> None:
    """POST /free: unload every model (weights unpatched) and free memory, before the next prompt.

    ComfyUI's prompt worker acts on the flag only when its queue wait returns (main.py 0.3.64
    prompt_worker L184-L226: at most ``gc_collect_interval`` = 10 s after the last prompt while
    idle, or *after* the next queued prompt has run), so this waits ``settle`` seconds."""
    _post(url.rstrip("/") + "/free", {"unload_models": True, "free_memory": True}, timeout=120)
    time.sleep(settle)


@contextlib.contextmanager
def start_comfyui(extra_args=(), env=None, boot_timeout: float = 300, log_path=None,
                  checkout: str | None = None, python: str | None = None):
    """Boot ComfyUI headless (``main.py --cpu --listen 127.0.0.1 --port N``), wait until
    /system_stats answers, yield a RunningHost, kill its process group on exit."""
    d = checkout or comfyui_dir()
    py = python or comfyui_python()
    if not d or not py:
        raise RuntimeError("ComfyUI not configured (LORA_EXT_COMFYUI_DIR)")
    port = free_port()
    cmd = [py, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           *extra_args]
    e = dict(os.environ)
    e.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"})
    e.pop("VIRTUAL_ENV", None)
    e.pop("PYTHONPATH", None)
    if env:
        e.update(env)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="comfyui-", suffix=".log")
        os.close(fd)
    logf = open(log_path, "wb")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=d, env=e, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    h = RunningHost("comfyui", proc, port, log_path)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode} during boot:\n{h.log()[-4000:]}")
            if time.time() - t0 > boot_timeout:
                raise TimeoutError(f"ComfyUI did not answer within {boot_timeout}s:\n{h.log()[-4000:]}")
            try:
                _get(h.url + "/system_stats", timeout=5)
                break
            except (OSError, ValueError):
                time.sleep(1)
        h.boot_s = time.time() - t0
        yield h
    finally:
        h.stop()
        logf.close()


# kohya module names (ldm spelling, as ComfyUI's key map also reads them) of a full-size SD1.5
# UNet and CLIP-L, with their weight shapes: attention, feed-forward, 1x1 proj convs, 3x3 resnet
# convs, and text-encoder projections.
def sd15_lora_modules(n_blocks: int = 16, with_te: bool = True, with_convs: bool = True) -> dict:
    """``{kohya name: weight shape}`` for ``n_blocks`` of the 16 SD1.5 transformer blocks (all
    their attention, feed-forward and proj_in/proj_out layers), plus resnet 3x3 convs and
    CLIP-L attention/MLP layers."""
    shapes = checkpoint_shapes("sd15")
    out = {}
    blocks = sorted({k.split(".transformer_blocks.")[0] for k in shapes
                     if ".transformer_blocks." in k and k.startswith("model.diffusion_model.")})
    for b in blocks[:n_blocks]:
        for k, shape in shapes.items():
            if not k.startswith(b + ".") or not k.endswith(".weight") or len(shape) < 2:
                continue
            mod = k[len("model.diffusion_model."):-len(".weight")]
            if ".norm" in mod:
                continue
            out["lora_unet_" + mod.replace(".", "_")] = tuple(shape)
    if with_convs:
        for k, shape in shapes.items():
            if k.startswith("model.diffusion_model.") and k.endswith("in_layers.2.weight") and len(shape) == 4:
                mod = k[len("model.diffusion_model."):-len(".weight")]
                if mod.startswith(("input_blocks.1.", "output_blocks.11.")):
                    out["lora_unet_" + mod.replace(".", "_")] = tuple(shape)
    if with_te:
        for i in (0, 5, 11):
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"):
                k = f"cond_stage_model.transformer.text_model.encoder.layers.{i}.{m}.weight"
                out["lora_te_text_model_encoder_layers_" + f"{i}_{m}".replace(".", "_")] = tuple(shapes[k])
    return out


def adapter_tensors_of(kind: str, shape: tuple, g, rank: int = 4, mag: float = 0.1) -> dict:
    """LyCORIS / kohya tensors of ``kind`` for a weight of ``shape`` (random, non-trivial):
    lora, locon_tucker, dora, loha, lokr, full, oft, ia3."""
    out, inn, *k = shape
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    alpha = torch.tensor(float(rank) * 0.75)
    ones = [1] * len(k)
    if kind in ("lora", "dora"):
        t = {"lora_down.weight": r(rank, inn, *k) * mag, "lora_up.weight": r(out, rank, *ones) * mag, "alpha": alpha}
        if kind == "dora":
            t["dora_scale"] = torch.rand(out, *([1] * (len(shape) - 1)), generator=g) * 0.02 + 0.01
        return t
    if kind == "locon_tucker":
        if not k:
            return adapter_tensors_of("lora", shape, g, rank, mag)
        return {"lora_down.weight": r(rank, inn, *ones) * mag, "lora_mid.weight": r(rank, rank, *k) * mag,
                "lora_up.weight": r(out, rank, *ones) * mag, "alpha": alpha}
    kk = 1
    for d in k:
        kk *= d
    if kind == "loha":
        return {"hada_w1_a": r(out, rank) * mag, "hada_w1_b": r(rank, inn * kk) * mag,
                "hada_w2_a": r(out, rank) * mag, "hada_w2_b": r(rank, inn * kk) * mag, "alpha": alpha}
    if kind == "lokr":
        a = 4 if out % 4 == 0 else 1
        c = 4 if inn % 4 == 0 else 1
        return {"lokr_w1": r(a, c) * mag * 3, "lokr_w2": r(out // a, inn // c, *k) * mag}
    if kind == "full":
        return {"diff": r(*shape) * 0.002}
    if kind == "oft":
        b = 8 if out % 8 == 0 else out
        return {"oft_blocks": r(out // b, b, b) * 0.01, "alpha": torch.tensor(0.0)}
    if kind == "ia3":
        return {"weight": r(out) * 0.3}
    raise ValueError(kind)


def write_lycoris_lora(path: str, kind: str, modules: dict, rank: int = 4, seed: int = 3,
                       dtype=torch.float16) -> str:
    """A LoRA file of one adapter ``kind`` on ``modules`` (``{kohya name: weight shape}``)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in modules.items():
        for t, v in adapter_tensors_of(kind, shape, g, rank).items():
            sd[f"{name}.{t}"] = v.to(dtype).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    return path

if __name__ == "__main__":  # tiny CLI: python realhost_util.py ckpt|lora ARCH PATH
    what, arch_, out = sys.argv[1:4]
    (write_sd_checkpoint if what == "ckpt" else write_kohya_lora)(out, arch_)
    print(out)
