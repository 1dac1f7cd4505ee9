"""Name resolution: LoraLibrary rules, precedence, metadata aliases, cache, LoraNotFound."""
from __future__ import annotations

import os

import pytest
import torch

import lora_ext
from lora_ext import resolve as R
from lora_ext.io import save_safetensors
from lora_ext.prompt import parse_prompt
from lora_ext.resolve import LoraLibrary, LoraNotFound, resolve_specs


def st_file(path, **metadata):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_safetensors(path, {"w": torch.zeros(1)}, metadata or None)
    return str(path)


def raw_file(path, data=b"not opened"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


@pytest.fixture
def lib(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    files = {
        "ink": st_file(str(a / "styles" / "ink wash.safetensors"), ss_output_name="inkwash_v3"),
        "pixel": st_file(str(a / "pixel.safetensors"), **{"modelspec.title": "Pixel Art XL"}),
        "pixel_ckpt": raw_file(str(a / "pixel.ckpt")),
        "deep": st_file(str(a / "styles" / "sub" / "deep.safetensors")),
        "chars": raw_file(str(a / "chars" / "Alice.pt")),
        "dup_a": st_file(str(a / "zz" / "dup.safetensors")),
        "dup_top_b": st_file(str(b / "dup.safetensors")),
        "dup_b": st_file(str(b / "zz" / "dup.safetensors")),
        "b_only": raw_file(str(b / "other" / "bonly.pth")),
        "bin": raw_file(str(b / "x.bin")),
        "txt": raw_file(str(a / "notes.txt")),
        "hidden": st_file(str(a / ".cache" / "hidden.safetensors")),
    }
    return LoraLibrary([str(a), str(b)]), files, tmp_path


@pytest.mark.parametrize("name,key", [
    ("styles/ink wash.safetensors", "ink"),  # relative path with extension
    ("styles/ink wash", "ink"),  # without
    ("styles\\ink wash", "ink"),  # Windows separators
    ("./styles//ink wash", "ink"),
    ("ink wash.safetensors", "ink"),  # file name
    ("ink wash", "ink"),  # stem
    ("sub/deep", "deep"),  # end of a path, at a folder boundary
    ("deep", "deep"),
    ("inkwash_v3", "ink"),  # ss_output_name
    ("Pixel Art XL", "pixel"),  # modelspec.title
    ("pixel", "pixel"),  # .safetensors before .ckpt
    ("pixel.ckpt", "pixel_ckpt"),
    ("Alice", "chars"),
    ("chars/Alice.pt", "chars"),
    ("bonly", "b_only"),
    ("x", "bin"),
    ("dup", "dup_top_b"),  # a whole relative path (rule 2) beats a stem (rule 5)
    ("zz/dup", "dup_a"),  # the same path in two folders: the earlier folder
    ("INK WASH", "ink"),  # case-insensitive fallback
    ("Styles/Ink Wash.SAFETENSORS", "ink"),
    ("INKWASH_V3", "ink"),
    ("alice", "chars"),
])
def test_resolution_rules(lib, name, key):
    library, files, _ = lib
    assert library.resolve(name) == files[key]


def test_not_found_names_folders_and_closest(lib):
    library, files, tmp = lib
    for name in ("notes", "hidden", "nope", "eep", "../a/pixel", "ink"):
        assert library.find(name) is None, name
    with pytest.raises(LoraNotFound) as ei:
        library.resolve("ink_wash")
    e = ei.value
    assert isinstance(e, lora_ext.LoraExtError) and lora_ext.LoraNotFound is LoraNotFound
    msg = str(e)
    assert str(tmp / "a") in msg and str(tmp / "b") in msg
    assert "ink wash" in e.suggestions and "closest:" in msg
    assert "\n" not in msg
    assert e.name == "ink_wash" and e.folders == [str(tmp / "a"), str(tmp / "b")]


def test_missing_folder_is_named(tmp_path):
    library = LoraLibrary([str(tmp_path / "nowhere")])
    with pytest.raises(LoraNotFound, match=r"nowhere \(missing\); 0 LoRA files"):
        library.resolve("x")
    with pytest.raises(LoraNotFound, match="no folders configured"):
        LoraLibrary([]).resolve("x")


def test_missing_folder_appearing_is_picked_up(tmp_path):
    library = LoraLibrary([str(tmp_path / "later")])
    assert library.find("x") is None
    p = st_file(str(tmp_path / "later" / "x.safetensors"))
    assert library.resolve("x") == p


def test_absolute_path_inside_a_folder(lib):
    library, files, tmp = lib
    assert library.resolve(files["deep"]) == files["deep"]
    outside = st_file(str(tmp / "elsewhere" / "deep.safetensors"))
    assert library.find(outside) is None  # only files of the library


def test_metadata_is_read_lazily_and_cached(lib, monkeypatch):
    library, files, _ = lib
    import lora_ext.io as io

    opened = []
    real = io.open_tensors

    def spy(path, **kw):
        opened.append(path)
        return real(path, **kw)

    monkeypatch.setattr(io, "open_tensors", spy)
    library.resolve("ink wash")
    library.resolve("styles/sub/deep")
    assert opened == []  # names, not metadata
    library.resolve("inkwash_v3")
    n = len(opened)
    assert n == 6  # the .safetensors files (headers only), never the pickles
    assert all(p.endswith(".safetensors") for p in opened)
    library.resolve("Pixel Art XL")
    library.refresh()
    library.resolve("Pixel Art XL")
    assert len(opened) == n  # cached per file size and mtime, across rescans


def test_unreadable_metadata_still_resolves_by_name(lib):
    library, files, tmp = lib
    bad = raw_file(str(tmp / "a" / "broken.safetensors"), b"\x00" * 3)
    assert library.resolve("broken") == bad
    assert library.find("no such alias") is None
    assert bad in library.unreadable


def test_scan_cache_invalidated_by_folder_mtime(lib):
    library, files, tmp = lib
    library.resolve("ink wash")
    scans = library.scans
    library.resolve("deep")
    assert library.scans == scans  # nothing changed: no rescan
    new = st_file(str(tmp / "a" / "styles" / "sub" / "fresh.safetensors"))
    d = os.path.dirname(new)
    st = os.stat(d)
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # coarse-mtime filesystems
    assert library.resolve("fresh") == new
    assert library.scans == scans + 1
    os.remove(files["deep"])
    st = os.stat(d)
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert library.find("deep") is None


def test_new_subfolder_is_seen(lib):
    library, files, tmp = lib
    library.files()
    p = st_file(str(tmp / "b" / "newdir" / "n1.safetensors"))
    st = os.stat(tmp / "b")
    os.utime(tmp / "b", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert library.resolve("newdir/n1") == p


def test_files_listing_order(lib):
    library, files, _ = lib
    rels = [(f.folder.rsplit(os.sep, 1)[-1], f.relpath) for f in library.files()]
    assert rels[:2] == [("a", "pixel.safetensors"), ("a", "pixel.ckpt")]
    assert ("a", ".cache/hidden.safetensors") not in rels
    assert rels[-1][0] == "b"
    f = library.files()[0]
    assert (f.key, f.stem, f.filename, f.ext) == ("pixel", "pixel", "pixel.safetensors", ".safetensors")


def test_resolve_specs(lib):
    library, files, _ = lib
    res = parse_prompt("<lora:styles/ink wash:0.8> <lyco:Pixel Art XL:1> <lora:missing one:1>")
    with pytest.raises(LoraNotFound) as ei:
        resolve_specs(res.specs, library)
    assert str(ei.value).startswith("<lora:missing one:1>: LoRA 'missing one' not found")
    assert res.specs[0].path == files["ink"] and res.specs[1].path == files["pixel"]
    res.specs[0].path = "/kept/as/is.safetensors"
    errors = resolve_specs(res.specs, library, on_missing="collect")
    assert [e.name for e in errors] == ["missing one"] and res.specs[2].path is None
    assert res.specs[0].path == "/kept/as/is.safetensors"
    with pytest.raises(ValueError):
        resolve_specs(res.specs, library, on_missing="ignore")
    assert resolve_specs([], library) == []


def test_extensions_constant():
    assert R.EXTENSIONS == (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
