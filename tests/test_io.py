"""lora_ext.io: safe and lazy loading, validation of every bad input, atomic saving, hashes."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_ext import io as lio
from lora_ext.errors import LoraFileError
from lora_ext.io import addnet_hash, file_sha256, open_tensors, save_safetensors, short_hash


# ----------------------------------------------------------------------------------------------
# helpers


def st_bytes(header, data: bytes = b"", *, length=None) -> bytes:
    """A safetensors-like file from a header (dict, or raw JSON text/bytes) and a data area."""
    if isinstance(header, (dict, list)):
        raw = json.dumps(header).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def snapshot(folder):
    """Every file under ``folder`` with its bytes: to show nothing was written or changed."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + "/"] = None
    return out


def expect_error(path, *fragments, kind="lora"):
    """open_tensors(path) must fail with one line naming the file and every fragment, and
    leave the folder exactly as it was."""
    folder = os.path.dirname(str(path))
    before = snapshot(folder)
    with pytest.raises(LoraFileError) as info:
        with open_tensors(path, kind=kind) as f:
            for k in f.keys():
                f.get(k)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert os.path.basename(str(path)) in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert snapshot(folder) == before
    return msg


def lora_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 768, generator=g).half(),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 4, generator=g).bfloat16(),
    }


# ----------------------------------------------------------------------------------------------
# good files


def test_roundtrip_own_writer(tmp_path):
    p = tmp_path / "a.safetensors"
    t = lora_tensors()
    save_safetensors(p, t, {"ss_network_dim": "4", "note": "ünïcode"})
    with open_tensors(p) as f:
        assert f.format == "safetensors"
        assert f.path == str(p)
        assert f.metadata == {"ss_network_dim": "4", "note": "ünïcode"}
        assert sorted(f.keys()) == sorted(t)
        assert len(f) == len(t) and all(k in f for k in t)
        for k, v in t.items():
            assert f.shape(k) == tuple(v.shape)
            assert f.dtype(k) == v.dtype
            got = f.get(k)
            assert got.dtype == v.dtype and torch.equal(got, v)
    # the safetensors library reads what we write
    ref = load_file(str(p))
    assert set(ref) == set(t) and all(torch.equal(ref[k], t[k]) for k in t)


def test_reads_safetensors_library_files_all_dtypes(tmp_path):
    p = tmp_path / "lib.safetensors"
    t = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "f64": torch.randn(2).double(),
        "i64": torch.arange(5),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(5, dtype=torch.int16),
        "i8": torch.arange(-2, 3, dtype=torch.int8),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(t, str(p), metadata={"format": "pt"})
    with open_tensors(p) as f:
        assert f.metadata == {"format": "pt"}
        assert set(f.keys()) == set(t)
        for k, v in t.items():
            got = f.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_get_returns_independent_writable_copies(tmp_path):
    p = tmp_path / "a.safetensors"
    save_safetensors(p, {"w": torch.ones(4)})
    before = p.read_bytes()
    with open_tensors(p) as f:
        a = f.get("w")
        a.mul_(3)
        assert torch.equal(f.get("w"), torch.ones(4))
    assert p.read_bytes() == before


