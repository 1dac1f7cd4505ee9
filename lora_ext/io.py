"""Safe, lazy reading of LoRA and checkpoint files, atomic writing, and A1111's file hashes.

``open_tensors`` reads a ``.safetensors`` header itself (8-byte little-endian length, then a
JSON object) and validates every entry before anything else happens, so keys, shapes, dtypes
and metadata are known without reading tensor bytes; each tensor is read only when asked for.
Pickle containers (``.ckpt/.pt/.pth/.bin``) go only through ``torch.load(weights_only=True)``:
a pickle that wants to import anything beyond tensors and plain containers is refused and
nothing in it runs.

Every problem with a file is a :class:`~lora_ext.errors.LoraFileError` whose text is one line,
``"<path>: <problem>"``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
import sys
import threading
import warnings
from typing import Any, Iterator, Mapping, Optional

from .errors import LoraFileError

__all__ = [
    "TensorFile",
    "open_tensors",
    "save_safetensors",
    "addnet_hash",
    "short_hash",
    "file_sha256",
    "SAFETENSORS_EXTENSIONS",
    "PICKLE_EXTENSIONS",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "MAX_NDIM",
    "check_output_target",
]

SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
#: the safetensors format's own limit on the JSON header
MAX_HEADER_BYTES = 100_000_000
#: Bounds on what a header may declare, checked before anything is computed from it. No real
#: LoRA or checkpoint comes near them (an SDXL LyCORIS "full" LoRA: ~5,000 tensors; a bundled
#: SDXL checkpoint: ~2,500; tensors have at most 5 dimensions).
MAX_TENSORS = 100_000
MAX_NDIM = 16
#: elements of one tensor (zero dimensions ignored) and byte offsets into the data area: 2**50
MAX_ELEMENTS = 1 << 50
MAX_DATA_BYTES = 1 << 50
_BLOCK = 1024 * 1024
_KINDS = ("lora", "checkpoint")

# safetensors dtype name -> (bytes per element, torch attribute). A name whose torch attribute
# is missing from the running torch (U16/U32/U64 before torch 2.3, ...) still parses; asking for
# such a tensor says which torch it needs.
_ST_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
    "C64": (8, "complex64"),
}
#: safetensors dtype name -> how torch prints that dtype ("torch.float16"), without torch
DTYPE_STR: dict[str, str] = {name: "torch." + attr for name, (_, attr) in _ST_DTYPES.items()}


class _LazyTorch:
    """``torch``, imported on first use: reading a safetensors header (``inspect``) must not
    pay torch's import; reading a tensor does."""

    def __getattr__(self, name):
        import torch as _torch

        globals()["torch"] = _torch
        return getattr(_torch, name)


torch = _LazyTorch()


@functools.lru_cache(maxsize=1)
def _torch_to_st() -> dict:
    out = {}
    for name, (_size, attr) in _ST_DTYPES.items():
        dt = getattr(torch, attr, None)
        if isinstance(dt, torch.dtype) and dt not in out:
            out[dt] = name
    return out


@functools.lru_cache(maxsize=1)
def _tolist_dtypes() -> frozenset:
    return frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))

# ----------------------------------------------------------------------------------------------
# small helpers


def _one_line(text: Any, limit: int = 300) -> str:
    """Collapse whitespace so an error stays on one line; cut very long texts."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _py_type(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _quote(key: Any) -> str:
    return repr(_one_line(key, 120)) if isinstance(key, str) else repr(key)


def _brief_json(value: Any, limit: int = 80) -> str:
    """Short JSON text of a header value for an error (bounded work: huge lists and numbers
    are cut, never fully formatted)."""
    if isinstance(value, list):
        items = [_brief_json(v, 24) for v in value[:8]]
        more = f", ... ({len(value)} items)" if len(value) > 8 else ""
        return _one_line("[" + ", ".join(items) + more + "]", limit)
    if type(value) is int and value.bit_length() > 200:
        return f"<a {value.bit_length()}-bit number>"
    if isinstance(value, (dict, str)) and len(value) > limit:
        return f"<a JSON {_json_type(value)} of length {len(value)}>"
    try:
        return _one_line(json.dumps(value), limit)
    except (ValueError, TypeError, RecursionError):
        return f"<a JSON {_json_type(value)}>"


def _sniff(head: bytes) -> Optional[str]:
    """What the first bytes of a file look like, for hints in error messages."""
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):
        return "it looks like a PyTorch zip checkpoint (.ckpt/.pt)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "it looks like a pickle (.ckpt/.pt)"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the model file: download the real file"
    low = head[:64].lstrip().lower()
    if low.startswith((b"<!doctype", b"<html", b"<?xml", b"{\"error", b"{\"detail")):
        return "it is a web page or an error message, not a model (a failed download?)"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{":
            return "it looks like a .safetensors file"
    return None


def _stat_regular(path: str) -> os.stat_result:
    """stat ``path`` and insist on a regular file, with clear errors otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LoraFileError(path, "no such file") from None
    except PermissionError:
        raise LoraFileError(path, "cannot read it: permission denied") from None
    except (OSError, ValueError) as exc:
        raise LoraFileError(path, f"cannot read it: {_one_line(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise LoraFileError(
            path,
            "is a folder, not a file (expected a .safetensors, .ckpt, .pt, .pth or .bin file)",
        )
    if not stat.S_ISREG(st.st_mode):
        raise LoraFileError(path, "is not a regular file")
    return st


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise LoraFileError(path, "no such file") from None
    except PermissionError:
        raise LoraFileError(path, "cannot read it: permission denied") from None
    except IsADirectoryError:
        raise LoraFileError(path, "is a folder, not a file") from None
    except OSError as exc:
        raise LoraFileError(path, f"cannot read it: {_one_line(exc)}") from None


