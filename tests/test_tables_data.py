"""The shipped SD1/SD2/SDXL module tables (lora_ext/tables): they are what a fresh generation
with diffusers/transformers gives, and the host path works with neither installed."""
import gzip
import json
import os
import subprocess
import sys

import pytest

from lora_ext import arch as A
from lora_ext import tables
from lora_ext.errors import LoraExtError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = [(a, c) for a in A.ARCHS for c in A.components(a)]


def _needs_model_libs():
    for name in ("diffusers", "transformers"):
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 - a broken install counts as missing
            pytest.skip(f"{name} cannot be imported ({type(e).__name__}: {e}); the shipped tables are "
                        f"checked against a fresh generation only where it can")


def test_shipped_tables_equal_a_fresh_generation():
    _needs_model_libs()
    from lora_ext.tables import generate

    fresh = generate.generate_tables()
    shipped = tables.load()["tables"]
    assert list(fresh) == list(shipped) == [f"{a}/{c}" for a, c in ALL]
    for key in fresh:
        f, s = fresh[key], shipped[key]
        assert f["config_sha256"] == s["config_sha256"], f"{key}: config changed; python -m lora_ext.tables.generate"
        diff = next((i for i, (x, y) in enumerate(zip(f["modules"], s["modules"])) if x != y), None)
        assert diff is None, f"{key}: entry {diff}: fresh {f['modules'][diff]} != shipped {s['modules'][diff]}"
        assert len(f["modules"]) == len(s["modules"]), key


@pytest.mark.parametrize("arch,component", ALL)
def test_module_table_from_data_equals_table_from_meta_model(arch, component):
    _needs_model_libs()
    live = A._build_table(component, A.build_meta(arch, component), A.load_config(arch, component),
                          A.ldm_root(arch, component), A.te_layout(arch, component))
    shipped = A.module_table(arch, component)
    assert list(live) == list(shipped)  # same order too
    assert dict(live) == shipped


def test_file_is_what_dumps_writes():
    # one deterministic serialisation: regenerating an unchanged table gives the same bytes
    data = tables.load()
    with open(tables.DATA_FILE, "rb") as f:
        assert f.read() == tables.dumps(data)
    raw = json.loads(gzip.decompress(tables.dumps(data)))
    assert raw["format"] == tables.FORMAT and set(raw["generated_with"]) == {"torch", "diffusers", "transformers"}
    kinds = {m[1] for t in raw["tables"].values() for m in t["modules"]}
    assert kinds == set(A.KINDS)
    assert not any(m[0].startswith("text_model.") for t in raw["tables"].values() for m in t["modules"])


def test_stale_table_is_refused():
    cfg = A.load_config("sd1", "unet")
    cfg["in_channels"] = 9
    with pytest.raises(LoraExtError, match="regenerate"):
        tables.entries("sd1", "unet", cfg)
    assert len(tables.entries("sd1", "unet", A.load_config("sd1", "unet"))) == 391


def test_module_entries_and_build_table_accept_data():
    entries = [("conv_in", "conv", (320, 4, 3, 3), (320,)), ("time_embedding.linear_1", "linear", [1280, 320], None)]
    table = A._build_table("unet", entries, A.load_config("sd1", "unet"), "model.diffusion_model.", None)
    assert table["conv_in"].ldm_weight == "model.diffusion_model.input_blocks.0.0.weight"
    assert table["time_embedding.linear_1"].weight_shape == (1280, 320)
    assert table["time_embedding.linear_1"].ldm_bias is None
    with pytest.raises(ValueError, match="kind"):
        A._build_table("unet", [("conv_in", "lstm", (1,), None)], A.load_config("sd1", "unet"), "", None)


def test_missing_model_library_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(A.MissingDependencyError, match="'diffusers'"):
        A.build_meta("sd1", "unet")
    with pytest.raises(A.MissingDependencyError, match="'transformers'"):
        A.build_meta("sdxl", "te2")
    with pytest.raises(LoraExtError, match="'transformers'"):
        A.table_for_config("te1", A.load_config("sd1", "te1"))
    with pytest.raises(ImportError):  # callers that catch ImportError keep working
        A.table_for_config("unet", A.load_config("sd1", "unet"))
    assert len(A.module_table("sdxl", "unet")) == 1050  # the SD families need neither


def test_host_path_without_diffusers_and_transformers():
    """Subprocess with diffusers and transformers unimportable: the SD1/SD2/SDXL layouts build,
    and LoRAs bind, apply, switch and restore bit-exactly through the A1111 shim (fake webui)
    on full-size compvis models (on meta, the patched modules real); neither library is imported."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "a1111_meta_bind.py"), "--block"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["blocked"]
    assert {f: v["bound"] for f, v in out["families"].items()} == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
    assert out["families"]["sdxl"]["components"] == ["te1", "te2", "unet"]
    assert out["table_sizes"]["sdxl"] == {"unet": 1050, "te1": 99, "te2": 260}
