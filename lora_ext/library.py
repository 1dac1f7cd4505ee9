"""Library mode of ``lora-ext inspect``: every LoRA file under some folders, one row each.

Per file it reads the header and the few small tensors the report needs (alphas and other
tensors of at most :data:`SMALL` values); every other tensor stands in as a ``meta`` tensor of
its shape and dtype, so types, ranks, detection and binding cost no tensor data. Tensor data is
read only where a check needs it: confirming duplicates (files whose tensor shapes *and* a
32-byte samples of the same ~16 tensors agree are compared byte for byte) and ``--full`` (every tensor
checked for NaN/Inf, A1111's hash computed).

Files are scanned in parallel processes (forked after the full-size layouts are built once).
Each file's result is cached by absolute path with its size, mtime and a hash of its header
(``--cache PATH``; default ``$XDG_CACHE_HOME/lora-ext/inspect-cache.json``). A second run over
an unchanged library reads no tensor data at all, and no header either where the file's inode
and change time (POSIX) are those cached, from well before the scan that cached them.
Pickles of a structure already seen are read by :mod:`pickle_index` (no torch, nothing run).
"""
from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import math
import os
import sys
import tempfile
import time
import zlib
from collections import Counter
from typing import Optional

from .errors import LoraExtError, LoraFileError
from .io import PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, open_tensors
from .textsafe import printable

LORA_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS
CACHE_VERSION = 4  # 3: samples of some tensors (_sampled), duplicates' tokens; 4: CRC-32 header check
#: tensors of at most this many values are read (alphas, IA3 on_input flags); others are meta
SMALL = 64
_SAMPLE_BYTES = 32
#: data reads this process made (tests count them): "small", "sample", "full"
READS: Counter = Counter()


# --- finding files ----------------------------------------------------------------------------
def find_lora_files(paths) -> list:
    """Every LoRA file under ``paths`` (folders recursively, links to folders not followed;
    files named directly are kept whatever their extension), sorted, each once."""
    out, seen = [], set()
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(files):
                    if f.lower().endswith(LORA_EXTENSIONS) and not f.startswith("."):
                        out.append(os.path.join(root, f))
        else:
            out.append(p)
    res = []
    for p in out:
        a = os.path.abspath(p)
        if a not in seen:
            seen.add(a)
            res.append(p)
    return res


# --- reading a file by shapes -------------------------------------------------------------------
def header_hash(path: str) -> str:
    """CRC-32 of a safetensors file's header (length + JSON), or of a pickle's first and last
    64 kB, as 8 hex digits: with size and mtime, what the cache is keyed by (it tells a file
    changed in place from the one cached; no adversary). Read by pread, hashed by zlib: the
    warm scan is mostly this (sha256 took 2.3x as long for the same 16.6 MB of headers)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        if path.lower().endswith(SAFETENSORS_EXTENSIONS):
            head = os.pread(fd, 8, 0)
            crc = zlib.crc32(head)
            if len(head) == 8:
                n = int.from_bytes(head, "little")
                if 0 < n <= min(size - 8, 100_000_000):
                    return "%08x" % zlib.crc32(os.pread(fd, n, 8), crc)
        else:
            crc = 0
        crc = zlib.crc32(os.pread(fd, 65536, 0), crc)
        if size > 131072:
            crc = zlib.crc32(os.pread(fd, 65536, size - 65536), crc)
    finally:
        os.close(fd)
    return "%08x" % crc


def _small_or_meta(tf, key: str):
    shape = tuple(tf.shape(key))
    n = 1
    for d in shape:
        n *= int(d)
    if n <= SMALL:
        READS["small"] += 1
        return tf.get(key)
    import torch

    dtype = tf.dtype(key)
    t = _META.get((shape, dtype))
    if t is None:  # meta tensors hold no data: one per shape and dtype serves every group
        t = _META[(shape, dtype)] = torch.empty(shape, dtype=dtype, device="meta")
    return t


_META: dict = {}


def load_lora_shapes(path, lazy_sample: bool = False):
    """``network.load_lora`` without reading big tensors: adapters are built from shapes.

    A safetensors file is read by ``fastpath`` (no torch: shapes from the header, small values
    by struct; a ``FastLora``) where that reading is exact, else adapters are built on meta
    tensors (shapes and dtypes from the header) with alphas and other small tensors real."""
    path = os.fspath(path)
    with open_tensors(path, kind="lora") as tf:
        tf.check_complete()  # a truncated file is broken even where no tensor is read
        if tf.format == "safetensors":
            from .io import DTYPE_STR

            shapes = [(DTYPE_STR[e.dtype_name], e.shape) for e in tf._entries.values()]
        else:
            shapes = [(tf.dtype_str(k), tuple(tf.shape(k))) for k in tf.keys()]
        signature = hashlib.sha256(repr(sorted(shapes)).encode()).hexdigest()
        # safetensors: sampled later, only where another file has the same shapes (library mode)
        sample = _sample(tf) if tf.format != "safetensors" or not lazy_sample else None
        lora = None
        if tf.format == "safetensors":
            from .fastpath import load_fast

            lora = load_fast(path, read_all=False, tf=tf)
            if lora is not None:
                READS["small"] += sum(1 for e in tf._entries.values() if _numel(e.shape) <= SMALL)
                lora.st_entries, lora.st_data_start = tf._entries, tf.data_start
        if lora is None:
            lora = _load_meta(path, tf)
    lora.shape_signature = signature
    lora.sample_fingerprint = sample
    return lora


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _load_meta(path: str, tf):
    """The adapters built on meta tensors (torch) from an open file."""
    from . import plugins
    from .keys import group_keys
    from .metadata import checked_alpha
    from .network import (Group, Lora, _configure_peft, _inject_peft_alpha, _peft_config, _peft_lycoris_scale,
                          build_adapter)

    metadata = dict(tf.metadata)
    types = plugins.adapter_types()
    names = {n for t in types for n in (t.required | t.optional)}
    grouped = group_keys(tf.keys(), names)
    groups = {}
    for prefix, keys in grouped.items():
        tensors = {name: _small_or_meta(tf, key) for name, key in keys.items()}
        if "alpha" in tensors:
            tensors["alpha"] = checked_alpha(path, keys["alpha"], tensors["alpha"])
        if "lora_magnitude_vector" in keys.get("dora_scale", ""):
            tensors["dora_scale"] = tensors["dora_scale"].reshape(-1)
        groups[prefix] = Group(prefix, keys, tensors)
    file_format = tf.format
    config = _peft_config(path, metadata)
    for group in groups.values():
        if config and "alpha" not in group.tensors and "lora_down.weight" in group.tensors:
            _inject_peft_alpha(group, config)
        try:
            build_adapter(group, types, metadata)
        except LoraExtError:
            raise
        except Exception as exc:  # an adapter type that needs real data to be built
            group.adapter, group.problem = None, ""
            raise _NeedsData(str(exc)) from None
        if config and group.adapter is not None and "alpha" not in group.tensors:
            _peft_lycoris_scale(group, config)
        if group.adapter is not None and hasattr(group.adapter, "configure_peft"):
            _configure_peft(group, config)
    return Lora(path, metadata, groups, file_format)


class _NeedsData(Exception):
    pass


# --- reading data (only where a check needs it) ------------------------------------------------
def _spans(tf):
    """(key, begin, end) of each tensor of an open safetensors file, in file order."""
    return sorted(((k, e.begin, e.end) for k, e in tf._entries.items()), key=lambda s: s[1])


def _read_at(tf, begin: int, n: int) -> bytes:
    fh = tf._fh
    fh.seek(tf.data_start + begin)
    data = fh.read(n)
    if len(data) < n:
        raise LoraFileError(tf.path, f"truncated: the data ends before byte {tf.data_start + begin + n}")
    return data


def _tensor_bytes(t) -> bytes:
    import torch

    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _sample_digest(samples) -> str:
    """One hash of the samples, their order left out (files with the same shape signature and
    the same samples are the candidates whose data is compared)."""
    samples = sorted(samples)
    h = hashlib.sha256(bytes(map(len, samples)))  # (each at most 32 bytes)
    h.update(b"".join(samples))
    return h.hexdigest()


#: tensors whose first bytes make a file's sample, at least (whole (dtype, shape) classes)
SAMPLE_TENSORS = 16


def _sampled(shapes) -> set:
    """Which tensors a sample reads, from the (dtype, shape) of every tensor alone (so two files
    with the same shape signature read the same ones, whatever their names and order): whole
    classes of equal dtype and shape, the rarest first, until they hold ``SAMPLE_TENSORS``;
    tensors of fewer than 8 values last (alphas and scales are the same in many files)."""
    counts = Counter(shapes)
    chosen, n = set(), 0
    for key in sorted(counts, key=lambda k: (_numel(k[1]) < 8, counts[k], repr(k))):
        if n >= SAMPLE_TENSORS:
            break
        chosen.add(key)
        n += counts[key]
    return chosen


def _sample_spans_of(entries) -> list:
    """(begin, bytes) in file order of the tensors ``_sampled`` picks from safetensors entries."""
    from .io import DTYPE_STR

    entries = list(entries)
    chosen = _sampled((DTYPE_STR[e.dtype_name], tuple(e.shape)) for e in entries)
    return sorted((e.begin, min(_SAMPLE_BYTES, e.end - e.begin)) for e in entries
                  if (DTYPE_STR[e.dtype_name], tuple(e.shape)) in chosen)


def _sample(tf) -> Optional[str]:
    """Hash of the first bytes of some tensors (``_sampled``), names, order, dtypes and shapes
    left out (the shape signature holds those): files with other data almost always differ
    here (32 bytes read per sampled tensor). None when the file is too short for its tensors."""
    try:
        if tf.format == "safetensors":
            return _sample_spans(tf._fh.fileno(), tf.data_start, _sample_spans_of(tf._entries.values()), tf)
        keys = list(tf.keys())
        chosen = _sampled((tf.dtype_str(k), tuple(tf.shape(k))) for k in keys)
        items = []
        for k in keys:
            if (tf.dtype_str(k), tuple(tf.shape(k))) not in chosen:
                continue
            READS["sample"] += 1
            t = tf.get(k, check_finite=False).reshape(-1)[:_SAMPLE_BYTES]
            items.append(_tensor_bytes(t)[:_SAMPLE_BYTES])
    except LoraExtError:
        return None
    return _sample_digest(items)


def _sample_spans(fd: int, start: int, spans, tf=None) -> Optional[str]:
    """``_sample`` of a safetensors file from its (begin, bytes) spans in file order."""
    import mmap

    READS["sample"] += len(spans)
    if not spans:
        return _sample_digest([])
    if len(spans) <= 256:  # a few dozen reads cost less than mapping the file (0.14 vs 0.55 ms here)
        b, n = spans[-1]
        if start + b + n > os.fstat(fd).st_size:
            return None
        return _sample_digest([os.pread(fd, n, start + b) for b, n in spans])
    try:  # slices of a mapping: no system call per tensor
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # a file that cannot be mapped: read each sample
        mm = _Reads(fd)
    with mm:
        size = len(mm)
        b, n = spans[-1]
        if start + b + n > size:
            return None
        return _sample_digest([mm[start + b:start + b + n] for b, n in spans])


class _Reads:
    """``mmap``'s slicing and length, by reads (for files that cannot be mapped)."""

    def __init__(self, fd):
        self.fd, self.size = fd, os.fstat(fd).st_size

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __len__(self):
        return self.size

    def __getitem__(self, sl):
        return os.pread(self.fd, sl.stop - sl.start, sl.start)


