"""The sampler's maths: schedules and samplers against diffusers' schedulers on a tiny UNet,
and against the exact solution for Gaussian data.

Agreement runs the same tiny UNet, CFG and starting noise through diffusers' scheduler loop
and through our schedule + sampler; the final latents must agree within 1e-4 (fp32).
"""
import math

import pytest
import torch

from lora_ext.sampler import samplers as S
from lora_ext.sampler.denoiser import Conditioning, Denoiser
from lora_ext.sampler.noise import BrownianNoise, ImageNoise
from lora_ext.sampler.schedules import SCHEDULES, TrainingSchedule, canonical_schedule, get_sigmas, schedule_label
from lora_ext.sampler.tiny import tiny_components
from tiny_models import one_thread_fixture

diffusers = pytest.importorskip("diffusers")

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
TS = TrainingSchedule.from_betas()


one_thread = one_thread_fixture()


class NearIdentity(torch.nn.Module):
    """The tiny UNet plus its own input: a roughly right noise prediction at high noise, so the
    latents stay of order 1, as with a real model (a random UNet alone ends far off scale)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kw):
        out = sample + 0.3 * self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                       return_dict=False, **kw)[0]
        return (out,) if not return_dict else diffusers.models.unets.unet_2d_condition.UNet2DConditionOutput(out)


@pytest.fixture(scope="module")
def unet():
    return NearIdentity(tiny_components("sd1", seed=0)["unet"])


@pytest.fixture(scope="module")
def conds():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)


# ---------------------------------------------------------------------------------------------
# schedules


def test_training_schedule_matches_diffusers():
    ref = diffusers.EulerDiscreteScheduler(**BASE)
    assert torch.allclose(TS.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5)
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(TS.sigma_to_t(TS.t_to_sigma(t)), t, atol=1e-9)
    assert torch.equal(TS.sigma_to_t(TS.sigmas[[3, 400]], quantize=True), torch.tensor([3.0, 400.0], dtype=torch.float64))


@pytest.mark.parametrize("steps", [1, 4, 7, 25])
def test_schedules_match_diffusers(steps):
    def sigmas(sched):
        sched.set_timesteps(steps)
        return sched.sigmas.double()

    E = diffusers.EulerDiscreteScheduler
    ours = {name: get_sigmas(name, TS, steps).double() for name in SCHEDULES}
    assert torch.allclose(ours["trailing"], sigmas(E(**BASE, timestep_spacing="trailing")), rtol=2e-5, atol=1e-7)
    if steps > 1:  # diffusers' linspace of 1 step is [t=0] (np.linspace(0, 999, 1)); ours starts at 999
        for name, ref in [
            ("karras", E(**BASE, timestep_spacing="linspace", use_karras_sigmas=True)),
            ("exponential", E(**BASE, timestep_spacing="linspace", use_exponential_sigmas=True)),
        ]:
            assert torch.allclose(ours[name], sigmas(ref), rtol=2e-5, atol=1e-7), name
        # "normal" takes diffusers' linspace timesteps but interpolates log sigma (k-diffusion,
        # A1111, ComfyUI); diffusers interpolates sigma itself: same points, sigmas within 0.3 %
        lin = E(**BASE, timestep_spacing="linspace")
        lin.set_timesteps(steps)
        assert torch.allclose(TS.sigma_to_t(ours["normal"][:-1]), lin.timesteps.double(), atol=1e-3)
        assert torch.allclose(ours["normal"], lin.sigmas.double(), rtol=3e-3)
    # DDIM's and LCM's own timesteps
    ddim = diffusers.DDIMScheduler(**BASE, steps_offset=1, timestep_spacing="leading")
    ddim.set_timesteps(steps)
    assert torch.equal(TS.sigma_to_t(ours["ddim_uniform"][:-1], quantize=True).long(), ddim.timesteps)
    assert ours["ddim_uniform"][-1] == pytest.approx(TS.sigma_min, rel=1e-6)
    lcm = diffusers.LCMScheduler(**BASE)
    lcm.set_timesteps(steps)
    assert torch.equal(TS.sigma_to_t(ours["lcm"][:-1], quantize=True).long(), lcm.timesteps)
    # ComfyUI's sgm_uniform: steps + 1 points from 999 to 0, the last dropped
    assert torch.allclose(TS.sigma_to_t(ours["sgm_uniform"][:-1]),
                          torch.linspace(999, 0, steps + 1, dtype=torch.float64)[:-1], atol=1e-3)
    for name, s in ours.items():
        assert len(s) == steps + 1 and s.dtype == torch.float64
        assert bool((s[1:] < s[:-1]).all()), name


def test_schedule_names():
    assert canonical_schedule("Karras") == "karras"
    assert canonical_schedule("SGM Uniform") == "sgm_uniform"
    assert canonical_schedule("uniform") == "normal"
    assert schedule_label("sgm_uniform") == "SGM Uniform"
    assert S.canonical_sampler("Euler a") == "euler_a"
    assert S.canonical_sampler("DPM++ 2M SDE") == "dpmpp_2m_sde"
    assert S.canonical_sampler("k_dpm_2_a") == "dpm_2_a"
    assert S.sampler_label("dpmpp_2s_a") == "DPM++ 2S a"
    with pytest.raises(ValueError, match="unknown sampler 'nope'; choose one of euler, euler_a"):
        S.canonical_sampler("nope")
    with pytest.raises(ValueError, match="unknown schedule"):
        get_sigmas("nope", TS, 4)


# ---------------------------------------------------------------------------------------------
# agreement with diffusers' schedulers

CFG = 5.0
VP = (diffusers.DPMSolverMultistepScheduler, diffusers.DDIMScheduler, diffusers.LCMScheduler)


def _diffusers_latents(unet, conds, sched, steps, seed, sigmas=None, timesteps=None):
    cond, uncond = conds
    sched.set_timesteps(steps)
    if sigmas is not None:  # drive the scheduler on our sigmas (same maths, our schedule)
        sched.sigmas, sched.timesteps = sigmas.float(), timesteps.float()
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, 4, 8, 8, generator=gen) * sched.init_noise_sigma
    kwargs = {} if isinstance(sched, diffusers.HeunDiscreteScheduler) else {"generator": gen}
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            out = unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            u, c = out.chunk(2)
            lat = sched.step(u + CFG * (c - u), t, lat, **kwargs).prev_sample
    return lat


def _our_latents(unet, conds, sampler, schedule, steps, seed, init_scale, quantize=False):
    cond, uncond = conds
    sigmas = get_sigmas(schedule, TS, steps)
    noise = ImageNoise([seed], (4, 8, 8))
    # a VP scheduler's unit noise is sqrt(1 + sigma^2) times larger in our (VE) view
    x = noise.randn() * (init_scale if init_scale is not None else (1 + float(sigmas[0]) ** 2) ** 0.5)
    den = Denoiser(unet, TS, "epsilon", quantize=quantize)
    x = S.SAMPLERS[sampler](den, x, sigmas, extra_args=dict(cond=Conditioning(cond), uncond=Conditioning(uncond),
                            cfg_scale=CFG), disable=True, noise_sampler=noise)
    return x / (1 + float(sigmas[-1]) ** 2) ** 0.5  # to the VP scale diffusers ends in


# (label, our sampler, our schedule, diffusers scheduler, quantize)
AGREEMENT = [
    ("euler/normal", "euler", "normal", lambda: diffusers.EulerDiscreteScheduler(**BASE, timestep_spacing="linspace"), False),
    ("euler/karras", "euler", "karras",
     lambda: diffusers.EulerDiscreteScheduler(**BASE, timestep_spacing="linspace", use_karras_sigmas=True), False),
    ("euler/trailing", "euler", "trailing", lambda: diffusers.EulerDiscreteScheduler(**BASE, timestep_spacing="trailing"), False),
    ("euler_a/normal", "euler_a", "normal",
     lambda: diffusers.EulerAncestralDiscreteScheduler(**BASE, timestep_spacing="linspace"), False),
    ("heun/normal", "heun", "normal", lambda: diffusers.HeunDiscreteScheduler(**BASE, timestep_spacing="linspace"), False),
    ("heun/karras", "heun", "karras",
     lambda: diffusers.HeunDiscreteScheduler(**BASE, timestep_spacing="linspace", use_karras_sigmas=True), False),
    # diffusers' DPM-Solver rounds its Karras timesteps: our quantize does the same
    ("dpmpp_2m/karras", "dpmpp_2m", "karras",
     lambda: diffusers.DPMSolverMultistepScheduler(**BASE, use_karras_sigmas=True, final_sigmas_type="zero"), True),
    ("ddim/ddim_uniform", "ddim", "ddim_uniform",
     lambda: diffusers.DDIMScheduler(**BASE, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                     clip_sample=False), False),
    ("lcm/lcm", "lcm", "lcm", lambda: diffusers.LCMScheduler(**BASE), False),
]


@pytest.mark.parametrize("label,sampler,schedule,make,quantize", AGREEMENT, ids=[a[0] for a in AGREEMENT])
def test_agrees_with_diffusers(unet, conds, label, sampler, schedule, make, quantize):
    steps = 4 if sampler == "lcm" else 10
    sched = make()
    ref = _diffusers_latents(unet, conds, sched, steps, seed=11)
    init = None if isinstance(sched, VP) else float(sched.init_noise_sigma)
    ours = _our_latents(unet, conds, sampler, schedule, steps, seed=11, init_scale=init, quantize=quantize)
    err = float((ours - ref).abs().max())
    assert err < 1e-4, f"{label}: max |diff| {err:.2e} (latents up to {float(ref.abs().max()):.1f})"


# Where diffusers' scheduler has no such schedule of its own, it is driven on our sigmas and
# timesteps (the schedules themselves are checked against diffusers' Euler above).
DRIVEN = [
    ("dpmpp_2m/normal", "dpmpp_2m", "normal", lambda: diffusers.DPMSolverMultistepScheduler(**BASE, final_sigmas_type="zero")),
    ("euler_a/karras", "euler_a", "karras", lambda: diffusers.EulerAncestralDiscreteScheduler(**BASE)),
]


@pytest.mark.parametrize("label,sampler,schedule,make", DRIVEN, ids=[d[0] for d in DRIVEN])
def test_agrees_with_diffusers_on_our_sigmas(unet, conds, label, sampler, schedule, make):
    steps = 10
    sigmas = get_sigmas(schedule, TS, steps)
    sched = make()
    ref = _diffusers_latents(unet, conds, sched, steps, seed=5, sigmas=sigmas,
                             timesteps=TS.sigma_to_t(sigmas[:-1].double()))
    init = None if isinstance(sched, VP) else float(sigmas[0])
    ours = _our_latents(unet, conds, sampler, schedule, steps, seed=5, init_scale=init)
    err = float((ours - ref).abs().max())
    assert err < 1e-4, f"{label}: max |diff| {err:.2e}"


# ---------------------------------------------------------------------------------------------
# the exact solution for Gaussian data: x0 ~ N(mu, s^2) elementwise has the ideal denoiser
# D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE maps noise
# x_T to mu + (x_T - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)).

MU, SD = 0.3, 0.8


def _gauss_denoiser(x, sigma, **_):
    s = sigma[:, None, None, None]
    return MU + SD ** 2 / (SD ** 2 + s ** 2) * (x - MU)


def _exact(x_t, sigma_t, sigma):
    return MU + (x_t - MU) * math.sqrt((SD ** 2 + sigma ** 2) / (SD ** 2 + sigma_t ** 2))


@pytest.mark.parametrize("sampler,steps,tol", [  # latents reach about 3.6 here
    ("euler", 50, 0.15), ("ddim", 50, 0.15), ("heun", 25, 0.04), ("dpm_2", 25, 0.04), ("dpmpp_2m", 25, 0.04),
    ("lms", 50, 5e-3),
])
def test_deterministic_samplers_follow_the_ode(sampler, steps, tol):
    sigmas = get_sigmas("karras", TS, steps)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=g) * float(sigmas[0])
    out = S.SAMPLERS[sampler](_gauss_denoiser, x_t.clone(), sigmas, disable=True)
    ref = _exact(x_t, float(sigmas[0]), 0.0)
    assert float((out - ref).abs().max()) < tol


def test_higher_order_samplers_converge_faster():
    def err(sampler, steps):
        sigmas = get_sigmas("karras", TS, steps)
        x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
        out = S.SAMPLERS[sampler](_gauss_denoiser, x_t.clone(), sigmas, disable=True)
        return float((out - _exact(x_t, float(sigmas[0]), 0.0)).abs().max())

    assert err("euler", 40) < err("euler", 10) / 3  # first order
    for second in ("heun", "dpmpp_2m", "lms", "dpm_2"):
        assert err(second, 20) < err("euler", 20) / 5, second


# The first-order ones (Euler a, DDIM with eta 1) need many steps to lose their bias. (LCM is
# left out: it expects a model that returns a sample of x0, not the posterior mean.)
@pytest.mark.parametrize("sampler,steps", [("euler_a", 200), ("ddim", 200), ("dpm_2_a", 40), ("dpmpp_2s_a", 40),
                                           ("dpmpp_sde", 40), ("dpmpp_2m_sde", 40)])
def test_stochastic_samplers_sample_the_data_distribution(sampler, steps):
    sigmas = get_sigmas("karras", TS, steps)
    seeds = list(range(64))
    noise = ImageNoise(seeds, (4, 8, 8))
    x = noise.randn() * float(sigmas[0])
    ns = BrownianNoise.following(noise) if sampler in ("dpmpp_sde", "dpmpp_2m_sde") else noise
    opts = {"eta": 1.0} if sampler == "ddim" else {}
    out = S.SAMPLERS[sampler](_gauss_denoiser, x, sigmas, disable=True, noise_sampler=ns, **opts)
    assert abs(float(out.mean()) - MU) < 0.03
    assert abs(float(out.std()) - SD) < 0.03


@pytest.mark.parametrize("sampler", sorted(S.SAMPLERS))
def test_every_sampler_lands_on_a_constant_denoiser(sampler):
    target = torch.full((1, 4, 4, 4), 0.25)
    sigmas = get_sigmas("karras", TS, 6)
    calls, begun = [], []
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2)) * float(sigmas[0])

    def model(x, sigma, **kw):
        calls.append(float(sigma[0]))
        return target.clone()

    out = S.SAMPLERS[sampler](model, x, sigmas, disable=True, on_step=lambda i, n, s: begun.append((i, n, s)),
                              callback=lambda d: None)
    assert torch.allclose(out, target, atol=1e-5)
    assert [b[0] for b in begun] == list(range(6)) and {b[1] for b in begun} == {6}
    assert [b[2] for b in begun] == pytest.approx([float(s) for s in sigmas[:-1]])
    assert len(calls) >= 6


def test_brownian_noise_has_unit_variance_and_is_reproducible():
    a = BrownianNoise.following(ImageNoise([1, 2], (4, 16, 16)))
    b = BrownianNoise.following(ImageNoise([1, 2], (4, 16, 16)))
    draws = [a(14.6, 9.0), a(14.6, 11.2), a(9.0, 3.0)]
    assert all(torch.equal(d, e) for d, e in zip(draws, [b(14.6, 9.0), b(14.6, 11.2), b(9.0, 3.0)]))
    # overlapping intervals are correlated exactly as Brownian motion says
    corr = float((draws[0] * draws[1]).mean())
    assert corr == pytest.approx(math.sqrt((14.6 - 11.2) / (14.6 - 9.0)), abs=0.08)
    assert float(draws[2].std()) == pytest.approx(1.0, abs=0.08)
