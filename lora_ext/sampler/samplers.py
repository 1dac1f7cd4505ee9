"""Samplers: short pure functions over (model, x, sigmas), in the manner of k-diffusion.

``model(x, sigma, **extra_args)`` returns the denoised estimate of ``x`` at noise level
``sigma`` (a tensor with one sigma per batch item); ``x`` starts as noise scaled to
``sigmas[0]`` (or an image's latent plus such noise). Every sampler has the signature::

    sample_NAME(model, x, sigmas, extra_args=None, callback=None, disable=None,
                on_step=None, noise_sampler=None, **options) -> x

``callback({"x", "i", "sigma", "sigma_hat", "denoised"})`` runs after each step's first model
evaluation; ``on_step(i, total, sigma)`` runs as step ``i`` of ``total`` begins, before any
model evaluation of that step (the LoRA step schedule hangs on it); ``disable`` turns off
the progress bar; ``noise_sampler(sigma, sigma_next)`` returns unit Gaussian noise shaped
like ``x`` for the stochastic samplers (default: ``torch.randn_like``).

The maths follows k-diffusion (Crowson) and the papers named at each function; DDIM and LCM
are written in the same noise-level view (see ``sample_ddim``, ``sample_lcm``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["SAMPLERS", "sampler_label", "canonical_sampler", "get_ancestral_step", "default_noise_sampler"]


def _bar(total: int, disable):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=bool(disable), leave=False)


def _steps(sigmas: torch.Tensor, disable, on_step: Optional[Callable]):
    """The steps of a run, ``(i, sigma, sigma_next)`` with float sigmas: updates the progress
    bar and calls ``on_step`` first."""
    total = len(sigmas) - 1
    bar = _bar(total, disable)
    try:
        for i in range(total):
            sigma = float(sigmas[i])
            if on_step is not None:
                on_step(i, total, sigma)
            yield i, sigma, float(sigmas[i + 1])
            bar.update(1)
    finally:
        bar.close()


def _sigma(x: torch.Tensor, sigma) -> torch.Tensor:
    """``sigma`` as one value per batch item, on ``x``'s device."""
    return x.new_ones([x.shape[0]]) * sigma


def to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to ``sigma_to`` into a deterministic step to ``sigma_down`` and fresh noise
    of size ``sigma_up`` (``sigma_down**2 + sigma_up**2 == sigma_to**2``)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def default_noise_sampler(x: torch.Tensor):
    return lambda sigma, sigma_next: torch.randn_like(x)


def _evaluate(model, x, i, sigma, extra_args, callback, sigma_hat=None):
    """Step ``i``'s first model evaluation, at ``sigma_hat`` (``sigma`` unless churn raised it),
    passed to ``callback``; returns the denoised estimate."""
    sigma_hat = sigma if sigma_hat is None else sigma_hat
    denoised = model(x, _sigma(x, sigma_hat), **extra_args)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
    return denoised