def _finite(t) -> bool:
    """Whether every value is finite: one fp32 sum (NaN and Inf survive it), the exact
    elementwise check only when the sum is not finite (an overflow of finite values)."""
    import math

    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        if math.isfinite(float(t.float().sum())):
            return True
    except (RuntimeError, TypeError):
        pass
    return bool(torch.isfinite(t.float()).all())


_CHUNK = 64 << 20


def _chunked(tf):
    """(key, begin, end, bytes) of every tensor in file order, read a run of back-to-back
    tensors (up to 64 MB, or one bigger tensor) at a time: one read instead of one per tensor.
    A file too short raises as ``_read_at`` does, at the first tensor it cuts."""
    spans = _spans(tf)
    i = 0
    while i < len(spans):
        lo, hi, j = spans[i][1], spans[i][2], i
        while j + 1 < len(spans) and spans[j + 1][1] == hi and spans[j + 1][2] - lo <= _CHUNK:
            j += 1
            hi = spans[j][2]
        fh = tf._fh
        fh.seek(tf.data_start + lo)
        buf = fh.read(hi - lo)
        view = memoryview(buf)
        for k, b, e in spans[i:j + 1]:
            if e - lo > len(buf):
                raise LoraFileError(tf.path, f"truncated: the data ends before byte {tf.data_start + e}")
            yield k, b, e, view[b - lo:e - lo]
        i = j + 1


def full_read(path: str, check: bool = False, content: bool = True) -> dict:
    """Read every tensor: content fingerprint (names and order left out), A1111's hash (addnet
    for safetensors, sha256 of the file for pickles) and, with ``check``, NaN/Inf in any tensor.

    ``content=False`` (safetensors): A1111's hash and the data-order layout (``order``: dtypes
    and shapes in file order) only, one hash pass: files with the same ``order`` and hash hold
    the same tensors, so the per-tensor fingerprint is needed only to compare files whose
    tensors lie in another order (other key names)."""
    from .io import file_sha256

    items, problem, order = [], None, []
    with open_tensors(path, kind="lora") as tf:
        if tf.format == "safetensors":
            addnet = hashlib.sha256()
            at = 0
            for k, b, e, data in _chunked(tf):
                READS["full"] += 1
                if addnet is not None and b == at:
                    addnet.update(data)
                    at = e
                else:
                    addnet = None  # a gap: the data area is not the tensors back to back
                if not content:
                    order.append((tf.dtype_str(k), tuple(tf.shape(k))))
                    continue
                items.append((tf.dtype_str(k), tuple(tf.shape(k)), hashlib.sha256(data).hexdigest()))
                if check and problem is None and e > b:
                    import torch

                    try:
                        if not _finite(torch.frombuffer(bytearray(data), dtype=tf.dtype(k))):  # a copy: writable
                            problem = f"tensor {k!r} contains NaN or Inf"
                    except (RuntimeError, TypeError, ValueError, LoraExtError):
                        pass
            a1111 = addnet.hexdigest() if addnet is not None and at == tf.file_size - tf.data_start else None
            if not content:
                if a1111 is None:  # not the tensors back to back: only the fingerprint tells
                    return full_read(path, check)
                return {"hash": a1111, "order": hashlib.sha256(repr(order).encode()).hexdigest()}
        else:
            for k in tf.keys():
                READS["full"] += 1
                t = tf.get(k, check_finite=False)
                items.append((str(t.dtype), tuple(t.shape), hashlib.sha256(_tensor_bytes(t)).hexdigest()))
                if check and problem is None and not _finite(t):
                    problem = f"tensor {k!r} contains NaN or Inf"
            a1111 = file_sha256(path)
    return {"content": hashlib.sha256(repr(sorted(items)).encode()).hexdigest(), "hash": a1111, "nan": problem}


