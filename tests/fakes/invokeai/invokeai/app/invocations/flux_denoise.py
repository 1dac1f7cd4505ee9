"""Mirrors invokeai/app/invocations/flux_denoise.py and invokeai/backend/flux/denoise.py
(InvokeAI 6.14.2 from PyPI, whose line numbers L... cite): the "flux_denoise" node's main fields
(L77-206; ``transformer: TransformerField``, ``positive_text_conditioning``, ``num_steps``,
``scheduler``, ``guidance``, ``width``/``height``, ``denoising_start``/``denoising_end``, ``seed``)
and its default path: ``_run_diffusion`` (L215-526) reads the transformer's config
(``context.models.get_config``, L285), builds the schedule (``get_schedule``, backend/flux/
sampling_utils.py L43-59: ``linspace(1, 0, num_steps + 1)``, time-shifted unless schnell), then
loads the transformer with ``model_on_device()`` (L427-429) and calls ``denoise`` (L507), which
calls the model once per step with keyword arguments including ``timestep_index`` and
``total_num_timesteps`` (denoise.py L322-335; the user-facing step, also for Heun's second
evaluations, L153-162) and ``context.util.flux_step_callback`` after each. CFG (a second,
negative call) and Heun are modelled: "heun" evaluates every step but the last twice with the
same ``timestep_index``. The latents are packed (1, h*w/4, 4*c) sequences as in InvokeAI."""
import math
from typing import Literal, Optional

import torch

from invokeai.app.invocations.baseinvocation import BaseInvocation, invocation
from invokeai.app.invocations.fields import FieldDescriptions, FluxConditioningField, Input, InputField, LatentsField
from invokeai.app.invocations.model import TransformerField
from invokeai.app.invocations.primitives import LatentsOutput


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                 shift: bool = True) -> list:
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        m = (max_shift - base_shift) / (4096 - 256)
        mu = m * image_seq_len + (base_shift - m * 256)
        timesteps = math.exp(mu) / (math.exp(mu) + (1 / timesteps - 1) ** 1.0)
    return timesteps.tolist()


@invocation("flux_denoise", title="FLUX Denoise", tags=["image", "flux"], category="latents", version="4.6.0")
class FluxDenoiseInvocation(BaseInvocation):
    """Run denoising process with a FLUX transformer model."""

    latents: Optional[LatentsField] = InputField(default=None, input=Input.Connection)
    denoising_start: float = InputField(default=0.0, ge=0, le=1)
    denoising_end: float = InputField(default=1.0, ge=0, le=1)
    transformer: TransformerField = InputField(description=FieldDescriptions.flux_model, input=Input.Connection,
                                               title="Transformer")
    positive_text_conditioning: FluxConditioningField = InputField(description=FieldDescriptions.positive_cond,
                                                                   input=Input.Connection)
    negative_text_conditioning: Optional[FluxConditioningField] = InputField(default=None, input=Input.Connection)
    cfg_scale: float = InputField(default=1.0, title="CFG Scale")
    width: int = InputField(default=1024, multiple_of=16)
    height: int = InputField(default=1024, multiple_of=16)
    num_steps: int = InputField(default=4)
    scheduler: Literal["euler", "heun", "lcm"] = InputField(default="euler")
    guidance: float = InputField(default=4.0)
    seed: int = InputField(default=0)

    @torch.no_grad()
    def invoke(self, context) -> LatentsOutput:
        latents = self._run_diffusion(context).detach().to("cpu")
        name = context.tensors.save(latents)
        return LatentsOutput(latents=LatentsField(latents_name=name, seed=None), width=self.width, height=self.height)

    def _run_diffusion(self, context):
        transformer_config = context.models.get_config(self.transformer.transformer)
        is_schnell = getattr(transformer_config, "variant", None) == "schnell"
        h, w = self.height // 16, self.width // 16
        pos = context.conditioning.load(self.positive_text_conditioning.conditioning_name)
        neg = (context.conditioning.load(self.negative_text_conditioning.conditioning_name)
               if self.negative_text_conditioning is not None else None)
        timesteps = get_schedule(self.num_steps, h * w, shift=not is_schnell)
        with context.models.load(self.transformer.transformer).model_on_device() as (cached_weights, transformer):
            g = torch.Generator().manual_seed(self.seed)
            x = torch.randn(1, h * w, transformer.in_channels, generator=g)
            img_ids = torch.zeros(1, h * w, 3)
            total_steps = len(timesteps) - 1

            def run(cond, t, step):
                txt = cond["t5_embeds"]
                return transformer(img=x, img_ids=img_ids, txt=txt, txt_ids=torch.zeros(1, txt.shape[1], 3),
                                   y=cond["clip_embeds"], timesteps=torch.full((1,), t), guidance=torch.full((1,), self.guidance),
                                   timestep_index=step, total_num_timesteps=total_steps,
                                   controlnet_double_block_residuals=None, controlnet_single_block_residuals=None,
                                   ip_adapter_extensions=[], regional_prompting_extension=None)

            def pred(t, step):
                p = run(pos, t, step)
                if neg is not None and self.cfg_scale != 1.0:
                    n = run(neg, t, step)
                    p = n + self.cfg_scale * (p - n)
                return p

            for step, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
                d = pred(t_curr, step)
                if self.scheduler == "heun" and t_prev > 0:
                    x_euler = x + (t_prev - t_curr) * d
                    saved, x = x, x_euler
                    d = (d + pred(t_prev, step)) / 2
                    x = saved
                x = x + (t_prev - t_curr) * d
                context.util.flux_step_callback(step)
        return x
