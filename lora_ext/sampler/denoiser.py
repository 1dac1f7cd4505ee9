"""The UNet seen as a denoiser ``D(x, sigma)``, with classifier-free guidance.

``x`` is a latent at noise level ``sigma`` in the variance-exploding view (``x0 + sigma *
eps``). The UNet was trained on ``x / sqrt(sigma**2 + 1)`` at timestep ``t(sigma)`` and
predicts either the noise (``epsilon``) or ``v = alpha * eps - sigma_vp * x0``
(``v_prediction``); both are turned into the clean estimate here, so the samplers never see
the parameterisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .schedules import TrainingSchedule

__all__ = ["Conditioning", "Denoiser", "PREDICTIONS"]

PREDICTIONS = ("epsilon", "v_prediction")


@dataclass
class Conditioning:
    """What the UNet is conditioned on: the text context (B, L, D) and, for SDXL, the
    ``added_cond_kwargs`` (``text_embeds`` (B, 1280), ``time_ids`` (B, 6))."""

    context: torch.Tensor
    added: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.context.shape[0]

    def repeat(self, n: int) -> "Conditioning":
        """Each item ``n`` times (``torch.repeat_interleave``)."""
        return Conditioning(self.context.repeat_interleave(n, 0),
                            {k: v.repeat_interleave(n, 0) for k, v in self.added.items()})

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(self.context.to(device, dtype), {k: v.to(device, dtype) for k, v in self.added.items()})

    @staticmethod
    def cat(items) -> "Conditioning":
        items = list(items)
        return Conditioning(torch.cat([c.context for c in items]),
                            {k: torch.cat([c.added[k] for c in items]) for k in items[0].added})


class Denoiser:
    """``Denoiser(unet, schedule, prediction)(x, sigma, cond, uncond=None, cfg_scale=1.0)``.

    ``cfg_scale == 1`` or no ``uncond``: one UNet pass on ``cond`` alone. Otherwise the cond and
    uncond halves go through the UNet as one batch and the guided output is
    ``uncond + cfg_scale * (cond - uncond)`` (on the raw prediction, as diffusers does; the
    clean estimate is affine in it, so this equals guiding the clean estimate).

    ``quantize``: give the UNet the nearest whole training timestep instead of the fractional
    one (k-diffusion's ``quantize``; diffusers' DPM-Solver rounds its Karras timesteps too).
    ``calls`` counts UNet evaluations.
    """

    def __init__(self, unet, schedule: TrainingSchedule, prediction: str = "epsilon", quantize: bool = False):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, not {prediction!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction = prediction
        self.quantize = quantize
        self.calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma.detach().double().cpu(), quantize=self.quantize)

    def model_output(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's raw prediction (noise or v) for latents ``x`` at ``sigma``."""
        c_in = (sigma ** 2 + 1) ** -0.5
        t = self.timestep(sigma).to(device=x.device, dtype=torch.float32)
        dtype = self.dtype
        cond = cond.to(x.device, dtype)
        self.calls += 1
        out = self.unet(
            (x * c_in[:, None, None, None]).to(dtype), t,
            encoder_hidden_states=cond.context,
            added_cond_kwargs=cond.added or None,
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def to_denoised(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        s = sigma[:, None, None, None]
        if self.prediction == "epsilon":
            return x - s * out
        # v: x0 = alpha * x_vp - sigma_vp * v, with x_vp = x / sqrt(s^2 + 1)
        return x / (s ** 2 + 1) - out * s / (s ** 2 + 1) ** 0.5

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 uncond: Optional[Conditioning] = None, cfg_scale: float = 1.0) -> torch.Tensor:
        if uncond is None or cfg_scale == 1.0:
            return self.to_denoised(x, sigma, self.model_output(x, sigma, cond))
        both = self.model_output(torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([uncond, cond]))
        out_uncond, out_cond = both.chunk(2)
        return self.to_denoised(x, sigma, out_uncond + cfg_scale * (out_cond - out_uncond))
