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
