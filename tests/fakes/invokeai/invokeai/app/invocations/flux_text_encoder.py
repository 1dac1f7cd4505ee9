"""Mirrors invokeai/app/invocations/flux_text_encoder.py (InvokeAI 6.14.2 from PyPI, whose line
numbers L... cite): the "flux_text_encoder" node (``clip``, ``t5_encoder``, ``t5_max_seq_len``,
``prompt``, ``mask``; L26-54). ``invoke`` (L56-77) runs ``_t5_encode`` and then ``_clip_encode``,
each in its own method so that one model can be freed before the other is loaded:
``_t5_encode`` (L79-131) loads the T5 (``context.models.load(self.t5_encoder.text_encoder)``),
locks it with ``model_on_device()`` and the tokenizer as a context manager, and runs
``HFEncoder`` (backend/flux/modules/conditioner.py: ``hf_module(input_ids=..., attention_mask=None,
output_hidden_states=False)["last_hidden_state"]``); ``_clip_encode`` (L133-185) the same for CLIP-L
with ``"pooler_output"``. The conditioning saved is ``FLUXConditioningInfo(clip_embeds, t5_embeds)``
(here a dict of the two). InvokeAI's own LoRA patching of the encoders (``LayerPatcher``) is left
out: lora-ext's nodes never use it. The tokenizers are fakes (a callable from a list of texts to
``{"input_ids": ...}``)."""
from typing import Literal, Optional

import torch

from invokeai.app.invocations.baseinvocation import BaseInvocation, invocation
from invokeai.app.invocations.fields import FieldDescriptions, Input, InputField, UIComponent
from invokeai.app.invocations.model import CLIPField, T5EncoderField
from invokeai.app.invocations.primitives import FluxConditioningOutput


def _hf_encode(encoder, tokenizer, prompt, is_clip, max_length):
    ids = tokenizer([prompt], max_length=max_length)["input_ids"]
    out = encoder(input_ids=ids, attention_mask=None, output_hidden_states=False)
    return out["pooler_output" if is_clip else "last_hidden_state"]


@invocation("flux_text_encoder", title="Prompt - FLUX", tags=["prompt", "conditioning", "flux"], category="prompt",
            version="1.1.2", idle_gpu_offloadable=True)
class FluxTextEncoderInvocation(BaseInvocation):
    """Encodes and preps a prompt for a flux image."""

    clip: CLIPField = InputField(title="CLIP", description=FieldDescriptions.clip, input=Input.Connection)
    t5_encoder: T5EncoderField = InputField(title="T5Encoder", description=FieldDescriptions.t5_encoder,
                                            input=Input.Connection)
    t5_max_seq_len: Literal[256, 512] = InputField(default=256, description="Max sequence length for the T5 encoder.")
    prompt: str = InputField(default="", description="Text prompt to encode.", ui_component=UIComponent.Textarea)
    mask: Optional[object] = InputField(default=None, description="A mask")

    @torch.no_grad()
    def invoke(self, context) -> FluxConditioningOutput:
        t5_embeddings = self._t5_encode(context)
        clip_embeddings = self._clip_encode(context)
        name = context.conditioning.save({"t5_embeds": t5_embeddings.detach().to("cpu"),
                                          "clip_embeds": clip_embeddings.detach().to("cpu"), "prompt": self.prompt})
        return FluxConditioningOutput.build(name)

    def _t5_encode(self, context) -> torch.Tensor:
        t5_encoder_info = context.models.load(self.t5_encoder.text_encoder)
        with t5_encoder_info.model_on_device() as (cached_weights, t5_text_encoder), \
                context.models.load(self.t5_encoder.tokenizer) as t5_tokenizer:
            return _hf_encode(t5_text_encoder, t5_tokenizer, self.prompt, False, self.t5_max_seq_len)

    def _clip_encode(self, context) -> torch.Tensor:
        clip_text_encoder_info = context.models.load(self.clip.text_encoder)
        with clip_text_encoder_info.model_on_device() as (cached_weights, clip_text_encoder), \
                context.models.load(self.clip.tokenizer) as clip_tokenizer:
            return _hf_encode(clip_text_encoder, clip_tokenizer, self.prompt, True, 77)
