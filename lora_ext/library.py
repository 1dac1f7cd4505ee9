"""Library mode of ``lora-ext inspect``: every LoRA file under some folders, one row each.

Per file it reads the header and the few small tensors the report needs (alphas and other
tensors of at most :data:`SMALL` values); every other tensor stands in as a ``meta`` tensor of
its shape and dtype, so types, ranks, detection and binding cost no tensor data. Tensor data is
read only where a check needs it: confirming duplicates (files whose tensor shapes *and* a
32-byte sample of every tensor agree are hashed in full) and ``--full`` (every tensor checked
for NaN/Inf, A1111's hash computed).

Files are scanned in parallel processes (forked after the full-size layouts are built once).
Each file's result is cached by absolute path with its size, mtime and a hash of its header
(``--cache PATH``; default ``$XDG_CACHE_HOME/lora-ext/inspect-cache.json``), so a second run
over an unchanged library reads headers only to check them and no tensor data at all.
"""
from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import os
import sys
import tempfile
from collections import Counter
from typing import Optional

from .errors import LoraExtError, LoraFileError
from .io import PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, open_tensors
from .textsafe import printable

LORA_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS
CACHE_VERSION = 1
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
    """sha256 of a safetensors file's header (length + JSON), or of a pickle's first and last
    64 kB: with size and mtime, what the cache is keyed by."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if path.lower().endswith(SAFETENSORS_EXTENSIONS):
            head = fh.read(8)
            h.update(head)
            if len(head) == 8:
                n = int.from_bytes(head, "little")
                size = os.fstat(fh.fileno()).st_size
                if 0 < n <= min(size - 8, 100_000_000):
                    h.update(fh.read(n))
                    return h.hexdigest()
        fh.seek(0)
        h.update(fh.read(65536))
        size = os.fstat(fh.fileno()).st_size
        if size > 131072:
            fh.seek(size - 65536)
            h.update(fh.read(65536))
    return h.hexdigest()


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


def load_lora_shapes(path):
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
        sample = _sample(tf)
        lora = None
        if tf.format == "safetensors":
            from .fastpath import load_fast

            lora = load_fast(path, read_all=False, tf=tf)
            if lora is not None:
                READS["small"] += sum(1 for e in tf._entries.values() if _numel(e.shape) <= SMALL)
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


def _sample(tf) -> Optional[str]:
    """Hash of the first bytes of every tensor with its dtype and shape, names and order left
    out: files with other data almost always differ here (32 bytes read per tensor, while the
    file is open for its header anyway). None when the file is too short for its tensors."""
    items = []
    try:
        if tf.format == "safetensors":
            from .io import DTYPE_STR

            import mmap

            start = tf.data_start
            entries = sorted(tf._entries.values(), key=lambda e: e.begin)
            READS["sample"] += len(entries)
            if not entries:
                return hashlib.sha256(repr([]).encode()).hexdigest()
            try:  # slices of a mapping: no system call per tensor
                mm = mmap.mmap(tf._fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # a file that cannot be mapped: read each sample
                mm = _Reads(tf)
            with mm:
                size = len(mm)
                for e in entries:
                    a = start + e.begin
                    n = min(_SAMPLE_BYTES, e.end - e.begin)
                    if a + n > size:
                        raise LoraFileError(tf.path, f"truncated: the data ends before byte {a + n}")
                    items.append((DTYPE_STR[e.dtype_name], e.shape, mm[a:a + n].hex()))
        else:
            for k in tf.keys():
                READS["sample"] += 1
                t = tf.get(k, check_finite=False).reshape(-1)[:_SAMPLE_BYTES]
                items.append((str(t.dtype), tuple(tf.shape(k)), _tensor_bytes(t)[:_SAMPLE_BYTES].hex()))
    except LoraExtError:
        return None
    return hashlib.sha256(repr(sorted(items)).encode()).hexdigest()


class _Reads:
    """``mmap``'s slicing and length, by reads (for files that cannot be mapped)."""

    def __init__(self, tf):
        self.fd, self.size = tf._fh.fileno(), os.fstat(tf._fh.fileno()).st_size

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

    row = {"path": path, "name": os.path.splitext(os.path.basename(path))[0]}
    try:
        row["size"] = os.path.getsize(path)
    except OSError:
        row["size"] = None
    entry = {"row": row, "sig": None, "sample": None}
    try:
        try:
            lora = load_lora_shapes(path)
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
        except NeedsFullPath:  # noqa  # a group for the structural auto-detector: adapters on meta tensors
            with open_tensors(path, kind="lora") as tf:
                meta = _load_meta(path, tf)
            meta.shape_signature, meta.sample_fingerprint = lora.shape_signature, lora.sample_fingerprint
            lora = meta
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
    if full:
        entry.update(full_read(path, check=True))
        if entry.get("hash"):
            row["hash"], row["hash_source"] = entry["hash"][:12], "computed"
        if entry.get("nan"):
            problems.append(f"NaN/Inf: {entry['nan']}")
    row["problems"] = problems
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
                json.dump({"version": CACHE_VERSION, "files": self.entries}, fh)
            os.replace(tmp, self.path)
        except OSError as exc:
            print(f"warning: cannot write the inspect cache {printable(self.path)} ({printable(exc)})", file=sys.stderr)


