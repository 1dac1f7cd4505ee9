"""Mirrors ConditioningOutput / LatentsOutput / FluxConditioningOutput (L446-454) of invokeai/app/invocations/primitives.py
(InvokeAI 6.14.2 from PyPI; read at invoke-ai/InvokeAI 8e71a8a5, which agrees for these parts)."""
from invokeai.app.invocations.baseinvocation import BaseInvocationOutput, invocation_output
from invokeai.app.invocations.fields import ConditioningField, FluxConditioningField, LatentsField, OutputField


@invocation_output("conditioning_output")
class ConditioningOutput(BaseInvocationOutput):
    conditioning: ConditioningField = OutputField(description="Conditioning tensor")

    @classmethod
    def build(cls, conditioning_name, mask=None):
        return cls(conditioning=ConditioningField(conditioning_name=conditioning_name, mask=mask))


@invocation_output("latents_output")
class LatentsOutput(BaseInvocationOutput):
    latents: LatentsField = OutputField(description="Latents tensor")
    width: int = OutputField(description="Width of output (px)")
    height: int = OutputField(description="Height of output (px)")

    @classmethod
    def build(cls, latents_name, latents, seed=None):
        return cls(latents=LatentsField(latents_name=latents_name, seed=seed), width=latents.size()[3] * 8,
                   height=latents.size()[2] * 8)


@invocation_output("flux_conditioning_output")
class FluxConditioningOutput(BaseInvocationOutput):
    conditioning: FluxConditioningField = OutputField(description="Conditioning tensor")

    @classmethod
    def build(cls, conditioning_name):
        return cls(conditioning=FluxConditioningField(conditioning_name=conditioning_name))
