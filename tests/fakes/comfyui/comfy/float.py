"""Mirrors comfy/float.py stochastic_rounding (ComfyUI 0.3.64): fp32, fp16 and bf16 are plain
casts (fp8 is stochastic; not used here)."""
import torch


def stochastic_rounding(value, dtype, seed=0):
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return value.to(dtype=dtype)
    return value.to(dtype=dtype)