def _read_exactly(fh, n: int) -> bytes:
    chunks = []
    while n > 0:
        b = fh.read(n)
        if not b:
            break
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _check_finite(path: str, key: str, t: torch.Tensor) -> None:
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return
    if t.numel() <= 256 and t.is_floating_point() and t.dtype in _tolist_dtypes():
        # a few values (alphas, 1x1 factors): plain Python is ~5x cheaper than a torch op
        if all(map(math.isfinite, t.reshape(-1).tolist())):
            return
    if t.is_floating_point():
        try:
            lo, hi = torch.aminmax(t.detach().reshape(-1))
            if math.isfinite(float(lo)) and math.isfinite(float(hi)):
                return  # (one reduction, no temporary: NaN propagates to both; an Inf is the max or the min)
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # (an empty tensor, or a dtype aminmax lacks: fp8 on some builds) the counting path decides
    try:
        finite = torch.isfinite(t)
    except (RuntimeError, TypeError, NotImplementedError):
        finite = torch.isfinite(t.to(torch.complex64 if t.is_complex() else torch.float32))
    if bool(finite.all()):
        return
    try:
        nan = torch.isnan(t)
    except (RuntimeError, TypeError, NotImplementedError):
        nan = torch.isnan(t.to(torch.complex64 if t.is_complex() else torch.float32))
    n_nan = int(nan.sum())
    n_bad = int((~finite).sum())
    total = t.numel()
    if n_nan:
        what = "NaN" if n_nan == n_bad else "NaN and Inf"
        count = n_bad
    else:
        what, count = "Inf", n_bad
    raise LoraFileError(path, f"tensor {_quote(key)} contains {what} ({count} of {total} values)")


# ----------------------------------------------------------------------------------------------
# the file object


class _Entry:
    __slots__ = ("dtype_name", "shape", "begin", "end")

    def __init__(self, dtype_name: str, shape: tuple, begin: int, end: int):
        self.dtype_name = dtype_name
        self.shape = shape
        self.begin = begin
        self.end = end


