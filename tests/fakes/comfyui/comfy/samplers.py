"""Mirrors the sampling path of comfy/samplers.py and comfy/sampler_helpers.py (ComfyUI
0.3.64): ``KSampler`` (L1097-L1161: the run's sigmas from the model's ``model_sampling`` and
the scheduler, ``set_steps`` with denoise, and ``sample``'s ``start_step`` / ``last_step``
slicing with ``force_full_denoise`` zeroing the slice's last sigma, *in the KSampler's own
tensor*, since the slice is a view), ``calculate_sigmas`` with the ``simple`` and ``normal``
schedulers (L413-L461), ``sample`` (L1047) and ``CFGGuider.sample`` copies model_options, merges the patcher's wrappers and
callbacks into ``transformer_options`` (prepare_model_patcher), runs ``outer_sample``
through the OUTER_SAMPLE wrappers (``class_obj`` = the guider); ``outer_sample`` loads the
patcher (load_models_gpu: patches applied), ``pre_run``, ``inner_sample`` (``sample_sigmas``
in transformer_options), then ``cleanup``; the sampler evaluates the model per step through
``calc_cond_batch``, which calls ``model.current_patcher.prepare_state(timestep)`` before
``apply_model`` with ``transformer_options["sigmas"] = timestep``. Euler steps; second-order
samplers evaluate at sigma_i and sigma_{i+1}."""
import math

import torch

import comfy.model_management
import comfy.patcher_extension
from comfy.patcher_extension import WrappersMP


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    model.current_patcher.prepare_state(timestep)
    transformer_options = comfy.patcher_extension.copy_nested_dicts(model_options.get("transformer_options", {}))
    transformer_options["sigmas"] = timestep
    return model.apply_model(x_in, timestep, conds, transformer_options=transformer_options)


def prepare_model_patcher(model, conds, model_options):
    comfy.patcher_extension.merge_nested_dicts(model_options["transformer_options"].setdefault("wrappers", {}),
                                               model.wrappers, copy_dict1=False)
    comfy.patcher_extension.merge_nested_dicts(model_options["transformer_options"].setdefault("callbacks", {}),
                                               model.callbacks, copy_dict1=False)


class KSAMPLER:
    """Euler steps. ``second_order``: a second evaluation per step (none when the next sigma is
    0, as k-diffusion's heun / dpm_2 take an Euler step there): at sigma_i+1 (heun), or with
    ``midpoint`` at the log-midpoint of sigma_i and sigma_i+1 (dpm_2, k_diffusion/sampling.py
    sample_dpm_2: ``sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()``)."""

    def __init__(self, second_order=False, midpoint=False):
        self.second_order = second_order
        self.midpoint = midpoint

    def sample(self, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = noise * sigmas[0] if latent_image is None else latent_image + noise * sigmas[0]
        model_options = extra_args["model_options"]
        for i in range(len(sigmas) - 1):
            d = calc_cond_batch(guider.inner_model, guider.conds["positive"], x, sigmas[i].reshape(1), model_options)
            if self.second_order and sigmas[i + 1] > 0:
                s2 = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp() if self.midpoint else sigmas[i + 1]
                d = calc_cond_batch(guider.inner_model, guider.conds["positive"], x, s2.reshape(1), model_options)
            x = x - 0.01 * d
            if callback is not None:
                callback(i, d, x, len(sigmas) - 1)
        return x


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.conds = None

    def set_conds(self, positive, negative=None):
        self.original_conds = {"positive": positive, "negative": negative}

    def set_cfg(self, cfg):
        self.cfg = float(cfg)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        extra_model_options = comfy.patcher_extension.copy_nested_dicts(self.model_options)
        extra_model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        extra_args = {"model_options": extra_model_options, "seed": seed}
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            sampler.sample, sampler,
            comfy.patcher_extension.get_all_wrappers(WrappersMP.SAMPLER_SAMPLE, extra_args["model_options"],
                                                     is_model_options=True))
        return executor.execute(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
                     seed=None):
        comfy.model_management.load_models_gpu([self.model_patcher])
        self.inner_model = self.model_patcher.model
        device = self.model_patcher.load_device
        try:
            self.model_patcher.pre_run()
            output = self.inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                       disable_pbar, seed)
        finally:
            self.model_patcher.cleanup()
        del self.inner_model
        return output

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        self.conds = self.original_conds
        orig_model_options = self.model_options
        try:
            self.model_options = comfy.patcher_extension.copy_nested_dicts(self.model_options)
            prepare_model_patcher(self.model_patcher, self.conds, self.model_options)
            executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                self.outer_sample, self,
                comfy.patcher_extension.get_all_wrappers(WrappersMP.OUTER_SAMPLE, self.model_options,
                                                         is_model_options=True))
            output = executor.execute(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            self.model_options = orig_model_options
        return output


def sample(model, noise, positive, negative, cfg, device, sampler, sigmas, model_options={}, latent_image=None,
           denoise_mask=None, callback=None, disable_pbar=False, seed=None):
    cfg_guider = CFGGuider(model)
    cfg_guider.set_conds(positive, negative)
    cfg_guider.set_cfg(cfg)
    return cfg_guider.sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)


