"""Mirrors invokeai/backend/stable_diffusion/extensions_manager.py (InvokeAI 6.14.2 from PyPI; read at invoke-ai/InvokeAI 8e71a8a5, which agrees for these parts):
extensions' callbacks ordered per type (stable by ``order``), ``run_callback(type, ctx)``,
``patch_extensions`` and ``patch_unet`` entering every extension's context manager, then
copying back the weights saved in OriginalWeightsStorage."""
from contextlib import ExitStack, contextmanager

import torch


class OriginalWeightsStorage:
    def __init__(self, cached_weights=None):
        self._weights = {}
        self._changed_weights = set()
        if cached_weights:
            self._weights.update(cached_weights)

    def save(self, key, weight, copy=True):
        self._changed_weights.add(key)
        if key in self._weights:
            return
        self._weights[key] = weight.detach().to(device="cpu", copy=copy)

    def get_changed_weights(self):
        for key in self._changed_weights:
            yield key, self._weights[key]


class ExtensionsManager:
    def __init__(self, is_canceled=None):
        self._is_canceled = is_canceled
        self._extensions = []
        self._ordered_callbacks = {}

    def add_extension(self, extension):
        self._extensions.append(extension)
        self._ordered_callbacks = {}
        for ext in self._extensions:
            for callback_type, callbacks in ext.get_callbacks().items():
                self._ordered_callbacks.setdefault(callback_type, []).extend(callbacks)
        for callback_type, callbacks in self._ordered_callbacks.items():
            self._ordered_callbacks[callback_type] = sorted(callbacks, key=lambda x: x.metadata.order)

    def run_callback(self, callback_type, ctx):
        for cb in self._ordered_callbacks.get(callback_type, []):
            cb.function(ctx)

    @contextmanager
    def patch_extensions(self, ctx):
        with ExitStack() as exit_stack:
            for ext in self._extensions:
                exit_stack.enter_context(ext.patch_extension(ctx))
            yield None

    @contextmanager
    def patch_unet(self, unet, cached_weights=None):
        original_weights = OriginalWeightsStorage(cached_weights)
        try:
            with ExitStack() as exit_stack:
                for ext in self._extensions:
                    exit_stack.enter_context(ext.patch_unet(unet, original_weights))
                yield None
        finally:
            with torch.no_grad():
                for param_key, weight in original_weights.get_changed_weights():
                    unet.get_parameter(param_key).copy_(weight)
