"""Block buffers and plan factors from reused arenas (``fuse._arena``) give the bits of fresh ones.

With arenas pooled, the buffers of one module's pass (the fp32 block buffers, the decoded block,
the comparison mask, the scaled ``up`` factors of the old and the new plan) are the previous
pass's, on the caller's thread, on worker threads and on the compactor, interleaved. A buffer
handed to two users at once, or a plan factor read after its arena went back to the pool, would
show as other fused bits or a restore that is not exact.
"""
from __future__ import annotations

import gc

import pytest
import torch

import lora_ext
from lora_ext.engine import fuse, transact

from test_engine import assert_bit_identical, state_bits
from test_engine_fastpass import _two_loras, one_thread  # noqa: F401 (fixture)


def _cycle(unet, a, b):
    h = lora_ext.apply(unet, [(a, 1.0)], method="fuse")
    fa = state_bits(unet)
    h.set([(b, 0.7)])  # from plain copies (the worker may be mid-way)
    fb = state_bits(unet)
    h.wait_records()
    h.set([(a, 1.0), (b, 0.5)])  # from compact records: decoded per block; two items
    fab = state_bits(unet)
    h.wait_records()
    h.set([(b, 0.7)])
    fb2 = state_bits(unet)
    h.remove()
    del h
    gc.collect()
    return fa, fb, fab, fb2


@pytest.mark.parametrize("workers", [1, 2])
def test_pooled_arenas_give_the_bits_of_fresh_ones(tmp_path, monkeypatch, one_thread, workers):  # noqa: F811
    unet, ref, entries, a, b = _two_loras(torch.float16, tmp_path)
    monkeypatch.setattr(fuse, "CHUNK", 4096)  # several row blocks per weight
    monkeypatch.setattr(transact, "WORKERS", workers)
    monkeypatch.setattr(transact, "PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fuse, "ARENAS_KEPT", 0)
    fresh = _cycle(unet, a, b)
    assert_bit_identical(unet, ref)
    monkeypatch.setattr(fuse, "ARENAS_KEPT", 4)
    taken, seen = [], []
    real = fuse._Arena.get

    def spy(self, name, n, dtype, device, shape=None):
        t = real(self, name, n, dtype, device, shape)
        seen.append(self)  # (kept alive: no two arenas share an id)
        taken.append((id(self), name))
        # no other buffer of this arena shares the memory handed out
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        for other, b in self.bufs.items():
            if other != name:
                assert b.data_ptr() + b.numel() <= lo or hi <= b.data_ptr(), (name, other)
        return t

    monkeypatch.setattr(fuse._Arena, "get", spy)
    for _ in range(2):  # the second cycle runs on the first one's buffers
        pooled = _cycle(unet, a, b)
        assert_bit_identical(unet, ref)
        for x, y in zip(fresh, pooled):
            for k in x:
                assert torch.equal(x[k].view(torch.int16), y[k].view(torch.int16)), k
    assert fuse._ARENAS, "nothing was pooled"
    # the pool really was reused: one arena served several passes
    per_arena = {}
    for aid, name in taken:
        per_arena.setdefault(aid, []).append(name)
    assert max(v.count("d") for v in per_arena.values()) > 1
    fuse._ARENAS.clear()


def test_arena_buffers_grow_and_keep_their_contents_apart():
    ar = fuse._Arena()
    x = ar.get("d", 10, torch.float32, "cpu")
    y = ar.get("f", 10, torch.float32, "cpu")
    x.fill_(1.0)
    y.fill_(2.0)
    assert torch.equal(x, torch.ones(10)) and x.data_ptr() != y.data_ptr()
    big = ar.get("d", 1000, torch.float32, "cpu", (10, 100))  # grown: a new buffer
    assert big.shape == (10, 100) and ar.bufs["d"].numel() >= 4000
    again = ar.get("d", 5, torch.float16, "cpu")  # smaller, other dtype: the same memory
    assert again.data_ptr() == big.data_ptr() and again.dtype == torch.float16
    with fuse._arena("cpu") as a1:
        with fuse._arena("cpu") as a2:
            assert a1 is not a2
