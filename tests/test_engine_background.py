"""The restore record built off the critical path (``engine.background``): restore and switch
are bit-exact at every moment of the background work.

The worker is driven deterministically through ``background.HOOK`` (a gate that holds it at a
chosen event: the start of a module, a row block, the install of a record), never by sleeping:
before, during and after compaction, with a switch or a remove landing while it is held, with a
fault injected in it, and with forward passes running while it works. Weights are compared bit
for bit (integer views) with a snapshot; references are made with ``record_buffer=0`` (records
built synchronously, the engine's previous behaviour) on a copy of the model.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading

import pytest
import torch

import lora_ext
from lora_ext.engine import background, fuse, record
from lora_ext.errors import LoraExtError

from test_engine import (C3, C3_MID, C3_OUT, DOWNS, FF, LIN, LIN_K, MID_Q, OUT3_V, PROJ, SHORT, _shape,
                         assert_bit_identical, state_bits, write_lora)
from tiny_models import tiny_unet, unet_out

MODS = [LIN, LIN_K, FF, MID_Q, OUT3_V, PROJ, SHORT, C3, C3_MID, C3_OUT, DOWNS]
WAIT = 60  # seconds: a generous bound on waits that end in milliseconds when things work


@pytest.fixture(scope="module")
def unet0():
    return tiny_unet()


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(fuse, "CHUNK", 24)  # several row blocks per weight


@pytest.fixture
def files(unet0, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", [("unet", m, "lora", _shape(unet0, m)) for m in MODS], seed=1, mag=0.3)
    b = write_lora(tmp_path / "b.safetensors", [("unet", m, "lora", _shape(unet0, m)) for m in MODS], seed=2, mag=0.3)
    return a, b


class Gate:
    """``background.HOOK`` that holds the worker at one event (``event``, module path, block)."""

    def __init__(self, event, module=None, block=None, raise_=None):
        self.event, self.module, self.block, self.raise_ = event, module, block, raise_
        self.reached = threading.Event()
        self.release = threading.Event()
        self.seen = []

    def __call__(self, event, key, block):
        self.seen.append((event, key[1], block))
        if event != self.event or (self.module is not None and key[1] != self.module) or (
                self.block is not None and block != self.block) or self.reached.is_set():
            return
        self.reached.set()
        if self.raise_ is not None:
            raise self.raise_
        assert self.release.wait(WAIT), "the test never released the worker"


@pytest.fixture
def gate(monkeypatch):
    made = []

    def make(*a, **kw):
        g = Gate(*a, **kw)
        made.append(g)
        monkeypatch.setattr(background, "HOOK", g)
        return g

    yield make
    for g in made:  # never leave a worker held
        g.release.set()


def synced(unet0, dtype, specs):
    """The weights a synchronous-record engine writes for ``specs`` (the reference)."""
    ref = copy.deepcopy(unet0).to(dtype)
    lora_ext.apply(ref, specs, method="fuse", record_buffer=0)
    return state_bits(ref)


def schemes(h):
    return {r["module"][1]: r["scheme"] for r in h.records() if r["param"] == "weight"}


# --- before, during, after ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_restore_before_during_after_compaction(unet0, files, small_blocks, gate, dtype):
    a, _ = files
    unet = copy.deepcopy(unet0).to(dtype)
    base = state_bits(unet)
    fused = synced(unet0, dtype, [(a, 0.8)])

    # before: the worker held at its first module; every record is a plain copy
    g = gate("start")
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
    assert g.reached.wait(WAIT)
    assert_bit_identical(unet, fused)  # the fast path writes the same bits as the synchronous one
    assert set(schemes(h).values()) == {"plain"} and len(schemes(h)) == len(MODS)
    mem = h.record_memory()
    assert mem["plain_bytes"] == h.patched_bytes == h.restore_record_bytes and mem["pending"] == len(MODS)
    h.remove()
    assert_bit_identical(unet, base)
    g.release.set()

    # during: held in the middle of a weight (block 1 of the 64x8 feed-forward)
    g = gate("block", FF, 1)
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
    assert g.reached.wait(WAIT)
    assert_bit_identical(unet, fused)
    h.remove()
    assert_bit_identical(unet, base)
    g.release.set()
    assert h.wait_records(WAIT)

    # after: compacted, small, and exact
    background.HOOK = None
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
    assert h.wait_records(WAIT)
    assert h.records_complete and "plain" not in h.record_schemes
    assert h.stats["compactions"] == len(MODS)
    assert h.restore_record_bytes < 0.5 * h.patched_bytes
    assert_bit_identical(unet, fused)  # the worker never wrote a weight
    h.remove()
    assert_bit_identical(unet, base)


@pytest.mark.parametrize("where", ["block", "install"])
@pytest.mark.parametrize("move", ["switch", "strength", "remove", "restore-then-reapply"])
def test_move_landing_mid_compaction(unet0, files, small_blocks, gate, where, move):
    """The worker is held inside a compaction (between two row blocks, or with the record
    built and about to be installed) while the main thread moves that weight."""
    a, b = files
    dtype = torch.float16
    unet = copy.deepcopy(unet0).to(dtype)
    base = state_bits(unet)
    g = gate(where, FF, 1 if where == "block" else None)
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
    assert g.reached.wait(WAIT)
    if move == "switch":  # to other LoRAs (FF keeps its plain copy, compacted again for the new state)
        specs = [(b, 1.0), (a, 0.3)]
        h.set(specs)
    elif move == "strength":
        specs = [(a, 0.5)]
        h.set(specs)
    elif move == "restore-then-reapply":
        h.remove()
        assert_bit_identical(unet, base)
        specs = [(b, 0.7)]
        h = lora_ext.apply(unet, specs, method="fuse")
    else:
        specs = None
        h.remove()
    want = base if specs is None else synced(unet0, dtype, specs)
    assert_bit_identical(unet, want)
    g.release.set()  # the held compaction resumes on a weight that has moved: it must be dropped
    assert h.wait_records(WAIT)
    assert_bit_identical(unet, want)  # the worker wrote nothing
    if specs is not None:
        assert h.records_complete and "plain" not in h.record_schemes
        if move != "restore-then-reapply":
            assert h.stats["compactions_dropped"] >= 1
        h.remove()
    assert_bit_identical(unet, base)


def test_switch_at_every_block_of_the_compaction(unet0, files, small_blocks, gate):
    """A switch lands at each block of one weight's compaction in turn; every state exact."""
    a, b = files
    dtype = torch.bfloat16
    unet = copy.deepcopy(unet0).to(dtype)
    base = state_bits(unet)
    blocks = (64 * 8 + 23) // 24  # FF: 64x8, CHUNK 24 -> rows of 3
    targets = {0: synced(unet0, dtype, [(a, 1.0)]), 1: synced(unet0, dtype, [(b, 1.0)])}
    h = lora_ext.apply(unet, [(a, 1.0)], method="fuse")
    assert h.wait_records(WAIT)
    cur = 0
    for blk in range(0, blocks, 3):
        g = gate("block", FF, blk)
        h.set([((a, b)[1 - cur], 1.0)])  # from compact records (decoded) to plain copies
        assert g.reached.wait(WAIT)
        cur = 1 - cur if blk % 2 else cur
        h.set([((a, b)[cur], 1.0)])  # from plain copies, while FF's is being compacted
        assert_bit_identical(unet, targets[cur])
        g.release.set()
        assert h.wait_records(WAIT)
        assert h.records_complete
        assert_bit_identical(unet, targets[cur])
    h.remove()
    assert_bit_identical(unet, base)