# --- the structure memo ---------------------------------------------------------------------------
# The files of a library often share their structure (one trainer, one network config: the same
# tensor names, dtypes, shapes and offsets; only the values and the metadata differ). A header
# whose metadata comes first (or is absent) and is plainly well-formed is split into that
# metadata and the rest; files whose rest is the same text (trailing padding aside; compared by
# its sha256) have the same entries, so the same groups, types, detection and binding. Those are computed once (by the
# full reading below, which then stores them) and reused; what depends on values is computed
# again for every file: alphas (read and checked as the torch-free reading does), the values of
# the other small tensors (part of the key: IA3's on_input decides what fits), NaN/Inf in the
# small tensors, the file's length, the metadata (triggers, hash, and the hints detection reads,
# part of the key). Anything out of the plain (a PEFT config, a small tensor that might hold
# NaN/Inf, an alpha the reading refuses, a file too short) takes the full reading.
_DECODER = json.JSONDecoder()
_WS = " \t\r\n"


class _Struct:
    """What files with one header structure share."""

    __slots__ = ("max_end", "small", "small_span", "n_small", "keyed", "alpha_checks", "alpha_counted", "sig",
                 "alpha_by_dtype", "small_by_dtype",
                 "entries", "_spans", "_order", "rows")

    @property
    def spans(self) -> list:
        """(begin, sample bytes) of the sampled tensors, in file order (for ``_sample_spans``)."""
        if self._spans is None:
            self._spans = _sample_spans_of(self.entries.values())
        return self._spans

    @property
    def order(self) -> str:
        """``full_read``'s data-order layout: dtypes and shapes in file order, hashed."""
        if self._order is None:
            from .io import DTYPE_STR

            order = sorted(self.entries.values(), key=lambda e: e.begin)
            self._order = hashlib.sha256(repr([(DTYPE_STR[e.dtype_name], e.shape) for e in order]).encode()).hexdigest()
        return self._order


_MEMO: dict = {"ready": None, "base": None, "structs": {}, "held": 0, "where": {}, "pickles": {}}
#: tensors described by the remembered structures, at most (the oldest are forgotten first)
MEMO_TENSORS = 200_000
#: off: every file takes the full reading (tests compare the rows both ways)
STRUCTURE_MEMO = True


def _memo_structs(base):
    """The structure memo for this base and this state of the torch-free reading, or None when
    that reading is off (every file then takes the full path)."""
    from . import fastpath

    if not STRUCTURE_MEMO or os.environ.get("LORA_EXT_NO_FAST_INSPECT"):
        return None
    ready = fastpath._ready()
    if ready is None or fastpath._runtime_plugins():
        return None
    if _MEMO["ready"] is not ready or _MEMO["base"] is not base:
        _MEMO.update(ready=ready, base=base, structs={}, held=0, where={}, pickles={})
    return _MEMO["structs"]


def _split_header(fd: int, size: int):
    """(header length, metadata, structure key) of a safetensors file whose header is plain
    (metadata first or none, every value a string, no escaped colon), else None."""
    from .io import _ESCAPED_COLON, MAX_HEADER_BYTES, MAX_TENSORS

    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        return None
    n = int.from_bytes(head, "little")
    if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
        return None
    raw = os.pread(fd, n, 8)
    if len(raw) < n or (b"\\u003" in raw and _ESCAPED_COLON.search(raw)):
        return None
    # (each counted name takes 14 bytes of its own: a header this short cannot hold too many)
    if len(raw) > 14 * MAX_TENSORS and raw.count(b'"data_offsets"') > MAX_TENSORS:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.startswith('{"__metadata__":{'):
        try:
            meta, end = _DECODER.raw_decode(text, 16)
        except (ValueError, RecursionError):
            return None
        if type(meta) is not dict:
            return None
        colons = 1 + len(meta)  # outside strings: after "__metadata__" and one per pair
        for k, v in meta.items():
            if type(v) is not str:
                return None
            colons += k.count(":") + v.count(":")
        if text.count(":", 0, end) != colons:
            return None  # a name given twice in the metadata: the full reading words it
        rest, tag = text[end:], "m"
        if not rest.startswith((",", "}")):
            return None
    elif "__metadata__" not in text:
        meta, rest, tag = {}, text, "-"
    else:
        return None
    if '"__metadata__"' in rest:
        return None
    return n, meta, (tag, hashlib.sha256(rest.rstrip(_WS).encode("utf-8")).digest())


def _peft_side(path: str, meta: dict) -> bool:
    """Whether a PEFT config gives this file's alphas (then no memo)."""
    return "lora_adapter_metadata" in meta or os.path.isfile(os.path.join(os.path.dirname(path),
                                                                             "adapter_config.json"))


def _hints(meta: dict) -> tuple:
    from .detect import is_v_prediction, metadata_hint

    return metadata_hint(meta), is_v_prediction(meta)


def _small_bytes(fd: int, start: int, st: "_Struct"):
    """key -> raw bytes of every small tensor (one read when they lie close together)."""
    lo, hi = st.small_span
    out = {}
    if hi - lo <= (1 << 20):
        buf = os.pread(fd, hi - lo, start + lo)
        for key, b, nb, _ in st.small:
            out[key] = buf[b - lo:b - lo + nb]
    else:
        for key, b, nb, _ in st.small:
            out[key] = os.pread(fd, nb, start + b)
    return out


