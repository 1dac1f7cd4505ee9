"""The tensors of a ``torch.save`` file (names, dtypes, shapes, where their bytes lie) read
without torch and without running anything from the file.

The library scan meets the same pickled LoRA structure many times. torch's ``weights_only``
loader builds every tensor in Python (~6 ms for a 300-tensor file here); this reads the pickle
with the C unpickler instead, and every global the pickle names resolves to one of a few
stand-ins of ours (a storage type, "rebuild a tensor", a plain dict), so what the file says is
only ever data. It answers only for what ``torch.save`` writes of a flat dict of dense tensors
(zip format, little-endian, contiguous tensors); for anything else :func:`read` returns None and
the caller takes torch's safe loader, which words the problem.
"""
from __future__ import annotations

import io
import pickle
import sys
import zipfile
from typing import Optional

#: the largest ``data.pkl`` read (a LoRA's is ~100 bytes a tensor)
MAX_PICKLE_BYTES = 64 << 20

#: ``torch.<Name>Storage`` -> (``str(dtype)``, bytes per element)
_STORAGE_TYPES = {
    "HalfStorage": ("torch.float16", 2),
    "BFloat16Storage": ("torch.bfloat16", 2),
    "FloatStorage": ("torch.float32", 4),
    "DoubleStorage": ("torch.float64", 8),
    "LongStorage": ("torch.int64", 8),
    "IntStorage": ("torch.int32", 4),
    "ShortStorage": ("torch.int16", 2),
    "CharStorage": ("torch.int8", 1),
    "ByteStorage": ("torch.uint8", 1),
    "BoolStorage": ("torch.bool", 1),
}


class Unreadable(Exception):
    """The file holds something this reader does not vouch for."""


class _NoState:
    """A pickle's BUILD instruction sets the state of the object before it, which could be one
    of the stand-ins shared by every file this process reads (their attributes, a function's
    defaults): every stand-in refuses it."""

    __slots__ = ()

    def __setstate__(self, state):
        raise Unreadable("a pickle that sets an object's state")


class _StorageType(_NoState):
    __slots__ = ("dtype", "itemsize")

    def __init__(self, dtype: str, itemsize: int):
        self.dtype, self.itemsize = dtype, itemsize

    def __call__(self, *args, **kwargs):  # a pickle that calls a storage type is not torch.save's
        raise Unreadable("storage type called")


class _Storage(_NoState):
    __slots__ = ("dtype", "itemsize", "key", "numel")

    def __init__(self, kind: _StorageType, key: str, numel: int):
        self.dtype, self.itemsize, self.key, self.numel = kind.dtype, kind.itemsize, key, numel


class TensorRef(_NoState):
    """One tensor: ``dtype`` (as ``str(torch dtype)``), ``shape``, and its bytes: ``itemsize``
    bytes each from element ``offset`` of the storage record ``key`` (contiguous)."""

    __slots__ = ("dtype", "itemsize", "key", "offset", "shape", "numel", "storage_numel")

    def __init__(self, storage: _Storage, offset: int, shape: tuple):
        self.dtype, self.itemsize, self.key = storage.dtype, storage.itemsize, storage.key
        self.storage_numel = storage.numel
        self.offset, self.shape = offset, shape
        n = 1
        for d in shape:
            n *= d
        self.numel = n


