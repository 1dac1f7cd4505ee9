"""Mirrors the fields of invokeai/app/invocations/model.py (InvokeAI 6.14.2 from PyPI; read at invoke-ai/InvokeAI 8e71a8a5, which agrees for these parts):
ModelIdentifierField (key, hash, name, base, type, submodel_type), LoRAField (lora, weight),
UNetField (unet, scheduler, loras, seamless_axes, freeu_config), CLIPField (tokenizer,
text_encoder, skipped_layers, loras); for FLUX T5EncoderField (tokenizer, text_encoder, loras; L105-108)
and TransformerField (transformer, loras; L195-197)."""
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ModelIdentifierField:
    key: str
    hash: str = ""
    name: str = ""
    base: str = "sd-1"
    type: str = "main"
    submodel_type: Optional[str] = None


@dataclass
class LoRAField:
    lora: ModelIdentifierField
    weight: float


@dataclass
class UNetField:
    unet: ModelIdentifierField
    scheduler: ModelIdentifierField
    loras: List[LoRAField] = field(default_factory=list)
    seamless_axes: List[str] = field(default_factory=list)
    freeu_config: Optional[object] = None


@dataclass
class CLIPField:
    tokenizer: ModelIdentifierField
    text_encoder: ModelIdentifierField
    skipped_layers: int = 0
    loras: List[LoRAField] = field(default_factory=list)


@dataclass
class T5EncoderField:
    tokenizer: ModelIdentifierField
    text_encoder: ModelIdentifierField
    loras: List[LoRAField] = field(default_factory=list)


@dataclass
class TransformerField:
    transformer: ModelIdentifierField
    loras: List[LoRAField] = field(default_factory=list)