class TensorFile:
    """An open LoRA or checkpoint file. Use :func:`open_tensors` to make one.

    Attributes: ``path`` (str), ``kind`` ("lora" | "checkpoint"), ``format``
    ("safetensors" | "pickle"), ``metadata`` (the safetensors ``__metadata__``, ``{}`` for
    pickles), ``skipped`` (keys of a checkpoint pickle that held plain numbers or strings, such
    as ``global_step``, and were left out; also keys beside an unwrapped ``state_dict``).
    For safetensors files ``data_start`` is the file offset of the tensor data (8 + header).
    """

    def __init__(self, path: str, kind: str, fmt: str):
        self.path = path
        self.kind = kind
        self.format = fmt
        self.metadata: dict[str, str] = {}
        self.skipped: list[str] = []
        self.data_start: Optional[int] = None
        self.file_size: int = 0
        self._entries: dict[str, _Entry] = {}
        self._tensors: Optional[dict[str, torch.Tensor]] = None
        self._fh = None
        self._lock = threading.Lock()
        self._closed = False

    # -- context manager and container protocol ------------------------------------------------
    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __contains__(self, key: object) -> bool:
        return key in self._index()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._index())

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} tensors"
        return f"<TensorFile {self.format} {self.kind} {self.path!r} ({state})>"

    # -- queries --------------------------------------------------------------------------------
    def _index(self):
        return self._entries if self.format == "safetensors" else (self._tensors or {})

    def _missing(self, key: Any) -> LoraFileError:
        return LoraFileError(
            self.path, f"has no tensor named {_quote(key)} ({len(self._index())} tensors in file)"
        )

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._index())

    def shape(self, key: str) -> tuple:
        if self.format == "safetensors":
            e = self._entries.get(key)
            if e is None:
                raise self._missing(key)
            return e.shape
        t = self._index().get(key)
        if t is None:
            raise self._missing(key)
        return tuple(t.shape)

    def dtype(self, key: str) -> torch.dtype:
        if self.format == "safetensors":
            e = self._entries.get(key)
            if e is None:
                raise self._missing(key)
            return self._torch_dtype(key, e.dtype_name)
        t = self._index().get(key)
        if t is None:
            raise self._missing(key)
        return t.dtype

    def dtype_str(self, key: str) -> str:
        """``str(self.dtype(key))`` ("torch.float16"), without importing torch for safetensors."""
        if self.format == "safetensors":
            e = self._entries.get(key)
            if e is None:
                raise self._missing(key)
            return DTYPE_STR[e.dtype_name]
        return str(self.dtype(key))

    def _torch_dtype(self, key: str, name: str) -> torch.dtype:
        dt = getattr(torch, _ST_DTYPES[name][1], None)
        if not isinstance(dt, torch.dtype):
            raise LoraFileError(
                self.path,
                f"tensor {_quote(key)} has dtype {name}, which this torch {torch.__version__} "
                "cannot hold (a newer torch is needed)",
            )
        return dt

    def get(self, key: str, *, check_finite: Optional[bool] = None) -> torch.Tensor:
        """Load one tensor (on the CPU). ``check_finite`` defaults to True for a LoRA and False
        for a checkpoint; when on, a float tensor holding NaN or Inf raises."""
        if self._closed:
            raise LoraFileError(self.path, "the file was closed before reading its tensors")
        if check_finite is None:
            check_finite = self.kind == "lora"
        if self.format == "safetensors":
            t = self._read_safetensor(key)
        else:
            t = self._index().get(key)
            if t is None:
                raise self._missing(key)
            if t.requires_grad:
                t = t.detach()
        if self.kind == "lora" and t.is_complex():
            # every adapter works in real numbers: the imaginary part would be dropped silently
            raise LoraFileError(self.path, f"tensor {_quote(key)} is complex ({t.dtype}); a LoRA's tensors are real numbers")
        if check_finite:
            _check_finite(self.path, key, t)
        return t

    def check_complete(self) -> None:
        """Raise if the file is too short for any tensor its header lists (reads no tensor)."""
        if self.format != "safetensors":
            return
        for key, e in self._entries.items():
            self._check_span(key, e)

    def close(self) -> None:
        self._closed = True
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        self._tensors = {} if self._tensors is not None else None

    # -- safetensors reading ------------------------------------------------------------------
    def _check_span(self, key: str, e: _Entry) -> None:
        a, b = self.data_start + e.begin, self.data_start + e.end
        if b > self.file_size:
            raise LoraFileError(
                self.path,
                f"truncated: tensor {_quote(key)} needs bytes {a}..{b} "
                f"but the file has only {self.file_size} bytes",
            )

    def _read_safetensor(self, key: str) -> torch.Tensor:
        e = self._entries.get(key)
        if e is None:
            raise self._missing(key)
        dt = self._torch_dtype(key, e.dtype_name)
        self._check_span(key, e)
        n = e.end - e.begin
        if n == 0:
            return torch.empty(e.shape, dtype=dt)
        buf = bytearray(n)
        view = memoryview(buf)
        with self._lock:
            fh = self._fh
            if fh is None:
                raise LoraFileError(self.path, "the file was closed before reading its tensors")
            try:
                fh.seek(self.data_start + e.begin)
                got = 0
                while got < n:
                    k = fh.readinto(view[got:])
                    if not k:
                        break
                    got += k
            except OSError as exc:
                raise LoraFileError(
                    self.path, f"cannot read tensor {_quote(key)}: {_one_line(exc)}"
                ) from None
        if got < n:
            raise LoraFileError(
                self.path,
                f"truncated: tensor {_quote(key)} needs bytes {self.data_start + e.begin}.."
                f"{self.data_start + e.end} but the file ends at byte {self.data_start + e.begin + got}",
            )
        t = torch.frombuffer(buf, dtype=dt)
        if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover
            size = t.element_size()
            t = t.view(torch.uint8).reshape(-1, size).flip(1).contiguous().view(dt).reshape(-1)
        return t.reshape(e.shape)


# ----------------------------------------------------------------------------------------------
# opening


