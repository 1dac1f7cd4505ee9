"""Seeded noise, one generator per image, so image ``i`` of a batch equals a run with seed ``seed + i``.

All noise is drawn on the CPU in float32 (as A1111's default "CPU" RNG source does), so a seed
gives the same image on any device; it is then moved to the latent's device and dtype.
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch

__all__ = ["ImageNoise", "BrownianNoise", "image_generator"]


def image_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


class ImageNoise:
    """Independent unit Gaussian noise per call; a sampler's ``noise_sampler``.

    ``randn()`` draws one tensor of ``shape`` per image, each from that image's own generator.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device=None, dtype=torch.float32):
        self.generators = [image_generator(s) for s in seeds]
        self.shape = tuple(shape)
        self.device, self.dtype = device, dtype

    def randn(self) -> torch.Tensor:
        x = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return x.to(self.device, self.dtype)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        return self.randn()


class _BrownianPath:
    """One Brownian motion W(s), s >= 0, W(0) = 0, sampled lazily: a new point between two
    known ones is drawn from the Brownian bridge, one beyond them by an independent step."""

    def __init__(self, generator: torch.Generator, shape):
        self.g, self.shape = generator, shape
        self.times = [0.0]
        self.values = [torch.zeros(shape)]

    def __call__(self, s: float) -> torch.Tensor:
        k = bisect.bisect_left(self.times, s)
        if k < len(self.times) and self.times[k] == s:
            return self.values[k]
        z = torch.randn(self.shape, generator=self.g)
        if k == len(self.times):
            a, wa = self.times[-1], self.values[-1]
            w = wa + z * math.sqrt(s - a)
        else:
            a, b = self.times[k - 1], self.times[k]
            wa, wb = self.values[k - 1], self.values[k]
            w = wa + (wb - wa) * ((s - a) / (b - a)) + z * math.sqrt((s - a) * (b - s) / (b - a))
        self.times.insert(k, s)
        self.values.insert(k, w)
        return w


class BrownianNoise:
    """Noise from one Brownian path per image: ``(W(b) - W(a)) / sqrt(|b - a|)``.

    For the SDE samplers, whose noise draws within a step overlap in time (what k-diffusion's
    ``BrownianTreeNoiseSampler`` is for; same distribution, drawn with our own seeded
    generators, so the values differ from torchsde's).
    """

    def __init__(self, generators: Sequence[torch.Generator], shape: Sequence[int], device=None,
                 dtype=torch.float32):
        self.paths = [_BrownianPath(g, tuple(shape)) for g in generators]
        self.device, self.dtype = device, dtype

    @classmethod
    def following(cls, noise: "ImageNoise") -> "BrownianNoise":
        """Paths drawn from ``noise``'s generators, after what they have drawn already."""
        return cls(noise.generators, noise.shape, noise.device, noise.dtype)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        scale = 1 / math.sqrt(abs(b - a))
        x = torch.stack([(p(b) - p(a)) * scale for p in self.paths])
        return x.to(self.device, self.dtype)
