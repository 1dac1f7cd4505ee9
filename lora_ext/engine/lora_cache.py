"""Loaded LoRA files kept between applies (bounded; issue 14).

A host applies the same LoRA file generation after generation (A1111 keeps its loaded networks
in memory for the same reason). Reading a file again costs the read and the NaN/Inf checks of
every tensor: about a fifth of a fast apply. ``apply`` and ``Handle.set`` look a path up here
first; an entry is used only while the file is the one that was read: the same path, size,
modification time (ns), inode and change time (``os.stat``, taken before reading). A file
rewritten in place, replaced, or touched is read again.

The cache holds the loaded ``Lora`` objects (their tensors in host memory), least recently used
first out, within a bound on the tensors' bytes and on the number of files: the environment
variable ``LORA_EXT_LORA_CACHE_BYTES`` (bytes, or ``"512M"``, ``"2G"``; ``0`` turns it off),
default 1 GiB, and ``MAX_FILES`` (16); ``configure()`` sets both at run time. A file larger than
the byte bound is not kept. ``clear()`` empties it; ``info()`` reports hits, misses, bytes.

(``models.cached_lora`` is a weak cache: it finds a file only while some handle still holds it.
This one keeps files after the last handle is gone, which is the case of a host that removes
the LoRAs after each generation and applies them again for the next.)
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Optional

from .background import parse_bytes

DEFAULT_BYTES = float(1 << 30)
MAX_FILES = 16

_lock = threading.Lock()
_entries: "OrderedDict[str, tuple]" = OrderedDict()  # path -> (file id, Lora, bytes)
_bytes = 0
_stats = {"hits": 0, "misses": 0, "evicted": 0, "stale": 0}
_bound: Optional[float] = None  # None: from the environment on each use


def file_id(path: str):
    """What identifies the bytes of ``path`` now (None if it cannot be stat'ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev)


def bound() -> float:
    """The byte bound in force (``configure`` > environment > default)."""
    if _bound is not None:
        return _bound
    raw = os.environ.get("LORA_EXT_LORA_CACHE_BYTES")
    if raw:
        try:
            return _size(raw)
        except ValueError:
            pass
    return DEFAULT_BYTES


def _size(text: str) -> float:
    v = parse_bytes(text)
    return DEFAULT_BYTES * -v if v < 0 else v  # ("0.5x": a share of the default)


def configure(max_bytes=None, max_files: Optional[int] = None) -> None:
    """Set the bounds (``max_bytes``: bytes or a string as for the environment variable; None
    leaves it to the environment). Entries beyond the new bounds are dropped at once."""
    global _bound, MAX_FILES
    with _lock:
        if isinstance(max_bytes, str):
            _bound = _size(max_bytes)
        else:
            _bound = None if max_bytes is None else float(max_bytes)
        if max_files is not None:
            MAX_FILES = int(max_files)
        _trim()


def lora_bytes(lora) -> int:
    seen, n = set(), 0
    for g in getattr(lora, "groups", {}).values():
        for t in g.tensors.values():
            if id(t) not in seen and hasattr(t, "numel"):
                seen.add(id(t))
                n += t.numel() * t.element_size()
    return n


def get(path: str, fid):
    """The loaded ``Lora`` of ``path`` if it was read from the file ``fid`` identifies, else None."""
    global _bytes
    with _lock:
        e = _entries.get(path)
        if e is None or fid is None:
            _stats["misses"] += 1
            return None
        if e[0] != fid:  # the file changed since it was read: forget it
            del _entries[path]
            _bytes -= e[2]
            _stats["stale"] += 1
            _stats["misses"] += 1
            return None
        _entries.move_to_end(path)
        _stats["hits"] += 1
        return e[1]


def put(path: str, fid, lora) -> None:
    """Keep ``lora`` (read from ``path`` when it had the identity ``fid``), within the bounds."""
    global _bytes
    if fid is None:
        return
    limit = bound()
    if limit <= 0 or MAX_FILES <= 0:
        return
    size = lora_bytes(lora)
    with _lock:
        old = _entries.pop(path, None)
        if old is not None:
            _bytes -= old[2]
        if size > limit:
            return
        _entries[path] = (fid, lora, size)
        _bytes += size
        _trim(limit)


def _trim(limit: Optional[float] = None) -> None:
    global _bytes
    limit = bound() if limit is None else limit
    while _entries and (_bytes > limit or len(_entries) > MAX_FILES):
        _, e = _entries.popitem(last=False)
        _bytes -= e[2]
        _stats["evicted"] += 1


def forget(path: str) -> None:
    """Drop ``path``'s entry (if any)."""
    global _bytes
    with _lock:
        e = _entries.pop(path, None)
        if e is not None:
            _bytes -= e[2]


def clear() -> None:
    global _bytes
    with _lock:
        _entries.clear()
        _bytes = 0


def info() -> dict:
    with _lock:
        return {"files": len(_entries), "bytes": _bytes, "bound": bound(), "max_files": MAX_FILES, **_stats}
