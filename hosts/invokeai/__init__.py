"""lora-ext's InvokeAI node pack (``nodes``) and denoise extension (``extension``).

InvokeAI loads every folder of its ``nodes/`` directory as a package and registers the
invocations its ``__init__.py`` imports: link or copy this folder there (see README,
"Install into a host"). Imported anywhere else (``lora_ext.hosts.invokeai`` without InvokeAI),
it imports nothing.
"""
import importlib.util
import os
import sys


def _lora_ext_importable() -> bool:
    try:
        import lora_ext  # noqa: F401
    except ImportError:
        # linked from a lora-ext checkout into InvokeAI's nodes/: use that checkout
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
        if os.path.isdir(os.path.join(root, "lora_ext")):
            sys.path.insert(0, root)
            return True
        return False
    return True


if importlib.util.find_spec("invokeai") is not None and _lora_ext_importable():
    from .nodes import (  # noqa: F401
        LoraExtCompelInvocation,
        LoraExtDenoiseLatentsInvocation,
        LoraExtFluxDenoiseInvocation,
        LoraExtFluxTextEncoderInvocation,
        LoraExtLoaderInvocation,
        LoraExtSDXLCompelInvocation,
    )
