"""The fuse engine keeps a LoRA's factors as the file stores them (no resident fp32 copies).

An fp16 / bf16 file's ``lora_up`` / ``lora_down`` used to be widened to fp32 once and kept for
as long as the LoRA was applied (2x the file's size: ~0.1x the patched bytes of an SD1.5
rank-32 LoRA). Now the contribution keeps the file's own tensors and every plan widens them into
its block buffers. The fused weights, the records and the restore must be the bits of the old
way (``lowrank_raw`` switched off), and nothing fp32 may stay behind the contribution.
"""
from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_ext
from lora_ext.adapters.lora import LoRAAdapter
from lora_ext.engine import fuse

from test_engine import assert_bit_identical, state_bits
from test_engine_fastpass import _two_loras, one_thread  # noqa: F401 (fixture)


def _as(path, dtype, out):
    sd = {k: (v.to(dtype) if v.dim() > 1 else v) for k, v in load_file(path).items()}
    save_file(sd, str(out))
    return str(out)


def _cycle(unet, a, b):
    h = lora_ext.apply(unet, [(a, 1.0)], method="fuse")
    got = [state_bits(unet)]
    h.set([(b, 0.7)])  # from plain copies (the worker may be mid-way)
    got.append(state_bits(unet))
    h.wait_records()
    h.set([(a, 1.0), (b, 0.5)])  # from compact records, two items
    got.append(state_bits(unet))
    h.wait_records()
    got.append({n: (m.rec_w.scheme, m.rec_w.nbytes) for n, m in h._mods.items()})
    stored = [c.lowrank_stored(tuple(m.module.weight.shape)) for m in h._mods.values() for c in m.contribs]
    h.remove()
    del h
    gc.collect()
    return got, stored


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
def test_file_factors_give_the_bits_of_fp32_copies(tmp_path, monkeypatch, one_thread, file_dtype,  # noqa: F811
                                                   model_dtype):
    unet, ref, entries, a, b = _two_loras(model_dtype, tmp_path)
    a = _as(a, file_dtype, tmp_path / "a2.safetensors")
    b = _as(b, file_dtype, tmp_path / "b2.safetensors")
    monkeypatch.setattr(fuse, "CHUNK", 4096)  # several row blocks per weight
    raw_way, stored = _cycle(unet, a, b)
    assert_bit_identical(unet, ref)
    assert stored and all(up.dtype == file_dtype and down.dtype == file_dtype for up, down, _ in stored)
    monkeypatch.setattr(LoRAAdapter, "lowrank_raw", lambda self: None)  # the old way: fp32 copies kept
    fp32_way, stored32 = _cycle(unet, a, b)
    assert_bit_identical(unet, ref)
    assert all(up.dtype == torch.float32 for up, _, _ in stored32)
    for got, want in zip(raw_way, fp32_way):
        assert got.keys() == want.keys()
        for k in want:
            if isinstance(want[k], torch.Tensor):
                assert torch.equal(got[k].view(torch.uint8) if got[k].dtype.is_floating_point else got[k],
                                   want[k].view(torch.uint8) if want[k].dtype.is_floating_point else want[k]), k
            else:
                assert got[k] == want[k], k


def test_no_fp32_copy_stays_behind_an_fp16_file(tmp_path, one_thread):  # noqa: F811
    unet, ref, entries, a, _ = _two_loras(torch.float16, tmp_path)
    a = _as(a, torch.float16, tmp_path / "a16.safetensors")
    h = lora_ext.apply(unet, [(a, 1.0)], method="fuse")
    h.wait_records()
    n = 0
    for m in h._mods.values():
        for c in m.contribs:
            shape = tuple(m.module.weight.shape)
            up, down, scale = c.lowrank_stored(shape)
            file_up = c.adapter.tensors["lora_up.weight"]
            # the file's own storage, not a copy
            assert up.untyped_storage().data_ptr() == file_up.untyped_storage().data_ptr()
            assert up.dtype == torch.float16 and down.dtype == torch.float16
            up32, down32, scale32 = c.lowrank(shape)  # the fp32 form: adapter.lowrank()'s values
            ref_up, ref_down, ref_scale = c.adapter.lowrank()
            assert torch.equal(up32, ref_up.reshape(up32.shape)) and torch.equal(down32, ref_down.reshape(down32.shape))
            assert scale32 == ref_scale and c.lowrank_rank(shape) == up.shape[1]
            n += 1
    assert n == len(entries)
    h.remove()
    assert_bit_identical(unet, ref)


def test_raw_factors_only_where_they_belong_to_the_lowrank_in_force():
    from lora_ext.engine.contrib import _raw_factors

    g = torch.Generator().manual_seed(0)
    tensors = {"lora_up.weight": torch.randn(6, 2, generator=g).half(),
               "lora_down.weight": torch.randn(2, 5, generator=g).half()}
    plain = LoRAAdapter(tensors)
    up, down, _ = _raw_factors(plain)
    assert up.data_ptr() == tensors["lora_up.weight"].data_ptr()

    class Doubled(LoRAAdapter):  # changes the factors, inherits lowrank_raw: must not get raw ones
        def lowrank(self):
            up, down, s = super().lowrank()
            return up * 2, down, s

    assert _raw_factors(Doubled(tensors)) is None

    class Wrapper:  # reaches lowrank_raw only through __getattr__
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def lowrank(self):
            up, down, s = self.inner.lowrank()
            return -up, down, s

    assert _raw_factors(Wrapper(plain)) is None

    from lora_ext.deltas import SwappedHalves, swap_halves

    up_s, down_s, _ = _raw_factors(SwappedHalves(plain))  # its own lowrank_raw: the rows exchanged
    assert up_s.dtype == torch.float16 and torch.equal(up_s, swap_halves(tensors["lora_up.weight"]))
    assert torch.equal(up_s.float(), SwappedHalves(plain).lowrank()[0])
