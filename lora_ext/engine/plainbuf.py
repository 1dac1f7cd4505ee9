"""Host buffers for the plain copies of the fast path, recycled without page faults (Linux).

A fast apply or switch keeps a plain copy of every pristine weight it touches (1x the patched
bytes) until the background worker has compacted it. Fresh memory for those copies costs page
faults: on the benchmark VM ~3.5 us per 4 KB page (SDXL: 0.3-1.1 s per switch, 88-305K faults),
and how much of the freed memory glibc keeps for the next switch is an accident of its heap.

Here a plain copy of at least ``MIN_BYTES`` lives in an anonymous mapping of its own. When the
last tensor on it dies (torch's storage holds the ``memoryview`` the tensor was made from, and a
``weakref.finalize`` on that memoryview runs only then), the mapping is ``madvise(MADV_FREE)``d
and filed by size: the kernel may take its pages back whenever it needs memory (nothing is held
against the system), and the next copy of that size is written into it without faults unless
the kernel did. The free list holds at most ``cap`` bytes (the largest record bound asked for);
beyond that a mapping is simply dropped (unmapped). Measured: 509 MB written into a fresh
mapping 0.435 s (130K faults), into a ``MADV_FREE``d one 0.077 s (0 faults).

Lazily freed pages count in the process's RSS until the kernel takes them. ``ENABLED = False``
(or a platform without ``MADV_FREE``) gives plain ``torch.empty``.
"""
from __future__ import annotations

import mmap
import sys
import threading
import weakref

import torch

ENABLED = sys.platform.startswith("linux") and hasattr(mmap, "MADV_FREE")
MIN_BYTES = 1 << 20  # smaller copies come from torch.empty (glibc reuses small blocks well)
PAGE = mmap.PAGESIZE

_lock = threading.Lock()
_free: dict = {}  # mapping size -> [mmap, ...] (lazily freed)
_free_bytes = 0
_cap = 0.0
stats = {"mapped": 0, "reused": 0, "released": 0, "dropped": 0}


def empty(shape: tuple, dtype: torch.dtype, cap: float) -> torch.Tensor:
    """An uninitialised CPU tensor for a plain copy; ``cap``: bytes the free list may keep."""
    global _cap, _free_bytes
    n = 1
    for d in shape:
        n *= int(d)
    nbytes = n * torch.empty(0, dtype=dtype).element_size()
    if not ENABLED or nbytes < MIN_BYTES:
        return torch.empty(tuple(shape), dtype=dtype)
    size = (nbytes + PAGE - 1) // PAGE * PAGE
    with _lock:
        if cap > _cap:
            _cap = float(cap)
        spare = _free.get(size)
        mm = spare.pop() if spare else None
        if mm is not None:
            _free_bytes -= size
            stats["reused"] += 1
    if mm is None:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with _lock:
            stats["mapped"] += 1
    view = memoryview(mm)
    t = torch.frombuffer(view, dtype=dtype, count=n).view(tuple(shape))
    fin = weakref.finalize(view, _release, mm, size)  # runs once torch's storage let go of ``view``
    fin.atexit = False
    return t


def _release(mm, size: int) -> None:
    """(The last tensor on ``mm`` is gone.) Lazily free its pages and file it, or drop it."""
    global _free_bytes
    try:
        with _lock:
            keep = _free_bytes + size <= _cap
            if keep:
                _free_bytes += size  # reserved before the mapping is listed
        if not keep:
            with _lock:
                stats["dropped"] += 1
            return  # (unmapped when the mmap object goes)
        mm.madvise(mmap.MADV_FREE)  # before it is listed: nobody else can hold it yet
        with _lock:
            _free.setdefault(size, []).append(mm)
            stats["released"] += 1
    except Exception:  # pragma: no cover - a finalizer must not raise
        with _lock:
            _free_bytes = sum(len(v) * s for s, v in _free.items())


def free_bytes() -> int:
    with _lock:
        return _free_bytes


def clear() -> int:
    """Drop every spare mapping (unmapped as their objects go) and forget the cap; returns the
    bytes dropped. Public as ``lora_ext.engine.release_spare_memory()``: the spares' pages are
    lazily freed (the kernel takes them when it needs memory) but count in the process's RSS
    until it does; this gives them back now, and the next apply or switch faults fresh pages."""
    global _free_bytes, _cap
    with _lock:
        dropped = _free_bytes
        _free.clear()
        _free_bytes = 0
        _cap = 0.0
    return dropped
