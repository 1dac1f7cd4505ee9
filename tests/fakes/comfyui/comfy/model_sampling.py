"""Mirrors comfy/model_sampling.py (ComfyUI 0.3.64) for flow models (Wan, HunyuanVideo, SD3):
``time_snr_shift`` and ``ModelSamplingDiscreteFlow`` (L244-L284): 1000 sigmas
``time_snr_shift(shift, t / 1000)`` for t = 1..1000, ``shift`` from the model config's
``sampling_settings`` (Wan: 8.0), ``timestep(sigma) = sigma * 1000``."""
import torch


def time_snr_shift(alpha, t):
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


class ModelSamplingDiscreteFlow(torch.nn.Module):
    def __init__(self, model_config=None):
        super().__init__()
        settings = model_config.sampling_settings if model_config is not None else {}
        self.set_parameters(shift=settings.get("shift", 1.0), multiplier=settings.get("multiplier", 1000))

    def set_parameters(self, shift=1.0, timesteps=1000, multiplier=1000):
        self.shift = shift
        self.multiplier = multiplier
        ts = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)
        self.register_buffer("sigmas", ts)

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)