def open_tensors(path, *, kind: str = "lora") -> TensorFile:
    """Open a LoRA (``kind="lora"``) or model checkpoint (``kind="checkpoint"``) file.

    ``.safetensors`` files are read lazily (header now, each tensor on ``get``); pickle files
    (``.ckpt/.pt/.pth/.bin``) are loaded with ``torch.load(weights_only=True, mmap=True)``.
    Raises :class:`LoraFileError` for anything wrong with the file.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, not {kind!r}")
    spath = os.fspath(path)
    if isinstance(spath, bytes):
        spath = os.fsdecode(spath)
    st = _stat_regular(spath)
    ext = os.path.splitext(spath)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        return _open_safetensors(spath, kind, st.st_size)
    if ext in PICKLE_EXTENSIONS:
        return _open_pickle(spath, kind)
    shown = f"'{ext}'" if ext else "(none)"
    raise LoraFileError(
        spath,
        f"unknown file type {shown}: expected .safetensors, .ckpt, .pt, .pth or .bin",
    )


def _parse_safetensors_header(path: str, fh, size: int) -> tuple[int, dict, dict]:
    """Read and validate the header. Returns (data_start, metadata, entries)."""
    head = _read_exactly(fh, 8)
    if len(head) < 8:
        hint = _sniff(head)
        raise LoraFileError(
            path,
            f"not a safetensors file: only {size} bytes, too short for a header"
            + (f" ({hint})" if hint and size else ""),
        )
    (n,) = struct.unpack("<Q", head)

    def not_st(problem: str, peek: bytes = b"") -> LoraFileError:
        hint = _sniff(head + peek)
        if hint and "safetensors" not in hint:
            problem += f"; {hint}"
        return LoraFileError(path, "not a safetensors file: " + problem)

    if n > size - 8:
        raise not_st(f"header length {n} bytes exceeds file size {size} bytes",
                     _read_exactly(fh, 56))
    if n > MAX_HEADER_BYTES:
        raise not_st(f"header length {n} bytes exceeds the {MAX_HEADER_BYTES // 1_000_000} MB limit")
    raw = _read_exactly(fh, n)
    if len(raw) < n:  # the file shrank under us
        raise LoraFileError(path, f"truncated: the header needs {n} bytes but only {len(raw)} are there")
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise not_st("the header is not a JSON object", raw[:56])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_st(f"the header is not UTF-8 text (bad byte at position {exc.start})") from None
    # every descriptor holds one "data_offsets" (never inside a string, where a quote is
    # escaped): counting them bounds the work of parsing before any is done
    declared = raw.count(b'"data_offsets"')
    if declared > MAX_TENSORS:
        raise LoraFileError(
            path, f"corrupt safetensors header: it lists {declared} tensors, more than the {MAX_TENSORS} allowed"
        )
    fast = _parse_plain(raw, text)
    if fast is not None:
        metadata, entries = fast
        data_start = 8 + n
    else:
        data_start, metadata, entries = _parse_checked(path, text, n, not_st)

    # Tensors may not share bytes (the safetensors format forbids it; it would alias them), and,
    # as safetensors itself insists, they fill the data area from its start without holes.
    spans = sorted([(e.begin, e.end, k) for k, e in entries.items()])
    tiled = [s[0] for s in spans[1:]] == [s[1] for s in spans[:-1]]  # each starts where the last ended
    for (b0, e0, k0), (b1, e1, k1) in ([] if tiled else zip(spans, spans[1:])):
        if b1 < e0:
            raise LoraFileError(
                path,
                f"corrupt safetensors header: tensors {_quote(k0)} and {_quote(k1)} overlap in the data area "
                f"(bytes {b0}..{e0} and {b1}..{e1})",
            )
        if b1 > e0:
            raise LoraFileError(
                path,
                f"corrupt safetensors header: a hole in the data area between tensors {_quote(k0)} and "
                f"{_quote(k1)} (bytes {e0}..{b1} belong to no tensor)",
            )
    if spans and spans[0][0] != 0:
        raise LoraFileError(
            path,
            f"corrupt safetensors header: a hole at the start of the data area (bytes 0..{spans[0][0]} "
            f"belong to no tensor; the first is {_quote(spans[0][2])})",
        )
    return data_start, metadata, entries


def _parse_checked(path: str, text: str, n: int, not_st) -> tuple[int, dict, dict]:
    """The header parsed with every check, each failure worded (a repeated name anywhere, bad
    JSON, a bad descriptor ...). ``_parse_plain`` reads well-formed headers faster."""
    try:
        header = json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateName as dup:
        raise LoraFileError(
            path, f"corrupt safetensors header: the name {_quote(dup.name)} appears more than once"
        ) from None
    except RecursionError:
        raise not_st("the header JSON is nested too deeply") from None
    except ValueError as exc:
        where = f" at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else _one_line(exc, 120)
        raise not_st(f"the header is not valid JSON ({msg}{where})") from None
    if not isinstance(header, dict):
        raise not_st(f"the header is a JSON {_json_type(header)}, not an object")

    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        raise LoraFileError(
            path, f"corrupt safetensors header: it lists {count} tensors, more than the {MAX_TENSORS} allowed"
        )
    data_start = 8 + n
    metadata: dict[str, str] = {}
    entries: dict[str, _Entry] = {}
    for key, desc in header.items():
        if key == "__metadata__":
            if desc is None:
                continue
            if not isinstance(desc, dict):
                raise LoraFileError(path, f"corrupt safetensors header: __metadata__ is a JSON {_json_type(desc)}, not an object")
            for mk, mv in desc.items():
                if not isinstance(mv, str):
                    raise LoraFileError(
                        path,
                        f"corrupt safetensors header: metadata value for {_quote(mk)} is a JSON {_json_type(mv)}, "
                        "not a string",
                    )
                metadata[mk] = mv
            continue
        entries[key] = _parse_entry(path, key, desc)

    return data_start, metadata, entries


_ESCAPED_COLON = re.compile(rb"\\u003[aA]")


def _parse_plain(raw: bytes, text: str):
    """(metadata, entries) of a well-formed header, or None when anything in it is not plainly
    right (the caller then parses it with every check and words the problem).

    Parsed by the C JSON reader without an object hook; that reader keeps the last of a repeated
    name silently, so the name/value pairs are counted: every pair has one ``:`` outside strings,
    so ``raw.count(":")`` less the colons inside the strings it parsed must equal the pairs it
    kept (an escaped colon, ``\\u003a``, sends the header to the checked parse). Linear, with a
    small constant: the descriptors are checked as ``_parse_entry`` does."""
    if _ESCAPED_COLON.search(raw):
        return None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if type(header) is not dict:
        return None
    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        return None
    pairs = len(header)
    colons = 0
    metadata: dict[str, str] = {}
    entries: dict[str, _Entry] = {}
    st_dtypes = _ST_DTYPES
    for key, desc in header.items():
        if ":" in key:
            colons += key.count(":")
        if key == "__metadata__":
            if desc is None:
                continue
            if type(desc) is not dict:
                return None
            pairs += len(desc)
            for mk, mv in desc.items():
                if type(mv) is not str:
                    return None
                colons += mk.count(":") + mv.count(":")
            metadata = desc
            continue
        if type(desc) is not dict or len(desc) != 3:
            return None
        dtype_name = desc.get("dtype")
        shape = desc.get("shape")
        offs = desc.get("data_offsets")
        if type(dtype_name) is not str or dtype_name not in st_dtypes or type(shape) is not list \
                or len(shape) > MAX_NDIM or type(offs) is not list or len(offs) != 2:
            return None
        pairs += 3
        numel = 1
        nonzero = 1
        for d in shape:
            if type(d) is not int or d < 0:
                return None
            numel *= d
            if d:
                nonzero *= d
        b, e = offs
        if nonzero > MAX_ELEMENTS or type(b) is not int or type(e) is not int or not 0 <= b <= e <= MAX_DATA_BYTES:
            return None
        if numel * st_dtypes[dtype_name][0] != e - b:
            return None
        entries[key] = _Entry(dtype_name, tuple(shape), b, e)
    if pairs != raw.count(b":") - colons:
        return None  # a name given twice somewhere (or a pair this reading did not count)
    return dict(metadata), entries


class _DuplicateName(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _unique_object(pairs: list) -> dict:
    """json object hook: a name given twice is an error (json.loads would keep the last)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateName(k)
            seen.add(k)
    return obj