def _ints(x, what: str) -> tuple:
    if not isinstance(x, tuple) or not all(type(d) is int and d >= 0 for d in x):
        raise Unreadable(f"{what} is not a tuple of sizes")
    return x


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise Unreadable("not a tensor of a storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise Unreadable("size and stride disagree")
    expect = 1
    for d, s in zip(reversed(size), reversed(stride)):  # contiguous (the bytes are one span)
        if d > 1 and s != expect:
            raise Unreadable("not contiguous")
        expect *= d
    ref = TensorRef(storage, offset, size)
    if offset + ref.numel > storage.numel:
        raise Unreadable("tensor beyond its storage")
    return ref


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    if not isinstance(data, TensorRef):
        raise Unreadable("parameter of no tensor")
    return data


def _empty_hooks(*args):
    if args:
        raise Unreadable("backward hooks")
    return {}


class _Function(_NoState):
    """A function the pickle may call (a plain function would take its state: ``__defaults__``)."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, *args):
        return self._fn(*args)


_GLOBALS = {("torch", name): _StorageType(*v) for name, v in _STORAGE_TYPES.items()}
_GLOBALS.update({
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("collections", "OrderedDict"): _Function(_empty_hooks),
})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        got = _GLOBALS.get((module, name))
        if got is None:
            raise Unreadable(f"global {module}.{name}")
        return got

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Unreadable("persistent id")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise Unreadable("storage")
        return _Storage(kind, key, numel)


class PickleIndex:
    """``names`` (in the file's order) and ``tensors`` (name -> :class:`TensorRef`) of one file,
    with the zip it came from for :meth:`read_bytes`."""

    def __init__(self, path: str, zf: zipfile.ZipFile, records: dict, tensors: dict):
        self.path, self._zip, self._records, self.tensors = path, zf, records, tensors
        self.names = list(tensors)

    def read_bytes(self, name: str, limit: Optional[int] = None) -> bytes:
        """The first ``limit`` bytes (all with None) of a tensor's data, in file order."""
        t = self.tensors[name]
        n = t.numel * t.itemsize if limit is None else min(limit, t.numel * t.itemsize)
        if n == 0:
            return b""
        try:
            with self._zip.open(self._records[t.key]) as fh:
                start = t.offset * t.itemsize
                if start:
                    fh.seek(start)
                got = fh.read(n)
        except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
            raise Unreadable(f"record {t.key}: {exc}") from None
        if len(got) != n:
            raise Unreadable("record short")
        return got

    def close(self) -> None:
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read(path: str, max_tensors: int, max_ndim: int) -> Optional[PickleIndex]:
    """The index of ``path``, or None when this reader does not vouch for the file (not a zip
    written by ``torch.save``, anything but a flat dict of name -> dense contiguous tensor,
    records missing or short, too many tensors or dimensions, a big-endian file or machine)."""
    if sys.byteorder != "little":  # pragma: no cover
        return None
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):
        return None
    try:
        return _index(path, zf, max_tensors, max_ndim)
    except (Unreadable, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, RecursionError, MemoryError, NotImplementedError,
            OverflowError, UnicodeDecodeError):
        zf.close()
        return None
    except BaseException:
        zf.close()
        raise


def _index(path: str, zf: zipfile.ZipFile, max_tensors: int, max_ndim: int) -> Optional[PickleIndex]:
    infos = zf.infolist()
    pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pkl) != 1 or pkl[0].file_size > MAX_PICKLE_BYTES:
        raise Unreadable("no single data.pkl")
    prefix = pkl[0].filename[: -len("data.pkl")]
    by_name = {i.filename: i for i in infos}
    order = by_name.get(prefix + "byteorder")
    if order is not None and (order.file_size > 16 or zf.read(order).strip() != b"little"):
        raise Unreadable("byte order")
    obj = _Unpickler(io.BytesIO(zf.read(pkl[0]))).load()
    if not isinstance(obj, dict) or len(obj) > max_tensors:
        raise Unreadable("not a flat dict of tensors")
    records = {}
    for name, t in obj.items():
        if not isinstance(name, str) or not isinstance(t, TensorRef) or len(t.shape) > max_ndim:
            raise Unreadable("not a flat dict of tensors")
        if t.key not in records:
            info = by_name.get(f"{prefix}data/{t.key}")
            if info is None:
                raise Unreadable("storage record missing")
            records[t.key] = info
        info = records[t.key]
        if info.file_size < t.storage_numel * t.itemsize:  # (the tensor lies inside its storage)
            raise Unreadable("storage record short")
    return PickleIndex(path, zf, records, obj)