def _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022, algorithm 2, lines 4-7: for ``gamma > 0``, fresh noise raises ``x``
    from ``sigmas[i]`` to ``sigma_hat = sigmas[i] * (1 + gamma)``; returns ``(x, sigma_hat)``."""
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise_sampler(sigma, sigma_next) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


# ---------------------------------------------------------------------------------------------
# first order


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                 noise_sampler=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler's method (Karras et al. 2022, algorithm 2 with optional churn)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _evaluate(model, x, i, sigma, extra_args, callback, sigma_hat)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                           noise_sampler=None, eta=1.0, s_noise=1.0):
    """Euler steps to ``sigma_down`` plus fresh noise of ``sigma_up`` ("Euler a")."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        denoised = _evaluate(model, x, i, sigma, extra_args, callback)
        down, up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (down - sigma)
        if sigma_next > 0 and up > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * up
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                noise_sampler=None, eta=0.0):
    """DDIM (Song et al. 2021) with its ``eta``.

    Divided by ``sqrt(alpha_prev)``, DDIM's update is ``x0 + sigma_down * eps + sigma_up *
    noise`` with exactly the ancestral split above scaled by ``eta``: so ``eta=0`` is an Euler
    step of the probability-flow ODE and ``eta=1`` is Euler a. Use it with the
    ``ddim_uniform`` schedule for DDIM's own timesteps.
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        denoised = _evaluate(model, x, i, sigma, extra_args, callback)
        down, up = get_ancestral_step(sigma, sigma_next, eta)
        eps = to_d(x, sigma, denoised)
        x = denoised + eps * down
        if up > 0:
            x = x + noise_sampler(sigma, sigma_next) * up
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
               noise_sampler=None):
    """Latent Consistency Model sampling (Luo et al. 2023): jump to the model's clean estimate,
    then re-noise it to the next sigma with fresh noise.

    (LCM's boundary scalings ``c_skip``/``c_out`` are left out: at the timesteps LCM samples,
    ``c_skip < 4e-6`` and ``1 - c_out < 1e-6``.)
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        denoised = _evaluate(model, x, i, sigma, extra_args, callback)
        x = denoised
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next
    return x


# ---------------------------------------------------------------------------------------------
# second order, one step at a time


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                noise_sampler=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's method (Karras et al. 2022, algorithm 2); the step to sigma 0 is Euler."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        d = to_d(x, sigma_hat, _evaluate(model, x, i, sigma, extra_args, callback, sigma_hat))
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, model(x_2, _sigma(x, sigma_next), **extra_args))
        x = x + (d + d_2) / 2 * dt
    return x


def _log_midpoint(a: float, b: float) -> float:
    return math.exp((math.log(a) + math.log(b)) / 2)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                 noise_sampler=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 in Karras et al.'s form: the derivative at the log-midpoint ("DPM2")."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        d = to_d(x, sigma_hat, _evaluate(model, x, i, sigma, extra_args, callback, sigma_hat))
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
            continue
        sigma_mid = _log_midpoint(sigma_hat, sigma_next)
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = to_d(x_2, sigma_mid, model(x_2, _sigma(x, sigma_mid), **extra_args))
        x = x + d_2 * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                           noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM2 to ``sigma_down``, then fresh noise of ``sigma_up`` ("DPM2 a")."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        denoised = _evaluate(model, x, i, sigma, extra_args, callback)
        down, up = get_ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)
        if down == 0:
            x = x + d * (down - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, model(x_2, _sigma(x, sigma_mid), **extra_args))
            x = x + d_2 * (down - sigma)
        if sigma_next > 0 and up > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * up
    return x


# ---------------------------------------------------------------------------------------------
# linear multistep