def _parse_entry(path: str, key: str, desc: Any) -> _Entry:
    q = _quote(key)
    if not isinstance(desc, dict):
        raise LoraFileError(
            path, f"corrupt safetensors header: entry {q} is a JSON {_json_type(desc)}, not a tensor descriptor"
        )
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in desc]
    if missing:
        raise LoraFileError(
            path, f"corrupt safetensors header: tensor {q} has no {' / '.join(missing)} (not a tensor descriptor)"
        )
    dtype_name = desc["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in _ST_DTYPES:
        if isinstance(dtype_name, str):
            problem = f"has unknown dtype {_one_line(dtype_name, 40)!r}"
        else:
            problem = f"has a dtype that is a JSON {_json_type(dtype_name)}, not a name"
        raise LoraFileError(path, f"corrupt safetensors header: tensor {q} {problem}")
    shape = desc["shape"]
    if not isinstance(shape, list):
        raise LoraFileError(path, f"corrupt safetensors header: tensor {q} has invalid shape {_brief_json(shape)} "
                                  f"(a JSON {_json_type(shape)}, not an array)")
    if len(shape) > MAX_NDIM:
        raise LoraFileError(path, f"corrupt safetensors header: tensor {q} has {len(shape)} dimensions, "
                                  f"more than the {MAX_NDIM} allowed")
    nonzero = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise LoraFileError(
                path, f"corrupt safetensors header: tensor {q} has invalid shape {_brief_json(shape)}"
            )
        nonzero *= max(d, 1)
        if nonzero > MAX_ELEMENTS:
            raise LoraFileError(
                path, f"corrupt safetensors header: tensor {q} has shape {_brief_json(shape)}, whose dimensions "
                      f"multiply past the 2**50 limit"
            )
    offs = desc["data_offsets"]
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int and 0 <= o <= MAX_DATA_BYTES for o in offs)
        or offs[0] > offs[1]
    ):
        raise LoraFileError(
            path,
            f"corrupt safetensors header: tensor {q} has invalid data_offsets {_brief_json(offs)}",
        )
    itemsize = _ST_DTYPES[dtype_name][0]
    nbytes = math.prod(shape) * itemsize
    if nbytes != offs[1] - offs[0]:
        raise LoraFileError(
            path,
            f"corrupt safetensors header: tensor {q} is {dtype_name} of shape {list(shape)} ({nbytes} bytes) "
            f"but its data_offsets {offs} span {offs[1] - offs[0]} bytes",
        )
    return _Entry(dtype_name, tuple(shape), offs[0], offs[1])