def test_no_metadata_and_null_metadata(tmp_path):
    p = tmp_path / "a.safetensors"
    p.write_bytes(st_bytes({"__metadata__": None, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                           struct.pack("<f", 2.0)))
    with open_tensors(p) as f:
        assert f.metadata == {}
        assert f.get("x").item() == 2.0


def test_header_padding_and_gaps_allowed(tmp_path):
    # safetensors pads the header with spaces; trailing bytes after the data are harmless.
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode() + b"       "
    p = tmp_path / "a.safetensors"
    p.write_bytes(st_bytes(header, struct.pack("<2f", 1.0, 2.0) + b"tail"))
    with open_tensors(p) as f:
        assert f.get("x").tolist() == [1.0, 2.0]


def test_lazy_header_only_on_truncated_data(tmp_path):
    """Keys, shapes, dtypes and metadata come from the header alone: a file whose data area is
    cut short still answers them; only reading the missing tensor fails."""
    t = {"a": torch.arange(4, dtype=torch.float32), "b": torch.arange(1024, dtype=torch.float32)}
    full = tmp_path / "full.safetensors"
    save_safetensors(full, t, {"m": "v"})
    data = full.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    b0, b1 = json.loads(data[8: 8 + n])["b"]["data_offsets"]
    assert b1 - b0 == 4096
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: 8 + n + b0 + 1000])  # "a" is whole, "b" is cut short
    before = snapshot(tmp_path)
    with open_tensors(cut) as f:
        assert f.metadata == {"m": "v"}
        assert set(f.keys()) == {"a", "b"}
        assert f.shape("b") == (1024,) and f.dtype("b") == torch.float32
        assert torch.equal(f.get("a"), t["a"])
        with pytest.raises(LoraFileError) as info:
            f.get("b")
        assert str(info.value) == (f"{cut}: truncated: tensor 'b' needs bytes {8 + n + b0}..{8 + n + b1} "
                                   f"but the file has only {8 + n + b0 + 1000} bytes")
        with pytest.raises(LoraFileError, match="truncated: tensor 'b'"):
            f.check_complete()
    assert snapshot(tmp_path) == before
    # a data area that is entirely missing: the header still answers
    cut2 = tmp_path / "cut2.safetensors"
    cut2.write_bytes(data[: 8 + n])
    with open_tensors(cut2) as f:
        assert sorted(f.keys()) == ["a", "b"] and f.shape("a") == (4,)
        for k in ("a", "b"):
            with pytest.raises(LoraFileError, match=f"truncated: tensor '{k}'"):
                f.get(k)


