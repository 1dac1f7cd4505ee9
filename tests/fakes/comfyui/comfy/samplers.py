"""Mirrors the sampling path of comfy/samplers.py and comfy/sampler_helpers.py (ComfyUI
0.3.64): ``CFGGuider.sample`` copies model_options, merges the patcher's wrappers and
callbacks into ``transformer_options`` (prepare_model_patcher), runs ``outer_sample``
through the OUTER_SAMPLE wrappers (``class_obj`` = the guider); ``outer_sample`` loads the
patcher (load_models_gpu: patches applied), ``pre_run``, ``inner_sample`` (``sample_sigmas``
in transformer_options), then ``cleanup``; the sampler evaluates the model per step through
``calc_cond_batch``, which calls ``model.current_patcher.prepare_state(timestep)`` before
``apply_model`` with ``transformer_options["sigmas"] = timestep``. Euler steps; second-order
samplers evaluate at sigma_i and sigma_{i+1}."""
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
    def __init__(self, second_order=False):
        self.second_order = second_order

    def sample(self, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = noise * sigmas[0]
        model_options = extra_args["model_options"]
        for i in range(len(sigmas) - 1):
            d = calc_cond_batch(guider.inner_model, guider.conds, x, sigmas[i].reshape(1), model_options)
            if self.second_order and sigmas[i + 1] > 0:
                d = calc_cond_batch(guider.inner_model, guider.conds, x, sigmas[i + 1].reshape(1), model_options)
            x = x - 0.01 * d
            if callback is not None:
                callback(i, d, x, len(sigmas) - 1)
        return x


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.conds = None

    def set_conds(self, positive):
        self.original_conds = positive

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


def sample(model, noise, positive, sigmas, sampler=None, callback=None, seed=0):
    guider = CFGGuider(model)
    guider.set_conds(positive)
    return guider.sample(noise, torch.zeros_like(noise), sampler or KSAMPLER(), sigmas, callback=callback, seed=seed)