def _open_safetensors(path: str, kind: str, size: int) -> TensorFile:
    fh = _open_binary(path)
    try:
        try:
            size = os.fstat(fh.fileno()).st_size
            data_start, metadata, entries = _parse_safetensors_header(path, fh, size)
        except OSError as exc:
            raise LoraFileError(path, f"cannot read it: {_one_line(exc)}") from None
    except BaseException:
        fh.close()
        raise
    tf = TensorFile(path, kind, "safetensors")
    tf.metadata = metadata
    tf.data_start = data_start
    tf.file_size = size
    tf._entries = entries
    tf._fh = fh
    return tf


_MMAP_REFUSED = "mmap can only be used"


def _torch_load(path: str):
    """torch.load with weights_only=True, always; mmap when the file allows it."""
    # torch.serialization.load is the real function even where a host (A1111's modules/safe.py)
    # has replaced torch.load with a wrapper.
    load = torch.serialization.load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _compressed_records(path):
            # mmap maps a record's stored bytes as tensor data: compressed ones would be
            # read as garbage (NaN, 3.4e38) with no error; torch's reader inflates them
            return load(path, map_location="cpu", weights_only=True)
        try:
            return load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if _MMAP_REFUSED not in str(exc):
                raise
        # legacy (non-zip) torch.save format: mmap is not possible
        return load(path, map_location="cpu", weights_only=True)


