"""Plain copies in recycled, lazily freed mappings (``engine.plainbuf``).

A mapping goes back to the free list (its pages ``MADV_FREE``d: the kernel may zero them at any
time) only when no tensor, view or numpy array on it is left; were one left, a restore could
read zeros. The engine's bits with recycling equal those without, over many cycles.
"""
from __future__ import annotations

import gc

import pytest
import torch

import lora_ext
from lora_ext.engine import fuse, plainbuf

from test_engine import assert_bit_identical, state_bits
from test_engine_fastpass import _two_loras, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not plainbuf.ENABLED, reason="no MADV_FREE here")


@pytest.fixture
def fresh_pool(monkeypatch):
    plainbuf.clear()
    yield
    plainbuf.clear()


def test_recycled_only_when_nothing_holds_it(fresh_pool):
    t = plainbuf.empty((1024, 1024), torch.float16, 1 << 30)
    t.fill_(1.5)
    ptr = t.data_ptr()
    v = t[1:]
    a = v.numpy()
    del t, v
    gc.collect()
    assert plainbuf.free_bytes() == 0  # the numpy array still reads it
    assert float(a[0, 0]) == 1.5
    del a
    gc.collect()
    assert plainbuf.free_bytes() == 2 << 20
    u = plainbuf.empty((1024, 1024), torch.float16, 1 << 30)
    assert u.data_ptr() == ptr and plainbuf.free_bytes() == 0  # the same mapping, taken off the list
    w = plainbuf.empty((1024, 1024), torch.float16, 1 << 30)
    assert w.data_ptr() != ptr  # none spare: a new one


def test_free_list_is_bounded(fresh_pool):
    bufs = [plainbuf.empty((1 << 20,), torch.float16, 5 << 20) for _ in range(4)]  # 2 MB each, cap 5 MB
    del bufs
    gc.collect()
    assert plainbuf.free_bytes() == 4 << 20  # two kept, two dropped


def test_release_spare_memory_unmaps_the_spares(fresh_pool):
    import lora_ext.engine as engine

    def rss_kb():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))

    t = plainbuf.empty((16 << 20,), torch.float16, 1 << 30)  # 32 MB
    t.fill_(1.0)
    del t
    gc.collect()
    assert plainbuf.free_bytes() == 32 << 20
    before = rss_kb()
    assert engine.release_spare_memory() == 32 << 20
    gc.collect()
    assert plainbuf.free_bytes() == 0
    assert rss_kb() < before - 24 * 1024  # the lazily freed pages left RSS with the mapping
    mapped = plainbuf.stats["mapped"]
    u = plainbuf.empty((16 << 20,), torch.float16, 1 << 30)
    assert plainbuf.stats["mapped"] == mapped + 1  # nothing spare any more: a fresh mapping
    del u


def test_small_copies_are_plain_tensors(fresh_pool):
    t = plainbuf.empty((10, 10), torch.float16, 1 << 30)
    del t
    gc.collect()
    assert plainbuf.free_bytes() == 0


def test_engine_bits_with_recycled_copies(tmp_path, monkeypatch, one_thread, fresh_pool):  # noqa: F811
    unet, ref, entries, a, b = _two_loras(torch.float16, tmp_path)
    monkeypatch.setattr(fuse, "CHUNK", 4096)

    def cycles():
        out = []
        h = lora_ext.apply(unet, [(a, 1.0)], method="fuse")
        out.append(state_bits(unet))
        for i in range(3):
            h.set([(b, 0.7)] if i % 2 == 0 else [(a, 1.0), (b, 0.5)])  # from plain copies
            out.append(state_bits(unet))
            h.wait_records()
            h.set([(a, 0.9)])  # from compact records (the copies before were recycled)
            out.append(state_bits(unet))
            h.wait_records()
        h.remove()
        assert_bit_identical(unet, ref)
        del h
        gc.collect()
        return out

    monkeypatch.setattr(plainbuf, "ENABLED", False)
    want = cycles()
    monkeypatch.setattr(plainbuf, "ENABLED", True)
    monkeypatch.setattr(plainbuf, "MIN_BYTES", 0)  # every plain copy in a mapping
    s0 = dict(plainbuf.stats)
    for _ in range(2):
        got = cycles()
        for x, y in zip(want, got):
            for k in x:
                assert torch.equal(x[k].view(torch.int16), y[k].view(torch.int16)), k
    assert plainbuf.stats["reused"] > s0["reused"]  # mappings really were recycled
    assert plainbuf.stats["released"] > s0["released"]