def _memo_scan(path: str, base):
    """(entry, None) from the memo; (None, (structs, split, size)) when the full reading must
    run (it then stores what it found when the file is plain); (None, None) otherwise."""
    structs = _memo_structs(base)
    if structs is None or not path.lower().endswith(SAFETENSORS_EXTENSIONS):
        return None, None
    import stat as _stat

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None, None
    try:
        fst = os.fstat(fd)
        if not _stat.S_ISREG(fst.st_mode):
            return None, None
        size = fst.st_size
        split = _split_header(fd, size)
        if split is None:
            return None, None
        n, meta, key = split
        if _peft_side(path, meta):
            return None, None
        miss = (None, (structs, split, size))
        st = structs.get(key)
        if st is None:
            return miss
        start = 8 + n
        if start + st.max_end > size:
            return miss
        from .fastpath import _decode, _max_alpha, _plainly_finite

        raw = _small_bytes(fd, start, st) if st.small else {}
        for dt, keys, nbytes in st.small_by_dtype:  # (whole elements joined: the bytewise test is per element)
            blob = b"".join([raw[k] for k in keys])
            if len(blob) != nbytes or not _plainly_finite(dt, blob):
                return miss
        dec = {}
        vkey = tuple(raw[k] for k in st.keyed)
        hints = _hints(meta)
        tmpl = st.rows.get((hints, vkey))
        if tmpl is None:
            return miss
        alphas: dict = {}
        maxa = _max_alpha()
        for dt, keys in st.alpha_by_dtype:  # (one value each)
            vals = [float(v) for v in _decode(dt, b"".join([raw[k] for k in keys]))]
            if len(vals) != len(keys) or not all(map(math.isfinite, vals)) or max(map(abs, vals)) > maxa:
                return miss
            dec.update(zip(keys, vals))
        for k in st.alpha_counted:
            a = f"{dec[k]:g}"
            alphas[a] = alphas.get(a, 0) + 1
        _MEMO["where"][path] = (key, start, size, fst.st_mtime_ns)
        # in a worker process: sampled now (the worker that samples later may not know the structure)
        sample = _sample_spans(fd, start, st.spans) if _WORKER_STATE.get("eager") else None
    finally:
        os.close(fd)
    from .metadata import training_info, trigger_words

    READS["small"] += st.n_small
    READS["memo"] += 1
    trig = trigger_words(meta)
    training_info(meta)
    row = dict(tmpl)
    row["path"] = path
    row["name"] = os.path.splitext(os.path.basename(path))[0]
    row["size"] = size
    row["types"], row["ranks"] = dict(tmpl["types"]), dict(tmpl["ranks"])
    row["alphas"] = dict(sorted(alphas.items(), key=lambda kv: float(kv[0])))
    row["triggers"] = trig[:5]
    meta_hash = str(meta.get("sshs_model_hash", "") or "")
    row["hash"], row["hash_source"] = (meta_hash[:12], "metadata") if len(meta_hash) >= 12 else (None, None)
    row["problems"] = list(tmpl["problems"])
    return {"row": row, "sig": st.sig, "sample": sample}, None


def _memo_store(path: str, todo, lora, entry) -> None:
    """After the full reading of a plain file: remember its structure and row."""
    structs, (n, meta, key), size = todo
    entries = getattr(lora, "st_entries", None)
    if entries is None or getattr(lora, "st_data_start", None) != 8 + n:
        return
    st = structs.get(key)
    if st is None:
        from .io import _ST_DTYPES

        st = _Struct()
        st.max_end = max((e.end for e in entries.values()), default=0)
        small = [(k, e.begin, e.end - e.begin, e.dtype_name) for k, e in entries.items()
                 if e.end - e.begin <= SMALL * _ST_DTYPES[e.dtype_name][0]]
        st.n_small = sum(1 for e in entries.values() if e.end == e.begin or _numel(e.shape) <= SMALL)
        st.small = [s for s in small if s[2] > 0]
        st.small_span = (min((s[1] for s in st.small), default=0), max((s[1] + s[2] for s in st.small), default=0))
        alpha_keys, counted = [], []
        for g in lora.groups.values():
            k = g.keys.get("alpha")
            if k is not None:
                alpha_keys.append((k, entries[k].dtype_name))
                if g.adapter is not None:
                    counted.append(k)
        small_keys = {s[0] for s in st.small}
        if any(k not in small_keys for k, _ in alpha_keys):
            return
        st.alpha_checks, st.alpha_counted = alpha_keys, counted
        by_dt: dict = {}
        for k, dt in alpha_keys:
            by_dt.setdefault(dt, []).append(k)
        st.alpha_by_dtype = list(by_dt.items())
        by_dt = {}
        for k, b, nb, dt in st.small:
            by_dt.setdefault(dt, []).append((k, nb))
        st.small_by_dtype = [(dt, [k for k, _ in ks], sum(nb for _, nb in ks)) for dt, ks in by_dt.items()]
        alpha_set = {k for k, _ in alpha_keys}
        st.keyed = [s[0] for s in st.small if s[0] not in alpha_set]
        st.sig = entry["sig"]
        st.entries, st._spans, st._order = entries, None, None
        st.rows = {}
        structs[key] = st
        _MEMO["held"] += len(entries)
        while _MEMO["held"] > MEMO_TENSORS and len(structs) > 1:  # bounded memory on huge libraries
            old = structs.pop(next(iter(structs)))
            _MEMO["held"] -= len(old.entries)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = _small_bytes(fd, 8 + n, st)
            fst = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError:
        return
    if fst.st_size == size:
        _MEMO["where"][path] = (key, 8 + n, size, fst.st_mtime_ns)
    if any(len(raw[k]) < nb for k, b, nb, dt in st.small):
        return
    tmpl = dict(entry["row"])
    if structs.get(key) is not st:
        return
    structs[key].rows[(_hints(meta), tuple(raw[k] for k in st.keyed))] = tmpl


#: pickle structures remembered at most
PICKLE_MEMO_ROWS = 256


def _pickle_memo_scan(path: str, base):
    """The structure memo for pickles: files whose names, dtypes, shapes, small tensors (their
    bytes) and metadata are the same get the same row but for path, name and size, so the
    row is computed (typing, detection, binding) once. Names, shapes and the few bytes needed
    come from :mod:`pickle_index` (no torch, nothing run) where it vouches for the file, else
    from torch's safe loader. (entry, None) on a hit; (None, (memo, key)) when the full reading
    must run and may store its row; (None, None) otherwise."""
    if _memo_structs(base) is None or not path.lower().endswith(PICKLE_EXTENSIONS):
        return None, None
    structs = _MEMO["pickles"]
    while len(structs) >= PICKLE_MEMO_ROWS:  # bounded: the oldest go first
        structs.pop(next(iter(structs)))
    from . import pickle_index
    from .io import MAX_NDIM, MAX_TENSORS

    try:
        index = pickle_index.read(path, MAX_TENSORS, MAX_NDIM)
        if index is not None:
            with index:
                got = _pickle_key(index.names, lambda k: (index.tensors[k].dtype, index.tensors[k].shape),
                                  lambda k, n=None: index.read_bytes(k, n), {}, structs)
        else:
            with open_tensors(path, kind="lora") as tf:
                got = _pickle_key(list(tf.keys()), lambda k: (tf.dtype_str(k), tuple(tf.shape(k))),
                                  lambda k, n=None: _tensor_bytes(tf.get(k, check_finite=False).reshape(-1)[:n]),
                                  tf.metadata, structs)
    except LoraExtError:
        return None, None  # the full reading words it
    except pickle_index.Unreadable:
        return None, None
    if got[0] is None:
        return None, (structs, got[1])
    tmpl, sig, sample = got
    READS["memo"] += 1
    row = dict(tmpl)
    row["path"] = path
    row["name"] = os.path.splitext(os.path.basename(path))[0]
    row["size"] = os.path.getsize(path)
    for k in ("types", "ranks", "alphas"):
        if isinstance(row.get(k), dict):
            row[k] = dict(row[k])
    row["problems"] = list(row.get("problems", []))
    return {"row": row, "sig": sig, "sample": sample}, None