def test_open_reads_no_tensor_bytes(tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    save_safetensors(p, {"x": torch.zeros(1 << 16)})
    calls = []
    orig = lio.TensorFile._read_safetensor

    def spy(self, key):
        calls.append(key)
        return orig(self, key)

    monkeypatch.setattr(lio.TensorFile, "_read_safetensor", spy)
    with open_tensors(p) as f:
        f.keys(), f.shape("x"), f.dtype("x"), f.metadata
        assert calls == []
        f.get("x")
        assert calls == ["x"]


def test_unknown_key_and_closed(tmp_path):
    p = tmp_path / "a.safetensors"
    save_safetensors(p, {"x": torch.zeros(2)})
    f = open_tensors(p)
    for call in (lambda: f.get("nope"), lambda: f.shape("nope"), lambda: f.dtype("nope")):
        with pytest.raises(LoraFileError, match="has no tensor named 'nope'"):
            call()
    f.close()
    with pytest.raises(LoraFileError, match="closed"):
        f.get("x")


def test_kind_must_be_known(tmp_path):
    p = tmp_path / "a.safetensors"
    save_safetensors(p, {"x": torch.zeros(2)})
    with pytest.raises(ValueError):
        open_tensors(p, kind="embedding")


# ----------------------------------------------------------------------------------------------
# bad safetensors files

DESC = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
DATA = b"\0" * 16

BAD_HEADERS = [
    # (id, file bytes, fragments the message must hold)
    ("huge-length", struct.pack("<Q", 9_000_000_000_000_000_000) + b"{}",
     ["not a safetensors file: header length 9000000000000000000 bytes exceeds file size 10 bytes"]),
    ("length-past-end", st_bytes({"x": DESC}, DATA, length=500),
     ["header length 500 bytes exceeds file size"]),
    ("too-short", b"\x05\0\0", ["not a safetensors file: only 3 bytes, too short for a header"]),
    ("empty", b"", ["only 0 bytes"]),
    ("not-json", st_bytes("{dtype: F32}"), ["not a safetensors file: the header is not valid JSON"]),
    ("json-array", st_bytes("[1, 2]"), ["the header is not a JSON object"]),
    ("json-string", st_bytes('"hello"'), ["the header is not a JSON object"]),
    ("zero-length", st_bytes(b""), ["the header is not a JSON object"]),
    ("bad-utf8", st_bytes(b'{"\xff\xfe": 1}'), ["the header is not UTF-8 text"]),
    ("too-deep", st_bytes('{"a":' + "[" * 50000 + "]" * 50000 + "}"), ["nested too deeply"]),
    ("entry-number", st_bytes({"x": 5}), ["corrupt safetensors header: entry 'x' is a JSON number, not a tensor descriptor"]),
    ("entry-list", st_bytes({"x": [1, 2]}), ["entry 'x' is a JSON array, not a tensor descriptor"]),
    ("no-dtype", st_bytes({"x": {"shape": [2, 2], "data_offsets": [0, 16]}}, DATA),
     ["tensor 'x' has no dtype (not a tensor descriptor)"]),
    ("no-shape-offsets", st_bytes({"x": {"dtype": "F32"}}, DATA), ["tensor 'x' has no shape / data_offsets"]),
    ("unknown-dtype", st_bytes({"x": dict(DESC, dtype="F17")}, DATA), ["tensor 'x' has unknown dtype 'F17'"]),
    ("dtype-number", st_bytes({"x": dict(DESC, dtype=4)}, DATA), ["dtype that is a JSON number"]),
    ("negative-shape", st_bytes({"x": dict(DESC, shape=[-2, -2])}, DATA), ["tensor 'x' has invalid shape [-2, -2]"]),
    ("bool-shape", st_bytes({"x": dict(DESC, shape=[True, 16])}, DATA), ["invalid shape"]),
    ("float-shape", st_bytes({"x": dict(DESC, shape=[2.0, 2])}, DATA), ["invalid shape"]),
    ("shape-string", st_bytes({"x": dict(DESC, shape="2x2")}, DATA), ["invalid shape"]),
    ("offsets-reversed", st_bytes({"x": dict(DESC, data_offsets=[16, 0])}, DATA),
     ["tensor 'x' has invalid data_offsets [16, 0]"]),
    ("offsets-three", st_bytes({"x": dict(DESC, data_offsets=[0, 8, 16])}, DATA), ["invalid data_offsets"]),
    ("offsets-negative", st_bytes({"x": dict(DESC, data_offsets=[-16, 0])}, DATA), ["invalid data_offsets"]),
    ("size-mismatch", st_bytes({"x": dict(DESC, data_offsets=[0, 12])}, DATA),
     ["tensor 'x' is F32 of shape [2, 2] (16 bytes) but its data_offsets [0, 12] span 12 bytes"]),
    ("overlap", st_bytes({"x": DESC, "y": dict(DESC, data_offsets=[8, 24])}, DATA + b"\0" * 8),
     ["tensors 'x' and 'y' overlap in the data area"]),
    ("metadata-number", st_bytes({"__metadata__": {"ss_network_dim": 32}, "x": DESC}, DATA),
     ["corrupt safetensors header: metadata value for 'ss_network_dim' is a JSON number, not a string"]),
    ("metadata-list", st_bytes({"__metadata__": ["a"], "x": DESC}, DATA),
     ["__metadata__ is a JSON array, not an object"]),
    ("zip-renamed", b"PK\x03\x04\x14\0\0\0" + b"\0" * 40, ["exceeds file size", "PyTorch zip checkpoint"]),
    ("pickle-renamed", b"\x80\x02}q\0(X\x01\0\0\0aq" + b"\0" * 20, ["looks like a pickle"]),
    ("lfs-pointer", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
     ["Git LFS pointer"]),
    ("html", b"<!DOCTYPE html><html><body>429 Too Many Requests</body></html>", ["web page"]),
]


@pytest.mark.parametrize("data,fragments", [c[1:] for c in BAD_HEADERS], ids=[c[0] for c in BAD_HEADERS])
def test_bad_safetensors(tmp_path, data, fragments):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(data)
    expect_error(p, *fragments)
    assert p.read_bytes() == data


def test_header_over_100mb_limit(tmp_path):
    p = tmp_path / "big.safetensors"
    size = 100_000_000 + 4096
    with open(p, "wb") as fh:  # a sparse file: cheap on disk
        fh.write(struct.pack("<Q", 100_000_001) + b"{")
        fh.truncate(size)
    expect_error(p, "header length 100000001 bytes exceeds the 100 MB limit")


def test_not_a_file(tmp_path):
    expect_error(tmp_path / "missing.safetensors", "no such file")
    d = tmp_path / "folder.safetensors"
    d.mkdir()
    expect_error(d, "is a folder, not a file")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    expect_error(txt, "unknown file type '.txt': expected .safetensors, .ckpt, .pt, .pth or .bin")
    noext = tmp_path / "model"
    noext.write_bytes(b"x")
    expect_error(noext, "unknown file type (none)")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_unreadable(tmp_path):
    p = tmp_path / "a.safetensors"
    save_safetensors(p, {"x": torch.zeros(1)})
    p.chmod(0)
    try:
        expect_error(p, "permission denied")
    finally:
        p.chmod(stat.S_IRUSR | stat.S_IWUSR)


# ----------------------------------------------------------------------------------------------
# NaN / Inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_non_finite_lora(tmp_path, dtype, bad, word):
    p = tmp_path / "nan.safetensors"
    w = torch.ones(8, 4, dtype=dtype)
    w[3, 1] = bad
    key = "lora_unet_x.lora_up.weight"
    save_safetensors(p, {key: w, "lora_unet_x.alpha": torch.tensor(4.0)})
    with open_tensors(p) as f:
        assert f.get("lora_unet_x.alpha").item() == 4.0
        with pytest.raises(LoraFileError) as info:
            f.get(key)
        assert str(info.value) == f"{p}: tensor '{key}' contains {word} (1 of 32 values)"
        # explicitly unchecked reads are possible (e.g. for inspection)
        assert not torch.isfinite(f.get(key, check_finite=False)).all()
    # a checkpoint is not scanned by default, but can be
    with open_tensors(p, kind="checkpoint") as f:
        assert not torch.isfinite(f.get(key)).all()
        with pytest.raises(LoraFileError, match=f"contains {word}"):
            f.get(key, check_finite=True)


def test_nan_and_inf_together_and_ints_not_scanned(tmp_path):
    p = tmp_path / "a.safetensors"
    w = torch.tensor([float("nan"), float("inf"), 1.0])
    save_safetensors(p, {"w": w, "i": torch.arange(3)})
    with open_tensors(p) as f:
        assert f.get("i").tolist() == [0, 1, 2]
        with pytest.raises(LoraFileError, match=r"contains NaN and Inf \(2 of 3 values\)"):
            f.get("w")


def test_non_finite_in_pickle_lora(tmp_path):
    p = tmp_path / "nan.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.tensor([1.0, float("nan")])}, p)
    expect_error(p, "tensor 'lora_unet_x.lora_down.weight' contains NaN")


# ----------------------------------------------------------------------------------------------
# pickles


class _Evil:
    """Unpickling this (fully) would create the marker file."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _EvilSystem:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(cls, marker):
    e = cls()
    e.marker = str(marker)
    return e


@pytest.mark.parametrize("how", ["torch-zip", "torch-legacy", "pickle-2", "pickle-4", "nested-state-dict"])
@pytest.mark.parametrize("cls", [_Evil, _EvilSystem])
@pytest.mark.parametrize("kind", ["lora", "checkpoint"])
def test_malicious_pickle_runs_nothing(tmp_path, how, cls, kind):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.ckpt"
    payload = {"lora_unet_x.lora_down.weight": torch.ones(2), "x": _evil(cls, marker)}
    if how == "torch-zip":
        torch.save(payload, p)
    elif how == "torch-legacy":
        torch.save(payload, p, _use_new_zipfile_serialization=False)
    elif how == "nested-state-dict":
        torch.save({"state_dict": payload, "global_step": 5}, p)
    else:
        with open(p, "wb") as fh:
            pickle.dump(payload, fh, protocol=int(how[-1]))
    assert not marker.exists()
    msg = expect_error(p, "refused to unpickle: it contains code or objects other than tensors",
                       "nothing in it was run", kind=kind)
    if how.startswith("torch") or how == "nested-state-dict":
        target = "open" if cls is _Evil else "system"
        assert "it wants to import" in msg and target in msg
    assert not marker.exists()


def test_legit_torch_save_loads(tmp_path):
    t = lora_tensors()
    for legacy in (False, True):
        p = tmp_path / f"ok{int(legacy)}.pt"
        torch.save(t, p, _use_new_zipfile_serialization=not legacy)
        with open_tensors(p) as f:
            assert f.format == "pickle" and f.metadata == {} and f.skipped == []
            assert f.keys() == list(t)
            for k, v in t.items():
                assert f.shape(k) == tuple(v.shape) and f.dtype(k) == v.dtype
                assert torch.equal(f.get(k), v)


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_pickle_extensions(tmp_path, ext):
    p = tmp_path / f"m{ext}"
    torch.save({"w": torch.ones(3)}, p)
    with open_tensors(p) as f:
        assert torch.equal(f.get("w"), torch.ones(3))


def test_checkpoint_unwraps_state_dict_and_skips_scalars(tmp_path):
    p = tmp_path / "sd.ckpt"
    sd = {"model.diffusion_model.x.weight": torch.randn(2, 2), "cond_stage_model.y": torch.randn(3)}
    torch.save({"state_dict": dict(sd, version="1.5"), "global_step": 470000, "epoch": 6}, p)
    with open_tensors(p, kind="checkpoint") as f:
        assert f.keys() == list(sd)
        assert sorted(f.skipped) == ["epoch", "global_step", "version"]
        assert torch.equal(f.get("cond_stage_model.y"), sd["cond_stage_model.y"])


def test_unwraps_model_and_module(tmp_path):
    for wrapper in ("model", "module"):
        p = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: {"w": torch.ones(1)}}, p)
        with open_tensors(p, kind="checkpoint") as f:
            assert f.keys() == ["w"]
    # not unwrapped when there is more than the wrapper
    p = tmp_path / "both.pt"
    torch.save({"model": {"w": torch.ones(1)}, "ema": {"w": torch.ones(1)}}, p)
    expect_error(p, "key 'model' holds a dict, not a tensor", kind="checkpoint")


def test_lora_pickle_non_tensor_values(tmp_path):
    cases = [
        ({"lora_unet_x.alpha": 4.0}, "key 'lora_unet_x.alpha' holds a float, not a tensor"),
        ({"w": torch.ones(1), "name": "x"}, "key 'name' holds a str, not a tensor"),
        ({"w": [torch.ones(1)]}, "key 'w' holds a list, not a tensor"),
        ({"w": {"a": torch.ones(1)}}, "key 'w' holds a dict, not a tensor"),
        ({1: torch.ones(1)}, "key 1 is a int, expected a string tensor name"),
    ]
    for i, (obj, frag) in enumerate(cases):
        p = tmp_path / f"l{i}.pt"
        torch.save(obj, p)
        expect_error(p, frag, kind="lora")


def test_checkpoint_nested_non_tensor_is_an_error(tmp_path):
    p = tmp_path / "c.ckpt"
    torch.save({"w": torch.ones(1), "extra": [1, 2]}, p)
    expect_error(p, "key 'extra' holds a list, not a tensor", kind="checkpoint")


def test_pickle_not_a_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.ones(1)], p)
    expect_error(p, "holds a list, expected a dict of tensors")


@pytest.mark.parametrize("data,frag", [
    (b"", "not a PyTorch file: the file is empty"),
    (b"this is not a checkpoint at all", "not a readable PyTorch file: it is neither a zip nor a pickle"),
    (b"\x80\x02" + b"\xff" * 30, "refused to unpickle: it contains code or objects other than tensors, or is corrupt"),
    (st_bytes({"x": DESC}, DATA), "looks like a .safetensors file"),
    (b"version https://git-lfs.github.com/spec/v1\n", "Git LFS pointer"),
])
def test_bad_pickle_files(tmp_path, data, frag):
    p = tmp_path / "bad.ckpt"
    p.write_bytes(data)
    expect_error(p, frag)


def test_truncated_zip_checkpoint(tmp_path):
    p = tmp_path / "full.pt"
    torch.save({"w": torch.randn(1000)}, p)
    data = p.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    expect_error(cut, "not a readable PyTorch file")


# ----------------------------------------------------------------------------------------------
# saving


def test_save_failure_midway_leaves_old_file(tmp_path, monkeypatch):
    p = tmp_path / "out.safetensors"
    save_safetensors(p, {"old": torch.ones(3)}, {"v": "1"})
    before = snapshot(tmp_path)
    calls = []
    orig = lio._tensor_bytes

    def flaky(t):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return orig(t)

    monkeypatch.setattr(lio, "_tensor_bytes", flaky)
    with pytest.raises(LoraFileError) as info:
        save_safetensors(p, {"a": torch.ones(1000), "b": torch.ones(1000)}, {"v": "2"})
    assert str(info.value) == f"{p}: cannot save: [Errno 28] No space left on device"
    assert len(calls) == 2
    assert snapshot(tmp_path) == before


def test_save_interrupted_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "new.safetensors"

    def boom(t):
        raise KeyboardInterrupt

    monkeypatch.setattr(lio, "_tensor_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(p, {"a": torch.ones(2)})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tensors,metadata,frag", [
    ({"a": torch.ones(1)}, {"dim": 4}, "metadata value for 'dim' is a int, not a string"),
    ({"a": torch.ones(1)}, {1: "x"}, "metadata key 1 is not a string"),
    ({"a": torch.ones(1)}, ["x"], "metadata must be a dict"),
    ({"a": [1.0]}, None, "'a' is a list, not a tensor"),
    ({"a": torch.ones(1), 3: torch.ones(1)}, None, "tensor name 3 is not a string"),
    ({"__metadata__": torch.ones(1)}, None, "'__metadata__' is reserved"),
    ({"a": torch.ones(2, dtype=torch.complex128)}, None, "dtype torch.complex128"),
    ({"a": torch.ones(2).to_sparse()}, None, "not a dense tensor"),
    ([torch.ones(1)], None, "tensors must be a dict"),
])
def test_save_rejects_bad_input_before_writing(tmp_path, tensors, metadata, frag):
    p = tmp_path / "x.safetensors"
    save_safetensors(p, {"keep": torch.zeros(2)})
    before = snapshot(tmp_path)
    with pytest.raises(LoraFileError) as info:
        save_safetensors(p, tensors, metadata)
    assert str(info.value).startswith(f"{p}: cannot save: ") and frag in str(info.value)
    assert snapshot(tmp_path) == before


def test_save_bad_destination(tmp_path):
    with pytest.raises(LoraFileError, match="does not exist"):
        save_safetensors(tmp_path / "no" / "such" / "x.safetensors", {"a": torch.ones(1)})
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(LoraFileError, match="a folder has that name"):
        save_safetensors(tmp_path / "d.safetensors", {"a": torch.ones(1)})
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors"]


def test_save_overwrites_and_keeps_mode(tmp_path):
    p = tmp_path / "x.safetensors"
    save_safetensors(p, {"a": torch.ones(1)})
    if os.name == "posix":
        p.chmod(0o640)
    save_safetensors(p, {"b": torch.full((2, 3), 7.0), "s": torch.tensor(3, dtype=torch.int64)}, {"k": "v"})
    with open_tensors(p) as f:
        assert sorted(f.keys()) == ["b", "s"] and f.metadata == {"k": "v"}
        assert f.get("s").item() == 3
    if os.name == "posix":
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_save_non_contiguous_and_aligned(tmp_path):
    p = tmp_path / "x.safetensors"
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    t = {"t": base.t(), "slice": base[:, ::2], "h": torch.ones(3).half(), "d": torch.ones(3).double(),
         "u": torch.ones(5, dtype=torch.uint8)}
    save_safetensors(p, t)
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(data[8: 8 + n])
    for k, v in t.items():
        size = v.element_size()
        assert header[k]["data_offsets"][0] % size == 0
    ref = load_file(str(p))
    assert all(torch.equal(ref[k], v) for k, v in t.items())


# ----------------------------------------------------------------------------------------------
# hashes


def _a1111_addnet_hash(path) -> str:
    """Written from A1111's modules/hashes.py addnet_hash_safetensors, independently of io.py."""
    h = hashlib.sha256()
    with open(path, "rb") as b:
        n = int.from_bytes(b.read(8), "little")
        b.seek(n + 8)
        for chunk in iter(lambda: b.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def test_addnet_hash(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"x": torch.randn(300_000), "y": torch.ones(3)}, str(p), metadata={"ss_output_name": "a"})
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    expected = hashlib.sha256(data[8 + n:]).hexdigest()
    assert addnet_hash(p) == expected == _a1111_addnet_hash(p)
    assert short_hash(p) == expected[:12]
    # metadata does not change the addnet hash, but does change the file hash
    q = tmp_path / "b.safetensors"
    save_file({"x": torch.frombuffer(bytearray(data[8 + n: 8 + n + 1_200_000]), dtype=torch.float32),
               "y": torch.ones(3)}, str(q), metadata={"ss_output_name": "something else"})
    assert addnet_hash(q) == addnet_hash(p)
    assert file_sha256(q) != file_sha256(p)


def test_file_sha256(tmp_path):
    p = tmp_path / "m.ckpt"
    data = os.urandom(3 * 1024 * 1024 + 17)
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(p))[:10] == hashlib.sha256(data).hexdigest()[:10]


