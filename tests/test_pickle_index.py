"""lora_ext.pickle_index: what it reads of a torch.save file equals what torch's safe loader
gives, and it declines (None) everything else, running nothing."""
import collections
import os
import zipfile

import pytest
import torch

from lora_ext import pickle_index


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _same_as_torch(path, limit=None):
    idx = pickle_index.read(str(path), 100_000, 16)
    assert idx is not None
    ref = torch.load(path, weights_only=True)
    with idx:
        assert idx.names == list(ref)
        for k, t in ref.items():
            r = idx.tensors[k]
            assert (r.dtype, r.shape) == (str(t.dtype), tuple(t.shape)), k
            assert idx.read_bytes(k) == _bytes(t), k
            assert idx.read_bytes(k, 5) == _bytes(t)[:5], k


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_shape_reads_as_torch_loads_it(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(40, 9, generator=g) * 50).to(dtype)
    sd = {
        "lora_unet_x.lora_down.weight": base[:4],
        "lora_unet_x.lora_up.weight": base.reshape(-1)[7:7 + 24].reshape(6, 4),  # a view at an offset
        "lora_unet_x.alpha": torch.tensor(3).to(dtype),  # 0-dim
        "empty": torch.zeros(0, 5, dtype=dtype),
        "conv": (torch.randn(2, 3, 3, 3, generator=g) * 9).to(dtype),
        "ones_dims": (torch.randn(1, 7, 1, generator=g) * 9).to(dtype),
    }
    torch.save(sd, tmp_path / "a.pt")
    _same_as_torch(tmp_path / "a.pt")


def test_parameters_and_ordered_dicts_and_shared_storages(tmp_path):
    w = torch.randn(8, 8)
    sd = collections.OrderedDict([("p", torch.nn.Parameter(w[2:4])), ("q", w[:3]), ("r", w.clone())])
    torch.save(sd, tmp_path / "a.pt")
    _same_as_torch(tmp_path / "a.pt")


