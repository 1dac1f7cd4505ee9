"""lora-ext's InvokeAI nodes (InvokeAI 6.x invocation API).

* ``lora_ext_lora_loader`` **LoRA (lora-ext)**: one LoRA file of any type the core reads
  (LoRA/LoCon, LoHa, LoKr, DoRA, IA3, OFT, BOFT, GLoRA, full, norm; InvokeAI's model manager
  is not needed), strengths for the UNet and the text encoders, block weights, keyframes.
  Chains: its ``lora_ext`` output feeds the next loader. InvokeAI's own LoRA fields stay
  untouched (use both if you like).
* ``lora_ext_compel`` / ``lora_ext_sdxl_compel_prompt`` **Prompt (lora-ext)**: InvokeAI's prompt
  nodes, with a ``lora_ext`` stack input; ``<lora:...>`` tags in the prompt are read (full
  grammar), removed from the text, and added to the stack. The text encoders run with the
  LoRAs' text-encoder strengths (step 0); the output carries the stack on.
* ``lora_ext_denoise_latents`` **Denoise (lora-ext)**: InvokeAI's denoise node with a
  ``lora_ext`` stack input: the UNet runs with each LoRA's strength at every step.

Everything is applied on the fly (forward hooks): InvokeAI's model cache owns the weights
and restores the ones its own patches change from its CPU copy, so lora-ext never writes
them. Hooks come off when the node finishes, failed or not.

LoRA names are looked up (``lora_ext.resolve``) in the folders of the ``LORA_EXT_DIRS``
environment variable (``os.pathsep``-separated), then InvokeAI's models folder; a path works too.
"""
import os
from typing import Optional

import torch

from invokeai.app.invocations.baseinvocation import BaseInvocationOutput, invocation, invocation_output
from invokeai.app.invocations.baseinvocation import BaseInvocation
from invokeai.app.invocations.compel import CompelInvocation, SDXLCompelPromptInvocation
from invokeai.app.invocations.denoise_latents import DenoiseLatentsInvocation, get_scheduler
from invokeai.app.invocations.fields import Input, InputField, OutputField
from invokeai.app.invocations.primitives import ConditioningOutput, LatentsOutput

from lora_ext.hostmodel import HostModel, TimestepClock
from lora_ext.prompt import format_tag, parse_prompt, parse_tag
from lora_ext.resolve import LoraLibrary, resolve_specs
from lora_ext.session import Session, spec_from_inputs

try:
    from pydantic import BaseModel, Field
except ImportError:  # a host without pydantic (the test fakes): plain data classes
    BaseModel = None

if BaseModel is not None:
    class LoraExtStackField(BaseModel):
        """LoRAs for lora-ext's prompt and denoise nodes: ``{"name", "path", "tag"}`` each."""

        loras: list = Field(default_factory=list, description="name, path and canonical tag of each LoRA")
else:
    from dataclasses import dataclass, field

    @dataclass
    class LoraExtStackField:
        """LoRAs for lora-ext's prompt and denoise nodes: ``{"name", "path", "tag"}`` each."""

        loras: list = field(default_factory=list)

STACK_TITLE = "LoRA stack (lora-ext)"
_LIBRARIES: dict = {}


def encode(spec) -> dict:
    """A spec as stack data (JSON-friendly; the canonical tag keeps every strength)."""
    import copy

    named = copy.copy(spec)
    named.name = "x"
    return {"name": spec.name, "path": spec.path, "tag": format_tag(named)}


def decode(stack) -> list:
    out = []
    for e in (stack.loras if stack is not None else []):
        spec = parse_tag(e["tag"])
        spec.name, spec.path = e["name"], e["path"]
        spec.tag = e["tag"].replace("<lora:x:", f"<lora:{e['name']}:", 1)
        out.append(spec)
    return out


def library(context) -> LoraLibrary:
    folders = [f for f in os.environ.get("LORA_EXT_DIRS", "").split(os.pathsep) if f]
    models = getattr(context.config.get(), "models_path", None)
    if models:
        folders.append(str(models))
    key = tuple(folders)
    lib = _LIBRARIES.get(key)
    if lib is None:
        lib = _LIBRARIES[key] = LoraLibrary(folders)
    return lib


def _session(components: dict) -> Session:
    s = Session(None, method="onthefly", te_method="onthefly", label="InvokeAI")
    s.load_model(HostModel(components, naming="diffusers", label="InvokeAI model"))
    return s


@invocation_output("lora_ext_stack_output")
class LoraExtStackOutput(BaseInvocationOutput):
    lora_ext: LoraExtStackField = OutputField(title=STACK_TITLE, description="The LoRAs so far")


@invocation_output("lora_ext_conditioning_output")
class LoraExtConditioningOutput(ConditioningOutput):
    lora_ext: LoraExtStackField = OutputField(title=STACK_TITLE, description="The stack plus the prompt's tags")


@invocation("lora_ext_lora_loader", title="LoRA (lora-ext)", tags=["lora", "model", "lora-ext"], category="model",
            version="1.0.0")
