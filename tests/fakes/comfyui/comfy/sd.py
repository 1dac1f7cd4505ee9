"""Mirrors comfy/sd.py CLIP (ComfyUI 0.3.64): ``patcher`` (a ModelPatcher over
``cond_stage_model``), ``clone()`` (patcher cloned, cond_stage_model shared), ``add_patches``
and encoding, which loads the patcher first (so its patches are on the weights). The
``cond_stage_model`` here is SD1ClipModel-shaped: ``clip_l`` is an SDClipModel whose
``transformer`` *is* the CLIP text model (comfy/sd1_clip.py 0.3.64 L121, SD1ClipModel L662-L675:
``self.transformer = model_class(config, dtype, device, self.operations)``, model_class
comfy.clip_model.CLIPTextModel (comfy/clip_model.py L139-L145) with ``.text_model``
and ``.text_projection``; a transformers CLIPTextModel has the same nesting), so state-dict
keys read ``clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight``."""
import torch
from torch import nn

import comfy.model_management
import comfy.model_patcher


class SDClipModel(nn.Module):
    def __init__(self, te):
        super().__init__()
        self.transformer = te  # a transformers CLIPTextModel: .text_model.embeddings/encoder/final_layer_norm

    def forward(self, ids):
        return self.transformer(ids).last_hidden_state


class SD1ClipModel(nn.Module):
    def __init__(self, te, clip_name="l"):
        super().__init__()
        self.clip_name = clip_name
        self.clip = "clip_{}".format(clip_name)
        setattr(self, self.clip, SDClipModel(te))

    def encode(self, ids):
        return getattr(self, self.clip)(ids)


class CLIP:
    def __init__(self, te=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = SD1ClipModel(te)
        self.patcher = comfy.model_patcher.ModelPatcher(self.cond_stage_model, load_device=torch.device("cpu"),
                                                        offload_device=torch.device("cpu"))
        self.patcher.is_clip = True
        self.layer_idx = None

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.layer_idx = self.layer_idx
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def load_model(self):
        comfy.model_management.load_models_gpu([self.patcher])
        return self.patcher

    def encode_from_tokens(self, ids):
        self.load_model()
        with torch.no_grad():
            return self.cond_stage_model.encode(ids)