def _evil(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return marker, Evil()


def _rewrite(src, dst, drop=None, change=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if drop and info.filename.endswith(drop):
                continue
            data = zin.read(info)
            if change and info.filename.endswith(change[0]):
                data = change[1](data)
            zout.writestr(info.filename, data)


def test_it_declines_what_it_does_not_vouch_for_and_runs_nothing(tmp_path, monkeypatch):
    good = {"a.lora_down.weight": torch.randn(4, 6).half(), "a.alpha": torch.tensor(2.0)}
    torch.save(good, tmp_path / "good.pt")
    assert pickle_index.read(str(tmp_path / "good.pt"), 100, 16) is not None
    marker, evil = _evil(tmp_path)
    cases = {
        "legacy": lambda p: torch.save(good, p, _use_new_zipfile_serialization=False),
        "transposed": lambda p: torch.save(dict(good, t=torch.randn(3, 5).t()), p),
        "nested": lambda p: torch.save({"state_dict": good}, p),
        "int_key": lambda p: torch.save({1: torch.zeros(2)}, p),
        "number": lambda p: torch.save(dict(good, step=3), p),
        "code": lambda p: torch.save(dict(good, x=evil), p),
        "list": lambda p: torch.save([torch.zeros(2)], p),
        "float8": lambda p: torch.save({"f": torch.zeros(4, dtype=torch.float8_e4m3fn)}, p),
        "truncated": lambda p: p.write_bytes((tmp_path / "good.pt").read_bytes()[:-60]),
        "not_zip": lambda p: p.write_bytes(b"\x80\x02}q\x00."),
        "no_record": lambda p: _rewrite(tmp_path / "good.pt", p, drop="/data/0"),
        "short_record": lambda p: _rewrite(tmp_path / "good.pt", p, change=("/data/0", lambda d: d[:-2])),
        "big_endian": lambda p: _rewrite(tmp_path / "good.pt", p, change=("/byteorder", lambda d: b"big")),
        "bad_pickle": lambda p: _rewrite(tmp_path / "good.pt", p, change=("/data.pkl", lambda d: d[: len(d) // 2])),
    }
    for name, make in cases.items():
        p = tmp_path / f"{name}.pt"
        make(p)
        assert pickle_index.read(str(p), 100, 16) is None, name
    assert not marker.exists()
    # the bounds: tensors, dimensions, the pickle's size
    assert pickle_index.read(str(tmp_path / "good.pt"), 1, 16) is None
    torch.save({"d": torch.zeros((1,) * 5)}, tmp_path / "dims.pt")
    assert pickle_index.read(str(tmp_path / "dims.pt"), 100, 4) is None
    monkeypatch.setattr(pickle_index, "MAX_PICKLE_BYTES", 50)
    assert pickle_index.read(str(tmp_path / "good.pt"), 100, 16) is None


def test_library_scan_unpickles_a_repeated_structure_with_torch_once(tmp_path, monkeypatch):
    """The library's pickle memo reads repeated structures through the index: torch's loader
    runs for the first file of a structure only, and the rows equal those of a scan without the
    index (every file through torch)."""
    import json

    from lora_ext import io as lio
    from lora_ext import library

    g = torch.Generator().manual_seed(3)
    for i in range(4):
        sd = {}
        for m in ("a", "b"):
            k = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_{m}"
            sd[k + ".lora_down.weight"] = torch.randn(4, 320, generator=g).half()
            sd[k + ".lora_up.weight"] = torch.randn(320, 4, generator=g).half()
            sd[k + ".alpha"] = torch.tensor(2.0)
        torch.save(sd, tmp_path / f"p{i}.pt")
    loads = []
    real = lio._torch_load
    monkeypatch.setattr(lio, "_torch_load", lambda p: loads.append(p) or real(p))
    library._MEMO["ready"] = None
    with_index = library.scan_library([str(tmp_path)], jobs=1, cache_path=None, progress=False)
    assert len(loads) == 1
    monkeypatch.setattr(pickle_index, "read", lambda *a: None)
    library._MEMO["ready"] = None
    loads.clear()
    without = library.scan_library([str(tmp_path)], jobs=1, cache_path=None, progress=False)
    assert len(loads) >= 4 and json.dumps(with_index["rows"]) == json.dumps(without["rows"])


def test_a_pickle_cannot_change_the_shared_stand_ins(tmp_path):
    """BUILD sets the state of the object before it: aimed at the stand-ins every file shares (a
    storage type's element size, a function's defaults), the file is declined and the next file
    reads as before."""
    good = {"a": torch.randn(3, 4).half(), "b": torch.tensor(2.0)}
    torch.save(good, tmp_path / "good.pt")

    def build(glob: bytes, attr: bytes, value: bytes) -> bytes:
        # PROTO 2; GLOBAL; (None, {attr: value}); BUILD; POP; EMPTY_DICT; STOP
        return (b"\x80\x02c" + glob + b"N}X" + len(attr).to_bytes(4, "little") + attr + value + b"s\x86b0}.")

    attacks = {
        "itemsize": build(b"torch\nHalfStorage\n", b"itemsize", b"K\x00"),
        "dtype": build(b"torch\nFloatStorage\n", b"dtype", b"X\x03\x00\x00\x00abc"),
        "defaults": build(b"torch._utils\n_rebuild_tensor_v2\n", b"__defaults__", b"K\x01\x85"),
        "fn": build(b"collections\nOrderedDict\n", b"_fn", b"N"),
    }
    for name, data in attacks.items():
        p = tmp_path / f"{name}.pt"
        _rewrite(tmp_path / "good.pt", p, change=("/data.pkl", lambda d, data=data: data))
        assert pickle_index.read(str(p), 100, 16) is None, name
        _same_as_torch(tmp_path / "good.pt")
