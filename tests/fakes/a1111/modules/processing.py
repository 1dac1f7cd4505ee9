"""Mirrors the generation flow of modules/processing.py of AUTOMATIC1111/stable-diffusion-webui
v1.10.1 (read at commit 9a224a5cb83cbcf75ab0108c03196b8519d29ab6) and of the k-diffusion
sampler (modules/sd_samplers_kdiffusion.py, sd_samplers_cfg_denoiser.py, sd_samplers_common.py):

process_images_inner: scripts.process(p); per batch: before_process_batch,
parse_extra_network_prompts (tags removed from p.prompts, extra data from the first prompt),
``with devices.autocast(): extra_networks.activate(p, p.extra_network_data)`` unless
p.disable_extra_networks,
scripts.process_batch, setup_conds (runs the text encoder), sample; txt2img hires fix:
``p.is_hr_pass = True``, ``extra_networks.activate(p, p.hr_extra_network_data)``, hr conds,
scripts.before_hr, second sampling with ``hr_second_pass_steps or steps``; then
``extra_networks.deactivate`` when there was extra network data; infotext from
``p.extra_generation_params``; scripts.postprocess.

Sampling: launch_sampling sets state.sampling_steps = steps, state.sampling_step = 0; each
step calls CFGDenoiser.forward, which builds CFGDenoiserParams(x, image_cond, sigma,
state.sampling_step, state.sampling_steps, cond, uncond, self) and calls
``cfg_denoiser_callback`` before the model, then ``self.step += 1``; the sampler's
callback_state sets state.sampling_step = i after step i (so during step i > 0 the callback
sees i - 1, as in the real webui). Second-order samplers call the denoiser twice per step.
"""
import torch

from modules import devices, extra_networks, infotext_utils, script_callbacks, shared
from modules.shared import state


class Processed:
    def __init__(self, p, infotexts):
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""


class SamplerConfig:
    def __init__(self, name, second_order=False):
        self.name = name
        self.options = {"second_order": second_order}


class CFGDenoiser:
    def __init__(self, sampler):
        self.sampler = sampler
        self.p = sampler.p
        self.step = 0

    def forward(self, x, sigma, cond, uncond):
        params = script_callbacks.CFGDenoiserParams(x, None, sigma, state.sampling_step, state.sampling_steps,
                                                    cond, uncond, self)
        script_callbacks.cfg_denoiser_callback(params)
        out = self.p.sd_model.apply_model(params.x, params.sigma, cond)
        self.step += 1
        return out


class KDiffusionSampler:
    def __init__(self, p, second_order=False):
        self.p = p
        self.config = SamplerConfig("Heun" if second_order else "Euler", second_order)
        self.model_wrap_cfg = CFGDenoiser(self)

    def callback_state(self, d):
        state.sampling_step = d['i']

    def launch_sampling(self, steps, func):
        state.sampling_steps = steps
        state.sampling_step = 0
        return func()

    def sample(self, x, steps, cond, uncond):
        sigmas = torch.linspace(10.0, 0.0, steps + 1)

        def run():
            nonlocal x
            for i in range(steps):
                d = self.model_wrap_cfg.forward(x, sigmas[i].reshape(1), cond, uncond)
                if self.config.options["second_order"] and sigmas[i + 1] > 0:
                    d = self.model_wrap_cfg.forward(x, sigmas[i + 1].reshape(1), cond, uncond)
                x = x - 0.01 * d
                self.callback_state({'i': i})
            return x

        return self.launch_sampling(steps, run)


class StableDiffusionProcessing:
    def __init__(self, prompt="", steps=20, seed=1, n_iter=1, batch_size=1, sd_model=None, sampler_name="Euler",
                 disable_extra_networks=False, scripts=None, denoising_strength=None):
        self.prompt = prompt
        self.steps = steps
        self.seed = seed
        self.n_iter = n_iter
        self.batch_size = batch_size
        self.sd_model = sd_model if sd_model is not None else shared.sd_model
        self.sampler_name = sampler_name
        self.disable_extra_networks = disable_extra_networks
        self.scripts = scripts
        self.denoising_strength = denoising_strength
        self.extra_generation_params = {}
        self.extra_network_data = {}
        self.comments = {}
        self.is_hr_pass = False
        self.iteration = 0
        self.c = None

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        self.all_prompts = [self.prompt] * (self.batch_size * self.n_iter)

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def setup_conds(self):
        self.c = self.sd_model.get_learned_conditioning(self.prompts)

    def sample(self):
        sampler = KDiffusionSampler(self, second_order=self.sampler_name in ("Heun", "DPM2"))
        return sampler.sample(torch.zeros(1, 4, 8, 8), self.steps, self.c, None)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, enable_hr=False, hr_second_pass_steps=0, hr_prompt="", **kwargs):
        super().__init__(**kwargs)
        self.enable_hr = enable_hr
        self.hr_second_pass_steps = hr_second_pass_steps
        self.hr_prompt = hr_prompt
        self.hr_extra_network_data = None

    def setup_prompts(self):
        super().setup_prompts()
        if self.enable_hr:
            self.all_hr_prompts = [self.hr_prompt or self.prompt] * (self.batch_size * self.n_iter)

    def parse_extra_network_prompts(self):
        super().parse_extra_network_prompts()
        if self.enable_hr:
            self.hr_prompts = self.all_hr_prompts[self.iteration * self.batch_size:(self.iteration + 1) * self.batch_size]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)

    def sample(self):
        samples = super().sample()
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples)

    def sample_hr_pass(self, samples):
        self.is_hr_pass = True
        if not self.disable_extra_networks:
            with devices.autocast():  # processing.py v1.10: activate runs inside autocast
                extra_networks.activate(self, self.hr_extra_network_data)
        self.hr_c = self.sd_model.get_learned_conditioning(self.hr_prompts)
        if self.scripts is not None:
            self.scripts.before_hr(self)
        sampler = KDiffusionSampler(self, second_order=self.sampler_name in ("Heun", "DPM2"))
        samples = sampler.sample(samples, self.hr_second_pass_steps or self.steps, self.hr_c, None)
        self.is_hr_pass = False
        return samples


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    infotexts = []
    with torch.no_grad():
        for n in range(p.n_iter):
            p.iteration = n
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts)
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                with devices.autocast():  # processing.py v1.10 L~930: activate inside autocast
                    extra_networks.activate(p, p.extra_network_data)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts)
            p.setup_conds()
            p.sample()
            infotexts.append(f"{p.all_prompts[n * p.batch_size]}\n{infotext_utils.create_infotext_line(p)}")
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)  # outside autocast, as in the real one
    res = Processed(p, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
