"""Installer for lora-ext inside a host UI (A1111/SD.Next run it on extension load; ComfyUI
users and ComfyUI-Manager run it from ``custom_nodes/lora-ext``).

It installs lora-ext into the host's own Python environment without touching anything the host
pinned: the host runtime needs only torch (the host's own; never installed here), safetensors,
numpy and pluggy. Those of the last three that are missing are installed (never upgraded),
then this folder with ``--no-deps`` in editable mode, so updating the extension (``git pull``)
needs no reinstall. diffusers and transformers are not needed in a host (the SD module tables
ship as data). Run from the extension / node folder, where ``./lora_ext`` is importable from the
working directory, it still installs: it asks the package metadata, and checks what imports
from a fresh interpreter in an empty folder. Finally the host shims (``lora_ext.hosts.a1111.shim``,
``lora_ext.hosts.comfyui.patching``) are imported in such a fresh interpreter; if that fails the
installer exits with the reason. Usable standalone too: ``python install.py``.
"""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# Runtime dependencies besides torch (distribution name -> requirement to install when missing).
# None of them has dependencies of its own, so --no-deps loses nothing.
REQUIREMENTS = {"safetensors": "safetensors>=0.4", "numpy": "numpy>=1.24", "pluggy": "pluggy>=1.3"}
CHECK_IMPORTS = ("lora_ext.hosts.a1111.shim", "lora_ext.hosts.comfyui.patching")


def installed(dist: str) -> bool:
    """Whether distribution ``dist`` is installed (metadata, not the import path: the extension
    folder on ``sys.path`` must not count as an installed lora-ext)."""
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def missing(requirements=REQUIREMENTS):
    return [spec for dist, spec in requirements.items() if not installed(dist)]


def pip(*args):
    cmd = [sys.executable, "-m", "pip", "install", *args]
    if subprocess.call(cmd) != 0:
        sys.exit(f"lora-ext: `{' '.join(cmd)}` failed (see pip's output above); lora-ext is not installed.")


def _neutral_env():
    # a fresh interpreter in an empty folder, without this folder on PYTHONPATH: it sees what
    # is installed, not the sources lying here
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and os.path.abspath(p) != HERE]
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    else:
        env.pop("PYTHONPATH", None)
    return env


def run_python(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter from a neutral folder."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_neutral_env(),
                              capture_output=True, text=True)


def installed_here() -> bool:
    """lora-ext is installed and imports from this folder (not an older copy elsewhere)."""
    if not installed("lora-ext"):
        return False
    res = run_python("import lora_ext, os; print(os.path.dirname(os.path.abspath(lora_ext.__file__)))")
    if res.returncode != 0:
        return False
    where = res.stdout.strip().splitlines()[-1:] or [""]
    return os.path.normcase(os.path.realpath(where[0])) == os.path.normcase(
        os.path.realpath(os.path.join(HERE, "lora_ext")))


def _version(dist: str) -> tuple:
    try:
        v = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ()
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def build_isolation_flags() -> list:
    """``--no-build-isolation`` when the host's own setuptools can build the editable install
    (>= 64, with wheel below 70.1): pip then needs nothing from the index (offline hosts)."""
    st = _version("setuptools")
    if st >= (70, 1) or (st >= (64,) and installed("wheel")):
        return ["--no-build-isolation"]
    return []


def main():
    if not installed("torch") and importlib.util.find_spec("torch") is None:
        sys.exit("lora-ext: torch is not installed in this environment; install your host (or "
                 "`pip install torch==2.13.0`) first. lora-ext never installs torch itself.")
    need = missing()
    if need:
        # only what is missing, --no-deps: nothing the host pinned is upgraded or replaced
        pip("--no-deps", *need)
    if not installed_here():
        pip("--no-deps", *build_isolation_flags(), "-e", HERE)
    check = "; ".join(f"import {m}" for m in CHECK_IMPORTS)
    res = run_python(check)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-8:])
        sys.exit(f"lora-ext: installed, but `{check}` fails in this environment "
                 f"({sys.executable}):\n{tail}\nlora-ext will not work until this is fixed.")


if __name__ == "__main__":
    main()