def _pickle_key(keys, dtype_shape, first_bytes, metadata, structs):
    """(row template, shape signature, sample) of a pickle whose structure the memo holds, or
    (None, memo key). ``first_bytes(name, n)``: the first ``n`` bytes of a tensor (all: None)."""
    shapes = [dtype_shape(k) for k in keys]
    small = sorted((k, bytes(first_bytes(k))) for k, (_, shape) in zip(keys, shapes) if _numel(shape) <= SMALL)
    h = hashlib.sha256(repr(sorted(zip(keys, shapes))).encode())
    h.update(repr(small).encode())
    h.update(json.dumps(metadata, sort_keys=True, default=str).encode())
    key = h.digest()
    tmpl = structs.get(key)
    if tmpl is None:
        return None, key
    sig = hashlib.sha256(repr(sorted(shapes)).encode()).hexdigest()
    chosen = _sampled(shapes)
    items = []
    for k, ds in zip(keys, shapes):
        if ds in chosen:
            READS["sample"] += 1
            items.append(bytes(first_bytes(k, _SAMPLE_BYTES))[:_SAMPLE_BYTES])
    return tmpl, sig, _sample_digest(items)


# --- one row ------------------------------------------------------------------------------------
def _err_text(exc, path) -> str:
    text = str(exc)
    for p in (str(path) + ": ", os.path.abspath(path) + ": "):
        if text.startswith(p):
            return text[len(p):]
    return text


def scan_file(path: str, base=None, full: bool = False) -> dict:
    """The cache entry body for one file: ``row`` (what the table shows), ``sig`` (shape
    signature), and, with ``full``, content fingerprint, hash and NaN/Inf verdict."""
    from .inspect_any import inspect_any

    got, store = _memo_scan(path, base)
    if got is None and store is None:
        got, pstore = _pickle_memo_scan(path, base)
    else:
        pstore = None
    if got is not None:
        return _with_full(got, path, full)
    row = {"path": path, "name": os.path.splitext(os.path.basename(path))[0]}
    try:
        row["size"] = os.path.getsize(path)
    except OSError:
        row["size"] = None
    entry = {"row": row, "sig": None, "sample": None}
    fast_read = False
    try:
        try:
            lora = load_lora_shapes(path, lazy_sample=not _WORKER_STATE.get("eager"))
            sig = lora.shape_signature
            entry["sample"] = lora.sample_fingerprint
        except _NeedsData:
            from .network import load_lora

            READS["full"] += 1
            lora = load_lora(path)
            sig = None
        from .fastpath import NeedsFullPath

        try:
            info = inspect_any(path, base, lora=lora, addnet=False)
            fast_read = getattr(lora, "st_entries", None) is not None
        except NeedsFullPath:  # noqa  # a group for the structural auto-detector: adapters on meta tensors
            with open_tensors(path, kind="lora") as tf:
                meta = _load_meta(path, tf)
            meta.shape_signature, meta.sample_fingerprint = lora.shape_signature, lora.sample_fingerprint
            lora = meta
            entry["sample"] = None
            info = inspect_any(path, base, lora=lora, addnet=False)
    except LoraExtError as exc:
        problem = _err_text(exc, path)
        kind = "NaN/Inf" if (" NaN" in problem or " Inf" in problem) else "unreadable"
        row.update(base_model="-", types={}, ranks={}, triggers=[], hash=None, hash_source=None,
                   problems=[f"{kind}: {problem}"])
        return entry
    entry["sig"] = sig
    row.update(
        format=info["format"], container=info["container"], base_model=info["base_model"],
        base_model_label=info["base_model_label"], types=info["types"], modules=info["typed_modules"],
        ranks=info["ranks"], alphas=info["alphas"], triggers=info["trigger_words"][:5],
        keys=info["keys"], applied_keys=info["applied_keys"], bound_to=info["bound_to"],
    )
    meta_hash = str(lora.metadata.get("sshs_model_hash", "") or "")
    row["hash"], row["hash_source"] = (meta_hash[:12], "metadata") if len(meta_hash) >= 12 else (None, None)
    problems = []
    if info["base_model"] == "unknown" and base is None:
        problems.append("base model unknown")
    n_not = len(info["unmatched"])
    if n_not and info["bound_to"]:
        mods = sum(g["modules"] for g in info["not_applied"])
        problems.append(f"{n_not} keys ({mods} modules) not applied to {info['bound_to']}: "
                        f"{info['not_applied'][0]['reason']}" + (" ..." if len(info["not_applied"]) > 1 else ""))
    if info.get("wrong_base"):
        problems.append(f"wrong base: {info['wrong_base']}")
    if info["unclaimed_groups"]:
        problems.append(f"{len(info['unclaimed_groups'])} key groups of no known type")
    row["problems"] = problems
    if store is not None and fast_read:
        _memo_store(path, store, lora, entry)
    if pstore is not None:
        pstore[0][pstore[1]] = dict(row)
    return _with_full(entry, path, full)


def _with_full(entry: dict, path: str, full: bool) -> dict:
    """``--full``: every tensor read, NaN/Inf checked, A1111's hash computed."""
    if full:
        row = entry["row"]
        entry.update(full_read(path, check=True))
        if entry.get("hash"):
            row["hash"], row["hash_source"] = entry["hash"][:12], "computed"
        if entry.get("nan"):
            row["problems"] = list(row["problems"]) + [f"NaN/Inf: {entry['nan']}"]
    return entry


# --- the cache ----------------------------------------------------------------------------------
def default_cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lora-ext", "inspect-cache.json")


class Cache:
    def __init__(self, path: Optional[str]):
        self.path = path
        self.entries: dict = {}
        self.dirty = False
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
                if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
                    self.entries = data.get("files") or {}
            except (OSError, ValueError):
                self.entries = {}  # an unreadable cache is rebuilt

    def save(self) -> None:
        if not self.path or not self.dirty:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".inspect-cache-", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                # (dumps, then one write: json.dump encodes piece by piece in Python, ~5x slower)
                fh.write(json.dumps({"version": CACHE_VERSION, "files": self.entries}))
            os.replace(tmp, self.path)
        except OSError as exc:
            print(f"warning: cannot write the inspect cache {printable(self.path)} ({printable(exc)})", file=sys.stderr)


#: a change time this close to the scan that cached the file is not trusted (a write in the
#: same tick of a coarse clock, as on network or FAT file systems, leaves it as it was)
CHANGE_TIME_SLACK_NS = 3_000_000_000


def _stamp(path: str):
    """(size, mtime, change): ``change`` is the inode's identity and change time on POSIX, which
    no program sets back (writing a file, then restoring its mtime, moves it), else None."""
    st = os.stat(path)
    change = f"{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}" if os.name == "posix" else None
    return st.st_size, st.st_mtime_ns, change, st.st_ctime_ns


def _unchanged_since_cached(e: dict, change, ctime_ns: int) -> bool:
    """Whether the cache entry ``e`` (size and mtime already equal) can be trusted without
    reading the header: the same inode with the same change time, well before that entry's scan."""
    return change is not None and e.get("change") == change and ctime_ns < e.get("seen", 0) - CHANGE_TIME_SLACK_NS


