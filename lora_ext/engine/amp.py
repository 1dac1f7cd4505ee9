"""Exact maths whatever autocast context a host calls the engine from.

A1111 activates extra networks inside ``devices.autocast()`` (fp16 autocast on CUDA, bf16 on
CPU in its fp8 mode) and deactivates them outside it. Under autocast the engine's matmuls
would run in half precision: fused weights stop being fp32 maths, and a record made inside
autocast no longer reproduces the pristine weight when it is decoded outside (measured: fp16
weights off by up to 9e-2 after such a restore). Every entry point therefore switches
autocast off, for each device type it is on for, for the length of the call. Autocast state
is per thread, so worker threads the engine starts are already outside it.
"""
from __future__ import annotations

import contextlib
import functools

import torch

# device types torch can autocast; a type this torch does not know is skipped
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "privateuseone")


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):  # torch < 2.4: no per-device query
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        if device_type == "cuda":
            return bool(torch.is_autocast_enabled())
        return False


@contextlib.contextmanager
def exact_maths(inference: bool = False):
    """No autograd and no autocast, on every device type, inside the block.

    ``inference``: the weights are inference tensors (Forge builds its models under
    ``torch.inference_mode()``, backend/loader.py), which may only be written in place inside
    inference mode; so the block runs in it.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode() if inference else torch.no_grad())
        for device_type in _DEVICE_TYPES:
            if _autocast_on(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def holds_inference_tensors(modules) -> bool:
    """Whether any weight of ``modules`` (objects with ``weight``) is an inference tensor."""
    for m in modules:
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_inference():
            return True
    return False


def without_autocast(fn):
    """Decorator for engine methods: run ``fn`` inside :func:`exact_maths` (in inference mode
    when the object's ``_inference`` says its weights are inference tensors)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        check = getattr(self, "needs_inference_mode", None)
        with exact_maths(bool(check()) if check is not None else False):
            return fn(self, *args, **kwargs)

    return wrapper