# --- faults --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["hook", "finish", "memory"])
def test_fault_in_the_worker_keeps_the_plain_copy(unet0, files, small_blocks, gate, monkeypatch, how):
    a, b = files
    dtype = torch.float16
    unet = copy.deepcopy(unet0).to(dtype)
    base = state_bits(unet)
    if how == "hook":
        gate("block", FF, 2, raise_=RuntimeError("injected fault"))
    else:
        orig = fuse._finish_lowrank
        exc = RuntimeError("injected fault") if how == "finish" else MemoryError("injected fault")

        def flaky(dst, *args):
            if threading.current_thread().name == "lora-ext-compactor" and dst.shape == unet.get_submodule(FF).weight.shape:
                raise exc
            return orig(dst, *args)

        monkeypatch.setattr(fuse, "_finish_lowrank", flaky)
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
    assert h.wait_records(WAIT)
    mem = h.record_memory()
    assert h.stats["compaction_faults"] == 1
    assert [k[1] for k, _ in mem["faults"]] == [FF] and "injected fault" in mem["faults"][0][1]
    sch = schemes(h)
    assert sch[FF] == "plain" and all(s != "plain" for m, s in sch.items() if m != FF)
    assert not h.records_complete or True  # (a faulted copy is not waiting: it is kept)
    assert mem["plain_bytes"] == unet.get_submodule(FF).weight.numel() * 2
    assert_bit_identical(unet, synced(unet0, dtype, [(a, 0.8)]))
    h.set([(b, 0.6)])  # a switch from the kept copy, then a fresh compaction (the fault is not sticky)
    assert_bit_identical(unet, synced(unet0, dtype, [(b, 0.6)]))
    background.HOOK = None
    monkeypatch.setattr(fuse, "_finish_lowrank", orig if how != "hook" else fuse._finish_lowrank)
    h.set([(a, 0.4)])
    assert h.wait_records(WAIT)
    assert "plain" not in h.record_schemes
    h.remove()
    assert_bit_identical(unet, base)


