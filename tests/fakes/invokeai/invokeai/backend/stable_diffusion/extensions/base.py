"""Mirrors invokeai/backend/stable_diffusion/extensions/base.py (InvokeAI 6.14.2 from PyPI; read at invoke-ai/InvokeAI 8e71a8a5, which agrees for these parts):
``@callback(type, order)`` marks methods, ``ExtensionBase`` collects them per type,
``patch_extension(ctx)`` and ``patch_unet(unet, original_weights)`` are context managers
(weights saved in ``original_weights`` are restored upstream)."""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable


@dataclass
class CallbackMetadata:
    callback_type: object
    order: int


@dataclass
class CallbackFunctionWithMetadata:
    metadata: CallbackMetadata
    function: Callable


def callback(callback_type, order: int = 0):
    def _decorator(function):
        function._ext_metadata = CallbackMetadata(callback_type=callback_type, order=order)
        return function

    return _decorator


class ExtensionBase:
    def __init__(self):
        self._callbacks = {}
        for func_name in dir(self):
            func = getattr(self, func_name)
            metadata = getattr(func, "_ext_metadata", None)
            if metadata is not None and isinstance(metadata, CallbackMetadata):
                self._callbacks.setdefault(metadata.callback_type, []).append(CallbackFunctionWithMetadata(metadata, func))

    def get_callbacks(self):
        return self._callbacks

    @contextmanager
    def patch_extension(self, ctx):
        yield None

    @contextmanager
    def patch_unet(self, unet, original_weights):
        yield
