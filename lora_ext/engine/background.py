"""Background compaction: the small exact restore record is built off the critical path.

A fast apply or switch (``fuse.plain_fuse``) writes the fused weights and keeps a *plain*
host copy of each pristine weight it touched (a pending record). One worker thread per
handle then compacts each copy into the small exact record (``fuse.compact``) while the host
samples, and drops the copy. The rules that keep restore exact at every moment:

* the worker never writes a weight: it reads the plain copy (which nothing writes) and the
  fused weight, and writes only its own buffers. So a forward pass never sees a weight the
  worker is working on change, let alone half-written;
* every move of a module's weight bumps the module's generation counter twice, under the
  handle's record lock: to an odd value before the first write, to an even one after the
  new record is in place (a seqlock). The worker notes the (even) generation when it starts
  a module, gives up as soon as the generation moves (it asks before every row block), and
  installs its record, under the same lock, only if the generation is still the one it
  started with and the module still holds the copy it compacted. What it read while a switch
  was rewriting the weight is thrown away, never installed;
* a restore or switch before the compaction is done uses the plain copy; one that lands
  mid-compaction simply moves the generation (the worker's result is dropped, or, when the
  new state keeps the same copy, compacted again for the new state);
* a fault in the worker (an exception, a record that would not be exact) leaves the plain
  copy in place (restore still exact), counted in ``handle.stats["compaction_faults"]`` and
  listed in ``handle.record_memory()["faults"]``.

The worker runs with one intra-op thread (torch's thread count is per thread), at a lower
OS priority where the platform allows it, in row blocks of ~512K elements: each block is a
few torch / numpy calls that release the GIL, so it never holds the GIL for long.

``HOOK`` (tests): ``HOOK(event, key, block)`` is called by the worker at ``"start"`` (a
module, after its generation was noted), ``"block"`` (before each row block) and
``"install"`` (before the result is installed); it may block (pause the worker at a known
point) or raise (a fault).
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from typing import Optional

import torch

from .amp import exact_maths

HOOK = None
NICE = 5  # added to the worker thread's niceness (Linux); 0: leave it
_log = logging.getLogger("lora_ext")


def parse_bytes(text: str) -> Optional[float]:
    """``"512M"`` / ``"2G"`` / ``"1073741824"`` -> bytes; ``"0.5x"`` -> -0.5 (a share of the
    default, negative to tell it apart); ``"inf"`` -> inf. Raises ValueError."""
    t = text.strip().lower().replace("_", "")
    if t in ("inf", "unlimited", "none"):
        return float("inf")
    if t.endswith("x"):
        v = float(t[:-1])
        if v < 0:
            raise ValueError(text)
        return -v if v > 0 else 0.0
    mult = 1
    for suffix, m in (("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30), ("kb", 1 << 10), ("mb", 1 << 20),
                      ("gb", 1 << 30), ("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("b", 1)):
        if t.endswith(suffix):
            t, mult = t[:-len(suffix)], m
            break
    v = float(t) * mult
    if v < 0:
        raise ValueError(text)
    return v


# Give the C heap's free memory back to the system when the worker's queue drains (glibc's
# ``malloc_trim``): compaction frees what it allocated per module (exceptions, estimates, the
# worker thread's own malloc arena), and glibc keeps most of it: measured 0.2x the patched bytes
# held after compaction (SD1.5 fp16), on top of the 0.09x of records. False: leave the heap alone.
TRIM_HEAP = True
_TRIM = None


def trim_heap() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); nothing elsewhere."""
    global _TRIM
    if not TRIM_HEAP:
        return
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL(None).malloc_trim
            _TRIM.argtypes, _TRIM.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl)
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_LIVE: "weakref.WeakSet" = weakref.WeakSet()
_STOPPING = False


def _stop_all() -> None:
    """At interpreter exit (before non-daemon threads are joined): workers stop at their next
    row block, so exit never waits for, nor tears down under, a compaction."""
    global _STOPPING
    _STOPPING = True
    for c in list(_LIVE):
        c.close(join=5.0)


if hasattr(threading, "_register_atexit"):  # Python >= 3.9
    try:
        threading._register_atexit(_stop_all)
    except RuntimeError:  # pragma: no cover - imported during shutdown
        pass


class Compactor:
    """The worker of one handle: a FIFO of modules whose records are plain copies."""

    def __init__(self, handle):
        self._handle = handle
        self._cv = threading.Condition()
        self._queue: deque = deque()
        self._queued: set = set()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        _LIVE.add(self)

    @property
    def closed(self) -> bool:
        return self._closed or _STOPPING

    def submit(self, mods) -> None:
        with self._cv:
            if self._closed or _STOPPING:
                return
            for m in mods:
                if id(m) not in self._queued:
                    self._queued.add(id(m))
                    self._queue.append(m)
            if self._queue and self._thread is None:
                # not a daemon: interpreter exit stops it cleanly (``_stop_all``) instead of
                # freezing it inside a torch call
                self._thread = threading.Thread(target=self._run, name="lora-ext-compactor", daemon=False)
                self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._thread is not None

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Until the queue is empty and the worker idle; False on timeout."""
        if self._thread is threading.current_thread():
            return False
        with self._cv:
            return self._cv.wait_for(lambda: self._thread is None, timeout)

    def close(self, join: Optional[float] = 0.0) -> None:
        """Drop the queue and let the worker stop (it gives up at its next row block: nothing it
        does can matter once the handle is closed). ``join``: seconds to wait for it (None:
        for as long as it takes; 0: not at all)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._queued.clear()
            t = self._thread
        if t is not None and t is not threading.current_thread() and (join is None or join > 0):
            t.join(join)

    def _run(self) -> None:
        torch.set_num_threads(1)  # per thread: the host's own thread count is untouched
        if NICE and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + NICE)
            except OSError:
                pass
        h = self._handle
        trimmed = True  # nothing compacted yet: nothing to give back
        try:
            while True:
                m = None
                with self._cv:
                    stop = self._closed or _STOPPING
                    if self._queue and not stop:
                        m = self._queue.popleft()
                        self._queued.discard(id(m))
                    elif stop or trimmed:
                        self._thread = None
                        self._cv.notify_all()
                        return
                if m is None:  # drained: give the heap's free memory back, then look again
                    trim_heap()
                    trimmed = True
                    continue
                trimmed = False
                with exact_maths(h.needs_inference_mode()):
                    h._compact_one(m)
        except BaseException:  # _compact_one reports its own faults; this is a bug of ours
            _log.exception("lora-ext: the record compactor stopped")
            with self._cv:
                self._thread = None
                self._queue.clear()
                self._queued.clear()
                self._cv.notify_all()
