"""Mirrors invokeai/app/invocations/fields.py (InvokeAI 6.14.2 from PyPI; read at invoke-ai/InvokeAI 8e71a8a5, which agrees for these parts): ``InputField`` /
``OutputField`` (pydantic fields with UI extras; here a small record of the default and the
extras), ``Input`` (connection / direct / any), ``UIComponent``, ``FieldDescriptions``,
``ConditioningField``, ``LatentsField``, ``FluxConditioningField`` (L314-322)."""
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

_MISSING = object()


class Input(str, Enum):
    Connection = "connection"
    Direct = "direct"
    Any = "any"


class UIComponent(str, Enum):
    Textarea = "textarea"
    Slider = "slider"


class FieldDescriptions:
    clip = "CLIP (tokenizer, text encoder, LoRAs) and skipped layer count"
    unet = "UNet (scheduler, LoRAs)"
    compel_prompt = "Prompt to be parsed by Compel to create a conditioning tensor"
    steps = "Number of steps to run"
    lora_weight = "The weight at which the LoRA is applied to each model"
    t5_encoder = "T5 tokenizer and text encoder"
    transformer = "Transformer"
    flux_model = "Flux model (Transformer) to load"
    positive_cond = "Positive conditioning tensor"


class FieldInfo:
    def __init__(self, default=_MISSING, default_factory=None, **extra):
        self.default = default
        self.default_factory = default_factory
        self.extra = extra

    def make_default(self):
        if self.default_factory is not None:
            return self.default_factory()
        if self.default is _MISSING:
            raise TypeError("missing required field")
        return self.default


def InputField(default: Any = _MISSING, *, default_factory=None, title: Optional[str] = None,
               description: Optional[str] = None, input: Input = Input.Any, ui_type=None, ui_component=None,
               ui_hidden=False, ui_order=None, ge=None, le=None, gt=None, lt=None, **kwargs):
    return FieldInfo(default, default_factory, title=title, description=description, input=input,
                     ui_component=ui_component, ui_order=ui_order, ge=ge, le=le, gt=gt, lt=lt)


def OutputField(default: Any = _MISSING, *, title: Optional[str] = None, description: Optional[str] = None, **kwargs):
    return FieldInfo(default, None, title=title, description=description)


@dataclass
class ConditioningField:
    conditioning_name: str
    mask: Any = None


@dataclass
class LatentsField:
    latents_name: str
    seed: Optional[int] = None


@dataclass
class FluxConditioningField:
    conditioning_name: str
    mask: Any = None
