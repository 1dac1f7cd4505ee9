"""Loaded LoRA files kept between applies (``engine.lora_cache``): a repeated apply of an unchanged
file does not read it again, a changed file is read again, and a cached apply writes the same
bits as an uncached one."""
from __future__ import annotations

import copy
import gc
import os

import pytest
import torch

import lora_ext
from lora_ext.engine import handle as handle_mod
from lora_ext.engine import lora_cache

from test_engine import FF, LIN, LIN_K, MID_Q, PROJ, _shape, assert_bit_identical, state_bits, write_lora
from tiny_models import tiny_unet

MODS = [LIN, LIN_K, FF, MID_Q, PROJ]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("LORA_EXT_LORA_CACHE_BYTES", raising=False)
    lora_cache.configure(None, 16)
    lora_cache.clear()
    yield
    lora_cache.configure(None, 16)
    lora_cache.clear()


@pytest.fixture
def loads(monkeypatch):
    """Counts the files the engine reads (``load_lora`` calls)."""
    seen = []
    real = handle_mod.load_lora

    def counting(path, *a, **kw):
        seen.append(os.path.abspath(os.fspath(path)))
        return real(path, *a, **kw)

    monkeypatch.setattr(handle_mod, "load_lora", counting)
    return seen


def _files(unet, tmp_path):
    entries = [("unet", m, "lora", _shape(unet, m)) for m in MODS]
    a = write_lora(tmp_path / "a.safetensors", entries, seed=1, mag=0.3)
    b = write_lora(tmp_path / "b.safetensors", entries, seed=2, mag=0.3)
    return a, b, entries


def _apply_remove(unet, path, **kw):
    h = lora_ext.apply(unet, [(path, 1.0)], method="fuse", **kw)
    bits = state_bits(unet)
    h.wait_records()
    h.remove()
    del h
    gc.collect()  # the weak cache (models.cached_lora) forgets the file: only lora_cache holds it
    return bits


def test_repeated_apply_reads_once_and_matches_uncached(tmp_path, loads):
    unet = tiny_unet().half()
    ref = state_bits(unet)
    a, _, _ = _files(unet, tmp_path)
    first = _apply_remove(unet, a)
    hits0 = lora_cache.info()["hits"]
    second = _apply_remove(unet, a)
    assert loads == [os.path.abspath(a)]  # the second apply used the cached file
    assert lora_cache.info()["hits"] == hits0 + 1
    assert_bit_identical(unet, ref)
    # uncached (cache off): the same fused bits
    lora_cache.configure(0)
    lora_cache.clear()
    third = _apply_remove(unet, a)
    assert len(loads) == 2
    for k in ref:
        assert torch.equal(first[k].view(torch.int16), second[k].view(torch.int16)), k
        assert torch.equal(first[k].view(torch.int16), third[k].view(torch.int16)), k
    assert any(not torch.equal(first[k], ref[k]) for k in ref)  # the LoRA did change weights
    assert_bit_identical(unet, ref)


def test_changed_file_is_read_again(tmp_path, loads):
    unet = tiny_unet().half()
    ref = state_bits(unet)
    a, b, entries = _files(unet, tmp_path)
    fused_a = _apply_remove(unet, a)
    fused_b = _apply_remove(unet, b)
    stale0 = lora_cache.info()["stale"]  # (process-wide counts: other tests' files too)
    # rewrite a's path with b's tensors (same size), and give it a's old mtime: the inode /
    # change time still tell the files apart
    st = os.stat(a)
    os.replace(write_lora(tmp_path / "tmp.safetensors", entries, seed=2, mag=0.3), a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(a).st_size == st.st_size
    again = _apply_remove(unet, a)
    assert loads.count(os.path.abspath(a)) == 2
    assert lora_cache.info()["stale"] == stale0 + 1
    for k in ref:
        assert torch.equal(again[k].view(torch.int16), fused_b[k].view(torch.int16)), k
    assert any(not torch.equal(again[k], fused_a[k]) for k in ref)
    assert_bit_identical(unet, ref)


def test_rewritten_in_place_is_read_again(tmp_path, loads):
    unet = tiny_unet().half()
    a, _, entries = _files(unet, tmp_path)
    _apply_remove(unet, a)
    data = open(write_lora(tmp_path / "c.safetensors", entries, seed=3, mag=0.3), "rb").read()
    with open(a, "r+b") as fh:  # same inode, new bytes
        fh.write(data)
        fh.truncate()
    ref = state_bits(unet)
    direct = copy.deepcopy(unet)
    h = lora_ext.apply(direct, [(str(tmp_path / "c.safetensors"), 1.0)], method="fuse", record_buffer=0)
    got = _apply_remove(unet, a)
    assert loads.count(os.path.abspath(a)) == 2
    want = state_bits(direct)
    for k in ref:
        assert torch.equal(got[k].view(torch.int16), want[k].view(torch.int16)), k
    h.remove()


def test_set_within_a_handle_sees_a_changed_file(tmp_path, loads):
    unet = tiny_unet().half()
    ref = state_bits(unet)
    a, b, entries = _files(unet, tmp_path)
    fused_b = _apply_remove(unet, b)
    h = lora_ext.apply(unet, [(a, 1.0)], method="fuse")
    os.replace(write_lora(tmp_path / "tmp.safetensors", entries, seed=2, mag=0.3), a)
    h.set([(a, 1.0)])  # the same path, other bytes: re-read and re-fused
    now = state_bits(unet)
    for k in ref:
        assert torch.equal(now[k].view(torch.int16), fused_b[k].view(torch.int16)), k
    h.remove()
    assert_bit_identical(unet, ref)


def test_bounds(tmp_path, loads, monkeypatch):
    unet = tiny_unet().half()
    a, b, _ = _files(unet, tmp_path)
    _apply_remove(unet, a)
    size = lora_cache.info()["bytes"]
    assert size > 0
    lora_cache.configure(None, 1)  # one file at most: b pushes a out
    evicted0 = lora_cache.info()["evicted"]
    _apply_remove(unet, b)
    assert lora_cache.info()["files"] == 1 and lora_cache.info()["evicted"] == evicted0 + 1
    _apply_remove(unet, a)
    assert loads.count(os.path.abspath(a)) == 2
    lora_cache.configure(None, 16)
    lora_cache.clear()
    monkeypatch.setenv("LORA_EXT_LORA_CACHE_BYTES", str(size - 1))  # too big to keep
    _apply_remove(unet, a)
    assert lora_cache.info()["files"] == 0
    monkeypatch.setenv("LORA_EXT_LORA_CACHE_BYTES", "0")
    _apply_remove(unet, b)
    assert lora_cache.info()["files"] == 0
    monkeypatch.setenv("LORA_EXT_LORA_CACHE_BYTES", "1G")
    assert lora_cache.bound() == float(1 << 30)
    monkeypatch.setenv("LORA_EXT_LORA_CACHE_BYTES", "0.5x")
    assert lora_cache.bound() == lora_cache.DEFAULT_BYTES / 2