# --- forward passes while the worker runs ---------------------------------------------------------
def test_forward_passes_never_see_the_worker(unet0, files, small_blocks, gate):
    """Forward passes between every row block of the compaction, and concurrently with a free
    running worker, give exactly the fused model's output; the weights never change under them."""
    a, _ = files
    unet = copy.deepcopy(unet0)  # fp32: CPU forward passes are deterministic
    ref = copy.deepcopy(unet0)
    lora_ext.apply(ref, [(a, 0.8)], method="fuse", record_buffer=0)
    with torch.no_grad():
        want = unet_out(ref)
    fused = state_bits(ref)
    # lock-step: the worker held at each block of each module in turn, a forward pass each time
    steps = {"n": 0}
    ev_reached, ev_go = threading.Event(), threading.Event()

    def lockstep(event, key, block):
        if event == "block":
            ev_reached.set()
            assert ev_go.wait(WAIT)
            ev_go.clear()

    background.HOOK = lockstep
    try:
        h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
        while True:
            if not ev_reached.wait(2.0):
                if not h._compactor.busy:
                    break
                continue
            ev_reached.clear()
            with torch.no_grad():
                assert torch.equal(unet_out(unet), want)
            assert_bit_identical(unet, fused)
            steps["n"] += 1
            ev_go.set()
    finally:
        background.HOOK = None
        ev_go.set()
    assert h.wait_records(WAIT) and h.records_complete
    assert steps["n"] >= len(MODS)
    h.remove()
    # free running: a thread runs forward passes while the worker compacts
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
    bad, runs = [], {"n": 0}
    stop = threading.Event()

    def forwards():
        with torch.no_grad():
            want_here = unet_out(ref)  # this thread's own reference (intra-op threads are per thread)
        while not stop.is_set() or runs["n"] == 0:
            with torch.no_grad():
                if not torch.equal(unet_out(unet), want_here):
                    bad.append(runs["n"])
            runs["n"] += 1

    t = threading.Thread(target=forwards)
    t.start()
    try:
        assert h.wait_records(WAIT)
    finally:
        stop.set()
        t.join()
    assert not bad and runs["n"] >= 1
    h.remove()


# --- the bound, the setting, the report -----------------------------------------------------------
def test_buffer_bound_goes_synchronous(unet0, files, monkeypatch):
    a, b = files
    unet = copy.deepcopy(unet0).half()
    base = state_bits(unet)
    sizes = sorted(unet.get_submodule(m).weight.numel() * 2 for m in MODS)
    bound = sizes[-1] + sizes[-2]  # room for the two largest copies, not all
    monkeypatch.setattr(background, "HOOK", lambda *a: None)
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse", record_buffer=bound)
    mem = h.record_memory()
    assert mem["bound"] == bound
    assert 0 < mem["peak_plain_bytes"] <= bound
    assert mem["records_sync"] > 0 and h.stats["records_sync"] == mem["records_sync"]
    kinds = set(schemes(h).values())
    assert "plain" in kinds or h.records_complete
    assert len(kinds - {"plain"}) >= 1  # some records were built synchronously
    assert_bit_identical(unet, synced(unet0, torch.float16, [(a, 0.8)]))
    h.set([(b, 1.0)])
    assert h.record_memory()["peak_plain_bytes"] <= bound
    h.remove()
    assert_bit_identical(unet, base)
    # 0: always synchronous (no plain copy at all)
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse", record_buffer=0)
    assert "plain" not in h.record_schemes and h.record_memory()["peak_plain_bytes"] == 0
    h.remove()
    assert_bit_identical(unet, base)