def _compressed_records(path: str) -> bool:
    """Whether ``path`` is a zip (torch.save's format) holding any compressed member."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(info.compress_type != zipfile.ZIP_STORED for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False  # not a zip (a legacy pickle) or unreadable: torch.load says what it is


def _refusal_detail(msg: str) -> str:
    m = re.search(r"GLOBAL\s+([\w.]+)", msg)
    if m:
        return f"it wants to import {m.group(1)}"
    m = re.search(r"Unsupported operand\s+(\S+)", msg)
    if m:
        return f"unsupported pickle instruction {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*(.+)", msg, re.S)
    if m:
        return _one_line(m.group(1).split("Check the documentation")[0], 120)
    return "not allowed by torch.load(weights_only=True)"


def _load_pickle(path: str):
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise LoraFileError(path, f"cannot read it: {_one_line(exc)}") from None
    hint = _sniff(head)
    if hint and "pickle" not in hint and "zip" not in hint:
        # Certainly not a torch file: say what it is rather than what torch.load thinks.
        raise LoraFileError(path, f"not a PyTorch file: {hint}")
    try:
        return _torch_load(path)
    except MemoryError:
        raise LoraFileError(path, "not enough memory to load it") from None
    except Exception as exc:  # torch raises many types for bad files; sort them into words
        msg = str(exc)
        if "Weights only load failed" in msg or "WeightsUnpickler" in msg:
            detail = _refusal_detail(msg)
            if not detail.startswith("it wants to import") and not head.startswith((b"\x80", b"PK")):
                raise LoraFileError(
                    path, f"not a readable PyTorch file: it is neither a zip nor a pickle ({detail})"
                ) from None
            what = "code or objects other than tensors"
            if not detail.startswith("it wants to import"):
                what += ", or is corrupt"
            raise LoraFileError(
                path,
                f"refused to unpickle: it contains {what} ({detail}); nothing in it was run "
                "(use a .safetensors version of this file)",
            ) from None
        detail = _one_line(msg.split("\n")[0], 160) or type(exc).__name__
        if not head.startswith((b"\x80", b"PK")):
            raise LoraFileError(
                path, f"not a readable PyTorch file: it is neither a zip nor a pickle ({detail})"
            ) from None
        raise LoraFileError(
            path, f"not a readable PyTorch file ({type(exc).__name__}: {detail})"
        ) from None


def _unwrap(obj: Any, skipped: list[str]) -> Any:
    for _ in range(4):
        if not isinstance(obj, dict):
            return obj
        inner = obj.get("state_dict")
        if isinstance(inner, dict):
            skipped.extend(str(k) for k in obj if k != "state_dict")
            obj = inner
            continue
        if len(obj) == 1:
            (k, v), = obj.items()
            if k in ("model", "module") and isinstance(v, dict):
                obj = v
                continue
        return obj
    return obj


def _open_pickle(path: str, kind: str) -> TensorFile:
    obj = _load_pickle(path)
    skipped: list[str] = []
    obj = _unwrap(obj, skipped)
    if not isinstance(obj, dict):
        raise LoraFileError(path, f"holds a {_py_type(obj)}, expected a dict of tensors")
    if len(obj) > MAX_TENSORS:
        raise LoraFileError(path, f"holds {len(obj)} entries, more than the {MAX_TENSORS} tensors allowed")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise LoraFileError(path, f"key {k!r} is a {_py_type(k)}, expected a string tensor name")
        if isinstance(v, torch.Tensor):
            if v.dim() > MAX_NDIM:
                raise LoraFileError(path, f"tensor {_quote(k)} has {v.dim()} dimensions, more than the {MAX_NDIM} allowed")
            tensors[k] = v
            continue
        if kind == "checkpoint" and (v is None or isinstance(v, (bool, int, float, str))):
            skipped.append(k)
            continue
        raise LoraFileError(path, f"key {_quote(k)} holds a {_py_type(v)}, not a tensor")
    tf = TensorFile(path, kind, "pickle")
    tf._tensors = tensors
    tf.skipped = skipped
    try:
        tf.file_size = os.path.getsize(path)
    except OSError:
        pass
    return tf


# ----------------------------------------------------------------------------------------------
# writing


def _tensor_bytes(t: torch.Tensor):
    """A buffer with the tensor's bytes in little-endian order (no copy for CPU tensors)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover
        t = t.view(torch.uint8).reshape(-1, t.element_size()).flip(1).contiguous().reshape(-1)
        return t.numpy()
    return t.view(torch.uint8).numpy()