def _lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial through t[i-j] that is 1 at
    t[i-j] and 0 at the other ``order - 1`` previous points; integrated exactly."""
    nodes = [t[i - k] for k in range(order) if k != j]
    poly = [1.0]  # coefficients, lowest degree first
    denom = 1.0
    for node in nodes:
        poly = [0.0] + poly  # multiply by tau ...
        for k in range(len(poly) - 1):
            poly[k] -= node * poly[k + 1]  # ... minus node
        denom *= t[i - j] - node
    a, b = t[i], t[i + 1]
    return sum(c * (b ** (k + 1) - a ** (k + 1)) / (k + 1) for k, c in enumerate(poly)) / denom


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
               noise_sampler=None, order=4):
    """Linear multistep over the last ``order`` derivatives, in sigma ("LMS")."""
    extra_args = extra_args or {}
    t = [float(s) for s in sigmas]
    ds = []
    for i, sigma, _ in _steps(sigmas, disable, on_step):
        denoised = _evaluate(model, x, i, sigma, extra_args, callback)
        ds.append(to_d(x, sigma, denoised))
        ds = ds[-order:]
        cur = min(i + 1, order)
        coeffs = [_lms_coefficient(cur, t, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022), in t = -log(sigma)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                              noise_sampler=None, eta=1.0, s_noise=1.0):
    """Ancestral DPM-Solver++(2S): a single-step second-order solve to ``sigma_down``."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        denoised = _evaluate(model, x, i, sigma, extra_args, callback)
        down, up = get_ancestral_step(sigma, sigma_next, eta)
        if down == 0:
            x = x + to_d(x, sigma, denoised) * (down - sigma)
        else:
            h = math.log(sigma) - math.log(down)
            sigma_s = math.exp(-(-math.log(sigma) + h / 2))
            x_2 = (sigma_s / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_2 = model(x_2, _sigma(x, sigma_s), **extra_args)
            x = (down / sigma) * x - math.expm1(-h) * denoised_2
        if sigma_next > 0 and up > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                     noise_sampler=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, second order, single step: "DPM++ SDE").

    Its two noise draws per step overlap in time, so they must come from one Brownian path:
    pass a :class:`BrownianNoise` (the pipeline does); plain independent noise also works but
    is a different (coarser) discretisation.
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        denoised = _evaluate(model, x, i, sigma, extra_args, callback)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        h = t_next - t
        sigma_s = math.exp(-(t + h * r))
        fac = 1 / (2 * r)
        # to the intermediate point s
        down, up = get_ancestral_step(sigma, sigma_s, eta)
        x_2 = (down / sigma) * x - math.expm1(math.log(down) - math.log(sigma)) * denoised
        x_2 = x_2 + noise_sampler(sigma, sigma_s) * s_noise * up
        denoised_2 = model(x_2, _sigma(x, sigma_s), **extra_args)
        # the whole step, with the blended estimate
        down, up = get_ancestral_step(sigma, sigma_next, eta)
        blended = (1 - fac) * denoised + fac * denoised_2
        x = (down / sigma) * x - math.expm1(math.log(down) - math.log(sigma)) * blended
        x = x + noise_sampler(sigma, sigma_next) * s_noise * up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                    noise_sampler=None):
    """DPM-Solver++(2M): second-order multistep; the first step and the step to 0 are first
    order ("DPM++ 2M")."""
    extra_args = extra_args or {}
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        denoised = _evaluate(model, x, i, sigma, extra_args, callback)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, on_step=None,
                        noise_sampler=None, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE ("DPM++ 2M SDE"), midpoint or heun correction."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type must be 'midpoint' or 'heun'")
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in _steps(sigmas, disable, on_step):
        denoised = _evaluate(model, x, i, sigma, extra_args, callback)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                phi = -math.expm1(-h - eta_h)
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old_denoised = denoised
    return x


# ---------------------------------------------------------------------------------------------
# registry

SAMPLERS = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_a": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
}

# A1111's sampler names (infotext), and the names A1111 / ComfyUI / k-diffusion use.
_LABELS = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a",
    "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2s_a": "DPM++ 2S a", "ddim": "DDIM", "lcm": "LCM",
}
_ALIASES = {
    "euler_ancestral": "euler_a", "eulera": "euler_a", "dpm2": "dpm_2", "dpm2_a": "dpm_2_a",
    "dpm_2_ancestral": "dpm_2_a", "dpm2a": "dpm_2_a", "dpmpp_2s_ancestral": "dpmpp_2s_a", "k_lms": "lms",
    "k_euler": "euler", "k_euler_a": "euler_a", "k_heun": "heun", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a",
}


def canonical_sampler(name: str) -> str:
    """``"Euler a"``, ``"euler_ancestral"``, ``"DPM++ 2M"``, ``"dpmpp_2m"`` ... -> the key in SAMPLERS."""
    raw = name.strip()
    for key, label in _LABELS.items():
        if raw.lower() == label.lower():
            return key
    key = raw.lower().replace("++", "pp").replace(" ", "_").replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return key


def sampler_label(name: str) -> str:
    """The sampler's name as A1111 writes it in infotext ("Euler a", "DPM++ 2M", ...)."""
    return _LABELS[canonical_sampler(name)]