def _stamp(path: str):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


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
    for p in files:
        a = os.path.abspath(p)
        try:
            size, mtime = _stamp(p)
            hh = header_hash(p)
        except OSError as exc:
            rows[p] = {"path": p, "name": os.path.basename(p), "size": None, "base_model": "-", "types": {},
                       "ranks": {}, "triggers": [], "hash": None,
                       "problems": [f"unreadable: {exc.strerror or exc}"]}
            continue
        e = cache.entries.get(a)
        if e and e.get("size") == size and e.get("mtime") == mtime and e.get("hh") == hh \
                and bkey in e.get("rows", {}) and (not full or "content" in e):
            entries[p] = e
            rows[p] = dict(e["rows"][bkey], path=p)
            stats["cached"] += 1
            continue
        if not e or e.get("size") != size or e.get("mtime") != mtime or e.get("hh") != hh:
            e = {"size": size, "mtime": mtime, "hh": hh, "rows": {}}
        entries[p] = e
        todo.append(p)
    jobs = max(1, min(jobs or _default_jobs(len(todo)), len(todo) or 1))
    show = progress if progress is not None else sys.stderr.isatty()
    done = 0

    def tick():
        if show:
            print(f"\rinspect: {done + stats['cached']}/{len(files)} files", end="", file=sys.stderr, flush=True)

    def take(p, res, reads):
        e = entries[p]
        e["rows"][bkey] = res["row"]
        e["sig"] = res.get("sig")
        e["sample"] = res.get("sample")
        for k in ("content", "hash", "nan", "order"):
            if k in res:
                e[k] = res[k]
        rows[p] = dict(res["row"])
        cache.entries[os.path.abspath(p)] = e
        cache.dirty = True

    _WORKER_STATE["base"] = base
    _fresh_fast_data(todo)
    pooled = False
    if todo and jobs > 1 and "fork" in __import__("multiprocessing").get_all_start_methods():
        import multiprocessing as mp

        _warm_layouts()  # built once, shared by the forked workers
        if any(not p.lower().endswith(SAFETENSORS_EXTENSIONS) for p in todo) or not _fast():
            import torch  # noqa: F401  (pickles or meta tensors need it: imported once, not per worker)
        with mp.get_context("fork").Pool(jobs, initializer=_worker_init) as pool:
            chunk = max(1, len(todo) // (jobs * 8))
            for p, res, reads in pool.imap_unordered(_work, [(p, full) for p in todo], chunksize=chunk):
                take(p, res, reads)
                done += 1
                tick()
            if show:
                print(file=sys.stderr)
            stats["scanned"] = len(todo)
            _flag_duplicates(files, rows, entries, cache, stats, pool)
            pooled = True
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


def _flag_duplicates(files, rows, entries, cache, stats, pool=None) -> None:
    """Files holding the same tensors (names, order and metadata aside): candidates by shape
    signature, then by a 32-byte sample of every tensor, confirmed by hashing the data (in
    ``pool``'s worker processes when given): files whose tensors lie in the same order need one
    hash of their data area (A1111's); files in other orders, a hash of every tensor."""
    by_sig: dict = {}
    for p in files:
        e = entries.get(p)
        if e and e.get("sig") and not any(x.startswith("unreadable") for x in rows[p].get("problems", [])):
            by_sig.setdefault(e["sig"], []).append(p)
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
    need = [p for same in groups for p in same if "content" not in entries[p] and "order" not in entries[p]]
    if pool is not None and len(need) > 1:
        read = dict(pool.imap_unordered(_full_one, need))
    else:
        read = dict(_full_one(p) for p in need)
    hashed = set()
    for p, got in read.items():
        if got is not None:
            entries[p].update(got)
            cache.dirty = True
            hashed.add(p)
    for same in groups:
        same = [p for p in same if "content" in entries[p] or "order" in entries[p]]

        def key(p):
            e = entries[p]
            return ("c", e["content"]) if "content" in e else ("o", e["order"], e["hash"])

        subsets: dict = {}
        for p in same:
            subsets.setdefault(key(p), []).append(p)
        if len(subsets) > 1:  # tensors in other orders (or other data): compare every tensor
            for k, members in subsets.items():
                if k[0] == "o":
                    try:
                        got = full_read(members[0])
                    except LoraExtError:
                        continue
                    hashed.add(members[0])
                    for p in members:
                        entries[p]["content"] = got["content"]
                    cache.dirty = True
        by_content: dict = {}
        for p in same:
            e = entries[p]
            if e.get("hash") and rows[p].get("hash_source") != "computed":
                rows[p]["hash"], rows[p]["hash_source"] = e["hash"][:12], "computed"
            by_content.setdefault(("c", e["content"]) if "content" in e else key(p), []).append(p)
        for dup in by_content.values():
            if len(dup) < 2:
                continue
            first = dup[0]
            for p in dup:
                others = [os.path.basename(q) for q in dup if q != p]
                rows[p]["duplicates"] = [q for q in dup if q != p]
                rows[p]["problems"] = list(rows[p].get("problems", [])) + [
                    (f"duplicate of {os.path.basename(first)}" if p != first else
                     f"same tensors as {', '.join(others[:3])}" + (" ..." if len(others) > 3 else ""))]
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