def _base_key(base) -> str:
    if base is None:
        return ""
    try:
        st = os.stat(base.path)
        return f"{os.path.abspath(base.path)}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return os.path.abspath(base.path)


# --- the whole library --------------------------------------------------------------------------
_WORKER_STATE: dict = {}


def _work(job):
    path, full = job
    try:
        return path, scan_file(path, _WORKER_STATE.get("base"), full), dict(READS)
    except Exception as exc:  # a bug must not stop the library: the row says what failed
        return path, {"row": {"path": path, "name": os.path.basename(path), "size": None, "base_model": "-",
                              "types": {}, "ranks": {}, "triggers": [], "hash": None,
                              "problems": [f"unreadable: internal error ({type(exc).__name__}: {exc})"]},
                      "sig": None}, dict(READS)


def _work_batch(jobs: list) -> list:
    out = []
    for job in jobs:
        path, res, reads = _work(job)
        if _WORKER_STATE.get("eager") and res.get("sample") is not None:
            # a worker knows the data layout of what it scanned (its memo): the parent, which
            # compares duplicates, would have to parse the header again
            lay = _data_layout(path) if path.lower().endswith(SAFETENSORS_EXTENSIONS) else None
            if lay is not None:
                res = dict(res, layout=lay)
        out.append((path, res, reads))
    return out


#: files of one header structure handed to a worker at once, at most
BATCH_FILES = 256


def _batches(todo: list) -> list:
    """The files to scan, in batches for the worker processes: the files of one header
    structure stay together (the worker that reads the first one types, detects and binds it,
    with the key maps that takes, and the rest of the batch reuse that from its memo), and the
    costliest batches go first, so that the workers finish together (a structure's first file
    costs ~10-300 ms, each further one ~0.5 ms, a pickle ~10 ms: torch.load, ~1 ms once its
    structure is known: counted at 10, as which pickles repeat is not known before reading)."""
    groups: dict = {}
    for p in todo:
        key = None
        if p.lower().endswith(SAFETENSORS_EXTENSIONS):
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    split = _split_header(fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
                key = ("s", split[2]) if split is not None else None
            except OSError:
                pass
        groups.setdefault(key if key is not None else ("f", p), []).append(p)
    batches = []
    for key, paths in groups.items():
        for i in range(0, len(paths), BATCH_FILES):
            part = paths[i:i + BATCH_FILES]
            cost = (20 + 0.5 * len(part)) if key[0] == "s" else 10 * len(part)
            batches.append((cost, part))
    # the single files (pickles, odd headers) in batches of about one structure's cost
    singles = [p for c, part in batches if len(part) == 1 for p in part]
    batches = [(c, part) for c, part in batches if len(part) > 1]
    for i in range(0, len(singles), 4):
        batches.append((10 * len(singles[i:i + 4]), singles[i:i + 4]))
    batches.sort(key=lambda cb: -cb[0])
    return [_Batch(part, cost) for cost, part in batches]


class _Batch(list):
    """Files for one worker task, with the estimated cost (ms) that ordered it."""

    def __init__(self, paths, cost: float):
        super().__init__(paths)
        self.cost = cost


def _batch_cost(batches) -> float:
    return sum(b.cost for b in batches)


#: a scan whose batches are estimated below this (ms) runs in one process when ``--jobs`` is
#: not given: forking, and each worker building its own key maps and memo, cost more (measured
#: on the 320-file benchmark library, ~0.76 s estimated: one process 0.65-0.94 s, two 0.71-0.75 s
#: for 1.5x the CPU)
PARALLEL_ABOVE_MS = 2000


#: data layouts (``_data_layout``) the worker processes sent with their rows, for this scan
_LAYOUTS: dict = {}


def _worker_init() -> None:
    # one process per core: torch's own threads would only contend
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    else:  # torch, if a pickle needs it, starts single-threaded
        os.environ["OMP_NUM_THREADS"] = "1"


#: below this many files to scan, one process: forking and each worker's own key maps cost more
SERIAL_BELOW = 32


def _default_jobs(n: int) -> int:
    """Worker processes when ``--jobs`` is not given: one per idle core (CPU count less the
    load average, at least one), and one for a small scan."""
    cpus = os.cpu_count() or 1
    if n < SERIAL_BELOW or cpus == 1:
        return 1
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        busy = 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def _fast() -> bool:
    from .fastpath import available

    return available()


def _fresh_fast_data(todo) -> None:
    """Stale precomputed layouts (sources changed since ``python -m lora_ext.fastdata --write``):
    write a current copy to the user cache once, so that this scan and later ones read
    safetensors files without torch (the full path would give the same rows, slower)."""
    if not todo or _fast() or os.environ.get("LORA_EXT_NO_FAST_INSPECT"):
        return
    from . import fastdata, fastpath

    fastdata.refresh_user_cache()
    fastdata.load.cache_clear()
    fastpath._ready.cache_clear()
    fastpath.MODELS.clear()


def _warm_layouts() -> None:
    """Build, before forking, the key maps every file is bound against (SD1.x/SD2.x/SDXL; the
    DiT variants only for the files whose names need them): the workers share them."""
    from .fastpath import MODELS, available
    from .layouts import SD_ARCHS, arch_keymap

    for name in SD_ARCHS:
        if available():
            MODELS.keymap(name)
        else:
            arch_keymap(name)


def scan_library(paths, *, base=None, full: bool = False, jobs: Optional[int] = None,
                 cache_path: Optional[str] = None, progress=None) -> dict:
    """Rows for every LoRA file under ``paths``, duplicates flagged. ``base``: a
    ``BaseModelRef`` every file is bound to. Returns {"rows": [...], "stats": {...}}."""
    import gc

    # each file leaves little cyclic garbage, while the key maps and tables are ~10^6 live
    # objects that every full collection would walk again: collect less often meanwhile
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], 100_000), *old[1:])
    try:
        return _scan_library(paths, base=base, full=full, jobs=jobs, cache_path=cache_path, progress=progress)
    finally:
        gc.set_threshold(*old)


