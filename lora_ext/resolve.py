"""From a tag's name to a LoRA file: ``LoraLibrary`` and ``resolve_specs``.

A name (``<lora:NAME>``) is looked up in the library's folders (searched recursively, in the
order given; hidden files and folders, whose names start with ".", are skipped) among files
ending in ``.safetensors``, ``.ckpt``, ``.pt``, ``.bin`` or ``.pth``. Backslashes in the name
are read as ``/`` (Windows paths). The first rule that matches wins:

1. the path relative to a folder, with extension (``styles/ink wash.safetensors``);
2. that path without extension (``styles/ink wash``);
3. the end of such a path, at a folder boundary (``ink/wash`` finds ``styles/ink/wash``);
4. the file name (``ink wash.safetensors``);
5. the stem (``ink wash``);
6. an alias from the file's metadata: kohya's ``ss_output_name`` or ``modelspec.title``
   (``.safetensors`` headers only, read lazily, the first time a name needs rule 6, and cached
   per file size and mtime);

then rules 1-6 again ignoring case. Among several files matching one rule, the first wins in
this order: earlier folder, fewer subfolder levels, path in alphabetical order, extension in
the order above (``.safetensors`` first). An absolute path to a file inside one of the folders
is accepted as is.

The scan is cached; it is redone when the modification time of any folder or subfolder seen
changes (a file added, removed or renamed), or when a missing folder appears.
:meth:`LoraLibrary.refresh` forces it.
"""
from __future__ import annotations

import difflib
import os
import threading
from dataclasses import dataclass
from typing import Iterable, Optional

from .errors import LoraExtError, LoraFileError

__all__ = ["LoraNotFound", "LoraFile", "LoraLibrary", "resolve_specs", "EXTENSIONS"]

EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
ALIAS_KEYS = ("ss_output_name", "modelspec.title")


