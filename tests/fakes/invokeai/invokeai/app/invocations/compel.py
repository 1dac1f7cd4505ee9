"""Mirrors invokeai/app/invocations/compel.py (InvokeAI 6.14.2 from PyPI, whose line numbers L... cite; read at invoke-ai/InvokeAI 8e71a8a5, which agrees
for these parts): the "compel" node
(prompt, clip, mask) loads the text encoder (``context.models.load``, L76), then locks it with
``model_on_device()`` and the tokenizer as a context manager (L80-82), encodes, saves the
conditioning and returns ConditioningOutput; "sdxl_compel_prompt" (L245-340) runs
``run_clip_compel`` for ``clip`` with the prompt and ``clip2`` with the style, or the prompt
when ``style.strip() == ""`` (L281-286); an empty prompt gives zeros without running that
text encoder (``zero_on_empty``, L151-169). The tokenizer here is a fake (a callable from
text to ids) and compel's prompt weighting is left out: lora-ext only needs the text encoders
to run on the prompt it is given."""
from typing import Optional

import torch

from invokeai.app.invocations.baseinvocation import BaseInvocation, invocation
from invokeai.app.invocations.fields import FieldDescriptions, Input, InputField, UIComponent
from invokeai.app.invocations.model import CLIPField
from invokeai.app.invocations.primitives import ConditioningOutput


def _encode(context, clip_field, prompt, zero_on_empty=False):
    text_encoder_info = context.models.load(clip_field.text_encoder)
    if prompt == "" and zero_on_empty:
        return torch.zeros(1, 6, text_encoder_info.model.config.hidden_size)
    with text_encoder_info.model_on_device() as (cached_weights, text_encoder), \
            context.models.load(clip_field.tokenizer) as tokenizer:
        return text_encoder(tokenizer(prompt)).last_hidden_state


@invocation("compel", title="Prompt - SD1.5", tags=["prompt", "compel"], category="prompt", version="1.2.1")
class CompelInvocation(BaseInvocation):
    """Parse prompt using compel package to conditioning."""

    prompt: str = InputField(default="", description=FieldDescriptions.compel_prompt, ui_component=UIComponent.Textarea)
    clip: CLIPField = InputField(title="CLIP", description=FieldDescriptions.clip)
    mask: Optional[object] = InputField(default=None, description="A mask")

    @torch.no_grad()
    def invoke(self, context) -> ConditioningOutput:
        c = _encode(context, self.clip, self.prompt).detach().to("cpu")
        name = context.conditioning.save({"embeds": c, "prompt": self.prompt})
        return ConditioningOutput.build(name, self.mask)


@invocation("sdxl_compel_prompt", title="Prompt - SDXL", tags=["sdxl", "compel", "prompt"], category="prompt",
            version="1.2.1")
class SDXLCompelPromptInvocation(BaseInvocation):
    """Parse prompt using compel package to conditioning."""

    prompt: str = InputField(default="", description=FieldDescriptions.compel_prompt, ui_component=UIComponent.Textarea)
    style: str = InputField(default="", description=FieldDescriptions.compel_prompt, ui_component=UIComponent.Textarea)
    clip: CLIPField = InputField(description=FieldDescriptions.clip, input=Input.Connection, title="CLIP 1")
    clip2: CLIPField = InputField(description=FieldDescriptions.clip, input=Input.Connection, title="CLIP 2")
    mask: Optional[object] = InputField(default=None, description="A mask")

    @torch.no_grad()
    def invoke(self, context) -> ConditioningOutput:
        c1 = _encode(context, self.clip, self.prompt, zero_on_empty=True)
        c2 = _encode(context, self.clip2, self.style if self.style.strip() else self.prompt, zero_on_empty=True)
        c = torch.cat([c1, c2], dim=-1).detach().to("cpu")
        name = context.conditioning.save({"embeds": c, "prompt": self.prompt, "style": self.style})
        return ConditioningOutput.build(name, self.mask)
