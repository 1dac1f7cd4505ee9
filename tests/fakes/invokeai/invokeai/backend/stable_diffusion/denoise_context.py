"""Mirrors DenoiseInputs / DenoiseContext of invokeai/backend/stable_diffusion/denoise_context.py
(InvokeAI 6.14.2 from PyPI; read at invoke-ai/InvokeAI 8e71a8a5, which agrees for these parts), the fields extensions read: inputs.timesteps, scheduler, unet,
latents, step_index, timestep, extra."""
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class DenoiseInputs:
    orig_latents: torch.Tensor
    scheduler_step_kwargs: dict
    conditioning_data: Any
    noise: Optional[torch.Tensor]
    seed: int
    timesteps: torch.Tensor
    init_timestep: torch.Tensor
    attention_processor_cls: Any = None


@dataclass
class DenoiseContext:
    inputs: DenoiseInputs
    scheduler: Any
    unet: Any = None
    latents: Optional[torch.Tensor] = None
    step_index: Optional[int] = None
    timestep: Optional[torch.Tensor] = None
    unet_kwargs: Any = None
    step_output: Any = None
    latent_model_input: Optional[torch.Tensor] = None
    conditioning_mode: Any = None
    negative_noise_pred: Optional[torch.Tensor] = None
    positive_noise_pred: Optional[torch.Tensor] = None
    noise_pred: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)
