"""Mirrors nodes.py of ComfyUI 0.3.64 (Comfy-Org/ComfyUI a125cd84): ``common_ksampler``
(L1476-L1497, without the preview callback) and ``KSampler`` / ``KSamplerAdvanced``
(L1499-L1559): KSamplerAdvanced passes ``start_at_step`` / ``end_at_step`` as
``start_step`` / ``last_step``, ``force_full_denoise`` unless ``return_with_leftover_noise`` is
"enable", and zero noise when ``add_noise`` is "disable". A Wan 2.2 A14B workflow runs two of
them over one step count, each with its own expert's MODEL."""
import torch

import comfy.sample


def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0,
                    disable_noise=False, start_step=None, last_step=None, force_full_denoise=False):
    latent_image = latent["samples"]
    if disable_noise:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, device="cpu")
    else:
        generator = torch.manual_seed(seed)
        noise = torch.randn(latent_image.size(), dtype=torch.float32, layout=latent_image.layout,
                            generator=generator, device="cpu")
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                                  denoise=denoise, disable_noise=disable_noise, start_step=start_step,
                                  last_step=last_step, force_full_denoise=force_full_denoise, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return (out,)


class KSampler:
    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
        return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               denoise=denoise)


class KSamplerAdvanced:
    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, start_at_step, end_at_step, return_with_leftover_noise, denoise=1.0):
        force_full_denoise = True
        if return_with_leftover_noise == "enable":
            force_full_denoise = False
        disable_noise = False
        if add_noise == "disable":
            disable_noise = True
        return common_ksampler(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, denoise=denoise, disable_noise=disable_noise, start_step=start_at_step,
                               last_step=end_at_step, force_full_denoise=force_full_denoise)


NODE_CLASS_MAPPINGS = {"KSampler": KSampler, "KSamplerAdvanced": KSamplerAdvanced}
