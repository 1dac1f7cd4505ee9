"""Noise levels: the model's training schedule, and the sigma sequences the samplers walk.

Everything is in the variance-exploding view of k-diffusion: a latent at noise level
``sigma`` is ``x = x0 + sigma * eps``; the model's own (variance-preserving) input is
``x / sqrt(sigma**2 + 1)`` at the training timestep ``t`` whose
``sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])``.

:class:`TrainingSchedule` holds the 1000 training sigmas and converts between timesteps and
sigmas (interpolating in log sigma, as k-diffusion, A1111 and ComfyUI do). :func:`get_sigmas`
makes a sampling schedule: a float32 tensor of ``steps + 1`` decreasing sigmas, normally
ending in 0. The schedules:

``normal``
    ``steps`` timesteps evenly from the last training timestep to 0 (k-diffusion's
    ``get_sigmas``, A1111's "Uniform"/"Normal", ComfyUI's "normal"), then 0.
``karras``
    Karras et al. (2022): evenly spaced in ``sigma ** (1 / 7)`` from sigma_max to sigma_min.
``exponential``
    evenly spaced in ``log sigma`` from sigma_max to sigma_min.
``sgm_uniform``
    ``steps + 1`` timesteps evenly from the last one to 0, the last dropped (ComfyUI's and
    A1111's "SGM Uniform"): the usual schedule for LCM, Lightning, Turbo and Hyper-SD.
``trailing``
    diffusers' ``timestep_spacing="trailing"``: the same idea on whole timesteps
    (999, 749, 499, 249 for 4 steps).
``ddim_uniform``
    DDIM's own timesteps (``1 + k * (1000 // steps)``, diffusers' "leading" spacing with
    ``steps_offset=1``, what A1111's DDIM uses); it ends at the model's smallest sigma rather
    than 0, as DDIM does.
``lcm``
    the LCM scheduler's timesteps: ``steps`` of the 50 distillation timesteps (999, 759, 499,
    259 for 4 steps).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

__all__ = ["TrainingSchedule", "SCHEDULES", "get_sigmas", "schedule_label"]


class TrainingSchedule:
    """The discrete noise schedule a model was trained with (float64 throughout)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        a = alphas_cumprod.to(torch.float64)
        self.alphas_cumprod = a
        self.sigmas = ((1 - a) / a).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_betas(cls, beta_start: float = 0.00085, beta_end: float = 0.012,
                   num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear") -> "TrainingSchedule":
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r}: expected 'scaled_linear' or 'linear'")
        return cls(torch.cumprod(1 - betas, dim=0))

    @classmethod
    def from_config(cls, config: Optional[Mapping] = None) -> "TrainingSchedule":
        """From a diffusers scheduler config (or the shipped SD one when ``config`` is None)."""
        c = dict(config or {})
        return cls.from_betas(
            float(c.get("beta_start", 0.00085)), float(c.get("beta_end", 0.012)),
            int(c.get("num_train_timesteps", 1000)), str(c.get("beta_schedule", "scaled_linear")),
        )

    def __len__(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t) -> torch.Tensor:
        """Sigma at (possibly fractional) timesteps, interpolating log sigma linearly."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(self) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigma_to_t(self, sigma, quantize: bool = False) -> torch.Tensor:
        """The (fractional) timestep of each sigma; with ``quantize`` the nearest whole one.

        The inverse of :meth:`t_to_sigma`. Quantizing picks the nearest training sigma in log
        space, which is what rounding the interpolated timestep gives (diffusers' DPM-Solver
        with Karras sigmas rounds; k-diffusion calls it ``quantize``).
        """
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp_min(1e-10).log()
        ls = self.log_sigmas
        low = (torch.searchsorted(ls, log_sigma, right=True) - 1).clamp(0, len(ls) - 2)
        w = ((log_sigma - ls[low]) / (ls[low + 1] - ls[low])).clamp(0, 1)
        t = low + w
        return t.round() if quantize else t


# ---------------------------------------------------------------------------------------------
# sampling schedules: each returns `steps` sigmas (float64); get_sigmas appends the final one


def _normal(ts: TrainingSchedule, n: int) -> torch.Tensor:
    return ts.t_to_sigma(torch.linspace(len(ts) - 1, 0, n, dtype=torch.float64))


def _karras(ts: TrainingSchedule, n: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = ts.sigma_min ** (1 / rho), ts.sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _exponential(ts: TrainingSchedule, n: int) -> torch.Tensor:
    return torch.linspace(math.log(ts.sigma_max), math.log(ts.sigma_min), n, dtype=torch.float64).exp()


def _sgm_uniform(ts: TrainingSchedule, n: int) -> torch.Tensor:
    return ts.t_to_sigma(torch.linspace(len(ts) - 1, 0, n + 1, dtype=torch.float64)[:-1])


def _trailing(ts: TrainingSchedule, n: int) -> torch.Tensor:
    t = torch.arange(len(ts), 0, -len(ts) / n, dtype=torch.float64).round() - 1
    return ts.sigmas[t.long()]


def _ddim_uniform(ts: TrainingSchedule, n: int) -> torch.Tensor:
    if n > len(ts):
        raise ValueError(f"the ddim_uniform schedule has at most {len(ts)} steps, not {n}")
    t = torch.arange(n - 1, -1, -1, dtype=torch.long) * (len(ts) // n) + 1
    return ts.sigmas[t.clamp(max=len(ts) - 1)]


def _lcm(ts: TrainingSchedule, n: int, original_steps: int = 50) -> torch.Tensor:
    if n > original_steps:
        raise ValueError(f"the lcm schedule has at most {original_steps} steps, not {n}")
    k = len(ts) // original_steps
    origin = torch.arange(original_steps, 0, -1, dtype=torch.long) * k - 1  # 999, 979, ..., 19
    picks = torch.linspace(0, original_steps, n + 1, dtype=torch.float64)[:-1].floor().long()
    return ts.sigmas[origin[picks]]


SCHEDULES = {
    "normal": _normal,
    "karras": _karras,
    "exponential": _exponential,
    "sgm_uniform": _sgm_uniform,
    "trailing": _trailing,
    "ddim_uniform": _ddim_uniform,
    "lcm": _lcm,
}

# Names other tools use for the same schedules.
_ALIASES = {"uniform": "normal", "simple": "normal", "automatic": "normal", "sgm": "sgm_uniform",
            "sgmuniform": "sgm_uniform", "leading": "ddim_uniform", "ddim": "ddim_uniform"}

# A1111's "Schedule type" names (infotext).
_LABELS = {"normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
           "trailing": "Trailing", "ddim_uniform": "DDIM", "lcm": "LCM"}


def canonical_schedule(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key.replace("_", ""), _ALIASES.get(key, key))
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return key


def schedule_label(name: str) -> str:
    """The schedule's name as A1111 writes it in infotext ("Karras", "SGM Uniform", ...)."""
    return _LABELS[canonical_schedule(name)]


def get_sigmas(name: str, schedule: TrainingSchedule, steps: int) -> torch.Tensor:
    """``steps + 1`` decreasing sigmas (float32) for ``steps`` sampler steps."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    key = canonical_schedule(name)
    sigmas = SCHEDULES[key](schedule, steps)
    last = schedule.sigma_min if key == "ddim_uniform" else 0.0
    return torch.cat([sigmas, sigmas.new_tensor([last])]).to(torch.float32)