def save_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` (and string ``metadata``) to a .safetensors file, atomically.

    Everything is checked before the first byte is written; the data goes to a temporary file
    in the same folder which then replaces ``path``. On any failure the temporary file is
    removed and an existing ``path`` is left as it was.
    """
    spath = os.fspath(path)
    if isinstance(spath, bytes):
        spath = os.fsdecode(spath)
    if not isinstance(tensors, Mapping):
        raise LoraFileError(spath, f"cannot save: tensors must be a dict, not {_py_type(tensors)}")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise LoraFileError(spath, f"cannot save: metadata must be a dict, not {_py_type(metadata)}")
    meta = dict(metadata or {})
    for mk, mv in meta.items():
        if not isinstance(mk, str):
            raise LoraFileError(spath, f"cannot save: metadata key {mk!r} is not a string")
        if not isinstance(mv, str):
            raise LoraFileError(
                spath, f"cannot save: metadata value for {_quote(mk)} is a {_py_type(mv)}, not a string"
            )
    items = []
    for k, t in tensors.items():
        if not isinstance(k, str):
            raise LoraFileError(spath, f"cannot save: tensor name {k!r} is not a string")
        if k == "__metadata__":
            raise LoraFileError(spath, "cannot save: '__metadata__' is reserved and cannot name a tensor")
        if not isinstance(t, torch.Tensor):
            raise LoraFileError(spath, f"cannot save: {_quote(k)} is a {_py_type(t)}, not a tensor")
        if t.layout != torch.strided:
            raise LoraFileError(spath, f"cannot save: tensor {_quote(k)} is {t.layout}, not a dense tensor")
        name = _torch_to_st().get(t.dtype)
        if name is None:
            raise LoraFileError(spath, f"cannot save: tensor {_quote(k)} has dtype {t.dtype}, which safetensors cannot store")
        if t.device.type == "meta":
            raise LoraFileError(spath, f"cannot save: tensor {_quote(k)} has no data (meta device)")
        items.append((k, t, name))
    # Larger elements first, then by name: every tensor starts aligned to its element size.
    items.sort(key=lambda it: (-_ST_DTYPES[it[2]][0], it[0]))
    header: dict[str, Any] = {}
    if meta:
        header["__metadata__"] = meta
    offset = 0
    for k, t, name in items:
        nbytes = t.numel() * _ST_DTYPES[name][0]
        header[k] = {"dtype": name, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)

    abspath = os.path.abspath(spath)
    folder = os.path.dirname(abspath)
    if os.path.isdir(abspath):
        raise LoraFileError(spath, "cannot save: a folder has that name")
    if not os.path.isdir(folder):
        raise LoraFileError(spath, f"cannot save: the folder {folder} does not exist")
    old_mode = None
    try:
        old_mode = stat.S_IMODE(os.stat(abspath).st_mode)
    except OSError:
        pass
    tmp = os.path.join(folder, f".{os.path.basename(abspath)}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise LoraFileError(spath, f"cannot save: {_one_line(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(struct.pack("<Q", len(hbytes)))
            out.write(hbytes)
            for k, t, name in items:
                out.write(_tensor_bytes(t))
            out.flush()
            os.fsync(out.fileno())
        if old_mode is not None:
            try:
                os.chmod(tmp, old_mode)
            except OSError:
                pass
        os.replace(tmp, abspath)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise LoraFileError(spath, f"cannot save: {_one_line(exc)}") from None
        raise


def check_output_target(out, *, need_bytes: int = 0) -> str:
    """Refuse an output path before any work is done: its folder must exist and be writable,
    its name short enough for the temporary name written beside it, and (with ``need_bytes``)
    the disk must have room. Returns ``out`` as a str; raises LoraFileError naming it."""
    spath = os.fspath(out)
    if isinstance(spath, bytes):
        spath = os.fsdecode(spath)
    if not spath or "\0" in spath:
        raise LoraFileError(spath or "''", "cannot save: not a usable path")
    abspath = os.path.abspath(spath)
    folder, name = os.path.split(abspath)
    if not name:
        raise LoraFileError(spath, "cannot save: the path names no file")
    if os.path.isdir(folder):
        try:
            name_max = os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):
            name_max = 255
        if len(os.fsencode(name)) + 20 > name_max:  # ".<name>.<12 hex>.tmp" is written first
            raise LoraFileError(spath, f"cannot save: the file name is too long ({len(os.fsencode(name))} bytes; "
                                       f"at most {name_max - 20} here)")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise LoraFileError(spath, f"cannot save: no permission to write in {folder}")
        if need_bytes:
            try:
                free = shutil_disk_free(folder)
            except OSError:
                free = None
            if free is not None and free < need_bytes:
                raise LoraFileError(spath, f"cannot save: {folder} has {free / 1e9:.2f} GB free, the output "
                                           f"needs about {need_bytes / 1e9:.2f} GB")
    elif os.path.exists(folder):
        raise LoraFileError(spath, f"cannot save: {folder} is not a folder")
    else:
        raise LoraFileError(spath, f"cannot save: the folder {folder} does not exist")
    return spath


def shutil_disk_free(folder: str) -> int:
    import shutil

    return shutil.disk_usage(folder).free


# ----------------------------------------------------------------------------------------------
# hashes (as A1111 computes them)


def _hash_from(path: str, offset_fn) -> str:
    _stat_regular(path)
    h = hashlib.sha256()
    fh = _open_binary(path)
    try:
        with fh:
            offset = offset_fn(fh)
            fh.seek(offset)
            while True:
                block = fh.read(_BLOCK)
                if not block:
                    break
                h.update(block)
    except OSError as exc:
        raise LoraFileError(path, f"cannot read it: {_one_line(exc)}") from None
    return h.hexdigest()


def addnet_hash(path) -> str:
    """A1111's "addnet" hash of a .safetensors file: sha256 (hex) of everything after the
    8-byte length and the JSON header. A1111 shows ``addnet_hash(path)[:12]`` (see
    :func:`short_hash`)."""
    spath = os.fsdecode(os.fspath(path))

    def after_header(fh) -> int:
        size = os.fstat(fh.fileno()).st_size
        head = _read_exactly(fh, 8)
        if len(head) < 8:
            raise LoraFileError(spath, f"not a safetensors file: only {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LoraFileError(
                spath, f"not a safetensors file: header length {n} bytes exceeds file size {size} bytes"
            )
        return 8 + n

    return _hash_from(spath, after_header)


def short_hash(path) -> str:
    """The 12-character LoRA hash A1111 writes into infotext (``addnet_hash(path)[:12]``)."""
    return addnet_hash(path)[:12]


def file_sha256(path) -> str:
    """sha256 (hex) of the whole file, A1111's checkpoint hash; A1111 prints its first 10
    characters."""
    return _hash_from(os.fsdecode(os.fspath(path)), lambda fh: 0)
