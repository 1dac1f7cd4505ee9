"""The fast pass's shortcuts (issue 14) give the bits of the plain formulas.

* ``fuse._fused_block`` with one GEMM (W0 widened, the delta's GEMM adding to it: ``addmm_``)
  equals ``round(float(W0) + D)`` with ``D = up @ down`` computed first, wherever
  ``_addmm_exact`` says the BLAS allows it; a whole apply with the shortcut off writes the same
  weights.
* ``record.checksum`` (numpy's lane sums, one read) equals torch's wrapping int64 sums; the exception
  positions (numpy's repeat, low bits or-ed in) equal the ones ``repeat_interleave`` gives; a switch from compact records
  with the exceptions placed per block gives the same weights and restores exactly.
"""
from __future__ import annotations

import gc

import pytest
import torch

import lora_ext
from lora_ext.engine import fuse, record

from test_engine import FF, LIN, LIN_K, MID_Q, PROJ, _shape, assert_bit_identical, state_bits, write_lora
from tiny_models import UNET_CONFIG, tiny_unet

MODS = [LIN, LIN_K, FF, MID_Q, PROJ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rank", [1, 4, 32, 96])
def test_one_gemm_block_equals_delta_then_add(dtype, rank):
    g = torch.Generator().manual_seed(rank)
    for m, n in ((1, 320), (5, 77), (204, 1280), (819, 320), (33, 2048)):
        w0 = (torch.randn(m, n, generator=g) * 0.05).to(dtype)
        up = torch.randn(m, rank, generator=g) * 0.02
        down = torch.randn(rank, n, generator=g) * 0.02
        plan = [(up, down)]
        want = (torch.mm(up, down) + w0.float()).to(dtype)
        slow = fuse._fused_block(plan, 0, m, w0, torch.empty(m, n), one_gemm=False).to(dtype)
        assert torch.equal(record.int_view(slow), record.int_view(want))
        fast = fuse._fused_block(plan, 0, m, w0, torch.empty(m, n), one_gemm=True).to(dtype)
        assert torch.equal(record.int_view(fast), record.int_view(want)), (m, n)
    assert fuse._addmm_exact(204, 1280, rank, "cpu") in (True, False)


def test_addmm_check_can_say_no(monkeypatch):
    """A BLAS whose addmm sums in another order is caught (here: one that adds C first)."""
    real = torch.Tensor.addmm_
    monkeypatch.setattr(fuse, "_ADDMM_OK", {})

    def skewed(c, a, b, *, alpha=1, beta=1):  # C + (A @ B) as (C + A[:, :1] @ B[:1]) + rest: another order
        c.add_(torch.mm(a[:, :1], b[:1]), alpha=alpha)
        return real(c, a[:, 1:], b[1:], alpha=alpha, beta=beta)

    monkeypatch.setattr(torch.Tensor, "addmm_", skewed)
    assert fuse._addmm_exact(204, 1280, 8, "cpu") is False
    assert fuse._addmm_exact(204, 1280, 8, "cpu", -1.0) is False
    # and then the fast pass does not use it: the bits of the delta-then-add formula
    g = torch.Generator().manual_seed(3)
    w0 = (torch.randn(204, 1280, generator=g) * 0.05).half()
    plan = [(torch.randn(204, 8, generator=g) * 0.02, torch.randn(8, 1280, generator=g) * 0.02)]
    got = fuse._fused_block(plan, 0, 204, w0, torch.empty(204, 1280), one_gemm=True).half()
    want = (torch.mm(*plan[0]) + w0.float()).half()
    assert torch.equal(record.int_view(got), record.int_view(want))
    monkeypatch.setattr(torch.Tensor, "addmm_", real)
    monkeypatch.setattr(fuse, "_ADDMM_OK", {})
    # small GEMMs on this machine's MKL: some shapes say no (rows <= ~11), the big ones yes;
    # whatever they say, the result above holds (tested for every shape in the test before)
    assert fuse._addmm_exact(204, 1280, 8, "cpu") in (True, False)


def medium_unet(dtype):
    """The tiny UNet's layout, 8x wider (64x64 to 512x64 weights): small deltas give sparse
    block records (the tiny one's weights are small enough for 8-bit codes)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(UNET_CONFIG, block_out_channels=(64, 128), cross_attention_dim=64, norm_num_groups=32,
               attention_head_dim=8)
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).eval().to(dtype)


@pytest.fixture
def one_thread():
    """One intra-op thread: block-sized GEMMs on a shared 2-core box stall in OpenMP barriers
    (100x slower under load) with two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _two_loras(dtype, tmp_path):
    """A medium UNet, its bits, and two rank-8 LoRA files on every third attention layer."""
    unet = medium_unet(dtype)
    ref = state_bits(unet)
    mods = [n for n, m in unet.named_modules()
            if ".attentions." in n and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][::3]
    entries = [("unet", m, "lora", _shape(unet, m)) for m in mods]
    a = write_lora(tmp_path / "a.safetensors", entries, seed=1, mag=0.02, rank=8)
    b = write_lora(tmp_path / "b.safetensors", entries, seed=2, mag=0.02, rank=8)
    return unet, ref, entries, a, b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_apply_and_switch_same_bits_with_and_without_shortcuts(dtype, tmp_path, monkeypatch, one_thread):
    unet, ref, entries, a, b = _two_loras(dtype, tmp_path)
    monkeypatch.setattr(fuse, "CHUNK", 4096)  # several row blocks per weight

    def run():
        h = lora_ext.apply(unet, [(a, 1.0)], method="fuse")
        fa = state_bits(unet)
        h.wait_records()
        # sparse block records with exceptions past the first block: the per-block placement runs
        assert h.record_schemes.get("sparse", 0) >= len(entries) // 2, h.record_schemes
        assert any(m.rec_w.n_exceptions and m.rec_w.exception_positions()[-1] >= 4096 for m in h._mods.values())
        h.set([(b, 0.7)])  # from compact records: decoded per block, exceptions per block
        fb = state_bits(unet)
        h.wait_records()
        assert h.record_schemes.get("plain", 0) == 0
        h.set([(a, 1.0), (b, 0.5)])  # two items: the delta, then the add
        fab = state_bits(unet)
        h.wait_records()
        w0 = {m.key[1]: fuse.restore_weight(m.rec_w, m.module.weight) for m in h._mods.values()}
        for name, w in w0.items():  # decoded whole (the synchronous block pass), not written
            assert torch.equal(w.view(-1).view(torch.uint8), ref[name + ".weight"].view(-1).view(torch.uint8))
        h.remove()  # from compact records: the synchronous block pass
        assert_bit_identical(unet, ref)
        del h
        gc.collect()
        return fa, fb, fab

    fast = run()
    monkeypatch.setattr(fuse, "ADDMM_FUSE", False)
    slow = run()
    # the synchronous engine (records built as the weights are written, no fast pass)
    h = lora_ext.apply(unet, [(a, 1.0)], method="fuse", record_buffer=0)
    sync_a = state_bits(unet)
    h.set([(b, 0.7)])
    sync_b = state_bits(unet)
    h.remove()
    assert_bit_identical(unet, ref)
    for k in ref:
        for x, y in ((fast[0], slow[0]), (fast[1], slow[1]), (fast[2], slow[2]), (fast[0], sync_a),
                     (fast[1], sync_b)):
            ib = {2: torch.int16, 4: torch.int32}[ref[k].element_size()] if ref[k].is_floating_point() else None
            assert torch.equal(x[k].view(ib), y[k].view(ib)) if ib else torch.equal(x[k], y[k]), k
    assert any(not torch.equal(fast[0][k], ref[k]) for k in ref)


# sizes in words: below the lane sums' minimum (4 rows of 1024), a whole number of rows, rows and
# an odd or even tail; and element counts whose bytes are no whole number of words (widened)
@pytest.mark.parametrize("n", [0, 1, 3, 8, 12, 4096, 4097, 4 * 4096, 4 * 4097, 4 * (8192 + 3), 4 * (5120 + 1022),
                               4 * 6000 + 2, 20001, 1 << 18])
def test_checksum_matches_torch_sums(n):
    x = (torch.randn(n) * 1000).half()
    bits = record.int_view(x)
    flat = bits.reshape(-1)
    v = flat.view(torch.int64) if n and (n * 2) % 8 == 0 else flat.to(torch.int64)
    want = (int(v.sum()), int(v[1::2].sum()))
    assert record.checksum(bits) == want
    # int64 wrap-around: sums far beyond 2**63
    big = torch.full((64,), 2 ** 62 + 12345, dtype=torch.int64)
    assert record.checksum(big) == (int(big.sum()), int(big[1::2].sum()))
    big = torch.full((8192 + 5,), 2 ** 62 + 12345, dtype=torch.int64)  # (the lane sums wrap too)
    big[1::2] = -(2 ** 63) + 7
    assert record.checksum(big) == (int(big.sum()), int(big[1::2].sum()))
    # a change the first sum cannot see (+1 and -1 in one lane of two words) is seen by the second
    y = x.clone()
    if n >= 4 * 4096 + 8 and n % 4 == 0:
        yb = record.int_view(y).view(torch.int64)
        yb[4] += 1
        yb[5] -= 1
        assert record.checksum(record.int_view(y))[0] == want[0]
        assert record.checksum(record.int_view(y)) != want


def test_exception_positions_numpy_equals_torch():
    g = torch.Generator().manual_seed(0)
    n = (1 << 20) + 777
    idx = torch.sort(torch.randperm(n, generator=g)[:20000]).values
    rec = record.Record(torch.float16, (n,), bits=0)
    record.store_exceptions(rec, idx, torch.zeros(idx.numel(), dtype=torch.int16), n)
    assert torch.equal(rec.exception_positions(), idx)
    counts = rec.exc_blocks.to(torch.int64)
    blocks = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    assert torch.equal(blocks * record.BLOCK + torch.bitwise_and(rec.exc_lo.to(torch.int64), 0xFFFF), idx)


def test_decode_falls_back_when_the_one_gemm_estimate_is_off(tmp_path, monkeypatch, one_thread):
    """Should the fused-subtraction estimate ever differ from ``float(Wf) - D`` (a BLAS whose
    order ``_addmm_exact`` misjudged), the block checksum catches it, the block is decoded the
    plain way, and switch and remove stay exact."""
    unet, ref, entries, a, b = _two_loras(torch.float16, tmp_path)
    monkeypatch.setattr(fuse, "CHUNK", 4096)
    h = lora_ext.apply(unet, [(b, 0.7)], method="fuse", record_buffer=0)
    want_b = state_bits(unet)
    h.remove()
    h = lora_ext.apply(unet, [(a, 1.0)], method="fuse")
    h.wait_records()
    real = torch.Tensor.addmm_
    calls = []

    def skewed(c, m1, m2, *, alpha=1, beta=1):  # the subtraction in another order: off by ulps
        calls.append(alpha)
        if alpha == -1.0:
            return c.sub_(torch.mm(m1[:, :1], m2[:1])).sub_(torch.mm(m1[:, 1:], m2[1:]))
        return real(c, m1, m2, alpha=alpha, beta=beta)

    monkeypatch.setattr(fuse, "_addmm_exact", lambda m, n, rank, device, alpha=1.0: alpha == -1.0)
    monkeypatch.setattr(torch.Tensor, "addmm_", skewed)
    h.set([(b, 0.7)])  # decoded from compact records
    assert -1.0 in calls
    now = state_bits(unet)
    for k in ref:
        assert torch.equal(now[k].view(torch.int16), want_b[k].view(torch.int16)), k
    h.wait_records()
    h.remove()
    monkeypatch.setattr(torch.Tensor, "addmm_", real)
    assert_bit_identical(unet, ref)