class LoraExtLoaderInvocation(BaseInvocation):
    """Any LoRA type, with block weights and a per-step schedule, for lora-ext's prompt and denoise nodes."""

    lora: str = InputField(description="A LoRA file: a name in the LoRA folders, or a path")
    weight: float = InputField(default=1.0, description="Strength on the UNet")
    clip_weight: float = InputField(default=1.0, description="Strength on the text encoders")
    block_weights: str = InputField(default="", description="lbw preset or 12/17/20/26 numbers, or in=..:mid=..:out=..")
    keyframes: str = InputField(default="", description="w@pos,... over the run, multiplying the UNet strength")
    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def invoke(self, context) -> LoraExtStackOutput:
        lib = library(context)
        path = lib.resolve(self.lora)
        name = os.path.splitext(os.path.basename(path))[0]
        spec = spec_from_inputs(name, path, unet=self.weight, te=self.clip_weight, blocks=self.block_weights,
                                keyframes=self.keyframes)
        loras = list(self.lora_ext.loras if self.lora_ext is not None else []) + [encode(spec)]
        return LoraExtStackOutput(lora_ext=LoraExtStackField(loras=loras))


def _prompt_with_loras(node, context, base_invoke, clips: dict):
    parsed = parse_prompt(node.prompt)
    if parsed.specs:
        resolve_specs(parsed.specs, library(context))
    specs = decode(node.lora_ext) + parsed.specs
    plain = node.model_copy(update={"prompt": parsed.prompt})
    if specs:
        tes = {comp: context.models.load(f.text_encoder).model for comp, f in clips.items()}
        session = _session(tes)
        session.use_specs(specs)
        try:
            out = base_invoke(plain, context)
        finally:
            session.end_run(restore=True)
    else:
        out = base_invoke(plain, context)
    return LoraExtConditioningOutput(conditioning=out.conditioning,
                                     lora_ext=LoraExtStackField(loras=[encode(s) for s in specs]))


@invocation("lora_ext_compel", title="Prompt - SD1.5 (lora-ext)", tags=["prompt", "compel", "lora-ext"],
            category="prompt", version="1.0.0")
class LoraExtCompelInvocation(CompelInvocation):
    """The SD1.5 prompt node, with lora-ext LoRAs on the text encoder and <lora:...> tags read from the prompt."""

    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def invoke(self, context) -> LoraExtConditioningOutput:
        return _prompt_with_loras(self, context, CompelInvocation.invoke, {"te1": self.clip})


@invocation("lora_ext_sdxl_compel_prompt", title="Prompt - SDXL (lora-ext)", tags=["prompt", "sdxl", "lora-ext"],
            category="prompt", version="1.0.0")
class LoraExtSDXLCompelInvocation(SDXLCompelPromptInvocation):
    """The SDXL prompt node, with lora-ext LoRAs on both text encoders and <lora:...> tags read from the prompt."""

    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def invoke(self, context) -> LoraExtConditioningOutput:
        return _prompt_with_loras(self, context, SDXLCompelPromptInvocation.invoke,
                                  {"te1": self.clip, "te2": self.clip2})


@invocation("lora_ext_denoise_latents", title="Denoise - SD1.5, SDXL (lora-ext)",
            tags=["latents", "denoise", "lora-ext"], category="latents", version="1.0.0")
class LoraExtDenoiseLatentsInvocation(DenoiseLatentsInvocation):
    """InvokeAI's denoise, with lora-ext LoRAs on the UNet at per-step strengths."""

    lora_ext: Optional[LoraExtStackField] = InputField(default=None, input=Input.Connection, title=STACK_TITLE)

    def _lora_ext_timesteps(self, context):
        """The timesteps the denoise will iterate (InvokeAI's own scheduler set-up)."""
        try:
            unet_config = context.models.get_config(self.unet.unet.key)
            scheduler = get_scheduler(context=context, scheduler_info=self.unet.scheduler,
                                      scheduler_name=self.scheduler, seed=0, unet_config=unet_config)
            timesteps, _, _ = self.init_scheduler(scheduler, device=torch.device("cpu"), steps=self.steps,
                                                  denoising_start=self.denoising_start,
                                                  denoising_end=self.denoising_end, seed=0)
            return timesteps
        except Exception as exc:  # count timesteps as they come instead
            context.logger.warning(f"lora-ext: cannot read the schedule ({exc}); counting steps as they run")
            return None

    def invoke(self, context) -> LatentsOutput:
        specs = decode(self.lora_ext)
        if not specs:
            return super().invoke(context)
        unet = context.models.load(self.unet.unet).model
        session = _session({"unet": unet})
        clock = TimestepClock(self._lora_ext_timesteps(context))
        total = clock.total or self.steps
        session.use_specs(specs, total_steps=total)

        def pre(module, args, kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if t is not None:
                session.begin_step(min(clock.step(t), total - 1), total)

        hook = unet.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            return super().invoke(context)
        finally:
            hook.remove()
            session.end_run(restore=True)
