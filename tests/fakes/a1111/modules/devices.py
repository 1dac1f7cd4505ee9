"""Mirrors ``autocast`` of modules/devices.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1.

The real one returns ``torch.autocast("cuda")`` for fp16 (the default on CUDA),
``torch.autocast("cpu", dtype=torch.bfloat16)`` when fp8 storage runs on the CPU, and a null
context for fp32 / ``--no-half``. The fake always takes the CPU bf16 branch: it puts matmuls
and convolutions in the same autocast class as CUDA fp16 autocast, which is what an extension
that fuses weights inside ``extra_networks.activate`` has to survive.
"""
import contextlib

import torch

enabled = True  # tests may switch the fake's autocast off (A1111 --no-half / fp32)


def autocast(disable=False):
    if disable or not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def without_autocast(disable=False):
    return torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") and not disable \
        else contextlib.nullcontext()