def test_hash_errors(tmp_path):
    with pytest.raises(LoraFileError, match="no such file"):
        addnet_hash(tmp_path / "x.safetensors")
    with pytest.raises(LoraFileError, match="no such file"):
        file_sha256(tmp_path / "x.ckpt")
    with pytest.raises(LoraFileError, match="is a folder"):
        file_sha256(tmp_path)
    p = tmp_path / "zip.safetensors"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(LoraFileError, match="exceeds file size 104 bytes"):
        addnet_hash(p)
    p.write_bytes(b"abc")
    with pytest.raises(LoraFileError, match="too short"):
        addnet_hash(p)


# ----------------------------------------------------------------------------------------------
# properties: whatever the bytes, only LoraFileError


def _exercise(path):
    try:
        with open_tensors(path) as f:
            f.metadata
            for k in f.keys():
                f.shape(k)
                try:
                    f.dtype(k)
                    f.get(k)
                except LoraFileError:
                    pass
    except LoraFileError as exc:
        assert "\n" not in str(exc)
        assert str(exc).startswith(str(path))


_SETTINGS = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_only_lorafileerror(tmp_path, data):
    p = tmp_path / "r.safetensors"
    p.write_bytes(data)
    _exercise(p)
    p.write_bytes(struct.pack("<Q", len(data)) + data)
    _exercise(p)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
