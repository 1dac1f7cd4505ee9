"""lora-ext: every LoRA type, in every Stable Diffusion host.

The core (this package) never imports a host. Adapter types live in ``lora_ext.adapters`` and
host shims in ``lora_ext.hosts``.
"""
import os as _os

# In the source tree (an A1111 extension folder, a ComfyUI custom node, a git checkout) the
# design card keeps adapters/ and hosts/ beside this package; an installed wheel puts them
# inside it. Extending __path__ makes `lora_ext.adapters` resolve the same way in both cases,
# without ever exposing a top-level `adapters` module that could clash with a host's own.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "adapters")) and _os.path.isfile(
    _os.path.join(_root, "adapters", "__init__.py")
):
    __path__.append(_root)

__version__ = "0.1.0"

from .errors import LoraExtError, LoraFileError, BaseModelMismatch, AdapterError  # noqa: E402
from .prompt import parse_prompt, format_tag, PromptSyntaxError  # noqa: E402
from .resolve import LoraNotFound  # noqa: E402

__all__ = ["LoraExtError", "LoraFileError", "BaseModelMismatch", "AdapterError", "__version__",
           "parse_prompt", "format_tag", "PromptSyntaxError", "LoraNotFound"]

__all__ += ["apply", "Handle"]


def __getattr__(name):
    # ``lora_ext.apply`` / ``lora_ext.Handle`` without importing the engine (and torch) up front
    if name in ("apply", "Handle"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'lora_ext' has no attribute {name!r}")
