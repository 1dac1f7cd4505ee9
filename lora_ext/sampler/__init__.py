"""The standalone sampler: ``lora-ext generate`` and its Python API, with no host UI.

::

    from lora_ext.sampler import generate, load_model

    model = load_model("v1-5-pruned-emaonly.safetensors")          # or a diffusers folder
    result = generate(model, "a castle <lora:inkwash:0.8>", "blurry", lora_dirs=["loras"],
                      sampler="euler_a", steps=20, cfg=7, seed=1, out="outputs")

Modules: ``samplers`` (k-diffusion-style sampler functions), ``schedules`` (training schedule
and sigma schedules), ``denoiser`` (UNet -> denoiser with CFG), ``noise`` (per-image seeded
noise), ``loading`` (checkpoints, offline), ``convert`` (ldm <-> diffusers incl. VAE),
``tokenizer`` (finding CLIP's vocabulary locally), ``text`` (prompt encoding), ``fewstep``,
``hooks`` (the per-step hookspecs), ``png`` (A1111 infotext), ``pipeline`` (``generate``).
"""
from .denoiser import Conditioning, Denoiser
from .loading import Model, load_model
from .pipeline import DEFAULTS, Result, generate
from .samplers import SAMPLERS
from .schedules import SCHEDULES, TrainingSchedule, get_sigmas
from .tokenizer import TokenizerNotFound

__all__ = ["generate", "load_model", "Model", "Result", "DEFAULTS", "SAMPLERS", "SCHEDULES",
           "TrainingSchedule", "get_sigmas", "Denoiser", "Conditioning", "TokenizerNotFound"]