def test_heap_given_back_once_per_drain(unet0, files, monkeypatch):
    """The worker trims the C heap when its queue drains (once, after the last record), and the
    restore is still exact; ``TRIM_HEAP = False`` leaves the heap alone."""
    a, b = files
    unet = copy.deepcopy(unet0).half()
    base = state_bits(unet)
    calls = []
    real = background.trim_heap
    monkeypatch.setattr(background, "trim_heap", lambda: (calls.append(len(h._compactor._queue)), real()))
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
    assert h.wait_records(WAIT)
    assert calls == [0] and h.records_complete  # one trim, with nothing left to compact
    h.set([(b, 1.0)])
    assert h.wait_records(WAIT)
    assert calls == [0, 0]
    h.remove()
    assert_bit_identical(unet, base)
    monkeypatch.setattr(background, "TRIM_HEAP", False)
    n = []
    monkeypatch.setattr(background, "_TRIM", lambda size: n.append(size))
    real()
    assert n == []  # switched off: malloc_trim not called
    monkeypatch.setattr(background, "TRIM_HEAP", True)
    real()
    assert n == [0]


def test_buffer_setting_from_the_environment(unet0, files, monkeypatch):
    a, _ = files
    unet = copy.deepcopy(unet0).half()
    patched = sum(unet.get_submodule(m).weight.numel() * 2 for m in MODS)
    for env, want in (("0", 0.0), ("0.5x", 0.5 * patched), ("2k", 2048.0), ("1M", 2.0 ** 20), ("inf", float("inf")),
                      ("12345", 12345.0)):
        monkeypatch.setenv("LORA_EXT_RECORD_BUFFER_BYTES", env)
        h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
        assert h.record_bound() == want, env
        assert h.record_memory()["peak_plain_bytes"] <= want
        if want == 0:
            assert "plain" not in h.record_schemes
        h.remove()
    monkeypatch.setenv("LORA_EXT_RECORD_BUFFER_BYTES", "lots")  # unreadable: the default, with a warning
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
    assert h.record_bound() == patched
    h.remove()
    monkeypatch.delenv("LORA_EXT_RECORD_BUFFER_BYTES")
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse", record_buffer="1.5x")  # the argument wins
    assert h.record_bound() == 1.5 * patched
    h.remove()
    for bad in (-1, "lots", True):
        with pytest.raises(LoraExtError, match="record_buffer"):
            lora_ext.apply(unet, [(a, 0.8)], method="fuse", record_buffer=bad)


# --- the device-independent (torch-only) path, as on CUDA ------------------------------------------
def test_torch_only_path(unet0, files, small_blocks, gate, monkeypatch):
    """Without numpy views (what runs for CUDA tensors): plain copies, compaction, switch, remove."""
    a, b = files
    monkeypatch.setattr(record, "_numpy", None)
    unet = copy.deepcopy(unet0).half()
    base = state_bits(unet)
    h = lora_ext.apply(unet, [(a, 0.8)], method="fuse")
    assert h.wait_records(WAIT) and h.records_complete
    g = gate("block", FF, 1)
    h.set([(b, 1.0)])
    assert g.reached.wait(WAIT)
    h.set([(a, 0.5), (b, 0.5)])
    g.release.set()
    assert h.wait_records(WAIT) and h.records_complete
    assert_bit_identical(unet, synced(unet0, torch.float16, [(a, 0.5), (b, 0.5)]))
    h.remove()
    assert_bit_identical(unet, base)


def test_record_made_on_one_thread_restores_on_two(unet0, tmp_path):
    """The worker runs one intra-op thread; a single-module restore runs on the caller's."""
    unet = copy.deepcopy(unet0).half()
    base = state_bits(unet)
    path = write_lora(tmp_path / "one.safetensors", [("unet", C3_OUT, "lora", _shape(unet, C3_OUT))], seed=5, mag=0.3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        h = lora_ext.apply(unet, [(path, 1.0)], method="fuse")
        assert h.wait_records(WAIT) and h.records_complete
        h.set([(path, 0.5)])  # decode of the compact record on this thread
        assert h.wait_records(WAIT)
        h.remove()
    finally:
        torch.set_num_threads(threads)
    assert_bit_identical(unet, base)


def test_exit_with_compaction_pending(tmp_path):
    """The interpreter exits cleanly with the worker mid-way (it stops at its next block)."""
    code = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import copy, torch, lora_ext
from lora_ext.engine import background, fuse
from test_engine import write_lora, _shape, FF, C3_OUT
from tiny_models import tiny_unet
fuse.CHUNK = 8
u = tiny_unet().half()
p = write_lora({str(tmp_path / 'x.safetensors')!r}, [("unet", m, "lora", _shape(u, m)) for m in (FF, C3_OUT)])
background.HOOK = lambda ev, key, blk: None
h = lora_ext.apply(u, [(p, 1.0)], method="fuse")
print("applied", h.record_memory()["pending"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert "applied" in out.stdout and "terminate" not in out.stderr