dtype_names = st.sampled_from(sorted(lio._ST_DTYPES) + ["F4", "X", "f32", ""]) | json_values
dims = st.integers(-2, 40) | st.just(2 ** 63)
descriptor = st.fixed_dictionaries(
    {},
    optional={
        "dtype": dtype_names,
        "shape": st.lists(dims, max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-5, 400) | st.just(2 ** 64), min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(
    st.text(max_size=10) | st.just("__metadata__"),
    descriptor | st.dictionaries(st.text(max_size=5), st.text(max_size=5) | json_values, max_size=3) | json_values,
    max_size=5,
)


@_SETTINGS
@given(header=headers, data=st.binary(max_size=400), pad=st.integers(0, 9))
def test_random_headers_only_lorafileerror(tmp_path, header, data, pad):
    p = tmp_path / "h.safetensors"
    raw = json.dumps(header).encode() + b" " * pad
    p.write_bytes(st_bytes(raw, data))
    _exercise(p)


@_SETTINGS
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_mutated_valid_file_only_lorafileerror(tmp_path, cut, flips):
    p = tmp_path / "m.safetensors"
    save_safetensors(p, {"a": torch.randn(64), "b": torch.randn(8, 8).half()}, {"ss_network_dim": "8"})
    data = bytearray(p.read_bytes())
    for pos, val in flips:
        data[pos % len(data)] = val
    p.write_bytes(bytes(data[: cut % (len(data) + 1)]))
    _exercise(p)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"\x80\x02", b"PK\x03\x04", b"\x80\x04\x95"]))
