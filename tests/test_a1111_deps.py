"""lora-ext in AUTOMATIC1111 v1.10.1's dependency set (reference/real-hosts.md, finding A2).

A fresh venv gets torch==2.13.0 and the webui's relevant pins from its requirements_versions.txt
(v1.10.1: transformers==4.30.2, hence huggingface-hub<1.0, safetensors==0.4.2, numpy==1.26.2; no
diffusers), then the extension's install.py runs the way the webui runs it (from the extension
folder). Checks: install.py changes no version the host pinned and installs no diffusers, and
SD1.5 / SD2 / SDXL models bind, apply, switch and restore LoRAs bit-exactly through the A1111
shim without diffusers or transformers being imported (tests/a1111_meta_bind.py).

Builds the venv from scratch (pip's own cache is the only thing reused): minutes, and it needs
the package index, so it runs only with ``LORA_EXT_A1111_DEPS=1`` (.ci/run sets it).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# stable-diffusion-webui v1.10.1 requirements_versions.txt: the pins that meet lora-ext's runtime
A1111_PINS = ["transformers==4.30.2", "safetensors==0.4.2", "numpy==1.26.2"]
TORCH = "torch==2.13.0"
BUDGET_S = 600

pytestmark = pytest.mark.skipif(
    os.environ.get("LORA_EXT_A1111_DEPS") != "1",
    reason="builds a fresh A1111 v1.10.1-like venv (minutes, needs the package index); set LORA_EXT_A1111_DEPS=1")


def _sh(args, cwd=None, timeout=BUDGET_S):
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    assert res.returncode == 0, f"{' '.join(map(str, args))} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _freeze(py):
    out = _sh([py, "-m", "pip", "list", "--format=json"])
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(out)}


def _ignore(folder, names):
    return {n for n in names if n in (".git", ".ci-venv", "__pycache__", ".pytest_cache", "build", "dist")
            or n.endswith(".egg-info")}


def test_a1111_v1_10_1_dependency_set(tmp_path):
    t0 = time.monotonic()
    times = {}
    # the webui's layout: extensions/lora-ext is a copy of this source tree
    ext = tmp_path / "webui" / "extensions" / "lora-ext"
    shutil.copytree(ROOT, ext, ignore=_ignore)
    venv = tmp_path / "venv"
    _sh([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    _sh([py, "-m", "pip", "install", "-q", TORCH])
    times["torch"] = time.monotonic() - t0
    _sh([py, "-m", "pip", "install", "-q", *A1111_PINS])
    times["pins"] = time.monotonic() - t0
    before = _freeze(py)
    assert before["transformers"] == "4.30.2" and before["huggingface-hub"].split(".")[0] == "0"
    assert "diffusers" not in before and "lora-ext" not in before

    # install.py, run from the extension folder (where ./lora_ext is importable from the cwd)
    _sh([py, "install.py"], cwd=ext)
    times["install.py"] = time.monotonic() - t0
    after = _freeze(py)
    changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    assert not changed, f"install.py changed what the host had: {changed}"
    assert set(after) - set(before) <= {"lora-ext", "pluggy"}, set(after) - set(before)
    assert "lora-ext" in after and "diffusers" not in after
    # a second run (the webui runs it at every start) installs nothing
    _sh([py, "install.py"], cwd=ext)
    assert _freeze(py) == after

    # the installed package is the extension folder's, importable from anywhere
    where = _sh([py, "-c", "import lora_ext, os; print(os.path.dirname(lora_ext.__file__))"], cwd=tmp_path)
    assert os.path.samefile(where.strip(), ext / "lora_ext")
    res = subprocess.run([py, "-c", "import diffusers"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0, "no diffusers in this environment"

    out = _sh([py, str(ext / "tests" / "a1111_meta_bind.py")], cwd=tmp_path)
    times["bind"] = time.monotonic() - t0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["ok"] and not report["blocked"]
    assert {f: v["bound"] for f, v in report["families"].items()} == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
    total = time.monotonic() - t0
    print(f"A1111 v1.10.1 deps check: {', '.join(f'{k} at {v:.0f}s' for k, v in times.items())}; total {total:.0f}s")
    assert total < BUDGET_S, f"took {total:.0f}s"
