"""The documented seam (pluggy hookspecs) between the core, adapter plugins and host shims.

Adapter types: a plugin module defines ``@hookimpl def lora_ext_adapter_types()`` returning
its Adapter subclasses. Built-in types live in ``lora_ext.adapters``; a third-party package
registers the same way through the ``lora_ext`` setuptools entry-point group.
"""
import pluggy

PROJECT = "lora_ext"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lora_ext_adapter_types():
    """Return a list of Adapter subclasses this plugin provides."""


@hookspec(firstresult=True)
def lora_ext_explain_group(names, tensors, target_shape):
    """Explain a key group no registered type claimed (structural auto-detection).

    ``names``: frozenset of tensor names; ``tensors``: name -> Tensor; ``target_shape``: the
    shape of the target module's weight, or None when the module is unknown. Return an Adapter
    whose ``weight_shape()`` equals ``target_shape``, or None when it cannot explain the group.
    """
