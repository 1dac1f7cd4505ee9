"""Mirrors invokeai/app/invocations/denoise_latents.py (InvokeAI 6.14.2 from PyPI, whose line numbers L... cite; read at invoke-ai/InvokeAI 8e71a8a5, which agrees
for these parts): the
"denoise_latents" node's fields, ``get_scheduler``, ``init_scheduler`` (set_timesteps, skip
higher orders, cut by denoising_start/end in whole steps, re-expand by order) and the default
path (``_old_invoke``; ``_new_invoke`` when USE_MODULAR_DENOISE is set): ``get_scheduler`` loads
the scheduler model and reads its config under its lock (L98-101); the UNet is loaded
with ``model_on_device()`` (L1071) and called once per entry of ``timesteps`` (cond and uncond
batched), ``context.util.sd_step_callback`` after each. The schedulers are small stand-ins
with diffusers' attributes (``timesteps``, ``order``, ``config``): "euler" (order 1) and
"heun" (order 2: every timestep but the first twice, as diffusers' HeunDiscreteScheduler)."""
import os
from dataclasses import dataclass
from typing import Optional

import torch

from invokeai.app.invocations.baseinvocation import BaseInvocation, invocation
from invokeai.app.invocations.fields import ConditioningField, FieldDescriptions, Input, InputField, LatentsField
from invokeai.app.invocations.model import UNetField
from invokeai.app.invocations.primitives import LatentsOutput


class _Scheduler:
    def __init__(self, order=1):
        self.order = order
        self.config = {"num_train_timesteps": 1000}

    def set_timesteps(self, steps, device=None):
        t = torch.linspace(999, 0, steps).round().long()
        if self.order == 2:
            t = torch.cat([t[:1], t[1:].repeat_interleave(2)])
        self.timesteps = t.to(device) if device is not None else t


def get_scheduler(context, scheduler_info, scheduler_name, seed, unet_config):
    with context.models.load(scheduler_info):
        pass
    return _Scheduler(order=2 if "heun" in scheduler_name else 1)


@dataclass
class PipelineIntermediateState:
    step: int
    order: int
    total_steps: int
    timestep: int
    latents: torch.Tensor


@invocation("denoise_latents", title="Denoise - SD1.5, SDXL", tags=["latents", "denoise"], category="latents",
            version="1.6.0")
class DenoiseLatentsInvocation(BaseInvocation):
    """Denoises noisy latents to decodable images"""

    positive_conditioning: ConditioningField = InputField(description="positive", input=Input.Connection)
    negative_conditioning: Optional[ConditioningField] = InputField(default=None, input=Input.Connection)
    noise: Optional[LatentsField] = InputField(default=None, input=Input.Connection)
    steps: int = InputField(default=10, gt=0, description=FieldDescriptions.steps)
    cfg_scale: float = InputField(default=7.5, title="CFG Scale")
    denoising_start: float = InputField(default=0.0, ge=0, le=1)
    denoising_end: float = InputField(default=1.0, ge=0, le=1)
    scheduler: str = InputField(default="euler")
    unet: UNetField = InputField(description=FieldDescriptions.unet, input=Input.Connection, title="UNet")
    latents: Optional[LatentsField] = InputField(default=None, input=Input.Connection)

    @staticmethod
    def init_scheduler(scheduler, device, steps, denoising_start, denoising_end, seed):
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        _timesteps = timesteps[:: scheduler.order]
        t_start_val = int(round(scheduler.config["num_train_timesteps"] * (1 - denoising_start)))
        t_start_idx = len(list(filter(lambda ts: ts >= t_start_val, _timesteps)))
        t_end_val = int(round(scheduler.config["num_train_timesteps"] * (1 - denoising_end)))
        t_end_idx = len(list(filter(lambda ts: ts >= t_end_val, _timesteps[t_start_idx:])))
        t_start_idx *= scheduler.order
        t_end_idx *= scheduler.order
        init_timestep = timesteps[t_start_idx: t_start_idx + 1]
        timesteps = timesteps[t_start_idx: t_start_idx + t_end_idx]
        return timesteps, init_timestep, {}

    def invoke(self, context) -> LatentsOutput:
        if os.environ.get("USE_MODULAR_DENOISE", False):
            return self._new_invoke(context)
        return self._old_invoke(context)

    @torch.no_grad()
    def _old_invoke(self, context) -> LatentsOutput:
        unet_config = context.models.get_config(self.unet.unet.key)
        cond = context.conditioning.load(self.positive_conditioning.conditioning_name)["embeds"]
        with context.models.load(self.unet.unet).model_on_device() as (cached_weights, unet):
            scheduler = get_scheduler(context, self.unet.scheduler, self.scheduler, 0, unet_config)
            timesteps, init_timestep, _ = self.init_scheduler(scheduler, device=torch.device("cpu"), steps=self.steps,
                                                              denoising_start=self.denoising_start,
                                                              denoising_end=self.denoising_end, seed=0)
            latents = torch.zeros(1, 4, 8, 8)
            ctx = torch.cat([cond, cond])
            for i, t in enumerate(timesteps):
                noise_pred = unet(torch.cat([latents, latents]), t, encoder_hidden_states=ctx).sample
                latents = latents - 0.01 * noise_pred[:1]
                context.util.sd_step_callback(PipelineIntermediateState(i, scheduler.order, len(timesteps), int(t),
                                                                        latents), unet_config.base)
        name = context.tensors.save(latents)
        return LatentsOutput.build(latents_name=name, latents=latents, seed=None)

    def _new_invoke(self, context) -> LatentsOutput:
        raise NotImplementedError("the fake runs the default path; the extension API is faked in backend/")