def test_random_pickle_bytes_only_lorafileerror(tmp_path, data, prefix):
    p = tmp_path / "r.ckpt"
    p.write_bytes(prefix + data)
    _exercise(p)


@st.composite
def near_valid_files(draw):
    """Consistent headers (so tensors really get read), then at most one field spoiled and a
    data area of random length."""
    header, offset = {}, 0
    for i in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(sorted(lio._ST_DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        nbytes = lio._ST_DTYPES[name][0] * int(torch.tensor(shape).prod()) if shape else lio._ST_DTYPES[name][0]
        header[f"t{i}"] = {"dtype": name, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(header)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[key][field] = draw(json_values | dtype_names | st.lists(dims, max_size=3))
    data = draw(st.binary(min_size=offset, max_size=offset)) if draw(st.booleans()) else draw(st.binary(max_size=offset + 8))
    return json.dumps(header).encode(), data


@_SETTINGS
@given(f=near_valid_files())
def test_near_valid_headers_only_lorafileerror(tmp_path, f):
    p = tmp_path / "n.safetensors"
    p.write_bytes(st_bytes(*f))
    _exercise(p)


# ----------------------------------------------------------------------------------------------
# the pickle path cannot be talked into a full unpickle


def test_env_override_cannot_disable_weights_only(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    torch.save({"x": _evil(_Evil, marker)}, p)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    expect_error(p, "refused to unpickle")
    assert not marker.exists()


def test_host_replaced_torch_load_is_not_used(tmp_path, monkeypatch):
    """A1111's modules/safe.py replaces torch.load; we call torch.serialization.load directly
    and always with weights_only=True."""
    seen = {}
    real = torch.serialization.load

    def unsafe_wrapper(*a, **k):
        raise AssertionError("a host's torch.load wrapper was called")

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", unsafe_wrapper)
    monkeypatch.setattr(torch.serialization, "load", spy)
    p = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=True)
    with open_tensors(p) as f:
        assert f.keys() == ["w"]
    assert seen["weights_only"] is True and seen["map_location"] == "cpu" and seen["mmap"] is True


def test_save_empty(tmp_path):
    p = tmp_path / "empty.safetensors"
    save_safetensors(p, {}, {"only": "metadata"})
    with open_tensors(p) as f:
        assert f.keys() == [] and f.metadata == {"only": "metadata"}
    assert load_file(str(p)) == {}


def test_deflate_compressed_torch_zip_is_read_correctly(tmp_path):
    """A torch.save zip whose records were re-packed with DEFLATE (valid: torch's reader
    inflates them) must not be memory-mapped, which would read the compressed bytes as data."""
    import zipfile

    import torch

    from lora_ext.io import open_tensors

    sd = {"lora_unet_x.lora_down.weight": torch.randn(4, 8), "lora_unet_x.lora_up.weight": torch.randn(8, 4)}
    plain, packed = tmp_path / "plain.ckpt", tmp_path / "packed.ckpt"
    torch.save(sd, plain)
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    with open_tensors(str(packed), kind="lora") as tf:
        for k, v in sd.items():
            assert torch.equal(tf.get(k), v), k
