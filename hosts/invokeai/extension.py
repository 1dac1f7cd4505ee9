"""A denoise extension for InvokeAI's modular denoise (``ExtensionsManager``): per-step LoRA
strengths for anyone composing a denoise with extensions (InvokeAI's own node uses it when
``USE_MODULAR_DENOISE`` is set; lora-ext's denoise node works without it).

``LoraExtDenoiseExtension(specs)``: ``patch_unet`` puts the LoRAs on the UNet (on the fly)
for the whole denoise and takes them off after; its ``PRE_STEP`` callback moves them to the
step ``ctx.step_index``/``ctx.timestep`` is on.
"""
from contextlib import contextmanager

from invokeai.backend.stable_diffusion.extension_callback_type import ExtensionCallbackType
from invokeai.backend.stable_diffusion.extensions.base import ExtensionBase, callback

from lora_ext.hostmodel import HostModel, TimestepClock
from lora_ext.session import Session


class LoraExtDenoiseExtension(ExtensionBase):
    def __init__(self, specs):
        super().__init__()
        self.specs = list(specs)
        self.session = None
        self._clock = None

    @contextmanager
    def patch_unet(self, unet, original_weights):
        s = Session(None, method="onthefly", label="InvokeAI")
        s.load_model(HostModel({"unet": unet}, naming="diffusers", label="InvokeAI UNet"))
        s.use_specs(self.specs)
        self.session = s
        try:
            yield
        finally:
            self.session = None
            self._clock = None
            s.end_run(restore=True)

    @callback(ExtensionCallbackType.PRE_STEP)
    def pre_step(self, ctx):
        if self.session is None:
            return
        if self._clock is None:
            self._clock = TimestepClock(ctx.inputs.timesteps)
        total = self._clock.total or 1
        self.session.begin_step(min(self._clock.step(ctx.timestep), total - 1), total)
