"""``generate``: prompt (with LoRA tags) -> images, on a checkpoint, with no host.

One run drives a :class:`lora_ext.session.Session` through the same four seam calls a host
shim makes (:mod:`lora_ext.hookspecs`): model loaded, specs resolved (the prompt's LoRA tags,
found in the LoRA folders, applied by the engine; the text encoders at step 0's strengths),
``lora_ext_step_begins`` before every sampler step (per-step strengths: keyframes,
start/stop, block weights), ``lora_ext_run_ends`` (everything restored bit-exactly). Plugins
passed as ``plugins=`` are registered on the session's plugin manager for the run and see the
same calls. Few-step LoRAs are recognised and their settings filled in; the images are saved
as PNGs with A1111 infotext.

Seeds: image ``i`` of a batch uses seed ``seed + i`` for its starting noise and for every
noise draw of the stochastic samplers (its own CPU generator), so it equals a run of batch 1
with that seed.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..errors import LoraExtError
from ..hookspecs import hookimpl
from .denoiser import Denoiser
from .fewstep import FewStep, detect_few_step
from .loading import Model, load_model
from .noise import BrownianNoise, ImageNoise
from .png import format_infotext, save_png
from .samplers import SAMPLERS, canonical_sampler, sampler_label
from .schedules import canonical_schedule, get_sigmas, schedule_label
from .text import count_chunks, encode_prompt

__all__ = ["generate", "Result", "DEFAULTS", "default_schedule"]

#: what a run uses when neither the user nor a few-step LoRA says otherwise (A1111's defaults)
DEFAULTS = {"sampler": "dpmpp_2m", "steps": 20, "cfg": 7.0, "denoise": 0.75}

# A1111's "Automatic" schedule per sampler; the rest use "normal".
_AUTO_SCHEDULE = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential",
                  "dpmpp_2s_a": "karras", "dpm_2": "karras", "dpm_2_a": "karras",
                  "ddim": "ddim_uniform", "lcm": "sgm_uniform"}
# Samplers whose noise draws overlap within a step: one Brownian path per image.
_BROWNIAN = {"dpmpp_sde", "dpmpp_2m_sde"}


def default_schedule(sampler: str) -> str:
    return _AUTO_SCHEDULE.get(canonical_sampler(sampler), "normal")


@dataclass
class Result:
    """``images`` (PIL, when decoded), ``latents`` (the final latents, model scale),
    ``seeds``, ``infotexts`` and ``paths`` (one per image), ``settings`` (what was used),
    ``notes`` (what was decided, e.g. few-step settings), ``loras`` (the LoraSpecs applied),
    ``steps_seen`` (the steps the step hook saw)."""

    images: list
    latents: torch.Tensor
    seeds: list
    infotexts: list
    paths: list
    settings: dict
    notes: list = field(default_factory=list)
    loras: list = field(default_factory=list)
    steps_seen: list = field(default_factory=list)


def _say(log, text):
    if log is not None:
        log(text)


def _extra_specs(extra_loras) -> list:
    from ..spec import LoraSpec

    specs = []
    for item in extra_loras or ():
        if isinstance(item, LoraSpec):
            specs.append(item)
            continue
        path, strength = (item if isinstance(item, tuple) else (item, 1.0))
        name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        specs.append(LoraSpec(name=name, path=os.fspath(path), te=float(strength), unet=float(strength)))
    return specs


class _StepLog:
    """Records the steps announced on the seam (``Result.steps_seen``)."""

    def __init__(self):
        self.steps: list = []

    @hookimpl
    def lora_ext_step_begins(self, step):
        self.steps.append(step)


def _lora_hashes(specs) -> Optional[str]:
    from ..io import short_hash

    parts = []
    for s in specs:
        if s.path and s.path.lower().endswith(".safetensors"):
            try:
                parts.append(f"{s.name}: {short_hash(s.path)}")
            except LoraExtError:
                pass
    return ", ".join(parts) or None


def _load_image(init_image, width, height, multiple):
    from PIL import Image

    img = init_image if isinstance(init_image, Image.Image) else Image.open(init_image)
    img = img.convert("RGB")
    w = width or img.width - img.width % multiple
    h = height or img.height - img.height % multiple
    if (img.width, img.height) != (w, h):
        img = img.resize((w, h), Image.LANCZOS)
    return img


@torch.no_grad()
def _encode_image(model: Model, img, batch: int) -> torch.Tensor:
    import numpy as np

    vae = model.vae
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    x = x.to(next(vae.parameters()).device, next(vae.parameters()).dtype)
    latent = vae.encode(x).latent_dist.mean
    shift = vae.config.get("shift_factor") or 0.0
    latent = (latent - shift) * vae.config["scaling_factor"]
    return latent.float().repeat(batch, 1, 1, 1)


@torch.no_grad()
def decode_latents(model: Model, latents: torch.Tensor) -> list:
    """Latents (model scale) -> PIL images."""
    from PIL import Image

    vae = model.vae
    p = next(vae.parameters())
    shift = vae.config.get("shift_factor") or 0.0
    images = []
    for lat in latents:
        z = (lat[None].to(p.device, p.dtype) / vae.config["scaling_factor"]) + shift
        img = vae.decode(z).sample[0].float().clamp(-1, 1)
        arr = ((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(arr))
    return images


def _out_paths(out, seeds: Sequence[int]) -> list:
    if out is None:
        return [None] * len(seeds)
    out = os.fspath(out)
    if out.lower().endswith(".png"):
        if len(seeds) == 1:
            return [out]
        stem = out[:-4]
        return [f"{stem}-{i + 1}.png" for i in range(len(seeds))]
    os.makedirs(out, exist_ok=True)
    start = 1 + sum(1 for n in os.listdir(out) if n.lower().endswith(".png"))
    return [os.path.join(out, f"{start + i:05d}-{s}.png") for i, s in enumerate(seeds)]


def generate(checkpoint, prompt: str, negative: str = "", *,
             lora_dirs: Iterable = (), loras: Iterable = (),
             sampler: Optional[str] = None, schedule: Optional[str] = None, steps: Optional[int] = None,
             cfg: Optional[float] = None, seed: Optional[int] = None, width: Optional[int] = None,
             height: Optional[int] = None, batch: int = 1, init_image=None, denoise: Optional[float] = None,
             out=None, tokenizer: Optional[str] = None, vae: Optional[str] = None,
             prediction: Optional[str] = None, clip_skip: int = 1, eta: Optional[float] = None,
             quantize: bool = False, device=None, dtype: Optional[torch.dtype] = None,
             lora_method: str = "auto", session=None, plugins: Iterable = (), keep_loras: bool = False,
             decode: bool = True,
             progress: bool = True, log: Optional[Callable[[str], None]] = print) -> Result:
    """Generate ``batch`` images. ``checkpoint``: a path or a :class:`Model` from
    :func:`load_model` (reused as is; LoRAs are taken off again afterwards).

    ``prompt`` may hold LoRA tags (``<lora:name:0.8>``), looked up in ``lora_dirs``; ``loras``
    adds LoRAs directly (paths, ``(path, strength)`` or ``LoraSpec``). ``sampler``,
    ``schedule``, ``steps``, ``cfg`` left as None take a few-step LoRA's settings if one is
    present, else :data:`DEFAULTS` and :func:`default_schedule`. ``seed`` None or -1: random.
    ``init_image`` (path or PIL image) makes it img2img with strength ``denoise``. ``out``: a
    folder (files ``NNNNN-SEED.png``), a ``.png`` path (``-2``, ``-3``... for more images), or
    None to save nothing. ``eta``: the noise of the ancestral/SDE samplers and DDIM.
    ``session``: a :class:`lora_ext.session.Session` to drive (default: a new one over
    ``lora_dirs`` with ``lora_method``); ``plugins``: registered on its plugin manager for the
    run. ``keep_loras``: leave the LoRAs applied after the run (with a ``session`` you keep: the
    next run with the same LoRAs then applies nothing; ``session.close()`` restores the model).
    """
    notes: list = []
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    for name, value in (("width", width), ("height", height), ("steps", steps)):
        if value is not None and int(value) < 1:  # 0 is not "the default"
            raise ValueError(f"{name} must be positive, not {value}")
    for name, value in (("cfg", cfg), ("denoise", denoise), ("eta", eta)):
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, not {value}")
    model = checkpoint if isinstance(checkpoint, Model) else load_model(
        checkpoint, tokenizer=tokenizer, vae=vae, prediction=prediction, dtype=dtype,
        device=device or ("cuda" if torch.cuda.is_available() else None))
    dev = model.device

    from ..resolve import LoraLibrary
    from ..session import HostModel, Session

    session = session if session is not None else Session(LoraLibrary(list(lora_dirs or ())), method=lora_method,
                                                          label=model.name)
    parsed = session.parse(prompt)
    text, specs = parsed.prompt, list(parsed.specs) + _extra_specs(loras)
    few: Optional[FewStep] = detect_few_step([s.path for s in specs]) if specs else None
    user = {"sampler": sampler, "schedule": schedule, "steps": steps, "cfg": cfg}
    if few is not None:
        filled = {k: getattr(few, k) for k, v in user.items() if v is None}
        if user["sampler"] is not None and user["schedule"] is None:
            filled.pop("schedule", None)  # the user's sampler picks its own schedule
        if filled:
            shown = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in filled.items())
            notes.append(f"{few.kind} LoRA ({few.source}): using {shown} (set them to override)")
        user.update(filled)
    sampler_key = canonical_sampler(user["sampler"] or DEFAULTS["sampler"])
    schedule_key = canonical_schedule(user["schedule"] or default_schedule(sampler_key))
    n_steps = int(user["steps"] if user["steps"] is not None else DEFAULTS["steps"])
    cfg_scale = float(user["cfg"] if user["cfg"] is not None else DEFAULTS["cfg"])
    if seed is None or int(seed) < 0:
        seed = random.randrange(2 ** 32)
    seeds = [int(seed) + i for i in range(batch)]

    multiple = model.vae_scale_factor
    img = None
    if init_image is not None:
        img = _load_image(init_image, width, height, multiple)
        width, height = img.width, img.height
    width = int(width or model.default_size)
    height = int(height or model.default_size)
    if width % multiple or height % multiple:
        raise ValueError(f"width and height must be multiples of {multiple}, not {width}x{height}")
    strength = float(denoise if denoise is not None else DEFAULTS["denoise"]) if img is not None else 1.0

    sigmas = get_sigmas(schedule_key, model.schedule, n_steps)
    if img is not None:
        run = min(int(n_steps * strength), n_steps)
        sigmas = sigmas[n_steps - run:]

    latent_shape = (model.vae.config["latent_channels"], height // multiple, width // multiple)
    noise = ImageNoise(seeds, latent_shape, device=dev)
    x = noise.randn()
    if img is not None:
        init = _encode_image(model, img, batch).to(dev)
        x = init + x * sigmas[0] if len(sigmas) > 1 else init
    else:
        x = x * (1 + float(sigmas[0]) ** 2) ** 0.5  # pure noise stands in for x0 + sigma * eps
    noise_sampler = BrownianNoise.following(noise) if sampler_key in _BROWNIAN else noise

    total = len(sigmas) - 1
    step_log = _StepLog()
    added = [step_log] + list(plugins)
    for plugin in added:
        session.pm.register(plugin)
    for line in notes:
        _say(log, line)
    try:
        if specs or session.specs:  # (no specs: a kept session gives up its previous LoRAs)
            bound = session.bound
            if bound is None or bound.host.components.get("unet") is not model.unet:
                session.load_model(HostModel(model.components(), naming="diffusers",
                                             family=model.family if model.family != "custom" else None,
                                             label=model.name))
            session.use_specs(specs, total_steps=total)  # applied; text encoders at step 0
            for r in session.reports():
                if r.unmatched:
                    _say(log, f"LoRA {r.name}: {r.applied} modules, {len(r.unmatched)} keys not applied "
                              f"(first: {r.unmatched[0]['key']}: {r.unmatched[0]['reason']})")
            for e in session.errors:
                _say(log, f"warning: {e}")
        chunks = max(count_chunks(model, text), count_chunks(model, negative) if cfg_scale != 1.0 else 1)
        cond = encode_prompt(model, text, chunks=chunks, clip_skip=clip_skip)
        uncond = encode_prompt(model, negative, chunks=chunks, clip_skip=clip_skip) if cfg_scale != 1.0 else None
        if model.sdxl:
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
            cond.added["time_ids"] = time_ids
            if uncond is not None:
                uncond.added["time_ids"] = time_ids
        cond = cond.repeat(batch)
        uncond = uncond.repeat(batch) if uncond is not None else None

        denoiser = Denoiser(model.unet, model.schedule, model.prediction, quantize=quantize)
        options = {}
        if eta is not None:
            if "eta" not in SAMPLERS[sampler_key].__code__.co_varnames:
                raise ValueError(f"sampler {sampler_key} has no eta")
            options["eta"] = float(eta)
        bars = []
        if progress and total > 0:
            from tqdm.auto import tqdm

            # one bar per image (the images of a batch advance together)
            bars = [tqdm(total=total, desc=f"image {i + 1}/{batch} (seed {s})", unit="step", position=i, leave=False)
                    for i, s in enumerate(seeds)]

        def on_step(i, n, sigma):
            session.begin_step(i, n, sigma)

        def callback(d):
            for bar in bars:
                bar.update(1)

        if total > 0:
            x = SAMPLERS[sampler_key](denoiser, x, sigmas.to(dev), extra_args=dict(cond=cond, uncond=uncond,
                                      cfg_scale=cfg_scale), callback=callback, disable=True, on_step=on_step,
                                      noise_sampler=noise_sampler, **options)
        for bar in bars:
            bar.close()
        # DDIM-style schedules stop short of sigma 0: back to the model's own scale
        if total > 0:
            x = x / (1 + float(sigmas[-1]) ** 2) ** 0.5
        images = decode_latents(model, x) if decode else []
    finally:
        try:
            session.end_run(restore=not keep_loras)
        finally:
            for plugin in added:
                session.pm.unregister(plugin)

    params_common = {
        "Steps": n_steps,
        "Sampler": sampler_label(sampler_key),
        "Schedule type": schedule_label(schedule_key),
        "CFG scale": f"{cfg_scale:g}",
    }
    infotexts, paths = [], []
    targets = _out_paths(out, seeds) if decode else [None] * batch
    model_hash = model.hash
    lora_hashes = _lora_hashes(specs) if specs else None
    for i, s in enumerate(seeds):
        params = dict(params_common)
        params.update({
            "Seed": s,
            "Size": f"{width}x{height}",
            "Model hash": model_hash,
            "Model": model.name,
            "Denoising strength": f"{strength:g}" if img is not None else None,
            "Clip skip": clip_skip if clip_skip > 1 else None,
            "Eta": f"{eta:g}" if eta is not None else None,
            "Lora hashes": lora_hashes,
            "Version": f"lora-ext {_version()}",
        })
        infotext = format_infotext(prompt, negative, params)
        infotexts.append(infotext)
        if targets[i] is not None:
            paths.append(save_png(images[i], targets[i], infotext))
    settings = {"sampler": sampler_key, "schedule": schedule_key, "steps": n_steps, "cfg": cfg_scale,
                "seed": seeds[0], "width": width, "height": height, "batch": batch,
                "denoise": strength if img is not None else None, "few_step": few.kind if few else None,
                "prediction": model.prediction}
    return Result(images=images, latents=x, seeds=seeds, infotexts=infotexts, paths=paths, settings=settings,
                  notes=notes, loras=specs, steps_seen=step_log.steps)


def _version() -> str:
    from .. import __version__

    return __version__