def _scan_library(paths, *, base, full, jobs, cache_path, progress) -> dict:
    files = find_lora_files(paths)
    cache = Cache(cache_path)
    bkey = _base_key(base) + ("|full" if full else "")
    rows: dict = {}
    entries: dict = {}
    todo = []
    stats = Counter(files=len(files))
    now = time.time_ns()  # (before any file is read: a change after it is not taken as seen)
    for p in files:
        a = os.path.abspath(p)
        e = cache.entries.get(a)
        try:
            size, mtime, change, ctime = _stamp(p)
            if e and e.get("size") == size and e.get("mtime") == mtime and _unchanged_since_cached(e, change, ctime):
                hh = e.get("hh")
            else:
                hh = header_hash(p)
        except OSError as exc:
            rows[p] = {"path": p, "name": os.path.basename(p), "size": None, "base_model": "-", "types": {},
                       "ranks": {}, "triggers": [], "hash": None,
                       "problems": [f"unreadable: {exc.strerror or exc}"]}
            continue
        if e and e.get("size") == size and e.get("mtime") == mtime and e.get("hh") == hh \
                and bkey in e.get("rows", {}) and (not full or "content" in e):
            if e.get("change") != change:  # (the header read says unchanged: trusted next time)
                e["change"], e["seen"] = change, now
                cache.dirty = True
            entries[p] = e
            rows[p] = dict(e["rows"][bkey], path=p)
            stats["cached"] += 1
            continue
        if not e or e.get("size") != size or e.get("mtime") != mtime or e.get("hh") != hh:
            e = {"size": size, "mtime": mtime, "hh": hh, "change": change, "seen": now, "rows": {}}
        entries[p] = e
        todo.append(p)
    batches = None
    if jobs is None:
        jobs = _default_jobs(len(todo))
        if jobs > 1:  # forking pays only where there is enough work to share
            batches = _batches(todo)
            if _batch_cost(batches) < PARALLEL_ABOVE_MS:
                jobs = 1
    jobs = max(1, min(jobs, len(todo) or 1))
    stats["jobs"] = jobs
    show = progress if progress is not None else sys.stderr.isatty()
    done = 0

    def tick():
        if show:
            print(f"\rinspect: {done + stats['cached']}/{len(files)} files", end="", file=sys.stderr, flush=True)

    def take(p, res, reads):
        e = entries[p]
        e["rows"][bkey] = res["row"]
        e["sig"] = res.get("sig")
        if res.get("sample") is not None:
            e["sample"] = res["sample"]
        else:  # (safetensors) sampled only if another file has the same shapes
            e.pop("sample", None)
        for k in ("content", "hash", "nan", "order"):
            if k in res:
                e[k] = res[k]
        rows[p] = dict(res["row"])
        cache.entries[os.path.abspath(p)] = e
        cache.dirty = True
        if res.get("layout") is not None:
            _LAYOUTS[p] = tuple(res["layout"])

    _WORKER_STATE["base"] = base
    _WORKER_STATE["eager"] = False
    _LAYOUTS.clear()
    _MEMO["where"] = {}  # (where this scan found each file's structure: for its samples and hashes)
    _fresh_fast_data(todo)
    pooled = False
    if todo and jobs > 1 and "fork" in __import__("multiprocessing").get_all_start_methods():
        import multiprocessing as mp

        _warm_layouts()  # built once, shared by the forked workers
        if any(not p.lower().endswith(SAFETENSORS_EXTENSIONS) for p in todo) or not _fast():
            import torch  # noqa: F401  (pickles or meta tensors need it: imported once, not per worker)
        _WORKER_STATE["eager"] = True  # (forked: the workers sample every file they scan)
        import gc

        # the objects made so far (torch's, the key maps) stay out of the workers' collections:
        # a collection touches every object it tracks, copying the parent's pages into each child
        gc.freeze()
        try:
            with mp.get_context("fork").Pool(jobs, initializer=_worker_init) as pool:
                for batch in pool.imap_unordered(_work_batch, [[(p, full) for p in b] for b in (batches or _batches(todo))]):
                    for p, res, reads in batch:
                        take(p, res, reads)
                        done += 1
                    tick()
                if show:
                    print(file=sys.stderr)
                stats["scanned"] = len(todo)
                _flag_duplicates(files, rows, entries, cache, stats, pool)
                pooled = True
            _WORKER_STATE["eager"] = False
        finally:
            gc.unfreeze()
    else:
        for p in todo:
            _, res, _ = _work((p, full))
            take(p, res, None)
            done += 1
            tick()
    if not pooled:
        if show:
            print(file=sys.stderr)
        stats["scanned"] = len(todo)
        _flag_duplicates(files, rows, entries, cache, stats)
    cache.save()
    return {"rows": [rows[p] for p in files if p in rows], "stats": dict(stats)}


def _full_one(path):
    try:
        return path, full_read(path, content=False)
    except LoraExtError:
        return path, None


def _sample_path(path: str):
    """``_sample`` of one file (the structure memo gives a safetensors file's spans when a file
    of the same structure was read in this process)."""
    if path.lower().endswith(SAFETENSORS_EXTENSIONS):
        got = _data_layout(path, samples=True)
        if got is not None:
            return path, got
    try:
        with open_tensors(path, kind="lora") as tf:
            return path, _sample(tf)
    except LoraExtError:
        return path, None


