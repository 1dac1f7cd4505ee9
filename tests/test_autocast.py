"""The engine's maths ignore the autocast context a host calls it from.

A1111 runs ``extra_networks.activate`` inside ``devices.autocast()`` and ``deactivate`` /
model switches outside it (modules/processing.py, v1.10); CPU bf16 autocast is its fp8-on-CPU
mode and puts matmuls and convolutions in the same autocast class as CUDA fp16 autocast.
Apply, per-step update and restore run here inside and outside it in every combination, on
fp16 and bf16 weights, with every adapter type of the engine tests: fused weights must equal
the fp32 reference rounded once, and restore must give the pristine bits back.
"""
from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch

import lora_ext
from lora_ext.engine.amp import exact_maths
from lora_ext.spec import Keyframes, LoraSpec
from test_engine import CYCLE_FILES, _shape, assert_bit_identical, state_bits, write_lora
from tiny_models import tiny_unet
import host_common

AUTOCAST = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
OUTSIDE = contextlib.nullcontext


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    unet = tiny_unet()
    folder = tmp_path_factory.mktemp("autocast")
    return {name: write_lora(folder / f"{name}.safetensors", [("unet", m, kind, _shape(unet, m)) for m in mods],
                             seed=300 + i, mag=0.3)
            for i, (name, (kind, mods)) in enumerate(CYCLE_FILES.items())}


def _specs(files):
    # keyframed strengths, so update() re-fuses between steps 0 and 1
    return [LoraSpec(name, path=path, unet=Keyframes(((0.4 + 0.1 * i, 0), (1.1 - 0.1 * i, 1))))
            for i, (name, path) in enumerate(sorted(files.items()))]


def _assert_fused_equals_reference(unet, pristine, specs, step, total):
    with exact_maths():
        ref = host_common.reference({"unet": pristine}, specs, step, total)["unet"]
    now, want = unet.state_dict(), ref.state_dict()
    for k, v in want.items():
        a, b = now[k].double(), v.double()
        if v.dtype == torch.float32:
            tol = 1e-6 * (1 + b.abs())  # fp32 maths; bf16 autocast would be off by ~1e-3
        else:  # one rounding of the same fp32 sum, summed in another order: at most one ulp apart
            tol = torch.finfo(v.dtype).eps * b.abs().clamp_min(torch.finfo(v.dtype).tiny)
        assert bool(((a - b).abs() <= tol).all()), f"{k}: fused value is not the fp32 reference rounded once"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("ctx", list(itertools.product(("in", "out"), repeat=3)),
                         ids=lambda c: "apply-{}_update-{}_restore-{}".format(*c))
def test_apply_update_restore_in_any_autocast_context(files, dtype, ctx):
    unet = tiny_unet().to(dtype)
    pristine = copy.deepcopy(unet)
    base = state_bits(unet)
    specs = _specs(files)
    apply_in, update_in, restore_in = ((AUTOCAST if c == "in" else OUTSIDE) for c in ctx)
    with apply_in():
        h = lora_ext.apply(unet, specs, method="fuse")
        h.update(0, 2)
    _assert_fused_equals_reference(unet, pristine, specs, 0, 2)
    with update_in():
        h.update(1, 2)
    _assert_fused_equals_reference(unet, pristine, specs, 1, 2)
    with restore_in():
        h.remove()
    assert_bit_identical(unet, base)


def test_session_switch_inside_autocast_restore_outside(files):
    """The A1111 sequence: activate (a switch of LoRA lists) inside autocast, the restore of
    "After a generation: restore" outside it."""
    unet = tiny_unet().to(torch.float16)
    base = state_bits(unet)
    specs = _specs(files)
    with AUTOCAST():
        h = lora_ext.apply(unet, specs[:3], method="auto")
        h.set(specs[2:])
    h.update(1, 3)
    h.remove()
    assert_bit_identical(unet, base)


def test_exact_maths_turns_autocast_off_only_inside():
    a = torch.randn(8, 8)
    with AUTOCAST():
        assert (a @ a).dtype == torch.bfloat16
        with exact_maths():
            assert (a @ a).dtype == torch.float32 and not torch.is_grad_enabled()
        assert (a @ a).dtype == torch.bfloat16


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("method", ["fuse", "auto", "onthefly"])
def test_inference_tensor_weights_forge_builds(files, method, workers, monkeypatch):
    """Forge builds its models under torch.inference_mode() (backend/loader.py), so every
    weight is an inference tensor, and activates LoRAs outside inference mode: in-place
    writes must still work, and restore stays bit-exact."""
    from lora_ext.engine import transact

    monkeypatch.setattr(transact, "_workers", lambda work: workers)  # worker threads too
    with torch.inference_mode():
        unet = tiny_unet()
        for p in unet.parameters():
            assert p.is_inference()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    specs = _specs(files)
    pristine = copy.deepcopy(unet)
    h = lora_ext.apply(unet, specs, method=method)
    h.update(0, 2)
    if method == "fuse":
        _assert_fused_equals_reference(unet, pristine, specs, 0, 2)
    with torch.inference_mode():  # Forge samples in inference mode
        from tiny_models import unet_out

        unet_out(unet)
    h.update(1, 2)
    h.remove()
    now = unet.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items())