# --- schedulers and KSampler (comfy/samplers.py L413-L461, L1054-L1161) ------------------------
def simple_scheduler(model_sampling, steps):
    s = model_sampling
    sigs = []
    ss = len(s.sigmas) / steps
    for x in range(steps):
        sigs += [float(s.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def normal_scheduler(model_sampling, steps, sgm=False, floor=False):
    s = model_sampling
    start = s.timestep(s.sigma_max)
    end = s.timestep(s.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(s.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs += [0.0]
    return torch.FloatTensor(sigs)


SCHEDULER_HANDLERS = {"simple": simple_scheduler, "normal": normal_scheduler}
SCHEDULER_NAMES = list(SCHEDULER_HANDLERS)
# the fake's samplers: Euler steps; these evaluate the model twice per step, where the real ones
# evaluate the second time
SECOND_ORDER = {"heun": False, "dpm_2": True, "dpm_2_ancestral": True}  # name -> evaluates at the midpoint
SAMPLER_NAMES = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
                 "dpmpp_sde", "dpmpp_2m", "ddim", "uni_pc", "uni_pc_bh2"]


def calculate_sigmas(model_sampling, scheduler_name, steps):
    handler = SCHEDULER_HANDLERS.get(scheduler_name)
    if handler is None:
        raise ValueError(f"error invalid scheduler {scheduler_name}")
    return handler(model_sampling, steps)


def sampler_object(name):
    return KSAMPLER(second_order=name in SECOND_ORDER, midpoint=SECOND_ORDER.get(name, False))


class KSampler:
    SCHEDULERS = SCHEDULER_NAMES
    SAMPLERS = SAMPLER_NAMES
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS = set(("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"))

    def __init__(self, model, steps, device, sampler=None, scheduler=None, denoise=None, model_options={}):
        self.model = model
        self.device = device
        if scheduler not in self.SCHEDULERS:
            scheduler = self.SCHEDULERS[0]
        if sampler not in self.SAMPLERS:
            sampler = self.SAMPLERS[0]
        self.scheduler = scheduler
        self.sampler = sampler
        self.set_steps(steps, denoise)
        self.denoise = denoise
        self.model_options = model_options

    def calculate_sigmas(self, steps):
        discard_penultimate_sigma = False
        if self.sampler in self.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            steps += 1
            discard_penultimate_sigma = True
        sigmas = calculate_sigmas(self.model.get_model_object("model_sampling"), self.scheduler, steps)
        if discard_penultimate_sigma:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    def set_steps(self, steps, denoise=None):
        self.steps = steps
        if denoise is None or denoise > 0.9999:
            self.sigmas = self.calculate_sigmas(steps).to(self.device)
        else:
            if denoise <= 0.0:
                self.sigmas = torch.FloatTensor([])
            else:
                new_steps = int(steps / denoise)
                sigmas = self.calculate_sigmas(new_steps).to(self.device)
                self.sigmas = sigmas[-(steps + 1):]

    def sample(self, noise, positive, negative, cfg, latent_image=None, start_step=None, last_step=None,
               force_full_denoise=False, denoise_mask=None, sigmas=None, callback=None, disable_pbar=False, seed=None):
        if sigmas is None:
            sigmas = self.sigmas
        if last_step is not None and last_step < (len(sigmas) - 1):
            sigmas = sigmas[:last_step + 1]
            if force_full_denoise:
                sigmas[-1] = 0
        if start_step is not None:
            if start_step < (len(sigmas) - 1):
                sigmas = sigmas[start_step:]
            else:
                if latent_image is not None:
                    return latent_image
                else:
                    return torch.zeros_like(noise)
        sampler = sampler_object(self.sampler)
        return sample(self.model, noise, positive, negative, cfg, self.device, sampler, sigmas, self.model_options,
                      latent_image=latent_image, denoise_mask=denoise_mask, callback=callback,
                      disable_pbar=disable_pbar, seed=seed)