class LoraNotFound(LoraExtError, LookupError):
    """No file for a LoRA name. Attributes: ``name``, ``folders`` (searched), ``suggestions``
    (closest names), ``tag``."""

    def __init__(self, name: str, folders: Iterable[str], suggestions: Iterable[str] = (),
                 *, missing: Iterable[str] = (), files: int = 0, tag: str = ""):
        self.name = name
        self.folders = list(folders)
        self.suggestions = list(suggestions)
        self.missing = list(missing)
        self.files = files
        self.tag = tag
        super().__init__(self._message())

    def _message(self) -> str:
        where = ", ".join(f + (" (missing)" if f in self.missing else "") for f in self.folders)
        where = where or "no folders configured"
        head = f"{self.tag}: " if self.tag else ""
        msg = f"{head}LoRA {self.name!r} not found (searched {where}; {self.files} LoRA files)"
        if self.suggestions:
            msg += "; closest: " + ", ".join(self.suggestions)
        return msg

    def with_tag(self, tag: str) -> "LoraNotFound":
        return LoraNotFound(self.name, self.folders, self.suggestions, missing=self.missing,
                            files=self.files, tag=tag)


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file of a library."""

    path: str  # as found: os.path.join(folder, relative path)
    folder: str  # the library folder it was found under
    relpath: str  # relative to ``folder``, "/"-separated, with extension
    ext: str  # lower case, with the dot

    @property
    def key(self) -> str:
        """``relpath`` without its extension."""
        return self.relpath[: len(self.relpath) - len(self.ext)]

    @property
    def filename(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return self.key.rsplit("/", 1)[-1]


def _norm_name(name: str) -> str:
    s = str(name).strip().replace("\\", "/")
    while "//" in s:
        s = s.replace("//", "/")
    while s.startswith("./"):
        s = s[2:]
    return s


class _Index:
    """Lookup tables of one scan: exact and case-folded."""

    def __init__(self, files: list):
        self.files = files
        self.tables = {}
        for fold in (False, True):
            def k(s):
                return s.casefold() if fold else s

            t = {"relpath": {}, "key": {}, "filename": {}, "stem": {}}
            for f in files:
                for field_name, table in t.items():
                    table.setdefault(k(getattr(f, field_name)), f)
            self.tables[fold] = t
        self.aliases = None  # {fold: {alias: file}}, built on first need


class LoraLibrary:
    """LoRA files under ``folders``, looked up by the names tags use (see module doc)."""

    def __init__(self, folders: Iterable, *, extensions: Iterable[str] = EXTENSIONS):
        self.folders = [os.fspath(f) for f in folders]
        self.extensions = tuple(e.lower() for e in extensions)
        self._lock = threading.RLock()
        self._index: Optional[_Index] = None
        self._dir_mtimes: dict = {}
        self._missing: list = []
        self._meta_cache: dict = {}  # path -> ((size, mtime_ns), aliases)
        #: files whose metadata could not be read, path -> problem (they still resolve by name)
        self.unreadable: dict = {}
        #: how many scans were made (for tests and diagnostics)
        self.scans = 0

    # -- scanning -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget the scan; the next lookup rescans."""
        with self._lock:
            self._index = None

    def _stale(self) -> bool:
        if self._index is None:
            return True
        for d, mt in self._dir_mtimes.items():
            try:
                if os.stat(d).st_mtime_ns != mt:
                    return True
            except OSError:
                return True
        return any(os.path.isdir(f) for f in self._missing)

    def _scan(self) -> None:
        files = []
        mtimes = {}
        missing = []
        for order, folder in enumerate(self.folders):
            if not os.path.isdir(folder):
                missing.append(folder)
                continue
            seen = set()
            for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:  # a symlink loop
                    dirnames[:] = []
                    continue
                seen.add(real)
                try:
                    mtimes[dirpath] = os.stat(dirpath).st_mtime_ns
                except OSError:
                    continue
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel_dir = os.path.relpath(dirpath, folder)
                rel_dir = "" if rel_dir == os.curdir else rel_dir.replace(os.sep, "/") + "/"
                for fn in filenames:
                    if fn.startswith("."):
                        continue
                    ext = os.path.splitext(fn)[1].lower()
                    if ext not in self.extensions:
                        continue
                    path = os.path.join(dirpath, fn)
                    if not os.path.isfile(path):
                        continue
                    files.append((order, LoraFile(path, folder, rel_dir + fn, ext)))

        def rank(of):
            order, f = of
            return (order, f.relpath.count("/"), f.key, self.extensions.index(f.ext))

        files.sort(key=rank)
        self._index = _Index([f for _, f in files])
        self._dir_mtimes = mtimes
        self._missing = missing
        self.scans += 1

    def _current(self) -> _Index:
        with self._lock:
            if self._stale():
                self._scan()
            return self._index

    def files(self) -> list:
        """Every LoRA file, in precedence order."""
        return list(self._current().files)

    # -- metadata -----------------------------------------------------------------------------
    def aliases(self, f: LoraFile) -> tuple:
        """The metadata names of ``f`` (``ss_output_name``, ``modelspec.title``); header only."""
        if f.ext != ".safetensors":
            return ()
        try:
            st = os.stat(f.path)
        except OSError as e:
            self.unreadable[f.path] = str(e)
            return ()
        stamp = (st.st_size, st.st_mtime_ns)
        hit = self._meta_cache.get(f.path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        from .io import open_tensors  # lazily: resolving names needs no torch

        try:
            with open_tensors(f.path) as tf:
                md = dict(tf.metadata)
        except (LoraFileError, OSError) as e:
            self.unreadable[f.path] = str(e)
            md = {}
        names = []
        for key in ALIAS_KEYS:
            v = md.get(key)
            if isinstance(v, str) and v.strip() and v.strip() not in names:
                names.append(v.strip())
        self._meta_cache[f.path] = (stamp, tuple(names))
        return tuple(names)

    def _alias_tables(self, index: _Index) -> dict:
        with self._lock:
            if index.aliases is None:
                tables = {False: {}, True: {}}
                for f in index.files:
                    for a in self.aliases(f):
                        tables[False].setdefault(_norm_name(a), f)
                        tables[True].setdefault(_norm_name(a).casefold(), f)
                index.aliases = tables
            return index.aliases

    # -- lookup -------------------------------------------------------------------------------
    def find(self, name: str) -> Optional[LoraFile]:
        """The file ``name`` means, or None."""
        index = self._current()
        n = _norm_name(name)
        if not n:
            return None
        if os.path.isabs(str(name).strip()):
            hit = self._absolute(index, str(name).strip())
            if hit is not None:
                return hit
        for fold in (False, True):
            k = n.casefold() if fold else n
            t = index.tables[fold]
            for field_name in ("relpath", "key"):
                if k in t[field_name]:
                    return t[field_name][k]
            if "/" in k:
                tail = "/" + k
                for f in index.files:
                    rel, key = (f.relpath, f.key) if not fold else (f.relpath.casefold(), f.key.casefold())
                    if rel.endswith(tail) or key.endswith(tail):
                        return f
            for field_name in ("filename", "stem"):
                if k in t[field_name]:
                    return t[field_name][k]
            alias = self._alias_tables(index)[fold]
            if k in alias:
                return alias[k]
        return None

    def find_pair(self, name: str) -> Optional[dict]:
        """``{"high": LoraFile, "low": LoraFile}`` when ``name`` names a two-expert pair (files
        whose names differ only by a HIGH / LOW / high_noise / low_noise token, or a folder
        holding ``high_noise_model`` and ``low_noise_model``; see :mod:`lora_ext.experts`), else
        None. Exact spelling first, then ignoring case; the first file of each expert in library
        order wins."""
        from .experts import split_expert

        n = _norm_name(name)
        if not n:
            return None
        index = self._current()
        for fold in (False, True):
            want = n.casefold() if fold else n
            found: dict = {}
            for f in index.files:
                parts = split_expert(f.stem)
                if parts is None:
                    continue
                pair, expert = parts
                folder = f.relpath.rsplit("/", 1)[0] if "/" in f.relpath else ""
                names = {pair, f"{folder}/{pair}" if folder else pair} if pair else {folder}
                if fold:
                    names = {x.casefold() for x in names}
                if want in names or (pair and any(x.endswith("/" + want) for x in names if "/" in x)):
                    found.setdefault(expert, f)
            if len(found) == 2:
                return found
        return None

    def _absolute(self, index: _Index, name: str) -> Optional[LoraFile]:
        real = os.path.realpath(name)
        for f in index.files:
            if os.path.realpath(f.path) == real:
                return f
        return None

    def resolve(self, name: str) -> str:
        """The path of the file ``name`` means; :class:`LoraNotFound` if none."""
        f = self.find(name)
        if f is None:
            raise self.not_found(name)
        return f.path

    def not_found(self, name: str) -> LoraNotFound:
        """The error for a name that matches nothing, with the closest names."""
        index = self._current()
        n = _norm_name(name).casefold()
        shown = {}
        for f in index.files:
            for s in (f.stem, f.key):
                shown.setdefault(s.casefold(), s)
        for table in (self._alias_tables(index)[False],):
            for a in table:
                shown.setdefault(a.casefold(), a)
        close = difflib.get_close_matches(n, list(shown), n=5, cutoff=0.5)
        return LoraNotFound(name, self.folders, [shown[c] for c in close],
                            missing=self._missing, files=len(index.files))


def resolve_specs(specs: Iterable, library: LoraLibrary, *, on_missing: str = "raise") -> list:
    """Set ``spec.path`` for every spec whose ``path`` is None, from ``spec.name``.

    ``on_missing="raise"`` (default) raises :class:`LoraNotFound` at the first name that
    matches nothing; ``"collect"`` leaves those paths None and returns the errors instead
    (an empty list when everything resolved).
    """
    if on_missing not in ("raise", "collect"):
        raise ValueError(f"on_missing must be 'raise' or 'collect', not {on_missing!r}")
    errors = []
    for spec in specs:
        if spec.path is not None:
            continue
        f = library.find(spec.name)
        if f is not None:
            spec.path = f.path
            continue
        pair = library.find_pair(spec.name)
        if pair is not None:  # a two-expert LoRA (Wan 2.2): one tag for both files
            from .experts import pair_spec

            pair_spec(spec, {e: pf.path for e, pf in pair.items()})
            continue
        err = library.not_found(spec.name)
        if spec.tag:
            err = err.with_tag(spec.tag)
        if on_missing == "raise":
            raise err
        errors.append(err)
    return errors
