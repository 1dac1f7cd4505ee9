"""Mirrors comfy/model_base.py BaseModel (ComfyUI 0.3.64) for SD1.x-style models: an
``nn.Module`` whose ``diffusion_model`` is the compvis UNet (state-dict keys
``diffusion_model.input_blocks.1.1.proj_in.weight``), ``model_config`` (``unet_config``;
class name SD15 / SD20 / SDXL), ``current_patcher`` (set by ModelPatcher.pre_run) and
``apply_model(x, t, c_crossattn, transformer_options)``.

The compvis tree is the tiny diffusers UNet's modules re-parented under their ldm names
(``ldm_tree`` from tests/tiny_models.py, as in tests/fakes/a1111/fake_model.py), so
apply_model can run the diffusers forward on the very same modules."""

import torch
from torch import nn

from tiny_models import ldm_tree  # a test helper (tests/tiny_models.py), not part of the host's layout


class SD15:
    def __init__(self, unet_config):
        self.unet_config = unet_config


class BaseModel(nn.Module):
    def __init__(self, unet, unet_table, model_config=None):
        super().__init__()
        self.diffusion_model = ldm_tree(unet_table, unet)
        self._diffusers = [unet]  # not a submodule: its state dict is not the model's
        self.model_config = model_config or SD15(dict(unet.config))
        self.current_patcher = None
        self.device = torch.device("cpu")

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None):
        unet = self._diffusers[0]
        ctx = c_crossattn if c_crossattn is not None else torch.zeros(x.shape[0], 5, unet.config.cross_attention_dim)
        return unet(x, t * 100, encoder_hidden_states=ctx).sample


class WAN21_T2V:
    """comfy/supported_models.py WAN21_T2V (L985-L1011): Wan 2.1 T2V and both Wan 2.2 A14B
    experts (ComfyUI loads each expert's file as this config; WAN22_T2V is the TI2V-5B)."""
    sampling_settings = {"shift": 8.0}

    def __init__(self, unet_config=None):
        self.unet_config = dict(unet_config or {"image_model": "wan2.1", "model_type": "t2v"})


class WAN21(nn.Module):
    """comfy/model_base.py WAN21 (L1098): ``diffusion_model`` in Wan's original names
    (``blocks.N.self_attn.q``, ``ffn.0``, ``modulation`` ...), ``model_sampling`` a
    ``ModelSamplingDiscreteFlow`` (flow, shift 8), ``current_patcher``, ``apply_model``.

    ``diffusion_model`` is any module tree with those names (tests/dit_models.py
    ``OriginalTree``); ``denoise`` (optional) computes the output from (model, x, sigma),
    zeros otherwise: the tests observe the patched modules themselves."""

    def __init__(self, diffusion_model, model_config=None, denoise=None):
        super().__init__()
        from comfy.model_sampling import ModelSamplingDiscreteFlow

        self.diffusion_model = diffusion_model
        self.model_config = model_config or WAN21_T2V()
        self.model_sampling = ModelSamplingDiscreteFlow(self.model_config)
        self.current_patcher = None
        self.device = torch.device("cpu")
        self._denoise = denoise

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None):
        if self._denoise is None:
            return torch.zeros_like(x)
        return self._denoise(self, x, t)