def _data_layout(path: str, samples: bool = False):
    """From the structure memo: the sample (``samples``) or (data start, file size, order hash,
    tensors) of a safetensors file (the layout read from its header when its structure is not in
    the memo; the sample: None then)."""
    if not STRUCTURE_MEMO:
        return None if samples else _layout_from_header(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fst = os.fstat(fd)
        size = fst.st_size
        where = _MEMO["where"].get(path)
        if where is not None and where[2:] == (size, fst.st_mtime_ns):  # (scanned in this process)
            st, start = _MEMO["structs"].get(where[0]), where[1]
        else:
            split = _split_header(fd, size)
            st = _MEMO["structs"].get(split[2]) if split is not None else None
            start = 8 + split[0] if split is not None else 0
        if st is None:
            return None if samples else _layout_from_header(path)
        if samples:
            return _sample_spans(fd, start, st.spans)
        return start, size, st.order, len(st.entries), st.max_end
    finally:
        os.close(fd)


def _layout_from_header(path: str):
    """``_data_layout``'s tuple from the file's own header, for a file whose structure this
    process has not memoised (scanned by a worker process)."""
    from .io import DTYPE_STR

    try:
        with open_tensors(path, kind="lora") as tf:
            if tf.format != "safetensors":
                return None
            entries = sorted(tf._entries.values(), key=lambda e: e.begin)
            order = hashlib.sha256(repr([(DTYPE_STR[e.dtype_name], e.shape) for e in entries]).encode()).hexdigest()
            return tf.data_start, tf.file_size, order, len(entries), max((e.end for e in entries), default=0)
    except LoraExtError:
        return None


def _same_bytes(a: str, a_start: int, b: str, b_start: int, n: int) -> bool:
    """Whether ``n`` bytes of ``a`` from ``a_start`` equal those of ``b`` from ``b_start``: compared
    through read-only maps, 4 MiB at a time (~8.5 GB/s a file here, against sha256's 1.3)."""
    import mmap

    import numpy as np

    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size < a_start + n or os.fstat(fb.fileno()).st_size < b_start + n:
            return False
        if n == 0:
            return True
        with mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as ma, \
                mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as mb:
            step = 4 << 20  # (a multiple of 8: compared as 64-bit words, ~1.6x faster than bytes)
            for off in range(0, n, step):
                m = min(step, n - off)
                w = m // 8
                if w and not np.array_equal(np.frombuffer(ma, np.uint64, w, a_start + off),
                                            np.frombuffer(mb, np.uint64, w, b_start + off)):
                    return False
                t = 8 * w  # the last few bytes
                if m > t and ma[a_start + off + t:a_start + off + m] != mb[b_start + off + t:b_start + off + m]:
                    return False
    return True


def _data_key(e: dict):
    """What says which data a file holds, from its cache entry: the content fingerprint
    (``--full``), A1111's hash with the data order, or the token of a byte comparison."""
    if "content" in e:
        return ("c", e["content"])
    if "hash" in e and "order" in e:
        return ("o", e["order"], e["hash"])
    if "same" in e:
        return ("s", e["same"])
    return None


def _same_data(same: list, entries: dict, read: set, changed: list) -> dict:
    """Split files with the same shapes and samples into classes of byte-identical data.

    A file already classed (its entry has a data key, from the cache or ``--full``) keeps its
    class. Each other file is compared byte for byte with one member of every class whose data
    area has its size and order (``_same_bytes``): equal bytes join that class and take its key;
    otherwise it starts a class with a fresh token. The tokens are kept in the cache, so an
    unchanged library is not read again; a changed file loses its entry, and so its token, and
    is compared again. Files whose data area the memo does not describe are fingerprinted by
    ``full_read`` instead."""
    classes: dict = {}
    for p in same:
        k = _data_key(entries[p])
        if k is not None:
            classes.setdefault(k, []).append(p)
    layouts: dict = {}

    def layout(p):
        if p not in layouts:
            lay = _LAYOUTS.get(p) or _data_layout(p)
            layouts[p] = lay if lay is not None and lay[4] == lay[1] - lay[0] else None
        return layouts[p]

    for p in same:
        e = entries[p]
        if _data_key(e) is not None:
            continue
        lay = layout(p)
        joined = None
        if lay is not None:
            for k, members in classes.items():
                r = members[0]
                rlay = layout(r)
                if rlay is not None and rlay[2] == lay[2] and rlay[4] == lay[4]:
                    READS["full"] += (lay[3] if p not in read else 0) + (rlay[3] if r not in read else 0)
                    read.update((p, r))
                    if _same_bytes(r, rlay[0], p, lay[0], lay[4]):
                        joined = k
                        break
        changed.append(p)
        if joined is None:
            if lay is not None:
                e["same"] = os.urandom(8).hex()
            else:
                got = _full_one(p)[1]
                if got is None:
                    continue
                read.add(p)
                e.update(got)
            joined = _data_key(e)
        else:
            r = entries[classes[joined][0]]
            for f in ("content", "hash", "order", "same"):
                if f in r:
                    e[f] = r[f]
        classes.setdefault(joined, []).append(p)
    return classes


def _flag_duplicates(files, rows, entries, cache, stats, pool=None) -> None:
    """Files holding the same tensors (names, order and metadata aside): candidates by shape
    signature, then by a 32-byte sample of every tensor (read only for files whose shape
    signature another file shares; in ``pool``'s worker processes when given), confirmed by the
    data: files whose tensors lie in the same order are compared byte for byte
    (``_same_data``); files in other orders by a hash of every tensor."""
    by_sig: dict = {}
    for p in files:
        e = entries.get(p)
        if e and e.get("sig") and not any(x.startswith("unreadable") for x in rows[p].get("problems", [])):
            by_sig.setdefault(e["sig"], []).append(p)
    unsampled = [p for group in by_sig.values() if len(group) > 1 for p in group if entries[p].get("sample") is None]
    if pool is not None and len(unsampled) > 1:
        got = dict(pool.imap_unordered(_sample_path, unsampled, chunksize=max(1, len(unsampled) // 16)))
    else:
        got = dict(_sample_path(p) for p in unsampled)
    for p, sample in got.items():
        if sample is not None:
            entries[p]["sample"] = sample
            cache.dirty = True
    groups = []
    for group in by_sig.values():
        if len(group) < 2:
            continue
        by_sample: dict = {}
        for p in group:
            e = entries[p]
            if e.get("sample"):
                by_sample.setdefault(e["sample"], []).append(p)
        groups += [same for same in by_sample.values() if len(same) >= 2]
    read = set()
    changed: list = []
    for same in groups:
        classes = _same_data(same, entries, read, changed)
        if len(classes) > 1:  # other data, or the same tensors in another order: compare every tensor
            for members in classes.values():
                if "content" not in entries[members[0]]:
                    try:
                        got = full_read(members[0])
                    except LoraExtError:
                        continue
                    read.add(members[0])
                    for p in members:
                        entries[p]["content"] = got["content"]
                    changed.append(members[0])
            by_content: dict = {}
            for members in classes.values():
                c = entries[members[0]].get("content")
                by_content.setdefault(("c", c) if c else ("k", id(members)), []).extend(members)
            classes = by_content
        for dup in classes.values():
            if len(dup) < 2:
                continue
            first = dup[0]
            for p in dup:
                e = entries[p]
                if e.get("hash") and rows[p].get("hash_source") != "computed":  # (--full, or an older cache)
                    rows[p]["hash"], rows[p]["hash_source"] = e["hash"][:12], "computed"
                others = [os.path.basename(q) for q in dup if q != p]
                rows[p]["duplicates"] = [q for q in dup if q != p]
                rows[p]["problems"] = list(rows[p].get("problems", [])) + [
                    (f"duplicate of {os.path.basename(first)}" if p != first else
                     f"same tensors as {', '.join(others[:3])}" + (" ..." if len(others) > 3 else ""))]
    hashed = read
    if changed:
        cache.dirty = True
    stats["hashed"] += len(hashed)
    # the cached rows keep no duplicate notes (they depend on the other files): recomputed each run


# --- output -------------------------------------------------------------------------------------
COLUMNS = ("name", "base", "types", "ranks", "size", "triggers", "hash", "problems")


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _cells(row) -> dict:
    base = row.get("base_model_label") or row.get("base_model") or "-"
    return {
        "name": row.get("name", ""),
        "base": base,
        "types": ", ".join(f"{k} {v}" for k, v in (row.get("types") or {}).items()) or "-",
        "ranks": ",".join((row.get("ranks") or {}).keys()) or "-",
        "size": _size(row.get("size")),
        "triggers": ", ".join(row.get("triggers") or []) or "-",
        "hash": (row.get("hash") or "-") + ("*" if row.get("hash_source") == "metadata" else ""),
        "problems": "; ".join(row.get("problems") or []) or "ok",
    }


def render_table(rows, *, width: int = 48) -> str:
    cells = [{k: printable(v) for k, v in _cells(r).items()} for r in rows]
    widths = {c: min(width if c != "problems" else 10_000, max([len(c)] + [len(x[c]) for x in cells])) for c in COLUMNS}
    clip = lambda s, w: s if len(s) <= w else s[: w - 1] + "…"  # noqa: E731
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip()]
    for x in cells:
        lines.append("  ".join(clip(x[c], widths[c]).ljust(widths[c]) for c in COLUMNS).rstrip())
    return "\n".join(lines)


def render_csv(rows) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS + ("path",))
    for r in rows:
        c = _cells(r)
        w.writerow([c[k] for k in COLUMNS] + [r.get("path", "")])
    return buf.getvalue()


def summary_line(result) -> str:
    rows, s = result["rows"], result["stats"]
    bad = sum(1 for r in rows if r.get("problems"))
    dups = sum(1 for r in rows if r.get("duplicates"))
    return (f"{len(rows)} files: {len(rows) - bad} ok, {bad} with problems ({dups} duplicates); "
            f"{s.get('cached', 0)} from cache, {s.get('scanned', 0)} scanned, {s.get('hashed', 0)} read in full")
