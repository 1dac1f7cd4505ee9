"""Mirrors comfy/sample.py ``sample`` (ComfyUI 0.3.64, L42-L47): a ``comfy.samplers.KSampler`` for
the model, steps, sampler, scheduler and denoise, sampling with ``start_step`` / ``last_step``
/ ``force_full_denoise`` (what KSamplerAdvanced passes)."""
import comfy.samplers


def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
           disable_noise=False, start_step=None, last_step=None, force_full_denoise=False, noise_mask=None, sigmas=None,
           callback=None, disable_pbar=False, seed=None):
    sampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                      scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    return sampler.sample(noise, positive, negative, cfg=cfg, latent_image=latent_image, start_step=start_step,
                          last_step=last_step, force_full_denoise=force_full_denoise, denoise_mask=noise_mask,
                          sigmas=sigmas, callback=callback, disable_pbar=disable_pbar, seed=seed)
